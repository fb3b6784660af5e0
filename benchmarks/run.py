"""Time every case x op x implementation in one run and print a markdown table.

    python benchmarks/run.py [--quick] [--threads N] [--only TEXT] [--write-readme] [--json FILE] [--plot FILE]

Each time is the median of k calls after a warm-up, k chosen from the warm-up time (more calls for small
tensors, at least a few for the largest). bn_simd's GB/s counts the minimum bytes of the op (2 tensor
passes for forward-train and eval, 3 for backward); "% of probe" compares it with np.copyto on a tensor of
the same size, timed in the same run. Speed-ups are the other implementation's time over bn_simd's.

Importable: ``measure(cases)`` returns the rows, ``table(rows)`` formats them, ``plot(rows, path)`` draws
a bar chart (when matplotlib is installed). The script first calls ``cases.steady_allocator()`` (glibc:
freed memory is kept for reuse, so the NumPy baseline's temporaries do not fault in fresh pages at some
calls and not at others); ``--default-malloc`` skips that. Callers of measure() decide for themselves.
"""
import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import cases  # noqa: E402

README = os.path.join(_HERE, "README.md")
MARK_START, MARK_END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"

# time budget per measurement (seconds) and bounds on the number of timed samples
FULL = {"target_s": 1.0, "k_min": 5, "k_max": 60}
QUICK = {"target_s": 0.25, "k_min": 3, "k_max": 15}
BUSY_CORES = 0.1  # rows during which other processes used more CPU than this are flagged
SAMPLE_S = 2e-4  # calls shorter than this are timed in batches, so each sample lasts about this long


def median_seconds(fn, target_s=1.0, k_min=5, k_max=60):
    """Median time of one call of fn: one warm-up call, one call to estimate the cost, then k samples
    with k = target_s / cost clamped to [k_min, k_max]; very short calls are batched per sample."""
    fn()
    t0 = time.perf_counter()
    fn()
    est = time.perf_counter() - t0
    batch = 1
    if est < SAMPLE_S:
        batch = max(1, int(SAMPLE_S / max(est, 1e-8)))
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        est = (time.perf_counter() - t0) / batch
        batch = max(1, int(SAMPLE_S / max(est, 1e-8)))
    k = int(min(k_max, max(k_min, round(target_s / max(est * batch, 1e-9)))))
    samples = []
    for _ in range(k):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - t0) / batch)
    return float(np.median(samples)), k


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


def wait_until_idle(timeout_s, window_s=2.0):
    """Wait (at most timeout_s) for a window_s interval in which other processes use at most BUSY_CORES
    cores; returns whether one was found."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = cpu_snapshot()
        time.sleep(window_s)
        others = other_load(before, cpu_snapshot())
        if others is None or others <= BUSY_CORES:
            return True
        if time.monotonic() >= deadline:
            return False


def _gbs(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9 if ms else None


def _ratio(num, den):
    return num / den if num and den else None


def _undisturbed(fn, retries, what, progress, retry_wait_s=0):
    """Run fn() while watching the CPU use of other processes; when they used more than BUSY_CORES, wait
    (at most retry_wait_s) for the CPUs to be idle and run it again, at most `retries` more times; keep
    the least disturbed result. Returns (result, other_cores, attempts)."""
    best = None
    for attempt in range(1, retries + 2):
        if attempt > 1 and retry_wait_s > 0:
            wait_until_idle(retry_wait_s)
        before = cpu_snapshot()
        result = fn()
        others = other_load(before, cpu_snapshot())
        if best is None or (others is not None and (best[1] is None or others < best[1])):
            best = (result, others, attempt)
        if others is None or others <= BUSY_CORES:
            break
        if progress:
            progress(f"{what}: other processes used {others:.2f} cores meanwhile"
                     + ("; timing it again" if attempt <= retries else ""))
    return best


def _time_op(ws, op, names, settings, progress):
    ms, ks = {}, {}
    for name in names:
        runner = cases.IMPLEMENTATIONS[name](ws, op)
        if runner is None:
            ms[name] = ks[name] = None
            continue
        t, ks[name] = median_seconds(runner, **settings)
        ms[name] = t * 1e3
        del runner
        if progress:
            progress(f"{ws.case.id:22s} {op:9s} {name:12s} {ms[name]:10.4f} ms  (k={ks[name]})")
    return ms, ks


def measure(case_list=None, *, threads=None, quick=False, impls=None, retries=0, retry_wait_s=0, progress=None,
            **timer):
    """Time every case x op x implementation; returns one dict per (case, op).

    case_list: cases.Case objects (default cases.CASES). threads: threads for bn_simd, PyTorch and ONNX
    Runtime (None keeps the current setting of cases.THREADS). impls: names from cases.IMPLEMENTATIONS
    (default all). retries: how many times a (case, op) or a copy probe timed while other processes used
    more than BUSY_CORES cores is timed again (the least disturbed attempt is kept), after waiting at most
    retry_wait_s seconds for the other processes to leave the CPUs idle. progress: a callable
    receiving one line of text per measurement. timer: overrides of target_s / k_min / k_max.

    Row keys: case (N×C×H×W), layout, op, id, tensor_bytes, min_bytes, threads, ms {impl: median ms or
    None}, k {impl: samples}, other_cores (CPU used by other processes while the row was timed, in cores;
    None where unknown), attempts, probe_ms, probe_gbs, gbs (bn_simd), pct_probe, speedup {"numpy",
    "torch", "torch_call", "onnxruntime"} (their time / bn_simd's; "torch" uses the faster of PyTorch's
    two forms).
    """
    if threads is not None:
        cases.configure(threads)
    settings = dict(QUICK if quick else FULL, **timer)
    names = list(impls or cases.IMPLEMENTATIONS)
    if "bn_simd" not in names:
        names.insert(0, "bn_simd")
    rows = []
    for case in (cases.CASES if case_list is None else case_list):
        ws = cases.Workspace(case)
        probe_s, _, _ = _undisturbed(lambda: median_seconds(cases.copy_probe(ws), **settings)[0], retries,
                                     f"{case.id} copy probe", progress, retry_wait_s)
        probe_ms = probe_s * 1e3
        probe_gbs = _gbs(cases.probe_bytes(case), probe_ms)
        if progress:
            progress(f"{case.id:22s} copy probe  {probe_ms:10.4f} ms")
        for op in case.ops:
            (ms, ks), others, attempts = _undisturbed(lambda: _time_op(ws, op, names, settings, progress),
                                                      retries, f"{case.id} {op}", progress, retry_wait_s)
            ours = ms["bn_simd"]
            torch_best = min((v for v in (ms.get("torch"), ms.get("torch_out")) if v), default=None)
            gbs = _gbs(case.min_bytes(op), ours)
            rows.append({
                "case": case.label, "layout": case.layout_label, "op": op, "id": case.id,
                "tensor_bytes": case.nbytes, "min_bytes": case.min_bytes(op), "threads": cases.THREADS,
                "ms": ms, "k": ks, "other_cores": others, "attempts": attempts,
                "probe_ms": probe_ms, "probe_gbs": probe_gbs, "gbs": gbs, "pct_probe": 100 * gbs / probe_gbs,
                "speedup": {"numpy": _ratio(ms.get("numpy"), ours), "torch": _ratio(torch_best, ours),
                            "torch_call": _ratio(ms.get("torch"), ours),
                            "onnxruntime": _ratio(ms.get("onnxruntime"), ours)},
            })
        del ws
    return rows


# ---- report -----------------------------------------------------------------------------------------------

def machine():
    """CPU model (/proc/cpuinfo "model name"), logical cores and L3 size where the system tells."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    line = f"{model}, {os.cpu_count()} cores ({platform.machine()})"
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            size = f.read().strip()
        if size.endswith("K") and size[:-1].isdigit() and int(size[:-1]) % 1024 == 0:
            size = f"{int(size[:-1]) // 1024} MiB"
        line += f", L3 {size}"
    except OSError:
        pass
    return line


def _load():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _ms(v):
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    if v >= 0.1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def _x(v):
    return "—" if v is None else (f"{v:.1f}×" if v >= 10 else f"{v:.2f}×")


def _num(v, spec):
    return "—" if v is None else format(v, spec)


def table(rows):
    """The markdown table of measure()'s rows, with a header line and geometric means of the speed-ups."""
    v = cases.versions()
    libs = [f"NumPy {v['numpy']}"] + [f"{t} {v[k]}" for k, t in (("torch", "PyTorch"), ("onnxruntime", "ONNX Runtime"))
                                      if v[k]]
    threads = sorted({r["threads"] for r in rows})
    lines = [
        f"Machine: {machine()}. bn_simd {v['bn_simd']} ({cases.bn_simd.get_isa()} kernels), "
        f"{', '.join(libs)}; float32, {'/'.join(map(str, threads))} thread(s)"
        f"{'; glibc malloc with fixed thresholds' if cases.STEADY_MALLOC else ''}; medians in ms.",
        "",
        "| case | op | layout | bn_simd ms | NumPy ms | PyTorch ms | PyTorch out= ms | ONNX RT ms "
        "| bn_simd GB/s | % of probe | vs NumPy | vs PyTorch |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['case']} | {cases.OP_TITLES[r['op']]} | {r['layout']} | {_ms(ms['bn_simd'])} "
            f"| {_ms(ms.get('numpy'))} | {_ms(ms.get('torch'))} | {_ms(ms.get('torch_out'))} "
            f"| {_ms(ms.get('onnxruntime'))} | {_num(r['gbs'], '.1f' if r['gbs'] >= 1 else '.3f')} | {_num(r['pct_probe'], '.0f')} % "
            f"| {_x(r['speedup']['numpy'])} | {_x(r['speedup']['torch'])} |")
    lines.append("")
    parts = []
    for label, sel in [("all", rows)] + [(cases.OP_TITLES[op], [r for r in rows if r["op"] == op]) for op in cases.OPS]:
        if not sel:
            continue
        gm_np = geomean(r["speedup"]["numpy"] for r in sel)
        gm_t = geomean(r["speedup"]["torch"] for r in sel)
        parts.append(f"{label} ({len(sel)}): {_x(gm_np)} vs NumPy, {_x(gm_t)} vs PyTorch")
    lines.append("Geometric means of the speed-ups — " + "; ".join(parts) + ".")
    return "\n".join(lines)


def write_readme(text, path=README):
    """Replace the text between the bench-table markers of path with text."""
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    start, end = doc.find(MARK_START), doc.find(MARK_END)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {MARK_START} ... {MARK_END} markers")
    doc = doc[:start + len(MARK_START)] + "\n" + text.strip("\n") + "\n" + doc[end:]
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)


def plot(rows, path):
    """Bar chart of GB/s (minimum bytes / time) per case and op, one bar per implementation, saved to path.
    Returns path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n in cases.IMPLEMENTATIONS if any(r["ms"].get(n) for r in rows)]
    labels = [f"{r['case']} {r['layout']}\n{cases.OP_TITLES[r['op']]}" for r in rows]
    width = 0.8 / (len(names) + 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 5))
    xs = np.arange(len(rows))
    for i, name in enumerate(names):
        vals = [_gbs(r["min_bytes"], r["ms"].get(name)) or 0 for r in rows]
        ax.bar(xs + i * width, vals, width, label=cases.IMPL_TITLES[name])
    ax.bar(xs + len(names) * width, [r["probe_gbs"] for r in rows], width, label="copy probe", color="0.8")
    ax.set_xticks(xs + 0.4 - width / 2)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("GB/s (minimum bytes / time)")
    ax.set_title(f"batch norm, float32, {rows[0]['threads'] if rows else '?'} thread(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="Time bn_simd against NumPy, PyTorch and ONNX Runtime.")
    p.add_argument("--quick", action="store_true", help="a subset of the cases and fewer repeats")
    p.add_argument("--threads", type=int, default=2, help="threads for bn_simd, PyTorch and ONNX Runtime")
    p.add_argument("--only", metavar="TEXT", help="only the cases whose id contains TEXT (e.g. NHWC, 2048)")
    p.add_argument("--write-readme", action="store_true",
                   help="replace the table between the markers in benchmarks/README.md")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--plot", metavar="FILE", help="also draw a bar chart (needs matplotlib)")
    p.add_argument("--retries", type=int, default=2,
                   help="time a row again (at most this often) when other processes used CPU meanwhile")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="wait (at most this long) for other processes to leave the CPUs idle, before the run "
                        "and before each retry")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc thresholds adaptive (see cases.steady_allocator)")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error("--threads must be >= 1")
    chosen = cases.QUICK_CASES if a.quick else cases.CASES
    if a.only:
        chosen = [c for c in chosen if a.only in c.id]
        if not chosen:
            p.error(f"no case id contains {a.only!r}; ids: {', '.join(c.id for c in cases.CASES)}")
    if not a.default_malloc:
        cases.steady_allocator()
    if a.wait_idle > 0 and not wait_until_idle(a.wait_idle):
        print(f"warning: other processes kept the CPUs busy for {a.wait_idle:g} s; starting anyway",
              file=sys.stderr)
    load = _load()
    if load is not None and load > 0.25 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.2f} before the run; other processes will skew the timings",
              file=sys.stderr)
    rows = measure(chosen, threads=a.threads, quick=a.quick, retries=max(0, a.retries), retry_wait_s=a.wait_idle,
                   progress=lambda s: print(s, file=sys.stderr, flush=True))
    text = table(rows)
    print(text)
    busy = [f"{r['id']} {r['op']} ({r['other_cores']:.2f})" for r in rows
            if r["other_cores"] is not None and r["other_cores"] > BUSY_CORES]
    if busy:
        print(f"warning: other processes used CPU while these rows were timed (cores): {', '.join(busy)}",
              file=sys.stderr)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine(), "versions": cases.versions(), "isa": cases.bn_simd.get_isa(),
                       "steady_malloc": cases.STEADY_MALLOC,
                       "load_before": load, "load_after": _load(), "rows": rows}, f, indent=1)
    if a.plot and plot(rows, a.plot) is None:
        print("--plot: matplotlib is not installed", file=sys.stderr)
    if a.write_readme:
        write_readme(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
