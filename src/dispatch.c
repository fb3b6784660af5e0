/* Run-time ISA choice: CPUID once, a pointer per dtype to the chosen microkernel table. */
#define _GNU_SOURCE /* sysconf(_SC_LEVEL1_DCACHE_SIZE) under -std=c11 */
#include "dispatch.h"

#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static const char* const names[BN_ISA_COUNT] = {"scalar", "avx2", "avx512"};

/* -1 until the first call picks the best ISA. */
static int active = -1;

int bn_isa_supported(int isa) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    /* libgcc's checks include the OS's XSAVE state (XCR0), not only the CPUID bits. */
    switch (isa) {
        case BN_ISA_SCALAR: return 1;
        case BN_ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        case BN_ISA_AVX512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                   __builtin_cpu_supports("fma");
        default: return 0;
    }
#else
    return isa == BN_ISA_SCALAR;
#endif
}

int bn_best_isa(void) {
    /* AVX-512 where the CPU has it: on the benchmarks it is as fast as AVX2 or faster (channels-last
     * statistics walk twice as many channels per strip); see docs/design.md, "AVX2 or AVX-512". */
    if (bn_isa_supported(BN_ISA_AVX512)) return BN_ISA_AVX512;
    if (bn_isa_supported(BN_ISA_AVX2)) return BN_ISA_AVX2;
    return BN_ISA_SCALAR;
}

int bn_set_isa(int isa) {
    if (isa < 0 || isa >= BN_ISA_COUNT || !bn_isa_supported(isa)) return BN_EISA;
    active = isa;
    return BN_OK;
}

int bn_get_isa(void) {
    if (active < 0) active = bn_best_isa();
    return active;
}

const char* bn_isa_name(int isa) { return (isa >= 0 && isa < BN_ISA_COUNT) ? names[isa] : "unknown"; }

const bn_uk_f32* bn_uk_active_f32(void) { return &bn_uk_f32_tables[bn_get_isa()]; }
const bn_uk_f64* bn_uk_active_f64(void) { return &bn_uk_f64_tables[bn_get_isa()]; }

/* Column strips for wide channels-last rows (docs/design.md, "Wide channels-last rows"). On AMD Zen 4 (32 KiB
 * L1d) a flat sweep reloads every row's coefficients from L2, and the strips measured 1.15-1.3x faster at
 * C = 1536-2048 (normalise and dx, 12.8 MB float32). On an Intel Xeon with AVX-512 (48 KiB L1d, 2 MiB L2) the
 * flat sweep measured 1.12-1.2x faster for the normalise at C = 2048-16384 and within 3 % for dx. So Intel
 * CPUs with an L1d of 48 KiB or more sweep flat; every other CPU (the rule is not measured beyond these two)
 * takes the Zen 4 setting. On AMD Zen 5 (48 KiB L1d, 1 MiB L2, AVX-512) the flat sweep was faster up to rows of
 * about the L1d and the strips beyond it: 2 threads, float32, 12.8 MB, 24 KiB against 48 KiB timed alternately in one
 * process (time at 24 KiB / time at 48 KiB): eval 1.11-1.18 and training forward 1.06-1.13 at C = 1280-2048,
 * (3136, 1024) backward 1.23, (25088, 1024) backward 1.13; the strips at C = 4096 1.14-1.6x faster than flat.
 * So AMD CPUs with an L1d of 48 KiB or more take strips from rows of their L1d's size.
 * Decided once, when the library is loaded.
 * A call whose output streams (beyond the last-level cache) takes the strips from bn_cl_stream_strip_bytes: the same
 * size, except on AMD CPUs with an L2 of 512 KiB or less (Zen 3 measured): there streaming stores into the 4 rows of
 * a strip at once measured 1.8-3.6x slower than flat runs with the line-aligned starts of UK_CL_WIDE and 1.7-6.1x
 * before them ((3136, 2048), (1568, 4096), (3136, 1024), (6272, 1024) float32; eval, forward and dx; 2 threads; 2
 * rows a strip were even with flat at C = 2048 and still 1.4-3.5x slower at C = 4096), so streamed runs are flat
 * there. */
#define BN_STRIP_BYTES_DEFAULT 24576
static int64_t cpu_strip_bytes = BN_STRIP_BYTES_DEFAULT, cpu_stream_strip_bytes = BN_STRIP_BYTES_DEFAULT;
/* set by bn_set_cl_strip_bytes (-1: the CPU's default); like the ISA choice, not to be changed while a call runs */
static int64_t strip_bytes = -1;

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

int64_t bn_cl_strip_bytes(void) { return strip_bytes >= 0 ? strip_bytes : cpu_strip_bytes; }

int64_t bn_cl_stream_strip_bytes(void) { return strip_bytes >= 0 ? strip_bytes : cpu_stream_strip_bytes; }

int bn_cl_takes_strips(int64_t row_bytes, int arrays, int stream, int streamed_only) {
    return arrays * row_bytes >= (stream ? bn_cl_stream_strip_bytes() : bn_cl_strip_bytes()) &&
           (stream ? row_bytes % 64 == 0 : !streamed_only);
}

/* The channels-first slab path (batchnorm.c, cf_slab_blocks) keeps a group of channels in a core's caches between its
 * reduction and its sweep, which saves a second read of the group from the shared cache or memory but reads the
 * group's rows as short runs far apart. On an Intel Xeon (2 MiB L2, a shared cache of about 29 GB/s per core) that
 * measured 1.0-1.45x faster than the two sweeps, in the cache and beyond it, with 1 MiB groups: half the L2, the
 * other half holding what the kernels touch besides. On AMD Zen 4 (1 MiB L2, a fast victim L3 beside each core
 * complex) the two sweeps measured faster: 1.15-1.35x for tensors the L3 holds, and beyond it 0.9-1.4x with a
 * spread from one process to the next that favoured the sweeps. On AMD Zen 3 (512 KiB L2, 32 MiB victim L3) groups
 * of 2 MiB (they live in the L3 between the two passes) measured 1.05-1.38x faster than the sweeps once the arrays
 * the call reads exceed 32 MiB, whether they start in memory or in the cache (the backward of 25.7 MB tensors
 * 0.98-1.06x from the cache), and 0.90-0.95x for forwards of 25.7 MB tensors in the cache (docs/design.md, "Speed
 * model"). Groups of 2 MiB measured faster on the Zen 4 too, beyond the L3 (2 threads, float32, 13 cases of inputs
 * over 32 MiB, alternately in one process: backward 1.05-1.43x, forward 0.96-1.35x; float64 1.05-1.35x; one thread
 * 0.89-1.44x), where an earlier run with 1 MiB groups had been within its spread. So AMD CPUs with an L2 of 512 KiB
 * or less group 4 times their L2, and those of family 19h (Zen 3 and Zen 4) with a larger L2 of up to 1 MiB group
 * 2 MiB, for calls whose inputs exceed BN_STREAM_BYTES (the size at which the element-wise sweeps stream,
 * dispatch.h); other AMD CPUs (Zen 5, where groups measured mixed and calls beyond the L3 were not measured apart)
 * take the two sweeps, and every other CPU groups up to half of the L2 that the OS reports (512 KiB when it reports
 * none) in every call. Decided once, when the library is loaded. */
#define BN_SLAB_BYTES_AMD_L3 ((int64_t)2 << 20)
#define BN_SLAB_BYTES_DEFAULT ((int64_t)512 << 10)
static int64_t cpu_slab_bytes = BN_SLAB_BYTES_DEFAULT;
static int64_t cpu_slab_min_input = 0; /* calls that read at most this many bytes take the sweeps */
static int64_t slab_bytes = -1;        /* set by bn_set_slab_bytes (-1: the CPU's default) */

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

int64_t bn_slab_bytes(void) { return slab_bytes >= 0 ? slab_bytes : cpu_slab_bytes; }

int64_t bn_slab_min_input(void) { return slab_bytes >= 0 ? 0 : cpu_slab_min_input; }

int bn_set_slab_bytes(int64_t bytes) {
    slab_bytes = bytes < 0 ? -1 : bytes;
    return BN_OK;
}

int bn_set_cl_strip_bytes(int64_t bytes) {
    if (bytes >= 0 && bytes < BN_CL_STRIP_MIN_BYTES) return BN_EINVAL;
    strip_bytes = bytes < 0 ? -1 : bytes;
    return BN_OK;
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
