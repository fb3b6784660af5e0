"""float16 and bfloat16 tensors in bn_simd.torch: the 16-bit kernels, zero-copy, with PyTorch's semantics.

Against PyTorch's own CPU float16 / bfloat16 batch, group, instance, layer and RMS norm (which compute in float32
too): outputs within one ulp of the 16-bit type, running statistics and gradients within bounds derived from
float32's rounding, results in the input's memory format, the same bits for any thread count. Parameters float32
(PyTorch's mixed rule) or of the input's dtype (a module converted with .half() / .bfloat16()). bfloat16 needs no
ml_dtypes: its memory is handed over as tagged uint16.
"""
import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import bn_simd  # noqa: E402
import bn_simd.torch as bt  # noqa: E402
from bn_simd.torch import _bridge as B  # noqa: E402
from bn_simd.torch import modules as M  # noqa: E402
from torch.nn import functional as TF  # noqa: E402

# (PyTorch warns that its fused RMS norm does not take 16-bit input with float32 weight, and runs its composite)
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
HALF = [torch.float16, torch.bfloat16]
EPS32 = float(torch.finfo(torch.float32).eps)
CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def _ids(v):
    return str(v).replace("torch.", "")


def sample(shape, dtype, seed, scale=3.0, loc=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)


def params(C, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(C, generator=g, dtype=torch.float64) * 1.5 + 0.5
    b = torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1
    return w.to(dtype), b.to(dtype)


def ulp(v, dtype):
    """One ulp of the 16-bit dtype at |v| (a float64 tensor): 2^(max(e, emin) - p + 1)."""
    fi = torch.finfo(dtype)
    p = 11 if dtype == torch.float16 else 8
    e = torch.floor(torch.log2(v.abs().clamp(min=fi.tiny)))
    return torch.pow(2.0, e - (p - 1))


def assert_within_ulp(ours, theirs, dtype, what, extra=0.0):
    """|ours - theirs| <= one ulp of dtype at the larger of the two (+ extra), elementwise; same dtype."""
    assert ours.dtype == theirs.dtype == dtype, what
    a, b = ours.detach().double(), theirs.detach().double()
    err = (a - b).abs()
    bound = ulp(torch.maximum(a.abs(), b.abs()), dtype) + extra
    k = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (f"{what}: {a.flatten()[k].item()!r} against {b.flatten()[k].item()!r} "
                                       f"(bound {bound.flatten()[k].item():.3g})")


def assert_sums_close(ours, theirs, terms, n, what):
    """Per-channel sums of n terms (float32 results): PyTorch accumulates in float32, so within (n + 8) float32
    roundings of the sum of the terms' magnitudes; ours sums in float64 and rounds once."""
    assert ours.dtype == theirs.dtype, what
    err = (ours.double() - theirs.double()).abs()
    bound = (n + 8) * EPS32 * terms
    assert bool((err <= bound).all()), f"{what}: {err.max().item():.3g} > {bound.max().item():.3g}"


def bits(t):
    return t.detach().contiguous().view(torch.int16)


# ---- forward parity: every op, both memory formats, float32 and 16-bit parameters ----------------------------------

FORWARD = {
    "batch_norm_train": (lambda f, x, p: f.batch_norm(x, p["rm"], p["rv"], p["w"], p["b"], training=True),
                         True),
    "batch_norm_eval": (lambda f, x, p: f.batch_norm(x, p["rm"], p["rv"], p["w"], p["b"]), True),
    "group_norm": (lambda f, x, p: f.group_norm(x, 4, p["w"], p["b"]), True),
    "instance_norm": (lambda f, x, p: f.instance_norm(x, None, None, p["w"], p["b"]), True),
    "layer_norm": (lambda f, x, p: f.layer_norm(x, x.shape[2:], p["lw"], p["lb"]), False),
    "rms_norm": (lambda f, x, p: f.rms_norm(x, x.shape[2:], p["lw"]), False),
}


def _params(C, spatial, pdtype):
    w, b = params(C, pdtype)
    lw, lb = params(int(np.prod(spatial)), pdtype, seed=2)
    return dict(w=w, b=b, rm=torch.linspace(-1, 1, C).to(pdtype), rv=torch.linspace(0.5, 3, C).to(pdtype),
                lw=lw.reshape(spatial), lb=lb.reshape(spatial))


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("op", list(FORWARD))
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_forward_within_one_ulp_of_pytorch_with_float32_parameters(dtype, op, fmt):
    call, keeps_format = FORWARD[op]
    x = sample((4, 16, 9, 7), dtype, seed=3)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    p, q = _params(16, (9, 7), torch.float32), _params(16, (9, 7), torch.float32)
    y = call(bt, x, p)
    want = call(TF, x, q)
    # one ulp of the 16-bit type, plus float32's error on the terms (x̂ w and b, at most the output's largest
    # magnitude) for outputs near 0, where the terms cancel: the scalar kernels round a * b + c twice
    assert_within_ulp(y, want, dtype, op, extra=16 * EPS32 * float(want.double().abs().max()))
    if keeps_format and fmt == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    for k in ("rm", "rv"):  # (batch norm in training: float32 running statistics updated alike)
        assert p[k].dtype == torch.float32
        torch.testing.assert_close(p[k], q[k], rtol=4 * EPS32, atol=4 * EPS32)


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("op", ["batch_norm_train", "batch_norm_eval", "group_norm", "layer_norm", "rms_norm"])
def test_forward_with_16_bit_parameters_reads_them_exactly(dtype, op):
    """Parameters of the input's dtype (a .half() / .bfloat16() module) are widened exactly: the result is the one
    with their float32 values, within one ulp of PyTorch given those float32 values (PyTorch's own kernel with
    16-bit parameters rounds its coefficients to the 16-bit type, a few ulp further off)."""
    call, _ = FORWARD[op]
    x = sample((3, 16, 6, 10), dtype, seed=4)
    p16 = _params(16, (6, 10), dtype)
    p32 = {k: v.float() for k, v in p16.items()}
    q32 = {k: v.clone() for k, v in p32.items()}
    y16, y32 = call(bt, x, p16), call(bt, x, p32)
    assert torch.equal(bits(y16), bits(y32)), op
    assert_within_ulp(y16, call(TF, x, q32), dtype, op)
    if op == "batch_norm_train":  # running statistics in the 16-bit dtype: the float32 update, rounded once
        for k in ("rm", "rv"):
            assert p16[k].dtype == dtype
            assert_within_ulp(p16[k], p32[k].to(dtype), dtype, k)


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("shape", [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1), (4, 8, 2, 10, 10), (4, 9, 1, 1, 1)],
                         ids=_ids)
@pytest.mark.parametrize("mixed", [True, False], ids=["float32_params", "half_params"])
def test_channels_last_module_training_against_contiguous_pytorch(dtype, shape, mixed):
    """PyTorch's test_batchnorm_nhwc_cpu: a channels-last module forward and backward against the reference module
    on the contiguous input (NC11 and N1HW shapes; float32 or 16-bit parameters). The reference has the parameters'
    values in float32: PyTorch's kernel with 16-bit parameters rounds its coefficients to the 16-bit type, and then
    differed from the float64 result by up to 3 float16 ulp, where bn_simd's reads them exactly."""
    C, fmt = shape[1], CL[len(shape)]
    cls, ref_cls = (bt.BatchNorm2d, torch.nn.BatchNorm2d) if len(shape) == 4 else (bt.BatchNorm3d,
                                                                                   torch.nn.BatchNorm3d)
    x = sample(shape, dtype, seed=5, scale=1.0, loc=0.0).contiguous(memory_format=fmt).requires_grad_()
    g = sample(shape, dtype, seed=6, scale=1.0, loc=0.0).contiguous(memory_format=fmt)
    m, ref = cls(C).to(dtype), ref_cls(C)
    with torch.no_grad():
        m.weight.uniform_(generator=torch.Generator().manual_seed(7))
        m.bias.uniform_(generator=torch.Generator().manual_seed(8))
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in m.state_dict().items()})
    if mixed:
        m.float()
    xr = x.detach().clone().contiguous().requires_grad_()
    out = m(x)
    out.backward(g)
    want = ref(xr)
    want.backward(g.contiguous())
    assert out.is_contiguous(memory_format=fmt)
    assert_within_ulp(out, want, dtype, "y")
    _check_bn_grads(x, xr, g, m, ref, dtype)


def _check_bn_grads(x, xr, g, m, ref, dtype):
    """grad_x within an ulp plus float32's error on its largest term; grad_weight and grad_bias as channel sums."""
    x64, g64 = x.detach().double(), g.double()
    dims = [d for d in range(x.dim()) if d != 1]
    n = x.numel() // x.shape[1]
    mean, var = x64.mean(dims, keepdim=True), x64.var(dims, unbiased=False, keepdim=True)
    xhat = (x64 - mean) / torch.sqrt(var + m.eps)
    w64 = m.weight.detach().double().reshape(mean.shape)
    invstd = 1 / torch.sqrt(var + m.eps)
    big = (w64.abs() * invstd).max() * g64.abs().max() * (1 + xhat.abs().max())
    assert x.grad.dtype == dtype
    assert_within_ulp(x.grad, xr.grad, dtype, "grad_x", extra=32 * EPS32 * float(big))
    assert m.weight.grad.dtype == m.bias.grad.dtype == m.weight.dtype
    if m.weight.dtype in HALF:  # (gradients of 16-bit parameters: rounded once from the float32 sums)
        assert_within_ulp(m.weight.grad, ref.weight.grad.to(dtype), dtype, "grad_weight",
                          extra=(n + 8) * EPS32 * float((g64 * xhat).abs().sum(dims).max()))
        assert_within_ulp(m.bias.grad, ref.bias.grad.to(dtype), dtype, "grad_bias",
                          extra=(n + 8) * EPS32 * float(g64.abs().sum(dims).max()))
        for k in ("running_mean", "running_var"):
            assert_within_ulp(getattr(m, k), getattr(ref, k).to(dtype), dtype, k)
    else:
        assert_sums_close(m.weight.grad, ref.weight.grad, (g64 * xhat).abs().sum(dims), n, "grad_weight")
        assert_sums_close(m.bias.grad, ref.bias.grad, g64.abs().sum(dims), n, "grad_bias")


# ---- backward parity of the other ops --------------------------------------------------------------------------------

BACKWARD = {
    "group_norm": lambda f, x, w, b: f.group_norm(x, 4, w, b),
    "instance_norm": lambda f, x, w, b: f.instance_norm(x, None, None, w, b),
    "batch_norm_eval": lambda f, x, w, b: f.batch_norm(x, torch.full((8,), 0.5, dtype=w.dtype),
                                                       torch.full((8,), 2.0, dtype=w.dtype), w, b),
    "layer_norm": lambda f, x, w, b: f.layer_norm(x, (8, 5, 6), w.repeat_interleave(30).reshape(8, 5, 6),
                                                  b.repeat_interleave(30).reshape(8, 5, 6)),
    "rms_norm": lambda f, x, w, b: f.rms_norm(x, (8, 5, 6), w.repeat_interleave(30).reshape(8, 5, 6)),
}


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("op", list(BACKWARD))
def test_gradients_against_pytorch(dtype, op):
    """grad_x within an ulp plus float32's error on its largest term (a row's normalised value times the largest
    weight, invstd and gradient); parameter gradients (float32) as sums of float32 terms."""
    x = sample((3, 8, 5, 6), dtype, seed=9)
    g = sample((3, 8, 5, 6), dtype, seed=10, scale=1.0, loc=0.0)
    w, b = params(8)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    BACKWARD[op](bt, *leaves).backward(g)
    BACKWARD[op](TF, *ref_leaves).backward(g)
    x64 = x.double()
    invstd = 1 / x64.reshape(3, -1).std(1, unbiased=False).min() if op != "batch_norm_eval" else 1 / 2 ** 0.5
    xhat_max = float((x64.abs().max() + x64.abs().mean()) * invstd)
    big = float(w.abs().max()) * float(invstd) * float(g.double().abs().max()) * (1 + xhat_max)
    assert_within_ulp(leaves[0].grad, ref_leaves[0].grad, dtype, "grad_x", extra=32 * EPS32 * big)
    # Parameter gradients (float32) against the op in float64 on the same values (PyTorch's own 16-bit layer norm
    # is further from it than a float32 sum's error): every op's parameter c (the layer/RMS norms' weight repeated
    # over (5, 6) by the graph) gets a sum over the 3 * 5 * 6 positions of channel c, of dy xhat (weight) and of dy
    # (bias), which a float32 sum gives within (n + 8) roundings of the sum of the terms' magnitudes.
    exact = [t.double().requires_grad_() for t in (x, w, b)]
    BACKWARD[op](TF, *exact).backward(g.double())
    n = 3 * 5 * 6
    g_c = g.double().abs().sum((0, 2, 3))
    for k, name, terms in ((1, "grad_weight", g_c * xhat_max), (2, "grad_bias", g_c)):
        ours, theirs = leaves[k].grad, exact[k].grad
        if theirs is None:  # (RMS norm has no bias)
            assert ours is None and ref_leaves[k].grad is None
            continue
        assert ours.dtype == ref_leaves[k].grad.dtype == torch.float32, name
        assert_sums_close(ours.double(), theirs, terms, n, name)


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("op", ["batch_norm_train", "group_norm", "instance_norm", "layer_norm"])
def test_a_constant_gradient_gives_grad_x_zero_within_float32s_rounding(dtype, op):
    """With grad_out constant (the gradient of sum(c y)), every grad_x is 0 in exact arithmetic: bn_simd's float32
    math leaves float32-sized residues. (PyTorch's 16-bit backward left residues of the 16-bit type's size here,
    up to 0.008 for bfloat16: where its gradients differ from bn_simd's by more than an ulp, this is why.)"""
    call, _ = FORWARD[op]
    x = sample((3, 8, 5, 6), dtype, seed=21).requires_grad_()
    p = dict(_params(8, (5, 6), torch.float32), w=None, b=None, lw=None, lb=None)  # (a weight constant per group)
    (call(bt, x, p) * 3).sum().backward()
    x64 = x.detach().double()
    # (the statistic groups: channels over the batch; 4 groups of a sample; a (sample, channel)'s positions)
    rows = {"batch_norm_train": x64.transpose(0, 1).reshape(8, -1), "group_norm": x64.reshape(12, -1)}.get(
        op, x64.reshape(24, -1))
    invstd = 1 / float(rows.std(1, unbiased=False).min())
    bound = 64 * EPS32 * 3 * invstd * (1 + float((x64 - x64.mean()).abs().max()) * invstd)
    assert x.grad.dtype == dtype and float(x.grad.double().abs().max()) <= bound


# ---- modules, out=, threads, the eval fast path --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_converted_model_cast_to_16_bits_runs_the_kernels(dtype):
    """convert(model).to(dtype): 16-bit parameters and buffers, read exactly. A training step gives the bits of the
    same calls with the parameters' float32 values, parameter gradients and running statistics in the 16-bit dtype
    (one rounding of the float32 ones); then eval uses the 16-bit running statistics."""
    torch.manual_seed(0)
    model = bt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.GroupNorm(2, 8),
                                           torch.nn.LayerNorm((5, 5)))).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.5)
    p32 = [p.detach().float().requires_grad_() for p in model.parameters()]
    rm, rv = model[0].running_mean.float(), model[0].running_var.float()
    x = sample((4, 8, 5, 5), dtype, seed=11)
    g = sample((4, 8, 5, 5), dtype, seed=12, scale=1.0, loc=0.0)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = model(x1)
    y.backward(g)
    h = bt.batch_norm(x2, rm, rv, p32[0], p32[1], training=True).relu()
    want = bt.layer_norm(bt.group_norm(h, 2, p32[2], p32[3]), (5, 5), p32[4], p32[5])
    want.backward(g)
    assert y.dtype == x1.grad.dtype == dtype
    assert torch.equal(bits(y), bits(want)) and torch.equal(bits(x1.grad), bits(x2.grad))
    for p, q in zip(model.parameters(), p32):
        assert p.grad.dtype == dtype
        assert_within_ulp(p.grad, q.grad.to(dtype), dtype, "parameter gradient")
    assert model[0].running_mean.dtype == dtype
    assert_within_ulp(model[0].running_var, rv.to(dtype), dtype, "running_var")
    model.eval()
    with torch.no_grad():
        y = model[0](x)
        want = bt.batch_norm(x, model[0].running_mean.float(), model[0].running_var.float(), p32[0].detach(),
                             p32[1].detach())
    assert torch.equal(bits(y), bits(want))


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_16_bit_tensors_are_read_and_written_in_place(dtype):
    x = sample((2, 6, 5, 5), dtype, seed=12).contiguous(memory_format=torch.channels_last)
    layout_x, layout, a = B.dense(x)
    assert layout_x is x and layout == "NHWC" and a.ctypes.data == x.data_ptr()
    want = bt.batch_norm(x, None, None, training=True)
    out = torch.empty_like(x)
    assert bt.batch_norm(x, None, None, training=True, out=out) is out
    assert torch.equal(bits(out), bits(want))
    xi = x.clone()
    ptr = xi.data_ptr()
    bt.batch_norm(xi, None, None, training=True, out=xi)
    assert xi.data_ptr() == ptr and torch.equal(bits(xi), bits(want))
    strided = sample((2, 6, 5, 10), dtype, seed=12)[..., ::2]  # (other strides: one copy, a contiguous result)
    assert bt.group_norm(strided, 3).is_contiguous()
    with pytest.raises(TypeError, match="out"):
        bt.batch_norm(x, None, None, training=True, out=torch.empty(x.shape))


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_same_bits_for_any_thread_count(dtype):
    x = sample((8, 32, 20, 20), dtype, seed=13)
    w, b = params(32)
    lw = params(400, seed=3)[0].reshape(20, 20)
    results = []
    for n in (1, 2, 3):
        with bn_simd.Context(num_threads=n):
            xg = x.clone().requires_grad_()
            y = bt.batch_norm(xg, None, None, w, b, training=True)
            y.backward(x)
            results.append([y, xg.grad, bt.group_norm(x, 8, w, b), bt.layer_norm(x, (20, 20), lw),
                            bt.rms_norm(x, (20, 20), lw)])
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(bits(a), bits(c))


@pytest.mark.parametrize("dtype", HALF, ids=_ids)
@pytest.mark.parametrize("half_params", [False, True])
def test_eval_fast_path_serves_16_bit_input(dtype, half_params):
    m = bt.BatchNorm2d(6).eval()
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(14))
        m.weight.uniform_(0.5, 2, generator=torch.Generator().manual_seed(15))
    if half_params:
        m.to(dtype)
    x = sample((3, 6, 7, 7), dtype, seed=16)
    with torch.no_grad():
        general = m(x)
        assert M.EVAL_KEY in m.__dict__
        fast = bn_simd._core.torch_bn_eval(m, m.__dict__[M.EVAL_KEY], x, torch.utils.dlpack.to_dlpack,
                                          torch.empty_like, 1)
        assert fast is not None and torch.equal(bits(fast), bits(general))
        cl = m(x.contiguous(memory_format=torch.channels_last))
        assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(bits(cl), bits(general))
        ref = torch.nn.BatchNorm2d(6).eval()
        ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
        assert_within_ulp(general, TF.batch_norm(x, ref.running_mean, ref.running_var, ref.weight, ref.bias), dtype,
                          "eval")
        # a float32 input afterwards goes the general way (its dtype is not the cached one)
        if not half_params:
            assert m(x.float()).dtype == torch.float32


# ---- SyncBatchNorm ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("half_params", [False, True], ids=["float32_params", "16bit_params"])
@pytest.mark.parametrize("dtype", HALF, ids=_ids)
def test_sync_batch_norm_ranks_together_are_batchnorm2d_on_the_whole_batch(dtype, half_params):
    from fake_comm import run_ok
    x, g = sample((6, 5, 4, 4), dtype, seed=17), sample((6, 5, 4, 4), dtype, seed=18, scale=1.0, loc=0.0)
    ref = bt.BatchNorm2d(5)
    with torch.no_grad():
        ref.weight.copy_(torch.linspace(0.5, 2.0, 5))
        ref.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    if half_params:
        ref = ref.to(dtype)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(g)

    def fn(r, comm):
        m = bt.SyncBatchNorm(5, process_group=comm)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 2.0, 5))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 5))
        if half_params:
            m = m.to(dtype)
        piece = x[3 * r:3 * r + 3].clone().requires_grad_()
        y = m(piece)
        y.backward(g[3 * r:3 * r + 3])
        return m, y, piece.grad

    got = run_ok(2, fn)
    y, gx = torch.cat([r[1] for r in got]), torch.cat([r[2] for r in got])
    assert y.dtype == gx.dtype == dtype
    assert_within_ulp(y, y_ref, dtype, "y")
    assert_within_ulp(gx, xr.grad, dtype, "grad_x", extra=64 * EPS32 * float(xr.grad.double().abs().max()))
    # the same batch statistics and sums, exchanged: parameter gradients (in the parameters' dtype) within a
    # rounding of that dtype plus float32's on the sums, the running statistics within float32's
    pdt = dtype if half_params else torch.float32
    for r, (m, _, _) in enumerate(got):
        # each rank's own piece's parameter gradients, as PyTorch's SyncBatchNorm: one process's for a grad_out that
        # is zero outside the piece
        piece_ref = copy.deepcopy(ref)
        piece_ref.zero_grad()
        g_piece = torch.zeros_like(g)
        g_piece[3 * r:3 * r + 3] = g[3 * r:3 * r + 3]
        piece_ref(x.clone()).backward(g_piece)  # (training mode: the batch statistics, as ref's)
        for name in ("weight", "bias"):
            ours, theirs = getattr(m, name).grad, getattr(piece_ref, name).grad
            scale = max(float(getattr(ref, name).grad.double().abs().max()), float(theirs.double().abs().max()))
            assert ours.dtype == pdt, name
            assert_within_ulp(ours, theirs, pdt, name, extra=64 * EPS32 * scale)
        for name in ("running_mean", "running_var"):
            ours, theirs = getattr(m, name), getattr(ref, name)
            assert_within_ulp(ours, theirs, pdt, name, extra=16 * EPS32 * float(theirs.double().abs().max()))


# ---- what is refused, and what bfloat16 needs ---------------------------------------------------------------------

def test_parameter_dtypes_follow_pytorchs_mixed_rule():
    x = sample((4, 3, 5), torch.bfloat16, seed=19)
    f32, b16, f64 = torch.ones(3), torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.float64)
    for call in (lambda: bt.batch_norm(x, None, None, f64, None, training=True),
                 lambda: bt.batch_norm(x.half(), None, None, b16, None, training=True),
                 lambda: bt.group_norm(x, 3, f32, b16),
                 lambda: bt.batch_norm(x, torch.zeros(3), torch.ones(3), b16, b16, training=True),
                 lambda: bt.layer_norm(x, 5, torch.ones(5), torch.zeros(5, dtype=torch.bfloat16))):
        with pytest.raises(TypeError, match="dtype"):
            call()
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError):
        bt.batch_norm(x, rm, rv, b16, b16, training=True)
    assert not rm.any() and bool((rv == 1).all())  # (a refused call changes nothing)
    with pytest.raises(TypeError, match="weight"):
        bt.batch_norm(x.float(), None, None, b16, None, training=True)  # (float32 input: the input's dtype only)


def test_bfloat16_needs_no_ml_dtypes():
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"  # (an import of ml_dtypes would now fail)
            "import torch, bn_simd.torch as bt\n"
            "x = torch.randn(4, 3, 5).bfloat16().requires_grad_()\n"
            "w = torch.ones(3, dtype=torch.bfloat16, requires_grad=True)\n"
            "y = bt.batch_norm(x, torch.zeros(3), torch.ones(3), training=True)\n"
            "bt.layer_norm(x, 5, torch.ones(5, dtype=torch.bfloat16)).sum().backward()\n"
            "bt.group_norm(x, 3, w, w).sum().backward()\n"
            "print(y.dtype, x.grad.dtype, w.grad.dtype)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["torch.bfloat16"] * 3


def test_bfloat16_bits_give_the_bytes_of_ml_dtypes_arrays():
    """The tagged uint16 view and an ml_dtypes.bfloat16 array of the same memory run the same kernel."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = sample((4, 6, 5, 5), torch.bfloat16, seed=20)
    w, b = params(6)
    y = bt.batch_norm(x, None, None, w, b, training=True)
    a = x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    ya = bn_simd.batch_norm(a, None, None, w.numpy(), b.numpy(), training=True)
    assert np.array_equal(ya.view(np.int16), bits(y).numpy())


def test_plain_uint16_arrays_are_still_refused():
    with pytest.raises(TypeError, match="x must have dtype"):
        bn_simd.batch_norm(np.zeros((4, 3, 2), np.uint16), None, None, training=True)
    with pytest.raises(TypeError, match="weight"):
        bn_simd.batch_norm(np.zeros((4, 3, 2), np.float32), None, None, np.ones(3, np.uint16), training=True)
