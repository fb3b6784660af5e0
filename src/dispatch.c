/* Run-time ISA choice: CPUID once, a pointer per dtype to the chosen microkernel table. */
#define _GNU_SOURCE /* sysconf(_SC_LEVEL1_DCACHE_SIZE) under -std=c11 */
#include "dispatch.h"

#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static const bn_uk_f32* const tables_f32[BN_ISA_COUNT] = {&bn_uk_f32_scalar, &bn_uk_f32_avx2, &bn_uk_f32_avx512};
static const bn_uk_f64* const tables_f64[BN_ISA_COUNT] = {&bn_uk_f64_scalar, &bn_uk_f64_avx2, &bn_uk_f64_avx512};
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

const bn_uk_f32* bn_uk_active_f32(void) { return tables_f32[bn_get_isa()]; }
const bn_uk_f64* bn_uk_active_f64(void) { return tables_f64[bn_get_isa()]; }

/* Column strips for wide channels-last rows (docs/design.md, "Wide channels-last rows"). On AMD Zen 4 (32 KiB
 * L1d) a flat sweep reloads every row's coefficients from L2, and the strips measured 1.15-1.3x faster at
 * C = 1536-2048 (normalise and dx, 12.8 MB float32). On an Intel Xeon with AVX-512 (48 KiB L1d, 2 MiB L2) the
 * flat sweep measured 1.12-1.2x faster for the normalise at C = 2048-16384 and within 3 % for dx. So Intel
 * CPUs with an L1d of 48 KiB or more sweep flat; every other CPU (the rule is not measured beyond these two)
 * takes the Zen 4 setting. Decided once, when the library is loaded. */
#define BN_STRIP_BYTES_DEFAULT 24576
static int64_t cpu_strip_bytes = BN_STRIP_BYTES_DEFAULT;
/* set by bn_set_cl_strip_bytes (-1: the CPU's default); like the ISA choice, not to be changed while a call runs */
static int64_t strip_bytes = -1;

__attribute__((constructor)) static void choose_strip_bytes(void) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(_SC_LEVEL1_DCACHE_SIZE)
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel") && sysconf(_SC_LEVEL1_DCACHE_SIZE) >= 48 * 1024) cpu_strip_bytes = INT64_MAX;
#endif
}

int64_t bn_cl_strip_bytes(void) { return strip_bytes >= 0 ? strip_bytes : cpu_strip_bytes; }

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
