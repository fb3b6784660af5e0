"""Error bounds of the library's results against the float64 oracle (oracle.py), derived from the dtype and the
reduction length, and the assertions that apply them.

A bound is a sum of units times magnitudes: the units (a Tolerance: the relative error of one element-wise step in
the data's dtype, of a float64 sum of n terms, and one rounding to the data's dtype) depend only on the dtype and n;
the magnitudes (the sizes of the terms an output is made of) come from the oracle. Nothing here imports bn_simd
or pytest, so .ci/valgrind_cases.py can use it under plain Python.
"""
import math
from dataclasses import dataclass

import numpy as np

import oracle as ref

EPS64 = float(np.finfo(np.float64).eps)


def eps_of(dtype):
    return float(np.finfo(dtype).eps)


def reduction_tol(n):
    """Relative error of a float64 sum of n terms, as a fraction of the sum of their absolute values.

    Recursive summation of m terms errs by at most (m - 1) u sum|t| (u = eps64 / 2); the kernels split a
    reduction into SIMD lanes and fixed chunks, so the longest chain of additions is far below n, and
    rounding errors of independent terms add like a random walk. 8 (sqrt(n) + 1) eps64 is a generous
    bound of that walk; for float32 data it stays far below one float32 ulp up to n ~ 1e12.
    """
    return 8.0 * (math.sqrt(max(n, 1)) + 1.0) * EPS64


def apply_tol(dtype):
    """Relative error of the element-wise step y = (x - m) a + b computed in `dtype`.

    One rounding each for x - m, a, b, the product and the sum (the product and sum fuse with FMA), each
    at most u = eps / 2 of the magnitude of its result: about 2.5 eps of |w xhat| + |bias| + |y|. 4 eps
    of |w| (1 + |xhat|) + |bias| bounds it with margin.
    """
    return 4.0 * eps_of(dtype)


@dataclass(frozen=True)
class Tolerance:
    """The units of error of a call on data of one dtype whose statistics sum n values each.

    elementwise: relative error of an element-wise step in the data's dtype (apply_tol);
    reduction: relative error of a float64 sum of n terms, of the sum of their magnitudes (reduction_tol);
    rounding: one rounding of a float64 result to the data's dtype (eps, twice the half-ulp it can cost).
    """
    elementwise: float
    reduction: float
    rounding: float


def tolerance(dtype, n):
    """The Tolerance of the normalization kernels: element-wise steps in `dtype`, statistics summed in float64."""
    return Tolerance(apply_tol(dtype), reduction_tol(n), eps_of(dtype))


def stat_tol(n, dtype):
    """Relative bound for a per-channel statistic computed in float64 and returned in `dtype`."""
    return reduction_tol(n) + eps_of(dtype)


def forward_bound(x, dtype, n, weight=None, bias=None, eps=1e-5, layout="NCHW", mean=None, var=None,
                  batch_stats=True, tol=None):
    """Element-wise bound on |y - y_ref| for a normalised output.

    y = w xhat + b with xhat = (x - mean) / sqrt(var + eps). Two sources of error:
      - the element-wise step in `dtype`: apply_tol(dtype) * (|w| (1 + |xhat|) + |b|);
      - batch statistics summed in float64 (batch_stats=True): an error dm in the mean moves y by
        |w| dm / std, and dm is at most reduction_tol(n) * mean|x| (a sum of n values of size ~|x|);
        a relative error dv of the variance (a sum of n positive squares: reduction_tol(n)) moves it by
        |w| |xhat| dv / 2. Together: |w| reduction_tol(n) (mean|x| / std + |xhat|).
    Running statistics (batch_stats=False) are exact inputs, so only the first term remains.
    tol: the units (default tolerance(dtype, n)).
    """
    tol = tol or tolerance(dtype, n)
    shape = np.shape(x)
    C = ref.num_channels(shape, layout)
    if mean is None or var is None:
        mean, var, _ = ref.stats(x, layout)
    mean = ref.per_channel(mean, C, 0.0)
    var = ref.per_channel(var, C, 1.0)
    w = np.abs(ref.per_channel(weight, C, 1.0))
    b = np.abs(ref.per_channel(bias, C, 0.0))
    xhat = np.abs(ref.to_cn(ref.normalize(x, mean, var, None, None, eps, layout), layout))
    bound = tol.elementwise * (w[:, None] * (1.0 + xhat) + b[:, None])
    if batch_stats:
        cond = ref.mean_abs(x, layout) / np.sqrt(var + eps)
        bound = bound + w[:, None] * tol.reduction * (cond[:, None] + xhat)
    return ref.from_cn(bound, shape, layout)


def backward_bounds(dy, x, mean, inv_std, weight=None, layout="NCHW", training=True, dtype=np.float32,
                    batch_stats=False, eps=1e-5, tol=None):
    """Bounds on the errors of (dx, dw, db) against ref.backward, given the same saved statistics.

    dw and db are float64 sums cast to the output dtype: reduction_tol(n) of the sum of |terms|, plus
    eps |result| for the final rounding (twice the half-ulp it can cost). dx = a dy + b (x - m) + d is computed in
    `dtype` from coefficients rounded to `dtype`: apply_tol of the sum of the magnitudes of its terms, plus the sums'
    errors carried into the coefficients b and d (w s xhat / n and w s / n times the sums' bounds).

    batch_stats=True: the library used its own estimate of the batch statistics of x (a layer's backward after a
    training forward) while mean and inv_std are the oracle's. Its mean errs by dm <= reduction_tol(n) mean|x| and
    its invstd by a relative rho <= 2 reduction_tol(n) (half the variance's 4 reduction_tol(n)), so xhat errs by
    e = reduction_tol(n) (2 |xhat| + cond), cond = mean|x| s; dw by sum |dy| e; and dx = w s (dy - db / n - xhat dw / n)
    by |w s| (rho (|dy| + |db| / n + |xhat dw| / n) + e |dw| / n + |xhat| |d dw| / n).
    tol: the units (default tolerance(dtype, n)).
    """
    n = ref.reduction_size(np.shape(x), layout)
    C = ref.num_channels(np.shape(x), layout)
    tol = tol or tolerance(dtype, n)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, mean, inv_std, weight, layout, training)
    dx_scale, dw_scale, db_scale = ref.backward_magnitudes(dy, x, mean, inv_std, weight, layout, training)
    dw_bound = tol.reduction * dw_scale + tol.rounding * np.abs(dw_ref)
    db_bound = tol.reduction * db_scale + tol.rounding * np.abs(db_ref)
    dx_bound = tol.elementwise * ref.to_cn(dx_scale, layout)
    if training and n:
        s = ref.per_channel(inv_std, C, 1.0)
        ws = np.abs(ref.per_channel(weight, C, 1.0) * s)
        xhat = np.abs(ref.to_cn(x, layout) - ref.per_channel(mean, C, 0.0)[:, None]) * s[:, None]
        dx_bound = dx_bound + (ws / n)[:, None] * (tol.reduction * (db_scale[:, None] + xhat * dw_scale[:, None]))
        if batch_stats:
            rt = tol.reduction
            cond = (ref.mean_abs(x, layout) * s)[:, None]
            gabs = np.abs(ref.to_cn(dy, layout))
            adw, adb = np.abs(dw_ref)[:, None], np.abs(db_ref)[:, None]
            ddw = rt * (2.0 * dw_scale + cond[:, 0] * db_scale)
            dx_bound = dx_bound + ws[:, None] * (
                2.0 * rt * (gabs + adb / n + xhat * adw / n) + rt * (2.0 * xhat + cond) * adw / n
                + xhat * ddw[:, None] / n)
            dw_bound = dw_bound + ddw
    return ref.from_cn(dx_bound, np.shape(x), layout), dw_bound, db_bound



def subnormal_spacing(dtype):
    """The spacing of `dtype`'s subnormal numbers: what a rounding to it can cost below its smallest normal number,
    however small the result (float16's is 6e-8: the gradients of a masked activation reach it)."""
    return float(np.finfo(dtype).smallest_subnormal)


SILU_CURVATURE = 0.5  # max |silu''(u)|, reached at u = 0: silu' moves by at most half of u's error


def compute_dtype(dtype):
    """The kernels' compute type for data of `dtype`: float32 for the 16-bit types, else dtype itself."""
    return np.dtype(np.float32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)


def act_backward_bound(act, u, dz, du, u_bound, dtype):
    """Bound on the error of du = dz act'(u) (oracle.act_backward) computed by the library in the compute type of
    `dtype` from its own u, within u_bound of the oracle's u, and rounded to the data's `dtype`.

    relu: du is dz or 0, selected (no rounding) (leaky_relu, relu6 and clamp: also a multiplication and a
    rounding); where |u| <= u_bound the library's u may lie across the kink, and the bound there is the jump,
    |dz| (0 elsewhere). silu: act'(u) = s (1 + u (1 - s)) moves by at most SILU_CURVATURE u_bound; computing it
    (s from an exp of a few ulp, then three operations) errs by a few roundings of the size of its terms, s (1 +
    |u|): 8 eps of the compute type of that; and du is rounded once to `dtype`: eps |du|, or its subnormal
    spacing. (NaN where u is NaN: the oracle's du is NaN there too.)"""
    e, ec = eps_of(dtype), eps_of(compute_dtype(dtype))
    u, dz = np.asarray(u, np.float64), np.abs(np.asarray(dz, np.float64))
    if act == "relu":
        return np.where(np.abs(u) <= u_bound, dz, 0.0)
    # the piecewise-linear others: the jump of act' where the library's u may lie across a kink, plus dz a (leaky:
    # one multiplication in the compute type) rounded to the data's dtype
    kinks = {"relu6": ((0.0, 1.0), (6.0, 1.0))}.get(act) if isinstance(act, str) else (
        ((0.0, abs(1.0 - act[1])),) if act[0] == "leaky_relu" else ((act[1], 1.0), (act[2], 1.0)))
    if kinks is not None:
        jump = sum(np.where(np.abs(u - k) <= u_bound, dz * j, 0.0) for k, j in kinks)
        return jump + (e + ec) * np.abs(du) + subnormal_spacing(dtype)
    if act == "silu":
        s = 1.0 / (1.0 + np.exp(-u))
        return (dz * (SILU_CURVATURE * u_bound + 8.0 * ec * s * (1.0 + np.abs(u))) + e * np.abs(du)
                + subnormal_spacing(dtype))
    raise ValueError(f"act_backward_bound: no bound for activation {act!r}")

def assert_within(actual, expected, bound, what="value"):
    """|actual - expected| <= bound element-wise (bound broadcasts), with a useful message on failure."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), err.shape)
    bad = ~(err <= bound)  # NaN counts as a failure
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / np.where(bound > 0, bound, np.inf), -1)), err.shape) \
            if err.ndim else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements out of bound; e.g. at {tuple(int(k) for k in i)}: "
            f"got {actual[i]!r}, expected {expected[i]!r}, |diff| {err[i]:.3g} > bound {bound[i]:.3g}")


def assert_ulp_close(a, b, scale, ulps, dtype, what="value"):
    """|a - b| <= ulps * spacing(scale) in `dtype`: two implementations that round differently."""
    spacing = np.spacing(np.abs(np.asarray(scale, dtype=dtype))).astype(np.float64)
    assert_within(a, b, ulps * spacing, what)
