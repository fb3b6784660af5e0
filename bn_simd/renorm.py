"""Batch Renormalization (Ioffe, 2017), with the statistics and updates of Keras' ``BatchNormalization(renorm=True)``.

In training, batch renormalization normalises with the batch statistics and then corrects towards moving ones:

    s_B = sqrt(var_B + eps)                                     (var_B the biased batch variance)
    s   = max(renorm_std, sqrt(eps))
    r   = clip(s_B / s, rmin, rmax),   d = clip((mean_B - renorm_mean) / s, -dmax, dmax)
    y   = ((x - mean_B) / s_B * r + d) * weight + bias

r and d are constants for the gradient (the paper's stop_gradient): the backward is batch norm's with the weight
weight·r, and grad_weight = r sum(grad_out x̂) + d sum(grad_out). Eval mode is plain batch norm with the running
(inference) statistics; r = 1 and d = 0 there.

Moving statistics, as Keras keeps them (momentum in this library's convention, ``new = (1 - m) old + m batch``;
Keras' ``momentum=0.99`` and ``renorm_momentum=0.99`` are m = 0.01 here):

    renorm_mean  <- (1 - renorm_momentum) renorm_mean + renorm_momentum mean_B        (the correction's, training)
    renorm_std   <- (1 - renorm_momentum) renorm_std  + renorm_momentum s_B
    running_mean <- (1 - momentum) running_mean + momentum mean_B                     (inference)
    running_std  <- (1 - momentum) running_std  + momentum s_B'
    running_var  <- max(running_std^2 - eps, 0)

with s_B' = s_B, or sqrt(unbiased var_B + eps) when the running variance is unbiased (``unbiased_running_var=True``,
PyTorch's habit for running_var; False is Keras exactly). r and d use the moving statistics from before the update.
Keras initialises renorm_mean = 0 and renorm_std = running_std = sqrt(initial running_var) = 1.

With virtual batches (Keras 2's ``virtual_batch_size``, :mod:`bn_simd.virtual`) each virtual batch is normalised with
its own statistics, and r, d and the updates use the mean over the virtual batches of their means and variances.
"""
import math
import numbers

import numpy as np

from . import _args as ck
from . import _core
from . import functional as F
from .virtual import Split, check_virtual_batch_size, train_backward

_CLIP_KEYS = ("rmax", "rmin", "dmax")


def check_clipping(renorm_clipping):
    """(rmax, rmin, dmax) as floats from Keras' ``renorm_clipping`` dict (None or missing keys: inf, 0, inf).

    Raises TypeError for a non-dict or non-number value and ValueError for unknown keys, NaN, rmax < rmin or
    dmax < 0 (Keras' checks)."""
    if renorm_clipping is None:
        renorm_clipping = {}
    if not isinstance(renorm_clipping, dict):
        raise TypeError(f"renorm_clipping must be a dict with keys among {list(_CLIP_KEYS)} or None, "
                        f"got {type(renorm_clipping).__name__}")
    unknown = sorted(set(renorm_clipping) - set(_CLIP_KEYS), key=str)
    if unknown:
        raise ValueError(f"renorm_clipping has keys {unknown} not among {list(_CLIP_KEYS)}")
    vals = {}
    for k, default in zip(_CLIP_KEYS, (math.inf, 0.0, math.inf)):
        v = renorm_clipping.get(k)
        vals[k] = _bound(k, v, default)
    if vals["rmax"] < vals["rmin"]:
        raise ValueError(f"renorm_clipping needs rmax >= rmin, got rmax={vals['rmax']}, rmin={vals['rmin']}")
    if vals["dmax"] < 0:
        raise ValueError(f"renorm_clipping needs dmax >= 0, got dmax={vals['dmax']}")
    return vals["rmax"], vals["rmin"], vals["dmax"]


def _bound(name, v, default):
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number or None, got {type(v).__name__}")
    v = ck.as_float(v, name, "a real number or None")
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    return v


def check_renorm_momentum(m):
    """renorm_momentum as a float in [0, 1] (this library's convention: the weight of the new batch)."""
    if isinstance(m, bool) or not isinstance(m, numbers.Real):
        raise TypeError(f"renorm_momentum must be a real number in [0, 1], got {type(m).__name__}")
    v = ck.as_float(m, "renorm_momentum", "in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"renorm_momentum must be in [0, 1] (the weight of the new batch; Keras' 0.99 is 0.01 "
                         f"here), got {m!r}")
    return v


def renorm_corrections(mean, var, renorm_mean, renorm_std, *, eps=1e-5, rmax=math.inf, rmin=0.0, dmax=math.inf):
    """The corrections (r, d), float64 arrays (C,), from the batch mean and biased variance and the moving
    renorm_mean and renorm_std (arrays (C,) of a float dtype):

        s = max(renorm_std, sqrt(eps)),  r = clip(sqrt(var + eps) / s, rmin, rmax),
        d = clip((mean - renorm_mean) / s, -dmax, dmax)

    rmax, rmin, dmax: real numbers (or 0-d arrays) as ``renorm_clipping``'s (None: unclipped), with the same
    checks (TypeError, ValueError naming renorm_clipping's key).
    """
    mean = np.asarray(ck.first_per_channel(mean, "mean"), np.float64)
    C = mean.shape[0]
    given = [ck.per_channel(v, name, C, of="mean") for v, name in ((var, "var"), (renorm_mean, "renorm_mean"),
                                                                   (renorm_std, "renorm_std"))]
    for v, name in zip(given, ("var", "renorm_mean", "renorm_std")):
        if v is None:
            raise TypeError(f"{name} must be an array of shape ({C},), got None")
    var, rmean, rstd = (np.asarray(v, np.float64) for v in given)
    # (None: unclipped, as Keras'; a 0-d array or tensor is its number; per-channel bounds are not taken)
    rmax, rmin, dmax = check_clipping({k: float(v) if v is not None and not isinstance(v, (bool, numbers.Real)) and
                                       np.ndim(v) == 0 and hasattr(v, "__float__") else v
                                       for k, v in (("rmax", rmax), ("rmin", rmin), ("dmax", dmax))})
    e = ck.check_eps(eps)
    s = np.maximum(rstd, math.sqrt(e))
    r = np.minimum(np.maximum(np.sqrt(var + e) / s, rmin), rmax)
    d = np.clip((mean - rmean) / s, -dmax, dmax)
    return r, d


def _averaged(split, mean_w, var_w):
    """The mean over the virtual batches of their means and variances (Keras' reduce_mean), float64 (C,)."""
    if split.G == 0:  # an empty batch: no statistics
        return np.full(split.C, np.nan), np.full(split.C, np.nan)
    return mean_w.reshape(split.G, split.C).mean(axis=0), var_w.reshape(split.G, split.C).mean(axis=0)


def _forward(split, renorm_mean, renorm_std, weight, bias, clipping, eps, out):
    """(y, mean, var, r, d): the statistics float64 (G·C,) per virtual batch, r and d (C,)."""
    C = split.C
    out = split.check_out(out, [("x", split.x)])
    w = ck.per_channel(weight, "weight", C)
    b = ck.per_channel(bias, "bias", C)
    rmean = ck.per_channel(renorm_mean, "renorm_mean", C)
    rstd = ck.per_channel(renorm_std, "renorm_std", C)
    if rmean is None or rstd is None:
        raise TypeError(f"renorm_mean and renorm_std must be arrays of shape ({C},), got None")
    e = ck.check_eps(eps)
    split.check_train_size()
    if split.columns:
        mean_w, var_w = split.column_stats()
    else:
        mean_w, var_w = np.empty(split.G * C), np.empty(split.G * C)
        for part, sl in zip(split.parts, split.slices):
            mean_w[sl], var_w[sl] = _core.batch_stats(part, split.part_layout, F._threads())
    bm, bv = _averaged(split, mean_w, var_w)
    rmax, rmin, dmax = clipping
    r, d = renorm_corrections(bm, bv, rmean, rstd, eps=e, rmax=rmax, rmin=rmin, dmax=dmax)
    if split.n * split.G == 0:  # an empty batch has no statistics: the neutral corrections (as the Keras layer's),
        r, d = np.ones(C), np.zeros(C)  # so that the parameter gradients, sums over nothing, stay 0
    # ((x - m) / s_B r + d) w + b = (x - m) / s_B (w r) + (w d + b)
    w64 = np.ones(C) if w is None else np.asarray(w, np.float64)
    b64 = np.zeros(C) if b is None else np.asarray(b, np.float64)
    scale, shift = split.tile(w64 * r), split.tile(w64 * d + b64)
    if split.columns:
        y = _core.normalize(split.parts[0], split.expand(mean_w), split.expand(var_w), split.expand(scale),
                            split.expand(shift), e, "NHWC", split.column_out(out), F._threads())
        return (y.reshape(split.shape) if out is None else out), mean_w, var_w, r, d
    ys = [_core.normalize(part, mean_w[sl], var_w[sl], scale[sl], shift[sl], e, split.part_layout, o, F._threads())
          for part, o, sl in zip(split.parts, split.out_parts(out, split.parts), split.slices)]
    return split.from_parts(ys, out), mean_w, var_w, r, d


def batch_renorm_forward(x, renorm_mean, renorm_std, weight=None, bias=None, *, rmax=None, rmin=None, dmax=None,
                         eps=1e-5, layout="NCHW", out=None, virtual_batch_size=None):
    """Training forward of batch renormalization (formulas in the module docstring); updates nothing.

    x : float32/float64 ndarray, rank 2..5 in ``layout``.
    renorm_mean, renorm_std : arrays (C,) of a float dtype, the moving statistics the corrections use.
    weight, bias : arrays (C,) or None (1 and 0).
    rmax, rmin, dmax : the clipping bounds (None: inf, 0, inf, as Keras' missing ``renorm_clipping`` keys).
    virtual_batch_size : int dividing the batch size, or None (see :mod:`bn_simd.virtual`).
    out : ndarray shaped and typed like x, C-contiguous; may be x itself.

    Returns (y, save_mean, save_invstd, r, d): the batch statistics float64 (C,) (with virtual_batch_size: (G, C),
    one row per virtual batch), save_invstd = 1 / sqrt(var + eps), and the corrections r, d float64 (C,), all for
    :func:`batch_renorm_backward` and :func:`update_renorm_stats`. Raises TypeError / ValueError as
    :func:`bn_simd.batch_norm_forward`, and for bad clipping bounds.
    """
    clipping = check_clipping({k: v for k, v in zip(_CLIP_KEYS, (rmax, rmin, dmax)) if v is not None})
    split = Split(x, layout, check_virtual_batch_size(virtual_batch_size))
    y, mean_w, var_w, r, d = _forward(split, renorm_mean, renorm_std, weight, bias, clipping, eps, out)
    invstd = 1.0 / np.sqrt(var_w + float(eps))
    if virtual_batch_size is not None:
        mean_w, invstd = mean_w.reshape(split.G, split.C), invstd.reshape(split.G, split.C)
    return y, mean_w, invstd, r, d


def batch_renorm_backward(grad_out, x, save_mean, save_invstd, r, d, weight=None, *, layout="NCHW", out=None,
                          virtual_batch_size=None):
    """Gradients of :func:`batch_renorm_forward`, r and d constants (stop_gradient).

    With x̂ = (x - save_mean) save_invstd (per virtual batch when given) and w = weight (1 when None):
        grad_x      = batch norm's grad_x with the weight w r (through the batch statistics)
        grad_weight = r sum(grad_out x̂) + d sum(grad_out),   grad_bias = sum(grad_out)

    grad_out, x : same shape and dtype. save_mean, save_invstd : as the forward returned them. r, d : arrays (C,).
    Returns (grad_x, grad_weight, grad_bias); the per-channel gradients have weight's dtype (x's when weight is
    None). ``out`` receives grad_x and may be grad_out or x itself.
    """
    split = Split(x, layout, check_virtual_batch_size(virtual_batch_size))
    C = split.C
    r = np.asarray(ck.per_channel(r, "r", C) if r is not None else _missing("r", C), np.float64)
    d = np.asarray(ck.per_channel(d, "d", C) if d is not None else _missing("d", C), np.float64)
    gx, sdx, sdy = train_backward(split, grad_out, save_mean, save_invstd, weight, out, scale=r)
    w = ck.per_channel(weight, "weight", C)
    dt = split.x.dtype if w is None else w.dtype
    return gx, (r * sdx + d * sdy).astype(dt), sdy.astype(dt)


def _missing(name, C):
    raise TypeError(f"{name} must be an array of shape ({C},), got None")


def update_renorm_stats(running_mean, running_var, running_std, renorm_mean, renorm_std, save_mean, save_invstd, n,
                        *, momentum=0.1, renorm_momentum=0.01, eps=1e-5, unbiased=True):
    """Keras' renorm updates of the five moving statistics, in place (formulas in the module docstring).

    running_mean, running_var, running_std, renorm_mean, renorm_std : writeable float ndarrays (C,).
    save_mean, save_invstd : the batch statistics from :func:`batch_renorm_forward`, (C,) or (G, C) per virtual batch
        (then averaged over the virtual batches: their means, and their variances var = save_invstd^-2 - eps).
    n : values per channel of one (virtual) batch; n = 0 (an empty batch), like (0, C) statistics (no virtual batch),
        leaves everything as it is.
    momentum, renorm_momentum : floats in [0, 1], the weight of the new batch.
    unbiased : running_std moves towards sqrt(var n / (n - 1) + eps) (True) or sqrt(var + eps) (False: Keras).

    Computed in float64, stored in the arrays' dtypes, all checks before any write.
    """
    mean = np.asarray(ck.to_ndarray(save_mean, "save_mean"), np.float64)
    C = mean.shape[-1] if mean.ndim in (1, 2) else -1
    if C < 0:
        raise ValueError(f"save_mean must have shape (C,) or (G, C), got {mean.shape}")
    invstd = np.asarray(ck.to_ndarray(save_invstd, "save_invstd"), np.float64)
    if invstd.shape != mean.shape:
        raise ValueError(f"save_invstd must have the shape of save_mean {mean.shape}, got {invstd.shape}")
    arrays = [ck.per_channel(a, name, C, inplace=True, of="save_mean") for a, name in (
        (running_mean, "running_mean"), (running_var, "running_var"), (running_std, "running_std"),
        (renorm_mean, "renorm_mean"), (renorm_std, "renorm_std"))]
    names = ("running_mean", "running_var", "running_std", "renorm_mean", "renorm_std")
    for a, name in zip(arrays, names):
        if a is None:
            raise TypeError(f"{name} must be an array of shape ({C},), got None")
    ck.stats_distinct(tuple(zip(names, arrays)))
    m = ck.check_momentum(momentum, False)
    rm = check_renorm_momentum(renorm_momentum)
    e = ck.check_eps(eps)
    unbiased = ck.check_flag(unbiased, "unbiased")
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"n must be a whole number of values >= 0 (an int or an integral float), got "
                        f"{type(n).__name__}")
    try:
        whole = math.isfinite(n) and n >= 0 and n == int(n)
    except OverflowError:   # (an int beyond float's range)
        whole = False
    if not whole:
        raise ValueError(f"n must be a whole number of values >= 0, got {n!r}")
    if n == 0 or C == 0 or mean.size == 0:  # (an empty batch, or no virtual batch: (0, C) statistics)
        return
    mean2, var2 = mean.reshape(-1, C), 1.0 / np.square(invstd.reshape(-1, C)) - e
    bm, bv = mean2.mean(axis=0), var2.mean(axis=0)
    s_b = np.sqrt(bv + e)
    s_inf = np.sqrt(bv * (n / (n - 1.0)) + e) if unbiased and n > 1 else s_b
    old = [np.asarray(a, np.float64) for a in arrays]
    new_running_std = (1.0 - m) * old[2] + m * s_inf
    new = [(1.0 - m) * old[0] + m * bm,
           np.maximum(np.square(new_running_std) - e, 0.0),
           new_running_std,
           (1.0 - rm) * old[3] + rm * bm,
           (1.0 - rm) * old[4] + rm * s_b]
    pending = list(zip(arrays, new))
    with np.errstate(all="ignore"):  # (rounded silently, as the running statistics' own stores: _args.store)
        try:
            for a, v in pending:
                a[...] = v
        except BaseException:  # (a Ctrl-C between two writes: the five move together, then it is raised)
            for a, v in pending:
                a[...] = v
            raise


def batch_renorm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, *,
                 running_std, renorm_mean, renorm_std, renorm_clipping=None, renorm_momentum=0.01, layout="NCHW",
                 out=None, unbiased_running_var=True, virtual_batch_size=None):
    """Batch renormalization in one call, :func:`bn_simd.batch_norm`'s order and conventions.

    training=True: :func:`batch_renorm_forward` with renorm_mean / renorm_std and the ``renorm_clipping`` dict
    (Keras' keys rmax, rmin, dmax), then :func:`update_renorm_stats` of the five moving statistics in place
    (``unbiased_running_var=False`` is Keras exactly). training=False: :func:`bn_simd.batch_norm` with
    running_mean / running_var (the others unused). All arrays are (C,); the moving ones writeable float ndarrays.

    Returns y. Raises as the calls above; a call that raises changes nothing.
    """
    training = ck.check_flag(training, "training")
    if not training:
        check_clipping(renorm_clipping)
        check_virtual_batch_size(virtual_batch_size)
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps, layout=layout, out=out)
    unbiased_running_var = ck.check_flag(unbiased_running_var, "unbiased_running_var")
    clipping = check_clipping(renorm_clipping)
    split = Split(x, layout, check_virtual_batch_size(virtual_batch_size))
    C = split.C
    for a, name in ((running_mean, "running_mean"), (running_var, "running_var"), (running_std, "running_std"),
                    (renorm_mean, "renorm_mean"), (renorm_std, "renorm_std")):
        if a is None:
            raise TypeError(f"{name} must be an array of shape ({C},), got None")
        ck.per_channel(a, name, C, inplace=True)
    m = ck.check_momentum(momentum, False)
    rmom = check_renorm_momentum(renorm_momentum)
    ck.stats_apart(out, (("running_mean", running_mean), ("running_var", running_var), ("running_std", running_std),
                         ("renorm_mean", renorm_mean), ("renorm_std", renorm_std)))
    y, mean_w, var_w, r, d = _forward(split, renorm_mean, renorm_std, weight, bias, clipping, eps, out)
    if split.n * split.G > 0 and C > 0:
        update_renorm_stats(running_mean, running_var, running_std, renorm_mean, renorm_std, mean_w.reshape(-1, C),
                            1.0 / np.sqrt(var_w.reshape(-1, C) + eps), split.n, momentum=m, renorm_momentum=rmom,
                            eps=eps, unbiased=unbiased_running_var)
    return y


# ---- the BatchNorm layers' training calls with virtual batches or renormalization ---------------------------------

class LayerSaved:
    """What a layer's training forward with virtual batches or renormalization keeps for its backward: the input,
    the per-virtual-batch statistics (float64 (G·C,)), the virtual batch size, and r, d (renorm) or None."""

    __slots__ = ("x", "mean", "invstd", "virtual_batch_size", "r", "d")

    def __init__(self, x, mean, invstd, virtual_batch_size, r, d):
        self.x, self.mean, self.invstd = x, mean, invstd
        self.virtual_batch_size, self.r, self.d = virtual_batch_size, r, d


def check_layer(layer, update):
    """A layer's virtual-batch and renorm attributes (users may reassign them), checked before a call."""
    layer.virtual_batch_size = check_virtual_batch_size(layer.virtual_batch_size)
    if update:  # (before the forward writes its output: the update comes after it)
        ck.together(layer.running_mean, layer.running_var, False)
    if layer.renorm:
        if update and layer.running_mean is None:  # (both None: a plain layer's batch statistics without an update)
            raise TypeError(f"running_mean and running_var must be arrays of shape ({layer.num_features},), got None: "
                            f"renorm moves renorm_mean and renorm_std with them")
        check_clipping(layer.renorm_clipping)
        layer.renorm_momentum = check_renorm_momentum(layer.renorm_momentum)
        for name in ("running_std", "renorm_mean", "renorm_std"):
            if getattr(layer, name, None) is None:
                raise TypeError(f"{name} must be an array of shape ({layer.num_features},), got None")
            ck.per_channel(getattr(layer, name), name, layer.num_features, inplace=update)


# (the statistics a layer's training call with update moves after writing its output)
_LAYER_STATS = ("running_mean", "running_var", "running_std", "renorm_mean", "renorm_std")


def layer_forward(layer, x, out, saved_x, update, momentum):
    """A BatchNorm layer's training forward with virtual batches and/or renormalization; the moving statistics
    updated when ``update`` (with ``momentum``, None resolved). Returns (y, LayerSaved)."""
    from .virtual import mean_stats, train_forward
    split = Split(x, layer.layout, layer.virtual_batch_size)
    C, eps = split.C, layer.eps
    if update:  # (the statistics the call moves after writing y)
        moved = _LAYER_STATS if layer.renorm else _LAYER_STATS[:2]
        ck.stats_apart(out, tuple((name, getattr(layer, name, None)) for name in moved))
    if layer.renorm:
        y, mean, var, r, d = _forward(split, layer.renorm_mean, layer.renorm_std, layer.weight, layer.bias,
                                      check_clipping(layer.renorm_clipping), eps, out)
        invstd = 1.0 / np.sqrt(var + eps)
        if update and split.n * split.G > 0:
            update_renorm_stats(layer.running_mean, layer.running_var, layer.running_std, layer.renorm_mean,
                                layer.renorm_std, mean.reshape(-1, C), invstd.reshape(-1, C), split.n,
                                momentum=momentum, renorm_momentum=layer.renorm_momentum, eps=eps,
                                unbiased=layer.unbiased_running_var)
    else:
        y, mean, invstd, var = train_forward(split, layer.weight, layer.bias, eps, out)
        r = d = None
        if update and split.n * split.G > 0:
            bm, bv = mean_stats(split, mean, var)
            F.update_running_stats(layer.running_mean, layer.running_var, bm, bv, split.n, momentum,
                                   unbiased=layer.unbiased_running_var)
    return y, LayerSaved(saved_x, mean, invstd, layer.virtual_batch_size, r, d)


def layer_backward(layer, grad_out, out):
    """The backward of :func:`layer_forward`: returns grad_x and sets the layer's grad_weight / grad_bias."""
    from .layers import set_param_grads
    sv = layer._saved
    split = Split(sv.x, layer._fwd_route, sv.virtual_batch_size)  # (the forward's layout)
    G, C = split.G, split.C
    mean, invstd = sv.mean.reshape(G, C), sv.invstd.reshape(G, C)
    if sv.r is None:
        gx, gw, gb = train_backward(split, grad_out, mean, invstd, layer._fwd_weight, out)
    else:
        gx, sdx, sdy = train_backward(split, grad_out, mean, invstd, layer._fwd_weight, out, scale=sv.r)
        gw, gb = sv.r * sdx + sv.d * sdy, sdy
    set_param_grads(layer, gw, gb)  # (as the plain backward's: none for a parameter the layer lacks, bias=False's)
    return gx
