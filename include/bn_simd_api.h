/*
 * bn_simd — the public C API of the library (libbn_simd.so / libbn_simd.a).
 *
 * Every function of this header is exported (BN_API); nothing else of the library is. Every entry point validates
 * every argument before it reads or writes anything: on a status other than BN_OK nothing has been written (the
 * running statistics included), except BN_ENOMEM from a call that ran out of memory part way, which may have written
 * some of its outputs (y, or dx; x itself when y is x; bn_batch_norm_moments on a caller's pool: the chunks its
 * finished tasks computed), never the running statistics.
 *
 * Tensors. A tensor of N samples, C channels and S = prod(spatial) positions per channel (S = 1 for (N, C)) is
 * C-contiguous, channels-first (BN_LAYOUT_NCHW: (N, C, *spatial)) or channels-last (BN_LAYOUT_NHWC:
 * (N, *spatial, C)); its elements are of one of the storage types of bn_dtype (float16 and bfloat16 as their 16-bit
 * patterns, uint16_t, computed in float). A bn_desc describes it, with the type of the per-channel (per-group,
 * per-position) arrays: float (BN_F32) or double (BN_F64) whatever the data's type. y may be x (in place); any other
 * overlap of an output with an input is BN_EOVERLAP. Each array is aligned to its element type (2, 4 or 8 bytes, as C
 * requires of a float* or double*; the workspace only may have any alignment): data read at an arbitrary byte offset
 * of a file goes through a copy first.
 *
 * Numerics: statistics are shifted sums in double in chunks fixed by the shape, combined in a fixed order, so the
 * results are bitwise the same for any thread count, with OpenMP or with a caller's parallel_for (docs/design.md,
 * "The C library"). Every thread runs its share of a call in the calling thread's floating-point modes as they are
 * when the call starts (on x86 the rounding mode, flush-to-zero and denormals-are-zero, MXCSR's; elsewhere the
 * rounding mode). The exception flags that other threads' shares raise stay in those threads: fetestexcept after a
 * call sees the calling thread's share only, so which flags it sees depends on the thread count.
 *
 * Context: every op takes a context (NULL: the default one) holding the ISA, the thread count and the tuning, and
 * optionally a parallel_for through which the op runs its tasks on the caller's thread pool instead of OpenMP.
 * Workspace: every op takes a scratch buffer (NULL and 0: the library allocates what it needs); bn_workspace_size
 * gives the bytes an op needs, and with a buffer that large bn_simd allocates nothing in the call (BN_EWORKSPACE if
 * smaller; BN_EOVERLAP if it shares a byte with the call's arrays). In a build with OpenMP the OpenMP runtime may still
 * allocate its own per-thread data the first time a thread enters a parallel region (with a caller's parallel_for
 * too: the drivers' regions run on one thread there); later calls from that thread allocate nothing.
 */
#ifndef BN_SIMD_API_H
#define BN_SIMD_API_H

#include <stddef.h>
#include <stdint.h>

/* The export macro: default visibility for this header's functions; the library is built with -fvisibility=hidden,
 * so nothing else leaves it. BN_SIMD_STATIC (Windows only): linking the static library. */
#if defined(_WIN32) && !defined(BN_SIMD_STATIC)
#ifdef BN_SIMD_BUILDING
#define BN_API __declspec(dllexport)
#else
#define BN_API __declspec(dllimport)
#endif
#elif defined(__GNUC__) || defined(__clang__)
#define BN_API __attribute__((visibility("default")))
#else
#define BN_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes: BN_OK or negative. */
enum bn_status {
    BN_OK = 0,
    BN_ENOMEM = -1,      /* out of memory */
    BN_EINVAL = -2,      /* an invalid argument (the others below say which kind) */
    BN_EISA = -3,        /* the CPU cannot run the ISA asked for */
    BN_ENULL = -4,       /* a required pointer is NULL */
    BN_ESIZE = -5,       /* a size <= 0, or a tensor whose bytes overflow */
    BN_EEPS = -6,        /* eps <= 0, or not finite */
    BN_EMOMENTUM = -7,   /* momentum outside [0, 1], or not finite */
    BN_ELAYOUT = -8,     /* an unknown layout code */
    BN_EDTYPE = -9,      /* an unknown dtype code, or a per-channel type other than BN_F32 / BN_F64 */
    BN_EGROUPS = -10,    /* groups <= 0, or not dividing the channels */
    BN_EWORKSPACE = -11, /* a workspace smaller than bn_workspace_size, or bytes given with no buffer */
    BN_EOVERLAP = -12,   /* an output overlaps an input (other than y == x) or another output */
    BN_EOP = -13         /* an unknown op code */
};

enum bn_isa { BN_ISA_SCALAR = 0, BN_ISA_AVX2 = 1, BN_ISA_AVX512 = 2, BN_ISA_COUNT = 3 };

/* Storage types. */
typedef enum bn_dtype { BN_F32 = 0, BN_F64 = 1, BN_F16 = 2, BN_BF16 = 3 } bn_dtype;

/* Layouts. */
typedef enum bn_layout { BN_LAYOUT_NCHW = 0, BN_LAYOUT_NHWC = 1 } bn_layout;

/* A tensor: N samples, C channels, S positions per channel (all >= 1), its storage type and layout, and the type
 * of the per-channel arrays the op reads and writes (BN_F32: float, BN_F64: double). */
typedef struct bn_desc {
    int dtype;       /* bn_dtype of x, y, dy, dx */
    int param_dtype; /* BN_F32 or BN_F64: the type of every per-channel / per-group / per-position array */
    int layout;      /* bn_layout */
    int64_t n, c, s;
} bn_desc;

/* ---- library ---- */
/* The version of this header, for #if tests at compile time; the build refuses a header whose numbers differ from
 * the library's version (bn_simd/_version.py). bn_version() gives the linked library's at run time: a program can
 * compare the two to catch a header and a library of different releases. */
#define BN_SIMD_VERSION_MAJOR 0
#define BN_SIMD_VERSION_MINOR 1
#define BN_SIMD_VERSION_PATCH 0
#define BN_SIMD_VERSION_NUMBER (BN_SIMD_VERSION_MAJOR * 10000 + BN_SIMD_VERSION_MINOR * 100 + BN_SIMD_VERSION_PATCH)

/* The version, "MAJOR.MINOR.PATCH": the Python package's (bn_simd.__version__). */
BN_API const char* bn_version(void);
/* A sentence describing a status code (never NULL). */
BN_API const char* bn_strerror(int status);
/* 1 when the CPU (and OS) can run the ISA's kernels. */
BN_API int bn_isa_supported(int isa);
/* The best ISA the CPU supports (the default context's unless set). */
BN_API int bn_best_isa(void);
/* "scalar", "avx2", "avx512"; "unknown" for another code. */
BN_API const char* bn_isa_name(int isa);
/* 1 when the library was built with OpenMP. */
BN_API int bn_have_openmp(void);

/* ---- contexts ----
 * A context holds the settings of the ops run under it: the ISA, the thread count (0: OpenMP's default; without
 * OpenMP, 1), the tuning budgets (docs/tuning.md) and a parallel_for. -1 (the ISA, the budgets) in a context of
 * bn_context_create means "the default context's setting, as it is at the call"; in the default context, the best
 * ISA the CPU has and the CPU's budgets. The default
 * context (bn_default_context(), or NULL given to an op) is shared by the whole process. A context must outlive the
 * ops that use it and not change while one runs; several threads may run ops under one context at once. */
typedef struct bn_context bn_context;
BN_API bn_context* bn_default_context(void);
/* A new context with the default settings; NULL when out of memory. */
BN_API bn_context* bn_context_create(void);
/* Frees a context from bn_context_create (NULL and the default context: nothing). */
BN_API void bn_context_destroy(bn_context* ctx);
/* isa: a bn_isa code, or -1 (the default context's; for the default context, the best); BN_EISA when the CPU lacks
 * it, BN_EINVAL for a NULL context. */
BN_API int bn_context_set_isa(bn_context* ctx, int isa);
/* The ISA ops under ctx use; -1 for a NULL context. */
BN_API int bn_context_get_isa(const bn_context* ctx);
/* nthreads >= 0 (0: OpenMP's default); BN_EINVAL otherwise, or for a NULL context. */
BN_API int bn_context_set_num_threads(bn_context* ctx, int nthreads);
BN_API int bn_context_get_num_threads(const bn_context* ctx);
/* The tuning of docs/tuning.md ("Strip threshold per CPU", "Slab budget per CPU"): -1 (any negative) as for the ISA;
 * the results are the same bits whatever they are. BN_EINVAL for a NULL context or a strip size below 4096. */
BN_API int bn_context_set_cl_strip_bytes(bn_context* ctx, int64_t bytes);
BN_API int bn_context_set_slab_bytes(bn_context* ctx, int64_t bytes);

/* A caller's parallel loop: run task(arg, i) once for every i in [0, n), on any threads in any order, and return
 * when all have returned. pool is the pointer given to bn_context_set_parallel_for. The tasks never block on one
 * another, so a pool may also run them one after another on the calling thread. */
typedef void (*bn_task_fn)(void* arg, int64_t i);
typedef void (*bn_parallel_for_fn)(void* pool, int64_t n, bn_task_fn task, void* arg);
/* Ops under ctx run their work as tasks of fn (NULL: OpenMP, the default) and start no thread of their own. The
 * results are bitwise those of the OpenMP path, NaN outputs' signs and payloads included (docs/design.md,
 * "Determinism"). The context's thread count (0: 1 task per 1 MiB of data, at most 64) is how many tasks an op splits
 * into. Layer norm's and RMS norm's backward run as one driver call on the calling thread (docs/design.md, "The C
 * library"). BN_ENULL for a NULL context. */
BN_API int bn_context_set_parallel_for(bn_context* ctx, bn_parallel_for_fn fn, void* pool);

/* ---- workspace ---- */
typedef enum bn_op {
    BN_OP_BATCH_NORM_INFERENCE = 0,
    BN_OP_BATCH_NORM_TRAINING = 1,
    BN_OP_BATCH_NORM_BACKWARD = 2,
    BN_OP_GROUP_NORM_FORWARD = 3, /* (instance norm: groups = C) */
    BN_OP_GROUP_NORM_BACKWARD = 4,
    BN_OP_LAYER_NORM_FORWARD = 5, /* (RMS norm too) */
    BN_OP_LAYER_NORM_BACKWARD = 6,
    BN_OP_BATCH_NORM_MOMENTS = 7
} bn_op;
/* *bytes := the workspace op needs on d under ctx (groups: group norm's G, else ignored). A workspace of that many
 * bytes (any alignment) makes the call allocate nothing. Depends on the shape, the context's thread count and
 * parallel_for, never on the data; with the context's thread count 0, group norm's also on the calling thread's
 * OpenMP thread count (omp_get_max_threads): a call made under more threads than the size was asked for runs group
 * norm on as many threads as its workspace covers (the same bits), so a size asked once stays good. */
BN_API int bn_workspace_size(const bn_context* ctx, int op, const bn_desc* d, int64_t groups, size_t* bytes);

/* ---- batch norm: statistics per channel over (N, S) ----
 * Per-channel arrays: C values of d->param_dtype. weight and bias nullable (1 and 0). */

/* Inference: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias. running_var >= 0 is the caller's
 * promise (a negative one is used as it is: where running_var + eps is below 0 the outputs are NaN, and where it is
 * 0 they are not finite, or for float64 the saturated +-DBL_MAX and the bias). */
BN_API int bn_batch_norm_inference(const bn_context* ctx, const bn_desc* d, const void* x, void* y,
                                   const void* running_mean, const void* running_var, const void* weight,
                                   const void* bias, double eps, void* workspace, size_t workspace_bytes);

/* Training forward: the batch's mean and biased variance var, y = (x - mean) / sqrt(var + eps) * weight + bias;
 * save_mean := mean, save_invstd := 1 / sqrt(var + eps) (each nullable); when running_mean and running_var are given
 * (both or neither), running = (1 - momentum) running + momentum batch, with the unbiased variance var n / (n - 1)
 * (n = N S; the biased one when n = 1), in double. momentum in [0, 1]. */
BN_API int bn_batch_norm_training(const bn_context* ctx, const bn_desc* d, const void* x, void* y, const void* weight,
                                  const void* bias, double eps, double momentum, void* running_mean,
                                  void* running_var, void* save_mean, void* save_invstd, void* workspace,
                                  size_t workspace_bytes);

/* Backward. With n = N S, s = invstd[c], w = weight[c]:
 *   grad_bias = sum dy, grad_weight = s sum dy (x - mean),
 *   training:  dx = w s (dy - grad_bias / n - (x - mean) s grad_weight / n),
 *   inference: dx = w s dy (the statistics are constants: mean and invstd of the running statistics).
 * mean, invstd: the forward's save_mean and save_invstd (required); grad_weight, grad_bias nullable; dx may be dy
 * or x. */
BN_API int bn_batch_norm_backward(const bn_context* ctx, const bn_desc* d, const void* dy, const void* x, void* dx,
                                  const void* mean, const void* invstd, const void* weight, int training,
                                  void* grad_weight, void* grad_bias, void* workspace, size_t workspace_bytes);

/* The eval-mode fold: scale = weight / sqrt(running_var + eps), shift = bias - running_mean scale, in double, stored
 * in param_dtype (y = x scale + shift is batch norm's inference; bn_simd.fold_params). running_var >= 0 (else
 * BN_EINVAL), weight and bias nullable. */
BN_API int bn_fold_params(int64_t C, int param_dtype, const void* running_mean, const void* running_var,
                          const void* weight, const void* bias, double eps, void* scale, void* shift);

/* Mergeable moments (SyncBatchNorm across processes): the chunk moments of the batch's statistics, in chunk order.
 * Call with count NULL to get the number of chunks *K (shape only), then with *K and arrays of *K (count) and *K C
 * doubles (shift, resid, m2: chunk k's channel c at k C + c). */
BN_API int bn_batch_norm_moments(const bn_context* ctx, const bn_desc* d, const void* x, int64_t* K, double* count,
                                 double* shift, double* resid, double* m2, void* workspace, size_t workspace_bytes);
/* Mean and biased variance of C channels (param_dtype) from K chunks' moments (of one or several calls, in order):
 * bitwise one call's statistics for the chunks of consecutive pieces of a batch cut at chunk boundaries. count[k] >= 0
 * (chunks of 0 skipped); BN_ESIZE when they are all 0. Allocates nothing for double results, 2 C doubles for float
 * ones. */
BN_API int bn_merge_moments(int64_t K, int64_t C, int param_dtype, const double* count, const double* shift,
                            const double* resid, const double* m2, void* mean, void* var);

/* ---- group norm and instance norm: statistics per (sample, group) over the group's C / G channels and S ----
 * mean, rstd: N G values (n G + g) of param_dtype, rstd = 1 / sqrt(var + eps) (nullable in the forward); weight,
 * bias: C values, nullable. Instance norm is G = C. */
BN_API int bn_group_norm_forward(const bn_context* ctx, const bn_desc* d, int64_t groups, const void* x, void* y,
                                 const void* weight, const void* bias, double eps, void* mean, void* rstd,
                                 void* workspace, size_t workspace_bytes);
/* With s = rstd[q], M = (C / G) S, g = dy w:
 *   dx = s (g - sum_group(g) / M - (x - mean) s^2 sum_group(g (x - mean)) / M),
 *   grad_weight[c] = sum s dy (x - mean), grad_bias[c] = sum dy (nullable).
 * A group of one value (M = 1) has y = bias whatever x: its dx is 0 (NaN where dy is), whatever mean and rstd are
 * given. */
BN_API int bn_group_norm_backward(const bn_context* ctx, const bn_desc* d, int64_t groups, const void* dy,
                                  const void* x, void* dx, const void* mean, const void* rstd, const void* weight,
                                  void* grad_weight, void* grad_bias, void* workspace, size_t workspace_bytes);
BN_API int bn_instance_norm_forward(const bn_context* ctx, const bn_desc* d, const void* x, void* y,
                                    const void* weight, const void* bias, double eps, void* mean, void* rstd,
                                    void* workspace, size_t workspace_bytes);
BN_API int bn_instance_norm_backward(const bn_context* ctx, const bn_desc* d, const void* dy, const void* x, void* dx,
                                     const void* mean, const void* rstd, const void* weight, void* grad_weight,
                                     void* grad_bias, void* workspace, size_t workspace_bytes);

/* ---- layer norm and RMS norm: statistics per position over the C channels ----
 * Channels-last (or S = 1): N S rows of C; channels-first: over the C channels of each of the N S positions. mean and
 * rstd: N S values of param_dtype (nullable in the forward; mean unused by RMS norm); weight, bias: C, nullable.
 *   layer norm: y = (x - mean) rstd w + b, rstd = 1 / sqrt(var + eps) (var biased);
 *   RMS norm:   y = x rstd w,             rstd = 1 / sqrt(mean(x^2) + eps).
 * Backward with g = dy w, xh = (x - mean) rstd (RMS: x rstd), per position over its C values:
 *   dx = rstd (g - sum(g) / C - xh sum(g xh) / C) (RMS: without the sum(g) term),
 *   grad_weight[c] = sum dy xh, grad_bias[c] = sum dy (nullable).
 * Layer norm over one channel (C = 1) has y = bias whatever x: its dx is 0 (NaN where dy is), whatever mean and rstd
 * are given. */
BN_API int bn_layer_norm_forward(const bn_context* ctx, const bn_desc* d, const void* x, void* y, const void* weight,
                                 const void* bias, double eps, void* mean, void* rstd, void* workspace,
                                 size_t workspace_bytes);
BN_API int bn_layer_norm_backward(const bn_context* ctx, const bn_desc* d, const void* dy, const void* x, void* dx,
                                  const void* mean, const void* rstd, const void* weight, void* grad_weight,
                                  void* grad_bias, void* workspace, size_t workspace_bytes);
BN_API int bn_rms_norm_forward(const bn_context* ctx, const bn_desc* d, const void* x, void* y, const void* weight,
                               double eps, void* rstd, void* workspace, size_t workspace_bytes);
BN_API int bn_rms_norm_backward(const bn_context* ctx, const bn_desc* d, const void* dy, const void* x, void* dx,
                                const void* rstd, const void* weight, void* grad_weight, void* workspace,
                                size_t workspace_bytes);

#ifdef __cplusplus
}
#endif

#endif /* BN_SIMD_API_H */
