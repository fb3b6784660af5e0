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


# ---- the four steps: batch_stats, normalize, backward_reduce, backward_apply ----------------------------------

def _steps(layout, x, g, coef, out_kind):
    """Every step on copies of x and g, in `layout` (an alias takes the general path), with out as given."""
    mean, var, w, b, m, a, bb, d = coef
    results = {}
    results["stats"] = bn_simd.batch_stats(x.copy(), layout=layout)
    xc = x.copy()
    out = {"none": None, "x": xc, "grad_out": None, "new": np.full_like(xc, np.nan)}[out_kind]
    y = bn_simd.normalize(xc, mean, var, w, b, eps=1e-3, layout=layout, out=out)
    assert out is None or y is out
    results["normalize"] = (y,)
    results["reduce"] = bn_simd.backward_reduce(g.copy(), x.copy(), m, layout=layout)
    xc, gc = x.copy(), g.copy()
    out = {"none": None, "x": xc, "grad_out": gc, "new": np.full_like(xc, np.nan)}[out_kind]
    dx = bn_simd.backward_apply(gc, xc, m, a, bb, d, layout=layout, out=out)
    assert out is None or dx is out
    results["apply"] = (dx,)
    return results


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("coef_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("out_kind", ["none", "x", "grad_out", "new"])
def test_step_fast_paths_give_the_general_paths_bytes(layout, dtype, coef_dtype, affine, out_kind):
    x = make_input((3, 5, 4, 3), layout, dtype, seed=15, loc=1e3, scale=2.0)  # mean far from 0: m's residual
    g = make_input((3, 5, 4, 3), layout, dtype, seed=16)
    rng = np.random.default_rng(17)
    mean = (1e3 + rng.standard_normal(5) / 3).astype(coef_dtype)  # not float32-representable in float64
    var = rng.uniform(0.5, 2, 5).astype(coef_dtype)
    w = rng.uniform(0.5, 1.5, 5).astype(coef_dtype) if affine else None
    b = rng.uniform(-1, 1, 5).astype(coef_dtype) if affine else None
    m, a, bb, d = mean, *(rng.standard_normal(5).astype(coef_dtype) for _ in range(3))
    coef = (mean, var, w, b, m, a, bb, d)
    fast = _steps(layout, x, g, coef, out_kind)
    slow = _steps(ALIAS[layout], x, g, coef, out_kind)
    for step in fast:
        for f, s in zip(fast[step], slow[step]):
            assert f.dtype == s.dtype and f.shape == s.shape, step
            assert f.tobytes() == s.tobytes(), step


@pytest.mark.parametrize("case", ["eps = 0", "eps an int", "mean wrong length", "var None", "out wrong dtype",
                                  "out partial overlap", "out read-only", "float16 x", "grad_out other shape",
                                  "d None", "layout unknown"])
def test_arguments_the_step_fast_paths_decline_still_raise(case):
    x = make_input((2, 4, 3, 3), "NCHW", np.float32, seed=18)
    g = make_input((2, 4, 3, 3), "NCHW", np.float32, seed=19)
    v = np.ones(4, np.float32)
    norm = dict(mean=v, var=v, eps=1e-5, layout="NCHW", out=None)
    apply = dict(layout="NCHW", out=None)
    coefs = [v, v, v, v]
    if case == "eps = 0":
        norm["eps"] = 0.0
    elif case == "eps an int":  # the general path takes it (a real number)...
        np.testing.assert_array_equal(bn_simd.normalize(x, v, v, eps=1), bn_simd.normalize(x, v, v, eps=1.0))
        norm["eps"] = -1  # ...and refuses a negative one
    elif case == "mean wrong length":
        norm["mean"] = coefs[0] = np.ones(3, np.float32)
    elif case == "var None":
        norm["var"] = None
        coefs[1] = None
    elif case == "out wrong dtype":
        norm["out"] = apply["out"] = np.empty(x.shape, np.float64)
    elif case == "out partial overlap":
        buf = np.zeros(x.size + 1, np.float32)
        x = buf[1:].reshape(x.shape)
        x[...] = g
        norm["out"] = apply["out"] = buf[:-1].reshape(x.shape)
    elif case == "out read-only":
        ro = np.empty_like(x)
        ro.flags.writeable = False
        norm["out"] = apply["out"] = ro
    elif case == "float16 x":
        x = x.astype(np.float16)
    elif case == "grad_out other shape":
        g = g[:, :, :2].copy()
    elif case == "d None":
        coefs[3] = None
    elif case == "layout unknown":
        norm["layout"] = apply["layout"] = "NWHC"
    before = (x.tobytes(), g.tobytes())
    outs = [o.tobytes() for o in (norm["out"], apply["out"]) if o is not None]
    raised = 0
    for call in (lambda: bn_simd.normalize(x, norm.pop("mean"), norm.pop("var"), **norm),
                 lambda: bn_simd.backward_apply(g, x, *coefs, **apply)):
        try:
            call()
        except (ValueError, TypeError):
            raised += 1
    assert raised >= 1
    if case in ("mean wrong length", "out wrong dtype", "out partial overlap", "out read-only", "float16 x",
                "layout unknown", "var None"):
        assert raised == 2, case
    assert (x.tobytes(), g.tobytes()) == before
    assert [o.tobytes() for o in (norm["out"], apply["out"]) if o is not None] == outs
    if case in ("float16 x", "layout unknown", "grad_out other shape"):
        with pytest.raises((ValueError, TypeError)):
            bn_simd.backward_reduce(g, x, v, layout=apply["layout"])
        if case != "grad_out other shape":
            with pytest.raises((ValueError, TypeError)):
                bn_simd.batch_stats(x, layout=apply["layout"])


def test_a_float32_coefficient_beyond_float32_warns_as_the_general_path_does():
    # backward_apply rounds its coefficients to x's dtype: 1e39 overflows float32, which NumPy's cast reports
    x = make_input((2, 3, 4), "NCHW", np.float32, seed=20)
    g = make_input((2, 3, 4), "NCHW", np.float32, seed=21)
    a = np.array([1.0, 1e39, 1.0])
    z = np.zeros(3)
    with pytest.warns(RuntimeWarning, match="overflow"):
        fast = bn_simd.backward_apply(g, x, z, a, z, z)
    with pytest.warns(RuntimeWarning, match="overflow"):
        slow = bn_simd.backward_apply(g, x, z, a, z, z, layout="channels_first")
    assert fast.tobytes() == slow.tobytes()
    assert np.all(np.isinf(fast[:, 1][g[:, 1] != 0]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", ["mean inf", "b inf", "d nan", "residual overflows"])
def test_non_finite_backward_apply_coefficients_behave_as_on_the_general_path(dtype, bad):
    # NumPy's arithmetic on the coefficients reports what is not finite: the same warnings, errstate and bytes
    x = make_input((2, 3, 4), "NCHW", dtype, seed=22, loc=0.3)
    g = make_input((2, 3, 4), "NCHW", dtype, seed=23)
    m, a, b, d = np.full(3, 0.1), np.ones(3), np.ones(3), np.zeros(3)
    if bad == "mean inf":
        m[1] = np.inf
    elif bad == "b inf":
        b[2] = np.inf
    elif bad == "d nan":
        d[0] = np.nan
    else:  # b * (mean - m) overflows float64 (float32 data) or is finite (float64 data: mean - m = 0)
        m[1], b[1] = 0.1, 1e308 / 1e-18
    results = []
    for layout in ("NCHW", "channels_first"):
        with np.errstate(all="ignore"):
            results.append(bn_simd.backward_apply(g, x, m, a, b, d, layout=layout))
        with np.errstate(all="raise"):
            try:
                bn_simd.backward_apply(g, x, m, a, b, d, layout=layout)
                results.append("no error")
            except FloatingPointError as e:
                results.append(type(e).__name__)
    assert results[0].tobytes() == results[2].tobytes()
    assert results[1] == results[3]


def test_backward_apply_out_partly_overlapping_grad_out_is_refused():
    buf = np.zeros(2 * 3 * 4 + 1, np.float32)
    g = buf[1:].reshape(2, 3, 4)
    g[...] = 1.0
    out = buf[:-1].reshape(2, 3, 4)
    x = make_input((2, 3, 4), "NCHW", np.float32, seed=24)
    v = np.ones(3, np.float32)
    before = buf.tobytes()
    with pytest.raises(ValueError, match="out overlaps grad_out"):
        bn_simd.backward_apply(g, x, v, v, v, v, out=out)
    assert buf.tobytes() == before
