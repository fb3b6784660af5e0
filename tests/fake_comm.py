"""An in-process communicator for SyncBatchNorm tests: P threads, one per rank, meet in each collective.

run_ranks(P, fn) calls fn(rank, comm) in P threads and returns their results in rank order (re-raising the first
rank's exception, if any, after every thread has finished). The allreduce adds the ranks' buffers in rank order, so
every rank receives the same bits; both collectives count the bytes each rank hands in.
"""
import threading

import numpy as np


class ThreadComm:
    """The bn_simd.sync protocol among threads of one process (one object per rank, sharing a _World)."""

    def __init__(self, world, rank):
        self.world, self.rank, self.size = world, rank, world.size
        self.bytes_sent = 0
        self.calls = []

    def _exchange(self, buf):
        w = self.world
        w.slots[self.rank] = np.array(buf, dtype=np.float64, copy=True)
        w.barrier.wait()
        got = list(w.slots)
        w.barrier.wait()  # (nobody overwrites a slot before every rank has read them all)
        return got

    def allreduce(self, buf):
        assert isinstance(buf, np.ndarray) and buf.dtype == np.float64 and buf.ndim == 1
        self.bytes_sent += buf.nbytes
        self.calls.append(("allreduce", buf.shape[0]))
        got = self._exchange(buf)
        assert len({g.shape for g in got}) == 1, "allreduce buffers of different lengths"
        total = got[0].copy()
        for g in got[1:]:
            total += g
        return total

    def allgather(self, buf):
        assert isinstance(buf, np.ndarray) and buf.dtype == np.float64 and buf.ndim == 1
        self.bytes_sent += buf.nbytes
        self.calls.append(("allgather", buf.shape[0]))
        return self._exchange(buf)


class _World:
    def __init__(self, size):
        self.size = size
        self.slots = [None] * size
        self.barrier = threading.Barrier(size, timeout=60)


def make_comms(P):
    world = _World(P)
    return [ThreadComm(world, r) for r in range(P)]


def run_ranks(P, fn, comms=None):
    """[fn(0, comm_0), ..., fn(P - 1, comm_{P-1})], each in its own thread."""
    comms = comms or make_comms(P)
    results, errors = [None] * P, [None] * P

    def body(r):
        try:
            results[r] = fn(r, comms[r])
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            errors[r] = e

    threads = [threading.Thread(target=body, args=(r,)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def run_ok(P, fn, comms=None):
    """run_ranks, raising the first rank's error."""
    results, errors = run_ranks(P, fn, comms)
    for e in errors:
        if e is not None:
            raise e
    return results
