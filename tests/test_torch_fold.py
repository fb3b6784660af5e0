"""bn_simd.torch.fold: every Conv→BN and Linear→BatchNorm1d pair of an eval model folded; the output against the
unfolded model run in float64 (the oracle).

Bound: the unfolded float32 model's own distance from the float64 run measures the float32 rounding of this
network on this input (err32); the folded model rounds its folded weights once more per layer (at most one
float32 ulp of each weight, of the order of the rounding the float32 convolutions already make), so it stays
within a small multiple of err32. A wrong fold (a channel scaled by the wrong factor, a bias missed) moves the
output by O(1).
"""
import copy
import types
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
import bn_simd  # noqa: E402
import bn_simd.torch as bt  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)


def randomize_bns(model, seed):
    """Running statistics and affine parameters far from the identity, so that every fold matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                C = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(C, generator=g) * 2 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(C, generator=g) * 1.5 + 0.25)
                    m.bias.copy_(torch.randn(C, generator=g) * 0.3)
    return model


class BasicBlock(nn.Module):
    """ResNet's basic block: conv-bn-relu, conv-bn, plus the identity or a downsampling conv-bn."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def depthwise_block(c, cout):
    """MobileNet's depthwise-separable block: depthwise conv-bn-relu6, pointwise conv-bn."""
    return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6(),
                         nn.Conv2d(c, cout, 1, bias=False), nn.BatchNorm2d(cout))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = BasicBlock(8, 16, 2)
        self.layer2 = BasicBlock(16, 16, 1)
        self.mobile = depthwise_block(16, 24)
        self.fc = nn.Linear(24, 10)
        self.bn_fc = nn.BatchNorm1d(10)

    def forward(self, x):
        x = self.mobile(self.layer2(self.layer1(self.stem(x))))
        return self.bn_fc(self.fc(x.mean(dim=(2, 3))))


class Net13(nn.Module):
    """Conv1d→BatchNorm1d and Conv3d→BatchNorm3d."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(4, 6, 3, padding=1, groups=2), nn.BatchNorm1d(6)
        self.c3, self.b3 = nn.Conv3d(2, 5, 2, stride=2), nn.BatchNorm3d(5, affine=False)

    def forward(self, x1, x3):
        return self.b1(self.c1(x1)).sum(dim=2), self.b3(self.c3(x3)).flatten(1)


def count_bns(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check_folded(model, *inputs, expect_left=0):
    """fold a copy of model and compare its output with the unfolded float32 and float64 runs."""
    ref64 = copy.deepcopy(model).double()
    with torch.no_grad():
        want = ref64(*[t.double() for t in inputs])
        unfolded = model(*inputs)
    folded = bt.fold(copy.deepcopy(model))
    assert count_bns(folded) == expect_left
    with torch.no_grad():
        got = folded(*inputs)
    want, unfolded, got = [t if isinstance(t, tuple) else (t,) for t in (want, unfolded, got)]
    for w, u, g in zip(want, unfolded, got):
        err32 = (u.double() - w).abs().max().item()
        errf = (g.double() - w).abs().max().item()
        bound = 4 * err32 + 4 * EPS32 * w.abs().max().item()
        assert errf <= bound, f"folded error {errf:.3g} > {bound:.3g} (unfolded float32 error {err32:.3g})"
    return folded


@pytest.mark.parametrize("bns", ["torch.nn", "bn_simd.torch"])
def test_fold_resnet_and_mobilenet_blocks_matches_pytorch_eval(bns):
    torch.manual_seed(0)
    model = randomize_bns(Net(), 1)
    if bns == "bn_simd.torch":
        bt.convert(model)
        assert isinstance(model.layer1.bn1, bt.BatchNorm2d)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    folded = check_folded(model, x)
    # the attribute pairs (conv1/bn1 in forward) were found by tracing; layers without bias got one
    assert isinstance(folded.layer1.bn1, nn.Identity) and folded.layer1.conv1.bias is not None
    assert isinstance(folded.bn_fc, nn.Identity) and isinstance(folded.mobile[1], nn.Identity)


def test_fold_conv1d_conv3d_grouped_and_affine_false():
    torch.manual_seed(1)
    model = randomize_bns(Net13(), 2).eval()
    check_folded(model, torch.randn(3, 4, 11), torch.randn(2, 2, 6, 4, 4))


def test_fold_returns_the_same_model_and_keeps_dtype_and_requires_grad():
    torch.manual_seed(2)
    model = randomize_bns(nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3)), 3).double().eval()
    assert bt.fold(model) is model
    assert model[0].bias.dtype == torch.float64 and model[0].bias.requires_grad
    assert isinstance(model[1], nn.Identity)


class Branchy(nn.Module):
    """Pairs that must stay: a conv output read twice, a BN without running statistics, a BN with a hook."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.conv_b, self.bn_b = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)
        self.conv_c, self.bn_c = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.bn_c.register_forward_hook(lambda m, i, o: None)

    def forward(self, x):
        a = self.conv_a(x)
        return self.bn_a(a) + a + self.bn_b(self.conv_b(x)) + self.bn_c(self.conv_c(x))


def test_fold_leaves_pairs_it_cannot_fold_exactly():
    torch.manual_seed(3)
    model = randomize_bns(Branchy(), 4).eval()
    check_folded(model, torch.randn(2, 3, 5, 5), expect_left=3)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.seq(x)
        if y.sum() > 0:
            y = y * 2
        return self.bn(self.conv(y))


def test_fold_falls_back_to_sequential_pairs_when_tracing_fails():
    """Untraced, only Sequentials known to run whole are folded: the model itself and those nested in it through
    Sequentials; trace=False takes every Sequential's pairs (the caller says its forward runs them whole)."""
    torch.manual_seed(4)
    model = randomize_bns(Untraceable(), 5).eval()
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(RuntimeWarning, match="could not trace.*nn.Sequential that runs whole"):
        check_folded(model, x, expect_left=2)   # (its forward might read seq's conv output: not folded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = bt.fold(copy.deepcopy(model), trace=False)
    assert isinstance(folded.seq[1], nn.Identity) and isinstance(folded.bn, nn.BatchNorm2d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert count_bns(bt.fold(copy.deepcopy(Net().eval()), trace=False)) == 5   # only the Sequential pairs
    whole = randomize_bns(nn.Sequential(Untraceable(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))), 6)
    with pytest.warns(RuntimeWarning, match="could not trace"):
        check_folded(whole.eval(), x, expect_left=2)   # the nested Sequential's pair, through Sequentials alone


class Taps(nn.Module):
    """Untraceable, and reading the conv's output of its Sequential between the conv and the batch norm."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        taps = []
        for layer in self.seq:
            x = layer(x)
            taps.append(x)
        if x.mean() > 100:
            x = x * 0
        return taps[0] + x


def test_fold_untraced_keeps_a_forward_that_reads_inside_a_sequential():
    torch.manual_seed(5)
    model = randomize_bns(Taps(), 7).eval()
    with pytest.warns(RuntimeWarning, match="could not trace"):
        check_folded(model, torch.randn(2, 3, 4, 4), expect_left=1)


class ReadsBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x)) + self.bn.bias.view(1, -1, 1, 1)   # a tensor of the batch norm: not folded
        return self.bn2(self.conv2(y)) * (self.bn2.num_features / 4)    # a plain attribute: folded, still there


def test_fold_keeps_a_forward_that_reads_the_batch_norm():
    torch.manual_seed(6)
    model = randomize_bns(ReadsBn(), 8).eval()
    folded = check_folded(model, torch.randn(2, 3, 4, 4), expect_left=1)
    assert isinstance(folded.bn, nn.BatchNorm2d) and folded.bn2.num_features == 4 and folded.bn2.eps == 1e-5
    assert "4, folded" in repr(folded.bn2)


class StdConv(nn.Conv2d):
    """Weight standardisation: the weight is recomputed in _conv_forward, forward is Conv2d's."""

    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean((1, 2, 3), keepdim=True)) / (weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, w, bias)


def test_fold_leaves_patched_forwards_and_memory_tied_layers():
    torch.manual_seed(7)
    x = torch.randn(2, 4, 6, 6)
    std = randomize_bns(nn.Sequential(StdConv(4, 4, 3), nn.BatchNorm2d(4)), 9).eval()
    check_folded(std, x, expect_left=1)
    for i in (0, 1):   # a forward set on the instance, conv or batch norm
        patched = randomize_bns(nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)), 10).eval()
        patched[i].forward = types.MethodType(lambda self, t: type(self).forward(self, t) * 2, patched[i])
        check_folded(patched, x, expect_left=1)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4)
            self.c2, self.b2 = nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4)
            self.c2.weight.data = self.c1.weight.data   # two Parameters, one memory

        def forward(self, t):
            return self.b1(self.c1(t)), self.b2(self.c2(t))

    tied = randomize_bns(Tied(), 11).eval()   # (in place: a deep copy does not keep the tie)
    with torch.no_grad():
        want = tied(x)
        got = bt.fold(tied)(x)
    assert count_bns(tied) == 2 and all(torch.equal(w, g) for w, g in zip(want, got))


def test_fold_refuses_training_mode_and_changes_nothing():
    model = Net()
    with pytest.raises(ValueError, match="training mode"):
        bt.fold(model)
    model.eval()
    model.layer1.bn2.train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="layer1.bn2.*training mode"):
        bt.fold(model)
    assert count_bns(model) == 9
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(TypeError, match="model"):
        bt.fold("model")


def test_fold_names_the_batch_norm_whose_values_cannot_be_folded():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, eps=0.0)).eval()
    with pytest.raises(ValueError, match="'1'.*eps"):
        bt.fold(model)
    assert isinstance(model[1], nn.BatchNorm2d)


@pytest.mark.parametrize("bns", ["torch.nn", "bn_simd.torch"])
def test_fold_after_running_statistics_from_training_batches(bns):
    """Running statistics as training leaves them (a few training forwards, then eval), conv and linear without
    bias, 1d/2d/3d."""
    torch.manual_seed(5)
    models = [(nn.Sequential(nn.Linear(20, 10, bias=False), nn.BatchNorm1d(10)), (8, 20)),
              (nn.Sequential(nn.Conv1d(4, 6, 3, bias=False), nn.BatchNorm1d(6)), (8, 4, 9)),
              (nn.Sequential(nn.Conv2d(3, 10, 3), nn.BatchNorm2d(10)), (8, 3, 9, 9)),
              (nn.Sequential(nn.Conv3d(2, 4, 2, bias=False), nn.BatchNorm3d(4)), (4, 2, 5, 5, 5))]
    for model, shape in models:
        if bns == "bn_simd.torch":
            bt.convert(model)
        with torch.no_grad():
            model[1].weight.uniform_(0.5, 2.0)
            model[1].bias.uniform_(-1.0, 1.0)
            for _ in range(3):
                model(torch.randn(shape) * 3 + 1)
        model.eval()
        check_folded(model, torch.randn(shape) * 3 + 1)


def test_fold_refuses_a_folded_weight_beyond_the_layers_dtype():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).half().eval()
    with torch.no_grad():
        model[0].weight.fill_(100.0)
        model[1].weight.fill_(1000.0)    # scale 1000 / sqrt(1 + eps): 1e5 > float16's 65504
    with pytest.raises(ValueError, match="'1'.*overflows torch.float16"):
        bt.fold(model)
    assert isinstance(model[1], nn.BatchNorm2d) and float(model[0].weight.detach().max()) == 100.0


def test_a_folded_linear_batchnorm1d_pair_refuses_a_3d_output_instead_of_a_wrong_result():
    # Linear -> BatchNorm1d on a (N, L, features) output with L == features runs in PyTorch (BatchNorm1d then
    # normalises axis 1, L) but is not what the fold assumes: the folded model raises rather than answer wrongly
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x2, x3 = torch.randn(5, 4), torch.randn(5, 4, 4)
    expected2 = model(x2)
    folded = bt.fold(copy.deepcopy(model))
    guard = sys.modules["bn_simd.torch.fold"].FoldedBatchNorm1d   # (bt.fold is the function)
    assert isinstance(folded[1], guard) and isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(x2), expected2, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="2-d"):
        folded(x3)


@pytest.mark.parametrize("trace", [True, False])
@pytest.mark.parametrize("computed", ["weight_norm", "legacy_weight_norm", "pre_hook", "bn_pre_hook"])
def test_fold_leaves_a_layer_whose_weight_or_input_is_set_at_each_call(computed, trace):
    torch.manual_seed(6)
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    if computed == "weight_norm":
        conv = nn.utils.parametrizations.weight_norm(conv)
    elif computed == "legacy_weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (deprecated in favour of the parametrization)
            conv = nn.utils.weight_norm(conv)
    elif computed == "pre_hook":
        conv.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    else:
        bn.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    model = randomize_bns(nn.Sequential(conv, bn), 6).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
        folded = bt.fold(copy.deepcopy(model), trace=trace)
        assert count_bns(folded) == 1
        torch.testing.assert_close(folded(x), expected, rtol=0, atol=0)


def test_fold_takes_models_with_lazy_modules_and_folds_a_folded_model_again_quietly():
    """An uninitialised lazy module elsewhere has no memory to compare (its pair, if any, is left); a folded model's
    FoldedBatchNorm1d (a rank check in its forward) is a leaf of the trace, so folding again traces quietly."""
    torch.manual_seed(8)
    lazy = randomize_bns(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5)), 12)
    lazy.eval()
    folded = bt.fold(lazy)
    assert count_bns(folded) == 0
    mlp = randomize_bns(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3),
                                      nn.BatchNorm1d(3)), 13).eval()
    once = bt.fold(mlp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bt.fold(once) is once


@pytest.mark.parametrize("conv, bn, x_shape", [(torch.nn.Conv1d, torch.nn.BatchNorm1d, (3, 7)),
                                               (torch.nn.Conv2d, torch.nn.BatchNorm2d, (3, 6, 6))])
def test_a_folded_conv_pair_refuses_an_unbatched_input(conv, bn, x_shape):
    """An unbatched conv input gives an output without the batch axis, on which the batch norm's channel axis is not
    the conv's: the folded model raises RuntimeError there rather than return other values (batched inputs run)."""
    torch.manual_seed(0)
    m = nn.Sequential(conv(3, 5, 3), bn(5)).eval()
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2)
    xb = torch.randn((2,) + x_shape)
    ref = m(xb)
    bt.fold(m)
    torch.testing.assert_close(m(xb), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unbatched"):
        m(torch.randn(x_shape))


def test_a_batch_norm_of_another_rank_than_its_conv_is_not_folded():
    """Conv2d -> BatchNorm3d raises before folding: it is left so (a fold would make it run)."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm3d(4)).eval()
    bt.fold(m)
    assert type(m[1]) is nn.BatchNorm3d
    with pytest.raises((ValueError, RuntimeError)):
        m(torch.randn(2, 3, 6, 6))


def test_folded_models_compile_with_torch_jit_script():
    for m, x in [(nn.Sequential(nn.Linear(8, 5), nn.BatchNorm1d(5)).eval(), torch.randn(2, 8)),
                 (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), torch.randn(2, 3, 6, 6))]:
        ref = m(x)
        bt.fold(m)
        s = torch.jit.script(m)
        torch.testing.assert_close(s(x), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="2-d"):   # (the Linear's check runs in the scripted module too)
        torch.jit.script(nn.Sequential(*bt.fold(nn.Sequential(nn.Linear(8, 5), nn.BatchNorm1d(5)).eval())))(
            torch.randn(2, 3, 8))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_folded_weights_are_rounded_once(dtype):
    """The folded values (float64) are rounded once to the layer's 16-bit dtype (PyTorch's float64 -> 16-bit
    conversion goes through float32: twice), the values of the float64 fold rounded to nearest even."""
    np_dtype = np.float16 if dtype == "float16" else pytest.importorskip("ml_dtypes").bfloat16
    dt = getattr(torch, dtype)
    bad = 0
    for seed in range(5):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64)).to(dt).eval()
        with torch.no_grad():
            for t, f in ((m[1].running_mean, torch.Tensor.normal_), (m[1].weight, torch.Tensor.normal_),
                         (m[1].bias, torch.Tensor.normal_)):
                f(t)
            m[1].running_var.uniform_(0.5, 2)
        args = [t.detach().double().numpy() for t in (m[0].weight, m[0].bias, m[1].running_mean, m[1].running_var,
                                                       m[1].weight, m[1].bias)]
        w2, b2 = bn_simd.fold_conv(*args, eps=m[1].eps, weight_layout="OIHW")
        bt.fold(m)
        for got, want in ((m[0].weight, w2), (m[0].bias, b2)):
            bad += int((got.detach().float().numpy() != want.astype(np_dtype).astype(np.float32)).sum())
    assert bad == 0
