"""Channels-last training forward and backward run in one parallel region, with the rows or, when there are fewer
chunks of rows than threads, the channels shared out among the threads (and batch_stats with the channels shared
out when the caches hold x). Whichever split a call takes, the results are the oracle's, the same bits for every
thread count, the same in place, and a channel that needs the float64 apply gets it for the whole call."""
import numpy as np
import pytest

import bn_simd
import oracle as ref
from conftest import (HAVE_OPENMP, assert_float64_apply_for_the_whole_call, assert_forward_close, assert_within,
                      backward_bounds, channel_params, eps_of, make_input)

# (N, C) arrays and NHWC tensors: the channels-last kernels. Chunks are 256 KiB of rows (at least 64 rows).
CASES = [
    ((256, 1024), "NCHW", np.float32),    # 4 chunks: rows split, the benchmark's BatchNorm1d case
    ((128, 256), "NCHW", np.float32),     # 1 chunk: channels split, 128 a thread (2 threads), 64, 64, 128 (3)
    ((3, 200, 7, 8), "NHWC", np.float32),  # 1 chunk: channels split, the second block 72 wide (a vector tail)
    ((64, 516), "NCHW", np.float64),      # 1 chunk of float64: channels split, 4 channels past the last vector
    ((700, 130), "NCHW", np.float64),     # 3 chunks: rows split
    ((400, 100), "NCHW", np.float32),     # too narrow to split the channels: one chunk on one thread, then both
]
IDS = ["x".join(map(str, s)) + f"-{l}-{np.dtype(d).name}" for s, l, d in CASES]


def _outputs(x, dy, layout, out=None, dx_out=None):
    C = ref.num_channels(x.shape, layout)
    w, b = channel_params(C, x.dtype, seed=3)
    y, mean, invstd = bn_simd.batch_norm_forward(x, w, b, layout=layout, out=out)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x if dx_out is None or dx_out is not x else x.copy(), mean, invstd, w,
                                             layout=layout, out=dx_out)
    sm, sv = bn_simd.batch_stats(x, layout=layout)
    return {"y": y, "mean": mean, "invstd": invstd, "grad_x": gx, "grad_w": gw, "grad_b": gb, "stats_mean": sm,
            "stats_var": sv}


@pytest.mark.parametrize("shape,layout,dtype", CASES, ids=IDS)
def test_matches_the_oracle(shape, layout, dtype, threads):
    threads(2)
    x = make_input(shape, layout, dtype, seed=60, loc=3.0, scale=2.0)
    dy = make_input(shape, layout, dtype, seed=61)
    assert x.size >= 32768  # not below the one-thread threshold
    C = shape[1]
    w, b = channel_params(C, dtype, seed=3)
    got = _outputs(x, dy, layout)
    assert_forward_close(got["y"], x, w, b, layout=layout)
    _, mean, var = ref.forward_train(x.astype(np.float64), layout=layout)
    e = eps_of(dtype)
    assert_within(got["stats_mean"], mean, 4 * e * (np.abs(mean) + np.sqrt(var)), "batch_stats mean")
    assert_within(got["stats_var"], var, 8 * e * var, "batch_stats var")
    bx, bw, bb = backward_bounds(dy, x, got["mean"], got["invstd"], w, layout, True, dtype)
    gx_ref, gw_ref, gb_ref = ref.backward(dy, x, got["mean"], got["invstd"], w, layout)
    assert_within(got["grad_x"], gx_ref, bx, "grad_x")
    assert_within(got["grad_w"], gw_ref, bw, "grad_weight")
    assert_within(got["grad_b"], gb_ref, bb, "grad_bias")


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
@pytest.mark.parametrize("shape,layout,dtype", CASES, ids=IDS)
def test_every_thread_count_and_in_place_give_the_same_bits(shape, layout, dtype, threads, isa):
    # (each kernel set: the column split gets the row split's bits because its blocks start at multiples of every
    # ISA's vector of doubles)
    x = make_input(shape, layout, dtype, seed=62, loc=-1.0, scale=0.5)
    dy = make_input(shape, layout, dtype, seed=63)
    threads(1)
    serial = _outputs(x, dy, layout)
    for n in (2, 3, 4):
        threads(n)
        for k, v in _outputs(x, dy, layout).items():
            np.testing.assert_array_equal(v, serial[k], err_msg=f"{k} with {n} threads")
        # in place: y over x, grad_x over grad_out (every thread reads its sums' data before any writes)
        xi, dyi = x.copy(), dy.copy()
        got = _outputs(xi, dyi, layout, out=xi, dx_out=dyi)
        assert got["y"] is xi and got["grad_x"] is dyi
        for k in ("y", "mean", "invstd"):
            np.testing.assert_array_equal(got[k], serial[k], err_msg=f"in-place {k} with {n} threads")
        # the in-place backward saw the in-place forward's x (now y): compare with the same call out of place
        C = ref.num_channels(x.shape, layout)
        w, _ = channel_params(C, dtype, seed=3)
        ref_gx = bn_simd.batch_norm_backward(dy, xi, got["mean"], got["invstd"], w, layout=layout)[0]
        np.testing.assert_array_equal(dyi, ref_gx, err_msg=f"in-place grad_x with {n} threads")


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
@pytest.mark.parametrize("shape", [(256, 1024), (128, 256)], ids=["rows-split", "channels-split"])
def test_a_channel_needing_the_float64_apply_takes_it_for_the_whole_call(shape, threads):
    # channel C - 3 (the last thread's): std 1e37 with weight 1e-3, a float32 scale below float32's normal range:
    # the call normalises in float64 (one thread), whatever the thread count, and in place as well
    rng = np.random.default_rng(64)
    C = shape[1]
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, C - 3] *= np.float32(1e37)
    w = np.ones(C)
    w[C - 3] = 1e-3
    b = rng.standard_normal(C)
    assert_float64_apply_for_the_whole_call(x, w, b, threads)
