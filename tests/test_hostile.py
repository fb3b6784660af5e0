"""Hostile inputs: every bad argument must be refused cleanly, every odd-but-valid one must give the oracle's answer.

Two kinds of case:

* must raise -- ``test_bad_call_raises_and_changes_nothing``: each case builds its arguments, the call must raise
  TypeError or ValueError (RuntimeError for ``backward`` before ``forward``) whose message names the argument,
  and every array involved (x, weight, bias, running statistics, out, grad_out, the buffers views were cut
  from) must be byte-for-byte what it was, as must a layer's whole state (the arrays, their identity,
  num_batches_tracked, the mode, the saved forward). A layer that refused a call must still work afterwards.
* must succeed -- the rest of the file: odd memory layouts, empty tensors, non-finite and huge values, unaligned
  buffers, ...: the result is compared with the float64 oracle in oracle.py within the bounds of conftest,
  and the inputs that are not outputs must be unchanged.
"""
import fractions
import math

import numpy as np
import pytest

import bn_simd
import oracle as ref
import half_cases
import ops
from conftest import (assert_forward_close, assert_refused, assert_within, backward_bounds, channel_params,
                      forward_bound, make_input, past_line, stat_tol)

F32, F64 = np.float32, np.float64


# ---- snapshots ------------------------------------------------------------------------------------------------

def _snapshot(arrays):
    """name -> (array, dtype, shape, strides, raw bytes) for every ndarray in `arrays`."""
    return {k: (v, v.dtype, v.shape, v.strides, v.copy().tobytes())
            for k, v in arrays.items() if isinstance(v, np.ndarray)}


def _assert_unchanged(snap):
    for k, (v, dtype, shape, strides, raw) in snap.items():
        assert v.dtype == dtype and v.shape == shape and v.strides == strides, f"{k}: metadata changed"
        assert v.tobytes() == raw, f"{k} was modified by a call that raised"


def _layer_state(layer):
    """Everything a failed call must leave as it was (array identity included: no silent replacement)."""
    st = {}
    for k in ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias"):
        v = getattr(layer, k)
        st[k] = v if not isinstance(v, np.ndarray) else (id(v), v.dtype, v.shape, v.tobytes())
    for k in ("num_batches_tracked", "training", "eps", "momentum", "num_features", "affine",
              "track_running_stats", "layout"):
        st[k] = getattr(layer, k)
    saved = layer._saved
    st["_saved"] = None if saved is None else (id(saved),) + tuple(
        (id(s), s.tobytes()) if isinstance(s, np.ndarray) else s for s in saved)
    return st


def _assert_layer_unchanged(layer, before):
    after = _layer_state(layer)
    for k in before:
        assert after[k] == before[k], f"layer.{k} changed by a call that raised"


# ---- oracle checks for calls that succeed --------------------------------------------------------------------

def _n(shape, layout):
    return ref.reduction_size(tuple(shape), layout)


def _check_train(y, x, w, b, eps, layout, stats=None, momentum=0.1):
    """y against the oracle; stats = (rm0, rv0, rm, rv): running statistics before and after."""
    x64 = np.asarray(x, dtype=F64)
    assert isinstance(y, np.ndarray) and y.shape == x64.shape
    assert_forward_close(y, x64, w, b, eps, layout)
    if stats is not None:
        rm0, rv0, rm, rv = stats
        _, mean, var = ref.forward_train(x64, layout=layout)
        n = _n(x64.shape, layout)
        rm_ref, rv_ref = ref.update_running(rm0, rv0, mean, var, n, momentum)
        assert_within(rm, rm_ref, stat_tol(n, rm.dtype) * (np.abs(rm_ref) + np.sqrt(var) + 1), "running_mean")
        assert_within(rv, rv_ref, 4 * stat_tol(n, rv.dtype) * np.abs(rv_ref), "running_var")


def _check_eval(y, x, rm, rv, w, b, eps, layout):
    x64 = np.asarray(x, dtype=F64)
    y_ref = ref.inference(x64, rm, rv, w, b, eps, layout)
    bound = forward_bound(x64, np.asarray(y).dtype, _n(x64.shape, layout), w, b, eps, layout, mean=rm, var=rv,
                          batch_stats=False)
    assert_within(y, y_ref, bound, "eval y")


def _check_backward(res, dy, x, mean, invstd, w, layout, training, dtype):
    dx, gw, gb = res
    dx_ref, gw_ref, gb_ref = ref.backward(np.asarray(dy, F64), np.asarray(x, F64), mean, invstd, w, layout, training)
    dxb, gwb, gbb = backward_bounds(np.asarray(dy, F64), np.asarray(x, F64), mean, invstd, w, layout, training, dtype)
    assert_within(dx, dx_ref, dxb, "grad_x")
    assert_within(gw, gw_ref, gwb, "grad_weight")
    assert_within(gb, gb_ref, gbb, "grad_bias")


# ---- standard arguments ---------------------------------------------------------------------------------------

def _std(dtype=F32, layout="NCHW", C=3):
    """A valid training call: x (4, C, 5, 5) in `layout`, running statistics, weight, bias, a separate out."""
    x = make_input((4, C, 5, 5), layout, dtype, seed=11, loc=0.5, scale=2.0)
    rm = np.linspace(-0.5, 1.0, C).astype(dtype)
    rv = np.linspace(0.5, 2.0, C).astype(dtype)
    w, b = channel_params(C, dtype, seed=12)
    return dict(x=x, running_mean=rm, running_var=rv, weight=w, bias=b, training=True,
                out=np.full(x.shape, 7.0, dtype))


def _read_only(a):
    a.setflags(write=False)
    return a


def _layer_input(layer, dtype=F32, seed=21):
    """A valid input for `layer` (its class's rank, its layout, its channels)."""
    C = layer.num_features
    spatial = {bn_simd.BatchNorm1d: (5,), bn_simd.BatchNorm2d: (3, 3), bn_simd.BatchNorm3d: (2, 3, 3)}.get(
        type(layer), (3, 3))
    return make_input((4, C) + spatial, layer.layout, dtype, seed=seed, loc=1.0, scale=1.5)


def _assert_layer_still_works(layer):
    """After a refused call the layer computes what a fresh layer with its state would compute."""
    x = _layer_input(layer, seed=22)
    if layer.training and layer.track_running_stats:
        rm0, rv0, k = layer.running_mean.copy(), layer.running_var.copy(), layer.num_batches_tracked
        y = layer(x)
        momentum = 1.0 / (k + 1) if layer.momentum is None else layer.momentum
        _check_train(y, x, layer.weight, layer.bias, layer.eps, layer.layout,
                     (rm0, rv0, layer.running_mean, layer.running_var), momentum)
        assert layer.num_batches_tracked == k + 1
    elif not layer.track_running_stats:
        y = layer(x)
        _check_train(y, x, layer.weight, layer.bias, layer.eps, layer.layout)
    else:
        y = layer(x)
        _check_eval(y, x, layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps, layer.layout)
    g = make_input(x.shape, "NCHW", x.dtype, seed=23)
    gx = layer.backward(g)
    assert gx.shape == x.shape and np.isfinite(gx).all()


# ================================================================================================================
# Calls that must raise
# ================================================================================================================

CASES = []


def case(case_id, exc, match, layer_follow_up=True):
    """Register a builder: () -> (call, arrays to check, layer or None)."""
    def register(build):
        CASES.append(pytest.param(build, exc, match, layer_follow_up, id=case_id))
        return build
    return register


def _bn(**over):
    """A batch_norm call: the standard arguments with `over` applied."""
    def build():
        args = _std()
        args.update({k: (v() if callable(v) else v) for k, v in over.items()})
        return (lambda: bn_simd.batch_norm(**args)), args, None
    return build


def _register_bn(case_id, exc, match, **over):
    case(case_id, exc, match)(_bn(**over))


# -- rank for the layout --
_register_bn("rank1-NCHW", ValueError, r"x must have 2 to 5 dimensions", x=lambda: np.ones(3, F32), out=None)
_register_bn("rank6-NHWC", ValueError, r"x must have 2 to 5 dimensions",
             x=lambda: np.ones((2, 2, 2, 2, 2, 3), F32), layout="NHWC", out=None)
_register_bn("x-0d-array", ValueError, r"x must have 2 to 5 dimensions", x=lambda: np.array(1.5, F32), out=None)
_register_bn("x-python-scalar", ValueError, r"x must have 2 to 5 dimensions", x=2.5, out=None)
_register_bn("x-python-float-list-rank1", ValueError, r"x must have 2 to 5 dimensions", x=[1.0, 2.0, 3.0],
             out=None)

# -- channel count of the per-channel arrays --
_register_bn("weight-too-long", ValueError, r"weight must have shape \(3,\)", weight=lambda: np.ones(4, F32))
_register_bn("bias-too-short", ValueError, r"bias must have shape \(3,\)", bias=lambda: np.zeros(2, F32))
_register_bn("running_mean-too-long", ValueError, r"running_mean must have shape \(3,\)",
             running_mean=lambda: np.zeros(5, F32))
_register_bn("running_var-too-short", ValueError, r"running_var must have shape \(3,\)",
             running_var=lambda: np.ones(1, F32))
_register_bn("weight-rank2", ValueError, r"weight must have shape \(3,\)", weight=lambda: np.ones((3, 1), F32))
_register_bn("running_var-rank0", ValueError, r"running_var must have shape \(3,\)",
             running_var=lambda: np.array(1.0, F32))
_register_bn("bias-python-scalar", ValueError, r"bias must have shape \(3,\)", bias=0.5)
_register_bn("nhwc-channels-are-last", ValueError, r"running_mean must have shape \(5,\)", layout="NHWC", out=None)

# -- dtypes of the per-channel arrays --
_register_bn("weight-int32", TypeError, "weight must have a floating-point dtype", weight=lambda: np.ones(3, np.int32))
_register_bn("bias-complex", TypeError, "bias must have a floating-point dtype", bias=lambda: np.zeros(3, np.complex128))
_register_bn("running_mean-object", TypeError, "running_mean must have a floating-point dtype",
             running_mean=lambda: np.zeros(3, object))
_register_bn("running_var-str", TypeError, "running_var must have a floating-point dtype",
             running_var=lambda: np.array(["1", "1", "1"]))
_register_bn("weight-bool", TypeError, "weight must have a floating-point dtype", weight=lambda: np.ones(3, bool))
_register_bn("bias-string", TypeError, "bias must have a floating-point dtype", bias="abc")
_register_bn("running_mean-list", TypeError, "running_mean must be a numpy.ndarray", running_mean=[0.0, 0.0, 0.0])

# -- eps --
for _eps, _exc, _id in [(float("nan"), ValueError, "nan"), (float("inf"), ValueError, "inf"),
                        (-float("inf"), ValueError, "-inf"), (0.0, ValueError, "zero"), (-1e-5, ValueError, "negative"),
                        ("1e-5", TypeError, "str"), (None, TypeError, "None"), (1e-5 + 0j, TypeError, "complex"),
                        (True, TypeError, "bool"), (np.array([1e-5]), TypeError, "array")]:
    _register_bn(f"eps-{_id}", _exc, "eps", eps=_eps)
# a Python int too large for a float is a bad value, not an OverflowError
_register_bn("eps-huge-int", ValueError, "eps", eps=10 ** 400)

# -- momentum: [0, 1] (documented); None only on a layer --
for _m, _exc, _id in [(-0.1, ValueError, "negative"), (1.5, ValueError, "above-1"), (float("nan"), ValueError, "nan"),
                      (float("inf"), ValueError, "inf"), ("0.1", TypeError, "str"), (None, ValueError, "None-functional"),
                      (True, TypeError, "bool")]:
    _register_bn(f"momentum-{_id}", _exc, "momentum", momentum=_m)
_register_bn("momentum-huge-int", ValueError, "momentum", momentum=10 ** 400)

# -- layout --
for _l, _exc, _id in [("NCWH", ValueError, "NCWH"), ("nchw", ValueError, "lowercase"), ("", ValueError, "empty"),
                      (None, TypeError, "None"), (b"NCHW", TypeError, "bytes"), (1, TypeError, "int")]:
    _register_bn(f"layout-{_id}", _exc, "layout", layout=_l)

# -- dtype of x --
for _dt, _id in [(np.int32, "int32"), (np.int64, "int64"), (np.bool_, "bool"), (np.complex64, "complex64"),
                 (object, "object"), (np.int16, "int16"), ("U3", "str"), (np.longdouble, "longdouble"),
                 ("M8[s]", "datetime")]:
    _register_bn(f"x-dtype-{_id}", TypeError, "x must have dtype float32 or float64",
                 x=(lambda dt=_dt: np.zeros((4, 3, 5, 5), dt)), out=None)
_register_bn("x-int-list", TypeError, "x must have dtype float32 or float64", x=[[1, 2, 3], [4, 5, 6]], out=None)
_register_bn("x-ragged-list", TypeError, "x must be an array", x=[[1.0, 2.0, 3.0], [4.0]], out=None)
_register_bn("x-None", TypeError, "x must have dtype", x=None, out=None)

# -- one value per channel in training (documented: ValueError, like PyTorch) --
_register_bn("one-value-per-channel-NCHW", ValueError, "Expected more than 1 value per channel",
             x=lambda: np.ones((1, 3, 1, 1), F32), out=None)
_register_bn("one-value-per-channel-NHWC", ValueError, "Expected more than 1 value per channel",
             x=lambda: np.ones((1, 1, 1, 3), F32), layout="NHWC", out=None)
_register_bn("one-value-per-channel-2d", ValueError, "Expected more than 1 value per channel",
             x=lambda: np.ones((1, 3), F64), running_mean=lambda: np.zeros(3), running_var=lambda: np.ones(3),
             weight=None, bias=None, out=None)

# -- running statistics that would be written --
_register_bn("running_mean-read-only", ValueError, "running_mean must be writeable",
             running_mean=lambda: _read_only(np.zeros(3, F32)))
_register_bn("running_var-read-only", ValueError, "running_var must be writeable",
             running_var=lambda: _read_only(np.ones(3, F32)))
_register_bn("running_var-without-mean", ValueError, "running_mean and running_var", running_mean=None)
_register_bn("eval-without-running-stats", ValueError, "running_mean and running_var are required",
             running_mean=None, running_var=None, training=False)

# -- out --
_register_bn("out-wrong-shape", ValueError, "out must have shape", out=lambda: np.zeros((4, 3, 5, 4), F32))
_register_bn("out-wrong-dtype", TypeError, "out must have dtype", out=lambda: np.zeros((4, 3, 5, 5), F64))
_register_bn("out-strided", ValueError, "out must be C-contiguous", out=lambda: np.zeros((4, 3, 5, 10), F32)[..., ::2])
_register_bn("out-fortran", ValueError, "out must be C-contiguous", out=lambda: np.zeros((4, 3, 5, 5), F32, order="F"))
_register_bn("out-read-only", ValueError, "out must be writeable", out=lambda: _read_only(np.zeros((4, 3, 5, 5), F32)))
_register_bn("out-list", TypeError, "out must be a numpy.ndarray", out=lambda: np.zeros((4, 3, 5, 5)).tolist())
_register_bn("out-read-only-eval", ValueError, "out must be writeable", training=False,
             out=lambda: _read_only(np.zeros((4, 3, 5, 5), F32)))


@case("out-partially-overlaps-x", ValueError, "out overlaps x partially")
def _b():
    buf = make_input((5, 3, 5, 5), "NCHW", F32, seed=31)
    args = _std()
    args.update(x=buf[:4], out=buf[1:])
    return (lambda: bn_simd.batch_norm(**args)), dict(args, buf=buf), None


@case("out-overlaps-x-shifted-by-one-element", ValueError, "out overlaps x partially")
def _b():
    buf = np.arange(4 * 3 * 5 * 5 + 1, dtype=F32)
    args = _std()
    args.update(x=buf[:-1].reshape(4, 3, 5, 5), out=buf[1:].reshape(4, 3, 5, 5), training=False)
    return (lambda: bn_simd.batch_norm(**args)), dict(args, buf=buf), None


@case("out-is-fortran-x-itself", ValueError, "out must be C-contiguous")
def _b():
    args = _std()
    x = np.asfortranarray(args["x"])
    args.update(x=x, out=x)
    return (lambda: bn_simd.batch_norm(**args)), args, None


@case("out-is-byteswapped-x-itself", TypeError, "out must be in the machine's byte order")
def _b():
    args = _std()
    x = args["x"].astype(args["x"].dtype.newbyteorder("S"))
    args.update(x=x, out=x)
    return (lambda: bn_simd.batch_norm(**args)), args, None


@case("out-checked-before-running-stats-are-written", ValueError, "out must have shape")
def _b():
    args = _std()
    args.update(out=np.zeros((4, 3, 5, 6), F32), momentum=1.0)
    return (lambda: bn_simd.batch_norm(**args)), args, None


# -- other entry points --
@case("forward-rank1", ValueError, "x must have 2 to 5 dimensions")
def _b():
    x = np.ones(8, F32)
    return (lambda: bn_simd.batch_norm_forward(x)), dict(x=x), None


@case("forward-weight-channels", ValueError, r"weight must have shape \(3,\)")
def _b():
    a = _std()
    return (lambda: bn_simd.batch_norm_forward(a["x"], np.ones(4, F32), a["bias"], out=a["out"])), a, None


@case("forward-one-value-per-channel", ValueError, "Expected more than 1 value per channel")
def _b():
    x, out = np.ones((1, 3, 1), F32), np.zeros((1, 3, 1), F32)
    return (lambda: bn_simd.batch_norm_forward(x, out=out)), dict(x=x, out=out), None


@case("normalize-var-none", TypeError, "mean and var")
def _b():
    a = _std()
    return (lambda: bn_simd.normalize(a["x"], a["running_mean"], None, out=a["out"])), a, None


@case("batch_stats-complex", TypeError, "x must have dtype")
def _b():
    x = np.ones((4, 3, 2), np.complex128)
    return (lambda: bn_simd.batch_stats(x)), dict(x=x), None


def _bwd_args(dtype=F32):
    a = _std(dtype)
    mean, var = bn_simd.batch_stats(a["x"])
    a.update(grad_out=make_input(a["x"].shape, "NCHW", dtype, seed=13), save_mean=mean.astype(dtype),
             save_invstd=(1 / np.sqrt(var + 1e-5)).astype(dtype))
    return a


def _bwd(case_id, exc, match, **over):
    @case(case_id, exc, match)
    def build():
        a = _bwd_args()
        a.update({k: (v(a) if callable(v) else v) for k, v in over.items()})
        call = (lambda: bn_simd.batch_norm_backward(a["grad_out"], a["x"], a["save_mean"], a["save_invstd"],
                                                    a["weight"], out=a["out"]))
        return call, a, None
    return build


_bwd("backward-grad_out-wrong-shape", ValueError, "grad_out must have the shape of x",
     grad_out=lambda a: np.ones((4, 3, 5, 4), F32))
_bwd("backward-grad_out-wrong-dtype", TypeError, "grad_out must have the dtype of x",
     grad_out=lambda a: a["grad_out"].astype(F64))
_bwd("backward-grad_out-int", TypeError, "grad_out must have dtype float32 or float64",
     grad_out=lambda a: np.ones((4, 3, 5, 5), np.int16))
_bwd("backward-grad_out-None", TypeError, "grad_out", grad_out=None)
_bwd("backward-save_mean-too-short", ValueError, r"save_mean must have shape \(3,\)", save_mean=lambda a: np.zeros(2))
_bwd("backward-save_invstd-too-long", ValueError, r"save_invstd must have shape \(3,\)",
     save_invstd=lambda a: np.ones(4))
_bwd("backward-save_mean-and-save_invstd-disagree", ValueError, r"save_invstd must have shape \(3,\)",
     save_mean=lambda a: np.zeros(3), save_invstd=lambda a: np.ones(2))
_bwd("backward-save_invstd-None", TypeError, "save_mean and save_invstd", save_invstd=None)
_bwd("backward-save_mean-int", TypeError, "save_mean must have a floating-point dtype",
     save_mean=lambda a: np.zeros(3, np.int64))
_bwd("backward-weight-wrong-length", ValueError, r"weight must have shape \(3,\)", weight=lambda a: np.ones(6))
_bwd("backward-out-wrong-dtype", TypeError, "out must have dtype", out=lambda a: np.zeros((4, 3, 5, 5), F64))


@case("backward-out-partially-overlaps-grad_out", ValueError, "out overlaps grad_out partially")
def _b():
    a = _bwd_args()
    buf = make_input((5, 3, 5, 5), "NCHW", F32, seed=32)
    a.update(grad_out=buf[1:], out=buf[:4], buf=buf)
    return (lambda: bn_simd.batch_norm_backward(a["grad_out"], a["x"], a["save_mean"], a["save_invstd"],
                                                out=a["out"])), a, None


# -- layers: rank, channels, state --
def _layer_case(case_id, exc, match, make_layer, call, follow_up=True):
    @case(case_id, exc, match, follow_up)
    def build():
        layer = make_layer()
        layer(_layer_input(layer, seed=24))  # some state: running stats moved, a forward saved for backward
        arrays = {}
        return (lambda: call(layer, arrays)), arrays, layer
    return build


def _input(shape, dtype=F32):
    def call(layer, arrays):
        arrays["x"] = x = make_input(shape, "NCHW", dtype, seed=25)
        return layer(x)
    return call


_layer_case("BatchNorm1d-4d", ValueError, "expects 2-D or 3-D input, got 4-D", lambda: bn_simd.BatchNorm1d(3),
            _input((2, 3, 4, 4)))
_layer_case("BatchNorm1d-NHWC-5d", ValueError, "expects 2-D or 3-D input, got 5-D",
            lambda: bn_simd.BatchNorm1d(3, layout="NHWC"), _input((2, 2, 2, 2, 3)))
_layer_case("BatchNorm2d-3d", ValueError, "expects 4-D input, got 3-D", lambda: bn_simd.BatchNorm2d(3),
            _input((2, 3, 4)))
_layer_case("BatchNorm2d-2d", ValueError, "expects 4-D input, got 2-D", lambda: bn_simd.BatchNorm2d(3),
            _input((2, 3)))
_layer_case("BatchNorm3d-4d", ValueError, "expects 5-D input, got 4-D", lambda: bn_simd.BatchNorm3d(3),
            _input((2, 3, 4, 4)))
_layer_case("BatchNorm3d-NHWC-6d", ValueError, "expects 5-D input, got 6-D",
            lambda: bn_simd.BatchNorm3d(3, layout="NHWC"), _input((2, 2, 2, 2, 2, 3)))
_layer_case("BatchNorm-rank1", ValueError, "1-D input", lambda: bn_simd.BatchNorm(3), _input((3,)))
_layer_case("layer-channel-mismatch", ValueError, "x must have 3 channels", lambda: bn_simd.BatchNorm2d(3),
            _input((2, 4, 3, 3)))
_layer_case("layer-NHWC-channel-mismatch", ValueError, "x must have 3 channels on axis -1",
            lambda: bn_simd.BatchNorm2d(3, layout="NHWC"), _input((2, 3, 3, 4)))
_layer_case("layer-x-int", TypeError, "x must have dtype float32 or float64", lambda: bn_simd.BatchNorm2d(3),
            _input((2, 3, 3, 3), np.int32))
_layer_case("layer-x-int16", TypeError, "int16", lambda: bn_simd.BatchNorm2d(3), _input((2, 3, 3, 3), np.int16))
_layer_case("layer-one-value-per-channel", ValueError, "Expected more than 1 value per channel",
            lambda: bn_simd.BatchNorm2d(3), _input((1, 3, 1, 1)))
_layer_case("layer-no-running-stats-eval-one-value", ValueError, "Expected more than 1 value per channel",
            lambda: bn_simd.BatchNorm1d(3, track_running_stats=False).eval(), _input((1, 3)))


def _out_call(make):
    """make(x) -> dict with the x and out to pass (and any buffer they are views of)."""
    def call(layer, arrays):
        arrays.update(make(_layer_input(layer, seed=26)))
        return layer(arrays["x"], out=arrays["out"])
    return call


def _overlapping_pair(x):
    buf = np.empty(x.size + 1, x.dtype)
    buf[:-1] = x.reshape(-1)
    return dict(buf=buf, x=buf[:-1].reshape(x.shape), out=buf[1:].reshape(x.shape))


_layer_case("layer-out-wrong-shape", ValueError, "out must have shape", lambda: bn_simd.BatchNorm2d(3),
            _out_call(lambda x: dict(x=x, out=np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype))))
_layer_case("layer-out-read-only-eval", ValueError, "out must be writeable", lambda: bn_simd.BatchNorm2d(3).eval(),
            _out_call(lambda x: dict(x=x, out=_read_only(np.zeros_like(x)))))
_layer_case("layer-out-partial-overlap", ValueError, "out overlaps x partially", lambda: bn_simd.BatchNorm1d(3),
            _out_call(_overlapping_pair))


def _setattr_call(attr, value, shape=(2, 3, 3, 3)):
    def call(layer, arrays):
        setattr(layer, attr, value)
        arrays["x"] = x = make_input(shape, "NCHW", F32, seed=27)
        return layer(x)
    return call


def _broken_layer_case(case_id, exc, match, attr, value):
    """A public attribute reassigned to a bad value: the layer's own check must refuse the call, before any
    state changes. (The attribute itself is then the bad value, so the follow-up call is not made.)"""
    @case(case_id, exc, match, False)
    def build():
        layer = bn_simd.BatchNorm2d(3)
        layer(_layer_input(layer, seed=24))
        arrays = {}
        if isinstance(value, np.ndarray):
            arrays[attr] = value
        setattr(layer, attr, value)
        return (lambda: layer(_layer_input(layer, seed=27))), arrays, layer
    return build


_broken_layer_case("layer-running_var-reassigned-read-only", ValueError, "running_var must be writeable",
                   "running_var", _read_only(np.ones(3, F32)))
_broken_layer_case("layer-weight-reassigned-wrong-length", ValueError, r"weight must have shape \(3,\)", "weight",
                   np.ones(4, F32))
_broken_layer_case("layer-bias-reassigned-int", TypeError, "bias must have a floating-point dtype", "bias",
                   np.zeros(3, np.int64))
_broken_layer_case("layer-momentum-reassigned-above-1", ValueError, "momentum", "momentum", 1.5)
_broken_layer_case("layer-momentum-reassigned-str", TypeError, "momentum", "momentum", "0.1")
_broken_layer_case("layer-eps-reassigned-negative", ValueError, "eps", "eps", -1.0)


@case("layer-backward-before-forward", RuntimeError, "forward")
def _b():
    layer = bn_simd.BatchNorm2d(3)
    g = np.ones((2, 3, 3, 3), F32)
    return (lambda: layer.backward(g)), dict(g=g), layer


@case("layer-backward-grad-wrong-shape", ValueError, "grad_out must have the shape of x")
def _b():
    layer = bn_simd.BatchNorm2d(3)
    layer(_layer_input(layer, seed=24))
    layer.backward(np.ones((4, 3, 3, 3), F32))  # grad_weight / grad_bias exist and must survive
    g = np.ones((4, 3, 3, 2), F32)
    return (lambda: layer.backward(g)), dict(g=g), layer


@case("layer-backward-grad-wrong-dtype", TypeError, "grad_out must have the dtype of x")
def _b():
    layer = bn_simd.BatchNorm1d(3)
    layer(_layer_input(layer, seed=24))
    g = np.ones((4, 3, 5), F64)
    return (lambda: layer.backward(g)), dict(g=g), layer


@case("layer-backward-grad-complex", TypeError, "grad_out must have dtype")
def _b():
    layer = bn_simd.BatchNorm1d(3)
    layer(_layer_input(layer, seed=24))
    g = np.ones((4, 3, 5), np.complex64)
    return (lambda: layer.backward(g)), dict(g=g), layer


@case("layer-backward-out-wrong-shape", ValueError, "out must have shape")
def _b():
    layer = bn_simd.BatchNorm1d(3)
    layer(_layer_input(layer, seed=24))
    g, out = np.ones((4, 3, 5), F32), np.zeros((4, 3, 6), F32)
    return (lambda: layer.backward(g, out=out)), dict(g=g, out=out), layer


# -- load_state_dict: checked entirely before anything is assigned --
def _load_case(case_id, exc, match, change, make_layer=lambda: bn_simd.BatchNorm2d(3), strict=True):
    @case(case_id, exc, match)
    def build():
        layer = make_layer()
        layer(_layer_input(layer, seed=24))
        sd = layer.state_dict()
        sd["running_mean"] = np.full(3, 9.0, np.float32)  # a valid entry that must not be applied either
        change(sd)
        arrays = {k: v for k, v in sd.items() if isinstance(v, np.ndarray)}
        return (lambda: layer.load_state_dict(sd, strict=strict)), arrays, layer
    return build


_load_case("load-weight-wrong-shape", ValueError, r"weight must have shape \(3,\)", lambda sd: sd.update(weight=np.ones(4)))
_load_case("load-running_var-rank2", ValueError, r"running_var must have shape \(3,\)",
           lambda sd: sd.update(running_var=np.ones((3, 1))))
_load_case("load-non-strict-still-checks-shapes", ValueError, r"bias must have shape \(3,\)",
           lambda sd: sd.update(bias=np.zeros(2)), strict=False)
_load_case("load-weight-int", TypeError, "weight must have a floating-point dtype",
           lambda sd: sd.update(weight=np.ones(3, np.int64)))
_load_case("load-bias-complex", TypeError, "bias must have a floating-point dtype",
           lambda sd: sd.update(bias=np.zeros(3, np.complex64)))
_load_case("load-running_var-strings", TypeError, "running_var must have a floating-point dtype",
           lambda sd: sd.update(running_var=np.array(["1", "2", "3"])))
_load_case("load-missing-key", ValueError, r"missing keys \['bias'\]", lambda sd: sd.pop("bias"))
_load_case("load-extra-key", ValueError, r"unexpected keys \['foo'\]", lambda sd: sd.update(foo=np.ones(3)))
_load_case("load-num_batches_tracked-negative", ValueError, "num_batches_tracked must be >= 0",
           lambda sd: sd.update(num_batches_tracked=np.array(-3)))
_load_case("load-num_batches_tracked-vector", ValueError, "num_batches_tracked",
           lambda sd: sd.update(num_batches_tracked=np.array([1, 2])))
# README: "Wrong types/dtypes raise TypeError"; a float count is a wrong dtype
_load_case("load-num_batches_tracked-float", TypeError, "num_batches_tracked",
           lambda sd: sd.update(num_batches_tracked=np.array(2.0)))
# weight None would be stored as a 0-d NaN array (np.array(None, float32)) and break every later call
_load_case("load-weight-None", TypeError, "weight", lambda sd: sd.update(weight=None))
_load_case("load-affine-state-into-non-affine-layer", ValueError, "unexpected keys",
           lambda sd: sd.update(weight=np.ones(3), bias=np.zeros(3)),
           make_layer=lambda: bn_simd.BatchNorm2d(3, affine=False))


@case("load-not-a-dict", TypeError, "state_dict must be a dict")
def _b():
    layer = bn_simd.BatchNorm2d(3)
    layer(_layer_input(layer, seed=24))
    return (lambda: layer.load_state_dict([("weight", np.ones(3))])), {}, layer


# -- constructor --
@case("layer-num_features-absurd", ValueError, "num_features")
def _b():
    return (lambda: bn_simd.BatchNorm(10 ** 30)), {}, None


@case("layer-momentum-negative", ValueError, "momentum")
def _b():
    return (lambda: bn_simd.BatchNorm2d(3, momentum=-0.5)), {}, None


@case("layer-eps-nan", ValueError, "eps")
def _b():
    return (lambda: bn_simd.BatchNorm2d(3, eps=float("nan"))), {}, None


# -- process-wide settings: a refused value leaves the setting as it was --
def _setting_case(case_id, exc, match, call):
    @case(case_id, exc, match)
    def build():
        bn_simd.set_num_threads(2)
        arrays = {}
        return (lambda: call()), arrays, None
    return build


_setting_case("set_num_threads-0", ValueError, r"\bn must be", lambda: bn_simd.set_num_threads(0))
_setting_case("set_num_threads-negative", ValueError, r"\bn must be", lambda: bn_simd.set_num_threads(-1))
_setting_case("set_num_threads-str", TypeError, r"\bn must be", lambda: bn_simd.set_num_threads("2"))
_setting_case("set_num_threads-float", TypeError, r"\bn must be", lambda: bn_simd.set_num_threads(2.0))
_setting_case("set_num_threads-bool", TypeError, r"\bn must be", lambda: bn_simd.set_num_threads(True))
# the kernels take a C int: a count that cannot be passed on must be refused here, not by every later call
_setting_case("set_num_threads-above-INT_MAX", ValueError, r"\bn\b", lambda: bn_simd.set_num_threads(2 ** 31))
_setting_case("set_isa-bogus", ValueError, "name must be one of", lambda: bn_simd.set_isa("bogus"))
_setting_case("set_isa-uppercase", ValueError, "name must be one of", lambda: bn_simd.set_isa("AVX2"))
_setting_case("set_isa-None", TypeError, "name must be a string", lambda: bn_simd.set_isa(None))


@pytest.mark.parametrize("build,exc,match,follow_up", CASES)
def test_bad_call_raises_and_changes_nothing(build, exc, match, follow_up):
    call, arrays, layer = build()
    snap = _snapshot(arrays)
    before = _layer_state(layer) if layer is not None else None
    threads, isa = bn_simd.get_num_threads(), bn_simd.get_isa()
    with pytest.raises(exc, match=match):
        call()
    _assert_unchanged(snap)
    assert bn_simd.get_num_threads() == threads and bn_simd.get_isa() == isa
    if layer is not None:
        _assert_layer_unchanged(layer, before)
        if follow_up:
            _assert_layer_still_works(layer)
    # the library still works after the refusal
    a = _std()
    y = bn_simd.batch_norm(a["x"], None, None, a["weight"], a["bias"], training=True)
    _check_train(y, a["x"], a["weight"], a["bias"], 1e-5, "NCHW")


def test_there_are_enough_distinct_refusal_cases():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 45


# -- every entry point of every registered op (ops.py): bad arguments derived from the kinds of its arguments --

def _bad_arguments(op, ep):
    """(id, build(case) -> case with one bad argument, exception, regular expressions the message must match) for
    each argument the entry point reads."""
    res = []

    def bad(case_id, exc, patterns, build):
        res.append((case_id, build, exc, patterns))

    for arg in ep.reads:
        name = ep.named(arg)
        if op.args[arg] == ops.DATA:
            bad(f"{arg}-int16", TypeError, [name, "float32 or float64"],
                lambda c, a=arg: c.replace(**{a: c[a].astype(np.int16)}))
            if arg != "x":
                other = {np.dtype(F32): F64, np.dtype(F64): F32}
                bad(f"{arg}-other-float-dtype", TypeError, [name, "dtype of x"],
                    lambda c, a=arg: c.replace(**{a: c[a].astype(other[c.dtype])}))
                bad(f"{arg}-shape-not-x", ValueError, [name, "shape of x"],
                    lambda c, a=arg: c.replace(**{a: np.ascontiguousarray(c[a][..., :-1])}))
        else:
            bad(f"{arg}-one-too-long", ValueError, [name, "shape"],
                lambda c, a=arg: c.replace(**{a: np.ones(c[a].shape[:-1] + (c[a].shape[-1] + 1,), c[a].dtype)}))
            bad(f"{arg}-one-too-short", ValueError, [name, "shape"],
                lambda c, a=arg: c.replace(**{a: np.ascontiguousarray(c[a][..., :-1])}))
            bad(f"{arg}-extra-axis", ValueError, [name, "shape"], lambda c, a=arg: c.replace(**{a: c[a][..., None]}))
            for dt in (np.int64, np.complex128, np.bool_):
                bad(f"{arg}-{np.dtype(dt).name}", TypeError, [name, "floating-point dtype"],
                    lambda c, a=arg, dt=dt: c.replace(**{a: c[a].astype(dt)}))
    for arg in ep.writes:
        bad(f"{arg}-read-only", ValueError, [ep.named(arg), "writeable"], lambda c, a=arg: c.replace(**{a: _read_only(
            c[a].copy())}))
    return res


REFUSAL_SHAPE = (4, 3, 5, 5)


def _registry_refusals():
    """The bad arguments of every checked entry point, each in one of the op's layouts (taken in turn)."""
    res = []
    for op in ops.OPS:
        layouts = [lay for lay in dict.fromkeys(op.layouts.values()) if op.supports(REFUSAL_SHAPE, lay, F32)]
        for ep in op.entry_points if layouts else ():
            if ep.checked:
                for k, (case_id, build, exc, patterns) in enumerate(_bad_arguments(op, ep)):
                    layout = layouts[k % len(layouts)]
                    res.append(pytest.param(op, ep, build, exc, patterns, layout,
                                            id=f"{op.name}-{ep.name}-{case_id}-{layout}"))
    return res


REGISTRY_REFUSALS = _registry_refusals()


@pytest.mark.parametrize("op,ep,build,exc,patterns,layout", REGISTRY_REFUSALS)
def test_every_entry_point_refuses_a_bad_argument_and_changes_nothing(op, ep, build, exc, patterns, layout):
    """One argument of a valid case made bad: the call raises, its message names the argument and says what is
    wrong, and no array (state included) is changed; then the same entry point works on the valid case."""
    case = op.case(11, REFUSAL_SHAPE, layout, F32, loc=0.5, scale=2.0)
    assert_refused(ep, build(case.fresh()), exc, patterns)
    ops.check(ep, case, ep(case.fresh()), " after a refused call")


def test_every_checked_entry_point_has_refusal_cases():
    covered = {(p.values[0].name, p.values[1].name) for p in REGISTRY_REFUSALS}
    for op in ops.OPS:
        if any(op.supports(REFUSAL_SHAPE, lay, F32) for lay in op.layouts):
            for ep in op.entry_points:
                assert not ep.checked or (op.name, ep.name) in covered, f"{op.name}.{ep.name} has no refusal case"


# ================================================================================================================
# Calls that must succeed
# ================================================================================================================

def _train_and_check(x, layout, dtype=None, momentum=0.1, **kw):
    """batch_norm(x) in training: output and running statistics against the oracle, x unchanged."""
    x_arr = np.asarray(x)
    dtype = dtype or (x_arr.dtype if x_arr.dtype.kind == "f" else F64)
    C = ref.num_channels(x_arr.shape, layout)
    rm, rv = np.linspace(-1, 1, C).astype(dtype), np.linspace(0.5, 2, C).astype(dtype)
    w, b = channel_params(C, dtype, seed=41)
    rm0, rv0 = rm.copy(), rv.copy()
    snap = _snapshot(dict(x=x_arr, w=w, b=b))
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, layout=layout, **kw)
    assert isinstance(y, np.ndarray) and y.flags.c_contiguous
    _check_train(y, x_arr, w, b, 1e-5, layout, (rm0, rv0, rm, rv), momentum)
    _assert_unchanged(snap)
    return y


def _eval_and_check(x, layout, dtype=None):
    x_arr = np.asarray(x)
    dtype = dtype or x_arr.dtype
    C = ref.num_channels(x_arr.shape, layout)
    rm, rv = np.linspace(-1, 1, C).astype(dtype), np.linspace(0.5, 2, C).astype(dtype)
    w, b = channel_params(C, dtype, seed=42)
    snap = _snapshot(dict(x=x_arr, rm=rm, rv=rv, w=w, b=b))
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=False, layout=layout)
    _check_eval(y, x_arr, rm, rv, w, b, 1e-5, layout)
    _assert_unchanged(snap)
    return y


def _backward_and_check(x, dy, layout):
    x_arr, dy_arr = np.asarray(x), np.asarray(dy)
    C = ref.num_channels(x_arr.shape, layout)
    w, _ = channel_params(C, F64, seed=43)
    _, mean, var = ref.forward_train(np.asarray(x_arr, F64), layout=layout)
    invstd = 1 / np.sqrt(var + 1e-5)
    snap = _snapshot(dict(x=x_arr, dy=dy_arr, w=w))
    res = bn_simd.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
    _check_backward(res, dy_arr, x_arr, mean, invstd, w, layout, True, x_arr.dtype.newbyteorder("="))
    _assert_unchanged(snap)


# ---- memory layouts that are copied once --------------------------------------------------------------------

def _base(layout, dtype, shape=(4, 6, 5, 7), seed=51):
    return make_input(shape, layout, dtype, seed=seed, loc=-0.5, scale=3.0)


ODD_VIEWS = {
    "fortran": lambda a: np.asfortranarray(a),
    "negative-strides": lambda a: a[::-1, ..., ::-1],
    "channel-axis-reversed": lambda a: a[:, ::-1] if a.ndim and a.shape[1] == 6 else a[..., ::-1],
    "every-other-element": lambda a: np.repeat(a, 2, axis=-1)[..., ::2],
    "interior-of-padded": lambda a: np.pad(a, 1)[tuple(slice(1, -1) for _ in a.shape)],
    "byteswapped": lambda a: a.astype(a.dtype.newbyteorder("S")),
    "byteswapped-fortran": lambda a: np.asfortranarray(a.astype(a.dtype.newbyteorder("S"))),
    "read-only": lambda a: _read_only(a.copy()),
}


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("view", list(ODD_VIEWS))
def test_odd_memory_layouts_match_the_oracle(view, layout, dtype):
    x = ODD_VIEWS[view](_base(layout, dtype))
    assert view in ("read-only", "byteswapped") or not x.flags.c_contiguous
    y = _train_and_check(x, layout, dtype=dtype)
    assert y.dtype == np.dtype(dtype)
    _eval_and_check(x, layout, dtype=dtype)
    dy = ODD_VIEWS[view](_base(layout, dtype, seed=52))
    _backward_and_check(x, dy, layout)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_broadcast_zero_stride_input(layout):
    row = make_input((1, 5, 1, 7) if layout == "NCHW" else (1, 1, 7, 5), "NCHW", F32, seed=53)
    shape = (3, 5, 4, 7) if layout == "NCHW" else (3, 4, 7, 5)
    x = np.broadcast_to(row, shape)
    assert 0 in x.strides and not x.flags.writeable
    _train_and_check(x, layout)
    _eval_and_check(x, layout)
    _backward_and_check(x, np.broadcast_to(np.float32(0.5), shape), layout)


def test_byteswapped_and_strided_running_stats_are_updated_in_place():
    x = _base("NCHW", F32)
    rm = np.zeros(6, ">f8")
    store = np.ones(12, F32)
    rv = store[::2]  # a strided view: the update must land in `store`
    y = bn_simd.batch_norm(x, rm, rv, training=True, momentum=0.3)
    _check_train(y, x, None, None, 1e-5, "NCHW", (np.zeros(6), np.ones(6), rm, rv), 0.3)
    assert rm.dtype == np.dtype(">f8") and np.shares_memory(rv, store)
    np.testing.assert_array_equal(store[1::2], 1.0)


def test_read_only_x_with_every_entry_point():
    x = _read_only(_base("NHWC", F64))
    layer = bn_simd.BatchNorm2d(6, layout="NHWC", dtype=F64)
    y = layer(x)
    _check_train(y, x, None, None, 1e-5, "NHWC")
    g = _read_only(_base("NHWC", F64, seed=54))
    gx = layer.backward(g)
    _, mean, var = ref.forward_train(x, layout="NHWC")
    _check_backward((gx, layer.grad_weight, layer.grad_bias), g, x, mean, 1 / np.sqrt(var + 1e-5), None, "NHWC", True,
                    F64)
    m, v = bn_simd.batch_stats(x, layout="NHWC")
    assert_within(m, mean, stat_tol(x.size // 6, F64) * (np.abs(mean) + np.sqrt(var)), "batch_stats mean")


@pytest.mark.parametrize("training", [True, False])
def test_read_only_running_stats_are_fine_when_nothing_is_written(training):
    """Running statistics are written only in training; in eval a read-only copy (e.g. np.load(mmap_mode='r'))
    must be usable. In training they must be refused (see the refusal cases)."""
    x = _base("NCHW", F32)
    rm, rv = _read_only(np.linspace(-1, 1, 6)), _read_only(np.linspace(0.5, 2, 6))
    snap = _snapshot(dict(x=x, rm=rm, rv=rv))
    if training:
        with pytest.raises(ValueError, match="running_mean must be writeable"):
            bn_simd.batch_norm(x, rm, rv, training=True)
    else:
        y = bn_simd.batch_norm(x, rm, rv, training=False)
        _check_eval(y, x, rm, rv, None, None, 1e-5, "NCHW")
    _assert_unchanged(snap)


# ---- Python objects instead of arrays -------------------------------------------------------------------------

def test_python_lists_are_float64_arrays():
    x = [[1.0, -2.0, 0.5], [3.0, 0.25, -1.0], [0.0, 2.0, 4.5]]
    y = _train_and_check(x, "NCHW", dtype=F64)
    assert y.dtype == F64
    w = [2.0, 1.0, -1.0]
    y = bn_simd.batch_norm(x, None, None, w, [0.0, 1.0, 2.0], training=True, layout="NHWC")
    _check_train(y, np.array(x), np.array(w), np.array([0.0, 1.0, 2.0]), 1e-5, "NHWC")


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_numpy_matrix_is_an_n_by_c_array():
    """An ndarray subclass (here np.matrix, shape (N, C)) is an array like any other -- or at worst a TypeError that
    names x; today it dies inside the Cython dispatch with "No matching signature found"."""
    m = np.matrix([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0], [0.0, 2.0, 4.5]])
    y = bn_simd.batch_norm(m, None, None, None, None, training=True)
    _check_train(np.asarray(y), np.asarray(m), None, None, 1e-5, "NCHW")


def test_a_masked_array_with_masked_entries_is_refused():
    """Its values were read as they are, the mask ignored (statistics over the masked-out entries too): refused,
    pointing at filled() and mask=; a masked array with nothing masked is the array it holds."""
    x = _base("NCHW", F32)
    mask = np.zeros(x.shape, bool)
    mask[0, 0, 0, 0] = True
    with pytest.raises(TypeError, match="x is a masked array with masked entries.*mask="):
        bn_simd.batch_norm(np.ma.masked_array(x, mask), None, None, training=True)
    rm = np.zeros(x.shape[1], F32)
    with pytest.raises(TypeError, match="weight is a masked array"):
        bn_simd.batch_norm(x, rm, np.ones_like(rm), np.ma.masked_array(np.ones_like(rm), rm == 0), training=True)
    np.testing.assert_array_equal(rm, 0)
    y = bn_simd.batch_norm(np.ma.masked_array(x), None, None, training=True)
    np.testing.assert_array_equal(y, bn_simd.batch_norm(x, None, None, training=True))


def test_a_broadcast_view_of_the_wrong_shape_is_refused_before_any_copy():
    """A residual or grad_out given as a zero-stride view of the wrong shape was copied whole before its shape was
    checked (a MemoryError for 2**40 elements, seconds for a GiB): the ValueError names it first."""
    x = np.zeros((4, 6, 8), F32)
    huge = np.broadcast_to(F32(0), (2**40, 1))
    with pytest.raises(ValueError, match=r"residual must have the shape of x \(4, 6, 8\), got \(1099511627776, 1\)"):
        bn_simd.batch_norm(x, np.zeros(6, F32), np.ones(6, F32), residual=huge)
    _, mean, invstd = bn_simd.batch_norm_forward(x + np.arange(8, dtype=F32))
    with pytest.raises(ValueError, match="grad_out must have the shape of x"):
        bn_simd.batch_norm_backward(huge, x, mean, invstd)


def test_statistics_of_other_dtypes_are_stored_silently_under_errstate_raise():
    """The running statistics of a float16 (or strided) array are rounded by NumPy's assignment, which obeyed
    np.errstate(all="raise"): an underflow raised after the kernel wrote out and the running mean, before the running
    variance. They are rounded silently now, as float32 and float64 ones are."""
    x = np.random.default_rng(3).standard_normal((8, 3, 10)).astype(F32)
    x -= x.mean(axis=(0, 2), keepdims=True)  # (channel means of about 1e-9: below float16's range)
    want = [np.full(3, 0.5, np.float16), np.full(3, 5.0, np.float16)]
    bn_simd.batch_norm(x, *want, training=True, momentum=1.0)
    rm, rv = np.full(3, 0.5, np.float16), np.full(3, 5.0, np.float16)
    with np.errstate(all="raise"):
        bn_simd.batch_norm(x, rm, rv, training=True, momentum=1.0)
    np.testing.assert_array_equal(rm, want[0])
    np.testing.assert_array_equal(rv, want[1])
    assert not np.array_equal(rv, 5.0)


def test_numeric_scalar_types_for_eps_and_momentum():
    x = _base("NCHW", F32)
    for eps, momentum in [(np.float32(1e-3), np.float64(0.25)), (fractions.Fraction(1, 1000), fractions.Fraction(1, 4)),
                          (1, 1), (np.int64(1), 0)]:
        rm, rv = np.zeros(6), np.ones(6)
        y = bn_simd.batch_norm(x, rm, rv, training=True, eps=eps, momentum=momentum)
        _check_train(y, x, None, None, float(eps), "NCHW", (np.zeros(6), np.ones(6), rm, rv), float(momentum))


def test_torch_tensors_are_converted():
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 3, 5)
    w = torch.linspace(0.5, 2.0, 3)
    y = bn_simd.batch_norm(t, None, None, w, None, training=True)
    _check_train(y, t.numpy(), w.numpy(), None, 1e-5, "NCHW")


def test_torch_bfloat16_input_is_refused_naming_x():
    torch = pytest.importorskip("torch")
    t = torch.randn(4, 3, 5).bfloat16()
    with pytest.raises(TypeError, match=r"\bx must"):
        bn_simd.batch_norm(t, training=True)


def test_torch_bfloat16_state_dict_loads():
    """A PyTorch layer cast to bfloat16 (model.bfloat16()): "tensors are converted", like float16 ones."""
    torch = pytest.importorskip("torch")
    tl = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        tl.weight.copy_(torch.tensor([1.5, -2.0, 0.5]))
        tl.running_var.copy_(torch.tensor([2.0, 0.5, 4.0]))
    sd = tl.bfloat16().state_dict()
    layer = bn_simd.BatchNorm2d(3)
    layer.load_state_dict(sd)
    np.testing.assert_array_equal(layer.weight, [1.5, -2.0, 0.5])
    np.testing.assert_array_equal(layer.running_var, [2.0, 0.5, 4.0])
    assert layer.weight.dtype == F32


# ---- empty tensors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,shape", [("NCHW", (0, 3, 4, 4)), ("NHWC", (0, 4, 4, 3)), ("NCHW", (4, 3, 0)),
                                          ("NHWC", (4, 0, 3))])
def test_empty_batch(layout, shape):
    x = np.zeros(shape, F32)
    rm, rv = np.full(3, 0.5, F32), np.full(3, 2.0, F32)
    y = bn_simd.batch_norm(x, rm, rv, training=True, layout=layout)
    assert y.shape == shape and y.dtype == F32
    np.testing.assert_array_equal(rm, 0.5)  # nothing to average: the running statistics stay
    np.testing.assert_array_equal(rv, 2.0)
    assert bn_simd.batch_norm(x, rm, rv, training=False, layout=layout).shape == shape
    mean, var = bn_simd.batch_stats(x, layout=layout)
    assert np.isnan(mean).all() and np.isnan(var).all() and mean.shape == (3,)
    dx, gw, gb = bn_simd.batch_norm_backward(x, x, np.zeros(3), np.ones(3), np.ones(3, F32), layout=layout)
    assert dx.shape == shape
    np.testing.assert_array_equal(gw, 0.0)
    np.testing.assert_array_equal(gb, 0.0)
    layer = bn_simd.BatchNorm(3, layout=layout, momentum=None)
    assert layer(x).shape == shape
    assert layer.num_batches_tracked == 1
    np.testing.assert_array_equal(layer.running_var, 1.0)
    gx = layer.backward(x)
    assert gx.shape == shape
    np.testing.assert_array_equal(layer.grad_weight, 0.0)


@pytest.mark.parametrize("layout,shape", [("NCHW", (4, 0, 5)), ("NHWC", (4, 5, 0)), ("NCHW", (3, 0))])
def test_empty_channels(layout, shape):
    x = np.zeros(shape, F64)
    rm, rv = np.zeros(0), np.ones(0)
    assert bn_simd.batch_norm(x, rm, rv, training=True, layout=layout).shape == shape
    assert bn_simd.batch_norm(x, rm, rv, layout=layout).shape == shape
    y, m, s = bn_simd.batch_norm_forward(x, layout=layout)
    assert y.shape == shape and m.shape == s.shape == (0,)
    mean, var = bn_simd.batch_stats(x, layout=layout)
    assert mean.shape == var.shape == (0,)
    dx, gw, gb = bn_simd.batch_norm_backward(x, x, rm, rv, layout=layout)
    assert dx.shape == shape and gw.shape == gb.shape == (0,)


@pytest.mark.parametrize("layout,shape", [("NCHW", (1, 3, 1, 1)), ("NHWC", (1, 3)), ("NCHW", (1, 3, 1))])
def test_one_value_per_channel_is_fine_in_eval(layout, shape):
    x = make_input((1, 3) + (1,) * (len(shape) - 2), layout, F32, seed=55)
    assert x.shape == shape
    _eval_and_check(x, layout)
    layer = bn_simd.BatchNorm(3, layout=layout).eval()
    y = layer(x)
    _check_eval(y, x, layer.running_mean, layer.running_var, layer.weight, layer.bias, 1e-5, layout)


@pytest.mark.parametrize("layout,nchw_shape", [("NCHW", (1, 3, 2)), ("NCHW", (2, 3, 1, 1)), ("NHWC", (1, 3, 2)),
                                               ("NHWC", (2, 3))])
def test_two_values_per_channel_train(layout, nchw_shape):
    x = make_input(nchw_shape, layout, F32, seed=56)
    _train_and_check(x, layout)


# ---- out= that is allowed ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_in_place_out_is_x(training):
    x = _base("NHWC", F32)
    x0 = x.copy()
    rm, rv = np.zeros(6, F32), np.ones(6, F32)
    y = bn_simd.batch_norm(x, rm, rv, training=training, layout="NHWC", out=x)
    assert y is x
    if training:
        _check_train(y, x0, None, None, 1e-5, "NHWC", (np.zeros(6), np.ones(6), rm, rv))
    else:
        _check_eval(y, x0, rm, rv, None, None, 1e-5, "NHWC")


def test_out_may_overlap_the_source_of_a_copied_input():
    """x is Fortran-ordered, so it is copied before anything is written; out is the same memory, C-ordered."""
    a = make_input((5, 3, 4), "NCHW", F32, seed=57)
    x = a.T  # (4, 3, 5), Fortran order, a view of a
    x0 = x.copy()
    out = a.reshape(4, 3, 5)
    y = bn_simd.batch_norm(x, None, None, training=True, out=out)
    assert y is out
    _check_train(y, x0, None, None, 1e-5, "NCHW")


# ---- unaligned buffers ----------------------------------------------------------------------------------------------

def _unaligned(shape, dtype, fill=None):
    dt = np.dtype(dtype)
    raw = np.zeros(math.prod(shape) * dt.itemsize + dt.itemsize, np.uint8)
    a = raw[dt.itemsize // 2: dt.itemsize // 2 + math.prod(shape) * dt.itemsize].view(dt).reshape(shape)
    assert not a.flags.aligned and a.flags.c_contiguous
    if fill is not None:
        a[...] = fill
    return a


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("layout,shape", [("NCHW", (3, 5, 37)), ("NHWC", (3, 37, 5)), ("NCHW", (2, 1, 130))])
def test_unaligned_buffers(layout, shape, dtype, isa):
    x = _unaligned(shape, dtype, make_input(shape, "NCHW", dtype, seed=58, loc=1.0))
    dy = _unaligned(shape, dtype, make_input(shape, "NCHW", dtype, seed=59))
    _train_and_check(x, layout)
    _eval_and_check(x, layout)
    _backward_and_check(x, dy, layout)
    # an unaligned out cannot be written by the kernels (nor copied into without a hidden temporary): refused
    out = _unaligned(shape, dtype, 0.0)
    before = out.tobytes()
    with pytest.raises(ValueError, match="out must be aligned"):
        bn_simd.batch_norm(x, None, None, training=True, layout=layout, out=out)
    assert out.tobytes() == before


# ---- non-finite values ------------------------------------------------------------------------------------------

NONFINITE_CASES = [("NCHW", (4, 5, 9, 9)), ("NHWC", (4, 9, 9, 5)), ("NHWC", (3, 11, 300)), ("NCHW", (2, 3, 40000))]


def _poison(shape, layout, bad, c, dtype=F32):
    x = make_input(shape, "NCHW", dtype, seed=60, loc=1.0)
    idx = [s // 2 for s in shape]
    idx[ref.channel_axis(layout, len(shape))] = c
    x[tuple(idx)] = bad
    return x, tuple(idx)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layout,shape", NONFINITE_CASES)
def test_non_finite_x_poisons_only_its_channel_in_training(layout, shape, bad, isa):
    C = ref.num_channels(shape, layout)
    c = C - 2
    x, _ = _poison(shape, layout, bad, c)
    rm, rv = np.zeros(C, F32), np.ones(C, F32)
    bn_simd.set_num_threads(2)
    y = bn_simd.batch_norm(x, rm, rv, training=True, layout=layout)
    yc = ref.to_cn(y, layout)
    assert np.isnan(yc[c]).all()
    assert not np.isfinite(rm[c]) and np.isnan(rv[c])
    others = [k for k in range(C) if k != c]
    xo = ref.to_cn(x, layout)[others].T  # (n, C - 1): the clean channels as an (N, C) batch
    y_ref, mean, var = ref.forward_train(xo)
    assert_within(yc[others].T, y_ref, forward_bound(xo, F32, xo.shape[0], mean=mean, var=var), "other channels")
    rm_ref, rv_ref = ref.update_running(np.zeros(C - 1), np.ones(C - 1), mean, var, xo.shape[0], 0.1)
    assert_within(rm[others], rm_ref, 1e-6 * (1 + np.abs(rm_ref)), "running_mean of the other channels")
    assert_within(rv[others], rv_ref, 1e-6 * np.abs(rv_ref), "running_var of the other channels")


def _data_inputs(op, ep):
    """The data arguments an entry point's outputs depend on: those it reads, and x after a prepare (every prepare is
    a layer's forward on x; a residual, which none passes, would be poisoned with no effect)."""
    return [a for a, kind in op.args.items() if kind == ops.DATA and (a in ep.reads or (ep.prepare and a == "x"))]


# Known deviations from the oracle, (op, entry point, argument) -> why. Strict: a fix makes the case pass, and the
# entry must then go. (None today: the eval backward's grad_x = w s dy no longer reads x.)
KNOWN_POISON_DEVIATIONS = {}


def _poison_param(op, ep, arg, bad, layout):
    why = KNOWN_POISON_DEVIATIONS.get((op.name, ep.name, arg))
    marks = [pytest.mark.xfail(reason=why, strict=True, raises=AssertionError)] if why else []
    return pytest.param(op, ep, arg, bad, layout, id=f"{op.name}-{ep.name}-{arg}-{bad}-{layout}", marks=marks)


POISON_SHAPE = (4, 5, 9, 9)
POISONS = [_poison_param(op, ep, arg, bad, layout)
           for op in ops.OPS for ep in op.entry_points for arg in _data_inputs(op, ep)
           for bad in (np.nan, np.inf, -np.inf) for layout in list(dict.fromkeys(op.layouts.values()))[:2]
           if op.supports(POISON_SHAPE, layout, F32)]


@pytest.mark.parametrize("op,ep,arg,bad,layout", POISONS)
def test_a_non_finite_value_poisons_what_the_oracle_says(op, ep, arg, bad, layout):
    """One NaN or +-Inf in a data argument: every output the oracle makes non-finite is (NaN where the oracle's is
    NaN), and every other output -- the other statistic groups, the other elements -- is within its bound."""
    case = op.case(60, POISON_SHAPE, layout, F32, loc=1.0)
    a = case[arg].copy()
    idx = tuple(s // 2 for s in a.shape)
    a[idx] = bad
    poisoned = case.replace(**{arg: a})
    ops.check(ep, poisoned, ep(poisoned.fresh()), f" ({arg}[{idx}] = {bad})")


# the backwards through a piecewise-linear activation with a residual, of every op (and a forward giving y): the
# kink each puts u at, and the slope on its other side (du is dz there, or dz times it)
KINK_ENTRIES = {"backward_relu_residual": (0.0, 0.0), "backward_leaky_relu_residual": (0.0, ops.LEAKY[1]),
                "backward_clamp_residual": (ops.CLAMP[1], 0.0)}
KINKS = [pytest.param(op, ep, dtype, layout, id=f"{op.name}-{ep.name}-{np.dtype(dtype).name}-{layout}")
         for op in ops.OPS for ep in op.entry_points if ep.name in KINK_ENTRIES
         for dtype in (F32, F64) for layout in dict.fromkeys(op.layouts.values())
         if op.supports(POISON_SHAPE, layout, dtype)]


@pytest.mark.parametrize("op,ep,dtype,layout", KINKS)
def test_relu_backward_with_u_at_its_kink_is_within_the_oracle_bound(op, ep, dtype, layout):
    """A residual that cancels the normalised x up to the kink (k - y of the op's forward) puts u = y + residual
    within its rounding of the activation's kink in every element, where the library's u and the oracle's may lie on
    either side: grad_residual is grad_out, or grad_out times the other side's slope, in every element, and every
    output is within the oracle's bound (which counts the jump there)."""
    kink, slope = KINK_ENTRIES[ep.name]
    case = op.case(62, POISON_SHAPE, layout, dtype, loc=1.0)
    kinked = case.replace(residual=(kink - op.entry("forward")(case.fresh())["y"]).astype(dtype))
    got = ep(kinked.fresh())
    dz, gres = kinked["grad_out"], got["grad_residual"]
    assert np.all((gres == dz) | (gres == dz * np.dtype(dtype).type(slope)))
    exp = ep.expected(kinked)
    assert (exp["grad_residual"].bound > 0).mean() > 0.9, "u is not at the kink"
    ops.check(ep, kinked, got, " (u at the kink)")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("layout,shape", NONFINITE_CASES[:3])
def test_non_finite_x_poisons_only_its_element_in_eval(layout, shape, bad, isa):
    C = ref.num_channels(shape, layout)
    x, idx = _poison(shape, layout, bad, 1)
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
    y = bn_simd.batch_norm(x, rm, rv, training=False, layout=layout)
    if np.isnan(bad):
        assert np.isnan(y[idx])
    else:
        assert np.isposinf(y[idx])  # (inf - m) / sqrt(v + eps), weight 1
    mask = np.ones(x.shape, bool)
    mask[idx] = False
    assert np.isfinite(y[mask]).all()
    x_clean = x.copy()
    x_clean[idx] = 0.0
    y_ref = ref.inference(x_clean, rm, rv, layout=layout)
    bound = forward_bound(x_clean, F32, 1, mean=rm, var=rv, layout=layout, batch_stats=False)
    assert_within(y[mask], y_ref[mask], bound[mask], "eval y")


@pytest.mark.parametrize("layout,shape", NONFINITE_CASES[:3])
def test_nan_in_grad_out_poisons_only_its_channel(layout, shape, isa):
    C = ref.num_channels(shape, layout)
    x = make_input(shape, "NCHW", F32, seed=61)
    dy, _ = _poison(shape, layout, np.nan, 2)
    _, mean, var = ref.forward_train(x, layout=layout)
    invstd = 1 / np.sqrt(var + 1e-5)
    dx, gw, gb = bn_simd.batch_norm_backward(dy, x, mean, invstd, layout=layout)
    others = [k for k in range(C) if k != 2]
    assert np.isnan(ref.to_cn(dx, layout)[2]).all() and np.isnan(gw[2]) and np.isnan(gb[2])
    xs, dys = ref.to_cn(x, layout)[others].T, ref.to_cn(dy, layout)[others].T  # (n, C - 1)
    dx_ref, gw_ref, gb_ref = ref.backward(dys, xs, mean[others], invstd[others])
    dxb, gwb, gbb = backward_bounds(dys, xs, mean[others], invstd[others], dtype=F32)
    assert_within(ref.to_cn(dx, layout)[others].T, dx_ref, dxb, "grad_x of the other channels")
    assert_within(gw[others], gw_ref, gwb, "grad_weight of the other channels")
    assert_within(gb[others], gb_ref, gbb, "grad_bias of the other channels")


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("op", ["batch", "group", "instance"])
def test_nan_outputs_have_the_same_bits_at_any_thread_count_and_placement(op, layout, dtype):
    """NaN and Inf among x (NaNs of both signs): every NaN output (dx, y, statistics, parameter gradients) has the
    same sign and payload at any thread count and wherever the output starts. A channel whose outputs are all NaN
    has NaN coefficients, and an element whose x is NaN then met two NaN operands in one multiply-add, whose result
    takes the one the compiler placed first (a kernel's vector body and its masked head and tail differ), and chunks'
    NaN sums met in different orders; (8, 64, 1000) float32 differed between 1 and 2 threads before."""
    dt = np.dtype(dtype) if dtype != "bfloat16" else pytest.importorskip("ml_dtypes").bfloat16
    g = np.random.default_rng(19)
    shape = (8, 64, 1000) if layout == "NCHW" else (8, 1000, 64)
    x = g.standard_normal(shape).astype(np.float32)
    bits = x.reshape(-1).view(np.uint32)
    x.reshape(-1)[7::97] = np.nan
    bits[104::291] |= np.uint32(0x80000000)  # (-NaN)
    x.reshape(-1)[60::1003] = np.inf
    x = x.astype(dt)
    dy = g.standard_normal(shape).astype(dt)
    pdt = F64 if dtype == "float64" else F32
    w, b = g.uniform(0.5, 2, 64).astype(pdt), g.standard_normal(64).astype(pdt)
    stat = np.full(64, 0.25, pdt), np.full(64, 1.1, pdt)

    def outputs(at):
        if op == "batch":
            y, m, s = bn_simd.batch_norm_forward(x, w, b, layout=layout, out=past_line(np.empty_like(x), at))
            return (y, m, s) + bn_simd.batch_norm_backward(dy, x, m, s, w, layout=layout,
                                                           out=past_line(np.empty_like(x), at)) + \
                bn_simd.batch_norm_backward(dy, x, *stat, w, layout=layout, out=past_line(np.empty_like(x), at))
        # (the backward also from finite statistics, which leave the sums, not the mean, NaN)
        if op == "group":
            y, m, s = bn_simd.group_norm_forward(x, 4, w, b, layout=layout, out=past_line(np.empty_like(x), at))
            return (y, m, s) + bn_simd.group_norm_backward(dy, x, m, s, 4, w, layout=layout,
                                                           out=past_line(np.empty_like(x), at)) + \
                bn_simd.group_norm_backward(dy, x, np.full((8, 4), 0.25, pdt), np.full((8, 4), 1.1, pdt), 4, w,
                                            layout=layout, out=past_line(np.empty_like(x), at))
        y, m, s = bn_simd.instance_norm_forward(x, w, b, layout=layout, out=past_line(np.empty_like(x), at))
        return (y, m, s) + bn_simd.instance_norm_backward(dy, x, m, s, w, layout=layout,
                                                          out=past_line(np.empty_like(x), at)) + \
            bn_simd.instance_norm_backward(dy, x, np.full((8, 64), 0.25, pdt), np.full((8, 64), 1.1, pdt), w,
                                           layout=layout, out=past_line(np.empty_like(x), at))

    want = None
    for n in (1, 2, 3):
        for at in (0, 8, 16, 56) if n == 1 else (0, 40):
            with bn_simd.Context(num_threads=n):
                got = outputs(at)
            if want is None:
                want = got
                assert np.isnan(np.asarray(got[0], np.float32)).any() and np.isnan(np.asarray(got[3], np.float32)).any()
            for k, (p, q) in enumerate(zip(got, want)):
                np.testing.assert_array_equal(np.asarray(p).view(np.uint8), np.asarray(q).view(np.uint8),
                                              err_msg=f"output {k}, {n} threads, out {at} bytes past a line")


def test_non_finite_running_stats_poison_only_their_channel_in_eval():
    x = _base("NCHW", F64)
    rm = np.array([0.0, np.nan, 0.0, 0.0, 0.0, 0.0])
    rv = np.array([1.0, 1.0, np.inf, 1.0, 1.0, 1.0])
    y = bn_simd.batch_norm(x, rm, rv)
    yc = ref.to_cn(y, "NCHW")
    assert np.isnan(yc[1]).all()
    np.testing.assert_array_equal(yc[2], 0.0)  # (x - 0) / sqrt(inf) = 0
    keep = [0, 3, 4, 5]
    _check_eval(y[:, keep], x[:, keep], rm[keep], rv[keep], None, None, 1e-5, "NCHW")


# ---- magnitudes at the edge of float32 ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_values_near_float32_max_symmetric(layout, isa):
    """|x| = 3e38: the variance (9e76) overflows float32, not the float64 statistics; mean 0, y = +-1."""
    shape = (4, 3, 33) if layout == "NCHW" else (4, 33, 3)
    x = np.where(np.indices(shape).sum(axis=0) % 2 == 0, F32(3e38), F32(-3e38)).astype(F32)
    y = _train_and_check(x, layout, dtype=F64)  # float64 running statistics: the variance fits
    assert np.isfinite(y).all()
    _, mean, var = ref.forward_train(x, layout=layout)
    assert var.min() > np.finfo(F32).max  # the premise: the variance itself is not a float32


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_values_near_float32_max_with_an_outlier(layout, isa):
    """31 values of 3e38 and one of -3e38 per channel: mean 2.8e38, std 1.0e38, the outlier's normalised value
    is -5.57 -- finite and representable, but x - mean = -5.8e38 is not a float32."""
    x = np.full((4, 3, 8), F32(3e38), F32)
    x[1, :, 5] = F32(-3e38)
    x = x if layout == "NCHW" else np.ascontiguousarray(np.moveaxis(x, 1, -1))
    y = bn_simd.batch_norm(x, None, None, training=True, layout=layout)
    assert np.isfinite(y).all(), "an output that is a float32 came out as inf"
    _check_train(y, x, None, None, 1e-5, layout)


def test_values_near_float32_max_with_a_small_weight(isa):
    """std 3e38 and weight 1e-3: the scale w / std = 3.3e-42 is subnormal in float32 (2 significant digits);
    y = +-1e-3 is an ordinary float32 and must keep float32 accuracy."""
    x = np.where(np.indices((4, 3, 16)).sum(axis=0) % 2 == 0, F32(3e38), F32(-3e38)).astype(F32)
    w = np.full(3, 1e-3, F32)
    y = bn_simd.batch_norm(x, None, None, w, None, training=True)
    _check_train(y, x, w, None, 1e-5, "NCHW")


@pytest.mark.parametrize("training", [True, False])
def test_tiny_eps_with_a_constant_channel_gives_the_bias(training):
    """var = 0, eps = 1e-300: w / sqrt(eps) = 1e150 is no float32, but x - mean = 0 exactly and y = bias
    (as the oracle says); 0 * inf must not turn it into NaN."""
    x = np.full((4, 3, 6), 2.5, F32)
    x[:, 0] = make_input((4, 6), "NCHW", F32, seed=62)  # one ordinary channel (its outputs overflow: not checked)
    b = np.array([0.0, 0.5, -1.25], F32)
    if training:
        y = bn_simd.batch_norm(x, None, None, None, b, training=True, eps=1e-300)
    else:
        y = bn_simd.batch_norm(x, np.full(3, 2.5), np.zeros(3), None, b, eps=1e-300)
    np.testing.assert_array_equal(y[:, 1:], np.broadcast_to(b[None, 1:, None], (4, 2, 6)))


def test_subnormal_inputs(isa):
    tiny = np.finfo(F32).smallest_subnormal
    x = (make_input((4, 3, 17), "NCHW", F64, seed=63) * 100 * tiny).astype(F32)
    assert (np.abs(x[x != 0]) < np.finfo(F32).tiny).all()
    _train_and_check(x, "NCHW")


# ---- layers after refused calls -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["shape", "dtype", "missing", "extra"])
def test_layer_after_a_refused_load_state_dict_still_computes_with_its_old_state(bad):
    layer = bn_simd.BatchNorm2d(4, momentum=None)
    for s in range(2):
        layer(make_input((3, 4, 3, 3), "NCHW", F32, seed=64 + s, loc=s))
    good = layer.state_dict()
    sd = {k: v.copy() for k, v in good.items()}
    sd["running_var"] = np.full(4, 9.0, F32)
    if bad == "shape":
        sd["weight"] = np.ones(5, F32)
    elif bad == "dtype":
        sd["bias"] = np.zeros(4, np.int32)
    elif bad == "missing":  # (not num_batches_tracked: PyTorch loads checkpoints from before the counter)
        del sd["running_mean"]
    else:
        sd["running_std"] = np.ones(4, F32)
    with pytest.raises((ValueError, TypeError)):
        layer.load_state_dict(sd)
    for k, v in good.items():
        np.testing.assert_array_equal(layer.state_dict()[k], v)
    _assert_layer_still_works(layer)
    layer.eval()
    _assert_layer_still_works(layer)


def test_layer_backward_with_out_is_its_own_gradient():
    layer = bn_simd.BatchNorm1d(3, dtype=F64)
    x = make_input((5, 3, 4), "NCHW", F64, seed=66)
    layer(x)
    g = make_input((5, 3, 4), "NCHW", F64, seed=67)
    g0 = g.copy()
    gx = layer.backward(g, out=g)
    assert gx is g
    _, mean, var = ref.forward_train(x)
    _check_backward((gx, layer.grad_weight, layer.grad_bias), g0, x, mean, 1 / np.sqrt(var + 1e-5), None, "NCHW",
                    True, F64)



# ---- 16-bit data (float16, bfloat16): the functional entry points (tests/half_cases.py) ----------------------------

HALF_REFUSALS = [pytest.param(op, name, id=f"{op.name}-{name}") for op in ops.OPS for name in half_cases.NAMES
                 if half_cases.supports(op, REFUSAL_SHAPE, list(op.layouts.values())[0])]


@pytest.mark.parametrize("op,name", HALF_REFUSALS)
def test_16_bit_bad_arguments_are_refused_and_change_nothing(op, name):
    """With 16-bit x: a data argument of another dtype (float32) or a 16-bit pattern type NumPy calls uint16, a
    per-channel argument one too long, and an out of another dtype are refused naming the argument; nothing changes
    (running statistics included); then the call works."""
    dt = half_cases.dtype(name)
    case = half_cases.case(op, 11, REFUSAL_SHAPE, list(op.layouts.values())[0], dt)
    for ep in half_cases.entries(op, case):
        for arg in ep.reads:
            name_re = ep.named(arg)
            if op.args[arg] == ops.DATA:
                if arg != "x":
                    assert_refused(ep, case.replace(**{arg: case[arg].astype(F32)}), TypeError,
                                   [name_re, "dtype of x"])
                assert_refused(ep, case.replace(**{arg: case[arg].view(np.uint16)}), TypeError, [name_re, "dtype"])
            elif case[arg] is not None:
                bad = np.ones(case[arg].shape[:-1] + (case[arg].shape[-1] + 1,), case[arg].dtype)
                assert_refused(ep, case.replace(**{arg: bad}), ValueError, [name_re, "shape"])
        if ep.out is not None:
            out = np.zeros(op.store(np.zeros(case.shape), case.layout).shape, F32)
            assert_refused(ep, case.fresh(), TypeError, ["out", "dtype"], out=out)
        half_cases.check(ep, case, ep(case.fresh()), " after refused calls")


HALF_POISONS = [pytest.param(op, name, bad, id=f"{op.name}-{name}-{bad}") for op in ops.OPS
                for name in half_cases.NAMES for bad in (np.nan, np.inf)
                if half_cases.supports(op, POISON_SHAPE, list(op.layouts.values())[0])]


@pytest.mark.parametrize("op,name,bad", HALF_POISONS)
def test_a_non_finite_16_bit_value_poisons_what_the_oracle_says(op, name, bad):
    """One NaN or Inf in each data argument of 16-bit data in turn: non-finite where the oracle is, the rest
    within the 16-bit bounds."""
    dt = half_cases.dtype(name)
    case = half_cases.case(op, 60, POISON_SHAPE, list(op.layouts.values())[0], dt)
    for ep in half_cases.entries(op, case):
        for arg in _data_inputs(op, ep):
            a = case[arg].copy()
            idx = tuple(s // 2 for s in a.shape)
            a[idx] = bad
            poisoned = case.replace(**{arg: a})
            half_cases.check(ep, poisoned, ep(poisoned.fresh()), f" ({arg}[{idx}] = {bad})")
