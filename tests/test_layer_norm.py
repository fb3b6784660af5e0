"""Layer norm and RMS norm (bn_simd.layer_norm*, rms_norm*, LayerNorm, RMSNorm) against the float64 oracle of
rownorm_oracle.py: forward and backward in both dtypes, over trailing dims and channels-first, sizes around the vector
lengths, empty and many leading dims; numerics (large |mean| / std, constant rows, NaN confined to its row), bitwise
thread invariance, every ISA, argument errors; the layers. Peers' cases translated: ONNX's LayerNormalization and
RMSNormalization (an ``axis`` normalising X.shape[axis:], epsilon), Keras' correctness check (loc 5, scale 10),
PyTorch's empty batches."""
import numpy as np
import pytest

import bn_simd
import bounds
import rownorm_oracle as ro
from conftest import assert_same_bits, past_line

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
DTYPES = [F32, F64]


def _rng(seed):
    return np.random.default_rng(seed)


def _assert_within(got, want, bound, what):
    got = np.asarray(got, np.float64)
    assert got.shape == np.shape(want), f"{what}: shape {got.shape}, expected {np.shape(want)}"
    bounds.assert_within(got.ravel(), np.asarray(want).ravel(), np.broadcast_to(bound, np.shape(want)).ravel(), what)


def _case(seed, shape, k, dtype, affine=True, loc=0.0, scale=1.0, cf=False):
    """x, weight, bias, grad_out and the parameters' shape (the last k dims; channels-first (C,))"""
    r = _rng(seed)
    x = (loc + scale * r.standard_normal(shape)).astype(dtype)
    pshape = (shape[1],) if cf else tuple(shape[len(shape) - k:])
    D = int(np.prod(pshape, dtype=np.int64))
    w = (r.uniform(0.5, 2.0, D) * r.choice([-1.0, 1.0], D)).reshape(pshape).astype(dtype) if affine else None
    b = r.standard_normal(D).reshape(pshape).astype(dtype) if affine else None
    dy = r.standard_normal(shape).astype(dtype)
    return x, w, b, dy, pshape


def _check_ln(x, w, b, dy, ns, k, eps=1e-5, cf=False, rms=False, gw_dtype=None):
    """Forward (all entry points) and backward against the oracle."""
    dtype = x.dtype
    xr = ro.to_rows(x, k, cf)
    y0, xhat, mean, rstd = ro.forward(xr, w, b, eps, rms)
    yb = ro.forward_bound(xr, xhat, rstd, dtype, w, b, rms)
    lay = "NCHW" if cf else None
    stat_shape = ((x.shape[0], 1) + x.shape[2:]) if cf else x.shape[:x.ndim - k] + (1,) * k
    if rms:
        y = bn_simd.rms_norm(x, ns, w, eps)
        y1, s1 = bn_simd.rms_norm_forward(x, ns, w, eps=eps)
    else:
        y = bn_simd.layer_norm(x, ns, w, b, eps, layout=lay)
        y1, m1, s1 = bn_simd.layer_norm_forward(x, ns, w, b, eps=eps, layout=lay)
        assert m1.dtype == dtype and m1.shape == stat_shape
        st = bounds.stat_tol(xr.shape[1], dtype)
        sd = np.sqrt(np.maximum(1.0 / rstd ** 2 - eps, 0))
        _assert_within(ro.to_rows(m1, 1, cf)[:, 0] if cf else m1.reshape(-1), mean, st * (np.abs(mean) + sd), "mean")
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, y1)
    _assert_within(ro.to_rows(y, k, cf), y0, yb, "y")
    assert s1.dtype == dtype and s1.shape == stat_shape
    _assert_within((ro.to_rows(s1, 1, cf)[:, 0] if cf else s1.reshape(-1)), rstd,
                   4 * bounds.stat_tol(xr.shape[1], dtype) * rstd, "rstd")
    # backward from the saved statistics as returned (x's dtype)
    ms = None if rms else ro.to_rows(m1, 1, cf)[:, 0] if cf else m1.reshape(-1)
    ss = ro.to_rows(s1, 1, cf)[:, 0] if cf else s1.reshape(-1)
    (dx0, dw0, db0), mags = ro.backward(ro.to_rows(dy, k, cf), xr, ms, ss, w, rms)
    bx, bw, bb = ro.backward_bound(mags, dw0, db0, dtype, xr.shape[1], xr.shape[0])
    if rms:
        dx, dw = bn_simd.rms_norm_backward(dy, x, s1, ns, w)
        db = None
    else:
        dx, dw, db = bn_simd.layer_norm_backward(dy, x, m1, s1, ns, w, b, layout=lay)
    assert dx.dtype == dtype and dx.shape == x.shape
    _assert_within(ro.to_rows(dx, k, cf), dx0, bx, "grad_x")
    if w is None:
        assert dw is None and db is None
        return
    assert dw.shape == w.shape and dw.dtype == w.dtype
    _assert_within(dw.reshape(-1), dw0, bw, "grad_weight")
    if not rms and b is None:
        assert db is None
    elif not rms:
        assert db.shape == b.shape and db.dtype == b.dtype
        _assert_within(db.reshape(-1), db0, bb, "grad_bias")


# ---- values -----------------------------------------------------------------------------------------------------

# normalised lengths around every ISA's vector lengths (4, 8, 16), the kernels' unrolling (2 vectors) and their row
# blocks; shapes with many and with no leading dims
LENGTHS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 64, 65, 100, 257, 768]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("D", LENGTHS)
def test_last_dim_matches_the_oracle(D, rms, dtype):
    x, w, b, dy, ns = _case(D, (3, 5, D), 1, dtype)
    _check_ln(x, w, b, dy, D, 1, rms=rms)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("shape,k", [((6,), 1), ((2, 3, 4, 5), 2), ((2, 3, 4, 5), 3), ((2, 3, 4, 5), 4),
                                     ((2, 1, 3, 1, 2, 7), 1), ((130, 20), 1), ((1, 1, 4096), 1), ((70, 3, 11), 2)])
def test_normalized_shapes_and_leading_dims(shape, k, rms, dtype):
    x, w, b, dy, ns = _case(len(shape) + k, shape, k, dtype)
    _check_ln(x, w, b, dy, ns, k, rms=rms)


class _Size(tuple):
    """A tuple subclass, as torch.Size is"""


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_normalized_shape_spellings_give_the_same_bits_and_errors(rms):
    """A tuple or list of ints (the layers' call) takes a quicker path than other spellings: each gives the same
    result, and what is not x's trailing dims, or not ints, is refused whichever path sees it."""
    x, w, b, dy, ns = _case(5, (2, 3, 4, 5), 2, F32)

    def call(shape, xx=x, ww=w, bb=b):
        return bn_simd.rms_norm(xx, shape, ww) if rms else bn_simd.layer_norm(xx, shape, ww, bb)

    want = call((4, 5))
    assert ns == (4, 5)
    for shape in ([4, 5], (np.int64(4), 5), (4, np.int32(5)), _Size((4, 5)), np.array([4, 5])):
        assert call(shape).tobytes() == want.tobytes(), shape
    flat = call(20, x.reshape(2, 3, 20), w.reshape(20), b.reshape(20))
    assert call((20,), x.reshape(2, 3, 20), w.reshape(20), b.reshape(20)).tobytes() == flat.tobytes()
    for shape, exc in [((4, 6), ValueError), ((5, 4), ValueError), ((4, -5), ValueError), ((4, 5.0), TypeError),
                       ((3, 4, 5, 6, 7), ValueError), ((), ValueError), (("4", 5), TypeError)]:
        with pytest.raises(exc, match="normalized_shape"):
            call(shape)
    one = np.ones((3, 1), np.float32)
    with pytest.raises(TypeError, match="normalized_shape"):
        call((True,), one, None, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [33, 8192, 8193])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_without_weight_and_bias(rms, D, dtype):
    """(a missing bias of up to 8192 columns is static zeros, beyond it an allocated array: both sides of that)"""
    x, w, b, dy, ns = _case(3, (4, D), 1, dtype, affine=False)
    _check_ln(x, None, None, dy, D, 1, rms=rms)
    # weight alone: grad_bias None
    _, w, _, _, _ = _case(4, (4, D), 1, dtype)
    _check_ln(x, w, None, dy, D, 1, rms=rms)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 3, 37), (3, 96, 7, 7), (2, 4, 70), (1, 3, 2, 3, 4), (2, 1, 17),
                                   (2, 768, 5), (4, 8)])
def test_channels_first_matches_the_oracle(shape, dtype):
    """ConvNeXt's LayerNorm2d: normalised over axis 1 at every (sample, position), no transpose."""
    r = _rng(len(shape))
    x = r.standard_normal(shape).astype(dtype)
    C = shape[1]
    w, b = r.uniform(-2, 2, C).astype(dtype), r.standard_normal(C).astype(dtype)
    _check_ln(x, w, b, r.standard_normal(shape).astype(dtype), C, 1, cf=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_first_equals_last_dim_of_the_transpose(dtype):
    r = _rng(5)
    x = r.standard_normal((2, 24, 9, 13)).astype(dtype)
    w, b = r.uniform(-2, 2, 24).astype(dtype), r.standard_normal(24).astype(dtype)
    y = bn_simd.layer_norm(x, 24, w, b, layout="channels_first")
    yt = bn_simd.layer_norm(np.ascontiguousarray(np.moveaxis(x, 1, -1)), 24, w, b)
    e = np.finfo(dtype).eps
    np.testing.assert_allclose(y, np.moveaxis(yt, -1, 1), rtol=8 * e, atol=8 * e * np.abs(yt).max())


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_empty_leading_dims_return_empty(rms):
    """PyTorch returns empty outputs (and statistics) for a batch of no rows."""
    x = np.zeros((0, 3, 8), np.float32)
    w, b = np.ones(8, np.float32), np.zeros(8, np.float32)
    if rms:
        y, s = bn_simd.rms_norm_forward(x, 8, w)
        gx, gw = bn_simd.rms_norm_backward(x, x, s, 8, w)
    else:
        y, m, s = bn_simd.layer_norm_forward(x, 8, w, b)
        assert m.shape == (0, 3, 1)
        gx, gw, gb = bn_simd.layer_norm_backward(x, x, m, s, 8, w, b)
        np.testing.assert_array_equal(gb, np.zeros(8))
    assert y.shape == x.shape and s.shape == (0, 3, 1) and gx.shape == x.shape
    np.testing.assert_array_equal(gw, np.zeros(8))


@pytest.mark.parametrize("activation", [None, "relu"])
def test_channels_first_with_an_empty_spatial_dim_returns_empty(activation):
    """(N, C, 0, W): no position to normalise; the backward's parameter gradients are zeros, as PyTorch's on the
    permuted array."""
    x = np.zeros((2, 3, 0, 4), np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    kw = {} if activation is None else {"activation": activation, "residual": x.copy()}
    fwd = bn_simd.layer_norm_forward(x, 3, w, b, layout="NCHW", **kw)
    assert fwd[0].shape == x.shape and fwd[1].shape == fwd[2].shape == (2, 1, 0, 4)
    if activation is not None:
        kw["save_stats"] = fwd[3]
    gx, gw, gb = bn_simd.layer_norm_backward(x, x, fwd[1], fwd[2], 3, w, b, layout="NCHW", **kw)[:3]
    assert gx.shape == x.shape
    np.testing.assert_array_equal(gw, np.zeros(3))
    np.testing.assert_array_equal(gb, np.zeros(3))
    layer = bn_simd.LayerNorm(3, layout="NCHW")
    assert layer(x).shape == x.shape and layer.backward(x).shape == x.shape


# ---- numerics ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cf", [False, True], ids=["last", "channels_first"])
def test_large_mean_over_std_stays_accurate(dtype, cf):
    """|mean| / std = 1e6: the statistics are shifted sums in double and x - mean is exact, so y keeps the dtype's
    accuracy (the textbook E[x^2] - E[x]^2 in float32 would return garbage)."""
    shape = (3, 40, 6) if cf else (5, 3, 130)
    x, w, b, dy, ns = _case(9, shape, 1, dtype, loc=1e6, scale=1.0, cf=cf)
    _check_ln(x, w, b, dy, shape[1] if cf else shape[-1], 1, cf=cf)
    y = bn_simd.layer_norm(x, shape[1] if cf else shape[-1], layout="NCHW" if cf else None)
    red = (1, ) if cf else (-1,)
    assert np.abs(y.astype(np.float64).std(axis=red) - 1).max() < 1e-3  # (a unit-variance result, not garbage)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cf", [False, True], ids=["last", "channels_first"])
def test_a_constant_row_gives_exactly_the_bias(dtype, cf):
    r = _rng(2)
    shape = (4, 19, 5) if cf else (4, 3, 37)
    C = shape[1] if cf else shape[-1]
    vals = np.array([0.0, -3.7, 1e6, 12345.678, 1e-30], dtype)
    x = np.empty(shape, dtype)
    if cf:
        x[...] = np.resize(vals, (shape[0], 1, shape[2]))
    else:
        x[...] = np.resize(vals, shape[:-1] + (1,))
    w, b = r.uniform(-2, 2, C).astype(dtype), r.standard_normal(C).astype(dtype)
    for eps in (1e-5, 1e-300 if dtype == F64 else 1e-30):
        y = bn_simd.layer_norm(x, C, w, b, eps, layout="NCHW" if cf else None)
        want = np.broadcast_to(b.reshape((C, 1)) if cf else b, y.shape)
        np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("cf", [False, True], ids=["last", "channels_first"])
def test_nan_stays_in_its_row(rms, cf):
    """A NaN in x poisons its row's outputs (forward and grad_x) and, through the column sums, grad_weight (every
    column: its row's xhat is NaN); a NaN in grad_out poisons its row's grad_x and its own column's parameter
    gradients. Every other value stays finite and right."""
    shape = (4, 6, 5) if cf else (6, 33)
    x, w, b, dy, _ = _case(1, shape, 1, F32, cf=cf)
    C = shape[1] if cf else shape[-1]
    lay = "NCHW" if cf else None
    bad = (2, 3, 1) if cf else (2, 7)
    pos = (2, slice(None), 1) if cf else (2, slice(None))  # the poisoned row

    def fwd(x):
        if rms:
            return bn_simd.rms_norm_forward(x, C, w, layout=lay)
        return bn_simd.layer_norm_forward(x, C, w, b, layout=lay)

    def bwd(dy, x, st):
        if rms:
            return bn_simd.rms_norm_backward(dy, x, st[-1], C, w, layout=lay) + (None,)
        return bn_simd.layer_norm_backward(dy, x, st[1], st[2], C, w, b, layout=lay)

    xn = x.copy()
    xn[bad] = np.nan
    st = fwd(xn)
    y = st[0]
    row = np.zeros(shape, bool)
    row[pos] = True
    assert np.isnan(y[row]).all() and np.isfinite(y[~row]).all()
    np.testing.assert_array_equal(y[~row], fwd(x)[0][~row])
    gx, gw, gb = bwd(dy, xn, st)
    assert np.isnan(gx[row]).all() and np.isfinite(gx[~row]).all()
    assert np.isnan(gw).all()
    if gb is not None:
        assert np.isfinite(gb).all()
    # NaN in grad_out
    st = fwd(x)
    dyn = dy.copy()
    dyn[bad] = np.nan
    gx, gw, gb = bwd(dyn, x, st)
    assert np.isnan(gx[row]).all() and np.isfinite(gx[~row]).all()
    col = np.zeros(C, bool)
    col[bad[1] if cf else bad[-1]] = True
    assert np.isnan(gw[col]).all() and np.isfinite(gw[~col]).all()
    if gb is not None:
        assert np.isnan(gb[col]).all() and np.isfinite(gb[~col]).all()


# ---- determinism and ISAs ---------------------------------------------------------------------------------------

def _all_outputs(x, w, b, dy, ns, lay, rms):
    if rms:
        y, s = bn_simd.rms_norm_forward(x, ns, w)
        return (y, s) + bn_simd.rms_norm_backward(dy, x, s, ns, w)
    y, m, s = bn_simd.layer_norm_forward(x, ns, w, b, layout=lay)
    return (y, m, s) + bn_simd.layer_norm_backward(dy, x, m, s, ns, w, b, layout=lay)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [100, 768, 37, 512])
@pytest.mark.parametrize("nan_param", [False, True])
def test_bits_do_not_depend_on_where_the_arrays_start(D, nan_param, dtype):
    """The forward normalises a row of finite x from a line boundary of the weight where the parameters hold no NaN
    (src/rowcol.inc, rc_load_head), of its own or of each thread's copies at x's place in a line (src/rownorm.inc,
    rn_place: x and y 48 bytes past a line and the parameters 16, as NumPy often puts them): the bytes, the signs and
    payloads of NaN outputs included, are those of arrays on 64-byte boundaries, for rows with NaN and +-Inf,
    parameters with Inf (and NaN)."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((40, D)).astype(dtype)  # (rows 8 on: finite and varied, the ones that take the head)
    x[0, ::7] = np.nan
    x[1, 3] = np.nan
    x[3] = np.inf
    x[5, ::3] = -np.inf
    x[7] = 2.5  # (a constant row)
    w, b = rng.uniform(0.5, 2, D).astype(dtype), rng.standard_normal(D).astype(dtype)
    w[1], b[2] = np.inf, -np.inf
    if nan_param:  # (NaNs of other signs and payloads: which one an output takes follows the operands' order)
        bits = w.view(f"u{w.itemsize}")
        top = 1 << (8 * w.itemsize - 1)
        quiet = 0x7FC00000 if w.itemsize == 4 else 0x7FF8000000000000
        for j in list(range(0, 16, 3)) + list(range(D - 17, D)):  # (heads, and where vectors give way to tails)
            w.view(bits.dtype)[j], b.view(bits.dtype)[j] = quiet | 1 | top * (j % 2), quiet | 2 | top * (1 - j % 2)
    want = None
    for xo, wo, bo, yo in [(0, 0, 0, 0), (16, 16, 16, 16), (32, 48, 48, 32), (8, 24, 40, 8), (0, 16, 16, 0),
                           (16, 0, 0, 16), (48, 16, 16, 48), (48, 16, 16, 16), (16, 0, 0, 48), (48, 16, 32, 0)]:
        if xo % x.itemsize or wo % w.itemsize or bo % b.itemsize or yo % x.itemsize:
            continue
        xa, wa, ba = past_line(x, xo), past_line(w, wo), past_line(b, bo)
        y = past_line(np.zeros_like(x), yo)
        got = bn_simd.layer_norm_forward(xa, D, wa, ba, out=y) + (bn_simd.layer_norm(xa, D, wa, ba),
                                                                bn_simd.rms_norm(xa, D, wa),
                                                                bn_simd.layer_norm(xa, D, wa, None))
        if want is None:
            want = got
        for k, (p, q) in enumerate(zip(got, want)):
            assert_same_bits(p, q, f"output {k}, x at {xo}, weight at {wo}, bias at {bo}, y at {yo}")


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [768, 1024, 40])
def test_16_bit_bits_do_not_depend_on_where_the_arrays_start(D, name):
    """16-bit rows (float32 parameters) wherever x, y, the weight and the bias start, NaN and Inf rows among them:
    the bytes of arrays on 64-byte boundaries (the kernels that peel and copy the parameters, rn_place, are
    float32's and float64's; this holds the 16-bit ones to the same)."""
    import half_cases
    dtype = half_cases.dtype(name)
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((40, D)) * 3 + 1).astype(dtype)
    x[0, ::5] = np.nan
    x[2] = np.inf
    w, b = rng.uniform(0.5, 2, D).astype(np.float32), rng.standard_normal(D).astype(np.float32)
    want = None
    for xo, wo, bo, yo in [(0, 0, 0, 0), (48, 16, 16, 48), (16, 16, 16, 16), (2, 16, 16, 2), (34, 0, 0, 50),
                           (48, 16, 32, 0)]:
        xa, wa, ba = past_line(x, xo), past_line(w, wo), past_line(b, bo)
        y = past_line(np.zeros_like(x), yo)
        got = bn_simd.layer_norm_forward(xa, D, wa, ba, out=y) + (bn_simd.rms_norm(xa, D, wa),)
        if want is None:
            want = got
        for k, (p, q) in enumerate(zip(got, want)):
            assert_same_bits(p, q, f"output {k}, x at {xo}, weight at {wo}, bias at {bo}, y at {yo}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["layer", "rms", "channels_first"])
@pytest.mark.parametrize("shape", [(300, 257), (33, 2048), (5, 40, 24, 33)])
def test_bitwise_the_same_for_any_thread_count(shape, form, dtype):
    if form == "channels_first" and len(shape) != 4 or form != "channels_first" and len(shape) != 2:
        pytest.skip("a shape of the other form")
    cf, rms = form == "channels_first", form == "rms"
    x, w, b, dy, _ = _case(7, shape, 1, dtype, cf=cf)
    ns = shape[1] if cf else shape[-1]
    lay = "NCHW" if cf else None
    res = []
    for n in (1, 2, 3):
        with bn_simd.Context(num_threads=n):
            res.append(_all_outputs(x, w, b, dy, ns, lay, rms))
    for other in res[1:]:
        for a, o in zip(res[0], other):
            np.testing.assert_array_equal(a, o)
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1, "openmp"):
        one = _all_outputs(x, w, b, dy, ns, lay, rms)
    for a, o in zip(res[1], one):
        np.testing.assert_array_equal(a, o)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("form", ["layer", "rms", "channels_first", "relu_residual"])
@pytest.mark.parametrize("shape", [(9000, 8), (300, 257)], ids=["9000x8", "300x257"])
def test_nan_outputs_have_the_same_bits_for_any_thread_count(shape, form, dtype):
    """Rows holding NaN (of either sign) or an Inf give NaN outputs whose sign and payload do not depend on the thread
    count: which kernel normalises a row (and so which of two NaN operands an instruction passes on) follows the
    split of the rows between threads, so such rows are normalised by the one double loop. Forward, statistics and
    backward, bitwise; (9000, 8) float32 differed between 1 and 2 threads before."""
    dt = F32 if dtype == "float32" else F64 if dtype == "float64" else pytest.importorskip("ml_dtypes").bfloat16
    cf, rms = form == "channels_first", form == "rms"
    full = (5, shape[1] // 8 + 3, 8, shape[0] // 40) if cf else shape
    g = np.random.default_rng(11)
    x = g.standard_normal(full).astype(np.float32) * 2 + 0.5
    flat = x.reshape(-1)
    flat[7::97] = np.nan
    flat[40::291] = -np.nan
    flat[60::291] = np.inf
    flat[80::291] = -np.inf
    x = x.astype(dt)
    ns = full[1] if cf else full[-1]
    pdt = F64 if dt == F64 else F32
    w, b = g.standard_normal(ns).astype(pdt), g.standard_normal(ns).astype(pdt)
    dy, r = g.standard_normal(full).astype(dt), g.standard_normal(full).astype(dt)
    lay = "NCHW" if cf else None
    kw = dict(activation="relu", residual=r) if form == "relu_residual" else {}

    def outputs():
        if rms:
            y, s = bn_simd.rms_norm_forward(x, ns, w)
            return (y, s) + bn_simd.rms_norm_backward(dy, x, s, ns, w)
        f = bn_simd.layer_norm_forward(x, ns, w, b, layout=lay, **kw)
        bw = dict(kw, save_stats=f[3]) if kw else {}
        return f[:3] + tuple(g for g in bn_simd.layer_norm_backward(dy, x, f[1], f[2], ns, w, b, layout=lay, **bw)
                             if g is not None)

    res = []
    for n in (1, 2, 3):
        with bn_simd.Context(num_threads=n):
            res.append(outputs())
    assert np.isnan(np.asarray(res[0][0], np.float32)).any()
    for n, other in zip((2, 3), res[1:]):
        for k, (a, o) in enumerate(zip(res[0], other)):
            assert_same_bits(a, o, f"output {k} on {n} threads")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["layer", "rms", "channels_first"])
def test_every_isa_matches_the_oracle(form, dtype):
    cf, rms = form == "channels_first", form == "rms"
    shape = (3, 37, 5, 7) if cf else (7, 3, 45)
    x, w, b, dy, _ = _case(3, shape, 1, dtype, cf=cf)
    before = bn_simd.get_isa()
    try:
        for isa in bn_simd.show_config()["supported_isas"]:
            bn_simd.set_isa(isa)
            _check_ln(x, w, b, dy, shape[1] if cf else shape[-1], 1, cf=cf, rms=rms)
    finally:
        bn_simd.set_isa(before)


# ---- peers' cases -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rms", [False, True], ids=["LayerNormalization", "RMSNormalization"])
@pytest.mark.parametrize("axis", [-4, -3, -2, -1, 1, 2, 3])
@pytest.mark.parametrize("epsilon", [1e-5, 0.1])
def test_onnx_axis_cases(axis, epsilon, rms):
    """ONNX's LayerNormalization (opset 17) / RMSNormalization (opset 23) backend cases: X of shape (2, 3, 4, 5),
    normalised over X.shape[axis:], scale (and B) of that shape."""
    x, w, b, dy, ns = _case(abs(axis), (2, 3, 4, 5), 4 - axis % 4, F32)
    _check_ln(x, w, b, dy, ns, len(ns), eps=epsilon, rms=rms)


def test_keras_correctness_loc_5_scale_10():
    """Keras' layer_normalization_test: normal data of mean 5 and std 10, the unit-scale layer's output has mean 0
    and std 1 per position."""
    x = _rng(0).normal(5.0, 10.0, (1000, 2, 2, 2)).astype(np.float32)
    layer = bn_simd.LayerNorm((2, 2, 2))
    y = layer(x).astype(np.float64).reshape(1000, -1)
    np.testing.assert_allclose(y.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=1), 1.0, atol=1e-3)


def test_rms_norm_default_eps_is_the_machine_epsilon():
    x = np.full((2, 4), 1e-5, np.float64)  # mean(x^2) = 1e-10: eps = 2.2e-16 visible, 1e-5 would dominate
    for dt in (np.float32, np.float64):
        xd = x.astype(dt)
        y = bn_simd.rms_norm(xd, 4)
        want = xd.astype(np.float64) / np.sqrt((xd.astype(np.float64) ** 2).mean(-1, keepdims=True)
                                               + np.finfo(dt).eps)
        np.testing.assert_allclose(y, want, rtol=4 * np.finfo(dt).eps)


# ---- errors -----------------------------------------------------------------------------------------------------

def test_bad_arguments_are_refused_naming_them_and_change_nothing():
    x = np.ones((3, 4, 5), np.float32)
    out = np.full_like(x, 7.0)
    cases = [
        (lambda: bn_simd.layer_norm(x, 6, out=out), ValueError, r"\bx\b.*normalized_shape=\[6\]"),
        (lambda: bn_simd.layer_norm(x, (3, 5), out=out), ValueError, "normalized_shape"),
        (lambda: bn_simd.layer_norm(x, 5.0, out=out), TypeError, "normalized_shape"),
        (lambda: bn_simd.layer_norm(x, (), out=out), ValueError, "normalized_shape"),
        (lambda: bn_simd.layer_norm(x, (-5,), out=out), ValueError, "normalized_shape"),
        (lambda: bn_simd.layer_norm(x, 5, np.ones(4), out=out), ValueError, "weight"),
        (lambda: bn_simd.layer_norm(x, 5, None, np.ones((5, 1)), out=out), ValueError, "bias"),
        (lambda: bn_simd.layer_norm(x, 5, np.ones(5, int), out=out), TypeError, "weight"),
        (lambda: bn_simd.layer_norm(x, 5, eps=0.0, out=out), ValueError, "eps"),
        (lambda: bn_simd.layer_norm(x, 5, eps="1", out=out), TypeError, "eps"),
        (lambda: bn_simd.layer_norm(x.astype(int), 5, out=out), TypeError, r"\bx\b"),
        (lambda: bn_simd.layer_norm(x, 5, out=out[:, :2]), ValueError, "out"),
        (lambda: bn_simd.layer_norm(x, 5, out=out.astype(np.float64)), TypeError, "out"),
        (lambda: bn_simd.layer_norm(x, 5, layout="NCWH", out=out), ValueError, "layout"),
        (lambda: bn_simd.layer_norm(x, 5, layout="NCHW", out=out), ValueError, "normalized_shape"),
        (lambda: bn_simd.layer_norm(x, (4, 5), layout="NCHW", out=out), ValueError, "normalized_shape"),
        (lambda: bn_simd.rms_norm(x, 5, eps=-1.0, out=out), ValueError, "eps"),
        (lambda: bn_simd.layer_norm_backward(x, x, np.zeros((3, 4, 1)), np.ones((3, 5, 1)), 5, out=out), ValueError,
         "rstd"),
        (lambda: bn_simd.layer_norm_backward(x, x, None, np.ones((3, 4, 1)), 5, out=out), TypeError, "mean"),
        (lambda: bn_simd.layer_norm_backward(x[:, :3], x, np.zeros((3, 4, 1)), np.ones((3, 4, 1)), 5, out=out),
         ValueError, "grad_out"),
        (lambda: bn_simd.rms_norm_backward(x, x, np.ones((3, 4, 1), int), 5, out=out), TypeError, "rstd"),
    ]
    for call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()
        np.testing.assert_array_equal(out, 7.0)


# ---- layers -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_layer_matches_the_functional_calls(dtype):
    x, w, b, dy, ns = _case(2, (4, 6, 3, 5), 2, dtype)
    layer = bn_simd.LayerNorm((3, 5), dtype=dtype)
    layer.load_state_dict({"weight": w, "bias": b})
    y = layer(x)
    np.testing.assert_array_equal(y, bn_simd.layer_norm(x, (3, 5), w, b))
    gx = layer.backward(dy)
    _, m, s = bn_simd.layer_norm_forward(x, (3, 5), w, b)
    gx1, gw1, gb1 = bn_simd.layer_norm_backward(dy, x, m, s, (3, 5), w, b)
    e = np.finfo(dtype).eps  # (the layer keeps its statistics in float64, the functional pair in x's dtype)
    np.testing.assert_allclose(gx, gx1, rtol=64 * e, atol=64 * e * np.abs(gx1).max())
    np.testing.assert_allclose(layer.grad_weight, gw1, rtol=64 * e, atol=64 * e * np.abs(gw1).max())
    np.testing.assert_allclose(layer.grad_bias, gb1, rtol=64 * e, atol=64 * e * np.abs(gb1).max())
    assert layer.grad_weight.shape == (3, 5) and layer.grad_weight.dtype == dtype
    assert [p.shape for p in layer.parameters()] == [(3, 5), (3, 5)]
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert repr(layer).startswith("LayerNorm((3, 5), eps=1e-05, elementwise_affine=True")


def test_layer_variants_and_state_dicts():
    assert bn_simd.LayerNorm(8, bias=False).state_dict().keys() == {"weight"}
    assert bn_simd.LayerNorm(8, elementwise_affine=False).state_dict() == {}
    r = bn_simd.RMSNorm(8)
    assert r.eps is None and r.state_dict().keys() == {"weight"} and r.bias is None
    x = _rng(0).standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_array_equal(r(x), bn_simd.rms_norm(x, 8, r.weight))
    gx = r.backward(np.ones_like(x))
    assert gx.shape == x.shape and r.grad_weight.shape == (8,) and r.grad_bias is None
    cf = bn_simd.LayerNorm(8, layout="channels_first")
    xc = _rng(1).standard_normal((2, 8, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(cf(xc), bn_simd.layer_norm(xc, 8, cf.weight, cf.bias, layout="NCHW"))
    with pytest.raises(ValueError, match="weight"):
        bn_simd.LayerNorm(8).load_state_dict({"weight": np.ones(7), "bias": np.zeros(8)})
    with pytest.raises(ValueError, match="unexpected"):
        bn_simd.RMSNorm(8).load_state_dict({"weight": np.ones(8), "bias": np.zeros(8)})
    with pytest.raises(RuntimeError):
        bn_simd.LayerNorm(8).backward(np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="normalized_shape"):
        bn_simd.LayerNorm(-1)
    with pytest.raises(TypeError, match="normalized_shape"):
        bn_simd.LayerNorm("8")
    for ns in (np.array(8), np.float32(8)):  # (a 0-d array has __iter__, and refuses it)
        with pytest.raises(TypeError, match="normalized_shape"):
            bn_simd.LayerNorm(ns)
        with pytest.raises(TypeError, match="normalized_shape"):
            bn_simd.layer_norm(x, ns)
        with pytest.raises(TypeError, match="normalized_shape"):
            bn_simd.rms_norm(x, ns)


@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
def test_a_layer_over_no_value_works_as_pytorchs(cls):
    """torch.nn.LayerNorm(0) and RMSNorm(0) are layers (as the functions take normalized_shape 0): empty weight and
    bias, an empty output and gradients, their state dicts loading both ways."""
    layer = getattr(bn_simd, cls)(0)
    x = np.zeros((3, 0), np.float32)
    y = layer(x)
    gx = layer.backward(np.zeros_like(x))
    assert y.shape == gx.shape == (3, 0) and layer.weight.shape == layer.grad_weight.shape == (0,)
    layer.load_state_dict(layer.state_dict())
    torch = pytest.importorskip("torch")
    t = getattr(torch.nn, cls)(0)
    layer.load_state_dict(t.state_dict())
    t.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})


def test_a_layers_normalized_shape_reassigned_as_a_list_loads_its_own_state():
    """The layers read a normalized_shape reassigned as a list as its tuple (PyTorch checks the parameters' shapes):
    load_state_dict compares the arrays' shapes with that tuple, and takes the layer's own state."""
    layer = bn_simd.LayerNorm(8)
    layer.normalized_shape = [8]
    layer.weight[:] = 2
    layer(np.ones((2, 8), np.float32))
    layer.load_state_dict({"weight": np.full(8, 3.0), "bias": np.zeros(8)})
    assert np.all(layer.weight == 3)
    with pytest.raises(ValueError, match=r"weight.*\(8,\)"):
        layer.load_state_dict({"weight": np.ones(7), "bias": np.zeros(8)})


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_16_bit_grad_out_or_residual_beside_wider_x_is_a_dtype_error(half):
    """A 16-bit grad_out or residual beside float32 x is refused as a dtype that is not x's (it said layer norm took
    no 16-bit data), as a float32 one beside 16-bit x is."""
    dt = np.float16 if half == "float16" else pytest.importorskip("ml_dtypes").bfloat16
    x = _rng(3).standard_normal((2, 8)).astype(np.float32)
    y, mean, rstd = bn_simd.layer_norm_forward(x, 8)
    g = np.ones((2, 8), dt)
    for call in (lambda: bn_simd.layer_norm_backward(g, x, mean, rstd, 8),
                 lambda: bn_simd.rms_norm_backward(g, x, rstd, 8),
                 lambda: bn_simd.layer_norm(x, 8, residual=g),
                 lambda: bn_simd.group_norm_backward(g.reshape(2, 4, 2), x.reshape(2, 4, 2),
                                                     *bn_simd.group_norm_forward(x.reshape(2, 4, 2), 2)[1:], 2)):
        with pytest.raises(TypeError, match=r"must have the dtype of x \(float32\), got " + half):
            call()


def test_state_dicts_load_both_ways_with_pytorch():
    torch = pytest.importorskip("torch")
    t = torch.nn.LayerNorm((3, 4))
    with torch.no_grad():
        t.weight.uniform_(-1, 1)
        t.bias.uniform_(-1, 1)
    layer = bn_simd.LayerNorm((3, 4))
    layer.load_state_dict(t.state_dict())
    np.testing.assert_array_equal(layer.weight, t.weight.detach().numpy())
    t2 = torch.nn.LayerNorm((3, 4))
    t2.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})
    x = _rng(3).standard_normal((2, 5, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(layer(x), t2(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    rt = torch.nn.RMSNorm(4)
    r = bn_simd.RMSNorm(4)
    r.load_state_dict(rt.state_dict())
    np.testing.assert_allclose(r(x), rt(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_outputs_beyond_the_cache_stream_to_the_same_values():
    """Calls touching more than 32 MiB write their rows with streaming stores: the values are those of the same rows
    in calls small enough to store normally (forward in halves, grad_x in quarters)."""
    r = _rng(12)
    x = r.standard_normal((1400, 4096), dtype=np.float32)
    dy = r.standard_normal(x.shape, dtype=np.float32)
    w, b = r.uniform(-2, 2, 4096).astype(np.float32), r.standard_normal(4096).astype(np.float32)
    y, m, s = bn_simd.layer_norm_forward(x, 4096, w, b)
    for part in np.split(np.arange(1400), 2):
        np.testing.assert_array_equal(y[part], bn_simd.layer_norm(x[part], 4096, w, b))
    gx = bn_simd.layer_norm_backward(dy, x, m, s, 4096, w, b)[0]
    for part in np.split(np.arange(1400), 4):
        np.testing.assert_array_equal(gx[part], bn_simd.layer_norm_backward(dy[part], x[part], m[part], s[part], 4096,
                                                                            w, b)[0])


def _at_offset(shape, dtype, off):
    """An uninitialised C-contiguous array starting `off` elements past a 64-byte boundary."""
    it = np.dtype(dtype).itemsize
    n = int(np.prod(shape))
    buf = np.empty(n * it + 64 + off * it, np.uint8)
    start = (-buf.ctypes.data) % 64 + off * it
    return buf[start:start + n * it].view(dtype).reshape(shape)


@pytest.mark.parametrize("off", [0, 1, 4, 12])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_rows_stream_from_any_offset_to_the_same_values(dtype, off):
    """With the streaming threshold at 0, every row streams its whole cache lines and stores the elements before the
    first line boundary and after the last one normally, wherever the output starts (NumPy's large arrays start 16
    bytes past a boundary): forward (a block's normalise beside the next block's statistics, and without), RMS norm
    and the backward give the bits of the same calls stored normally."""
    from bn_simd import _core
    r = _rng(30 + off)
    N, D = 37, 1000
    x = r.standard_normal((N, D)).astype(dtype)
    dy = r.standard_normal((N, D)).astype(dtype)
    w, b = r.uniform(0.5, 2, D).astype(np.float32), r.standard_normal(D).astype(np.float32)
    y_ref, m, s = bn_simd.layer_norm_forward(x, D, w, b)
    rms_ref = bn_simd.rms_norm(x, D, w)
    gx_ref = bn_simd.layer_norm_backward(dy, x, m, s, D, w, b)[0]
    _core.set_stream_bytes(0)  # (conftest restores the default)
    for fn, ref in [(lambda o: bn_simd.layer_norm_forward(x, D, w, b, out=o), y_ref),
                    (lambda o: bn_simd.rms_norm(x, D, w, out=o), rms_ref),
                    (lambda o: bn_simd.layer_norm_backward(dy, x, m, s, D, w, b, out=o), gx_ref)]:
        out = _at_offset((N, D), dtype, off)
        fn(out)
        assert out.tobytes() == ref.tobytes()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("shape", [(37, 1000), (200, 64), (9, 4096), (5, 3)])
def test_prefetching_the_next_rows_gives_the_same_bits(shape, dtype, threads):
    """Between half the streaming threshold and the threshold the forward's paired loop and the backward's sums
    (through an activation, the gradient's sweep) prefetch the rows the thread reads next (up to the end of its share:
    the AddressSanitizer build turns each prefetch into a load, so that one past the end of x or dy fails there):
    every output keeps the bits of the default setting."""
    from bn_simd import _core
    r = _rng(40)
    D = shape[-1]
    x = r.standard_normal(shape).astype(dtype)
    dy = r.standard_normal(shape).astype(dtype)
    w, b = r.uniform(0.5, 2, D).astype(np.float32), r.standard_normal(D).astype(np.float32)
    bn_simd.set_num_threads(threads)
    _, m, s = bn_simd.layer_norm_forward(x, D, w, b)
    _, rs = bn_simd.rms_norm_forward(x, D, w)
    _, ma, sa, sta = bn_simd.layer_norm_forward(x, D, w, b, activation="relu")
    _, rsa, rsta = bn_simd.rms_norm_forward(x, D, w, activation="relu")
    forms = [lambda: bn_simd.layer_norm_forward(x, D, w, b), lambda: bn_simd.rms_norm_forward(x, D, w),
             lambda: bn_simd.layer_norm(x, D, w, b), lambda: bn_simd.layer_norm_backward(dy, x, m, s, D, w, b),
             lambda: bn_simd.rms_norm_backward(dy, x, rs, D, w),
             lambda: bn_simd.layer_norm_backward(dy, x, ma, sa, D, w, b, activation="relu", save_stats=sta),
             lambda: bn_simd.rms_norm_backward(dy, x, rsa, D, w, activation="relu", save_stats=rsta)]
    want = [f() for f in forms]
    # (the forward touches 2/3 of it and the backward all: beyond half, not streamed; conftest restores the default)
    _core.set_stream_bytes(3 * x.nbytes)
    for f, ref in zip(forms, want):
        got = f()
        for g, e in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
            assert (g is None and e is None) or g.tobytes() == e.tobytes()


GUARD_CHILD = """
import ctypes, mmap, sys
import numpy as np
import bn_simd

PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []

def guarded(shape, dtype, fill):
    # a C-contiguous array whose last byte is the last byte before a PROT_NONE page
    n = int(np.prod(shape))
    nbytes = n * np.dtype(dtype).itemsize
    npages = -(-nbytes // PAGE) + 1
    buf = mmap.mmap(-1, npages * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if libc.mprotect(base + (npages - 1) * PAGE, PAGE, 0) != 0:
        sys.exit("mprotect failed")
    keep.append(buf)
    a = np.frombuffer(buf, dtype=dtype, count=n, offset=(npages - 1) * PAGE - nbytes).reshape(shape)
    a[...] = fill
    return a

rng = np.random.default_rng(5)
calls = 0
for isa in bn_simd.show_config()["supported_isas"]:
    bn_simd.set_isa(isa)
    for nt in (1, 2):
        bn_simd.set_num_threads(nt)
        for dtype in (np.float32, np.float64):
            for D in list(range(1, 34)) + [1000]:
                for cf, shape in ((False, (70, D)), (True, (3, D, 37))):
                    x = guarded(shape, dtype, rng.standard_normal(shape))
                    dy = guarded(shape, dtype, rng.standard_normal(shape))
                    w, b = guarded((D,), dtype, 1.5), guarded((D,), dtype, 0.5)
                    lay = "NCHW" if cf else None
                    y, m, s = bn_simd.layer_norm_forward(x, D, w, b, layout=lay, out=guarded(shape, dtype, 0))
                    m, s = guarded(m.shape, dtype, m), guarded(s.shape, dtype, s)
                    r = bn_simd.layer_norm_backward(dy, x, m, s, D, w, b, layout=lay, out=guarded(shape, dtype, 0))
                    calls += 2
                    if not cf:
                        yr, sr = bn_simd.rms_norm_forward(x, D, w, out=guarded(shape, dtype, 0))
                        bn_simd.rms_norm_backward(dy, x, guarded(sr.shape, dtype, sr), D, w, out=guarded(shape, dtype, 0))
                        calls += 2
                    if not (np.isfinite(y).all() and np.isfinite(r[0]).all() and np.isfinite(r[1]).all()):
                        sys.exit(f"non-finite result: {isa} {nt} {np.dtype(dtype).name} {cf} {shape}")
print(f"guard pages: {calls} calls ok")
"""


def test_no_access_past_the_end_of_any_array():
    """Every array (data, parameters, statistics, outputs) ends where an inaccessible page begins, on every ISA with
    1 and 2 threads: an access one byte past any of them kills the child process."""
    import subprocess
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("mmap + mprotect guard pages (Linux)")
    r = subprocess.run([sys.executable, "-c", GUARD_CHILD], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"child exited with {r.returncode} (-11: SIGSEGV)\n{r.stdout}\n{r.stderr}"
    assert "calls ok" in r.stdout


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("where", ["weight", "bias", "in_place_row"])
def test_an_output_over_the_weight_or_bias_gives_the_answer_of_separate_arrays(where, rms, activation):
    """The kernels read the parameters while they write y: y over them (out= the weight's own memory, or in place
    with the weight a row of x) must not change what is read."""
    if rms and where == "bias":
        pytest.skip("RMS norm has no bias")
    rng = np.random.default_rng(5)
    C = 37
    x = rng.standard_normal((6, C)).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    kw = {"activation": activation}

    def call(x, w, b, out):
        if rms:
            return bn_simd.rms_norm(x, C, w, out=out, **kw)
        return bn_simd.layer_norm(x, C, w, b, out=out, **kw)

    if where == "in_place_row":
        expected = call(x.copy(), x[0].copy(), b.copy(), None)
        got = call(x, x[0], b, x)  # weight = x's first row, written over in place first
    else:
        out = np.empty_like(x)
        out[0] = w if where == "weight" else b  # the parameter is y's first row, written first
        wp, bp = (out[0], b) if where == "weight" else (w, out[0])
        expected = call(x, wp.copy(), bp.copy(), None)
        got = call(x, wp, bp, out)
    np.testing.assert_array_equal(got, expected)


def test_rows_of_no_value_give_pytorchs_statistics():
    """normalized_shape of size 0: torch.native_layer_norm gives mean 0 and rstd NaN (1 / sqrt(NaN variance))."""
    x = np.zeros((3, 0), np.float32)
    y, mean, rstd = bn_simd.layer_norm_forward(x, 0)
    assert y.shape == (3, 0) and np.all(mean == 0) and np.all(np.isnan(rstd))
    y, rstd = bn_simd.rms_norm_forward(x, 0)
    assert np.all(np.isnan(rstd))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_a_channel_layout_with_several_normalized_dims_is_refused_at_construction(layout):
    with pytest.raises(ValueError, match="normalized_shape"):
        bn_simd.LayerNorm((3, 5), layout=layout)


def _extreme_rows_ref(x, rms, eps, w, b):
    x64 = x.astype(np.float64)
    if rms:
        return x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * w + b
    mu = x64.mean(-1, keepdims=True)
    return (x64 - mu) / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("form", ["rows", "NCHW"])
def test_extreme_rows_are_normalised_in_double_and_the_others_keep_their_bits(dtype, form, threads):
    """Rows whose float coefficients would overflow or lose their bits, as batch norm's take its float64 apply:
    values of both signs near float32's range (x - m overflows: it gave -Inf), subnormal rows with a tiny eps (rstd
    beyond float32's range: saturated, it scaled the row by 0.1). Such a row is normalised in double, each output
    rounded once; the other rows of the call keep the bits they have without it, at any thread count."""
    dt = np.float32 if dtype == "float32" else pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(5)
    C, eps = 64, 1e-100
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    x = rng.standard_normal((40, C)).astype(dt)
    x[7, :4] = np.array([3e38, 3e38, 3e38, -3e38], np.float32).astype(dt)
    x[7, 4:] = 0
    x[23] = (rng.standard_normal(C) * 1e-40).astype(np.float32).astype(dt)
    normal = np.setdiff1d(np.arange(40), [7, 23])

    def run(a, rms, nt):
        threads(nt)
        if form == "rows":
            return bn_simd.rms_norm(a, C, w, eps=eps) if rms else bn_simd.layer_norm(a, C, w, b, eps=eps)
        a4 = np.ascontiguousarray(a.T)[None, :, :, None]  # (1, C, 40, 1): each row a position
        return np.ascontiguousarray(bn_simd.layer_norm(a4, C, w, b, eps=eps, layout="NCHW")[0, :, :, 0].T)

    for rms in (False, True) if form == "rows" else (False,):
        y = run(x, rms, 2)
        want = _extreme_rows_ref(x, rms, eps, w, 0 if rms else b)
        tol = 4 * float(np.finfo(np.float32).eps if dt == np.float32 else 2.0 ** -8)
        for i in (7, 23):
            if rms and i == 7:
                continue  # (its mean square is beyond double's range: y = 0 there, both ways)
            np.testing.assert_allclose(y[i].astype(np.float64), want[i], rtol=tol, atol=tol * np.abs(want[i]).max())
        assert np.isfinite(y.astype(np.float32)).all()
        assert_same_bits(y[normal], run(x[normal], rms, 2))
        for nt in (1, 3):
            assert_same_bits(run(x, rms, nt), y)
    # a fused activation applies to the double normalise's stored outputs
    if form == "rows":
        z = bn_simd.layer_norm(x, C, w, b, eps=eps, activation="relu")
        assert_same_bits(z, np.maximum(bn_simd.layer_norm(x, C, w, b, eps=eps), 0).astype(x.dtype))


@pytest.mark.parametrize("form", ["rows", "NCHW"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_backward_through_an_epilogue_takes_the_forwards_u_on_extreme_rows(form, activation):
    """The rows the forward normalised in double: the backward through a fused epilogue computes their u the same way
    (it took the float coefficients there: u of -Inf, du NaN, whose column sums made every parameter gradient NaN,
    or ReLU's mask wrong). du (grad_residual) is dz act'(u) at the forward's u = y + residual."""
    rng = np.random.default_rng(9)
    C, eps = 64, 1e-100
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    x = rng.standard_normal((6, C)).astype(np.float32)
    x[1, :48], x[1, 48:] = 3e38, -3e38
    x[4] = (rng.standard_normal(C) * 1e-40).astype(np.float32)
    r = rng.standard_normal((6, C)).astype(np.float32)
    dz = rng.standard_normal((6, C)).astype(np.float32)
    if form == "NCHW":
        to = lambda a: np.ascontiguousarray(a.T)[None, :, :, None]  # noqa: E731  (each row a position)
        back = lambda a: np.ascontiguousarray(a[0, :, :, 0].T)  # noqa: E731
        kw = {"layout": "NCHW"}
    else:
        to = back = lambda a: a  # noqa: E731
        kw = {}
    y, mean, rstd, st = bn_simd.layer_norm_forward(to(x), C, w, b, eps=eps, activation=activation, residual=to(r),
                                                   **kw)
    y0 = back(bn_simd.layer_norm(to(x), C, w, b, eps=eps, **kw))
    u = y0.astype(np.float64) + r
    gx, gw, gb, gr = bn_simd.layer_norm_backward(to(dz), to(x), mean, rstd, C, w, b, activation=activation,
                                                 residual=to(r), save_stats=st, **kw)
    gr = back(gr)
    if activation == "relu":
        want = np.where(u > 0, dz, 0).astype(np.float32)
        np.testing.assert_array_equal(gr[[1, 4]], want[[1, 4]])
    else:
        s = 1 / (1 + np.exp(-u))
        want = dz * s * (1 + u * (1 - s))
        np.testing.assert_allclose(gr[[1, 4]], want[[1, 4]], rtol=1e-5, atol=1e-6)
    assert np.isfinite(gr).all() and np.isfinite(gw).all() and np.isfinite(gb).all()


def test_extreme_rows_backward_with_dx_over_grad_out():
    """dx written over grad_out (out=grad_out): the double path's u of an extreme position goes through a buffer of
    its own, so dz is read before du (dx's memory) is written; channels-first (du is dx) and rows too long for the
    per-thread scratch (du is dx again) give what out=None gives."""
    rng = np.random.default_rng(10)
    for shape, C, kw in (((2, 8, 16), 8, {"layout": "NCHW"}), ((4, 300000), 300000, {})):
        x = rng.standard_normal(shape).astype(np.float32)
        w = rng.uniform(0.5, 2, C).astype(np.float32)
        b = rng.standard_normal(C).astype(np.float32)
        if kw:
            x[0, :, 0] = 1e32 * (1 + 0.1 * rng.standard_normal(C))
        else:
            x[1] = 1e32 * (1 + 0.1 * rng.standard_normal(C))
        g = rng.standard_normal(shape).astype(np.float32)
        # (leaky ReLU: where the float kernels' u and the double one's differ in sign, a dz read after the kernels
        # wrote du over it carries the slope twice; ReLU's 0/1 would hide it)
        for act in ("relu", ("leaky_relu", 0.3)):
            y, mean, rstd, st = bn_simd.layer_norm_forward(x, C, w, b, activation=act, **kw)
            want = bn_simd.layer_norm_backward(g, x, mean, rstd, C, w, b, activation=act, save_stats=st, **kw)
            g2 = g.copy()
            got = bn_simd.layer_norm_backward(g2, x, mean, rstd, C, w, b, activation=act, save_stats=st, out=g2,
                                              **kw)
            assert got[0] is g2
            for a, c in zip(got, want):
                assert_same_bits(a, c)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_constant_row_with_a_tiny_eps_keeps_the_kernels_rounding(dtype):
    """A constant row's saturated rstd does not send it to the double path (whose output would round the bias to the
    16-bit type before the residual is added): its output is (bias + residual) rounded once, whatever eps is."""
    dt = np.float16 if dtype == "float16" else pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 64)).astype(dt)
    x[1] = 0.75
    w, b = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    r = rng.standard_normal((4, 64)).astype(dt)
    want = (b + r[1].astype(np.float32)).astype(dt)
    for eps in (1e-5, 1e-90):
        assert_same_bits(bn_simd.layer_norm(x, 64, w, b, eps=eps, residual=r)[1], want)
    if dtype == "bfloat16":  # nor does a mean beyond 2^100 (bfloat16 reaches it), both layouts, fwd and bwd
        x[1] = np.float32(1e38)
        assert_same_bits(bn_simd.layer_norm(x, 64, w, b, residual=r)[1], want)
        xc, rc = np.ascontiguousarray(x.T[None]), np.ascontiguousarray(r.T[None])   # (1, 64, 4): C on axis 1
        got = bn_simd.layer_norm(xc, 64, w, b, residual=rc, layout="channels_first")
        assert_same_bits(np.ascontiguousarray(got[0, :, 1]), want)
        y, mean, rstd, st = bn_simd.layer_norm_forward(x, 64, w, b, activation="relu", residual=r)
        g = np.ones_like(x)
        gx, gw, gb, gr = bn_simd.layer_norm_backward(g, x, mean, rstd, 64, w, b, activation="relu", residual=r,
                                                     save_stats=st)
        u = b + r[1].astype(np.float32)   # the relu's kink decided on the once-rounded bias + residual
        np.testing.assert_array_equal(gr[1].astype(np.float32), (u.astype(dt).astype(np.float32) > 0))
    # RMS norm's mean is 0: a constant row of tiny values normalises to 1 (x / sqrt(x^2 + eps)), not to a float
    # kernel's x * FLT_MAX (0.034 for 1e-40 with eps 1e-90)
    for tdt in (np.float32, dt) if dtype == "bfloat16" else (np.float32,):  # (1e-40 is 0 in float16)
        t = np.full((2, 16), 1e-40, np.float32).astype(tdt)
        v = np.float64(t[0, 0])
        for eps in (1e-90, 1e-80):
            np.testing.assert_allclose(bn_simd.rms_norm(t, 16, eps=eps).astype(np.float64), v / np.sqrt(v * v + eps),
                                       rtol=1e-2)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("cf", [False, True], ids=["rows", "channels_first"])
def test_layer_norm_over_one_value_has_a_zero_gradient(cf, dtype, activation):
    """Over one value y is the bias whatever x, so grad_x is exactly 0 (PyTorch's too), even with BERT's eps 1e-12
    (rstd 1e6), where the rounded coefficients of the general formula left rstd |g| eps of noise; NaN where x is."""
    r = _rng(50)
    shape = (2, 1, 3, 3) if cf else (6, 1)
    x = r.standard_normal(shape).astype(dtype)
    g = r.standard_normal(shape).astype(dtype)
    x.flat[2] = np.nan
    lay = "NCHW" if cf else None
    out = bn_simd.layer_norm_forward(x, 1, eps=1e-12, layout=lay, activation=activation)
    kw = {} if activation is None else dict(activation=activation, save_stats=out[3])
    gx = bn_simd.layer_norm_backward(g, x, out[1], out[2], 1, layout=lay, **kw)[0]
    nan = np.isnan(x)
    assert np.all(np.isnan(gx[nan])) and np.all(gx[~nan] == 0)
