"""Folding every Conv→BatchNorm and Linear→BatchNorm1d pair of an eval-mode PyTorch model into the conv/linear.

Which pairs: a BatchNorm whose input is a Conv1d/2d/3d's (or a Linear's) output, and that output nothing else reads.
Inside an ``nn.Sequential`` that is visible from the module tree; in a module whose ``forward`` calls
``self.bn1(self.conv1(x))`` it is not, so the model is traced symbolically (``torch.fx``) to find the pairs in its
data flow. Models that cannot be traced (data-dependent control flow, for instance) fall back to the pairs that
follow each other in an ``nn.Sequential``, with a warning saying so.

The maths is :func:`bn_simd.fold_conv` / :func:`bn_simd.fold_linear` (BN after the layer, exact for any stride,
dilation, padding or groups), in float64, written back in the layer's dtype.
"""
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from ..fold import fold_conv, fold_linear
from . import fused as _fused
from . import modules as _modules
from . import sync as _sync

__all__ = ["fold"]

_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
# BatchNorm classes whose eval forward is y = (x - running_mean) / sqrt(running_var + eps) * weight + bias:
# PyTorch's and bn_simd.torch's. A subclass with another forward is left alone.
_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward, _modules.BatchNorm1d.forward,
                _modules.BatchNorm2d.forward, _modules.BatchNorm3d.forward, _sync.SyncBatchNorm.forward)


def _is_conv(m):
    return isinstance(m, _ConvNd) and not m.transposed and type(m).forward in _CONV_FORWARDS


def _is_linear(m):
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _is_bn(m):
    return isinstance(m, _BatchNorm) and type(m).forward in _BN_FORWARDS


def _pairs_with(layer, bn):
    """layer → bn is a pair this module folds (types and sizes; the data flow is checked by the caller)."""
    if not _is_bn(bn) or not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return False  # without running statistics an eval BN normalises with the batch's: not an affine map
    if _fused.hooked(bn) or _fused.hooked(layer) or _fused.global_hooks():
        return False  # a hook would see different values (legacy weight_norm is a pre-hook that sets the weight)
    if parametrize.is_parametrized(layer) or parametrize.is_parametrized(bn):
        return False  # the weight is computed at each call: a folded one would not be used
    if _is_conv(layer):
        return bn.num_features == layer.out_channels
    if _is_linear(layer):
        # BatchNorm1d's channel axis is 1: the Linear's features for a (N, features) output
        return isinstance(bn, nn.BatchNorm1d) and bn.num_features == layer.out_features
    return False


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping every conv, linear and batch norm (bn_simd.torch's too) as one call_module node."""

    def is_leaf_module(self, m, qualname):
        return _is_conv(m) or _is_linear(m) or isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def _traced_pairs(model):
    """[(layer name, bn name)] from model's data flow (torch.fx); raises what tracing raises."""
    graph = _Tracer().trace(model)
    calls = {}  # id(module) -> number of call_module nodes that run it
    for node in graph.nodes:
        if node.op == "call_module":
            m = model.get_submodule(node.target)
            calls[id(m)] = calls.get(id(m), 0) + 1
    read_attrs = [node.target for node in graph.nodes if node.op == "get_attr"]
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            continue
        layer, bn = model.get_submodule(node.target), model.get_submodule(user.target)
        if calls[id(layer)] != 1 or calls[id(bn)] != 1 or not _pairs_with(layer, bn):
            continue
        if any(a.startswith(node.target + ".") for a in read_attrs):  # forward reads the layer's weight directly
            continue
        pairs.append((node.target, user.target))
    return pairs


def _sequential_pairs(model):
    """[(layer name, bn name)]: consecutive children of every plain nn.Sequential."""
    pairs = []
    for name, m in model.named_modules():
        if type(m) is not nn.Sequential:
            continue
        kids = list(m.named_children())
        for (n1, a), (n2, b) in zip(kids, kids[1:]):
            if _pairs_with(a, b):
                prefix = name + "." if name else ""
                pairs.append((prefix + n1, prefix + n2))
    return pairs


def _unshared(model, pairs):
    """The pairs whose modules and parameters are registered once in model (shared ones would change elsewhere)."""
    mods, params = {}, {}
    for _, m in model.named_modules(remove_duplicate=False):
        mods[id(m)] = mods.get(id(m), 0) + 1
    for _, p in model.named_parameters(remove_duplicate=False):
        params[id(p)] = params.get(id(p), 0) + 1
    out, seen = [], set()
    for ln, bn in pairs:
        layer, norm = model.get_submodule(ln), model.get_submodule(bn)
        if mods[id(layer)] != 1 or mods[id(norm)] != 1 or ln in seen or bn in seen:
            continue
        if any(params[id(p)] != 1 for p in layer.parameters(recurse=False)):
            continue
        seen.update((ln, bn))
        out.append((ln, bn))
    return out


def _np64(t):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def _folded(layer, bn, bn_name):
    """(weight, bias) tensors of layer with bn folded in, in layer.weight's dtype and device."""
    args = (_np64(layer.weight), _np64(layer.bias), _np64(bn.running_mean), _np64(bn.running_var), _np64(bn.weight),
            _np64(bn.bias))
    try:
        if _is_conv(layer):
            w2, b2 = fold_conv(*args, eps=bn.eps, weight_layout="OIHW")
        else:
            w2, b2 = fold_linear(*args, eps=bn.eps)
    except (ValueError, TypeError) as e:
        raise type(e)(f"cannot fold {bn_name!r}: {e}") from None
    like = layer.weight
    out = [torch.from_numpy(a).to(like.dtype).to(like.device) for a in (w2, b2)]
    for t, a, what in zip(out, (w2, b2), ("weight", "bias")):
        if not bool(torch.isfinite(t).all()) and np.all(np.isfinite(a)):
            raise ValueError(f"cannot fold {bn_name!r}: the folded {what} overflows {like.dtype}")
    return out[0], out[1]


class FoldedBatchNorm1d(nn.Identity):
    """What takes the place of a BatchNorm1d folded into the Linear before it: the identity on the (N, features)
    output the fold is right for. Any other rank raises RuntimeError: on a 3-d (N, L, features) output BatchNorm1d
    normalises axis 1 (L), which only runs when L equals the features, and the folded weights would then be
    silently wrong."""

    def forward(self, input):
        if input.dim() != 2:
            raise RuntimeError(f"bn_simd.torch.fold folded a BatchNorm1d into the Linear before it for a 2-d "
                               f"(N, features) output, but the Linear's output here is {input.dim()}-d "
                               f"{tuple(input.shape)}: the fold does not hold for it (fold the model without that "
                               f"pair, e.g. with trace=False on a model whose Sequential does not hold it)")
        return input


def fold(model, *, trace=True):
    """Fold every eval-mode BatchNorm that directly follows a Conv1d/2d/3d, or a BatchNorm1d that follows a
    Linear, into that layer, in place; returns model.

    For each pair found, the layer's weight and bias become ``bn_simd.fold_conv`` / ``fold_linear``'s (computed in
    float64, stored in the layer's dtype and device; a layer without bias gets one) and the batch norm is replaced
    by ``nn.Identity``. The model's output is unchanged up to float32 rounding.

    Pairs: found in the model's data flow by ``torch.fx`` symbolic tracing (``trace=True``): a BatchNorm called on
    a conv's/linear's output that nothing else reads (so ``self.bn1(self.conv1(x))`` inside a forward counts).
    When the model cannot be traced, or with ``trace=False``, only pairs that follow each other in an ``nn.Sequential``
    are folded (a RuntimeWarning says when tracing failed, and why). Left alone: layers or batch norms called more than
    once or registered under several names, layers with tied parameters, hooks of any kind (legacy ``weight_norm`` is a
    pre-hook) or parametrizations (``torch.nn.utils.parametrize``, the new ``weight_norm``), batch norms with hooks or
    parametrizations or without running statistics (``track_running_stats=False``), transposed convs,
    subclasses that override ``forward``. BatchNorm classes folded: ``torch.nn``'s BatchNorm1d/2d/3d and
    SyncBatchNorm and bn_simd.torch's. A Linear→BatchNorm1d pair is folded for a 2-d (N, features) output: its
    batch norm is replaced by :class:`FoldedBatchNorm1d` (an ``nn.Identity``) which raises RuntimeError on any other
    rank (on a 3-d (N, L, features) output BatchNorm1d normalises axis 1, L, which runs when L equals the features,
    and the fold would be wrong) rather than return a wrong result.

    Raises ValueError when model (or a layer or batch norm of a pair) is in training mode (call ``model.eval()``:
    folding uses the running statistics), or when a batch norm's values cannot be folded (eps <= 0, non-finite
    or negative statistics, an overflow of the layer's dtype); TypeError when model is not an ``nn.Module``.
    A call that raises changes nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("model is in training mode: folding uses the batch norms' running statistics, which only "
                         "eval mode uses; call model.eval() first")
    pairs = None
    if trace:
        try:
            pairs = _traced_pairs(model)
        except Exception as e:  # torch.fx raises many kinds (TraceError, TypeError, NotImplementedError, ...)
            warnings.warn(f"bn_simd.torch.fold: torch.fx could not trace {type(model).__name__} "
                          f"({type(e).__name__}: {e}); folding only Conv/Linear→BatchNorm pairs that follow each "
                          f"other in an nn.Sequential", RuntimeWarning, stacklevel=2)
    if pairs is None:
        pairs = _sequential_pairs(model)
    pairs = _unshared(model, pairs)
    for ln, bn in pairs:
        for name in (ln, bn):
            if model.get_submodule(name).training:
                raise ValueError(f"module {name!r} is in training mode inside an eval model: call model.eval()")
    updates = [(ln, bn) + _folded(model.get_submodule(ln), model.get_submodule(bn), bn) for ln, bn in pairs]
    for ln, bn, w2, b2 in updates:   # every pair computed before anything changes
        layer = model.get_submodule(ln)
        with torch.no_grad():
            layer.weight.copy_(w2)
            if layer.bias is None:
                layer.bias = nn.Parameter(b2, requires_grad=layer.weight.requires_grad)
            else:
                layer.bias.copy_(b2)
        parent, _, attr = bn.rpartition(".")
        setattr(model.get_submodule(parent), attr, FoldedBatchNorm1d() if _is_linear(layer) else nn.Identity())
    return model
