import os
import sys

import bn_simd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cases  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=2,
                     help="threads for bn_simd, PyTorch and ONNX Runtime in the benchmarks (default 2)")
    parser.addoption("--bench-default-malloc", action="store_true",
                     help="leave glibc's malloc thresholds adaptive (see steady_allocator in bn_simd/_bench.py)")


def pytest_configure(config):
    cases.configure(config.getoption("--bench-threads"))
    if not config.getoption("--bench-default-malloc"):
        cases.steady_allocator()


def pytest_report_header(config):
    v = cases.versions()
    found = ", ".join(f"{k} {val}" for k, val in v.items() if val) or "none"
    malloc = "fixed" if cases.STATE.steady_malloc else "default"
    return (f"bn_simd benchmarks: {cases.STATE.threads} thread(s), kernels {bn_simd.get_isa()}, {malloc} malloc "
            f"thresholds; {found}")
