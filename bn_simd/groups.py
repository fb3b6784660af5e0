"""Group normalization and instance normalization on NumPy arrays, with PyTorch's names and semantics.

Group norm splits the C channels into ``num_groups`` groups of C / num_groups consecutive channels and normalises
each (sample, group) over its channels and all spatial positions; instance norm is group norm with one channel per
group (each (sample, channel) over its spatial positions). The affine weight and bias are per channel.

Layouts as in :mod:`bn_simd.functional`: ``layout="NCHW"`` has channels on axis 1, ``"NHWC"`` last. Data arrays are
float32 or float64 (or float16 / bfloat16 storage, computed in float32); statistics are computed in float64 (shifted
chunk sums, merged in a fixed order), bitwise the same for any thread count. Saved statistics (mean, invstd) have shape
(N, num_groups) for group norm and (N, C) for instance norm, in x's dtype (float32 for 16-bit x), as PyTorch returns
them.
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
    x : ndarray, float32, float64, float16 or bfloat16, rank 2..5 in ``layout`` ((N, C) or (N, C, *spatial);
        NHWC (N, *spatial, C)).
    num_groups : int >= 1 dividing C.
    weight, bias : array (C,) or None (1 and 0).
    eps : float > 0.
    out : ndarray shaped and typed like x, C-contiguous; may be x itself (in place).
    activation, residual : as :func:`bn_simd.batch_norm` (y = act(normalised x + residual)), fused into the
        normalise sweep (no extra pass over memory); checked before anything is written. For training through them:
        :func:`group_norm_forward` and :func:`group_norm_backward` with the same arguments.

    Returns y. Raises TypeError for wrong types/dtypes, ValueError for wrong shapes or values (a num_groups that
    does not divide C included); a call that raises writes nothing.
    """
    if activation is not None or residual is not None:
        return _core.group_forward_epi(x, num_groups, weight, bias, eps, layout, out, _epi.parse(activation),
                                       residual, _threads(), False, True)[0]
    return _core.group_norm(x, num_groups, weight, bias, eps, layout, out, _threads())


def group_norm_forward(x, num_groups, weight=None, bias=None, *, eps=1e-5, layout="NCHW", out=None, activation=None,
                       residual=None):
    """Group-norm forward for callers that run their own autograd: returns (y, mean, invstd), mean and
    invstd = 1 / sqrt(var + eps) of shape (N, num_groups) in x's dtype (float32 for 16-bit x), for
    :func:`group_norm_backward`.

    With ``activation`` or ``residual`` (keyword-only, as :func:`group_norm`: y = act(normalised x + residual) in the
    normalise sweep) returns (y, mean, invstd, save_stats): save_stats = (mean, var), the groups' mean and biased
    variance as float64 (N, num_groups) arrays, from which :func:`group_norm_backward` recomputes the forward's
    coefficients bit for bit (so the backward needs no mask and no saved output)."""
    if activation is not None or residual is not None:
        return _core.group_forward_epi(x, num_groups, weight, bias, eps, layout, out, _epi.parse(activation),
                                       residual, _threads(), False)
    return _core.group_norm(x, num_groups, weight, bias, eps, layout, out, _threads(), 1)


def _group_backward(grad_out, x, mean, invstd, num_groups, weight, layout, out, activation, residual, bias, eps,
                    save_stats, instance, grad_residual_out):
    """group_norm_backward / instance_norm_backward (instance: num_groups unused)."""
    act = _epi.parse(activation)
    if activation is None and residual is None:
        _epi.no_grad_residual_out(grad_residual_out)
        return _core.group_norm_backward(grad_out, x, mean, invstd, num_groups, weight, layout, out, _threads(),
                                         instance)
    if activation is not None:
        m, v = _epi.save_stats_of(save_stats, 2, "(mean, var) pair", "its fourth value")
        return _core.group_backward_epi(grad_out, x, m, v, eps, num_groups, weight, bias, layout, out, act,
                                        residual, _threads(), instance, grad_residual_out)
    return _epi.residual_backward(
        _core, lambda o: _core.group_norm_backward(grad_out, x, mean, invstd, num_groups, weight, layout, o,
                                                   _threads(), instance),
        grad_out, x, residual, grad_residual_out, out)


def group_norm_backward(grad_out, x, mean, invstd, num_groups, weight=None, *, layout="NCHW", out=None,
                        activation=None, residual=None, bias=None, eps=1e-5, save_stats=None, grad_residual_out=None):
    """Gradients of group normalization.

    With M = (C / num_groups) * prod(spatial) values per group, s = invstd[n, g], w = weight[c] (1 when None),
    x̂ = (x - mean[n, g]) s:
        grad_bias[c]   = sum over n and positions of grad_out
        grad_weight[c] = sum over n and positions of grad_out * x̂
        grad_x         = s (w grad_out - mean_group(w grad_out) - x̂ mean_group(w grad_out x̂))

    mean, invstd: (N, num_groups), as :func:`group_norm_forward` returns them. Returns (grad_x, grad_weight,
    grad_bias); the per-channel gradients have weight's dtype (x's when weight is None). ``out`` receives grad_x
    and may be grad_out or x itself (with an activation, not the residual's memory: as :func:`batch_norm_backward`).

    Through a fused epilogue z = act(group_norm(x) + residual) (grad_out is dL/dz; keyword-only arguments): pass the
    forward's ``activation`` and ``residual`` (the array itself), and, with an activation, its ``save_stats``
    (:func:`group_norm_forward`'s fourth value), ``bias`` and ``eps``: u = normalised x + residual is recomputed from x
    with the forward's coefficients bit for bit, du = grad_out * act'(u) (``act'`` at the kinks as
    :func:`bn_simd.batch_norm_backward`) in one sweep (into grad_x's array, or the residual's gradient), and du
    becomes the normalisation's grad_out (``mean`` and ``invstd`` are then unused and may be None: the backward takes
    invstd = 1 / sqrt(var + eps) of save_stats). Returns (grad_x, grad_weight, grad_bias, grad_residual),
    grad_residual = du (None without a residual; grad_out's copy with a residual and no activation). Unknown
    activations raise ValueError naming ``activation``, a bad residual ValueError / TypeError naming ``residual``,
    an activation without save_stats ValueError naming ``save_stats``, before anything is written.
    ``grad_residual_out`` (with a residual): the array that receives grad_residual, as
    :func:`bn_simd.batch_norm_backward`'s.
    """
    return _group_backward(grad_out, x, mean, invstd, num_groups, weight, layout, out, activation, residual, bias, eps,
                           save_stats, False, grad_residual_out)


# ---- instance norm ------------------------------------------------------------------------------------------

def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, momentum=0.1,
                  eps=1e-5, *, layout="NCHW", out=None, activation=None, residual=None):
    """Instance normalization (``torch.nn.functional.instance_norm``).

    use_input_stats=True: each (sample, channel) is normalised with its own mean and biased variance over the
    spatial positions; running_mean / running_var, when given, are updated in place with their batch averages
    (``running = (1 - momentum) running + momentum mean_n(stat)``, the variance unbiased), as PyTorch does.
    use_input_stats=False: the running statistics (both required) normalise every sample, as batch norm's eval.

    x : ndarray, float32, float64, float16 or bfloat16, rank 3..5 ((N, C, *spatial); NHWC (N, *spatial, C)). Other
    arguments as :func:`bn_simd.batch_norm`. Raises ValueError for one spatial element when use_input_stats is True.
    activation, residual: as :func:`bn_simd.batch_norm` (y = act(normalised x + residual)), fused into the normalise
    sweep (no extra pass over memory) and checked before anything is written; the running statistics move exactly as
    without them. For training through them: :func:`instance_norm_forward` and :func:`instance_norm_backward`, or the
    InstanceNorm layers.
    """
    if activation is not None or residual is not None:
        return _core.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, layout,
                                   out, _threads(), False, _epi.parse(activation), residual)
    return _core.instance_norm(x, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, layout, out,
                               _threads())


def instance_norm_forward(x, weight=None, bias=None, *, eps=1e-5, layout="NCHW", out=None, activation=None,
                          residual=None):
    """Instance-norm forward with the input's statistics: returns (y, mean, invstd), both (N, C) in x's dtype (float32
    for 16-bit x), for :func:`instance_norm_backward`. With ``activation`` or ``residual``: (y, mean, invstd,
    save_stats), the epilogue fused into the normalise sweep and save_stats = (mean, var) as float64 (N, C) arrays, as
    :func:`group_norm_forward`."""
    if activation is not None or residual is not None:
        return _core.group_forward_epi(x, None, weight, bias, eps, layout, out, _epi.parse(activation), residual,
                                       _threads(), True)
    return _core.instance_norm_forward(x, weight, bias, eps, layout, out, _threads())


def instance_norm_backward(grad_out, x, mean, invstd, weight=None, *, layout="NCHW", out=None, activation=None,
                           residual=None, bias=None, eps=1e-5, save_stats=None, grad_residual_out=None):
    """Gradients of instance normalization with the input's statistics: :func:`group_norm_backward` with one
    channel per group. mean, invstd: (N, C). Returns (grad_x, grad_weight, grad_bias); through a fused epilogue
    (``activation``, ``residual``, ``bias``, ``eps``, ``save_stats``, ``grad_residual_out`` as
    :func:`group_norm_backward`, save_stats from :func:`instance_norm_forward`) (grad_x, grad_weight, grad_bias,
    grad_residual)."""
    return _group_backward(grad_out, x, mean, invstd, None, weight, layout, out, activation, residual, bias, eps,
                           save_stats, True, grad_residual_out)
