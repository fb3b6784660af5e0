/*
 * Microkernels: the only ISA-specific code. Each works on one contiguous run of memory and never
 * allocates, threads or reads past its n / rows * C elements. The drivers in batchnorm.c do blocking,
 * threading and the combination of partial results; they reach the kernels through a table per ISA and dtype.
 * kernels.def lists every kernel once, by name (bn_<dtype>_<shape>__<isa>): this header declares them from it,
 * kernels.c builds the tables from it and tests/c/test_kernels.c tests each listed kernel against the scalar one.
 *
 * seg_*: channels-first, nseg consecutive runs (segments) of len elements, segment j of channel j
 *        (per-channel arrays indexed by j); the reductions take `rows` such runs, rs elements apart.
 * cl_* : channels-last, `rows` rows of C channels each (row stride C; per-channel arrays of C). The
 *        element-wise cl_ kernels take extended per-channel arrays: p[i] = p[i % C] for i < C + UK_MAX_VL.
 * Element-wise kernels take nt: UK_STORE (regular stores), UK_STREAM (streaming, non-temporal stores, fenced before
 * the kernel returns) or, channels-first only, UK_STREAM_NOFENCE (streaming stores that the caller fences, once after
 * many short calls, before the data is read by another thread: a fence waits for the stores to leave the core).
 * Reductions widen to double before they add: float32 sums neither drift over long runs nor overflow at
 * |x| ~ 1e38; the means they subtract (m) are double. Apply kernels compute in a compute type TC, which their
 * coefficient arrays hold, from data stored as TS (TS = TC for float and double; float16 and bfloat16 are stored as
 * uint16_t patterns and computed in float), and finish every
 * output through one epilogue per family (epilogue.h).
 */
#ifndef BN_UKERNELS_H
#define BN_UKERNELS_H

#include <math.h>
#include <stdint.h>

#include "bn_simd.h"

/* A chunk's M2 = s2 - s1^2 / n (v) from its sums s1, s2 of deviations, at least 0: +Inf where the squares of finite
 * deviations overflowed (s2 = +Inf with s1 finite; v is Inf - Inf = NaN when s1^2 overflowed too: the variance
 * beyond double's range, +Inf as PyTorch's), 0 where the data holds a NaN or an infinity (the mean carries it). A
 * selection only, exact under any ISA (s1 - s1 == 0: s1 finite, a form the bookkeeping loops vectorise); the
 * channels-first drivers (batchnorm.inc) and the channels-last chunk bookkeeping (ukernels.inc) share it. */
static inline double bn_m2_finish(double s2, double s1, double v) {
    return v > 0.0 ? v : s2 == INFINITY && s1 - s1 == 0.0 ? INFINITY : 0.0;
}

/* v, or the one NaN (+qNaN) where v is NaN. On x86 an addition of two NaNs returns the first source's, and which
 * operand is first is the compiler's choice (a vector loop adds the new term first, a scalar one the sum; a
 * parallel_for's sums, api.c, in yet another order), so NaNs of both signs among a sum's terms gave a NaN of either
 * sign by the split of the work. Combined means and variances (cl_combine, bn_moments_merge, cf_combine_block) and
 * parameter gradients (bwd_params, group norm's backward) pass through it (docs/design.md, "Determinism"). */
static inline double bn_nan_canon(double v) { return v != v ? NAN : v; }

/* bn_nan_canon over C parameter gradients of the weight and of the bias */
static inline void bn_nan_canon_grads(int64_t C, double* grad_weight, double* grad_bias) {
    for (int64_t c = 0; c < C; c++) {
        grad_weight[c] = bn_nan_canon(grad_weight[c]);
        grad_bias[c] = bn_nan_canon(grad_bias[c]);
    }
}

/* How far ahead of their loads the channels-first float32 reductions prefetch (bytes; ukernels.inc), and how far
 * past a chunk their callers let them (batchnorm.c, cf_pf_after). */
#define BN_SEG_PF_BYTES 8192

/* Store modes of the element-wise kernels (their nt argument) */
#define UK_STORE 0
#define UK_STREAM 1
#define UK_STREAM_NOFENCE 2
/* Regular stores, for rc_affine and rc_affine_dev alone: the weight and bias hold no NaN, so that a row of non-NaN
 * statistics (no NaN in x) may start its normalise at the weight's line boundary with the same bits (rowcol.inc,
 * rc_load_head) */
#define UK_STORE_PEEL 3

/* The widest vector of any kernel, in elements (AVX-512, float32). */
#define UK_MAX_VL 16

/* A kernel's local array of elements that vectors are loaded from or stored to: aligned to the widest vector, as
 * declared. (The compiler may align such an array so by itself and then use aligned moves on it; a stack that does
 * not keep an alignment it was not told, such as AddressSanitizer's for use-after-return, then faults.) */
#define UK_VALIGNED _Alignas(64)

/* A fused epilogue (epilogue.h) as the kernels take it: z = act(v + r) of an output v; act = 0 (none: the plain
 * kernel), 1 (piecewise linear: min(max(t, lo), hi), t = u < 0 ? slope u : u, which is ReLU, ReLU6, clamp, leaky ReLU
 * and the identity), 2 (ReLU's own kernels: lo 0, hi inf, slope 1) or 3 (SiLU, u / (1 + exp(-u))); res: whether a residual r is added, the element rd bytes from the
 * output element (the residual has the output's layout). The kernels convert lo, hi and slope to their compute type. */
typedef struct {
    int act, res;
    double lo, hi, slope;
    intptr_t rd;
} bn_uk_epi;

/* The function type of each kernel shape, bn_<dtype>_<shape>_fn, for data stored as TS and computed as TC: float (f32)
 * and double (f64) both ways, float16 (f16) and bfloat16 (bf16) stored as uint16_t and computed as float. The one place a kernel's signature is written: every kernel of src/kernels.def is
 * declared with its shape's type below, and a table has a slot of that type per shape. */
#define BN_UK_TYPES(TS, TC, S)                                                                                    \
    /* acc[j] += sum of segment j over the rows (x[r rs + j len .. r rs + (j + 1) len), r < rows).                \
     * pf >= 0 with rows == 1: the pf elements after the run x[0 .. nseg len) are in the same array and           \
     * read next; the kernel may prefetch them (a prefetch is not a read; the AddressSanitizer build makes        \
     * it one, so that it is checked). pf < 0: no prefetch. The same for seg_dev and seg_bwd_sums, which          \
     * also takes, with rows > 1, pf > 0 elements after each row's run that are in the same row and read          \
     * next (the next block's runs; 0: none is) */                                                                \
    typedef void bn_##S##_seg_sum_fn(const TS* x, int64_t rows, int64_t rs, int64_t nseg, int64_t len,            \
                                     double* acc, int64_t pf);                                                    \
    /* s1[j] += sum (x - m[j]), s2[j] += sum (x - m[j])^2 over segment j of every row */                          \
    typedef void bn_##S##_seg_dev_fn(const TS* x, int64_t rows, int64_t rs, int64_t nseg, int64_t len,            \
                                     const double* m, double* s1, double* s2, int64_t pf);                        \
    /* y = (x - m[j]) * a[j] + b[j] over segment j */                                                             \
    typedef void bn_##S##_seg_affine_fn(const TS* x, TS* y, int64_t nseg, int64_t len, const TC* m,               \
                                        const TC* a, const TC* b, int nt);                                        \
    /* sdy[j] += sum dy, sdyx[j] += sum dy * (x - m[j]) over segment j of every row */                            \
    typedef void bn_##S##_seg_bwd_sums_fn(const TS* dy, const TS* x, int64_t rows, int64_t rs, int64_t nseg,      \
                                          int64_t len, const double* m, double* sdy, double* sdyx,                \
                                          int64_t pf);                                                            \
    /* dx = a[j] * dy + b[j] * (x - m[j]) + d[j] over segment j */                                                \
    typedef void bn_##S##_seg_bwd_apply_fn(const TS* dy, const TS* x, TS* dx, int64_t nseg, int64_t len,          \
                                           const TC* m, const TC* a, const TC* b, const TC* d, int nt);           \
    /* acc[c] += sum_r x[r, c] for the W <= C channels c < W of rows C elements apart (W < C: a column            \
     * block, see UK_CL_STRIPS; it prefetches nothing). pf_rows >= 0: rows after these in the same array          \
     * (the caller's next chunk), the first block of which is prefetched (not read, but for the                   \
     * AddressSanitizer build's checked loads); the same for cl_dev, cl_bwd_sums */                               \
    typedef void bn_##S##_cl_sum_fn(const TS* x, int64_t rows, int64_t C, int64_t W, double* acc,                 \
                                    int64_t pf_rows);                                                             \
    /* s1[c] += sum_r (x[r, c] - m[c]), s2[c] += sum_r (x[r, c] - m[c])^2 */                                      \
    typedef void bn_##S##_cl_dev_fn(const TS* x, int64_t rows, int64_t C, int64_t W, const double* m,             \
                                    double* s1, double* s2, int64_t pf_rows);                                     \
    /* y[e] = (x[e] - m[c]) * a[c] + b[c] over n flat elements, c = (c0 + e) % C; m, a, b extended;               \
     * il: NULL, or the same coefficients interleaved in groups of vl channels from channel io < C (C a           \
     * multiple of vl; see cl_il_alloc in batchnorm.inc), which flat runs read instead when their                 \
     * vectors start on a group */                                                                                \
    typedef void bn_##S##_cl_affine_fn(const TS* x, TS* y, int64_t n, int64_t C, int64_t c0, const TC* m,         \
                                       const TC* a, const TC* b, const TC* il, int64_t io, int nt);               \
    /* sdy[c] += sum_r dy[r, c], sdyx[c] += sum_r dy[r, c] * (x[r, c] - m[c]) */                                  \
    typedef void bn_##S##_cl_bwd_sums_fn(const TS* dy, const TS* x, int64_t rows, int64_t C, int64_t W,           \
                                         const double* m, double* sdy, double* sdyx, int64_t pf_rows);            \
    /* dx[e] = a[c] * dy[e] + b[c] * (x[e] - m[c]) + d[c], as cl_affine */                                        \
    typedef void bn_##S##_cl_bwd_apply_fn(const TS* dy, const TS* x, TS* dx, int64_t n, int64_t C,                \
                                          int64_t c0, const TC* m, const TC* a, const TC* b, const TC* d,         \
                                          int nt);                                                                \
    /* per-channel coefficients m, a, b of y = (x - m) a + b (weight, bias optional); returns non-zero            \
     * when some channel needs the float64 apply (see ukernels.inc). m, a, b: distinct arrays that no             \
     * input overlaps */                                                                                          \
    typedef int bn_##S##_norm_params_fn(int64_t C, const double* mean, const double* var,                         \
                                        const double* weight, const double* bias, double eps, TC* m, TC* a,       \
                                        TC* b);                                                                   \
    /* backward coefficients m, a, b, d of dx = a dy + b (x - m) + d, and gw, gb (weight optional).               \
     * m, a, b, d: distinct arrays that no other argument overlaps; nor do gw, gb overlap sdy, sdyx */            \
    typedef void bn_##S##_bwd_params_fn(int64_t C, double n, const double* sdy, const double* sdyx,               \
                                        const double* mean, const double* invstd, const double* weight,           \
                                        int training, double* gw, double* gb, TC* m, TC* a, TC* b, TC* d);        \
    /* channels-last statistics: one chunk of cnt rows, s1 -> s1 (1 / cnt), s2 -> max(0, s2 - s1 s1 (1 / cnt)) */ \
    typedef void bn_##S##_cl_chunk_finish_fn(int64_t C, double cnt, double* s1, double* s2);                      \
    /* channels-last statistics: mean and var of channels c0 .. c1 - 1 from K chunk rows (ukernels.inc);          \
     * mean, var: distinct arrays that no input overlaps */                                                       \
    typedef void bn_##S##_cl_combine_fn(const double* mu0_k, const double* r_k, const double* m2_k,               \
                                        int64_t K, int64_t C, int64_t n, int64_t L, int64_t c0,                   \
                                        int64_t c1, double* mean, double* var);                                   \
    /* out[c] = sum_k part[k C + c] in chunk order, c0 <= c < c1; out overlaps no input */                        \
    typedef void bn_##S##_cl_sum_rows_fn(const double* part, int64_t K, int64_t C, int64_t c0, int64_t c1,        \
                                         double* out);                                                    \
    /* rowcol (rowcol.inc): rows of D contiguous elements, statistics per row i, affine per column j.             \
     * y[i, j] = ((x[i, j] - m[i]) r[i] + res[i]) w[j] + b[j]; y may be x */                                      \
    typedef void bn_##S##_rc_affine_fn(const TS* x, TS* y, int64_t rows, int64_t D, const TC* m, const TC* res,   \
                                       const TC* r, const TC* w, const TC* b, int nt);                            \
    /* rc_affine of x into y, and seg_dev's sums of as many rows xs (one segment each, rows == 1, pf as        \
     * seg_dev's: elements after xs's rows that may be prefetched): the same bits as the two calls; xs may be  \
     * x, y may be x but not xs */                                                                             \
    typedef void bn_##S##_rc_affine_dev_fn(const TS* x, TS* y, int64_t rows, int64_t D, const TC* m,             \
                                           const TC* res, const TC* r, const TC* w, const TC* b, int nt,          \
                                           const TS* xs, const double* sh, double* s1, double* s2, int64_t pf);   \
    /* per row, g = dy w[j], xh = (x - mean[i]) rstd[i]: sg[i] = sum g, sgx[i] = sum g xh; per column              \
     * gw[j] += sum_i dy xh, gb[j] += sum_i dy (rows in order), in double; pf as seg_dev's, of dy and x alike */  \
    typedef void bn_##S##_rc_bwd_sums_fn(const TS* dy, const TS* x, int64_t rows, int64_t D, const double* mean,  \
                                         const double* rstd, const double* w, double* sg, double* sgx,             \
                                         double* gw, double* gb, int64_t pf);                                      \
    /* dx[i, j] = (dy w[j]) a[i] + (bb[i] ((x - m[i]) - res[i]) + d[i]); dx may be dy or x. nt: UK_STORE or      \
     * UK_STREAM (each row's whole 64-byte lines: rc_stream_span, rowcol.inc), for rc_affine too. pfa, pfb: pfn   \
     * elements each (pfn 0: none) prefetched into the L2 a share before each row (the caller's next rows) */     \
    typedef void bn_##S##_rc_bwd_apply_fn(const TS* dy, const TS* x, TS* dx, int64_t rows, int64_t D,             \
                                          const TC* m, const TC* res, const TC* a, const TC* bb, const TC* d,     \
                                          const TC* w, int nt, const TS* pfa, const TS* pfb, int64_t pfn);         \
    /* the same with the roles swapped: `rows` rows (channels c) of W elements ld apart, statistics per column s,  \
     * affine per row c (layer norm over the channels of a channels-first array); nt: UK_STORE or UK_STREAM, as  \
     * rc_affine's, per row */                                                                                   \
    typedef void bn_##S##_cr_affine_fn(const TS* x, TS* y, int64_t rows, int64_t W, int64_t ld, const TC* m,      \
                                       const TC* res, const TC* r, const TC* w, const TC* b, int nt);                 \
    /* sg[s] += sum_c dy w[c], sgx[s] += sum_c dy w[c] xh (rows in order); gw[c] += sum_s dy xh, gb[c] += sum_s dy */\
    typedef void bn_##S##_cr_bwd_sums_fn(const TS* dy, const TS* x, int64_t rows, int64_t W, int64_t ld,          \
                                         const double* mean, const double* rstd, const double* w, double* sg,     \
                                         double* sgx, double* gw, double* gb);                                     \
    /* seg_affine through the fused epilogue ep (chosen once per call; act 0 and no residual: seg_affine) */       \
    typedef void bn_##S##_seg_affine_epi_fn(const TS* x, TS* y, int64_t nseg, int64_t len, const TC* m,           \
                                            const TC* a, const TC* b, int nt, const bn_uk_epi* ep);               \
    /* cl_affine through the fused epilogue ep */                                                                 \
    typedef void bn_##S##_cl_affine_epi_fn(const TS* x, TS* y, int64_t n, int64_t C, int64_t c0, const TC* m,     \
                                           const TC* a, const TC* b, const TC* il, int64_t io, int nt,            \
                                           const bn_uk_epi* ep);                                                  \
    /* du = dy act'(u), u = (x - m[j]) a[j] + b[j] (+ the residual at du's offset ep->rd) over segment j, as the     \
     * forward computed it (ep->act != 0; du may be dy) */                                                        \
    typedef void bn_##S##_seg_act_grad_fn(const TS* dy, const TS* x, TS* du, int64_t nseg, int64_t len,          \
                                          const TC* m, const TC* a, const TC* b, const bn_uk_epi* ep);            \
    /* the same over n flat channels-last elements from channel c0, extended m, a, b */                          \
    typedef void bn_##S##_cl_act_grad_fn(const TS* dy, const TS* x, TS* du, int64_t n, int64_t C, int64_t c0,     \
                                         const TC* m, const TC* a, const TC* b, const bn_uk_epi* ep);             \
    /* seg_bwd_sums of du = dy act'(u), u = (fm[j], fa[j], fb[j])'s seg_act_grad u (ep->res is not read: no       \
     * residual; ep->act 0: seg_bwd_sums of dy), du computed in the call and never stored: seg_act_grad's bits     \
     * where du is exact in TS (the kernel keeps some du in TC, rounds others to TS) */                             \
    typedef void bn_##S##_seg_bwd_sums_act_fn(const TS* dy, const TS* x, int64_t rows, int64_t rs, int64_t nseg,  \
                                              int64_t len, const double* m, double* sdy, double* sdyx,            \
                                              int64_t pf, const TC* fm, const TC* fa, const TC* fb,               \
                                              const bn_uk_epi* ep);                                               \
    /* seg_bwd_apply of the same du, u = (x - m[j]) fa[j] + fb[j] (the forward's m is the backward's), du in TC:  \
     * seg_act_grad's du where that is exact in TS, as ReLU's always is (ep->act 0: seg_bwd_apply of dy) */        \
    typedef void bn_##S##_seg_bwd_apply_act_fn(const TS* dy, const TS* x, TS* dx, int64_t nseg, int64_t len,      \
                                               const TC* m, const TC* a, const TC* b, const TC* d, int nt,        \
                                               const TC* fa, const TC* fb, const bn_uk_epi* ep);                  \
    /* cl_bwd_sums of du = dy act'(u), u = (fm, fa, fb)'s cl_act_grad u (extended arrays from channel 0 of the W   \
     * columns; ep->res is not read: no residual; ep->act 0: cl_bwd_sums of dy), du computed in the call and never \
     * stored: cl_act_grad's bits where du is exact in TS */                                                        \
    typedef void bn_##S##_cl_bwd_sums_act_fn(const TS* dy, const TS* x, int64_t rows, int64_t C, int64_t W,        \
                                             const double* m, double* sdy, double* sdyx, int64_t pf_rows,         \
                                             const TC* fm, const TC* fa, const TC* fb, const bn_uk_epi* ep);      \
    /* cl_bwd_apply of the same du, u = (x - m) fa + fb (the forward's m is the backward's; extended arrays), du in \
     * TC (ep->act 0: cl_bwd_apply of dy) */                                                                        \
    typedef void bn_##S##_cl_bwd_apply_act_fn(const TS* dy, const TS* x, TS* dx, int64_t n, int64_t C, int64_t c0, \
                                              const TC* m, const TC* a, const TC* b, const TC* d, int nt,         \
                                              const TC* fa, const TC* fb, const bn_uk_epi* ep);                   \
    /* z = act(z + r) in place over n elements (the epilogue on its own; nothing when ep has neither) */          \
    typedef void bn_##S##_epi_sweep_fn(TS* z, int64_t n, const bn_uk_epi* ep);                                    \
    /* rc_affine / rc_affine_dev / cr_affine through the fused epilogue ep (chosen once per call; none: the plain  \
     * kernel); the residual of rc_affine_dev's y at y's offset ep->rd */                                         \
    typedef void bn_##S##_rc_affine_epi_fn(const TS* x, TS* y, int64_t rows, int64_t D, const TC* m,              \
                                           const TC* res, const TC* r, const TC* w, const TC* b, int nt,          \
                                           const bn_uk_epi* ep);                                                  \
    typedef void bn_##S##_rc_affine_dev_epi_fn(const TS* x, TS* y, int64_t rows, int64_t D, const TC* m,         \
                                               const TC* res, const TC* r, const TC* w, const TC* b, int nt,      \
                                               const TS* xs, const double* sh, double* s1, double* s2, int64_t pf, \
                                               const bn_uk_epi* ep);                                              \
    typedef void bn_##S##_cr_affine_epi_fn(const TS* x, TS* y, int64_t rows, int64_t W, int64_t ld, const TC* m,  \
                                           const TC* res, const TC* r, const TC* w, const TC* b, int nt,          \
                                           const bn_uk_epi* ep);                                                  \
    /* du = dy act'(u), u = rc_affine's (cr_affine's) y (+ the residual at du's offset ep->rd), as the forward     \
     * computed it (ep->act != 0; du may be dy); rc_act_grad's pf: the elements after its rows, in dy and x, that   \
     * it may prefetch (-1: none; as seg_bwd_sums's) */                                                            \
    typedef void bn_##S##_rc_act_grad_fn(const TS* dy, const TS* x, TS* du, int64_t rows, int64_t D,             \
                                         const TC* m, const TC* res, const TC* r, const TC* w, const TC* b,       \
                                         int64_t pf, const bn_uk_epi* ep);                                        \
    /* rc_act_grad into du, then rc_bwd_sums of du (mean, rstd: the backward's; w: the weight as doubles), in one  \
     * sweep where the rows' sums take a row at a time: the two kernels' bits (ep->act != 0) */                   \
    typedef void bn_##S##_rc_act_sums_fn(const TS* dy, const TS* x, TS* du, int64_t rows, int64_t D,             \
                                         const TC* m, const TC* res, const TC* r, const TC* wt, const TC* bt,     \
                                         const double* mean, const double* rstd, const double* w, double* sg,     \
                                         double* sgx, double* gw, double* gb, int64_t pf, const bn_uk_epi* ep);   \
    typedef void bn_##S##_cr_act_grad_fn(const TS* dy, const TS* x, TS* du, int64_t rows, int64_t W, int64_t ld, \
                                         const TC* m, const TC* res, const TC* r, const TC* w, const TC* b,       \
                                         const bn_uk_epi* ep);                                                    \
    typedef void bn_##S##_cr_bwd_apply_fn(const TS* dy, const TS* x, TS* dx, int64_t rows, int64_t W, int64_t ld, \
                                          const TC* m, const TC* res, const TC* a, const TC* bb, const TC* d,     \
                                          const TC* w);

BN_UK_TYPES(float, float, f32)
BN_UK_TYPES(double, double, f64)
BN_UK_TYPES(uint16_t, float, f16)  /* float16 patterns, computed in float (io_f16.h) */
BN_UK_TYPES(uint16_t, float, bf16) /* bfloat16 patterns, computed in float (io_bf16.h) */
#undef BN_UK_TYPES

/* The shapes, in table order: X(shape) for each (the slots of a table; the C kernel test checks that every listed ISA
 * fills every one). */
#define BN_UK_SHAPES(X)                                                                                   \
    X(seg_sum) X(seg_dev) X(seg_affine) X(seg_bwd_sums) X(seg_bwd_apply) X(cl_sum) X(cl_dev) X(cl_affine)  \
    X(cl_bwd_sums) X(cl_bwd_apply) X(norm_params) X(bwd_params) X(cl_chunk_finish) X(cl_combine) X(cl_sum_rows)     \
    X(rc_affine) X(rc_bwd_sums) X(rc_bwd_apply) X(cr_affine) X(cr_bwd_sums) X(cr_bwd_apply)                         \
    X(seg_affine_epi) X(cl_affine_epi) X(seg_act_grad) X(cl_act_grad) X(epi_sweep)                                  \
    X(rc_affine_epi) X(cr_affine_epi) X(rc_act_grad) X(cr_act_grad) X(seg_bwd_sums_act) X(seg_bwd_apply_act) X(cl_bwd_sums_act) X(cl_bwd_apply_act) \
    X(rc_affine_dev) X(rc_affine_dev_epi) X(rc_act_sums)

/* A kernel table: one ISA's kernels of one dtype (kernels.c fills them from kernels.def), and their vector length,
 * in elements */
#define BN_UK_SLOT_f32(shape) bn_f32_##shape##_fn* shape;
#define BN_UK_SLOT_f64(shape) bn_f64_##shape##_fn* shape;
#define BN_UK_SLOT_f16(shape) bn_f16_##shape##_fn* shape;
#define BN_UK_SLOT_bf16(shape) bn_bf16_##shape##_fn* shape;
typedef struct {
    BN_UK_SHAPES(BN_UK_SLOT_f32)
    int vl;
} bn_uk_f32;
typedef struct {
    BN_UK_SHAPES(BN_UK_SLOT_f64)
    int vl;
} bn_uk_f64;
typedef struct {
    BN_UK_SHAPES(BN_UK_SLOT_f16)
    int vl;
} bn_uk_f16;
typedef struct {
    BN_UK_SHAPES(BN_UK_SLOT_bf16)
    int vl;
} bn_uk_bf16;
#undef BN_UK_SLOT_f32
#undef BN_UK_SLOT_f64
#undef BN_UK_SLOT_f16
#undef BN_UK_SLOT_bf16

/* The ISA names of kernels.def as the indices of bn_simd.h's enum bn_isa */
#define BN_UK_ISA_scalar BN_ISA_SCALAR
#define BN_UK_ISA_avx2 BN_ISA_AVX2
#define BN_UK_ISA_avx512 BN_ISA_AVX512

/* Every kernel of kernels.def, declared with its shape's type: a kernel defined with another signature, or under a
 * name that the list does not give, fails to compile. Internal to the library (hidden from its dynamic symbols). */
#if defined(__GNUC__)
#define BN_UK_INTERNAL __attribute__((visibility("hidden")))
#else
#define BN_UK_INTERNAL
#endif
#define BN_UKERNEL(isa, dtype, shape, name) BN_UK_INTERNAL bn_##dtype##_##shape##_fn name;
#define BN_UKERNEL_TABLE(isa, dtype, vl, fused)
#include "kernels.def"

/* The 16-bit dtypes' conversions on their own (ukernels.inc, UK_IO_CONVERTS), n elements, for the C kernel test:
 * bn_<dtype>_widen__<isa> (patterns -> float) and bn_<dtype>_narrow__<isa> (float -> patterns, rounded to nearest even) */
#define BN_UK_CONVERTS(dtype, isa)                                                                       \
    BN_UK_INTERNAL void bn_##dtype##_widen__##isa(const uint16_t* x, float* y, int64_t n);               \
    BN_UK_INTERNAL void bn_##dtype##_narrow__##isa(const float* x, uint16_t* y, int64_t n);
BN_UK_CONVERTS(f16, scalar)
BN_UK_CONVERTS(f16, avx2)
BN_UK_CONVERTS(f16, avx512)
BN_UK_CONVERTS(bf16, scalar)
BN_UK_CONVERTS(bf16, avx2)
BN_UK_CONVERTS(bf16, avx512)
#undef BN_UK_CONVERTS

/* The tables, indexed by enum bn_isa (kernels.c) */
extern BN_UK_INTERNAL const bn_uk_f32 bn_uk_f32_tables[BN_ISA_COUNT];
extern BN_UK_INTERNAL const bn_uk_f64 bn_uk_f64_tables[BN_ISA_COUNT];
extern BN_UK_INTERNAL const bn_uk_f16 bn_uk_f16_tables[BN_ISA_COUNT];
extern BN_UK_INTERNAL const bn_uk_bf16 bn_uk_bf16_tables[BN_ISA_COUNT];

/* dispatch.c: the row size (bytes, all arrays) from which channels-last element-wise sweeps use column strips
 * (storing normally; streaming); at least BN_CL_STRIP_MIN_BYTES, so that such rows are wider than 2 vectors of any
 * ISA. */
int64_t bn_cl_strip_bytes(void);
int64_t bn_cl_stream_strip_bytes(void);
/* Whether a channels-last sweep touching `arrays` rows of row_bytes bytes each (data and coefficients) takes the
 * column strips (UK_CL_WIDE in ukernels.inc): from the threshold above for how it stores; a streamed output needs
 * rows of whole cache lines; streamed_only: never when it stores normally. */
int bn_cl_takes_strips(int64_t row_bytes, int arrays, int stream, int streamed_only);

#endif /* BN_UKERNELS_H */
