"""Fused epilogues: y = act(norm(x) + residual) in the normalise sweep (activation=, residual=).

Against the unfused composition: float64 the same values (bitwise for the piecewise-linear activations: the kernel adds
and clamps the same doubles; SiLU within a few ulp, its exp being the library's own), float32 bitwise for the
piecewise-linear ones (the composition in float32 NumPy) and within SiLU's rounding, both also against the float64
oracle; 16-bit within an ulp of the oracle. Backward against central differences of the forward, and against the
oracle's BN backward fed du = dz act'(u). Refusals name the argument and write nothing; the same bits for any thread
count; the other ops of the family apply the epilogue after their normalisation.
"""
import numpy as np
import pytest

import bn_simd
from bn_simd import _core
import oracle

ACTS = ["relu", "relu6", ("leaky_relu", 0.2), ("clamp", -0.5, 0.75), "silu"]
PIECEWISE = ACTS[:4]


def act_np(act, u):
    """The activation in NumPy, in u's dtype (the composition a user would write)."""
    t = u.dtype.type
    if act == "relu":
        return np.maximum(u, t(0))
    if act == "relu6":
        return np.minimum(np.maximum(u, t(0)), t(6))
    if act == "silu":
        return u / (t(1) + np.exp(-u))
    name = act[0]
    if name == "leaky_relu":
        return np.where(u > 0, u, u * t(act[1]))
    return np.minimum(np.maximum(u, t(act[1])), t(act[2]))


def grad_np(act, u):
    """act'(u) in float64, PyTorch's choice at the kinks, at +-Inf and at NaN (relu: threshold_backward, u <= 0 ? 0 : 1;
    relu6 and clamp: hardtanh_backward's vectorized form, lo < u < hi ? 1 : 0, lo = -inf and hi = +inf no bounds;
    leaky relu: u > 0 ? 1 : slope)."""
    if act == "relu":
        return (~(u <= 0)).astype(np.float64)
    if act == "relu6":
        return ((u > 0) & (u < 6)).astype(np.float64)
    if act == "silu":
        s = 1.0 / (1.0 + np.exp(-u))
        return s * (1.0 + u * (1.0 - s))
    if act[0] == "leaky_relu":
        return np.where(u > 0, 1.0, act[1])
    lo = -np.inf if act[1] is None else act[1]
    hi = np.inf if act[2] is None else act[2]
    return (~((lo != -np.inf) & (u <= lo)) & ((hi == np.inf) | (u < hi))).astype(np.float64)


def make(shape, dtype, seed=0, C=None):
    rng = np.random.default_rng(seed)
    x = (0.5 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    C = C or shape[1]
    w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    b = rng.standard_normal(C)
    rm, rv = 0.5 + rng.standard_normal(C), rng.uniform(1.0, 8.0, C)
    return x, r, w, b, rm, rv


CASES = [((4, 8, 9, 7), "NCHW"), ((4, 9, 7, 8), "NHWC"), ((3, 5, 130), "NCHW"), ((64, 24), "NHWC")]


@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("training", [False, True])
def test_fused_equals_the_unfused_composition(shape, layout, dtype, training):
    C = shape[1] if layout == "NCHW" else shape[-1]
    x, r, w, b, rm, rv = make(shape, dtype, C=C)
    plain = bn_simd.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training, layout=layout)
    for act in ACTS:
        for res in (None, r):
            rm1, rv1 = rm.copy(), rv.copy()
            y = bn_simd.batch_norm(x, rm1, rv1, w, b, training=training, layout=layout, activation=act, residual=res)
            assert y.dtype == x.dtype
            u = plain + res if res is not None else plain
            want = act_np(act, u)
            if act in PIECEWISE:
                np.testing.assert_array_equal(y, want, err_msg=f"{act} residual={res is not None}")
            else:
                ulps = np.finfo(dtype).eps * (np.abs(want) + np.finfo(dtype).tiny)
                assert np.all(np.abs(y - want) <= 4 * ulps + 4 * np.finfo(dtype).eps * np.abs(u)), act
            if training:  # the running statistics move as without the epilogue
                rm2, rv2 = rm.copy(), rv.copy()
                bn_simd.batch_norm(x, rm2, rv2, w, b, training=True, layout=layout)
                np.testing.assert_array_equal(rm1, rm2)
                np.testing.assert_array_equal(rv1, rv2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_against_the_float64_oracle(dtype):
    x, r, w, b, rm, rv = make((6, 5, 11, 3), dtype, seed=3)
    y64 = oracle.inference(x.astype(np.float64), rm, rv, w, b, 1e-5, "NCHW")
    for act in ACTS:
        y = bn_simd.batch_norm(x, rm, rv, w, b, activation=act, residual=r)
        u = y64 + r.astype(np.float64)
        want = act_np(act, u)
        eps = np.finfo(dtype).eps
        bound = 8 * eps * (np.abs(u) + np.abs(y64) + 1.0)
        assert np.all(np.abs(y.astype(np.float64) - want) <= bound), act


def test_half_storage_within_an_ulp_of_the_oracle():
    for dt in [np.dtype(np.float16)] + ([np.dtype(pytest.importorskip("ml_dtypes").bfloat16)]):
        x, r, w, b, rm, rv = make((4, 6, 10, 10), np.float32, seed=5)
        xh, rh = x.astype(dt), r.astype(dt)
        refs = {False: oracle.inference(xh.astype(np.float64), rm, rv, w, b, 1e-5, "NCHW"),
                True: oracle.forward_train(xh.astype(np.float64), w, b, 1e-5, "NCHW")[0]}
        for act in ACTS:
            for training in (False, True):
                y64 = refs[training]
                y = bn_simd.batch_norm(xh, rm.copy(), rv.copy(), w, b, training=training, activation=act,
                                       residual=rh)
                assert y.dtype == dt
                want = act_np(act, y64 + rh.astype(np.float64))
                ulp = np.spacing(np.abs(want).astype(dt)).astype(np.float64)
                bound = ulp + 1e-5 * (np.abs(y64) + np.abs(want) + 1.0)
                assert np.all(np.abs(y.astype(np.float64) - want) <= bound), (dt, act, training)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_same_bits_for_any_thread_count(threads, layout):
    shape = (8, 32, 24, 24) if layout == "NCHW" else (8, 24, 24, 32)
    x, r, w, b, rm, rv = make(shape, np.float32, seed=7, C=32)
    g = np.random.default_rng(8).standard_normal(shape).astype(np.float32)
    got = []
    for n in (1, 2, 3):
        threads(n)
        y = bn_simd.batch_norm(x, rm, rv, w, b, layout=layout, activation="silu", residual=r)
        y2, m, s, st = bn_simd.batch_norm_forward(x, w, b, layout=layout, activation=("leaky_relu", 0.1), residual=r)
        grads = bn_simd.batch_norm_backward(g, x, m, s, w, layout=layout, activation=("leaky_relu", 0.1), residual=r,
                                            bias=b, save_stats=st)
        got.append((y, y2) + tuple(grads))
    for k in (1, 2):
        for a, bb in zip(got[0], got[k]):
            np.testing.assert_array_equal(a, bb)


def test_every_isa_within_an_ulp(isa):
    x, r, w, b, rm, rv = make((4, 16, 13, 13), np.float32, seed=9)
    plain = bn_simd.batch_norm(x, rm, rv, w, b)
    for act in ACTS:
        y = bn_simd.batch_norm(x, rm, rv, w, b, activation=act, residual=r)
        want = act_np(act, plain + r)
        assert np.all(np.abs(y - want) <= 4 * np.finfo(np.float32).eps * (np.abs(want) + np.abs(plain) + 1)), act


# ---- backward ----

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("act", ACTS)
def test_backward_against_central_differences(layout, act):
    shape = (3, 4, 3, 5) if layout == "NCHW" else (3, 3, 5, 4)
    x, r, w, b, _, _ = make(shape, np.float64, seed=11, C=4)
    g = np.random.default_rng(12).standard_normal(shape)

    def loss(xx, rr, ww, bb):
        return np.sum(g * bn_simd.batch_norm_forward(xx, ww, bb, layout=layout, activation=act, residual=rr)[0])

    y, m, s, st = bn_simd.batch_norm_forward(x, w, b, layout=layout, activation=act, residual=r)
    gx, gw, gb, gr = bn_simd.batch_norm_backward(g, x, m, s, w, layout=layout, activation=act, residual=r, bias=b,
                                                 save_stats=st)
    nx = oracle.central_difference(lambda a: loss(a, r, w, b), x)
    nr = oracle.central_difference(lambda a: loss(x, a, w, b), r)
    nw = oracle.central_difference(lambda a: loss(x, r, a, b), w)
    nb = oracle.central_difference(lambda a: loss(x, r, w, a), b)
    for got, want, what in ((gx, nx, "grad_x"), (gr, nr, "grad_residual"), (gw, nw, "grad_weight"),
                            (gb, nb, "grad_bias")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_is_the_oracle_backward_of_du(dtype):
    x, r, w, b, rm, rv = make((5, 6, 8, 8), dtype, seed=13)
    g = np.random.default_rng(14).standard_normal(x.shape).astype(dtype)
    for training in (True, False):
        for act in ACTS:
            if training:
                y, m, s, st = bn_simd.batch_norm_forward(x, w, b, activation=act, residual=r)
                mean, var = st
            else:
                mean, var, st, m, s = rm, rv, (rm, rv), None, None
            gx, gw, gb, gr = bn_simd.batch_norm_backward(g, x, m, s, w, training=training, activation=act,
                                                         residual=r, bias=b, save_stats=st)
            u = oracle.normalize(x.astype(np.float64), mean, var, w, b) + r.astype(np.float64)
            du = g.astype(np.float64) * grad_np(act, u)
            dx, dw, db = oracle.backward(du, x.astype(np.float64), mean, oracle.invstd(var), w, "NCHW", training)
            eps = np.finfo(dtype).eps
            n = x.size // x.shape[1]
            kink = np.abs(u) < 1e3 * eps  # (u within rounding of a kink: the mask may go either way)
            assert np.all(np.abs(gr - du)[~kink] <= 8 * eps * (np.abs(du[~kink]) + 1)), (act, training)
            if not kink.any():
                np.testing.assert_allclose(gx, dx, rtol=0, atol=2e3 * n * eps * (np.abs(dx).max() + 1))
                np.testing.assert_allclose(gw, dw, rtol=0, atol=2e3 * n * eps * (np.abs(dw).max() + 1))
                np.testing.assert_allclose(gb, db, rtol=0, atol=2e3 * n * eps * (np.abs(db).max() + 1))


def test_layer_with_an_activation_trains_and_differentiates():
    x, r, w, b, _, _ = make((4, 6, 5, 5), np.float32, seed=15)
    g = np.random.default_rng(16).standard_normal(x.shape).astype(np.float32)
    fused = bn_simd.BatchNorm2d(6, activation="relu")
    plain = bn_simd.BatchNorm2d(6)
    for layer in (fused, plain):
        layer.weight[:] = w
        layer.bias[:] = b
    y = fused(x, residual=r)
    np.testing.assert_array_equal(y, np.maximum(plain(x) + r, np.float32(0)))
    np.testing.assert_array_equal(fused.running_mean, plain.running_mean)
    assert fused.num_batches_tracked == plain.num_batches_tracked == 1
    u = plain._saved
    gx = fused.backward(g)
    du = np.where(y > 0, g, np.float32(0))
    np.testing.assert_array_equal(fused.grad_residual, du)
    gx2 = plain.backward(du)
    np.testing.assert_allclose(gx, gx2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused.grad_weight, plain.grad_weight, rtol=1e-5, atol=1e-4)
    assert u is not None
    fused.eval()
    plain.eval()
    np.testing.assert_array_equal(fused(x), np.maximum(plain(x), np.float32(0)))
    fused.backward(g)
    assert fused.grad_residual is None


# ---- refusals ----

def test_unknown_or_malformed_activation_is_refused_naming_it():
    x, r, w, b, rm, rv = make((2, 3, 4), np.float32)
    out = np.full_like(x, 7.0)
    for bad, exc in (("gelu", ValueError), (("leaky_relu", "a"), TypeError), (("clamp", 2.0, 1.0), ValueError),
                     (("clamp", 0.0), ValueError), (("leaky_relu", np.inf), ValueError), (3, TypeError),
                     (("relu", 1.0), ValueError), (("clamp", np.nan, 1.0), ValueError)):
        with pytest.raises(exc, match="activation"):
            bn_simd.batch_norm(x, rm, rv, w, b, out=out, activation=bad)
        with pytest.raises(exc, match="activation"):
            bn_simd.BatchNorm1d(3, activation=bad)
    assert np.all(out == 7.0)


def test_bad_residual_is_refused_naming_it_and_nothing_is_written():
    x, r, w, b, rm, rv = make((2, 3, 4), np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    out = np.full_like(x, 7.0)
    cases = ((r[:, :2], ValueError, "residual"), (r.astype(np.float64), TypeError, "residual"),
             (r.transpose(0, 2, 1), ValueError, "residual"), ("r", TypeError, "residual"),
             (out, ValueError, "residual must not share memory with out"))
    for bad, exc, pat in cases:
        for training in (False, True):
            with pytest.raises(exc, match=pat):
                bn_simd.batch_norm(x, rm, rv, w, b, training=training, out=out, activation="relu", residual=bad)
        with pytest.raises(exc, match=pat):
            bn_simd.batch_norm_forward(x, w, b, out=out, activation="relu", residual=bad)
    assert np.all(out == 7.0)
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    with pytest.raises(ValueError, match="save_stats"):
        bn_simd.batch_norm_backward(x, x, None, None, w, activation="relu", residual=r)
    with pytest.raises(ValueError, match="mask"):
        bn_simd.batch_norm(x, rm, rv, w, b, training=True, activation="relu", mask=np.ones((2, 4)))


def test_a_residual_in_another_memory_order_is_read_as_its_values():
    x, r, w, b, rm, rv = make((3, 4, 5, 6), np.float64)
    rf = np.asfortranarray(r)
    np.testing.assert_array_equal(bn_simd.batch_norm(x, rm, rv, w, b, activation="relu", residual=rf),
                                  bn_simd.batch_norm(x, rm, rv, w, b, activation="relu", residual=r))


def test_nan_and_inf_pass_as_in_the_composition():
    x, r, w, b, rm, rv = make((2, 3, 20), np.float32)
    r[0, 0, :4] = [np.nan, np.inf, -np.inf, 0]
    plain = bn_simd.batch_norm(x, rm, rv, w, b)
    with np.errstate(all="ignore"):
        for act in ACTS:
            y = bn_simd.batch_norm(x, rm, rv, w, b, activation=act, residual=r)
            want = act_np(act, plain + r)
            np.testing.assert_array_equal(np.isnan(y), np.isnan(want), err_msg=str(act))
            fin = np.isfinite(want)
            np.testing.assert_array_equal(np.isinf(y), np.isinf(want), err_msg=str(act))
            assert np.allclose(y[fin], want[fin], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["batch", "group", "layer"])
def test_gradients_at_infinite_and_nan_u_are_pytorchs(op):
    """u = normalised x + residual at +-Inf and NaN (the residual's values), eval-mode statistics for batch norm: du
    and grad_x are PyTorch's autograd of the unfused composition (relu passes dz at +Inf and NaN, leaky relu gives dz
    at +Inf and slope dz at -Inf and NaN, relu6 and clamp Hardtanh's, 0 at NaN as its vectorized backward gives; an
    unbounded clamp side no kink: clamp(lo, None) a shifted relu)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(29)
    x = rng.standard_normal((2, 4, 6))
    r = rng.standard_normal(x.shape)
    r[0, 1, :5] = [np.inf, -np.inf, np.nan, 0.0, 6.0]
    g = rng.standard_normal(x.shape)
    w, b = rng.uniform(0.5, 2.0, 4), rng.standard_normal(4)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    torch_act = {"relu": torch.relu, "relu6": torch.nn.functional.relu6,
                 ("leaky_relu", 0.2): lambda t: torch.nn.functional.leaky_relu(t, 0.2),
                 ("clamp", -0.5, 0.75): lambda t: torch.nn.functional.hardtanh(t, -0.5, 0.75),
                 ("clamp", None, 0.75): lambda t: torch.where(t < 0.75, t, 0.75),
                 ("clamp", -0.5, None): lambda t: torch.where(t <= -0.5, -0.5, t),
                 ("clamp", np.inf, np.inf): lambda t: torch.nn.functional.hardtanh(t, np.inf, np.inf),
                 ("clamp", -np.inf, -np.inf): lambda t: torch.nn.functional.hardtanh(t, -np.inf, -np.inf)}
    for act, f in torch_act.items():
        xt, rt = torch.tensor(x, requires_grad=True), torch.tensor(r, requires_grad=True)
        if op == "batch":
            yt = torch.nn.functional.batch_norm(xt, torch.tensor(rm), torch.tensor(rv), torch.tensor(w),
                                                torch.tensor(b), training=False)
            gx, _, _, gr = bn_simd.batch_norm_backward(g, x, None, None, w, activation=act, residual=r, bias=b,
                                                       save_stats=(rm, rv), training=False)
        elif op == "group":
            yt = torch.nn.functional.group_norm(xt, 2, torch.tensor(w), torch.tensor(b))
            _, m, s, st = bn_simd.group_norm_forward(x, 2, w, b, activation=act, residual=r)
            gx, _, _, gr = bn_simd.group_norm_backward(g, x, m, s, 2, w, activation=act, residual=r, bias=b,
                                                       save_stats=st)
        else:
            lw, lb = w[:1].repeat(6), b[:1].repeat(6)
            yt = torch.nn.functional.layer_norm(xt, (6,), torch.tensor(lw), torch.tensor(lb))
            _, m, s, st = bn_simd.layer_norm_forward(x, 6, lw, lb, activation=act, residual=r)
            gx, _, _, gr = bn_simd.layer_norm_backward(g, x, m, s, 6, lw, lb, activation=act, residual=r,
                                                       save_stats=st)
        f(yt + rt).backward(torch.tensor(g))
        # (a clamp to [+inf, +inf] is the constant +inf; at a NaN u its gradient is the open upper side's, dz, where
        # Hardtanh's vectorized backward gives 0: that one element is left out)
        keep = ~np.isnan(r) if act == ("clamp", np.inf, np.inf) else np.ones(r.shape, bool)
        np.testing.assert_array_equal(gr[keep], rt.grad.numpy()[keep], err_msg=str(act))  # du, selected: exactly
        if keep.all():
            np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-12, atol=1e-12, err_msg=str(act))


def test_in_place_output_over_x():
    x, r, w, b, rm, rv = make((4, 8, 16, 16), np.float32)
    want = bn_simd.batch_norm(x, rm, rv, w, b, activation="relu6", residual=r)
    xx = x.copy()
    y = bn_simd.batch_norm(xx, rm, rv, w, b, out=xx, activation="relu6", residual=r)
    assert y is xx
    np.testing.assert_array_equal(xx, want)
    xx = x.copy()
    bn_simd.batch_norm(xx, rm.copy(), rv.copy(), w, b, training=True, out=xx, activation="silu")
    np.testing.assert_array_equal(xx, bn_simd.batch_norm(x, rm.copy(), rv.copy(), w, b, training=True,
                                                         activation="silu"))


# ---- the other ops' one-shot calls (forward only; tests/test_epilogue_ops.py has the rest) ----

def test_other_ops_one_shot_calls_take_the_epilogue():
    rng = np.random.default_rng(17)
    x = rng.standard_normal((3, 8, 5, 5)).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    calls = [(lambda **k: bn_simd.group_norm(x, 4, w, b, **k)), (lambda **k: bn_simd.instance_norm(x, **k)),
             (lambda **k: bn_simd.layer_norm(x, (5, 5), **k)), (lambda **k: bn_simd.rms_norm(x, (5,), **k))]
    for f in calls:
        plain = f()
        for act in ACTS:
            y = f(activation=act, residual=r)
            want = act_np(act, plain + r)
            if act in PIECEWISE:
                np.testing.assert_array_equal(y, want)
            else:
                np.testing.assert_allclose(y, want, rtol=4e-7, atol=4e-7)
        out = np.full_like(x, 3.0)
        with pytest.raises(ValueError, match="residual"):
            f(out=out, activation="relu", residual=r[:1])
        with pytest.raises(ValueError, match="activation"):
            f(out=out, activation="tanh")
        assert np.all(out == 3.0)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("path", ["fused", "sweep"])
def test_fused_backward_is_the_plain_backward_of_du(threads, layout, path):
    """float64 ReLU: du = dz where y > 0 exactly, and the backward through the epilogue gives the plain backward's
    bits of du, on the passes that compute du chunk by chunk (the slab path, the channels-last chunks) and on the
    sweep before the plain backward (no slab budget; a column split)."""
    from conftest import use_slab
    use_slab(1 << 20 if path == "fused" else 0)
    threads(2)
    shape = (16, 32, 20, 20) if layout == "NCHW" else ((16, 20, 20, 32) if path == "fused" else (4, 5, 5, 32))
    x, r, w, b, _, _ = make(shape, np.float64, seed=21, C=32)
    g = np.random.default_rng(22).standard_normal(shape)
    for res in (None, r):
        y, m, s, st = bn_simd.batch_norm_forward(x, w, b, layout=layout, activation="relu", residual=res)
        gx, gw, gb, gr = bn_simd.batch_norm_backward(g, x, m, s, w, layout=layout, activation="relu", residual=res,
                                                     bias=b, save_stats=st)
        du = np.where(y > 0, g, 0.0)
        px, pw, pb = bn_simd.batch_norm_backward(du, x, m, s, w, layout=layout)
        np.testing.assert_array_equal(gx, px)
        np.testing.assert_array_equal(gw, pw)
        np.testing.assert_array_equal(gb, pb)
        if res is not None:
            np.testing.assert_array_equal(gr, du)
        gx2 = g.copy()  # in place over grad_out
        bn_simd.batch_norm_backward(gx2, x, m, s, w, layout=layout, out=gx2, activation="relu", residual=res, bias=b,
                                    save_stats=st)
        np.testing.assert_array_equal(gx2, px)


def _same_bits_nan_aside(a, e):
    """a and e have NaN at the same places and the same bytes elsewhere. (Which NaN an FMA passes on, and so a NaN's
    sign, follows the operand order the compiler chose in each kernel: a channel that is NaN through its statistics
    may get NaNs of either sign from two paths.)"""
    a, e = np.asarray(a), np.asarray(e)
    nan = np.isnan(a.astype(np.float64))
    return np.array_equal(nan, np.isnan(e.astype(np.float64))) and a[~nan].tobytes() == e[~nan].tobytes()


def _backward_paths_have_the_same_bits(backward, g, x, msg):
    """backward(g, x, out=None) (a training backward through an activation: its grad_x, grad_weight, grad_bias first)
    with du stored (_core.set_act_otf(False)) against: the library's rule (which computes du where it reads it in the
    16-bit dtypes within the cache, and in group norm's), du computed wherever the kernels can (set_act_otf(True)), and
    streamed stores from 0 bytes (the paths beyond the last-level cache) by the rule, into a separate out, over g and
    over x; byte for byte (NaN aside: _same_bits_nan_aside). Returns the streamed call's (grad_x, grad_weight,
    grad_bias)."""
    _core.set_stream_bytes(None)
    try:
        _core.set_act_otf(False)
        want = backward(g, x)[:3]
        _core.set_act_otf(True)
        forced = backward(g, x)[:3]
        _core.set_act_otf(None)
        rule = backward(g, x)[:3]
        _core.set_stream_bytes(0)
        got = backward(g, x)[:3]
        g2, x2 = g.copy(), x.copy()
        backward(g2, x, out=g2)
        backward(g, x2, out=x2)
    finally:
        _core.set_stream_bytes(None)
        _core.set_act_otf(None)
    for a, e, f, r in zip(got, want, forced, rule):
        assert _same_bits_nan_aside(a, e), msg
        assert _same_bits_nan_aside(f, e), msg
        assert _same_bits_nan_aside(r, e), msg
    assert _same_bits_nan_aside(g2, want[0]), msg
    assert _same_bits_nan_aside(x2, want[0]), msg
    return got


def _half_or_skip(name):
    return np.dtype(np.float16) if name == "float16" else np.dtype(pytest.importorskip("ml_dtypes").bfloat16)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("path", ["slab", "sweeps"])
def test_backward_without_du_has_the_bits_of_the_backward_on_du(threads, dtype, path):
    """Long channels-first maps beyond the last-level cache (forced here: streamed stores from 0 bytes), through ReLU
    or a piecewise-linear activation without a residual (in the 16-bit dtypes those of slope 1, whose du is exact in
    them; leaky ReLU keeps the stored du there), compute du in the sums and again in the dx sweep instead of storing it
    (seg_bwd_sums_act, seg_bwd_apply_act), as the 16-bit dtypes do within the cache too: the same bits as the backward
    that stores it (forced), on the slab path and the two sweeps, over a separate out, over grad_out and over x; and
    for float64 ReLU the plain backward of du = dz where y > 0."""
    from conftest import use_slab
    dtype = np.dtype(dtype) if dtype in ("float32", "float64") else _half_or_skip(dtype)
    use_slab(1 << 20 if path == "slab" else 0)
    threads(2)
    shape = (6, 8, 32, 40)  # (maps of 1280 elements: the kernels' blocks of 256, and none left over)
    x, _, w, b, _, _ = make(shape, dtype, seed=31, C=8)
    g = np.random.default_rng(32).standard_normal(shape).astype(dtype)
    x[1, 2, 0, :3] = [np.nan, np.inf, -np.inf]  # (non-finite values: their channels' gradients NaN alike)
    g[2, 5, 3, 4] = np.inf
    for shp in (shape, (5, 8, 31, 41)):  # (and 1271: runs ending in a partial block and a tail)
        cut = (slice(shp[0]), slice(None), slice(shp[2]), slice(shp[3]))
        xs, gs = np.ascontiguousarray(x[cut]), np.ascontiguousarray(g[cut])
        for act in ("relu", ("leaky_relu", 0.2), "relu6", ("clamp", -0.5, 0.75)):
            y, m, s, st = bn_simd.batch_norm_forward(xs, w, b, activation=act)
            got = _backward_paths_have_the_same_bits(
                lambda g_, x_, out=None: bn_simd.batch_norm_backward(g_, x_, m, s, w, out=out, activation=act, bias=b,
                                                                     save_stats=st), gs, xs, f"{act} {shp}")
            if act == "relu" and dtype == np.float64:  # (float32's saved statistics are float32: other coefficients)
                # (PyTorch's relu backward: dz where y <= 0 is false, y NaN and +Inf included)
                px = bn_simd.batch_norm_backward(np.where(y <= 0, 0, gs).astype(dtype), xs, m, s, w)
                for a, e in zip(got, px):
                    np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_group_norm_backward_without_du_has_the_bits_of_the_backward_on_du(threads, dtype, layout):
    """Group and instance norm's backward through ReLU or a piecewise-linear activation without a residual
    (channels-first on maps of 1024 elements and more; channels-last a sample at a time) compute du in the sums and
    again in the dx sweep (in the 16-bit dtypes for the activations of slope 1): the same bits as storing du in the
    thread's scratch (forced: _core.set_act_otf(False)), into a separate out, over grad_out and over x, on 1 and 2
    threads, runs ending in a partial block and a tail, channel counts that take every kind of channels-last strip,
    non-finite values included; leaky ReLU (which keeps the stored du in 16 bits) too."""
    dtype = np.dtype(dtype) if dtype in ("float32", "float64") else _half_or_skip(dtype)
    rng = np.random.default_rng(51)
    # (channels-first maps of 1280 and 1271 elements; channels-last 4 samples, for two threads' sample path)
    shapes = ((3, 8, 32, 40), (2, 6, 31, 41)) if layout == "NCHW" else ((4, 9, 11, 64), (4, 7, 3, 40))
    for shape in shapes:
        C = shape[1] if layout == "NCHW" else shape[-1]
        x = (0.3 + rng.standard_normal(shape)).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        x[1, 2, 0, :3] = [np.nan, np.inf, -np.inf]
        g[0, 3, 2, 5] = np.inf
        w, b = rng.uniform(0.5, 2, C) * rng.choice([-1.0, 1.0], C), rng.standard_normal(C)
        for groups, nt in ((2, 1), (C // 2, 2), (C, 2)):
            threads(nt)
            for act in ("relu", ("leaky_relu", 0.2), "relu6", ("clamp", -0.5, 0.75)):
                _, m, s, st = bn_simd.group_norm_forward(x, groups, w, b, activation=act, layout=layout)
                _backward_paths_have_the_same_bits(
                    lambda g_, x_, out=None: bn_simd.group_norm_backward(g_, x_, m, s, groups, w, out=out,
                                                                         activation=act, bias=b, save_stats=st,
                                                                         layout=layout),
                    g, x, f"{act} {shape} groups {groups} threads {nt}")
            if groups == C and nt == 2:  # instance norm's own call takes the same path
                _, m, s, st = bn_simd.instance_norm_forward(x, weight=w, bias=b, activation="relu", layout=layout)
                _backward_paths_have_the_same_bits(
                    lambda g_, x_, out=None: bn_simd.instance_norm_backward(g_, x_, m, s, w, out=out, activation="relu",
                                                                            bias=b, save_stats=st, layout=layout),
                    g, x, f"instance norm {shape}")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backward_through_relu_with_a_nan_bias_keeps_the_forward_activation(threads, dtype, layout):
    """A NaN in the bias makes the forward's coefficients of its channel NaN (every y NaN, so ReLU passes dz): the
    backward through the activation keeps that, on every path the rule or the knob picks (batch norm within and
    beyond the cache, group and instance norm): the bits of the backward that stores du, which PyTorch's autograd
    agrees with (the kernels without du would rebuild u from the mean instead)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(61)
    shape = (4, 4, 32, 40) if layout == "NCHW" else (4, 32, 40, 4)
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w, b = rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    b[1] = np.nan
    threads(2)
    _, m, s, st = bn_simd.batch_norm_forward(x, w, b, activation="relu", layout=layout)
    calls = [lambda g_, x_, out=None: bn_simd.batch_norm_backward(g_, x_, m, s, w, out=out, activation="relu", bias=b,
                                                                  save_stats=st, layout=layout)]
    for groups in (2, 4):
        _, gm, gs, gst = bn_simd.group_norm_forward(x, groups, w, b, activation="relu", layout=layout)
        calls.append(lambda g_, x_, out=None, gm=gm, gs=gs, gst=gst, groups=groups: bn_simd.group_norm_backward(
            g_, x_, gm, gs, groups, w, out=out, activation="relu", bias=b, save_stats=gst, layout=layout))
    for call in calls:
        got = _backward_paths_have_the_same_bits(call, g, x, "NaN bias")
        ch = (slice(None), 1) if layout == "NCHW" else (Ellipsis, 1)
        assert np.isfinite(got[0][ch].astype(np.float64)).all()  # (the NaN channel's dx: dz passed through ReLU)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_channels_last_backward_without_du_has_the_same_bits(threads, dtype):
    """Channels-last arrays beyond the last-level cache (forced here: streamed stores from 0 bytes), through ReLU or a
    piecewise-linear activation without a residual: the sums and the dx sweep compute du where they read it
    (cl_bwd_sums_act, cl_bwd_apply_act) instead of storing it over dx, in the 16-bit dtypes for ReLU, ReLU6 and clamp,
    whose du is exact in them. The same bits as the backward that stores du (forced), with separate,
    grad_out and x outputs, on 1 and 2 threads, channel counts that take every kind of strip, non-finite values
    included; leaky ReLU and SiLU (which keep the stored du) too."""
    dtype = np.dtype(dtype) if dtype in ("float32", "float64") else _half_or_skip(dtype)
    rng = np.random.default_rng(41)
    for shape in ((3, 9, 11, 64), (2, 40, 40, 33), (70, 1, 1, 300), (5, 7, 3, 16)):
        C = shape[-1]
        x = rng.standard_normal(shape).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        x[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]
        g.reshape(-1, C)[1, :2] = [np.inf, np.nan]
        w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
        for nt in (1, 2):
            threads(nt)
            for act in ("relu", ("leaky_relu", 0.2), "relu6", ("clamp", -0.5, 1.0), "silu"):
                y, m, s, st = bn_simd.batch_norm_forward(x, w, b, layout="NHWC", activation=act)
                _backward_paths_have_the_same_bits(
                    lambda g_, x_, out=None: bn_simd.batch_norm_backward(g_, x_, m, s, w, out=out, layout="NHWC",
                                                                         activation=act, bias=b, save_stats=st),
                    g, x, f"{act} {shape} {nt}")


def test_extreme_channels_take_the_float64_apply_with_the_epilogue():
    """float32 data whose mean is ~1e35 takes the float64 apply (norm_params' wide case): the epilogue follows it
    (forward) and the backward recomputes u from its result."""
    rng = np.random.default_rng(23)
    x = (1e35 + 1e34 * rng.standard_normal((4, 3, 6, 6))).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    w, b = np.ones(3), np.zeros(3)
    g = rng.standard_normal(x.shape).astype(np.float32)
    plain, m, s = bn_simd.batch_norm_forward(x, w, b)
    y, m2, s2, st = bn_simd.batch_norm_forward(x, w, b, activation="relu", residual=r)
    np.testing.assert_array_equal(y, np.maximum(plain + r, np.float32(0)))
    gx, gw, gb, gr = bn_simd.batch_norm_backward(g, x, m2, s2, w, activation="relu", residual=r, bias=b,
                                                 save_stats=st)
    np.testing.assert_array_equal(gr, np.where(y > 0, g, np.float32(0)))
    assert np.all(np.isfinite(gx))
    # in place over grad_out, with and without the residual: the recomputed u must not overwrite grad_out first
    for res in (r, None):
        y_, _, _, st_ = bn_simd.batch_norm_forward(x, w, b, activation="relu", residual=res)
        want = bn_simd.batch_norm_backward(g, x, m2, s2, w, activation="relu", residual=res, bias=b, save_stats=st_)[0]
        g2 = g.copy()
        bn_simd.batch_norm_backward(g2, x, m2, s2, w, out=g2, activation="relu", residual=res, bias=b, save_stats=st_)
        np.testing.assert_array_equal(g2, want)


@pytest.mark.parametrize("call", [
    lambda x, r, out: bn_simd.batch_norm_forward(x, residual=r, out=out, activation="relu"),
    lambda x, r, out: bn_simd.group_norm(x, 2, residual=r, out=out, activation="relu"),
    lambda x, r, out: bn_simd.instance_norm(x, residual=r, out=out, activation="silu"),
    lambda x, r, out: bn_simd.layer_norm(x, 8, residual=r, out=out, layout="NCHW"),
    lambda x, r, out: bn_simd.rms_norm(x, 8, residual=r, out=out, layout="NCHW"),
    lambda x, r, out: bn_simd.LayerNorm(8, layout="NCHW", activation="relu")(x, residual=r, out=out),
], ids=["batch_norm_forward", "group_norm", "instance_norm", "layer_norm", "rms_norm", "LayerNorm"])
def test_a_strided_residual_in_outs_memory_is_refused(call):
    """A residual that is a strided view of out's memory is copied for the kernel, and the overlap was checked on the
    copy: the call overwrote the caller's residual, and a backward that read it again gave wrong gradients. The
    caller's residual is now checked too, and nothing is written."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 6, 6)).astype(np.float32)
    buf = rng.standard_normal((4, 6, 6, 8)).astype(np.float32)
    before = buf.copy()
    with pytest.raises(ValueError, match="residual must not share memory with out"):
        call(x, buf.transpose(0, 3, 1, 2), buf.reshape(4, 8, 6, 6))
    assert np.array_equal(buf, before)


def test_activation_parameters_beyond_floats_range_name_the_activation():
    x = np.ones((4, 3), np.float32)
    for act in (("leaky_relu", 10**400), ("clamp", -10**400, None), ("clamp", 0.0, 10**400)):
        with pytest.raises(ValueError, match="activation: .* too large for a float"):
            bn_simd.batch_norm(x, training=True, activation=act)
