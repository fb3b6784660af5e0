"""Small cases for running every entry point of every registered op under valgrind's memcheck (see .ci/valgrind).

The ops and their entry points come from the test registry (tests/ops.py; for batch norm: batch_norm in training and
eval mode, batch_norm_forward, batch_norm_backward in training and eval mode, batch_stats, normalize,
backward_reduce, backward_apply, the internal apply kernel, a layer's forward and backward in both modes, its
state_dict round trip, and the forward and the backward through fused epilogues). Each runs on small odd shapes
around the vector widths, in every layout, on each ISA given (default: scalar and avx2, the ones valgrind can
emulate; it has no AVX-512): float32 on 1 thread for the ISAs before the last; for the last, both dtypes and the
16-bit ones on 1 thread, and on 2 threads (the drivers' thread splits, the threaded shapes and the large cases are
the same code on every ISA, and the streaming stores the large cases exist for are the vector ISAs'; running them
once keeps the step within CI's time; the ASan step runs every ISA's kernels on the whole suite). On the last ISA's
1 thread each float32 call is made again under the layout's alias ("channels_first", "channels_last"), and, for an
entry point with out=, in place over each input it may overwrite: these must give the bytes of the plain call.
Larger cases make the kernels actually fork threads (more than 32768 elements) and split rows into pieces, and the
largest run the entry points marked large with streaming stores (element-wise sweeps beyond the streaming threshold,
lowered here so that they stay small).

16-bit data (float16, and bfloat16 when ml_dtypes is installed) runs the functional entry points on a few small
shapes, on 1 thread.

Every plain call's outputs are compared with the registry's float64 oracle (tests/oracle.py) within the registry's
bounds; the largest ones on their last slice (for batch norm: channel; where the blocks, rows and vectors end), and
checked finite throughout. Memcheck reports an
uninitialised value only where it decides a branch or leaves the process, so these comparisons (and the finiteness
check, which branches on every element) are what make an output element that a kernel failed to write show up as an
error.

    python .ci/valgrind_cases.py [--entries=NAME,...] [ISA ...]    # one line per ISA and a closing summary line

--entries runs only the entry points of those names (of every op that has them), e.g.
--entries=backward_silu_residual,backward_relu,backward_eval_relu,backward_relu_residual for the backward through
the fused epilogues. A name that no entry point run here has is an error (exit status 2, the valid names listed), and
so is an ISA on which no call was made (exit status 1).
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import bn_simd  # noqa: E402
import half_cases  # noqa: E402
import ops  # noqa: E402
from bn_simd import _core  # noqa: E402

# logical shapes (the canonical layout's: (N, C, *spatial) for the channel ops)
SMALL = [
    (5, 3),             # (N, C): channels-last kernels in both layouts
    (4, 7, 9),          # C one below an AVX2 float vector, inner one past
    (3, 9, 17),         # one past a vector, one past two
    (2, 17, 3, 11),     # inner 33: four-vector loop plus a tail
    (2, 3, 2, 3, 7),    # rank 5
    (3, 1, 37),         # one channel: a single long run
    (6, 33, 1, 1),      # inner 1 in NCHW: the channels-last path
    (0, 4, 3),          # empty batch
]
# more than 32768 elements, so that a second thread really runs
THREADED = [
    (4, 33, 17, 17),    # NCHW: channel blocks with a partial last block; NHWC: odd C
    (2, 300, 9, 7),     # NHWC: more channels than one accumulator block (256)
]
# The element-wise sweeps write with streaming stores beyond bn_simd._core.stream_bytes() (32 MiB by default); here
# the threshold is lowered to STREAM_BYTES, so that these cases, small enough for memcheck's pace, take the streamed
# paths: (shape, layout, dtype), each sweep over more than STREAM_BYTES, and more than 32768 elements so that both
# threads run. NCHW rows are longer than a statistics chunk (32 KiB: row pieces with a short last one); NHWC has an
# odd channel count.
STREAM_BYTES = 1 << 16
LARGE = [
    ((2, 2, 7, 3511), "NCHW", np.float32),     # rows of 24577: three chunks and a short piece
    ((6, 128, 7, 7), "NCHW", np.float32),      # 7x7 maps: streamed vectors straddling two channels (blended)
    ((2, 3, 5, 1229), "NCHW", np.float64),     # rows of 6145 doubles: past a chunk
    ((8, 7, 31, 25), "NHWC", np.float32),
    ((4, 7, 33, 37), "NHWC", np.float64),
    ((2, 1296, 4, 4), "NHWC", np.float32),     # wide rows: element-wise sweeps in column strips, streamed
    ((3, 616, 5, 5), "NHWC", np.float64),
]
DTYPES = (np.float32, np.float64)
# 16-bit data (float16; bfloat16 when ml_dtypes is installed): the functional entry points (tests/half_cases.py) on
# a few shapes around the vector widths, both layouts, one thread: the 16-bit loads, stores and masked tails.
HALF_SMALL = [
    (4, 7, 9),          # C one below a float vector, inner one past
    (2, 17, 3, 11),     # inner 33: four-vector loop plus a tail
    (6, 33, 1, 1),      # inner 1 in NCHW: the channels-last path
]


def half_dtypes():
    try:
        import ml_dtypes
    except ImportError:
        return (half_cases.F16,)
    return (half_cases.F16, np.dtype(ml_dtypes.bfloat16))


def alias_of(op, layout):
    """Another name of the same layout (the canonical one when it has none)."""
    return next((k for k, v in op.layouts.items() if v == layout and k != layout), layout)


def same_bits(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# The entry points run under memcheck for the ops after batch norm: those that reach C code of their own (group
# norm's forward and backward drivers; instance norm's running statistics and its backward). Their functional
# variants and layers call the same C functions as these (the whole suite checks them, and the ASan step runs
# them all), and memcheck's time grows with every call.
# (The backward through a fused epilogue has drivers of its own: group norm's with silu and a residual, and with relu;
# instance norm's, the same driver with one channel per group, once.)
KERNEL_ENTRIES = {"group_norm": ("forward", "backward", "backward_silu_residual", "backward_relu"),
                  "instance_norm": ("train", "eval", "backward", "backward_relu_residual")}
SELECTED = None  # the entry point names of --entries (None: all)


def selected(op, ep):
    keep = KERNEL_ENTRIES.get(op.name)
    return (keep is None or ep.name in keep) and (SELECTED is None or ep.name in SELECTED)


def entry_points(op):
    return [ep for ep in op.entry_points if selected(op, ep)]


def run_case(op, shape, layout, dtype, seed, variants):
    """Every entry point of op on one case against the oracle; with variants, each also under the layout's alias and
    with out= in place over each input it may overwrite, which must give the same bytes. Returns the calls made."""
    case = op.case(seed, shape, layout, dtype, loc=0.5, scale=1.5)
    calls = 0
    for ep in entry_points(op):
        if not ep.applies(case):
            continue
        got = ep(case.fresh())
        ops.check(ep, case, got)
        calls += 1
        if not variants:
            continue
        runs = {"the layout's alias": ep(case.named(alias_of(op, case.layout)).fresh())}
        for alias in ep.out or ():
            c = case.fresh()
            c = c.replace(**{alias: case[alias].copy()})
            runs[f"out={alias}"] = r = ep(c, out=c[alias])
            if r[ep.outputs[0].name] is not c[alias]:
                raise AssertionError(f"{case} {ep.name}: out={alias} was not returned")
        for how, r in runs.items():
            for k, v in r.items():
                if not same_bits(v, got[k]):
                    raise AssertionError(f"{case} {ep.name}.{k} with {how}: not the bytes of the plain call")
        calls += len(runs)
    return calls


def run_half(op, shape, layout, dtype, seed):
    """The functional entry points of op on 16-bit data against the oracle. Returns the calls made."""
    case = half_cases.case(op, seed, shape, layout, dtype)
    calls = 0
    for ep in half_cases.entries(op, case):
        if selected(op, ep):
            half_cases.check(ep, case, ep(case.fresh()))
            calls += 1
    return calls


def run_large(op, shape, layout, dtype, seed):
    """The entry points marked large on a large case: every output element finite, and the last slice against the
    oracle. Returns the number of calls made."""
    case = op.case(seed, shape, layout, dtype, loc=0.5, scale=1.5)
    calls = 0
    for ep in entry_points(op):
        if not (ep.large and ep.applies(case)):
            continue
        got = ep(case.fresh())
        for k, v in got.items():
            if v is not None and not np.isfinite(v).all():
                raise AssertionError(f"{case} {ep.name}.{k}: non-finite values")
        ops.check(ep, case, got, groups=ops.edge_groups(case, first=False))
        calls += 1
    return calls


def parse_entries(value):
    """The set of names of --entries=value; SystemExit (status 2) naming any that no entry point run here has."""
    names = set(value.split(","))
    known = {ep.name for op in ops.OPS for ep in entry_points(op)}
    unknown = sorted(names - known)
    if unknown:
        print(f"valgrind_cases: --entries: no entry point run here is named {', '.join(map(repr, unknown))}; "
              f"the names are: {', '.join(sorted(known))}", file=sys.stderr)
        raise SystemExit(2)
    return names


def main(argv):
    global SELECTED
    for a in [a for a in argv if a.startswith("--entries=")]:
        SELECTED = parse_entries(a.split("=", 1)[1])
        argv = [b for b in argv if b != a]
    supported = bn_simd.show_config()["supported_isas"]
    isas = argv or [i for i in ("scalar", "avx2") if i in supported]
    threads = (1, 2) if bn_simd.show_config()["openmp"] else (1,)
    # Wide channels-last rows go in column strips from 24 KiB of row (the default on CPUs other than Intel's,
    # which sweep them flat like every narrow row): forced here so that the strips run under memcheck too.
    _core.set_cl_strip_bytes(24576)
    # Channels-first training forward and backward group channels in L2 (the slab path) on some CPUs and take two
    # sweeps on others: the slab path is forced here (the budget of half a 2 MiB L2), so that it runs under memcheck
    # on every CPU; the sweeps run anyway (the separate steps, in-place calls, slabs too large for the budget).
    _core.set_slab_bytes(1 << 20)
    _core.set_stream_bytes(STREAM_BYTES)
    total_cases = total_calls = 0
    idle = []  # the ISAs on which no call was made (an --entries selection that runs nothing there)
    for isa in isas:
        bn_simd.set_isa(isa)
        t0 = time.perf_counter()
        cases = calls = 0
        for op in ops.OPS:
            t_op = time.perf_counter()
            last = isa == isas[-1]
            for nt in threads if last else (1,):
                bn_simd.set_num_threads(nt)
                shapes = SMALL + THREADED if nt > 1 else SMALL
                # the ISAs before the last: float32 alone, without the variants (the layout's aliases and out= in
                # place reach the kernels as the plain calls do; float64 is the same C source as float32 there)
                for dtype in DTYPES if last else DTYPES[:1]:
                    for layout in dict.fromkeys(op.layouts.values()):
                        for k, shape in enumerate(shapes):
                            if op.supports(shape, layout, dtype):
                                # on one thread of the last ISA, float32: also the layout's alias and out= in place
                                calls += run_case(op, shape, layout, dtype, 1000 * nt + k,
                                                  variants=nt == 1 and last and dtype == np.float32)
                                cases += 1
                if nt == 1 and last:
                    for dtype in half_dtypes():
                        for layout in dict.fromkeys(op.layouts.values()):
                            for k, shape in enumerate(HALF_SMALL):
                                if half_cases.supports(op, shape, layout):
                                    calls += run_half(op, shape, layout, dtype, 2000 + k)
                                    cases += 1
                if nt > 1:
                    for k, (shape, layout, dtype) in enumerate(LARGE):
                        if op.supports(shape, layout, dtype):
                            calls += run_large(op, shape, layout, dtype, seed=7 + k)
                            cases += 1
            print(f"valgrind_cases:   {isa} {op.name}: {time.perf_counter() - t_op:.1f} s", flush=True)
        bn_simd.set_num_threads(None)
        print(f"valgrind_cases: isa={isa} threads={threads if isa == isas[-1] else (1,)} "
              f"ops={','.join(op.name for op in ops.OPS)} cases={cases} "
              f"calls={calls} ({time.perf_counter() - t0:.1f} s)", flush=True)
        total_cases += cases
        total_calls += calls
        if calls == 0:
            idle.append(isa)
    if idle:
        print(f"valgrind_cases: FAILED: no call was made on {', '.join(idle)} (--entries: "
              f"{', '.join(sorted(SELECTED or ())) or 'all'})", file=sys.stderr)
        return 1
    print(f"valgrind_cases: {total_cases} passed, 0 failed ({total_calls} calls, isas {', '.join(isas)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
