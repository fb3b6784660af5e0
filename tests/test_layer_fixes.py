"""Layer fixes: LayerNorm / RMSNorm in place on a tensor's memory, their load_state_dict of bfloat16 arrays, no
grad_bias without a bias (virtual batches, renorm, parameters set to None), GroupNorm / InstanceNorm's bias=False
(PyTorch 2.x), state_dict / reset_parameters with a parameter set to None, and the unbatched InstanceNorm's channel
message."""
import inspect

import numpy as np
import pytest

import bn_simd
from conftest import assert_same_bits


def _rng(seed):
    return np.random.default_rng(seed)


# ---- LayerNorm / RMSNorm: a tensor input with out= its own memory --------------------------------------------------

@pytest.mark.parametrize("make", [lambda **k: bn_simd.LayerNorm(6, **k), lambda **k: bn_simd.RMSNorm(6, **k),
                                  lambda **k: bn_simd.LayerNorm(4, layout="NCHW", **k)], ids=["ln", "rms", "ln_cf"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_rownorm_tensor_input_in_place(make, activation):
    torch = pytest.importorskip("torch")
    x = _rng(0).standard_normal((3, 4, 6)).astype(np.float32)
    g = _rng(1).standard_normal(x.shape).astype(np.float32)
    want = make(activation=activation)
    y_want = want(x.copy())
    gx_want = want.backward(g)
    layer = make(activation=activation)
    xt = torch.from_numpy(x.copy())
    buf = xt.numpy()
    y = layer(xt, out=buf)  # (PyTorch's tensor in, its own memory out: in place, as BatchNorm / GroupNorm take it)
    assert y is buf
    assert_same_bits(y, y_want)
    assert_same_bits(xt.numpy(), y_want)
    # the backward differentiates at the forward's input (kept before it was overwritten)
    assert_same_bits(layer.backward(g), gx_want)
    assert_same_bits(layer.grad_weight, want.grad_weight)


def test_rownorm_tensor_input_refused_changes_nothing():
    torch = pytest.importorskip("torch")
    layer = bn_simd.LayerNorm(6)
    x = _rng(2).standard_normal((2, 6)).astype(np.float32)
    layer(x)
    saved = layer._saved
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    with pytest.raises(TypeError, match="x is a torch.Tensor that requires grad"):
        layer(xt, out=np.empty_like(x))
    assert layer._saved is saved


# ---- LayerNorm / RMSNorm: bfloat16 state dicts ---------------------------------------------------------------------

@pytest.mark.parametrize("make, keys", [(lambda: bn_simd.LayerNorm(6), ("weight", "bias")),
                                        (lambda: bn_simd.LayerNorm((2, 3)), ("weight", "bias")),
                                        (lambda: bn_simd.RMSNorm(6), ("weight",))], ids=["ln", "ln_2d", "rms"])
def test_rownorm_loads_bfloat16(make, keys):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    layer = make()
    shape = layer.normalized_shape
    vals = {k: (_rng(i).standard_normal(shape) * 2).astype(bf16) for i, k in enumerate(keys)}
    layer.load_state_dict(vals)
    for k in keys:  # (into the layer's own float32 arrays, exactly: bfloat16 widens without rounding)
        assert getattr(layer, k).dtype == np.float32
        np.testing.assert_array_equal(getattr(layer, k), vals[k].astype(np.float32))
    # float16 as before; an integer dtype still refused, naming the entry, the layer unchanged
    layer.load_state_dict({k: v.astype(np.float16) for k, v in vals.items()})
    before = layer.state_dict()
    with pytest.raises(TypeError, match=r"state_dict\['weight'\] must have a floating-point dtype, got int64"):
        layer.load_state_dict(dict(before, weight=np.ones(shape, np.int64)))
    with pytest.raises(ValueError, match=r"state_dict\['weight'\] must have shape"):
        layer.load_state_dict(dict(before, weight=np.ones(7, bf16)))
    for k in keys:
        assert_same_bits(getattr(layer, k), before[k])


def test_rownorm_with_bfloat16_weights_reloads_its_state_dict():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    layer = bn_simd.LayerNorm(6)
    layer.weight = (_rng(3).standard_normal(6) + 1).astype(bf16)
    layer.bias = _rng(4).standard_normal(6).astype(bf16)
    x = _rng(5).standard_normal((2, 6)).astype(bf16)
    y = layer(x)
    state = layer.state_dict()
    assert state["weight"].dtype == bf16
    layer.load_state_dict(state)
    assert_same_bits(layer(x), y)


# ---- no grad_bias without a bias: virtual batches and renorm ---------------------------------------------------------

@pytest.mark.parametrize("kw", [{"virtual_batch_size": 4}, {"renorm": True},
                                {"virtual_batch_size": 2, "renorm": True}], ids=["virtual", "renorm", "both"])
def test_bias_false_has_no_grad_bias_in_virtual_and_renorm_training(kw):
    x = _rng(6).standard_normal((8, 3, 2, 3)).astype(np.float32)
    g = _rng(7).standard_normal(x.shape).astype(np.float32)
    layer = bn_simd.BatchNorm2d(3, bias=False, **kw)
    with_bias = bn_simd.BatchNorm2d(3, **kw)  # (bias zeros: the same numbers)
    assert_same_bits(layer(x), with_bias(x))
    gx = layer.backward(g)
    assert_same_bits(gx, with_bias.backward(g))
    assert layer.grad_bias is None
    assert_same_bits(layer.grad_weight, with_bias.grad_weight)
    # a parameter set to None after construction: no gradient for it either
    with_bias.weight = None
    with_bias(x)
    with_bias.backward(g)
    assert with_bias.grad_weight is None and with_bias.grad_bias is not None


# ---- GroupNorm / InstanceNorm bias=False (PyTorch 2.x) -------------------------------------------------------------

def test_bias_keyword_matches_torch_signatures():
    torch = pytest.importorskip("torch")
    for ours, theirs in ((bn_simd.GroupNorm, torch.nn.GroupNorm), (bn_simd.InstanceNorm1d, torch.nn.InstanceNorm1d),
                         (bn_simd.InstanceNorm2d, torch.nn.InstanceNorm2d),
                         (bn_simd.InstanceNorm3d, torch.nn.InstanceNorm3d)):
        if "bias" not in inspect.signature(theirs).parameters:
            pytest.skip("this torch has no bias= on its GroupNorm / InstanceNorm")
        p = inspect.signature(ours).parameters["bias"]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is True


@pytest.mark.parametrize("activation", [None, "relu"])
def test_group_norm_bias_false(activation):
    layer = bn_simd.GroupNorm(2, 4, bias=False, activation=activation)
    assert layer.bias is None and layer.weight.shape == (4,)
    assert list(layer.state_dict()) == ["weight"]
    assert "bias=False" in repr(layer)
    x = _rng(8).standard_normal((3, 4, 5)).astype(np.float32)
    g = _rng(9).standard_normal(x.shape).astype(np.float32)
    w = np.array([1.5, -0.5, 2.0, 1.0], np.float32)
    layer.weight[:] = w
    with_bias = bn_simd.GroupNorm(2, 4, activation=activation)
    with_bias.weight[:] = w
    assert_same_bits(layer(x), with_bias(x))
    assert_same_bits(layer.backward(g), with_bias.backward(g))
    assert layer.grad_bias is None
    assert_same_bits(layer.grad_weight, with_bias.grad_weight)
    layer.reset_parameters()
    np.testing.assert_array_equal(layer.weight, 1.0)
    assert layer.bias is None
    with pytest.raises(ValueError, match="unexpected keys \\['bias'\\]"):
        layer.load_state_dict({"weight": np.ones(4), "bias": np.zeros(4)})
    # affine=False: neither, whatever bias says
    plain = bn_simd.GroupNorm(2, 4, affine=False, bias=False)
    assert plain.weight is None and plain.bias is None and plain.state_dict() == {}


@pytest.mark.parametrize("cls, shape", [("InstanceNorm1d", (2, 3, 7)), ("InstanceNorm2d", (2, 3, 4, 5)),
                                        ("InstanceNorm3d", (2, 3, 2, 3, 4))])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_instance_norm_bias_false(cls, shape, activation):
    make = getattr(bn_simd, cls)
    layer = make(3, affine=True, track_running_stats=True, bias=False, activation=activation)
    with_bias = make(3, affine=True, track_running_stats=True, activation=activation)
    assert layer.bias is None
    assert list(layer.state_dict()) == ["weight", "running_mean", "running_var", "num_batches_tracked"]
    assert "bias=False" in repr(layer)
    w = np.array([1.5, -0.5, 2.0], np.float32)
    layer.weight[:] = w
    with_bias.weight[:] = w
    for training, x_shape in ((True, shape), (False, shape), (True, shape[1:])):  # (the last one unbatched)
        layer.train(training)
        with_bias.train(training)
        x = _rng(10).standard_normal(x_shape).astype(np.float32)
        g = _rng(11).standard_normal(x_shape).astype(np.float32)
        assert_same_bits(layer(x), with_bias(x))
        assert_same_bits(layer.backward(g), with_bias.backward(g))
        assert layer.grad_bias is None
        assert_same_bits(layer.grad_weight, with_bias.grad_weight)
        assert_same_bits(layer.running_mean, with_bias.running_mean)
    layer.reset_parameters()
    np.testing.assert_array_equal(layer.weight, 1.0)
    assert layer.bias is None


def test_bias_false_matches_torch_and_loads_its_state_dict_strictly():
    torch = pytest.importorskip("torch")
    if "bias" not in inspect.signature(torch.nn.GroupNorm).parameters:
        pytest.skip("this torch has no bias= on its GroupNorm / InstanceNorm")
    x = _rng(12).standard_normal((3, 4, 3, 3)) * 2 + 1
    g = _rng(13).standard_normal(x.shape)
    pairs = [(torch.nn.GroupNorm(2, 4, bias=False, dtype=torch.float64),
              bn_simd.GroupNorm(2, 4, bias=False, dtype=np.float64)),
             (torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True, bias=False, dtype=torch.float64),
              bn_simd.InstanceNorm2d(4, affine=True, track_running_stats=True, bias=False, dtype=np.float64))]
    for tl, ours in pairs:
        with torch.no_grad():
            tl.weight.copy_(torch.tensor([1.5, -0.5, 2.0, 1.0]))
        ours.load_state_dict(tl.state_dict())  # (strict)
        assert list(ours.state_dict()) == list(tl.state_dict())
        xt = torch.tensor(x, requires_grad=True)
        yt = tl(xt)
        yt.backward(torch.tensor(g))
        y = ours(x)
        gx = ours.backward(g)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(ours.grad_weight, tl.weight.grad.numpy(), rtol=0, atol=1e-11)
        assert tl.bias is None and ours.grad_bias is None
        # and back: PyTorch's layer loads ours strictly
        tl.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})


# ---- parameters set to None after construction -------------------------------------------------------------------

def test_group_norm_bias_set_to_none():
    torch = pytest.importorskip("torch")
    theirs = torch.nn.GroupNorm(2, 6, bias=False) if "bias" in inspect.signature(torch.nn.GroupNorm).parameters \
        else None
    layer = bn_simd.GroupNorm(2, 6)
    if theirs is not None:
        layer.load_state_dict(theirs.state_dict(), strict=False)
    layer.bias = None  # (the workaround before bias=False)
    x = _rng(14).standard_normal((2, 6, 3, 3)).astype(np.float32)
    layer(x)
    layer.backward(np.ones_like(x))
    assert layer.grad_bias is None and layer.grad_weight is not None
    assert list(layer.state_dict()) == ["weight"]
    layer.weight[:] = 3
    layer.reset_parameters()
    np.testing.assert_array_equal(layer.weight, 1.0)
    assert layer.bias is None
    layer.load_state_dict(layer.state_dict())  # (strict: weight only)


@pytest.mark.parametrize("make", [lambda: bn_simd.BatchNorm2d(3), lambda: bn_simd.BatchNorm2d(3, renorm=True),
                                  lambda: bn_simd.InstanceNorm2d(3, affine=True, track_running_stats=True),
                                  lambda: bn_simd.GroupNorm(3, 3)], ids=["bn", "renorm", "in", "gn"])
def test_weight_set_to_none(make):
    layer = make()
    layer.weight = None
    state = layer.state_dict()  # (PyTorch's state_dict leaves a None parameter out)
    assert "weight" not in state and "bias" in state
    layer.reset_parameters()
    assert layer.weight is None
    layer.load_state_dict(state)
    with pytest.raises(ValueError, match="unexpected keys \\['weight'\\]"):  # (as PyTorch's strict load)
        layer.load_state_dict(dict(state, weight=np.ones(3)))
    x = _rng(15).standard_normal((4, 3, 2, 2)).astype(np.float32)
    layer(x)
    layer.backward(np.ones_like(x))
    assert layer.grad_weight is None and layer.grad_bias is not None


def test_batch_norm_weight_none_state_dict_matches_torch():
    torch = pytest.importorskip("torch")
    tl = torch.nn.BatchNorm2d(3)
    tl.weight = None
    layer = bn_simd.BatchNorm2d(3)
    layer.weight = None
    assert list(layer.state_dict()) == list(tl.state_dict())


# ---- the unbatched InstanceNorm's channel message ----------------------------------------------------------------

@pytest.mark.parametrize("layout, shape, axis", [("NCHW", (4, 3), "0"), ("NHWC", (3, 4), "-1")])
def test_unbatched_instance_norm_channel_message_shows_the_callers_shape(layout, shape, axis):
    layer = bn_simd.InstanceNorm1d(3, layout=layout)
    with pytest.raises(ValueError, match=rf"x must have 3 channels on axis {axis} \(layout '{layout}'\), "
                                         rf"got 4 in shape \({shape[0]}, {shape[1]}\)$"):
        layer(np.ones(shape, np.float32))
    assert layer._saved is None
    # batched: as before
    with pytest.raises(ValueError, match=r"x must have 3 channels on axis .* got 4 in shape \(2, "):
        layer(np.ones((2,) + shape, np.float32))


def test_load_state_dict_replaces_a_held_array_whose_elements_overlap():
    """load_state_dict copies into the layer's arrays in place, except into one whose elements share memory (a
    zero-stride view), which it replaces: the copy would not hold the loaded values."""
    layer = bn_simd.BatchNorm2d(3)
    layer.running_mean = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (3,), (0,), writeable=True)
    state = layer.state_dict()
    state["running_mean"] = np.array([1.0, 2.0, 3.0], np.float32)
    layer.load_state_dict(state)
    np.testing.assert_array_equal(layer.running_mean, [1.0, 2.0, 3.0])


def _out_over_param_cases():
    rng = np.random.default_rng(21)
    # (layer, x, g, the parameter out= is given, out's view of it): out shares the parameter's memory
    for act in (None, "relu"):
        for tgt in ("weight", "bias"):
            ln = bn_simd.LayerNorm((4, 5), dtype=np.float64, activation=act)
            ln.weight[...] = rng.standard_normal((4, 5)) + 2
            yield ln, rng.standard_normal((4, 5)), rng.standard_normal((4, 5)), tgt, lambda p: p
        rms = bn_simd.RMSNorm((4, 5), dtype=np.float64, activation=act)
        rms.weight[...] = rng.standard_normal((4, 5)) + 2
        yield rms, rng.standard_normal((4, 5)), rng.standard_normal((4, 5)), "weight", lambda p: p
        gn = bn_simd.GroupNorm(2, 6, dtype=np.float64, activation=act)
        gn.weight[...] = rng.standard_normal(6) + 2
        yield gn, rng.standard_normal((1, 6)), rng.standard_normal((1, 6)), "weight", lambda p: p[None]
        bn = bn_simd.BatchNorm1d(6, dtype=np.float64, activation=act).eval()
        bn.weight[...] = rng.standard_normal(6) + 2
        bn.running_var[...] = rng.uniform(0.5, 2, 6)
        yield bn, rng.standard_normal((1, 6)), rng.standard_normal((1, 6)), "weight", lambda p: p[None]


def test_a_layers_out_over_its_own_weight_or_bias_keeps_the_forwards_parameters_for_backward():
    """out= sharing the layer's weight (or bias) memory: the forward reads the parameters before writing, and the
    backward uses the weight and bias the forward used (copied before the kernel wrote out), as with a separate out:
    grad_x and the parameter gradients are those of a copy of the layer called without it."""
    import copy
    n = 0
    for layer, x, g, tgt, view in _out_over_param_cases():
        ref = copy.deepcopy(layer)
        y_ref = ref(x)
        gx_ref = ref.backward(g)
        y = layer(x, out=view(getattr(layer, tgt)))
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(layer.backward(g), gx_ref, err_msg=f"{type(layer).__name__} {tgt}")
        np.testing.assert_array_equal(layer.grad_weight, ref.grad_weight)
        n += 1
    assert n == 10


def test_unbatched_instance_norm_returns_the_callers_out_and_names_its_shapes():
    layer = bn_simd.InstanceNorm2d(3, affine=True)
    x = np.random.default_rng(22).standard_normal((3, 4, 5)).astype(np.float32)
    out = np.empty_like(x)
    assert layer(x, out=out) is out
    gout = np.empty_like(x)
    assert layer.backward(np.ones_like(x), out=gout) is gout
    with pytest.raises(ValueError, match=r"grad_out must have the shape of x \(3, 4, 5\), got \(1, 3, 4, 5\)"):
        layer.backward(np.ones((1, 3, 4, 5), np.float32))
    layer.activation = "relu"
    assert layer(x, out=out) is out and layer.backward(np.ones_like(x), out=gout) is gout


@pytest.mark.parametrize("kind", ["tensor", "tuple", "readonly"])
@pytest.mark.parametrize("make", [lambda: bn_simd.BatchNorm1d(3), lambda: bn_simd.GroupNorm(1, 3),
                                  lambda: bn_simd.LayerNorm(3)], ids=["batch", "group", "layer"])
def test_array_likes_assigned_as_parameters_keep_state_dict_and_resets_working(kind, make):
    """A weight assigned as another array-like (a detached torch tensor when porting, a tuple, a read-only array) is
    taken by the calls; state_dict gives ndarray copies of it, and reset_parameters replaces it by a new array of the
    layer's dtype (they raised AttributeError: no copy, no fill)."""
    layer = make()
    if kind == "tensor":
        torch = pytest.importorskip("torch")
        w = torch.tensor([2.0, 3.0, 4.0])
    elif kind == "tuple":
        w = (2.0, 3.0, 4.0)
    else:
        w = np.array([2.0, 3.0, 4.0], np.float32)
        w.flags.writeable = False
    layer.weight = w
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    layer(x)
    layer.backward(np.ones_like(x))
    sd = layer.state_dict()
    assert type(sd["weight"]) is np.ndarray and list(sd["weight"]) == [2.0, 3.0, 4.0]
    layer.reset_parameters()
    assert type(layer.weight) is np.ndarray and layer.weight.dtype == np.float32 and np.all(layer.weight == 1)
    if kind == "readonly":
        assert np.all(w == [2.0, 3.0, 4.0])  # (the caller's read-only array untouched)


def test_running_statistics_assigned_as_array_likes_reset_to_new_arrays():
    """reset_running_stats of running statistics assigned as a tuple (taken in eval) gives new arrays."""
    layer = bn_simd.BatchNorm1d(3).eval()
    layer.running_mean, layer.running_var = (1.0, 2.0, 3.0), (4.0, 5.0, 6.0)
    layer(np.ones((2, 3), np.float32))
    layer.reset_running_stats()
    assert type(layer.running_mean) is np.ndarray and np.all(layer.running_mean == 0) and np.all(layer.running_var == 1)


@pytest.mark.parametrize("make", [lambda m: bn_simd.BatchNorm1d(3, momentum=m, track_running_stats=False),
                                  lambda m: bn_simd.InstanceNorm1d(3, momentum=m)], ids=["batch", "instance"])
def test_momentum_outside_0_1_is_taken_where_nothing_is_updated(make):
    """momentum's value is checked only where running statistics are updated (the README's rule, PyTorch's): a layer
    without running statistics takes 2.0 at construction as after it; a non-number is still a TypeError."""
    layer = make(2.0)
    x = np.random.default_rng(1).standard_normal((4, 3, 5)).astype(np.float32)
    assert layer(x).shape == x.shape and layer.momentum == 2.0
    with pytest.raises(TypeError, match="momentum"):
        make("0.1")
    with pytest.raises(ValueError, match="momentum"):
        bn_simd.BatchNorm1d(3, momentum=2.0)


@pytest.mark.parametrize("make", ["BatchNorm2d", "GroupNorm", "LayerNorm"])
def test_a_state_dict_of_parameters_loads(make):
    """torch's state_dict(keep_vars=True) holds Parameters (tensors requiring grad): loading copies their values, as
    PyTorch's load_state_dict (it was refused as a tensor that requires grad)."""
    torch = pytest.importorskip("torch")
    t = {"BatchNorm2d": lambda: torch.nn.BatchNorm2d(3), "GroupNorm": lambda: torch.nn.GroupNorm(1, 3),
         "LayerNorm": lambda: torch.nn.LayerNorm(3)}[make]()
    with torch.no_grad():
        t.weight.copy_(torch.tensor([2.0, 3.0, 4.0]))
    layer = {"BatchNorm2d": lambda: bn_simd.BatchNorm2d(3), "GroupNorm": lambda: bn_simd.GroupNorm(1, 3),
             "LayerNorm": lambda: bn_simd.LayerNorm(3)}[make]()
    layer.load_state_dict(t.state_dict(keep_vars=True))
    assert list(layer.weight) == [2.0, 3.0, 4.0] and t.weight.requires_grad
