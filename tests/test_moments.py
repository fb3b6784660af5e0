"""Statistics as mergeable moments (batch_moments, merge_moments) and the coefficient maths on their own
(norm_coefficients, backward_coefficients): the bits of the fused calls, and the split of a batch into pieces."""
import numpy as np
import pytest

import bn_simd
from conftest import LAYOUTS, layout_shape, make_input

SHAPES = [(32, 16, 9, 9), (64, 7, 300, 10), (500, 33), (40, 24, 10, 10), (7, 1, 50), (3, 5, 4, 4, 4)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_merged_moments_are_batch_stats_bits(shape, layout, dtype, threads):
    x = make_input(shape, layout, dtype, seed=1, loc=1e4, scale=3.0)
    ref = bn_simd.batch_stats(x, layout=layout)
    for n in (1, 2, 3):
        threads(n)
        mo = bn_simd.batch_moments(x, layout=layout)
        assert mo.count.sum() == x.size // mo.num_channels
        mean, var = bn_simd.merge_moments(mo)
        assert mean.tobytes() == ref[0].tobytes() and var.tobytes() == ref[1].tobytes(), f"{n} threads"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pieces_split_on_chunk_boundaries_merge_to_the_whole_batchs_bits(layout, dtype):
    """The SyncBatchNorm case: ranks hold consecutive pieces of the batch."""
    shape = (48, 8, 6, 6) if layout == "NCHW" else (40000, 8)
    x = make_input(shape, "NCHW", dtype, seed=2, loc=-50.0, scale=7.0)
    if layout == "NHWC":
        x = np.ascontiguousarray(x)
    whole = bn_simd.batch_moments(x, layout=layout)
    ref = bn_simd.batch_stats(x, layout=layout)
    rows_per_chunk = int(whole.count[0]) // (int(np.prod(shape[2:])) if layout == "NCHW" else 1)
    assert len(whole.count) > 2
    cuts = [0, rows_per_chunk, 3 * rows_per_chunk, shape[0]]
    parts = [bn_simd.batch_moments(x[a:b], layout=layout) for a, b in zip(cuts, cuts[1:])]
    empty = bn_simd.batch_moments(x[:0], layout=layout)  # a rank with no sample
    mean, var = bn_simd.merge_moments(parts[0], empty, *parts[1:])
    assert mean.tobytes() == ref[0].tobytes() and var.tobytes() == ref[1].tobytes()
    # a split off the boundaries still gives the statistics, to rounding
    odd = [bn_simd.batch_moments(x[:5], layout=layout), bn_simd.batch_moments(x[5:], layout=layout)]
    m2, v2 = bn_simd.merge_moments(odd)
    np.testing.assert_allclose(m2, ref[0], rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(v2, ref[1], rtol=1e-11)


def test_merging_no_element_gives_nan_and_bad_parts_are_refused():
    e = bn_simd.batch_moments(np.zeros((0, 3, 4), np.float32))
    mean, var = bn_simd.merge_moments(e)
    assert np.isnan(mean).all() and mean.shape == (3,)
    with pytest.raises(TypeError, match="Moments"):
        bn_simd.merge_moments((np.ones(1), np.ones((1, 3))))
    with pytest.raises(ValueError, match="channels"):
        bn_simd.merge_moments(bn_simd.batch_moments(np.ones((4, 3, 4))), bn_simd.batch_moments(np.ones((4, 2, 4))))
    with pytest.raises(ValueError, match="count"):
        bn_simd.Moments([-1.0], np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="shape"):
        bn_simd.Moments([1.0], np.zeros((2, 2)), np.zeros((1, 2)), np.zeros((1, 2)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_coefficients_on_their_own_give_the_fused_calls_bits(layout, dtype):
    shape = (8, 12, 10, 10)
    x = make_input(shape, layout, dtype, seed=3, loc=2e3)
    dy = make_input(shape, layout, dtype, seed=4)
    rng = np.random.default_rng(5)
    w, b = rng.uniform(0.5, 2, 12), rng.standard_normal(12)
    y, save_mean, save_invstd = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    mean, var = bn_simd.merge_moments(bn_simd.batch_moments(x, layout=layout))
    m, a, bb, exact = bn_simd.norm_coefficients(mean, var, w, b, dtype=dtype)
    assert exact and m.dtype == dtype
    # the normalise step with these coefficients is the fused forward's y
    ch = 1 if layout == "NCHW" else -1
    view = [1] * x.ndim
    view[ch] = 12
    yc = ((x - m.reshape(view)) * a.reshape(view) + bb.reshape(view)).astype(dtype)
    np.testing.assert_allclose(yc, y, rtol=0, atol=4 * np.finfo(dtype).eps * 8)
    np.testing.assert_array_equal(bn_simd.normalize(x, mean, var, w, b, layout=layout), y)
    # backward: sums, coefficients, apply == the one-call backward
    mean64, invstd64 = mean, 1 / np.sqrt(var + 1e-5)
    sdy, sdyx = bn_simd.backward_reduce(dy, x, mean64, layout=layout)
    n = x.size // 12
    md, ad, bd, dd, gw, gb = bn_simd.backward_coefficients(sdy, sdyx, mean64, invstd64, n, w, dtype=dtype)
    gx_ref, gw_ref, gb_ref = bn_simd.batch_norm_backward(dy, x, mean64, invstd64, w, layout=layout)
    np.testing.assert_array_equal(gw.astype(np.float64), gw_ref)
    np.testing.assert_array_equal(gb, gb_ref)
    gx = np.empty_like(x)
    from bn_simd import _core
    dims = (x.shape[0], x.shape[1], x[0, 0].size) if layout == "NCHW" else (x.size // x.shape[-1], x.shape[-1], 1)
    _core.apply_backward(dy.reshape(dims), x.reshape(dims), gx.reshape(dims), md, ad, bd, dd, 0)
    np.testing.assert_array_equal(gx, gx_ref)


def test_float32_coefficients_out_of_range_are_flagged():
    m, a, b, exact = bn_simd.norm_coefficients(np.array([0.0, 1e39]), np.array([1.0, 1.0]), dtype=np.float32)
    assert not exact
    m, a, b, exact = bn_simd.norm_coefficients(np.array([0.0, 1e39]), np.array([1.0, 1.0]), dtype=np.float64)
    assert exact
    with pytest.raises(ValueError, match="var must have shape"):
        bn_simd.norm_coefficients(np.zeros(3), np.ones(2))
    with pytest.raises(ValueError, match="n must be"):
        bn_simd.backward_coefficients(np.zeros(2), np.zeros(2), np.zeros(2), np.ones(2), 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_coefficients_of_nan_channels(dtype):
    """A channel with a NaN among its statistics or parameters: m = NaN, a = 1, b = 0 forward (training backward
    m = NaN, a = 0, b = 1, d = 0; NaN parameter gradients positive), so every output is NaN; the other channels keep
    their formulas. Eval backward: b = d = 0 whatever the mean, a NaN one included."""
    mean, var = np.array([0.5, np.nan, 0.5, 0.5]), np.array([2.0, 1.0, np.nan, 2.0])
    w, b = np.array([1.5, 1.0, 1.0, -np.nan]), np.array([0.25, 0.0, 0.0, 0.0])
    m, a, bb, exact = bn_simd.norm_coefficients(mean, var, w, b, dtype=dtype)
    assert exact and m[0] == dtype(0.5) and a[0] == dtype(1.5 / np.sqrt(2 + 1e-5)) and np.isfinite(bb[0])
    for c in (1, 2, 3):
        assert np.isnan(m[c]) and a[c] == 1 and bb[c] == 0
    x = np.array([1.0, np.nan, -np.nan, 2.0], dtype)
    assert np.isnan((x - m[1]) * a[1] + bb[1]).all()
    sdy, sdyx = np.array([1.0, np.nan, 1.0, 1.0]), np.array([1.0, 1.0, -np.nan, 1.0])
    invstd = np.full(4, 0.5)
    md, ad, bd, dd, gw, gb = bn_simd.backward_coefficients(sdy, sdyx, mean, invstd, 10, w, dtype=dtype)
    for c in (1, 2):
        assert np.isnan(md[c]) and (ad[c], bd[c], dd[c]) == (0, 1, 0)
    assert ad[0] == dtype(0.75) and np.isfinite(bd[0]) and np.isfinite(dd[0])
    nan_bits = np.array([np.nan]).view(np.uint64)[0]
    for g in (gw, gb):
        assert all(g.view(np.uint64)[c] == nan_bits for c in range(4) if np.isnan(g[c]))
    assert np.isnan(gw[2]) and np.isnan(gb[1])
    md, ad, bd, dd, *_ = bn_simd.backward_coefficients(sdy, sdyx, mean, invstd, 10, w, training=False, dtype=dtype)
    assert (bd == 0).all() and (dd == 0).all() and np.isnan(md[1]) and ad[0] == dtype(0.75)


def test_moments_refuse_counts_and_m2_no_batch_can_have():
    shift, res = np.zeros((1, 2)), np.zeros((1, 2))
    for count in ([np.inf], [-1.0], [2.5]):
        with pytest.raises(ValueError, match="count"):
            bn_simd.Moments(count, shift, res, np.ones((1, 2)))
    with pytest.raises(ValueError, match="m2"):
        bn_simd.Moments([4.0], shift, res, np.array([[1.0, -0.5]]))
    bn_simd.Moments([4.0], shift, res, np.array([[1.0, np.nan]]))  # (data holding a NaN)


def test_update_running_stats_refuses_a_running_mean_of_another_rank():
    with pytest.raises(ValueError, match=r"running_mean must have shape \(C,\), got shape \(1, 3\)"):
        bn_simd.update_running_stats(np.zeros((1, 3)), np.ones(3), np.zeros(3), np.ones(3), 4, 0.1)


def test_moments_changed_after_construction_are_checked_again():
    """A Moments holds copies of its arrays, and merge_moments checks the attributes it finds: replaced arrays of
    other sizes (which the merge kernel would read past), or values no batch can have, are refused."""
    m2 = np.ones((4, 2))
    mo = bn_simd.Moments([1.0] * 4, np.zeros((4, 2)), np.zeros((4, 2)), m2)
    m2[0, 0] = -100.0  # (the caller's array: not the Moments')
    np.testing.assert_array_equal(bn_simd.merge_moments(mo)[1], [1.0, 1.0])
    mo.m2 = np.ones((1, 2))
    with pytest.raises(ValueError, match=r"parts\[0\]\.m2 must have shape \(K, C\) = \(4, 2\)"):
        bn_simd.merge_moments(mo)
    big = bn_simd.Moments([1.0], np.zeros((1, 1)), np.zeros((1, 1)), np.ones((1, 1)))
    big.count, big.shift = np.ones(100000), np.zeros((100000, 1))
    with pytest.raises(ValueError, match="residual"):
        bn_simd.merge_moments(big)
    neg = bn_simd.Moments([1.0] * 4, np.zeros((4, 2)), np.zeros((4, 2)), np.ones((4, 2)))
    neg.count[0] = -1
    with pytest.raises(ValueError, match=r"parts\[0\]\.count"):
        bn_simd.merge_moments(neg)
    neg.count[0], neg.m2[1, 1] = 1, -1
    with pytest.raises(ValueError, match=r"parts\[0\]\.m2"):
        bn_simd.merge_moments([mo, neg][1:])
    with pytest.raises(TypeError, match="count"):
        bn_simd.Moments("a", np.zeros((1, 1)), np.zeros((1, 1)), np.ones((1, 1)))
    with pytest.raises(TypeError, match="shift"):
        bn_simd.Moments([1.0], np.zeros((1, 1)) + 1j, np.zeros((1, 1)), np.ones((1, 1)))
