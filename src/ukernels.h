/*
 * Microkernels: the only ISA-specific code. Each works on one contiguous run of memory and never
 * allocates, threads or reads past its n / rows * C elements. The drivers in batchnorm.c do blocking,
 * threading and the combination of partial results; they reach the kernels through a table.
 *
 * seg_*: channels-first, nseg consecutive runs (segments) of len elements, segment j of channel j
 *        (per-channel arrays indexed by j); the reductions take `rows` such runs, rs elements apart.
 * cl_* : channels-last, `rows` rows of C channels each (row stride C; per-channel arrays of C). The
 *        element-wise cl_ kernels take extended per-channel arrays: p[i] = p[i % C] for i < C + UK_MAX_VL.
 * Element-wise kernels take nt: UK_STORE (regular stores), UK_STREAM (streaming, non-temporal stores, fenced before
 * the kernel returns) or, channels-first only, UK_STREAM_NOFENCE (streaming stores that the caller fences, once after
 * many short calls, before the data is read by another thread: a fence waits for the stores to leave the core).
 * Reductions widen to double before they add: float32 sums neither drift over long runs nor overflow at
 * |x| ~ 1e38; the means they subtract (m) are double. Apply kernels compute in T.
 */
#ifndef BN_UKERNELS_H
#define BN_UKERNELS_H

#include <stdint.h>

/* How far ahead of their loads the channels-first float32 reductions prefetch (bytes; ukernels.inc), and how far
 * past a chunk their callers let them (batchnorm.c, cf_pf_after). */
#define BN_SEG_PF_BYTES 8192

/* Store modes of the element-wise kernels (their nt argument) */
#define UK_STORE 0
#define UK_STREAM 1
#define UK_STREAM_NOFENCE 2

/* The widest vector of any kernel, in elements (AVX-512, float32). */
#define UK_MAX_VL 16

#define BN_UK_TABLE(T, S)                                                                                 \
    typedef struct {                                                                                      \
        /* acc[j] += sum of segment j over the rows (x[r rs + j len .. r rs + (j + 1) len), r < rows).      \
         * pf >= 0 with rows == 1: the pf elements after the run x[0 .. nseg len) are in the same array and  \
         * read next; the kernel may prefetch them (a prefetch is not a read; the AddressSanitizer build makes \
         * it one, so that it is checked). pf < 0: no prefetch. The same for seg_dev and seg_bwd_sums, which \
         * also takes, with rows > 1, pf > 0 elements after each row's run that are in the same row and read  \
         * next (the next block's runs; 0: none is) */                                                      \
        void (*seg_sum)(const T* x, int64_t rows, int64_t rs, int64_t nseg, int64_t len, double* acc,      \
                        int64_t pf);                                                                      \
        /* s1[j] += sum (x - m[j]), s2[j] += sum (x - m[j])^2 over segment j of every row */               \
        void (*seg_dev)(const T* x, int64_t rows, int64_t rs, int64_t nseg, int64_t len, const double* m,  \
                        double* s1, double* s2, int64_t pf);                                              \
        /* y = (x - m[j]) * a[j] + b[j] over segment j */                                                 \
        void (*seg_affine)(const T* x, T* y, int64_t nseg, int64_t len, const T* m, const T* a,           \
                           const T* b, int nt);                                                           \
        /* sdy[j] += sum dy, sdyx[j] += sum dy * (x - m[j]) over segment j of every row */                \
        void (*seg_bwd_sums)(const T* dy, const T* x, int64_t rows, int64_t rs, int64_t nseg, int64_t len,  \
                             const double* m, double* sdy, double* sdyx, int64_t pf);                     \
        /* dx = a[j] * dy + b[j] * (x - m[j]) + d[j] over segment j */                                    \
        void (*seg_bwd_apply)(const T* dy, const T* x, T* dx, int64_t nseg, int64_t len, const T* m,      \
                              const T* a, const T* b, const T* d, int nt);                                \
        /* acc[c] += sum_r x[r, c] for the W <= C channels c < W of rows C elements apart (W < C: a column    \
         * block, see UK_CL_STRIPS; it prefetches nothing). pf_rows >= 0: rows after these in the same array \
         * (the caller's next chunk), the first block of which is prefetched (not read, but for the          \
         * AddressSanitizer build's checked loads); the same for cl_dev, cl_bwd_sums */                     \
        void (*cl_sum)(const T* x, int64_t rows, int64_t C, int64_t W, double* acc, int64_t pf_rows);     \
        /* s1[c] += sum_r (x[r, c] - m[c]), s2[c] += sum_r (x[r, c] - m[c])^2 */                          \
        void (*cl_dev)(const T* x, int64_t rows, int64_t C, int64_t W, const double* m, double* s1,       \
                       double* s2, int64_t pf_rows);                                                      \
        /* y[e] = (x[e] - m[c]) * a[c] + b[c] over n flat elements, c = (c0 + e) % C; m, a, b extended;    \
         * il: NULL, or the same coefficients interleaved in groups of vl channels from channel io < C (C a  \
         * multiple of vl; see cl_il_alloc in batchnorm.inc), which flat runs read instead when their       \
         * vectors start on a group */                                                                     \
        void (*cl_affine)(const T* x, T* y, int64_t n, int64_t C, int64_t c0, const T* m, const T* a,    \
                          const T* b, const T* il, int64_t io, int nt);                                   \
        /* sdy[c] += sum_r dy[r, c], sdyx[c] += sum_r dy[r, c] * (x[r, c] - m[c]) */                      \
        void (*cl_bwd_sums)(const T* dy, const T* x, int64_t rows, int64_t C, int64_t W, const double* m,  \
                            double* sdy, double* sdyx, int64_t pf_rows);                                  \
        /* dx[e] = a[c] * dy[e] + b[c] * (x[e] - m[c]) + d[c], as cl_affine */                            \
        void (*cl_bwd_apply)(const T* dy, const T* x, T* dx, int64_t n, int64_t C, int64_t c0, const T* m, \
                             const T* a, const T* b, const T* d, int nt);                                 \
        /* per-channel coefficients m, a, b of y = (x - m) a + b (weight, bias optional); returns non-zero  \
         * when some channel needs the float64 apply (see ukernels.inc). m, a, b: distinct arrays that no   \
         * input overlaps */                                                                               \
        int (*norm_params)(int64_t C, const double* mean, const double* var, const double* weight,        \
                           const double* bias, double eps, T* m, T* a, T* b);                             \
        /* backward coefficients m, a, b, d of dx = a dy + b (x - m) + d, and gw, gb (weight optional).    \
         * m, a, b, d: distinct arrays that no other argument overlaps; nor do gw, gb overlap sdy, sdyx */  \
        void (*bwd_params)(int64_t C, double n, const double* sdy, const double* sdyx, const double* mean,  \
                           const double* invstd, const double* weight, int training, double* gw, double* gb, \
                           T* m, T* a, T* b, T* d);                                                       \
        /* channels-last statistics: one chunk of cnt rows, s1 -> s1 (1 / cnt), s2 -> max(0, s2 - s1 s1 (1 / cnt)) */ \
        void (*cl_chunk_finish)(int64_t C, double cnt, double* s1, double* s2);                           \
        /* channels-last statistics: mean and var of channels c0 .. c1 - 1 from K chunk rows (ukernels.inc); \
         * mean, var: distinct arrays that no input overlaps */                                           \
        void (*cl_combine)(const double* mu0_k, const double* r_k, const double* m2_k, int64_t K, int64_t C, \
                           int64_t n, int64_t L, int64_t c0, int64_t c1, double* mean, double* var);      \
        /* out[c] = sum_k part[k C + c] in chunk order, c0 <= c < c1; out overlaps no input */             \
        void (*cl_sum_rows)(const double* part, int64_t K, int64_t C, int64_t c0, int64_t c1, double* out); \
        /* the vector length, in elements */                                                              \
        int vl;                                                                                           \
    } bn_uk_##S;

BN_UK_TABLE(float, f32)
BN_UK_TABLE(double, f64)
#undef BN_UK_TABLE

/* dispatch.c: the row size (bytes, all arrays) from which channels-last element-wise sweeps use column strips
 * (storing normally; streaming); at least BN_CL_STRIP_MIN_BYTES, so that such rows are wider than 2 vectors of any
 * ISA. */
int64_t bn_cl_strip_bytes(void);
int64_t bn_cl_stream_strip_bytes(void);
/* Whether a channels-last sweep touching `arrays` rows of row_bytes bytes each (data and coefficients) takes the
 * column strips (UK_CL_WIDE in ukernels.inc): from the threshold above for how it stores; a streamed output needs
 * rows of whole cache lines; streamed_only: never when it stores normally. */
int bn_cl_takes_strips(int64_t row_bytes, int arrays, int stream, int streamed_only);

extern const bn_uk_f32 bn_uk_f32_scalar, bn_uk_f32_avx2, bn_uk_f32_avx512;
extern const bn_uk_f64 bn_uk_f64_scalar, bn_uk_f64_avx2, bn_uk_f64_avx512;

#endif /* BN_UKERNELS_H */
