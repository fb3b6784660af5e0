"""Edges of the state a call writes and of the arguments around it: a running statistic that overlaps itself (a
zero-stride view), batch renormalization of zero channels, group norm without parameters on another channel count,
statistics of empty groups, an unbatched residual's message, a leaky slope beyond float32's range, a batch count beyond
int64, a Context pickled or copied; an out that is x but for the stride of an axis of one element."""
import copy
import pickle

import numpy as np
import pytest

import bn_simd

F32 = np.float32


def _x(shape=(4, 6, 3, 5), seed=0, dtype=F32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _zero_stride(C=6, dtype=F32, value=0.0):
    cell = np.full(1, value, dtype)
    return np.lib.stride_tricks.as_strided(cell, (C,), (0,)), cell


def _calls():
    x = _x()
    yield "batch_norm", lambda rm, rv: bn_simd.batch_norm(x, rm, rv, None, None, True, 0.1)
    yield "batch_norm relu", lambda rm, rv: bn_simd.batch_norm(x, rm, rv, None, None, True, 0.1, activation="relu")
    yield "instance_norm", lambda rm, rv: bn_simd.instance_norm(x, rm, rv, use_input_stats=True, momentum=0.1)
    yield "virtual", lambda rm, rv: bn_simd.virtual_batch_norm(x, rm, rv, training=True, virtual_batch_size=2)
    yield "update_running_stats", lambda rm, rv: bn_simd.update_running_stats(rm, rv, np.ones(6), np.ones(6), 10,
                                                                              0.1)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_a_statistic_that_overlaps_itself_is_refused_and_nothing_changes(which):
    for name, call in _calls():
        rm, rv = np.zeros(6, F32), np.ones(6, F32)
        view, cell = _zero_stride(value=0.0 if which == "running_mean" else 1.0)
        args = (view, rv) if which == "running_mean" else (rm, view)
        with pytest.raises(ValueError, match=f"{which} must not overlap itself"):
            call(*args)
        assert cell[0] == (0.0 if which == "running_mean" else 1.0), name
        assert (rm == 0).all() and (rv == 1).all(), name


def test_statistics_that_overlap_themselves_in_renorm_and_layers_are_refused():
    x = _x()
    view, cell = _zero_stride(value=1.0)
    stats = dict(running_std=np.ones(6, F32), renorm_mean=np.zeros(6, F32), renorm_std=view)
    with pytest.raises(ValueError, match="renorm_std must not overlap itself"):
        bn_simd.batch_renorm(x, np.zeros(6, F32), np.ones(6, F32), training=True, **stats)
    assert cell[0] == 1.0
    layer = bn_simd.BatchNorm2d(6)
    layer.running_mean = _zero_stride()[0]
    with pytest.raises(ValueError, match="running_mean must not overlap itself"):
        layer(x)
    assert layer.num_batches_tracked == 0


def test_strided_statistics_that_do_not_overlap_are_updated_in_place():
    x = _x()
    buf_m, buf_v = np.zeros(12, F32), np.ones(18, F32)
    rm, rv = buf_m[::2], buf_v[::-3]
    ref_m, ref_v = np.zeros(6, F32), np.ones(6, F32)
    bn_simd.batch_norm(x, rm, rv, None, None, True, 0.1)
    bn_simd.batch_norm(x, ref_m, ref_v, None, None, True, 0.1)
    assert rm.tobytes() == ref_m.tobytes() and rv.tobytes() == ref_v.tobytes()
    assert (buf_m[1::2] == 0).all()
    # one channel: a zero stride is one element, not an overlap
    one, cell = _zero_stride(C=1)
    bn_simd.batch_norm(_x((4, 1, 3)), one, np.ones(1, F32), None, None, True, 0.5)
    assert cell[0] != 0


def test_batch_renorm_of_zero_channels():
    x = np.zeros((4, 0, 3), F32)
    z = [np.zeros(0, F32) for _ in range(5)]
    y = bn_simd.batch_renorm(x, z[0], z[1], training=True, running_std=z[2], renorm_mean=z[3], renorm_std=z[4])
    assert y.shape == x.shape
    bn_simd.update_renorm_stats(*z, np.zeros(0), np.zeros(0), 12)


def test_out_that_is_x_but_for_the_stride_of_an_axis_of_one_element_is_in_place():
    buf = _x((4, 3, 5))
    want = bn_simd.batch_norm(buf[:, None], None, None, None, None, True)
    x, out = buf[:, None], buf.reshape(4, 1, 3, 5)
    assert bn_simd.batch_norm(x, None, None, None, None, True, out=out) is out
    assert buf.tobytes() == want.tobytes()
    shifted = np.zeros(61, F32)
    with pytest.raises(ValueError, match="out overlaps x partially"):
        bn_simd.batch_norm(shifted[:60].reshape(4, 1, 3, 5), None, None, None, None, True,
                           out=shifted[1:].reshape(4, 1, 3, 5))


def test_group_norm_layer_without_parameters_takes_any_channel_count():
    torch = pytest.importorskip("torch")
    x = _x((2, 6, 5))
    layer = bn_simd.GroupNorm(2, 4, affine=False)
    ref = torch.nn.GroupNorm(2, 4, affine=False)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert layer.backward(np.ones_like(x)).shape == x.shape
    with pytest.raises(ValueError, match="num_groups"):
        layer(_x((2, 5, 5)))
    with pytest.raises(ValueError, match="4 channels"):
        bn_simd.GroupNorm(2, 4)(x)


def test_statistics_of_empty_groups_are_torchs():
    torch = pytest.importorskip("torch")
    x = np.zeros((2, 4, 0), F32)
    _, m, s = bn_simd.group_norm_forward(x, 2)
    _, tm, ts = torch.native_group_norm(torch.from_numpy(x), None, None, 2, 4, 0, 2, 1e-5)
    np.testing.assert_array_equal(m, tm.numpy())
    np.testing.assert_array_equal(s, ts.numpy())


def test_unbatched_instance_norm_residual_is_named_in_the_callers_shapes():
    layer = bn_simd.InstanceNorm2d(4, affine=True, activation="relu")
    x = _x((4, 5, 6))
    with pytest.raises(ValueError, match=r"residual must have the shape of x \(4, 5, 6\), got \(1, 4, 5, 6\)"):
        layer(x, residual=x[None])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_leaky_slope_beyond_float32_is_refused_for_float_data(dtype):
    x = _x(dtype=dtype)
    rm, rv = np.zeros(6, F32), np.ones(6, F32)
    for call in (lambda: bn_simd.batch_norm(x, rm, rv, None, None, True, activation=("leaky_relu", 1e39)),
                 lambda: bn_simd.batch_norm(x, rm, rv, None, None, False, activation=("leaky_relu", -1e39)),
                 lambda: bn_simd.layer_norm(x, 5, activation=("leaky_relu", 1e39)),
                 lambda: bn_simd.group_norm(x, 2, activation=("leaky_relu", 1e39))):
        with pytest.raises(ValueError, match="slope .* beyond float32's range"):
            call()
    assert (rm == 0).all() and (rv == 1).all()
    layer = bn_simd.BatchNorm2d(6, activation=("leaky_relu", 1e39))
    with pytest.raises(ValueError, match="slope"):
        layer(x)
    assert layer.num_batches_tracked == 0 and (layer.running_mean == 0).all()


def test_leaky_slope_beyond_float32_is_taken_for_float64_data():
    x = _x(dtype=np.float64)
    y = bn_simd.batch_norm(x, None, None, None, None, True, activation=("leaky_relu", 1e39))
    _, m, s = bn_simd.batch_norm_forward(x, None, None)
    u = (x - m[None, :, None, None]) * s[None, :, None, None]
    np.testing.assert_allclose(y, np.where(u > 0, u, 1e39 * u), rtol=1e-12)


def test_batch_count_beyond_int64_is_refused():
    layer = bn_simd.BatchNorm1d(3)
    state = layer.state_dict()
    layer.num_batches_tracked = 2**63   # (an attribute: checked where it is used)
    for call in (lambda: layer(_x((4, 3))), layer.state_dict):
        with pytest.raises(ValueError, match="2\\*\\*63 - 1"):
            call()
    assert (layer.running_mean == 0).all()
    layer.num_batches_tracked = 0
    state["num_batches_tracked"] = np.uint64(2**63 + 5)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        layer.load_state_dict(state)
    assert layer.num_batches_tracked == 0
    layer.num_batches_tracked = 2**63 - 1
    assert layer.state_dict()["num_batches_tracked"] == 2**63 - 1


def test_load_state_dict_names_the_layer_for_a_wrong_length():
    layer = bn_simd.BatchNorm1d(4)
    state = layer.state_dict()
    state["weight"] = np.ones(3, F32)
    with pytest.raises(ValueError, match="4 channels of the layer"):
        layer.load_state_dict(state)


def test_context_pickles_and_copies_with_its_settings():
    ctx = bn_simd.Context(isa="scalar", num_threads=1, slab_bytes=1 << 20)
    for other in (pickle.loads(pickle.dumps(ctx)), copy.copy(ctx), copy.deepcopy(ctx)):
        assert repr(other) == repr(ctx) and other._handle is not ctx._handle
        x = _x()
        with ctx:
            a = bn_simd.batch_norm(x, None, None, None, None, True)
            isa_a = bn_simd.get_isa()
        with other:
            b = bn_simd.batch_norm(x, None, None, None, None, True)
            isa_b = bn_simd.get_isa()
        assert a.tobytes() == b.tobytes() and isa_a == isa_b == "scalar"
