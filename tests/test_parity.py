"""Parity across kernels (ISAs) and thread counts: every ISA against the oracle, SIMD against scalar within a few
ulp, and bitwise-identical results for any number of threads."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import bn_simd
import reference as ref
from conftest import (HAVE_OPENMP, SUPPORTED_ISAS, use_strips, assert_forward_close, assert_ulp_close, assert_within,
                      backward_bounds, channel_params, eps_of, forward_bound, make_input, reduction_tol)


def _all_outputs(x, dy, layout):
    """Every array the API computes for (x, dy), in a fixed order."""
    C = ref.num_channels(x.shape, layout)
    w, b = channel_params(C, x.dtype, seed=1)
    rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
    out = {}
    out["y_train"] = bn_simd.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, layout=layout)
    out["running_mean"], out["running_var"] = rm, rv
    out["y_eval"] = bn_simd.batch_norm(x, rm, rv, w, b, training=False, layout=layout)
    out["y_fwd"], out["save_mean"], out["save_invstd"] = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    out["grad_x"], out["grad_w"], out["grad_b"] = bn_simd.batch_norm_backward(
        dy, x, out["save_mean"], out["save_invstd"], w, layout=layout)
    out["grad_x_eval"] = bn_simd.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5), w, layout=layout,
                                                     training=False)[0]
    out["stats_mean"], out["stats_var"] = bn_simd.batch_stats(x, layout=layout)
    out["sum_dy"], out["sum_dyx"] = bn_simd.backward_reduce(dy, x, out["stats_mean"], layout=layout)
    out["apply"] = bn_simd.backward_apply(dy, x, out["stats_mean"], w, b, w, layout=layout)
    layer = bn_simd.BatchNorm(C, layout=layout, dtype=x.dtype)
    out["layer_y"] = layer(x)
    out["layer_grad_x"] = layer.backward(dy)
    out["layer_grad_w"] = layer.grad_weight
    return out


# large enough for several threads (> 32768 elements) and several chunks / channel blocks
PARALLEL_CASES = [
    ((16, 24, 20, 20), "NCHW", np.float32),    # short rows: channel blocks of 2
    ((16, 24, 20, 20), "NHWC", np.float32),    # channels-last rows, 3 chunks
    ((8, 300, 7, 7), "NCHW", np.float64),      # 7x7 maps grouped 11 channels a block
    ((2048, 96), "NCHW", np.float32),          # (N, C): the channels-last kernels
    ((1024, 300), "NHWC", np.float64),         # more channels than one accumulator block
    ((2, 3, 200, 200), "NCHW", np.float32),    # rows longer than a chunk: pieces of rows
    ((4, 2, 512, 512), "NCHW", np.float64),    # 8 MiB per channel: the unfused sweeps
    ((64, 1, 33, 33), "NHWC", np.float32),     # one channel: one long run
    ((8, 5, 40, 41), "NHWC", np.float64),
]
# wide rows, each with column strips forced on (where they start at 24 KiB of row) and off
for _setting in ("strips", "flat"):
    PARALLEL_CASES += [
        ((5, 1040, 7), "NHWC", np.float32, _setting),   # under the normalise's strip width; the dx strips need streaming
        ((5, 1296, 7), "NHWC", np.float32, _setting),   # wider: element-wise sweeps in strips, threads split mid-row
        ((4, 2053, 5), "NHWC", np.float32, _setting),   # wide and odd
        ((9, 616, 7), "NHWC", np.float64, _setting),    # wide float64 rows
    ]
PARALLEL_CASES = [c if len(c) == 4 else c + ("cpu",) for c in PARALLEL_CASES]
PARALLEL_IDS = ["-".join(["x".join(map(str, s)), l, np.dtype(d).name, st]) for s, l, d, st in PARALLEL_CASES]


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
@pytest.mark.parametrize("nchw_shape,layout,dtype,strips", PARALLEL_CASES, ids=PARALLEL_IDS)
def test_thread_counts_give_bitwise_identical_results(nchw_shape, layout, dtype, strips, threads):
    use_strips(strips)
    x = make_input(nchw_shape, layout, dtype, seed=40, loc=2.0, scale=1.5)
    dy = make_input(nchw_shape, layout, dtype, seed=41)
    assert x.size > 32768
    threads(1)
    assert bn_simd.get_num_threads() == 1
    serial = _all_outputs(x, dy, layout)
    for n in (2, 3, 4):
        threads(n)
        assert bn_simd.get_num_threads() == n
        parallel = _all_outputs(x, dy, layout)
        for k in serial:
            np.testing.assert_array_equal(parallel[k], serial[k], err_msg=f"{k} with {n} threads")
    threads(None)
    default = _all_outputs(x, dy, layout)
    for k in serial:
        np.testing.assert_array_equal(default[k], serial[k], err_msg=f"{k} with the default thread count")


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_threadpoolctl_limit_gives_the_default_bits(layout):
    x = make_input((16, 32, 16, 16), layout, np.float32, seed=42, loc=1.0)
    dy = make_input((16, 32, 16, 16), layout, np.float32, seed=43)
    default = _all_outputs(x, dy, layout)
    with threadpool_limits(limits=1, user_api="openmp"):
        assert bn_simd.get_num_threads() == 1
        limited = _all_outputs(x, dy, layout)
    for k in default:
        np.testing.assert_array_equal(limited[k], default[k], err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nchw_shape,layout", [((6, 21, 10, 10), "NCHW"), ((6, 21, 10, 10), "NHWC"),
                                               ((200, 37), "NCHW"), ((3, 2, 90, 100), "NCHW"),
                                               ((5, 1296, 7), "NHWC"), ((3, 2053, 4), "NHWC")])
@pytest.mark.parametrize("strips", ["strips", "flat"])
def test_every_isa_matches_the_oracle(nchw_shape, layout, dtype, strips, isa):
    use_strips(strips)
    x = make_input(nchw_shape, layout, dtype, seed=44, loc=7.0, scale=3.0)
    dy = make_input(nchw_shape, layout, dtype, seed=45)
    C = nchw_shape[1]
    w, b = channel_params(C, dtype, seed=46)
    y, mean, invstd = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    assert_forward_close(y, x, w, b, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
    bx, bw, bb = backward_bounds(dy, x, mean, invstd, w, layout, True, dtype)
    gx_ref, gw_ref, gb_ref = ref.backward(dy, x, mean, invstd, w, layout)
    assert_within(gx, gx_ref, bx, "grad_x")
    assert_within(gw, gw_ref, bw, "grad_weight")
    assert_within(gb, gb_ref, bb, "grad_bias")


SIMD_ISAS = [i for i in SUPPORTED_ISAS if i != "scalar"]


@pytest.mark.skipif(not SIMD_ISAS, reason="no SIMD kernels on this CPU")
@pytest.mark.parametrize("other", SIMD_ISAS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_simd_kernels_agree_with_scalar_within_a_few_ulp(layout, dtype, other):
    """The kernels differ only in the order of float64 additions and in fused vs separate multiply-add, so
    each output is within 4 ulp of the scalar one, measured at the magnitude of the terms it is made of
    (each side rounds about 2.5 times per output: see conftest.apply_tol)."""
    nchw_shape = (8, 19, 13, 11)
    x = make_input(nchw_shape, layout, dtype, seed=47, loc=1.0, scale=2.0)
    dy = make_input(nchw_shape, layout, dtype, seed=48)
    bn_simd.set_isa("scalar")
    scalar = _all_outputs(x, dy, layout)
    bn_simd.set_isa(other)
    simd = _all_outputs(x, dy, layout)
    C, n = nchw_shape[1], x.size // nchw_shape[1]
    w, b = channel_params(C, dtype, seed=1)
    e = eps_of(dtype)
    y_scale = forward_bound(x, dtype, n, w, b, layout=layout) / (4 * e)
    for k in ("y_train", "y_fwd", "layer_y"):
        assert_ulp_close(simd[k], scalar[k], y_scale, 4, dtype, k)
    rm, rv = scalar["running_mean"], scalar["running_var"]
    ye_scale = forward_bound(x, dtype, n, w, b, layout=layout, mean=rm, var=rv, batch_stats=False) / (4 * e)
    assert_ulp_close(simd["y_eval"], scalar["y_eval"], ye_scale, 4, dtype, "y_eval")
    dx_scale = backward_bounds(dy, x, scalar["save_mean"], scalar["save_invstd"], w, layout, True, dtype)[0] / (4 * e)
    assert_ulp_close(simd["grad_x"], scalar["grad_x"], dx_scale, 4, dtype, "grad_x")
    for k in ("running_mean", "running_var", "save_mean", "save_invstd", "grad_w", "grad_b"):
        np.testing.assert_allclose(simd[k], scalar[k], rtol=2 * e + reduction_tol(n),
                                   atol=(2 * e + reduction_tol(n)) * np.abs(scalar[k]).max(), err_msg=k)
    for k in ("stats_mean", "stats_var", "sum_dy", "sum_dyx"):
        np.testing.assert_allclose(simd[k], scalar[k], rtol=reduction_tol(n),
                                   atol=reduction_tol(n) * np.abs(scalar[k]).max(), err_msg=k)
