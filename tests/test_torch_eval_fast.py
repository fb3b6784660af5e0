"""bn_simd.torch's BatchNorm modules in eval mode outside autograd (inference): the compiled fast path
(_core.torch_bn_eval) against the general path and PyTorch, and every change of a module's state or of the call
that must send it back to the general path. Skipped without torch."""
import copy
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bt = pytest.importorskip("bn_simd.torch")
from bn_simd import _core  # noqa: E402
from bn_simd.torch import modules as M  # noqa: E402

FORMATS = {  # (module class, shape, memory format)
    "2d": (bt.BatchNorm1d, (16, 6), None),
    "1d": (bt.BatchNorm1d, (4, 6, 9), None),
    "1d_channels_last": (bt.BatchNorm1d, (4, 6, 9), "cl1"),
    "contiguous": (bt.BatchNorm2d, (4, 6, 5, 7), torch.contiguous_format),
    "channels_last": (bt.BatchNorm2d, (4, 6, 5, 7), torch.channels_last),
    "batch_1_channels_last": (bt.BatchNorm2d, (1, 6, 5, 7), torch.channels_last),
    "3d": (bt.BatchNorm3d, (2, 6, 3, 4, 5), torch.contiguous_format),
    "channels_last_3d": (bt.BatchNorm3d, (2, 6, 3, 4, 5), torch.channels_last_3d),
}


def _input(shape, fmt, dtype, seed=0):
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape) * 2.0 + 0.5).to(dtype)
    if fmt == "cl1":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def _module(cls, C, dtype, seed=1, **kwargs):
    """A module of cls in eval mode with random statistics and parameters, and PyTorch's twin with the same state."""
    m = cls(C, dtype=dtype, **kwargs).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + [("running_mean", m.running_mean), ("running_var", m.running_var)]:
            values = rng.uniform(0.5, 2.0, C) if name == "running_var" else rng.standard_normal(C)
            t.copy_(torch.from_numpy(values))
    ref = getattr(torch.nn, cls.__name__)(C, dtype=dtype, **kwargs).eval()
    ref.load_state_dict(m.state_dict())
    return m, ref


@pytest.fixture
def calls(monkeypatch):
    """The fast path's calls and results (None: sent back to the general path)."""
    log = []
    real = _core.torch_bn_eval

    def spy(*args):
        r = real(*args)
        log.append(r)
        return r
    monkeypatch.setattr(_core, "torch_bn_eval", spy)
    return log


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_fast_path_gives_the_general_paths_bits_in_the_inputs_memory_format(fmt, affine, dtype, calls):
    cls, shape, memory = FORMATS[fmt]
    m, ref = _module(cls, shape[1], dtype, affine=affine)
    x = _input(shape, memory, dtype)
    x0 = x.clone()
    with torch.no_grad():
        first = m(x)  # the general path, which fills the cache
        assert calls == [] and M.EVAL_KEY in m.__dict__
        y = m(x)
    assert len(calls) == 1 and calls[0] is y
    assert torch.equal(x, x0)  # input untouched
    general = bt.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.1, m.eps)
    assert torch.equal(y, first) and torch.equal(y, general)
    assert y.stride() == x.stride() and y.data_ptr() != x.data_ptr()
    eps = float(np.finfo(np.float32 if dtype == torch.float32 else np.float64).eps)
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x), rtol=0, atol=64 * eps)


def test_bias_false_and_bitwise_thread_invariance(calls):
    import bn_simd
    m, _ = _module(bt.BatchNorm2d, 64, torch.float32, bias=False)
    x = _input((8, 64, 17, 19), torch.channels_last, torch.float32)
    with torch.no_grad():
        m(x)
        with bn_simd.Context(num_threads=1):
            one = m(x)
        with bn_simd.Context(num_threads=2):
            two = m(x)
    assert len(calls) == 2 and all(r is not None for r in calls)
    assert torch.equal(one, two)


def _changes():
    """(name, function changing module m) pairs: the fast path must see each change."""
    def data_assignment(m):
        m.weight.data = torch.linspace(-2, 2, m.num_features)

    def in_place(m):
        with torch.no_grad():
            m.running_var.mul_(4.0)
            m.bias.add_(1.0)

    def buffer_replaced(m):
        m.running_mean = torch.full((m.num_features,), 0.75)

    def parameter_removed(m):
        m.bias = None

    def state_loaded(m):
        m.load_state_dict({k: v * 2 if v.is_floating_point() else v for k, v in m.state_dict().items()})

    def eps_changed(m):
        m.eps = 0.5

    def shared_memory(m):
        m.share_memory()
        with torch.no_grad():
            m.running_mean.add_(3.0)

    return [data_assignment, in_place, buffer_replaced, parameter_removed, state_loaded, eps_changed, shared_memory]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_state_changes_between_calls_are_followed(change):
    m, ref = _module(bt.BatchNorm2d, 5, torch.float32)
    x = _input((3, 5, 4, 4), torch.contiguous_format, torch.float32)
    with torch.no_grad():
        m(x), m(x)
        change(m), change(ref)
        torch.testing.assert_close(m(x), ref(x))
        torch.testing.assert_close(m(x), ref(x))


def test_dtype_change_and_mismatched_inputs_take_the_general_path(calls):
    m, ref = _module(bt.BatchNorm2d, 5, torch.float32)
    x = _input((3, 5, 4, 4), torch.contiguous_format, torch.float32)
    with torch.no_grad():
        m(x)
        with pytest.raises(TypeError, match="dtype"):
            m(x.double())  # float64 input, float32 module: PyTorch's CPU kernels refuse it too
        m.double(), ref.double()
        torch.testing.assert_close(m(x.double()), ref(x.double()))
        with pytest.raises(ValueError, match="4D"):
            m(x.double()[0])  # BatchNorm2d takes rank 4 only, as PyTorch's
        with pytest.raises((ValueError, RuntimeError)):
            m(torch.zeros(3, 4, 4, 4, dtype=torch.float64))  # 4 channels, 5 expected
        torch.testing.assert_close(m(x.double()[:, :, ::2]), ref(x.double()[:, :, ::2]))  # strided: copied
        empty = torch.zeros(0, 5, 4, 4, dtype=torch.float64)
        assert m(empty).shape == empty.shape
    assert all(r is None for r in calls[:1])


def test_data_re_pointed_at_the_same_address_is_noticed(calls):
    """.data assigned a view that starts where the cached tensor did: other strides, another dtype or fewer values.
    The address alone would pass the cache; each goes the general way, which computes or raises as PyTorch does."""
    C = 5
    m, ref = _module(bt.BatchNorm2d, C, torch.float32)
    x = _input((3, C, 4, 4), torch.contiguous_format, torch.float32)
    buf = torch.linspace(0.5, 3.0, 2 * C)
    with torch.no_grad():
        for mod in (m, ref):
            mod.running_var.data = buf[:C]
        m(x), m(x)
        assert calls[-1] is not None
        for mod in (m, ref):
            mod.running_var.data = buf[::2]  # (same first address, stride 2)
        torch.testing.assert_close(m(x), ref(x))
        assert calls[-1] is None
        m(x)
        for mod in (m, ref):
            mod.running_var.data = buf[:C - 1]
        with pytest.raises((ValueError, RuntimeError)):
            ref(x)
        with pytest.raises((ValueError, RuntimeError)):
            m(x)
    h, href = _module(bt.BatchNorm2d, C, torch.float16)
    xh = _input((3, C, 4, 4), torch.contiguous_format, torch.float16)
    with torch.no_grad():
        h(xh), h(xh)
        assert calls[-1] is not None
        for mod in (h, href):
            mod.running_var.data = mod.running_var.data.view(torch.bfloat16)
        with pytest.raises((TypeError, RuntimeError)):
            href(xh)
        with pytest.raises((TypeError, RuntimeError)):
            h(xh)


def test_autograd_tracing_and_export_after_cached_calls_are_not_fast(calls):
    m, ref = _module(bt.BatchNorm2d, 4, torch.float64)
    x = _input((2, 4, 3, 3), torch.contiguous_format, torch.float64)
    with torch.no_grad():
        m(x)
    xg = x.clone().requires_grad_()
    m(xg).sum().backward()  # grad mode on: the autograd Function
    ref_x = x.clone().requires_grad_()
    ref(ref_x).sum().backward()
    torch.testing.assert_close(xg.grad, ref_x.grad)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad)
    traced = torch.jit.trace(m, x, check_trace=False)
    assert "batch_norm" in str(traced.graph)
    program = torch.export.export(m, (x,))
    assert any("batch_norm" in str(n.target) for n in program.graph.nodes if n.op == "call_function")
    assert calls == []


def test_training_mode_and_counter_are_untouched_by_the_fast_path():
    m, ref = _module(bt.BatchNorm2d, 3, torch.float32)
    x = _input((4, 3, 5, 5), torch.contiguous_format, torch.float32)
    with torch.no_grad():
        m(x)
        m.train(), ref.train()
        torch.testing.assert_close(m(x), ref(x))
        torch.testing.assert_close(m.running_mean, ref.running_mean)
        assert int(m.num_batches_tracked) == int(ref.num_batches_tracked) == 1


def test_copies_and_pickles_leave_the_cache_behind():
    m, _ = _module(bt.BatchNorm2d, 3, torch.float32)
    x = _input((2, 3, 4, 4), torch.contiguous_format, torch.float32)
    with torch.no_grad():
        y = m(x)
        assert M.EVAL_KEY in m.__dict__
        for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            assert M.EVAL_KEY not in c.__dict__
            with torch.no_grad():
                c.weight.mul_(2.0)
            assert torch.equal(m(x), y) and not torch.equal(c(x), y)


def test_inference_mode_tensors_take_the_fast_path(calls):
    m, ref = _module(bt.BatchNorm2d, 6, torch.float32)
    x = _input((2, 6, 5, 5), torch.channels_last, torch.float32)
    with torch.inference_mode():
        m(x)
        y = m(x)
        assert y.is_inference() and y.stride() == x.stride()
        torch.testing.assert_close(y, ref(x))
    assert len(calls) == 1 and calls[0] is y


def test_tensors_dlpack_cannot_describe_take_the_general_path(calls):
    m, ref = _module(bt.BatchNorm2d, 3, torch.float32)
    x = _input((2, 3, 4, 4), torch.contiguous_format, torch.float32)
    with torch.no_grad():
        m(x)
        meta = m.to("meta")(torch.empty(2, 3, 4, 4, device="meta"))
        assert meta.device.type == "meta" and meta.shape == (2, 3, 4, 4)
    assert calls and all(r is None for r in calls)


def test_negative_bit_views_are_normalised_as_their_values(calls):
    """The imaginary part of a conjugate is a float tensor whose memory holds the values negated (a view with the
    negative bit): DLPack exports that memory as it is, so the fast path must not read it."""
    m, ref = _module(bt.BatchNorm1d, 3, torch.float32)
    z = torch.complex(_input((4, 3), None, torch.float32, 1), _input((4, 3), None, torch.float32, 2))
    v = z.conj().imag
    assert v.is_neg() and type(v) is torch.Tensor
    with torch.no_grad():
        m(v.resolve_neg())
        torch.testing.assert_close(m(v), ref(v))
        torch.testing.assert_close(m(v), ref(v))
    assert calls and calls[0] is None


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 5), (2, 6, 3, 4)])
def test_negative_bit_tensors_everywhere_match_torch(shape):
    """Negative-bit views as input, per-channel tensors and gradients: PyTorch's values (never the unnegated
    memory), through the functional API, autograd and out=."""
    TF = torch.nn.functional

    def neg_view(a):
        return torch.complex(torch.zeros_like(a), a).conj().imag  # the values -a, stored as a

    x = _input(shape, None, torch.float64, 3)
    C = shape[1]
    rm, rv = _input((C,), None, torch.float64, 4), _input((C,), None, torch.float64, 5).abs() + 0.5
    w = _input((C,), None, torch.float64, 6)
    for a in (neg_view(x), x):
        for weight in (neg_view(w), w):
            torch.testing.assert_close(bt.batch_norm(a, rm, rv, weight), TF.batch_norm(a, rm, rv, weight))
            torch.testing.assert_close(bt.group_norm(a, 3, weight), TF.group_norm(a, 3, weight))
    xg = neg_view(x).resolve_neg().requires_grad_()
    g = neg_view(_input(shape, None, torch.float64, 7))
    ours, = torch.autograd.grad(bt.batch_norm(xg, None, None, w, training=True), xg, g)
    ref, = torch.autograd.grad(TF.batch_norm(xg, None, None, w, training=True), xg, g)
    torch.testing.assert_close(ours, ref)
    with pytest.raises(ValueError, match="negative-bit"):
        bt.batch_norm(x, rm, rv, out=neg_view(torch.empty_like(x)))
