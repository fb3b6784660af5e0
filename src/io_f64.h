/* Storage I/O of float64 data, computed in double: one section per ISA, each defining the storage vocabulary that
 * ukernels.inc documents (loads that widen to the compute type and to double, the narrowing stores, their masked and
 * streaming forms; for double data, plain loads and stores). uk_<isa>.c includes it, after its vec_<isa>.h, for an
 * instantiation with TS = TC = double; uk_undef_type.h ends it. No include guard: each instantiation includes it. */
_Static_assert(_Generic((TS)0, double: 1, default: 0) && _Generic((TC)0, double: 1, default: 0),
               "io_f64.h: double data computed in double");

#if defined(UK_ISA_SCALAR)
#define LOAD_TS(p) (*(p))
#define STORE_TS(p, v) (*(p) = (v))
#define DLOAD1_TS(p) (*(p))
#define VLOAD_TS(p) LOAD_TS(p) /* (a vector is one element) */
#define VSTORE_TS(p, v) STORE_TS(p, v)
#define VSTREAM_TS(p, v) STORE_TS(p, v)
#define DLOAD_TS(p) DLOAD1_TS(p)
#define DLOAD_TS_N(p, n) DLOAD_TS(p) /* DL == 1: segments have no tail */

#elif defined(UK_ISA_AVX2)
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

#elif defined(UK_ISA_AVX512)
#define LOAD_TS(p) (*(p))
#define STORE_TS(p, v) (*(p) = (v))
#define DLOAD1_TS(p) (*(p))
#define VLOAD_TS(p) _mm512_loadu_pd(p)
#define VSTORE_TS(p, v) _mm512_storeu_pd((p), (v))
#ifdef __SANITIZE_ADDRESS__ /* as above */
#define VSTREAM_TS(p, v) VSTORE_TS(p, v)
#else
#define VSTREAM_TS(p, v) _mm512_stream_pd((p), (v))
#endif
#define VLOAD_TS_N(p, n) _mm512_maskz_loadu_pd(UK_TAIL8(n), (p))
#define VLOAD_TS_PART(p, n) VLOAD_TS_N(p, n)
#define VSTORE_TS_N(p, v, n) _mm512_mask_storeu_pd((p), UK_TAIL8(n), (v))
#define DLOAD_TS(p) _mm512_loadu_pd(p)
#define DLOAD_TS_N(p, n) _mm512_maskz_loadu_pd(UK_TAIL8(n), (p))

#else
#error "io_f64.h has no section for this ISA"
#endif
