"""LayerNorm and RMSNorm: bn_simd against PyTorch, ONNX Runtime, plain NumPy and a copy probe, in one process.

    python benchmarks/layer_norm.py [--threads 2] [--quick] [--only TEXT ...] [--json FILE] [--retries N]
                                    [--wait-idle SECONDS]

Cases are (batch, tokens, hidden) float32 arrays normalised over the hidden dim, with a weight (and for layer norm a
bias) of that length. Modes, as each implementation runs them:

* forward: the training forward, statistics kept: ``bn_simd.layer_norm_forward`` / ``rms_norm_forward`` (out=);
  PyTorch ``torch.nn.functional.layer_norm`` / ``rms_norm`` under ``no_grad``; NumPy with its statistics.
* forward+backward: the forward above, then ``layer_norm_backward`` / ``rms_norm_backward`` (out=) with its
  statistics; PyTorch: the functional call on tensors requiring grad and ``backward`` (autograd, as a training step
  runs it; grad_x, grad_weight and grad_bias); NumPy: the forward and the backward formulas.
* eval: ``bn_simd.layer_norm`` / ``rms_norm`` (out=); PyTorch as forward; ONNX Runtime: one LayerNormalization
  (opset 17) or RMSNormalization (opset 23) node, weight and bias as initializers, input and output bound to the
  arrays, ``session.intra_op.allow_spinning=0`` and ``intra_op_num_threads`` = --threads; NumPy.
* copy: ``np.copyto`` of an array of the same size, split in --threads pieces copied by as many threads (one piece
  below 1 MiB, where a thread hand-off costs more than the copy): one read and one write pass, the traffic of the
  forward and eval. Its time over bn_simd's is the fraction of the copy's bandwidth the kernel reaches.
* bound (with PyTorch): the least traffic of the mode moved by PyTorch's own multithreaded sweeps, which run at the
  memory's (or cache's) speed: forward and eval read x and write y, a ``copy_``; forward+backward adds the backward's
  reads of dy and x and write of dx, ``torch.add(dy, x, out=)``: five tensor passes in all (the statistics, mean
  and rstd, are a row's few bytes). Those sweeps store normally (each line read before it is written): a kernel
  whose stores stream can beat the bound by the reads it skips. So a peer's time over the bound is the most a kernel
  moving the traffic at PyTorch's copy speed can gain over that peer, a ceiling in that sense, not a hard limit: a
  target above it is marked ``bound`` in the targets table, and a value may exceed its ceiling.

Every implementation of a row is sampled alternately (benchmarks/harness/timing.py interleaved_medians) so that a
slow spell of a shared machine falls on all of them alike; the table gives medians (ms) and the ratios other/bn_simd
(> 1: bn_simd faster). A row during which other processes took more than 0.1 core is timed again (--retries,
--wait-idle), the least disturbed attempt kept, and marked "(busy)" when it stayed disturbed. The outputs (y, and
grad_x for forward+backward) of every implementation are compared with bn_simd's first; a difference over 1e-3 is
reported. The issue's targets are checked at the end.
"""
import argparse
import concurrent.futures
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import bn_simd  # noqa: E402
from benchmarks.harness import cli, impls, machine, timing  # noqa: E402

CASES = [(32, 128, 768), (8, 512, 1024), (1, 128, 768), (1, 1, 4096), (1, 2048, 4096)]
OPS = ("layer_norm", "rms_norm")
MODES = ("forward", "forward+backward", "eval")
EPS = 1e-5
LATENCY = {(1, 128, 768), (1, 1, 4096)}  # batch-1 latency cases of the targets
LARGE_BYTES = 4 << 20  # "large rows" of the bandwidth target: tensors of 4 MiB and more
AGREEMENT_TOL = 1e-3


def case_id(shape):
    return "x".join(map(str, shape))


class Workspace:
    """The arrays of one case: x, grad_out, weight, bias (float32), and outputs written in place."""

    def __init__(self, shape, seed=0):
        rng = np.random.default_rng(seed)
        self.shape, self.D = shape, shape[-1]
        self.x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(np.float32)
        self.g = rng.standard_normal(shape).astype(np.float32)
        self.w = rng.uniform(0.5, 1.5, self.D).astype(np.float32)
        self.b = rng.standard_normal(self.D).astype(np.float32)
        self.out = np.empty_like(self.x)
        self.gx = np.empty_like(self.x)
        self.copy_dst = np.empty_like(self.x)
        self.bound_y = np.empty_like(self.x)
        self.bound_gx = np.empty_like(self.x)


# ---- bn_simd ---------------------------------------------------------------------------------------------------------

def bn_simd_calls(ws, op):
    x, g, w, b, D, y, gx = ws.x, ws.g, ws.w, ws.b, ws.D, ws.out, ws.gx
    if op == "layer_norm":
        def forward():
            return bn_simd.layer_norm_forward(x, D, w, b, eps=EPS, out=y)[0]

        def forward_backward():
            _, mean, rstd = bn_simd.layer_norm_forward(x, D, w, b, eps=EPS, out=y)
            return bn_simd.layer_norm_backward(g, x, mean, rstd, D, w, b, out=gx)[0]

        def eval_():
            return bn_simd.layer_norm(x, D, w, b, EPS, out=y)
    else:
        def forward():
            return bn_simd.rms_norm_forward(x, D, w, eps=EPS, out=y)[0]

        def forward_backward():
            _, rstd = bn_simd.rms_norm_forward(x, D, w, eps=EPS, out=y)
            return bn_simd.rms_norm_backward(g, x, rstd, D, w, out=gx)[0]

        def eval_():
            return bn_simd.rms_norm(x, D, w, EPS, out=y)
    return {"forward": forward, "forward+backward": forward_backward, "eval": eval_}


# ---- plain NumPy -----------------------------------------------------------------------------------------------------

def numpy_calls(ws, op):
    """Layer norm and RMS norm as NumPy code is written: ufuncs over the last axis, every temporary allocated, in
    float32."""
    x, g, w, b = ws.x, ws.g, ws.w, ws.b
    rows = tuple(range(x.ndim - 1))

    def ln_forward():
        mean = x.mean(axis=-1, keepdims=True)
        xc = x - mean
        rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + np.float32(EPS))
        return xc * rstd * w + b, mean, rstd

    def ln_backward(mean, rstd):
        xhat = (x - mean) * rstd
        gh = g * w
        gw, gb = (g * xhat).sum(axis=rows), g.sum(axis=rows)
        gx = rstd * (gh - gh.mean(axis=-1, keepdims=True) - xhat * (gh * xhat).mean(axis=-1, keepdims=True))
        return gx, gw, gb

    def rms_forward():
        rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + np.float32(EPS))
        return x * rstd * w, rstd

    def rms_backward(rstd):
        xhat = x * rstd
        gh = g * w
        gw = (g * xhat).sum(axis=rows)
        gx = rstd * (gh - xhat * (gh * xhat).mean(axis=-1, keepdims=True))
        return gx, gw

    if op == "layer_norm":
        return {"forward": lambda: ln_forward()[0],
                "forward+backward": lambda: ln_backward(*ln_forward()[1:])[0],
                "eval": lambda: ln_forward()[0]}
    return {"forward": lambda: rms_forward()[0],
            "forward+backward": lambda: rms_backward(rms_forward()[1])[0],
            "eval": lambda: rms_forward()[0]}


# ---- PyTorch ---------------------------------------------------------------------------------------------------------

def torch_calls(ws, op):
    torch = impls.torch_module()
    if torch is None:
        return {}
    TF = torch.nn.functional
    x, g, w, b = (torch.from_numpy(a) for a in (ws.x, ws.g, ws.w, ws.b))
    D = ws.D
    xr, wr, br = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    if op == "layer_norm":
        def fn(x_, w_, b_):
            return TF.layer_norm(x_, (D,), w_, b_, EPS)
    else:
        def fn(x_, w_, b_):
            return TF.rms_norm(x_, (D,), w_, EPS)

    def forward():
        with torch.no_grad():
            return fn(x, w, b)

    def forward_backward():
        xr.grad = wr.grad = br.grad = None  # (no accumulation into the previous call's gradients)
        fn(xr, wr, br).backward(g)
        return xr.grad

    return {"forward": forward, "forward+backward": forward_backward, "eval": forward}


def bound_calls(ws):
    """Each mode's least traffic, moved by PyTorch's sweeps (module docstring, "bound"); {} without PyTorch."""
    torch = impls.torch_module()
    if torch is None:
        return {}
    x, g, y, gx = (torch.from_numpy(a) for a in (ws.x, ws.g, ws.bound_y, ws.bound_gx))

    def two_passes():  # read x, write y
        y.copy_(x)

    def five_passes():  # the forward's two, then read dy and x, write dx
        y.copy_(x)
        torch.add(g, x, out=gx)

    return {"forward": two_passes, "eval": two_passes, "forward+backward": five_passes}


# ---- ONNX Runtime ----------------------------------------------------------------------------------------------------

def onnx_model(ws, op):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    shape = list(ws.shape)
    inits = [numpy_helper.from_array(ws.w, "W")]
    if op == "layer_norm":
        inits.append(numpy_helper.from_array(ws.b, "B"))
        node = helper.make_node("LayerNormalization", ["X", "W", "B"], ["Y"], axis=-1, epsilon=EPS)
        opset = 17
    else:
        node = helper.make_node("RMSNormalization", ["X", "W"], ["Y"], axis=-1, epsilon=EPS)
        opset = 23
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def onnxruntime_calls(ws, op, warn):
    if impls.onnxruntime_module() is None:
        return {}
    out = np.empty_like(ws.x)
    try:
        runner = impls.onnxruntime_runner(onnx_model(ws, op), type("WS", (), {"x": ws.x, "out": out}))
    except Exception as e:  # noqa: BLE001  (a runtime without the operator: its column stays empty)
        warn(f"ONNX Runtime cannot run {op}: {str(e)[:160]}")
        return {}
    return {"eval": runner.call}


# ---- measure ---------------------------------------------------------------------------------------------------------

def _as_array(r):
    if isinstance(r, tuple):
        r = r[0]
    return r.detach().numpy() if hasattr(r, "detach") else np.asarray(r)


def measure(args, warn, progress):
    rows = []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.threads))
    budget = timing.QUICK if args.quick else timing.FULL
    for shape in CASES:
        cid = case_id(shape)
        if args.only and not any(t in cid for t in args.only):
            continue
        ws = Workspace(shape)
        copy = impls.split_copy(ws.x, ws.copy_dst, args.threads, pool)
        bounds = bound_calls(ws)
        for op in OPS:
            calls = {"bn_simd": bn_simd_calls(ws, op), "torch": torch_calls(ws, op),
                     "onnxruntime": onnxruntime_calls(ws, op, warn), "numpy": numpy_calls(ws, op)}
            for mode in MODES:
                fns = {name: c[mode] for name, c in calls.items() if mode in c}
                ref = _as_array(fns["bn_simd"]()).copy()
                diffs = {}
                for name, fn in fns.items():
                    if name != "bn_simd":
                        diffs[name] = float(np.max(np.abs(_as_array(fn()) - ref))) if ref.size else 0.0
                        if not diffs[name] <= AGREEMENT_TOL:
                            warn(f"{cid} {op} {mode}: {name} differs from bn_simd by {diffs[name]:.3g}")
                fns["copy"] = copy
                if mode in bounds:
                    fns["bound"] = bounds[mode]
                names = list(fns)
                res, others, _ = timing.undisturbed(
                    lambda: timing.interleaved_medians([fns[n] for n in names], target_s=budget["target_s"],
                                                       k_min=budget["k_min"], k_max=budget["k_max"]),
                    args.retries, f"{cid} {op} {mode}", progress, args.wait_idle)
                row = {"case": cid, "shape": list(shape), "op": op, "mode": mode, "bytes": ws.x.nbytes,
                       "ms": {n: t * 1e3 for n, (t, _) in zip(names, res)}, "samples": res[0][1],
                       "max_difference": diffs, "other_cores": others}
                rows.append(row)
                progress(f"{cid} {op} {mode}: " + ", ".join(f"{n} {v:.4g} ms" for n, v in row["ms"].items()))
    pool.shutdown()
    return rows


# ---- report ----------------------------------------------------------------------------------------------------------

TITLES = {"torch": "PyTorch", "onnxruntime": "ONNX RT", "numpy": "NumPy"}


def table(rows):
    lines = ["| case | op | mode | bn_simd ms | PyTorch ms (×) | ONNX RT ms (×) | NumPy ms (×) "
             "| copy ms (fraction) | bound ms (fraction) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        t = ms["bn_simd"]
        cells = [r["case"], r["op"], r["mode"], f"{t:.4g}"]
        for name in ("torch", "onnxruntime", "numpy"):
            cells.append(f"{ms[name]:.4g} ({ms[name] / t:.2f}×)" if name in ms else "")
        # (the copy moves forward and eval's two passes: no fraction for forward+backward's five)
        cells.append(f"{ms['copy']:.4g} ({ms['copy'] / t:.2f})" if r["mode"] != "forward+backward" else "")
        cells.append(f"{ms['bound']:.4g} ({ms['bound'] / t:.2f})" if "bound" in ms else "")
        busy = r["other_cores"] is not None and r["other_cores"] > timing.BUSY_CORES
        if busy:
            cells[-1] += " (busy)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows):
    """[(target, row, value, ceiling, met)] for the issue's speed targets, on the rows measured. ceiling: for a
    target "≥ k× a peer", the peer's time over the mode's traffic bound, the most a kernel moving that traffic at
    PyTorch's copy speed reaches (None when not measured); met: "yes", "no", or "bound" where the ceiling is below
    k."""
    out = []

    def faster(what, name, ms, t, peer, k):
        ceiling = ms[peer] / ms["bound"] if "bound" in ms else None
        value = ms[peer] / t
        met = "yes" if value >= k else "bound" if ceiling is not None and ceiling < k else "no"
        out.append((what, name, value, ceiling, met))

    for r in rows:
        ms, t = r["ms"], r["ms"]["bn_simd"]
        name = f"{r['case']} {r['op']} {r['mode']}"
        if r["mode"] == "forward" and r["bytes"] >= LARGE_BYTES:
            out.append(("forward ≥ 0.8 of the copy's bandwidth", name, ms["copy"] / t, None,
                        "yes" if ms["copy"] / t >= 0.8 else "no"))
        if "torch" in ms:
            if r["mode"] == "forward":
                faster("≥ 2.5× PyTorch forward", name, ms, t, "torch", 2.5)
            if r["mode"] == "forward+backward":
                faster("≥ 2× PyTorch forward+backward", name, ms, t, "torch", 2.0)
            if tuple(r["shape"]) in LATENCY and r["mode"] in ("forward", "eval"):
                out.append(("batch-1 latency ≤ 0.5× PyTorch's", name, t / ms["torch"], None,
                            "yes" if t / ms["torch"] <= 0.5 else "no"))
        if "onnxruntime" in ms and r["mode"] == "eval":
            faster("≥ 2× ONNX Runtime eval", name, ms, t, "onnxruntime", 2.0)
    return out


def targets_table(checks):
    lines = ["| target | row | value | ceiling (peer ÷ bound) | met |", "|---|---|---|---|---|"]
    for what, name, value, ceiling, met in checks:
        lines.append(f"| {what} | {name} | {value:.2f} | {'' if ceiling is None else f'{ceiling:.2f}'} | {met} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=cli.positive_int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer samples (about a quarter of the time)")
    p.add_argument("--only", nargs="*", default=None, help="cases whose id contains one of the texts")
    p.add_argument("--json", default=None, help="write every row (times, samples, differences) to this file")
    p.add_argument("--retries", type=int, default=1,
                   help="rows during which other processes took more than 0.1 core are timed again, at most this "
                        "many times; the least disturbed attempt is kept (default 1)")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="before a retry, wait at most this many seconds for idle CPUs (default 0)")
    args = p.parse_args(argv)
    machine.steady_allocator()
    impls.configure(args.threads)
    warnings = []
    v = impls.versions()
    print(f"{machine.describe()}; bn_simd {v['bn_simd']} ({bn_simd.get_isa()}), torch {v['torch']}, "
          f"onnxruntime {v['onnxruntime']}, numpy {v['numpy']}; {args.threads} threads; float32", file=sys.stderr)
    rows = measure(args, warnings.append, lambda s: print(s, file=sys.stderr))
    if not rows:
        print(f"no case matches --only {' '.join(args.only or [])}", file=sys.stderr)
        return 2
    checks = targets(rows)
    print(table(rows))
    print()
    print(targets_table(checks))
    if args.json:
        with open(args.json, "w") as f:
            keys = ("target", "row", "value", "ceiling", "met")
            json.dump({"versions": v, "threads": args.threads, "machine": machine.describe(), "rows": rows,
                       "targets": [dict(zip(keys, c)) for c in checks]}, f, indent=1)
    for w in warnings:
        print("warning:", w, file=sys.stderr)
    return 1 if any("differs" in w for w in warnings) else 0


if __name__ == "__main__":
    sys.exit(main())
