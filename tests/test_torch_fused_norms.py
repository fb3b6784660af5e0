"""bn_simd.torch's fused modules for group, instance, layer and RMS norm (GroupNormAct, InstanceNormAct1d/2d/3d,
LayerNormAct, RMSNormAct), instance_norm's activation= / residual=, and convert(model, fuse_activations=True) on those
normalizations, against PyTorch's unfused composition act(torch.nn.<Norm>(x) + residual)."""
import copy
import itertools
import pickle

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as TF  # noqa: E402

import bn_simd.torch as bt  # noqa: E402
from fake_comm import make_comms  # noqa: E402
from test_torch_fused import ACTS, assert_same_as_unfused, eps_of  # noqa: E402

SHAPE = (4, 6, 5, 7)  # (N, C, H, W)


def _instance(act=None, d=2):
    cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[d]
    ours = {1: bt.InstanceNormAct1d, 2: bt.InstanceNormAct2d, 3: bt.InstanceNormAct3d}[d]
    kw = dict(affine=True, track_running_stats=True)
    return (cls(6, **kw) if act is None else ours(6, activation=act, **kw)), 5 * 7


# kind -> (make(activation or None for torch.nn's module) -> (module, values per statistic), channels-last too)
KINDS = {
    "group": (lambda act: ((nn.GroupNorm(3, 6) if act is None else bt.GroupNormAct(3, 6, activation=act)),
                           2 * 5 * 7), True),
    "instance": (_instance, True),
    "layer": (lambda act: ((nn.LayerNorm((5, 7)) if act is None else bt.LayerNormAct((5, 7), activation=act)),
                           5 * 7), False),
    "rms": (lambda act: ((nn.RMSNorm(7) if act is None else bt.RMSNormAct(7, activation=act)), 7), False),
}
# torch.nn class -> bn_simd's fused class, for the state-dict checks
PAIRS = [(nn.GroupNorm, bt.GroupNormAct, (3, 6)), (nn.InstanceNorm1d, bt.InstanceNormAct1d, (6,)),
         (nn.InstanceNorm2d, bt.InstanceNormAct2d, (6,)), (nn.InstanceNorm3d, bt.InstanceNormAct3d, (6,)),
         (nn.LayerNorm, bt.LayerNormAct, ((5, 7),)), (nn.RMSNorm, bt.RMSNormAct, (7,))]


def _randomised(module, dtype, seed):
    """module in dtype with random parameters (weights away from 0) and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
            if name == "num_batches_tracked":
                continue
            r = torch.rand(t.shape, generator=g, dtype=torch.float64)
            t.copy_({"weight": r + 0.5, "bias": r - 0.5, "running_mean": 0.2 * (r - 0.5),
                     "running_var": r + 0.5}[name])
    return module.to(dtype)


def _pair(kind, act, dtype, seed):
    """(ours, torch.nn's, values per statistic): the same random state in both."""
    make, _ = KINDS[kind]
    ref, n = make(None)
    ref = _randomised(ref, dtype, seed)
    ours = make(act)[0].to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref, n


def _data(dtype, channels_last, seed, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    x, r, gy = ((torch.randn(shape, generator=g, dtype=torch.float64) * s + o).to(dtype)
                for s, o in ((2.0, 0.5), (1.0, 0.0), (1.0, 0.0)))
    if channels_last:
        x, r, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, gy))
    return x, r, gy


CASES = [(k, a, d, t, res, cl) for k, (_, cl_ok) in KINDS.items() for a in ("silu", "relu", ("leaky_relu", 0.2))
         for d in (torch.float64, torch.float32) for t in (True, False) for res in (False, True)
         for cl in ((False, True) if cl_ok else (False,))]


def _case_id(c):
    k, a, d, t, res, cl = c
    return "-".join([k, a if isinstance(a, str) else "leaky", str(d)[6:], "train" if t else "eval",
                     "residual" if res else "plain"] + (["channels_last"] if cl else []))


@pytest.mark.parametrize("kind, activation, dtype, training, with_residual, channels_last", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_module_forward_and_gradients_match_the_unfused_torch_composition(kind, activation, dtype, training,
                                                                          with_residual, channels_last):
    seed = CASES.index((kind, activation, dtype, training, with_residual, channels_last))
    ours, ref, n = _pair(kind, activation, dtype, seed)
    ours.train(training)
    ref.train(training)
    x, r, gy = _data(dtype, channels_last, seed)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    r1, r2 = r.clone().requires_grad_(), r.clone().requires_grad_()
    y = ours(x1, r1) if with_residual else ours(x1)
    normed = ref(x2)
    yr = ACTS[activation](normed + r2 if with_residual else normed)
    assert y.dtype == dtype and y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    # a few roundings of dtype on the composition's terms (PyTorch rounds the normalised value before the add and
    # the activation, the fused sweep once at the end), plus the statistics' error over n values
    terms = (normed.detach().abs() + (r.abs() if with_residual else 0) + 2).double()
    err = (y.detach().double() - yr.detach().double()).abs()
    assert bool((err <= (16 + n) * eps_of(dtype) * terms).all()), f"y: {err.max().item():.3g}"
    for name, buf in ref.named_buffers():  # instance norm's running statistics (updated in training)
        if name != "num_batches_tracked":
            torch.testing.assert_close(ours.get_buffer(name), buf, rtol=8 * n * eps_of(dtype),
                                       atol=8 * eps_of(dtype))
    y.backward(gy)
    yr.backward(gy)
    wmax = max(float(p.detach().abs().max()) for p in ref.parameters())
    gscale = float(gy.double().abs().max()) * wmax * 8
    tol = (32 + n) * eps_of(dtype) * gscale
    grads = [("grad_x", x1.grad, x2.grad)] + [(f"grad_{k}", p.grad, dict(ref.named_parameters())[k].grad)
                                              for k, p in ours.named_parameters()]
    if with_residual:
        grads.append(("grad_residual", r1.grad, r2.grad))
    else:
        assert r1.grad is None
    for name, a, c in grads:
        assert a is not None and a.dtype == c.dtype == dtype, name
        per = x.numel() // c.numel() if name in ("grad_weight", "grad_bias") else 1  # values summed per parameter
        err = float((a.double() - c.double()).abs().max())
        assert err <= tol * per, f"{name}: {err:.3g} > {tol * per:.3g}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_gradcheck_of_each_module_in_float64(kind):
    ours, _, _ = _pair(kind, "silu", torch.float64, 40)
    x, r, _ = _data(torch.float64, False, 41, shape=(1, 6, 5, 7))
    names = [k for k, _ in ours.named_parameters()]
    leaves = [t.clone().requires_grad_() for t in [x, r] + [p.detach() for p in ours.parameters()]]

    def f(x_, r_, *params):
        return torch.func.functional_call(ours, dict(zip(names, params)), (x_, r_))

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("use_input_stats", [True, False], ids=["input_stats", "running_stats"])
@pytest.mark.parametrize("activation", [("leaky_relu", 0.1), ("clamp", -1.0, 1.0), "silu"],
                         ids=["leaky", "clamp", "silu"])
def test_functional_instance_norm_gradcheck(activation, use_input_stats):
    x, r, _ = _data(torch.float64, False, 42, shape=(2, 3, 4, 3))
    g = torch.Generator().manual_seed(43)
    w, b = torch.rand(3, generator=g, dtype=torch.float64) + 0.5, torch.randn(3, generator=g, dtype=torch.float64)
    rm, rv = torch.randn(3, generator=g, dtype=torch.float64) * 0.1, torch.rand(3, generator=g, dtype=torch.float64) + 1
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]

    def f(x_, w_, b_, r_):
        return bt.instance_norm(x_, rm.clone(), rv.clone(), w_, b_, use_input_stats, activation=activation,
                                residual=r_)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("torch_cls, cls, args", PAIRS, ids=[p[1].__name__ for p in PAIRS])
def test_state_dict_round_trip_with_torch_nn(torch_cls, cls, args):
    kw = dict(affine=True, track_running_stats=True) if "Instance" in cls.__name__ else {}
    ours, ref = cls(*args, activation="silu", **kw), _randomised(torch_cls(*args, **kw), torch.float32, 50)
    assert isinstance(ours, torch_cls) and type(ours).__mro__[1].__module__.startswith("bn_simd.torch")
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    back = torch_cls(*args, **kw)
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v) and torch.equal(back.state_dict()[k], v), k
    assert repr(ours) == repr(ref).replace(torch_cls.__name__, cls.__name__)[:-1] + ", activation='silu')"
    x = torch.randn((3, 6, 5, 7)[:len(args[-1]) + 2] if cls is bt.LayerNormAct else
                    {bt.InstanceNormAct1d: (3, 6, 7), bt.InstanceNormAct3d: (2, 6, 3, 4, 5)}.get(cls, (3, 6, 5, 7)))
    for training in (True, False):
        with torch.no_grad():
            torch.testing.assert_close(ours.train(training)(x), TF.silu(ref.train(training)(x)), rtol=1e-5,
                                       atol=1e-5)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is cls and clone.activation == "silu"
        assert torch.equal(clone.eval()(x), ours.eval()(x))


def test_instance_norm_act_takes_unbatched_input_and_residual():
    m = _randomised(bt.InstanceNormAct1d(6, affine=True, activation="relu6"), torch.float32, 51)
    x, r, _ = _data(torch.float32, False, 52, shape=(1, 6, 9))
    y = m(x[0], r[0])
    assert y.shape == (6, 9)
    assert torch.equal(y, m(x, r)[0])
    with pytest.raises(ValueError, match="num_features"):
        m(x[:, :5])


def test_activation_is_applied_at_each_spelling():
    x, r, _ = _data(torch.float64, False, 53)
    for act, fn in ACTS.items():
        if act is None:
            continue
        for kind in KINDS:
            ours, ref, _ = _pair(kind, act, torch.float64, 54)
            with torch.no_grad():
                torch.testing.assert_close(ours(x, r), fn(ref(x) + r), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_data_with_float32_parameters_within_an_ulp_of_the_float32_composition(dtype):
    x, r, _ = _data(torch.float32, False, 59)
    x16, r16 = x.to(dtype), r.to(dtype)
    for kind in KINDS:
        ours, ref, _ = _pair(kind, "silu", torch.float32, 60)
        ours.train(kind != "instance")  # (eval instance norm: its running statistics)
        ref.train(kind != "instance")
        with torch.no_grad():
            y = ours(x16, r16)
            want = TF.silu(ref(x16.float()) + r16.float())
        assert y.dtype == dtype, kind
        ulp = torch.finfo(dtype).eps * want.abs().clamp(min=torch.finfo(dtype).tiny)
        err = (y.float() - want).abs()
        assert bool((err <= ulp + 1e-5).all()), (kind, float((err - ulp).max()))


def test_a_residual_that_broadcasts_takes_pytorchs_add():
    """A residual of input's dtype that broadcasts to input's shape (convert fuses a model's add whatever its other
    operand's shape): act(norm(input) + residual) with PyTorch's add and activation, gradients included."""
    x, r, gy = _data(torch.float64, False, 63)
    for kind in KINDS:
        for res in (r[:1], r[:, :1, :1, :1], r[0, 0, 0]):
            ours, ref, _ = _pair(kind, "silu", torch.float64, 64)
            r1, r2 = res.clone().requires_grad_(), res.clone().requires_grad_()
            y = ours(x, r1)
            yr = TF.silu(ref(x) + r2)
            torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
            y.backward(gy)
            yr.backward(gy)
            torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-12, atol=1e-12)


def test_bad_activation_or_residual_is_refused_and_changes_nothing():
    for kind in KINDS:
        with pytest.raises(ValueError, match="activation"):
            KINDS[kind][0](("clamp", 1.0, -1.0))
        with pytest.raises(ValueError, match="activation"):
            KINDS[kind][0]("gelu")
    x, r, _ = _data(torch.float32, False, 55)
    for kind in KINDS:
        ours, _, _ = _pair(kind, "relu", torch.float32, 56)
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        with pytest.raises(ValueError, match="residual"):
            ours(x, r[:, :3])
        with pytest.raises(TypeError, match="residual"):
            ours(x, r.numpy())
        for k, v in ours.state_dict().items():
            assert torch.equal(v, before[k]), (kind, k)


def test_functional_instance_norm_running_statistics_are_the_plain_calls():
    x, r, _ = _data(torch.float32, True, 57)
    g = torch.Generator().manual_seed(58)
    rm, rv = torch.randn(6, generator=g) * 0.1, torch.rand(6, generator=g) + 0.5
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    y = bt.instance_norm(x, rm1, rv1, momentum=0.3, activation="silu", residual=r)
    plain = bt.instance_norm(x, rm2, rv2, momentum=0.3)
    assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, TF.silu(plain + r), rtol=1e-6, atol=1e-6)
    # without the input's statistics: batch norm's eval through the same epilogue
    y = bt.instance_norm(x, rm, rv, use_input_stats=False, activation="relu", residual=r)
    assert torch.equal(y, bt.batch_norm(x, rm, rv, activation="relu", residual=r))
    with pytest.raises(ValueError, match="running_mean"):
        bt.instance_norm(x, use_input_stats=False, activation="relu")


# ---- convert(model, fuse_activations=True) ---------------------------------------------------------------------------

class MySiLU(nn.SiLU):
    """A subclass whose forward is not SiLU's: a module of the Sequential pass that must not be fused."""

    def forward(self, input):
        return super().forward(input) * 2


class ShiftedReLU(nn.ReLU):
    """A subclass whose forward is not ReLU's: torch.fx traces through it (it is not torch.nn's) and finds no
    activation of the norm's output."""

    def forward(self, input):
        return super().forward(input - 0.5)


class UNetBlock(nn.Module):
    """A diffusion UNet's resnet block: GroupNorm -> SiLU -> conv, GroupNorm(h) + x -> F.silu, an embedding added
    after a GroupNorm before a ReLU; InstanceNorm -> ReLU before it."""

    def __init__(self, c):
        super().__init__()
        self.inorm, self.relu = nn.InstanceNorm2d(c, affine=True), nn.ReLU(inplace=True)
        self.norm1, self.act = nn.GroupNorm(2, c), nn.SiLU()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm2 = nn.GroupNorm(2, c)
        self.emb, self.norm3 = nn.Linear(c, c), nn.GroupNorm(4, c)

    def forward(self, x):
        x = self.relu(self.inorm(x))
        h = self.conv(self.act(self.norm1(x)))
        h = TF.silu(self.norm2(h) + x)
        emb = self.emb(x.mean((2, 3)))
        return torch.relu(self.norm3(h) + emb[:, :, None, None])  # a residual (N, C, 1, 1): PyTorch's add


class Tokens(nn.Module):
    """A transformer-like block over tokens: LayerNorm -> ReLU -> Linear, relu(LayerNorm(h) + t), RMSNorm ->
    LeakyReLU."""

    def __init__(self, d):
        super().__init__()
        self.ln, self.relu, self.fc = nn.LayerNorm(d), nn.ReLU(), nn.Linear(d, d)
        self.ln2, self.rms, self.lrelu = nn.LayerNorm(d), nn.RMSNorm(d), nn.LeakyReLU(0.1)

    def forward(self, t):
        h = self.fc(self.relu(self.ln(t)))
        h = torch.relu(self.ln2(h) + t)
        return self.lrelu(self.rms(h))


class Model(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.block, self.tokens = UNetBlock(c), Tokens(c)

    def forward(self, x):
        y = self.block(x)
        return self.tokens(y.flatten(2).transpose(1, 2))


def _random_norms(model, seed):
    for i, m in enumerate(model.modules()):
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.InstanceNorm2d)):
            _randomised(m, torch.float32, seed + i)
    return model


def test_convert_fuses_groupnorm_silu_layernorm_relu_and_their_residual_adds():
    with torch.random.fork_rng():
        torch.manual_seed(60)  # (the conv's and linears' initial weights)
        model = _random_norms(Model(), 60).eval()
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(60))
    with torch.no_grad():
        expected = model(x)
    fused = bt.convert(copy.deepcopy(model), fuse_activations=True)
    kinds = {name: (type(m).__name__, m.activation) for name, m in fused.named_modules() if hasattr(m, "activation")}
    assert kinds == {"block.inorm": ("InstanceNormAct2d", "relu"), "block.norm1": ("GroupNormAct", "silu"),
                     "block.norm2": ("GroupNormAct", "silu"), "block.norm3": ("GroupNormAct", "relu"),
                     "tokens.ln": ("LayerNormAct", "relu"),
                     "tokens.ln2": ("LayerNormAct", "relu"), "tokens.rms": ("RMSNormAct", ("leaky_relu", 0.1))}
    residual_calls = sorted(n.target for n in fused.graph.nodes if n.op == "call_module" and len(n.args) == 2)
    assert residual_calls == ["block.norm2", "block.norm3", "tokens.ln2"]
    assert not any(n.op == "call_function" and n.target in (TF.silu, torch.relu) for n in fused.graph.nodes)
    # (six normalizations in a row, each dividing by a standard deviation of 0.1 to 1: 1e-4 of float32's rounding
    # before the activation)
    assert_same_as_unfused(fused, model, x, expected, tol=1e-4)


def test_unfusable_patterns_are_left_alone():
    class Unfusable(nn.Module):
        def __init__(self):
            super().__init__()
            self.gn, self.act = nn.GroupNorm(2, 4), ShiftedReLU()
            self.gn2, self.silu = nn.GroupNorm(2, 4), nn.SiLU()
            self.ln, self.relu = nn.LayerNorm(3), nn.ReLU()
            self.ln_twice = nn.LayerNorm(3)

        def forward(self, x):
            a = self.act(self.gn(x))            # a subclassed activation
            n = self.gn2(x)
            b = self.silu(n) + n                # the norm's output read twice
            c = torch.relu(self.ln_twice(x)) + torch.relu(self.ln_twice(x * 2))  # one module called twice
            d = self.relu(self.ln(x))           # fusable: its activation's output is read twice below
            return a + b + c + d * d

    model = _random_norms(Unfusable(), 61).eval()
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(61))
    fused = bt.convert(copy.deepcopy(model), fuse_activations=True)
    assert type(fused.gn) is bt.GroupNorm and type(fused.gn2) is bt.GroupNorm
    assert type(fused.ln_twice) is bt.LayerNorm
    assert type(fused.ln) is bt.LayerNormAct and fused.ln.activation == "relu"
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_an_untraceable_model_has_its_sequential_pairs_fused_in_place():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.SiLU(),
                                      nn.InstanceNorm2d(4, affine=True), nn.Hardtanh(-0.5, 0.5), nn.LayerNorm(5),
                                      nn.ReLU6(), nn.RMSNorm(5), MySiLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.body(x)
            return -self.body(x)

    with torch.random.fork_rng():
        torch.manual_seed(62)  # (the conv's initial weights)
        model = _random_norms(Dynamic(), 62).eval()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(62))
    with torch.no_grad():
        expected = model(x)
    assert bt.convert(model, fuse_activations=True, trace=False) is model
    body = model.body
    assert [type(m) for m in body] == [nn.Conv2d, bt.GroupNormAct, nn.Identity, bt.InstanceNormAct2d, nn.Identity,
                                       bt.LayerNormAct, nn.Identity, bt.RMSNorm, MySiLU]
    assert (body[1].activation, body[3].activation, body[5].activation) == ("silu", ("clamp", -0.5, 0.5), "relu6")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


# ---- convert(fuse_activations=True): what it must leave alone, and the model passed in ----------------------------

class _MutatesInput(nn.Module):
    """y = norm(x); x changes in place; act(y + x): the normalization must read x before the change."""

    def __init__(self, inplace_relu):
        super().__init__()
        self.norm, self.inplace_relu = nn.LayerNorm(6), inplace_relu

    def forward(self, x):
        x = x * 1.0  # (an intermediate of the graph, so that the in-place op below does not touch the caller's)
        y = self.norm(x)
        r = TF.relu(x, inplace=True) if self.inplace_relu else x.add_(0.75)
        return torch.relu(y + r)


class _ReadsRunningMean(nn.Module):
    """y = bn(x); r reads bn's running mean; relu(y + r): r must read it after the batch norm's update."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(x)
        return torch.relu(y + self.bn.running_mean[None, :, None, None] * 100.0)


class _LargerResidual(nn.Module):
    """act(norm(x) + e) with e of a larger shape than norm(x)'s, which the add broadcasts the output to."""

    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(2, 8)

    def forward(self, x, e):
        return TF.silu(self.norm(x) + e)


@pytest.mark.parametrize("make", [lambda: _MutatesInput(False), lambda: _MutatesInput(True), _ReadsRunningMean],
                         ids=["add_", "relu_inplace", "running_mean"])
@pytest.mark.parametrize("training", [False, True])
def test_convert_leaves_a_residual_add_alone_when_fusing_would_change_the_result(make, training):
    torch.manual_seed(3)
    model = make().train(training)
    x = torch.randn(2, 3, 5, 6) if isinstance(model, _ReadsRunningMean) else torch.randn(2, 4, 6)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        expected = ref(x)
        got = bt.convert(copy.deepcopy(model), fuse_activations=True)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_convert_fuses_an_add_that_broadcasts_the_output_to_a_larger_shape():
    torch.manual_seed(4)
    model = _LargerResidual()
    _random_norms(model, 4)
    x, e = torch.randn(1, 8, 3, 3), torch.randn(4, 8, 3, 3)
    with torch.no_grad():
        expected = model(x, e)
        fused = bt.convert(copy.deepcopy(model), fuse_activations=True)
        got = fused(x, e)
    assert type(fused.norm).__name__ == "GroupNormAct"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_model_passed_to_convert_still_computes_its_own_output_after_fusion():
    torch.manual_seed(5)
    model = _random_norms(Model(), 5).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        expected = copy.deepcopy(model)(x)
        fused = bt.convert(model, fuse_activations=True)
        assert fused is not model and any(hasattr(m, "activation") for m in fused.modules())
        assert not any(hasattr(m, "activation") for m in model.modules())  # (converted, not fused)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused(x), expected, rtol=1e-4, atol=1e-4)
    # the fused modules share the model's parameters and buffers
    params = dict(model.named_parameters())
    assert all(p is params[k] for k, p in fused.named_parameters())


@pytest.mark.parametrize("kind", ["module", "functional"])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_a_residual_of_a_shape_that_does_not_broadcast_is_refused_before_the_running_statistics_move(kind, norm):
    torch.manual_seed(6)
    x, bad = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4)
    if kind == "module":
        m = (bt.BatchNormAct2d(8) if norm == "batch" else bt.InstanceNormAct2d(8, track_running_stats=True)).train()
        rm, rv = m.running_mean, m.running_var
        call = lambda: m(x, bad)  # noqa: E731
    else:
        rm, rv = torch.zeros(8), torch.ones(8)
        f = bt.batch_norm if norm == "batch" else bt.instance_norm
        call = lambda: f(x, rm, rv, training=True, activation="silu", residual=bad) if norm == "batch" else \
            f(x, rm, rv, use_input_stats=True, activation="silu", residual=bad)  # noqa: E731
    before = (rm.clone(), rv.clone())
    with pytest.raises(ValueError, match="residual"):
        call()
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_a_residual_of_another_dtype_takes_pytorchs_add():
    """A residual of another dtype than the input's gives act(norm(input) + residual) with PyTorch's add (its type
    promotion), as the unfused model: under torch.autocast a ResNet block's convolution gives bfloat16 and its
    identity stays float32 (a fused block raised TypeError there)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)) + x)

    torch.manual_seed(3)
    ref = Block()
    fused = bt.convert(copy.deepcopy(ref), fuse_activations=True)
    assert any(isinstance(m, bt.BatchNormAct2d) for m in fused.modules())
    x = torch.randn(2, 4, 6, 6)
    for training in (True, False):
        ref.train(training)
        fused.train(training)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yr, yf = ref(xr), fused(xf)
        assert yf.dtype == yr.dtype == torch.float32
        torch.testing.assert_close(yf, yr, rtol=0, atol=0)
        yr.sum().backward()
        yf.sum().backward()
        torch.testing.assert_close(xf.grad, xr.grad, rtol=0, atol=0)
    # a float64 residual beside float32 input, each kind
    x, r, _ = _data(torch.float32, False, 57)
    for kind in KINDS:
        ours, ref2, _ = _pair(kind, "relu", torch.float32, 58)
        torch.testing.assert_close(ours(x, r.double()), TF.relu(ref2(x) + r.double()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation, module", [("relu", nn.ReLU()), ("relu6", nn.ReLU6()),
                                                (("clamp", -0.5, 0.5), nn.Hardtanh(-0.5, 0.5))])
def test_pytorchs_path_takes_the_kernels_derivative_at_the_kinks(activation, module):
    """A residual that broadcasts (or of another dtype) takes PyTorch's add and activation: at u exactly on a kink
    (0, 6, lo, hi) its gradient must be the kernels' and the replaced module's (0), not torch.clamp's (1)."""
    D = torch.float64
    x = torch.tensor([-1., 0., 1.], dtype=D).view(3, 1, 1, 1).repeat(1, 2, 1, 1)  # the middle sample normalises to 0
    shift = {"relu": 0.0, "relu6": 6.0}.get(activation, 0.5) if isinstance(activation, str) else 0.5
    grads = []
    for res in (torch.full((3, 2, 1, 1), shift, dtype=D), torch.full((1, 2, 1, 1), shift, dtype=D),
                torch.full((3, 2, 1, 1), shift, dtype=torch.float32)):
        m = bt.BatchNormAct2d(2, activation=activation).double()
        xx = x.clone().requires_grad_()
        m(xx, res).sum().backward()
        grads.append(xx.grad)
    ref = x.clone().requires_grad_()
    module(TF.batch_norm(ref, None, None, None, None, True) + shift).sum().backward()
    for g in grads:
        torch.testing.assert_close(g, ref.grad, rtol=1e-9, atol=1e-9)


class _Repacked(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors handed back in other strides than the forward saved them with: a C-ordered copy (as
    torch.autograd.graph.save_on_cpu's offloading gives), or a transposed view of one (other strides again)."""

    def __init__(self, transposed):
        def pack(t):
            return t.mT.contiguous() if transposed and t.dim() >= 2 else t.contiguous()

        def unpack(t):
            return t.mT if transposed and t.dim() >= 2 else t
        super().__init__(pack, unpack)


@pytest.mark.parametrize("layout,transposed", [("channels_last", False), ("channels_last", True),
                                               ("contiguous", True), ("rank3_channel_stride_1", False),
                                               ("rank3_channel_stride_1", True)])
def test_gradients_of_saved_tensors_that_come_back_in_other_strides(layout, transposed):
    """The backwards allocated grad_x like the saved x and wrote the kernel's layout into it: a saved x handed back in
    other strides (activation offloading) made the kernel write a copy, and grad_x came back uninitialised."""
    torch.manual_seed(0)
    if layout == "rank3_channel_stride_1":
        x0, mods = torch.randn(2, 5, 8).transpose(1, 2), [bt.GroupNorm(2, 8), bt.InstanceNorm1d(8, affine=True),
                                                         bt.BatchNorm1d(8), bt.GroupNormAct(2, 8, activation="silu")]
    else:
        x0 = torch.randn(2, 8, 4, 4)
        if layout == "channels_last":
            x0 = x0.contiguous(memory_format=torch.channels_last)
        mods = [bt.GroupNorm(2, 8), bt.InstanceNorm2d(8, affine=True), bt.BatchNorm2d(8),
                bt.GroupNormAct(2, 8, activation="silu"), bt.InstanceNormAct2d(8, activation="silu"),
                bt.BatchNormAct2d(8, activation="relu"), bt.LayerNorm(4),
                bt.SyncBatchNorm(8, process_group=make_comms(1)[0])]
    gy = torch.randn(x0.shape)
    for m in mods:
        grads = []
        for hooked in (False, True):
            x = x0.clone(memory_format=torch.preserve_format).requires_grad_()
            if hooked:
                with _Repacked(transposed):
                    y = m(x)
            else:
                y = m(x)
            grads.append(torch.autograd.grad(y, [x] + [p for p in m.parameters()], gy))
        for a, b in zip(*grads):
            assert torch.equal(a, b), type(m).__name__


def test_a_fused_module_as_the_trace_root_asks_for_its_residual():
    """symbolic_trace of a fused module itself: its residual is a proxy that may stand for None or a tensor. A
    TypeError says to fix it (it said 'residual must be a torch.Tensor or None, got Proxy'); with concrete_args the
    trace records PyTorch's functions."""
    import torch.fx as fx
    m = bt.LayerNormAct(8, activation="relu")
    with pytest.raises(TypeError, match="concrete_args"):
        fx.symbolic_trace(m)
    g = fx.symbolic_trace(m, concrete_args={"residual": None})
    x = torch.randn(3, 8)
    torch.testing.assert_close(g(x), m(x))


def test_a_residual_tensor_viewing_outs_memory_is_refused():
    """The NumPy API given a torch tensor as the residual, a strided view of out's memory: the check of the caller's
    residual covers tensors too (it covered ndarrays only, and the layer's backward then read an overwritten
    residual)."""
    import numpy as np
    import bn_simd
    x = torch.randn(4, 8, 6, 6).numpy()
    buf = torch.randn(4, 6, 6, 8)
    out = buf.numpy().reshape(4, 8, 6, 6)
    before = buf.clone()
    with pytest.raises(ValueError, match="residual must not share memory with out"):
        bn_simd.LayerNorm(8, layout="NCHW", activation="relu")(x, residual=buf.permute(0, 3, 1, 2), out=out)
    assert torch.equal(buf, before) and np.shares_memory(out, buf.numpy())
