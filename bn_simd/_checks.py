"""Argument checking shared by the functional API and the layers.

Every check runs before any kernel or any write, so a call that raises has changed nothing. Messages name
the argument, what was expected and what came.
"""
import math
import numbers

import numpy as np

LAYOUTS = {"NCHW": "NCHW", "NHWC": "NHWC", "channels_first": "NCHW", "channels_last": "NHWC"}
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _describe(obj):
    return type(obj).__name__ if not isinstance(obj, np.ndarray) else f"ndarray of dtype {obj.dtype}"


def _to_ndarray(obj, name):
    """ndarray as it is; array-likes (lists, tensors on the CPU) through np.asarray."""
    if type(obj) is np.ndarray:
        return obj
    if isinstance(obj, np.ndarray):  # a subclass (np.matrix, masked arrays): its data as a plain ndarray
        return np.asarray(obj).view(np.ndarray)
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):  # a torch.Tensor: no autograd, on the CPU
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


def check_layout(layout):
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a string, one of {sorted(LAYOUTS)}, got {_describe(layout)}")
    try:
        return LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}") from None


def as_data(x, name="x"):
    """The data tensor as a native-endian, C-contiguous float32/float64 ndarray.

    A C-contiguous native array is returned as it is (no copy); a non-contiguous, Fortran-ordered,
    negatively strided, broadcast or byte-swapped one is copied once.
    """
    if not isinstance(x, np.ndarray) and str(getattr(x, "dtype", "")) == "torch.bfloat16":
        raise TypeError(f"{name} must have dtype float32 or float64, got torch.bfloat16 (not supported yet)")
    a = _to_ndarray(x, name)
    if a.dtype.kind != "f" or a.dtype.newbyteorder("=") not in SUPPORTED_DTYPES:
        hint = " (float16 is not supported yet)" if a.dtype.kind == "f" and a.dtype.itemsize == 2 else ""
        raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}{hint}")
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if not (a.flags.c_contiguous and a.flags.aligned):
        a = np.array(a, order="C", copy=True)  # a fresh array is aligned
    return a


def canonical_view(shape, layout, name="x"):
    """(outer, C, inner) of a (N, C, *spatial) / (N, *spatial, C) shape; ValueError for ranks not 2..5."""
    if not 2 <= len(shape) <= 5:
        form = "(N, C, *spatial)" if layout == "NCHW" else "(N, *spatial, C)"
        raise ValueError(f"{name} must have 2 to 5 dimensions {form} for layout {layout!r}, "
                         f"got {len(shape)} dimension(s) with shape {tuple(shape)}")
    if layout == "NCHW":
        return shape[0], shape[1], math.prod(shape[2:])
    return math.prod(shape[:-1]), shape[-1], 1


def check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {_describe(eps)}")
    try:
        e = float(eps)
    except OverflowError:
        raise ValueError(f"eps must be a finite number > 0, got an integer too large for a float") from None
    if not (math.isfinite(e) and e > 0.0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return e


def check_momentum(momentum, allow_none):
    if momentum is None:
        if allow_none:
            return None
        raise ValueError("momentum=None (cumulative average) needs the batch count: use a BatchNorm layer, "
                         "or pass momentum = 1 / batches_seen")
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number in [0, 1]{' or None' if allow_none else ''}, "
                        f"got {_describe(momentum)}")
    try:
        m = float(momentum)
    except OverflowError:
        raise ValueError("momentum must be in [0, 1], got an integer too large for a float") from None
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return m


def per_channel(v, name, C, *, inplace=False):
    """A length-C floating-point vector (any float dtype), or None.

    inplace: v is updated in place by the call, so it must be a writeable ndarray.
    """
    if v is None:
        return None
    if inplace:
        if not isinstance(v, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), got {_describe(v)}")
        a = v
    else:
        a = _to_ndarray(v, name)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating-point dtype, got {a.dtype}")
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match the {C} channels of x, got shape {a.shape}")
    if inplace and not a.flags.writeable:
        raise ValueError(f"{name} must be writeable (it is updated in place), got a read-only array")
    return a


def f64(v):
    """A per-channel vector as contiguous float64 for the kernels (None stays None)."""
    return None if v is None else np.require(v, dtype=np.float64, requirements=["C", "A"])


def check_out(out, shape, dtype, reads, name="out"):
    """out must match shape/dtype, be C-contiguous and writeable, and either be one of the arrays the
    kernel reads (element-for-element in place) or not overlap them at all."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {_describe(out)}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the dtype of the input), got {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if not out.flags.aligned:
        raise ValueError(f"{name} must be aligned to its element size, got an unaligned view")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable, got a read-only array")
    for arr_name, arr in reads:
        same = (out.__array_interface__["data"][0] == arr.__array_interface__["data"][0]
                and out.strides == arr.strides)
        if not same and np.may_share_memory(out, arr):
            raise ValueError(f"{name} overlaps {arr_name} partially; pass {arr_name} itself for in-place "
                             f"operation or a separate array")
    return out


def check_train_size(n, shape):
    if n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input of shape {tuple(shape)}")


def check_same_shape(a, a_name, b, b_name):
    if a.shape != b.shape:
        raise ValueError(f"{a_name} must have the shape of {b_name} {b.shape}, got {a.shape}")
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} must have the dtype of {b_name} ({b.dtype}), got {a.dtype}")
