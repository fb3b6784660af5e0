"""Kernel selection (ISA), thread count and tuning budgets: module-level settings of the default context, and
:class:`Context` objects for the calls made inside a ``with`` block."""
import numbers
import os
import threading

from . import _openmp

_openmp.before_load()
try:
    from . import _core
finally:
    _openmp.after_load()
_openmp.record_build(_core.have_openmp())

from ._version import __version__  # noqa: E402  (the one place it is written)

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
    _core.set_isa(str(name))  # (a str subclass, numpy.str_, as the plain str)


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
    """Threads the next kernel call may use (small inputs run on one regardless): the current context's, else the
    set_num_threads setting, else OpenMP's."""
    if not _core.have_openmp():
        return 1
    n = _call_threads()
    n = n if n > 0 else _core.omp_max_threads()
    return min(n, _core.thread_cap())  # (a call starts no more: OMP_THREAD_LIMIT, and 1024)


def _call_threads():
    """The nthreads argument of a kernel call: the current context's threads, else set_num_threads' (0: OpenMP's)."""
    stack = getattr(_local, "stack", None)
    if stack and stack[-1].num_threads is not None:
        return stack[-1].num_threads
    return 0 if _num_threads is None else _num_threads


_local = threading.local()
_open_contexts = 0  # `with Context` blocks open in all threads (0: every call takes the module settings)
_open_lock = threading.Lock()


def _check_threads(n, name="num_threads"):
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1 or None, got {type(n).__name__}")
    if not 1 <= n < 2**31:
        raise ValueError(f"{name} must be >= 1 and < 2**31, got {n}")
    return int(n)


def _context(isa, num_threads, cl_strip_bytes, slab_bytes):
    """A Context from its settings (Context.__reduce__)."""
    return Context(isa=isa, num_threads=num_threads, cl_strip_bytes=cl_strip_bytes, slab_bytes=slab_bytes)


class Context:
    """Settings for the bn_simd calls that a thread makes inside ``with ctx:`` (contexts nest; each thread has its
    own), so that two pipelines in one process can run with different settings at once::

        fast = bn_simd.Context(num_threads=4)
        quiet = bn_simd.Context(num_threads=1, isa="avx2")
        with quiet:                      # in a thread of its own, beside a thread running `with fast:`
            y = bn_simd.batch_norm(x, rm, rv, training=False)

    Parameters (None: the default context's, i.e. the module-level setting)
    ----------
    isa : "scalar", "avx2", "avx512" (one this CPU supports) or "auto" (the best).
    num_threads : int >= 1.
    cl_strip_bytes, slab_bytes : the tuning budgets of show_config (tests and tuning; no result bit depends on them).

    The module-level set_isa and set_num_threads change the default context, which applies outside every ``with``
    block and to the settings a context leaves at None. A context must not be changed while calls run under it.
    Contexts belong to the OS thread: asyncio tasks and generators that share a thread share them, so a ``with``
    block must not await or yield (another task's calls would run under this context, and its block's exit would
    end the wrong one).
    """

    def __init__(self, *, isa=None, num_threads=None, cl_strip_bytes=None, slab_bytes=None):
        self._handle = _core.ContextHandle()
        if isa is not None:
            if not isinstance(isa, str):
                raise TypeError(f"isa must be a string or None, got {type(isa).__name__}")
            self._handle.set_isa(_core.best_isa() if isa == "auto" else isa)
        self.isa_setting = isa
        self.num_threads = _check_threads(num_threads)
        if cl_strip_bytes is not None:
            self._handle.set_cl_strip_bytes(_check_bytes(cl_strip_bytes, "cl_strip_bytes"))
        if slab_bytes is not None:
            self._handle.set_slab_bytes(_check_bytes(slab_bytes, "slab_bytes"))
        self.cl_strip_bytes, self.slab_bytes = cl_strip_bytes, slab_bytes

    def __reduce__(self):
        # pickles, copies and deep copies: a new context with these settings (the C handle is not shared)
        return (_context, (self.isa_setting, self.num_threads, self.cl_strip_bytes, self.slab_bytes))

    def __enter__(self):
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        global _open_contexts
        with _open_lock:
            _open_contexts += 1
        stack.append(self)
        _core.use_context(self._handle)
        return self

    def __exit__(self, *exc):
        global _open_contexts
        stack = _local.stack
        stack.pop()
        _core.use_context(stack[-1]._handle if stack else None)
        with _open_lock:
            _open_contexts -= 1
        return False

    def __repr__(self):
        return (f"Context(isa={self.isa_setting!r}, num_threads={self.num_threads!r}, "
                f"cl_strip_bytes={self.cl_strip_bytes!r}, slab_bytes={self.slab_bytes!r})")


def _check_bytes(v, name):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(v).__name__}")
    return int(v)


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
