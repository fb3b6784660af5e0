"""bn_simd's benchmarks: the harness (``benchmarks.harness``), its command line (``run.py``) and the
pytest-benchmark suite (``test_bench.py``). Part of the source checkout, not of the installed package."""
