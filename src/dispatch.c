/* Run-time ISA choice: CPUID once, a pointer per dtype to the chosen microkernel table. */
#define _GNU_SOURCE /* sysconf(_SC_LEVEL1_DCACHE_SIZE) under -std=c11 */
#include "dispatch.h"

#include <stdlib.h>
#include <unistd.h>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

static const char* const names[BN_ISA_COUNT] = {"scalar", "avx2", "avx512"};

int bn_forked_child = 0;

#ifdef _OPENMP
#include <pthread.h>

static void mark_forked_child(void) { bn_forked_child = 1; }

/* Before a fork, the forking thread's OpenMP threads are released (omp_pause_resource_all: GNU OpenMP frees the
 * calling thread's pool, not inside a parallel region): the child of a process whose library threads ran can then
 * start threads of its own. Without it another library on the same runtime (PyTorch's wheel loads a libgomp.so.1,
 * the one runtime of the process) hung in the child on its first parallel region after a bn_simd call in the parent.
 * The parent's next region starts its threads again. */
static void pause_before_fork(void) {
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 9
    (void)omp_pause_resource_all(omp_pause_soft);
#endif
}

/* (registered when the library loads: a fork before the first call must be marked too) */
__attribute__((constructor)) static void register_fork_handler(void) {
    pthread_atfork(pause_before_fork, NULL, mark_forked_child);
}
#endif

/* Settings of a context; -1 (0 for nthreads): the default's, or the CPU's. */
struct bn_context {
    int isa;
    int nthreads;
    int64_t strip_bytes;
    int64_t slab_bytes;
    int64_t stream_bytes;
    bn_parallel_for_fn pfor; /* the caller's parallel loop (public API, api.c), NULL: OpenMP */
    void* pool;
};

/* The default context, which bn_set_isa, bn_set_cl_strip_bytes and bn_set_slab_bytes change: its ISA is -1 until
 * the first call picks the best one. */
static bn_context default_ctx = {-1, 0, -1, -1, -1};

/* The calling thread's context (NULL: the default); the drivers copy it into their OpenMP threads (BN_OMP_CTX).
 * Thread-local in every build: OpenMP's threadprivate (dispatch.h) alone would leave one variable shared by all the
 * caller's threads in a build without OpenMP. */
_Thread_local const bn_context* bn_tls_ctx = NULL;

/* Set once some thread has used a context of its own: until then every call reads the default context without the
 * thread-local lookup (a call into the TLS resolver from a shared library, several per call). */
static int contexts_used = 0;

static const bn_context* ctx(void) {
    if (!__atomic_load_n(&contexts_used, __ATOMIC_RELAXED)) return &default_ctx;
    return bn_tls_ctx ? bn_tls_ctx : &default_ctx;
}

int bn_isa_supported(int isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    /* libgcc's checks include the OS's XSAVE state (XCR0), not only the CPUID bits. */
    switch (isa) {
        case BN_ISA_SCALAR: return 1;
        case BN_ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        case BN_ISA_AVX512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
                   __builtin_cpu_supports("fma");
        default: return 0;
    }
#else
    return isa == BN_ISA_SCALAR;
#endif
}

int bn_best_isa(void) {
    /* AVX-512 where the CPU has it: on the benchmarks it is as fast as AVX2 or faster (channels-last
     * statistics walk twice as many channels per strip); see docs/tuning.md, "AVX-512 by default". */
    if (bn_isa_supported(BN_ISA_AVX512)) return BN_ISA_AVX512;
    if (bn_isa_supported(BN_ISA_AVX2)) return BN_ISA_AVX2;
    return BN_ISA_SCALAR;
}

int bn_set_isa(int isa) {
    if (isa < 0 || isa >= BN_ISA_COUNT || !bn_isa_supported(isa)) return BN_EISA;
    __atomic_store_n(&default_ctx.isa, isa, __ATOMIC_RELAXED);
    return BN_OK;
}

/* The default context's ISA is chosen at its first use, by whichever threads get there first: each stores the same
 * value, so its reads and writes are atomic (relaxed: no other memory hangs on it), not a data race. */
int bn_get_isa(void) {
    const bn_context* c = ctx();
    const int own = c != &default_ctx ? __atomic_load_n(&c->isa, __ATOMIC_RELAXED) : -1;
    if (own >= 0) return own;
    int isa = __atomic_load_n(&default_ctx.isa, __ATOMIC_RELAXED);
    if (isa < 0) {
        isa = bn_best_isa();
        __atomic_store_n(&default_ctx.isa, isa, __ATOMIC_RELAXED);
    }
    return isa;
}

const char* bn_isa_name(int isa) { return (isa >= 0 && isa < BN_ISA_COUNT) ? names[isa] : "unknown"; }

const bn_uk_f32* bn_uk_active_f32(void) { return &bn_uk_f32_tables[bn_get_isa()]; }
const bn_uk_f64* bn_uk_active_f64(void) { return &bn_uk_f64_tables[bn_get_isa()]; }

/* F16C (vcvtph2ps / vcvtps2ph) has a CPUID flag of its own: the vector float16 kernels, which convert with it, run only
 * where the CPU has it, and the scalar ones (the same bits: half.h) elsewhere. Every AVX2 and AVX-512 CPU made has
 * it, but nothing guarantees that. bfloat16 needs no extension (integer arithmetic). */
int bn_have_f16c(void) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    /* (CPUID leaf 1, ECX bit 29, read directly: clang's __builtin_cpu_supports has no "f16c"; read once, as CPUID
     * traps to the hypervisor in a virtual machine: microseconds, and every float16 call asks) */
    static int known = -1;
    int v = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (v < 0) {
        unsigned int a, b, c, d;
        v = __get_cpuid(1, &a, &b, &c, &d) ? (int)((c >> 29) & 1u) : 0;
        __atomic_store_n(&known, v, __ATOMIC_RELAXED);
    }
    return v;
#else
    return 0;
#endif
}
const bn_uk_f16* bn_uk_active_f16(void) {
    const int isa = bn_get_isa();
    return &bn_uk_f16_tables[isa != BN_ISA_SCALAR && !bn_have_f16c() ? BN_ISA_SCALAR : isa];
}
const bn_uk_bf16* bn_uk_active_bf16(void) { return &bn_uk_bf16_tables[bn_get_isa()]; }

/* Column strips for wide channels-last rows. Once a row of every array a sweep touches no longer fits in L1 beside the
 * data, a flat sweep reloads every row's coefficients from L2, and the strips, which keep them in registers, measured
 * faster on AMD Zen 4 (32 KiB L1d) from rows of 24 KiB; with a 48 KiB L1d the flat sweep stayed faster up to rows of
 * about the L1d's size on AMD Zen 5, and at every row size measured within the caches on an Intel Xeon. So Intel CPUs
 * with an L1d of 48 KiB or more sweep flat, AMD ones take strips from rows of their L1d's size, and every other CPU
 * (not measured) takes the Zen 4 setting (docs/tuning.md, "Column strips for wide rows", "Strip threshold per CPU").
 * Decided once, when the library is loaded.
 * A call whose output streams (beyond the last-level cache) takes the strips from bn_cl_stream_strip_bytes: the same
 * size, except on AMD CPUs with an L2 of 512 KiB or less (Zen 3 measured), where streaming stores into the 4 rows of a
 * strip at once measured several times slower than flat runs, so streamed runs are flat there (docs/tuning.md,
 * "Streamed strips on the Zen 3"). */
#define BN_STRIP_BYTES_DEFAULT 24576
static int64_t cpu_strip_bytes = BN_STRIP_BYTES_DEFAULT, cpu_stream_strip_bytes = BN_STRIP_BYTES_DEFAULT;

/* The L2 size (as the OS reports it) of an AMD CPU whose L2 is at most max bytes, else 0. */
static long amd_l2_upto(long max) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(_SC_LEVEL2_CACHE_SIZE)
    __builtin_cpu_init();
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return __builtin_cpu_is("amd") && l2 >= (64L << 10) && l2 <= max ? l2 : 0;
#else
    (void)max;
    return 0;
#endif
}

/* The L2 size of an AMD CPU whose L2 is 512 KiB or less (Zen 3 and before), else 0. */
static long amd_small_l2(void) { return amd_l2_upto(512L << 10); }

__attribute__((constructor)) static void choose_strip_bytes(void) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(_SC_LEVEL1_DCACHE_SIZE)
    __builtin_cpu_init();
    const long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);
    if (l1 >= 48 * 1024 && l1 <= (1L << 20)) {
        if (__builtin_cpu_is("intel")) cpu_strip_bytes = INT64_MAX;
        else if (__builtin_cpu_is("amd")) cpu_strip_bytes = l1;
    }
#endif
    cpu_stream_strip_bytes = amd_small_l2() ? INT64_MAX : cpu_strip_bytes;
}

/* A context's strip setting: its own, else the default context's (-1: the CPU's). */
static int64_t strip_setting(void) {
    const int64_t own = ctx()->strip_bytes;
    return own >= 0 ? own : default_ctx.strip_bytes;
}

int64_t bn_cl_strip_bytes(void) {
    const int64_t v = strip_setting();
    return v >= 0 ? v : cpu_strip_bytes;
}

int64_t bn_cl_stream_strip_bytes(void) {
    const int64_t v = strip_setting();
    return v >= 0 ? v : cpu_stream_strip_bytes;
}

int bn_cl_takes_strips(int64_t row_bytes, int arrays, int stream, int streamed_only) {
    return arrays * row_bytes >= (stream ? bn_cl_stream_strip_bytes() : bn_cl_strip_bytes()) &&
           (stream ? row_bytes % 64 == 0 : !streamed_only);
}

/* The channels-first slab path (batchnorm.c, cf_slab_blocks) keeps a group of channels in a core's caches between its
 * reduction and its sweep, which saves a second read of the group from the shared cache or memory but reads the
 * group's rows as short runs far apart. Groups of half the L2 (the other half holding what the kernels touch besides)
 * measured as fast as the two sweeps or faster on an Intel Xeon, in the cache and beyond it. On AMD CPUs, whose victim
 * L3 gives a tensor it holds back fast, the two sweeps measured faster for such tensors; beyond the L3, groups of
 * 2 MiB, which live in the L3 between the two passes, measured faster on Zen 3 and Zen 4, and groups were mixed on
 * Zen 5. So AMD CPUs with an L2 of 512 KiB or less group 4 times their L2, and those of family 19h (Zen 3 and Zen 4)
 * with a larger L2 of up to 1 MiB group 2 MiB, for calls whose inputs exceed BN_STREAM_BYTES (the size at which the
 * element-wise sweeps stream, dispatch.h); other AMD CPUs (Zen 5) take the two sweeps, and every other CPU groups up
 * to half of the L2 that the OS reports (512 KiB when it reports none) in every call (docs/tuning.md, "Slab budget per
 * CPU", "Slab groups in the L2 (Intel Xeon)", "Slab groups within the L3 (Zen 4)", "Slab groups beyond the L3", "Slab
 * groups on the Zen 5"). Decided once, when the library is loaded. */
#define BN_SLAB_BYTES_AMD_L3 ((int64_t)2 << 20)
#define BN_SLAB_BYTES_DEFAULT ((int64_t)512 << 10)
static int64_t cpu_slab_bytes = BN_SLAB_BYTES_DEFAULT;
static int64_t cpu_slab_min_input = 0; /* calls that read at most this many bytes take the sweeps */

__attribute__((constructor)) static void choose_slab_bytes(void) {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l2 >= (64L << 10) && l2 <= (1L << 30)) cpu_slab_bytes = (int64_t)l2 / 2;
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (__builtin_cpu_is("amd")) {
        const long small = amd_small_l2();
        cpu_slab_bytes = 4 * (int64_t)small; /* (0: the two sweeps) */
        if (!small && __builtin_cpu_is("amdfam19h") && amd_l2_upto(1L << 20)) cpu_slab_bytes = BN_SLAB_BYTES_AMD_L3;
        cpu_slab_min_input = cpu_slab_bytes ? BN_STREAM_BYTES : 0;
    }
#endif
}

/* The rows forward of layer and RMS norm (rownorm.inc) normalises each block beside the next block's statistics. When
 * it streams its output (beyond BN_STREAM_BYTES) that measured faster on a Zen 3 and 1.1-1.9x slower on a Zen 5 than
 * the two loops (the same bits either way), so streamed rows are paired on AMD family 19h (Zen 3 and Zen 4) only; Intel
 * CPUs are not measured (docs/tuning.md, "Layer-norm forward: streamed rows in two loops on the Zen 5"). */
static int cpu_rn_pair_streamed = 0;

__attribute__((constructor)) static void choose_rn_pairing(void) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    cpu_rn_pair_streamed = __builtin_cpu_is("amdfam19h");
#endif
}

int bn_rn_pair_streamed(void) { return cpu_rn_pair_streamed; }

/* A context's slab setting: its own, else the default context's (-1: the CPU's). */
static int64_t slab_setting(void) {
    const int64_t own = ctx()->slab_bytes;
    return own >= 0 ? own : default_ctx.slab_bytes;
}

int64_t bn_slab_bytes(void) {
    const int64_t v = slab_setting();
    return v >= 0 ? v : cpu_slab_bytes;
}

int64_t bn_slab_min_input(void) { return slab_setting() >= 0 ? 0 : cpu_slab_min_input; }

int bn_set_slab_bytes(int64_t bytes) { return bn_context_set_slab_bytes(&default_ctx, bytes); }

/* The size beyond which element-wise sweeps stream their output: the context's, else the default context's, else
 * BN_STREAM_BYTES. Lowered only to run the streamed paths on small arrays (the valgrind step's cases). */
int64_t bn_stream_bytes(void) {
    const int64_t own = ctx()->stream_bytes, v = own >= 0 ? own : default_ctx.stream_bytes;
    return v >= 0 ? v : BN_STREAM_BYTES;
}

int bn_set_stream_bytes(int64_t bytes) { return bn_context_set_stream_bytes(&default_ctx, bytes); }

int bn_set_cl_strip_bytes(int64_t bytes) { return bn_context_set_cl_strip_bytes(&default_ctx, bytes); }

/* ---- contexts ---- */

bn_context* bn_default_context(void) { return &default_ctx; }

bn_context* bn_context_create(void) {
    bn_context* c = (bn_context*)malloc(sizeof(bn_context));
    if (c) *c = (bn_context){-1, 0, -1, -1, -1};
    return c;
}

void bn_context_destroy(bn_context* c) {
    if (c && c != &default_ctx) free(c);
}

int bn_context_set_isa(bn_context* c, int isa) {
    if (!c) return BN_EINVAL;
    if (isa == -1) isa = c == &default_ctx ? bn_best_isa() : -1;
    else if (isa < 0 || isa >= BN_ISA_COUNT || !bn_isa_supported(isa)) return BN_EISA;
    __atomic_store_n(&c->isa, isa, __ATOMIC_RELAXED);
    return BN_OK;
}

int bn_context_get_isa(const bn_context* c) {
    if (!c) return -1;
    const int own = c != &default_ctx ? __atomic_load_n(&c->isa, __ATOMIC_RELAXED) : -1;
    if (own >= 0) return own;
    const bn_context* saved = bn_tls_ctx;
    bn_tls_ctx = NULL; /* (the default's) */
    const int isa = bn_get_isa();
    bn_tls_ctx = saved;
    return isa;
}

int bn_context_set_num_threads(bn_context* c, int n) {
    if (!c || n < 0) return BN_EINVAL;
    c->nthreads = n;
    return BN_OK;
}

int bn_context_get_num_threads(const bn_context* c) { return c ? c->nthreads : 0; }

int bn_context_set_parallel_for(bn_context* c, bn_parallel_for_fn fn, void* pool) {
    if (!c) return BN_ENULL;
    c->pfor = fn;
    c->pool = fn ? pool : NULL;
    return BN_OK;
}

bn_parallel_for_fn bn_context_parallel_for(const bn_context* c, void** pool) {
    *pool = c ? c->pool : NULL;
    return c ? c->pfor : NULL;
}

int bn_context_set_cl_strip_bytes(bn_context* c, int64_t bytes) {
    if (!c || (bytes >= 0 && bytes < BN_CL_STRIP_MIN_BYTES)) return BN_EINVAL;
    c->strip_bytes = bytes < 0 ? -1 : bytes;
    return BN_OK;
}

int bn_context_set_slab_bytes(bn_context* c, int64_t bytes) {
    if (!c) return BN_EINVAL;
    c->slab_bytes = bytes < 0 ? -1 : bytes;
    return BN_OK;
}

int bn_context_set_stream_bytes(bn_context* c, int64_t bytes) {
    if (!c) return BN_EINVAL;
    c->stream_bytes = bytes < 0 ? -1 : bytes;
    return BN_OK;
}

const bn_context* bn_context_use(const bn_context* c) {
    const bn_context* previous = bn_tls_ctx;
    bn_tls_ctx = c == &default_ctx ? NULL : c;
    if (bn_tls_ctx) __atomic_store_n(&contexts_used, 1, __ATOMIC_RELAXED);
    return previous;
}

int bn_have_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int bn_omp_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int bn_thread_cap(void) {
#ifdef _OPENMP
    const int lim = omp_get_thread_limit();
    return lim < BN_MAX_THREADS ? lim : BN_MAX_THREADS; /* (pick_threads' caps, batchnorm.c) */
#else
    return 1;
#endif
}
