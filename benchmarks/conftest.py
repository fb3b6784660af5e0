import bn_simd

from benchmarks.harness import impls, machine


def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=2,
                     help="threads for bn_simd, PyTorch and ONNX Runtime in the benchmarks (default 2)")
    parser.addoption("--bench-default-malloc", action="store_true",
                     help="leave glibc's malloc thresholds adaptive (see steady_allocator in "
                          "benchmarks/harness/machine.py)")


def pytest_configure(config):
    impls.configure(config.getoption("--bench-threads"))
    if not config.getoption("--bench-default-malloc"):
        machine.steady_allocator()


def pytest_report_header(config):
    v = impls.versions()
    found = ", ".join(f"{k} {val}" for k, val in v.items() if val) or "none"
    malloc = "fixed" if machine.MALLOC.steady else "default"
    return (f"bn_simd benchmarks: {impls.STATE.threads} thread(s), kernels {bn_simd.get_isa()}, {malloc} malloc "
            f"thresholds; {found}")
