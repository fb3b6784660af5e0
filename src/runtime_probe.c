/*
 * Probes run before the OpenMP runtime is loaded (bn_simd/_openmp.py). This file is compiled without OpenMP, into
 * an extension of its own, so that importing it does not load the runtime whose settings it helps to choose.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <time.h>

#include "runtime_probe.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BN_CPU_RELAX() _mm_pause()
#else
#define BN_CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

/* The spin loop of an idle OpenMP thread, as libgomp writes it: a relaxed load of the flag it waits on and a
 * pause, `count` times (the flag never changes here). */
static void spin(volatile int* flag, int64_t count) {
    for (int64_t i = 0; i < count; i++) {
        if (__atomic_load_n(flag, __ATOMIC_RELAXED) != 0) return;
        BN_CPU_RELAX();
    }
}

double bn_probe_spin_ns(void) {
    static volatile int flag = 0;
    const int64_t count = 2000;
    double best = 0.0;
    spin(&flag, 200); /* (warm) */
    for (int r = 0; r < 5; r++) {
        const double t0 = now_ns();
        spin(&flag, count);
        const double t = (now_ns() - t0) / (double)count;
        if (r == 0 || t < best) best = t;
    }
    return best;
}

int bn_probe_libgomp_loaded(void) {
    void* h = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_NOLOAD);
    if (!h) return 0;
    dlclose(h);
    return 1;
}

int bn_probe_compiler_is_gcc(void) {
#if defined(__GNUC__) && !defined(__clang__) && !defined(__INTEL_COMPILER) && !defined(__INTEL_LLVM_COMPILER)
    return 1;
#else
    return 0;
#endif
}
