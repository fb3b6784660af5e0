"""Batch norm inside a NumPy CNN inference pipeline, four ways, timed side by side.

A few conv-BN-ReLU layers on a batch of images, channels-last (N, H, W, C): each convolution is one matrix product
over im2col patches, which gives its output channels-last and contiguous. After it, the eval batch norm is

  1. "plain BN":   bn_simd.batch_norm(y, running_mean, running_var, weight, bias, training=False,
                   layout="NHWC", out=y), in place, then ReLU in place;
  2. "folded":     nothing: bn_simd.fold_conv folded the BN into the conv's weights and bias beforehand
                   (the bias is added in place after the matrix product), then ReLU in place;
  3. "fused":      bn_simd.batch_norm(..., out=y, activation="relu"): the BN and the ReLU in one pass over y;
  4. "NumPy BN":   the formula (y - mean) / sqrt(var + eps) * weight + bias written in NumPy, then ReLU.

    python examples/infer_pipeline.py            # 8 images of 112 x 112 (a few seconds)
    python examples/infer_pipeline.py --quick    # small sizes, one second

Each variant's time is the median of interleaved runs (one run of each per round, in rotating order, so a busy
spell of the machine falls on all of them alike). The outputs of the four are compared.
"""
import argparse
import os
import sys
import time

import numpy as np

try:
    import bn_simd
except ImportError:  # run from a source checkout without installing: the repository root holds bn_simd/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import bn_simd

EPS = 1e-5


def im2col(x, stride):
    """3x3 patches of x (N, H, W, C), zero padding 1: ((N * Ho * Wo, 9 * C), (N, Ho, Wo)); columns in (tap, c)
    order, matching an "HWIO" weight (3, 3, C, O) reshaped to (9 * C, O)."""
    N, H, W, C = x.shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [xp[:, i:i + stride * Ho:stride, j:j + stride * Wo:stride, :] for i in range(3) for j in range(3)]
    return np.stack(taps, axis=3).reshape(N * Ho * Wo, 9 * C), (N, Ho, Wo)


def make_layers(rng, channels, strides):
    """Conv weights (HWIO, no bias: the BN's bias takes its place) and eval BN statistics and parameters."""
    layers = []
    for c_in, c_out, s in zip(channels, channels[1:], strides):
        w = (rng.standard_normal((3, 3, c_in, c_out)) * np.sqrt(2.0 / (9 * c_in))).astype(np.float32)
        bn = dict(running_mean=rng.standard_normal(c_out).astype(np.float32) * 0.2,
                  running_var=rng.uniform(0.5, 2.0, c_out).astype(np.float32),
                  weight=rng.uniform(0.5, 1.5, c_out).astype(np.float32),
                  bias=rng.standard_normal(c_out).astype(np.float32) * 0.1)
        w2, b2 = bn_simd.fold_conv(w, None, **bn, eps=EPS, weight_layout="HWIO")
        layers.append(dict(w=w.reshape(9 * c_in, c_out), stride=s, bn=bn,
                           w_folded=w2.reshape(9 * c_in, c_out), b_folded=b2))
    return layers


def conv(x, w, stride):
    cols, (N, Ho, Wo) = im2col(x, stride)
    return (cols @ w).reshape(N, Ho, Wo, w.shape[1])   # contiguous, channels-last


def run_plain(x, layers):
    for L in layers:
        y = conv(x, L["w"], L["stride"])
        bn = L["bn"]
        bn_simd.batch_norm(y, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], training=False,
                           eps=EPS, layout="NHWC", out=y)
        x = np.maximum(y, 0, out=y)
    return x


def run_folded(x, layers):
    for L in layers:
        y = conv(x, L["w_folded"], L["stride"])
        y += L["b_folded"]
        x = np.maximum(y, 0, out=y)
    return x


def run_fused(x, layers):
    for L in layers:
        y = conv(x, L["w"], L["stride"])
        bn = L["bn"]
        x = bn_simd.batch_norm(y, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], training=False,
                               eps=EPS, layout="NHWC", out=y, activation="relu")
    return x


def run_numpy(x, layers):
    for L in layers:
        y = conv(x, L["w"], L["stride"])
        bn = L["bn"]
        y = (y - bn["running_mean"]) / np.sqrt(bn["running_var"] + np.float32(EPS)) * bn["weight"] + bn["bias"]
        x = np.maximum(y, 0)
    return x


def run_no_bn(x, layers):
    """The floor: the same convs and ReLUs without any batch norm (not a network anyone runs; a measure)."""
    for L in layers:
        x = np.maximum(conv(x, L["w"], L["stride"]), 0)
    return x


VARIANTS = [("plain BN (bn_simd, out= in place)", run_plain), ("BN folded into the conv", run_folded),
            ("BN + ReLU fused (bn_simd, activation=)", run_fused), ("NumPy BN formula", run_numpy)]


def interleaved_medians(fns, rounds):
    samples = [[] for _ in fns]
    for f in fns:   # warm-up: page faults, BLAS thread start, caches
        f()
    for r in range(rounds):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            t0 = time.perf_counter()
            fns[i]()
            samples[i].append(time.perf_counter() - t0)
    return [float(np.median(s)) for s in samples]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (about a second)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 8; 2 with --quick)")
    p.add_argument("--size", type=int, default=None, help="image height and width (default 112; 32 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 11; 5 with --quick)")
    args = p.parse_args(argv)
    N = args.batch or (2 if args.quick else 8)
    S = args.size or (32 if args.quick else 112)
    rounds = args.rounds or (5 if args.quick else 11)
    channels, strides = (3, 32, 64, 64, 128), (2, 1, 2, 1)
    rng = np.random.default_rng(0)
    layers = make_layers(rng, channels, strides)
    x = rng.standard_normal((N, S, S, 3)).astype(np.float32)
    print(f"{N} images of {S}x{S}x3 (NHWC, float32); {len(layers)} conv3x3-BN-ReLU layers, channels "
          f"{' -> '.join(map(str, channels))}, strides {strides}; bn_simd {bn_simd.__version__}, "
          f"{bn_simd.get_num_threads()} threads")
    outs = [f(x, layers) for _, f in VARIANTS]
    rows = VARIANTS + [("no BN at all (convs + ReLU: the floor)", run_no_bn)]
    times = interleaved_medians([lambda f=f: f(x, layers) for _, f in rows], rounds)
    print(f"{'variant':40} {'median ms':>10} {'vs plain BN':>12}")
    for (name, _), t in zip(rows, times):
        print(f"{name:40} {t * 1e3:10.2f} {t / times[0]:11.2f}x")
    scale = float(np.abs(outs[0]).max())
    worst = 0.0
    for (name, _), y in zip(VARIANTS[1:], outs[1:]):
        d = float(np.abs(y.astype(np.float64) - outs[0]).max())
        worst = max(worst, d / scale)
        print(f"max |{name} - plain BN| = {d:.3g} ({d / scale:.2g} of max |y| = {scale:.3g})")
    # float32 throughout: the variants round differently (folded weights, a different order of operations),
    # each by a few float32 ulps per layer; 1e-4 of the output's range is far above that and far below an error
    if worst > 1e-4:
        sys.exit(f"outputs differ by {worst:.3g} of their range: more than float32 rounding")
    print("outputs agree within float32 rounding")


if __name__ == "__main__":
    main()
