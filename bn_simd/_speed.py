"""The short speed table of ``python -m bn_simd``: bn_simd against the plain-NumPy baseline (``_baseline``)
on a few float32 cases, in a few seconds.

The two are timed alternately, one sample of each per round (the order swapping from round to round), so
that a slow spell of the machine falls on both and the ratio holds. The full comparison (more cases,
PyTorch, ONNX Runtime, tracking of other processes' load) is ``python benchmarks/run.py`` in a source
checkout.
"""
import os
import time

import numpy as np

from . import _baseline
from . import functional as F

EPS, MOMENTUM = 1e-5, 0.1
ALL = ("forward", "backward", "eval")
# (array shape as stored, layout, modes); an NHWC array is (N, H, W, C)
CASES = [((32, 64, 56, 56), "NCHW", ALL), ((32, 56, 56, 64), "NHWC", ALL), ((256, 1024), "NCHW", ALL),
         ((1, 64, 56, 56), "NCHW", ("eval",))]
PASSES = {"forward": 2, "backward": 3, "eval": 2}  # minimum tensor passes: read x (and dy), write y (or dx)
TITLES = {"forward": "train fwd", "backward": "backward", "eval": "eval"}
SAMPLE_S = 2e-4  # calls shorter than this are timed in batches lasting about this long


def _calls(shape, layout, seed=0):
    """({mode: bn_simd call}, {mode: NumPy baseline call}) on one set of arrays; bn_simd writes into a
    preallocated output, the baseline allocates as NumPy code does."""
    rng = np.random.default_rng(seed)
    C = shape[1] if layout == "NCHW" else shape[-1]
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    out = np.empty_like(x)
    w, b = rng.uniform(0.5, 1.5, C).astype(np.float32), rng.uniform(-0.5, 0.5, C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    em, ev = rng.uniform(-0.2, 0.2, C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)
    _, sm, si = F.batch_norm_forward(x, w, b, eps=EPS, layout=layout)
    ours = {"forward": lambda: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, layout=layout, out=out),
            "backward": lambda: F.batch_norm_backward(dy, x, sm, si, w, layout=layout, out=out),
            "eval": lambda: F.batch_norm(x, em, ev, w, b, False, MOMENTUM, EPS, layout=layout, out=out)}
    baseline = {"forward": lambda: _baseline.forward_train(x, w, b, EPS, layout),
                "backward": lambda: _baseline.backward(dy, x, sm, si, w, layout),
                "eval": lambda: _baseline.inference(x, em, ev, w, b, EPS, layout)}
    return ours, baseline


def _plan(fn):
    """(calls per sample, seconds per call) from a warm-up call and one timed call."""
    fn()
    t0 = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t0, 1e-8)
    return max(1, int(SAMPLE_S / est)), est


def interleaved_medians(fns, budget_s=0.3, k_min=3, k_max=25):
    """Median seconds of one call of each fn, from k samples each taken in alternating rounds; every sample
    follows an untimed call of the same fn, so it times a steady-state call whatever ran before."""
    plans = [_plan(fn) for fn in fns]
    per_round = sum((batch + 1) * est for batch, est in plans)
    k = int(min(k_max, max(k_min, budget_s / per_round)))
    samples = [[] for _ in fns]
    for r in range(k):
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            fn, batch = fns[i], plans[i][0]
            fn()
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            samples[i].append((time.perf_counter() - t0) / batch)
    return [float(np.median(s)) for s in samples]


def speed_table(cases=CASES, budget_s=0.3, out=print):
    """Time bn_simd and the NumPy baseline on cases and print a markdown table; returns its rows as dicts
    (case, layout, mode, bn_simd_ms, numpy_ms, gbs, speedup)."""
    out(f"| {'case':18s} | {'layout':6s} | {'op':9s} | {'bn_simd ms':>10s} | {'NumPy ms':>9s} "
        f"| {'bn_simd GB/s':>12s} | {'speed-up':>8s} |")
    out("|" + "|".join("-" * n for n in (20, 8, 11, 12, 11, 14, 10)) + "|")
    rows = []
    start = cpu_snapshot()
    for shape, layout, modes in cases:
        ours, baseline = _calls(shape, layout)
        nbytes = int(np.prod(shape)) * 4
        label = "x".join(map(str, shape))
        for mode in modes:
            t_ours, t_np = interleaved_medians([ours[mode], baseline[mode]], budget_s)
            gbs = PASSES[mode] * nbytes / t_ours / 1e9
            rows.append({"case": label, "layout": layout, "mode": mode, "bn_simd_ms": t_ours * 1e3,
                         "numpy_ms": t_np * 1e3, "gbs": gbs, "speedup": t_np / t_ours})
            out(f"| {label:18s} | {layout:6s} | {TITLES[mode]:9s} | {t_ours * 1e3:10.3f} | {t_np * 1e3:9.3f} "
                f"| {gbs:12.1f} | {t_np / t_ours:7.1f}x |")
        del ours, baseline
    out("\nShapes as stored (an NHWC array is N, H, W, C); float32; medians, the two timed alternately. GB/s "
        "counts the minimum traffic: 2 tensor passes (read x, write y) for forward and eval, 3 for backward.")
    others = other_load(start, cpu_snapshot())
    if others is not None and others > 0.5:
        out(f"Note: other processes kept {others:.1f} cores busy meanwhile: bn_simd's threads waited for cores and its "
            f"figures read low (OMP_NUM_THREADS=1, or BN_SIMD_SPIN_US=0, shows the kernels' own on a busy machine).")
    return rows


def cpu_snapshot():
    """(busy CPU seconds of the whole machine, of which stolen by the hypervisor, of this process, wall
    clock), or None where /proc/stat is not available."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    busy = sum(v[:3]) + sum(v[5:8])  # user nice system irq softirq steal
    steal = v[7] if len(v) > 7 else 0
    t = os.times()
    return busy / hz, steal / hz, t.user + t.system, time.monotonic()


def other_load(before, after):
    """Cores kept busy by other processes (or stolen by the hypervisor) between two snapshots."""
    if before is None or after is None or after[3] <= before[3]:
        return None
    busy, _, own, wall = (b - a for a, b in zip(before, after))
    return max(0.0, busy - own) / wall
