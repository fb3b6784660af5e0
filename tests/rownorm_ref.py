"""Float64 NumPy references for layer norm and RMS norm, and the error bounds the parity tests apply.

Nothing here imports bn_simd, torch or pytest. A call's trailing dims (normalized_shape) form a row of n values; the
leading dims are the M rows:

    layer norm:  mean = sum x / n,  var = sum (x - mean)^2 / n,  rstd = 1 / sqrt(var + eps)
                 xhat = (x - mean) rstd,  y = xhat w + b
    RMS norm:    rstd = 1 / sqrt(sum x^2 / n + eps),  xhat = x rstd,  y = xhat w

Backward, with gh = dy w (w = 1 when absent) and row means <.> over the n values of a row:
    layer norm:  dx = rstd (gh - <gh> - xhat <gh xhat>)
    RMS norm:    dx = rstd (gh - xhat <gh xhat>)
    dw = sum over rows of dy xhat,  db = sum over rows of dy
"""
import math

import numpy as np


def _shape(normalized_shape):
    return (int(normalized_shape),) if np.ndim(normalized_shape) == 0 else tuple(int(d) for d in normalized_shape)


def rows(x, normalized_shape):
    """x (float64) as an (M, n) matrix of rows."""
    n = math.prod(_shape(normalized_shape))
    return np.asarray(x, dtype=np.float64).reshape(-1, n)


def stat_shape(x_shape, normalized_shape):
    """The shape of PyTorch's mean / rstd: the leading dims, then a 1 per normalized dim."""
    k = len(_shape(normalized_shape))
    return tuple(x_shape[:len(x_shape) - k]) + (1,) * k


def _param(p, n):
    return None if p is None else np.asarray(p, dtype=np.float64).reshape(n)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """(y, mean, rstd) in float64; mean and rstd shaped as PyTorch's."""
    xr = rows(x, normalized_shape)
    n = xr.shape[1]
    mean = xr.mean(axis=1, keepdims=True) if xr.size else np.zeros((xr.shape[0], 1))
    var = np.square(xr - mean).mean(axis=1, keepdims=True) if xr.size else np.zeros((xr.shape[0], 1))
    rstd = 1.0 / np.sqrt(var + eps)
    y = (xr - mean) * rstd
    w, b = _param(weight, n), _param(bias, n)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    s = stat_shape(np.shape(x), normalized_shape)
    return y.reshape(np.shape(x)), mean.reshape(s), rstd.reshape(s)


def rms_norm(x, normalized_shape, weight=None, eps=None, dtype=None):
    """(y, rstd) in float64; eps None is the machine epsilon of dtype (x's dtype when not given)."""
    if eps is None:
        eps = float(np.finfo(dtype or np.asarray(x).dtype).eps)
    xr = rows(x, normalized_shape)
    n = xr.shape[1]
    ms = np.square(xr).mean(axis=1, keepdims=True) if xr.size else np.zeros((xr.shape[0], 1))
    rstd = 1.0 / np.sqrt(ms + eps)
    y = xr * rstd
    w = _param(weight, n)
    if w is not None:
        y = y * w
    return y.reshape(np.shape(x)), rstd.reshape(stat_shape(np.shape(x), normalized_shape))


def _backward(dy, x, normalized_shape, weight, xhat, rstd, centred):
    n = xhat.shape[1]
    g = rows(dy, normalized_shape)
    w = _param(weight, n)
    gh = g * w if w is not None else g
    inner = (gh * xhat).mean(axis=1, keepdims=True)
    dx = gh - xhat * inner
    if centred:
        dx = dx - gh.mean(axis=1, keepdims=True)
    dx = dx * rstd
    dw = (g * xhat).sum(axis=0).reshape(_shape(normalized_shape))
    db = g.sum(axis=0).reshape(_shape(normalized_shape))
    return dx.reshape(np.shape(x)), dw, db


def layer_norm_backward(dy, x, normalized_shape, weight=None, eps=1e-5):
    """(dx, dw, db) in float64 of y = layer_norm(x) against dy (dw and db whether or not the layer has them)."""
    xr = rows(x, normalized_shape)
    _, mean, rstd = layer_norm(x, normalized_shape, eps=eps)
    rstd = rstd.reshape(-1, 1)
    xhat = (xr - mean.reshape(-1, 1)) * rstd
    return _backward(dy, x, normalized_shape, weight, xhat, rstd, True)


def rms_norm_backward(dy, x, normalized_shape, weight=None, eps=None, dtype=None):
    """(dx, dw) in float64 of y = rms_norm(x) against dy."""
    xr = rows(x, normalized_shape)
    _, rstd = rms_norm(x, normalized_shape, eps=eps, dtype=dtype)
    rstd = rstd.reshape(-1, 1)
    dx, dw, _ = _backward(dy, x, normalized_shape, weight, xr * rstd, rstd, False)
    return dx, dw


# ---- bounds -------------------------------------------------------------------------------------------------------

def units(dtype, n):
    """Relative error of a result computed in `dtype` from sums of n terms, by either library: a few roundings of
    the element-wise step, and a sum of n terms (float64 in bn_simd; PyTorch sums float32 data in float32, pairwise
    or in SIMD lanes, so its error grows like sqrt(n) ulps of the sum). 16 + 2 sqrt(n) ulps covers both."""
    return float(np.finfo(dtype).eps) * (16.0 + 2.0 * math.sqrt(max(n, 1)))


def _row_terms(x, xr, normalized_shape, eps, dtype, rms):
    """(rstd, |xhat|, |mean| rstd) of the rows xr of x, as columns: the magnitudes the bounds below scale."""
    if rms:
        _, rstd = rms_norm(x, normalized_shape, eps=eps, dtype=dtype)
        rstd = rstd.reshape(-1, 1)
        xhat, cond = np.abs(xr * rstd), 0.0
    else:
        _, mean, rstd = layer_norm(x, normalized_shape, eps=eps)
        rstd = rstd.reshape(-1, 1)
        xhat = np.abs((xr - mean.reshape(-1, 1)) * rstd)
        cond = np.abs(mean.reshape(-1, 1)) * rstd
    return rstd, xhat, cond


def forward_bound(x, normalized_shape, weight=None, bias=None, eps=1e-5, dtype=np.float32, rms=False):
    """Element-wise bound on |y - y_ref|: units(dtype, n) of |w| (1 + |xhat| + |mean| rstd) + |b| (the mean's error
    scaled by rstd enters through every element of the row)."""
    xr = rows(x, normalized_shape)
    n = xr.shape[1]
    rstd, xhat, cond = _row_terms(x, xr, normalized_shape, eps, dtype, rms)
    w = np.abs(_param(weight, n)) if weight is not None else 1.0
    b = np.abs(_param(bias, n)) if bias is not None else 0.0
    return (units(dtype, n) * (w * (1.0 + xhat + cond) + b)).reshape(np.shape(x))


def backward_bounds(dy, x, normalized_shape, weight=None, eps=1e-5, dtype=np.float32, rms=False):
    """Bounds on |dx - dx_ref| (element-wise) and on |dw - dw_ref|, |db - db_ref| (per column): units(dtype, n) of
    the magnitudes of the terms, the parameter gradients' sums over M rows adding their own sqrt(M) ulps."""
    xr = rows(x, normalized_shape)
    M, n = xr.shape
    rstd, xhat, cond = _row_terms(x, xr, normalized_shape, eps, dtype, rms)
    g = np.abs(rows(dy, normalized_shape))
    w = np.abs(_param(weight, n)) if weight is not None else 1.0
    gh = g * w
    u = units(dtype, n)
    dx = u * rstd * (gh + gh.mean(axis=1, keepdims=True)
                     + (1.0 + xhat + cond) * (gh * (1.0 + xhat + cond)).mean(axis=1, keepdims=True))
    uM = u + float(np.finfo(dtype).eps) * 2.0 * math.sqrt(max(M, 1))
    dw = (uM * (g * (1.0 + xhat + cond)).sum(axis=0)).reshape(_shape(normalized_shape))
    db = (uM * g.sum(axis=0)).reshape(_shape(normalized_shape))
    return dx.reshape(np.shape(x)), dw, db


def assert_within(actual, expected, bound, what="value"):
    """|actual - expected| <= bound element-wise (NaN fails), with the worst element in the message."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), err.shape)
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / np.where(bound > 0, bound, np.inf), -1)), err.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.size} out of bound; at {tuple(map(int, i))}: got "
                             f"{actual[i]!r}, expected {expected[i]!r}, |diff| {err[i]:.3g} > {bound[i]:.3g}")
