"""grad_residual_out=: the backward through a residual add writes the residual's gradient into the caller's array.

For batch, group, instance, layer and RMS norm (functional calls and layers), with and without an activation, in
float64, float32, float16 and bfloat16: the given array comes back holding the bits the call gives without it (the
other results unchanged too), alone, with grad_x in place over grad_out and over x; arrays it may not be (grad_out, x,
the residual, out, a partial overlap of one, the wrong shape, dtype or memory order, read-only, not an array, or no
residual to differentiate) are refused naming it, and a refused call writes nothing (neither out nor
grad_residual_out), including when the refusal comes from the backward's own checks after grad_residual_out passed
its own.
"""
import numpy as np
import pytest

import bn_simd
from test_epilogue_ops import OPS, SHAPE, G, EPS, make, grads_of

ACTS = (None, "relu", "silu")


class BN:
    """Batch norm in the shape of test_epilogue_ops.Op (forward, backward, rms)."""
    rms = False

    def __init__(self, layout):
        self.layout = layout

    def __repr__(self):
        return f"bn-{self.layout}"

    def params(self, C, rng):
        return rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C), rng.standard_normal(C)

    def forward(self, x, w, b, **kw):
        return bn_simd.batch_norm_forward(x, w, b, eps=EPS, layout=self.layout, **kw)

    def backward(self, g, x, fwd, w, b, **kw):
        ep = dict(bias=b, eps=EPS, save_stats=fwd[3]) if len(fwd) == 4 else {}
        return bn_simd.batch_norm_backward(g, x, fwd[1], fwd[2], w, layout=self.layout, **ep, **kw)


ALL = [BN("NCHW"), BN("NHWC")] + OPS


def _dtype(name):
    if name == "bfloat16":
        return pytest.importorskip("ml_dtypes").bfloat16
    return np.dtype(name)


def _bits(a):
    return None if a is None else np.ascontiguousarray(a).view(np.uint8)


def _same(got, want, msg):
    assert len(got) == len(want), msg
    for k, (p, q) in enumerate(zip(got, want)):
        if q is None:
            assert p is None, (msg, k)
        else:
            assert p.dtype == q.dtype and p.shape == q.shape, (msg, k)
            np.testing.assert_array_equal(_bits(p), _bits(q), err_msg=f"{msg}, result {k}")


def _case(op, dtype, act, seed=0):
    _, (x, r, g), w, b = make(op, np.float32, seed=seed)
    x, r, g = (a.astype(dtype) for a in (x, r, g))
    if dtype in (np.float32, np.float64) or np.dtype(dtype) == np.float64:
        w = w.astype(dtype)
        b = None if b is None else b.astype(dtype)
    else:  # (16-bit data: float32 parameters)
        w = w.astype(np.float32)
        b = None if b is None else b.astype(np.float32)
    fwd = op.forward(x, w, b, activation=act, residual=r) if act else op.forward(x, w, b)
    return x, r, g, w, b, fwd


@pytest.mark.parametrize("op", ALL, ids=repr)
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_the_given_array_receives_the_bits_of_a_new_one(op, dtype):
    dt = _dtype(dtype)
    for act in ACTS:
        x, r, g, w, b, fwd = _case(op, dt, act, seed=1)
        want = op.backward(g, x, fwd, w, b, activation=act, residual=r)
        gro = np.full_like(x, 3)
        got = op.backward(g, x, fwd, w, b, activation=act, residual=r, grad_residual_out=gro)
        assert grads_of(op, got)[3] is gro
        _same(got, want, f"{op} {act}")
        # grad_x in place over grad_out (which the residual's gradient is made from) and over x
        for over in ("grad_out", "x"):
            g2, x2 = g.copy(), x.copy()
            gro = np.empty_like(x)
            o = g2 if over == "grad_out" else x2
            got = op.backward(g2, x2, fwd, w, b, activation=act, residual=r, grad_residual_out=gro, out=o)
            assert got[0] is o and grads_of(op, got)[3] is gro
            _same(got, want, f"{op} {act} out={over}")
        # and beside a separate out, reused over two calls
        out, gro = np.empty_like(x), np.empty_like(x)
        for _ in range(2):
            got = op.backward(g, x, fwd, w, b, activation=act, residual=r, grad_residual_out=gro, out=out)
            _same(got, want, f"{op} {act} out and grad_residual_out")


@pytest.mark.parametrize("op", ALL, ids=repr)
def test_refusals_name_it_and_write_nothing(op):
    for act in ACTS:
        x, r, g, w, b, fwd = _case(op, np.float32, act, seed=2)
        out = np.full_like(x, 7.0)
        big = np.full((2 * x.size,), 5.0, np.float32)
        bad = [
            (g, ValueError, "grad_residual_out must not share memory with grad_out"),
            (x, ValueError, "grad_residual_out must not share memory with x"),
            (r, ValueError, "grad_residual_out must not share memory with residual"),
            (out, ValueError, "grad_residual_out must not share memory with out"),
            (np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), np.float32), ValueError, "grad_residual_out must have shape"),
            (np.zeros(x.shape, np.float64), TypeError, "grad_residual_out must have dtype"),
            (np.zeros(x.shape[::-1], np.float32).T, ValueError, "grad_residual_out must be C-contiguous"),
            (np.zeros(x.shape, np.float32).tolist(), TypeError, "grad_residual_out must be a numpy.ndarray"),
        ]
        ro = np.zeros_like(x)
        ro.flags.writeable = False
        bad.append((ro, ValueError, "grad_residual_out must be writeable"))
        for arr, exc, pat in bad:
            with pytest.raises(exc, match=pat):
                op.backward(g, x, fwd, w, b, activation=act, residual=r, grad_residual_out=arr, out=out)
        # a partial overlap with out: two views of one buffer
        o1, o2 = big[:x.size].reshape(x.shape), big[x.size // 2:x.size // 2 + x.size].reshape(x.shape)
        with pytest.raises(ValueError, match="grad_residual_out must not share memory with out"):
            op.backward(g, x, fwd, w, b, activation=act, residual=r, grad_residual_out=o2, out=o1)
        assert np.all(big == 5.0)
        # no residual: nothing to write
        gro = np.full_like(x, 9.0)
        with pytest.raises(ValueError, match="grad_residual_out.*residual"):
            op.backward(g, x, fwd, w, b, activation=act, grad_residual_out=gro, out=out)
        # the backward's own checks refuse after grad_residual_out passed its own: nothing written either
        with pytest.raises((ValueError, TypeError)):
            op.backward(g[:1], x, fwd, w, b, activation=act, residual=r, grad_residual_out=gro, out=out)
        with pytest.raises((ValueError, TypeError)):
            op.backward(g, x, fwd, w[:-1], b, activation=act, residual=r, grad_residual_out=gro, out=out)
        assert np.all(out == 7.0) and np.all(gro == 9.0), (op, act)


@pytest.mark.parametrize("op", ALL, ids=repr)
def test_odd_memory_is_refused_and_partial_overlaps_with_every_input(op):
    """Byte-swapped, unaligned, a NumPy scalar; half overlaps of grad_out, x and the residual (views of one buffer,
    each input a copy of its values): refused naming what it may not be, with nothing written."""
    for act in (None, "relu"):
        x, r, g, w, b, fwd = _case(op, np.float32, act, seed=3)
        out = np.full_like(x, 7.0)
        raw = np.full(x.nbytes + 1, 0x55, np.uint8)
        unaligned = raw[1:].view(np.float32).reshape(x.shape)
        assert not unaligned.flags.aligned
        for arr, exc, pat in [(np.zeros(x.shape, x.dtype.newbyteorder()), TypeError, "grad_residual_out must be in the machine.s byte order"),
                              (unaligned, ValueError, "grad_residual_out must be aligned"),
                              (np.float32(0), TypeError, "grad_residual_out must be a numpy.ndarray")]:
            with pytest.raises(exc, match=pat):
                op.backward(g, x, fwd, w, b, activation=act, residual=r, grad_residual_out=arr, out=out)
        assert np.all(raw == 0x55) and np.all(out == 7.0)
        for name in ("grad_out", "x", "residual"):
            big = np.full(2 * x.size, 5.0, np.float32)
            shared = big[:x.size].reshape(x.shape)
            gro = big[x.size // 2:x.size // 2 + x.size].reshape(x.shape)
            args = dict(grad_out=g, x=x, residual=r)
            shared[...] = args[name]
            args[name] = shared
            before = big.copy()
            with pytest.raises(ValueError, match=f"grad_residual_out must not share memory with {name}"):
                op.backward(args["grad_out"], args["x"], fwd, w, b, activation=act, residual=args["residual"],
                            grad_residual_out=gro, out=out)
            np.testing.assert_array_equal(big, before)
            assert np.all(out == 7.0), (op, act, name)


def test_in_place_over_grad_out_refused_by_the_backward_writes_nothing():
    """Without an activation, grad_x over grad_out: the residual's gradient (grad_out) is kept aside before the
    backward runs; a backward that then refuses (here a save_invstd of the wrong length) leaves grad_out and
    grad_residual_out as they were."""
    op = BN("NCHW")
    x, r, g, w, b, fwd = _case(op, np.float32, None, seed=3)
    g0, gro = g.copy(), np.full_like(x, 9.0)
    with pytest.raises(ValueError, match="save_invstd"):
        bn_simd.batch_norm_backward(g, x, fwd[1], fwd[2][:-1], w, residual=r, out=g, grad_residual_out=gro)
    np.testing.assert_array_equal(g, g0)
    assert np.all(gro == 9.0)


def _layer_cases():
    C = SHAPE[1]
    return [
        ("bn", lambda **k: bn_simd.BatchNorm2d(C, **k), "NCHW", False),
        ("bn-eval", lambda **k: bn_simd.BatchNorm2d(C, **k), "NCHW", False),
        ("gn", lambda **k: bn_simd.GroupNorm(G, C, layout="NHWC", **k), "NHWC", False),
        ("in", lambda **k: bn_simd.InstanceNorm2d(C, affine=True, **k), "NCHW", False),
        ("in-unbatched", lambda **k: bn_simd.InstanceNorm2d(C, affine=True, **k), "NCHW", True),
        ("ln", lambda **k: bn_simd.LayerNorm(C, layout="NCHW", **k), "NCHW", False),
        ("rms", lambda **k: bn_simd.RMSNorm(C, **k), "NHWC", False),
    ]


@pytest.mark.parametrize("k", range(7), ids=[c[0] for c in _layer_cases()])
def test_layers(k):
    name, make_layer, layout, unbatched = _layer_cases()[k]
    rng = np.random.default_rng(12)
    shape = SHAPE[1:] if unbatched else SHAPE
    if layout == "NHWC":
        shape = shape[:1] + shape[2:] + shape[1:2]
    x, r, g = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    for act in ACTS:
        kw = {} if act is None else dict(activation=act)
        a, b = make_layer(**kw), make_layer(**kw)
        if name == "bn-eval":
            a.eval(), b.eval()
        a(x, residual=r)
        b(x, residual=r)
        want = a.backward(g)
        gro = np.full_like(x, 4.0)
        got = b.backward(g, grad_residual_out=gro)
        assert b.grad_residual is gro
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(gro, a.grad_residual)
        np.testing.assert_array_equal(b.grad_weight, a.grad_weight)
        with pytest.raises(ValueError, match="grad_residual_out must not share memory with grad_out"):
            b.backward(g, grad_residual_out=g)
        # a forward without a residual: refused, nothing written
        b(x)
        gro[...] = 4.0
        with pytest.raises(ValueError, match="grad_residual_out"):
            b.backward(g, grad_residual_out=gro)
        assert np.all(gro == 4.0)


@pytest.mark.parametrize("op", ALL, ids=repr)
def test_the_callers_arrays_are_refused_when_the_kernel_reads_copies_of_them(op):
    """grad_out, x and the residual in another memory order are read through C-contiguous copies; grad_residual_out
    may not be the caller's own array either (the call would overwrite an input the caller, or a layer, keeps)."""
    for act in (None, "relu"):
        x, r, g, w, b, fwd = _case(op, np.float32, act, seed=4)
        for name in ("grad_out", "x", "residual"):
            base = {"grad_out": g, "x": x, "residual": r}[name].copy()
            t = np.ascontiguousarray(np.swapaxes(base, -1, -2))
            view = np.swapaxes(t, -1, -2)  # (base's values, not C-contiguous: the call copies it)
            args = {"grad_out": g, "x": x, "residual": r, name: view}
            gro = t.reshape(x.shape)  # (the caller's memory under the view, C-contiguous)
            keep = t.copy()
            with pytest.raises(ValueError, match=f"grad_residual_out must not share memory with {name}"):
                op.backward(args["grad_out"], args["x"], fwd, w, b, activation=act, residual=args["residual"],
                            grad_residual_out=gro)
            np.testing.assert_array_equal(t, keep)


def test_unbatched_instance_norm_takes_the_samples_shape():
    C, L = SHAPE[1], 7
    rng = np.random.default_rng(13)
    x, r, g = (rng.standard_normal((C, L)).astype(np.float32) for _ in range(3))
    layer = bn_simd.InstanceNorm1d(C, affine=True, activation="relu")
    layer(x, residual=r)
    with pytest.raises(ValueError, match=r"grad_residual_out must have shape \(6, 7\), got \(1, 6, 7\)"):
        layer.backward(g, grad_residual_out=np.empty((1, C, L), np.float32))
    gro = np.empty((C, L), np.float32)
    layer.backward(g, grad_residual_out=gro)
    assert layer.grad_residual is gro


def test_a_layer_whose_forward_had_no_residual_says_so():
    x, r, g, w, b, fwd = _case(BN("NCHW"), np.float32, None)
    layer = bn_simd.BatchNorm2d(SHAPE[1], activation="relu")
    layer(x)
    with pytest.raises(ValueError, match="the forward had no residual"):
        layer.backward(g, grad_residual_out=np.empty_like(x))


def test_sync_batch_norm_takes_the_keyword():
    """SyncBatchNorm.backward has BatchNorm.backward's signature (no residual in its forward: None only)."""
    from fake_comm import make_comms  # (one rank: the synchronised path)
    x, r, g, w, b, fwd = _case(BN("NCHW"), np.float32, None)
    layer = bn_simd.SyncBatchNorm(SHAPE[1], comm=make_comms(1)[0])
    layer(x)
    gx = layer.backward(g, grad_residual_out=None)
    assert gx.shape == x.shape
    layer(x)
    with pytest.raises(ValueError, match="grad_residual_out"):
        layer.backward(g, grad_residual_out=np.empty_like(x))
