"""Benchmark cases and the arrays they are timed on.

A case is (op family, shape, layout, dtype, modes). ``Case((32, 64, 56, 56), "NHWC")`` is batch norm on
float32 channels-last arrays, timed in every mode of its family (forward-train, backward, eval) unless
``modes`` names fewer. An op family (:class:`Family`, registered in FAMILIES) states its modes, the minimum
traffic of each mode and how a case's arrays (its workspace) are built; its implementations are registered
per family in ``impls.IMPLEMENTATIONS``. Timing and reports read only these records, so a new family is a
FAMILIES entry, its workspace, its IMPLEMENTATIONS entry and its cases.

Minimum bytes of a mode (the traffic no implementation can avoid), for the normalisation families:
forward-train and eval read x and write y, 2 tensor passes; backward reads x and grad_out and writes
grad_x, 3 passes.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np

from bn_simd import functional as F

MODES = ("forward", "backward", "eval")
MODE_TITLES = {"forward": "forward-train", "backward": "backward", "eval": "eval"}
NORM_PASSES = {"forward": 2, "backward": 3, "eval": 2}
EPS = 1e-5
MOMENTUM = 0.1


@dataclass(frozen=True)
class Family:
    """An op family. title names it in charts and in tables that hold several families; modes are the ones
    it can be timed in; min_passes {mode: tensor passes} gives each mode's minimum traffic; workspace(case,
    seed) builds a case's arrays; id_prefix starts its case ids (empty for batch norm, whose ids predate the
    other families)."""
    title: str
    modes: tuple
    min_passes: dict
    workspace: Callable
    id_prefix: str = ""


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
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
        known = FAMILIES[family].modes
        self.family = family
        self.modes = tuple(modes) if modes else known
        if not set(self.modes) <= set(known):
            raise ValueError(f"modes of {family} are {known}, got {self.modes}")
        self.dims = tuple(int(d) for d in dims)
        self.layout = layout
        self.dtype = np.dtype(dtype)
        self.options = dict(options or {})
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


FAMILIES = {
    "batch_norm": Family("batch norm", MODES, NORM_PASSES, BatchNormWorkspace),
}


def _both_layouts(*dims):
    return [Case(dims, "NCHW"), Case(dims, "NHWC")]


CASES = (
    _both_layouts(32, 64, 56, 56)
    + _both_layouts(32, 256, 56, 56)
    + _both_layouts(32, 512, 28, 28)
    + _both_layouts(32, 2048, 7, 7)
    + [Case((256, 1024))]
    + [Case((1, 64, 56, 56), modes=("eval",)),
       Case((1, 256, 14, 14), modes=("eval",)),
       Case((1, 8, 1, 1), modes=("eval",))]
)

QUICK_IDS = ("32x64x56x56-NCHW", "32x64x56x56-NHWC", "32x2048x7x7-NCHW", "256x1024-NC", "1x64x56x56-NCHW",
             "1x8x1x1-NCHW")
QUICK_CASES = [c for c in CASES if c.id in QUICK_IDS]

# the cases whose tensors stay in the caches: where a second thread must pay for itself
SCALING_IDS = ("32x2048x7x7-NCHW", "32x2048x7x7-NHWC", "256x1024-NC", "1x64x56x56-NCHW", "1x256x14x14-NCHW")
SCALING_CASES = [c for c in CASES if c.id in SCALING_IDS]
