"""Group norm and instance norm against PyTorch (functional, autograd gradients, modules, state dicts) and against
the ONNX operators' semantics (InstanceNormalization, GroupNormalization-21). Each part skips without its library."""
import numpy as np
import pytest

import bn_simd
from conftest import nchw_to, to_nchw

TOL = {np.float32: 2e-5, np.float64: 1e-12}
SHAPES = [((4, 6, 7, 5), 3), ((2, 8, 10), 4), ((3, 4, 3, 4, 5), 2), ((2, 32, 9, 9), 32), ((5, 6), 3), ((1, 3, 20, 20), 1)]


def _data(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2 + 1.5).astype(dtype)


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape, G", SHAPES)
def test_group_norm_forward_and_gradients_match_torch(torch, shape, G, layout, dtype):
    C = shape[1]
    x, g = _data(shape, dtype, 1), _data(shape, dtype, 2)
    w, b = _data((C,), dtype, 3), _data((C,), dtype, 4)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.group_norm(xt, G, wt, bt, eps=1e-5)
    yt.backward(torch.tensor(g))
    y, mean, invstd = bn_simd.group_norm_forward(nchw_to(x, layout), G, w, b, layout=layout)
    gx, gw, gb = bn_simd.group_norm_backward(nchw_to(g, layout), nchw_to(x, layout), mean, invstd, G, w, layout=layout)
    tol = TOL[dtype]
    np.testing.assert_allclose(to_nchw(y, layout), yt.detach().numpy(), rtol=tol, atol=4 * tol)
    _, tmean, trstd = torch.ops.aten.native_group_norm(torch.tensor(x), torch.tensor(w), torch.tensor(b), shape[0], C,
                                                       int(np.prod(shape[2:])), G, 1e-5)
    np.testing.assert_allclose(mean, tmean.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(invstd, trstd.numpy(), rtol=4 * tol)
    scale = float(np.abs(xt.grad.numpy()).max())
    np.testing.assert_allclose(to_nchw(gx, layout), xt.grad.numpy(), rtol=4 * tol, atol=16 * tol * scale)
    np.testing.assert_allclose(gw, wt.grad.numpy(), rtol=4 * tol, atol=16 * tol * np.abs(gw).max())
    np.testing.assert_allclose(gb, bt.grad.numpy(), rtol=4 * tol, atol=16 * tol * np.abs(gb).max())


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [(4, 6, 7, 5), (2, 3, 10), (2, 4, 3, 4, 5)])
def test_instance_norm_with_running_stats_matches_torch(torch, shape, layout):
    C = shape[1]
    x, g = _data(shape, np.float64, 5), _data(shape, np.float64, 6)
    w, b = _data((C,), np.float64, 7), _data((C,), np.float64, 8)
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = torch.nn.functional.instance_norm(xt, trm, trv, wt, bt, use_input_stats=True, momentum=0.3, eps=1e-5)
    yt.backward(torch.tensor(g))
    y = bn_simd.instance_norm(nchw_to(x, layout), rm, rv, w, b, True, 0.3, 1e-5, layout=layout)
    np.testing.assert_allclose(to_nchw(y, layout), yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-12, atol=1e-14)
    _, mean, invstd = bn_simd.instance_norm_forward(nchw_to(x, layout), w, b, layout=layout)
    gx, gw, gb = bn_simd.instance_norm_backward(nchw_to(g, layout), nchw_to(x, layout), mean, invstd, w, layout=layout)
    np.testing.assert_allclose(to_nchw(gx, layout), xt.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(gw, wt.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(gb, bt.grad.numpy(), rtol=1e-10, atol=1e-11)
    ye = bn_simd.instance_norm(nchw_to(x, layout), rm, rv, w, b, use_input_stats=False, layout=layout)
    yte = torch.nn.functional.instance_norm(torch.tensor(x), trm, trv, torch.tensor(w), torch.tensor(b),
                                            use_input_stats=False)
    np.testing.assert_allclose(to_nchw(ye, layout), yte.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ours, theirs, args", [("GroupNorm", "GroupNorm", (2, 6)),
                                                ("InstanceNorm2d", "InstanceNorm2d", (6,))])
def test_modules_and_state_dicts_match_torch(torch, ours, theirs, args):
    kwargs = {"affine": True, "track_running_stats": True} if "Instance" in ours else {}
    tm = getattr(torch.nn, theirs)(*args, **kwargs).double()
    with torch.no_grad():
        for p in tm.parameters():
            p.copy_(torch.randn_like(p))
    m = getattr(bn_simd, ours)(*args, dtype=np.float64, **kwargs)
    m.load_state_dict(tm.state_dict())
    x = _data((3, 6, 5, 4), np.float64, 9)
    xt = torch.tensor(x, requires_grad=True)
    yt = tm(xt)
    yt.backward(torch.ones_like(yt))
    y = m(x)
    gx = m.backward(np.ones_like(y))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(m.grad_weight, tm.weight.grad.numpy(), rtol=1e-10, atol=1e-10)
    ours_state, theirs_state = m.state_dict(), tm.state_dict()
    assert set(ours_state) == set(theirs_state)
    for k, v in theirs_state.items():
        np.testing.assert_allclose(np.asarray(ours_state[k], np.float64), v.numpy().astype(np.float64), rtol=1e-12,
                                   err_msg=k)


def test_one_value_per_group_is_refused_as_in_torch(torch):
    x = np.random.default_rng(0).random((1, 10, 1)).astype(np.float32)
    with pytest.raises(ValueError):
        torch.nn.GroupNorm(10, 10)(torch.tensor(x))
    with pytest.raises(ValueError, match="more than 1 value per group"):
        bn_simd.GroupNorm(10, 10)(x)
    with pytest.raises(ValueError):
        torch.nn.InstanceNorm1d(10)(torch.tensor(x))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        bn_simd.InstanceNorm1d(10)(x)


# ---- ONNX operator semantics (the reference evaluator of the onnx package, and ONNX Runtime when present) --------

def _onnx_run(node_type, opset, attrs, x, scale, bias):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator
    elem = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.DOUBLE
    node = helper.make_node(node_type, ["x", "s", "b"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", elem, list(x.shape)),
                                            helper.make_tensor_value_info("s", elem, list(scale.shape)),
                                            helper.make_tensor_value_info("b", elem, list(bias.shape))],
                              [helper.make_tensor_value_info("y", elem, list(x.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    outs = [ReferenceEvaluator(model).run(None, {"x": x, "s": scale, "b": bias})[0]]
    try:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"x": x, "s": scale, "b": bias})[0])
    except ImportError:
        pass
    except Exception as e:  # an operator or type this ONNX Runtime build lacks
        if "NOT_IMPLEMENTED" not in str(e) and "not implemented" not in str(e).lower():
            raise
    return outs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (3, 4, 10), (1, 2, 3, 4, 5)])
def test_onnx_instance_normalization_semantics(shape, dtype):
    C = shape[1]
    x, s, b = _data(shape, dtype, 10), _data((C,), dtype, 11), _data((C,), dtype, 12)
    y = bn_simd.instance_norm(x, None, None, s, b, eps=1e-4)
    for ref in _onnx_run("InstanceNormalization", 6, {"epsilon": 1e-4}, x, s, b):
        np.testing.assert_allclose(y, ref, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, G", [((2, 6, 5, 6), 3), ((3, 4, 10), 2), ((1, 8, 3, 4, 5), 8), ((2, 4, 7), 1)])
def test_onnx_group_normalization_21_semantics(shape, G, dtype):
    C = shape[1]
    x, s, b = _data(shape, dtype, 13), _data((C,), dtype, 14), _data((C,), dtype, 15)
    y = bn_simd.group_norm(x, G, s, b, eps=1e-4)
    # stash_type: the precision of the operator's statistics (float32 by default; double for float64 data)
    attrs = {"epsilon": 1e-4, "num_groups": G, "stash_type": 1 if dtype == np.float32 else 11}
    for ref in _onnx_run("GroupNormalization", 21, attrs, x, s, b):
        np.testing.assert_allclose(y, ref, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
