"""Layer normalization and RMS normalization on NumPy arrays, with PyTorch's names, order and semantics.

Both normalise each position of x over ``normalized_shape``, x's trailing dims (a transformer token's features),
and scale (and shift) with per-element parameters of shape ``normalized_shape``:

    layer norm  y = (x - mean) / sqrt(var + eps) * weight + bias      (var biased)
    RMS norm    y = x / sqrt(mean(x^2) + eps) * weight                (eps None: the machine epsilon of x's
                                                                       dtype, float32's for 16-bit x)

``layout="NCHW"`` (or ``"channels_first"``) normalises over the channels (axis 1) of an (N, C, *spatial) array
instead, without a transpose: the LayerNorm2d of ConvNeXt, statistics per (sample, position), parameters (C,).
``normalized_shape`` is then C.

Data arrays are float32 or float64, or float16 / bfloat16 storage (computed in float32); statistics are computed in
float64 (shifted sums), and results are bitwise the same for any thread count. The saved statistics (mean, rstd = 1 /
sqrt(var + eps)) have x's dtype (float32 for 16-bit x) and PyTorch's shape: the leading dims then ones, (*x.shape[:-k],
1, ..., 1); channels-first (N, 1, *spatial).
"""
from . import _core
from . import _epilogue as _epi
from .functional import _threads

# ---- layer norm -----------------------------------------------------------------------------------------------


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None, layout=None, activation=None,
               residual=None):
    """Layer normalization (``torch.nn.functional.layer_norm``).

    y = (x - mean) / sqrt(var + eps) * weight + bias, mean and the biased var over the trailing dims
    ``normalized_shape`` of each leading position.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, of shape (*, *normalized_shape); any number of leading dims
        (0-sized too).
    normalized_shape : int or tuple of ints, x's trailing dims (``layout="NCHW"``: C, the size of axis 1).
    weight, bias : arrays of shape normalized_shape (or its flat size), any float dtype, or None (1 and 0).
    eps : float > 0.
    out : ndarray shaped and typed like x, C-contiguous; may be x itself (in place).
    layout : None (normalise the trailing dims), or "NCHW" / "channels_first": normalise over the channels of an
        (N, C, *spatial) array (rank >= 2) at each (sample, position); "NHWC" / "channels_last" is the default with
        normalized_shape = C.
    activation, residual : as :func:`bn_simd.batch_norm` (y = act(normalised x + residual)), fused into the
        normalise sweep (no extra pass over memory); checked before anything is written. For training through them:
        :func:`layer_norm_forward` and :func:`layer_norm_backward` with the same arguments.

    Returns y. Raises TypeError for wrong types/dtypes, ValueError for wrong shapes or values, naming the argument;
    a call that raises writes nothing.
    """
    if activation is not None or residual is not None:
        return _core.row_forward_epi(x, normalized_shape, weight, bias, eps, layout, out, _threads(), False,
                                     _epi.parse(activation), residual, 2)[0]
    return _core.row_norm(x, normalized_shape, weight, bias, eps, layout, out, _threads(), False)


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, *, eps=1e-5, out=None, layout=None,
                       activation=None, residual=None):
    """Layer-norm forward for callers that run their own autograd (``torch.native_layer_norm``): returns (y, mean,
    rstd), mean and rstd = 1 / sqrt(var + eps) in x's dtype (float32 for 16-bit x), shaped (*leading, 1, ..., 1)
    (channels-first: (N, 1, *spatial)), for :func:`layer_norm_backward`. Arguments as :func:`layer_norm`.

    With ``activation`` or ``residual`` (keyword-only; y = act(normalised x + residual) in the normalise sweep)
    returns (y, mean, rstd, save_stats): save_stats = (mean, rstd) as float64 arrays of the same shape, the
    statistics the normalise used, from which :func:`layer_norm_backward` recomputes the forward's coefficients bit
    for bit."""
    if activation is not None or residual is not None:
        return _core.row_forward_epi(x, normalized_shape, weight, bias, eps, layout, out, _threads(), False,
                                     _epi.parse(activation), residual)
    return _core.row_norm(x, normalized_shape, weight, bias, eps, layout, out, _threads(), False, 1)


def _row_backward(grad_out, x, mean, rstd, normalized_shape, weight, bias, layout, out, activation, residual,
                  save_stats, rms, grad_residual_out):
    """layer_norm_backward / rms_norm_backward, through the epilogue when asked."""
    act = _epi.parse(activation)
    if activation is not None:
        what = "(rstd,)" if rms else "(mean, rstd) pair"
        st = _epi.save_stats_of(save_stats, 1 if rms else 2, what, "its last value")
        return _core.row_backward_epi(grad_out, x, None if rms else st[0], st[-1], normalized_shape, weight, bias,
                                      layout, out, _threads(), rms, act, residual, grad_residual_out)

    def backward(o):
        return _core.row_norm_backward(grad_out, x, mean, rstd, normalized_shape, weight, bias, layout, o, _threads(),
                                       rms)

    if residual is None:
        _epi.no_grad_residual_out(grad_residual_out)
        return backward(out)
    return _epi.residual_backward(_core, backward, grad_out, x, residual, grad_residual_out, out)


def layer_norm_backward(grad_out, x, mean, rstd, normalized_shape, weight=None, bias=None, *, out=None,
                        layout=None, activation=None, residual=None, save_stats=None, grad_residual_out=None):
    """Gradients of layer normalization (``torch.native_layer_norm_backward``).

    With D = prod(normalized_shape) values per position, x̂ = (x - mean) rstd, g = grad_out * weight (weight 1 when
    None), sums over each position's D values:
        grad_x      = rstd (g - sum(g) / D - x̂ sum(g x̂) / D)
        grad_weight = sum over the leading positions of grad_out * x̂
        grad_bias   = sum over the leading positions of grad_out

    grad_out : x's shape and dtype. mean, rstd : as :func:`layer_norm_forward` returns them (any float dtype; also
    accepted shaped as the leading dims alone). weight, bias : as the forward's; they say which parameter gradients
    are wanted. Returns (grad_x, grad_weight, grad_bias): grad_weight (grad_bias) is None when weight (bias) is None,
    else shaped and typed as it. ``out`` receives grad_x and may be grad_out or x itself (with an activation, not the
    residual's memory: as :func:`bn_simd.batch_norm_backward`).

    Through a fused epilogue z = act(layer_norm(x) + residual) (grad_out is dL/dz; keyword-only): pass the forward's
    ``activation`` and ``residual`` (the array itself) and, with an activation, its ``save_stats``
    (:func:`layer_norm_forward`'s fourth value; weight and bias are the forward's): each block of rows (positions)
    first gets du = grad_out * act'(u), u = normalised x + residual recomputed from x with the forward's coefficients
    bit for bit (``act'`` at the kinks as :func:`bn_simd.batch_norm_backward`), and the block's sums and grad_x then
    read du while it is in cache (``mean`` and ``rstd`` are then unused and may be None). Returns (grad_x,
    grad_weight, grad_bias, grad_residual), grad_residual = du (None without a residual; grad_out's copy with a
    residual and no activation). Bad arguments raise as :func:`bn_simd.group_norm_backward`'s, before anything is
    written. ``grad_residual_out`` (with a residual): the array that receives grad_residual, as
    :func:`bn_simd.batch_norm_backward`'s.
    """
    return _row_backward(grad_out, x, mean, rstd, normalized_shape, weight, bias, layout, out, activation, residual,
                         save_stats, False, grad_residual_out)


# ---- RMS norm -------------------------------------------------------------------------------------------------


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None, layout=None, activation=None, residual=None):
    """RMS normalization (``torch.nn.functional.rms_norm``).

    y = x / sqrt(mean(x^2) + eps) * weight, the mean over the trailing dims ``normalized_shape``; eps None is the
    machine epsilon of x's dtype (``np.finfo(x.dtype).eps``; float32's for float16 and bfloat16 x, whose math is
    float32), as PyTorch. Arguments as :func:`layer_norm` (no bias; ``layout="NCHW"``: over the channels of an
    (N, C, *spatial) array at each position, normalized_shape = C); activation and residual as :func:`layer_norm`
    (fused). Returns y; raises as :func:`layer_norm`.
    """
    if activation is not None or residual is not None:
        return _core.row_forward_epi(x, normalized_shape, weight, None, eps, layout, out, _threads(), True,
                                     _epi.parse(activation), residual, 2)[0]
    return _core.row_norm(x, normalized_shape, weight, None, eps, layout, out, _threads(), True)


def rms_norm_forward(x, normalized_shape, weight=None, *, eps=None, out=None, layout=None, activation=None,
                     residual=None):
    """RMS-norm forward for callers that run their own autograd: returns (y, rstd), rstd = 1 / sqrt(mean(x^2) + eps) in
    x's dtype (float32 for 16-bit x) shaped (*leading, 1, ..., 1) (channels-first: (N, 1, *spatial)), for
    :func:`rms_norm_backward`. With ``activation`` or ``residual`` (keyword-only, fused as
    :func:`layer_norm_forward`'s): (y, rstd, save_stats), save_stats = (rstd,) as float64."""
    if activation is not None or residual is not None:
        return _core.row_forward_epi(x, normalized_shape, weight, None, eps, layout, out, _threads(), True,
                                     _epi.parse(activation), residual)
    return _core.row_norm(x, normalized_shape, weight, None, eps, layout, out, _threads(), True, 1)


def rms_norm_backward(grad_out, x, rstd, normalized_shape, weight=None, *, out=None, layout=None, activation=None,
                      residual=None, save_stats=None, grad_residual_out=None):
    """Gradients of RMS normalization.

    With D = prod(normalized_shape), x̂ = x rstd, g = grad_out * weight (1 when None), sums over each position's D
    values:
        grad_x      = rstd (g - x̂ sum(g x̂) / D)
        grad_weight = sum over the leading positions of grad_out * x̂

    Returns (grad_x, grad_weight), grad_weight None when weight is None, else shaped and typed as it. Arguments as
    :func:`layer_norm_backward`; through a fused epilogue (``activation``, ``residual``, ``save_stats`` from
    :func:`rms_norm_forward`, ``grad_residual_out``) (grad_x, grad_weight, grad_residual).
    """
    return _row_backward(grad_out, x, None, rstd, normalized_shape, weight, None, layout, out, activation, residual,
                         save_stats, True, grad_residual_out)
