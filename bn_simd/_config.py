"""Kernel selection (ISA) and thread count."""
import numbers
import os

from . import _openmp

_openmp.before_load()
try:
    from . import _core
finally:
    _openmp.after_load()
_openmp.record_build(_core.have_openmp())

__version__ = "0.1.0"

_num_threads = None  # None: follow OpenMP (OMP_NUM_THREADS, threadpoolctl)


def _isa_from_env():
    name = os.environ.get("BN_SIMD_ISA", "").strip().lower()
    if name in ("", "auto"):
        return
    if name not in _core.ISA_NAMES:
        raise ValueError(f"BN_SIMD_ISA must be one of {('auto',) + _core.ISA_NAMES}, got {name!r}")
    if not _core.isa_supported(name):
        raise ValueError(f"BN_SIMD_ISA={name!r} asks for kernels this CPU cannot run; "
                         f"it supports {_core.supported_isas()}")
    _core.set_isa(name)


def set_isa(name):
    """Select the kernels: "scalar", "avx2", "avx512" (if the CPU has them) or "auto".

    Raises ValueError for an unknown name or one the CPU does not support. Not meant to be called while
    other threads are inside bn_simd.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    if name == "auto":
        name = _core.best_isa()
    if name not in _core.ISA_NAMES:
        raise ValueError(f"name must be one of {('auto',) + _core.ISA_NAMES}, got {name!r}")
    _core.set_isa(name)


def get_isa():
    """The name of the kernels in use."""
    return _core.get_isa()


def set_num_threads(n):
    """Threads for the kernels: an int >= 1, or None to follow OpenMP (OMP_NUM_THREADS, threadpoolctl)."""
    global _num_threads
    if n is None:
        _num_threads = None
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int >= 1 or None, got {type(n).__name__}")
    if not 1 <= n < 2**31:
        raise ValueError(f"n must be >= 1 and < 2**31, got {n}")
    _num_threads = int(n)


def get_num_threads():
    """Threads the next kernel call may use (small inputs run on one regardless)."""
    if not _core.have_openmp():
        return 1
    return _num_threads if _num_threads is not None else _core.omp_max_threads()


def show_config():
    """Build and run-time configuration as a dict."""
    return {
        "version": __version__,
        "isa": _core.get_isa(),
        "supported_isas": _core.supported_isas(),
        "best_isa": _core.best_isa(),
        "openmp": _core.have_openmp(),
        "num_threads": get_num_threads(),
        # how idle OpenMP threads wait after a call (a short spin, then sleep; bn_simd/_openmp.py)
        "omp_spin": _openmp.policy(),
        # channels-last element-wise sweeps go in column strips from this row size (bytes; CPU-dependent)
        "cl_strip_bytes": _core.cl_strip_bytes(),
        # ... and from this one when their output streams (beyond the last-level cache)
        "cl_stream_strip_bytes": _core.cl_stream_strip_bytes(),
        # channels-first training forward and backward group channels in this much of a core's caches (0: two
        # sweeps), in calls whose inputs exceed slab_min_input bytes
        "slab_bytes": _core.slab_bytes(),
        "slab_min_input": _core.slab_min_input(),
    }


_isa_from_env()
