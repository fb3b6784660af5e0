"""Edges of the less-used functional calls: argument checks before any write (update_renorm_stats' n,
renorm_corrections' arguments, the masked backward's statistics, masks with 16-bit data), the virtual batches'
running variance kept to float64's bits, zero channels through merge_moments, float64's own overflow in folding,
and a running mean of +-Inf."""
import numpy as np
import pytest

import bn_simd

EPS64 = np.finfo(np.float64).eps


@pytest.mark.parametrize("n,error", [(np.inf, ValueError), (2.5, ValueError), (-1, ValueError), (np.nan, ValueError),
                                     (True, TypeError), ("5", TypeError), (None, TypeError)])
def test_update_renorm_stats_refuses_a_bad_n_and_writes_nothing(n, error):
    arrays = [np.zeros(3), np.ones(3), np.ones(3), np.zeros(3), np.ones(3)]
    before = [a.copy() for a in arrays]
    with pytest.raises(error, match="n must be a whole number"):
        bn_simd.update_renorm_stats(*arrays, np.ones(3), np.ones(3), n)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


def test_renorm_corrections_checks_as_batch_renorm_forward():
    mean, var, rm, rs = np.array([0.5]), np.array([1.0]), np.array([0.0]), np.array([1.0])
    for kw, err in [(dict(renorm_std=None), TypeError), (dict(renorm_mean=None), TypeError),
                    (dict(var=None), TypeError), (dict(dmax=-1.0), ValueError), (dict(dmax=np.nan), ValueError),
                    (dict(rmin=2.0, rmax=1.0), ValueError), (dict(rmax="x"), TypeError)]:
        args = dict(var=var, renorm_mean=rm, renorm_std=rs)
        args.update({k: v for k, v in kw.items() if k in args})
        clip = {k: v for k, v in kw.items() if k not in args}
        with pytest.raises(err):
            bn_simd.renorm_corrections(mean, args["var"], args["renorm_mean"], args["renorm_std"], **clip)
    r, d = bn_simd.renorm_corrections(mean, var, rm, rs, rmax=None, dmax=0.25)   # (None: unclipped, as Keras')
    np.testing.assert_allclose(r, np.sqrt(1 + 1e-5))
    np.testing.assert_array_equal(d, [0.25])


def test_masked_backward_names_missing_statistics_and_masks_name_16_bit_data():
    x = np.random.default_rng(0).standard_normal((4, 3, 5))
    mask = np.ones((4, 5), bool)
    mask[0, 0] = False
    _, mean, invstd = bn_simd.batch_norm_forward(x, mask=mask)
    for m, s in ((None, invstd), (mean, None), (None, None)):
        with pytest.raises(TypeError, match="save_mean and save_invstd must be arrays of shape \\(3,\\)"):
            bn_simd.batch_norm_backward(x, x, m, s, mask=mask)
    with pytest.raises(TypeError, match="with mask=, got float16 \\(the call without a mask takes"):
        bn_simd.batch_norm_forward(x.astype(np.float16), mask=mask)


@pytest.mark.parametrize("virtual_batch_size", [None, 32])
@pytest.mark.parametrize("eps", [1e-3, 1.0])
def test_virtual_batch_norm_running_variance_keeps_float64s_bits(eps, virtual_batch_size):
    """var far below eps: 1 / invstd^2 - eps lost its bits (1e-4 relative at eps = 1); the variance as computed
    is kept."""
    x = 1 + 1e-6 * np.random.default_rng(8).standard_normal((64, 4, 8))
    rm, rv = np.zeros(4), np.zeros(4)
    bn_simd.virtual_batch_norm(x, rm, rv, training=True, momentum=1.0, eps=eps,
                               virtual_batch_size=virtual_batch_size)
    G = 1 if virtual_batch_size is None else 64 // virtual_batch_size
    groups = x.reshape(64 // G, G, 4, 8) if G > 1 else x[:, None]
    n = groups.shape[0] * 8
    want = groups.var(axis=(0, 3)).mean(axis=0) * n / (n - 1)
    assert np.max(np.abs(rv - want) / want) <= 1e3 * EPS64


def test_merge_moments_of_zero_channels_is_empty_as_batch_stats():
    m = bn_simd.batch_moments(np.zeros((4, 0, 3)))
    for got in (bn_simd.merge_moments(m), bn_simd.batch_stats(np.zeros((4, 0, 3)))):
        assert [g.shape for g in got] == [(0,), (0,)]


def test_folding_refuses_float64s_own_overflow():
    for f in (lambda: bn_simd.fold_params([0.0, 1.0], [0.0, 0.0], [1e300, 1.0], eps=1e-300),
              lambda: bn_simd.fold_params([1e300, 1.0], [0.0, 0.0], [1e10, 1.0], eps=1e-10),
              lambda: bn_simd.fold_linear(np.full((2, 2), 1e200), None, [0.0, 1.0], [1.0, 1.0], [1e200, 1.0])):
        with pytest.raises(ValueError, match="overflow float64"):
            f()
    w2, b2 = bn_simd.fold_linear(np.array([[np.inf, 1.0], [1.0, 1.0]]), None, [0.0, 0.0], [1.0, 1.0])
    assert np.isinf(w2[0, 0]) and np.all(np.isfinite(b2))   # (an infinite weight of the layer's own stays one)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_infinite_running_mean_normalises_to_an_infinity_not_nan(dtype):
    x = np.random.default_rng(2).standard_normal((2, 3, 4)).astype(dtype)
    rm, rv = np.array([np.inf, 0.0, -np.inf]), np.ones(3)
    y = bn_simd.batch_norm(x, rm, rv)
    assert np.all(y[:, 0] == -np.inf) and np.all(y[:, 2] == np.inf) and np.all(np.isfinite(y[:, 1]))
    np.testing.assert_array_equal(bn_simd.normalize(x, rm, rv), y)


def test_review_edges_of_the_checks():
    """n beyond float's range is refused as any other; 0-d bounds are their numbers; a torch float16 tensor with a
    mask gets the mask's message; the Keras layer's virtual batches keep the variance's bits too."""
    with pytest.raises(ValueError, match="n must be a whole number"):
        bn_simd.update_renorm_stats(np.zeros(1), np.ones(1), np.ones(1), np.zeros(1), np.ones(1), np.ones(1),
                                    np.ones(1), 10 ** 400)
    r, d = bn_simd.renorm_corrections(np.array([5.0]), np.array([4.0]), np.array([0.0]), np.array([1.0]),
                                      rmax=np.array(1.5), dmax=np.float32(2.0))
    np.testing.assert_allclose(r, [1.5])
    np.testing.assert_array_equal(d, [2.0])
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="with mask=, got torch.float16"):
        bn_simd.batch_norm_forward(torch.randn(4, 3, 5).half(), mask=np.ones((4, 5), bool))
    from bn_simd.keras import BatchNormalization
    x = 1 + 1e-9 * np.random.default_rng(3).standard_normal((8, 4))
    layer = BatchNormalization(virtual_batch_size=4, momentum=0.0, dtype="float64")
    layer(x, training=True)
    want = x.reshape(4, 2, 4).var(axis=0).mean(axis=0)   # (Keras 2's grouping: reshaped (v, N / v, C))
    assert np.max(np.abs(layer.moving_variance - want) / want) <= 1e3 * EPS64
