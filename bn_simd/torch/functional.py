"""``torch.nn.functional``'s batch_norm, group_norm and instance_norm on bn_simd's kernels.

Same names, positional order, defaults and semantics as PyTorch's, plus a keyword ``out=``. A call runs on the
kernels when the input is a float32, float64, float16 or bfloat16 CPU tensor of a rank they cover (batch and group
norm 2 to 5, instance norm 3 to 5) and every per-channel tensor given is a CPU tensor of the input's dtype (or, for
16-bit input, every one float32: PyTorch's mixed rule, with float32 statistics and parameter gradients); any other
call (other dtypes, other devices, other ranks, eps <= 0, inf, NaN or a bool, a momentum outside [0, 1], NaN, a bool
or a tensor where running statistics update, tensor subclasses with ``__torch_function__``, calls made while tracing
or compiling a graph, which must record PyTorch's own operator, and calls inside forward-mode AD) is PyTorch's own
function, with its result copied into ``out`` when given.

When autograd records the call (grad mode on and input, weight or bias requiring grad) it goes through an autograd
Function whose backward gives the gradients of input, weight and bias; otherwise (``torch.no_grad()``,
``torch.inference_mode()``, or no tensor requiring grad) the kernels are called directly.

Memory: C-contiguous and channels-last (``torch.channels_last``, ``torch.channels_last_3d``, and a rank-3 tensor
whose channel axis has stride 1) inputs are read in place and the result has the input's memory format; other
strides are copied once and give a C-contiguous result.
"""
from torch.nn import functional as TF

from .. import _core
from . import _autograd
from . import fused as _fused
from . import _bridge as B

_RANKS_2_TO_5 = (2, 3, 4, 5)
_RANKS_3_TO_5 = (3, 4, 5)


def _torch_result(fn, out, *tensors):
    """PyTorch's own call fn() for a call the kernels do not cover, copied into out when given."""
    if out is not None and B.grad_needed(*tensors):
        B.no_out_with_grad(out)
    return B.fallback(fn(), out)


def _views(views, tensors, input, channel_args):
    """The ndarrays of the per-channel tensors: a module's cached views, or made here after the checks (None when
    the call goes to PyTorch)."""
    if views is not None:
        return views
    if not B.channels_supported(input, channel_args):
        return None
    return tuple(B.vec(t) for t in tensors)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, *,
               out=None, activation=None, residual=None):
    """Batch normalization (``torch.nn.functional.batch_norm``).

    y = (x - mean[c]) / sqrt(var[c] + eps) * weight[c] + bias[c]; training=True: the batch statistics over every
    axis but axis 1 (biased variance), and running_mean / running_var, when given, updated in place with
    ``(1 - momentum) running + momentum batch`` (unbiased variance); training=False: the running statistics.

    input : tensor (N, C, *spatial), rank 2..5 on the kernels (other ranks: PyTorch's function).
    running_mean, running_var : tensors (C,) of input's dtype (or float32 for float16/bfloat16 input, as every
        per-channel tensor of the call), or None (required when training=False).
    weight, bias : tensors (C,) of the same dtype, or None (1 and 0).
    out : tensor of input's shape and dtype on the CPU, or None; written in place (it may be input itself) and
        returned. Refused when autograd would record the call.
    activation, residual : bn_simd's fused epilogue (keywords, not PyTorch's): z = act(y + residual) in the same
        sweep, activation None, "relu", "relu6", ("leaky_relu", slope), ("clamp", lo, hi) or "silu", residual a
        tensor like input or None; gradients through both (:mod:`bn_simd.torch.fused`). A call the kernels do not
        cover computes PyTorch's composition.

    Returns y, in input's memory format. Raises TypeError for wrong types or dtypes (a per-channel tensor whose
    dtype is not input's, or float32 for 16-bit input, or per-channel tensors of both, as PyTorch does), ValueError
    for wrong shapes or values (one value per channel when training); a call that raises changes nothing.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, out, None, activation,
                       residual)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, out, views, activation=None,
                residual=None):
    """batch_norm; views: the ndarrays of (running_mean, running_var, weight, bias) already checked against input
    (a module's, see _bridge.module_views), or None."""
    if training:  # (every path writes y before the running statistics move, or copies it into out after)
        B.out_apart(out, running_mean, running_var)
    if activation is not None or residual is not None:
        return _fused.batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                     activation, residual, out, views)
    tensors = (running_mean, running_var, weight, bias)
    if B.input_supported(input, _RANKS_2_TO_5, eps) and (
            not (training and running_mean is not None) or B.momentum_supported(momentum)):
        views = _views(views, tensors, input, zip(("running_mean", "running_var", "weight", "bias"), tensors))
    else:
        views = None
    if views is None:
        return _torch_result(lambda: TF.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                                                   eps), out, input, weight, bias)
    if not (training and running_mean is not None):
        momentum = 0.0  # unused: not checked, as in PyTorch
    if B.grad_needed(input, weight, bias):
        B.no_out_with_grad(out)
        return _autograd.BatchNormFunction.apply(input, weight, bias, running_mean, running_var, training, momentum,
                                                 eps, views)
    x, layout, xa = B.dense(input)
    rm, rv, w, b = views
    y, ya, target = B.output(x, layout, out)
    _core.batch_norm(xa, rm, rv, w, b, training, momentum, eps, layout, ya, True, B._threads())
    return B.finish(y, target, (out, running_mean, running_var) if training else (out,))


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, out=None, activation=None, residual=None):
    """Group normalization (``torch.nn.functional.group_norm``).

    y = (x - mean[n, g]) / sqrt(var[n, g] + eps) * weight[c] + bias[c], the statistics of sample n's channels of
    group g = c // (C / num_groups) over those channels and every spatial position (biased variance).

    input : tensor (N, C, *spatial), rank 2..5 on the kernels. num_groups : int dividing C.
    weight, bias : tensors (C,) of input's dtype (or float32 for 16-bit input), or None. out : as in
        :func:`batch_norm`.
    activation, residual : the fused epilogue, as :func:`batch_norm`'s: z = act(y + residual) in the normalise sweep,
        gradients of input, weight, bias and residual through it (``GroupNormActFunction``).

    Returns y, in input's memory format. Raises TypeError / ValueError as :func:`batch_norm` (num_groups not
    dividing C; training-style statistics of one value, N C/G S == 1, as PyTorch).
    """
    if activation is not None or residual is not None:
        return _fused.group_norm_act(input, num_groups, weight, bias, eps, activation, residual, out, None)
    return _group_norm(input, num_groups, weight, bias, eps, out, None)


def _group_norm(input, num_groups, weight, bias, eps, out, views):
    """group_norm; views: the ndarrays of (weight, bias) already checked against input, or None."""
    tensors = (weight, bias)
    if B.input_supported(input, _RANKS_2_TO_5, eps):
        views = _views(views, tensors, input, zip(("weight", "bias"), tensors))
    else:
        views = None
    if views is None:
        return _torch_result(lambda: TF.group_norm(input, num_groups, weight, bias, eps), out, input, weight, bias)
    if B.grad_needed(input, weight, bias):
        B.no_out_with_grad(out)
        return _autograd.GroupNormFunction.apply(input, num_groups, weight, bias, eps, views)
    x, layout, xa = B.dense(input)
    y, ya, target = B.output(x, layout, out)
    _core.group_norm(xa, num_groups, views[0], views[1], eps, layout, ya, B._threads())
    return B.finish(y, target, (out,))


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5, *, out=None, activation=None, residual=None):
    """Instance normalization (``torch.nn.functional.instance_norm``).

    use_input_stats=True: each (sample, channel) normalised with its own mean and biased variance over the spatial
    positions; running_mean / running_var, when given, updated in place with the batch averages of those statistics
    (the variance unbiased). use_input_stats=False: the running statistics (required) for every sample.

    input : tensor (N, C, *spatial), rank 3..5 on the kernels. Other arguments as :func:`batch_norm`.
    activation, residual : the fused epilogue, as :func:`batch_norm`'s: z = act(y + residual) in the normalise sweep
        (the running statistics move as without it), gradients of input, weight, bias and residual through it
        (``InstanceNormActFunction``; use_input_stats=False: ``BatchNormActFunction`` in eval).

    Returns y, in input's memory format. Raises TypeError / ValueError as :func:`batch_norm` (one spatial element
    with use_input_stats).
    """
    return _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, out, None,
                          activation, residual)


def _instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, out, views,
                   activation=None, residual=None):
    """instance_norm; views as in _batch_norm."""
    if use_input_stats:  # (as in _batch_norm)
        B.out_apart(out, running_mean, running_var)
    if activation is not None or residual is not None:
        return _fused.instance_norm_act(input, running_mean, running_var, weight, bias, use_input_stats, momentum,
                                        eps, activation, residual, out, views)
    tensors = (running_mean, running_var, weight, bias)
    if B.input_supported(input, _RANKS_3_TO_5, eps) and (
            not (use_input_stats and running_mean is not None) or B.momentum_supported(momentum)):
        views = _views(views, tensors, input, zip(("running_mean", "running_var", "weight", "bias"), tensors))
    else:
        views = None
    if views is None:
        return _torch_result(lambda: TF.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats,
                                                      momentum, eps), out, input, weight, bias)
    if not use_input_stats and running_mean is None:
        raise ValueError("running_mean and running_var are required when use_input_stats=False")
    if not (use_input_stats and running_mean is not None):
        momentum = 0.0  # unused: not checked, as in PyTorch
    if B.grad_needed(input, weight, bias):
        B.no_out_with_grad(out)
        if use_input_stats:
            return B.kept_on_stop((running_mean, running_var), lambda: _autograd.InstanceNormFunction.apply(
                input, weight, bias, running_mean, running_var, momentum, eps, views))
        # the running statistics for every sample: batch norm's eval
        return _autograd.BatchNormFunction.apply(input, weight, bias, running_mean, running_var, False, 0.0, eps,
                                                 views)
    x, layout, xa = B.dense(input)
    rm, rv, w, b = views
    y, ya, target = B.output(x, layout, out)
    _core.instance_norm(xa, rm, rv, w, b, use_input_stats, momentum, eps, layout, ya, B._threads())
    return B.finish(y, target, (out, running_mean, running_var) if use_input_stats else (out,))


__all__ = ["batch_norm", "group_norm", "instance_norm"]
