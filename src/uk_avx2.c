/* AVX2 + FMA microkernels. Compiled with -mavx2 -mfma for this file only; reached through dispatch.c
 * after CPUID says the CPU and OS support both. */
#include <immintrin.h>

#include "ukernels.h"

#define ISA avx2
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
#define DHSUM(v) hsum_pd(v)
#define UK_SFENCE() _mm_sfence()
/* all-ones in the 64-bit lanes 0 .. n - 1 */
#define UK_TAIL4(n) _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3))
#define DKEEP_N(v, n) _mm256_and_pd((v), _mm256_castsi256_pd(UK_TAIL4(n)))

static inline double hsum_pd(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

/* float32: stored and computed as float */
#define S f32
#define TS float
#define TC float
#define V __m256
#define VL 8
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSET1(s) _mm256_set1_ps(s)
#define VSUB(a, b) _mm256_sub_ps((a), (b))
#define VFMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define SFMA(a, b, c) __builtin_fmaf((a), (b), (c))
#define VBLEND_N(n, a, b) \
    _mm256_blendv_ps((b), (a), _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n)), \
                                                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))))
/* storage I/O: float <-> float, float -> double */
#define LOAD_TS(p) (*(p))
#define STORE_TS(p, v) (*(p) = (v))
#define DLOAD1_TS(p) ((double)*(p))
#define VLOAD_TS(p) _mm256_loadu_ps(p)
#define VSTORE_TS(p, v) _mm256_storeu_ps((p), (v))
#ifdef __SANITIZE_ADDRESS__ /* ASan does not instrument streaming stores: check them as regular ones */
#define VSTREAM_TS(p, v) VSTORE_TS(p, v)
#else
#define VSTREAM_TS(p, v) _mm256_stream_ps((p), (v))
#endif
#define DLOAD_TS(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#define DLOAD_TS_N(p, n) \
    _mm256_cvtps_pd(_mm_maskload_ps((p), _mm_cmpgt_epi32(_mm_set1_epi32((int)(n)), _mm_setr_epi32(0, 1, 2, 3))))
#include "ukernels.inc"
#include "uk_undef_type.h"

/* float64: stored and computed as double */
#define S f64
#define TS double
#define TC double
#define V __m256d
#define VL 4
#define VLOAD(p) _mm256_loadu_pd(p)
#define VSET1(s) _mm256_set1_pd(s)
#define VSUB(a, b) _mm256_sub_pd((a), (b))
#define VFMA(a, b, c) _mm256_fmadd_pd((a), (b), (c))
#define SFMA(a, b, c) __builtin_fma((a), (b), (c))
#define VBLEND_N(n, a, b) _mm256_blendv_pd((b), (a), _mm256_castsi256_pd(UK_TAIL4(n)))
/* storage I/O: double <-> double */
#define LOAD_TS(p) (*(p))
#define STORE_TS(p, v) (*(p) = (v))
#define DLOAD1_TS(p) (*(p))
#define VLOAD_TS(p) _mm256_loadu_pd(p)
#define VSTORE_TS(p, v) _mm256_storeu_pd((p), (v))
#ifdef __SANITIZE_ADDRESS__ /* ASan does not instrument streaming stores: check them as regular ones */
#define VSTREAM_TS(p, v) VSTORE_TS(p, v)
#else
#define VSTREAM_TS(p, v) _mm256_stream_pd((p), (v))
#endif
#define DLOAD_TS(p) _mm256_loadu_pd(p)
#define DLOAD_TS_N(p, n) _mm256_maskload_pd((p), UK_TAIL4(n))
#include "ukernels.inc"
