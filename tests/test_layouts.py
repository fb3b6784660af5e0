"""Layouts and memory: NCHW vs NHWC on the same data, unusual strides and byte orders, inputs left untouched.

The layout, unusual-memory and untouched-input tests run every entry point of every registered op (ops.py)."""
import numpy as np
import pytest

import bn_simd
import half_cases
import ops
from conftest import DTYPES, assert_same_bits, assert_within, make_input, random_array


def _expected(op, case):
    """{"entry.output": Expected} of every entry point that applies to the case."""
    res = {}
    for ep in op.entry_points:
        if ep.applies(case):
            res.update({f"{ep.name}.{k}": v for k, v in ep.expected(case).items()})
    return res


LAYOUT_SHAPES = [(4, 5, 6, 7), (3, 33, 9), (64, 17), (2, 3, 4, 5, 6), (5, 1, 8), (2, 300, 3), (5, 1296, 7),
                 (3, 2053, 5)]
LAYOUT_CASES = [pytest.param(op, s, d, id=f"{op.name}-{'x'.join(map(str, s))}-{np.dtype(d).name}")
                for op in ops.OPS for s in LAYOUT_SHAPES for d in DTYPES
                if sum(op.supports(s, lay, d) for lay in op.layouts) > 1]
_EXPECTED = {}


@pytest.mark.parametrize("op,nchw_shape,dtype", LAYOUT_CASES)
def test_every_layout_gives_the_same_values(op, nchw_shape, dtype, isa):
    """Every entry point's outputs, in every layout the op supports, are within the oracle's bound of the same
    values, and within 2 bounds of each other -- for outputs shaped like x also within 8 eps (1 + |value|), and for
    the others within 4 eps of |value| + 1 + max|value|, the precision of the data's dtype."""
    layouts = [lay for lay in dict.fromkeys(op.layouts.values()) if op.supports(nchw_shape, lay, dtype)]
    key = (op.name, nchw_shape, np.dtype(dtype).name)
    results = {}
    for layout in layouts:
        case = op.case(2, nchw_shape, layout, dtype, loc=-3.0, scale=2.0, param_dtype=np.float64,
                       stats_dtype=np.float64, momentum=0.3)
        if key not in _EXPECTED:  # the oracle does not depend on the ISA: once per case
            _EXPECTED[key] = (layout, _expected(op, case))
        first_layout, expected = _EXPECTED[key]
        got = ops.run_all(op, case)
        assert got.keys() == expected.keys()
        canon = {}
        for k, v in got.items():
            spec = ops.output_spec(op, k)
            exp = expected[k]
            if spec.shape == ops.DATA and exp is not None:  # (None: no such output for this case, e.g. a residual's)
                v = case.canonical(v)
                exp = ops.Expected(op.load(exp.value, first_layout), op.load(exp.bound, first_layout), exp.dtype)
            ops.compare(v, exp, f"{case} {k}")
            canon[k] = (v, exp)
        results[layout] = canon
    e = np.finfo(dtype).eps
    first = results[layouts[0]]
    for layout in layouts[1:]:
        for k, (v, exp) in results[layout].items():
            a, b = first[k][0], v
            if exp is None:
                continue
            two = 2 * np.broadcast_to(exp.bound, np.shape(exp.value))
            spec = ops.output_spec(op, k)
            if op.stats_by_layout:
                tol = two  # (reduced in another order in each layout: the oracle's bounds, see ops.Op)
            elif spec.shape == ops.DATA:
                tol = 8 * e * (1 + np.abs(np.asarray(a, np.float64)))
            else:
                a64 = np.abs(np.asarray(a, np.float64))
                tol = 4 * e * (a64 + 1 + (a64.max() if a64.size else 0.0))
            assert_within(b, a, np.minimum(tol, two), f"{k}: {layout} vs {layouts[0]}")


def _variant(base, kind):
    """The values of `base` held in memory another way."""
    if kind == "fortran":
        return np.asfortranarray(base)
    if kind == "negative_strides":
        return np.ascontiguousarray(base[::-1, :, ::-1, ::-1])[::-1, :, ::-1, ::-1]
    if kind == "strided_slice":
        big = np.zeros(base.shape[:1] + (2 * base.shape[1],) + base.shape[2:], base.dtype)
        big[:, ::2] = base
        return big[:, ::2]
    if kind == "byteswapped":
        return base.astype(base.dtype.newbyteorder("S"))
    if kind == "read_only":
        a = base.copy()
        a.setflags(write=False)
        return a
    if kind == "unaligned":
        raw = np.zeros(base.nbytes + 1, np.uint8)
        a = raw[1:].view(base.dtype).reshape(base.shape)
        a[...] = base
        return a
    if kind == "transposed_view":
        return np.ascontiguousarray(np.swapaxes(base, 2, 3)).swapaxes(2, 3)
    raise AssertionError(kind)


KINDS = ["fortran", "negative_strides", "strided_slice", "byteswapped", "read_only", "unaligned", "transposed_view"]


UNUSUAL = [pytest.param(op, k, d, id=f"{op.name}-{k}-{np.dtype(d).name}")
           for op in ops.OPS for k in KINDS for d in DTYPES if op.supports((4, 5, 6, 7), "NCHW", d)]


@pytest.mark.parametrize("op,kind,dtype", UNUSUAL)
def test_unusual_memory_gives_the_same_bits_as_contiguous(op, kind, dtype):
    """Every entry point on data held in unusual memory (every data argument at once) gives the bytes of the same
    call on C-contiguous data, in native byte order and C order, and matches the oracle."""
    case = op.case(4, (4, 5, 6, 7), "NCHW", dtype, loc=1.0, param_dtype=np.float64, stats_dtype=np.float64)
    data = [k for k, kind_ in op.args.items() if kind_ == ops.DATA]
    odd = case.replace(**{k: _variant(case[k], kind) for k in data})
    for k in data:
        np.testing.assert_array_equal(odd[k], case[k])
    expected = ops.run_all(op, case)
    for ep in op.entry_points:
        if not ep.applies(case):
            continue
        got = ep(odd.fresh())
        ops.check(ep, case, got, f" ({kind})")
        for name, v in got.items():
            k = f"{ep.name}.{name}"
            if v is not None and ops.output_spec(op, k).shape == ops.DATA:
                assert v.dtype == case.dtype and v.dtype.isnative and v.flags.c_contiguous, k
            assert_same_bits(v, expected[k], k)
    for k in data:  # inputs are never written
        np.testing.assert_array_equal(odd[k], case[k])


def test_broadcast_input_with_zero_strides_is_accepted():
    xb = np.broadcast_to(random_array((5, 3, 1, 4), np.float32, seed=7), (5, 3, 4, 4))
    assert 0 in xb.strides
    np.testing.assert_array_equal(bn_simd.batch_norm(xb, training=True),
                                  bn_simd.batch_norm(np.ascontiguousarray(xb), training=True))


@pytest.mark.parametrize("kind", ["strided", "byteswapped", "read_only"])
def test_per_channel_arguments_in_unusual_memory(kind):
    x = make_input((4, 3, 5), "NCHW", np.float64, seed=8, loc=2.0)
    w, b = np.array([1.5, -0.5, 2.0]), np.array([0.25, 1.0, -3.0])
    if kind == "strided":
        wv, bv = np.repeat(w, 2)[::2], np.repeat(b, 3)[::3]
    elif kind == "byteswapped":
        wv, bv = w.astype(">f8"), b.astype(">f8")
    else:
        wv, bv = w.copy(), b.copy()
        wv.setflags(write=False)
        bv.setflags(write=False)
    np.testing.assert_array_equal(bn_simd.batch_norm(x, None, None, wv, bv, training=True),
                                  bn_simd.batch_norm(x, None, None, w, b, training=True))


@pytest.mark.parametrize("kind", ["strided", "byteswapped"])
def test_running_stats_held_in_unusual_memory_are_updated_in_place(kind):
    x = make_input((6, 3, 5), "NCHW", np.float64, seed=9, loc=2.0)
    rm_c, rv_c = np.zeros(3), np.ones(3)
    bn_simd.batch_norm(x, rm_c, rv_c, training=True)
    if kind == "strided":
        store = np.zeros((2, 6))
        store[1] = 1.0
        rm, rv = store[0, ::2], store[1, 1::2]
    else:
        rm, rv = np.zeros(3, ">f8"), np.ones(3, ">f8")
    bn_simd.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(rm, rm_c)
    np.testing.assert_array_equal(rv, rv_c)
    if kind == "strided":
        np.testing.assert_array_equal(store[0, 1::2], 0.0)  # the neighbours are untouched
        np.testing.assert_array_equal(store[1, ::2], 1.0)


@pytest.mark.parametrize("op", [op for op in ops.OPS if op.supports((4, 6, 5, 5), "NCHW", np.float32)], ids=str)
def test_no_entry_point_modifies_its_inputs(op):
    """Every entry point, one after another on the same arrays: nothing but the state it updates (running statistics)
    is written."""
    case = op.case(10, (4, 6, 5, 5), "NCHW", np.float32, loc=1.0, stats_dtype=np.float64)
    before = {k: v.copy() for k, v in case.arrays.items() if v is not None}
    for ep in op.entry_points:
        if ep.applies(case):
            ep(case)
            for k, v in before.items():
                if k not in op.state:
                    np.testing.assert_array_equal(case[k], v, err_msg=f"{k} after {ep.name}")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_read_only_input_works_for_layers_and_backward(layout):
    x = make_input((3, 4, 5, 5), layout, np.float32, seed=13)
    dy = make_input((3, 4, 5, 5), layout, np.float32, seed=14)
    x.setflags(write=False)
    dy.setflags(write=False)
    layer = bn_simd.BatchNorm2d(4, layout=layout)
    y = layer(x)
    assert y.flags.writeable
    gx = layer.backward(dy)
    assert gx.flags.writeable and gx.shape == x.shape


def test_float32_input_from_torch_like_objects_is_converted():
    class TensorLike:
        def __init__(self, a):
            self._a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self._a

    x = make_input((4, 3, 2, 2), "NCHW", np.float32, seed=15)
    np.testing.assert_array_equal(bn_simd.batch_norm(TensorLike(x), training=True),
                                  bn_simd.batch_norm(x, training=True))


# ---- 16-bit data (float16, bfloat16): the functional entry points (tests/half_cases.py) ----------------------------

HALF_LAYOUTS = [pytest.param(op, name, id=f"{op.name}-{name}") for op in ops.OPS for name in half_cases.NAMES
                if sum(half_cases.supports(op, (3, 33, 9), lay) for lay in op.layouts) > 1]


@pytest.mark.parametrize("op,name", HALF_LAYOUTS)
def test_16_bit_layouts_give_the_same_values(op, name):
    """Every layout of 16-bit data: each output within the oracle's 16-bit bound, and the layouts within two bounds
    of each other."""
    dt = half_cases.dtype(name)
    layouts = [lay for lay in dict.fromkeys(op.layouts.values()) if half_cases.supports(op, (3, 33, 9), lay)]
    results = []
    for layout in layouts:
        case = half_cases.case(op, 2, (3, 33, 9), layout, dt)
        got = {}
        for ep in half_cases.entries(op, case):
            out = ep(case.fresh())
            half_cases.check(ep, case, out)
            for k, e in half_cases.expected(ep, case).items():
                if e is not None:
                    data = ops.output_spec(op, f"{ep.name}.{k}").shape == ops.DATA
                    v = case.canonical(out[k]) if data else out[k]
                    b = case.canonical(np.broadcast_to(e.bound, np.shape(e.value))) if data else e.bound
                    got[f"{ep.name}.{k}"] = (np.asarray(v, np.float64), b)
        results.append(got)
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        for k, (v, b) in other.items():
            assert_within(v, results[0][k][0], 2 * np.asarray(b, np.float64), k)


HALF_KINDS = ["fortran", "negative_strides", "strided_slice", "byteswapped", "read_only", "unaligned"]


@pytest.mark.parametrize("op", [op for op in ops.OPS if half_cases.supports(op, (4, 5, 6, 7), "NCHW")], ids=str)
@pytest.mark.parametrize("name", half_cases.NAMES)
def test_16_bit_unusual_memory_gives_the_same_bits_as_contiguous(op, name):
    """16-bit data held in unusual memory (every data argument at once) gives the bytes of C-contiguous data."""
    dt = half_cases.dtype(name)
    case = half_cases.case(op, 4, (4, 5, 6, 7), "NCHW", dt)
    data = [k for k, kind_ in op.args.items() if kind_ == ops.DATA]
    entries = half_cases.entries(op, case)
    expected = {ep.name: ep(case.fresh()) for ep in entries}
    for kind in HALF_KINDS:
        if kind == "byteswapped" and name == "bfloat16":
            continue  # (ml_dtypes' bfloat16 has one byte order)
        odd = case.replace(**{k: _variant(case[k], kind) for k in data if case[k] is not None})
        for ep in entries:
            got = ep(odd.fresh())
            for k, v in got.items():
                if v is not None and ops.output_spec(op, f"{ep.name}.{k}").shape == ops.DATA:
                    assert v.dtype == dt and v.flags.c_contiguous, k
                assert_same_bits(v, expected[ep.name][k], f"{kind} {ep.name}.{k}")
