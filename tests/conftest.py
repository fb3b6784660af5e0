"""Shared fixtures and helpers: tolerances, ISA selection, thread settings, arrays in a layout, --runslow."""
import os
import re
import sys

import numpy as np
import pytest

import bn_simd
from bn_simd import _core

sys.path.insert(0, os.path.dirname(__file__))
import oracle as ref  # noqa: E402
from bounds import (EPS64, apply_tol, assert_ulp_close, assert_within, backward_bounds, eps_of,  # noqa: E402,F401
                    forward_bound, reduction_tol, stat_tol)

CONFIG = bn_simd.show_config()
SUPPORTED_ISAS = list(CONFIG["supported_isas"])
HAVE_OPENMP = bool(CONFIG["openmp"])
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
    _core.set_stream_bytes(None)
    _core.set_act_otf(None)


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


# ---- tolerances (bounds.py: importable without pytest) ------------------------------------------------------

def assert_forward_close(y, x, weight=None, bias=None, eps=1e-5, layout="NCHW", what="y"):
    """The training-mode output y of x against the oracle, within forward_bound."""
    x64 = np.asarray(x, dtype=np.float64)
    y_ref, mean, var = ref.forward_train(x64, weight, bias, eps, layout)
    n = ref.reduction_size(x64.shape, layout)
    assert_within(y, y_ref, forward_bound(x64, np.asarray(y).dtype, n, weight, bias, eps, layout, mean, var), what)


# ---- short names used by other test modules ----------------------------------------------------------------------

def tol(dtype, n=1):
    """Scalar absolute bound for an O(1) normalised output (|w| ~ 1, |xhat| a few): apply_tol + reduction_tol,
    scaled by 8 for |xhat| up to about 7."""
    return 8.0 * (apply_tol(dtype) + reduction_tol(n))


def channels(shape, layout):
    return ref.num_channels(shape, layout)


make = random_array
ISAS = SUPPORTED_ISAS


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


# ---- the registry (ops.py): refusals ------------------------------------------------------------------------------

def assert_refused(ep, case, exc, patterns, out=None, keep=None):
    """Calling the entry point ep on `case` (after its prepare) raises exc whose message matches every regular
    expression in `patterns`, and changes nothing: every array of the case, `out` and the arrays in `keep` (buffers
    that views were cut from) are byte for byte what they were, and so are the thread count and the ISA."""
    ctx = ep.prepare(case) if ep.prepare is not None else None
    arrays = dict(case.arrays, out=out, **(keep or {}))
    snap = {k: (v, v.dtype, v.shape, v.strides, v.tobytes()) for k, v in arrays.items() if isinstance(v, np.ndarray)}
    threads, isa = bn_simd.get_num_threads(), bn_simd.get_isa()
    with pytest.raises(exc) as info:
        ep.run(case, ctx, out)
    for p in patterns:
        assert re.search(p, str(info.value)), f"{ep.name}: message {str(info.value)!r} does not match {p!r}"
    for k, (v, dtype, shape, strides, raw) in snap.items():
        assert v.dtype == dtype and v.shape == shape and v.strides == strides, f"{k}: metadata changed"
        assert v.tobytes() == raw, f"{ep.name}: {k} was modified by a call that raised"
    assert bn_simd.get_num_threads() == threads and bn_simd.get_isa() == isa


def past_line(a, offset):
    """A copy of a starting offset bytes past a 64-byte boundary."""
    buf = np.empty(a.nbytes + 128, np.uint8)
    start = -buf.ctypes.data % 64 + offset
    v = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    v[...] = a
    return v


def assert_same_bits(a, b, what="value"):
    """a and b are arrays of the same dtype and shape with the same bytes (None and None pass): bitwise identity,
    compared as unsigned integers of the element size (fast on large arrays, and NaN payloads and signed zeros
    count)."""
    if a is None or b is None:
        assert a is None and b is None, f"{what}: {type(a).__name__} vs {type(b).__name__}"
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    as_int = np.dtype(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else None
    if as_int is not None and a.dtype.kind in "fiu" and np.array_equal(np.ascontiguousarray(a).view(as_int),
                                                                      np.ascontiguousarray(b).view(as_int)):
        return
    np.testing.assert_array_equal(a, b, err_msg=what)  # a readable message (or equal values with other bits)
    assert a.tobytes() == b.tobytes(), f"{what}: equal values with other bits (signed zeros or NaN payloads)"
