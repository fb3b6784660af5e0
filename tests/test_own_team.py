"""The library's own team of threads (src/team.h), which runs the layer-norm and RMS-norm forwards in place of an
OpenMP region: the same bytes as OpenMP's team and as one thread, in every form those forwards take; Python threads
calling at once; a fork after it ran; its threads asleep after the spin time; its settings (BN_SIMD_OWN_TEAM, the
spin time of bn_simd/_openmp.py)."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import bn_simd
from bn_simd import _core
from conftest import HAVE_OPENMP, assert_same_bits

pytestmark = pytest.mark.skipif(not HAVE_OPENMP or not sys.platform.startswith("linux") or
                                len(os.sched_getaffinity(0)) < 2,
                                reason="the own team needs an OpenMP build on Linux and two CPUs")


@pytest.fixture(autouse=True)
def _team_settings():
    """Each test starts and ends with the team's settings as the process found them."""
    enabled, spin = _core.own_team()
    yield
    _core.own_team(enabled, spin)


# (the team serves calls of at most this many threads: more would share CPUs, where OpenMP's runtime stops spinning)
NCPU = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def _ran_on_the_team(call, team=True):
    """call()'s result, asserting that the own team ran it (team=False: that OpenMP did)"""
    before = _core.own_team_runs()
    out = call()
    assert _core.own_team_runs() == before + team, "the own team did not run the call" if team else "it did"
    return out


def _case(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    return x


def _forward(op, x, C, layout, act, res, w, b):
    if op == "layer":
        return bn_simd.layer_norm_forward(x, C, w, b, layout=layout, activation=act, residual=res)
    return bn_simd.rms_norm_forward(x, C, w, activation=act, residual=res)


def _dtypes():
    out = [np.float32, np.float64, np.float16]
    try:
        import ml_dtypes
        out.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("dtype", _dtypes(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op, layout", [("layer", None), ("rms", None), ("layer", "NCHW")])
@pytest.mark.parametrize("act, with_res", [(None, False), ("relu", False), ("silu", True)])
@pytest.mark.parametrize("nthreads", [2, 3, 4])
def test_the_team_gives_the_bytes_of_openmp_and_of_one_thread(dtype, op, layout, act, with_res, nthreads, threads):
    # rows of 768 (a thread's share of several blocks) and a ragged count, so that the shares differ in size; the
    # channels-first form: 32 channels of 33 x 33 positions
    shape = (2, 32, 33, 33) if layout else (3, 67, 768)
    C = shape[1] if layout else shape[-1]
    x = _case(shape, dtype)
    res = _case(shape, dtype, seed=1) if with_res else None
    w = np.linspace(0.5, 1.5, C, dtype=np.float32)
    b = np.linspace(-1, 1, C, dtype=np.float32) if op == "layer" else None
    threads(1)
    one = _forward(op, x, C, layout, act, res, w, b)
    threads(nthreads)
    _core.own_team(False)
    omp = _forward(op, x, C, layout, act, res, w, b)
    on = nthreads <= NCPU  # (more threads than CPUs: OpenMP's)
    _core.own_team(True, 0.0)  # (no spin: the team may run at once after OpenMP's region, woken from its sleep)
    team = _ran_on_the_team(lambda: _forward(op, x, C, layout, act, res, w, b), on)
    _core.own_team(True, 200.0)
    time.sleep(0.002)  # (OpenMP's threads no longer spin: the team may run; its threads now spin between calls)
    first = _ran_on_the_team(lambda: _forward(op, x, C, layout, act, res, w, b), on)
    # (right after: the team's spinning threads, unless one was late for its share in the call before, on a busy
    # machine, when this call takes OpenMP's: the same bytes either way)
    spun = _forward(op, x, C, layout, act, res, w, b)
    for outs in (omp, team, first, spun):
        for a, e in zip(outs, one):
            assert_same_bits(a, e, "the own team's forward vs one thread's")


def test_the_team_waits_for_openmps_threads_to_stop_spinning(threads):
    """Right after an OpenMP region of the library's (a batch-norm call), whose threads then spin on the cores the
    team would take, the forward takes an OpenMP region too; once they sleep, the team."""
    threads(2)
    _core.own_team(True, 1e6)  # (1 s: the OpenMP region surely ended less than that ago)
    x = _case((1, 128, 768), np.float32)
    xb = _case((8, 16, 32, 32), np.float32)
    bn_simd.batch_norm(xb, None, None, training=True)
    before = _core.own_team_runs()
    y = bn_simd.layer_norm(x, 768)
    assert _core.own_team_runs() == before
    _core.own_team(True, 0.0)
    y2 = _ran_on_the_team(lambda: bn_simd.layer_norm(x, 768))
    assert_same_bits(y2, y, "the forward on the own team vs on OpenMP's")


def test_one_thread_and_a_switched_off_team_take_no_team(threads):
    x = _case((1, 128, 768), np.float32)
    _core.own_team(True, 0.0)
    threads(1)
    before = _core.own_team_runs()
    bn_simd.layer_norm(x, 768)
    threads(2)
    _core.own_team(False)
    bn_simd.layer_norm(x, 768)
    assert _core.own_team_runs() == before


def test_python_threads_calling_at_once_get_the_serial_bytes(threads):
    """The team serves one call at a time: the others take OpenMP regions, with the same bytes."""
    threads(2)
    _core.own_team(True, 200.0)
    cases = [_case((1, 40 + 8 * i, 768), np.float32, seed=i) for i in range(6)]
    serial = [bn_simd.layer_norm_forward(x, 768) for x in cases]
    got = [None] * len(cases)
    errors = []
    barrier = threading.Barrier(len(cases))

    def run(i):
        try:
            barrier.wait()
            for _ in range(300):
                out = bn_simd.layer_norm_forward(cases[i], 768)
                for a, e in zip(out, serial[i]):
                    if a.tobytes() != e.tobytes():
                        raise AssertionError(f"thread {i}: a concurrent call's bytes differ")
            got[i] = out
        except BaseException as e:  # noqa: BLE001  (reported by the test's thread)
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    before = _core.own_team_runs()
    time.sleep(0.002)  # (the serial calls' OpenMP threads asleep: the team may serve the first call)
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    assert not errors, errors[0]
    assert all(g is not None for g in got)
    assert _core.own_team_runs() > before  # (some of the calls ran on the team)


_FORK = r"""
import os, sys, numpy as np, bn_simd
from bn_simd import _core
bn_simd.set_num_threads(2)
_core.own_team(True, 0.0)  # (no spin: every call may take the team)
x = np.random.default_rng(0).standard_normal((4, 64, 768)).astype(np.float32)
runs = _core.own_team_runs()
y = bn_simd.layer_norm(x, 768)
assert _core.own_team_runs() == runs + 1, "the parent's call did not run on the team"
pid = os.fork()
if pid == 0:
    # the child has only the forking thread: the team starts again for its first call
    ok = all(bn_simd.layer_norm(x, 768).tobytes() == y.tobytes() for _ in range(50))
    ok = ok and _core.own_team_runs() >= runs + 2
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert bn_simd.layer_norm(x, 768).tobytes() == y.tobytes()
print("ok")
"""


def test_a_child_of_fork_gets_a_team_of_its_own():
    r = subprocess.run([sys.executable, "-c", _FORK], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def _team_tasks():
    """(tid, CPU seconds) of this process's team threads"""
    out = []
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != "bn_simd-team":
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out.append((tid, (int(fields[11]) + int(fields[12])) / tick))  # utime + stime
    return out


def test_the_teams_threads_sleep_after_the_spin_time(threads):
    """A thread of the team spins after a call for the spin time (200 us here), then sleeps: over the next half
    second it takes next to no CPU time."""
    threads(2)
    _core.own_team(True, 200.0)
    time.sleep(0.002)
    x = _case((1, 128, 768), np.float32)
    _ran_on_the_team(lambda: bn_simd.layer_norm(x, 768))
    time.sleep(0.05)
    a = dict(_team_tasks())
    assert a, "no thread named bn_simd-team"
    time.sleep(0.5)
    b = dict(_team_tasks())
    spent = max(b[t] - a[t] for t in a if t in b)
    assert spent <= 0.05, f"a team thread took {spent} s of CPU over 0.5 s idle"


def _config(**env):
    e = {k: v for k, v in os.environ.items()
         if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "BN_SIMD_SPIN_US", "BN_SIMD_OWN_TEAM")}
    e.update(env)
    code = "import bn_simd; c = bn_simd.show_config()['own_team']; print(c['enabled'], c['spin_us'])"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


@pytest.mark.parametrize("env, enabled, spin", [
    ({}, "True", lambda us: 100 <= us <= 300),
    ({"BN_SIMD_OWN_TEAM": "0"}, "False", lambda us: True),
    ({"BN_SIMD_OWN_TEAM": "1", "BN_SIMD_SPIN_US": "50"}, "True", lambda us: 20 <= us <= 80),
    ({"BN_SIMD_SPIN_US": "0"}, "True", lambda us: us == 0),
    ({"OMP_WAIT_POLICY": "passive"}, "True", lambda us: us == 0),
])
def test_the_teams_settings_come_from_the_environment(env, enabled, spin):
    r = _config(**env)
    assert r.returncode == 0, r.stderr
    on, us = r.stdout.split()
    assert on == enabled and spin(float(us)), r.stdout


def test_a_bad_bn_simd_own_team_is_a_clear_error_at_import():
    r = _config(BN_SIMD_OWN_TEAM="sometimes")
    assert r.returncode != 0 and "BN_SIMD_OWN_TEAM must be 0 or 1" in r.stderr and "'sometimes'" in r.stderr


_BOUND = r"""
import numpy as np, bn_simd
from bn_simd import _core
bn_simd.set_num_threads(2)
x = np.random.default_rng(0).standard_normal((1, 128, 768)).astype(np.float32)
y = bn_simd.layer_norm(x, 768)
z = bn_simd.layer_norm(x, 768)
print(_core.own_team_runs(), z.tobytes() == y.tobytes())
"""


def test_threads_bound_by_omp_proc_bind_take_openmps_team():
    """OMP_PROC_BIND binds the calling thread to one place, which threads it starts would share: OpenMP's runtime
    places its own threads; the team does not run."""
    # (no spin: every call may take the team, even one right after a call whose team thread came late)
    e = dict(os.environ, OMP_PROC_BIND="true", BN_SIMD_SPIN_US="0")
    r = subprocess.run([sys.executable, "-c", _BOUND], capture_output=True, text=True, env=e, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "True"]
    r = subprocess.run([sys.executable, "-c", _BOUND], capture_output=True, text=True, timeout=120,
                       env={**{k: v for k, v in os.environ.items() if k not in ("OMP_PROC_BIND", "BN_SIMD_OWN_TEAM")},
                            "BN_SIMD_SPIN_US": "0"})
    assert r.returncode == 0 and r.stdout.split() == ["2", "True"], r.stdout + r.stderr


def test_the_c_library_stays_loaded():
    """The team's threads run the library's code until the process ends: libbn_simd.so is marked never to unload."""
    import shutil
    lib = os.path.join(os.path.dirname(bn_simd.__file__), "lib", "libbn_simd.so")
    if not os.path.exists(lib) or not shutil.which("readelf"):
        pytest.skip("no libbn_simd.so or no readelf")
    out = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True).stdout
    assert "NODELETE" in out
