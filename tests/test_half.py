"""float16 and bfloat16 data (numpy.float16, ml_dtypes.bfloat16): float32 math, one rounding of each output.

Against a float64 oracle on the widened input: every output within one ulp of the 16-bit type at the oracle's value
plus the float32 math's error; Inf exactly where the float32 result passes the 16-bit range; the same bits for any
thread count; float32 statistics and parameter gradients; PyTorch's CPU float16 / bfloat16 ops (which compute in
float32 too) within one ulp; the calls that do not take 16-bit data refuse it with a TypeError. bfloat16 cases skip
when ml_dtypes is not installed.
"""
import subprocess
import sys

import numpy as np
import pytest

import bn_simd
import oracle
import rownorm_oracle as ro

EPS32 = float(np.finfo(np.float32).eps)
# (significand bits with the implicit one, exponent of the smallest normal)
FORMATS = {"float16": (11, -14), "bfloat16": (8, -126)}


def half_dtype(name):
    if name == "float16":
        return np.dtype(np.float16)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(params=["float16", "bfloat16"])
def dt(request):
    return half_dtype(request.param)


def ulp(v, dt):
    """One ulp of dt at |v| (float64 array): 2^(max(E, emin) - p + 1)."""
    p, emin = FORMATS[dt.name]
    a = np.abs(np.asarray(v, np.float64))
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    return np.ldexp(1.0, (np.maximum(e, emin) - p + 1).astype(int))


def wide(a):
    return np.asarray(a).astype(np.float64)


def assert_half_close(y, ref, mag, dt, what):
    """y (16-bit) within one ulp of dt at ref, plus float32 math's error on terms of magnitude mag."""
    assert y.dtype == dt, what
    err = np.abs(wide(y) - ref)
    bound = ulp(ref, dt) + 16 * EPS32 * mag
    worst = np.argmax(err - bound)
    assert np.all(err <= bound), (f"{what}: {wide(y).flat[worst]!r} against {ref.flat[worst]!r} "
                                  f"(bound {bound.flat[worst]:.3g})")


def sample(shape, dt, seed=0, scale=3.0, shift=1.0):
    x = np.random.default_rng(seed).standard_normal(shape) * scale + shift
    return x.astype(np.float32).astype(dt)


def params(C, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.5, 2, C).astype(np.float32), rng.uniform(-1, 1, C).astype(np.float32)


# ---- batch norm ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,shape", [("NCHW", (4, 6, 9, 11)), ("NHWC", (3, 7, 5, 24)), ("NCHW", (2, 5, 300))])
def test_batch_norm_training_is_the_float64_result_within_one_ulp(dt, layout, shape):
    x = sample(shape, dt)
    C = shape[1] if layout == "NCHW" else shape[-1]
    w, b = params(C)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=True, layout=layout)
    ref, mean, var = oracle.forward_train(wide(x), w, b, layout=layout)
    xhat = np.abs(oracle.normalize(wide(x), mean, var, None, None, layout=layout))
    assert_half_close(y, ref, np.abs(ref) + xhat * np.abs(w).max() + np.abs(b).max(), dt, "y")
    n = x.size // C
    np.testing.assert_allclose(rm, 0.1 * mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * var * n / (n - 1), rtol=1e-6)
    assert rm.dtype == rv.dtype == np.float32


def test_batch_norm_eval_and_forward_pair(dt):
    x = sample((5, 8, 7, 7), dt, seed=3)
    w, b = params(8)
    rm, rv = np.linspace(-1, 1, 8).astype(np.float32), np.linspace(0.5, 4, 8).astype(np.float32)
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=False)
    ref = oracle.inference(wide(x), rm, rv, w, b)
    assert_half_close(y, ref, np.abs(ref) + 2 * np.abs(wide(x)) + 4, dt, "eval y")
    y2, mean, invstd = bn_simd.batch_norm_forward(x, w, b)
    assert mean.dtype == invstd.dtype == np.float32
    assert np.array_equal(y2.view(np.uint16), bn_simd.batch_norm(x, None, None, w, b, training=True).view(np.uint16))
    m64, v64, _ = oracle.stats(wide(x))
    np.testing.assert_allclose(mean, m64, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(v64 + 1e-5), rtol=1e-6)
    s_mean, s_var = bn_simd.batch_stats(x)
    np.testing.assert_allclose(s_mean, m64, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s_var, v64, rtol=1e-10)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_batch_norm_backward_grad_x_within_one_ulp(dt, layout):
    shape = (4, 6, 8, 8) if layout == "NCHW" else (4, 8, 8, 6)
    x, dy = sample(shape, dt, seed=5), sample(shape, dt, seed=6, scale=1, shift=0)
    w, b = params(6)
    _, mean, invstd = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
    ref, dw, db = oracle.backward(wide(dy), wide(x), mean, invstd, w, layout=layout)
    n = x.size // 6
    mag = np.abs(ref) + (np.abs(w) * invstd).max() * (np.abs(wide(dy)) + np.abs(db).max() / n
                                                      + 8 * np.abs(dw).max() / n) * 4
    assert_half_close(gx, ref, mag, dt, "grad_x")
    assert gw.dtype == gb.dtype == np.float32
    np.testing.assert_allclose(gw, dw, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gb, db, rtol=1e-5, atol=1e-4)
    sdy, sdyx = bn_simd.backward_reduce(dy, x, mean, layout=layout)
    np.testing.assert_allclose(sdy, db, rtol=1e-12, atol=1e-9)


# ---- group, instance, layer and RMS norm ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 8, 6, 5), (40, 1000)], ids=["3x8x6x5", "40x1000"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_group_norm_forward_and_backward(dt, layout, shape):
    x = sample(shape, dt, seed=7)
    dy = sample(shape, dt, seed=8, scale=1, shift=0)
    w, b = params(shape[1])
    xl = x if layout == "NCHW" else np.ascontiguousarray(np.moveaxis(x, 1, -1))
    dyl = dy if layout == "NCHW" else np.ascontiguousarray(np.moveaxis(dy, 1, -1))
    y, mean, invstd = bn_simd.group_norm_forward(xl, 4, w, b, layout=layout)
    assert mean.dtype == invstd.dtype == np.float32
    if layout == "NHWC":
        y = np.moveaxis(y, -1, 1)
    ref, xhat, _, _ = oracle.group_forward(wide(x), 4, w, b)
    assert_half_close(y, ref, np.abs(ref) + 2 * np.abs(xhat) + 2, dt, "group norm y")
    gx, gw, gb = bn_simd.group_norm_backward(dyl, xl, mean, invstd, 4, w, layout=layout)
    if layout == "NHWC":
        gx = np.moveaxis(gx, -1, 1)
    (dx, dw, db), (scale, sums, _, _) = oracle.group_backward(wide(dy), wide(x), mean, invstd, 4, w)
    assert_half_close(gx, dx, 4 * (scale + sums), dt, "group norm grad_x")
    np.testing.assert_allclose(gw, dw, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gb, db, rtol=1e-5, atol=1e-4)


def test_instance_norm(dt):
    x = sample((2, 5, 9, 9), dt, seed=9)
    w, b = params(5)
    y = bn_simd.instance_norm(x, weight=w, bias=b)
    ref, xhat, _, _ = oracle.group_forward(wide(x), 5, w, b)
    assert_half_close(y, ref, np.abs(ref) + 2 * np.abs(xhat) + 2, dt, "instance norm y")


@pytest.mark.parametrize("rms", [False, True])
def test_layer_and_rms_norm_forward_and_backward(dt, rms):
    x = sample((6, 10, 48), dt, seed=10)
    dy = sample((6, 10, 48), dt, seed=11, scale=1, shift=0)
    w, b = params(48)
    if rms:
        y, rstd = bn_simd.rms_norm_forward(x, 48, w, eps=1e-5)
        mean = None
    else:
        y, mean, rstd = bn_simd.layer_norm_forward(x, 48, w, b)
        assert mean.dtype == np.float32
    assert rstd.dtype == np.float32
    ref, xhat, m64, r64 = ro.forward(wide(x).reshape(60, 48), w, None if rms else b, rms=rms)
    ref = ref.reshape(x.shape)
    assert_half_close(y, ref, np.abs(ref) + 2 * np.abs(xhat.reshape(x.shape)) + 2, dt, "y")
    np.testing.assert_allclose(rstd.ravel(), r64, rtol=1e-6)
    if rms:
        gx, gw = bn_simd.rms_norm_backward(dy, x, rstd, 48, w)
    else:
        gx, gw, gb = bn_simd.layer_norm_backward(dy, x, mean, rstd, 48, w, b)
        assert gb.dtype == np.float32
    assert gw.dtype == np.float32
    (dx, dw, db), (elem, sums, _, _) = ro.backward(wide(dy).reshape(60, 48), wide(x).reshape(60, 48),
                                                   None if rms else wide(mean).ravel(), wide(rstd).ravel(), w,
                                                   rms=rms)
    dx = dx.reshape(x.shape)
    mag = 4 * (elem + sums).reshape(x.shape)
    assert_half_close(gx, dx, mag, dt, "grad_x")
    np.testing.assert_allclose(gw, dw, rtol=1e-4, atol=1e-3)


def test_layer_norm_channels_first(dt):
    x = sample((2, 16, 5, 7), dt, seed=12)
    w, b = params(16)
    y = bn_simd.layer_norm(x, 16, w, b, layout="NCHW")
    rows = np.moveaxis(wide(x), 1, -1).reshape(-1, 16)
    ref = np.moveaxis(ro.forward(rows, w, b)[0].reshape(2, 5, 7, 16), -1, 1)
    assert_half_close(y, ref, np.abs(ref) + 6, dt, "channels-first layer norm y")


# ---- layers --------------------------------------------------------------------------------------------------------

def test_layers_take_16_bit_input_with_float32_parameters(dt):
    x = sample((4, 6, 5, 5), dt, seed=13)
    for layer in (bn_simd.BatchNorm2d(6), bn_simd.GroupNorm(3, 6), bn_simd.InstanceNorm2d(6, affine=True),
                  bn_simd.LayerNorm((5, 5))):
        y = layer(x)
        assert y.dtype == dt, type(layer).__name__
        gx = layer.backward(np.ones_like(x))
        assert gx.dtype == dt and layer.grad_weight.dtype == np.float32, type(layer).__name__
    layer = bn_simd.BatchNorm2d(6)
    layer(x)
    assert layer.running_mean.dtype == np.float32 and layer.num_batches_tracked == 1
    layer.eval()
    assert layer(x).dtype == dt


# ---- rounding, range, determinism ----------------------------------------------------------------------------------

def test_overflow_to_inf_exactly_where_the_float32_result_passes_the_range(dt):
    top = float(np.finfo(np.float16).max) if dt.name == "float16" else 3.3895313892515355e38
    # y = (x - 0) * 2 + 0 with mean 0 and var + eps = 1: a float32 product, exact, then one rounding
    x = np.linspace(top / 2 * 0.98, top / 2 * 1.02, 4000).astype(dt).reshape(1, 1, -1)
    y = bn_simd.normalize(x, np.zeros(1), np.ones(1) - 1e-5, np.full(1, 2.0, np.float32), None)
    with np.errstate(over="ignore"):  # (NumPy's rounding overflows to Inf as the kernels must)
        want = (wide(x).astype(np.float32) * np.float32(2.0)).astype(dt)  # float32 result, one rounding
    assert np.array_equal(y.view(np.uint16), want.view(np.uint16))
    assert np.isinf(wide(y)).any() and np.isfinite(wide(y)).any()
    with np.errstate(over="ignore"):
        assert np.all(np.isinf(wide(y)) == (np.abs(wide(x) * 2) >= top + ulp(top, dt) / 2))


def test_subnormal_outputs_are_kept_not_flushed(dt):
    p, emin = FORMATS[dt.name]
    tiny = np.ldexp(1.0, emin - 3)  # a subnormal of the format
    x = (np.arange(1, 65, dtype=np.float64) * tiny).astype(np.float32).astype(dt).reshape(1, 1, -1)
    y = bn_simd.normalize(x, np.zeros(1), np.ones(1) - 1e-5, None, None)
    assert np.array_equal(y.view(np.uint16), x.view(np.uint16))


def test_nan_and_inf_inputs_stay_in_their_channel(dt):
    x = sample((2, 3, 8, 8), dt, seed=14)
    x[0, 1, 2, 3] = np.nan
    y = bn_simd.batch_norm(x, None, None, training=True)
    assert np.isnan(wide(y[:, 1])).all() and np.isfinite(wide(y[:, [0, 2]])).all()


def test_same_bits_for_any_thread_count_and_close_across_isas(dt):
    x = sample((8, 32, 40, 40), dt, seed=15)
    w, b = params(32)
    results = {}
    for threads in (1, 2, 3):
        with bn_simd.Context(num_threads=threads):
            results[threads] = (bn_simd.batch_norm(x, None, None, w, b, training=True),
                                bn_simd.group_norm(x, 8, w, b), bn_simd.layer_norm(x, (40, 40)))
    for t in (2, 3):
        for a, c in zip(results[1], results[t]):
            assert np.array_equal(a.view(np.uint16), c.view(np.uint16))
    with bn_simd.Context(isa="scalar"):
        s = bn_simd.batch_norm(x, None, None, w, b, training=True)
    # the scalar kernels round a * b + c twice, the vector ones once: the float32 results differ by an ulp of
    # float32 at most, so the 16-bit outputs by at most one ulp of theirs
    diff = np.abs(wide(s) - wide(results[1][0]))
    assert np.all(diff <= ulp(wide(s), dt))


# ---- PyTorch parity ------------------------------------------------------------------------------------------------

def test_parity_with_pytorch_in_the_same_dtype(dt):
    torch = pytest.importorskip("torch")
    tdt = torch.float16 if dt.name == "float16" else torch.bfloat16
    x = sample((4, 16, 12, 12), dt, seed=16)
    w, b = params(16)
    xt = torch.from_numpy(wide(x).astype(np.float32)).to(tdt)
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    F = torch.nn.functional
    cases = [
        (bn_simd.batch_norm(x, None, None, w, b, training=True), F.batch_norm(xt, None, None, wt, bt, training=True)),
        (bn_simd.batch_norm(x, np.full(16, 0.5, np.float32), np.full(16, 2, np.float32), w, b),
         F.batch_norm(xt, torch.full((16,), 0.5), torch.full((16,), 2.0), wt, bt)),
        (bn_simd.group_norm(x, 4, w, b), F.group_norm(xt, 4, wt, bt)),
        (bn_simd.layer_norm(x, (12, 12)), F.layer_norm(xt, (12, 12))),
    ]  # (not instance_norm: PyTorch's, a batch norm of the reshaped input, differed by 5 bfloat16 ulp at one element)
    for i, (ours, theirs) in enumerate(cases):
        t = theirs.float().numpy().astype(np.float64)
        assert np.all(np.abs(wide(ours) - t) <= ulp(t, dt)), f"case {i}"


# ---- what is refused -----------------------------------------------------------------------------------------------

def test_calls_without_16_bit_kernels_refuse_it_with_a_type_error(dt):
    x = sample((4, 3, 4, 4), dt)
    c = np.ones(3, np.float32)
    calls = [
        lambda: bn_simd.backward_apply(x, x, c, c, c, c),
        lambda: bn_simd.batch_moments(x),
        lambda: bn_simd.batch_norm(x, None, None, training=True, mask=np.ones((4, 4, 4))),
        lambda: bn_simd.virtual_batch_norm_forward(x, virtual_batch_size=2),
        lambda: bn_simd.BatchNorm2d(3, dtype=dt),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(TypeError):
            call()


def test_grad_out_must_have_x_dtype(dt):
    x = sample((4, 3, 4, 4), dt)
    _, m, s = bn_simd.batch_norm_forward(x)
    with pytest.raises(TypeError, match="grad_out"):
        bn_simd.batch_norm_backward(x.astype(np.float32), x, m, s)


def test_ml_dtypes_is_not_imported_by_bn_simd():
    code = ("import sys, numpy as np, bn_simd; bn_simd.batch_norm(np.ones((2, 3, 4), np.float16), None, None, "
            "training=True); print('ml_dtypes' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


# ---- memory, out=, inputs ------------------------------------------------------------------------------------------

def _unusual(x, kind):
    if kind == "fortran":
        return np.asfortranarray(x)
    if kind == "strided":
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if kind == "read-only":
        r = x.copy()
        r.flags.writeable = False
        return r
    if kind == "unaligned":
        buf = np.zeros(x.nbytes + 1, np.uint8)
        u = buf[1:].view(x.dtype).reshape(x.shape)
        u[...] = x
        return u
    if kind == "byte-swapped":
        return x.astype(x.dtype.newbyteorder(">"))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["fortran", "strided", "read-only", "unaligned", "byte-swapped"])
def test_unusual_memory_gives_the_bytes_of_a_contiguous_copy(dt, kind):
    if kind == "byte-swapped" and dt.name == "bfloat16":
        pytest.skip("ml_dtypes' bfloat16 has one byte order")
    x = sample((3, 4, 6, 5), dt, seed=17)
    w, b = params(4)
    u = _unusual(x, kind)
    for f in (lambda a: bn_simd.batch_norm(a, None, None, w, b, training=True),
              lambda a: bn_simd.group_norm(a, 2, w, b), lambda a: bn_simd.layer_norm(a, (6, 5))):
        want, got = f(x), f(u)
        assert got.dtype == dt and np.array_equal(got.view(np.uint16), want.view(np.uint16)), kind


def test_out_separate_and_in_place_give_the_same_bytes_and_inputs_stay(dt):
    x = sample((4, 6, 7, 7), dt, seed=18)
    w, b = params(6)
    x0 = x.copy()
    want = bn_simd.batch_norm(x, None, None, w, b, training=True)
    assert np.array_equal(x.view(np.uint16), x0.view(np.uint16))  # (the input is not written)
    out = np.empty_like(x)
    assert bn_simd.batch_norm(x, None, None, w, b, training=True, out=out) is out
    assert np.array_equal(out.view(np.uint16), want.view(np.uint16))
    xi = x.copy()
    bn_simd.batch_norm(xi, None, None, w, b, training=True, out=xi)
    assert np.array_equal(xi.view(np.uint16), want.view(np.uint16))
    with pytest.raises(TypeError, match="out"):
        bn_simd.batch_norm(x, None, None, w, b, training=True, out=np.empty(x.shape, np.float32))


def test_a_refused_call_changes_no_running_statistic(dt):
    x = sample((4, 3, 5), dt, seed=19)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError):
        bn_simd.batch_norm(x, rm, rv, np.ones(4, np.float32), training=True)
    with pytest.raises(TypeError):
        bn_simd.batch_norm(x, rm, rv, training=True, out=np.empty(x.shape, np.float64))
    assert np.array_equal(rm, np.zeros(3)) and np.array_equal(rv, np.ones(3))


@pytest.mark.parametrize("C,spatial", [(1, 33), (7, 9), (9, 17), (17, 15), (33, 1), (300, 2)])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_sizes_around_the_vector_width(dt, C, spatial, layout):
    shape = (3, C, spatial) if layout == "NCHW" else (3, spatial, C)
    x = sample(shape, dt, seed=C + spatial)
    dy = sample(shape, dt, seed=C * spatial, scale=1, shift=0)
    w, b = params(C)
    y, mean, invstd = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    ref, m64, v64 = oracle.forward_train(wide(x), w, b, layout=layout)
    xhat = np.abs(oracle.normalize(wide(x), m64, v64, layout=layout))
    assert_half_close(y, ref, np.abs(ref) + 2 * xhat + 1, dt, "y")
    gx, _, _ = bn_simd.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
    dx, dw, db = oracle.backward(wide(dy), wide(x), mean, invstd, w, layout=layout)
    n = x.size // C
    sums = (np.abs(db).max() + 8 * np.abs(dw).max()) / n
    mag = np.abs(dx) + 8 * (np.abs(w) * invstd).max() * (np.abs(wide(dy)) + sums)
    assert_half_close(gx, dx, mag, dt, "grad_x")


def test_torch_float16_tensors_are_read_as_numpy_float16_and_bfloat16_ones_refused():
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 3, 5).half()
    y = bn_simd.batch_norm(t, None, None, training=True)
    assert y.dtype == np.float16
    assert np.array_equal(y.view(np.uint16), bn_simd.batch_norm(t.numpy(), None, None, training=True).view(np.uint16))
    with pytest.raises(TypeError, match="bn_simd.torch"):
        bn_simd.batch_norm(t.bfloat16(), None, None, training=True)


def test_16_bit_parameters_are_read_by_widening(dt):
    """Parameters of any float dtype are read as float64 (documented): 16-bit ones give the results of their exact
    float32 values, and the parameter gradients have the weight's dtype."""
    x = sample((4, 5, 6), dt, seed=20)
    dy = sample((4, 5, 6), dt, seed=21, scale=1, shift=0)
    w, b = params(5)
    w16, b16 = w.astype(dt), b.astype(dt)
    w32, b32 = wide(w16).astype(np.float32), wide(b16).astype(np.float32)
    y16, m, s = bn_simd.batch_norm_forward(x, w16, b16)
    y32 = bn_simd.batch_norm_forward(x, w32, b32)[0]
    assert np.array_equal(y16.view(np.uint16), y32.view(np.uint16))
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x, m, s, w16)
    assert gx.dtype == dt and gw.dtype == dt and gb.dtype == dt
    assert np.array_equal(bn_simd.layer_norm(x, 6, wide(params(6)[0].astype(dt))).view(np.uint16),
                          bn_simd.layer_norm(x, 6, params(6)[0].astype(dt)).view(np.uint16))


def test_other_two_byte_dtypes_are_refused():
    with pytest.raises(TypeError, match="x must have dtype"):
        bn_simd.batch_norm(np.zeros((4, 3, 2), "V2"), None, None, training=True)
    with pytest.raises(TypeError, match="x must have dtype"):
        bn_simd.group_norm(np.zeros((4, 4, 2), np.int16), 2)


@pytest.mark.parametrize("op", ["batch_train", "batch_eval", "group", "instance"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_an_infinity_in_one_channel_leaves_the_others_bits_with_a_fused_residual(name, layout, op):
    """An Inf in x poisons its channel (group) only. It used to send the whole call to the float64 apply, whose
    16-bit result the fused residual and activation then read: the other channels' outputs rounded twice."""
    dt = half_dtype(name)
    shape = (2, 6, 3, 5) if layout == "NCHW" else (2, 3, 5, 6)
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape).astype(dt)
    r = (rng.standard_normal(shape) * 0.9).astype(dt)
    bad = x.copy()
    bad[(0, 2, 1, 1) if layout == "NCHW" else (0, 1, 1, 2)] = np.inf
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    kw = dict(activation="relu", residual=r, layout=layout)

    def call(a):
        if op == "batch_train":
            return bn_simd.batch_norm(a, None, None, training=True, **kw)
        if op == "batch_eval":
            a = a.copy()
            return bn_simd.batch_norm(a, rm, rv, training=False, **kw)
        if op == "group":
            return bn_simd.group_norm(a, 6, **kw)
        return bn_simd.instance_norm(a, **kw)

    with np.errstate(invalid="ignore"):
        clean, poisoned = call(x), call(bad)
    ch = (slice(None), [0, 1, 3, 4, 5]) if layout == "NCHW" else (..., [0, 1, 3, 4, 5])
    if op == "batch_eval":  # (running statistics: only the Inf itself differs)
        keep = np.isfinite(bad.astype(np.float32))
        np.testing.assert_array_equal(poisoned[keep].astype(np.float32), clean[keep].astype(np.float32))
        return
    np.testing.assert_array_equal(poisoned[ch].astype(np.float32), clean[ch].astype(np.float32))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_a_16_bit_dtype_for_a_layers_parameters_says_how_16_bit_data_go(half):
    """dtype= of a layer's parameters is float32 or float64: a 16-bit dtype is refused with the rule (16-bit data go
    through a layer of float32 parameters) and the calls that take 16-bit data."""
    dt = np.float16 if half == "float16" else pytest.importorskip("ml_dtypes").bfloat16
    for make in (lambda: bn_simd.BatchNorm2d(3, dtype=dt), lambda: bn_simd.LayerNorm(3, dtype=dt),
                 lambda: bn_simd.GroupNorm(1, 3, dtype=dt)):
        with pytest.raises(TypeError, match=rf"dtype must be float32 or float64, got {half} \(.*float32 parameters"):
            make()
