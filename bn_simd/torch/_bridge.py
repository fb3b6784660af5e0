"""Tensors as the NumPy arrays the kernels read and write, without copies where memory allows.

A CPU float32/float64 tensor x of rank r >= 2 is handed to the kernels in place when its memory is dense in one of
two orders:

* C order (``torch.contiguous_format``): the array ``x.numpy()``, shaped (N, C, *spatial), layout "NCHW";
* channels last (``torch.channels_last`` for rank 4, ``torch.channels_last_3d`` for rank 5, and the same order for
  rank 3): ``x.movedim(1, -1)`` is C-contiguous, and its array, shaped (N, *spatial, C), is run with layout "NHWC".

Outputs and gradients are allocated with ``torch.empty_like(x)``, which keeps x's strides, and viewed the same way,
so a result has its input's memory format. Any other strides (slices, expanded or permuted spatial axes) are copied
once to C order, and the result is C-ordered.
"""
import numbers

import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import has_torch_function

from ..functional import _threads  # noqa: F401  (the thread count of a call, re-exported for the modules here)

FLOATS = (torch.float32, torch.float64)


def layout_of(t):
    """"NCHW" when t is C-contiguous, "NHWC" when its channels-last permutation is, else None."""
    if t.is_contiguous():
        return "NCHW"
    if t.dim() >= 3 and t.movedim(1, -1).is_contiguous():
        return "NHWC"
    return None


def dense(x):
    """(x, layout) when x's memory is in one of the two orders, else (a C-ordered copy of x, "NCHW")."""
    layout = layout_of(x)
    if layout is None:
        return x.contiguous(), "NCHW"
    return x, layout


def array(t, layout):
    """Tensor t (the data's shape) as the C-contiguous ndarray of ``layout``: a view of t's memory when it has that
    order, else one copy (a gradient arriving in another memory format)."""
    if t.requires_grad:
        t = t.detach()
    if layout == "NHWC":
        t = t.movedim(1, -1)
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


def vec(t):
    """A per-channel tensor (CPU, float) as an ndarray sharing its memory (written through for running
    statistics), or None."""
    if t is None:
        return None
    return (t.detach() if t.requires_grad else t).numpy()


def supported(x, channel_args, ranks, eps):
    """True when the kernels can run this call; False sends it to PyTorch's own implementation: other devices and
    dtypes, ranks the kernels do not cover, eps <= 0, tensor subclasses with ``__torch_function__``, and calls made
    while tracing or compiling a graph (which must record PyTorch's operator) or inside a forward-mode AD level (the
    Functions here have no forward derivative).

    Raises TypeError for per-channel arguments that PyTorch would refuse too: not tensors, or a CPU tensor whose
    dtype is not x's (PyTorch's CPU kernels refuse mixed dtypes for float32/float64 input).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    tensors = (x,) + tuple(t for _, t in channel_args if t is not None)
    if has_torch_function(tensors):  # subclasses with __torch_function__, fx proxies: PyTorch dispatches them
        return False
    if (not x.is_cpu or x.dtype not in FLOATS or x.layout != torch.strided or x.dim() not in ranks
            or torch.jit.is_tracing() or torch.compiler.is_compiling() or fwAD._current_level >= 0):
        return False
    if isinstance(eps, numbers.Real) and not eps > 0:  # (PyTorch's eval accepts eps = 0; the kernels need eps > 0)
        return False
    for name, t in channel_args:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if not t.is_cpu:
            return False
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of input ({x.dtype}), got {t.dtype}")
    return True


def grad_needed(*tensors):
    """Autograd records this call: grad mode is on and an input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_out(out, x):
    """out (a tensor of x's shape and dtype on the CPU) checked; raises TypeError / ValueError naming it."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"out must have the shape of input {tuple(x.shape)}, got {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"out must have the dtype of input ({x.dtype}), got {out.dtype}")
    if not out.is_cpu or out.layout != torch.strided:
        raise ValueError(f"out must be a strided CPU tensor, got {out.device} / {out.layout}")
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError("out must not require grad: autograd does not differentiate through out=")


def output(x, layout, out):
    """(y, ya, target) for a forward on dense x: y the result tensor, ya its array in ``layout``, target the out
    tensor to copy y into afterwards when out's memory is not in x's order (else None)."""
    if out is None:
        y = torch.empty_like(x)
        return y, array(y, layout), None
    check_out(out, x)
    v = out.movedim(1, -1) if layout == "NHWC" else out
    if v.is_contiguous():
        return out, v.numpy(), None
    y = torch.empty_like(x)
    return y, array(y, layout), out


def finish(y, target, written=()):
    """The result of a forward: y, or the out tensor it is copied into. The tensors written through NumPy (out,
    running statistics) get their version counters bumped, as PyTorch's in-place ops do, so that autograd notices
    if one of them was saved for a backward."""
    if target is not None:
        target.copy_(y)
        y = target
    bumped = [t for t in written if t is not None]
    if bumped:
        torch.autograd.graph.increment_version(bumped)
    return y


def fallback(y, out):
    """PyTorch's result y of an unsupported call, copied into out when given."""
    if out is None:
        return y
    check_out(out, y)
    with torch.no_grad():
        out.copy_(y)
    return out


def no_out_with_grad(out):
    if out is not None:
        raise ValueError("out= cannot be used when input, weight or bias requires grad (autograd does not "
                         "differentiate through out=); call without out, or under torch.no_grad()")


def from_array(a):
    """An ndarray result (per-channel gradients) as a tensor sharing its memory."""
    return torch.from_numpy(a)
