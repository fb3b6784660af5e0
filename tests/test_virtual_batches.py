"""Ghost batch normalization (virtual batches) against a float64 NumPy oracle of Keras' formula.

Keras (``BatchNormalization(virtual_batch_size=v)``, the Keras 2 layer that has it) reshapes a training batch of N
samples to (v, N / v, ...) and reduces over axis 0 and the non-channel axes: virtual batch g holds the samples
g, g + G, g + 2G, ... (G = N / v), each normalised with its own mean and biased variance; the moving statistics move
towards the mean over the virtual batches of their means and variances; inference does not split the batch.
"""
import numpy as np
import pytest

import bn_simd
from bn_simd import virtual
from conftest import assert_within, channel_params, make_input, tol
from oracle import central_difference

# ---- the oracle: Keras' reshape and reductions, in float64 ------------------------------------------------------


def to_last(a, layout):
    """(N, ..., C) float64 copy."""
    a = np.asarray(a, np.float64)
    return a if layout == "NHWC" else np.moveaxis(a, 1, -1)


def from_last(a, layout):
    return a if layout == "NHWC" else np.moveaxis(a, -1, 1)


def keras_ghost(x, v, weight=None, bias=None, eps=1e-5, layout="NCHW"):
    """(y, mean (G, C), var (G, C)) of Keras' virtual-batch training forward."""
    xl = to_last(x, layout)
    N, C = xl.shape[0], xl.shape[-1]
    G = N // v
    xr = xl.reshape(v, G, -1, C)                      # Keras: reshape to [v, -1] + the other axes
    mean = xr.mean(axis=(0, 2))                       # reduce over axis 0 and the non-channel axes
    var = ((xr - mean[None, :, None]) ** 2).mean(axis=(0, 2))
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    b = np.zeros(C) if bias is None else np.asarray(bias, np.float64)
    y = (xr - mean[None, :, None]) / np.sqrt(var[None, :, None] + eps) * w + b
    return from_last(y.reshape(xl.shape), layout), mean, var


def keras_ghost_loss_grad(x, g, v, weight, eps, layout):
    """(dx, dw, db) of sum(g y) by central differences in float64 (each virtual batch's statistics depend on x)."""
    x = np.asarray(x, np.float64)
    dx = central_difference(lambda a: np.sum(g * keras_ghost(a, v, weight, None, eps, layout)[0]), x)
    _, mean, var = keras_ghost(x, v, None, None, eps, layout)
    xhat = keras_ghost(x, v, None, None, eps, layout)[0]
    axes = tuple(i for i in range(x.ndim) if i != (1 if layout == "NCHW" else x.ndim - 1))
    return dx, np.sum(g * xhat, axis=axes), np.sum(g, axis=axes)


def nchw_shape_in(shape, layout):
    return shape if layout == "NCHW" else (shape[0],) + tuple(shape[2:]) + (shape[1],)


# ---- forward ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nchw_shape,v", [((12, 3), 4), ((8, 5, 7), 2), ((6, 4, 3, 5), 3), ((4, 2, 2, 3, 3), 2),
                                          ((8, 3, 4, 4), 8), ((8, 3, 4, 4), 1), ((32, 3, 4, 5), 8),
                                          ((48, 2, 3, 2, 3), 16)])
def test_forward_matches_keras_grouping(nchw_shape, v, layout, dtype):
    x = make_input(nchw_shape, layout, dtype, seed=1, loc=0.5)
    w, b = channel_params(nchw_shape[1], seed=2)
    y, mean, invstd = bn_simd.virtual_batch_norm_forward(x, w, b, virtual_batch_size=v, layout=layout)
    y_ref, m_ref, v_ref = keras_ghost(x, v, w, b, 1e-5, layout)
    n = v * int(np.prod(nchw_shape[2:]))
    assert y.dtype == x.dtype and y.shape == x.shape
    assert mean.shape == invstd.shape == (nchw_shape[0] // v, nchw_shape[1])
    assert_within(y, y_ref, tol(dtype, n) * (np.abs(w).max() * 4 + 1), "y")
    assert_within(mean, m_ref, tol(dtype, n) * 2, "save_mean")
    assert_within(invstd, 1 / np.sqrt(v_ref + 1e-5), tol(dtype, n) * 2 / np.sqrt(v_ref + 1e-5), "save_invstd")


def test_virtual_batch_g_holds_samples_g_plus_multiples_of_G():
    # 6 samples in virtual batches of 2: G = 3, batch g = samples g and g + 3; each sample a constant offset
    x = np.zeros((6, 1, 4))
    x[:, 0, :] = np.arange(6)[:, None] * 10.0 + np.arange(4)
    _, mean, _ = bn_simd.virtual_batch_norm_forward(x, virtual_batch_size=2)
    np.testing.assert_allclose(mean[:, 0], [(0 + 30) / 2 + 1.5, (10 + 40) / 2 + 1.5, (20 + 50) / 2 + 1.5])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_whole_batch_as_one_virtual_batch_is_batch_norm_bit_for_bit(layout):
    x = make_input((8, 3, 5, 5), layout, np.float32, seed=3)
    w, b = channel_params(3, np.float32, seed=4)
    y, mean, invstd = bn_simd.virtual_batch_norm_forward(x, w, b, virtual_batch_size=8, layout=layout)
    y0, m0, s0 = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(mean[0].astype(np.float32), m0)


@pytest.mark.parametrize("shape,layout,v", [((8, 3, 4, 5), "NCHW", 2), ((8, 3), "NHWC", 2), ((8, 3, 6), "NCHW", 2),
                                            ((32, 3, 4, 5), "NHWC", 16)])
def test_virtual_batches_are_a_view_where_a_reshape_gives_them(shape, layout, v):
    x = make_input(shape, layout, np.float32, seed=5)
    split = virtual.Split(x, layout, v)
    assert len(split.parts) == 1 and np.shares_memory(split.parts[0], x)
    out = np.empty_like(x)
    y, _, _ = bn_simd.virtual_batch_norm_forward(x, virtual_batch_size=v, layout=layout, out=out)
    assert y is out


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("N,v", [(6, 3), (32, 16)])   # channels-last: gathered, by columns
def test_in_place_forward_and_backward(layout, N, v):
    x = make_input((N, 3, 4, 4), layout, np.float64, seed=6)
    g = make_input((N, 3, 4, 4), layout, np.float64, seed=7)
    w, b = channel_params(3, seed=8)
    y_ref, m, s = bn_simd.virtual_batch_norm_forward(x, w, b, virtual_batch_size=v, layout=layout)
    gx_ref, gw_ref, gb_ref = bn_simd.virtual_batch_norm_backward(g, x, m, s, w, virtual_batch_size=v, layout=layout)
    g2 = g.copy()
    gx, gw, gb = bn_simd.virtual_batch_norm_backward(g2, x, m, s, w, virtual_batch_size=v, layout=layout, out=g2)
    assert gx is g2
    np.testing.assert_array_equal(gx, gx_ref)
    x2 = x.copy()
    y, _, _ = bn_simd.virtual_batch_norm_forward(x2, w, b, virtual_batch_size=v, layout=layout, out=x2)
    assert y is x2
    np.testing.assert_array_equal(y, y_ref)


# ---- backward ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("N,v", [(4, 2), (32, 16)])
def test_backward_matches_finite_differences(layout, N, v):
    x = make_input((N, 2, 3), layout, np.float64, seed=9, loc=0.3)
    g = make_input((N, 2, 3), layout, np.float64, seed=10)
    w, _ = channel_params(2, seed=11)
    _, m, s = bn_simd.virtual_batch_norm_forward(x, w, virtual_batch_size=v, layout=layout)
    gx, gw, gb = bn_simd.virtual_batch_norm_backward(g, x, m, s, w, virtual_batch_size=v, layout=layout)
    dx, dw, db = keras_ghost_loss_grad(x, g, v, w, 1e-5, layout)
    assert_within(gx, dx, 1e-7 * (1 + np.abs(dx)), "grad_x")
    assert_within(gw, dw, 1e-10 * (1 + np.abs(dw)), "grad_weight")
    assert_within(gb, db, 1e-12 * (1 + np.abs(db)), "grad_bias")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("v", [4, 16])
def test_float32_backward_matches_the_float64_one(layout, v):
    x = make_input((32, 3, 5, 5), layout, np.float32, seed=12)
    g = make_input((32, 3, 5, 5), layout, np.float32, seed=13)
    w, b = channel_params(3, np.float32, seed=14)
    _, m, s = bn_simd.virtual_batch_norm_forward(x, w, b, virtual_batch_size=v, layout=layout)
    gx, gw, gb = bn_simd.virtual_batch_norm_backward(g, x, m, s, w, virtual_batch_size=v, layout=layout)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    _, m64, s64 = bn_simd.virtual_batch_norm_forward(x64, w, b, virtual_batch_size=v, layout=layout)
    gx64, gw64, gb64 = bn_simd.virtual_batch_norm_backward(g64, x64, m64, s64, w.astype(np.float64),
                                                           virtual_batch_size=v, layout=layout)
    n = v * 25
    assert gx.dtype == np.float32 and gw.dtype == np.float32
    assert_within(gx, gx64, tol(np.float32, n) * 4 * (1 + np.abs(gx64)), "grad_x")
    assert_within(gw, gw64, tol(np.float32, 400) * (np.abs(g64).sum() / 3), "grad_weight")
    assert_within(gb, gb64, tol(np.float32, 400) * (np.abs(g64).sum() / 3), "grad_bias")


# ---- the layer: running statistics, modes, errors ---------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_layer_running_stats_move_towards_the_mean_of_the_virtual_batches(layout, unbiased):
    layer = bn_simd.BatchNorm2d(3, momentum=0.2, layout=layout, dtype=np.float64, virtual_batch_size=2,
                                unbiased_running_var=unbiased)
    rm, rv = np.zeros(3), np.ones(3)
    for step in range(3):
        x = make_input((8, 3, 3, 4), layout, np.float64, seed=20 + step, loc=step)
        y = layer(x)
        y_ref, mean, var = keras_ghost(x, 2, None, None, 1e-5, layout)
        n = 2 * 12
        bv = var.mean(axis=0) * (n / (n - 1) if unbiased else 1.0)
        rm, rv = 0.8 * rm + 0.2 * mean.mean(axis=0), 0.8 * rv + 0.2 * bv
        assert_within(y, y_ref, tol(np.float64, n) * 8, "y")
        assert_within(layer.running_mean, rm, 1e-13, "running_mean")
        assert_within(layer.running_var, rv, 1e-13, "running_var")
    assert layer.num_batches_tracked == 3
    layer.eval()
    x = make_input((3, 3, 3, 4), layout, np.float64, seed=30)   # any batch size in eval: no virtual batches
    y = layer(x)
    xl = to_last(x, layout)
    assert_within(y, from_last((xl - rm) / np.sqrt(rv + 1e-5), layout), 1e-13, "eval y")


def test_layer_momentum_none_is_the_cumulative_average_of_the_virtual_batch_means():
    layer = bn_simd.BatchNorm1d(2, momentum=None, dtype=np.float64, virtual_batch_size=3,
                                unbiased_running_var=False)
    means = []
    for step in range(3):
        x = make_input((6, 2, 5), "NCHW", np.float64, seed=40 + step, loc=step)
        layer(x)
        means.append(keras_ghost(x, 3)[1].mean(axis=0))
    assert_within(layer.running_mean, np.mean(means, axis=0), 1e-14, "running_mean")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_layer_backward_matches_the_functional_one(layout):
    layer = bn_simd.BatchNorm2d(3, layout=layout, virtual_batch_size=4)
    layer.weight[:], layer.bias[:] = channel_params(3, np.float32, seed=50)
    x = make_input((8, 3, 4, 4), layout, np.float32, seed=51)
    g = make_input((8, 3, 4, 4), layout, np.float32, seed=52)
    y = layer(x)
    gx = layer.backward(g)
    y_f, m, s = bn_simd.virtual_batch_norm_forward(x, layer.weight, layer.bias, virtual_batch_size=4, layout=layout)
    gx_f, gw_f, gb_f = bn_simd.virtual_batch_norm_backward(g, x, m, s, layer.weight, virtual_batch_size=4,
                                                           layout=layout)
    np.testing.assert_array_equal(y, y_f)
    np.testing.assert_array_equal(gx, gx_f)
    np.testing.assert_array_equal(layer.grad_weight, gw_f)
    np.testing.assert_array_equal(layer.grad_bias, gb_f)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_functional_form_updates_running_stats_like_the_layer(layout):
    layer = bn_simd.BatchNorm2d(3, layout=layout, virtual_batch_size=2)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    x = make_input((6, 3, 4, 4), layout, np.float32, seed=53)
    y = bn_simd.virtual_batch_norm(x, rm, rv, training=True, virtual_batch_size=2, layout=layout)
    np.testing.assert_array_equal(y, layer(x))
    np.testing.assert_array_equal(rm, layer.running_mean)
    np.testing.assert_array_equal(rv, layer.running_var)
    y_eval = bn_simd.virtual_batch_norm(x[:5], rm, rv, training=False, virtual_batch_size=2, layout=layout)
    np.testing.assert_array_equal(y_eval, bn_simd.batch_norm(x[:5], rm, rv, layout=layout))


@pytest.mark.parametrize("N", [7, 5, 2])
def test_batch_size_not_a_multiple_raises_and_changes_nothing(N):
    layer = bn_simd.BatchNorm1d(3, virtual_batch_size=4)
    x = make_input((N, 3, 2), "NCHW", np.float32, seed=60)
    with pytest.raises(ValueError, match=r"virtual_batch_size \(4\) must divide the batch size"):
        layer(x)
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        bn_simd.virtual_batch_norm(x, rm, rv, training=True, virtual_batch_size=4)
    np.testing.assert_array_equal(rm, 0)


@pytest.mark.parametrize("v,exc", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError),
                                   ("2", TypeError)])
def test_virtual_batch_size_must_be_a_positive_int(v, exc):
    with pytest.raises(exc, match="virtual_batch_size"):
        bn_simd.BatchNorm2d(3, virtual_batch_size=v)
    with pytest.raises(exc, match="virtual_batch_size"):
        bn_simd.virtual_batch_norm_forward(np.ones((4, 3)), virtual_batch_size=v)
    layer = bn_simd.BatchNorm1d(3, virtual_batch_size=2)
    layer.virtual_batch_size = v
    with pytest.raises(exc, match="virtual_batch_size"):
        layer(make_input((4, 3), "NCHW", np.float32, seed=61))
    assert layer.num_batches_tracked == 0


def test_one_value_per_channel_in_a_virtual_batch_raises():
    layer = bn_simd.BatchNorm1d(3, virtual_batch_size=1)
    with pytest.raises(ValueError, match=r"value per channel .* shape \(4, 3\) in virtual batches of 1"):
        layer(make_input((4, 3), "NCHW", np.float32, seed=62))
    with pytest.raises(ValueError, match=r"shape \(4, 3\) in virtual batches of 1"):
        bn_simd.virtual_batch_norm(make_input((4, 3), "NCHW", np.float32, seed=62), None, None, training=True,
                                   virtual_batch_size=1)
    np.testing.assert_array_equal(layer.running_var, 1)
    assert layer.num_batches_tracked == 0


def test_empty_batch_keeps_running_stats_and_counts_as_tracked():
    layer = bn_simd.BatchNorm2d(3, virtual_batch_size=2)
    y = layer(np.zeros((0, 3, 2, 2), np.float32))
    assert y.shape == (0, 3, 2, 2)
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    assert layer.num_batches_tracked == 1   # as PyTorch counts an empty batch


def test_wrong_saved_statistics_shape_is_refused():
    x = make_input((4, 3, 2), "NCHW", np.float32, seed=63)
    _, m, s = bn_simd.virtual_batch_norm_forward(x, virtual_batch_size=2)
    with pytest.raises(ValueError, match=r"save_mean must have shape \(2, 3\)"):
        bn_simd.virtual_batch_norm_backward(np.ones_like(x), x, m[0], s, virtual_batch_size=2)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        bn_simd.virtual_batch_norm_backward(np.ones((4, 3, 3), np.float32), x, m, s, virtual_batch_size=2)


@pytest.mark.parametrize("layout,N,v", [("NCHW", 32, 16), ("NHWC", 6, 3), ("NHWC", 32, 16)])  # view, gather, columns
def test_large_mean_to_std_ratio_keeps_float32_accuracy(layout, N, v):
    # |mean| / std = 1e4: the statistics of each path (shifted sums; columns merged in float64) and the sweep's
    # folded mean residual keep y to float32's resolution
    x = make_input((N, 3, 4, 4), layout, np.float32, seed=70, loc=1e4)
    y, mean, invstd = bn_simd.virtual_batch_norm_forward(x, virtual_batch_size=v, layout=layout)
    y_ref, m_ref, v_ref = keras_ghost(x, v, layout=layout)
    assert_within(y, y_ref, 64 * np.finfo(np.float32).eps * (1 + np.abs(y_ref)), "y")
    assert_within(mean, m_ref, 1e-12 * np.abs(m_ref), "save_mean")
    assert_within(invstd, 1 / np.sqrt(v_ref + 1e-5), 1e-9 / np.sqrt(v_ref + 1e-5), "save_invstd")


def test_backward_takes_bfloat16_statistics_as_the_per_channel_arguments_do():
    """save_mean / save_invstd in bfloat16 (ml_dtypes) are widened exactly, as a bfloat16 weight is; they were refused
    as not floating-point (bfloat16's dtype kind is "V")."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    g = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    _, m, s = bn_simd.virtual_batch_norm_forward(x, virtual_batch_size=2)
    mb, sb = m.astype(ml_dtypes.bfloat16), s.astype(ml_dtypes.bfloat16)
    got = bn_simd.virtual_batch_norm_backward(g, x, mb, sb, virtual_batch_size=2)
    want = bn_simd.virtual_batch_norm_backward(g, x, mb.astype(np.float64), sb.astype(np.float64),
                                               virtual_batch_size=2)
    for a, b in zip(got, want):
        assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("v", [1, 2])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 1), (0, 3, 2, 2)])
def test_an_empty_batch_is_taken_for_every_virtual_batch_size(shape, v):
    """An empty batch has no virtual batch: (0, C) statistics and an empty output, as without virtual batches. With
    virtual_batch_size=1 and one value per sample its view was (1, 0, 1) and was refused as one value per channel."""
    x = np.zeros(shape, np.float32)
    y, m, s = bn_simd.virtual_batch_norm_forward(x, virtual_batch_size=v)
    assert y.shape == shape and m.shape == (0, 3) and s.shape == (0, 3)
    gx, gw, gb = bn_simd.virtual_batch_norm_backward(np.zeros_like(x), x, m, s, np.ones(3, np.float32),
                                                     virtual_batch_size=v)
    assert gx.shape == shape
    np.testing.assert_array_equal(gw, 0)
    np.testing.assert_array_equal(gb, 0)
    assert bn_simd.batch_renorm_forward(x, np.zeros(3), np.ones(3), virtual_batch_size=v)[0].shape == shape


@pytest.mark.parametrize("N,v", [(32, 8), (32, 16)])   # channels-last gathered, by columns
def test_an_infinity_gives_nan_in_its_virtual_batch_under_errstate_raise(N, v):
    """NaN in the virtual batch an infinity is in, on every path, whatever np.errstate says: the columns path's merge
    of the per-position statistics raised FloatingPointError under np.errstate(all="raise")."""
    x = np.ones((N, 2, 2, 3))
    x[0, 0, 0, 0] = np.inf
    with np.errstate(all="raise"):
        y, m, s = bn_simd.virtual_batch_norm_forward(x, virtual_batch_size=v, layout="NHWC")
    G = N // v   # (virtual batch g: samples g, g + G, g + 2 G, ...)
    assert np.isposinf(m[0, 0]) and np.isnan(s[0, 0]) and np.isnan(y[0::G, ..., 0]).all()
    np.testing.assert_array_equal(m[1:], 1.0)   # the other virtual batches and channels: their own statistics
    np.testing.assert_array_equal(m[0, 1:], 1.0)
    np.testing.assert_array_equal(y[0::G, ..., 1:], 0.0)
    for g in range(1, G):
        np.testing.assert_array_equal(y[g::G], 0.0)
