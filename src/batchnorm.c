/* Batch-norm drivers for float32 and float64: see batchnorm.inc and include/bn_simd.h. */
#include <math.h>
#include <stdlib.h>

#include "bn_simd.h"
#include "dispatch.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Reduction chunk: small enough that the second statistics pass over it hits L1/L2. The result
 * depends on this constant (the order of additions), never on the thread count. */
#define BN_CHUNK_BYTES 32768
#define BN_CL_CHUNK_BYTES (256 << 10)
/* Per-channel slab (all inputs together) below which forward/backward fuse the reduction and the
 * element-wise sweep, so that the slab crosses DRAM once. Zen 4: 1 MiB L2 per core, 32 MiB L3. */
#define BN_FUSE_BYTES (4 << 20)
#define BN_FUSE_MAX_CHUNKS (BN_FUSE_BYTES / BN_CHUNK_BYTES + 1)
/* Below this many elements a call runs on one thread: the fork costs more than it saves. */
#define BN_MIN_PARALLEL_ELEMS 32768

static int valid_dims(int64_t outer, int64_t C, int64_t inner) { return outer >= 0 && C >= 0 && inner >= 0; }

/* (outer, 1, inner) is the same memory as (1, 1, outer * inner): one long channels-first run. */
static void canonical_view(int64_t* outer, int64_t C, int64_t* inner) {
    if (C == 1) {
        *inner *= *outer;
        *outer = 1;
    }
}

static int pick_threads(int nthreads, int64_t tasks, int64_t elems) {
#ifdef _OPENMP
    int64_t nt = nthreads > 0 ? nthreads : omp_get_max_threads();
    if (elems < BN_MIN_PARALLEL_ELEMS) nt = 1;
    if (nt > tasks) nt = tasks;
    return nt < 1 ? 1 : (int)nt;
#else
    (void)nthreads;
    (void)tasks;
    (void)elems;
    return 1;
#endif
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static double clamp0(double v) { return v > 0.0 ? v : 0.0; }

/* Combine K chunk results (mean_k, M2_k, read with stride) into the mean and biased variance of n
 * elements; every chunk holds L elements but the last. Exact two-pass over the chunk means, in a
 * fixed order: mean = sum n_k mean_k / n, M2 = sum (M2_k + n_k (mean_k - mean)^2). */
static void combine_chunks(const double* mean_k, const double* m2_k, int64_t stride, int64_t K, int64_t n,
                           int64_t L, double* mean, double* var) {
    double s = 0.0;
    for (int64_t k = 0; k < K; k++) s += (double)(k < K - 1 ? L : n - (K - 1) * L) * mean_k[k * stride];
    const double mu = s / (double)n;
    double m2 = 0.0;
    for (int64_t k = 0; k < K; k++) {
        const double dk = mean_k[k * stride] - mu;
        m2 += m2_k[k * stride] + (double)(k < K - 1 ? L : n - (K - 1) * L) * dk * dk;
    }
    *mean = mu;
    *var = m2 / (double)n;
}

/* combine_chunks for K rows of C channels (mean_k[k * C + c], M2_k[k * C + c]), swept row by row. */
static void combine_chunk_rows(const double* mean_k, const double* m2_k, int64_t K, int64_t C, int64_t n, int64_t L,
                               double* mean, double* var) {
    for (int64_t c = 0; c < C; c++) mean[c] = var[c] = 0.0;
    for (int64_t k = 0; k < K; k++) {
        const double w = (double)(k < K - 1 ? L : n - (K - 1) * L);
        for (int64_t c = 0; c < C; c++) mean[c] += w * mean_k[k * C + c];
    }
    for (int64_t c = 0; c < C; c++) mean[c] /= (double)n;
    for (int64_t k = 0; k < K; k++) {
        const double w = (double)(k < K - 1 ? L : n - (K - 1) * L);
        for (int64_t c = 0; c < C; c++) {
            const double dk = mean_k[k * C + c] - mean[c];
            var[c] += m2_k[k * C + c] + w * dk * dk;
        }
    }
    for (int64_t c = 0; c < C; c++) var[c] /= (double)n;
}

#define T float
#define S f32
#define UK_T bn_uk_f32
#define UK() bn_uk_active_f32()
#include "batchnorm.inc"
#undef T
#undef S
#undef UK_T
#undef UK

#define T double
#define S f64
#define UK_T bn_uk_f64
#define UK() bn_uk_active_f64()
#include "batchnorm.inc"
