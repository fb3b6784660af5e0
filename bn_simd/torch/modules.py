"""``torch.nn`` normalization modules running bn_simd's kernels, and :func:`convert`.

Each class subclasses its ``torch.nn`` namesake and replaces only the call into the functional layer, so the
constructor signature (``device=``, ``dtype=`` included), parameters, buffers, ``state_dict`` keys (old checkpoints
without ``num_batches_tracked`` included), ``reset_parameters``, ``repr`` and ``isinstance(m, torch.nn.BatchNorm2d)``
are PyTorch's, and state dicts load both ways. The forward is :mod:`bn_simd.torch.functional`'s, which hands to
PyTorch's own implementation what the kernels do not cover (dtypes other than float32, float64, float16 and
bfloat16, devices other than the CPU, graph tracing and compiling; see there). float16/bfloat16 input runs with
parameters and buffers of its dtype (a module converted with ``.half()`` / ``.bfloat16()``) or float32 ones
(PyTorch's mixed rule: a float32 module given half data).

One difference from PyTorch: a call that raises leaves ``num_batches_tracked`` as it was (PyTorch counts the batch
before its checks).
"""
import warnings

import torch
from torch.utils.dlpack import to_dlpack as _to_dlpack

from .. import _core
from . import _bridge as B
from . import functional as F
from . import fused as _fused
from .rownorm_modules import LayerNorm, LayerNormAct, RMSNorm, RMSNormAct

# The eval fast path's entry in a module's __dict__ (see _eval_fast_path): the per-channel tensors checked by a
# general call, and their addresses. Left out of pickles and copies, as B.VIEWS_KEY.
EVAL_KEY = "_bn_simd_eval"
_RANKS = {torch.nn.BatchNorm1d: (2, 3), torch.nn.BatchNorm2d: (4,), torch.nn.BatchNorm3d: (5,)}
# a dtype as the fast path reads it from a DLPack export: code << 8 | bits (float 2, bfloat 4)
_DLPACK_KEYS = {torch.float32: 0x220, torch.float64: 0x240, torch.float16: 0x210, torch.bfloat16: 0x410}
_Tensor, _empty_like, _grad_enabled = torch.Tensor, torch.empty_like, torch.is_grad_enabled
_is_tracing = torch._C._is_tracing
_is_compiling = torch.compiler.is_compiling
_dispatch_depth, _fx_trace = B._dispatch_depth, B._fx_trace  # (make_fx's mode, torch.fx traces: PyTorch's operators)


def _batch_norm_forward(self, input, activation=None, residual=None):
    """Batch normalization of input with this module's state, as ``torch.nn.BatchNorm*d`` does: batch statistics in
    training mode (running statistics updated with ``momentum``, or the cumulative average when momentum is None) and
    in eval mode without running statistics; the running statistics otherwise. (activation, residual: the fused
    modules' epilogue, bn_simd.torch.fused.)"""
    # Eval outside autograd (inference): one compiled call does the checks and the work (_core.torch_bn_eval); inside
    # a network every Python or PyTorch operation runs from caches the other layers evicted, and costs microseconds.
    if (not self.training and activation is None and residual is None and type(input) is _Tensor
            and not _grad_enabled()):
        fast = self.__dict__.get(EVAL_KEY)
        # (_is_compiling first: torch.compile reads it as a constant; _is_tracing is a builtin it cannot trace)
        if (fast is not None and not _is_compiling() and not _is_tracing() and not _dispatch_depth()
                and not _fx_trace._is_fx_tracing_flag):
            y = _core.torch_bn_eval(self, fast, input, _to_dlpack, _empty_like, B._threads())
            if y is not None:
                return y
    if type(input) is not _Tensor or _fx_trace._is_fx_tracing_flag:  # (a torch.fx trace: B.fx_call)
        y = B.fx_call(self, input, (input,), {})
        if y is not None:
            return y
    self._check_input_dim(input)
    # (the registered parameters and buffers read from their dicts: nn.Module.__getattr__ costs a few us per call)
    buffers = self._buffers
    running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
    counter = buffers.get("num_batches_tracked")
    training, track = self.training, self.track_running_stats
    counting = training and track and counter is not None
    if not (training and track and running_mean is not None):  # (momentum unused: not checked, as in PyTorch)
        factor = 0.0
    elif self.momentum is None:  # the cumulative average: this batch weighs 1 / (batches seen with it)
        factor = 1.0 / (int(counter) + 1) if counting else 0.0
    else:
        factor = self.momentum
    batch_stats = training or (running_mean is None and running_var is None)
    # running statistics passed only where they are updated (training, tracked) or used (eval)
    keep = not training or track
    tensors = (running_mean if keep else None, running_var if keep else None, *B.affine(self))
    views = B.stats_views(self, input, tensors)
    if counting:
        return B.counted(counter, lambda: F._batch_norm(input, *tensors, batch_stats, factor, self.eps, None, views,
                                                        activation, residual), tensors[:2])
    y = F._batch_norm(input, *tensors, batch_stats, factor, self.eps, None, views, activation, residual)
    if (not training and views is not None and tensors[0] is not None and tensors[1] is not None
          and activation is None and residual is None):
        _cache_eval(self, input, tensors, views)
    return y


def _cache_eval(self, input, tensors, views):
    """After an eval call that passed the general checks: the module's per-channel tensors and their addresses for
    the fast path, when they are dense vectors of one value per channel."""
    C = input.shape[1]
    if any(a is not None and (a.shape != (C,) or not a.flags.c_contiguous) for a in views):
        return
    ranks = next((r for cls, r in _RANKS.items() if isinstance(self, cls)), ())
    pdt = next(t.dtype for t in tensors if t is not None)  # (the general checks: all of one dtype)
    self.__dict__[EVAL_KEY] = (C, _DLPACK_KEYS[input.dtype], sum(1 << r for r in ranks), *tensors,
                               *(None if t is None else t.data_ptr() for t in tensors), _DLPACK_KEYS[pdt], pdt)


def _getstate(self):
    # the cached NumPy views (_bridge.module_views) stay out of pickles and deep copies: a copy makes its own
    state = torch.nn.Module.__getstate__(self)
    state.pop(B.VIEWS_KEY, None)
    state.pop(EVAL_KEY, None)
    return state


class BatchNorm1d(torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on bn_simd's kernels: (N, C) or (N, C, L) input."""
    forward = _batch_norm_forward
    __getstate__ = _getstate
    __prepare_scriptable__ = B.not_scriptable


class BatchNorm2d(torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on bn_simd's kernels: (N, C, H, W) input, contiguous or ``torch.channels_last``
    (read in place; the output keeps the input's memory format)."""
    forward = _batch_norm_forward
    __getstate__ = _getstate
    __prepare_scriptable__ = B.not_scriptable


class BatchNorm3d(torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on bn_simd's kernels: (N, C, D, H, W) input, contiguous or
    ``torch.channels_last_3d``."""
    forward = _batch_norm_forward
    __getstate__ = _getstate
    __prepare_scriptable__ = B.not_scriptable


@_fused.act_forward(_batch_norm_forward)
def _fused_forward(self, input, residual=None):
    return _batch_norm_forward(self, input, self.activation, residual)


_fused_init = _fused.act_init(torch.nn.modules.batchnorm._BatchNorm)
_fused_repr = _fused.act_repr(torch.nn.modules.batchnorm._BatchNorm)


class BatchNormAct1d(BatchNorm1d):
    """:class:`BatchNorm1d` followed by an activation, fused: ``forward(input, residual=None)`` returns
    act(batch_norm(input) + residual) in one sweep (``activation=``: "relu", "relu6", ("leaky_relu", slope),
    ("clamp", lo, hi), "silu"; see :mod:`bn_simd.torch.fused`). The residual is a tensor of input's dtype and shape
    (one that broadcasts to input's shape takes PyTorch's add and activation after the plain batch norm). Parameters,
    buffers and state dict are BatchNorm1d's (the activation is configuration, as a torch.nn.ReLU that follows has no
    state)."""
    __init__ = _fused_init
    forward = _fused_forward
    extra_repr = _fused_repr


class BatchNormAct2d(BatchNorm2d):
    """:class:`BatchNorm2d` followed by an activation, fused (as :class:`BatchNormAct1d`): what
    ``convert(model, fuse_activations=True)`` makes of a BatchNorm2d followed by a ReLU, and of ResNet's
    relu(bn(x) + identity)."""
    __init__ = _fused_init
    forward = _fused_forward
    extra_repr = _fused_repr


class BatchNormAct3d(BatchNorm3d):
    """:class:`BatchNorm3d` followed by an activation, fused (as :class:`BatchNormAct1d`)."""
    __init__ = _fused_init
    forward = _fused_forward
    extra_repr = _fused_repr


class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` on bn_simd's kernels: (N, C, *spatial) input of rank 2 to 5."""
    __getstate__ = _getstate
    __prepare_scriptable__ = B.not_scriptable

    @B.fx_leaf
    def forward(self, input):
        tensors = B.affine(self)
        return F._group_norm(input, self.num_groups, *tensors, self.eps, None, B.module_views(self, input, tensors))


class GroupNormAct(GroupNorm):
    """:class:`GroupNorm` followed by an activation, fused: ``forward(input, residual=None)`` returns
    act(group_norm(input) + residual) in one sweep (``activation=`` and the residual as :class:`BatchNormAct1d`'s;
    a diffusion UNet's GroupNorm -> SiLU is ``GroupNormAct(32, C, activation="silu")``). Constructor, parameters and
    state dict are torch.nn.GroupNorm's plus the keyword ``activation``."""
    __init__ = _fused.act_init(torch.nn.GroupNorm)
    extra_repr = _fused.act_repr(torch.nn.GroupNorm)

    @_fused.act_forward(GroupNorm.forward)
    def forward(self, input, residual=None):
        tensors = B.affine(self)
        return _fused.group_norm_act(input, self.num_groups, *tensors, self.eps, self.activation, residual, None,
                                     B.module_views(self, input, tensors))


def _apply_instance_norm(self, input, activation=None, residual=None):
    # what torch.nn's _InstanceNorm.forward calls after its checks and unbatched-input handling
    use_input_stats = self.training or not self.track_running_stats
    tensors = (self._buffers.get("running_mean"), self._buffers.get("running_var"), *B.affine(self))
    update = use_input_stats and tensors[0] is not None and self.momentum is not None
    return F._instance_norm(input, *tensors, use_input_stats, self.momentum if update else 0.0, self.eps, None,
                            B.stats_views(self, input, tensors), activation, residual)


@_fused.act_forward(torch.nn.modules.instancenorm._InstanceNorm.forward)
def _instance_act_forward(self, input, residual=None):
    """torch.nn's _InstanceNorm.forward (the rank check, num_features against the channels, unbatched input given a
    batch axis of one) with the activation, and the residual treated as the input."""
    self._check_input_dim(input)
    axis = input.dim() - self._get_no_batch_dim()
    if input.size(axis) != self.num_features:
        if self.affine:
            raise ValueError(f"input must have num_features={self.num_features} channels at dim={axis}, got "
                             f"{input.size(axis)}")
        warnings.warn(f"input's size at dim={axis} ({input.size(axis)}) is not num_features={self.num_features}, "
                      f"which affine=False leaves unused", stacklevel=2)
    if axis == 0:  # unbatched (C, *spatial); (the residual is a tensor: act_forward checked it)
        if residual is not None:
            residual = residual.unsqueeze(0)
        return _apply_instance_norm(self, input.unsqueeze(0), self.activation, residual).squeeze(0)
    return _apply_instance_norm(self, input, self.activation, residual)


# torch.nn's forward (checks, unbatched input), a leaf of torch.fx traces
_instance_forward = B.fx_leaf(torch.nn.modules.instancenorm._InstanceNorm.forward)


class InstanceNorm1d(torch.nn.InstanceNorm1d):
    """``torch.nn.InstanceNorm1d`` on bn_simd's kernels: (N, C, L) or unbatched (C, L) input."""
    _apply_instance_norm = _apply_instance_norm
    __getstate__ = _getstate
    __prepare_scriptable__ = B.not_scriptable
    forward = _instance_forward


class InstanceNorm2d(torch.nn.InstanceNorm2d):
    """``torch.nn.InstanceNorm2d`` on bn_simd's kernels: (N, C, H, W) or unbatched (C, H, W) input."""
    _apply_instance_norm = _apply_instance_norm
    __getstate__ = _getstate
    __prepare_scriptable__ = B.not_scriptable
    forward = _instance_forward


class InstanceNorm3d(torch.nn.InstanceNorm3d):
    """``torch.nn.InstanceNorm3d`` on bn_simd's kernels: (N, C, D, H, W) or unbatched (C, D, H, W) input."""
    _apply_instance_norm = _apply_instance_norm
    __getstate__ = _getstate
    __prepare_scriptable__ = B.not_scriptable
    forward = _instance_forward


_instance_act_init = _fused.act_init(torch.nn.modules.instancenorm._InstanceNorm)
_instance_act_repr = _fused.act_repr(torch.nn.modules.instancenorm._InstanceNorm)


class InstanceNormAct1d(InstanceNorm1d):
    """:class:`InstanceNorm1d` followed by an activation, fused: ``forward(input, residual=None)`` returns
    act(instance_norm(input) + residual) in one sweep (``activation=`` and the residual as :class:`BatchNormAct1d`'s;
    unbatched input takes an unbatched residual). Running statistics move as without the activation; an eval
    call with tracked statistics normalises with them (batch norm's eval, fused the same way). Constructor,
    parameters, buffers and state dict are torch.nn.InstanceNorm1d's plus the keyword ``activation``."""
    __init__ = _instance_act_init
    forward = _instance_act_forward
    extra_repr = _instance_act_repr


class InstanceNormAct2d(InstanceNorm2d):
    """:class:`InstanceNorm2d` followed by an activation, fused (as :class:`InstanceNormAct1d`)."""
    __init__ = _instance_act_init
    forward = _instance_act_forward
    extra_repr = _instance_act_repr


class InstanceNormAct3d(InstanceNorm3d):
    """:class:`InstanceNorm3d` followed by an activation, fused (as :class:`InstanceNormAct1d`)."""
    __init__ = _instance_act_init
    forward = _instance_act_forward
    extra_repr = _instance_act_repr


# torch.nn class -> bn_simd class; exact types only: a user's subclass of a torch.nn class may override forward
SWAPS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d,
         torch.nn.GroupNorm: GroupNorm, torch.nn.InstanceNorm1d: InstanceNorm1d,
         torch.nn.InstanceNorm2d: InstanceNorm2d, torch.nn.InstanceNorm3d: InstanceNorm3d,
         torch.nn.LayerNorm: LayerNorm, torch.nn.RMSNorm: RMSNorm}


# bn_simd class -> its fused class (convert's fuse_activations)
FUSED = {BatchNorm1d: BatchNormAct1d, BatchNorm2d: BatchNormAct2d, BatchNorm3d: BatchNormAct3d,
         GroupNorm: GroupNormAct, InstanceNorm1d: InstanceNormAct1d, InstanceNorm2d: InstanceNormAct2d,
         InstanceNorm3d: InstanceNormAct3d, LayerNorm: LayerNormAct, RMSNorm: RMSNormAct}


def convert(model, fuse_activations=False, *, trace=True):
    """Make every ``torch.nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d``,
    ``LayerNorm`` and ``RMSNorm`` in model (model itself included) run on bn_simd's kernels, in place; returns model (a
    SyncBatchNorm keeps its process_group and synchronises CPU tensors, mode "exact": see
    :class:`bn_simd.torch.SyncBatchNorm`).

    The module objects stay the same (their class becomes bn_simd's subclass, which adds no state), so parameters,
    buffers, hooks, training mode and the references an optimizer holds are all kept, and ``state_dict()`` is
    unchanged. Modules of other classes (subclasses of these included, and the lazy modules before their first
    call) are left as they are. Raises TypeError when model is not a ``torch.nn.Module``.

    fuse_activations=True also fuses each of those modules (SyncBatchNorm aside) followed by a ReLU, ReLU6,
    LeakyReLU, Hardtanh or SiLU module (or ``torch.relu`` / ``F.relu`` / ``F.silu``), and the add before such an
    activation (ResNet's relu(bn(x) + identity), a pre-activation block's act(norm(x) + skip)), into one call of
    its fused module (bn_simd.torch.fused): :class:`BatchNormAct2d` (1d, 3d), :class:`GroupNormAct` (a diffusion
    UNet's GroupNorm -> SiLU), :class:`InstanceNormAct2d` (1d, 3d), :class:`LayerNormAct`, :class:`RMSNormAct`. The
    model is traced with ``torch.fx`` and the returned model is then a ``torch.fx.GraphModule`` over model's modules
    (model itself when no pair is fused)
    (the activation and add calls gone from its graph; a fused add's other operand becomes the module's residual
    argument: one of another shape that broadcasts with the output, or of another dtype than the input's (a float32
    identity beside a bfloat16 convolution under ``torch.autocast``), takes PyTorch's add and activation after the
    plain normalization). Its fused modules are copies of
    model's converted ones sharing their parameters, buffers and hooks, so model itself still runs as before
    (converted, not fused). A residual computed after the normalization is fused only when what runs in between is
    pure function calls (an embedding's indexing or reshape), the normalization then moving after them; a graph in
    which the tracer froze a tensor computed from the model's state (a buffer read through a module, as
    ``bn.running_mean``) is not used. torch.fx traces an augmented assignment ``r += t`` on tensors as ``r = r + t``:
    a model that relies on it updating another reference to r computes otherwise once traced.
    A model whose graph would not compute what its forward does is not traced either: a forward that reads
    ``self.training`` (``F.dropout(training=self.training)``: the graph would keep the mode it was traced in), or that
    holds ``no_grad`` / ``enable_grad`` / ``inference_mode`` / ``autocast`` / ``checkpoint`` regions (tracing runs their
    calls without them; found by name in the source of the forwards tracing would enter, and by the tracer in any
    method they call: an operation recorded under another grad mode, inference mode, autocast or saved-tensor hooks,
    or a custom ``torch.autograd.Function`` applied, whose backward a graph would lose), or that assigns module
    attributes or adds to a list or dict of them (the attributes are put back after the trace), gets a RuntimeWarning
    saying so; so does a model that overrides ``train`` or holds hooks on itself or on a module tracing enters (a
    backbone keeping its batch norms in eval mode, a Grad-CAM hook on a stage: a GraphModule rebuilds such modules as
    plain ones), and one whose graph would not have its ``state_dict`` keys (a module its forward does not call, a
    buffer registered with ``persistent=False``: its checkpoints would no longer load). A residual that a later
    operation may write in place, itself or through a tensor sharing its memory (``nn.ReLU(inplace=True)`` on the
    skip, ``relu_`` on a view of it or on the tensor it is a slice of, its ``.data``), is not fused: the fused module
    saves it for its backward. Hooks registered for every module also stop the tracing (they would run on its
    proxies).
    When the model cannot be traced (or gave such a graph), the pairs inside the ``torch.nn.Sequential`` containers
    known to run whole (model itself when it is one, and those nested in it through Sequentials alone) are fused in
    place (the activation module replaced by ``torch.nn.Identity``; a normalization registered at more than one place is
    left unfused, as its other uses would take the activation too) and model is returned, with a RuntimeWarning
    saying so. ``trace=False`` skips tracing and fuses so the pairs of every ``nn.Sequential``: it asserts that model's
    forward runs each of them whole (a forward that iterated one and read a normalization's output before its
    activation would see the activation applied), as :func:`bn_simd.torch.fold`'s does. A module called more than once
    or with more than one argument, a pair with hooks (a forward, pre-forward or backward hook on the normalization or
    the activation module, or a hook registered for every module), whose output has other uses than the activation (or
    the add), or an activation of a subclass (which may override forward) is not fused. The fused model applies the
    activation to the float32 value before its rounding (the unfused model rounds the normalization's output first):
    outputs agree within that rounding.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for m in model.modules():
        cls = SWAPS.get(type(m))
        if cls is not None:
            m.__class__ = cls
    if fuse_activations:
        done = _fused.fuse_graph(model, FUSED) if trace else None
        if isinstance(done, str):
            warnings.warn(f"bn_simd.torch.convert: {type(model).__name__} is not fused through torch.fx: {done}; "
                          f"fusing in place only the pairs of nn.Sequential containers that run whole (trace=False: "
                          f"those of every nn.Sequential)", RuntimeWarning, stacklevel=2)
            _fused.fuse_sequential(model, FUSED, whole_only=True)
            return model
        if done is not None:
            return done[0] if done[1] else model  # (a graph that fused nothing would only rename the calls)
        if _fused.fuse_sequential(model, FUSED, whole_only=trace)[1]:
            warnings.warn(f"bn_simd.torch.convert: torch.fx could not trace {type(model).__name__} (or froze a "
                          f"tensor of its state): fused only the pairs of nn.Sequential containers that run whole "
                          f"(model itself, and Sequentials nested in it through Sequentials alone); trace=False fuses "
                          f"those of every nn.Sequential, for a model whose forward runs each of them whole",
                          RuntimeWarning, stacklevel=2)
    return model
