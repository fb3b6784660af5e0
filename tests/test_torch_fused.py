"""bn_simd.torch's fused batch norm + activation (+ residual): functional, autograd, modules and
convert(model, fuse_activations=True), against PyTorch's unfused composition act(batch_norm(x) + residual)."""
import copy
import warnings
import pickle

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as TF  # noqa: E402

import bn_simd.torch as bt  # noqa: E402

# bn_simd's spelling -> PyTorch's function
ACTS = {
    "relu": torch.relu,
    "relu6": TF.relu6,
    ("leaky_relu", 0.2): lambda y: TF.leaky_relu(y, 0.2),
    ("clamp", -0.5, 0.75): lambda y: torch.clamp(y, -0.5, 0.75),
    "silu": TF.silu,
    None: lambda y: y,
}
ACT_IDS = ["relu", "relu6", "leaky", "clamp", "silu", "none"]


def eps_of(dtype):
    return torch.finfo(dtype).eps


def setup(dtype, channels_last, seed=0, shape=(4, 6, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype)
    rm = torch.randn(shape[1], generator=g, dtype=torch.float64).to(dtype) * 0.1
    rv = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    gy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x, r, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, gy))
    return x, r, w, b, rm, rv, gy


def bound(ref_terms, dtype, n=1):
    """Elementwise: a few roundings of dtype on the magnitude of the terms of the composition (PyTorch rounds the
    normalised value before the add and the activation; the fused sweep once at the end), plus the statistics'
    error over n values per channel."""
    return (16 + n) * eps_of(dtype) * ref_terms


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", list(ACTS), ids=ACT_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_backward_and_running_stats_match_the_unfused_composition(dtype, activation, with_residual,
                                                                          training, channels_last):
    if activation is None and not with_residual:
        pytest.skip("no epilogue: the plain batch norm (tested elsewhere)")
    x, r, w, b, rm, rv, gy = setup(dtype, channels_last, seed=len(ACT_IDS) * training + 2 * with_residual)
    ours = [t.clone().requires_grad_() for t in (x, w, b, r)]
    theirs = [t.clone().requires_grad_() for t in (x, w, b, r)]
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    res1 = ours[3] if with_residual else None
    y = bt.batch_norm(ours[0], rm1, rv1, ours[1], ours[2], training, 0.1, 1e-5, activation=activation,
                      residual=res1)
    bn = TF.batch_norm(theirs[0], rm2, rv2, theirs[1], theirs[2], training, 0.1, 1e-5)
    yr = ACTS[activation](bn + theirs[3] if with_residual else bn)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    n = x.numel() // x.shape[1]
    terms = (bn.detach().abs() + (r.abs() if with_residual else 0) + b.abs().view(1, -1, 1, 1) + 1).double()
    err = (y.detach().double() - yr.detach().double()).abs()
    assert bool((err <= bound(terms, dtype, n)).all()), f"y: {err.max().item():.3g}"
    torch.testing.assert_close(rm1, rm2, rtol=0, atol=float(8 * eps_of(dtype)))
    torch.testing.assert_close(rv1, rv2, rtol=float(8 * n * eps_of(dtype)), atol=0)
    y.backward(gy)
    yr.backward(gy)
    # gradients: the same formulas; PyTorch's activation derivative at the rounded BN output, ours at the unrounded
    # value (they differ only for elements within a rounding of a kink: none of these data is that close)
    gscale = float(gy.double().abs().max()) * float(w.double().abs().max()) * 8
    for k, name in enumerate(("grad_x", "grad_weight", "grad_bias", "grad_residual")):
        a, c = ours[k].grad, theirs[k].grad
        if name == "grad_residual" and not with_residual:
            assert a is None
            continue
        tol = (32 + n) * float(eps_of(dtype)) * gscale * (n if name in ("grad_weight", "grad_bias") else 1)
        assert a.dtype == c.dtype == dtype, name
        err = float((a.double() - c.double()).abs().max())
        assert err <= tol, f"{name}: {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("activation", ["relu", ("leaky_relu", 0.1), "silu", ("clamp", -1.0, 1.0)],
                         ids=["relu", "leaky", "silu", "clamp"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_in_float64(activation, training):
    x, r, w, b, rm, rv, _ = setup(torch.float64, False, seed=3, shape=(3, 4, 3, 2))
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]

    def f(x_, w_, b_, r_):
        return bt.batch_norm(x_, rm.clone(), rv.clone(), w_, b_, training, 0.1, 1e-5, activation=activation,
                             residual=r_)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_16_bit_data_agrees_with_the_float32_composition_within_an_ulp():
    for dtype in (torch.float16, torch.bfloat16):
        x, r, w, b, rm, rv, _ = setup(torch.float32, True, seed=5)
        x16, r16 = x.to(dtype), r.to(dtype)
        y = bt.batch_norm(x16, rm, rv, w, b, False, activation="relu", residual=r16)
        ref = torch.relu(TF.batch_norm(x16.float(), rm, rv, w, b, False) + r16.float())
        assert y.dtype == dtype
        ulp = torch.finfo(dtype).eps * ref.abs().clamp(min=torch.finfo(dtype).tiny)
        assert bool(((y.float() - ref).abs() <= ulp + 1e-6).all())


def test_out_in_place_and_under_no_grad():
    x, r, w, b, rm, rv, _ = setup(torch.float32, False, seed=7)
    expected = bt.batch_norm(x, rm, rv, w, b, False, activation="relu6", residual=r)
    out = torch.empty_like(x)
    assert bt.batch_norm(x, rm, rv, w, b, False, activation="relu6", residual=r, out=out) is out
    assert torch.equal(out, expected)
    inplace = x.clone()
    bt.batch_norm(inplace, rm, rv, w, b, False, activation="relu6", residual=r, out=inplace)
    assert torch.equal(inplace, expected)


def test_bad_activation_or_residual_is_refused_and_changes_nothing():
    x, r, w, b, rm, rv, _ = setup(torch.float32, False, seed=8)
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(ValueError, match="activation"):
        bt.batch_norm(x, rm, rv, w, b, True, activation="gelu")
    with pytest.raises(ValueError, match="residual"):
        bt.batch_norm(x, rm, rv, w, b, True, activation="relu", residual=r[:, :3])
    with pytest.raises(TypeError, match="residual"):
        bt.batch_norm(x, rm, rv, w, b, True, activation="relu", residual=r.double())
    with pytest.raises(TypeError, match="residual"):
        bt.batch_norm(x, rm, rv, w, b, True, activation="relu", residual=r.numpy())
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    with pytest.raises(ValueError, match="activation"):
        bt.BatchNormAct2d(6, activation=("clamp", 1.0, -1.0))


def test_calls_the_kernels_do_not_cover_compute_pytorchs_composition():
    x, r, w, b, rm, rv, _ = setup(torch.float64, False, seed=9)
    # eps = 0 (the kernels need eps > 0) and a float64 residual beside float64 input on PyTorch's path
    y = bt.batch_norm(x, rm, rv, w, b, False, 0.1, 0.0, activation=("leaky_relu", 0.2), residual=r)
    ref = TF.leaky_relu(TF.batch_norm(x, rm, rv, w, b, False, 0.1, 0.0) + r, 0.2)
    assert torch.equal(y, ref)


# ---- modules -----------------------------------------------------------------------------------------------------

def test_batchnormact2d_is_a_batchnorm2d_with_an_activation_and_a_residual_argument():
    m = bt.BatchNormAct2d(6, activation=("leaky_relu", 0.2))
    ref = nn.BatchNorm2d(6)
    assert isinstance(m, nn.BatchNorm2d) and isinstance(m, bt.BatchNorm2d)
    assert m.state_dict().keys() == ref.state_dict().keys()
    assert "activation=('leaky_relu', 0.2)" in repr(m)
    x, r, *_ = setup(torch.float32, True, seed=10)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    ref.load_state_dict(m.state_dict())
    for training in (True, False):
        m.train(training)
        ref.train(training)
        y = m(x, r)
        yr = TF.leaky_relu(ref(x) + r, 0.2)
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(m.running_var, ref.running_var)
    assert int(m.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is bt.BatchNormAct2d and clone.activation == m.activation
        assert torch.equal(clone.eval()(x, r), m.eval()(x, r))


class Block(nn.Module):
    """ResNet's BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, c, down=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.down = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) if down else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        return self.relu(out + identity)


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def test_convert_fuses_bn_relu_pairs_and_the_residual_add_of_a_resnet_block():
    model = _randomise(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), Block(8), Block(8, down=True),
                                     nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 1),
                                     nn.BatchNorm2d(8), nn.LeakyReLU(0.3), nn.BatchNorm2d(8)), 1).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
    fused = bt.convert(copy.deepcopy(model), fuse_activations=True)
    acts = {type(m): m.activation for m in fused.modules() if isinstance(m, bt.BatchNormAct2d)}
    kinds = sorted(str(m.activation) for m in fused.modules() if isinstance(m, bt.BatchNormAct2d))
    # the first BN + ReLU, each block's bn1 + relu and bn2 + add + relu, BN + SiLU, BN + LeakyReLU; the
    # downsample's BN (its output is added) and the last BN (nothing follows) stay plain
    assert kinds == ["('leaky_relu', 0.3)", "relu", "relu", "relu", "relu", "relu", "silu"], kinds
    assert acts
    residual_calls = [n for n in fused.graph.nodes if n.op == "call_module" and len(n.args) == 2]
    assert len(residual_calls) == 2
    plain = sum(type(m) is bt.BatchNorm2d for m in fused.modules())
    assert plain == 2
    assert_same_as_unfused(fused, model, x, expected)


def assert_same_as_unfused(fused, model, x, expected, tol=1e-5):
    """fused, convert(model, fuse_activations=True), gives the unfused float32 model's eval output (expected) within
    float32 rounding (tol: as the model's later layers amplify it) and, in training in float64, the input and parameter gradients of the unfused converted model
    (float64: the normalizations' backward cancels terms of the gradient's size, which float32 leaves at 1e-3 of
    it)."""
    with torch.no_grad():
        got = fused(x)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    fused.double().train()
    ref = bt.convert(copy.deepcopy(model)).double().train()
    x1, x2 = x.double().requires_grad_(), x.double().requires_grad_()
    fused(x1).square().sum().backward()  # (a square: the sum of a normalization's output has no gradient)
    ref(x2).square().sum().backward()
    grads = [("x", x1.grad, x2.grad)] + [(k, p.grad, dict(ref.named_parameters())[k].grad)
                                         for k, p in fused.named_parameters()]
    assert float(x2.grad.abs().max()) > 1e-6
    for name, a, c in grads:  # (a conv bias before a training batch norm has none: 0 and noise of 1e-17)
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12 + 1e-9 * float(c.abs().max()), msg=name)


def test_a_module_used_twice_or_whose_output_is_read_elsewhere_is_not_fused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.bn_b = nn.BatchNorm2d(4)

        def forward(self, x):
            a = torch.relu(self.bn(x))
            b = torch.relu(self.bn(x * 2))   # the same module twice
            c = self.bn_b(x)
            return a + b + torch.relu(c) + c  # bn_b's output read twice

    model = _randomise(Twice(), 2).eval()
    fused = bt.convert(copy.deepcopy(model), fuse_activations=True)
    assert not any(isinstance(m, bt.BatchNormAct2d) for m in fused.modules())
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)


def test_an_untraceable_model_has_its_sequential_pairs_fused_in_place():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU6())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.body(x)
            return -self.body(x)

    model = _randomise(Dynamic(), 3).eval()
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    # traced: its forward could read inside body (an iteration of it), so nothing is fused, with a warning
    with pytest.warns(RuntimeWarning, match="could not trace Dynamic.*trace=False"):
        assert bt.convert(copy.deepcopy(model), fuse_activations=True).body[1].__class__ is bt.BatchNorm2d
    whole = nn.Sequential(copy.deepcopy(model), nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()))
    with pytest.warns(RuntimeWarning, match="could not trace Sequential"):   # the nested Sequential runs whole
        assert type(bt.convert(whole, fuse_activations=True)[1][0]) is bt.BatchNormAct2d
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = bt.convert(model, fuse_activations=True, trace=False)   # the caller's word: body runs whole
    assert same is model
    assert type(model.body[1]) is bt.BatchNormAct2d and model.body[1].activation == "relu6"
    assert type(model.body[2]) is nn.Identity
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


class _Block(nn.Module):
    """conv -> bn -> relu in a Sequential; traceable or not (data-dependent control flow)."""

    def __init__(self, traceable):
        super().__init__()
        self.traceable = traceable
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if not self.traceable and x.sum() > -1e30:
            return self.body(x) * 1.0
        return self.body(x)


@pytest.mark.parametrize("traceable", [True, False], ids=["traced", "sequential"])
@pytest.mark.parametrize("where", ["bn_forward", "bn_pre", "bn_backward", "act_forward", "every_module"])
def test_a_pair_with_hooks_is_not_fused_and_its_hooks_see_what_they_saw(where, traceable):
    model = _randomise(_Block(traceable), 7).eval()
    calls = []

    def hook(m, args, out=None):
        calls.append(type(m).__name__)
        if where == "bn_forward":
            return out + 1  # the hook changes the output: the activation must see it
        if where == "bn_pre":
            return (args[0] * 2,)

    bn, act = model.body[1], model.body[2]
    handle = {"bn_forward": lambda: bn.register_forward_hook(hook),
              "bn_pre": lambda: bn.register_forward_pre_hook(hook),
              "bn_backward": lambda: bn.register_full_backward_hook(lambda m, gi, go: calls.append("bwd")),
              "act_forward": lambda: act.register_forward_hook(hook),
              "every_module": lambda: nn.modules.module.register_module_forward_hook(hook)}[where]()
    try:
        x = torch.randn(2, 3, 4, 4)
        expected = model(x)
        n_calls = len(calls)
        fused = bt.convert(model, fuse_activations=True)
        assert not any(isinstance(m, bt.BatchNormAct2d) for m in fused.modules())
        calls.clear()
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-6)
        assert len(calls) == n_calls
    finally:
        handle.remove()


def test_a_norm_registered_twice_is_not_fused_in_place():
    bn = nn.BatchNorm2d(4)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(bn, nn.ReLU(), nn.Conv2d(4, 4, 1), bn, nn.Tanh())  # one bn, two uses

        def forward(self, x):
            if x.sum() > -1e30:  # untraceable: the in-place Sequential fusion
                return self.body(x)
            return x

    model = _randomise(Shared(), 8).eval()
    x = torch.randn(2, 4, 3, 3)
    expected = model(x)
    fused = bt.convert(model, fuse_activations=True)
    assert type(bn) is bt.BatchNorm2d and type(fused.body[1]) is nn.ReLU
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "relu6", ("leaky_relu", 0.2), ("clamp", None, 0.0),
                                        ("clamp", None, -0.0), ("clamp", -0.5, None), ("clamp", -0.5, 0.75),
                                        ("clamp", float("inf"), float("inf")), ("clamp", -float("inf"), -float("inf"))])
def test_pytorchs_composition_gives_the_kernels_values_and_gradients_at_the_edges(activation):
    """The calls the kernels do not cover take PyTorch's composition of the activation (fused._torch_activation): its
    values (signed zeros and NaN kept as the kernels keep them) and gradients (at +-Inf, NaN, the bounds, infinite
    bounds) are the kernels'. Kernels: float64 eval with the identity's coefficients (bias -0, so u is x exactly)."""
    import numpy as np

    import bn_simd
    from bn_simd.torch import fused
    u = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, -0.5, 0.75, 6.0, 0.3, -2.0])
    x = u.reshape(1, 10, 1)
    rm, rv, w, b = np.zeros(10), np.ones(10), np.ones(10), np.full(10, -0.0)
    yk = bn_simd.batch_norm(x, rm, rv, w, b, eps=1e-300, activation=activation).reshape(-1)
    gk = bn_simd.batch_norm_backward(np.ones_like(x), x, None, None, w, training=False, eps=1e-300,
                                     activation=activation, bias=b, save_stats=(rm, rv))[0].reshape(-1)
    xf = torch.tensor(u, requires_grad=True)
    yf = fused._torch_activation(xf, activation)
    yf.backward(torch.ones_like(yf))
    np.testing.assert_array_equal(np.signbit(yk), np.signbit(yf.detach().numpy()), err_msg=str(activation))
    np.testing.assert_array_equal(yk, yf.detach().numpy(), err_msg=str(activation))
    np.testing.assert_array_equal(gk, xf.grad.numpy(), err_msg=str(activation))


@pytest.mark.parametrize("lo, hi", [(0.0, float("inf")), (-float("inf"), 6.0), (-float("inf"), float("inf"))])
def test_a_hardtanh_with_an_infinite_bound_is_not_fused_and_keeps_its_gradients(lo, hi):
    """An infinite bound is none to the kernels' clamp but a kink to Hardtanh's gradient (0 at u = +-Inf there, and at
    NaN): such a pair stays unfused, so its gradients are PyTorch's."""
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Hardtanh(lo, hi))
    ref = copy.deepcopy(model)
    fused_model = bt.convert(model, fuse_activations=True)
    assert not any(isinstance(m, bt.BatchNormAct1d) for m in fused_model.modules())
    x = torch.tensor([[float("inf"), 1.0, float("nan")], [-float("inf"), -1.0, 2.0], [0.5, 3.0, -2.0]],
                     requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    fused_model(x).sum().backward()
    ref(xr).sum().backward()
    assert torch.equal(x.grad.isnan(), xr.grad.isnan())
    torch.testing.assert_close(x.grad.nan_to_num(), xr.grad.nan_to_num())


class _ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return TF.dropout(torch.relu(self.bn(self.conv(x))), 0.5, training=self.training)


class _FrozenStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        with torch.no_grad():
            x = self.stem(x)
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("cls", [_ModeDependent, _FrozenStem])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forwards_a_graph_would_not_follow_are_not_traced(cls, mode):
    """self.training read in forward (the graph would freeze the mode), or a no_grad region (tracing drops it): the
    model is returned as it is, unfused, with a RuntimeWarning; its modes and gradients are torch.nn's."""
    torch.manual_seed(0)
    model = getattr(cls(), mode)()
    modes = [m.training for m in model.modules()]
    with pytest.warns(RuntimeWarning, match="not fused through torch.fx"):
        out = bt.convert(model, fuse_activations=True)
    assert out is model and type(model.bn) is bt.BatchNorm2d and [m.training for m in model.modules()] == modes
    x = torch.randn(2, 3, 4, 4)
    model.eval()
    torch.testing.assert_close(model(x), model(x))   # (no dropout in eval, whatever mode it was converted in)
    if cls is _FrozenStem:
        model.train()
        model(x).sum().backward()
        assert model.stem.weight.grad is None and model.conv.weight.grad is not None


def test_global_hooks_stop_the_trace_before_it_runs():
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(o).__name__))
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).eval()
        assert bt.convert(model, fuse_activations=True) is model and type(model[1]) is bt.BatchNorm2d
        assert "Proxy" not in seen
    finally:
        handle.remove()


class _NormEvalBackbone(nn.Module):
    """A backbone whose train() keeps its batch norms in eval mode (detection backbones' norm_eval)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))

    def train(self, mode=True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


class _Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.head = _NormEvalBackbone(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_a_model_overriding_train_keeps_its_override():
    """A GraphModule rebuilds the modules a trace goes through as plain ones: a train() override would be lost and
    the frozen batch norms would train. Such a model is fused in place (its Sequentials) with a RuntimeWarning, and
    train() still keeps the norms in eval mode: outputs and running statistics are the reference's."""
    torch.manual_seed(0)
    ref = _Detector()
    model = copy.deepcopy(ref)
    with pytest.warns(RuntimeWarning, match="overrides train"):
        out = bt.convert(model, fuse_activations=True)
    assert out is model
    ref.train()
    out.train()
    assert not out.backbone.bn.training
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(out(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.backbone.bn.running_mean, ref.backbone.bn.running_mean)
    assert torch.count_nonzero(out.backbone.bn.running_mean) == 0


class _NonPersistent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x - self.mean)))


class _AuxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
        self.aux = nn.Linear(4, 2)   # (used by another method, not by forward)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("cls", [_NonPersistent, _AuxHead])
def test_a_graph_that_would_change_the_state_dict_keys_is_not_made(cls):
    """torch.fx's GraphModule keeps only the modules the forward calls and makes every buffer persistent: the model's
    checkpoints would no longer load. Such a model is returned itself (Sequentials fused in place), with a
    RuntimeWarning, and its state_dict loads both ways."""
    torch.manual_seed(0)
    ref = cls()
    with pytest.warns(RuntimeWarning, match="state_dict keys"):
        model = bt.convert(copy.deepcopy(ref), fuse_activations=True)
    assert type(model) is cls and set(model.state_dict()) == set(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(model.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)


class _SkipWrittenLater(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv, self.bn, self.relu, self.act = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.ReLU(True)

    def forward(self, x):
        r = x * 2
        y = self.relu(self.bn(self.conv(x)) + r)
        z = self.act(r) if self.how == "module" else r.mul_(3) if self.how == "method" else torch.relu(r)
        return y + z


@pytest.mark.parametrize("how", ["module", "method", "none"])
def test_a_residual_written_in_place_later_is_not_fused(how):
    """The fused call saves the residual for its backward (the add it replaces does not): a residual another use
    writes in place (nn.ReLU(inplace=True), r.mul_) would fail that backward, so it stays an add; a residual read
    only is fused. Gradients are the reference's either way."""
    torch.manual_seed(0)
    ref = _SkipWrittenLater(how)
    model = bt.convert(copy.deepcopy(ref), fuse_activations=True)
    fused = any(isinstance(m, bt.BatchNormAct2d) for m in model.modules())
    assert fused == (how == "none")
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    model(x).sum().backward()
    ref(xr).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.conv.weight.grad, ref.conv.weight.grad, rtol=1e-5, atol=1e-5)


def test_a_traced_fusion_keeps_the_models_parameter_order():
    """torch.fx's GraphModule registers submodules in the order the forward first uses them: a block that uses its
    embedding before its second norm listed emb's parameters before norm2's, and an optimizer checkpoint of the model
    (its state by position) loaded onto the wrong parameters, silently where the shapes agree."""
    class Block(nn.Module):
        def __init__(self, C=8):
            super().__init__()
            self.norm, self.conv, self.norm2 = nn.GroupNorm(4, C), nn.Conv2d(C, C, 3, padding=1), nn.GroupNorm(4, C)
            self.emb = nn.Linear(16, C)

        def forward(self, x, t):
            h = self.conv(TF.silu(self.norm(x))) + self.emb(t)[:, :, None, None]
            return TF.silu(self.norm2(h))

    torch.manual_seed(0)
    model = Block()
    opt = torch.optim.Adam(model.parameters())
    x, t = torch.randn(2, 8, 6, 6), torch.randn(2, 16)
    model(x, t).square().mean().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = bt.convert(Block(), fuse_activations=True)
    assert sum(isinstance(m, bt.GroupNormAct) for m in fused.modules()) == 2
    assert [k for k, _ in fused.named_parameters()] == [k for k, _ in model.named_parameters()]
    fused.load_state_dict(model.state_dict())
    opt2 = torch.optim.Adam(fused.parameters())
    opt2.load_state_dict(opt.state_dict())
    ref = dict(model.named_parameters())
    for k, p in fused.named_parameters():
        assert torch.equal(opt2.state[p]["exp_avg"], opt.state[ref[k]]["exp_avg"])


class _Stage(nn.Module):
    """conv -> BN -> ReLU in a Sequential (the pair) inside a block whose forward the trace goes through."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


@pytest.mark.parametrize("where", ["root", "container", "backward"])
def test_hooks_on_a_module_the_trace_goes_through_keep_the_model_untraced(where):
    """A GraphModule rebuilds the root and every module the trace goes through (nn.Sequential too) as plain modules
    without their hooks: a Grad-CAM hook on a stage, or a root hook replacing the output, would not run. Such a model
    is not traced (only Sequentials that run whole would be fused in place), with a RuntimeWarning, and its hooks run
    as before."""
    torch.manual_seed(0)
    ref = _Stage()
    model = copy.deepcopy(ref)
    calls = []
    target = model if where != "container" else model.body
    if where == "backward":
        target.register_full_backward_hook(lambda m, gi, go: calls.append("bwd"))
    else:
        target.register_forward_hook(lambda m, i, o: (calls.append("fwd"), o * 0)[1])
    with pytest.warns(RuntimeWarning, match="has hooks"):
        fused = bt.convert(model, fuse_activations=True)
    assert fused is model
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    y = fused(x)
    y.sum().backward()
    assert calls == (["bwd"] if where == "backward" else ["fwd"])
    with torch.no_grad():
        want = ref(x)
    if where == "root":
        want = want * 0
    elif where == "container":
        want = ref.fc(torch.zeros(2, 4))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


class _GradRegionInHelper(nn.Module):
    """A frozen stem run under no_grad in a helper method (torchvision's _forward_impl pattern), a pair after it."""

    def __init__(self, region):
        super().__init__()
        self.region = region
        self.stem, self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def _stem(self, x):
        if self.region.startswith("checkpoint"):
            from torch.utils import checkpoint
            return checkpoint.checkpoint(self.stem, x, use_reentrant=self.region == "checkpoint_reentrant")
        ctx = {"no_grad": torch.no_grad, "inference": torch.inference_mode,
               "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[self.region]()
        with ctx:
            h = self.stem(x)
        return h.clone() if self.region == "inference" else h.float()

    def forward(self, x):
        return TF.relu(self.bn(self.conv(self._stem(x))))


@pytest.mark.parametrize("region", ["no_grad", "inference", "autocast"])
def test_a_grad_or_autocast_region_in_a_helper_method_keeps_the_model_untraced(region):
    """torch.fx drops grad-mode, inference-mode and autocast regions, wherever the forward enters them (the source
    of the forward itself was read for them; a helper method's was not): a frozen stem got gradients. The trace notes
    an operation recorded under another mode than its own; the model is fused in place, its stem still frozen."""
    torch.manual_seed(0)
    ref = _GradRegionInHelper(region)
    model = copy.deepcopy(ref)
    with pytest.warns(RuntimeWarning, match="no_grad / inference_mode / autocast / saved-tensor-hooks region"):
        fused = bt.convert(model, fuse_activations=True)
    assert fused is model
    x = torch.randn(2, 3, 5, 5)
    y, yr = fused(x), ref(x)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)  # (autocast: the stem in bfloat16 in both)
    y.sum().backward()
    yr.sum().backward()
    assert (model.stem.weight.grad is None) == (region != "autocast") == (ref.stem.weight.grad is None)
    torch.testing.assert_close(model.conv.weight.grad, ref.conv.weight.grad, rtol=1e-5, atol=1e-5)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _QuantNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(_RoundSTE.apply(self.conv(x) * 4)))


def test_a_custom_autograd_function_keeps_the_model_untraced():
    """A torch.autograd.Function applied in the traced forward (a straight-through estimator of quantization-aware
    training) was recorded as its forward's operations, its backward lost: the conv's gradient was 0 (round's). The
    model is fused in place, its gradients the reference's; torch.autograd.Function.apply is torch's again after."""
    torch.manual_seed(0)
    ref = _QuantNet()
    apply = torch.autograd.Function.__dict__["apply"]
    with pytest.warns(RuntimeWarning, match="autograd Function _RoundSTE"):
        model = bt.convert(copy.deepcopy(ref), fuse_activations=True)
    assert torch.autograd.Function.__dict__["apply"] is apply and type(model) is _QuantNet
    x = torch.randn(2, 3, 4, 4)
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert float(ref.conv.weight.grad.abs().sum()) > 0
    torch.testing.assert_close(model.conv.weight.grad, ref.conv.weight.grad, rtol=1e-4, atol=1e-4)


class _KeepsFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        f = TF.relu(self.bn(self.conv(x)))
        self.features = f  # (kept for class activation maps)
        self.calls += 1
        return self.fc(f.mean((2, 3)))


def test_a_forward_that_assigns_attributes_keeps_the_model_untraced_and_as_it_was():
    """The trace runs the forward: an attribute it assigns held a torch.fx Proxy in the user's model afterwards, and
    the GraphModule would not assign it at all. The model's attributes are put back and it is not traced."""
    model = _KeepsFeatures()
    with pytest.warns(RuntimeWarning, match="assigns module attributes"):
        fused = bt.convert(model, fuse_activations=True)
    assert fused is model and model.calls == 0 and "features" not in model.__dict__
    y = fused(torch.randn(2, 3, 6, 6))
    assert isinstance(model.features, torch.Tensor) and model.calls == 1 and y.shape == (2, 2)


class _ResidualViewWritten(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        base = x * 1
        idt = base[:, :4] if self.how == "slice_of_written" else base
        out = TF.relu(self.bn(x) + idt)
        if self.how == "view_written":
            v = idt.flatten(1)
            v.relu_()
        elif self.how == "slice_of_written":
            self.act(base)
        elif self.how == "data_written":
            idt.data.mul_(0)
        elif self.how == "ravel_data_written":
            torch.ravel(idt).data.mul_(-5)
        elif self.how == "einsum_view_written":
            torch.einsum("nchw->nchw", idt).relu_()
        elif self.how == "broadcast_written":
            torch.broadcast_to(idt, idt.shape).data.mul_(2)
        return out + base.sum()


@pytest.mark.parametrize("how", ["view_written", "slice_of_written", "data_written", "ravel_data_written",
                                 "einsum_view_written", "broadcast_written"])
def test_a_residual_written_in_place_through_a_view_or_its_base_is_not_fused(how):
    """The residual saved by the fused call must not be written later through any tensor sharing its memory: a view
    of it (idt.flatten(1).relu_()), the tensor it is a slice of (an in-place ReLU on it), or its .data (unseen by the
    version counter: silently wrong gradients). Such a pair stays an add; gradients are the reference's."""
    torch.manual_seed(0)
    ref = _ResidualViewWritten(how)
    model = bt.convert(copy.deepcopy(ref), fuse_activations=True)
    assert not any(isinstance(m, bt.BatchNormAct2d) for m in model.modules())
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    model(x).square().sum().backward()
    ref(xr).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_a_fused_graph_drops_the_activation_modules_it_replaced():
    """The GraphModule no longer registers the activation modules its fused modules replaced (editing them would
    change nothing); the state dict is the model's."""
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
            self.out = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.out(self.act(self.bn(self.conv(x)))) * 2

    fused = bt.convert(Wrap(), fuse_activations=True)
    assert isinstance(fused.bn, bt.BatchNormAct2d) and not hasattr(fused, "act")
    assert set(fused.state_dict()) == set(Wrap().state_dict())


class _AttributeWrites(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.feats, self.cache, self.steps = [], {}, 0

    def forward(self, x):
        y = TF.relu(self.bn(self.conv(x)))
        if self.how == "append":
            self.feats.append(y)
        elif self.how == "dict":
            self.cache["y"] = y
        elif self.how == "training_only" and self.training:
            self.steps += 1
        return y


@pytest.mark.parametrize("how", ["append", "dict", "training_only"])
@pytest.mark.parametrize("train", [True, False])
def test_a_forward_that_adds_to_attribute_containers_or_assigns_in_one_mode_keeps_the_model_untraced(how, train):
    """A forward appending to a list attribute or setting a dict item (a Proxy in the user's model afterwards, the
    graph never doing it), or assigning only in training (seen by the other mode's trace), is not traced; the model's
    containers and counters are as before the conversion."""
    model = _AttributeWrites(how).train(train)
    with pytest.warns(RuntimeWarning, match="assigns module attributes"):
        fused = bt.convert(model, fuse_activations=True)
    assert fused is model and model.feats == [] and model.cache == {} and model.steps == 0
    model.train()(torch.randn(2, 3, 4, 4))
    assert len(model.feats) + len(model.cache) + model.steps == 1


def test_a_constant_made_in_the_forward_is_no_attribute_assignment():
    """torch.fx sets the constants a forward makes (torch.arange) on the root as _tensor_constant attributes: the
    trace freezes them, so the model is not traced (the warning says so, not that its forward assigns attributes);
    the attributes are not left on the model."""
    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            return self.net(x) * torch.arange(4.0).view(1, 4, 1, 1)

    model = Const()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fused = bt.convert(model, fuse_activations=True)
    said = [str(w.message) for w in seen]
    assert any("froze a tensor" in m for m in said) and not any("assigns" in m for m in said)
    assert fused is model and not any(k.startswith("_tensor_constant") for k in model.__dict__)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_in_a_helper_method_keeps_the_model_untraced(reentrant):
    """Activation checkpointing in a method the forward calls (the forward's own source is read for it): reentrant
    checkpointing applies an autograd Function, the non-reentrant one sets saved-tensor hooks; either way a graph
    would not recompute, so the model is not traced."""
    model = _GradRegionInHelper("checkpoint_reentrant" if reentrant else "checkpoint")
    with pytest.warns(RuntimeWarning, match="checkpoint"):
        fused = bt.convert(model, fuse_activations=True)
    assert fused is model


def test_conversions_in_threads_leave_function_apply_as_torchs():
    """A trace patches torch.autograd.Function.apply while it runs: conversions in several threads at once trace one
    at a time, and leave it torch's."""
    import threading
    apply = torch.autograd.Function.__dict__["apply"]
    models = [_QuantNet() if i % 2 else nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
              for i in range(6)]
    out = [None] * len(models)

    def run(i):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[i] = bt.convert(models[i], fuse_activations=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.autograd.Function.__dict__["apply"] is apply
    assert all(type(o) is _QuantNet for o in out[1::2])
