/* Storage I/O of float32 data, computed in float: one section per ISA, each defining the storage vocabulary that
 * ukernels.inc documents (loads that widen to the compute type and to double, the narrowing stores, their masked and
 * streaming forms). uk_<isa>.c includes it, after its vec_<isa>.h, for an instantiation with TS = TC = float;
 * uk_undef_type.h ends it. No include guard: each instantiation includes it. A storage dtype is one file like this
 * (docs/design.md, "The kernel layer"). */
_Static_assert(_Generic((TS)0, float: 1, default: 0) && _Generic((TC)0, float: 1, default: 0),
               "io_f32.h: float data computed in float");

#if defined(UK_ISA_SCALAR)
#define LOAD_TS(p) (*(p))
#define STORE_TS(p, v) (*(p) = (v))
#define DLOAD1_TS(p) ((double)*(p))
#define VLOAD_TS(p) LOAD_TS(p) /* (a vector is one element) */
#define VSTORE_TS(p, v) STORE_TS(p, v)
#define VSTREAM_TS(p, v) STORE_TS(p, v)
#define DLOAD_TS(p) DLOAD1_TS(p)
#define DLOAD_TS_N(p, n) DLOAD_TS(p) /* DL == 1: segments have no tail */

#elif defined(UK_ISA_AVX2)
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
/* the first n < VL elements of a vector, the others 0, not read (a masked load; no masked store on this ISA, so no
 * VLOAD_TS_N: the element-wise tails stay scalar) */
#define VLOAD_TS_PART(p, n) \
    _mm256_maskload_ps((p), _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)))

#elif defined(UK_ISA_AVX512)
#define LOAD_TS(p) (*(p))
#define STORE_TS(p, v) (*(p) = (v))
#define DLOAD1_TS(p) ((double)*(p))
#define VLOAD_TS(p) _mm512_loadu_ps(p)
#define VSTORE_TS(p, v) _mm512_storeu_ps((p), (v))
#ifdef __SANITIZE_ADDRESS__ /* as above */
#define VSTREAM_TS(p, v) VSTORE_TS(p, v)
#else
#define VSTREAM_TS(p, v) _mm512_stream_ps((p), (v))
#endif
#define VLOAD_TS_N(p, n) _mm512_maskz_loadu_ps(UK_TAIL16(n), (p))
#define VLOAD_TS_PART(p, n) VLOAD_TS_N(p, n)
#define VSTORE_TS_N(p, v, n) _mm512_mask_storeu_ps((p), UK_TAIL16(n), (v))
#define DLOAD_TS(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define DLOAD_TS_N(p, n) \
    _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_maskz_loadu_ps((__mmask16)UK_TAIL8(n), (p))))

#else
#error "io_f32.h has no section for this ISA"
#endif
