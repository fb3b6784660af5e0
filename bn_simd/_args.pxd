# The argument checker's C-level interface (bn_simd/_args.pyx), for the bridge (bn_simd/_core.pyx).
cimport numpy as cnp
from libc.stdint cimport int64_t

# Storage dtypes of data tensors: the code the bridge dispatches its kernel calls on.
cdef enum:
    DT_F32 = 0
    DT_F64 = 1
    DT_F16 = 2   # float16 (numpy.float16), computed in float32
    DT_BF16 = 3  # bfloat16 (ml_dtypes.bfloat16), computed in float32

# Layouts. A channel axis given as axis= (bn_simd.functional) arrives as an Axis token, whose code is AXIS_BASE + axis
# (axis in [-MAX_RANK, MAX_RANK - 1]); only the batch-norm views (view) take it.
cdef enum:
    NCHW = 0
    NHWC = 1
    AXIS_BASE = 64
    MAX_RANK = 8


cdef class Axis:
    cdef readonly int axis

# A data tensor seen by the batch-norm kernels: the C-contiguous (outer, C, inner) view and its storage dtype.
ctypedef struct View:
    int64_t outer
    int64_t C
    int64_t inner
    int dtype

# A data tensor seen by the group-norm kernels: N samples of C channels at S positions, channels last or not.
ctypedef struct Groups:
    int64_t N
    int64_t C
    int64_t S
    int cl
    int dtype

cdef int layout_code(object layout) except -1
cdef cnp.ndarray data(object x, str name, bint half=*)
cdef bint half_storage(cnp.ndarray a) noexcept
cdef int view(cnp.ndarray x, int layout, str name, View* v) except -1
cdef int group_view(cnp.ndarray x, int layout, int min_rank, str what, Groups* g) except -1
cdef object _to_ndarray(object obj, str name)
cdef cnp.ndarray like(object a, str name, cnp.ndarray x)
cdef object channel(object v, str name, int64_t C, bint inplace, str of=*)
cdef object required_channel(object v, str name, int64_t C, str of=*)
cdef object first_channel(object v, str name)
cdef int64_t length(object v, str name) except -1
cdef int both_given(object a, object b, str names) except -1
cpdef int together(object running_mean, object running_var, bint written) except -1
cpdef int stats_distinct(tuple named) except -1
cpdef int stats_apart(object out, tuple named) except -1
cdef int out_apart(object out, tuple named) except -1
cdef int load(object a, int64_t C, double* dst) except -1
cdef int store(object a, int64_t C, const double* src) except -1
cdef int group_stat(object v, str name, int64_t N, int64_t G, str what, double* dst) except -1
cdef int64_t num_groups(object G, int64_t C) except -1
cdef int group_values(int64_t n, cnp.ndarray x) except -1
cdef double eps(object e, str name=*) except? -1.0
cdef double momentum(object m) except? -1.0
cdef double momentum_if(object m, bint used) except? -1.0
cdef double count(object n, bint positive) except? -1.0
cdef object dtype_arg(object dtype, int* code)
cdef int train_size(int64_t n, cnp.ndarray x) except -1
cdef int spatial_size(int64_t S, cnp.ndarray x) except -1
cdef cnp.ndarray output(object out, cnp.ndarray x, cnp.ndarray also)
cdef cnp.ndarray output_apart(object out, str name, cnp.ndarray x, tuple reads)
cdef cnp.ndarray new_like(cnp.ndarray x)
cdef cnp.ndarray new_vector(int64_t n, int npy_type)

# A data tensor seen by the layer-norm kernels: N (leading) by C (normalised) by S (positions: 1 for normalised
# trailing dims; the spatial size for channels-first), and the rank of the statistics' leading part.
ctypedef struct Rows:
    int64_t N
    int64_t C
    int64_t S
    int lead
    int cf
    int dtype

cdef int rows_view(cnp.ndarray x, object normalized_shape, object layout, Rows* r) except -1
cdef int stat_dims(cnp.ndarray x, Rows* r, cnp.npy_intp* dims) noexcept
cdef tuple stat_shape(cnp.ndarray x, Rows* r)
cdef object row_param(object v, str name, cnp.ndarray x, Rows* r)
cdef int row_stat(object v, str name, cnp.ndarray x, Rows* r, double* dst) except -1
