"""Per-call overhead: tiny calls of every public entry point, where argument checks and the bridge to C are most of
the time.

    python benchmarks/call_overhead.py [--against DIR [--other-first]] [--rounds 41] [--calls 400] [--only TEXT ...]
                                       [--json FILE]

Each case is a call on a few elements (1x8x1x1 or 2x8 float32, the group and instance norms on 2x8x2 and 2x8x3),
made ``--calls`` times in a row; a round times that loop once per build, the builds taking turns (the order
alternating from round to round), and a cell is the median over ``--rounds`` rounds of the time per call.

``--against DIR`` also loads the package built in DIR (a checkout built in place, e.g. an older commit's
``git worktree``: DIR holds its ``bn_simd/``) under another name in the same process and times it beside the
checkout's, case by case, with the ratio checkout / DIR in the last column. Cases the other build lacks are left
blank there. The library loaded second can come out a few percent slower whichever it is: ``--other-first`` swaps
the order, and a fair ratio is the geometric mean of the two orders' (docs/tuning.md, "How the figures were
taken"). One thread (``set_num_threads(1)``) in both: a tiny call runs on one anyway.
"""
import argparse
import functools
import gc
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_package(pkg_dir, name):
    """The package in pkg_dir (a directory with __init__.py), imported as `name` (its modules as name.*)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(pkg_dir, "__init__.py"),
                                                  submodule_search_locations=[pkg_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    # a Cython extension also enters itself under the name it was compiled with (bn_simd._core) when that is free:
    # take those entries out, so that the checkout's package, imported later, loads its own
    for key, mod in list(sys.modules.items()):
        if key.startswith("bn_simd.") and getattr(mod, "__name__", "").startswith(name + "."):
            del sys.modules[key]
    return module


def cases(bn):
    """(id, call) pairs for package `bn`: each call a functools.partial of a public entry point on tiny data."""
    rng = np.random.default_rng(0)
    f32 = np.float32

    def arr(*shape):
        return rng.standard_normal(shape).astype(f32)

    C = 8
    x1 = arr(1, C, 1, 1)
    x2, g2 = arr(2, C), arr(2, C)
    xg, gg = arr(2, C, 2), arr(2, C, 2)
    xi, gi = arr(2, C, 3), arr(2, C, 3)
    rm, rv = np.zeros(C, f32), np.ones(C, f32)
    w, b = rng.uniform(0.5, 1.5, C).astype(f32), rng.uniform(-1, 1, C).astype(f32)
    mean, var = bn.batch_stats(x2)
    invstd = 1.0 / np.sqrt(var + 1e-5)
    sdy, sdyx = bn.backward_reduce(g2, x2, mean)
    P = functools.partial
    out = [
        ("batch_norm eval 1x8x1x1", P(bn.batch_norm, x1, rm, rv, w, b)),
        ("batch_norm train 2x8", P(bn.batch_norm, x2, rm.copy(), rv.copy(), w, b, True)),
        ("batch_norm train 2x8, no stats", P(bn.batch_norm, x2, None, None, w, b, True)),
        ("batch_norm_forward 2x8", P(bn.batch_norm_forward, x2, w, b)),
        ("batch_norm_backward 2x8", P(bn.batch_norm_backward, g2, x2, mean, invstd, w)),
        ("batch_stats 2x8", P(bn.batch_stats, x2)),
        ("normalize 2x8", P(bn.normalize, x2, mean, var, w, b)),
        ("backward_reduce 2x8", P(bn.backward_reduce, g2, x2, mean)),
        ("backward_apply 2x8", P(bn.backward_apply, g2, x2, mean, w, b, w)),
        ("update_running_stats 8", P(bn.update_running_stats, rm.copy(), rv.copy(), mean, var, 2, 0.1)),
    ]
    if hasattr(bn, "group_norm"):
        gm, gs = bn.group_norm_forward(xg, 4, w, b)[1:]
        im, is_ = bn.instance_norm_forward(xi, w, b)[1:]
        out += [
            ("group_norm 2x8x2 G=4", P(bn.group_norm, xg, 4, w, b)),
            ("group_norm_forward 2x8x2", P(bn.group_norm_forward, xg, 4, w, b)),
            ("group_norm_backward 2x8x2", P(bn.group_norm_backward, gg, xg, gm, gs, 4, w)),
            ("instance_norm 2x8x3", P(bn.instance_norm, xi, None, None, w, b)),
            ("instance_norm 2x8x3, stats", P(bn.instance_norm, xi, rm.copy(), rv.copy(), w, b)),
            ("instance_norm_forward 2x8x3", P(bn.instance_norm_forward, xi, w, b)),
            ("instance_norm_backward 2x8x3", P(bn.instance_norm_backward, gi, xi, im, is_, w)),
        ]
    if hasattr(bn, "batch_moments"):
        mo = bn.batch_moments(x2)
        out += [
            ("batch_moments 2x8", P(bn.batch_moments, x2)),
            ("merge_moments 8", P(bn.merge_moments, mo)),
            ("norm_coefficients 8", P(bn.norm_coefficients, mean, var, w, b)),
            ("backward_coefficients 8", P(bn.backward_coefficients, sdy, sdyx, mean, invstd, 2, w)),
        ]
    layer = bn.BatchNorm1d(C)
    layer_eval = bn.BatchNorm1d(C).eval()
    layer(x2)
    out += [
        ("BatchNorm1d train 2x8", P(layer.forward, x2)),
        ("BatchNorm1d eval 2x8", P(layer_eval.forward, x2)),
        ("BatchNorm1d backward 2x8", P(layer.backward, g2)),
    ]
    if hasattr(bn, "GroupNorm"):
        gn = bn.GroupNorm(4, C)
        gn(xg)
        inorm = bn.InstanceNorm1d(C, affine=True)
        inorm(xi)
        out += [
            ("GroupNorm 2x8x2", P(gn.forward, xg)),
            ("GroupNorm backward 2x8x2", P(gn.backward, gg)),
            ("InstanceNorm1d 2x8x3", P(inorm.forward, xi)),
            ("InstanceNorm1d backward 2x8x3", P(inorm.backward, gi)),
        ]
    if hasattr(bn, "layer_norm"):
        lm, ls = bn.layer_norm_forward(x2, C, w, b)[1:]
        rs = bn.rms_norm_forward(x2, C, w)[1]
        ln, rn = bn.LayerNorm(C), bn.RMSNorm(C)
        ln(x2)
        rn(x2)
        out += [
            ("layer_norm 2x8", P(bn.layer_norm, x2, C, w, b)),
            ("layer_norm_forward 2x8", P(bn.layer_norm_forward, x2, C, w, b)),
            ("layer_norm_backward 2x8", P(bn.layer_norm_backward, g2, x2, lm, ls, C, w, b)),
            ("rms_norm 2x8", P(bn.rms_norm, x2, C, w)),
            ("rms_norm_backward 2x8", P(bn.rms_norm_backward, g2, x2, rs, C, w)),
            ("LayerNorm 2x8", P(ln.forward, x2)),
            ("LayerNorm backward 2x8", P(ln.backward, g2)),
            ("RMSNorm 2x8", P(rn.forward, x2)),
        ]
    return out


def _loop_time(call, n):
    t0 = time.perf_counter_ns()
    for _ in range(n):
        call()
    return (time.perf_counter_ns() - t0) / n / 1e3


def measure(builds, rounds, calls, only=None):
    """{case id: {build name: median µs per call}} over `rounds` interleaved rounds of `calls` calls."""
    per_build = {name: dict(cases(bn)) for name, bn in builds.items()}
    ids = [cid for cid, _ in cases(next(iter(builds.values())))]
    if only:
        ids = [cid for cid in ids if any(t in cid for t in only)]
    names = list(builds)
    result = {}
    for cid in ids:
        runs = {name: [] for name in names if cid in per_build[name]}
        for name in runs:  # warm-up
            _loop_time(per_build[name][cid], max(10, calls // 10))
        gc.disable()
        try:
            for r in range(rounds):
                order = list(runs) if r % 2 == 0 else list(reversed(list(runs)))
                for name in order:
                    runs[name].append(_loop_time(per_build[name][cid], calls))
        finally:
            gc.enable()
        result[cid] = {name: statistics.median(t) for name, t in runs.items()}
        print(f"  {cid}: " + ", ".join(f"{n} {v:.3f} us" for n, v in result[cid].items()), file=sys.stderr)
    return result


def table(result, names):
    head = "| call | " + " | ".join(f"{n} (µs)" for n in names) + (" | ratio |" if len(names) == 2 else " |")
    lines = [head, "|" + "---|" * (len(names) + 1 + (len(names) == 2))]
    for cid, cells in result.items():
        row = [f"{cells[n]:.2f}" if n in cells else "" for n in names]
        if len(names) == 2:
            row.append(f"{cells[names[0]] / cells[names[1]]:.3f}" if all(n in cells for n in names) else "")
        lines.append(f"| {cid} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", metavar="DIR", help="a directory holding another built bn_simd/ to time beside")
    p.add_argument("--rounds", type=int, default=41, help="interleaved rounds per case (default 41)")
    p.add_argument("--calls", type=int, default=400, help="calls per round (default 400)")
    p.add_argument("--only", metavar="TEXT", nargs="+", help="only the cases whose id contains one of the TEXTs")
    p.add_argument("--other-first", action="store_true",
                   help="load the other build before the checkout's (the library loaded second can come out a few "
                        "percent slower: compare both orders)")
    p.add_argument("--json", metavar="FILE", help="also write the medians as JSON")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    other = None
    if args.against and args.other_first:
        other = load_package(os.path.join(os.path.abspath(args.against), "bn_simd"), "bn_simd_other")
    import bn_simd
    builds = {"checkout": bn_simd}
    if args.against:
        builds["other"] = other or load_package(os.path.join(os.path.abspath(args.against), "bn_simd"),
                                                "bn_simd_other")
        assert builds["other"]._core is not bn_simd._core
    for bn in builds.values():
        bn.set_num_threads(1)
    print(f"bn_simd from {os.path.dirname(bn_simd.__file__)}, kernels {bn_simd.get_isa()}"
          + (f"; other from {os.path.dirname(builds['other'].__file__)}" if args.against else ""), file=sys.stderr)
    result = measure(builds, args.rounds, args.calls, args.only)
    print(table(result, list(builds)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "calls": args.calls, "medians_us": result}, f, indent=1)


if __name__ == "__main__":
    main()
