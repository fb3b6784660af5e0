"""The C library's public API (include/bn_simd_api.h) through ctypes: every op against the Python package (the same
kernels: the same bits), on OpenMP and on a caller's parallel_for; every argument check (a status, nothing written);
the workspace; the version, status strings and exported symbols. The C programs that link the library (examples/c,
tests/c/test_api.c) are tests/test_c_library.py's."""
import ctypes as ct
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import bn_simd

capi = pytest.importorskip("capi")  # (tests/capi.py)
try:
    L = capi.lib()
except (OSError, FileNotFoundError) as e:  # a build without the library
    pytest.skip(f"libbn_simd not built: {e}", allow_module_level=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = capi.ptr
EPS = 1e-5


def rng(seed=0):
    return np.random.default_rng(seed)


# ---- library ------------------------------------------------------------------------------------------------------

def test_version_is_the_packages():
    assert L.bn_version().decode() == bn_simd.__version__


def test_header_version_macros_are_the_packages():
    with open(os.path.join(bn_simd.get_include(), "bn_simd_api.h")) as f:
        text = f.read()
    got = [int(re.search(rf"#define BN_SIMD_VERSION_{k} (\d+)", text).group(1)) for k in ("MAJOR", "MINOR", "PATCH")]
    assert ".".join(map(str, got)) == bn_simd.__version__


def test_every_status_has_its_own_message():
    msgs = {code: L.bn_strerror(code).decode() for code in capi.STATUS.values()}
    assert len(set(msgs.values())) == len(msgs) and all(msgs.values())
    assert L.bn_strerror(-99).decode() == "unknown status"
    assert "eps" in msgs[capi.STATUS["EEPS"]]


def test_only_the_public_functions_are_exported():
    if not shutil.which("nm"):
        pytest.skip("no nm")
    with open(os.path.join(bn_simd.get_include(), "bn_simd_api.h")) as f:
        declared = set(re.findall(r"BN_API[^;(]*?\b(bn_\w+)\s*\(", f.read()))
    so = os.path.join(bn_simd.get_library_dirs()[0], "libbn_simd.so")
    out = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.split()[1] in "TtDdBbRrVWiu"}
    assert len(declared) > 25
    assert exported == declared


# ---- every op against the Python package ----------------------------------------------------------------------

# (dtype, layout, shape as the array is laid out): small channels-first and -last; one channel over several chunks
# (the flat view); rows longer than a chunk (pieces); channels-last over several chunks of rows; small maps over
# several chunks of rows
CASES = [
    (np.float32, capi.NCHW, (4, 3, 5, 5)),
    (np.float64, capi.NHWC, (4, 5, 5, 3)),
    (np.float16, capi.NCHW, (3, 4, 7)),
    (np.float32, capi.NCHW, (2, 1, 40000)),
    (np.float32, capi.NCHW, (3, 2, 20000)),
    (np.float64, capi.NHWC, (9000, 8)),
    (np.float32, capi.NCHW, (100, 4, 4, 4)),
]
IDS = [f"{np.dtype(dt).name}-{'NHWC' if lay else 'NCHW'}-{'x'.join(map(str, s))}" for dt, lay, s in CASES]


def make(case, seed=0):
    dtype, layout, shape = case
    r = rng(seed)
    x = (r.standard_normal(shape) * 2 + 0.5).astype(dtype)
    C = shape[1] if layout == capi.NCHW else shape[-1]
    return x, C, r


def layout_name(layout):
    return "NCHW" if layout == capi.NCHW else "NHWC"


def run_both(call, pooled=True):
    """call(ctx) on the default context (OpenMP) and on a context with a caller's pool (3 tasks, run in reverse
    order): the two results must be bitwise equal; returns the first. pooled: whether the op runs tasks on the pool
    (layer norm's backward runs as one task on the calling thread)."""
    a = call(None)
    pool = capi.Pool()
    ctx = capi.context(3, pool)
    try:
        b = call(ctx)
    finally:
        L.bn_context_destroy(ctx)
    assert (pool.calls >= 1) == pooled
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v, strict=True)
        assert u.tobytes() == v.tobytes()
    return a


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_batch_norm_inference_training_backward_match_the_package(case):
    x, C, r = make(case)
    d = capi.desc(x, case[1])
    rm, rv = r.standard_normal(C), r.random(C) + 0.5
    w, b = r.standard_normal(C), r.standard_normal(C)
    lay = layout_name(case[1])

    def inference(ctx):
        y = np.full_like(x, 7)
        assert L.bn_batch_norm_inference(ctx, d, P(x), P(y), P(rm), P(rv), P(w), P(b), EPS, None, 0) == 0
        return (y,)

    (y,) = run_both(inference)
    np.testing.assert_array_equal(y, bn_simd.batch_norm(x, rm.copy(), rv.copy(), w, b, False, eps=EPS, layout=lay))

    def training(ctx):
        y = np.full_like(x, 7)
        rm2, rv2, sm, si = rm.copy(), rv.copy(), np.zeros(C), np.zeros(C)
        assert L.bn_batch_norm_training(ctx, d, P(x), P(y), P(w), P(b), EPS, 0.25, P(rm2), P(rv2), P(sm), P(si),
                                        None, 0) == 0
        return y, rm2, rv2, sm, si

    y, rm2, rv2, sm, si = run_both(training)
    yp, smp, sip = bn_simd.batch_norm_forward(x, w, b, eps=EPS, layout=lay)
    np.testing.assert_array_equal(y, yp)
    np.testing.assert_array_equal(sm.astype(smp.dtype), smp)
    np.testing.assert_array_equal(si.astype(sip.dtype), sip)
    rmp, rvp = rm.copy(), rv.copy()
    bn_simd.batch_norm(x, rmp, rvp, w, b, True, momentum=0.25, eps=EPS, layout=lay)
    np.testing.assert_array_equal(rm2, rmp)
    np.testing.assert_array_equal(rv2, rvp)

    dy = r.standard_normal(x.shape).astype(x.dtype)
    for training_ in (1, 0):
        def backward(ctx):
            dx, gw, gb = np.full_like(x, 7), np.zeros(C), np.zeros(C)
            assert L.bn_batch_norm_backward(ctx, d, P(dy), P(x), P(dx), P(sm), P(si), P(w), training_, P(gw), P(gb),
                                            None, 0) == 0
            return dx, gw, gb

        dx, gw, gb = run_both(backward)
        dxp, gwp, gbp = bn_simd.batch_norm_backward(dy, x, sm, si, w, layout=lay, training=bool(training_))
        np.testing.assert_array_equal(dx, dxp)
        np.testing.assert_array_equal(gw, gwp)
        np.testing.assert_array_equal(gb, gbp)
    np.testing.assert_array_equal(x, make(case)[0])  # (the inputs as they came)


@pytest.mark.parametrize("case", CASES[:3] + CASES[5:6], ids=IDS[:3] + IDS[5:6])
def test_float_per_channel_arrays_are_read_and_written_as_float(case):
    x, C, r = make(case, 1)
    d = capi.desc(x, case[1], param=capi.F32)
    w, b = r.standard_normal(C).astype(np.float32), r.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, sm, si = np.empty_like(x), np.zeros(C, np.float32), np.zeros(C, np.float32)
    assert L.bn_batch_norm_training(None, d, P(x), P(y), P(w), P(b), EPS, 0.1, P(rm), P(rv), P(sm), P(si),
                                    None, 0) == 0
    yp, smp, sip = bn_simd.batch_norm_forward(x, w, b, eps=EPS, layout=layout_name(case[1]))
    np.testing.assert_array_equal(y, yp)
    rmp, rvp = np.zeros(C, np.float32), np.ones(C, np.float32)
    bn_simd.batch_norm(x, rmp, rvp, w, b, True, momentum=0.1, eps=EPS, layout=layout_name(case[1]))
    np.testing.assert_array_equal(rm, rmp)
    np.testing.assert_array_equal(rv, rvp)


GN_CASES = [(np.float32, capi.NCHW, (4, 6, 5, 5), 3), (np.float64, capi.NHWC, (5, 4, 4, 8), 2),
            (np.float16, capi.NCHW, (3, 4, 9), 4), (np.float32, capi.NHWC, (6, 30, 30, 8), 8)]


@pytest.mark.parametrize("case", GN_CASES, ids=[f"{np.dtype(c[0]).name}-{c[1]}-G{c[3]}" for c in GN_CASES])
def test_group_and_instance_norm_match_the_package(case):
    x, C, r = make(case[:3], 2)
    G = case[3]
    d = capi.desc(x, case[1])
    w, b = r.standard_normal(C), r.standard_normal(C)
    lay = layout_name(case[1])
    N = x.shape[0]

    def forward(ctx):
        y, m, s = np.full_like(x, 7), np.zeros(N * G), np.zeros(N * G)
        assert L.bn_group_norm_forward(ctx, d, G, P(x), P(y), P(w), P(b), EPS, P(m), P(s), None, 0) == 0
        return y, m, s

    y, m, s = run_both(forward)
    yp, mp, sp = bn_simd.group_norm_forward(x, G, w, b, eps=EPS, layout=lay)
    np.testing.assert_array_equal(y, yp)
    np.testing.assert_array_equal(m.astype(mp.dtype), mp.ravel())
    np.testing.assert_array_equal(s.astype(sp.dtype), sp.ravel())
    dy = r.standard_normal(x.shape).astype(x.dtype)

    def backward(ctx):
        dx, gw, gb = np.full_like(x, 7), np.zeros(C), np.zeros(C)
        assert L.bn_group_norm_backward(ctx, d, G, P(dy), P(x), P(dx), P(m), P(s), P(w), P(gw), P(gb), None, 0) == 0
        return dx, gw, gb

    dx, gw, gb = run_both(backward)
    np.testing.assert_array_equal(x, make(case[:3], 2)[0])  # (the inputs as they came)
    dxp, gwp, gbp = bn_simd.group_norm_backward(dy, x, m.reshape(N, G), s.reshape(N, G), G, w, layout=lay)
    np.testing.assert_array_equal(dx, dxp)
    np.testing.assert_array_equal(gw, gwp)
    np.testing.assert_array_equal(gb, gbp)
    # instance norm: G = C
    yi, mi, si = np.empty_like(x), np.zeros(N * C), np.zeros(N * C)
    assert L.bn_instance_norm_forward(None, d, P(x), P(yi), P(w), P(b), EPS, P(mi), P(si), None, 0) == 0
    np.testing.assert_array_equal(yi, bn_simd.instance_norm_forward(x, w, b, eps=EPS, layout=lay)[0])
    dxi, gwi, gbi = np.empty_like(x), np.zeros(C), np.zeros(C)
    assert L.bn_instance_norm_backward(None, d, P(dy), P(x), P(dxi), P(mi), P(si), P(w), P(gwi), P(gbi), None, 0) == 0
    np.testing.assert_array_equal(dxi, bn_simd.instance_norm_backward(dy, x, mi.reshape(N, C), si.reshape(N, C), w,
                                                                      layout=lay)[0])


LN_CASES = [(np.float32, capi.NHWC, (6, 33)), (np.float64, capi.NHWC, (3, 4, 4, 16)),
            (np.float32, capi.NCHW, (3, 8, 5, 5)), (np.float16, capi.NHWC, (5, 24)), (np.float32, capi.NHWC, (700, 64))]


@pytest.mark.parametrize("case", LN_CASES, ids=[f"{np.dtype(c[0]).name}-{c[1]}-{'x'.join(map(str, c[2]))}"
                                                for c in LN_CASES])
def test_layer_and_rms_norm_match_the_package(case):
    x, C, r = make(case, 3)
    d = capi.desc(x, case[1])
    w, b = r.standard_normal(C), r.standard_normal(C)
    lay = "NCHW" if case[1] == capi.NCHW else None
    npos = x.size // C

    def forward(ctx):
        y, m, s = np.full_like(x, 7), np.zeros(npos), np.zeros(npos)
        assert L.bn_layer_norm_forward(ctx, d, P(x), P(y), P(w), P(b), EPS, P(m), P(s), None, 0) == 0
        return y, m, s

    y, m, s = run_both(forward)
    yp, mp, sp = bn_simd.layer_norm_forward(x, C, w, b, eps=EPS, layout=lay)
    np.testing.assert_array_equal(y, yp)
    np.testing.assert_array_equal(s.astype(sp.dtype), sp.ravel())
    dy = r.standard_normal(x.shape).astype(x.dtype)

    def backward(ctx):
        dx, gw, gb = np.full_like(x, 7), np.zeros(C), np.zeros(C)
        assert L.bn_layer_norm_backward(ctx, d, P(dy), P(x), P(dx), P(m), P(s), P(w), P(gw), P(gb), None, 0) == 0
        return dx, gw, gb

    dx, gw, gb = run_both(backward, pooled=False)
    np.testing.assert_array_equal(x, make(case, 3)[0])  # (the inputs as they came)
    mshape = mp.shape
    dxp, gwp, gbp = bn_simd.layer_norm_backward(dy, x, m.reshape(mshape), s.reshape(mshape), C, w, b, layout=lay)
    np.testing.assert_array_equal(dx, dxp)
    np.testing.assert_array_equal(gw, gwp)
    np.testing.assert_array_equal(gb, gbp)
    if lay is None:
        def rms(ctx):
            y2, s2 = np.full_like(x, 7), np.zeros(npos)
            assert L.bn_rms_norm_forward(ctx, d, P(x), P(y2), P(w), EPS, P(s2), None, 0) == 0
            dx2, gw2 = np.full_like(x, 7), np.zeros(C)
            assert L.bn_rms_norm_backward(ctx, d, P(dy), P(x), P(dx2), P(s2), P(w), P(gw2), None, 0) == 0
            return y2, s2, dx2, gw2

        y2, s2, dx2, gw2 = run_both(rms)
        yp2, sp2 = bn_simd.rms_norm_forward(x, C, w, eps=EPS)
        np.testing.assert_array_equal(y2, yp2)
        dxp2, gwp2 = bn_simd.rms_norm_backward(dy, x, s2.reshape(sp2.shape), C, w)
        np.testing.assert_array_equal(dx2, dxp2)
        np.testing.assert_array_equal(gw2, gwp2)


def test_fold_params_matches_the_package():
    r = rng(4)
    C = 9
    rm, rv, w, b = r.standard_normal(C), r.random(C), r.standard_normal(C), r.standard_normal(C)
    for pd, dt in ((capi.F64, np.float64), (capi.F32, np.float32)):
        args = [a.astype(dt) for a in (rm, rv, w, b)]
        sc, sh = np.zeros(C, dt), np.zeros(C, dt)
        assert L.bn_fold_params(C, pd, *map(P, args), EPS, P(sc), P(sh)) == 0
        scp, shp = bn_simd.fold_params(*args, eps=EPS)
        np.testing.assert_array_equal(sc, scp)
        np.testing.assert_array_equal(sh, shp)
    sc, sh = np.zeros(C), np.zeros(C)
    assert L.bn_fold_params(C, capi.F64, P(rm), P(rv), None, None, EPS, P(sc), P(sh)) == 0
    np.testing.assert_array_equal(sc, 1.0 / np.sqrt(rv + EPS))


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5]], ids=[IDS[0], IDS[3], IDS[5]])
def test_moments_of_pieces_merge_to_the_statistics_of_the_whole(case):
    x, C, _ = make(case, 5)

    def moments(ctx, arr):
        dd = capi.desc(arr, case[1])
        K = ct.c_int64(0)
        assert L.bn_batch_norm_moments(ctx, dd, P(arr), ct.byref(K), None, None, None, None, None, 0) == 0
        cnt, sh, rs, m2 = np.zeros(K.value), np.zeros((K.value, C)), np.zeros((K.value, C)), np.zeros((K.value, C))
        assert L.bn_batch_norm_moments(ctx, dd, P(arr), ct.byref(K), P(cnt), P(sh), P(rs), P(m2), None, 0) == 0
        return cnt, sh, rs, m2

    parts = run_both(lambda ctx: moments(ctx, x))
    mean, var = np.zeros(C), np.zeros(C)
    assert L.bn_merge_moments(len(parts[0]), C, capi.F64, *map(P, parts), P(mean), P(var)) == 0
    mp, vp = bn_simd.batch_stats(x, layout=layout_name(case[1]))
    np.testing.assert_array_equal(mean, mp)
    np.testing.assert_array_equal(var, vp)


# ---- arguments: a status, and nothing written -------------------------------------------------------------------

def _bn_training_call(**over):
    """A valid training call on a small float32 batch, with some arguments replaced; returns (status, outputs)."""
    r = rng(6)
    x = r.standard_normal((3, 4, 2, 2)).astype(np.float32)
    a = dict(ctx=None, d=capi.desc(x), x=P(x), y=None, w=None, b=None, eps=EPS, momentum=0.1, rm=None, rv=None,
             sm=None, si=None, ws=None, wsb=0)
    outs = dict(y=np.full_like(x, 3.0), rm=np.full(4, 0.5), rv=np.full(4, 2.0), sm=np.full(4, 9.0),
                si=np.full(4, 9.0))
    for k in outs:
        a[k] = P(outs[k])
    a.update(over)
    st = L.bn_batch_norm_training(a["ctx"], a["d"], a["x"], a["y"], a["w"], a["b"], a["eps"], a["momentum"], a["rm"],
                                  a["rv"], a["sm"], a["si"], a["ws"], a["wsb"])
    return st, outs


def _untouched(outs):
    return (np.all(outs["y"] == 3.0) and np.all(outs["rm"] == 0.5) and np.all(outs["rv"] == 2.0)
            and np.all(outs["sm"] == 9.0) and np.all(outs["si"] == 9.0))


def _d(**kw):
    d = capi.Desc(capi.F32, capi.F64, capi.NCHW, 3, 4, 4)
    for k, v in kw.items():
        setattr(d, k, v)
    return d


BAD = [
    ("eps = -1 (the issue's case)", dict(eps=-1.0), "EEPS"),
    ("eps = 0", dict(eps=0.0), "EEPS"),
    ("eps NaN", dict(eps=float("nan")), "EEPS"),
    ("eps inf", dict(eps=float("inf")), "EEPS"),
    ("momentum -0.1", dict(momentum=-0.1), "EMOMENTUM"),
    ("momentum 1.5", dict(momentum=1.5), "EMOMENTUM"),
    ("momentum NaN", dict(momentum=float("nan")), "EMOMENTUM"),
    ("x NULL", dict(x=None), "ENULL"),
    ("y NULL", dict(y=None), "ENULL"),
    ("desc NULL", dict(d=None), "ENULL"),
    ("running_var alone", dict(rm=None), "ENULL"),
    ("n = 0", dict(d=_d(n=0)), "ESIZE"),
    ("c = -1", dict(d=_d(c=-1)), "ESIZE"),
    ("s = 0", dict(d=_d(s=0)), "ESIZE"),
    ("n c s overflows", dict(d=_d(n=1 << 40, c=1 << 20)), "ESIZE"),
    ("2^52 elements (workspace sums would overflow)", dict(d=_d(n=1 << 26, c=1 << 26)), "ESIZE"),
    ("layout 2", dict(d=_d(layout=2)), "ELAYOUT"),
    ("dtype 7", dict(d=_d(dtype=7)), "EDTYPE"),
    ("param dtype f16", dict(d=_d(param_dtype=capi.F16)), "EDTYPE"),
    ("workspace bytes without a buffer", dict(wsb=64), "EWORKSPACE"),
]


@pytest.mark.parametrize("what,over,status", BAD, ids=[b[0] for b in BAD])
def test_a_bad_argument_gives_its_status_and_writes_nothing(what, over, status):
    st, outs = _bn_training_call(**over)
    assert st == capi.STATUS[status], (what, st, L.bn_strerror(st))
    assert _untouched(outs), what


def test_overlapping_outputs_give_eoverlap_and_write_nothing():
    st, outs = _bn_training_call()
    assert st == 0
    st, outs = _bn_training_call()
    # save_mean on running_mean, then y half over x
    o2 = np.full(4, 9.0)
    st, outs = _bn_training_call(sm=P(o2), si=P(o2))
    assert st == capi.STATUS["EOVERLAP"] and _untouched(outs) and np.all(o2 == 9.0)
    x = np.zeros(100, np.float32)
    st, outs = _bn_training_call(x=P(x), y=P(x) + 8)
    assert st == capi.STATUS["EOVERLAP"]


@pytest.mark.parametrize("at_x", ["sm", "rm", "y_and_sm"])
def test_an_output_other_than_y_at_x_is_an_overlap(at_x):
    """Only y may sit at x (in place): statistics written at x's address would overwrite the data being read."""
    x = rng(6).standard_normal((3, 4, 2, 2)).astype(np.float32)
    kept = x.copy()
    over = {k: P(x) for k in ("y", "sm") if k in at_x} if at_x != "rm" else {"rm": P(x)}
    st, outs = _bn_training_call(x=P(x), **over)
    assert st == capi.STATUS["EOVERLAP"] and np.array_equal(x, kept)


def test_in_place_inference_with_a_parameter_at_x_is_an_overlap():
    x = rng(7).standard_normal((3, 4, 2, 2)).astype(np.float32)
    kept, d = x.copy(), capi.desc(x)
    rm, rv, w = np.zeros(4), np.ones(4), np.ones(4)
    st = L.bn_batch_norm_inference(None, d, P(x), P(x), P(rm), P(rv), P(w), P(x), EPS, None, 0)  # bias at x
    assert st == capi.STATUS["EOVERLAP"] and np.array_equal(x, kept)
    assert L.bn_batch_norm_inference(None, d, P(x), P(x), P(rm), P(rv), P(w), None, EPS, None, 0) == 0  # y == x


def test_workspace_smaller_than_its_size_is_refused_and_exact_size_allocates_nothing_else():
    x, C, r = make(CASES[5], 7)
    d = capi.desc(x, capi.NHWC)
    need = ct.c_size_t(0)
    assert L.bn_workspace_size(None, capi.OPS["training"], d, 1, ct.byref(need)) == 0
    assert need.value > 0
    ws = np.zeros(need.value + 64, np.uint8)
    y, sm, si = np.full_like(x, 3), np.zeros(C), np.zeros(C)
    st = L.bn_batch_norm_training(None, d, P(x), P(y), None, None, EPS, 0.1, None, None, P(sm), P(si), P(ws) + 1,
                                  need.value - 1)
    assert st == capi.STATUS["EWORKSPACE"] and np.all(y == 3)
    st = L.bn_batch_norm_training(None, d, P(x), P(y), None, None, EPS, 0.1, None, None, P(sm), P(si), P(ws) + 1,
                                  need.value)
    assert st == 0
    np.testing.assert_array_equal(y, bn_simd.batch_norm_forward(x, layout="NHWC")[0])
    # a workspace over an input or an output: refused, nothing written
    y2 = np.full_like(x, 3)
    xb = np.concatenate([x.reshape(-1), np.zeros(need.value // 4 + 16, np.float32)])
    st = L.bn_batch_norm_training(None, d, P(xb), P(y2), None, None, EPS, 0.1, None, None, P(sm), P(si), P(xb) + 4,
                                  need.value)
    assert st == capi.STATUS["EOVERLAP"] and np.all(y2 == 3)
    st = L.bn_batch_norm_training(None, d, P(x), P(y2), None, None, EPS, 0.1, None, None, P(sm), P(si), P(y2),
                                  need.value)
    assert st == capi.STATUS["EOVERLAP"] and np.all(y2 == 3)
    assert L.bn_workspace_size(None, 99, d, 1, ct.byref(need)) == capi.STATUS["EOP"]
    assert L.bn_workspace_size(None, capi.OPS["group_forward"], d, 3, ct.byref(need)) == capi.STATUS["EGROUPS"]


def test_group_and_layer_norm_check_their_own_arguments():
    x = rng(8).standard_normal((2, 6, 3)).astype(np.float32)
    d = capi.desc(x)
    y = np.full_like(x, 3)
    m, s = np.zeros(12), np.zeros(12)
    assert L.bn_group_norm_forward(None, d, 4, P(x), P(y), None, None, EPS, P(m), P(s), None, 0) == \
        capi.STATUS["EGROUPS"]
    assert L.bn_group_norm_forward(None, d, 0, P(x), P(y), None, None, EPS, P(m), P(s), None, 0) == \
        capi.STATUS["EGROUPS"]
    assert L.bn_layer_norm_forward(None, d, P(x), P(y), None, None, -1.0, P(m), P(s), None, 0) == capi.STATUS["EEPS"]
    assert L.bn_rms_norm_backward(None, d, P(x), P(x), P(y), None, None, None, None, 0) == capi.STATUS["ENULL"]
    assert L.bn_fold_params(3, capi.F64, P(m), P(-np.ones(3)), None, None, EPS, P(y), P(s)) == capi.STATUS["EINVAL"]
    assert L.bn_merge_moments(1, 3, capi.F64, P(np.zeros(1)), P(m), P(m), P(m), P(y), P(s)) == capi.STATUS["ESIZE"]
    assert np.all(y == 3)


def test_contexts_check_their_arguments():
    assert L.bn_context_set_num_threads(None, 2) != 0
    c = L.bn_context_create()
    try:
        assert L.bn_context_set_num_threads(c, -1) == capi.STATUS["EINVAL"]
        assert L.bn_context_set_isa(c, 17) == capi.STATUS["EISA"]
        assert L.bn_context_set_isa(c, 0) == 0
    finally:
        L.bn_context_destroy(c)


# ---- ONNX's BatchNormalization cases (test_batchnorm_example, _epsilon, _example_training_mode), against the float64
# oracle ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-5, 1e-2], ids=["example", "epsilon"])
def test_onnx_batchnorm_cases_against_the_oracle(eps):
    import bounds
    import oracle as ref

    r = rng(9)
    x = r.standard_normal((2, 3, 4, 5)).astype(np.float32)
    s, bias, mean = (r.standard_normal(3).astype(np.float32) for _ in range(3))
    var = r.random(3).astype(np.float32)
    d = capi.desc(x, param=capi.F32)
    y = np.empty_like(x)
    assert L.bn_batch_norm_inference(None, d, P(x), P(y), P(mean), P(var), P(s), P(bias), eps, None, 0) == 0
    want = ref.inference(x, mean, var, s, bias, eps)
    bounds.assert_within(y, want, bounds.forward_bound(x, np.float32, 40, s, bias, eps, mean=mean, var=var,
                                                       batch_stats=False), "inference y")
    # training mode, ONNX's momentum 0.9 (running * 0.9 + batch * 0.1): ours is 1 - 0.9; ONNX's running variance
    # takes the biased batch variance, ours the unbiased one (PyTorch's), n / (n - 1) apart
    rm, rv, sm, si = mean.copy(), var.copy(), np.zeros(3, np.float32), np.zeros(3, np.float32)
    assert L.bn_batch_norm_training(None, d, P(x), P(y), P(s), P(bias), eps, 1 - 0.9, P(rm), P(rv), P(sm), P(si),
                                    None, 0) == 0
    bm, bv, n = ref.stats(x)
    bounds.assert_within(y, ref.forward_train(x, s, bias, eps)[0], bounds.forward_bound(x, np.float32, n, s, bias, eps),
                         "training y")
    tol = bounds.stat_tol(n, np.float32) * 4
    bounds.assert_within(rm, 0.9 * mean + (1 - 0.9) * bm, tol * (np.abs(mean) + np.abs(bm)), "running mean")
    bounds.assert_within(rv, 0.9 * var + (1 - 0.9) * bv * n / (n - 1), tol * (var + bv), "running var")


def test_bfloat16_data_matches_the_package():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    r = rng(10)
    x = (r.standard_normal((4, 6, 9)) * 3 + 1).astype(ml_dtypes.bfloat16)
    C = 6
    d = capi.desc(x.view(np.uint16), capi.NCHW, dtype=capi.BF16)
    w, b = r.standard_normal(C), r.standard_normal(C)

    def training(ctx):
        y, sm, si = np.zeros(x.shape, np.uint16), np.zeros(C), np.zeros(C)
        assert L.bn_batch_norm_training(ctx, d, P(x), P(y), P(w), P(b), EPS, 0.1, None, None, P(sm), P(si),
                                        None, 0) == 0
        return y, sm, si

    y, sm, si = run_both(training)
    yp, smp, _ = bn_simd.batch_norm_forward(x, w, b, eps=EPS)
    np.testing.assert_array_equal(y, yp.view(np.uint16))
    np.testing.assert_array_equal(sm.astype(smp.dtype), smp)
    dy = r.standard_normal(x.shape).astype(ml_dtypes.bfloat16)

    def backward(ctx):
        dx, gw, gb = np.zeros(x.shape, np.uint16), np.zeros(C), np.zeros(C)
        assert L.bn_batch_norm_backward(ctx, d, P(dy), P(x), P(dx), P(sm), P(si), P(w), 1, P(gw), P(gb), None,
                                        0) == 0
        return dx, gw, gb

    dx, gw, gb = run_both(backward)
    dxp, gwp, gbp = bn_simd.batch_norm_backward(dy, x, sm, si, w)
    np.testing.assert_array_equal(dx, dxp.view(np.uint16))
    np.testing.assert_array_equal(gw, gwp)
    np.testing.assert_array_equal(gb, gbp)
