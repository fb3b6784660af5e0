"""bn_simd.torch under PyTorch's graph tools: torch.fx.symbolic_trace (converted modules are leaves of the trace, the
functional calls record PyTorch's function), torch.compile(fullgraph=True) after eager inference calls, and the
graphs convert(fuse_activations=True) builds where an add's operand is no tensor, the residual is changed in place
between the normalization and the add, or the activation is one the kernels do not take."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.fx as fx  # noqa: E402
import torch.nn as nn  # noqa: E402

import bn_simd.torch as bt  # noqa: E402


def _x(shape=(3, 4, 5, 6), seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


# ---- convert(fuse_activations=True): what the graph may not move or fuse ----------------------------------------

class _MutatedIdentity(nn.Module):
    """The residual changed in place between the normalization and the add, its result unused."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        identity = x.clone()
        out = self.bn(self.conv(x))
        identity.mul_(0.5)
        return self.relu(out + identity)


class _MutatedAfterResidual(nn.Module):
    """The residual computed after the normalization (the fusion moves the normalization after it), then changed in
    place before the add."""

    def __init__(self):
        super().__init__()
        self.bn, self.relu = nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        out = self.bn(x)
        r = x * 2
        r.add_(1)
        return self.relu(out + r)


class _SizeResidual(nn.Module):
    """An add whose other operand is a number the trace computes (x.size(1))."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(x) + x.size(1))


@pytest.mark.parametrize("cls", [_MutatedIdentity, _MutatedAfterResidual, _SizeResidual])
@pytest.mark.parametrize("training", [False, True])
def test_fused_graph_computes_what_the_model_does(cls, training):
    torch.manual_seed(0)
    model = cls().train(training)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    fused = bt.convert(copy.deepcopy(model), fuse_activations=True)
    x = _x()
    want, got = model(x), fused(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(model.buffers(), fused.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_in_place_change_of_the_residual_is_not_fused_past():
    """The pairs stay unfused (the add reads the changed residual)."""
    for cls in (_MutatedIdentity, _MutatedAfterResidual):
        fused = bt.convert(cls().eval(), fuse_activations=True)
        assert not any(type(m).__name__.startswith("BatchNormAct") for m in fused.modules()), cls


def test_number_residual_module_call():
    """A fused module given a number as its residual adds it as PyTorch does."""
    m = bt.BatchNormAct2d(4, activation="relu").eval()
    plain = bt.BatchNorm2d(4).eval()
    plain.load_state_dict(m.state_dict())
    x = _x()
    torch.testing.assert_close(m(x, 3), torch.relu(plain(x) + 3), rtol=0, atol=0)
    torch.testing.assert_close(m(x, 0.25), torch.relu(plain(x) + 0.25), rtol=0, atol=0)
    with pytest.raises(TypeError, match="residual"):
        m(x, x.numpy())


@pytest.mark.parametrize("slope", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("trace", [True, False])
def test_leaky_relu_the_kernels_do_not_take_stays_unfused(slope, trace):
    model = nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU(slope)).eval()
    fused = bt.convert(copy.deepcopy(model), fuse_activations=True, trace=trace)
    assert not any(type(m).__name__.startswith("BatchNormAct") for m in fused.modules())
    x = _x()
    torch.testing.assert_close(fused(x), model(x), rtol=1e-6, atol=1e-6, equal_nan=True)


# ---- torch.fx.symbolic_trace -----------------------------------------------------------------------------------

def _models():
    yield nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()), (3, 4, 5, 6)
    yield nn.Sequential(nn.BatchNorm1d(4)), (3, 4, 7)
    yield nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()), (3, 4, 5, 6)
    yield nn.Sequential(nn.InstanceNorm2d(4, affine=True, track_running_stats=True)), (3, 4, 5, 6)
    yield nn.Sequential(nn.InstanceNorm1d(4)), (4, 7)   # unbatched
    yield nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), (3, 5, 8)
    yield nn.Sequential(nn.RMSNorm([5, 8])), (3, 5, 8)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_symbolic_trace_keeps_converted_modules_as_calls(fuse, training):
    for model, shape in _models():
        model = bt.convert(model, fuse_activations=fuse).train(training)
        gm = fx.symbolic_trace(model)
        called = [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
        assert any(c.__module__.startswith("bn_simd.") for c in called), called
        x = _x(shape, seed=len(shape))
        ref = copy.deepcopy(model)
        torch.testing.assert_close(gm(x), ref(x), rtol=0, atol=0)
        for a, b in zip(ref.buffers(), gm.buffers()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_symbolic_trace_of_fused_graph_and_functional_calls():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)) + x)

    fused = bt.convert(Block().eval(), fuse_activations=True)
    assert isinstance(fused, fx.GraphModule)
    again = fx.symbolic_trace(fused)
    x = _x()
    torch.testing.assert_close(again(x), fused(x), rtol=0, atol=0)

    def f(x, w, b):
        return bt.layer_norm(x, (6,), w, b) * 2

    gm = fx.symbolic_trace(f)
    w, b = torch.rand(6) + 0.5, torch.rand(6)
    torch.testing.assert_close(gm(x, w, b), f(x, w, b), rtol=1e-6, atol=1e-6)


def test_sync_batch_norm_is_a_leaf_of_a_trace():
    model = nn.Sequential(bt.SyncBatchNorm(4)).eval()
    gm = fx.symbolic_trace(model)
    assert [n.op for n in gm.graph.nodes].count("call_module") == 1
    x = _x()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


# ---- torch.compile ---------------------------------------------------------------------------------------------

def test_compile_fullgraph_after_eager_inference_calls():
    """The eval fast path, filled by an eager call under no_grad, is not what a compiled graph traces."""
    torch._dynamo.reset()
    m = bt.BatchNorm2d(4).eval()
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1)
        x = _x()
        want = m(x)
        got = torch.compile(m, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: bt.BatchNorm2d(4), lambda: bt.GroupNorm(2, 4), lambda: bt.LayerNorm(6),
                                  lambda: bt.InstanceNorm2d(4, affine=True)])
def test_batched_gradients_are_refused_with_a_message(make):
    m = make()
    x = _x().requires_grad_(True)
    y = m(x)
    with pytest.raises(RuntimeError, match="batched gradients"):
        torch.autograd.grad(y, x, torch.ones(2, *y.shape), is_grads_batched=True)
    g, = torch.autograd.grad(m(x), x, torch.ones_like(y))   # one at a time: works
    assert g.shape == x.shape


def test_forwards_take_their_argument_by_name():
    x = _x((3, 6))
    for m, name in ((bt.RMSNorm(6), "x"), (bt.LayerNorm(6), "input"), (bt.GroupNorm(2, 6), "input"),
                    (bt.BatchNorm1d(6), "input"), (bt.InstanceNorm1d(6), "input")):
        torch.testing.assert_close(m(**{name: x}), m(x), rtol=0, atol=0)


def test_a_converted_module_traced_as_the_root_records_pytorchs_functions():
    """As torch.nn's LayerNorm, GroupNorm and RMSNorm (torch.nn's BatchNorm and InstanceNorm cannot be the root of a
    symbolic trace: their rank checks branch on the proxy)."""
    x = _x((3, 6))
    for m in (bt.LayerNorm(6), bt.GroupNorm(2, 6), bt.RMSNorm(6)):
        gm = fx.symbolic_trace(m)
        assert not any(n.op == "call_module" for n in gm.graph.nodes)
        torch.testing.assert_close(gm(x), m(x), rtol=1e-6, atol=1e-6)


def test_folded_linear_batch_norm_traces():
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    folded = bt.fold(model)
    gm = fx.symbolic_trace(folded)
    x = _x((3, 6))
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_make_fx_records_pytorchs_operators():
    """make_fx's dispatch mode records operators, not the kernels' memory reads: the graph replays on new data."""
    from torch.fx.experimental.proxy_tensor import make_fx
    for m in (bt.LayerNorm(6), bt.BatchNorm1d(6).eval(), bt.GroupNorm(2, 6)):
        x = _x((3, 6))
        with torch.no_grad():
            m(x)   # (the eval fast path's cache filled)
            g = make_fx(m)(x)
            x2 = _x((3, 6), seed=5) * 3 + 1
            torch.testing.assert_close(g(x2), m(x2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm2d(4), lambda: nn.GroupNorm(2, 4), lambda: nn.InstanceNorm2d(4)])
def test_hooks_of_a_traced_module_run_once(make):
    """Module.__call__ runs the hooks on the proxies; the recorded call must not run them again."""
    ref = nn.Sequential(nn.Conv2d(4, 4, 1), make()).eval()
    ref[1].register_forward_hook(lambda m, i, o: o * 2)
    ref[1].register_forward_pre_hook(lambda m, i: (i[0] + 1,))
    con = bt.convert(copy.deepcopy(ref))
    x = _x()
    torch.testing.assert_close(fx.symbolic_trace(con)(x), ref(x), rtol=1e-5, atol=1e-5)


def test_a_norm_of_an_untraced_tensor_in_a_symbolic_trace_is_refused():
    """A tensor attribute (not a buffer) reaches the forward as a tensor: the kernels would run once at trace time and
    their result be frozen into the graph, the running statistics moved by the trace."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.c = torch.ones(2, 4, 3, 3)

        def forward(self, x):
            return x + self.bn(self.c)

    m = bt.convert(M())
    with pytest.raises(RuntimeError, match="not traced"):
        fx.symbolic_trace(m)
    assert int(m.bn.num_batches_tracked) == 0
    y = m(_x((2, 4, 3, 3)))   # (eager: runs)
    assert y.shape == (2, 4, 3, 3)


def test_make_fx_pre_dispatch_is_refused_not_frozen():
    """Pre-dispatch tracing puts no mode on the dispatch stack: the kernels would run once and their output be frozen
    into the graph; RuntimeError instead (make_fx's default mode records PyTorch's operators, above)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    m = bt.LayerNorm(6)
    with pytest.raises(RuntimeError, match="not traced"):
        make_fx(m, pre_dispatch=True)(_x((3, 6)))
