"""Plain-NumPy batch norm and group norm: the speed baseline of the benchmarks and the self-check's reference.

Written the way a NumPy user would (vectorised ufuncs, broadcasting, the input's dtype, a fresh array for every
temporary); ``dtype=float64`` arguments turn it into a float64 reference (``python -m bn_simd`` uses the batch-norm
one). Instance norm is group norm with one channel per group (``num_groups = C``).
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


# ---- group norm -----------------------------------------------------------------------------------------------

def _grouped(a, num_groups, layout):
    """(a seen with its groups on an axis of their own, the axes one group's values span, the shape of one
    statistic per (sample, group) broadcast against that view). NCHW: (N, G, C/G * spatial), reduced over axis 2;
    NHWC: (N, spatial, G, C/G), reduced over axes 1 and 3."""
    N, G = a.shape[0], num_groups
    if layout == "NCHW":
        return a.reshape(N, G, -1), (2,), (N, G, 1)
    return a.reshape(N, -1, G, a.shape[-1] // G), (1, 3), (N, 1, G, 1)


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, layout="NCHW", dtype=None):
    """(y, mean, biased var) of group norm, the statistics shaped (N, num_groups), computed in ``dtype``
    (default: x's). Each (sample, group) is normalised over its C / num_groups channels and every position."""
    x = np.asarray(x, dtype=dtype)
    xg, axes, _ = _grouped(x, num_groups, layout)
    mean = xg.mean(axis=axes, keepdims=True)
    var = xg.var(axis=axes, keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
    _, shape = _axes_shape(x, layout)
    if weight is not None:
        y = y * np.asarray(weight, x.dtype).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, x.dtype).reshape(shape)
    return y, mean.reshape(x.shape[0], num_groups), var.reshape(x.shape[0], num_groups)


def group_norm_backward(grad_out, x, mean, invstd, num_groups, weight=None, layout="NCHW", dtype=None):
    """(grad_x, grad_weight, grad_bias) of group norm, from the saved mean and invstd = 1 / sqrt(var + eps) of
    shape (N, num_groups). With g = weight * grad_out and x̂ = (x - mean) invstd, per (sample, group):
    grad_x = invstd (g - mean(g) - x̂ mean(g x̂)); per channel: grad_weight = sum(grad_out x̂),
    grad_bias = sum(grad_out)."""
    x = np.asarray(x, dtype=dtype)
    dy = np.asarray(grad_out, dtype=x.dtype)
    axes, shape = _axes_shape(x, layout)
    xg, gaxes, stat = _grouped(x, num_groups, layout)
    s = np.asarray(invstd, x.dtype).reshape(stat)
    xhat = (xg - np.asarray(mean, x.dtype).reshape(stat)) * s
    dyg, _, _ = _grouped(dy, num_groups, layout)
    gb = dy.sum(axis=axes)
    gw = (dyg * xhat).reshape(x.shape).sum(axis=axes)
    g = dyg if weight is None else _grouped(dy * np.asarray(weight, x.dtype).reshape(shape), num_groups, layout)[0]
    gx = s * (g - g.mean(axis=gaxes, keepdims=True) - xhat * (g * xhat).mean(axis=gaxes, keepdims=True))
    return gx.reshape(x.shape), gw, gb
