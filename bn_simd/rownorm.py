"""Layer normalization and RMS normalization on NumPy arrays, with PyTorch's names, order and semantics.

Both normalise each position of x over ``normalized_shape``, x's trailing dims (a transformer token's features),
and scale (and shift) with per-element parameters of shape ``normalized_shape``:

    layer norm  y = (x - mean) / sqrt(var + eps) * weight + bias      (var biased)
    RMS norm    y = x / sqrt(mean(x^2) + eps) * weight                (eps None: the machine epsilon of x's
                                                                       dtype, float32's for 16-bit x)

``layout="NCHW"`` (or ``"channels_first"``) normalises over the channels (axis 1) of an (N, C, *spatial) array
instead, without a transpose: the LayerNorm2d of ConvNeXt, statistics per (sample, position), parameters (C,).
``normalized_shape`` is then C.

Data arrays are float32 or float64; statistics are computed in float64 (shifted sums), and results are bitwise the
same for any thread count. The saved statistics (mean, rstd = 1 / sqrt(var + eps)) have x's dtype and PyTorch's
shape: the leading dims then ones, (*x.shape[:-k], 1, ..., 1); channels-first (N, 1, *spatial).
"""
from . import _core
from .functional import _threads

# ---- layer norm -----------------------------------------------------------------------------------------------


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None, layout=None):
    """Layer normalization (``torch.nn.functional.layer_norm``).

    y = (x - mean) / sqrt(var + eps) * weight + bias, mean and the biased var over the trailing dims
    ``normalized_shape`` of each leading position.

    Parameters
    ----------
    x : ndarray, float32 or float64, of shape (*, *normalized_shape); any number of leading dims (0-sized too).
    normalized_shape : int or tuple of ints, x's trailing dims (``layout="NCHW"``: C, the size of axis 1).
    weight, bias : arrays of shape normalized_shape (or its flat size), any float dtype, or None (1 and 0).
    eps : float > 0.
    out : ndarray shaped and typed like x, C-contiguous; may be x itself (in place).
    layout : None (normalise the trailing dims), or "NCHW" / "channels_first": normalise over the channels of an
        (N, C, *spatial) array (rank >= 2) at each (sample, position); "NHWC" / "channels_last" is the default with
        normalized_shape = C.

    Returns y. Raises TypeError for wrong types/dtypes, ValueError for wrong shapes or values, naming the argument;
    a call that raises writes nothing.
    """
    return _core.row_norm(x, normalized_shape, weight, bias, eps, layout, out, _threads(), False)


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, *, eps=1e-5, out=None, layout=None):
    """Layer-norm forward for callers that run their own autograd (``torch.native_layer_norm``): returns
    (y, mean, rstd), mean and rstd = 1 / sqrt(var + eps) in x's dtype, shaped (*leading, 1, ..., 1)
    (channels-first: (N, 1, *spatial)), for :func:`layer_norm_backward`. Arguments as :func:`layer_norm`."""
    return _core.row_norm(x, normalized_shape, weight, bias, eps, layout, out, _threads(), False, 1)


def layer_norm_backward(grad_out, x, mean, rstd, normalized_shape, weight=None, bias=None, *, out=None,
                        layout=None):
    """Gradients of layer normalization (``torch.native_layer_norm_backward``).

    With D = prod(normalized_shape) values per position, x̂ = (x - mean) rstd, g = grad_out * weight (weight 1 when
    None), sums over each position's D values:
        grad_x      = rstd (g - sum(g) / D - x̂ sum(g x̂) / D)
        grad_weight = sum over the leading positions of grad_out * x̂
        grad_bias   = sum over the leading positions of grad_out

    grad_out : x's shape and dtype. mean, rstd : as :func:`layer_norm_forward` returns them (any float dtype; also
    accepted shaped as the leading dims alone). weight, bias : as the forward's; they say which parameter gradients
    are wanted. Returns (grad_x, grad_weight, grad_bias): grad_weight (grad_bias) is None when weight (bias) is None,
    else shaped and typed as it. ``out`` receives grad_x and may be grad_out or x itself.
    """
    return _core.row_norm_backward(grad_out, x, mean, rstd, normalized_shape, weight, bias, layout, out, _threads(),
                                   False)


# ---- RMS norm -------------------------------------------------------------------------------------------------


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None):
    """RMS normalization (``torch.nn.functional.rms_norm``).

    y = x / sqrt(mean(x^2) + eps) * weight, the mean over the trailing dims ``normalized_shape``; eps None is the
    machine epsilon of x's dtype (``np.finfo(x.dtype).eps``; float32's for float16 and bfloat16 x, whose math is
    float32), as PyTorch. Arguments as :func:`layer_norm`
    (no bias, no layout). Returns y; raises as :func:`layer_norm`.
    """
    return _core.row_norm(x, normalized_shape, weight, None, eps, None, out, _threads(), True)


def rms_norm_forward(x, normalized_shape, weight=None, *, eps=None, out=None):
    """RMS-norm forward for callers that run their own autograd: returns (y, rstd), rstd = 1 / sqrt(mean(x^2) + eps)
    in x's dtype shaped (*leading, 1, ..., 1), for :func:`rms_norm_backward`."""
    return _core.row_norm(x, normalized_shape, weight, None, eps, None, out, _threads(), True, 1)


def rms_norm_backward(grad_out, x, rstd, normalized_shape, weight=None, *, out=None):
    """Gradients of RMS normalization.

    With D = prod(normalized_shape), x̂ = x rstd, g = grad_out * weight (1 when None), sums over each position's D
    values:
        grad_x      = rstd (g - x̂ sum(g x̂) / D)
        grad_weight = sum over the leading positions of grad_out * x̂

    Returns (grad_x, grad_weight), grad_weight None when weight is None, else shaped and typed as it. Arguments as
    :func:`layer_norm_backward`.
    """
    return _core.row_norm_backward(grad_out, x, None, rstd, normalized_shape, weight, None, None, out, _threads(),
                                   True)
