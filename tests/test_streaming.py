"""Element-wise sweeps that touch more than bn_simd._core.stream_bytes() (32 MiB by default) write their output with
streaming (non-temporal) stores.

On every ISA, such a sweep must give exactly the values of the same sweep done on pieces small enough to be
stored normally (the arithmetic per element is the same whichever stores, strips or runs write it), and the
values the float64 oracle allows. The cases cover channels-last rows wide enough for the column strips
(C = 1296 float32, 616 float64), narrow channels-last rows with an odd C, and channels-first runs, long and
short (maps of 4, 45 and 49 elements, whose vectors straddle two or more channels). One case runs at the default
threshold; the others lower it to LOWERED (the same paths on arrays an eighth of the size).
"""
import numpy as np
import pytest

import bn_simd
from bn_simd import _core
from conftest import assert_forward_close, channel_params, make_input, use_strips

DEFAULT = 32 << 20
LOWERED = 4 << 20

# (NCHW shape, layout, dtype, strips, stream threshold); every sweep of these touches more than the threshold
# (strips: column strips forced on or off for the wide rows, see conftest.STRIP_SETTINGS)
CASES = [
    ((4, 1296, 11, 11), "NHWC", np.float32, "strips", LOWERED),   # wide rows: column strips of streamed vectors
    ((4, 1296, 11, 11), "NHWC", np.float32, "flat", LOWERED),     # the same rows as one flat streamed run
    ((2, 616, 15, 15), "NHWC", np.float64, "strips", LOWERED),    # wide float64 rows
    ((2, 616, 15, 15), "NHWC", np.float64, "flat", LOWERED),
    ((8, 7, 101, 101), "NHWC", np.float32, "cpu", LOWERED),       # narrow rows, odd C: one flat streamed run
    ((2, 4, 731, 731), "NCHW", np.float32, "cpu", DEFAULT),       # channels-first runs, at the default threshold
    ((6, 2048, 7, 7), "NCHW", np.float32, "cpu", LOWERED),        # 7x7 maps: vectors straddling two channels, blended
    ((4, 1536, 5, 9), "NCHW", np.float64, "cpu", LOWERED),        # 45 doubles a map: straddling vectors too
    ((130, 1024, 2, 2), "NCHW", np.float32, "cpu", LOWERED),      # maps shorter than a vector: several channels a vector
    ((33, 1024, 4, 4), "NCHW", np.float32, "cpu", LOWERED),       # maps of one AVX-512 vector (two AVX2 ones): none straddle
]
IDS = ["-".join(["x".join(map(str, s)), l, np.dtype(d).name, st]) for s, l, d, st, _ in CASES]


def use_threshold(nbytes):
    _core.set_stream_bytes(None if nbytes == DEFAULT else nbytes)  # (conftest restores the default after each test)
    assert _core.stream_bytes() == nbytes


def _pieces(a, layout):
    """Contiguous pieces of a (one image, or rows of one image for channels-last), each touched by a sweep
    in well under the threshold, with where each goes."""
    out = []
    for n in range(a.shape[0]):
        if layout == "NCHW":
            out.append((np.s_[n:n + 1], a[n:n + 1]))
        else:
            H = a.shape[1]
            for h0 in range(0, H, 8):
                sl = np.s_[n:n + 1, h0:min(H, h0 + 8)]
                out.append((sl, a[sl]))
    return out


def _by_pieces(fn, arrays, layout, like):
    """fn(*pieces) on matching pieces of every array in `arrays`, assembled into an array like `like`."""
    result = np.empty_like(like)
    cut = [_pieces(a, layout) for a in arrays]
    for parts in zip(*cut):
        sl = parts[0][0]
        result[sl] = fn(*[p for _, p in parts])
    return result


@pytest.mark.parametrize("nchw_shape,layout,dtype,strips,threshold", CASES, ids=IDS)
def test_streamed_normalise_equals_unstreamed_pieces_and_the_oracle(nchw_shape, layout, dtype, strips, threshold, isa):
    use_strips(strips)
    use_threshold(threshold)
    x = make_input(nchw_shape, layout, dtype, seed=60, loc=1.5, scale=2.0)
    assert 2 * x.nbytes > threshold
    C = nchw_shape[1]
    w, b = channel_params(C, dtype, seed=61)
    y, mean, invstd = bn_simd.batch_norm_forward(x, w, b, layout=layout)
    assert_forward_close(y, x, w, b, layout=layout)
    var = (1.0 / invstd.astype(np.float64)) ** 2 - 1e-5
    full = bn_simd.normalize(x, mean, var, w, b, layout=layout)
    pieces = _by_pieces(lambda xp: bn_simd.normalize(xp, mean, var, w, b, layout=layout), [x], layout, x)
    assert max(p.nbytes for _, p in _pieces(x, layout)) * 2 < threshold
    np.testing.assert_array_equal(full, pieces)


@pytest.mark.parametrize("nchw_shape,layout,dtype,strips,threshold", CASES, ids=IDS)
def test_streamed_backward_apply_equals_unstreamed_pieces(nchw_shape, layout, dtype, strips, threshold, isa):
    use_strips(strips)
    use_threshold(threshold)
    x = make_input(nchw_shape, layout, dtype, seed=62, loc=-2.0, scale=3.0)
    dy = make_input(nchw_shape, layout, dtype, seed=63)
    assert 3 * x.nbytes > threshold
    C = nchw_shape[1]
    rng = np.random.default_rng(64)
    m, a, b, d = (rng.standard_normal(C).astype(dtype) for _ in range(4))
    full = bn_simd.backward_apply(dy, x, m, a, b, d, layout=layout)
    pieces = _by_pieces(lambda dp, xp: bn_simd.backward_apply(dp, xp, m, a, b, d, layout=layout), [dy, x], layout, x)
    assert max(p.nbytes for _, p in _pieces(x, layout)) * 3 < threshold
    np.testing.assert_array_equal(full, pieces)
    # and the formula, in float64, within a few roundings of the inputs' magnitude
    c_axis = 1 if layout == "NCHW" else x.ndim - 1
    shape = [1] * x.ndim
    shape[c_axis] = C
    m64, a64, b64, d64 = (v.astype(np.float64).reshape(shape) for v in (m, a, b, d))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    expected = a64 * dy64 + b64 * (x64 - m64) + d64
    scale = np.abs(a64 * dy64) + np.abs(b64 * (x64 - m64)) + np.abs(d64) + np.abs(b64 * m64)
    assert np.all(np.abs(full - expected) <= 8 * np.finfo(dtype).eps * scale)
