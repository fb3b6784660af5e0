"""Folding an inference-mode batch norm into the convolution or linear layer beside it.

In eval mode a batch norm is an affine map per channel c:

    y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c] = x * scale[c] + shift[c]
    scale = weight / sqrt(var + eps),   shift = bias - mean * scale

and a convolution or linear layer is linear, so the pair is one layer of the same kind:

    BN after:  BN(conv(x))  = conv'(x)  with  w'[o, i, k] = w[o, i, k] * scale[o],
                                              b'[o]       = b[o] * scale[o] + shift[o]
    BN before: conv(BN(x))  = conv'(x)  with  w'[o, i, k] = w[o, i, k] * scale[c(o, i)],
                                              b'[o]       = b[o] + sum_{i, k} w[o, i, k] * shift[c(o, i)]

where c(o, i) is the input channel that weight entry reads: i itself for an ungrouped conv, and
(o // (O / groups)) * (C_in / groups) + i for a grouped one (depthwise: groups = C_in). BN after the conv is exact
for every stride, dilation and padding. BN before the conv is exact when the conv does not pad: zero padding adds
zeros *after* the BN in the original network, but the folded conv pads the BN's *input* with zeros, which the BN
would have mapped to shift[c]. Outputs whose window reads padding then differ by sum over the padded taps of
w[o, i, k] * shift[c(o, i)]; every other output is the same. (Padding the input with -shift[c] / scale[c] per
channel instead of zeros makes the folded conv exact again.)

Everything is computed in float64 and returned in the dtype of the layer's weight (bfloat16 too: ml_dtypes' dtype,
rounded once from float64); nothing given is modified.
"""
import math
import numbers

import numpy as np

from . import _args as ck

__all__ = ["fold_params", "fold_conv", "fold_linear"]

_FLOATS = (np.float16, np.float32, np.float64)

# Canonical weight layouts: where the output (O) and input (I) channel axes are; the other axes are spatial.
# Rank-specific spellings name the same layouts for 1-d and 3-d convs.
_CONV_LAYOUTS = {
    "OIHW": "OI*", "OIW": "OI*", "OIDHW": "OI*",      # PyTorch: (out, in / groups, *kernel)
    "HWIO": "*IO", "WIO": "*IO", "DHWIO": "*IO",      # TensorFlow / Keras: (*kernel, in / groups, out)
    "OHWI": "O*I", "OWI": "O*I", "ODHWI": "O*I",      # channels-last runtimes (oneDNN, TFLite): (out, *kernel, in)
}
_LINEAR_LAYOUTS = {"OI": 0, "IO": 1}  # axis of the output features: PyTorch (out, in); Keras Dense (in, out)


def _describe(obj):
    return f"ndarray of dtype {obj.dtype} and shape {obj.shape}" if isinstance(obj, np.ndarray) else type(obj).__name__


def _array(obj, name):
    """obj as an ndarray (lists, NumPy arrays, CPU tensors that do not require grad), not copied when possible."""
    if isinstance(obj, np.ndarray):
        return np.asarray(obj)
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):  # a torch.Tensor
        if getattr(obj, "requires_grad", False):
            raise TypeError(f"{name} is a torch.Tensor that requires grad, and folding does not record gradients: "
                            f"pass {name}.detach() (bn_simd.torch.fold folds a whole model)")
        t = obj.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # NumPy has no bfloat16; widening is exact (the result: float32,
            t = t.float()                      # whatever else is installed, so torch.from_numpy takes it)
        return t.numpy()
    try:
        a = np.asarray(obj)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array of floats, got {_describe(obj)}: {e}") from None
    if a.dtype == object:
        raise TypeError(f"{name} must be an array of floats, got {_describe(obj)}")
    return a


def _f64(a):
    """A float array (bfloat16 too, widened exactly) as float64."""
    return np.asarray(ck.bf16_widened(a), np.float64)


def _weight(obj, name, ranks):
    """The layer's weight: a float16/32/64 or bfloat16 array of one of the ranks `ranks`."""
    w = _array(obj, name)
    if w.dtype.type not in _FLOATS and not ck.is_bf16(w.dtype):
        raise TypeError(f"{name} must be an array of float16, float32, float64 or bfloat16, got {_describe(w)}")
    if w.ndim not in ranks:
        raise ValueError(f"{name} must have rank {' or '.join(map(str, ranks))}, got shape {w.shape}")
    return w


def _real(obj, name):
    """obj as an array of real numbers (bfloat16 widened exactly; other dtypes as they are), else TypeError."""
    a = ck.bf16_widened(_array(obj, name))
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be an array of real numbers, got {_describe(a)}")
    return a


def _vector(obj, name, n, what):
    """A float64 copy of a per-channel array of shape (n,); None stays None."""
    if obj is None:
        return None
    a = _real(obj, name)
    if a.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) ({what}), got shape {a.shape}")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got non-finite values at {np.flatnonzero(~np.isfinite(a))[:8]}")
    return a


def _eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    try:
        e = float(eps)
    except OverflowError:
        raise ValueError(f"eps must be finite and > 0, got a number beyond float's range ({type(eps).__name__})") \
            from None
    if not (e > 0.0 and math.isfinite(e)):
        raise ValueError(f"eps must be finite and > 0, got {eps!r}")
    return e


def _scale_shift(running_mean, running_var, weight, bias, eps, n=None, what="BN channels"):
    """Validated float64 (scale, shift) of shape (C,); C from running_mean unless n is given."""
    eps = _eps(eps)
    if n is None:
        if running_mean is None:
            raise TypeError("running_mean must be an array of shape (C,), got None")
        rm = _real(running_mean, "running_mean")  # (the type first, as _vector: a string is not a shape error)
        if rm.ndim != 1:
            raise ValueError(f"running_mean must have shape (C,), got shape {rm.shape}")
        n = rm.shape[0]
    for arr, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if arr is None:
            raise TypeError(f"{name} must be an array of shape ({n},), got None (folding needs running statistics)")
    mean = _vector(running_mean, "running_mean", n, what)
    var = _vector(running_var, "running_var", n, what)
    if np.any(var < 0):
        raise ValueError(f"running_var must be >= 0, got negative values at {np.flatnonzero(var < 0)[:8]}")
    w = _vector(weight, "weight", n, what)
    b = _vector(bias, "bias", n, what)
    with np.errstate(over="ignore", invalid="ignore"):
        scale = 1.0 / np.sqrt(var + eps)
        if w is not None:
            scale = scale * w
        shift = -mean * scale
        if b is not None:
            shift = shift + b
    _finite64(scale, shift)
    return scale, shift


def _finite64(*arrays):
    """Folded values computed in float64 from finite inputs: any infinity or NaN is float64's own overflow."""
    for a in arrays:
        if not np.all(np.isfinite(a)):
            raise ValueError("the folded values overflow float64 (a scale or shift beyond 1.8e308): the batch norm's "
                             "weight / sqrt(running_var + eps) or its product with the layer's weights is out of range")


def _position(position):
    if position not in ("after", "before"):
        raise ValueError(f"position must be 'after' (BN applied to the layer's output) or 'before' (to its input), "
                         f"got {position!r}")
    return position


def _finish(w2, b2, dtype, w_src=None, b_ok=None):
    """w2, b2 (float64) cast to dtype (bfloat16 rounded once); an overflow there (the inputs were finite) raises
    rather than returns inf, and so does float64's own overflow: an entry of w2 whose weight in w_src (float64, w2's
    layout) is finite, or of b2 where b_ok (the entries computed from finite weights, all of them when None; the rest
    was checked finite). A non-finite weight passes through to what it reaches, as in the unfolded layer."""
    if w_src is not None:
        b_ok = np.ones(b2.shape, bool) if b_ok is None else b_ok
        if np.any(~np.isfinite(w2) & np.isfinite(w_src)) or np.any(~np.isfinite(b2) & b_ok):
            _finite64(w2, b2)
    if ck.is_bf16(dtype):
        w_out, b_out = ck.bf16_bits(w2), ck.bf16_bits(b2)
        if dtype is not ck.BF16_BITS:
            w_out, b_out = w_out.view(dtype), b_out.view(dtype)
    else:
        with np.errstate(over="ignore"):
            w_out, b_out = w2.astype(dtype), b2.astype(dtype)
    dname = "bfloat16" if ck.is_bf16(dtype) else np.dtype(dtype).name
    for out, src, name in ((w_out, w2, "weight"), (b_out, b2, "bias")):
        bad = ~np.isfinite(_f64(out)) & np.isfinite(src)
        if np.any(bad):
            raise ValueError(f"the folded {name} overflows {dname} (largest magnitude "
                             f"{np.max(np.abs(src[np.isfinite(src)])):.3g}); fold in float64 weights instead")
    return w_out, b_out


def fold_params(running_mean, running_var, weight=None, bias=None, eps=1e-5, *, dtype=None):
    """The per-channel affine map of a batch norm in eval mode: ``y = x * scale + shift`` with

        scale = weight / sqrt(running_var + eps),   shift = bias - running_mean * scale

    running_mean, running_var: arrays (C,) of real numbers (required, finite, running_var >= 0); weight, bias:
    arrays (C,) or None (1 and 0: ``affine=False``); eps: a real number > 0. Computed in float64; returned as two
    arrays (C,) of ``dtype`` (default: the promoted float dtype of the given arrays, float64 for integers; bfloat16,
    ml_dtypes' dtype, is taken and returned too, rounded once from float64).

    Raises TypeError for a non-array or non-real argument or eps, ValueError for shapes that differ from (C,),
    non-finite values, a negative variance, eps <= 0, or a scale/shift that overflows ``dtype``.
    """
    scale, shift = _scale_shift(running_mean, running_var, weight, bias, eps)
    if dtype is None:
        dts = [_array(a, "").dtype for a in (running_mean, running_var, weight, bias) if a is not None]
        dts = [np.dtype(np.float32) if d is ck.BF16_BITS else d for d in dts]  # (bits: as their widening)
        dtype = np.result_type(*[d for d in dts if d.kind == "f" or ck.is_bf16(d)] or [np.float64])
    try:
        dtype = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be a float dtype, got {dtype!r}: {e}") from None
    if dtype.type not in _FLOATS and not ck.is_bf16(dtype):
        raise TypeError(f"dtype must be float16, float32, float64 or bfloat16, got {dtype}")
    return _finish(scale, shift, dtype)


def _conv_axes(layout, ndim):
    """(axis of O, axis of I) of a conv weight of rank ndim in `layout`."""
    if not isinstance(layout, str) or layout.upper() not in _CONV_LAYOUTS:
        raise ValueError(f"weight_layout must be one of {sorted(set(_CONV_LAYOUTS))} (O: output channels, I: input "
                         f"channels per group, D/H/W: kernel), got {layout!r}")
    name = layout.upper()
    if len(name) in (3, 5) and len(name) != ndim:  # a rank-specific spelling (OIW, DHWIO, ...)
        raise ValueError(f"weight_layout {layout!r} is for weights of rank {len(name)}, got conv_weight of rank {ndim}")
    pattern = _CONV_LAYOUTS[name]
    o_ax = {"OI*": 0, "*IO": ndim - 1, "O*I": 0}[pattern]
    i_ax = {"OI*": 1, "*IO": ndim - 2, "O*I": ndim - 1}[pattern]
    return o_ax, i_ax


def _groups(groups, O, name_o="output channels"):
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if groups < 1 or O % groups:
        raise ValueError(f"groups must be >= 1 and divide the {O} {name_o}, got {groups}")
    return int(groups)


def fold_conv(conv_weight, conv_bias, running_mean, running_var, weight=None, bias=None, eps=1e-5, *,
              weight_layout="OIHW", position="after", groups=1):
    """Fold an eval-mode batch norm into the convolution it follows or precedes: returns (w2, b2) such that
    conv(x; w2, b2) = BN(conv(x; conv_weight, conv_bias)) (``position="after"``, the default) or
    conv(BN(x); conv_weight, conv_bias) (``position="before"``).

    conv_weight: float16/32/64 or bfloat16 (ml_dtypes) array of a 1-, 2- or 3-d conv in ``weight_layout``: "OIHW"
    (PyTorch: (O, I/groups, *kernel)), "HWIO" (TensorFlow/Keras: (*kernel, I/groups, O)) or "OHWI" ((O, *kernel,
    I/groups)), for any kernel rank 1-3 (the spellings "OIW", "OIDHW", "WIO", "DHWIO", "OWI", "ODHWI" also check
    the rank).
    A Keras DepthwiseConv2D kernel (kh, kw, C, M) is the "HWIO" kernel reshaped to (kh, kw, 1, C * M) with
    groups = C. conv_bias: array (O,) or None (zero; a bias is returned all the same).
    running_mean, running_var, weight, bias, eps: the batch norm's (weight/bias None: ``affine=False``), of length
    O (after) or of the conv's input channels I = groups * (I/groups) (before).
    groups: the conv's groups (depthwise: groups = input channels); only "before" depends on it.

    With w' = w * scale and scale, shift = ``fold_params(...)``:
        after:  w2[o, i, k] = w[o, i, k] * scale[o],  b2[o] = b[o] * scale[o] + shift[o]
        before: w2[o, i, k] = w[o, i, k] * scale[c],  b2[o] = b[o] + sum_{i, k} w[o, i, k] * shift[c],
                c = (o // (O / groups)) * (I / groups) + i, the input channel the entry reads.
    "after" is exact for any stride, dilation and padding. "before" is exact for a conv without padding; with zero
    padding, outputs whose window covers padding differ by the sum over the padded taps of w[o, i, k] * shift[c]
    (the original pads BN's output with zeros, the folded conv pads BN's input, which BN would map to shift);
    padding the input with -shift[c] / scale[c] instead of zeros makes it exact.

    Computed in float64; w2 has conv_weight's shape, layout and dtype, b2 shape (O,) and the same dtype (a torch
    bfloat16 weight gives float32, which torch.from_numpy takes: round it with .to(torch.bfloat16), or fold the
    module with bn_simd.torch.fold, which rounds once). Non-finite conv weights pass through to the entries they
    reach. Nothing given is modified. Raises TypeError (non-float weight, non-real arrays or eps, non-int groups) and
    ValueError
    (rank, layout, position, groups, shapes that do not agree, non-finite BN values, negative variance,
    eps <= 0, a result that overflows the weight's dtype), each naming the argument.
    """
    w = _weight(conv_weight, "conv_weight", (3, 4, 5))
    o_ax, i_ax = _conv_axes(weight_layout, w.ndim)
    position = _position(position)
    O, I_g = w.shape[o_ax], w.shape[i_ax]
    groups = _groups(groups, O)
    b = _vector(conv_bias, "conv_bias", O, "the conv's output channels")
    # canonical float64 view (O, I/groups, K): K the kernel's taps
    wf = _f64(w)
    w64 = np.moveaxis(wf, (o_ax, i_ax), (0, 1))
    wc = w64.reshape(O, I_g, math.prod(w64.shape[2:]))  # (no -1: O or I may be 0)
    if position == "after":
        scale, shift = _scale_shift(running_mean, running_var, weight, bias, eps, O,
                                    "the conv's output channels, position='after'")
        with np.errstate(over="ignore", invalid="ignore"):
            w2 = wc * scale[:, None, None]
            b2 = (b * scale if b is not None else 0.0) + shift
    else:
        C_in = groups * I_g
        scale, shift = _scale_shift(running_mean, running_var, weight, bias, eps, C_in,
                                    f"the conv's input channels, groups * conv_weight's I = {groups} * {I_g}, "
                                    f"position='before'")
        # input channel of entry (o, i): group of o times I/groups, plus i
        chan = (np.arange(O) // (O // groups))[:, None] * I_g + np.arange(I_g)[None, :]   # (O, I/groups)
        with np.errstate(over="ignore", invalid="ignore"):
            w2 = wc * scale[chan][:, :, None]
            b2 = (b if b is not None else 0.0) + np.einsum("oik,oi->o", wc, shift[chan])
    w2 = np.moveaxis(w2.reshape(w64.shape), (0, 1), (o_ax, i_ax))
    b2 = np.broadcast_to(np.asarray(b2, np.float64), (O,))
    b_ok = np.isfinite(wc).all(axis=(1, 2)) if position == "before" else np.ones(O, bool)
    return _finish(np.ascontiguousarray(w2), b2, w.dtype, wf, b_ok)


def fold_linear(W, b, running_mean, running_var, weight=None, bias=None, eps=1e-5, *, weight_layout="OI",
                position="after"):
    """Fold an eval-mode batch norm into the linear layer it follows (``position="after"``: BatchNorm1d on the
    layer's (N, out) output) or precedes (``"before"``: on its (N, in) input). Returns (W2, b2) with
    x @ W2.T + b2 = BN(x @ W.T + b) (after) or BN(x) @ W.T + b (before), exactly.

    W: float16/32/64 or bfloat16 array (out, in) (``weight_layout="OI"``, PyTorch's nn.Linear) or (in, out)
    (``"IO"``, a Keras Dense kernel); b: array (out,) or None (zero; a bias is returned all the same).
    running_mean, running_var, weight, bias, eps: the batch norm's, of length out (after) or in (before);
    weight/bias None for affine=False.

        after:  W2[o, i] = W[o, i] * scale[o],  b2[o] = b[o] * scale[o] + shift[o]
        before: W2[o, i] = W[o, i] * scale[i],  b2[o] = b[o] + sum_i W[o, i] * shift[i]
    with scale, shift = ``fold_params(...)``. Computed in float64, returned in W's dtype and layout.
    Raises TypeError/ValueError as :func:`fold_conv`, naming the argument.
    """
    w = _weight(W, "W", (2,))
    if not isinstance(weight_layout, str) or weight_layout.upper() not in _LINEAR_LAYOUTS:
        raise ValueError(f"weight_layout must be 'OI' (out, in) or 'IO' (in, out), got {weight_layout!r}")
    position = _position(position)
    o_ax = _LINEAR_LAYOUTS[weight_layout.upper()]
    wf = _f64(w)
    w64 = np.moveaxis(wf, o_ax, 0)   # (out, in)
    O, I = w64.shape
    bb = _vector(b, "b", O, "the layer's output features")
    if position == "after":
        scale, shift = _scale_shift(running_mean, running_var, weight, bias, eps, O,
                                    "the layer's output features, position='after'")
        with np.errstate(over="ignore", invalid="ignore"):
            w2 = w64 * scale[:, None]
            b2 = (bb * scale if bb is not None else 0.0) + shift
    else:
        scale, shift = _scale_shift(running_mean, running_var, weight, bias, eps, I,
                                    "the layer's input features, position='before'")
        with np.errstate(over="ignore", invalid="ignore"):
            w2 = w64 * scale[None, :]
            b2 = (bb if bb is not None else 0.0) + w64 @ shift
    w2 = np.ascontiguousarray(np.moveaxis(w2, 0, o_ax))
    b2 = np.broadcast_to(np.asarray(b2, np.float64), (O,))
    b_ok = np.isfinite(w64).all(axis=1) if position == "before" else np.ones(O, bool)
    return _finish(w2, b2, w.dtype, wf, b_ok)
