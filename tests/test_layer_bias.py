"""BatchNorm layers with bias=False (PyTorch 2.x: an affine weight without a bias)."""
import numpy as np
import pytest

import bn_simd
import oracle as ref
from bounds import assert_within, backward_bounds, forward_bound


def test_bias_false_keeps_a_weight_and_no_bias():
    layer = bn_simd.BatchNorm2d(4, bias=False)
    assert layer.bias is None and layer.weight.shape == (4,)
    assert list(layer.state_dict()) == ["weight", "running_mean", "running_var", "num_batches_tracked"]
    assert "bias=False" in repr(layer)
    x = np.random.default_rng(0).standard_normal((3, 4, 2, 5)).astype(np.float32)
    layer.weight[:] = [1.5, -0.5, 2.0, 1.0]
    y = layer(x)
    mean, var, n = ref.stats(x)
    assert_within(y, ref.forward_train(x, layer.weight, None)[0],
                  forward_bound(x, np.float32, n, layer.weight, None, 1e-5, "NCHW", mean, var), "y")
    g = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    gx = layer.backward(g)
    s = ref.invstd(var)
    rdx, rdw, _ = ref.backward(g, x, mean, s, layer.weight)
    dxb, dwb, _ = backward_bounds(g, x, mean, s, layer.weight, batch_stats=True)
    assert_within(gx, rdx, dxb, "grad_x")
    assert_within(layer.grad_weight, rdw, dwb + 1e-6, "grad_weight")
    assert layer.grad_bias is None
    layer.reset_parameters()
    np.testing.assert_array_equal(layer.weight, 1.0)
    assert layer.bias is None
    # affine=False: neither, whatever bias says
    plain = bn_simd.BatchNorm1d(4, affine=False, bias=False)
    assert plain.weight is None and plain.bias is None and "weight" not in plain.state_dict()


def test_bias_false_state_dict_refuses_a_bias_key():
    layer = bn_simd.BatchNorm1d(3, bias=False)
    state = layer.state_dict()
    with pytest.raises(ValueError, match="unexpected keys \\['bias'\\]"):
        layer.load_state_dict(dict(state, bias=np.zeros(3)))
    layer.load_state_dict(dict(state, weight=np.full(3, 2.0)))
    np.testing.assert_array_equal(layer.weight, 2.0)


def test_bias_false_matches_torch():
    torch = pytest.importorskip("torch")
    tl = torch.nn.BatchNorm2d(4, bias=False, dtype=torch.float64)
    with torch.no_grad():
        tl.weight.copy_(torch.tensor([1.5, -0.5, 2.0, 1.0]))
    ours = bn_simd.BatchNorm2d(4, bias=False, dtype=np.float64)
    ours.load_state_dict(tl.state_dict())
    assert set(tl.state_dict()) == set(ours.state_dict())
    x = np.random.default_rng(2).standard_normal((3, 4, 3, 3)) * 2 + 1
    g = np.random.default_rng(3).standard_normal(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = tl(xt)
    yt.backward(torch.tensor(g))
    y = ours(x)
    gx = ours.backward(g)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ours.grad_weight, tl.weight.grad.numpy(), rtol=1e-11)
    np.testing.assert_allclose(ours.running_var, tl.running_var.numpy(), rtol=1e-12)
    tl.eval()
    ours.eval()
    np.testing.assert_allclose(ours(x), tl(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12)
