"""axis=: the channels on any axis of arrays of rank 1 to 8, in the functional API and the BatchNorm layer.

The oracle (tests/oracle.py) takes a layout; an array with channels on axis a is compared as the array with that
axis moved last ("NHWC", which the oracle reads at any rank), with the bounds of tests/bounds.py.
"""
import math

import numpy as np
import pytest

import bn_simd
import oracle as ref
from bounds import backward_bounds, forward_bound, stat_tol, assert_within
from conftest import assert_same_bits

C = 3


def shape_for(rank, axis, seed=0):
    """A small shape of `rank` with C channels on `axis` and other sizes among 1, 2, 3 (at least 2 values per
    channel from rank 2 on)."""
    rng = np.random.default_rng(seed + 10 * rank + axis)
    s = [int(v) for v in rng.integers(1, 4, rank)]
    s[axis] = C
    if rank > 1 and math.prod(s) // C < 2:
        s[(axis + 1) % rank] = 2
    return tuple(s)


def data(shape, dtype=np.float64, seed=0, loc=0.5):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + loc).astype(dtype)


def last(a, axis):
    """a with its channel axis moved last: what the oracle reads as "NHWC"."""
    return np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)


ALL_AXES = [(r, a) for r in range(1, 9) for a in range(-r, r)]


@pytest.mark.parametrize("rank,axis", ALL_AXES, ids=[f"rank{r}-axis{a}" for r, a in ALL_AXES])
def test_every_axis_of_every_rank_matches_the_oracle(rank, axis):
    shape = shape_for(rank, axis)
    w, b = np.array([1.5, -0.5, 2.0]), np.array([0.25, 0.0, -1.0])
    for dtype in (np.float32, np.float64):
        x = data(shape, dtype)
        xl = last(x, axis)
        n = x.size // C
        mean, var, _ = ref.stats(xl, "NHWC")
        # statistics
        m, v = bn_simd.batch_stats(x, axis=axis)
        assert_within(m, mean, stat_tol(n, dtype) * (ref.mean_abs(xl, "NHWC") + 1e-300), "mean")
        assert_within(v, var, 4 * stat_tol(n, dtype) * (var + ref.mean_abs(xl - mean, "NHWC") ** 2), "var")
        mm, vv = bn_simd.merge_moments(bn_simd.batch_moments(x, axis=axis))
        assert_same_bits(mm, m, "merged mean")
        assert_same_bits(vv, v, "merged var")
        # inference with given statistics
        rm, rv = np.array([0.1, -0.2, 0.3]), np.array([0.5, 2.0, 1.0])
        y = bn_simd.batch_norm(x, rm, rv, w, b, axis=axis)
        assert_within(last(y, axis), ref.inference(xl, rm, rv, w, b, 1e-5, "NHWC"),
                      forward_bound(xl, dtype, n, w, b, 1e-5, "NHWC", rm, rv, batch_stats=False), "eval y")
        y = bn_simd.normalize(x, rm, rv, w, b, axis=axis)
        assert_within(last(y, axis), ref.inference(xl, rm, rv, w, b, 1e-5, "NHWC"),
                      forward_bound(xl, dtype, n, w, b, 1e-5, "NHWC", rm, rv, batch_stats=False), "normalize")
        if n < 2:
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                bn_simd.batch_norm(x, rm, rv, w, b, training=True, axis=axis)
            continue
        # training, running statistics
        rm0, rv0 = rm.copy(), rv.copy()
        y = bn_simd.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, axis=axis)
        assert_within(last(y, axis), ref.forward_train(xl, w, b, 1e-5, "NHWC")[0],
                      forward_bound(xl, dtype, n, w, b, 1e-5, "NHWC", mean, var), "train y")
        erm, erv = ref.update_running(rm0, rv0, mean, var, n, 0.3)
        np.testing.assert_allclose(rm, erm, rtol=1e-12, atol=1e-6 if dtype == np.float32 else 1e-12)
        np.testing.assert_allclose(rv, erv, rtol=1e-6 if dtype == np.float32 else 1e-12)
        # the training pair
        y2, sm, si = bn_simd.batch_norm_forward(x, w, b, axis=axis)
        assert_same_bits(y2, y, "batch_norm_forward's y")
        g = data(shape, dtype, seed=1, loc=0.0)
        for training in (True, False):
            gx, gw, gb = bn_simd.batch_norm_backward(g, x, sm, si, w, axis=axis, training=training)
            dxb, dwb, dbb = backward_bounds(last(g, axis), xl, sm, si, w, "NHWC", training, dtype)
            rdx, rdw, rdb = ref.backward(last(g, axis), xl, sm, si, w, "NHWC", training)
            assert_within(last(gx, axis), rdx, dxb, f"grad_x training={training}")
            assert_within(gw, rdw, dwb, "grad_weight")
            assert_within(gb, rdb, dbb, "grad_bias")
        # the backward steps
        sdy, sdyx = bn_simd.backward_reduce(g, x, sm, axis=axis)
        esdy, esdyx, msdy, msdyx = ref.backward_sums(last(g, axis), xl, sm, "NHWC")
        assert_within(sdy, esdy, 8 * stat_tol(n, np.float64) * msdy, "sum_dy")
        assert_within(sdyx, esdyx, 8 * stat_tol(n, np.float64) * msdyx, "sum_dyxm")
        a, bb, d = w * si, -0.1 * w, 0.2 * b
        dx = bn_simd.backward_apply(g, x, sm, a, bb, d, axis=axis)
        edx, mag = ref.backward_apply(last(g, axis), xl, sm, a, bb, d, "NHWC")
        assert_within(last(dx, axis), edx, 8 * np.finfo(dtype).eps * (mag + 1e-300), "backward_apply")


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_axis_1_and_minus_1_give_the_layouts_bits(rank):
    x = data((4, C, 3, 2, 2)[:rank], np.float32, seed=rank)
    g = data(x.shape, np.float32, seed=7)
    for axis, layout in ((1, "NCHW"), (-1, "NHWC")):
        xs = x if layout == "NCHW" else np.ascontiguousarray(np.moveaxis(x, 1, -1))
        gs = g if layout == "NCHW" else np.ascontiguousarray(np.moveaxis(g, 1, -1))
        rm1, rv1, rm2, rv2 = np.zeros(C), np.ones(C), np.zeros(C), np.ones(C)
        assert_same_bits(bn_simd.batch_norm(xs, rm1, rv1, training=True, axis=axis),
                         bn_simd.batch_norm(xs, rm2, rv2, training=True, layout=layout), "y")
        assert_same_bits(rm1, rm2, "running_mean")
        y1, m1, s1 = bn_simd.batch_norm_forward(xs, axis=axis)
        y2, m2, s2 = bn_simd.batch_norm_forward(xs, layout=layout)
        assert_same_bits(s1, s2, "invstd")
        for r1, r2 in zip(bn_simd.batch_norm_backward(gs, xs, m1, s1, axis=axis),
                          bn_simd.batch_norm_backward(gs, xs, m2, s2, layout=layout)):
            assert_same_bits(r1, r2, "backward")


@pytest.mark.parametrize("rank,axis", [(6, 2), (7, -3), (8, 0), (8, 7), (1, 0)])
def test_an_axis_is_the_outer_C_inner_view(rank, axis):
    """Channels on axis a of (d0..dk) are channels on axis 1 of (prod(d<a), C, prod(d>a)): the same bits."""
    shape = shape_for(rank, axis, seed=3)
    x = data(shape, np.float32, seed=5)
    a = axis % rank
    view = (math.prod(shape[:a]), C, math.prod(shape[a + 1:]))
    assert_same_bits(np.asarray(bn_simd.batch_stats(x, axis=axis)), np.asarray(bn_simd.batch_stats(
        x.reshape(view), layout="NCHW")), "stats")
    rm, rv = np.array([0.5, 0.0, -1.0]), np.array([1.0, 3.0, 0.25])
    assert_same_bits(bn_simd.batch_norm(x, rm, rv, axis=axis).reshape(view),
                     bn_simd.batch_norm(x.reshape(view), rm, rv), "eval y")


def test_a_rank_1_array_is_C_channels_of_one_value():
    x = np.array([1.0, -2.0, 4.0], np.float32)
    for axis in (0, -1):
        mean, var = bn_simd.batch_stats(x, axis=axis)
        np.testing.assert_array_equal(mean, x)
        np.testing.assert_array_equal(var, 0.0)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn_simd.batch_norm(x, None, None, training=True, axis=axis)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 2, 2, 2, 2), (2, 3, 1, 1, 1, 1, 2), (2, 3, 1, 1, 1, 1, 1, 2)])
def test_ranks_outside_2_to_5_with_a_layout_raise_as_before(shape):
    x = data(shape, np.float32)
    for layout in ("NCHW", "NHWC"):
        for call in (lambda: bn_simd.batch_norm(x, None, None, training=True, layout=layout),
                     lambda: bn_simd.batch_stats(x, layout=layout),
                     lambda: bn_simd.batch_norm_forward(x, layout=layout),
                     lambda: bn_simd.batch_moments(x, layout=layout)):
            with pytest.raises(ValueError, match="2 to 5 dimensions"):
                call()


def test_axis_errors_name_the_argument_and_change_nothing():
    x = data((4, 3, 2), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    before = rm.tobytes() + rv.tobytes()
    cases = [
        (dict(axis=1, layout="NHWC"), ValueError, "exclusive"),
        (dict(axis=-1, layout="channels_last"), ValueError, "exclusive"),
        (dict(axis=1, layout="channels_first"), ValueError, "exclusive"),
        (dict(axis=True), TypeError, "axis must be an int"),
        (dict(axis=1.0), TypeError, "axis must be an int"),
        (dict(axis="1"), TypeError, "axis must be an int"),
        (dict(axis=3), ValueError, r"axis must be in \[-3, 2\].*got 3"),
        (dict(axis=-4), ValueError, r"axis must be in \[-3, 2\].*got -4"),
        (dict(axis=8), ValueError, r"axis must be in \[-8, 7\]"),
        (dict(axis=-9), ValueError, r"axis must be in \[-8, 7\]"),
        (dict(axis=2**40), ValueError, "axis must be in"),
    ]
    for kw, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            bn_simd.batch_norm(x, rm, rv, training=True, **kw)
        with pytest.raises(exc, match=pattern):
            bn_simd.batch_stats(x, **kw)
        with pytest.raises(exc, match=pattern):
            bn_simd.batch_norm_backward(x, x, rm, rv, **kw)
        assert rm.tobytes() + rv.tobytes() == before, kw
    assert bn_simd.batch_stats(x, axis=np.int64(-1))[0].shape == (2,)  # NumPy integers are ints


@pytest.mark.parametrize("shape", [(), (1,) * 9])
def test_ranks_0_and_9_are_refused_with_axis(shape):
    x = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match="1 to 8 dimensions"):
        bn_simd.batch_stats(x, axis=0)


def test_layer_with_axis_matches_the_oracle_at_rank_6():
    shape = (2, 2, C, 3, 1, 2)
    x = data(shape, np.float32, seed=2)
    layer = bn_simd.BatchNorm(C, axis=2, momentum=0.2)
    y = layer(x)
    xl = last(x, 2)
    n = x.size // C
    mean, var, _ = ref.stats(xl, "NHWC")
    assert_within(last(y, 2), ref.forward_train(xl, None, None, 1e-5, "NHWC")[0],
                  forward_bound(xl, np.float32, n, None, None, 1e-5, "NHWC", mean, var), "y")
    erm, erv = ref.update_running(np.zeros(C), np.ones(C), mean, var, n, 0.2)
    np.testing.assert_allclose(layer.running_mean, erm, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.running_var, erv, rtol=1e-6)
    g = data(shape, np.float32, seed=4)
    gx = layer.backward(g)
    si = ref.invstd(var)
    rdx, rdw, rdb = ref.backward(last(g, 2), xl, mean, si, layer.weight, "NHWC", True)
    dxb, dwb, dbb = backward_bounds(last(g, 2), xl, mean, si, layer.weight, "NHWC", True, np.float32,
                                    batch_stats=True)
    assert_within(last(gx, 2), rdx, dxb, "grad_x")
    assert_within(layer.grad_weight, rdw, dwb + 1e-6, "grad_weight")
    layer.eval()
    assert_within(last(layer(x), 2), ref.inference(xl, layer.running_mean, layer.running_var, layer.weight,
                                                   layer.bias, 1e-5, "NHWC"),
                  forward_bound(xl, np.float32, n, None, None, 1e-5, "NHWC", layer.running_mean, layer.running_var,
                                batch_stats=False), "eval y")
    assert "axis=2" in repr(layer)


def test_layer_axis_errors():
    with pytest.raises(ValueError, match="exclusive"):
        bn_simd.BatchNorm(3, axis=1, layout="NHWC")
    with pytest.raises(TypeError, match="axis must be an int"):
        bn_simd.BatchNorm(3, axis=1.5)
    layer = bn_simd.BatchNorm(3, axis=2)
    rm = layer.running_mean.copy()
    with pytest.raises(ValueError, match="3 channels on axis 2"):
        layer(np.ones((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="axis=2"):
        layer(np.ones((6, 3), np.float32))
    layer.layout = "NHWC"
    with pytest.raises(ValueError, match="exclusive"):
        layer(np.ones((2, 2, 3), np.float32))
    np.testing.assert_array_equal(layer.running_mean, rm)
    # BatchNorm1d/2d/3d keep their ranks with an axis
    with pytest.raises(ValueError, match="4-D"):
        bn_simd.BatchNorm2d(3, axis=-1)(np.ones((2, 2, 3), np.float32))
    y = bn_simd.BatchNorm2d(3, axis=-1)(data((2, 2, 2, 3), np.float32))
    assert y.shape == (2, 2, 2, 3)


def test_group_norm_does_not_take_an_axis_token():
    from bn_simd import _args, _core
    with pytest.raises(ValueError, match="not an axis"):
        _core.group_norm(np.ones((2, 4, 3), np.float32), 2, None, None, 1e-5, _args.axis_layout(1), None, 0)
    with pytest.raises(TypeError, match="layout must be a string"):
        bn_simd.BatchNorm(3, layout=_args.axis_layout(1))


def test_an_axis_and_a_mask_give_the_same_bits_for_every_thread_count_and_isa(isa, threads):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((8, 4, 16, 32, 16, 2)).astype(np.float32)  # ~1M values: threaded
    g = rng.standard_normal(x.shape).astype(np.float32)
    mask = rng.random((8, 4, 32, 16, 2)) < 0.7
    results = []
    for n in (1, 2, 3):
        threads(n)
        y, sm, si = bn_simd.batch_norm_forward(x, axis=2)
        gx = bn_simd.batch_norm_backward(g, x, sm, si, axis=2)[0]
        ym, mm, mi = bn_simd.batch_norm_forward(x, axis=-4, mask=mask)
        gm = bn_simd.batch_norm_backward(g, x, mm, mi, axis=-4, mask=mask)[0]
        results.append((y, si, gx, ym, mi, gm))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_same_bits(a, b, "result")


def test_axis_with_virtual_batches_or_renorm_is_refused():
    for kw in (dict(virtual_batch_size=2), dict(renorm=True)):
        with pytest.raises(ValueError, match="axis= does not combine"):
            bn_simd.BatchNorm(3, axis=1, **kw)
        layer = bn_simd.BatchNorm(3, **kw)
        layer.axis = 1
        with pytest.raises(ValueError, match="axis= does not combine"):
            layer(np.ones((4, 3), np.float32))
