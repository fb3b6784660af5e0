"""Group normalization and instance normalization on NumPy arrays, with PyTorch's names and semantics.

Group norm splits the C channels into ``num_groups`` groups of C / num_groups consecutive channels and normalises
each (sample, group) over its channels and all spatial positions; instance norm is group norm with one channel per
group (each (sample, channel) over its spatial positions). The affine weight and bias are per channel.

Layouts as in :mod:`bn_simd.functional`: ``layout="NCHW"`` has channels on axis 1, ``"NHWC"`` last. Data arrays are
float32 or float64; statistics are computed in float64 (shifted chunk sums, merged in a fixed order), bitwise the
same for any thread count. Saved statistics (mean, invstd) have shape (N, num_groups) for group norm and (N, C) for
instance norm, in x's dtype, as PyTorch returns them.
"""
import numbers

import numpy as np

from . import _checks as ck
from . import _core
from .functional import _normalize, _output, _threads, update_running_stats


def _prepare(x, layout, ranks, what):
    """x as a C-contiguous array, its layout, (N, C, S) and the 3-D view the kernels take."""
    layout = ck.check_layout(layout)
    x = ck.as_data(x, "x")
    if x.ndim not in ranks:
        form = "(N, C, *spatial)" if layout == "NCHW" else "(N, *spatial, C)"
        raise ValueError(f"{what} expects x of {' or '.join(str(r) for r in ranks)} dimensions {form} for layout "
                         f"{layout!r}, got {x.ndim} dimension(s) with shape {x.shape}")
    N = x.shape[0]
    C = x.shape[1] if layout == "NCHW" else x.shape[-1]
    S = int(np.prod(x.shape[2:] if layout == "NCHW" else x.shape[1:-1], dtype=np.int64))
    return x, layout, (N, C, S)


def _view(a, layout, dims):
    N, C, S = dims
    return a.reshape((N, C, S) if layout == "NCHW" else (N, S, C))


def _check_groups(num_groups, C):
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}")
    G = int(num_groups)
    if G < 1:
        raise ValueError(f"num_groups must be >= 1, got {G}")
    if C % G != 0:
        raise ValueError(f"num_groups ({G}) must divide the number of channels of x ({C})")
    return G


def _stats_arg(v, name, N, G, what):
    """A saved statistic: an array of N * G floats, shaped (N, G) (or anything of that size), as float64."""
    if v is None:
        raise TypeError(f"{name} must be an array of shape ({N}, {G}), got None")
    a = ck._to_ndarray(v, name)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating-point dtype, got {a.dtype}")
    if a.shape != (N, G):
        raise ValueError(f"{name} must have shape ({N}, {G}) ({what} of x), got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float64).reshape(N * G)


def _forward(x, layout, dims, G, w, b, eps, out):
    N, C, S = dims
    y = _output(out, x, [("x", x)])
    mean = np.empty(N * G, np.float64)
    var = np.empty(N * G, np.float64)
    _core.group_forward(_view(x, layout, dims), _view(y, layout, dims), G, layout == "NHWC", ck.f64(w), ck.f64(b),
                        eps, mean, var, _threads())
    return y, mean, var


def _backward(grad_out, x, mean, invstd, G, weight, layout, dims, out):
    N, C, S = dims
    dy = ck.as_data(grad_out, "grad_out")
    ck.check_same_shape(dy, "grad_out", x, "x")
    w = ck.per_channel(weight, "weight", C)
    dx = _output(out, x, [("x", x), ("grad_out", dy)])
    gw = np.zeros(C, np.float64)
    gb = np.zeros(C, np.float64)
    _core.group_backward(_view(dy, layout, dims), _view(x, layout, dims), _view(dx, layout, dims), G,
                         layout == "NHWC", mean, invstd, ck.f64(w), gw, gb, _threads())
    gdtype = w.dtype if w is not None else x.dtype
    return dx, gw.astype(gdtype), gb.astype(gdtype)


# ---- group norm ---------------------------------------------------------------------------------------------

def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, layout="NCHW", out=None):
    """Group normalization (``torch.nn.functional.group_norm``).

    y = (x - mean[n, g]) / sqrt(var[n, g] + eps) * weight[c] + bias[c], with mean and the biased var of sample n's
    channels c of group g = c // (C / num_groups), over those channels and every spatial position.

    Parameters
    ----------
    x : ndarray, float32 or float64, rank 2..5 in ``layout`` ((N, C) or (N, C, *spatial); NHWC (N, *spatial, C)).
    num_groups : int >= 1 dividing C.
    weight, bias : array (C,) or None (1 and 0).
    eps : float > 0.
    out : ndarray shaped and typed like x, C-contiguous; may be x itself (in place).

    Returns y. Raises TypeError for wrong types/dtypes, ValueError for wrong shapes or values (a num_groups that
    does not divide C included); a call that raises writes nothing.
    """
    return group_norm_forward(x, num_groups, weight, bias, eps=eps, layout=layout, out=out)[0]


def group_norm_forward(x, num_groups, weight=None, bias=None, *, eps=1e-5, layout="NCHW", out=None):
    """Group-norm forward for callers that run their own autograd: returns (y, mean, invstd), mean and
    invstd = 1 / sqrt(var + eps) of shape (N, num_groups) in x's dtype, for :func:`group_norm_backward`."""
    x, layout, dims = _prepare(x, layout, (2, 3, 4, 5), "group_norm")
    N, C, S = dims
    G = _check_groups(num_groups, C)
    w = ck.per_channel(weight, "weight", C)
    b = ck.per_channel(bias, "bias", C)
    eps = ck.check_eps(eps)
    if N * (C // G) * S == 1:  # (PyTorch's check: one sample of one channel per group at one position)
        raise ValueError(f"Expected more than 1 value per group when training, got input of shape {x.shape}")
    y, mean, var = _forward(x, layout, dims, G, w, b, eps, out)
    invstd = 1.0 / np.sqrt(var + eps)
    return y, mean.reshape(N, G).astype(x.dtype), invstd.reshape(N, G).astype(x.dtype)


def group_norm_backward(grad_out, x, mean, invstd, num_groups, weight=None, *, layout="NCHW", out=None):
    """Gradients of group normalization.

    With M = (C / num_groups) * prod(spatial) values per group, s = invstd[n, g], w = weight[c] (1 when None),
    x̂ = (x - mean[n, g]) s:
        grad_bias[c]   = sum over n and positions of grad_out
        grad_weight[c] = sum over n and positions of grad_out * x̂
        grad_x         = s (w grad_out - mean_group(w grad_out) - x̂ mean_group(w grad_out x̂))

    mean, invstd: (N, num_groups), as :func:`group_norm_forward` returns them. Returns (grad_x, grad_weight,
    grad_bias); the per-channel gradients have weight's dtype (x's when weight is None). ``out`` receives grad_x
    and may be grad_out or x itself.
    """
    x, layout, dims = _prepare(x, layout, (2, 3, 4, 5), "group_norm_backward")
    N, C, S = dims
    G = _check_groups(num_groups, C)
    m = _stats_arg(mean, "mean", N, G, "N by num_groups")
    s = _stats_arg(invstd, "invstd", N, G, "N by num_groups")
    return _backward(grad_out, x, m, s, G, weight, layout, dims, out)


# ---- instance norm ------------------------------------------------------------------------------------------

def _check_spatial(S, shape):
    if S <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input of shape {tuple(shape)}")


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1,
                  eps=1e-5, *, layout="NCHW", out=None):
    """Instance normalization (``torch.nn.functional.instance_norm``).

    use_input_stats=True: each (sample, channel) is normalised with its own mean and biased variance over the
    spatial positions; running_mean / running_var, when given, are updated in place with their batch averages
    (``running = (1 - momentum) running + momentum mean_n(stat)``, the variance unbiased), as PyTorch does.
    use_input_stats=False: the running statistics (both required) normalise every sample, as batch norm's eval.

    x : ndarray, float32 or float64, rank 3..5 ((N, C, *spatial); NHWC (N, *spatial, C)). Other arguments as
    :func:`bn_simd.batch_norm`. Raises ValueError for one spatial element when use_input_stats is True.
    """
    x, layout, dims = _prepare(x, layout, (3, 4, 5), "instance_norm")
    N, C, S = dims
    rm = ck.per_channel(running_mean, "running_mean", C, inplace=bool(use_input_stats))
    rv = ck.per_channel(running_var, "running_var", C, inplace=bool(use_input_stats))
    if (rm is None) != (rv is None):
        raise ValueError("running_mean and running_var must be given together (both arrays or both None)")
    w = ck.per_channel(weight, "weight", C)
    b = ck.per_channel(bias, "bias", C)
    eps = ck.check_eps(eps)
    momentum = ck.check_momentum(momentum, allow_none=False)
    if not use_input_stats:
        if rm is None:
            raise ValueError("running_mean and running_var are required when use_input_stats=False")
        y = _output(out, x, [("x", x)])
        _normalize(x, y, ck.canonical_view(x.shape, layout), ck.f64(rm), ck.f64(rv), w, b, eps)
        return y
    _check_spatial(S, x.shape)
    y, mean, var = _forward(x, layout, dims, C, w, b, eps, out)
    if rm is not None and N > 0:
        update_running_stats(rm, rv, mean.reshape(N, C).mean(axis=0),
                             (var * (S / (S - 1))).reshape(N, C).mean(axis=0), S, momentum, unbiased=False)
    return y


def instance_norm_forward(x, weight=None, bias=None, *, eps=1e-5, layout="NCHW", out=None):
    """Instance-norm forward with the input's statistics: returns (y, mean, invstd), both (N, C) in x's dtype,
    for :func:`instance_norm_backward`."""
    x, layout, dims = _prepare(x, layout, (3, 4, 5), "instance_norm_forward")
    N, C, S = dims
    w = ck.per_channel(weight, "weight", C)
    b = ck.per_channel(bias, "bias", C)
    eps = ck.check_eps(eps)
    _check_spatial(S, x.shape)
    y, mean, var = _forward(x, layout, dims, C, w, b, eps, out)
    invstd = 1.0 / np.sqrt(var + eps)
    return y, mean.reshape(N, C).astype(x.dtype), invstd.reshape(N, C).astype(x.dtype)


def instance_norm_backward(grad_out, x, mean, invstd, weight=None, *, layout="NCHW", out=None):
    """Gradients of instance normalization with the input's statistics: :func:`group_norm_backward` with one
    channel per group. mean, invstd: (N, C). Returns (grad_x, grad_weight, grad_bias)."""
    x, layout, dims = _prepare(x, layout, (3, 4, 5), "instance_norm_backward")
    N, C, S = dims
    m = _stats_arg(mean, "mean", N, C, "N by C")
    s = _stats_arg(invstd, "invstd", N, C, "N by C")
    return _backward(grad_out, x, m, s, C, weight, layout, dims, out)
