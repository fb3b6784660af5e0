"""Time every case x op x implementation in one run and print (or write) the markdown table.

    python benchmarks/run.py [--quick] [--threads N] [--write-readme] [--json FILE]

Medians of repeated runs after a warm-up; GB/s counts the minimum bytes (2 tensor passes for forward and
eval, 3 for backward); "% probe" compares with np.copyto on the same tensor measured in the same run.
"""
import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cases as bc  # noqa: E402

import bn_simd  # noqa: E402


def median_ms(fn, budget_s=1.0, min_runs=5, max_runs=200):
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def measure(cases, budget_s=1.0):
    rows = []
    for case in cases:
        d = bc.Data(case)
        probe = median_ms(bc.copy_probe(d), budget_s)
        for op in case.ops:
            row = {"case": case.name, "op": op, "bytes": bc.PASSES[op] * case.nbytes(), "probe_ms": probe}
            for impl, make in bc.IMPLS.items():
                fn = make(d, op)
                row[impl] = median_ms(fn, budget_s if impl == "bn_simd" else budget_s / 2) if fn else None
            rows.append(row)
    return rows


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def table(rows, threads):
    out = [f"float32, {threads} thread(s), kernels {bn_simd.get_isa()}; medians in ms.", "",
           "| case | op | bn_simd | NumPy | PyTorch | ONNX RT | bn_simd GB/s | % of copy probe | vs NumPy | vs PyTorch |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = {"numpy": [], "torch": []}
    for r in rows:
        ours = r["bn_simd"]
        gbs = r["bytes"] / (ours * 1e-3) / 1e9
        probe_gbs = 2 * (r["bytes"] / (2 if r["op"] != "backward" else 3)) / (r["probe_ms"] * 1e-3) / 1e9
        sp = {k: (r[k] / ours if r[k] else None) for k in ratios}
        for k, v in sp.items():
            if v:
                ratios[k].append(v)
        out.append(f"| {r['case']} | {r['op']} | {ours:.3f} | {_fmt(r['numpy'], '.3f')} | {_fmt(r['torch'], '.3f')} "
                   f"| {_fmt(r['onnxruntime'], '.3f')} | {gbs:.1f} | {100 * gbs / probe_gbs:.0f} % "
                   f"| {_fmt(sp['numpy'], '.1f')}x | {_fmt(sp['torch'], '.2f')}x |")
    gm = {k: math.exp(sum(map(math.log, v)) / len(v)) if v else None for k, v in ratios.items()}
    out += ["", f"Geometric mean speed-up: {_fmt(gm['numpy'], '.1f')}x vs NumPy, {_fmt(gm['torch'], '.2f')}x vs PyTorch."]
    return "\n".join(out)


def write_readme(text, path):
    with open(path) as f:
        doc = f.read()
    new = re.sub(r"(<!-- bench-table:start -->\n).*?(<!-- bench-table:end -->)", lambda m: m.group(1) + text + "\n" + m.group(2),
                 doc, flags=re.S)
    with open(path, "w") as f:
        f.write(new)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer cases, shorter timing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-readme", action="store_true")
    p.add_argument("--json")
    a = p.parse_args(argv)
    bn_simd.set_num_threads(a.threads)
    if bc.torch is not None:
        bc.torch.set_num_threads(a.threads)
    rows = measure(bc.QUICK if a.quick else bc.CASES, 0.3 if a.quick else 1.0)
    text = table(rows, a.threads)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.write_readme:
        write_readme(text, os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"))


if __name__ == "__main__":
    main()
