"""``torch.nn.functional``'s layer_norm and rms_norm on bn_simd's row kernels, with autograd.

Same names, positional order, defaults and semantics as PyTorch's, plus a keyword ``out=``. The trailing dims of the
input given by ``normalized_shape`` form a row; each row is normalised with its own statistics (mean and biased
variance for layer norm, mean square for RMS norm), then scaled (and shifted) by the per-column weight (and bias)::

    layer_norm:  y = (x - mean) / sqrt(var + eps) * weight + bias
    rms_norm:    y = x / sqrt(mean(x^2) + eps) * weight

(RMS norm's eps None: torch.finfo(input.dtype).eps; float32's for 16-bit input.)

A call runs on the kernels when the input is a float32, float64, float16 or bfloat16 CPU tensor and weight and bias,
when given, are CPU tensors of the input's dtype (or both float32 for 16-bit input: PyTorch's mixed rule; the
statistics are then float32 and the parameters' gradients have their dtype). Any other call (other dtypes, other
devices, eps <= 0, inf, NaN or a bool, tensor subclasses with
``__torch_function__``, calls made while tracing or compiling a graph, which must record PyTorch's operator, and
calls inside forward-mode AD) is PyTorch's own function, its result copied into ``out`` when given.

When autograd records the call (grad mode on and input, weight or bias requiring grad) it goes through
:class:`LayerNormFunction` / :class:`RMSNormFunction`, whose backward runs :func:`bn_simd.layer_norm_backward` /
:func:`bn_simd.rms_norm_backward` with the statistics the forward kept; otherwise the forward kernel is called
directly. Second derivatives (``create_graph=True`` through these Functions) raise.

Memory: a C-contiguous input (and gradient) is read in place and the output written in place; other strides
(the row dims are the innermost, so channels-last tensors too) are copied once to C order, and the result is
C-contiguous.
"""
import numbers

import numpy as np
import torch
from torch.nn import functional as TF

import bn_simd as _bn

from .. import _core, _epilogue
from . import _bridge as B

# any rank from 1 (the kernels check normalized_shape against it and raise ValueError when it does not fit)
_RANKS = range(1, 65)


def _normalized_shape(normalized_shape):
    """normalized_shape as a tuple: an int is one trailing dim; a list, tuple or torch.Size is kept as a tuple
    (its entries are checked by the kernels' argument checks)."""
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        return (int(normalized_shape),)
    if isinstance(normalized_shape, (list, tuple, torch.Size)):
        return tuple(normalized_shape)
    raise TypeError(f"normalized_shape must be an int or a list/tuple of ints, got {type(normalized_shape).__name__}")


def _views(input, params, views, shape):
    """The ndarrays of the per-column tensors (weight, bias; None kept): a module's cached views, or made here after
    the checks (shape: normalized_shape, a tuple). None when the call goes to PyTorch's function."""
    if views is not None:
        return views
    _check_shapes(shape, params)
    if not B.channels_supported(input, params):
        return None
    return tuple(B.vec(t) for _, t in params)


def _check_shapes(shape, params):
    """PyTorch's rule for the per-column tensors: of shape normalized_shape, not merely of as many elements (the NumPy
    functions take either)."""
    for name, t in params:
        if isinstance(t, torch.Tensor) and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape normalized_shape {list(shape)}, got shape {list(t.shape)}")


def _name_input(input, shape, residual, out):
    """After the kernels' checks refused a call (their messages name the array x): raises the ValueError of the
    first check that fails here, naming input as this module's functions do; returns when none does."""
    k = len(shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k:]) != tuple(shape):
        raise ValueError(f"input must have shape [*, {', '.join(map(str, shape))}] for normalized_shape={list(shape)},"
                         f" got {input.dim()}-D input of shape {list(input.shape)}")
    if residual is not None:
        B.check_like(residual, input, "residual")
    if (out is not None and (out.data_ptr(), out.stride()) != (input.data_ptr(), input.stride())
            and np.may_share_memory(B._numpy(out), B._numpy(input))):
        raise ValueError("out overlaps input partially; pass input itself for in-place operation or a separate tensor")


def _dense(x):
    """(x, its ndarray) with x in C order: x itself when it is, else one copy (also of a negative-bit view, whose
    memory holds -x: a gradient may arrive as one)."""
    if x.is_neg():
        x = x.resolve_neg()
    if not x.is_contiguous():
        x = x.contiguous()
    return x, B._numpy(x)


def _empty(xa):
    """(tensor, ndarray) sharing a new C-contiguous array of xa's shape and dtype (NumPy's allocation and one
    torch.from_numpy cost a third of torch.empty and Tensor.numpy on small rows)."""
    a = np.empty(xa.shape, xa.dtype)
    return B.from_array(a), a


def _output(x, xa, out):
    """(y, its ndarray, target) for a forward of C-contiguous x (xa its ndarray): target is the out tensor to copy y
    into afterwards when out is not C-contiguous (else None)."""
    if out is None:
        return (*_empty(xa), None)
    B.check_out(out, x)
    if out.is_contiguous():
        return out, B._numpy(out), None
    return (*_empty(xa), out)


def _torch_result(fn, out, *tensors):
    """PyTorch's own call fn() for a call the kernels do not cover, copied into out when given."""
    if out is not None and B.grad_needed(*tensors):
        B.no_out_with_grad(out)
    return B.fallback(fn(), out)


def _grad(a, like):
    """A per-column gradient (ndarray) as a tensor of like's shape and dtype."""
    return B.grad_as(a, like.dtype).reshape(like.shape)


# ---- layer norm -----------------------------------------------------------------------------------------------------

def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None, activation=None,
               residual=None):
    """Layer normalization (``torch.nn.functional.layer_norm``).

    input : tensor (*, *normalized_shape); float32, float64, float16 and bfloat16 CPU tensors run on the kernels.
    normalized_shape : int or sequence of ints, the trailing dims normalised together (a row).
    weight, bias : tensors of shape normalized_shape and input's dtype (float32 too for 16-bit input), or None (1
        and 0).
    eps : float > 0 added to the variance (eps <= 0, inf, NaN or a bool: PyTorch's function).
    out : tensor of input's shape and dtype on the CPU, or None; written (it may be input itself) and returned.
        Refused when autograd would record the call.
    activation, residual : bn_simd's fused epilogue (keywords, not PyTorch's), as :func:`bn_simd.torch.batch_norm`'s:
        z = act(y + residual) in the normalise sweep, gradients of input, weight, bias and residual through it
        (:class:`RowNormActFunction`); a call the kernels do not cover computes PyTorch's composition.

    Returns y, C-contiguous, of input's shape and dtype. Raises TypeError for wrong types or dtypes (weight or bias of a
    dtype other than input's, or float32 for 16-bit input; weight and bias of different dtypes), ValueError for wrong
    shapes (normalized_shape not the trailing dims of input, weight or bias not of shape normalized_shape); a call that
    raises changes nothing.
    """
    if activation is not None or residual is not None:
        return _row_norm_act(input, normalized_shape, weight, bias, eps, False, activation, residual, out, None)
    return _layer_norm(input, normalized_shape, weight, bias, eps, out, None)


def _layer_norm(input, normalized_shape, weight, bias, eps, out, views):
    """layer_norm; views: the ndarrays of (weight, bias) already checked against input (a module's), or None."""
    shape = _normalized_shape(normalized_shape)
    if B.input_supported(input, _RANKS, eps):
        views = _views(input, (("weight", weight), ("bias", bias)), views, shape)
    else:
        views = None
    if views is None:
        return _torch_result(lambda: TF.layer_norm(input, shape, weight, bias, eps), out, input, weight, bias)
    try:
        if B.grad_needed(input, weight, bias):
            B.no_out_with_grad(out)
            return LayerNormFunction.apply(input, shape, weight, bias, eps, views)
        x, xa = _dense(input)
        y, ya, target = _output(x, xa, out)
        _bn.layer_norm(xa, shape, views[0], views[1], eps, out=ya)
    except ValueError:
        _name_input(input, shape, None, out)
        raise
    return B.finish(y, target, (out,))


class LayerNormFunction(torch.autograd.Function):
    """y = (x - mean) rstd weight + bias over rows of normalized_shape; the backward gives the gradients of x,
    weight and bias from the forward's mean and rstd.

    apply(x, normalized_shape (tuple), weight, bias, eps, views): views are the ndarrays of (weight, bias), checked
    against x.
    """

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, views):
        x, xa = _dense(x)
        y, ya = _empty(xa)
        _, mean, rstd = _bn.layer_norm_forward(xa, normalized_shape, views[0], views[1], eps=eps, out=ya)
        ctx.save_for_backward(x, weight, bias)
        ctx.stats = (mean, rstd, normalized_shape, views)
        return y

    @staticmethod
    @B.first_order
    def backward(ctx, grad_y):
        x, weight, bias = ctx.saved_tensors
        mean, rstd, normalized_shape, views = ctx.stats
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        grad_y, ga = _dense(grad_y)
        xa = B._numpy(x)
        grad_x, gxa = _empty(xa)
        _, gw, gb = _bn.layer_norm_backward(ga, xa, mean, rstd, normalized_shape, views[0], views[1], out=gxa)
        return (grad_x if need_x else None, None, _grad(gw, weight) if need_w else None,
                _grad(gb, bias) if need_b else None, None, None)


# ---- RMS norm -------------------------------------------------------------------------------------------------------

def rms_norm(input, normalized_shape, weight=None, eps=None, *, out=None, activation=None, residual=None):
    """Root-mean-square normalization (``torch.nn.functional.rms_norm``).

    input : tensor (*, *normalized_shape); float32, float64, float16 and bfloat16 CPU tensors run on the kernels.
    normalized_shape : int or sequence of ints, the trailing dims normalised together (a row).
    weight : tensor of shape normalized_shape and input's dtype (float32 too for 16-bit input), or None (1).
    eps : float > 0 added to the mean square, or None: the machine epsilon of input's dtype (float32's for float16
        and bfloat16 input, which compute in float32), as PyTorch (eps <= 0, inf, NaN or a bool: PyTorch's function).
    out, activation, residual : as in :func:`layer_norm`.

    Returns y, C-contiguous, of input's shape and dtype. Raises TypeError / ValueError as :func:`layer_norm`.
    """
    if activation is not None or residual is not None:
        return _row_norm_act(input, normalized_shape, weight, None, eps, True, activation, residual, out, None)
    return _rms_norm(input, normalized_shape, weight, eps, out, None)


def _rms_norm(input, normalized_shape, weight, eps, out, views):
    """rms_norm; views: the ndarrays of (weight,) already checked against input, or None."""
    shape = _normalized_shape(normalized_shape)
    if B.input_supported(input, _RANKS, eps):
        views = _views(input, (("weight", weight),), views, shape)
    else:
        views = None
    if views is None:
        return _torch_result(lambda: TF.rms_norm(input, shape, weight, eps), out, input, weight)
    try:
        if B.grad_needed(input, weight):
            B.no_out_with_grad(out)
            return RMSNormFunction.apply(input, shape, weight, eps, views)
        x, xa = _dense(input)
        y, ya, target = _output(x, xa, out)
        _bn.rms_norm(xa, shape, views[0], eps, out=ya)
    except ValueError:
        _name_input(input, shape, None, out)
        raise
    return B.finish(y, target, (out,))


class RMSNormFunction(torch.autograd.Function):
    """y = x rstd weight over rows of normalized_shape; the backward gives the gradients of x and weight from the
    forward's rstd.

    apply(x, normalized_shape (tuple), weight, eps, views): views are the ndarrays of (weight,), checked against x.
    """

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps, views):
        x, xa = _dense(x)
        y, ya = _empty(xa)
        _, rstd = _bn.rms_norm_forward(xa, normalized_shape, views[0], eps=eps, out=ya)
        # (an inference-mode x with a weight that needs grad: torch.nn.RMSNorm saves its own intermediates, never
        # x, and runs; an inference tensor cannot be saved, a copy can)
        ctx.save_for_backward(B.savable(x), weight)
        ctx.stats = (rstd, normalized_shape, views)
        return y

    @staticmethod
    @B.first_order
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        rstd, normalized_shape, views = ctx.stats
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_y, ga = _dense(grad_y)
        xa = B._numpy(x)
        grad_x, gxa = _empty(xa)
        _, gw = _bn.rms_norm_backward(ga, xa, rstd, normalized_shape, views[0], out=gxa)
        return grad_x if need_x else None, None, _grad(gw, weight) if need_w else None, None, None


# ---- through a fused epilogue ----------------------------------------------------------------------------------------

def _row_norm_act(input, normalized_shape, weight, bias, eps, rms, activation, residual, out, views):
    """layer_norm / rms_norm with ``activation`` and/or ``residual``; views as _layer_norm's / _rms_norm's."""
    from .fused import _torch_activation
    act = _epilogue.parse(activation)
    if residual is not None:
        B.check_tensor(residual, "residual", "a torch.Tensor or None")
    shape = _normalized_shape(normalized_shape)
    params = (("weight", weight),) if rms else (("weight", weight), ("bias", bias))
    if B.input_supported(input, _RANKS, eps) and (residual is None or B.input_supported(residual, (input.dim(),), eps)):
        views = _views(input, params, views, shape)
    else:
        views = None
    if views is None:
        def composed():
            y = TF.rms_norm(input, shape, weight, eps) if rms else TF.layer_norm(input, shape, weight, bias, eps)
            return _torch_activation(y if residual is None else y + residual, activation)
        return _torch_result(composed, out, input, weight, bias, residual)
    try:
        if B.grad_needed(input, weight, bias, residual):
            B.no_out_with_grad(out)
            return RowNormActFunction.apply(input, shape, weight, bias, residual, eps, rms, act, views)
        x, xa = _dense(input)
        ra = None if residual is None else _dense(residual)[1]
        y, ya, target = _output(x, xa, out)
        _core.row_forward_epi(xa, shape, views[0], None if rms else views[1], eps, None, ya, B._threads(), rms, act,
                              ra, 2)
    except (TypeError, ValueError):  # (a bfloat16 residual's kernel check names its uint16 view)
        _name_input(input, shape, residual, out)
        raise
    return B.finish(y, target, (out,))


class RowNormActFunction(torch.autograd.Function):
    """z = act(layer_norm(x) + residual) (rms: RMS norm's); the backward recomputes u from x with the forward's
    float64 statistics and gives the gradients of x, weight, bias and residual.

    apply(x, normalized_shape (tuple), weight, bias, residual, eps, rms, act, views): act is bn_simd's parsed
    activation tuple, views the ndarrays of (weight, bias) (RMS: (weight,)).
    """

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, residual, eps, rms, act, views):
        x, xa = _dense(x)
        ra = None if residual is None else _dense(residual)[1]
        y, ya = _empty(xa)
        b = None if rms else views[1]
        _, mean, rstd = _core.row_forward_epi(xa, normalized_shape, views[0], b, eps, None, ya, B._threads(), rms, act,
                                              ra, 2)
        ctx.save_for_backward(B.savable(x) if rms else x, weight, bias, B.savable(residual))
        ctx.stats = (mean, rstd, normalized_shape, views, rms, act)
        return y

    @staticmethod
    @B.first_order
    def backward(ctx, grad_y):
        x, weight, bias, residual = ctx.saved_tensors
        mean, rstd, normalized_shape, views, rms, act = ctx.stats
        need_x, need_w, need_b, need_r = (ctx.needs_input_grad[i] for i in (0, 2, 3, 4))
        grad_y, ga = _dense(grad_y)
        xa = B._numpy(x)
        ra = None if residual is None else _dense(residual)[1]
        grad_x, gxa = _empty(xa)
        r = _core.row_backward_epi(ga, xa, mean, rstd, normalized_shape, views[0], None if rms else views[1], None,
                                   gxa, B._threads(), rms, act, ra)
        gw, gb, gr = (r[1], None, r[2]) if rms else r[1:]
        return (grad_x if need_x else None, None, _grad(gw, weight) if need_w and weight is not None else None,
                _grad(gb, bias) if need_b and bias is not None else None,
                B.from_array(gr) if need_r and gr is not None else None, None, None, None, None)


__all__ = ["layer_norm", "rms_norm", "LayerNormFunction", "RMSNormFunction", "RowNormActFunction"]
