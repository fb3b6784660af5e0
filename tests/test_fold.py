"""bn_simd.fold_params / fold_conv / fold_linear against a float64 NumPy oracle: a convolution written here over
sliding windows (any spatial rank, groups, stride, zero padding) followed by the eval batch norm's formula, versus
the convolution with the folded weights.

Bounds: the folded weights and bias are float64 results rounded once to the weight's dtype, each by at most
eps / 2 of its magnitude, so the folded layer's output moves by at most eps * (conv(|x|, |w2|) + |b2|); both sides
are then computed in float64 (a reduction of `taps` products each: reduction_tol(taps) of their magnitudes).
"""
import fractions
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import bn_simd
from bounds import eps_of, reduction_tol

# ---- oracle ----------------------------------------------------------------------------------------------------


def conv_ref(x, w, b=None, *, groups=1, padding=0, stride=1):
    """float64 convolution (cross-correlation, as PyTorch's): x (N, C, *S), w (O, C / groups, *K), b (O,) or None;
    zero padding `padding` on every spatial side."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    d = x.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(padding, padding)] * d)
    K = w.shape[2:]
    win = sliding_window_view(xp, K, axis=tuple(range(2, 2 + d)))        # (N, C, *out, *K)
    win = win[(slice(None), slice(None)) + (slice(None, None, stride),) * d]
    N, C, O = x.shape[0], x.shape[1], w.shape[0]
    out_sp = win.shape[2:2 + d]
    patches = win.reshape(N, groups, C // groups, math.prod(out_sp), math.prod(K))
    wg = w.reshape(groups, O // groups, C // groups, math.prod(K))
    y = np.einsum("ngcpk,gock->ngop", patches, wg).reshape((N, O) + out_sp)
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape((1, O) + (1,) * d)
    return y


def bn_ref(x, mean, var, weight, bias, eps):
    """float64 eval batch norm, channels on axis 1."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    f = lambda v, d: np.full(x.shape[1], d) if v is None else np.asarray(v, np.float64)
    y = (x - f(mean, 0).reshape(shape)) / np.sqrt(f(var, 1).reshape(shape) + eps)
    return y * f(weight, 1).reshape(shape) + f(bias, 0).reshape(shape)


def to_layout(w_oi, layout):
    """A canonical (O, I, *K) weight in `layout`."""
    if layout.startswith("OI"):
        return w_oi
    if layout.endswith("IO"):
        return np.moveaxis(w_oi, (0, 1), (-1, -2))
    return np.moveaxis(w_oi, 1, -1)  # O*I


def from_layout(w, layout):
    if layout.startswith("OI"):
        return w
    if layout.endswith("IO"):
        return np.moveaxis(w, (-1, -2), (0, 1))
    return np.moveaxis(w, -1, 1)


def bn_params(rng, C, affine=True):
    mean = rng.standard_normal(C) * 2.0
    var = rng.uniform(0.05, 4.0, C)
    if not affine:
        return mean, var, None, None
    return mean, var, rng.uniform(-2.0, 2.0, C), rng.standard_normal(C)


def fold_bound(x, w2_oi, b2, dtype, taps, ref, groups=1, padding=0, stride=1):
    A = conv_ref(np.abs(x), np.abs(w2_oi.astype(np.float64)), np.abs(b2.astype(np.float64)), groups=groups,
                 padding=padding, stride=stride)
    return eps_of(dtype) * A + 8.0 * reduction_tol(taps) * (A + np.abs(ref))


def assert_within(got, ref, bound, what=""):
    err = np.abs(got - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"{what}: |err| {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 4, 5)}
KERNEL = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}
LAYOUT_NAMES = {"OIHW": {1: "OIW", 2: "OIHW", 3: "OIDHW"}, "HWIO": {1: "WIO", 2: "HWIO", 3: "DHWIO"},
                "OHWI": {1: "OWI", 2: "OHWI", 3: "ODHWI"}}

# ---- fold_params -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_params_is_the_eval_affine_map(dtype, affine):
    rng = np.random.default_rng(1)
    mean, var, w, b = bn_params(rng, 12, affine)
    args = [a if a is None else a.astype(dtype) for a in (mean, var, w, b)]
    scale, shift = bn_simd.fold_params(*args, eps=1e-3)
    assert scale.dtype == dtype and shift.dtype == dtype and scale.shape == (12,)
    x = rng.standard_normal((5, 12))
    ref = bn_ref(x, *[a if a is None else a.astype(np.float64) for a in args], 1e-3)
    got = x * scale.astype(np.float64) + shift.astype(np.float64)
    bound = eps_of(dtype) * (np.abs(x * scale) + np.abs(shift)) * 2 + 1e-15 * (1 + np.abs(ref))
    assert_within(got, ref, bound, "fold_params")


def test_fold_params_dtype_argument_and_default():
    mean, var = np.zeros(3, np.float32), np.ones(3, np.float32)
    assert bn_simd.fold_params(mean, var)[0].dtype == np.float32
    assert bn_simd.fold_params(mean, var, dtype=np.float64)[0].dtype == np.float64
    assert bn_simd.fold_params([0.0, 1.0], [1, 2])[0].dtype == np.float64

# ---- fold_conv, BN after the conv --------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("layout", ["OIHW", "HWIO", "OHWI"])
@pytest.mark.parametrize("kind", ["plain", "grouped", "depthwise"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fold_conv_after_matches_conv_then_bn(rank, layout, kind, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{rank}{layout}{kind}".encode()))
    C, O, G = {"plain": (3, 5, 1), "grouped": (4, 6, 2), "depthwise": (4, 8, 4)}[kind]
    K = KERNEL[rank]
    w_oi = rng.standard_normal((O, C // G) + K).astype(dtype)
    cb = None if kind == "grouped" else rng.standard_normal(O).astype(dtype)
    mean, var, bw, bb = bn_params(rng, O, affine=kind != "depthwise")
    x = rng.standard_normal((2, C) + SPATIAL[rank])
    # stride 2 and zero padding: BN after the conv folds exactly whatever the conv does
    y = conv_ref(x, w_oi, cb, groups=G, padding=1, stride=2)
    ref = bn_ref(y, mean, var, bw, bb, 1e-4)
    name = LAYOUT_NAMES[layout][rank] if rank != 2 else layout
    w_l = to_layout(w_oi, layout)
    w_before = w_l.copy()
    w2, b2 = bn_simd.fold_conv(w_l, cb, mean, var, bw, bb, eps=1e-4, weight_layout=name, groups=G)
    assert w2.dtype == dtype and b2.dtype == dtype and w2.shape == w_l.shape and b2.shape == (O,)
    np.testing.assert_array_equal(w_l, w_before)
    w2_oi = from_layout(w2, layout)
    got = conv_ref(x, w2_oi, b2, groups=G, padding=1, stride=2)
    assert_within(got, ref, fold_bound(x, w2_oi, b2, dtype, math.prod(K) * C // G, ref, G, 1, 2), "after")


def test_fold_conv_float16_weight_stays_float16():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float16)
    w2, b2 = bn_simd.fold_conv(w, None, *bn_params(rng, 4))
    assert w2.dtype == np.float16 and b2.dtype == np.float16

# ---- fold_conv, BN before the conv -------------------------------------------------------------------------------


def _before_case(rng, G, C, O, rank=2):
    w = rng.standard_normal((O, C // G) + KERNEL[rank])
    cb = rng.standard_normal(O)
    bn = bn_params(rng, C)
    x = rng.standard_normal((2, C) + SPATIAL[rank]) * 1.5 + 0.5
    return w, cb, bn, x


@pytest.mark.parametrize("G,C,O", [(1, 3, 5), (2, 4, 6), (4, 4, 8)], ids=["plain", "grouped", "depthwise_x2"])
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("layout", ["OIHW", "HWIO"])
def test_fold_conv_before_is_exact_without_padding(G, C, O, rank, layout):
    rng = np.random.default_rng(G * 10 + rank)
    w, cb, bn, x = _before_case(rng, G, C, O, rank)
    ref = conv_ref(bn_ref(x, *bn, 1e-5), w, cb, groups=G, stride=1)
    w2, b2 = bn_simd.fold_conv(to_layout(w.astype(np.float32), layout), cb.astype(np.float32), *bn,
                               weight_layout=LAYOUT_NAMES[layout][rank], position="before", groups=G)
    w2_oi = from_layout(w2, layout)
    got = conv_ref(x, w2_oi, b2, groups=G)
    # the bias holds the sum of w * shift over every tap: its float32 rounding is against that sum's magnitude
    bound = fold_bound(x, w2_oi, b2, np.float32, math.prod(KERNEL[rank]) * C // G, ref, G)
    bound += eps_of(np.float32) * conv_ref(np.ones_like(x), np.abs(w), groups=G) * np.max(np.abs(bn[3]) + 10)
    assert_within(got, ref, bound, "before, no padding")


@pytest.mark.parametrize("G,C,O", [(1, 3, 5), (4, 4, 8)], ids=["plain", "depthwise_x2"])
def test_fold_conv_before_with_padding_differs_only_at_the_border_by_the_documented_term(G, C, O):
    """Zero padding after the BN (the original) against zero padding before it (the folded conv): the folded
    output exceeds the original by sum over the padded taps of w[o, i, k] * shift[c], and only where the
    window covers padding."""
    rng = np.random.default_rng(7 + G)
    w, cb, bn, x = _before_case(rng, G, C, O)
    ref = conv_ref(bn_ref(x, *bn, 1e-5), w, cb, groups=G, padding=1)
    w2, b2 = bn_simd.fold_conv(w, cb, *bn, position="before", groups=G)   # float64 in, float64 out
    got = conv_ref(x, w2, b2, groups=G, padding=1)
    scale, shift = bn_simd.fold_params(*bn)
    # the documented difference: a conv of the padding ring holding shift[c]
    ring = np.pad(np.zeros_like(x), [(0, 0), (0, 0), (1, 1), (1, 1)], constant_values=1.0) * shift[None, :, None,
                                                                                                     None]
    term = conv_ref(ring, w, groups=G)
    mag = conv_ref(np.abs(np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])) + 1, np.abs(w), groups=G) * 20
    tol = 64 * reduction_tol(w[0].size) * (mag + np.abs(ref))
    assert_within(got - ref, term, tol, "border term")
    border = np.ones(ref.shape[2:], bool)
    border[1:-1, 1:-1] = False
    assert np.all(np.abs(term[..., ~border]) == 0.0)                # interior: no padded tap, identical outputs
    assert np.min(np.abs(term[..., border])) > 1e-6                  # the border does differ (shift != 0 here)
    # padding the input with -shift / scale per channel (BN maps it to 0) makes the folded conv exact
    fill = (-shift / scale)[None, :, None, None]
    xp = np.pad(x - fill, [(0, 0), (0, 0), (1, 1), (1, 1)]) + fill
    assert_within(conv_ref(xp, w2, b2, groups=G), ref, tol, "-shift/scale padding")

# ---- fold_linear -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["after", "before"])
@pytest.mark.parametrize("layout", ["OI", "IO"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_linear_matches_linear_and_bn(position, layout, dtype, with_bias):
    rng = np.random.default_rng(11)
    O, I = 6, 9
    W = rng.standard_normal((O, I)).astype(dtype)
    b = rng.standard_normal(O).astype(dtype) if with_bias else None
    bn = bn_params(rng, O if position == "after" else I, affine=with_bias)
    x = rng.standard_normal((7, I))
    lin = lambda v, w, bb: v @ np.asarray(w, np.float64).T + (0 if bb is None else np.asarray(bb, np.float64))
    ref = bn_ref(lin(x, W, b), *bn, 1e-5) if position == "after" else lin(bn_ref(x, *bn, 1e-5), W, b)
    W_l = W if layout == "OI" else W.T.copy()
    W2, b2 = bn_simd.fold_linear(W_l, b, *bn, weight_layout=layout, position=position)
    assert W2.shape == W_l.shape and W2.dtype == dtype and b2.dtype == dtype and b2.shape == (O,)
    W2_oi = W2 if layout == "OI" else W2.T
    got = lin(x, W2_oi, b2)
    A = np.abs(x) @ np.abs(W2_oi.astype(np.float64)).T + np.abs(b2.astype(np.float64))
    extra = 0 if position == "after" else np.abs(W).astype(np.float64) @ (np.abs(bn[3]) + 10 if with_bias else
                                                                          np.abs(bn[0]) * 10 + 1)
    bound = eps_of(dtype) * (A + extra) + 8 * reduction_tol(I) * (A + np.abs(ref) + extra)
    assert_within(got, ref, bound, "fold_linear")

# ---- arguments ---------------------------------------------------------------------------------------------------


def _good():
    rng = np.random.default_rng(0)
    return dict(conv_weight=rng.standard_normal((4, 2, 3, 3)).astype(np.float32), conv_bias=np.zeros(4, np.float32),
                running_mean=np.zeros(4), running_var=np.ones(4), weight=np.ones(4), bias=np.zeros(4))


BAD = [
    ({"eps": 0.0}, ValueError, "eps"), ({"eps": -1.0}, ValueError, "eps"), ({"eps": float("nan")}, ValueError, "eps"),
    ({"eps": "1e-5"}, TypeError, "eps"), ({"eps": True}, TypeError, "eps"),
    ({"running_var": -np.ones(4)}, ValueError, "running_var"),
    ({"running_var": np.ones(3)}, ValueError, "running_var"),
    ({"running_mean": np.ones((4, 1))}, ValueError, "running_mean"),
    ({"running_mean": None}, TypeError, "running_mean"),
    ({"running_mean": np.array([0, np.nan, 0, 0])}, ValueError, "running_mean"),
    ({"weight": np.ones(5)}, ValueError, "weight"), ({"bias": np.array(["a"] * 4)}, TypeError, "bias"),
    ({"conv_bias": np.zeros(3)}, ValueError, "conv_bias"),
    ({"conv_weight": np.ones((4, 2, 3, 3), np.int32)}, TypeError, "conv_weight"),
    ({"conv_weight": np.ones((4, 2))}, ValueError, "conv_weight"),
    ({"conv_weight": "w"}, TypeError, "conv_weight"),
    ({"weight_layout": "NCHW"}, ValueError, "weight_layout"), ({"weight_layout": "OIW"}, ValueError, "weight_layout"),
    ({"weight_layout": 3}, ValueError, "weight_layout"),
    ({"position": "middle"}, ValueError, "position"),
    ({"groups": 0}, ValueError, "groups"), ({"groups": 3}, ValueError, "groups"),
    ({"groups": 2.0}, TypeError, "groups"),
    ({"position": "before"}, ValueError, "running_mean"),   # BN of 4 channels, conv input of 2
    ({"running_var": np.zeros(4), "eps": 1e-30, "weight": np.full(4, 1e30)}, ValueError, "overflow"),
]


@pytest.mark.parametrize("mean", ["a", b"a", True, np.array(["a", "b"])])
def test_fold_params_refuses_a_running_mean_of_no_real_number_by_its_type(mean):
    """A string or bool running_mean (fold_params takes C from it) is a TypeError, as the other arrays' (a scalar
    string was a shape error)."""
    with pytest.raises(TypeError, match="running_mean must be an array of real numbers"):
        bn_simd.fold_params(mean, np.ones(2))


@pytest.mark.parametrize("change,exc,word", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_fold_conv_refuses_bad_arguments(change, exc, word):
    args = _good()
    args.update(change)
    kw = {k: args.pop(k) for k in ("eps", "weight_layout", "position", "groups") if k in args}
    keep = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    with pytest.raises(exc, match=word):
        bn_simd.fold_conv(*args.values(), **kw)
    for k, v in keep.items():   # a failed call changes nothing
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            np.testing.assert_array_equal(args[k], v)


def test_fold_linear_and_params_refuse_bad_arguments():
    with pytest.raises(ValueError, match="W"):
        bn_simd.fold_linear(np.ones((2, 3, 4)), None, np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="weight_layout"):
        bn_simd.fold_linear(np.ones((2, 3)), None, np.zeros(2), np.ones(2), weight_layout="OIHW")
    with pytest.raises(ValueError, match="running_mean"):
        bn_simd.fold_linear(np.ones((2, 3)), None, np.zeros(2), np.ones(2), position="before")
    with pytest.raises(ValueError, match="b "):
        bn_simd.fold_linear(np.ones((2, 3)), np.ones(3), np.zeros(2), np.ones(2))
    with pytest.raises(TypeError, match="dtype"):
        bn_simd.fold_params(np.zeros(2), np.ones(2), dtype=np.int32)
    with pytest.raises(TypeError, match="running_var"):
        bn_simd.fold_params(np.zeros(2), None)


def test_fold_conv_refuses_a_tensor_that_requires_grad():
    torch = pytest.importorskip("torch")
    w = torch.randn(4, 2, 3, 3, requires_grad=True)
    with pytest.raises(TypeError, match="conv_weight.*requires grad"):
        bn_simd.fold_conv(w, None, np.zeros(4), np.ones(4))
    w2, b2 = bn_simd.fold_conv(w.detach(), None, torch.zeros(4), torch.ones(4))
    np.testing.assert_allclose(w2, w.detach().numpy() / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_importing_the_folding_modules_imports_no_optional_dependency():
    code = ("import sys, bn_simd, bn_simd.fold, bn_simd.onnx; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("shape", [(0, 3, 3, 3), (4, 0, 3, 3), (4, 3, 0, 3)])
@pytest.mark.parametrize("position", ["after", "before"])
def test_fold_conv_of_a_kernel_with_no_elements(shape, position):
    """A kernel with no output channels, no input channels or no taps folds as fold_linear's empty cases do: arrays of
    its shape and (O,) biases, b2 the BN's shift alone where the conv has outputs (it raised NumPy's reshape error)."""
    O, I = shape[0], shape[1]
    C = O if position == "after" else I
    rm, rv = np.full(C, 0.5, np.float32), np.full(C, 4.0, np.float32)
    w2, b2 = bn_simd.fold_conv(np.zeros(shape, np.float32), None, rm, rv, position=position)
    assert w2.shape == shape and w2.dtype == np.float32 and b2.shape == (O,)
    scale, shift = bn_simd.fold_params(rm, rv)
    want = np.broadcast_to(shift, (O,)) if position == "after" else np.zeros(O)
    np.testing.assert_allclose(b2, want, rtol=1e-7)


def _bf16_half_ulp(exact):
    """Half a bfloat16 ulp at each float64 value: 2^(e - 8) for |v| in [2^e, 2^(e+1)) (8 significant bits)."""
    return np.ldexp(1.0, np.frexp(exact)[1] - 9)


@pytest.mark.parametrize("position", ["after", "before"])
def test_fold_conv_bfloat16_weight_stays_bfloat16_rounded_once(position):
    """A bfloat16 weight (ml_dtypes) folds in float64 and comes back bfloat16, each value within half a bfloat16 ulp
    of the float64 fold; bfloat16 statistics are taken as the other per-channel arguments are (widened exactly)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(8)
    w = rng.standard_normal((6, 6, 3, 3)).astype(bf16)
    rm, rv = (rng.standard_normal(6) * 0.5).astype(bf16), rng.uniform(0.5, 2.0, 6).astype(bf16)
    w2, b2 = bn_simd.fold_conv(w, None, rm, rv, position=position)
    assert w2.dtype == bf16 and b2.dtype == bf16 and w2.shape == w.shape
    w64 = w.astype(np.float64)
    scale = 1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)
    shift = -rm.astype(np.float64) * scale
    if position == "after":
        w_ref, b_ref = w64 * scale[:, None, None, None], shift
    else:
        w_ref, b_ref = w64 * scale[None, :, None, None], np.einsum("oihw,i->o", w64, shift)
    for got, ref in ((w2, w_ref), (b2, b_ref)):
        assert np.all(np.abs(got.astype(np.float64) - ref) <= _bf16_half_ulp(ref) * (1 + 1e-12))
    s16, t16 = bn_simd.fold_params(rm, rv)   # default dtype: the statistics' own
    assert s16.dtype == bf16 and t16.dtype == bf16
    assert np.all(np.abs(s16.astype(np.float64) - scale) <= _bf16_half_ulp(scale) * (1 + 1e-12))


def test_fold_conv_of_a_torch_bfloat16_weight_gives_float32_whatever_is_installed():
    """NumPy has no bfloat16 of its own: a torch bfloat16 weight folds to float32 (which torch.from_numpy takes),
    with ml_dtypes installed or not, each value the float64 fold rounded once to float32."""
    torch = pytest.importorskip("torch")
    w = torch.randn(4, 2, 3, 3).to(torch.bfloat16)
    w2, b2 = bn_simd.fold_conv(w, None, np.zeros(4), np.full(4, 4.0))
    assert w2.dtype == np.float32 and b2.dtype == np.float32
    ref = w.float().numpy().astype(np.float64) / np.sqrt(4.0 + 1e-5)
    np.testing.assert_array_equal(w2, ref.astype(np.float32))
    assert torch.from_numpy(w2).shape == w.shape


def test_fold_rounds_a_bfloat16_result_once_from_float64():
    """A float64 value just above a bfloat16 tie: rounded once it goes up; through float32 first it would land on the
    tie and go to the even neighbour (down)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    v = 1.0 + 2.0 ** -8 + 2.0 ** -30   # (bfloat16 neighbours 1 and 1 + 2^-7; float32 rounds v to the tie 1 + 2^-8)
    scale, shift = bn_simd.fold_params(np.zeros(1), np.full(1, 0.75), np.array([v]), np.array([v]), eps=0.25,
                                       dtype=ml_dtypes.bfloat16)   # (sqrt(0.75 + 0.25) = 1: scale = shift = v)
    assert scale.astype(np.float64)[0] == 1.0 + 2.0 ** -7 and shift.astype(np.float64)[0] == 1.0 + 2.0 ** -7


def test_fold_eps_beyond_floats_range_is_a_value_error():
    with pytest.raises(ValueError, match=r"eps must be finite and > 0, got a number beyond float.s range \(int\)"):
        bn_simd.fold_params(np.zeros(2), np.ones(2), eps=10 ** 400)
    with pytest.raises(ValueError, match=r"eps must be finite and > 0, got a number beyond float.s range \(Fraction\)"):
        bn_simd.fold_params(np.zeros(2), np.ones(2), eps=fractions.Fraction(10 ** 5000))


def test_fold_reports_float64_overflow_beside_a_non_finite_conv_weight():
    """A non-finite conv weight passes through to what it reaches, as in the unfolded layer; a finite entry whose
    fold overflows float64 still raises (the check was skipped when any weight was non-finite)."""
    w = np.array([[[[np.inf]]], [[[1e300]]]])
    with pytest.raises(ValueError, match="overflow float64"):
        bn_simd.fold_conv(w, None, np.zeros(2), np.ones(2), np.array([1.0, 1e10]))
    w2, b2 = bn_simd.fold_conv(w, None, np.zeros(2), np.ones(2), np.array([1.0, 2.0]))
    assert np.isposinf(w2[0]).all() and np.isfinite(w2[1]).all() and np.isfinite(b2).all()
    # before the conv: the bias of an output whose weights are all finite still overflows by name
    wb = np.array([[[[np.inf]], [[0.0]]], [[[1e300]], [[1e300]]]])   # (O=2, I=2, 1, 1)
    with pytest.raises(ValueError, match="overflow float64"):
        bn_simd.fold_conv(wb, None, np.full(2, -1e10), np.ones(2), np.full(2, 1e8), position="before")
