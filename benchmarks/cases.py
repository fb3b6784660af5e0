"""The benchmark cases and implementations, shared by test_bench.py (pytest-benchmark) and run.py (table).

Each implementation maps (case, op) to a zero-argument callable that runs the op once on preallocated
data, or None when it does not support the case. Minimum bytes: forward-train and eval move 2 tensors
(read x, write y), backward 3 (read x and dy, write dx).
"""
import numpy as np

import bn_simd
from bn_simd import _baseline

try:
    import torch
except ImportError:  # parity columns are optional
    torch = None

try:
    import onnxruntime as ort
    from onnx import TensorProto, helper
except ImportError:
    ort = None

OPS = ("forward", "backward", "eval")
PASSES = {"forward": 2, "backward": 3, "eval": 2}
EPS = 1e-5


class Case:
    def __init__(self, shape, layout, ops=OPS):
        self.shape, self.layout, self.ops = tuple(shape), layout, tuple(ops)
        self.C = shape[1] if layout == "NCHW" else shape[-1]

    @property
    def name(self):
        return "x".join(map(str, self.torch_shape)) + (f" {self.layout}" if len(self.shape) > 2 else "")

    @property
    def torch_shape(self):
        """The shape in (N, C, *spatial) order."""
        if self.layout == "NCHW":
            return self.shape
        return (self.shape[0], self.shape[-1]) + self.shape[1:-1]

    def nbytes(self):
        return int(np.prod(self.shape)) * 4


def _pair(shape):
    return [Case(shape, "NCHW"), Case((shape[0],) + shape[2:] + (shape[1],), "NHWC")]


CASES = (_pair((32, 64, 56, 56)) + _pair((32, 256, 56, 56)) + _pair((32, 512, 28, 28)) + _pair((32, 2048, 7, 7))
         + [Case((256, 1024), "NCHW"),
            Case((1, 64, 56, 56), "NCHW", ("eval",)), Case((1, 256, 14, 14), "NCHW", ("eval",)),
            Case((1, 8, 1, 1), "NCHW", ("eval",))])
QUICK = [c for c in CASES if c.shape in {(32, 64, 56, 56), (32, 56, 56, 64), (32, 2048, 7, 7), (256, 1024),
                                         (1, 64, 56, 56), (1, 8, 1, 1)}]


class Data:
    """Inputs, parameters and preallocated outputs of one case."""

    def __init__(self, case, seed=0):
        rng = np.random.default_rng(seed)
        C = case.C
        self.case = case
        self.x = rng.standard_normal(case.shape, dtype=np.float32)
        self.dy = rng.standard_normal(case.shape, dtype=np.float32)
        self.out = np.empty_like(self.x)
        self.w, self.b = np.ones(C, np.float32), np.zeros(C, np.float32)
        self.rm, self.rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        if "backward" in case.ops:
            _, self.mean, self.invstd = bn_simd.batch_norm_forward(self.x, self.w, self.b, layout=case.layout)


def bn_simd_op(d, op):
    c = d.case
    if op == "forward":
        return lambda: bn_simd.batch_norm(d.x, d.rm, d.rv, d.w, d.b, True, 0.1, EPS, layout=c.layout, out=d.out)
    if op == "eval":
        return lambda: bn_simd.batch_norm(d.x, d.rm, d.rv, d.w, d.b, False, 0.1, EPS, layout=c.layout, out=d.out)
    return lambda: bn_simd.batch_norm_backward(d.dy, d.x, d.mean, d.invstd, d.w, layout=c.layout, out=d.out)


def numpy_op(d, op):
    c = d.case
    if op == "forward":
        return lambda: _baseline.forward_train(d.x, d.w, d.b, EPS, c.layout)
    if op == "eval":
        return lambda: _baseline.inference(d.x, d.rm, d.rv, d.w, d.b, EPS, c.layout)
    return lambda: _baseline.backward(d.dy, d.x, d.mean, d.invstd, d.w, c.layout)


def torch_op(d, op):
    if torch is None:
        return None
    c = d.case

    def tensor(a):
        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1)) if c.layout == "NHWC" else a)
        if c.layout == "NHWC":
            t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
        return t

    x, dy = tensor(d.x), tensor(d.dy)
    w, b, rm, rv = (torch.from_numpy(a.copy()) for a in (d.w, d.b, d.rm, d.rv))
    if op == "forward":
        return lambda: torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, EPS)
    if op == "eval":
        return lambda: torch.ops.aten.native_batch_norm(x, w, b, rm, rv, False, 0.1, EPS)
    _, sm, si = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, EPS)
    return lambda: torch.ops.aten.native_batch_norm_backward(dy, x, w, rm, rv, sm, si, True, EPS, [True, True, True])


def onnxruntime_op(d, op, threads=2):
    if ort is None or op != "eval" or d.case.layout != "NCHW":
        return None
    C, shape = d.case.C, list(d.case.shape)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [C], v.tolist())
             for n, v in (("w", d.w), ("b", d.b), ("m", d.rm), ("v", d.rv))]
    node = helper.make_node("BatchNormalization", ["x", "w", "b", "m", "v"], ["y"], epsilon=EPS)
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return lambda: sess.run(["y"], {"x": d.x})


IMPLS = {"bn_simd": bn_simd_op, "numpy": numpy_op, "torch": torch_op, "onnxruntime": onnxruntime_op}


def copy_probe(d):
    """np.copyto on the tensor's bytes: the bandwidth a 2-pass kernel (read + write) can reach."""
    src, dst = d.x, d.out
    return lambda: np.copyto(dst, src)
