"""Measurements: the comparison of implementations, bn_simd's thread scaling and its kernel sets.

Each function times cases and returns rows, one dict per (case, mode), for report.py to format. Every row
has case (the case's label), layout (its layout label), family, dtype, mode, id, threads, ms,
other_cores (CPU used by other processes while the row was timed, in cores; None where unknown) and
attempts.
"""
import functools

import bn_simd

from . import cases as cases_mod
from . import impls, timing


def gbs(nbytes, ms):
    """GB/s of moving nbytes in ms milliseconds (None without a time)."""
    return nbytes / (ms * 1e-3) / 1e9 if ms else None


def ratio(num, den):
    return num / den if num and den else None


def _row(case, mode, **fields):
    return dict({"case": case.label, "layout": case.layout_label, "family": case.family,
                 "dtype": case.dtype.name, "mode": mode, "id": case.id, "threads": impls.STATE.threads},
                **fields)


def _settings(quick, timer):
    return dict(timing.QUICK if quick else timing.FULL, **timer)


def _time_mode(ws, mode, impl_names, settings, progress):
    """Time one mode of each implementation in impl_names (bn_simd first), interleaved; returns
    ({impl: ms}, {impl: samples}, {impl: difference from bn_simd's output}); yardsticks are timed, not
    compared."""
    ms, ks, diffs, runners = {}, {}, {}, {}
    ref = None
    for name in impl_names:
        runner = impls.runner(name, ws, mode)
        if runner is None:
            ms[name] = ks[name] = None
            continue
        if ref is None:
            ref = runner.output().copy()
        elif name not in impls.YARDSTICKS:
            diffs[name] = impls.difference(runner.output(), ref)
        runners[name] = runner
    timed = timing.interleaved_medians(list(runners.values()), **settings)
    for name, (t, k) in zip(runners, timed):
        ms[name], ks[name] = t * 1e3, k
        if progress:
            progress(f"{ws.case.id:22s} {mode:9s} {name:12s} {ms[name]:10.4f} ms  (k={k})")
    return ms, ks, diffs


def measure(case_list=None, *, threads=None, quick=False, impl_names=None, retries=0, retry_wait_s=0,
            progress=None, **timer):
    """Time every case x mode x implementation; returns one dict per (case, mode).

    case_list: Case objects (default cases.CASES). threads: threads for bn_simd, PyTorch and ONNX Runtime
    (None keeps the current impls.STATE.threads). impl_names: names from the families' registries (default
    all; bn_simd is always timed). retries: how many times a (case, mode) or a copy probe timed while other
    processes used more than timing.BUSY_CORES cores is timed again (the least disturbed attempt is kept),
    after waiting at most retry_wait_s seconds for the other processes to leave the CPUs idle. progress: a
    callable receiving one line of text per measurement. timer: overrides of target_s / k_min / k_max.

    Row keys beyond the common ones: tensor_bytes, min_bytes, ms {impl: median ms or None}, k {impl:
    samples}, max_diff {impl: max |output - bn_simd's output|}, probe_ms, probe_gbs, gbs (bn_simd),
    pct_probe, speedup {key of impls.SPEEDUPS: that time / bn_simd's}, over_bn_eval (bn_simd's time / that of
    the "bn_eval" yardstick, bn_simd's batch-norm eval of the same tensor; None where it is not timed).
    """
    if threads is not None:
        impls.configure(threads)
    settings = _settings(quick, timer)
    rows = []
    for case in (cases_mod.CASES if case_list is None else case_list):
        family_names = impls.names(case.family)
        chosen = [n for n in family_names if n == "bn_simd" or impl_names is None or n in impl_names]
        ws = cases_mod.workspace(case)
        probe_s, _, _ = timing.undisturbed(lambda: timing.median_seconds(impls.copy_probe(ws), **settings)[0],
                                           retries, f"{case.id} copy probe", progress, retry_wait_s)
        probe_ms = probe_s * 1e3
        probe_gbs = gbs(impls.probe_bytes(case), probe_ms)
        if progress:
            progress(f"{case.id:22s} copy probe  {probe_ms:10.4f} ms")
        for mode in case.modes:
            (ms, ks, diffs), others, attempts = timing.undisturbed(
                lambda: _time_mode(ws, mode, chosen, settings, progress), retries, f"{case.id} {mode}",
                progress, retry_wait_s)
            ours = ms["bn_simd"]
            speed = gbs(case.min_bytes(mode), ours)
            speedup = {key: ratio(min((v for v in (ms.get(n) for n in group) if v), default=None), ours)
                       for key, group in impls.SPEEDUPS.items()}
            rows.append(_row(case, mode, tensor_bytes=case.nbytes, min_bytes=case.min_bytes(mode), ms=ms, k=ks,
                             max_diff=diffs, other_cores=others, attempts=attempts, probe_ms=probe_ms,
                             probe_gbs=probe_gbs, gbs=speed, pct_probe=100 * speed / probe_gbs,
                             speedup=speedup, over_bn_eval=ratio(ours, ms.get("bn_eval"))))
        del ws
    return rows


def _measure_settings(case_list, keys, apply, restore, what, settings, retries, retry_wait_s, progress):
    """bn_simd alone under each setting of keys (apply(key) before each sample), interleaved sample by sample;
    restore() runs at the end, whatever happened. One row per (case, mode), with ms {key: median ms}."""
    rows = []
    try:
        for case in case_list:
            ws = cases_mod.workspace(case)
            for mode in case.modes:
                runner = impls.runner("bn_simd", ws, mode)
                setups = [functools.partial(apply, key) for key in keys]
                timed, others, attempts = timing.undisturbed(
                    lambda: timing.interleaved_medians([runner] * len(keys), setups=setups, **settings),
                    retries, f"{case.id} {mode} {what}", progress, retry_wait_s)
                ms = {key: m * 1e3 for key, (m, _) in zip(keys, timed)}
                rows.append(_row(case, mode, ms=ms, other_cores=others, attempts=attempts))
                if progress:
                    progress(f"{case.id:22s} {mode:9s} "
                             + "  ".join(f"{k} {what} {v:10.4f} ms" for k, v in ms.items()))
            del ws
    finally:
        restore()
    return rows


def measure_scaling(case_list=None, *, threads=None, quick=False, retries=0, retry_wait_s=0, progress=None,
                    **timer):
    """bn_simd alone on 1 thread and on `threads` (default impls.STATE.threads), interleaved sample by sample
    (the thread count set before each sample); rows with ms {1: median ms, threads: median ms} and speedup
    (1-thread time / threads time). Cases: cases.SCALING_CASES unless case_list is given."""
    if threads is not None:
        impls.configure(threads)
    nt = impls.STATE.threads
    rows = _measure_settings(cases_mod.SCALING_CASES if case_list is None else case_list, (1, nt),
                             bn_simd.set_num_threads, functools.partial(bn_simd.set_num_threads, nt), "thread(s)",
                             _settings(quick, timer), retries, retry_wait_s, progress)
    for r in rows:
        r["speedup"] = ratio(r["ms"][1], r["ms"][nt])
    return rows


def measure_isas(case_list=None, *, threads=None, quick=False, retries=0, retry_wait_s=0, progress=None, **timer):
    """bn_simd alone with each kernel set this CPU runs (show_config()["supported_isas"]), interleaved sample
    by sample (the kernel set chosen before each sample); rows with isas and ms {isa: median ms}. The active
    kernel set is put back afterwards. Cases: cases.CASES unless case_list is given."""
    if threads is not None:
        impls.configure(threads)
    isas = bn_simd.show_config()["supported_isas"]
    rows = _measure_settings(cases_mod.CASES if case_list is None else case_list, isas, bn_simd.set_isa,
                             functools.partial(bn_simd.set_isa, bn_simd.get_isa()), "kernels",
                             _settings(quick, timer), retries, retry_wait_s, progress)
    for r in rows:
        r["isas"] = isas
    return rows
