"""16-bit data (float16, bfloat16) in the registry's suites: the cases, entry points and expectations they share.

The functional entry points of every registered op (ops.py) take float16 and bfloat16 data with float32 parameters
and running statistics, and so do its layers' entry points (layers with float32 parameters: ops._layer_dtype). Outputs shaped like x come back in x's dtype; statistics and parameter
gradients float32; float64 reductions as ever. The oracle's bounds are those of the 16-bit dtype (bounds.py with
its eps). bfloat16 is ml_dtypes' and its cases skip when ml_dtypes is not installed.
"""
import numpy as np
import pytest

import ops

F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
NAMES = ("float16", "bfloat16")
# the entry points that take 16-bit data (the others refuse it: tests/test_half.py): the functional ones, fused
# epilogues (forward and backward) included, and the layers
ENTRIES = {"train", "eval", "forward", "backward", "backward_eval", "stats", "normalize", "backward_reduce",
           "functional", "train_relu_residual", "eval_leaky_relu", "eval_silu_residual", "functional_relu_residual",
           "functional_silu_residual", "backward_silu_residual", "backward_eval_relu", "backward_relu",
           "backward_relu_residual", "train_relu6", "eval_clamp_residual", "backward_leaky_relu_residual",
           "backward_eval_clamp", "functional_silu", "functional_leaky_relu_residual", "backward_clamp_residual",
           "backward_leaky_relu", "train_silu_residual", "eval_relu6", "functional_relu", "functional_clamp_residual",
           "layer_forward", "layer_backward", "layer_eval_forward", "layer_eval_backward"}

# the entry points that round an intermediate to the 16-bit type and compute their other outputs from it: the backward
# through a smooth activation (du = dz silu'(u), the residual's gradient, is the normalisation's dy; relu's du is dz
# or 0, no rounding). Two ISAs' float32 du differ by a few float32 ulp, which a 16-bit rounding can turn into one
# 16-bit ulp: the other outputs then move by what the backward's linear maps carry of that difference (the entry
# point's carry, ops.py).
ROUNDED_BETWEEN = {"backward_silu_residual": "grad_residual"}


def dtype(name):
    """The NumPy dtype of a 16-bit type's name; skips the test when bfloat16's ml_dtypes is missing."""
    if name == "float16":
        return F16
    return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)


def supports(op, shape, layout):
    """op takes 16-bit data of this shape in this layout (the registry lists float16 for both 16-bit types)."""
    return op.supports(shape, layout, F16)


def case(op, seed, shape, layout, dt, **options):
    """op's case for 16-bit data with float32 parameters and running statistics."""
    kw = dict(loc=1.0, scale=2.0, param_dtype=F32, stats_dtype=F32, momentum=0.3)
    kw.update(options)
    return op.case(seed, shape, layout, dt, **kw)


def entries(op, c):
    return [ep for ep in op.entry_points if ep.name in ENTRIES and ep.applies(c)]


def expected(ep, c):
    """{output: Expected or None}: the oracle's, with the 16-bit rule's dtypes (float32 where the float32 library
    returns x's dtype for an output not shaped like x)."""
    res = {}
    for o in ep.outputs:
        e = ep.expected(c)[o.name]
        if e is not None and o.shape != ops.DATA and e.dtype == c.dtype:
            e = ops.Expected(e.value, e.bound, F32)
        res[o.name] = e
    return res


def check(ep, c, got, what=""):
    """Every output of ep in got against the oracle with the 16-bit rule."""
    for name, e in expected(ep, c).items():
        ops.compare(got[name], e, f"{c} {ep.name}.{name}{what}")
