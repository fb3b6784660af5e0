"""Parity across kernels (ISAs) and thread counts: every ISA against the oracle, SIMD against scalar within a few
ulp, and bitwise-identical results for any number of threads.

The thread-count, threadpoolctl and SIMD-vs-scalar tests run every entry point of every registered op (ops.py)."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import bn_simd
import oracle as ref
import half_cases
import ops
from conftest import (HAVE_OPENMP, SUPPORTED_ISAS, use_strips, assert_forward_close, assert_same_bits, assert_ulp_close,
                      assert_within, backward_bounds, channel_params, eps_of, make_input, reduction_tol)


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
PARALLEL = [pytest.param(op, *c, id="-".join([op.name, "x".join(map(str, c[0])), c[1], np.dtype(c[2]).name, c[3]]))
            for op in ops.OPS for c in PARALLEL_CASES if op.supports(*c[:3])]


def _same_bits(got, expected, what):
    assert got.keys() == expected.keys(), what
    for k in expected:
        assert_same_bits(got[k], expected[k], f"{k} {what}")


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
@pytest.mark.parametrize("op,nchw_shape,layout,dtype,strips", PARALLEL)
def test_thread_counts_give_bitwise_identical_results(op, nchw_shape, layout, dtype, strips, threads):
    use_strips(strips)
    case = op.case(40, nchw_shape, layout, dtype, loc=2.0, scale=1.5, momentum=0.3)
    assert case["x"].size > 32768
    threads(1)
    assert bn_simd.get_num_threads() == 1
    serial = ops.run_all(op, case)
    for n in (2, 3, 4):
        threads(n)
        assert bn_simd.get_num_threads() == n
        _same_bits(ops.run_all(op, case), serial, f"with {n} threads")
    threads(None)
    _same_bits(ops.run_all(op, case), serial, "with the default thread count")


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
@pytest.mark.parametrize("op,layout", [pytest.param(op, lay, id=f"{op.name}-{lay}") for op in ops.OPS
                                       for lay in ("NCHW", "NHWC") if op.supports((16, 32, 16, 16), lay, np.float32)])
def test_threadpoolctl_limit_gives_the_default_bits(op, layout):
    case = op.case(42, (16, 32, 16, 16), layout, np.float32, loc=1.0, momentum=0.3)
    default = ops.run_all(op, case)
    with threadpool_limits(limits=1, user_api="openmp"):
        assert bn_simd.get_num_threads() == 1
        limited = ops.run_all(op, case)
    _same_bits(limited, default, "under a threadpoolctl limit")


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
@pytest.mark.parametrize("op,layout,dtype", [pytest.param(op, lay, d, id=f"{op.name}-{lay}-{np.dtype(d).name}")
                                             for op in ops.OPS for lay in ("NCHW", "NHWC")
                                             for d in (np.float32, np.float64)
                                             if op.supports((8, 19, 13, 11), lay, d)])
def test_simd_kernels_agree_with_scalar_within_a_few_ulp(op, layout, dtype, other):
    """The kernels differ only in the order of float64 additions and in fused vs separate multiply-add, so
    each output shaped like x is within 4 ulp of the scalar one, measured at the magnitude of the terms it is made of
    (its oracle bound / 4 eps: each side rounds about 2.5 times per output, see conftest.apply_tol); a statistic or
    parameter gradient is within reduction_tol(n) (a float64 sum in another order), plus 2 eps when it is rounded to
    a narrower dtype than float64."""
    nchw_shape = (8, 19, 13, 11)
    case = op.case(47, nchw_shape, layout, dtype, loc=1.0, scale=2.0, momentum=0.3)
    bn_simd.set_isa("scalar")
    scalar = ops.run_all(op, case)
    bn_simd.set_isa(other)
    simd = ops.run_all(op, case)
    e, n = eps_of(dtype), case.n
    expected = {}
    for ep in op.entry_points:
        expected.update({f"{ep.name}.{k}": v for k, v in ep.expected(case).items()})
    assert simd.keys() == scalar.keys()
    for k in scalar:
        spec = ops.output_spec(op, k)
        if scalar[k] is None:
            assert simd[k] is None, k
        elif spec.shape == ops.DATA:
            assert_ulp_close(simd[k], scalar[k], expected[k].bound / (4 * e), 4, dtype, k)
        elif spec.shape == ops.SCALAR:
            np.testing.assert_array_equal(simd[k], scalar[k], err_msg=k)
        else:
            rtol = reduction_tol(n) + (0.0 if spec.float64 else 2 * e)
            np.testing.assert_allclose(simd[k], scalar[k], rtol=rtol, atol=rtol * np.abs(scalar[k]).max(), err_msg=k)


# ---- 16-bit data (float16, bfloat16): the functional entry points (tests/half_cases.py) ----------------------------
# (bitwise results for 1, 2 and 3 threads: tests/test_half_registry.py)

def _half_run(op, case):
    res = {}
    for ep in half_cases.entries(op, case):
        res.update({f"{ep.name}.{k}": v for k, v in ep(case.fresh()).items()})
    return res


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
@pytest.mark.parametrize("name", half_cases.NAMES)
@pytest.mark.parametrize("op", [op for op in ops.OPS if half_cases.supports(op, (16, 32, 16, 16), "NHWC")], ids=str)
def test_16_bit_threadpoolctl_limit_gives_the_default_bits(op, name):
    case = half_cases.case(op, 42, (16, 32, 16, 16), "NHWC", half_cases.dtype(name))
    default = _half_run(op, case)
    with threadpool_limits(limits=1, user_api="openmp"):
        _same_bits(_half_run(op, case), default, "under a threadpoolctl limit")


@pytest.mark.skipif(not SIMD_ISAS, reason="no SIMD kernels on this CPU")
@pytest.mark.parametrize("other", SIMD_ISAS)
@pytest.mark.parametrize("name", half_cases.NAMES)
@pytest.mark.parametrize("op,layout", [pytest.param(op, lay, id=f"{op.name}-{lay}") for op in ops.OPS
                                       for lay in ("NCHW", "NHWC") if half_cases.supports(op, (8, 19, 13, 11), lay)])
def test_16_bit_simd_kernels_agree_with_scalar_within_one_ulp(op, layout, name, other):
    """16-bit outputs are the float32 results rounded once, and the float32 results of two ISAs differ by a few
    float32 ulp of their terms (see above): so an output shaped like x is within one ulp of the 16-bit type plus
    those float32 ulp of the scalar one; float32 statistics and parameter gradients as above. An entry point that
    rounds an intermediate to the 16-bit type and computes its other outputs from it (half_cases.ROUNDED_BETWEEN:
    the intermediate is itself an output, held to the one ulp) can see the two ISAs' intermediates a 16-bit ulp
    apart where its float32 value sits near a rounding midpoint: its other outputs may move further by what the
    oracle's linear maps carry of the intermediates' observed difference (EntryPoint.carry), and no more."""
    dt = half_cases.dtype(name)
    case = half_cases.case(op, 47, (8, 19, 13, 11), layout, dt)
    bn_simd.set_isa("scalar")
    scalar = _half_run(op, case)
    bn_simd.set_isa(other)
    simd = _half_run(op, case)
    e16, e32 = float(np.finfo(dt).eps), eps_of(np.float32)
    expected, carried = {}, {}
    for ep in half_cases.entries(op, case):
        expected.update({f"{ep.name}.{k}": v for k, v in half_cases.expected(ep, case).items()})
        if ep.name in half_cases.ROUNDED_BETWEEN:
            k = f"{ep.name}.{half_cases.ROUNDED_BETWEEN[ep.name]}"
            moved = np.abs(simd[k].astype(np.float64) - scalar[k].astype(np.float64))
            carried.update({f"{ep.name}.{o}": v for o, v in ep.carried(case, moved).items()})
    assert simd.keys() == scalar.keys()
    for k in scalar:
        spec = ops.output_spec(op, k)
        if scalar[k] is None:
            assert simd[k] is None, k
        elif spec.shape == ops.DATA:
            a, b = simd[k].astype(np.float64), scalar[k].astype(np.float64)
            big = np.maximum(np.abs(a), np.abs(b))
            ulp16 = np.maximum(np.ldexp(e16, np.frexp(np.where(big > 0, big, 1.0))[1] - 1),
                               float(np.finfo(dt).tiny) * e16)  # (subnormals: a fixed spacing)
            terms = np.broadcast_to(expected[k].bound, a.shape) / (4 * e16)  # (the terms' magnitude, as above)
            assert_within(a, b, ulp16 + 4 * e32 * terms + carried.get(k, 0.0), k)
        else:
            rtol = reduction_tol(case.n) + (0.0 if spec.float64 else 2 * e32)
            b = scalar[k].astype(np.float64)
            assert_within(simd[k], b, rtol * (np.abs(b) + np.abs(b).max()) + carried.get(k, 0.0), k)
