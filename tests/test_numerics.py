"""Numerically hard inputs: large mean/std ratios, constant channels, non-finite values, huge magnitudes."""
import numpy as np
import pytest

import bn_simd
import reference as ref

LAYOUTS = [("NCHW", (8, 4, 33, 33)), ("NHWC", (8, 33, 33, 4))]


@pytest.mark.parametrize("layout,shape", LAYOUTS)
@pytest.mark.parametrize("loc,scale", [(1e4, 1e-2), (1e3, 1e-3), (1e6, 1.0), (-5e5, 0.5)])
def test_large_mean_to_std_ratio_keeps_float32_accuracy(layout, shape, loc, scale, isa):
    # |mean| / std up to 1e6: E[x^2] - E[x]^2 in float32 returns garbage here. The data are the float32
    # values themselves; the oracle normalises them exactly in float64.
    x = (loc + np.random.default_rng(1).standard_normal(shape) * scale).astype(np.float32)
    y, mean, invstd = bn_simd.batch_norm_forward(x, layout=layout, eps=1e-12)
    y_ref, m_ref, v_ref = ref.forward_train(x, layout=layout, eps=1e-12)
    assert np.isfinite(y).all()
    # the error of a normalised value is a few float32 ulp, independent of |mean| / std
    np.testing.assert_allclose(y, y_ref, atol=16 * np.finfo(np.float32).eps * (1 + np.abs(y_ref).max()))
    var = bn_simd.batch_stats(x, layout=layout)[1]
    assert (var >= 0).all()
    np.testing.assert_allclose(var, v_ref, rtol=1e-9)


@pytest.mark.parametrize("layout,shape", LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_channels_give_exactly_bias(layout, shape, dtype, isa):
    x = np.full(shape, 3.3, dtype)
    w, b = np.array([2.0, -1.0, 0.5, 3.0], dtype), np.array([0.5, 0.25, -7.0, 0.0], dtype)
    y = bn_simd.batch_norm(x, None, None, w, b, training=True, layout=layout)
    c_axis = 1 if layout == "NCHW" else 3
    np.testing.assert_array_equal(np.moveaxis(y, c_axis, 0).reshape(4, -1), np.repeat(b[:, None], y.size // 4, 1))


@pytest.mark.parametrize("layout,shape", LAYOUTS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_value_poisons_only_its_channel(layout, shape, bad, isa):
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    idx = [1, 2, 3, 3]
    idx[1 if layout == "NCHW" else 3] = 2
    x[tuple(idx)] = bad
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y = bn_simd.batch_norm(x, rm, rv, training=True, layout=layout)
    per_channel = np.moveaxis(y, 1 if layout == "NCHW" else 3, 0).reshape(4, -1)
    assert np.isnan(per_channel[2]).all()
    assert np.isfinite(per_channel[[0, 1, 3]]).all()
    assert np.isnan(rv[2]) and np.isfinite(rv[[0, 1, 3]]).all() and np.isfinite(rm[[0, 1, 3]]).all()


@pytest.mark.parametrize("layout,shape", LAYOUTS)
def test_huge_values_do_not_overflow_the_variance(layout, shape, isa):
    # values near 1e38: their squares overflow float32, not the float64 accumulators
    x = np.random.default_rng(3).uniform(-1e38, 1e38, shape).astype(np.float32)
    y = bn_simd.batch_norm(x, training=True, layout=layout)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref.forward_train(x, layout=layout)[0], atol=32 * np.finfo(np.float32).eps)


@pytest.mark.slow
def test_hundred_million_elements_per_channel_do_not_drift():
    x = np.random.default_rng(4).standard_normal((1, 1, 100_000_000), dtype=np.float32) + np.float32(3.0)
    mean, var = bn_simd.batch_stats(x)
    x64 = x.astype(np.float64)
    m_ref = x64.mean()
    v_ref = ((x64 - m_ref) ** 2).mean()
    np.testing.assert_allclose(mean, m_ref, rtol=1e-12)
    np.testing.assert_allclose(var, v_ref, rtol=1e-10)
