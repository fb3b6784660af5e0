"""The ``activation=`` argument of the fused epilogues: its spellings and their parsing.

    None                    no activation
    "relu"                  max(u, 0)
    "relu6"                 min(max(u, 0), 6)
    ("leaky_relu", slope)   u if u > 0 else slope * u        (slope: a finite real number, within float32's range
                                                              for data other than float64; "leaky_relu" alone: 0.01,
                                                              PyTorch's default)
    ("clamp", lo, hi)       min(max(u, lo), hi)               (lo <= hi; either may be None: unbounded; PyTorch's
                                                              Hardtanh: derivative 0 at lo and hi, where
                                                              torch.clamp's is 1)
    "silu"                  u / (1 + exp(-u))                 (also "swish")

parse() turns one into the kernels' tuple (code, lo, hi, slope) (include/bn_simd_epilogue.h: BN_ACT_*), raising
ValueError / TypeError naming ``activation``.
"""
import math
import numbers

import numpy as np

ACT_NONE, ACT_CLAMP, ACT_LEAKY, ACT_SILU = 0, 1, 2, 3
NONE = (ACT_NONE, 0.0, 0.0, 0.0)
_NAMES = ("relu", "relu6", "leaky_relu", "clamp", "silu")


def _real(v, what):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"activation: {what} must be a real number, got {type(v).__name__}")
    try:
        v = float(v)
    except OverflowError:  # (an int beyond float's range)
        raise ValueError(f"activation: {what} must be a real number within float's range, got an integer too large "
                         f"for a float") from None
    if math.isnan(v):
        raise ValueError(f"activation: {what} must not be NaN")
    return v


def parse(activation):
    """The kernels' (code, lo, hi, slope) of an ``activation=`` argument (see the module's docstring)."""
    if activation is None:
        return NONE
    if isinstance(activation, str):
        name, args = activation, ()
    elif isinstance(activation, tuple) and activation and isinstance(activation[0], str):
        name, args = activation[0], activation[1:]
    else:
        raise TypeError(f"activation must be None, a name among {_NAMES} or a tuple such as ('leaky_relu', 0.2), "
                        f"got {activation!r}")
    key = name.lower()
    if key == "relu" and not args:
        return (ACT_CLAMP, 0.0, math.inf, 0.0)
    if key == "relu6" and not args:
        return (ACT_CLAMP, 0.0, 6.0, 0.0)
    if key in ("silu", "swish") and not args:
        return (ACT_SILU, 0.0, 0.0, 0.0)
    if key == "leaky_relu" and len(args) <= 1:
        slope = _real(args[0], "leaky_relu's slope") if args else 0.01
        if math.isinf(slope):
            raise ValueError(f"activation: leaky_relu's slope must be finite, got {slope}")
        return (ACT_LEAKY, 0.0, 0.0, slope)
    if key == "clamp" and len(args) == 2:
        lo = -math.inf if args[0] is None else _real(args[0], "clamp's lo")
        hi = math.inf if args[1] is None else _real(args[1], "clamp's hi")
        if not lo <= hi:
            raise ValueError(f"activation: clamp needs lo <= hi, got ({lo}, {hi})")
        return (ACT_CLAMP, lo, hi, 0.0)
    if key in _NAMES or key == "swish":
        raise ValueError(f"activation {activation!r} has the wrong arguments: expected 'relu', 'relu6', 'silu', "
                         f"('leaky_relu', slope) or ('clamp', lo, hi)")
    raise ValueError(f"unknown activation {activation!r}: expected None, 'relu', 'relu6', 'silu', "
                     f"('leaky_relu', slope) or ('clamp', lo, hi)")


def save_stats_of(save_stats, n, what, source):
    """The backward's ``save_stats`` checked to be the forward's n statistics arrays (``what``, its ``source`` value,
    for the message); raises ValueError naming it."""
    if not isinstance(save_stats, (tuple, list)) or len(save_stats) != n:
        raise ValueError(f"save_stats must be the forward's {what} ({source}) when activation is given, got "
                         f"{type(save_stats).__name__}")
    return save_stats


def no_grad_residual_out(grad_residual_out, why="it needs residual=, got residual=None"):
    """A backward with no residual to differentiate takes no grad_residual_out (ValueError naming it and why)."""
    if grad_residual_out is not None:
        raise ValueError(f"grad_residual_out receives the residual's gradient: {why}")


def residual_backward(core, backward, grad_out, x, residual, grad_residual_out, out):
    """A backward through a residual add without an activation: backward(out) (a callable giving grad_x and the
    parameters' gradients as a tuple) plus grad_residual = grad_out, copied into grad_residual_out (or a new array).
    Every argument is checked before anything is written; grad_out is copied after the backward unless out (grad_x's
    array) overwrites it."""
    ga, dr = core.epilogue_residual_grad(grad_out, x, residual, grad_residual_out, out)
    if isinstance(out, np.ndarray) and np.may_share_memory(out, ga):
        # (grad_x over grad_out: grad_out kept first, in the new result, or aside while the backward may still raise)
        kept = dr if grad_residual_out is None else np.empty_like(ga)
        np.copyto(kept, ga)
        r = backward(out)
        if kept is not dr:
            np.copyto(dr, kept)
    else:
        r = backward(out)
        np.copyto(dr, ga)
    return tuple(r) + (dr,)
