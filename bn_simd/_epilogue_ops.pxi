# Fused epilogues on group / instance norm and layer / RMS norm (include/bn_simd_epilogue.h, BN_DECLARE_EPILOGUE_OPS):
# z = act(norm(x) + residual) in their normalise sweep, and the backward through it. Included by _core.pyx after
# _epilogue.pxi, whose descriptor (bn_epilogue) and checks (epi_residual, epi_fill) it uses. The activation arrives
# parsed (bn_simd/_epilogue.py). The forwards return the float64 statistics the normalise used (save_stats), from
# which the backwards recompute the forward's coefficients bit for bit.

cdef extern from "bn_simd.h" nogil:
    int bn_group_forward_epi_f32(const float* x, float* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,
                                 const double* w, const double* b, double eps, double* mean, double* var,
                                 const bn_epilogue* ep, int nt)
    int bn_group_forward_epi_f64(const double* x, double* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,
                                 const double* w, const double* b, double eps, double* mean, double* var,
                                 const bn_epilogue* ep, int nt)
    int bn_group_forward_epi_f16(const uint16_t* x, uint16_t* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,
                                 const double* w, const double* b, double eps, double* mean, double* var,
                                 const bn_epilogue* ep, int nt)
    int bn_group_forward_epi_bf16(const uint16_t* x, uint16_t* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,
                                  const double* w, const double* b, double eps, double* mean, double* var,
                                  const bn_epilogue* ep, int nt)
    int bn_group_backward_epi_f32(const float* dz, const float* x, float* dx, float* dres, int64_t N, int64_t C,
                                  int64_t S, int64_t G, int cl, const double* mean, const double* var, double eps,
                                  const double* w, const double* b, double* gw, double* gb, const bn_epilogue* ep,
                                  int nt)
    int bn_group_backward_epi_f64(const double* dz, const double* x, double* dx, double* dres, int64_t N, int64_t C,
                                  int64_t S, int64_t G, int cl, const double* mean, const double* var, double eps,
                                  const double* w, const double* b, double* gw, double* gb, const bn_epilogue* ep,
                                  int nt)
    int bn_group_backward_epi_f16(const uint16_t* dz, const uint16_t* x, uint16_t* dx, uint16_t* dres, int64_t N,
                                  int64_t C, int64_t S, int64_t G, int cl, const double* mean, const double* var,
                                  double eps, const double* w, const double* b, double* gw, double* gb,
                                  const bn_epilogue* ep, int nt)
    int bn_group_backward_epi_bf16(const uint16_t* dz, const uint16_t* x, uint16_t* dx, uint16_t* dres, int64_t N,
                                   int64_t C, int64_t S, int64_t G, int cl, const double* mean, const double* var,
                                   double eps, const double* w, const double* b, double* gw, double* gb,
                                   const bn_epilogue* ep, int nt)
    int bn_row_forward_epi_f32(const float* x, float* y, int64_t N, int64_t C, int64_t S, int rms, const float* w,
                               const float* b, double eps, double* mean, double* rstd, const bn_epilogue* ep, int nt)
    int bn_row_forward_epi_f64(const double* x, double* y, int64_t N, int64_t C, int64_t S, int rms, const double* w,
                               const double* b, double eps, double* mean, double* rstd, const bn_epilogue* ep, int nt)
    int bn_row_forward_epi_f16(const uint16_t* x, uint16_t* y, int64_t N, int64_t C, int64_t S, int rms,
                               const float* w, const float* b, double eps, double* mean, double* rstd,
                               const bn_epilogue* ep, int nt)
    int bn_row_forward_epi_bf16(const uint16_t* x, uint16_t* y, int64_t N, int64_t C, int64_t S, int rms,
                                const float* w, const float* b, double eps, double* mean, double* rstd,
                                const bn_epilogue* ep, int nt)
    int bn_row_backward_epi_f32(const float* dz, const float* x, float* dx, float* dres, int64_t N, int64_t C,
                                int64_t S, int rms, const double* mean, const double* rstd, const double* w,
                                const double* b, double* gw, double* gb, const bn_epilogue* ep, int nt)
    int bn_row_backward_epi_f64(const double* dz, const double* x, double* dx, double* dres, int64_t N, int64_t C,
                                int64_t S, int rms, const double* mean, const double* rstd, const double* w,
                                const double* b, double* gw, double* gb, const bn_epilogue* ep, int nt)
    int bn_row_backward_epi_f16(const uint16_t* dz, const uint16_t* x, uint16_t* dx, uint16_t* dres, int64_t N,
                                int64_t C, int64_t S, int rms, const double* mean, const double* rstd,
                                const double* w, const double* b, double* gw, double* gb, const bn_epilogue* ep,
                                int nt)
    int bn_row_backward_epi_bf16(const uint16_t* dz, const uint16_t* x, uint16_t* dx, uint16_t* dres, int64_t N,
                                 int64_t C, int64_t S, int rms, const double* mean, const double* rstd,
                                 const double* w, const double* b, double* gw, double* gb, const bn_epilogue* ep,
                                 int nt)


cdef int k_group_forward_epi(int dt, const void* x, void* y, Groups* g, int64_t G, const double* w, const double* b,
                             double eps, double* mean, double* var, const bn_epilogue* ep, int nt) except -1:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_group_forward_epi_f32(<const float*>x, <float*>y, g.N, g.C, g.S, G, g.cl, w, b, eps, mean, var,
                                          ep, nt)
        elif dt == DT_F64:
            st = bn_group_forward_epi_f64(<const double*>x, <double*>y, g.N, g.C, g.S, G, g.cl, w, b, eps, mean, var,
                                          ep, nt)
        elif dt == DT_F16:
            st = bn_group_forward_epi_f16(<const uint16_t*>x, <uint16_t*>y, g.N, g.C, g.S, G, g.cl, w, b, eps, mean,
                                          var, ep, nt)
        elif dt == DT_BF16:
            st = bn_group_forward_epi_bf16(<const uint16_t*>x, <uint16_t*>y, g.N, g.C, g.S, G, g.cl, w, b, eps, mean,
                                           var, ep, nt)
    return _check(st)


cdef int k_group_backward_epi(int dt, const void* dz, const void* x, void* dx, void* dres, Groups* g, int64_t G,
                              const double* mean, const double* var, double eps, const double* w, const double* b,
                              double* gw, double* gb, const bn_epilogue* ep, int nt) except -1:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_group_backward_epi_f32(<const float*>dz, <const float*>x, <float*>dx, <float*>dres, g.N, g.C,
                                           g.S, G, g.cl, mean, var, eps, w, b, gw, gb, ep, nt)
        elif dt == DT_F64:
            st = bn_group_backward_epi_f64(<const double*>dz, <const double*>x, <double*>dx, <double*>dres, g.N,
                                           g.C, g.S, G, g.cl, mean, var, eps, w, b, gw, gb, ep, nt)
        elif dt == DT_F16:
            st = bn_group_backward_epi_f16(<const uint16_t*>dz, <const uint16_t*>x, <uint16_t*>dx, <uint16_t*>dres,
                                           g.N, g.C, g.S, G, g.cl, mean, var, eps, w, b, gw, gb, ep, nt)
        elif dt == DT_BF16:
            st = bn_group_backward_epi_bf16(<const uint16_t*>dz, <const uint16_t*>x, <uint16_t*>dx, <uint16_t*>dres,
                                            g.N, g.C, g.S, G, g.cl, mean, var, eps, w, b, gw, gb, ep, nt)
    return _check(st)


cdef int k_row_forward_epi(int dt, const void* x, void* y, Rows* r, int rms, const void* w, const void* b, double eps,
                           double* mean, double* rstd, const bn_epilogue* ep, int nt) except -1:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_row_forward_epi_f32(<const float*>x, <float*>y, r.N, r.C, r.S, rms, <const float*>w,
                                        <const float*>b, eps, mean, rstd, ep, nt)
        elif dt == DT_F64:
            st = bn_row_forward_epi_f64(<const double*>x, <double*>y, r.N, r.C, r.S, rms, <const double*>w,
                                        <const double*>b, eps, mean, rstd, ep, nt)
        elif dt == DT_F16:
            st = bn_row_forward_epi_f16(<const uint16_t*>x, <uint16_t*>y, r.N, r.C, r.S, rms, <const float*>w,
                                        <const float*>b, eps, mean, rstd, ep, nt)
        elif dt == DT_BF16:
            st = bn_row_forward_epi_bf16(<const uint16_t*>x, <uint16_t*>y, r.N, r.C, r.S, rms, <const float*>w,
                                         <const float*>b, eps, mean, rstd, ep, nt)
    return _check(st)


cdef int k_row_backward_epi(int dt, const void* dz, const void* x, void* dx, void* dres, Rows* r, int rms,
                            const double* mean, const double* rstd, const double* w, const double* b, double* gw,
                            double* gb, const bn_epilogue* ep, int nt) except -1:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_row_backward_epi_f32(<const float*>dz, <const float*>x, <float*>dx, <float*>dres, r.N, r.C, r.S,
                                         rms, mean, rstd, w, b, gw, gb, ep, nt)
        elif dt == DT_F64:
            st = bn_row_backward_epi_f64(<const double*>dz, <const double*>x, <double*>dx, <double*>dres, r.N, r.C,
                                         r.S, rms, mean, rstd, w, b, gw, gb, ep, nt)
        elif dt == DT_F16:
            st = bn_row_backward_epi_f16(<const uint16_t*>dz, <const uint16_t*>x, <uint16_t*>dx, <uint16_t*>dres,
                                         r.N, r.C, r.S, rms, mean, rstd, w, b, gw, gb, ep, nt)
        elif dt == DT_BF16:
            st = bn_row_backward_epi_bf16(<const uint16_t*>dz, <const uint16_t*>x, <uint16_t*>dx, <uint16_t*>dres,
                                          r.N, r.C, r.S, rms, mean, rstd, w, b, gw, gb, ep, nt)
    return _check(st)


def group_forward_epi(x, num_groups, weight, bias, eps, layout, out, tuple act, residual, int nthreads,
                      bint instance, bint saved64=False):
    """groups.group_norm_forward / instance_norm_forward with a fused epilogue: (y, mean, invstd, (mean64, var64)),
    the first two (N, G) in x's dtype (float32 for 16-bit x), the pair the float64 statistics (N, G) the normalise
    used. saved64: (y, mean64, var64) alone (the layers)."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef Groups g
    what = "instance_norm_forward" if instance else "group_norm_forward"
    A.group_view(xa, lay, 3 if instance else 2, what, &g)
    cdef int64_t C = g.C, G = C if instance else A.num_groups(num_groups, g.C), NG = g.N * G
    w = A.channel(weight, "weight", C, False)
    b = A.channel(bias, "bias", C, False)
    cdef double e = A.eps(eps)
    if instance:
        A.spatial_size(g.S, xa)
    else:
        A.group_values(g.N * (C // G) * g.S, xa)
    ra = epi_residual(residual, xa)
    cdef cnp.ndarray ya = A.output(out, xa, None)
    cdef bn_epilogue ep
    epi_fill(act, ra, ya, "out", &ep, residual)
    mean, var = group_forward_run(xa, ya, &g, G, w, b, e, nthreads, &ep)
    shape = (g.N, G)
    if saved64:
        return ya, mean.reshape(shape), var.reshape(shape)
    stats = (mean.reshape(shape), var.copy().reshape(shape))
    return (ya,) + saved_stats(mean, var, e, xa, g.N, G) + (stats,)


def group_backward_epi(grad_out, x, mean, var, eps, num_groups, weight, bias, layout, out, tuple act, residual,
                       int nthreads, bint instance, grad_residual_out=None):
    """Gradients of z = act(group_norm(x) + residual) (instance: one channel per group): (grad_x, grad_weight,
    grad_bias, grad_residual or None). mean, var: the forward's float64 statistics (N, G), eps and bias its own."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef Groups g
    A.group_view(xa, lay, 3 if instance else 2, "instance_norm_backward" if instance else "group_norm_backward", &g)
    cdef int64_t C = g.C, N = g.N
    cdef int64_t G = C if instance else A.num_groups(num_groups, C), NG = N * G
    what = "N by C" if instance else "N by num_groups"
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(2 * NG + 4 * C, stack)
    cdef double* gw = p + 2 * NG + 2 * C
    cdef double* gb = gw + C
    cdef double e
    cdef bn_epilogue ep
    try:
        A.group_stat(mean, "save_stats[0] (mean)", N, G, what, p)
        A.group_stat(var, "save_stats[1] (var)", N, G, what, p + NG)
        ga = A.like(grad_out, "grad_out", xa)
        w = A.channel(weight, "weight", C, False)
        b = A.channel(bias, "bias", C, False)
        e = A.eps(eps)
        ra = epi_residual(residual, xa)
        dx = A.output(out, xa, ga)
        dr = epi_dres(grad_residual_out, ra, xa, ga, dx, (grad_out, x, residual))
        epi_fill(act, ra, dx, "out", &ep, residual)
        memset(gw, 0, 2 * C * sizeof(double))
        if C:
            k_group_backward_epi(g.dtype, data_or_null(ga), data_or_null(xa), data_or_null(dx),
                                 data_or_null(dr) if dr is not None else NULL, &g, G, p if N else NULL,
                                 p + NG if N else NULL, e, load_opt(w, C, p + 2 * NG), load_opt(b, C, p + 2 * NG + C),
                                 gw, gb, &ep, nthreads)
        like = w if w is not None else stats_like(xa)
        return dx, vector_as(C, gw, like), vector_as(C, gb, like), dr
    finally:
        release(p, stack)


def row_forward_epi(x, normalized_shape, weight, bias, eps, layout, out, int nthreads, bint rms, tuple act, residual,
                    int result=1):
    """rownorm.layer_norm_forward / rms_norm_forward with a fused epilogue. result 1: (y, mean, rstd, (mean64,
    rstd64)) (RMS: (y, rstd, (rstd64,))), the saved statistics in x's dtype and the float64 ones the normalise used,
    all shaped as PyTorch's statistics; 2: (y, mean64, rstd64) as flat float64 arrays (mean None for RMS)."""
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef Rows r
    A.rows_view(xa, normalized_shape, layout, &r)
    w = A.row_param(weight, "weight", xa, &r)
    b = None if rms else A.row_param(bias, "bias", xa, &r)
    cdef double e
    if rms and eps is None:
        e = DBL_EPSILON if r.dtype == DT_F64 else FLT_EPSILON
    else:
        e = A.eps(eps)
    ra = epi_residual(residual, xa)
    cdef cnp.ndarray ya = A.output(out, xa, None)
    cdef bn_epilogue ep
    epi_fill(act, ra, ya, "out", &ep, residual)
    cdef int64_t C = r.C, NS = r.N * r.S
    cdef cnp.ndarray s64 = A.new_vector(NS, cnp.NPY_FLOAT64)
    cdef cnp.ndarray m64 = None if rms else A.new_vector(NS, cnp.NPY_FLOAT64)
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(tc_scratch(w, b, r.dtype, C, ya), stack)
    cdef const void* wp
    cdef const void* bp
    try:
        if r.N * r.C * r.S or NS:
            wp = param_tc(w, r.dtype, C, p, p + 2 * C, ya)
            bp = param_tc(b, r.dtype, C, p, p + 3 * C, ya)
            k_row_forward_epi(r.dtype, data_or_null(xa), data_or_null(ya), &r, rms, wp, bp, e,
                              NULL if rms else <double*>data_of(m64), <double*>data_of(s64), &ep, nthreads)
    finally:
        release(p, stack)
    if result == 2:
        return ya, m64, s64
    shape = A.stat_shape(xa, &r)
    if rms:
        return ya, stat_as(NS, <double*>data_of(s64), xa, &r), (s64.reshape(shape),)
    return (ya, stat_as(NS, <double*>data_of(m64), xa, &r), stat_as(NS, <double*>data_of(s64), xa, &r),
            (m64.reshape(shape), s64.reshape(shape)))


def row_backward_epi(grad_out, x, mean, rstd, normalized_shape, weight, bias, layout, out, int nthreads, bint rms,
                     tuple act, residual, grad_residual_out=None):
    """Gradients of z = act(layer_norm(x) + residual) (rms: RMS norm): (grad_x, grad_weight, grad_bias,
    grad_residual or None) (RMS: (grad_x, grad_weight, grad_residual or None)). mean, rstd: the forward's float64
    statistics; weight and bias its own."""
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef Rows r
    A.rows_view(xa, normalized_shape, layout, &r)
    cdef cnp.ndarray ga = A.like(grad_out, "grad_out", xa)
    w = A.row_param(weight, "weight", xa, &r)
    b = None if rms else A.row_param(bias, "bias", xa, &r)
    cdef int64_t C = r.C, NS = r.N * r.S
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(2 * NS + 4 * C, stack)
    cdef double* gw = p + 2 * NS + 2 * C
    cdef double* gb = gw + C
    cdef bn_epilogue ep
    try:
        if not rms:
            A.row_stat(mean, "save_stats[0] (mean)", xa, &r, p)
        A.row_stat(rstd, "save_stats[1] (rstd)" if not rms else "save_stats[0] (rstd)", xa, &r, p + NS)
        ra = epi_residual(residual, xa)
        dx = A.output(out, xa, ga)
        dr = epi_dres(grad_residual_out, ra, xa, ga, dx, (grad_out, x, residual))
        epi_fill(act, ra, dx, "out", &ep, residual)
        k_row_backward_epi(r.dtype, data_or_null(ga), data_or_null(xa), data_or_null(dx),
                           data_or_null(dr) if dr is not None else NULL, &r, rms, NULL if rms or not NS else p,
                           p + NS if NS else NULL, load_opt(w, C, p + 2 * NS), load_opt(b, C, p + 2 * NS + C), gw, gb,
                           &ep, nthreads)
        gwa = None if w is None else vector_as(C, gw, w)
        if w is not None and w is not weight:
            gwa = gwa.reshape(np.shape(weight))
        if rms:
            return dx, gwa, dr
        gba = None if b is None else vector_as(C, gb, b)
        if b is not None and b is not bias:
            gba = gba.reshape(np.shape(bias))
        return dx, gwa, gba, dr
    finally:
        release(p, stack)
