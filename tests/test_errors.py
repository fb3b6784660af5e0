"""Bad arguments (the basic set): the right exception, naming the argument, and nothing changed.

The wrong-rank and wrong-dtype tests of the data run every entry point of every registered op (ops.py)."""
import numpy as np
import pytest

import bn_simd
import ops
from conftest import assert_refused, make_input


def _state():
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=70)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    return x, rm, rv


def _raises_and_changes_nothing(exc, match, **overrides):
    """batch_norm(**args) raises exc(match); x, the running statistics and every array argument are unchanged."""
    x, rm, rv = _state()
    args = dict(x=x, running_mean=rm, running_var=rv, training=True)
    args.update(overrides)
    arrays = {k: v for k, v in args.items() if isinstance(v, np.ndarray)}
    snapshot = {k: v.copy() for k, v in arrays.items()}
    with pytest.raises(exc, match=match):
        bn_simd.batch_norm(**args)
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, snapshot[k], err_msg=k)
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [(3,), (2, 3, 4, 5, 6, 7), ()])
def test_wrong_rank_for_the_layout(shape, layout):
    _raises_and_changes_nothing(ValueError, "x must have 2 to 5 dimensions", x=np.ones(shape, np.float32),
                                running_mean=None, running_var=None, layout=layout)


def _bad_ranks(op, ep):
    """A shape of each rank just outside the entry point's: one below the lowest, one above the highest."""
    ranks = ep.ranks or op.ranks
    return [(3,) * (min(ranks) - 1), (1,) * (max(ranks) + 1)]


RANK_CASES = [pytest.param(op, ep, shape, id=f"{op.name}-{ep.name}-rank{len(shape)}")
              for op in ops.OPS if op.supports((4, 3, 5), "NCHW", np.float64)
              for ep in op.entry_points if ep.checked and "x" in ep.reads for shape in _bad_ranks(op, ep)]


@pytest.mark.parametrize("op,ep,shape", RANK_CASES)
def test_wrong_rank_in_every_entry_point(op, ep, shape):
    case = op.case(75, (4, 3, 5), "NCHW", np.float64)
    assert_refused(ep, case.replace(x=np.ones(shape, np.float64)), ValueError, [ep.named("x"), r"dimensions|-D input"])


DTYPE_CASES = [pytest.param(op, ep, arg, dt, id=f"{op.name}-{ep.name}-{arg}-{np.dtype(dt).name}")
               for op in ops.OPS if op.supports((4, 3, 2), "NCHW", np.float32) for ep in op.entry_points if ep.checked
               for arg in ep.reads if op.args[arg] == ops.DATA for dt in (np.int32, np.complex64)]


@pytest.mark.parametrize("op,ep,arg,dtype", DTYPE_CASES)
def test_unsupported_data_dtype_in_every_entry_point(op, ep, arg, dtype):
    case = op.case(76, (4, 3, 2), "NCHW", np.float32)
    assert_refused(ep, case.replace(**{arg: case[arg].astype(dtype)}), TypeError,
                   [ep.named(arg), "float32 or float64"])


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("bad_shape", [(4,), (2,), (3, 1), ()])
def test_per_channel_shape_mismatch(name, bad_shape):
    _raises_and_changes_nothing(ValueError, rf"{name} must have shape \(3,\)", **{name: np.ones(bad_shape, np.float32)})


def test_channel_mismatch_uses_the_layout_channel_axis():
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=71)  # as NHWC it has 5 channels
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
        bn_simd.batch_norm(x, weight=np.ones(3), training=True, layout="NHWC")


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.complex128, np.int16,
                                   object, "U1"])
def test_unsupported_data_dtype_is_a_type_error(dtype):
    _raises_and_changes_nothing(TypeError, "x must have dtype float32 or float64", x=np.ones((4, 3, 2, 2), dtype=dtype))


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("dtype", [np.int64, np.complex128, object])
def test_per_channel_non_float_dtype_is_a_type_error(name, dtype):
    _raises_and_changes_nothing(TypeError, f"{name} must have a floating-point dtype",
                                **{name: np.ones(3, dtype=dtype)})


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf"), -float("inf")])
def test_eps_must_be_finite_and_positive(eps):
    _raises_and_changes_nothing(ValueError, "eps must be a finite number > 0", eps=eps)
    with pytest.raises(ValueError, match="eps"):
        bn_simd.batch_norm_forward(np.ones((4, 3), np.float32), eps=eps)
    with pytest.raises(ValueError, match="eps"):
        bn_simd.BatchNorm1d(3, eps=eps)


@pytest.mark.parametrize("eps", ["1e-5", None, True, [1e-5]])
def test_eps_must_be_a_number(eps):
    _raises_and_changes_nothing(TypeError, "eps must be a real number", eps=eps)


@pytest.mark.parametrize("momentum,exc", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                          ("0.1", TypeError), (True, TypeError), (None, ValueError)])
def test_momentum_is_checked(momentum, exc):
    _raises_and_changes_nothing(exc, "momentum", momentum=momentum)


@pytest.mark.parametrize("layout,exc", [("NCWH", ValueError), ("nchw", ValueError), ("", ValueError), (1, TypeError),
                                        (None, TypeError)])
def test_unknown_layout(layout, exc):
    _raises_and_changes_nothing(exc, "layout", layout=layout)
    with pytest.raises(exc, match="layout"):
        bn_simd.BatchNorm2d(3, layout=layout)


@pytest.mark.parametrize("shape,layout", [((1, 3), "NCHW"), ((1, 3, 1, 1), "NCHW"), ((1, 1, 1, 3), "NHWC"),
                                          ((1, 3, 1), "NCHW"), ((1, 3), "NHWC")])
def test_training_with_one_value_per_channel(shape, layout):
    x = np.ones(shape, np.float32)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn_simd.batch_norm(x, rm, rv, training=True, layout=layout)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn_simd.batch_norm_forward(x, layout=layout)
    layer = bn_simd.BatchNorm(3, layout=layout)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(x)
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)
    np.testing.assert_array_equal(layer.running_mean, 0.0)


def test_running_stats_must_come_together():
    x, rm, _ = _state()
    with pytest.raises(ValueError, match="together"):
        bn_simd.batch_norm(x, rm, None, training=True)
    np.testing.assert_array_equal(rm, 0.5)


def test_eval_needs_running_stats():
    with pytest.raises(ValueError, match="required when training=False"):
        bn_simd.batch_norm(np.ones((2, 3), np.float32))


def test_read_only_running_stats_are_rejected_before_any_update():
    x, rm, rv = _state()
    rv.setflags(write=False)
    with pytest.raises(ValueError, match="running_var must be writeable"):
        bn_simd.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(rm, 0.5)


def test_running_stats_must_be_arrays_to_be_updated_in_place():
    x, _, rv = _state()
    with pytest.raises(TypeError, match="running_mean must be a numpy.ndarray"):
        bn_simd.batch_norm(x, [0.5, 0.5, 0.5], rv, training=True)
    np.testing.assert_array_equal(rv, 2.0)


def test_backward_argument_checks():
    x = make_input((4, 3, 5, 5), "NCHW", np.float32, seed=72)
    v = np.ones(3)
    with pytest.raises(ValueError, match="grad_out must have the shape of x"):
        bn_simd.batch_norm_backward(np.ones((4, 3, 5, 4), np.float32), x, v, v)
    with pytest.raises(TypeError, match="grad_out must have the dtype of x"):
        bn_simd.batch_norm_backward(x.astype(np.float64), x, v, v)
    with pytest.raises(TypeError, match="save_mean and save_invstd"):
        bn_simd.batch_norm_backward(x, x, None, v)
    with pytest.raises(ValueError, match=r"save_invstd must have shape \(3,\)"):
        bn_simd.batch_norm_backward(x, x, v, np.ones(4))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        bn_simd.batch_norm_backward(x, x, v, v, np.ones(2))


def test_step_argument_checks():
    x = make_input((4, 3, 5), "NCHW", np.float32, seed=73)
    v = np.ones(3)
    with pytest.raises(TypeError, match="mean and var"):
        bn_simd.normalize(x, None, v)
    with pytest.raises(TypeError, match="mean must be an array"):
        bn_simd.backward_reduce(x, x, None)
    with pytest.raises(TypeError, match="d must be an array"):
        bn_simd.backward_apply(x, x, v, v, v, None)
    with pytest.raises(ValueError, match=r"a must have shape \(3,\)"):
        bn_simd.backward_apply(x, x, v, np.ones(5), v, v)


# ---- layers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("cls,bad_ranks", [(bn_simd.BatchNorm1d, (4, 5)), (bn_simd.BatchNorm2d, (2, 3, 5)),
                                           (bn_simd.BatchNorm3d, (2, 3, 4))])
def test_layer_rank_checks(cls, bad_ranks, layout):
    layer = cls(3, layout=layout)
    for rank in bad_ranks:
        shape = (2,) * (rank - 1) + (3,) if layout == "NHWC" else (2, 3) + (2,) * (rank - 2)
        with pytest.raises(ValueError, match="expects"):
            layer(np.ones(shape, np.float32))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, 0.0)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_layer_channel_mismatch_changes_nothing(layout):
    layer = bn_simd.BatchNorm2d(3, layout=layout)
    shape = (2, 4, 3, 3) if layout == "NCHW" else (2, 3, 3, 4)
    with pytest.raises(ValueError, match="must have 3 channels"):
        layer(np.ones(shape, np.float32))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, 0.0)
    np.testing.assert_array_equal(layer.running_var, 1.0)


@pytest.mark.parametrize("kw,exc", [
    ({"num_features": 0}, ValueError), ({"num_features": -2}, ValueError), ({"num_features": 2.5}, TypeError),
    ({"num_features": True}, TypeError), ({"num_features": "3"}, TypeError),
    ({"num_features": 3, "dtype": np.int32}, TypeError), ({"num_features": 3, "dtype": np.float16}, TypeError),
    ({"num_features": 3, "eps": 0}, ValueError), ({"num_features": 3, "momentum": 2.0}, ValueError),
    ({"num_features": 3, "layout": "NWHC"}, ValueError)])
def test_layer_constructor_validation(kw, exc):
    with pytest.raises(exc):
        bn_simd.BatchNorm(**kw)


@pytest.mark.parametrize("attr,value", [("weight", np.ones(4, np.float32)), ("bias", np.ones(3, np.int32)),
                                        ("running_mean", np.ones(2, np.float32)), ("running_var", [1.0, 1.0, 1.0])])
def test_layer_with_a_broken_attribute_fails_before_changing_state(attr, value):
    layer = bn_simd.BatchNorm2d(3)
    layer.running_mean[:] = 0.25
    setattr(layer, attr, value)
    x = make_input((2, 3, 4, 4), "NCHW", np.float32, seed=74)
    with pytest.raises((ValueError, TypeError), match=attr):
        layer(x)
    assert layer.num_batches_tracked == 0
    if attr != "running_mean":
        np.testing.assert_array_equal(layer.running_mean, 0.25)
    if attr != "running_var":
        np.testing.assert_array_equal(layer.running_var, 1.0)


def test_failed_calls_leave_running_stats_untouched():
    """A sweep over failing calls: none of them may touch the running statistics."""
    x, rm, rv = _state()
    bad_calls = [
        dict(x=x.astype(np.int32)), dict(weight=np.ones(4)), dict(bias=np.ones(3, np.int8)), dict(eps=0.0),
        dict(momentum=-1.0), dict(layout="NWC"), dict(out=np.zeros((4, 3, 5, 4), np.float32)),
        dict(out=np.zeros((4, 3, 5, 5), np.float64)), dict(x=np.ones((1, 3), np.float32)),
        dict(x=np.ones((4, 2, 5, 5), np.float32)),
    ]
    for kw in bad_calls:
        args = dict(x=x, running_mean=rm, running_var=rv, weight=None, bias=None, training=True)
        args.update(kw)
        with pytest.raises((TypeError, ValueError)):
            bn_simd.batch_norm(**args)
        np.testing.assert_array_equal(rm, 0.5, err_msg=str(kw))
        np.testing.assert_array_equal(rv, 2.0, err_msg=str(kw))


def test_flags_of_several_values_are_refused_before_anything_is_written():
    """training and unbiased_running_var as arrays of several values (bool() refuses them): TypeError naming the
    argument, raised before the normalise writes out= (the masked, virtual-batch and renorm paths converted the flag
    only at their running-statistics update, after y was written)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    flag = np.array([1, 0])
    calls = [
        lambda a, rm, rv: bn_simd.virtual_batch_norm(a, rm, rv, training=True, out=a, virtual_batch_size=2,
                                                     unbiased_running_var=flag),
        lambda a, rm, rv: bn_simd.batch_norm(a, rm, rv, training=True, out=a, mask=np.ones((4, 2, 2), bool),
                                             unbiased_running_var=flag),
        lambda a, rm, rv: bn_simd.batch_renorm(a, rm, rv, training=True, out=a, running_std=np.ones(3, np.float32),
                                               renorm_mean=np.zeros(3, np.float32),
                                               renorm_std=np.ones(3, np.float32), unbiased_running_var=flag),
        lambda a, rm, rv: bn_simd.batch_norm(a, rm, rv, training=flag, out=a),
    ]
    for call in calls:
        a, rm, rv = x.copy(), np.zeros(3, np.float32), np.ones(3, np.float32)
        with pytest.raises(TypeError, match="unbiased_running_var|training"):
            call(a, rm, rv)
        assert np.array_equal(a, x) and not rm.any() and (rv == 1).all()


def test_a_layers_flag_reassigned_to_an_array_is_refused_before_anything_is_written():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    for make, kw in ((lambda: bn_simd.BatchNorm2d(3), {"mask": np.ones((4, 2, 2), bool)}),
                     (lambda: bn_simd.BatchNorm2d(3, virtual_batch_size=2), {}),
                     (lambda: bn_simd.BatchNorm2d(3, renorm=True), {})):
        layer = make()
        layer.unbiased_running_var = np.array([1, 0])
        a = x.copy()
        with pytest.raises(TypeError, match="unbiased_running_var must be a bool"):
            layer(a, out=a, **kw)
        assert np.array_equal(a, x) and not layer.running_mean.any() and layer.num_batches_tracked == 0
        layer.eval()
        layer(x)  # (read only in an update: eval takes any value, as momentum's)
