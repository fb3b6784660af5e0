/* Batch-norm drivers for float32, float64, float16 and bfloat16: see batchnorm.inc and include/bn_simd.h. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bn_simd.h"
#include "dispatch.h"
#include "half.h"
#include "scratch.h"

/* bn_set_act_otf's setting (include/bn_simd.h): -1 the rule, 0 never, 1 always; read relaxed by the calls */
static int act_otf_mode = -1;
void bn_set_act_otf(int mode) { __atomic_store_n(&act_otf_mode, mode < 0 ? -1 : mode > 0, __ATOMIC_RELAXED); }
static int act_otf_forced(void) { return __atomic_load_n(&act_otf_mode, __ATOMIC_RELAXED); }

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

/* The drivers' scratch memory comes from the caller's workspace when a public API call was given one (scratch.h);
 * otherwise these are malloc and free. (After every system header: only the drivers below see them.) */
#define malloc(n) bn_scratch_malloc(n)
#define free(p) bn_scratch_free(p)

/* Reduction chunk: small enough that the second statistics pass over it hits L1/L2. The result
 * depends on this constant (the order of additions), never on the thread count. This and the block and
 * chunk sizes below: docs/tuning.md, "Channels-first chunk geometry", "Channels-last chunks and blocks". */
#define BN_CHUNK_BYTES 32768
#define BN_CL_CHUNK_BYTES (256 << 10)
#define BN_CL_MIN_ROWS 64
/* Channels-first blocks: channels are grouped until a block's run in one row has this many elements,
 * so that short rows (7x7, 14x14) still stream in long contiguous runs. */
#define BN_MIN_RUN 512
#define BN_MAX_BLOCK BN_MIN_RUN
/* A channels-first chunk spans as few rows as give each channel this many elements: one row when the
 * spatial size is at least this, so that a chunk is one contiguous run and chunk-major order streams
 * through memory; several rows for small maps, so that per-chunk partial results stay small. */
#define BN_CHUNK_MIN_PER_CHANNEL 256
/* Below this many elements a call runs on one thread: the fork costs more than it saves (docs/tuning.md,
 * "One thread below 32768 elements"). */
#define BN_MIN_PARALLEL_ELEMS 32768
/* The same for an element-wise sweep that is a call of its own (bn_apply: inference, and the normalise of a
 * channels-first training forward that takes the two sweeps), which does less per element: below this size a
 * second thread measured no faster than one, from it on faster (docs/tuning.md, "Sweeps of their own below 65536
 * elements"). */
#define BN_MIN_PARALLEL_SWEEP 65536
/* Invariants the drivers and kernels rely on. */
_Static_assert(BN_MAX_BLOCK >= BN_MIN_RUN, "a channel block's stack arrays hold BN_MIN_RUN channels");
_Static_assert(BN_MIN_RUN < BN_CHUNK_BYTES / 8, "a block's run fits one chunk, so only single channels split rows");
/* Thread counts that only an OpenMP build reads (BN_PAR evaluates none without OpenMP). */
#define BN_MAYBE_UNUSED __attribute__((unused))
/* BN_PAR(N, CLAUSES, statements): the statements on each thread th of a team of nth = N threads (CLAUSES: more
 * clauses of the parallel construct, such as a reduction, or nothing), or on the calling thread alone, th = 0 and
 * nth = 1, when N is 1: a parallel region of one thread is not free in libgomp (its end wakes the barrier's waiters
 * by a futex system call whether or not there are any: 0.3-0.5 us on the VMs measured, a third of a one-row RMS
 * norm; docs/tuning.md, "No parallel region for one thread"). The statements share their work out by th and nth
 * alone, never by omp_get_thread_num() or an orphaned `omp for`, and wait for the team by BN_TEAM_BARRIER(nth):
 * run alone from inside a caller's own parallel region, those would bind to the caller's team. BN_TEAM(fn, ...):
 * fn(..., th, nth) so, on a team of nt threads (a variable of that name). Limits: the statements are a macro argument
 * (no #pragma or #if lines in them: BN_ATOMIC, BN_TEAM_BARRIER), CLAUSES has no comma outside parentheses, N is
 * evaluated twice, and each body is compiled twice, the team's and the lone thread's (the drivers' object code
 * grew by about a quarter; a body moved into a function under BN_TEAM, as rownorm.inc's are, is compiled once).
 * In a forked child every BN_PAR runs on the calling thread (bn_forked_child, dispatch.h): the bodies share by th
 * and nth alone, so one thread does all of the shares, the same bits. Each thread of a team runs its share in the
 * caller's floating-point modes (bn_fpmode_enter, dispatch.h) and puts its own back after. */
#define BN_PRAGMA(x) _Pragma(#x)
#ifdef _OPENMP
#define BN_PAR(N, CLAUSES, ...)                                                                                     \
    do {                                                                                                            \
        if ((N) > 1 && !bn_forked_child) {                                                                          \
            const bn_fpmode bn_fpm_ = bn_fpmode_get();                                                              \
            BN_PRAGMA(omp parallel num_threads(N) CLAUSES copyin(bn_tls_ctx)) {                                     \
                const bn_fpmode bn_own_ = bn_fpmode_enter(bn_fpm_);                                                 \
                const int th BN_MAYBE_UNUSED = thread_id(), nth BN_MAYBE_UNUSED = team_size();                      \
                __VA_ARGS__                                                                                         \
                bn_fpmode_leave(bn_own_);                                                                           \
            }                                                                                                       \
        } else {                                                                                                    \
            const int th BN_MAYBE_UNUSED = 0, nth BN_MAYBE_UNUSED = 1;                                              \
            __VA_ARGS__                                                                                             \
        }                                                                                                           \
    } while (0)
#define BN_TEAM_BARRIER(n)                                                                                          \
    do {                                                                                                            \
        if ((n) > 1) {                                                                                              \
            _Pragma("omp barrier")                                                                                  \
        }                                                                                                           \
    } while (0)
#else
#define BN_PAR(N, CLAUSES, ...)                                                                                     \
    do {                                                                                                            \
        const int th BN_MAYBE_UNUSED = 0, nth BN_MAYBE_UNUSED = 1;                                                  \
        __VA_ARGS__                                                                                                 \
    } while (0)
#define BN_TEAM_BARRIER(n) (void)(n)
#endif
#define BN_TEAM(fn, ...) BN_PAR(nt, , fn(__VA_ARGS__, th, nth);)
/* An atomic access (kind: read, write) inside BN_PAR's statements; nothing without OpenMP */
#ifdef _OPENMP
#define BN_ATOMIC(kind) BN_PRAGMA(omp atomic kind)
#else
#define BN_ATOMIC(kind)
#endif
/* The iterations [lo, hi) of n of thread th of nth (the th and nth in scope): contiguous runs in thread order, the
 * later threads taking the one more when n does not divide (OpenMP's static schedule gives it to the first: no result
 * depends on the split); _STEP: of the multiples of step below n, [lo, hi) then the values of the thread's
 * multiples, hi at most n (a loop `for (v = lo; v < hi; v += step)` visits them) */
#define BN_SHARE(n, lo, hi) const int64_t lo = (int64_t)(n) * th / nth, hi = (int64_t)(n) * (th + 1) / nth
#define BN_SHARE_STEP(n, step, lo, hi)                                                                              \
    const int64_t lo = ((n) + (step) - 1) / (step) * th / nth * (step),                                             \
                  hi##_ = ((n) + (step) - 1) / (step) * (th + 1) / nth * (step), hi = hi##_ < (n) ? hi##_ : (n)

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
    if (nt > omp_get_thread_limit()) nt = omp_get_thread_limit();
    if (nt > BN_MAX_THREADS) nt = BN_MAX_THREADS;
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

/* Threads for an element-wise sweep of elems elements that no reduction precedes (see BN_MIN_PARALLEL_SWEEP). */
static int pick_sweep_threads(int nthreads, int64_t elems) {
    return elems < BN_MIN_PARALLEL_SWEEP ? 1 : pick_threads(nthreads, elems, elems);
}

/* Elements of esize bytes from y to its first 64-byte cache-line boundary, or -1 when y is not aligned to esize (the
 * channels-last runs' first vector, UK_CL_WIDE: cl_coef_alloc and cl_il_alloc place their arrays to match it). */
static int64_t line_head(const void* y, size_t esize) {
    const uintptr_t mis = (uintptr_t)y % 64;
    return mis % esize ? -1 : (int64_t)((64 - mis) % 64 / esize);
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static int stream_stores(int64_t bytes_touched) { return bytes_touched > bn_stream_bytes(); }

/* Orders this thread's streaming stores (UK_STREAM_NOFENCE) before whatever it does next. */
static void store_fence(void) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_sfence();
#endif
}

/* Thread t of n's share [*e0, *e1) of E elements: contiguous, cut at multiples of 16 elements (whole cache
 * lines for aligned float32 data) so that no two threads write the same line. */
static void thread_range(int64_t E, int t, int n, int64_t* e0, int64_t* e1) {
    const int64_t share = ((E + n - 1) / n + 15) & ~(int64_t)15;
    *e0 = share * t < E ? share * t : E;
    *e1 = share * (t + 1) < E ? share * (t + 1) : E;
}

/* The kernels' descriptor (ukernels.h) of a call's epilogue ep whose output starts at y: *ke = k filled, or NULL when
 * ep asks for nothing. 0 when ep is invalid (an unknown act, clamp bounds not lo <= hi, a non-finite slope). */
static int epi_kernel(const bn_epilogue* ep, const void* y, bn_uk_epi* k, const bn_uk_epi** ke) {
    *ke = NULL;
    if (!ep) return 1;
    if (ep->act < BN_ACT_NONE || ep->act > BN_ACT_SILU) return 0;
    if (ep->act == BN_ACT_CLAMP && !(ep->lo <= ep->hi)) return 0;
    if (ep->act == BN_ACT_LEAKY && !isfinite(ep->slope)) return 0;
    if (ep->act == BN_ACT_NONE && !ep->residual) return 1;
    /* the kernels' three kinds (epilogue.h): SiLU, ReLU (a clamp to [0, inf]), and the piecewise-linear one for the
     * others */
    k->act = ep->act == BN_ACT_SILU ? 3 : ep->act == BN_ACT_CLAMP && ep->lo == 0.0 && ep->hi == INFINITY ? 2 : 1;
    k->res = ep->residual != NULL;
    k->lo = ep->act == BN_ACT_CLAMP ? ep->lo : -INFINITY;
    k->hi = ep->act == BN_ACT_CLAMP ? ep->hi : INFINITY;
    k->slope = ep->act == BN_ACT_LEAKY ? ep->slope : 1.0;
    k->rd = ep->residual ? (intptr_t)((uintptr_t)ep->residual - (uintptr_t)y) : 0;
    *ke = k;
    return 1;
}

/* Rows in chunk k + 1 of `rows` rows cut in chunks of R (0 after the last): what a channels-last reduction
 * kernel may prefetch after chunk k. */
static int64_t cl_rows_after(int64_t rows, int64_t R, int64_t k) {
    const int64_t left = rows - (k + 1) * R;
    return left <= 0 ? 0 : left < R ? left : R;
}

/* Channels-first geometry (see batchnorm.inc): blocks of cb channels, nb blocks, K chunks per block;
 * a chunk is R whole rows (P == 1) or one piece of PL elements of one row (P > 1 pieces per row). */
typedef struct {
    int64_t outer, C, inner, cb, nb, P, PL, R, K;
} cf_geom;

static cf_geom cf_geometry(int64_t outer, int64_t C, int64_t inner, size_t esize) {
    cf_geom g;
    const int64_t L = BN_CHUNK_BYTES / (int64_t)esize;
    g.outer = outer;
    g.C = C;
    g.inner = inner;
    g.cb = inner >= BN_MIN_RUN || inner < 1 ? 1 : (BN_MIN_RUN + inner - 1) / inner;
    if (g.cb > C) g.cb = C;
    g.nb = (C + g.cb - 1) / g.cb;
    if (inner > L) {
        g.P = (inner + L - 1) / L;
        g.PL = L;
        g.R = 1;
        g.K = outer * g.P;
    } else {
        g.P = 1;
        g.PL = inner;
        const int64_t rmax = L / (g.cb * inner) > 0 ? L / (g.cb * inner) : 1;
        const int64_t rmin = (BN_CHUNK_MIN_PER_CHANNEL + inner - 1) / inner;
        g.R = rmin < rmax ? rmin : rmax;
        g.K = (outer + g.R - 1) / g.R;
    }
    return g;
}

/* Rows [r0, r1) and inner range [i0, i1) of chunk k (the same in every block). */
static void cf_chunk(const cf_geom* g, int64_t k, int64_t* r0, int64_t* r1, int64_t* i0, int64_t* i1) {
    if (g->P == 1) {
        *r0 = k * g->R;
        *r1 = *r0 + g->R < g->outer ? *r0 + g->R : g->outer;
        *i0 = 0;
        *i1 = g->inner;
    } else {
        *r0 = k / g->P;
        *r1 = *r0 + 1;
        *i0 = (k % g->P) * g->PL;
        *i1 = *i0 + g->PL < g->inner ? *i0 + g->PL : g->inner;
    }
}

/* Elements of one channel in chunk k. */
static int64_t cf_chunk_count(const cf_geom* g, int64_t k) {
    int64_t r0, r1, i0, i1;
    cf_chunk(g, k, &r0, &r1, &i0, &i1);
    return (r1 - r0) * (i1 - i0);
}

static int64_t cf_block_channels(const cf_geom* g, int64_t b) {
    const int64_t c0 = b * g->cb;
    return g->C - c0 < g->cb ? g->C - c0 : g->cb;
}

/* Chunk k of block b as the seg_ reductions take it: ROWS rows, the first at offset BASE, row stride
 * C * inner, of the block's NSEG segments of LEN elements. */
#define CF_CHUNK_RUNS(g, b, k, BASE, ROWS, NSEG, LEN)                              \
    int64_t r0_, r1_, i0_, i1_;                                                    \
    cf_chunk((g), (k), &r0_, &r1_, &i0_, &i1_);                                    \
    const int64_t BASE = (r0_ * (g)->C + (b) * (g)->cb) * (g)->inner + i0_;        \
    const int64_t ROWS = r1_ - r0_, NSEG = cf_block_channels((g), (b)), LEN = i1_ - i0_

/* Task t of a channels-first reduction (chunk-major: block t % nb of chunk t / nb): its first element and, when it
 * is one row, its extent (one contiguous run); 0 when it spans several rows. */
static int64_t cf_task_run(const cf_geom* g, int64_t t, int64_t* base) {
    CF_CHUNK_RUNS(g, t % g->nb, t / g->nb, o, rows, nseg, len);
    *base = o;
    return rows == 1 ? nseg * len : 0;
}

/* Whether the backward sums' chunks of several rows prefetch the next block's runs (UK_ROWS_PF in ukernels.inc): for
 * maps of at least BN_ROWS_PF_MIN_LEN elements whose reduction reads at least BN_ROWS_PF_MIN_INPUT bytes (`arrays`
 * arrays of them), where it measured faster; with the data in L2, and on 3x3 and 4x4 maps, it did not gain
 * (docs/tuning.md, "Row prefetch for small-map backward sums"). */
#define BN_ROWS_PF_MIN_LEN 20
#define BN_ROWS_PF_MIN_INPUT ((int64_t)8 << 20)
static int cf_rows_pf(const cf_geom* g, int arrays, size_t esize) {
    return g->inner >= BN_ROWS_PF_MIN_LEN &&
           g->outer * g->C * g->inner * (int64_t)esize * arrays >= BN_ROWS_PF_MIN_INPUT;
}

/* The run in one row of block b + 1, which a chunk of several rows of block b prefetches (cf_rows_pf) when b + 1 < end,
 * the end of the blocks read next; 0 otherwise. */
static int64_t cf_next_block_run(const cf_geom* g, int64_t b, int64_t end) {
    return b + 1 < end ? cf_block_channels(g, b + 1) * g->inner : 0;
}

/* What the reduction kernels may prefetch after task t (their pf argument): the elements of the tasks after t that
 * continue its run in memory, single runs each starting where the one before ends, counted up to `ahead` at least;
 * 0 when none does. Maps of 16x16 up to a chunk (8192 float32 elements): tasks follow one another. Longer rows are
 * cut in pieces and the next task is the same piece of the next channel, elsewhere: only the piece itself is
 * prefetched. A chunk of several rows (smaller maps), when rows_pf (cf_rows_pf): the next block's run in each of its
 * rows, which the next task reads (0 after the last block). Whichever threads run them, the tasks are in the same
 * array. */
static int64_t cf_pf_after(const cf_geom* g, int64_t t, int64_t ahead, int rows_pf) {
    const int64_t b = t % g->nb;
    int64_t r0, r1, i0, i1;
    cf_chunk(g, t / g->nb, &r0, &r1, &i0, &i1);
    if (r1 - r0 > 1) return rows_pf ? cf_next_block_run(g, b, g->nb) : 0;
    int64_t b0, b1, pf = 0;
    int64_t n0 = cf_task_run(g, t, &b0);
    for (int64_t u = t + 1; n0 > 0 && pf < ahead && u < g->nb * g->K; u++) {
        const int64_t n1 = cf_task_run(g, u, &b1);
        if (n1 == 0 || b1 != b0 + n0) break;
        pf += n1;
        b0 = b1;
        n0 = n1;
    }
    return pf;
}

/* Chunk results and their combination. A chunk's mean is kept as its shift mu0_k (a data value or a first-pass
 * mean) and the small residual r_k = sum (x - mu0_k) / n_k, never added: mu0_k + r_k rounded to a double
 * would err by half an ulp of the mean, which n_k (mean_k - mean)^2 turns into a relative error of the
 * variance of up to eps |mean| / std (1.3e-9 measured for float64 data with |mean| / std = 3e8). The combination works
 * relative to chunk 0's shift, in chunk order:
 *   e_k = (mu0_k - mu0_0) + r_k,  m = sum n_k e_k / n,  mean = mu0_0 + m,  M2 = sum (M2_k + n_k (e_k - m)^2),
 * so its error is relative to the spread of the chunk means. A constant channel has r_k = 0 (float32: mu0_k is
 * the value itself) or all chunks alike, and gets its value back exactly. */
static inline double chunk_offset(double mu0_k, double mu0_0, double r_k) { return (mu0_k - mu0_0) + r_k; }

/* A chunk's shift from one of its values v: v, or 0 when v is infinite (x - v would be Inf - Inf = NaN at v itself, and
 * the mean NaN where the infinities of a channel all have one sign and PyTorch's is +-Inf; by 0, the sums give it). */
static inline double bn_shift_value(double v) { return isinf(v) ? 0.0 : v; }

/* A float64 chunk's shift from its first pass's mean mu of n values and its first value v: v when |mu - v| is within
 * the first pass's own rounding bound, n eps |mu|, else mu (an infinite mu: bn_shift_value(v)). A constant channel's
 * first-pass mean is off its value by that rounding (280 ulp for 4681 values of 3.3), and then s1 and s2 of n equal
 * deviations round apart: M2 came out ~1e-16 of n (v - mu)^2 (a variance of 4e-43) instead of 0, and the chunks'
 * residual means -1e-13. Shifted by v, they are 0. v is then as good a shift as mu: the error of M2 relative to M2 is
 * about eps (1 + (mean - shift)^2 / var) either way (see cf_chunk_stats). */
static inline double bn_f64_shift(double mu, double v, double n) {
    if (isinf(mu)) return bn_shift_value(v);
    return fabs(mu - v) <= n * DBL_EPSILON * fabs(mu) ? v : mu;
}

/* Mean and biased variance of block b's channels from its K chunk results (shift mk[k * cb + j], residual
 * rk[...], M2 m2k[...]). */
static void cf_combine_block(const cf_geom* g, int64_t b, const double* mk, const double* rk, const double* m2k,
                             double* mean, double* var) {
    const int64_t nc = cf_block_channels(g, b);
    const double n = (double)(g->outer * g->inner);
    for (int64_t j = 0; j < nc; j++) {
        double s = 0.0, m2 = 0.0;
        const double m0 = mk[j];
        for (int64_t k = 0; k < g->K; k++)
            s += (double)cf_chunk_count(g, k) * chunk_offset(mk[k * g->cb + j], m0, rk[k * g->cb + j]);
        const double m = s / n;
        for (int64_t k = 0; k < g->K; k++) {
            const double dk = chunk_offset(mk[k * g->cb + j], m0, rk[k * g->cb + j]) - m;
            m2 += m2k[k * g->cb + j] + (double)cf_chunk_count(g, k) * dk * dk;
        }
        mean[j] = bn_nan_canon(m0 + m);
        var[j] = bn_nan_canon(m2 / n);
    }
}

/* Block b's channel sums from its K chunk sums, in chunk order. */
static void cf_sum_block(const cf_geom* g, int64_t b, const double* gk, const double* hk, double* sdy, double* sdyx) {
    const int64_t nc = cf_block_channels(g, b);
    for (int64_t j = 0; j < nc; j++) {
        double s = 0.0, h = 0.0;
        for (int64_t k = 0; k < g->K; k++) {
            s += gk[k * g->cb + j];
            h += hk[k * g->cb + j];
        }
        sdy[j] = s;
        sdyx[j] = h;
    }
}

/* Channels-first slab path (training forward and backward, batchnorm.inc): a task takes a group of consecutive channel
 * blocks over all rows, reduces it and sweeps it at once, so the group's slab (outer x its channels x inner elements of
 * every array the call reads, and of the one it writes unless it streams it) must stay in the core's L2 (or, with the
 * budget dispatch.c gives AMD Zen 3 and Zen 4, in the L3) between the two. Groups are as large as fit, so that each
 * row's run of a group is as long as can be: a slab comes from memory in runs far apart, and the longer they are, the
 * better the hardware prefetchers keep up. Whether a CPU takes the path, and with what budget: docs/tuning.md, "Slab
 * budget per CPU". */

/* Blocks per task of g's slab path with nt threads, `arrays` arrays of esize-byte elements kept in the caches, or 0
 * when the call does not take it (no budget, or inputs of at most bn_slab_min_input bytes: input_bytes): the largest
 * group whose slab fits, and with which the tasks share out evenly enough (the busiest thread has at most 1.25 times
 * the average number of blocks). */
static int64_t cf_slab_blocks(const cf_geom* g, int nt, int arrays, size_t esize, int64_t input_bytes) {
    if (input_bytes <= bn_slab_min_input()) return 0;
    const int64_t block = g->outer * g->cb * g->inner * (int64_t)esize * arrays, budget = bn_slab_bytes();
    for (int64_t G = budget / block < g->nb ? budget / block : g->nb; G >= 1; G--) {
        const int64_t tasks = (g->nb + G - 1) / G, most = (tasks + nt - 1) / nt * G;
        if (4 * nt * most <= 5 * g->nb) return G;
    }
    return 0;
}

/* Whether the bytes at a and b (n of each) overlap. */
static int overlap(const void* a, const void* b, int64_t n) {
    const uintptr_t p = (uintptr_t)a, q = (uintptr_t)b;
    return p < q + (uintptr_t)n && q < p + (uintptr_t)n;
}

/* Channels-last column split. A call whose input the threads' L2 caches hold (BN_CL_COL_BYTES each, the arrays it
 * reads) and whose rows are wide gives each thread a block of whole channels over all rows for its reductions instead
 * of a share of the rows: the thread then combines its channels' chunks and computes their coefficients itself, on
 * data in its own L2, and no partial result crosses to another core. (The element-wise sweep that follows in the
 * training forward and the backward still splits the rows, see forward_train_cl.) Blocks are whole multiples of
 * BN_CL_COL_ALIGN channels (256 bytes of float32: whole cache lines when the rows are aligned; a multiple of every
 * ISA's vector of doubles, so that each channel's sums get the row split's bits, see UK_CL_STRIPS), shared out as
 * evenly as whole multiples allow (docs/tuning.md, "Column split of the reductions"). */
#define BN_CL_COL_ALIGN 64
#define BN_CL_COL_BYTES ((int64_t)512 << 10)
_Static_assert(BN_CL_COL_ALIGN >= UK_MAX_VL, "the column split's first block holds the channels extend_tail copies");

/* Threads of a column split of a (rows, C) channels-last call reading `bytes` bytes, or 0: row split. */
static int cl_col_threads(int nthreads, int64_t rows, int64_t C, int64_t bytes) {
    if (C < 2 * BN_CL_COL_ALIGN) return 0;
    const int nt = pick_threads(nthreads, C / BN_CL_COL_ALIGN, rows * C);
    return nt > 1 && bytes <= nt * BN_CL_COL_BYTES ? nt : 0;
}

/* Thread t of n's channels [*c0, *c1) in a column split (n at most C / BN_CL_COL_ALIGN: each gets a block) */
static void cl_col_range(int64_t C, int t, int n, int64_t* c0, int64_t* c1) {
    const int64_t blocks = (C + BN_CL_COL_ALIGN - 1) / BN_CL_COL_ALIGN;
    const int64_t b0 = blocks * t / n, b1 = blocks * (t + 1) / n;
    *c0 = b0 * BN_CL_COL_ALIGN < C ? b0 * BN_CL_COL_ALIGN : C;
    *c1 = b1 * BN_CL_COL_ALIGN < C ? b1 * BN_CL_COL_ALIGN : C;
}

/* Channels per task when threads share out a per-channel combination. */
#define BN_COMBINE_CHANNELS 128
/* Interleaved normalise coefficients (cl_il_alloc, batchnorm.inc): from 3 arrays of this many bytes together, for
 * inputs of at least BN_CL_IL_MIN_INPUT bytes (docs/tuning.md, "Interleaved coefficients for flat normalise sweeps") */
#define BN_CL_IL_BYTES (12 << 10)
#define BN_CL_IL_MIN_INPUT ((int64_t)8 << 20)
_Static_assert(BN_COMBINE_CHANNELS >= UK_MAX_VL, "the first combination task holds the channels extend_tail copies");

/* Mean and biased variance of each channel from K chunk moments in chunk order (count[k]; shift, residual mean and M2
 * at [k C + c]), by the combination of cf_combine_block and cl_combine, operation for operation: the chunks of one
 * bn_moments call give bn_stats' bits, and the chunks of several calls on consecutive pieces of a batch (processes of
 * a SyncBatchNorm) give the bits of one call on the whole batch whenever the pieces end on its chunk boundaries.
 * Chunks of no element are skipped; no element at all gives NaN. */
int bn_moments_merge(int64_t K, int64_t C, const double* count, const double* shift, const double* resid,
                     const double* m2, double* mean, double* var) {
    if (K < 0 || C < 0) return BN_EINVAL;
    for (int64_t k = 0; k < K; k++)
        if (!(count[k] >= 0.0)) return BN_EINVAL;
    int64_t k0 = 0;
    while (k0 < K && count[k0] == 0.0) k0++;
    double n = 0.0;
    for (int64_t k = k0; k < K; k++) n += count[k];
    for (int64_t c = 0; c < C; c++) {
        if (k0 == K) {
            mean[c] = var[c] = NAN;
            continue;
        }
        const double m0 = shift[k0 * C + c];
        double s = 0.0, q = 0.0;
        for (int64_t k = k0; k < K; k++)
            if (count[k] > 0.0) s += count[k] * chunk_offset(shift[k * C + c], m0, resid[k * C + c]);
        const double m = s / n;
        for (int64_t k = k0; k < K; k++)
            if (count[k] > 0.0) {
                const double dk = chunk_offset(shift[k * C + c], m0, resid[k * C + c]) - m;
                q += m2[k * C + c] + count[k] * dk * dk;
            }
        mean[c] = bn_nan_canon(m0 + m);
        var[c] = bn_nan_canon(q / n);
    }
    return BN_OK;
}

/* T: the data's (storage) type; TC: the compute type of the apply kernels and of the coefficient arrays the drivers
 * pass them (ukernels.h; the same as T for both dtypes today). SHIFT_BY_VALUE: one-pass chunk statistics shifted by a
 * data value (float32), or two-pass (float64); see cf_chunk_stats. RN_PAIR_FWD: whether the layer-norm forward pairs
 * a block's normalise with the next block's statistics (rownorm.inc; not bfloat16, whose narrowing's integer work
 * shares the statistics' vector ports: 1.03-1.07x slower paired, docs/tuning.md). */
#define T float
#define TC float
#define S f32
#define UK_T bn_uk_f32
#define UK() bn_uk_active_f32()
#define RN_PAIR_FWD 1
#define SHIFT_BY_VALUE 1
#define LOADD(p) ((double)*(p))
#define STORED(p, v) (*(p) = (T)(v))
#include "batchnorm.inc"
#undef T
#undef TC
#undef S
#undef UK_T
#undef UK
#undef SHIFT_BY_VALUE
#undef RN_PAIR_FWD

#define T double
#define TC double
#define S f64
#define UK_T bn_uk_f64
#define UK() bn_uk_active_f64()
#define RN_PAIR_FWD 1
#define SHIFT_BY_VALUE 0
#include "batchnorm.inc"
#undef T
#undef TC
#undef S
#undef UK_T
#undef UK
#undef SHIFT_BY_VALUE
#undef RN_PAIR_FWD
#undef LOADD
#undef STORED

/* float16 and bfloat16: stored as uint16_t patterns, computed in float (the apply kernels, their coefficients), their
 * statistics in double like the others', one pass shifted by a data value as float32's (a 16-bit value widens
 * exactly). STORED rounds a double once (half.h: through float rounded to odd, then to nearest even). */
#define T uint16_t
#define TC float
#define S f16
#define UK_T bn_uk_f16
#define UK() bn_uk_active_f16()
#define RN_PAIR_FWD 1
#define SHIFT_BY_VALUE 1
#define LOADD(p) ((double)bn_f16_to_f32(*(p)))
#define STORED(p, v) (*(p) = bn_f16_from_f64(v))
#include "batchnorm.inc"
#undef T
#undef TC
#undef S
#undef UK_T
#undef UK
#undef SHIFT_BY_VALUE
#undef RN_PAIR_FWD
#undef LOADD
#undef STORED

#define T uint16_t
#define TC float
#define S bf16
#define UK_T bn_uk_bf16
#define UK() bn_uk_active_bf16()
#define RN_PAIR_FWD 0
#define SHIFT_BY_VALUE 1
#define LOADD(p) ((double)bn_bf16_to_f32(*(p)))
#define STORED(p, v) (*(p) = bn_bf16_from_f64(v))
#include "batchnorm.inc"
