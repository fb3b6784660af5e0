"""How idle OpenMP threads wait after a call (bn_simd/_openmp.py): a spin of about 200 us, then sleep.

Each test imports bn_simd in a fresh process, since the OpenMP runtime reads its settings once, when it is loaded.
OMP_DISPLAY_ENV=verbose makes libgomp print the settings it took at that moment, which shows that the spin count
reached the runtime itself and not only the environment.
"""
import os
import re
import subprocess
import sys

import pytest

import bn_simd
from conftest import HAVE_OPENMP

pytestmark = pytest.mark.skipif(not HAVE_OPENMP or bn_simd.show_config()["omp_spin"]["runtime"] != "libgomp",
                                reason="needs a GCC build with OpenMP (libgomp)")

_REPORT = "import os, bn_simd; print(repr(bn_simd.show_config()['omp_spin'])); print(os.environ.get('GOMP_SPINCOUNT'))"


def _run(code=_REPORT, **env):
    e = {k: v for k, v in os.environ.items()
         if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "BN_SIMD_SPIN_US", "OMP_DISPLAY_ENV")}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)
    return r


def _policy(r):
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    return eval(lines[0]), lines[1]  # (a dict literal printed by the child)


def _runtime_spincount(stderr):
    m = re.search(r"GOMP_SPINCOUNT = '(\d+)'", stderr)
    return int(m.group(1)) if m else None


def test_the_spin_count_reaches_libgomp_and_leaves_the_environment():
    r = _run(OMP_DISPLAY_ENV="verbose")
    policy, env_after = _policy(r)
    assert policy["applied"] is True and policy["reason"] is None
    # about 200 us of spinning, whatever the CPU's pause costs (bounded by libgomp's default count)
    assert 1 <= policy["spin_count"] <= 300_000
    assert 100 <= policy["spin_us"] <= 300 or policy["spin_count"] in (1, 300_000)
    assert _runtime_spincount(r.stderr) == policy["spin_count"]
    assert env_after == "None"  # processes and libraries started later do not inherit it


@pytest.mark.parametrize("var, value", [("OMP_WAIT_POLICY", "passive"), ("OMP_WAIT_POLICY", "active"),
                                        ("GOMP_SPINCOUNT", "12345")])
def test_the_users_openmp_settings_win(var, value):
    r = _run(OMP_DISPLAY_ENV="verbose", **{var: value})
    policy, env_after = _policy(r)
    assert policy["applied"] is False and var in policy["reason"]
    if var == "GOMP_SPINCOUNT":
        assert _runtime_spincount(r.stderr) == 12345 and env_after == "12345"
    else:
        assert env_after == "None"


@pytest.mark.parametrize("us, expect_zero", [("0", True), ("50", False), ("1000", False)])
def test_bn_simd_spin_us_sets_the_spin_time(us, expect_zero):
    r = _run(OMP_DISPLAY_ENV="verbose", BN_SIMD_SPIN_US=us)
    policy, _ = _policy(r)
    assert policy["applied"] is True
    assert (policy["spin_count"] == 0) == expect_zero
    assert _runtime_spincount(r.stderr) == policy["spin_count"]
    if not expect_zero and policy["spin_count"] < 300_000:
        assert abs(policy["spin_us"] - float(us)) <= 0.05 * float(us) + 0.1


def test_bn_simd_spin_us_default_leaves_the_runtime_alone():
    r = _run(OMP_DISPLAY_ENV="verbose", BN_SIMD_SPIN_US="default")
    policy, env_after = _policy(r)
    assert policy["applied"] is False and "BN_SIMD_SPIN_US" in policy["reason"]
    assert _runtime_spincount(r.stderr) == 300_000 and env_after == "None"


@pytest.mark.parametrize("bad", ["-1", "fast", "nan", "1e12"])
def test_a_bad_bn_simd_spin_us_is_a_clear_error_at_import(bad):
    r = _run(BN_SIMD_SPIN_US=bad)
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "BN_SIMD_SPIN_US" in r.stderr and repr(bad) in r.stderr


def test_nothing_is_set_when_libgomp_was_loaded_before():
    code = "import ctypes; ctypes.CDLL('libgomp.so.1'); " + _REPORT
    policy, env_after = _policy(_run(code))
    assert policy["applied"] is False and "loaded" in policy["reason"]
    assert env_after == "None"


def test_threads_and_threadpoolctl_work_as_before():
    code = ("import bn_simd, numpy as np; from threadpoolctl import threadpool_info, threadpool_limits\n"
            "libs = [i for i in threadpool_info() if i['user_api'] == 'openmp']\n"
            "assert libs, threadpool_info()\n"
            "with threadpool_limits(1, user_api='openmp'):\n"
            "    assert bn_simd.get_num_threads() == 1\n"
            "x = np.random.default_rng(0).standard_normal((8, 16, 40, 40)).astype(np.float32)\n"
            "y1 = bn_simd.batch_norm_forward(x)[0]\n"
            "bn_simd.set_num_threads(1); y2 = bn_simd.batch_norm_forward(x)[0]\n"
            "assert (y1.tobytes() == y2.tobytes())\n"
            "print('ok', bn_simd.get_num_threads())")
    r = _run(code, OMP_NUM_THREADS="2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "1"]
