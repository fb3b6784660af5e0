"""Forward (training and inference) against the float64 oracle."""
import numpy as np
import pytest

import bn_simd
import reference as ref
from conftest import channels, make, tol

SHAPES = {
    "NCHW": [(2, 3), (5, 4, 7), (3, 5, 6, 7), (2, 3, 4, 5, 6), (4, 16, 8, 8), (1, 3, 9, 9), (64, 33)],
    "NHWC": [(2, 3), (5, 7, 4), (3, 6, 7, 5), (2, 4, 5, 6, 3), (4, 8, 8, 16), (1, 9, 9, 3), (64, 33)],
}
CASES = [(s, l) for l in SHAPES for s in SHAPES[l]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,layout", CASES)
def test_training_forward_matches_oracle(shape, layout, dtype, isa):
    C = channels(shape, layout)
    x = make(shape, dtype, seed=1, loc=3.0, scale=2.0)
    rng = np.random.default_rng(2)
    w, b = rng.uniform(0.5, 2.0, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, layout=layout)
    y_ref, mean, var = ref.forward_train(x, w, b, layout=layout)
    n = x.size // C
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2 * tol(dtype, n))
    rm_ref, rv_ref = ref.running_update(np.zeros(C), np.ones(C), mean, var, n, 0.3)
    np.testing.assert_allclose(rm, rm_ref, rtol=4 * np.finfo(dtype).eps, atol=4 * np.finfo(dtype).eps * 3)
    np.testing.assert_allclose(rv, rv_ref, rtol=8 * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,layout", CASES)
def test_inference_uses_running_stats(shape, layout, dtype, isa):
    C = channels(shape, layout)
    x = make(shape, dtype, seed=3)
    rng = np.random.default_rng(4)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=False, layout=layout)
    y_ref = ref.inference(x, rm, rv, w, b, layout=layout)
    np.testing.assert_allclose(y, y_ref, rtol=4 * np.finfo(dtype).eps, atol=4 * tol(dtype))
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)


@pytest.mark.parametrize("C", [1, 7, 8, 9, 15, 16, 17, 33])
@pytest.mark.parametrize("spatial", [1, 7, 8, 9, 15, 16, 17, 33])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_sizes_around_vector_width(C, spatial, layout, isa):
    shape = (3, C, spatial) if layout == "NCHW" else (3, spatial, C)
    x = make(shape, np.float32, seed=C * 100 + spatial, loc=-2.0)
    y, _, _ = bn_simd.batch_norm_forward(x, layout=layout)
    y_ref, _, _ = ref.forward_train(x, layout=layout)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2 * tol(np.float32, x.size // C))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_batch_of_one_with_spatial_extent(layout):
    shape = (1, 5, 6, 7) if layout == "NCHW" else (1, 6, 7, 5)
    x = make(shape, np.float64, seed=5)
    y = bn_simd.batch_norm(x, training=True, layout=layout)
    np.testing.assert_allclose(y, ref.forward_train(x, layout=layout)[0], atol=tol(np.float64, 42))


def test_two_by_c_training():
    x = make((2, 9), np.float32, seed=6)
    y = bn_simd.batch_norm(x, training=True)
    np.testing.assert_allclose(y, ref.forward_train(x)[0], atol=tol(np.float32, 2) * 4)
    np.testing.assert_allclose(np.abs(y), 1.0, atol=1e-3)  # two values per channel normalise to +-1


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_empty_batch_returns_empty_and_keeps_running_stats(layout):
    shape = (0, 4, 3, 3) if layout == "NCHW" else (0, 3, 3, 4)
    x = np.zeros(shape, np.float32)
    rm, rv = np.full(4, 0.5, np.float32), np.full(4, 2.0, np.float32)
    y = bn_simd.batch_norm(x, rm, rv, training=True, layout=layout)
    assert y.shape == shape and y.dtype == np.float32
    np.testing.assert_array_equal(rm, 0.5)
    np.testing.assert_array_equal(rv, 2.0)


def test_slab_larger_than_l2_unfused_path():
    # 4 x 512 x 512 float32 = 4 MiB per channel: beyond the fusion threshold, statistics then normalise
    x = make((4, 2, 512, 512), np.float32, seed=7, loc=10.0)
    y, mean, invstd = bn_simd.batch_norm_forward(x)
    y_ref, m_ref, v_ref = ref.forward_train(x)
    n = x.size // 2
    np.testing.assert_allclose(y, y_ref, atol=tol(np.float32, n))
    np.testing.assert_allclose(mean, m_ref, rtol=2 * np.finfo(np.float32).eps)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(v_ref + 1e-5), rtol=4 * np.finfo(np.float32).eps)


@pytest.mark.parametrize("pdtype", [np.float16, np.float32, np.float64])
def test_per_channel_params_any_float_dtype(pdtype):
    x = make((4, 3, 5, 5), np.float32, seed=8)
    w, b = np.array([1.5, 0.5, 2.0], pdtype), np.array([0.25, -1.0, 3.0], pdtype)
    rm, rv = np.zeros(3, pdtype), np.ones(3, pdtype)
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=True)
    assert y.dtype == np.float32 and rm.dtype == pdtype
    np.testing.assert_allclose(y, ref.forward_train(x, w, b)[0], atol=4 * tol(np.float32, 100))


def test_weight_bias_none_mean_one_zero():
    x = make((6, 4, 3, 3), np.float64, seed=9)
    a = bn_simd.batch_norm(x, training=True)
    b = bn_simd.batch_norm(x, None, None, np.ones(4), np.zeros(4), training=True)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("unbiased", [True, False])
def test_running_var_convention(unbiased):
    x = make((5, 3, 4), np.float64, seed=10)
    rm, rv = np.zeros(3), np.ones(3)
    bn_simd.batch_norm(x, rm, rv, training=True, momentum=1.0, unbiased_running_var=unbiased)
    _, mean, var = ref.forward_train(x)
    n = 20
    np.testing.assert_allclose(rv, var * n / (n - 1) if unbiased else var, rtol=1e-13)
    np.testing.assert_allclose(rm, mean, rtol=1e-13, atol=1e-15)


def test_out_in_place_and_separate():
    x = make((4, 6, 5, 5), np.float32, seed=11)
    expected = bn_simd.batch_norm(x, training=True)
    out = np.empty_like(x)
    r = bn_simd.batch_norm(x, training=True, out=out)
    assert r is out
    np.testing.assert_array_equal(out, expected)
    xi = x.copy()
    r = bn_simd.batch_norm(xi, training=True, out=xi)
    assert r is xi
    np.testing.assert_array_equal(xi, expected)


def test_inputs_are_not_modified():
    x = make((4, 6, 5, 5), np.float32, seed=12)
    w, b = np.ones(6, np.float32) * 2, np.zeros(6, np.float32)
    copies = [a.copy() for a in (x, w, b)]
    bn_simd.batch_norm(x, None, None, w, b, training=True)
    y, m, s = bn_simd.batch_norm_forward(x, w, b)
    bn_simd.batch_norm_backward(y, x, m, s, w)
    for a, c in zip((x, w, b), copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("kind", ["fortran", "negative", "broadcast", "byteswapped", "sliced", "readonly"])
def test_unusual_memory_layouts_give_the_same_result(kind):
    base = make((4, 5, 6, 7), np.float64, seed=13)
    if kind == "fortran":
        x = np.asfortranarray(base)
    elif kind == "negative":
        x = base[::-1, :, ::-1][::-1, :, ::-1]
        x = np.flip(np.ascontiguousarray(np.flip(base, 3)), 3)
    elif kind == "broadcast":
        base = np.broadcast_to(base[:1], base.shape)
        x = base
    elif kind == "byteswapped":
        x = base.astype(base.dtype.newbyteorder(">"))
    elif kind == "sliced":
        big = make((4, 10, 6, 7), np.float64, seed=14)
        x = big[:, ::2]
        base = np.ascontiguousarray(x)
    else:
        x = base.copy()
        x.setflags(write=False)
    y = bn_simd.batch_norm(x, training=True)
    np.testing.assert_allclose(y, ref.forward_train(np.asarray(base, np.float64))[0], atol=tol(np.float64, 168))
