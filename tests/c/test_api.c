/* The public C API on a thread pool and in a caller's workspace (run by tests/test_c_library.py and by CMake's ctest):
 *   - every op under a context whose parallel_for is a pool of POSIX threads gives the bits of the OpenMP path;
 *   - with a workspace of bn_workspace_size bytes, the library calls malloc not once (the test is linked with
 *     -Wl,--wrap=malloc against the static library, so every malloc of its objects reaches __wrap_malloc), and the
 *     results are the same bits; one byte less is BN_EWORKSPACE with nothing written (or, for group norm's OpenMP
 *     drivers, a run on fewer threads, the same bits); one sized under 1 OpenMP thread serves a call under 4.
 * Prints "N checks, M failures". */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bn_simd_api.h"
#include <fenv.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

static long checks, failures;
static long mallocs; /* the library's, while counting */
static int counting;

void* __real_malloc(size_t n);
void* __wrap_malloc(size_t n) {
    if (counting) __atomic_add_fetch(&mallocs, 1, __ATOMIC_RELAXED);
    return __real_malloc(n);
}

#define CHECK(cond, ...)                                 \
    do {                                                 \
        checks++;                                        \
        if (!(cond)) {                                   \
            failures++;                                  \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);  \
            printf(__VA_ARGS__);                         \
            printf("\n");                                \
        }                                                \
    } while (0)

/* ---- a pool of POSIX threads: workers take task indices from a shared counter ---- */
typedef struct {
    int64_t n, next;
    bn_task_fn task;
    void* arg;
} job;

static void* worker(void* p) {
    job* j = (job*)p;
    for (int64_t i; (i = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED)) < j->n;) j->task(j->arg, i);
    return NULL;
}

/* the tasks on *pool threads started with `start`, the caller one of them when `caller` is set (else it waits) */
static void pool_run(void* pool, int64_t n, bn_task_fn task, void* arg, void* (*start)(void*), int caller) {
    const int nt = *(const int*)pool - caller;
    job j = {n, 0, task, arg};
    pthread_t t[16];
    for (int i = 0; i < nt; i++) pthread_create(&t[i], NULL, start, &j);
    if (caller) worker(&j);
    for (int i = 0; i < nt; i++) pthread_join(t[i], NULL);
}

static void pool_for(void* pool, int64_t n, bn_task_fn task, void* arg) { pool_run(pool, n, task, arg, worker, 1); }

/* ... and a pool whose threads run in SSE's default modes whatever the caller's (long-lived threads, started before
 * the caller changed its own), every task on one of them (the caller waits) */
static void* worker_default_modes(void* p) {
#if defined(__SSE__)
    _mm_setcsr(0x1F80);
#endif
    fesetround(FE_TONEAREST);
    return worker(p);
}

static void pool_for_default_modes(void* pool, int64_t n, bn_task_fn task, void* arg) {
    pool_run(pool, n, task, arg, worker_default_modes, 0);
}

/* ---- data ---- */
static uint64_t seed = 12345;
static double rnd(void) { /* uniform in [-1, 1) */
    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(seed >> 11) / 4503599627370496.0 - 1.0;
}

static size_t esize(int dt) { return dt == BN_F64 ? 8 : dt == BN_F32 ? 4 : 2; }

static void fill(void* p, int dt, int64_t n, double scale, double shift) {
    for (int64_t i = 0; i < n; i++) {
        const double v = rnd() * scale + shift;
        if (dt == BN_F64)
            ((double*)p)[i] = v;
        else if (dt == BN_F32)
            ((float*)p)[i] = (float)v;
        else { /* a bfloat16 or float16 pattern of a moderate value: the float's top half for bfloat16; for float16 a
                * normal number from its fields */
            const float f = (float)v;
            uint32_t u;
            memcpy(&u, &f, 4);
            const uint16_t half = (uint16_t)((u >> 16 & 0x8000) | (0x3800 + (uint16_t)(rnd() * 0x7ff + 0x800)));
            ((uint16_t*)p)[i] = dt == BN_BF16 ? (uint16_t)(u >> 16) : half;
        }
    }
}

/* One op on one tensor, all outputs in one buffer (compared bytewise). */
enum { OP_INF, OP_TRAIN, OP_BWD, OP_GN_F, OP_GN_B, OP_LN_F, OP_LN_B, OP_MOM, NOPS };
static const char* const op_names[NOPS] = {"inference", "training", "backward", "group_fwd",
                                           "group_bwd", "layer_fwd", "layer_bwd", "moments"};
static const int api_op[NOPS] = {BN_OP_BATCH_NORM_INFERENCE, BN_OP_BATCH_NORM_TRAINING, BN_OP_BATCH_NORM_BACKWARD,
                                 BN_OP_GROUP_NORM_FORWARD,  BN_OP_GROUP_NORM_BACKWARD, BN_OP_LAYER_NORM_FORWARD,
                                 BN_OP_LAYER_NORM_BACKWARD, BN_OP_BATCH_NORM_MOMENTS};

typedef struct {
    bn_desc d;
    int64_t G;
    void *x, *dy, *w, *b, *stat1, *stat2; /* inputs */
} input;

/* Doubles in each per-channel / per-group / per-position output array: at least C, N G, N S and the K C of the chunk
 * moments (a chunk has at least 16 elements of a channel). */
static int64_t big_len(const bn_desc* d) { return d->n * d->s + d->n * d->c + d->n * d->c * d->s / 8 + d->c + 64; }

/* Runs op; out: E elements, then 8 arrays of big_len doubles. Returns the status. */
static int run(const bn_context* ctx, int op, const input* in, char* out, void* ws, size_t wsb) {
    const bn_desc* d = &in->d;
    const int64_t E = d->n * d->c * d->s, big = big_len(d);
    char* y = out;
    double* a = (double*)(out + E * esize(d->dtype) + 64);
    double *a1 = a, *a2 = a + big, *a3 = a + 2 * big, *a4 = a + 3 * big;
    switch (op) {
        case OP_INF:
            return bn_batch_norm_inference(ctx, d, in->x, y, in->stat1, in->stat2, in->w, in->b, 1e-5, ws, wsb);
        case OP_TRAIN:
            for (int64_t c = 0; c < d->c; c++) a1[c] = 0.5, a2[c] = 2.0;
            return bn_batch_norm_training(ctx, d, in->x, y, in->w, in->b, 1e-5, 0.3, a1, a2, a3, a4, ws, wsb);
        case OP_BWD:
            return bn_batch_norm_backward(ctx, d, in->dy, in->x, y, in->stat1, in->stat2, in->w, 1, a1, a2, ws, wsb);
        case OP_GN_F: return bn_group_norm_forward(ctx, d, in->G, in->x, y, in->w, in->b, 1e-5, a1, a2, ws, wsb);
        case OP_GN_B:
            return bn_group_norm_backward(ctx, d, in->G, in->dy, in->x, y, in->stat1, in->stat2, in->w, a1, a2, ws,
                                          wsb);
        case OP_LN_F: return bn_layer_norm_forward(ctx, d, in->x, y, in->w, in->b, 1e-5, a1, a2, ws, wsb);
        case OP_LN_B:
            return bn_layer_norm_backward(ctx, d, in->dy, in->x, y, in->stat1, in->stat2, in->w, a1, a2, ws, wsb);
        default: {
            int64_t K = 0;
            int st = bn_batch_norm_moments(ctx, d, in->x, &K, NULL, NULL, NULL, NULL, NULL, 0);
            if (st != BN_OK || K * d->c > big) return st != BN_OK ? st : -100;
            return bn_batch_norm_moments(ctx, d, in->x, &K, a1, a2, a3, a4, ws, wsb);
        }
    }
}

static size_t out_bytes(const bn_desc* d) {
    const int64_t big = big_len(d);
    return (size_t)(d->n * d->c * d->s) * esize(d->dtype) + 64 + 8 * sizeof(double) * (size_t)big;
}

/* >= 0: test_shape makes this sample's values ~1e35 (its groups take group norm's float64 apply, decided per sample: a
 * pool's tasks, each a run of samples, then give the OpenMP path's bits) and runs the forwards only */
static int64_t extreme_sample = -1;

/* nonzero: test_shape puts NaN (both signs) and +-Inf into x, one value in 97: every op's NaN outputs (their signs and
 * payloads too) must have the OpenMP path's bits on the pool and in a workspace */
static int poison = 0;

static void poison_x(void* x, int dt, int64_t E) {
    static const uint64_t d64[4] = {0x7ff8000000000000ULL, 0xfff8000000000000ULL, 0x7ff0000000000000ULL,
                                    0xfff0000000000000ULL};
    static const uint32_t d32[4] = {0x7fc00000u, 0xffc00000u, 0x7f800000u, 0xff800000u};
    static const uint16_t d16[4] = {0x7e00, 0xfe00, 0x7c00, 0xfc00}, db16[4] = {0x7fc0, 0xffc0, 0x7f80, 0xff80};
    for (int64_t i = 7, k = 0; i < E; i += 97, k++) {
        if (dt == BN_F64)
            memcpy((double*)x + i, &d64[k % 4], 8);
        else if (dt == BN_F32)
            memcpy((float*)x + i, &d32[k % 4], 4);
        else
            ((uint16_t*)x)[i] = dt == BN_F16 ? d16[k % 4] : db16[k % 4];
    }
}

static void test_shape(int dt, int layout, int64_t n, int64_t c, int64_t s, int64_t G, const bn_context* pool_ctx) {
    input in = {{dt, BN_F64, layout, n, c, s}, G, 0, 0, 0, 0, 0, 0};
    const int64_t E = n * c * s, Q = n * (n * s > n * G ? s : G) + n * c;
    in.x = malloc((size_t)E * esize(dt));
    in.dy = malloc((size_t)E * esize(dt));
    in.w = malloc(sizeof(double) * (size_t)c);
    in.b = malloc(sizeof(double) * (size_t)c);
    in.stat1 = malloc(sizeof(double) * (size_t)(Q + c));
    in.stat2 = malloc(sizeof(double) * (size_t)(Q + c));
    fill(in.x, dt, E, 2.0, 0.5);
    fill(in.dy, dt, E, 1.0, 0.0);
    fill(in.w, BN_F64, c, 1.0, 0.5);
    fill(in.b, BN_F64, c, 1.0, 0.0);
    fill(in.stat1, BN_F64, Q + c, 0.5, 0.0);
    fill(in.stat2, BN_F64, Q + c, 0.25, 1.0);
    if (extreme_sample >= 0)
        fill((char*)in.x + (size_t)(extreme_sample * c * s) * esize(dt), dt, c * s, 1e34, 1e35);
    if (poison) poison_x(in.x, dt, E);
    if (G == 0) in.G = 1;
    const size_t ob = out_bytes(&in.d);
    char *ref = calloc(1, ob), *got = calloc(1, ob);
    for (int op = 0; op < NOPS; op++) {
        if ((op == OP_GN_F || op == OP_GN_B) && (G == 0 || c % G)) continue; /* (G = 0: no group norm) */
        if (extreme_sample >= 0 && op != OP_GN_F && op != OP_LN_F) continue;
        memset(ref, 0x5a, ob);
        int st = run(NULL, op, &in, ref, NULL, 0);
        CHECK(st == BN_OK, "%s dt %d layout %d (%lld %lld %lld): status %d", op_names[op], dt, layout, (long long)n,
              (long long)c, (long long)s, st);
        const bn_context* ctxs[2] = {NULL, pool_ctx};
        for (int k = 0; k < 2; k++) {
            /* the pool's bits */
            if (k == 1) {
                memset(got, 0x5a, ob);
                st = run(ctxs[k], op, &in, got, NULL, 0);
                CHECK(st == BN_OK && memcmp(ref, got, ob) == 0, "%s dt %d layout %d (%lld %lld %lld) on the pool: "
                      "status %d, %s", op_names[op], dt, layout, (long long)n, (long long)c, (long long)s, st,
                      st == BN_OK ? "other bits" : bn_strerror(st));
            }
            /* in a workspace: no malloc, the same bits; one byte short: refused, nothing written */
            size_t need = 0;
            st = bn_workspace_size(ctxs[k], api_op[op], &in.d, G, &need);
            CHECK(st == BN_OK, "workspace_size %s: %d", op_names[op], st);
            char* ws = malloc(need + 1);
            memset(got, 0x5a, ob);
            mallocs = 0;
            counting = 1;
            st = run(ctxs[k], op, &in, got, ws + 1, need);
            counting = 0;
            CHECK(st == BN_OK && mallocs == 0 && memcmp(ref, got, ob) == 0,
                  "%s dt %d layout %d (%lld %lld %lld) ctx %d in %zu bytes of workspace: status %d, %ld mallocs, %s",
                  op_names[op], dt, layout, (long long)n, (long long)c, (long long)s, k, need, st, mallocs,
                  st == BN_OK && memcmp(ref, got, ob) ? "other bits" : "");
            memset(got, 0x5a, ob);
            mallocs = 0;
            counting = 1;
            st = run(ctxs[k], op, &in, got, ws + 1, need - 1);
            counting = 0;
            int untouched = 1;
            for (size_t i = 0; i < (size_t)E * esize(dt); i++) untouched &= got[i] == 0x5a;
            /* (group norm's OpenMP drivers run on fewer threads in a workspace sized for fewer: the same bits) */
            const int fewer = k == 0 && (op == OP_GN_F || op == OP_GN_B) && st == BN_OK && mallocs == 0 &&
                              memcmp(ref, got, ob) == 0;
            CHECK((st == BN_EWORKSPACE && untouched) || fewer, "%s with a workspace one byte short: status %d",
                  op_names[op], st);
            free(ws);
        }
#ifdef _OPENMP
        {   /* a workspace sized under one OpenMP thread, the call made under four: it runs (group norm on as many
             * threads as the workspace covers), no malloc, the same bits */
            const int before = omp_get_max_threads();
            size_t need1 = 0;
            omp_set_num_threads(1);
            st = bn_workspace_size(NULL, api_op[op], &in.d, G, &need1);
            omp_set_num_threads(4);
            char* ws = malloc(need1 ? need1 : 1);
            memset(got, 0x5a, ob);
            mallocs = 0;
            counting = 1;
            const int st2 = run(NULL, op, &in, got, ws, need1);
            counting = 0;
            omp_set_num_threads(before);
            CHECK(st == BN_OK && st2 == BN_OK && mallocs == 0 && memcmp(ref, got, ob) == 0,
                  "%s dt %d layout %d (%lld %lld %lld) in a workspace sized under 1 OpenMP thread, run under 4: "
                  "status %d, %ld mallocs, %s", op_names[op], dt, layout, (long long)n, (long long)c, (long long)s,
                  st2, mallocs, st2 == BN_OK && memcmp(ref, got, ob) ? "other bits" : "");
            free(ws);
        }
        /* from inside the caller's own parallel region: each of its threads runs the op (the library's region nested
         * in it, or none when the call takes one thread), the same bits on every thread */
        char* mine[2] = {malloc(ob), malloc(ob)};
        int sts[2] = {BN_OK, BN_OK}, team = 1;
        if (!mine[0] || !mine[1]) {
            printf("test_api: out of memory\n");
            exit(2);
        }
#pragma omp parallel num_threads(2)
        {
            const int t = omp_get_thread_num();
            if (t == 0) team = omp_get_num_threads();
            memset(mine[t], 0x5a, ob);
            sts[t] = run(NULL, op, &in, mine[t], NULL, 0);
        }
        for (int t = 0; t < team; t++)
            CHECK(sts[t] == BN_OK && memcmp(ref, mine[t], ob) == 0,
                  "%s dt %d layout %d (%lld %lld %lld) on thread %d of the caller's parallel region: status %d, %s",
                  op_names[op], dt, layout, (long long)n, (long long)c, (long long)s, t, sts[t],
                  sts[t] == BN_OK ? "other bits" : bn_strerror(sts[t]));
        free(mine[0]);
        free(mine[1]);
#endif
    }
    free(ref);
    free(got);
    free(in.x);
    free(in.dy);
    free(in.w);
    free(in.b);
    free(in.stat1);
    free(in.stat2);
}

/* The calling thread's floating-point modes, changed after the library's threads started (flush-to-zero and
 * denormals-are-zero, as torch.set_flush_denormal sets them; an upward rounding mode), hold for every share of a
 * call: on 1 and 2 OpenMP threads and on a pool whose threads keep the default modes, the same bits, and not the
 * default modes' (so that the check can fail). Inference of subnormal x times a large weight (flushed or not), and
 * the training forward (rounded up or to nearest). */
static void test_caller_fp_modes(void) {
    const int64_t n = 4, c = 2, s = 1 << 16, total = n * c * s;
    bn_desc d = {BN_F32, BN_F32, BN_LAYOUT_NCHW, n, c, s};
    float* x = malloc(sizeof(float) * (size_t)total);
    float* y[4];
    for (int k = 0; k < 4; k++) y[k] = malloc(sizeof(float) * (size_t)total);
    const float rm[2] = {0.0f, 0.0f}, rv[2] = {1.0f, 1.0f}, w[2] = {1e30f, 3.0f}, b[2] = {0.0f, 0.5f};
    bn_context* one = bn_context_create();
    bn_context* two = bn_context_create();
    bn_context* pool = bn_context_create();
    int threads = 3;
    bn_context_set_num_threads(one, 1);
    bn_context_set_num_threads(two, 2);
    bn_context_set_num_threads(pool, 3);
    bn_context_set_parallel_for(pool, pool_for_default_modes, &threads);
    for (int mode = 0; mode < 2; mode++) {
        for (int64_t i = 0; i < total; i++) x[i] = mode == 0 ? 1e-39f * (float)(1 + i % 7) : (float)rnd();
        int st[4];
        /* the default modes' result (the library's threads started by it), then the changed modes' on each context */
#define BN_RUN(k, ctx)                                                                                               \
    st[k] = mode == 0 ? bn_batch_norm_inference(ctx, &d, x, y[k], rm, rv, w, b, 1e-5, NULL, 0)                    \
                      : bn_batch_norm_training(ctx, &d, x, y[k], w, b, 1e-5, 0.1, NULL, NULL, NULL, NULL, NULL, 0)
        BN_RUN(0, two);
#if defined(__SSE__)
        const unsigned int csr = _mm_getcsr();
        if (mode == 0) _mm_setcsr(csr | 0x8040u); /* (FTZ, DAZ) */
#else
        if (mode == 0) continue;
#endif
        if (mode == 1) fesetround(FE_UPWARD);
        BN_RUN(1, one);
        BN_RUN(2, two);
        BN_RUN(3, pool);
#undef BN_RUN
#if defined(__SSE__)
        _mm_setcsr(csr);
#endif
        fesetround(FE_TONEAREST);
        const size_t bytes = sizeof(float) * (size_t)total;
        CHECK(st[0] == BN_OK && st[1] == BN_OK && st[2] == BN_OK && st[3] == BN_OK, "fp modes %d: status %d %d %d %d",
              mode, st[0], st[1], st[2], st[3]);
        CHECK(memcmp(y[0], y[1], bytes) != 0, "fp modes %d: the changed modes change no output", mode);
        CHECK(memcmp(y[1], y[2], bytes) == 0, "fp modes %d: 2 OpenMP threads differ from 1 under the caller's modes",
              mode);
        CHECK(memcmp(y[1], y[3], bytes) == 0, "fp modes %d: a pool's threads differ from 1 under the caller's modes",
              mode);
    }
    bn_context_destroy(one);
    bn_context_destroy(two);
    bn_context_destroy(pool);
    for (int k = 0; k < 4; k++) free(y[k]);
    free(x);
}

int main(void) {
    int threads = 4;
    char header_version[64];
    snprintf(header_version, sizeof header_version, "%d.%d.%d", BN_SIMD_VERSION_MAJOR, BN_SIMD_VERSION_MINOR,
             BN_SIMD_VERSION_PATCH);
    CHECK(strcmp(header_version, bn_version()) == 0 && BN_SIMD_VERSION_NUMBER >= 100,
          "the header's version %s (number %d), the library's %s", header_version, BN_SIMD_VERSION_NUMBER,
          bn_version());
    test_caller_fp_modes();
    bn_context* pool_ctx = bn_context_create();
    bn_context_set_num_threads(pool_ctx, 5); /* (5 tasks on 4 threads) */
    bn_context_set_parallel_for(pool_ctx, pool_for, &threads);
    /* small; one channel over several chunks; rows longer than a chunk; channels-last over several chunks; maps of
     * 4 x 4 over several chunks of rows; 16-bit types */
    test_shape(BN_F32, BN_LAYOUT_NCHW, 4, 6, 25, 3, pool_ctx);
    test_shape(BN_F64, BN_LAYOUT_NHWC, 4, 8, 9, 2, pool_ctx);
    test_shape(BN_F32, BN_LAYOUT_NCHW, 2, 1, 40000, 1, pool_ctx);
    test_shape(BN_F32, BN_LAYOUT_NCHW, 3, 2, 20000, 2, pool_ctx);
    test_shape(BN_F32, BN_LAYOUT_NHWC, 9000, 8, 1, 0, pool_ctx);
    test_shape(BN_F64, BN_LAYOUT_NCHW, 100, 4, 16, 2, pool_ctx);
    test_shape(BN_BF16, BN_LAYOUT_NHWC, 6, 16, 900, 4, pool_ctx);
    test_shape(BN_F16, BN_LAYOUT_NCHW, 5, 8, 300, 8, pool_ctx);
    /* group norm with one element per channel: runs of groups (1037 = 17 x 61), a group beyond a run (D = 1025) */
    test_shape(BN_F32, BN_LAYOUT_NCHW, 5, 1037, 1, 17, pool_ctx);
    test_shape(BN_F32, BN_LAYOUT_NCHW, 3, 2050, 1, 2, pool_ctx);
    test_shape(BN_F16, BN_LAYOUT_NHWC, 4, 1100, 1, 4, pool_ctx);
    extreme_sample = 1; /* (then samples at 1e35 beside ordinary ones) */
    test_shape(BN_F32, BN_LAYOUT_NCHW, 4, 6, 25, 3, pool_ctx);
    test_shape(BN_F32, BN_LAYOUT_NHWC, 6, 8, 30, 2, pool_ctx);
    test_shape(BN_BF16, BN_LAYOUT_NCHW, 5, 8, 300, 4, pool_ctx);
    test_shape(BN_F32, BN_LAYOUT_NCHW, 3, 2050, 1, 2, pool_ctx);
    extreme_sample = -1;
    poison = 1; /* (then NaN and Inf among x) */
    test_shape(BN_F32, BN_LAYOUT_NCHW, 3, 2, 20000, 2, pool_ctx);
    test_shape(BN_F32, BN_LAYOUT_NHWC, 9000, 8, 1, 0, pool_ctx);
    test_shape(BN_F32, BN_LAYOUT_NHWC, 6, 8, 30, 2, pool_ctx);
    test_shape(BN_F64, BN_LAYOUT_NCHW, 100, 4, 16, 2, pool_ctx);
    test_shape(BN_BF16, BN_LAYOUT_NHWC, 6, 16, 900, 4, pool_ctx);
    test_shape(BN_F16, BN_LAYOUT_NCHW, 5, 8, 300, 8, pool_ctx);
    poison = 0;
    bn_context_destroy(pool_ctx);
    {   /* group norm's workspace of 2^50 channels sized for 1024 OpenMP threads passes what a size_t holds: BN_ESIZE,
         * not a wrapped size (its data is within check_desc's bound; without OpenMP, sized for one thread, it fits) */
        bn_context* c = bn_context_create();
        bn_desc d = {BN_F64, BN_F64, BN_LAYOUT_NCHW, 1, (int64_t)1 << 50, 1};
        size_t b = 0;
        CHECK(c && bn_context_set_num_threads(c, 1024) == BN_OK, "context of 1024 threads");
        const int st = bn_workspace_size(c, BN_OP_GROUP_NORM_FORWARD, &d, 1, &b);
        CHECK(st == BN_ESIZE || (st == BN_OK && b > ((size_t)1 << 50)), "group norm workspace overflow");
        /* (and a size that fits is given, whatever memory it asks: 2^28 channels of one group, one thread) */
        bn_desc e = {BN_F16, BN_F32, BN_LAYOUT_NCHW, 1, (int64_t)1 << 28, 1};
        CHECK(bn_context_set_num_threads(c, 1) == BN_OK, "one thread");
        CHECK(bn_workspace_size(c, BN_OP_GROUP_NORM_FORWARD, &e, 1, &b) == BN_OK && b > ((size_t)1 << 32),
              "group norm workspace of 2^28 channels");
        bn_context_destroy(c);
    }
    printf("test_api: %ld checks, %ld failures\n", checks, failures);
    return failures != 0;
}
