"""bn_simd.keras.LayerNormalization, RMSNormalization and GroupNormalization: Keras 3's semantics, against a float64
NumPy statement of Keras' formulas, central differences of it, and Keras itself when it is installed (on its torch
backend; those tests skip without torch or Keras)."""
import numpy as np
import pytest

import bn_simd
from bn_simd.keras import GroupNormalization, LayerNormalization, RMSNormalization
from keras_backend import keras_on_torch
from oracle import central_difference

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


def formula(kind, x, params, axis, epsilon, groups=None):
    """Keras' layer / RMS / group normalization in float64 (its documented formulas). params: {name: array}."""
    x = np.asarray(x, np.float64)
    nd = x.ndim
    if kind == "group":
        a = axis % nd
        xl = np.moveaxis(x, a, -1)
        C = xl.shape[-1]
        xg = xl.reshape(xl.shape[0], -1, groups, C // groups)
        mean = xg.mean(axis=(1, 3), keepdims=True)
        var = ((xg - mean) ** 2).mean(axis=(1, 3), keepdims=True)
        y = ((xg - mean) / np.sqrt(var + epsilon)).reshape(xl.shape)
        y = y * params.get("gamma", 1.0) + params.get("beta", 0.0)
        return np.moveaxis(y, -1, a)
    axes = sorted(a % nd for a in (axis if isinstance(axis, list) else [axis]))
    bshape = [x.shape[d] if d in axes else 1 for d in range(nd)]
    if kind == "rms":
        y = x / np.sqrt((x * x).mean(axis=tuple(axes), keepdims=True) + epsilon)
        return y * np.asarray(params.get("scale", 1.0)).reshape(bshape if "scale" in params else [1] * nd)
    mean = x.mean(axis=tuple(axes), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=tuple(axes), keepdims=True)
    y = (x - mean) / np.sqrt(var + epsilon)
    if "gamma" in params:
        y = y * np.asarray(params["gamma"]).reshape(bshape)
    if "beta" in params:
        y = y + np.asarray(params["beta"]).reshape(bshape)
    return y


def make(kind, axis, dtype=np.float32, groups=None, **kw):
    if kind == "layer":
        return LayerNormalization(axis=axis, dtype=dtype, **kw)
    if kind == "rms":
        return RMSNormalization(axis=axis, dtype=dtype, **kw)
    return GroupNormalization(groups=groups, axis=axis, dtype=dtype, **kw)


def random_weights(layer, rng):
    """Random weights set on the built layer (gamma around 1, beta and scale spread); returns {name: float64}."""
    names = layer._weight_names()
    vals = [rng.uniform(0.5, 1.5, layer._wshape) if n != "beta" else rng.standard_normal(layer._wshape)
            for n in names]
    layer.set_weights([v.astype(layer.dtype) for v in vals])
    return {n: w.astype(np.float64) for n, w in zip(names, layer.get_weights())}


CASES = [  # (kind, shape, axis, groups)
    ("layer", (6, 10), -1, None), ("layer", (2, 3, 4, 6), -1, None), ("layer", (2, 3, 4, 6), [1, 2, 3], None),
    ("layer", (2, 5, 4, 6), 1, None), ("layer", (2, 3, 4, 6), [1, 2], None), ("layer", (3, 4, 5), [0, 2], None),
    ("layer", (2, 3, 4, 6), [-1, 1], None), ("layer", (7,), 0, None), ("layer", (2, 3, 17), [-2, -1], None),
    ("rms", (6, 10), -1, None), ("rms", (2, 5, 4, 6), 1, None), ("rms", (2, 3, 4, 6), [1, 3], None),
    ("rms", (2, 3, 4, 6), [2, 3], None), ("layer", (2, 3, 2, 2), 1, None), ("rms", (2, 3, 2, 2), 1, None),
    ("group", (4, 12), -1, 3), ("group", (2, 5, 5, 8), -1, 4), ("group", (2, 8, 5, 5), 1, 2),
    ("group", (2, 3, 6, 5), 2, 3), ("group", (2, 4, 3, 2, 6), -1, -1), ("group", (2, 6, 7), 1, 1),
]


@pytest.mark.parametrize("kind,shape,axis,groups", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_matches_keras_formula(kind, shape, axis, groups, dtype):
    rng = np.random.default_rng(0)
    layer = make(kind, axis, dtype, groups)
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    layer.build(shape)
    params = random_weights(layer, rng)
    y = layer(x)
    ref = formula(kind, x, params, axis, layer.epsilon, layer.groups if kind == "group" else None)
    assert y.shape == x.shape and y.dtype == dtype and y.flags.c_contiguous
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(y, ref, rtol=8 * eps, atol=16 * eps * np.abs(ref).max())


@pytest.mark.parametrize("kind,shape,axis,groups", [c for c in CASES if np.prod(c[1]) <= 150])
def test_gradients_match_central_differences(kind, shape, axis, groups):
    rng = np.random.default_rng(1)
    layer = make(kind, axis, np.float64, groups)
    x = rng.standard_normal(shape) * 2 + 1
    layer.build(shape)
    params = random_weights(layer, rng)
    g = rng.standard_normal(shape)
    G = layer.groups if kind == "group" else None
    layer(x)
    gx = layer.backward(g)
    loss = lambda xv: float((formula(kind, xv, params, axis, layer.epsilon, G) * g).sum())  # noqa: E731
    np.testing.assert_allclose(gx, central_difference(loss, x), rtol=1e-6, atol=1e-7)
    for n in params:
        def loss_p(v, n=n):
            return float((formula(kind, x, {**params, n: v}, axis, layer.epsilon, G) * g).sum())
        np.testing.assert_allclose(getattr(layer, "grad_" + n), central_difference(loss_p, params[n]), rtol=1e-6,
                                   atol=1e-7, err_msg=n)


def test_without_center_or_scale():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 8)).astype(np.float32)
    for cls, kw in ((LayerNormalization, {}), (GroupNormalization, {"groups": 2})):
        layer = cls(center=False, **kw)
        y = layer(x)
        assert [n for n in ("gamma", "beta") if getattr(layer, n) is not None] == ["gamma"]
        layer.backward(np.ones_like(y))
        assert layer.grad_gamma.shape == (8,) and layer.grad_beta is None
        layer = cls(scale=False, center=False, **kw)
        assert layer.get_weights() == [] and np.isfinite(layer(x)).all()
        layer.backward(np.ones_like(y))
        assert layer.grad_gamma is None and layer.grad_beta is None


def test_inputs_computed_in_float32_and_returned_in_the_layer_dtype():
    x = np.arange(24, dtype=np.int64).reshape(2, 12)
    y = LayerNormalization()(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, formula("layer", x, {}, -1, 1e-3), rtol=1e-6, atol=1e-6)
    y16 = GroupNormalization(groups=3)(x.astype(np.float16))
    assert y16.dtype == np.float32
    assert LayerNormalization(dtype="float64")(x.astype(np.float32)).dtype == np.float64
    assert LayerNormalization(dtype="mixed_bfloat16").get_config()["dtype"] == "mixed_bfloat16"


def test_threads_give_the_same_bits():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 40, 9, 33)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    for layer in (LayerNormalization(axis=[1, 3]), GroupNormalization(groups=3, axis=2), RMSNormalization(axis=1)):
        outs = []
        for nt in (1, 2):
            old = bn_simd.get_num_threads()
            bn_simd.set_num_threads(nt)
            try:
                outs.append((layer(x), layer.backward(g)))
            finally:
                bn_simd.set_num_threads(old)
        for a, b in zip(*outs):
            assert np.array_equal(a, b)


def test_refused_arguments_name_themselves():
    with pytest.raises(TypeError, match="axis"):
        LayerNormalization(axis=1.0)
    with pytest.raises(TypeError, match="axis"):
        RMSNormalization(axis=[])
    with pytest.raises(ValueError, match="rms_scaling"):
        LayerNormalization(rms_scaling=True)
    with pytest.raises(ValueError, match="gamma_regularizer"):
        LayerNormalization(gamma_regularizer="l2")
    with pytest.raises(ValueError, match="epsilon"):
        RMSNormalization(epsilon=0.0)
    with pytest.raises(ValueError, match="groups"):
        GroupNormalization(groups=0)
    with pytest.raises(TypeError, match="groups"):
        GroupNormalization(groups=True)
    with pytest.raises(ValueError, match="gamma_initializer"):
        GroupNormalization(gamma_initializer="glorot_uniform")
    x = np.ones((2, 6, 4), np.float32)
    for layer, what in ((LayerNormalization(axis=3), "axis"), (LayerNormalization(axis=[1, -2]), "once"),
                        (GroupNormalization(groups=3), "groups"), (GroupNormalization(groups=2, axis=0), "batch"),
                        (GroupNormalization(groups=1), "dimensions")):
        xin = x if what != "dimensions" else np.ones(5, np.float32)
        with pytest.raises(ValueError, match=what):
            layer(xin)
        assert not layer.built


def test_a_failed_call_changes_nothing():
    rng = np.random.default_rng(4)
    layer = LayerNormalization(axis=[1, 2])
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    layer(x)
    gx = layer.backward(g)
    weights = layer.get_weights()
    with pytest.raises(ValueError, match="shape"):
        layer(np.ones((3, 4, 6), np.float32))
    with pytest.raises(ValueError, match="grad_out"):
        layer.backward(g[:2])
    layer.gamma = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="gamma"):
        layer(x)
    layer.set_weights(weights)
    with pytest.raises(ValueError, match=r"weights\[1\] \(beta\)"):
        layer.set_weights([weights[0], np.zeros(20, np.float32)])
    assert all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), weights))
    assert np.array_equal(layer.backward(g), gx)
    with pytest.raises(ValueError, match="already built"):
        layer.build((3, 4, 5))
    with pytest.raises(RuntimeError, match="call first"):
        RMSNormalization().backward(g)


def test_config_round_trip():
    for layer in (LayerNormalization(axis=[1, 2], epsilon=1e-4, center=False, gamma_initializer=2.0, name="ln"),
                  RMSNormalization(axis=1, epsilon=1e-5, dtype="float64"), GroupNormalization(groups=-1, axis=1)):
        again = type(layer).from_config(layer.get_config())
        assert again.get_config() == layer.get_config()
        assert repr(again) == repr(layer)
    with pytest.raises(TypeError, match="momentum"):
        LayerNormalization.from_config({"momentum": 0.9})
    layer = GroupNormalization(groups=-1)
    layer.build((2, 5, 7))
    assert layer.groups == 7 and layer.get_config()["groups"] == 7


# ---- Keras itself ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras():
    return keras_on_torch()


def keras_layer(keras, kind, axis, groups):
    if kind == "layer":
        return keras.layers.LayerNormalization(axis=axis)
    if kind == "rms":
        return keras.layers.RMSNormalization(axis=axis)
    return keras.layers.GroupNormalization(groups=groups, axis=axis)


# Keras 3.15's torch backend itself fails on a layer or RMS norm over axis 1 of rank 4 and over axes [1, 2] or [1, 3]
# of rank 4 (its weights are not broadcast there), and shapes the weights of [-1, 1] in the listed order: those cases
# are checked against the formula above only.
KERAS_FAILS = {("layer", (2, 5, 4, 6), 1), ("layer", (2, 3, 4, 6), (1, 2)), ("layer", (2, 3, 4, 6), (-1, 1)),
               ("rms", (2, 5, 4, 6), 1), ("rms", (2, 3, 4, 6), (1, 3)), ("layer", (2, 3, 2, 2), 1),
               ("rms", (2, 3, 2, 2), 1)}


@pytest.mark.parametrize("kind,shape,axis,groups", [
    c for c in CASES if (c[0], c[1], tuple(c[2]) if isinstance(c[2], list) else c[2]) not in KERAS_FAILS])
def test_matches_keras_3_and_its_autograd(keras, kind, shape, axis, groups):
    import torch
    rng = np.random.default_rng(5)
    kl = keras_layer(keras, kind, axis, groups)
    kl.build(shape)
    ours = type(make(kind, axis, groups=groups)).from_config(kl.get_config())
    ours.build(shape)
    random_weights(ours, rng)
    kl.set_weights(ours.get_weights())
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    ky = kl(xt)
    ky.backward(torch.tensor(g))
    y = ours(x)
    gx = ours.backward(g)
    eps = np.finfo(np.float32).eps
    ky = ky.detach().numpy()
    np.testing.assert_allclose(y, ky, rtol=1e-5, atol=64 * eps * np.abs(ky).max())
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-4, atol=256 * eps * np.abs(xt.grad.numpy()).max())
    for w in kl.weights:
        kg = w.value.grad.numpy()
        np.testing.assert_allclose(getattr(ours, "grad_" + w.name), kg, rtol=1e-4,
                                   atol=64 * eps * np.abs(g).sum() / max(1, kg.size), err_msg=w.name)
    assert [w.name for w in kl.weights] == ours._weight_names()


def test_group_norm_of_a_batch_of_one_with_groups_of_one_value():
    """Keras normalises groups of one value to beta (zero gradients), at any batch size: PyTorch's refusal of a
    single value in all (N C/G S == 1) is not Keras'."""
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    for shape, groups in (((1, 8), -1), ((1, 8), 8), ((1, 1, 1, 8), -1), ((1, 1), 1)):
        layer = GroupNormalization(groups=groups)
        layer.build(shape)
        beta = np.linspace(-1, 1, shape[-1]).astype(np.float32)
        layer.set_weights([np.full(shape[-1], 2.0, np.float32), beta])
        y = layer(x[..., :shape[-1]].reshape(shape))
        np.testing.assert_array_equal(y.reshape(-1), beta)
        gx = layer.backward(np.ones(shape, np.float32))
        assert not gx.any() and not layer.grad_gamma.any()
        np.testing.assert_array_equal(layer.grad_beta, np.ones(shape[-1]))


def test_a_first_call_that_fails_leaves_the_layer_unbuilt():
    class Failing(GroupNormalization):
        def _forward(self, x, params):
            raise ValueError("refused")
    layer = Failing(groups=-1)
    with pytest.raises(ValueError, match="refused"):
        layer(np.ones((2, 6), np.float32))
    assert not layer.built and layer.groups == -1 and layer.get_weights() == [] and layer.gamma is None
    assert GroupNormalization.from_config(layer.get_config()).groups == -1


def test_row_norms_take_other_ranks_with_the_same_normalised_sizes():
    """Keras' layer and RMS norm fix no input rank (group norm does): a built layer takes any rank whose normalised
    axes have the weights' sizes."""
    rng = np.random.default_rng(6)
    for layer in (LayerNormalization(), RMSNormalization(), LayerNormalization(axis=1)):
        layer(rng.standard_normal((2, 3, 4)).astype(np.float32))
        x = rng.standard_normal((5, 4) if layer.axis == -1 else (2, 3, 2, 2)).astype(np.float32)
        kind = "rms" if isinstance(layer, RMSNormalization) else "layer"
        params = {n: w.astype(np.float64) for n, w in zip(layer._weight_names(), layer.get_weights())}
        np.testing.assert_allclose(layer(x), formula(kind, x, params, layer.axis, layer.epsilon), rtol=1e-6,
                                   atol=1e-6)
        assert layer.backward(np.ones_like(x)).shape == x.shape
        with pytest.raises(ValueError, match="sizes the weights"):
            layer(np.ones((2, 5) if layer.axis == -1 else (2, 5, 2), np.float32))
    gn = GroupNormalization(groups=2)
    gn(np.ones((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="3 dimensions"):
        gn(np.ones((2, 4), np.float32))


def test_constant_initializers_of_nested_lists_broadcast_to_the_weights():
    value = [[1.0, 2.0, 3.0, 4.0]] * 3
    layer = LayerNormalization(axis=[1, 2], gamma_initializer={"class_name": "Constant", "config": {"value": value}})
    layer.build((2, 3, 4))
    np.testing.assert_array_equal(layer.gamma, value)
    layer = LayerNormalization(axis=[1, 2], beta_initializer={"class_name": "Constant", "config": {"value": [5.0] * 4}})
    layer.build((2, 3, 4))
    np.testing.assert_array_equal(layer.beta, np.full((3, 4), 5.0))
    bad = LayerNormalization(axis=[1, 2],
                             gamma_initializer={"class_name": "Constant", "config": {"value": [[1.0] * 3]}})
    with pytest.raises(ValueError, match=r"broadcasting to \(3, 4\), got a Constant of shape \(1, 3\)"):
        bad.build((2, 3, 4))
    assert not bad.built
    layer(np.ones((2, 3, 4), np.float32))
    with pytest.raises(TypeError, match="grad_out"):
        layer.backward(None)
    for bad in ([1.0, True], [[1.0, 2.0], [3.0]]):
        with pytest.raises(ValueError, match="gamma_initializer must be a Constant"):
            LayerNormalization(gamma_initializer={"class_name": "Constant", "config": {"value": bad}})


def test_config_of_a_keras_layer_with_an_array_constant(keras):
    value = np.arange(12.0).reshape(3, 4)
    kl = keras.layers.LayerNormalization(axis=[1, 2], gamma_initializer=keras.initializers.Constant(value))
    kl.build((2, 3, 4))
    ours = LayerNormalization.from_config(kl.get_config())
    ours.build((2, 3, 4))
    np.testing.assert_array_equal(ours.gamma, kl.get_weights()[0])


def test_backward_after_a_failed_call_of_another_rank():
    """A call of another rank replans the normalised axes; the backward of the last successful call keeps its own."""
    rng = np.random.default_rng(7)
    layer = LayerNormalization(axis=[1, -1])
    x = rng.standard_normal((2, 3, 5)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    layer(x)
    gx = layer.backward(g)
    gamma = layer.gamma
    layer.gamma = np.ones((3, 4), np.float32)  # (refused after the axes of the rank-4 call, [1, 3], are planned)
    with pytest.raises(ValueError, match="gamma must have shape"):
        layer(np.ones((2, 3, 4, 5), np.float32))
    layer.gamma = gamma
    assert np.array_equal(layer.backward(g), gx)
