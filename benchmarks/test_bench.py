"""pytest-benchmark suite: every case x op x implementation, one group per case and op.

    python -m pytest benchmarks/ --benchmark-only [--bench-threads N]

Only the combinations an implementation supports are collected (ONNX Runtime: eval with channels on
axis 1; PyTorch out=: forward-train and eval); those whose library is not installed are skipped.
Without --benchmark-only, test_agreement also checks that all implementations compute the same output.
"""
import numpy as np
import pytest

import cases

PARAMS = [(case, op, impl) for case in cases.CASES for op in case.ops for impl in cases.IMPLEMENTATIONS
          if cases.supports(impl, case, op)]

_current = {}


def workspace(case):
    """The arrays of one case at a time (the large cases hold ~100 MB per tensor); the parameters are
    ordered by case, so each case's arrays are built once."""
    if _current.get("case") is not case:
        _current.clear()
        _current["ws"] = cases.Workspace(case)
        _current["case"] = case
    return _current["ws"]


def _run(benchmark, fn, case):
    rounds, iterations = cases.rounds_for(case)
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)


@pytest.mark.parametrize("case,op,impl", PARAMS, ids=[f"{c.id}-{op}-{impl}" for c, op, impl in PARAMS])
def test_op(benchmark, case, op, impl):
    lib = cases.missing(impl)
    if lib:
        pytest.skip(f"{lib} is not installed")
    benchmark.group = f"{case.id} {cases.OP_TITLES[op]}"
    runner = cases.IMPLEMENTATIONS[impl](workspace(case), op)
    benchmark.extra_info.update(min_bytes=case.min_bytes(op), threads=cases.STATE.threads)
    _run(benchmark, runner, case)


@pytest.mark.parametrize("case", cases.CASES, ids=[c.id for c in cases.CASES])
def test_copy_probe(benchmark, case):
    benchmark.group = f"{case.id} copy probe"
    benchmark.extra_info.update(min_bytes=cases.probe_bytes(case))
    _run(benchmark, cases.copy_probe(workspace(case)), case)


SMALL = [cases.Case((4, 24, 5, 7), "NCHW"), cases.Case((4, 24, 5, 7), "NHWC"), cases.Case((64, 40))]


@pytest.mark.parametrize("case", SMALL, ids=[c.id for c in SMALL])
@pytest.mark.parametrize("op", cases.OPS)
def test_agreement(case, op):
    ws = cases.Workspace(case, seed=1)
    for impl, diff in cases.max_difference(ws, op).items():
        assert diff < 1e-5, f"{impl} differs from bn_simd by {diff} ({case.id} {op})"
    assert np.isfinite(ws.out).all()
