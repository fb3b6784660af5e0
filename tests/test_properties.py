"""Property tests (hypothesis): random shapes, layouts, dtypes, hyper-parameters, kernels and thread counts.

Every property compares with the float64 oracle (oracle.py) within the bounds of conftest, checks that no input
was modified, and that the documented invariances hold: bitwise-identical results for every thread count, for a
layout and its alias, and for an input and its C-contiguous copy.

Sizes are drawn around the vector widths (1..33, biased to 7, 8, 9, 15, 16, 17, 31, 32, 33); one example in
five is made large enough (> 65536 elements) for the kernels to use several threads. The examples are
derandomized (the same every run) and bounded so that the file runs in well under 30 s.
"""
import contextlib
import math

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bn_simd  # noqa: E402
import oracle as ref  # noqa: E402
import half_cases  # noqa: E402
import ops  # noqa: E402
from conftest import (SUPPORTED_ISAS, assert_forward_close, assert_within, backward_bounds,  # noqa: E402
                      forward_bound, make_input, stat_tol)

F32, F64 = np.float32, np.float64


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


ALIASES = {"NCHW": "NCHW", "NHWC": "NHWC", "channels_first": "NCHW", "channels_last": "NHWC"}
VECTOR_SIZES = st.one_of(st.sampled_from([7, 8, 9, 15, 16, 17, 31, 32, 33]), st.integers(1, 33))
MAX_SMALL = 4096          # elements of an ordinary example
BIG = 70000               # elements of a "big" example: above the kernels' threading thresholds (32768, 65536)


@st.composite
def geometries(draw, min_values_per_channel=2, op=None):
    """(nchw_shape, layout name as passed, canonical layout); at least `min_values_per_channel` values per channel.

    With a registered op (ops.py): its ranks and layout names."""
    rank = draw(st.integers(2, 5) if op is None else st.sampled_from(sorted(op.ranks)))
    aliases = ALIASES if op is None else op.layouts
    layout = draw(st.sampled_from(sorted(aliases)))
    C = draw(VECTOR_SIZES)
    dims = [draw(VECTOR_SIZES) for _ in range(rank - 1)]  # N, *spatial
    while C * math.prod(dims) > MAX_SMALL:  # bound the work: halve the largest non-channel axis
        i = int(np.argmax(dims))
        dims[i] = max(1, dims[i] // 2)
    if draw(st.sampled_from([False, False, False, False, True])):  # one in five: several threads
        dims[0] = max(dims[0], -(-BIG // (C * math.prod(dims[1:]))))
    if math.prod(dims) < min_values_per_channel:
        dims[0] = min_values_per_channel
    return (dims[0], C) + tuple(dims[1:]), layout, aliases[layout]


# (loc, scale) of the data: centred, offset, |mean| / std up to 1e5, large and small magnitudes
SCALES = st.sampled_from([(0.0, 1.0), (3.0, 2.0), (-100.0, 0.5), (1e3, 1e-2), (0.0, 1e3), (1e-3, 1e-4)])


EPS = st.one_of(st.sampled_from([1e-5, 1e-3, 0.5]), st.floats(1e-8, 10.0))
MOMENTUM = st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.0, 1.0))
PER_CHANNEL_DTYPES = st.sampled_from([F32, F64, np.float16])  # "per-channel arrays may have any float dtype"


def _per_channel(draw, C, kind, seed, dtypes=PER_CHANNEL_DTYPES):
    """A per-channel array of a drawn float dtype, or None."""
    if not draw(st.booleans()):
        return None
    rng = np.random.default_rng(seed)
    dt = draw(dtypes)
    if kind == "weight":
        v = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    else:
        v = rng.standard_normal(C)
    return v.astype(dt)


@contextlib.contextmanager
def kernels(isa, threads):
    """Select an ISA and a thread count for the block; restore the ISA and "follow OpenMP" afterwards."""
    previous = bn_simd.get_isa()
    bn_simd.set_isa(isa)
    bn_simd.set_num_threads(threads)
    try:
        yield
    finally:
        bn_simd.set_isa(previous)
        bn_simd.set_num_threads(None)


def _frozen(**arrays):
    return {k: (v, v.tobytes()) for k, v in arrays.items() if isinstance(v, np.ndarray)}


def _assert_not_modified(frozen):
    for k, (v, raw) in frozen.items():
        assert v.tobytes() == raw, f"{k} was modified"


def _assert_bitwise(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), f"{what}: not bitwise identical"


ISAS = st.sampled_from(SUPPORTED_ISAS)
THREADS = st.integers(1, 4)
DTYPES = st.sampled_from([F32, F64])


# ---- forward (training) and running statistics ------------------------------------------------------------------

@_settings(100)
@given(geo=geometries(), dtype=DTYPES, scale=SCALES, eps=EPS, momentum=MOMENTUM, unbiased=st.booleans(),
       stats_dtype=st.sampled_from([F32, F64]), isa=ISAS, threads=THREADS, seed=st.integers(0, 2 ** 16),
       data=st.data())
def test_forward_train_matches_oracle(geo, dtype, scale, eps, momentum, unbiased, stats_dtype, isa, threads, seed,
                                      data):
    nchw, layout, canon = geo
    C = nchw[1]
    x = make_input(nchw, canon, dtype, seed=seed, loc=scale[0], scale=scale[1])
    w = _per_channel(data.draw, C, "weight", seed + 1)
    b = _per_channel(data.draw, C, "bias", seed + 2)
    rng = np.random.default_rng(seed + 3)
    rm0, rv0 = rng.standard_normal(C).astype(stats_dtype), rng.uniform(0.25, 4.0, C).astype(stats_dtype)
    rm, rv = rm0.copy(), rv0.copy()
    frozen = _frozen(x=x, w=w, b=b)
    with kernels(isa, threads):
        y = bn_simd.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=eps, layout=layout,
                               unbiased_running_var=unbiased)
    _assert_not_modified(frozen)
    assert y.shape == x.shape and y.dtype == x.dtype and y.flags.c_contiguous
    assert_forward_close(y, x, w, b, eps, layout)
    _, mean, var = ref.forward_train(x.astype(F64), layout=layout)
    n = ref.reduction_size(x.shape, layout)
    rm_ref, rv_ref = ref.update_running(rm0, rv0, mean, var, n, momentum, unbiased=unbiased)
    assert_within(rm, rm_ref, stat_tol(n, stats_dtype) * (np.abs(rm_ref) + np.sqrt(var) + np.abs(mean) + 1),
                  "running_mean")
    assert_within(rv, rv_ref, 4 * stat_tol(n, stats_dtype) * np.abs(rv_ref), "running_var")
    # one thread and the canonical layout name: the same bits
    rm1, rv1 = rm0.copy(), rv0.copy()
    with kernels(isa, 1):
        y1 = bn_simd.batch_norm(x, rm1, rv1, w, b, training=True, momentum=momentum, eps=eps, layout=canon,
                                unbiased_running_var=unbiased)
    _assert_bitwise(y1, y, "y for 1 thread vs many / alias")
    _assert_bitwise(rm1, rm, "running_mean for 1 thread vs many")
    _assert_bitwise(rv1, rv, "running_var for 1 thread vs many")


# ---- inference -------------------------------------------------------------------------------------------------

@_settings(80)
@given(geo=geometries(min_values_per_channel=1), dtype=DTYPES, scale=SCALES, eps=EPS, isa=ISAS,
       threads=THREADS, seed=st.integers(0, 2 ** 16), stats_dtype=st.sampled_from([F32, F64]), data=st.data())
def test_eval_matches_oracle(geo, dtype, scale, eps, isa, threads, seed, stats_dtype, data):
    nchw, layout, canon = geo
    C = nchw[1]
    x = make_input(nchw, canon, dtype, seed=seed, loc=scale[0], scale=scale[1])
    rng = np.random.default_rng(seed + 1)
    rm = (scale[0] + scale[1] * rng.standard_normal(C)).astype(stats_dtype)
    rv = (scale[1] ** 2 * rng.uniform(0.25, 4.0, C)).astype(stats_dtype)
    w = _per_channel(data.draw, C, "weight", seed + 2)
    b = _per_channel(data.draw, C, "bias", seed + 3)
    frozen = _frozen(x=x, rm=rm, rv=rv, w=w, b=b)
    with kernels(isa, threads):
        y = bn_simd.batch_norm(x, rm, rv, w, b, training=False, eps=eps, layout=layout)
    _assert_not_modified(frozen)
    y_ref = ref.inference(x.astype(F64), rm, rv, w, b, eps, layout)
    bound = forward_bound(x.astype(F64), dtype, ref.reduction_size(x.shape, layout), w, b, eps, layout,
                          mean=rm.astype(F64), var=rv.astype(F64), batch_stats=False)
    assert_within(y, y_ref, bound, "eval y")
    with kernels(isa, 1):
        _assert_bitwise(bn_simd.normalize(x, rm, rv, w, b, eps=eps, layout=canon), y, "normalize, 1 thread, alias")


# ---- backward ----------------------------------------------------------------------------------------------------

@_settings(80)
@given(geo=geometries(), dtype=DTYPES, scale=SCALES, eps=EPS, training=st.booleans(), isa=ISAS,
       threads=THREADS, seed=st.integers(0, 2 ** 16), data=st.data())
def test_backward_matches_oracle(geo, dtype, scale, eps, training, isa, threads, seed, data):
    nchw, layout, canon = geo
    C = nchw[1]
    x = make_input(nchw, canon, dtype, seed=seed, loc=scale[0], scale=scale[1])
    dy = make_input(nchw, canon, dtype, seed=seed + 1, loc=data.draw(st.sampled_from([0.0, 0.5, -3.0])))
    # the parameter gradients come back in weight's dtype (documented): a float16 weight would make them float16,
    # where sum(grad_out) over 40000 values overflows by design -- so float32/float64 weights here
    w = _per_channel(data.draw, C, "weight", seed + 2, dtypes=st.sampled_from([F32, F64]))
    with kernels(isa, threads):
        if training:
            _, mean, invstd = bn_simd.batch_norm_forward(x, w, eps=eps, layout=layout)
        else:
            rng = np.random.default_rng(seed + 3)
            mean = scale[0] + scale[1] * rng.standard_normal(C)
            invstd = 1.0 / np.sqrt(scale[1] ** 2 * rng.uniform(0.25, 4.0, C) + eps)
        frozen = _frozen(x=x, dy=dy, mean=mean, invstd=invstd, w=w)
        gx, gw, gb = bn_simd.batch_norm_backward(dy, x, mean, invstd, w, layout=layout, training=training)
    _assert_not_modified(frozen)
    gdtype = w.dtype if w is not None else x.dtype
    assert gx.dtype == x.dtype and gw.dtype == gb.dtype == gdtype
    x64, dy64 = x.astype(F64), dy.astype(F64)
    m64, s64 = mean.astype(F64), invstd.astype(F64)
    gx_ref, gw_ref, gb_ref = ref.backward(dy64, x64, m64, s64, w, layout, training)
    dxb, dwb, dbb = backward_bounds(dy64, x64, m64, s64, w, layout, training, dtype)
    # the per-channel gradients are returned in weight's dtype: one more rounding of that dtype
    g_eps = float(np.finfo(gdtype).eps)
    assert_within(gx, gx_ref, dxb, "grad_x")
    assert_within(gw, gw_ref, dwb + g_eps * np.abs(gw_ref), "grad_weight")
    assert_within(gb, gb_ref, dbb + g_eps * np.abs(gb_ref), "grad_bias")
    with kernels(isa, 1):
        gx1, gw1, gb1 = bn_simd.batch_norm_backward(dy, x, mean, invstd, w, layout=canon, training=training)
    _assert_bitwise(gx1, gx, "grad_x, 1 thread, alias")
    _assert_bitwise(gw1, gw, "grad_weight, 1 thread, alias")
    _assert_bitwise(gb1, gb, "grad_bias, 1 thread, alias")


# ---- layers over several batches ----------------------------------------------------------------------------------

@_settings(60)
@given(geo=geometries(), dtype=DTYPES, layer_dtype=DTYPES, eps=EPS,
       momentum=st.one_of(st.none(), MOMENTUM), affine=st.booleans(), track=st.booleans(), unbiased=st.booleans(),
       batches=st.integers(1, 3), isa=ISAS, threads=THREADS, seed=st.integers(0, 2 ** 16))
def test_layer_over_several_batches_matches_oracle(geo, dtype, layer_dtype, eps, momentum, affine, track, unbiased,
                                                   batches, isa, threads, seed):
    nchw, layout, canon = geo
    C = nchw[1]
    layer = bn_simd.BatchNorm(C, eps=eps, momentum=momentum, affine=affine, track_running_stats=track,
                              layout=layout, dtype=layer_dtype, unbiased_running_var=unbiased)
    if affine:
        rng = np.random.default_rng(seed)
        layer.weight[:] = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
        layer.bias[:] = rng.standard_normal(C)
    oracle = ref.RunningStats(C, momentum, unbiased)
    with kernels(isa, threads):
        for k in range(batches):
            x = make_input(nchw, canon, dtype, seed=seed + 10 + k, loc=k - 1.0, scale=1.0 + k)
            frozen = _frozen(x=x)
            y = layer(x)
            _assert_not_modified(frozen)
            assert_forward_close(y, x, layer.weight, layer.bias, eps, layout)
            oracle.update(x.astype(F64), layout)
            if track:
                assert layer.num_batches_tracked == k + 1
                n = ref.reduction_size(x.shape, layout)
                tol = stat_tol(n, layer_dtype) * (k + 2)
                assert_within(layer.running_mean, oracle.mean, tol * (np.abs(oracle.mean) + 4), "running_mean")
                assert_within(layer.running_var, oracle.var, 4 * tol * np.abs(oracle.var), "running_var")
        # backward of the last training batch: the statistics are the kernel's (batch_stats, bitwise)
        g = make_input(nchw, canon, dtype, seed=seed + 20)
        frozen = _frozen(x=x, g=g)
        gx = layer.backward(g)
        _assert_not_modified(frozen)
        mean, var = bn_simd.batch_stats(x, layout=layout)
        invstd = 1.0 / np.sqrt(var + eps)
        x64, g64 = x.astype(F64), g.astype(F64)
        gx_ref, gw_ref, gb_ref = ref.backward(g64, x64, mean, invstd, layer.weight, layout, True)
        dxb, dwb, dbb = backward_bounds(g64, x64, mean, invstd, layer.weight, layout, True, dtype)
        assert_within(gx, gx_ref, dxb, "layer grad_x")
        if affine:
            e = float(np.finfo(layer_dtype).eps)
            assert_within(layer.grad_weight, gw_ref, dwb + e * np.abs(gw_ref), "layer grad_weight")
            assert_within(layer.grad_bias, gb_ref, dbb + e * np.abs(gb_ref), "layer grad_bias")
        else:
            assert layer.grad_weight is None and layer.grad_bias is None
        # eval: running statistics (or batch statistics without tracking); nothing changes
        layer.eval()
        xe = make_input(nchw, canon, dtype, seed=seed + 30, loc=0.5)
        state = {k: v for k, v in layer.state_dict().items()}
        ye = layer(xe)
        for k, v in layer.state_dict().items():
            _assert_bitwise(v, state[k], f"{k} after an eval call")
        if track:
            ye_ref = ref.inference(xe.astype(F64), layer.running_mean, layer.running_var, layer.weight, layer.bias,
                                   eps, layout)
            bound = forward_bound(xe.astype(F64), dtype, ref.reduction_size(xe.shape, layout), layer.weight,
                                  layer.bias, eps, layout, mean=layer.running_mean, var=layer.running_var,
                                  batch_stats=False)
            assert_within(ye, ye_ref, bound, "eval y")
        else:
            assert_forward_close(ye, xe, layer.weight, layer.bias, eps, layout)


# ---- inputs are never modified, and memory layout never changes a bit ----------------------------------------

def _odd(a, kind):
    """The same values as `a` in another memory layout (or a read-only / byte-swapped copy)."""
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "reversed":
        r = a[::-1, ..., ::-1].copy()
        return r[::-1, ..., ::-1]
    if kind == "strided":
        return np.repeat(a, 2, axis=-1)[..., ::2]
    if kind == "byteswapped":
        return a.astype(a.dtype.newbyteorder("S"))
    if kind == "read-only":
        r = a.copy()
        r.setflags(write=False)
        return r
    return a.copy()


VIEWS = st.sampled_from(["contiguous", "fortran", "reversed", "strided", "byteswapped", "read-only"])


@pytest.mark.parametrize("op", ops.OPS, ids=str)
@_settings(60)
@given(data=st.data(), dtype=DTYPES, xview=VIEWS, gview=VIEWS, isa=ISAS, threads=THREADS,
       seed=st.integers(0, 2 ** 16), affine=st.booleans(), param_dtype=PER_CHANNEL_DTYPES,
       stats_dtype=st.sampled_from([F32, F64]))
def test_no_entry_point_modifies_its_inputs_and_layout_is_invisible(op, data, dtype, xview, gview, isa, threads, seed,
                                                                     affine, param_dtype, stats_dtype):
    """Every entry point of every registered op (ops.py): with x and the other data arguments held in odd memory, on
    any number of threads, it gives the bytes of the call on C-contiguous arrays on one thread, it modifies none of
    its inputs (but the state it updates), and its outputs match the oracle."""
    nchw, layout, canon = data.draw(geometries(op=op), label="geometry")
    assume(op.supports(nchw, layout, dtype))
    case = op.case(seed, nchw, layout, dtype, loc=1.0, scale=2.0, affine=affine, param_dtype=param_dtype,
                   stats_dtype=stats_dtype)
    data = [k for k, kind in op.args.items() if kind == ops.DATA]
    odd = case.replace(**{k: _odd(case[k], xview if k == "x" else gview) for k in data})
    for k in data:
        np.testing.assert_array_equal(odd[k], case[k])
    # the oracle checks every group of an ordinary example, the first and the last group of a big one
    groups = None if case["x"].size <= MAX_SMALL else ops.edge_groups(case)
    for ep in op.entry_points:
        if not ep.applies(case):
            continue
        with kernels(isa, threads):
            c = odd.fresh()
            ctx = ep.prepare(c) if ep.prepare is not None else None
            frozen = _frozen(**{k: v for k, v in c.arrays.items() if k not in ep.writes})
            got = ep.run(c, ctx)
            _assert_not_modified(frozen)
        with kernels(isa, 1):  # contiguous arrays on one thread: the same bits
            expected = ep(case.fresh())
        for name, e in expected.items():
            if e is None:
                assert got[name] is None, name
            else:
                _assert_bitwise(got[name], e, f"{ep.name}.{name} for a {xview} x / {gview} grad_out, {threads} threads")
        ops.check(ep, case, expected, groups=groups)


# ---- 16-bit data (float16, bfloat16): the entry points that take it (tests/half_cases.py) ----------------------

@pytest.mark.parametrize("name", half_cases.NAMES)
@pytest.mark.parametrize("op", ops.OPS, ids=str)
@_settings(12)
@given(data=st.data(), xview=st.sampled_from(["contiguous", "fortran", "reversed", "strided", "read-only"]),
       isa=ISAS, threads=THREADS, seed=st.integers(0, 2 ** 16), affine=st.booleans())
def test_16_bit_entry_points_match_the_oracle_in_any_memory(op, name, data, xview, isa, threads, seed, affine):
    """Random geometries of 16-bit data with float32 parameters: each functional entry point, with x in odd memory
    on any number of threads, gives the bytes of the call on a contiguous x on one thread, modifies none of its
    inputs, and matches the oracle within the 16-bit bounds."""
    dt = half_cases.dtype(name)
    nchw, layout, canon = data.draw(geometries(op=op), label="geometry")
    assume(half_cases.supports(op, nchw, layout))
    case = half_cases.case(op, seed, nchw, layout, dt, affine=affine)
    odd = case.replace(x=_odd(case["x"], xview))
    groups = None if case["x"].size <= MAX_SMALL else ops.edge_groups(case)
    for ep in half_cases.entries(op, case):
        with kernels(isa, threads):
            c = odd.fresh()
            ctx = ep.prepare(c) if ep.prepare is not None else None  # (a layer's forward, before the snapshot)
            frozen = _frozen(**{k: v for k, v in c.arrays.items() if k not in ep.writes})
            got = ep.run(c, ctx)
            _assert_not_modified(frozen)
        with kernels(isa, 1):
            expected = ep(case.fresh())
        for k, e in expected.items():
            if e is None:
                assert got[k] is None, k
            else:
                _assert_bitwise(got[k], e, f"{ep.name}.{k} for a {xview} x, {threads} threads")
        if groups is None:
            half_cases.check(ep, case, expected)


# ---- training with one value per channel ---------------------------------------------------------------------------

@_settings(40)
@given(rank=st.integers(2, 5), layout=st.sampled_from(sorted(ALIASES)), C=VECTOR_SIZES, dtype=DTYPES)
def test_one_value_per_channel_in_training_is_refused_and_changes_nothing(rank, layout, C, dtype):
    nchw = (1, C) + (1,) * (rank - 2)
    x = make_input(nchw, ALIASES[layout], dtype, seed=C)
    rm, rv = np.full(C, 0.5, dtype), np.full(C, 2.0, dtype)
    out = np.full(x.shape, 3.0, dtype)
    frozen = _frozen(x=x, rm=rm, rv=rv, out=out)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn_simd.batch_norm(x, rm, rv, training=True, layout=layout, out=out)
    layer = bn_simd.BatchNorm(C, layout=layout)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(x)
    assert layer.num_batches_tracked == 0
    _assert_not_modified(frozen)
    # the same tensor is fine in eval
    y = bn_simd.batch_norm(x, rm, rv, training=False, layout=layout)
    y_ref = ref.inference(x.astype(F64), rm, rv, layout=layout)
    assert_within(y, y_ref, forward_bound(x.astype(F64), dtype, 1, mean=rm, var=rv, layout=layout,
                                          batch_stats=False), "eval y")
