"""Normalization with a fused activation and residual add for PyTorch users: z = act(norm(x) + residual) in the
normalise sweep (bn_simd's ``activation=`` / ``residual=``, see :mod:`bn_simd._epilogue`) for batch, group and
instance norm (layer and RMS norm: :mod:`bn_simd.torch.rownorm`), their autograd Functions, and the pass of
``convert(model, fuse_activations=True)``, which turns a normalization module followed by an activation into its
fused module (``BatchNormAct1d/2d/3d``, ``GroupNormAct``, ``InstanceNormAct1d/2d/3d``, ``LayerNormAct``,
``RMSNormAct``).

The activations, as bn_simd spells them and the ``torch.nn`` modules they replace:

    "relu"                  torch.nn.ReLU
    "relu6"                 torch.nn.ReLU6
    ("leaky_relu", slope)   torch.nn.LeakyReLU(slope)
    ("clamp", lo, hi)       torch.nn.Hardtanh(lo, hi)
    "silu"                  torch.nn.SiLU (or torch.nn.functional.silu; "relu" also torch.relu and F.relu)

Values: the activation is applied to the float32 (float64 for float64 data) value of the normalised x plus the
residual, rounded once to the output's dtype; PyTorch's unfused composition rounds the normalization's output first
(and again after the add), so float32 results agree within the activation's rounding of those. Gradients: the
backward recomputes u = normalised x + residual from x with the forward's coefficients (nothing else is saved), and
at the kinks takes the derivatives of the modules above (0 for relu / relu6 / clamp at lo and hi, as Hardtanh's,
where torch.clamp's is 1; the slope for leaky_relu at 0), and theirs at +-Inf and NaN (relu's 1 at +Inf and NaN),
on the kernels' path and on PyTorch's alike.
"""
import copy
import functools
import math
import operator
import re
import threading

import torch
from torch.nn import functional as TF

from .. import _core, _epilogue
from .. import functional as F
from . import _bridge as B
from ._autograd import _dtype

# torch.nn activation module class -> its spelling for bn_simd (None: not fusable in that configuration)
_MODULES = {
    torch.nn.ReLU: lambda m: "relu",
    torch.nn.ReLU6: lambda m: "relu6",
    torch.nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope)),
    torch.nn.SiLU: lambda m: "silu",
    # (a bound of -inf / +inf is none to the kernels, a kink to Hardtanh's gradient: not fused)
    torch.nn.Hardtanh: lambda m: (("clamp", float(m.min_val), float(m.max_val))
                                  if math.isfinite(m.min_val) and math.isfinite(m.max_val) else None),
}
# torch functions of their one argument (inplace= or not) -> bn_simd's spelling
_FUNCTIONS = {torch.relu: "relu", torch.relu_: "relu", TF.relu: "relu", TF.silu: "silu"}
_ADDS = (operator.add, operator.iadd, torch.add)


def activation_of(module):
    """bn_simd's spelling of an activation module (exact torch.nn classes: a subclass may override forward), or
    None: also for one the kernels do not take (a LeakyReLU of slope NaN or inf, which PyTorch runs)."""
    make = _MODULES.get(type(module))
    spec = None if make is None else make(module)
    if spec is not None:
        try:
            _epilogue.parse(spec)
        except (TypeError, ValueError):
            return None
    return spec


def act_init(base):
    """The constructor of a fused module class: base's (torch.nn's arguments) plus the keyword ``activation``, checked
    here rather than at the first call."""
    def __init__(self, *args, activation="relu", **kwargs):
        base.__init__(self, *args, **kwargs)
        _epilogue.parse(activation)
        self.activation = activation
    return __init__


def act_repr(base):
    """The extra_repr of a fused module class: base's, then the activation."""
    def extra_repr(self):
        return f"{base.extra_repr(self)}, activation={self.activation!r}"
    return extra_repr


def _unfused(input, residual):
    """residual, already passed by check_residual (a tensor whose shape broadcasts with input's), has another shape
    than input's (input's broadcast one, or a larger one) or another dtype (under ``torch.autocast`` a convolution's
    bfloat16 output meets a float32 identity: PyTorch's add promotes it)."""
    return (isinstance(residual, torch.Tensor) and isinstance(input, torch.Tensor)
            and (residual.shape != input.shape or residual.dtype != input.dtype))


# numbers an add takes beside a tensor (a graph's residual may be one: relu(bn(x) + x.size(1)))
_NUMBERS = (bool, int, float, complex, torch.SymInt, torch.SymFloat, torch.SymBool)


def act_forward(plain_forward):
    """Decorates a fused module's forward(self, input, residual=None): a residual whose shape is not input's but
    broadcasts with it, or whose dtype is not input's, gives act(plain_forward(self, input) + residual) with
    PyTorch's operations (their broadcasting and type promotion), as the unfused model computes it (the fused sweep
    reads a residual of input's shape and dtype; convert fuses an add whatever its other operand: a per-channel bias,
    an embedding of shape (N, C, 1, 1), one the add broadcasts the output to, a float32 identity beside a bfloat16
    convolution under autocast, a number such as a size); a shape that does not broadcast raises ValueError before
    anything runs; any other residual goes to the fused forward, which checks it. On torch.fx proxies the module is
    a leaf of the trace (B.fx_call)."""
    def decorate(fused_forward):
        @functools.wraps(fused_forward)
        def forward(self, input, residual=None):
            if type(input) is not torch.Tensor or B._fx_trace._is_fx_tracing_flag:  # (a torch.fx trace)
                y = B.fx_call(self, input, (input, residual), {})
                if y is not None:
                    return y
                if isinstance(residual, B.Proxy):  # (the trace's root, whose residual may be None or a tensor)
                    raise TypeError(f"bn_simd.torch: {type(self).__name__} as the root of a torch.fx trace needs its "
                                    f"residual fixed: symbolic_trace(module, concrete_args={{'residual': None}}) (the "
                                    f"trace records PyTorch's functions then), or trace a model that contains it")
            if isinstance(residual, _NUMBERS):
                return _torch_activation(plain_forward(self, input) + residual, self.activation)
            check_residual(input, residual)
            if residual is not None and _unfused(input, residual):
                return _torch_activation(plain_forward(self, input) + residual, self.activation)
            return fused_forward(self, input, residual)
        return forward
    return decorate


def _torch_activation(y, activation):
    """PyTorch's composition for the calls the kernels do not cover: act(y)."""
    act = _epilogue.parse(activation)
    code, lo, hi, slope = act
    if code == _epilogue.ACT_NONE:
        return y
    if code == _epilogue.ACT_SILU:
        return TF.silu(y)
    if code == _epilogue.ACT_LEAKY:
        return TF.leaky_relu(y, slope)
    if lo == 0.0 and hi == math.inf:
        return TF.relu(y)
    # (hardtanh, not torch.clamp: the kernels' derivative at the kinks, 0 at lo and hi, as relu6's and Hardtanh's;
    # torch.clamp's passes the gradient at its bounds)
    if math.isfinite(lo) and math.isfinite(hi):
        return TF.hardtanh(y, lo, hi)
    # Else the kernels' own rule: the value min(hi, max(lo, y)) as they order it (a NaN or a signed zero kept), the
    # gradient passed where !(y <= lo) and y < hi, lo = -inf and hi = +inf no bounds (a NaN y passes with no upper
    # bound, as relu's: clamp(lo, None) is a shifted relu)
    z = torch.where(y < lo, lo, y)
    z = torch.where(z > hi, hi, z)
    keep = torch.ones_like(y, dtype=torch.bool) if lo == -math.inf else ~(y <= lo)
    if hi != math.inf:
        keep = keep & (y < hi)
    return torch.where(keep, y, z.detach())


def _tensor_of(a, layout):
    """An ndarray in ``layout`` (the kernels' view) as a tensor of the data's shape (N, C, *spatial)."""
    t = B.from_array(a)
    return t.movedim(-1, 1) if layout == "NHWC" else t


def _residual_array(residual, x, layout):
    """The residual's ndarray in x's layout (a view when its memory has that order, else one copy), checked to be a
    tensor like x."""
    B.check_like(residual, x, "residual", "a torch.Tensor or None")
    return B.array(residual, layout)


class BatchNormActFunction(torch.autograd.Function):
    """z = act(batch_norm(x) + residual): batch statistics (training; running statistics updated in place) or the
    running ones.

    apply(x, weight, bias, residual, running_mean, running_var, training, momentum, eps, act, views): act is
    bn_simd's parsed activation tuple, views the ndarrays of (running_mean, running_var, weight, bias).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, training, momentum, eps, act, views):
        x, layout, xa = B.dense(x)
        ra = None if residual is None else _residual_array(residual, x, layout)
        y = torch.empty_like(x)
        rm, rv, w, b = views
        _, mean, invstd, var = _core.batch_norm_epi(xa, rm, rv, w, b, training, momentum, eps, layout,
                                                    B.array(y, layout), True, act, ra, B._threads(), True)
        if training and running_mean is not None:
            torch.autograd.graph.increment_version([running_mean, running_var])
        ctx.save_for_backward(x, weight, bias, B.savable(residual))
        ctx.param_dtype = _dtype(weight, bias)
        ctx.stats = (mean, invstd, var, bool(training), layout, eps, act)
        return y

    @staticmethod
    @B.first_order
    def backward(ctx, grad_y):
        x, weight, bias, residual = ctx.saved_tensors
        mean, invstd, var, training, layout, eps, act = ctx.stats
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        xa, ga = B.array(x, layout), B.array(grad_y, layout)
        ra = None if residual is None else B.array(residual, layout)
        grad_x = B.empty_in(x, layout)
        activation = None if act[0] == _epilogue.ACT_NONE else act
        gx, gw, gb, gr = F.batch_norm_backward(ga, xa, mean, invstd, B.vec(weight), layout=layout,
                                               out=B.out_array(grad_x, layout), training=training,
                                               activation=_spelling(activation), residual=ra, bias=B.vec(bias),
                                               eps=eps, save_stats=(mean, var))
        pd = ctx.param_dtype
        grad_r = _tensor_of(gr, layout) if need_r and gr is not None else None
        return (grad_x if need_x else None, B.grad_as(gw, pd) if need_w else None,
                B.grad_as(gb, pd) if need_b else None, grad_r) + (None,) * 7


def _spelling(act):
    """A parsed activation tuple back in the spelling batch_norm_backward takes (None for none)."""
    if act is None:
        return None
    code, lo, hi, slope = act
    if code == _epilogue.ACT_SILU:
        return "silu"
    if code == _epilogue.ACT_LEAKY:
        return ("leaky_relu", slope)
    return ("clamp", lo, hi)


_STATS_AND_PARAMS = ("running_mean", "running_var", "weight", "bias")


def check_residual(input, residual):
    """Raises TypeError for a residual that is not a tensor (or None), ValueError for one whose shape does not
    broadcast with input's: before anything runs (PyTorch's composition, which takes the calls the kernels do not,
    would otherwise move running statistics before its add failed)."""
    if residual is None:
        return
    B.check_tensor(residual, "residual", "a torch.Tensor or None")
    if isinstance(input, torch.Tensor) and residual.shape != input.shape:
        try:
            torch.broadcast_shapes(input.shape, residual.shape)
        except RuntimeError:
            raise ValueError(f"residual must have input's shape {tuple(input.shape)} or broadcast with it, got shape "
                             f"{tuple(residual.shape)}") from None


def _act_views(input, residual, ranks, eps, names, tensors, views):
    """The ndarrays of the per-channel tensors (names, tensors) for a call on the kernels with an epilogue: a module's
    cached views, or made here after the checks; None when the call goes to PyTorch's composition. Raises as
    check_residual."""
    check_residual(input, residual)
    if not B.input_supported(input, ranks, eps) or (
            residual is not None and not B.input_supported(residual, (input.dim(),), eps)):
        return None
    if views is None and B.channels_supported(input, zip(names, tensors)):
        views = tuple(B.vec(t) for t in tensors)
    return views


def _composed(norm, activation, residual, out, *tensors):
    """PyTorch's act(norm() + residual) for a call the kernels do not cover, copied into out when given."""
    if out is not None and B.grad_needed(*tensors, residual):
        B.no_out_with_grad(out)
    y = norm()
    return B.fallback(_torch_activation(y if residual is None else y + residual, activation), out)


def batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps, activation, residual,
                   out, views):
    """functional.batch_norm with ``activation`` and/or ``residual`` (see functional.batch_norm); views as
    functional._batch_norm's."""
    act = _epilogue.parse(activation)
    tensors = (running_mean, running_var, weight, bias)
    views = _act_views(input, residual, (2, 3, 4, 5), eps, _STATS_AND_PARAMS, tensors, views)
    if training and running_mean is not None and not B.momentum_supported(momentum):
        views = None
    if views is None:
        return _composed(lambda: TF.batch_norm(input, *tensors, training, momentum, eps), activation, residual, out,
                         input, weight, bias)
    if not (training and running_mean is not None):
        momentum = 0.0  # unused: not checked, as in PyTorch
    if B.grad_needed(input, weight, bias, residual):
        B.no_out_with_grad(out)
        return BatchNormActFunction.apply(input, weight, bias, residual, running_mean, running_var, training,
                                          momentum, eps, act, views)
    x, layout, xa = B.dense(input)
    ra = None if residual is None else _residual_array(residual, x, layout)
    rm, rv, w, b = views
    y, ya, target = B.output(x, layout, out)
    _core.batch_norm_epi(xa, rm, rv, w, b, training, momentum, eps, layout, ya, True, act, ra, B._threads())
    return B.finish(y, target, (out, running_mean, running_var) if training else (out,))


def _save_group(ctx, x, weight, bias, residual, mean, var, num_groups, layout, eps, act):
    """What the backward of GroupNormActFunction / InstanceNormActFunction needs (num_groups None: instance norm)."""
    ctx.save_for_backward(x, weight, bias, B.savable(residual))
    ctx.param_dtype = _dtype(weight, bias)
    ctx.stats = (mean, var, num_groups, layout, eps, act)


def _group_backward(ctx, grad_y, needs):
    """(grad_x, grad_weight, grad_bias, grad_residual) of z = act(group_norm(x) + residual) (instance norm's when the
    forward saved num_groups None), from the forward's float64 statistics; needs: whether autograd asks for each."""
    x, weight, bias, residual = ctx.saved_tensors
    mean, var, num_groups, layout, eps, act = ctx.stats
    need_x, need_w, need_b, need_r = needs
    ra = None if residual is None else B.array(residual, layout)
    grad_x = B.empty_in(x, layout)
    _, gw, gb, gr = _core.group_backward_epi(B.array(grad_y, layout), B.array(x, layout), mean, var, eps, num_groups,
                                             B.vec(weight), B.vec(bias), layout, B.out_array(grad_x, layout), act, ra,
                                             B._threads(), num_groups is None)
    pd = ctx.param_dtype
    return (grad_x if need_x else None, B.grad_as(gw, pd) if need_w and weight is not None else None,
            B.grad_as(gb, pd) if need_b and bias is not None else None,
            _tensor_of(gr, layout) if need_r and gr is not None else None)


class GroupNormActFunction(torch.autograd.Function):
    """z = act(group_norm(x) + residual) with each (sample, group)'s statistics.

    apply(x, num_groups, weight, bias, residual, eps, act, views): act is bn_simd's parsed activation tuple, views the
    ndarrays of (weight, bias). The backward recomputes u from x with the forward's float64 statistics.
    """

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, residual, eps, act, views):
        x, layout, xa = B.dense(x)
        ra = None if residual is None else _residual_array(residual, x, layout)
        y = torch.empty_like(x)
        _, mean, var = _core.group_forward_epi(xa, num_groups, views[0], views[1], eps, layout, B.array(y, layout),
                                               act, ra, B._threads(), False, True)
        _save_group(ctx, x, weight, bias, residual, mean, var, num_groups, layout, eps, act)
        return y

    @staticmethod
    @B.first_order
    def backward(ctx, grad_y):
        gx, gw, gb, gr = _group_backward(ctx, grad_y, [ctx.needs_input_grad[i] for i in (0, 2, 3, 4)])
        return gx, None, gw, gb, gr, None, None, None


def group_norm_act(input, num_groups, weight, bias, eps, activation, residual, out, views):
    """functional.group_norm with ``activation`` and/or ``residual``; views as functional._group_norm's."""
    act = _epilogue.parse(activation)
    tensors = (weight, bias)
    views = _act_views(input, residual, (2, 3, 4, 5), eps, ("weight", "bias"), tensors, views)
    if views is None:
        return _composed(lambda: TF.group_norm(input, num_groups, weight, bias, eps), activation, residual, out,
                         input, weight, bias)
    if B.grad_needed(input, weight, bias, residual):
        B.no_out_with_grad(out)
        return GroupNormActFunction.apply(input, num_groups, weight, bias, residual, eps, act, views)
    x, layout, xa = B.dense(input)
    ra = None if residual is None else _residual_array(residual, x, layout)
    y, ya, target = B.output(x, layout, out)
    _core.group_forward_epi(xa, num_groups, views[0], views[1], eps, layout, ya, act, ra, B._threads(), False, True)
    return B.finish(y, target, (out,))


class InstanceNormActFunction(torch.autograd.Function):
    """z = act(instance_norm(x) + residual) with each (sample, channel)'s statistics; running statistics, when given,
    updated in place with their batch averages, as InstanceNormFunction.

    apply(x, weight, bias, residual, running_mean, running_var, momentum, eps, act, views): act is bn_simd's parsed
    activation tuple, views the ndarrays of (running_mean, running_var, weight, bias).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, momentum, eps, act, views):
        x, layout, xa = B.dense(x)
        ra = None if residual is None else _residual_array(residual, x, layout)
        y = torch.empty_like(x)
        rm, rv, w, b = views
        _, mean, var = _core.instance_norm(xa, rm, rv, w, b, True, momentum, eps, layout, B.array(y, layout),
                                           B._threads(), True, act, ra)
        if running_mean is not None:
            torch.autograd.graph.increment_version([running_mean, running_var])
        _save_group(ctx, x, weight, bias, residual, mean, var, None, layout, eps, act)
        return y

    @staticmethod
    @B.first_order
    def backward(ctx, grad_y):
        return _group_backward(ctx, grad_y, ctx.needs_input_grad[:4]) + (None,) * 6


def instance_norm_act(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps, activation,
                      residual, out, views):
    """functional.instance_norm with ``activation`` and/or ``residual``; views as functional._instance_norm's. Without
    use_input_stats: batch norm's eval through its epilogue."""
    act = _epilogue.parse(activation)
    tensors = (running_mean, running_var, weight, bias)
    views = _act_views(input, residual, (3, 4, 5), eps, _STATS_AND_PARAMS, tensors, views)
    if use_input_stats and running_mean is not None and not B.momentum_supported(momentum):
        views = None
    if views is None:
        return _composed(lambda: TF.instance_norm(input, *tensors, use_input_stats, momentum, eps), activation,
                         residual, out, input, weight, bias)
    if not use_input_stats:
        if running_mean is None:
            raise ValueError("running_mean and running_var are required when use_input_stats=False")
        return batch_norm_act(input, *tensors, False, 0.0, eps, activation, residual, out, views)
    if running_mean is None:
        momentum = 0.0  # unused: not checked, as in PyTorch
    if B.grad_needed(input, weight, bias, residual):
        B.no_out_with_grad(out)
        # (no kept_on_stop: checkpointing torch.nn's instance norm then its activation updates the statistics twice,
        # as the activation's saved tensor is recorded after the norm's copy-back)
        return InstanceNormActFunction.apply(input, weight, bias, residual, running_mean, running_var, momentum, eps,
                                             act, views)
    x, layout, xa = B.dense(input)
    ra = None if residual is None else _residual_array(residual, x, layout)
    rm, rv, w, b = views
    y, ya, target = B.output(x, layout, out)
    _core.instance_norm(xa, rm, rv, w, b, True, momentum, eps, layout, ya, B._threads(), False, act, ra)
    return B.finish(y, target, (out, running_mean, running_var))


# ---- fusing a model's normalization -> activation pairs --------------------------------------------------------------

def hooked(m):
    """m has hooks of its own that run around its forward or backward (fusing or folding it would change what they see
    or whether they run)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


global_hooks = B.global_hooks  # (hooks registered for every module)


def whole_sequentials(m):
    """m when it is a plain torch.nn.Sequential, and the plain Sequentials nested in it through plain Sequentials
    alone: the containers whose forward is known to run each child on the last one's output."""
    if type(m) is torch.nn.Sequential:
        yield m
        for kid in m.children():
            yield from whole_sequentials(kid)


def fuse_sequential(model, fused_classes, whole_only=False):
    """In every torch.nn.Sequential of model (whole_only: of whole_sequentials(model)): a normalization module
    directly followed by an activation module becomes its fused class (fused_classes: exact bn_simd class -> fused
    class, e.g. BatchNorm2d -> BatchNormAct2d, GroupNorm -> GroupNormAct) with that activation, and the activation is
    replaced by torch.nn.Identity. A norm registered at more than one place in model, or a pair with hooks, is not
    fused. Returns (pairs fused, pairs whole_only left in the other Sequentials)."""
    fused = left = 0
    if global_hooks():
        return 0, 0
    names_of = {}  # id(module) -> how many places model registers it at
    for _, m in model.named_modules(remove_duplicate=False):
        names_of[id(m)] = names_of.get(id(m), 0) + 1
    whole = {id(m) for m in whole_sequentials(model)}
    for seq in [m for m in model.modules() if type(m) is torch.nn.Sequential]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            norm, act_mod = seq._modules[a], seq._modules[b]
            cls = fused_classes.get(type(norm))
            spec = activation_of(act_mod)
            # (a norm registered elsewhere too would take the activation at its other uses; hooks would see the
            # activation's output, or not run)
            if (cls is not None and spec is not None and names_of[id(norm)] == 1 and not hooked(norm)
                    and not hooked(act_mod)):
                if whole_only and id(seq) not in whole:
                    left += 1
                    continue
                norm.__class__ = cls
                norm.activation = spec
                seq._modules[b] = torch.nn.Identity()
                fused += 1
    return fused, left


# One trace at a time in the process: a trace patches torch.autograd.Function.apply while it runs (fuse_graph)
_TRACE_LOCK = threading.RLock()

# in-place operators (torch's in-place functions and methods end in "_")
_INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
            operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
            operator.irshift, operator.setitem, operator.delitem}


def _pure_call(node):
    """node is a call of a function or a tensor method that writes nothing (no in-place op, no out=) and reads no
    module state (those reads are get_attr or call_module nodes)."""
    if node.kwargs.get("out") is not None or node.kwargs.get("inplace"):
        return False
    if node.op == "call_function":
        return node.target not in _INPLACE and not getattr(node.target, "__name__", "_").endswith("_")
    return node.op == "call_method" and not node.target.endswith("_")


# names in a forward whose regions torch.fx traces through and drops: grad mode, autocast, activation checkpointing
_REGIONS = frozenset({"no_grad", "enable_grad", "inference_mode", "set_grad_enabled", "autocast", "checkpoint",
                      "checkpoint_sequential"})


def _drops_regions(model, tracer):
    """Whether a forward that torch.fx would trace through (model's own, and its modules' that are not leaves) names
    one of _REGIONS: a trace runs the region's calls without the region (a frozen stem would get gradients, autocast
    run in float32, checkpointing stop recomputing). Names are read from the source's tokens (comments and strings
    left out); a forward without source is taken as free of them."""
    import inspect
    import io
    import textwrap
    import tokenize
    seen = set()
    for name, m in model.named_modules():
        fwd = type(m).forward
        if (name and tracer.is_leaf_module(m, name)) or fwd in seen:
            continue
        seen.add(fwd)
        try:
            src = textwrap.dedent(inspect.getsource(fwd))
            names = {t.string for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.NAME}
        except (OSError, TypeError, tokenize.TokenError, IndentationError, SyntaxError):
            continue
        if names & _REGIONS:
            return True
    return False


def _overrides_train(model, tracer):
    """Whether model, or a module of it that the trace goes through (not a leaf), overrides ``train``: a GraphModule
    rebuilds those as plain modules, so the override (a backbone keeping its batch norms in eval mode, as
    ``norm_eval`` does) would be lost."""
    import torch.nn as nn
    return any(type(m).train is not nn.Module.train for name, m in model.named_modules()
               if not (name and tracer.is_leaf_module(m, name)))


def _writes_in_place(node, mods):
    """node may write its tensor arguments in place: an in-place function or method, out=, or a module called with
    inplace=True (nn.ReLU(inplace=True))."""
    if node.op == "call_module":
        return bool(getattr(mods.get(node.target), "inplace", False))
    return node.op in ("call_function", "call_method") and not _pure_call(node)


# Operations whose result may share memory with a tensor argument, beside the ones whose ATen schema says so
# (_aten_view): ops that return their input when they change nothing (.to(), .type_as(), .float(), dropout in eval),
# and views the schemas do not annotate (einsum, atleast_*d); in-place ones too (_writes_in_place)
_VIEW_METHODS = frozenset({
    "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "__getitem__", "data", "mT", "T", "H", "mH",
    "einsum", "atleast_1d", "atleast_2d", "atleast_3d", "broadcast_tensors", "meshgrid", "as_subclass", "dropout",
    "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "requires_grad_"})
_VIEW_MODULES = (torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten, torch.nn.modules.dropout._DropoutNd,
                 torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


@functools.lru_cache(maxsize=None)
def _aten_view(name):
    """Whether the ATen operator of this name returns a view of (or its) input by one of its overloads' schemas, as
    reshape's Tensor(a) (out= overloads, whose returned alias is written, aside); None when ATen has no such
    operator."""
    try:
        packet = getattr(torch.ops.aten, name)
        schemas = [getattr(packet, o)._schema for o in packet.overloads()]
    except Exception:  # (no such operator: torch.ops raises AttributeError or RuntimeError)
        return None
    return any(r.alias_info is not None and not r.alias_info.is_write for sc in schemas for r in sc.returns)


def _may_alias(node, mods):
    """node's result may share memory with a tensor argument (a view of it, or the argument itself). A call of an
    operator ATen does not know (a method of no ATen name) is taken as one that may."""
    if node.op == "call_module":
        m = mods.get(node.target)
        return isinstance(m, _VIEW_MODULES) or bool(getattr(m, "inplace", False))
    if node.op not in ("call_method", "call_function"):
        return False
    if node.target in (operator.getitem, getattr) or _writes_in_place(node, mods):
        return True
    if node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator":
        return False  # (the arithmetic operators: a new tensor; their in-place forms are writes, above)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name in _VIEW_METHODS or _aten_view(name) is not False


def _aliases(node, mods):
    """The nodes whose values may share memory with node's: the bases it is a view of, and the views of each of them
    (_may_alias both ways, transitively)."""
    seen, todo = {node}, [node]
    while todo:
        n = todo.pop()
        near = [u for u in n.users if _may_alias(u, mods)]
        if _may_alias(n, mods):  # (any of its tensor arguments: einsum's is its second)
            near += n.all_input_nodes
        for m in near:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def _written_later(residual, after, skip, order, mods):
    """Whether a node after `after` (but `skip`) may write in place into the residual's memory, through the residual
    itself or a view of it, or through a tensor it is a view of (identity.flatten(1) then relu_ on that view, a slice
    of a tensor an in-place ReLU writes): the fused call saves the residual for its backward, as the add does not.
    (Only the users of the residual's aliases can write them.)"""
    return any(_writes_in_place(w, mods) and order[w] > order[after] and w is not skip
               for a in _aliases(residual, mods) for w in a.users)


def _grad_state():
    """Grad mode, inference mode, autocast's switches and saved-tensor hooks (non-reentrant checkpointing, offloading):
    what a region of a traced forward changes."""
    auto = []
    for dev in ("cpu", "cuda"):
        try:
            auto.append(bool(torch.is_autocast_enabled(dev)))
        except (TypeError, RuntimeError):  # (older torch: no device argument)
            auto.append(bool(torch.is_autocast_cpu_enabled() if dev == "cpu" else torch.is_autocast_enabled()))
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):  # (a torch without it)
        hooks = False
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), tuple(auto), hooks


# Attributes torch.fx's tracer itself sets on the traced root: constants made in the forward (torch.arange(4.0)), which
# fuse_graph looks for in the graph (_tensor_constant nodes)
_FX_CONSTANT = re.compile(r"_(tensor|param)_constant\d+$")


def _module_state(model):
    """Each module of model with a copy of its attributes, and of the items of those that are lists, dicts or sets
    (a forward that assigns an attribute, or appends to one, run by the tracer, would leave torch.fx Proxies in it)."""
    def items(v):
        t = type(v)
        return list(v) if t is list else dict(v) if t is dict else set(v) if t is set else None

    return [(m, dict(m.__dict__), {k: items(v) for k, v in m.__dict__.items() if items(v) is not None})
            for m in model.modules()]


def _restore_modules(saved):
    """Puts back the attributes (and their lists', dicts' and sets' items) _module_state saw; returns whether any but
    the tracer's constants had changed."""
    changed = False
    for m, attrs, contents in saved:
        now = m.__dict__
        if now.keys() != attrs.keys() or any(now[k] is not v for k, v in attrs.items()):
            changed = changed or any(not _FX_CONSTANT.match(k) for k in now.keys() - attrs.keys()) or any(
                k not in now or now[k] is not v for k, v in attrs.items())
            now.clear()
            now.update(attrs)
        for k, items in contents.items():
            v = attrs[k]
            same = len(v) == len(items) and (
                all(a is b for a, b in zip(v, items)) if type(v) is list else
                v.keys() == items.keys() and all(v[q] is items[q] for q in items) if type(v) is dict else
                {id(a) for a in v} == {id(b) for b in items})
            if not same:
                changed = True
                v.clear()
                v.update(items) if type(v) is not list else v.extend(items)
    return changed


def _mode_dependent(model, graph, tracer_class):
    """Whether model's trace differs between training and eval mode (``F.dropout(training=self.training)``, ``if
    self.training:``): a graph traced in one mode would keep it whatever mode the model is put in. Every module's
    own training flag is put back."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(not model.training)
        other = tracer_class().trace(model)
    finally:
        for m, t in modes:
            m.training = t
    return str(other) != str(graph)


def fuse_graph(model, fused_classes):
    """The fusion on model's torch.fx graph: a normalization module of fused_classes (as in fuse_sequential) called
    once with one argument, whose output's only use is an activation (a module of _MODULES or a function of
    _FUNCTIONS), or an add (``+``, ``torch.add``) whose other operand is the residual and whose result's only use is
    such an activation; the module becomes its fused class, called as module(input, residual). Returns (GraphModule,
    pairs fused); None when model cannot be traced (a trace error, a tensor of its state frozen, hooks registered for
    every module); a string saying why when a graph would not be faithful (a trace that depends on training mode;
    grad-mode / inference / autocast / saved-tensor-hooks regions or checkpoints, in a traced forward or a method it
    calls; a custom autograd Function applied; module attributes assigned; hooks or a train() override on a module the
    trace goes through; state_dict keys a GraphModule would not have). The model's attributes are as before."""
    import torch.fx as fx

    class Tracer(fx.Tracer):
        """torch.fx's tracer, keeping bn_simd.torch's modules (and torch.nn's, as it does) as call_module nodes, and
        noting what a graph would drop: an operation recorded under another grad mode, inference mode or autocast
        than the trace's (a region in any method the forward calls), and a torch.autograd.Function applied to the
        trace's values (its forward would be recorded, its backward lost)."""
        dropped = None

        def is_leaf_module(self, m, qualname):
            return type(m).__module__.startswith("bn_simd.") or super().is_leaf_module(m, qualname)

        def trace(self, root, *args, **kwargs):
            tracer = self

            def checked(cls, *a, **k):
                if tracer.dropped is None and any(isinstance(v, fx.Proxy) for v in (*a, *k.values())):
                    tracer.dropped = ("its forward checkpoints activations (torch.utils.checkpoint), which tracing "
                                      "drops" if cls.__name__ == "CheckpointFunction" else
                                      f"its forward applies the autograd Function {cls.__name__}, whose backward a "
                                      f"graph would not keep")
                return apply.__func__(cls, *a, **k)

            with _TRACE_LOCK:  # (one trace at a time patches Function.apply, and puts it back)
                self._state = _grad_state()
                apply = torch.autograd.Function.__dict__["apply"]
                torch.autograd.Function.apply = classmethod(checked)
                try:
                    return super().trace(root, *args, **kwargs)
                finally:
                    torch.autograd.Function.apply = apply

        def create_node(self, *args, **kwargs):
            if self.dropped is None and _grad_state() != self._state:
                self.dropped = "its forward (or a method it calls) runs operations in a no_grad / inference_mode / " \
                               "autocast / saved-tensor-hooks region (as non-reentrant checkpointing), which " \
                               "tracing drops"
            return super().create_node(*args, **kwargs)

    if global_hooks():   # (they would run on the tracer's proxies, and the pairs would stay unfused anyway)
        return None
    if _drops_regions(model, Tracer()):
        return "its forward holds no_grad / autocast / checkpoint regions, which tracing drops"
    if _overrides_train(model, Tracer()):
        return "it (or a module the trace goes through) overrides train(), which a GraphModule would not keep"
    if any(hooked(m) for name, m in model.named_modules() if not (name and Tracer().is_leaf_module(m, name))):
        return "it (or a module the trace goes through) has hooks, which a GraphModule would not keep"
    saved = _module_state(model)
    try:
        tracer = Tracer()
        gm = fx.GraphModule(model, tracer.trace(model))
        if _restore_modules(saved):
            return "its forward assigns module attributes (or adds to a list or dict of them), which a graph would " \
                   "not do"
        if tracer.dropped:
            return tracer.dropped
        if _mode_dependent(model, gm.graph, Tracer):
            return "its trace depends on training mode (self.training read in forward), which a graph would freeze"
        if _restore_modules(saved):  # (an assignment in the other mode's forward alone)
            return "its forward assigns module attributes in the other training mode, which a graph would not do"
    except Exception:  # (dynamic control flow and the like: torch.fx cannot trace every model)
        return None
    finally:
        _restore_modules(saved)  # (the model as it was, whatever the trace assigned)
    if any(n.op == "get_attr" and n.target.startswith("_tensor_constant") for n in gm.graph.nodes):
        # a tensor computed at trace time from what the tracer could not follow (a module's buffer read through a
        # leaf module, as bn.running_mean): frozen in the graph, it would not follow the model's state
        return None
    if set(gm.state_dict()) != set(model.state_dict()):
        # (a GraphModule keeps only what the forward reads, and every buffer persistent: a module used elsewhere, or
        # a non-persistent buffer, would change the keys, and the model's checkpoints would not load)
        return "a GraphModule would not have its state_dict keys (modules its forward does not call, or buffers " \
               "registered with persistent=False)"
    mods = dict(gm.named_modules(remove_duplicate=False))
    graph = gm.graph
    calls = {}  # id(module) -> the call_module nodes that run it (a module may have several names)
    for n in graph.nodes:
        if n.op == "call_module":
            calls[id(mods[n.target])] = calls.get(id(mods[n.target]), 0) + 1

    def activation_node(n):
        if len(n.users) != 1:
            return None, None
        u = next(iter(n.users))
        if u.op == "call_module" and len(u.args) == 1 and not u.kwargs:
            if hooked(mods[u.target]):
                return None, None
            spec = activation_of(mods[u.target])
            return (u, spec) if spec is not None else (None, None)
        if (u.op == "call_function" and u.target in _FUNCTIONS and len(u.args) == 1 and u.args[0] is n
                and set(u.kwargs) <= {"inplace"}):
            return u, _FUNCTIONS[u.target]
        return None, None

    count = 0
    order = {m: i for i, m in enumerate(graph.nodes)}
    for n in list(graph.nodes):
        if n.op != "call_module" or calls[id(mods[n.target])] != 1 or len(n.args) != 1 or n.kwargs:
            continue
        if global_hooks() or hooked(mods[n.target]):
            continue
        cls = fused_classes.get(type(mods[n.target]))
        if cls is None:
            continue
        act_node, spec = activation_node(n)
        residual, move = None, False
        if act_node is None and len(n.users) == 1:  # act(norm(x) + r)
            add = next(iter(n.users))
            # (an in-place add, r += norm(x), would update r: fused only as norm(x) += r, on the norm's own output)
            if (add.op == "call_function" and add.target in _ADDS and len(add.args) == 2 and not add.kwargs
                    and n in add.args and add.args[0] is not add.args[1]
                    and (add.target is not operator.iadd or add.args[0] is n)):
                other = add.args[1] if add.args[0] is n else add.args[0]
                # (the fused call saves the residual for its backward, as the add does not: a residual written in
                # place by another use would fail that backward, so such a residual is not fused)
                if isinstance(other, fx.Node) and not _written_later(other, n, add, order, mods):
                    act_node, spec = activation_node(add)
                    residual = other if act_node is not None else None
                    # The residual must exist when the normalization runs: when it is computed after it, the
                    # normalization moves to just after it (n's input precedes n, and n's one use, the add, follows the
                    # residual). The fused call then reads the residual where the normalization (or the residual) ran,
                    # not where the add did: fused only if every node from the normalization to the add is a pure
                    # function call (an embedding's indexing, a reshape). An in-place op in between (its result
                    # unused, identity.mul_(0.5)), a module or a read of a buffer could change what the normalization
                    # reads, what it is read with, or the residual the add would have read.
                    if residual is not None:
                        between = [m for m in graph.nodes if order[n] < order.get(m, -1) < order[add]]
                        if all(_pure_call(m) for m in between):
                            move = order[residual] > order[n]
                        else:
                            act_node = None
        if act_node is None:
            continue
        # The fused module: a shallow copy of the converted one (the same parameters, buffers and hooks), in the
        # GraphModule only, so that the model passed in still runs its activation module after an unfused
        # normalization.
        fused = copy.copy(mods[n.target])
        fused.__class__ = cls
        fused.activation = spec
        *path, field = n.target.split(".")
        setattr(gm.get_submodule(".".join(path)) if path else gm, field, fused)
        if residual is not None:
            if move:
                residual.append(n)
                order = {m: i for i, m in enumerate(graph.nodes)}
            n.args = (n.args[0], residual)
            add = next(iter(n.users))
            add.replace_all_uses_with(n)  # (the add's one use, the activation, reads the normalization now)
            graph.erase_node(add)
        act_node.replace_all_uses_with(n)
        graph.erase_node(act_node)
        count += 1
    graph.lint()
    gm.delete_all_unused_submodules()  # (the activation modules the fused ones replaced)
    gm.recompile()
    _order_like(gm, model)
    if [k for k, _ in gm.named_parameters()] != [k for k, _ in model.named_parameters()]:
        # (an optimizer's state_dict maps its state to the parameters by position: a checkpoint of the model would
        # load onto the wrong parameters, silently where their shapes agree)
        return "a GraphModule would not list its parameters in the model's order"
    return gm, count


def _order_like(gm, model):
    """Each module of gm with its submodules, parameters and buffers in the order of model's module of the same
    name: GraphModule registers them in the order the forward first uses them, and named_parameters() (an optimizer's
    order) follows registration."""
    for name, sub in list(gm.named_modules()):
        try:
            ref = model.get_submodule(name)
        except AttributeError:  # (a module of the graph's own)
            continue
        for attr in ("_modules", "_parameters", "_buffers"):
            mine, theirs = getattr(sub, attr), getattr(ref, attr)
            rank = {k: i for i, k in enumerate(theirs)}
            ordered = sorted(mine.items(), key=lambda kv: rank.get(kv[0], len(rank)))
            mine.clear()
            mine.update(ordered)
