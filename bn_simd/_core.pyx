# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Thin typed-memoryview bridge to the C kernels (include/bn_simd.h).

Every array is a C-contiguous (outer, C, inner) view or a length-C vector; the Python layer has already
checked shapes, dtypes and aliasing. The GIL is released around every kernel. Per-channel arguments that
may be None are passed as NULL (weight 1, bias 0).
"""
from libc.stdint cimport int64_t

import numpy as np

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
    int BN_CL_STRIP_MIN_BYTES
    int64_t bn_cl_strip_bytes()
    int64_t bn_cl_stream_strip_bytes()
    int bn_set_cl_strip_bytes(int64_t nbytes)
    int64_t bn_slab_bytes()
    int64_t bn_slab_min_input()
    int bn_set_slab_bytes(int64_t nbytes)

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
    int bn_stats_f64(const double* x, int64_t outer, int64_t C, int64_t inner, double* mean, double* var, int nt)
    int bn_apply_f32(const float* x, float* y, int64_t outer, int64_t C, int64_t inner,
                     const float* m, const float* a, const float* b, int nt)
    int bn_apply_f64(const double* x, double* y, int64_t outer, int64_t C, int64_t inner,
                     const double* m, const double* a, const double* b, int nt)
    int bn_normalize_f32(const float* x, float* y, int64_t outer, int64_t C, int64_t inner, const double* mean,
                         const double* var, const double* weight, const double* bias, double eps, int nt)
    int bn_normalize_f64(const double* x, double* y, int64_t outer, int64_t C, int64_t inner, const double* mean,
                         const double* var, const double* weight, const double* bias, double eps, int nt)
    int bn_forward_train_f32(const float* x, float* y, int64_t outer, int64_t C, int64_t inner,
                             const double* weight, const double* bias, double eps, double* mean, double* var, int nt)
    int bn_forward_train_f64(const double* x, double* y, int64_t outer, int64_t C, int64_t inner,
                             const double* weight, const double* bias, double eps, double* mean, double* var, int nt)
    int bn_backward_reduce_f32(const float* dy, const float* x, int64_t outer, int64_t C, int64_t inner,
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
    int bn_group_forward_f64(const double* x, double* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,
                             const double* weight, const double* bias, double eps, double* mean, double* var, int nt)
    int bn_group_backward_f32(const float* dy, const float* x, float* dx, int64_t N, int64_t C, int64_t S, int64_t G,
                              int cl, const double* mean, const double* invstd, const double* weight,
                              double* grad_weight, double* grad_bias, int nt)
    int bn_group_backward_f64(const double* dy, const double* x, double* dx, int64_t N, int64_t C, int64_t S,
                              int64_t G, int cl, const double* mean, const double* invstd, const double* weight,
                              double* grad_weight, double* grad_bias, int nt)

ctypedef fused real:
    float
    double

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


def cl_strip_bytes():
    """Row size (bytes, all arrays of a sweep) from which channels-last element-wise sweeps use column strips."""
    return bn_cl_strip_bytes()


def cl_stream_strip_bytes():
    """cl_strip_bytes for the sweeps whose output streams (beyond the last-level cache)."""
    return bn_cl_stream_strip_bytes()


def set_cl_strip_bytes(nbytes):
    """Set cl_strip_bytes and cl_stream_strip_bytes for every later call; None: back to the CPU's defaults. Tuning
    and tests only."""
    cdef int64_t v = -1 if nbytes is None else nbytes
    # (the C call takes a negative value as "the default": here only None means that)
    if (nbytes is not None and v < 0) or bn_set_cl_strip_bytes(v) != BN_OK:
        raise ValueError(f"nbytes must be None or at least {BN_CL_STRIP_MIN_BYTES}, got {nbytes!r}")


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
    cdef int64_t v = -1
    if nbytes is not None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
            raise TypeError(f"nbytes must be None or an int >= 0, got {type(nbytes).__name__} {nbytes!r}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be None or an int >= 0, got {nbytes!r}")
        v = min(int(nbytes), 2**62)
    bn_set_slab_bytes(v)



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
            raise ValueError(f"isa must be None or one this CPU supports, {supported_isas()}, got {name!r}")

    def isa(self):
        return ISA_NAMES[bn_context_get_isa(self.c)]

    def set_cl_strip_bytes(self, nbytes):
        cdef int64_t v = -1 if nbytes is None else nbytes
        if (nbytes is not None and v < 0) or bn_context_set_cl_strip_bytes(self.c, v) != BN_OK:
            raise ValueError(f"cl_strip_bytes must be None or at least {BN_CL_STRIP_MIN_BYTES}, got {nbytes!r}")

    def set_slab_bytes(self, nbytes):
        if nbytes is not None and nbytes < 0:
            raise ValueError(f"slab_bytes must be None or an int >= 0, got {nbytes!r}")
        bn_context_set_slab_bytes(self.c, -1 if nbytes is None else min(int(nbytes), 2**62))


def use_context(ContextHandle handle):
    """Make handle's context the calling thread's for the calls it makes next (None: the default)."""
    bn_context_use(NULL if handle is None else handle.c)

def stats(const real[:, :, ::1] x, double[::1] mean, double[::1] var, int nthreads):
    """mean[c], biased var[c] of the (outer, C, inner) view x."""
    cdef int64_t o = x.shape[0], C = x.shape[1], i = x.shape[2]
    cdef int st
    with nogil:
        if real is float:
            st = bn_stats_f32(&x[0, 0, 0] if o * C * i else NULL, o, C, i, &mean[0], &var[0], nthreads)
        else:
            st = bn_stats_f64(&x[0, 0, 0] if o * C * i else NULL, o, C, i, &mean[0], &var[0], nthreads)
    _check(st)


def apply(const real[:, :, ::1] x, real[:, :, ::1] y, const real[::1] m, const real[::1] a, const real[::1] b,
          int nthreads):
    """y = (x - m[c]) * a[c] + b[c]."""
    cdef int64_t o = x.shape[0], C = x.shape[1], i = x.shape[2]
    cdef int st
    if o * C * i == 0:
        return
    with nogil:
        if real is float:
            st = bn_apply_f32(&x[0, 0, 0], &y[0, 0, 0], o, C, i, &m[0], &a[0], &b[0], nthreads)
        else:
            st = bn_apply_f64(&x[0, 0, 0], &y[0, 0, 0], o, C, i, &m[0], &a[0], &b[0], nthreads)
    _check(st)


def normalize(const real[:, :, ::1] x, real[:, :, ::1] y, const double[::1] mean, const double[::1] var,
              const double[::1] weight, const double[::1] bias, double eps, int nthreads):
    """y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]."""
    cdef int64_t o = x.shape[0], C = x.shape[1], i = x.shape[2]
    cdef int st
    cdef const double* w = _opt(weight)
    cdef const double* b = _opt(bias)
    if o * C * i == 0:
        return
    with nogil:
        if real is float:
            st = bn_normalize_f32(&x[0, 0, 0], &y[0, 0, 0], o, C, i, &mean[0], &var[0], w, b, eps, nthreads)
        else:
            st = bn_normalize_f64(&x[0, 0, 0], &y[0, 0, 0], o, C, i, &mean[0], &var[0], w, b, eps, nthreads)
    _check(st)


def forward_train(const real[:, :, ::1] x, real[:, :, ::1] y, const double[::1] weight, const double[::1] bias,
                  double eps, double[::1] mean, double[::1] var, int nthreads):
    """Statistics + normalisation in one call; writes y, mean[c] and biased var[c]."""
    cdef int64_t o = x.shape[0], C = x.shape[1], i = x.shape[2]
    cdef int st
    cdef const double* w = _opt(weight)
    cdef const double* b = _opt(bias)
    if o * C * i == 0:
        return
    with nogil:
        if real is float:
            st = bn_forward_train_f32(&x[0, 0, 0], &y[0, 0, 0], o, C, i, w, b, eps, &mean[0], &var[0], nthreads)
        else:
            st = bn_forward_train_f64(&x[0, 0, 0], &y[0, 0, 0], o, C, i, w, b, eps, &mean[0], &var[0], nthreads)
    _check(st)


def backward_reduce(const real[:, :, ::1] dy, const real[:, :, ::1] x, const double[::1] mean,
                    double[::1] sum_dy, double[::1] sum_dyxm, int nthreads):
    """sum_dy[c] = sum dy, sum_dyxm[c] = sum dy * (x - mean[c])."""
    cdef int64_t o = x.shape[0], C = x.shape[1], i = x.shape[2]
    cdef int st
    if o * C * i == 0:
        sum_dy[:] = 0.0
        sum_dyxm[:] = 0.0
        return
    with nogil:
        if real is float:
            st = bn_backward_reduce_f32(&dy[0, 0, 0], &x[0, 0, 0], o, C, i, &mean[0], &sum_dy[0], &sum_dyxm[0],
                                        nthreads)
        else:
            st = bn_backward_reduce_f64(&dy[0, 0, 0], &x[0, 0, 0], o, C, i, &mean[0], &sum_dy[0], &sum_dyxm[0],
                                        nthreads)
    _check(st)


def backward_apply(const real[:, :, ::1] dy, const real[:, :, ::1] x, real[:, :, ::1] dx, const real[::1] m,
                   const real[::1] a, const real[::1] b, const real[::1] d, int nthreads):
    """dx = a[c] * dy + b[c] * (x - m[c]) + d[c]."""
    cdef int64_t o = x.shape[0], C = x.shape[1], i = x.shape[2]
    cdef int st
    if o * C * i == 0:
        return
    with nogil:
        if real is float:
            st = bn_backward_apply_f32(&dy[0, 0, 0], &x[0, 0, 0], &dx[0, 0, 0], o, C, i, &m[0], &a[0], &b[0],
                                       &d[0], nthreads)
        else:
            st = bn_backward_apply_f64(&dy[0, 0, 0], &x[0, 0, 0], &dx[0, 0, 0], o, C, i, &m[0], &a[0], &b[0],
                                       &d[0], nthreads)
    _check(st)


def backward(const real[:, :, ::1] dy, const real[:, :, ::1] x, real[:, :, ::1] dx, const double[::1] mean,
             const double[::1] invstd, const double[::1] weight, bint training, double[::1] grad_weight,
             double[::1] grad_bias, int nthreads):
    """Backward in one call; writes dx, grad_weight[c] and grad_bias[c]."""
    cdef int64_t o = x.shape[0], C = x.shape[1], i = x.shape[2]
    cdef int st
    cdef const double* w = _opt(weight)
    if C == 0:
        return
    with nogil:
        if real is float:
            st = bn_backward_f32(&dy[0, 0, 0] if o * i else NULL, &x[0, 0, 0] if o * i else NULL,
                                 &dx[0, 0, 0] if o * i else NULL, o, C, i, &mean[0], &invstd[0], w, training,
                                 &grad_weight[0], &grad_bias[0], nthreads)
        else:
            st = bn_backward_f64(&dy[0, 0, 0] if o * i else NULL, &x[0, 0, 0] if o * i else NULL,
                                 &dx[0, 0, 0] if o * i else NULL, o, C, i, &mean[0], &invstd[0], w, training,
                                 &grad_weight[0], &grad_bias[0], nthreads)
    _check(st)




# ---- moments and coefficients ----------------------------------------------------------------------------------

def moments(const real[:, :, ::1] x, int nthreads):
    """bn_stats' chunk moments of the (outer, C, inner) view: (count (K,), shift, resid, m2 (K, C)), float64."""
    cdef int64_t o = x.shape[0], C = x.shape[1], i = x.shape[2], K = 0
    cdef int st
    if real is float:
        st = bn_moments_f32(NULL, o, C, i, &K, NULL, NULL, NULL, NULL, nthreads)
    else:
        st = bn_moments_f64(NULL, o, C, i, &K, NULL, NULL, NULL, NULL, nthreads)
    _check(st)
    cdef double[::1] count = np.empty(K, np.float64)
    cdef double[:, ::1] shift = np.empty((K, C), np.float64), resid = np.empty((K, C), np.float64)
    cdef double[:, ::1] m2 = np.empty((K, C), np.float64)
    if K == 0:
        return np.asarray(count), np.asarray(shift), np.asarray(resid), np.asarray(m2)
    with nogil:
        if real is float:
            st = bn_moments_f32(&x[0, 0, 0], o, C, i, &K, &count[0], &shift[0, 0], &resid[0, 0], &m2[0, 0], nthreads)
        else:
            st = bn_moments_f64(&x[0, 0, 0], o, C, i, &K, &count[0], &shift[0, 0], &resid[0, 0], &m2[0, 0], nthreads)
    _check(st)
    return np.asarray(count), np.asarray(shift), np.asarray(resid), np.asarray(m2)


def moments_merge(const double[::1] count, const double[:, ::1] shift, const double[:, ::1] resid,
                  const double[:, ::1] m2, double[::1] mean, double[::1] var):
    """mean[c], biased var[c] from K chunk moments in the order given."""
    cdef int64_t K = shift.shape[0], C = shift.shape[1]
    if C == 0:
        return
    cdef double dummy = 0.0
    cdef const double* cp = &count[0] if K else &dummy
    cdef const double* sp = &shift[0, 0] if K else &dummy
    cdef const double* rp = &resid[0, 0] if K else &dummy
    cdef const double* mp = &m2[0, 0] if K else &dummy
    _check(bn_moments_merge(K, C, cp, sp, rp, mp, &mean[0], &var[0]))


def norm_params(const double[::1] mean, const double[::1] var, const double[::1] weight, const double[::1] bias,
                double eps, real[::1] m, real[::1] a, real[::1] b):
    """The apply coefficients; True when the call must compute in double (see bn_norm_params_f32)."""
    cdef int64_t C = mean.shape[0]
    cdef int st
    if C == 0:
        return False
    if real is float:
        st = bn_norm_params_f32(C, &mean[0], &var[0], _opt(weight), _opt(bias), eps, &m[0], &a[0], &b[0])
    else:
        st = bn_norm_params_f64(C, &mean[0], &var[0], _opt(weight), _opt(bias), eps, &m[0], &a[0], &b[0])
    if st == 1:
        return True
    _check(st)
    return False


def bwd_params(double n, const double[::1] sum_dy, const double[::1] sum_dyxm, const double[::1] mean,
               const double[::1] invstd, const double[::1] weight, bint training, double[::1] grad_weight,
               double[::1] grad_bias, real[::1] m, real[::1] a, real[::1] b, real[::1] d):
    """The backward coefficients and the parameter gradients."""
    cdef int64_t C = mean.shape[0]
    cdef int st
    if C == 0:
        return
    if real is float:
        st = bn_bwd_params_f32(C, n, &sum_dy[0], &sum_dyxm[0], &mean[0], &invstd[0], _opt(weight), training,
                               &grad_weight[0], &grad_bias[0], &m[0], &a[0], &b[0], &d[0])
    else:
        st = bn_bwd_params_f64(C, n, &sum_dy[0], &sum_dyxm[0], &mean[0], &invstd[0], _opt(weight), training,
                               &grad_weight[0], &grad_bias[0], &m[0], &a[0], &b[0], &d[0])
    _check(st)

# ---- group norm (instance norm: G = C) ----------------------------------------------------------------------
# x: the (N, C, S) view (cl False) or (N, S, C) (cl True); mean, var, invstd: N G values; weight, bias: C or None.

cdef inline void _group_dims(const real[:, :, ::1] x, bint cl, int64_t* N, int64_t* C, int64_t* S) noexcept nogil:
    N[0] = x.shape[0]
    C[0] = x.shape[2] if cl else x.shape[1]
    S[0] = x.shape[1] if cl else x.shape[2]


cdef inline const real* _ptr(const real[:, :, ::1] x) noexcept nogil:
    return &x[0, 0, 0] if x.shape[0] * x.shape[1] * x.shape[2] else NULL


def group_stats(const real[:, :, ::1] x, int64_t G, bint cl, double[::1] mean, double[::1] var, int nthreads):
    """mean[q], biased var[q] of the N G groups."""
    cdef int64_t N, C, S
    _group_dims(x, cl, &N, &C, &S)
    cdef int st
    if N * G == 0:
        return
    with nogil:
        if real is float:
            st = bn_group_stats_f32(_ptr(x), N, C, S, G, cl, &mean[0], &var[0], nthreads)
        else:
            st = bn_group_stats_f64(_ptr(x), N, C, S, G, cl, &mean[0], &var[0], nthreads)
    _check(st)


def group_normalize(const real[:, :, ::1] x, real[:, :, ::1] y, int64_t G, bint cl, const double[::1] mean,
                    const double[::1] var, const double[::1] weight, const double[::1] bias, double eps,
                    int nthreads):
    """y = (x - mean[q]) / sqrt(var[q] + eps) * weight[c] + bias[c]."""
    cdef int64_t N, C, S
    _group_dims(x, cl, &N, &C, &S)
    cdef int st
    cdef const double* w = _opt(weight)
    cdef const double* b = _opt(bias)
    if N * C * S == 0:
        return
    with nogil:
        if real is float:
            st = bn_group_normalize_f32(&x[0, 0, 0], &y[0, 0, 0], N, C, S, G, cl, &mean[0], &var[0], w, b, eps,
                                        nthreads)
        else:
            st = bn_group_normalize_f64(&x[0, 0, 0], &y[0, 0, 0], N, C, S, G, cl, &mean[0], &var[0], w, b, eps,
                                        nthreads)
    _check(st)


def group_forward(const real[:, :, ::1] x, real[:, :, ::1] y, int64_t G, bint cl, const double[::1] weight,
                  const double[::1] bias, double eps, double[::1] mean, double[::1] var, int nthreads):
    """Statistics + normalisation in one call; writes y, mean[q] and biased var[q]."""
    cdef int64_t N, C, S
    _group_dims(x, cl, &N, &C, &S)
    cdef int st
    cdef const double* w = _opt(weight)
    cdef const double* b = _opt(bias)
    if N * G == 0:
        return
    with nogil:
        if real is float:
            st = bn_group_forward_f32(_ptr(x), <float*>_ptr(y), N, C, S, G, cl, w, b, eps, &mean[0], &var[0],
                                      nthreads)
        else:
            st = bn_group_forward_f64(_ptr(x), <double*>_ptr(y), N, C, S, G, cl, w, b, eps, &mean[0], &var[0],
                                      nthreads)
    _check(st)


def group_backward(const real[:, :, ::1] dy, const real[:, :, ::1] x, real[:, :, ::1] dx, int64_t G, bint cl,
                   const double[::1] mean, const double[::1] invstd, const double[::1] weight,
                   double[::1] grad_weight, double[::1] grad_bias, int nthreads):
    """Backward in one call; writes dx, grad_weight[c] and grad_bias[c]."""
    cdef int64_t N, C, S
    _group_dims(x, cl, &N, &C, &S)
    cdef int st
    cdef const double* w = _opt(weight)
    if C == 0:
        return
    with nogil:
        if real is float:
            st = bn_group_backward_f32(_ptr(dy), _ptr(x), <float*>_ptr(dx), N, C, S, G, cl,
                                       &mean[0] if N else NULL, &invstd[0] if N else NULL, w,
                                       &grad_weight[0], &grad_bias[0], nthreads)
        else:
            st = bn_group_backward_f64(_ptr(dy), _ptr(x), <double*>_ptr(dx), N, C, S, G, cl,
                                       &mean[0] if N else NULL, &invstd[0] if N else NULL, w,
                                       &grad_weight[0], &grad_bias[0], nthreads)
    _check(st)

# ---- fast path of batch_norm ---------------------------------------------------------------------------------
# batch_norm on plain arguments (ndarrays of float32/float64, C-contiguous, aligned, native byte order; per-channel
# vectors of length C; Python float eps and momentum; layout "NCHW"/"NHWC"; out None, x itself, or a separate
# array) checked and run here without Python-level work: a tiny call costs about a microsecond instead of ten.
# Anything else returns None and batch_norm takes its general path, which validates and raises as documented;
# both paths compute the same bytes (same kernels, same float64 running-statistics formula).
cimport numpy as cnp
from libc.float cimport FLT_MAX
from libc.math cimport isfinite
from libc.stdlib cimport free, malloc

cnp.import_array()


cdef inline bint _plain(object a, bint writeable):
    """a is an ndarray of float32/float64 the kernels can use as it is."""
    if type(a) is not cnp.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int t = cnp.PyArray_TYPE(arr)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        return False
    if not (cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr) and cnp.PyArray_ISNOTSWAPPED(arr)):
        return False
    return cnp.PyArray_ISWRITEABLE(arr) or not writeable


cdef inline bint _vector(object v, Py_ssize_t C, bint writeable):
    return _plain(v, writeable) and cnp.PyArray_NDIM(<cnp.ndarray>v) == 1 and cnp.PyArray_DIM(<cnp.ndarray>v, 0) == C


cdef inline void _load(object v, Py_ssize_t C, double* dst):
    # (the data pointers are locals: a loop reading through PyArray_DATA in its body cannot be vectorised, the
    # compiler must assume dst's stores change the array object; these loops were most of a call's overhead at
    # C = 1024)
    cdef cnp.ndarray a = <cnp.ndarray>v
    cdef const float* f
    cdef const double* d
    cdef Py_ssize_t i
    if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
        f = <const float*>cnp.PyArray_DATA(a)
        for i in range(C):
            dst[i] = f[i]
    else:
        d = <const double*>cnp.PyArray_DATA(a)
        for i in range(C):
            dst[i] = d[i]


cdef inline void _store(object v, Py_ssize_t C, const double* src):
    cdef cnp.ndarray a = <cnp.ndarray>v
    cdef float* f
    cdef double* d
    cdef Py_ssize_t i
    if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
        f = <float*>cnp.PyArray_DATA(a)
        for i in range(C):
            f[i] = <float>src[i]
    else:
        d = <double*>cnp.PyArray_DATA(a)
        for i in range(C):
            d[i] = src[i]


cdef inline bint _disjoint(cnp.ndarray a, cnp.ndarray b):
    cdef char* pa = <char*>cnp.PyArray_DATA(a)
    cdef char* pb = <char*>cnp.PyArray_DATA(b)
    return pa + cnp.PyArray_NBYTES(a) <= pb or pb + cnp.PyArray_NBYTES(b) <= pa


cdef inline bint _dims(cnp.ndarray xa, str layout, int64_t* outer, int64_t* C, int64_t* inner):
    """(outer, C, inner) of a rank 2..5 array in layout "NCHW"/"NHWC"; False for anything else."""
    cdef int nd = cnp.PyArray_NDIM(xa), k
    if nd < 2 or nd > 5:
        return False
    outer[0] = 1
    inner[0] = 1
    if layout == "NCHW":
        C[0] = cnp.PyArray_DIM(xa, 1)
        outer[0] = cnp.PyArray_DIM(xa, 0)
        for k in range(2, nd):
            inner[0] *= cnp.PyArray_DIM(xa, k)
    elif layout == "NHWC":
        C[0] = cnp.PyArray_DIM(xa, nd - 1)
        for k in range(nd - 1):
            outer[0] *= cnp.PyArray_DIM(xa, k)
    else:
        return False
    return True


cdef inline bint _in_place_or_disjoint(cnp.ndarray out, cnp.ndarray a):
    """out is a itself element for element (same data, same strides: check_out's test), or shares no byte."""
    cdef int k
    if cnp.PyArray_DATA(out) != cnp.PyArray_DATA(a):
        return _disjoint(out, a)
    for k in range(cnp.PyArray_NDIM(out)):
        if cnp.PyArray_STRIDE(out, k) != cnp.PyArray_STRIDE(a, k):
            return False
    return True


cdef inline bint _same_shape(cnp.ndarray a, cnp.ndarray b):
    cdef int k
    if cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b) or cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(b):
        return False
    for k in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIM(a, k) != cnp.PyArray_DIM(b, k):
            return False
    return True


cdef inline object _out_array(object out, cnp.ndarray xa, object other):
    """The output array: new when out is None; out when it is plain, shaped and typed like xa, and each of xa
    and other (an ndarray or None) is it element for element or shares no byte with it; else None."""
    if out is None:
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(xa), cnp.PyArray_DIMS(xa), cnp.PyArray_TYPE(xa), 0)
    if not _plain(out, True) or not _same_shape(<cnp.ndarray>out, xa):
        return None
    if not _in_place_or_disjoint(<cnp.ndarray>out, xa):
        return None
    if other is not None and not _in_place_or_disjoint(<cnp.ndarray>out, <cnp.ndarray>other):
        return None
    return out


def batch_norm_fast(x, running_mean, running_var, weight, bias, training, momentum, eps, layout, out,
                    unbiased, int nthreads):
    """batch_norm's result, or None when an argument needs the general path."""
    if not _plain(x, False) or type(eps) is not float or type(momentum) is not float:
        return None
    cdef double e = eps, mom = momentum
    if not (isfinite(e) and e > 0.0 and 0.0 <= mom <= 1.0):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int64_t outer, C, inner
    if type(layout) is not str or not _dims(xa, layout, &outer, &C, &inner):
        return None
    cdef int64_t n = outer * inner
    if C == 0 or n == 0 or (training is not True and training is not False):
        return None
    if training and n < 2:
        return None
    cdef bint stats = running_mean is not None or running_var is not None
    if stats and not (_vector(running_mean, C, True) and _vector(running_var, C, True)):
        return None
    if not stats and not training:
        return None
    if (weight is not None and not _vector(weight, C, False)) or (bias is not None and not _vector(bias, C, False)):
        return None
    cdef int t = cnp.PyArray_TYPE(xa)
    y = _out_array(out, xa, None)
    if y is None:
        return None
    cdef cnp.ndarray ya = <cnp.ndarray>y
    # Every argument is usable: from here on the call succeeds or raises MemoryError before any write.
    cdef double* p = <double*>malloc(sizeof(double) * 6 * C)
    if p == NULL:
        raise MemoryError("bn_simd: out of memory for per-channel scratch space")
    cdef double *rm = p, *rv = p + C, *w = NULL, *b = NULL, *mean = p + 4 * C, *var = p + 5 * C
    cdef const void* xp = cnp.PyArray_DATA(xa)
    cdef void* yp = cnp.PyArray_DATA(ya)
    cdef int st
    cdef Py_ssize_t c
    cdef double f = 1.0, v
    cdef bint scaled = False
    if weight is not None:
        w = p + 2 * C
        _load(weight, C, w)
    if bias is not None:
        b = p + 3 * C
        _load(bias, C, b)
    if training:
        with nogil:
            if t == cnp.NPY_FLOAT32:
                st = bn_forward_train_f32(<const float*>xp, <float*>yp, outer, C, inner, w, b, e, mean, var, nthreads)
            else:
                st = bn_forward_train_f64(<const double*>xp, <double*>yp, outer, C, inner, w, b, e, mean, var,
                                          nthreads)
        if st == BN_OK and stats:
            # update_running_stats' formula, operation for operation (unbiased read only here, as there)
            if unbiased and n > 1:
                scaled = True
                f = n / (n - 1.0)
            _load(running_mean, C, rm)
            _load(running_var, C, rv)
            for c in range(C):
                rm[c] = (1.0 - mom) * rm[c] + mom * mean[c]
                v = var[c] * f if scaled else var[c]
                rv[c] = (1.0 - mom) * rv[c] + mom * v
            _store(running_mean, C, rm)
            _store(running_var, C, rv)
    else:
        _load(running_mean, C, rm)
        _load(running_var, C, rv)
        with nogil:
            if t == cnp.NPY_FLOAT32:
                st = bn_normalize_f32(<const float*>xp, <float*>yp, outer, C, inner, rm, rv, w, b, e, nthreads)
            else:
                st = bn_normalize_f64(<const double*>xp, <double*>yp, outer, C, inner, rm, rv, w, b, e, nthreads)
    free(p)
    _check(st)
    return ya


def batch_norm_backward_fast(grad_out, x, save_mean, save_invstd, weight, layout, out, training, int nthreads):
    """batch_norm_backward's result for plain arguments (as batch_norm_fast), or None for the general path."""
    if not (_plain(x, False) and _plain(grad_out, False)) or type(layout) is not str:
        return None
    if training is not True and training is not False:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x, ga = <cnp.ndarray>grad_out, da
    cdef int64_t outer, C, inner
    if not _same_shape(xa, ga) or not _dims(xa, layout, &outer, &C, &inner) or C == 0 or outer * inner == 0:
        return None
    if not (_vector(save_mean, C, False) and _vector(save_invstd, C, False)):
        return None
    if weight is not None and not _vector(weight, C, False):
        return None
    cdef int t = cnp.PyArray_TYPE(xa)
    dx = _out_array(out, xa, ga)
    if dx is None:
        return None
    da = <cnp.ndarray>dx
    cdef int gt = cnp.PyArray_TYPE(<cnp.ndarray>weight) if weight is not None else t
    cdef cnp.npy_intp n1 = C
    cdef cnp.ndarray gw = cnp.PyArray_EMPTY(1, &n1, gt, 0), gb = cnp.PyArray_EMPTY(1, &n1, gt, 0)
    cdef double* p = <double*>malloc(sizeof(double) * 5 * C)
    if p == NULL:
        raise MemoryError("bn_simd: out of memory for per-channel scratch space")
    cdef double *mean = p, *invstd = p + C, *w = NULL, *gwd = p + 3 * C, *gbd = p + 4 * C
    _load(save_mean, C, mean)
    _load(save_invstd, C, invstd)
    if weight is not None:
        w = p + 2 * C
        _load(weight, C, w)
    cdef const void* gp = cnp.PyArray_DATA(ga)
    cdef const void* xp = cnp.PyArray_DATA(xa)
    cdef void* dp = cnp.PyArray_DATA(da)
    cdef int st, tr = training
    with nogil:
        if t == cnp.NPY_FLOAT32:
            st = bn_backward_f32(<const float*>gp, <const float*>xp, <float*>dp, outer, C, inner, mean, invstd, w, tr,
                                 gwd, gbd, nthreads)
        else:
            st = bn_backward_f64(<const double*>gp, <const double*>xp, <double*>dp, outer, C, inner, mean, invstd, w,
                                 tr, gwd, gbd, nthreads)
    if st == BN_OK:
        _store(gw, C, gwd)
        _store(gb, C, gbd)
    free(p)
    _check(st)
    return da, gw, gb


# ---- fast paths of the four steps ----------------------------------------------------------------------------
# batch_stats, normalize, backward_reduce and backward_apply on plain arguments, as batch_norm_fast: each returns
# its step's result, or None when an argument needs the general path (which validates, converts and raises as
# documented). The per-channel work is the general path's, operation for operation, so both give the same bytes.

cdef inline tuple _f64_pair(int64_t C):
    """two new float64 arrays of shape (C,)"""
    cdef cnp.npy_intp n1 = C
    return cnp.PyArray_EMPTY(1, &n1, cnp.NPY_FLOAT64, 0), cnp.PyArray_EMPTY(1, &n1, cnp.NPY_FLOAT64, 0)


cdef inline bint _data_dims(object x, object layout, int64_t* outer, int64_t* C, int64_t* inner):
    """x is a plain data array of rank 2..5 in layout "NCHW"/"NHWC" with C >= 1 and some element per channel."""
    if not _plain(x, False) or type(layout) is not str:
        return False
    if not _dims(<cnp.ndarray>x, layout, outer, C, inner):
        return False
    return C[0] > 0 and outer[0] * inner[0] > 0


def batch_stats_fast(x, layout, int nthreads):
    """batch_stats' (mean, var), or None for the general path."""
    cdef int64_t outer, C, inner
    if not _data_dims(x, layout, &outer, &C, &inner):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x, mean, var
    mean, var = _f64_pair(C)
    cdef const void* xp = cnp.PyArray_DATA(xa)
    cdef double* mp = <double*>cnp.PyArray_DATA(mean)
    cdef double* vp = <double*>cnp.PyArray_DATA(var)
    cdef int st
    with nogil:
        if cnp.PyArray_TYPE(xa) == cnp.NPY_FLOAT32:
            st = bn_stats_f32(<const float*>xp, outer, C, inner, mp, vp, nthreads)
        else:
            st = bn_stats_f64(<const double*>xp, outer, C, inner, mp, vp, nthreads)
    _check(st)
    return mean, var


def normalize_fast(x, mean, var, weight, bias, eps, layout, out, int nthreads):
    """normalize's y, or None for the general path."""
    cdef int64_t outer, C, inner
    if not _data_dims(x, layout, &outer, &C, &inner) or type(eps) is not float:
        return None
    cdef double e = eps
    if not (isfinite(e) and e > 0.0):
        return None
    if not (_vector(mean, C, False) and _vector(var, C, False)):
        return None
    if (weight is not None and not _vector(weight, C, False)) or (bias is not None and not _vector(bias, C, False)):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    y = _out_array(out, xa, None)
    if y is None:
        return None
    cdef double* p = <double*>malloc(sizeof(double) * 4 * C)
    if p == NULL:
        raise MemoryError("bn_simd: out of memory for per-channel scratch space")
    cdef double *m = p, *v = p + C, *w = NULL, *b = NULL
    _load(mean, C, m)
    _load(var, C, v)
    if weight is not None:
        w = p + 2 * C
        _load(weight, C, w)
    if bias is not None:
        b = p + 3 * C
        _load(bias, C, b)
    cdef const void* xp = cnp.PyArray_DATA(xa)
    cdef void* yp = cnp.PyArray_DATA(<cnp.ndarray>y)
    cdef int st
    with nogil:
        if cnp.PyArray_TYPE(xa) == cnp.NPY_FLOAT32:
            st = bn_normalize_f32(<const float*>xp, <float*>yp, outer, C, inner, m, v, w, b, e, nthreads)
        else:
            st = bn_normalize_f64(<const double*>xp, <double*>yp, outer, C, inner, m, v, w, b, e, nthreads)
    free(p)
    _check(st)
    return y


def backward_reduce_fast(grad_out, x, mean, layout, int nthreads):
    """backward_reduce's (sum grad_out, sum grad_out (x - mean)), or None for the general path."""
    cdef int64_t outer, C, inner
    if not _data_dims(x, layout, &outer, &C, &inner) or not _plain(grad_out, False):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x, ga = <cnp.ndarray>grad_out
    if not _same_shape(xa, ga) or not _vector(mean, C, False):
        return None
    cdef cnp.ndarray sdy, sdyx
    sdy, sdyx = _f64_pair(C)
    cdef double* m = <double*>malloc(sizeof(double) * C)
    if m == NULL:
        raise MemoryError("bn_simd: out of memory for per-channel scratch space")
    _load(mean, C, m)
    cdef const void* gp = cnp.PyArray_DATA(ga)
    cdef const void* xp = cnp.PyArray_DATA(xa)
    cdef double* sp = <double*>cnp.PyArray_DATA(sdy)
    cdef double* hp = <double*>cnp.PyArray_DATA(sdyx)
    cdef int st
    with nogil:
        if cnp.PyArray_TYPE(xa) == cnp.NPY_FLOAT32:
            st = bn_backward_reduce_f32(<const float*>gp, <const float*>xp, outer, C, inner, m, sp, hp, nthreads)
        else:
            st = bn_backward_reduce_f64(<const double*>gp, <const double*>xp, outer, C, inner, m, sp, hp, nthreads)
    free(m)
    _check(st)
    return sdy, sdyx


cdef inline bint _beyond_f32(double v):
    """v is not finite, or its float32 rounding would not be"""
    return not isfinite(v) or v > FLT_MAX or v < -FLT_MAX


def backward_apply_fast(grad_out, x, mean, a, b, d, layout, out, int nthreads):
    """backward_apply's grad_x, or None for the general path."""
    cdef int64_t outer, C, inner
    if not _data_dims(x, layout, &outer, &C, &inner) or not _plain(grad_out, False):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x, ga = <cnp.ndarray>grad_out
    if not _same_shape(xa, ga):
        return None
    if not (_vector(mean, C, False) and _vector(a, C, False) and _vector(b, C, False) and _vector(d, C, False)):
        return None
    dx = _out_array(out, xa, ga)
    if dx is None:
        return None
    cdef int t = cnp.PyArray_TYPE(xa)
    cdef double* p = <double*>malloc(sizeof(double) * 4 * C)
    cdef void* q = malloc((sizeof(float) if t == cnp.NPY_FLOAT32 else sizeof(double)) * 4 * C)
    if p == NULL or q == NULL:
        free(p)
        free(q)
        raise MemoryError("bn_simd: out of memory for per-channel scratch space")
    cdef double *md = p, *ad = p + C, *bd = p + 2 * C, *dd = p + 3 * C
    _load(mean, C, md)
    _load(a, C, ad)
    _load(b, C, bd)
    _load(d, C, dd)
    cdef float* qf = <float*>q
    cdef double* qd = <double*>q
    cdef Py_ssize_t c
    cdef float mf
    cdef double dc
    cdef bint decline = False
    # the general path's coefficients: m = mean rounded to x's dtype, its residual folded into d
    # (d - b (mean - m), in float64), then a, b and d rounded to x's dtype. A coefficient that is not finite, or
    # whose folding or float32 rounding is not, goes to the general path: NumPy's arithmetic there reports it
    # (a warning, or FloatingPointError under np.errstate), and keeps NumPy's NaN propagation
    if t == cnp.NPY_FLOAT32:
        for c in range(C):
            dc = dd[c] - bd[c] * (md[c] - <double><float>md[c])
            decline |= _beyond_f32(md[c]) | _beyond_f32(ad[c]) | _beyond_f32(bd[c]) | _beyond_f32(dc)
            mf = <float>md[c]
            qf[c] = mf
            qf[C + c] = <float>ad[c]
            qf[2 * C + c] = <float>bd[c]
            qf[3 * C + c] = <float>dc
    else:
        for c in range(C):
            dc = dd[c] - bd[c] * (md[c] - md[c])
            decline |= not (isfinite(md[c]) and isfinite(ad[c]) and isfinite(bd[c]) and isfinite(dc))
            qd[c] = md[c]
            qd[C + c] = ad[c]
            qd[2 * C + c] = bd[c]
            qd[3 * C + c] = dc
    if decline:
        free(p)
        free(q)
        return None
    cdef const void* gp = cnp.PyArray_DATA(ga)
    cdef const void* xp = cnp.PyArray_DATA(xa)
    cdef void* dp = cnp.PyArray_DATA(<cnp.ndarray>dx)
    cdef int st
    with nogil:
        if t == cnp.NPY_FLOAT32:
            st = bn_backward_apply_f32(<const float*>gp, <const float*>xp, <float*>dp, outer, C, inner, qf, qf + C,
                                       qf + 2 * C, qf + 3 * C, nthreads)
        else:
            st = bn_backward_apply_f64(<const double*>gp, <const double*>xp, <double*>dp, outer, C, inner, qd,
                                       qd + C, qd + 2 * C, qd + 3 * C, nthreads)
    free(p)
    free(q)
    _check(st)
    return dx
