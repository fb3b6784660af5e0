"""Backward: against the float64 oracle, against central finite differences, and the forward/backward pair."""
import numpy as np
import pytest

import bn_simd
import oracle as ref
from conftest import (DTYPES, LAYOUTS, assert_within, backward_bounds, channel_params, eps_of, layout_shape,
                      make_input)

BACKWARD_SHAPES = [(6, 5), (4, 3, 10), (3, 4, 5, 6), (2, 3, 4, 3, 5), (2, 17, 1, 1), (5, 3, 40), (33, 17),
                   (3, 9, 16), (2, 8, 9, 9)]


def _forward_backward(x, dy, w, layout, training=True):
    y, mean, invstd = bn_simd.batch_norm_forward(x, w, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x, mean, invstd, w, layout=layout, training=training)
    return (gx, gw, gb), (mean, invstd)


def _check_against_oracle(grads, dy, x, mean, invstd, w, layout, training, dtype):
    gx, gw, gb = grads
    gx_ref, gw_ref, gb_ref = ref.backward(dy, x, mean, invstd, w, layout, training)
    dx_bound, dw_bound, db_bound = backward_bounds(dy, x, mean, invstd, w, layout, training, dtype)
    assert_within(gx, gx_ref, dx_bound, "grad_x")
    assert_within(gw, gw_ref, dw_bound, "grad_weight")
    assert_within(gb, gb_ref, db_bound, "grad_bias")


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nchw_shape", BACKWARD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_training_backward_matches_oracle(nchw_shape, layout, dtype, with_weight, isa):
    x = make_input(nchw_shape, layout, dtype, seed=20, loc=1.0, scale=3.0)
    dy = make_input(nchw_shape, layout, dtype, seed=21, loc=0.3)
    w = channel_params(nchw_shape[1], dtype, seed=22)[0] if with_weight else None
    grads, (mean, invstd) = _forward_backward(x, dy, w, layout)
    gx, gw, gb = grads
    assert gx.shape == x.shape and gx.dtype == dtype
    assert gw.shape == gb.shape == (nchw_shape[1],) and gw.dtype == gb.dtype == dtype
    _check_against_oracle(grads, dy, x, mean, invstd, w, layout, True, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("nchw_shape", [(3, 4, 5, 6), (7, 5), (2, 9, 17)], ids=lambda s: "x".join(map(str, s)))
def test_eval_backward_treats_statistics_as_constants(nchw_shape, layout, dtype, isa):
    C = nchw_shape[1]
    x = make_input(nchw_shape, layout, dtype, seed=23, loc=-0.5)
    dy = make_input(nchw_shape, layout, dtype, seed=24)
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
    w = channel_params(C, np.float64, seed=25)[0]
    invstd = ref.invstd(rv)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x, rm, invstd, w, layout=layout, training=False)
    _check_against_oracle((gx, gw, gb), dy, x, rm, invstd, w, layout, False, dtype)
    # dx = w * invstd * dy exactly as the formula says, up to the rounding of w * invstd and the product
    scale = np.abs(ref.from_cn((w * invstd)[:, None] * ref.to_cn(dy, layout), x.shape, layout))
    assert_within(gx, ref.backward(dy, x, rm, invstd, w, layout, False)[0], 2 * eps_of(dtype) * scale)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_backward_grad_x_does_not_depend_on_x(layout):
    x1 = make_input((4, 3, 5), layout, np.float64, seed=26)
    x2 = make_input((4, 3, 5), layout, np.float64, seed=27, loc=5.0)
    dy = make_input((4, 3, 5), layout, np.float64, seed=28)
    args = (np.zeros(3), np.ones(3), np.array([1.0, 2.0, 3.0]))
    g1 = bn_simd.batch_norm_backward(dy, x1, *args, layout=layout, training=False)
    g2 = bn_simd.batch_norm_backward(dy, x2, *args, layout=layout, training=False)
    np.testing.assert_array_equal(g1[0], g2[0])
    np.testing.assert_array_equal(g1[2], g2[2])


# ---- finite differences ----------------------------------------------------------------------------------------

FD_CASES = [((3, 2, 3), "NCHW"), ((4, 3), "NCHW"), ((2, 3, 2), "NHWC"), ((2, 2, 2, 3), "NHWC"),
            ((2, 2, 2, 2, 2), "NCHW")]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape,layout", FD_CASES)
def test_gradients_match_central_finite_differences(shape, layout, affine):
    """d/d(x, w, b) of L = sum(y * g), y the training-mode output, by central differences in float64.

    Truncation error O(h^2 f''') ~ 1e-12 and rounding error O(eps64 |L| / h) ~ 1e-10 for h = 1e-6 and
    |L| ~ 1; the comparison allows 1e-7 relative to the gradient's size.
    """
    rng = np.random.default_rng(29)
    C = ref.num_channels(shape, layout)
    x, g = rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape)
    w, b = (rng.uniform(0.5, 2, C), rng.standard_normal(C)) if affine else (None, None)

    def loss(x_, w_, b_):
        y, _, _ = bn_simd.batch_norm_forward(x_, w_, b_, layout=layout)
        return float(np.sum(y * g))

    _, mean, invstd = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(g, x, mean, invstd, w, layout=layout)
    h = 1e-6

    def numeric(which):
        args = [x, w, b]
        base = args[which]
        return ref.central_difference(lambda v: loss(*(v if i == which else a for i, a in enumerate(args))), base, h)

    for which, grad in [(0, gx)] + ([(1, gw), (2, gb)] if affine else []):
        num = numeric(which)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7 * (1 + np.abs(num).max()),
                                   err_msg=["grad_x", "grad_weight", "grad_bias"][which])
    if not affine:
        # the parameter gradients are still returned: as if weight = 1 and bias = 0
        xhat = ref.to_cn(x, layout) - mean[:, None]
        np.testing.assert_allclose(gw, (ref.to_cn(g, layout) * xhat * invstd[:, None]).sum(1), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gb, ref.to_cn(g, layout).sum(1), rtol=1e-12, atol=1e-12)


def test_grad_x_sums_to_zero_per_channel_in_training():
    # y is invariant to adding a constant to a channel, so sum_i dx = 0 per channel
    x = make_input((6, 4, 5, 5), "NCHW", np.float64, seed=30, loc=2.0)
    dy = make_input((6, 4, 5, 5), "NCHW", np.float64, seed=31)
    (gx, _, _), _ = _forward_backward(x, dy, np.array([1.0, -2.0, 0.5, 3.0]), "NCHW")
    np.testing.assert_allclose(gx.sum(axis=(0, 2, 3)), 0.0, atol=1e-12)


# ---- the pair, dtypes, sizes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_returns_mean_and_invstd_in_the_input_dtype(dtype):
    x = make_input((5, 3, 4, 4), "NCHW", dtype, seed=32, loc=3.0)
    y, mean, invstd = bn_simd.batch_norm_forward(x, eps=1e-3)
    _, m_ref, v_ref = ref.forward_train(x)
    assert mean.dtype == dtype and invstd.dtype == dtype and mean.shape == invstd.shape == (3,)
    np.testing.assert_allclose(mean, m_ref, rtol=eps_of(dtype))
    np.testing.assert_allclose(invstd, ref.invstd(v_ref, 1e-3), rtol=2 * eps_of(dtype))


@pytest.mark.parametrize("wdtype", [np.float16, np.float32, np.float64])
def test_parameter_gradients_have_the_weight_dtype(wdtype):
    x = make_input((4, 3, 5), "NCHW", np.float32, seed=33)
    dy = make_input((4, 3, 5), "NCHW", np.float32, seed=34)
    w = np.array([1.0, 0.5, 2.0], wdtype)
    _, m, s = bn_simd.batch_norm_forward(x, w)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x, m, s, w)
    assert gx.dtype == np.float32 and gw.dtype == wdtype and gb.dtype == wdtype
    _, gw_ref, gb_ref = ref.backward(dy, x, m, s, w)
    np.testing.assert_allclose(gw, gw_ref, rtol=2 * eps_of(wdtype), atol=1e-5)
    np.testing.assert_allclose(gb, gb_ref, rtol=2 * eps_of(wdtype), atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("C,spatial", [(1, 33), (7, 9), (8, 16), (9, 17), (16, 8), (17, 15), (33, 1), (300, 2)])
def test_backward_sizes_around_the_vector_width(C, spatial, layout, dtype, isa):
    x = make_input((3, C, spatial), layout, dtype, seed=35 + C, loc=1.0)
    dy = make_input((3, C, spatial), layout, dtype, seed=36 + spatial)
    w = channel_params(C, dtype, seed=37)[0]
    grads, (mean, invstd) = _forward_backward(x, dy, w, layout)
    _check_against_oracle(grads, dy, x, mean, invstd, w, layout, True, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_on_a_slab_larger_than_the_fusion_threshold(dtype):
    # dy and x of one channel together exceed the cache-fusion threshold: reduce sweep, then apply sweep
    x = make_input((4, 2, 512, 512), "NCHW", dtype, seed=38, loc=5.0, scale=2.0)
    dy = make_input((4, 2, 512, 512), "NCHW", dtype, seed=39)
    w = np.array([1.5, -0.75], dtype)
    grads, (mean, invstd) = _forward_backward(x, dy, w, "NCHW")
    _check_against_oracle(grads, dy, x, mean, invstd, w, "NCHW", True, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_of_empty_batch_gives_empty_grad_x_and_zero_parameter_grads(layout):
    # the parameter gradients are sums over no element: 0, as in PyTorch, whatever the saved statistics
    x = np.zeros(layout_shape((0, 3, 4, 4), layout), np.float32)
    w = np.array([1.0, 2.0, 3.0], np.float32)
    _, mean, invstd = bn_simd.batch_norm_forward(x, w, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(x, x, mean, invstd, w, layout=layout)
    assert gx.shape == x.shape
    np.testing.assert_array_equal(gb, 0.0)
    np.testing.assert_array_equal(gw, 0.0)


def test_backward_of_empty_batch_with_finite_statistics():
    x = np.zeros((0, 3, 4, 4), np.float64)
    gx, gw, gb = bn_simd.batch_norm_backward(x, x, np.zeros(3), np.ones(3), np.ones(3))
    assert gx.shape == x.shape
    np.testing.assert_array_equal(gw, 0.0)
    np.testing.assert_array_equal(gb, 0.0)


def test_functional_backward_empty_batch_gives_zero_param_grads():
    x = np.zeros((0, 3, 4, 4), np.float32)
    _, m, s = bn_simd.batch_norm_forward(x)
    gx, gw, gb = bn_simd.batch_norm_backward(x, x, m, s)
    assert gx.shape == x.shape
    np.testing.assert_array_equal(gw, 0)
    np.testing.assert_array_equal(gb, 0)
