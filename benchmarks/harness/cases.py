"""Benchmark cases and the arrays they are timed on.

A case is (op family, shape, layout, dtype, modes). ``Case((32, 64, 56, 56), "NHWC")`` is batch norm on
float32 channels-last arrays, timed in every mode of its family (forward-train, backward, eval) unless
``modes`` names fewer; ``Case((8, 256, 56, 56), family="group_norm", options={"G": 32})`` is group norm with
32 groups (forward-train, backward, forward+backward). An op family (:class:`Family`, registered in FAMILIES)
states its modes, the minimum traffic of each mode and how a case's arrays (its workspace) are built; its
implementations are registered per family in ``impls.IMPLEMENTATIONS``. Timing and reports read only these
records, so a new family is a FAMILIES entry, its workspace, its IMPLEMENTATIONS entry and its cases.

Layer norm and RMS norm (families "layer_norm", "rms_norm") take transformer shapes: ``Case((32, 128, 768),
"last", family="layer_norm")`` is an array of that shape normalised over its last dim (layout "last": the arrays
are the dims as given).

Minimum bytes of a mode (the traffic no implementation can avoid), for the normalisation families:
forward-train and eval read x and write y, 2 tensor passes; backward reads x and grad_out and writes
grad_x, 3 passes; forward+backward is the two in a row, 5 passes.
"""
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

import bn_simd
from bn_simd import functional as F

MODES = ("forward", "backward", "eval")  # batch norm's
GROUP_MODES = ("forward", "backward", "forward_backward")  # group norm's and instance norm's
# every mode, in the order reports list them
MODE_TITLES = {"forward": "forward-train", "backward": "backward", "eval": "eval",
               "forward_backward": "forward+backward"}
NORM_PASSES = {"forward": 2, "backward": 3, "eval": 2, "forward_backward": 5}
EPS = 1e-5
MOMENTUM = 0.1


@dataclass(frozen=True)
class Family:
    """An op family. title names it in charts and in tables that hold several families; modes are the ones
    it can be timed in; min_passes {mode: tensor passes} gives each mode's minimum traffic; workspace(case,
    seed) builds a case's arrays; id_prefix starts its case ids (empty for batch norm, whose ids predate the
    other families); options names the settings every case of the family must give (group norm: "G").
    bn_eval_targets {mode: bound}: the most bn_simd's time may be as a multiple of bn_simd's batch-norm eval
    of the same tensor (timed beside it as "bn_eval" where the family registers that yardstick)."""
    title: str
    modes: tuple
    min_passes: dict
    workspace: Callable
    id_prefix: str = ""
    options: tuple = ()
    bn_eval_targets: dict = field(default_factory=dict)


class Case:
    """One benchmark case.

    dims: the logical (N, C, *spatial) sizes. layout: "NCHW" (arrays (N, C, H, W)) or "NHWC" (arrays
    (N, H, W, C)); 2-D cases are (N, C) in either layout and are labelled "NC". modes: a subset of the
    family's modes (default all). family: a key of FAMILIES. dtype: of every array. options: settings of the
    op beyond the shape (none for batch norm), shown in the id and the label.
    """

    def __init__(self, dims, layout="NCHW", modes=None, *, family="batch_norm", dtype=np.float32, options=None):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
        if layout not in ("NCHW", "NHWC", "last"):
            raise ValueError(f"layout must be 'NCHW', 'NHWC' or 'last', got {layout!r}")
        known = FAMILIES[family].modes
        self.family = family
        self.modes = tuple(modes) if modes else known
        if not set(self.modes) <= set(known):
            raise ValueError(f"modes of {family} are {known}, got {self.modes}")
        self.dims = tuple(int(d) for d in dims)
        self.layout = layout
        self.dtype = np.dtype(dtype)
        self.options = dict(options or {})
        needed = [k for k in FAMILIES[family].options if k not in self.options]
        if needed:
            raise ValueError(f"cases of {family} need the option(s) {', '.join(needed)}")
        self.channels = self.dims[1]
        if layout == "NHWC" and len(self.dims) > 2:
            self.shape = (self.dims[0],) + self.dims[2:] + (self.dims[1],)
        else:
            self.shape = self.dims

    @property
    def layout_label(self):
        return "NC" if len(self.dims) == 2 else self.layout

    def _extras(self, sep):
        extras = [f"{k}={v}" for k, v in sorted(self.options.items())]
        if self.dtype != np.float32:
            extras.append(self.dtype.name)
        return "".join(sep + e for e in extras)

    @property
    def label(self):
        """N×C×H×W (logical order, whatever the layout), then the options and a dtype other than float32."""
        return "×".join(map(str, self.dims)) + self._extras(" ")

    @property
    def id(self):
        """e.g. 32x64x56x56-NHWC: ASCII, unique among the cases, what --only and pytest ids match."""
        return (FAMILIES[self.family].id_prefix + "x".join(map(str, self.dims)) + "-" + self.layout_label
                + self._extras("-"))

    @property
    def nbytes(self):
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def min_bytes(self, mode):
        return FAMILIES[self.family].min_passes[mode] * self.nbytes

    def __repr__(self):
        return f"Case({self.family} {self.label} {self.layout_label}, modes={self.modes})"


def workspace(case, seed=0):
    """The arrays of case, built by its family. Every workspace has case, layout, x (the input) and out (a
    preallocated output of x's shape and dtype), which the copy probe uses."""
    return FAMILIES[case.family].workspace(case, seed)


class BatchNormWorkspace:
    """The arrays of one batch-norm case. x and grad_out are standard normal; the per-channel parameters are
    not trivial (so no implementation can skip work). Training forwards update running_mean / running_var;
    eval uses its own constant statistics (eval_mean, eval_var); backward uses bn_simd's saved statistics."""

    def __init__(self, case, seed=0):
        rng = np.random.default_rng(seed)
        C, dt = case.channels, case.dtype
        self.case = case
        self.layout = case.layout
        self.x = rng.standard_normal(case.shape, dtype=dt)
        self.dy = rng.standard_normal(case.shape, dtype=dt) if "backward" in case.modes else None
        self.out = np.empty_like(self.x)
        self.weight = rng.uniform(0.5, 1.5, C).astype(dt)
        self.bias = rng.uniform(-0.5, 0.5, C).astype(dt)
        self.running_mean = np.zeros(C, dt)
        self.running_var = np.ones(C, dt)
        self.eval_mean = rng.uniform(-0.2, 0.2, C).astype(dt)
        self.eval_var = rng.uniform(0.5, 2.0, C).astype(dt)
        if "backward" in case.modes:
            _, self.save_mean, self.save_invstd = F.batch_norm_forward(
                self.x, self.weight, self.bias, eps=EPS, layout=self.layout)
        else:
            self.save_mean = self.save_invstd = None


class GroupNormWorkspace:
    """The arrays of one group-norm or instance-norm case (instance norm: one channel per group). x and
    grad_out are standard normal, the affine weight and bias per channel and not trivial; backward uses
    bn_simd's saved statistics (mean, invstd of shape (N, groups)). y receives forward+backward's forward
    output (out its grad_x). eval_mean / eval_var are for bn_simd's batch-norm eval of the same tensor, the
    yardstick timed beside every row."""

    def __init__(self, case, seed=0):
        rng = np.random.default_rng(seed)
        C, dt = case.channels, case.dtype
        self.case = case
        self.layout = case.layout
        self.groups = int(case.options["G"]) if case.family == "group_norm" else C
        self.x = rng.standard_normal(case.shape, dtype=dt)
        grads = {"backward", "forward_backward"} & set(case.modes)
        self.dy = rng.standard_normal(case.shape, dtype=dt) if grads else None
        self.out = np.empty_like(self.x)
        self.y = np.empty_like(self.x) if "forward_backward" in case.modes else None
        self.weight = rng.uniform(0.5, 1.5, C).astype(dt)
        self.bias = rng.uniform(-0.5, 0.5, C).astype(dt)
        self.eval_mean = rng.uniform(-0.2, 0.2, C).astype(dt)
        self.eval_var = rng.uniform(0.5, 2.0, C).astype(dt)
        if "backward" in case.modes:
            _, self.save_mean, self.save_invstd = bn_simd.group_norm_forward(
                self.x, self.groups, self.weight, self.bias, eps=EPS, layout=self.layout)
        else:
            self.save_mean = self.save_invstd = None


class RowNormWorkspace:
    """The arrays of one layer-norm or RMS-norm case: x (the case's shape) normalised over its last dim D, grad_out
    standard normal, weight and bias (D,) not trivial; backward uses bn_simd's saved statistics (mean, rstd; RMS
    norm rstd alone). y receives forward+backward's forward output (out its grad_x)."""

    def __init__(self, case, seed=0):
        rng = np.random.default_rng(seed)
        dt = case.dtype
        self.case = case
        self.layout = case.layout
        self.rms = case.family == "rms_norm"
        self.D = D = case.shape[-1]
        self.x = rng.standard_normal(case.shape, dtype=dt)
        grads = {"backward", "forward_backward"} & set(case.modes)
        self.dy = rng.standard_normal(case.shape, dtype=dt) if grads else None
        self.out = np.empty_like(self.x)
        self.y = np.empty_like(self.x) if "forward_backward" in case.modes else None
        self.weight = rng.uniform(0.5, 1.5, D).astype(dt)
        self.bias = None if self.rms else rng.uniform(-0.5, 0.5, D).astype(dt)
        self.save_mean = self.save_rstd = None
        if "backward" in case.modes:
            if self.rms:
                _, self.save_rstd = bn_simd.rms_norm_forward(self.x, D, self.weight, eps=EPS)
            else:
                _, self.save_mean, self.save_rstd = bn_simd.layer_norm_forward(self.x, D, self.weight, self.bias,
                                                                               eps=EPS)


# GroupNorm and InstanceNorm targets, as multiples of bn_simd's own batch-norm eval of the same tensor
GROUP_TARGETS = {"forward": 1.2, "backward": 2.0}

FAMILIES = {
    "batch_norm": Family("batch norm", MODES, NORM_PASSES, BatchNormWorkspace),
    "group_norm": Family("group norm", GROUP_MODES, NORM_PASSES, GroupNormWorkspace, "group_norm-", ("G",),
                         GROUP_TARGETS),
    "instance_norm": Family("instance norm", GROUP_MODES, NORM_PASSES, GroupNormWorkspace, "instance_norm-",
                            (), GROUP_TARGETS),
    "layer_norm": Family("layer norm", GROUP_MODES, NORM_PASSES, RowNormWorkspace, "layer_norm-"),
    "rms_norm": Family("RMS norm", GROUP_MODES, NORM_PASSES, RowNormWorkspace, "rms_norm-"),
}


def _both_layouts(*dims, **kw):
    return [Case(dims, "NCHW", **kw), Case(dims, "NHWC", **kw)]


def _group_norm(*dims, G=32):
    return _both_layouts(*dims, family="group_norm", options={"G": G})


CASES = (
    _both_layouts(32, 64, 56, 56)
    + _both_layouts(32, 256, 56, 56)
    + _both_layouts(32, 512, 28, 28)
    + _both_layouts(32, 2048, 7, 7)
    + [Case((256, 1024))]
    + [Case((1, 64, 56, 56), modes=("eval",)),
       Case((1, 256, 14, 14), modes=("eval",)),
       Case((1, 8, 1, 1), modes=("eval",))]
    # group norm and instance norm (channels-last: PyTorch takes torch.channels_last tensors for both)
    + _group_norm(8, 256, 56, 56)
    + _group_norm(32, 512, 28, 28)
    + [Case((1, 64, 56, 56), modes=("forward",), family="group_norm", options={"G": 32})]
    + _both_layouts(8, 64, 128, 128, family="instance_norm")
    + [Case((1, 64, 32, 32), modes=("forward",), family="instance_norm")]
    # layer norm and RMS norm over the last dim: transformer activations (batch x tokens x features), an LLM's
    # decode (1x1x4096) and prefill (1x2048x4096) steps
    + [Case(dims, "last", family=fam) for fam in ("layer_norm", "rms_norm")
       for dims in ((32, 128, 768), (8, 512, 1024), (1, 128, 768), (1, 1, 4096), (1, 2048, 4096))]
)

QUICK_IDS = ("32x64x56x56-NCHW", "32x64x56x56-NHWC", "32x2048x7x7-NCHW", "256x1024-NC", "1x64x56x56-NCHW",
             "1x8x1x1-NCHW", "group_norm-8x256x56x56-NCHW-G=32", "instance_norm-8x64x128x128-NCHW")
QUICK_CASES = [c for c in CASES if c.id in QUICK_IDS]

# the cases whose tensors stay in the caches: where a second thread must pay for itself
SCALING_IDS = ("32x2048x7x7-NCHW", "32x2048x7x7-NHWC", "256x1024-NC", "1x64x56x56-NCHW", "1x256x14x14-NCHW")
SCALING_CASES = [c for c in CASES if c.id in SCALING_IDS]
