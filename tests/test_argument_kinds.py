"""One path for every kind of argument.

Each entry point has one implementation: the argument checker (bn_simd/_args.pyx) turns whatever the entry point
accepts into what the kernels take, and the bridge (bn_simd/_core.pyx) calls them. So a call with plain arguments
(C-contiguous native ndarrays, Python floats, a layout name, a new output) is checked against the float64 oracle, and
every other kind of argument must give that call's bytes, outputs and running statistics alike:

* data (x, grad_out): Fortran order, strides, negative strides, byte-swapped, unaligned, read-only, an ndarray
  subclass, a list (of float64 data), a torch tensor;
* per-channel arrays: float16, float32, float64, long double, byte-swapped, strided, read-only, a list, a tuple,
  torch tensors (bfloat16 too); the values are multiples of 1/16, the same in every one of these dtypes;
* running statistics updated in place: float16, float64, byte-swapped, strided (they receive the float64 result
  rounded to their dtype);
* eps and momentum: NumPy scalars and fractions.Fraction; training flags: NumPy bools and ints; the layout aliases
  "channels_first" / "channels_last"; out= a separate array or an input itself.
"""
import fractions

import numpy as np
import pytest

import bn_simd
import reference as ref
from conftest import (apply_tol, assert_forward_close, assert_within, backward_bounds, forward_bound, make_input,
                      reduction_tol, stat_tol)
from test_groups import oracle_backward, oracle_forward

try:
    import torch
except ImportError:
    torch = None

F32, F64 = np.float32, np.float64
SHAPE = (3, 6, 4, 3)  # (N, C, H, W); 3 groups of 2 channels
C, G = 6, 3
EPS, MOMENTUM = 2.0 ** -10, 0.25  # (exact in every float dtype: their kinds are the same number)
ALIAS = {"NCHW": "channels_first", "NHWC": "channels_last"}


class _Subclass(np.ndarray):
    pass


def _unaligned(a):
    raw = np.zeros(a.nbytes + 1, np.uint8)
    u = raw[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    return u


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


DATA_KINDS = {
    "fortran": np.asfortranarray,
    "strided": lambda a: np.repeat(a, 2, axis=-1)[..., ::2],
    "negative strides": lambda a: np.flip(np.flip(a, 0).copy(), 0),
    "byte-swapped": lambda a: a.astype(a.dtype.newbyteorder("S")),
    "unaligned": _unaligned,
    "read-only": _read_only,
    "subclass": lambda a: a.copy().view(_Subclass),
    "list": lambda a: a.tolist(),
    "torch": lambda a: torch.from_numpy(a.copy()),
}
CHANNEL_KINDS = {
    "float16": lambda v: v.astype(np.float16),
    "float32": lambda v: v.astype(F32),
    "float64": lambda v: v.astype(F64),
    "long double": lambda v: v.astype(np.longdouble),
    "byte-swapped": lambda v: v.astype(v.dtype.newbyteorder("S")),
    "strided": lambda v: np.repeat(v, 3, axis=0)[::3],
    "read-only": _read_only,
    "list": lambda v: v.tolist(),
    "tuple": lambda v: tuple(v.tolist()),
    "torch": lambda v: torch.from_numpy(v.copy()),
    "torch bfloat16": lambda v: torch.from_numpy(v.astype(F32)).bfloat16(),
}
STATE_KINDS = {  # (the array passed, the dtype it stores in)
    "float16": lambda v: v.astype(np.float16),
    "float64": lambda v: v.astype(F64),
    "byte-swapped": lambda v: v.astype(v.dtype.newbyteorder("S")),
    "strided": lambda v: np.repeat(v, 2, axis=0)[::2],
}
SCALAR_KINDS = {
    "numpy float32": np.float32,
    "numpy float64": np.float64,
    "Fraction": fractions.Fraction,
}
FLAG_KINDS = {"numpy bool": np.bool_, "int": int}


def _grid(rng, shape, lo, hi):
    """Multiples of 1/16 in [lo, hi): exact in float16, bfloat16 and wider."""
    return rng.integers(round(lo * 16), round(hi * 16), shape) / 16.0


def _case(dtype, layout, seed=0):
    """The plain arguments of every entry point."""
    rng = np.random.default_rng(seed)
    x = make_input(SHAPE, layout, dtype, seed=seed + 1, loc=0.5, scale=2.0)
    g = make_input(SHAPE, layout, dtype, seed=seed + 2)
    return dict(x=x, grad_out=g, layout=layout, eps=EPS, momentum=MOMENTUM,
                running_mean=_grid(rng, C, -1, 1).astype(F32), running_var=_grid(rng, C, 0.5, 2).astype(F32),
                weight=_grid(rng, C, 0.5, 1.5).astype(dtype), bias=_grid(rng, C, -1, 1).astype(dtype),
                mean=_grid(rng, C, 0, 1), var=_grid(rng, C, 0.5, 2), invstd=_grid(rng, C, 0.5, 2),
                a=_grid(rng, C, -1, 1), b=_grid(rng, C, -1, 1), d=_grid(rng, C, -1, 1),
                sum_dy=_grid(rng, C, -8, 8), sum_dyxm=_grid(rng, C, -8, 8),
                group_mean=_grid(rng, (SHAPE[0], G), 0, 1).astype(dtype),
                group_invstd=_grid(rng, (SHAPE[0], G), 0.5, 2).astype(dtype),
                instance_mean=_grid(rng, (SHAPE[0], C), 0, 1).astype(dtype),
                instance_invstd=_grid(rng, (SHAPE[0], C), 0.5, 2).astype(dtype))


# Every entry point: its call on a dict of arguments (keys of _case, plus "out"), and the roles of the arguments
# whose kinds vary: data, channel (per-channel, read), state (updated in place), group (saved (N, G) statistics),
# eps, momentum, train (a truth value, True), eval (False), out (inputs it may be).
ENTRY_POINTS = {
    "batch_norm train": (
        lambda a: bn_simd.batch_norm(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
                                     a.get("train", True), a["momentum"], a["eps"], layout=a["layout"],
                                     out=a.get("out"), unbiased_running_var=a.get("unbiased", True)),
        dict(x="data", weight="channel", bias="channel", running_mean="state", running_var="state", eps="eps",
             momentum="momentum", train="train", unbiased="train", out=("x",))),
    "batch_norm train, no running statistics": (
        lambda a: bn_simd.batch_norm(a["x"], None, None, a["weight"], a["bias"], a.get("train", True),
                                     a["momentum"], a["eps"], layout=a["layout"], out=a.get("out")),
        dict(x="data", weight="channel", bias="channel", eps="eps", momentum="momentum", train="train",
             out=("x",))),
    "batch_norm eval": (
        lambda a: bn_simd.batch_norm(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
                                     a.get("eval", False), a["momentum"], a["eps"], layout=a["layout"],
                                     out=a.get("out")),
        dict(x="data", weight="channel", bias="channel", running_mean="channel", running_var="channel", eps="eps",
             eval="eval", out=("x",))),
    "batch_norm_forward": (
        lambda a: bn_simd.batch_norm_forward(a["x"], a["weight"], a["bias"], eps=a["eps"], layout=a["layout"],
                                             out=a.get("out")),
        dict(x="data", weight="channel", bias="channel", eps="eps", out=("x",))),
    "batch_norm_backward": (
        lambda a: bn_simd.batch_norm_backward(a["grad_out"], a["x"], a["mean"], a["invstd"], a["weight"],
                                              layout=a["layout"], out=a.get("out"), training=a.get("train", True)),
        dict(grad_out="data", x="data", mean="channel", invstd="channel", weight="channel", train="train",
             out=("x", "grad_out"))),
    "batch_norm_backward eval": (
        lambda a: bn_simd.batch_norm_backward(a["grad_out"], a["x"], a["mean"], a["invstd"], a["weight"],
                                              layout=a["layout"], out=a.get("out"), training=a.get("eval", False)),
        dict(grad_out="data", x="data", mean="channel", invstd="channel", weight="channel", eval="eval",
             out=("x", "grad_out"))),
    "batch_stats": (lambda a: bn_simd.batch_stats(a["x"], layout=a["layout"]), dict(x="data")),
    "normalize": (
        lambda a: bn_simd.normalize(a["x"], a["mean"], a["var"], a["weight"], a["bias"], eps=a["eps"],
                                    layout=a["layout"], out=a.get("out")),
        dict(x="data", mean="channel", var="channel", weight="channel", bias="channel", eps="eps", out=("x",))),
    "backward_reduce": (
        lambda a: bn_simd.backward_reduce(a["grad_out"], a["x"], a["mean"], layout=a["layout"]),
        dict(grad_out="data", x="data", mean="channel")),
    "backward_apply": (
        lambda a: bn_simd.backward_apply(a["grad_out"], a["x"], a["mean"], a["a"], a["b"], a["d"],
                                         layout=a["layout"], out=a.get("out")),
        dict(grad_out="data", x="data", mean="channel", a="channel", b="channel", d="channel",
             out=("x", "grad_out"))),
    "update_running_stats": (
        lambda a: bn_simd.update_running_stats(a["running_mean"], a["running_var"], a["mean"], a["var"], 24,
                                               a["momentum"]),
        dict(running_mean="state", running_var="state", mean="channel", var="channel", momentum="momentum")),
    "batch_moments": (lambda a: tuple(bn_simd.batch_moments(a["x"], layout=a["layout"])), dict(x="data")),
    "norm_coefficients": (
        lambda a: bn_simd.norm_coefficients(a["mean"], a["var"], a["weight"], a["bias"], eps=a["eps"],
                                            dtype=a["x"].dtype),
        dict(mean="channel", var="channel", weight="channel", bias="channel", eps="eps")),
    "backward_coefficients": (
        lambda a: bn_simd.backward_coefficients(a["sum_dy"], a["sum_dyxm"], a["mean"], a["invstd"], 24,
                                                a["weight"], training=a.get("train", True), dtype=a["x"].dtype),
        dict(sum_dy="channel", sum_dyxm="channel", mean="channel", invstd="channel", weight="channel",
             train="train")),
    "group_norm": (
        lambda a: bn_simd.group_norm(a["x"], G, a["weight"], a["bias"], a["eps"], layout=a["layout"],
                                     out=a.get("out")),
        dict(x="data", weight="channel", bias="channel", eps="eps", out=("x",))),
    "group_norm_forward": (
        lambda a: bn_simd.group_norm_forward(a["x"], G, a["weight"], a["bias"], eps=a["eps"], layout=a["layout"],
                                             out=a.get("out")),
        dict(x="data", weight="channel", bias="channel", eps="eps", out=("x",))),
    "group_norm_backward": (
        lambda a: bn_simd.group_norm_backward(a["grad_out"], a["x"], a["group_mean"], a["group_invstd"], G,
                                              a["weight"], layout=a["layout"], out=a.get("out")),
        dict(grad_out="data", x="data", group_mean="group", group_invstd="group", weight="channel",
             out=("x", "grad_out"))),
    "instance_norm": (
        lambda a: bn_simd.instance_norm(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
                                        a.get("train", True), a["momentum"], a["eps"], layout=a["layout"],
                                        out=a.get("out")),
        dict(x="data", weight="channel", bias="channel", running_mean="state", running_var="state", eps="eps",
             momentum="momentum", train="train", out=("x",))),
    "instance_norm running": (
        lambda a: bn_simd.instance_norm(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
                                        a.get("eval", False), a["momentum"], a["eps"], layout=a["layout"],
                                        out=a.get("out")),
        dict(x="data", weight="channel", bias="channel", running_mean="channel", running_var="channel",
             eps="eps", eval="eval", out=("x",))),
    "instance_norm_forward": (
        lambda a: bn_simd.instance_norm_forward(a["x"], a["weight"], a["bias"], eps=a["eps"], layout=a["layout"],
                                                out=a.get("out")),
        dict(x="data", weight="channel", bias="channel", eps="eps", out=("x",))),
    "instance_norm_backward": (
        lambda a: bn_simd.instance_norm_backward(a["grad_out"], a["x"], a["instance_mean"], a["instance_invstd"],
                                                 a["weight"], layout=a["layout"], out=a.get("out")),
        dict(grad_out="data", x="data", instance_mean="group", instance_invstd="group", weight="channel",
             out=("x", "grad_out"))),
}


GRADIENTS = ("batch_norm_backward", "batch_norm_backward eval", "group_norm_backward", "instance_norm_backward")


def _call(entry, args):
    """The outputs of entry point `entry` on args, and the running statistics after the call (as float64)."""
    call, roles = ENTRY_POINTS[entry]
    a = dict(args)
    state = [k for k in ("running_mean", "running_var") if roles.get(k) == "state"]
    for k in state:
        a[k] = a[k].copy()  # (updated in place)
    out = call(a)
    return (out if isinstance(out, tuple) else (out,)), {k: np.array(a[k], F64) for k in state}


def _assert_same(got, expected, what):
    """Same type, dtype, shape and bits, output by output."""
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected)):
        if not isinstance(e, np.ndarray):
            assert g == e, f"{what}: output {i}"
            continue
        assert type(g) is np.ndarray and g.dtype == e.dtype and g.shape == e.shape, f"{what}: output {i}"
        if g.dtype.itemsize > 8:  # (long double: 80 bits of value in 16 bytes)
            assert np.array_equal(g, e, equal_nan=True), f"{what}: output {i}"
        else:
            assert g.tobytes() == e.tobytes(), f"{what}: output {i}"


def _variants(entry, args):
    """(description, the varied argument, arguments) for every other kind of each argument of the entry point."""
    roles = ENTRY_POINTS[entry][1]
    for name, role in roles.items():
        if role == "data":
            for kind, make in DATA_KINDS.items():
                # (a list of numbers is float64 data: the same call for float64 data only)
                if (kind != "torch" or torch is not None) and (kind != "list" or args[name].dtype == F64):
                    yield f"{name} {kind}", name, dict(args, **{name: make(args[name])})
        elif role in ("channel", "group"):
            for kind, make in CHANNEL_KINDS.items():
                if not kind.startswith("torch") or torch is not None:
                    yield f"{name} {kind}", name, dict(args, **{name: make(np.asarray(args[name]))})
        elif role in ("eps", "momentum"):
            for kind, make in SCALAR_KINDS.items():
                yield f"{name} {kind}", name, dict(args, **{name: make(args[name])})
        elif role in ("train", "eval"):
            for kind, make in FLAG_KINDS.items():
                yield f"{name} {kind}", name, dict(args, **{name: make(role == "train")})
        elif name == "out":
            yield "out separate", name, dict(args, out=np.full_like(args["x"], np.nan))
            for source in role:
                buf = args[source].copy()
                yield f"out {source} itself", name, dict(args, out=buf, **{source: buf})
    yield "layout alias", "layout", dict(args, layout=ALIAS[args["layout"]])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_kind_of_argument_gives_the_plain_calls_bytes(entry, dtype, layout):
    args = _case(dtype, layout)
    plain, plain_state = _call(entry, args)
    # the parameter gradients have weight's dtype: a weight of another dtype gets the float64 sums rounded to it
    wide = _call(entry, dict(args, weight=args["weight"].astype(F64)))[0] if entry in GRADIENTS else None
    for what, name, variant in _variants(entry, args):
        got, state = _call(entry, variant)
        expected = plain
        if name == "weight" and wide is not None:
            expected = (plain[0],) + tuple(v.astype(got[k + 1].dtype) for k, v in enumerate(wide[1:]))
        _assert_same(got, expected, what)
        for k, v in state.items():
            np.testing.assert_array_equal(v, plain_state[k], err_msg=f"{k} after {what}")


@pytest.mark.parametrize("kind", list(STATE_KINDS))
@pytest.mark.parametrize("entry", ["batch_norm train", "update_running_stats", "instance_norm"])
def test_running_statistics_of_any_float_dtype_receive_the_float64_update_rounded(entry, kind):
    args = _case(F32, "NCHW", seed=3)
    reference = dict(args, running_mean=args["running_mean"].astype(F64),
                     running_var=args["running_var"].astype(F64))
    outputs, expected = _call(entry, reference)
    a = dict(args, running_mean=STATE_KINDS[kind](args["running_mean"]),
             running_var=STATE_KINDS[kind](args["running_var"]))
    got = ENTRY_POINTS[entry][0](a)
    _assert_same(got if isinstance(got, tuple) else (got,), outputs, kind)
    for k in ("running_mean", "running_var"):
        assert a[k].dtype == STATE_KINDS[kind](args[k]).dtype
        np.testing.assert_array_equal(a[k], expected[k].astype(a[k].dtype), err_msg=k)


# ---- the plain calls against the oracle --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_plain_batch_norm_calls_match_the_oracle(dtype, layout):
    a = _case(dtype, layout)
    x, w, b = a["x"], a["weight"], a["bias"]
    x64 = x.astype(F64)
    n = ref.reduction_size(x.shape, layout)
    rm, rv = a["running_mean"].copy(), a["running_var"].copy()
    y = bn_simd.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, layout=layout)
    assert_forward_close(y, x, w, b, EPS, layout)
    _, mean, var = ref.forward_train(x64, layout=layout)
    rm_ref, rv_ref = ref.update_running(a["running_mean"], a["running_var"], mean, var, n, MOMENTUM)
    assert_within(rm, rm_ref, stat_tol(n, F32) * (np.abs(rm_ref) + np.sqrt(var) + 1), "running_mean")
    assert_within(rv, rv_ref, 4 * stat_tol(n, F32) * np.abs(rv_ref), "running_var")
    rm, rv = a["running_mean"].copy(), a["running_var"].copy()
    bn_simd.batch_norm(x, rm, rv, w, b, True, MOMENTUM, EPS, layout=layout, unbiased_running_var=False)
    rv_ref = ref.update_running(a["running_mean"], a["running_var"], mean, var, n, MOMENTUM, unbiased=False)[1]
    assert_within(rv, rv_ref, 4 * stat_tol(n, F32) * np.abs(rv_ref), "running_var, biased")
    y = bn_simd.batch_norm(x, a["running_mean"], a["running_var"], w, b, False, eps=EPS, layout=layout)
    bound = forward_bound(x64, dtype, n, w, b, EPS, layout, a["running_mean"], a["running_var"], batch_stats=False)
    assert_within(y, ref.inference(x64, a["running_mean"], a["running_var"], w, b, EPS, layout), bound, "eval y")
    y, m, s = bn_simd.batch_norm_forward(x, w, b, eps=EPS, layout=layout)
    assert_forward_close(y, x, w, b, EPS, layout)
    assert_within(m, mean, stat_tol(n, dtype) * (np.abs(mean) + np.sqrt(var)), "save_mean")
    assert_within(s, ref.invstd(var, EPS), 2 * stat_tol(n, dtype) * ref.invstd(var, EPS), "save_invstd")
    for training in (True, False):
        res = bn_simd.batch_norm_backward(a["grad_out"], x, a["mean"], a["invstd"], w, layout=layout,
                                          training=training)
        expected = ref.backward(a["grad_out"].astype(F64), x64, a["mean"], a["invstd"], w, layout, training)
        bounds = backward_bounds(a["grad_out"].astype(F64), x64, a["mean"], a["invstd"], w, layout, training, dtype)
        for r, e, bd, name in zip(res, expected, bounds, ("grad_x", "grad_weight", "grad_bias")):
            assert_within(r, e, bd, f"{name}, training={training}")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_plain_step_calls_match_the_oracle(dtype, layout):
    a = _case(dtype, layout)
    x, g, w, b = a["x"], a["grad_out"], a["weight"], a["bias"]
    x64, g64 = x.astype(F64), g.astype(F64)
    n = ref.reduction_size(x.shape, layout)
    mean, var, _ = ref.stats(x64, layout)
    m, v = bn_simd.batch_stats(x, layout=layout)
    assert_within(m, mean, reduction_tol(n) * (np.abs(mean) + np.sqrt(var)), "batch_stats mean")
    assert_within(v, var, 4 * reduction_tol(n) * var, "batch_stats var")
    np.testing.assert_array_equal(np.stack(bn_simd.merge_moments(bn_simd.batch_moments(x, layout=layout))),
                                  np.stack((m, v)))
    y = bn_simd.normalize(x, a["mean"], a["var"], w, b, eps=EPS, layout=layout)
    bound = forward_bound(x64, dtype, n, w, b, EPS, layout, a["mean"], a["var"], batch_stats=False)
    assert_within(y, ref.normalize(x64, a["mean"], a["var"], w, b, EPS, layout), bound, "normalize")
    xc, gc = ref.to_cn(x64, layout), ref.to_cn(g64, layout)
    sdy, sdyx = bn_simd.backward_reduce(g, x, a["mean"], layout=layout)
    terms = gc * (xc - a["mean"][:, None])
    assert_within(sdy, gc.sum(axis=1), reduction_tol(n) * np.abs(gc).sum(axis=1), "sum_dy")
    assert_within(sdyx, terms.sum(axis=1), reduction_tol(n) * np.abs(terms).sum(axis=1), "sum_dyxm")
    dx = bn_simd.backward_apply(g, x, a["mean"], a["a"], a["b"], a["d"], layout=layout)
    parts = [a["a"][:, None] * gc, a["b"][:, None] * (xc - a["mean"][:, None]),
             np.broadcast_to(a["d"][:, None], xc.shape)]
    assert_within(ref.to_cn(dx, layout), sum(parts), apply_tol(dtype) * (sum(np.abs(p) for p in parts) + 1),
                  "backward_apply")
    mc, ac, bc, exact = bn_simd.norm_coefficients(a["mean"], a["var"], w, b, eps=EPS, dtype=dtype)
    assert exact
    y = ((xc - mc.astype(F64)[:, None]) * ac.astype(F64)[:, None] + bc.astype(F64)[:, None])
    assert_within(ref.from_cn(y, x.shape, layout), ref.normalize(x64, a["mean"], a["var"], w, b, EPS, layout),
                  bound, "norm_coefficients")
    *_, gw, gb = bn_simd.backward_coefficients(a["sum_dy"], a["sum_dyxm"], a["mean"], a["invstd"], n, w,
                                               dtype=dtype)
    np.testing.assert_array_equal(gb, a["sum_dy"])
    assert_within(gw, a["invstd"] * a["sum_dyxm"], 2 * np.finfo(F64).eps * np.abs(a["invstd"] * a["sum_dyxm"]),
                  "grad_weight")
    rm, rv = a["running_mean"].astype(F64), a["running_var"].astype(F64)
    bn_simd.update_running_stats(rm, rv, a["mean"], a["var"], n, MOMENTUM)
    rm_ref, rv_ref = ref.update_running(a["running_mean"], a["running_var"], a["mean"], a["var"], n, MOMENTUM)
    assert_within(rm, rm_ref, 4 * np.finfo(F64).eps * (np.abs(rm_ref) + 1), "update_running_stats mean")
    assert_within(rv, rv_ref, 4 * np.finfo(F64).eps * np.abs(rv_ref), "update_running_stats var")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_plain_group_and_instance_norm_calls_match_the_oracle(dtype, layout):
    a = _case(dtype, layout)
    x, g, w, b = a["x"], a["grad_out"], a["weight"], a["bias"]
    nchw = (lambda t: t) if layout == "NCHW" else (lambda t: np.moveaxis(t, -1, 1))
    x64, g64 = nchw(x).astype(F64), nchw(g).astype(F64)
    tol = 64 * (np.finfo(dtype).eps + reduction_tol(x[0].size))
    for groups, forward, backward, stats in (
            (G, lambda: bn_simd.group_norm_forward(x, G, w, b, eps=EPS, layout=layout),
             lambda: bn_simd.group_norm_backward(g, x, a["group_mean"], a["group_invstd"], G, w, layout=layout),
             ("group_mean", "group_invstd")),
            (C, lambda: bn_simd.instance_norm_forward(x, w, b, eps=EPS, layout=layout),
             lambda: bn_simd.instance_norm_backward(g, x, a["instance_mean"], a["instance_invstd"], w, layout=layout),
             ("instance_mean", "instance_invstd"))):
        y_ref, mean, var = oracle_forward(x64, groups, w, b, EPS)
        y, m, s = forward()
        np.testing.assert_allclose(nchw(y), y_ref, rtol=0, atol=tol * (np.abs(y_ref).max() + 1))
        np.testing.assert_allclose(m, mean, rtol=tol, atol=tol)
        np.testing.assert_allclose(s, 1 / np.sqrt(var + EPS), rtol=tol)
        dx_ref, dw_ref, db_ref = oracle_backward(g64, x64, groups, a[stats[0]], a[stats[1]], w)
        dx, dw, db = backward()
        scale = np.abs(dx_ref).max() + np.abs(g64).max() * np.abs(a[stats[1]]).max() * 2
        np.testing.assert_allclose(nchw(dx), dx_ref, rtol=0, atol=tol * scale)
        np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=tol * (np.abs(dw_ref).max() + x[0].size * 8))
        np.testing.assert_allclose(db, db_ref, rtol=0, atol=tol * (np.abs(db_ref).max() + x[0].size * 8))


def test_integer_eps_and_momentum_are_their_floats():
    a = _case(F32, "NHWC", seed=4)
    for eps, momentum in ((1, 1), (1, 0)):
        results = []
        for e, mom in ((eps, momentum), (float(eps), float(momentum))):
            rm, rv = a["running_mean"].copy(), a["running_var"].copy()
            y = bn_simd.batch_norm(a["x"], rm, rv, a["weight"], None, True, mom, e, layout="NHWC")
            results.append((y.tobytes(), rm.tobytes(), rv.tobytes(),
                            bn_simd.normalize(a["x"], a["mean"], a["var"], eps=e, layout="NHWC").tobytes()))
        assert results[0] == results[1]


# ---- refused arguments: same checks, whatever kind the other arguments are ----------------------------------------

@pytest.mark.parametrize("kind", list(DATA_KINDS))
def test_an_argument_refused_beside_any_kind_of_x_changes_nothing(kind):
    if kind == "torch" and torch is None:
        pytest.skip("torch is not installed")
    a = _case(F32, "NCHW", seed=5)
    x = DATA_KINDS[kind](a["x"])
    rm, rv = a["running_mean"].copy(), a["running_var"].copy()
    out = np.full(SHAPE, 7.0, F64 if kind == "list" else F32)  # (a list is float64 data)
    bad = [dict(weight=np.ones(C + 1)), dict(bias=np.ones(C, np.int32)), dict(eps=0.0), dict(momentum=1.5),
           dict(layout="NWHC"), dict(out=np.zeros(SHAPE, np.float16)), dict(running_var=_read_only(rv))]
    for over in bad:
        kw = dict(running_mean=rm, running_var=rv, weight=a["weight"], bias=a["bias"], training=True,
                  eps=EPS, momentum=MOMENTUM, layout="NCHW", out=out)
        kw.update(over)
        with pytest.raises((TypeError, ValueError), match=next(iter(over))):
            bn_simd.batch_norm(x, **kw)
        np.testing.assert_array_equal(rm, a["running_mean"])
        np.testing.assert_array_equal(rv, a["running_var"])
        np.testing.assert_array_equal(out, 7.0)


def test_unbiased_flag_is_read_only_when_running_stats_are_updated():
    a = _case(F32, "NCHW", seed=6)
    args = (a["x"], a["running_mean"], a["running_var"])
    y = bn_simd.batch_norm(*args, training=False, unbiased_running_var=np.zeros(2))  # (no truth value)
    np.testing.assert_array_equal(y, bn_simd.batch_norm(*args, training=False))
    rm, rv = a["running_mean"].copy(), a["running_var"].copy()
    with pytest.raises(TypeError, match="unbiased_running_var must be a bool"):
        bn_simd.batch_norm(a["x"], rm, rv, training=True, unbiased_running_var=np.zeros(2))
    np.testing.assert_array_equal(rm, a["running_mean"])  # (read before anything is written)


def test_out_with_x_data_and_other_strides_on_axes_of_one_element_is_in_place():
    # C-contiguous flags ignore size-1 axes: same data pointer, strides differing only where an axis has one element
    # (which never moves along it) is x itself element for element
    from numpy.lib.stride_tricks import as_strided
    x = np.arange(8, dtype=F32).reshape(4, 1, 2)
    want = bn_simd.batch_norm(x, training=True)
    gwant = bn_simd.batch_norm_backward(x, x, np.zeros(1), np.ones(1))[0]
    out = as_strided(x.copy(), strides=(8, 12345, 4))
    got = bn_simd.batch_norm(out, training=True, out=as_strided(out, strides=(8, 4, 4)))
    assert got.tobytes() == want.tobytes() and out.tobytes() == want.tobytes()
    g = as_strided(x.copy(), strides=(8, 12345, 4))
    bn_simd.batch_norm_backward(g, x, np.zeros(1), np.ones(1), out=as_strided(g, strides=(8, 0, 4)))
    assert g.tobytes() == gwant.tobytes()


def test_backward_apply_out_partly_overlapping_grad_out_is_refused():
    buf = np.zeros(2 * 3 * 4 + 1, F32)
    g = buf[1:].reshape(2, 3, 4)
    g[...] = 1.0
    out = buf[:-1].reshape(2, 3, 4)
    x = make_input((2, 3, 4), "NCHW", F32, seed=24)
    v = np.ones(3, F32)
    before = buf.tobytes()
    with pytest.raises(ValueError, match="out overlaps grad_out"):
        bn_simd.backward_apply(g, x, v, v, v, v, out=out)
    assert buf.tobytes() == before


# ---- float32 scales and coefficients beyond float32 --------------------------------------------------------------

@pytest.mark.parametrize("case", ["huge weight", "tiny eps"])
def test_float32_scale_beyond_float32_is_computed_in_double(case):
    if case == "huge weight":
        x, w, eps, expected = np.array([[.5], [-.5], [.25], [-.25]], F32), np.array([1e39]), 1e-5, None
    else:
        x, w, eps = np.array([[0], [1e-40], [0], [1e-40]], F32), None, 1e-300
        expected = np.array([-1, 1, -1, 1], F32)
    y = bn_simd.batch_norm(x, None, None, w, None, True, eps=eps, layout="NHWC").ravel()
    if expected is None:  # the exact result overflows float32: +-inf with the input's signs, never a clamped value
        np.testing.assert_array_equal(y, np.copysign(np.inf, x.ravel()))
    else:
        np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_a_float32_coefficient_beyond_float32_warns_as_numpy_does():
    # backward_apply rounds its coefficients to x's dtype: 1e39 overflows float32, which NumPy's cast reports
    x = make_input((2, 3, 4), "NCHW", F32, seed=20)
    g = make_input((2, 3, 4), "NCHW", F32, seed=21)
    a = np.array([1.0, 1e39, 1.0])
    z = np.zeros(3)
    with pytest.warns(RuntimeWarning, match="overflow"):
        dx = bn_simd.backward_apply(g, x, z, a, z, z)
    assert np.all(np.isinf(dx[:, 1][g[:, 1] != 0]))
    np.testing.assert_array_equal(dx[:, [0, 2]], g[:, [0, 2]])
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        bn_simd.backward_apply(g, x, z, a, z, z)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("bad", ["mean inf", "b inf", "d nan", "residual overflows"])
def test_non_finite_backward_apply_coefficients_follow_numpys_rules(dtype, bad):
    # the coefficients and their folding in NumPy: its values (NaN, inf), its warnings, and np.errstate's choice
    x = make_input((2, 3, 4), "NCHW", dtype, seed=22, loc=0.3)
    g = make_input((2, 3, 4), "NCHW", dtype, seed=23)
    m, a, b, d = np.full(3, 0.1), np.ones(3), np.ones(3), np.zeros(3)
    if bad == "mean inf":
        m[1] = np.inf
    elif bad == "b inf":
        b[2] = np.inf
    elif bad == "d nan":
        d[0] = np.nan
    else:  # b * (mean - m) overflows float64 (float32 data) or is finite (float64 data: mean - m = 0)
        m[1], b[1] = 0.1, 1e308 / 1e-18
    with np.errstate(all="ignore"):
        dx = bn_simd.backward_apply(g, x, m, a, b, d)
        mc = m.astype(dtype)
        dc = d - b * (m - mc.astype(F64))
        expected = (a.astype(dtype)[:, None] * g + b.astype(dtype)[:, None] * (x - mc[:, None])
                    + dc.astype(dtype)[:, None])
    poisoned = ~np.isfinite(expected)
    np.testing.assert_array_equal(~np.isfinite(dx), poisoned)
    np.testing.assert_allclose(dx[~poisoned], expected[~poisoned], rtol=8 * np.finfo(dtype).eps, atol=1e-6)
    try:  # does NumPy's arithmetic report something here?
        with np.errstate(all="raise"):
            mc = m.astype(dtype)
            for v in (mc, a, b, d - b * (m - mc.astype(F64))):
                v.astype(dtype)
        reported = False
    except FloatingPointError:
        reported = True
    with np.errstate(all="raise"):
        if reported:
            with pytest.raises(FloatingPointError):
                bn_simd.backward_apply(g, x, m, a, b, d)
        else:
            np.testing.assert_array_equal(bn_simd.backward_apply(g, x, m, a, b, d), dx)
