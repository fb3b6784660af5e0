"""Batch Renormalization against a float64 NumPy oracle of Keras' formula and moving statistics.

The oracle is written in Keras' own convention (momentum 0.99 = the weight of the old value) and keeps the five
moving statistics Keras' BatchNormalization(renorm=True) keeps: moving_mean, moving_variance, moving_stddev (the
inference ones) and renorm_mean, renorm_stddev (the correction's), initialised 0, 1, 1, 0, 1. With virtual batches
(Keras 2's layer) the corrections and updates use the mean over the virtual batches of their statistics.
"""
import inspect

import numpy as np
import pytest

import bn_simd
from conftest import assert_within, channel_params, make_input, tol
from keras_backend import keras_on_torch
from oracle import central_difference


def to_last(a, layout):
    a = np.asarray(a, np.float64)
    return a if layout == "NHWC" else np.moveaxis(a, 1, -1)


def from_last(a, layout):
    return a if layout == "NHWC" else np.moveaxis(a, -1, 1)


class KerasRenorm:
    """Keras' BatchNormalization(renorm=True) in float64 (call in training and inference mode)."""

    def __init__(self, C, momentum=0.99, renorm_momentum=0.99, eps=1e-3, clipping=None, virtual_batch_size=None,
                 gamma=None, beta=None, unbiased=False):
        self.K, self.KR, self.eps = momentum, renorm_momentum, eps
        self.clip = clipping or {}
        self.v = virtual_batch_size
        self.gamma = np.ones(C) if gamma is None else np.asarray(gamma, np.float64)
        self.beta = np.zeros(C) if beta is None else np.asarray(beta, np.float64)
        self.moving_mean, self.moving_variance, self.moving_stddev = np.zeros(C), np.ones(C), np.ones(C)
        self.renorm_mean, self.renorm_stddev = np.zeros(C), np.ones(C)
        self.unbiased = unbiased   # (not Keras: running_std from the unbiased variance, this library's default)

    def stats(self, xl):
        """Per-virtual-batch statistics (G, C) and the (G, n, C) view."""
        N, C = xl.shape[0], xl.shape[-1]
        v = self.v or N
        xr = xl.reshape(v, N // v, -1, C).transpose(1, 0, 2, 3).reshape(N // v, -1, C)
        mean = xr.mean(axis=1)
        var = ((xr - mean[:, None]) ** 2).mean(axis=1)
        return xr, mean, var

    def corrections(self, mean, var):
        stddev = np.sqrt(var + self.eps)
        rs = np.maximum(self.renorm_stddev, np.sqrt(self.eps))
        r = stddev / rs
        d = (mean - self.renorm_mean) / rs
        if "rmin" in self.clip:
            r = np.maximum(r, self.clip["rmin"])
        if "rmax" in self.clip:
            r = np.minimum(r, self.clip["rmax"])
        if "dmax" in self.clip:
            d = np.clip(d, -self.clip["dmax"], self.clip["dmax"])
        return r, d

    def __call__(self, x, layout="NCHW", training=True):
        xl = to_last(x, layout)
        N, C = xl.shape[0], xl.shape[-1]
        if not training:
            y = (xl - self.moving_mean) / np.sqrt(self.moving_variance + self.eps) * self.gamma + self.beta
            return from_last(y, layout), None
        xr, mean, var = self.stats(xl)
        new_mean, new_var = mean.mean(axis=0), var.mean(axis=0)
        r, d = self.corrections(new_mean, new_var)
        xhat = (xr - mean[:, None]) / np.sqrt(var[:, None] + self.eps)
        yr = (xhat * r + d) * self.gamma + self.beta
        v = self.v or N
        y = yr.reshape(N // v, v, -1, C).transpose(1, 0, 2, 3).reshape(xl.shape)
        # updates, with the statistics from before them in r and d
        stddev = np.sqrt(new_var + self.eps)
        self.renorm_mean = self.renorm_mean * self.KR + new_mean * (1 - self.KR)
        self.renorm_stddev = self.renorm_stddev * self.KR + stddev * (1 - self.KR)
        self.moving_mean = self.moving_mean * self.K + new_mean * (1 - self.K)
        n = xr.shape[1]
        s_inf = np.sqrt(new_var * n / (n - 1) + self.eps) if self.unbiased else stddev
        self.moving_stddev = self.moving_stddev * self.K + s_inf * (1 - self.K)
        self.moving_variance = np.maximum(self.moving_stddev ** 2 - self.eps, 0.0)
        return from_last(y, layout), (r, d, xhat, xr)


def assert_state(layer, oracle, bound):
    for ours, theirs in (("running_mean", "moving_mean"), ("running_var", "moving_variance"),
                         ("running_std", "moving_stddev"), ("renorm_mean", "renorm_mean"),
                         ("renorm_std", "renorm_stddev")):
        assert_within(getattr(layer, ours), getattr(oracle, theirs), bound, ours)


CLIPPINGS = [None, {"rmax": 1.5, "rmin": 0.8, "dmax": 0.3}, {"rmax": 1.05}, {"dmax": 0.01}, {"rmin": 0.95}]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_layer_matches_keras_over_training_steps_then_eval(clipping, dtype, layout):
    C = 3
    w, b = channel_params(C, dtype, seed=1)
    layer = bn_simd.BatchNorm2d(C, eps=1e-3, momentum=0.01, layout=layout, dtype=dtype, unbiased_running_var=False,
                                renorm=True, renorm_clipping=clipping, renorm_momentum=0.1)
    layer.weight[:], layer.bias[:] = w, b
    oracle = KerasRenorm(C, momentum=0.99, renorm_momentum=0.9, eps=1e-3, clipping=clipping, gamma=w, beta=b)
    n = 8 * 16
    for step in range(4):
        # shifting statistics, so that r and d move away from 1 and 0 and the clipping bites
        x = make_input((8, C, 4, 4), layout, dtype, seed=10 + step, loc=0.7 * step, scale=1 + 0.5 * step)
        y = layer(x)
        y_ref, _ = oracle(x, layout)
        assert_within(y, y_ref, tol(dtype, n) * 8 * (1 + np.abs(y_ref)), f"y at step {step}")
        assert_state(layer, oracle, tol(dtype, n) * 4 * (1 + np.abs(oracle.moving_stddev).max() * 4))
    layer.eval()
    x = make_input((5, C, 4, 4), layout, dtype, seed=30, loc=1.0)
    assert_within(layer(x), oracle(x, layout, training=False)[0], tol(dtype, n) * 8 * 4, "eval y")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_clipping_is_active_in_the_tested_steps(layout):
    """The parametrised comparison above means something only if r and d reach their bounds: check the oracle."""
    oracle = KerasRenorm(3, renorm_momentum=0.9, clipping={"rmax": 1.05, "rmin": 0.95, "dmax": 0.01})
    clipped = 0
    for step in range(4):
        x = make_input((8, 3, 4, 4), layout, np.float64, seed=10 + step, loc=0.7 * step, scale=1 + 0.5 * step)
        _, (r, d, _, _) = oracle(x, layout)
        clipped += np.sum(np.isclose(r, 1.05) | np.isclose(r, 0.95)) + np.sum(np.isclose(np.abs(d), 0.01))
    assert clipped >= 6


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_unbiased_running_variance_and_cumulative_momentum(layout, momentum):
    layer = bn_simd.BatchNorm1d(4, momentum=momentum, layout=layout, dtype=np.float64, renorm=True,
                                renorm_momentum=0.3)
    steps = 3
    xs = [make_input((6, 4, 5), layout, np.float64, seed=40 + k, loc=k) for k in range(steps)]
    oracle = KerasRenorm(4, renorm_momentum=0.7, eps=1e-5, unbiased=True)
    for k, x in enumerate(xs):
        oracle.K = 0.9 if momentum is not None else 1 - 1 / (k + 1)
        y_ref, _ = oracle(x, layout)
        assert_within(layer(x), y_ref, 1e-13 * (1 + np.abs(y_ref)), "y")
    assert_state(layer, oracle, 1e-13)
    assert layer.num_batches_tracked == steps


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,v", [(9, 3), (32, 16)])
def test_renorm_with_virtual_batches_matches_keras(layout, dtype, N, v):
    C = 2
    layer = bn_simd.BatchNorm2d(C, eps=1e-3, momentum=0.05, layout=layout, dtype=dtype, unbiased_running_var=False,
                                renorm=True, renorm_clipping={"rmax": 1.2, "dmax": 0.2}, renorm_momentum=0.2,
                                virtual_batch_size=v)
    oracle = KerasRenorm(C, momentum=0.95, renorm_momentum=0.8, eps=1e-3, clipping={"rmax": 1.2, "dmax": 0.2},
                         virtual_batch_size=v)
    n = v * 9
    for step in range(3):
        x = make_input((N, C, 3, 3), layout, dtype, seed=50 + step, loc=step, scale=1 + step)
        y_ref, _ = oracle(x, layout)
        assert_within(layer(x), y_ref, tol(dtype, n) * 8 * (1 + np.abs(y_ref)), f"y at step {step}")
    assert_state(layer, oracle, tol(dtype, n) * 16)


# ---- backward: r and d are constants -----------------------------------------------------------------------------

def fd_grads(x, g, gamma, beta, rmean, rstd, clipping, eps, layout, v=None):
    """Central differences of sum(g y) in float64 with r and d frozen at x (stop_gradient)."""
    C = gamma.shape[0]

    def forward(xx, gm, bt, rd=None):
        o = KerasRenorm(C, eps=eps, clipping=clipping, virtual_batch_size=v, gamma=gm, beta=bt)
        o.renorm_mean, o.renorm_stddev = rmean.copy(), rstd.copy()
        if rd is not None:
            o.corrections = lambda mean, var: rd
        return o(xx, layout)

    _, (r, d, _, _) = forward(x, gamma, beta)

    def loss(xx, gm, bt):
        return np.sum(g * forward(xx, gm, bt, (r, d))[0])

    dx = central_difference(lambda a: loss(a, gamma, beta), x)
    dw = central_difference(lambda a: loss(x, a, beta), gamma)
    db = central_difference(lambda a: loss(x, gamma, a), beta)
    return dx, dw, db, r, d


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("v", [None, 2, 16])
@pytest.mark.parametrize("clipping", [None, {"rmax": 1.1, "rmin": 0.9, "dmax": 0.1}])
def test_backward_matches_finite_differences_with_r_and_d_constant(layout, v, clipping):
    N = 32 if v == 16 else 4
    x = make_input((N, 2, 3), layout, np.float64, seed=60, loc=0.5, scale=2.0)
    g = make_input((N, 2, 3), layout, np.float64, seed=61)
    w, b = channel_params(2, seed=62)
    rmean, rstd = np.array([0.1, -0.3]), np.array([0.8, 1.7])
    cl = clipping or {}
    y, m, s, r, d = bn_simd.batch_renorm_forward(x, rmean, rstd, w, b, eps=1e-3, layout=layout, virtual_batch_size=v,
                                                 **cl)
    gx, gw, gb = bn_simd.batch_renorm_backward(g, x, m, s, r, d, w, layout=layout, virtual_batch_size=v)
    dx, dw, db, r_ref, d_ref = fd_grads(x, g, w, b, rmean, rstd, clipping, 1e-3, layout, v)
    assert_within(r, r_ref, 1e-15 * 4, "r")
    assert_within(d, d_ref, 1e-15 * 4, "d")
    assert_within(gx, dx, 1e-7 * (1 + np.abs(dx)), "grad_x")
    assert_within(gw, dw, 1e-7 * (1 + np.abs(dw)), "grad_weight")
    assert_within(gb, db, 1e-7 * (1 + np.abs(db)), "grad_bias")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_layer_backward_equals_the_functional_pair(layout):
    layer = bn_simd.BatchNorm2d(3, layout=layout, renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0})
    layer.weight[:], layer.bias[:] = channel_params(3, np.float32, seed=70)
    layer.renorm_mean[:] = [0.5, -0.2, 0.1]
    layer.renorm_std[:] = [0.7, 1.3, 2.0]
    rm, rs = layer.renorm_mean.copy(), layer.renorm_std.copy()
    x = make_input((4, 3, 5, 5), layout, np.float32, seed=71)
    g = make_input((4, 3, 5, 5), layout, np.float32, seed=72)
    y = layer(x)
    gx = layer.backward(g)
    y_f, m, s, r, d = bn_simd.batch_renorm_forward(x, rm, rs, layer.weight, layer.bias, rmax=2.0, dmax=1.0,
                                                   layout=layout)
    gx_f, gw_f, gb_f = bn_simd.batch_renorm_backward(g, x, m, s, r, d, layer.weight, layout=layout)
    np.testing.assert_array_equal(y, y_f)
    np.testing.assert_array_equal(gx, gx_f)
    np.testing.assert_array_equal(layer.grad_weight, gw_f)
    np.testing.assert_array_equal(layer.grad_bias, gb_f)


# ---- functional API ---------------------------------------------------------------------------------------------

def _moving(C, dtype=np.float32):
    return dict(running_std=np.ones(C, dtype), renorm_mean=np.zeros(C, dtype), renorm_std=np.ones(C, dtype))


@pytest.mark.parametrize("v", [None, 2])
def test_one_call_equals_forward_then_update(v):
    x = make_input((4, 3, 6), "NCHW", np.float32, seed=80, loc=2.0)
    rm, rv, mv = np.zeros(3, np.float32), np.ones(3, np.float32), _moving(3)
    y = bn_simd.batch_renorm(x, rm, rv, training=True, momentum=0.2, renorm_clipping={"rmax": 1.5},
                             renorm_momentum=0.3, virtual_batch_size=v, **mv)
    rm2, rv2, mv2 = np.zeros(3, np.float32), np.ones(3, np.float32), _moving(3)
    y2, m, s, r, d = bn_simd.batch_renorm_forward(x, mv2["renorm_mean"], mv2["renorm_std"], rmax=1.5,
                                                  virtual_batch_size=v)
    bn_simd.update_renorm_stats(rm2, rv2, mv2["running_std"], mv2["renorm_mean"], mv2["renorm_std"], m, s,
                                (v or 4) * 6, momentum=0.2, renorm_momentum=0.3)
    np.testing.assert_array_equal(y, y2)
    for a, b_ in ((rm, rm2), (rv, rv2)) + tuple((mv[k], mv2[k]) for k in mv):
        assert_within(a, b_, 2 * np.spacing(np.abs(b_).astype(np.float32)), "moving statistic")


def test_neutral_corrections_give_batch_norm():
    """rmax = rmin = 1 and dmax = 0 force r = 1, d = 0: batch norm."""
    x = make_input((6, 3, 4, 4), "NCHW", np.float64, seed=81, loc=3.0)
    w, b = channel_params(3, seed=82)
    y, m, s, r, d = bn_simd.batch_renorm_forward(x, np.full(3, 5.0), np.full(3, 0.1), w, b, rmax=1.0, rmin=1.0,
                                                 dmax=0.0)
    np.testing.assert_array_equal(r, 1.0)
    np.testing.assert_array_equal(d, 0.0)
    y0, _, _ = bn_simd.batch_norm_forward(x, w, b)
    assert_within(y, y0, tol(np.float64, 96) * 8 * (1 + np.abs(y0)), "y")


def test_renorm_corrections_formula():
    mean, var = np.array([1.0, -2.0, 0.0]), np.array([4.0, 0.25, 0.0])
    rmean, rstd = np.array([0.0, -1.0, 0.5]), np.array([1.0, 0.5, 0.0])
    r, d = bn_simd.renorm_corrections(mean, var, rmean, rstd, eps=1e-4, rmax=3.0, dmax=1.5)
    s = np.maximum(rstd, 1e-2)
    np.testing.assert_allclose(r, np.minimum(np.sqrt(var + 1e-4) / s, 3.0), rtol=1e-15)
    np.testing.assert_allclose(d, np.clip((mean - rmean) / s, -1.5, 1.5), rtol=1e-15)


def test_eval_is_batch_norm_with_the_running_statistics():
    layer = bn_simd.BatchNorm2d(3, renorm=True)
    for k in range(2):
        layer(make_input((4, 3, 3, 3), "NCHW", np.float32, seed=83 + k, loc=k))
    layer.eval()
    x = make_input((2, 3, 3, 3), "NCHW", np.float32, seed=85)
    np.testing.assert_array_equal(layer(x), bn_simd.batch_norm(x, layer.running_mean, layer.running_var,
                                                               layer.weight, layer.bias))
    rs = layer.running_std.copy()
    layer(x)
    np.testing.assert_array_equal(layer.running_std, rs)


def test_update_with_an_empty_batch_changes_nothing():
    rm, rv, mv = np.zeros(3), np.ones(3), _moving(3, np.float64)
    bn_simd.update_renorm_stats(rm, rv, mv["running_std"], mv["renorm_mean"], mv["renorm_std"], np.full(3, np.nan),
                                np.full(3, np.nan), 0)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    for k in mv:
        np.testing.assert_array_equal(mv[k], 0 if k == "renorm_mean" else 1)
    layer = bn_simd.BatchNorm2d(3, renorm=True)
    layer(np.zeros((0, 3, 2, 2), np.float32))
    assert_state_default(layer)


@pytest.mark.parametrize("shape", [(0, 3, 2, 2), (4, 3, 0)])
@pytest.mark.parametrize("v", [None, 2])
def test_an_empty_batch_has_neutral_corrections_and_zero_parameter_gradients(shape, v):
    """No values: r = 1, d = 0 (as the Keras layer's), so the parameter gradients, sums over nothing, are 0 (r and d
    of an empty batch's NaN statistics made grad_weight NaN, and one optimiser step every weight)."""
    if v is not None and shape[0] % v:
        pytest.skip("(the virtual batch size divides the batch)")
    x = np.zeros(shape, np.float32)
    mv = _moving(3)
    y, mean, invstd, r, d = bn_simd.batch_renorm_forward(x, mv["renorm_mean"], mv["renorm_std"],
                                                         virtual_batch_size=v)
    np.testing.assert_array_equal(r, 1)
    np.testing.assert_array_equal(d, 0)
    layer = bn_simd.BatchNorm2d(3, renorm=True, virtual_batch_size=v) if len(shape) == 4 else \
        bn_simd.BatchNorm1d(3, renorm=True, virtual_batch_size=v)
    layer(x)
    gx = layer.backward(x)
    assert gx.shape == shape
    np.testing.assert_array_equal(layer.grad_weight, 0)
    np.testing.assert_array_equal(layer.grad_bias, 0)
    assert_state_default(layer)


def assert_state_default(layer):
    np.testing.assert_array_equal(layer.running_mean, 0)
    np.testing.assert_array_equal(layer.running_var, 1)
    np.testing.assert_array_equal(layer.running_std, 1)
    np.testing.assert_array_equal(layer.renorm_mean, 0)
    np.testing.assert_array_equal(layer.renorm_std, 1)


# ---- state, errors ------------------------------------------------------------------------------------------------

def test_state_dict_round_trip_and_reset():
    layer = bn_simd.BatchNorm1d(3, renorm=True)
    layer(make_input((5, 3), "NCHW", np.float32, seed=90, loc=2.0))
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "running_std",
                       "renorm_mean", "renorm_std"}
    other = bn_simd.BatchNorm1d(3, renorm=True)
    other.load_state_dict(sd)
    for k in ("running_std", "renorm_mean", "renorm_std"):
        np.testing.assert_array_equal(getattr(other, k), sd[k])
    plain = {k: v for k, v in sd.items() if k not in ("running_std", "renorm_mean", "renorm_std")}
    with pytest.raises(ValueError, match="missing keys"):
        other.load_state_dict(plain)
    other.reset_running_stats()
    assert_state_default(other)
    bn_simd.BatchNorm1d(3, renorm=True).load_state_dict(plain, strict=False)


@pytest.mark.parametrize("clipping,exc,match", [
    ({"rmax": 2, "gamma": 1}, ValueError, "keys"), ({"rmax": 0.5, "rmin": 1.0}, ValueError, "rmax >= rmin"),
    ({"dmax": -1}, ValueError, "dmax >= 0"), ({"rmax": float("nan")}, ValueError, "NaN"),
    ({"rmax": "2"}, TypeError, "rmax"), ([("rmax", 2)], TypeError, "renorm_clipping")])
def test_bad_clipping_is_refused(clipping, exc, match):
    with pytest.raises(exc, match=match):
        bn_simd.BatchNorm2d(3, renorm=True, renorm_clipping=clipping)
    layer = bn_simd.BatchNorm2d(3, renorm=True)
    layer.renorm_clipping = clipping
    with pytest.raises(exc, match=match):
        layer(make_input((2, 3, 2, 2), "NCHW", np.float32, seed=91))
    assert layer.num_batches_tracked == 0
    assert_state_default(layer)


@pytest.mark.parametrize("m,exc", [(1.5, ValueError), (-0.1, ValueError), ("0.1", TypeError), (None, TypeError)])
def test_renorm_momentum_is_checked(m, exc):
    with pytest.raises(exc, match="renorm_momentum"):
        bn_simd.BatchNorm2d(3, renorm=True, renorm_momentum=m)


def test_renorm_needs_tracked_running_statistics():
    with pytest.raises(ValueError, match="track_running_stats"):
        bn_simd.BatchNorm2d(3, renorm=True, track_running_stats=False)


@pytest.mark.parametrize("bad", [dict(momentum=1.5), dict(renorm_momentum=-1.0), dict(eps=0.0),
                                 dict(renorm_clipping={"rmin": 2.0, "rmax": 1.0}), dict(virtual_batch_size=3),
                                 dict(weight=np.ones(4)), dict(renorm_std=np.ones(2)),
                                 dict(out=np.empty((4, 3, 2, 2), np.float64)), dict(x=np.ones((1, 3), np.float32))])
def test_failed_functional_call_changes_nothing(bad):
    x = make_input((4, 3, 2, 2), "NCHW", np.float32, seed=92)
    args = dict(x=x, running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32), training=True,
                **_moving(3))
    args.update(bad)
    snapshot = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises((ValueError, TypeError)):
        bn_simd.batch_renorm(**args)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(args[k], v, err_msg=k)


def test_failed_layer_call_changes_nothing():
    layer = bn_simd.BatchNorm2d(3, renorm=True, virtual_batch_size=2)
    for bad in (make_input((3, 3, 2, 2), "NCHW", np.float32, seed=93), np.ones((2, 4, 2, 2), np.float32),
                np.ones((2, 1, 1, 3), np.float32)):
        with pytest.raises(ValueError):
            layer(bad)
    assert layer.num_batches_tracked == 0
    assert_state_default(layer)
    layer.renorm_std = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="renorm_std"):
        layer(make_input((2, 3, 2, 2), "NCHW", np.float32, seed=94))
    assert layer.num_batches_tracked == 0


@pytest.mark.parametrize("kw", [dict(renorm=True), dict(virtual_batch_size=2), dict(renorm=True, virtual_batch_size=2)])
def test_one_running_statistic_set_to_none_is_refused_before_out_is_written(kw):
    """The update comes after the output is written: the pair is checked before (it was refused only at the update,
    with out= x already overwritten)."""
    layer = bn_simd.BatchNorm2d(3, **kw)
    layer.running_var = None
    x = make_input((4, 3, 2, 2), "NCHW", np.float32, seed=95)
    x0 = x.copy()
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        layer(x, out=x)
    np.testing.assert_array_equal(x, x0)
    assert layer.num_batches_tracked == 0


def test_a_renorm_layer_with_both_running_statistics_set_to_none_is_refused_in_training():
    """Both None is a plain layer's batch statistics without an update; renorm would then never move renorm_mean and
    renorm_std, and correct every batch against their initial values."""
    layer = bn_simd.BatchNorm2d(3, renorm=True)
    layer.running_mean = layer.running_var = None
    x = make_input((4, 3, 2, 2), "NCHW", np.float32, seed=96)
    with pytest.raises(TypeError, match="renorm moves renorm_mean and renorm_std"):
        layer(x)
    np.testing.assert_array_equal(layer.renorm_mean, 0)
    assert layer.num_batches_tracked == 0


@pytest.mark.parametrize("make", [
    lambda: bn_simd.BatchNorm2d(3, renorm=True, renorm_clipping={"rmax": 10 ** 400}),
    lambda: bn_simd.BatchNorm2d(3, renorm=True, renorm_momentum=10 ** 400),
    lambda: bn_simd.renorm_corrections(np.zeros(2), np.ones(2), np.zeros(2), np.ones(2), dmax=10 ** 400),
    lambda: bn_simd.update_renorm_stats(*[np.zeros(2) for _ in range(5)], np.zeros(2), np.ones(2), 4,
                                        renorm_momentum=-10 ** 400)])
def test_integers_beyond_floats_range_are_value_errors_naming_the_argument(make):
    with pytest.raises(ValueError, match=r"(rmax|dmax|renorm_momentum) must .*integer too large for a float"):
        make()


def test_update_renorm_stats_names_save_mean_for_the_channel_count():
    with pytest.raises(ValueError, match="running_mean must have shape \\(4,\\) to match the 4 channels of save_mean"):
        bn_simd.update_renorm_stats(*[np.zeros(3) for _ in range(5)], np.zeros(4), np.ones(4), 10)


def _keras():
    """Keras 3 with renorm, on the PyTorch backend (selected here); skips when absent."""
    keras = keras_on_torch()
    if "renorm" not in inspect.signature(keras.layers.BatchNormalization.__init__).parameters:
        pytest.skip("this Keras has no renorm")
    return keras


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")  # (Keras' own, NumPy 2)
def test_keras_renorm_itself_forward_backward_and_moving_statistics():
    """Keras 3's own layer, float32, against this library's: outputs, input and parameter gradients over training
    steps, the five moving statistics, then eval."""
    keras = _keras()
    torch = pytest.importorskip("torch")
    clipping = {"rmax": 1.2, "rmin": 0.9, "dmax": 0.5}
    k = keras.layers.BatchNormalization(renorm=True, renorm_clipping=clipping, renorm_momentum=0.9, momentum=0.95)
    ours = bn_simd.BatchNorm2d(3, eps=1e-3, momentum=0.05, layout="NHWC", unbiased_running_var=False, renorm=True,
                               renorm_clipping=clipping, renorm_momentum=0.1)
    n = 8 * 16
    for step in range(3):
        x = make_input((8, 3, 4, 4), "NHWC", np.float32, seed=95 + step, loc=step, scale=1 + step)
        g = make_input((8, 3, 4, 4), "NHWC", np.float32, seed=99 + step)
        xt = torch.tensor(x, requires_grad=True)
        yk = k(xt, training=True)
        yk.backward(torch.tensor(g))
        yk = yk.detach().numpy()
        y = ours(x)
        gx = ours.backward(g)
        assert_within(y, yk, tol(np.float32, n) * 16 * (1 + np.abs(yk)), "y")
        assert_within(gx, xt.grad.numpy(), tol(np.float32, n) * 64 * (1 + np.abs(gx)), "grad_x")
        gamma, beta = k.gamma.value.grad.numpy(), k.beta.value.grad.numpy()
        k.gamma.value.grad = k.beta.value.grad = None
        assert_within(ours.grad_weight, gamma, tol(np.float32, n) * np.abs(g).sum() / 3 * 4, "grad_weight")
        assert_within(ours.grad_bias, beta, tol(np.float32, n) * np.abs(g).sum() / 3 * 4, "grad_bias")
    for ours_name, keras_name in (("running_mean", "moving_mean"), ("running_var", "moving_variance"),
                                  ("running_std", "moving_stddev"), ("renorm_mean", "renorm_mean"),
                                  ("renorm_std", "renorm_stddev")):
        theirs = getattr(k, keras_name).numpy()
        assert_within(getattr(ours, ours_name), theirs, tol(np.float32, n) * 8 * (1 + np.abs(theirs)), ours_name)
    ours.eval()
    x = make_input((2, 3, 4, 4), "NHWC", np.float32, seed=103)
    yk = k(torch.tensor(x), training=False).detach().numpy()
    assert_within(ours(x), yk, tol(np.float32, n) * 16 * (1 + np.abs(yk)), "eval y")


def test_update_renorm_stats_of_no_virtual_batch_changes_nothing():
    """(0, C) statistics (an empty batch in virtual batches) leave the five statistics, as n = 0 does; they were
    averaged over no rows into NaN."""
    x = np.zeros((0, 3, 4), np.float32)
    _, m, s, _, _ = bn_simd.batch_renorm_forward(x, np.zeros(3), np.ones(3), virtual_batch_size=4)
    assert m.shape == (0, 3)
    st = [np.zeros(3), np.ones(3), np.ones(3), np.zeros(3), np.ones(3)]
    before = [a.copy() for a in st]
    bn_simd.update_renorm_stats(*st, m, s, 16)
    for a, b in zip(st, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("call", ["update_renorm_stats", "update_running_stats"])
def test_the_unbiased_flag_is_checked_by_name(call):
    st = [np.zeros(3), np.ones(3), np.ones(3), np.zeros(3), np.ones(3)]
    before = [a.copy() for a in st]
    with pytest.raises(TypeError, match="unbiased must be a bool"):
        if call == "update_renorm_stats":
            bn_simd.update_renorm_stats(*st, np.ones(3), np.ones(3), 4, unbiased=np.array([True, False]))
        else:
            bn_simd.update_running_stats(st[0], st[1], np.ones(3), np.ones(3), 4, 0.1,
                                         unbiased=np.array([True, False]))
    for a, b in zip(st, before):
        np.testing.assert_array_equal(a, b)
