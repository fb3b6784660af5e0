/*
 * bn_simd — the C contract.
 *
 * Every tensor is seen as a C-contiguous 3-D view (outer, C, inner):
 *   channels-first (N, C, *spatial): outer = N,               inner = prod(spatial)
 *   channels-last  (N, *spatial, C): outer = N * prod(spatial), inner = 1
 * Batch norm reduces over (outer, inner) for every channel c; n = outer * inner.
 *
 * Numerics
 *   - Statistics are exact two-pass sums inside fixed chunks of BN_CHUNK_BYTES, the chunks combined in
 *     double in a fixed order (mean = sum n_k mean_k / n, M2 = sum M2_k + n_k (mean_k - mean)^2).
 *     Chunk boundaries depend on the shape only, never on the thread count: results are bitwise equal
 *     for any number of threads.
 *   - Normalisation is y = (x - m[c]) * a[c] + b[c] with m the mean rounded to the data type and the
 *     rounding residual folded into b, so a channel whose |mean| / std is 1e6 still normalises to
 *     within a few ulp of its float64 value.
 *
 * All functions return BN_OK or a negative status; on error nothing has been written.
 * Pointers to per-channel arrays have C elements; "nullable" ones may be NULL (weight 1, bias 0).
 * nthreads <= 0 means "as many as OpenMP offers"; tiny inputs run on one thread.
 */
#ifndef BN_SIMD_H
#define BN_SIMD_H

#include <stdint.h>

/* The public API (the library's exported functions, the status codes and ISA codes); the kernel-level functions
 * below are the library's internals (hidden in libbn_simd), which the Python bridge and the C tests call directly. */
#include "bn_simd_api.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- dispatch (dispatch.c) ---- */
/* 1 when the CPU (and OS) can run the ISA's kernels. */
int bn_isa_supported(int isa);
/* Selects the kernels used by every later call; BN_EISA when the CPU lacks the ISA. */
int bn_set_isa(int isa);
int bn_get_isa(void);
/* The best ISA the CPU supports. */
int bn_best_isa(void);
const char* bn_isa_name(int isa);
/* 1 when built with OpenMP. */
int bn_have_openmp(void);
/* Whether the CPU converts float16 in hardware (F16C): the vector float16 kernels need it (else the scalar ones
 * run). */
int bn_have_f16c(void);
/* OpenMP's current default thread count (omp_get_max_threads), 1 without OpenMP. */
int bn_omp_max_threads(void);
/* The most threads a driver call starts: OpenMP's thread limit, at most 1024 (1 without OpenMP). */
int bn_thread_cap(void);
/* Channels-last element-wise sweeps go in column strips when one row of all their arrays takes at least this
 * many bytes (ukernels.inc, UK_CL_WIDE): bn_cl_strip_bytes for sweeps that store normally, bn_cl_stream_strip_bytes
 * for those whose output streams. The defaults depend on the CPU (docs/tuning.md, "Strip threshold per CPU");
 * bn_set_cl_strip_bytes sets both for every later call (negative: back to the defaults; otherwise at least
 * BN_CL_STRIP_MIN_BYTES, else BN_EINVAL). */
#define BN_CL_STRIP_MIN_BYTES 4096
int64_t bn_cl_strip_bytes(void);
int64_t bn_cl_stream_strip_bytes(void);
int bn_set_cl_strip_bytes(int64_t bytes);
/* The bytes a channels-first training forward or backward may keep in a core's caches for a group of channels
 * between its reduction and its sweep (docs/tuning.md, "Slab budget per CPU"): half the L2 size the OS reports (512 KiB
 * when it reports none); on AMD CPUs 4 times an L2 of 512 KiB or less, 2 MiB in family 19h with an L2 of up to 1 MiB,
 * and 0 (two sweeps) otherwise; decided once when the library is loaded. bn_slab_min_input: calls whose inputs (x; dy
 * and x) are at most this many bytes take the two sweeps whatever the budget (32 MiB on AMD CPUs with such a budget,
 * else 0). bn_set_slab_bytes sets the budget for every later call of any size (0: never take that path; negative: back
 * to the defaults of both). The results are the same bits whatever they are. */
int64_t bn_slab_bytes(void);
/* Whether the layer-norm forward pairs its blocks (rownorm.inc) when it streams its output (dispatch.c) */
int bn_rn_pair_streamed(void);
int64_t bn_slab_min_input(void);
int bn_set_slab_bytes(int64_t bytes);
/* The bytes an element-wise sweep touches (inputs and output) beyond which its output is written with streaming
 * stores: 32 MiB (BN_STREAM_BYTES, src/dispatch.h). bn_set_stream_bytes changes it for every later call (negative:
 * back to the default); the values written are the same either way. It exists so that tests can run the streamed
 * paths on small arrays. */
int64_t bn_stream_bytes(void);
int bn_set_stream_bytes(int64_t bytes);
/* Whether the fused training backward through ReLU and the piecewise-linear activations computes du where it reads it
 * (batchnorm.inc, backward_otf; groupnorm.inc): -1 by its rule (the default), 0 never (du stored), 1 wherever the
 * kernels take it at all (channels-first maps of 1024 elements and more, channels-last any size; never with a NaN in
 * the bias), in the cache or beyond it. For every later call of the process; the values written are the same bits
 * whatever it is. Tests only: the two paths compared on small arrays. */
void bn_set_act_otf(int mode);

/* ---- contexts (dispatch.c) ----
 * A context holds the settings of the calls made under it: the ISA (-1: the default context's), the tuning budgets
 * (-1: the default context's, else the CPU's) and a thread count for callers to pass as the calls' nthreads (0:
 * OpenMP's). bn_set_isa, bn_set_cl_strip_bytes, bn_set_slab_bytes and bn_set_stream_bytes act on the
 * default context. bn_context_use(ctx) makes ctx the calling thread's context for the calls it makes next (NULL or
 * the default: the default) and returns the previous one; the settings reach the call's worker threads. Two threads
 * can so run calls with different settings at once. A context must outlive its use and not change while a call
 * runs under it. */
typedef struct bn_context bn_context;
bn_context* bn_default_context(void);
bn_context* bn_context_create(void);
void bn_context_destroy(bn_context* ctx);
int bn_context_set_isa(bn_context* ctx, int isa);
int bn_context_get_isa(const bn_context* ctx);
int bn_context_set_num_threads(bn_context* ctx, int nthreads);
int bn_context_get_num_threads(const bn_context* ctx);
int bn_context_set_cl_strip_bytes(bn_context* ctx, int64_t bytes);
int bn_context_set_slab_bytes(bn_context* ctx, int64_t bytes);
int bn_context_set_stream_bytes(bn_context* ctx, int64_t bytes);
const bn_context* bn_context_use(const bn_context* ctx);

/* ---- batch norm on the (outer, C, inner) view (batchnorm.c), for T = float (f32), double (f64) and the 16-bit
 * patterns (uint16_t) of float16 (f16) and bfloat16 (bf16), which compute in float ----
 * T is the data's type; TC, the type the kernels compute in, is that of the coefficient arrays (m, a, b, d): T itself
 * for float and double, float for the 16-bit dtypes. */
#define BN_DECLARE(T, TC, S)                                                                              \
    /* mean[c] and biased var[c] of x; mean and var: distinct arrays that x does not overlap. */          \
    int bn_stats_##S(const T* x, int64_t outer, int64_t C, int64_t inner, double* mean, double* var,       \
                     int nthreads);                                                                       \
    /* y = (x - m[c]) * a[c] + b[c]; y may be x. */                                                       \
    int bn_apply_##S(const T* x, T* y, int64_t outer, int64_t C, int64_t inner, const TC* m, const TC* a,  \
                     const TC* b, int nthreads);                                                          \
    /* Normalise with the given per-channel mean/var (double), weight/bias nullable:                       \
     *   y = (x - mean) / sqrt(var + eps) * weight + bias. Used for inference and after a stats step. */  \
    int bn_normalize_##S(const T* x, T* y, int64_t outer, int64_t C, int64_t inner, const double* mean,    \
                         const double* var, const double* weight, const double* bias, double eps,         \
                         int nthreads);                                                                   \
    /* Training forward in one call: statistics, then normalise, a group of channels at a time while it  \
     * is in cache when it fits (else two sweeps). Writes y, mean[c] and biased var[c]; the statistics    \
     * are bitwise those of bn_stats and y that of bn_normalize with them. y may be x. */                \
    int bn_forward_train_##S(const T* x, T* y, int64_t outer, int64_t C, int64_t inner,                   \
                             const double* weight, const double* bias, double eps, double* mean,           \
                             double* var, int nthreads);                                                  \
    /* sum_dy[c] = sum dy, sum_dyxm[c] = sum dy * (x - mean[c]). */                                       \
    int bn_backward_reduce_##S(const T* dy, const T* x, int64_t outer, int64_t C, int64_t inner,          \
                               const double* mean, double* sum_dy, double* sum_dyxm, int nthreads);        \
    /* dx = a[c] * dy + b[c] * (x - m[c]) + d[c]; dx may be dy or x. */                                   \
    int bn_backward_apply_##S(const T* dy, const T* x, T* dx, int64_t outer, int64_t C, int64_t inner,    \
                              const TC* m, const TC* a, const TC* b, const TC* d, int nthreads);           \
    /* Training backward in one call (sums, then dx, as the forward). With n = outer*inner, s = invstd[c],   \
     * w = weight[c] (nullable):                                                                          \
     *   grad_bias = sum dy, grad_weight = s * sum dy (x - mean),                                         \
     *   dx = w s (dy - grad_bias / n - (x - mean) s grad_weight / n).                                    \
     * When training == 0 the statistics are constants: dx = w s dy. dx may be dy or x. */               \
    int bn_backward_##S(const T* dy, const T* x, T* dx, int64_t outer, int64_t C, int64_t inner,          \
                        const double* mean, const double* invstd, const double* weight, int training,     \
                        double* grad_weight, double* grad_bias, int nthreads);

BN_DECLARE(float, float, f32)
BN_DECLARE(double, double, f64)
BN_DECLARE(uint16_t, float, f16)
BN_DECLARE(uint16_t, float, bf16)

#undef BN_DECLARE

/* ---- statistics as mergeable moments, and the coefficient maths (batchnorm.c, batchnorm.inc) ----
 * bn_moments_S: bn_stats' chunk moments in chunk order: call it with count NULL to get the number of chunks K (shape
 * only), then with K and arrays of K (count) and K C (shift, resid, m2; chunk k's channel c at k C + c). A chunk's
 * mean is shift + resid (kept apart: their sum would lose the residual's bits). bn_moments_merge: mean and biased var
 * of C channels from K such chunks, merged in the order given (chunks of count 0 skipped): bitwise bn_stats' result
 * for the chunks of one call, and that of one call on a whole batch for the chunks of consecutive pieces of it that
 * end on its chunk boundaries. */
int bn_moments_merge(int64_t K, int64_t C, const double* count, const double* shift, const double* resid,
                     const double* m2, double* mean, double* var);
#define BN_DECLARE_MOMENTS(T, TC, S)                                                                      \
    int bn_moments_##S(const T* x, int64_t outer, int64_t C, int64_t inner, int64_t* K, double* count,     \
                       double* shift, double* resid, double* m2, int nthreads);                           \
    /* The apply coefficients of y = (x - m[c]) a[c] + b[c] = (x - mean) / sqrt(var + eps) w + bias, m the mean  \
     * rounded to TC and its residual folded into b; returns 1 (coefficients written) when some channel's TC  \
     * coefficients would leave TC's range or lose precision, so that the call must compute in double. A     \
     * channel with a NaN coefficient (all its outputs NaN) gets m = NaN, a = 1, b = 0 (ukernels.inc). */    \
    int bn_norm_params_##S(int64_t C, const double* mean, const double* var, const double* weight,         \
                           const double* bias, double eps, TC* m, TC* a, TC* b);                          \
    /* The backward coefficients of dx = a[c] dy + b[c] (x - m[c]) + d[c] and the parameter gradients from the \
     * channel sums of n values (as bn_backward); in training a channel with a NaN b or d gets m = NaN,      \
     * a = 0, b = 1, d = 0, and NaN parameter gradients are +NaN. */                                        \
    int bn_bwd_params_##S(int64_t C, double n, const double* sum_dy, const double* sum_dyxm,               \
                          const double* mean, const double* invstd, const double* weight, int training,   \
                          double* grad_weight, double* grad_bias, TC* m, TC* a, TC* b, TC* d);

BN_DECLARE_MOMENTS(float, float, f32)
BN_DECLARE_MOMENTS(double, double, f64)
BN_DECLARE_MOMENTS(uint16_t, float, f16)
BN_DECLARE_MOMENTS(uint16_t, float, bf16)

#undef BN_DECLARE_MOMENTS

/* ---- group norm and instance norm (groupnorm.inc), for T = float (f32), double (f64),
 * float16 (f16) and bfloat16 (bf16) (uint16_t patterns computed in float) ----
 * x is (N, C, S) channels-first (cl = 0) or (N, S, C) channels-last (cl = 1), S = prod(spatial), with G groups of
 * D = C / G consecutive channels (C % G == 0, else BN_EINVAL); instance norm is G = C. Group q = n G + g has the
 * D S values of its channels in sample n. mean, var, invstd: N G values (q order); weight, bias: C, nullable.
 * Statistics as batch norm's (shifted chunk sums in double, fixed order): bitwise equal for any thread count. */
#define BN_DECLARE_GROUP(T, S_)                                                                           \
    /* mean[q] and biased var[q]; 0 and NaN for groups of no element (PyTorch's). */                       \
    int bn_group_stats_##S_(const T* x, int64_t N, int64_t C, int64_t S, int64_t G, int cl, double* mean,  \
                            double* var, int nthreads);                                                   \
    /* y = (x - mean[q]) / sqrt(var[q] + eps) * weight[c] + bias[c] with the given statistics; y may be x. */ \
    int bn_group_normalize_##S_(const T* x, T* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,     \
                                const double* mean, const double* var, const double* weight,              \
                                const double* bias, double eps, int nthreads);                            \
    /* Training forward: the statistics (bitwise those of bn_group_stats) and y (that of bn_group_normalize \
     * with them) in one call, a group at a time while it is in cache where it can. y may be x. */          \
    int bn_group_forward_##S_(const T* x, T* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,       \
                              const double* weight, const double* bias, double eps, double* mean,         \
                              double* var, int nthreads);                                                 \
    /* Backward with s = invstd[q], M = D S, w = weight[c] (nullable):                                     \
     *   grad_bias[c] = sum_n sum dy,  grad_weight[c] = sum_n s sum dy (x - mean),                        \
     *   dx = s (w dy - sum_group(w dy) / M - (x - mean) s^2 sum_group(w dy (x - mean)) / M).              \
     * dx may be dy or x. */                                                                              \
    int bn_group_backward_##S_(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t S, int64_t G, \
                               int cl, const double* mean, const double* invstd, const double* weight,    \
                               double* grad_weight, double* grad_bias, int nthreads);

BN_DECLARE_GROUP(float, f32)
BN_DECLARE_GROUP(double, f64)
BN_DECLARE_GROUP(uint16_t, f16)
BN_DECLARE_GROUP(uint16_t, bf16)

#undef BN_DECLARE_GROUP

/* ---- layer norm and RMS norm (rownorm.inc), for T = float (f32), double (f64),
 * float16 (f16) and bfloat16 (bf16) (uint16_t patterns computed in float) ----
 * x is (N, C, S), normalised over C: statistics per (n, s) over x[n, :, s] (index n S + s of mean and rstd), the
 * affine per c. S == 1: N rows of C contiguous elements (layer norm over trailing dims); S > 1: channels-first
 * (layer norm over the channels of an NCHW array). rms = 0: layer norm, y = (x - mean) rstd w + b with
 * rstd = 1 / sqrt(var + eps), var biased; rms = 1: y = x rstd w, rstd = 1 / sqrt(mean(x^2) + eps) (mean unused,
 * may be NULL). The forward's weight and bias: C values of the data's compute type TC (float for f32, f16 and bf16,
 * double for f64: the apply kernels' own, read as given), the backward's weight C doubles; nullable (1, 0).
 * Statistics in double, shifted; bitwise the same for any thread count. */
#define BN_DECLARE_ROWNORM(T, TC, S_)                                                                     \
    /* y may be x. mean (N S; NULL allowed with rms), rstd (N S) receive the statistics. */                \
    int bn_row_forward_##S_(const T* x, T* y, int64_t N, int64_t C, int64_t S, int rms, const TC* weight,  \
                            const TC* bias, double eps, double* mean, double* rstd, int nthreads);         \
    /* Backward with g = dy w, xh = (x - mean) rstd (rms: x rstd), per position over its C values:          \
     *   dx = rstd (g - sum(g) / C - xh sum(g xh) / C)   (rms: without the sum(g) term),                   \
     *   grad_weight[c] = sum over positions of dy xh, grad_bias[c] = sum of dy (each nullable).           \
     * dx may be dy or x. */                                                                              \
    int bn_row_backward_##S_(const T* dy, const T* x, T* dx, int64_t N, int64_t C, int64_t S, int rms,     \
                             const double* mean, const double* rstd, const double* weight,                \
                             double* grad_weight, double* grad_bias, int nthreads);

BN_DECLARE_ROWNORM(float, float, f32)
BN_DECLARE_ROWNORM(double, double, f64)
BN_DECLARE_ROWNORM(uint16_t, float, f16)
BN_DECLARE_ROWNORM(uint16_t, float, bf16)

#undef BN_DECLARE_ROWNORM

#ifdef __cplusplus
}
#endif

#include "bn_simd_epilogue.h"

#endif /* BN_SIMD_H */
