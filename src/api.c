/* The public C API (include/bn_simd_api.h): argument checks, per-channel arrays in float or double, the context, the
 * workspace and the caller's parallel_for, on top of the kernel-level drivers (include/bn_simd.h).
 *
 * Every op checks all of its arguments first and returns before it reads or writes anything when one is wrong. Then:
 * the context becomes the calling thread's (bn_context_use), the workspace the thread's arena (scratch.h), and the op
 * runs either as one driver call with the context's thread count (OpenMP), or, when the context has a parallel_for,
 * as tasks of the caller's pool, each a driver call with one thread on a piece of the tensor cut so that every
 * reduction adds the same partial results in the same order as one call on the whole (see "Pieces" below): the
 * same bits either way.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bn_simd.h"
#include "dispatch.h"
#include "scratch.h"
#include "ukernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(BN_SIMD_VERSION) || !defined(BN_SIMD_BUILD_MAJOR) || !defined(BN_SIMD_BUILD_MINOR) \
    || !defined(BN_SIMD_BUILD_PATCH)
#error "the version must come from the build (bn_simd/_version.py, read by setup.py and CMakeLists.txt)"
#endif
#if BN_SIMD_BUILD_MAJOR != BN_SIMD_VERSION_MAJOR || BN_SIMD_BUILD_MINOR != BN_SIMD_VERSION_MINOR \
    || BN_SIMD_BUILD_PATCH != BN_SIMD_VERSION_PATCH
#error "include/bn_simd_api.h's BN_SIMD_VERSION_* macros differ from bn_simd/_version.py: update the header"
#endif

const char* bn_version(void) { return BN_SIMD_VERSION; }

const char* bn_strerror(int status) {
    switch (status) {
        case BN_OK: return "success";
        case BN_ENOMEM: return "out of memory";
        case BN_EINVAL: return "invalid argument";
        case BN_EISA: return "the CPU cannot run the requested instruction set";
        case BN_ENULL: return "a required pointer is NULL";
        case BN_ESIZE: return "a size is <= 0, or the tensor's size in bytes overflows";
        case BN_EEPS: return "eps must be finite and > 0";
        case BN_EMOMENTUM: return "momentum must be finite and in [0, 1]";
        case BN_ELAYOUT: return "unknown layout code (BN_LAYOUT_NCHW or BN_LAYOUT_NHWC)";
        case BN_EDTYPE:
            return "unknown dtype code (data: BN_F32, BN_F64, BN_F16, BN_BF16; per-channel: BN_F32, BN_F64)";
        case BN_EGROUPS: return "groups must be >= 1 and divide the channels";
        case BN_EWORKSPACE: return "workspace smaller than bn_workspace_size (or a size given with no buffer)";
        case BN_EOVERLAP: return "an output overlaps an input or another output";
        case BN_EOP: return "unknown op code";
        default: return "unknown status";
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* The drivers of each storage type behind one signature (data as void*; TC arrays as void*). */

typedef struct {
    size_t es;  /* bytes of an element */
    size_t tcs; /* bytes of the compute type TC (coefficients, row norm's forward weight) */
    int (*normalize)(const void*, void*, int64_t, int64_t, int64_t, const double*, const double*, const double*,
                     const double*, double, int);
    int (*forward_train)(const void*, void*, int64_t, int64_t, int64_t, const double*, const double*, double, double*,
                         double*, int);
    int (*moments)(const void*, int64_t, int64_t, int64_t, int64_t*, double*, double*, double*, double*, int);
    int (*backward)(const void*, const void*, void*, int64_t, int64_t, int64_t, const double*, const double*,
                    const double*, int, double*, double*, int);
    int (*backward_reduce)(const void*, const void*, int64_t, int64_t, int64_t, const double*, double*, double*, int);
    int (*bwd_params)(int64_t, double, const double*, const double*, const double*, const double*, const double*, int,
                      double*, double*, void*, void*, void*, void*);
    int (*backward_apply)(const void*, const void*, void*, int64_t, int64_t, int64_t, const void*, const void*,
                          const void*, const void*, int);
    int (*apply)(const void*, void*, int64_t, int64_t, int64_t, const void*, const void*, const void*, int);
    int (*group_forward)(const void*, void*, int64_t, int64_t, int64_t, int64_t, int, const double*, const double*,
                         double, double*, double*, int);
    int (*group_backward)(const void*, const void*, void*, int64_t, int64_t, int64_t, int64_t, int, const double*,
                          const double*, const double*, double*, double*, int);
    int (*row_forward)(const void*, void*, int64_t, int64_t, int64_t, int, const void*, const void*, double, double*,
                       double*, int);
    int (*row_backward)(const void*, const void*, void*, int64_t, int64_t, int64_t, int, const double*, const double*,
                        const double*, double*, double*, int);
} dtype_ops;

#define BN_WRAP(T, TC, S)                                                                                            \
    static int normalize_##S(const void* x, void* y, int64_t o, int64_t C, int64_t i, const double* m,                \
                             const double* v, const double* w, const double* b, double eps, int nt) {                \
        return bn_normalize_##S((const T*)x, (T*)y, o, C, i, m, v, w, b, eps, nt);                                    \
    }                                                                                                                 \
    static int forward_train_##S(const void* x, void* y, int64_t o, int64_t C, int64_t i, const double* w,            \
                                 const double* b, double eps, double* m, double* v, int nt) {                         \
        return bn_forward_train_##S((const T*)x, (T*)y, o, C, i, w, b, eps, m, v, nt);                                \
    }                                                                                                                 \
    static int moments_##S(const void* x, int64_t o, int64_t C, int64_t i, int64_t* K, double* n, double* sh,         \
                           double* r, double* m2, int nt) {                                                           \
        return bn_moments_##S((const T*)x, o, C, i, K, n, sh, r, m2, nt);                                             \
    }                                                                                                                 \
    static int backward_##S(const void* dy, const void* x, void* dx, int64_t o, int64_t C, int64_t i, const double* m, \
                            const double* s, const double* w, int tr, double* gw, double* gb, int nt) {               \
        return bn_backward_##S((const T*)dy, (const T*)x, (T*)dx, o, C, i, m, s, w, tr, gw, gb, nt);                  \
    }                                                                                                                 \
    static int backward_reduce_##S(const void* dy, const void* x, int64_t o, int64_t C, int64_t i, const double* m,    \
                                   double* sd, double* sx, int nt) {                                                  \
        return bn_backward_reduce_##S((const T*)dy, (const T*)x, o, C, i, m, sd, sx, nt);                             \
    }                                                                                                                 \
    static int bwd_params_##S(int64_t C, double n, const double* sd, const double* sx, const double* m,               \
                              const double* s, const double* w, int tr, double* gw, double* gb, void* pm, void* pa,    \
                              void* pb, void* pd) {                                                                   \
        return bn_bwd_params_##S(C, n, sd, sx, m, s, w, tr, gw, gb, (TC*)pm, (TC*)pa, (TC*)pb, (TC*)pd);              \
    }                                                                                                                 \
    static int backward_apply_##S(const void* dy, const void* x, void* dx, int64_t o, int64_t C, int64_t i,           \
                                  const void* pm, const void* pa, const void* pb, const void* pd, int nt) {           \
        return bn_backward_apply_##S((const T*)dy, (const T*)x, (T*)dx, o, C, i, (const TC*)pm, (const TC*)pa,       \
                                     (const TC*)pb, (const TC*)pd, nt);                                               \
    }                                                                                                                 \
    static int apply_##S(const void* x, void* y, int64_t o, int64_t C, int64_t i, const void* pm, const void* pa,     \
                         const void* pb, int nt) {                                                                    \
        return bn_apply_##S((const T*)x, (T*)y, o, C, i, (const TC*)pm, (const TC*)pa, (const TC*)pb, nt);           \
    }                                                                                                                 \
    static int group_forward_##S(const void* x, void* y, int64_t N, int64_t C, int64_t Sp, int64_t G, int cl,         \
                                 const double* w, const double* b, double eps, double* m, double* v, int nt) {        \
        return bn_group_forward_##S((const T*)x, (T*)y, N, C, Sp, G, cl, w, b, eps, m, v, nt);                        \
    }                                                                                                                 \
    static int group_backward_##S(const void* dy, const void* x, void* dx, int64_t N, int64_t C, int64_t Sp,          \
                                  int64_t G, int cl, const double* m, const double* s, const double* w, double* gw,    \
                                  double* gb, int nt) {                                                               \
        return bn_group_backward_##S((const T*)dy, (const T*)x, (T*)dx, N, C, Sp, G, cl, m, s, w, gw, gb, nt);        \
    }                                                                                                                 \
    static int row_forward_##S(const void* x, void* y, int64_t N, int64_t C, int64_t Sp, int rms, const void* w,      \
                               const void* b, double eps, double* m, double* r, int nt) {                             \
        return bn_row_forward_##S((const T*)x, (T*)y, N, C, Sp, rms, (const TC*)w, (const TC*)b, eps, m, r, nt);      \
    }                                                                                                                 \
    static int row_backward_##S(const void* dy, const void* x, void* dx, int64_t N, int64_t C, int64_t Sp, int rms,   \
                                const double* m, const double* r, const double* w, double* gw, double* gb, int nt) {  \
        return bn_row_backward_##S((const T*)dy, (const T*)x, (T*)dx, N, C, Sp, rms, m, r, w, gw, gb, nt);            \
    }

BN_WRAP(float, float, f32)
BN_WRAP(double, double, f64)
BN_WRAP(uint16_t, float, f16)
BN_WRAP(uint16_t, float, bf16)
#undef BN_WRAP

#define BN_OPS(T, TC, S)                                                                                             \
    {sizeof(T),          sizeof(TC),          normalize_##S,      forward_train_##S, moments_##S,                     \
     backward_##S,       backward_reduce_##S, bwd_params_##S,     backward_apply_##S, apply_##S,                      \
     group_forward_##S,  group_backward_##S,  row_forward_##S,    row_backward_##S}
static const dtype_ops OPS[4] = {BN_OPS(float, float, f32), BN_OPS(double, double, f64),
                                 BN_OPS(uint16_t, float, f16), BN_OPS(uint16_t, float, bf16)};
#undef BN_OPS

/* ---------------------------------------------------------------------------------------------------- */
/* Argument checks. */

static int check_desc(const bn_desc* d) {
    if (!d) return BN_ENULL;
    if (d->dtype < BN_F32 || d->dtype > BN_BF16) return BN_EDTYPE;
    if (d->param_dtype != BN_F32 && d->param_dtype != BN_F64) return BN_EDTYPE;
    if (d->layout != BN_LAYOUT_NCHW && d->layout != BN_LAYOUT_NHWC) return BN_ELAYOUT;
    if (d->n < 1 || d->c < 1 || d->s < 1) return BN_ESIZE;
    /* every byte offset the drivers form fits int64_t and size_t, with room for 8-byte elements, and so does every
     * workspace size (bn_workspace_size's sums take up to a few hundred bytes per element or channel): at most
     * 2^51 elements on a 64-bit system, far beyond any memory */
    const uint64_t most = (uint64_t)PTRDIFF_MAX < (uint64_t)INT64_MAX ? (uint64_t)PTRDIFF_MAX : (uint64_t)INT64_MAX;
    const int64_t lim = (int64_t)(most >> 12);
    if (d->n > lim / d->c || d->n * d->c > lim / d->s) return BN_ESIZE;
    return BN_OK;
}

static int check_eps(double eps) { return isfinite(eps) && eps > 0.0 ? BN_OK : BN_EEPS; }

static int64_t numel(const bn_desc* d) { return d->n * d->c * d->s; }

/* Whether [a, a + na) and [b, b + nb) share a byte. */
static int overlaps(const void* a, size_t na, const void* b, size_t nb) {
    const uintptr_t p = (uintptr_t)a, q = (uintptr_t)b;
    return a && b && na && nb && p < q + nb && q < p + na;
}

/* The outputs of a call against its inputs and each other, NULL ones ignored: BN_EOVERLAP when two share a byte,
 * except the in-place pair y == x (outs[0] and ins[0] both at alias, when alias is not NULL). Only that pair: an
 * output of statistics at x, or a parameter at x with y at x, overlaps. */
typedef struct {
    const void* p;
    size_t n;
} span;

static int check_overlaps(const span* outs, int nouts, const span* ins, int nins, const void* alias) {
    for (int i = 0; i < nouts; i++) {
        if (!outs[i].p) continue;
        for (int j = 0; j < nins; j++)
            if (!(alias && i == 0 && j == 0 && outs[0].p == alias && ins[0].p == alias))
                if (overlaps(outs[i].p, outs[i].n, ins[j].p, ins[j].n)) return BN_EOVERLAP;
        for (int j = i + 1; j < nouts; j++)
            if (overlaps(outs[i].p, outs[i].n, outs[j].p, outs[j].n)) return BN_EOVERLAP;
    }
    return BN_OK;
}

static size_t psize(int param_dtype) { return param_dtype == BN_F64 ? 8 : 4; }

/* ---------------------------------------------------------------------------------------------------- */
/* Scratch of the API layer itself, from the calling thread's arena (the workspace) or the heap. */

static void* scratch(size_t n) { return bn_scratch_malloc(n ? n : 1); }

/* out[c] = the sum over k of part[k n + c], k in order (0 first), for c < n: the K rows of partial sums combined in
 * memory order (a column at a time, each read a row apart, misses the TLB on long rows), by the kernel that does it
 * for the drivers (cl_sum_rows: doubles whatever the table's dtype; every ISA adds each column in the same order) */
static void sum_rows(const double* part, int64_t K, int64_t n, double* out) {
    bn_uk_active_f64()->cl_sum_rows(part, K, n, 0, n, out);
}

/* n per-channel values of param_dtype as doubles: the array itself when it holds doubles, else a converted copy in
 * *buf (NULL stays NULL). */
static const double* load_params(int param_dtype, const void* src, int64_t n, double* buf) {
    if (!src) return NULL;
    if (param_dtype == BN_F64) return (const double*)src;
    for (int64_t i = 0; i < n; i++) buf[i] = (double)((const float*)src)[i];
    return buf;
}

/* n doubles stored as param_dtype into dst (nullable). */
static void store_params(int param_dtype, const double* src, int64_t n, void* dst) {
    if (!dst) return;
    if (param_dtype == BN_F64) {
        if (dst != (const void*)src) memcpy(dst, src, sizeof(double) * (size_t)n);
    } else {
        for (int64_t i = 0; i < n; i++) ((float*)dst)[i] = (float)src[i];
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* A call's frame: its context made the thread's, its workspace made the thread's arena. */

typedef struct {
    const bn_context* ctx;
    const bn_context* prev_ctx;
    bn_arena arena;
    bn_arena* prev_arena;
    bn_parallel_for_fn pfor;
    void* pool;
    int nthreads; /* the context's thread count (0: OpenMP's default) */
} frame;

static void frame_enter(frame* f, const bn_context* ctx, void* ws, size_t ws_bytes) {
    f->ctx = ctx ? ctx : bn_default_context();
    f->prev_ctx = bn_context_use(f->ctx);
    f->prev_arena = bn_tls_arena;
    f->arena = (bn_arena){(char*)ws, ws_bytes, 0, 0};
    bn_tls_arena = ws ? &f->arena : NULL;
    f->pfor = bn_context_parallel_for(f->ctx, &f->pool);
    f->nthreads = bn_context_get_num_threads(f->ctx);
}

/* Ends the frame; a driver's BN_ENOMEM from an exhausted workspace becomes BN_EWORKSPACE. */
static int frame_leave(frame* f, int st) {
    if (st == BN_ENOMEM && f->arena.exhausted) st = BN_EWORKSPACE;
    bn_tls_arena = f->prev_arena;
    bn_context_use(f->prev_ctx);
    return st;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Tasks on the caller's pool. Each task runs under the call's context, with its own slice of the workspace (or the
 * heap), its driver calls on one thread. */

#define BN_SLACK 4096 /* alignment and bookkeeping slack of an arena slice */

typedef struct tasks tasks;
typedef int (*task_body)(tasks* t, int64_t i);
struct tasks {
    const bn_context* ctx;
    char* ws;          /* slices of slice bytes, one per task; NULL: the heap */
    size_t slice;
    int64_t count;     /* tasks */
    int64_t units;     /* work units shared out among them */
    task_body body;
    int status[1];     /* (first error, written once; see run_task) */
    void* data;        /* the op's */
    bn_fpmode fpmode;  /* the caller's floating-point modes, each task's (bn_fpmode_enter) */
};

/* The calling thread's arena use, to give back after a driver call that a task makes one of many (a driver frees
 * nothing of an arena: see scratch.h). */
static size_t arena_mark(void) { return bn_tls_arena ? bn_tls_arena->used : 0; }
static void arena_release(size_t mark) {
    if (bn_tls_arena) bn_tls_arena->used = mark;
}

static void unit_range(const tasks* t, int64_t i, int64_t* u0, int64_t* u1) {
    *u0 = t->units * i / t->count;
    *u1 = t->units * (i + 1) / t->count;
}

static void run_task(void* arg, int64_t i) {
    tasks* t = (tasks*)arg;
    const bn_fpmode own = bn_fpmode_enter(t->fpmode); /* (a pool thread in the caller's rounding and flush modes) */
    const bn_context* prev = bn_context_use(t->ctx);
    bn_arena* prev_arena = bn_tls_arena;
    bn_arena a = {t->ws ? t->ws + (size_t)i * t->slice : NULL, t->slice, 0, 0};
    bn_tls_arena = t->ws ? &a : NULL;
    int st = t->body(t, i);
    if (st == BN_ENOMEM && a.exhausted) st = BN_EWORKSPACE;
    if (st != BN_OK) __atomic_store_n(&t->status[0], st, __ATOMIC_RELAXED);
    bn_tls_arena = prev_arena;
    bn_context_use(prev);
    bn_fpmode_leave(own);
}

/* Tasks for a tensor of `bytes` bytes: the context's thread count, else one per MiB up to 64; at most `units`. */
static int64_t task_count(int nthreads, int64_t bytes, int64_t units) {
    int64_t n = nthreads > 0 ? nthreads : bytes >> 20;
    if (nthreads <= 0 && n > 64) n = 64;
    if (n > units) n = units;
    return n < 1 ? 1 : n;
}

/* Runs body over `units` units in `count` tasks on the frame's pool; the workspace slices (slice bytes each) come
 * after the API layer's own scratch in the frame's arena. */
static int run_tasks(frame* f, int64_t count, int64_t units, size_t slice, task_body body, void* data) {
    tasks t = {f->ctx, NULL, slice + BN_SLACK, count, units, body, {BN_OK}, data, bn_fpmode_get()};
    const size_t mark = bn_tls_arena ? bn_tls_arena->used : 0;
    if (bn_tls_arena) {
        /* the slices from the arena (its free space was sized for them: bn_workspace_size), given back after */
        t.ws = (char*)bn_scratch_malloc(t.slice * (size_t)count);
        if (!t.ws) return BN_ENOMEM;
    }
    f->pfor(f->pool, count, run_task, &t);
    if (bn_tls_arena) bn_tls_arena->used = mark;
    return t.status[0];
}

/* ---------------------------------------------------------------------------------------------------- */
/* Pieces. A batch-norm reduction adds per-chunk results in chunk order, its chunks fixed by the shape (batchnorm.c):
 * channels-first, R whole rows of the canonical (outer, C, inner) view a chunk, or P pieces of L elements of each row
 * when a row is longer than a chunk; channels-last (inner = 1), R rows; a single channel is one flat row (the view
 * (1, 1, outer inner)). The chunk geometry is read back from the drivers' chunk count (bn_moments with count NULL,
 * shape only), never restated here. A plan cuts the tensor into units that start on chunk boundaries: driver calls
 * on runs of whole units give exactly the chunks of one call on the whole, in the same order. */

typedef struct {
    int flat;          /* a single channel: units of L elements of the flat array */
    int64_t outer, C, inner; /* the view */
    int64_t rows;      /* rows per unit (flat: elements per unit) */
    int64_t per_unit;  /* chunks per unit */
    int64_t units;
    int64_t K;         /* chunks of the whole */
    int64_t L;         /* elements of a row piece (P > 1), else 0 */
} plan;

static int64_t chunks(const dtype_ops* ops, int64_t outer, int64_t C, int64_t inner) {
    int64_t K = 0;
    ops->moments(NULL, outer, C, inner, &K, NULL, NULL, NULL, NULL, 1);
    return K;
}

/* The largest v in [1, hi] with chunks(v) == 1, f(v) := chunks of the shape with v in the varying place (monotone). */
static int64_t largest_single(const dtype_ops* ops, int which, int64_t C, int64_t fixed, int64_t hi) {
    int64_t lo = 1;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        const int64_t k = which == 0 ? chunks(ops, mid, C, fixed) : chunks(ops, 1, 1, mid);
        if (k <= 1)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

static plan make_plan(const dtype_ops* ops, const bn_desc* d) {
    plan p;
    memset(&p, 0, sizeof p);
    p.outer = d->layout == BN_LAYOUT_NCHW ? d->n : d->n * d->s;
    p.inner = d->layout == BN_LAYOUT_NCHW ? d->s : 1;
    p.C = d->c;
    p.K = chunks(ops, p.outer, p.C, p.inner);
    if (p.C == 1) { /* (the drivers' canonical view) */
        p.flat = 1;
        p.inner *= p.outer;
        p.outer = 1;
        p.rows = p.K > 1 ? largest_single(ops, 1, 1, 0, p.inner) : p.inner;
        p.per_unit = 1;
        p.units = (p.inner + p.rows - 1) / p.rows;
    } else {
        const int64_t k1 = chunks(ops, 1, p.C, p.inner);
        p.rows = k1 > 1 ? 1 : largest_single(ops, 0, p.C, p.inner, p.outer);
        p.per_unit = k1 > 1 ? k1 : 1;
        p.units = (p.outer + p.rows - 1) / p.rows;
        if (k1 > 1) p.L = largest_single(ops, 1, 1, 0, p.inner);
    }
    return p;
}

/* Units [u0, u1) as a driver's view: its first element, outer, C, inner. */
static void plan_view(const plan* p, int64_t u0, int64_t u1, int64_t* e0, int64_t* o, int64_t* C, int64_t* i) {
    if (p->flat) {
        *e0 = u0 * p->rows;
        const int64_t e1 = u1 * p->rows < p->inner ? u1 * p->rows : p->inner;
        *o = 1, *C = 1, *i = e1 - *e0;
    } else {
        const int64_t r0 = u0 * p->rows, r1 = u1 * p->rows < p->outer ? u1 * p->rows : p->outer;
        *e0 = r0 * p->C * p->inner;
        *o = r1 - r0, *C = p->C, *i = p->inner;
    }
}

/* Chunks before unit u. */
static int64_t plan_chunk(const plan* p, int64_t u) { return u * p->per_unit; }

/* ---------------------------------------------------------------------------------------------------- */
/* Workspace bounds: what the drivers allocate, from the same shape quantities they use (batchnorm.inc, groupnorm.inc,
 * rownorm.inc), summed over every allocation a call can make (an arena frees nothing until the call ends), 8 bytes
 * for any TC, and 128 bytes of alignment per allocation. K: chunks of the call. */

#define BN_ALLOC_PAD 128
static size_t coef_bytes(int64_t C, int64_t arrays) { /* cl_coef_alloc */
    return (size_t)(8 * arrays * (C + UK_MAX_VL + 16) + 512 + BN_ALLOC_PAD);
}

static size_t bn_driver_bytes(int64_t K, int64_t C) {
    /* statistics' or sums' chunk results (cb <= 512 extra channels a chunk), per-channel sums and coefficients, the
     * extended and interleaved coefficient arrays */
    return (size_t)(8 * (3 * K * (C + 512) + 2 * C * (K + 1) + 2 * (K * (C + 512) + C) + 16 * C)) + coef_bytes(C, 4) +
           coef_bytes(C, 3) + 8 * BN_ALLOC_PAD;
}

static size_t gn_driver_bytes(const dtype_ops* ops, int64_t N, int64_t C, int64_t S, int64_t G, int64_t nt) {
    const int64_t D = C / G, Kcf = chunks(ops, 1, N * G, D * S), Kcl = chunks(ops, S, C, 1);
    /* a thread's run of small groups: at most max(D, BN_GN_COEF_RUN) channels, its coefficient arrays XR apart */
    const int64_t XR = (D > BN_GN_COEF_RUN ? D : BN_GN_COEF_RUN) + UK_MAX_VL;
    /* (check_desc's element bound keeps every other term below 2^57; the threads' ones, with coef_bytes(C, 4 nt), may
     * pass what a size_t holds: SIZE_MAX, a size no memory holds, where they pass 2^60, which ws_parts refuses as
     * BN_ESIZE; never with one thread, as the calls and the parallel_for path size them) */
    if ((double)nt * (8.0 * (3.0 * (double)Kcl * (double)C + 4.0 * (double)C + 12.0 * (double)XR) + 32.0 * (double)C) >
        0x1p60)
        return SIZE_MAX;
    /* (and the float64 apply's choice per sample: N flags, then 2 C doubles and 3 C coefficients to decide it again) */
    return (size_t)(8 * (3 * Kcf * (N * G + 512) + 3 * N * Kcl * C + 2 * N * Kcl * C + 8 * N * C + 2 * C +
                         nt * (3 * Kcl * C + 4 * C + 12 * XR) + 5 * C) + 2 * N) +
           coef_bytes(C, 4 * N) + coef_bytes(C, 4 * nt) + 12 * BN_ALLOC_PAD;
}

static size_t rn_driver_bytes(int64_t C) { return (size_t)(8 * (2 * 64 * C + 4 * C)) + 4 * BN_ALLOC_PAD; }

/* The thread count a driver may size its scratch by (pick_threads' bound). */
static int64_t driver_threads(int nthreads) {
#ifdef _OPENMP
    int64_t nt = nthreads > 0 ? nthreads : omp_get_max_threads();
#else
    int64_t nt = 1;
    (void)nthreads;
#endif
    return nt > BN_MAX_THREADS ? BN_MAX_THREADS : nt < 1 ? 1 : nt;
}

/* The batch-norm view (outer, C, inner) of d. */
static void bn_view(const bn_desc* d, int64_t* outer, int64_t* inner) {
    *outer = d->layout == BN_LAYOUT_NCHW ? d->n : d->n * d->s;
    *inner = d->layout == BN_LAYOUT_NCHW ? d->s : 1;
}

/* Views of layer norm: (N, C, S) channels-first, else (N S, C, 1). */
static void rn_view(const bn_desc* d, int64_t* N, int64_t* S) {
    *N = d->layout == BN_LAYOUT_NCHW ? d->n : d->n * d->s;
    *S = d->layout == BN_LAYOUT_NCHW ? d->s : 1;
}

static size_t round64(size_t n) { return (n + 63) / 64 * 64; }

/* The API layer's own scratch (bytes) and, with a parallel_for, the tasks and their slices, of op on d. */
static int ws_parts(const bn_context* ctx, int op, const bn_desc* d, int64_t G, size_t* own, int64_t* ntasks,
                    size_t* slice) {
    const dtype_ops* ops = &OPS[d->dtype];
    void* pool;
    const int hook = bn_context_parallel_for(ctx, &pool) != NULL;
    const int nthreads = bn_context_get_num_threads(ctx);
    const int64_t C = d->c, E = numel(d), bytes = E * (int64_t)ops->es;
    int64_t N, S;
    *ntasks = 0;
    *slice = 0;
    switch (op) {
        case BN_OP_BATCH_NORM_INFERENCE:
        case BN_OP_BATCH_NORM_TRAINING:
        case BN_OP_BATCH_NORM_BACKWARD:
        case BN_OP_BATCH_NORM_MOMENTS: {
            /* per-channel copies and results (12 C doubles), TC coefficients (4 C) */
            *own = round64((size_t)(8 * 16 * C)) + 8 * BN_ALLOC_PAD;
            if (!hook) {
                const plan p = make_plan(ops, d); /* (only its K) */
                *own += bn_driver_bytes(op == BN_OP_BATCH_NORM_INFERENCE ? 0 : p.K, C);
                return BN_OK;
            }
            const plan p = make_plan(ops, d);
            int64_t outer, inner;
            bn_view(d, &outer, &inner);
            /* the chunk moments (K (1 + 3 C)) and the backward's chunk sums (K 2 C) */
            *own += round64((size_t)(8 * p.K * (1 + 5 * C)));
            /* the row sweeps' tasks and slices; the chunk tasks' (moments: as pool_moments; backward sums: 2 arrays
             * read, one chunk a driver call) */
            *ntasks = task_count(nthreads, bytes, outer);
            *slice = bn_driver_bytes(0, C);
            if (op != BN_OP_BATCH_NORM_INFERENCE) {
                const int64_t nm = task_count(nthreads, bytes, p.units), nb = task_count(nthreads, 2 * bytes, p.units);
                const size_t sm = bn_driver_bytes((p.units + nm - 1) / nm * p.per_unit, C);
                if (nm > *ntasks) *ntasks = nm;
                if (nb > *ntasks) *ntasks = nb;
                if (sm > *slice) *slice = sm;
            }
            return BN_OK;
        }
        case BN_OP_GROUP_NORM_FORWARD:
        case BN_OP_GROUP_NORM_BACKWARD: {
            *own = round64((size_t)(8 * (6 * C + 4 * d->n * G))) + 8 * BN_ALLOC_PAD;
            S = d->s;
            if (!hook) {
                const size_t gb = gn_driver_bytes(ops, d->n, C, S, G, driver_threads(nthreads));
                if (gb == SIZE_MAX) return BN_ESIZE;
                *own += gb;
                return BN_OK;
            }
            *own += round64((size_t)(8 * 2 * d->n * C)); /* per-sample parameter gradients */
            *ntasks = task_count(nthreads, op == BN_OP_GROUP_NORM_FORWARD ? bytes : 2 * bytes, d->n);
            const int64_t per = op == BN_OP_GROUP_NORM_FORWARD ? (d->n + *ntasks - 1) / *ntasks : 1;
            *slice = gn_driver_bytes(ops, per, C, S, G, 1);
            return BN_OK;
        }
        case BN_OP_LAYER_NORM_FORWARD:
        case BN_OP_LAYER_NORM_BACKWARD:
            rn_view(d, &N, &S);
            *own = round64((size_t)(8 * (6 * C + 4 * N * S))) + 8 * BN_ALLOC_PAD + rn_driver_bytes(C);
            if (hook && op == BN_OP_LAYER_NORM_FORWARD) {
                *ntasks = task_count(nthreads, bytes, N);
                *slice = rn_driver_bytes(C);
            }
            return BN_OK;
        default: return BN_EOP;
    }
}

static int ws_total(const bn_context* ctx, int op, const bn_desc* d, int64_t G, size_t* bytes) {
    size_t own, slice;
    int64_t ntasks;
    const int st = ws_parts(ctx, op, d, G, &own, &ntasks, &slice);
    if (st != BN_OK) return st;
    *bytes = own + (size_t)ntasks * (slice + BN_SLACK) + BN_SLACK;
    return BN_OK;
}

int bn_workspace_size(const bn_context* ctx, int op, const bn_desc* d, int64_t groups, size_t* bytes) {
    int st = check_desc(d);
    if (st != BN_OK) return st;
    if (!bytes) return BN_ENULL;
    if (op < BN_OP_BATCH_NORM_INFERENCE || op > BN_OP_BATCH_NORM_MOMENTS) return BN_EOP;
    if (op == BN_OP_GROUP_NORM_FORWARD || op == BN_OP_GROUP_NORM_BACKWARD) {
        if (groups < 1 || d->c % groups != 0) return BN_EGROUPS;
    } else {
        groups = 1;
    }
    return ws_total(ctx ? ctx : bn_default_context(), op, d, groups, bytes);
}

/* BN_OK when the workspace arguments are usable for op on d: none, or a buffer of at least the op's size. */
static int check_workspace(const bn_context* ctx, int op, const bn_desc* d, int64_t G, const void* ws,
                           size_t ws_bytes) {
    if (!ws) return ws_bytes ? BN_EWORKSPACE : BN_OK;
    size_t need;
    const int st = ws_total(ctx ? ctx : bn_default_context(), op, d, G, &need);
    return st != BN_OK ? st : ws_bytes < need ? BN_EWORKSPACE : BN_OK;
}

/* check_workspace for group norm, whose OpenMP drivers size a scratch per thread: a workspace sized under fewer
 * threads than the call would take (bn_workspace_size asked under another OpenMP setting, or on another thread, with
 * the context's thread count 0) runs the drivers on as many threads as it covers, *nt (0: as the context says); the
 * results are the same bits at any thread count. BN_EWORKSPACE only when one thread's does not fit. */
static int check_gn_workspace(const bn_context* ctx, int op, const bn_desc* d, int64_t G, const void* ws,
                              size_t ws_bytes, int* nt) {
    *nt = 0;
    int st = check_workspace(ctx, op, d, G, ws, ws_bytes);
    const bn_context* c = ctx ? ctx : bn_default_context();
    void* pool;
    if (st != BN_EWORKSPACE || !ws || bn_context_parallel_for(c, &pool) != NULL) return st;
    size_t own, slice;
    int64_t ntasks;
    if ((st = ws_parts(c, op, d, G, &own, &ntasks, &slice)) != BN_OK) return st;
    const dtype_ops* ops = &OPS[d->dtype];
    const int64_t full = driver_threads(bn_context_get_num_threads(c)); /* (what ws_parts sized the drivers for) */
    const size_t base = own - gn_driver_bytes(ops, d->n, d->c, d->s, G, full);
    for (int64_t k = full - 1; k >= 1; k--)
        if (base + gn_driver_bytes(ops, d->n, d->c, d->s, G, k) + BN_SLACK <= ws_bytes) {
            *nt = (int)k;
            return BN_OK;
        }
    return BN_EWORKSPACE;
}

/* The caller's workspace shares no byte with the call's arrays (outs and ins; NULL ones ignored): the drivers write it
 * before they have read every input. */
static int check_workspace_apart(const void* ws, size_t ws_bytes, const span* outs, int nouts, const span* ins,
                                 int nins) {
    for (int i = 0; i < nouts; i++)
        if (overlaps(ws, ws_bytes, outs[i].p, outs[i].n)) return BN_EOVERLAP;
    for (int i = 0; i < nins; i++)
        if (overlaps(ws, ws_bytes, ins[i].p, ins[i].n)) return BN_EOVERLAP;
    return BN_OK;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Batch norm. */


/* Row-split element-wise sweeps (the normalise and the backward's dx): any cut gives the same bits. */
typedef struct {
    const dtype_ops* ops;
    int kind; /* 0: normalise with mean/var; 1: backward apply with m, a, b, d; 2: apply with m, a, b */
    const void *x, *dy;
    void* y;
    int64_t outer, C, inner;
    const double *mean, *var, *w, *b;
    double eps;
    const void *pm, *pa, *pb, *pd;
} sweep;

static int sweep_task(tasks* t, int64_t i) {
    const sweep* s = (const sweep*)t->data;
    int64_t u0, u1;
    unit_range(t, i, &u0, &u1);
    if (u1 <= u0) return BN_OK;
    const size_t off = (size_t)(u0 * s->C * s->inner) * s->ops->es;
    const char* x = (const char*)s->x + off;
    char* y = (char*)s->y + off;
    switch (s->kind) {
        case 0: return s->ops->normalize(x, y, u1 - u0, s->C, s->inner, s->mean, s->var, s->w, s->b, s->eps, 1);
        case 1:
            return s->ops->backward_apply((const char*)s->dy + off, x, y, u1 - u0, s->C, s->inner, s->pm, s->pa,
                                          s->pb, s->pd, 1);
        default: return s->ops->apply(x, y, u1 - u0, s->C, s->inner, s->pm, s->pa, s->pb, 1);
    }
}

/* The sweep of d's rows in tasks (as bn_workspace_size counts them). */
static int run_sweep(frame* f, const bn_desc* d, sweep* s) {
    const int64_t nt = task_count(f->nthreads, numel(d) * (int64_t)OPS[d->dtype].es, s->outer);
    return run_tasks(f, nt, s->outer, bn_driver_bytes(0, s->C), sweep_task, s);
}

/* Chunk moments of units [u0, u1) per task. */
typedef struct {
    const dtype_ops* ops;
    const plan* p;
    const void* x;
    double *count, *shift, *resid, *m2;
} moments_job;

static int moments_task(tasks* t, int64_t i) {
    const moments_job* j = (const moments_job*)t->data;
    int64_t u0, u1, e0, o, C, in;
    unit_range(t, i, &u0, &u1);
    if (u1 <= u0) return BN_OK;
    plan_view(j->p, u0, u1, &e0, &o, &C, &in);
    const int64_t k0 = plan_chunk(j->p, u0), Cw = j->p->C;
    int64_t K = chunks(j->ops, o, C, in);
    return j->ops->moments((const char*)j->x + (size_t)e0 * j->ops->es, o, C, in, &K, j->count + k0,
                           j->shift + k0 * Cw, j->resid + k0 * Cw, j->m2 + k0 * Cw, 1);
}

/* The chunk moments of x on the pool: (count K, shift / resid / m2 K C) of one call on the whole. */
static int pool_moments(frame* f, const dtype_ops* ops, const bn_desc* d, const plan* p, const void* x,
                        double* count, double* shift, double* resid, double* m2) {
    moments_job j = {ops, p, x, count, shift, resid, m2};
    const int64_t nt = task_count(f->nthreads, numel(d) * (int64_t)ops->es, p->units);
    return run_tasks(f, nt, p->units, bn_driver_bytes((p->units + nt - 1) / nt * p->per_unit, p->C), moments_task, &j);
}

int bn_batch_norm_inference(const bn_context* ctx, const bn_desc* d, const void* x, void* y,
                            const void* running_mean, const void* running_var, const void* weight, const void* bias,
                            double eps, void* workspace, size_t workspace_bytes) {
    int st = check_desc(d);
    if (st != BN_OK) return st;
    if (!x || !y || !running_mean || !running_var) return BN_ENULL;
    if ((st = check_eps(eps)) != BN_OK) return st;
    const size_t xb = (size_t)numel(d) * OPS[d->dtype].es, pb = (size_t)d->c * psize(d->param_dtype);
    const span outs[] = {{y, xb}};
    const span ins[] = {{x, xb}, {running_mean, pb}, {running_var, pb}, {weight, pb}, {bias, pb}};
    if ((st = check_overlaps(outs, 1, ins, 5, x)) != BN_OK) return st;
    if ((st = check_workspace(ctx, BN_OP_BATCH_NORM_INFERENCE, d, 1, workspace, workspace_bytes)) != BN_OK) return st;
    if ((st = check_workspace_apart(workspace, workspace_bytes, outs, 1, ins, 5)) != BN_OK) return st;
    frame f;
    frame_enter(&f, ctx, workspace, workspace_bytes);
    const dtype_ops* ops = &OPS[d->dtype];
    const int64_t C = d->c;
    double* buf = (double*)scratch(sizeof(double) * 4 * (size_t)C);
    if (!buf) return frame_leave(&f, BN_ENOMEM);
    const double* m = load_params(d->param_dtype, running_mean, C, buf);
    const double* v = load_params(d->param_dtype, running_var, C, buf + C);
    const double* w = load_params(d->param_dtype, weight, C, buf + 2 * C);
    const double* b = load_params(d->param_dtype, bias, C, buf + 3 * C);
    int64_t outer, inner;
    bn_view(d, &outer, &inner);
    if (!f.pfor) {
        st = ops->normalize(x, y, outer, C, inner, m, v, w, b, eps, f.nthreads);
    } else {
        sweep s = {ops, 0, x, NULL, y, outer, C, inner, m, v, w, b, eps, NULL, NULL, NULL, NULL};
        st = run_sweep(&f, d, &s);
    }
    bn_scratch_free(buf);
    return frame_leave(&f, st);
}

/* running = (1 - momentum) running + momentum batch, the variance unbiased (n / (n - 1)) when n > 1: the formula of
 * bn_simd.functional.update_running_stats (bn_simd/_core.pyx, running_update), operation for operation. */
static void running_update(int64_t C, double* rm, double* rv, const double* mean, const double* var, double n,
                           double momentum) {
    const double f = n > 1 ? n / (n - 1.0) : 1.0;
    for (int64_t c = 0; c < C; c++) {
        rm[c] = (1.0 - momentum) * rm[c] + momentum * mean[c];
        const double v = n > 1 ? var[c] * f : var[c];
        rv[c] = (1.0 - momentum) * rv[c] + momentum * v;
    }
}

int bn_batch_norm_training(const bn_context* ctx, const bn_desc* d, const void* x, void* y, const void* weight,
                           const void* bias, double eps, double momentum, void* running_mean, void* running_var,
                           void* save_mean, void* save_invstd, void* workspace, size_t workspace_bytes) {
    int st = check_desc(d);
    if (st != BN_OK) return st;
    if (!x || !y || (!running_mean != !running_var)) return BN_ENULL;
    if ((st = check_eps(eps)) != BN_OK) return st;
    if (!isfinite(momentum) || momentum < 0.0 || momentum > 1.0) return BN_EMOMENTUM;
    const size_t xb = (size_t)numel(d) * OPS[d->dtype].es, pb = (size_t)d->c * psize(d->param_dtype);
    const span outs[] = {{y, xb}, {running_mean, pb}, {running_var, pb}, {save_mean, pb}, {save_invstd, pb}};
    const span ins[] = {{x, xb}, {weight, pb}, {bias, pb}};
    if ((st = check_overlaps(outs, 5, ins, 3, x)) != BN_OK) return st;
    if ((st = check_workspace(ctx, BN_OP_BATCH_NORM_TRAINING, d, 1, workspace, workspace_bytes)) != BN_OK) return st;
    if ((st = check_workspace_apart(workspace, workspace_bytes, outs, 5, ins, 3)) != BN_OK) return st;
    frame f;
    frame_enter(&f, ctx, workspace, workspace_bytes);
    const dtype_ops* ops = &OPS[d->dtype];
    const int64_t C = d->c;
    double* buf = (double*)scratch(sizeof(double) * 8 * (size_t)C);
    if (!buf) return frame_leave(&f, BN_ENOMEM);
    double *mean = buf, *var = buf + C, *tmp = buf + 4 * C;
    const double* w = load_params(d->param_dtype, weight, C, buf + 2 * C);
    const double* b = load_params(d->param_dtype, bias, C, buf + 3 * C);
    int64_t outer, inner;
    bn_view(d, &outer, &inner);
    if (!f.pfor) {
        st = ops->forward_train(x, y, outer, C, inner, w, b, eps, mean, var, f.nthreads);
    } else {
        /* bn_forward_train's statistics are bn_stats' (the merged moments of its chunks), its y bn_normalize's */
        const plan p = make_plan(ops, d);
        double* mom = (double*)scratch(sizeof(double) * (size_t)(p.K * (1 + 3 * C)));
        st = mom ? pool_moments(&f, ops, d, &p, x, mom, mom + p.K, mom + p.K + p.K * C, mom + p.K + 2 * p.K * C)
                 : BN_ENOMEM;
        if (st == BN_OK)
            st = bn_moments_merge(p.K, C, mom, mom + p.K, mom + p.K + p.K * C, mom + p.K + 2 * p.K * C, mean, var);
        if (st == BN_OK) {
            sweep s = {ops, 0, x, NULL, y, outer, C, inner, mean, var, w, b, eps, NULL, NULL, NULL, NULL};
            st = run_sweep(&f, d, &s);
        }
        bn_scratch_free(mom);
    }
    if (st == BN_OK) {
        store_params(d->param_dtype, mean, C, save_mean);
        if (save_invstd) {
            for (int64_t c = 0; c < C; c++) tmp[c] = 1.0 / sqrt(var[c] + eps);
            store_params(d->param_dtype, tmp, C, save_invstd);
        }
        if (running_mean) {
            double* rm = (double*)load_params(d->param_dtype, running_mean, C, tmp);
            double* rv = (double*)load_params(d->param_dtype, running_var, C, tmp + C);
            running_update(C, rm, rv, mean, var, (double)(d->n * d->s), momentum);
            store_params(d->param_dtype, rm, C, running_mean);
            store_params(d->param_dtype, rv, C, running_var);
        }
    }
    bn_scratch_free(buf);
    return frame_leave(&f, st);
}

/* Backward sums per chunk: chunk k's sum dy and sum dy (x - mean) into part[k 2 C + c] and part[k 2 C + C + c]. */
typedef struct {
    const dtype_ops* ops;
    const plan* p;
    const void *dy, *x;
    const double* mean;
    double* part;
} sums_job;

static int sums_task(tasks* t, int64_t i) {
    const sums_job* j = (const sums_job*)t->data;
    const plan* p = j->p;
    const size_t es = j->ops->es;
    int64_t u0, u1;
    unit_range(t, i, &u0, &u1);
    const size_t mark = arena_mark();
    for (int64_t u = u0; u < u1; u++) {
        arena_release(mark);
        int64_t e0, o, C, in;
        plan_view(p, u, u + 1, &e0, &o, &C, &in);
        double* out = j->part + plan_chunk(p, u) * 2 * p->C;
        if (p->per_unit == 1) { /* one chunk: a call of its own adds nothing to its sums */
            const int st = j->ops->backward_reduce((const char*)j->dy + (size_t)e0 * es,
                                                   (const char*)j->x + (size_t)e0 * es, o, C, in, j->mean, out,
                                                   out + p->C, 1);
            if (st != BN_OK) return st;
            continue;
        }
        /* a row of P pieces of L elements per channel, each chunk k = (row, piece) one channel at a time */
        for (int64_t q = 0; q < p->per_unit; q++) {
            const int64_t i0 = q * p->L, len = p->inner - i0 < p->L ? p->inner - i0 : p->L;
            double* o2 = out + q * 2 * p->C;
            for (int64_t c = 0; c < p->C; c++) {
                arena_release(mark);
                const size_t off = (size_t)(e0 + c * p->inner + i0) * es;
                const int st = j->ops->backward_reduce((const char*)j->dy + off, (const char*)j->x + off, 1, 1, len,
                                                       j->mean + c, o2 + c, o2 + p->C + c, 1);
                if (st != BN_OK) return st;
            }
        }
    }
    return BN_OK;
}

int bn_batch_norm_backward(const bn_context* ctx, const bn_desc* d, const void* dy, const void* x, void* dx,
                           const void* mean, const void* invstd, const void* weight, int training, void* grad_weight,
                           void* grad_bias, void* workspace, size_t workspace_bytes) {
    int st = check_desc(d);
    if (st != BN_OK) return st;
    if (!dy || !x || !dx || !mean || !invstd) return BN_ENULL;
    const size_t xb = (size_t)numel(d) * OPS[d->dtype].es, pb = (size_t)d->c * psize(d->param_dtype);
    const span outs[] = {{grad_weight, pb}, {grad_bias, pb}};
    const span ins[] = {{dy, xb}, {x, xb}, {mean, pb}, {invstd, pb}, {weight, pb}};
    const span dxs[] = {{dx, xb}};
    const span pins[] = {{mean, pb}, {invstd, pb}, {weight, pb}, {grad_weight, pb}, {grad_bias, pb}};
    if ((st = check_overlaps(outs, 2, ins, 5, NULL)) != BN_OK) return st;
    if ((st = check_overlaps(dxs, 1, pins, 5, NULL)) != BN_OK) return st;
    /* dx may be dy or x, but not overlap either otherwise */
    if ((dx != dy && overlaps(dx, xb, dy, xb)) || (dx != x && overlaps(dx, xb, x, xb))) return BN_EOVERLAP;
    if ((st = check_workspace(ctx, BN_OP_BATCH_NORM_BACKWARD, d, 1, workspace, workspace_bytes)) != BN_OK) return st;
    if ((st = check_workspace_apart(workspace, workspace_bytes, outs, 2, ins, 5)) != BN_OK) return st;
    if ((st = check_workspace_apart(workspace, workspace_bytes, dxs, 1, pins, 5)) != BN_OK) return st;
    frame f;
    frame_enter(&f, ctx, workspace, workspace_bytes);
    const dtype_ops* ops = &OPS[d->dtype];
    const int64_t C = d->c;
    double* buf = (double*)scratch(sizeof(double) * 8 * (size_t)C);
    void* coef = scratch(ops->tcs * 4 * (size_t)C);
    if (!buf || !coef) {
        bn_scratch_free(buf);
        bn_scratch_free(coef);
        return frame_leave(&f, BN_ENOMEM);
    }
    double *gw = buf + 5 * C, *gb = buf + 6 * C, *sums = buf + 3 * C;
    const double* m = load_params(d->param_dtype, mean, C, buf);
    const double* s = load_params(d->param_dtype, invstd, C, buf + C);
    const double* w = load_params(d->param_dtype, weight, C, buf + 2 * C);
    int64_t outer, inner;
    bn_view(d, &outer, &inner);
    training = training != 0;
    if (!f.pfor) {
        st = ops->backward(dy, x, dx, outer, C, inner, m, s, w, training, gw, gb, f.nthreads);
    } else {
        /* bn_backward: the chunk sums added in chunk order (bn_backward_reduce), the coefficients (bwd_params), the
         * dx sweep (bn_backward_apply; with constant statistics bn_apply of dy with m = b = 0) */
        const plan p = make_plan(ops, d);
        double* part = (double*)scratch(sizeof(double) * 2 * (size_t)(p.K * C));
        sums_job j = {ops, &p, dy, x, m, part};
        const int64_t nt = task_count(f.nthreads, 2 * (int64_t)xb, p.units);
        st = part ? run_tasks(&f, nt, p.units, bn_driver_bytes(1, C), sums_task, &j) : BN_ENOMEM;
        if (st == BN_OK) {
            sum_rows(part, p.K, 2 * C, sums); /* (chunk after chunk: each sum adds the chunks in order) */
            const size_t tc = ops->tcs * (size_t)C;
            char* q = (char*)coef;
            ops->bwd_params(C, (double)(outer * inner), sums, sums + C, m, s, w, training, gw, gb, q, q + tc,
                            q + 2 * tc, q + 3 * tc);
            if (!training) {
                memset(q, 0, tc);
                memset(q + 2 * tc, 0, tc);
            }
            sweep sw = {ops, training ? 1 : 2, training ? x : dy, dy, dx, outer, C, inner, NULL, NULL, NULL, NULL, 0.0,
                        q, q + tc, q + 2 * tc, q + 3 * tc};
            st = run_sweep(&f, d, &sw);
        }
        bn_scratch_free(part);
    }
    if (st == BN_OK) {
        store_params(d->param_dtype, gw, C, grad_weight);
        store_params(d->param_dtype, gb, C, grad_bias);
    }
    bn_scratch_free(coef);
    bn_scratch_free(buf);
    return frame_leave(&f, st);
}

int bn_fold_params(int64_t C, int param_dtype, const void* running_mean, const void* running_var, const void* weight,
                   const void* bias, double eps, void* scale, void* shift) {
    if (C < 1) return BN_ESIZE;
    if (param_dtype != BN_F32 && param_dtype != BN_F64) return BN_EDTYPE;
    if (!running_mean || !running_var || !scale || !shift) return BN_ENULL;
    int st = check_eps(eps);
    if (st != BN_OK) return st;
    if (C > (int64_t)(PTRDIFF_MAX / 8)) return BN_ESIZE;
    const size_t pb = (size_t)C * psize(param_dtype);
    const span outs[] = {{scale, pb}, {shift, pb}};
    const span ins[] = {{running_mean, pb}, {running_var, pb}, {weight, pb}, {bias, pb}};
    if ((st = check_overlaps(outs, 2, ins, 4, NULL)) != BN_OK) return st;
    /* two passes, so that nothing is written when a value is wrong (bn_simd.fold_params' checks) */
    for (int pass = 0; pass < 2; pass++)
        for (int64_t c = 0; c < C; c++) {
#define BN_AT(p) (param_dtype == BN_F64 ? ((const double*)(p))[c] : (double)((const float*)(p))[c])
            const double m = BN_AT(running_mean), v = BN_AT(running_var);
            const double w = weight ? BN_AT(weight) : 1.0, b = bias ? BN_AT(bias) : 0.0;
#undef BN_AT
            /* scale = w / sqrt(var + eps), shift = b - mean scale: fold.py's operations in its order */
            double sc = 1.0 / sqrt(v + eps);
            if (weight) sc = sc * w;
            double sh = -m * sc;
            if (bias) sh = sh + b;
            if (pass == 0) {
                if (!isfinite(m) || !isfinite(v) || !isfinite(w) || !isfinite(b) || v < 0.0) return BN_EINVAL;
                if (!isfinite(sc) || !isfinite(sh)) return BN_EINVAL;
                if (param_dtype == BN_F32 && (fabs(sc) > FLT_MAX || fabs(sh) > FLT_MAX)) return BN_EINVAL;
            } else if (param_dtype == BN_F64) {
                ((double*)scale)[c] = sc;
                ((double*)shift)[c] = sh;
            } else {
                ((float*)scale)[c] = (float)sc;
                ((float*)shift)[c] = (float)sh;
            }
        }
    return BN_OK;
}

int bn_batch_norm_moments(const bn_context* ctx, const bn_desc* d, const void* x, int64_t* K, double* count,
                          double* shift, double* resid, double* m2, void* workspace, size_t workspace_bytes) {
    int st = check_desc(d);
    if (st != BN_OK) return st;
    if (!K) return BN_ENULL;
    const dtype_ops* ops = &OPS[d->dtype];
    int64_t outer, inner;
    bn_view(d, &outer, &inner);
    const int64_t Kc = chunks(ops, outer, d->c, inner);
    if (!count) {
        *K = Kc;
        return BN_OK;
    }
    if (!x || !shift || !resid || !m2) return BN_ENULL;
    if (*K != Kc) return BN_ESIZE;
    const size_t xb = (size_t)numel(d) * ops->es, kb = (size_t)Kc * 8, kcb = kb * (size_t)d->c;
    const span outs[] = {{count, kb}, {shift, kcb}, {resid, kcb}, {m2, kcb}};
    const span ins[] = {{x, xb}};
    if ((st = check_overlaps(outs, 4, ins, 1, NULL)) != BN_OK) return st;
    if ((st = check_workspace(ctx, BN_OP_BATCH_NORM_MOMENTS, d, 1, workspace, workspace_bytes)) != BN_OK) return st;
    if ((st = check_workspace_apart(workspace, workspace_bytes, outs, 4, ins, 1)) != BN_OK) return st;
    frame f;
    frame_enter(&f, ctx, workspace, workspace_bytes);
    if (!f.pfor) {
        int64_t k = Kc;
        st = ops->moments(x, outer, d->c, inner, &k, count, shift, resid, m2, f.nthreads);
    } else {
        const plan p = make_plan(ops, d);
        st = pool_moments(&f, ops, d, &p, x, count, shift, resid, m2);
    }
    return frame_leave(&f, st);
}

int bn_merge_moments(int64_t K, int64_t C, int param_dtype, const double* count, const double* shift,
                     const double* resid, const double* m2, void* mean, void* var) {
    if (K < 1 || C < 1 || K > (int64_t)(PTRDIFF_MAX / 8) / C) return BN_ESIZE;
    if (param_dtype != BN_F32 && param_dtype != BN_F64) return BN_EDTYPE;
    if (!count || !shift || !resid || !m2 || !mean || !var) return BN_ENULL;
    double n = 0.0;
    for (int64_t k = 0; k < K; k++) {
        if (!(count[k] >= 0.0) || !isfinite(count[k])) return BN_EINVAL;
        n += count[k];
    }
    if (n == 0.0) return BN_ESIZE;
    const size_t pb = (size_t)C * psize(param_dtype), kb = (size_t)K * 8, kcb = kb * (size_t)C;
    const span outs[] = {{mean, pb}, {var, pb}};
    const span ins[] = {{count, kb}, {shift, kcb}, {resid, kcb}, {m2, kcb}};
    int st = check_overlaps(outs, 2, ins, 4, NULL);
    if (st != BN_OK) return st;
    if (param_dtype == BN_F64) /* (the arguments are checked: it cannot fail part way) */
        return bn_moments_merge(K, C, count, shift, resid, m2, (double*)mean, (double*)var);
    double* buf = (double*)malloc(sizeof(double) * 2 * (size_t)C); /* (float results: through doubles) */
    if (!buf) return BN_ENOMEM;
    st = bn_moments_merge(K, C, count, shift, resid, m2, buf, buf + C);
    if (st == BN_OK) {
        store_params(param_dtype, buf, C, mean);
        store_params(param_dtype, buf + C, C, var);
    }
    free(buf);
    return st;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Group norm and instance norm: samples are independent (a group is in one sample), so the tasks take runs of
 * samples; the backward's parameter gradients, which add over the samples in sample order (gn_param_grads), are each
 * sample's own (a one-sample call adds its one term to 0) added in that order here. */

typedef struct {
    const dtype_ops* ops;
    int backward;
    const void *x, *dy;
    void* y;
    int64_t C, S, G;
    int cl;
    const double *w, *b, *mean, *rstd;
    double eps;
    double *m_out, *v_out; /* forward: N G each */
    double* part;          /* backward: per-sample grad_weight (N C), then grad_bias (N C) */
    int64_t N;
} gn_job;

static int gn_task(tasks* t, int64_t i) {
    const gn_job* j = (const gn_job*)t->data;
    const int64_t per = j->C * j->S;
    const size_t es = j->ops->es;
    int64_t n0, n1;
    unit_range(t, i, &n0, &n1);
    if (!j->backward)
        return n1 <= n0 ? BN_OK
                        : j->ops->group_forward((const char*)j->x + (size_t)(n0 * per) * es,
                                                (char*)j->y + (size_t)(n0 * per) * es, n1 - n0, j->C, j->S, j->G,
                                                j->cl, j->w, j->b, j->eps, j->m_out + n0 * j->G,
                                                j->v_out + n0 * j->G, 1);
    const size_t mark = arena_mark();
    for (int64_t n = n0; n < n1; n++) {
        arena_release(mark);
        const size_t off = (size_t)(n * per) * es;
        const int st = j->ops->group_backward((const char*)j->dy + off, (const char*)j->x + off, (char*)j->y + off, 1,
                                              j->C, j->S, j->G, j->cl, j->mean + n * j->G, j->rstd + n * j->G, j->w,
                                              j->part + n * j->C, j->part + (j->N + n) * j->C, 1);
        if (st != BN_OK) return st;
    }
    return BN_OK;
}

int bn_group_norm_forward(const bn_context* ctx, const bn_desc* d, int64_t groups, const void* x, void* y,
                          const void* weight, const void* bias, double eps, void* mean, void* rstd, void* workspace,
                          size_t workspace_bytes) {
    int st = check_desc(d);
    if (st != BN_OK) return st;
    if (!x || !y) return BN_ENULL;
    if (groups < 1 || d->c % groups != 0) return BN_EGROUPS;
    if ((st = check_eps(eps)) != BN_OK) return st;
    const int64_t C = d->c, Q = d->n * groups;
    const size_t xb = (size_t)numel(d) * OPS[d->dtype].es, pb = (size_t)C * psize(d->param_dtype);
    const size_t qb = (size_t)Q * psize(d->param_dtype);
    const span outs[] = {{y, xb}, {mean, qb}, {rstd, qb}};
    const span ins[] = {{x, xb}, {weight, pb}, {bias, pb}};
    if ((st = check_overlaps(outs, 3, ins, 3, x)) != BN_OK) return st;
    int fit_threads;
    st = check_gn_workspace(ctx, BN_OP_GROUP_NORM_FORWARD, d, groups, workspace, workspace_bytes, &fit_threads);
    if (st != BN_OK) return st;
    if ((st = check_workspace_apart(workspace, workspace_bytes, outs, 3, ins, 3)) != BN_OK) return st;
    frame f;
    frame_enter(&f, ctx, workspace, workspace_bytes);
    const dtype_ops* ops = &OPS[d->dtype];
    double* buf = (double*)scratch(sizeof(double) * (size_t)(2 * C + 2 * Q));
    if (!buf) return frame_leave(&f, BN_ENOMEM);
    const double* w = load_params(d->param_dtype, weight, C, buf);
    const double* b = load_params(d->param_dtype, bias, C, buf + C);
    double *m = buf + 2 * C, *v = m + Q;
    const int cl = d->layout == BN_LAYOUT_NHWC;
    if (!f.pfor) {
        const int nt = fit_threads ? fit_threads : f.nthreads;
        st = ops->group_forward(x, y, d->n, C, d->s, groups, cl, w, b, eps, m, v, nt);
    } else {
        gn_job j = {ops, 0, x, NULL, y, C, d->s, groups, cl, w, b, NULL, NULL, eps, m, v, NULL, d->n};
        const int64_t nt = task_count(f.nthreads, (int64_t)xb, d->n);
        st = run_tasks(&f, nt, d->n, gn_driver_bytes(ops, (d->n + nt - 1) / nt, C, d->s, groups, 1), gn_task, &j);
    }
    if (st == BN_OK) {
        store_params(d->param_dtype, m, Q, mean);
        for (int64_t q = 0; q < Q; q++) v[q] = 1.0 / sqrt(v[q] + eps);
        store_params(d->param_dtype, v, Q, rstd);
    }
    bn_scratch_free(buf);
    return frame_leave(&f, st);
}

int bn_group_norm_backward(const bn_context* ctx, const bn_desc* d, int64_t groups, const void* dy, const void* x,
                           void* dx, const void* mean, const void* rstd, const void* weight, void* grad_weight,
                           void* grad_bias, void* workspace, size_t workspace_bytes) {
    int st = check_desc(d);
    if (st != BN_OK) return st;
    if (!dy || !x || !dx || !mean || !rstd) return BN_ENULL;
    if (groups < 1 || d->c % groups != 0) return BN_EGROUPS;
    const int64_t C = d->c, Q = d->n * groups;
    const size_t xb = (size_t)numel(d) * OPS[d->dtype].es, pb = (size_t)C * psize(d->param_dtype);
    const size_t qb = (size_t)Q * psize(d->param_dtype);
    const span outs[] = {{grad_weight, pb}, {grad_bias, pb}};
    const span ins[] = {{dy, xb}, {x, xb}, {mean, qb}, {rstd, qb}, {weight, pb}};
    const span dxs[] = {{dx, xb}};
    const span pins[] = {{mean, qb}, {rstd, qb}, {weight, pb}, {grad_weight, pb}, {grad_bias, pb}};
    if ((st = check_overlaps(outs, 2, ins, 5, NULL)) != BN_OK) return st;
    if ((st = check_overlaps(dxs, 1, pins, 5, NULL)) != BN_OK) return st;
    if ((dx != dy && overlaps(dx, xb, dy, xb)) || (dx != x && overlaps(dx, xb, x, xb))) return BN_EOVERLAP;
    int fit_threads;
    st = check_gn_workspace(ctx, BN_OP_GROUP_NORM_BACKWARD, d, groups, workspace, workspace_bytes, &fit_threads);
    if (st != BN_OK) return st;
    if ((st = check_workspace_apart(workspace, workspace_bytes, outs, 2, ins, 5)) != BN_OK) return st;
    if ((st = check_workspace_apart(workspace, workspace_bytes, dxs, 1, pins, 5)) != BN_OK) return st;
    frame f;
    frame_enter(&f, ctx, workspace, workspace_bytes);
    const dtype_ops* ops = &OPS[d->dtype];
    double* buf = (double*)scratch(sizeof(double) * (size_t)(3 * C + 2 * Q));
    if (!buf) return frame_leave(&f, BN_ENOMEM);
    const double* w = load_params(d->param_dtype, weight, C, buf);
    const double* m = load_params(d->param_dtype, mean, Q, buf + 3 * C);
    const double* s = load_params(d->param_dtype, rstd, Q, buf + 3 * C + Q);
    double *gw = buf + C, *gb = buf + 2 * C;
    const int cl = d->layout == BN_LAYOUT_NHWC;
    if (!f.pfor) {
        st = ops->group_backward(dy, x, dx, d->n, C, d->s, groups, cl, m, s, w, gw, gb,
                                 fit_threads ? fit_threads : f.nthreads);
    } else {
        double* part = (double*)scratch(sizeof(double) * 2 * (size_t)(d->n * C));
        gn_job j = {ops, 1, x, dy, dx, C, d->s, groups, cl, w, NULL, m, s, 0.0, NULL, NULL, part, d->n};
        const int64_t nt = task_count(f.nthreads, 2 * (int64_t)xb, d->n);
        st = part ? run_tasks(&f, nt, d->n, gn_driver_bytes(ops, 1, C, d->s, groups, 1), gn_task, &j) : BN_ENOMEM;
        if (st == BN_OK) { /* gn_param_grads' order: sample after sample */
            sum_rows(part, d->n, C, gw);
            sum_rows(part + d->n * C, d->n, C, gb);
            bn_nan_canon_grads(C, gw, gb); /* (a NaN: the one NaN, as the driver gives it) */
        }
        bn_scratch_free(part);
    }
    if (st == BN_OK) {
        store_params(d->param_dtype, gw, C, grad_weight);
        store_params(d->param_dtype, gb, C, grad_bias);
    }
    bn_scratch_free(buf);
    return frame_leave(&f, st);
}

int bn_instance_norm_forward(const bn_context* ctx, const bn_desc* d, const void* x, void* y, const void* weight,
                             const void* bias, double eps, void* mean, void* rstd, void* workspace,
                             size_t workspace_bytes) {
    const int st = check_desc(d);
    return st != BN_OK ? st
                       : bn_group_norm_forward(ctx, d, d->c, x, y, weight, bias, eps, mean, rstd, workspace,
                                               workspace_bytes);
}

int bn_instance_norm_backward(const bn_context* ctx, const bn_desc* d, const void* dy, const void* x, void* dx,
                              const void* mean, const void* rstd, const void* weight, void* grad_weight,
                              void* grad_bias, void* workspace, size_t workspace_bytes) {
    const int st = check_desc(d);
    return st != BN_OK ? st
                       : bn_group_norm_backward(ctx, d, d->c, dy, x, dx, mean, rstd, weight, grad_weight, grad_bias,
                                                workspace, workspace_bytes);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Layer norm and RMS norm: positions are independent in the forward, so its tasks take runs of rows (samples when
 * channels-first); the backward's parameter gradients add over blocks of rows fixed by the whole shape, so it runs
 * as one driver call (one thread when the context has a parallel_for). */

typedef struct {
    const dtype_ops* ops;
    const void* x;
    void* y;
    int64_t C, S;
    int rms;
    const void *w, *b;
    double eps;
    double *mean, *rstd;
} rn_job;

static int rn_task(tasks* t, int64_t i) {
    const rn_job* j = (const rn_job*)t->data;
    int64_t n0, n1;
    unit_range(t, i, &n0, &n1);
    if (n1 <= n0) return BN_OK;
    const size_t off = (size_t)(n0 * j->C * j->S) * j->ops->es;
    return j->ops->row_forward((const char*)j->x + off, (char*)j->y + off, n1 - n0, j->C, j->S, j->rms, j->w, j->b,
                               j->eps, j->rms ? NULL : j->mean + n0 * j->S, j->rstd + n0 * j->S, 1);
}

/* n values of param_dtype as the compute type of tcs bytes (float or double): the array itself when it is of that
 * type, else a converted copy in buf; NULL stays NULL. */
static const void* load_tc(int param_dtype, size_t tcs, const void* src, int64_t n, void* buf) {
    if (!src || psize(param_dtype) == tcs) return src;
    for (int64_t i = 0; i < n; i++) {
        if (tcs == 8)
            ((double*)buf)[i] = (double)((const float*)src)[i];
        else
            ((float*)buf)[i] = (float)((const double*)src)[i];
    }
    return buf;
}

static int row_norm_forward(const bn_context* ctx, const bn_desc* d, int rms, const void* x, void* y,
                            const void* weight, const void* bias, double eps, void* mean, void* rstd, void* workspace,
                            size_t workspace_bytes) {
    int st = check_desc(d);
    if (st != BN_OK) return st;
    if (!x || !y) return BN_ENULL;
    if ((st = check_eps(eps)) != BN_OK) return st;
    int64_t N, S;
    rn_view(d, &N, &S);
    const int64_t C = d->c, P = N * S;
    const size_t xb = (size_t)numel(d) * OPS[d->dtype].es, pb = (size_t)C * psize(d->param_dtype);
    const size_t qb = (size_t)P * psize(d->param_dtype);
    const span outs[] = {{y, xb}, {mean, qb}, {rstd, qb}};
    const span ins[] = {{x, xb}, {weight, pb}, {bias, pb}};
    if ((st = check_overlaps(outs, 3, ins, 3, x)) != BN_OK) return st;
    if ((st = check_workspace(ctx, BN_OP_LAYER_NORM_FORWARD, d, 1, workspace, workspace_bytes)) != BN_OK) return st;
    if ((st = check_workspace_apart(workspace, workspace_bytes, outs, 3, ins, 3)) != BN_OK) return st;
    frame f;
    frame_enter(&f, ctx, workspace, workspace_bytes);
    const dtype_ops* ops = &OPS[d->dtype];
    double* buf = (double*)scratch(sizeof(double) * (size_t)(2 * C + 2 * P));
    if (!buf) return frame_leave(&f, BN_ENOMEM);
    const void* w = load_tc(d->param_dtype, ops->tcs, weight, C, buf);
    const void* b = load_tc(d->param_dtype, ops->tcs, bias, C, buf + C);
    double *m = buf + 2 * C, *r = m + P;
    if (!f.pfor) {
        st = ops->row_forward(x, y, N, C, S, rms, w, b, eps, rms ? NULL : m, r, f.nthreads);
    } else {
        rn_job j = {ops, x, y, C, S, rms, w, b, eps, m, r};
        st = run_tasks(&f, task_count(f.nthreads, (int64_t)xb, N), N, rn_driver_bytes(C), rn_task, &j);
    }
    if (st == BN_OK) {
        if (!rms) store_params(d->param_dtype, m, P, mean);
        store_params(d->param_dtype, r, P, rstd);
    }
    bn_scratch_free(buf);
    return frame_leave(&f, st);
}

static int row_norm_backward(const bn_context* ctx, const bn_desc* d, int rms, const void* dy, const void* x,
                             void* dx, const void* mean, const void* rstd, const void* weight, void* grad_weight,
                             void* grad_bias, void* workspace, size_t workspace_bytes) {
    int st = check_desc(d);
    if (st != BN_OK) return st;
    if (!dy || !x || !dx || !rstd || (!rms && !mean)) return BN_ENULL;
    int64_t N, S;
    rn_view(d, &N, &S);
    const int64_t C = d->c, P = N * S;
    const size_t xb = (size_t)numel(d) * OPS[d->dtype].es, pb = (size_t)C * psize(d->param_dtype);
    const size_t qb = (size_t)P * psize(d->param_dtype);
    const span outs[] = {{grad_weight, pb}, {grad_bias, pb}};
    const span ins[] = {{dy, xb}, {x, xb}, {rms ? NULL : mean, qb}, {rstd, qb}, {weight, pb}};
    const span dxs[] = {{dx, xb}};
    const span pins[] = {{rms ? NULL : mean, qb}, {rstd, qb}, {weight, pb}, {grad_weight, pb}, {grad_bias, pb}};
    if ((st = check_overlaps(outs, 2, ins, 5, NULL)) != BN_OK) return st;
    if ((st = check_overlaps(dxs, 1, pins, 5, NULL)) != BN_OK) return st;
    if ((dx != dy && overlaps(dx, xb, dy, xb)) || (dx != x && overlaps(dx, xb, x, xb))) return BN_EOVERLAP;
    if ((st = check_workspace(ctx, BN_OP_LAYER_NORM_BACKWARD, d, 1, workspace, workspace_bytes)) != BN_OK) return st;
    if ((st = check_workspace_apart(workspace, workspace_bytes, outs, 2, ins, 5)) != BN_OK) return st;
    if ((st = check_workspace_apart(workspace, workspace_bytes, dxs, 1, pins, 5)) != BN_OK) return st;
    frame f;
    frame_enter(&f, ctx, workspace, workspace_bytes);
    const dtype_ops* ops = &OPS[d->dtype];
    double* buf = (double*)scratch(sizeof(double) * (size_t)(3 * C + 2 * P));
    if (!buf) return frame_leave(&f, BN_ENOMEM);
    const double* w = load_params(d->param_dtype, weight, C, buf);
    double *gw = buf + C, *gb = buf + 2 * C;
    const double* m = rms ? NULL : load_params(d->param_dtype, mean, P, buf + 3 * C);
    const double* r = load_params(d->param_dtype, rstd, P, buf + 3 * C + P);
    st = ops->row_backward(dy, x, dx, N, C, S, rms, m, r, w, gw, gb, f.pfor ? 1 : f.nthreads);
    if (st == BN_OK) {
        store_params(d->param_dtype, gw, C, grad_weight);
        if (!rms) store_params(d->param_dtype, gb, C, grad_bias);
    }
    bn_scratch_free(buf);
    return frame_leave(&f, st);
}

int bn_layer_norm_forward(const bn_context* ctx, const bn_desc* d, const void* x, void* y, const void* weight,
                          const void* bias, double eps, void* mean, void* rstd, void* workspace,
                          size_t workspace_bytes) {
    return row_norm_forward(ctx, d, 0, x, y, weight, bias, eps, mean, rstd, workspace, workspace_bytes);
}

int bn_layer_norm_backward(const bn_context* ctx, const bn_desc* d, const void* dy, const void* x, void* dx,
                           const void* mean, const void* rstd, const void* weight, void* grad_weight, void* grad_bias,
                           void* workspace, size_t workspace_bytes) {
    return row_norm_backward(ctx, d, 0, dy, x, dx, mean, rstd, weight, grad_weight, grad_bias, workspace,
                             workspace_bytes);
}

int bn_rms_norm_forward(const bn_context* ctx, const bn_desc* d, const void* x, void* y, const void* weight,
                        double eps, void* rstd, void* workspace, size_t workspace_bytes) {
    return row_norm_forward(ctx, d, 1, x, y, weight, NULL, eps, NULL, rstd, workspace, workspace_bytes);
}

int bn_rms_norm_backward(const bn_context* ctx, const bn_desc* d, const void* dy, const void* x, void* dx,
                         const void* rstd, const void* weight, void* grad_weight, void* workspace,
                         size_t workspace_bytes) {
    return row_norm_backward(ctx, d, 1, dy, x, dx, NULL, rstd, weight, grad_weight, NULL, workspace,
                             workspace_bytes);
}
