"""Time every case x mode x implementation in one run and print a markdown table.

    python benchmarks/run.py [--quick] [--threads N] [--only TEXT ...] [--json FILE] [--plot FILE]
                             [--retries N] [--wait-idle SECONDS] [--default-malloc] [--scaling | --isas]
                             [--write-readme]

From a source checkout; ``python -m bn_simd bench`` runs the same command line there. The cases, the
implementations, the timing and the tables are in ``benchmarks/harness/``. ``--write-readme`` replaces the
table between the markers in benchmarks/README.md (the thread-scaling table's markers with ``--scaling``,
the kernel-set table's with ``--isas``). ``measure(cases)``, ``table(rows)`` and ``plot(rows, path)`` can be
imported from here.
"""
import argparse
import json
import os
import sys

if __package__ in (None, ""):
    # run as a script: the checkout's root, so that benchmarks.harness and the checkout's bn_simd import
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bn_simd  # noqa: E402

from benchmarks.harness import cases, impls, machine, report, timing  # noqa: E402
from benchmarks.harness.measure import measure, measure_isas, measure_scaling  # noqa: E402,F401  (the API)
from benchmarks.harness.report import disagreements, plot, table  # noqa: E402,F401  (the API)


def make_parser(prog=None):
    p = argparse.ArgumentParser(
        prog=prog, description="Time bn_simd's batch, group, instance, layer and RMS norm against NumPy, PyTorch "
                               "and ONNX Runtime (the last two when installed) and print a markdown table.",
        epilog="Progress goes to stderr, the table to stdout. The cases: "
               + ", ".join(c.id for c in cases.CASES) + f"; --quick runs {', '.join(cases.QUICK_IDS)}.")
    p.add_argument("--quick", action="store_true", help="a subset of the cases and fewer repeats (under a minute)")
    p.add_argument("--threads", type=int, default=2, help="threads for bn_simd, PyTorch and ONNX Runtime (default 2)")
    p.add_argument("--only", metavar="TEXT", nargs="+",
                   help="only the cases whose id contains one of the TEXTs (e.g. NHWC, 2048, 1x8x1x1, group_norm, "
                        "instance_norm)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--plot", metavar="FILE", help="also draw a bar chart of GB/s, e.g. bench.png (needs matplotlib)")
    p.add_argument("--retries", type=int, default=None,
                   help="time a row again (at most this often) when other processes used CPU meanwhile "
                        "(default 2, with --quick 1)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="wait (at most this long) for other processes to leave the CPUs idle, before the run "
                        "and before each retry")
    p.add_argument("--scaling", action="store_true",
                   help="instead of the comparison, time bn_simd alone on 1 thread and on --threads, "
                        "alternately, on the cache-resident cases (or those of --only), and print that table")
    p.add_argument("--isas", action="store_true",
                   help="instead of the comparison, time bn_simd alone with each kernel set this CPU runs "
                        "(scalar, avx2, avx512), alternately, and print that table")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc thresholds adaptive (by default they are fixed, see "
                        "steady_allocator in benchmarks/harness/machine.py)")
    p.add_argument("--write-readme", action="store_true",
                   help="replace the table between the markers in benchmarks/README.md (with --scaling: the "
                        "thread-scaling table; with --isas: the kernel-set table)")
    return p


def _warn(text):
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _check(args, parser):
    """parser.error() for options that cannot be honoured, before anything is timed."""
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.retries is not None and args.retries < 0:
        parser.error("--retries must be >= 0")
    if not args.wait_idle >= 0:
        parser.error("--wait-idle must be >= 0 seconds")
    if args.scaling and args.threads < 2:
        parser.error("--scaling compares 1 thread with --threads: give --threads 2 or more")
    if args.scaling and args.isas:
        parser.error("--scaling and --isas are separate tables: give one of them")
    for flag, given in (("--scaling", args.scaling), ("--isas", args.isas)):
        if given and args.plot:
            parser.error(f"--plot draws the comparison, not {flag}")
    if args.write_readme and not (args.scaling or args.isas) and (args.quick or args.only):
        parser.error("--write-readme replaces the whole published table: run every case (no --quick, no --only)")
    if args.plot and not report.have_matplotlib():
        parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            parser.error(f"{option}: the folder of {path} does not exist")
        if path and os.path.isdir(path):
            parser.error(f"{option}: {path} is a folder, not a file name")
        if path:  # (a file that cannot be written fails now, not after the timings)
            _check_writable(parser, option, path)


def _check_writable(parser, option, path):
    """path can be written at the run's end: an existing file (or a link's target) writable, or a new file creatable
    in its folder (probed with a file of its own name, removed at once; a link is never followed to be removed)."""
    if os.path.lexists(path):
        try:  # (no O_CREAT: a link's target is never created here)
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except FileNotFoundError:  # (a dangling link: the run creates its target)
            if not os.access(os.path.dirname(os.path.realpath(path)), os.W_OK):
                parser.error(f"{option}: {path} cannot be written")
        except OSError as e:
            parser.error(f"{option}: {path} cannot be written ({e.strerror})")
        return
    try:
        with open(path, "x", encoding="utf-8"):
            pass
    except OSError as e:
        parser.error(f"{option}: {path} cannot be written ({e.strerror})")
    os.remove(path)


def _chosen_cases(args, parser):
    pool = chosen = cases.QUICK_CASES if args.quick else cases.CASES
    if args.scaling and not args.only:
        pool = chosen = cases.SCALING_CASES
    if args.only:
        chosen = [c for c in pool if any(t in c.id for t in args.only)]
        if not chosen:
            parser.error(f"no case id {'of --quick ' if args.quick else ''}contains {' or '.join(args.only)}; "
                         f"ids: {', '.join(c.id for c in pool)}")
    return chosen


def _tell_missing(chosen):
    """One line on stderr per optional library that is not installed, naming the columns left out."""
    left_out = {}
    for name in dict.fromkeys(n for c in chosen for n in impls.names(c.family)):
        lib = impls.missing(name)
        if lib:
            left_out.setdefault(lib, []).append(impls.IMPL_TITLES[name])
    for lib, titles in left_out.items():
        print(f"{lib} is not installed: no {' and '.join(titles)} columns", file=sys.stderr)


def run(args, parser):
    """Run what the parsed options ask for: print the table (stdout) and warnings (stderr), write the JSON,
    the chart and the README's table. Returns (rows, table text)."""
    _check(args, parser)
    chosen = _chosen_cases(args, parser)
    if not (args.scaling or args.isas):
        _tell_missing(chosen)
    if not args.default_malloc:
        machine.steady_allocator()
    if args.wait_idle > 0 and not timing.wait_until_idle(args.wait_idle):
        _warn(f"other processes kept the CPUs busy for {args.wait_idle:g} s; starting anyway")
    load = timing.load_average()
    if load is not None and load > 0.25 * (os.cpu_count() or 1):
        _warn(f"load average {load:.2f} before the run; other processes will skew the timings")
    retries = (1 if args.quick else 2) if args.retries is None else max(0, args.retries)
    progress = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    timer = dict(threads=args.threads, quick=args.quick, retries=retries, retry_wait_s=args.wait_idle,
                 progress=progress)
    if args.scaling:
        rows = measure_scaling(chosen, **timer)
        text, marks = report.scaling_table(rows), report.MARKS["scaling"]
    elif args.isas:
        rows = measure_isas(chosen, **timer)
        text, marks = report.isa_table(rows), report.MARKS["isas"]
    else:
        rows = measure(chosen, **timer)
        text, marks = report.table(rows), report.MARKS["comparison"]
    print(text, flush=True)
    busy = [f"{r['id']} {r['mode']} ({r['other_cores']:.2f})" for r in rows
            if r["other_cores"] is not None and r["other_cores"] > timing.BUSY_CORES]
    if busy:
        _warn(f"other processes used CPU while these rows were timed (cores): {', '.join(busy)}")
    wrong = disagreements(rows)
    if wrong:
        _warn(f"outputs that differ from bn_simd's by more than {impls.AGREEMENT_TOL:g}: {', '.join(wrong)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine.describe(), "versions": impls.versions(), "isa": bn_simd.get_isa(),
                       "steady_malloc": machine.MALLOC.steady, "load_before": load,
                       "load_after": timing.load_average(), "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
        print(f"bar chart written to {args.plot}", file=sys.stderr)
    if args.write_readme:
        report.write_readme(text, marks=marks)
    return rows, text


def main(argv=None, prog="benchmarks/run.py"):
    """The command line; returns the exit status (1 when an implementation's output disagrees with bn_simd's)."""
    parser = make_parser(prog)
    rows, _ = run(parser.parse_args(argv), parser)
    return 1 if disagreements(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
