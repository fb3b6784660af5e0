"""Tensors as the NumPy arrays the kernels read and write, without copies where memory allows.

A CPU float32, float64, float16 or bfloat16 tensor x of rank r >= 2 is handed to the kernels in place when its memory
is dense in one of two orders:

* C order (``torch.contiguous_format``): the array ``x.numpy()``, shaped (N, C, *spatial), layout "NCHW";
* channels last (``torch.channels_last`` for rank 4, ``torch.channels_last_3d`` for rank 5, and the same order for
  rank 3): ``x.movedim(1, -1)`` is C-contiguous, and its array, shaped (N, *spatial, C), is run with layout "NHWC".

Outputs are allocated with ``torch.empty_like(x)``, which keeps x's strides, and viewed the same way, so a result has
its input's memory format; a backward's gradients are allocated in the forward's layout (``empty_in``: the saved x
may come back from a saved-tensor hook in other strides). Any other strides (slices, expanded or permuted spatial
axes) are copied once to C order, and the result is C-ordered.

NumPy has float16 but no bfloat16: a bfloat16 tensor's memory is viewed as ``bn_simd._args.BF16_BITS`` (uint16
tagged as bfloat16 bits, which the kernels' checks take as bfloat16 data), so ml_dtypes is not needed. Per-channel
tensors have the input's dtype, or float32 for 16-bit input (PyTorch's mixed rule); they are read as float64 and the
running statistics written back rounded once to their dtype.
"""
import functools
import math
import numbers

import numpy as np
import torch
import torch.utils.checkpoint  # noqa: F401  (counted: its recomputation signal)
import torch.autograd.forward_ad as fwAD
from torch.autograd.function import once_differentiable
from torch.fx import Proxy
from torch.fx import _symbolic_trace as _fx_trace
from torch.overrides import has_torch_function

from .._args import BF16_BITS, stats_overlap_message
from ..functional import _threads  # noqa: F401  (the thread count of a call, re-exported for the modules here)

HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, torch.float64) + HALF


# the permutation that moves axis 1 (channels) last, per rank
_CHANNELS_LAST = {3: (0, 2, 1), 4: (0, 2, 3, 1), 5: (0, 2, 3, 4, 1)}


def _numpy(t):
    """t's memory as an ndarray (a view): of t's dtype, or BF16_BITS for bfloat16."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16_BITS)
    return t.numpy()


def _in_layout(a):
    """(layout, view) of ndarray a (N, C, *spatial) when its memory is in C order ("NCHW", a) or in channels-last
    order ("NHWC", its (N, *spatial, C) transpose), else (None, None). (NumPy's C-contiguity, like
    torch.Tensor.is_contiguous, ignores the strides of axes of length 1.)"""
    if a.flags.c_contiguous:
        return "NCHW", a
    perm = _CHANNELS_LAST.get(a.ndim)
    if perm is not None:
        v = a.transpose(perm)
        if v.flags.c_contiguous:
            return "NHWC", v
    return None, None


def layout_of(t):
    """"NCHW" when t is C-contiguous, "NHWC" when its channels-last permutation is, else None."""
    return _in_layout(_numpy(t))[0]


def dense(x):
    """(x, layout, its array in that layout) when x's memory is in one of the two orders, else the same for a
    C-ordered copy of x."""
    # (torch's contiguity tests first: cheaper than NumPy's flags, and like them blind to axes of length 1)
    if x.is_contiguous():
        return x, "NCHW", _numpy(x)
    nd = x.dim()
    if ((nd == 4 and x.is_contiguous(memory_format=torch.channels_last))
            or (nd == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))):
        return x, "NHWC", _numpy(x).transpose(_CHANNELS_LAST[nd])
    if nd == 3:
        a = _numpy(x).transpose(_CHANNELS_LAST[3])
        if a.flags.c_contiguous:
            return x, "NHWC", a
    x = x.contiguous()
    return x, "NCHW", _numpy(x)


def array(t, layout):
    """Tensor t (the data's shape) as the C-contiguous ndarray of ``layout``: a view of t's memory when it has that
    order, else one copy (a gradient arriving in another memory format)."""
    a = _numpy(t.resolve_neg() if t.is_neg() else t)
    if layout == "NHWC":
        a = a.transpose(_CHANNELS_LAST[a.ndim])
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a


def empty_in(x, layout):
    """An uninitialised tensor of x's shape, dtype and device whose memory is in ``layout``'s order (C order, or
    channels last) whatever x's strides: a backward's gradient of a saved x, which a saved-tensor hook
    (``torch.autograd.graph.save_on_cpu``, offloading) may hand back in strides other than the forward's."""
    if layout == "NHWC":
        perm = _CHANNELS_LAST[x.dim()]
        inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
        return torch.empty([x.shape[p] for p in perm], dtype=x.dtype, device=x.device).permute(inverse)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def out_array(t, layout):
    """The ndarray of ``layout`` that a kernel writes into t's memory: t must have that order (``empty_in``), so
    the array is a view; any other strides raise instead of writing a copy that t would not see."""
    a = array(t, layout)
    if a.size and not np.may_share_memory(a, _numpy(t)):
        raise RuntimeError(f"bn_simd.torch: an output tensor not in the {layout} order its kernel writes")
    return a


def vec(t):
    """A per-channel tensor (CPU, float) as an ndarray sharing its memory (written through for running
    statistics), or None."""
    if t is None:
        return None
    return _numpy(t)


_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_depth = torch._C._len_torch_dispatch_stack
_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)


def input_supported(x, ranks, eps):
    """True when the kernels can run a call on input x (any per-channel tensors aside): float32, float64, float16 or
    bfloat16 on the CPU. False sends it to PyTorch's own implementation: other devices and dtypes, ranks the kernels do
    not cover, an eps the kernels do not take (eps_supported), tensor subclasses with ``__torch_function__``, and calls
    made while tracing or compiling a graph (which must record PyTorch's operator; make_fx's dispatch mode too), inside
    a forward-mode AD level (the Functions here have no forward derivative) or a torch.func transform (grad, vjp, vmap).
    Raises TypeError when x is not a tensor."""
    if type(x) is not torch.Tensor:
        # subclasses with __torch_function__ and torch.fx's proxies (no tensors: a trace records PyTorch's function)
        if has_torch_function((x,)):
            return False
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if (not x.is_cpu or x.dtype not in FLOATS or x.layout != torch.strided or x.dim() not in ranks
            or torch.jit.is_tracing() or torch.compiler.is_compiling() or fwAD._current_level >= 0
            or _functorch_active()  # (torch.func's wrapped tensors have no memory of their own to read)
            or _dispatch_depth()):  # (a TorchDispatchMode, as make_fx's, records operators, not memory reads)
        return False
    if x.is_neg():  # a negative-bit view (the imaginary part of a conjugate): its memory holds -x
        return False
    return eps_supported(eps)


def fx_call(module, first, args, kwargs):
    """A forward's call under a torch.fx symbolic trace (first: its first argument; the forwards call this only when it
    is no plain tensor or a trace is on: a flag's read). On a proxy: the call recorded as one node, a leaf of the
    trace as torch.nn's modules are (their forwards' checks branch on the input's rank, which a proxy cannot answer):
    call_module, or, for a module with forward hooks (which Module.__call__ ran on the proxies already, and a
    call_module node would run again), a call of its forward method; None when module is the trace's root, whose
    forward is traced (the functions record PyTorch's then). A real CPU tensor while a trace runs with no dispatch
    mode (symbolic_trace's norm of a constant, make_fx's pre-dispatch tracing) would run the kernels once and freeze
    the result into the graph: RuntimeError. Else None: the call runs."""
    if type(first) is not torch.Tensor and isinstance(first, Proxy):
        tracer = first.tracer
        if getattr(tracer, "root", None) is module:
            return None
        path = tracer.path_of_module(module)
        if not (module._forward_hooks or module._forward_pre_hooks or global_hooks(_FORWARD_HOOKS)):
            return tracer.create_proxy("call_module", path, args, kwargs)
        this = tracer.create_proxy("get_attr", path, (), {})
        return tracer.create_proxy("call_method", "forward", (this, *args), kwargs)
    if (isinstance(first, torch.Tensor) and first.device.type == "cpu" and _fx_trace._is_fx_tracing_flag
            and not _dispatch_depth()):  # (make_fx's default mode, and meta tensors of metadata tracers: PyTorch's)
        raise RuntimeError(f"bn_simd.torch: {type(module).__name__} called on a tensor that is not traced while a "
                           f"torch.fx trace runs (torch.fx.symbolic_trace on a constant, make_fx(pre_dispatch=True)): "
                           f"the graph would hold its result as a constant. For symbolic_trace, use a Tracer whose "
                           f"is_leaf_module keeps bn_simd's modules (type(m).__module__ starting with 'bn_simd.'); "
                           f"else trace the model unconverted")
    return None


_FORWARD_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")
_ALL_HOOKS = _FORWARD_HOOKS + ("_global_backward_hooks", "_global_backward_pre_hooks")


def global_hooks(kinds=_ALL_HOOKS):
    """Whether hooks of kinds (the names of torch.nn.modules.module's registries) are registered for every module
    (torch.nn.modules.module.register_module_forward_hook and the like)."""
    from torch.nn.modules import module as M
    return any(getattr(M, name, None) for name in kinds)


def fx_leaf(forward):
    """Decorates a module's forward with fx_call's test. (The forwards on a latency path test inline instead: a wrapper
    costs a call.)"""
    @functools.wraps(forward)
    def wrapped(self, *args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()), None)
        if type(first) is not torch.Tensor or _fx_trace._is_fx_tracing_flag:
            y = fx_call(self, first, args, kwargs)
            if y is not None:
                return y
        return forward(self, *args, **kwargs)
    return wrapped


def eps_supported(eps):
    """eps as the kernels take it: a real number, 0 < eps < inf. PyTorch's functions also take 0 (in eval), NaN, inf, a
    bool or a one-element tensor: such calls go to them, so that a converted model runs wherever PyTorch's does (a
    value that is no number at all still reaches the kernels' checks, which name it)."""
    if type(eps) is float:
        return 0.0 < eps < math.inf
    if isinstance(eps, (torch.Tensor, bool, np.bool_)):
        return False
    return bool(not isinstance(eps, numbers.Real) or 0 < eps < math.inf)


def momentum_supported(momentum):
    """momentum as the kernels take it, where a call updates running statistics: a real number in [0, 1]. PyTorch's
    functions also take one outside it (an extrapolating update), NaN, a bool or a tensor: such calls go to them."""
    if type(momentum) is float:
        return 0.0 <= momentum <= 1.0
    if isinstance(momentum, (torch.Tensor, bool, np.bool_)):
        return False
    return bool(not isinstance(momentum, numbers.Real) or 0 <= momentum <= 1)


def param_dtype_ok(x, t):
    """A per-channel tensor's dtype suits input x: x's own, or float32 for float16/bfloat16 x (PyTorch's mixed
    rule: half data with float32 parameters)."""
    return t.dtype is x.dtype or (t.dtype is torch.float32 and x.dtype in HALF)


def channels_supported(x, channel_args):
    """True when every per-channel tensor of channel_args ((name, tensor or None) pairs) is a CPU tensor the
    kernels can read beside x; False sends the call to PyTorch (so do running statistics that require grad while
    grad mode is on: PyTorch raises). Raises TypeError for arguments that PyTorch would
    refuse too: not tensors, of a dtype other than x's (for float16/bfloat16 x: other than x's or float32), or of
    both x's dtype and float32 in one call (PyTorch's CPU kernels refuse mixed parameter dtypes)."""
    first = None
    for name, t in channel_args:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if type(t) not in _PLAIN and has_torch_function((t,)):
            return False
        if not t.is_cpu or t.layout != torch.strided or t.is_neg():
            return False
        if name.startswith("running_") and t.requires_grad and torch.is_grad_enabled():
            return False  # PyTorch refuses statistics that require grad (it cannot differentiate their update)
        if not param_dtype_ok(x, t):
            also = " or float32" if x.dtype in HALF else ""
            raise TypeError(f"{name} must have the dtype of input ({x.dtype}){also}, got {t.dtype}")
        if first is None:
            first = (name, t.dtype)
        elif t.dtype is not first[1]:
            raise TypeError(f"{name} must have the dtype of {first[0]} ({first[1]}): the per-channel tensors of a "
                            f"call share one dtype, got {t.dtype}")
    return True


def supported(x, channel_args, ranks, eps):
    """input_supported and channels_supported."""
    return input_supported(x, ranks, eps) and channels_supported(x, channel_args)


_PLAIN = (torch.Tensor, torch.nn.Parameter)

# A module's entry in its __dict__: (dtype, its per-channel tensors, their data pointers, strides and shapes, their
# ndarrays), the views of its parameters and buffers made once (Tensor.numpy() costs about 1 us per tensor and call,
# far more inside a network, where every Python step runs from cold caches). Left out of pickles and copies
# (modules.py).
VIEWS_KEY = "_bn_simd_views"


def module_views(module, x, tensors, shape=None):
    """The ndarrays of a module's per-channel tensors (None entries kept), checked against x once and cached while
    they are the same tensor objects over the same memory in the same layout and dtype (a dtype or device change,
    ``.data`` re-pointed, even at the same address with other strides or as another dtype, or ``load_state_dict`` into
    new storage makes new views), or None when they must go through the checks of a functional call (also when
    shape, a tuple, is given and a tensor has another shape)."""
    if (type(x) is not torch.Tensor or x.dtype not in FLOATS or torch.jit.is_tracing()
            or torch.compiler.is_compiling() or _functorch_active()):
        return None  # (the call goes through the checks, which hand graph captures to PyTorch's function)
    d = module.__dict__
    c = d.get(VIEWS_KEY)
    if c is not None and c[0] is x.dtype:
        for t, u, p in zip(tensors, c[1], c[2]):
            if t is not u or (t is not None and (t.data_ptr(), t.stride(), t.shape, t.dtype) != p):
                break
        else:
            return c[3]
    dtypes = set()
    for t in tensors:
        if t is not None:
            if (type(t) not in _PLAIN or not t.is_cpu or t.layout != torch.strided or not param_dtype_ok(x, t)
                    or t.is_neg() or (shape is not None and tuple(t.shape) != shape)):
                return None
            dtypes.add(t.dtype)
    if len(dtypes) > 1:
        return None  # (the general checks refuse mixed parameter dtypes)
    views = tuple(vec(t) for t in tensors)
    d[VIEWS_KEY] = (x.dtype, tuple(tensors),
                    tuple(None if t is None else (t.data_ptr(), t.stride(), t.shape, t.dtype) for t in tensors), views)
    return views


def affine(module, names=("weight", "bias")):
    """The module's tensors of names (weight and bias; RMSNorm's weight alone) as its forward sees them: the
    registered parameters (None where the module has none), or the tensors a parametrization or pruning computes in
    their place (``torch.nn.utils.parametrize``, ``torch.nn.utils.prune``: the name is then not a registered
    parameter, and attribute access computes it)."""
    p = module._parameters
    if all(n in p for n in names):
        return tuple(p[n] for n in names)
    return tuple(p[n] if n in p else getattr(module, n, None) for n in names)


def first_order(backward):
    """A Function's backward decorated as ``once_differentiable``, and refusing to run under grad mode, which the
    engine turns on for ``create_graph=True``: once_differentiable raises only when the incoming gradient requires
    grad; otherwise its result would come back without a graph, and a second derivative through x (a gradient
    penalty, conv -> norm) would be silently wrong."""
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError("bn_simd.torch: second derivatives (create_graph=True through a normalization) are not "
                               "supported; use torch.nn's modules for this model")
        # (vmap over the backward, autograd's own for batched gradients or torch.func's: the gradients have no memory
        # of their own to read)
        if _functorch_active() or any(isinstance(g, torch.Tensor) and _legacy_batched(g) for g in grads):
            raise RuntimeError("bn_simd.torch: batched gradients (is_grads_batched=True, jacobian(..., "
                               "vectorize=True), gradcheck's check_batched_grad) are not supported through a "
                               "normalization; compute them one at a time (vectorize=False)")
        return inner(ctx, *grads)
    return wrapped


def _span(t):
    """The bytes [lo, hi) t's elements lie in, or None for no element."""
    lo = hi = t.data_ptr()
    for n, s in zip(t.shape, t.stride()):
        if n == 0:
            return None
        ext = (n - 1) * s * t.element_size()
        lo, hi = (lo + ext, hi) if ext < 0 else (lo, hi + ext)
    return lo, hi + t.element_size()


def out_apart(out, running_mean, running_var):
    """A training call writes y before the running statistics move (the kernels), or copies y into out after
    PyTorch's own call (or the kernels' temporary, out in another memory order) moved them: out may share no memory
    with them (bounds, as _args.stats_apart). Tensors of one device only; out None or not a tensor: nothing to do
    (the call's own checks say what out must be)."""
    if not isinstance(out, torch.Tensor):
        return
    o = _span(out)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if o is not None and isinstance(t, torch.Tensor) and t.device == out.device:
            s = _span(t)
            if s is not None and s[0] < o[1] and o[0] < s[1]:
                raise ValueError(stats_overlap_message(name))


def not_scriptable(module):
    """``__prepare_scriptable__`` of the converted modules, which torch.jit.script calls on each module before it
    compiles it: scripting cannot compile the kernels' Python calls, and a ``torch.nn`` twin returned here would be
    written into the caller's model in place of the converted module (torch.jit.script stores what this returns in
    the parent's modules). A clear TypeError instead, before anything is compiled or changed."""
    raise TypeError(f"{type(module).__name__} of bn_simd.torch cannot be compiled by torch.jit.script: script the "
                    f"model before bn_simd.torch.convert, or use torch.jit.trace, torch.export or torch.compile, which "
                    f"take PyTorch's own path inside a converted model")


# (torch.utils.checkpoint's signal that a recomputed forward has recorded what the backward needs; () if absent)
_STOP_RECOMPUTATION = getattr(torch.utils.checkpoint, "_StopRecomputationError", ())


def counted(counter, call, stats=()):
    """call() with a batch counted in counter (num_batches_tracked) first, as PyTorch's BatchNorm counts it before its
    work: non-reentrant checkpointing stops a recomputed forward once its saved tensors are recorded, after the
    running statistics moved, and PyTorch's count moved too. A call that raises an Exception otherwise (a refused
    argument) leaves the count as it was, unless a tensor of stats (the running statistics it updates) moved: a
    KeyboardInterrupt, or a signal handler's exception (a timeout's), which Python raises as the kernel returns,
    leaves the count moved with them, as PyTorch's."""
    state = None if _capturing() else _state(counter, stats)
    if state is None:  # (no values to look at: a failure is a refusal)
        counter.add_(1)
    try:
        if state is not None:
            counter.add_(1)
        return call()
    except _STOP_RECOMPUTATION:
        raise
    except Exception:
        if state is None:
            counter.sub_(1)
        elif all(_bits(t) == b for t, b in state[1]):
            counter.fill_(state[0])
        raise


def _state(counter, stats):
    """(the count, (tensor, its bytes) of each running statistic), or None for tensors without values (meta, fake)."""
    try:
        return counter.item(), [(t, _bits(t)) for t in stats if t is not None]  # (item: a float count kept)
    except Exception:  # noqa: BLE001  (meta and fake tensors raise several kinds)
        return None


def savable(t):
    """t for ctx.save_for_backward: itself, or a copy of an inference-mode tensor, which autograd cannot save (PyTorch's
    composition saves no input it takes the copy for: the residual of norm(x) + r, RMS norm's x)."""
    return t.clone() if t is not None and t.is_inference() else t


def kept_on_stop(stats, call):
    """call(), an autograd Function's apply whose forward updates the running statistics stats in place. Non-reentrant
    checkpointing stops a recomputed forward once its saved tensors are recorded, after the forward returned: the
    statistics then go back to their values before it, as PyTorch's instance norm, which copies them back after
    that point, leaves them (they were updated twice a checkpointed step)."""
    kept = [(t, t.detach().clone()) for t in stats if t is not None] if _STOP_RECOMPUTATION else []
    try:
        return call()
    except _STOP_RECOMPUTATION:
        with torch.no_grad():
            for t, c in kept:
                t.copy_(c)
        raise


def _capturing():
    """Whether torch.compile, torch.export or torch.jit.trace is capturing the running code."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or (exporting is not None and exporting()) or torch.jit.is_tracing()


def _bits(t):
    """A CPU tensor's bytes (the running statistics' values, bit for bit: NaNs and signed zeros included)."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def stats_views(module, x, tensors):
    """module_views for (running_mean, running_var, weight, bias), or None (the checks of a functional call, which
    hand the call to PyTorch, which raises) when a running statistic requires grad in grad mode."""
    rm, rv = tensors[0], tensors[1]
    if ((rm is not None and rm.requires_grad) or (rv is not None and rv.requires_grad)) and torch.is_grad_enabled():
        return None
    return module_views(module, x, tensors)


def grad_needed(*tensors):
    """Autograd records this call: grad mode is on and an input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_tensor(t, name, expected="a torch.Tensor"):
    """t is a tensor; raises TypeError naming it (``expected``: what the message says t must be)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be {expected}, got {type(t).__name__}")


def check_like(t, x, name, expected="a torch.Tensor"):
    """t is a tensor of x's shape and dtype; raises TypeError / ValueError naming it (``expected``: what the message
    says t must be)."""
    check_tensor(t, name, expected)
    if t.shape != x.shape:
        raise ValueError(f"{name} must have the shape of input {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of input ({x.dtype}), got {t.dtype}")


def check_out(out, x):
    """out (a tensor of x's shape and dtype on the CPU) checked; raises TypeError / ValueError naming it."""
    check_like(out, x, "out")
    if not out.is_cpu or out.layout != torch.strided:
        raise ValueError(f"out must be a strided CPU tensor, got {out.device} / {out.layout}")
    if out.is_neg():
        raise ValueError("out must not be a negative-bit view (such as the imaginary part of a conjugate)")
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError("out must not require grad: autograd does not differentiate through out=")


def output(x, layout, out):
    """(y, ya, target) for a forward on dense x: y the result tensor, ya its array in ``layout``, target the out
    tensor to copy y into afterwards when out's memory is not in x's order (else None)."""
    if out is None:
        y = torch.empty_like(x)  # (x dense: y gets its strides, so y's array in x's layout is C-contiguous)
        a = _numpy(y)
        return y, (a if layout == "NCHW" else a.transpose(_CHANNELS_LAST[a.ndim])), None
    check_out(out, x)
    a = _numpy(out)
    if layout == "NHWC":
        a = a.transpose(_CHANNELS_LAST[a.ndim])
    if a.flags.c_contiguous:
        return out, a, None
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
    """An ndarray result (per-channel gradients) as a tensor sharing its memory (bfloat16 for BF16_BITS)."""
    if a.dtype is BF16_BITS:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def grad_as(a, dtype):
    """A per-channel gradient (ndarray) as a tensor of the dtype of the parameter it belongs to."""
    return from_array(np.asarray(a)).to(dtype)
