/* Storage I/O of bfloat16 data (the top 16 bits of a float32, stored as uint16_t patterns), computed in float: one
 * section per ISA, each defining the storage vocabulary that ukernels.inc documents. Widening is a 16-bit shift (exact;
 * on AVX-512 a word permutation into the high halves). Narrowing rounds the float result once, to nearest even, by
 * integer arithmetic on its bits (half.h, bn_bf16_from_f32: add 0x7FFF plus the kept part's last bit, keep the top
 * half; NaNs made quiet), the same operations lane-wise in every ISA, so every ISA stores the same bits
 * (tests/c/test_kernels.c). (AVX512-BF16's vcvtneps2bf16 is not used: it flushes subnormal inputs to zero, which IEEE
 * rounding, and these kernels, keep, and the test for such lanes cost what the instruction saved on a Zen 5:
 * docs/tuning.md, "bfloat16 narrowing by AVX512-BF16 (dropped)".) uk_<isa>.c includes this file after its vec_<isa>.h
 * for an instantiation with TS = uint16_t, TC = float; uk_undef_type.h ends it. Masked 16-bit loads and stores on
 * AVX-512 only (see io_f16.h). */
_Static_assert(_Generic((TS)0, uint16_t: 1, default: 0) && _Generic((TC)0, float: 1, default: 0),
               "io_bf16.h: bfloat16 patterns computed in float");
#include "half.h"
#define UK_IO_CONVERTS 1 /* (ukernels.inc: the conversions on their own, for the C kernel test) */

#if defined(UK_ISA_SCALAR)
#define LOAD_TS(p) bn_bf16_to_f32(*(p))
#define STORE_TS(p, v) (*(p) = bn_bf16_from_f32(v))
#define DLOAD1_TS(p) ((double)bn_bf16_to_f32(*(p)))
#define VLOAD_TS(p) LOAD_TS(p) /* (a vector is one element) */
#define VSTORE_TS(p, v) STORE_TS(p, v)
#define VSTREAM_TS(p, v) STORE_TS(p, v)
#define DLOAD_TS(p) DLOAD1_TS(p)
#define DLOAD_TS_N(p, n) DLOAD_TS(p) /* DL == 1: segments have no tail */

#elif defined(UK_ISA_AVX2)
#ifndef UK_BF16_AVX2_DEFINED
#define UK_BF16_AVX2_DEFINED
/* the top 16 bits of each 32-bit lane, gathered into the low 64 bits of each 128-bit half, then the halves joined */
static inline __m128i uk_bf16_top_halves_avx2(__m256i r) {
    const __m256i top = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                                         2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_shuffle_epi8(r, top), 0x08));
}
/* 8 floats rounded to bfloat16 (bn_bf16_from_f32 lane-wise), packed into 128 bits */
static inline __m128i uk_bf16_narrow_avx2(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd);
    /* a NaN: its own top half with the quiet bit (float32's bit 22, bfloat16's bit 6) */
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
    return uk_bf16_top_halves_avx2(r);
}
/* 8 floats that are bfloat16 values (widened, or NaNs): bn_bf16_from_f32's bits without its rounding, which leaves such
 * values as they are (their top halves, NaNs made quiet) */
static inline __m128i uk_bf16_narrow_exact_avx2(__m256 v) {
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return uk_bf16_top_halves_avx2(
        _mm256_or_si256(_mm256_castps_si256(v), _mm256_and_si256(nan, _mm256_set1_epi32(0x00400000))));
}
static inline __m256 uk_bf16_widen_avx2(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
/* 4 elements (the low 64 bits of h) as doubles */
static inline __m256d uk_bf16_dwiden_avx2(__m128i h) {
    return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h))); /* (each below 16 zeros) */
}
/* the first n < 4 elements at p as doubles, the other lanes 0 (their memory untouched) */
static inline __m256d uk_bf16_dload_n_avx2(const uint16_t* p, int64_t n) {
    uint16_t b[8] = {0};
    memcpy(b, p, (size_t)n * sizeof(uint16_t));
    return uk_bf16_dwiden_avx2(_mm_loadl_epi64((const __m128i*)b));
}
#endif
#define LOAD_TS(p) bn_bf16_to_f32(*(p))
#define STORE_TS(p, v) (*(p) = bn_bf16_from_f32(v))
#define DLOAD1_TS(p) ((double)bn_bf16_to_f32(*(p)))
#define VLOAD_TS(p) uk_bf16_widen_avx2(_mm_loadu_si128((const __m128i*)(p)))
#define VSTORE_TS(p, v) _mm_storeu_si128((__m128i*)(p), uk_bf16_narrow_avx2(v))
#define VSTORE_TS_EXACT(p, v) _mm_storeu_si128((__m128i*)(p), uk_bf16_narrow_exact_avx2(v))
#ifdef __SANITIZE_ADDRESS__ /* ASan does not instrument streaming stores: check them as regular ones */
#define VSTREAM_TS(p, v) VSTORE_TS(p, v)
#else
#define VSTREAM_TS(p, v) _mm_stream_si128((__m128i*)(p), uk_bf16_narrow_avx2(v))
#endif
#define DLOAD_TS(p) uk_bf16_dwiden_avx2(_mm_loadl_epi64((const __m128i*)(p)))
#define DLOAD_TS_N(p, n) uk_bf16_dload_n_avx2((p), (n))

#elif defined(UK_ISA_AVX512)
#ifndef UK_BF16_AVX512_DEFINED
#define UK_BF16_AVX512_DEFINED
/* Word permutations (vpermw, AVX-512BW and VL) move the patterns between the halves of dwords: one operation where a
 * zero extension and a shift (widening) or a shift and vpmovdw (narrowing) were two. uk_bf16_hi_avx512: each dword's
 * high word, packed into the low 256 bits; UK_BF16_LO2HI_IDX, with the mask: word j of the low 256 bits into dword j's
 * high half, its low half zero. The same bits; 0.85-0.91 of the time where the L3 holds the data on a Zen 4
 * (docs/tuning.md, "bfloat16 by word permutations (AVX-512)"). */
#define UK_BF16_HI_IDX                                                                                           \
    _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 31, 29, 27, 25, 23, 21, 19, 17, 15, \
                     13, 11, 9, 7, 5, 3, 1)
#define UK_BF16_LO2HI_IDX                                                                                        \
    _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, \
                     0, 0)
static inline __m256i uk_bf16_hi_avx512(__m512i r) {
    return _mm512_castsi512_si256(_mm512_permutexvar_epi16(UK_BF16_HI_IDX, r));
}
/* 16 floats rounded to bfloat16 (bn_bf16_from_f32 lane-wise: u + 0x7FFF + the kept part's last bit, a NaN's quiet bit
 * set), packed into 256 bits */
static inline __m256i uk_bf16_narrow_avx512(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd);
    return uk_bf16_hi_avx512(
        _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), u, _mm512_set1_epi32(0x400000)));
}
/* 16 floats that are bfloat16 values (or NaNs), as uk_bf16_narrow_exact_avx2 */
static inline __m256i uk_bf16_narrow_exact_avx512(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    return uk_bf16_hi_avx512(_mm512_mask_or_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), u,
                                                  _mm512_set1_epi32(0x400000)));
}
static inline __m512 uk_bf16_widen_avx512(__m256i h) {
    return _mm512_castsi512_ps(
        _mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, UK_BF16_LO2HI_IDX, _mm512_castsi256_si512(h)));
}
/* 8 elements (h's 128 bits) as doubles */
static inline __m512d uk_bf16_dwiden_avx512(__m128i h) {
    const __m256i w = _mm256_maskz_permutexvar_epi16(0xAAAAu, _mm512_castsi512_si256(UK_BF16_LO2HI_IDX),
                                                      _mm256_castsi128_si256(h));
    return _mm512_cvtps_pd(_mm256_castsi256_ps(w));
}
#endif
#define LOAD_TS(p) bn_bf16_to_f32(*(p))
#define STORE_TS(p, v) (*(p) = bn_bf16_from_f32(v))
#define DLOAD1_TS(p) ((double)bn_bf16_to_f32(*(p)))
#define VLOAD_TS(p) uk_bf16_widen_avx512(_mm256_loadu_si256((const __m256i*)(p)))
#define VSTORE_TS(p, v) _mm256_storeu_si256((__m256i*)(p), uk_bf16_narrow_avx512(v))
#define VSTORE_TS_EXACT(p, v) _mm256_storeu_si256((__m256i*)(p), uk_bf16_narrow_exact_avx512(v))
#ifdef __SANITIZE_ADDRESS__ /* as above */
#define VSTREAM_TS(p, v) VSTORE_TS(p, v)
#else
#define VSTREAM_TS(p, v) _mm256_stream_si256((__m256i*)(p), uk_bf16_narrow_avx512(v))
#endif
#define DLOAD_TS(p) uk_bf16_dwiden_avx512(_mm_loadu_si128((const __m128i*)(p)))
/* the first n < VL (DL) elements, by masked 16-bit loads and stores (as io_f16.h's) */
#define VLOAD_TS_N(p, n) uk_bf16_widen_avx512(_mm256_maskz_loadu_epi16(UK_TAIL16(n), (p)))
#define VLOAD_TS_PART(p, n) VLOAD_TS_N(p, n)
#define VSTORE_TS_N(p, v, n) _mm256_mask_storeu_epi16((p), UK_TAIL16(n), uk_bf16_narrow_avx512(v))
#define DLOAD_TS_N(p, n) uk_bf16_dwiden_avx512(_mm_maskz_loadu_epi16(UK_TAIL8(n), (p)))

#else
#error "io_bf16.h has no section for this ISA"
#endif
