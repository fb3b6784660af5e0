"""The registry's ops (tests/ops.py) on float16 data: every entry point that takes 16-bit data (the functional ones
and the layers, whose parameters are float32), on a representative set of shapes and both layouts, against the op's
float64 oracle with the bounds of float16 (bounds.py with float16's eps: its rounding counted once more than
float32's math needs), and the same bits for 1, 2 and 3 threads (float16 and bfloat16). The outputs' dtypes follow
the 16-bit rule: x's dtype for outputs shaped like x, float32 for statistics and parameter gradients of float32
parameters, float64 reductions as ever.
"""
import numpy as np
import pytest

import bn_simd
import half_cases
import ops

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
HALF_ENTRIES = half_cases.ENTRIES  # (the entry points that take 16-bit data)
SHAPES = [(4, 5, 6, 7), (3, 33, 9), (64, 17), (2, 300, 3)]
CASES = [pytest.param(op, s, lay, id=f"{op.name}-{'x'.join(map(str, s))}-{lay}")
         for op in ops.OPS for s in SHAPES for lay in ("NCHW", "NHWC") if op.supports(s, lay, F16)]


def _half_case(op, shape, layout):
    """op's case made for float16 data with float32 parameters and running statistics (the registry's make_case
    rounds every data array, and the saved statistics, to float16)."""
    return op.case(7, shape, layout, F16, loc=1.0, scale=2.0, param_dtype=F32, stats_dtype=F32, momentum=0.3)


def _entries(op, case):
    return [ep for ep in op.entry_points if ep.name in HALF_ENTRIES and ep.applies(case)]


@pytest.mark.parametrize("op,shape,layout", CASES)
def test_registry_entry_points_on_float16_data_against_the_oracle(op, shape, layout):
    case = _half_case(op, shape, layout)
    for ep in _entries(op, case):
        got = ep(case.fresh())
        exp = ep.expected(case)
        for o in ep.outputs:
            e = exp[o.name]
            if e is None:
                assert got[o.name] is None, f"{case} {ep.name}.{o.name}"
                continue
            # 16-bit rule: float32 where the float32 library returns x's dtype for a non-data output
            want = e.dtype
            if o.shape != ops.DATA and want == F16:
                want = F32
            ops.compare(got[o.name], ops.Expected(e.value, e.bound, np.dtype(want)), f"{case} {ep.name}.{o.name}")


# (beyond the sizes that run on one thread (32768 elements) or in sweeps of their own (65536): docs/tuning.md)
THREAD_SHAPES = [(8, 24, 20, 20), (6, 520, 24)]
THREAD_CASES = [pytest.param(op, s, lay, id=f"{op.name}-{'x'.join(map(str, s))}-{lay}")
                for op in ops.OPS for s in THREAD_SHAPES for lay in ("NCHW", "NHWC") if op.supports(s, lay, F16)]


@pytest.mark.skipif(not bn_simd.show_config().get("openmp", True), reason="built without OpenMP")
@pytest.mark.parametrize("name", half_cases.NAMES)
@pytest.mark.parametrize("op,shape,layout", THREAD_CASES)
def test_registry_entry_points_on_16_bit_data_give_the_same_bits_for_any_thread_count(op, shape, layout, name):
    assert np.prod(shape) > 65536  # (threads run: the bits of 1, 2 and 3 threads are compared)
    case = half_cases.case(op, 7, shape, layout, half_cases.dtype(name))
    results = []
    for n in (1, 2, 3):
        with bn_simd.Context(num_threads=n):
            results.append({f"{ep.name}.{k}": v for ep in _entries(op, case) for k, v in ep(case.fresh()).items()})
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for k, v in results[0].items():
            if v is None:
                assert other[k] is None, k
            else:
                assert v.dtype == other[k].dtype and v.tobytes() == other[k].tobytes(), f"{case} {k}"
