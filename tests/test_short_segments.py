"""Channels-first maps of a few vectors (3x3, 2x2, 7x7, 10x10, 14x14 maps) are swept as one flat run of vectors, a
vector straddling two channels taking each lane's coefficients from its own channel (kernels without masked tails),
and the backward sums of group norm's runs form four channels' cross-lane sums at once. None of that may change a
value: each channel must get exactly the bits it gets when it is swept alone (a run of its own, where its elements
sit at other lanes), on every ISA, in every storage dtype, at 1 and 2 threads, and the values the float64 oracle
allows."""
import numpy as np
import pytest

import bn_simd
from conftest import assert_forward_close, assert_same_bits

try:
    import ml_dtypes
    HALF = [np.float16, ml_dtypes.bfloat16]
except ImportError:  # (bfloat16 arrays need it; float16 runs without)
    HALF = [np.float16]

MAPS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 25, 49, 100, 127, 196, 225]
N, C = 5, 11


def _data(S, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, C, S)) * 2.0 + 1.5).astype(dtype)
    dy = rng.standard_normal((N, C, S)).astype(dtype)
    w = rng.uniform(0.5, 2.0, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    return x, dy, w, b


def _alone(a, c):
    return np.ascontiguousarray(a[:, c:c + 1])


@pytest.mark.parametrize("S", MAPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64] + HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_each_channel_of_a_short_map_has_the_bits_it_has_alone(S, dtype, nthreads, isa, threads):
    threads(nthreads)
    x, dy, w, b = _data(S, dtype, seed=S)
    rng = np.random.default_rng(100 + S)
    mean = rng.standard_normal(C).astype(np.float32)
    var = rng.uniform(0.5, 2.0, C).astype(np.float32)
    y = bn_simd.normalize(x, mean, var, w, b)
    for c in range(C):
        got = bn_simd.normalize(_alone(x, c), mean[c:c + 1], var[c:c + 1], w[c:c + 1], b[c:c + 1])
        assert_same_bits(got, _alone(y, c), f"normalize, c={c}")
    if S == 1:
        return  # (instance norm needs more than one element a map, as PyTorch's)
    yi, mu, rstd = bn_simd.instance_norm_forward(x, w, b)
    gx, gw, gb = bn_simd.instance_norm_backward(dy, x, mu, rstd, w)
    yr = bn_simd.instance_norm(x, weight=w, bias=b, activation="relu", residual=dy)
    # (instance norm of (N, C, S) is batch norm of (1, N C, S))
    assert_forward_close(yi.reshape(1, N * C, S), x.reshape(1, N * C, S), np.tile(w, N), np.tile(b, N))
    for c in range(C):
        xc, dyc, wc, bc = _alone(x, c), _alone(dy, c), w[c:c + 1], b[c:c + 1]
        yc, muc, rstdc = bn_simd.instance_norm_forward(xc, wc, bc)
        assert_same_bits(yc, _alone(yi, c), f"instance norm, c={c}")
        assert_same_bits(muc, _alone(mu, c), f"instance norm mean, c={c}")
        assert_same_bits(rstdc, _alone(rstd, c), f"instance norm rstd, c={c}")
        gxc, gwc, gbc = bn_simd.instance_norm_backward(dyc, xc, muc, rstdc, wc)
        assert_same_bits(gxc, _alone(gx, c), f"instance norm grad_x, c={c}")
        assert_same_bits(gwc, gw[c:c + 1], f"instance norm grad_weight, c={c}")
        assert_same_bits(gbc, gb[c:c + 1], f"instance norm grad_bias, c={c}")
        yrc = bn_simd.instance_norm(xc, weight=wc, bias=bc, activation="relu", residual=dyc)
        assert_same_bits(yrc, _alone(yr, c), f"instance norm + residual + relu, c={c}")


@pytest.mark.parametrize("S", MAPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_dx_sweep_of_short_maps_is_each_channels_alone_and_the_formula(S, dtype, isa, threads):
    threads(2)
    x, dy, _, _ = _data(S, dtype, seed=200 + S)
    rng = np.random.default_rng(300 + S)
    m, a, bb, d = (rng.standard_normal(C).astype(dtype) for _ in range(4))
    dx = bn_simd.backward_apply(dy, x, m, a, bb, d)
    # dx = a dy + b (x - m) + d, one rounding each at most: the float64 formula within a few ulp of dtype
    ref = (a[:, None] * dy.astype(np.float64) + bb[:, None] * (x.astype(np.float64) - m[:, None]) + d[:, None])
    scale = np.abs(a[:, None] * dy) + np.abs(bb[:, None] * (x - m[:, None])) + np.abs(d[:, None])
    assert np.all(np.abs(dx - ref) <= 4 * np.finfo(dtype).eps * scale)
    for c in range(C):
        got = bn_simd.backward_apply(_alone(dy, c), _alone(x, c), m[c:c + 1], a[c:c + 1], bb[c:c + 1], d[c:c + 1])
        assert_same_bits(got, _alone(dx, c), f"backward_apply, c={c}")


@pytest.mark.parametrize("S", [2, 3, 4, 9, 49])
@pytest.mark.parametrize("dtype", [np.float32, np.float64] + HALF, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("act", [None, "relu", "relu6", ("leaky_relu", 0.2), "silu"], ids=str)
def test_group_norm_groups_of_short_maps_have_the_bits_they_have_alone_and_in_place(S, dtype, act, isa, threads):
    """Plain, and through the fused epilogues (forward with a residual, backward through the activation), in place
    over grad_out too."""
    threads(2)
    G, D = 4, 3
    rng = np.random.default_rng(400 + S)
    x = (rng.standard_normal((6, G * D, S)) * 3.0 - 1.0).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    res = rng.standard_normal(x.shape).astype(dtype) if act else None
    w = rng.uniform(0.5, 2.0, G * D).astype(np.float32)
    b = rng.standard_normal(G * D).astype(np.float32)

    def forward(xx, groups, c, rr):
        out = bn_simd.group_norm_forward(xx, groups, w[c], b[c], activation=act, residual=rr)
        return out[:3], (out[3] if act else None)

    def backward(gg, xx, m, r, st, groups, c, rr, **kw):
        fused = dict(activation=act, residual=rr, bias=b[c], save_stats=st) if act else {}
        return bn_simd.group_norm_backward(gg, xx, m, r, groups, w[c], **fused, **kw)

    (y, mean, rstd), st = forward(x, G, np.s_[:], res)
    grads = backward(dy, x, mean, rstd, st, G, np.s_[:], res)
    inplace = dy.copy()
    got = backward(inplace, x, mean, rstd, st, G, np.s_[:], res, out=inplace)
    assert got[0] is inplace
    assert_same_bits(inplace, grads[0], "grad_x in place over grad_out")
    for g in range(G):
        s_, c = np.s_[:, g * D:(g + 1) * D], np.s_[g * D:(g + 1) * D]
        xg, dyg = np.ascontiguousarray(x[s_]), np.ascontiguousarray(dy[s_])
        rg = None if res is None else np.ascontiguousarray(res[s_])
        (yg, mg, sg), stg = forward(xg, 1, c, rg)
        assert_same_bits(yg, np.ascontiguousarray(y[s_]), f"group {g}: y")
        assert_same_bits(mg[:, 0], mean[:, g], f"group {g}: mean")
        one = backward(dyg, xg, mg, sg, stg, 1, c, rg)
        assert len(one) == len(grads)
        for name, u, v in zip(("grad_x", "grad_weight", "grad_bias", "grad_residual"), one, grads):
            assert_same_bits(u, None if v is None else np.ascontiguousarray(v[s_] if v.ndim == 3 else v[c]),
                             f"group {g}: {name}")
