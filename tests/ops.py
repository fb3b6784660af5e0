"""The registry of the ops under test: an op registered here gets every behaviour suite.

The behaviour suites never name an op or an entry point. They take cases from an op's ``make_case``, run its entry
points and compare what comes back with the op's float64 oracle (oracle.py) within bounds derived from the dtype
and the reduction length (bounds.py). The suites that iterate ``OPS``, and what each reads from an op besides
make_case, the entry points' call, outputs and expect:

    test_hostile.py      bad arguments are refused naming the argument and change nothing; NaN/Inf poison exactly
                         what the oracle says -- args (kinds), the entry points' reads, writes, names, checked, prepare
    test_out.py          out= separate and in place gives the bytes of a call without out; bad and partially
                         overlapping outs are refused -- out, reads, args
    test_errors.py       wrong rank and dtype of the data in every entry point -- ranks, reads, names
    test_parity.py       bitwise-equal results for 1..4 threads, the default and a threadpoolctl limit; every ISA
                         within a few ulp of the scalar kernels -- outputs' shape kinds and float64, the bounds
    test_concurrency.py  Python threads calling at once get the bytes of serial calls
    test_layouts.py      every layout gives the same values; unusual memory (Fortran, strided, byte-swapped,
                         read-only, unaligned) gives the bytes of a contiguous copy -- layouts, store, load
    test_properties.py   hypothesis: random shapes, layout names, dtypes, options, ISAs and threads against the
                         oracle; inputs never modified; memory layout invisible -- ranks, layouts, writes, prepare,
                         groups, take, restrict
    .ci/valgrind_cases.py  every entry point on small cases (out= in place, layout aliases) and the ones marked large
                         on large cases, under memcheck, against the oracle -- large, groups, take, restrict
Every suite calls ``supports`` and skips what an op does not support, and ``applies`` for each entry point.

Registering an op
-----------------
Append an ``Op`` to ``OPS`` (see ``BATCH_NORM`` at the end of this file). Its fields:

    name          the op's name (test ids use it)
    make_case     ``make_case(rng, shape, layout, dtype, **options) -> Case``: every argument of every entry point,
                  drawn from the numpy Generator ``rng`` for the logical shape (the canonical layout's shape) and
                  stored in ``layout`` (a name the library accepts, alias or not). The values must not depend on
                  the layout: the layouts suite compares layouts on the same case. Options the suites pass, which
                  every op must accept (and may ignore): loc, scale (of x), affine (weight and bias or None),
                  param_dtype (of the per-channel arrays), stats_dtype and momentum (of running statistics, for an
                  op that has them), eps. An op may add its own (batch norm: track, unbiased; group norm would take
                  num_groups).
    entry_points  ``EntryPoint``s: each a way of calling the library (see below).
    layouts       accepted layout names -> canonical name; ``store(a, layout)`` / ``load(a, layout)`` move a
                  canonical-layout array to a stored one and back (a view).
    ranks, dtypes the ranks and data dtypes the op accepts (others must be refused with TypeError/ValueError);
                  float16 (HALF) by the functional entry points, run by tests/test_half_registry.py.
    args          every array argument of a case -> DATA (shaped like x), CHANNEL (one value per channel) or GROUP
                  (one per statistic group: GroupNorm's saved (N, G) statistics). The hostile suite derives its
                  bad arguments from these kinds.
    state         the arrays calls update in place (running statistics): a suite copies them before each call
                  (``Case.fresh``), and a call that raises must leave them as they were.
    tolerance     ``tolerance(dtype, n) -> bounds.Tolerance``: the units of error for data of ``dtype`` whose
                  statistics sum n values each; the oracle's magnitudes times these units are the bounds.
    groups, take  ``groups(case)``: into how many independent slices a case can be cut (slices whose outputs do
                  not depend on each other: batch norm's channels; GroupNorm's groups of channels, all samples;
                  LayerNorm's rows), and ``take(case, a, kind, which)``: the part of an array of a kind (DATA,
                  CHANNEL, GROUP) that belongs to the slices ``which``. Large cases are checked on a few slices.
    restrict      ``restrict(case, which) -> Case``: the case cut down to the slices ``which`` (same n).
    stats_by_layout  True when the layouts reduce in different orders beyond the chunking (group norm merges its
                  channels' moments channels-last and sums a group's runs channels-first; its backward sums likewise),
                  so that the layouts' outputs agree within the oracle's bounds rather than to a few ulp.

An ``EntryPoint`` has:

    name          the entry point's name (ids, output keys "entry.output")
    call          ``call(case, out, ctx) -> tuple`` of the outputs in the order of ``outputs``; None for an output
                  that does not exist for this case (e.g. grad_weight without affine). It uses the case's arrays
                  as they are (state is updated in the case).
    outputs       ``Output``s: name, shape kind (DATA, CHANNEL or GROUP) and ``float64`` (always a float64
                  reduction, never rounded to a narrower dtype)
    expect        ``expect(case) -> tuple`` of ``Expected`` (float64 value, bound, dtype the library must return)
                  or None, from the oracle, in the order of ``outputs``
    reads         the case arrays the call passes to the library (the hostile suite corrupts these)
    writes        the case arrays the call updates in place (a subset of the op's state)
    out           the inputs ``out=`` may be (in place), or None when the entry point has no ``out=``; the out
                  receives the first output
    batch         True when the call computes batch statistics: refused with one value per group
    needs         the optional case arrays the call needs (the call does not apply to a case without them)
    prepare       ``prepare(case) -> ctx`` run before the call and not part of it (a layer's forward before its
                  backward), or None
    checked       False for an internal kernel that does not check its arguments (no hostile cases)
    large         True to run on the large cases of .ci/valgrind_cases.py (streaming stores)
    names         case array -> regular expression of how the library's messages name it (default its name)
    ranks         the ranks of x this entry point accepts, when not the op's (an InstanceNorm layer also takes
                  unbatched input, one dimension less)
    carry         for an entry point whose leading outputs are computed from an intermediate it rounds to the
                  data's dtype and also returns (the backward through silu: du, grad_residual, is the
                  normalisation's dy), ``carry(case, err) -> tuple`` in the order of ``outputs``: how far those
                  outputs can move when the intermediate moves by err (shaped like x, >= 0), by the oracle's linear
                  maps; None otherwise. The 16-bit ISA comparison of test_parity.py allows what it carries of two
                  ISAs' difference in the intermediate (tests/half_cases.py ROUNDED_BETWEEN).

An InstanceNorm/GroupNorm entry would give make_case a ``num_groups`` option, GROUP-kind save_mean/save_invstd of
shape (N, G), weight and bias of kind CHANNEL, ``groups(case) = G`` and ``take`` cutting groups of channels (and the
GROUP arrays' columns); LayerNorm and RMSNorm a ``normalized_shape`` option, one slice per row and their own layouts.
The suites need nothing else.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

import bn_simd
import bounds
import oracle as ref
from bn_simd import _core

DATA, CHANNEL, GROUP, SCALAR = "data", "channel", "group", "scalar"
F64 = np.dtype(np.float64)
# float16 data (float32 math): the functional entry points take it, with float32 statistics and parameter gradients;
# tests/test_half_registry.py runs them on it (the suites iterating conftest.DTYPES take float32 and float64)
HALF = np.dtype(np.float16)


# ---- the registry's types ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Output:
    """One output of an entry point: its name, its shape kind, and whether it is always a float64 reduction."""
    name: str
    shape: str = DATA
    float64: bool = False


@dataclass(frozen=True)
class Expected:
    """The oracle's value of an output (float64), the bound |got - value| <= bound (broadcast) and the dtype the
    library must return. Where value is NaN the library must give NaN, where it is +-Inf a non-finite value."""
    value: np.ndarray
    bound: np.ndarray
    dtype: np.dtype


@dataclass(frozen=True)
class EntryPoint:
    """A way of calling the library: see the module docstring for the fields."""
    name: str
    call: Callable
    outputs: tuple
    expect: Callable
    reads: tuple = ("x",)
    writes: tuple = ()
    out: Optional[tuple] = None
    batch: bool = False
    needs: tuple = ()
    prepare: Optional[Callable] = None
    checked: bool = True
    large: bool = False
    names: dict = field(default_factory=dict)
    ranks: Optional[tuple] = None
    carry: Optional[Callable] = None

    def __call__(self, case, out=None):
        """Prepare and call; returns {output name: array or None}."""
        ctx = self.prepare(case) if self.prepare is not None else None
        return self.run(case, ctx, out)

    def run(self, case, ctx, out=None):
        """The call alone, after prepare (the hostile suite snapshots the arrays in between)."""
        got = self.call(case, out, ctx)
        return dict(zip((o.name for o in self.outputs), got))

    def applies(self, case):
        """False when the call must refuse the case (batch statistics of one value per group) or means something
        else for it (an argument it needs is None)."""
        return not (self.batch and case.n == 1) and all(case[k] is not None for k in self.needs)

    def expected(self, case):
        """{output name: Expected or None} from the oracle."""
        with np.errstate(all="ignore"):
            return dict(zip((o.name for o in self.outputs), self.expect(case)))

    def carried(self, case, err):
        """{output name: how far it can move} when the rounded intermediate moves by err (see carry)."""
        return dict(zip((o.name for o in self.outputs), self.carry(case, err)))

    def named(self, arg):
        """A regular expression matching how the library's messages name the case array `arg`."""
        return self.names.get(arg, rf"\b{arg}\b")


@dataclass(frozen=True)
class Op:
    """A registered op: see the module docstring for the fields."""
    name: str
    make_case: Callable
    entry_points: tuple
    layouts: dict
    store: Callable
    load: Callable
    ranks: tuple
    dtypes: tuple
    args: dict
    state: tuple
    tolerance: Callable
    groups: Callable
    take: Callable
    restrict: Callable
    stats_by_layout: bool = False

    def entry(self, name):
        return next(e for e in self.entry_points if e.name == name)

    def supports(self, shape, layout, dtype):
        return layout in self.layouts and len(shape) in self.ranks and np.dtype(dtype) in self.dtypes

    def case(self, seed, shape, layout="NCHW", dtype=np.float32, **options):
        """make_case with a seeded Generator (the options show in the case's repr)."""
        c = self.make_case(np.random.default_rng(seed), tuple(shape), layout, dtype, **options)
        c.note = ", ".join(f"{k}={getattr(v, '__name__', v)}" for k, v in options.items())
        return c

    def __repr__(self):
        return self.name


class Case:
    """The arguments of one call of an op's entry points (made by the op's make_case).

    shape: the logical shape (the canonical layout's); layout_arg: the layout name passed to the library (may be
    an alias), layout: its canonical name; dtype: the data's; arrays: name -> ndarray, or None for an omitted
    optional argument; params: name -> scalar (eps, momentum, ...); n: values per statistic group.
    """

    def __init__(self, op, shape, layout_arg, dtype, arrays, params, n):
        self.op, self.shape, self.layout_arg, self.dtype = op, tuple(shape), layout_arg, np.dtype(dtype)
        self.layout = op.layouts[layout_arg]
        self.arrays, self.params, self.n = dict(arrays), dict(params), n
        self.note = ""

    def __getitem__(self, name):
        return self.arrays[name] if name in self.arrays else self.params[name]

    @property
    def tol(self):
        return self.op.tolerance(self.dtype, self.n)

    def replace(self, **changes):
        """The same case with some arrays or parameters replaced (the other arrays are shared, not copied)."""
        arrays, params = dict(self.arrays), dict(self.params)
        for k, v in changes.items():
            (params if k in params else arrays)[k] = v
        c = Case(self.op, self.shape, self.layout_arg, self.dtype, arrays, params, self.n)
        c.note = self.note
        return c

    def named(self, layout_arg):
        """The same case passed under another name of its layout (an alias)."""
        assert self.op.layouts[layout_arg] == self.layout
        c = Case(self.op, self.shape, layout_arg, self.dtype, self.arrays, self.params, self.n)
        c.note = self.note
        return c

    def fresh(self):
        """The same case with copies of the state arrays, so that a call that updates them leaves this one as is."""
        return self.replace(**{k: self.arrays[k].copy() for k in self.op.state if self.arrays.get(k) is not None})

    def canonical(self, a):
        """A DATA-shaped array of this case in the canonical layout (a view)."""
        return self.op.load(a, self.layout)

    def __repr__(self):
        note = f", {self.note}" if self.note else ""
        return f"{self.op.name}({'x'.join(map(str, self.shape))}, {self.layout_arg}, {self.dtype.name}{note})"


# ---- using the registry -----------------------------------------------------------------------------------------

def run_all(op, case):
    """{"entry.output": array} for every entry point that applies to the case (each on fresh state)."""
    res = {}
    for ep in op.entry_points:
        if ep.applies(case):
            for k, v in ep(case.fresh()).items():
                res[f"{ep.name}.{k}"] = v
    return res


def output_spec(op, key):
    """The Output of an "entry.output" key."""
    ep_name, out_name = key.split(".", 1)
    return next(o for o in op.entry(ep_name).outputs if o.name == out_name)


def compare(got, exp, what):
    """got against an Expected: dtype, shape, non-finite where the oracle is, within the bound elsewhere."""
    if exp is None:
        assert got is None, f"{what}: expected no output, got {type(got).__name__}"
        return
    assert isinstance(got, np.ndarray), f"{what}: expected an ndarray, got {type(got).__name__}"
    assert got.dtype == exp.dtype, f"{what}: dtype {got.dtype}, expected {exp.dtype}"
    value = np.asarray(exp.value, dtype=np.float64)
    assert got.shape == value.shape, f"{what}: shape {got.shape}, expected {value.shape}"
    g = got.astype(np.float64)
    nan, inf = np.isnan(value), np.isinf(value)
    if nan.any():
        assert np.isnan(g[nan]).all(), f"{what}: NaN expected at {np.argwhere(nan & ~np.isnan(g))[:3].tolist()}"
    if inf.any():
        assert (~np.isfinite(g[inf])).all(), f"{what}: non-finite expected at {np.argwhere(inf & np.isfinite(g))[:3]}"
    finite = ~(nan | inf)
    bound = np.broadcast_to(np.asarray(exp.bound, dtype=np.float64), value.shape)
    bounds.assert_within(g[finite], value[finite], bound[finite], what)


def check(ep, case, got, what="", groups=None):
    """Every output of ep in `got` against the oracle; with `groups` (indices of slices, see Op.groups) only the part
    of each output that belongs to those slices, against the oracle of the case cut down to them (the cheap check of
    a large case)."""
    if groups is not None:
        groups = sorted(set(groups))
        op = case.op
        got = {o.name: (got[o.name] if o.shape == SCALAR or got[o.name] is None
                        else op.take(case, got[o.name], o.shape, groups)) for o in ep.outputs}
        what = f"{what} (groups {groups})"
        case = op.restrict(case, groups)
    exp = ep.expected(case)
    for o in ep.outputs:
        compare(got[o.name], exp[o.name], f"{case} {ep.name}.{o.name}{what}")


def edge_groups(case, first=True):
    """The first and the last slice of a case (see Op.groups): where the kernels' blocks begin and end (first=False:
    the last alone, the one that holds the tails)."""
    g = case.op.groups(case)
    return sorted({0, g - 1} if first else {g - 1}) if g else []


def coarser(*dtypes):
    """The dtype of least precision among `dtypes`: a result rounded through each is rounded as through it."""
    return max((np.dtype(d) for d in dtypes if d is not None), key=lambda d: np.finfo(d).eps)


# ================================================================================================================
# Batch normalization
# ================================================================================================================

BN_LAYOUTS = {"NCHW": "NCHW", "NHWC": "NHWC", "channels_first": "NCHW", "channels_last": "NHWC"}


def _store(a, layout):
    """A (N, C, *spatial) array stored C-contiguous in `layout`."""
    a = np.asarray(a)
    return np.ascontiguousarray(a if BN_LAYOUTS[layout] == "NCHW" else np.moveaxis(a, 1, -1))


def _load(a, layout):
    return a if BN_LAYOUTS[layout] == "NCHW" else np.moveaxis(a, -1, 1)


def bn_make_case(rng, shape, layout="NCHW", dtype=np.float32, *, loc=0.0, scale=1.0, affine=True, param_dtype=None,
                 stats_dtype=None, track=True, eps=1e-5, momentum=0.1, unbiased=True):
    """Every argument of batch norm's entry points for x of logical shape (N, C, *spatial) stored in `layout`.

    x ~ loc + scale N(0, 1) and grad_out ~ N(0, 1) in `dtype`; weight (|w| in [0.5, 2], both signs) and bias
    (N(0, 1)) in param_dtype, or None without affine; running statistics (near the data's) in stats_dtype, or None
    without track; save_mean / save_invstd the batch's statistics in `dtype` (as batch_norm_forward returns them);
    stats_mean / stats_var the same statistics in float64 (the biased variance: the save_stats of a forward through a
    fused epilogue); mean and var (for normalize and the backward steps) near the data's, and the backward_apply
    coefficients a, b, d, in param_dtype; residual ~ N(0, 1) in `dtype`. param_dtype and stats_dtype default to
    `dtype`.
    """
    dtype = np.dtype(dtype)
    pdt, sdt = np.dtype(param_dtype or dtype), np.dtype(stats_dtype or dtype)
    C = shape[1]
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    b = rng.standard_normal(C)
    rm, rv = loc + scale * rng.standard_normal(C), scale ** 2 * rng.uniform(0.25, 4.0, C)
    mean, var = loc + scale * rng.standard_normal(C), scale ** 2 * rng.uniform(0.25, 4.0, C)
    ca, cb, cd = rng.standard_normal(C), rng.standard_normal(C) / scale, rng.standard_normal(C)
    n = ref.reduction_size(shape, "NCHW")
    if n:  # the batch's statistics, in float64 (inputs to the backward, not results under test)
        axes = (0,) + tuple(range(2, len(shape)))
        bm, bv = np.mean(x, axis=axes, dtype=np.float64), np.var(x, axis=axes, dtype=np.float64)
    else:
        bm, bv = mean, var
    arrays = dict(x=_store(x, layout), grad_out=_store(dy, layout),
                  weight=w.astype(pdt) if affine else None, bias=b.astype(pdt) if affine else None,
                  running_mean=rm.astype(sdt) if track else None, running_var=rv.astype(sdt) if track else None,
                  save_mean=bm.astype(dtype), save_invstd=(1.0 / np.sqrt(bv + eps)).astype(dtype),
                  mean=mean.astype(pdt), var=var.astype(pdt), a=ca.astype(pdt), b=cb.astype(pdt), d=cd.astype(pdt),
                  stats_mean=np.asarray(bm, np.float64), stats_var=np.asarray(bv, np.float64))
    # (drawn last: the arrays above keep the values they had before the fused epilogues' entry points)
    arrays["residual"] = _store(rng.standard_normal(shape).astype(dtype), layout)
    params = dict(eps=eps, momentum=momentum, unbiased=unbiased)
    return Case(BATCH_NORM, shape, layout, dtype, arrays, params, n)


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _x(c, name="x"):
    return _f64(c[name])


def _gdtype(c):
    """The dtype of the parameter gradients: weight's, x's without weight."""
    return c["weight"].dtype if c["weight"] is not None else c.dtype


# -- the oracle's expectations for each entry point (bounds: bounds.py) --

def _exp_y_batch(c, weight=None, bias=None):
    x = _x(c)
    y, mean, var = ref.forward_train(x, weight, bias, c["eps"], c.layout)
    bound = bounds.forward_bound(x, c.dtype, c.n, weight, bias, c["eps"], c.layout, mean, var, tol=c.tol)
    return Expected(y, bound, c.dtype), mean, var


def _exp_y_given(c, mean, var, weight, bias):
    x = _x(c)
    y = ref.normalize(x, mean, var, weight, bias, c["eps"], c.layout)
    bound = bounds.forward_bound(x, c.dtype, c.n, weight, bias, c["eps"], c.layout, mean=_f64(mean), var=_f64(var),
                                 batch_stats=False, tol=c.tol)
    return Expected(y, bound, c.dtype)


def _exp_running(c, mean, var, dtype=None):
    """running_mean / running_var after one training batch with statistics (mean, var): unchanged for n = 0.

    The batch mean errs by reduction_tol(n) mean|x| <= reduction_tol(n) (|mean| + std); the variance by
    4 reduction_tol(n) relative; each is rounded once to the running statistics' dtype (`dtype`: also a layer's,
    when the state is copied into one)."""
    rm0, rv0 = c["running_mean"], c["running_var"]
    if rm0 is None:
        return None, None
    dm, dv = (dtype or rm0.dtype), (dtype or rv0.dtype)
    if c.n == 0:
        return (Expected(_f64(rm0), bounds.eps_of(coarser(rm0.dtype, dm)) * np.abs(_f64(rm0)), np.dtype(dm)),
                Expected(_f64(rv0), bounds.eps_of(coarser(rv0.dtype, dv)) * np.abs(_f64(rv0)), np.dtype(dv)))
    rm, rv = ref.update_running(rm0, rv0, mean, var, c.n, c["momentum"], c["unbiased"])
    tm = bounds.stat_tol(c.n, coarser(rm0.dtype, dm))
    tv = bounds.stat_tol(c.n, coarser(rv0.dtype, dv))
    return (Expected(rm, tm * (np.abs(rm) + np.sqrt(var) + np.abs(mean) + 1.0), np.dtype(dm)),
            Expected(rv, 4.0 * tv * np.abs(rv), np.dtype(dv)))


def _exp_train(c):
    y, mean, var = _exp_y_batch(c, c["weight"], c["bias"])
    return (y,) + _exp_running(c, mean, var)


def _exp_eval(c):
    return (_exp_y_given(c, c["running_mean"], c["running_var"], c["weight"], c["bias"]),)


def _exp_normalize(c):
    return (_exp_y_given(c, c["mean"], c["var"], c["weight"], c["bias"]),)


def _exp_forward(c):
    y, mean, var = _exp_y_batch(c, c["weight"], c["bias"])
    t = bounds.stat_tol(c.n, c.dtype)
    s = 1.0 / np.sqrt(var + c["eps"])
    return y, Expected(mean, t * (np.abs(mean) + np.sqrt(var)), c.dtype), Expected(s, 4.0 * t * s, c.dtype)


def _exp_stats(c):
    mean, var, _ = ref.stats(_x(c), c.layout)
    t = bounds.stat_tol(c.n, F64)
    return Expected(mean, t * (np.abs(mean) + np.sqrt(var)), F64), Expected(var, 4.0 * t * var, F64)


def _exp_grads(c, mean, invstd, weight, training, gdtype, batch_stats=False, dy=None):
    """(grad_x, grad_weight, grad_bias), the parameter gradients returned in gdtype. The library rounds them to
    weight's dtype (x's without weight) first, so the coarsest of those dtypes rounds them. dy: the case's grad_out
    unless given (float64, stored as x)."""
    x, dy = _x(c), (_x(c, "grad_out") if dy is None else dy)
    dx, dw, db = ref.backward(dy, x, mean, invstd, weight, c.layout, training)
    bx, bw, bb = bounds.backward_bounds(dy, x, mean, invstd, weight, c.layout, training, c.dtype,
                                        batch_stats=batch_stats, eps=c["eps"], tol=c.tol)
    rounding = coarser(gdtype, _gdtype(c), c.dtype)
    if rounding != c.dtype:  # one more rounding, coarser than the data's (which the bounds count)
        bw, bb = bw + bounds.eps_of(rounding) * np.abs(dw), bb + bounds.eps_of(rounding) * np.abs(db)
    return Expected(dx, bx, c.dtype), Expected(dw, bw, np.dtype(gdtype)), Expected(db, bb, np.dtype(gdtype))


def _exp_backward(training):
    def expect(c):
        return _exp_grads(c, _f64(c["save_mean"]), _f64(c["save_invstd"]), c["weight"], training, _gdtype(c))
    return expect


def _exp_reduce(c):
    sdy, sdyx, mdy, mdyx = ref.backward_sums(_x(c, "grad_out"), _x(c), _f64(c["mean"]), c.layout)
    t = bounds.stat_tol(c.n, F64)
    return Expected(sdy, t * mdy, F64), Expected(sdyx, t * mdyx, F64)


def _exp_apply(c):
    dx, mag = ref.backward_apply(_x(c, "grad_out"), _x(c), _f64(c["mean"]), _f64(c["a"]), _f64(c["b"]), _f64(c["d"]),
                                 c.layout)
    return (Expected(dx, c.tol.elementwise * mag, c.dtype),)


def _exp_layer_backward(c):
    """After a training forward the layer differentiates through its own batch statistics."""
    mean, var, _ = ref.stats(_x(c), c.layout)
    grads = _exp_grads(c, mean, 1.0 / np.sqrt(var + c["eps"]), c["weight"], True, c.dtype, batch_stats=True)
    return grads if c["weight"] is not None else (grads[0], None, None)


def _exp_layer_eval_backward(c):
    rv = _f64(c["running_var"])
    grads = _exp_grads(c, _f64(c["running_mean"]), 1.0 / np.sqrt(rv + c["eps"]), c["weight"], False, c.dtype)
    return grads if c["weight"] is not None else (grads[0], None, None)


def _exp_state_dict(c):
    mean, var, _ = ref.stats(_x(c), c.layout)
    rm, rv = _exp_running(c, mean, var, dtype=c.dtype)
    wb = [None, None]
    if c["weight"] is not None:
        wb = [Expected(_f64(v), bounds.eps_of(coarser(v.dtype, c.dtype)) * np.abs(_f64(v)), c.dtype)
              for v in (c["weight"], c["bias"])]
    tracked = Expected(np.float64(1.0), 0.0, np.dtype(np.int64)) if rm is not None else None
    return wb[0], wb[1], rm, rv, tracked


# -- fused epilogues: z = act(y + residual) of the oracle's y; the bound carries y's through the activation (Lipschitz
# constant at most 1.1 for these) and adds the sum's and the activation's roundings in the data's dtype --

LEAKY, CLAMP = ("leaky_relu", 0.2), ("clamp", -0.5, 1.5)  # (the parametrised activations of the registry's entries)


def _act64(act, u):
    if act == "relu":
        return np.maximum(u, 0.0)
    if act == "silu":
        return u / (1.0 + np.exp(-u))
    if act == "relu6":
        return np.clip(u, 0.0, 6.0)
    if act[0] == "clamp":
        return np.clip(u, act[1], act[2])
    return np.where(u > 0, u, u * act[1])  # ("leaky_relu", slope)


def _exp_epilogue(expected_y, act, residual):
    def expect(c):
        got = expected_y(c)
        y = got[0]
        u = y.value + (_x(c, "residual") if residual else 0.0)
        z = _act64(act, u)
        e = bounds.eps_of(c.dtype)
        bound = 1.1 * y.bound + 4.0 * e * (np.abs(u) + np.abs(z))
        return (Expected(z, bound, y.dtype),) + tuple(got[1:])
    return expect


def _epilogue_call(training, act, residual):
    def call(c, out, ctx):
        y = bn_simd.batch_norm(c["x"], c["running_mean"], c["running_var"], c["weight"], c["bias"], training=training,
                               momentum=c["momentum"], eps=c["eps"], layout=c.layout_arg, out=out,
                               unbiased_running_var=c["unbiased"], activation=act,
                               residual=c["residual"] if residual else None)
        return (y, c["running_mean"], c["running_var"]) if training else (y,)
    return call


# -- the backward through a fused epilogue: u = y + residual is recomputed from x with the forward's statistics (the
# case's float64 ones, exact inputs), du = dz act'(u) (oracle.act_backward) is the residual's gradient and the plain
# backward's dy. du's bound (bounds.act_backward_bound) takes u's: y's with given statistics plus the sum's rounding;
# the gradients get the plain backward's bounds on du plus du's error carried through the backward's linear maps, and
# grad_x its dtype's subnormal spacing (a masked activation's gradients come close to 0, and float16's spacing there
# is above its relative bound) --

def _widened(e, extra):
    """An Expected (or None) with `extra` added to its bound."""
    return None if e is None else Expected(e.value, e.bound + extra, e.dtype)


def _epi_grads(c, grads, carried, du, err, residual):
    """The plain backward's Expected gradients on du (grad_x first; None where absent) widened by du's error carried
    through it (stored as they are), and grad_residual = du (None without a residual)."""
    carried = (carried[0] + bounds.subnormal_spacing(c.dtype),) + tuple(carried[1:])
    return tuple(_widened(g, e) for g, e in zip(grads, carried)) + (Expected(du, err, c.dtype) if residual else None,)


def _epi_du(c, y, act, residual):
    """(du, its bound) from the oracle's y (an Expected stored as x, with given statistics: its bound is element-wise
    roundings of the data's dtype) and the case's grad_out and residual. u is not rounded to the data's dtype: its
    bound is y's in units of the compute type (float32 for 16-bit data), plus the sum's rounding. (The float64 apply
    of extreme channels, whose |mean| / std the registry's cases never reach, rounds y to the data's dtype first.)"""
    u = y.value + (_x(c, "residual") if residual else 0.0)
    ec = bounds.eps_of(bounds.compute_dtype(c.dtype))
    u_bound = y.bound * (ec / bounds.eps_of(c.dtype)) + 4.0 * ec * np.abs(u)
    dz = _x(c, "grad_out")
    du = ref.act_backward(act, u, dz)
    return du, bounds.act_backward_bound(act, u, dz, du, u_bound, c.dtype)


def _epi_carry(training, stats):
    """carry(c, err): how far (grad_x, grad_weight, grad_bias) move when du moves by err, with the case's
    statistics."""
    def carry(c, err):
        mean, var = (_f64(c[k]) for k in stats)
        return ref.backward_carry(err, _x(c), mean, 1.0 / np.sqrt(var + c["eps"]), c["weight"], c.layout, training)
    return carry


def _exp_epi_backward(act, residual, training, stats):
    carry = _epi_carry(training, stats)

    def expect(c):
        mean, var = (_f64(c[k]) for k in stats)
        s = 1.0 / np.sqrt(var + c["eps"])
        du, err = _epi_du(c, _exp_y_given(c, mean, var, c["weight"], c["bias"]), act, residual)
        grads = _exp_grads(c, mean, s, c["weight"], training, _gdtype(c), dy=du)
        return _epi_grads(c, grads, carry(c, err), du, err, residual)
    return expect


def _epi_backward_call(training, act, residual, stats):
    def call(c, out, ctx):
        return bn_simd.batch_norm_backward(c["grad_out"], c["x"], None, None, c["weight"], layout=c.layout_arg,
                                           out=out, training=training, activation=act,
                                           residual=c["residual"] if residual else None, bias=c["bias"],
                                           eps=c["eps"], save_stats=tuple(c[k] for k in stats))
    return call


# -- the calls --

def _train(c, out, ctx):
    y = bn_simd.batch_norm(c["x"], c["running_mean"], c["running_var"], c["weight"], c["bias"], training=True,
                           momentum=c["momentum"], eps=c["eps"], layout=c.layout_arg, out=out,
                           unbiased_running_var=c["unbiased"])
    return y, c["running_mean"], c["running_var"]


def _eval(c, out, ctx):
    return (bn_simd.batch_norm(c["x"], c["running_mean"], c["running_var"], c["weight"], c["bias"], training=False,
                               eps=c["eps"], layout=c.layout_arg, out=out),)


def _forward(c, out, ctx):
    return bn_simd.batch_norm_forward(c["x"], c["weight"], c["bias"], eps=c["eps"], layout=c.layout_arg, out=out)


def _backward(training):
    def call(c, out, ctx):
        return bn_simd.batch_norm_backward(c["grad_out"], c["x"], c["save_mean"], c["save_invstd"], c["weight"],
                                           layout=c.layout_arg, out=out, training=training)
    return call


def _stats(c, out, ctx):
    return bn_simd.batch_stats(c["x"], layout=c.layout_arg)


def _normalize(c, out, ctx):
    return (bn_simd.normalize(c["x"], c["mean"], c["var"], c["weight"], c["bias"], eps=c["eps"], layout=c.layout_arg,
                              out=out),)


def _reduce(c, out, ctx):
    return bn_simd.backward_reduce(c["grad_out"], c["x"], c["mean"], layout=c.layout_arg)


def _apply(c, out, ctx):
    return (bn_simd.backward_apply(c["grad_out"], c["x"], c["mean"], c["a"], c["b"], c["d"], layout=c.layout_arg,
                                   out=out),)


def _apply_kernel(c, out, ctx):
    """The internal element-wise kernel with the folded coefficients eval computes (m, a rounded to the dtype, the
    mean's rounding residual folded into b), on the canonical (outer, C, inner) view of a native C-contiguous copy
    when x is not one (the kernel takes no other)."""
    x = np.ascontiguousarray(c["x"], dtype=c.dtype.newbyteorder("="))
    C = c.shape[1]
    w = _f64(c["weight"]) if c["weight"] is not None else np.ones(C)
    bias = _f64(c["bias"]) if c["bias"] is not None else np.zeros(C)
    rm, rv = _f64(c["running_mean"]), _f64(c["running_var"])
    a = (w / np.sqrt(rv + c["eps"])).astype(c.dtype)
    m = rm.astype(c.dtype)
    b = (bias - (rm - m.astype(np.float64)) * a.astype(np.float64)).astype(c.dtype)
    outer = math.prod(x.shape[:1] if c.layout == "NCHW" else x.shape[:-1])
    dims = (outer, C, x.size // (outer * C)) if outer * C else (outer, C, 1)
    y = np.empty_like(x)
    if x.size:
        _core.apply(x.reshape(dims), y.reshape(dims), m, a, b, bn_simd.get_num_threads())
    return (y,)


def _layer_dtype(c):
    """A layer's parameter dtype for the case: x's, or float32 for 16-bit data (the layers' parameters are float32 or
    float64; 16-bit data take float32 ones, PyTorch's mixed rule)."""
    return c.dtype if c.dtype.itemsize >= 4 else np.dtype(np.float32)


def _layer(c, training=True):
    """A BatchNorm layer whose parameters and running statistics are the case's arrays themselves (so a refused call
    is seen to leave them as they were)."""
    track, affine = c["running_mean"] is not None, c["weight"] is not None
    layer = bn_simd.BatchNorm(c.shape[1], eps=c["eps"], momentum=c["momentum"], affine=affine,
                              track_running_stats=track, layout=c.layout_arg, dtype=_layer_dtype(c),
                              unbiased_running_var=c["unbiased"])
    return _with_case_state(layer, c, training)


def _with_case_state(layer, c, training=True):
    """The layer with the case's weight, bias and running statistics (those it has) as its own arrays, in the mode
    asked for."""
    if c["weight"] is not None:
        layer.weight, layer.bias = c["weight"], c["bias"]
    if getattr(layer, "track_running_stats", False):
        layer.running_mean, layer.running_var = c["running_mean"], c["running_var"]
    return layer.train(training)


def _layer_calls(make):
    """The forward calls of the layers `make(c, training)` builds: training (y and the running statistics) and
    eval (y)."""
    def forward(c, out, ctx):
        return (make(c)(c["x"], out=out), c["running_mean"], c["running_var"])

    def eval_forward(c, out, ctx):
        return (make(c, False)(c["x"], out=out),)
    return forward, eval_forward


_layer_forward, _layer_eval_forward = _layer_calls(_layer)


def _layer_after_forward(training):
    def prepare(c):
        layer = _layer(c, training)
        layer(c["x"])
        return layer
    return prepare


def _layer_backward(c, out, ctx):
    gx = ctx.backward(c["grad_out"], out=out)
    return gx, ctx.grad_weight, ctx.grad_bias


def _state_dict(c, out, ctx):
    """A training step, then the layer's state_dict loaded into a fresh layer: that layer's state."""
    layer = _layer(c)
    layer(c["x"])
    fresh = bn_simd.BatchNorm(c.shape[1], affine=layer.affine, track_running_stats=layer.track_running_stats,
                              layout=c.layout_arg, dtype=_layer_dtype(c))
    fresh.load_state_dict(layer.state_dict())
    tracked = np.asarray(fresh.num_batches_tracked) if fresh.track_running_stats else None
    return fresh.weight, fresh.bias, fresh.running_mean, fresh.running_var, tracked


# -- groups: a channel is batch norm's statistic group --

def _bn_groups(c):
    return c.shape[1]


def _bn_take(c, a, kind, which):
    if a is None:
        return None
    if kind == DATA:
        return np.take(a, which, axis=ref.channel_axis(c.layout, a.ndim))
    return np.take(a, which)


def _bn_restrict(c, which):
    arrays = {k: (_bn_take(c, v, BATCH_NORM.args[k], which) if v is not None else None) for k, v in c.arrays.items()}
    shape = (c.shape[0], len(which)) + c.shape[2:]
    return Case(c.op, shape, c.layout_arg, c.dtype, arrays, c.params, c.n)


_Y = Output("y")
_GRADS = (Output("grad_x"), Output("grad_weight", CHANNEL), Output("grad_bias", CHANNEL))
_RUNNING = (Output("running_mean", CHANNEL), Output("running_var", CHANNEL))
_PER_CHANNEL = ("weight", "bias")
_LAYER_NAMES = {"x": r"\bx\b|input"}  # a layer's rank message speaks of its "input"
_RUNNING_STATS = ("running_mean", "running_var")
_GRAD_RES = Output("grad_residual")
_STATS64 = ("stats_mean", "stats_var")  # (the save_stats of a forward through an epilogue: the API's names)
_STATS64_NAMES = {"stats_mean": r"save_stats\[0\] \(mean\)", "stats_var": r"save_stats\[1\] \(var\)"}

BATCH_NORM = Op(
    name="batch_norm",
    make_case=bn_make_case,
    entry_points=(
        EntryPoint("train", _train, (_Y,) + _RUNNING, _exp_train,
                   reads=("x", "running_mean", "running_var") + _PER_CHANNEL, writes=("running_mean", "running_var"),
                   out=("x",), batch=True),
        EntryPoint("eval", _eval, (_Y,), _exp_eval, reads=("x", "running_mean", "running_var") + _PER_CHANNEL,
                   out=("x",), needs=_RUNNING_STATS),
        EntryPoint("forward", _forward, (_Y, Output("save_mean", CHANNEL), Output("save_invstd", CHANNEL)),
                   _exp_forward, reads=("x",) + _PER_CHANNEL, out=("x",), batch=True, large=True),
        EntryPoint("backward", _backward(True), _GRADS, _exp_backward(True),
                   reads=("grad_out", "x", "save_mean", "save_invstd", "weight"), out=("x", "grad_out"), large=True),
        EntryPoint("backward_eval", _backward(False), _GRADS, _exp_backward(False),
                   reads=("grad_out", "x", "save_mean", "save_invstd", "weight"), out=("x", "grad_out")),
        EntryPoint("stats", _stats, (Output("mean", CHANNEL, True), Output("var", CHANNEL, True)), _exp_stats,
                   large=True),
        EntryPoint("normalize", _normalize, (_Y,), _exp_normalize, reads=("x", "mean", "var") + _PER_CHANNEL,
                   out=("x",)),
        EntryPoint("backward_reduce", _reduce, (Output("sum_dy", CHANNEL, True), Output("sum_dyx", CHANNEL, True)),
                   _exp_reduce, reads=("grad_out", "x", "mean")),
        EntryPoint("backward_apply", _apply, (Output("grad_x"),), _exp_apply,
                   reads=("grad_out", "x", "mean", "a", "b", "d"), out=("x", "grad_out")),
        EntryPoint("apply_kernel", _apply_kernel, (_Y,), _exp_eval, reads=("x",), needs=_RUNNING_STATS, checked=False),
        EntryPoint("layer_forward", _layer_forward, (_Y,) + _RUNNING, _exp_train,
                   reads=("x", "running_mean", "running_var") + _PER_CHANNEL, writes=("running_mean", "running_var"),
                   out=("x",), batch=True, names=_LAYER_NAMES),
        EntryPoint("layer_backward", _layer_backward, _GRADS, _exp_layer_backward, reads=("grad_out",),
                   out=("x", "grad_out"), batch=True, prepare=_layer_after_forward(True)),
        EntryPoint("layer_eval_forward", _layer_eval_forward, (_Y,), _exp_eval,
                   reads=("x", "running_mean", "running_var") + _PER_CHANNEL, out=("x",), needs=_RUNNING_STATS,
                   names=_LAYER_NAMES),
        EntryPoint("layer_eval_backward", _layer_backward, _GRADS, _exp_layer_eval_backward, reads=("grad_out",),
                   out=("x", "grad_out"), needs=_RUNNING_STATS, prepare=_layer_after_forward(False)),
        # fused epilogues (a few representative combinations)
        EntryPoint("train_relu_residual", _epilogue_call(True, "relu", True), (_Y,) + _RUNNING,
                   _exp_epilogue(_exp_train, "relu", True),
                   reads=("x", "running_mean", "running_var", "residual") + _PER_CHANNEL,
                   writes=("running_mean", "running_var"), out=("x",), batch=True),
        EntryPoint("eval_leaky_relu", _epilogue_call(False, ("leaky_relu", 0.2), False), (_Y,),
                   _exp_epilogue(_exp_eval, ("leaky_relu", 0.2), False),
                   reads=("x", "running_mean", "running_var") + _PER_CHANNEL, out=("x",), needs=_RUNNING_STATS),
        EntryPoint("eval_silu_residual", _epilogue_call(False, "silu", True), (_Y,),
                   _exp_epilogue(_exp_eval, "silu", True),
                   reads=("x", "running_mean", "running_var", "residual") + _PER_CHANNEL, out=("x",),
                   needs=_RUNNING_STATS),
        EntryPoint("train_relu6", _epilogue_call(True, "relu6", False), (_Y,) + _RUNNING,
                   _exp_epilogue(_exp_train, "relu6", False),
                   reads=("x", "running_mean", "running_var") + _PER_CHANNEL,
                   writes=("running_mean", "running_var"), out=("x",), batch=True),
        EntryPoint("eval_clamp_residual", _epilogue_call(False, CLAMP, True), (_Y,),
                   _exp_epilogue(_exp_eval, CLAMP, True),
                   reads=("x", "running_mean", "running_var", "residual") + _PER_CHANNEL, out=("x",),
                   needs=_RUNNING_STATS),
        # backward through fused epilogues: silu (smooth) with a residual in training, relu (a kink) in training and
        # in eval mode with given statistics
        EntryPoint("backward_silu_residual", _epi_backward_call(True, "silu", True, _STATS64), _GRADS + (_GRAD_RES,),
                   _exp_epi_backward("silu", True, True, _STATS64),
                   reads=("grad_out", "x", "residual") + _STATS64 + _PER_CHANNEL, out=("x", "grad_out"),
                   large=True, names=_STATS64_NAMES, carry=_epi_carry(True, _STATS64)),
        # relu without a residual in training: on long maps beyond the last-level cache (the large cases, whose
        # streaming threshold is lowered) float32 and float64 compute du in the sums and the dx sweep, storing none
        EntryPoint("backward_relu", _epi_backward_call(True, "relu", False, _STATS64), _GRADS + (_GRAD_RES,),
                   _exp_epi_backward("relu", False, True, _STATS64),
                   reads=("grad_out", "x") + _STATS64 + _PER_CHANNEL, out=("x", "grad_out"),
                   large=True, names=_STATS64_NAMES, carry=_epi_carry(True, _STATS64)),
        EntryPoint("backward_eval_relu", _epi_backward_call(False, "relu", False, ("mean", "var")),
                   _GRADS + (_GRAD_RES,), _exp_epi_backward("relu", False, False, ("mean", "var")),
                   reads=("grad_out", "x", "mean", "var") + _PER_CHANNEL, out=("x", "grad_out")),
        # the other piecewise-linear activations: leaky relu with a residual in training, clamp in eval mode
        EntryPoint("backward_leaky_relu_residual", _epi_backward_call(True, LEAKY, True, _STATS64),
                   _GRADS + (_GRAD_RES,), _exp_epi_backward(LEAKY, True, True, _STATS64),
                   reads=("grad_out", "x", "residual") + _STATS64 + _PER_CHANNEL, out=("x", "grad_out"),
                   names=_STATS64_NAMES, carry=_epi_carry(True, _STATS64)),
        EntryPoint("backward_eval_clamp", _epi_backward_call(False, CLAMP, False, ("mean", "var")),
                   _GRADS + (_GRAD_RES,), _exp_epi_backward(CLAMP, False, False, ("mean", "var")),
                   reads=("grad_out", "x", "mean", "var") + _PER_CHANNEL, out=("x", "grad_out")),
        EntryPoint("state_dict", _state_dict,
                   (Output("weight", CHANNEL), Output("bias", CHANNEL)) + _RUNNING
                   + (Output("num_batches_tracked", SCALAR),),
                   _exp_state_dict, reads=("x", "running_mean", "running_var") + _PER_CHANNEL,
                   writes=("running_mean", "running_var"), batch=True, names=_LAYER_NAMES),
    ),
    layouts=BN_LAYOUTS,
    store=_store,
    load=_load,
    ranks=(2, 3, 4, 5),
    dtypes=(np.dtype(np.float32), np.dtype(np.float64), HALF),
    args=dict(x=DATA, grad_out=DATA, weight=CHANNEL, bias=CHANNEL, running_mean=CHANNEL, running_var=CHANNEL,
              save_mean=GROUP, save_invstd=GROUP, mean=GROUP, var=GROUP, a=CHANNEL, b=CHANNEL, d=CHANNEL,
              residual=DATA, stats_mean=GROUP, stats_var=GROUP),
    state=("running_mean", "running_var"),
    tolerance=bounds.tolerance,
    groups=_bn_groups,
    take=_bn_take,
    restrict=_bn_restrict,
)


# ================================================================================================================
# Group normalization and instance normalization (one channel per group)
# ================================================================================================================

def _default_groups(C, S):
    """Groups of 2 channels where C allows (D > 1 exercises the channel merge), else of 1; one group when that
    would leave one value per group."""
    if C % 2 == 0 and C > 1:
        return C // 2
    return 1 if S == 1 and C > 1 else max(C, 1)


def _group_case(op, rng, shape, layout, dtype, num_groups, loc, scale, affine, param_dtype, stats_dtype, track, eps,
                momentum):
    dtype = np.dtype(dtype)
    pdt, sdt = np.dtype(param_dtype or dtype), np.dtype(stats_dtype or dtype)
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    G = num_groups
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    b = rng.standard_normal(C)
    rm, rv = loc + scale * rng.standard_normal(C), scale ** 2 * rng.uniform(0.25, 4.0, C)
    gm, gv, n = ref.group_stats(x, G) if N * C * S else (np.zeros((N, G)), np.ones((N, G)), 0)
    if not n:
        gm, gv = np.zeros((N, G)), np.ones((N, G))
    arrays = dict(x=_store(x, layout), grad_out=_store(dy, layout),
                  weight=w.astype(pdt) if affine else None, bias=b.astype(pdt) if affine else None,
                  running_mean=rm.astype(sdt) if track else None, running_var=rv.astype(sdt) if track else None,
                  save_mean=gm.astype(dtype), save_invstd=(1.0 / np.sqrt(gv + eps)).astype(dtype),
                  stats_mean=np.asarray(gm, np.float64), stats_var=np.asarray(gv, np.float64))
    # (drawn last: the arrays above keep the values they had before the fused epilogues' entry points)
    arrays["residual"] = _store(rng.standard_normal(shape).astype(dtype), layout)
    params = dict(eps=eps, momentum=momentum, num_groups=G)
    return Case(op, shape, layout, dtype, arrays, params, (C // G) * S if G else 0)


def gn_make_case(rng, shape, layout="NCHW", dtype=np.float32, *, num_groups=None, loc=0.0, scale=1.0, affine=True,
                 param_dtype=None, stats_dtype=None, track=True, eps=1e-5, momentum=0.1, unbiased=True):
    """Group norm's arguments for x of logical shape (N, C, *spatial) in `layout`: as bn_make_case, with
    num_groups (default: groups of 2 channels where C is even), save_mean / save_invstd the (N, G) statistics
    of the batch's groups in `dtype` and stats_mean / stats_var their mean and biased variance in float64 (a fused
    epilogue's save_stats). (track, stats_dtype, momentum, unbiased: accepted, not used.)"""
    G = num_groups or _default_groups(shape[1], math.prod(shape[2:]))
    return _group_case(GROUP_NORM, rng, shape, layout, dtype, G, loc, scale, affine, param_dtype, stats_dtype, False,
                       eps, momentum)


def in_make_case(rng, shape, layout="NCHW", dtype=np.float32, *, loc=0.0, scale=1.0, affine=True, param_dtype=None,
                 stats_dtype=None, track=True, eps=1e-5, momentum=0.1, unbiased=True, num_groups=None):
    """Instance norm's arguments: group norm's with one channel per group, and running statistics (near the
    data's, in stats_dtype) unless track is False."""
    return _group_case(INSTANCE_NORM, rng, shape, layout, dtype, shape[1], loc, scale, affine, param_dtype,
                       stats_dtype, track, eps, momentum)


def _xc(c, name="x"):
    """A DATA array of the case in the canonical layout, float64."""
    return _f64(c.canonical(c[name]))


def _group_out(c, a):
    """A canonical-layout result stored back in the case's layout (what the library returns)."""
    return c.op.store(a, c.layout)


def _exp_gn_y(c, mean=None, var=None):
    """y of the batch's group statistics (or of mean / var given per (N, G) ... or per channel for instance norm's
    eval, see _exp_in_eval), with forward_bound's two terms per group."""
    x = _xc(c)
    G = c["num_groups"]
    y, xhat, m, v = ref.group_forward(x, G, c["weight"], c["bias"], c["eps"], mean, var)
    C = x.shape[1]
    cs = ref._channel_shape(x)
    wa = np.abs(ref.per_channel(c["weight"], C, 1.0)).reshape(cs)
    ba = np.abs(ref.per_channel(c["bias"], C, 0.0)).reshape(cs)
    bound = c.tol.elementwise * (wa * (1.0 + np.abs(xhat)) + ba)
    if mean is None:
        xg = ref._grouped(x, G)
        cond = (np.abs(xg).mean(axis=2) if xg.shape[2] else np.zeros(xg.shape[:2])) / np.sqrt(v + c["eps"])
        condc = np.repeat(cond, C // G, axis=1).reshape(x.shape[:2] + (1,) * (x.ndim - 2))
        bound = bound + wa * c.tol.reduction * (condc + np.abs(xhat))
    return Expected(_group_out(c, y), _group_out(c, bound), c.dtype), m, v


def _exp_gn_forward(c):
    y, m, v = _exp_gn_y(c)
    t = bounds.stat_tol(c.n, c.dtype)
    s = 1.0 / np.sqrt(v + c["eps"])
    return y, Expected(m, t * (np.abs(m) + np.sqrt(v)), c.dtype), Expected(s, 4.0 * t * s, c.dtype)


def _exp_gn_grads(c, mean, invstd, gdtype=None, dy=None):
    """dy: the case's grad_out unless given (float64, canonical layout)."""
    G = c["num_groups"]
    dy = _xc(c, "grad_out") if dy is None else dy
    (dx, dw, db), (dxs, dx_sums, dws, dbs) = ref.group_backward(dy, _xc(c), mean, invstd, G, c["weight"])
    t = c.tol
    gdtype = np.dtype(gdtype or _gdtype(c))
    rounding = coarser(gdtype, _gdtype(c), c.dtype)  # (a layer rounds weight's dtype's gradients to its own)
    bx = t.elementwise * dxs + t.reduction * dx_sums
    bw = t.reduction * dws + bounds.eps_of(rounding) * np.abs(dw)
    bb = t.reduction * dbs + bounds.eps_of(rounding) * np.abs(db)
    return (Expected(_group_out(c, dx), _group_out(c, bx), c.dtype), Expected(dw, bw, gdtype),
            Expected(db, bb, gdtype))


def _exp_gn_backward(c):
    return _exp_gn_grads(c, _f64(c["save_mean"]), _f64(c["save_invstd"]))


def _exp_gn_layer_backward(c):
    """The layer's own statistics of a training forward (kept in float64, unrounded, as the layer saves them). Its
    estimate of them errs (as backward_bounds' batch_stats): the mean by dm <= reduction_tol mean|x|, invstd by a
    relative 2 reduction_tol, so xhat by e = reduction_tol (2 |xhat| + cond); dx = s (w dy - A / M - xhat B / M)
    moves by |s| (2 reduction_tol (|w dy| + |A| / M + |xhat B| / M) + e |B| / M + |xhat| e_B / M), e_B the sum of
    |w dy| e."""
    x, G = _xc(c), c["num_groups"]
    m, v, _ = ref.group_stats(x, G)
    mean, invstd = m, 1.0 / np.sqrt(v + c["eps"])
    grads = _exp_gn_grads(c, mean, invstd, c.dtype)
    if x.size:
        N, C = x.shape[:2]
        rt = c.tol.reduction
        s = np.abs(_f64(invstd)).reshape(N, G, 1)
        xg = ref._grouped(x, G)
        xh = np.abs(xg - _f64(mean).reshape(N, G, 1)) * s
        cond = np.abs(xg).mean(axis=2, keepdims=True) * s
        wdy = np.abs(ref._grouped(_xc(c, "grad_out") * ref.per_channel(c["weight"], C, 1.0).reshape(
            ref._channel_shape(x)), G))
        M = max(xg.shape[2], 1)
        A, B = wdy.sum(axis=2, keepdims=True), (wdy * xh).sum(axis=2, keepdims=True)
        e = rt * (2.0 * xh + cond)
        eB = (wdy * e).sum(axis=2, keepdims=True)
        extra = s * (2.0 * rt * (wdy + A / M + xh * B / M) + e * B / M + xh * eB / M)
        g0 = grads[0]
        grads = (Expected(g0.value, g0.bound + _group_out(c, extra.reshape(x.shape)), g0.dtype),) + grads[1:]
    return grads if c["weight"] is not None else (grads[0], None, None)


def _gn_epi_carry(c, err):
    """How far (grad_x, grad_weight, grad_bias) move when du moves by err, with the case's (N, G) statistics."""
    mean, var = _f64(c["stats_mean"]), _f64(c["stats_var"])
    cx, cw, cb = ref.group_backward_carry(c.canonical(err), _xc(c), mean, 1.0 / np.sqrt(var + c["eps"]),
                                          c["num_groups"], c["weight"])
    return _group_out(c, cx), cw, cb


def _exp_gn_epi_backward(act, residual):
    """Through a fused epilogue (as batch norm's _exp_epi_backward) with the case's float64 (N, G) statistics."""
    def expect(c):
        mean, var = _f64(c["stats_mean"]), _f64(c["stats_var"])
        invstd = 1.0 / np.sqrt(var + c["eps"])
        du, err = _epi_du(c, _exp_gn_y(c, mean, var)[0], act, residual)
        grads = _exp_gn_grads(c, mean, invstd, dy=c.canonical(du))
        return _epi_grads(c, grads, _gn_epi_carry(c, err), du, err, residual)
    return expect


def _gn_epi_backward(act, residual, instance=False):
    def call(c, out, ctx):
        kw = dict(layout=c.layout_arg, out=out, activation=act, residual=c["residual"] if residual else None,
                  bias=c["bias"], eps=c["eps"], save_stats=(c["stats_mean"], c["stats_var"]))
        if instance:
            return bn_simd.instance_norm_backward(c["grad_out"], c["x"], None, None, c["weight"], **kw)
        return bn_simd.group_norm_backward(c["grad_out"], c["x"], None, None, c["num_groups"], c["weight"], **kw)
    return call


def _gn_forward(c, out, ctx):
    return bn_simd.group_norm_forward(c["x"], c["num_groups"], c["weight"], c["bias"], eps=c["eps"],
                                      layout=c.layout_arg, out=out)


def _gn_functional(c, out, ctx):
    return (bn_simd.group_norm(c["x"], c["num_groups"], c["weight"], c["bias"], c["eps"], layout=c.layout_arg,
                               out=out),)


def _gn_epilogue(act, residual):
    def call(c, out, ctx):
        return (bn_simd.group_norm(c["x"], c["num_groups"], c["weight"], c["bias"], c["eps"], layout=c.layout_arg,
                                   out=out, activation=act, residual=c["residual"] if residual else None),)
    return call


def _in_epilogue(training, act, residual):
    def call(c, out, ctx):
        y = bn_simd.instance_norm(c["x"], c["running_mean"], c["running_var"], c["weight"], c["bias"], training,
                                  c["momentum"], c["eps"], layout=c.layout_arg, out=out, activation=act,
                                  residual=c["residual"] if residual else None)
        return (y, c["running_mean"], c["running_var"]) if training else (y,)
    return call


def _gn_backward(c, out, ctx):
    return bn_simd.group_norm_backward(c["grad_out"], c["x"], c["save_mean"], c["save_invstd"], c["num_groups"],
                                       c["weight"], layout=c.layout_arg, out=out)


def _gn_layer(c):
    affine = c["weight"] is not None
    layer = bn_simd.GroupNorm(c["num_groups"], c.shape[1], eps=c["eps"], affine=affine, layout=c.layout_arg,
                              dtype=_layer_dtype(c))
    return _with_case_state(layer, c)


def _gn_layer_forward(c, out, ctx):
    return (_gn_layer(c)(c["x"], out=out),)


def _gn_layer_prepare(c):
    layer = _gn_layer(c)
    layer(c["x"])
    return layer


# -- instance norm --

def _in_running(c):
    """running_mean / running_var after one training call: (1 - momentum) running + momentum times the batch
    average of the instance means and unbiased variances (PyTorch's), bounds as _exp_running's."""
    rm0, rv0 = c["running_mean"], c["running_var"]
    if rm0 is None:
        return None, None
    if c.shape[0] == 0:  # an empty batch leaves them as they are
        return (Expected(_f64(rm0), bounds.eps_of(rm0.dtype) * np.abs(_f64(rm0)), rm0.dtype),
                Expected(_f64(rv0), bounds.eps_of(rv0.dtype) * np.abs(_f64(rv0)), rv0.dtype))
    m, v, S = ref.group_stats(_xc(c), c.shape[1])
    mom = c["momentum"]
    am, av = m.mean(axis=0), (v * (S / (S - 1))).mean(axis=0)
    rm = (1.0 - mom) * _f64(rm0) + mom * am
    rv = (1.0 - mom) * _f64(rv0) + mom * av
    tm, tv = bounds.stat_tol(c.n, rm0.dtype), bounds.stat_tol(c.n, rv0.dtype)
    return (Expected(rm, tm * (np.abs(rm) + np.sqrt(av) + np.abs(am) + 1.0), rm0.dtype),
            Expected(rv, 4.0 * tv * np.abs(rv) + tv * np.abs(av), rv0.dtype))


def _exp_in_train(c):
    y, _, _ = _exp_gn_y(c)
    return (y,) + _in_running(c)


def _exp_in_eval(c):
    """Running statistics: batch norm's eval."""
    x = _xc(c)
    y = ref.normalize(x, c["running_mean"], c["running_var"], c["weight"], c["bias"], c["eps"], "NCHW")
    bound = bounds.forward_bound(x, c.dtype, c.n, c["weight"], c["bias"], c["eps"], "NCHW",
                                 mean=_f64(c["running_mean"]), var=_f64(c["running_var"]), batch_stats=False,
                                 tol=c.tol)
    return (Expected(_group_out(c, y), _group_out(c, bound), c.dtype),)


def _exp_in_eval_backward(c):
    """After an eval-mode call that used the running statistics: batch norm's eval backward."""
    x, dy = _xc(c), _xc(c, "grad_out")
    rm, rv = _f64(c["running_mean"]), _f64(c["running_var"])
    s = 1.0 / np.sqrt(rv + c["eps"])
    dx, dw, db = ref.backward(dy, x, rm, s, c["weight"], "NCHW", False)
    bx, bw, bb = bounds.backward_bounds(dy, x, rm, s, c["weight"], "NCHW", False, c.dtype, eps=c["eps"], tol=c.tol)
    rounding = coarser(_gdtype(c), c.dtype)  # (the layer rounds weight's dtype's gradients to its own)
    bw, bb = bw + bounds.eps_of(rounding) * np.abs(dw), bb + bounds.eps_of(rounding) * np.abs(db)
    grads = (Expected(_group_out(c, dx), _group_out(c, bx), c.dtype), Expected(dw, bw, c.dtype),
             Expected(db, bb, c.dtype))
    return grads if c["weight"] is not None else (grads[0], None, None)


def _in_forward(c, out, ctx):
    return bn_simd.instance_norm_forward(c["x"], c["weight"], c["bias"], eps=c["eps"], layout=c.layout_arg, out=out)


def _in_train(c, out, ctx):
    y = bn_simd.instance_norm(c["x"], c["running_mean"], c["running_var"], c["weight"], c["bias"], True,
                              c["momentum"], c["eps"], layout=c.layout_arg, out=out)
    return y, c["running_mean"], c["running_var"]


def _in_eval(c, out, ctx):
    return (bn_simd.instance_norm(c["x"], c["running_mean"], c["running_var"], c["weight"], c["bias"], False,
                                  c["momentum"], c["eps"], layout=c.layout_arg, out=out),)


def _in_backward(c, out, ctx):
    return bn_simd.instance_norm_backward(c["grad_out"], c["x"], c["save_mean"], c["save_invstd"], c["weight"],
                                          layout=c.layout_arg, out=out)


_IN_LAYERS = {3: "InstanceNorm1d", 4: "InstanceNorm2d", 5: "InstanceNorm3d"}
_IN_LAYER_RANKS = (2, 3, 4, 5)  # (each class its rank and, unbatched, one less)


def _in_layer(c, training=True):
    track, affine = c["running_mean"] is not None, c["weight"] is not None
    layer = getattr(bn_simd, _IN_LAYERS[len(c.shape)])(c.shape[1], eps=c["eps"], momentum=c["momentum"],
                                                        affine=affine, track_running_stats=track,
                                                        layout=c.layout_arg, dtype=_layer_dtype(c))
    return _with_case_state(layer, c, training)


_in_layer_forward, _in_layer_eval_forward = _layer_calls(_in_layer)


def _in_layer_prepare(training):
    def prepare(c):
        layer = _in_layer(c, training)
        layer(c["x"])
        return layer
    return prepare


# -- groups of channels as the independent slices --

def _gn_groups(c):
    return c["num_groups"]


def _gn_take(c, a, kind, which):
    if a is None:
        return None
    G = c["num_groups"]
    D = c.shape[1] // G if G else 0
    if kind == GROUP:
        return np.take(a, which, axis=1)
    chans = [g * D + j for g in which for j in range(D)]
    if kind == DATA:
        return np.take(a, chans, axis=ref.channel_axis(c.layout, a.ndim))
    return np.take(a, chans)


def _gn_restrict(c, which):
    arrays = {k: (_gn_take(c, v, c.op.args[k], which) if v is not None else None) for k, v in c.arrays.items()}
    D = c.shape[1] // c["num_groups"]
    shape = (c.shape[0], len(which) * D) + c.shape[2:]
    params = dict(c.params, num_groups=len(which))
    return Case(c.op, shape, c.layout_arg, c.dtype, arrays, params, c.n)


_STATS_OUT = (Output("save_mean", GROUP), Output("save_invstd", GROUP))
_GN_BWD_READS = ("grad_out", "x", "save_mean", "save_invstd", "weight")
_GN_BWD_NAMES = {"save_mean": r"\bmean\b", "save_invstd": r"\binvstd\b"}  # (the API's names)
_GN_ARGS = dict(x=DATA, grad_out=DATA, weight=CHANNEL, bias=CHANNEL, running_mean=CHANNEL, running_var=CHANNEL,
                save_mean=GROUP, save_invstd=GROUP, residual=DATA, stats_mean=GROUP, stats_var=GROUP)
_GN_EPI_BWD_READS = ("grad_out", "x") + _STATS64 + _PER_CHANNEL  # (and the residual when there is one)

GROUP_NORM = Op(
    name="group_norm",
    make_case=gn_make_case,
    entry_points=(
        EntryPoint("forward", _gn_forward, (_Y,) + _STATS_OUT, _exp_gn_forward, reads=("x",) + _PER_CHANNEL,
                   out=("x",), batch=True, large=True),
        EntryPoint("functional", _gn_functional, (_Y,), lambda c: (_exp_gn_y(c)[0],), reads=("x",) + _PER_CHANNEL,
                   out=("x",), batch=True),
        EntryPoint("backward", _gn_backward, _GRADS, _exp_gn_backward, reads=_GN_BWD_READS, out=("x", "grad_out"),
                   large=True, names=_GN_BWD_NAMES),
        EntryPoint("layer_forward", _gn_layer_forward, (_Y,), lambda c: (_exp_gn_y(c)[0],),
                   reads=("x",) + _PER_CHANNEL, out=("x",), batch=True, names=_LAYER_NAMES),
        EntryPoint("layer_backward", _layer_backward, _GRADS, _exp_gn_layer_backward, reads=("grad_out",),
                   out=("x", "grad_out"), batch=True, prepare=_gn_layer_prepare),
        # a fused epilogue (as batch norm's entries)
        EntryPoint("functional_relu_residual", _gn_epilogue("relu", True), (_Y,),
                   _exp_epilogue(lambda c: (_exp_gn_y(c)[0],), "relu", True), reads=("x", "residual") + _PER_CHANNEL,
                   out=("x",), batch=True),
        EntryPoint("functional_silu", _gn_epilogue("silu", False), (_Y,),
                   _exp_epilogue(lambda c: (_exp_gn_y(c)[0],), "silu", False), reads=("x",) + _PER_CHANNEL,
                   out=("x",), batch=True),
        EntryPoint("functional_leaky_relu_residual", _gn_epilogue(LEAKY, True), (_Y,),
                   _exp_epilogue(lambda c: (_exp_gn_y(c)[0],), LEAKY, True), reads=("x", "residual") + _PER_CHANNEL,
                   out=("x",), batch=True),
        # backward through fused epilogues (silu with a residual, relu without)
        EntryPoint("backward_silu_residual", _gn_epi_backward("silu", True), _GRADS + (_GRAD_RES,),
                   _exp_gn_epi_backward("silu", True), reads=_GN_EPI_BWD_READS + ("residual",),
                   out=("x", "grad_out"), large=True, names=_STATS64_NAMES, carry=_gn_epi_carry),
        EntryPoint("backward_relu", _gn_epi_backward("relu", False), _GRADS + (_GRAD_RES,),
                   _exp_gn_epi_backward("relu", False), reads=_GN_EPI_BWD_READS,
                   out=("x", "grad_out"), names=_STATS64_NAMES),
        EntryPoint("backward_clamp_residual", _gn_epi_backward(CLAMP, True), _GRADS + (_GRAD_RES,),
                   _exp_gn_epi_backward(CLAMP, True), reads=_GN_EPI_BWD_READS + ("residual",),
                   out=("x", "grad_out"), names=_STATS64_NAMES),
    ),
    layouts=BN_LAYOUTS,
    store=_store,
    load=_load,
    ranks=(2, 3, 4, 5),
    dtypes=(np.dtype(np.float32), np.dtype(np.float64), HALF),
    args=_GN_ARGS,
    state=(),
    tolerance=bounds.tolerance,
    groups=_gn_groups,
    take=_gn_take,
    restrict=_gn_restrict,
    stats_by_layout=True,
)

INSTANCE_NORM = Op(
    name="instance_norm",
    make_case=in_make_case,
    entry_points=(
        EntryPoint("forward", _in_forward, (_Y,) + _STATS_OUT, _exp_gn_forward, reads=("x",) + _PER_CHANNEL,
                   out=("x",), batch=True, large=True),
        EntryPoint("train", _in_train, (_Y,) + _RUNNING, _exp_in_train,
                   reads=("x", "running_mean", "running_var") + _PER_CHANNEL, writes=_RUNNING_STATS, out=("x",),
                   batch=True),
        EntryPoint("eval", _in_eval, (_Y,), _exp_in_eval, reads=("x", "running_mean", "running_var") + _PER_CHANNEL,
                   out=("x",), needs=_RUNNING_STATS),
        EntryPoint("backward", _in_backward, _GRADS, _exp_gn_backward, reads=_GN_BWD_READS, out=("x", "grad_out"),
                   large=True, names=_GN_BWD_NAMES),
        EntryPoint("layer_forward", _in_layer_forward, (_Y,) + _RUNNING, _exp_in_train,
                   reads=("x", "running_mean", "running_var") + _PER_CHANNEL, writes=_RUNNING_STATS, out=("x",),
                   batch=True, names=_LAYER_NAMES, ranks=_IN_LAYER_RANKS),
        EntryPoint("layer_backward", _layer_backward, _GRADS, _exp_gn_layer_backward, reads=("grad_out",),
                   out=("x", "grad_out"), batch=True, prepare=_in_layer_prepare(True)),
        EntryPoint("layer_eval_forward", _in_layer_eval_forward, (_Y,), _exp_in_eval,
                   reads=("x", "running_mean", "running_var") + _PER_CHANNEL, out=("x",), needs=_RUNNING_STATS,
                   names=_LAYER_NAMES, ranks=_IN_LAYER_RANKS),
        EntryPoint("layer_eval_backward", _layer_backward, _GRADS, _exp_in_eval_backward, reads=("grad_out",),
                   out=("x", "grad_out"), needs=_RUNNING_STATS, prepare=_in_layer_prepare(False)),
        # backward through a fused epilogue (relu with a residual)
        EntryPoint("backward_relu_residual", _gn_epi_backward("relu", True, instance=True), _GRADS + (_GRAD_RES,),
                   _exp_gn_epi_backward("relu", True), reads=_GN_EPI_BWD_READS + ("residual",),
                   out=("x", "grad_out"), names=_STATS64_NAMES),
        EntryPoint("backward_leaky_relu", _gn_epi_backward(LEAKY, False, instance=True), _GRADS + (_GRAD_RES,),
                   _exp_gn_epi_backward(LEAKY, False), reads=_GN_EPI_BWD_READS, out=("x", "grad_out"),
                   names=_STATS64_NAMES),
        # fused epilogues in the forward: training (running statistics updated) and eval
        EntryPoint("train_silu_residual", _in_epilogue(True, "silu", True), (_Y,) + _RUNNING,
                   _exp_epilogue(_exp_in_train, "silu", True),
                   reads=("x", "running_mean", "running_var", "residual") + _PER_CHANNEL, writes=_RUNNING_STATS,
                   out=("x",), batch=True),
        EntryPoint("eval_relu6", _in_epilogue(False, "relu6", False), (_Y,),
                   _exp_epilogue(_exp_in_eval, "relu6", False),
                   reads=("x", "running_mean", "running_var") + _PER_CHANNEL, out=("x",), needs=_RUNNING_STATS),
    ),
    layouts=BN_LAYOUTS,
    store=_store,
    load=_load,
    ranks=(3, 4, 5),
    dtypes=(np.dtype(np.float32), np.dtype(np.float64), HALF),
    args=_GN_ARGS,
    state=("running_mean", "running_var"),
    tolerance=bounds.tolerance,
    groups=_gn_groups,
    take=_gn_take,
    restrict=_gn_restrict,
    stats_by_layout=True,
)


# ================================================================================================================
# Layer normalization and RMS normalization over the channels
# ================================================================================================================
# The logical shape is (N, C, *spatial), normalised over C at every (sample, position): layout "NCHW" calls the
# channels-first form (layout="NCHW", ConvNeXt's LayerNorm2d), "NHWC" the trailing-dims form on the channels-last
# array (normalized_shape = C), so the layouts suite compares the two kernels' families. The saved statistics
# (GROUP kind) are stored as the library returns them for the layout ((N, 1, *spatial) or (N, *spatial, 1)); the
# entry points return them as (N, S), the same in either layout (RMS norm's too).
# Every position depends on all the channels, and the parameter gradients on all the positions: one slice.

import rownorm_oracle as rno  # noqa: E402  (the oracle of these two ops)

LN_LAYOUTS = BN_LAYOUTS
RMS_LAYOUTS = BN_LAYOUTS


def _ln_stat_shape(shape, layout):
    """The saved statistics' shape in the library for logical shape (N, C, *spatial) stored in `layout`."""
    return (shape[0], 1) + tuple(shape[2:]) if BN_LAYOUTS[layout] == "NCHW" else (shape[0],) + tuple(shape[2:]) + (1,)


def _rows(c, name="x"):
    """A DATA array of the case as float64 rows (N S, C)."""
    return _rows_of(c, c[name])


def _rows_of(c, a):
    """An array stored as the case's x, as float64 rows (N S, C)."""
    return rno.to_rows(c.canonical(a), 1, channels_first=True)


def _from_rows(c, r):
    """Rows (N S, C) as a DATA array stored in the case's layout."""
    return c.op.store(rno.from_rows(r, c.shape, channels_first=True), c.layout)


def _rownorm_case(op, rms, rng, shape, layout, dtype, loc, scale, affine, param_dtype, eps):
    dtype = np.dtype(dtype)
    pdt = np.dtype(param_dtype or dtype)
    C = shape[1]
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 2.0, C) * rng.choice([-1.0, 1.0], C)
    b = rng.standard_normal(C)
    rows = rno.to_rows(x, 1, channels_first=True)
    with np.errstate(all="ignore"):
        _, _, mean, rstd = rno.forward(rows, None, None, eps, rms)
    st = _ln_stat_shape(shape, layout)
    arrays = dict(x=_store(x, layout), grad_out=_store(dy, layout), weight=w.astype(pdt) if affine else None,
                  bias=b.astype(pdt) if affine and not rms else None, save_mean=mean.astype(dtype).reshape(st),
                  save_rstd=rstd.astype(dtype).reshape(st), stats_mean=mean.reshape(st), stats_rstd=rstd.reshape(st))
    # (drawn last: the arrays above keep the values they had before the fused epilogues' entry points)
    arrays["residual"] = _store(rng.standard_normal(shape).astype(dtype), layout)
    return Case(op, shape, layout, dtype, arrays, dict(eps=eps), C)


def ln_make_case(rng, shape, layout="NCHW", dtype=np.float32, *, loc=0.0, scale=1.0, affine=True, param_dtype=None,
                 eps=1e-5, **ignored):
    """Layer norm's arguments for x of logical shape (N, C, *spatial) stored in `layout`: x ~ loc + scale N(0, 1),
    grad_out ~ N(0, 1) in dtype; weight, bias (C,) in param_dtype (None without affine); save_mean, save_rstd the
    positions' statistics in dtype, shaped as the library returns them, and stats_mean, stats_rstd the same in float64
    (a fused epilogue's save_stats); residual ~ N(0, 1) in dtype. (Other suites' options: ignored.)"""
    return _rownorm_case(LAYER_NORM, False, rng, shape, layout, dtype, loc, scale, affine, param_dtype, eps)


def rms_make_case(rng, shape, layout="NCHW", dtype=np.float32, *, loc=0.0, scale=1.0, affine=True, param_dtype=None,
                  eps=1e-5, **ignored):
    """RMS norm's arguments, as layer norm's (no bias; save_mean unused)."""
    return _rownorm_case(RMS_NORM, True, rng, shape, layout, dtype, loc, scale, affine, param_dtype, eps)


def _rms_of(c):
    return c.op is RMS_NORM


def _ns_stats(c, a):
    """A saved statistic returned by the library, as (N, S)."""
    return None if a is None else a.reshape(c.shape[0], math.prod(c.shape[2:]))


def _exp_rn_forward(c):
    rms, x = _rms_of(c), _rows(c)
    with np.errstate(all="ignore"):
        y, xhat, mean, rstd = rno.forward(x, c["weight"], c["bias"], c["eps"], rms)
        bound = rno.forward_bound(x, xhat, rstd, c.dtype, c["weight"], c["bias"], rms)
        t = bounds.stat_tol(c.n, c.dtype)
        sd = np.sqrt(np.abs(1.0 / rstd ** 2 - c["eps"]))
    ns = (c.shape[0], math.prod(c.shape[2:]))
    ye = Expected(_from_rows(c, y), _from_rows(c, bound), c.dtype)
    se = Expected(rstd.reshape(ns), (4 * t * np.abs(rstd)).reshape(ns), c.dtype)
    if rms:
        return ye, se
    return ye, Expected(mean.reshape(ns), (t * (np.abs(mean) + sd)).reshape(ns), c.dtype), se


def _exp_rn_grads(c, mean, rstd, gdtype, extra=False, dy=None):
    """dy: the case's grad_out unless given (float64 rows)."""
    rms, x, dy = _rms_of(c), _rows(c), (_rows(c, "grad_out") if dy is None else dy)
    with np.errstate(all="ignore"):
        (dx, dw, db), mags = rno.backward(dy, x, mean, rstd, c["weight"], rms)
        bx, bw, bb = rno.backward_bound(mags, dw, db, c.dtype, x.shape[1], x.shape[0], coarser(gdtype, c.dtype))
        if extra and x.size:  # the layer's own float64 statistics err too (see _exp_gn_layer_backward)
            rt = c.tol.reduction
            s = np.abs(np.asarray(rstd, np.float64)).reshape(-1, 1)
            xh = np.abs(x - (0.0 if rms else np.asarray(mean, np.float64).reshape(-1, 1))) * s
            cond = np.abs(x).mean(axis=1, keepdims=True) * s
            wdy = np.abs(dy * rno._param(c["weight"], x.shape[1], 1.0))
            M = x.shape[1]
            A, B = wdy.sum(axis=1, keepdims=True), (wdy * xh).sum(axis=1, keepdims=True)
            e = rt * (2.0 * xh + cond)
            eB = (wdy * e).sum(axis=1, keepdims=True)
            # (nan_to_num: an RMS row with an infinite value has rstd 0, and inf * 0 in these magnitudes)
            bx = bx + np.nan_to_num(s * (2.0 * rt * (wdy + A / M + xh * B / M) + e * B / M + xh * eB / M))
            bw = bw + np.nan_to_num(np.abs(dy) * e).sum(axis=0)
    gx = Expected(_from_rows(c, dx), _from_rows(c, bx), c.dtype)
    gw = Expected(dw, bw, gdtype) if c["weight"] is not None else None
    if rms:
        return gx, gw
    return gx, gw, (Expected(db, bb, gdtype) if c["bias"] is not None else None)


def _exp_rn_backward(c):
    rstd = _f64(c["save_rstd"]).reshape(-1)
    mean = None if _rms_of(c) else _f64(c["save_mean"]).reshape(-1)
    return _exp_rn_grads(c, mean, rstd, _gdtype(c))


def _exp_rn_layer_backward(c):
    x = _rows(c)
    with np.errstate(all="ignore"):
        _, _, mean, rstd = rno.forward(x, None, None, c["eps"], _rms_of(c))
    g = _exp_rn_grads(c, mean, rstd, _gdtype(c), extra=True)
    if _rms_of(c):
        return g + (None,)
    return g


def _rn_stats64(c):
    """The case's float64 (mean or None for RMS norm, rstd) per row."""
    return None if _rms_of(c) else _f64(c["stats_mean"]).reshape(-1), _f64(c["stats_rstd"]).reshape(-1)


def _rn_epi_carry(c, err):
    """How far (grad_x, grad_weight[, grad_bias]) move when du moves by err, with the case's statistics."""
    rms = _rms_of(c)
    cx, cw, cb = rno.backward_carry(_rows_of(c, err), _rows(c), *_rn_stats64(c), c["weight"], rms)
    return (_from_rows(c, cx), cw) + (() if rms else (cb,))


def _exp_rn_epi_backward(act, residual):
    """Through a fused epilogue (as batch norm's _exp_epi_backward) with the case's float64 statistics."""
    def expect(c):
        rms, x = _rms_of(c), _rows(c)
        mean, rstd = _rn_stats64(c)
        with np.errstate(all="ignore"):
            y, xhat = rno.normalize(x, mean, rstd, c["weight"], c["bias"], rms)
            bound = rno.forward_bound(x, xhat, rstd, c.dtype, c["weight"], c["bias"], rms, batch_stats=False)
        du, err = _epi_du(c, Expected(_from_rows(c, y), _from_rows(c, bound), c.dtype), act, residual)
        grads = _exp_rn_grads(c, mean, rstd, _gdtype(c), dy=_rows_of(c, du))
        return _epi_grads(c, grads, _rn_epi_carry(c, err), du, err, residual)
    return expect


def _ln_lib_layout(c):
    return c.layout_arg


def _rn_forward(c, out, ctx):
    if _rms_of(c):
        y, s = bn_simd.rms_norm_forward(c["x"], c.shape[1], c["weight"], eps=c["eps"], out=out,
                                        layout=_ln_lib_layout(c))
        return y, _ns_stats(c, s)
    y, m, s = bn_simd.layer_norm_forward(c["x"], c.shape[1], c["weight"], c["bias"], eps=c["eps"], out=out,
                                         layout=_ln_lib_layout(c))
    return y, _ns_stats(c, m), _ns_stats(c, s)


def _rn_functional(c, out, ctx):
    if _rms_of(c):
        return (bn_simd.rms_norm(c["x"], c.shape[1], c["weight"], c["eps"], out=out, layout=_ln_lib_layout(c)),)
    return (bn_simd.layer_norm(c["x"], c.shape[1], c["weight"], c["bias"], c["eps"], out=out,
                               layout=_ln_lib_layout(c)),)


def _rn_epilogue(act, residual):
    def call(c, out, ctx):
        kw = dict(out=out, layout=_ln_lib_layout(c), activation=act, residual=c["residual"] if residual else None)
        if _rms_of(c):
            return (bn_simd.rms_norm(c["x"], c.shape[1], c["weight"], c["eps"], **kw),)
        return (bn_simd.layer_norm(c["x"], c.shape[1], c["weight"], c["bias"], c["eps"], **kw),)
    return call


def _rn_backward(c, out, ctx):
    if _rms_of(c):
        return bn_simd.rms_norm_backward(c["grad_out"], c["x"], c["save_rstd"], c.shape[1], c["weight"], out=out,
                                         layout=_ln_lib_layout(c))
    return bn_simd.layer_norm_backward(c["grad_out"], c["x"], c["save_mean"], c["save_rstd"], c.shape[1],
                                       c["weight"], c["bias"], out=out, layout=_ln_lib_layout(c))


def _rn_epi_backward(act, residual):
    def call(c, out, ctx):
        res = c["residual"] if residual else None
        if _rms_of(c):
            return bn_simd.rms_norm_backward(c["grad_out"], c["x"], None, c.shape[1], c["weight"], out=out,
                                             layout=_ln_lib_layout(c),
                                             activation=act, residual=res, save_stats=(c["stats_rstd"],))
        return bn_simd.layer_norm_backward(c["grad_out"], c["x"], None, None, c.shape[1], c["weight"], c["bias"],
                                           out=out, layout=_ln_lib_layout(c), activation=act, residual=res,
                                           save_stats=(c["stats_mean"], c["stats_rstd"]))
    return call


def _rn_layer(c):
    affine = c["weight"] is not None
    if _rms_of(c):
        layer = bn_simd.RMSNorm(c.shape[1], eps=c["eps"], elementwise_affine=affine, dtype=_layer_dtype(c),
                                layout=_ln_lib_layout(c))
    else:
        layer = bn_simd.LayerNorm(c.shape[1], eps=c["eps"], elementwise_affine=affine, dtype=_layer_dtype(c),
                                  layout=_ln_lib_layout(c))
    if affine:  # (the case's arrays themselves: a refused call is seen to leave them as they were)
        layer.weight, layer.bias = c["weight"], c["bias"]
    return layer


def _rn_layer_forward(c, out, ctx):
    return (_rn_layer(c)(c["x"], out=out),)


def _rn_layer_prepare(c):
    layer = _rn_layer(c)
    layer(c["x"])
    return layer


def _rn_layer_backward(c, out, ctx):
    gx = ctx.backward(c["grad_out"], out=out)
    return gx, ctx.grad_weight, ctx.grad_bias


def _rn_groups(c):
    return 1


def _rn_take(c, a, kind, which):
    return a


def _rn_restrict(c, which):
    return c


_RN_NAMES = {"save_mean": r"\bmean\b", "save_rstd": r"\brstd\b"}  # (the API's names)
_RN_STATS64_NAMES = {"stats_mean": r"save_stats\[0\] \(mean\)", "stats_rstd": r"save_stats\[\d\] \(rstd\)"}
_RN_ARGS = dict(x=DATA, grad_out=DATA, weight=CHANNEL, bias=CHANNEL, save_mean=GROUP, save_rstd=GROUP, residual=DATA,
                stats_mean=GROUP, stats_rstd=GROUP)
_LN_STATS = (Output("save_mean", GROUP), Output("save_rstd", GROUP))


def _rownorm_op(name, make_case, rms, layouts):
    grads = _GRADS if not rms else (Output("grad_x"), Output("grad_weight", CHANNEL))
    params = ("weight",) if rms else _PER_CHANNEL
    stats = (Output("save_rstd", GROUP),) if rms else _LN_STATS
    bwd_reads = ("grad_out", "x") + (() if rms else ("save_mean",)) + ("save_rstd",) + params
    epi_reads = ("grad_out", "x") + (() if rms else ("stats_mean",)) + ("stats_rstd",) + params
    anyrank = tuple(range(1, 9))  # (any rank that ends in normalized_shape; the suites' bad ranks: 0 and 9)
    return Op(
        name=name,
        make_case=make_case,
        entry_points=(
            EntryPoint("forward", _rn_forward, (_Y,) + stats, _exp_rn_forward, reads=("x",) + params, out=("x",),
                       large=True, ranks=anyrank),
            EntryPoint("functional", _rn_functional, (_Y,), lambda c: (_exp_rn_forward(c)[0],),
                       reads=("x",) + params, out=("x",), ranks=anyrank),
            EntryPoint("backward", _rn_backward, grads, _exp_rn_backward, reads=bwd_reads, out=("x", "grad_out"),
                       large=True, names=_RN_NAMES, ranks=anyrank),
            EntryPoint("layer_forward", _rn_layer_forward, (_Y,), lambda c: (_exp_rn_forward(c)[0],),
                       reads=("x",) + params, out=("x",), ranks=anyrank),
            EntryPoint("layer_backward", _rn_layer_backward, _GRADS, _exp_rn_layer_backward, reads=("grad_out",),
                       out=("x", "grad_out"), prepare=_rn_layer_prepare),
            # a fused epilogue (as batch norm's entries)
            EntryPoint("functional_silu_residual", _rn_epilogue("silu", True), (_Y,),
                       _exp_epilogue(lambda c: (_exp_rn_forward(c)[0],), "silu", True),
                       reads=("x", "residual") + params, out=("x",), ranks=anyrank),
            EntryPoint("functional_relu", _rn_epilogue("relu", False), (_Y,),
                       _exp_epilogue(lambda c: (_exp_rn_forward(c)[0],), "relu", False),
                       reads=("x",) + params, out=("x",), ranks=anyrank),
            EntryPoint("functional_clamp_residual", _rn_epilogue(CLAMP, True), (_Y,),
                       _exp_epilogue(lambda c: (_exp_rn_forward(c)[0],), CLAMP, True),
                       reads=("x", "residual") + params, out=("x",), ranks=anyrank),
            # backward through fused epilogues (silu and relu, with a residual)
            EntryPoint("backward_silu_residual", _rn_epi_backward("silu", True), grads + (_GRAD_RES,),
                       _exp_rn_epi_backward("silu", True), reads=epi_reads + ("residual",), out=("x", "grad_out"),
                       large=True, names=_RN_STATS64_NAMES, ranks=anyrank, carry=_rn_epi_carry),
            EntryPoint("backward_relu_residual", _rn_epi_backward("relu", True), grads + (_GRAD_RES,),
                       _exp_rn_epi_backward("relu", True), reads=epi_reads + ("residual",), out=("x", "grad_out"),
                       names=_RN_STATS64_NAMES, ranks=anyrank),
            EntryPoint("backward_leaky_relu", _rn_epi_backward(LEAKY, False), grads + (_GRAD_RES,),
                       _exp_rn_epi_backward(LEAKY, False), reads=epi_reads, out=("x", "grad_out"),
                       names=_RN_STATS64_NAMES, ranks=anyrank),
            EntryPoint("backward_clamp_residual", _rn_epi_backward(CLAMP, True), grads + (_GRAD_RES,),
                       _exp_rn_epi_backward(CLAMP, True), reads=epi_reads + ("residual",), out=("x", "grad_out"),
                       names=_RN_STATS64_NAMES, ranks=anyrank),
        ),
        layouts=layouts,
        store=_store,
        load=_load,
        ranks=(2, 3, 4, 5),
        dtypes=(np.dtype(np.float32), np.dtype(np.float64), HALF),
        args=_RN_ARGS if not rms else {k: v for k, v in _RN_ARGS.items() if k not in ("bias", "save_mean",
                                                                                     "stats_mean")},
        state=(),
        tolerance=bounds.tolerance,
        groups=_rn_groups,
        take=_rn_take,
        restrict=_rn_restrict,
        stats_by_layout=True,  # (channels-first sums a position's channels across rows, the trailing form along one)
    )


LAYER_NORM = _rownorm_op("layer_norm", ln_make_case, False, LN_LAYOUTS)
RMS_NORM = _rownorm_op("rms_norm", rms_make_case, True, RMS_LAYOUTS)

OPS = [BATCH_NORM, GROUP_NORM, INSTANCE_NORM, LAYER_NORM, RMS_NORM]
