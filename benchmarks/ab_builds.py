"""Two builds of bn_simd in one process: the same bits, and their speed timed alternately.

    python benchmarks/ab_builds.py --old DIR [--bits-only | --speed-only] [--quick] [--threads 2]

DIR is a directory holding another build of the package (a checkout of another commit, built in place with
`python setup.py build_ext --inplace`): its `bn_simd` folder is copied to a temporary directory under the name
`bn_simd_ab_old` and imported beside this checkout's `bn_simd` (the package imports itself relatively, and the
extension module's init function depends on the file name only, so both load in one process).

Bits: every batch-norm entry point (training forward, eval, backward, the four steps) on shapes that take every
path (channels-first one-row and several-row chunks, pieces of long rows, the slab path forced and not,
channels-last row split and column split, strips forced, streamed sizes), both dtypes, every ISA the CPU runs, 1
and 3 threads: the outputs of the two builds compared byte for byte.

Speed: the benchmark table's batch-norm cases (benchmarks/harness/cases.py), each mode timed with the two builds
alternately sample by sample (harness/timing.py, interleaved_medians); prints new time / old time per row and
the geometric mean.
"""
import argparse
import atexit
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bn_simd  # noqa: E402
from benchmarks.harness import cases as hcases  # noqa: E402
from benchmarks.harness import impls as himpls  # noqa: E402
from benchmarks.harness import report, timing  # noqa: E402


def load_old(path):
    src = os.path.join(path, "bn_simd")
    if not any(f.startswith("_core") and f.endswith(".so") for f in os.listdir(src)):
        raise SystemExit(f"{src} holds no built extension: build it in place first")
    tmp = tempfile.mkdtemp(prefix="bn_simd_ab_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # (the copy goes when the run ends)
    shutil.copytree(src, os.path.join(tmp, "bn_simd_ab_old"), ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, tmp)
    # The extension's cimports name their module absolutely (bn_simd._args): while the old package loads, that name
    # is the old build's module (loaded from its file, before the package, whose init imports _core), whose C
    # functions the old _core was compiled against; the old package's own relative import gets the same module
    args_so = next((f for f in os.listdir(src) if f.startswith("_args") and f.endswith(".so")), None)
    if args_so is None:
        raise SystemExit(f"{src} holds no built _args extension: build it in place first")
    spec = importlib.util.spec_from_file_location("bn_simd._args", os.path.join(tmp, "bn_simd_ab_old", args_so))
    old_args = importlib.util.module_from_spec(spec)
    new_args = sys.modules["bn_simd._args"]
    sys.modules["bn_simd._args"] = sys.modules["bn_simd_ab_old._args"] = old_args
    try:
        spec.loader.exec_module(old_args)
        return importlib.import_module("bn_simd_ab_old")
    finally:
        sys.modules["bn_simd._args"] = new_args


# ---- bits -----------------------------------------------------------------------------------------------------

BIT_CASES = [  # (shape, layout, settings): settings are (cl_strip_bytes, slab_bytes) for both builds
    ((16, 24, 20, 20), "NCHW", None), ((64, 32, 7, 7), "NCHW", None), ((4, 3, 100, 100), "NCHW", None),
    ((8, 64, 56, 56), "NCHW", (None, 1 << 20)), ((32, 256, 7, 7), "NCHW", (None, 1 << 20)),
    ((2, 5, 33000), "NCHW", None), ((300, 17), "NCHW", None), ((7, 1, 500), "NCHW", None),
    ((16, 20, 20, 24), "NHWC", None), ((64, 4, 4, 512), "NHWC", None), ((8, 7, 7, 2048), "NHWC", (24576, None)),
    ((4, 7, 7, 2048), "NHWC", (1 << 62, None)), ((2, 3, 3, 1000), "NHWC", None),
    ((40, 32, 56, 56), "NCHW", None), ((40, 56, 56, 32), "NHWC", None),  # (streamed: beyond 32 MiB)
]


def _settings(pkg, s):
    core = pkg._core
    core.set_cl_strip_bytes(None if s is None else s[0])
    core.set_slab_bytes(None if s is None else s[1])


def _outputs(pkg, x, dy, w, b, rm, rv, layout):
    F = pkg
    out = []
    y, m, s = F.batch_norm_forward(x, w, b, layout=layout)
    out += [y, m, s]
    rmc, rvc = rm.copy(), rv.copy()
    out.append(F.batch_norm(x, rmc, rvc, w, b, training=True, momentum=0.3, layout=layout))
    out += [rmc, rvc]
    out.append(F.batch_norm(x, rm, rv, w, b, training=False, layout=layout))
    out += list(F.batch_norm_backward(dy, x, m, s, w, layout=layout))
    out += list(F.batch_norm_backward(dy, x, m, s, w, layout=layout, training=False))
    mean, var = F.batch_stats(x, layout=layout)
    out += [mean, var, F.normalize(x, mean, var, w, b, layout=layout)]
    sdy, sdyx = F.backward_reduce(dy, x, mean, layout=layout)
    out += [sdy, sdyx, F.backward_apply(dy, x, mean, w, -w * 1e-3, sdy * 1e-4, layout=layout)]
    xi = x.copy()
    F.batch_norm(xi, rm, rv, w, b, training=False, layout=layout, out=xi)
    out.append(xi)
    return [np.ascontiguousarray(a).tobytes() for a in out]


def check_bits(old, threads=(1, 3)):
    rng = np.random.default_rng(0)
    bad = checked = 0
    isas = [i for i in bn_simd.show_config()["supported_isas"] if i in old.show_config()["supported_isas"]]
    for shape, layout, s in BIT_CASES:
        C = shape[1] if layout == "NCHW" else shape[-1]
        for dtype in (np.float32, np.float64):
            if np.prod(shape) * np.dtype(dtype).itemsize > (64 << 20):
                continue
            x = (rng.standard_normal(shape) * 3 + 7).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            w, b = rng.uniform(0.5, 2, C), rng.standard_normal(C)
            rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
            for isa in isas:
                for n in threads:
                    res = []
                    for pkg in (bn_simd, old):
                        pkg.set_isa(isa)
                        pkg.set_num_threads(n)
                        _settings(pkg, s)
                        res.append(_outputs(pkg, x, dy, w, b, rm, rv, layout))
                        _settings(pkg, None)
                        pkg.set_num_threads(None)
                        pkg.set_isa("auto")
                    checked += 1
                    diff = [i for i, (p, q) in enumerate(zip(*res)) if p != q]
                    if diff:
                        bad += 1
                        print(f"DIFFERENT {shape} {layout} {np.dtype(dtype).name} {isa} {n} threads: outputs {diff}")
    print(f"bits: {checked - bad} of {checked} (case, dtype, ISA, threads) combinations identical")
    return bad == 0


# ---- speed ----------------------------------------------------------------------------------------------------

def _bn_runner(pkg, ws, mode):
    x, out, layout, w, b = ws.x, ws.out, ws.layout, ws.weight, ws.bias
    if mode == "forward":
        rm, rv = ws.running_mean, ws.running_var
        return lambda: pkg.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, layout=layout, out=out)
    if mode == "eval":
        em, ev = ws.eval_mean, ws.eval_var
        return lambda: pkg.batch_norm(x, em, ev, w, b, False, 0.1, 1e-5, layout=layout, out=out)
    dy, sm, si = ws.dy, ws.save_mean, ws.save_invstd
    return lambda: pkg.batch_norm_backward(dy, x, sm, si, w, layout=layout, out=out)


def compare_speed(old, quick=False, threads=2):
    himpls.configure(threads)
    for pkg in (bn_simd, old):
        pkg.set_num_threads(threads)
    case_list = [c for c in (hcases.QUICK_CASES if quick else hcases.CASES) if c.family == "batch_norm"]
    ratios = []
    print("| case | mode | layout | new ms | old ms | new / old |")
    print("|---|---|---|---:|---:|---:|")
    for case in case_list:
        ws = hcases.workspace(case)
        for mode in case.modes:
            fns = [_bn_runner(bn_simd, ws, mode), _bn_runner(old, ws, mode)]
            (tn, _), (to, _) = timing.interleaved_medians(fns, target_s=0.5 if quick else 1.5, k_min=9)
            ratios.append(tn / to)
            print(f"| {case.label} | {mode} | {case.layout_label} | {report.fmt_ms(tn * 1e3)} | "
                  f"{report.fmt_ms(to * 1e3)} | {tn / to:.3f} |", flush=True)
        del ws
    print(f"\ngeometric mean new / old over {len(ratios)} rows: {report.geomean(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="directory of the other build (holding bn_simd/ built in place)")
    p.add_argument("--bits-only", action="store_true")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    old = load_old(args.old)
    print(f"new: {bn_simd.__file__}\nold: {old.__file__} (copied from {args.old})")
    ok = True
    if not args.speed_only:
        ok = check_bits(old)
    if not args.bits_only:
        compare_speed(old, args.quick, args.threads)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
