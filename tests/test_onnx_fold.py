"""bn_simd.onnx.fold: BatchNormalization nodes folded into the Conv/Gemm before them; ONNX Runtime's outputs on the
original and folded graphs against a float64 oracle (PyTorch's eval model in float64 for exported graphs, the NumPy
conv + BN of test_fold for graphs built here).

Bound: the original graph's own float32 error against the oracle (err32) measures this graph's rounding on this
input; the folded graph rounds its folded weights once more (one float32 ulp each, of the order of what the float32
convolutions already round), so it stays within a small multiple of err32; a wrong fold moves outputs by O(1).
"""
import copy
import io
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import bn_simd.onnx as bo  # noqa: E402
from test_fold import bn_ref, conv_ref  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)


def run(model, feeds):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def ops(model):
    return [n.op_type for n in model.graph.node]


def assert_close_to_oracle(got, orig, want):
    err32 = np.abs(orig.astype(np.float64) - want).max()
    errf = np.abs(got.astype(np.float64) - want).max()
    bound = 4 * err32 + 4 * EPS32 * np.abs(want).max()
    assert errf <= bound, f"folded error {errf:.3g} > {bound:.3g} (original graph's error {err32:.3g})"

# ---- graphs exported from PyTorch ----------------------------------------------------------------------------------


def torch_net():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),      # depthwise
        nn.Conv2d(8, 6, 1, stride=2), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10), nn.BatchNorm1d(10))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.3)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return torch, model


def export(torch, model, x, **kw):
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"],
                          **kw)
    return onnx.load_from_string(f.getvalue())


def test_fold_eval_export_conv_depthwise_and_gemm():
    torch, model = torch_net()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    graph = export(torch, model, x, do_constant_folding=False)   # keeps the BatchNormalization nodes
    assert ops(graph).count("BatchNormalization") == 4
    before = graph.SerializeToString()
    folded = bo.fold(graph)
    assert graph.SerializeToString() == before                     # the model given is not modified
    onnx.checker.check_model(folded)
    assert "BatchNormalization" not in ops(folded) and [o.name for o in folded.graph.output] == ["y"]
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double()).numpy()
    feeds = {"x": x.numpy()}
    assert_close_to_oracle(run(folded, feeds)[0], run(graph, feeds)[0], want)


def test_fold_training_export_as_inference():
    torch, model = torch_net()
    model.train()
    x = torch.randn(4, 3, 8, 8)
    graph = export(torch, model, x, training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False)
    bns = [n for n in graph.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 4 and all(helper.get_attribute_value(a) == 1 for n in bns for a in n.attribute
                                 if a.name == "training_mode")
    # training-mode nodes normalise with the batch's statistics: left alone unless asked
    with pytest.warns(UserWarning, match="4 BatchNormalization node.*training mode.*training_nodes='inference'"):
        assert ops(bo.fold(graph)).count("BatchNormalization") == 4
    folded = bo.fold(graph, training_nodes="inference")
    onnx.checker.check_model(folded)
    assert "BatchNormalization" not in ops(folded)
    # the graph as inference runs it: training_mode 0, running-statistics outputs dropped
    as_eval = copy.deepcopy(graph)
    for n in as_eval.graph.node:
        if n.op_type == "BatchNormalization":
            for a in n.attribute:
                if a.name == "training_mode":
                    a.i = 0
            del n.output[1:]
    model.eval()
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double()).numpy()
    feeds = {"x": x.numpy()}
    assert_close_to_oracle(run(folded, feeds)[0], run(as_eval, feeds)[0], want)

# ---- graphs built with onnx.helper ----------------------------------------------------------------------------------


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _bn(name, x, y, C, rng, eps=1e-3, prefix=None):
    p = prefix or name
    mean, var, w, b = rng.standard_normal(C), rng.uniform(0.2, 2, C), rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    node = helper.make_node("BatchNormalization", [x, p + "_s", p + "_b", p + "_m", p + "_v"], [y], name=name,
                            epsilon=eps)
    inits = [_init(p + "_s", w), _init(p + "_b", b), _init(p + "_m", mean), _init(p + "_v", var)]
    return node, inits, (mean, var, w, b)


def test_fold_hand_built_graph_shared_weights_branches_and_gemm():
    rng = np.random.default_rng(5)
    W = rng.standard_normal((6, 2, 3, 3))           # group=2 conv of 4 input channels, shared by two convs
    nodes, inits = [], [_init("W", W)]
    nodes.append(helper.make_node("Conv", ["x", "W"], ["c1"], group=2, pads=[1, 1, 1, 1]))
    bn1, i1, p1 = _bn("bn1", "c1", "y1", 6, rng)
    nodes.append(helper.make_node("Conv", ["x", "W"], ["c2"], group=2))
    bn2, i2, p2 = _bn("bn2", "c2", "y2", 6, rng)
    nodes.append(helper.make_node("Conv", ["x", "W"], ["c3"], group=2))     # read twice: not folded
    bn3, i3, p3 = _bn("bn3", "c3", "t3", 6, rng)
    nodes += [bn1, bn2, bn3, helper.make_node("Add", ["t3", "c3"], ["y3"])]
    Bg = rng.standard_normal((5, 7))                 # Gemm, transB=0: B (K=5, N=7), alpha, beta, C (1, N)
    Cg = rng.standard_normal((1, 7))
    inits += [_init("Bg", Bg), _init("Cg", Cg)]
    nodes.append(helper.make_node("Gemm", ["a", "Bg", "Cg"], ["g"], alpha=0.5, beta=2.0))
    bn4, i4, p4 = _bn("bn4", "g", "y4", 7, rng)
    nodes.append(bn4)
    inits += i1 + i2 + i3 + i4
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", f32, [2, 4, 5, 5]),
                     helper.make_tensor_value_info("a", f32, [3, 5])],
        [helper.make_tensor_value_info(n, f32, s) for n, s in (("y1", [2, 6, 5, 5]), ("y2", [2, 6, 3, 3]),
                                                                ("y3", [2, 6, 3, 3]), ("y4", [3, 7]))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    folded = bo.fold(model)
    onnx.checker.check_model(folded)
    assert ops(folded).count("BatchNormalization") == 1 and [o.name for o in folded.graph.output] == \
        ["y1", "y2", "y3", "y4"]
    assert "W" in {t.name for t in folded.graph.initializer}          # still read by the unfolded conv
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    feeds = {"x": x, "a": a}
    W32 = W.astype(np.float32).astype(np.float64)
    c3 = conv_ref(x, W32, groups=2)
    want = [bn_ref(conv_ref(x, W32, groups=2, padding=1), *p1, 1e-3), bn_ref(conv_ref(x, W32, groups=2), *p2, 1e-3),
            bn_ref(c3, *p3, 1e-3) + c3,
            bn_ref(0.5 * a.astype(np.float64) @ Bg.astype(np.float32) + 2.0 * Cg.astype(np.float32), *p4, 1e-3)]
    for got, orig, w in zip(run(folded, feeds), run(model, feeds), want):
        assert_close_to_oracle(got, orig, w)


def test_fold_keeps_nodes_with_non_constant_parameters_and_refuses_bad_arguments():
    rng = np.random.default_rng(6)
    f32 = TensorProto.FLOAT
    conv = helper.make_node("Conv", ["x", "W"], ["c"])
    bn, inits, _ = _bn("bn", "c", "y", 3, rng)
    # W is a graph input: the caller may feed another weight, so it is not a constant
    graph = helper.make_graph([conv, bn], "g", [helper.make_tensor_value_info("x", f32, [1, 2, 4, 4]),
                                                helper.make_tensor_value_info("W", f32, [3, 2, 1, 1])],
                              [helper.make_tensor_value_info("y", f32, [1, 3, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert ops(bo.fold(model)) == ["Conv", "BatchNormalization"]
    with pytest.raises(TypeError, match="model"):
        bo.fold(model.SerializeToString())
    with pytest.raises(ValueError, match="training_nodes"):
        bo.fold(model, training_nodes="yes")
    bad = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node(
        "BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["y"], name="bn", epsilon=0.0)], "g",
        [helper.make_tensor_value_info("x", f32, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", f32, [1, 3, 4, 4])],
        inits + [_init("W", np.ones((3, 2, 1, 1)))])
    with pytest.raises(ValueError, match="'bn'.*eps"):
        bo.fold(helper.make_model(bad, opset_imports=[helper.make_opsetid("", 17)]))


def test_fold_matmul_add_and_matmul_of_rank_2_only():
    rng = np.random.default_rng(8)
    f32 = TensorProto.FLOAT
    W1, c1, W2, W3 = (rng.standard_normal(s) for s in ((5, 4), (1, 4), (5, 3), (5, 4)))
    bn1, i1, p1 = _bn("bn1", "s1", "y1", 4, rng)
    bn2, i2, p2 = _bn("bn2", "m2", "y2", 3, rng)
    bn3, i3, _ = _bn("bn3", "m3", "y3", 2, rng)      # (2, 3, 4) output: BN's axis 1 is not the features
    nodes = [helper.make_node("MatMul", ["a", "W1"], ["m1"]), helper.make_node("Add", ["c1", "m1"], ["s1"]), bn1,
             helper.make_node("MatMul", ["a", "W2"], ["m2"]), bn2,
             helper.make_node("MatMul", ["a3", "W3"], ["m3"]), bn3]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("a", f32, [6, 5]), helper.make_tensor_value_info("a3", f32,
                                                                                                    [3, 2, 5])],
        [helper.make_tensor_value_info("y1", f32, [6, 4]), helper.make_tensor_value_info("y2", f32, [6, 3]),
         helper.make_tensor_value_info("y3", f32, [3, 2, 4])],
        [_init("W1", W1), _init("c1", c1), _init("W2", W2), _init("W3", W3)] + i1 + i2 + i3)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded = bo.fold(model)
    onnx.checker.check_model(folded)
    assert ops(folded) == ["MatMul", "Add", "MatMul", "Add", "MatMul", "BatchNormalization"]
    a = rng.standard_normal((6, 5)).astype(np.float32)
    a3 = rng.standard_normal((3, 2, 5)).astype(np.float32)
    feeds = {"a": a, "a3": a3}
    f = lambda v: np.asarray(v, np.float32).astype(np.float64)
    want = [bn_ref(f(a) @ f(W1) + f(c1), *p1, 1e-3), bn_ref(f(a) @ f(W2), *p2, 1e-3)]
    got, orig = run(folded, feeds), run(model, feeds)
    for k in range(2):
        assert_close_to_oracle(got[k], orig[k], want[k])
    np.testing.assert_array_equal(got[2], orig[2])     # the rank-3 BN is left as it was


@pytest.mark.parametrize("opset", [9, 13, 17])
@pytest.mark.parametrize("epsilon", [None, 1e-2])
def test_fold_onnx_batchnorm_cases_behind_an_identity_conv(opset, epsilon):
    """ONNX's own BatchNormalization cases (batchnorm_example: x (2, 3, 4, 5), random statistics; batchnorm_epsilon:
    epsilon 1e-2; the attribute absent means 1e-5) behind a 1x1 conv with identity weights, across opsets."""
    rng = np.random.default_rng(9)
    f32 = TensorProto.FLOAT
    mean, var, s, b = rng.standard_normal(3), rng.uniform(0.1, 1.0, 3), rng.standard_normal(3), rng.standard_normal(3)
    kw = {} if epsilon is None else {"epsilon": epsilon}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], **kw)]
    inits = [_init("W", np.eye(3).reshape(3, 3, 1, 1)), _init("s", s), _init("b", b), _init("m", mean),
             _init("v", var)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f32, [2, 3, 4, 5])],
                              [helper.make_tensor_value_info("y", f32, [2, 3, 4, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 7)
    folded = bo.fold(model)
    assert ops(folded) == ["Conv"]
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    f = lambda v: np.asarray(v, np.float32).astype(np.float64)
    want = bn_ref(f(x), f(mean), f(var), f(s), f(b), 1e-5 if epsilon is None else epsilon)
    assert_close_to_oracle(run(folded, {"x": x})[0], run(model, {"x": x})[0], want)


def test_fold_removes_identity_of_constant_parameters_it_no_longer_reads():
    """BN parameters passed as Identity(Constant) (the legacy torch.onnx exporter's pattern): folded, and the pair
    removed with the BN (the Identity of a Constant node's output was kept, and its Constant with it)."""
    rng = np.random.default_rng(8)
    f32 = TensorProto.FLOAT
    W = rng.standard_normal((4, 3, 3, 3))
    scale = rng.uniform(0.5, 2, 4)
    bn, inits, (mean, var, _, b) = _bn("bn", "c", "y", 4, rng)
    bn.input[1] = "scale"
    inits = [t for t in inits if t.name != "bn_s"] + [_init("W", W)]
    nodes = [helper.make_node("Constant", [], ["scale_c"], value=numpy_helper.from_array(scale.astype(np.float32))),
             helper.make_node("Identity", ["scale_c"], ["scale"]), helper.make_node("Conv", ["x", "W"], ["c"]), bn]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f32, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", f32, [1, 4, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    folded = bo.fold(model)
    onnx.checker.check_model(folded)
    assert ops(folded) == ["Conv"]
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    want = bn_ref(conv_ref(x, W.astype(np.float32).astype(np.float64)), mean, var, scale.astype(np.float32), b, 1e-3)
    assert_close_to_oracle(run(folded, {"x": x})[0], run(model, {"x": x})[0], want)


def _conv_bn_model(rng, opset, bn_outputs=("y",), extra_nodes=(), C=4):
    """x (1, 3, 4, 4) -> Conv (W) -> BatchNormalization (outputs bn_outputs) and extra_nodes."""
    f32 = TensorProto.FLOAT
    bn, inits, params = _bn("bn", "c", bn_outputs[0], C, rng)
    del bn.output[:]
    bn.output.extend(bn_outputs)
    W = rng.standard_normal((C, 3, 1, 1))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]), bn, *extra_nodes], "g",
        [helper.make_tensor_value_info("x", f32, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", f32, [1, C, 4, 4])], [_init("W", W)] + inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), W, params


@pytest.mark.parametrize("opset", [9, 13])
def test_fold_before_opset_14_a_node_with_statistics_outputs_is_in_training_mode(opset):
    """Before training_mode (opset 14) a BatchNormalization with outputs beyond Y normalises with the batch's
    statistics (the legacy exporter writes five): left alone with a warning, folded as inference when asked."""
    rng = np.random.default_rng(20)
    model, W, (mean, var, w, b) = _conv_bn_model(rng, opset, ("y", "rm", "rv", "sm", "sv"))
    with pytest.warns(UserWarning, match="1 BatchNormalization node.*training mode"):
        assert ops(bo.fold(model)) == ["Conv", "BatchNormalization"]
    folded = bo.fold(model, training_nodes="inference")
    assert ops(folded) == ["Conv"]
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    want = bn_ref(conv_ref(np.float64(x), np.asarray(W, np.float32).astype(np.float64)), mean, var, w, b, 1e-3)
    np.testing.assert_allclose(run(folded, {"x": x})[0], want, rtol=1e-5, atol=1e-5)
    single, _, _ = _conv_bn_model(np.random.default_rng(20), opset)   # Y alone: inference, folded silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops(bo.fold(single)) == ["Conv"]


def test_fold_matmul_add_that_broadcasts_a_rank_1_product_is_left():
    """a (K,) @ W is (N,); + c of shape (1, N) makes the BN's input rank 2, but a folded (N,) bias would make the
    output (N,): left as it is."""
    rng = np.random.default_rng(21)
    f32 = TensorProto.FLOAT
    bn, inits, _ = _bn("bn", "s1", "y", 4, rng)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "W"], ["m"]), helper.make_node("Add", ["m", "c"], ["s1"]), bn], "g",
        [helper.make_tensor_value_info("a", f32, [5])], [helper.make_tensor_value_info("y", f32, [1, 4])],
        [_init("W", rng.standard_normal((5, 4))), _init("c", rng.standard_normal((1, 4)))] + inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded = bo.fold(model)
    onnx.checker.check_model(folded, full_check=True)
    feeds = {"a": rng.standard_normal(5).astype(np.float32)}
    got, orig = run(folded, feeds)[0], run(model, feeds)[0]
    assert got.shape == orig.shape == (1, 4)
    np.testing.assert_array_equal(got, orig)


def test_fold_new_names_are_new_in_subgraphs_too():
    """An If body that already names a value W_bnfold: the folded weight takes another name (SSA form)."""
    rng = np.random.default_rng(22)
    f32 = TensorProto.FLOAT
    then = helper.make_graph([helper.make_node("Identity", ["y"], ["W_bnfold"]),
                              helper.make_node("Identity", ["W_bnfold"], ["t_out"])], "then", [],
                             [helper.make_tensor_value_info("t_out", f32, None)])
    other = helper.make_graph([helper.make_node("Identity", ["y"], ["e_out"])], "else", [],
                              [helper.make_tensor_value_info("e_out", f32, None)])
    cond = numpy_helper.from_array(np.array(True), "cond")
    model, W, (mean, var, w, b) = _conv_bn_model(rng, 17)
    model.graph.initializer.append(cond)
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other))
    model.graph.output.append(helper.make_tensor_value_info("z", f32, None))
    folded = bo.fold(model)
    assert ops(folded) == ["Conv", "If"] and "W_bnfold" not in {t.name for t in folded.graph.initializer}
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    got, orig = run(folded, {"x": x}), run(model, {"x": x})
    np.testing.assert_allclose(got[1], orig[1], rtol=1e-5, atol=1e-5)


def test_fold_external_data_not_loaded_is_refused(tmp_path, monkeypatch):
    """Values left in a file beside the model (onnx.load(..., load_external_data=False)) are not read from the
    working directory: a ValueError naming the node says how to load them; loaded, the model folds."""
    rng = np.random.default_rng(23)
    model, _, _ = _conv_bn_model(rng, 17)
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    monkeypatch.chdir(path.parent)   # (where numpy_helper would find the file)
    lazy = onnx.load(str(path), load_external_data=False)
    with pytest.raises(ValueError, match="node 'bn'.*stored in a file beside the model.*load_external_data"):
        bo.fold(lazy)
    onnx.load_external_data_for_model(lazy, str(path.parent))
    assert ops(bo.fold(lazy)) == ["Conv"]



def test_fold_external_data_held_in_memory_folds_and_opset_6_is_test_decides():
    """A tensor marked external whose bytes are in memory (convert_model_to_external_data before saving) is read
    from memory; before opset 7, is_test=0 (the default) is training mode and is_test=1 inference."""
    rng = np.random.default_rng(24)
    model, _, _ = _conv_bn_model(rng, 17)
    onnx.external_data_helper.convert_model_to_external_data(model, location="w.bin", size_threshold=0)
    assert ops(bo.fold(model)) == ["Conv"]
    old, _, _ = _conv_bn_model(np.random.default_rng(24), 6)
    with pytest.warns(UserWarning, match="training mode"):
        assert ops(bo.fold(old)) == ["Conv", "BatchNormalization"]
    bn = [n for n in old.graph.node if n.op_type == "BatchNormalization"][0]
    bn.attribute.append(helper.make_attribute("is_test", 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops(bo.fold(old)) == ["Conv"]


@pytest.mark.parametrize("where", ["conv_weight", "bn_params", "gemm_weight"])
def test_fold_leaves_bfloat16_pairs_and_folds_the_others(where):
    """A bfloat16 Conv or Gemm weight, or bfloat16 batch-norm parameters (allowed from BatchNormalization-15), is
    left as it is (the fold computes in float16/32/64), with no error; the float32 pair beside it is still folded."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(8)
    f32, bf16 = TensorProto.FLOAT, TensorProto.BFLOAT16

    def as_bf16(name, a):
        return numpy_helper.from_array(np.asarray(a, np.float32).astype(ml_dtypes.bfloat16), name)
    bn1, inits1, _ = _bn("bn1", "c1", "y1", 4, rng)
    bn2, inits2, _ = _bn("bn2", "c2", "y2", 4, rng)
    if where == "bn_params":
        inits2 = [as_bf16(t.name, numpy_helper.to_array(t)) for t in inits2]
    w2 = rng.standard_normal((4, 3, 1, 1) if where != "gemm_weight" else (3, 4))
    second = helper.make_node("Conv", ["x", "W2"], ["c2"]) if where != "gemm_weight" else \
        helper.make_node("Gemm", ["v", "W2"], ["c2"])
    w2_init = as_bf16("W2", w2) if where != "bn_params" else _init("W2", w2)
    inputs = [helper.make_tensor_value_info("x", f32, [1, 3, 4, 4])]
    if where == "gemm_weight":
        inputs.append(helper.make_tensor_value_info("v", bf16, [2, 3]))
    outputs = [helper.make_tensor_value_info("y1", f32, [1, 4, 4, 4]),
               helper.make_tensor_value_info("y2", bf16 if where != "bn_params" else f32, None)]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W1"], ["c1"]), bn1, second, bn2], "g", inputs, outputs,
        [_init("W1", rng.standard_normal((4, 3, 1, 1))), w2_init] + inits1 + inits2)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    folded = bo.fold(model)
    kept = [n.name for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert kept == ["bn2"]


def test_fold_default_epsilon_is_the_float32_attributes():
    """A BatchNormalization without epsilon uses 1e-5 as its float32 attribute holds it (as ONNX Runtime does): a
    float64 graph folded with the float64 1e-5 moved its outputs by ~1e-8 relative."""
    rng = np.random.default_rng(31)
    N, K = 3, 4
    inits = [numpy_helper.from_array(rng.standard_normal((K, N)), "W")] + [
        numpy_helper.from_array(a, n) for n, a in zip("sbmv", [np.ones(N), np.zeros(N), np.zeros(N), np.zeros(N)])]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["A", "W"], ["g"]), helper.make_node("BatchNormalization", ["g", "s", "b", "m", "v"],
                                                                       ["y"])],
        "g", [helper.make_tensor_value_info("A", TensorProto.DOUBLE, [2, K])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, N])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    a = rng.standard_normal((2, K))
    folded = bo.fold(model)
    assert ops(folded) == ["Gemm"]
    want = run(model, {"A": a})[0]
    np.testing.assert_allclose(run(folded, {"A": a})[0], want, rtol=1e-14, atol=0)


def _const_bn_params(rng, C, prefix="p", floats=False):
    """BatchNormalization parameters as Constant nodes (value tensors, or value_floats lists)."""
    vals = [rng.uniform(0.5, 1.5, C), rng.standard_normal(C), rng.standard_normal(C), rng.uniform(0.2, 2, C)]
    names = [f"{prefix}_{k}" for k in "sbmv"]
    if floats:
        nodes = [helper.make_node("Constant", [], [n], value_floats=[float(v) for v in a]) for n, a in zip(names, vals)]
    else:
        nodes = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(a.astype(np.float32)))
                 for n, a in zip(names, vals)]
    return nodes, names


@pytest.mark.parametrize("floats", [False, True], ids=["value", "value_floats"])
@pytest.mark.parametrize("ir", [3, 8])
def test_fold_constant_node_parameters_and_ir_3_graph_inputs(ir, floats):
    """Parameters as Constant nodes fold, value_floats lists too (they were left); in an IR 3 model, where every
    initializer must be a graph input, the new initializers are listed as inputs (the checker refused the model)."""
    rng = np.random.default_rng(32)
    C = 4
    nodes, names = _const_bn_params(rng, C, floats=floats)
    wnode = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(
        rng.standard_normal((C, 3, 1, 1)).astype(np.float32)))
    graph = helper.make_graph(
        [wnode, *nodes, helper.make_node("Conv", ["x", "W"], ["c"]),
         helper.make_node("BatchNormalization", ["c", *names], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=ir)
    folded = bo.fold(model)
    assert ops(folded) == ["Conv"]
    onnx.checker.check_model(folded, full_check=True)
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run(folded, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_fold_leaves_a_conv_of_four_spatial_dimensions_and_folds_the_rest():
    """A Conv of rank-6 weights (valid ONNX) is left with its BN, instead of a ValueError that stopped the whole fold;
    the model's other pair still folds."""
    rng = np.random.default_rng(33)
    f32 = TensorProto.FLOAT
    bn1, i1, _ = _bn("bn1", "c1", "y1", 2, rng)
    bn2, i2, _ = _bn("bn2", "c2", "y2", 2, rng)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x6", "W6"], ["c1"]), bn1, helper.make_node("Conv", ["x4", "W4"], ["c2"]), bn2],
        "g", [helper.make_tensor_value_info("x6", f32, [1, 1, 3, 3, 3, 3]),
              helper.make_tensor_value_info("x4", f32, [1, 1, 3, 3])],
        [helper.make_tensor_value_info("y1", f32, None), helper.make_tensor_value_info("y2", f32, None)],
        [_init("W6", rng.standard_normal((2, 1, 2, 2, 2, 2))), _init("W4", rng.standard_normal((2, 1, 2, 2)))]
        + i1 + i2)
    folded = bo.fold(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert ops(folded) == ["Conv", "BatchNormalization", "Conv"]


def test_fold_new_names_avoid_sparse_initializers_and_training_info_keeps_what_it_reads():
    """A new initializer's name is none of the sparse initializers' (a collision made the model invalid), and an
    initializer the model's training information reads stays (it was pruned, leaving the training info dangling)."""
    rng = np.random.default_rng(34)
    model, _, _ = _conv_bn_model(rng, 17)
    sp = onnx.SparseTensorProto()
    sp.values.CopyFrom(numpy_helper.from_array(np.ones(1, np.float32), "W_bnfold"))
    sp.indices.CopyFrom(numpy_helper.from_array(np.zeros(1, np.int64), "W_bnfold_idx"))
    sp.dims.extend([4])
    model.graph.sparse_initializer.append(sp)
    ti = model.training_info.add()
    ti.algorithm.CopyFrom(helper.make_graph([helper.make_node("Identity", ["W"], ["W_new"])], "alg", [],
                                            [helper.make_tensor_value_info("W_new", TensorProto.FLOAT, None)]))
    b = ti.update_binding.add()
    b.key, b.value = "W", "W_new"
    folded = bo.fold(model)
    assert ops(folded) == ["Conv"]
    names = [t.name for t in folded.graph.initializer]
    assert "W_bnfold" not in names and "W" in names
    onnx.checker.check_model(folded)


def test_fold_does_not_read_the_parameters_of_a_pair_it_cannot_fold(tmp_path):
    """A BN after a Conv whose weight is a graph input (not constant) is left as it is, without reading the BN's
    parameters: stored in a file the model was loaded without, they no longer refuse the whole model."""
    rng = np.random.default_rng(35)
    model, _, _ = _conv_bn_model(rng, 17)
    w = [t for t in model.graph.initializer if t.name == "W"][0]
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.dims)))
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    lazy = onnx.load(str(path), load_external_data=False)
    assert ops(bo.fold(lazy)) == ["Conv", "BatchNormalization"]
