"""The composable steps: statistics, normalise, backward reduce, backward apply."""
import numpy as np
import pytest

import bn_simd
import reference as ref
from conftest import make, tol


@pytest.mark.parametrize("shape,layout", [((4, 6, 9, 9), "NCHW"), ((4, 9, 9, 6), "NHWC"), ((40, 2048, 7, 7), "NCHW")])
def test_batch_stats_match_oracle_and_fused_forward_bitwise(shape, layout):
    x = make(shape, np.float64, seed=30, loc=5.0)
    mean, var = bn_simd.batch_stats(x, layout=layout)
    m_ref, v_ref, _ = ref.stats(x, layout)
    np.testing.assert_allclose(mean, m_ref, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(var, v_ref, rtol=1e-13)
    _, save_mean, save_invstd = bn_simd.batch_norm_forward(x, layout=layout)
    np.testing.assert_array_equal(save_mean, mean)
    np.testing.assert_array_equal(save_invstd, 1.0 / np.sqrt(var + 1e-5))


def test_stats_then_normalize_equals_training_forward():
    x = make((8, 5, 10, 10), np.float32, seed=31)
    w, b = np.arange(1, 6, dtype=np.float32), np.arange(5, dtype=np.float32)
    mean, var = bn_simd.batch_stats(x)
    y = bn_simd.normalize(x, mean, var, w, b)
    np.testing.assert_array_equal(y, bn_simd.batch_norm(x, None, None, w, b, training=True))


def test_backward_reduce_and_apply_compose_to_backward():
    x, dy = make((6, 4, 7, 7), np.float64, seed=32), make((6, 4, 7, 7), np.float64, seed=33)
    w = np.array([1.0, 0.5, 2.0, -1.0])
    _, mean, invstd = bn_simd.batch_norm_forward(x, w)
    sdy, sdyx = bn_simd.backward_reduce(dy, x, mean)
    n = x.size // 4
    gw = sdyx * invstd
    a = w * invstd
    gx = bn_simd.backward_apply(dy, x, mean, a, -a * invstd * gw / n, -a * sdy / n)
    gx_ref, gw_ref, gb_ref = ref.backward(dy, x, mean, invstd, w)
    np.testing.assert_allclose(sdy, gb_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw, gw_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx, gx_ref, atol=1e-13)


def test_batch_stats_empty_is_nan():
    mean, var = bn_simd.batch_stats(np.zeros((0, 3), np.float32))
    assert np.isnan(mean).all() and np.isnan(var).all()
