"""The out= argument: in place, separate buffers, aliasing of backward, and rejected buffers that change nothing.

Every entry point with out= of every registered op (ops.py) is run separate and in place over each input it may
overwrite, with each bad out and with an out partially overlapping each of its data inputs."""
import numpy as np
import pytest

import bn_simd
import ops
from conftest import DTYPES, LAYOUTS, assert_refused, assert_same_bits, channel_params, make_input

SHAPE = (4, 6, 5, 5)


def _data(dtype=np.float32, layout="NCHW"):
    x = make_input(SHAPE, layout, dtype, seed=90, loc=1.0, scale=2.0)
    dy = make_input(SHAPE, layout, dtype, seed=91)
    w, b = channel_params(6, dtype, seed=92)
    return x, dy, w, b


OUT_ENTRIES = [(op, ep) for op in ops.OPS for ep in op.entry_points if ep.out is not None]
NCHW_ENTRIES = [(op, ep) for op, ep in OUT_ENTRIES if op.supports(SHAPE, "NCHW", np.float32) and ep.checked]
OUT_CASES = [pytest.param(op, ep, alias, layout, dtype,
                          id=f"{op.name}-{ep.name}-{alias}-{layout}-{np.dtype(dtype).name}")
             for op, ep in OUT_ENTRIES for alias in ("separate",) + ep.out for layout in LAYOUTS for dtype in DTYPES
             if op.supports(SHAPE, layout, dtype)]


@pytest.mark.parametrize("op,ep,alias,layout,dtype", OUT_CASES)
def test_out_separate_or_in_place_gives_the_bytes_of_a_call_without_out(op, ep, alias, layout, dtype):
    """Every entry point with out=: a separate array, or each input it may overwrite (in place), receives the first
    output, which is returned as the out itself; every output (running statistics included) has the bytes of the
    call without out."""
    case = op.case(90, SHAPE, layout, dtype, loc=1.0, scale=2.0, stats_dtype=np.float64)
    expected = ep(case.fresh())
    first = ep.outputs[0].name
    c = case.fresh()
    if alias == "separate":
        out = np.full_like(case["x"], np.nan)
    else:
        c = c.replace(**{alias: case[alias].copy()})
        out = c[alias]
    got = ep(c, out=out)
    assert got[first] is out
    for k, v in expected.items():
        assert_same_bits(got[k], v, k)


def test_out_may_be_a_view_of_all_of_x():
    x, _, w, b = _data()
    expected = bn_simd.batch_norm(x, None, None, w, b, training=True)
    xi = x.copy()
    view = xi.view()
    assert bn_simd.batch_norm(xi, None, None, w, b, training=True, out=view) is view
    np.testing.assert_array_equal(xi, expected)


# ---- rejected buffers ----------------------------------------------------------------------------------------

def _read_only(a):
    a.setflags(write=False)
    return a


BAD_OUTS = {
    "wrong_shape": (lambda x: np.zeros(x.shape[:-1] + (x.shape[-1] - 1,), x.dtype), ValueError, "out must have shape"),
    "wrong_rank": (lambda x: np.zeros(x.size, x.dtype), ValueError, "out must have shape"),
    "wrong_dtype": (lambda x: np.zeros(x.shape, np.float64 if x.dtype == np.float32 else np.float32), TypeError,
                    "out must have dtype"),
    "byteswapped": (lambda x: np.zeros(x.shape, x.dtype.newbyteorder("S")), TypeError,
                    "out must be in the machine's byte order"),
    "fortran": (lambda x: np.zeros(x.shape, x.dtype, order="F"), ValueError, "C-contiguous"),
    "strided": (lambda x: np.zeros(x.shape[:1] + (2 * x.shape[1],) + x.shape[2:], x.dtype)[:, ::2], ValueError,
                "C-contiguous"),
    "read_only": (lambda x: _read_only(np.zeros_like(x)), ValueError, "writeable"),
    "list": (lambda x: np.zeros_like(x).tolist(), TypeError, "numpy.ndarray"),
}


BAD_OUT_CASES = [pytest.param(op, ep, kind, id=f"{op.name}-{ep.name}-{kind}") for op, ep in NCHW_ENTRIES
                 for kind in BAD_OUTS]


@pytest.mark.parametrize("op,ep,kind", BAD_OUT_CASES)
def test_every_entry_point_rejects_a_bad_out_and_changes_nothing(op, ep, kind):
    """A bad out is refused, naming out, before anything is written: the out, the inputs and the state (running
    statistics) are byte for byte as they were."""
    make_out, exc, match = BAD_OUTS[kind]
    case = op.case(92, SHAPE, "NCHW", np.float32, loc=1.0, scale=2.0, stats_dtype=np.float64)
    out = make_out(case["x"])
    out0 = np.array(out, copy=True)
    assert_refused(ep, case, exc, [r"\bout\b", match], out=out)
    np.testing.assert_array_equal(np.asarray(out), out0)  # a list out too


OVERLAP_CASES = [pytest.param(op, ep, arg, id=f"{op.name}-{ep.name}-{arg}") for op, ep in NCHW_ENTRIES
                 for arg in ep.reads if op.args[arg] == ops.DATA]


@pytest.mark.parametrize("op,ep,arg", OVERLAP_CASES)
def test_every_entry_point_rejects_an_out_that_partially_overlaps_an_input(op, ep, arg):
    """out and a data input cut from one buffer one element apart: refused, naming both, with nothing written."""
    case = op.case(93, SHAPE, "NCHW", np.float32, loc=1.0, scale=2.0)
    a = case[arg]
    buf = np.empty(a.size + 1, a.dtype)
    buf[:-1] = a.reshape(-1)
    view, out = buf[:-1].reshape(a.shape), buf[1:].reshape(a.shape)
    assert_refused(ep, case.replace(**{arg: view}), ValueError, [rf"out overlaps {arg} partially"], out=out,
                   keep={"buf": buf})


def _overlapping(buf):
    """x and an out that share memory without being the same array."""
    return buf[:4], buf[1:]


@pytest.mark.parametrize("training", [True, False])
def test_out_partially_overlapping_x_is_rejected(training):
    buf = make_input((5, 6, 5, 5), "NCHW", np.float32, seed=93)
    before = buf.copy()
    x, out = _overlapping(buf)
    rm, rv = np.zeros(6), np.ones(6)
    with pytest.raises(ValueError, match="overlaps x partially"):
        bn_simd.batch_norm(x, rm, rv, training=training, out=out)
    np.testing.assert_array_equal(buf, before)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)


def test_out_starting_where_x_starts_with_other_strides_is_rejected():
    # same first byte, different strides: the layouts of x and out disagree element for element
    buf = make_input((6, 6, 5, 5), "NCHW", np.float32, seed=94)
    before = buf.copy()
    x = buf[:3]
    out = buf.reshape(3, 2, 6, 5, 5)[:, 0]  # rows 0, 2, 4 of buf: starts where x does, strides differ
    assert out.shape == x.shape and not out.flags.c_contiguous
    with pytest.raises(ValueError):
        bn_simd.batch_norm(x, training=True, out=out)
    np.testing.assert_array_equal(buf, before)


@pytest.mark.parametrize("which", ["x", "grad_out"])
def test_backward_out_partially_overlapping_an_input_is_rejected(which):
    buf = make_input((5, 6, 5, 5), "NCHW", np.float32, seed=95)
    other = make_input((4, 6, 5, 5), "NCHW", np.float32, seed=96)
    before = buf.copy()
    a, out = _overlapping(buf)
    x, dy = (a, other) if which == "x" else (other, a)
    with pytest.raises(ValueError, match=f"overlaps {which} partially"):
        bn_simd.batch_norm_backward(dy, x, np.zeros(6), np.ones(6), out=out)
    np.testing.assert_array_equal(buf, before)


def test_layer_rejects_bad_out_and_keeps_its_state():
    layer = bn_simd.BatchNorm2d(6)
    x, _, _, _ = _data()
    with pytest.raises(ValueError):
        layer(x, out=np.zeros((4, 6, 5, 4), np.float32))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, 0.0)
    np.testing.assert_array_equal(layer.running_var, 1.0)
    with pytest.raises(RuntimeError):
        layer.backward(x)  # the failed call saved nothing for backward


def _stats_in(buf_len, C, dtype=np.float32):
    """A buffer of buf_len values, its first C the running mean (zeros), and a separate running variance (ones)."""
    buf = np.zeros(buf_len, dtype)
    return buf, buf[:C], np.ones(C, dtype)


STAT_CALLS = {
    "batch_norm": lambda x, rm, rv, out: bn_simd.batch_norm(x, rm, rv, training=True, out=out),
    "batch_norm NHWC": lambda x, rm, rv, out: bn_simd.batch_norm(x, rm, rv, training=True, out=out, layout="NHWC"),
    "batch_norm relu": lambda x, rm, rv, out: bn_simd.batch_norm(x, rm, rv, training=True, out=out,
                                                                 activation="relu"),
    "batch_norm mask": lambda x, rm, rv, out: bn_simd.batch_norm(x, rm, rv, training=True, out=out,
                                                                 mask=np.ones((4, 5, 5), bool)),
    "instance_norm": lambda x, rm, rv, out: bn_simd.instance_norm(x, rm, rv, out=out),
    "virtual_batch_norm": lambda x, rm, rv, out: bn_simd.virtual_batch_norm(x, rm, rv, training=True, out=out,
                                                                            virtual_batch_size=2),
}


@pytest.mark.parametrize("call", list(STAT_CALLS))
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_training_out_sharing_memory_with_a_running_statistic_is_refused(call, which):
    """A training call writes out before it moves the running statistics: an out over either of them would feed the
    update its own output (y and the statistics both wrong, silently). Refused naming both; nothing changes."""
    x = make_input((4, 3, 5, 5), "NHWC" if "NHWC" in call else "NCHW", np.float32, seed=97)
    buf = np.zeros(x.size, np.float32)
    other = np.full(3, 1.0 if which == "running_mean" else 0.0, np.float32)
    stat = buf[5:8]
    stat[:] = 1.0 if which == "running_var" else 0.0
    rm, rv = (stat, other) if which == "running_mean" else (other, stat)
    before = buf.copy(), other.copy()
    with pytest.raises(ValueError, match=f"out must not share memory with {which}"):
        STAT_CALLS[call](x, rm, rv, buf.reshape(x.shape))
    np.testing.assert_array_equal(buf, before[0])
    np.testing.assert_array_equal(other, before[1])
    # eval reads the statistics before it writes: the same out is fine there
    lay = "NHWC" if "NHWC" in call else "NCHW"
    y = bn_simd.batch_norm(x, rm.copy(), rv.copy(), training=False, layout=lay)
    np.testing.assert_array_equal(bn_simd.batch_norm(x, rm, rv, training=False, out=buf.reshape(x.shape), layout=lay),
                                  y)


@pytest.mark.parametrize("call", list(STAT_CALLS) + ["update_running_stats"])
@pytest.mark.parametrize("overlap", ["same array", "offset views"])
def test_running_statistics_sharing_memory_with_each_other_are_refused(call, overlap):
    """A training call moves both running statistics: written over each other, each takes the other's values
    (silently wrong). Refused naming both, before anything is written; eval, which only reads them, takes them."""
    x = make_input((4, 3, 5, 5), "NHWC" if "NHWC" in call else "NCHW", np.float32, seed=101)
    buf = np.zeros(4, np.float32)
    rm, rv = (buf[:3], buf[:3]) if overlap == "same array" else (buf[:3], buf[1:])
    out = np.zeros_like(x)
    with pytest.raises(ValueError, match="running_var must not share memory with running_mean"):
        if call == "update_running_stats":
            bn_simd.update_running_stats(rm, rv, np.ones(3), np.ones(3), 10, 0.1)
        else:
            STAT_CALLS[call](x, rm, rv, out)
    assert not buf.any() and not out.any()
    lay = "NHWC" if "NHWC" in call else "NCHW"
    np.testing.assert_array_equal(bn_simd.batch_norm(x, rm, rv, training=False, layout=lay),
                                  bn_simd.batch_norm(x, rm.copy(), rv.copy(), training=False, layout=lay))


def test_statistics_interleaved_in_one_buffer_share_no_byte_and_are_taken():
    """Columns of one (C, 2) buffer: their spans overlap, their bytes do not; a training call updates both rightly."""
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=103)
    buf = np.empty((3, 2), np.float32)
    buf[:, 0], buf[:, 1] = 0.0, 1.0
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = bn_simd.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(bn_simd.batch_norm(x, buf[:, 0], buf[:, 1], training=True), y)
    np.testing.assert_array_equal(buf[:, 0], rm)
    np.testing.assert_array_equal(buf[:, 1], rv)
    bn_simd.update_running_stats(buf[:, 0], buf[:, 1], np.ones(3), np.ones(3), 10, 0.5)
    bn_simd.update_running_stats(rm, rv, np.ones(3), np.ones(3), 10, 0.5)
    np.testing.assert_array_equal(buf, np.stack([rm, rv], axis=1))


def test_renorm_and_layers_refuse_statistics_over_each_other():
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=102)
    rs = [np.zeros(3, np.float32) for _ in range(5)]
    rs[1][:] = rs[2][:] = rs[4][:] = 1.0
    kw = dict(running_std=rs[2], renorm_mean=rs[3], renorm_std=rs[2])
    with pytest.raises(ValueError, match="renorm_std must not share memory with running_std"):
        bn_simd.batch_renorm(x, rs[0], rs[1], training=True, **kw)
    with pytest.raises(ValueError, match="renorm_std must not share memory with running_std"):
        bn_simd.update_renorm_stats(rs[0], rs[1], rs[2], rs[3], rs[2], np.zeros(3), np.ones(3), 10)
    assert [r.tolist() for r in rs] == [[0.0] * 3, [1.0] * 3, [1.0] * 3, [0.0] * 3, [1.0] * 3]
    for layer in (bn_simd.BatchNorm2d(3), bn_simd.BatchNorm2d(3, activation="relu"),
                  bn_simd.BatchNorm2d(3, virtual_batch_size=2), bn_simd.InstanceNorm2d(3, track_running_stats=True)):
        layer.running_var = layer.running_mean
        with pytest.raises(ValueError, match="running_var must not share memory with running_mean"):
            layer(x)
        assert not layer.running_mean.any() and layer.num_batches_tracked == 0, type(layer).__name__
    from bn_simd.keras import BatchNormalization
    k = BatchNormalization()
    k.build((4, 5, 5, 3))
    k.moving_variance = k.moving_mean
    with pytest.raises(ValueError, match="moving_variance must not share memory with moving_mean"):
        k(x.transpose(0, 2, 3, 1), training=True)
    assert not k.moving_mean.any()


def test_layers_refuse_an_out_over_their_statistics():
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=98)
    for layer in (bn_simd.BatchNorm2d(3), bn_simd.BatchNorm2d(3, virtual_batch_size=2),
                  bn_simd.BatchNorm2d(3, renorm=True), bn_simd.InstanceNorm2d(3, track_running_stats=True)):
        buf = np.zeros(x.size, np.float32)
        layer.running_mean = buf[:3]
        with pytest.raises(ValueError, match="out must not share memory with running_mean"):
            layer(x, out=buf.reshape(x.shape))
        assert not buf.any() and layer.num_batches_tracked == 0, type(layer).__name__
    # renorm's functional form: any of its five moving statistics
    rs = [np.zeros(3, np.float32) for _ in range(5)]
    rs[1][:] = rs[2][:] = rs[4][:] = 1.0
    buf = np.zeros(x.size, np.float32)
    buf[:3] = 1.0
    with pytest.raises(ValueError, match="out must not share memory with running_std"):
        bn_simd.batch_renorm(x, rs[0], rs[1], training=True, running_std=buf[:3], renorm_mean=rs[3],
                             renorm_std=rs[4], out=buf.reshape(x.shape))


def test_a_layer_that_moves_no_statistics_takes_an_out_over_them():
    """track_running_stats switched off after construction: no statistic is updated (renorm's r and d are computed
    before anything is written), so an out over running_mean or renorm_mean is no hazard and is taken (a renorm layer
    refused them, naming an update it would not make); the result is that of a separate out."""
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=100)
    layer = bn_simd.BatchNorm2d(3, renorm=True)
    layer.track_running_stats = False
    want = layer(x)
    for name in ("running_mean", "renorm_mean"):
        before = getattr(layer, name)
        buf = np.zeros(x.size, np.float32)
        buf[:3] = before
        setattr(layer, name, buf[:3])
        y = layer(x, out=buf.reshape(x.shape))
        assert_same_bits(y, want)
        assert layer.num_batches_tracked == 0
        setattr(layer, name, before)


def test_a_bad_out_is_named_the_same_on_every_training_path():
    """The statistics check comes after out's own: a tensor or a memoryview as out gets "out must be a
    numpy.ndarray" on the masked, virtual-batch and renorm paths as on the plain one (the first got PyTorch's
    RuntimeError, the second an overlap message)."""
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=102)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    for bad in (memoryview(rm), [0.0] * x.size):
        for call in (lambda: bn_simd.batch_norm(x, rm, rv, training=True, out=bad),
                     lambda: bn_simd.batch_norm(x, rm, rv, training=True, out=bad, mask=np.ones((4, 5, 5), bool)),
                     lambda: bn_simd.virtual_batch_norm(x, rm, rv, training=True, out=bad, virtual_batch_size=2)):
            with pytest.raises(TypeError, match="out must be a numpy.ndarray"):
                call()
    np.testing.assert_array_equal(rm, 0.0)
