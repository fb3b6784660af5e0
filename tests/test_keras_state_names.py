"""BatchNorm.load_state_dict takes Keras' weight names (issue: they were refused)."""
import numpy as np
import pytest

import bn_simd


def _keras_weights(C, rng):
    return {"gamma": rng.uniform(0.5, 1.5, C), "beta": rng.standard_normal(C),
            "moving_mean": rng.standard_normal(C), "moving_variance": rng.uniform(0.5, 2.0, C)}


def test_keras_names_load_into_pytorch_names():
    rng = np.random.default_rng(0)
    w = _keras_weights(6, rng)
    layer = bn_simd.BatchNorm2d(6)
    layer.num_batches_tracked = 7
    layer.load_state_dict(w)
    np.testing.assert_array_equal(layer.weight, w["gamma"].astype(np.float32))
    np.testing.assert_array_equal(layer.bias, w["beta"].astype(np.float32))
    np.testing.assert_array_equal(layer.running_mean, w["moving_mean"].astype(np.float32))
    np.testing.assert_array_equal(layer.running_var, w["moving_variance"].astype(np.float32))
    assert layer.num_batches_tracked == 7  # a Keras dict has no count: the layer keeps its own


def test_keras_variable_paths_load():
    rng = np.random.default_rng(1)
    w = {f"batch_normalization/{k}": v for k, v in _keras_weights(4, rng).items()}
    layer = bn_simd.BatchNorm1d(4)
    layer.load_state_dict(w)
    np.testing.assert_array_equal(layer.running_var, w["batch_normalization/moving_variance"].astype(np.float32))


def test_keras_layer_weights_give_the_same_eval_output():
    rng = np.random.default_rng(2)
    C = 5
    import bn_simd.keras as bk

    k = bk.BatchNormalization(axis=1)
    x = rng.standard_normal((8, C, 3, 3)).astype(np.float32)
    k(x, training=True)
    k(x * 2 + 1, training=True)
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    layer = bn_simd.BatchNorm2d(C, eps=k.epsilon)
    layer.load_state_dict(dict(zip(names, k.get_weights())))
    layer.eval()
    np.testing.assert_array_equal(layer(x), k(x, training=False))


def test_mixed_names_are_refused_and_change_nothing():
    rng = np.random.default_rng(3)
    layer = bn_simd.BatchNorm2d(3)
    before = {k: np.copy(v) for k, v in layer.state_dict().items()}
    w = _keras_weights(3, rng)
    w["running_mean"] = w.pop("moving_mean")
    with pytest.raises(ValueError, match="unexpected keys"):
        layer.load_state_dict(w)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_keras_names_with_wrong_shape_are_refused():
    layer = bn_simd.BatchNorm2d(3)
    w = _keras_weights(4, np.random.default_rng(4))
    with pytest.raises(ValueError, match="gamma|weight"):
        layer.load_state_dict(w)


@pytest.mark.parametrize("paths", [False, True])
def test_keras_renorm_weights_load_into_a_renorm_layer(paths):
    """With renorm, Keras' moving_stddev, renorm_mean and renorm_stddev are running_std, renorm_mean and renorm_std
    (they were not renamed: strict refused the dict, strict=False loaded nothing of it)."""
    rng = np.random.default_rng(5)
    w = _keras_weights(3, rng)
    w.update(moving_stddev=rng.uniform(0.5, 2.0, 3), renorm_mean=rng.standard_normal(3),
             renorm_stddev=rng.uniform(0.5, 2.0, 3))
    if paths:
        w = {f"bn/{k}": v for k, v in w.items()}
    layer = bn_simd.BatchNorm1d(3, renorm=True)
    layer.load_state_dict(w)
    for ours, theirs in (("running_std", "moving_stddev"), ("renorm_mean", "renorm_mean"),
                         ("renorm_std", "renorm_stddev"), ("running_var", "moving_variance")):
        np.testing.assert_array_equal(getattr(layer, ours), w[f"bn/{theirs}" if paths else theirs].astype(np.float32))
    with pytest.raises(ValueError, match="unexpected keys"):  # (a plain layer has none of the three)
        bn_simd.BatchNorm1d(3).load_state_dict(w)
    own = layer.state_dict()  # (the layer's own names, renorm_mean among them, load as they are)
    other = bn_simd.BatchNorm1d(3, renorm=True)
    other.load_state_dict(own)
    np.testing.assert_array_equal(other.renorm_mean, layer.renorm_mean)
