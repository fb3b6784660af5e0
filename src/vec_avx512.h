/* The AVX-512 vector vocabulary of the kernels (uk_avx512.c, compiled with -mavx512f -mavx512bw -mavx512vl -mavx2
 * -mfma). Included once by uk_avx512.c before its instantiations of ukernels.inc; the names are those ukernels.inc
 * documents, each compute type's with its type as a suffix (VFMA_float; ukernels.inc picks the instantiation's TC).
 * The storage types' loads and stores are in io_<dtype>.h. */
#ifndef BN_VEC_AVX512_H
#define BN_VEC_AVX512_H

#include <immintrin.h>
#include <math.h>

#define UK_ISA_AVX512 1 /* (the section of io_<dtype>.h to take) */
#define UK_HAVE_VBLEND 1
#define UK_WIDE_STRIPS 1 /* 32 vector registers */

/* doubles (reductions) */
#define D __m512d
#define DL 8
#define DZERO() _mm512_setzero_pd()
#define DLOAD(p) _mm512_loadu_pd(p)
#define DSTORE(p, v) _mm512_storeu_pd((p), (v))
#define DSET1(s) _mm512_set1_pd(s)
#define DADD(a, b) _mm512_add_pd((a), (b))
#define DSUB(a, b) _mm512_sub_pd((a), (b))
#define DMUL(a, b) _mm512_mul_pd((a), (b))
#define DFMA(a, b, c) _mm512_fmadd_pd((a), (b), (c))
/* a - b on the FMA pipes, as a * 1 + (-b), with the same one rounding (docs/tuning.md, "Subtraction on the FMA pipes") */
#define DSUB_FMA(a, b) _mm512_fmadd_pd((a), _mm512_set1_pd(1.0), _mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(b), _mm512_set1_epi64(INT64_MIN))))
#define DHSUM(v) _mm512_reduce_add_pd(v)
#define UK_TAIL8(n) ((__mmask8)((1u << (n)) - 1))    /* lanes 0 .. n - 1 of 8 */
#define UK_TAIL16(n) ((__mmask16)((1u << (n)) - 1)) /* lanes 0 .. n - 1 of 16 */
#define DKEEP_N(v, n) _mm512_maskz_mov_pd(UK_TAIL8(n), (v))
#define UK_SFENCE() _mm_sfence()

/* VREG(v): v through a register (vec_avx2.h says why) */
#define VREG(v) __asm__("" : "+v"(v))

/* compute in float: 16 lanes */
#define V_float __m512
#define VL_float 16
#define VLOAD_float(p) _mm512_loadu_ps(p)
#define VSET1_float(s) _mm512_set1_ps(s)
#define VMUL_float(a, b) _mm512_mul_ps((a), (b))
#define VSUB_float(a, b) _mm512_sub_ps((a), (b))
#define VFMA_float(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define SFMA_float(a, b, c) __builtin_fmaf((a), (b), (c))
#define VBLEND_N_float(n, a, b) _mm512_mask_blend_ps(UK_TAIL16(n), (b), (a))
/* a V of TC stored; DL elements of TC loaded as a D (exact) */
#define VSTORE_float(p, v) _mm512_storeu_ps((p), (v))
#define DLOADC_float(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))

/* compute in double: 8 lanes */
#define V_double __m512d
#define VL_double 8
#define VLOAD_double(p) _mm512_loadu_pd(p)
#define VSET1_double(s) _mm512_set1_pd(s)
#define VMUL_double(a, b) _mm512_mul_pd((a), (b))
#define VSUB_double(a, b) _mm512_sub_pd((a), (b))
#define VFMA_double(a, b, c) _mm512_fmadd_pd((a), (b), (c))
#define SFMA_double(a, b, c) __builtin_fma((a), (b), (c))
#define VBLEND_N_double(n, a, b) _mm512_mask_blend_pd(UK_TAIL8(n), (b), (a))
#define VSTORE_double(p, v) _mm512_storeu_pd((p), (v))
#define DLOADC_double(p) _mm512_loadu_pd(p)


/* The fused epilogues' vocabulary (epilogue.h): as vec_avx2.h's (vmaxps / vminps return b when a lane is NaN). */
#define VADD_float(a, b) _mm512_add_ps((a), (b))
#define VDIV_float(a, b) _mm512_div_ps((a), (b))
#define VMAX_float(a, b) _mm512_max_ps((a), (b))
#define VMIN_float(a, b) _mm512_min_ps((a), (b))
/* VSELNEG(c, a, b) = c < 0 ? a : b lane-wise. a and b pass through registers first (an empty asm): else GCC folds the
 * blend of a loaded operand into a masked load (vmovups / vcvtph2ps mem{k}{z}), which cannot issue before the mask is
 * computed; in the backward through ReLU, whose dz is the masked operand, that made float16's dx sweep 1.4-1.8x slower
 * beyond the cache on a Zen 5 (docs/tuning.md, "Masked blends, not masked loads"). */
static inline __attribute__((always_inline)) __m512 uk_selneg_ps(__m512 c, __m512 a, __m512 b) {
    __asm__("" : "+v"(a), "+v"(b));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(c, _mm512_setzero_ps(), _CMP_LT_OQ), b, a);
}
static inline __attribute__((always_inline)) __m512d uk_selneg_pd(__m512d c, __m512d a, __m512d b) {
    __asm__("" : "+v"(a), "+v"(b));
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(c, _mm512_setzero_pd(), _CMP_LT_OQ), b, a);
}
#define VSELNEG_float(c, a, b) uk_selneg_ps((c), (a), (b))
/* VGRELU(u, dy) = !(u <= 0) ? dy : +0 (epilogue.h, UK_SGRELU): a compare (unordered: a NaN u passes dy, as PyTorch's
 * relu backward) and a zeroing move; VGKEEP(u, lo, hi, hopen, g) = !(u <= lo) && (hopen || u < hi) ? g : +0
 * (UK_SGKEEP), a compare and a second under its mask. dy and g through a register first, as in uk_selneg_ps, so that
 * neither is folded into a masked load */
static inline __attribute__((always_inline)) __m512 uk_grelu_ps(__m512 u, __m512 dy) {
    __asm__("" : "+v"(dy));
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(u, _mm512_setzero_ps(), _CMP_NLE_UQ), dy);
}
static inline __attribute__((always_inline)) __m512d uk_grelu_pd(__m512d u, __m512d dy) {
    __asm__("" : "+v"(dy));
    return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(u, _mm512_setzero_pd(), _CMP_NLE_UQ), dy);
}
static inline __attribute__((always_inline)) __m512 uk_gkeep_ps(__m512 u, __m512 lo, __m512 hi, int hopen, __m512 g) {
    __asm__("" : "+v"(g));
    const __mmask16 k = _mm512_cmp_ps_mask(u, lo, _CMP_NLE_UQ);
    const __mmask16 open = (__mmask16)(hopen ? 0xFFFF : 0);
    return _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(k, u, hi, _CMP_LT_OQ) | (k & open), g);
}
static inline __attribute__((always_inline)) __m512d uk_gkeep_pd(__m512d u, __m512d lo, __m512d hi, int hopen,
                                                                 __m512d g) {
    __asm__("" : "+v"(g));
    const __mmask8 k = _mm512_cmp_pd_mask(u, lo, _CMP_NLE_UQ);
    const __mmask8 open = (__mmask8)(hopen ? 0xFF : 0);
    return _mm512_maskz_mov_pd(_mm512_mask_cmp_pd_mask(k, u, hi, _CMP_LT_OQ) | (k & open), g);
}
#define VGRELU_float(u, dy) uk_grelu_ps((u), (dy))
#define VGKEEP_float(u, lo, hi, hopen, g) uk_gkeep_ps((u), (lo), (hi), (hopen), (g))
#define VPOW2K_float(k) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(k), _mm512_set1_epi32(127)), 23))
#define VADD_double(a, b) _mm512_add_pd((a), (b))
#define VDIV_double(a, b) _mm512_div_pd((a), (b))
#define VMAX_double(a, b) _mm512_max_pd((a), (b))
#define VMIN_double(a, b) _mm512_min_pd((a), (b))
#define VSELNEG_double(c, a, b) uk_selneg_pd((c), (a), (b))
#define VGRELU_double(u, dy) uk_grelu_pd((u), (dy))
#define VGKEEP_double(u, lo, hi, hopen, g) uk_gkeep_pd((u), (lo), (hi), (hopen), (g))
#define VPOW2K_double(k) \
    _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_add_epi64(_mm512_castpd_si512(k), _mm512_set1_epi64(1023)), 52))

#endif /* BN_VEC_AVX512_H */
