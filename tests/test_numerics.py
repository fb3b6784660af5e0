"""Numerically hard inputs: large mean/std ratios, constant channels, non-finite values, huge magnitudes."""
import numpy as np
import pytest

import bn_simd
import oracle as ref
from conftest import reduction_tol

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


@pytest.mark.parametrize("layout,shape", [("NCHW", (4, 3, 100, 100)), ("NHWC", (4, 100, 100, 3))])
def test_float64_variance_keeps_full_precision_at_large_mean_to_std_ratio(layout, shape, isa):
    # |mean| / std up to 1e9, 40000 values per channel: several reduction chunks, whose means must be
    # combined without rounding them to doubles of the mean's magnitude first (that alone would cost
    # eps |mean| / std ~ 1e-7 of the variance)
    rng = np.random.default_rng(11)
    c_axis = 1 if layout == "NCHW" else 3
    loc = np.array([3e6, -1e7, 2.5]).reshape([-1 if a == c_axis else 1 for a in range(4)])
    scale = np.array([1e-2, 1e-2, 1.0]).reshape(loc.shape)
    x = loc + scale * rng.standard_normal(shape)
    mean, var = bn_simd.batch_stats(x, layout=layout)
    m_ref, v_ref, n = ref.stats(x, layout)
    np.testing.assert_allclose(mean, m_ref, rtol=4 * np.finfo(np.float64).eps)
    np.testing.assert_allclose(var, v_ref, rtol=64 * reduction_tol(n))


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


@pytest.mark.parametrize("layout,shape", [("NHWC", (13299, 7)), ("NHWC", (14664, 3)), ("NHWC", (9, 40, 40, 5)),
                                          ("NCHW", (9, 3, 70, 70)), ("NCHW", (3, 2, 20000))])
def test_float64_constant_channels_have_exactly_zero_variance(layout, shape, isa):
    """float64 chunks are shifted by a first pass's mean, which for a constant channel of many values is off the value
    by its own rounding (280 ulp for 4681 values of 3.3): the residual means came out -1e-13 and the variance 4e-43.
    The chunk's first value, within that rounding of the mean, is the shift now: mean the value, variance 0."""
    C = shape[-1] if layout == "NHWC" else shape[1]
    for v in (3.3, 0.1, 1e6 + 0.1, -7.77):
        x = np.full(shape, v)
        mean, var = bn_simd.batch_stats(x, layout=layout)
        assert np.all(mean == v) and np.all(var == 0.0), (v, mean, var)
        y, m, s = bn_simd.batch_norm_forward(x, None, np.full(C, 0.5), eps=1e-300, layout=layout)
        assert np.all(y == 0.5) and np.all(s == 1e150)
        if len(shape) > 2:
            _, gm, gs = bn_simd.group_norm_forward(x, 1 if C % 2 else 2, eps=1e-300, layout=layout)
            assert np.all(gm == v) and np.all(gs == 1e150)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("where", ["channel start", "chunk start", "inside"])
def test_infinities_of_one_sign_give_an_infinite_mean_wherever_they_are(dtype, layout, where, isa):
    """An infinity where a reduction chunk starts (a channel's first value; each sample's row of a 32x32 map) was the
    chunk's shift: x - shift gave Inf - Inf = NaN, a NaN mean where PyTorch's is +Inf. The mean is +-Inf (the sign of
    the infinities), the variance NaN, wherever the infinity is; the other channels are untouched."""
    dt = np.dtype(pytest.importorskip("ml_dtypes").bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    x64 = np.random.default_rng(11).standard_normal((6, 3, 32, 32))
    n, p = {"channel start": (0, 0), "chunk start": (4, 0), "inside": (4, 517)}[where]
    for sign in (1.0, -1.0):
        x = x64.copy()
        x[n, 1].flat[p] = sign * np.inf
        x[n, 1].flat[p + 3] = sign * np.inf
        xa = (x if layout == "NCHW" else x.transpose(0, 2, 3, 1)).astype(dt)
        rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
        mean, var = bn_simd.batch_stats(xa, layout=layout)
        assert mean[1] == sign * np.inf and np.isnan(var[1])
        bn_simd.batch_norm(xa, rm, rv, training=True, layout=layout)
        assert rm[1] == sign * np.float32(0.1 * np.inf) and np.isfinite(rm[[0, 2]]).all()
        _, imean, _ = bn_simd.instance_norm_forward(xa, layout=layout)
        assert imean[n, 1] == sign * np.inf
        assert np.isfinite(np.delete(imean.reshape(6, 3), 3 * n + 1)).all()
        _, gmean, _ = bn_simd.group_norm_forward(xa, 3, layout=layout)
        assert gmean.reshape(6, 3)[n, 1] == sign * np.inf


@pytest.mark.parametrize("layout,shape", LAYOUTS)
def test_huge_values_do_not_overflow_the_variance(layout, shape, isa):
    # values near 1e38: their squares overflow float32, not the float64 accumulators
    x = np.random.default_rng(3).uniform(-1e38, 1e38, shape).astype(np.float32)
    y = bn_simd.batch_norm(x, training=True, layout=layout)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, ref.forward_train(x, layout=layout)[0], atol=32 * np.finfo(np.float32).eps)


@pytest.mark.parametrize("op", ["batch", "group", "instance", "layer", "layer_cf", "rms"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_float64_squares_beyond_double_range_give_an_infinite_variance(op, layout, isa):
    """|x| ~ 1e170: the squared deviations overflow double. The variance is then +Inf (as PyTorch's: invstd 0, y the
    bias), on every path and layout alike; before, Inf - Inf became a variance of 0 on some (y ~ 1e172)."""
    if op.startswith("layer") or op == "rms":
        if layout == "NHWC":
            pytest.skip("one form per op: the trailing dims, or the channels-first layer norm")
        shape = (4, 9, 3) if op == "layer_cf" else (4, 3, 9)
    else:
        shape = (2, 6, 3, 3) if layout == "NCHW" else (2, 3, 3, 6)
    x = np.random.default_rng(7).standard_normal(shape) * 1e170
    b = np.full(9 if op.startswith("layer") or op == "rms" else 6, 0.25)
    if op == "batch":
        mean, var = bn_simd.batch_stats(x, layout=layout)
        assert np.all(var == np.inf)
        y = bn_simd.batch_norm(x, None, None, None, b, training=True, layout=layout)
    elif op == "group":
        y = bn_simd.group_norm(x, 3, None, b, layout=layout)
    elif op == "instance":
        y = bn_simd.instance_norm(x, weight=None, bias=b, layout=layout)
    elif op == "layer":
        y = bn_simd.layer_norm(x, 9, None, b)
    elif op == "layer_cf":
        y = bn_simd.layer_norm(x, 9, None, b, layout="NCHW")
    else:
        y = bn_simd.rms_norm(x, 9) + 0.25
    np.testing.assert_array_equal(y, 0.25)


@pytest.mark.parametrize("op", ["batch", "group", "instance"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("n", [4, 1000, 20000])
def test_float64_channel_whose_sum_leaves_double_range_keeps_its_statistics(op, layout, n, isa):
    """float64 values near 1e306: the first pass's sum leaves double's range. The chunk is then shifted by its first
    value: a constant channel keeps its exact mean and normalises to exactly its bias (it gave NaN from 1000 values
    on); the other channel is unaffected."""
    x = np.ones((1, 2, n)) if layout == "NCHW" else np.ones((1, n, 2))
    big = (slice(None), 0) if layout == "NCHW" else (slice(None), slice(None), 0)
    x[big] = 1e306
    x[(slice(None), 1) if layout == "NCHW" else (slice(None), slice(None), 1)] = np.linspace(-1, 1, n)
    b = np.array([0.5, 0.25])
    if op == "batch":
        y, mean, _ = bn_simd.batch_norm_forward(x, None, b, layout=layout)
        assert mean[0] == 1e306
    elif op == "group":
        y = bn_simd.group_norm(x, 2, None, b, layout=layout)
    else:
        y = bn_simd.instance_norm(x, weight=None, bias=b, layout=layout)
    np.testing.assert_array_equal(y[big], 0.5)
    other = y[(slice(None), 1) if layout == "NCHW" else (slice(None), slice(None), 1)]
    v = np.linspace(-1, 1, n)
    np.testing.assert_allclose(other.ravel(), (v - v.mean()) / np.sqrt(v.var() + 1e-5) + 0.25, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.slow
def test_hundred_million_elements_per_channel_do_not_drift():
    x = np.random.default_rng(4).standard_normal((1, 1, 100_000_000), dtype=np.float32) + np.float32(3.0)
    mean, var = bn_simd.batch_stats(x)
    x64 = x.astype(np.float64)
    m_ref = x64.mean()
    v_ref = ((x64 - m_ref) ** 2).mean()
    np.testing.assert_allclose(mean, m_ref, rtol=1e-12)
    np.testing.assert_allclose(var, v_ref, rtol=1e-10)


# The per-channel coefficients (y = (x - m) a + b) are computed by vectorised loops of the active ISA: their
# edge cases are checked on every ISA, for C = 37 (vector bodies and a scalar remainder) and every combination
# of optional weight and bias.
COEF_C = 37


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_w,with_b", [(True, True), (True, False), (False, True), (False, False)])
def test_eval_coefficients_match_the_oracle_on_every_isa(dtype, with_w, with_b, isa):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, COEF_C, 5)).astype(dtype) * 3 + 1
    rm = rng.standard_normal(COEF_C) * 2
    rv = rng.random(COEF_C) * 4 + 0.1
    w = rng.standard_normal(COEF_C).astype(dtype) if with_w else None
    b = rng.standard_normal(COEF_C).astype(dtype) if with_b else None
    y = bn_simd.batch_norm(x, rm.astype(dtype), rv.astype(dtype), w, b, eps=1e-3)
    y_ref = ref.inference(x, rm.astype(dtype), rv.astype(dtype), w, b, eps=1e-3)
    eps_t = np.finfo(dtype).eps
    np.testing.assert_allclose(y, y_ref, rtol=8 * eps_t, atol=8 * eps_t * np.abs(y_ref).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_saturated_and_out_of_range_scales_on_every_isa(dtype, isa):
    # channel 3: var = 0 with eps = 1e-300 (scale 1e150, beyond float32: saturated, y = bias exactly);
    # channel 11: std 1e37 with weight 1e-3 (float32 scale below its normal range: the float64 apply);
    # channel 20: weight 1e38 with var 1e-4 (scale 1e40, beyond float32: the float64 apply, outputs overflow
    # to inf as the oracle's do); channel 30: NaN variance (NaN outputs, that channel only). Every other
    # channel is ordinary and must match the oracle.
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, COEF_C, 4)).astype(dtype)
    rm, rv = np.zeros(COEF_C), np.ones(COEF_C)
    w, b = np.ones(COEF_C), rng.standard_normal(COEF_C)
    x[:, 3] = 2.5
    rm[3], rv[3] = 2.5, 0.0
    x[:, 11] *= 1e37
    rv[11], w[11] = 1e74, 1e-3
    rv[20], w[20] = 1e-4, 1e38
    rv[30] = np.nan
    w, b = w.astype(dtype), b.astype(dtype)  # the oracle takes the same values
    with np.errstate(over="ignore", invalid="ignore"):
        y = bn_simd.batch_norm(x, rm, rv, w, b, eps=1e-300)
        y_ref = ref.inference(x, rm, rv, w, b, eps=1e-300).astype(dtype)
    np.testing.assert_array_equal(y[:, 3], np.broadcast_to(b[3], (2, 4)))
    assert np.isnan(y[:, 30]).all()
    ok = [c for c in range(COEF_C) if c not in (3, 30)]
    eps_t = np.finfo(dtype).eps
    finite = np.isfinite(y_ref[:, ok])
    assert (np.isfinite(y[:, ok]) == finite).all()
    np.testing.assert_allclose(y[:, ok][finite], y_ref[:, ok][finite], rtol=8 * eps_t)
    np.testing.assert_array_equal(y[:, ok][~finite], y_ref[:, ok][~finite])


@pytest.mark.parametrize("with_w", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_backward_coefficients_match_the_oracle_on_every_isa(with_w, training, isa):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, COEF_C, 6)) * 2 + 0.5
    dy = rng.standard_normal(x.shape)
    mean, var = x.mean((0, 2)), x.var((0, 2))
    inv = 1 / np.sqrt(var + 1e-5)
    w = rng.standard_normal(COEF_C) if with_w else None
    dx, gw, gb = bn_simd.batch_norm_backward(dy, x, mean, inv, w, training=training)
    dx_ref, gw_ref, gb_ref = ref.backward(dy, x, mean, inv, w, training=training)
    tol = 64 * np.finfo(np.float64).eps
    np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol * np.abs(dx_ref).max())
    np.testing.assert_allclose(gw, gw_ref, rtol=tol, atol=tol * np.abs(gw_ref).max())
    np.testing.assert_allclose(gb, gb_ref, rtol=tol, atol=tol * np.abs(gb_ref).max())


@pytest.mark.parametrize("training", [True, False])
def test_float64_infinite_scale_on_a_constant_channel_gives_the_bias(training, isa):
    # var = 0, eps = 1e-300, weight 1e300: w / sqrt(var + eps) = inf in float64, saturated to the largest
    # double; x - mean = 0 exactly, so y = bias exactly (not 0 * inf = NaN, neither in a nor in b)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, COEF_C, 5))
    x[:, 4] = -1.75
    w, b = np.ones(COEF_C), rng.standard_normal(COEF_C)
    w[4] = 1e300
    if training:
        y = bn_simd.batch_norm(x, None, None, w, b, training=True, eps=1e-300)
    else:
        rm, rv = x.mean((0, 2)), x.var((0, 2))
        y = bn_simd.batch_norm(x, rm, rv, w, b, eps=1e-300)
    np.testing.assert_array_equal(y[:, 4], np.full((3, 5), b[4]))
    others = [c for c in range(COEF_C) if c != 4]
    with np.errstate(over="ignore", invalid="ignore"):  # the oracle's own channel 4 is 0 * inf
        y_ref = ref.forward_train(x, w, b, eps=1e-300)[0]
    np.testing.assert_allclose(y[:, others], y_ref[:, others], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["eval", "train", "layer"])
def test_the_callers_flush_to_zero_holds_on_every_thread(op):
    """Flush-to-zero and denormals-are-zero set on the calling thread after the library's threads started
    (torch.set_flush_denormal, as an inference pipeline calls it) hold for every thread's share of a call: the same
    bits at 1 and 2 threads (the second thread's share was not flushed), and not the unflushed bits."""
    torch = pytest.importorskip("torch")
    x = np.full((4, 2, 256, 128), 1e-39, np.float32) * (1 + np.arange(128, dtype=np.float32) % 7)
    x[:, 1] = np.random.default_rng(3).standard_normal(x[:, 1].shape)
    w, b = np.array([1e30, 3.0], np.float32), np.array([0.0, 0.5], np.float32)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)

    def call():
        if op == "layer":
            return bn_simd.layer_norm(x.reshape(-1, 128), 128)
        return bn_simd.batch_norm(x, rm.copy(), rv.copy(), w, b, training=op == "train")

    before = bn_simd.get_num_threads()
    bn_simd.set_num_threads(2)
    try:
        plain = call()  # (the threads started, in the default modes)
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU has no flush-to-zero mode")
        try:
            got = {nt: (bn_simd.set_num_threads(nt), call())[1] for nt in (1, 2)}
        finally:
            torch.set_flush_denormal(False)
    finally:
        bn_simd.set_num_threads(before)
    assert got[1].tobytes() == got[2].tobytes()
    assert got[1].tobytes() != plain.tobytes()
