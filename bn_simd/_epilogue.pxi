# Fused epilogues (include/bn_simd_epilogue.h): z = act(norm(x) + residual) in the normalise sweep. Included by
# _core.pyx, whose helpers and kernels it uses. The activation arrives parsed (bn_simd/_epilogue.py: a tuple
# (code, lo, hi, slope)); the residual is checked here: x's shape and dtype (copied to C order when it is not), and it
# may not overlap the output.

from bn_simd import _epilogue as _epi_py  # (the refusal of grad_residual_out without a residual)

cdef extern from "bn_simd.h" nogil:
    ctypedef struct bn_epilogue:
        int act
        double lo
        double hi
        double slope
        const void* residual
    int bn_normalize_epi_f32(const float* x, float* y, int64_t outer, int64_t C, int64_t inner, const double* mean,
                             const double* var, const double* weight, const double* bias, double eps,
                             const bn_epilogue* ep, int nt)
    int bn_normalize_epi_f64(const double* x, double* y, int64_t outer, int64_t C, int64_t inner, const double* mean,
                             const double* var, const double* weight, const double* bias, double eps,
                             const bn_epilogue* ep, int nt)
    int bn_normalize_epi_f16(const uint16_t* x, uint16_t* y, int64_t outer, int64_t C, int64_t inner,
                             const double* mean, const double* var, const double* weight, const double* bias,
                             double eps, const bn_epilogue* ep, int nt)
    int bn_normalize_epi_bf16(const uint16_t* x, uint16_t* y, int64_t outer, int64_t C, int64_t inner,
                              const double* mean, const double* var, const double* weight, const double* bias,
                              double eps, const bn_epilogue* ep, int nt)
    int bn_forward_train_epi_f32(const float* x, float* y, int64_t outer, int64_t C, int64_t inner, const double* w,
                                 const double* b, double eps, double* mean, double* var, const bn_epilogue* ep, int nt)
    int bn_forward_train_epi_f64(const double* x, double* y, int64_t outer, int64_t C, int64_t inner,
                                 const double* w, const double* b, double eps, double* mean, double* var,
                                 const bn_epilogue* ep, int nt)
    int bn_forward_train_epi_f16(const uint16_t* x, uint16_t* y, int64_t outer, int64_t C, int64_t inner,
                                 const double* w, const double* b, double eps, double* mean, double* var,
                                 const bn_epilogue* ep, int nt)
    int bn_forward_train_epi_bf16(const uint16_t* x, uint16_t* y, int64_t outer, int64_t C, int64_t inner,
                                  const double* w, const double* b, double eps, double* mean, double* var,
                                  const bn_epilogue* ep, int nt)
    int bn_backward_epi_f32(const float* dz, const float* x, float* dx, float* dres, int64_t outer, int64_t C,
                            int64_t inner, const double* mean, const double* var, double eps, const double* w,
                            const double* b, int training, double* gw, double* gb, const bn_epilogue* ep, int nt)
    int bn_backward_epi_f64(const double* dz, const double* x, double* dx, double* dres, int64_t outer, int64_t C,
                            int64_t inner, const double* mean, const double* var, double eps, const double* w,
                            const double* b, int training, double* gw, double* gb, const bn_epilogue* ep, int nt)
    int bn_backward_epi_f16(const uint16_t* dz, const uint16_t* x, uint16_t* dx, uint16_t* dres, int64_t outer,
                            int64_t C, int64_t inner, const double* mean, const double* var, double eps,
                            const double* w, const double* b, int training, double* gw, double* gb,
                            const bn_epilogue* ep, int nt)
    int bn_backward_epi_bf16(const uint16_t* dz, const uint16_t* x, uint16_t* dx, uint16_t* dres, int64_t outer,
                             int64_t C, int64_t inner, const double* mean, const double* var, double eps,
                             const double* w, const double* b, int training, double* gw, double* gb,
                             const bn_epilogue* ep, int nt)


cdef int k_normalize_epi(int dt, const void* x, void* y, int64_t o, int64_t C, int64_t i, const double* mean,
                         const double* var, const double* w, const double* b, double eps, const bn_epilogue* ep,
                         int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_normalize_epi_f32(<const float*>x, <float*>y, o, C, i, mean, var, w, b, eps, ep, nt)
        elif dt == DT_F64:
            st = bn_normalize_epi_f64(<const double*>x, <double*>y, o, C, i, mean, var, w, b, eps, ep, nt)
        elif dt == DT_F16:
            st = bn_normalize_epi_f16(<const uint16_t*>x, <uint16_t*>y, o, C, i, mean, var, w, b, eps, ep, nt)
        elif dt == DT_BF16:
            st = bn_normalize_epi_bf16(<const uint16_t*>x, <uint16_t*>y, o, C, i, mean, var, w, b, eps, ep, nt)
    return st


cdef int k_forward_train_epi(int dt, const void* x, void* y, int64_t o, int64_t C, int64_t i, const double* w,
                             const double* b, double eps, double* mean, double* var, const bn_epilogue* ep,
                             int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_forward_train_epi_f32(<const float*>x, <float*>y, o, C, i, w, b, eps, mean, var, ep, nt)
        elif dt == DT_F64:
            st = bn_forward_train_epi_f64(<const double*>x, <double*>y, o, C, i, w, b, eps, mean, var, ep, nt)
        elif dt == DT_F16:
            st = bn_forward_train_epi_f16(<const uint16_t*>x, <uint16_t*>y, o, C, i, w, b, eps, mean, var, ep, nt)
        elif dt == DT_BF16:
            st = bn_forward_train_epi_bf16(<const uint16_t*>x, <uint16_t*>y, o, C, i, w, b, eps, mean, var, ep, nt)
    return st


cdef int k_backward_epi(int dt, const void* dz, const void* x, void* dx, void* dres, int64_t o, int64_t C, int64_t i,
                        const double* mean, const double* var, double eps, const double* w, const double* b,
                        int training, double* gw, double* gb, const bn_epilogue* ep, int nt) noexcept:
    cdef int st = BN_EINVAL
    with nogil:
        if dt == DT_F32:
            st = bn_backward_epi_f32(<const float*>dz, <const float*>x, <float*>dx, <float*>dres, o, C, i, mean, var,
                                     eps, w, b, training, gw, gb, ep, nt)
        elif dt == DT_F64:
            st = bn_backward_epi_f64(<const double*>dz, <const double*>x, <double*>dx, <double*>dres, o, C, i, mean,
                                     var, eps, w, b, training, gw, gb, ep, nt)
        elif dt == DT_F16:
            st = bn_backward_epi_f16(<const uint16_t*>dz, <const uint16_t*>x, <uint16_t*>dx, <uint16_t*>dres, o, C,
                                     i, mean, var, eps, w, b, training, gw, gb, ep, nt)
        elif dt == DT_BF16:
            st = bn_backward_epi_bf16(<const uint16_t*>dz, <const uint16_t*>x, <uint16_t*>dx, <uint16_t*>dres, o, C,
                                      i, mean, var, eps, w, b, training, gw, gb, ep, nt)
    return st


cdef inline bint _overlap(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef char* pa = <char*>cnp.PyArray_DATA(a)
    cdef char* pb = <char*>cnp.PyArray_DATA(b)
    return cnp.PyArray_NBYTES(a) > 0 and cnp.PyArray_NBYTES(b) > 0 and not (
        pa + cnp.PyArray_NBYTES(a) <= pb or pb + cnp.PyArray_NBYTES(b) <= pa)


cdef object epi_residual(object residual, cnp.ndarray xa):
    """The residual as a C-contiguous array of x's shape and dtype (ValueError / TypeError naming it), or None."""
    if residual is None:
        return None
    return A.like(residual, "residual", xa)


cdef object epi_dres(object dres_out, object ra, cnp.ndarray xa, cnp.ndarray ga, object dx, tuple given):
    """The residual's gradient's array: None without a residual (grad_residual_out must then be None), else new like x
    or grad_residual_out checked (x's shape and dtype, C-contiguous, aligned, writeable, sharing no byte with
    grad_out, x, the residual or grad_x's array dx: the arrays the kernel reads and the caller's own, given = (grad_out,
    x, residual) as passed, which the kernel's may be copies of; a caller's array keeps its values)."""
    if ra is None:
        _epi_py.no_grad_residual_out(dres_out)
        return None
    o = A.output_apart(dres_out, "grad_residual_out", xa,
                       (("grad_out", ga), ("x", xa), ("residual", ra),
                        ("out", dx if isinstance(dx, np.ndarray) else None)))
    if dres_out is not None:
        for name, a, used in zip(("grad_out", "x", "residual"), given, (ga, xa, ra)):
            if a is not used and _caller_shares(a, name, o):
                raise ValueError(f"grad_residual_out must not share memory with {name} (pass a separate array)")
    return o


_TOO_HARD = getattr(getattr(np, "exceptions", np), "TooHardError")  # (NumPy 1.25 moved it to np.exceptions)


cdef bint _caller_shares(object given, str name, cnp.ndarray a) except -1:
    """Whether the caller's argument `given` (an ndarray, or a tensor or array-like viewed as the checks view it,
    without a copy where its memory allows) shares memory with a: the kernel may read a copy of it, which a's
    check alone would not see."""
    if given is None:
        return False
    g = A._to_ndarray(given, name)
    try:
        return bool(np.shares_memory(g, a, max_work=1 << 16))
    except _TOO_HARD:  # (strides the exact test gives up on: the bounds decide)
        return bool(np.may_share_memory(g, a))


cdef int epi_fill(tuple act, object ra, cnp.ndarray ya, str out_name, bn_epilogue* ep, object given) except -1:
    """ep from the parsed activation and the checked residual ra (None or an array), whose memory may not overlap the
    output ya; nor may the caller's residual `given` where ra is a copy of it (a strided view of out's memory, which
    the call would overwrite and a backward read again)."""
    ep.act = <int>act[0]
    ep.lo = <double>act[1]
    ep.hi = <double>act[2]
    ep.slope = <double>act[3]
    # (float32, float16 and bfloat16 data are computed in float: a slope beyond its range would be inf there, and
    # inf * 0 a NaN gradient; PyTorch refuses such a slope for float32 too)
    if cnp.PyArray_TYPE(ya) != cnp.NPY_FLOAT64 and not -FLT_MAX <= ep.slope <= FLT_MAX:
        raise ValueError(f"activation: leaky_relu's slope {ep.slope!r} is beyond float32's range, which "
                         f"{ya.dtype} data are computed in")
    ep.residual = NULL
    if ra is not None:
        if _overlap(<cnp.ndarray>ra, ya):
            if cnp.PyArray_DATA(<cnp.ndarray>ra) == cnp.PyArray_DATA(ya):
                raise ValueError(f"residual must not share memory with {out_name} (pass a copy)")
            raise ValueError(f"{out_name} overlaps residual partially: residual must not share memory with "
                             f"{out_name}")
        if given is not ra and _caller_shares(given, "residual", ya):
            raise ValueError(f"residual must not share memory with {out_name} (pass a copy)")
        ep.residual = data_or_null(<cnp.ndarray>ra)
    return 0


def batch_norm_epi(x, running_mean, running_var, weight, bias, training, momentum, eps, layout, out, unbiased,
                   tuple act, residual, int nthreads, bint saved=False):
    """functional.batch_norm with a fused epilogue (act: bn_simd/_epilogue.py's tuple; residual: an array like x, or
    None). saved: (y, mean, invstd, var), float64 (C,), the statistics the call normalised with, for a layer's
    backward (which recomputes the forward's coefficients from mean and var)."""
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
    cdef double e = A.eps(eps), mom = A.momentum_if(momentum, tr and rm is not None)
    if tr:
        A.train_size(n, xa)
    elif rm is None:
        raise ValueError("running_mean and running_var are required when training=False")
    ra = epi_residual(residual, xa)
    cdef cnp.ndarray ya = A.output(out, xa, None)
    cdef bn_epilogue ep
    epi_fill(act, ra, ya, "out", &ep, residual)
    cdef bint update = tr and rm is not None and n > 0, unb = False
    if update:
        unb = unbiased
        if out is not None:
            A.out_apart(ya, (("running_mean", rm), ("running_var", rv)))  # (apart: together)
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(6 * C, stack)
    cdef double* mean = p
    cdef double* var = p + C
    cdef double* wp
    cdef double* bp
    try:
        wp = load_opt(w, C, p + 2 * C)
        bp = load_opt(b, C, p + 3 * C)
        if tr:
            if n * C == 0:
                for c in range(C):
                    mean[c] = NAN
                    var[c] = NAN
            else:
                _check(k_forward_train_epi(v.dtype, data_of(xa), data_of(ya), v.outer, C, v.inner, wp, bp, e, mean,
                                           var, &ep, nthreads))
            if update:
                update_stats(rm, rv, C, mean, var, <double>n, mom, unb, p + 4 * C)
        else:
            A.load(rm, C, mean)
            A.load(rv, C, var)
            if v.outer * C * v.inner:
                _check(k_normalize_epi(v.dtype, data_of(xa), data_of(ya), v.outer, C, v.inner, mean, var, wp, bp, e,
                                       &ep, nthreads))
        if not saved:
            return ya
        var_out = f64_vector(C, var)
        invstd_of(C, var, e)
        return ya, f64_vector(C, mean), f64_vector(C, var), var_out
    finally:
        release(p, stack)


def batch_norm_forward_epi(x, weight, bias, eps, layout, out, tuple act, residual, int nthreads):
    """functional.batch_norm_forward with a fused epilogue: (y, mean, invstd, (mean64, var64)), the first statistics
    in x's dtype (float32 for 16-bit x), the pair float64: the forward's own, which the backward needs."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef View v
    A.view(xa, lay, "x", &v)
    cdef int64_t C = v.C, n = v.outer * v.inner, c
    w = A.channel(weight, "weight", C, False)
    b = A.channel(bias, "bias", C, False)
    cdef double e = A.eps(eps)
    A.train_size(n, xa)
    ra = epi_residual(residual, xa)
    cdef cnp.ndarray ya = A.output(out, xa, None)
    cdef bn_epilogue ep
    epi_fill(act, ra, ya, "out", &ep, residual)
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(4 * C, stack)
    cdef double* mean = p
    cdef double* var = p + C
    cdef double* wp
    cdef double* bp
    try:
        wp = load_opt(w, C, p + 2 * C)
        bp = load_opt(b, C, p + 3 * C)
        if n * C == 0:
            for c in range(C):
                mean[c] = NAN
                var[c] = NAN
        else:
            _check(k_forward_train_epi(v.dtype, data_of(xa), data_of(ya), v.outer, C, v.inner, wp, bp, e, mean, var,
                                       &ep, nthreads))
        stats = (f64_vector(C, mean), f64_vector(C, var))
        invstd_of(C, var, e)
        return ya, vector_as(C, mean, stats_like(xa)), vector_as(C, var, stats_like(xa)), stats
    finally:
        release(p, stack)


def batch_norm_backward_epi(grad_out, x, mean, var, eps, weight, bias, layout, out, training, tuple act, residual,
                            int nthreads, grad_residual_out=None):
    """Gradients of z = act(batch_norm(x) + residual): (grad_x, grad_weight, grad_bias, grad_residual or None). mean,
    var: the float64 statistics the forward normalised with (the batch's biased variance, or the running ones), eps and
    bias its own: the forward's coefficients are recomputed from them, bit for bit."""
    cdef int lay = A.layout_code(layout)
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef View v
    A.view(xa, lay, "x", &v)
    cdef int64_t C = v.C, n = v.outer * v.inner
    cdef cnp.ndarray ga = A.like(grad_out, "grad_out", xa)
    m = A.required_channel(mean, "save_stats[0] (mean)", C)
    s = A.required_channel(var, "save_stats[1] (var)", C)
    w = A.channel(weight, "weight", C, False)
    bb = A.channel(bias, "bias", C, False)
    cdef double e = A.eps(eps)
    ra = epi_residual(residual, xa)
    cdef cnp.ndarray dx = A.output(out, xa, ga)
    dr = epi_dres(grad_residual_out, ra, xa, ga, dx, (grad_out, x, residual))
    cdef bn_epilogue ep
    epi_fill(act, ra, dx, "out", &ep, residual)
    cdef bint tr = training
    cdef double stack[STACK_DOUBLES]
    cdef double* p = scratch(6 * C, stack)
    cdef double* gw = p + 4 * C
    cdef double* gb = p + 5 * C
    cdef double* wp
    cdef double* bp
    try:
        A.load(m, C, p)
        A.load(s, C, p + C)
        wp = load_opt(w, C, p + 2 * C)
        bp = load_opt(bb, C, p + 3 * C)
        memset(gw, 0, 2 * C * sizeof(double))
        if n * C:
            _check(k_backward_epi(v.dtype, data_of(ga), data_of(xa), data_of(dx),
                                  data_of(dr) if dr is not None else NULL, v.outer, C, v.inner, p, p + C, e, wp, bp,
                                  tr, gw, gb, &ep, nthreads))
        like = w if w is not None else stats_like(xa)
        return dx, vector_as(C, gw, like), vector_as(C, gb, like), dr
    finally:
        release(p, stack)


def epilogue_residual_grad(grad_out, x, residual, grad_residual_out, out):
    """The residual's gradient without an activation, a copy of grad_out, checked before anything is written:
    (ga, dr), grad_out as the kernels read it and the array to copy it into (new, or grad_residual_out checked
    against grad_out, x, the residual and out, grad_x's array when it is one)."""
    cdef cnp.ndarray xa = A.data(x, "x", True)
    cdef cnp.ndarray ga = A.like(grad_out, "grad_out", xa)
    return ga, epi_dres(grad_residual_out, epi_residual(residual, xa), xa, ga, out, (grad_out, x, residual))

