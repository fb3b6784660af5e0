# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The bridge to the C kernels (include/bn_simd.h): the work of every entry point.

An entry point here takes the user's arguments as they came. bn_simd/_args.pyx checks and converts them, raising
before anything is written; this module then allocates the outputs, reads the per-channel arrays as float64, calls
the kernel with the GIL released, and turns its status into an exception. Kernels are called through the helpers of
"Kernels by storage dtype", the one place that names a storage dtype: a new one is a case in each helper.
bn_simd/functional.py and bn_simd/groups.py give these entry points their public names and documentation.
"""
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.float cimport DBL_EPSILON, FLT_EPSILON, FLT_MAX
from libc.math cimport INFINITY, NAN, isfinite, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import operator

import numpy as np

cimport numpy as cnp

from bn_simd cimport _args as A
from bn_simd._args cimport DT_BF16, DT_F16, DT_F32, DT_F64, NCHW, Groups, Rows, View

cnp.import_array()

cdef extern from "bn_simd.h" nogil:
    int BN_OK, BN_ENOMEM, BN_EINVAL, BN_EISA
    int BN_ISA_SCALAR, BN_ISA_AVX2, BN_ISA_AVX512, BN_ISA_COUNT
    int bn_isa_supported(int isa)
    int bn_set_isa(int isa)
    int bn_get_isa()
    int bn_best_isa()
    const char* bn_isa_name(int isa)
    int bn_have_openmp()
    int bn_omp_max_threads()
    int bn_thread_cap()
    int BN_CL_STRIP_MIN_BYTES
    int64_t bn_cl_strip_bytes()
    int64_t bn_cl_stream_strip_bytes()
    int bn_set_cl_strip_bytes(int64_t nbytes)
    int64_t bn_slab_bytes()
    int64_t bn_slab_min_input()
    int bn_set_slab_bytes(int64_t nbytes)
    int64_t bn_stream_bytes()
    int bn_set_stream_bytes(int64_t nbytes)
    void bn_set_act_otf(int mode)

    ctypedef struct bn_context:
        pass
    bn_context* bn_default_context()
    bn_context* bn_context_create()
    void bn_context_destroy(bn_context* ctx)
    int bn_context_set_isa(bn_context* ctx, int isa)
    int bn_context_get_isa(const bn_context* ctx)
    int bn_context_set_cl_strip_bytes(bn_context* ctx, int64_t nbytes)
    int bn_context_set_slab_bytes(bn_context* ctx, int64_t nbytes)
    const bn_context* bn_context_use(const bn_context* ctx)

    int bn_stats_f32(const float* x, int64_t outer, int64_t C, int64_t inner, double* mean, double* var, int nt)
    int bn_stats_f16(const uint16_t* x, int64_t outer, int64_t C, int64_t inner, double* mean, double* var, int nt)
    int bn_stats_bf16(const uint16_t* x, int64_t outer, int64_t C, int64_t inner, double* mean, double* var, int nt)
    int bn_stats_f64(const double* x, int64_t outer, int64_t C, int64_t inner, double* mean, double* var, int nt)
    int bn_apply_f32(const float* x, float* y, int64_t outer, int64_t C, int64_t inner,
                     const float* m, const float* a, const float* b, int nt)
    int bn_apply_f64(const double* x, double* y, int64_t outer, int64_t C, int64_t inner,
                     const double* m, const double* a, const double* b, int nt)
    int bn_normalize_f32(const float* x, float* y, int64_t outer, int64_t C, int64_t inner, const double* mean,
                         const double* var, const double* weight, const double* bias, double eps, int nt)
    int bn_normalize_f16(const uint16_t* x, uint16_t* y, int64_t outer, int64_t C, int64_t inner, const double* mean,
                         const double* var, const double* weight, const double* bias, double eps, int nt)
    int bn_normalize_bf16(const uint16_t* x, uint16_t* y, int64_t outer, int64_t C, int64_t inner, const double* mean,
                         const double* var, const double* weight, const double* bias, double eps, int nt)
    int bn_normalize_f64(const double* x, double* y, int64_t outer, int64_t C, int64_t inner, const double* mean,
                         const double* var, const double* weight, const double* bias, double eps, int nt)
    int bn_forward_train_f32(const float* x, float* y, int64_t outer, int64_t C, int64_t inner,
                             const double* weight, const double* bias, double eps, double* mean, double* var, int nt)
    int bn_forward_train_f16(const uint16_t* x, uint16_t* y, int64_t outer, int64_t C, int64_t inner,
                             const double* weight, const double* bias, double eps, double* mean, double* var, int nt)
    int bn_forward_train_bf16(const uint16_t* x, uint16_t* y, int64_t outer, int64_t C, int64_t inner,
                             const double* weight, const double* bias, double eps, double* mean, double* var, int nt)
    int bn_forward_train_f64(const double* x, double* y, int64_t outer, int64_t C, int64_t inner,
                             const double* weight, const double* bias, double eps, double* mean, double* var, int nt)
    int bn_backward_reduce_f32(const float* dy, const float* x, int64_t outer, int64_t C, int64_t inner,
                               const double* mean, double* sum_dy, double* sum_dyxm, int nt)
    int bn_backward_reduce_f16(const uint16_t* dy, const uint16_t* x, int64_t outer, int64_t C, int64_t inner,
                               const double* mean, double* sum_dy, double* sum_dyxm, int nt)
    int bn_backward_reduce_bf16(const uint16_t* dy, const uint16_t* x, int64_t outer, int64_t C, int64_t inner,
                               const double* mean, double* sum_dy, double* sum_dyxm, int nt)
    int bn_backward_reduce_f64(const double* dy, const double* x, int64_t outer, int64_t C, int64_t inner,
                               const double* mean, double* sum_dy, double* sum_dyxm, int nt)
    int bn_backward_apply_f32(const float* dy, const float* x, float* dx, int64_t outer, int64_t C, int64_t inner,
                              const float* m, const float* a, const float* b, const float* d, int nt)
    int bn_backward_apply_f64(const double* dy, const double* x, double* dx, int64_t outer, int64_t C,
                              int64_t inner, const double* m, const double* a, const double* b, const double* d,
                              int nt)
    int bn_backward_f32(const float* dy, const float* x, float* dx, int64_t outer, int64_t C, int64_t inner,
                        const double* mean, const double* invstd, const double* weight, int training,
                        double* grad_weight, double* grad_bias, int nt)
    int bn_backward_f16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, int64_t outer, int64_t C, int64_t inner,
                        const double* mean, const double* invstd, const double* weight, int training,
                        double* grad_weight, double* grad_bias, int nt)
    int bn_backward_bf16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, int64_t outer, int64_t C, int64_t inner,
                        const double* mean, const double* invstd, const double* weight, int training,
                        double* grad_weight, double* grad_bias, int nt)
    int bn_backward_f64(const double* dy, const double* x, double* dx, int64_t outer, int64_t C, int64_t inner,
                        const double* mean, const double* invstd, const double* weight, int training,
                        double* grad_weight, double* grad_bias, int nt)

    int bn_moments_merge(int64_t K, int64_t C, const double* count, const double* shift, const double* resid,
                         const double* m2, double* mean, double* var)
    int bn_moments_f32(const float* x, int64_t outer, int64_t C, int64_t inner, int64_t* K, double* count,
                       double* shift, double* resid, double* m2, int nt)
    int bn_moments_f64(const double* x, int64_t outer, int64_t C, int64_t inner, int64_t* K, double* count,
                       double* shift, double* resid, double* m2, int nt)
    int bn_norm_params_f32(int64_t C, const double* mean, const double* var, const double* weight, const double* bias,
                           double eps, float* m, float* a, float* b)
    int bn_norm_params_f64(int64_t C, const double* mean, const double* var, const double* weight, const double* bias,
                           double eps, double* m, double* a, double* b)
    int bn_bwd_params_f32(int64_t C, double n, const double* sum_dy, const double* sum_dyxm, const double* mean,
                          const double* invstd, const double* weight, int training, double* grad_weight,
                          double* grad_bias, float* m, float* a, float* b, float* d)
    int bn_bwd_params_f64(int64_t C, double n, const double* sum_dy, const double* sum_dyxm, const double* mean,
                          const double* invstd, const double* weight, int training, double* grad_weight,
                          double* grad_bias, double* m, double* a, double* b, double* d)
    int bn_group_stats_f32(const float* x, int64_t N, int64_t C, int64_t S, int64_t G, int cl, double* mean,
                           double* var, int nt)
    int bn_group_stats_f64(const double* x, int64_t N, int64_t C, int64_t S, int64_t G, int cl, double* mean,
                           double* var, int nt)
    int bn_group_normalize_f32(const float* x, float* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,
                               const double* mean, const double* var, const double* weight, const double* bias,
                               double eps, int nt)
    int bn_group_normalize_f64(const double* x, double* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,
                               const double* mean, const double* var, const double* weight, const double* bias,
                               double eps, int nt)
    int bn_group_forward_f32(const float* x, float* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,
                             const double* weight, const double* bias, double eps, double* mean, double* var, int nt)
    int bn_group_forward_f16(const uint16_t* x, uint16_t* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,
                             const double* weight, const double* bias, double eps, double* mean, double* var, int nt)
    int bn_group_forward_bf16(const uint16_t* x, uint16_t* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,
                             const double* weight, const double* bias, double eps, double* mean, double* var, int nt)
    int bn_group_forward_f64(const double* x, double* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,
                             const double* weight, const double* bias, double eps, double* mean, double* var, int nt)
    int bn_group_backward_f32(const float* dy, const float* x, float* dx, int64_t N, int64_t C, int64_t S, int64_t G,
                              int cl, const double* mean, const double* invstd, const double* weight,
                              double* grad_weight, double* grad_bias, int nt)
    int bn_group_backward_f16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, int64_t N, int64_t C, int64_t S,
                              int64_t G,
                              int cl, const double* mean, const double* invstd, const double* weight,
                              double* grad_weight, double* grad_bias, int nt)
    int bn_group_backward_bf16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, int64_t N, int64_t C, int64_t S,
                              int64_t G,
                              int cl, const double* mean, const double* invstd, const double* weight,
                              double* grad_weight, double* grad_bias, int nt)
    int bn_group_backward_f64(const double* dy, const double* x, double* dx, int64_t N, int64_t C, int64_t S,
                              int64_t G, int cl, const double* mean, const double* invstd, const double* weight,
                              double* grad_weight, double* grad_bias, int nt)


ISA_NAMES = tuple(bn_isa_name(i).decode() for i in range(BN_ISA_COUNT))


cdef inline int _check(int status) except -1:
    if status == BN_OK:
        return 0
    if status == BN_ENOMEM:
        raise MemoryError("bn_simd: out of memory for the kernel's scratch space")
    raise ValueError(f"bn_simd: kernel rejected its arguments (status {status})")


cdef inline const double* _opt(const double[::1] v):
    return NULL if v is None else &v[0]


def isa_supported(str name):
    """True when this CPU can run the named ISA's kernels."""
    return name in ISA_NAMES and bool(bn_isa_supported(ISA_NAMES.index(name)))


def set_isa(str name):
    """Select the kernels for every later call (not thread-safe against running calls)."""
    if name not in ISA_NAMES:
        raise ValueError(f"ISA must be one of {ISA_NAMES}, got {name!r}")
    if bn_set_isa(ISA_NAMES.index(name)) != BN_OK:
        raise ValueError(f"ISA {name!r} is not supported by this CPU; supported: {supported_isas()}")


def get_isa():
    return ISA_NAMES[bn_get_isa()]


def best_isa():
    return ISA_NAMES[bn_best_isa()]


def supported_isas():
    return [n for i, n in enumerate(ISA_NAMES) if bn_isa_supported(i)]


def have_openmp():
    return bool(bn_have_openmp())


def omp_max_threads():
    return bn_omp_max_threads()


def thread_cap():
    return bn_thread_cap()


def cl_strip_bytes():
    """Row size (bytes, all arrays of a sweep) from which channels-last element-wise sweeps use column strips."""
    return bn_cl_strip_bytes()


def cl_stream_strip_bytes():
    """cl_strip_bytes for the sweeps whose output streams (beyond the last-level cache)."""
    return bn_cl_stream_strip_bytes()


def set_cl_strip_bytes(nbytes):
    """Set cl_strip_bytes and cl_stream_strip_bytes for every later call; None: back to the CPU's defaults. Tuning
    and tests only."""
    cdef int64_t v = -1 if nbytes is None else min(operator.index(nbytes), 2**62)  # (capped, as slab_bytes)
    # (the C call takes a negative value as "the default": here only None means that)
    if (nbytes is not None and v < 0) or bn_set_cl_strip_bytes(v) != BN_OK:
        raise ValueError(f"nbytes must be None or at least {BN_CL_STRIP_MIN_BYTES}, got {nbytes!r}")


cdef int64_t _byte_budget(nbytes) except? -2:
    """A byte-count setting for the C side: None -> -1 (the default), else an int >= 0 (capped at 2**62)."""
    if nbytes is None:
        return -1
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
        raise TypeError(f"nbytes must be None or an int >= 0, got {type(nbytes).__name__} {nbytes!r}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be None or an int >= 0, got {nbytes!r}")
    return min(int(nbytes), 2**62)


def slab_bytes():
    """Bytes of a core's caches that a channels-first training forward or backward may fill with a group of
    channels."""
    return bn_slab_bytes()


def slab_min_input():
    """Calls whose inputs (x; dy and x) are at most this many bytes take the two sweeps whatever slab_bytes is."""
    return bn_slab_min_input()


def set_slab_bytes(nbytes):
    """Set slab_bytes for every later call of any size (slab_min_input becomes 0; 0: never group channels); None:
    back to the CPU's defaults of both. Tuning and tests only: the results are the same bits whatever it is."""
    bn_set_slab_bytes(_byte_budget(nbytes))


def stream_bytes():
    """Bytes an element-wise sweep touches (inputs and output) beyond which it writes its output with streaming
    stores."""
    return bn_stream_bytes()


def set_stream_bytes(nbytes):
    """Set stream_bytes for every later call; None: back to the default (32 MiB). Tests only (they run the streamed
    paths on small arrays): the values written are the same bits whatever it is."""
    bn_set_stream_bytes(_byte_budget(nbytes))


def set_act_otf(mode):
    """Whether the training backward through ReLU and the piecewise-linear activations computes du where it reads it:
    None by the library's rule (the default), False never (du stored), True wherever its kernels can. Tests only: the
    results are the same bits whatever it is."""
    bn_set_act_otf(-1 if mode is None else 1 if mode else 0)



cdef class ContextHandle:
    """A C context (include/bn_simd.h, bn_context): ISA and tuning budgets for the calls made under it."""
    cdef bn_context* c

    def __cinit__(self):
        self.c = bn_context_create()
        if self.c == NULL:
            raise MemoryError("bn_simd: out of memory for a context")

    def __dealloc__(self):
        bn_context_destroy(self.c)

    def set_isa(self, name):
        """name: one of ISA_NAMES, or None for the default context's."""
        if name is None:
            bn_context_set_isa(self.c, -1)
        elif name not in ISA_NAMES or bn_context_set_isa(self.c, ISA_NAMES.index(name)) != BN_OK:
            raise ValueError(f"isa must be None, 'auto' or one this CPU supports, {supported_isas()}, got {name!r}")

    def isa(self):
        return ISA_NAMES[bn_context_get_isa(self.c)]

    def set_cl_strip_bytes(self, nbytes):
        cdef int64_t v = -1 if nbytes is None else min(operator.index(nbytes), 2**62)  # (capped, as slab_bytes)
        if (nbytes is not None and v < 0) or bn_context_set_cl_strip_bytes(self.c, v) != BN_OK:
            raise ValueError(f"cl_strip_bytes must be None or at least {BN_CL_STRIP_MIN_BYTES}, got {nbytes!r}")

    def set_slab_bytes(self, nbytes):
        if nbytes is not None and nbytes < 0:
            raise ValueError(f"slab_bytes must be None or an int >= 0, got {nbytes!r}")
        bn_context_set_slab_bytes(self.c, -1 if nbytes is None else min(int(nbytes), 2**62))


def use_context(ContextHandle handle):
    """Make handle's context the calling thread's for the calls it makes next (None: the default)."""
    bn_context_use(NULL if handle is None else handle.c)

# ---- kernels by storage dtype -----------------------------------------------------------------------------------
# One helper per C entry point: data arrays as void pointers and their storage dtype dt (DT_* of bn_simd/_args.pxd),
# float64 per-channel arrays whatever dt is. The apply coefficients (m, a, b, d) are in dt's coefficient type
# (coef_size, narrow, rounded, representable).

cdef inline size_t coef_size(int dt) noexcept nogil:
    if dt == DT_F64:
        return sizeof(double)
    return sizeof(float)  # (float32, and the 16-bit dtypes, which compute in float32)


cdef void narrow(int dt, const double* src, void* dst, int64_t n) noexcept nogil:
    """src rounded to dt's coefficient type, into dst."""
    cdef float* f
    cdef int64_t i
    if dt == DT_F64:
        memcpy(dst, src, n * sizeof(double))
    else:
        f = <float*>dst
        for i in range(n):
            f[i] = <float>src[i]


cdef inline double rounded(int dt, double v) noexcept nogil:
    """v rounded to dt's coefficient type, as a double."""
    if dt != DT_F64:
        return <double><float>v
    return v


cdef inline bint representable(int dt, double v) noexcept nogil:
    """v is finite, and so is its rounding to dt's coefficient type."""
    if dt != DT_F64:
        return isfinite(v) and -FLT_MAX <= v <= FLT_MAX
    return isfinite(v)


cdef int k_stats(int dt, const void* x, int64_t o, int64_t C, int64_t i, double* mean, double* var,
                 int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_stats_f32(<const float*>x, o, C, i, mean, var, nt)
        elif dt == DT_F64:
            st = bn_stats_f64(<const double*>x, o, C, i, mean, var, nt)
        elif dt == DT_F16:
            st = bn_stats_f16(<const uint16_t*>x, o, C, i, mean, var, nt)
        elif dt == DT_BF16:
            st = bn_stats_bf16(<const uint16_t*>x, o, C, i, mean, var, nt)
    return st


cdef int k_apply(int dt, const void* x, void* y, int64_t o, int64_t C, int64_t i, const void* m, const void* a,
                 const void* b, int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_apply_f32(<const float*>x, <float*>y, o, C, i, <const float*>m, <const float*>a,
                              <const float*>b, nt)
        elif dt == DT_F64:
            st = bn_apply_f64(<const double*>x, <double*>y, o, C, i, <const double*>m, <const double*>a,
                              <const double*>b, nt)
    return st


cdef int k_normalize(int dt, const void* x, void* y, int64_t o, int64_t C, int64_t i, const double* mean,
                     const double* var, const double* w, const double* b, double eps, int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_normalize_f32(<const float*>x, <float*>y, o, C, i, mean, var, w, b, eps, nt)
        elif dt == DT_F64:
            st = bn_normalize_f64(<const double*>x, <double*>y, o, C, i, mean, var, w, b, eps, nt)
        elif dt == DT_F16:
            st = bn_normalize_f16(<const uint16_t*>x, <uint16_t*>y, o, C, i, mean, var, w, b, eps, nt)
        elif dt == DT_BF16:
            st = bn_normalize_bf16(<const uint16_t*>x, <uint16_t*>y, o, C, i, mean, var, w, b, eps, nt)
    return st


cdef int k_forward_train(int dt, const void* x, void* y, int64_t o, int64_t C, int64_t i, const double* w,
                         const double* b, double eps, double* mean, double* var, int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_forward_train_f32(<const float*>x, <float*>y, o, C, i, w, b, eps, mean, var, nt)
        elif dt == DT_F64:
            st = bn_forward_train_f64(<const double*>x, <double*>y, o, C, i, w, b, eps, mean, var, nt)
        elif dt == DT_F16:
            st = bn_forward_train_f16(<const uint16_t*>x, <uint16_t*>y, o, C, i, w, b, eps, mean, var, nt)
        elif dt == DT_BF16:
            st = bn_forward_train_bf16(<const uint16_t*>x, <uint16_t*>y, o, C, i, w, b, eps, mean, var, nt)
    return st


cdef int k_backward_reduce(int dt, const void* dy, const void* x, int64_t o, int64_t C, int64_t i,
                           const double* mean, double* sum_dy, double* sum_dyxm, int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_backward_reduce_f32(<const float*>dy, <const float*>x, o, C, i, mean, sum_dy, sum_dyxm, nt)
        elif dt == DT_F64:
            st = bn_backward_reduce_f64(<const double*>dy, <const double*>x, o, C, i, mean, sum_dy, sum_dyxm, nt)
        elif dt == DT_F16:
            st = bn_backward_reduce_f16(<const uint16_t*>dy, <const uint16_t*>x, o, C, i, mean, sum_dy, sum_dyxm, nt)
        elif dt == DT_BF16:
            st = bn_backward_reduce_bf16(<const uint16_t*>dy, <const uint16_t*>x, o, C, i, mean, sum_dy, sum_dyxm, nt)
    return st


cdef int k_backward_apply(int dt, const void* dy, const void* x, void* dx, int64_t o, int64_t C, int64_t i,
                          const void* m, const void* a, const void* b, const void* d, int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_backward_apply_f32(<const float*>dy, <const float*>x, <float*>dx, o, C, i, <const float*>m,
                                       <const float*>a, <const float*>b, <const float*>d, nt)
        elif dt == DT_F64:
            st = bn_backward_apply_f64(<const double*>dy, <const double*>x, <double*>dx, o, C, i, <const double*>m,
                                       <const double*>a, <const double*>b, <const double*>d, nt)
    return st


cdef int k_backward(int dt, const void* dy, const void* x, void* dx, int64_t o, int64_t C, int64_t i,
                    const double* mean, const double* invstd, const double* w, int training, double* grad_weight,
                    double* grad_bias, int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_backward_f32(<const float*>dy, <const float*>x, <float*>dx, o, C, i, mean, invstd, w, training,
                                 grad_weight, grad_bias, nt)
        elif dt == DT_F64:
            st = bn_backward_f64(<const double*>dy, <const double*>x, <double*>dx, o, C, i, mean, invstd, w,
                                 training, grad_weight, grad_bias, nt)
        elif dt == DT_F16:
            st = bn_backward_f16(<const uint16_t*>dy, <const uint16_t*>x, <uint16_t*>dx, o, C, i, mean, invstd, w,
                                 training, grad_weight, grad_bias, nt)
        elif dt == DT_BF16:
            st = bn_backward_bf16(<const uint16_t*>dy, <const uint16_t*>x, <uint16_t*>dx, o, C, i, mean, invstd, w,
                                 training, grad_weight, grad_bias, nt)
    return st


cdef int k_moments(int dt, const void* x, int64_t o, int64_t C, int64_t i, int64_t* K, double* count,
                   double* shift, double* resid, double* m2, int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_moments_f32(<const float*>x, o, C, i, K, count, shift, resid, m2, nt)
        elif dt == DT_F64:
            st = bn_moments_f64(<const double*>x, o, C, i, K, count, shift, resid, m2, nt)
    return st


cdef int k_norm_params(int dt, int64_t C, const double* mean, const double* var, const double* w, const double* b,
                       double eps, void* m, void* a, void* bb) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_norm_params_f32(C, mean, var, w, b, eps, <float*>m, <float*>a, <float*>bb)
        elif dt == DT_F64:
            st = bn_norm_params_f64(C, mean, var, w, b, eps, <double*>m, <double*>a, <double*>bb)
    return st


cdef int k_bwd_params(int dt, int64_t C, double n, const double* sum_dy, const double* sum_dyxm, const double* mean,
                      const double* invstd, const double* w, int training, double* grad_weight, double* grad_bias,
                      void* m, void* a, void* b, void* d) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_bwd_params_f32(C, n, sum_dy, sum_dyxm, mean, invstd, w, training, grad_weight, grad_bias,
                                   <float*>m, <float*>a, <float*>b, <float*>d)
        elif dt == DT_F64:
            st = bn_bwd_params_f64(C, n, sum_dy, sum_dyxm, mean, invstd, w, training, grad_weight, grad_bias,
                                   <double*>m, <double*>a, <double*>b, <double*>d)
    return st


cdef int k_group_forward(int dt, const void* x, void* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,
                         const double* w, const double* b, double eps, double* mean, double* var,
                         int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_group_forward_f32(<const float*>x, <float*>y, N, C, S, G, cl, w, b, eps, mean, var, nt)
        elif dt == DT_F64:
            st = bn_group_forward_f64(<const double*>x, <double*>y, N, C, S, G, cl, w, b, eps, mean, var, nt)
        elif dt == DT_F16:
            st = bn_group_forward_f16(<const uint16_t*>x, <uint16_t*>y, N, C, S, G, cl, w, b, eps, mean, var, nt)
        elif dt == DT_BF16:
            st = bn_group_forward_bf16(<const uint16_t*>x, <uint16_t*>y, N, C, S, G, cl, w, b, eps, mean, var, nt)
    return st


cdef int k_group_backward(int dt, const void* dy, const void* x, void* dx, int64_t N, int64_t C, int64_t S,
                          int64_t G, int cl, const double* mean, const double* invstd, const double* w,
                          double* grad_weight, double* grad_bias, int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_group_backward_f32(<const float*>dy, <const float*>x, <float*>dx, N, C, S, G, cl, mean, invstd, w,
                                       grad_weight, grad_bias, nt)
        elif dt == DT_F64:
            st = bn_group_backward_f64(<const double*>dy, <const double*>x, <double*>dx, N, C, S, G, cl, mean, invstd,
                                       w, grad_weight, grad_bias, nt)
        elif dt == DT_F16:
            st = bn_group_backward_f16(<const uint16_t*>dy, <const uint16_t*>x, <uint16_t*>dx, N, C, S, G, cl, mean,
                                       invstd,
                                       w, grad_weight, grad_bias, nt)
        elif dt == DT_BF16:
            st = bn_group_backward_bf16(<const uint16_t*>dy, <const uint16_t*>x, <uint16_t*>dx, N, C, S, G, cl, mean,
                                       invstd,
                                       w, grad_weight, grad_bias, nt)
    return st


# ---- per-call helpers -------------------------------------------------------------------------------------------

cdef enum:
    STACK_DOUBLES = 256  # per-channel scratch of calls with few channels lives on the stack (no malloc)


cdef inline double* scratch(int64_t n, double* stack) except NULL:
    """n doubles: `stack` (STACK_DOUBLES of them) when they fit, else malloc's; give them back with release."""
    if n <= STACK_DOUBLES:
        return stack
    cdef double* p = <double*>malloc(n * sizeof(double))
    if p == NULL:
        raise MemoryError("bn_simd: out of memory for per-channel scratch space")
    return p


cdef inline void release(double* p, double* stack) noexcept:
    if p != stack:
        free(p)


cdef inline void* data_of(cnp.ndarray a) noexcept:
    return cnp.PyArray_DATA(a)


cdef inline void* data_or_null(cnp.ndarray a) noexcept:
    """a's data, NULL when it has no element (the kernels' convention for an empty tensor)."""
    return cnp.PyArray_DATA(a) if cnp.PyArray_SIZE(a) else NULL


cdef inline double* load_opt(object a, int64_t C, double* dst) except? NULL:
    """Per-channel array a (checked) as float64 into dst, or NULL when a is None (the kernels' weight 1, bias 0)."""
    if a is None:
        return NULL
    A.load(a, C, dst)
    return dst


cdef object f64_vector(int64_t n, const double* src):
    """A new float64 (n,) array holding src."""
    cdef cnp.ndarray r = A.new_vector(n, cnp.NPY_FLOAT64)
    if n:
        memcpy(data_of(r), src, n * sizeof(double))
    return r


cdef inline int stat_type(cnp.ndarray x) noexcept:
    """The NumPy type of the statistics and parameter gradients that a call on data x returns: x's own, float32 for
    float16 and bfloat16 data (PyTorch's rule for half data: float32 statistics and parameters)."""
    return cnp.NPY_FLOAT32 if A.half_storage(x) else cnp.PyArray_TYPE(x)


_F32_LIKE = np.empty(0, np.float32)


cdef object stats_like(cnp.ndarray xa):
    """What vector_as takes for statistics and parameter gradients of data xa: xa itself, or a float32 array for 16-bit
    data (stat_type)."""
    return _F32_LIKE if A.half_storage(xa) else xa


cdef object vector_as(int64_t n, const double* src, object like):
    """A new (n,) array of ndarray like's dtype holding src rounded to it."""
    cdef cnp.ndarray r, a = <cnp.ndarray>like
    cdef int t = cnp.PyArray_TYPE(a)
    if (t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64) and cnp.PyArray_ISNOTSWAPPED(a):
        r = A.new_vector(n, t)
    else:
        r = np.empty(n, like.dtype)
    A.store(r, n, src)
    return r


cdef inline void invstd_of(int64_t n, double* var, double eps) noexcept nogil:
    """var[q] := 1 / sqrt(var[q] + eps)"""
    cdef int64_t q
    for q in range(n):
        var[q] = 1.0 / sqrt(var[q] + eps)


cdef void running_update(int64_t C, double* rm, double* rv, const double* mean, const double* var, double n,
                         double momentum, bint unbiased) noexcept nogil:
    """running = (1 - momentum) running + momentum batch in float64, the variance scaled by n / (n - 1) first when
    unbiased and n > 1: functional.update_running_stats' formula, the only copy of it."""
    cdef double f = 1.0, v
    cdef bint scaled = unbiased and n > 1
    cdef int64_t c
    if scaled:
        f = n / (n - 1.0)
    for c in range(C):
        rm[c] = (1.0 - momentum) * rm[c] + momentum * mean[c]
        v = var[c] * f if scaled else var[c]
        rv[c] = (1.0 - momentum) * rv[c] + momentum * v


cdef int update_stats(object rm, object rv, int64_t C, const double* mean, const double* var, double n,
                      double momentum, bint unbiased, double* work) except -1:
    """running_update on per-channel arrays rm, rv (checked, writeable), work: 2 C doubles."""
    A.load(rm, C, work)
    A.load(rv, C, work + C)
    running_update(C, work, work + C, mean, var, n, momentum, unbiased)
    A.store(rm, C, work)
    A.store(rv, C, work + C)
    return 0


cdef int normalize_run(cnp.ndarray xa, cnp.ndarray ya, View* v, const double* mean, const double* var,
                       const double* w, const double* b, double eps, int nt) except -1:
    cdef int st
    if v.outer * v.C * v.inner == 0:
        return 0
    st = k_normalize(v.dtype, data_of(xa), data_of(ya), v.outer, v.C, v.inner, mean, var, w, b, eps, nt)
    return _check(st)


# ---- batch norm -------------------------------------------------------------------------------------------------

def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, layout, out, unbiased,
               int nthreads, int saved=0):
    """functional.batch_norm. saved: (y, mean, invstd) instead of y, float64 (C,): the statistics the call
    normalised with (the batch's, or the running ones in eval), for a layer's backward; saved=2: (y, mean, invstd,
    var), the variance as computed (1 / invstd^2 - eps loses its bits where var is far below eps)."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef View v
    A.view(xa, lay, "x", &v)
    cdef int64_t C = v.C, n = v.outer * v.inner, c
    cdef bint tr = training
    rm = A.channel(running_mean, "running_mean", C, tr)
    rv = A.channel(running_var, "running_var", C, tr)
    A.together(rm, rv, tr)
    w = A.channel(weight, "weight", C, False)
    b = A.channel(bias, "bias", C, False)
    # momentum is used only to update running statistics: its value is ignored otherwise, as in PyTorch
    cdef double e = A.eps(eps), mom = A.momentum_if(momentum, tr and rm is not None)
    if tr:
        A.train_size(n, xa)
    elif rm is None:
        raise ValueError("running_mean and running_var are required when training=False")
    cdef cnp.ndarray ya = A.output(out, xa, None)
    cdef bint update = tr and rm is not None and n > 0, unb = False
    if update:
        unb = unbiased  # (read only when the running statistics are updated)
        if out is not None:
            A.out_apart(ya, (("running_mean", rm), ("running_var", rv)))  # (apart: together)
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(6 * C, stack)  # mean, var, weight, bias; the running statistics' update
    cdef double* mean = p
    cdef double* var = p + C
    cdef double* wp
    cdef double* bp
    cdef int st
    try:
        wp = load_opt(w, C, p + 2 * C)
        bp = load_opt(b, C, p + 3 * C)
        if tr:
            if n * C == 0:
                for c in range(C):
                    mean[c] = NAN
                    var[c] = NAN
            else:
                st = k_forward_train(v.dtype, data_of(xa), data_of(ya), v.outer, C, v.inner, wp, bp, e, mean,
                                     var, nthreads)
                _check(st)
            if update:
                update_stats(rm, rv, C, mean, var, <double>n, mom, unb, p + 4 * C)
        else:
            A.load(rm, C, mean)
            A.load(rv, C, var)
            normalize_run(xa, ya, &v, mean, var, wp, bp, e, nthreads)
        if not saved:
            return ya
        var64 = f64_vector(C, var) if saved == 2 else None
        invstd_of(C, var, e)
        if saved == 2:
            return ya, f64_vector(C, mean), f64_vector(C, var), var64
        return ya, f64_vector(C, mean), f64_vector(C, var)
    finally:
        release(p, stack)


# ---- bn_simd.torch's eval fast path -------------------------------------------------------------------------------
# A torch.nn.BatchNorm module in eval mode, called outside autograd, inside a network: the call's own work is small
# (the kernel's passes over a tensor the previous layer just wrote) and the rest of the network evicts the caches
# between calls, so every distinct Python or PyTorch operation on the way costs microseconds. This entry point takes
# the input tensor's layout, dtype, device and address from ONE DLPack export (torch.utils.dlpack.to_dlpack), makes
# the output with the caller's empty_like and reads its address, and checks the module's cached per-channel tensors
# (still the module's, at the same addresses) itself. bn_simd/torch/modules.py documents what it serves.

cdef extern from *:
    """
    /* DLPack's C ABI (v0.x, what torch.utils.dlpack.to_dlpack exports; a stable layout) */
    typedef struct { int32_t device_type; int32_t device_id; } bnx_dl_device;
    typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } bnx_dl_dtype;
    typedef struct {
        void* data; bnx_dl_device device; int32_t ndim; bnx_dl_dtype dtype;
        int64_t* shape; int64_t* strides; uint64_t byte_offset;
    } bnx_dl_tensor;
    typedef struct bnx_dl_managed {
        bnx_dl_tensor dl_tensor; void* manager_ctx; void (*deleter)(struct bnx_dl_managed*);
    } bnx_dl_managed;
    """
    ctypedef struct bnx_dl_device:
        int32_t device_type
    ctypedef struct bnx_dl_dtype:
        uint8_t code
        uint8_t bits
        uint16_t lanes
    ctypedef struct bnx_dl_tensor:
        void* data
        bnx_dl_device device
        int32_t ndim
        bnx_dl_dtype dtype
        int64_t* shape
        int64_t* strides
        uint64_t byte_offset
    ctypedef struct bnx_dl_managed:
        bnx_dl_tensor dl_tensor


cdef extern from "half.h" nogil:
    float bn_f16_to_f32(uint16_t h)
    float bn_bf16_to_f32(uint16_t h)


cdef bint _dense_in(const int64_t* shape, const int64_t* strides, const int* order, int nd) noexcept:
    """The axes in `order` (outermost first) walk the memory densely; axes of length 1 are ignored, as
    torch.Tensor.is_contiguous does."""
    cdef int64_t expected = 1
    cdef int k, d
    for k in range(nd - 1, -1, -1):
        d = order[k]
        if shape[d] != 1:
            if strides[d] != expected:
                return False
            expected *= shape[d]
    return True


def torch_bn_eval(object module, tuple cached, object x, object to_dlpack, object empty_like, int nthreads):
    """Batch norm's eval of tensor x (read through its DLPack export, to_dlpack(x)) with a torch.nn.BatchNorm
    module's running statistics, weight and bias, or None when the call must take the general path (any check below
    fails).

    cached: (C, x's dtype key, mask of the ranks the module takes, running_mean, running_var, weight, bias (None
    when absent), their data_ptr()s, their dtype key, their torch dtype), made by bn_simd.torch.modules after a call
    that passed the general checks: the tensors must still be the module's (identity) at the same addresses, of that
    dtype, C values each, contiguous (a ``.data`` re-pointed at the same address as another dtype, fewer values or
    other strides goes the general way). A dtype key is DLPack's
    (code << 8 | bits): float32 0x220, float64 0x240, float16 0x210, bfloat16 0x410; the per-channel tensors have
    x's dtype, or float32 for 16-bit x. to_dlpack, empty_like: torch.utils.dlpack.to_dlpack and torch.empty_like.
    Returns the output tensor, in x's memory format."""
    cdef int64_t C = cached[0]
    cdef int key = cached[1], ranks = cached[2], pkey = cached[11]
    buffers, params = module._buffers, module._parameters
    if (buffers.get("running_mean") is not cached[3] or buffers.get("running_var") is not cached[4]
            or params.get("weight") is not cached[5] or params.get("bias") is not cached[6]):
        return None
    cdef Py_ssize_t k
    pdt = cached[12]
    for k in range(4):
        t = cached[3 + k]
        if t is not None and (t.data_ptr() != cached[7 + k] or t.dtype is not pdt or t.numel() != C
                              or not t.is_contiguous()):
            return None
    eps = module.eps
    if type(eps) is not float or not (0.0 < <double>eps < INFINITY):  # (B.eps_supported: others go the general way)
        return None
    cdef double e = eps
    # (a negative-bit view, such as the imaginary part of a conjugate, is exported as its unnegated memory)
    if x.is_neg():
        return None
    try:
        capsule = to_dlpack(x)  # (the capsule keeps x's memory alive while it is read; freed with it)
    except Exception:  # (tensors DLPack cannot describe: meta, sparse...; the general path decides)
        return None
    cdef bnx_dl_managed* m = <bnx_dl_managed*>PyCapsule_GetPointer(capsule, "dltensor")  # (raises on another name)
    cdef bnx_dl_tensor* t_ = &m.dl_tensor
    cdef int nd = t_.ndim
    if (t_.device.device_type != 1 or (t_.dtype.code << 8 | t_.dtype.bits) != key or t_.dtype.lanes != 1
            or nd < 2 or nd > 5 or not (ranks >> nd) & 1 or t_.strides == NULL or t_.shape[1] != C):
        return None
    cdef int order[5]
    cdef int64_t outer = t_.shape[0], inner = 1, size = t_.shape[0] * C
    for k in range(nd):
        order[k] = k
    for k in range(2, nd):
        size *= t_.shape[k]
        inner *= t_.shape[k]
    if size == 0:
        return None
    if not _dense_in(t_.shape, t_.strides, order, nd):
        # channels last: (N, *spatial, C)
        for k in range(1, nd - 1):
            order[k] = k + 1
        order[nd - 1] = 1
        if nd == 2 or not _dense_in(t_.shape, t_.strides, order, nd):
            return None
        outer, inner = outer * inner, 1
    cdef const void* xp = <const char*>t_.data + t_.byte_offset
    cdef int dt = DT_F32 if key == 0x220 else DT_F64 if key == 0x240 else DT_F16 if key == 0x210 else DT_BF16
    # the output: torch.empty_like keeps the strides of a dense input, so it has the input's layout
    y = empty_like(x)
    cdef void* yp = <void*><Py_ssize_t>y.data_ptr()
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(4 * C, stack)
    cdef int st
    cdef const float* f
    cdef const uint16_t* h
    cdef int64_t c
    try:
        for k in range(4):
            if cached[7 + k] is None:
                continue
            if pkey == 0x220:
                f = <const float*><Py_ssize_t>cached[7 + k]
                for c in range(C):
                    p[k * C + c] = f[c]
            elif pkey == 0x240:
                memcpy(p + k * C, <const void*><Py_ssize_t>cached[7 + k], C * sizeof(double))
            else:  # (a module converted with .half() / .bfloat16(): its parameters widened exactly)
                h = <const uint16_t*><Py_ssize_t>cached[7 + k]
                for c in range(C):
                    p[k * C + c] = bn_f16_to_f32(h[c]) if pkey == 0x210 else bn_bf16_to_f32(h[c])
        st = k_normalize(dt, xp, yp, outer, C, inner, p, p + C, NULL if cached[9] is None else p + 2 * C,
                         NULL if cached[10] is None else p + 3 * C, e, nthreads)
        _check(st)
        return y
    finally:
        release(p, stack)


def batch_norm_forward(x, weight, bias, eps, layout, out, int nthreads):
    """functional.batch_norm_forward: (y, mean, invstd), the last two (C,) in x's dtype."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef View v
    A.view(xa, lay, "x", &v)
    cdef int64_t C = v.C, n = v.outer * v.inner, c
    w = A.channel(weight, "weight", C, False)
    b = A.channel(bias, "bias", C, False)
    cdef double e = A.eps(eps)
    A.train_size(n, xa)
    cdef cnp.ndarray ya = A.output(out, xa, None)
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(4 * C, stack)
    cdef double* mean = p
    cdef double* var = p + C
    cdef double* wp
    cdef double* bp
    cdef int st
    try:
        wp = load_opt(w, C, p + 2 * C)
        bp = load_opt(b, C, p + 3 * C)
        if n * C == 0:
            for c in range(C):
                mean[c] = NAN
                var[c] = NAN
        else:
            st = k_forward_train(v.dtype, data_of(xa), data_of(ya), v.outer, C, v.inner, wp, bp, e, mean, var,
                                 nthreads)
            _check(st)
        invstd_of(C, var, e)
        return ya, vector_as(C, mean, stats_like(xa)), vector_as(C, var, stats_like(xa))
    finally:
        release(p, stack)


def batch_norm_backward(grad_out, x, save_mean, save_invstd, weight, layout, out, training, int nthreads):
    """functional.batch_norm_backward: (grad_x, grad_weight, grad_bias)."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef View v
    A.view(xa, lay, "x", &v)
    cdef int64_t C = v.C, n = v.outer * v.inner
    cdef cnp.ndarray ga = A.like(grad_out, "grad_out", xa)
    m = A.channel(save_mean, "save_mean", C, False)
    s = A.channel(save_invstd, "save_invstd", C, False)
    A.both_given(m, s, "save_mean and save_invstd")
    w = A.channel(weight, "weight", C, False)
    cdef cnp.ndarray dx = A.output(out, xa, ga)
    cdef bint tr = training
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(5 * C, stack)
    cdef double* gw = p + 3 * C
    cdef double* gb = p + 4 * C
    cdef double* wp
    cdef int st
    try:
        A.load(m, C, p)
        A.load(s, C, p + C)
        wp = load_opt(w, C, p + 2 * C)
        memset(gw, 0, 2 * C * sizeof(double))  # sums over no element (n = 0): zero parameter gradients
        if n * C:
            st = k_backward(v.dtype, data_of(ga), data_of(xa), data_of(dx), v.outer, C, v.inner, p, p + C, wp,
                            tr, gw, gb, nthreads)
            _check(st)
        like = w if w is not None else stats_like(xa)  # (the parameter gradients: weight's dtype, else x's)
        return dx, vector_as(C, gw, like), vector_as(C, gb, like)
    finally:
        release(p, stack)


# ---- the four steps ---------------------------------------------------------------------------------------------

def batch_stats(x, layout, int nthreads):
    """functional.batch_stats: (mean, var), float64 (C,)."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef View v
    A.view(xa, lay, "x", &v)
    cdef cnp.ndarray mean = A.new_vector(v.C, cnp.NPY_FLOAT64), var = A.new_vector(v.C, cnp.NPY_FLOAT64)
    cdef int st
    st = k_stats(v.dtype, data_or_null(xa), v.outer, v.C, v.inner, <double*>data_of(mean),
                 <double*>data_of(var), nthreads)
    _check(st)
    return mean, var


def normalize(x, mean, var, weight, bias, eps, layout, out, int nthreads):
    """functional.normalize: y."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef View v
    A.view(xa, lay, "x", &v)
    cdef int64_t C = v.C
    m = A.channel(mean, "mean", C, False)
    s = A.channel(var, "var", C, False)
    A.both_given(m, s, "mean and var")
    w = A.channel(weight, "weight", C, False)
    b = A.channel(bias, "bias", C, False)
    cdef double e = A.eps(eps)
    cdef cnp.ndarray ya = A.output(out, xa, None)
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(4 * C, stack)
    try:
        A.load(m, C, p)
        A.load(s, C, p + C)
        normalize_run(xa, ya, &v, p, p + C, load_opt(w, C, p + 2 * C), load_opt(b, C, p + 3 * C), e, nthreads)
        return ya
    finally:
        release(p, stack)


def backward_reduce(grad_out, x, mean, layout, int nthreads):
    """functional.backward_reduce: (sum_dy, sum_dyxm), float64 (C,)."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef View v
    A.view(xa, lay, "x", &v)
    cdef int64_t C = v.C
    cdef cnp.ndarray ga = A.like(grad_out, "grad_out", xa)
    m = A.required_channel(mean, "mean", C)
    cdef cnp.ndarray sdy = A.new_vector(C, cnp.NPY_FLOAT64), sdyx = A.new_vector(C, cnp.NPY_FLOAT64)
    cdef double* sp = <double*>data_of(sdy)
    cdef double* hp = <double*>data_of(sdyx)
    if v.outer * C * v.inner == 0:
        memset(sp, 0, C * sizeof(double))
        memset(hp, 0, C * sizeof(double))
        return sdy, sdyx
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(C, stack)
    cdef int st
    try:
        A.load(m, C, p)
        st = k_backward_reduce(v.dtype, data_of(ga), data_of(xa), v.outer, C, v.inner, p, sp, hp, nthreads)
        _check(st)
        return sdy, sdyx
    finally:
        release(p, stack)


cdef bint fold_backward_apply(int dt, int64_t C, const double* mean, const double* a, const double* b,
                              const double* d, double* dfold, void* q) noexcept nogil:
    """backward_apply's coefficients in dt's coefficient type, into q (m, a, b, d, C each): m is mean rounded, its
    rounding residual folded into d (d - b (mean - m), in float64), then a, b and d rounded. False when one of them,
    or the folding, is not finite in that type."""
    cdef int64_t c
    cdef bint ok = True
    cdef size_t cs = coef_size(dt)
    for c in range(C):
        dfold[c] = d[c] - b[c] * (mean[c] - rounded(dt, mean[c]))
        ok &= representable(dt, mean[c]) & representable(dt, a[c]) & representable(dt, b[c])
        ok &= representable(dt, dfold[c])
    narrow(dt, mean, q, C)
    narrow(dt, a, <char*>q + C * cs, C)
    narrow(dt, b, <char*>q + 2 * C * cs, C)
    narrow(dt, dfold, <char*>q + 3 * C * cs, C)
    return ok


def _fold_in_numpy(mean, a, b, d, dtype):
    """fold_backward_apply's arithmetic in NumPy, for coefficients that are not finite in `dtype`: NumPy reports what
    overflows or is invalid as np.errstate says (a RuntimeWarning by default)."""
    m = mean.astype(dtype)
    d = d - b * (mean - m.astype(np.float64))
    return [np.ascontiguousarray(v, dtype=dtype) for v in (m, a, b, d)]


def backward_apply(grad_out, x, mean, a, b, d, layout, out, int nthreads):
    """functional.backward_apply: grad_x."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x")
    cdef View v
    A.view(xa, lay, "x", &v)
    cdef int64_t C = v.C, k
    cdef cnp.ndarray ga = A.like(grad_out, "grad_out", xa)
    m = A.required_channel(mean, "mean", C)
    ac = A.required_channel(a, "a", C)
    bc = A.required_channel(b, "b", C)
    dc = A.required_channel(d, "d", C)
    cdef cnp.ndarray dx = A.output(out, xa, ga)
    cdef size_t cs = coef_size(v.dtype)
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(9 * C, stack)  # mean, a, b, d; d folded; the four coefficients (<= 8 bytes each)
    cdef void* q = p + 5 * C
    cdef int st
    cdef cnp.npy_intp n1 = C
    try:
        A.load(m, C, p)
        A.load(ac, C, p + C)
        A.load(bc, C, p + 2 * C)
        A.load(dc, C, p + 3 * C)
        if not fold_backward_apply(v.dtype, C, p, p + C, p + 2 * C, p + 3 * C, p + 4 * C, q):
            f64 = []
            for k in range(4):
                f64.append(cnp.PyArray_SimpleNewFromData(1, &n1, cnp.NPY_FLOAT64, p + k * C))
            folded = _fold_in_numpy(*f64, xa.dtype)
            for k in range(4):
                memcpy(<char*>q + k * C * cs, data_of(folded[k]), C * cs)
        if v.outer * C * v.inner:
            st = k_backward_apply(v.dtype, data_of(ga), data_of(xa), data_of(dx), v.outer, C, v.inner, q,
                                  <char*>q + C * cs, <char*>q + 2 * C * cs, <char*>q + 3 * C * cs, nthreads)
            _check(st)
        return dx
    finally:
        release(p, stack)


def update_running_stats(running_mean, running_var, mean, var, n, momentum, unbiased):
    """functional.update_running_stats."""
    A.both_given(running_mean, running_var, "running_mean and running_var")
    if isinstance(running_mean, np.ndarray) and running_mean.ndim != 1:
        raise ValueError(f"running_mean must have shape (C,), got shape {running_mean.shape}")
    cdef int64_t C = A.length(running_mean, "running_mean")  # (the state's channels set C)
    rm = A.channel(running_mean, "running_mean", C, True, "running_mean")
    rv = A.channel(running_var, "running_var", C, True, "running_mean")
    A.stats_distinct((("running_mean", rm), ("running_var", rv)))
    m = A.required_channel(mean, "mean", C, "running_mean")
    s = A.required_channel(var, "var", C, "running_mean")
    cdef double mom = A.momentum(momentum), count = A.count(n, False)
    cdef bint unb = unbiased
    cdef double stack[STACK_DOUBLES]
    cdef double* p
    if count == 0:  # no values, no statistics: the running ones stay as they are (PyTorch's empty batch)
        return
    p = scratch(4 * C, stack)
    try:
        A.load(m, C, p)
        A.load(s, C, p + C)
        update_stats(rm, rv, C, p, p + C, count, mom, unb, p + 2 * C)
    finally:
        release(p, stack)


# ---- moments and coefficients -----------------------------------------------------------------------------------

def batch_moments(x, layout, int nthreads):
    """functional.batch_moments' arrays: bn_stats' chunk moments (count (K,), shift, resid, m2 (K, C)), float64."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x")
    cdef View v
    A.view(xa, lay, "x", &v)
    cdef int64_t C = v.C, K = 0
    cdef int st = k_moments(v.dtype, NULL, v.outer, C, v.inner, &K, NULL, NULL, NULL, NULL, nthreads)
    _check(st)
    cdef cnp.npy_intp dims[2]
    dims[0] = K
    dims[1] = C
    cdef cnp.ndarray count = A.new_vector(K, cnp.NPY_FLOAT64)
    cdef cnp.ndarray shift = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)
    cdef cnp.ndarray resid = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)
    cdef cnp.ndarray m2 = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)
    if K:
        st = k_moments(v.dtype, data_of(xa), v.outer, C, v.inner, &K, <double*>data_of(count),
                       <double*>data_of(shift), <double*>data_of(resid), <double*>data_of(m2), nthreads)
        _check(st)
    return count, shift, resid, m2


def moments_merge(const double[::1] count, const double[:, ::1] shift, const double[:, ::1] resid,
                  const double[:, ::1] m2, double[::1] mean, double[::1] var):
    """mean[c], biased var[c] from K chunk moments in the order given."""
    cdef int64_t K = shift.shape[0], C = shift.shape[1]
    if count.shape[0] != K or resid.shape[0] != K or resid.shape[1] != C or m2.shape[0] != K or m2.shape[1] != C \
            or mean.shape[0] != C or var.shape[0] != C:
        raise ValueError(f"moments_merge: count (K,), shift, residual, m2 (K, C) and mean, var (C,) must agree, got "
                         f"K={K}, C={C}, count {count.shape[0]}, residual ({resid.shape[0]}, {resid.shape[1]}), m2 "
                         f"({m2.shape[0]}, {m2.shape[1]}), mean {mean.shape[0]}, var {var.shape[0]}")
    if C == 0:
        return
    cdef double dummy = 0.0
    cdef const double* cp = &count[0] if K else &dummy
    cdef const double* sp = &shift[0, 0] if K else &dummy
    cdef const double* rp = &resid[0, 0] if K else &dummy
    cdef const double* mp = &m2[0, 0] if K else &dummy
    _check(bn_moments_merge(K, C, cp, sp, rp, mp, &mean[0], &var[0]))


def norm_coefficients(mean, var, weight, bias, eps, dtype):
    """functional.norm_coefficients: (m, a, b, exact)."""
    cdef int code
    dt = A.dtype_arg(dtype, &code)
    m = A.first_channel(mean, "mean")
    cdef int64_t C = m.shape[0]
    s = A.required_channel(var, "var", C, "mean")
    w = A.channel(weight, "weight", C, False, "mean")
    b = A.channel(bias, "bias", C, False, "mean")
    cdef double e = A.eps(eps)
    cdef int t = dt.num
    cdef cnp.ndarray mc = A.new_vector(C, t), ac = A.new_vector(C, t), bc = A.new_vector(C, t)
    if C == 0:
        return mc, ac, bc, True
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(4 * C, stack)
    cdef int st
    try:
        A.load(m, C, p)
        A.load(s, C, p + C)
        st = k_norm_params(code, C, p, p + C, load_opt(w, C, p + 2 * C), load_opt(b, C, p + 3 * C), e,
                           data_of(mc), data_of(ac), data_of(bc))
        if st != 1:  # (1: the call must compute in float64, see bn_norm_params_f32)
            _check(st)
        return mc, ac, bc, st != 1
    finally:
        release(p, stack)


def backward_coefficients(sum_dy, sum_dyxm, mean, invstd, n, weight, training, dtype):
    """functional.backward_coefficients: (m, a, b, d, grad_weight, grad_bias)."""
    cdef int code
    dt = A.dtype_arg(dtype, &code)
    first = A.first_channel(sum_dy, "sum_dy")
    cdef int64_t nc = first.shape[0]
    arrays = [first] + [A.required_channel(v, name, nc, "sum_dy")
                        for v, name in ((sum_dyxm, "sum_dyxm"), (mean, "mean"), (invstd, "invstd"))]
    w = A.channel(weight, "weight", nc, False, "sum_dy")
    cdef double count = A.count(n, True)
    cdef bint tr = training
    cdef int t = dt.num
    coef = [A.new_vector(nc, t) for _ in range(4)]
    cdef cnp.ndarray gw = A.new_vector(nc, cnp.NPY_FLOAT64), gb = A.new_vector(nc, cnp.NPY_FLOAT64)
    if nc == 0:
        return (*coef, gw, gb)
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(5 * nc, stack)
    cdef int64_t k
    try:
        for k in range(4):
            A.load(arrays[k], nc, p + k * nc)
        _check(k_bwd_params(code, nc, count, p, p + nc, p + 2 * nc, p + 3 * nc, load_opt(w, nc, p + 4 * nc), tr,
                            <double*>data_of(gw), <double*>data_of(gb), data_of(coef[0]), data_of(coef[1]),
                            data_of(coef[2]), data_of(coef[3])))
        return (*coef, gw, gb)
    finally:
        release(p, stack)


# ---- group norm and instance norm (instance norm: one channel per group) -----------------------------------------

cdef tuple group_forward_run(cnp.ndarray xa, cnp.ndarray ya, Groups* g, int64_t G, object w, object b, double e,
                             int nthreads, const bn_epilogue* ep=NULL):
    """The group-norm forward into ya (through the epilogue ep when given, _epilogue.pxi): returns (mean, var),
    float64 (N G,)."""
    cdef int64_t C = g.C, NG = g.N * G
    cdef cnp.ndarray mean = A.new_vector(NG, cnp.NPY_FLOAT64), var = A.new_vector(NG, cnp.NPY_FLOAT64)
    if NG == 0:
        return mean, var
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(2 * C, stack)
    cdef double* wp
    cdef double* bp
    cdef int st
    try:
        wp = load_opt(w, C, p)
        bp = load_opt(b, C, p + C)
        if ep != NULL:
            k_group_forward_epi(g.dtype, data_or_null(xa), data_or_null(ya), g, G, wp, bp, e, <double*>data_of(mean),
                                <double*>data_of(var), ep, nthreads)
            return mean, var
        st = k_group_forward(g.dtype, data_or_null(xa), data_or_null(ya), g.N, C, g.S, G, g.cl, wp, bp, e,
                             <double*>data_of(mean), <double*>data_of(var), nthreads)
        _check(st)
        return mean, var
    finally:
        release(p, stack)


cdef tuple saved_stats64(cnp.ndarray mean, cnp.ndarray var, double e, int64_t N, int64_t G):
    """(mean, invstd = 1 / sqrt(var + eps)) as float64 (N, G) arrays, unrounded (var is overwritten)."""
    invstd_of(N * G, <double*>data_of(var), e)
    return mean.reshape(N, G), var.reshape(N, G)


cdef tuple saved_stats(cnp.ndarray mean, cnp.ndarray var, double e, cnp.ndarray xa, int64_t N, int64_t G):
    """(mean, invstd = 1 / sqrt(var + eps)), shaped (N, G) in x's dtype (float32 for 16-bit x; var is
    overwritten)."""
    cdef cnp.npy_intp dims[2]
    dims[0] = N
    dims[1] = G
    cdef int t = stat_type(xa)
    cdef cnp.ndarray m = cnp.PyArray_EMPTY(2, dims, t, 0), s = cnp.PyArray_EMPTY(2, dims, t, 0)
    invstd_of(N * G, <double*>data_of(var), e)
    A.store(m, N * G, <double*>data_of(mean))
    A.store(s, N * G, <double*>data_of(var))
    return m, s


def group_norm(x, num_groups, weight, bias, eps, layout, out, int nthreads, int result=0, bint torch_rules=True):
    """groups.group_norm (result 0: y) and group_norm_forward (1: y, mean, invstd); 2: (y, mean, var) as float64
    (N num_groups,); 3: (y, mean, invstd) as float64 (N, num_groups) (the layer's, for its backward). torch_rules:
    PyTorch's refusal of statistics over one value in all (not Keras')."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef Groups g
    A.group_view(xa, lay, 2, "group_norm", &g)
    cdef int64_t G = A.num_groups(num_groups, g.C)
    w = A.channel(weight, "weight", g.C, False)
    b = A.channel(bias, "bias", g.C, False)
    cdef double e = A.eps(eps)
    if torch_rules:
        A.group_values(g.N * (g.C // G) * g.S, xa)
    cdef cnp.ndarray ya = A.output(out, xa, None)
    if result == 0 and g.N * g.C * g.S == 0:  # (no value to write: no statistics, whose (N, G) may be large at C 0)
        return ya
    mean, var = group_forward_run(xa, ya, &g, G, w, b, e, nthreads)
    if result == 0:
        return ya
    if result == 2:
        return ya, mean, var
    if result == 3:
        return (ya,) + saved_stats64(mean, var, e, g.N, G)
    return (ya,) + saved_stats(mean, var, e, xa, g.N, G)


def instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, layout, out,
                  int nthreads, int saved=0, tuple act=None, residual=None):
    """groups.instance_norm; saved (with use_input_stats): (y, mean, invstd), (N, C) in x's dtype (saved 2, the
    layer's: float64).

    act (_epilogue.parse's tuple) or residual: the fused epilogue z = act(y + residual) in the normalise sweep (without
    use_input_stats batch_norm_epi's eval); saved then returns (y, mean, var), the float64 (N, C) statistics the
    epilogue backward (group_backward_epi) needs, and the running statistics move as without the epilogue."""
    cdef bint epi = act is not None or residual is not None
    if epi and act is None:
        act = (0, 0.0, 0.0, 0.0)
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef Groups g
    A.group_view(xa, lay, 3, "instance_norm", &g)
    cdef int64_t C = g.C
    cdef bint u = use_input_stats
    rm = A.channel(running_mean, "running_mean", C, u)
    rv = A.channel(running_var, "running_var", C, u)
    A.together(rm, rv, u)
    w = A.channel(weight, "weight", C, False)
    b = A.channel(bias, "bias", C, False)
    cdef double e = A.eps(eps), mom = A.momentum_if(momentum, u and rm is not None)
    cdef View v
    cdef cnp.ndarray ya
    cdef double stack[STACK_DOUBLES]
    cdef double* p
    if not u:  # batch norm's eval, the running statistics for every sample
        if rm is None:
            raise ValueError("running_mean and running_var are required when use_input_stats=False")
        if epi:
            return batch_norm_epi(xa, rm, rv, w, b, False, 0.0, e, layout, out, True, act, residual, nthreads)
        ya = A.output(out, xa, None)
        A.view(xa, lay, "x", &v)
        p = scratch(4 * C, stack)
        try:
            A.load(rm, C, p)
            A.load(rv, C, p + C)
            normalize_run(xa, ya, &v, p, p + C, load_opt(w, C, p + 2 * C), load_opt(b, C, p + 3 * C), e, nthreads)
            return ya
        finally:
            release(p, stack)
    A.spatial_size(g.S, xa)
    cdef bn_epilogue ep
    ra = epi_residual(residual, xa) if epi else None
    ya = A.output(out, xa, None)
    if rm is not None and out is not None:
        A.out_apart(ya, (("running_mean", rm), ("running_var", rv)))  # (apart: together)
    if epi:
        epi_fill(act, ra, ya, "out", &ep, residual)
    mean, var = group_forward_run(xa, ya, &g, C, w, b, e, nthreads, &ep if epi else NULL)
    cdef int64_t N = g.N, S = g.S
    if rm is not None and N > 0 and S > 0:
        # the running statistics move towards the instance statistics' averages over the batch (the variance
        # unbiased), as PyTorch's instance norm does; an empty batch leaves them (as its batch norm of no values)
        batch_mean = mean.reshape(N, C).mean(axis=0)
        batch_var = (var * (<double>S / <double>(S - 1))).reshape(N, C).mean(axis=0)
        p = scratch(4 * C, stack)
        try:
            A.load(batch_mean, C, p)
            A.load(batch_var, C, p + C)
            update_stats(rm, rv, C, p, p + C, <double>S, mom, False, p + 2 * C)
        finally:
            release(p, stack)
    if saved and epi:
        return ya, mean.reshape(N, C), var.reshape(N, C)
    if saved == 2:
        return (ya,) + saved_stats64(mean, var, e, N, C)
    if saved:
        return (ya,) + saved_stats(mean, var, e, xa, N, C)
    return ya


def instance_norm_forward(x, weight, bias, eps, layout, out, int nthreads):
    """groups.instance_norm_forward: (y, mean, invstd), (N, C) in x's dtype."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef Groups g
    A.group_view(xa, lay, 3, "instance_norm_forward", &g)
    w = A.channel(weight, "weight", g.C, False)
    b = A.channel(bias, "bias", g.C, False)
    cdef double e = A.eps(eps)
    A.spatial_size(g.S, xa)
    cdef cnp.ndarray ya = A.output(out, xa, None)
    mean, var = group_forward_run(xa, ya, &g, g.C, w, b, e, nthreads)
    return (ya,) + saved_stats(mean, var, e, xa, g.N, g.C)


def group_norm_backward(grad_out, x, mean, invstd, num_groups, weight, layout, out, int nthreads,
                        bint instance=False):
    """groups.group_norm_backward, and instance_norm_backward with instance (num_groups unused): (grad_x,
    grad_weight, grad_bias)."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef Groups g
    A.group_view(xa, lay, 3 if instance else 2, "instance_norm_backward" if instance else "group_norm_backward",
                 &g)
    cdef int64_t C = g.C, N = g.N
    cdef int64_t G = C if instance else A.num_groups(num_groups, C), NG = N * G
    what = "N by C" if instance else "N by num_groups"
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(2 * NG + 3 * C, stack)
    cdef double* gw = p + 2 * NG + C
    cdef double* gb = gw + C
    cdef double* wp
    cdef int st
    try:
        A.group_stat(mean, "mean", N, G, what, p)
        A.group_stat(invstd, "invstd", N, G, what, p + NG)
        ga = A.like(grad_out, "grad_out", xa)
        w = A.channel(weight, "weight", C, False)
        dx = A.output(out, xa, ga)
        wp = load_opt(w, C, p + 2 * NG)
        memset(gw, 0, 2 * C * sizeof(double))
        if C:
            st = k_group_backward(g.dtype, data_or_null(ga), data_or_null(xa), data_or_null(dx), N, C, g.S, G,
                                  g.cl, p if N else NULL, p + NG if N else NULL, wp, gw, gb, nthreads)
            _check(st)
        like = w if w is not None else stats_like(xa)  # (the parameter gradients: weight's dtype, else x's)
        return dx, vector_as(C, gw, like), vector_as(C, gb, like)
    finally:
        release(p, stack)


# ---- layer norm and RMS norm (rms: RMS norm) ----------------------------------------------------------------------

cdef extern from "bn_simd.h" nogil:
    int bn_row_forward_f32(const float* x, float* y, int64_t N, int64_t C, int64_t S, int rms, const float* weight,
                           const float* bias, double eps, double* mean, double* rstd, int nt)
    int bn_row_forward_f16(const uint16_t* x, uint16_t* y, int64_t N, int64_t C, int64_t S, int rms,
                           const float* weight, const float* bias, double eps, double* mean, double* rstd, int nt)
    int bn_row_forward_bf16(const uint16_t* x, uint16_t* y, int64_t N, int64_t C, int64_t S, int rms,
                            const float* weight, const float* bias, double eps, double* mean, double* rstd, int nt)
    int bn_row_forward_f64(const double* x, double* y, int64_t N, int64_t C, int64_t S, int rms, const double* weight,
                           const double* bias, double eps, double* mean, double* rstd, int nt)
    int bn_row_backward_f32(const float* dy, const float* x, float* dx, int64_t N, int64_t C, int64_t S, int rms,
                            const double* mean, const double* rstd, const double* weight, double* grad_weight,
                            double* grad_bias, int nt)
    int bn_row_backward_f16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, int64_t N, int64_t C, int64_t S,
                            int rms,
                            const double* mean, const double* rstd, const double* weight, double* grad_weight,
                            double* grad_bias, int nt)
    int bn_row_backward_bf16(const uint16_t* dy, const uint16_t* x, uint16_t* dx, int64_t N, int64_t C, int64_t S,
                            int rms,
                            const double* mean, const double* rstd, const double* weight, double* grad_weight,
                            double* grad_bias, int nt)
    int bn_row_backward_f64(const double* dy, const double* x, double* dx, int64_t N, int64_t C, int64_t S, int rms,
                            const double* mean, const double* rstd, const double* weight, double* grad_weight,
                            double* grad_bias, int nt)


cdef int k_row_forward(int dt, const void* x, void* y, Rows* r, int rms, const void* w, const void* b, double eps,
                       double* mean, double* rstd, int nt) except -1:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_row_forward_f32(<const float*>x, <float*>y, r.N, r.C, r.S, rms, <const float*>w,
                                    <const float*>b, eps, mean, rstd, nt)
        elif dt == DT_F64:
            st = bn_row_forward_f64(<const double*>x, <double*>y, r.N, r.C, r.S, rms, <const double*>w,
                                    <const double*>b, eps, mean, rstd, nt)
        elif dt == DT_F16:
            st = bn_row_forward_f16(<const uint16_t*>x, <uint16_t*>y, r.N, r.C, r.S, rms, <const float*>w,
                                    <const float*>b, eps, mean, rstd, nt)
        elif dt == DT_BF16:
            st = bn_row_forward_bf16(<const uint16_t*>x, <uint16_t*>y, r.N, r.C, r.S, rms, <const float*>w,
                                     <const float*>b, eps, mean, rstd, nt)
    return _check(st)


cdef inline bint in_tc(object a, int dt, cnp.ndarray ya) noexcept:
    """Whether checked parameter a (or None) is usable as it is in the compute type of dtype dt (x's dtype; float32 for
    16-bit x) by a forward writing the C-contiguous ya: a contiguous native array of it, apart from ya (the kernels
    read the parameters while they write y: one that y overwrites is copied first)."""
    if a is None:
        return True
    cdef cnp.ndarray p = <cnp.ndarray>a
    if not (cnp.PyArray_TYPE(p) == (cnp.NPY_FLOAT64 if dt == DT_F64 else cnp.NPY_FLOAT32)
            and cnp.PyArray_IS_C_CONTIGUOUS(p) and cnp.PyArray_ISALIGNED(p) and cnp.PyArray_ISNOTSWAPPED(p)):
        return False
    cdef const char* a0 = <const char*>cnp.PyArray_DATA(p)
    cdef const char* y0 = <const char*>cnp.PyArray_DATA(ya)
    return a0 + cnp.PyArray_NBYTES(p) <= y0 or y0 + cnp.PyArray_NBYTES(ya) <= a0


cdef inline int64_t tc_scratch(object w, object b, int dt, int64_t C, cnp.ndarray ya) noexcept:
    """The doubles param_tc needs for w and b: 4 C where either is not usable as it is, else none (a row of 4096
    went through malloc for nothing otherwise)."""
    return 0 if in_tc(w, dt, ya) and in_tc(b, dt, ya) else 4 * C


cdef const void* param_tc(object a, int dt, int64_t C, double* tmp, void* dst, cnp.ndarray ya) except? NULL:
    """Checked parameter a (or None: NULL) in the compute type of dtype dt (x's dtype; float32 for 16-bit x): its own
    data when it is usable as it is (in_tc), else rounded into dst through the doubles tmp."""
    if a is None:
        return NULL
    if in_tc(a, dt, ya):
        return cnp.PyArray_DATA(<cnp.ndarray>a)
    A.load(a, C, tmp)
    narrow(dt, tmp, dst, C)
    return dst


cdef int k_row_backward(int dt, const void* dy, const void* x, void* dx, Rows* r, int rms, const double* mean,
                        const double* rstd, const double* w, double* gw, double* gb, int nt) except -1:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_row_backward_f32(<const float*>dy, <const float*>x, <float*>dx, r.N, r.C, r.S, rms, mean, rstd,
                                     w, gw, gb, nt)
        elif dt == DT_F64:
            st = bn_row_backward_f64(<const double*>dy, <const double*>x, <double*>dx, r.N, r.C, r.S, rms, mean,
                                     rstd, w, gw, gb, nt)
        elif dt == DT_F16:
            st = bn_row_backward_f16(<const uint16_t*>dy, <const uint16_t*>x, <uint16_t*>dx, r.N, r.C, r.S, rms, mean,
                                     rstd, w, gw, gb, nt)
        elif dt == DT_BF16:
            st = bn_row_backward_bf16(<const uint16_t*>dy, <const uint16_t*>x, <uint16_t*>dx, r.N, r.C, r.S, rms, mean,
                                     rstd, w, gw, gb, nt)
    return _check(st)


cdef object stat_as(int64_t n, const double* src, cnp.ndarray xa, Rows* r):
    """A new array of x's dtype (float32 for 16-bit x), shaped as the saved statistics (A.stat_shape), holding src's n
    values rounded to it. (Made in its shape from dims in C: through a shape tuple, a forward's two of these cost
    0.40 us a call.)"""
    cdef cnp.npy_intp dims[64]  # (NPY_MAXDIMS of NumPy 2; x's rank at most)
    cdef int nd = A.stat_dims(xa, r, dims)
    cdef cnp.ndarray a = cnp.PyArray_EMPTY(nd, dims, stat_type(xa), 0)
    A.store(a, n, src)
    return a


def row_norm(x, normalized_shape, weight, bias, eps, layout, out, int nthreads, bint rms, int result=0):
    """rownorm.layer_norm / rms_norm (result 0: y); their _forward (1: (y, mean, rstd), RMS (y, rstd), in x's dtype
    shaped as PyTorch's); 2: (y, mean, rstd) as float64 (N S,) arrays (mean None for RMS)."""
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef Rows r
    A.rows_view(xa, normalized_shape, layout, &r)
    w = A.row_param(weight, "weight", xa, &r)
    b = None if rms else A.row_param(bias, "bias", xa, &r)
    cdef double e
    if rms and eps is None:  # (PyTorch's default: the machine epsilon of the compute type, float32 for 16-bit x)
        e = DBL_EPSILON if r.dtype == DT_F64 else FLT_EPSILON
    else:
        e = A.eps(eps)
    cdef cnp.ndarray ya = A.output(out, xa, None)
    cdef int64_t C = r.C, NS = r.N * r.S, tc = tc_scratch(w, b, r.dtype, C, ya)
    cdef cnp.ndarray m64 = None, s64 = None
    cdef double stack[STACK_DOUBLES]
    # (scratch: w, b rounded to the compute type when they are not in it, through 2 C doubles; the statistics)
    cdef double* p = scratch(tc + (0 if result == 2 else 2 * NS), stack)
    cdef double* mp
    cdef double* sp
    cdef const void* wp
    cdef const void* bp
    try:
        if result == 2:
            s64 = A.new_vector(NS, cnp.NPY_FLOAT64)
            sp = <double*>data_of(s64)
            if not rms:
                m64 = A.new_vector(NS, cnp.NPY_FLOAT64)
            mp = <double*>data_of(m64) if not rms else NULL
        else:
            mp = p + tc
            sp = mp + NS
        if r.N * r.C * r.S or NS:
            wp = param_tc(w, r.dtype, C, p, p + 2 * C, ya)
            bp = param_tc(b, r.dtype, C, p, p + 3 * C, ya)
            k_row_forward(r.dtype, data_or_null(xa), data_or_null(ya), &r, rms, wp, bp, e, mp, sp, nthreads)
        if result == 0:
            return ya
        if result == 2:
            return ya, m64, s64
        if rms:
            return ya, stat_as(NS, sp, xa, &r)
        return ya, stat_as(NS, mp, xa, &r), stat_as(NS, sp, xa, &r)
    finally:
        release(p, stack)


def row_norm_backward(grad_out, x, mean, rstd, normalized_shape, weight, bias, layout, out, int nthreads, bint rms):
    """rownorm.layer_norm_backward / rms_norm_backward: (grad_x, grad_weight, grad_bias) (RMS: (grad_x,
    grad_weight)); a parameter's gradient is None when the parameter is, else shaped and typed as it."""
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef Rows r
    A.rows_view(xa, normalized_shape, layout, &r)
    cdef cnp.ndarray ga = A.like(grad_out, "grad_out", xa)
    w = A.row_param(weight, "weight", xa, &r)
    b = None if rms else A.row_param(bias, "bias", xa, &r)
    cdef int64_t C = r.C, NS = r.N * r.S
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(2 * NS + 3 * C, stack)
    cdef double* gw = p + 2 * NS + C
    cdef double* gb = gw + C
    try:
        if not rms:
            A.row_stat(mean, "mean", xa, &r, p)
        A.row_stat(rstd, "rstd", xa, &r, p + NS)
        dx = A.output(out, xa, ga)
        k_row_backward(r.dtype, data_or_null(ga), data_or_null(xa), data_or_null(dx), &r, rms,
                       NULL if rms or not NS else p, p + NS if NS else NULL, load_opt(w, C, p + 2 * NS), gw, gb,
                       nthreads)
        gwa = None if w is None else vector_as(C, gw, w)
        if w is not None and w is not weight:  # (weight shaped as normalized_shape: its gradient too)
            gwa = gwa.reshape(np.shape(weight))
        if rms:
            return dx, gwa
        gba = None if b is None else vector_as(C, gb, b)
        if b is not None and b is not bias:
            gba = gba.reshape(np.shape(bias))
        return dx, gwa, gba
    finally:
        release(p, stack)


# ---- the kernels alone, for tests --------------------------------------------------------------------------------
# x, y, dy, dx: (outer, C, inner) arrays (checked as NCHW data); the coefficients (C,) of any float dtype, rounded to
# x's dtype (exactly, when they have it).

def apply(x, y, m, a, b, int nthreads):
    """y = (x - m[c]) * a[c] + b[c]: the apply kernel with coefficients as given (norm_coefficients makes them)."""
    cdef cnp.ndarray xa = A.data(x, "x")
    cdef View v
    A.view(xa, NCHW, "x", &v)
    cdef int64_t C = v.C, k
    coefs = (A.required_channel(m, "m", C), A.required_channel(a, "a", C), A.required_channel(b, "b", C))
    cdef cnp.ndarray ya = A.output(y, xa, None)
    cdef size_t cs = coef_size(v.dtype)
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(6 * C, stack)
    cdef char* q = <char*>(p + 3 * C)
    try:
        for k in range(3):
            A.load(coefs[k], C, p + k * C)
            narrow(v.dtype, p + k * C, q + k * C * cs, C)
        if v.outer * C * v.inner:
            _check(k_apply(v.dtype, data_of(xa), data_of(ya), v.outer, C, v.inner, q, q + C * cs, q + 2 * C * cs,
                           nthreads))
        return ya
    finally:
        release(p, stack)


def apply_backward(dy, x, dx, m, a, b, d, int nthreads):
    """dx = a[c] * dy + b[c] * (x - m[c]) + d[c] with nothing folded: the backward-apply kernel with coefficients as
    given (backward_coefficients makes them)."""
    cdef cnp.ndarray xa = A.data(x, "x")
    cdef View v
    A.view(xa, NCHW, "x", &v)
    cdef int64_t C = v.C, k
    cdef cnp.ndarray ga = A.like(dy, "grad_out", xa)
    coefs = (A.required_channel(m, "m", C), A.required_channel(a, "a", C), A.required_channel(b, "b", C),
             A.required_channel(d, "d", C))
    cdef cnp.ndarray da = A.output(dx, xa, ga)
    cdef size_t cs = coef_size(v.dtype)
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(8 * C, stack)
    cdef char* q = <char*>(p + 4 * C)
    try:
        for k in range(4):
            A.load(coefs[k], C, p + k * C)
            narrow(v.dtype, p + k * C, q + k * C * cs, C)
        if v.outer * C * v.inner:
            _check(k_backward_apply(v.dtype, data_of(ga), data_of(xa), data_of(da), v.outer, C, v.inner, q,
                                    q + C * cs, q + 2 * C * cs, q + 3 * C * cs, nthreads))
        return da
    finally:
        release(p, stack)
include "_epilogue.pxi"
include "_epilogue_ops.pxi"
