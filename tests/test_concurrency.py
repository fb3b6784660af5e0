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


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork() here")
def test_a_forked_child_runs_after_the_parent_used_threads():
    """GNU OpenMP's threads do not survive fork(): a child's parallel region waited for them forever. The child runs
    every call on its own thread (multiprocessing's fork workers, a DataLoader's), with the parent's bits."""
    import os
    import subprocess
    import sys
    code = """
import os, sys, numpy as np, bn_simd
bn_simd.set_num_threads(2)
x = np.random.default_rng(0).standard_normal((64, 32, 32, 32)).astype(np.float32)
y = bn_simd.batch_norm(x, training=True)
ln = bn_simd.layer_norm(x.reshape(-1, 1024), 1024)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    ok = (np.array_equal(bn_simd.batch_norm(x, training=True), y)
          and np.array_equal(bn_simd.layer_norm(x.reshape(-1, 1024), 1024), ln))
    os.write(w, b"1" if ok else b"0")
    os._exit(0)
os.waitpid(pid, 0)
sys.exit(0 if os.read(r, 1) == b"1" else 1)
"""
    # (a child process of its own: the test runner's threads must not be forked; a hang fails by the timeout)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork() here")
@pytest.mark.parametrize("first", ["bn_simd", "torch"])
def test_pytorch_runs_threads_in_a_child_forked_after_a_bn_simd_call(first):
    """PyTorch's wheel loads a libgomp.so.1, the process's one OpenMP runtime with bn_simd's: the team of a bn_simd
    call in the parent left the child's first parallel PyTorch op waiting for threads that are not there. The threads
    are released before a fork (pthread_atfork); the child's PyTorch op finishes, and the parent's next call runs on
    two threads again with the same bits."""
    pytest.importorskip("torch")
    import subprocess
    import sys
    code = f"""
import os, sys, numpy as np
import {first}
import bn_simd, torch
bn_simd.set_num_threads(2)
torch.set_num_threads(2)
x = np.random.default_rng(0).standard_normal((16, 32, 64, 64)).astype(np.float32)
y = bn_simd.batch_norm(x, training=True)
pid = os.fork()
if pid == 0:
    t = torch.from_numpy(x.reshape(-1))
    os._exit(0 if abs(float((t * 2).sum()) - 2 * float(t.double().sum())) < 1e-2 * t.numel() else 1)
_, status = os.waitpid(pid, 0)
again = bn_simd.batch_norm(x, training=True)
sys.exit(0 if status == 0 and np.array_equal(again, y) else 1)
"""
    # (a hang fails by the timeout)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
