"""Batch normalization with statistics over the unmasked entries only (Keras' ``mask=``), on top of the kernels.

A mask has the shape of x without its channel axis (or a shape that broadcasts to it, rank for rank, as Keras
allows); an entry is unmasked where the mask is nonzero, the same for every channel. With the (outer, C, inner)
view of x and the mask as M (outer, inner), the n = |M| unmasked positions hold the values

    mean[c] = (1/n) sum_{(o,i) in M} x[o, c, i],    var[c] = (1/n) sum_{(o,i) in M} (x[o, c, i] - mean[c])^2

and every entry, masked or not, is normalised with them. The unmasked rows are gathered into one (n, C)
channels-last array, whose statistics the kernels compute (float64 sums inside fixed chunks, as for any call):
the same accuracy as an unmasked call, one copy of the selected entries in x's dtype. An all-true mask skips
the gather: the call gives the bits of the unmasked call.

The gradient (y = w s (x - mean) + b everywhere, s = 1 / sqrt(var + eps); the statistics depend on M's entries
only, the loss on every entry):

    grad_x = w s g + [(o,i) in M] (-w s^3 (x - mean) sum_all(g (x - mean)) / n - w s sum_all(g) / n)

so the unmasked entries take the usual coefficients (built with the sums over all entries and the count n) and
the masked ones only the a = w s term.
"""
import numpy as np

from . import _args as ck
from . import _core


def mask_positions(mask, shape, axis, outer, inner):
    """The mask as a boolean (outer, inner) array: True where the entry is unmasked.

    shape: x's shape, axis: its channel axis. The mask must have one dimension fewer than x (Keras' rule) and
    broadcast to x's shape without the channel axis. Raises TypeError for a mask that is not an array of bool,
    integers or floats, ValueError for a wrong shape.
    """
    m = ck.to_ndarray(mask, "mask")
    if m.dtype.kind not in "biuf":
        raise TypeError(f"mask must be an array of bool, integers or floats (nonzero: unmasked), got dtype "
                        f"{m.dtype}")
    target = tuple(shape[:axis]) + tuple(shape[axis + 1:])
    if m.ndim != len(target):
        raise ValueError(f"mask must have {len(target)} dimension(s), x's shape {tuple(shape)} without its channel "
                         f"axis {axis}: {target}, got shape {m.shape}")
    try:
        b = np.broadcast_to(m, target)
    except ValueError:
        raise ValueError(f"mask of shape {m.shape} does not broadcast to {target}, x's shape {tuple(shape)} "
                         f"without its channel axis {axis}") from None
    return (b != 0).reshape(outer, inner)


def selected(x, outer, C, inner, pos):
    """The unmasked entries of x (viewed (outer, C, inner)) as a C-contiguous channels-last (n, C) array."""
    if inner == 1:
        return x.reshape(outer, C)[pos[:, 0]]
    return x.reshape(outer, C, inner).transpose(0, 2, 1)[pos]


def prepare(x, layout, mask):
    """(x as an ndarray, its view (outer, C, inner), the unmasked positions (outer, inner), their count n, all):
    the checked arguments of a masked call. all: every entry is unmasked."""
    dt = getattr(x, "dtype", None)
    name = str(getattr(dt, "name", dt))   # (NumPy's and ml_dtypes' names; torch's "torch.float16"; "float16")
    if dt is not None and (name.endswith(("float16", "bfloat16", "half")) or (
            isinstance(dt, np.dtype) and dt.kind == "f" and dt.itemsize == 2)):
        raise TypeError(f"x must have dtype float32 or float64 with mask=, got {name} (the call without a mask "
                        f"takes float16 and bfloat16 data)")
    xa, outer, C, inner, axis = ck.data_view(x, layout)
    pos = mask_positions(mask, xa.shape, axis, outer, inner)
    n = int(np.count_nonzero(pos))
    return xa, (outer, C, inner), pos, n, n == pos.size


def stats(xa, layout, view, pos, every, nt):
    """Float64 (mean, biased var) of the unmasked entries (NaN for a channel without one)."""
    if every:
        return _core.batch_stats(xa, layout, nt)
    return _core.batch_stats(selected(xa, *view, pos), "NHWC", nt)


def moments(xa, layout, view, pos, every, nt):
    """The per-chunk moments of the unmasked entries (those of the gathered (n, C) array)."""
    if every:
        return _core.batch_moments(xa, layout, nt)
    return _core.batch_moments(selected(xa, *view, pos), "NHWC", nt)


def train_size(n, xa):
    if n < 2 and xa.size:
        raise ValueError(f"Expected more than 1 unmasked value per channel when training, got {n} unmasked "
                         f"position(s) in input of shape {xa.shape}")


def forward(x, rm, rv, weight, bias, momentum, eps, layout, out, unbiased, mask, nt):
    """A training-mode batch_norm with masked statistics: (y, mean, invstd, n), mean and invstd float64 (C,).

    rm, rv (running statistics, or None) are updated in place with the n unmasked values per channel. Everything
    is checked before anything is written."""
    xa, view, pos, n, every = prepare(x, layout, mask)
    C = view[1]
    rm = ck.per_channel(rm, "running_mean", C, inplace=True)
    rv = ck.per_channel(rv, "running_var", C, inplace=True)
    ck.together(rm, rv, False)
    mom = ck.check_momentum(momentum, False) if rm is not None else 0.0  # (checked where used, as batch_norm)
    e = ck.check_eps(eps)
    train_size(n, xa)
    if rm is not None:
        ck.stats_apart(out, (("running_mean", rm), ("running_var", rv)))
    mean, var = stats(xa, layout, view, pos, every, nt)
    y = _core.normalize(xa, mean, var, weight, bias, e, layout, out, nt)
    if rm is not None and n > 0:
        _core.update_running_stats(rm, rv, mean, var, n, mom, unbiased)
    return y, mean, 1.0 / np.sqrt(var + e), n


def backward(grad_out, x, save_mean, save_invstd, weight, layout, out, mask, nt):
    """Training-mode gradients (grad_x, grad_weight, grad_bias) of a batch norm whose statistics were those of the
    unmasked entries (see the module's docstring); the parameter gradients have weight's dtype (x's without)."""
    xa, (outer, C, inner), pos, n, every = prepare(x, layout, mask)
    if save_mean is None or save_invstd is None:
        raise TypeError(f"save_mean and save_invstd must be arrays of shape ({C},) (the forward's statistics), got "
                        f"{'None' if save_mean is None else 'an array'} and "
                        f"{'None' if save_invstd is None else 'an array'}")
    save_mean = ck.per_channel(save_mean, "save_mean", C)  # (checked here: the kernels' errors say "mean")
    s = np.asarray(ck.per_channel(save_invstd, "save_invstd", C), dtype=np.float64)
    sum_dy, sum_dyxm = _core.backward_reduce(grad_out, xa, save_mean, layout, nt)
    w = ck.per_channel(weight, "weight", C)
    # (the coefficients and the gradients' casts beyond range are +-Inf silently, as the kernels' own: no warning, no
    # FloatingPointError under np.errstate(all="raise") once out may have been written)
    with np.errstate(all="ignore"):
        ws = s if w is None else np.asarray(w, dtype=np.float64) * s
        if n > 0:
            b, d = -ws * s * (s * sum_dyxm / n), -ws * sum_dy / n  # (s * sum / n first: s**3 underflows, std 1e103)
        else:  # no entry carried the statistics: each gradient is the constant-statistics one
            b = d = np.zeros(C)
    if every:
        dx = _core.backward_apply(grad_out, xa, save_mean, ws, b, d, layout, out, nt)
    else:
        zero = np.zeros(C)
        # the masked entries' a * g first: out may be grad_out itself
        dx_const = _core.backward_apply(grad_out, xa, save_mean, ws, zero, zero, layout, None, nt)
        dx = _core.backward_apply(grad_out, xa, save_mean, ws, b, d, layout, out, nt)
        np.copyto(dx.reshape(outer, C, inner), dx_const.reshape(outer, C, inner), where=~pos[:, np.newaxis, :])
    like = w if w is not None else xa
    with np.errstate(all="ignore"):
        return dx, (s * sum_dyxm).astype(like.dtype), sum_dy.astype(like.dtype)
