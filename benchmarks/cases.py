"""Benchmark cases and implementations for the pytest-benchmark suite (``test_bench.py``).

They live in ``bn_simd/_bench.py``, where ``python -m bn_simd bench`` and ``run.py`` use them too; this
module re-exports what the suite needs and adds the number of pytest-benchmark rounds per case.
"""
from bn_simd._bench import (CASES, IMPLEMENTATIONS, OP_TITLES, OPS, STATE, Case, Workspace,  # noqa: F401
                            configure, copy_probe, max_difference, missing, probe_bytes, steady_allocator,
                            supports, versions)


def rounds_for(case):
    """(rounds, iterations per round) for pytest-benchmark: few rounds for the ~100 MB tensors."""
    if case.nbytes >= 40e6:
        return 5, 1
    if case.nbytes >= 4e6:
        return 10, 1
    if case.nbytes >= 100e3:
        return 50, 1
    return 100, 20
