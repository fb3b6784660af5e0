"""Benchmark cases and the implementations they are run with.

Shared by ``test_bench.py`` (pytest-benchmark) and ``run.py`` (the markdown table). Everything here is
float32. A :class:`Case` is a shape, a layout and the ops it is timed for; a :class:`Workspace` holds its
arrays (inputs, parameters, saved statistics, a preallocated output). An implementation is a function
``make(ws, op)`` returning a :class:`Runner` (one call of the op, nothing else) or None when the
implementation is not installed or does not support the case.

Minimum bytes of an op (the traffic no implementation can avoid): forward-train and eval read x and write
y, 2 tensor passes; backward reads x and grad_out and writes grad_x, 3 passes.
"""
import numpy as np

import bn_simd
from bn_simd import _baseline

try:
    import torch
except ImportError:
    torch = None

try:
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper
except ImportError:
    onnx = onnxruntime = None

OPS = ("forward", "backward", "eval")
OP_TITLES = {"forward": "forward-train", "backward": "backward", "eval": "eval"}
MIN_PASSES = {"forward": 2, "backward": 3, "eval": 2}
EPS = 1e-5
MOMENTUM = 0.1
DTYPE = np.float32

# threads of bn_simd, PyTorch and ONNX Runtime; set with configure()
THREADS = 2
# whether steady_allocator() has been applied in this process
STEADY_MALLOC = False


def configure(threads=2):
    """Use `threads` threads in bn_simd, PyTorch and ONNX Runtime sessions created afterwards."""
    global THREADS
    THREADS = int(threads)
    bn_simd.set_num_threads(THREADS)
    if torch is not None:
        torch.set_num_threads(THREADS)


def steady_allocator():
    """Make glibc's malloc keep freed memory instead of returning it to the system (Linux only).

    By default glibc hands back freed memory above a threshold that it adapts as the program runs, so
    whether a 1-32 MB temporary of the NumPy baseline (or a PyTorch output) reuses warm pages or faults
    in fresh ones depends on what was allocated before: the same NumPy call can take several times longer
    in one process than in another. Fixed thresholds make those sizes reuse memory every time. Arrays over
    32 MB (glibc's largest mmap threshold) are still mapped fresh at each allocation, as before.
    Returns True when applied.
    """
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30)
    except (OSError, AttributeError):
        return False
    global STEADY_MALLOC
    STEADY_MALLOC = STEADY_MALLOC or bool(ok)
    return bool(ok)


# ---- cases ------------------------------------------------------------------------------------------------

class Case:
    """dims: the logical (N, C, *spatial) sizes; layout "NCHW" (arrays (N, C, H, W)) or "NHWC" (arrays
    (N, H, W, C)); 2-D cases are (N, C) in either layout and are labelled "NC"."""

    def __init__(self, dims, layout="NCHW", ops=OPS):
        self.dims = tuple(int(d) for d in dims)
        self.layout = layout
        self.ops = tuple(ops)
        self.channels = self.dims[1]
        if layout == "NHWC" and len(self.dims) > 2:
            self.shape = (self.dims[0],) + self.dims[2:] + (self.dims[1],)
        else:
            self.shape = self.dims

    @property
    def layout_label(self):
        return "NC" if len(self.dims) == 2 else self.layout

    @property
    def label(self):
        """N×C×H×W (logical order, whatever the layout)."""
        return "×".join(map(str, self.dims))

    @property
    def id(self):
        return "x".join(map(str, self.dims)) + "-" + self.layout_label

    @property
    def nbytes(self):
        return int(np.prod(self.shape)) * np.dtype(DTYPE).itemsize

    def min_bytes(self, op):
        return MIN_PASSES[op] * self.nbytes

    def __repr__(self):
        return f"Case({self.label} {self.layout_label}, ops={self.ops})"


def _both_layouts(*dims):
    return [Case(dims, "NCHW"), Case(dims, "NHWC")]


CASES = (
    _both_layouts(32, 64, 56, 56)
    + _both_layouts(32, 256, 56, 56)
    + _both_layouts(32, 512, 28, 28)
    + _both_layouts(32, 2048, 7, 7)
    + [Case((256, 1024))]
    + [Case((1, 64, 56, 56), ops=("eval",)),
       Case((1, 256, 14, 14), ops=("eval",)),
       Case((1, 8, 1, 1), ops=("eval",))]
)

QUICK_IDS = ("32x64x56x56-NCHW", "32x64x56x56-NHWC", "32x2048x7x7-NCHW", "256x1024-NC", "1x64x56x56-NCHW",
             "1x8x1x1-NCHW")
QUICK_CASES = [c for c in CASES if c.id in QUICK_IDS]


def rounds_for(case):
    """(rounds, iterations per round) for pytest-benchmark: few rounds for the ~100 MB tensors."""
    if case.nbytes >= 40e6:
        return 5, 1
    if case.nbytes >= 4e6:
        return 10, 1
    if case.nbytes >= 100e3:
        return 50, 1
    return 100, 20


# ---- data -------------------------------------------------------------------------------------------------

class Workspace:
    """The arrays of one case. x and grad_out are standard normal; the per-channel parameters are not
    trivial (so no implementation can skip work). Training forwards update running_mean / running_var;
    eval uses its own constant statistics (eval_mean, eval_var)."""

    def __init__(self, case, seed=0):
        rng = np.random.default_rng(seed)
        C = case.channels
        self.case = case
        self.layout = case.layout
        self.x = rng.standard_normal(case.shape, dtype=DTYPE)
        self.dy = rng.standard_normal(case.shape, dtype=DTYPE) if "backward" in case.ops else None
        self.out = np.empty_like(self.x)
        self.weight = rng.uniform(0.5, 1.5, C).astype(DTYPE)
        self.bias = rng.uniform(-0.5, 0.5, C).astype(DTYPE)
        self.running_mean = np.zeros(C, DTYPE)
        self.running_var = np.ones(C, DTYPE)
        self.eval_mean = rng.uniform(-0.2, 0.2, C).astype(DTYPE)
        self.eval_var = rng.uniform(0.5, 2.0, C).astype(DTYPE)
        if "backward" in case.ops:
            _, self.save_mean, self.save_invstd = bn_simd.batch_norm_forward(
                self.x, self.weight, self.bias, eps=EPS, layout=self.layout)
        else:
            self.save_mean = self.save_invstd = None


class Runner:
    """call() runs the op once; fetch(result) turns call()'s result into the output array (y or grad_x)
    in the case's array layout, for checking that implementations agree."""

    def __init__(self, call, fetch):
        self.call = call
        self.fetch = fetch

    def __call__(self):
        return self.call()

    def output(self):
        return np.asarray(self.fetch(self.call()))


# ---- implementations --------------------------------------------------------------------------------------

def make_bn_simd(ws, op):
    x, out, layout = ws.x, ws.out, ws.layout
    w, b = ws.weight, ws.bias
    if op == "forward":
        rm, rv = ws.running_mean, ws.running_var
        return Runner(lambda: bn_simd.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, layout=layout, out=out),
                      lambda r: r)
    if op == "eval":
        em, ev = ws.eval_mean, ws.eval_var
        return Runner(lambda: bn_simd.batch_norm(x, em, ev, w, b, False, MOMENTUM, EPS, layout=layout, out=out),
                      lambda r: r)
    dy, sm, si = ws.dy, ws.save_mean, ws.save_invstd
    return Runner(lambda: bn_simd.batch_norm_backward(dy, x, sm, si, w, layout=layout, out=out),
                  lambda r: r[0])


def make_numpy(ws, op):
    x, layout = ws.x, ws.layout
    w, b = ws.weight, ws.bias
    if op == "forward":
        return Runner(lambda: _baseline.forward_train(x, w, b, EPS, layout), lambda r: r[0])
    if op == "eval":
        em, ev = ws.eval_mean, ws.eval_var
        return Runner(lambda: _baseline.inference(x, em, ev, w, b, EPS, layout), lambda r: r)
    dy, sm, si = ws.dy, ws.save_mean, ws.save_invstd
    return Runner(lambda: _baseline.backward(dy, x, sm, si, w, layout), lambda r: r[0])


def _torch_view(a, layout):
    """A tensor sharing a's memory with logical (N, C, *spatial) sizes: for NHWC arrays that is a
    channels-last tensor (torch.channels_last for 4-D)."""
    t = torch.from_numpy(a)
    if layout == "NHWC" and t.dim() > 2:
        t = t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))
    return t


def _torch_array(t, layout):
    """Back from (N, C, *spatial) to the case's array layout, as NumPy."""
    t = t.detach()
    if layout == "NHWC" and t.dim() > 2:
        t = t.permute(0, *range(2, t.dim()), 1)
    return t.numpy()


def _torch_params(ws, op):
    p = torch.from_numpy
    if op == "eval":
        rm, rv = p(ws.eval_mean.copy()), p(ws.eval_var.copy())
    else:
        rm, rv = p(ws.running_mean.copy()), p(ws.running_var.copy())
    return p(ws.weight.copy()), p(ws.bias.copy()), rm, rv


def make_torch(ws, op):
    """torch.nn.functional.batch_norm under no_grad (forward-train, eval): the call PyTorch users make,
    which allocates its output. Backward: aten.native_batch_norm_backward with torch's own saved
    statistics, the kernel autograd runs, without the graph."""
    if torch is None:
        return None
    layout = ws.layout
    x = _torch_view(ws.x, layout)
    w, b, rm, rv = _torch_params(ws, op)
    fetch = lambda r: _torch_array(r, layout)  # noqa: E731
    if op in ("forward", "eval"):
        training = op == "forward"
        bn = torch.nn.functional.batch_norm

        def call():
            with torch.no_grad():
                return bn(x, rm, rv, w, b, training, MOMENTUM, EPS)
        return Runner(call, fetch)
    dy = _torch_view(ws.dy, layout)
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, MOMENTUM, EPS)
    bwd = torch.ops.aten.native_batch_norm_backward
    mask = [True, True, True]
    return Runner(lambda: bwd(dy, x, w, rm, rv, save_mean, save_invstd, True, EPS, mask),
                  lambda r: _torch_array(r[0], layout))


def make_torch_out(ws, op):
    """PyTorch's forward kernel writing into a preallocated output (aten.native_batch_norm.out), the
    counterpart of bn_simd's out=. None for backward: its out= overload computes into new tensors and
    copies, so it is no cheaper than the plain call."""
    if torch is None or op == "backward":
        return None
    layout = ws.layout
    x = _torch_view(ws.x, layout)
    w, b, rm, rv = _torch_params(ws, op)
    out = _torch_view(ws.out, layout)
    save_mean, save_invstd = torch.empty(ws.case.channels), torch.empty(ws.case.channels)
    training = op == "forward"
    kernel = torch.ops.aten.native_batch_norm.out

    def call():
        kernel(x, w, b, rm, rv, training, MOMENTUM, EPS, out=out, save_mean=save_mean, save_invstd=save_invstd)
        return out
    return Runner(call, lambda r: _torch_array(r, layout))


def _onnx_model(case, ws):
    C = case.channels
    dims = list(case.dims)
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


def make_onnxruntime(ws, op):
    """Eval only, channels on axis 1 only (ONNX BatchNormalization has no channels-last form): a
    one-node model on the CPU execution provider, input and output bound to the workspace's arrays."""
    case = ws.case
    if onnxruntime is None or op != "eval" or case.layout_label == "NHWC":
        return None
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    sess = onnxruntime.InferenceSession(_onnx_model(case, ws), so, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    binding.bind_ortvalue_input("X", onnxruntime.OrtValue.ortvalue_from_numpy(ws.x))
    binding.bind_ortvalue_output("Y", onnxruntime.OrtValue.ortvalue_from_numpy(ws.out))
    out = ws.out

    def call():
        sess.run_with_iobinding(binding)
        return out
    return Runner(call, lambda r: r)


IMPLEMENTATIONS = {
    "bn_simd": make_bn_simd,
    "numpy": make_numpy,
    "torch": make_torch,
    "torch_out": make_torch_out,
    "onnxruntime": make_onnxruntime,
}
# the library each implementation needs, for skip messages
REQUIRES = {"torch": "torch", "torch_out": "torch", "onnxruntime": "onnxruntime"}


def supports(impl, case, op):
    """Whether impl has a form of op for case at all (installed or not)."""
    if impl == "torch_out":
        return op != "backward"
    if impl == "onnxruntime":
        return op == "eval" and case.layout_label != "NHWC"
    return True


def missing(impl):
    """The name of the library impl needs when it is not installed, else None."""
    lib = REQUIRES.get(impl)
    if lib == "torch" and torch is None:
        return "torch"
    if lib == "onnxruntime" and onnxruntime is None:
        return "onnxruntime (and onnx)"
    return None


IMPL_TITLES = {"bn_simd": "bn_simd", "numpy": "NumPy", "torch": "PyTorch", "torch_out": "PyTorch out=",
               "onnxruntime": "ONNX RT"}


def versions():
    """Versions of the libraries in the comparison (None when not installed)."""
    return {"bn_simd": bn_simd.__version__, "numpy": np.__version__,
            "torch": getattr(torch, "__version__", None), "onnxruntime": getattr(onnxruntime, "__version__", None)}


# ---- copy probe -------------------------------------------------------------------------------------------

def copy_probe(ws):
    """np.copyto of a tensor-sized array: read + write of the same bytes, 2 passes like forward and eval."""
    src, dst = ws.x, ws.out
    return lambda: np.copyto(dst, src)


def probe_bytes(case):
    return 2 * case.nbytes


# ---- agreement --------------------------------------------------------------------------------------------

def max_difference(ws, op, impls=None):
    """{implementation: max |output - bn_simd's output|} for one op; checks that every implementation
    computes the same thing (up to float32 rounding) on the same data layout."""
    ref = make_bn_simd(ws, op).output().copy()
    diffs = {}
    for name, make in (impls or IMPLEMENTATIONS).items():
        if name == "bn_simd":
            continue
        runner = make(ws, op)
        if runner is not None:
            diffs[name] = float(np.max(np.abs(runner.output() - ref)))
    return diffs
