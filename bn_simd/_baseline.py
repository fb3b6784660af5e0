"""Plain-NumPy batch norm: the speed baseline of the benchmarks and the self-check's reference.

Written the way a NumPy user would (vectorised ufuncs, broadcasting, the input's dtype); ``dtype=float64``
arguments turn it into the float64 reference used by ``python -m bn_simd``.
"""
import numpy as np


def _axes_shape(x, layout):
    c_axis = 1 if layout == "NCHW" else x.ndim - 1
    axes = tuple(i for i in range(x.ndim) if i != c_axis)
    shape = [1] * x.ndim
    shape[c_axis] = x.shape[c_axis]
    return axes, tuple(shape)


def forward_train(x, weight=None, bias=None, eps=1e-5, layout="NCHW", dtype=None):
    """(y, mean, biased var) with batch statistics, computed in ``dtype`` (default: x's)."""
    x = np.asarray(x, dtype=dtype)
    axes, shape = _axes_shape(x, layout)
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if weight is not None:
        y = y * np.asarray(weight, x.dtype).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, x.dtype).reshape(shape)
    return y, mean.reshape(-1), var.reshape(-1)


def inference(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, layout="NCHW", dtype=None):
    """y = x * alpha + beta with alpha = weight / sqrt(running_var + eps), beta = bias - running_mean * alpha."""
    x = np.asarray(x, dtype=dtype)
    _, shape = _axes_shape(x, layout)
    alpha = 1.0 / np.sqrt(np.asarray(running_var, x.dtype) + eps)
    if weight is not None:
        alpha = alpha * np.asarray(weight, x.dtype)
    beta = -np.asarray(running_mean, x.dtype) * alpha
    if bias is not None:
        beta = beta + np.asarray(bias, x.dtype)
    return x * alpha.reshape(shape) + beta.reshape(shape)


def backward(grad_out, x, mean, invstd, weight=None, layout="NCHW", dtype=None):
    """(grad_x, grad_weight, grad_bias) of training-mode batch norm."""
    x = np.asarray(x, dtype=dtype)
    dy = np.asarray(grad_out, dtype=x.dtype)
    axes, shape = _axes_shape(x, layout)
    n = x.size // x.shape[1 if layout == "NCHW" else -1]
    s = np.asarray(invstd, x.dtype).reshape(shape)
    xhat = (x - np.asarray(mean, x.dtype).reshape(shape)) * s
    gb = dy.sum(axis=axes)
    gw = (dy * xhat).sum(axis=axes)
    w = np.ones(shape, x.dtype) if weight is None else np.asarray(weight, x.dtype).reshape(shape)
    gx = w * s * (dy - gb.reshape(shape) / n - xhat * gw.reshape(shape) / n)
    return gx, gw, gb
