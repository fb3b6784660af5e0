"""Timing: interleaved medians, and tracking of the CPU time other processes take meanwhile.

Each time is the median of k samples of one steady-state call, k chosen from a warm-up (more samples for
small tensors, at least a few for the largest). Implementations compared in one row are sampled
alternately, one sample of each per round, so that a slow spell of a shared machine falls on all of them
alike and their ratios hold.
"""
import os
import time

import numpy as np

from bn_simd._speed import cpu_snapshot, other_load  # noqa: F401  (the harness's too: the rows' disturbance)

# time budget per measurement (seconds) and bounds on the number of timed samples
FULL = {"target_s": 1.0, "k_min": 11, "k_max": 60}
QUICK = {"target_s": 0.25, "k_min": 3, "k_max": 15}
BUSY_CORES = 0.1  # rows during which other processes used more CPU than this are flagged
SAMPLE_S = 2e-4  # calls shorter than this are timed in batches, so each sample lasts about this long
# Untimed calls before the first measurement of a process, about this long in all: the first second or two of
# multithreaded calls in a fresh process ran up to 1.8x slower on the shared machines measured here (a 2-thread
# 1x128x768 layer norm at 11-12 us, then 5.6-6.9 once warm), a slow start that fell on whichever row came first.
WARM_S = 1.5
_warmed = False


def median_seconds(fn, target_s=1.0, k_min=5, k_max=60):
    """(median time of one steady-state call of fn, samples): interleaved_medians of fn alone."""
    return interleaved_medians([fn], target_s=target_s, k_min=k_min, k_max=k_max)[0]


def _batch_size(fn):
    """(calls per sample, estimated seconds per call): one warm-up call, then calls shorter than SAMPLE_S are
    batched so that a sample lasts about SAMPLE_S."""
    fn()
    t0 = time.perf_counter()
    fn()
    est = time.perf_counter() - t0
    if est < SAMPLE_S:
        batch = max(1, int(SAMPLE_S / max(est, 1e-8)))
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        est = (time.perf_counter() - t0) / batch
    return max(1, int(SAMPLE_S / max(est, 1e-8))), est


def interleaved_medians(fns, setups=None, target_s=1.0, k_min=5, k_max=60):
    """[(median time of one call, samples)] for each callable of fns, sampled in rounds: each round takes one
    sample of every fn (in an order that rotates from round to round), so that a slow spell of the machine
    falls on all of them alike and their ratios hold. Before each sample, setups[i] (if given) and one
    untimed call of fns[i] run, so every sample is a steady-state call of that fn, whatever ran before it.
    Each fn gets about target_s of samples, k of them in [k_min, k_max]. The first call in a process first runs
    the fns untimed for about WARM_S seconds."""
    global _warmed
    setups = setups or [None] * len(fns)
    if not _warmed:
        _warmed = True
        end = time.perf_counter() + WARM_S
        while time.perf_counter() < end:
            for fn, setup in zip(fns, setups):
                if setup:
                    setup()
                fn()
    plans = []
    for fn, setup in zip(fns, setups):
        if setup:
            setup()
        plans.append(_batch_size(fn))
    k = int(min(k_max, max(k_min, round(target_s / max(max(b * e for b, e in plans), 1e-9)))))
    samples = [[] for _ in fns]
    for r in range(k):
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            fn, batch = fns[i], plans[i][0]
            if setups[i]:
                setups[i]()
            fn()
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            samples[i].append((time.perf_counter() - t0) / batch)
    return [(float(np.median(v)), k) for v in samples]


# ---- other processes ----------------------------------------------------------------------------------------

def load_average():
    """The 1-minute load average, or None where the system does not tell."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def wait_until_idle(timeout_s, window_s=2.0):
    """Wait (at most timeout_s) for a window_s interval in which other processes use at most BUSY_CORES
    cores; returns whether one was found."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = cpu_snapshot()
        time.sleep(window_s)
        others = other_load(before, cpu_snapshot())
        if others is None or others <= BUSY_CORES:
            return True
        if time.monotonic() >= deadline:
            return False


def undisturbed(fn, retries, what, progress, retry_wait_s=0):
    """Run fn() while watching the CPU use of other processes; when they used more than BUSY_CORES, wait
    (at most retry_wait_s) for the CPUs to be idle and run it again, at most `retries` more times; keep
    the least disturbed result. Returns (result, other_cores, attempts)."""
    best = None
    for attempt in range(1, retries + 2):
        if attempt > 1 and retry_wait_s > 0:
            wait_until_idle(retry_wait_s)
        before = cpu_snapshot()
        result = fn()
        others = other_load(before, cpu_snapshot())
        if best is None or (others is not None and (best[1] is None or others < best[1])):
            best = (result, others, attempt)
        if others is None or others <= BUSY_CORES:
            break
        if progress:
            progress(f"{what}: other processes used {others:.2f} cores meanwhile"
                     + ("; timing it again" if attempt <= retries else ""))
    return best
