"""Element-wise sweeps: the same bits whatever the thread split, the output's alignment or the path.

The training forward's normalise and the backward's dx sweep give exactly the bits of the memory-order sweeps
(normalize; the slab path; other thread counts, which cut the shares elsewhere), in place or not, into outputs at
every alignment, streamed or not, and agree with the float64 oracle; the arrays span many 64-byte lines per thread.
The AVX-512 channels-first segments begin with a masked head up to the output's vector boundary, and channels-last
runs start at the output's first aligned element when C is a multiple of the vector length, with the per-channel
arrays placed to match (batchnorm.inc, cl_coef_alloc): every alignment of input and output gives the same bits, and
outputs at every offset within a cache line leave the bytes around them untouched.
"""
import numpy as np
import pytest

import bn_simd
import oracle as ref
from bn_simd import _core
from conftest import (assert_forward_close, assert_within, backward_bounds, channel_params, make_input, use_slab,
                      use_strips)

# (NCHW shape, layout, dtype): large enough for 3 threads
CASES = [
    ((5, 24, 71, 73), "NCHW", np.float32),
    ((5, 24, 71, 73), "NHWC", np.float32),
    ((3, 37, 61, 67), "NHWC", np.float64),   # odd C: thread shares start at every channel
    ((6, 64, 41, 43), "NHWC", np.float32),   # C a multiple of every vector: runs start at y's first aligned element
    ((4, 1296, 11, 13), "NHWC", np.float32),  # wide rows (column strips)
    ((12, 2048, 7, 7), "NCHW", np.float32),   # 7x7 maps: thread shares cut runs of one channel
    ((2, 4, 211, 211), "NCHW", np.float32),   # the sweep streams (at a threshold lowered to STREAMED's)
]
# shapes whose sweeps stream: the threshold (32 MiB by default) lowered to this for them
STREAMED = {(2, 4, 211, 211): 1 << 20}
IDS = ["-".join(["x".join(map(str, s)), l, np.dtype(d).name]) for s, l, d in CASES]


def _shifted_empty(shape, dtype, shift):
    """An uninitialised C-contiguous array of `shape` starting `shift` elements into a fresh buffer: outputs whose
    cache-line alignment differs from the input's."""
    n = int(np.prod(shape))
    return np.empty(n + 16, dtype)[shift:shift + n].reshape(shape)


@pytest.mark.parametrize("nchw_shape,layout,dtype", CASES, ids=IDS)
def test_training_normalise_is_bitwise_normalize_for_every_split_alignment_and_in_place(nchw_shape, layout, dtype,
                                                                                        isa, threads):
    _core.set_stream_bytes(STREAMED.get(nchw_shape))  # (None: the default; conftest restores it)
    use_slab(0)  # channels-first: the statistics sweep, then the normalise sweep, on every CPU
    use_strips("strips" if nchw_shape[1] > 1000 else "cpu")
    x = make_input(nchw_shape, layout, dtype, seed=70, loc=1.5, scale=2.0)
    C = nchw_shape[1]
    w, b = channel_params(C, dtype, seed=71)
    threads(1)
    mean, var = bn_simd.batch_stats(x, layout=layout)
    expected = bn_simd.normalize(x, mean, var, w, b, layout=layout)
    assert_forward_close(expected, x, w, b, layout=layout)
    for nt in (1, 2, 3):
        threads(nt)
        for shift in (0, 1, 3):
            out = _shifted_empty(x.shape, dtype, shift)
            y = bn_simd.batch_norm(x, None, None, w, b, training=True, layout=layout, out=out)
            assert y is out
            np.testing.assert_array_equal(y, expected, err_msg=f"{nt} threads, out shifted by {shift}")
        inplace = x.copy()
        bn_simd.batch_norm(inplace, None, None, w, b, training=True, layout=layout, out=inplace)
        np.testing.assert_array_equal(inplace, expected, err_msg=f"{nt} threads, in place")


@pytest.mark.parametrize("nchw_shape,layout,dtype", CASES, ids=IDS)
def test_dx_sweep_is_bitwise_the_same_for_every_split_alignment_path_and_in_place(nchw_shape, layout, dtype, isa,
                                                                                  threads):
    _core.set_stream_bytes(STREAMED.get(nchw_shape))
    use_strips("strips" if nchw_shape[1] > 1000 else "cpu")
    x = make_input(nchw_shape, layout, dtype, seed=72, loc=-1.0, scale=2.0)
    dy = make_input(nchw_shape, layout, dtype, seed=73, loc=0.1)
    w = channel_params(nchw_shape[1], np.float64, seed=74)[0]
    _, mean, invstd = bn_simd.batch_norm_forward(x, w, layout=layout)
    use_slab(0)
    threads(1)
    expected, gw, gb = bn_simd.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
    mean64, s = mean.astype(np.float64), invstd.astype(np.float64)
    bound, _, _ = backward_bounds(dy, x, mean64, s, w, layout, True, dtype)
    assert_within(expected, ref.backward(dy, x, mean64, s, w, layout)[0], bound, "grad_x vs oracle")
    runs = [(0, nt, shift) for nt in (1, 2, 3) for shift in (0, 2)]
    if layout == "NCHW":
        runs += [(1 << 26, 2, 1)]  # the slab path (a budget every group fits): each group's dx right after its sums
    for budget, nt, shift in runs:
        use_slab(budget)
        threads(nt)
        out = _shifted_empty(x.shape, dtype, shift)
        gx, gw2, gb2 = bn_simd.batch_norm_backward(dy, x, mean, invstd, w, layout=layout, out=out)
        assert gx is out
        what = f"{nt} threads, slab budget {budget}, out shifted by {shift}"
        np.testing.assert_array_equal(gx, expected, err_msg=what)
        np.testing.assert_array_equal(gw2, gw, err_msg=what)
        np.testing.assert_array_equal(gb2, gb, err_msg=what)
    use_slab(0)
    threads(2)
    for name in ("dy", "x"):
        a, g = x.copy(), dy.copy()
        target = g if name == "dy" else a
        bn_simd.batch_norm_backward(g, a, mean, invstd, w, layout=layout, out=target)
        np.testing.assert_array_equal(target, expected, err_msg=f"in place over {name}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [64, 48, 44, 37, 1024])  # 44: a multiple of 4, not 8; 37: of nothing
def test_channels_last_sweeps_give_the_same_bits_at_every_alignment(C, dtype, isa, threads):
    rows = max(64, 300_000 // C)
    rng = np.random.default_rng(75)
    x0 = rng.standard_normal((rows, C)).astype(dtype) * 2.0 + 0.5
    dy0 = rng.standard_normal((rows, C)).astype(dtype)
    w, b = channel_params(C, dtype, seed=76)
    m, a, bb, d = (rng.standard_normal(C).astype(dtype) for _ in range(4))
    threads(2)
    mean, var = bn_simd.batch_stats(x0, layout="NHWC")
    ref_y = bn_simd.normalize(x0, mean, var, w, b, layout="NHWC")
    ref_t = bn_simd.batch_norm(x0, None, None, w, b, training=True, layout="NHWC")
    ref_dx = bn_simd.backward_apply(dy0, x0, m, a, bb, d, layout="NHWC")
    assert_forward_close(ref_t, x0, w, b, layout="NHWC")
    for xs, ys in [(0, 1), (1, 1), (3, 0), (5, 9), (15, 2)]:
        x = _shifted_empty(x0.shape, dtype, xs)
        x[...] = x0
        dy = _shifted_empty(x0.shape, dtype, xs)
        dy[...] = dy0
        what = f"input shifted by {xs}, output by {ys}"
        y = bn_simd.normalize(x, mean, var, w, b, layout="NHWC", out=_shifted_empty(x.shape, dtype, ys))
        np.testing.assert_array_equal(y, ref_y, err_msg="normalize, " + what)
        y = bn_simd.batch_norm(x, None, None, w, b, training=True, layout="NHWC", out=_shifted_empty(x.shape, dtype, ys))
        np.testing.assert_array_equal(y, ref_t, err_msg="training forward, " + what)
        dx = bn_simd.backward_apply(dy, x, m, a, bb, d, layout="NHWC", out=_shifted_empty(x.shape, dtype, ys))
        np.testing.assert_array_equal(dx, ref_dx, err_msg="backward_apply, " + what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout,nchw_shape", [("NCHW", (3, 5, 9, 11)), ("NCHW", (2, 3, 17, 23)),
                                               ("NHWC", (3, 64, 9, 11)), ("NHWC", (2, 48, 7, 5))])
def test_outputs_at_every_offset_leave_their_neighbours_alone(layout, nchw_shape, dtype, isa, threads):
    """Every output starting at each offset within a cache line (the kernels' first vector then starts after a
    masked head or a few single elements): no byte before or after the output changes, and the values are those
    of an output at offset 0."""
    x = make_input(nchw_shape, layout, dtype, seed=77, loc=0.5)
    dy = make_input(nchw_shape, layout, dtype, seed=78)
    C = nchw_shape[1]
    w, b = channel_params(C, dtype, seed=79)
    _, mean, invstd = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    threads(2)
    n = x.size
    line = 64 // np.dtype(dtype).itemsize
    calls = {
        "eval": lambda out: bn_simd.batch_norm(x, mean.copy(), (1 / invstd.astype(np.float64)) ** 2, w, b,
                                               layout=layout, out=out),
        "forward": lambda out: bn_simd.batch_norm(x, None, None, w, b, training=True, layout=layout, out=out),
        "backward": lambda out: bn_simd.batch_norm_backward(dy, x, mean, invstd, w, layout=layout, out=out)[0],
    }
    for name, call in calls.items():
        expected = None
        for shift in range(line):
            buf = np.full(n + 2 * line, -7.25, dtype)
            lo, hi = line + shift, line + shift + n
            out = buf[lo:hi].reshape(x.shape)
            res = call(out)
            assert res is out
            assert np.all(buf[:lo] == -7.25) and np.all(buf[hi:] == -7.25), f"{name}: bytes outside out written"
            if expected is None:
                expected = res.copy()
            np.testing.assert_array_equal(res, expected, err_msg=f"{name}, output at element {lo}")


# (the last: the output streams, the threshold lowered to 16 MiB: 18 MiB touched)
@pytest.mark.parametrize("dtype,C,mib,stream", [(np.float32, 1024, 8, None), (np.float64, 512, 8, None),
                                                (np.float32, 1536, 8, None), (np.float32, 1024, 9, 16 << 20)])
def test_interleaved_coefficients_give_the_bits_of_the_three_arrays(dtype, C, mib, stream, isa, threads):
    """Flat channels-last normalise sweeps of inputs of 8 MiB and more whose coefficients take 12 KiB or more read
    them interleaved (batchnorm.inc, cl_il_alloc), from a group origin that depends on the output's alignment; the
    column strips read the three arrays. Both give the same bits, for every output offset and thread count, stored
    or streamed, and agree with the float64 oracle."""
    _core.set_stream_bytes(stream)
    rows = (mib << 20) // (C * np.dtype(dtype).itemsize) + 3
    rng = np.random.default_rng(80)
    x = rng.standard_normal((rows, C)).astype(dtype) * 3.0 - 1.25
    w, b = channel_params(C, dtype, seed=81)
    mean, var = bn_simd.batch_stats(x, layout="NHWC")
    _core.set_cl_strip_bytes(4096)  # column strips: rows of 5 arrays of C elements are 20 KiB or more
    ref_y = bn_simd.normalize(x, mean, var, w, b, layout="NHWC")
    ref_t = bn_simd.batch_norm(x, None, None, w, b, training=True, layout="NHWC")
    assert_forward_close(ref_t, x, w, b, layout="NHWC")
    use_strips("flat")
    for nt in (1, 2, 3):
        threads(nt)
        for shift in (0, 1, 3, 15):
            what = f"{nt} threads, output shifted by {shift}"
            y = bn_simd.normalize(x, mean, var, w, b, layout="NHWC", out=_shifted_empty(x.shape, dtype, shift))
            np.testing.assert_array_equal(y, ref_y, err_msg="normalize, " + what)
            y = bn_simd.batch_norm(x, None, None, w, b, training=True, layout="NHWC",
                                   out=_shifted_empty(x.shape, dtype, shift))
            np.testing.assert_array_equal(y, ref_t, err_msg="training forward, " + what)
