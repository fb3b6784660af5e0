"""The out= argument: in place, separate buffers, aliasing of backward, and rejected buffers that change nothing."""
import numpy as np
import pytest

import bn_simd
from conftest import DTYPES, LAYOUTS, channel_params, make_input

SHAPE = (4, 6, 5, 5)


def _data(dtype=np.float32, layout="NCHW"):
    x = make_input(SHAPE, layout, dtype, seed=90, loc=1.0, scale=2.0)
    dy = make_input(SHAPE, layout, dtype, seed=91)
    w, b = channel_params(6, dtype, seed=92)
    return x, dy, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_out_separate_and_in_place(training, layout, dtype):
    x, _, w, b = _data(dtype, layout)
    rm0, rv0 = np.linspace(-1, 1, 6), np.linspace(0.5, 2, 6)
    rm, rv = rm0.copy(), rv0.copy()
    expected = bn_simd.batch_norm(x, rm, rv, w, b, training=training, layout=layout)
    rm_expected, rv_expected = rm.copy(), rv.copy()

    out = np.full_like(x, np.nan)
    rm, rv = rm0.copy(), rv0.copy()
    assert bn_simd.batch_norm(x, rm, rv, w, b, training=training, layout=layout, out=out) is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(rm, rm_expected)
    np.testing.assert_array_equal(rv, rv_expected)

    xi = x.copy()
    rm, rv = rm0.copy(), rv0.copy()
    assert bn_simd.batch_norm(xi, rm, rv, w, b, training=training, layout=layout, out=xi) is xi
    np.testing.assert_array_equal(xi, expected)
    np.testing.assert_array_equal(rm, rm_expected)
    np.testing.assert_array_equal(rv, rv_expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_and_normalize_out_in_place(layout, dtype):
    x, _, w, b = _data(dtype, layout)
    y, m, s = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    xi = x.copy()
    yi, mi, si = bn_simd.batch_norm_forward(xi, w, b, layout=layout, out=xi)
    assert yi is xi
    np.testing.assert_array_equal(yi, y)
    np.testing.assert_array_equal(mi, m)
    np.testing.assert_array_equal(si, s)
    mean, var = bn_simd.batch_stats(x, layout=layout)
    xi = x.copy()
    assert bn_simd.normalize(xi, mean, var, w, b, layout=layout, out=xi) is xi
    np.testing.assert_array_equal(xi, y)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("alias", ["separate", "grad_out", "x"])
def test_backward_out_may_be_separate_grad_out_or_x(alias, layout, dtype, training):
    x, dy, w, _ = _data(dtype, layout)
    _, m, s = bn_simd.batch_norm_forward(x, w, layout=layout)
    expected = bn_simd.batch_norm_backward(dy, x, m, s, w, layout=layout, training=training)
    x2, dy2 = x.copy(), dy.copy()
    out = {"separate": np.empty_like(x), "grad_out": dy2, "x": x2}[alias]
    gx, gw, gb = bn_simd.batch_norm_backward(dy2, x2, m, s, w, layout=layout, out=out, training=training)
    assert gx is out
    np.testing.assert_array_equal(gx, expected[0])
    np.testing.assert_array_equal(gw, expected[1])
    np.testing.assert_array_equal(gb, expected[2])


@pytest.mark.parametrize("alias", ["grad_out", "x"])
def test_backward_apply_out_may_alias_its_inputs(alias):
    x, dy, w, b = _data(np.float64)
    mean = np.linspace(0, 1, 6)
    expected = bn_simd.backward_apply(dy, x, mean, w, b, w)
    x2, dy2 = x.copy(), dy.copy()
    out = dy2 if alias == "grad_out" else x2
    assert bn_simd.backward_apply(dy2, x2, mean, w, b, w, out=out) is out
    np.testing.assert_array_equal(out, expected)


def test_out_may_be_a_view_of_all_of_x():
    x, _, w, b = _data()
    expected = bn_simd.batch_norm(x, None, None, w, b, training=True)
    xi = x.copy()
    view = xi.view()
    assert bn_simd.batch_norm(xi, None, None, w, b, training=True, out=view) is view
    np.testing.assert_array_equal(xi, expected)


def test_layer_out_in_place():
    x, _, _, _ = _data()
    expected = bn_simd.BatchNorm2d(6)(x)
    layer = bn_simd.BatchNorm2d(6)
    xi = x.copy()
    assert layer(xi, out=xi) is xi
    np.testing.assert_array_equal(xi, expected)


# ---- rejected buffers ----------------------------------------------------------------------------------------

def _read_only(a):
    a.setflags(write=False)
    return a


BAD_OUTS = {
    "wrong_shape": (lambda x: np.zeros((4, 6, 5, 4), x.dtype), ValueError, "out must have shape"),
    "wrong_rank": (lambda x: np.zeros(x.size, x.dtype), ValueError, "out must have shape"),
    "wrong_dtype": (lambda x: np.zeros(x.shape, np.float64 if x.dtype == np.float32 else np.float32), TypeError,
                    "out must have dtype"),
    "byteswapped": (lambda x: np.zeros(x.shape, x.dtype.newbyteorder("S")), TypeError, "out must have dtype"),
    "fortran": (lambda x: np.zeros(x.shape, x.dtype, order="F"), ValueError, "C-contiguous"),
    "strided": (lambda x: np.zeros((4, 12, 5, 5), x.dtype)[:, ::2], ValueError, "C-contiguous"),
    "read_only": (lambda x: _read_only(np.zeros_like(x)), ValueError, "writeable"),
    "list": (lambda x: np.zeros_like(x).tolist(), TypeError, "numpy.ndarray"),
}


@pytest.mark.parametrize("kind", list(BAD_OUTS))
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_rejects_bad_out_and_changes_nothing(kind, training):
    make_out, exc, match = BAD_OUTS[kind]
    x, _, w, b = _data()
    x0 = x.copy()
    rm, rv = np.full(6, 0.5), np.full(6, 2.0)
    out = make_out(x)
    out0 = np.array(out, copy=True)
    with pytest.raises(exc, match=match):
        bn_simd.batch_norm(x, rm, rv, w, b, training=training, out=out)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)
    np.testing.assert_array_equal(np.asarray(out), out0)


@pytest.mark.parametrize("kind", list(BAD_OUTS))
def test_other_calls_reject_bad_out(kind):
    make_out, exc, match = BAD_OUTS[kind]
    x, dy, w, b = _data()
    mean, var = bn_simd.batch_stats(x)
    s = 1 / np.sqrt(var + 1e-5)
    calls = [
        lambda o: bn_simd.batch_norm_forward(x, w, b, out=o),
        lambda o: bn_simd.normalize(x, mean, var, w, b, out=o),
        lambda o: bn_simd.batch_norm_backward(dy, x, mean, s, w, out=o),
        lambda o: bn_simd.backward_apply(dy, x, mean, w, b, w, out=o),
    ]
    for call in calls:
        out = make_out(x)
        out0 = np.array(out, copy=True)
        with pytest.raises(exc, match=match):
            call(out)
        np.testing.assert_array_equal(np.asarray(out), out0)


def _overlapping(buf):
    """x and an out that share memory without being the same array."""
    return buf[:4], buf[1:]


@pytest.mark.parametrize("training", [True, False])
def test_out_partially_overlapping_x_is_rejected(training):
    buf = make_input((5, 6, 5, 5), "NCHW", np.float32, seed=93)
    before = buf.copy()
    x, out = _overlapping(buf)
    rm, rv = np.zeros(6), np.ones(6)
    with pytest.raises(ValueError, match="overlaps x partially"):
        bn_simd.batch_norm(x, rm, rv, training=training, out=out)
    np.testing.assert_array_equal(buf, before)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)


def test_out_starting_where_x_starts_with_other_strides_is_rejected():
    # same first byte, different strides: the layouts of x and out disagree element for element
    buf = make_input((6, 6, 5, 5), "NCHW", np.float32, seed=94)
    before = buf.copy()
    x = buf[:3]
    out = buf.reshape(3, 2, 6, 5, 5)[:, 0]  # rows 0, 2, 4 of buf: starts where x does, strides differ
    assert out.shape == x.shape and not out.flags.c_contiguous
    with pytest.raises(ValueError):
        bn_simd.batch_norm(x, training=True, out=out)
    np.testing.assert_array_equal(buf, before)


@pytest.mark.parametrize("which", ["x", "grad_out"])
def test_backward_out_partially_overlapping_an_input_is_rejected(which):
    buf = make_input((5, 6, 5, 5), "NCHW", np.float32, seed=95)
    other = make_input((4, 6, 5, 5), "NCHW", np.float32, seed=96)
    before = buf.copy()
    a, out = _overlapping(buf)
    x, dy = (a, other) if which == "x" else (other, a)
    with pytest.raises(ValueError, match=f"overlaps {which} partially"):
        bn_simd.batch_norm_backward(dy, x, np.zeros(6), np.ones(6), out=out)
    np.testing.assert_array_equal(buf, before)


def test_layer_rejects_bad_out_and_keeps_its_state():
    layer = bn_simd.BatchNorm2d(6)
    x, _, _, _ = _data()
    with pytest.raises(ValueError):
        layer(x, out=np.zeros((4, 6, 5, 4), np.float32))
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, 0.0)
    np.testing.assert_array_equal(layer.running_var, 1.0)
    with pytest.raises(RuntimeError):
        layer.backward(x)  # the failed call saved nothing for backward
