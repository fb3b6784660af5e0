"""Python threads calling the kernels at once (the GIL is released) get the bytes of serial calls: every entry point
of every registered op (ops.py), half the threads channels-first and half channels-last."""
import threading

import numpy as np
import pytest

import ops
from conftest import assert_same_bits

SHAPE = (8, 16, 24, 24)


def _work(op, i):
    """Every entry point's outputs on a case of its own (seeded by i), in one of the op's layouts."""
    layouts = [lay for lay in ("NCHW", "NHWC") if op.supports(SHAPE, lay, np.float32)]
    out = ops.run_all(op, op.case(200 + i, SHAPE, layouts[i % len(layouts)], np.float32, loc=i))
    return [out[k] for k in sorted(out)]


@pytest.mark.parametrize("op", ops.OPS, ids=str)
def test_eight_threads_match_serial_results(op):
    serial = [_work(op, i) for i in range(8)]
    results = [None] * 8
    barrier = threading.Barrier(8)

    def run(i):
        barrier.wait()
        for _ in range(3):
            results[i] = _work(op, i)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for a, b in zip(serial, results):
        assert b is not None and len(a) == len(b) > 0
        for u, v in zip(a, b):
            assert_same_bits(v, u, "a call made concurrently vs serially")
