"""bn_simd.torch: values and gradients against torch.nn.functional, gradcheck, tensors read and written in place,
out=, the fallbacks to PyTorch, the torch.nn drop-ins and convert(), and the NumPy API's refusal of tensors that
require grad. Skipped without torch.

The reference of every comparison is PyTorch's own function run in float64 on the same values (float32 inputs
upcast exactly), so a float32 result is checked against the exact maths of its own inputs.
"""
import copy
import inspect
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import bn_simd

torch = pytest.importorskip("torch")
bt = pytest.importorskip("bn_simd.torch")
from bn_simd.torch import _bridge  # noqa: E402

TF = torch.nn.functional
EPS64 = float(np.finfo(np.float64).eps)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _torch_on_one_thread():
    """The tensors here are small: PyTorch's intra-op pool only adds overhead. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _atol(dtype, n, per_channel=False):
    """Absolute tolerance of a result of unit-normal data (weights of size 0.5-2, so y and grad_x are O(1)) against
    PyTorch's float64 result on the same values, for statistics over n values.

    Element-wise steps in dtype err by a few ulp (16 eps(dtype)); statistics summed in float64 (ours and the
    reference's) err by ~sqrt(n) eps64 of the terms' size, which moves y and grad_x by as much (16 (sqrt(n) + 1)
    eps64). A per-channel gradient is a sum of n O(1) terms: the same units times n, the sum of their sizes.
    """
    eps = float(np.finfo(np.dtype(str(dtype).replace("torch.", ""))).eps)
    unit = 16 * eps + 16 * (math.sqrt(n) + 1) * EPS64
    return unit * (n if per_channel else 1)


def _close(ours, ref, atol, what):
    assert ours.dtype == ref.dtype or ref.dtype == torch.float64, what
    np.testing.assert_allclose(ours.detach().double().numpy(), ref.detach().double().numpy(), rtol=0, atol=atol,
                               err_msg=what)


def _values(shape, seed, loc=0.0, scale=1.0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape) * scale + loc)


def _arrange(t, fmt):
    """t (N, C, *spatial) with the same values in memory format fmt."""
    if fmt in ("contiguous", "2d"):
        return t.contiguous()
    if fmt == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if fmt == "channels_last_3d":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if fmt == "channels_last_1d":  # (N, C, L) stored as (N, L, C)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if fmt == "strided":  # every other element of the last axis of a larger tensor
        big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    raise AssertionError(fmt)


FORMATS = {"contiguous": (4, 6, 5, 7), "channels_last": (4, 6, 5, 7), "channels_last_3d": (2, 6, 3, 4, 5),
           "channels_last_1d": (4, 6, 9), "strided": (3, 6, 4, 6), "2d": (16, 6)}
DENSE = ("contiguous", "channels_last", "channels_last_3d", "channels_last_1d", "2d")


def _reduction(op, shape):
    """The number of values each statistic of op sums (group norm: 3 groups)."""
    spatial = math.prod(shape[2:])
    return {"batch_norm_train": shape[0] * spatial, "batch_norm_eval": shape[0] * spatial,
            "group_norm": shape[1] // 3 * spatial, "instance_norm": spatial}[op]


def _call(lib, op, x, w, b, rm, rv):
    if op == "batch_norm_train":
        return lib.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-5)
    if op == "batch_norm_eval":
        return lib.batch_norm(x, rm, rv, w, b, False, 0.3, 1e-5)
    if op == "group_norm":
        return lib.group_norm(x, 3, w, b, 1e-5)
    return lib.instance_norm(x, rm, rv, w, b, True, 0.3, 1e-5)


def _conditioning(op, x):
    """max(1, the largest 1 / std of op's statistics on x): errors of y and of the gradients grow with x / std and
    with the invstd factor of grad_x, which is O(1) for the unit-scale data here and large for groups of two close
    values (a group norm of (16, 6) input in 3 groups)."""
    a = x.detach().double().numpy()
    N, C = a.shape[:2]
    rows = {"group_norm": a.reshape(N * 3, -1), "instance_norm": a.reshape(N * C, -1)}.get(
        op, np.moveaxis(a, 1, 0).reshape(C, -1))
    return max(1.0, 1.0 / math.sqrt(rows.var(axis=1).min() + 1e-5))


def _channel_state(C, seed, dtype):
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    return [torch.tensor(a, dtype=dtype) for a in (w, rng.standard_normal(C), 0.5 * rng.standard_normal(C),
                                                   rng.uniform(0.5, 2.0, C))]


# ---- values and gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op,fmt", [(op, fmt) for op in ("batch_norm_train", "batch_norm_eval", "group_norm",
                                                          "instance_norm")
                                    for fmt in FORMATS if not (op == "instance_norm" and fmt == "2d")])
def test_values_gradients_and_running_stats_match_torch(op, fmt, dtype):
    shape = FORMATS[fmt]
    C, n = shape[1], _reduction(op, shape)
    x = _arrange(_values(shape, 1, loc=1.5, scale=2.0).to(dtype), fmt).requires_grad_()
    k = _conditioning(op, x)
    g = _values(shape, 2).to(dtype)
    w, b, rm, rv = _channel_state(C, 3, dtype)
    w.requires_grad_()
    b.requires_grad_()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    rm64, rv64 = rm.double(), rv.double()

    y = _call(bt, op, x, w, b, rm, rv)
    y.backward(g)
    y64 = _call(TF, op, x64, w64, b64, rm64, rv64)
    y64.backward(g.double())

    assert y.dtype == dtype and y.shape == x.shape
    if fmt in DENSE:
        assert y.stride() == x.stride(), "the output keeps the input's memory format"
    _close(y, y64, k * _atol(dtype, n), "y")
    _close(x.grad, x64.grad, k * k * _atol(dtype, n), "grad_x")
    _close(w.grad, w64.grad, k * _atol(dtype, n, per_channel=True), "grad_weight")
    _close(b.grad, b64.grad, _atol(dtype, n, per_channel=True), "grad_bias")
    _close(rm, rm64, 4 * _atol(dtype, n), "running_mean")
    _close(rv, rv64, 4 * _atol(dtype, n), "running_var")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", ["batch_norm_train", "batch_norm_eval", "group_norm", "instance_norm"])
def test_no_grad_calls_match_torch(op, dtype):
    """Under torch.no_grad() the kernels are called directly (no autograd Function): same values."""
    shape = (3, 6, 4, 5)
    x = _arrange(_values(shape, 4).to(dtype), "channels_last")
    w, b, rm, rv = _channel_state(6, 5, dtype)
    rm64, rv64 = rm.double(), rv.double()
    with torch.no_grad():
        y = _call(bt, op, x, w, b, rm, rv)
    y64 = _call(TF, op, x.double(), w.double(), b.double(), rm64, rv64)
    n = _reduction(op, shape)
    assert y.grad_fn is None and y.stride() == x.stride()
    _close(y, y64, _atol(dtype, n), "y")
    _close(rm, rm64, 4 * _atol(dtype, n), "running_mean")
    _close(rv, rv64, 4 * _atol(dtype, n), "running_var")


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", ["batch_norm_train", "batch_norm_eval", "group_norm", "instance_norm"])
def test_gradcheck_float64(op, fmt):
    x = _arrange(_values((2, 6, 3, 4), 6), fmt).requires_grad_()
    w, b, rm, rv = _channel_state(6, 7, torch.float64)
    w.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _call(bt, op, x, w, b, rm, rv), (x, w, b))


@pytest.mark.parametrize("op", ["batch_norm_train", "batch_norm_eval", "group_norm", "instance_norm"])
def test_gradcheck_float64_parameters_only(op):
    """Input that does not require grad: only weight and bias's gradients are asked for."""
    x = _values((3, 6, 2, 3), 8)
    w, b, rm, rv = _channel_state(6, 9, torch.float64)
    w.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(lambda w, b: _call(bt, op, x, w, b, rm, rv), (w, b))


def test_gradcheck_float64_without_affine_parameters():
    x = _values((4, 3, 5), 10).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: bt.batch_norm(x, None, None, training=True), (x,))
    assert torch.autograd.gradcheck(lambda x: bt.group_norm(x, 1), (x,))


@pytest.mark.parametrize("op", ["batch", "group", "instance", "layer", "rms"])
def test_second_derivative_raises_instead_of_a_wrong_answer(op):
    """create_graph=True through a norm raises at once: with an incoming gradient that does not require grad (a
    gradient penalty: loss weighted by a constant), once_differentiable alone returned a grad_x without a graph, and
    the second derivative through the layer before came out silently wrong."""
    call = {"batch": lambda h: bt.batch_norm(h, None, None, training=True), "group": lambda h: bt.group_norm(h, 3),
            "instance": lambda h: bt.instance_norm(h), "layer": lambda h: bt.layer_norm(h, (5,)),
            "rms": lambda h: bt.rms_norm(h, (5,))}[op]
    x = _values((4, 3, 5), 11).requires_grad_()
    w = torch.randn(3, 3, 1, dtype=x.dtype, requires_grad=True)
    y = call(torch.nn.functional.conv1d(x, w))
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad((y * torch.randn(y.shape, dtype=x.dtype)).sum(), x, create_graph=True)
    y = call(x)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad((y * y).sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad((call(x) * y.detach()).sum(), x)  # (first derivatives as before)
    assert gx.shape == x.shape


def test_saved_input_changed_in_place_is_detected_by_autograd():
    x = _values((4, 3, 5), 12).requires_grad_()
    h = x * 1.0
    y = bt.batch_norm(h, None, None, training=True)
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_empty_batch_matches_torch():
    for lib in (bt, TF):
        rm, rv = torch.zeros(3), torch.ones(3)
        x, w = torch.zeros(0, 3, 4, requires_grad=True), torch.ones(3, requires_grad=True)
        y = lib.batch_norm(x, rm, rv, w, None, True)
        y.sum().backward()
        assert y.shape == (0, 3, 4)
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)), lib.__name__
        assert torch.equal(w.grad, torch.zeros(3))


# ---- memory: in place, memory formats ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,shape", [("channels_last", (2, 8, 5, 6)), ("channels_last_3d", (2, 8, 3, 4, 5)),
                                       ("channels_last_1d", (2, 8, 7)), ("contiguous", (2, 8, 5, 6))])
def test_dense_tensors_are_read_and_written_without_copies(fmt, shape, monkeypatch):
    x = _arrange(_values(shape, 13).float(), fmt)
    layout = "NCHW" if fmt == "contiguous" else "NHWC"
    view = _bridge.array(x, layout)
    assert view.__array_interface__["data"][0] == x.data_ptr() and view.flags.c_contiguous
    w, b, rm, rv = _channel_state(8, 14, torch.float32)
    expected = TF.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False)

    def no_copies(*args, **kwargs):
        raise AssertionError("a dense input was copied")
    monkeypatch.setattr(torch.Tensor, "contiguous", no_copies)
    y = bt.batch_norm(x, rm, rv, w, b, False)
    assert y.stride() == x.stride()
    out = torch.empty_like(x)
    r = bt.batch_norm(x, rm, rv, w, b, False, out=out)
    assert r is out and r.stride() == x.stride()
    ptr = x.data_ptr()
    r = bt.batch_norm(x, rm, rv, w, b, False, out=x)  # in place
    assert r is x and x.data_ptr() == ptr and x.stride() == y.stride()
    monkeypatch.undo()
    for t in (y, out, x):
        _close(t, expected, _atol(torch.float32, 1), "y")


def test_channels_last_gradients_keep_the_memory_format():
    x = _arrange(_values((3, 6, 5, 4), 15), "channels_last").requires_grad_()
    g = _arrange(_values((3, 6, 5, 4), 16), "channels_last")
    for op in ("batch_norm_train", "group_norm", "instance_norm"):
        x.grad = None
        _call(bt, op, x, None, None, None, None).backward(g)
        assert x.grad.is_contiguous(memory_format=torch.channels_last), op


def test_other_strides_are_copied_once_and_give_a_contiguous_result():
    x = _arrange(_values((3, 4, 5, 6), 17), "strided")
    assert _bridge.layout_of(x) is None
    y = bt.batch_norm(x, None, None, training=True)
    assert y.is_contiguous()
    _close(y, TF.batch_norm(x, None, None, training=True), _atol(torch.float64, 90), "y")


def test_out_in_another_memory_format_receives_the_result():
    x = _arrange(_values((2, 4, 3, 5), 18), "channels_last")
    out = torch.full((2, 4, 3, 5), float("nan"), dtype=torch.float64)
    r = bt.group_norm(x, 2, out=out)
    assert r is out and out.is_contiguous()
    _close(out, TF.group_norm(x, 2), _atol(torch.float64, 30), "out")


def test_out_is_checked_and_a_refused_call_changes_nothing():
    x = _values((4, 3, 5), 19)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\bout must have the shape"):
        bt.batch_norm(x, rm, rv, training=True, out=torch.empty(4, 3, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"\bout must have the dtype"):
        bt.batch_norm(x, rm, rv, training=True, out=torch.empty(4, 3, 5))
    with pytest.raises(TypeError, match=r"\bout must be a torch.Tensor"):
        bt.batch_norm(x, rm, rv, training=True, out=np.empty((4, 3, 5)))
    assert torch.equal(rm, torch.zeros(3, dtype=torch.float64)) and torch.equal(rv, torch.ones(3, dtype=torch.float64))


def test_out_with_autograd_is_refused_and_allowed_under_no_grad():
    x = _values((4, 3, 5), 20).requires_grad_()
    out = torch.empty(4, 3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="out= cannot be used"):
        bt.instance_norm(x, out=out)
    with torch.no_grad():
        assert bt.instance_norm(x, out=out) is out
    _close(out, TF.instance_norm(x), _atol(torch.float64, 5), "out")


def test_writes_bump_version_counters():
    x = _values((4, 3, 5), 21)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    out = torch.empty_like(x)
    versions = (rm._version, rv._version, out._version)
    bt.batch_norm(x, rm, rv, training=True, out=out)
    assert all(t._version > v for t, v in zip((rm, rv, out), versions))


# ---- what goes to PyTorch's own implementation ------------------------------------------------------------------

# (float16 and bfloat16 run on the kernels: tests/test_torch_half.py)

def test_meta_tensors_run_torchs_implementation():
    m = bt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4))).to("meta")
    y = m(torch.empty(2, 4, 3, 3, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 4, 3, 3)


def test_ranks_and_eps_the_kernels_do_not_cover_run_torchs_implementation():
    x = _values((2, 3, 2, 2, 2, 2), 22)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert torch.equal(bt.batch_norm(x, rm.clone(), rv.clone(), training=True),
                       TF.batch_norm(x, rm.clone(), rv.clone(), training=True))
    x = _values((2, 3, 4), 23)
    assert torch.equal(bt.batch_norm(x, rm, rv + 1, eps=0.0), TF.batch_norm(x, rm, rv + 1, eps=0.0))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tracing_records_torchs_operator():
    model = bt.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval())
    x = torch.randn(1, 3, 6, 6)
    traced = torch.jit.trace(model, x, check_trace=False)
    graph = str(traced.inlined_graph)
    assert "aten::batch_norm" in graph and "PythonOp" not in graph
    torch.testing.assert_close(traced(x), model(x))


def test_forward_mode_ad_runs_torchs_implementation():
    import torch.autograd.forward_ad as fwAD
    x, t = _values((4, 3, 5), 24), _values((4, 3, 5), 25)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(bt.batch_norm(fwAD.make_dual(x, t), None, None, training=True)).tangent
        ref = fwAD.unpack_dual(TF.batch_norm(fwAD.make_dual(x, t), None, None, training=True)).tangent
    assert torch.equal(ours, ref)


def test_per_channel_tensors_of_another_dtype_are_refused_naming_them():
    x = _values((4, 3, 5), 26).float()
    with pytest.raises(TypeError, match=r"\bweight must have the dtype of input"):
        bt.batch_norm(x, None, None, torch.ones(3, dtype=torch.float64), training=True)
    with pytest.raises(TypeError, match=r"\brunning_mean must be a torch.Tensor"):
        bt.batch_norm(x, np.zeros(3, np.float32), torch.ones(3), training=True)
    with pytest.raises(TypeError, match=r"\binput must be a torch.Tensor"):
        bt.group_norm(x.numpy(), 3)


def test_bad_values_raise_value_errors_naming_them():
    x = _values((4, 3, 5), 27)
    with pytest.raises(ValueError, match=r"\brunning_mean must have shape \(3,\)"):
        bt.batch_norm(x, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), training=True)
    with pytest.raises(ValueError, match=r"num_groups \(2\) must divide"):
        bt.group_norm(x, 2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bt.batch_norm(_values((1, 3), 28), None, None, training=True)


# ---- modules ----------------------------------------------------------------------------------------------------

PAIRS = [(bt.BatchNorm1d, torch.nn.BatchNorm1d), (bt.BatchNorm2d, torch.nn.BatchNorm2d),
         (bt.BatchNorm3d, torch.nn.BatchNorm3d), (bt.InstanceNorm1d, torch.nn.InstanceNorm1d),
         (bt.InstanceNorm2d, torch.nn.InstanceNorm2d), (bt.InstanceNorm3d, torch.nn.InstanceNorm3d)]
INPUT_RANK = {"1d": 3, "2d": 4, "3d": 5}


@pytest.mark.parametrize("ours,theirs", PAIRS + [(bt.GroupNorm, torch.nn.GroupNorm)], ids=lambda c: c.__name__)
def test_modules_have_torchs_constructor_and_state_dict(ours, theirs):
    assert inspect.signature(ours) == inspect.signature(theirs) and issubclass(ours, theirs)
    configs = ([dict(num_groups=2, num_channels=6), dict(num_groups=3, num_channels=6, affine=False)]
               if ours is bt.GroupNorm else
               [dict(num_features=6), dict(num_features=6, affine=False, track_running_stats=True),
                dict(num_features=6, affine=True, track_running_stats=False)])
    for kw in configs:
        a, t = ours(**kw), theirs(**kw)
        assert list(a.state_dict()) == list(t.state_dict())
        assert [n for n, _ in a.named_parameters()] == [n for n, _ in t.named_parameters()]
        assert [n for n, _ in a.named_buffers()] == [n for n, _ in t.named_buffers()]
        with torch.no_grad():
            for p in t.parameters():
                p.uniform_(0.5, 1.5)
        a.load_state_dict(t.state_dict())
        t2 = theirs(**kw)
        t2.load_state_dict(a.state_dict())
        for sd in (a.state_dict(), t2.state_dict()):
            assert all(torch.equal(v, t.state_dict()[k]) for k, v in sd.items())
        assert repr(a) == repr(t)


def test_checkpoint_without_num_batches_tracked_loads():
    """As in PyTorch: a state dict of module version 1 (before the counter existed) loads with strict=True."""
    sd = torch.nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    sd["running_var"].fill_(3.0)
    m = bt.BatchNorm2d(3)
    m.load_state_dict(sd)
    assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_var, torch.full((3,), 3.0))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("ours,theirs", PAIRS, ids=lambda c: c.__name__)
def test_modules_train_and_eval_as_torchs(ours, theirs, momentum):
    rank = INPUT_RANK[ours.__name__[-2:]]
    shape = (3, 4) + (5, 3, 4)[:rank - 2]
    kw = dict(momentum=momentum, affine=True, track_running_stats=True)
    a, t = ours(4, **kw).double(), theirs(4, **kw).double()
    with torch.no_grad():
        for p in t.parameters():
            p.uniform_(0.5, 1.5)
    a.load_state_dict(t.state_dict())
    n = math.prod(shape) // 4
    for step in range(3):
        x = _values(shape, 30 + step, loc=step, scale=1 + step)
        _close(a(x), t(x), _atol(torch.float64, n), f"training step {step}")
    for k, v in t.state_dict().items():
        _close(a.state_dict()[k], v, 4 * _atol(torch.float64, n), k)
    a.eval(), t.eval()
    x = _values(shape, 40)
    _close(a(x), t(x), _atol(torch.float64, 1), "eval")
    if ours.__name__.startswith("Instance"):  # unbatched input
        _close(a(x[0]), t(x[0]), _atol(torch.float64, 1), "unbatched eval")
        a.train(), t.train()
        _close(a(x[0]), t(x[0]), _atol(torch.float64, n), "unbatched training")


def test_group_norm_module_matches_torch():
    a, t = bt.GroupNorm(2, 6).double(), torch.nn.GroupNorm(2, 6).double()
    with torch.no_grad():
        t.weight.uniform_(0.5, 1.5)
        t.bias.uniform_(-1, 1)
    a.load_state_dict(t.state_dict())
    x = _values((2, 6, 4, 4), 41)
    _close(a(x), t(x), _atol(torch.float64, 48), "y")


def test_stats_tracking_switched_off_after_construction_uses_and_keeps_the_buffers():
    """PyTorch's test_batchnorm_buffer_update_when_stats_are_not_tracked, and eval with the buffers it holds."""
    bn = bt.BatchNorm1d(4, track_running_stats=True)
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    bn.track_running_stats = False
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.rand(32, 4)
    bn(x)
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
    bn.eval()
    torch.testing.assert_close(bn(x), (x - 0.5) / torch.sqrt(torch.tensor(2.0 + 1e-5)))


def test_one_value_per_channel_raises_and_changes_nothing():
    """PyTorch's test_batchnorm_raises_error_if_less_than_one_value_per_channel; the counter is left as it was."""
    bn = bt.BatchNorm1d(10)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.rand(10)[None, :, None])
    with pytest.raises(ValueError, match=r"\brunning_mean must have shape"):
        bn(torch.rand(4, 9))
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(10))


def test_non_contiguous_channels_last_input_is_handled_as_torch_does():
    """PyTorch's test_batchnorm_non_contig_cpu: a permuted tensor whose channel stride is 1."""
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = bt.BatchNorm2d(2).eval()
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
    ref = torch.nn.BatchNorm2d(2).eval()
    ref.load_state_dict(bn.state_dict())
    y = bn(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref(x.contiguous()))


# ---- convert() ----------------------------------------------------------------------------------------------------

class _Block(torch.nn.Module):
    """conv-bn-relu-conv-bn plus the input, then relu (a residual block)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)
        self.conv2, self.bn2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


def _small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        _Block(8), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 1), torch.nn.InstanceNorm2d(8, affine=True), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6))


def test_convert_swaps_every_norm_in_place_keeping_parameters_and_buffers():
    model = _small_cnn()
    tensors = {k: v for k, v in list(model.named_parameters()) + list(model.named_buffers())}
    norms = [m for m in model.modules() if type(m) in bt.modules.SWAPS]
    assert bt.convert(model) is model
    assert [type(m).__module__ for m in norms] == ["bn_simd.torch.modules"] * 6
    assert all(m in norms for m in model.modules() if isinstance(m, tuple(bt.modules.SWAPS)))
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert after.keys() == tensors.keys() and all(after[k] is tensors[k] for k in tensors)
    assert bt.convert(model) is model and [type(m) for m in norms] == [type(m) for m in norms]


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_converted_cnn_gives_the_original_outputs_in_eval_and_train(channels_last):
    ref = _small_cnn().double()
    model = bt.convert(copy.deepcopy(ref))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model, ref = model.to(memory_format=fmt), ref.to(memory_format=fmt)
    x = _values((4, 3, 8, 8), 50).contiguous(memory_format=fmt)
    tol = _atol(torch.float64, 4 * 64) * 100  # a dozen layers, each amplifying by O(1)
    for step in range(2):  # training: outputs, every parameter's gradient, the buffers
        y, yr = model(x), ref(x)
        _close(y, yr, tol, f"train output {step}")
        w = _values(y.shape, 51 + step)
        (y * w).sum().backward()
        (yr * w).sum().backward()
    for (k, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters()):
        _close(p.grad, pr.grad, tol * 64, f"grad {k}")
    for (k, b), (_, br) in zip(model.named_buffers(), ref.named_buffers()):
        _close(b, br, tol, k)
    model.eval(), ref.eval()
    _close(model(x), ref(x), tol, "eval output")
    with torch.no_grad():
        _close(model(x), ref(x), tol, "eval output under no_grad")


def test_convert_leaves_other_classes_and_refuses_non_modules():
    class MyBN(torch.nn.BatchNorm2d):
        pass
    model = torch.nn.Sequential(MyBN(3), torch.nn.SyncBatchNorm(3), torch.nn.LocalResponseNorm(2))
    bt.convert(model)
    # (SyncBatchNorm has its drop-in: tests/test_torch_sync.py; LayerNorm and RMSNorm: tests/test_torch_rownorm.py)
    assert [type(m) for m in model] == [MyBN, bt.SyncBatchNorm, torch.nn.LocalResponseNorm]
    single = torch.nn.BatchNorm2d(3)
    assert bt.convert(single) is single and type(single) is bt.BatchNorm2d
    with pytest.raises(TypeError, match=r"\bmodel must be a torch.nn.Module"):
        bt.convert([torch.nn.BatchNorm2d(3)])


def test_converted_model_trains_with_its_optimizer():
    model = _small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bt.convert(model)
    before = model[1].weight.detach().clone()
    (model(torch.randn(4, 3, 8, 8)) * torch.randn(4, 6)).sum().backward()
    opt.step()
    assert not torch.equal(before, model[1].weight)


# ---- the NumPy API and tensors that require grad ----------------------------------------------------------------

def test_numpy_api_refuses_tensors_that_require_grad_naming_bn_simd_torch():
    x = torch.randn(4, 3, 5, requires_grad=True)
    w = torch.nn.Parameter(torch.ones(3))
    calls = [lambda: bn_simd.batch_norm(x, training=True),
             lambda: bn_simd.batch_norm(x.detach(), None, None, w, training=True),
             lambda: bn_simd.group_norm(x, 3),
             lambda: bn_simd.instance_norm(x),
             lambda: bn_simd.batch_norm_forward(x),
             lambda: bn_simd.BatchNorm1d(3)(x)]
    for call in calls:
        with pytest.raises(TypeError, match=r"requires grad.*bn_simd\.torch"):
            call()
    y = bn_simd.batch_norm(x.detach(), None, None, w.detach(), training=True)
    np.testing.assert_allclose(y, TF.batch_norm(x, None, None, w, training=True).detach().numpy(), rtol=0,
                               atol=_atol(torch.float32, 20))


def test_importing_bn_simd_does_not_import_torch():
    code = "import sys, bn_simd; assert 'torch' not in sys.modules, 'torch imported'; print(bn_simd.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_module_views_follow_new_storage_dtype_and_loaded_state():
    """The modules keep NumPy views of their parameters and buffers between calls: they must follow ``.data``
    assignments, dtype changes and loaded state dicts."""
    m = bt.BatchNorm2d(3).eval()
    x = _values((2, 3, 4, 4), 60).float()
    ref = torch.nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        m(x)
        m.weight.data = torch.tensor([2.0, -1.0, 0.5])
        ref.weight.data = torch.tensor([2.0, -1.0, 0.5])
        torch.testing.assert_close(m(x), ref(x))
        sd = {k: v + 0.25 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
        m.load_state_dict(sd)
        ref.load_state_dict(sd)
        torch.testing.assert_close(m(x), ref(x))
        m.double(), ref.double()
        torch.testing.assert_close(m(x.double()), ref(x.double()))
        m.running_var = torch.full((3,), 4.0, dtype=torch.float64)
        ref.running_var = torch.full((3,), 4.0, dtype=torch.float64)
        torch.testing.assert_close(m(x.double()), ref(x.double()))


def test_inference_mode_matches_torch():
    """Inference tensors (torch.inference_mode) are read and written like others; outputs in place included."""
    ours, ref = bt.BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()
    x = _values((4, 3, 5, 5), 61)
    with torch.inference_mode():
        _close(ours(x), ref(x), _atol(torch.float64, 100), "training")
        _close(ours.running_var, ref.running_var, _atol(torch.float64, 100), "running_var")
        ours.eval(), ref.eval()
        _close(ours(x), ref(x), _atol(torch.float64, 1), "eval")
        xi = x.clone()
        assert bt.instance_norm(xi, out=xi) is xi
        _close(xi, TF.instance_norm(x), _atol(torch.float64, 25), "in place")


def test_export_records_torchs_operators():
    model = bt.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4),
                                           torch.nn.InstanceNorm2d(4)).eval())
    x = torch.randn(2, 3, 6, 6)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"aten.batch_norm.default", "aten.group_norm.default", "aten.instance_norm.default"} <= targets
    torch.testing.assert_close(program.module()(x), model(x))


def test_pickles_and_copies_of_called_modules_leave_the_cached_views_behind():
    import io
    import pickle
    model = bt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.GroupNorm(1, 3),
                                           torch.nn.InstanceNorm2d(3, affine=True))).eval()
    x = _values((2, 3, 4, 4), 62).float()
    with torch.no_grad():
        y = model(x)
        assert all(_bridge.VIEWS_KEY in m.__dict__ for m in model)
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert not any(_bridge.VIEWS_KEY in m.__dict__ for m in copied)
            with torch.no_grad():
                copied[0].weight.mul_(2.0)  # its own tensors, not the original's
            assert torch.equal(model(x), y) and not torch.equal(copied(x), y)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), y)


class _Double(torch.nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("how", ["prune", "parametrize"])
@pytest.mark.parametrize("name,args", [("BatchNorm2d", (3,)), ("GroupNorm", (1, 3)), ("InstanceNorm2d", (3,)),
                                       ("LayerNorm", (5,)), ("RMSNorm", (5,))])
def test_a_pruned_or_parametrized_weight_is_the_one_used(name, args, how):
    """torch.nn.utils.prune and parametrize take weight out of _parameters and compute it at each call: the
    computed weight is the one the kernels must use (it was read as None: no weight at all)."""
    import torch.nn.utils.parametrize  # noqa: F401  (submodules of torch.nn.utils, imported on demand)
    import torch.nn.utils.prune  # noqa: F401
    kw = {"affine": True} if name.startswith("Instance") else {}
    mods = []
    for lib in (bt, torch.nn):
        torch.manual_seed(0)
        m = getattr(lib, name)(*args, **kw)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 2.0, m.weight.numel()).reshape(m.weight.shape))
        if how == "prune":
            mask = torch.arange(m.weight.numel()).reshape(m.weight.shape) > 0
            torch.nn.utils.prune.custom_from_mask(m, "weight", mask)
        else:
            torch.nn.utils.parametrize.register_parametrization(m, "weight", _Double())
        mods.append(m)
    x = torch.randn(2, 3, 4, 5)
    for train in (True, False):
        for m in mods:
            m.train(train)
        torch.testing.assert_close(mods[0](x), mods[1](x), rtol=1e-5, atol=1e-5)
    for m in mods:
        m.train()
        m(x).pow(2).sum().backward()
    orig = [m.weight_orig if how == "prune" else m.parametrizations.weight.original for m in mods]
    torch.testing.assert_close(orig[0].grad, orig[1].grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [lambda: bt.GroupNorm(1, 3), lambda: bt.LayerNorm(5),
                                  lambda: bt.BatchNorm2d(3).eval()], ids=["group", "layer", "batch_eval"])
def test_torch_func_transforms_take_pytorchs_path(make):
    m = make()
    ref = copy.deepcopy(m)
    ref.__class__ = type(m).__mro__[1]  # (the torch.nn class it subclasses)
    x = torch.randn(4, 3, 2, 5)
    f = lambda mod: (lambda t: mod(t).pow(3).sum())  # noqa: E731
    torch.testing.assert_close(torch.func.grad(f(m))(x), torch.func.grad(f(ref))(x))
    torch.testing.assert_close(torch.func.vmap(m)(x.unsqueeze(1)), torch.func.vmap(ref)(x.unsqueeze(1)))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_batches_as_pytorch(momentum, reentrant):
    """torch.utils.checkpoint reruns the forward in the backward; the non-reentrant form stops that rerun once the
    saved tensors are recorded. PyTorch's BatchNorm counts the batch before its work, so the rerun counts it again
    and moves the statistics again; the converted module must end with the same count and statistics (it counted
    after its work, so the stopped rerun skipped the count: one short a call, the cumulative average wrong)."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(3, momentum=momentum).double()
    ours = bt.convert(copy.deepcopy(ref))
    for step in range(3):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * (step + 1)
        for m in (ref, ours):
            xi = x.clone().requires_grad_()
            checkpoint(m, xi, use_reentrant=reentrant).sum().backward()
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("then_relu", [False, True])
def test_gradient_checkpointing_moves_instance_norm_statistics_as_pytorch(reentrant, then_relu):
    """PyTorch's instance norm copies its running statistics back after its kernel, past the point where the
    non-reentrant checkpoint stops the rerun: alone, one update a step; followed by an activation, whose saved tensor
    comes after that copy, two. The converted module updated inside its forward, before the stop: two, alone too."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    norm = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True).double()
    ref = torch.nn.Sequential(norm, torch.nn.ReLU()) if then_relu else norm
    ours = bt.convert(copy.deepcopy(ref), fuse_activations=True)
    for step in range(2):
        x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * (step + 1) + 1
        for m in (ref, ours):
            checkpoint(m, x.clone().requires_grad_(), use_reentrant=reentrant).sum().backward()
    for k, v in ref.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[k], v, rtol=1e-12, atol=1e-12)


def test_a_refused_call_still_leaves_the_count():
    m = bt.convert(torch.nn.BatchNorm2d(3))
    with pytest.raises(ValueError):
        m(torch.randn(1, 3, 1, 1))  # (one value per channel in training)
    assert int(m.num_batches_tracked) == 0


def test_torch_jit_script_refuses_converted_modules_and_leaves_the_model_alone():
    """torch.jit.script cannot compile the kernels' Python calls, and it stores what a module's __prepare_scriptable__
    returns into the parent: each converted module refuses with a TypeError saying what to do, before anything in the
    model is replaced (the unconverted model scripts as usual)."""
    for fuse in (False, True):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                    torch.nn.LayerNorm([4, 6, 6]), torch.nn.GroupNorm(2, 4))
        torch.jit.script(copy.deepcopy(model))
        ours = bt.convert(model, fuse_activations=fuse)
        kinds = [type(m) for m in ours.modules()]
        with pytest.raises(TypeError, match="cannot be compiled by torch.jit.script"):
            torch.jit.script(ours)
        assert [type(m) for m in ours.modules()] == kinds
        assert any(t.__module__.startswith("bn_simd.torch") for t in kinds)


def test_an_out_over_a_running_statistic_is_refused_in_any_memory_order():
    """bn_simd.torch's functional calls with out= in another memory order than the input's write a temporary and copy
    it into out after the running statistics moved: an out over running_mean must be refused there too (the copy
    overwrote running_mean with y's values)."""
    x = torch.randn(4, 3, 5, 5)
    for fmt in ("same", "channels_last"):
        buf = torch.zeros(300)
        out = buf.view(4, 3, 5, 5) if fmt == "same" else buf.view(4, 5, 5, 3).permute(0, 3, 1, 2)
        for call in (lambda: bt.batch_norm(x, buf[:3], torch.ones(3), training=True, out=out),
                     lambda: bt.batch_norm(x, buf[:3], torch.ones(3), training=True, out=out, activation="relu"),
                     lambda: bt.instance_norm(x, buf[:3], torch.ones(3), use_input_stats=True, out=out)):
            with pytest.raises(ValueError, match="out must not share memory with running_mean"):
                call()
            assert not buf.any()


def test_pytorchs_fallback_refuses_an_out_over_a_running_statistic():
    """Calls the kernels do not cover go to PyTorch's function, which moves the statistics in place, then y is copied
    into out: an out over running_mean would overwrite the update (it was accepted: rank 6, eps=0, a tensor eps,
    the composed activation). Refused as on the kernels' path; eval takes it."""
    from bn_simd.torch import functional as BF
    x6 = torch.randn(2, 3, 2, 2, 2, 2)
    x4 = torch.randn(2, 3, 4, 4)
    calls = [
        lambda out, rm: BF.batch_norm(x6, rm, torch.ones(3), None, None, True, 0.1, 1e-5, out=out),
        lambda out, rm: BF.batch_norm(x6, rm, torch.ones(3), None, None, True, 0.1, 1e-5, out=out,
                                      activation="relu"),
        lambda out, rm: BF.instance_norm(x4, rm, torch.ones(3), use_input_stats=True, eps=0.0, out=out),
        lambda out, rm: BF.batch_norm(x4, rm, torch.ones(3), None, None, True, 0.1, torch.tensor(1e-5), out=out),
    ]
    for call in calls:
        x = x6 if call is calls[0] or call is calls[1] else x4
        buf = torch.zeros(x.numel())
        with torch.no_grad(), pytest.raises(ValueError, match="out must not share memory with running_mean"):
            call(buf.view(x.shape), buf[:3])
        assert not buf.any()
    buf = torch.zeros(x6.numel())
    with torch.no_grad():
        BF.batch_norm(x6, buf[:3], torch.ones(3), None, None, False, 0.1, 1e-5, out=buf.view(x6.shape))


@pytest.mark.parametrize("momentum, eps", [(1.5, 1e-5), (-0.25, 1e-5), (torch.tensor(0.3), 1e-5), (float("nan"), 1e-5),
                                           (0.1, float("inf")), (0.1, float("nan")), (0.1, True), (np.True_, 1e-5),
                                           (0.1, np.True_)])
@pytest.mark.parametrize("kind", ["BatchNorm2d", "InstanceNorm2d", "fused"])
def test_arguments_the_kernels_do_not_take_go_to_pytorch_as_pytorch_takes_them(kind, momentum, eps):
    """A momentum outside [0, 1] (PyTorch extrapolates), NaN, a tensor momentum, an eps of inf, NaN or a bool:
    PyTorch's modules train with them, so a converted one does too (on PyTorch's own function), with its results."""
    torch.manual_seed(3)
    if kind == "InstanceNorm2d":
        ref = torch.nn.InstanceNorm2d(4, momentum=momentum, eps=eps, affine=True, track_running_stats=True)
    else:
        ref = torch.nn.BatchNorm2d(4, momentum=momentum, eps=eps)
    model = torch.nn.Sequential(copy.deepcopy(ref), torch.nn.ReLU()) if kind == "fused" else copy.deepcopy(ref)
    model = bt.convert(model, fuse_activations=kind == "fused")
    want = torch.nn.Sequential(ref, torch.nn.ReLU()) if kind == "fused" else ref
    for _ in range(2):
        x = torch.randn(6, 4, 5, 5)
        got_y, want_y = model(x), want(x)
        torch.testing.assert_close(got_y, want_y, equal_nan=True)
    got_m = next(m for m in model.modules() if isinstance(m, type(ref)))  # (fused: the BatchNormAct2d)
    model.eval(), want.eval()
    with torch.no_grad():  # (eval: the fast path too, once the general path has cached the module)
        for _ in range(2):
            torch.testing.assert_close(model(x), want(x), equal_nan=True)
    torch.testing.assert_close(got_m.running_mean, ref.running_mean, equal_nan=True)
    torch.testing.assert_close(got_m.running_var, ref.running_var, equal_nan=True)


def test_a_refused_call_leaves_a_float_count_as_it_was():
    """A count the user set to a float tensor (2.5) came back from a refused call as int(2.5) = 2."""
    m = bt.convert(torch.nn.BatchNorm2d(3))
    m.num_batches_tracked = torch.tensor(2.5)
    with pytest.raises(ValueError):
        m(torch.randn(1, 3, 1, 1))  # (one value per channel in training)
    assert m.num_batches_tracked.item() == 2.5


@pytest.mark.parametrize("op", ["group_norm", "instance_norm"])
def test_group_and_instance_norm_gradients_keep_float64_statistics_far_from_zero(op):
    """|mean| / std = 1e6 in float32: the backward works from the forward's float64 statistics, as the NumPy layers'
    and the fused calls' do (a mean rounded to float32 cost 1.4 % of grad_x). Reference: PyTorch's float64 autograd of
    the same float32 values; the float32 output's own rounding bounds what grad_x can reach."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 8, 64)) + 1e6).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    t = torch.from_numpy(x).requires_grad_()
    (bt.group_norm(t, 8) if op == "group_norm" else bt.instance_norm(t)).backward(torch.from_numpy(g))
    t64 = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    (TF.group_norm(t64, 8) if op == "group_norm" else TF.instance_norm(t64)).backward(torch.from_numpy(g).double())
    ref = t64.grad.numpy()
    err = np.abs(t.grad.numpy().astype(np.float64) - ref).max() / np.abs(ref).max()
    assert err < 1e-5, err
