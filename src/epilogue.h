/*
 * How the element-wise kernels of ukernels.inc finish an output. Two families: forward (FWD: seg_affine, cl_affine)
 * and backward (BWD: seg_bwd_apply, cl_bwd_apply). An output of either is, in this order, each step written once here:
 *   1. the family's formula, computed in TC:
 *        FWD   y  = (x - m) a + b               UK_AFFINE_V (vectors), UK_AFFINE_S (single elements)
 *        BWD   dx = a dy + b (x - m) + d        UK_DX_V, UK_DX_S
 *   2. the family's epilogue (UK_FWD_EPI_V, ...), which makes it the value to store;
 *   3. the storage type's narrowing store (io_<dtype>.h): whole, streamed, the first n lanes, or one element.
 * The kernels only choose which elements go which way (their loads, head / body / tail / straddle paths, column strips,
 * interleaved coefficients), compute 1 and store through UK_PUT*, which applies 2 and 3: no kernel stores otherwise.
 * Macros over the instantiation's vocabulary (expanded where ukernels.inc uses them), so included once per file. They
 * are macros rather than inline functions so that the machine code is what the kernels had with the formulas written
 * out: even an identity function changed the register allocation of some AVX2 loops (GCC 12).
 */
#ifndef BN_EPILOGUE_H
#define BN_EPILOGUE_H

/* The formulas, each written once over a vocabulary (SUB, FMA): (VSUB, VFMA) for vectors of VL, (UK_SSUB, SFMA) for
 * single elements. FMA rounds a * b + c once where the ISA fuses and twice where not (the scalar kernels), as
 * kernels.def's fma flag says; vectors and single elements of one ISA round alike. */
#define UK_SSUB(a, b) ((a) - (b))
#define UK_AFFINE_OF(SUB, FMA, x, m, a, b) FMA(SUB(x, m), a, b)
#define UK_DX_OF(SUB, FMA, dy, x, m, a, b, d) FMA(a, dy, FMA(b, SUB(x, m), d))
#define UK_AFFINE_V(x, m, a, b) UK_AFFINE_OF(VSUB, VFMA, x, m, a, b)
#define UK_AFFINE_S(x, m, a, b) UK_AFFINE_OF(UK_SSUB, SFMA, x, m, a, b)
#define UK_DX_V(dy, x, m, a, b, d) UK_DX_OF(VSUB, VFMA, dy, x, m, a, b, d)
#define UK_DX_S(dy, x, m, a, b, d) UK_DX_OF(UK_SSUB, SFMA, dy, x, m, a, b, d)
/* The rowcol family (rowcol.inc: layer norm, RMS norm), statistics and affine on different axes, in the same two
 * families FWD and BWD: y = ((x - m) r + c) w + b, dx = (dy w) a + (bb ((x - m) - e) + d), over (SUB, MUL, FMA):
 * (VSUB, VMUL, VFMA) or (UK_SSUB, UK_SMUL, SFMA). */
#define UK_SMUL(a, b) ((a) * (b))
#define UK_RC_AFFINE_OF(SUB, MUL, FMA, x, m, c, r, w, b) FMA(FMA(SUB(x, m), r, c), w, b)
#define UK_RC_DX_OF(SUB, MUL, FMA, dy, x, m, e, a, bb, d, w) FMA(MUL(dy, w), a, FMA(bb, SUB(SUB(x, m), e), d))

/* The epilogues, the one place where an output is finished: UK_<F>_EPI_V(v, p, n) is what to store of family F's
 * value v, a V of the elements at p of which the first n are stored (n == VL: all); UK_<F>_EPI_S(v, p) the same for one
 * element (a TC). The backward family's (BWD) and the activation gradient's (GRD, act_grad.inc) are the identity. The
 * forward family's is the one the including instantiation names with UK_FEPI_ACT (UK_ACT_NONE, UK_ACT_PWL,
 * UK_ACT_SILU) and UK_FEPI_RES (1: a residual is added first):
 *     z = act(v + r)
 * UK_FEPI_ACT = UK_FEPI_RES = 0 is the identity, the plain kernels' text. A fused instantiation has its operands in
 * ek, a by-value argument of its functions (UK_EK: lo, hi, slope in TC, and rd, the bytes from an output element to
 * its residual element: the residual has the output's layout, so one offset serves every element of the call). */
#define UK_FWD_EPI_V(v, p, n) UK_FEPI_V_(UK_FEPI_ACT, UK_FEPI_RES, v, p, n)
#define UK_FWD_EPI_S(v, p) UK_FEPI_S_(UK_FEPI_ACT, UK_FEPI_RES, v, p)
#define UK_BWD_EPI_V(v, p, n) (v)
#define UK_BWD_EPI_S(v, p) (v)
#define UK_GRD_EPI_V(v, p, n) (v)
#define UK_GRD_EPI_S(v, p) (v)

/* ---- Fused epilogues ----
 * Three kinds of activation, so that each kernel has few instantiations (compile time): the piecewise-linear one
 * (ReLU6; clamp: slope 1; leaky ReLU: lo -inf, hi inf; the identity, for a residual alone), ReLU on its own (the
 * piecewise-linear one's bits with lo 0, hi inf, slope 1, in one operation forward and one compare and a selection
 * backward instead of five and nine: docs/tuning.md, "ReLU apart from the piecewise-linear epilogue") and SiLU. The
 * activations, each as a vector form (V of TC) and a single-element form (TC) that run the same operations in the same order, so that an element's bits do not depend on whether a vector, a masked vector
 * or a scalar tail computed it (nor, then, on the thread count); SFMA fuses where VFMA does (kernels.def's fma flag). Their gradients for the
 * backward (act_grad.inc): du = dy act'(u).
 *   pwl    min(max(t, lo), hi), t = u < 0 ? slope u : u    du = u <= lo or !(u < hi) ? 0 : (u > 0 ? dy : slope dy),
 *                                                          lo = -inf and hi = +inf no bounds
 * (each step exact where it changes nothing: u 1 = u, max(-inf, t) = t, min(inf, t) = t, so ReLU, clamp and leaky ReLU
 * get the bits of their own formulas)
 *   relu   max(0, u) (= pwl's with lo 0, hi inf, slope 1, bit for bit)   du = u <= 0 ? 0 : dy (= pwl's)
 *   silu   u / (1 + exp(-u))                                                     du = dy s (1 + u (1 - s)),
 *                                                                                     s = 1 / (1 + exp(-u))
 * max and min keep a NaN u (the x86 rule a > b ? a : b with u second). The gradients are PyTorch's: relu's passes dy
 * where u is +Inf or NaN (threshold_backward: u <= 0 ? 0 : dy), leaky ReLU's is dy at +Inf and slope dy at -Inf and
 * NaN (u > 0 ? dy : slope dy), ReLU6's and a clamp's Hardtanh's (dy where lo < u < hi, so 0 at NaN, as its vectorized
 * backward gives); an unbounded side of a clamp has no kink (clamp(lo, None) is a shifted ReLU). */
#define UK_ACT_NONE 0
#define UK_ACT_PWL 1
#define UK_ACT_RELU 2
#define UK_ACT_SILU 3
#include <math.h>
#include <string.h>
#define UK_SMAX(a, b) ((a) > (b) ? (a) : (b))
#define UK_SMIN(a, b) ((a) < (b) ? (a) : (b))
#define UK_SSELNEG(c, a, b) ((c) < 0 ? (a) : (b))
/* ReLU's gradient: +0 where u <= 0, else dy (u NaN and +Inf included, as PyTorch's relu backward); the vector forms
 * are the ISAs' VGRELU. UK_SGKEEP (VGKEEP): g where !(u <= lo) (a NaN lo bounds nothing) and, unless hopen (no upper
 * bound), u < hi (a NaN u is then +0, as PyTorch's vectorized hardtanh backward gives), else +0. */
#define UK_SGRELU(u, dy) (!((u) <= 0) ? (dy) : 0)
#define UK_SGKEEP(u, lo, hi, hopen, g) (!((u) <= (lo)) && ((hopen) || (u) < (hi)) ? (g) : 0)
/* 2^n from k = UK_EXP_MAGIC + n (n in the exponent's normal range): n sits in k's low mantissa bits */
static inline float uk_pow2k_float(float k) {
    uint32_t u;
    memcpy(&u, &k, sizeof u);
    u = (u + 127u) << 23;
    memcpy(&k, &u, sizeof u);
    return k;
}
static inline double uk_pow2k_double(double k) {
    uint64_t u;
    memcpy(&u, &k, sizeof u);
    u = (u + 1023u) << 52;
    memcpy(&k, &u, sizeof u);
    return k;
}
#define UK_SADD(a, b) ((a) + (b))
#define UK_SDIV(a, b) ((a) / (b))
#define UK_SSET1(s) (s)

/* exp(t), the same operations as a vector and as one element: t clamped to [LO, HI]: at LO, e^t and 2^n are still
 * normal (below, SiLU's u / (1 + e^-u) is u either way); from HI's n on, 2^n is +Inf (the exponent field all ones), so
 * exp(+Inf) = +Inf and SiLU(-Inf) = -Inf / Inf = NaN, as the unfused composition gives (below that, from t ~ 88.4 in
 * float, it is +Inf a little early: SiLU's value there, of magnitude below 4e-37, becomes -0); n = t / ln 2 rounded to
 * nearest even by adding and subtracting UK_EXP_MAGIC (1.5 2^p), r = t - n ln 2 in two steps (n ln2_hi is exact:
 * ln2_hi has few bits), e^r by its Taylor polynomial (degree 7 for float, 13 for double: the first term left out is
 * below 0.1 ulp for |r| <= ln 2 / 2), times 2^n. */
#define UK_EXP_POLY_float(FMA, SET, r)                                                                   \
    FMA(FMA(FMA(FMA(FMA(FMA(FMA(SET(1.0f / 5040), r, SET(1.0f / 720)), r, SET(1.0f / 120)), r,            \
                        SET(1.0f / 24)), r, SET(1.0f / 6)), r, SET(0.5f)), r, SET(1.0f)), r, SET(1.0f))
#define UK_EXP_POLY_double(FMA, SET, r)                                                                  \
    FMA(FMA(FMA(FMA(FMA(FMA(FMA(FMA(FMA(FMA(FMA(FMA(FMA(SET(1.0 / 6227020800.0), r, SET(1.0 / 479001600.0)), r, \
    SET(1.0 / 39916800.0)), r, SET(1.0 / 3628800.0)), r, SET(1.0 / 362880.0)), r, SET(1.0 / 40320.0)), r,          \
    SET(1.0 / 5040.0)), r, SET(1.0 / 720.0)), r, SET(1.0 / 120.0)), r, SET(1.0 / 24.0)), r, SET(1.0 / 6.0)), r,    \
    SET(0.5)), r, SET(1.0)), r, SET(1.0))
#define UK_EXP_CONST_float(name) UK_EXPF_##name
#define UK_EXPF_LO (-87.0f)
#define UK_EXPF_HI 89.0f
#define UK_EXPF_MAGIC 12582912.0f /* 1.5 2^23 */
#define UK_EXPF_L2E 1.44269504088896341f
#define UK_EXPF_LN2HI 0.693359375f
#define UK_EXPF_LN2LO (-2.12194440e-4f)
#define UK_EXP_CONST_double(name) UK_EXPD_##name
#define UK_EXPD_LO (-708.0)
#define UK_EXPD_HI 710.0
#define UK_EXPD_MAGIC 6755399441055744.0 /* 1.5 2^52 */
#define UK_EXPD_L2E 1.44269504088896338700
#define UK_EXPD_LN2HI 6.93147180369123816490e-01 /* (32 significant bits) */
#define UK_EXPD_LN2LO 1.90821492927058770002e-10

/* The functions of one compute type T, vector (uk_v*_T, over V_T) and single-element (uk_s*_T) forms, from the
 * vocabulary: VT the vector type, FMA .. POW2K its operations. */
#define UK_EPI_FNS(PFX, T, VT, FMA, MUL, ADD, SUB, DIV, MAX, MIN, SELNEG, GRELU, GKEEP, SET, POW2K)                 \
    static inline __attribute__((always_inline)) VT uk_##PFX##exp_##T(VT t) {                                 \
        t = MIN(SET(UK_EXP_CONST_##T(HI)), MAX(SET(UK_EXP_CONST_##T(LO)), t));                                   \
        const VT k = ADD(MUL(t, SET(UK_EXP_CONST_##T(L2E))), SET(UK_EXP_CONST_##T(MAGIC)));                      \
        const VT n = SUB(k, SET(UK_EXP_CONST_##T(MAGIC)));                                                       \
        VT r = FMA(n, SET(-UK_EXP_CONST_##T(LN2HI)), t);                                                         \
        r = FMA(n, SET(-UK_EXP_CONST_##T(LN2LO)), r);                                                            \
        return MUL(UK_EXP_POLY_##T(FMA, SET, r), POW2K(k));                                                      \
    }                                                                                                            \
    static inline __attribute__((always_inline)) VT uk_##PFX##pwl_##T(VT u, T lo, T hi, T slope) {             \
        return MIN(SET(hi), MAX(SET(lo), SELNEG(u, MUL(u, SET(slope)), u)));                                     \
    }                                                                                                            \
    static inline __attribute__((always_inline)) VT uk_##PFX##relu_##T(VT u) { return MAX(SET((T)0), u); }    \
    static inline __attribute__((always_inline)) VT uk_##PFX##grelu_##T(VT u, VT dy) {                        \
        return GRELU(u, dy);                                                                                     \
    }                                                                                                            \
    static inline __attribute__((always_inline)) VT uk_##PFX##silu_##T(VT u) {                                 \
        return DIV(u, ADD(SET((T)1), uk_##PFX##exp_##T(SUB(SET((T)0), u))));                                     \
    }                                                                                                            \
    static inline __attribute__((always_inline)) VT uk_##PFX##gpwl_##T(VT u, VT dy, T lo, T hi, T slope) {     \
        const VT g = SELNEG(SUB(SET((T)0), u), dy, MUL(dy, SET(slope)));                                         \
        return GKEEP(u, SET(lo == -(T)INFINITY ? (T)NAN : lo), SET(hi), hi == (T)INFINITY, g);                  \
    }                                                                                                            \
    static inline __attribute__((always_inline)) VT uk_##PFX##gsilu_##T(VT u, VT dy) {                         \
        const VT s = DIV(SET((T)1), ADD(SET((T)1), uk_##PFX##exp_##T(SUB(SET((T)0), u))));                      \
        return MUL(dy, MUL(s, FMA(u, SUB(SET((T)1), s), SET((T)1))));                                            \
    }
UK_EPI_FNS(v, float, V_float, VFMA_float, VMUL_float, VADD_float, VSUB_float, VDIV_float, VMAX_float, VMIN_float,
           VSELNEG_float, VGRELU_float, VGKEEP_float, VSET1_float, VPOW2K_float)
UK_EPI_FNS(v, double, V_double, VFMA_double, VMUL_double, VADD_double, VSUB_double, VDIV_double, VMAX_double,
           VMIN_double, VSELNEG_double, VGRELU_double, VGKEEP_double, VSET1_double, VPOW2K_double)
UK_EPI_FNS(s, float, float, SFMA_float, UK_SMUL, UK_SADD, UK_SSUB, UK_SDIV, UK_SMAX, UK_SMIN, UK_SSELNEG, UK_SGRELU,
           UK_SGKEEP, UK_SSET1, uk_pow2k_float)
UK_EPI_FNS(s, double, double, SFMA_double, UK_SMUL, UK_SADD, UK_SSUB, UK_SDIV, UK_SMAX, UK_SMIN, UK_SSELNEG,
           UK_SGRELU, UK_SGKEEP, UK_SSET1, uk_pow2k_double)
#undef UK_EPI_FNS

/* An instantiation's operands (ek) */
typedef struct {
    float lo, hi, slope;
    intptr_t rd;
} uk_ek_float;
typedef struct {
    double lo, hi, slope;
    intptr_t rd;
} uk_ek_double;

/* the residual element(s) of the output at p: a whole vector, or its first n lanes (UK_RES_LOAD_N: ukernels.inc, per
 * instantiation, where the ISA has masked loads; n < VL is reached only there) */
#define UK_RES_AT(p) ((const TS*)((uintptr_t)(p) + (uintptr_t)ek.rd))
#define UK_RES_V(p, n) ((n) == VL ? VLOAD_TS(UK_RES_AT(p)) : UK_RES_LOAD_N(UK_RES_AT(p), n))
#define UK_RES_S(p) LOAD_TS(UK_RES_AT(p))
/* the activation of u, vector (_V) and single element (_S), in TC */
#define UK_TCF(pfx, name) UK_TCV(uk_##pfx##name, TC)
#define UK_ACTV_1(u) UK_TCF(v, pwl)(u, ek.lo, ek.hi, ek.slope)
#define UK_ACTV_2(u) UK_TCF(v, relu)(u)
#define UK_ACTV_3(u) UK_TCF(v, silu)(u)
#define UK_ACTS_1(u) UK_TCF(s, pwl)(u, ek.lo, ek.hi, ek.slope)
#define UK_ACTS_2(u) UK_TCF(s, relu)(u)
#define UK_ACTS_3(u) UK_TCF(s, silu)(u)
#define UK_GRADV_1(u, dy) UK_TCF(v, gpwl)(u, dy, ek.lo, ek.hi, ek.slope)
#define UK_GRADV_2(u, dy) UK_TCF(v, grelu)(u, dy)
#define UK_GRADV_3(u, dy) UK_TCF(v, gsilu)(u, dy)
#define UK_GRADS_1(u, dy) UK_TCF(s, gpwl)(u, dy, ek.lo, ek.hi, ek.slope)
#define UK_GRADS_2(u, dy) UK_TCF(s, grelu)(u, dy)
#define UK_GRADS_3(u, dy) UK_TCF(s, gsilu)(u, dy)
/* the gradient du = dy act'(u) of the instantiation's activation (UK_FEPI_ACT), vector and single element */
#define UK_GRAD_V(u, dy) UK_GRAD_V_(UK_FEPI_ACT, u, dy)
#define UK_GRAD_V_(A, u, dy) UK_GRAD_V__(A, u, dy)
#define UK_GRAD_V__(A, u, dy) UK_GRADV_##A(u, dy)
#define UK_GRAD_S(u, dy) UK_GRAD_S_(UK_FEPI_ACT, u, dy)
#define UK_GRAD_S_(A, u, dy) UK_GRAD_S__(A, u, dy)
#define UK_GRAD_S__(A, u, dy) UK_GRADS_##A(u, dy)
/* the forward epilogue of (act, res) */
#define UK_FEPI_V_(A, R, v, p, n) UK_FEPI_V__(A, R, v, p, n)
#define UK_FEPI_V__(A, R, v, p, n) UK_FEPI_V_##A##R(v, p, n)
#define UK_FEPI_S_(A, R, v, p) UK_FEPI_S__(A, R, v, p)
#define UK_FEPI_S__(A, R, v, p) UK_FEPI_S_##A##R(v, p)
#define UK_FEPI_V_00(v, p, n) (v)
#define UK_FEPI_S_00(v, p) (v)
#define UK_FEPI_V_10(v, p, n) UK_ACTV_1(v)
#define UK_FEPI_S_10(v, p) UK_ACTS_1(v)
#define UK_FEPI_V_11(v, p, n) UK_ACTV_1(VADD(v, UK_RES_V(p, n)))
#define UK_FEPI_S_11(v, p) UK_ACTS_1((v) + UK_RES_S(p))
#define UK_FEPI_V_20(v, p, n) UK_ACTV_2(v)
#define UK_FEPI_S_20(v, p) UK_ACTS_2(v)
#define UK_FEPI_V_21(v, p, n) UK_ACTV_2(VADD(v, UK_RES_V(p, n)))
#define UK_FEPI_S_21(v, p) UK_ACTS_2((v) + UK_RES_S(p))
#define UK_FEPI_V_30(v, p, n) UK_ACTV_3(v)
#define UK_FEPI_S_30(v, p) UK_ACTS_3(v)
#define UK_FEPI_V_31(v, p, n) UK_ACTV_3(VADD(v, UK_RES_V(p, n)))
#define UK_FEPI_S_31(v, p) UK_ACTS_3((v) + UK_RES_S(p))

/* Family F's (FWD, BWD) value v through its epilogue, stored at p: a whole vector, a streamed one (p aligned for
 * VSTREAM_TS), the first n lanes (ISAs with VSTORE_TS_N), one element. */
#define UK_PUT(F, p, v) VSTORE_TS(p, UK_##F##_EPI_V(v, p, VL))
#define UK_PUT_NT(F, p, v) VSTREAM_TS(p, UK_##F##_EPI_V(v, p, VL))
#define UK_PUT_N(F, p, v, n) VSTORE_TS_N(p, UK_##F##_EPI_V(v, p, n), n)
#define UK_PUT1(F, p, v) STORE_TS(p, UK_##F##_EPI_S(v, p))
/* UK_PUT of a value that is a TS value exactly (UK_VSTORE_EXACT: ukernels.inc) */
#define UK_PUT_EXACT(F, p, v) UK_VSTORE_EXACT(p, UK_##F##_EPI_V(v, p, VL))

#endif /* BN_EPILOGUE_H */
