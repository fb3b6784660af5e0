"""Fused epilogues on group, instance, layer and RMS norm: z = act(norm(x) + residual), training forward and backward.

Each op's training forward with activation= / residual= against the unfused composition (float64 and float32: the
same values for the piecewise-linear activations, the kernel adding and clamping the same numbers; SiLU within its
rounding; 16-bit within an ulp of the float64 oracle), and its backward against the float64 oracle of the composition
(the op's backward fed du = dz act'(u)), against PyTorch's autograd of the composition, and bitwise against the op's
own plain backward of du (float64 ReLU: du is dz where z > 0, exactly). The recomputed u takes the forward's kink
decisions (grad_residual == du, du's mask the forward's output's). Refusals name the argument and write nothing; the
same bits for 1 and 2 threads and, per ISA, against the unfused composition; the layers train through it.

The ops run in the layouts they accept on a (N, C, H, W) tensor: group and instance norm in NCHW and NHWC, layer norm
over the channels in its trailing form (NHWC, normalized_shape C) and its channels-first form (NCHW), RMS norm in its
trailing form.
"""
import numpy as np
import pytest

import bn_simd
from bn_simd import _core
import oracle
import rownorm_oracle as rno
from conftest import nchw_to, to_nchw
from test_epilogue import ACTS, PIECEWISE, act_np, grad_np

EPS = 1e-5
SHAPE = (3, 6, 5, 4)  # (N, C, H, W)
G = 3


class Op:
    """One op of the family in one storage layout: its public calls and its float64 oracle, on canonical arrays."""

    def __init__(self, name, layout):
        self.name, self.layout = name, layout
        self.rms = name == "rms"
        self.rows = name in ("ln", "rms")
        self.G = {"gn": G, "in": SHAPE[1]}.get(name)

    def __repr__(self):
        return f"{self.name}-{self.layout}"

    def params(self, C, rng):
        w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
        return w, (None if self.rms else rng.standard_normal(C))

    def _ln_kw(self):
        return dict(layout="NCHW") if self.layout == "NCHW" else {}

    def forward(self, x, w, b, **kw):
        C = SHAPE[1]
        if self.name == "gn":
            return bn_simd.group_norm_forward(x, G, w, b, eps=EPS, layout=self.layout, **kw)
        if self.name == "in":
            return bn_simd.instance_norm_forward(x, w, b, eps=EPS, layout=self.layout, **kw)
        if self.name == "ln":
            return bn_simd.layer_norm_forward(x, C, w, b, eps=EPS, **self._ln_kw(), **kw)
        return bn_simd.rms_norm_forward(x, C, w, eps=EPS, **kw)

    def one_shot(self, x, w, b, **kw):
        C = SHAPE[1]
        if self.name == "gn":
            return bn_simd.group_norm(x, G, w, b, EPS, layout=self.layout, **kw)
        if self.name == "in":
            return bn_simd.instance_norm(x, None, None, w, b, eps=EPS, layout=self.layout, **kw)
        if self.name == "ln":
            return bn_simd.layer_norm(x, C, w, b, EPS, **self._ln_kw(), **kw)
        return bn_simd.rms_norm(x, C, w, EPS, **kw)

    def backward(self, g, x, fwd, w, b, **kw):
        """The backward of the forward's result fwd (its saved statistics, and save_stats when it has them)."""
        C = SHAPE[1]
        if self.name in ("gn", "in"):
            ep = dict(bias=b, eps=EPS, save_stats=fwd[3]) if len(fwd) == 4 else {}
            if self.name == "gn":
                return bn_simd.group_norm_backward(g, x, fwd[1], fwd[2], G, w, layout=self.layout, **ep, **kw)
            return bn_simd.instance_norm_backward(g, x, fwd[1], fwd[2], w, layout=self.layout, **ep, **kw)
        if self.name == "ln":
            ep = dict(save_stats=fwd[3]) if len(fwd) == 4 else {}
            return bn_simd.layer_norm_backward(g, x, fwd[1], fwd[2], C, w, b, **self._ln_kw(), **ep, **kw)
        ep = dict(save_stats=fwd[2]) if len(fwd) == 3 else {}
        return bn_simd.rms_norm_backward(g, x, fwd[1], C, w, **ep, **kw)

    def oracle_forward(self, xc, w, b):
        """(y, backward) in float64 on canonical arrays: backward(du) -> (dx, dw, db) (db None for RMS norm)."""
        if not self.rows:
            y, _, mean, var = oracle.group_forward(xc, self.G, w, b, EPS)

            def bwd(du):
                return oracle.group_backward(du, xc, mean, 1.0 / np.sqrt(var + EPS), self.G, w)[0]
            return y, bwd
        rows = rno.to_rows(xc, 1, channels_first=True)
        y, _, mean, rstd = rno.forward(rows, w, b, EPS, self.rms)

        def bwd(du):
            dx, dw, db = rno.backward(rno.to_rows(du, 1, channels_first=True), rows, mean, rstd, w, self.rms)[0]
            return rno.from_rows(dx, xc.shape, channels_first=True), dw, None if self.rms else db
        return rno.from_rows(y, xc.shape, channels_first=True), bwd


OPS = [Op("gn", "NCHW"), Op("gn", "NHWC"), Op("in", "NCHW"), Op("in", "NHWC"), Op("ln", "NHWC"), Op("ln", "NCHW"),
       Op("rms", "NHWC")]


def make(op, dtype, seed=0):
    """Canonical float64 x, residual and dz of SHAPE (in dtype's values), the parameters, and the stored arrays."""
    rng = np.random.default_rng(seed)
    xc = (0.5 + 2.0 * rng.standard_normal(SHAPE)).astype(dtype)
    rc = rng.standard_normal(SHAPE).astype(dtype)
    gc = rng.standard_normal(SHAPE).astype(dtype)
    w, b = op.params(SHAPE[1], rng)
    st = [nchw_to(a, op.layout) for a in (xc, rc, gc)]
    return [a.astype(np.float64) for a in (xc, rc, gc)], st, w, b


def grads_of(op, r):
    """(grad_x, grad_weight, grad_bias, grad_residual) of a backward's result (RMS norm has no grad_bias)."""
    return (r[0], r[1], None, r[2]) if op.rms else tuple(r)


# ---- forward ----

@pytest.mark.parametrize("op", OPS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_equals_the_unfused_composition(op, dtype):
    _, (x, r, _), w, b = make(op, dtype)
    plain = op.forward(x, w, b)
    for act in ACTS:
        for res in (None, r):
            got = op.forward(x, w, b, activation=act, residual=res)
            assert len(got) == len(plain) + 1  # (save_stats last)
            for a, p in zip(got[1:-1], plain[1:]):  # the saved statistics are the plain forward's
                np.testing.assert_array_equal(a, p)
            y = got[0]
            assert y.dtype == x.dtype and y.shape == x.shape
            u = plain[0] + res if res is not None else plain[0]
            want = act_np(act, u)
            if act in PIECEWISE:
                np.testing.assert_array_equal(y, want, err_msg=f"{act} residual={res is not None}")
            else:
                eps = np.finfo(dtype).eps
                assert np.all(np.abs(y - want) <= 4 * eps * (np.abs(want) + np.abs(u) + np.finfo(dtype).tiny)), act
            np.testing.assert_array_equal(op.one_shot(x, w, b, activation=act, residual=res), y)


@pytest.mark.parametrize("op", OPS, ids=repr)
def test_forward_against_the_float64_oracle(op):
    (xc, rc, _), (x, r, _), w, b = make(op, np.float32, seed=1)
    y64, _ = op.oracle_forward(xc, w, b)
    u = y64 + rc
    eps = np.finfo(np.float32).eps
    for act in ACTS:
        y = to_nchw(op.forward(x, w, b, activation=act, residual=r)[0], op.layout)
        want = act_np(act, u)
        assert np.all(np.abs(y - want) <= 16 * eps * (np.abs(u) + np.abs(y64) + 1.0)), act


def test_half_storage_within_an_ulp_of_the_oracle():
    dts = [np.dtype(np.float16)]
    try:
        import ml_dtypes
        dts.append(np.dtype(ml_dtypes.bfloat16))
    except ImportError:
        pass
    for op in (OPS[1], OPS[2], OPS[5], OPS[6]):
        (xc, rc, _), _, w, b = make(op, np.float32, seed=2)
        for dt in dts:
            xh, rh = nchw_to(xc.astype(dt), op.layout), nchw_to(rc.astype(dt), op.layout)
            y64, _ = op.oracle_forward(xh.astype(np.float64) if op.layout == "NCHW" else
                                       to_nchw(xh, op.layout).astype(np.float64), w, b)
            for act in ("relu", ("leaky_relu", 0.2), "silu"):
                y = op.forward(xh, w, b, activation=act, residual=rh)[0]
                assert y.dtype == dt
                want = act_np(act, y64 + to_nchw(rh, op.layout).astype(np.float64))
                ulp = np.spacing(np.abs(want).astype(dt)).astype(np.float64)
                got = to_nchw(y, op.layout).astype(np.float64)
                assert np.all(np.abs(got - want) <= ulp + 1e-5 * (np.abs(y64) + np.abs(want) + 1.0)), (op, dt, act)


# ---- backward ----

@pytest.mark.parametrize("op", OPS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_backward_is_the_oracle_backward_of_du(op, dtype):
    (xc, rc, gc), (x, r, g), w, b = make(op, dtype, seed=3)
    y64, bwd = op.oracle_forward(xc, w, b)
    eps = np.finfo(dtype).eps
    n = xc.size // xc.shape[0] if not op.rows else SHAPE[1]
    for act in ACTS:
        for res, res64 in ((None, 0.0), (r, rc)):
            fwd = op.forward(x, w, b, activation=act, residual=res)
            gx, gw, gb, gr = grads_of(op, op.backward(g, x, fwd, w, b, activation=act, residual=res))
            u = y64 + res64
            du = gc * grad_np(act, u)
            dx, dw, db = bwd(du)
            kink = np.abs(u) < 1e3 * eps  # (u within rounding of a kink: the mask may go either way)
            if res is None:
                assert gr is None
            else:
                grc = to_nchw(gr, op.layout)
                assert np.all(np.abs(grc - du)[~kink] <= 8 * eps * (np.abs(du[~kink]) + 1)), act
            if kink.any():
                continue
            tol = 2e3 * n * eps
            np.testing.assert_allclose(to_nchw(gx, op.layout), dx, rtol=0, atol=tol * (np.abs(dx).max() + 1))
            np.testing.assert_allclose(gw, dw, rtol=0, atol=tol * (np.abs(dw).max() + 1))
            if db is not None:
                np.testing.assert_allclose(gb, db, rtol=0, atol=tol * (np.abs(db).max() + 1))


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("C", [7, 64, 300, 768, 1024, 1031])
def test_rows_backward_with_rows_in_double_amid_a_block(rms, C):
    """float32 rows through an activation, no residual (of up to 1024 elements: du and its sums in one sweep), with
    rows the forward normalised in double (|x| ~ 1e30: rstd below 2^-95) first, amid and last in a block: each row's
    grad_x, and grad_weight / grad_bias, against the float64 oracle of the composition."""
    rng = np.random.default_rng(C + rms)
    N = 40
    x = (0.5 + 2.0 * rng.standard_normal((N, C))).astype(np.float32)
    for i in (0, 9, 10, 23, N - 1):
        x[i] = (1e30 * rng.standard_normal(C)).astype(np.float32)
    g = rng.standard_normal((N, C)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, C).astype(np.float32)
    b = None if rms else rng.standard_normal(C).astype(np.float32)
    y64, _, mean, rstd = rno.forward(x, w, b, EPS, rms)
    eps = np.finfo(np.float32).eps
    g[np.abs(y64) < 1e3 * eps] = 0.0  # (u within rounding of ReLU's kink: no gradient there, whichever way it goes)
    for act in ("relu", "silu"):
        if rms:
            fwd = bn_simd.rms_norm_forward(x, C, w, eps=EPS, activation=act)
            gx, gw = bn_simd.rms_norm_backward(g, x, fwd[1], C, w, activation=act, save_stats=fwd[2])[:2]
            gb = None
        else:
            fwd = bn_simd.layer_norm_forward(x, C, w, b, eps=EPS, activation=act)
            gx, gw, gb = bn_simd.layer_norm_backward(g, x, fwd[1], fwd[2], C, w, b, activation=act,
                                                     save_stats=fwd[3])[:3]
        du = g * grad_np(act, y64)
        dx, dw, db = rno.backward(du, x, mean, rstd, w, rms)[0]
        tol = 2e3 * C * eps
        for i in range(N):
            np.testing.assert_allclose(gx[i], dx[i], rtol=0, atol=tol * (np.abs(dx[i]).max() + 1),
                                       err_msg=f"{act} row {i}")
        np.testing.assert_allclose(gw, dw, rtol=0, atol=tol * (np.abs(dw).max() + 1), err_msg=act)
        if gb is not None:
            np.testing.assert_allclose(gb, db, rtol=0, atol=tol * (np.abs(db).max() + 1), err_msg=act)


@pytest.mark.parametrize("op", OPS, ids=repr)
def test_backward_is_the_plain_backward_of_du_bit_for_bit(op):
    """float64 ReLU: du = dz where z > 0 exactly, so the recomputed u's mask is the forward output's; the backward
    through the epilogue gives the plain backward's bits of du (with the forward's float64 statistics: its saved
    ones), grad_residual is du, and grad_x in place over grad_out is the same."""
    _, (x, r, g), w, b = make(op, np.float64, seed=4)
    for res in (None, r):
        fwd = op.forward(x, w, b, activation="relu", residual=res)
        z = fwd[0]
        gx, gw, gb, gr = grads_of(op, op.backward(g, x, fwd, w, b, activation="relu", residual=res))
        du = np.where(z > 0, g, 0.0)
        px, pw, pb, _ = grads_of(op, op.backward(du, x, fwd[:-1], w, b) + ((None,) if op.rms else (None,)))
        np.testing.assert_array_equal(gx, px)
        np.testing.assert_array_equal(gw, pw)
        if not op.rms:
            np.testing.assert_array_equal(gb, pb)
        if res is not None:
            np.testing.assert_array_equal(gr, du)
        g2 = g.copy()
        out = op.backward(g2, x, fwd, w, b, activation="relu", residual=res, out=g2)[0]
        assert out is g2
        np.testing.assert_array_equal(g2, px)
        x2 = x.copy()  # in place over x (du then goes to a scratch)
        gr2 = grads_of(op, op.backward(g, x2, fwd, w, b, activation="relu", residual=res, out=x2))[3]
        np.testing.assert_array_equal(x2, px)
        if res is not None:
            np.testing.assert_array_equal(gr2, du)


@pytest.mark.parametrize("op", OPS, ids=repr)
@pytest.mark.parametrize("act", [("leaky_relu", 0.2), ("clamp", -0.5, 0.75), "relu6"])
def test_recomputed_mask_is_the_forwards(op, act):
    """float32 data, u's pieces decided by the backward's recomputation are the forward's: du / dz (with dz = 1) is
    act' of the forward's output, element for element (the output tells the pieces apart: below 0, inside the
    bounds, at a bound)."""
    _, (x, r, _), w, b = make(op, np.float32, seed=5)
    fwd = op.forward(x, w, b, activation=act, residual=r)
    z = fwd[0].astype(np.float64)
    ones = np.ones_like(x)
    gr = grads_of(op, op.backward(ones, x, fwd, w, b, activation=act, residual=r))[3]
    if act[0] == "leaky_relu":
        want = np.where(z > 0, 1.0, 0.2)
        zero = z == 0  # (u == 0: slope 0.2 there, as PyTorch; z is 0 for u = 0 and for u = -0 alike)
        want[zero] = 0.2
    else:
        lo, hi = (0.0, 6.0) if act == "relu6" else act[1:]
        want = ((z > lo) & (z < hi)).astype(np.float64)
    np.testing.assert_array_equal(gr.astype(np.float64), want.astype(np.float32))


def test_backward_against_torch_autograd():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    tacts = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu,
             ("leaky_relu", 0.2): lambda u: F.leaky_relu(u, 0.2),
             ("clamp", -0.5, 0.75): lambda u: torch.clamp(u, -0.5, 0.75)}
    for op in (OPS[0], OPS[3], OPS[5], OPS[6]):
        (xc, rc, gc), (x, r, g), w, b = make(op, np.float64, seed=6)
        for act in ACTS:
            tx, tr = torch.tensor(xc, requires_grad=True), torch.tensor(rc, requires_grad=True)
            tw = torch.tensor(w, requires_grad=True)
            tb = None if b is None else torch.tensor(b, requires_grad=True)
            if op.name == "gn":
                v = F.group_norm(tx, G, tw, tb, EPS)
            elif op.name == "in":
                v = F.instance_norm(tx, weight=tw, bias=tb, eps=EPS)
            elif op.name == "ln":
                v = F.layer_norm(tx.movedim(1, -1), (SHAPE[1],), tw, tb, EPS).movedim(-1, 1)
            else:
                v = F.rms_norm(tx.movedim(1, -1), (SHAPE[1],), tw, EPS).movedim(-1, 1)
            z = tacts[act](v + tr)
            z.backward(torch.tensor(gc))
            fwd = op.forward(x, w, b, activation=act, residual=r)
            np.testing.assert_allclose(to_nchw(fwd[0], op.layout), z.detach().numpy(), rtol=1e-12, atol=1e-12)
            gx, gw, gb, gr = grads_of(op, op.backward(g, x, fwd, w, b, activation=act, residual=r))
            for got, want in ((to_nchw(gx, op.layout), tx.grad), (to_nchw(gr, op.layout), tr.grad), (gw, tw.grad),
                              (gb, None if tb is None else tb.grad)):
                if want is not None:
                    np.testing.assert_allclose(got, want.numpy(), rtol=1e-9, atol=1e-10, err_msg=f"{op} {act}")


# ---- refusals ----

@pytest.mark.parametrize("op", OPS, ids=repr)
def test_bad_arguments_are_refused_naming_them_and_nothing_is_written(op):
    _, (x, r, g), w, b = make(op, np.float32)
    fwd = op.forward(x, w, b, activation="relu", residual=r)
    out = np.full_like(x, 7.0)
    bad_acts = (("gelu", ValueError), (("leaky_relu", "a"), TypeError), (("clamp", 2.0, 1.0), ValueError),
                (3, TypeError))
    for bad, exc in bad_acts:
        with pytest.raises(exc, match="activation"):
            op.forward(x, w, b, out=out, activation=bad)
        with pytest.raises(exc, match="activation"):
            op.backward(g, x, fwd, w, b, out=out, activation=bad, residual=r)
    bad_res = ((r[:1], ValueError, "residual"), (r.astype(np.float64), TypeError, "residual"),
               ("r", TypeError, "residual"), (out, ValueError, "residual must not share memory with out"))
    for bad, exc, pat in bad_res:
        with pytest.raises(exc, match=pat):
            op.forward(x, w, b, out=out, activation="relu", residual=bad)
        with pytest.raises(exc, match=pat):
            op.one_shot(x, w, b, out=out, activation="silu", residual=bad)
        with pytest.raises(exc, match=pat):
            op.backward(g, x, fwd, w, b, out=out, activation="relu", residual=bad)
    # an activation needs the forward's save_stats; a malformed one is refused naming it
    no_stats = fwd[:-1]
    for stats in (None, (1.0,) * 3):
        with pytest.raises(ValueError, match="save_stats"):
            op.backward(g, x, no_stats + (stats,) if stats else no_stats, w, b, out=out, activation="relu")
    bad_shape = tuple(np.zeros(3) for _ in fwd[-1])
    with pytest.raises(ValueError, match="save_stats"):
        op.backward(g, x, fwd[:-1] + (bad_shape,), w, b, out=out, activation="relu", residual=r)
    assert np.all(out == 7.0)


@pytest.mark.parametrize("op", OPS, ids=repr)
def test_a_residual_without_an_activation(op):
    """residual= alone: y = norm(x) + residual, and the backward's grad_residual is grad_out (with the plain
    statistics, no save_stats needed)."""
    _, (x, r, g), w, b = make(op, np.float64, seed=7)
    plain = op.forward(x, w, b)
    fwd = op.forward(x, w, b, residual=r)
    np.testing.assert_array_equal(fwd[0], plain[0] + r)
    got = grads_of(op, op.backward(g, x, plain, w, b, residual=r))
    want = op.backward(g, x, plain, w, b)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[3], g)


# ---- instance_norm's one-shot call with running statistics ----

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_instance_norm_moves_running_statistics_as_the_plain_call(layout, dtype):
    """instance_norm with activation= / residual= and running statistics: instance_norm_forward's bits (the fused
    forward), the unfused composition's values, and running_mean / running_var bitwise the plain call's; without the
    input's statistics, batch norm's eval through the same epilogue bit for bit."""
    op = Op("in", layout)
    _, (x, r, _), w, b = make(op, dtype, seed=21)
    rng = np.random.default_rng(22)
    rm0, rv0 = (0.1 * rng.standard_normal(SHAPE[1])).astype(dtype), rng.uniform(0.5, 1.5, SHAPE[1]).astype(dtype)
    for act in ACTS + [None]:
        rm1, rv1, rm2, rv2 = rm0.copy(), rv0.copy(), rm0.copy(), rv0.copy()
        y = bn_simd.instance_norm(x, rm1, rv1, w, b, True, 0.3, EPS, layout=layout, activation=act, residual=r)
        plain = bn_simd.instance_norm(x, rm2, rv2, w, b, True, 0.3, EPS, layout=layout)
        assert rm1.tobytes() == rm2.tobytes() and rv1.tobytes() == rv2.tobytes(), act
        assert not np.array_equal(rm1, rm0)
        fwd = bn_simd.instance_norm_forward(x, w, b, eps=EPS, layout=layout, activation=act, residual=r)
        assert y.tobytes() == fwd[0].tobytes(), act
        want = plain + r if act is None else act_np(act, plain + r)
        if act is None or act in PIECEWISE:
            np.testing.assert_array_equal(y, want)
        else:
            np.testing.assert_allclose(y, want, rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).eps)
        ev = bn_simd.instance_norm(x, rm0, rv0, w, b, False, layout=layout, activation=act, residual=r)
        bn = bn_simd.batch_norm(x, rm0, rv0, w, b, training=False, layout=layout, activation=act, residual=r)
        assert ev.tobytes() == bn.tobytes(), act


def test_instance_norm_refusals_change_no_running_statistics():
    op = Op("in", "NCHW")
    _, (x, r, _), w, b = make(op, np.float32, seed=23)
    rm, rv = np.zeros(SHAPE[1], np.float32), np.ones(SHAPE[1], np.float32)
    out = np.full_like(x, 5.0)
    bad = [(dict(activation="gelu"), ValueError, "activation"), (dict(activation=("leaky_relu", "a")), TypeError,
                                                                  "activation"),
           (dict(activation="relu", residual=r[:1]), ValueError, "residual"),
           (dict(residual=r.astype(np.float64)), TypeError, "residual"),
           (dict(activation="relu", residual=out), ValueError, "residual must not share memory with out")]
    for use_input_stats in (True, False):
        for kw, exc, pat in bad:
            with pytest.raises(exc, match=pat):
                bn_simd.instance_norm(x, rm, rv, w, b, use_input_stats, 0.5, out=out, **kw)
    with pytest.raises(ValueError, match="spatial element"):
        bn_simd.instance_norm(x[..., :1, :1].copy(), rm, rv, activation="relu")
    with pytest.raises(ValueError, match="running_mean"):
        bn_simd.instance_norm(x, None, None, w, b, False, activation="relu", residual=r)
    assert np.all(rm == 0.0) and np.all(rv == 1.0) and np.all(out == 5.0)


# ---- threads and ISAs ----

@pytest.mark.parametrize("op", OPS, ids=repr)
def test_same_bits_for_one_and_two_threads(threads, op):
    """SiLU with a residual and ReLU without (du in the backward's scratch): the same bits on 1 and 2 threads, and
    with the streaming threshold lowered below the arrays' size (streamed stores in the forward and the backward)."""
    rng = np.random.default_rng(8)
    shape = (8, 16, 24, 24)
    xc = (0.3 + rng.standard_normal(shape)).astype(np.float32)
    x, r, g = (nchw_to(a, op.layout) for a in (xc, rng.standard_normal(shape).astype(np.float32),
                                                rng.standard_normal(shape).astype(np.float32)))
    w, b = op.params(16, rng)
    C = 16
    kw = dict(layout=op.layout) if not op.rows else (dict(layout="NCHW") if op.layout == "NCHW" and not op.rms else {})
    runs = {}
    for n, stream in ((1, None), (2, None), (2, 4096)):
        threads(n)
        _core.set_stream_bytes(stream)  # (conftest restores the default)
        for act, res in (("silu", r), ("relu", None)):
            if op.name == "gn":
                f = bn_simd.group_norm_forward(x, 4, w, b, activation=act, residual=res, **kw)
                bk = bn_simd.group_norm_backward(g, x, f[1], f[2], 4, w, activation=act, residual=res, bias=b,
                                                 save_stats=f[3], **kw)
            elif op.name == "in":
                f = bn_simd.instance_norm_forward(x, w, b, activation=act, residual=res, **kw)
                bk = bn_simd.instance_norm_backward(g, x, f[1], f[2], w, activation=act, residual=res, bias=b,
                                                    save_stats=f[3], **kw)
            elif op.name == "ln":
                f = bn_simd.layer_norm_forward(x, C, w, b, activation=act, residual=res, **kw)
                bk = bn_simd.layer_norm_backward(g, x, f[1], f[2], C, w, b, activation=act, residual=res,
                                                 save_stats=f[3], **kw)
            else:
                f = bn_simd.rms_norm_forward(x, C, w, activation=act, residual=res)
                bk = bn_simd.rms_norm_backward(g, x, f[1], C, w, activation=act, residual=res, save_stats=f[2])
            runs.setdefault(act, []).append([f[0]] + [a for a in bk if a is not None])
    for got in runs.values():
        for other in got[1:]:
            for a, c in zip(got[0], other):
                np.testing.assert_array_equal(a, c)


def test_every_isa_against_the_unfused_composition(isa):
    for op in (OPS[0], OPS[3], OPS[4], OPS[5], OPS[6]):
        _, (x, r, g), w, b = make(op, np.float32, seed=9)
        plain = op.forward(x, w, b)
        for act in ACTS:
            fwd = op.forward(x, w, b, activation=act, residual=r)
            u = plain[0] + r
            want = act_np(act, u)
            if act in PIECEWISE:
                np.testing.assert_array_equal(fwd[0], want, err_msg=f"{op} {act}")
            else:
                assert np.all(np.abs(fwd[0] - want) <= 4e-7 * (np.abs(want) + np.abs(u) + 1)), (op, act)
        fwd = op.forward(x, w, b, activation="relu", residual=r)
        gr = grads_of(op, op.backward(g, x, fwd, w, b, activation="relu", residual=r))[3]
        np.testing.assert_array_equal(gr, np.where(fwd[0] > 0, g, np.float32(0)))


# ---- layers ----

def _layers():
    C = SHAPE[1]
    return [
        (lambda **k: bn_simd.GroupNorm(G, C, **k), "NCHW", "gn"),
        (lambda **k: bn_simd.GroupNorm(G, C, layout="NHWC", **k), "NHWC", "gn"),
        (lambda **k: bn_simd.InstanceNorm2d(C, affine=True, track_running_stats=True, **k), "NCHW", "in"),
        (lambda **k: bn_simd.LayerNorm(C, **k), "NHWC", "ln"),
        (lambda **k: bn_simd.LayerNorm(C, layout="NCHW", **k), "NCHW", "ln"),
        (lambda **k: bn_simd.RMSNorm(C, **k), "NHWC", "rms"),
    ]


@pytest.mark.parametrize("k", range(6))
def test_layers_train_through_the_epilogue(k):
    make_layer, layout, name = _layers()[k]
    rng = np.random.default_rng(10)
    xc = (0.5 + rng.standard_normal(SHAPE)).astype(np.float32)
    x, r, g = (nchw_to(a, layout) for a in (xc, rng.standard_normal(SHAPE).astype(np.float32),
                                             rng.standard_normal(SHAPE).astype(np.float32)))
    fused, plain = make_layer(activation=("leaky_relu", 0.2)), make_layer()
    assert "activation=('leaky_relu', 0.2)" in repr(fused) and "activation" not in repr(plain)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    for p, q in zip(fused.state_dict().values(), plain.state_dict().values()):
        np.testing.assert_array_equal(p, q)
    y = fused(x, residual=r)
    u = plain(x) + r
    np.testing.assert_array_equal(y, np.where(u > 0, u, u * np.float32(0.2)))
    if name == "in":  # the running statistics move as without the epilogue
        np.testing.assert_array_equal(fused.running_mean, plain.running_mean)
        np.testing.assert_array_equal(fused.running_var, plain.running_var)
    gx = fused.backward(g)
    du = np.where(u > 0, g, g * np.float32(0.2))
    np.testing.assert_array_equal(fused.grad_residual, du)
    gx2 = plain.backward(du)
    np.testing.assert_allclose(gx, gx2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused.grad_weight, plain.grad_weight, rtol=1e-5, atol=1e-4)
    fused(x)  # no residual: grad_residual None
    plain(x)
    fused.backward(g)
    assert fused.grad_residual is None
    if name == "in":  # eval with the running statistics: batch norm's eval, through the activation
        fused.eval()
        plain.eval()
        y = fused(x, residual=r)
        u = plain(x) + r
        np.testing.assert_array_equal(y, np.where(u > 0, u, u * np.float32(0.2)))
        fused.backward(g)
        np.testing.assert_array_equal(fused.grad_residual, np.where(u > 0, g, g * np.float32(0.2)))
    with pytest.raises(ValueError, match="activation"):
        make_layer(activation="tanh")


def test_instance_norm_layer_takes_unbatched_input_with_a_residual():
    rng = np.random.default_rng(11)
    x, r, g = (rng.standard_normal((6, 5, 4)).astype(np.float32) for _ in range(3))
    layer = bn_simd.InstanceNorm2d(6, affine=True, activation="relu")
    y = layer(x, residual=r)
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, np.maximum(bn_simd.InstanceNorm2d(6, affine=True)(x) + r, np.float32(0)))
    gx = layer.backward(g)
    assert gx.shape == x.shape and layer.grad_residual.shape == x.shape
    np.testing.assert_array_equal(layer.grad_residual, np.where(y > 0, g, np.float32(0)))


@pytest.mark.parametrize("layout,shape", [("NHWC", (1, 64, 64, 16)), ("NCHW", (2, 16, 48, 48)),
                                          ("NCHW", (32, 64, 3, 3)), ("NCHW", (64, 1000)), ("NCHW", (2, 4100))])
def test_group_norm_backward_on_each_path(threads, layout, shape):
    """The channels-last call with fewer samples than threads takes a du sweep before the plain backward (the others
    compute du sample by sample, group by group or run by run of small groups; (N, C) arrays sweep flat): float64
    ReLU, the plain backward's bits of du either way."""
    threads(2)
    rng = np.random.default_rng(12)
    x, r, g = (rng.standard_normal(shape) for _ in range(3))
    C = shape[-1] if layout == "NHWC" else shape[1]
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    for res in (None, r):
        y, m, s, st = bn_simd.group_norm_forward(x, 4, w, b, layout=layout, activation="relu", residual=res)
        gx, gw, gb, gr = bn_simd.group_norm_backward(g, x, m, s, 4, w, layout=layout, activation="relu",
                                                     residual=res, bias=b, save_stats=st)
        du = np.where(y > 0, g, 0.0)
        px, pw, pb = bn_simd.group_norm_backward(du, x, m, s, 4, w, layout=layout)
        np.testing.assert_array_equal(gx, px)
        np.testing.assert_array_equal(gw, pw)
        np.testing.assert_array_equal(gb, pb)
        if res is not None:
            np.testing.assert_array_equal(gr, du)


def test_extreme_groups_take_the_float64_apply_with_the_epilogue():
    """float32 groups whose mean is ~1e35 take the float64 apply: the epilogue follows it in the forward, and the
    backward recomputes u from its result (the same kink decisions)."""
    rng = np.random.default_rng(13)
    x = (1e35 + 1e34 * rng.standard_normal((2, 4, 6, 6))).astype(np.float32)
    r, g = (rng.standard_normal(x.shape).astype(np.float32) for _ in range(2))
    w, b = np.ones(4), np.zeros(4)
    plain = bn_simd.group_norm_forward(x, 2, w, b)[0]
    y, m, s, st = bn_simd.group_norm_forward(x, 2, w, b, activation="relu", residual=r)
    np.testing.assert_array_equal(y, np.maximum(plain + r, np.float32(0)))
    gx, gw, gb, gr = bn_simd.group_norm_backward(g, x, m, s, 2, w, activation="relu", residual=r, bias=b,
                                                 save_stats=st)
    np.testing.assert_array_equal(gr, np.where(y > 0, g, np.float32(0)))
    assert np.all(np.isfinite(gx))
    for layout in ("NCHW", "NHWC"):  # grad_x and the parameters' gradients: the plain backward's of du
        xl, gl = (a if layout == "NCHW" else np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, g))
        y, m, s, st = bn_simd.group_norm_forward(xl, 2, w, b, layout=layout, activation="relu")
        got = bn_simd.group_norm_backward(gl, xl, m, s, 2, w, layout=layout, activation="relu", bias=b,
                                          save_stats=st)[:3]
        inv = 1.0 / np.sqrt(st[1] + 1e-5)  # (the forward's float64 statistics, as the epilogue's backward uses)
        want = bn_simd.group_norm_backward(np.where(y > 0, gl, np.float32(0)), xl, st[0], inv, 2, w, layout=layout)
        for a, p in zip(got, want):
            np.testing.assert_array_equal(a, p)
        g2 = gl.copy()  # in place over grad_out (u then takes a scratch: du is grad_out)
        bn_simd.group_norm_backward(g2, xl, m, s, 2, w, layout=layout, activation="relu", bias=b, save_stats=st,
                                    out=g2)
        np.testing.assert_array_equal(g2, want[0])


def _bfloat16_or_skip():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return ml_dtypes.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("epi", [None, "relu+res", "silu"])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_the_float64_apply_is_each_samples_own(dtype, layout, epi, nthreads, threads):
    """Which samples take the float64 apply is decided per sample (some group of it needs it): a batch in which one
    sample has groups at |mean| ~ 1e35 gives every sample the bits of a call on that sample alone, in the forward
    (its three paths: block by block, sample by sample, and the two sweeps of an in-place call) and in the fused
    backward; the parameter gradients are the samples' added in sample order. (The choice was the call's: the
    ordinary samples of such a batch took the float64 apply too, an ulp or two from their own results, and a
    caller's parallel_for, which calls the drivers on runs of samples, disagreed with OpenMP.)"""
    threads(nthreads)
    dt = np.float32 if dtype == "float32" else _bfloat16_or_skip()
    rng = np.random.default_rng(41)
    N, C, Gs = 5, 8, 2
    x = rng.standard_normal((N, C, 6, 7))
    x[1] = 1e35 + 1e34 * x[1]  # (sample 1: every group extreme)
    x[3, 4:] = 1e35 + 1e34 * x[3, 4:]  # (sample 3: its second group only)
    x = x.astype(dt)
    r, g = (rng.standard_normal(x.shape).astype(dt) for _ in range(2))
    w, b = rng.standard_normal(C) + 1.5, rng.standard_normal(C)
    if layout == "NHWC":
        x, r, g = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, r, g))
    kw = {"activation": {"relu+res": "relu", "silu": "silu"}.get(epi), "layout": layout}
    res = r if epi == "relu+res" else None

    def fwd(n0, n1, inplace=False):
        xs = x[n0:n1].copy()
        out = {"out": xs} if inplace else {}
        return bn_simd.group_norm_forward(xs, Gs, w, b, residual=None if res is None else res[n0:n1], **kw, **out)

    y, m, s, *st = fwd(0, N)  # (save_stats: with an activation)
    alone = [fwd(n, n + 1) for n in range(N)]
    for n in range(N):
        np.testing.assert_array_equal(y[n:n + 1], alone[n][0])
        np.testing.assert_array_equal(m[n:n + 1], alone[n][1])
    np.testing.assert_array_equal(fwd(0, N, inplace=True)[0], y)  # (the two sweeps)
    if epi is None:
        return
    ins = {"residual": res} if res is not None else {}
    got = bn_simd.group_norm_backward(g, x, m, s, Gs, w, bias=b, save_stats=st[0], **kw, **ins)
    gw, gb = np.zeros(C), np.zeros(C)
    for n in range(N):
        ins_n = {"residual": res[n:n + 1]} if res is not None else {}
        one = bn_simd.group_norm_backward(g[n:n + 1], x[n:n + 1], alone[n][1], alone[n][2], Gs, w, bias=b,
                                          save_stats=alone[n][3], **kw, **ins_n)
        np.testing.assert_array_equal(got[0][n:n + 1], one[0])
        if res is not None:
            np.testing.assert_array_equal(got[3][n:n + 1], one[3])
        gw += one[1]
        gb += one[2]
    np.testing.assert_array_equal(got[1], gw)
    np.testing.assert_array_equal(got[2], gb)
    assert np.all(np.isfinite(np.asarray(got[0], np.float64)))


@pytest.mark.parametrize("case", ["layer rows", "rms rows", "group NCHW"])
def test_du_beyond_the_scratch_size_goes_to_dx(case):
    """A row block (one row of 1.1M float32 here) or a channels-first group beyond the 4 MiB of du's per-thread
    scratch puts du into dx instead (the scratch would be as large as the tensor's lines): float32 ReLU gives the
    plain backward's bits of du, also in place over grad_out, and over x (where du takes a scratch after all)."""
    rng = np.random.default_rng(31)
    if case == "group NCHW":
        x, g = (rng.standard_normal((1, 2, 1100, 1000), dtype=np.float32) for _ in range(2))
        w, b = rng.standard_normal(2).astype(np.float32), rng.standard_normal(2).astype(np.float32)
        y, m, s, st = bn_simd.group_norm_forward(x, 1, w, b, activation="relu")
        m, s = st[0], 1.0 / np.sqrt(st[1] + 1e-5)  # (the float64 statistics the epilogue's backward uses)
        run = lambda gg, xx, **kw: bn_simd.group_norm_backward(gg, xx, m, s, 1, w, bias=b, **kw)  # noqa: E731
    else:
        x, g = (rng.standard_normal((1, 1_100_000), dtype=np.float32) for _ in range(2))
        C = x.shape[1]
        w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
        if case == "layer rows":
            y, m, s, st = bn_simd.layer_norm_forward(x, C, w, b, activation="relu")
            m, s = st
            run = lambda gg, xx, **kw: bn_simd.layer_norm_backward(gg, xx, m, s, C, w, b, **kw)  # noqa: E731
        else:
            y, s, st = bn_simd.rms_norm_forward(x, C, w, activation="relu")
            s = st[0]
            run = lambda gg, xx, **kw: bn_simd.rms_norm_backward(gg, xx, s, C, w, **kw)  # noqa: E731
    want = run(np.where(y > 0, g, np.float32(0)), x)
    got = run(g, x, activation="relu", save_stats=st)
    for a, p in zip(got, want):
        np.testing.assert_array_equal(a, p)
    g2, x2 = g.copy(), x.copy()
    run(g2, x, activation="relu", save_stats=st, out=g2)
    np.testing.assert_array_equal(g2, want[0])
    run(g, x2, activation="relu", save_stats=st, out=x2)
    np.testing.assert_array_equal(x2, want[0])


# ---- bn_simd.torch ----

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_calls_with_an_epilogue_against_the_composition(dtype):
    torch = pytest.importorskip("torch")
    import bn_simd.torch as bt
    TF = torch.nn.functional
    dt = getattr(torch, dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == "float64" else dict(rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(14)
    calls = [
        (lambda x, w, b, r, **k: bt.group_norm(x, 4, w, b, residual=r, **k),
         lambda x, w, b: TF.group_norm(x, 4, w, b), (3, 8, 5, 6), 8),
        (lambda x, w, b, r, **k: bt.layer_norm(x, 12, w, b, residual=r, **k),
         lambda x, w, b: TF.layer_norm(x, (12,), w, b), (4, 7, 12), 12),
        (lambda x, w, b, r, **k: bt.rms_norm(x, 12, w, 1e-5, residual=r, **k),
         lambda x, w, b: TF.rms_norm(x, (12,), w, 1e-5), (4, 7, 12), 12),
    ]
    acts = {"relu": TF.relu, ("leaky_relu", 0.2): lambda u: TF.leaky_relu(u, 0.2), "silu": TF.silu}
    for k, (fused, plain, shape, C) in enumerate(calls):
        for act, tact in acts.items():
            for memory in ((torch.contiguous_format, torch.channels_last) if k == 0 else (torch.contiguous_format,)):
                x = torch.randn(shape, dtype=dt, generator=gen).to(memory_format=memory).requires_grad_()
                r = torch.randn(shape, dtype=dt, generator=gen).to(memory_format=memory).requires_grad_()
                w = torch.randn(C, dtype=dt, generator=gen).requires_grad_()
                b = torch.randn(C, dtype=dt, generator=gen).requires_grad_()
                g = torch.randn(shape, dtype=dt, generator=gen)
                z = fused(x, w, b, r, activation=act)
                z.backward(g)
                got = [t.grad.clone() if t.grad is not None else None for t in (x, r, w, b)]
                for t in (x, r, w, b):
                    t.grad = None
                want = tact(plain(x, w, b) + r)
                want.backward(g)
                torch.testing.assert_close(z, want, **tol)
                for a, t in zip(got, (x, r, w, b)):
                    if t.grad is not None:
                        torch.testing.assert_close(a, t.grad, **tol)
                with torch.no_grad():  # the kernels called directly
                    torch.testing.assert_close(fused(x, w, b, r, activation=act), want, **tol)


def test_torch_gradcheck_and_refusals():
    torch = pytest.importorskip("torch")
    import bn_simd.torch as bt
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(2, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    r = torch.randn(2, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: bt.group_norm(a, 2, None, None, activation="silu", residual=b),
                                    (x, r))
    assert torch.autograd.gradcheck(lambda a, b, c: bt.layer_norm(a, 3, c, None, activation="silu", residual=b),
                                    (x, r, w))
    with torch.no_grad():  # eps = 0: PyTorch's composition
        TF = torch.nn.functional
        torch.testing.assert_close(bt.group_norm(x, 2, eps=0.0, activation="relu6", residual=r),
                                   TF.relu6(TF.group_norm(x, 2, eps=0.0) + r))
        torch.testing.assert_close(bt.rms_norm(x, 3, w, 0.0, activation=("clamp", -0.5, 0.5), residual=r),
                                   torch.clamp(TF.rms_norm(x, (3,), w, 0.0) + r, -0.5, 0.5))
    with pytest.raises(ValueError, match="activation"):
        bt.group_norm(x, 2, activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        bt.rms_norm(x, 3, activation="gelu")
    with pytest.raises(TypeError, match="residual"):
        bt.layer_norm(x, 3, residual=np.zeros((2, 4, 3)))
    with torch.no_grad():
        with pytest.raises(ValueError, match="residual"):
            bt.layer_norm(x, 3, activation="relu", residual=r[:1])
        with pytest.raises(TypeError, match="residual"):
            bt.group_norm(x, 2, activation="relu", residual=r.float())
