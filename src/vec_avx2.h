/* The AVX2 + FMA vector vocabulary of the kernels (uk_avx2.c, compiled with -mavx2 -mfma). Included once by uk_avx2.c
 * before its instantiations of ukernels.inc; the names are those ukernels.inc documents, each compute type's with its
 * type as a suffix (VFMA_float; ukernels.inc picks the instantiation's TC). The storage types' loads and stores are in
 * io_<dtype>.h. */
#ifndef BN_VEC_AVX2_H
#define BN_VEC_AVX2_H

#include <immintrin.h>

#define UK_ISA_AVX2 1 /* (the section of io_<dtype>.h to take) */
#define UK_HAVE_VBLEND 1

/* doubles (reductions) */
#define D __m256d
#define DL 4
#define DZERO() _mm256_setzero_pd()
#define DLOAD(p) _mm256_loadu_pd(p)
#define DSTORE(p, v) _mm256_storeu_pd((p), (v))
#define DSET1(s) _mm256_set1_pd(s)
#define DADD(a, b) _mm256_add_pd((a), (b))
#define DSUB(a, b) _mm256_sub_pd((a), (b))
#define DMUL(a, b) _mm256_mul_pd((a), (b))
#define DFMA(a, b, c) _mm256_fmadd_pd((a), (b), (c))
/* a - b on the FMA pipes, as a * 1 + (-b), with the same one rounding (docs/tuning.md, "Subtraction on the FMA pipes") */
#define DSUB_FMA(a, b) _mm256_fmadd_pd((a), _mm256_set1_pd(1.0), _mm256_xor_pd((b), _mm256_set1_pd(-0.0)))
#define DHSUM(v) hsum_pd(v)
#define DHSUM4_ADD(p, a, b, c, d) hsum4_add_pd((p), (a), (b), (c), (d))
#define UK_SFENCE() _mm_sfence()
/* all-ones in the 64-bit lanes 0 .. n - 1 */
#define UK_TAIL4(n) _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3))
#define DKEEP_N(v, n) _mm256_and_pd((v), _mm256_castsi256_pd(UK_TAIL4(n)))

static inline double hsum_pd(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
/* p[k] += hsum_pd(v_k) for k = 0 .. 3: the same additions as hsum_pd's, (v0 + v2) + (v1 + v3), the four side by side */
static inline void hsum4_add_pd(double* p, __m256d a, __m256d b, __m256d c, __m256d d) {
    const __m256d s = _mm256_add_pd(_mm256_permute2f128_pd(a, b, 0x20), _mm256_permute2f128_pd(a, b, 0x31));
    const __m256d t = _mm256_add_pd(_mm256_permute2f128_pd(c, d, 0x20), _mm256_permute2f128_pd(c, d, 0x31));
    const __m256d h = _mm256_hadd_pd(s, t); /* (a's, c's, b's, d's) */
    _mm256_storeu_pd(p, _mm256_add_pd(_mm256_loadu_pd(p), _mm256_permute4x64_pd(h, 0xD8)));
}

/* VREG(v): v (a vector variable of either compute type) through a register, an empty asm that claims to change it.
 * A vector loaded and stored unchanged is a copy to GCC, which may take the loop's copies out as a string move: in
 * the channels-first sums through an activation (bwd_sums_act.inc) it made x's copy into the L1 block a `rep movsq`
 * of 32 or 64 bytes per step, and the float32 sums through ReLU 2.5x slower than the plain sums on a Zen 5
 * (docs/tuning.md, "No string moves in the sums through an activation"). */
#define VREG(v) __asm__("" : "+x"(v))

/* compute in float: 8 lanes */
#define V_float __m256
#define VL_float 8
#define VLOAD_float(p) _mm256_loadu_ps(p)
#define VSET1_float(s) _mm256_set1_ps(s)
#define VMUL_float(a, b) _mm256_mul_ps((a), (b))
#define VSUB_float(a, b) _mm256_sub_ps((a), (b))
#define VFMA_float(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define SFMA_float(a, b, c) __builtin_fmaf((a), (b), (c))
#define VBLEND_N_float(n, a, b) \
    _mm256_blendv_ps((b), (a), _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n)), \
                                                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))))
/* a V of TC stored; DL elements of TC loaded as a D (exact) */
#define VSTORE_float(p, v) _mm256_storeu_ps((p), (v))
#define DLOADC_float(p) _mm256_cvtps_pd(_mm_loadu_ps(p))

/* compute in double: 4 lanes */
#define V_double __m256d
#define VL_double 4
#define VLOAD_double(p) _mm256_loadu_pd(p)
#define VSET1_double(s) _mm256_set1_pd(s)
#define VMUL_double(a, b) _mm256_mul_pd((a), (b))
#define VSUB_double(a, b) _mm256_sub_pd((a), (b))
#define VFMA_double(a, b, c) _mm256_fmadd_pd((a), (b), (c))
#define SFMA_double(a, b, c) __builtin_fma((a), (b), (c))
#define VBLEND_N_double(n, a, b) _mm256_blendv_pd((b), (a), _mm256_castsi256_pd(UK_TAIL4(n)))
#define VSTORE_double(p, v) _mm256_storeu_pd((p), (v))
#define DLOADC_double(p) _mm256_loadu_pd(p)


/* The fused epilogues' vocabulary (epilogue.h), per compute type: VADD, VDIV; VMAX(a, b) = a > b ? a : b and
 * VMIN(a, b) = a < b ? a : b lane by lane (so a NaN in b passes: the x86 max/min rule, which the single-element forms
 * in epilogue.h copy); VSELNEG(c, a, b) = c < 0 ? a : b; VGRELU(u, dy) = !(u <= 0) ? dy : +0 (epilogue.h,
 * UK_SGRELU: a compare and an and); VGKEEP(u, lo, hi, hopen, g) = !(u <= lo) && (hopen || u < hi) ? g : +0
 * (UK_SGKEEP); VPOW2K(k) = 2^n for k = UK_EXP_MAGIC + n, n an integer in the
 * exponent's normal range (the integer sits in k's low mantissa bits: add the bias, shift it into the exponent). */
#define VADD_float(a, b) _mm256_add_ps((a), (b))
#define VDIV_float(a, b) _mm256_div_ps((a), (b))
#define VMAX_float(a, b) _mm256_max_ps((a), (b))
#define VMIN_float(a, b) _mm256_min_ps((a), (b))
#define VSELNEG_float(c, a, b) _mm256_blendv_ps((b), (a), _mm256_cmp_ps((c), _mm256_setzero_ps(), _CMP_LT_OQ))
#define VGRELU_float(u, dy) _mm256_and_ps(_mm256_cmp_ps((u), _mm256_setzero_ps(), _CMP_NLE_UQ), (dy))
#define VGKEEP_float(u, lo, hi, hopen, g)                                                                       \
    _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps((u), (lo), _CMP_NLE_UQ),                                         \
                                _mm256_or_ps(_mm256_cmp_ps((u), (hi), _CMP_LT_OQ),                             \
                                             _mm256_castsi256_ps(_mm256_set1_epi32((hopen) ? -1 : 0)))),        \
                  (g))
#define VPOW2K_float(k) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(k), _mm256_set1_epi32(127)), 23))
#define VADD_double(a, b) _mm256_add_pd((a), (b))
#define VDIV_double(a, b) _mm256_div_pd((a), (b))
#define VMAX_double(a, b) _mm256_max_pd((a), (b))
#define VMIN_double(a, b) _mm256_min_pd((a), (b))
#define VSELNEG_double(c, a, b) _mm256_blendv_pd((b), (a), _mm256_cmp_pd((c), _mm256_setzero_pd(), _CMP_LT_OQ))
#define VGRELU_double(u, dy) _mm256_and_pd(_mm256_cmp_pd((u), _mm256_setzero_pd(), _CMP_NLE_UQ), (dy))
#define VGKEEP_double(u, lo, hi, hopen, g)                                                                      \
    _mm256_and_pd(_mm256_and_pd(_mm256_cmp_pd((u), (lo), _CMP_NLE_UQ),                                         \
                                _mm256_or_pd(_mm256_cmp_pd((u), (hi), _CMP_LT_OQ),                             \
                                             _mm256_castsi256_pd(_mm256_set1_epi64x((hopen) ? -1 : 0)))),       \
                  (g))
#define VPOW2K_double(k) \
    _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_add_epi64(_mm256_castpd_si256(k), _mm256_set1_epi64x(1023)), 52))

#endif /* BN_VEC_AVX2_H */
