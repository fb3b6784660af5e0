"""SyncBatchNorm across real processes: mpiexec -n 2 and -n 3 (mpi4py), and torch.distributed gloo over 2 processes.

Each runs tests/sync_worker.py, whose ranks compare their results with one process running BatchNorm on the whole
batch (exact mode bitwise, fast mode within float64 ulps); under gloo bn_simd.torch.SyncBatchNorm as well.
Skipped when mpi4py / mpiexec or torch are absent.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

import bn_simd

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "sync_worker.py")
ROOT = os.path.dirname(HERE)


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # (P processes share the cores)
    env["BN_SIMD_UNDER_TEST"] = os.path.dirname(os.path.dirname(os.path.abspath(bn_simd.__file__)))
    return env


@pytest.fixture(autouse=True)
def _not_under_asan():
    # (the sanitizer run, .ci/asan, preloads its runtime: MPI's launcher and the ranks would run under it too)
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("processes are not started under the sanitizer's preloaded runtime")


def _run(commands, timeout=60):
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
             for c in commands]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def _mpiexec():
    pytest.importorskip("mpi4py")
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        pytest.skip("mpiexec not found")
    return exe


@pytest.mark.parametrize("P", [2, 3])
def test_mpi_ranks_get_one_process_results(P):
    exe = _mpiexec()
    [(rc, out)] = _run([[exe, "-n", str(P), sys.executable, WORKER, "mpi"]])
    assert rc == 0, out
    # (the ranks' lines may interleave)
    assert sorted(re.findall(r"ok (\d)", out)) == [str(r) for r in range(P)], out


def test_torch_gloo_ranks_get_one_process_results(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("torch.distributed")
    init = str(tmp_path / "init")
    outs = _run([[sys.executable, WORKER, "gloo", str(r), "2", init] for r in range(2)], timeout=120)
    for rank, (rc, out) in enumerate(outs):
        assert rc == 0, out
        assert f"ok {rank}" in out, out
