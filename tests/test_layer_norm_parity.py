"""Layer norm and RMS norm against their peers: PyTorch (functional, modules, autograd, gradcheck of bn_simd.torch),
ONNX's LayerNormalization (opset 17) and RMSNormalization (opset 23) run in ONNX Runtime, and the cases of the
peers' own tests that apply:

* PyTorch: ``common_methods_invocations`` (sample_inputs_layer_norm / native_layer_norm / rms_norm, their error
  inputs), ``common_modules`` (module_inputs_torch_nn_LayerNorm / RMSNorm), ``test_nn.py`` (_test_LayerNorm_general,
  test_LayerNorm_numeric, with a smaller row).
* ONNX: the backend test cases of layernormalization.py and rmsnormalization.py (every axis of a 4-d, 2-d and 3-d
  input, the default axis, epsilon 0.1), plus the optional Mean / InvStdDev outputs, stash_type and a missing bias.
* Keras: layer_normalization_test.py's test_output (epsilon 1e-3, gamma and beta ones), test_correctness (mean 0,
  std 1 over all axes or the last), the empty (1, 0, 10) input. Keras' ``rms_scaling=True`` divides x (not centred)
  by sqrt(variance + epsilon), which is neither layer norm nor RMS norm: it has no counterpart here.

Tolerances come from the dtype and the row length (tests/rownorm_ref.py: units). Each library is skipped cleanly when
it is not installed (and an ONNX Runtime without an operator skips that operator's cases).
"""
import math

import numpy as np
import pytest

import bn_simd
import rownorm_ref as ref

torch = pytest.importorskip("torch")
TF = torch.nn.functional

DTYPES = (np.float32, np.float64)
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


@pytest.fixture(autouse=True, scope="module")
def _torch_on_one_thread():
    """Small tensors: PyTorch's intra-op pool only adds overhead (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _t(a, grad=False):
    return torch.tensor(np.ascontiguousarray(a), requires_grad=grad)


def _np(t):
    return t.detach().numpy()


def _data(shape, normalized_shape, dtype, seed, loc=1.5, scale=2.0):
    """(x, weight, bias, grad_out): x normal(loc, scale), weights of both signs away from 0, biases O(1)."""
    rng = np.random.default_rng(seed)
    ns = ref._shape(normalized_shape)
    x = (rng.standard_normal(shape) * scale + loc).astype(dtype)
    w = (rng.uniform(0.5, 2.0, ns) * rng.choice([-1.0, 1.0], ns)).astype(dtype)
    b = rng.standard_normal(ns).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    return x, w, b, g


def _n(normalized_shape):
    return math.prod(ref._shape(normalized_shape))


# (input shape, normalized_shape): PyTorch's sample inputs and module inputs, transformer rows, odd row lengths
SHAPES = [((1, 2, 3), (1, 2, 3)), ((2, 2, 3), (2, 3)), ((1,), (1,)), ((1, 2), (2,)), ((0, 1), (1,)),
          ((4, 5, 5), (5,)), ((128, 5, 5), 5), ((4, 2, 2, 5), (2, 2, 5)), ((0, 5), [5]), ((2, 3, 768), (768,)),
          ((3, 4097), (4097,)), ((2, 5, 33), torch.Size([5, 33]))]
SHAPE_IDS = [f"{'x'.join(map(str, s))}-{ns}" for s, ns in SHAPES]
AFFINE = ["weight+bias", "weight", "bias", "none"]


def _affine(kind, w, b):
    return (w if "weight" in kind else None), (b if "bias" in kind else None)


# ---- layer norm against torch.nn.functional and autograd -----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("shape,normalized_shape", SHAPES, ids=SHAPE_IDS)
def test_layer_norm_forward_and_backward_match_torch(shape, normalized_shape, affine, dtype):
    x, w, b, g = _data(shape, normalized_shape, dtype, seed=len(shape) + 7 * _n(normalized_shape))
    w, b = _affine(affine, w, b)
    ns = ref._shape(normalized_shape)
    eps = 1e-5
    xt = _t(x, True)
    wt = None if w is None else _t(w, True)
    bt = None if b is None else _t(b, True)
    yt, mt, rt = torch.native_layer_norm(xt, list(ns), wt, bt, eps)
    yt.backward(_t(g))

    y, mean, rstd = bn_simd.layer_norm_forward(x, normalized_shape, w, b, eps=eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert mean.shape == tuple(mt.shape) and rstd.shape == tuple(rt.shape)
    ref.assert_within(y, _np(yt), ref.forward_bound(x, ns, w, b, eps, dtype), "y")
    np.testing.assert_array_equal(bn_simd.layer_norm(x, normalized_shape, w, b, eps), y)
    u = ref.units(dtype, _n(ns))
    _, m64, r64 = ref.layer_norm(x, ns, eps=eps)
    absmean = np.abs(ref.rows(x, ns)).mean(axis=1).reshape(m64.shape) if x.size else 0.0
    ref.assert_within(mean, _np(mt), u * absmean, "mean")
    ref.assert_within(rstd, _np(rt), u * r64 * (1.0 + np.abs(m64) * r64), "rstd")

    gx, gw, gb = bn_simd.layer_norm_backward(g, x, mean, rstd, normalized_shape, w, b)
    bx, bw, bb = ref.backward_bounds(g, x, ns, w, eps, dtype)
    ref.assert_within(gx, _np(xt.grad), bx, "grad_x")
    if w is not None:
        ref.assert_within(gw, _np(wt.grad), bw, "grad_weight")
    if b is not None:
        ref.assert_within(gb, _np(bt.grad), bb, "grad_bias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [None, 1e-3, 0.5])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("shape,normalized_shape", SHAPES, ids=SHAPE_IDS)
def test_rms_norm_forward_and_backward_match_torch(shape, normalized_shape, weighted, eps, dtype):
    x, w, _, g = _data(shape, normalized_shape, dtype, seed=3 + len(shape) + 5 * _n(normalized_shape), loc=0.5)
    w = w if weighted else None
    ns = ref._shape(normalized_shape)
    xt = _t(x, True)
    wt = None if w is None else _t(w, True)
    yt = TF.rms_norm(xt, list(ns), wt, eps)
    yt.backward(_t(g))

    y, rstd = bn_simd.rms_norm_forward(x, normalized_shape, w, eps=eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert rstd.shape == ref.stat_shape(x.shape, ns)
    ref.assert_within(y, _np(yt), ref.forward_bound(x, ns, w, None, eps, dtype, rms=True), "y")
    np.testing.assert_array_equal(bn_simd.rms_norm(x, normalized_shape, w, eps), y)
    _, r64 = ref.rms_norm(x, ns, eps=eps, dtype=dtype)
    ref.assert_within(rstd, r64, ref.units(dtype, _n(ns)) * r64, "rstd")

    gx, gw = bn_simd.rms_norm_backward(g, x, rstd, normalized_shape, w)
    bx, bw, _ = ref.backward_bounds(g, x, ns, w, eps, dtype, rms=True)
    ref.assert_within(gx, _np(xt.grad), bx, "grad_x")
    if w is not None:
        ref.assert_within(gw, _np(wt.grad), bw, "grad_weight")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_eps_none_is_the_dtypes_machine_epsilon_as_torch(dtype):
    # a row of tiny values: the mean square (1e-16) is far below float32's epsilon, so eps decides the result
    x = np.full((2, 8), 1e-8, dtype)
    y = bn_simd.rms_norm(x, 8)
    expected = _np(TF.rms_norm(_t(x), [8]))
    e = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(y, expected, rtol=16 * e)
    np.testing.assert_allclose(y, 1e-8 / np.sqrt(1e-16 + e), rtol=16 * e)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 96, 14, 14), (3, 8, 11)], ids=lambda s: "x".join(map(str, s)))
def test_channels_first_layer_norm_matches_convnexts_permute_layer_norm_permute(shape, dtype):
    # ConvNeXt's LayerNorm2d in PyTorch: permute NCHW to NHWC, layer_norm over C, permute back (autograd through it)
    C = shape[1]
    x, w, b, g = _data(shape, C, dtype, seed=51, loc=1.0)
    xt, wt, bt_ = _t(x, True), _t(w, True), _t(b, True)
    yt = TF.layer_norm(xt.movedim(1, -1), (C,), wt, bt_, 1e-6).movedim(-1, 1)
    yt.backward(_t(g))
    y, mean, rstd = bn_simd.layer_norm_forward(x, C, w, b, eps=1e-6, layout="NCHW")
    xl, gl = np.moveaxis(x, 1, -1), np.moveaxis(g, 1, -1)  # the oracle's (positions, C) rows
    ref.assert_within(np.moveaxis(y, 1, -1), np.moveaxis(_np(yt), 1, -1),
                      ref.forward_bound(xl, C, w, b, 1e-6, dtype), "y")
    gx, gw, gb = bn_simd.layer_norm_backward(g, x, mean, rstd, C, w, b, layout="NCHW")
    bx, bw, bb = ref.backward_bounds(gl, xl, C, w, 1e-6, dtype)
    ref.assert_within(np.moveaxis(gx, 1, -1), np.moveaxis(_np(xt.grad), 1, -1), bx, "grad_x")
    ref.assert_within(gw, _np(wt.grad), bw, "grad_weight")
    ref.assert_within(gb, _np(bt_.grad), bb, "grad_bias")
    layer = bn_simd.LayerNorm(C, eps=1e-6, layout="NCHW", dtype=dtype)
    layer.load_state_dict({"weight": w, "bias": b})
    np.testing.assert_array_equal(layer(x), y)


# ---- modules (common_modules' inputs) ------------------------------------------------------------------------------

MODULE_CASES = [  # (constructor args, constructor kwargs, input shape): module_inputs_torch_nn_LayerNorm / RMSNorm
    (([5], 1e-3), {}, (4, 5, 5)),
    (([5], 1e-3), {}, (128, 5, 5)),
    (([5], 1e-3, False), {}, (4, 5, 5)),
    (([2, 2, 5], 1e-3), {}, (4, 2, 2, 5)),
    (([2, 2, 5], 1e-3, False), {}, (4, 2, 2, 5)),
    (([5], 1e-3), {}, (0, 5)),
    (([2, 2, 5], 1e-3), {"elementwise_affine": True, "bias": False}, (4, 2, 2, 5)),
    ((768,), {}, (2, 7, 768)),
]


def _set_params(module, seed):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, tuple(p.shape))).to(p.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("args,kwargs,shape", MODULE_CASES, ids=lambda v: str(v))
def test_layers_match_torch_modules_and_load_their_state_dicts(kind, args, kwargs, shape, dtype):
    if kind == "RMSNorm" and "bias" in kwargs:
        pytest.skip("torch.nn.RMSNorm has no bias argument")
    theirs = getattr(torch.nn, kind)(*args, **kwargs, dtype=TORCH_DTYPE[dtype])
    _set_params(theirs, seed=len(shape))
    ours = getattr(bn_simd, kind)(*args, **kwargs, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ns = tuple(theirs.normalized_shape)
    x, _, _, g = _data(shape, ns, dtype, seed=11)
    xt = _t(x, True)
    yt = theirs(xt)
    yt.backward(_t(g))
    y = ours(x)
    w = None if theirs.weight is None else _np(theirs.weight)
    b = None if getattr(theirs, "bias", None) is None else _np(theirs.bias)
    rms = kind == "RMSNorm"
    ref.assert_within(y, _np(yt), ref.forward_bound(x, ns, w, b, theirs.eps, dtype, rms=rms), "y")
    gx = ours.backward(g)
    bx, bw, bb = ref.backward_bounds(g, x, ns, w, theirs.eps, dtype, rms=rms)
    ref.assert_within(gx, _np(xt.grad), bx, "grad_x")
    if w is not None:
        ref.assert_within(ours.grad_weight, _np(theirs.weight.grad), bw, "grad_weight")
    if b is not None:
        ref.assert_within(ours.grad_bias, _np(theirs.bias.grad), bb, "grad_bias")
    # and back: PyTorch's module loads ours
    other = getattr(torch.nn, kind)(*args, **kwargs, dtype=TORCH_DTYPE[dtype])
    other.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in ours.state_dict().items()})
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), theirs.state_dict()[k].detach().numpy(), err_msg=k)


# ---- errors (error_inputs_native_layer_norm / rms_norm, _test_LayerNorm_general's bad shapes) ------------------------

BAD = [  # (input shape, normalized_shape, weight shape or None, bias shape or None)
    ((1, 2, 3), (), None, None),
    ((1, 2, 3), (1, 2, 3), (1, 2), None),
    ((1, 2, 3), (1, 2, 3), None, (1, 2)),
    ((2, 2, 3), (2, 2), None, None),
    ((), (), None, None),
    ((3,), (2, 3), None, None),
    ((1, 2, 3), (2,), None, None),
    ((2, 3), (10,), None, None),
    ((2, 3), 10, None, None),
]


@pytest.mark.parametrize("shape,normalized_shape,wshape,bshape", BAD, ids=lambda v: str(v))
def test_shapes_torch_refuses_are_refused_with_value_error(shape, normalized_shape, wshape, bshape):
    x = np.ones(shape, np.float32)
    w = None if wshape is None else np.ones(wshape, np.float32)
    b = None if bshape is None else np.ones(bshape, np.float32)
    with pytest.raises(RuntimeError):  # the peer refuses the same call
        TF.layer_norm(_t(x), list(ref._shape(normalized_shape)), None if w is None else _t(w),
                      None if b is None else _t(b))
    keep = x.copy()
    with pytest.raises(ValueError, match="normalized_shape|weight|bias"):
        bn_simd.layer_norm(x, normalized_shape, w, b)
    with pytest.raises(ValueError, match="normalized_shape|weight|bias"):
        bn_simd.layer_norm_forward(x, normalized_shape, w, b)
    if bshape is None:
        with pytest.raises(ValueError, match="normalized_shape|weight"):
            bn_simd.rms_norm(x, normalized_shape, w)
    np.testing.assert_array_equal(x, keep)


def test_parameters_of_another_dtype_are_refused_with_type_error():
    x = np.ones((2, 4), np.float32)
    with pytest.raises(TypeError, match="weight"):
        bn_simd.layer_norm(x, 4, np.ones(4, np.int64))
    with pytest.raises(TypeError):
        bn_simd.layer_norm(x.astype(np.int32), 4)
    with pytest.raises(TypeError):
        bn_simd.rms_norm(x.astype(np.complex64), 4)


# ---- test_nn.py: _test_LayerNorm_general and test_LayerNorm_numeric -----------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_normalises_to_mean_0_var_1_then_applies_scale_and_bias(dtype):
    rng = np.random.default_rng(5)
    for rank in range(2, 6):
        shape = tuple(int(d) for d in rng.integers(3, 6, rank))
        k = int(rng.integers(1, rank))
        ns, lead = shape[-k:], shape[:-k]
        x = rng.uniform(0, 10, shape).astype(dtype)
        y = bn_simd.layer_norm(x, ns, eps=1e-20).reshape(lead + (-1,)).astype(np.float64)
        e = 64 * float(np.finfo(dtype).eps)
        assert np.abs(y.mean(-1)).mean() <= e and abs(np.abs(y.var(-1)).mean() - 1) <= e
        scale, bias = rng.uniform(0.2, 2, 2)
        w, b = np.full(ns, scale, dtype), np.full(ns, bias, dtype)
        y = bn_simd.layer_norm(x, ns, w, b, eps=1e-20).reshape(lead + (-1,)).astype(np.float64)
        assert abs(y.mean(-1).mean() - bias) <= 4 * e * (1 + bias)
        assert abs(y.var(-1).mean() - scale ** 2) <= 4 * e * (1 + scale ** 2)


def test_layer_norm_numeric_long_rows_match_torch_and_oracle():
    # test_LayerNorm_numeric: uniform [0, 1) rows of 256x256x144, atol 1e-5; here rows of 32x64x48 (98304 values)
    ns = (32, 64, 48)
    rng = np.random.default_rng(6)
    x = rng.random((2,) + ns, dtype=np.float32)
    w = rng.uniform(0.5, 1.5, ns).astype(np.float32)
    b = rng.standard_normal(ns).astype(np.float32)
    y = bn_simd.layer_norm(x, ns, w, b)
    y_ref = ref.layer_norm(x, ns, w, b)[0]
    ref.assert_within(y, y_ref, ref.forward_bound(x, ns, w, b, 1e-5, np.float32), "y vs oracle")
    np.testing.assert_allclose(y, _np(TF.layer_norm(_t(x), list(ns), _t(w), _t(b))), rtol=0, atol=1e-5)


# ---- Keras' layer_normalization_test.py -----------------------------------------------------------------------------

def test_keras_output_case():
    # LayerNormalization(epsilon=1e-3 (Keras' default), gamma ones, beta ones) of [[0, 1, 2, 3, 4]]
    x = np.arange(5, dtype=np.float32)[None, :]
    y = bn_simd.layer_norm(x, 5, np.ones(5, np.float32), np.ones(5, np.float32), 1e-3)
    np.testing.assert_allclose(y, [[-0.41386, 0.29307, 1.0, 1.70693, 2.41386]], atol=1e-5)


@pytest.mark.parametrize("normalized_shape", [(2,), (2, 2, 2)], ids=["axis=-1", "axis=(-3,-2,-1)"])
def test_keras_correctness_case(normalized_shape):
    x = np.random.default_rng(7).normal(5.0, 10.0, (1000, 2, 2, 2)).astype(np.float32)
    y = bn_simd.layer_norm(x, normalized_shape, eps=1e-3)
    assert abs(float(y.mean())) <= 1e-1 and abs(float(y.std()) - 1) <= 1e-1
    ref.assert_within(y, ref.layer_norm(x, normalized_shape, eps=1e-3)[0],
                      ref.forward_bound(x, normalized_shape, eps=1e-3, dtype=np.float32), "y")


def test_keras_empty_input_case():
    x = np.empty((1, 0, 10), np.float32)
    assert bn_simd.layer_norm(x, 10).shape == (1, 0, 10)
    layer = bn_simd.LayerNorm(10)
    assert layer(x).shape == (1, 0, 10)
    gx = layer.backward(np.empty_like(x))
    assert gx.shape == x.shape
    np.testing.assert_array_equal(layer.grad_weight, np.zeros(10, np.float32))
    np.testing.assert_array_equal(layer.grad_bias, np.zeros(10, np.float32))


# ---- gradcheck of bn_simd.torch's functions --------------------------------------------------------------------------

GRADCHECK_CASES = [((3, 4, 5), (5,)), ((2, 3, 4), (3, 4)), ((4, 7), 7)]


@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("shape,normalized_shape", GRADCHECK_CASES, ids=lambda v: str(v))
def test_torch_layer_norm_passes_gradcheck(shape, normalized_shape, affine):
    import bn_simd.torch as bt
    x, w, b, _ = _data(shape, normalized_shape, np.float64, seed=21)
    w, b = _affine(affine, w, b)
    inputs = [_t(x, True)] + [_t(p, True) for p in (w, b) if p is not None]

    def fn(x, *params):
        it = iter(params)
        return bt.layer_norm(x, normalized_shape, next(it) if w is not None else None,
                             next(it) if b is not None else None, 1e-5)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("shape,normalized_shape", GRADCHECK_CASES, ids=lambda v: str(v))
def test_torch_rms_norm_passes_gradcheck(shape, normalized_shape, weighted, eps):
    import bn_simd.torch as bt
    x, w, _, _ = _data(shape, normalized_shape, np.float64, seed=22)
    inputs = [_t(x, True)] + ([_t(w, True)] if weighted else [])

    def fn(x, *params):
        return bt.rms_norm(x, normalized_shape, params[0] if params else None, eps)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,normalized_shape", [((2, 9, 768), (768,)), ((3, 4, 6), (4, 6))],
                         ids=lambda v: str(v))
def test_torch_functions_gradients_match_torch_autograd(shape, normalized_shape, dtype):
    import bn_simd.torch as bt
    x, w, b, g = _data(shape, normalized_shape, dtype, seed=23)
    ns = ref._shape(normalized_shape)
    for rms in (False, True):
        grads = []
        for fn in ((bt.rms_norm, TF.rms_norm) if rms else (bt.layer_norm, TF.layer_norm)):
            xt, wt, bt_ = _t(x, True), _t(w, True), _t(b, True)
            y = fn(xt, list(ns), wt, 1e-5) if rms else fn(xt, list(ns), wt, bt_, 1e-5)
            y.backward(_t(g))
            grads.append((y, xt.grad, wt.grad, bt_.grad))
        (y, gx, gw, gb), (yt, gxt, gwt, gbt) = grads
        ref.assert_within(_np(y), _np(yt), ref.forward_bound(x, ns, w, None if rms else b, 1e-5, dtype, rms=rms),
                          "y")
        bx, bw, bb = ref.backward_bounds(g, x, ns, w, 1e-5, dtype, rms=rms)
        ref.assert_within(_np(gx), _np(gxt), bx, "grad_x")
        ref.assert_within(_np(gw), _np(gwt), bw, "grad_weight")
        if not rms:
            ref.assert_within(_np(gb), _np(gbt), bb, "grad_bias")


# ---- ONNX: LayerNormalization (opset 17) and RMSNormalization (opset 23) in ONNX Runtime ---------------------------

def _onnx_session(op, opset, attrs, inputs, outputs, stash_float=True):
    """An ONNX Runtime session of one node; skips when onnx / onnxruntime are absent or the runtime has no kernel for
    the node (NOT_IMPLEMENTED)."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper
    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}
    t = elem[inputs[0][1].dtype]
    node = helper.make_node(op, [name for name, _ in inputs], [name for name, _ in outputs], **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info(name, elem[a.dtype], a.shape) for name, a in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT if (stat and stash_float) else t, None)
         for name, stat in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (ONNX Runtime raises its own exception classes)
        if "NOT_IMPLEMENTED" in str(e) or "not a registered function/op" in str(e):
            pytest.skip(f"ONNX Runtime {ort.__version__} has no kernel for {op}-{opset} here: {str(e)[:120]}")
        raise
    return session.run(None, {name: a for name, a in inputs})


def _onnx_axis_cases():
    """ONNX's backend cases: every axis (and its negative form) of a 4-d (2,3,4,5) and a 2-d (3,4) input, the
    default axis, and every axis of a 3-d (2,3,5) input with epsilon 0.1."""
    cases = []
    for shape, eps in (((2, 3, 4, 5), None), ((3, 4), None), ((2, 3, 5), 0.1)):
        for axis in range(len(shape)):
            cases += [(shape, axis, eps), (shape, axis - len(shape), eps)]
    return cases + [((2, 3, 4, 5), "default", None)]


@pytest.mark.parametrize("outputs", [("Y",), ("Y", "Mean"), ("Y", "Mean", "InvStdDev")], ids=lambda o: "+".join(o))
@pytest.mark.parametrize("shape,axis,eps", _onnx_axis_cases(), ids=lambda v: str(v))
def test_onnx_layer_normalization_semantics(shape, axis, eps, outputs):
    ax = -1 if axis == "default" else axis
    ns = shape[ax % len(shape):]
    x, w, b, _ = _data(shape, ns, np.float32, seed=31 + (ax % len(shape)))
    attrs = {} if axis == "default" else {"axis": axis}
    if eps is not None:
        attrs["epsilon"] = eps
    got = _onnx_session("LayerNormalization", 17, attrs, [("X", x), ("W", w), ("B", b)],
                        [(o, o != "Y") for o in outputs])
    e = 1e-5 if eps is None else eps
    y, mean, rstd = bn_simd.layer_norm_forward(x, ns, w, b, eps=e)
    ref.assert_within(y, got[0], ref.forward_bound(x, ns, w, b, e, np.float32), "Y")
    u = ref.units(np.float32, _n(ns))
    if len(outputs) > 1:
        assert got[1].shape == mean.shape
        ref.assert_within(mean, got[1], u * (1.0 + np.abs(got[1])), "Mean")
    if len(outputs) > 2:
        assert got[2].shape == rstd.shape
        ref.assert_within(rstd, got[2], u * np.abs(got[2]) * 4, "InvStdDev")


@pytest.mark.parametrize("stash_type", [1, 0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["B", "no-B"])
def test_onnx_layer_normalization_stash_type_and_optional_bias(bias, dtype, stash_type):
    shape, ns = (4, 6, 16), (6, 16)
    x, w, b, _ = _data(shape, ns, dtype, seed=33, loc=3.0)
    inputs = [("X", x), ("W", w)] + ([("B", b)] if bias else [])
    # stash_type 1: computations, Mean and InvStdDev in float32 for either input type; 0: in the input's type
    got = _onnx_session("LayerNormalization", 17, {"axis": -2, "stash_type": stash_type}, inputs,
                        [("Y", False), ("Mean", True), ("InvStdDev", True)], stash_float=stash_type == 1)
    y, mean, rstd = bn_simd.layer_norm_forward(x, ns, w, b if bias else None)
    # float32 units whenever the runtime computes in float32
    ref.assert_within(y, got[0], ref.forward_bound(x, ns, w, b if bias else None, 1e-5,
                                                   np.float32 if stash_type == 1 else dtype), "Y")
    assert got[1].dtype == (np.float32 if stash_type == 1 else dtype) and got[1].shape == mean.shape
    u = ref.units(np.float32, _n(ns))
    ref.assert_within(mean, got[1], u * (1.0 + np.abs(got[1])), "Mean")
    ref.assert_within(rstd, got[2], 4 * u * np.abs(got[2]), "InvStdDev")


@pytest.mark.parametrize("shape,axis,eps", _onnx_axis_cases(), ids=lambda v: str(v))
def test_onnx_rms_normalization_semantics(shape, axis, eps):
    ax = -1 if axis == "default" else axis
    ns = shape[ax % len(shape):]
    x, w, _, _ = _data(shape, ns, np.float32, seed=41 + (ax % len(shape)), loc=0.5)
    attrs = {} if axis == "default" else {"axis": axis}
    if eps is not None:
        attrs["epsilon"] = eps
    got = _onnx_session("RMSNormalization", 23, attrs, [("X", x), ("scale", w)], [("Y", False)])
    e = 1e-5 if eps is None else eps  # ONNX's default epsilon is 1e-5 (PyTorch's None: the machine epsilon)
    y = bn_simd.rms_norm(x, ns, w, e)
    ref.assert_within(y, got[0], ref.forward_bound(x, ns, w, None, e, np.float32, rms=True), "Y")


def test_onnx_rms_normalization_float64_with_stash_type_0():
    shape, ns = (3, 5, 24), (24,)
    x, w, _, _ = _data(shape, ns, np.float64, seed=43)
    got = _onnx_session("RMSNormalization", 23, {"stash_type": 0, "epsilon": 1e-6}, [("X", x), ("scale", w)],
                        [("Y", False)], stash_float=False)
    y = bn_simd.rms_norm(x, ns, w, 1e-6)
    ref.assert_within(y, got[0], ref.forward_bound(x, ns, w, None, 1e-6, np.float64, rms=True), "Y")
