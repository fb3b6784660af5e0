"""Parity across layouts, ISAs and thread counts."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import bn_simd
import reference as ref
from conftest import ISAS, make, tol


def _run_all(x, layout, dy):
    C = x.shape[1] if layout == "NCHW" else x.shape[-1]
    w, b = np.linspace(0.5, 2, C).astype(x.dtype), np.linspace(-1, 1, C).astype(x.dtype)
    rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=True, layout=layout)
    ye = bn_simd.batch_norm(x, rm, rv, w, b, training=False, layout=layout)
    _, m, s = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x, m, s, w, layout=layout)
    return [y, ye, rm, rv, m, s, gx, gw, gb]


PARALLEL_CASES = [((16, 24, 20, 20), "NCHW"), ((16, 20, 20, 24), "NHWC"), ((8, 300, 7, 7), "NCHW"),
                  ((2048, 96), "NCHW"), ((2, 3, 200, 200), "NCHW"), ((4, 2, 512, 512), "NCHW")]


@pytest.mark.parametrize("shape,layout", PARALLEL_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_counts_give_bitwise_identical_results(shape, layout, dtype, threads):
    x, dy = make(shape, dtype, seed=40, loc=2.0), make(shape, dtype, seed=41)
    results = {}
    for n in (1, 2, 3, 4):
        threads(n)
        results[n] = _run_all(x, layout, dy)
    for n in (2, 3, 4):
        for a, b in zip(results[1], results[n]):
            np.testing.assert_array_equal(a, b)


def test_threadpoolctl_limit_gives_the_default_bits():
    if not bn_simd.show_config()["openmp"]:
        pytest.skip("built without OpenMP")
    x, dy = make((16, 32, 16, 16), np.float32, seed=42), make((16, 32, 16, 16), np.float32, seed=43)
    default = _run_all(x, "NCHW", dy)
    with threadpool_limits(1, "openmp"):
        assert bn_simd.get_num_threads() == 1
        limited = _run_all(x, "NCHW", dy)
    for a, b in zip(default, limited):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (3, 33, 9), (64, 17)])
def test_nchw_and_nhwc_agree(shape):
    x = make(shape, np.float32, seed=44, loc=-3)
    dy = make(shape, np.float32, seed=45)
    x_l, dy_l = np.ascontiguousarray(np.moveaxis(x, 1, -1)), np.ascontiguousarray(np.moveaxis(dy, 1, -1))
    a = _run_all(x, "NCHW", dy)
    b = _run_all(x_l, "NHWC", dy_l)
    n = x.size // shape[1]
    for i in (0, 1, 6):
        b[i] = np.moveaxis(b[i], -1, 1)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=16 * np.finfo(np.float32).eps, atol=8 * tol(np.float32, n))


@pytest.mark.parametrize("other", [i for i in ISAS if i != "scalar"])
def test_simd_paths_agree_with_scalar_within_ulps(other):
    prev = bn_simd.get_isa()
    bn_simd.set_isa("scalar")
    x, dy = make((8, 19, 13, 11), np.float32, seed=46, loc=1), make((8, 19, 13, 11), np.float32, seed=47)
    for layout, xx, gg in (("NCHW", x, dy), ("NHWC", np.ascontiguousarray(np.moveaxis(x, 1, -1)),
                                           np.ascontiguousarray(np.moveaxis(dy, 1, -1)))):
        scalar = _run_all(xx, layout, gg)
        bn_simd.set_isa(other)
        simd = _run_all(xx, layout, gg)
        bn_simd.set_isa("scalar")
        # 4 ulp of float32 on every O(1) output; reductions only differ by float64 rounding
        for u, v in zip(scalar, simd):
            np.testing.assert_allclose(u, v, rtol=4 * np.finfo(np.float32).eps,
                                       atol=4 * np.finfo(np.float32).eps * (1 + np.abs(u).max()))
    bn_simd.set_isa(prev)


def test_every_isa_matches_the_oracle(isa):
    x = make((6, 21, 10, 10), np.float32, seed=48, loc=7)
    y = bn_simd.batch_norm(x, training=True)
    np.testing.assert_allclose(y, ref.forward_train(x)[0], atol=2 * tol(np.float32, 600))
