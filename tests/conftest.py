import numpy as np
import pytest

import bn_simd

ISAS = bn_simd.show_config()["supported_isas"]


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def tol(dtype, n=1):
    """Absolute error bound for an O(1) normalised quantity computed from float data of `dtype`.

    The kernels accumulate in float64, so the reduction over n values adds ~ n * eps64 (a loose worst-case
    bound for recursive summation); the element-wise apply in `dtype` adds a few ulp of the output: one
    rounding each for x - m, the fma and the coefficients a and b, plus the rounding of mean to dtype,
    which is exact to within one ulp of |y|. 8 ulp covers them with margin.
    """
    return 8 * np.finfo(dtype).eps + 4 * n * np.finfo(np.float64).eps


def grad_tol(dtype, n):
    """Bound for sums of n products (grad_weight, grad_bias) relative to sqrt(n) * scale: float data adds one
    rounding per input element, and they add up like a random walk (sqrt(n)), bounded here by 8 sqrt(n)."""
    return 8 * np.sqrt(n) * np.finfo(dtype).eps + 4 * n * np.finfo(np.float64).eps


def make(shape, dtype=np.float32, seed=0, loc=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


def channels(shape, layout):
    return shape[1] if layout == "NCHW" else shape[-1]


@pytest.fixture(params=ISAS)
def isa(request):
    prev = bn_simd.get_isa()
    bn_simd.set_isa(request.param)
    yield request.param
    bn_simd.set_isa(prev)


@pytest.fixture
def threads():
    """Restores the thread setting after the test."""
    yield bn_simd.set_num_threads
    bn_simd.set_num_threads(None)
