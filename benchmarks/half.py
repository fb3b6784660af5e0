"""float16 and bfloat16 data against bn_simd's own float32 and PyTorch in the same dtype, per call.

    python benchmarks/half.py [--shape 32 64 112 112] [--threads 2] [--target 1.0]

Batch norm eval (running statistics) and training forward, and the training backward, in both layouts, on a tensor
beyond the last-level cache by default (32x64x112x112: 51 MB of float32, 26 MB of 16-bit data). Each row's calls
are timed in interleaved rounds (harness/timing.py: interleaved_medians) with --threads threads for bn_simd and
PyTorch; a cell is the median in ms, and the ratios are float32's time over the 16-bit call's (the gain from half
the bytes) and PyTorch's over bn_simd's in the same dtype. The training backward on both sides is the backward alone
with its three gradients (PyTorch's: autograd's backward of a graph built once, retained). bfloat16 needs ml_dtypes;
PyTorch's columns need torch.
"""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.harness import cli  # noqa: E402
from benchmarks.harness.timing import interleaved_medians  # noqa: E402

import bn_simd  # noqa: E402


def dtypes():
    out = [("float16", np.dtype(np.float16))]
    try:
        out.append(("bfloat16", cli.data_dtype("bfloat16")))
    except ImportError:
        print("(ml_dtypes not installed: no bfloat16 rows)")
    return out


def calls(x, layout, C, torch_x=None, torch=None):
    """{op: callable} for bn_simd on x, and PyTorch's on torch_x."""
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y = np.empty_like(x)
    _, m, s = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    ops = {
        "eval": lambda: bn_simd.batch_norm(x, rm, rv, w, b, training=False, layout=layout, out=y),
        "train fwd": lambda: bn_simd.batch_norm_forward(x, w, b, layout=layout, out=y),
        "train bwd": lambda: bn_simd.batch_norm_backward(x, x, m, s, w, layout=layout, out=y),
    }
    theirs = {}
    if torch is not None:
        F = torch.nn.functional
        tw, tb, trm, trv = (torch.from_numpy(a) for a in (w, b, rm, rv))
        t = torch_x

        # the backward alone, as bn_simd's row times it: autograd's backward of a graph built once (retained), the
        # three gradients bn_simd's call returns
        tt, gw_, gb_ = t.detach().requires_grad_(), tw.clone().requires_grad_(), tb.clone().requires_grad_()
        graph = F.batch_norm(tt, None, None, gw_, gb_, training=True)

        def train_bwd():
            return torch.autograd.grad(graph, (tt, gw_, gb_), t, retain_graph=True)

        with torch.no_grad():
            theirs = {"eval": lambda: F.batch_norm(t, trm, trv, tw, tb, training=False),
                      "train fwd": lambda: F.batch_norm(t, None, None, tw, tb, training=True)}
        theirs["train bwd"] = train_bwd
    return ops, theirs


def main():
    a = cli.shape_parser(__doc__, (32, 64, 112, 112)).parse_args()
    torch = cli.set_threads(a.threads)
    N, C, H, W = a.shape
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal((N, C, H, W), dtype=np.float32)
    print(f"bn_simd {bn_simd.__version__}, ISA {bn_simd.get_isa()}, {a.threads} threads, x {N}x{C}x{H}x{W}; "
          f"medians in ms")
    print(f"{'layout':6} {'op':10} {'dtype':9} {'float32':>8} {'16-bit':>8} {'f32/16':>7} {'torch16':>8} "
          f"{'torch/us':>8}")
    for layout in ("NCHW", "NHWC"):
        xs = x32 if layout == "NCHW" else np.ascontiguousarray(x32.transpose(0, 2, 3, 1))
        ours32, _ = calls(xs, layout, C)
        for name, dt in dtypes():
            xh = xs.astype(dt)
            tx = None
            if torch is not None:
                tdt = torch.float16 if name == "float16" else torch.bfloat16
                tx = torch.from_numpy(x32).to(tdt)
                if layout == "NHWC":
                    tx = tx.contiguous(memory_format=torch.channels_last)
            ours, theirs = calls(xh, layout, C, tx, torch)
            for op in ours:
                fns = [ours32[op], ours[op]] + ([theirs[op]] if op in theirs else [])
                times = [t for t, _ in interleaved_medians(fns, target_s=a.target)]
                t32, t16 = times[0] * 1e3, times[1] * 1e3
                tt = f"{times[2] * 1e3:8.2f} {times[2] / times[1]:8.2f}" if len(times) > 2 else f"{'-':>8} {'-':>8}"
                print(f"{layout:6} {op:10} {name:9} {t32:8.2f} {t16:8.2f} {t32 / t16:7.2f} {tt}", flush=True)


if __name__ == "__main__":
    main()
