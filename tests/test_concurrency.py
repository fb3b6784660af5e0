"""Python threads calling the kernels at once (the GIL is released) get the bytes of serial calls."""
import threading

import numpy as np

import bn_simd
from conftest import make


def _work(i):
    x = make((8, 16, 24, 24), np.float32, seed=200 + i, loc=i)
    dy = make((8, 16, 24, 24), np.float32, seed=300 + i)
    y, m, s = bn_simd.batch_norm_forward(x, layout="NCHW")
    gx = bn_simd.batch_norm_backward(dy, x, m, s)[0]
    z = bn_simd.batch_norm(np.ascontiguousarray(np.moveaxis(x, 1, -1)), training=True, layout="NHWC")
    return [y, m, s, gx, z]


def test_eight_threads_match_serial_results():
    serial = [_work(i) for i in range(8)]
    results = [None] * 8
    barrier = threading.Barrier(8)

    def run(i):
        barrier.wait()
        for _ in range(3):
            results[i] = _work(i)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for a, b in zip(serial, results):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
