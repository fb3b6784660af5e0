"""bfloat16 as tagged uint16 (bn_simd._args.BF16_BITS), the form bn_simd.torch hands torch.bfloat16 memory over in:
NumPy only, so that the sanitizer step runs it (it stubs PyTorch out).

Arrays of that exact dtype are bfloat16 data, outputs and per-channel arrays (widened exactly, stored rounded once
from float64); plain uint16 stays refused. With ml_dtypes installed, every result has the bits of the same call on
ml_dtypes.bfloat16 arrays of the same memory.
"""
import numpy as np
import pytest

import bn_simd
from bn_simd._args import BF16_BITS


def bits_of(a32):
    """float32 values exactly representable in bfloat16 (the top halves) as BF16_BITS."""
    u = np.ascontiguousarray(a32, np.float32).view(np.uint32)
    assert not (u & 0xFFFF).any()
    return (u >> 16).astype(np.uint16).view(BF16_BITS)


def widen(b):
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def sample(shape, seed, scale=3.0, loc=1.0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale + loc
    return (x.view(np.uint32) & 0xFFFF0000).view(np.float32)  # (truncated to bfloat16's precision)


def test_tagged_uint16_is_bfloat16_data_and_plain_uint16_is_refused():
    x32 = sample((4, 6, 5, 5), 1)
    w32, b32 = sample((6,), 2, 0.5, 1.0), sample((6,), 3, 0.5, 0.0)
    x = bits_of(x32)
    y, mean, invstd = bn_simd.batch_norm_forward(x, bits_of(w32), bits_of(b32))
    assert y.dtype is BF16_BITS and mean.dtype == invstd.dtype == np.float32
    # the weights read exactly: the bits of the same call with their float32 values
    assert np.array_equal(y.view(np.uint16), bn_simd.batch_norm_forward(x, w32, b32)[0].view(np.uint16))
    ref = (x32 - x32.mean((0, 2, 3), keepdims=True)) / np.sqrt(x32.var((0, 2, 3), keepdims=True) + 1e-5)
    ref = ref * w32[:, None, None] + b32[:, None, None]
    assert np.all(np.abs(widen(y) - ref) <= np.abs(ref) * 2.0 ** -8 + 1e-6)
    with pytest.raises(TypeError, match="x must have dtype"):
        bn_simd.batch_norm(x.view(np.uint16), None, None, training=True)
    with pytest.raises(TypeError, match="weight"):
        bn_simd.batch_norm(x, None, None, w32.view(np.uint16)[:6], training=True)


def test_running_statistics_and_parameter_gradients_in_tagged_uint16_are_rounded_once():
    x = bits_of(sample((8, 3, 7), 4))
    rm, rv = bits_of(np.zeros(3, np.float32)), bits_of(np.ones(3, np.float32))
    rm32, rv32 = np.zeros(3), np.ones(3)
    bn_simd.batch_norm(x, rm, rv, training=True, momentum=0.3)
    bn_simd.batch_norm(x, rm32, rv32, training=True, momentum=0.3)
    assert rm.dtype is BF16_BITS
    # one rounding of the float64 update: within half a bfloat16 ulp of it
    for got, want in ((rm, rm32), (rv, rv32)):
        assert np.all(np.abs(widen(got) - want) <= np.abs(want) * 2.0 ** -8 + 1e-30)
    w = bits_of(sample((3,), 5, 0.5, 1.0))
    _, m, s = bn_simd.batch_norm_forward(x, w)
    gx, gw, gb = bn_simd.batch_norm_backward(x, x, m, s, w)
    assert gx.dtype is BF16_BITS and gw.dtype is BF16_BITS and gb.dtype is BF16_BITS
    _, gw32, gb32 = bn_simd.batch_norm_backward(x, x, m, s, widen(w).astype(np.float64))
    assert np.all(np.abs(widen(gw) - gw32) <= np.abs(gw32) * 2.0 ** -8 + 1e-30)
    assert np.all(np.abs(widen(gb) - gb32) <= np.abs(gb32) * 2.0 ** -8 + 1e-30)


def test_tagged_uint16_gives_the_bits_of_ml_dtypes_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf = np.dtype(ml_dtypes.bfloat16)
    x = bits_of(sample((3, 8, 6, 5), 6))
    w = bits_of(sample((8,), 7, 0.5, 1.0))
    lw = bits_of(sample((30,), 8, 0.5, 1.0))
    calls = [lambda a, p, q: bn_simd.batch_norm(a, None, None, p, training=True),
             lambda a, p, q: bn_simd.group_norm(a, 4, p, p),
             lambda a, p, q: bn_simd.layer_norm(a.reshape(3, 8, 30), 30, q, q),
             lambda a, p, q: bn_simd.rms_norm(a.reshape(3, 8, 30), 30, q)]
    for k, call in enumerate(calls):
        ours = call(x, w, lw)
        theirs = call(x.view(np.uint16).view(bf), w.view(np.uint16).view(bf), lw.view(np.uint16).view(bf))
        assert ours.dtype is BF16_BITS and theirs.dtype == bf
        assert np.array_equal(ours.view(np.uint16), theirs.view(np.uint16)), k
