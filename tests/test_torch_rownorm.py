"""bn_simd.torch's layer_norm, rms_norm, LayerNorm and RMSNorm: results and gradients as PyTorch's, memory (in
place for contiguous tensors, out=), the calls handed to PyTorch, the modules' state dicts both ways, and convert()
of a transformer block built from torch.nn layers. Skipped without torch."""
import copy
import io
import pickle

import numpy as np
import pytest

import rownorm_ref as ref

torch = pytest.importorskip("torch")
bt = pytest.importorskip("bn_simd.torch")
TF = torch.nn.functional

TORCH_DTYPES = (torch.float32, torch.float64)


@pytest.fixture(autouse=True, scope="module")
def _torch_on_one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rand(shape, dtype, seed, loc=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * scale + loc


def _np_dtype(dtype):
    return np.float32 if dtype == torch.float32 else np.float64


def _assert_forward(y, x, ns, w, b, eps, dtype, rms=False):
    """y (a tensor) against the float64 oracle of x within the bound of dtype and the row length."""
    a = lambda t: None if t is None else t.detach().numpy()  # noqa: E731
    xa = a(x)
    if rms:
        expected = ref.rms_norm(xa, ns, a(w), eps, dtype=xa.dtype)[0]
    else:
        expected = ref.layer_norm(xa, ns, a(w), a(b), eps)[0]
    ref.assert_within(y.detach().numpy(), expected,
                      ref.forward_bound(xa, ns, a(w), a(b), eps, xa.dtype.type, rms=rms), "y")


# ---- functional ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("strides", ["contiguous", "transposed", "sliced", "channels_last"])
def test_functional_results_match_torch_for_any_strides(strides, dtype):
    base = _rand((4, 6, 5, 8), dtype, 1, loc=2.0, scale=3.0)
    x = {"contiguous": base, "transposed": base.transpose(0, 1), "sliced": base[:, ::2],
         "channels_last": base.contiguous(memory_format=torch.channels_last)}[strides]
    w, b = _rand((8,), dtype, 2), _rand((8,), dtype, 3)
    y = bt.layer_norm(x, (8,), w, b, 1e-5)
    assert y.is_contiguous() and y.shape == x.shape and y.dtype == dtype
    _assert_forward(y, x, (8,), w, b, 1e-5, dtype)
    torch.testing.assert_close(y, TF.layer_norm(x, (8,), w, b, 1e-5))
    y = bt.rms_norm(x, [5, 8], _rand((5, 8), dtype, 4))
    torch.testing.assert_close(y, TF.rms_norm(x, [5, 8], _rand((5, 8), dtype, 4)))


def test_strided_parameters_and_their_gradients():
    # weight and bias as views with strides (every other element of a longer tensor): read as they are, and their
    # gradients reach the base tensors as PyTorch's do
    x = _rand((5, 12), torch.float64, 40, loc=0.5)
    g = _rand((5, 12), torch.float64, 41)
    grads = []
    for fn in (bt.layer_norm, TF.layer_norm):
        base = torch.linspace(0.5, 2.0, 24, dtype=torch.float64).requires_grad_()
        y = fn(x, (12,), base[::2], base[1::2])
        y.backward(g)
        grads.append((y.detach(), base.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_out_is_written_in_place_and_may_be_the_input():
    x = _rand((3, 7, 16), torch.float32, 5, loc=1.0)
    w, b = _rand((16,), torch.float32, 6), _rand((16,), torch.float32, 7)
    expected = TF.layer_norm(x, (16,), w, b)
    out = torch.empty_like(x)
    r = bt.layer_norm(x, 16, w, b, out=out)
    assert r is out
    torch.testing.assert_close(out, expected)
    strided = torch.empty(3, 16, 7).transpose(1, 2)  # an out that is not C-contiguous: written by a copy
    assert bt.layer_norm(x, 16, w, b, out=strided) is strided
    torch.testing.assert_close(strided, expected)
    xi = x.clone()
    assert bt.rms_norm(xi, 16, w, out=xi) is xi
    torch.testing.assert_close(xi, TF.rms_norm(x, [16], w))


def test_contiguous_input_is_read_in_place():
    # the kernel reads the tensor's own memory: a view of a larger buffer is normalised without a copy, and the
    # output's memory is fresh (not the input's)
    buf = _rand((2, 4, 32), torch.float64, 8)
    x = buf[1]
    assert x.is_contiguous() and x.data_ptr() != buf.data_ptr()
    y = bt.layer_norm(x, 32)
    torch.testing.assert_close(y, TF.layer_norm(x, (32,)))
    assert y.data_ptr() != x.data_ptr()


def test_out_is_refused_when_autograd_records_the_call():
    x = _rand((2, 8), torch.float32, 9).requires_grad_()
    with pytest.raises(ValueError, match="out"):
        bt.layer_norm(x, 8, out=torch.empty(2, 8))
    with pytest.raises(ValueError, match="out"):
        bt.rms_norm(x, 8, out=torch.empty(2, 8))


def test_wrong_arguments_raise_naming_them():
    x = _rand((2, 3, 8), torch.float32, 10)
    with pytest.raises(TypeError, match="weight"):
        bt.layer_norm(x, 8, torch.ones(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias"):
        bt.layer_norm(x, 8, None, torch.ones(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="normalized_shape"):
        bt.layer_norm(x, (4,))
    with pytest.raises(ValueError, match="weight"):
        bt.rms_norm(x, 8, torch.ones(7))
    with pytest.raises(TypeError, match="normalized_shape"):
        bt.layer_norm(x, "8")
    with pytest.raises(TypeError, match="input"):
        bt.layer_norm(np.ones((2, 8), np.float32), 8)


def test_eps_zero_and_negative_go_to_torch():
    x = _rand((3, 16), torch.float64, 12)
    torch.testing.assert_close(bt.layer_norm(x, 16, eps=0.0), TF.layer_norm(x, (16,), eps=0.0), equal_nan=True)
    torch.testing.assert_close(bt.rms_norm(x, 16, eps=0.0), TF.rms_norm(x, [16], eps=0.0), equal_nan=True)
    # common_methods_invocations' eps=-0.5 sample: PyTorch's own result, NaN where var < 0.5
    xs = _rand((2, 2, 3), torch.float64, 13)
    torch.testing.assert_close(bt.layer_norm(xs, (2, 3), eps=-0.5), TF.layer_norm(xs, (2, 3), eps=-0.5),
                               equal_nan=True)


def test_forward_mode_ad_and_tracing_use_torch():
    import torch.autograd.forward_ad as fwAD
    x, tangent = _rand((2, 8), torch.float64, 14), _rand((2, 8), torch.float64, 15)
    with fwAD.dual_level():
        y = bt.layer_norm(fwAD.make_dual(x, tangent), 8)
        jvp = fwAD.unpack_dual(y).tangent
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(TF.layer_norm(fwAD.make_dual(x, tangent), (8,))).tangent
    torch.testing.assert_close(jvp, expected)
    m = bt.convert(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))).double()
    traced = torch.jit.trace(m, (x,))
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "aten::layer_norm" in kinds and "aten::rms_norm" in kinds
    torch.testing.assert_close(traced(x), m(x))


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_parameter_only_gradients(dtype):
    # x does not require grad: the Function still runs (weight and bias do) and gives their gradients only
    x = _rand((5, 12), dtype, 16, loc=1.0)
    g = _rand((5, 12), dtype, 17)
    grads = []
    for fn in (bt.layer_norm, TF.layer_norm):
        w = torch.ones(12, dtype=dtype, requires_grad=True)
        b = torch.zeros(12, dtype=dtype, requires_grad=True)
        fn(x, (12,), w, b).backward(g)
        grads.append((w.grad, b.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_second_derivatives_raise():
    x = _rand((2, 6), torch.float64, 18).requires_grad_()
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(bt.layer_norm(x, 6).pow(2).sum(), x, create_graph=True)


# ---- modules ---------------------------------------------------------------------------------------------------------

MODULES = [("LayerNorm", (16,), {}), ("LayerNorm", ([4, 16],), {"eps": 1e-3}),
           ("LayerNorm", (16,), {"elementwise_affine": False}), ("LayerNorm", (16,), {"bias": False}),
           ("RMSNorm", (16,), {}), ("RMSNorm", ([4, 16],), {"eps": 1e-6}),
           ("RMSNorm", (16,), {"elementwise_affine": False})]


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("kind,args,kwargs", MODULES, ids=lambda v: str(v))
def test_modules_match_torch_and_share_its_state_dicts(kind, args, kwargs, dtype):
    theirs = getattr(torch.nn, kind)(*args, **kwargs, dtype=dtype)
    with torch.no_grad():
        for i, p in enumerate(theirs.parameters()):
            p.copy_(_rand(p.shape, dtype, 20 + i, loc=1.0, scale=0.3))
    ours = getattr(bt, kind)(*args, **kwargs, dtype=dtype)
    assert isinstance(ours, getattr(torch.nn, kind)) and repr(ours) == repr(theirs)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    back = getattr(torch.nn, kind)(*args, **kwargs, dtype=dtype)
    back.load_state_dict(ours.state_dict())
    for k, v in back.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k]), k

    x = _rand((3, 4, 16), dtype, 25, loc=-1.0, scale=2.0)
    g = _rand((3, 4, 16), dtype, 26)
    results = []
    for m in (ours, theirs):
        xg = x.clone().requires_grad_()
        y = m(xg)
        y.backward(g)
        results.append((y, xg.grad, [p.grad for p in m.parameters()]))
    (y, gx, gp), (yt, gxt, gpt) = results
    ns = tuple(theirs.normalized_shape)
    _assert_forward(y, x, ns, theirs.weight, getattr(theirs, "bias", None), theirs.eps, dtype, rms=kind == "RMSNorm")
    torch.testing.assert_close(y, yt)
    torch.testing.assert_close(gx, gxt)
    for a, b in zip(gp, gpt):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # eval without autograd: the kernel directly
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_modules_pickle_and_deepcopy_without_cached_views():
    m = bt.LayerNorm(8)
    x = torch.randn(2, 8)
    y = m(x)
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        with torch.no_grad():
            c.weight.mul_(2.0)
        torch.testing.assert_close(c(x), TF.layer_norm(x, (8,), c.weight, c.bias))
        torch.testing.assert_close(m(x), y)  # the original's parameters are its own
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = torch.nn.LayerNorm(8)
    other.load_state_dict(torch.load(buf))
    torch.testing.assert_close(other(x), y)


def test_module_sees_parameters_replaced_after_a_call():
    m = bt.RMSNorm(8)
    x = torch.randn(3, 8)
    with torch.no_grad():
        m(x)
        m.weight = torch.nn.Parameter(torch.full((8,), 3.0))
        torch.testing.assert_close(m(x), TF.rms_norm(x, [8], m.weight))
        m.load_state_dict({"weight": torch.full((8,), 0.5)})
        torch.testing.assert_close(m(x), TF.rms_norm(x, [8], torch.full((8,), 0.5)))


# ---- convert: a transformer block of torch.nn layers -----------------------------------------------------------------

class Block(torch.nn.Module):
    """A pre-norm transformer block: attention and an MLP, each behind a norm (LayerNorm, RMSNorm), and a final
    LayerNorm without bias."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = torch.nn.RMSNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
        self.final = torch.nn.LayerNorm(d, bias=False)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.final(x)


def test_convert_swaps_the_norms_of_a_transformer_block_and_keeps_its_results():
    torch.manual_seed(0)
    model = Block()
    reference = copy.deepcopy(model)
    params = dict(model.named_parameters())
    assert bt.convert(model) is model
    assert type(model.norm1) is bt.LayerNorm and type(model.norm2) is bt.RMSNorm and type(model.final) is bt.LayerNorm
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 10, 32)
    g = torch.randn(2, 10, 32)
    outs = []
    for m in (model, reference):
        xg = x.clone().requires_grad_()
        y = m(xg)
        y.backward(g)
        outs.append((y, xg.grad, {k: p.grad for k, p in m.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for k in outs[1][2]:
        torch.testing.assert_close(outs[0][2][k], outs[1][2][k], msg=k)
    # an optimizer step through the converted model, then eval without autograd
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    ref_opt.step()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x))


def test_convert_leaves_subclasses_alone():
    class MyNorm(torch.nn.LayerNorm):
        pass
    m = torch.nn.Sequential(MyNorm(4), torch.nn.LayerNorm(4))
    bt.convert(m)
    assert type(m[0]) is MyNorm and type(m[1]) is bt.LayerNorm


# ---- autograd's checks, threads, NaN ---------------------------------------------------------------------------------

def test_input_modified_in_place_after_the_forward_is_detected_by_autograd():
    base = torch.randn(3, 8, requires_grad=True)
    x = base * 1.0  # (a non-leaf tensor, which may be modified in place)
    y = bt.layer_norm(x, 8)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_results_and_gradients_are_bitwise_the_same_on_any_thread_count(kind, threads):
    x0 = _rand((256, 4, 512), torch.float32, 30, loc=1.0)
    g = _rand((256, 4, 512), torch.float32, 31)
    runs = []
    for n in (1, 2, 3):
        threads(n)
        x, w = x0.clone().requires_grad_(), torch.linspace(0.5, 1.5, 512).requires_grad_()
        y = bt.layer_norm(x, 512, w, None) if kind == "layer_norm" else bt.rms_norm(x, 512, w)
        y.backward(g)
        runs.append((y.detach(), x.grad, w.grad))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_nan_stays_in_its_row():
    x = torch.randn(4, 16, dtype=torch.float64)
    x[2, 5] = float("nan")
    for y in (bt.layer_norm(x, 16), bt.rms_norm(x, 16)):
        assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()


def test_negative_bit_views_are_read_as_their_values():
    # torch._neg_view: a view whose memory holds -x (the imaginary part of a conjugate is one); as input it goes to
    # PyTorch, as a gradient it is resolved
    x = _rand((3, 8), torch.float64, 50, loc=1.0)
    nx = torch._neg_view(x)
    torch.testing.assert_close(bt.layer_norm(nx, 8), TF.layer_norm(-x, (8,)))
    g = _rand((3, 8), torch.float64, 51)
    grads = []
    for fn in (bt.rms_norm, TF.rms_norm):
        xg = x.clone().requires_grad_()
        fn(xg, [8]).backward(torch._neg_view(g))
        grads.append(xg.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_a_parameter_re_pointed_at_the_same_address_in_another_layout_is_read_in_its_new_layout():
    m = bt.LayerNorm((3, 3))
    x = torch.randn(2, 3, 3)
    with torch.no_grad():
        m.weight.copy_(torch.arange(9.0).reshape(3, 3))
    m(x)  # (the module's views of its parameters made)
    m.weight.data = m.weight.data.t()  # the same storage and data_ptr, transposed strides
    torch.testing.assert_close(m(x), torch.nn.functional.layer_norm(x, (3, 3), m.weight, m.bias))


def test_errors_name_input_as_the_functions_arguments_do():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"input must have shape \[\*, 5\]"):
        bt.layer_norm(x, (5,))
    with pytest.raises(ValueError, match=r"input must have shape \[\*, 5\]"):
        bt.LayerNorm(5)(x)
    with pytest.raises(ValueError, match="residual must have the shape of input"):
        bt.rms_norm(x, (6,), residual=torch.randn(1, 6))
    buf = torch.randn(5, 6)
    with pytest.raises(ValueError, match="out overlaps input partially"):
        bt.layer_norm(buf[:4], (6,), out=buf[1:])
    with pytest.raises(ValueError, match="weight"):  # (another error, with out= x in place: not an overlap)
        bt.layer_norm(x, (6,), torch.ones(5), out=x)


def test_weight_of_normalized_shapes_size_but_another_shape_is_refused_as_torch():
    """PyTorch refuses a weight or bias of normalized_shape's size in another shape (a flat (30,) for (6, 5)); so do
    the functions and the converted modules here (the NumPy functions take either)."""
    x = _rand((2, 6, 5), torch.float32, 70)
    flat, ones = torch.ones(30), torch.ones(6, 5)
    for call in (lambda: bt.layer_norm(x, (6, 5), flat), lambda: bt.layer_norm(x, (6, 5), None, flat),
                 lambda: bt.rms_norm(x, (6, 5), flat), lambda: bt.layer_norm(x, (6, 5), flat, activation="relu"),
                 lambda: bt.layer_norm(x, 5, torch.ones(1, 5))):
        with pytest.raises(ValueError, match="normalized_shape"):
            call()
    torch.testing.assert_close(bt.layer_norm(x, (6, 5), ones), torch.nn.functional.layer_norm(x, (6, 5), ones))
    for cls in (torch.nn.LayerNorm, torch.nn.RMSNorm):
        m = bt.convert(cls((6, 5)))
        m(x)   # (views cached for the registered weight)
        m.weight = torch.nn.Parameter(torch.ones(30))
        with pytest.raises(ValueError, match="normalized_shape"):
            m(x)


@pytest.mark.parametrize("xdt, rdt", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                      (torch.bfloat16, torch.float16)])
def test_residual_of_another_dtype_is_named_with_torch_dtypes(xdt, rdt):
    x = _rand((2, 6, 8), torch.float32, 71).to(xdt)
    r = torch.zeros(2, 6, 8, dtype=rdt)
    for fn in (bt.layer_norm, bt.rms_norm):
        with pytest.raises(TypeError, match=rf"residual must have the dtype of input \({xdt}\), got {rdt}"):
            fn(x, 8, residual=r)


def test_rms_norm_takes_an_inference_tensor_with_a_weight_that_needs_grad():
    """torch.nn.RMSNorm runs on an x made under inference_mode (it saves intermediates, not x) and gives the weight
    its gradient; the converted module raised "Inference tensors cannot be saved for backward"."""
    with torch.inference_mode():
        x = torch.randn(4, 8)
    ref, ours = torch.nn.RMSNorm(8), bt.RMSNorm(8)
    ref(x).square().sum().backward()
    ours(x).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("residual", [False, True])
def test_fused_rms_norm_takes_inference_tensors_as_torchs_composition(residual):
    """silu(rms(x) [+ r]) with x (and r) made under inference_mode: PyTorch's composition saves neither, and runs; the
    fused module saved them and raised."""
    with torch.inference_mode():
        x, r = torch.randn(4, 8), torch.randn(4, 8)
    ref = torch.nn.RMSNorm(8)
    ours = bt.RMSNormAct(8, activation="silu")
    extra = (r,) if residual else ()
    torch.nn.functional.silu(ref(x) + (r if residual else 0)).square().sum().backward()
    ours(x, *extra).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
