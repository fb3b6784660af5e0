"""Fused epilogues (activation=, residual=) against the plain call, NumPy's composition and PyTorch's, per call.

    python benchmarks/epilogue.py [--shape 32 64 56 56] [--threads 2] [--target 1.0] [--dtypes float32 bfloat16 float16]

Rows, each timed in interleaved rounds (harness/timing.py: interleaved_medians) with --threads threads for bn_simd
and PyTorch (a cell is the median in ms; the ratio columns are over the row's plain bn_simd call):
    eval             plain eval; eval + relu fused; eval + relu + residual fused; eval + silu fused;
                     NumPy's plain eval then np.maximum(y, 0, out=y); PyTorch's batch_norm then relu_ (same dtype);
                     copy: np.copyto of x into y, x split among the threads (harness/impls.py split_copy; one copy
                     under 1 MiB): the same bytes read and written as a one-pass eval, what bounds it in memory;
                     then PyTorch's bn + relu_ over the fused call and over the copy (the most any one-pass fused
                     eval can be faster than it)
    train fwd        plain training forward (batch_norm_forward) against the same with relu / relu + residual fused
    train bwd        plain training backward against the backward through relu, and with the residual's gradient:
                     into a given array (grad_residual_out=, as grad_x goes to out=) and, "relu+res new", into a
                     new array at every call (what a caller pays for the allocation and its page faults)
    train bwd NHWC   the same tensors channels-last: plain training backward against the backward through relu
The targets (issue 25): fused eval + activation <= 1.05x plain eval and >= 3x PyTorch's BN + relu_; training
forward and backward through ReLU <= 1.1x the plain ones; SiLU <= 1.2x plain eval. bfloat16 needs ml_dtypes;
PyTorch's column needs torch.
"""
import concurrent.futures
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.harness import cli, impls  # noqa: E402
from benchmarks.harness.timing import interleaved_medians  # noqa: E402

import bn_simd  # noqa: E402


def row(label, fns, target):
    """Times fns (name -> callable, the first the baseline) and prints one row."""
    names = list(fns)
    times = [t for t, _ in interleaved_medians([fns[k] for k in names], target_s=target)]
    base = times[0]
    cells = "  ".join(f"{k} {t * 1e3:7.3f} ms ({t / base:4.2f}x)" for k, t in zip(names, times))
    print(f"{label:26} {cells}", flush=True)
    return dict(zip(names, times))


def main():
    ap = cli.shape_parser(__doc__, (32, 64, 56, 56))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"],
                    choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args()
    torch = cli.set_threads(a.threads)
    N, C, H, W = a.shape
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((N, C, H, W), dtype=np.float32)
    r32 = rng.standard_normal((N, C, H, W), dtype=np.float32)
    w, b = rng.uniform(0.5, 2, C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.threads))
    print(f"bn_simd {bn_simd.__version__}, ISA {bn_simd.get_isa()}, {a.threads} threads, x {N}x{C}x{H}x{W} NCHW")
    for name in a.dtypes:
        try:
            dt = cli.data_dtype(name)
        except ImportError:
            print(f"({name}: ml_dtypes not installed)")
            continue
        x, r = x32.astype(dt), r32.astype(dt)
        y, g, dr = np.empty_like(x), x.copy(), np.empty_like(x)
        print(f"-- {name}")
        fns = {
            "plain": lambda: bn_simd.batch_norm(x, rm, rv, w, b, out=y),
            "relu": lambda: bn_simd.batch_norm(x, rm, rv, w, b, out=y, activation="relu"),
            "relu+res": lambda: bn_simd.batch_norm(x, rm, rv, w, b, out=y, activation="relu", residual=r),
            "silu": lambda: bn_simd.batch_norm(x, rm, rv, w, b, out=y, activation="silu"),
        }
        if dt == np.float32:
            def numpy_relu():
                bn_simd.batch_norm(x, rm, rv, w, b, out=y)
                np.maximum(y, 0, out=y)
            fns["bn+np.maximum"] = numpy_relu
        fns["copy"] = impls.split_copy(x, y, a.threads, pool)
        if torch is not None:
            tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
            tx = torch.from_numpy(x32).to(tdt)
            tw, tb, trm, trv = (torch.from_numpy(v) for v in (w, b, rm, rv))

            def torch_relu():
                with torch.no_grad():
                    torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=False).relu_()
            fns["torch bn+relu_"] = torch_relu
        t = row("eval", fns, a.target)
        if "torch bn+relu_" in t:
            print(f"{'':26} torch bn+relu_ / fused relu: {t['torch bn+relu_'] / t['relu']:.2f}x;"
                  f" torch bn+relu_ / copy: {t['torch bn+relu_'] / t['copy']:.2f}x;"
                  f" fused relu / copy: {t['relu'] / t['copy']:.2f}")
        row("train fwd", {
            "plain": lambda: bn_simd.batch_norm_forward(x, w, b, out=y),
            "relu": lambda: bn_simd.batch_norm_forward(x, w, b, out=y, activation="relu"),
            "relu+res": lambda: bn_simd.batch_norm_forward(x, w, b, out=y, activation="relu", residual=r),
        }, a.target)
        _, m, s = bn_simd.batch_norm_forward(x, w, b)
        _, m2, s2, st = bn_simd.batch_norm_forward(x, w, b, activation="relu")
        _, m3, s3, st3 = bn_simd.batch_norm_forward(x, w, b, activation="relu", residual=r)
        row("train bwd", {
            "plain": lambda: bn_simd.batch_norm_backward(g, x, m, s, w, out=y),
            "relu": lambda: bn_simd.batch_norm_backward(g, x, m2, s2, w, out=y, activation="relu", bias=b,
                                                        save_stats=st),
            "relu+res": lambda: bn_simd.batch_norm_backward(g, x, m3, s3, w, out=y, activation="relu", residual=r,
                                                            bias=b, save_stats=st3, grad_residual_out=dr),
            "relu+res new": lambda: bn_simd.batch_norm_backward(g, x, m3, s3, w, out=y, activation="relu",
                                                                residual=r, bias=b, save_stats=st3),
        }, a.target)
        # the same tensors channels-last (N, H, W, C)
        xl, gl = (np.ascontiguousarray(v.transpose(0, 2, 3, 1)) for v in (x, g))
        yl = np.empty_like(xl)
        _, ml, sl = bn_simd.batch_norm_forward(xl, w, b, layout="NHWC")
        _, ml2, sl2, stl = bn_simd.batch_norm_forward(xl, w, b, activation="relu", layout="NHWC")
        row("train bwd NHWC", {
            "plain": lambda: bn_simd.batch_norm_backward(gl, xl, ml, sl, w, out=yl, layout="NHWC"),
            "relu": lambda: bn_simd.batch_norm_backward(gl, xl, ml2, sl2, w, out=yl, activation="relu", bias=b,
                                                        save_stats=stl, layout="NHWC"),
        }, a.target)


if __name__ == "__main__":
    main()
