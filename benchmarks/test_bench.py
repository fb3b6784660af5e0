"""pytest-benchmark suite: python -m pytest benchmarks/ --benchmark-only [--benchmark-group-by=group]."""
import pytest

import cases as bc

PARAMS = [(c, op, impl) for c in bc.CASES for op in c.ops for impl in bc.IMPLS]
_data = {}


def _get(case):
    if case.name not in _data:
        _data.clear()  # one case's arrays at a time: the big ones are ~100 MB each
        _data[case.name] = bc.Data(case)
    return _data[case.name]


@pytest.mark.parametrize("case,op,impl", PARAMS, ids=[f"{c.name}-{op}-{i}" for c, op, i in PARAMS])
def test_bench(benchmark, case, op, impl):
    fn = bc.IMPLS[impl](_get(case), op)
    if fn is None:
        pytest.skip(f"{impl} not installed or does not support this case")
    benchmark.group = f"{case.name} {op}"
    benchmark.extra_info["min_bytes"] = bc.PASSES[op] * case.nbytes()
    benchmark.pedantic(fn, rounds=7 if case.nbytes() > 10**7 else 30, warmup_rounds=1)


@pytest.mark.parametrize("case", bc.CASES, ids=[c.name for c in bc.CASES])
def test_copy_probe(benchmark, case):
    benchmark.group = f"{case.name} copy"
    benchmark.pedantic(bc.copy_probe(_get(case)), rounds=7 if case.nbytes() > 10**7 else 30, warmup_rounds=1)
