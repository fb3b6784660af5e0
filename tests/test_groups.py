"""Group norm and instance norm: values against a float64 oracle, gradients, numerics, bitwise thread invariance,
layouts, hostile arguments, layers and state."""
import math

import numpy as np
import pytest

import bn_simd
from conftest import (EPS64, HAVE_OPENMP, apply_tol, eps_of, layout_shape, nchw_to, reduction_tol, to_nchw)

LAYOUTS = ("NCHW", "NHWC")
DTYPES = (np.float32, np.float64)
# (N, C, *spatial), G: groups of one channel, of all, in between; rank 2 (GroupNorm only) to 5; maps that are one
# chunk, several pieces of a chunk, shorter than a block
CASES = [((4, 12, 9, 11), 3), ((2, 8, 5), 8), ((3, 6), 2), ((2, 16, 40, 40), 4), ((1, 4, 3, 3, 3), 2),
         ((8, 64, 30, 30), 32), ((2, 6, 100, 100), 1), ((5, 10, 7), 5), ((1, 1, 130), 1), ((3, 32, 4, 4), 16),
         # (N, C) arrays: one element per channel, the flat sweeps, in runs of groups up to 1024 channels and beyond
         ((5, 1037), 17), ((3, 2050), 2), ((2, 300, 3), 300)]


# ---- oracle ----------------------------------------------------------------------------------------------------

def oracle_forward(x, G, w=None, b=None, eps=1e-5):
    """float64 group norm of a (N, C, *spatial) array: (y, mean (N, G), biased var (N, G))."""
    x = np.asarray(x, np.float64)
    N, C = x.shape[:2]
    xg = x.reshape(N, G, -1)
    mean, var = xg.mean(axis=2), xg.var(axis=2)
    xhat = ((xg - mean[..., None]) / np.sqrt(var[..., None] + eps)).reshape(x.shape)
    bshape = (1, C) + (1,) * (x.ndim - 2)
    w = np.ones(C) if w is None else np.asarray(w, np.float64)
    b = np.zeros(C) if b is None else np.asarray(b, np.float64)
    return xhat * w.reshape(bshape) + b.reshape(bshape), mean, var


def oracle_backward(dy, x, G, mean, invstd, w=None):
    """float64 gradients (dx, dw, db) of group norm with the given saved statistics."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    N, C = x.shape[:2]
    bshape = (1, C) + (1,) * (x.ndim - 2)
    w = np.ones(C) if w is None else np.asarray(w, np.float64)
    mean, invstd = np.asarray(mean, np.float64).reshape(N, G), np.asarray(invstd, np.float64).reshape(N, G)
    xhat = ((x.reshape(N, G, -1) - mean[..., None]) * invstd[..., None]).reshape(x.shape)
    axes = (0,) + tuple(range(2, x.ndim))
    db, dw = dy.sum(axis=axes), (dy * xhat).sum(axis=axes)
    g = (dy * w.reshape(bshape)).reshape(N, G, -1)
    xh = xhat.reshape(N, G, -1)
    dx = invstd[..., None] * (g - g.mean(axis=2, keepdims=True) - xh * (g * xh).mean(axis=2, keepdims=True))
    return dx.reshape(x.shape), dw, db


def forward_bound(x, G, y_ref, mean, var, w, b, dtype, eps=1e-5):
    """|y - y_ref| bound: the element-wise step in dtype, plus the float64 statistics' error carried through
    (as conftest.forward_bound for batch norm, with the reduction of one group)."""
    x = np.asarray(x, np.float64)
    N, C = x.shape[:2]
    M = x[0].size // G if N else 1
    bshape = (1, C) + (1,) * (x.ndim - 2)
    wa = np.abs(np.ones(C) if w is None else np.asarray(w, np.float64)).reshape(bshape)
    ba = np.abs(np.zeros(C) if b is None else np.asarray(b, np.float64)).reshape(bshape)
    std = np.sqrt(var + eps)
    xhat = np.abs(((x.reshape(N, G, -1) - mean[..., None]) / std[..., None]).reshape(x.shape))
    cond = (np.abs(x.reshape(N, G, -1)).mean(axis=2) / std)
    cond = np.repeat(cond, C // G, axis=1).reshape((N, C) + (1,) * (x.ndim - 2))
    return apply_tol(dtype) * (wa * (1 + xhat) + ba) + wa * reduction_tol(M) * (cond + xhat)


def params(C, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C), rng.standard_normal(C)


def data(shape, dtype, seed=0, loc=3.0, scale=2.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + loc).astype(dtype)


def assert_within(actual, expected, bound, what):
    err = np.abs(np.asarray(actual, np.float64) - expected)
    bad = ~(err <= bound)
    assert not bad.any(), f"{what}: {int(bad.sum())} of {err.size} out of bound, max err {err.max():.3g}"


# ---- values --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, G", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_forward_matches_the_oracle(shape, G, layout, dtype, affine):
    C = shape[1]
    w, b = params(C) if affine else (None, None)
    x = data(shape, dtype)
    y, mean, invstd = bn_simd.group_norm_forward(nchw_to(x, layout), G, w, b, layout=layout)
    y_ref, m_ref, v_ref = oracle_forward(x, G, w, b)
    assert y.dtype == dtype and y.shape == layout_shape(shape, layout)
    assert mean.shape == (shape[0], G) and invstd.shape == (shape[0], G) and mean.dtype == dtype
    assert_within(to_nchw(y, layout), y_ref, forward_bound(x, G, y_ref, m_ref, v_ref, w, b, dtype), "y")
    M = x[0].size // G
    np.testing.assert_allclose(mean, m_ref, rtol=reduction_tol(M) + eps_of(dtype), atol=eps_of(dtype))
    np.testing.assert_allclose(invstd, 1 / np.sqrt(v_ref + 1e-5), rtol=4 * (reduction_tol(M) + eps_of(dtype)))
    np.testing.assert_array_equal(bn_simd.group_norm(nchw_to(x, layout), G, w, b, layout=layout), y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, G", CASES)
def test_group_norm_backward_matches_the_oracle(shape, G, layout, dtype):
    C, N = shape[1], shape[0]
    w, _ = params(C, 1)
    x, dy = data(shape, dtype, 2), data(shape, dtype, 3, 0.0, 1.0)
    _, m_ref, v_ref = oracle_forward(x, G)
    mean, invstd = m_ref.astype(dtype), (1 / np.sqrt(v_ref + 1e-5)).astype(dtype)
    for weight in (w, None):
        gx, gw, gb = bn_simd.group_norm_backward(nchw_to(dy, layout), nchw_to(x, layout), mean, invstd, G, weight,
                                                 layout=layout)
        dx_ref, dw_ref, db_ref = oracle_backward(dy, x, G, mean, invstd, weight)
        M = x[0].size // G
        e = eps_of(dtype)
        wmax = 1.0 if weight is None else np.abs(weight).max()
        scale = wmax * np.abs(invstd).max() * (np.abs(dy).max() * (1 + 3 * math.sqrt(1)) + 1e-300)
        # dx: a few roundings of terms of size ~ |w s dy| (1 + xhat^2), plus the sums' float64 error
        xh = np.abs(((x.reshape(N, G, -1) - mean[..., None]) * invstd[..., None])).max() if x.size else 0
        bound = 16 * e * scale * (1 + xh * xh) + scale * reduction_tol(M) * (1 + xh)
        assert_within(to_nchw(gx, layout), dx_ref, bound, "grad_x")
        n = N * x[0].size // C
        np.testing.assert_allclose(gb, db_ref, rtol=4 * e, atol=reduction_tol(n) * np.abs(dy).sum() / C + 1e-30)
        np.testing.assert_allclose(gw, dw_ref, rtol=4 * e, atol=4 * e * np.abs(dy).max() * n * (1 + xh))
        assert gw.dtype == (weight.dtype if weight is not None else dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_give_the_same_values(layout):
    x = data((3, 12, 10, 10), np.float64, 4)
    w, b = params(12, 4)
    ref = bn_simd.group_norm(x, 4, w, b)
    y = to_nchw(bn_simd.group_norm(nchw_to(x, layout), 4, w, b, layout=layout), layout)
    np.testing.assert_allclose(y, ref, rtol=0, atol=64 * EPS64)


# ---- determinism ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, G", [((8, 32, 48, 48), 8),     # many groups: a block per group
                                      ((1, 8, 200, 200), 2),    # fewer blocks than threads: chunks, then sweep
                                      ((2, 64, 7, 7), 32),      # several groups per block
                                      ((3, 5, 9000), 5),        # rows cut in pieces
                                      ((40, 1000), 8),          # (N, C): by columns on 1-2 threads, rows on 3
                                      ((48, 720), 3)])          # (N, C): by columns on 1 and 3 threads, rows on 2
def test_bitwise_identical_for_any_thread_count_and_in_place(shape, G, dtype, layout, threads):
    x = nchw_to(data(shape, dtype, 5), layout)
    dy = nchw_to(data(shape, dtype, 6, 0.0, 1.0), layout)
    w, b = params(shape[1], 5)
    ref = None
    for n in (1, 2, 3):
        threads(n)
        y, m, s = bn_simd.group_norm_forward(x, G, w, b, layout=layout)
        gx, gw, gb = bn_simd.group_norm_backward(dy, x, m, s, G, w, layout=layout)
        got = [a.tobytes() for a in (y, m, s, gx, gw, gb)]
        if ref is None:
            ref = got
        assert got == ref, f"{n} threads"
        xi, dyi = x.copy(), dy.copy()
        bn_simd.group_norm(xi, G, w, b, layout=layout, out=xi)
        assert xi.tobytes() == ref[0], f"in place, {n} threads"
        bn_simd.group_norm_backward(dyi, x, m, s, G, w, layout=layout, out=dyi)
        assert dyi.tobytes() == ref[3], f"backward in place, {n} threads"


# ---- numerics ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_offset_of_a_million_standard_deviations_stays_accurate(layout, dtype):
    x = data((4, 8, 30, 30), np.float64, 7, 0.0, 1.0) + 1e6
    x = x.astype(dtype)
    y = to_nchw(bn_simd.group_norm(nchw_to(x, layout), 4, layout=layout), layout)
    y_ref, _, _ = oracle_forward(x.astype(np.float64), 4)
    tol = 1e-3 if dtype == np.float32 else 1e-8
    np.testing.assert_allclose(y, y_ref, atol=tol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_constant_group_gives_exactly_the_bias_and_nan_stays_in_its_group(layout, dtype):
    x = data((2, 6, 5, 5), dtype, 8)
    x[1, 2:4] = 3.25            # group 1 of sample 1 is constant
    x[0, 4, 2, 2] = np.nan      # group 2 of sample 0 has a NaN
    w, b = params(6, 8)
    y = to_nchw(bn_simd.group_norm(nchw_to(x, layout), 3, w, b, layout=layout), layout)
    np.testing.assert_array_equal(y[1, 2:4], np.broadcast_to(b[2:4, None, None].astype(dtype), (2, 5, 5)))
    assert np.isnan(y[0, 4:6]).all()
    finite = np.ones(y.shape, bool)
    finite[0, 4:6] = False
    assert np.isfinite(y[finite]).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_groups_beyond_float32s_reach_take_the_float64_apply(layout):
    x = data((2, 4, 6, 6), np.float32, 9, 0.0, 1e37)
    w = np.array([1e-30, 1.0, 1.0, 1.0])
    y = to_nchw(bn_simd.group_norm(nchw_to(x, layout), 2, w, layout=layout), layout)
    y_ref, _, _ = oracle_forward(x, 2, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-35)


# ---- arguments -----------------------------------------------------------------------------------------------

def test_bad_arguments_raise_clear_errors_and_write_nothing():
    x = data((2, 6, 4, 4), np.float32)
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match=r"num_groups \(4\) must divide the number of channels of x \(6\)"):
        bn_simd.group_norm(x, 4, out=out)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        bn_simd.group_norm(x, 2.0, out=out)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        bn_simd.group_norm(x, True, out=out)
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        bn_simd.group_norm(x, 0, out=out)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        bn_simd.group_norm(x, 2, np.ones(5), out=out)
    with pytest.raises(TypeError, match="x must have dtype float32 or float64"):
        bn_simd.group_norm(x.astype(np.int32), 2)
    with pytest.raises(ValueError, match="2 or 3 or 4 or 5 dimensions"):
        bn_simd.group_norm(x[0, 0, 0], 1)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        bn_simd.group_norm(x, 2, eps=-1.0, out=out)
    buf = np.zeros(x.size + 16, np.float32)
    xv, ov = buf[:x.size].reshape(x.shape), buf[16:].reshape(x.shape)
    xv[...] = x
    with pytest.raises(ValueError, match="out overlaps x partially"):
        bn_simd.group_norm(xv, 2, out=ov)
    np.testing.assert_array_equal(xv, x)
    np.testing.assert_array_equal(out, 7.0)
    y, m, s = bn_simd.group_norm_forward(x, 2)
    with pytest.raises(ValueError, match=r"mean must have shape \(2, 2\)"):
        bn_simd.group_norm_backward(x, x, m[:, :1], s, 2, out=out)
    with pytest.raises(TypeError, match="invstd must be an array"):
        bn_simd.group_norm_backward(x, x, m, None, 2, out=out)
    with pytest.raises(ValueError, match="grad_out must have the shape of x"):
        bn_simd.group_norm_backward(x[:1], x, m, s, 2, out=out)
    np.testing.assert_array_equal(out, 7.0)


def test_empty_batches_and_maps():
    y, m, s = bn_simd.group_norm_forward(np.zeros((0, 4, 3, 3), np.float32), 2)
    assert y.shape == (0, 4, 3, 3) and m.shape == (0, 2)
    y, m, s = bn_simd.group_norm_forward(np.zeros((2, 4, 0), np.float32), 2)
    # statistics of no value: mean 0 and invstd NaN, as PyTorch's native_group_norm
    assert y.shape == (2, 4, 0) and (m == 0).all() and np.isnan(s).all()
    gx, gw, gb = bn_simd.group_norm_backward(np.zeros((2, 4, 0)), np.zeros((2, 4, 0)), m, s, 2)
    np.testing.assert_array_equal(gw, 0.0)
    np.testing.assert_array_equal(gb, 0.0)
    y, m, s = bn_simd.instance_norm_forward(np.zeros((2, 4, 0), np.float32))
    assert (m == 0).all() and np.isnan(s).all()


# ---- instance norm --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_instance_norm_is_group_norm_with_one_channel_per_group(layout, dtype):
    x = nchw_to(data((3, 5, 11, 13), dtype, 10), layout)
    w, b = params(5, 10)
    y, m, s = bn_simd.instance_norm_forward(x, w, b, layout=layout)
    yg, mg, sg = bn_simd.group_norm_forward(x, 5, w, b, layout=layout)
    for a, c in ((y, yg), (m, mg), (s, sg)):
        assert a.tobytes() == c.tobytes()
    assert m.shape == (3, 5)
    dy = nchw_to(data((3, 5, 11, 13), dtype, 11), layout)
    for a, c in zip(bn_simd.instance_norm_backward(dy, x, m, s, w, layout=layout),
                    bn_simd.group_norm_backward(dy, x, m, s, 5, w, layout=layout)):
        assert a.tobytes() == c.tobytes()
    np.testing.assert_array_equal(bn_simd.instance_norm(x, None, None, w, b, layout=layout), y)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_instance_norm_updates_running_statistics_with_the_batch_averages(layout):
    x = data((4, 3, 6, 7), np.float64, 12)
    rm, rv = np.array([0.5, -1.0, 2.0]), np.array([1.0, 2.0, 0.5])
    rm0, rv0 = rm.copy(), rv.copy()
    bn_simd.instance_norm(nchw_to(x, layout), rm, rv, momentum=0.2, layout=layout)
    xs = x.reshape(4, 3, -1)
    S = xs.shape[2]
    np.testing.assert_allclose(rm, 0.8 * rm0 + 0.2 * xs.mean(axis=2).mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(rv, 0.8 * rv0 + 0.2 * (xs.var(axis=2) * S / (S - 1)).mean(axis=0), rtol=1e-14)


def test_instance_norm_with_running_statistics_is_batch_norm_eval():
    x = data((2, 3, 5, 5), np.float32, 13)
    rm, rv = np.array([0.5, -1.0, 2.0]), np.array([1.0, 2.0, 0.5])
    y = bn_simd.instance_norm(x, rm, rv, use_input_stats=False)
    np.testing.assert_array_equal(y, bn_simd.batch_norm(x, rm, rv, training=False))


def test_instance_norm_rejects_one_spatial_element_and_changes_nothing():
    x = data((2, 3, 1), np.float32)
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        bn_simd.instance_norm(x, rm, rv)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)
    with pytest.raises(ValueError, match="3 or 4 or 5 dimensions"):
        bn_simd.instance_norm(data((2, 3), np.float32))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_instance_norm_of_no_spatial_element_is_empty_as_pytorch_and_keeps_the_running_statistics(layout):
    shape = (2, 0, 5, 3) if layout == "NHWC" else (2, 3, 0, 5)
    x = np.zeros(shape, np.float32)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    y = bn_simd.instance_norm(x, rm, rv, layout=layout)
    assert y.shape == shape and np.all(rm == 0.5) and np.all(rv == 2.0)
    y, mean, invstd = bn_simd.instance_norm_forward(x, layout=layout)
    assert y.shape == shape and mean.shape == invstd.shape == (2, 3)
    layer = bn_simd.InstanceNorm2d(3, affine=True, track_running_stats=True, layout=layout)
    assert layer(x).shape == shape and np.all(layer.running_mean == 0) and np.all(layer.running_var == 1)
    gx = layer.backward(np.ones_like(x))
    assert gx.shape == shape and np.all(layer.grad_weight == 0) and np.all(layer.grad_bias == 0)


# ---- layers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_norm_layer_forward_backward_and_state(layout):
    layer = bn_simd.GroupNorm(4, 12, layout=layout)
    w, b = params(12, 14)
    layer.load_state_dict({"weight": w, "bias": b})
    x = nchw_to(data((3, 12, 5, 5), np.float32, 14), layout)
    y = layer(x)
    y2, m, s = bn_simd.group_norm_forward(x, 4, w.astype(np.float32), b.astype(np.float32), layout=layout)
    np.testing.assert_array_equal(y, y2)
    dy = nchw_to(data((3, 12, 5, 5), np.float32, 15), layout)
    gx = layer.backward(dy)
    # the layer keeps its statistics in float64: the functional backward with them gives its bits, with the
    # float32 statistics of group_norm_forward nearly them
    m64, s64 = layer._saved[1:]
    assert m64.dtype == s64.dtype == np.float64 and np.array_equal(m64.astype(np.float32), m)
    gx2, gw2, gb2 = bn_simd.group_norm_backward(dy, x, m64, s64, 4, w.astype(np.float32), layout=layout)
    np.testing.assert_array_equal(gx, gx2)
    np.testing.assert_array_equal(layer.grad_weight, gw2)
    np.testing.assert_array_equal(layer.grad_bias, gb2)
    gx3 = bn_simd.group_norm_backward(dy, x, m, s, 4, w.astype(np.float32), layout=layout)[0]
    np.testing.assert_allclose(gx, gx3, rtol=1e-4, atol=1e-5)
    assert set(layer.state_dict()) == {"weight", "bias"}
    layer.eval()
    np.testing.assert_array_equal(layer(x), y)
    with pytest.raises(ValueError, match="must divide num_channels"):
        bn_simd.GroupNorm(5, 12)
    with pytest.raises(ValueError, match="12 channels"):
        layer(data((3, 10, 5, 5), np.float32))
    with pytest.raises(ValueError, match="missing keys"):
        layer.load_state_dict({"weight": w})
    assert bn_simd.GroupNorm(2, 4, affine=False).state_dict() == {}


@pytest.mark.parametrize("cls, shape", [(bn_simd.InstanceNorm1d, (2, 3, 10)), (bn_simd.InstanceNorm2d, (2, 3, 4, 5)),
                                        (bn_simd.InstanceNorm3d, (2, 3, 2, 3, 4))])
def test_instance_norm_layers_track_running_stats_and_take_unbatched_input(cls, shape):
    layer = cls(3, affine=True, track_running_stats=True)
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    x = data(shape, np.float32, 16)
    y = layer(x)
    np.testing.assert_array_equal(y, bn_simd.instance_norm_forward(x, layer.weight, layer.bias)[0])
    assert not np.array_equal(layer.running_mean, np.zeros(3))
    gx = layer.backward(np.ones_like(y))
    assert gx.shape == x.shape and layer.grad_weight.shape == (3,)
    layer.eval()
    y_eval = layer(x)
    np.testing.assert_array_equal(y_eval, bn_simd.batch_norm(x, layer.running_mean, layer.running_var, layer.weight,
                                                             layer.bias, training=False))
    yu = layer(x[0])
    assert yu.shape == x.shape[1:]
    np.testing.assert_array_equal(yu, y_eval[0])
    plain = cls(3)
    assert plain.state_dict() == {}
    np.testing.assert_array_equal(plain(x[0]), bn_simd.instance_norm(x[:1])[0])
    with pytest.raises(ValueError, match="dimensions|expects"):
        plain(data((3,), np.float32))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("which", ["group", "instance"])
def test_layers_backward_keeps_float32_accuracy_at_a_large_mean_over_std(which, layout):
    """|mean| / std = 1e6 in float32: the layer keeps its statistics in float64 for its backward (a float32 mean,
    rounded by up to 0.03 here, would cost grad_x three to four digits)."""
    shape = (2, 6, 17, 17)
    x = (np.random.default_rng(0).standard_normal(shape) + 1e6).astype(np.float32)
    g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    G = 3 if which == "group" else 6
    x64, g64 = x.astype(np.float64).reshape(2, G, -1), g.astype(np.float64).reshape(2, G, -1)
    sd = 1 / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    xh = (x64 - x64.mean(-1, keepdims=True)) * sd
    ref = (sd * (g64 - g64.mean(-1, keepdims=True) - xh * (g64 * xh).mean(-1, keepdims=True))).reshape(shape)
    layer = bn_simd.GroupNorm(G, 6, layout=layout) if which == "group" else bn_simd.InstanceNorm2d(6, layout=layout)
    layer(nchw_to(x, layout))
    gx = to_nchw(layer.backward(nchw_to(g, layout)), layout)
    # float32 storage of x and grad_x: the input is exact, the output rounds; the sums are double
    assert np.max(np.abs(gx - ref)) <= 64 * eps_of(np.float32) * np.max(np.abs(ref))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_groups_of_one_value_have_a_zero_gradient(layout, dtype):
    """Over a group of one value y is the bias whatever x, so grad_x is exactly 0, even with eps 1e-12 (invstd 1e6),
    where the rounded coefficients of the general formula left invstd |g| eps of noise; NaN where grad_out is."""
    rng = np.random.default_rng(60)
    shape = (6, 8) if layout == "NCHW" else (4, 1, 8)
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    g.flat[3] = np.nan
    w = rng.standard_normal(8)
    y, m, s = bn_simd.group_norm_forward(x, 8, w, None, eps=1e-12, layout=layout)
    gx = bn_simd.group_norm_backward(g, x, m, s, 8, w, layout=layout)[0]
    nan = np.isnan(g)
    assert np.all(np.isnan(gx[nan])) and np.all(gx[~nan] == 0)


def test_a_group_count_beyond_int64_over_zero_channels_is_a_valueerror():
    # (2**31 and more over zero channels: statistics of N num_groups values asked for (a MemoryError, or N num_groups
    # beyond int64 with 2**62), now refused by name)
    for g in (2**63, 2**62, 2**31):
        for N in (2, 4):
            with pytest.raises(ValueError, match=r"num_groups .* be < 2\*\*31"):
                bn_simd.group_norm(np.zeros((N, 0, 3), np.float32), g)
    assert bn_simd.group_norm(np.zeros((2, 0, 3), np.float32), 4).shape == (2, 0, 3)


def test_group_norm_of_no_value_allocates_no_statistics():
    """group_norm returns y alone: over zero channels (any num_groups below 2**31 divides 0) it computes no statistics,
    whose (N, num_groups) would be 32 GiB at 2**31 - 1 groups (a MemoryError); the forward returns them, as PyTorch."""
    import tracemalloc
    x = np.zeros((2, 0, 3), np.float32)
    tracemalloc.start()
    try:
        y = bn_simd.group_norm(x, 2**31 - 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert y.shape == (2, 0, 3) and peak < 1 << 20
    y, mean, invstd = bn_simd.group_norm_forward(x, 1000)
    assert mean.shape == invstd.shape == (2, 1000)


@pytest.mark.parametrize("op", ["group", "instance", "masked"])
@pytest.mark.parametrize("std", [1e105, 1e140, 1e150])
def test_float64_backward_of_data_far_beyond_unit_scale(op, std):
    """The backward's b = -s^3 B / M was formed left to right: s^3 underflows double from a standard deviation of
    about 1e103, and grad_x was 20-60 % off at 1e110. Formed as s^2 (s B / M), it holds until s^2 leaves double's
    range (std ~1e154): grad_x of std-scaled data is that of the unit-scale data (the gradient does not depend on the
    scale but through 1/std; eps 1e-300, below both variances' last bit)."""
    rng = np.random.default_rng(11)
    x1, g = rng.standard_normal((2, 8, 4, 4)), rng.standard_normal((2, 8, 4, 4))
    def grad(x):
        if op == "group":
            _, m, s = bn_simd.group_norm_forward(x, 4, eps=1e-300)
            return bn_simd.group_norm_backward(g, x, m, s, 4)[0]
        if op == "instance":
            _, m, s = bn_simd.instance_norm_forward(x, eps=1e-300)
            return bn_simd.instance_norm_backward(g, x, m, s)[0]
        mask = np.ones((2, 4, 4), bool)
        mask[0, 0] = False
        _, m, s = bn_simd.batch_norm_forward(x, mask=mask, eps=1e-300)
        return bn_simd.batch_norm_backward(g, x, m, s, mask=mask)[0]
    want = grad(x1) / std
    np.testing.assert_allclose(grad(x1 * std), want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
