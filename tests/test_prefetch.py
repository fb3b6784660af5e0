"""Channels-first float32 reductions prefetch ahead of their loads: 8 KiB ahead along a chunk that is one contiguous
run, on into the runs of the tasks after it while they follow in memory (maps of 16x16 up to 8192 elements;
longer rows are cut in pieces, and only the piece itself is prefetched).

A prefetch never changes a value, so the results must be the oracle's and the same bits on 1 and 2 threads. The
cases put prefetches at every kind of edge: the last run of the array (nothing after it may be prefetched),
successive tasks that follow one another (one channel's row, then the next; runs short enough that the
prefetch reaches several tasks ahead), pieces of rows longer than a chunk (the next task is the same piece of
the next channel, elsewhere), one channel whose pieces do follow one another, and runs barely longer than the
prefetch distance. The backward sums of maps under 16x16, whose chunks span several rows, also prefetch each
row's run of the next block of channels (up to a shorter last block, never past the last). Under the
AddressSanitizer build (.ci/asan) every prefetch is a checked load, so one outside the input fails these tests
there.
"""
import numpy as np
import pytest

import bn_simd
import oracle as ref
from conftest import reduction_tol, use_slab

# (N, C, spatial) channels-first shapes; 2048 float32 = the 8 KiB prefetch distance
SHAPES = [
    (3, 4, 3000),        # one channel's row per task, each followed by the next in memory
    (3, 6, 784),         # 28x28: the prefetch reaches 2-3 tasks ahead, up to the end of the array
    (2, 3, 2 * 8192 + 77),  # rows longer than a chunk: pieces, the next task elsewhere
    (4, 1, 20011),       # one channel: a single run cut in pieces that follow one another
    (2, 2, 2100),        # runs just longer than the prefetch distance
    (5, 2, 300),         # two channels per task (runs of 600), shorter than the distance
    # backward sums of small maps (dy and x of 8 MiB or more): chunks of several rows prefetch the next block's runs
    (40, 1031, 49),      # 7x7: blocks of 11 channels, the last one of 8 (its predecessor prefetches 8 segments)
    (90, 1000, 25),      # 5x5: chunks of 11 rows, the last of 2 (too few rows to prefetch)
]


def _data(shape, seed):
    return (1.5 + 2.0 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_prefetching_reductions_match_the_oracle_on_any_thread_count(shape, isa, threads):
    x, dy = _data(shape, 70), _data(shape, 71)
    m_ref, v_ref, n = ref.stats(x, "NCHW")
    x64, dy64 = ref.to_cn(x, "NCHW"), ref.to_cn(dy, "NCHW")
    got = {}
    for nt in (1, 2):
        threads(nt)
        mean, var = bn_simd.batch_stats(x)
        sdy, sdyx = bn_simd.backward_reduce(dy, x, mean)
        got[nt] = (mean, var, sdy, sdyx)
    for a, b in zip(got[1], got[2]):
        np.testing.assert_array_equal(a, b)
    mean, var, sdy, sdyx = got[1]
    tol = reduction_tol(n)
    np.testing.assert_allclose(mean, m_ref, rtol=0, atol=tol * np.abs(x64).mean(axis=1).max())
    np.testing.assert_allclose(var, v_ref, rtol=4 * tol)
    np.testing.assert_allclose(sdy, dy64.sum(axis=1), rtol=0, atol=tol * np.abs(dy64).sum(axis=1).max())
    dev = dy64 * (x64 - mean[:, None])
    np.testing.assert_allclose(sdyx, dev.sum(axis=1), rtol=0, atol=tol * np.abs(dev).sum(axis=1).max())


@pytest.mark.parametrize("shape", [(40, 1031, 49), (37, 1031, 49), (91, 1000, 25)],
                         ids=["40x1031x49", "37x1031x49", "91x1000x25"])
def test_slab_backward_prefetching_gives_the_bits_of_the_sweeps(shape, isa, threads):
    """The slab path's backward sums prefetch as bn_backward_reduce's do (the next block of the group, in each row of
    a chunk; a last chunk of one row takes the one-row prefetch): the same bits as the two sweeps, on 1 and 2
    threads, and checked loads in the AddressSanitizer build."""
    x, dy = _data(shape, 72), _data(shape, 73)
    x4, dy4 = x.reshape(shape + (1,)), dy.reshape(shape + (1,))
    w = np.linspace(0.5, 1.5, shape[1]).astype(np.float32)
    _, mean, invstd = bn_simd.batch_norm_forward(x4, w)
    for nt in (1, 2):
        threads(nt)
        use_slab(0)
        expected = bn_simd.batch_norm_backward(dy4, x4, mean, invstd, w)
        for budget in (1 << 20, 4 << 20):
            use_slab(budget)
            got = bn_simd.batch_norm_backward(dy4, x4, mean, invstd, w)
            for a, b, name in zip(got, expected, ("grad_x", "grad_weight", "grad_bias")):
                np.testing.assert_array_equal(a, b, err_msg=f"{name}, slab budget {budget}, {nt} threads")
