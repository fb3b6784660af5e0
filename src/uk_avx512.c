/* AVX-512F microkernels. Compiled with -mavx512f -mavx2 -mfma for this file only; reached through dispatch.c
 * after CPUID says the CPU and OS support AVX-512F. */
#include <immintrin.h>

#include "ukernels.h"

#define ISA avx512
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
#define DHSUM(v) _mm512_reduce_add_pd(v)
#define UK_TAIL8(n) ((__mmask8)((1u << (n)) - 1)) /* lanes 0 .. n - 1 */
#define DKEEP_N(v, n) _mm512_maskz_mov_pd(UK_TAIL8(n), (v))
#define UK_SFENCE() _mm_sfence()
#define UK_WIDE_STRIPS 1 /* 32 vector registers */

/* float32: stored and computed as float */
#define S f32
#define TS float
#define TC float
#define V __m512
#define VL 16
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSET1(s) _mm512_set1_ps(s)
#define VSUB(a, b) _mm512_sub_ps((a), (b))
#define VFMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define SFMA(a, b, c) __builtin_fmaf((a), (b), (c))
#define UK_TAIL16(n) ((__mmask16)((1u << (n)) - 1))
#define VBLEND_N(n, a, b) _mm512_mask_blend_ps(UK_TAIL16(n), (b), (a))
/* storage I/O: float <-> float, float -> double */
#define LOAD_TS(p) (*(p))
#define STORE_TS(p, v) (*(p) = (v))
#define DLOAD1_TS(p) ((double)*(p))
#define VLOAD_TS(p) _mm512_loadu_ps(p)
#define VSTORE_TS(p, v) _mm512_storeu_ps((p), (v))
#ifdef __SANITIZE_ADDRESS__ /* ASan does not instrument streaming stores: check them as regular ones */
#define VSTREAM_TS(p, v) VSTORE_TS(p, v)
#else
#define VSTREAM_TS(p, v) _mm512_stream_ps((p), (v))
#endif
#define VLOAD_TS_N(p, n) _mm512_maskz_loadu_ps(UK_TAIL16(n), (p))
#define VSTORE_TS_N(p, v, n) _mm512_mask_storeu_ps((p), UK_TAIL16(n), (v))
#define DLOAD_TS(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define DLOAD_TS_N(p, n) \
    _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_maskz_loadu_ps((__mmask16)UK_TAIL8(n), (p))))
#include "ukernels.inc"
#include "uk_undef_type.h"

/* float64: stored and computed as double */
#define S f64
#define TS double
#define TC double
#define V __m512d
#define VL 8
#define VLOAD(p) _mm512_loadu_pd(p)
#define VSET1(s) _mm512_set1_pd(s)
#define VSUB(a, b) _mm512_sub_pd((a), (b))
#define VFMA(a, b, c) _mm512_fmadd_pd((a), (b), (c))
#define SFMA(a, b, c) __builtin_fma((a), (b), (c))
#define VBLEND_N(n, a, b) _mm512_mask_blend_pd(UK_TAIL8(n), (b), (a))
/* storage I/O: double <-> double */
#define LOAD_TS(p) (*(p))
#define STORE_TS(p, v) (*(p) = (v))
#define DLOAD1_TS(p) (*(p))
#define VLOAD_TS(p) _mm512_loadu_pd(p)
#define VSTORE_TS(p, v) _mm512_storeu_pd((p), (v))
#ifdef __SANITIZE_ADDRESS__ /* ASan does not instrument streaming stores: check them as regular ones */
#define VSTREAM_TS(p, v) VSTORE_TS(p, v)
#else
#define VSTREAM_TS(p, v) _mm512_stream_pd((p), (v))
#endif
#define VLOAD_TS_N(p, n) _mm512_maskz_loadu_pd(UK_TAIL8(n), (p))
#define VSTORE_TS_N(p, v, n) _mm512_mask_storeu_pd((p), UK_TAIL8(n), (v))
#define DLOAD_TS(p) _mm512_loadu_pd(p)
#define DLOAD_TS_N(p, n) _mm512_maskz_loadu_pd(UK_TAIL8(n), (p))
#include "ukernels.inc"
