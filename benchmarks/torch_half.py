"""bn_simd.torch on float16 / bfloat16 tensors against PyTorch's own CPU batch norm in the same dtype.

    python benchmarks/torch_half.py [--shape 32 64 56 56] [--threads 2] [--target 1.0]

Rows: a BatchNorm2d module in eval mode under ``torch.no_grad()`` (bn_simd's eval fast path), the training forward
(``torch.no_grad()``, batch statistics, running statistics updated), and the training forward + backward through
autograd (input, weight and bias requiring grad), in contiguous and channels-last memory; float32 parameters
(PyTorch's mixed rule, a float32 module given 16-bit data). Each row's callables are timed in interleaved rounds
(harness/timing.py: interleaved_medians) with --threads threads for both libraries; a cell is the median in ms, and
"torch/ours" is PyTorch's time over bn_simd's in the same dtype; "f32/16" bn_simd's float32 time over its 16-bit
one (the gain from half the bytes). The default shape is the issue's anchor (32x64x56x56).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.harness.timing import interleaved_medians  # noqa: E402

import bn_simd  # noqa: E402


def callables(torch, bt, x, C):
    """{row: (bn_simd callable, PyTorch callable)} on tensor x."""
    ours, theirs = bt.BatchNorm2d(C).eval(), torch.nn.BatchNorm2d(C).eval()
    with torch.no_grad():
        ours(x)  # (one general call caches the module for the eval fast path)
    F = torch.nn.functional
    rm, rv = torch.zeros(C), torch.ones(C)
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    g = x.detach().clone()

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def train_step(f):
        def run():
            xx = x.detach().requires_grad_()
            f.batch_norm(xx, rm, rv, w, b, training=True).backward(g)
        return run

    return {
        "eval": (no_grad(lambda: ours(x)), no_grad(lambda: theirs(x))),
        "train fwd": (no_grad(lambda: bt.batch_norm(x, rm, rv, w, b, training=True)),
                      no_grad(lambda: F.batch_norm(x, rm, rv, w, b, training=True))),
        "train f+b": (train_step(bt), train_step(F)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[32, 64, 56, 56])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", type=float, default=1.0, help="seconds of samples per callable and row")
    a = ap.parse_args()
    import torch
    import bn_simd.torch as bt
    torch.set_num_threads(a.threads)
    bn_simd.set_num_threads(a.threads)
    N, C, H, W = a.shape
    x32 = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(0))
    print(f"bn_simd {bn_simd.__version__}, torch {torch.__version__}, ISA {bn_simd.get_isa()}, {a.threads} threads, "
          f"x {N}x{C}x{H}x{W}; medians in ms")
    print(f"{'memory':13} {'row':10} {'dtype':9} {'ours f32':>8} {'ours 16':>8} {'f32/16':>7} {'torch 16':>8} "
          f"{'torch/ours':>10}")
    for fmt_name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        base = callables(torch, bt, x32.contiguous(memory_format=fmt), C)
        for dt in (torch.float16, torch.bfloat16):
            rows = callables(torch, bt, x32.to(dt).contiguous(memory_format=fmt), C)
            for row, (ours, theirs) in rows.items():
                t = [s * 1e3 for s, _ in interleaved_medians([base[row][0], ours, theirs], target_s=a.target)]
                print(f"{fmt_name:13} {row:10} {str(dt)[6:]:9} {t[0]:8.2f} {t[1]:8.2f} {t[0] / t[1]:7.2f} "
                      f"{t[2]:8.2f} {t[2] / t[1]:10.2f}", flush=True)


if __name__ == "__main__":
    main()
