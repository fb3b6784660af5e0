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


def _narrowing_cases():
    """(name, call) pairs of bfloat16 calls whose outputs are narrowed from float32: eval, fused epilogues, training
    forward and backward of batch norm in both layouts, layer and group norm. Channel 0's weight is a float32
    subnormal, so its outputs are bfloat16 subnormals, beside normal outputs, NaN and Inf in other channels (in one
    vector, channels-last)."""
    rng = np.random.default_rng(11)
    C = 20
    x32 = sample((3, C, 9, 7), 12)
    x32[1, 3, 2, :4] = [np.nan, np.inf, -np.inf, 0.0]
    w32 = sample((C,), 13, 0.5, 1.0)
    w32[0], w32[5] = 1e-39, -3e-40
    b32 = np.zeros(C, np.float32)
    b32[7:] = sample((C - 7,), 14, 0.5, 0.0)
    rm, rv = np.zeros(C, np.float32), rng.uniform(0.5, 2.0, C).astype(np.float32)
    x, xl = bits_of(x32), bits_of(np.ascontiguousarray(x32.transpose(0, 2, 3, 1)))
    dy = bits_of(sample(x32.shape, 15))
    rows = bits_of(sample((13, 37), 16))
    w37 = sample((37,), 17, 0.5, 1.0)
    w37[:3] = 1e-39
    cases = []
    for lay, xx in (("NCHW", x), ("NHWC", xl)):
        for act in (None, "relu", "silu", ("leaky_relu", 0.2)):
            cases.append((f"eval {lay} {act}", lambda xx=xx, lay=lay, act=act: bn_simd.batch_norm(
                xx, rm, rv, w32, b32, layout=lay, activation=act)))
        cases.append((f"training {lay}", lambda xx=xx, lay=lay: bn_simd.batch_norm_forward(
            xx, w32, b32, layout=lay)[0]))
    _, m, s = bn_simd.batch_norm_forward(x, w32, b32)
    cases.append(("backward", lambda: bn_simd.batch_norm_backward(dy, x, m, s, w32)[0]))
    cases.append(("layer norm", lambda: bn_simd.layer_norm(rows, 37, w37, None)))
    _, lm, lr = bn_simd.layer_norm_forward(rows, 37, w37)
    cases.append(("layer norm backward", lambda: bn_simd.layer_norm_backward(rows, rows, lm, lr, 37, w37)[0]))
    cases.append(("group norm", lambda: bn_simd.group_norm(x, 4, w32, b32)))
    return cases


def test_avx512_bf16_narrowing_gives_the_integer_roundings_bits():
    """Where the CPU has AVX512-BF16, the AVX-512 kernels narrow with vcvtneps2bf16, which flushes subnormal inputs:
    the vectors holding one take the integer rounding. Every output's bits are those of the integer rounding (off),
    subnormal outputs kept."""
    from bn_simd import _core
    if not _core.have_avx512bf16():
        pytest.skip("this CPU lacks AVX512-BF16 (the integer rounding is the only one; tests/c checks it)")
    assert _core.bf16_native()  # (the default where the CPU has it)
    try:
        with bn_simd.Context(isa="avx512", num_threads=2):
            for name, call in _narrowing_cases():
                assert _core.set_bf16_native(True)
                native = call().view(np.uint16).copy()
                assert not _core.set_bf16_native(False)
                integer = call().view(np.uint16)
                assert np.array_equal(native, integer), name
                if name.startswith("eval NCHW None"):
                    sub = native.reshape(3, 20, -1)[:, 0]
                    assert ((sub & 0x7F80) == 0).all() and (sub & 0x7F).any(), "channel 0 holds subnormals"
    finally:
        _core.set_bf16_native(True)


def test_the_environment_turns_the_avx512_bf16_narrowing_off(tmp_path):
    import subprocess
    import sys
    code = "import bn_simd; print(bn_simd.show_config()['avx512bf16_narrowing'])"
    for value, want in (("0", "False"), ("auto", None)):
        env = dict(__import__("os").environ, BN_SIMD_AVX512BF16=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        from bn_simd import _core
        assert out.stdout.strip() == (want or str(_core.have_avx512bf16()))
    env = dict(__import__("os").environ, BN_SIMD_AVX512BF16="yes")
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "BN_SIMD_AVX512BF16 must be 0, 1 or auto" in bad.stderr
