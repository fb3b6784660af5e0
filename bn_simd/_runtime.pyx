# cython: language_level=3
"""Probes that run before the OpenMP runtime is loaded (see _openmp.py). Built without OpenMP."""

cdef extern from "runtime_probe.h" nogil:
    double bn_probe_spin_ns()
    int bn_probe_libgomp_loaded()
    int bn_probe_compiler_is_gcc()


def spin_ns():
    """Nanoseconds per iteration of an idle OpenMP thread's spin loop on this CPU."""
    return bn_probe_spin_ns()


def libgomp_loaded():
    """True when libgomp.so.1 is already loaded in this process."""
    return bool(bn_probe_libgomp_loaded())


def built_with_gcc():
    """True when the extensions were compiled by GCC (whose OpenMP runtime is libgomp)."""
    return bool(bn_probe_compiler_is_gcc())
