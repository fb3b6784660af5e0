"""Channels-first training forward and backward a group of channel blocks at a time (the slab path): each group's
statistics or sums, coefficients and sweep in one task while the group is in the core's L2, when one block's slab
fits there and the groups share out evenly among the threads; otherwise a statistics sweep and a normalise sweep over
the whole tensor. Whichever a call takes, the results are the oracle's and the same bits: the same statistics as
batch_stats, the same y as normalize with them, the same gradients as backward_reduce's sums give, for every thread
count, in place (which the forward takes through the two sweeps) and with a channel that needs the float64 apply.
Whether a CPU takes the slab path by default depends on it (bn_simd._core.slab_bytes): these tests force a budget of
1 MiB, and compare with the path turned off."""
import numpy as np
import pytest

import bn_simd
import oracle as ref
from conftest import (HAVE_OPENMP, SLAB_BUDGET, assert_float64_apply_for_the_whole_call, assert_forward_close,
                      assert_within, backward_bounds, channel_params, make_input, use_slab)


@pytest.fixture(autouse=True)
def _slab_budget():
    use_slab(SLAB_BUDGET)  # (conftest restores the CPU's default after each test)

# NCHW tensors. Blocks: one channel for maps of 512 elements and more, else as many channels as make a run of 512;
# chunks: one row (pieces of 8192 float32 / 4096 float64 elements for longer maps), or rows giving 256 a channel.
# A group's slab (all rows of its blocks) is at most 1 MiB over the arrays kept in L2: x and y for the forward, dy, x
# and grad_x for the backward (y and grad_x not when they are streamed); and the busiest thread gets at most 1.25
# times the average number of blocks.
CASES = [
    ((32, 16, 28, 28), np.float32),   # one channel a block, one row a chunk: 16 blocks in groups of 5 (3 with 3 threads)
    ((8, 24, 96, 100), np.float32),   # maps cut in 2 pieces a row
    ((24, 40, 7, 7), np.float32),     # 11 channels a block, the last of 7, 6 rows a chunk: 4 blocks, 3 threads sweep
    ((128, 12, 5, 5), np.float64),    # one block: the slab path on one thread only
    ((4, 9, 33, 35), np.float64),     # 9 blocks: in groups of 5 (2 threads) or 3 (3 threads); 4 threads sweep
    ((3, 5, 150, 160), np.float32),   # 5 blocks of 3 rows cut in 3 pieces: 4 threads sweep
    ((12, 4, 128, 128), np.float32),  # slabs of 1.5 MiB over x and y: the sweeps
]
IDS = ["x".join(map(str, s)) + f"-{np.dtype(d).name}" for s, d in CASES]


def _outputs(x, dy, out=None, dx_out=None):
    C = x.shape[1]
    w, b = channel_params(C, x.dtype, seed=5)
    y, mean, invstd = bn_simd.batch_norm_forward(x, w, b, out=out)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x if dx_out is None or dx_out is not x else x.copy(), mean, invstd, w,
                                             out=dx_out)
    return {"y": y, "mean": mean, "invstd": invstd, "grad_x": gx, "grad_w": gw, "grad_b": gb}


@pytest.mark.parametrize("shape,dtype", CASES, ids=IDS)
def test_matches_the_oracle_and_the_separate_steps(shape, dtype, threads):
    threads(2)
    x = make_input(shape, "NCHW", dtype, seed=70, loc=-2.0, scale=3.0)
    dy = make_input(shape, "NCHW", dtype, seed=71)
    C = shape[1]
    w, b = channel_params(C, dtype, seed=5)
    got = _outputs(x, dy)
    assert_forward_close(got["y"], x, w, b, layout="NCHW")
    bx, bw, bb = backward_bounds(dy, x, got["mean"], got["invstd"], w, "NCHW", True, dtype)
    gx_ref, gw_ref, gb_ref = ref.backward(dy, x, got["mean"], got["invstd"], w, "NCHW")
    assert_within(got["grad_x"], gx_ref, bx, "grad_x")
    assert_within(got["grad_w"], gw_ref, bw, "grad_weight")
    assert_within(got["grad_b"], gb_ref, bb, "grad_bias")
    # the steps one by one: the statistics sweep, the normalise sweep, the backward sums
    mean, var = bn_simd.batch_stats(x)
    np.testing.assert_array_equal(got["mean"], mean.astype(dtype))  # (saved in x's dtype)
    np.testing.assert_array_equal(got["y"], bn_simd.normalize(x, mean, var, w, b))
    sdy, sdyx = bn_simd.backward_reduce(dy, x, got["mean"])
    np.testing.assert_array_equal(got["grad_b"], sdy.astype(dtype))
    np.testing.assert_array_equal(got["grad_w"], (sdyx * got["invstd"].astype(np.float64)).astype(dtype))


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
@pytest.mark.parametrize("shape,dtype", CASES, ids=IDS)
def test_every_thread_count_and_in_place_give_the_same_bits(shape, dtype, threads, isa):
    x = make_input(shape, "NCHW", dtype, seed=72, loc=5.0, scale=0.25)
    dy = make_input(shape, "NCHW", dtype, seed=73)
    threads(1)
    serial = _outputs(x, dy)
    for n in (2, 3, 4):
        threads(n)
        for k, v in _outputs(x, dy).items():
            np.testing.assert_array_equal(v, serial[k], err_msg=f"{k} with {n} threads")
        # in place: y over x (the two sweeps), grad_x over grad_out and over x (each block reads before it writes)
        xi, dyi = x.copy(), dy.copy()
        got = _outputs(xi, dyi, out=xi, dx_out=dyi)
        assert got["y"] is xi and got["grad_x"] is dyi
        for k in ("y", "mean", "invstd"):
            np.testing.assert_array_equal(got[k], serial[k], err_msg=f"in-place {k} with {n} threads")
        w, _ = channel_params(shape[1], dtype, seed=5)
        ref_gx = bn_simd.batch_norm_backward(dy, xi, got["mean"], got["invstd"], w)[0]
        np.testing.assert_array_equal(dyi, ref_gx, err_msg=f"in-place grad_x with {n} threads")
        xo = x.copy()
        gx = bn_simd.batch_norm_backward(dy, xo, serial["mean"], serial["invstd"], w, out=xo)[0]
        assert gx is xo
        np.testing.assert_array_equal(xo, serial["grad_x"], err_msg=f"grad_x over x with {n} threads")


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
def test_a_channel_needing_the_float64_apply_takes_it_for_the_whole_call(threads):
    # channel 13 of 16 (the second thread's block): std 1e37 with weight 1e-3, a float32 scale below float32's
    # normal range: the whole call normalises in float64, on the slab path and in place (the sweeps) alike
    rng = np.random.default_rng(74)
    shape = (32, 16, 28, 28)
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, 13] *= np.float32(1e37)
    w = np.ones(16)
    w[13] = 1e-3
    b = rng.standard_normal(16)
    y1 = assert_float64_apply_for_the_whole_call(x, w, b, threads)
    mean, var = bn_simd.batch_stats(x)
    np.testing.assert_array_equal(bn_simd.normalize(x, mean, var, w, b), y1)


def test_large_tensors_stream_their_output(threads):
    # 5 x 64 x 128 x 128 float32 (21 MB): the forward touches 42 MB, the backward 63 MB, past the streaming
    # threshold (32 MiB): the slab path streams each group's rows and fences once a thread
    threads(2)
    shape = (5, 64, 128, 128)
    x = make_input(shape, "NCHW", np.float32, seed=75, loc=1.0, scale=2.0)
    dy = make_input(shape, "NCHW", np.float32, seed=76)
    w, b = channel_params(64, np.float32, seed=5)
    got = _outputs(x, dy)
    assert_forward_close(got["y"], x, w, b, layout="NCHW")
    bx, bw, bb = backward_bounds(dy, x, got["mean"], got["invstd"], w, "NCHW", True, np.float32)
    gx_ref, gw_ref, gb_ref = ref.backward(dy, x, got["mean"], got["invstd"], w, "NCHW")
    assert_within(got["grad_x"], gx_ref, bx, "grad_x")
    assert_within(got["grad_w"], gw_ref, bw, "grad_weight")
    assert_within(got["grad_b"], gb_ref, bb, "grad_bias")
    if HAVE_OPENMP:
        threads(1)
        for k, v in _outputs(x, dy).items():
            np.testing.assert_array_equal(v, got[k], err_msg=f"{k}: 1 thread against 2")


def test_the_cpu_default_beyond_the_last_level_cache_changes_no_bit(threads):
    # 3 x 64 x 192 x 192 float32 (28 MB): the backward reads 57 MB, past the 32 MiB from which AMD CPUs that group
    # channels do so (bn_simd._core.slab_min_input), the forward 28 MB (the two sweeps there). Whichever path the
    # CPU's default takes, the bits are those of the two sweeps
    threads(2)
    shape = (3, 64, 192, 192)
    x = make_input(shape, "NCHW", np.float32, seed=79, loc=0.5, scale=2.0)
    dy = make_input(shape, "NCHW", np.float32, seed=80)
    use_slab(0)
    want = _outputs(x, dy)
    use_slab(None)
    for k, v in _outputs(x, dy).items():
        np.testing.assert_array_equal(v, want[k], err_msg=f"{k} with the CPU's default budget")


@pytest.mark.parametrize("shape,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("budget", [0, 256 << 10, 4 << 20])
def test_the_slab_budget_changes_no_bit(shape, dtype, budget, threads):
    # 0: never the slab path (the two sweeps); 256 KiB: smaller groups, or the sweeps where one block's slab is
    # larger; 4 MiB: larger groups, and 12x4x128x128 on the slab path too
    threads(2)
    x = make_input(shape, "NCHW", dtype, seed=77, loc=-1.0, scale=4.0)
    dy = make_input(shape, "NCHW", dtype, seed=78)
    want = _outputs(x, dy)
    use_slab(budget)
    for k, v in _outputs(x, dy).items():
        np.testing.assert_array_equal(v, want[k], err_msg=f"{k} with a slab budget of {budget} bytes")


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
@pytest.mark.parametrize("budget", [None, 0])
@pytest.mark.parametrize("channel", [3, 140, 290])
def test_a_wide_channel_of_any_threads_coefficient_group_takes_the_float64_apply(budget, channel, threads):
    # 300 channels of 16x33 (one channel a block) are combined in groups of 128 channels: with 2 or 3 threads the
    # groups of channel 140 and 290 belong to the second or third thread, whose float64-apply choice must reach
    # every thread before any of them sweeps (budget 0: the two sweeps; None: this module's 1 MiB budget, with which
    # the slab path takes the call and its in-place variant the sweeps)
    if budget is not None:
        use_slab(budget)
    rng = np.random.default_rng(79)
    x = rng.standard_normal((4, 300, 16, 33)).astype(np.float32)
    x[:, channel] *= np.float32(1e37)
    w = np.ones(300)
    w[channel] = 1e-3
    b = rng.standard_normal(300)
    y1 = assert_float64_apply_for_the_whole_call(x, w, b, threads)
    mean, var = bn_simd.batch_stats(x)
    np.testing.assert_array_equal(bn_simd.normalize(x, mean, var, w, b), y1)
