"""Float64 NumPy oracles for the ops of the test registry (tests/ops.py), written from the formulas.

Nothing here imports bn_simd, so an oracle shares no code (and no bug) with the library under test. Each op's
section computes its outputs in float64 from the definition, and the magnitudes against which the library's
rounding errors are measured (tests/bounds.py turns them into bounds).

Batch normalization. Every function moves the channel axis to the front, flattens the other axes into one of
length n (giving a (C, n) matrix) and computes in float64:

    mean[c]  = sum_i x[c, i] / n
    var[c]   = sum_i (x[c, i] - mean[c])^2 / n                      (biased: used to normalise)
    y[c, i]  = (x[c, i] - mean[c]) / sqrt(var[c] + eps) * w[c] + b[c]
    running  = (1 - momentum) * running + momentum * batch          (unbiased var n / (n - 1) by default)

Backward with s = invstd[c], xhat = (x - mean) * s, sums over i:
    db = sum dy,  dw = sum dy * xhat
    dx = w s (dy - db / n - xhat dw / n)     (training: the batch statistics depend on x)
    dx = w s dy                              (training=False: the statistics are constants)

The steps: sum_dy = sum dy, sum_dyx = sum dy (x - mean) for a given mean; backward_apply's
dx = a dy + b (x - mean) + d for given per-channel a, b, d.

Through a fused epilogue z = act(y + residual), with u = y + residual and dz = dL/dz:
    du = dz act'(u)      (the residual's gradient, and the dy of the normalisation's backward)
"""
import math

import numpy as np

LAYOUTS = {"NCHW": "NCHW", "channels_first": "NCHW", "NHWC": "NHWC", "channels_last": "NHWC"}


def channel_axis(layout, ndim):
    return 1 if LAYOUTS[layout] == "NCHW" else ndim - 1


def num_channels(shape, layout):
    return shape[channel_axis(layout, len(shape))]


def reduction_size(shape, layout):
    """n: the number of values per channel."""
    C = num_channels(shape, layout)
    return math.prod(shape) // C if C else 0


def to_cn(a, layout):
    """(C, n) float64 copy of a, channels first."""
    a = np.asarray(a, dtype=np.float64)
    ax = channel_axis(layout, a.ndim)
    return np.moveaxis(a, ax, 0).reshape(a.shape[ax], -1).copy()


def from_cn(m, shape, layout):
    """Inverse of to_cn: a (C, n) matrix back to `shape` in `layout`."""
    ax = channel_axis(layout, len(shape))
    moved = (shape[ax],) + tuple(s for i, s in enumerate(shape) if i != ax)
    return np.moveaxis(np.asarray(m).reshape(moved), 0, ax)


def per_channel(v, C, default):
    """A float64 vector of length C, `default` everywhere when v is None."""
    if v is None:
        return np.full(C, float(default))
    return np.asarray(v, dtype=np.float64).reshape(C)


def stats(x, layout="NCHW"):
    """(mean, biased var, n) per channel, two-pass in float64."""
    xc = to_cn(x, layout)
    n = xc.shape[1]
    mean = xc.sum(axis=1) / n
    var = np.square(xc - mean[:, None]).sum(axis=1) / n
    return mean, var, n


def normalize(x, mean, var, weight=None, bias=None, eps=1e-5, layout="NCHW"):
    """y with given per-channel statistics (float64)."""
    xc = to_cn(x, layout)
    C = xc.shape[0]
    mean, var = per_channel(mean, C, 0), per_channel(var, C, 1)
    scale = per_channel(weight, C, 1) / np.sqrt(var + eps)
    y = (xc - mean[:, None]) * scale[:, None] + per_channel(bias, C, 0)[:, None]
    return from_cn(y, np.shape(x), layout)


def forward_train(x, weight=None, bias=None, eps=1e-5, layout="NCHW"):
    """Training forward: (y, mean, biased var), all float64."""
    mean, var, _ = stats(x, layout)
    return normalize(x, mean, var, weight, bias, eps, layout), mean, var


def inference(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, layout="NCHW"):
    """Eval forward with the running statistics (float64)."""
    return normalize(x, running_mean, running_var, weight, bias, eps, layout)


def invstd(var, eps=1e-5):
    return 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)


def update_running(running_mean, running_var, mean, var, n, momentum, unbiased=True):
    """New (running_mean, running_var) in float64 after one batch of n values per channel."""
    v = np.asarray(var, dtype=np.float64)
    if unbiased:
        v = v * (n / (n - 1))
    rm = (1.0 - momentum) * np.asarray(running_mean, np.float64) + momentum * np.asarray(mean, np.float64)
    rv = (1.0 - momentum) * np.asarray(running_var, np.float64) + momentum * v
    return rm, rv


running_update = update_running


class RunningStats:
    """The running statistics of a layer over several batches, PyTorch's rules, in float64.

    momentum=None is the cumulative average: the k-th tracked batch gets the factor 1 / k.
    An empty batch counts as tracked but leaves the statistics as they are.
    """

    def __init__(self, C, momentum=0.1, unbiased=True):
        self.mean = np.zeros(C)
        self.var = np.ones(C)
        self.num_batches_tracked = 0
        self.momentum = momentum
        self.unbiased = unbiased

    def update(self, x, layout="NCHW"):
        self.num_batches_tracked += 1
        if reduction_size(np.shape(x), layout) == 0:
            return
        mean, var, n = stats(x, layout)
        factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
        self.mean, self.var = update_running(self.mean, self.var, mean, var, n, factor, self.unbiased)


def backward(dy, x, mean, inv_std, weight=None, layout="NCHW", training=True):
    """(dx, dw, db) in float64 given the saved per-channel mean and invstd."""
    xc, gc = to_cn(x, layout), to_cn(dy, layout)
    C, n = xc.shape
    w = per_channel(weight, C, 1)
    mean, s = per_channel(mean, C, 0), per_channel(inv_std, C, 1)
    xhat = (xc - mean[:, None]) * s[:, None]
    db = gc.sum(axis=1)
    dw = (gc * xhat).sum(axis=1)
    if training:
        dx = (w * s)[:, None] * (gc - db[:, None] / n - xhat * dw[:, None] / n)
    else:
        dx = (w * s)[:, None] * gc
    return from_cn(dx, np.shape(x), layout), dw, db


def backward_magnitudes(dy, x, mean, inv_std, weight=None, layout="NCHW", training=True):
    """Magnitudes against which the rounding errors of the backward are measured.

    Returns (dx_scale, dw_scale, db_scale): dx_scale is, per element, the sum of the absolute values of
    the three terms of dx = w s dy - w s db / n - w s xhat dw / n (an implementation rounds each one
    separately); dw_scale and db_scale are sum |dy xhat| and sum |dy| per channel (the condition of the
    two sums).
    """
    xc, gc = to_cn(x, layout), to_cn(dy, layout)
    C, n = xc.shape
    w = np.abs(per_channel(weight, C, 1))
    mean, s = per_channel(mean, C, 0), per_channel(inv_std, C, 1)
    xhat = (xc - mean[:, None]) * s[:, None]
    db = gc.sum(axis=1)
    dw = (gc * xhat).sum(axis=1)
    dw_scale = np.abs(gc * xhat).sum(axis=1)
    db_scale = np.abs(gc).sum(axis=1)
    terms = np.abs(gc)
    if training and n:
        terms = terms + np.abs(db)[:, None] / n + np.abs(xhat * dw[:, None]) / n
    dx_scale = (w * s)[:, None] * terms
    return from_cn(dx_scale, np.shape(x), layout), dw_scale, db_scale


def backward_sums(dy, x, mean, layout="NCHW"):
    """(sum dy, sum dy (x - mean[c])) per channel and their magnitudes (sum |dy|, sum |dy (x - mean[c])|)."""
    xc, gc = to_cn(x, layout), to_cn(dy, layout)
    C = xc.shape[0]
    t = gc * (xc - per_channel(mean, C, 0)[:, None])
    return gc.sum(axis=1), t.sum(axis=1), np.abs(gc).sum(axis=1), np.abs(t).sum(axis=1)


def backward_apply(dy, x, mean, a, b, d, layout="NCHW"):
    """dx = a dy + b (x - mean) + d per channel, and its magnitude |a dy| + |b (x - mean)| + |d|."""
    xc, gc = to_cn(x, layout), to_cn(dy, layout)
    C = xc.shape[0]
    a, b, d = (per_channel(v, C, 0)[:, None] for v in (a, b, d))
    t = (a * gc, b * (xc - per_channel(mean, C, 0)[:, None]), np.broadcast_to(d, xc.shape))
    shape = np.shape(x)
    return from_cn(t[0] + t[1] + t[2], shape, layout), from_cn(np.abs(t[0]) + np.abs(t[1]) + np.abs(t[2]), shape,
                                                               layout)


def mean_abs(x, layout="NCHW"):
    """mean |x| per channel (0 for an empty channel): the size of the terms of the mean's sum."""
    xc = to_cn(x, layout)
    return np.abs(xc).mean(axis=1) if xc.shape[1] else np.zeros(xc.shape[0])



def backward_carry(err, x, mean, inv_std, weight=None, layout="NCHW", training=True):
    """How far backward's (dx, dw, db) can move when each element of dy moves by at most err (an array shaped like
    dy, >= 0): they are linear in dy, so db by sum err, dw by sum err |xhat|, and dx = w s (dy - db / n - xhat dw / n)
    by |w s| (err + sum err / n + |xhat| sum(err |xhat|) / n) (|w s| err for training=False)."""
    ec = to_cn(err, layout)
    xc = to_cn(x, layout)
    C, n = xc.shape
    s = per_channel(inv_std, C, 1)
    xh = np.abs(xc - per_channel(mean, C, 0)[:, None]) * np.abs(s)[:, None]
    eb, ew = ec.sum(axis=1), (ec * xh).sum(axis=1)
    ex = ec
    if training and n:
        ex = ec + eb[:, None] / n + xh * ew[:, None] / n
    return from_cn(np.abs(per_channel(weight, C, 1) * s)[:, None] * ex, np.shape(x), layout), ew, eb


# ---- the backward through a fused epilogue z = act(y + residual) ---------------------------------------------------
# u = y + residual is recomputed from x; du = dz act'(u) is the residual's gradient and the normalisation's dy.

def act_backward(act, u, dz):
    """du = dz act'(u) in float64 for act "relu", "silu", ("leaky_relu", a), "relu6" or ("clamp", lo, hi). relu: 0
    where u <= 0 (the kink included), else dz (u +Inf and NaN included), as PyTorch's relu backward
    (threshold_backward); selected rather than multiplied (an infinite dz where relu is flat gives 0); silu:
    act'(u) = s (1 + u (1 - s)), s = 1 / (1 + exp(-u)) (NaN for infinite u, as u / (1 + exp(-u))'s)."""
    u, dz = np.asarray(u, np.float64), np.asarray(dz, np.float64)
    if act == "relu6":
        act = ("clamp", 0.0, 6.0)
    if act == "relu":
        return np.where(u <= 0, 0.0, dz)
    if act == "silu":
        s = 1.0 / (1.0 + np.exp(-u))
        return dz * (s * (1.0 + u * (1.0 - s)))
    if isinstance(act, tuple) and act[0] == "leaky_relu":  # (slope a where u <= 0, multiplied)
        return np.where(u > 0, dz, dz * act[1])
    if isinstance(act, tuple) and act[0] == "clamp":  # (dz inside (lo, hi), 0 outside, selected)
        return np.where((u > act[1]) & (u < act[2]), dz, 0.0)
    raise ValueError(f"act_backward: no oracle for activation {act!r}")

# ---- group norm (instance norm: one channel per group) ---------------------------------------------------------
# x in the canonical layout (N, C, *spatial); statistics per (sample, group) of C / G consecutive channels.

def _grouped(a, G):
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape[0], G, (a.shape[1] // G if G else 0) * math.prod(a.shape[2:]))


def group_stats(x, G):
    """(mean, biased var) of shape (N, G) in float64, and the number of values per group."""
    xg = _grouped(x, G)
    n = xg.shape[2]
    if n == 0:
        return np.full(xg.shape[:2], np.nan), np.full(xg.shape[:2], np.nan), 0
    return xg.mean(axis=2), xg.var(axis=2), n


def _channel_shape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def group_forward(x, G, weight=None, bias=None, eps=1e-5, mean=None, var=None):
    """(y, xhat, mean, var) in float64; mean and var (N, G) default to the batch's."""
    if mean is None:
        mean, var, _ = group_stats(x, G)
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    xg = _grouped(x, G)
    xhat = ((xg - mean[..., None]) / np.sqrt(var[..., None] + eps)).reshape(x.shape)
    C = x.shape[1]
    w = per_channel(weight, C, 1.0).reshape(_channel_shape(x))
    b = per_channel(bias, C, 0.0).reshape(_channel_shape(x))
    return xhat * w + b, xhat, mean, var


def group_backward(dy, x, mean, invstd, G, weight=None):
    """(dx, dw, db) and their magnitudes (dx_scale, dw_scale, db_scale) in float64, given the saved (N, G) mean and
    invstd: dx = s (w dy - sum_g(w dy) / M - xhat sum_g(w dy xhat) / M) per (sample, group) of M values."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    N, C = x.shape[:2]
    s = np.asarray(invstd, np.float64).reshape(N, G, 1)
    xhat = (_grouped(x, G) - np.asarray(mean, np.float64).reshape(N, G, 1)) * s
    w = per_channel(weight, C, 1.0).reshape(_channel_shape(x))
    wdy = _grouped(dy * w, G)
    M = xhat.shape[2]
    A, B = wdy.sum(axis=2, keepdims=True), (wdy * xhat).sum(axis=2, keepdims=True)
    As, Bs = np.abs(wdy).sum(axis=2, keepdims=True), np.abs(wdy * xhat).sum(axis=2, keepdims=True)
    Mm = max(M, 1)
    dx = (s * (wdy - A / Mm - xhat * B / Mm)).reshape(x.shape)
    dx_scale = (np.abs(s) * (np.abs(wdy) + np.abs(A) / Mm + np.abs(xhat * B) / Mm)).reshape(x.shape)
    dx_sums = (np.abs(s) / Mm * (As + np.abs(xhat) * Bs)).reshape(x.shape)  # the sums' float64 error carried
    axes = (0,) + tuple(range(2, x.ndim))
    xh = xhat.reshape(x.shape)
    db, dw = dy.sum(axis=axes), (dy * xh).sum(axis=axes)
    return (dx, dw, db), (dx_scale, dx_sums, np.abs(dy * xh).sum(axis=axes), np.abs(dy).sum(axis=axes))



def group_backward_carry(err, x, mean, invstd, G, weight=None):
    """How far group_backward's (dx, dw, db) can move when each element of dy moves by at most err (shaped like dy,
    >= 0; as backward_carry): with e = |w| err, a group's sums A and B by sum e and sum e |xhat|, dx by
    |s| (e + sum e / M + |xhat| sum(e |xhat|) / M), dw by sum err |xhat| and db by sum err over samples and
    positions."""
    x, err = np.asarray(x, np.float64), np.asarray(err, np.float64)
    N, C = x.shape[:2]
    s = np.abs(np.asarray(invstd, np.float64)).reshape(N, G, 1)
    xh = np.abs(_grouped(x, G) - np.asarray(mean, np.float64).reshape(N, G, 1)) * s
    e = _grouped(err * np.abs(per_channel(weight, C, 1.0)).reshape(_channel_shape(x)), G)
    M = max(xh.shape[2], 1)
    ex = s * (e + e.sum(axis=2, keepdims=True) / M + xh * (e * xh).sum(axis=2, keepdims=True) / M)
    axes = (0,) + tuple(range(2, x.ndim))
    return ex.reshape(x.shape), (err * xh.reshape(x.shape)).sum(axis=axes), err.sum(axis=axes)

def central_difference(f, a, h=1e-6, relative=False):
    """d f / d a by central differences in float64: f maps an array shaped like a to a float, and element i of the
    result is (f(a + h_i e_i) - f(a - h_i e_i)) / 2 h_i, with h_i = h, or h max(1, |a_i|) when relative (for arrays
    that mix large and small values). For the small arrays of gradient oracles."""
    a = np.asarray(a, np.float64)
    out = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        hi = h * max(1.0, abs(a[i])) if relative else h
        ap, am = a.copy(), a.copy()
        ap[i] += hi
        am[i] -= hi
        out[i] = (f(ap) - f(am)) / (2 * hi)
    return out
