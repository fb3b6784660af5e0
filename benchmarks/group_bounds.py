"""Group and instance norm against the passes over memory they need, measured with bn_simd's own kernels.

    python benchmarks/group_bounds.py [--threads 2] [--target 1.5] [--json FILE]

For each case (float32) and layout, one process times these calls alternately (harness/timing.py,
interleaved_medians), so that their ratios hold while the machine's speed drifts:

  eval      batch_norm(training=False): read x, write y (2 passes; every ratio below is to this time)
  stats     batch_stats: read x once (the statistics kernel alone)
  bn fwd    batch_norm(training=True): statistics, then the normalise (3 passes: x is read twice)
  bn bwd    batch_norm_backward: the sums (read dy, x), then dx (read dy, x, write dx): 5 passes
  fwd, bwd  the group-norm (instance-norm) forward and backward of the same tensor

A channels-first group (D channels of one sample, contiguous) is small enough to stay in the core's L2 between its
statistics and its normalise, so its forward can read x from memory once (bound: about the eval) and its backward
dy and x once (bound: the sums' read plus a write of dx). A channels-last group is spread over a whole sample (S C
elements, larger than an L2 at these shapes) and a sample's statistics precede every output of it: x is read twice
forward and dy, x twice backward, the passes of batch norm's training calls, so "fwd / bn fwd" and "bwd / bn bwd"
compare them with those calls, which run at the machine's bandwidth (benchmarks/README.md).
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bn_simd  # noqa: E402
from benchmarks.harness import machine, timing  # noqa: E402

# (name, shape in NCHW order, groups): the anchors and a batch-1 latency case
CASES = (
    ("GN", (8, 256, 56, 56), 32),
    ("GN", (32, 512, 28, 28), 32),
    ("IN", (8, 64, 128, 128), 64),
    ("GN", (1, 64, 56, 56), 32),
)
CALLS = ("eval", "stats", "bn fwd", "bn bwd", "fwd", "bwd")


def _calls(shape, groups, layout, rng):
    n, c = shape[0], shape[1]
    if layout == "NHWC":
        shape = (n,) + tuple(shape[2:]) + (c,)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    _, bmean, binv = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    _, gmean, ginv = bn_simd.group_norm_forward(x, groups, w, b, layout=layout)
    return {
        "eval": lambda: bn_simd.batch_norm(x, rm, rv, w, b, training=False, layout=layout, out=y),
        "stats": lambda: bn_simd.batch_stats(x, layout=layout),
        "bn fwd": lambda: bn_simd.batch_norm(x, None, None, w, b, training=True, layout=layout, out=y),
        "bn bwd": lambda: bn_simd.batch_norm_backward(dy, x, bmean, binv, w, layout=layout, out=dx),
        "fwd": lambda: bn_simd.group_norm(x, groups, w, b, layout=layout, out=y),
        "bwd": lambda: bn_simd.group_norm_backward(dy, x, gmean, ginv, groups, w, layout=layout, out=dx),
    }


def measure(threads, target_s):
    bn_simd.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for op, shape, groups in CASES:
        for layout in ("NCHW", "NHWC"):
            calls = _calls(shape, groups, layout, rng)
            times = timing.interleaved_medians([calls[k] for k in CALLS], target_s=target_s, k_min=9)
            t = {k: s for k, (s, _) in zip(CALLS, times)}
            rows.append({"op": op, "shape": shape, "groups": groups, "layout": layout,
                         "ms": {k: t[k] * 1e3 for k in CALLS}})
    return rows


def table(rows):
    head = ("| case | layout | eval ms | stats | bn fwd | bn bwd | fwd | bwd | fwd / bn fwd | bwd / bn bwd |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        m = r["ms"]
        e = m["eval"]
        name = f"{r['op']} {'x'.join(map(str, r['shape']))}" + (f" G={r['groups']}" if r["op"] == "GN" else "")
        lines.append(f"| {name} | {r['layout']} | {e:.3f} | " + " | ".join(f"{m[k] / e:.2f}" for k in CALLS[1:])
                     + f" | {m['fwd'] / m['bn fwd']:.2f} | {m['bwd'] / m['bn bwd']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", type=float, default=1.5, help="seconds of samples per call and case")
    ap.add_argument("--json", help="also write the measurements to this file")
    a = ap.parse_args(argv)
    machine.steady_allocator()
    rows = measure(a.threads, a.target)
    print(machine.describe())
    print(f"{a.threads} threads; times as multiples of the eval's (medians, sampled alternately in one process)\n")
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
