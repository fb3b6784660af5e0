"""ctypes binding of the C library's public API (include/bn_simd_api.h, bn_simd/lib/libbn_simd.so) for the tests:
NumPy arrays in, status codes out. Loaded lazily; None when the package was built without the library."""
import ctypes as ct
import os

import numpy as np

import bn_simd

F32, F64, F16, BF16 = 0, 1, 2, 3
NCHW, NHWC = 0, 1
STATUS = {"OK": 0, "ENOMEM": -1, "EINVAL": -2, "EISA": -3, "ENULL": -4, "ESIZE": -5, "EEPS": -6, "EMOMENTUM": -7,
          "ELAYOUT": -8, "EDTYPE": -9, "EGROUPS": -10, "EWORKSPACE": -11, "EOVERLAP": -12, "EOP": -13}
OPS = {"inference": 0, "training": 1, "backward": 2, "group_forward": 3, "group_backward": 4, "layer_forward": 5,
       "layer_backward": 6, "moments": 7}
DTYPE_CODE = {np.dtype(np.float32): F32, np.dtype(np.float64): F64, np.dtype(np.float16): F16}


class Desc(ct.Structure):
    _fields_ = [("dtype", ct.c_int), ("param_dtype", ct.c_int), ("layout", ct.c_int), ("n", ct.c_int64),
                ("c", ct.c_int64), ("s", ct.c_int64)]


TASK = ct.CFUNCTYPE(None, ct.c_void_p, ct.c_int64)
PFOR = ct.CFUNCTYPE(None, ct.c_void_p, ct.c_int64, TASK, ct.c_void_p)

_lib = None


def lib():
    """The loaded library with its functions' signatures set."""
    global _lib
    if _lib is None:
        path = os.path.join(bn_simd.get_library_dirs()[0], "libbn_simd.so")
        L = ct.CDLL(path)
        P, D, INT, I64, S, dbl = ct.c_void_p, ct.POINTER(Desc), ct.c_int, ct.c_int64, ct.c_size_t, ct.c_double
        sig = {
            "bn_version": (ct.c_char_p, []), "bn_strerror": (ct.c_char_p, [INT]),
            "bn_context_create": (P, []), "bn_context_destroy": (None, [P]), "bn_default_context": (P, []),
            "bn_context_set_num_threads": (INT, [P, INT]), "bn_context_set_isa": (INT, [P, INT]),
            "bn_context_set_parallel_for": (INT, [P, PFOR, P]),
            "bn_workspace_size": (INT, [P, INT, D, I64, ct.POINTER(S)]),
            "bn_batch_norm_inference": (INT, [P, D, P, P, P, P, P, P, dbl, P, S]),
            "bn_batch_norm_training": (INT, [P, D, P, P, P, P, dbl, dbl, P, P, P, P, P, S]),
            "bn_batch_norm_backward": (INT, [P, D, P, P, P, P, P, P, INT, P, P, P, S]),
            "bn_fold_params": (INT, [I64, INT, P, P, P, P, dbl, P, P]),
            "bn_batch_norm_moments": (INT, [P, D, P, ct.POINTER(I64), P, P, P, P, P, S]),
            "bn_merge_moments": (INT, [I64, I64, INT, P, P, P, P, P, P]),
            "bn_group_norm_forward": (INT, [P, D, I64, P, P, P, P, dbl, P, P, P, S]),
            "bn_group_norm_backward": (INT, [P, D, I64, P, P, P, P, P, P, P, P, P, S]),
            "bn_instance_norm_forward": (INT, [P, D, P, P, P, P, dbl, P, P, P, S]),
            "bn_instance_norm_backward": (INT, [P, D, P, P, P, P, P, P, P, P, P, S]),
            "bn_layer_norm_forward": (INT, [P, D, P, P, P, P, dbl, P, P, P, S]),
            "bn_layer_norm_backward": (INT, [P, D, P, P, P, P, P, P, P, P, P, S]),
            "bn_rms_norm_forward": (INT, [P, D, P, P, P, dbl, P, P, S]),
            "bn_rms_norm_backward": (INT, [P, D, P, P, P, P, P, P, P, S]),
        }
        for name, (res, args) in sig.items():
            f = getattr(L, name)
            f.restype, f.argtypes = res, args
        # the library's default context on the package's ISA (BN_SIMD_ISA=scalar pins the package's; results are
        # compared bit for bit, and the scalar kernels round a * b + c twice where the vector ones fuse it)
        L.bn_context_set_isa(L.bn_default_context(), {"scalar": 0, "avx2": 1, "avx512": 2}[bn_simd.get_isa()])
        _lib = L
    return _lib


def ptr(a):
    """The data pointer of an array (None stays None: NULL)."""
    return None if a is None else a.ctypes.data


def desc(x, layout=NCHW, param=F64, dtype=None):
    """The bn_desc of an (N, C, *spatial) / (N, *spatial, C) array."""
    n = x.shape[0]
    c = x.shape[1] if layout == NCHW else x.shape[-1]
    s = x.size // max(n * c, 1)
    return Desc(DTYPE_CODE[x.dtype] if dtype is None else dtype, param, layout, n, c, s)


class Pool:
    """A parallel_for run on the calling thread, tasks in reverse order (the results must not depend on it);
    counts the tasks it ran."""

    def __init__(self):
        self.calls = 0
        self.tasks = 0

        def pfor(pool, n, task, arg):
            self.calls += 1
            for i in reversed(range(n)):
                self.tasks += 1
                task(arg, i)

        self.fn = PFOR(pfor)


def context(threads=0, pool=None):
    """A new context (freed with the returned object's close())."""
    L = lib()
    c = L.bn_context_create()
    assert c
    assert L.bn_context_set_num_threads(c, threads) == 0
    if pool is not None:
        assert L.bn_context_set_parallel_for(c, pool.fn, None) == 0
    return c
