"""bn_simd.keras.BatchNormalization: set_weights' checks and its writes into the layer's own arrays, a second build,
empty batches with virtual batches at any rank, bfloat16 inputs, per-channel Constant initializers, Keras' dtype
policies, the ``inputs`` keyword and Keras' default arguments in the constructor (Keras itself, on its torch backend,
where a test compares with it; skipped without torch or Keras)."""
import re

import numpy as np
import pytest

from bn_simd import _args
from bn_simd.keras import BatchNormalization
from keras_backend import keras_on_torch

# Keras' torch backend converts its variables through __array__ without NumPy 2's copy keyword (Keras' own warning)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

RNG = np.random.default_rng(41)


@pytest.fixture(scope="module")
def keras():
    return keras_on_torch()


def trained(**kwargs):
    """A layer of 3 channels (rank 2) after one training step, gamma changed: weights that are not the initial ones."""
    layer = BatchNormalization(momentum=0.5, **kwargs)
    layer(RNG.standard_normal((8, 3)).astype(np.float32) + 2, training=True)
    if layer.gamma is not None:
        layer.gamma[:] = [2.0, 3.0, 4.0]
    return layer


def assert_weights(layer, expected):
    got = layer.get_weights()
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


# ---- set_weights ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,at,name", [({}, 3, "moving_variance"), ({}, 0, "gamma"),
                                            ({"scale": False}, 0, "beta"), ({"renorm": True}, 6, "renorm_stddev")])
def test_set_weights_refuses_none_before_assigning_anything(kwargs, at, name):
    layer = trained(**kwargs)
    before = layer.get_weights()
    weights = [np.full(3, 7.0, np.float32) for _ in before]
    weights[at] = None
    with pytest.raises(TypeError, match=rf"weights\[{at}\] \({name}\) must be an array of shape \(3,\), got None"):
        layer.set_weights(weights)
    assert_weights(layer, before)


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True}, {"center": False}, {"dtype": "float64"}])
def test_set_weights_writes_into_the_arrays_the_layer_gave(kwargs):
    """Arrays taken from weights / trainable_weights / non_trainable_weights before set_weights stay the layer's
    weights (as Keras assigns into its variables): they see the set values, an update in place on them is the
    layer's, and a training call moves the held moving statistics."""
    layer = trained(**kwargs)
    names = layer._weight_names()
    held, trainable, frozen = layer.weights, layer.trainable_weights, layer.non_trainable_weights
    new = [np.arange(3.0) + 1 + k for k in range(len(names))]  # (float64 lists: copied in the layer's dtype)
    layer.set_weights(new)
    for name, h, v in zip(names, held, new):
        assert getattr(layer, name) is h, name
        assert h.dtype == layer.dtype
        np.testing.assert_array_equal(h, v.astype(layer.dtype))
    assert all(a is b for a, b in zip(trainable, layer.trainable_weights))
    assert all(a is b for a, b in zip(frozen, layer.non_trainable_weights))
    trainable[0] -= 0.5  # an optimizer's step on the held array
    np.testing.assert_array_equal(getattr(layer, names[0]), new[0] - 0.5)
    mean = layer.moving_mean.copy()
    layer(RNG.standard_normal((8, 3)).astype(np.float32) + 5, training=True)
    assert frozen[0] is layer.moving_mean and not np.array_equal(frozen[0], mean)


def test_set_weights_replaces_arrays_it_cannot_write_into():
    """A weight the layer holds as a read-only array, an array of another dtype, or one array shared by two
    weights is replaced: every weight then holds its own value."""
    layer = trained()
    ro = np.ones(3, np.float32)
    ro.flags.writeable = False
    layer.gamma = ro
    layer.beta = np.zeros(3, np.float64)
    layer.moving_variance = layer.moving_mean
    new = [np.full(3, k + 1.0, np.float32) for k in range(4)]
    layer.set_weights(new)
    assert_weights(layer, new)
    assert layer.gamma is not ro and layer.beta.dtype == np.float32
    assert not np.shares_memory(layer.moving_mean, layer.moving_variance)
    np.testing.assert_array_equal(ro, 1.0)


def test_a_refused_set_weights_writes_nothing_into_the_held_arrays():
    layer = trained()
    held = layer.weights
    before = [w.copy() for w in held]
    with pytest.raises(ValueError, match="moving_variance must have shape"):
        layer.set_weights([np.full(3, 9.0)] * 3 + [np.ones(4)])
    for h, b in zip(held, before):
        np.testing.assert_array_equal(h, b)


def test_set_weights_keeps_keras_variables_in_step(keras):
    """Keras' set_weights assigns into its variables: a variable held before sees the values; ours the same."""
    kl, ours = keras.layers.BatchNormalization(), BatchNormalization()
    kl.build((4, 3))
    ours.build((4, 3))
    kheld, held = kl.trainable_weights, ours.trainable_weights
    new = [np.full(3, 2.0, np.float32), np.full(3, 0.5, np.float32), np.zeros(3, np.float32), np.ones(3, np.float32)]
    kl.set_weights(new)
    ours.set_weights(new)
    for k, o in zip(kheld, held):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(k), o)


# ---- build -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(8, 3), (8, 7), (2, 4, 3)])
def test_build_on_a_built_layer_raises_and_keeps_the_weights(shape):
    layer = trained()
    before = layer.get_weights()
    with pytest.raises(ValueError, match=r"already built \(inputs of 2 dimensions, 3 channels on axis -1\).*"
                                         rf"got input_shape {re.escape(str(shape))}"):
        layer.build(shape)
    assert_weights(layer, before)
    assert layer.num_features == 3 and layer.built
    assert layer(np.ones((4, 3), np.float32)).shape == (4, 3)


def test_keras_refuses_a_second_build_too(keras):
    for shape in [(8, 3), (8, 7)]:
        kl = keras.layers.BatchNormalization()
        kl.build((8, 3))
        with pytest.raises(ValueError):
            kl.build(shape)
        layer = BatchNormalization()
        layer.build((8, 3))
        with pytest.raises(ValueError, match="already built"):
            layer.build(shape)


# ---- empty batches with virtual batches ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((0, 4, 3), -1), ((0, 3, 4), 1), ((0, 2, 3, 4), 2), ((0, 2, 2, 2, 3), -1)])
@pytest.mark.parametrize("renorm", [False, True])
def test_empty_batch_with_virtual_batches_at_any_rank(shape, axis, renorm):
    """As at rank 2 and without virtual batches: y and grad_x empty, the parameter gradients 0, the moving
    statistics as they were."""
    layer = BatchNormalization(axis=axis, virtual_batch_size=2, renorm=renorm)
    layer.build((2,) + shape[1:])
    C = shape[axis]
    layer.set_weights([np.arange(C) + 1.0 + k for k in range(len(layer.weights))])
    before = layer.get_weights()
    x = np.zeros(shape, np.float32)
    y = layer(x, training=True)
    assert y.shape == shape and y.dtype == np.float32
    gx = layer.backward(np.zeros(shape, np.float32))
    assert gx.shape == shape
    np.testing.assert_array_equal(layer.grad_gamma, np.zeros(C, np.float32))
    np.testing.assert_array_equal(layer.grad_beta, np.zeros(C, np.float32))
    assert_weights(layer, before)


# ---- bfloat16 inputs ---------------------------------------------------------------------------------------------

def bf16_data(shape):
    """float32 values that bfloat16 holds exactly, and their bfloat16 bits (bn_simd's tagged uint16)."""
    x = (RNG.standard_normal(shape) * 3 + 1).astype(np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32), bits.view(_args.BF16_BITS)


def as_bf16(kind, x32, bits):
    if kind == "bits":
        return bits
    if kind == "ml_dtypes":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        return x32.astype(ml_dtypes.bfloat16)
    torch = pytest.importorskip("torch")
    return torch.tensor(x32).to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["ml_dtypes", "torch", "bits"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "mixed_bfloat16"])
@pytest.mark.parametrize("kwargs", [{}, {"virtual_batch_size": 2}, {"renorm": True}])
def test_bfloat16_inputs_are_computed_in_float32_as_float16_inputs(kind, dtype, kwargs):
    """bfloat16 input (and grad_out) gives the float32 input's results bit for bit, in the layer's dtype, as float16
    input does (Keras: result_type(bfloat16, float32))."""
    x32, bits = bf16_data((8, 4, 3))
    g32, gbits = bf16_data((8, 4, 3))
    ref, layer = BatchNormalization(momentum=0.5, dtype=dtype, **kwargs), BatchNormalization(momentum=0.5, dtype=dtype,
                                                                                             **kwargs)
    want = np.float64 if dtype == "float64" else np.float32
    for training in (True, False):
        expected = ref(x32, training=training)
        y = layer(as_bf16(kind, x32, bits), training=training)
        assert y.dtype == want and expected.dtype == want
        np.testing.assert_array_equal(y, expected)
        np.testing.assert_array_equal(layer.backward(as_bf16(kind, g32, gbits)), ref.backward(g32))
        np.testing.assert_array_equal(layer.grad_gamma, ref.grad_gamma)
        assert_weights(layer, ref.get_weights())
    f16 = BatchNormalization(dtype=dtype)(x32.astype(np.float16), training=True)
    assert f16.dtype == want  # (the same rule for float16)


def test_bfloat16_input_matches_keras(keras):
    import torch
    x32, _ = bf16_data((8, 3))
    for dtype in ("float32", "float64"):
        kl, ours = keras.layers.BatchNormalization(dtype=dtype), BatchNormalization(dtype=dtype)
        yk = kl(torch.tensor(x32).to(torch.bfloat16), training=True)
        y = ours(torch.tensor(x32).to(torch.bfloat16), training=True)
        assert str(yk.dtype) == f"torch.{y.dtype}"
        np.testing.assert_allclose(y, yk.detach().numpy(), rtol=1e-5, atol=1e-5)


# ---- Constant initializers with per-channel values ---------------------------------------------------------------

def constant(value):
    return {"module": "keras.initializers", "class_name": "Constant", "config": {"value": value},
            "registered_name": None}


@pytest.mark.parametrize("value,expected", [([1.0, 2.0, 3.0], [1, 2, 3]), ((4, 5, 6), [4, 5, 6]), ([2.5], [2.5] * 3),
                                            ({"class_name": "__numpy__", "config": {"value": [1.0, 0.5, 2.0],
                                                                                    "dtype": "float64"}}, [1, 0.5, 2]),
                                            (np.array([3.0, 2.0, 1.0]), [3, 2, 1]), (7, [7] * 3)])
def test_constant_initializer_with_per_channel_values(value, expected):
    for arg in ("gamma_initializer", "beta_initializer", "moving_mean_initializer", "moving_variance_initializer"):
        layer = BatchNormalization.from_config({arg: constant(value)})
        layer.build((4, 3))
        np.testing.assert_array_equal(getattr(layer, arg[:-len("_initializer")]), np.array(expected, np.float32))
    layer = BatchNormalization(renorm=True, moving_variance_initializer=constant(value))
    layer.build((4, 3))
    np.testing.assert_array_equal(layer.renorm_stddev, np.sqrt(np.array(expected, np.float32)))


def test_constant_initializer_of_another_length_or_no_numbers_is_refused():
    layer = BatchNormalization(gamma_initializer=constant([1.0, 2.0]))
    for call in (lambda: layer.build((4, 3)), lambda: layer(np.ones((4, 3), np.float32))):
        with pytest.raises(ValueError, match=r"gamma_initializer must be a Constant of 1 or 3 values .*got a Constant "
                                             r"of 2 values"):
            call()
        assert not layer.built and layer.gamma is None and layer.moving_mean is None
    layer.build((4, 2))
    np.testing.assert_array_equal(layer.gamma, [1, 2])
    for bad in ([], [[1.0, 2.0, 3.0]], ["1.0"], None, [True, False, True]):
        with pytest.raises(ValueError, match="beta_initializer must be a Constant of a real number"):
            BatchNormalization(beta_initializer=constant(bad))


@pytest.mark.parametrize("value", [[1.0, 2.0, 3.0], np.array([0.5, 1.5, 2.5]), [4.0]])
def test_constant_initializer_of_a_keras_config(keras, value):
    kl = keras.layers.BatchNormalization(gamma_initializer=keras.initializers.Constant(value),
                                         moving_variance_initializer=keras.initializers.Constant(value))
    ours = BatchNormalization.from_config(kl.get_config())
    kl.build((4, 3))
    ours.build((4, 3))
    for a, b in zip(ours.get_weights(), kl.get_weights()):
        np.testing.assert_array_equal(a, b)


# ---- dtype policies -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mixed_foo", "mixed_float64", "mixed_", "mixed_int8", "mixed_float32"])
def test_unknown_mixed_policies_are_refused(name):
    with pytest.raises(ValueError, match=rf"dtype must be float32, float64 or a Keras mixed policy .*'{name}'"):
        BatchNormalization(dtype=name)
    with pytest.raises(ValueError, match="dtype"):
        BatchNormalization.from_config({"dtype": {"class_name": "DTypePolicy", "config": {"name": name}}})


class FakePolicy:
    """What bn_simd.keras reads of a keras.DTypePolicy: its name (and it has a variable_dtype)."""

    def __init__(self, name, variable_dtype):
        self.name, self.variable_dtype = name, variable_dtype


@pytest.mark.parametrize("name,dtype", [("mixed_float16", np.float32), ("mixed_bfloat16", np.float32),
                                        ("float32", np.float32), ("float64", np.float64)])
def test_policy_objects_and_mixed_policies_round_trip(name, dtype):
    variable = "float32" if name.startswith("mixed_") else name
    for given in (FakePolicy(name, variable), name, {"module": "keras", "class_name": "DTypePolicy",
                                                     "config": {"name": name}}):
        layer = BatchNormalization(dtype=given)
        assert layer.dtype == dtype
        config = layer.get_config()
        assert config["dtype"] == name
        back = BatchNormalization.from_config(config)
        assert back.dtype == dtype and back.get_config() == config
        assert f"dtype={name}," in repr(layer)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        BatchNormalization(dtype=FakePolicy("float16", "float16"))


def test_keras_policies(keras):
    for name, dtype in [("mixed_float16", np.float32), ("mixed_bfloat16", np.float32), ("float64", np.float64)]:
        ours = BatchNormalization(dtype=keras.DTypePolicy(name))
        assert ours.dtype == dtype
        kl = keras.layers.BatchNormalization.from_config(ours.get_config())
        assert kl.dtype_policy.name == name
        assert BatchNormalization.from_config(kl.get_config()).get_config()["dtype"] == name
    for name in ("mixed_foo", "mixed_float64"):
        with pytest.raises(ValueError):
            keras.layers.BatchNormalization(dtype=name)
        with pytest.raises(ValueError, match="dtype"):
            BatchNormalization(dtype=name)


# ---- Keras' call and constructor arguments -------------------------------------------------------------------------

def test_inputs_keyword_as_keras():
    x = RNG.standard_normal((6, 3)).astype(np.float32)
    a, b = BatchNormalization(), BatchNormalization()
    np.testing.assert_array_equal(a(inputs=x, training=True, mask=None), b(x, training=True))
    np.testing.assert_array_equal(a.moving_mean, b.moving_mean)


def test_constructor_takes_keras_default_arguments():
    defaults = dict(beta_regularizer=None, gamma_regularizer=None, beta_constraint=None, gamma_constraint=None,
                    synchronized=False)
    layer = BatchNormalization(axis=1, **defaults)
    assert layer.get_config() == BatchNormalization(axis=1).get_config()
    assert BatchNormalization(synchronized=np.False_).axis == -1
    for k, bad in [("beta_regularizer", "l2"), ("gamma_regularizer", {"class_name": "L2"}),
                   ("beta_constraint", "non_neg"), ("gamma_constraint", "unit_norm"), ("synchronized", True)]:
        with pytest.raises(ValueError, match=rf"{k}=.* is not supported by bn_simd.keras.BatchNormalization"):
            BatchNormalization(**{k: bad})
        with pytest.raises(ValueError, match=k):
            BatchNormalization.from_config({k: bad})


def test_keras_constructor_arguments_are_taken(keras):
    import inspect
    ours = inspect.signature(BatchNormalization).parameters
    theirs = inspect.signature(keras.layers.BatchNormalization.__init__).parameters
    for name, p in theirs.items():
        if name not in ("self", "kwargs"):
            assert name in ours and ours[name].default == p.default, name
    assert list(inspect.signature(keras.layers.BatchNormalization.call).parameters)[1] == "inputs"
    assert list(ours)[:9] == [n for n in theirs if n != "self"][:9]  # (positional order as Keras')


def test_review_edges_policy_default_synchronized_falsy_and_overlapping_held_arrays():
    """A layer pickled before the mixed-policy attribute still prints and configures; synchronized takes Keras'
    false values (0, 0.0, None); set_weights replaces a held array whose elements overlap (a zero-stride view)
    instead of writing into it, and names the entry of a wrong shape."""
    layer = BatchNormalization()
    del layer.__dict__["_policy"]
    assert "float32" in repr(layer) and layer.get_config()["dtype"] == "float32"
    for v in (0, 0.0, None, False, np.False_):
        BatchNormalization(synchronized=v)
    with pytest.raises(ValueError, match="synchronized"):
        BatchNormalization(synchronized=1)
    layer = BatchNormalization()
    layer.build((2, 3))
    layer.moving_mean = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (3,), (0,), writeable=True)
    layer.set_weights([np.ones(3), np.zeros(3), np.array([1.0, 2.0, 3.0]), np.ones(3)])
    np.testing.assert_array_equal(layer.moving_mean, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"weights\[1\] \(beta\).*channels of the layer"):
        layer.set_weights([np.ones(3), np.zeros(4), np.zeros(3), np.ones(3)])
    np.testing.assert_array_equal(layer.moving_mean, [1.0, 2.0, 3.0])



@pytest.mark.parametrize("case", ["mask", "virtual"])
def test_a_first_call_that_raises_leaves_the_layer_unbuilt(case):
    """A call that raises changes nothing, not even the build it started with (as the other Keras layers): the
    next call builds the layer for its own inputs, with the initial weights."""
    x = RNG.standard_normal((4, 3, 5)).astype(np.float32)
    layer = BatchNormalization(**({"virtual_batch_size": 3} if case == "virtual" else {}))
    with pytest.raises(ValueError):
        layer(x, training=True, mask=np.ones((7, 5)) if case == "mask" else None)
    assert not layer.built and layer.get_weights() == [] and layer.gamma is None and layer.moving_mean is None
    other = RNG.standard_normal((6, 7)).astype(np.float32)
    y = layer(other, training=True)
    assert y.shape == (6, 7) and layer.built and [w.shape for w in layer.get_weights()] == [(7,)] * 4
