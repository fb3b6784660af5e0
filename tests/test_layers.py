"""BatchNorm layers: modes, running statistics, backward, state dicts."""
import numpy as np
import pytest

import bn_simd
import oracle as ref
from conftest import (DTYPES, LAYOUTS, assert_forward_close, assert_within, backward_bounds, eps_of, forward_bound,
                      layout_shape, make_input)
from fake_comm import make_comms

LAYER_CASES = [(bn_simd.BatchNorm1d, (6, 3)), (bn_simd.BatchNorm1d, (4, 3, 7)), (bn_simd.BatchNorm2d, (4, 3, 5, 5)),
               (bn_simd.BatchNorm3d, (2, 3, 2, 3, 4)), (bn_simd.BatchNorm, (4, 3, 5, 5))]
LAYER_IDS = ["1d-rank2", "1d-rank3", "2d", "3d", "generic"]


def test_new_layer_state_is_like_pytorch():
    layer = bn_simd.BatchNorm2d(4)
    assert layer.training and layer.num_features == 4 and layer.eps == 1e-5 and layer.momentum == 0.1
    assert layer.affine and layer.track_running_stats and layer.layout == "NCHW" and layer.dtype == np.float32
    for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        arr = getattr(layer, name)
        assert arr.shape == (4,) and arr.dtype == np.float32
        np.testing.assert_array_equal(arr, value)
    assert layer.num_batches_tracked == 0
    assert layer.grad_weight is None and layer.grad_bias is None
    assert "BatchNorm2d(4" in repr(layer)


def test_train_and_eval_switch_modes_and_return_the_layer():
    layer = bn_simd.BatchNorm1d(3)
    assert layer.eval() is layer and not layer.training
    assert layer.train() is layer and layer.training
    assert layer.train(False) is layer and not layer.training


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cls,nchw_shape", LAYER_CASES, ids=LAYER_IDS)
def test_training_forward_normalises_and_tracks_running_stats(cls, nchw_shape, layout, dtype):
    layer = cls(3, momentum=0.2, layout=layout, dtype=dtype)
    layer.weight[:] = [1.5, -0.5, 2.0]
    layer.bias[:] = [0.0, 1.0, -1.0]
    tracker = ref.RunningStats(3, momentum=0.2)
    for step in range(3):
        x = make_input(nchw_shape, layout, dtype, seed=50 + step, loc=step - 1.0, scale=1.0 + step)
        y = layer(x)
        tracker.update(x, layout)
        assert y.shape == x.shape and y.dtype == dtype
        assert_forward_close(y, x, layer.weight, layer.bias, layout=layout)
    assert layer.num_batches_tracked == 3
    rtol = 8 * eps_of(dtype)
    np.testing.assert_allclose(layer.running_mean, tracker.mean, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(layer.running_var, tracker.var, rtol=rtol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_forward_uses_running_stats_and_changes_no_state(layout):
    layer = bn_simd.BatchNorm1d(3, dtype=np.float64, layout=layout)
    layer.running_mean[:] = [1.0, 2.0, 3.0]
    layer.running_var[:] = [4.0, 5.0, 6.0]
    layer.weight[:] = [1.0, -1.0, 2.0]
    layer.bias[:] = [0.5, 0.0, -0.5]
    layer.eval()
    x = make_input((7, 3), layout, np.float64, seed=51)
    y = layer(x)
    assert_within(y, ref.inference(x, [1, 2, 3], [4, 5, 6], [1, -1, 2], [0.5, 0, -0.5], layout=layout),
                  forward_bound(x, np.float64, 7, [1, -1, 2], [0.5, 0, -0.5], layout=layout, mean=[1, 2, 3],
                                var=[4, 5, 6], batch_stats=False))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, [1, 2, 3])
    np.testing.assert_array_equal(layer.running_var, [4, 5, 6])


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.9, 1.0])
def test_layer_momentum_values(momentum):
    layer = bn_simd.BatchNorm2d(3, momentum=momentum, dtype=np.float64)
    tracker = ref.RunningStats(3, momentum=momentum)
    for step in range(3):
        x = make_input((4, 3, 3, 3), "NCHW", np.float64, seed=52 + step, loc=step)
        layer(x)
        tracker.update(x)
    np.testing.assert_allclose(layer.running_mean, tracker.mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(layer.running_var, tracker.var, rtol=1e-13)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_momentum_none_is_the_cumulative_average(layout):
    layer = bn_simd.BatchNorm2d(3, momentum=None, dtype=np.float64, layout=layout)
    means, variances = [], []
    for step in range(5):
        x = make_input((4, 3, 2, 2), layout, np.float64, seed=60 + step, loc=step, scale=1.0 + 0.5 * step)
        layer(x)
        _, m, v = ref.forward_train(x, layout=layout)
        means.append(m)
        variances.append(v * 16 / 15)
    assert layer.num_batches_tracked == 5
    np.testing.assert_allclose(layer.running_mean, np.mean(means, axis=0), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(layer.running_var, np.mean(variances, axis=0), rtol=1e-13)


def test_momentum_none_continues_from_a_loaded_batch_count():
    layer = bn_simd.BatchNorm1d(2, momentum=None, dtype=np.float64)
    layer.load_state_dict({"weight": np.ones(2), "bias": np.zeros(2), "running_mean": np.array([1.0, 2.0]),
                           "running_var": np.array([3.0, 4.0]), "num_batches_tracked": np.array(3)})
    x = make_input((5, 2), "NCHW", np.float64, seed=61)
    layer(x)
    _, m, v = ref.forward_train(x)
    np.testing.assert_allclose(layer.running_mean, (3 * np.array([1.0, 2.0]) + m) / 4, rtol=1e-14)
    np.testing.assert_allclose(layer.running_var, (3 * np.array([3.0, 4.0]) + v * 5 / 4) / 4, rtol=1e-14)
    assert layer.num_batches_tracked == 4


def test_biased_running_var_on_request():
    layer = bn_simd.BatchNorm2d(3, momentum=1.0, unbiased_running_var=False, dtype=np.float64)
    x = make_input((3, 3, 2, 2), "NCHW", np.float64, seed=62)
    layer(x)
    np.testing.assert_allclose(layer.running_var, ref.forward_train(x)[2], rtol=1e-14)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_track_running_stats_false_uses_batch_stats_in_eval_too(layout):
    layer = bn_simd.BatchNorm2d(3, track_running_stats=False, layout=layout)
    assert layer.running_mean is None and layer.running_var is None and layer.num_batches_tracked is None
    x = make_input((4, 3, 5, 5), layout, np.float32, seed=63, loc=4.0)
    y_train = layer(x)
    assert_forward_close(y_train, x, layout=layout)
    layer.eval()
    y_eval = layer(x)
    np.testing.assert_array_equal(y_eval, y_train)
    assert set(layer.state_dict()) == {"weight", "bias"}
    # eval-mode backward differentiates through the batch statistics as well
    g = make_input((4, 3, 5, 5), layout, np.float32, seed=64)
    gx = layer.backward(g)
    mean, var = bn_simd.batch_stats(x, layout=layout)
    invstd = 1.0 / np.sqrt(var + layer.eps)
    np.testing.assert_array_equal(gx, bn_simd.batch_norm_backward(g, x, mean, invstd, layer.weight, layout=layout)[0])
    assert_within(gx, ref.backward(g, x, mean, invstd, layer.weight, layout)[0],
                  backward_bounds(g, x, mean, invstd, layer.weight, layout, True, np.float32)[0])


def test_affine_false_has_no_parameters_and_no_parameter_grads():
    layer = bn_simd.BatchNorm2d(3, affine=False)
    assert layer.weight is None and layer.bias is None
    assert set(layer.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=65)
    assert_forward_close(layer(x), x)
    gx = layer.backward(np.ones_like(x))
    assert gx.shape == x.shape
    assert layer.grad_weight is None and layer.grad_bias is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cls,nchw_shape", LAYER_CASES, ids=LAYER_IDS)
def test_layer_backward_fills_parameter_grads(cls, nchw_shape, layout, dtype):
    layer = cls(3, dtype=dtype, layout=layout)
    layer.weight[:] = [1.0, 2.0, -0.5]
    x = make_input(nchw_shape, layout, dtype, seed=66, loc=1.0)
    g = make_input(nchw_shape, layout, dtype, seed=67)
    layer(x)
    gx = layer.backward(g)
    # the statistics the layer saved: bitwise those of batch_stats (see test_steps), kept in float64
    mean, var = bn_simd.batch_stats(x, layout=layout)
    invstd = 1.0 / np.sqrt(var + layer.eps)
    gx_ref, gw_ref, gb_ref = ref.backward(g, x, mean, invstd, layer.weight, layout)
    dx_bound, dw_bound, db_bound = backward_bounds(g, x, mean, invstd, layer.weight, layout, True, dtype)
    assert gx.dtype == dtype and layer.grad_weight.dtype == dtype and layer.grad_bias.dtype == dtype
    assert_within(gx, gx_ref, dx_bound, "grad_x")
    assert_within(layer.grad_weight, gw_ref, dw_bound, "grad_weight")
    assert_within(layer.grad_bias, gb_ref, db_bound, "grad_bias")


def test_parameter_grads_are_overwritten_not_accumulated():
    layer = bn_simd.BatchNorm1d(3, dtype=np.float64)
    x = make_input((6, 3), "NCHW", np.float64, seed=68)
    g = make_input((6, 3), "NCHW", np.float64, seed=69)
    layer(x)
    layer.backward(g)
    first = (layer.grad_weight.copy(), layer.grad_bias.copy())
    layer(x)
    layer.backward(g)
    np.testing.assert_array_equal(layer.grad_weight, first[0])
    np.testing.assert_array_equal(layer.grad_bias, first[1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_backward_after_eval_forward_uses_running_stats_as_constants(layout):
    layer = bn_simd.BatchNorm2d(3, dtype=np.float64, layout=layout).eval()
    layer.running_mean[:] = [0.5, -1.0, 0.0]
    layer.running_var[:] = [2.0, 3.0, 4.0]
    layer.weight[:] = [1.0, -2.0, 0.5]
    shape = layout_shape((2, 3, 4, 4), layout)
    x, g = make_input((2, 3, 4, 4), layout, np.float64, seed=70), make_input((2, 3, 4, 4), layout, np.float64, seed=71)
    layer(x)
    gx = layer.backward(g)
    invstd = ref.invstd([2.0, 3.0, 4.0])
    gx_ref, gw_ref, gb_ref = ref.backward(g, x, [0.5, -1.0, 0.0], invstd, [1.0, -2.0, 0.5], layout, training=False)
    assert gx.shape == shape
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(layer.grad_weight, gw_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(layer.grad_bias, gb_ref, rtol=1e-13, atol=1e-13)


def test_backward_before_any_forward_raises():
    with pytest.raises(RuntimeError):
        bn_simd.BatchNorm2d(3).backward(np.ones((2, 3, 2, 2), np.float32))


def test_backward_with_wrong_grad_shape_raises():
    layer = bn_simd.BatchNorm2d(3)
    layer(make_input((2, 3, 4, 4), "NCHW", np.float32, seed=72))
    with pytest.raises(ValueError):
        layer.backward(np.ones((2, 3, 4, 5), np.float32))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layer_backward_after_in_place_forward_is_not_silently_wrong(mode):
    """layer(x, out=x) overwrites the input the layer saved for backward. Backward must then either give the
    gradients of the original input or refuse; silently differentiating at y instead of x is wrong."""
    x = make_input((4, 3, 5, 5), "NCHW", np.float64, seed=73, loc=2.0, scale=3.0)
    g = make_input((4, 3, 5, 5), "NCHW", np.float64, seed=74)
    state = {"weight": np.array([1.0, -2.0, 0.5]), "bias": np.zeros(3), "running_mean": np.array([1.0, 2.0, 3.0]),
             "running_var": np.array([4.0, 5.0, 6.0]), "num_batches_tracked": np.array(1)}
    reference_layer = bn_simd.BatchNorm2d(3, dtype=np.float64).train(mode == "train")
    reference_layer.load_state_dict(state)
    reference_layer(x.copy())
    gx_ref = reference_layer.backward(g)
    layer = bn_simd.BatchNorm2d(3, dtype=np.float64).train(mode == "train")
    layer.load_state_dict(state)
    buf = x.copy()
    try:
        layer(buf, out=buf)
        gx = layer.backward(g)
    except (RuntimeError, ValueError):
        return
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_weight, reference_layer.grad_weight, rtol=1e-12, atol=1e-12)


# ---- empty batches --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch_counts_as_tracked_but_keeps_running_stats(layout, momentum):
    layer = bn_simd.BatchNorm2d(3, momentum=momentum, layout=layout)
    layer.running_mean[:] = [1.0, 2.0, 3.0]
    x = np.zeros(layout_shape((0, 3, 4, 4), layout), np.float32)
    y = layer(x)
    assert y.shape == x.shape
    assert layer.num_batches_tracked == 1
    np.testing.assert_array_equal(layer.running_mean, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(layer.running_var, 1.0)


def test_layer_backward_on_empty_batch_gives_zero_parameter_grads():
    layer = bn_simd.BatchNorm2d(3)
    x = np.zeros((0, 3, 4, 4), np.float32)
    layer(x)
    gx = layer.backward(x)
    assert gx.shape == x.shape
    np.testing.assert_array_equal(layer.grad_bias, 0.0)
    np.testing.assert_array_equal(layer.grad_weight, 0.0)


# ---- dtypes and layouts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_dtype,input_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_input_dtype_may_differ_from_the_layer_dtype(layer_dtype, input_dtype):
    layer = bn_simd.BatchNorm2d(3, dtype=layer_dtype)
    x = make_input((4, 3, 3, 3), "NCHW", input_dtype, seed=75, loc=1.0)
    y = layer(x)
    assert y.dtype == input_dtype
    assert layer.running_mean.dtype == layer_dtype and layer.running_var.dtype == layer_dtype
    assert_forward_close(y, x)
    gx = layer.backward(np.ones_like(x))
    assert gx.dtype == input_dtype and layer.grad_weight.dtype == layer_dtype


@pytest.mark.parametrize("dtype", ["float32", "float64", np.dtype(np.float32)])
def test_dtype_may_be_given_as_a_name_or_a_dtype(dtype):
    assert bn_simd.BatchNorm1d(2, dtype=dtype).running_mean.dtype == np.dtype(dtype)


def test_nhwc_and_nchw_layers_agree_on_the_same_data():
    a = bn_simd.BatchNorm2d(5, dtype=np.float64)
    b = bn_simd.BatchNorm2d(5, dtype=np.float64, layout="channels_last")
    assert b.layout == "NHWC"
    x = make_input((3, 5, 4, 4), "NCHW", np.float64, seed=76)
    ya = a(x)
    yb = b(np.ascontiguousarray(np.moveaxis(x, 1, -1)))
    np.testing.assert_allclose(np.moveaxis(yb, -1, 1), ya, atol=1e-14)
    np.testing.assert_allclose(a.running_mean, b.running_mean, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(a.running_var, b.running_var, rtol=1e-14)


def test_layer_out_parameter_receives_the_output():
    layer = bn_simd.BatchNorm2d(3)
    x = make_input((3, 3, 4, 4), "NCHW", np.float32, seed=77)
    expected = bn_simd.BatchNorm2d(3)(x)
    out = np.empty_like(x)
    assert layer(x, out=out) is out
    np.testing.assert_array_equal(out, expected)


def test_reset_running_stats_and_parameters():
    layer = bn_simd.BatchNorm2d(3)
    layer(make_input((4, 3, 2, 2), "NCHW", np.float32, seed=78, loc=3.0))
    layer.weight[:] = 2.0
    layer.reset_running_stats()
    np.testing.assert_array_equal(layer.running_mean, 0.0)
    np.testing.assert_array_equal(layer.running_var, 1.0)
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.weight, 2.0)
    layer.reset_parameters()
    np.testing.assert_array_equal(layer.weight, 1.0)
    np.testing.assert_array_equal(layer.bias, 0.0)


# ---- state dicts ------------------------------------------------------------------------------------------------

def test_state_dict_keys_values_and_copies():
    layer = bn_simd.BatchNorm2d(4)
    layer(make_input((3, 4, 5, 5), "NCHW", np.float32, seed=79, loc=1.0))
    layer.weight[:] = [1, 2, 3, 4]
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    for k in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(sd[k], getattr(layer, k))
        assert sd[k].dtype == np.float32
    assert sd["num_batches_tracked"].dtype == np.int64 and sd["num_batches_tracked"].shape == ()
    assert int(sd["num_batches_tracked"]) == 1
    sd["weight"][0] = 99.0
    sd["running_mean"][:] = 7.0
    assert layer.weight[0] == 1.0 and not np.any(layer.running_mean == 7.0)


def test_load_state_dict_round_trip():
    a = bn_simd.BatchNorm2d(4)
    for step in range(2):
        a(make_input((3, 4, 5, 5), "NCHW", np.float32, seed=80 + step, loc=step))
    a.weight[:] = [1, 2, 3, 4]
    a.bias[:] = [-1, 0, 1, 2]
    b = bn_simd.BatchNorm2d(4)
    b.load_state_dict(a.state_dict())
    for k in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(b, k), getattr(a, k))
    assert b.num_batches_tracked == 2
    x = make_input((2, 4, 3, 3), "NCHW", np.float32, seed=82)
    np.testing.assert_array_equal(a.eval()(x), b.eval()(x))
    # the loaded arrays are the layer's own
    sd = a.state_dict()
    b.load_state_dict(sd)
    sd["running_var"][:] = 5.0
    assert not np.any(b.running_var == 5.0)


def test_load_state_dict_converts_to_the_layer_dtype():
    layer = bn_simd.BatchNorm1d(2, dtype=np.float32)
    layer.load_state_dict({"weight": np.array([1.5, 2.5]), "bias": np.array([0.5, 0.25], np.float16),
                           "running_mean": [0.0, 1.0], "running_var": np.array([2.0, 3.0]),
                           "num_batches_tracked": np.array(7, np.int32)})
    assert layer.weight.dtype == layer.bias.dtype == layer.running_mean.dtype == np.float32
    np.testing.assert_array_equal(layer.running_var, [2.0, 3.0])
    assert layer.num_batches_tracked == 7


@pytest.mark.parametrize("change", [
    {"weight": np.ones(5)}, {"running_var": np.ones((4, 1))}, {"num_batches_tracked": np.array(1.5)},
    {"num_batches_tracked": np.array(-1)}, {"extra": np.ones(4)}, {"bias": np.array(["a"] * 4)},
    {"running_mean": np.ones(4, np.int64)}, "drop running_var",
], ids=["weight-shape", "running_var-rank", "count-float", "count-negative", "unexpected-key", "bias-strings",
        "running_mean-int", "missing-key"])
def test_load_state_dict_rejects_mismatch_and_changes_nothing(change):
    layer = bn_simd.BatchNorm2d(4)
    layer(make_input((3, 4, 2, 2), "NCHW", np.float32, seed=83, loc=2.0))
    sd = layer.state_dict()
    sd["running_mean"] = np.full(4, 7.0, np.float32)  # a valid change that must not be applied either
    if change == "drop running_var":
        del sd["running_var"]
    else:
        sd.update(change)
    before = layer.state_dict()
    with pytest.raises((ValueError, TypeError)):
        layer.load_state_dict(sd)
    after = layer.state_dict()
    assert set(before) == set(after)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_load_state_dict_non_strict_takes_a_subset():
    layer = bn_simd.BatchNorm2d(3)
    layer.load_state_dict({"running_mean": np.array([1.0, 2.0, 3.0]), "unrelated": 1}, strict=False)
    np.testing.assert_array_equal(layer.running_mean, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(layer.weight, 1.0)
    assert layer.num_batches_tracked == 0


def test_state_dict_of_affine_false_layer_does_not_load_into_affine_layer():
    sd = bn_simd.BatchNorm2d(3, affine=False).state_dict()
    with pytest.raises(ValueError, match="missing"):
        bn_simd.BatchNorm2d(3).load_state_dict(sd)


@pytest.mark.parametrize("training", [True, False])
def test_in_place_forward_keeps_backward_correct(training):
    x = make_input((3, 3, 4, 4), "NCHW", np.float64, seed=62)
    g = make_input((3, 3, 4, 4), "NCHW", np.float64, seed=63)
    ref_layer, layer = bn_simd.BatchNorm2d(3, dtype=np.float64), bn_simd.BatchNorm2d(3, dtype=np.float64)
    ref_layer.train(training)
    layer.train(training)
    ref_layer(x)
    expected = ref_layer.backward(g)
    xi = x.copy()
    layer(xi, out=xi)
    np.testing.assert_array_equal(layer.backward(g), expected)
    np.testing.assert_array_equal(layer.grad_weight, ref_layer.grad_weight)


@pytest.mark.parametrize("make", [lambda: bn_simd.BatchNorm2d(3), lambda: bn_simd.GroupNorm(1, 3),
                                  lambda: bn_simd.InstanceNorm2d(3, affine=True, track_running_stats=True),
                                  lambda: bn_simd.LayerNorm(3), lambda: bn_simd.RMSNorm(3)],
                         ids=["batch", "group", "instance", "layer", "rms"])
def test_load_state_dict_copies_into_the_layers_own_arrays_as_pytorch(make):
    layer = make()
    held = {k: getattr(layer, k) for k in layer.state_dict() if k != "num_batches_tracked"}
    new = {k: np.full_like(v, 5.0) for k, v in held.items()}
    if "num_batches_tracked" in layer.state_dict():
        new["num_batches_tracked"] = np.int64(4)
    layer.load_state_dict(new)
    for k, a in held.items():
        assert getattr(layer, k) is a and np.all(a == 5.0), k   # a reference taken before sees the values
    bad = dict(new, weight=np.ones(4, np.float32))
    with pytest.raises(ValueError, match="weight"):
        layer.load_state_dict(bad)
    assert all(np.all(a == 5.0) for a in held.values())       # a rejected dict changes nothing


def test_a_sync_layer_converted_from_a_batch_norm_sees_what_the_batch_norm_loads():
    bn = bn_simd.BatchNorm2d(3)
    sync = bn_simd.SyncBatchNorm.convert_sync_batchnorm(bn)
    bn.load_state_dict({k: np.full(3, 2.0, np.float32) for k in ("weight", "bias", "running_mean", "running_var")}
                       | {"num_batches_tracked": 1})
    assert np.all(sync.running_mean == 2.0) and np.all(sync.weight == 2.0)


@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("make", [lambda a: bn_simd.BatchNorm2d(3, activation=a),
                                  lambda a: bn_simd.GroupNorm(1, 3, activation=a),
                                  lambda a: bn_simd.InstanceNorm2d(3, affine=True, activation=a),
                                  lambda a: bn_simd.LayerNorm(5, activation=a),
                                  lambda a: bn_simd.RMSNorm(5, activation=a),
                                  lambda a: bn_simd.BatchNorm2d(3, virtual_batch_size=2) if a is None else None],
                         ids=["batch", "group", "instance", "layer", "rms", "virtual"])
def test_backward_uses_the_forwards_weight_after_an_update_in_place(make, epilogue):
    """An optimizer step between a forward and its backward (weight -= lr * grad, in place) does not change that
    backward: both paths (plain, through an activation) differentiate the forward that ran."""
    layer = make("relu" if epilogue else None)
    if layer is None:
        pytest.skip("virtual batches take no activation")
    x = np.random.default_rng(3).standard_normal((4, 3, 2, 5)).astype(np.float32)
    g = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    layer.weight[...] = np.linspace(0.5, 1.5, layer.weight.size).reshape(layer.weight.shape)
    layer(x)
    expected = layer.backward(g), layer.grad_weight.copy()
    layer(x)
    layer.weight *= 2.0  # (in place, after the forward)
    got = layer.backward(g), layer.grad_weight
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("value, error, message", [
    (-1, ValueError, "num_batches_tracked must be >= 0 .*, got -1"),
    ("3", TypeError, "num_batches_tracked must be a whole number"),
    (2.5, TypeError, "num_batches_tracked must be a whole number"),
    (True, TypeError, "num_batches_tracked must be a whole number"),
    (np.zeros(2, np.int64), TypeError, "num_batches_tracked must be a whole number"),
])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_reassigned_batch_count_is_checked_before_the_call(value, error, message, momentum):
    """num_batches_tracked reassigned to something that is no count: the call raises naming it (it divided by zero,
    blamed momentum, or counted on from a float or a negative number) and changes nothing."""
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    layer = bn_simd.BatchNorm2d(3, momentum=momentum)
    layer.num_batches_tracked = value
    with pytest.raises(error, match=message):
        layer(x)
    np.testing.assert_array_equal(layer.running_mean, 0.0)
    np.testing.assert_array_equal(layer.running_var, 1.0)


def test_a_batch_count_of_numpy_integers_counts_on_as_an_int():
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    for v in (np.int64(4), np.array(4, np.int32)):
        layer = bn_simd.BatchNorm2d(3, momentum=None)
        layer.num_batches_tracked = v
        layer(x)
        assert layer.num_batches_tracked == 5 and type(layer.num_batches_tracked) is int


def _reread(attr, value):

    def change(layer):
        setattr(layer, attr, value)
    return change


# (a layer, its input (C equal to the last dimension, so that either reading of x is a valid one), and an attribute
# change after which the same x reads otherwise)
REROUTED = [
    ("BatchNorm2d layout", lambda: bn_simd.BatchNorm2d(4), {}, _reread("layout", "NHWC")),
    ("BatchNorm2d relu", lambda: bn_simd.BatchNorm2d(4, activation="relu"), {}, _reread("layout", "NHWC")),
    ("BatchNorm2d residual", lambda: bn_simd.BatchNorm2d(4), {"residual": True}, _reread("layout", "NHWC")),
    ("BatchNorm2d eval", lambda: bn_simd.BatchNorm2d(4).eval(), {}, _reread("layout", "NHWC")),
    ("BatchNorm axis", lambda: bn_simd.BatchNorm(4, axis=1), {}, _reread("axis", -1)),
    ("BatchNorm2d virtual", lambda: bn_simd.BatchNorm2d(4, virtual_batch_size=2), {}, _reread("layout", "NHWC")),
    ("BatchNorm2d renorm", lambda: bn_simd.BatchNorm2d(4, renorm=True), {}, _reread("layout", "NHWC")),
    ("InstanceNorm2d", lambda: bn_simd.InstanceNorm2d(4, affine=True), {}, _reread("layout", "NHWC")),
    ("InstanceNorm2d silu", lambda: bn_simd.InstanceNorm2d(4, affine=True, activation="silu"), {},
     _reread("layout", "NHWC")),
    ("InstanceNorm2d eval", lambda: bn_simd.InstanceNorm2d(4, affine=True, track_running_stats=True).eval(), {},
     _reread("layout", "NHWC")),
    ("GroupNorm layout", lambda: bn_simd.GroupNorm(2, 4), {}, _reread("layout", "NHWC")),
    ("GroupNorm groups", lambda: bn_simd.GroupNorm(2, 4), {}, _reread("num_groups", 4)),
    ("GroupNorm relu", lambda: bn_simd.GroupNorm(2, 4, activation="relu"), {}, _reread("num_groups", 1)),
    ("LayerNorm layout", lambda: bn_simd.LayerNorm(4), {}, _reread("layout", "NCHW")),
    ("LayerNorm relu", lambda: bn_simd.LayerNorm(4, activation="relu"), {}, _reread("layout", "NCHW")),
    ("RMSNorm layout", lambda: bn_simd.RMSNorm(4), {}, _reread("layout", "NCHW")),
    ("LayerNorm shape", lambda: bn_simd.LayerNorm((4, 4), elementwise_affine=False), {},
     _reread("normalized_shape", (4,))),
    ("SyncBatchNorm", lambda: bn_simd.SyncBatchNorm(4, comm=make_comms(1)[0]), {}, _reread("layout", "NHWC")),
]


@pytest.mark.parametrize("make, kw, change", [r[1:] for r in REROUTED], ids=[r[0] for r in REROUTED])
def test_backward_differentiates_the_forward_that_ran(make, kw, change):
    """An attribute that decides how x is read (layout, axis, groups, normalized_shape), reassigned between forward
    and backward, changes the next forward, not the last one's gradient: backward gives the bits of the unchanged
    layer's (it read the attribute anew, and gave a plausible gradient of another normalisation)."""
    rng = np.random.default_rng(7)
    x, g = (rng.standard_normal((4, 4, 4, 4)).astype(np.float32) for _ in range(2))
    r = rng.standard_normal(x.shape).astype(np.float32) if kw.get("residual") else None
    extra = {} if r is None else {"residual": r}
    grads = []
    for changed in (False, True):
        layer = make()
        if layer.weight is not None:
            layer.weight[:] = np.linspace(0.5, 2.0, layer.weight.size).reshape(layer.weight.shape)
        y = layer(x, **extra)
        if changed:
            change(layer)
        grads.append((y, layer.backward(g), layer.grad_weight, getattr(layer, "grad_residual", None)))
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)
    layer(x, **extra)  # (the next forward reads the changed attribute)


def test_a_weight_given_to_a_layer_built_without_one_gets_its_gradient():
    """affine is read at construction only, as PyTorch's: a weight assigned later is used by the forward, gets its
    gradient and is in the state dict (it kept the last backward's grad_weight, and the state left it out)."""
    rng = np.random.default_rng(8)
    x, g = (rng.standard_normal((4, 3, 5, 5)).astype(np.float32) for _ in range(2))
    ref_layer = bn_simd.BatchNorm2d(3)
    ref_layer.weight[:] = [0.5, 1.0, 2.0]
    ref_layer.bias = None
    layer = bn_simd.BatchNorm2d(3, affine=False)
    layer.weight = np.array([0.5, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(layer(x), ref_layer(x))
    np.testing.assert_array_equal(layer.backward(g), ref_layer.backward(g))
    np.testing.assert_array_equal(layer.grad_weight, ref_layer.grad_weight)
    assert layer.grad_bias is None and set(layer.state_dict()) >= {"weight"} and "bias" not in layer.state_dict()
    on = bn_simd.BatchNorm2d(3)  # (and the other way: affine switched off, the held weight still counts)
    on(x)
    on.backward(g)
    on.affine = False
    on.weight[:] = [0.5, 1.0, 2.0]
    on(x)
    on.backward(np.zeros_like(g))
    np.testing.assert_array_equal(on.grad_weight, 0.0)


@pytest.mark.parametrize("make", [lambda: bn_simd.BatchNorm2d(3), lambda: bn_simd.InstanceNorm2d(3),
                                  lambda: bn_simd.GroupNorm(3, 3), lambda: bn_simd.LayerNorm(5)],
                         ids=["BatchNorm2d", "InstanceNorm2d", "GroupNorm", "LayerNorm"])
def test_train_takes_a_bool_as_pytorch(make):
    """train("False") set training on (bool of a non-empty string); PyTorch's Module.train raises ValueError for
    anything but a bool."""
    layer = make()
    for bad in ("False", 0, None):
        with pytest.raises(ValueError, match="train\\(\\) takes a bool mode, got"):
            layer.train(bad)
        assert layer.training is True
    assert layer.train(np.bool_(False)).training is False


def test_reassigned_training_and_num_features_are_named():
    x = np.random.default_rng(9).standard_normal((4, 3, 5, 5)).astype(np.float32)
    for layer in (bn_simd.BatchNorm2d(3), bn_simd.InstanceNorm2d(3),
                  bn_simd.SyncBatchNorm(3, comm=make_comms(1)[0])):
        layer.training = np.array([True, False])
        with pytest.raises(TypeError, match="training must be a bool, got ndarray"):
            layer(x)
        assert layer.num_batches_tracked in (0, None)
    layer = bn_simd.BatchNorm2d(3)
    layer.num_features = "3"
    with pytest.raises(TypeError, match="num_features must be an int, got str"):
        layer(x)


def test_a_reassigned_dtype_and_an_oversized_loaded_count_are_refused_by_name():
    """dtype set to an integer type made the parameter gradients integers (truncated without a word); a count
    beyond int64 in a state dict was refused as "dtype object"."""
    x = np.random.default_rng(10).standard_normal((4, 3, 5, 5)).astype(np.float32)
    for layer in (bn_simd.BatchNorm2d(3), bn_simd.GroupNorm(3, 3)):
        layer.dtype = np.int32
        with pytest.raises(TypeError, match="dtype"):
            layer(x)
        for given, want in ((None, np.float32), ("float64", np.float64), (np.float32, np.float32)):
            layer.dtype = given  # (None and names compare equal to a dtype: normalised all the same)
            layer(x)
            assert layer.dtype == want and isinstance(layer.dtype, np.dtype) and repr(layer)
            layer.backward(x)
            assert layer.grad_weight.dtype == want
    layer = bn_simd.BatchNorm2d(3)
    state = dict(layer.state_dict(), num_batches_tracked=2**64)
    with pytest.raises(ValueError, match="num_batches_tracked must be >= 0 and <= 2\\*\\*63 - 1"):
        layer.load_state_dict(state)
    assert layer.num_batches_tracked == 0
    layer.load_state_dict(dict(state, num_batches_tracked=2**63 - 1))
    assert layer.num_batches_tracked == 2**63 - 1


@pytest.mark.parametrize("make", [lambda: bn_simd.BatchNorm2d(4), lambda: bn_simd.GroupNorm(2, 4),
                                  lambda: bn_simd.LayerNorm(4), lambda: bn_simd.InstanceNorm2d(4, affine=True)],
                         ids=["BatchNorm2d", "GroupNorm", "LayerNorm", "InstanceNorm2d"])
def test_a_layer_pickled_before_it_kept_its_forward_route_still_differentiates(make):
    """A layer pickled after a forward by a version that kept no ``_fwd_route`` (its state without it) unpickles
    with the route its attributes give, and its backward gives the bits it would have."""
    x, g = (np.random.default_rng(12).standard_normal((4, 4, 4, 4)).astype(np.float32) for _ in range(2))
    layer = make()
    layer(x)
    want = layer.backward(g)
    state = dict(layer.__dict__)
    del state["_fwd_route"]
    old = type(layer).__new__(type(layer))
    old.__setstate__(state)
    np.testing.assert_array_equal(old.backward(g), want)


def test_sync_batch_norm_with_renorm_switched_on_is_refused_by_name():
    layer = bn_simd.SyncBatchNorm(3, comm=make_comms(1)[0])
    layer.renorm = True  # (no running_std: the refusal, not an AttributeError)
    with pytest.raises(ValueError, match="SyncBatchNorm has no virtual batches or renormalization"):
        layer(np.ones((4, 3, 2, 2), np.float32))
