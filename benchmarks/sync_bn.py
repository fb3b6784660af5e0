"""SyncBatchNorm across processes: time per training call, bytes sent, difference to one process.

    python benchmarks/sync_bn.py [--reps 40] [--rounds 3] [--threads 1] [--procs 1,2,3] [--json FILE]

Needs mpi4py and an mpiexec (``pip install mpi4py mpich``). For each P in --procs the script starts
``mpiexec -n P`` copies of itself; they split one global batch into P pieces along its rows (on chunk boundaries,
so that exact mode is bitwise one process) and time a SyncBatchNorm forward + backward in each mode. The P = 1
reference is the plain BatchNorm layer on the whole batch in one process (measured in the P = 1 run).

The runs for P = 1, 2, 3 take turns for --rounds rounds; a cell is the median over rounds of the median over --reps
calls of rank 0's time for forward + backward (the ranks meet at a barrier before
each call, which is not timed), its ratio to the one-process BatchNorm call on the whole batch, the bytes each rank
hands to the collectives per call (the protocol's payload; the mpi4py adapter adds 8 bytes per allgather for the
lengths, and MPI's own algorithms move more or less than the payload), and the largest difference of y and grad_x
(over all ranks) to one process's results, in units of the data's eps times max |value|.

Each rank runs --threads OpenMP threads (default 1), so P ranks use P cores; with fewer cores than ranks the
processes share them and the times say so.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, nchw shape, layout, dtype): the global batch
CASES = [("conv 24x64x28x28", (24, 64, 28, 28), "NCHW", np.float32),
         ("conv NHWC 24x64x28x28", (24, 64, 28, 28), "NHWC", np.float32),
         ("fc 3072x256", (3072, 256), "NCHW", np.float32),
         ("conv 24x64x28x28 float64", (24, 64, 28, 28), "NCHW", np.float64)]


class Counting:
    """The bn_simd.sync protocol over another implementation, counting the payload bytes handed in."""

    def __init__(self, inner):
        self.inner, self.bytes = inner, 0

    def allreduce(self, buf):
        self.bytes += buf.nbytes
        return self.inner.allreduce(buf)

    def allgather(self, buf):
        self.bytes += buf.nbytes
        return self.inner.allgather(buf)


def layout_shape(shape, layout):
    return shape if layout == "NCHW" or len(shape) == 2 else (shape[0],) + shape[2:] + (shape[1],)


def worker(reps):
    sys.path.insert(0, ROOT)
    from mpi4py import MPI

    import bn_simd
    from bn_simd import sync
    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    rows = []
    for name, nchw, layout, dtype in CASES:
        shape = layout_shape(nchw, layout)
        C = nchw[1]
        rng = np.random.default_rng(0)
        x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        # pieces on chunk boundaries: whole chunks shared out as evenly as they go
        unit = sync.chunk_rows(shape, layout, dtype)
        xr, gr = (a if layout == "NCHW" else a.reshape(-1, C) for a in (x, g))
        chunks = -(-xr.shape[0] // unit)
        a, z = (min(chunks * r // P * unit, xr.shape[0]) for r in (rank, rank + 1))
        ref = bn_simd.BatchNorm(C, layout=layout, dtype=dtype)
        y_ref, gx_ref = ref(x), ref.backward(g)
        y_ref, gx_ref = (v if layout == "NCHW" else v.reshape(-1, C) for v in (y_ref, gx_ref))
        # one process: measured in the P = 1 run only (with more ranks, the others' waiting loads the CPUs)
        base = []
        for _ in range(5 if P == 1 else 0):
            ref(x)
            ref.backward(g)
        for _ in range(reps if P == 1 else 0):
            t = time.perf_counter()
            ref(x)
            ref.backward(g)
            base.append(time.perf_counter() - t)
        for mode in ("exact", "fast"):
            counted = Counting(sync.MPICommunicator(comm))
            layer = bn_simd.SyncBatchNorm(C, layout=layout, dtype=dtype, comm=counted, mode=mode)
            y, gx = layer(xr[a:z]), layer.backward(gr[a:z])
            scale = float(np.finfo(dtype).eps)
            diff = max(float(np.abs(y.astype(np.float64) - y_ref[a:z]).max(initial=0)) / (
                scale * float(np.abs(y_ref).max())), float(np.abs(gx.astype(np.float64) - gx_ref[a:z]).max(
                    initial=0)) / (scale * float(np.abs(gx_ref).max())))
            diff = comm.allreduce(diff, op=MPI.MAX)
            for _ in range(5):  # (warm-up)
                layer(xr[a:z])
                layer.backward(gr[a:z])
            counted.bytes = 0
            times = []
            for _ in range(reps):
                comm.Barrier()
                t = time.perf_counter()
                layer(xr[a:z])
                layer.backward(gr[a:z])
                times.append(time.perf_counter() - t)
            per_call = counted.bytes / reps
            if rank == 0:
                rows.append(dict(case=name, P=P, mode=mode, ms=1e3 * statistics.median(times),
                                 one_ms=1e3 * statistics.median(base) if base else None, bytes=per_call,
                                 diff_eps=diff))
    if rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--procs", default="1,2,3")
    ap.add_argument("--json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.reps)
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        sys.exit("sync_bn: mpiexec not found (pip install mpi4py mpich)")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    runs = {}
    for _ in range(args.rounds):
        for P in sorted({1} | {int(p) for p in args.procs.split(",")}):
            out = subprocess.run([exe, "-n", str(P), sys.executable, os.path.abspath(__file__), "--worker",
                                  "--reps", str(args.reps)], env=env, capture_output=True, text=True, check=True,
                                 cwd=ROOT).stdout
            for r in json.loads(next(line[5:] for line in out.splitlines() if line.startswith("ROWS "))):
                runs.setdefault((r["case"], r["P"], r["mode"]), []).append(r)
    rows = []
    for got in runs.values():
        row = dict(got[0])
        for k in ("ms", "one_ms"):
            row[k] = statistics.median(r[k] for r in got) if got[0][k] is not None else None
        row["diff_eps"] = max(r["diff_eps"] for r in got)
        rows.append(row)
    rows.sort(key=lambda r: (r["P"], [c[0] for c in CASES].index(r["case"]), r["mode"]))
    print(f"{os.cpu_count()} CPUs, {args.threads} OpenMP thread(s) per rank, median of {args.rounds} rounds "
          f"of the median of {args.reps} calls")
    print("| case | P | mode | forward+backward (ms) | vs one process | bytes sent per rank per call | "
          "max diff to one process (eps * max|v|) |")
    print("|---|---|---|---|---|---|---|")
    one = {r["case"]: r["one_ms"] for r in rows if r["P"] == 1}
    for r in rows:
        r["one_ms"] = one[r["case"]]
        print(f"| {r['case']} | {r['P']} | {r['mode']} | {r['ms']:.2f} | {r['ms'] / r['one_ms']:.2f}x "
              f"(1 process: {r['one_ms']:.2f}) | {r['bytes']:.0f} | {r['diff_eps']:.2g} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
