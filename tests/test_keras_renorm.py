"""bn_simd.keras.BatchNormalization with renorm= and virtual_batch_size=: Keras' semantics and meanings.

Against the float64 oracles of test_renorm.py (Keras' renorm formula and its five moving statistics, Keras'
momentum convention) and test_virtual_batches.py (Keras 2's ghost-batch grouping), with the channel axis moved last
for them; Keras 3's own test cases for renorm, translated; and Keras 3's layer itself (torch backend) for the
forward, the gradients, the weights' order and the config.
"""
import numpy as np
import pytest

from bn_simd.keras import BatchNormalization
from conftest import assert_within, tol
from keras_backend import keras_on_torch
from oracle import central_difference
from test_renorm import KerasRenorm, fd_grads
from test_virtual_batches import keras_ghost, keras_ghost_loss_grad

# Keras' torch backend converts its variables through __array__ without NumPy 2's copy keyword (Keras' own warning)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

RENORM_WEIGHTS = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
CLIPPING = {"rmax": 1.3, "rmin": 0.8, "dmax": 0.4}


def last(a, axis):
    """The oracles' (N, ..., C) form: the channel axis moved last."""
    return np.moveaxis(np.asarray(a, np.float64), axis, -1)


def values_per_channel(shape, axis):
    return int(np.prod(shape)) // shape[axis]


def random_weights(rng, C, renorm=True):
    """gamma, beta, moving_mean, moving_variance (+ moving_stddev, renorm_mean, renorm_stddev) away from defaults."""
    mv = rng.uniform(0.5, 2.0, C)
    w = [rng.uniform(0.5, 1.5, C), rng.standard_normal(C), rng.standard_normal(C) * 0.3, mv]
    return w + [np.sqrt(mv), rng.standard_normal(C) * 0.3, rng.uniform(0.7, 1.5, C)] if renorm else w


def oracle_for(layer, weights, virtual_batch_size=None):
    C = weights[0].shape[0]
    o = KerasRenorm(C, momentum=layer.momentum, renorm_momentum=layer.renorm_momentum, eps=layer.epsilon,
                    clipping=layer.renorm_clipping, virtual_batch_size=virtual_batch_size, gamma=weights[0],
                    beta=weights[1])
    for name, w in zip(RENORM_WEIGHTS, weights[2:]):
        setattr(o, name, np.asarray(w, np.float64))
    return o


def assert_weights(layer, oracle, bound):
    for name in RENORM_WEIGHTS:
        assert_within(getattr(layer, name), getattr(oracle, name), bound, name)


# ---- renorm against the float64 oracle ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((8, 3), -1), ((6, 4, 3), -1), ((6, 3, 5), 1), ((3, 2, 4, 5), 2),
                                        ((3, 2, 2, 4), 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clipping", [None, CLIPPING])
def test_renorm_steps_match_keras_formula(shape, axis, dtype, clipping):
    """Three training steps (y and the five moving statistics, Keras' momenta 0.8 and 0.9), then inference."""
    rng = np.random.default_rng(1)
    C, n = shape[axis], values_per_channel(shape, axis)
    layer = BatchNormalization(axis=axis, momentum=0.8, renorm=True, renorm_clipping=clipping, renorm_momentum=0.9,
                               dtype=dtype)
    layer.build(shape)
    w = [np.asarray(a, dtype) for a in random_weights(rng, C)]
    layer.set_weights(w)
    oracle = oracle_for(layer, w)
    for step in range(3):
        x = (rng.standard_normal(shape) * (1 + step) + step).astype(dtype)
        y = layer(x, training=True)
        assert y.dtype == dtype and y.shape == shape
        y_ref = np.moveaxis(oracle(last(x, axis), "NHWC")[0], -1, axis)
        assert_within(y, y_ref, tol(dtype, n) * 8 * (1 + np.abs(y_ref)), f"y at step {step}")
    assert_weights(layer, oracle, tol(dtype, n) * 16)
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    y_ref = np.moveaxis(oracle(last(x, axis), "NHWC", training=False)[0], -1, axis)
    assert_within(layer(x, training=False), y_ref, tol(dtype, n) * 8 * (1 + np.abs(y_ref)), "inference y")


def test_clipping_is_active_in_the_tested_steps():
    """The steps above clip: in the (6, 4, 3) case, r and d without clipping leave [rmin, rmax] and [-dmax, dmax]
    (the moving statistics, which the corrections use, do not depend on the clipping)."""
    rng = np.random.default_rng(1)
    w = random_weights(rng, 3)
    oracle = oracle_for(BatchNormalization(momentum=0.8, renorm=True, renorm_momentum=0.9), w)
    rs, ds = [], []
    for step in range(3):
        x = (rng.standard_normal((6, 4, 3)) * (1 + step) + step).astype(np.float32)
        r, d, _, _ = oracle(x, "NHWC")[1]
        rs.append(r)
        ds.append(d)
    assert ((np.array(rs) > CLIPPING["rmax"]) | (np.array(rs) < CLIPPING["rmin"])).any()
    assert (np.abs(np.array(ds)) > CLIPPING["dmax"]).any()


class MaskedKerasRenorm(KerasRenorm):
    """The renorm oracle with Keras 3's masked moments: mean and biased variance of the unmasked positions."""

    def __init__(self, *args, mask, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask = mask

    def stats(self, xl):
        C = xl.shape[-1]
        sel = xl[np.broadcast_to(self.mask, xl.shape[:-1])]
        mean = sel.mean(axis=0) if len(sel) else np.zeros(C)
        var = ((sel - mean) ** 2).mean(axis=0) if len(sel) else np.zeros(C)
        return xl.reshape(1, -1, C), mean[None], var[None]


@pytest.mark.parametrize("mshape", [(6, 4), (6, 1), (1, 4)])
def test_masked_renorm_matches_keras_formula(mshape):
    rng = np.random.default_rng(2)
    shape = (6, 4, 3)
    layer = BatchNormalization(renorm=True, renorm_clipping=CLIPPING, momentum=0.8, renorm_momentum=0.9,
                               dtype=np.float64)
    layer.build(shape)
    w = random_weights(rng, 3)
    layer.set_weights(w)
    for step in range(3):
        x = rng.standard_normal(shape) * 2 + step
        mask = rng.random(mshape) < 0.6
        mask.flat[0] = True
        o = MaskedKerasRenorm(3, momentum=0.8, renorm_momentum=0.9, eps=1e-3, clipping=CLIPPING, gamma=w[0],
                              beta=w[1], mask=mask)
        for name in RENORM_WEIGHTS:
            setattr(o, name, getattr(layer, name).copy())
        y = layer(x, training=True, mask=mask)
        assert_within(y, o(x, "NHWC")[0], tol(np.float64, 24) * 8 * (1 + np.abs(y)), f"y at step {step}")
        assert_weights(layer, o, tol(np.float64, 24) * 16)


def test_fully_masked_batch_updates_with_keras_zero_moments():
    """Keras' masked moments of nothing are mean 0, variance 0: renorm's s_B = sqrt(epsilon) enters the updates."""
    layer = BatchNormalization(renorm=True, momentum=0.5, renorm_momentum=0.5, dtype=np.float64)
    x = np.random.default_rng(3).standard_normal((4, 2))
    layer(x, training=True, mask=np.zeros(4, bool))
    s = np.sqrt(1e-3)
    assert_within(layer.moving_mean, np.zeros(2), 0.0)
    assert_within(layer.moving_stddev, np.full(2, 0.5 + 0.5 * s), 1e-15)
    assert_within(layer.renorm_stddev, np.full(2, 0.5 + 0.5 * s), 1e-15)
    assert_within(layer.moving_variance, np.full(2, (0.5 + 0.5 * s) ** 2 - 1e-3), 1e-15)


def test_one_value_per_channel_gives_the_correction_d():
    """A rank-1 input (C channels of one value): s_B = sqrt(epsilon), x̂ = 0, y = d gamma + beta."""
    layer = BatchNormalization(axis=0, renorm=True, dtype=np.float64)
    layer.build((3,))
    w = random_weights(np.random.default_rng(4), 3)
    layer.set_weights(w)
    x = np.array([1.0, -2.0, 0.5])
    y = layer(x, training=True)
    s = np.maximum(w[6], np.sqrt(1e-3))
    assert_within(y, (x - w[5]) / s * w[0] + w[1], 1e-14 * (1 + np.abs(y)))


# ---- virtual batches against the float64 oracles -----------------------------------------------------------------

VIRTUAL_CASES = [((8, 3), -1, 2), ((8, 3, 5), 1, 4), ((8, 5, 3), -1, 2), ((6, 2, 4, 3), 2, 3), ((4, 3, 2, 2), 1, 1),
                 ((32, 2, 3), -1, 16)]


@pytest.mark.parametrize("shape,axis,v", VIRTUAL_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_virtual_batches_match_keras_grouping(shape, axis, v, dtype):
    """Keras 2's ghost batches: y per virtual batch; moving = moving m + mean_g(batch_g) (1 - m), biased variance."""
    rng = np.random.default_rng(5)
    C, n = shape[axis], values_per_channel(shape, axis) // (shape[0] // v)
    layer = BatchNormalization(axis=axis, momentum=0.7, virtual_batch_size=v, dtype=dtype)
    layer.build(shape)
    w = [np.asarray(a, dtype) for a in random_weights(rng, C, renorm=False)]
    layer.set_weights(w)
    mm, mv = (np.asarray(a, np.float64) for a in w[2:])
    for step in range(2):
        x = (rng.standard_normal(shape) * 2 + step).astype(dtype)
        y_ref, mean, var = keras_ghost(last(x, axis), v, w[0], w[1], 1e-3, "NHWC")
        y = layer(x, training=True)
        assert y.dtype == dtype and y.shape == shape
        y_ref = np.moveaxis(y_ref, -1, axis)
        assert_within(y, y_ref, tol(dtype, n) * 8 * (1 + np.abs(y_ref)), f"y at step {step}")
        mm, mv = mm * 0.7 + mean.mean(0) * 0.3, mv * 0.7 + var.mean(0) * 0.3
    assert_within(layer.moving_mean, mm, tol(dtype, n) * 16, "moving_mean")
    assert_within(layer.moving_variance, mv, tol(dtype, n) * 16 * (1 + mv), "moving_variance")
    x = (rng.standard_normal((5,) + shape[1:])).astype(dtype)  # inference: any batch size, the moving statistics
    y_ref = (last(x, axis) - mm) / np.sqrt(mv + 1e-3) * w[0] + w[1]
    assert_within(layer(x), np.moveaxis(y_ref, -1, axis), tol(dtype, n) * 8 * (1 + np.abs(y_ref.max())), "eval")


@pytest.mark.parametrize("shape,axis,v", VIRTUAL_CASES)
def test_renorm_with_virtual_batches_matches_keras(shape, axis, v):
    rng = np.random.default_rng(6)
    C, n = shape[axis], values_per_channel(shape, axis) // (shape[0] // v)
    if v == 1 and n == 1:
        pytest.skip("one value per channel in a virtual batch")
    layer = BatchNormalization(axis=axis, momentum=0.8, renorm=True, renorm_clipping=CLIPPING, renorm_momentum=0.9,
                               virtual_batch_size=v)
    layer.build(shape)
    w = [np.asarray(a, np.float32) for a in random_weights(rng, C)]
    layer.set_weights(w)
    oracle = oracle_for(layer, w, virtual_batch_size=v)
    for step in range(3):
        x = (rng.standard_normal(shape) * (1 + step) + step).astype(np.float32)
        y_ref = np.moveaxis(oracle(last(x, axis), "NHWC")[0], -1, axis)
        assert_within(layer(x, training=True), y_ref, tol(np.float32, n) * 8 * (1 + np.abs(y_ref)), f"y {step}")
    assert_weights(layer, oracle, tol(np.float32, n) * 16)


def test_whole_batch_as_one_virtual_batch_is_the_plain_layer():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 4, 3)).astype(np.float32) * 3 + 1
    g = rng.standard_normal((6, 4, 3)).astype(np.float32)
    for renorm in (False, True):
        a = BatchNormalization(axis=1, renorm=renorm, momentum=0.5)
        b = BatchNormalization(axis=1, renorm=renorm, momentum=0.5, virtual_batch_size=6)
        ya, yb = a(x, training=True), b(x, training=True)
        assert_within(yb, ya, tol(np.float32, 18) * 8 * (1 + np.abs(ya)), "y")
        assert_within(b.backward(g), a.backward(g), tol(np.float32, 18) * 64, "grad_x")
        for wa, wb in zip(a.get_weights(), b.get_weights()):
            assert_within(wb, wa, tol(np.float32, 18) * 16, "weights")


# ---- backward against float64 finite differences of the oracles --------------------------------------------------

@pytest.mark.parametrize("shape,axis", [((4, 2, 3), 1), ((4, 3, 2), -1), ((4, 2, 2, 2), 2)])
@pytest.mark.parametrize("v", [None, 2])
def test_renorm_backward_matches_finite_differences(shape, axis, v):
    """grad_x, grad_gamma, grad_beta with r and d constants (Keras' stop_gradient)."""
    rng = np.random.default_rng(8)
    C = shape[axis]
    layer = BatchNormalization(axis=axis, renorm=True, renorm_clipping={"rmax": 1.1, "rmin": 0.9, "dmax": 0.1},
                               virtual_batch_size=v, dtype=np.float64)
    layer.build(shape)
    w = random_weights(rng, C)
    layer.set_weights(w)
    x = rng.standard_normal(shape) * 2 + 0.5
    g = rng.standard_normal(shape)
    layer(x, training=True)
    gx = layer.backward(g)
    dx, dw, db, _, _ = fd_grads(last(x, axis), last(g, axis), w[0], w[1], w[5], w[6], layer.renorm_clipping, 1e-3,
                                "NHWC", v)
    assert_within(gx, np.moveaxis(dx, -1, axis), 1e-7 * (1 + np.abs(gx)), "grad_x")
    assert_within(layer.grad_gamma, dw, 1e-7 * (1 + np.abs(dw)), "grad_gamma")
    assert_within(layer.grad_beta, db, 1e-7 * (1 + np.abs(db)), "grad_beta")


@pytest.mark.parametrize("shape,axis", [((4, 2, 3), 1), ((4, 3, 2), -1), ((4, 2, 2, 2), 2)])
def test_virtual_backward_matches_finite_differences(shape, axis):
    rng = np.random.default_rng(9)
    C = shape[axis]
    layer = BatchNormalization(axis=axis, virtual_batch_size=2, dtype=np.float64)
    layer.build(shape)
    w = random_weights(rng, C, renorm=False)
    layer.set_weights(w)
    x = rng.standard_normal(shape) * 2 + 0.5
    g = rng.standard_normal(shape)
    layer(x, training=True)
    gx = layer.backward(g)
    dx, dw, db = keras_ghost_loss_grad(last(x, axis), last(g, axis), 2, w[0], 1e-3, "NHWC")
    assert_within(gx, np.moveaxis(dx, -1, axis), 1e-7 * (1 + np.abs(gx)), "grad_x")
    assert_within(layer.grad_gamma, dw, 1e-7 * (1 + np.abs(dw)), "grad_gamma")
    assert_within(layer.grad_beta, db, 1e-7 * (1 + np.abs(db)), "grad_beta")


def test_masked_renorm_backward_matches_finite_differences():
    """Through the unmasked entries' statistics; gamma's gradient r x̂ + d summed over every entry."""
    rng = np.random.default_rng(10)
    shape, mask = (5, 3, 2), rng.random((5, 3)) < 0.6
    mask[0, 0] = True
    layer = BatchNormalization(renorm=True, renorm_clipping={"dmax": 0.2}, dtype=np.float64, center=False)
    layer.build(shape)
    w = random_weights(rng, 2)
    w = [w[0]] + w[2:]
    layer.set_weights(w)
    x, g = rng.standard_normal(shape) + 1, rng.standard_normal(shape)
    layer(x, training=True, mask=mask)
    gx = layer.backward(g)
    assert layer.grad_beta is None
    r, d = layer._saved[5], layer._saved[6]

    def loss(xx, gamma):
        o = MaskedKerasRenorm(2, eps=1e-3, gamma=gamma, mask=mask)
        o.corrections = lambda mean, var: (r, d)   # (stop_gradient)
        return np.sum(g * o(xx, "NHWC")[0])

    dx = central_difference(lambda a: loss(a, w[0]), x)
    dw = central_difference(lambda a: loss(x, a), w[0])
    assert_within(gx, dx, 1e-7 * (1 + np.abs(dx)), "grad_x")
    assert_within(layer.grad_gamma, dw, 1e-7 * (1 + np.abs(dw)), "grad_gamma")


# ---- Keras 3's own renorm test cases (batch_normalization_test.py), translated -----------------------------------

@pytest.mark.parametrize("shape,clipping", [((2, 3), None), ((2, 4, 4, 3), {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0})])
def test_renorm_basics(shape, clipping):
    layer = BatchNormalization(center=True, scale=True, renorm=True, renorm_clipping=clipping)
    y = layer(np.random.default_rng(11).standard_normal(shape).astype(np.float32), training=True)
    assert y.shape == shape
    assert len(layer.trainable_weights) == 2 and len(layer.non_trainable_weights) == 5


@pytest.mark.parametrize("clipping,match", [({"random_key": 1.0}, "random_key"), ({"rmax": 0.0, "rmin": 1.0}, "rmax"),
                                            ({"rmax": 1.0, "dmax": -1.0}, "dmax")])
def test_renorm_invalid_clipping_keys(clipping, match):
    with pytest.raises(ValueError, match=match):
        BatchNormalization(renorm=True, renorm_clipping=clipping)


def test_renorm_stddev_initializer():
    layer = BatchNormalization(renorm=True, moving_variance_initializer={"class_name": "Constant",
                                                                         "config": {"value": 4.0}})
    layer.build((2, 5))
    np.testing.assert_array_equal(layer.moving_stddev, np.full(5, 2.0, np.float32))
    np.testing.assert_array_equal(layer.renorm_stddev, np.full(5, 2.0, np.float32))
    np.testing.assert_array_equal(layer.renorm_mean, np.zeros(5, np.float32))


def test_renorm_inference():
    rng = np.random.default_rng(12)
    bn, bn_renorm = BatchNormalization(), BatchNormalization(renorm=True)
    bn.build((4, 10))
    bn_renorm.build((4, 10))
    w = [rng.standard_normal(10).astype(np.float32) for _ in range(3)] + [rng.uniform(0.5, 2, 10).astype(np.float32)]
    bn.set_weights(w)
    bn_renorm.set_weights(w + bn_renorm.get_weights()[4:])
    x = rng.standard_normal((4, 10)).astype(np.float32)
    np.testing.assert_array_equal(bn_renorm(x, training=False), bn(x, training=False))
    frozen = BatchNormalization(renorm=True, trainable=False)   # frozen: inference even with training=True
    frozen.build((4, 10))
    frozen.set_weights(bn_renorm.get_weights())
    np.testing.assert_array_equal(frozen(x, training=True), bn(x, training=False))
    np.testing.assert_array_equal(frozen.get_weights()[2], w[2])


def test_renorm_correctness():
    rng = np.random.default_rng(1337)
    eps, momentum, renorm_momentum = 1e-3, 0.9, 0.8
    layer = BatchNormalization(axis=-1, epsilon=eps, momentum=momentum, renorm=True, renorm_momentum=renorm_momentum,
                               dtype=np.float64)
    layer.build((3, 3))
    mm, mv = rng.normal(0.0, 1.0, 3), np.abs(rng.normal(1.0, 0.5, 3))
    rm, rs = rng.normal(0.0, 1.0, 3), np.abs(rng.normal(1.0, 0.5, 3))
    gamma, beta = rng.normal(1.0, 0.1, 3), rng.normal(0.0, 0.1, 3)
    layer.set_weights([gamma, beta, mm, mv, np.sqrt(mv), rm, rs])
    x = np.array([[4.0, 6.0, 2.0], [8.0, -2.0, 5.0], [6.0, 4.0, 3.0]])
    bm, bv = x.mean(0), x.var(0)
    bs = np.sqrt(bv + eps)
    r, d = bs / rs, (bm - rm) / rs
    bound = 1e-14 * 16
    assert_within(layer(x, training=True), ((x - bm) / bs * r + d) * gamma + beta, bound, "y")
    assert_within(layer.renorm_mean, rm * renorm_momentum + bm * (1 - renorm_momentum), bound, "renorm_mean")
    assert_within(layer.renorm_stddev, rs * renorm_momentum + bs * (1 - renorm_momentum), bound, "renorm_stddev")
    assert_within(layer.moving_mean, mm * momentum + bm * (1 - momentum), bound, "moving_mean")
    ms = np.sqrt(mv) * momentum + bs * (1 - momentum)
    assert_within(layer.moving_stddev, ms, bound, "moving_stddev")
    assert_within(layer.moving_variance, ms ** 2 - eps, bound, "moving_variance")


# ---- weights, config, errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False), (False, False)])
def test_weights_in_keras_order_with_renorm(center, scale):
    layer = BatchNormalization(renorm=True, center=center, scale=scale)
    layer.build((2, 3))
    names = (["gamma"] if scale else []) + (["beta"] if center else []) + list(RENORM_WEIGHTS)
    assert all(a is getattr(layer, k) for a, k in zip(layer.weights, names)) and len(layer.weights) == len(names)
    new = [np.full(3, i + 1.0, np.float32) for i in range(len(names))]
    layer.set_weights(new)
    for a, b in zip(layer.get_weights(), new):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=f"list of {len(names)} arrays"):
        layer.set_weights(new[:4])


def test_config_round_trips_the_new_arguments():
    layer = BatchNormalization(axis=1, momentum=0.9, renorm=True, renorm_clipping={"rmax": 2.0, "dmax": None},
                               renorm_momentum=0.7, virtual_batch_size=4)
    cfg = layer.get_config()
    assert {k: cfg[k] for k in ("renorm", "renorm_clipping", "renorm_momentum", "virtual_batch_size")} == {
        "renorm": True, "renorm_clipping": {"rmax": 2.0, "dmax": None}, "renorm_momentum": 0.7,
        "virtual_batch_size": 4}
    again = BatchNormalization.from_config(cfg)
    assert again.get_config() == cfg
    plain = BatchNormalization().get_config()
    assert (plain["renorm"], plain["renorm_clipping"], plain["renorm_momentum"]) == (False, None, 0.99)
    assert "virtual_batch_size" not in plain  # (Keras 3 has no such key: its from_config takes the dict)
    assert BatchNormalization.from_config(dict(plain, virtual_batch_size=None)).virtual_batch_size is None


@pytest.mark.parametrize("clipping", [None, [], 0, (), ""], ids=repr)
def test_a_false_clipping_is_no_clipping_as_in_keras(clipping):
    layer = BatchNormalization(renorm=True, renorm_clipping=clipping)
    assert layer.renorm_clipping == {} and layer.get_config()["renorm_clipping"] == {}
    x = np.random.default_rng(3).standard_normal((16, 3)).astype(np.float32) * 3 + 1
    np.testing.assert_array_equal(np.asarray(layer(x, training=True)),
                                  np.asarray(BatchNormalization(renorm=True, renorm_clipping={})(x, training=True)))


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"renorm": 1}, TypeError, "renorm"),
    ({"renorm": True, "renorm_clipping": np.ones(3)}, TypeError, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": [1.0]}, TypeError, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": {"rmax": "2"}}, TypeError, "rmax"),
    ({"renorm_momentum": 1.5}, ValueError, "renorm_momentum"),
    ({"renorm_momentum": None}, TypeError, "renorm_momentum"),
    ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size"),
    ({"virtual_batch_size": 2.0}, TypeError, "virtual_batch_size"),
    ({"virtual_batch_size": True}, TypeError, "virtual_batch_size"),
    ({"virtual_batch_size": 2, "axis": 0}, ValueError, "axis"),
])
def test_bad_arguments_are_refused(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BatchNormalization(**kwargs)


def test_failed_calls_change_nothing():
    rng = np.random.default_rng(13)
    layer = BatchNormalization(renorm=True, virtual_batch_size=4, momentum=0.5)
    layer.build((8, 3))
    layer.set_weights([np.asarray(a, np.float32) for a in random_weights(rng, 3)])
    before = layer.get_weights()
    x = rng.standard_normal((8, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        layer(x[:6], training=True)                     # 6 samples: not a multiple of 4
    with pytest.raises(ValueError, match="mask"):
        layer(x, training=True, mask=np.ones(8, bool))  # ghost batches take no mask
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchNormalization(virtual_batch_size=1)(x, training=True)
    layer.renorm_clipping = {"rmax": 0.5, "rmin": 1.0}  # (reassigned after construction: checked at the call)
    with pytest.raises(ValueError, match="rmax"):
        layer(x, training=True)
    layer.renorm_clipping, layer.renorm_momentum = CLIPPING, -0.5
    with pytest.raises(ValueError, match="renorm_momentum"):
        layer(x, training=True)
    square = BatchNormalization(axis=1)
    square.build((4, 4))
    square.virtual_batch_size, square.axis = 2, 0       # (reassigned: the channels on the batch axis)
    with pytest.raises(ValueError, match="batch axis"):
        square(np.ones((4, 4), np.float32), training=True)
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert layer._saved is None
    with pytest.raises(ValueError, match="axis"):
        BatchNormalization(axis=-2, virtual_batch_size=2).build((4, 3))   # axis -2 of a rank-2 input is axis 0


# ---- against Keras 3 itself ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras():
    k = keras_on_torch()
    import inspect
    if "renorm" not in inspect.signature(k.layers.BatchNormalization.__init__).parameters:
        pytest.skip("this Keras has no renorm")
    return k


@pytest.mark.parametrize("shape,axis,mshape", [((8, 4, 3), -1, None), ((6, 3, 5), 1, None), ((3, 2, 4, 5), 2, None),
                                               ((6, 4, 3), -1, (6, 4)), ((2, 3, 4, 5, 2), 0, None)])
def test_renorm_matches_keras_3(keras, shape, axis, mshape):
    """y, grad_x, grad_gamma, grad_beta over three training steps, the seven weights, inference."""
    import torch
    rng = np.random.default_rng(14)
    kw = dict(axis=axis, renorm=True, renorm_clipping=CLIPPING, renorm_momentum=0.9, momentum=0.8)
    kl, ours = keras.layers.BatchNormalization(**kw), BatchNormalization(**kw)
    kl.build(shape)
    ours.build(shape)
    kl.set_weights([np.asarray(a, np.float32) for a in random_weights(rng, shape[axis])])
    ours.set_weights(kl.get_weights())
    n = values_per_channel(shape, axis)
    for step in range(3):
        x = (rng.standard_normal(shape) * (1 + step) + step).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        mask = None if mshape is None else rng.random(mshape) < 0.7
        xt = torch.tensor(x, requires_grad=True)
        kl.gamma.value.grad = kl.beta.value.grad = None
        yk = kl(xt, training=True, mask=None if mask is None else torch.tensor(mask))
        yk.backward(torch.tensor(g))
        yk = yk.detach().numpy()
        y = ours(x, training=True, mask=mask)
        gx = ours.backward(g)
        assert_within(y, yk, tol(np.float32, n) * 16 * (1 + np.abs(yk)), f"y at step {step}")
        assert_within(gx, xt.grad.numpy(), tol(np.float32, n) * 64 * (1 + np.abs(gx)), "grad_x")
        gsum = tol(np.float32, n) * np.abs(g).sum() / shape[axis] * 4
        assert_within(ours.grad_gamma, kl.gamma.value.grad.numpy(), gsum, "grad_gamma")
        assert_within(ours.grad_beta, kl.beta.value.grad.numpy(), gsum, "grad_beta")
    for a, b, name in zip(ours.get_weights(), kl.get_weights(), ("gamma", "beta") + RENORM_WEIGHTS):
        assert_within(a, b, tol(np.float32, n) * 8 * (1 + np.abs(b)), name)
    x = rng.standard_normal(shape).astype(np.float32)
    yk = keras.ops.convert_to_numpy(kl(x, training=False))
    assert_within(ours(x, training=False), yk, tol(np.float32, n) * 16 * (1 + np.abs(yk)), "inference y")


def test_config_and_weights_of_a_keras_renorm_layer(keras):
    """A Keras layer's config with renorm keys loads; built, it has Keras' seven initial weights in Keras' order;
    ours round-trips into Keras."""
    kl = keras.layers.BatchNormalization(axis=1, momentum=0.9, renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 2.0},
                                         renorm_momentum=0.7, center=False,
                                         moving_variance_initializer=keras.initializers.Constant(4.0),
                                         moving_mean_initializer=keras.initializers.Constant(0.5))
    ours = BatchNormalization.from_config(kl.get_config())
    assert (ours.renorm, ours.renorm_clipping, ours.renorm_momentum) == (True, {"rmax": 3.0, "dmax": 2.0}, 0.7)
    kl.build((2, 3, 4))
    ours.build((2, 3, 4))
    assert [w.path.split("/")[-1] for w in kl.weights] == ours._weight_names()
    for a, b in zip(ours.get_weights(), kl.get_weights()):
        np.testing.assert_array_equal(a, b)
    back = keras.layers.BatchNormalization.from_config(ours.get_config())  # (no virtual_batch_size key: Keras 3's)
    assert (back.renorm, back.renorm_clipping, back.renorm_momentum, back.axis) == (True, ours.renorm_clipping, 0.7, 1)
    plain = keras.layers.BatchNormalization()
    assert BatchNormalization.from_config(plain.get_config()).renorm is False


@pytest.mark.parametrize("kwargs", [{"renorm": True}, {"virtual_batch_size": 2},
                                    {"renorm": True, "virtual_batch_size": 2}])
def test_empty_batch_changes_nothing_and_has_zero_parameter_gradients(kwargs):
    layer = BatchNormalization(**kwargs)
    layer.build((4, 3))
    before = layer.get_weights()
    x = np.zeros((0, 3), np.float32)
    assert layer(x, training=True).shape == (0, 3)
    assert layer.backward(x).shape == (0, 3)
    np.testing.assert_array_equal(layer.grad_gamma, np.zeros(3, np.float32))
    np.testing.assert_array_equal(layer.grad_beta, np.zeros(3, np.float32))
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_virtual_batch_size_larger_than_the_batch():
    """tf-keras' test_basic_batchnorm_v2_input_shape_and_virtual_batch_size: a batch of 1 with virtual_batch_size=8
    runs in inference (the batch is not split) and is refused in training."""
    layer = BatchNormalization(virtual_batch_size=8)
    x = np.ones((1, 28, 28), np.float32)
    np.testing.assert_allclose(layer(x), np.full(x.shape, 1 / np.sqrt(1 + 1e-3)), rtol=2 * np.finfo(np.float32).eps)
    before = layer.get_weights()
    with pytest.raises(ValueError, match="virtual_batch_size"):
        layer(x, training=True)
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_renorm_clipping_is_checked_only_with_renorm_and_kept_as_given():
    """As Keras 3: without renorm the clipping is stored unchecked (a Keras config with renorm=False and any
    clipping loads); with renorm it is checked, at construction and at a training call after renorm is turned on."""
    clip = {"rmax": 0.5, "rmin": 1.0}
    layer = BatchNormalization(renorm=False, renorm_clipping=clip)
    assert layer.get_config()["renorm_clipping"] == clip
    assert BatchNormalization.from_config(layer.get_config()).renorm_clipping == clip
    with pytest.raises(ValueError, match="rmax >= rmin"):
        BatchNormalization(renorm=True, renorm_clipping=clip)


@pytest.mark.parametrize("kw", [dict(momentum=10 ** 400), dict(renorm=True, renorm_momentum=10 ** 400)])
def test_momenta_beyond_floats_range_are_value_errors_naming_them(kw):
    with pytest.raises(ValueError, match=f"{next(iter(kw.keys() - {'renorm'}))} must be in \\[0, 1\\], got an integer"):
        BatchNormalization(**kw)
