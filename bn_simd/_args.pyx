# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The argument checker: every entry point's arguments are validated, converted and described here, once.

Each check raises before anything is written, so a call that raises has changed nothing. Messages name the
argument, what was expected and what came: TypeError for a wrong type or dtype, ValueError for a wrong shape or
value. Arguments the kernels can use as they are (C-contiguous, aligned, native-order float32/float64 ndarrays,
Python floats, "NCHW"/"NHWC") pass a few C-level tests and are returned unchanged; anything else is converted once
(a data tensor copied to C order, native byte order; a tensor or list through NumPy; a per-channel array of any
float dtype read as float64) or refused.

The cdef functions (bn_simd/_args.pxd) serve the bridge, bn_simd/_core.pyx; the def functions at the end serve the
Python modules (the layers' attribute and input checks).
"""
import numbers

import numpy as np

cimport numpy as cnp
from cpython.float cimport PyFloat_AS_DOUBLE
from libc.math cimport floor, isfinite
from libc.stdint cimport uint16_t
from libc.string cimport memcpy


cdef extern from "half.h" nogil:
    uint16_t bn_bf16_from_f64(double d)

cnp.import_array()

LAYOUTS = {"NCHW": "NCHW", "NHWC": "NHWC", "channels_first": "NCHW", "channels_last": "NHWC"}
LAYOUT_NAMES = ("NCHW", "NHWC")
MAX_DIMS = MAX_RANK  # the highest rank a call with axis= takes
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# The 16-bit storage dtypes of the data tensors of the calls that take them (half=True below): NumPy's float16, and
# bfloat16 as ml_dtypes defines it (the dtype of JAX and TensorFlow), recognised by its name, size and kind so that
# ml_dtypes is never imported here: only arrays of that dtype, made by whoever imported it, carry it.
HALF_CALLS = ("batch_norm, batch_norm_forward, batch_norm_backward, batch_stats, normalize, backward_reduce, the "
              "group / instance / layer / RMS norm calls and the layers (but not in SyncBatchNorm's training, renorm "
              "or virtual batches)")
cdef int _bf16_num = -1  # bfloat16's NumPy type number, once an array of it has been seen (NumPy assigns it)
# bfloat16 without ml_dtypes: bn_simd.torch hands a torch.bfloat16 tensor over as a view of its memory in this dtype,
# uint16 tagged by its metadata (views, transposes and copies keep the descriptor object). Arrays of it are bfloat16
# data, parameters and parameter gradients wherever bfloat16 is taken; a plain uint16 array stays refused.
BF16_BITS = np.dtype(np.uint16, metadata={"bn_simd": "bfloat16 bits"})
cdef object _BITS = BF16_BITS


cdef inline bint _is_bf16(object dt):
    return dt.itemsize == 2 and dt.kind == "V" and dt.name == "bfloat16"


cdef bint _is_float(object dt):
    """A floating-point dtype: NumPy's float kinds and bfloat16 (ml_dtypes', or its bits as BF16_BITS)."""
    return dt.kind == "f" or _is_bf16(dt) or dt is _BITS


cdef inline int _data_code(cnp.ndarray a) noexcept:
    """a's storage dtype code (DT_*), -1 when the kernels have none for it."""
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT32:
        return DT_F32
    if t == cnp.NPY_FLOAT64:
        return DT_F64
    if t == cnp.NPY_FLOAT16:
        return DT_F16
    if t == _bf16_num and t >= 0:
        return DT_BF16
    if t == cnp.NPY_UINT16 and <void*>cnp.PyArray_DESCR(a) == <void*>_BITS:
        return DT_BF16
    return -1


cdef bint half_storage(cnp.ndarray a) noexcept:
    """a is a float16 or bfloat16 data tensor (its statistics and parameter gradients are then float32)."""
    cdef int c = _data_code(a)
    return c == DT_F16 or c == DT_BF16


# ---- descriptions and conversions ---------------------------------------------------------------------------

cdef str _describe(object obj):
    return type(obj).__name__ if not isinstance(obj, np.ndarray) else f"ndarray of dtype {obj.dtype}"


cdef inline bint _plain(cnp.ndarray a):
    """a's elements are float32/float64 the kernels can read in place (C order, aligned, native byte order)."""
    cdef int t = cnp.PyArray_TYPE(a)
    return ((t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64) and cnp.PyArray_IS_C_CONTIGUOUS(a)
            and cnp.PyArray_ISALIGNED(a) and cnp.PyArray_ISNOTSWAPPED(a))


cdef object _to_ndarray(object obj, str name):
    """ndarray as it is; array-likes (lists, tensors on the CPU) through np.asarray."""
    if type(obj) is np.ndarray:
        return obj
    if isinstance(obj, np.ndarray):  # a subclass (np.matrix, masked arrays): its data as a plain ndarray
        if isinstance(obj, np.ma.MaskedArray) and np.ma.getmask(obj) is not np.ma.nomask and obj.mask.any():
            raise TypeError(f"{name} is a masked array with masked entries, whose values every call would read as "
                            f"they are (the mask ignored): pass {name}.filled(value), or {name}.data with mask= "
                            f"(batch norm's statistics of the selected entries)")
        return np.asarray(obj).view(np.ndarray)
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):  # a torch.Tensor: on the CPU
        if getattr(obj, "requires_grad", False):  # detaching it would drop its gradient without a word
            raise TypeError(f"{name} is a torch.Tensor that requires grad, and the NumPy API does not record "
                            f"gradients: use bn_simd.torch (autograd Functions and torch.nn modules), or pass "
                            f"{name}.detach()")
        t = obj.detach().cpu()
        if str(getattr(t, "dtype", "")) == "torch.bfloat16":  # NumPy has no bfloat16: widen (exact)
            t = t.float()
        try:
            return t.numpy()
        except (TypeError, RuntimeError) as e:
            raise TypeError(f"{name} must be an array of float32 or float64, got {_describe(obj)}: {e}") from None
    try:
        return np.asarray(obj)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array of float32 or float64, got {_describe(obj)}: {e}") from None


# ---- layout -------------------------------------------------------------------------------------------------

cdef int layout_code(object layout) except -1:
    """NCHW or NHWC for "NCHW"/"NHWC" and their aliases "channels_first"/"channels_last"; AXIS_BASE + axis for an
    Axis token (see axis_layout)."""
    if type(layout) is str:
        if layout == "NCHW":
            return NCHW
        if layout == "NHWC":
            return NHWC
    elif type(layout) is Axis:
        return AXIS_BASE + (<Axis>layout).axis
    return NCHW if _layout_name(layout) == "NCHW" else NHWC


cdef class Axis:
    """A channel axis given as ``axis=``, in place of a layout: the token the Python modules hand to the bridge in the
    layout argument, so that the bridge's signatures stay those of the layouts (see axis_layout)."""

    def __init__(self, int axis):
        self.axis = axis

    def __repr__(self):
        return f"Axis({self.axis})"


# tokens of the axes a rank-1..8 array has, made once (a call with axis= does not allocate one)
cdef tuple _AXES = tuple(Axis(a) for a in range(-MAX_RANK, MAX_RANK))


cdef str _layout_name(object layout):
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a string, one of {sorted(LAYOUTS)}, got {_describe(layout)}")
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}") from None


# ---- data tensors -------------------------------------------------------------------------------------------

cdef cnp.ndarray data(object x, str name, bint half=False):
    """x as a native-endian, C-contiguous, aligned float32/float64 ndarray (half: float16 and bfloat16 too, for the
    calls that take them): x itself when it is one, else one copy (Fortran order, strides, byte swaps, tensors,
    lists)."""
    global _bf16_num
    cdef int code
    if type(x) is cnp.ndarray:
        code = _data_code(<cnp.ndarray>x)
        if (code == DT_F32 or code == DT_F64 or (half and code >= 0)) and cnp.PyArray_IS_C_CONTIGUOUS(x) \
                and cnp.PyArray_ISALIGNED(x) and cnp.PyArray_ISNOTSWAPPED(x):
            return <cnp.ndarray>x
    wanted = "float32 or float64 (or float16, bfloat16)" if half else "float32 or float64"
    if not isinstance(x, np.ndarray) and str(getattr(x, "dtype", "")) == "torch.bfloat16":
        raise TypeError(f"{name} must be an ndarray of dtype {wanted}, got a {x.dtype} tensor (NumPy has no "
                        f"bfloat16: pass it to bn_simd.torch, or as an ml_dtypes.bfloat16 array)")
    a = _to_ndarray(x, name)
    dt = a.dtype
    bf16 = _is_bf16(dt)
    if bf16 and _bf16_num < 0:
        _bf16_num = dt.num
    bf16 = bf16 or dt is _BITS
    f16 = dt.kind == "f" and dt.itemsize == 2
    if not (bf16 or (dt.kind == "f" and (f16 or dt.newbyteorder("=") in SUPPORTED_DTYPES))) or \
            ((bf16 or f16) and not half):
        hint = f" (float16 and bfloat16 data are taken by {HALF_CALLS}, not by this call)" if bf16 or f16 else ""
        raise TypeError(f"{name} must have dtype {wanted}, got {dt}{hint}")
    if not (dt.isnative and a.flags.c_contiguous and a.flags.aligned):
        a = np.array(a, dtype=dt.newbyteorder("="), order="C")  # (a fresh array is aligned)
    return <cnp.ndarray>a


cdef inline int _dtype_code(cnp.ndarray x) noexcept:
    """the storage dtype code of a data tensor that data() returned"""
    return _data_code(x)


cdef int view(cnp.ndarray x, int layout, str name, View* v) except -1:
    """v = the (outer, C, inner) view of data tensor x, shaped (N, C, *spatial) (NCHW) or (N, *spatial, C) (NHWC),
    of rank 2 to 5; or, for an axis code (AXIS_BASE + axis), the view of x of rank 1 to MAX_RANK around that axis."""
    cdef int nd = cnp.PyArray_NDIM(x), k
    if layout > NHWC:
        return _axis_view(x, layout - AXIS_BASE, name, v)
    if nd < 2 or nd > 5:
        form = "(N, C, *spatial)" if layout == NCHW else "(N, *spatial, C)"
        raise ValueError(f"{name} must have 2 to 5 dimensions {form} for layout {LAYOUT_NAMES[layout]!r}, "
                         f"got {nd} dimension(s) with shape {(<object>x).shape}")
    v.outer = 1
    v.inner = 1
    if layout == NCHW:
        v.outer = cnp.PyArray_DIM(x, 0)
        v.C = cnp.PyArray_DIM(x, 1)
        for k in range(2, nd):
            v.inner *= cnp.PyArray_DIM(x, k)
    else:
        v.C = cnp.PyArray_DIM(x, nd - 1)
        for k in range(nd - 1):
            v.outer *= cnp.PyArray_DIM(x, k)
    v.dtype = _dtype_code(x)
    return 0


cdef int _axis_view(cnp.ndarray x, int axis, str name, View* v) except -1:
    """v = the view of x with channels on `axis`: a C-contiguous (d0, ..., dk) array with channel axis a is the
    (prod(d<a), d_a, prod(d>a)) array (inner == 1: the kernels' channels-last path, > 1: channels-first)."""
    cdef int nd = cnp.PyArray_NDIM(x), k
    if nd < 1 or nd > MAX_RANK:
        raise ValueError(f"{name} must have 1 to {MAX_RANK} dimensions with axis={axis}, got {nd} dimension(s) "
                         f"with shape {(<object>x).shape}")
    if axis < -nd or axis >= nd:
        raise ValueError(f"axis must be in [{-nd}, {nd - 1}] for {name} of {nd} dimension(s) with shape "
                         f"{(<object>x).shape}, got {axis}")
    if axis < 0:
        axis += nd
    v.outer = 1
    v.inner = 1
    v.C = cnp.PyArray_DIM(x, axis)
    for k in range(axis):
        v.outer *= cnp.PyArray_DIM(x, k)
    for k in range(axis + 1, nd):
        v.inner *= cnp.PyArray_DIM(x, k)
    v.dtype = _dtype_code(x)
    return 0


cdef int group_view(cnp.ndarray x, int layout, int min_rank, str what, Groups* g) except -1:
    """g = (N, C, S) of data tensor x for the group-norm kernels: rank min_rank to 5, S = prod(spatial)."""
    cdef int nd = cnp.PyArray_NDIM(x), k
    if layout > NHWC:
        raise ValueError(f"{what} takes layout='NCHW' or 'NHWC', not an axis")
    if nd < min_rank or nd > 5:
        form = "(N, C, *spatial)" if layout == NCHW else "(N, *spatial, C)"
        ranks = " or ".join(str(r) for r in range(min_rank, 6))
        raise ValueError(f"{what} expects x of {ranks} dimensions {form} for layout {LAYOUT_NAMES[layout]!r}, "
                         f"got {nd} dimension(s) with shape {(<object>x).shape}")
    g.N = cnp.PyArray_DIM(x, 0)
    g.cl = layout == NHWC
    g.C = cnp.PyArray_DIM(x, nd - 1 if g.cl else 1)
    g.S = 1
    for k in range(1 if g.cl else 2, nd - 1 if g.cl else nd):
        g.S *= cnp.PyArray_DIM(x, k)
    g.dtype = _dtype_code(x)
    return 0


cdef cnp.ndarray like(object a, str name, cnp.ndarray x):
    """a as a data tensor (see data) with the shape and dtype of x (grad_out beside x); an ndarray's shape is checked
    before data() copies it (a broadcast view of the wrong shape was copied whole first)."""
    cdef object s = _to_ndarray(a, name) if isinstance(a, np.ndarray) else None
    if s is not None and s.shape != (<object>x).shape:
        raise ValueError(f"{name} must have the shape of x {(<object>x).shape}, got {s.shape}")
    # (any storage dtype data() takes: one that is not x's is the dtype error below, whatever x's dtype)
    cdef cnp.ndarray g = data(a if s is None else s, name, True)
    cdef int k, nd = cnp.PyArray_NDIM(x)
    cdef bint same = cnp.PyArray_NDIM(g) == nd
    for k in range(nd if same else 0):
        same = same and cnp.PyArray_DIM(g, k) == cnp.PyArray_DIM(x, k)
    if not same:
        raise ValueError(f"{name} must have the shape of x {(<object>x).shape}, got {(<object>g).shape}")
    if cnp.PyArray_TYPE(g) != cnp.PyArray_TYPE(x):
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {g.dtype}")
    return g


cdef int train_size(int64_t n, cnp.ndarray x) except -1:
    if n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input of shape "
                         f"{(<object>x).shape}")
    return 0


cdef int spatial_size(int64_t S, cnp.ndarray x) except -1:
    if S == 1:  # (none is an empty output, as PyTorch's)
        raise ValueError(f"Expected more than 1 spatial element when training, got input of shape {(<object>x).shape}")
    return 0


# ---- per-channel arrays -------------------------------------------------------------------------------------

cdef object channel(object v, str name, int64_t C, bint inplace, str of="x"):
    """A length-C floating-point vector (any float dtype, any strides) as an ndarray, or None.

    inplace: v is updated in place by the call, so it must be a writeable ndarray. of: the argument whose channels
    set C (the messages name it)."""
    cdef cnp.ndarray a
    cdef int t
    if v is None:
        return None
    if type(v) is cnp.ndarray:
        a = <cnp.ndarray>v
        t = cnp.PyArray_TYPE(a)
        if ((t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64) and cnp.PyArray_NDIM(a) == 1
                and cnp.PyArray_DIM(a, 0) == C and (not inplace or cnp.PyArray_ISWRITEABLE(a))):
            return a
    if inplace:
        if not isinstance(v, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), got {_describe(v)}")
        b = v
    else:
        b = _to_ndarray(v, name)
    if not _is_float(b.dtype):
        raise TypeError(f"{name} must have a floating-point dtype, got {b.dtype}")
    if b.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match the {C} channels of {of}, got shape {b.shape}")
    if inplace and not b.flags.writeable:
        raise ValueError(f"{name} must be writeable (it is updated in place), got a read-only array")
    return b


cdef int64_t length(object v, str name) except -1:
    """The number of elements of array-like v (0 for None): the C of a call whose per-channel arrays set it."""
    return 0 if v is None else _to_ndarray(v, name).size


cdef object required_channel(object v, str name, int64_t C, str of="x"):
    """channel(v, name, C, False, of), None refused."""
    if v is None:
        raise TypeError(f"{name} must be an array of shape ({C},), got None")
    return channel(v, name, C, False, of)


cdef object first_channel(object v, str name):
    """channel(v, name, C, False) for the first per-channel argument of a call without data, whose length sets C;
    None refused."""
    if v is None:
        raise TypeError(f"{name} must be an array of shape (C,), got None")
    shape = _to_ndarray(v, name).shape
    if len(shape) != 1:
        raise ValueError(f"{name} must have shape (C,), one value per channel, got shape {shape}")
    return channel(v, name, shape[0], False)


cdef int both_given(object a, object b, str names) except -1:
    """Two per-channel arrays a call needs (names: "a_name and b_name"), checked: neither is None."""
    if a is None or b is None:
        raise TypeError(f"{names} must be arrays of shape (C,), got None")
    return 0


cpdef int together(object running_mean, object running_var, bint written) except -1:
    """The running statistics are both arrays or both None; when the call writes them (written), apart."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (both arrays or both None)")
    if written and running_mean is not None:
        stats_distinct((("running_mean", running_mean), ("running_var", running_var)))
    return 0


cdef bint spans_apart(cnp.ndarray a, cnp.ndarray b):
    """The byte spans of a and b (non-empty) are disjoint: they share no byte (the quick test; see stats_distinct)."""
    cdef Py_ssize_t lo_a, hi_a, lo_b, hi_b
    span(a, &lo_a, &hi_a)
    span(b, &lo_b, &hi_b)
    return hi_a <= lo_b or hi_b <= lo_a


cdef void span(cnp.ndarray a, Py_ssize_t* lo, Py_ssize_t* hi):
    """[lo, hi): the addresses of a's bytes (a non-empty)."""
    cdef Py_ssize_t p = <Py_ssize_t>cnp.PyArray_DATA(a), l = p, h = p + cnp.PyArray_ITEMSIZE(a), d, s
    cdef int k
    for k in range(cnp.PyArray_NDIM(a)):
        d, s = cnp.PyArray_DIMS(a)[k] - 1, cnp.PyArray_STRIDES(a)[k]
        if s < 0:
            l += d * s
        else:
            h += d * s
    lo[0], hi[0] = l, h


cdef bint overlaps_itself(cnp.ndarray a):
    """Whether two elements of a share a byte (a zero-stride view from numpy.broadcast_to or as_strided). A vector: a
    stride shorter than an element; more dims (rare for statistics): the elements' byte offsets, sorted, an element
    apart (with |strides|: a negative stride only reflects its axis)."""
    cdef int k, nd = cnp.PyArray_NDIM(a)
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(a)
    if nd == 1:
        return cnp.PyArray_DIMS(a)[0] > 1 and abs(cnp.PyArray_STRIDES(a)[0]) < item
    offsets = np.zeros(1, np.int64)
    for k in range(nd):
        if cnp.PyArray_DIMS(a)[k] > 1:
            offsets = (offsets[:, None] + np.arange(cnp.PyArray_DIMS(a)[k], dtype=np.int64)
                       * abs(cnp.PyArray_STRIDES(a)[k])).ravel()
    offsets.sort()
    return bool((np.diff(offsets) < item).any())


cpdef int stats_distinct(tuple named) except -1:
    """The statistics of `named`, (name, array or None) pairs a call updates, share no byte (one written over another
    would mix their values): byte spans apart, or else no byte in common (numpy.shares_memory: interleaved views of
    one buffer are apart); nor does any overlap itself (its channels would be written over each other)."""
    cdef Py_ssize_t i, j
    for i in range(len(named)):
        a = named[i][1]
        if isinstance(a, np.ndarray) and (<cnp.ndarray>a).size > 1 and overlaps_itself(<cnp.ndarray>a):
            raise ValueError(f"{named[i][0]} must not overlap itself (strides {a.strides} for {a.dtype.itemsize}-byte "
                             f"elements, as a view of numpy.broadcast_to): the call writes each of its elements "
                             f"(pass a separate array)")
        for j in range(i):
            a, b = named[j][1], named[i][1]
            if (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.size and b.size
                    and not spans_apart(a, b) and np.shares_memory(a, b)):
                raise ValueError(f"{named[i][0]} must not share memory with {named[j][0]}: the call updates both "
                                 f"(pass separate arrays)")
    return 0


cdef int load(object obj, int64_t n, double* dst) except -1:
    """The n elements of float ndarray obj (any float dtype, byte order or strides; C order), as float64 into dst."""
    cdef cnp.ndarray a = <cnp.ndarray>obj
    cdef const float* f
    cdef const double* d
    cdef int64_t i
    # (local data pointers: a loop reading through PyArray_DATA in its body is not vectorised, the compiler must
    # assume that the stores to dst change the array object)
    if _plain(a):
        if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
            f = <const float*>cnp.PyArray_DATA(a)
            for i in range(n):
                dst[i] = f[i]
        else:
            d = <const double*>cnp.PyArray_DATA(a)
            for i in range(n):
                dst[i] = d[i]
        return 0
    cdef cnp.ndarray b = np.ascontiguousarray(bf16_widened(a), dtype=np.float64)
    if n:
        memcpy(dst, cnp.PyArray_DATA(b), n * sizeof(double))
    return 0


cdef int store(object obj, int64_t n, const double* src) except -1:
    """The n values of src into float ndarray obj (C order), rounded to its dtype."""
    cdef cnp.ndarray a = <cnp.ndarray>obj
    cdef float* f
    cdef double* d
    cdef int64_t i
    cdef cnp.npy_intp n1 = n
    if _plain(a):
        if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
            f = <float*>cnp.PyArray_DATA(a)
            for i in range(n):
                f[i] = <float>src[i]
        else:
            d = <double*>cnp.PyArray_DATA(a)
            for i in range(n):
                d[i] = src[i]
        return 0
    values = cnp.PyArray_SimpleNewFromData(1, &n1, cnp.NPY_FLOAT64, <void*>src)
    # bfloat16 bits: bf16_bits; float16, long double, byte-swapped or strided: NumPy's assignment casts, silently as
    # the loop above rounds (under np.errstate(all="raise") an overflow or underflow of the cast raised after the
    # kernel had written its outputs, with some running statistics stored and others not)
    with np.errstate(all="ignore"):
        obj[...] = bf16_bits(values) if a.dtype is _BITS else values
    return 0


cdef int group_stat(object v, str name, int64_t N, int64_t G, str what, double* dst) except -1:
    """A saved group statistic: N * G floats shaped (N, G), read as float64 into dst."""
    if v is None:
        raise TypeError(f"{name} must be an array of shape ({N}, {G}), got None")
    a = _to_ndarray(v, name)
    if not _is_float(a.dtype):
        raise TypeError(f"{name} must have a floating-point dtype, got {a.dtype}")
    if a.shape != (N, G):
        raise ValueError(f"{name} must have shape ({N}, {G}) ({what} of x), got shape {a.shape}")
    return load(a, N * G, dst)


cdef int64_t num_groups(object G, int64_t C) except -1:
    """The number of groups: an int >= 1 dividing C."""
    if isinstance(G, bool) or not isinstance(G, numbers.Integral):
        raise TypeError(f"num_groups must be an int, got {type(G).__name__}")
    g = int(G)
    if g < 1:
        raise ValueError(f"num_groups must be >= 1, got {g}")
    if g > C and (C > 0 or g >= 2**31):  # (zero channels: any count divides them, up to the layers' limit of 2**31;
        # more would ask for statistics of N g values)
        raise ValueError(f"num_groups ({g}) must divide the number of channels of x ({C})"
                         + (" and be < 2**31" if C == 0 else ""))
    if C % g != 0:
        raise ValueError(f"num_groups ({g}) must divide the number of channels of x ({C})")
    return g


cdef int group_values(int64_t n, cnp.ndarray x) except -1:
    if n == 1:  # (PyTorch's check: one sample of one channel per group at one position)
        raise ValueError(f"Expected more than 1 value per group when training, got input of shape {(<object>x).shape}")
    return 0


# ---- scalars ------------------------------------------------------------------------------------------------

cdef double eps(object e, str name="eps") except? -1.0:
    """eps as a double: a real number, finite and > 0 (name: the argument's, for the errors)."""
    cdef double v
    if type(e) is float:
        v = PyFloat_AS_DOUBLE(e)
        if isfinite(v) and v > 0.0:
            return v
    if isinstance(e, bool) or not isinstance(e, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(e)}")
    v = as_float(e, name, "a finite number > 0")
    if not (isfinite(v) and v > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {e!r}")
    return v


cdef double momentum(object m) except? -1.0:
    """momentum as a double in [0, 1] (None refused: the functional calls do not count batches)."""
    cdef double v
    if type(m) is float:
        v = PyFloat_AS_DOUBLE(m)
        if 0.0 <= v <= 1.0:
            return v
    return _momentum(m, False)


cdef double momentum_if(object m, bint used) except? -1.0:
    """momentum(m) where the call updates running statistics (used); elsewhere (eval, no running statistics) PyTorch
    ignores its value, so only its type is checked (a real number) and 0 returned."""
    if used:
        return momentum(m)
    if m is None or isinstance(m, bool) or not isinstance(m, numbers.Real):
        raise TypeError(f"momentum must be a real number, got {_describe(m)}")
    return 0.0


cdef double _momentum(object m, bint allow_none) except? -1.0:
    cdef double v
    if m is None:
        raise ValueError("momentum=None (cumulative average) needs the batch count: use a BatchNorm layer, "
                         "or pass momentum = 1 / batches_seen")
    if isinstance(m, bool) or not isinstance(m, numbers.Real):
        raise TypeError(f"momentum must be a real number in [0, 1]{' or None' if allow_none else ''}, "
                        f"got {_describe(m)}")
    v = as_float(m, "momentum", "in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m!r}")
    return v


cdef double count(object n, bint positive) except? -1.0:
    """A number of values n (a whole number > 0, or >= 0 unless positive; an int or an integral float) as a
    double."""
    cdef double v
    if (not isinstance(n, bool) and isinstance(n, (int, float, np.integer, np.floating))
            and (n > 0 if positive else n >= 0)):
        try:
            v = float(n)
            if isfinite(v) and v == floor(v):
                return v
        except OverflowError:
            pass
    if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)):
        raise TypeError(f"n must be a whole number of values {'> 0' if positive else '>= 0'} (an int or an integral "
                        f"float), got {_describe(n)}")
    raise ValueError(f"n must be a whole number of values {'> 0' if positive else '>= 0'}, got {n!r}")


cdef object dtype_arg(object dtype, int* code):
    """The np.dtype of a dtype argument (parameters, coefficients): float32 or float64 (None: float32, the default,
    as PyTorch's and Keras' None); code = its DT_* code."""
    if dtype is None:
        dtype = SUPPORTED_DTYPES[0]
    try:
        dt = np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in SUPPORTED_DTYPES:
        hint = ""
        if _is_bf16(dt) or (dt.kind == "f" and dt.itemsize == 2):
            hint = (" (float16 and bfloat16 data go through a layer of float32 parameters, PyTorch's mixed rule: the "
                    f"layers take them as they are, with y in x's dtype; the calls that take them: {HALF_CALLS})")
        raise TypeError(f"dtype must be float32 or float64, got {dt}{hint}")
    code[0] = DT_F32 if dt == SUPPORTED_DTYPES[0] else DT_F64
    return dt


# ---- outputs ------------------------------------------------------------------------------------------------

cdef cnp.ndarray new_like(cnp.ndarray x):
    if cnp.PyArray_TYPE(x) == cnp.NPY_UINT16:  # (bfloat16 bits: the new array keeps the tag)
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.NPY_UINT16, 0).view(_BITS)
    return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.PyArray_TYPE(x), 0)


cdef cnp.ndarray new_vector(int64_t n, int npy_type):
    cdef cnp.npy_intp n1 = n
    return cnp.PyArray_EMPTY(1, &n1, npy_type, 0)


cdef cnp.ndarray output(object out, cnp.ndarray x, cnp.ndarray grad_out):
    """The output array: new when out is None, else out checked against data tensor x (and grad_out, when the
    kernel reads it too)."""
    if out is None:
        return new_like(x)
    return _out(out, x, "out", "x", x, "grad_out", grad_out)


cdef cnp.ndarray output_apart(object out, str name, cnp.ndarray x, tuple reads):
    """A second output: new like data tensor x when out is None, else out checked as ``out`` is (x's shape and dtype,
    C-contiguous, aligned, writeable), sharing no byte with any array of reads, a tuple of (name, array or None)
    pairs (the arrays the kernel reads, and its other outputs): no in-place form."""
    if out is None:
        return new_like(x)
    cdef cnp.ndarray o = _out(out, x, name, None, None, None, None)
    for rname, a in reads:
        if a is not None and cnp.PyArray_NBYTES(o) and cnp.PyArray_NBYTES(<cnp.ndarray>a) and not _disjoint(o, a):
            raise ValueError(f"{name} must not share memory with {rname} (pass a separate array)")
    return o


cdef inline bint _disjoint(cnp.ndarray a, cnp.ndarray b):
    cdef char* pa = <char*>cnp.PyArray_DATA(a)
    cdef char* pb = <char*>cnp.PyArray_DATA(b)
    return pa + cnp.PyArray_NBYTES(a) <= pb or pb + cnp.PyArray_NBYTES(b) <= pa


cdef bint _in_place_or_disjoint(cnp.ndarray out, cnp.ndarray a):
    """out is a itself element for element (same data, same strides on the axes of more than one element: a stride
    of an axis of one element never moves), or shares no byte with it (a C-contiguous)."""
    cdef int k
    if cnp.PyArray_DATA(out) != cnp.PyArray_DATA(a):
        return _disjoint(out, a)
    for k in range(cnp.PyArray_NDIM(out)):
        if cnp.PyArray_DIM(out, k) > 1 and cnp.PyArray_STRIDE(out, k) != cnp.PyArray_STRIDE(a, k):
            return False
    return True


cdef cnp.ndarray _out(object out, cnp.ndarray like, str name, str name1, cnp.ndarray read1, str name2,
                      cnp.ndarray read2):
    """out must match like's shape and dtype, be C-contiguous, aligned and writeable, and either be each array the
    kernel reads (read1, read2: C-contiguous, or None) element for element (in place) or share no byte with it."""
    cdef cnp.ndarray o
    cdef int k, nd = cnp.PyArray_NDIM(like)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {_describe(out)}")
    o = <cnp.ndarray>out
    cdef bint same = cnp.PyArray_NDIM(o) == nd
    for k in range(nd if same else 0):
        same = same and cnp.PyArray_DIM(o, k) == cnp.PyArray_DIM(like, k)
    if not same:
        raise ValueError(f"{name} must have shape {(<object>like).shape}, got {(<object>o).shape}")
    if cnp.PyArray_TYPE(o) != cnp.PyArray_TYPE(like):
        raise TypeError(f"{name} must have dtype {like.dtype} (the dtype of the input), got {o.dtype}")
    if not cnp.PyArray_ISNOTSWAPPED(o):  # (a byte-swapped input is read through a native copy; outputs are native)
        raise TypeError(f"{name} must be in the machine's byte order ({like.dtype.newbyteorder('=')}), got "
                        f"{o.dtype.str} (byte-swapped: the kernels write native values)")
    if not cnp.PyArray_IS_C_CONTIGUOUS(o):
        raise ValueError(f"{name} must be C-contiguous")
    if not cnp.PyArray_ISALIGNED(o):
        raise ValueError(f"{name} must be aligned to its element size, got an unaligned view")
    if not cnp.PyArray_ISWRITEABLE(o):
        raise ValueError(f"{name} must be writeable, got a read-only array")
    if read1 is not None and not _in_place_or_disjoint(o, read1):
        _overlap(name, name1)
    if read2 is not None and not _in_place_or_disjoint(o, read2):
        _overlap(name, name2)
    return o


cdef int _overlap(str name, str read) except -1:
    raise ValueError(f"{name} overlaps {read} partially; pass {read} itself for in-place operation or a separate "
                     f"array")


# ---- for the Python modules ---------------------------------------------------------------------------------

def as_float(v, name, what):
    """float(v) of a real number v (checked by the caller); ValueError "name must be what" for an integer beyond
    float's range (float() raises OverflowError, which names no argument)."""
    try:
        return float(v)
    except OverflowError:
        raise ValueError(f"{name} must be {what}, got an integer too large for a float") from None


def bf16_bits(a):
    """The float64 array a (any shape) as bfloat16 bits (BF16_BITS), each value rounded once to nearest even
    (half.h; NumPy has no bfloat16, and a cast through float32 would round twice)."""
    cdef cnp.ndarray src = np.ascontiguousarray(a, dtype=np.float64)
    cdef cnp.ndarray h = np.empty((<object>src).shape, np.uint16)
    cdef const double* s = <const double*>cnp.PyArray_DATA(src)
    cdef uint16_t* hp = <uint16_t*>cnp.PyArray_DATA(h)
    cdef int64_t i
    for i in range(cnp.PyArray_SIZE(src)):
        hp[i] = bn_bf16_from_f64(s[i])
    return h.view(_BITS)


def is_bf16(dt):
    """dt is bfloat16: ml_dtypes' dtype, or its bits as BF16_BITS."""
    return dt is _BITS or _is_bf16(dt)


def bf16_widened(a):
    """ndarray a as float32 when it holds bfloat16 (ml_dtypes' dtype, or its bits as BF16_BITS: the top half of a
    float32), widened exactly; else a itself."""
    if a.dtype is _BITS:
        return (np.ascontiguousarray(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if _is_bf16(a.dtype):
        return a.astype(np.float32)
    return a


def check_layout(layout):
    """"NCHW" or "NHWC" for a layout name or alias."""
    if type(layout) is Axis:
        raise TypeError(f"layout must be a string, one of {sorted(LAYOUTS)}, got {_describe(layout)}")
    return LAYOUT_NAMES[layout_code(layout)]


def check_axis(axis, layout="NCHW"):
    """axis as an int (a channel axis, negative allowed); the layout beside it must be the default "NCHW" (the two
    are exclusive ways to say where the channels are)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {_describe(axis)}")
    if not (type(layout) is str and layout == "NCHW"):
        raise ValueError(f"axis and layout are exclusive: give the channel axis by one of them, got axis={axis!r} "
                         f"and layout={layout!r}")
    a = int(axis)
    if not -MAX_RANK <= a < MAX_RANK:
        raise ValueError(f"axis must be in [-{MAX_RANK}, {MAX_RANK - 1}] (arrays of 1 to {MAX_RANK} dimensions), "
                         f"got {a}")
    return a


def axis_layout(axis, layout="NCHW"):
    """The layout argument of the bridge's batch-norm calls for channels on `axis` (see check_axis): an Axis token."""
    # (the common call, without the ABC checks)
    if type(axis) is int and type(layout) is str and layout == "NCHW" and -MAX_RANK <= axis < MAX_RANK:
        return _AXES[axis + MAX_RANK]
    return _AXES[check_axis(axis, layout) + MAX_RANK]


def as_data(x, name="x", half=False):
    """A data tensor as a native-endian, C-contiguous float32/float64 ndarray (x itself, or one copy); half: float16
    and bfloat16 too."""
    return data(x, name, half)


def per_channel(v, name, C, *, inplace=False, of="x"):
    """A length-C floating-point vector (any float dtype) as an ndarray, or None (see channel; of: what sets C)."""
    return channel(v, name, C, inplace, of)


def first_per_channel(v, name):
    """The first per-channel argument of a call without data (its length sets C), checked as the others; None
    refused."""
    return first_channel(v, name)


def to_ndarray(obj, name):
    return _to_ndarray(obj, name)


def check_eps(e, name="eps"):
    return eps(e, name)


def check_momentum(m, allow_none):
    """momentum as a float in [0, 1], or None when allow_none (a layer's cumulative average)."""
    if m is None and allow_none:
        return None
    return _momentum(m, allow_none)


def check_flag(v, name):
    """v as a bool (what Python's bool() takes); an array of several values, which bool() refuses, raises TypeError
    naming the argument."""
    try:
        return bool(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a bool, got {_describe(v)}") from None


def check_dtype(dtype):
    """A dtype for parameters or coefficients: float32 or float64."""
    cdef int code
    return dtype_arg(dtype, &code)


def check_groups(G, C):
    return num_groups(G, C)


cpdef int stats_apart(object out, tuple named) except -1:
    """A training call writes its output before it updates the statistics of `named`, (name, array or None) pairs
    (running_mean, running_var, ...): out (None, or the output array) must share no byte with them. Bounds, as
    numpy.may_share_memory: a strided statistic whose span covers part of out is refused too. The statistics must
    also share no byte with each other (stats_distinct)."""
    stats_distinct(named)
    return out_apart(out, named)


cdef int out_apart(object out, tuple named) except -1:
    """stats_apart's check of out alone, for calls whose statistics passed stats_distinct already (together)."""
    if not isinstance(out, np.ndarray):  # (None, or not an output at all: the call's own checks say so)
        return 0
    for name, a in named:
        if isinstance(a, np.ndarray) and a.size and np.may_share_memory(out, a):
            raise ValueError(stats_overlap_message(name))
    return 0


def stats_overlap_message(name):
    return (f"out must not share memory with {name} (their memory spans overlap), which the call updates after "
            f"writing out (pass a separate array)")


def check_out(out, like, reads, name="out"):
    """out checked against array `like` (shape, dtype) and the (name, array) pairs of `reads` (see _out)."""
    reads = list(reads) + [(None, None)] * (2 - len(reads))
    return _out(out, like, name, reads[0][0], reads[0][1], reads[1][0], reads[1][1])


def check_layer_input(x, ranks, what, num_features, layout, axis=None, half=False):
    """A layer's input: a data tensor (see data; half: float16 and bfloat16 too) of one of `ranks` (None: any) with
    num_features channels on the layout's channel axis (checked for ranks 2 to 5), or on `axis` when it is not None
    (ranks 1 to MAX_RANK); num_features None: any number of channels."""
    a = <object>data(x, "x", half)
    if ranks is not None and a.ndim not in ranks:
        raise ValueError(f"{what} expects {' or '.join(f'{r}-D' for r in ranks)} input, got {a.ndim}-D input of "
                         f"shape {a.shape}")
    if axis is not None:
        if not 1 <= a.ndim <= MAX_RANK or not -a.ndim <= axis < a.ndim:
            raise ValueError(f"{what} with axis={axis} expects input of 1 to {MAX_RANK} dimensions that has that "
                             f"axis, got shape {a.shape}")
        if num_features is not None and a.shape[axis] != num_features:
            raise ValueError(f"x must have {num_features} channels on axis {axis}, got {a.shape[axis]} in shape "
                             f"{a.shape}")
        return a
    if num_features is not None and 2 <= a.ndim <= 5:
        C = a.shape[1] if layout == "NCHW" else a.shape[a.ndim - 1]
        if C != num_features:
            axis = "1" if layout == "NCHW" else "-1"
            raise ValueError(f"x must have {num_features} channels on axis {axis} (layout {layout!r}), "
                             f"got {C} in shape {a.shape}")
    return a


def data_view(x, layout, name="x"):
    """(a, outer, C, inner, axis): data tensor x as an ndarray (see data), its (outer, C, inner) view in `layout` (a
    layout name or an Axis token; checked as the kernels check it) and the index of its channel axis."""
    cdef View v
    cdef cnp.ndarray a = data(x, name)
    cdef int code = layout_code(layout), nd = cnp.PyArray_NDIM(a)
    view(a, code, name, &v)
    cdef int ax = 1 if code == NCHW else nd - 1 if code == NHWC else code - AXIS_BASE
    if ax < 0:  # (view checked that -nd <= ax < nd)
        ax += nd
    return a, v.outer, v.C, v.inner, ax


# ---- layer norm and RMS norm ----------------------------------------------------------------------------------

cdef tuple _normalized(object ns):
    """normalized_shape as a tuple of ints >= 0: an int is a 1-tuple; a tuple, list, torch.Size or array of ints as
    its elements; at least one dim."""
    if type(ns) is int or (isinstance(ns, numbers.Integral) and not isinstance(ns, bool)):
        t = (int(ns),)
    elif isinstance(ns, (str, bytes, bool)) or not hasattr(ns, "__iter__"):
        raise TypeError(f"normalized_shape must be an int or a tuple of ints, got {_describe(ns)}")
    else:
        try:
            t = tuple(ns)
        except TypeError:  # (a 0-d array has __iter__, and refuses it)
            raise TypeError(f"normalized_shape must be an int or a tuple of ints, got {_describe(ns)}") from None
    for d in t:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"normalized_shape must be an int or a tuple of ints, got {ns!r}")
        if d < 0:
            raise ValueError(f"normalized_shape must have sizes >= 0, got {ns!r}")
    if len(t) == 0:
        raise ValueError("normalized_shape must have at least one dimension, got ()")
    return tuple(int(d) for d in t)


cdef int rows_view(cnp.ndarray x, object normalized_shape, object layout, Rows* r) except -1:
    """The (N, C, S) view of x for layer / RMS norm. layout None (or "NHWC"): normalized_shape are x's trailing dims,
    N the product of the others, S = 1. "NCHW" (or "channels_first"): normalised over axis 1 of (N, C, *spatial),
    normalized_shape C (an int or a 1-tuple), S = prod(spatial)."""
    cdef int nd = cnp.PyArray_NDIM(x), k, i, lay = -1
    cdef int64_t n = 1, c = 1
    if type(normalized_shape) is int and layout is None and nd >= 1 \
            and normalized_shape == cnp.PyArray_DIM(x, nd - 1) and normalized_shape >= 0:
        # (the common call: one trailing dim, given as an int)
        for k in range(nd - 1):
            n *= cnp.PyArray_DIM(x, k)
        r.N, r.C, r.S, r.lead, r.cf, r.dtype = n, normalized_shape, 1, nd - 1, 0, _dtype_code(x)
        return 0
    if (isinstance(normalized_shape, tuple) or isinstance(normalized_shape, list)) and layout is None \
            and 1 <= len(normalized_shape) <= nd:
        # (the layers' call: a tuple (or list) of ints, x's trailing dims; anything else takes the checks below)
        k = len(normalized_shape)
        for i in range(k):
            d = normalized_shape[i]
            if type(d) is not int or d != cnp.PyArray_DIM(x, nd - k + i):
                break
            c *= <int64_t>d
        else:
            for i in range(nd - k):
                n *= cnp.PyArray_DIM(x, i)
            r.N, r.C, r.S, r.lead, r.cf, r.dtype = n, c, 1, nd - k, 0, _dtype_code(x)
            return 0
        c = 1
    ns = _normalized(normalized_shape)
    if layout is not None:
        if not isinstance(layout, str):
            raise TypeError(f"layout must be None or a string, one of {sorted(LAYOUTS)}, got {_describe(layout)}")
        lay = layout_code(layout)
    shape = (<object>x).shape
    if lay == NCHW:
        if len(ns) != 1:
            raise ValueError(f"normalized_shape must be the number of channels C (an int) with layout={layout!r}, "
                             f"got {normalized_shape!r}")
        if nd < 2 or shape[1] != ns[0]:
            raise ValueError(f"x must have shape [N, {ns[0]}, *] for normalized_shape={list(ns)} and "
                             f"layout={layout!r}, got {nd}-D input of shape {list(shape)}")
        s = 1
        for k in range(2, nd):
            s *= shape[k]
        r.N, r.C, r.S, r.lead, r.cf, r.dtype = shape[0], ns[0], s, 1, 1, _dtype_code(x)
        return 0
    if lay == NHWC and len(ns) != 1:
        raise ValueError(f"normalized_shape must be the number of channels C (an int) with layout={layout!r}, "
                         f"got {normalized_shape!r}")
    k = len(ns)
    if nd < k or tuple(shape[nd - k:]) != ns:
        raise ValueError(f"x must have shape [*, {', '.join(str(d) for d in ns)}] for normalized_shape={list(ns)}, "
                         f"got {nd}-D input of shape {list(shape)}")
    for d in ns:
        c *= d
    for i in range(nd - k):
        n *= shape[i]
    r.N, r.C, r.S, r.lead, r.cf, r.dtype = n, c, 1, nd - k, 0, _dtype_code(x)
    return 0


cdef int stat_dims(cnp.ndarray x, Rows* r, cnp.npy_intp* dims) noexcept:
    """The shape of the saved statistics into dims (x's rank of them, which it returns): x's leading dims then ones
    (channels-first: x's shape with C -> 1)."""
    cdef int nd = cnp.PyArray_NDIM(x), i
    for i in range(nd):
        dims[i] = cnp.PyArray_DIM(x, i) if (i != 1 if r.cf else i < r.lead) else 1
    return nd


cdef tuple stat_shape(cnp.ndarray x, Rows* r):
    """The shape of the saved statistics: x's leading dims then ones (channels-first: x's shape with C -> 1)."""
    cdef cnp.npy_intp dims[64]  # (NPY_MAXDIMS of NumPy 2; x's rank at most)
    cdef int nd = stat_dims(x, r, dims), i
    return tuple([dims[i] for i in range(nd)])


cdef object row_param(object v, str name, cnp.ndarray x, Rows* r):
    """weight / bias of layer / RMS norm as a 1-D ndarray of C floats (any float dtype), or None: shaped as
    normalized_shape (x's trailing dims; channels-first (C,)), or (C,)."""
    cdef cnp.ndarray a
    cdef int t
    if v is None:
        return None
    if type(v) is cnp.ndarray:
        a = <cnp.ndarray>v
        t = cnp.PyArray_TYPE(a)
        if (t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64) and cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_DIM(a, 0) == r.C:
            return a
    b = _to_ndarray(v, name)
    if not _is_float(b.dtype):
        raise TypeError(f"{name} must have a floating-point dtype, got {b.dtype}")
    want = (r.C,) if r.cf else tuple((<object>x).shape[r.lead:])
    if b.shape != want and b.shape != (r.C,):
        raise ValueError(f"{name} must have shape {want} (normalized_shape), got shape {b.shape}")
    return b.reshape(r.C)


cdef int row_stat(object v, str name, cnp.ndarray x, Rows* r, double* dst) except -1:
    """A saved statistic of layer / RMS norm (mean, rstd): N S floats shaped as the forward returns them (or without
    the trailing ones), read as float64 into dst."""
    cdef cnp.ndarray p
    cdef int k, nd = cnp.PyArray_NDIM(x)
    cdef bint same
    if type(v) is cnp.ndarray and _plain(<cnp.ndarray>v) and cnp.PyArray_NDIM(<cnp.ndarray>v) == nd:
        # (the statistics as the forward returned them: checked dim by dim, no tuple built)
        p = <cnp.ndarray>v
        same = True
        for k in range(nd):
            if r.cf:
                same = same and cnp.PyArray_DIM(p, k) == (1 if k == 1 else cnp.PyArray_DIM(x, k))
            else:
                same = same and cnp.PyArray_DIM(p, k) == (cnp.PyArray_DIM(x, k) if k < r.lead else 1)
        if same:
            return load(p, r.N * r.S, dst)
    if type(v) is cnp.ndarray and _plain(<cnp.ndarray>v) and cnp.PyArray_NDIM(<cnp.ndarray>v) == 1 \
            and cnp.PyArray_DIM(<cnp.ndarray>v, 0) == r.N * r.S:
        return load(v, r.N * r.S, dst)
    if v is None:
        raise TypeError(f"{name} must be an array of shape {stat_shape(x, r)}, got None")
    a = _to_ndarray(v, name)
    if not _is_float(a.dtype):
        raise TypeError(f"{name} must have a floating-point dtype, got {a.dtype}")
    want = stat_shape(x, r)
    if (a.shape != want and a.shape != want[:r.lead] and a.shape != (r.N * r.S,)) or a.size != r.N * r.S:
        raise ValueError(f"{name} must have shape {want}, got shape {a.shape}")
    return load(a.reshape(r.N * r.S), r.N * r.S, dst)
