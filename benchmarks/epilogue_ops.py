"""Fused epilogues of group, instance, layer and RMS norm against their plain calls: training forward and backward.

    python benchmarks/epilogue_ops.py [--shape 32 64 56 56] [--rows 6272 768] [--threads 2] [--target 1.0]
                                      [--dtypes float32 float16] [--ops gn gn-nhwc in ln ln-cf rms]

Per op and dtype two rows, each timed in interleaved rounds (harness/timing.py: interleaved_medians) with --threads
threads (a cell is the median in ms; the ratios are over the row's plain call, out= preallocated):
    train fwd    plain *_forward against the same with relu, and relu + residual, in the normalise sweep
    train bwd    plain *_backward against the backward through relu (du recomputed from x), and with the residual's
                 gradient (into a preallocated grad_residual_out=, as grad_x into out=)
Group and instance norm (gn, gn-nhwc, in) and the channels-first layer norm (ln-cf) run on --shape (N, C, H, W;
group norm 32 groups, or C when fewer), the trailing layer and RMS norm (ln, rms) on --rows (rows, features).
"""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.epilogue import row  # noqa: E402
from benchmarks.harness import cli  # noqa: E402

import bn_simd  # noqa: E402


def calls(op, x, r, g, y, w, b, G):
    """(forward(**kw), backward(fwd, **kw)) of op on x (its layout's array), writing into y."""
    C = w.shape[0]
    if op in ("gn", "gn-nhwc", "in"):
        lay = "NHWC" if op == "gn-nhwc" else "NCHW"
        if op == "in":
            def fwd(**k):
                return bn_simd.instance_norm_forward(x, w, b, layout=lay, out=y, **k)

            def bwd(f, **k):
                ep = dict(bias=b, save_stats=f[3]) if "activation" in k else {}
                return bn_simd.instance_norm_backward(g, x, f[1], f[2], w, layout=lay, out=y, **ep, **k)
            return fwd, bwd

        def fwd(**k):
            return bn_simd.group_norm_forward(x, G, w, b, layout=lay, out=y, **k)

        def bwd(f, **k):
            ep = dict(bias=b, save_stats=f[3]) if "activation" in k else {}
            return bn_simd.group_norm_backward(g, x, f[1], f[2], G, w, layout=lay, out=y, **ep, **k)
        return fwd, bwd
    if op in ("ln", "ln-cf"):
        lay = dict(layout="NCHW") if op == "ln-cf" else {}

        def fwd(**k):
            return bn_simd.layer_norm_forward(x, C, w, b, out=y, **lay, **k)

        def bwd(f, **k):
            ep = dict(save_stats=f[3]) if "activation" in k else {}
            return bn_simd.layer_norm_backward(g, x, f[1], f[2], C, w, b, out=y, **lay, **ep, **k)
        return fwd, bwd

    def fwd(**k):
        return bn_simd.rms_norm_forward(x, C, w, out=y, **k)

    def bwd(f, **k):
        ep = dict(save_stats=f[2]) if "activation" in k else {}
        return bn_simd.rms_norm_backward(g, x, f[1], C, w, out=y, **ep, **k)
    return fwd, bwd


def main():
    ap = cli.shape_parser(__doc__, (32, 64, 56, 56))
    ap.add_argument("--rows", type=int, nargs=2, default=[32 * 196, 768])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    ap.add_argument("--ops", nargs="+", default=["gn", "gn-nhwc", "in", "ln", "ln-cf", "rms"])
    a = ap.parse_args()
    cli.set_threads(a.threads)
    N, C, H, W = a.shape
    print(f"bn_simd {bn_simd.__version__}, ISA {bn_simd.get_isa()}, {a.threads} threads, maps {N}x{C}x{H}x{W}, "
          f"rows {a.rows[0]}x{a.rows[1]}")
    rng = np.random.default_rng(0)
    for name in a.dtypes:
        dt = cli.data_dtype(name)
        for op in a.ops:
            if op in ("ln", "rms"):
                shape, Cp = tuple(a.rows), a.rows[1]
            else:
                shape = (N, H, W, C) if op == "gn-nhwc" else (N, C, H, W)
                Cp = C
            x, r, g = (rng.standard_normal(shape, dtype=np.float32).astype(dt) for _ in range(3))
            y, dr = np.empty_like(x), np.empty_like(x)
            w, b = rng.uniform(0.5, 2, Cp).astype(np.float32), rng.standard_normal(Cp).astype(np.float32)
            fwd, bwd = calls(op, x, r, g, y, w, b, min(32, Cp))
            print(f"-- {name} {op} {'x'.join(map(str, shape))}")
            row("train fwd", {"plain": lambda: fwd(), "relu": lambda: fwd(activation="relu"),
                              "relu+res": lambda: fwd(activation="relu", residual=r)}, a.target)
            f0, f1, f2 = fwd(), fwd(activation="relu"), fwd(activation="relu", residual=r)
            row("train bwd", {"plain": lambda: bwd(f0), "relu": lambda: bwd(f1, activation="relu"),
                              "relu+res": lambda: bwd(f2, activation="relu", residual=r, grad_residual_out=dr)},
                a.target)


if __name__ == "__main__":
    main()
