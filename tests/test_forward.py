"""Forward passes (training and inference) and running statistics against the float64 oracle."""
import numpy as np
import pytest

import bn_simd
import oracle as ref
from conftest import (DTYPES, LAYOUTS, assert_forward_close, assert_within, channel_params, eps_of, forward_bound,
                      layout_shape, make_input, stat_tol)

# logical (N, C, *spatial) shapes, ranks 2 to 5; stored in either layout by make_input
RANK_SHAPES = [(6, 5), (4, 3, 10), (3, 4, 5, 6), (2, 3, 4, 3, 5), (5, 16, 3, 3), (2, 7, 33)]


def _run_training(x, layout, weight, bias, momentum=0.1, dtype_stats=np.float64):
    C = ref.num_channels(x.shape, layout)
    rm = np.linspace(-1.0, 1.0, C).astype(dtype_stats)
    rv = np.linspace(0.5, 2.0, C).astype(dtype_stats)
    rm0, rv0 = rm.copy(), rv.copy()
    y = bn_simd.batch_norm(x, rm, rv, weight, bias, training=True, momentum=momentum, layout=layout)
    return y, (rm0, rv0), (rm, rv)


@pytest.mark.parametrize("affine", ["weight_and_bias", "weight_only", "bias_only", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nchw_shape", RANK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_training_forward_matches_oracle(nchw_shape, layout, dtype, affine, isa):
    x = make_input(nchw_shape, layout, dtype, seed=1, loc=3.0, scale=2.0)
    C = nchw_shape[1]
    w, b = channel_params(C, dtype, seed=2)
    w = w if affine in ("weight_and_bias", "weight_only") else None
    b = b if affine in ("weight_and_bias", "bias_only") else None
    y, (rm0, rv0), (rm, rv) = _run_training(x, layout, w, b, momentum=0.25)
    assert y.shape == x.shape and y.dtype == x.dtype and y.flags.c_contiguous
    assert_forward_close(y, x, w, b, layout=layout)
    _, mean, var = ref.forward_train(x, layout=layout)
    n = ref.reduction_size(x.shape, layout)
    rm_ref, rv_ref = ref.update_running(rm0, rv0, mean, var, n, 0.25)
    assert_within(rm, rm_ref, stat_tol(n, np.float64) * (np.abs(rm_ref) + np.sqrt(var) + 1), "running_mean")
    assert_within(rv, rv_ref, stat_tol(n, np.float64) * np.abs(rv_ref) * 4, "running_var")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nchw_shape", RANK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_inference_forward_uses_running_stats(nchw_shape, layout, dtype, isa):
    x = make_input(nchw_shape, layout, dtype, seed=3, loc=-1.0, scale=3.0)
    C = nchw_shape[1]
    rng = np.random.default_rng(4)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.25, 4.0, C).astype(dtype)
    w, b = channel_params(C, dtype, seed=5)
    rm0, rv0 = rm.copy(), rv.copy()
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=False, layout=layout)
    y_ref = ref.inference(x, rm, rv, w, b, layout=layout)
    n = ref.reduction_size(x.shape, layout)
    assert_within(y, y_ref, forward_bound(x, dtype, n, w, b, layout=layout, mean=rm, var=rv, batch_stats=False))
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inference_with_one_value_per_channel_is_allowed(layout):
    x = make_input((1, 4), layout, np.float32, seed=6)
    rm, rv = np.zeros(4, np.float32), np.full(4, 4.0, np.float32)
    y = bn_simd.batch_norm(x, rm, rv, training=False, layout=layout)
    assert_within(y, x / np.sqrt(4.0 + 1e-5), 4 * eps_of(np.float32) * (1 + np.abs(x)))


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_running_stats_follow_momentum(momentum, dtype):
    x = make_input((8, 3, 4, 4), "NCHW", dtype, seed=7, loc=2.0, scale=1.5)
    rm = np.array([0.5, -1.0, 2.0], dtype)
    rv = np.array([1.0, 0.25, 3.0], dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    bn_simd.batch_norm(x, rm, rv, training=True, momentum=momentum)
    _, mean, var = ref.forward_train(x)
    rm_ref, rv_ref = ref.update_running(rm0, rv0, mean, var, 128, momentum)
    np.testing.assert_allclose(rm, rm_ref, rtol=4 * eps_of(dtype), atol=4 * eps_of(dtype))
    np.testing.assert_allclose(rv, rv_ref, rtol=4 * eps_of(dtype))
    if momentum == 0.0:
        np.testing.assert_array_equal(rm, rm0)
        np.testing.assert_array_equal(rv, rv0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("unbiased", [True, False])
def test_running_var_is_unbiased_by_default_and_biased_on_request(unbiased, layout):
    x = make_input((5, 3, 4), layout, np.float64, seed=8, loc=1.0)
    rm, rv = np.zeros(3), np.ones(3)
    bn_simd.batch_norm(x, rm, rv, training=True, momentum=1.0, layout=layout, unbiased_running_var=unbiased)
    _, mean, var = ref.forward_train(x, layout=layout)
    n = 20
    np.testing.assert_allclose(rm, mean, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(rv, var * n / (n - 1) if unbiased else var, rtol=1e-14)


def test_running_stats_over_several_batches():
    rm, rv = np.zeros(4), np.ones(4)
    tracker = ref.RunningStats(4, momentum=0.3)
    for step in range(5):
        x = make_input((6, 4, 3), "NCHW", np.float64, seed=100 + step, loc=step, scale=1 + step)
        bn_simd.batch_norm(x, rm, rv, training=True, momentum=0.3)
        tracker.update(x)
    np.testing.assert_allclose(rm, tracker.mean, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(rv, tracker.var, rtol=1e-13)


def test_training_without_running_stats_leaves_nothing_to_update():
    x = make_input((4, 3, 5), "NCHW", np.float64, seed=9)
    y = bn_simd.batch_norm(x, None, None, training=True)
    assert_forward_close(y, x)


@pytest.mark.parametrize("pdtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_channel_arrays_may_have_any_float_dtype(pdtype, dtype):
    x = make_input((4, 3, 5, 5), "NCHW", dtype, seed=10, loc=1.0)
    w = np.array([1.5, -0.5, 2.0], pdtype)
    b = np.array([0.25, -1.0, 3.0], pdtype)
    rm, rv = np.array([0.0, 1.0, -1.0], pdtype), np.array([1.0, 2.0, 0.5], pdtype)
    rm0, rv0 = rm.astype(np.float64), rv.astype(np.float64)
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=True, momentum=0.5)
    assert y.dtype == dtype
    assert rm.dtype == pdtype and rv.dtype == pdtype
    assert_forward_close(y, x, w.astype(np.float64), b.astype(np.float64))
    _, mean, var = ref.forward_train(x)
    rm_ref, rv_ref = ref.update_running(rm0, rv0, mean, var, 100, 0.5)
    # stored in the arrays' own dtype: one rounding of pdtype, on top of the statistics' own error (a few
    # float64 ulp per element reduced: 100 of them here)
    tol = eps_of(pdtype) + 100 * eps_of(np.float64)
    np.testing.assert_allclose(rm, rm_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, rv_ref, rtol=tol)
    ye = bn_simd.batch_norm(x, rm, rv, w, b, training=False)
    y_ref = ref.inference(x, rm, rv, w, b)
    assert_within(ye, y_ref, forward_bound(x, dtype, 100, w, b, mean=rm, var=rv, batch_stats=False))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_and_bias_none_mean_one_and_zero(dtype):
    x = make_input((6, 4, 3, 3), "NCHW", dtype, seed=11)
    ones, zeros = np.ones(4, dtype), np.zeros(4, dtype)
    np.testing.assert_array_equal(bn_simd.batch_norm(x, training=True),
                                  bn_simd.batch_norm(x, None, None, ones, zeros, training=True))
    np.testing.assert_array_equal(bn_simd.batch_norm(x, None, None, None, zeros + 2, training=True),
                                  bn_simd.batch_norm(x, None, None, ones, zeros + 2, training=True))
    rm, rv = np.full(4, 0.5), np.full(4, 2.0)
    np.testing.assert_array_equal(bn_simd.batch_norm(x, rm, rv, training=False),
                                  bn_simd.batch_norm(x, rm, rv, ones, zeros, training=False))


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
def test_eps_is_added_to_the_variance(eps):
    x = make_input((4, 3, 6), "NCHW", np.float64, seed=12, scale=0.1)
    y = bn_simd.batch_norm(x, training=True, eps=eps)
    assert_forward_close(y, x, eps=eps)
    y2, _, invstd = bn_simd.batch_norm_forward(x, eps=eps)
    np.testing.assert_array_equal(y, y2)
    _, _, var = ref.forward_train(x)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(var + eps), rtol=1e-14)


def test_layout_aliases_are_accepted():
    x = make_input((4, 3, 5), "NHWC", np.float32, seed=13)
    np.testing.assert_array_equal(bn_simd.batch_norm(x, training=True, layout="channels_last"),
                                  bn_simd.batch_norm(x, training=True, layout="NHWC"))
    x = make_input((4, 3, 5), "NCHW", np.float32, seed=13)
    np.testing.assert_array_equal(bn_simd.batch_norm(x, training=True, layout="channels_first"),
                                  bn_simd.batch_norm(x, training=True))


# ---- sizes around the vector width and the blocking ----------------------------------------------------------

VECTOR_SIZES = [1, 7, 8, 9, 15, 16, 17, 33]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spatial", VECTOR_SIZES)
@pytest.mark.parametrize("C", VECTOR_SIZES)
def test_sizes_around_the_vector_width(C, spatial, layout, dtype, isa):
    x = make_input((3, C, spatial), layout, dtype, seed=C * 100 + spatial, loc=-2.0, scale=1.5)
    w, b = channel_params(C, dtype, seed=14)
    y, mean, invstd = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    assert_forward_close(y, x, w, b, layout=layout)
    _, m_ref, v_ref = ref.forward_train(x, layout=layout)
    np.testing.assert_allclose(mean, m_ref, rtol=2 * eps_of(dtype), atol=eps_of(dtype))
    np.testing.assert_allclose(invstd, ref.invstd(v_ref), rtol=4 * eps_of(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("C", [255, 256, 257, 300, 513])
def test_many_channels_cross_the_channel_blocks(C, layout, isa):
    x = make_input((9, C, 2), layout, np.float32, seed=C, loc=1.0)
    w, b = channel_params(C, np.float32, seed=15)
    rm, rv = np.zeros(C), np.ones(C)
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=True, layout=layout)
    assert_forward_close(y, x, w, b, layout=layout)
    _, mean, var = ref.forward_train(x, layout=layout)
    rm_ref, rv_ref = ref.update_running(np.zeros(C), np.ones(C), mean, var, 18, 0.1)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_of_one_with_spatial_extent(layout, dtype):
    x = make_input((1, 5, 6, 7), layout, dtype, seed=16, loc=4.0)
    rm, rv = np.zeros(5), np.ones(5)
    y = bn_simd.batch_norm(x, rm, rv, training=True, layout=layout)
    assert_forward_close(y, x, layout=layout)
    assert np.all(rv != 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_samples_normalise_to_plus_minus_one(layout, dtype):
    x = make_input((2, 9), layout, dtype, seed=17)
    y = bn_simd.batch_norm(x, training=True, layout=layout, eps=1e-12)
    assert_forward_close(y, x, layout=layout, eps=1e-12)
    np.testing.assert_allclose(np.abs(y), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.sign(y[0]), np.sign(x[0] - x[1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nchw_shape", [(0, 4, 3, 3), (0, 4), (2, 4, 0, 3), (0, 4, 5)])
def test_empty_batch_gives_empty_output_and_keeps_running_stats(nchw_shape, layout, dtype):
    x = np.zeros(layout_shape(nchw_shape, layout), dtype)
    rm, rv = np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32)
    y = bn_simd.batch_norm(x, rm, rv, training=True, layout=layout)
    assert y.shape == x.shape and y.dtype == dtype
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)
    ye = bn_simd.batch_norm(x, rm, rv, training=False, layout=layout)
    assert ye.shape == x.shape
    y2, mean, invstd = bn_simd.batch_norm_forward(x, layout=layout)
    assert y2.shape == x.shape and mean.shape == (4,) and invstd.shape == (4,)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_slab_larger_than_the_fusion_threshold(dtype):
    # 4 x 512 x 512 values per channel: 4 MiB (float32, at the cache-fusion threshold) or
    # 8 MiB (float64, beyond it: statistics sweep then normalise sweep)
    x = make_input((4, 2, 512, 512), "NCHW", dtype, seed=18, loc=10.0, scale=2.0)
    w, b = np.array([2.0, -0.5]), np.array([0.5, 1.0])
    rm, rv = np.zeros(2), np.ones(2)
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=True, momentum=1.0)
    assert_forward_close(y, x, w, b)
    _, mean, var = ref.forward_train(x)
    n = x.size // 2
    np.testing.assert_allclose(rm, mean, rtol=1e-13)
    np.testing.assert_allclose(rv, var * n / (n - 1), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_mean_relative_to_std_keeps_accuracy(layout, dtype):
    # |mean| / std = 1e6: the textbook x * a + (b - mean * a) would cancel away every digit of y
    x = make_input((8, 3, 16, 16), layout, dtype, seed=19, loc=1e4, scale=1e-2)
    y = bn_simd.batch_norm(x, training=True, layout=layout)
    assert_forward_close(y, x, layout=layout)
    rm, rv = ref.stats(x, layout)[:2]
    ye = bn_simd.batch_norm(x, rm.copy(), rv.copy(), training=False, layout=layout)
    n = ref.reduction_size(x.shape, layout)
    assert_within(ye, ref.inference(x, rm, rv, layout=layout),
                  forward_bound(x, dtype, n, layout=layout, mean=rm, var=rv, batch_stats=False))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_constant_channel_normalises_to_bias(layout):
    x = np.full(layout_shape((4, 3, 5, 5), layout), 7.25, np.float32)
    b = np.array([1.0, -2.0, 0.5], np.float32)
    y, mean, invstd = bn_simd.batch_norm_forward(x, np.full(3, 3.0, np.float32), b, layout=layout)
    np.testing.assert_array_equal(mean, 7.25)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(1e-5), rtol=1e-6)
    expected = np.broadcast_to(b.reshape((1, 3, 1, 1)) if layout == "NCHW" else b, y.shape)
    np.testing.assert_array_equal(y, expected)


def test_output_does_not_depend_on_previous_calls():
    x = make_input((4, 6, 7, 7), "NCHW", np.float32, seed=20)
    first = bn_simd.batch_norm(x, training=True)
    bn_simd.batch_norm(make_input((3, 6, 2, 2), "NCHW", np.float32, seed=21, loc=100.0), training=True)
    np.testing.assert_array_equal(bn_simd.batch_norm(x, training=True), first)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float_inputs_as_lists_are_accepted(dtype):
    data = [[1.0, 2.0], [3.0, 5.0], [2.0, 2.0]]
    y = bn_simd.batch_norm(np.array(data, dtype), training=True)
    assert_forward_close(y, np.array(data, dtype))
    np.testing.assert_array_equal(bn_simd.batch_norm(data, training=True),
                                  bn_simd.batch_norm(np.array(data), training=True))
