"""Group and instance norm where the per-group work is small: (N, C) arrays, 3x3 to 14x14 maps, against PyTorch.

    python benchmarks/group_small.py [--threads 2] [--target 0.5] [--only TEXT ...]

Each case (float32, NCHW) is timed forward and backward in interleaved rounds (harness/timing.py,
interleaved_medians): bn_simd's group_norm_forward / group_norm_backward with out= preallocated against PyTorch's
aten.native_group_norm / native_group_norm_backward (all three gradients), both on --threads threads. A cell is the
median in ms; the ratio is PyTorch's time over bn_simd's (above 1: bn_simd is faster). Without PyTorch only bn_simd's
times are printed. Outputs are compared with PyTorch's before timing (the largest relative difference of y and
grad_x is printed).
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.harness import cli, timing  # noqa: E402

import bn_simd  # noqa: E402

# (shape, groups): (N, C) arrays (one element per channel), 3x3 and 7x7 maps (group norm and instance norm), and
# two of the usual sizes for reference
CASES = [((4096, 1024), 8), ((4096, 1024), 32), ((64, 1000), 8), ((256, 16, 3, 3), 8), ((256, 64, 3, 3), 32),
         ((32, 512, 7, 7), 32), ((32, 512, 7, 7), 512), ((32, 256, 14, 14), 32), ((8, 64, 28, 28), 32),
         ((32, 64, 56, 56), 32)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.5, help="seconds of samples per callable and case")
    ap.add_argument("--only", nargs="*", default=None, help="cases whose id (e.g. 4096x1024-G=8) contains a text")
    a = ap.parse_args()
    torch = cli.set_threads(a.threads)
    print(f"bn_simd {bn_simd.__version__}, ISA {bn_simd.get_isa()}, {a.threads} threads, float32 NCHW"
          + (f", torch {torch.__version__}" if torch else ", no PyTorch"))
    print("| case | groups | bn_simd fwd ms | PyTorch fwd ms (×) | bn_simd bwd ms | PyTorch bwd ms (×) "
          "| max rel diff |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for shape, G in CASES:
        cid = "x".join(map(str, shape))
        if a.only and not any(t in f"{cid}-G={G}" for t in a.only):
            continue
        x, dy = (rng.standard_normal(shape, dtype=np.float32) for _ in range(2))
        C = shape[1]
        w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
        y, gx = np.empty_like(x), np.empty_like(x)
        _, m, s = bn_simd.group_norm_forward(x, G, w, b, out=y)
        fns = [lambda: bn_simd.group_norm_forward(x, G, w, b, out=y),
               lambda: bn_simd.group_norm_backward(dy, x, m, s, G, w, out=gx)]
        diff = ""
        if torch:
            N, S = shape[0], int(np.prod(shape[2:], dtype=np.int64))
            tx, tdy, tw, tb = (torch.from_numpy(v) for v in (x, dy, w, b))
            ty, tm, ts = torch.ops.aten.native_group_norm(tx, tw, tb, N, C, S, G, 1e-5)
            mask = [True, True, True]
            fns += [lambda: torch.ops.aten.native_group_norm(tx, tw, tb, N, C, S, G, 1e-5),
                    lambda: torch.ops.aten.native_group_norm_backward(tdy, tx, tm, ts, tw, N, C, S, G, mask)]
            tgx = torch.ops.aten.native_group_norm_backward(tdy, tx, tm, ts, tw, N, C, S, G, mask)[0]
            bn_simd.group_norm_backward(dy, x, m, s, G, w, out=gx)
            rel = max(float(np.max(np.abs(u - v.numpy())) / max(float(np.max(np.abs(v.numpy()))), 1e-30))
                      for u, v in ((y, ty), (gx, tgx)))
            diff = f"{rel:.1e}"
        t = [v for v, _ in timing.interleaved_medians(fns, target_s=a.target)]
        cells = [f"{t[0] * 1e3:.4g}", f"{t[2] * 1e3:.4g} ({t[2] / t[0]:.2f}×)" if torch else "",
                 f"{t[1] * 1e3:.4g}", f"{t[3] * 1e3:.4g} ({t[3] / t[1]:.2f}×)" if torch else "", diff]
        print(f"| {cid} | {G} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
