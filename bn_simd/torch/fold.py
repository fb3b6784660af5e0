"""Folding every Conv→BatchNorm and Linear→BatchNorm1d pair of an eval-mode PyTorch model into the conv/linear.

Which pairs: a BatchNorm whose input is a Conv1d/2d/3d's (or a Linear's) output, and that output nothing else reads.
Inside an ``nn.Sequential`` that is visible from the module tree; in a module whose ``forward`` calls
``self.bn1(self.conv1(x))`` it is not, so the model is traced symbolically (``torch.fx``) to find the pairs in its
data flow. Models that cannot be traced (data-dependent control flow, for instance) fall back to the pairs that
follow each other in an ``nn.Sequential`` that runs whole (the model itself, or nested in it through Sequentials),
with a warning saying so.

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

from .._args import bf16_bits
from ..fold import fold_conv, fold_linear
from . import _bridge as B
from . import fused as _fused
from . import modules as _modules
from . import sync as _sync

__all__ = ["fold"]

_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
_CONV_CALLS = (nn.Conv1d._conv_forward, nn.Conv2d._conv_forward, nn.Conv3d._conv_forward)
# BatchNorm classes whose eval forward is y = (x - running_mean) / sqrt(running_var + eps) * weight + bias:
# PyTorch's and bn_simd.torch's. A subclass with another forward is left alone.
_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward, _modules.BatchNorm1d.forward,
                _modules.BatchNorm2d.forward, _modules.BatchNorm3d.forward, _sync.SyncBatchNorm.forward)


def _own(m, *names):
    """None of names is set on the module itself (a forward patched on the instance is the one that runs)."""
    return not any(n in vars(m) for n in names)


def _is_conv(m):
    # (_conv_forward too: a subclass that computes its weight there, weight standardisation say, keeps forward)
    return isinstance(m, _ConvNd) and not m.transposed and type(m).forward in _CONV_FORWARDS and \
        getattr(type(m), "_conv_forward", None) in _CONV_CALLS and _own(m, "forward", "_conv_forward")


def _is_linear(m):
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and _own(m, "forward")


def _is_bn(m):
    return isinstance(m, _BatchNorm) and type(m).forward in _BN_FORWARDS and _own(m, "forward")


def _pairs_with(layer, bn):
    """layer → bn is a pair this module folds (types and sizes; the data flow is checked by the caller)."""
    if not _is_bn(bn) or not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return False  # without running statistics an eval BN normalises with the batch's: not an affine map
    if _fused.hooked(bn) or _fused.hooked(layer) or _fused.global_hooks():
        return False  # a hook would see different values (legacy weight_norm is a pre-hook that sets the weight)
    if parametrize.is_parametrized(layer) or parametrize.is_parametrized(bn):
        return False  # the weight is computed at each call: a folded one would not be used
    if _is_conv(layer):
        # (BatchNorm1d/2d/3d after a conv of another rank raises before folding: it stays so)
        ranks = [k for cls, k in ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3)) if isinstance(bn, cls)]
        return bn.num_features == layer.out_channels and ranks in ([], [len(layer.kernel_size)])
    if _is_linear(layer):
        # BatchNorm1d's channel axis is 1: the Linear's features for a (N, features) output
        return isinstance(bn, nn.BatchNorm1d) and bn.num_features == layer.out_features
    return False


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping every conv, linear and batch norm (bn_simd.torch's too) as one call_module node."""

    def is_leaf_module(self, m, qualname):
        return _is_conv(m) or _is_linear(m) or isinstance(m, (_BatchNorm, FoldedBatchNorm)) or \
            super().is_leaf_module(m, qualname)  # (FoldedBatchNorm1d's rank check: a folded model traces again)


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
        if any(a.startswith((node.target + ".", user.target + ".")) for a in read_attrs):
            continue   # forward reads the layer's weight or the batch norm's tensors directly
        pairs.append((node.target, user.target))
    return pairs


def _sequential_pairs(model, whole_only=False):
    """[(layer name, bn name)]: consecutive children of every plain nn.Sequential (whole_only: of those known to run
    whole, fused.whole_sequentials)."""
    pairs = []
    whole = {id(m) for m in _fused.whole_sequentials(model)}
    for name, m in model.named_modules():
        if type(m) is not nn.Sequential or (whole_only and id(m) not in whole):
            continue
        kids = list(m.named_children())
        for (n1, a), (n2, b) in zip(kids, kids[1:]):
            if _pairs_with(a, b):
                prefix = name + "." if name else ""
                pairs.append((prefix + n1, prefix + n2))
    return pairs


def _storage(t):
    """The key of t's memory (its storage), or None where it has none to compare (sparse, meta)."""
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError, ValueError):  # (ValueError: a lazy module's uninitialised tensor)
        return None


def _unshared(model, pairs):
    """The pairs whose modules and parameters are registered once in model, and whose layer's parameters share
    their memory with no other tensor of the model (tied through ``.data``): a fold written there would change the
    other user too."""
    mods, params, tensors = {}, {}, {}
    for _, m in model.named_modules(remove_duplicate=False):
        mods[id(m)] = mods.get(id(m), 0) + 1
    for _, p in model.named_parameters(remove_duplicate=False):
        params[id(p)] = params.get(id(p), 0) + 1
    for _, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(
            remove_duplicate=False)):
        if t is not None:
            tensors.setdefault(_storage(t), set()).add(id(t))
    out, seen = [], set()
    for ln, bn in pairs:
        layer, norm = model.get_submodule(ln), model.get_submodule(bn)
        if mods[id(layer)] != 1 or mods[id(norm)] != 1 or ln in seen or bn in seen:
            continue
        mine = list(layer.parameters(recurse=False))
        if any(params[id(p)] != 1 for p in mine):
            continue
        if any(_storage(p) is None or tensors[_storage(p)] != {id(p)} for p in mine):
            continue
        seen.update((ln, bn))
        out.append((ln, bn))
    return out


def _np64(t):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def _rounded_once(a, dtype):
    """The float64 array a as a tensor of dtype, each value rounded once (PyTorch narrows float64 to float16 and
    bfloat16 through float32, rounding twice): NumPy's float16 cast, the library's bfloat16 rounding."""
    if dtype is torch.bfloat16:
        return B.from_array(bf16_bits(a))
    with np.errstate(over="ignore"):   # (an overflow to Inf is refused by the caller, naming the batch norm)
        return torch.from_numpy(a.astype(np.float16)) if dtype is torch.float16 else torch.from_numpy(a).to(dtype)


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
    out = [_rounded_once(a, like.dtype).to(like.device) for a in (w2, b2)]
    for t, a, what in zip(out, (w2, b2), ("weight", "bias")):
        if not bool(torch.isfinite(t).all()) and np.all(np.isfinite(a)):
            raise ValueError(f"cannot fold {bn_name!r}: the folded {what} overflows {like.dtype}")
    return out[0], out[1]


class FoldedBatchNorm(nn.Identity):
    """What takes the place of a batch norm folded into the layer before it: the identity, keeping the batch norm's
    plain attributes (num_features, eps, momentum, affine, track_running_stats) for a forward that reads them.
    input_dims > 0 (a conv's spatial dims + 2, as fold sets it): an input of another rank raises RuntimeError (an
    unbatched conv's output, for which the batch norm's channel axis is not the conv's: the fold does not hold)."""

    input_dims: int = 0   # (objects pickled before the attribute existed check nothing)

    def __init__(self, bn=None, input_dims=0):
        super().__init__()
        for k in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            if bn is not None and hasattr(bn, k):
                setattr(self, k, getattr(bn, k))
        self.input_dims = int(input_dims)

    @B.fx_leaf
    def forward(self, input):
        if self.input_dims > 0 and input.dim() != self.input_dims:
            raise RuntimeError(f"bn_simd.torch.fold folded a batch norm into the conv before it for its "
                               f"{self.input_dims}-d (N, C, ...) output, but the conv's output here is "
                               f"{input.dim()}-d {input.shape}: the fold does not hold for it (an unbatched "
                               f"input: fold the model without that pair)")
        return input

    def extra_repr(self):
        n = getattr(self, "num_features", None)
        return "" if n is None else f"{n}, folded"


class FoldedBatchNorm1d(FoldedBatchNorm):
    """What takes the place of a BatchNorm1d folded into the Linear before it: the identity on the (N, features)
    output the fold is right for. Any other rank raises RuntimeError: on a 3-d (N, L, features) output BatchNorm1d
    normalises axis 1 (L), which only runs when L equals the features, and the folded weights would then be
    silently wrong."""

    @B.fx_leaf
    def forward(self, input):
        if input.dim() != 2:
            raise RuntimeError(f"bn_simd.torch.fold folded a BatchNorm1d into the Linear before it for a 2-d "
                               f"(N, features) output, but the Linear's output here is {input.dim()}-d "
                               f"{input.shape}: the fold does not hold for it (fold the model without that "
                               f"pair, e.g. with trace=False on a model whose Sequential does not hold it)")
        return input


def fold(model, *, trace=True):
    """Fold every eval-mode BatchNorm that directly follows a Conv1d/2d/3d, or a BatchNorm1d that follows a
    Linear, into that layer, in place; returns model.

    For each pair found, the layer's weight and bias become ``bn_simd.fold_conv`` / ``fold_linear``'s (computed in
    float64, each value rounded once to the layer's dtype, on its device; a layer without bias gets one) and the
    batch norm is replaced by :class:`FoldedBatchNorm`, an ``nn.Identity`` that keeps the batch norm's plain
    attributes (num_features, eps, momentum, affine, track_running_stats). The model's output is unchanged up to
    float32 rounding.

    Pairs: found in the model's data flow by ``torch.fx`` symbolic tracing (``trace=True``): a BatchNorm called on
    a conv's/linear's output that nothing else reads (so ``self.bn1(self.conv1(x))`` inside a forward counts), in
    a forward that reads neither the layer's nor the batch norm's tensors directly. When the model cannot be traced,
    only pairs that follow each other in an ``nn.Sequential`` that runs whole are folded: the model itself when it is
    one, and the Sequentials nested in it through Sequentials alone (a RuntimeWarning says that tracing failed, and
    why); with ``trace=False``, the pairs of every ``nn.Sequential``, which asserts that the model's forward runs
    each of them whole (a forward that read a conv's output between it and its batch norm would change). Left alone:
    layers or batch norms called more than once or registered under several names, layers with tied parameters
    (the same Parameter, or memory shared with another tensor of the model through ``.data``), hooks of any kind
    (legacy ``weight_norm`` is a pre-hook) or parametrizations (``torch.nn.utils.parametrize``, the new
    ``weight_norm``), batch norms with hooks or parametrizations or without running statistics
    (``track_running_stats=False``), transposed convs, subclasses that override ``forward`` (a conv's
    ``_conv_forward`` too), modules with a ``forward`` set on the instance. BatchNorm classes folded: ``torch.nn``'s
    BatchNorm1d/2d/3d and SyncBatchNorm and bn_simd.torch's (BatchNorm1d/2d/3d only after a conv of their rank). A
    conv's batch norm becomes a :class:`FoldedBatchNorm` that raises RuntimeError on an output of another rank than
    the conv's batched one (an unbatched input's, on which the batch norm's channel axis is not the conv's: the fold
    would not hold). A Linear→BatchNorm1d pair is folded for a 2-d
    (N, features) output: its batch norm is replaced by :class:`FoldedBatchNorm1d` (an ``nn.Identity``) which raises
    RuntimeError on any other rank (on a 3-d (N, L, features) output BatchNorm1d normalises axis 1, L, which runs
    when L equals the features, and the fold would be wrong) rather than return a wrong result.

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
                          f"other in an nn.Sequential that runs whole (the model itself, and Sequentials nested in "
                          f"it through Sequentials alone); trace=False folds those of every nn.Sequential, for a "
                          f"model whose forward runs each of them whole", RuntimeWarning, stacklevel=2)
            pairs = _sequential_pairs(model, whole_only=True)
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
        norm = model.get_submodule(bn)
        setattr(model.get_submodule(parent), attr, FoldedBatchNorm1d(norm) if _is_linear(layer) else
                FoldedBatchNorm(norm, len(layer.kernel_size) + 2))
    return model
