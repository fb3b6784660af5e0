"""Parity with PyTorch's batch norm (functional, modules, autograd, state dicts). Skipped without torch."""
import numpy as np
import pytest

import bn_simd
from conftest import channel_params, make_input, nchw_to, to_nchw

torch = pytest.importorskip("torch")
TF = torch.nn.functional

# PyTorch computes float32 batch norm with float32 accumulators: allow ~100 float32 ulp of O(1) values;
# float64 paths agree to ~1e-12.
TOL = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.fixture(autouse=True, scope="module")
def _torch_on_one_thread():
    """The tensors here are tiny: PyTorch's intra-op thread pool only adds overhead. Restored afterwards
    (PyTorch and bn_simd may share one OpenMP runtime)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _t(a, grad=False):
    return torch.tensor(np.ascontiguousarray(a), requires_grad=grad)


def _close(ours, theirs, tol, scale=1.0, what=""):
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=tol, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("nchw_shape", [(4, 5, 6, 7), (16, 8), (3, 4, 10), (2, 3, 3, 4, 5), (2, 17, 9, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_functional_forward_backward_and_running_stats_match_torch(nchw_shape, layout, dtype):
    C = nchw_shape[1]
    n = int(np.prod(nchw_shape)) // C
    tol = TOL[dtype]
    x = make_input(nchw_shape, "NCHW", dtype, seed=80, loc=1.5, scale=2.0)
    g = make_input(nchw_shape, "NCHW", dtype, seed=81)
    w, b = channel_params(C, dtype, seed=82)

    xt, wt, bt = _t(x, True), _t(w, True), _t(b, True)
    rmt, rvt = torch.zeros(C, dtype=xt.dtype), torch.ones(C, dtype=xt.dtype)
    yt = TF.batch_norm(xt, rmt, rvt, wt, bt, training=True, momentum=0.2, eps=1e-5)
    yt.backward(_t(g))

    xl, gl = nchw_to(x, layout), nchw_to(g, layout)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y = bn_simd.batch_norm(xl, rm, rv, w, b, training=True, momentum=0.2, layout=layout)
    _, mean, invstd = bn_simd.batch_norm_forward(xl, w, b, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(gl, xl, mean, invstd, w, layout=layout)

    _close(to_nchw(y, layout), yt, tol, 4, "y")
    _close(rm, rmt, tol, 4, "running_mean")
    _close(rv, rvt, tol, 4, "running_var")
    _close(to_nchw(gx, layout), xt.grad, 10 * tol, 4, "grad_x")
    _close(gw, wt.grad, 10 * tol, np.sqrt(n), "grad_weight")
    _close(gb, bt.grad, 10 * tol, np.sqrt(n), "grad_bias")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_functional_eval_forward_and_backward_match_torch(layout, dtype):
    nchw_shape, C = (4, 6, 5, 5), 6
    tol = TOL[dtype]
    x = make_input(nchw_shape, "NCHW", dtype, seed=83, loc=-1.0, scale=3.0)
    g = make_input(nchw_shape, "NCHW", dtype, seed=84)
    w, b = channel_params(C, dtype, seed=85)
    rng = np.random.default_rng(86)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 3.0, C).astype(dtype)

    xt, wt, bt = _t(x, True), _t(w, True), _t(b, True)
    yt = TF.batch_norm(xt, _t(rm), _t(rv), wt, bt, training=False, eps=1e-5)
    yt.backward(_t(g))

    xl, gl = nchw_to(x, layout), nchw_to(g, layout)
    y = bn_simd.batch_norm(xl, rm.copy(), rv.copy(), w, b, training=False, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(gl, xl, rm, 1 / np.sqrt(rv.astype(np.float64) + 1e-5), w,
                                             layout=layout, training=False)
    _close(to_nchw(y, layout), yt, tol, 4, "y")
    _close(to_nchw(gx, layout), xt.grad, tol, 4, "grad_x")
    _close(gw, wt.grad, 10 * tol, 10, "grad_weight")
    _close(gb, bt.grad, 10 * tol, 10, "grad_bias")


def _module_pair(kind, C, momentum, layout, dtype, **kw):
    torch_cls = {"1d": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d, "3d": torch.nn.BatchNorm3d}[kind]
    ours_cls = {"1d": bn_simd.BatchNorm1d, "2d": bn_simd.BatchNorm2d, "3d": bn_simd.BatchNorm3d}[kind]
    theirs = torch_cls(C, momentum=momentum, dtype=torch.float64 if dtype == np.float64 else torch.float32, **kw)
    ours = ours_cls(C, momentum=momentum, layout=layout, dtype=dtype, **kw)
    w, b = channel_params(C, dtype, seed=87)
    if theirs.affine:
        with torch.no_grad():
            theirs.weight.copy_(_t(w))
            theirs.bias.copy_(_t(b))
        ours.weight[:] = w
        ours.bias[:] = b
    return ours, theirs


def _forward_backward_both(ours, theirs, x, g, layout):
    """One forward and backward of both modules on the same NCHW data (ours in its layout)."""
    xt = _t(x, True)
    theirs.zero_grad()
    yt = theirs(xt)
    yt.backward(_t(g))
    y = ours(nchw_to(x, layout))
    return y, ours.backward(nchw_to(g, layout)), yt, xt


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("kind,nchw_shape", [("2d", (4, 6, 5, 5)), ("1d", (8, 6)), ("1d", (4, 6, 7)),
                                             ("3d", (2, 6, 3, 3, 4))])
def test_module_matches_torch_over_training_steps_then_eval(kind, nchw_shape, momentum, layout, dtype):
    C = nchw_shape[1]
    tol = TOL[dtype]
    ours, theirs = _module_pair(kind, C, momentum, layout, dtype)
    for step in range(4):
        x = make_input(nchw_shape, "NCHW", dtype, seed=90 + step, loc=step - 1.0, scale=1.0 + step)
        g = make_input(nchw_shape, "NCHW", dtype, seed=95 + step)
        y, gx, yt, xt = _forward_backward_both(ours, theirs, x, g, layout)
        n = x.size // C
        _close(to_nchw(y, layout), yt, tol, 4, f"y step {step}")
        _close(to_nchw(gx, layout), xt.grad, 10 * tol, 4, f"grad_x step {step}")
        _close(ours.grad_weight, theirs.weight.grad, 10 * tol, np.sqrt(n), f"grad_weight step {step}")
        _close(ours.grad_bias, theirs.bias.grad, 10 * tol, np.sqrt(n), f"grad_bias step {step}")
        _close(ours.running_mean, theirs.running_mean, tol, 4, f"running_mean step {step}")
        _close(ours.running_var, theirs.running_var, tol, 16, f"running_var step {step}")
        assert ours.num_batches_tracked == int(theirs.num_batches_tracked)
    ours.eval()
    theirs.eval()
    x = make_input(nchw_shape, "NCHW", dtype, seed=99, loc=0.5)
    g = make_input(nchw_shape, "NCHW", dtype, seed=100)
    y, gx, yt, xt = _forward_backward_both(ours, theirs, x, g, layout)
    _close(to_nchw(y, layout), yt, tol, 4, "eval y")
    _close(to_nchw(gx, layout), xt.grad, tol, 4, "eval grad_x")
    _close(ours.grad_weight, theirs.weight.grad, 10 * tol, np.sqrt(x.size // C), "eval grad_weight")
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked) == 4


@pytest.mark.parametrize("affine", [True, False])
def test_module_without_running_stats_matches_torch_in_eval(affine):
    ours, theirs = _module_pair("2d", 3, 0.1, "NCHW", np.float64, track_running_stats=False, affine=affine)
    ours.eval()
    theirs.eval()
    x = make_input((4, 3, 5, 5), "NCHW", np.float64, seed=101, loc=2.0)
    g = make_input((4, 3, 5, 5), "NCHW", np.float64, seed=102)
    xt = _t(x, True)
    yt = theirs(xt)
    yt.backward(_t(g))
    _close(ours(x), yt, 1e-12, 4, "y")
    _close(ours.backward(g), xt.grad, 1e-12, 4, "grad_x")
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_state_dict_keys_match_torch():
    for kw in ({}, {"affine": False}, {"track_running_stats": False}):
        assert set(bn_simd.BatchNorm2d(3, **kw).state_dict()) == set(torch.nn.BatchNorm2d(3, **kw).state_dict())


def test_load_torch_batchnorm2d_state_dict():
    theirs = torch.nn.BatchNorm2d(3)
    for step in range(3):
        theirs(torch.tensor(make_input((4, 3, 5, 5), "NCHW", np.float32, seed=103 + step, loc=1.0, scale=3.0)))
    with torch.no_grad():
        theirs.weight.mul_(2.0)
        theirs.bias.add_(0.5)
    ours = bn_simd.BatchNorm2d(3)
    ours.load_state_dict(theirs.state_dict())
    assert ours.num_batches_tracked == 3
    for k in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(ours, k), theirs.state_dict()[k].numpy())
        assert getattr(ours, k).dtype == np.float32
    ours.eval()
    theirs.eval()
    x = make_input((2, 3, 4, 4), "NCHW", np.float32, seed=106)
    _close(ours(x), theirs(torch.tensor(x)), 2e-6, 4, "eval y")
    # and back: our state dict loads into torch
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_layer_accepts_torch_tensors():
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=107)
    ours = bn_simd.BatchNorm2d(3)
    np.testing.assert_array_equal(ours(torch.tensor(x)), bn_simd.BatchNorm2d(3)(x))


def test_empty_batch_like_torch():
    ours, theirs = bn_simd.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = np.zeros((0, 3, 4, 4), np.float32)
    xt = _t(x, True)
    yt = theirs(xt)
    yt.sum().backward()
    y = ours(x)
    ours.backward(np.ones_like(y))
    assert y.shape == tuple(yt.shape)
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked) == 1
    np.testing.assert_array_equal(ours.running_mean, theirs.running_mean.numpy())
    np.testing.assert_array_equal(ours.running_var, theirs.running_var.numpy())
    np.testing.assert_array_equal(ours.grad_bias, theirs.bias.grad.numpy())
    np.testing.assert_array_equal(ours.grad_weight, theirs.weight.grad.numpy())


def test_one_value_per_channel_raises_like_torch():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        torch.nn.BatchNorm1d(3)(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn_simd.BatchNorm1d(3)(np.zeros((1, 3), np.float32))


@pytest.mark.parametrize("op", ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"])
def test_bridge_takes_eps_as_a_one_element_tensor_as_pytorch_does(op):
    import bn_simd.torch as bt
    import torch.nn.functional as TF
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    args = {"batch_norm": (None, None, None, None, True), "instance_norm": (), "group_norm": (1,),
            "layer_norm": ((5,),), "rms_norm": ((5,),)}[op]
    eps = torch.tensor(0.25, dtype=torch.float64)
    got = getattr(bt, op)(x, *args, eps=eps)
    torch.testing.assert_close(got, getattr(TF, op)(x, *args, eps=eps), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, getattr(TF, op)(x, *args, eps=0.25), rtol=1e-12, atol=1e-12)


def test_bridge_refuses_running_statistics_that_require_grad_as_pytorch_does():
    import bn_simd.torch as bt
    x = torch.randn(4, 3, 5)
    for training in (True, False):
        rm, rv = torch.zeros(3, requires_grad=True), torch.ones(3)
        with pytest.raises(RuntimeError, match="running_mean"):
            bt.batch_norm(x, rm, rv, training=training)
        assert torch.equal(rm.detach(), torch.zeros(3))
    with torch.no_grad():  # (PyTorch updates them there)
        bt.batch_norm(x, rm, rv, training=True)
    assert not torch.equal(rm.detach(), torch.zeros(3))
    for m in (bt.BatchNorm1d(3), bt.InstanceNorm1d(3, track_running_stats=True)):  # the modules too
        m.running_mean.requires_grad_(True)
        with pytest.raises(RuntimeError, match="running_mean"):
            m(x)
        assert torch.equal(m.running_mean.detach(), torch.zeros(3))
