"""The composable steps batch_stats, normalize, backward_reduce, backward_apply: alone and composed."""
import numpy as np
import pytest

import bn_simd
import oracle as ref
from conftest import (DTYPES, LAYOUTS, assert_ulp_close, assert_within, backward_bounds, channel_params, eps_of,
                      forward_bound, make_input, reduction_tol)

STEP_SHAPES = [(4, 6, 9, 9), (7, 5), (3, 8, 33), (2, 3, 4, 5, 6), (5, 1, 17), (40, 64, 7, 7)]
IDS = ["x".join(map(str, s)) for s in STEP_SHAPES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nchw_shape", STEP_SHAPES, ids=IDS)
def test_batch_stats_match_oracle(nchw_shape, layout, dtype, isa):
    x = make_input(nchw_shape, layout, dtype, seed=30, loc=5.0, scale=2.0)
    mean, var = bn_simd.batch_stats(x, layout=layout)
    assert mean.dtype == var.dtype == np.float64 and mean.shape == var.shape == (nchw_shape[1],)
    m_ref, v_ref, n = ref.stats(x, layout)
    r = reduction_tol(n)
    assert_within(mean, m_ref, r * np.abs(ref.to_cn(x, layout)).mean(axis=1), "mean")
    assert_within(var, v_ref, r * v_ref, "var")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nchw_shape", STEP_SHAPES, ids=IDS)
def test_batch_stats_are_bitwise_the_statistics_of_the_fused_forward(nchw_shape, layout, isa):
    # float64 input: save_mean is the fused forward's float64 mean itself, not a rounded copy
    x = make_input(nchw_shape, layout, np.float64, seed=31, loc=-3.0, scale=0.5)
    mean, var = bn_simd.batch_stats(x, layout=layout)
    _, save_mean, save_invstd = bn_simd.batch_norm_forward(x, layout=layout, eps=1e-3)
    np.testing.assert_array_equal(save_mean, mean)
    np.testing.assert_array_equal(save_invstd, 1.0 / np.sqrt(var + 1e-3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nchw_shape", STEP_SHAPES, ids=IDS)
def test_stats_then_normalize_is_bitwise_the_training_forward(nchw_shape, layout, dtype, isa):
    x = make_input(nchw_shape, layout, dtype, seed=32, loc=1.0)
    w, b = channel_params(nchw_shape[1], dtype, seed=33)
    mean, var = bn_simd.batch_stats(x, layout=layout)
    y = bn_simd.normalize(x, mean, var, w, b, eps=1e-4, layout=layout)
    fused = bn_simd.batch_norm(x, None, None, w, b, training=True, eps=1e-4, layout=layout)
    np.testing.assert_array_equal(y, fused)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nchw_shape", STEP_SHAPES[:4], ids=IDS[:4])
def test_normalize_matches_oracle_with_given_statistics(nchw_shape, layout, dtype, isa):
    C = nchw_shape[1]
    x = make_input(nchw_shape, layout, dtype, seed=34, loc=2.0, scale=3.0)
    rng = np.random.default_rng(35)
    mean, var = rng.standard_normal(C) + 2.0, rng.uniform(0.5, 9.0, C)
    w, b = channel_params(C, dtype, seed=36)
    y = bn_simd.normalize(x, mean, var, w, b, layout=layout)
    assert y.dtype == dtype and y.shape == x.shape
    n = ref.reduction_size(x.shape, layout)
    assert_within(y, ref.normalize(x, mean, var, w, b, layout=layout),
                  forward_bound(x, dtype, n, w, b, layout=layout, mean=mean, var=var, batch_stats=False))
    # normalize with running statistics is what eval-mode batch_norm does
    np.testing.assert_array_equal(y, bn_simd.batch_norm(x, mean.copy(), var.copy(), w, b, layout=layout))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nchw_shape", STEP_SHAPES, ids=IDS)
def test_backward_reduce_matches_oracle(nchw_shape, layout, dtype, isa):
    x = make_input(nchw_shape, layout, dtype, seed=37, loc=1.0, scale=2.0)
    dy = make_input(nchw_shape, layout, dtype, seed=38, loc=0.2)
    mean = ref.stats(x, layout)[0] + 0.125  # any per-channel centre, not only the batch mean
    sdy, sdyx = bn_simd.backward_reduce(dy, x, mean, layout=layout)
    assert sdy.dtype == sdyx.dtype == np.float64
    gc, xc = ref.to_cn(dy, layout), ref.to_cn(x, layout)
    n = xc.shape[1]
    terms = gc * (xc - mean[:, None])
    assert_within(sdy, gc.sum(1), reduction_tol(n) * np.abs(gc).sum(1), "sum dy")
    assert_within(sdyx, terms.sum(1), reduction_tol(n) * np.abs(terms).sum(1), "sum dy (x - mean)")


# Channels-first reductions load the last len % (vector width) elements of a channel's run with a masked
# load. Neighbouring channels differ by up to 40 orders of magnitude here, so a lane of the next channel
# taken into a sum, or a masked-out lane left at 0 - mean, would be far outside the bound. Every run
# length 1..33 (every tail of 4- and 8-lane vectors, runs shorter than a vector), and a run longer than a
# reduction chunk (split into pieces, each with its own tail; channel 2's |mean| / std of 3e8 also checks
# that combining the pieces loses nothing to the rounding of their means).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inner", list(range(1, 34)) + [8192 + 13])
def test_channels_first_reductions_keep_neighbouring_channels_apart(inner, dtype, isa):
    rng = np.random.default_rng(inner)
    loc = np.array([1e20, -2.0, 3e6, -1e20, 0.5])
    scale = np.array([1e18, 1.0, 1e-2, 1e19, 1e-3])
    outer = 3 if inner > 100 else 130  # 130 rows: several reduction chunks of several rows each
    x = (loc[:, None] + scale[:, None] * rng.standard_normal((outer, 5, inner))).astype(dtype)
    dy = (scale[::-1, None] * rng.standard_normal((outer, 5, inner))).astype(dtype)
    mean, var = bn_simd.batch_stats(x, layout="NCHW")
    m_ref, v_ref, n = ref.stats(x, "NCHW")
    r = reduction_tol(n)
    assert_within(mean, m_ref, r * np.abs(ref.to_cn(x, "NCHW")).mean(axis=1), "mean")
    if inner > 1:
        assert_within(var, v_ref, 64 * r * v_ref, "var")
    centre = m_ref + scale  # away from the batch mean, so that sum dy (x - centre) has no cancellation to hide in
    sdy, sdyx = bn_simd.backward_reduce(dy, x, centre, layout="NCHW")
    gc, xc = ref.to_cn(dy, "NCHW"), ref.to_cn(x, "NCHW")
    terms = gc * (xc - centre[:, None])
    assert_within(sdy, gc.sum(1), r * np.abs(gc).sum(1), "sum dy")
    assert_within(sdyx, terms.sum(1), r * np.abs(terms).sum(1), "sum dy (x - centre)")


# A non-finite value right after a channel's masked tail, or as its last element, poisons its own channel
# and no other.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inner", [1, 3, 5, 7, 9, 15, 17, 31, 33])
def test_non_finite_values_at_run_edges_stay_in_their_channel(inner, dtype, isa):
    x = np.random.default_rng(inner).standard_normal((70, 5, inner)).astype(dtype)
    x[:, 2, 0] = np.nan    # first element of channel 2, right after channel 1's last
    x[:, 3, -1] = np.inf   # last element of channel 3, right before channel 4's first
    mean, var = bn_simd.batch_stats(x, layout="NCHW")
    assert np.isnan(mean[2]) and np.isnan(var[2])
    assert not np.isfinite(mean[3]) and not np.isfinite(var[3])  # inf or NaN: inf - inf has no value
    assert np.isfinite(mean[[0, 1, 4]]).all() and np.isfinite(var[[0, 1, 4]]).all()
    sdy, sdyx = bn_simd.backward_reduce(np.ones_like(x), x, np.zeros(5), layout="NCHW")
    assert np.isnan(sdyx[2]) and np.isinf(sdyx[3])
    assert np.isfinite(sdy).all() and np.isfinite(sdyx[[0, 1, 4]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nchw_shape", STEP_SHAPES[:4], ids=IDS[:4])
def test_backward_apply_matches_its_formula(nchw_shape, layout, dtype, isa):
    C = nchw_shape[1]
    x = make_input(nchw_shape, layout, dtype, seed=39, loc=3.0)
    dy = make_input(nchw_shape, layout, dtype, seed=40)
    rng = np.random.default_rng(41)
    mean, a, b, d = rng.standard_normal(C) + 3.0, rng.standard_normal(C), rng.standard_normal(C), rng.standard_normal(C)
    dx = bn_simd.backward_apply(dy, x, mean, a, b, d, layout=layout)
    assert dx.dtype == dtype and dx.shape == x.shape
    xc, gc = ref.to_cn(x, layout), ref.to_cn(dy, layout)
    expected = a[:, None] * gc + b[:, None] * (xc - mean[:, None]) + d[:, None]
    scale = np.abs(a[:, None] * gc) + np.abs(b[:, None] * (xc - mean[:, None])) + np.abs(d)[:, None]
    assert_within(dx, ref.from_cn(expected, x.shape, layout), 4 * eps_of(dtype) * ref.from_cn(scale, x.shape, layout))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nchw_shape", STEP_SHAPES, ids=IDS)
def test_reduce_and_apply_compose_to_the_fused_backward(nchw_shape, layout, dtype, isa):
    C = nchw_shape[1]
    x = make_input(nchw_shape, layout, dtype, seed=42, loc=-1.0, scale=2.0)
    dy = make_input(nchw_shape, layout, dtype, seed=43)
    w = channel_params(C, np.float64, seed=44)[0]
    _, mean, invstd = bn_simd.batch_norm_forward(x, w, layout=layout)
    mean64, s = mean.astype(np.float64), invstd.astype(np.float64)
    n = ref.reduction_size(x.shape, layout)
    sdy, sdyx = bn_simd.backward_reduce(dy, x, mean64, layout=layout)
    gw = sdyx * s
    a = w * s
    gx = bn_simd.backward_apply(dy, x, mean64, a, -a * s * gw / n, -a * sdy / n, layout=layout)
    fused_gx, fused_gw, fused_gb = bn_simd.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
    # the same sums, the same coefficients: the fused call agrees to the last bits
    np.testing.assert_array_equal(gw, fused_gw)
    np.testing.assert_array_equal(sdy, fused_gb)
    dx_bound, _, _ = backward_bounds(dy, x, mean64, s, w, layout, True, dtype)
    assert_ulp_close(gx, fused_gx, dx_bound / (4 * eps_of(dtype)), 2, dtype, "composed grad_x vs fused")
    assert_within(gx, ref.backward(dy, x, mean64, s, w, layout)[0], dx_bound, "composed grad_x vs oracle")


def test_sync_batch_norm_style_composition_over_two_shards():
    # statistics of two shards combined by hand (as an all-reduce would) normalise like one big batch
    x = make_input((8, 5, 6, 6), "NCHW", np.float64, seed=45, loc=2.0)
    parts = [x[:3], x[3:]]
    stats = [bn_simd.batch_stats(p) for p in parts]
    counts = [p.size // 5 for p in parts]
    n = sum(counts)
    mean = sum(c * m for c, (m, _) in zip(counts, stats)) / n
    var = sum(c * (v + (m - mean) ** 2) for c, (m, v) in zip(counts, stats)) / n
    y = np.concatenate([bn_simd.normalize(p, mean, var) for p in parts])
    y_ref, m_ref, v_ref = ref.forward_train(x)
    np.testing.assert_allclose(mean, m_ref, rtol=1e-14)
    np.testing.assert_allclose(var, v_ref, rtol=1e-13)
    np.testing.assert_allclose(y, y_ref, atol=1e-13)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_steps_on_empty_batch(layout):
    x = np.zeros((0, 3) if layout == "NCHW" else (0, 3), np.float32)
    mean, var = bn_simd.batch_stats(x, layout=layout)
    assert np.isnan(mean).all() and np.isnan(var).all()
    assert bn_simd.normalize(x, np.zeros(3), np.ones(3), layout=layout).shape == (0, 3)
    sdy, sdyx = bn_simd.backward_reduce(x, x, np.zeros(3), layout=layout)
    np.testing.assert_array_equal(sdy, 0.0)
    np.testing.assert_array_equal(sdyx, 0.0)
    assert bn_simd.backward_apply(x, x, *(np.ones(3),) * 4, layout=layout).shape == (0, 3)


def test_steps_do_not_modify_their_inputs():
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=46)
    dy = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=47)
    vecs = [np.linspace(0.5, 1.5, 3) for _ in range(4)]
    before = [a.copy() for a in [x, dy] + vecs]
    mean, var = bn_simd.batch_stats(x)
    bn_simd.normalize(x, mean, var, vecs[0], vecs[1])
    bn_simd.backward_reduce(dy, x, mean)
    bn_simd.backward_apply(dy, x, *vecs)
    for a, b in zip([x, dy] + vecs, before):
        np.testing.assert_array_equal(a, b)
