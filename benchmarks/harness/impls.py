"""The implementations that are timed, registered per op family.

``IMPLEMENTATIONS[family][name]`` is an :class:`Impl`: ``make(ws, mode)`` returns a :class:`Runner` (one
call of the mode, nothing else) for a workspace of that family, and ``supports(case, mode)`` says whether
the implementation has a form of that mode for that case at all. Implementation names are shared by the
families ("bn_simd", "numpy", "torch", "torch_out", "onnxruntime"), and so are their column titles
(IMPL_TITLES) and the libraries they need (REQUIRES). "bn_simd" is every family's reference: the other
outputs are compared with its output. A yardstick (YARDSTICKS: "bn_eval", bn_simd's batch-norm eval of the
same tensor in the group-norm and instance-norm rows) is timed beside them but computes something else: its
output is not compared, and rows give bn_simd's time over its time.

PyTorch and ONNX Runtime (with onnx) are optional: they are imported on first use, and without them
``runner()`` returns None and their columns are left out.
"""
import functools
import importlib
import types
from typing import Callable, NamedTuple, Optional

import numpy as np

import bn_simd
from bn_simd import _baseline
from bn_simd import functional as F

from .cases import EPS, MOMENTUM

# threads of bn_simd, PyTorch and ONNX Runtime sessions (set with configure())
STATE = types.SimpleNamespace(threads=2)


# ---- optional libraries -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def optional(name):
    """The module, imported on first use, or None when it is not installed."""
    try:
        return importlib.import_module(name)
    except (ImportError, OSError):  # OSError: an installed library whose shared objects fail to load
        return None


def torch_module():
    return optional("torch")


def onnxruntime_module():
    """onnxruntime when both it and onnx (which builds the models) are installed, else None."""
    return optional("onnxruntime") if optional("onnx") is not None else None


# implementation name -> (the library it needs, as told to the user; its import)
REQUIRES = {"torch": ("torch", torch_module), "torch_out": ("torch", torch_module),
            "onnxruntime": ("onnxruntime (and onnx)", onnxruntime_module)}

IMPL_TITLES = {"bn_simd": "bn_simd", "numpy": "NumPy", "torch": "PyTorch", "torch_out": "PyTorch out=",
               "onnxruntime": "ONNX RT", "bn_eval": "BN eval"}

# implementations timed as a yardstick for bn_simd, not as a rival computing the same output
YARDSTICKS = ("bn_eval",)

# The speed-ups of a row: key -> the implementations whose fastest time is divided by bn_simd's ("torch"
# takes the faster of PyTorch's two forms; "torch_call" is the plain call alone).
SPEEDUPS = {"numpy": ("numpy",), "torch": ("torch", "torch_out"), "torch_call": ("torch",),
            "onnxruntime": ("onnxruntime",)}


def missing(name):
    """The library implementation `name` needs when it is not installed, else None."""
    lib, module = REQUIRES.get(name, (None, None))
    return lib if module is not None and module() is None else None


def configure(threads=2):
    """Use `threads` threads in bn_simd, PyTorch and ONNX Runtime sessions created afterwards."""
    STATE.threads = int(threads)
    bn_simd.set_num_threads(STATE.threads)
    if torch_module() is not None:
        torch_module().set_num_threads(STATE.threads)


def versions():
    """Versions of the libraries in the comparison (None when not installed)."""
    return {"bn_simd": bn_simd.__version__, "numpy": np.__version__,
            "torch": getattr(torch_module(), "__version__", None),
            "onnxruntime": getattr(onnxruntime_module(), "__version__", None)}


# ---- the registry's types -----------------------------------------------------------------------------------

class Runner:
    """call() runs the mode once; fetch(result) turns call()'s result into the output array (y or grad_x)
    in the case's array layout, for checking that implementations agree."""

    def __init__(self, call, fetch):
        self.call = call
        self.fetch = fetch

    def __call__(self):
        return self.call()

    def output(self):
        return np.asarray(self.fetch(self.call()))


class Impl(NamedTuple):
    """make(ws, mode) -> Runner, called only for a supported case and mode whose library is installed;
    supports(case, mode) -> bool (None: every case and mode of the family)."""
    make: Callable
    supports: Optional[Callable] = None


# ---- batch norm ---------------------------------------------------------------------------------------------

def batch_norm_bn_simd(ws, mode):
    x, out, layout = ws.x, ws.out, ws.layout
    w, b = ws.weight, ws.bias
    if mode == "forward":
        rm, rv = ws.running_mean, ws.running_var
        return Runner(lambda: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, layout=layout, out=out),
                      lambda r: r)
    if mode == "eval":
        em, ev = ws.eval_mean, ws.eval_var
        return Runner(lambda: F.batch_norm(x, em, ev, w, b, False, MOMENTUM, EPS, layout=layout, out=out),
                      lambda r: r)
    dy, sm, si = ws.dy, ws.save_mean, ws.save_invstd
    return Runner(lambda: F.batch_norm_backward(dy, x, sm, si, w, layout=layout, out=out),
                  lambda r: r[0])


def batch_norm_numpy(ws, mode):
    x, layout = ws.x, ws.layout
    w, b = ws.weight, ws.bias
    if mode == "forward":
        return Runner(lambda: _baseline.forward_train(x, w, b, EPS, layout), lambda r: r[0])
    if mode == "eval":
        em, ev = ws.eval_mean, ws.eval_var
        return Runner(lambda: _baseline.inference(x, em, ev, w, b, EPS, layout), lambda r: r)
    dy, sm, si = ws.dy, ws.save_mean, ws.save_invstd
    return Runner(lambda: _baseline.backward(dy, x, sm, si, w, layout), lambda r: r[0])


def torch_view(a, layout):
    """A tensor sharing a's memory with logical (N, C, *spatial) sizes: for NHWC arrays that is a
    channels-last tensor (torch.channels_last for 4-D)."""
    t = torch_module().from_numpy(a)
    if layout == "NHWC" and t.dim() > 2:
        t = t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))
    return t


def torch_array(t, layout):
    """Back from (N, C, *spatial) to the case's array layout, as NumPy."""
    t = t.detach()
    if layout == "NHWC" and t.dim() > 2:
        t = t.permute(0, *range(2, t.dim()), 1)
    return t.numpy()


def _torch_bn_params(ws, mode):
    p = torch_module().from_numpy
    if mode == "eval":
        rm, rv = p(ws.eval_mean.copy()), p(ws.eval_var.copy())
    else:
        rm, rv = p(ws.running_mean.copy()), p(ws.running_var.copy())
    return p(ws.weight.copy()), p(ws.bias.copy()), rm, rv


def batch_norm_torch(ws, mode):
    """torch.nn.functional.batch_norm under no_grad (forward-train, eval): the call PyTorch users make,
    which allocates its output. Backward: aten.native_batch_norm_backward with torch's own saved
    statistics, the kernel autograd runs, without the graph."""
    torch = torch_module()
    layout = ws.layout
    x = torch_view(ws.x, layout)
    w, b, rm, rv = _torch_bn_params(ws, mode)
    if mode in ("forward", "eval"):
        training = mode == "forward"
        bn = torch.nn.functional.batch_norm

        def call():
            with torch.no_grad():
                return bn(x, rm, rv, w, b, training, MOMENTUM, EPS)
        return Runner(call, lambda r: torch_array(r, layout))
    dy = torch_view(ws.dy, layout)
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, MOMENTUM, EPS)
    bwd = torch.ops.aten.native_batch_norm_backward
    mask = [True, True, True]
    return Runner(lambda: bwd(dy, x, w, rm, rv, save_mean, save_invstd, True, EPS, mask),
                  lambda r: torch_array(r[0], layout))


def batch_norm_torch_out(ws, mode):
    """PyTorch's forward kernel writing into a preallocated output (aten.native_batch_norm.out), the
    counterpart of bn_simd's out=. No backward: its out= overload computes into new tensors and copies,
    so it is no cheaper than the plain call."""
    torch = torch_module()
    layout = ws.layout
    x = torch_view(ws.x, layout)
    w, b, rm, rv = _torch_bn_params(ws, mode)
    out = torch_view(ws.out, layout)
    save_mean, save_invstd = torch.empty(ws.case.channels), torch.empty(ws.case.channels)
    training = mode == "forward"
    kernel = torch.ops.aten.native_batch_norm.out

    def call():
        kernel(x, w, b, rm, rv, training, MOMENTUM, EPS, out=out, save_mean=save_mean, save_invstd=save_invstd)
        return out
    return Runner(call, lambda r: torch_array(r, layout))


def _batch_norm_onnx_model(ws):
    """A one-node BatchNormalization model with the workspace's parameters and eval statistics."""
    onnx = optional("onnx")
    helper, TensorProto = onnx.helper, onnx.TensorProto
    C = ws.case.channels
    dims = list(ws.case.dims)
    params = [helper.make_tensor(name, TensorProto.FLOAT, [C], arr.tolist())
              for name, arr in (("scale", ws.weight), ("B", ws.bias), ("mean", ws.eval_mean),
                                ("var", ws.eval_var))]
    node = helper.make_node("BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"], epsilon=EPS)
    graph = helper.make_graph([node], "batch_norm",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, dims)],
                              initializer=params)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    return model.SerializeToString()


# ONNX Runtime's intra-op threads spin between runs unless told not to: in a process that times several libraries
# in turn on a 2-core machine, they would take a core from the next implementation's samples.
ORT_CONFIG = {"session.intra_op.allow_spinning": "0"}


def onnxruntime_runner(model, ws, config=None):
    """A Runner of a serialised model on the CPU execution provider, with STATE.threads intra-op threads,
    input X and output Y bound to the workspace's x and out. config: session configuration entries
    {key: value} beside ORT_CONFIG."""
    ort = onnxruntime_module()
    so = ort.SessionOptions()
    so.intra_op_num_threads = STATE.threads
    so.inter_op_num_threads = 1
    for key, value in {**ORT_CONFIG, **(config or {})}.items():
        so.add_session_config_entry(key, value)
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    binding.bind_ortvalue_input("X", ort.OrtValue.ortvalue_from_numpy(ws.x))
    binding.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(ws.out))
    out = ws.out

    def call():
        sess.run_with_iobinding(binding)
        return out
    return Runner(call, lambda r: r)


def batch_norm_onnxruntime(ws, mode):
    """Eval only, channels on axis 1 only (ONNX BatchNormalization has no channels-last form)."""
    return onnxruntime_runner(_batch_norm_onnx_model(ws), ws)


# ---- group norm and instance norm ---------------------------------------------------------------------------
# The bn_simd, NumPy and ONNX Runtime factories serve both families (instance norm is group norm with one
# channel per group: ws.groups is C), calling instance norm through its own API where the library has one;
# PyTorch runs instance norm through batch norm, so it has a factory of its own.

def _instance(ws):
    return ws.case.family == "instance_norm"


def group_norm_bn_simd(ws, mode):
    """Forward: group_norm(x, G, w, b, out=) or instance_norm(x, None, None, w, b, out=). Backward:
    group_norm_backward / instance_norm_backward with the workspace's saved statistics, out=. Forward+backward:
    group_norm_forward / instance_norm_forward into ws.y, then the backward with the statistics it returned."""
    x, dy, out, y, layout, G = ws.x, ws.dy, ws.out, ws.y, ws.layout, ws.groups
    w, b = ws.weight, ws.bias
    if _instance(ws):
        def forward():
            return bn_simd.instance_norm(x, None, None, w, b, True, MOMENTUM, EPS, layout=layout, out=out)

        def forward_stats():
            return bn_simd.instance_norm_forward(x, w, b, eps=EPS, layout=layout, out=y)

        def backward(mean, invstd):
            return bn_simd.instance_norm_backward(dy, x, mean, invstd, w, layout=layout, out=out)
    else:
        def forward():
            return bn_simd.group_norm(x, G, w, b, EPS, layout=layout, out=out)

        def forward_stats():
            return bn_simd.group_norm_forward(x, G, w, b, eps=EPS, layout=layout, out=y)

        def backward(mean, invstd):
            return bn_simd.group_norm_backward(dy, x, mean, invstd, G, w, layout=layout, out=out)
    if mode == "forward":
        return Runner(forward, lambda r: r)
    if mode == "backward":
        sm, si = ws.save_mean, ws.save_invstd
        return Runner(lambda: backward(sm, si), lambda r: r[0])

    def forward_backward():
        _, mean, invstd = forward_stats()
        return backward(mean, invstd)
    return Runner(forward_backward, lambda r: r[0])


def group_norm_numpy(ws, mode):
    """The plain-NumPy baseline (instance norm: its group norm with num_groups = C)."""
    x, layout, G = ws.x, ws.layout, ws.groups
    w, b = ws.weight, ws.bias
    if mode == "forward":
        return Runner(lambda: _baseline.group_norm_forward(x, G, w, b, EPS, layout), lambda r: r[0])
    dy = ws.dy
    if mode == "backward":
        sm, si = ws.save_mean, ws.save_invstd
        return Runner(lambda: _baseline.group_norm_backward(dy, x, sm, si, G, w, layout), lambda r: r[0])

    def forward_backward():
        _, mean, var = _baseline.group_norm_forward(x, G, w, b, EPS, layout)
        return _baseline.group_norm_backward(dy, x, mean, 1.0 / np.sqrt(var + EPS), G, w, layout)
    return Runner(forward_backward, lambda r: r[0])


def group_norm_torch(ws, mode):
    """Forward: torch.nn.functional.group_norm under no_grad. Backward: aten.native_group_norm_backward with
    the mean and rstd of aten.native_group_norm, all three gradients; forward+backward: those two kernels in a
    row (what autograd runs, without the graph)."""
    torch = torch_module()
    layout, G = ws.layout, ws.groups
    x = torch_view(ws.x, layout)
    p = torch_module().from_numpy
    w, b = p(ws.weight.copy()), p(ws.bias.copy())
    N, C = x.shape[0], x.shape[1]
    HxW = x[0, 0].numel()
    if mode == "forward":
        gn = torch.nn.functional.group_norm

        def call():
            with torch.no_grad():
                return gn(x, G, w, b, EPS)
        return Runner(call, lambda r: torch_array(r, layout))
    dy = torch_view(ws.dy, layout)
    fwd, bwd = torch.ops.aten.native_group_norm, torch.ops.aten.native_group_norm_backward
    mask = [True, True, True]
    if mode == "backward":
        _, mean, rstd = fwd(x, w, b, N, C, HxW, G, EPS)
        return Runner(lambda: bwd(dy, x, mean, rstd, w, N, C, HxW, G, mask), lambda r: torch_array(r[0], layout))

    def forward_backward():
        _, mean, rstd = fwd(x, w, b, N, C, HxW, G, EPS)
        return bwd(dy, x, mean, rstd, w, N, C, HxW, G, mask)
    return Runner(forward_backward, lambda r: torch_array(r[0], layout))


def instance_norm_torch(ws, mode):
    """Forward: torch.nn.functional.instance_norm under no_grad. PyTorch has no instance-norm kernel of its
    own: instance_norm runs batch norm on x seen as one sample of N*C channels (a contiguous copy first for
    channels-last x), with weight and bias repeated N times. Backward is what its autograd then runs, without
    the graph: grad_out reshaped the same way, aten.native_batch_norm_backward with the saved statistics of
    aten.native_batch_norm on that view (all three gradients), and the per-channel gradients summed over the
    N repeats. Forward+backward: the reshape, the repeats and native_batch_norm, then that backward."""
    torch = torch_module()
    layout = ws.layout
    x = torch_view(ws.x, layout)
    p = torch_module().from_numpy
    w, b = p(ws.weight.copy()), p(ws.bias.copy())
    if mode == "forward":
        inorm = torch.nn.functional.instance_norm

        def call():
            with torch.no_grad():
                return inorm(x, None, None, w, b, True, MOMENTUM, EPS)
        return Runner(call, lambda r: torch_array(r, layout))
    N, C = x.shape[0], x.shape[1]
    flat = (1, N * C) + tuple(x.shape[2:])
    dy = torch_view(ws.dy, layout)
    fwd, bwd = torch.ops.aten.native_batch_norm, torch.ops.aten.native_batch_norm_backward
    mask = [True, True, True]

    def backward(xf, wf, mean, invstd):
        gx, gw, gb = bwd(dy.reshape(flat), xf, wf, None, None, mean, invstd, True, EPS, mask)
        return gx.view(x.shape), gw.view(N, C).sum(0), gb.view(N, C).sum(0)
    if mode == "backward":
        xf, wf = x.reshape(flat), w.repeat(N)
        _, mean, invstd = fwd(xf, wf, b.repeat(N), None, None, True, MOMENTUM, EPS)
        return Runner(lambda: backward(xf, wf, mean, invstd), lambda r: torch_array(r[0], layout))

    def forward_backward():
        xf, wf = x.reshape(flat), w.repeat(N)
        _, mean, invstd = fwd(xf, wf, b.repeat(N), None, None, True, MOMENTUM, EPS)
        return backward(xf, wf, mean, invstd)
    return Runner(forward_backward, lambda r: torch_array(r[0], layout))


def _group_norm_onnx_model(ws):
    """A one-node model: GroupNormalization-21 (float32 statistics, stash_type=1) or InstanceNormalization-6
    (its newest version, in a model importing opset 21), with the workspace's weight and bias."""
    onnx = optional("onnx")
    helper, TensorProto = onnx.helper, onnx.TensorProto
    C = ws.case.channels
    dims = list(ws.case.dims)
    params = [helper.make_tensor(name, TensorProto.FLOAT, [C], arr.tolist())
              for name, arr in (("scale", ws.weight), ("B", ws.bias))]
    if _instance(ws):
        node = helper.make_node("InstanceNormalization", ["X", "scale", "B"], ["Y"], epsilon=EPS)
    else:
        node = helper.make_node("GroupNormalization", ["X", "scale", "B"], ["Y"], epsilon=EPS,
                                num_groups=ws.groups, stash_type=1)
    graph = helper.make_graph([node], ws.case.family,
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, dims)],
                              initializer=params)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10  # the IR version of opset 21
    return model.SerializeToString()


def group_norm_onnxruntime(ws, mode):
    """Forward only (inference runtime), channels on axis 1 only; the intra-op threads do not spin between
    calls, so they leave the CPUs to the implementations timed after them."""
    return onnxruntime_runner(_group_norm_onnx_model(ws), ws)


def bn_eval_yardstick(ws, mode):
    """bn_simd's batch-norm eval of the workspace's x (per-channel eval statistics, same layout, into out),
    whatever the mode: the yardstick of the group-norm and instance-norm targets."""
    x, out, layout = ws.x, ws.out, ws.layout
    w, b, em, ev = ws.weight, ws.bias, ws.eval_mean, ws.eval_var
    return Runner(lambda: F.batch_norm(x, em, ev, w, b, False, MOMENTUM, EPS, layout=layout, out=out),
                  lambda r: r)


# ---- layer norm and RMS norm (over the last dim) -----------------------------------------------------------

def row_norm_bn_simd(ws, mode):
    """Forward: layer_norm / rms_norm into out. Backward: layer_norm_backward / rms_norm_backward with the
    workspace's saved statistics, out=. Forward+backward: the _forward call into ws.y, then the backward with the
    statistics it returned."""
    x, out, y, dy, D, w, b = ws.x, ws.out, ws.y, ws.dy, ws.D, ws.weight, ws.bias
    if ws.rms:
        def forward():
            return bn_simd.rms_norm(x, D, w, EPS, out=out)

        def backward(*stats):
            return bn_simd.rms_norm_backward(dy, x, stats[-1], D, w, out=out)

        def forward_stats():
            return bn_simd.rms_norm_forward(x, D, w, eps=EPS, out=y)
    else:
        def forward():
            return bn_simd.layer_norm(x, D, w, b, EPS, out=out)

        def backward(mean, rstd):
            return bn_simd.layer_norm_backward(dy, x, mean, rstd, D, w, b, out=out)

        def forward_stats():
            return bn_simd.layer_norm_forward(x, D, w, b, eps=EPS, out=y)
    if mode == "forward":
        return Runner(forward, lambda r: r)
    if mode == "backward":
        stats = (ws.save_rstd,) if ws.rms else (ws.save_mean, ws.save_rstd)
        return Runner(lambda: backward(*stats), lambda r: r[0])
    return Runner(lambda: backward(*forward_stats()[1:]), lambda r: r[0])


def _row_norm_numpy_forward(x, w, b, rms):
    xd = x.astype(np.float64)
    if rms:
        mean = 0.0
        rstd = 1.0 / np.sqrt((xd * xd).mean(axis=-1, keepdims=True) + EPS)
    else:
        mean = xd.mean(axis=-1, keepdims=True)
        rstd = 1.0 / np.sqrt(((xd - mean) ** 2).mean(axis=-1, keepdims=True) + EPS)
    xhat = (xd - mean) * rstd
    return (xhat * w + (0.0 if rms else b)).astype(x.dtype), mean, rstd


def _row_norm_numpy_backward(dy, x, mean, rstd, w, rms):
    xhat = (x.astype(np.float64) - mean) * rstd
    g = dy * w.astype(np.float64)
    D = x.shape[-1]
    c = xhat * (g * xhat).sum(axis=-1, keepdims=True) / D
    if not rms:
        c = c + g.sum(axis=-1, keepdims=True) / D
    lead = tuple(range(x.ndim - 1))
    return (rstd * (g - c)).astype(x.dtype), (dy * xhat).sum(axis=lead), dy.sum(axis=lead)


def row_norm_numpy(ws, mode):
    """Plain NumPy in float64, the statistics two-pass: the forward, the backward from its statistics."""
    x, dy, w, b, rms = ws.x, ws.dy, ws.weight, ws.bias, ws.rms
    if mode == "forward":
        return Runner(lambda: _row_norm_numpy_forward(x, w, b, rms), lambda r: r[0])
    stats = _row_norm_numpy_forward(x, w, b, rms)[1:] if mode == "backward" else None

    def run():
        m, s = stats if stats is not None else _row_norm_numpy_forward(x, w, b, rms)[1:]
        return _row_norm_numpy_backward(dy, x, m, s, w, rms)
    return Runner(run, lambda r: r[0])


def row_norm_torch(ws, mode):
    """Forward: torch.nn.functional.layer_norm / rms_norm under no_grad. Backward (layer norm):
    aten.native_layer_norm_backward with the statistics of aten.native_layer_norm, all three gradients;
    forward+backward: those two kernels in a row. RMS norm, which has no fused backward kernel on the CPU: backward
    is autograd's backward alone (torch.autograd.grad on a graph built once and retained), forward+backward its
    forward with the graph, then that backward."""
    torch = torch_module()
    p = torch.from_numpy
    x, D = p(ws.x), ws.D
    w = p(ws.weight.copy())
    b = None if ws.rms else p(ws.bias.copy())
    if mode == "forward":
        def call():
            with torch.no_grad():
                if ws.rms:
                    return torch.nn.functional.rms_norm(x, (D,), w, EPS)
                return torch.nn.functional.layer_norm(x, (D,), w, b, EPS)
        return Runner(call, lambda r: r.numpy())
    dy = p(ws.dy)
    if ws.rms:
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if mode == "backward":
            graph = torch.nn.functional.rms_norm(xg, (D,), wg, EPS)
            return Runner(lambda: torch.autograd.grad(graph, (xg, wg), dy, retain_graph=True),
                          lambda r: r[0].numpy())

        def fb():
            xg.grad = wg.grad = None
            torch.nn.functional.rms_norm(xg, (D,), wg, EPS).backward(dy)
            return xg.grad, wg.grad
        return Runner(fb, lambda r: r[0].numpy())
    fwd, bwd = torch.ops.aten.native_layer_norm, torch.ops.aten.native_layer_norm_backward
    mask = [True, True, True]
    if mode == "backward":
        _, mean, rstd = fwd(x, (D,), w, b, EPS)
        return Runner(lambda: bwd(dy, x, (D,), mean, rstd, w, b, mask), lambda r: r[0].numpy())

    def forward_backward():
        _, mean, rstd = fwd(x, (D,), w, b, EPS)
        return bwd(dy, x, (D,), mean, rstd, w, b, mask)
    return Runner(forward_backward, lambda r: r[0].numpy())


def _nchw_forward(case, mode):
    return mode == "forward" and case.layout_label != "NHWC"


IMPLEMENTATIONS = {
    "batch_norm": {
        "bn_simd": Impl(batch_norm_bn_simd),
        "numpy": Impl(batch_norm_numpy),
        "torch": Impl(batch_norm_torch),
        "torch_out": Impl(batch_norm_torch_out, lambda case, mode: mode != "backward"),
        "onnxruntime": Impl(batch_norm_onnxruntime,
                            lambda case, mode: mode == "eval" and case.layout_label != "NHWC"),
    },
    "group_norm": {
        "bn_simd": Impl(group_norm_bn_simd),
        "numpy": Impl(group_norm_numpy),
        "torch": Impl(group_norm_torch),
        "onnxruntime": Impl(group_norm_onnxruntime, _nchw_forward),
        "bn_eval": Impl(bn_eval_yardstick),
    },
    "instance_norm": {
        "bn_simd": Impl(group_norm_bn_simd),
        "numpy": Impl(group_norm_numpy),
        "torch": Impl(instance_norm_torch),
        "onnxruntime": Impl(group_norm_onnxruntime, _nchw_forward),
        "bn_eval": Impl(bn_eval_yardstick),
    },
    "layer_norm": {
        "bn_simd": Impl(row_norm_bn_simd),
        "numpy": Impl(row_norm_numpy),
        "torch": Impl(row_norm_torch),
    },
    "rms_norm": {
        "bn_simd": Impl(row_norm_bn_simd),
        "numpy": Impl(row_norm_numpy),
        "torch": Impl(row_norm_torch),
    },
}


# ---- lookup -------------------------------------------------------------------------------------------------

def names(family):
    """The implementation names of a family, bn_simd (the reference) first."""
    return ["bn_simd"] + [n for n in IMPLEMENTATIONS[family] if n != "bn_simd"]


def supports(name, case, mode):
    """Whether implementation `name` has a form of mode for case at all (installed or not)."""
    impl = IMPLEMENTATIONS[case.family].get(name)
    return impl is not None and mode in case.modes and (impl.supports is None or impl.supports(case, mode))


def runner(name, ws, mode):
    """The Runner of implementation `name` for one mode of ws's case, or None when it has no form of that
    mode or its library is not installed."""
    if missing(name) is not None or not supports(name, ws.case, mode):
        return None
    return IMPLEMENTATIONS[ws.case.family][name].make(ws, mode)


# ---- copy probe and agreement -------------------------------------------------------------------------------

def copy_probe(ws):
    """np.copyto of a tensor-sized array: read + write of the same bytes, 2 passes like forward and eval."""
    src, dst = ws.x, ws.out
    return lambda: np.copyto(dst, src)


def split_copy(src, dst, threads, pool):
    """np.copyto(dst, src) in `threads` contiguous pieces copied concurrently by `pool`'s Python threads (np.copyto
    releases the GIL for large arrays); one np.copyto under 1 MiB or with one thread. The copy probe of the scripts
    that time a sweep against the bytes it moves."""
    src, dst = src.reshape(-1), dst.reshape(-1)
    if threads < 2 or src.nbytes < (1 << 20):
        return lambda: np.copyto(dst, src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    pieces = [(dst[lo:hi], src[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return lambda: list(pool.map(lambda p: np.copyto(*p), pieces))


def probe_bytes(case):
    return 2 * case.nbytes


# Outputs further than this from bn_simd's (max |difference|) are reported. Float32 rounding alone gives
# about 1e-6, but NumPy and PyTorch accumulate channels-last statistics in float32: on 32x256x56x56 NHWC
# their forward-train outputs are up to ~1e-4 from a float64 reference (bn_simd's, about 1e-6).
AGREEMENT_TOL = 1e-3


def difference(out, ref):
    return float(np.max(np.abs(out - ref)))


def max_difference(ws, mode, impl_names=None):
    """{implementation: max |output - bn_simd's output|} for one mode, over the installed implementations
    that support it, yardsticks left out (impl_names: a subset, default all of the family's); checks that
    every implementation computes the same thing (up to rounding) on the same data layout."""
    ref = runner("bn_simd", ws, mode).output().copy()
    diffs = {}
    for name in impl_names or names(ws.case.family):
        r = runner(name, ws, mode) if name != "bn_simd" and name not in YARDSTICKS else None
        if r is not None:
            diffs[name] = difference(r.output(), ref)
    return diffs
