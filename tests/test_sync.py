"""SyncBatchNorm's maths with P ranks simulated by threads of one process (tests/fake_comm.py): the result of one
process on the concatenated batch (bitwise in exact mode on chunk boundaries, against the float64 oracle
elsewhere), running statistics, the fast mode's one allreduce, the functional steps, errors that every rank sees,
communicator lookup and convert_sync_batchnorm. Real processes: tests/test_sync_procs.py."""
import numpy as np
import pytest

import bn_simd
from bn_simd import sync
from conftest import assert_within, backward_bounds, channel_params, forward_bound, make_input, ref
from fake_comm import make_comms, run_ok, run_ranks

# (nchw shape, layout): channels-first 16x16 maps (a chunk per sample), 6x6 maps (chunks of several samples),
# 100x100 maps (pieces of a row), channels-last rows, a single channel (one flat run)
CASES = [((10, 6, 16, 16), "NCHW"), ((40, 8, 6, 6), "NCHW"), ((3, 3, 100, 100), "NCHW"),
         ((20, 40, 16, 16), "NHWC"), ((2500, 70), "NHWC"), ((12, 1, 32, 64), "NCHW")]


def channels(shape, layout):
    return shape[1] if layout == "NCHW" else shape[-1]


def boundary_cuts(shape, layout, dtype, P):
    """Cut points at chunk boundaries with unequal pieces (and an empty one for P = 3)."""
    unit = sync.chunk_rows(shape, layout, dtype)
    if unit is None:  # one channel: chunks of a flat run; pieces of whole multiples of it
        run = sync._chunks(1, 1, int(np.prod(shape)), np.dtype(dtype).itemsize)[0][3]
        per_row = int(np.prod(shape[1:]))
        assert run % per_row == 0
        unit = run // per_row
    rows = shape[0] if layout == "NCHW" else int(np.prod(shape[:-1]))
    assert rows > 2 * unit, "the case needs several chunks"
    return {1: [0, rows], 2: [0, unit, rows], 3: [0, 2 * unit, 2 * unit, rows]}[P]


def as_rows(a, layout):
    """a's rows as the pieces are cut: samples (NCHW) or rows of the (N * spatial, C) matrix (NHWC)."""
    return a if layout == "NCHW" else a.reshape(-1, a.shape[-1])


def run_layers(P, x_steps, g, layout, dtype, cuts, mode, **kw):
    """Each rank's SyncBatchNorm over its rows of the batches x_steps, then backward(g): [(layer, y, gx)]."""
    C = channels(x_steps[0].shape, layout)
    w, b = channel_params(C, dtype, seed=3)

    def fn(r, comm):
        layer = bn_simd.SyncBatchNorm(C, layout=layout, dtype=dtype, comm=comm, mode=mode, **kw)
        if layer.affine:
            layer.weight[:], layer.bias[:] = w, b
        for x in x_steps:
            y = layer(as_rows(x, layout)[cuts[r]:cuts[r + 1]])
        gx = layer.backward(as_rows(g, layout)[cuts[r]:cuts[r + 1]])
        return layer, y, gx

    return run_ok(P, fn)


def one_process(x_steps, g, layout, dtype, **kw):
    C = channels(x_steps[0].shape, layout)
    w, b = channel_params(C, dtype, seed=3)
    layer = bn_simd.BatchNorm(C, layout=layout, dtype=dtype, **kw)
    if layer.affine:
        layer.weight[:], layer.bias[:] = w, b
    for x in x_steps:
        y = layer(x)
    return layer, y, layer.backward(g)


def same_bits(a, b):
    return a is None and b is None or (a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())


# ---- chunk geometry -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [(32, 16, 9, 9), (64, 7, 300, 10), (500, 33), (7, 1, 50), (3, 5, 4, 4, 4),
                                   (4, 3, 100, 100), (2, 2, 9000), (300, 1), (9, 600, 7, 7), (3, 2, 1, 1),
                                   (5, 1, 9000), (0, 4, 8), (70000, 3)], ids=str)
def test_chunk_geometry_is_the_kernels(shape, layout, dtype):
    """sync's copy of the chunk geometry gives batch_moments' chunk counts."""
    mo = bn_simd.batch_moments(np.zeros(shape, dtype), layout=layout)
    if layout == "NCHW":
        outer, C, inner = shape[0], shape[1], int(np.prod(shape[2:]))
    else:
        outer, C, inner = int(np.prod(shape[:-1])), shape[-1], 1
    chunks = sync._chunks(outer, C, inner, np.dtype(dtype).itemsize)
    assert [(r1 - r0) * (i1 - i0) for r0, r1, i0, i1 in chunks] == list(mo.count)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_backward_chunk_sums_add_up_to_backward_reduce_bits(shape, layout, dtype, threads, isa):
    x = make_input(shape, layout, dtype, seed=1, loc=3.0)
    g = make_input(shape, layout, dtype, seed=2)
    mean = bn_simd.batch_stats(x, layout=layout)[0]
    for n in (1, 2):
        threads(n)
        sdy, sdyx = bn_simd.backward_reduce(g, x, mean, layout=layout)
        parts = sync.backward_chunk_sums(g, x, mean, layout=layout)
        assert parts.shape[1:] == (2, channels(x.shape, layout))
        assert same_bits(sync._sum_in_order(parts[:, 0], parts.shape[2]), sdy)
        assert same_bits(sync._sum_in_order(parts[:, 1], parts.shape[2]), sdyx)
    with pytest.raises(ValueError, match="grad_out must have the shape"):
        sync.backward_chunk_sums(g[:1], x, mean, layout=layout)
    with pytest.raises(ValueError, match="mean"):
        sync.backward_chunk_sums(g, x, mean[:-1], layout=layout)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_backward_chunk_sums_of_a_threaded_call(layout, threads):
    """A call large enough for several threads (and the column split of channels-last sums) against its chunks
    taken one by one."""
    shape = (8, 256, 24, 24)
    x = make_input(shape, layout, np.float32, seed=1, loc=1.0)
    g = make_input(shape, layout, np.float32, seed=2)
    mean = bn_simd.batch_stats(x, layout=layout)[0]
    threads(2)
    sdy, sdyx = bn_simd.backward_reduce(g, x, mean, layout=layout)
    parts = sync.backward_chunk_sums(g, x, mean, layout=layout)
    assert len(parts) > 2
    assert same_bits(sync._sum_in_order(parts[:, 0], 256), sdy)
    assert same_bits(sync._sum_in_order(parts[:, 1], 256), sdyx)


# ---- the layer: one process's results -----------------------------------------------------------------------------

@pytest.mark.parametrize("P", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,layout", CASES, ids=str)
def test_exact_mode_on_chunk_boundaries_is_one_process_bitwise(shape, layout, dtype, P):
    xs = [make_input(shape, layout, dtype, seed=s, loc=2.0 - s, scale=1.0 + s) for s in (1, 2)]
    g = make_input(shape, layout, dtype, seed=5)
    cuts = boundary_cuts(xs[0].shape, layout, dtype, P)
    want_layer, want_y, want_gx = one_process(xs, g, layout, dtype)
    got = run_layers(P, xs, g, layout, dtype, cuts, "exact")
    y = np.concatenate([as_rows(r[1], layout) for r in got]).reshape(want_y.shape)
    gx = np.concatenate([as_rows(r[2], layout) for r in got]).reshape(want_gx.shape)
    assert same_bits(y, want_y)
    assert same_bits(gx, want_gx)
    for layer, _, _ in got:
        for name in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            assert same_bits(getattr(layer, name), getattr(want_layer, name)), name
        assert layer.num_batches_tracked == 2


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("P,sizes", [(2, (3, 9)), (3, (5, 0, 6)), (3, (1, 1, 1))])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_unequal_pieces_match_the_float64_oracle(layout, P, sizes, mode):
    """Pieces off the chunk boundaries (and ranks of 0 or 1 sample): the oracle's results on the whole batch."""
    dtype = np.float32
    N = sum(sizes)
    shape = (N, 5, 7, 9)
    x = make_input(shape, layout, dtype, seed=11, loc=40.0, scale=3.0)
    g = make_input(shape, layout, dtype, seed=12)
    per_sample = 1 if layout == "NCHW" else 7 * 9  # (NHWC pieces are cut in rows of the (N * H * W, C) matrix)
    cuts = [int(c) * per_sample for c in np.cumsum((0,) + sizes)]
    C = 5
    w, b = channel_params(C, dtype, seed=3)
    got = run_layers(P, [x], g, layout, dtype, cuts, mode)
    y = np.concatenate([r[1] for r in got]).reshape(x.shape)
    gx = np.concatenate([r[2] for r in got]).reshape(x.shape)
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    y_ref, mean, var = ref.forward_train(x, w64, b64, layout=layout)
    n = ref.reduction_size(x.shape, layout)
    assert_within(y, y_ref, forward_bound(x, dtype, n, w64, b64, layout=layout), "y")
    s = ref.invstd(var)
    gx_b, gw_b, gb_b = backward_bounds(g, x, mean, s, w64, layout, dtype=dtype, batch_stats=True)
    gx_ref, gw_ref, gb_ref = ref.backward(g, x, mean, s, w64, layout)
    assert_within(gx, gx_ref, gx_b, "grad_x")
    rm, rv = ref.update_running(np.zeros(C), np.ones(C), mean, var, n, 0.1)
    for layer, _, _ in got:
        assert_within(layer.grad_weight, gw_ref, gw_b, "grad_weight")
        assert_within(layer.grad_bias, gb_ref, gb_b, "grad_bias")
        assert_within(layer.running_mean, rm, 4 * np.finfo(dtype).eps * (np.abs(rm) + 1), "running_mean")
        assert_within(layer.running_var, rv, 4 * np.finfo(dtype).eps * (np.abs(rv) + 1), "running_var")
    # every rank holds the same bits of the shared results
    for layer, _, _ in got[1:]:
        for name in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            assert same_bits(getattr(layer, name), getattr(got[0][0], name))


@pytest.mark.parametrize("kw", [dict(affine=False), dict(momentum=None), dict(unbiased_running_var=False),
                                dict(track_running_stats=False)], ids=str)
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_layer_options_follow_batchnorm(kw, mode):
    """affine=False (PyTorch's SyncBatchNorm_No_Affine), the cumulative average, Keras' biased running variance,
    no running statistics (batch statistics over every rank in eval too)."""
    shape, layout, dtype = (8, 4, 16, 16), "NCHW", np.float64
    xs = [make_input(shape, layout, dtype, seed=s, loc=s) for s in (1, 2, 3)]
    g = make_input(shape, layout, dtype, seed=4)
    want_layer, want_y, want_gx = one_process(xs, g, layout, dtype, **kw)
    got = run_layers(2, xs, g, layout, dtype, [0, 3, 8], mode, **kw)
    tol = 1e-13
    np.testing.assert_allclose(np.concatenate([r[1] for r in got]), want_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.concatenate([r[2] for r in got]), want_gx, rtol=tol, atol=tol)
    for layer, _, _ in got:
        for name in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            a, b = getattr(layer, name), getattr(want_layer, name)
            assert (a is None) == (b is None), name
            if a is not None:
                np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=name)
    if not kw.get("track_running_stats", True):
        # eval without running statistics: the whole batch's statistics still
        def fn(r, comm):
            layer = bn_simd.SyncBatchNorm(4, track_running_stats=False, comm=comm, dtype=dtype, mode=mode).eval()
            return layer(xs[0][[0, 3, 8][r]:[0, 3, 8][r + 1]])
        y = np.concatenate(run_ok(2, fn))
        np.testing.assert_allclose(y, ref.forward_train(xs[0])[0], rtol=1e-12, atol=1e-12)


def test_eval_with_running_statistics_communicates_nothing():
    class Refuses:
        def allreduce(self, buf):
            raise AssertionError("eval communicated")
        allgather = allreduce

    layer = bn_simd.SyncBatchNorm(3, comm=Refuses()).eval()
    plain = bn_simd.BatchNorm(3).eval()
    for lay in (layer, plain):
        lay.running_mean[:] = [1, 2, 3]
        lay.running_var[:] = [2, 3, 4]
    x = make_input((4, 3, 5), "NCHW", np.float32, seed=1)
    g = make_input((4, 3, 5), "NCHW", np.float32, seed=2)
    assert same_bits(layer(x), plain(x))
    assert same_bits(layer.backward(g), plain.backward(g))
    assert same_bits(layer.grad_weight, plain.grad_weight)


def test_one_sample_per_rank_trains_and_one_value_in_all_raises():
    """PyTorch's SyncBatchNorm_Single_Input_Per_Process and 2D_Input: (1, C) on each rank is a batch of P."""
    x = make_input((3, 6), "NCHW", np.float64, seed=1)
    got = run_ok(3, lambda r, comm: bn_simd.SyncBatchNorm(6, comm=comm, dtype=np.float64)(x[r:r + 1]))
    np.testing.assert_allclose(np.concatenate(got), ref.forward_train(x)[0], rtol=1e-13, atol=1e-13)

    for mode in ("exact", "fast"):
        def fn(r, comm):
            layer = bn_simd.SyncBatchNorm(6, comm=comm, mode=mode)
            try:
                layer(np.ones((1 if r == 0 else 0, 6), np.float32))
            finally:
                assert layer.num_batches_tracked == 0 and not layer.running_mean.any()
        _, errors = run_ranks(2, fn)
        assert all(isinstance(e, ValueError) and "more than 1 value per channel" in str(e) for e in errors)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_no_values_on_any_rank_is_batchnorm_on_an_empty_batch(mode):
    x = np.zeros((0, 3, 4), np.float32)
    want = bn_simd.BatchNorm(3)
    want(x)

    def fn(r, comm):
        layer = bn_simd.SyncBatchNorm(3, comm=comm, mode=mode)
        y = layer(x)
        gx = layer.backward(x)
        return layer, y, gx

    for layer, y, gx in run_ok(2, fn):
        assert y.shape == gx.shape == x.shape
        assert same_bits(layer.running_mean, want.running_mean) and same_bits(layer.running_var, want.running_var)
        assert layer.num_batches_tracked == want.num_batches_tracked == 1
        assert not layer.grad_weight.any() and not layer.grad_bias.any()


def test_out_in_place_gives_the_same_bits():
    shape = (6, 4, 16, 16)
    x = make_input(shape, "NCHW", np.float32, seed=1)
    g = make_input(shape, "NCHW", np.float32, seed=2)
    want_layer, want_y, want_gx = one_process([x], g, "NCHW", np.float32)

    def fn(r, comm):
        layer = bn_simd.SyncBatchNorm(4, comm=comm)
        layer.weight[:], layer.bias[:] = want_layer.weight, want_layer.bias
        xr, gr = x[3 * r:3 * r + 3].copy(), g[3 * r:3 * r + 3].copy()
        y = layer(xr, out=xr)
        gx = layer.backward(gr, out=gr)
        assert y is xr and gx is gr
        return y, gx

    got = run_ok(2, fn)
    assert same_bits(np.concatenate([a for a, _ in got]), want_y)
    assert same_bits(np.concatenate([b for _, b in got]), want_gx)


# ---- the fast mode ------------------------------------------------------------------------------------------------

def test_fast_mode_sends_an_allgather_of_4_and_an_allreduce_of_2c_plus_1_values_each_way():
    C = 5
    x = make_input((8, C, 6, 6), "NCHW", np.float32, seed=1)
    comms = make_comms(2)

    def fn(r, comm):
        layer = bn_simd.SyncBatchNorm(C, comm=comm, mode="fast")
        layer(x[4 * r:4 * r + 4])
        layer.backward(x[4 * r:4 * r + 4])

    run_ok(2, fn, comms)
    for comm in comms:
        assert comm.calls == [("allgather", 4), ("allreduce", 2 * C + 1)] * 2
        assert comm.bytes_sent == 2 * 8 * (2 * C + 1 + 4)


def test_fast_mode_ranks_holding_different_shifts_take_the_exact_exchange():
    """The shift is state outside the state dict (a layer unpickled on one rank, rebuilt from a state dict on
    another): ranks whose shifts differ summed S1 and S2 relative to different points, a silently wrong mean that
    differed between the ranks. Every rank now sees the shifts' checksums differ and takes the exact exchange: the
    exact layer's statistics, bit for bit, and the same shift afterwards."""
    C = 2
    steps = [make_input((8, C, 4), "NCHW", np.float32, seed=s, loc=100.0) for s in (1, 2, 3)]

    def fn(r, comm, mode):
        layer = bn_simd.SyncBatchNorm(C, comm=comm, mode=mode)
        ys = []
        for i, x in enumerate(steps):
            if i == 1 and r == 1:
                layer._shift = np.zeros(C)   # (rank 1 rebuilt from the state dict: no shift)
            ys.append(layer(x[4 * r:4 * r + 4]))
        return ys, layer.running_mean.copy(), layer.running_var.copy(), layer._shift.copy()

    fast = run_ok(2, lambda r, comm: fn(r, comm, "fast"))
    exact = run_ok(2, lambda r, comm: fn(r, comm, "exact"))
    for r in range(2):
        assert same_bits(fast[r][0][1], exact[r][0][1])   # the step with different shifts: the exact exchange's bits
        np.testing.assert_array_equal(fast[r][3], fast[0][3])   # one shift on every rank again
    assert_within(fast[0][1], exact[0][1], 1e-6 * np.abs(exact[0][1]), "running_mean")
    assert_within(fast[0][2], exact[0][2], 1e-5 * np.abs(exact[0][2]), "running_var")
    np.testing.assert_array_equal(fast[0][1], fast[1][1])


@pytest.mark.parametrize("others", [True, False], ids=["others_train", "others_eval"])
def test_a_refused_training_flag_on_one_rank_leaves_no_rank_waiting(others):
    """A training attribute that is not a bool, on one rank, of a layer without running statistics (every rank
    communicates, in training or eval): TypeError there, RuntimeError on the others (they waited for it before)."""
    x = make_input((4, 3, 8), "NCHW", np.float32, seed=1)

    def fn(r, comm):
        layer = bn_simd.SyncBatchNorm(3, comm=comm, track_running_stats=False)
        layer.training = np.array([True, False]) if r == 1 else others
        layer(x)

    _, errors = run_ranks(3, fn)
    assert isinstance(errors[1], TypeError) and "training must be a bool" in str(errors[1])
    for e in (errors[0], errors[2]):
        assert isinstance(e, RuntimeError) and "refused" in str(e)


def test_a_refused_training_flag_with_running_statistics_is_raised_before_any_exchange():
    """With running statistics, whether the other ranks communicate depends on their own flags: the refused flag is
    raised on its rank before any exchange, so ranks in eval go on (and one with no communicator at all names the
    flag, not the missing communicator)."""
    x = make_input((4, 3, 8), "NCHW", np.float32, seed=1)

    def fn(r, comm):
        layer = bn_simd.SyncBatchNorm(3, comm=comm)
        layer.training = np.array([True, False]) if r == 1 else False
        return layer(x)

    results, errors = run_ranks(3, fn)
    assert isinstance(errors[1], TypeError) and "training must be a bool" in str(errors[1])
    assert errors[0] is None and errors[2] is None and results[0].shape == x.shape
    layer = bn_simd.SyncBatchNorm(3, track_running_stats=False)   # (comm=None, no library initialised)
    layer.training = np.array([True, False])
    with pytest.raises(TypeError, match="training must be a bool"):
        layer(x)


def test_exact_mode_bytes_are_the_documented_ones():
    C, shape = 5, (8, 5, 16, 16)  # a chunk per sample
    x = make_input(shape, "NCHW", np.float32, seed=1)
    comms = make_comms(2)

    def fn(r, comm):
        layer = bn_simd.SyncBatchNorm(C, comm=comm)
        layer(x[:3] if r == 0 else x[3:])
        layer.backward(x[:3] if r == 0 else x[3:])

    run_ok(2, fn, comms)
    for comm, K in zip(comms, (3, 5)):
        assert comm.calls == [("allgather", 3 + K * (3 * C + 1)), ("allgather", 4 + 2 * K * C)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_mode_keeps_the_variance_of_a_far_mean(dtype):
    """|mean| / std = 1e6: the first call (shift 0) repeats the exchange relative to the mean; the next, shifted by
    the previous mean, needs one."""
    C = 3
    x = make_input((8, C, 64), "NCHW", dtype, seed=1, loc=1e6, scale=1.0)
    comms = make_comms(2)

    def fn(r, comm):
        layer = bn_simd.SyncBatchNorm(C, comm=comm, mode="fast", dtype=np.float64)
        layer(x[4 * r:4 * r + 4])
        first = len(comm.calls)
        mean, var, n = bn_simd.sync_batch_stats(x[4 * r:4 * r + 4], comm, mode="fast")
        layer(x[4 * r:4 * r + 4])
        return layer, first, len(comm.calls) - first, var

    got = run_ok(2, fn, comms)
    mean, var, n = ref.stats(x)
    for layer, first, later, v in got:
        assert first == 3 and later == 3 + 2   # (an allgather, then one allreduce, or two: the second relative)
        np.testing.assert_allclose(v, var, rtol=1e-9)
        rv = ref.update_running(*ref.update_running(np.zeros(C), np.ones(C), mean, var, n, 0.1), mean, var, n, 0.1)[1]
        np.testing.assert_allclose(layer.running_var, rv, rtol=1e-9)


# ---- the functional form ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_functional_steps_give_the_one_process_calls(layout, mode):
    # pieces on chunk boundaries: a sample (16x16 maps), 1024 rows (64 channels last)
    shape, cuts = ((9, 6, 16, 16), [0, 4, 9]) if layout == "NCHW" else ((2500, 64), [0, 1024, 2500])
    assert sync.chunk_rows(shape if layout == "NCHW" else shape, layout) == (1 if layout == "NCHW" else 1024)
    dtype = np.float32
    C = channels(shape, layout)
    x = make_input(shape, layout, dtype, seed=1, loc=-3.0)
    g = make_input(shape, layout, dtype, seed=2)
    w, b = channel_params(C, dtype, seed=3)
    y_ref, _, _ = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    m_ref, v_ref = bn_simd.batch_stats(x, layout=layout)
    gx_ref, gw_ref, gb_ref = bn_simd.batch_norm_backward(g, x, m_ref, 1 / np.sqrt(v_ref + 1e-5), w, layout=layout)

    def fn(r, comm):
        xr, gr = x[cuts[r]:cuts[r + 1]], g[cuts[r]:cuts[r + 1]]
        mean, var, n = bn_simd.sync_batch_stats(xr, comm, layout=layout, mode=mode)
        y, mean2, invstd, n2 = bn_simd.sync_batch_norm_forward(xr, w, b, comm, layout=layout, mode=mode)
        sdy, sdyx, n3 = bn_simd.sync_backward_reduce(gr, xr, mean, comm, layout=layout, mode=mode)
        gx, gw, gb = bn_simd.sync_batch_norm_backward(gr, xr, mean, invstd, w, comm, layout=layout, mode=mode)
        assert n == n2 == n3 == x.size // C and same_bits(mean, mean2)
        return mean, var, y, sdy, gx, gw, gb

    got = run_ok(2, fn)
    y = np.concatenate([r[2] for r in got])
    gx = np.concatenate([r[4] for r in got])
    sdy_ref = bn_simd.backward_reduce(g, x, m_ref, layout=layout)[0]
    if mode == "exact":
        assert same_bits(got[0][0], m_ref) and same_bits(got[0][1], v_ref)
        assert same_bits(y, y_ref) and same_bits(gx, gx_ref) and same_bits(got[0][3], sdy_ref)
        assert same_bits(got[1][5], gw_ref) and same_bits(got[1][6], gb_ref)
    else:
        np.testing.assert_allclose(got[0][0], m_ref, rtol=1e-14, atol=1e-14)
        np.testing.assert_allclose(got[0][1], v_ref, rtol=1e-13)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1][5], gw_ref, rtol=1e-5, atol=1e-4)


def test_one_rank_functional_is_the_plain_calls():
    x = make_input((5, 3, 4, 4), "NCHW", np.float64, seed=1)
    [(mean, var, n)] = run_ok(1, lambda r, comm: bn_simd.sync_batch_stats(x, comm))
    m_ref, v_ref = bn_simd.batch_stats(x)
    assert same_bits(mean, m_ref) and same_bits(var, v_ref) and n == 5 * 16


# ---- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_a_refused_input_raises_on_every_rank_and_changes_nothing(mode):
    x = make_input((4, 3, 8), "NCHW", np.float32, seed=1)

    def forward(r, comm):
        layer = bn_simd.SyncBatchNorm(3, comm=comm, mode=mode)
        try:
            layer(x if r != 1 else x[:, :2])
        finally:
            assert layer.num_batches_tracked == 0 and not layer.running_mean.any() and (layer.running_var == 1).all()
            assert layer._saved is None

    _, errors = run_ranks(3, forward)
    assert isinstance(errors[1], ValueError) and "channels" in str(errors[1])
    for e in (errors[0], errors[2]):
        assert isinstance(e, RuntimeError) and "refused" in str(e)

    def backward(r, comm):
        layer = bn_simd.SyncBatchNorm(3, comm=comm, mode=mode)
        layer(x)
        layer.backward(x if r != 0 else x.astype(np.float64))

    _, errors = run_ranks(2, backward)
    assert isinstance(errors[0], TypeError) and "dtype" in str(errors[0])
    assert isinstance(errors[1], RuntimeError)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mode"):
        bn_simd.SyncBatchNorm(3, mode="quick")
    layer = bn_simd.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="mode"):
        layer.mode = "slow"
    assert layer.mode == "exact"
    with pytest.raises(TypeError, match="comm must be"):
        bn_simd.SyncBatchNorm(3, comm=object())
    with pytest.raises(TypeError, match="comm must be"):
        bn_simd.sync_batch_stats(np.ones((2, 3)), comm=42)
    with pytest.raises(ValueError, match="mode"):
        bn_simd.sync_batch_stats(np.ones((2, 3)), comm=make_comms(1)[0], mode="approx")
    with pytest.raises(ValueError, match="shift"):
        bn_simd.sync_batch_stats(np.ones((2, 3)), comm=make_comms(1)[0], mode="fast", shift=np.zeros(2))
    with pytest.raises(ValueError, match="different channel counts"):
        run_ok(2, lambda r, comm: bn_simd.sync_batch_stats(np.ones((2, 3 + r)), comm))


def test_comm_none_needs_an_initialised_library(monkeypatch):
    monkeypatch.setattr(sync, "_mpi_world", lambda: None)
    monkeypatch.setattr(sync, "_torch_world", lambda: None)
    with pytest.raises(RuntimeError, match="MPI .* torch.distributed"):
        bn_simd.SyncBatchNorm(3)(np.ones((2, 3), np.float32))
    comm = make_comms(1)[0]
    monkeypatch.setattr(sync, "_torch_world", lambda: comm)
    assert sync.as_communicator(None) is comm


# ---- convert_sync_batchnorm ---------------------------------------------------------------------------------------

def test_convert_sync_batchnorm_swaps_batchnorms_only_and_keeps_their_state():
    """PyTorch's test_convert_sync_batchnorm: BatchNorm1d becomes SyncBatchNorm, InstanceNorm1d stays, the state
    dicts are equal."""
    bn, inorm = bn_simd.BatchNorm1d(100), bn_simd.InstanceNorm1d(100)
    bn.running_mean[:] = np.arange(100)
    bn.num_batches_tracked = 7
    bn.eval()
    comp = [bn_simd.BatchNorm1d(100), bn_simd.InstanceNorm1d(100)]
    for a, b in zip(comp, (bn, inorm)):
        a.load_state_dict(b.state_dict())
    converted = bn_simd.SyncBatchNorm.convert_sync_batchnorm([bn, inorm])
    assert type(converted) is list
    assert type(converted[0]) is bn_simd.SyncBatchNorm and converted[1] is inorm
    for a, b in zip(comp, converted):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k])
    s = converted[0]
    assert s.weight is bn.weight and s.running_var is bn.running_var and not s.training
    assert (s.eps, s.momentum, s.layout, s.dtype) == (bn.eps, bn.momentum, bn.layout, bn.dtype)


def test_convert_sync_batchnorm_containers():
    comm = make_comms(1)[0]
    nested = {"a": bn_simd.BatchNorm2d(4, layout="NHWC", dtype=np.float64, momentum=None, affine=False),
              "b": (bn_simd.GroupNorm(2, 4), [bn_simd.BatchNorm3d(2)]), "c": "text"}
    out = bn_simd.SyncBatchNorm.convert_sync_batchnorm(nested, comm, mode="fast")
    a = out["a"]
    assert isinstance(a, bn_simd.SyncBatchNorm) and a.comm is comm and a.mode == "fast"
    assert (a.layout, a.dtype, a.momentum, a.affine, a.weight) == ("NHWC", np.float64, None, False, None)
    assert out["b"][0] is nested["b"][0] and type(out["b"]) is tuple
    assert isinstance(out["b"][1][0], bn_simd.SyncBatchNorm) and out["c"] == "text"
    layer = bn_simd.BatchNorm(3)
    assert bn_simd.SyncBatchNorm.convert_sync_batchnorm(layer).weight is layer.weight
    s = bn_simd.SyncBatchNorm(3)
    assert bn_simd.SyncBatchNorm.convert_sync_batchnorm(s) is s
    assert bn_simd.SyncBatchNorm.convert_sync_batchnorm(42) == 42
    with pytest.raises(ValueError, match="mode"):
        bn_simd.SyncBatchNorm.convert_sync_batchnorm(layer, mode="x")


@pytest.mark.parametrize("kwargs", [{"activation": "relu"}, {"axis": 2}], ids=["activation", "axis"])
def test_convert_sync_batchnorm_refuses_what_sync_batch_norm_lacks_and_changes_nothing(kwargs):
    layer = bn_simd.BatchNorm(5, **kwargs)
    with pytest.raises(ValueError, match="activation"):
        bn_simd.SyncBatchNorm.convert_sync_batchnorm([layer])
    assert layer.activation == kwargs.get("activation") and layer.axis == kwargs.get("axis")
    s = bn_simd.SyncBatchNorm(5)
    setattr(s, *next(iter(kwargs.items())))  # (set afterwards: refused at the call)
    x = make_input((4, 5, 3), seed=1)
    with pytest.raises(ValueError, match="activation"):
        run_ok(1, lambda r, comm: (setattr(s, "comm", comm), s(x)))
    assert np.all(s.running_mean == 0) and s.num_batches_tracked == 0
    s.eval()  # (the eval call with running statistics communicates nothing: refused too)
    with pytest.raises(ValueError, match="activation"):
        s(x)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_squares_beyond_double_range_give_an_infinite_variance_in_both_modes(mode):
    x = np.random.default_rng(9).standard_normal((4, 3, 5)) * 1e170
    with np.errstate(all="raise"):  # (no warning either)
        ((_, var, _),) = run_ok(1, lambda r, comm: bn_simd.sync_batch_stats(x, comm, mode=mode)[:3])
    assert np.all(var == np.inf)


def test_a_sync_layer_without_bias_has_no_bias_gradient():
    x = make_input((4, 3, 5), seed=2)
    g = make_input((4, 3, 5), seed=3)
    plain = bn_simd.BatchNorm1d(3, bias=False)
    plain(x)
    gx = plain.backward(g)

    def fn(r, comm):
        s = bn_simd.SyncBatchNorm.convert_sync_batchnorm(bn_simd.BatchNorm1d(3, bias=False), comm)
        s(x)
        return s.backward(g), s.grad_weight, s.grad_bias

    ((sgx, sgw, sgb),) = run_ok(1, fn)
    assert sgb is None and plain.grad_bias is None
    np.testing.assert_allclose(sgw, plain.grad_weight, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sgx, gx, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_repr():
    layer = bn_simd.SyncBatchNorm(3, mode="fast")
    layer.running_mean[:] = [1, 2, 3]
    other = bn_simd.SyncBatchNorm(3)
    other.load_state_dict(layer.state_dict())
    np.testing.assert_array_equal(other.running_mean, [1, 2, 3])
    assert "SyncBatchNorm(3" in repr(layer) and "mode='fast'" in repr(layer)


def test_ranks_together_match_pytorchs_batchnorm_on_the_whole_batch():
    """What PyTorch's SyncBatchNorm promises (and refuses to do on CPU): torch.nn.BatchNorm2d on the concatenated
    batch, float64, values, gradients and running statistics."""
    torch = pytest.importorskip("torch")
    shape = (7, 4, 5, 6)
    x = make_input(shape, "NCHW", np.float64, seed=1, loc=2.0)
    g = make_input(shape, "NCHW", np.float64, seed=2)
    w, b = channel_params(4, np.float64, seed=3)
    tbn = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(w))
        tbn.bias.copy_(torch.from_numpy(b))
    tx = torch.from_numpy(x.copy()).requires_grad_()
    ty = tbn(tx)
    ty.backward(torch.from_numpy(g))
    for mode in ("exact", "fast"):
        got = run_layers(2, [x], g, "NCHW", np.float64, [0, 3, 7], mode)
        np.testing.assert_allclose(np.concatenate([r[1] for r in got]), ty.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.concatenate([r[2] for r in got]), tx.grad.numpy(), rtol=1e-11, atol=1e-11)
        for layer, _, _ in got:
            np.testing.assert_allclose(layer.grad_weight, tbn.weight.grad.numpy(), rtol=1e-11, atol=1e-11)
            np.testing.assert_allclose(layer.grad_bias, tbn.bias.grad.numpy(), rtol=1e-11, atol=1e-11)
            np.testing.assert_allclose(layer.running_mean, tbn.running_mean.numpy(), rtol=1e-13)
            np.testing.assert_allclose(layer.running_var, tbn.running_var.numpy(), rtol=1e-13)
            assert layer.num_batches_tracked == int(tbn.num_batches_tracked)


def test_eval_uses_the_statistics_held_after_tracking_is_switched_off():
    """BatchNorm's (PyTorch's) rule: eval normalises with the running statistics the layer holds; no exchange."""
    class Refuses:
        def allreduce(self, buf):
            raise AssertionError("communicated")
        allgather = allreduce

    layer = bn_simd.SyncBatchNorm(3, comm=Refuses())
    layer.running_mean[:] = [1, 2, 3]
    layer.track_running_stats = False
    layer.eval()
    x = make_input((4, 3, 5), "NCHW", np.float32, seed=1)
    np.testing.assert_allclose(layer(x), ref.inference(x, [1, 2, 3], [1, 1, 1]), rtol=1e-6, atol=1e-6)


def test_virtual_batches_and_renormalization_are_refused():
    if "virtual_batch_size" not in bn_simd.BatchNorm.__init__.__code__.co_varnames:
        pytest.skip("this BatchNorm has no virtual batches")
    with pytest.raises(ValueError, match="virtual batches or renormalization"):
        bn_simd.SyncBatchNorm.convert_sync_batchnorm([bn_simd.BatchNorm2d(4, virtual_batch_size=2)])
    layer = bn_simd.SyncBatchNorm(4, comm=make_comms(1)[0])
    layer.virtual_batch_size = 2
    with pytest.raises(ValueError, match="virtual batches or renormalization"):
        layer(np.ones((4, 4, 3), np.float32))
    assert layer.num_batches_tracked == 0


def test_an_out_over_a_running_statistic_is_refused_on_every_rank():
    """The statistics move after out is written: an out over running_mean is refused by that rank's checks before
    the exchange, and the other ranks raise too (no rank waits); nothing changes."""
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=99)
    bufs = [np.zeros(2 * 75, np.float32) for _ in range(2)]

    def rank(r, comm):
        layer = bn_simd.SyncBatchNorm(3, comm=comm)
        if r == 0:
            layer.running_mean = bufs[0][:3]
        return layer(x[2 * r:2 * r + 2], out=bufs[r].reshape(2, 3, 5, 5))

    _, errors = run_ranks(2, rank)
    assert isinstance(errors[0], ValueError) and "out must not share memory with running_mean" in str(errors[0])
    assert isinstance(errors[1], Exception)
    assert not bufs[0].any()


@pytest.mark.parametrize("attr", ["activation", "axis"])
def test_a_rank_with_an_attribute_syncbatchnorm_lacks_is_refused_and_the_others_raise(attr):
    """activation or axis set on one rank's layer: that rank refuses with its ValueError inside the exchange's
    protocol, the others raise RuntimeError (that rank left before the exchange, and the others waited forever)."""
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=101)

    def rank(r, comm):
        layer = bn_simd.SyncBatchNorm(3, comm=comm)
        if r == 0:
            setattr(layer, attr, "relu" if attr == "activation" else 1)
        return layer(x[2 * r:2 * r + 2])

    _, errors = run_ranks(2, rank)
    assert isinstance(errors[0], ValueError) and "SyncBatchNorm has no fused activation" in str(errors[0])
    assert isinstance(errors[1], RuntimeError) and "refused" in str(errors[1])


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("case", ["functional", "layer", "rank 1"])
def test_another_channel_count_raises_on_every_rank_in_both_modes(case, mode):
    """fast mode's allreduce length is 2 C + 1: another channel count (or a refused 1-d input) on one rank is found
    by its allgather of three values first, and raised on every rank, instead of aborting the job."""
    x = make_input((4, 3, 8), "NCHW", np.float32, seed=2)
    x4 = make_input((4, 4, 8), "NCHW", np.float32, seed=3)

    def fn(r, comm):
        if case == "functional":
            return bn_simd.sync_batch_stats(x if r == 0 else x4, comm, mode=mode)
        if case == "layer":
            return bn_simd.SyncBatchNorm(3 + r, comm=comm, mode=mode)(x if r == 0 else x4)
        return bn_simd.sync_batch_stats(x if r == 0 else x[0, 0], comm, mode=mode)

    _, errors = run_ranks(2, fn)
    if case == "rank 1":
        assert isinstance(errors[1], ValueError) and "dimensions" in str(errors[1])
        assert isinstance(errors[0], RuntimeError) and "refused" in str(errors[0])
    else:
        for e in errors:
            assert isinstance(e, ValueError) and "different channel counts [3, 4]" in str(e)


class _Unreadable:
    """An array-like whose conversion raises something other than TypeError/ValueError."""

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("cannot read this")


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_any_exception_of_a_ranks_own_checks_takes_part_in_the_exchange(mode):
    x = make_input((4, 3, 8), "NCHW", np.float32, seed=4)

    def fn(r, comm):
        return bn_simd.sync_batch_norm_forward(x if r == 0 else _Unreadable(), None, None, comm, mode=mode)

    _, errors = run_ranks(2, fn)
    assert isinstance(errors[1], RuntimeError) and "cannot read this" in str(errors[1])
    assert isinstance(errors[0], RuntimeError) and "refused" in str(errors[0])


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_functional_arguments_are_checked_before_the_exchange(mode):
    """A weight, bias, eps or out refused on one rank is raised there and RuntimeError on the others, forward and
    backward: none of them leaves the exchange a step ahead."""
    C = 3
    x = make_input((4, C, 8), "NCHW", np.float32, seed=5)
    bad_forward = [dict(weight=np.ones(C + 1)), dict(bias=np.ones((C, 1))), dict(eps=-1.0),
                   dict(out=np.empty((4, C, 7), np.float32))]
    for kw in bad_forward:
        def fwd(r, comm):
            return bn_simd.sync_batch_norm_forward(x, comm=comm, mode=mode, **(kw if r == 1 else {}))

        _, errors = run_ranks(2, fwd)
        assert isinstance(errors[1], (ValueError, TypeError)), kw
        assert isinstance(errors[0], RuntimeError) and "refused" in str(errors[0]), kw
    y, mean, invstd, n = run_ok(1, lambda r, comm: bn_simd.sync_batch_norm_forward(x, comm=comm, mode=mode))[0]
    for kw in [dict(weight=np.ones(C + 1)), dict(invstd=np.ones(C + 1)), dict(out=np.empty((4, C, 9), np.float32))]:
        def bwd(r, comm):
            args = dict(weight=None, invstd=invstd)
            args.update(kw if r == 0 else {})
            return bn_simd.sync_batch_norm_backward(x, x, mean, args.pop("invstd"), comm=comm, mode=mode, **args)

        _, errors = run_ranks(2, bwd)
        assert isinstance(errors[0], (ValueError, TypeError)), kw
        assert isinstance(errors[1], RuntimeError) and "refused" in str(errors[1]), kw


@pytest.mark.parametrize("loc", [30.0, 700.0])
def test_fast_mode_keeps_float64_statistics_to_float64s_rounding(loc):
    """float64 data with mean / std = 30 or 700 and the first call's shift of 0: the exchange is repeated relative to
    the mean (2^4 std from the shift in float64; 2^20 before), so the variance is one process's within the error of
    the ranks' own means' rounding: about eps |mean| / std (documented), here bounded by 4 eps (1 + |mean| / std)."""
    x = make_input((8, 3, 64), "NCHW", np.float64, seed=6, loc=loc, scale=1.0)
    got = run_ok(2, lambda r, comm: bn_simd.sync_batch_stats(x[4 * r:4 * r + 4], comm, mode="fast"))
    mean1, var1 = bn_simd.batch_stats(x)
    eps = np.finfo(np.float64).eps
    for mean, var, n in got:
        assert n == 4 * 64 * 2
        assert np.max(np.abs(var - var1) / var1) <= 4 * eps * (1 + loc)
        assert np.max(np.abs(mean - mean1) / np.abs(mean1)) <= 4 * eps


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_bias_false_is_pytorchs_and_a_none_weight_has_no_gradient(mode):
    """bias=False (PyTorch 2.x's keyword): no bias, no "bias" key, grad_bias None; a weight set to None: no
    grad_weight, as PyTorch gives a None parameter none."""
    x = make_input((6, 3, 8), "NCHW", np.float32, seed=7)

    def fn(r, comm):
        layer = bn_simd.SyncBatchNorm(3, comm=comm, mode=mode, bias=False)
        assert layer.bias is None and "bias" not in layer.state_dict()
        layer(x[3 * r:3 * r + 3])
        layer.backward(x[3 * r:3 * r + 3])
        nobody = bn_simd.SyncBatchNorm(3, comm=comm, mode=mode)
        nobody.weight = None
        nobody(x[3 * r:3 * r + 3])
        nobody.backward(x[3 * r:3 * r + 3])
        return layer.grad_weight, layer.grad_bias, nobody.grad_weight, nobody.grad_bias

    one = bn_simd.BatchNorm(3, bias=False)
    one(x)
    one.backward(x)
    for gw, gb, ngw, ngb in run_ok(2, fn):
        assert gb is None and ngw is None and ngb is not None
        np.testing.assert_allclose(gw, one.grad_weight, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(mode="Fast"), dict(layout="NCWH")], ids=["mode", "layout"])
@pytest.mark.parametrize("fn", ["sync_batch_stats", "sync_backward_reduce", "sync_batch_norm_forward",
                                "sync_batch_norm_backward"])
def test_a_bad_mode_or_layout_on_one_rank_raises_there_and_runtimeerror_on_the_others(fn, bad):
    """A refused mode or layout takes part in the exchange's first step as a refused input does: ValueError on that
    rank, RuntimeError on the others (in either mode), none left waiting."""
    C = 3
    x = make_input((4, C, 8), "NCHW", np.float32, seed=5)
    mean, invstd = np.zeros(C), np.ones(C)
    for good_mode in ("exact", "fast"):
        def call(r, comm):
            kw = dict(mode=good_mode)
            kw.update(bad if r == 1 else {})
            f = getattr(bn_simd, fn)
            if fn == "sync_batch_stats":
                return f(x, comm, **kw)
            if fn == "sync_backward_reduce":
                return f(x, x, mean, comm, **kw)
            if fn == "sync_batch_norm_forward":
                return f(x, comm=comm, **kw)
            return f(x, x, mean, invstd, comm=comm, **kw)

        _, errors = run_ranks(2, call)
        assert isinstance(errors[1], ValueError) and next(iter(bad)) in str(errors[1]), (good_mode, errors)
        assert isinstance(errors[0], RuntimeError) and "refused" in str(errors[0]), (good_mode, errors)


@pytest.mark.parametrize("loc, scale", [(1e160, 1e150), (1e200, 1.0)])
def test_fast_mode_with_a_mean_whose_squares_overflow_from_the_shift_repeats_the_exchange(loc, scale):
    """float64 data whose mean is so far from the shift (0 at first) that n (mean - 0)^2 overflows: the exchange is
    repeated relative to the mean, so the variance is finite, as one process's (it was +Inf, and the running variance
    stayed so)."""
    x = make_input((8, 2, 16), "NCHW", np.float64, seed=12, loc=loc, scale=scale)
    mean1, var1 = bn_simd.batch_stats(x)
    assert np.all(np.isfinite(var1))
    for mean, var, n in run_ok(2, lambda r, comm: bn_simd.sync_batch_stats(x[4 * r:4 * r + 4], comm, mode="fast")):
        assert np.all(np.isfinite(var)) and np.allclose(mean, mean1, rtol=1e-15)
        # (the ranks' own means, rounded to half an ulp of |mean|, enter the variance: about eps |mean| / std of it,
        # documented; data of N(0, 1) + 1e200 is 1e200 exactly: variance 0)
        zero = var1 == 0
        assert np.all(var[zero] == 0)
        rel = np.abs(var[~zero] / var1[~zero] - 1)
        assert np.all(rel <= 8 * np.finfo(np.float64).eps * (np.abs(mean1[~zero]) / np.sqrt(var1[~zero]) + 1))


def test_convert_sync_batchnorm_namedtuples_and_a_layer_at_two_places():
    import collections
    Pair = collections.namedtuple("Pair", "first second")
    shared = bn_simd.BatchNorm1d(3, momentum=None)
    out = bn_simd.SyncBatchNorm.convert_sync_batchnorm(Pair(shared, [shared, bn_simd.BatchNorm1d(3)]))
    assert type(out) is Pair and isinstance(out.first, bn_simd.SyncBatchNorm)
    assert out.second[0] is out.first and out.second[1] is not out.first


def test_fast_mode_sums_beyond_double_range_take_the_exact_exchange():
    """Fast mode's sums relative to the shift overflowed for a float64 channel of constant 1e305 (S1 = n·1e305):
    mean Inf and variance NaN, which a layer's running mean then kept. Every rank now sees the infinite sum and takes
    the exact exchange; a non-finite shift is refused."""
    x = np.full((2000, 2), 1e305)
    x[:, 1] = np.linspace(-1.0, 1.0, 2000)

    def fn(r, comm):
        return bn_simd.sync_batch_stats(x[1000 * r:1000 * (r + 1)], comm, mode="fast")
    for mean, var, n in run_ok(2, fn):
        ref_mean, ref_var = bn_simd.batch_stats(x)
        np.testing.assert_array_equal(mean[:1], [1e305])
        np.testing.assert_array_equal(var[:1], [0.0])
        np.testing.assert_allclose(mean, ref_mean, atol=1e-15)
        np.testing.assert_allclose(var, ref_var, rtol=1e-14)
        assert n == 2000
    for bad in (np.inf, np.nan):
        with pytest.raises(ValueError, match="shift must hold finite"):
            bn_simd.sync_batch_stats(np.ones((2, 2)), comm=make_comms(1)[0], mode="fast", shift=np.full(2, bad))


def test_fast_mode_keeps_a_nan_in_its_channel_when_it_exchanges_twice():
    """The second exchange, relative to the first's mean, refused that mean as a shift when a channel's was NaN
    (the check of a caller's shift): the NaN now stays in its channel, as in exact mode."""
    x = np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32)
    x[:, 1] += 1e4
    x[3, 0] = np.nan
    for mode in ("fast", "exact"):
        mean, var, n = bn_simd.sync_batch_stats(x, make_comms(1)[0], mode=mode)
        assert np.isnan(mean[0]) and np.isnan(var[0]) and n == 64
        np.testing.assert_allclose(mean[1], x[:, 1].astype(np.float64).mean(), rtol=1e-12)
