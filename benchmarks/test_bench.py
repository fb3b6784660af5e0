"""pytest-benchmark suite: every case x mode x implementation, one group per case and mode.

    python -m pytest benchmarks/ --benchmark-only [--bench-threads N]

Only the combinations an implementation supports are collected (ONNX Runtime: batch-norm eval and
group-/instance-norm forward, channels on axis 1; PyTorch out=: batch-norm forward-train and eval); those
whose library is not installed are skipped. The group-norm and instance-norm groups also hold "bn_eval",
bn_simd's batch-norm eval of the same tensor (the yardstick of their targets). Without --benchmark-only,
test_agreement also checks that all implementations compute the same output.
"""
import numpy as np
import pytest

from benchmarks import cases
from benchmarks.harness import impls
from benchmarks.harness.cases import MODE_TITLES, workspace

_current = {}


def _workspace(case):
    """The arrays of one case at a time (the large cases hold ~100 MB per tensor); the parameters are
    ordered by case, so each case's arrays are built once."""
    if _current.get("case") is not case:
        _current.clear()
        _current["ws"] = workspace(case)
        _current["case"] = case
    return _current["ws"]


def _run(benchmark, fn, case):
    rounds, iterations = cases.rounds_for(case)
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)


@pytest.mark.parametrize("case,mode,impl", cases.PARAMS, ids=[f"{c.id}-{m}-{n}" for c, m, n in cases.PARAMS])
def test_op(benchmark, case, mode, impl):
    lib = impls.missing(impl)
    if lib:
        pytest.skip(f"{lib} is not installed")
    benchmark.group = f"{case.id} {MODE_TITLES[mode]}"
    runner = impls.runner(impl, _workspace(case), mode)
    benchmark.extra_info.update(min_bytes=case.min_bytes(mode), threads=impls.STATE.threads)
    _run(benchmark, runner, case)


@pytest.mark.parametrize("case", cases.CASES, ids=[c.id for c in cases.CASES])
def test_copy_probe(benchmark, case):
    benchmark.group = f"{case.id} copy probe"
    benchmark.extra_info.update(min_bytes=impls.probe_bytes(case))
    _run(benchmark, impls.copy_probe(_workspace(case)), case)


@pytest.mark.parametrize("case,mode", cases.AGREEMENT, ids=[f"{c.id}-{m}" for c, m in cases.AGREEMENT])
def test_agreement(case, mode):
    ws = workspace(case, seed=1)
    for impl, diff in impls.max_difference(ws, mode).items():
        assert diff < 1e-5, f"{impl} differs from bn_simd by {diff} ({case.id} {mode})"
    assert np.isfinite(ws.out).all()
