"""autograd Functions over the kernels: batch norm, group norm, instance norm.

Each forward runs the kernels on NumPy views of the tensors (see _bridge) and keeps the statistics it normalised
with, in float64 ((C,) for batch norm, (N, groups) for group and instance norm: a mean rounded to x's dtype loses
digits where |mean| >> std); each backward returns the gradients of input, weight and bias that PyTorch's autograd
gives (the parameters' in their dtype, float32 parameters of 16-bit data included), from the formulas of
:func:`bn_simd.batch_norm_backward` and :func:`bn_simd.group_norm_backward`. The backwards are not themselves
differentiable (``once_differentiable``): a second derivative (``create_graph=True``) raises.
"""
import torch

from .. import _core
from .. import functional as F
from . import _bridge as B


def _dtype(weight, bias):
    """The dtype of the per-channel parameters given (they share one), None without any."""
    t = weight if weight is not None else bias
    return None if t is None else t.dtype


def _param_grad(a, dtype, needed):
    """A per-channel gradient (ndarray) as a tensor of dtype, its parameter's (weight and bias share one: float32
    parameters of 16-bit data included), or None when autograd does not ask for it."""
    return B.grad_as(a, dtype) if needed else None


class BatchNormFunction(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with the batch statistics (training; running statistics updated in
    place) or the running ones (training=False: constants for the backward).

    apply(x, weight, bias, running_mean, running_var, training, momentum, eps, views): views are the ndarrays of
    (running_mean, running_var, weight, bias), checked against x.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, views):
        x, layout, xa = B.dense(x)
        y = torch.empty_like(x)
        rm, rv, w, b = views
        _, mean, invstd = _core.batch_norm(xa, rm, rv, w, b, training, momentum, eps, layout, B.array(y, layout),
                                           True, B._threads(), True)
        if training and running_mean is not None:
            torch.autograd.graph.increment_version([running_mean, running_var])
        ctx.save_for_backward(x, weight)
        ctx.param_dtype = _dtype(weight, bias)
        ctx.stats = (mean, invstd, bool(training), layout)
        return y

    @staticmethod
    @B.first_order
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        mean, invstd, training, layout = ctx.stats
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        xa, ga = B.array(x, layout), B.array(grad_y, layout)
        grad_x = None
        if need_x:
            grad_x = B.empty_in(x, layout)
            _, gw, gb = F.batch_norm_backward(ga, xa, mean, invstd, B.vec(weight), layout=layout,
                                              out=B.out_array(grad_x, layout), training=training)
        else:
            # only the parameters' gradients: the channel sums, without grad_x's sweep
            # grad_bias = sum dy, grad_weight = invstd * sum dy (x - mean)
            gb, sum_dyxm = F.backward_reduce(ga, xa, mean, layout=layout)
            gw = sum_dyxm * invstd
        pd = ctx.param_dtype
        return (grad_x, _param_grad(gw, pd, need_w), _param_grad(gb, pd, need_b), None, None, None, None, None, None)


class GroupNormFunction(torch.autograd.Function):
    """Group norm with each (sample, group)'s statistics. apply(x, num_groups, weight, bias, eps, views): views are
    the ndarrays of (weight, bias)."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, views):
        x, layout, xa = B.dense(x)
        y = torch.empty_like(x)
        # (the statistics kept in float64 for the backward, as the NumPy layers keep them: a float32 mean loses
        # digits where |mean| >> std, 1.4 % of grad_x at 1e6)
        _, mean, invstd = _core.group_norm(xa, num_groups, views[0], views[1], eps, layout, B.array(y, layout),
                                           B._threads(), 3)
        ctx.save_for_backward(x, weight)
        ctx.param_dtype = _dtype(weight, bias)
        ctx.stats = (mean, invstd, num_groups, layout)
        return y

    @staticmethod
    @B.first_order
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        mean, invstd, num_groups, layout = ctx.stats
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        grad_x = B.empty_in(x, layout)
        _, gw, gb = _core.group_norm_backward(B.array(grad_y, layout), B.array(x, layout), mean, invstd, num_groups,
                                              B.vec(weight), layout, B.out_array(grad_x, layout), B._threads())
        pd = ctx.param_dtype
        return (grad_x if need_x else None, None, _param_grad(gw, pd, need_w), _param_grad(gb, pd, need_b), None,
                None)


class InstanceNormFunction(torch.autograd.Function):
    """Instance norm with each (sample, channel)'s statistics; running statistics, when given, updated in place
    with their batch averages. apply(x, weight, bias, running_mean, running_var, momentum, eps, views): views as in
    BatchNormFunction."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, views):
        x, layout, xa = B.dense(x)
        y = torch.empty_like(x)
        rm, rv, w, b = views
        _, mean, invstd = _core.instance_norm(xa, rm, rv, w, b, True, momentum, eps, layout, B.array(y, layout),
                                              B._threads(), 2)   # (float64 statistics, as group norm's)
        if running_mean is not None:
            torch.autograd.graph.increment_version([running_mean, running_var])
        ctx.save_for_backward(x, weight)
        ctx.param_dtype = _dtype(weight, bias)
        ctx.stats = (mean, invstd, layout)
        return y

    @staticmethod
    @B.first_order
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        mean, invstd, layout = ctx.stats
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = B.empty_in(x, layout)
        _, gw, gb = _core.group_norm_backward(B.array(grad_y, layout), B.array(x, layout), mean, invstd, None,
                                              B.vec(weight), layout, B.out_array(grad_x, layout), B._threads(), True)
        pd = ctx.param_dtype
        return (grad_x if need_x else None, _param_grad(gw, pd, need_w), _param_grad(gb, pd, need_b), None, None,
                None, None, None)
