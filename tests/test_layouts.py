"""Layouts and memory: NCHW vs NHWC on the same data, unusual strides and byte orders, inputs left untouched."""
import numpy as np
import pytest

import bn_simd
import reference as ref
from conftest import (DTYPES, assert_forward_close, assert_within, backward_bounds, channel_params, make_input,
                      nchw_to, random_array, to_nchw)


def _everything(x, dy, layout):
    """Every output of the API on one input: forward train/eval, running stats, saved stats, backward."""
    C = ref.num_channels(x.shape, layout)
    w, b = channel_params(C, np.float64, seed=1)
    rm, rv = np.zeros(C), np.ones(C)
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, layout=layout)
    ye = bn_simd.batch_norm(x, rm, rv, w, b, training=False, layout=layout)
    _, m, s = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x, m, s, w, layout=layout)
    return {"y": y, "y_eval": ye, "grad_x": gx}, {"running_mean": rm, "running_var": rv, "mean": m, "invstd": s,
                                                   "grad_weight": gw, "grad_bias": gb}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nchw_shape", [(4, 5, 6, 7), (3, 33, 9), (64, 17), (2, 3, 4, 5, 6), (5, 1, 8), (2, 300, 3),
                                        (5, 1296, 7), (3, 2053, 5)],
                         ids=lambda s: "x".join(map(str, s)))
def test_nchw_and_nhwc_agree_on_the_same_data(nchw_shape, dtype, isa):
    x = make_input(nchw_shape, "NCHW", dtype, seed=2, loc=-3.0, scale=2.0)
    dy = make_input(nchw_shape, "NCHW", dtype, seed=3)
    first, first_vec = _everything(x, dy, "NCHW")
    last, last_vec = _everything(nchw_to(x, "NHWC"), nchw_to(dy, "NHWC"), "NHWC")
    e = np.finfo(dtype).eps
    n = x.size // nchw_shape[1]
    for k in first:
        # each is within a few ulp of the same float64 value (see test_forward / test_backward): 8 ulp apart at most
        scale = 1 + np.abs(first[k])
        if k == "grad_x":
            scale = 8 * backward_bounds(dy, x, first_vec["mean"], first_vec["invstd"], channel_params(
                nchw_shape[1], np.float64, seed=1)[0], "NCHW", True, dtype)[0] / (4 * e)
        assert_within(to_nchw(last[k], "NHWC"), first[k], 8 * e * scale, k)
    for k in first_vec:
        rtol = 4 * e if k not in ("grad_weight", "grad_bias") else 4 * e * np.sqrt(n)
        np.testing.assert_allclose(last_vec[k], first_vec[k], rtol=rtol, atol=rtol * (1 + np.abs(first_vec[k]).max()),
                                   err_msg=k)


def _variant(base, kind):
    """The values of `base` held in memory another way."""
    if kind == "fortran":
        return np.asfortranarray(base)
    if kind == "negative_strides":
        return np.ascontiguousarray(base[::-1, :, ::-1, ::-1])[::-1, :, ::-1, ::-1]
    if kind == "strided_slice":
        big = np.zeros(base.shape[:1] + (2 * base.shape[1],) + base.shape[2:], base.dtype)
        big[:, ::2] = base
        return big[:, ::2]
    if kind == "byteswapped":
        return base.astype(base.dtype.newbyteorder("S"))
    if kind == "read_only":
        a = base.copy()
        a.setflags(write=False)
        return a
    if kind == "unaligned":
        raw = np.zeros(base.nbytes + 1, np.uint8)
        a = raw[1:].view(base.dtype).reshape(base.shape)
        a[...] = base
        return a
    if kind == "transposed_view":
        return np.ascontiguousarray(np.swapaxes(base, 2, 3)).swapaxes(2, 3)
    raise AssertionError(kind)


KINDS = ["fortran", "negative_strides", "strided_slice", "byteswapped", "read_only", "unaligned", "transposed_view"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_unusual_memory_gives_the_same_bits_as_contiguous(kind, dtype):
    base = make_input((4, 5, 6, 7), "NCHW", dtype, seed=4, loc=1.0)
    dy = make_input((4, 5, 6, 7), "NCHW", dtype, seed=5)
    x = _variant(base, kind)
    np.testing.assert_array_equal(x, base)
    expected, expected_vec = _everything(base, dy, "NCHW")
    got, got_vec = _everything(x, _variant(dy, kind), "NCHW")
    for k in expected:
        assert got[k].dtype == base.dtype and got[k].dtype.isnative and got[k].flags.c_contiguous
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    for k in expected_vec:
        np.testing.assert_array_equal(got_vec[k], expected_vec[k], err_msg=k)
    assert_forward_close(got["y"], base, *channel_params(5, np.float64, seed=1))


def test_broadcast_input_with_zero_strides_is_accepted():
    xb = np.broadcast_to(random_array((5, 3, 1, 4), np.float32, seed=7), (5, 3, 4, 4))
    assert 0 in xb.strides
    np.testing.assert_array_equal(bn_simd.batch_norm(xb, training=True),
                                  bn_simd.batch_norm(np.ascontiguousarray(xb), training=True))


@pytest.mark.parametrize("kind", ["strided", "byteswapped", "read_only"])
def test_per_channel_arguments_in_unusual_memory(kind):
    x = make_input((4, 3, 5), "NCHW", np.float64, seed=8, loc=2.0)
    w, b = np.array([1.5, -0.5, 2.0]), np.array([0.25, 1.0, -3.0])
    if kind == "strided":
        wv, bv = np.repeat(w, 2)[::2], np.repeat(b, 3)[::3]
    elif kind == "byteswapped":
        wv, bv = w.astype(">f8"), b.astype(">f8")
    else:
        wv, bv = w.copy(), b.copy()
        wv.setflags(write=False)
        bv.setflags(write=False)
    np.testing.assert_array_equal(bn_simd.batch_norm(x, None, None, wv, bv, training=True),
                                  bn_simd.batch_norm(x, None, None, w, b, training=True))


@pytest.mark.parametrize("kind", ["strided", "byteswapped"])
def test_running_stats_held_in_unusual_memory_are_updated_in_place(kind):
    x = make_input((6, 3, 5), "NCHW", np.float64, seed=9, loc=2.0)
    rm_c, rv_c = np.zeros(3), np.ones(3)
    bn_simd.batch_norm(x, rm_c, rv_c, training=True)
    if kind == "strided":
        store = np.zeros((2, 6))
        store[1] = 1.0
        rm, rv = store[0, ::2], store[1, 1::2]
    else:
        rm, rv = np.zeros(3, ">f8"), np.ones(3, ">f8")
    bn_simd.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(rm, rm_c)
    np.testing.assert_array_equal(rv, rv_c)
    if kind == "strided":
        np.testing.assert_array_equal(store[0, 1::2], 0.0)  # the neighbours are untouched
        np.testing.assert_array_equal(store[1, ::2], 1.0)


def test_no_api_call_modifies_its_inputs():
    x = make_input((4, 6, 5, 5), "NCHW", np.float32, seed=10, loc=1.0)
    dy = make_input((4, 6, 5, 5), "NCHW", np.float32, seed=11)
    w, b = channel_params(6, np.float32, seed=12)
    rm, rv = np.linspace(-1, 1, 6), np.linspace(0.5, 2, 6)
    inputs = [x, dy, w, b, rm, rv]
    before = [a.copy() for a in inputs]
    bn_simd.batch_norm(x, None, None, w, b, training=True)
    bn_simd.batch_norm(x, rm, rv, w, b, training=False)
    y, m, s = bn_simd.batch_norm_forward(x, w, b)
    m0, s0 = m.copy(), s.copy()
    bn_simd.batch_norm_backward(dy, x, m, s, w)
    bn_simd.batch_norm_backward(dy, x, m, s, w, training=False)
    mean, var = bn_simd.batch_stats(x)
    bn_simd.normalize(x, mean, var, w, b)
    bn_simd.backward_reduce(dy, x, mean)
    bn_simd.backward_apply(dy, x, mean, w, b, w)
    layer = bn_simd.BatchNorm2d(6)
    layer(x)
    layer.backward(dy)
    layer.eval()(x)
    layer.backward(dy)
    for a, c in zip(inputs, before):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(m, m0)
    np.testing.assert_array_equal(s, s0)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_read_only_input_works_for_layers_and_backward(layout):
    x = make_input((3, 4, 5, 5), layout, np.float32, seed=13)
    dy = make_input((3, 4, 5, 5), layout, np.float32, seed=14)
    x.setflags(write=False)
    dy.setflags(write=False)
    layer = bn_simd.BatchNorm2d(4, layout=layout)
    y = layer(x)
    assert y.flags.writeable
    gx = layer.backward(dy)
    assert gx.flags.writeable and gx.shape == x.shape


def test_float32_input_from_torch_like_objects_is_converted():
    class TensorLike:
        def __init__(self, a):
            self._a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self._a

    x = make_input((4, 3, 2, 2), "NCHW", np.float32, seed=15)
    np.testing.assert_array_equal(bn_simd.batch_norm(TensorLike(x), training=True),
                                  bn_simd.batch_norm(x, training=True))
