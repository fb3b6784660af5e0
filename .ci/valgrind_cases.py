"""Small cases for running every bn_simd kernel under valgrind's memcheck (see .ci/valgrind).

Every public entry point (batch_norm in training and eval mode, through its fast path and its general path,
in place and not, batch_norm_forward, batch_norm_backward in training and eval mode, batch_stats,
normalize, backward_reduce, backward_apply, a layer's forward and backward, and the internal apply kernel)
runs on small odd shapes around the vector widths, in both dtypes, both layouts, each ISA given (default:
scalar and avx2, the ones valgrind can emulate; it has no AVX-512), on 1 and 2 threads. Larger cases make
the kernels actually fork threads (more than 32768 elements) and split rows into pieces, and the largest
write their output with streaming stores (element-wise sweeps over more than 32 MiB).

Every output is compared with a float64 NumPy reference (the largest ones on a sample, and checked finite
throughout). Memcheck reports an uninitialised value only where it decides a branch or leaves the process,
so these comparisons are what make an output element that a kernel failed to write show up as an error.

    python .ci/valgrind_cases.py [ISA ...]       # prints one line per ISA and a closing summary line
"""
import sys
import time

import numpy as np

import bn_simd
from bn_simd import _core

# logical (N, C, *spatial) shapes; NHWC stores them channels-last
SMALL = [
    (5, 3),             # (N, C): channels-last kernels in both layouts
    (4, 7, 9),          # C one below an AVX2 float vector, inner one past
    (3, 9, 17),         # one past a vector, one past two
    (2, 17, 3, 11),     # inner 33: four-vector loop plus a tail
    (2, 3, 2, 3, 7),    # rank 5
    (3, 1, 37),         # one channel: a single long run
    (6, 33, 1, 1),      # inner 1 in NCHW: the channels-last path
    (0, 4, 3),          # empty batch
]
# more than 32768 elements, so that a second thread really runs
THREADED = [
    (4, 33, 17, 17),    # NCHW: channel blocks with a partial last block; NHWC: odd C
    (2, 300, 9, 7),     # NHWC: more channels than one accumulator block (256)
]
# (shape, layout, dtype) with more than 32 MiB in each element-wise sweep (input and output; grad_out, input
# and output in the backward one): output written with streaming stores. NCHW rows are longer than a
# statistics chunk (row pieces with a short last one); NHWC has an odd channel count.
LARGE = [
    ((2, 2, 301, 3503), "NCHW", np.float32),
    ((44, 2048, 7, 7), "NCHW", np.float32),    # 7x7 maps: streamed vectors straddling two channels (blended)
    ((2, 3, 301, 1223), "NCHW", np.float64),
    ((8, 7, 301, 251), "NHWC", np.float32),
    ((4, 7, 301, 263), "NHWC", np.float64),
    ((4, 1296, 29, 29), "NHWC", np.float32),   # wide rows: element-wise sweeps in column strips, streamed
    ((2, 616, 61, 61), "NHWC", np.float64),
]

TOL = {np.float32: 2e-4, np.float64: 1e-10}
EPS = 1e-5


def c_axis(layout, ndim):
    return 1 if layout == "NCHW" else ndim - 1


def store(a, layout):
    """A (N, C, *spatial) array stored C-contiguous in `layout`."""
    return np.ascontiguousarray(a if layout == "NCHW" else np.moveaxis(a, 1, -1))


def bshape(x, layout):
    s = [1] * x.ndim
    s[c_axis(layout, x.ndim)] = x.shape[c_axis(layout, x.ndim)]
    return tuple(s)


def red_axes(x, layout):
    ax = c_axis(layout, x.ndim)
    return tuple(i for i in range(x.ndim) if i != ax)


def ref_stats(x, layout):
    x64 = x.astype(np.float64)
    axes = red_axes(x, layout)
    return x64.mean(axis=axes), x64.var(axis=axes)


def ref_norm(x, mean, var, w, b, layout):
    s = bshape(x, layout)
    y = (x.astype(np.float64) - mean.reshape(s)) / np.sqrt(var.reshape(s) + EPS)
    return y * w.reshape(s) + b.reshape(s)


def ref_backward(dy, x, mean, invstd, w, layout, training):
    s = bshape(x, layout)
    axes = red_axes(x, layout)
    n = max(x.size // max(x.shape[c_axis(layout, x.ndim)], 1), 1)
    dy64 = dy.astype(np.float64)
    xhat = (x.astype(np.float64) - mean.reshape(s)) * invstd.reshape(s)
    gb = dy64.sum(axis=axes)
    gw = (dy64 * xhat).sum(axis=axes)
    ws = (w * invstd).reshape(s)
    gx = ws * (dy64 - gb.reshape(s) / n - xhat * gw.reshape(s) / n) if training else ws * dy64
    return gx, gw, gb


def check(what, got, expected, dtype, scale=1.0):
    got = np.asarray(got, np.float64)
    expected = np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: shape {got.shape} != {expected.shape}")
    bad = ~(np.abs(got - expected) <= TOL[dtype] * scale * (1.0 + np.abs(expected)))
    if bad.any():
        i = np.unravel_index(np.argmax(bad), bad.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements off, e.g. at {i}: "
                             f"{got[i]!r} vs {expected[i]!r}")


def run_case(nchw_shape, layout, dtype, seed):
    """Every entry point on one array; returns the number of kernel calls made."""
    rng = np.random.default_rng(seed)
    x = store((rng.standard_normal(nchw_shape) * 1.5 + 0.5).astype(dtype), layout)
    dy = store(rng.standard_normal(nchw_shape).astype(dtype), layout)
    C = nchw_shape[1]
    n = x.size // C if C else 0
    w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    b = rng.standard_normal(C)
    tag = f"{'x'.join(map(str, nchw_shape))} {layout} {np.dtype(dtype).name}"
    big = 8.0 * np.sqrt(max(n, 1))  # float32 sums of n values: the reference is float64
    calls = 0

    # statistics
    mean, var = bn_simd.batch_stats(x, layout=layout)
    calls += 1
    if n:
        m_ref, v_ref = ref_stats(x, layout)
        check(f"batch_stats mean {tag}", mean, m_ref, dtype)
        check(f"batch_stats var {tag}", var, v_ref, dtype)
    else:
        if not np.isnan(mean).all() or not np.isnan(var).all():
            raise AssertionError(f"batch_stats of an empty batch {tag}: expected NaN")
        m_ref, v_ref = np.zeros(C), np.ones(C)

    # eval mode: batch_norm (fast path; a list for weight takes the general path), normalize, and the
    # internal apply kernel
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    y_ref = ref_norm(x, rm, rv, w, b, layout)
    check(f"batch_norm eval {tag}", bn_simd.batch_norm(x, rm.copy(), rv.copy(), w, b, layout=layout), y_ref, dtype)
    check(f"batch_norm eval, general path {tag}",
          bn_simd.batch_norm(x, rm.copy(), rv.copy(), list(w), b, layout=layout), y_ref, dtype)
    check(f"normalize {tag}", bn_simd.normalize(x, rm, rv, w, b, layout=layout), y_ref, dtype)
    calls += 3
    if n:
        a = (w / np.sqrt(rv + EPS)).astype(dtype)
        m = rm.astype(dtype)
        bb = (b - (rm - m.astype(np.float64)) * a.astype(np.float64)).astype(dtype)
        outer = int(np.prod(x.shape[:1 if layout == "NCHW" else -1]))
        dims = (outer, C, x.size // (outer * C))
        y = np.empty_like(x)
        _core.apply(x.reshape(dims), y.reshape(dims), m, a, bb, bn_simd.get_num_threads())
        check(f"apply {tag}", y, y_ref, dtype)
        calls += 1

    # training forward: fast and general path, running statistics updated, output separate and in place
    if n > 1:
        y_ref = ref_norm(x, m_ref, v_ref, w, b, layout)
        for path, weight in (("fast", w), ("general", list(w))):
            rm2, rv2 = np.zeros(C), np.ones(C)
            y = bn_simd.batch_norm(x, rm2, rv2, weight, b, training=True, momentum=1.0, unbiased_running_var=False,
                                   layout=layout)
            check(f"batch_norm train, {path} path {tag}", y, y_ref, dtype)
            check(f"running_mean, {path} path {tag}", rm2, m_ref, dtype)
            check(f"running_var, {path} path {tag}", rv2, v_ref, dtype)
        xc = x.copy()
        bn_simd.batch_norm(xc, training=True, layout=layout, out=xc)
        check(f"batch_norm train in place {tag}", xc, ref_norm(x, m_ref, v_ref, np.ones(C), np.zeros(C), layout),
              dtype)
        y, save_mean, save_invstd = bn_simd.batch_norm_forward(x, w, None, layout=layout)
        check(f"batch_norm_forward {tag}", y, ref_norm(x, m_ref, v_ref, w, np.zeros(C), layout), dtype)
        check(f"save_mean {tag}", save_mean, m_ref, dtype)
        check(f"save_invstd {tag}", save_invstd, 1.0 / np.sqrt(v_ref + EPS), dtype)
        calls += 4
    else:
        y, save_mean, save_invstd = bn_simd.batch_norm_forward(x, w, b, layout=layout)
        if y.shape != x.shape:
            raise AssertionError(f"batch_norm_forward of an empty batch {tag}: shape {y.shape}")
        save_mean, save_invstd = m_ref.astype(dtype), (1.0 / np.sqrt(v_ref + EPS)).astype(dtype)
        calls += 1

    # backward: training and eval, separate output and in place over grad_out
    mean64, invstd64 = save_mean.astype(np.float64), save_invstd.astype(np.float64)
    for training in (True, False):
        gx, gw, gb = bn_simd.batch_norm_backward(dy, x, save_mean, save_invstd, w, layout=layout, training=training)
        gx_ref, gw_ref, gb_ref = ref_backward(dy, x, mean64, invstd64, w, layout, training)
        check(f"grad_x training={training} {tag}", gx, gx_ref, dtype, big)
        check(f"grad_weight training={training} {tag}", gw, gw_ref, dtype, big)
        check(f"grad_bias training={training} {tag}", gb, gb_ref, dtype, big)
        calls += 1
    g = dy.copy()
    bn_simd.batch_norm_backward(g, x, save_mean, save_invstd, None, layout=layout, out=g)
    check(f"grad_x in place {tag}", g, ref_backward(dy, x, mean64, invstd64, np.ones(C), layout, True)[0], dtype,
          big)
    calls += 1

    # the backward steps on their own
    sdy, sdyx = bn_simd.backward_reduce(dy, x, mean64, layout=layout)
    _, gw_ref, gb_ref = ref_backward(dy, x, mean64, np.ones(C), np.ones(C), layout, True)
    check(f"backward_reduce sum_dy {tag}", sdy, gb_ref, dtype, big)
    check(f"backward_reduce sum_dyx {tag}", sdyx, gw_ref, dtype, big)
    ca, cb, cd = rng.standard_normal(C), rng.standard_normal(C), rng.standard_normal(C)
    gx = bn_simd.backward_apply(dy, x, mean64, ca, cb, cd, layout=layout)
    s = bshape(x, layout)
    gx_ref = ca.reshape(s) * dy + cb.reshape(s) * (x.astype(np.float64) - mean64.reshape(s)) + cd.reshape(s)
    check(f"backward_apply {tag}", gx, gx_ref, dtype, 4.0)
    calls += 2

    # a layer: forward in training mode, backward
    if n > 1:
        layer = bn_simd.BatchNorm(C, layout=layout, dtype=dtype)
        y = layer(x)
        check(f"layer forward {tag}", y, ref_norm(x, m_ref, v_ref, np.ones(C), np.zeros(C), layout), dtype)
        gx = layer.backward(dy)
        gx_ref, gw_ref, gb_ref = ref_backward(dy, x, m_ref, 1.0 / np.sqrt(v_ref + EPS), np.ones(C), layout, True)
        check(f"layer grad_x {tag}", gx, gx_ref, dtype, big)
        check(f"layer grad_weight {tag}", layer.grad_weight, gw_ref, dtype, big)
        calls += 2
    return calls


def run_large(nchw_shape, layout, dtype, seed):
    """batch_stats, the training forward and the training backward on a large array (streaming stores).

    Every output element is checked finite; the statistics and parameter gradients against the float64
    reference, and y and grad_x on a strided sample of elements. Returns the number of kernel calls."""
    rng = np.random.default_rng(seed)
    x = store((rng.standard_normal(nchw_shape) * 1.5 + 0.5).astype(dtype), layout)
    dy = store(rng.standard_normal(nchw_shape).astype(dtype), layout)
    C = nchw_shape[1]
    n = x.size // C
    w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    b = rng.standard_normal(C)
    tag = f"{'x'.join(map(str, nchw_shape))} {layout} {np.dtype(dtype).name}"
    big = 8.0 * np.sqrt(n)
    idx = np.arange(0, x.size, 97)  # flat sample
    inner = x.size // (nchw_shape[0] * C) if layout == "NCHW" else 1
    ch = (idx // inner) % C  # channel of each sampled element

    def finite(what, a):
        if not np.isfinite(a).all():
            raise AssertionError(f"{what} {tag}: non-finite values")

    mean, var = bn_simd.batch_stats(x, layout=layout)
    m_ref, v_ref = ref_stats(x, layout)
    check(f"batch_stats mean {tag}", mean, m_ref, dtype)
    check(f"batch_stats var {tag}", var, v_ref, dtype)
    y, save_mean, save_invstd = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    finite("batch_norm_forward", y)
    xs = x.ravel()[idx].astype(np.float64)
    check(f"batch_norm_forward sample {tag}", y.ravel()[idx],
          (xs - m_ref[ch]) / np.sqrt(v_ref[ch] + EPS) * w[ch] + b[ch], dtype)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x, save_mean, save_invstd, w, layout=layout)
    finite("grad_x", gx)
    mean64, invstd64 = save_mean.astype(np.float64), save_invstd.astype(np.float64)
    axes = red_axes(x, layout)
    dy64 = dy.astype(np.float64)
    gb_ref = dy64.sum(axis=axes)
    gw_ref = (dy64 * (x.astype(np.float64) - mean64.reshape(bshape(x, layout)))).sum(axis=axes) * invstd64
    check(f"grad_bias {tag}", gb, gb_ref, dtype, big)
    check(f"grad_weight {tag}", gw, gw_ref, dtype, big)
    xhat = (xs - mean64[ch]) * invstd64[ch]
    gx_ref = w[ch] * invstd64[ch] * (dy.ravel()[idx] - gb_ref[ch] / n - xhat * gw_ref[ch] / n)
    check(f"grad_x sample {tag}", gx.ravel()[idx], gx_ref, dtype, big)
    return 3


def main(argv):
    supported = bn_simd.show_config()["supported_isas"]
    isas = argv or [i for i in ("scalar", "avx2") if i in supported]
    threads = (1, 2) if bn_simd.show_config()["openmp"] else (1,)
    # Wide channels-last rows go in column strips from 24 KiB of row (the default on CPUs other than Intel's,
    # which sweep them flat like every narrow row): forced here so that the strips run under memcheck too.
    _core.set_cl_strip_bytes(24576)
    # Channels-first training forward and backward group channels in L2 (the slab path) on some CPUs and take two
    # sweeps on others: the slab path is forced here (the budget of half a 2 MiB L2), so that it runs under memcheck
    # on every CPU; the sweeps run anyway (the separate steps, in-place calls, slabs too large for the budget).
    _core.set_slab_bytes(1 << 20)
    total_cases = total_calls = 0
    for isa in isas:
        bn_simd.set_isa(isa)
        t0 = time.perf_counter()
        cases = calls = 0
        for nt in threads:
            bn_simd.set_num_threads(nt)
            shapes = SMALL + THREADED if nt > 1 else SMALL
            for dtype in (np.float32, np.float64):
                for layout in ("NCHW", "NHWC"):
                    for k, shape in enumerate(shapes):
                        calls += run_case(shape, layout, dtype, seed=1000 * nt + k)
                        cases += 1
            if nt > 1:
                for k, (shape, layout, dtype) in enumerate(LARGE):
                    calls += run_large(shape, layout, dtype, seed=7 + k)
                    cases += 1
        bn_simd.set_num_threads(None)
        print(f"valgrind_cases: isa={isa} threads={threads} cases={cases} kernel calls={calls} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        total_cases += cases
        total_calls += calls
    print(f"valgrind_cases: {total_cases} passed, 0 failed ({total_calls} kernel calls, isas {', '.join(isas)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
