"""``python -m bn_simd``: a self-check against a float64 NumPy reference and a short speed table vs NumPy.

    python -m bn_simd            # self-check + speed table (a few seconds)
    python -m bn_simd check      # self-check only; exit status 1 on any failure
    python -m bn_simd speed      # speed table only
    python -m bn_simd bench ...  # in a source checkout: benchmarks/run.py (vs NumPy, PyTorch, ONNX Runtime)
"""
import argparse
import importlib
import importlib.util
import os
import sys

import numpy as np

from . import _baseline as ref
from . import _speed
from . import functional as F
from ._config import show_config

# (shape, layout): covers both kernel families (channels-first runs, channels-last rows), odd sizes
CHECK_CASES = [((4, 7, 9, 11), "NCHW"), ((3, 5, 6, 17), "NHWC"), ((64, 33), "NCHW"), ((2, 9, 4, 4, 4), "NCHW"),
               ((2, 16, 130), "NCHW"), ((1, 3, 40, 40), "NCHW")]
NO_BENCHMARKS = ("python -m bn_simd bench runs the benchmark harness of a source checkout (its benchmarks/ "
                 "folder), and none was found beside this installation or in the current directory. From the "
                 "root of a source checkout of bn_simd, run: python benchmarks/run.py (--help lists its options)")


def _tol(dtype, n):
    """Error bound for a normalised output (|y| ~ 1): a few ulp of the output, plus the reduction's
    rounding (the statistics are accumulated in float64, so this grows with n only in float64)."""
    eps = np.finfo(dtype).eps
    return 16 * eps + 4 * np.finfo(np.float64).eps * n


def _channel_axis(layout, ndim):
    return 1 if layout == "NCHW" else ndim - 1


def _beyond_bounds(errs, tol, n):
    """The errors of a check beyond their bounds: the forward's 8 tol; eval's tol (no reduction: the coefficients'
    and the output's roundings, a few ulp, against tol's 16); the reductions' outputs sqrt(n) more."""
    bound = {"forward": 8 * tol, "eval": tol}
    return {k: v for k, v in errs.items() if not v <= bound.get(k, 8 * tol * np.sqrt(n))}


def self_check(verbose=True):
    """Compare forward-train, eval and backward with the float64 reference; returns the number of failures."""
    rng = np.random.default_rng(12345)
    failures = 0
    for dtype in (np.float32, np.float64):
        for shape, layout in CHECK_CASES:
            C = shape[_channel_axis(layout, len(shape))]
            n = int(np.prod(shape)) // C
            x = (rng.standard_normal(shape) * 3 + 10).astype(dtype)
            w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
            rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
            dy = rng.standard_normal(shape).astype(dtype)
            y, mean, invstd = F.batch_norm_forward(x, w, b, layout=layout)
            y_ref, m_ref, v_ref = ref.forward_train(x, w, b, layout=layout, dtype=np.float64)
            ye = F.batch_norm(x, rm, rv, w, b, training=False, layout=layout)
            ye_ref = ref.inference(x, rm, rv, w, b, layout=layout, dtype=np.float64)
            gx, gw, gb = F.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)
            gx_ref, gw_ref, gb_ref = ref.backward(dy, x, m_ref, 1 / np.sqrt(v_ref + 1e-5), w, layout=layout,
                                                  dtype=np.float64)
            tol = _tol(dtype, n)
            errs = {
                "forward": np.max(np.abs(y - y_ref)) / np.max(np.abs(w)),
                "eval": np.max(np.abs(ye - ye_ref) / (1 + np.abs(ye_ref))),
                "grad_x": np.max(np.abs(gx - gx_ref)) / (1 + np.max(np.abs(gx_ref))),
                "grad_w": np.max(np.abs(gw - gw_ref)) / (np.sqrt(n) * 4),
            }
            bad = _beyond_bounds(errs, tol, n)
            failures += bool(bad)
            if verbose:
                status = "ok  " if not bad else "FAIL"
                worst = max(errs.values())
                print(f"  {status} {np.dtype(dtype).name:7s} {layout} {str(shape):18s} max rel. error {worst:.1e}"
                      + (f"  failing: {sorted(bad)}" if bad else ""))
    return failures + group_check(verbose) + thread_check(verbose)


# (shape, layout, groups): group norm across layouts and ranks; G = C is instance norm
GROUP_CASES = [((4, 12, 9, 11), "NCHW", 3), ((3, 6, 5, 16), "NHWC", 4), ((2, 8, 130), "NCHW", 8),
               ((2, 3, 4, 4, 6), "NHWC", 6)]


def group_check(verbose=True):
    """Group norm (and instance norm, G = C) forward and backward against the float64 reference."""
    from . import groups as GN
    rng = np.random.default_rng(54321)
    failures = 0
    for dtype in (np.float32, np.float64):
        for shape, layout, G in GROUP_CASES:
            C = shape[_channel_axis(layout, len(shape))]
            n = int(np.prod(shape)) // shape[0] // G
            x = (rng.standard_normal(shape) * 3 + 10).astype(dtype)
            w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
            dy = rng.standard_normal(shape).astype(dtype)
            if G == C and len(shape) > 2:
                y, mean, invstd = GN.instance_norm_forward(x, w, b, layout=layout)
                gx, gw, gb = GN.instance_norm_backward(dy, x, mean, invstd, w, layout=layout)
            else:
                y, mean, invstd = GN.group_norm_forward(x, G, w, b, layout=layout)
                gx, gw, gb = GN.group_norm_backward(dy, x, mean, invstd, G, w, layout=layout)
            y_ref, m_ref, v_ref = ref.group_norm_forward(x, G, w, b, layout=layout, dtype=np.float64)
            gx_ref, gw_ref, _ = ref.group_norm_backward(dy, x, m_ref, 1 / np.sqrt(v_ref + 1e-5), G, w, layout=layout,
                                                        dtype=np.float64)
            tol = _tol(dtype, n)
            errs = {"forward": np.max(np.abs(y - y_ref)) / np.max(np.abs(w)),
                    "grad_x": np.max(np.abs(gx - gx_ref)) / (1 + np.max(np.abs(gx_ref))),
                    "grad_w": np.max(np.abs(gw - gw_ref)) / (np.sqrt(n * shape[0]) * 4)}
            bad = _beyond_bounds(errs, tol, n)
            failures += bool(bad)
            if verbose:
                what = "instance" if G == C else f"group G={G}"
                print(f"  {'ok  ' if not bad else 'FAIL'} {np.dtype(dtype).name:7s} {layout} {str(shape):18s} "
                      f"{what:11s} max rel. error {max(errs.values()):.1e}"
                      + (f"  failing: {sorted(bad)}" if bad else ""))
    return failures


# (shape, layout): above the size from which calls take several threads, so that the threaded paths run
THREAD_CASES = [((8, 64, 16, 16), "NCHW"), ((8, 16, 16, 64), "NHWC")]


def thread_check(verbose=True):
    """The threaded paths: batch, group and layer norm forward and backward on 1 and on 2 threads give the same
    bits (the library's rule), which also runs the chunk merges the small cases above do not reach."""
    from . import Context
    from . import groups as GN
    from . import rownorm as RN
    if not show_config()["openmp"]:
        if verbose:
            print("  (built without OpenMP: every call runs on one thread, so there is no thread count to compare)")
        return 0
    rng = np.random.default_rng(777)
    failures = 0
    for shape, layout in THREAD_CASES:
        C = shape[_channel_axis(layout, len(shape))]
        x = (rng.standard_normal(shape) * 3 + 10).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)

        def run():
            y, mean, invstd = F.batch_norm_forward(x, w, b, layout=layout)
            outs = [y, mean, invstd, *F.batch_norm_backward(dy, x, mean, invstd, w, layout=layout)]
            y, mean, invstd = GN.group_norm_forward(x, 8, w, b, layout=layout)
            outs += [y, mean, invstd, *GN.group_norm_backward(dy, x, mean, invstd, 8, w, layout=layout)]
            y, mean, rstd = RN.layer_norm_forward(x, C, w, b, layout=layout)
            outs += [y, mean, rstd, *RN.layer_norm_backward(dy, x, mean, rstd, C, w, b, layout=layout)]
            return [np.ascontiguousarray(a).tobytes() for a in outs]

        with Context(num_threads=1):
            one = run()
        with Context(num_threads=2):
            two = run()
        bad = one != two
        failures += bad
        if verbose:
            print(f"  {'ok  ' if not bad else 'FAIL'} float32 {layout} {str(shape):18s} batch/group/layer norm, "
                  f"1 and 2 threads: {'the same bits' if not bad else 'other bits'}")
    return failures


def checkout_root(candidates=None):
    """The source checkout whose benchmarks/ folder holds the harness: the first of candidates (default: the
    package's parent directory, then the current directory) that has benchmarks/run.py and
    benchmarks/harness/; None when none has."""
    if candidates is None:
        candidates = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.getcwd())
    for root in candidates:
        bench = os.path.join(root, "benchmarks")
        if os.path.isfile(os.path.join(bench, "run.py")) and os.path.isdir(os.path.join(bench, "harness")):
            return root
    return None


def _harness_cli():
    """The module benchmarks.run: from a source checkout (checkout_root()) or, failing that, from wherever
    it is importable; None when it is nowhere."""
    root = checkout_root()
    if root is not None:
        if root not in sys.path:
            sys.path.insert(0, root)
        return importlib.import_module("benchmarks.run")
    try:
        found = importlib.util.find_spec("benchmarks.run") is not None
    except ImportError:  # a module named benchmarks that is not this project's package
        found = False
    return importlib.import_module("benchmarks.run") if found else None


def bench(argv):
    """``python -m bn_simd bench [options]``: benchmarks/run.py's command line, or a message and status 2
    where there is no source checkout."""
    cli = _harness_cli()
    if cli is None:
        print(NO_BENCHMARKS, file=sys.stderr)
        return 2
    return cli.main(argv, prog="python -m bn_simd bench")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] or argv[:2] == ["--", "bench"]:
        return bench(argv[argv.index("bench") + 1:])
    parser = argparse.ArgumentParser(prog="python -m bn_simd",
                                     description="A self-check against a float64 NumPy reference and a short speed "
                                                 "table against NumPy.",
                                     epilog="bench (in a source checkout) takes options of its own: "
                                            "python -m bn_simd bench --help")
    parser.add_argument("command", nargs="?", default="all", choices=["all", "check", "speed", "bench"],
                        help="all (the default): the self-check, then the speed table (a few seconds); check: the "
                             "self-check only, exit status 1 on any failure; speed: the speed table only; bench: the "
                             "benchmark harness of a source checkout (against NumPy, PyTorch, ONNX Runtime)")
    args = parser.parse_args(argv)
    cfg = show_config()
    print(f"bn_simd {cfg['version']}: kernels {cfg['isa']} (CPU supports {', '.join(cfg['supported_isas'])}), "
          f"OpenMP {'yes' if cfg['openmp'] else 'no'}, {cfg['num_threads']} thread(s)")
    failures = 0
    if args.command in ("all", "check"):
        print("\nSelf-check against the float64 NumPy reference (batch norm forward, eval, backward; group and "
              "instance norm forward, backward):")
        failures = self_check()
        print(f"  {'all passed' if not failures else f'{failures} case(s) FAILED'}")
    if args.command in ("all", "speed"):
        print("\nSpeed vs the NumPy baseline:\n")
        _speed.speed_table()
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # (the output piped into a reader that stopped, `| head`: not an error of ours)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (so that the exit's flush does not raise)
        sys.exit(1)
