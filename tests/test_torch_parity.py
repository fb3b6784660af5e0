"""Parity with PyTorch (skipped when torch is not installed)."""
import numpy as np
import pytest

import bn_simd
from conftest import make

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (16, 8), (3, 4, 10), (2, 3, 3, 4, 5)])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_forward_backward_and_running_stats_match_torch(shape, layout, dtype, tol):
    C = shape[1]
    x = make(shape, dtype, seed=80, loc=1.5, scale=2)
    g = make(shape, dtype, seed=81)
    w = np.linspace(0.5, 2, C).astype(dtype)
    b = np.linspace(-1, 1, C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    xt = torch.tensor(x, requires_grad=True)
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    rmt, rvt = torch.zeros(C, dtype=xt.dtype), torch.ones(C, dtype=xt.dtype)
    yt = F.batch_norm(xt, rmt, rvt, wt, bt, training=True, momentum=0.2)
    yt.backward(torch.tensor(g))

    def to_layout(a):
        return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if layout == "NHWC" else a

    def from_layout(a):
        return np.moveaxis(a, -1, 1) if layout == "NHWC" else a

    y, m, s = bn_simd.batch_norm_forward(to_layout(x), w, b, layout=layout)
    bn_simd.batch_norm(to_layout(x), rm, rv, w, b, training=True, momentum=0.2, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(to_layout(g), to_layout(x), m, s, w, layout=layout)
    np.testing.assert_allclose(from_layout(y), yt.detach().numpy(), atol=tol, rtol=tol)
    np.testing.assert_allclose(rm, rmt.numpy(), atol=tol, rtol=tol)
    np.testing.assert_allclose(rv, rvt.numpy(), atol=tol, rtol=tol)
    np.testing.assert_allclose(from_layout(gx), xt.grad.numpy(), atol=tol * 10, rtol=tol * 10)
    n = x.size // C
    np.testing.assert_allclose(gw, wt.grad.numpy(), atol=tol * np.sqrt(n) * 10, rtol=tol * 10)
    np.testing.assert_allclose(gb, bt.grad.numpy(), atol=tol * np.sqrt(n) * 10, rtol=tol * 10)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_matches_torch_module_over_steps(momentum):
    ours = bn_simd.BatchNorm2d(6, momentum=momentum)
    theirs = torch.nn.BatchNorm2d(6, momentum=momentum)
    for step in range(4):
        x = make((4, 6, 5, 5), np.float32, seed=90 + step, loc=step)
        y = ours(x)
        yt = theirs(torch.tensor(x))
        np.testing.assert_allclose(y, yt.detach().numpy(), atol=2e-5)
    theirs.eval()
    ours.eval()
    x = make((4, 6, 5, 5), np.float32, seed=99)
    np.testing.assert_allclose(ours(x), theirs(torch.tensor(x)).detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), rtol=1e-5)
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked)


def test_load_torch_state_dict():
    theirs = torch.nn.BatchNorm2d(3)
    theirs(torch.randn(4, 3, 5, 5) * 3 + 1)
    with torch.no_grad():
        theirs.weight.mul_(2)
    ours = bn_simd.BatchNorm2d(3)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    theirs.eval()
    x = make((2, 3, 4, 4), np.float32, seed=100)
    np.testing.assert_allclose(ours(x), theirs(torch.tensor(x)).detach().numpy(), atol=1e-5)
    assert ours.num_batches_tracked == 1


def test_empty_batch_like_torch():
    ours, theirs = bn_simd.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = np.zeros((0, 3, 4, 4), np.float32)
    ours(x)
    theirs(torch.tensor(x))
    assert ours.num_batches_tracked == int(theirs.num_batches_tracked)
    np.testing.assert_array_equal(ours.running_mean, theirs.running_mean.numpy())
