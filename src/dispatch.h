/* Internal: the active microkernel tables. */
#ifndef BN_DISPATCH_H
#define BN_DISPATCH_H

#include "bn_simd.h"
#include "ukernels.h"

/* Element-wise sweeps write their output with streaming stores when the op touches more bytes than this
 * (inputs and output together): beyond the last-level cache a regular store first reads the line it
 * writes, a streaming store does not, and it leaves the cache to the input. Below it, the output stays
 * cached for whatever reads it next. The values written are the same either way. dispatch.c takes the
 * same size for bn_slab_min_input on AMD Zen 3 and Zen 4: inputs beyond the last-level cache (docs/tuning.md,
 * "Streaming stores beyond 32 MiB"). */
#define BN_STREAM_BYTES ((int64_t)32 << 20)

/* More threads than this are never started, whatever set_num_threads asked for (pick_threads, batchnorm.c; the C
 * API's workspace bound and bn_thread_cap count by it too). */
#define BN_MAX_THREADS 1024

/* Group norm's runs of small groups (groupnorm.inc): at most this many channels (at least one group) have their
 * coefficients computed in one call and are swept in one call; the C API's workspace bound (api.c) counts them */
#define BN_GN_COEF_RUN 1024

/* The calling thread's context (bn_context_use; NULL: the default). A driver's parallel regions copy it into their
 * threads (copyin, BN_OMP_CTX), so that the kernels there read the caller's settings. */
extern _Thread_local const bn_context* bn_tls_ctx;
#ifdef _OPENMP
#pragma omp threadprivate(bn_tls_ctx)
#define BN_OMP_CTX copyin(bn_tls_ctx)
#else
#define BN_OMP_CTX
#endif

/* The calling thread's floating-point modes, which the threads that run a share of its call take for that share (a
 * driver's OpenMP threads, BN_PAR; the tasks on a caller's pool, api.c): the rounding mode, and SSE's flush-to-zero
 * and denormals-are-zero (torch.set_flush_denormal sets them on the calling thread). A thread started earlier keeps
 * the modes it started with, so without this only the caller's share of a call followed them, and the bits depended
 * on the thread count. bn_fpmode_get reads the caller's; bn_fpmode_enter sets them on a thread and returns its own,
 * which bn_fpmode_leave puts back. On x86, MXCSR's control bits (its exception flags, sticky, are left to each
 * thread); elsewhere, the rounding mode. */
#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
typedef unsigned int bn_fpmode;
#define BN_MXCSR_FLAGS 0x3Fu /* (the exception flags: bits 0-5) */
static inline bn_fpmode bn_fpmode_get(void) { return _mm_getcsr() & ~BN_MXCSR_FLAGS; }
static inline bn_fpmode bn_fpmode_enter(bn_fpmode m) {
    const unsigned int own = _mm_getcsr();
    if ((own & ~BN_MXCSR_FLAGS) != m) _mm_setcsr((own & BN_MXCSR_FLAGS) | m);
    return own & ~BN_MXCSR_FLAGS;
}
static inline void bn_fpmode_leave(bn_fpmode own) {
    const unsigned int now = _mm_getcsr();
    if ((now & ~BN_MXCSR_FLAGS) != own) _mm_setcsr((now & BN_MXCSR_FLAGS) | own);
}
#else
#include <fenv.h>
typedef int bn_fpmode;
static inline bn_fpmode bn_fpmode_get(void) { return fegetround(); }
static inline bn_fpmode bn_fpmode_enter(bn_fpmode m) {
    const int own = fegetround();
    if (own != m) fesetround(m);
    return own;
}
static inline void bn_fpmode_leave(bn_fpmode own) {
    if (fegetround() != own) fesetround(own);
}
#endif

/* 1 in the child of a fork() (pthread_atfork, dispatch.c): GNU OpenMP's threads do not survive a fork, and the
 * child's first parallel region would wait for them forever, so the drivers run every call on the calling thread
 * there (BN_PAR), whatever the parent ran (another library may have started OpenMP's threads). */
extern int bn_forked_child;

/* A context's parallel_for (NULL: none) and its pool (bn_context_set_parallel_for). */
bn_parallel_for_fn bn_context_parallel_for(const bn_context* ctx, void** pool);

const bn_uk_f32* bn_uk_active_f32(void);
const bn_uk_f64* bn_uk_active_f64(void);
const bn_uk_f16* bn_uk_active_f16(void); /* (the scalar table on a CPU without F16C) */
const bn_uk_bf16* bn_uk_active_bf16(void);

#endif /* BN_DISPATCH_H */
