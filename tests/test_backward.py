"""Backward against the oracle and against finite differences."""
import numpy as np
import pytest

import bn_simd
import reference as ref
from conftest import channels, grad_tol, make, tol

CASES = [((4, 5, 6, 7), "NCHW"), ((4, 6, 7, 5), "NHWC"), ((33, 17), "NCHW"), ((3, 9, 16), "NCHW"),
         ((2, 3, 2, 3, 4), "NCHW"), ((2, 17, 1, 1), "NCHW"), ((5, 3, 40), "NCHW"), ((3, 40, 9), "NHWC")]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("with_weight", [True, False])
def test_backward_matches_oracle(shape, layout, dtype, with_weight, isa):
    C = channels(shape, layout)
    n = int(np.prod(shape)) // C
    x = make(shape, dtype, seed=20, loc=1.0, scale=3.0)
    dy = make(shape, dtype, seed=21)
    w = np.random.default_rng(22).uniform(0.5, 2, C).astype(dtype) if with_weight else None
    y, mean, invstd = bn_simd.batch_norm_forward(x, w, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
    gx_ref, gw_ref, gb_ref = ref.backward(dy, x, mean, invstd, w, layout=layout)
    assert gx.dtype == dtype and gw.dtype == dtype and gb.dtype == dtype
    scale = 1 + np.abs(gx_ref).max()
    np.testing.assert_allclose(gx, gx_ref, atol=scale * 4 * tol(dtype, n))
    np.testing.assert_allclose(gw, gw_ref, atol=4 * np.sqrt(n) * grad_tol(dtype, n))
    np.testing.assert_allclose(gb, gb_ref, atol=4 * np.sqrt(n) * grad_tol(dtype, n))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_backward_eval_mode_treats_stats_as_constants(layout):
    shape = (3, 4, 5, 6) if layout == "NCHW" else (3, 5, 6, 4)
    x, dy = make(shape, np.float64, seed=23), make(shape, np.float64, seed=24)
    rm, rv = np.linspace(-1, 1, 4), np.linspace(0.5, 2, 4)
    w = np.array([1.0, 2.0, -1.0, 0.5])
    invstd = 1 / np.sqrt(rv + 1e-5)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x, rm, invstd, w, layout=layout, training=False)
    gx_ref, gw_ref, gb_ref = ref.backward(dy, x, rm, invstd, w, layout=layout, training=False)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(gw, gw_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gb, gb_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,layout", [((3, 2, 3), "NCHW"), ((4, 3), "NCHW"), ((2, 3, 2), "NHWC")])
def test_gradients_match_finite_differences(shape, layout):
    C = channels(shape, layout)
    rng = np.random.default_rng(25)
    x, g = rng.standard_normal(shape), rng.standard_normal(shape)
    w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)

    def loss(x_, w_, b_):
        return float(np.sum(bn_simd.batch_norm(x_, None, None, w_, b_, training=True, layout=layout) * g))

    _, mean, invstd = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(g, x, mean, invstd, w, layout=layout)
    h = 1e-6
    for arr, grad, which in ((x, gx, 0), (w, gw, 1), (b, gb, 2)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            args_p, args_m = [x.copy(), w.copy(), b.copy()], [x.copy(), w.copy(), b.copy()]
            args_p[which][idx] += h
            args_m[which][idx] -= h
            num[idx] = (loss(*args_p) - loss(*args_m)) / (2 * h)
        # central differences: truncation O(h^2), rounding O(eps / h) ~ 1e-10
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7)


def test_backward_out_may_alias_grad_out():
    x, dy = make((4, 5, 6, 6), np.float32, seed=26), make((4, 5, 6, 6), np.float32, seed=27)
    _, m, s = bn_simd.batch_norm_forward(x)
    expected = bn_simd.batch_norm_backward(dy, x, m, s)[0]
    buf = dy.copy()
    gx = bn_simd.batch_norm_backward(buf, x, m, s, out=buf)[0]
    assert gx is buf
    np.testing.assert_array_equal(gx, expected)


def test_backward_empty_batch_gives_zero_param_grads():
    x = np.zeros((0, 3, 4, 4), np.float32)
    gx, gw, gb = bn_simd.batch_norm_backward(x, x, np.zeros(3), np.ones(3), np.ones(3))
    _, m, s = bn_simd.batch_norm_forward(x)
    assert (bn_simd.batch_norm_backward(x, x, m, s)[1] == 0).all()
    assert gx.shape == x.shape
    np.testing.assert_array_equal(gw, 0)
    np.testing.assert_array_equal(gb, 0)
