"""Virtual batches and batch renormalization against plain batch norm, per call.

    python benchmarks/virtual_renorm.py [--reps 15] [--virtual 16]

Training forward and backward of a float32 (64, 64, 28, 28) batch in both layouts: plain batch norm
(batch_norm_forward / batch_norm_backward), ghost batch norm with virtual batches of --virtual samples
(virtual_batch_norm_forward / _backward) and batch renormalization (batch_renorm_forward / _backward). A cell is the
best of --reps calls, in ms, and the ratio to plain batch norm.
"""
import argparse
import time

import numpy as np

import bn_simd


def best_ms(f, reps):
    f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--virtual", type=int, default=16)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    v = a.virtual
    print(f"threads {bn_simd.get_num_threads()}, ISA {bn_simd.get_isa()}, virtual batches of {v}")
    for layout, shape in (("NCHW", (64, 64, 28, 28)), ("NHWC", (64, 28, 28, 64))):
        x = rng.standard_normal(shape, dtype=np.float32)
        g = rng.standard_normal(shape, dtype=np.float32)
        w, b = np.ones(64, np.float32), np.zeros(64, np.float32)
        rm, rs = np.zeros(64), np.ones(64)
        _, m, s = bn_simd.batch_norm_forward(x, w, b, layout=layout)
        _, vm, vs = bn_simd.virtual_batch_norm_forward(x, w, b, virtual_batch_size=v, layout=layout)
        _, rmn, rsd, r, d = bn_simd.batch_renorm_forward(x, rm, rs, w, b, rmax=3.0, dmax=5.0, layout=layout)
        rows = {
            "forward": (lambda: bn_simd.batch_norm_forward(x, w, b, layout=layout),
                        lambda: bn_simd.virtual_batch_norm_forward(x, w, b, virtual_batch_size=v, layout=layout),
                        lambda: bn_simd.batch_renorm_forward(x, rm, rs, w, b, rmax=3.0, dmax=5.0, layout=layout)),
            "backward": (lambda: bn_simd.batch_norm_backward(g, x, m, s, w, layout=layout),
                         lambda: bn_simd.virtual_batch_norm_backward(g, x, vm, vs, w, virtual_batch_size=v,
                                                                     layout=layout),
                         lambda: bn_simd.batch_renorm_backward(g, x, rmn, rsd, r, d, w, layout=layout)),
        }
        for name, (plain, ghost, renorm) in rows.items():
            t0, t1, t2 = (best_ms(f, a.reps) for f in (plain, ghost, renorm))
            print(f"{layout} {shape} {name:8s}: plain {t0:6.2f} ms | virtual {t1:6.2f} ms ({t1 / t0:4.2f}x) | "
                  f"renorm {t2:6.2f} ms ({t2 / t0:4.2f}x)")


if __name__ == "__main__":
    main()
