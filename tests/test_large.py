"""Tensors of more than 2**31 elements (slow: run with --runslow; about 9 GB of memory per case).

Each case fills one float32 array of > 2**31 elements with a periodic pattern (period 5, so chunk boundaries never
line up with it) whose exact per-channel mean and variance follow from counting (fractions.Fraction), then runs, in
place (out=x) so that only the one array is ever allocated:

    batch_stats                      -> the exact mean / variance
    batch_norm_backward(x, x, ...)   -> grad_out = x: sum(dy) = n mean, sum(dy (x - mean)) = n var; grad_x per value
    batch_norm(training=True)        -> y per value, running statistics
    batch_norm(training=False)       -> y per value from the running statistics

and checks every output element (in chunks, against the 5 expected values of its channel), the elements around
index 2**31 and the last ones. Cases: one channel of 2**31 + 3 values (NCHW), (2, 3, 357913942) NCHW (each channel
1.4e9 values, offsets beyond 2**31), and channels-last (715827883, 3).
"""
import math
import resource
import time
from fractions import Fraction

import numpy as np
import pytest

import bn_simd
from conftest import apply_tol, reduction_tol

pytestmark = pytest.mark.slow

F32 = np.float32
PATTERN = np.array([-1.5, 0.25, 2.0, 3.5, -0.75])       # exact in float32
OFFSETS = np.array([0.0, 1.25, -37.5])                  # channel c holds PATTERN + OFFSETS[c]
P = len(PATTERN)
EPS = 1e-5
CHUNK = P * (1 << 21)                                   # elements (a multiple of the period) checked at a time


def _values(C):
    """(P, C) float64: the P values of each channel (all exact float32 numbers)."""
    v = PATTERN[:, None] + OFFSETS[None, :C]
    assert (v.astype(F32) == v).all()
    return v


def _fill(v3, vals, layout):
    """Write the pattern into the canonical (outer, C, inner) view: along inner (NCHW) or along rows (NHWC)."""
    outer, C, inner = v3.shape
    if layout == "NCHW":
        full = inner // P * P
        for r in range(outer):
            for c in range(C):
                run = v3[r, c]
                run[:full].reshape(-1, P)[:] = vals[:, c].astype(F32)
                run[full:] = vals[: inner - full, c].astype(F32)
    else:
        rows = v3.reshape(outer, C)
        full = outer // P * P
        rows[:full].reshape(-1, P, C)[:] = vals.astype(F32)
        rows[full:] = vals[: outer - full].astype(F32)


def _counts(v3, layout):
    """How many times each of the P values occurs in one channel (the same for every channel)."""
    outer, C, inner = v3.shape
    length, times = (inner, outer) if layout == "NCHW" else (outer, 1)
    return [times * (length // P + (1 if k < length % P else 0)) for k in range(P)]


def _exact_stats(vals, counts):
    """Per channel: exact mean, biased variance, mean |x| (floats from Fractions)."""
    n = sum(counts)
    out = []
    for c in range(vals.shape[1]):
        v = [Fraction(float(a)) for a in vals[:, c]]
        mean = sum(k * a for k, a in zip(counts, v)) / n
        var = sum(k * (a - mean) ** 2 for k, a in zip(counts, v)) / n
        mean_abs = sum(k * abs(a) for k, a in zip(counts, v)) / n
        out.append((float(mean), float(var), float(mean_abs)))
    return np.array(out).T, n


def _check_all(v3, layout, expected, bound, what):
    """Every element of v3 (canonical view) against expected[k, c] within bound[k, c], chunk by chunk."""
    outer, C, inner = v3.shape
    assert np.isfinite(expected).all() and (bound > 0).all()
    if layout == "NCHW":
        full = inner // P * P
        for r in range(outer):
            for c in range(C):
                run = v3[r, c]
                for j in range(0, full, CHUNK):
                    block = run[j: min(j + CHUNK, full)].reshape(-1, P)
                    _assert_block(block, expected[:, c], bound[:, c], f"{what}[{r}, {c}, {j}:]")
                _assert_block(run[full:][None, :], expected[: inner - full, c], bound[: inner - full, c],
                              f"{what}[{r}, {c}, tail]")
    else:
        rows = v3.reshape(outer, C)
        full = outer // P * P
        step = CHUNK // C // P * P
        for j in range(0, full, step):
            block = rows[j: min(j + step, full)].reshape(-1, P, C)
            _assert_block(block, expected, bound, f"{what}[rows {j}:]")
        _assert_block(rows[full:], expected[: outer - full], bound[: outer - full], f"{what}[tail rows]")


def _assert_block(block, expected, bound, what):
    err = np.abs(block.astype(np.float64) - expected)
    bad = ~(err <= bound)  # NaN fails
    if bad.any():
        i = np.unravel_index(np.argmax(bad), bad.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} elements out of bound, e.g. {block[i]!r} vs "
                             f"{np.broadcast_to(expected, block.shape)[i]!r} (bound {np.broadcast_to(bound, block.shape)[i]:.3g})")


def _samples(x_flat, layout, shape, vals_expected, what):
    """The elements around 2**31 and the last ones, one by one (flat index -> pattern position, channel)."""
    n_total = x_flat.size
    for i in sorted(set(range(2 ** 31 - 3, min(2 ** 31 + 3, n_total))) | set(range(n_total - 7, n_total))):
        if layout == "NCHW":
            N, C, inner = shape[0], shape[1], math.prod(shape[2:])
            c, k = (i // inner) % C, (i % inner) % P
        else:
            C = shape[-1]
            c, k = i % C, (i // C) % P
        exp, bnd = vals_expected
        assert abs(float(x_flat[i]) - exp[k, c]) <= bnd[k, c], f"{what} at flat index {i}"


CASES = [
    pytest.param("NCHW", (1, 1, 2 ** 31 + 3), id="NCHW-one-channel-2^31+3"),
    pytest.param("NCHW", (2, 3, 357913942), id="NCHW-2x3x357913942"),
    pytest.param("NHWC", (715827883, 3), id="NHWC-715827883x3"),
]


@pytest.mark.parametrize("layout,shape", CASES)
def test_more_than_2_31_elements_forward_eval_backward_in_place(layout, shape, record_property):
    assert math.prod(shape) > 2 ** 31
    t0 = time.perf_counter()
    _run(layout, shape)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    record_property("seconds", round(time.perf_counter() - t0, 1))
    record_property("peak_rss_gib", round(peak_gib, 2))
    print(f"\n{layout} {shape}: {time.perf_counter() - t0:.1f} s, peak RSS of the process {peak_gib:.2f} GiB")


def _run(layout, shape):
    """The whole check for one shape (any size: the same code is exercised on small shapes when debugging)."""
    size = math.prod(shape)
    C = shape[1] if layout == "NCHW" else shape[-1]
    vals = _values(C)
    try:
        x = np.empty(shape, F32)
    except MemoryError:
        pytest.skip(f"needs {size * 4 / 2 ** 30:.1f} GiB for one float32 array")
    dims = (shape[0], C, math.prod(shape[2:])) if layout == "NCHW" else (math.prod(shape[:-1]), C, 1)
    v3 = x.reshape(dims)
    flat = x.reshape(-1)
    (mean, var, mean_abs), n = _exact_stats(vals, _counts(v3, layout))
    std = np.sqrt(var + EPS)
    rt = reduction_tol(n)
    w = np.linspace(0.5, 2.0, C) * np.array([1.0, -1.0, 1.0])[:C]
    b = np.linspace(-1.0, 1.0, C)

    # ---- statistics ----
    _fill(v3, vals, layout)
    m_got, v_got = bn_simd.batch_stats(x, layout=layout)
    np.testing.assert_array_less(np.abs(m_got - mean), rt * mean_abs + 1e-300, err_msg="batch_stats mean")
    np.testing.assert_array_less(np.abs(v_got - var), 4 * rt * var, err_msg="batch_stats var")

    # ---- backward with grad_out = x, in place: any invstd s is a valid input; s = 0.5 / sqrt(var) gives
    # grad_x = w s (x - mean) (1 - s^2 var) = 0.75 w s (x - mean), sum dy = n mean, sum dy (x - mean) = n var ----
    s = 0.5 / np.sqrt(var)
    xhat = (vals - mean) * s
    dx_exp = w * s * (vals - mean) * (1 - s * s * var)
    db_exp, dw_exp = n * mean, s * n * var
    db_scale = n * mean_abs
    dw_scale = s * np.array([sum(k * abs(a) * abs(a - mean[c]) for k, a in zip(_counts(v3, layout), vals[:, c]))
                             for c in range(C)])
    dx_bound = (apply_tol(F32) * np.abs(w * s) * (np.abs(vals) + np.abs(db_exp) / n + np.abs(xhat * dw_exp) / n)
                + np.abs(w * s) / n * rt * (db_scale + np.abs(xhat) * dw_scale))
    gx, gw, gb = bn_simd.batch_norm_backward(x, x, mean, s, w, layout=layout, out=x)
    assert gx is x
    np.testing.assert_array_less(np.abs(gb - db_exp), rt * db_scale + 1e-300, err_msg="grad_bias")
    np.testing.assert_array_less(np.abs(gw - dw_exp), rt * dw_scale + 1e-300, err_msg="grad_weight")
    _check_all(v3, layout, dx_exp, dx_bound, "grad_x")
    _samples(flat, layout, shape, (dx_exp, dx_bound), "grad_x")

    # ---- training forward, in place, running statistics ----
    _fill(v3, vals, layout)
    rm, rv = np.zeros(C), np.ones(C)
    y = bn_simd.batch_norm(x, rm, rv, w, b, training=True, momentum=0.5, eps=EPS, layout=layout, out=x)
    assert y is x
    xhat = (vals - mean) / std
    y_exp = w * xhat + b
    y_bound = apply_tol(F32) * (np.abs(w) * (1 + np.abs(xhat)) + np.abs(b)) + np.abs(w) * rt * (mean_abs / std +
                                                                                                np.abs(xhat))
    _check_all(v3, layout, y_exp, y_bound, "y (training)")
    _samples(flat, layout, shape, (y_exp, y_bound), "y (training)")
    rm_exp, rv_exp = 0.5 * mean, 0.5 + 0.5 * var * n / (n - 1)
    np.testing.assert_array_less(np.abs(rm - rm_exp), rt * (mean_abs + 1), err_msg="running_mean")
    np.testing.assert_array_less(np.abs(rv - rv_exp), 4 * rt * rv_exp, err_msg="running_var")

    # ---- eval, in place, with the running statistics ----
    _fill(v3, vals, layout)
    z = bn_simd.batch_norm(x, rm, rv, w, b, training=False, eps=EPS, layout=layout, out=x)
    assert z is x
    zhat = (vals - rm) / np.sqrt(rv + EPS)
    z_exp = w * zhat + b
    z_bound = apply_tol(F32) * (np.abs(w) * (1 + np.abs(zhat)) + np.abs(b))
    _check_all(v3, layout, z_exp, z_bound, "y (eval)")
    _samples(flat, layout, shape, (z_exp, z_bound), "y (eval)")
