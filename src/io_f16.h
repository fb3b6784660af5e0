/* Storage I/O of float16 data (IEEE binary16, stored as uint16_t patterns), computed in float: one section per ISA,
 * each defining the storage vocabulary that ukernels.inc documents. Loads widen exactly (to float for the apply
 * kernels, to double for the reductions); stores round the float result once, to nearest even (half.h states the
 * rules: Inf only past the range, subnormals kept, NaNs quiet). The vector conversions are F16C's vcvtph2ps /
 * vcvtps2ph with round-to-nearest-even (AVX-512F has their 512-bit forms), which give half.h's bits for every input
 * (tests/c/test_kernels.c); dispatch.c reaches these kernels only on CPUs with F16C. uk_<isa>.c includes this file
 * after its vec_<isa>.h for an instantiation with TS = uint16_t, TC = float; uk_undef_type.h ends it. Masked 16-bit
 * loads and stores on AVX-512 (BW's) give its tails, heads and partial loads (VLOAD_TS_N, VSTORE_TS_N, DLOAD_TS_N);
 * AVX2 has none: its element-wise tails are scalar loops, and its reductions' partial loads copy the n < DL elements
 * into a zeroed buffer (docs/tuning.md, "16-bit tails by masked loads and stores (AVX-512)"). */
_Static_assert(_Generic((TS)0, uint16_t: 1, default: 0) && _Generic((TC)0, float: 1, default: 0),
               "io_f16.h: float16 patterns computed in float");
#include "half.h"
#define UK_IO_CONVERTS 1 /* (ukernels.inc: the conversions on their own, for the C kernel test) */

#if defined(UK_ISA_SCALAR)
#define LOAD_TS(p) bn_f16_to_f32(*(p))
#define STORE_TS(p, v) (*(p) = bn_f16_from_f32(v))
#define DLOAD1_TS(p) ((double)bn_f16_to_f32(*(p)))
#define VLOAD_TS(p) LOAD_TS(p) /* (a vector is one element) */
#define VSTORE_TS(p, v) STORE_TS(p, v)
#define VSTREAM_TS(p, v) STORE_TS(p, v)
#define DLOAD_TS(p) DLOAD1_TS(p)
#define DLOAD_TS_N(p, n) DLOAD_TS(p) /* DL == 1: segments have no tail */

#elif defined(UK_ISA_AVX2)
#define UK_F16_RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define LOAD_TS(p) _cvtsh_ss(*(p))
#define STORE_TS(p, v) (*(p) = (uint16_t)_cvtss_sh((v), UK_F16_RNE))
#define DLOAD1_TS(p) ((double)_cvtsh_ss(*(p)))
#define VLOAD_TS(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p)))
#define VSTORE_TS(p, v) _mm_storeu_si128((__m128i*)(p), _mm256_cvtps_ph((v), UK_F16_RNE))
#ifdef __SANITIZE_ADDRESS__ /* ASan does not instrument streaming stores: check them as regular ones */
#define VSTREAM_TS(p, v) VSTORE_TS(p, v)
#else
#define VSTREAM_TS(p, v) _mm_stream_si128((__m128i*)(p), _mm256_cvtps_ph((v), UK_F16_RNE))
#endif
#define DLOAD_TS(p) _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(p))))
#ifndef UK_F16_AVX2_DEFINED
#define UK_F16_AVX2_DEFINED
/* the first n < 4 elements at p as doubles, the other lanes 0 (their memory untouched) */
static inline __m256d uk_f16_dload_n_avx2(const uint16_t* p, int64_t n) {
    uint16_t b[8] = {0};
    memcpy(b, p, (size_t)n * sizeof(uint16_t));
    return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)b)));
}
#endif
#define DLOAD_TS_N(p, n) uk_f16_dload_n_avx2((p), (n))

#elif defined(UK_ISA_AVX512)
#define UK_F16_RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define LOAD_TS(p) _cvtsh_ss(*(p))
#define STORE_TS(p, v) (*(p) = (uint16_t)_cvtss_sh((v), UK_F16_RNE))
#define DLOAD1_TS(p) ((double)_cvtsh_ss(*(p)))
#define VLOAD_TS(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p)))
#define VSTORE_TS(p, v) _mm256_storeu_si256((__m256i*)(p), _mm512_cvtps_ph((v), UK_F16_RNE))
#ifdef __SANITIZE_ADDRESS__ /* as above */
#define VSTREAM_TS(p, v) VSTORE_TS(p, v)
#else
#define VSTREAM_TS(p, v) _mm256_stream_si256((__m256i*)(p), _mm512_cvtps_ph((v), UK_F16_RNE))
#endif
#define DLOAD_TS(p) _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p))))
/* the first n < VL (DL) elements, by AVX-512BW's masked 16-bit loads and stores: the lanes left out are neither read
 * nor written (their loaded lanes 0) */
#define VLOAD_TS_N(p, n) _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(UK_TAIL16(n), (p)))
#define VLOAD_TS_PART(p, n) VLOAD_TS_N(p, n)
#define VSTORE_TS_N(p, v, n) _mm256_mask_storeu_epi16((p), UK_TAIL16(n), _mm512_cvtps_ph((v), UK_F16_RNE))
#define DLOAD_TS_N(p, n) _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_maskz_loadu_epi16(UK_TAIL8(n), (p))))

#else
#error "io_f16.h has no section for this ISA"
#endif
