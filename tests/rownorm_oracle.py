"""The float64 NumPy oracle of layer norm and RMS norm, and the bounds their results are held to.

Everything works on rows: an array of shape (R, D), each row one position's D normalised values (the trailing dims
flattened; channels-first input moved to (N, *spatial, C) first, see to_rows). Written from the definitions:

    layer norm  mean = sum x / D, var = sum (x - mean)^2 / D, rstd = 1 / sqrt(var + eps), xhat = (x - mean) rstd,
                y = xhat w + b;  backward with g = dy w:  dx = rstd (g - sum g / D - xhat sum(g xhat) / D),
                dw = sum over rows of dy xhat, db = sum over rows of dy
    RMS norm    rstd = 1 / sqrt(sum x^2 / D + eps), xhat = x rstd, y = xhat w;  dx = rstd (g - xhat sum(g xhat) / D),
                dw = sum over rows of dy xhat
"""
import numpy as np

import bounds


def to_rows(a, k=1, channels_first=False):
    """a (float64) as rows: its last k dims flattened into the row (channels-first: axis 1 moved last, k = 1)."""
    a = np.asarray(a, np.float64)
    if channels_first:
        a = np.moveaxis(a, 1, -1)
    return a.reshape(-1, int(np.prod(a.shape[a.ndim - k:], dtype=np.int64)) if a.ndim else 1)


def from_rows(r, shape, channels_first=False):
    """Rows back to an array of `shape` (the inverse of to_rows)."""
    if channels_first:
        moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
        return np.moveaxis(r.reshape(moved), -1, 1)
    return r.reshape(shape)


def _param(p, D, default):
    return np.full(D, default) if p is None else np.asarray(p, np.float64).reshape(D)


def forward(x, weight=None, bias=None, eps=1e-5, rms=False):
    """(y, xhat, mean, rstd) of rows x (float64; mean zeros for RMS norm)."""
    x = np.asarray(x, np.float64)
    R, D = x.shape
    w, b = _param(weight, D, 1.0), _param(bias, D, 0.0)
    if rms:
        mean = np.zeros(R)
        var = (x * x).mean(axis=1) if D else np.full(R, np.nan)
    else:
        mean = x.mean(axis=1) if D else np.full(R, np.nan)
        var = ((x - mean[:, None]) ** 2).mean(axis=1) if D else np.full(R, np.nan)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean[:, None]) * rstd[:, None]
    return xhat * w + (0.0 if rms else b), xhat, mean, rstd


def backward(dy, x, mean, rstd, weight=None, rms=False):
    """(dx, dw, db) of rows, with the given per-row mean (ignored for RMS norm) and rstd, and the magnitudes the
    bounds scale with: (dx_elem, dx_sums, dw_scale, db_scale)."""
    dy, x = np.asarray(dy, np.float64), np.asarray(x, np.float64)
    R, D = x.shape
    w = _param(weight, D, 1.0)
    mean = np.zeros(R) if rms else np.asarray(mean, np.float64).reshape(R)
    rstd = np.asarray(rstd, np.float64).reshape(R)
    xhat = (x - mean[:, None]) * rstd[:, None]
    g = dy * w
    A = g.sum(axis=1, keepdims=True)
    B = (g * xhat).sum(axis=1, keepdims=True)
    Dn = max(D, 1)
    s = rstd[:, None]
    dx = s * (g - (0.0 if rms else A / Dn) - xhat * B / Dn)
    dw = (dy * xhat).sum(axis=0)
    db = dy.sum(axis=0)
    ga = np.abs(g)
    As, Bs = ga.sum(axis=1, keepdims=True), (ga * np.abs(xhat)).sum(axis=1, keepdims=True)
    dx_elem = np.abs(s) * (ga + (0.0 if rms else np.abs(A) / Dn) + np.abs(xhat) * (np.abs(B) / Dn + 1e-300))
    dx_sums = np.abs(s) * ((0.0 if rms else As / Dn) + np.abs(xhat) * Bs / Dn)
    return (dx, dw, db), (dx_elem, dx_sums, (np.abs(dy) * np.abs(xhat)).sum(axis=0), np.abs(dy).sum(axis=0))


def normalize(x, mean, rstd, weight=None, bias=None, rms=False):
    """(y, xhat) of rows x with given per-row mean (ignored for RMS norm) and rstd (float64)."""
    x = np.asarray(x, np.float64)
    R, D = x.shape
    m = 0.0 if rms else np.asarray(mean, np.float64).reshape(R, 1)
    xhat = (x - m) * np.asarray(rstd, np.float64).reshape(R, 1)
    return xhat * _param(weight, D, 1.0) + (0.0 if rms else _param(bias, D, 0.0)), xhat


def backward_carry(err, x, mean, rstd, weight=None, rms=False):
    """How far backward's (dx, dw, db) can move when each element of dy moves by at most err (rows like dy, >= 0):
    with e = |w| err, a row's sums A and B by sum e and sum e |xhat|, dx by |rstd| (e + sum e / D + |xhat| sum(e
    |xhat|) / D) (no A term for RMS norm), dw by the column sums of err |xhat| and db by those of err."""
    x, err = np.asarray(x, np.float64), np.asarray(err, np.float64)
    R, D = x.shape
    m = 0.0 if rms else np.asarray(mean, np.float64).reshape(R, 1)
    s = np.abs(np.asarray(rstd, np.float64)).reshape(R, 1)
    xh = np.abs(x - m) * s
    e = err * np.abs(_param(weight, D, 1.0))
    Dn = max(D, 1)
    ex = s * (e + (0.0 if rms else e.sum(axis=1, keepdims=True) / Dn) + xh * (e * xh).sum(axis=1, keepdims=True) / Dn)
    return ex, (err * xh).sum(axis=0), err.sum(axis=0)


def forward_bound(x, xhat, rstd, dtype, weight=None, bias=None, rms=False, mean=None, batch_stats=True):
    """|y - oracle| bound per element: one rounding of each element-wise step of the data's dtype on |w| (1 + |xhat|)
    + |b|, and (batch_stats: the statistics the library computed itself) their float64 error:
    |w| reduction_tol(D) (mean|x| rstd + |xhat|)."""
    R, D = x.shape
    t = bounds.tolerance(dtype, D)
    wa, ba = np.abs(_param(weight, D, 1.0)), np.abs(_param(bias, D, 0.0)) * (not rms)
    cond = (np.abs(x).mean(axis=1, keepdims=True) if D else np.zeros((R, 1))) * np.abs(rstd)[:, None]
    xa = np.abs(xhat)
    # (a row of RMS norm with an infinite value has rstd 0: its finite values give exactly 0, where the magnitudes
    # are inf * 0)
    stats = wa * t.reduction * (cond + xa) if batch_stats else 0.0
    return np.nan_to_num(t.elementwise * (wa * (1.0 + xa) + ba) + stats, nan=0.0)


def backward_bound(mags, dw, db, dtype, D, R, rounding=None):
    """Bounds of (dx, dw, db) from backward's magnitudes (D values per row, R rows): dx one rounding of each
    element-wise step on its terms plus the float64 row sums' error; dw, db the float64 column sums' error (R terms,
    each of a few roundings) plus one rounding to their dtype."""
    dx_elem, dx_sums, dws, dbs = mags
    t = bounds.tolerance(dtype, D)
    r = bounds.eps_of(rounding or dtype)
    cols = bounds.reduction_tol(R) + t.reduction
    return (2 * t.elementwise * dx_elem + t.reduction * dx_sums, cols * dws + r * np.abs(dw),
            cols * dbs + r * np.abs(db))
