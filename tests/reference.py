"""Independent float64 oracle, written from the batch-norm formulas.

Every function moves the channel axis to the front, flattens the rest to (C, n) and computes in float64.
"""
import numpy as np


def channel_axis(layout, ndim):
    return 1 if layout == "NCHW" else ndim - 1


def to_cn(a, layout):
    """(C, n) float64 copy of a with channels first."""
    a = np.asarray(a, dtype=np.float64)
    return np.moveaxis(a, channel_axis(layout, a.ndim), 0).reshape(a.shape[channel_axis(layout, a.ndim)], -1)


def from_cn(a_cn, shape, layout):
    ax = channel_axis(layout, len(shape))
    moved = [shape[ax]] + [s for i, s in enumerate(shape) if i != ax]
    return np.moveaxis(a_cn.reshape(moved), 0, ax)


def _vec(v, C, default):
    return np.full(C, default, np.float64) if v is None else np.asarray(v, np.float64)


def stats(x, layout="NCHW"):
    """(mean, biased var, n) per channel."""
    xc = to_cn(x, layout)
    n = xc.shape[1]
    mean = xc.sum(axis=1) / n
    var = ((xc - mean[:, None]) ** 2).sum(axis=1) / n
    return mean, var, n


def forward_train(x, weight=None, bias=None, eps=1e-5, layout="NCHW"):
    """(y float64, mean, biased var)."""
    mean, var, _ = stats(x, layout)
    xc = to_cn(x, layout)
    C = xc.shape[0]
    y = (xc - mean[:, None]) / np.sqrt(var[:, None] + eps) * _vec(weight, C, 1)[:, None] + _vec(bias, C, 0)[:, None]
    return from_cn(y, np.shape(x), layout), mean, var


def inference(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, layout="NCHW"):
    xc = to_cn(x, layout)
    C = xc.shape[0]
    rm, rv = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    y = (xc - rm[:, None]) / np.sqrt(rv[:, None] + eps) * _vec(weight, C, 1)[:, None] + _vec(bias, C, 0)[:, None]
    return from_cn(y, np.shape(x), layout)


def running_update(running_mean, running_var, mean, var, n, momentum, unbiased=True):
    """New (running_mean, running_var) in float64."""
    v = var * n / (n - 1) if unbiased else var
    rm = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
    rv = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * v
    return rm, rv


def backward(dy, x, mean, invstd, weight=None, layout="NCHW", training=True):
    """(dx float64, dweight, dbias) given the saved statistics."""
    xc, gc = to_cn(x, layout), to_cn(dy, layout)
    C, n = xc.shape
    w = _vec(weight, C, 1)
    mean, invstd = np.asarray(mean, np.float64), np.asarray(invstd, np.float64)
    xhat = (xc - mean[:, None]) * invstd[:, None]
    db = gc.sum(axis=1)
    dw = (gc * xhat).sum(axis=1)
    if training:
        dx = (w * invstd)[:, None] * (gc - db[:, None] / n - xhat * dw[:, None] / n)
    else:
        dx = (w * invstd)[:, None] * gc
    return from_cn(dx, np.shape(x), layout), dw, db
