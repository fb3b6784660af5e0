# cython: language_level=3
"""Cython declarations of bn_simd's C library (bn_simd_api.h: libbn_simd), for Cython code that calls the kernels
without the GIL, as scikit-learn's and NumPy's .pxd files declare theirs:

    from bn_simd.bn_simd cimport bn_desc, bn_batch_norm_inference, BN_F32, BN_F64, BN_LAYOUT_NHWC, BN_OK

and build the extension with the package's header and library (README.md, "Embedding"):

    Extension(..., include_dirs=[bn_simd.get_include()], library_dirs=bn_simd.get_library_dirs(),
              runtime_library_dirs=bn_simd.get_library_dirs(), libraries=["bn_simd"])
    cythonize(..., include_path=[os.path.dirname(os.path.dirname(bn_simd.__file__))])

(include_path: an editable install reaches the package through an import hook, which Cython's .pxd search does not
use.)

Every function is nogil; each returns BN_OK or a negative status (bn_strerror) and writes nothing on a bad argument.
The meaning of every argument: include/bn_simd_api.h.
"""
from libc.stdint cimport int64_t


cdef extern from "bn_simd_api.h" nogil:
    enum:
        BN_OK
        BN_ENOMEM
        BN_EINVAL
        BN_EISA
        BN_ENULL
        BN_ESIZE
        BN_EEPS
        BN_EMOMENTUM
        BN_ELAYOUT
        BN_EDTYPE
        BN_EGROUPS
        BN_EWORKSPACE
        BN_EOVERLAP
        BN_EOP
    enum:
        BN_ISA_SCALAR
        BN_ISA_AVX2
        BN_ISA_AVX512
        BN_ISA_COUNT
    enum:
        BN_F32
        BN_F64
        BN_F16
        BN_BF16
    enum:
        BN_LAYOUT_NCHW
        BN_LAYOUT_NHWC
    enum:
        BN_OP_BATCH_NORM_INFERENCE
        BN_OP_BATCH_NORM_TRAINING
        BN_OP_BATCH_NORM_BACKWARD
        BN_OP_GROUP_NORM_FORWARD
        BN_OP_GROUP_NORM_BACKWARD
        BN_OP_LAYER_NORM_FORWARD
        BN_OP_LAYER_NORM_BACKWARD
        BN_OP_BATCH_NORM_MOMENTS

    ctypedef struct bn_desc:
        int dtype
        int param_dtype
        int layout
        int64_t n
        int64_t c
        int64_t s

    ctypedef struct bn_context:
        pass
    ctypedef void (*bn_task_fn)(void* arg, int64_t i) noexcept nogil
    ctypedef void (*bn_parallel_for_fn)(void* pool, int64_t n, bn_task_fn task, void* arg) noexcept nogil

    const char* bn_version()
    const char* bn_strerror(int status)
    int bn_isa_supported(int isa)
    int bn_best_isa()
    const char* bn_isa_name(int isa)
    int bn_have_openmp()

    bn_context* bn_default_context()
    bn_context* bn_context_create()
    void bn_context_destroy(bn_context* ctx)
    int bn_context_set_isa(bn_context* ctx, int isa)
    int bn_context_get_isa(const bn_context* ctx)
    int bn_context_set_num_threads(bn_context* ctx, int nthreads)
    int bn_context_get_num_threads(const bn_context* ctx)
    int bn_context_set_cl_strip_bytes(bn_context* ctx, int64_t nbytes)
    int bn_context_set_slab_bytes(bn_context* ctx, int64_t nbytes)
    int bn_context_set_parallel_for(bn_context* ctx, bn_parallel_for_fn fn, void* pool)

    int bn_workspace_size(const bn_context* ctx, int op, const bn_desc* d, int64_t groups, size_t* nbytes)

    int bn_batch_norm_inference(const bn_context* ctx, const bn_desc* d, const void* x, void* y,
                                const void* running_mean, const void* running_var, const void* weight,
                                const void* bias, double eps, void* workspace, size_t workspace_bytes)
    int bn_batch_norm_training(const bn_context* ctx, const bn_desc* d, const void* x, void* y, const void* weight,
                               const void* bias, double eps, double momentum, void* running_mean, void* running_var,
                               void* save_mean, void* save_invstd, void* workspace, size_t workspace_bytes)
    int bn_batch_norm_backward(const bn_context* ctx, const bn_desc* d, const void* dy, const void* x, void* dx,
                               const void* mean, const void* invstd, const void* weight, int training,
                               void* grad_weight, void* grad_bias, void* workspace, size_t workspace_bytes)
    int bn_fold_params(int64_t C, int param_dtype, const void* running_mean, const void* running_var,
                       const void* weight, const void* bias, double eps, void* scale, void* shift)
    int bn_batch_norm_moments(const bn_context* ctx, const bn_desc* d, const void* x, int64_t* K, double* count,
                              double* shift, double* resid, double* m2, void* workspace, size_t workspace_bytes)
    int bn_merge_moments(int64_t K, int64_t C, int param_dtype, const double* count, const double* shift,
                         const double* resid, const double* m2, void* mean, void* var)

    int bn_group_norm_forward(const bn_context* ctx, const bn_desc* d, int64_t groups, const void* x, void* y,
                              const void* weight, const void* bias, double eps, void* mean, void* rstd,
                              void* workspace, size_t workspace_bytes)
    int bn_group_norm_backward(const bn_context* ctx, const bn_desc* d, int64_t groups, const void* dy,
                               const void* x, void* dx, const void* mean, const void* rstd, const void* weight,
                               void* grad_weight, void* grad_bias, void* workspace, size_t workspace_bytes)
    int bn_instance_norm_forward(const bn_context* ctx, const bn_desc* d, const void* x, void* y,
                                 const void* weight, const void* bias, double eps, void* mean, void* rstd,
                                 void* workspace, size_t workspace_bytes)
    int bn_instance_norm_backward(const bn_context* ctx, const bn_desc* d, const void* dy, const void* x, void* dx,
                                  const void* mean, const void* rstd, const void* weight, void* grad_weight,
                                  void* grad_bias, void* workspace, size_t workspace_bytes)

    int bn_layer_norm_forward(const bn_context* ctx, const bn_desc* d, const void* x, void* y, const void* weight,
                              const void* bias, double eps, void* mean, void* rstd, void* workspace,
                              size_t workspace_bytes)
    int bn_layer_norm_backward(const bn_context* ctx, const bn_desc* d, const void* dy, const void* x, void* dx,
                               const void* mean, const void* rstd, const void* weight, void* grad_weight,
                               void* grad_bias, void* workspace, size_t workspace_bytes)
    int bn_rms_norm_forward(const bn_context* ctx, const bn_desc* d, const void* x, void* y, const void* weight,
                            double eps, void* rstd, void* workspace, size_t workspace_bytes)
    int bn_rms_norm_backward(const bn_context* ctx, const bn_desc* d, const void* dy, const void* x, void* dx,
                             const void* rstd, const void* weight, void* grad_weight, void* workspace,
                             size_t workspace_bytes)
