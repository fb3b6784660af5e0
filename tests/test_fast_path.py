"""batch_norm's fast path (plain ndarrays, Python float eps/momentum, layout "NCHW"/"NHWC") against its general
path (taken here through the layout aliases): the same bytes for y and the running statistics, and the general
path's errors for anything the fast path does not take."""
import numpy as np
import pytest

import bn_simd
from conftest import make_input

ALIAS = {"NCHW": "channels_first", "NHWC": "channels_last"}


def _run(layout, x, rm, rv, w, b, training, out_kind, unbiased):
    x = x.copy()
    rm = None if rm is None else rm.copy()
    rv = None if rv is None else rv.copy()
    out = {"none": None, "x": x, "new": np.full_like(x, np.nan)}[out_kind]
    y = bn_simd.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, layout=layout, out=out,
                           unbiased_running_var=unbiased)
    if out is not None:
        assert y is out
    return y, rm, rv


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stat_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("out_kind", ["none", "x", "new"])
def test_fast_path_gives_the_general_paths_bytes(layout, dtype, stat_dtype, training, affine, out_kind):
    shape = (3, 5, 4, 3) if layout == "NCHW" else (3, 4, 3, 5)
    x = make_input((3, 5, 4, 3), layout, dtype, seed=7, loc=0.5, scale=2.0)
    assert x.shape == shape
    rng = np.random.default_rng(8)
    rm, rv = rng.standard_normal(5).astype(stat_dtype), rng.uniform(0.5, 2, 5).astype(stat_dtype)
    w = rng.uniform(0.5, 1.5, 5).astype(dtype) if affine else None
    b = rng.uniform(-1, 1, 5).astype(dtype) if affine else None
    for unbiased in (True, False):
        fast = _run(layout, x, rm, rv, w, b, training, out_kind, unbiased)
        slow = _run(ALIAS[layout], x, rm, rv, w, b, training, out_kind, unbiased)
        for f, s in zip(fast, slow):
            assert f.dtype == s.dtype and f.shape == s.shape
            assert f.tobytes() == s.tobytes()


def test_fast_path_training_without_running_stats():
    x = make_input((4, 6, 5), "NCHW", np.float32, seed=9)
    np.testing.assert_array_equal(bn_simd.batch_norm(x, training=True),
                                  bn_simd.batch_norm(x, training=True, layout="channels_first"))


@pytest.mark.parametrize("case", ["read-only running_var", "partial overlap", "out wrong dtype", "one value",
                                  "eval without stats", "momentum > 1", "eps = 0", "weight wrong length"])
def test_arguments_the_fast_path_declines_still_raise(case):
    x = make_input((2, 4, 3, 3), "NCHW", np.float32, seed=10)
    rm, rv, w = np.zeros(4, np.float32), np.ones(4, np.float32), np.ones(4, np.float32)
    kw = dict(running_mean=rm, running_var=rv, weight=w, training=True)
    if case == "read-only running_var":
        rv.flags.writeable = False
    elif case == "partial overlap":
        buf = np.zeros(x.size + 1, np.float32)
        x = buf[1:].reshape(x.shape)
        kw["out"] = buf[:-1].reshape(x.shape)
    elif case == "out wrong dtype":
        kw["out"] = np.empty(x.shape, np.float64)
    elif case == "one value":
        x = x[:1, :, :1, :1].copy()
    elif case == "eval without stats":
        kw.update(running_mean=None, running_var=None, training=False)
    elif case == "momentum > 1":
        kw["momentum"] = 1.5
    elif case == "eps = 0":
        kw["eps"] = 0.0
    elif case == "weight wrong length":
        kw["weight"] = np.ones(3, np.float32)
    before = (rm.tobytes(), rv.tobytes(), x.tobytes())
    with pytest.raises((ValueError, TypeError)):
        bn_simd.batch_norm(x, **kw)
    assert (rm.tobytes(), rv.tobytes(), x.tobytes()) == before


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("w_dtype", [None, np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("out_kind", ["none", "x", "grad_out", "new"])
def test_backward_fast_path_gives_the_general_paths_bytes(layout, dtype, w_dtype, training, out_kind):
    x = make_input((3, 5, 4, 3), layout, dtype, seed=11, loc=0.5, scale=2.0)
    g = make_input((3, 5, 4, 3), layout, dtype, seed=12)
    rng = np.random.default_rng(13)
    mean, invstd = rng.standard_normal(5), rng.uniform(0.5, 2, 5)
    w = None if w_dtype is None else rng.uniform(0.5, 1.5, 5).astype(w_dtype)
    results = []
    for lay in (layout, ALIAS[layout]):
        xc, gc = x.copy(), g.copy()
        out = {"none": None, "x": xc, "grad_out": gc, "new": np.full_like(xc, np.nan)}[out_kind]
        r = bn_simd.batch_norm_backward(gc, xc, mean, invstd, w, layout=lay, out=out, training=training)
        if out is not None:
            assert r[0] is out
        results.append(r)
    for f, s in zip(*results):
        assert f.dtype == s.dtype and f.shape == s.shape
        assert f.tobytes() == s.tobytes()


def test_out_with_x_data_but_other_strides_is_refused_like_the_general_path():
    # C-contiguous flags ignore size-1 axes: same data pointer, different strides is not "x itself"
    from numpy.lib.stride_tricks import as_strided
    x = np.arange(8, dtype=np.float32).reshape(4, 1, 2)
    out = as_strided(x, strides=(8, 12345, 4))
    before = x.tobytes()
    with pytest.raises(ValueError, match="out overlaps x"):
        bn_simd.batch_norm(x, training=True, out=out)
    with pytest.raises(ValueError, match="out overlaps"):
        bn_simd.batch_norm_backward(x, x, np.zeros(1), np.ones(1), out=out)
    assert x.tobytes() == before


def test_unbiased_flag_is_read_only_when_running_stats_are_updated():
    x = make_input((4, 3, 5), "NCHW", np.float32, seed=14)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y = bn_simd.batch_norm(x, rm, rv, training=False, unbiased_running_var=np.zeros(2))  # no truth value
    np.testing.assert_array_equal(y, bn_simd.batch_norm(x, rm, rv, training=False, layout="channels_first"))


@pytest.mark.parametrize("case", ["huge weight", "tiny eps"])
def test_float32_scale_beyond_float32_is_computed_in_double(case):
    if case == "huge weight":
        x, w, eps, expected = np.array([[.5], [-.5], [.25], [-.25]], np.float32), np.array([1e39]), 1e-5, None
    else:
        x, w, eps = np.array([[0], [1e-40], [0], [1e-40]], np.float32), None, 1e-300
        expected = np.array([-1, 1, -1, 1], np.float32)
    y = bn_simd.batch_norm(x, None, None, w, None, True, eps=eps, layout="NHWC").ravel()
    if expected is None:  # the exact result overflows float32: +-inf with the input's signs, never a clamped value
        np.testing.assert_array_equal(y, np.copysign(np.inf, x.ravel()))
    else:
        np.testing.assert_allclose(y, expected, rtol=1e-6)
