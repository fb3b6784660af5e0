"""bn_simd.keras.BatchNormalization beside Keras 3's own layer: agreement and time per call.

    KERAS_BACKEND=torch python benchmarks/keras_layer.py [--rounds 15] [--threads 2] [--renorm]

For each case (a channels-last image batch, a channels-first one with axis=1, a masked sequence batch), both layers
get the same weights and the same inputs, and the table reports the largest differences of their outputs (training
and inference), moving statistics and input gradients, in units of the float32 epsilon relative to the largest
|value| of each, and the median time of one call of each: training forward, inference forward, and a training
forward with its backward (Keras: the backend's autograd; this needs the torch backend). The calls of both layers
alternate round by round, with glibc's malloc thresholds fixed (benchmarks/harness/machine.py). Keras runs on its
backend's own threads (torch: set to --threads as well). --renorm: both layers with batch renormalization (Keras 3's
renorm=True, renorm_clipping=RENORM_CLIPPING; the moving statistics compared are then the five of renorm).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [  # (name, shape, axis, mask shape or None)
    ("NHWC 32x28x28x64", (32, 28, 28, 64), -1, None),
    ("NCHW 32x64x28x28, axis=1", (32, 64, 28, 28), 1, None),
    ("sequence 64x100x128, mask", (64, 100, 128), -1, (64, 100)),
]


RENORM_CLIPPING = {"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}


def _timed(fn, rounds_out, key):
    t0 = time.perf_counter()
    fn()
    rounds_out.setdefault(key, []).append(time.perf_counter() - t0)


def run_case(keras, bn_keras, shape, axis, mshape, rounds, torch, renorm=False):
    rng = np.random.default_rng(0)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    mask = None if mshape is None else rng.random(mshape) < 0.8
    kw = {"renorm": True, "renorm_clipping": RENORM_CLIPPING} if renorm else {}
    kl = keras.layers.BatchNormalization(axis=axis, **kw)
    ours = bn_keras.BatchNormalization(axis=axis, **kw)
    kl.build(shape)
    ours.build(shape)
    kl.set_weights([rng.uniform(0.5, 1.5, C).astype(np.float32), rng.standard_normal(C).astype(np.float32),
                    rng.standard_normal(C).astype(np.float32), rng.uniform(0.5, 2, C).astype(np.float32)]
                   + kl.get_weights()[4:])
    ours.set_weights(kl.get_weights())
    to_np = keras.ops.convert_to_numpy
    km = None if mask is None else keras.ops.convert_to_tensor(mask)
    eps32 = float(np.finfo(np.float32).eps)

    def ulps(a, b):
        return float(np.abs(np.asarray(a, np.float64) - b).max() / (np.abs(b).max() * eps32))

    diffs = {}
    diffs["y train"] = ulps(ours(x, training=True, mask=mask), to_np(kl(x, training=True, mask=km)))
    diffs["moving stats"] = max(ulps(a, b) for a, b in zip(ours.get_weights(), kl.get_weights()))
    diffs["y inference"] = ulps(ours(x), to_np(kl(x)))
    if torch is not None:
        xt = torch.tensor(x, requires_grad=True)
        kl(xt, training=True, mask=km).backward(torch.tensor(g))
        ours(x, training=True, mask=mask)
        diffs["grad_x"] = ulps(ours.backward(g), xt.grad.numpy())

    def keras_backward():
        xt = torch.tensor(x, requires_grad=True)
        kl(xt, training=True, mask=km).backward(torch.tensor(g))

    def ours_backward():
        ours(x, training=True, mask=mask)
        ours.backward(g)

    calls = {
        ("train", "keras"): lambda: to_np(kl(x, training=True, mask=km)),
        ("train", "bn_simd"): lambda: ours(x, training=True, mask=mask),
        ("inference", "keras"): lambda: to_np(kl(x)),
        ("inference", "bn_simd"): lambda: ours(x),
    }
    if torch is not None:
        calls[("train + backward", "keras")] = keras_backward
        calls[("train + backward", "bn_simd")] = ours_backward
    times = {}
    keys = list(calls)
    for fn in calls.values():  # warm-up
        fn()
    for r in range(rounds):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            _timed(calls[key], times, key)
    return diffs, {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--renorm", action="store_true", help="both layers with renorm=True")
    args = p.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "torch")
    sys.path.insert(0, ROOT)
    import keras

    import bn_simd
    from benchmarks.harness import machine
    from bn_simd import keras as bn_keras
    machine.steady_allocator()  # (outputs of a few MB reuse warm pages in both libraries: see its docstring)
    torch = None
    if keras.backend.backend() == "torch":
        import torch
        torch.set_num_threads(args.threads)
    bn_simd.set_num_threads(args.threads)
    print(f"keras {keras.__version__} ({keras.backend.backend()} backend), bn_simd {bn_simd.__version__} "
          f"({bn_simd.get_isa()}), {args.threads} thread(s), {args.rounds} rounds"
          + (f", renorm=True, renorm_clipping={RENORM_CLIPPING}" if args.renorm else "") + "\n")
    print("| case | y train (ulp) | moving stats (ulp) | y inference (ulp) | grad_x (ulp) | "
          "train: keras / bn_simd ms | inference: keras / bn_simd ms | train + backward: keras / bn_simd ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shape, axis, mshape in CASES:
        d, t = run_case(keras, bn_keras, shape, axis, mshape, args.rounds, torch, args.renorm)
        cells = [f"{d[k]:.1f}" if k in d else "" for k in ("y train", "moving stats", "y inference", "grad_x")]
        for mode in ("train", "inference", "train + backward"):
            if (mode, "keras") in t:
                k, b = t[(mode, "keras")], t[(mode, "bn_simd")]
                cells.append(f"{k:.2f} / {b:.2f} ({k / b:.1f}×)")
            else:
                cells.append("")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
