"""Shared fixtures and helpers: tolerances, ISA selection, thread settings, arrays in a layout, --runslow."""
import math
import os
import sys

import numpy as np
import pytest

import bn_simd
from bn_simd import _core

sys.path.insert(0, os.path.dirname(__file__))
import reference as ref  # noqa: E402

CONFIG = bn_simd.show_config()
SUPPORTED_ISAS = list(CONFIG["supported_isas"])
HAVE_OPENMP = bool(CONFIG["openmp"])
EPS64 = float(np.finfo(np.float64).eps)
LAYOUTS = ("NCHW", "NHWC")
DTYPES = (np.float32, np.float64)


# ---- --runslow / the slow marker ----------------------------------------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: pass --runslow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


# ---- global state: ISA and threads ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _restore_global_state():
    """Every test starts and ends with the process-wide settings it found (kernels, thread count)."""
    isa = bn_simd.get_isa()
    yield
    bn_simd.set_isa(isa)
    bn_simd.set_num_threads(None)
    _core.set_cl_strip_bytes(None)
    _core.set_slab_bytes(None)


# Channels-last element-wise sweeps over wide rows go flat or in column strips depending on the CPU
# (bn_simd._core.cl_strip_bytes): tests of wide rows force each, so that both paths run on any machine.
STRIP_SETTINGS = {"cpu": None, "strips": 24576, "flat": 1 << 62}


def use_strips(setting):
    _core.set_cl_strip_bytes(STRIP_SETTINGS[setting])


# Channels-first training forward and backward group channels in L2 between reduction and sweep (the slab path) on
# some CPUs, with a budget of half the L2, and take two sweeps on others (bn_simd._core.slab_bytes): tests of the
# slab path force a budget, so that it runs on any machine.
SLAB_BUDGET = 1 << 20


def use_slab(nbytes=SLAB_BUDGET):
    _core.set_slab_bytes(nbytes)


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    """Runs the test once per ISA this CPU supports, with that ISA selected; restores the previous one."""
    previous = bn_simd.get_isa()
    bn_simd.set_isa(request.param)
    assert bn_simd.get_isa() == request.param
    yield request.param
    bn_simd.set_isa(previous)


@pytest.fixture
def threads():
    """bn_simd.set_num_threads for the test; the thread setting goes back to None (follow OpenMP) after it."""
    yield bn_simd.set_num_threads
    bn_simd.set_num_threads(None)


# ---- arrays -------------------------------------------------------------------------------------------------

def nchw_to(a, layout):
    """A (N, C, *spatial) array as a C-contiguous array in `layout` (same values, channels moved last for NHWC)."""
    a = np.asarray(a)
    if layout == "NCHW":
        return np.ascontiguousarray(a)
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def to_nchw(a, layout):
    """Inverse of nchw_to (a view)."""
    return a if layout == "NCHW" else np.moveaxis(a, -1, 1)


def layout_shape(nchw_shape, layout):
    """The shape of a (N, C, *spatial) tensor stored in `layout`."""
    s = tuple(nchw_shape)
    return s if layout == "NCHW" else (s[0],) + s[2:] + (s[1],)


def random_array(shape, dtype=np.float32, seed=0, loc=0.0, scale=1.0):
    """Normal(loc, scale) values of `dtype`, seeded."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def make_input(nchw_shape, layout="NCHW", dtype=np.float32, seed=0, loc=0.0, scale=1.0):
    """Seeded data for a (N, C, *spatial) tensor, stored C-contiguous in `layout`.

    The values do not depend on the layout: make_input(s, "NHWC") is nchw_to(make_input(s, "NCHW"), "NHWC").
    """
    return nchw_to(random_array(nchw_shape, dtype, seed, loc, scale), layout)


def channel_params(C, dtype=np.float64, seed=0):
    """Seeded (weight, bias): weights of both signs away from 0, biases O(1)."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    b = rng.standard_normal(C)
    return w.astype(dtype), b.astype(dtype)


# ---- tolerances -----------------------------------------------------------------------------------------------

def eps_of(dtype):
    return float(np.finfo(dtype).eps)


def reduction_tol(n):
    """Relative error of a float64 sum of n terms, as a fraction of the sum of their absolute values.

    Recursive summation of m terms errs by at most (m - 1) u sum|t| (u = eps64 / 2); the kernels split a
    reduction into SIMD lanes and fixed chunks, so the longest chain of additions is far below n, and
    rounding errors of independent terms add like a random walk. 8 (sqrt(n) + 1) eps64 is a generous
    bound of that walk; for float32 data it stays far below one float32 ulp up to n ~ 1e12.
    """
    return 8.0 * (math.sqrt(max(n, 1)) + 1.0) * EPS64


def apply_tol(dtype):
    """Relative error of the element-wise step y = (x - m) a + b computed in `dtype`.

    One rounding each for x - m, a, b, the product and the sum (the product and sum fuse with FMA), each
    at most u = eps / 2 of the magnitude of its result: about 2.5 eps of |w xhat| + |bias| + |y|. 4 eps
    of |w| (1 + |xhat|) + |bias| bounds it with margin.
    """
    return 4.0 * eps_of(dtype)


def forward_bound(x, dtype, n, weight=None, bias=None, eps=1e-5, layout="NCHW", mean=None, var=None,
                  batch_stats=True):
    """Element-wise bound on |y - y_ref| for a normalised output.

    y = w xhat + b with xhat = (x - mean) / sqrt(var + eps). Two sources of error:
      - the element-wise step in `dtype`: apply_tol(dtype) * (|w| (1 + |xhat|) + |b|);
      - batch statistics summed in float64 (batch_stats=True): an error dm in the mean moves y by
        |w| dm / std, and dm is at most reduction_tol(n) * mean|x| (a sum of n values of size ~|x|);
        a relative error dv of the variance (a sum of n positive squares: reduction_tol(n)) moves it by
        |w| |xhat| dv / 2. Together: |w| reduction_tol(n) (mean|x| / std + |xhat|).
    Running statistics (batch_stats=False) are exact inputs, so only the first term remains.
    """
    shape = np.shape(x)
    C = ref.num_channels(shape, layout)
    if mean is None or var is None:
        mean, var, _ = ref.stats(x, layout)
    mean = ref.per_channel(mean, C, 0.0)
    var = ref.per_channel(var, C, 1.0)
    w = np.abs(ref.per_channel(weight, C, 1.0))
    b = np.abs(ref.per_channel(bias, C, 0.0))
    xhat = np.abs(ref.to_cn(ref.normalize(x, mean, var, None, None, eps, layout), layout))
    bound = apply_tol(dtype) * (w[:, None] * (1.0 + xhat) + b[:, None])
    if batch_stats:
        mean_abs = np.abs(ref.to_cn(x, layout)).mean(axis=1) if n else np.zeros(C)
        cond = mean_abs / np.sqrt(var + eps)
        bound = bound + w[:, None] * reduction_tol(n) * (cond[:, None] + xhat)
    return ref.from_cn(bound, shape, layout)


def backward_bounds(dy, x, mean, inv_std, weight=None, layout="NCHW", training=True, dtype=np.float32):
    """Bounds on the errors of (dx, dw, db) against ref.backward, given the same saved statistics.

    dw and db are float64 sums cast to the output dtype: reduction_tol(n) of the sum of |terms|, plus
    eps |result| for the final rounding (twice the half-ulp it can cost). dx = a dy + b (x - m) + d is computed in `dtype` from coefficients rounded
    to `dtype`: apply_tol of the sum of the magnitudes of its terms, plus the sums' errors carried into
    the coefficients b and d (w s xhat / n and w s / n times the sums' bounds).
    """
    n = ref.reduction_size(np.shape(x), layout)
    C = ref.num_channels(np.shape(x), layout)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, inv_std, weight, layout, training)
    dx_scale, dw_scale, db_scale = ref.backward_magnitudes(dy, x, mean, inv_std, weight, layout, training)
    e = eps_of(dtype)
    dw_bound = reduction_tol(n) * dw_scale + e * np.abs(dw_ref)
    db_bound = reduction_tol(n) * db_scale + e * np.abs(db_ref)
    dx_bound = apply_tol(dtype) * ref.to_cn(dx_scale, layout)
    if training and n:
        ws = np.abs(ref.per_channel(weight, C, 1.0) * ref.per_channel(inv_std, C, 1.0))
        xhat = np.abs(ref.to_cn(x, layout) - ref.per_channel(mean, C, 0.0)[:, None]) * \
            ref.per_channel(inv_std, C, 1.0)[:, None]
        dx_bound = dx_bound + (ws / n)[:, None] * (reduction_tol(n) * (db_scale[:, None] + xhat * dw_scale[:, None]))
    return ref.from_cn(dx_bound, np.shape(x), layout), dw_bound, db_bound


def assert_within(actual, expected, bound, what="value"):
    """|actual - expected| <= bound element-wise (bound broadcasts), with a useful message on failure."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), err.shape)
    bad = ~(err <= bound)  # NaN counts as a failure
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / np.where(bound > 0, bound, np.inf), -1)), err.shape) \
            if err.ndim else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements out of bound; e.g. at {tuple(int(k) for k in i)}: "
            f"got {actual[i]!r}, expected {expected[i]!r}, |diff| {err[i]:.3g} > bound {bound[i]:.3g}")


def assert_forward_close(y, x, weight=None, bias=None, eps=1e-5, layout="NCHW", what="y"):
    """The training-mode output y of x against the oracle, within forward_bound."""
    x64 = np.asarray(x, dtype=np.float64)
    y_ref, mean, var = ref.forward_train(x64, weight, bias, eps, layout)
    n = ref.reduction_size(x64.shape, layout)
    assert_within(y, y_ref, forward_bound(x64, np.asarray(y).dtype, n, weight, bias, eps, layout, mean, var), what)


def assert_ulp_close(a, b, scale, ulps, dtype, what="value"):
    """|a - b| <= ulps * spacing(scale) in `dtype`: two implementations that round differently."""
    spacing = np.spacing(np.abs(np.asarray(scale, dtype=dtype))).astype(np.float64)
    assert_within(a, b, ulps * spacing, what)


# ---- short names used by other test modules ----------------------------------------------------------------------

def tol(dtype, n=1):
    """Scalar absolute bound for an O(1) normalised output (|w| ~ 1, |xhat| a few): apply_tol + reduction_tol,
    scaled by 8 for |xhat| up to about 7."""
    return 8.0 * (apply_tol(dtype) + reduction_tol(n))


def channels(shape, layout):
    return ref.num_channels(shape, layout)


make = random_array
ISAS = SUPPORTED_ISAS


def stat_tol(n, dtype):
    """Relative bound for a per-channel statistic computed in float64 and returned in `dtype`."""
    return reduction_tol(n) + eps_of(dtype)


def assert_float64_apply_for_the_whole_call(x, w, b, threads):
    """The training forward of x (a float32 NCHW array, whose channels w and b describe, one of which needs the
    float64 apply) agrees with the oracle on one thread, and gives the same bits on 2 and 3 threads and in place."""
    threads(1)
    y1 = bn_simd.batch_norm(x, None, None, w, b, training=True)
    y_ref = ref.forward_train(x.astype(np.float64), w, b)[0]
    np.testing.assert_allclose(y1, y_ref, rtol=8 * eps_of(np.float32), atol=1e-6)
    for n in (2, 3):
        threads(n)
        np.testing.assert_array_equal(bn_simd.batch_norm(x, None, None, w, b, training=True), y1, err_msg=f"{n}")
        xi = x.copy()
        bn_simd.batch_norm(xi, None, None, w, b, training=True, out=xi)
        np.testing.assert_array_equal(xi, y1, err_msg=f"in place, {n} threads")
    return y1
