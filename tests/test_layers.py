"""BatchNorm layers: modes, running statistics, backward, state."""
import numpy as np
import pytest

import bn_simd
import reference as ref
from conftest import make, tol


def test_new_layer_is_training_and_updates_running_stats():
    layer = bn_simd.BatchNorm2d(4)
    assert layer.training and layer.num_batches_tracked == 0
    x = make((5, 4, 3, 3), np.float32, seed=50, loc=2)
    y = layer(x)
    y_ref, mean, var = ref.forward_train(x)
    np.testing.assert_allclose(y, y_ref, atol=tol(np.float32, 45))
    rm, rv = ref.running_update(np.zeros(4), np.ones(4), mean, var, 45, 0.1)
    np.testing.assert_allclose(layer.running_mean, rm, rtol=1e-6)
    np.testing.assert_allclose(layer.running_var, rv, rtol=1e-6)
    assert layer.num_batches_tracked == 1


def test_eval_uses_running_stats():
    layer = bn_simd.BatchNorm1d(3, dtype=np.float64)
    layer.running_mean[:] = [1, 2, 3]
    layer.running_var[:] = [4, 5, 6]
    layer.weight[:] = [1, -1, 2]
    layer.eval()
    x = make((7, 3), np.float64, seed=51)
    np.testing.assert_allclose(layer(x), ref.inference(x, [1, 2, 3], [4, 5, 6], [1, -1, 2], None), atol=1e-14)
    assert layer.num_batches_tracked == 0
    assert layer.train() is layer and layer.training


def test_momentum_none_is_cumulative_average():
    layer = bn_simd.BatchNorm2d(3, momentum=None, dtype=np.float64)
    means, vars_ = [], []
    for seed in range(4):
        x = make((4, 3, 2, 2), np.float64, seed=60 + seed, loc=seed)
        layer(x)
        _, m, v = ref.forward_train(x)
        means.append(m)
        vars_.append(v * 16 / 15)
    np.testing.assert_allclose(layer.running_mean, np.mean(means, axis=0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer.running_var, np.mean(vars_, axis=0), rtol=1e-12)


def test_track_running_stats_false_uses_batch_stats_in_eval():
    layer = bn_simd.BatchNorm2d(3, track_running_stats=False).eval()
    assert layer.running_mean is None
    x = make((4, 3, 5, 5), np.float32, seed=52, loc=4)
    np.testing.assert_allclose(layer(x), ref.forward_train(x)[0], atol=tol(np.float32, 100))


def test_affine_false_has_no_params():
    layer = bn_simd.BatchNorm2d(3, affine=False)
    assert layer.weight is None and "weight" not in layer.state_dict()
    x = make((4, 3, 5, 5), np.float32, seed=53)
    layer(x)
    layer.backward(np.ones_like(x))
    assert layer.grad_weight is None


@pytest.mark.parametrize("cls,shape", [(bn_simd.BatchNorm1d, (4, 3)), (bn_simd.BatchNorm1d, (4, 3, 5)),
                                       (bn_simd.BatchNorm2d, (4, 3, 5, 5)), (bn_simd.BatchNorm3d, (2, 3, 2, 3, 4))])
def test_layer_backward_fills_param_grads(cls, shape):
    layer = cls(3, dtype=np.float64)
    layer.weight[:] = [1.0, 2.0, 0.5]
    x, g = make(shape, np.float64, seed=54), make(shape, np.float64, seed=55)
    layer(x)
    gx = layer.backward(g)
    _, m, v = ref.forward_train(x)
    gx_ref, gw_ref, gb_ref = ref.backward(g, x, m, 1 / np.sqrt(v + 1e-5), layer.weight)
    np.testing.assert_allclose(gx, gx_ref, atol=1e-12)
    np.testing.assert_allclose(layer.grad_weight, gw_ref, atol=1e-12)
    np.testing.assert_allclose(layer.grad_bias, gb_ref, atol=1e-12)


def test_layer_backward_after_eval_forward():
    layer = bn_simd.BatchNorm2d(3, dtype=np.float64).eval()
    layer.running_var[:] = [2.0, 3.0, 4.0]
    x, g = make((2, 3, 4, 4), np.float64, seed=56), make((2, 3, 4, 4), np.float64, seed=57)
    layer(x)
    gx = layer.backward(g)
    np.testing.assert_allclose(gx, g / np.sqrt(np.array([2.0, 3.0, 4.0]) + 1e-5)[None, :, None, None], rtol=1e-14)


def test_backward_before_forward_raises():
    with pytest.raises(RuntimeError):
        bn_simd.BatchNorm2d(3).backward(np.ones((2, 3, 2, 2), np.float32))


def test_state_dict_round_trip():
    a = bn_simd.BatchNorm2d(4)
    a(make((3, 4, 5, 5), np.float32, seed=58))
    a.weight[:] = [1, 2, 3, 4]
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert sd["num_batches_tracked"].dtype == np.int64 and int(sd["num_batches_tracked"]) == 1
    b = bn_simd.BatchNorm2d(4)
    b.load_state_dict(sd)
    for k in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(b, k), sd[k])
    assert b.num_batches_tracked == 1
    sd["weight"][0] = 99  # state_dict returns copies
    assert a.weight[0] == 1


@pytest.mark.parametrize("bad", [{"weight": np.ones(5)}, {"running_var": np.ones((4, 1))},
                                 {"num_batches_tracked": np.array(1.5)}, {"extra": np.ones(4)}])
def test_load_state_dict_rejects_mismatch_and_changes_nothing(bad):
    layer = bn_simd.BatchNorm2d(4)
    sd = layer.state_dict()
    sd["running_mean"] = np.full(4, 7.0, np.float32)
    sd.update(bad)
    before = layer.state_dict()
    with pytest.raises(ValueError):
        layer.load_state_dict(sd)
    after = layer.state_dict()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_nhwc_layer():
    layer = bn_simd.BatchNorm(5, layout="NHWC")
    x = make((3, 4, 4, 5), np.float32, seed=59)
    np.testing.assert_allclose(layer(x), ref.forward_train(x, layout="NHWC")[0], atol=tol(np.float32, 48))


def test_layer_out_parameter():
    layer = bn_simd.BatchNorm2d(3)
    x = make((3, 3, 4, 4), np.float32, seed=61)
    out = np.empty_like(x)
    assert layer(x, out=out) is out


@pytest.mark.parametrize("training", [True, False])
def test_in_place_forward_keeps_backward_correct(training):
    x, g = make((3, 3, 4, 4), np.float64, seed=62), make((3, 3, 4, 4), np.float64, seed=63)
    ref_layer, layer = bn_simd.BatchNorm2d(3, dtype=np.float64), bn_simd.BatchNorm2d(3, dtype=np.float64)
    ref_layer.train(training)
    layer.train(training)
    ref_layer(x)
    expected = ref_layer.backward(g)
    xi = x.copy()
    layer(xi, out=xi)
    np.testing.assert_array_equal(layer.backward(g), expected)
    np.testing.assert_array_equal(layer.grad_weight, ref_layer.grad_weight)
