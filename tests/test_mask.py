"""mask=: batch statistics over the unmasked entries only (Keras' masking), every entry normalised with them.

The oracle here is written from the definition in float64: move the channel axis last, select the positions
where the broadcast mask is nonzero, take their mean and biased variance. The masked entries hold large values,
so that any of them leaking into a statistic shows. Gradients are checked against PyTorch's autograd in float64
(when installed) and against central differences of the oracle.
"""
import warnings

import numpy as np
import pytest

import bn_simd
from oracle import central_difference

EPS = 1e-5


def oracle(x, mask, axis, w=None, b=None, eps=EPS):
    """(y, mean, var, n) in float64."""
    xl = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    m = np.broadcast_to(np.asarray(mask) != 0, xl.shape[:-1])
    sel = xl[m]
    n = sel.shape[0]
    mean = sel.sum(0) / n
    var = np.square(sel - mean).sum(0) / n
    C = xl.shape[-1]
    w = np.ones(C) if w is None else np.asarray(w, np.float64)
    b = np.zeros(C) if b is None else np.asarray(b, np.float64)
    y = (xl - mean) / np.sqrt(var + eps) * w + b
    return np.moveaxis(y, -1, axis), mean, var, n


def keras_moments(x, mask, axis):
    """Keras 3's masked moments (its _moments, channel axis last): sums over the mask divided by count + 1e-7."""
    xl = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    m = np.broadcast_to((np.asarray(mask) != 0)[..., None], xl.shape)
    count = m[..., 0].sum()
    mean = np.where(m, xl, 0).reshape(-1, xl.shape[-1]).sum(0) / (count + 1e-7)
    var = np.square(np.where(m, xl - mean, 0)).reshape(-1, xl.shape[-1]).sum(0) / (count + 1e-7)
    return mean, var


# (x shape, channel axis, mask shape)
CASES = [
    ((6, 5, 3), -1, (6, 5)),        # Keras' sequence case: (batch, time, features), mask (batch, time)
    ((6, 5, 3), -1, (6, 1)),        # a broadcasting mask
    ((4, 3, 5), 1, (4, 5)),         # channels first
    ((4, 3, 5), 1, (1, 5)),
    ((2, 3, 2, 4, 3), 2, (2, 3, 4, 3)),
    ((7, 4), -1, (7,)),
    ((2, 2, 2, 3, 2, 2, 2), 3, (2, 2, 2, 2, 2, 2)),
]


def masked_case(shape, axis, mshape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random(mshape) < 0.6
    mask.flat[:2] = True  # at least two unmasked positions
    x = rng.standard_normal(shape) * 2 + 1
    xl = np.moveaxis(x, axis, -1)
    xl[~np.broadcast_to(mask, xl.shape[:-1])] = 1e6  # masked: far off, they must not count
    return x.astype(dtype), mask


def rel(dtype):
    return 16 * float(np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,mshape", CASES)
def test_masked_statistics_and_forward_match_the_oracle(shape, axis, mshape, dtype):
    x, mask = masked_case(shape, axis, mshape, dtype)
    C = shape[axis]
    w, b = np.linspace(0.5, 2.0, C), np.linspace(-1.0, 1.0, C)
    y_ref, mean, var, n = oracle(x, mask, axis, w, b)
    m, v = bn_simd.batch_stats(x, axis=axis, mask=mask)
    # float64 statistics of values of size ~1e0 (the selected ones): a few float64 ulps
    np.testing.assert_allclose(m, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(v, var, rtol=1e-12)
    mm, vv = bn_simd.merge_moments(bn_simd.batch_moments(x, axis=axis, mask=mask))
    np.testing.assert_array_equal(mm, m)
    np.testing.assert_array_equal(vv, v)
    rm, rv = np.full(C, 0.5), np.full(C, 2.0)
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=True, momentum=0.25, axis=axis, mask=mask)
    assert y.dtype == dtype
    # the masked entries are normalised too: |y| up to 1e6 / std, relative to which the bound is taken
    np.testing.assert_allclose(y, y_ref, rtol=rel(dtype), atol=rel(dtype) * 4)
    np.testing.assert_allclose(rm, 0.75 * 0.5 + 0.25 * mean, rtol=1e-14)
    np.testing.assert_allclose(rv, 0.75 * 2.0 + 0.25 * var * n / (n - 1), rtol=1e-14)
    rm, rv = np.full(C, 0.5), np.full(C, 2.0)
    bn_simd.batch_norm(x, rm, rv, training=True, momentum=0.25, axis=axis, mask=mask, unbiased_running_var=False)
    np.testing.assert_allclose(rv, 0.75 * 2.0 + 0.25 * var, rtol=1e-14)
    y2, sm, si = bn_simd.batch_norm_forward(x, w, b, axis=axis, mask=mask)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_allclose(sm, mean, rtol=rel(dtype))
    np.testing.assert_allclose(si, 1 / np.sqrt(var + EPS), rtol=rel(dtype))


@pytest.mark.parametrize("shape,axis,mshape", CASES[:4])
def test_masked_statistics_agree_with_keras_formula(shape, axis, mshape):
    x, mask = masked_case(shape, axis, mshape, np.float64, seed=3)
    km, kv = keras_moments(x, mask, axis)
    n = np.broadcast_to(mask, np.moveaxis(x, axis, -1).shape[:-1]).sum()
    m, v = bn_simd.batch_stats(x, axis=axis, mask=mask)
    # Keras divides by n + 1e-7: a relative 1e-7 / n apart
    np.testing.assert_allclose(m, km, rtol=2e-7 / n + 1e-12)
    np.testing.assert_allclose(v, kv, rtol=2e-7 / n + 1e-12)


def masked_loss_grad(x, mask, axis, w, b, g):
    """Central differences of sum(g * y) over x, w and b: the oracle's gradients (float64, small arrays)."""
    def loss(xx, ww, bb):
        return float((oracle(xx, mask, axis, ww, bb)[0] * g).sum())

    return tuple(central_difference(f, a, relative=True) for f, a in ((lambda a: loss(a, w, b), x),
                                                                      (lambda a: loss(x, a, b), w),
                                                                      (lambda a: loss(x, w, a), b)))


@pytest.mark.parametrize("shape,axis,mshape", [((5, 4, 2), -1, (5, 4)), ((3, 2, 4), 1, (3, 4)), ((6, 2), 1, (6,))])
def test_masked_backward_matches_central_differences(shape, axis, mshape):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape)
    mask = rng.random(mshape) < 0.6
    mask.flat[:2] = True
    C = shape[axis]
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    g = rng.standard_normal(shape)
    _, sm, si = bn_simd.batch_norm_forward(x, w, b, axis=axis, mask=mask)
    gx, gw, gb = bn_simd.batch_norm_backward(g, x, sm, si, w, axis=axis, mask=mask)
    ex, ew, eb = masked_loss_grad(x, mask, axis, w, b, g)
    np.testing.assert_allclose(gx, ex, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gw, ew, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gb, eb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,axis,mshape", CASES)
def test_masked_backward_matches_torch_autograd(shape, axis, mshape):
    torch = pytest.importorskip("torch")
    x, mask = masked_case(shape, axis, mshape, np.float64, seed=9)
    x = np.where(np.abs(x) > 1e5, 3.0, x)  # (moderate masked values: a float64 comparison of every entry)
    rng = np.random.default_rng(2)
    C = shape[axis]
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    g = rng.standard_normal(shape)
    xt = torch.tensor(x, requires_grad=True)
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    xl = torch.movedim(xt, axis, -1)
    sel = xl[torch.tensor(np.broadcast_to(mask, xl.shape[:-1]).copy())]
    mean = sel.mean(0)
    var = ((sel - mean) ** 2).mean(0)
    y = torch.movedim((xl - mean) / torch.sqrt(var + EPS) * wt + bt, -1, axis)
    y.backward(torch.tensor(g))
    _, sm, si = bn_simd.batch_norm_forward(x, w, b, axis=axis, mask=mask)
    gx, gw, gb = bn_simd.batch_norm_backward(g, x, sm, si, w, axis=axis, mask=mask)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gw, wt.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gb, bt.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_masked_backward_writes_in_place_into_grad_out():
    x, mask = masked_case((6, 5, 3), -1, (6, 5), np.float32)
    x = np.where(np.abs(x) > 1e5, np.float32(2.0), x)
    g = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    _, sm, si = bn_simd.batch_norm_forward(x, axis=-1, mask=mask)
    expected = bn_simd.batch_norm_backward(g, x, sm, si, axis=-1, mask=mask)[0]
    gi = g.copy()
    out = bn_simd.batch_norm_backward(gi, x, sm, si, axis=-1, mask=mask, out=gi)[0]
    assert out is gi
    np.testing.assert_array_equal(gi, expected)


@pytest.mark.parametrize("x_shape,axis,layout", [((8, 6, 4), -1, None), ((8, 4, 6), 1, None),
                                                 ((8, 4, 3, 3), None, "NCHW"), ((8, 3, 3, 4), None, "NHWC")])
def test_an_all_true_mask_gives_the_unmasked_bits(x_shape, axis, layout):
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    ax = axis if axis is not None else (1 if layout == "NCHW" else -1)
    mshape = tuple(s for i, s in enumerate(x_shape) if i != ax % len(x_shape))
    kw = dict(axis=axis) if axis is not None else dict(layout=layout)
    C = x_shape[ax]
    for mask in (np.ones(mshape, bool), np.ones((1,) * len(mshape), np.float32)):
        rm1, rv1, rm2, rv2 = np.zeros(C), np.ones(C), np.zeros(C), np.ones(C)
        np.testing.assert_array_equal(bn_simd.batch_norm(x, rm1, rv1, training=True, mask=mask, **kw),
                                      bn_simd.batch_norm(x, rm2, rv2, training=True, **kw))
        np.testing.assert_array_equal(rm1, rm2)
        np.testing.assert_array_equal(rv1, rv2)
        np.testing.assert_array_equal(np.asarray(bn_simd.batch_stats(x, mask=mask, **kw)),
                                      np.asarray(bn_simd.batch_stats(x, **kw)))


def test_a_mask_is_checked_and_unused_in_eval():
    x, mask = masked_case((6, 5, 3), -1, (6, 5), np.float32)
    rm, rv = np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(bn_simd.batch_norm(x, rm, rv, axis=-1, mask=mask),
                                  bn_simd.batch_norm(x, rm, rv, axis=-1))
    with pytest.raises(ValueError, match="mask"):
        bn_simd.batch_norm(x, rm, rv, axis=-1, mask=np.ones((6, 4), bool))


def test_mask_kinds_lists_ints_floats_and_tensors():
    x, mask = masked_case((6, 5, 3), -1, (6, 5), np.float64)
    expected = bn_simd.batch_stats(x, axis=-1, mask=mask)
    for m in (mask.tolist(), mask.astype(np.int8), mask.astype(np.float32) * 0.5, mask.astype(np.uint64)):
        np.testing.assert_array_equal(np.asarray(bn_simd.batch_stats(x, axis=-1, mask=m)), np.asarray(expected))
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(np.asarray(bn_simd.batch_stats(x, axis=-1, mask=torch.tensor(mask))),
                                  np.asarray(expected))


def test_mask_errors_name_the_argument_and_change_nothing():
    x = np.random.default_rng(0).standard_normal((6, 5, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.full_like(x, 7.0)
    snapshot = rm.tobytes() + rv.tobytes() + out.tobytes()
    one = np.zeros((6, 5), bool)
    one[2, 3] = True
    cases = [
        (np.ones((6, 5, 3), bool), ValueError, r"mask must have 2 dimension\(s\)"),
        (np.ones((6,), bool), ValueError, r"mask must have 2 dimension\(s\)"),
        (np.ones((6, 4), bool), ValueError, r"does not broadcast to \(6, 5\)"),
        (np.ones((6, 5), "U1"), TypeError, "mask must be an array of bool"),
        (np.ones((6, 5), complex), TypeError, "mask must be an array of bool"),
        (np.zeros((6, 5), bool), ValueError, "more than 1 unmasked value per channel.*got 0"),
        (one, ValueError, "more than 1 unmasked value per channel.*got 1"),
    ]
    for mask, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            bn_simd.batch_norm(x, rm, rv, training=True, axis=-1, mask=mask, out=out)
        assert rm.tobytes() + rv.tobytes() + out.tobytes() == snapshot, pattern
        with pytest.raises(exc, match=pattern):
            bn_simd.batch_norm_forward(x, axis=-1, mask=mask)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        bn_simd.batch_norm(x, np.zeros(4), np.ones(4), training=True, axis=-1, mask=np.ones((6, 5)), out=out)
    with pytest.raises(TypeError, match="weight must have a floating-point dtype"):
        bn_simd.batch_norm(x, rm, rv, np.ones(3, int), training=True, axis=-1, mask=np.ones((6, 5)), out=out)
    assert rm.tobytes() + rv.tobytes() + out.tobytes() == snapshot
    # statistics of no entry are NaN (no training: nothing is normalised with them)
    assert np.isnan(bn_simd.batch_stats(x, axis=-1, mask=np.zeros((6, 5)))[0]).all()


@pytest.mark.parametrize("save_mean,exc,pattern", [
    (np.zeros(4), ValueError, r"save_mean must have shape \(3,\)"),
    (np.zeros(3, int), TypeError, "save_mean must have a floating-point dtype"),
])
def test_masked_backward_names_save_mean(save_mean, exc, pattern):
    """The masked backward's errors name save_mean, as the unmasked one's do (they said "mean")."""
    x = np.ones((4, 3, 5), np.float32)
    out = np.full_like(x, 7.0)
    with pytest.raises(exc, match=pattern):
        bn_simd.batch_norm_backward(x, x, save_mean, np.ones(3), mask=np.ones((4, 5)), out=out)
    np.testing.assert_array_equal(out, 7.0)


def test_layer_with_mask_trains_on_the_unmasked_entries():
    x, mask = masked_case((6, 5, 3), 1, (6, 3), np.float64)
    layer = bn_simd.BatchNorm(5, axis=1, momentum=0.5, dtype=np.float64)
    y_ref, mean, var, n = oracle(x, mask, 1)
    y = layer(x, mask=mask)
    np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(layer.running_mean, 0.5 * mean, rtol=1e-14)
    np.testing.assert_allclose(layer.running_var, 0.5 + 0.5 * var * n / (n - 1), rtol=1e-14)
    assert layer.num_batches_tracked == 1
    g = np.random.default_rng(1).standard_normal(x.shape)
    _, sm, si = bn_simd.batch_norm_forward(x, layer.weight, layer.bias, axis=1, mask=mask)
    expected = bn_simd.batch_norm_backward(g, x, sm, si, layer.weight, axis=1, mask=mask)
    np.testing.assert_allclose(layer.backward(g), expected[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grad_weight, expected[1], rtol=1e-12)
    layer.eval()
    np.testing.assert_array_equal(layer(x, mask=mask), layer(x))
    rm = layer.running_mean.copy()
    layer.train()
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=np.ones((6, 2)))
    np.testing.assert_array_equal(layer.running_mean, rm)
    assert layer.num_batches_tracked == 1


def test_layer_with_mask_in_place_and_cumulative_momentum():
    x, mask = masked_case((6, 5, 3), -1, (6, 5), np.float64, seed=4)
    x = np.where(np.abs(x) > 1e5, 2.0, x)
    g = np.random.default_rng(2).standard_normal(x.shape)
    ref_layer = bn_simd.BatchNorm(3, axis=-1, momentum=None, dtype=np.float64)
    layer = bn_simd.BatchNorm(3, axis=-1, momentum=None, dtype=np.float64)
    expected = ref_layer(x, mask=mask)
    expected_gx = ref_layer.backward(g)
    xi = x.copy()
    m = mask.copy()
    assert layer(xi, out=xi, mask=m) is xi
    m[:] = False  # the layer keeps its own copy of the mask for backward
    np.testing.assert_array_equal(xi, expected)
    np.testing.assert_array_equal(layer.backward(g), expected_gx)
    _, mean, var, n = oracle(x, mask, -1)
    np.testing.assert_allclose(layer.running_mean, mean, rtol=1e-14)  # momentum None: the first batch's
    np.testing.assert_allclose(layer.running_var, var * n / (n - 1), rtol=1e-14)


def test_masked_calls_on_strided_fortran_and_byte_swapped_input():
    x, mask = masked_case((6, 5, 3), 1, (6, 3), np.float32, seed=6)
    expected = bn_simd.batch_norm(x, None, None, training=True, axis=1, mask=mask)
    for variant in (np.asfortranarray(x), x.astype(x.dtype.newbyteorder()),
                    np.repeat(x, 2, axis=0)[::2]):
        np.testing.assert_array_equal(bn_simd.batch_norm(variant, None, None, training=True, axis=1, mask=mask),
                                      expected)
    # a list is read as float64
    np.testing.assert_array_equal(bn_simd.batch_norm(x.tolist(), None, None, training=True, axis=1, mask=mask),
                                  bn_simd.batch_norm(x.astype(np.float64), None, None, training=True, axis=1,
                                                     mask=mask))
    np.testing.assert_array_equal(bn_simd.batch_norm(x, None, None, training=True, axis=1,
                                                     mask=np.asfortranarray(mask)[:, ::-1][:, ::-1]), expected)


def test_mask_with_virtual_batches_or_renorm_is_refused_and_changes_nothing():
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    for kw in (dict(virtual_batch_size=2), dict(renorm=True)):
        layer = bn_simd.BatchNorm1d(3, **kw)
        state = {k: np.copy(v) for k, v in layer.state_dict().items()}
        with pytest.raises(ValueError, match="mask= does not combine"):
            layer(x, mask=np.ones((4, 5)))
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, state[k])


def test_momentum_is_not_checked_without_running_statistics_as_unmasked():
    x = np.random.default_rng(5).standard_normal((8, 3)).astype(np.float32)
    mask = np.array([1, 0, 1, 1, 1, 0, 1, 1], bool)
    y = bn_simd.batch_norm(x, None, None, training=True, momentum=2.0, mask=mask)
    np.testing.assert_array_equal(y, bn_simd.batch_norm(x, None, None, training=True, mask=mask))
    with pytest.raises(ValueError, match="momentum"):
        bn_simd.batch_norm(x, np.zeros(3), np.ones(3), training=True, momentum=2.0, mask=mask)


def test_masked_statistics_and_gradients_beyond_the_dtype_are_inf_silently_as_unmasked():
    """An invstd beyond float32's range (a constant channel, eps 1e-300) and parameter gradients beyond a float16
    weight's range are +-Inf without a warning, as the unmasked calls store them: the masked paths' NumPy casts warned,
    and raised FloatingPointError under np.errstate(all="raise") after out was written."""
    rng = np.random.default_rng(0)
    x = rng.random((4, 3, 5)).astype(np.float32)
    x[:, 0] = 1.0
    mask = np.ones((4, 5))
    g = (rng.standard_normal((4, 3, 5)) * 1e5).astype(np.float32)
    m, s = x.mean((0, 2)), (1 / np.sqrt(x.var((0, 2)) + 1e-5)).astype(np.float32)
    w16 = np.ones(3, np.float16)
    with np.errstate(all="raise"), warnings.catch_warnings():
        warnings.simplefilter("error")
        for masked in (None, mask):
            out = np.full_like(x, 7.0)
            y, mean, invstd = bn_simd.batch_norm_forward(x, eps=1e-300, mask=masked, out=out)
            assert invstd.dtype == np.float32 and invstd[0] == np.inf and np.all(np.isfinite(invstd[1:]))
            gx, gw, gb = bn_simd.batch_norm_backward(g, x, m, s, w16, mask=masked)
            assert gw.dtype == np.float16 and np.all(np.isinf(gb) | np.isinf(gw))
