# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Thin typed-memoryview bridge to the C kernels (include/bn_simd.h).

Every array is a C-contiguous (outer, C, inner) view or a length-C vector; the Python layer has already
checked shapes, dtypes and aliasing. The GIL is released around every kernel. Per-channel arguments that
may be None are passed as NULL (weight 1, bias 0).
"""
from libc.stdint cimport int64_t

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
    """Fused statistics + normalisation; writes y, mean[c] and biased var[c]."""
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
    """Fused backward; writes dx, grad_weight[c] and grad_bias[c]."""
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
