/*
 * bn_simd — fused epilogues (included by bn_simd.h).
 *
 * An output v of the normalisation (the forward's y) can be finished in the same pass as
 *     z = act(v + r)
 * with r a residual (an array of the output's type and layout: the same (outer, C, inner) view, C-contiguous; or
 * none) and act one of:
 *     BN_ACT_NONE    u
 *     BN_ACT_CLAMP   min(max(u, lo), hi)          ReLU: (0, INFINITY); ReLU6: (0, 6); lo <= hi
 *     BN_ACT_LEAKY   u < 0 ? slope u : u          slope finite
 *     BN_ACT_SILU    u / (1 + exp(-u))
 * computed in the kernels' compute type (float for float32 and the 16-bit types, double for float64) and rounded once
 * to the output's type. A NaN u stays NaN. The result is the same for any thread count, and on one ISA the same bits
 * whatever path (vector, masked, scalar tail) computed an element.
 */
#ifndef BN_SIMD_EPILOGUE_H
#define BN_SIMD_EPILOGUE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum bn_act { BN_ACT_NONE = 0, BN_ACT_CLAMP = 1, BN_ACT_LEAKY = 2, BN_ACT_SILU = 3 };

typedef struct {
    int act;              /* enum bn_act */
    double lo, hi;        /* BN_ACT_CLAMP's bounds */
    double slope;         /* BN_ACT_LEAKY's slope for u < 0 */
    const void* residual; /* nullable: added before the activation; must not overlap the output */
} bn_epilogue;

/* T, TC, S as BN_DECLARE in bn_simd.h. A NULL ep is no epilogue (the plain call); an invalid one (an unknown act,
 * lo > hi or NaN bounds, a non-finite slope) returns BN_EINVAL before anything is written. */
#define BN_DECLARE_EPILOGUE(T, TC, S)                                                                          \
    /* bn_normalize_##S, then the epilogue: y = act(normalised x + residual) */                                \
    int bn_normalize_epi_##S(const T* x, T* y, int64_t outer, int64_t C, int64_t inner, const double* mean,     \
                             const double* var, const double* weight, const double* bias, double eps,          \
                             const bn_epilogue* ep, int nthreads);                                             \
    /* bn_forward_train_##S, then the epilogue, in the same sweep; mean and var as bn_forward_train_##S */     \
    int bn_forward_train_epi_##S(const T* x, T* y, int64_t outer, int64_t C, int64_t inner,                   \
                                 const double* weight, const double* bias, double eps, double* mean,           \
                                 double* var, const bn_epilogue* ep, int nthreads);                            \
    /* Backward of z = act(norm(x) + r), the forward having used mean, var (biased), eps, weight and bias:     \
     *   du = dz act'(u), u recomputed from x with the forward's coefficients (its bits: no mask is saved),    \
     *   written to dres (the residual's gradient) when it is not NULL;                                         \
     *   then bn_backward_##S with du as its dy and invstd = 1 / sqrt(var + eps) (training: batch statistics;  \
     *   else constants). dx may be dz or x; dres must overlap none of dz, x, dx. */                           \
    int bn_backward_epi_##S(const T* dz, const T* x, T* dx, T* dres, int64_t outer, int64_t C, int64_t inner,  \
                            const double* mean, const double* var, double eps, const double* weight,           \
                            const double* bias, int training, double* grad_weight, double* grad_bias,          \
                            const bn_epilogue* ep, int nthreads);                                              \
    /* z = act(z + residual) in place over n elements: the epilogue on its own */                              \
    int bn_epilogue_apply_##S(T* z, int64_t n, const bn_epilogue* ep, int nthreads);

BN_DECLARE_EPILOGUE(float, float, f32)
BN_DECLARE_EPILOGUE(double, double, f64)
BN_DECLARE_EPILOGUE(uint16_t, float, f16)
BN_DECLARE_EPILOGUE(uint16_t, float, bf16)

#undef BN_DECLARE_EPILOGUE

/* The same epilogue on group / instance norm (bn_group_*_##S_ in bn_simd.h) and layer / RMS norm (bn_row_*_##S_):
 * forwards that finish y in their normalise sweep, and backwards that recompute u from x with the forward's
 * coefficients (group norm: norm_params of the group's float64 mean, biased var, eps, weight and bias; rows: the
 * float64 mean and rstd and the weight and bias in TC, as the forward took them), du = dz act'(u) (into dres when it
 * is not NULL), then the plain backward on du (group norm's with invstd = 1 / sqrt(var + eps)). dx may be dz or x;
 * dres must overlap none of dz, x, dx. */
#define BN_DECLARE_EPILOGUE_OPS(T, TC, S_)                                                                        \
    int bn_group_forward_epi_##S_(const T* x, T* y, int64_t N, int64_t C, int64_t S, int64_t G, int cl,         \
                                  const double* weight, const double* bias, double eps, double* mean,           \
                                  double* var, const bn_epilogue* ep, int nthreads);                            \
    int bn_group_backward_epi_##S_(const T* dz, const T* x, T* dx, T* dres, int64_t N, int64_t C, int64_t S,     \
                                   int64_t G, int cl, const double* mean, const double* var, double eps,        \
                                   const double* weight, const double* bias, double* grad_weight,               \
                                   double* grad_bias, const bn_epilogue* ep, int nthreads);                     \
    int bn_row_forward_epi_##S_(const T* x, T* y, int64_t N, int64_t C, int64_t S, int rms, const TC* weight,    \
                                const TC* bias, double eps, double* mean, double* rstd, const bn_epilogue* ep,  \
                                int nthreads);                                                                   \
    int bn_row_backward_epi_##S_(const T* dz, const T* x, T* dx, T* dres, int64_t N, int64_t C, int64_t S,       \
                                 int rms, const double* mean, const double* rstd, const double* weight,          \
                                 const double* bias, double* grad_weight, double* grad_bias,                     \
                                 const bn_epilogue* ep, int nthreads);

BN_DECLARE_EPILOGUE_OPS(float, float, f32)
BN_DECLARE_EPILOGUE_OPS(double, double, f64)
BN_DECLARE_EPILOGUE_OPS(uint16_t, float, f16)
BN_DECLARE_EPILOGUE_OPS(uint16_t, float, bf16)

#undef BN_DECLARE_EPILOGUE_OPS

#ifdef __cplusplus
}
#endif

#endif /* BN_SIMD_EPILOGUE_H */
