"""Group normalization and instance normalization on NumPy arrays, with PyTorch's names and semantics.

Group norm splits the C channels into ``num_groups`` groups of C / num_groups consecutive channels and normalises
each (sample, group) over its channels and all spatial positions; instance norm is group norm with one channel per
group (each (sample, channel) over its spatial positions). The affine weight and bias are per channel.

Layouts as in :mod:`bn_simd.functional`: ``layout="NCHW"`` has channels on axis 1, ``"NHWC"`` last. Data arrays are
float32 or float64; statistics are computed in float64 (shifted chunk sums, merged in a fixed order), bitwise the
same for any thread count. Saved statistics (mean, invstd) have shape (N, num_groups) for group norm and (N, C) for
instance norm, in x's dtype, as PyTorch returns them.
"""
from . import _core
from . import _epilogue as _epi
from .functional import _threads


# ---- group norm ---------------------------------------------------------------------------------------------

def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, layout="NCHW", out=None, activation=None,
               residual=None):
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
    activation, residual : as :func:`bn_simd.batch_norm` (y = act(normalised x + residual)), applied by a sweep over
        y after the normalisation (one more pass over y, not fused as in batch norm); checked before anything is
        written. Forward only: :func:`group_norm_backward` does not differentiate through them.

    Returns y. Raises TypeError for wrong types/dtypes, ValueError for wrong shapes or values (a num_groups that
    does not divide C included); a call that raises writes nothing.
    """
    if activation is not None or residual is not None:
        return _epi.apply_after(x, out, activation, residual,
                                lambda: _core.group_norm(x, num_groups, weight, bias, eps, layout, out, _threads()))
    return _core.group_norm(x, num_groups, weight, bias, eps, layout, out, _threads())


def group_norm_forward(x, num_groups, weight=None, bias=None, *, eps=1e-5, layout="NCHW", out=None):
    """Group-norm forward for callers that run their own autograd: returns (y, mean, invstd), mean and
    invstd = 1 / sqrt(var + eps) of shape (N, num_groups) in x's dtype, for :func:`group_norm_backward`."""
    return _core.group_norm(x, num_groups, weight, bias, eps, layout, out, _threads(), 1)


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
    return _core.group_norm_backward(grad_out, x, mean, invstd, num_groups, weight, layout, out, _threads())


# ---- instance norm ------------------------------------------------------------------------------------------

def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1,
                  eps=1e-5, *, layout="NCHW", out=None, activation=None, residual=None):
    """Instance normalization (``torch.nn.functional.instance_norm``).

    use_input_stats=True: each (sample, channel) is normalised with its own mean and biased variance over the
    spatial positions; running_mean / running_var, when given, are updated in place with their batch averages
    (``running = (1 - momentum) running + momentum mean_n(stat)``, the variance unbiased), as PyTorch does.
    use_input_stats=False: the running statistics (both required) normalise every sample, as batch norm's eval.

    x : ndarray, float32 or float64, rank 3..5 ((N, C, *spatial); NHWC (N, *spatial, C)). Other arguments as
    :func:`bn_simd.batch_norm`. Raises ValueError for one spatial element when use_input_stats is True.
    activation, residual: as :func:`group_norm` (a sweep after the normalisation; forward only).
    """
    if activation is not None or residual is not None:
        return _epi.apply_after(x, out, activation, residual, lambda: _core.instance_norm(
            x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, layout, out, _threads()))
    return _core.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, layout, out,
                               _threads())


def instance_norm_forward(x, weight=None, bias=None, *, eps=1e-5, layout="NCHW", out=None):
    """Instance-norm forward with the input's statistics: returns (y, mean, invstd), both (N, C) in x's dtype,
    for :func:`instance_norm_backward`."""
    return _core.instance_norm_forward(x, weight, bias, eps, layout, out, _threads())


def instance_norm_backward(grad_out, x, mean, invstd, weight=None, *, layout="NCHW", out=None):
    """Gradients of instance normalization with the input's statistics: :func:`group_norm_backward` with one
    channel per group. mean, invstd: (N, C). Returns (grad_x, grad_weight, grad_bias)."""
    return _core.group_norm_backward(grad_out, x, mean, invstd, None, weight, layout, out, _threads(), True)
