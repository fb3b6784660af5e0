"""bn_simd.keras.BatchNormalization: Keras 3's semantics, against a float64 NumPy statement of Keras' formula, Keras'
own batch-normalization test cases (translated), and Keras itself when it is installed (on its torch backend, which
the Keras tests select; they skip without torch or Keras)."""
import numpy as np
import pytest

from bn_simd.keras import BatchNormalization
from keras_backend import keras_on_torch
from oracle import central_difference

# Keras' torch backend converts its variables through __array__ without NumPy 2's copy keyword (Keras' own warning)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


class KerasFormula:
    """Keras 3's BatchNormalization in float64 (from its documented formulas): batch mean and biased variance over
    every axis but `axis` (over the positions where the mask is nonzero), moving = moving * momentum + batch *
    (1 - momentum), y = (x - mean) / sqrt(var + epsilon) * gamma + beta."""

    def __init__(self, C, axis=-1, momentum=0.99, epsilon=1e-3):
        self.axis, self.momentum, self.epsilon = axis, momentum, epsilon
        self.gamma, self.beta = np.ones(C), np.zeros(C)
        self.moving_mean, self.moving_variance = np.zeros(C), np.ones(C)

    def __call__(self, x, training=False, mask=None):
        xl = np.moveaxis(np.asarray(x, np.float64), self.axis, -1)
        if training:
            m = np.ones(xl.shape[:-1], bool) if mask is None else np.broadcast_to(np.asarray(mask) != 0,
                                                                                  xl.shape[:-1])
            sel = xl[m]
            n = sel.shape[0]
            mean = sel.sum(0) / n if n else np.zeros(xl.shape[-1])
            var = np.square(sel - mean).sum(0) / n if n else np.zeros(xl.shape[-1])
            self.moving_mean = self.moving_mean * self.momentum + mean * (1 - self.momentum)
            self.moving_variance = self.moving_variance * self.momentum + var * (1 - self.momentum)
        else:
            mean, var = self.moving_mean, self.moving_variance
        y = (xl - mean) / np.sqrt(var + self.epsilon) * self.gamma + self.beta
        return np.moveaxis(y, -1, self.axis)


def f32_close(a, b, scale=1.0, what=""):
    """Float32 results of O(scale) values: a few float32 ulps (statistics in float64)."""
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=8 * np.finfo(np.float32).eps * scale, err_msg=what)


# ---- Keras' formula ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((8, 5), -1), ((6, 4, 3), -1), ((6, 4, 3), 1), ((3, 2, 4, 5), 2),
                                        ((2, 3, 2, 2, 2, 2, 3), 0), ((4,), 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_steps_match_keras_formula(shape, axis, dtype):
    rng = np.random.default_rng(0)
    C = shape[axis]
    layer = BatchNormalization(axis=axis, momentum=0.8, epsilon=1e-3, dtype=dtype)
    ref = KerasFormula(C, axis, 0.8, 1e-3)
    layer.build(shape)
    w = [rng.uniform(0.5, 1.5, C), rng.standard_normal(C), rng.standard_normal(C), rng.uniform(0.5, 2, C)]
    layer.set_weights(w)
    ref.gamma, ref.beta, ref.moving_mean, ref.moving_variance = (np.asarray(v, dtype).astype(np.float64) for v in w)
    for step in range(3):
        x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
        for training in (True, False):
            y = layer(x, training=training)
            assert y.dtype == dtype and y.shape == shape
            expected = ref(x, training=training)
            np.testing.assert_allclose(y, expected, rtol=4 * np.finfo(dtype).eps ** 0.75,
                                       atol=16 * np.finfo(dtype).eps * 4, err_msg=f"step {step} {training}")
        for got, want in zip(layer.get_weights()[2:], (ref.moving_mean, ref.moving_variance)):
            # (terms of size ~3 that may cancel: an absolute bound of a few ulps of 3 as well)
            np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps, atol=32 * np.finfo(dtype).eps)


def test_momentum_is_keras_meaning():
    """Keras' momentum is the moving statistics' share: five batches of mean 3 at momentum 0.99 move the moving
    mean to 3 (1 - 0.99^5), not to 3 (1 - 0.01^5) (the PyTorch meaning)."""
    x = np.full((4, 2), 3.0, np.float32)
    x[::2] += 1.0
    x[1::2] -= 1.0
    layer = BatchNormalization()
    for _ in range(5):
        layer(x, training=True)
    mm, mv = layer.get_weights()[2:]
    np.testing.assert_allclose(mm, 3 * (1 - 0.99 ** 5), rtol=1e-6)
    np.testing.assert_allclose(mv, 0.99 ** 5 + 1.0 * (1 - 0.99 ** 5), rtol=1e-6)  # biased: var 1, not 4/3


def test_backward_through_batch_and_moving_statistics():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4, 3))
    g = rng.standard_normal(x.shape)
    layer = BatchNormalization(axis=1, dtype=np.float64)
    layer.build(x.shape)
    layer.set_weights([rng.uniform(0.5, 1.5, 4), rng.standard_normal(4), rng.standard_normal(4), np.full(4, 2.0)])
    gamma = layer.gamma.copy()
    for training in (True, False):
        eps = 1e-3

        def loss(xx):
            xl = np.moveaxis(xx, 1, -1)
            if training:
                mean, var = xl.reshape(-1, 4).mean(0), xl.reshape(-1, 4).var(0)
            else:
                mean, var = layer.moving_mean, layer.moving_variance
            return float((np.moveaxis((xl - mean) / np.sqrt(var + eps) * gamma, -1, 1) * g).sum())

        y = layer(x, training=training)
        gx = layer.backward(g)
        expected = central_difference(loss, x)
        np.testing.assert_allclose(gx, expected, rtol=1e-6, atol=1e-7)
        xhat = (y - layer.beta[:, None]) / gamma[:, None]
        np.testing.assert_allclose(layer.grad_gamma, (g * xhat).sum(axis=(0, 2)), rtol=1e-10)
        np.testing.assert_allclose(layer.grad_beta, g.sum(axis=(0, 2)), rtol=1e-10)
    layer = BatchNormalization(scale=False, center=False)
    layer(x.astype(np.float32), training=True)
    layer.backward(g.astype(np.float32))
    assert layer.grad_gamma is None and layer.grad_beta is None


def test_one_value_per_channel_gives_beta_as_keras():
    """A (C,) input (axis=-1) or a batch of one row: variance 0, y = beta; the moving statistics move towards x and
    0 (Keras' moments over no other axis)."""
    for shape in ((3,), (1, 3)):
        layer = BatchNormalization(momentum=0.5, beta_initializer=0.25)
        x = np.array([1.0, 2.0, -4.0], np.float32).reshape(shape)
        y = layer(x, training=True)
        np.testing.assert_array_equal(y, np.full(shape, 0.25, np.float32))
        np.testing.assert_allclose(layer.moving_mean, [0.5, 1.0, -2.0])
        np.testing.assert_allclose(layer.moving_variance, 0.5)
        np.testing.assert_array_equal(layer.backward(np.ones(shape, np.float32)), 0.0)


def test_empty_batch_leaves_the_moving_statistics():
    layer = BatchNormalization()
    layer.build((2, 3))
    y = layer(np.zeros((0, 3), np.float32), training=True)
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(layer.moving_mean, 0.0)
    np.testing.assert_array_equal(layer.moving_variance, 1.0)


# ---- Keras' own test cases (keras/src/layers/normalization/batch_normalization_test.py), translated -------------

@pytest.mark.parametrize("center,scale,trainable,nontrainable", [(True, True, 2, 2), (False, False, 0, 2),
                                                                 (True, False, 1, 2), (False, True, 1, 2)])
def test_bn_basics(center, scale, trainable, nontrainable):
    layer = BatchNormalization(center=center, scale=scale)
    assert layer.get_weights() == [] and not layer.built
    for shape in ((2, 3),) if trainable != 2 else ((2, 3), (2, 4, 4, 3)):
        layer = BatchNormalization(center=center, scale=scale)
        y = layer(np.random.default_rng(0).standard_normal(shape).astype(np.float32), training=True)
        assert y.shape == shape
        assert len(layer.trainable_weights) == trainable
        assert len(layer.non_trainable_weights) == nontrainable
        assert [w.shape for w in layer.get_weights()] == [(3,)] * (trainable + nontrainable)


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("input_shape", [(5, 2, 3), (5, 3, 3, 2)])
@pytest.mark.parametrize("mm_init", ["zeros", "ones"])
@pytest.mark.parametrize("mv_init", ["zeros", "ones"])
def test_correctness(axis, input_shape, mm_init, mv_init):
    layer = BatchNormalization(axis=axis, momentum=0, moving_mean_initializer=mm_init,
                               moving_variance_initializer=mv_init)
    x = np.random.default_rng(0).normal(loc=5.0, scale=10.0, size=input_shape)
    out = x
    for _ in range(3):
        out = layer(out, training=True)
    shape = [1] * len(input_shape)
    shape[axis] = input_shape[axis]
    out = (out - layer.beta.reshape(shape)) / layer.gamma.reshape(shape)
    red = tuple(a for a in range(len(input_shape)) if a != axis % len(input_shape))
    np.testing.assert_allclose(np.mean(out, axis=red), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.std(out, axis=red), 1.0, atol=1e-3)
    np.testing.assert_allclose(layer.moving_mean, 0.0, atol=1e-3)
    np.testing.assert_allclose(layer.moving_variance, 1.0, atol=1e-3)
    # inference before training on x differs; after training with momentum 0, it matches
    assert not np.allclose(layer(x, training=False), layer(x, training=True))
    training_out = layer(x, training=True)
    np.testing.assert_allclose(layer(x, training=False), training_out, rtol=1e-5, atol=1e-5)
    # a mask leaves inference alone and changes training (Keras' Masking layer: rows of zeros masked)
    x[:, 1, :] = 0.0
    mask = np.any(x != 0.0, axis=-1)
    if axis != -1:  # (Keras puts the masked axis last; with channels elsewhere, mask over x without them)
        mask = np.ones([s for i, s in enumerate(input_shape) if i != axis % len(input_shape)], bool)
        mask[:, 1] = False
    np.testing.assert_array_equal(layer(x, training=False, mask=mask), layer(x, training=False))
    unmasked = layer(x, training=False)
    assert not np.allclose(unmasked, layer(x, training=True, mask=mask))


def test_input_fully_masked():
    norm = BatchNormalization(scale=False, center=False)
    y = norm(np.zeros((4, 5)), training=True, mask=np.zeros((4,), np.float32))
    np.testing.assert_array_equal(y, np.zeros((4, 5), np.float32))
    # Keras' masked moments of no entry: 0 and 0
    np.testing.assert_allclose(norm.moving_mean, 0.0)
    np.testing.assert_allclose(norm.moving_variance, 0.99, rtol=1e-7)


@pytest.mark.parametrize("mask_value", [0.0, 0.1, 1.0])
def test_batchnorm_ignores_masked_values(mask_value):
    padded = np.array([[[1, 5], [2, 5], [mask_value] * 2, [mask_value] * 2] for _ in range(10)], np.float32)
    mask = np.any(padded != mask_value, axis=-1)
    layer = BatchNormalization(momentum=0.0)
    for _ in range(5):
        layer(padded, training=True, mask=mask)
    np.testing.assert_allclose(layer.moving_mean, [1.5, 5.0], rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, [0.25, 0.0], atol=1e-7)


def test_trainable_behavior():
    layer = BatchNormalization(axis=-1, momentum=0.8, epsilon=1e-7)
    layer.build((1, 4, 4, 3))
    layer.trainable = False
    assert len(layer.weights) == 4 and len(layer.trainable_weights) == 0 and len(layer.non_trainable_weights) == 4
    x = np.random.default_rng(0).normal(loc=5.0, scale=10.0, size=(200, 4, 4, 3))
    np.testing.assert_allclose(layer(x, training=True), x, rtol=1e-6)  # frozen: inference with mean 0, var 1
    np.testing.assert_array_equal(layer.moving_mean, 0.0)
    layer.trainable = True
    assert len(layer.trainable_weights) == 2 and len(layer.non_trainable_weights) == 2
    for _ in range(10):
        out = layer(x, training=True)
    out = (out - layer.beta) / layer.gamma
    np.testing.assert_allclose(np.mean(out, axis=(0, 1, 2)), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.std(out, axis=(0, 1, 2)), 1.0, atol=1e-3)


def test_masked_broadcast_normalization():
    layer = BatchNormalization(axis=-1, momentum=0.0, epsilon=1e-3)
    y = layer(np.ones((1, 2, 3, 4)), training=True, mask=np.ones((1, 2, 1)))
    np.testing.assert_allclose(y, 0.0, atol=1e-6)
    np.testing.assert_allclose(layer.moving_mean, 1.0, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance, 0.0, atol=1e-6)


def test_serialization():
    layer = BatchNormalization(axis=1, momentum=0.95, epsilon=1e-4, center=False, gamma_initializer=2.0,
                               dtype="float64", name="bn")
    config = layer.get_config()
    assert BatchNormalization.from_config(config).get_config() == config


# ---- weights and configuration -----------------------------------------------------------------------------------

def test_set_weights_checks_everything_first():
    layer = BatchNormalization()
    with pytest.raises(ValueError, match="weights made first"):
        layer.set_weights([np.ones(3)] * 4)
    layer.build((2, 3))
    before = layer.get_weights()
    for weights, exc, pattern in [([np.ones(3)] * 3, ValueError, "list of 4 arrays"),
                                  ([np.ones(3)] * 3 + [np.ones(4)], ValueError, r"moving_variance must have shape"),
                                  ([np.ones(3)] * 3 + [np.ones(3, int)], TypeError, "floating-point")]:
        with pytest.raises(exc, match=pattern):
            layer.set_weights(weights)
        for a, b in zip(layer.get_weights(), before):
            np.testing.assert_array_equal(a, b)
    layer.set_weights([np.arange(3.0) + k for k in range(4)])
    np.testing.assert_array_equal(layer.moving_mean, [2, 3, 4])
    assert layer.moving_mean.dtype == np.float32


def test_config_from_keras_style_dicts():
    cfg = {"name": "bn", "trainable": True,
           "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float64"}},
           "axis": -1, "momentum": 0.9, "epsilon": 0.001, "center": True, "scale": True,
           "beta_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {}},
           "gamma_initializer": {"module": "keras.initializers", "class_name": "Constant", "config": {"value": 3.0}},
           "moving_mean_initializer": {"class_name": "Zeros", "config": {}},
           "moving_variance_initializer": {"class_name": "Ones", "config": {}},
           "beta_regularizer": None, "gamma_regularizer": None, "beta_constraint": None, "gamma_constraint": None,
           "synchronized": False}
    layer = BatchNormalization.from_config(cfg)
    layer.build((2, 4))
    assert layer.dtype == np.float64
    np.testing.assert_array_equal(layer.gamma, 3.0)
    with pytest.raises(ValueError, match="beta_regularizer"):
        BatchNormalization.from_config(dict(cfg, beta_regularizer="l2"))
    with pytest.raises(TypeError, match="does not take"):
        BatchNormalization.from_config(dict(cfg, foo=1))
    # a built tf.keras 2 layer's config: its axis a one-element list (Keras' legacy loader unwraps it too)
    layer = BatchNormalization.from_config(dict(cfg, axis=[1], virtual_batch_size=None))
    assert layer.axis == 1
    with pytest.raises(TypeError, match="axis must be an int"):
        BatchNormalization.from_config(dict(cfg, axis=[1, 2]))
    calls = []

    def init(shape, dtype):
        calls.append((shape, dtype))
        return np.arange(shape[0], dtype=dtype)
    layer = BatchNormalization(moving_mean_initializer=init)
    layer(np.ones((2, 3), np.float32))
    assert calls == [((3,), "float32")]
    np.testing.assert_array_equal(layer.moving_mean, [0, 1, 2])


def test_errors_name_the_argument_and_change_nothing():
    for kw, exc, pattern in [(dict(momentum=1.5), ValueError, "momentum must be in"),
                             (dict(momentum="0.9"), TypeError, "momentum must be a real"),
                             (dict(epsilon=0.0), ValueError, "^epsilon must be a finite number > 0, got 0.0"),
                             (dict(epsilon="1"), TypeError, "^epsilon must be a real number"),
                             (dict(axis=1.0), TypeError, "axis must be an int"),
                             (dict(axis=9), ValueError, "axis must be in"),
                             (dict(gamma_initializer="glorot_uniform"), ValueError, "gamma_initializer"),
                             (dict(dtype=np.float16), TypeError, "dtype")]:
        with pytest.raises(exc, match=pattern):
            BatchNormalization(**kw)
    layer = BatchNormalization(axis=1)
    x = np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32)
    layer(x, training=True)
    before = layer.get_weights()
    for bad, exc, pattern in [(np.ones((4, 3), np.float32), ValueError, "3 dimensions"),
                              (np.ones((4, 5, 2), np.float32), ValueError, "3 channels on axis 1"),
                              (np.ones((4, 3, 2), np.complex64), TypeError, "float32 or float64")]:
        with pytest.raises(exc, match=pattern):
            layer(bad, training=True)
    with pytest.raises(ValueError, match="mask"):
        layer(x, training=True, mask=np.ones((4, 3)))
    with pytest.raises(ValueError, match="out of bounds"):
        BatchNormalization(axis=3).build((2, 3))
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="call first"):
        BatchNormalization().backward(np.ones((2, 3)))


# ---- against Keras itself -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras():
    return keras_on_torch()


KERAS_CASES = [((8, 5), -1, None), ((6, 4, 3), -1, (6, 4)), ((6, 4, 3), -1, (6, 1)), ((6, 4, 3), 1, None),
               ((3, 4, 5, 2), -1, (3, 4, 5)), ((2, 3, 4, 5, 2), 2, None), ((1, 3), -1, None)]


@pytest.mark.parametrize("shape,axis,mshape", KERAS_CASES)
def test_matches_keras_3(keras, shape, axis, mshape):
    rng = np.random.default_rng(0)
    kl = keras.layers.BatchNormalization(axis=axis, momentum=0.9, epsilon=1e-3)
    ours = BatchNormalization(axis=axis, momentum=0.9, epsilon=1e-3)
    kl.build(shape)
    ours.build(shape)
    C = shape[axis]
    w = [rng.uniform(0.5, 1.5, C), rng.standard_normal(C), rng.standard_normal(C), rng.uniform(0.5, 2.0, C)]
    kl.set_weights([v.astype(np.float32) for v in w])
    ours.set_weights(kl.get_weights())
    to_np = keras.ops.convert_to_numpy
    for step in range(3):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        mask = None if mshape is None else rng.random(mshape) < 0.7
        for training in (True, False):
            km = None if mask is None else keras.ops.convert_to_tensor(mask)
            ky = to_np(kl(x, training=training, mask=km))
            y = ours(x, training=training, mask=mask)
            f32_close(y, ky, scale=np.abs(ky).max(), what=f"step {step}, training={training}")
        for a, b in zip(ours.get_weights(), kl.get_weights()):
            f32_close(a, b, scale=np.abs(b).max())


@pytest.mark.parametrize("shape,axis,mshape", KERAS_CASES)
def test_gradients_match_keras_3_autograd(keras, shape, axis, mshape):
    if keras.backend.backend() != "torch":
        pytest.skip("gradients are compared under the torch backend")
    import torch
    rng = np.random.default_rng(1)
    kl = keras.layers.BatchNormalization(axis=axis)
    ours = BatchNormalization(axis=axis)
    kl.build(shape)
    ours.build(shape)
    C = shape[axis]
    kl.set_weights([rng.uniform(0.5, 1.5, C).astype(np.float32), rng.standard_normal(C).astype(np.float32),
                    np.zeros(C, np.float32), np.ones(C, np.float32)])
    ours.set_weights(kl.get_weights())
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    mask = None if mshape is None else rng.random(mshape) < 0.7
    for training in (True, False):
        xt = torch.tensor(x, requires_grad=True)
        kl.gamma.value.grad = kl.beta.value.grad = None
        kl(xt, training=training, mask=None if mask is None else torch.tensor(mask)).backward(torch.tensor(g))
        ours(x, training=training, mask=mask)
        gx = ours.backward(g)
        scale = np.abs(xt.grad.numpy()).max() + 1
        f32_close(gx, xt.grad.numpy(), scale=4 * scale, what=f"grad_x training={training}")
        f32_close(ours.grad_gamma, kl.gamma.value.grad.numpy(), scale=np.abs(g).sum(), what="grad_gamma")
        f32_close(ours.grad_beta, kl.beta.value.grad.numpy(), scale=np.abs(g).sum(), what="grad_beta")


def test_config_of_a_keras_layer(keras):
    kl = keras.layers.BatchNormalization(axis=1, momentum=0.8, epsilon=1e-4, center=False,
                                         gamma_initializer=keras.initializers.Constant(2.0))
    ours = BatchNormalization.from_config(kl.get_config())
    assert (ours.axis, ours.momentum, ours.epsilon, ours.center, ours.scale) == (1, 0.8, 1e-4, False, True)
    ours.build((2, 3, 4))
    kl.build((2, 3, 4))
    for a, b in zip(ours.get_weights(), kl.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_float16_integer_and_bool_inputs_are_computed_in_float32():
    x = np.arange(24).reshape(6, 4) % 5
    expected = BatchNormalization(momentum=0.5)(x.astype(np.float32), training=True)
    for kind in (np.float16, np.int64, np.uint8):
        layer = BatchNormalization(momentum=0.5)
        y = layer(x.astype(kind), training=True)
        assert y.dtype == np.float32
        np.testing.assert_array_equal(y, expected)
        assert layer.backward(np.ones((6, 4), np.float32)).dtype == np.float32
    y = BatchNormalization()(x > 2, training=True)
    assert y.dtype == np.float32 and y.shape == (6, 4)


@pytest.mark.parametrize("dtype", ["mixed_float16", "mixed_bfloat16", None,
                                   {"module": "keras", "class_name": "DTypePolicy",
                                    "config": {"name": "mixed_float16"}}])
def test_mixed_policies_and_none_keep_float32_variables_as_keras(dtype):
    layer = BatchNormalization(dtype=dtype)
    assert layer.dtype == np.float32
    assert BatchNormalization.from_config(layer.get_config()).dtype == np.float32
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        BatchNormalization(dtype="bfloat16")


def test_backward_uses_the_forwards_gamma_after_an_update_in_place():
    x = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)
    g = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    layer = BatchNormalization()
    layer(x, training=True)
    expected = layer.backward(g)
    layer(x, training=True)
    layer.gamma *= 2.0
    np.testing.assert_array_equal(layer.backward(g), expected)


@pytest.mark.parametrize("kind, kw", [
    ("batch", {}), ("inference", {}), ("masked", {}), ("virtual", {"virtual_batch_size": 2}),
    ("renorm", {"renorm": True}), ("group", {"groups": 2}), ("group -1", {"groups": -1}),
])
def test_backward_keeps_the_forward_axis_and_groups(kind, kw):
    """axis (or groups) reassigned between a call and its backward changes the next call, not the last one's
    gradient (the backward read them anew: another axis' gradient of the same array, C being every axis' size)."""
    from bn_simd.keras import GroupNormalization
    rng = np.random.default_rng(5)
    x, g = (rng.standard_normal((4, 4, 4, 4)).astype(np.float32) for _ in range(2))
    mask = (rng.random((4, 4, 4)) < 0.7) if kind == "masked" else None
    grads = []
    for changed in (False, True):
        layer = GroupNormalization(axis=-1, **kw) if kind.startswith("group") else BatchNormalization(axis=-1, **kw)
        layer(x * np.arange(1, 5, dtype=np.float32), training=True)  # (moving statistics apart per channel)
        layer(x, training=kind != "inference", **({} if mask is None else {"mask": mask}))
        if changed:
            layer.axis = 2
            if kind.startswith("group"):
                layer.groups = 1
        gx = layer.backward(g)
        grads.append((gx, layer.grad_gamma, layer.grad_beta))
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make, attr, value, error, message", [
    (lambda: BatchNormalization(), "axis", 5, ValueError, "axis 5 is out of bounds for the 3 dimensions"),
    (lambda: BatchNormalization(), "axis", "x", TypeError, "axis must be an int, got str"),
    (lambda: BatchNormalization(), "moving_mean", [0.0] * 4, TypeError, "moving_mean must be a numpy.ndarray"),
    (lambda: BatchNormalization(), "moving_mean", np.zeros(3, np.float32), ValueError,
     r"moving_mean must have shape \(4,\)"),
    (lambda: BatchNormalization(), "gamma", None, TypeError, r"gamma must be an array of shape \(4,\), got None"),
    ("GroupNormalization", "groups", 0, ValueError, "groups must be an int >= 1 or -1"),
    ("GroupNormalization", "axis", "x", TypeError, "axis must be an int, got str"),
    ("LayerNormalization", "axis", "x", TypeError, "axis must be an int or a non-empty list of ints"),
    ("RMSNormalization", "axis", None, TypeError, "axis must be an int or a non-empty list of ints"),
])
def test_reassigned_attributes_are_checked_by_the_next_call(make, attr, value, error, message):
    """An attribute reassigned after build is refused by name at the next call (an IndexError, a ZeroDivisionError,
    a comparison's TypeError or an AttributeError on num_features, or a call without gamma whose get_weights then
    failed), and the call changes nothing."""
    import bn_simd.keras as K
    x = np.random.default_rng(6).standard_normal((4, 4, 4)).astype(np.float32)
    layer = make() if callable(make) else getattr(K, make)(**({"groups": 2} if make == "GroupNormalization" else {}))
    layer(x, training=True)
    names = [n for n in ("gamma", "beta", "scale", "moving_mean", "moving_variance") if n != attr]
    held = {n: getattr(layer, n).copy() for n in names if isinstance(getattr(layer, n, None), np.ndarray)}
    setattr(layer, attr, value)
    with pytest.raises(error, match=message):
        layer(x, training=True)
    assert held
    for n, v in held.items():
        np.testing.assert_array_equal(getattr(layer, n), v)


def test_layers_pickled_before_their_calls_kept_axis_route_and_groups_still_work():
    """Keras layers pickled by a version whose saved call held no axis (BatchNormalization, its virtual batches too)
    or route and groups (GroupNormalization), and no built channel count: backward and the next call work."""
    from bn_simd.keras import GroupNormalization
    x = np.random.default_rng(13).standard_normal((4, 4, 4, 4)).astype(np.float32)
    g = np.ones_like(x)
    for layer, kw in ((BatchNormalization(), {"training": True}),
                      (BatchNormalization(virtual_batch_size=2), {"training": True}),
                      (GroupNormalization(groups=2), {})):
        layer(x, **kw)
        want = layer.backward(g)
        state = dict(layer.__dict__)
        state.pop("_C", None)
        if isinstance(state["_saved"], tuple):
            state["_saved"] = state["_saved"][:7]
        else:
            object.__delattr__(state["_saved"], "axis")
        old = type(layer).__new__(type(layer))
        old.__setstate__(state)
        np.testing.assert_array_equal(old.backward(g), want)
        old(x, **kw)


def test_group_normalization_groups_minus_one_set_again_after_build():
    from bn_simd.keras import GroupNormalization
    x = np.random.default_rng(14).standard_normal((2, 3, 4)).astype(np.float32)
    layer = GroupNormalization(groups=2, axis=1)
    with pytest.raises(ValueError, match="groups"):
        layer(np.ones((2, 3, 4), np.float32))  # (2 does not divide 3: unbuilt again)
    layer = GroupNormalization(groups=1, axis=1)
    layer(x)
    layer.groups = -1  # (one group a channel, as at build)
    np.testing.assert_array_equal(layer(x), GroupNormalization(groups=-1, axis=1)(x))


@pytest.mark.parametrize("virtual", [None, 2])
def test_backward_of_none_is_a_type_error_naming_grad_out(virtual):
    """grad_out=None is a TypeError naming it, as the other Keras layers' (it was taken as a 0-d object array and
    refused as a shape)."""
    layer = BatchNormalization(virtual_batch_size=virtual)
    layer(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), training=True)
    with pytest.raises(TypeError, match=r"grad_out must be an array of the last call's input shape \(4, 3\), got None"):
        layer.backward(None)
