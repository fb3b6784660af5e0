"""Benchmarks of bn_simd against NumPy, PyTorch and ONNX Runtime: ``python -m bn_simd bench``.

    python -m bn_simd bench [--quick] [--threads N] [--only TEXT ...] [--json FILE] [--plot FILE.png]

Everything here is float32. A :class:`Case` is a shape, a layout and the ops it is timed for; a
:class:`Workspace` holds its arrays (inputs, parameters, saved statistics, a preallocated output). An
implementation is a function ``make(ws, op)`` returning a :class:`Runner` (one call of the op, nothing
else) or None when the implementation is not installed or does not support the case. PyTorch, ONNX
Runtime (with onnx) and matplotlib are optional: they are imported on first use, and without them their
columns and bars are left out.

Minimum bytes of an op (the traffic no implementation can avoid): forward-train and eval read x and write
y, 2 tensor passes; backward reads x and grad_out and writes grad_x, 3 passes.

Each time is the median of k calls after a warm-up, k chosen from the warm-up time (more calls for small
tensors, at least a few for the largest). bn_simd's GB/s counts the minimum bytes of the op; "% of probe"
compares it with np.copyto on a tensor of the same size, timed in the same run. Ratios are the other
implementation's time over bn_simd's. Every implementation's output is also compared with bn_simd's.

``measure(cases)`` returns the rows, ``table(rows)`` formats them, ``plot(rows, path)`` draws a bar chart;
``make_parser()`` and ``run()`` are the command line (``main()``), which ``benchmarks/run.py`` extends.
"""
import argparse
import ctypes
import functools
import importlib
import json
import math
import os
import platform
import sys
import time
import types

import numpy as np

from . import _baseline
from . import functional as F
from ._config import __version__, get_isa, set_isa, set_num_threads, show_config

OPS = ("forward", "backward", "eval")
OP_TITLES = {"forward": "forward-train", "backward": "backward", "eval": "eval"}
MIN_PASSES = {"forward": 2, "backward": 3, "eval": 2}
EPS = 1e-5
MOMENTUM = 0.1
DTYPE = np.float32

# threads of bn_simd, PyTorch and ONNX Runtime (set with configure()); whether steady_allocator() has been
# applied in this process
STATE = types.SimpleNamespace(threads=2, steady_malloc=False)


# ---- optional libraries -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _optional(name):
    """The module, imported on first use, or None when it is not installed."""
    try:
        return importlib.import_module(name)
    except (ImportError, OSError):  # OSError: an installed library whose shared objects fail to load
        return None


def _torch():
    return _optional("torch")


def _onnxruntime():
    """onnxruntime when both it and onnx (which builds the model) are installed, else None."""
    return _optional("onnxruntime") if _optional("onnx") is not None else None


def have_matplotlib():
    """matplotlib is installed and imports (imported on first call)."""
    return _optional("matplotlib") is not None


def configure(threads=2):
    """Use `threads` threads in bn_simd, PyTorch and ONNX Runtime sessions created afterwards."""
    STATE.threads = int(threads)
    set_num_threads(STATE.threads)
    if _torch() is not None:
        _torch().set_num_threads(STATE.threads)


def steady_allocator():
    """Make glibc's malloc keep freed memory instead of returning it to the system (Linux only).

    By default glibc hands back freed memory above a threshold that it adapts as the program runs, so
    whether a 1-32 MB temporary of the NumPy baseline (or a PyTorch output) reuses warm pages or faults
    in fresh ones depends on what was allocated before: the same NumPy call can take several times longer
    in one process than in another. Fixed thresholds make those sizes reuse memory every time. Arrays over
    32 MB (glibc's largest mmap threshold) are still mapped fresh at each allocation, as before.
    Returns True when applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**30)
    except (OSError, AttributeError):
        return False
    STATE.steady_malloc = STATE.steady_malloc or bool(ok)
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
            _, self.save_mean, self.save_invstd = F.batch_norm_forward(
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
        return Runner(lambda: F.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, layout=layout, out=out),
                      lambda r: r)
    if op == "eval":
        em, ev = ws.eval_mean, ws.eval_var
        return Runner(lambda: F.batch_norm(x, em, ev, w, b, False, MOMENTUM, EPS, layout=layout, out=out),
                      lambda r: r)
    dy, sm, si = ws.dy, ws.save_mean, ws.save_invstd
    return Runner(lambda: F.batch_norm_backward(dy, x, sm, si, w, layout=layout, out=out),
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
    t = _torch().from_numpy(a)
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
    p = _torch().from_numpy
    if op == "eval":
        rm, rv = p(ws.eval_mean.copy()), p(ws.eval_var.copy())
    else:
        rm, rv = p(ws.running_mean.copy()), p(ws.running_var.copy())
    return p(ws.weight.copy()), p(ws.bias.copy()), rm, rv


def make_torch(ws, op):
    """torch.nn.functional.batch_norm under no_grad (forward-train, eval): the call PyTorch users make,
    which allocates its output. Backward: aten.native_batch_norm_backward with torch's own saved
    statistics, the kernel autograd runs, without the graph."""
    torch = _torch()
    if torch is None:
        return None
    layout = ws.layout
    x = _torch_view(ws.x, layout)
    w, b, rm, rv = _torch_params(ws, op)
    if op in ("forward", "eval"):
        training = op == "forward"
        bn = torch.nn.functional.batch_norm

        def call():
            with torch.no_grad():
                return bn(x, rm, rv, w, b, training, MOMENTUM, EPS)
        return Runner(call, lambda r: _torch_array(r, layout))
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
    torch = _torch()
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
    helper, TensorProto = _optional("onnx").helper, _optional("onnx").TensorProto
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
    ort = _onnxruntime()
    case = ws.case
    if ort is None or not supports("onnxruntime", case, op):
        return None
    so = ort.SessionOptions()
    so.intra_op_num_threads = STATE.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(_onnx_model(case, ws), so, providers=["CPUExecutionProvider"])
    binding = sess.io_binding()
    binding.bind_ortvalue_input("X", ort.OrtValue.ortvalue_from_numpy(ws.x))
    binding.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(ws.out))
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
IMPL_TITLES = {"bn_simd": "bn_simd", "numpy": "NumPy", "torch": "PyTorch", "torch_out": "PyTorch out=",
               "onnxruntime": "ONNX RT"}


def supports(impl, case, op):
    """Whether impl has a form of op for case at all (installed or not)."""
    if impl == "torch_out":
        return op != "backward"
    if impl == "onnxruntime":
        return op == "eval" and case.layout_label != "NHWC"
    return True


def missing(impl):
    """The name of the library impl needs when it is not installed, else None."""
    if impl in ("torch", "torch_out") and _torch() is None:
        return "torch"
    if impl == "onnxruntime" and _onnxruntime() is None:
        return "onnxruntime (and onnx)"
    return None


def versions():
    """Versions of the libraries in the comparison (None when not installed)."""
    return {"bn_simd": __version__, "numpy": np.__version__,
            "torch": getattr(_torch(), "__version__", None),
            "onnxruntime": getattr(_onnxruntime(), "__version__", None)}


# ---- copy probe -------------------------------------------------------------------------------------------

def copy_probe(ws):
    """np.copyto of a tensor-sized array: read + write of the same bytes, 2 passes like forward and eval."""
    src, dst = ws.x, ws.out
    return lambda: np.copyto(dst, src)


def probe_bytes(case):
    return 2 * case.nbytes


# ---- agreement --------------------------------------------------------------------------------------------

# Outputs further than this from bn_simd's (max |difference|) are reported. Float32 rounding alone gives
# about 1e-6, but NumPy and PyTorch accumulate channels-last statistics in float32: on 32x256x56x56 NHWC
# their forward-train outputs are up to ~1e-4 from a float64 reference (bn_simd's, about 1e-6).
AGREEMENT_TOL = 1e-3


def _difference(out, ref):
    return float(np.max(np.abs(out - ref)))


def max_difference(ws, op, impls=None):
    """{implementation: max |output - bn_simd's output|} for one op; checks that every implementation
    computes the same thing (up to float32 rounding) on the same data layout."""
    ref = make_bn_simd(ws, op).output().copy()
    diffs = {}
    for name, make in (impls or IMPLEMENTATIONS).items():
        runner = make(ws, op) if name != "bn_simd" else None
        if runner is not None:
            diffs[name] = _difference(runner.output(), ref)
    return diffs


# ---- timing -----------------------------------------------------------------------------------------------

# time budget per measurement (seconds) and bounds on the number of timed samples
FULL = {"target_s": 1.0, "k_min": 11, "k_max": 60}
QUICK = {"target_s": 0.25, "k_min": 3, "k_max": 15}
BUSY_CORES = 0.1  # rows during which other processes used more CPU than this are flagged
SAMPLE_S = 2e-4  # calls shorter than this are timed in batches, so each sample lasts about this long


def median_seconds(fn, target_s=1.0, k_min=5, k_max=60):
    """(median time of one steady-state call of fn, samples): interleaved_medians of fn alone."""
    return interleaved_medians([fn], target_s=target_s, k_min=k_min, k_max=k_max)[0]


def _batch_size(fn):
    """(calls per sample, estimated seconds per call): one warm-up call, then calls shorter than SAMPLE_S are
    batched so that a sample lasts about SAMPLE_S."""
    fn()
    t0 = time.perf_counter()
    fn()
    est = time.perf_counter() - t0
    if est < SAMPLE_S:
        batch = max(1, int(SAMPLE_S / max(est, 1e-8)))
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        est = (time.perf_counter() - t0) / batch
    return max(1, int(SAMPLE_S / max(est, 1e-8))), est


def interleaved_medians(fns, setups=None, target_s=1.0, k_min=5, k_max=60):
    """[(median time of one call, samples)] for each callable of fns, sampled in rounds: each round takes one
    sample of every fn (in an order that rotates from round to round), so that a slow spell of the machine
    falls on all of them alike and their ratios hold. Before each sample, setups[i] (if given) and one
    untimed call of fns[i] run, so every sample is a steady-state call of that fn, whatever ran before it.
    Each fn gets about target_s of samples, k of them in [k_min, k_max]."""
    setups = setups or [None] * len(fns)
    plans = []
    for fn, setup in zip(fns, setups):
        if setup:
            setup()
        plans.append(_batch_size(fn))
    k = int(min(k_max, max(k_min, round(target_s / max(max(b * e for b, e in plans), 1e-9)))))
    samples = [[] for _ in fns]
    for r in range(k):
        for j in range(len(fns)):
            i = (j + r) % len(fns)
            fn, batch = fns[i], plans[i][0]
            if setups[i]:
                setups[i]()
            fn()
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            samples[i].append((time.perf_counter() - t0) / batch)
    return [(float(np.median(v)), k) for v in samples]


def cpu_snapshot():
    """(busy CPU seconds of the whole machine, of which stolen by the hypervisor, of this process, wall
    clock), or None where /proc/stat is not available."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    busy = sum(v[:3]) + sum(v[5:8])  # user nice system irq softirq steal
    steal = v[7] if len(v) > 7 else 0
    t = os.times()
    return busy / hz, steal / hz, t.user + t.system, time.monotonic()


def other_load(before, after):
    """Cores kept busy by other processes (or stolen by the hypervisor) between two snapshots."""
    if before is None or after is None or after[3] <= before[3]:
        return None
    busy, _, own, wall = (b - a for a, b in zip(before, after))
    return max(0.0, busy - own) / wall


def wait_until_idle(timeout_s, window_s=2.0):
    """Wait (at most timeout_s) for a window_s interval in which other processes use at most BUSY_CORES
    cores; returns whether one was found."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = cpu_snapshot()
        time.sleep(window_s)
        others = other_load(before, cpu_snapshot())
        if others is None or others <= BUSY_CORES:
            return True
        if time.monotonic() >= deadline:
            return False


def _gbs(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9 if ms else None


def _ratio(num, den):
    return num / den if num and den else None


def _undisturbed(fn, retries, what, progress, retry_wait_s=0):
    """Run fn() while watching the CPU use of other processes; when they used more than BUSY_CORES, wait
    (at most retry_wait_s) for the CPUs to be idle and run it again, at most `retries` more times; keep
    the least disturbed result. Returns (result, other_cores, attempts)."""
    best = None
    for attempt in range(1, retries + 2):
        if attempt > 1 and retry_wait_s > 0:
            wait_until_idle(retry_wait_s)
        before = cpu_snapshot()
        result = fn()
        others = other_load(before, cpu_snapshot())
        if best is None or (others is not None and (best[1] is None or others < best[1])):
            best = (result, others, attempt)
        if others is None or others <= BUSY_CORES:
            break
        if progress:
            progress(f"{what}: other processes used {others:.2f} cores meanwhile"
                     + ("; timing it again" if attempt <= retries else ""))
    return best


def _time_op(ws, op, names, settings, progress):
    """Time one op of each implementation in names (bn_simd first), interleaved (interleaved_medians);
    returns ({impl: ms}, {impl: samples}, {impl: difference from bn_simd's output})."""
    ms, ks, diffs, runners = {}, {}, {}, {}
    ref = None
    for name in names:
        runner = IMPLEMENTATIONS[name](ws, op)
        if runner is None:
            ms[name] = ks[name] = None
            continue
        if ref is None:
            ref = runner.output().copy()
        else:
            diffs[name] = _difference(runner.output(), ref)
        runners[name] = runner
    timed = interleaved_medians(list(runners.values()), **settings)
    for name, (t, k) in zip(runners, timed):
        ms[name], ks[name] = t * 1e3, k
        if progress:
            progress(f"{ws.case.id:22s} {op:9s} {name:12s} {ms[name]:10.4f} ms  (k={k})")
    return ms, ks, diffs


def measure(case_list=None, *, threads=None, quick=False, impls=None, retries=0, retry_wait_s=0, progress=None,
            **timer):
    """Time every case x op x implementation; returns one dict per (case, op).

    case_list: Case objects (default CASES). threads: threads for bn_simd, PyTorch and ONNX Runtime (None
    keeps the current STATE.threads). impls: names from IMPLEMENTATIONS (default all; bn_simd is always
    timed). retries: how many times a (case, op) or a copy probe timed while other processes used more than
    BUSY_CORES cores is timed again (the least disturbed attempt is kept), after waiting at most
    retry_wait_s seconds for the other processes to leave the CPUs idle. progress: a callable receiving
    one line of text per measurement. timer: overrides of target_s / k_min / k_max.

    Row keys: case (N×C×H×W), layout, op, id, tensor_bytes, min_bytes, threads, ms {impl: median ms or
    None}, k {impl: samples}, max_diff {impl: max |output - bn_simd's output|},
    other_cores (CPU used by other processes while the row was timed, in cores; None where unknown),
    attempts, probe_ms, probe_gbs, gbs (bn_simd), pct_probe, speedup {"numpy", "torch", "torch_call",
    "onnxruntime"} (their time / bn_simd's; "torch" uses the faster of PyTorch's two forms).
    """
    if threads is not None:
        configure(threads)
    settings = dict(QUICK if quick else FULL, **timer)
    names = ["bn_simd"] + [n for n in (impls or IMPLEMENTATIONS) if n != "bn_simd"]
    rows = []
    for case in (CASES if case_list is None else case_list):
        ws = Workspace(case)
        probe_s, _, _ = _undisturbed(lambda: median_seconds(copy_probe(ws), **settings)[0], retries,
                                     f"{case.id} copy probe", progress, retry_wait_s)
        probe_ms = probe_s * 1e3
        probe_gbs = _gbs(probe_bytes(case), probe_ms)
        if progress:
            progress(f"{case.id:22s} copy probe  {probe_ms:10.4f} ms")
        for op in case.ops:
            (ms, ks, diffs), others, attempts = _undisturbed(lambda: _time_op(ws, op, names, settings, progress),
                                                             retries, f"{case.id} {op}", progress, retry_wait_s)
            ours = ms["bn_simd"]
            torch_best = min((v for v in (ms.get("torch"), ms.get("torch_out")) if v), default=None)
            gbs = _gbs(case.min_bytes(op), ours)
            rows.append({
                "case": case.label, "layout": case.layout_label, "op": op, "id": case.id,
                "tensor_bytes": case.nbytes, "min_bytes": case.min_bytes(op), "threads": STATE.threads,
                "ms": ms, "k": ks, "max_diff": diffs, "other_cores": others, "attempts": attempts,
                "probe_ms": probe_ms, "probe_gbs": probe_gbs, "gbs": gbs, "pct_probe": 100 * gbs / probe_gbs,
                "speedup": {"numpy": _ratio(ms.get("numpy"), ours), "torch": _ratio(torch_best, ours),
                            "torch_call": _ratio(ms.get("torch"), ours),
                            "onnxruntime": _ratio(ms.get("onnxruntime"), ours)},
            })
        del ws
    return rows


# the cases whose tensors stay in the caches: where a second thread must pay for itself
SCALING_IDS = ("32x2048x7x7-NCHW", "32x2048x7x7-NHWC", "256x1024-NC", "1x64x56x56-NCHW", "1x256x14x14-NCHW")
SCALING_CASES = [c for c in CASES if c.id in SCALING_IDS]


def _measure_settings(cases, keys, apply, restore, what, settings, retries, retry_wait_s, progress):
    """bn_simd alone under each setting of keys (apply(key) before each sample), interleaved sample by sample
    (interleaved_medians); restore() runs at the end, whatever happened. One dict per (case, op): case, layout,
    op, id, threads, ms {key: median ms}, other_cores, attempts."""
    rows = []
    try:
        for case in cases:
            ws = Workspace(case)
            for op in case.ops:
                runner = make_bn_simd(ws, op)
                setups = [functools.partial(apply, key) for key in keys]
                timed, others, attempts = _undisturbed(
                    lambda: interleaved_medians([runner] * len(keys), setups=setups, **settings), retries,
                    f"{case.id} {op} {what}", progress, retry_wait_s)
                ms = {key: m * 1e3 for key, (m, _) in zip(keys, timed)}
                rows.append({"case": case.label, "layout": case.layout_label, "op": op, "id": case.id,
                             "threads": STATE.threads, "ms": ms, "other_cores": others, "attempts": attempts})
                if progress:
                    progress(f"{case.id:22s} {op:9s} " + "  ".join(f"{k} {what} {v:10.4f} ms" for k, v in ms.items()))
            del ws
    finally:
        restore()
    return rows


def measure_scaling(case_list=None, *, threads=None, quick=False, retries=0, retry_wait_s=0, progress=None,
                    **timer):
    """bn_simd alone on 1 thread and on `threads` (default STATE.threads), interleaved sample by sample
    (interleaved_medians, the thread count set before each sample); one dict per (case, op): case, layout,
    op, id, threads, ms {1: median ms, threads: median ms}, speedup (1-thread time / threads time),
    other_cores, attempts. Cases: SCALING_CASES unless case_list is given."""
    if threads is not None:
        configure(threads)
    nt = STATE.threads
    rows = _measure_settings(SCALING_CASES if case_list is None else case_list, (1, nt), set_num_threads,
                             functools.partial(set_num_threads, nt), "thread(s)",
                             dict(QUICK if quick else FULL, **timer), retries, retry_wait_s, progress)
    for r in rows:
        r["speedup"] = _ratio(r["ms"][1], r["ms"][nt])
    return rows


def scaling_table(rows):
    """The markdown table of measure_scaling()'s rows."""
    nt = rows[0]["threads"] if rows else STATE.threads
    lines = [f"Machine: {machine()}. bn_simd {versions()['bn_simd']} ({get_isa()} kernels); float32; medians "
             f"in ms, 1 and {nt} threads timed alternately, sample by sample.", "",
             f"| case | op | layout | 1 thread ms | {nt} threads ms | {nt} threads ÷ 1 |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {OP_TITLES[r['op']]} | {r['layout']} | {_ms(r['ms'][1])} | "
                     f"{_ms(r['ms'][nt])} | {_x(r['speedup'])} |")
    return "\n".join(lines) + "\n"


def measure_isas(case_list=None, *, threads=None, quick=False, retries=0, retry_wait_s=0, progress=None, **timer):
    """bn_simd alone with each kernel set this CPU runs (show_config()["supported_isas"]), interleaved sample by
    sample (the kernel set chosen before each sample); one dict per (case, op): case, layout, op, id, threads,
    isas, ms {isa: median ms}, other_cores, attempts. The active kernel set is put back afterwards. Cases:
    CASES unless case_list is given."""
    if threads is not None:
        configure(threads)
    isas = show_config()["supported_isas"]
    rows = _measure_settings(CASES if case_list is None else case_list, isas, set_isa,
                             functools.partial(set_isa, get_isa()), "kernels", dict(QUICK if quick else FULL, **timer),
                             retries, retry_wait_s, progress)
    for r in rows:
        r["isas"] = isas
    return rows


def isa_table(rows):
    """The markdown table of measure_isas()'s rows: each kernel set's time and its ratio to the widest set's
    (the last of the supported ones), with geometric means of the ratios."""
    isas = rows[0]["isas"] if rows else show_config()["supported_isas"]
    nt = rows[0]["threads"] if rows else STATE.threads
    widest, others = isas[-1], isas[:-1]
    lines = [f"Machine: {machine()}. bn_simd {versions()['bn_simd']}; float32, {nt} thread(s); medians in ms, "
             f"the kernel sets timed alternately, sample by sample; \"X ÷ {widest}\" is X's time over {widest}'s.", "",
             "| " + " | ".join(["case", "op", "layout"] + [f"{n} ms" for n in isas]
                               + [f"{n} ÷ {widest}" for n in others]) + " |",
             "|---|---|---|" + "---:|" * (len(isas) + len(others))]
    for r in rows:
        cells = ([r["case"], OP_TITLES[r["op"]], r["layout"]] + [_ms(r["ms"][n]) for n in isas]
                 + [_x(_ratio(r["ms"][n], r["ms"][widest])) for n in others])
        lines.append("| " + " | ".join(cells) + " |")
    if rows and others:
        lines += ["", "Geometric means — " + "; ".join(
            f"{n} ÷ {widest}: {_x(geomean(_ratio(r['ms'][n], r['ms'][widest]) for r in rows))}" for n in others)
            + "."]
    return "\n".join(lines) + "\n"


def disagreements(rows, tol=AGREEMENT_TOL):
    """"id op impl (difference)" for every output that differs from bn_simd's by more than tol."""
    return [f"{r['id']} {r['op']} {name} ({d:.1e})" for r in rows for name, d in r.get("max_diff", {}).items()
            if not d <= tol]


# ---- report -----------------------------------------------------------------------------------------------

def machine():
    """CPU model (/proc/cpuinfo "model name"), logical cores and L3 size where the system tells."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    line = f"{model}, {os.cpu_count()} cores ({platform.machine()})"
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            size = f.read().strip()
        if size.endswith("K") and size[:-1].isdigit() and int(size[:-1]) % 1024 == 0:
            size = f"{int(size[:-1]) // 1024} MiB"
        line += f", L3 {size}"
    except OSError:
        pass
    return line


def load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def _ms(v):
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    if v >= 0.1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def _x(v):
    return "—" if v is None else (f"{v:.1f}×" if v >= 10 else f"{v:.2f}×")


def _num(v, spec):
    return "—" if v is None else format(v, spec)


def _compared(rows):
    """The optional implementations in the rows whose library is installed: their columns are shown."""
    return [n for n in ("torch", "torch_out", "onnxruntime")
            if missing(n) is None and any(n in r["ms"] for r in rows)]


def table(rows):
    """The markdown table of measure()'s rows, with a header line and geometric means of the speed-ups.

    Columns of PyTorch and ONNX Runtime appear when they are installed; "vs PyTorch" takes the faster of
    PyTorch and PyTorch out=."""
    v = versions()
    libs = [f"NumPy {v['numpy']}"] + [f"{t} {v[k]}" for k, t in (("torch", "PyTorch"), ("onnxruntime", "ONNX Runtime"))
                                      if v[k]]
    threads = sorted({r["threads"] for r in rows})
    shown = ["bn_simd", "numpy"] + _compared(rows)
    ratios = [("numpy", "NumPy")] + [(k, IMPL_TITLES[k]) for k in ("torch", "onnxruntime") if k in shown]
    head = ([f"{IMPL_TITLES[n]} ms" for n in shown] + ["bn_simd GB/s", "% of probe"]
            + [f"vs {t}" for _, t in ratios])
    lines = [
        f"Machine: {machine()}. bn_simd {v['bn_simd']} ({get_isa()} kernels), "
        f"{', '.join(libs)}; float32, {'/'.join(map(str, threads))} thread(s)"
        f"{'; glibc malloc with fixed thresholds' if STATE.steady_malloc else ''}; medians in ms.",
        "",
        "| case | op | layout | " + " | ".join(head) + " |",
        "|---|---|---|" + "---:|" * len(head),
    ]
    for r in rows:
        cells = ([r["case"], OP_TITLES[r["op"]], r["layout"]] + [_ms(r["ms"].get(n)) for n in shown]
                 + [_num(r["gbs"], ".1f" if r["gbs"] >= 1 else ".3f"), _num(r["pct_probe"], ".0f") + " %"]
                 + [_x(r["speedup"][k]) for k, _ in ratios])
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    parts = []
    for label, sel in [("all", rows)] + [(OP_TITLES[op], [r for r in rows if r["op"] == op]) for op in OPS]:
        if not sel:
            continue
        means = [(geomean(r["speedup"][k] for r in sel), t) for k, t in ratios]
        parts.append(f"{label} ({len(sel)}): " + ", ".join(f"{_x(gm)} vs {t}" for gm, t in means if gm))
    lines.append("Geometric means of the speed-ups — " + "; ".join(parts) + ".")
    return "\n".join(lines)


def plot(rows, path):
    """Bar chart of GB/s (minimum bytes / time) per case and op, one bar per implementation and one for the
    copy probe, saved to path. Returns path, or None when matplotlib is not installed."""
    if not have_matplotlib():
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in IMPLEMENTATIONS if any(r["ms"].get(n) for r in rows)]
    labels = [f"{r['case']} {r['layout']}\n{OP_TITLES[r['op']]}" for r in rows]
    width = 0.8 / (len(names) + 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 5))
    xs = np.arange(len(rows))
    for i, name in enumerate(names):
        vals = [_gbs(r["min_bytes"], r["ms"].get(name)) or 0 for r in rows]
        ax.bar(xs + i * width, vals, width, label=IMPL_TITLES[name])
    ax.bar(xs + len(names) * width, [r["probe_gbs"] for r in rows], width, label="copy probe", color="0.8")
    ax.set_xticks(xs + 0.4 - width / 2)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("GB/s (minimum bytes / time)")
    ax.set_title(f"batch norm, float32, {rows[0]['threads'] if rows else '?'} thread(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- command line -----------------------------------------------------------------------------------------

def make_parser(prog=None):
    p = argparse.ArgumentParser(
        prog=prog, description="Time bn_simd against NumPy, PyTorch and ONNX Runtime (the last two when "
                               "installed) and print a markdown table.",
        epilog="Progress goes to stderr, the table to stdout. The cases: "
               + ", ".join(c.id for c in CASES) + f"; --quick runs {', '.join(QUICK_IDS)}.")
    p.add_argument("--quick", action="store_true", help="a subset of the cases and fewer repeats (under a minute)")
    p.add_argument("--threads", type=int, default=2, help="threads for bn_simd, PyTorch and ONNX Runtime (default 2)")
    p.add_argument("--only", metavar="TEXT", nargs="+",
                   help="only the cases whose id contains one of the TEXTs (e.g. NHWC, 2048, 1x8x1x1)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--plot", metavar="FILE", help="also draw a bar chart of GB/s, e.g. bench.png (needs matplotlib)")
    p.add_argument("--retries", type=int, default=None,
                   help="time a row again (at most this often) when other processes used CPU meanwhile "
                        "(default 2, with --quick 1)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="wait (at most this long) for other processes to leave the CPUs idle, before the run "
                        "and before each retry")
    p.add_argument("--scaling", action="store_true",
                   help="instead of the comparison, time bn_simd alone on 1 thread and on --threads, "
                        "alternately, on the cache-resident cases (or those of --only), and print that table")
    p.add_argument("--isas", action="store_true",
                   help="instead of the comparison, time bn_simd alone with each kernel set this CPU runs "
                        "(scalar, avx2, avx512), alternately, and print that table")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc thresholds adaptive (by default they are fixed, see "
                        "steady_allocator in bn_simd/_bench.py)")
    return p


def _warn(text):
    print(f"warning: {text}", file=sys.stderr, flush=True)


def run(args, parser):
    """Run what the parsed options ask for: print the table (stdout) and warnings (stderr), write the JSON
    and the chart. Returns (rows, table text)."""
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.scaling and args.threads < 2:
        parser.error("--scaling compares 1 thread with --threads: give --threads 2 or more")
    if args.scaling and args.isas:
        parser.error("--scaling and --isas are separate tables: give one of them")
    for flag, given in (("--scaling", args.scaling), ("--isas", args.isas)):
        if given and args.plot:
            parser.error(f"--plot draws the comparison, not {flag}")
    if args.plot and not have_matplotlib():
        parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{option}: the folder of {path} does not exist")
    pool = chosen = QUICK_CASES if args.quick else CASES
    if args.scaling and not args.only:
        pool = chosen = SCALING_CASES
    if args.only:
        chosen = [c for c in pool if any(t in c.id for t in args.only)]
        if not chosen:
            parser.error(f"no case id {'of --quick ' if args.quick else ''}contains {' or '.join(args.only)}; "
                         f"ids: {', '.join(c.id for c in pool)}")
    for name in () if args.scaling or args.isas else ("torch", "onnxruntime"):
        if missing(name):
            print(f"{missing(name)} is not installed: no {IMPL_TITLES[name]} columns", file=sys.stderr)
    if not args.default_malloc:
        steady_allocator()
    if args.wait_idle > 0 and not wait_until_idle(args.wait_idle):
        _warn(f"other processes kept the CPUs busy for {args.wait_idle:g} s; starting anyway")
    load = load_average()
    if load is not None and load > 0.25 * (os.cpu_count() or 1):
        _warn(f"load average {load:.2f} before the run; other processes will skew the timings")
    retries = (1 if args.quick else 2) if args.retries is None else max(0, args.retries)
    progress = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.scaling:
        rows = measure_scaling(chosen, threads=args.threads, quick=args.quick, retries=retries,
                               retry_wait_s=args.wait_idle, progress=progress)
        text = scaling_table(rows)
    elif args.isas:
        rows = measure_isas(chosen, threads=args.threads, quick=args.quick, retries=retries,
                            retry_wait_s=args.wait_idle, progress=progress)
        text = isa_table(rows)
    else:
        rows = measure(chosen, threads=args.threads, quick=args.quick, retries=retries,
                       retry_wait_s=args.wait_idle, progress=progress)
        text = table(rows)
    print(text, flush=True)
    busy = [f"{r['id']} {r['op']} ({r['other_cores']:.2f})" for r in rows
            if r["other_cores"] is not None and r["other_cores"] > BUSY_CORES]
    if busy:
        _warn(f"other processes used CPU while these rows were timed (cores): {', '.join(busy)}")
    wrong = disagreements(rows)
    if wrong:
        _warn(f"outputs that differ from bn_simd's by more than {AGREEMENT_TOL:g}: {', '.join(wrong)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine(), "versions": versions(), "isa": get_isa(),
                       "steady_malloc": STATE.steady_malloc, "load_before": load, "load_after": load_average(),
                       "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
        print(f"bar chart written to {args.plot}", file=sys.stderr)
    return rows, text


def main(argv=None, prog="python -m bn_simd bench"):
    """The command line; returns the exit status (1 when an implementation's output disagrees with bn_simd's)."""
    parser = make_parser(prog)
    rows, _ = run(parser.parse_args(argv), parser)
    return 1 if disagreements(rows) else 0
