"""Bad arguments: a clear TypeError/ValueError naming the argument, and nothing changed."""
import numpy as np
import pytest

import bn_simd
from conftest import make


def _state():
    x = make((4, 3, 5, 5), np.float32, seed=70)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    return x, rm, rv


def _call_raises(exc, match, **kw):
    x, rm, rv = _state()
    args = dict(x=x, running_mean=rm, running_var=rv, training=True)
    args.update(kw)
    snapshot = {k: np.array(v, copy=True) for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc, match=match):
        bn_simd.batch_norm(**args)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(args[k], v)
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4, 5, 6, 7)])
def test_wrong_rank(shape):
    _call_raises(ValueError, "x must have 2 to 5 dimensions", x=np.ones(shape, np.float32),
                 running_mean=None, running_var=None)


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_channel_mismatch(name):
    _call_raises(ValueError, f"{name} must have shape \\(3,\\)", **{name: np.ones(4, np.float32)})


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64, np.float16, object])
def test_unsupported_input_dtype(dtype):
    _call_raises(TypeError, "x must have dtype float32 or float64", x=np.ones((4, 3, 2, 2), dtype=dtype))


@pytest.mark.parametrize("dtype", [np.int64, np.complex128, object])
def test_per_channel_wrong_dtype(dtype):
    _call_raises(TypeError, "weight must have a floating-point dtype", weight=np.ones(3, dtype=dtype))


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_bad_eps(eps):
    _call_raises(ValueError, "eps must be a finite number > 0", eps=eps)


@pytest.mark.parametrize("momentum,exc", [(-0.1, ValueError), (1.5, ValueError), ("0.1", TypeError)])
def test_bad_momentum(momentum, exc):
    _call_raises(exc, "momentum", momentum=momentum)


@pytest.mark.parametrize("layout,exc", [("NCWH", ValueError), (1, TypeError)])
def test_bad_layout(layout, exc):
    _call_raises(exc, "layout", layout=layout)


def test_training_with_one_value_per_channel():
    _call_raises(ValueError, "Expected more than 1 value per channel", x=np.ones((1, 3, 1, 1), np.float32))


def test_read_only_running_stats():
    x, rm, rv = _state()
    rv.setflags(write=False)
    with pytest.raises(ValueError, match="running_var must be writeable"):
        bn_simd.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(rm, 0.5)


def test_eval_without_running_stats():
    with pytest.raises(ValueError, match="required when training=False"):
        bn_simd.batch_norm(np.ones((2, 3), np.float32))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda x: np.empty((4, 3, 5, 4), np.float32), ValueError, "out must have shape"),
    (lambda x: np.empty_like(x, dtype=np.float64), TypeError, "out must have dtype"),
    (lambda x: np.empty(x.shape[::-1], np.float32).T, ValueError, "out must be C-contiguous"),
    (lambda x: _readonly(np.empty_like(x)), ValueError, "out must be writeable"),
    (lambda x: [0.0], TypeError, "out must be a numpy.ndarray"),
])
def test_bad_out(bad, exc, match):
    x, rm, rv = _state()
    with pytest.raises(exc, match=match):
        bn_simd.batch_norm(x, rm, rv, training=True, out=bad(x))
    np.testing.assert_array_equal(rm, 0.5)


def _readonly(a):
    a.setflags(write=False)
    return a


def test_out_partially_overlapping_x():
    buf = make((5, 3, 5, 5), np.float32, seed=71)
    x, out = buf[:4], buf[1:]
    before = buf.copy()
    with pytest.raises(ValueError, match="overlaps x partially"):
        bn_simd.batch_norm(x, training=True, out=out)
    np.testing.assert_array_equal(buf, before)


@pytest.mark.parametrize("cls,shape", [(bn_simd.BatchNorm1d, (2, 3, 4, 4)), (bn_simd.BatchNorm2d, (2, 3, 4)),
                                       (bn_simd.BatchNorm3d, (2, 3, 4, 4))])
def test_layer_rank_checks(cls, shape):
    layer = cls(3)
    with pytest.raises(ValueError, match="expects"):
        layer(np.ones(shape, np.float32))
    assert layer.num_batches_tracked == 0


def test_layer_channel_mismatch_changes_nothing():
    layer = bn_simd.BatchNorm2d(3)
    with pytest.raises(ValueError, match="must have 3 channels"):
        layer(np.ones((2, 4, 3, 3), np.float32))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, 0)


@pytest.mark.parametrize("kw,exc", [({"num_features": 0}, ValueError), ({"num_features": 2.5}, TypeError),
                                    ({"num_features": 3, "dtype": np.int32}, TypeError),
                                    ({"num_features": 3, "eps": 0}, ValueError),
                                    ({"num_features": 3, "layout": "NWHC"}, ValueError)])
def test_layer_constructor_validation(kw, exc):
    with pytest.raises(exc):
        bn_simd.BatchNorm(**kw)


def test_backward_shape_mismatch():
    x = make((4, 3, 5, 5), np.float32, seed=72)
    with pytest.raises(ValueError, match="grad_out must have the shape of x"):
        bn_simd.batch_norm_backward(np.ones((4, 3, 5, 4), np.float32), x, np.zeros(3), np.ones(3))
    with pytest.raises(TypeError, match="grad_out must have the dtype of x"):
        bn_simd.batch_norm_backward(x.astype(np.float64), x, np.zeros(3), np.ones(3))


def test_lists_are_accepted_and_int_lists_rejected():
    y = bn_simd.batch_norm([[1.0, 2.0], [3.0, 5.0]], training=True)
    np.testing.assert_allclose(y, [[-1, -1], [1, 1]], atol=1e-5)
    with pytest.raises(TypeError, match="x must have dtype"):
        bn_simd.batch_norm([[1, 2], [3, 4]], training=True)
