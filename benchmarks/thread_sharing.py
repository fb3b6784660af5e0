"""How bn_simd shares the CPU with the other threaded libraries of a NumPy program.

    python benchmarks/thread_sharing.py [--rounds 5] [--reps 150] [--json FILE]

Each setting runs in processes of its own (the OpenMP runtime reads its settings once, when it is loaded), the
settings taking turns round after round; a cell is the median over rounds of each process's median time.

Settings:
  bn_simd            the library as it is: its OpenMP threads spin ~200 us after a call, then sleep
  libgomp default    GOMP_SPINCOUNT=300000, libgomp's own default: how bn_simd behaved before it set the count
  passive            OMP_WAIT_POLICY=passive (a user's workaround: threads sleep at once)
  1 thread           bn_simd.set_num_threads(1) (the other workaround)

Workloads (float32, times per step in ms):
  mixed      A @ B (256x576 by 576x4096, OpenBLAS threads) then batch_norm(training=True) of 32x64x12x12
  bn loop    10 training batch_norm calls of 32x64x12x12, back to back (bn_simd alone)
  bn+relu    10 times: training batch_norm of 32x64x12x12, then np.maximum(y, 0, out=y)
  bn large   one training batch_norm of 32x64x56x56
  torch      a torch BatchNorm2d eval and a torch matmul after each bn_simd call (the torch time only)
  ort        an ONNX Runtime BatchNormalization (allow_spinning=0) after each bn_simd call (the ORT time only)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "bn_simd": {},
    "libgomp default": {"GOMP_SPINCOUNT": "300000"},
    "passive": {"OMP_WAIT_POLICY": "passive"},
    "1 thread": {"BN_SIMD_BENCH_ONE_THREAD": "1"},
}
WORKLOADS = ("mixed", "bn loop", "bn+relu", "bn large", "torch", "ort")


def _median_ms(fn, reps):
    for _ in range(max(3, reps // 20)):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def child(reps):
    """One process of one setting: every workload's median step time (ms), as JSON on stdout."""
    import numpy as np

    import bn_simd

    if os.environ.get("BN_SIMD_BENCH_ONE_THREAD"):
        bn_simd.set_num_threads(1)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 576), dtype=np.float32)
    b = rng.standard_normal((576, 4096), dtype=np.float32)
    x = rng.standard_normal((32, 64, 12, 12), dtype=np.float32)
    xl = rng.standard_normal((32, 64, 56, 56), dtype=np.float32)
    y, yl = np.empty_like(x), np.empty_like(xl)
    rm, rv = np.zeros(64, np.float32), np.ones(64, np.float32)

    def bn():
        bn_simd.batch_norm(x, rm, rv, training=True, out=y)

    def mixed():
        a @ b
        bn()

    def loop():
        for _ in range(10):
            bn()

    def relu():
        for _ in range(10):
            bn()
            np.maximum(y, 0, out=y)

    res = {"mixed": _median_ms(mixed, reps), "bn loop": _median_ms(loop, reps), "bn+relu": _median_ms(relu, reps),
           "bn large": _median_ms(lambda: bn_simd.batch_norm(xl, rm, rv, training=True, out=yl), max(20, reps // 5))}
    res["torch"] = _other_library_ms(_torch_step(xl, a, b), bn, reps)
    res["ort"] = _other_library_ms(_ort_step(xl), bn, reps)
    res["omp_spin"] = bn_simd.show_config()["omp_spin"]
    print(json.dumps(res))


def _other_library_ms(step, bn, reps):
    """Median time of step() when each call follows a bn_simd call (None when the library is missing)."""
    if step is None:
        return None
    ts = []
    for i in range(reps + 5):
        bn()
        t0 = time.perf_counter()
        step()
        if i >= 5:
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _torch_step(xl, a, b):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(2)
    bn = torch.nn.BatchNorm2d(xl.shape[1]).eval()
    tx, ta, tb = torch.from_numpy(xl), torch.from_numpy(a), torch.from_numpy(b)

    def step():
        with torch.no_grad():
            bn(tx)
            ta @ tb
    return step


def _ort_step(xl):
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return None
    C = xl.shape[1]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [C], v) for n, v in
             (("s", [1.0] * C), ("b", [0.0] * C), ("m", [0.0] * C), ("v", [1.0] * C))]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-5)
    shape = list(xl.shape)
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = np.empty_like(xl)
    io = sess.io_binding()
    io.bind_cpu_input("x", xl)
    io.bind_output("y", "cpu", 0, np.float32, shape, out.ctypes.data)

    def step():
        sess.run_with_iobinding(io)
        return out  # (the closure keeps the output buffer that ONNX Runtime writes alive)
    return step


def run(rounds, reps):
    results = {s: [] for s in SETTINGS}
    for _ in range(rounds):
        for name, env in SETTINGS.items():
            e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
            e.update(env)
            out = subprocess.run([sys.executable, __file__, "--child", "--reps", str(reps)], env=e,
                                 capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    return results


def table(results):
    med = {s: {w: (statistics.median(r[w] for r in rs) if rs and rs[0][w] is not None else None)
               for w in WORKLOADS} for s, rs in results.items()}
    lines = ["| setting | " + " | ".join(WORKLOADS) + " |", "|---|" + "---:|" * len(WORKLOADS)]
    for s, row in med.items():
        lines.append(f"| {s} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in row.values()) + " |")
    m = med["bn_simd"]
    best = min(med["passive"]["mixed"], med["1 thread"]["mixed"])
    old = med["libgomp default"]
    lines.append("")
    lines.append(f"mixed step: bn_simd / best workaround = {m['mixed'] / best:.3f} (target <= 1.10); "
                 f"libgomp default / best workaround = {old['mixed'] / best:.2f}")
    lines.append(f"bn loop: bn_simd / libgomp default = {m['bn loop'] / old['bn loop']:.3f} (target 0.95-1.05)")
    for w in ("bn+relu", "bn large", "torch", "ort"):
        if m[w] is not None:
            lines.append(f"{w}: bn_simd / libgomp default = {m[w] / old[w]:.3f}")
    spin = results["bn_simd"][0]["omp_spin"]
    lines.append(f"spin policy: {spin}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=150)
    p.add_argument("--json", help="write the raw per-process results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.reps)
    results = run(args.rounds, args.reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
