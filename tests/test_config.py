"""Configuration: show_config, ISA selection (set_isa, BN_SIMD_ISA), thread count (set_num_threads, OpenMP)."""
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import bn_simd
from bn_simd import _core
from conftest import HAVE_OPENMP, SUPPORTED_ISAS


def test_show_config_reports_the_build_and_run_time_settings():
    cfg = bn_simd.show_config()
    assert {"version", "isa", "supported_isas", "openmp", "num_threads"} <= set(cfg)
    assert cfg["version"] == bn_simd.__version__ and isinstance(cfg["version"], str)
    assert "scalar" in cfg["supported_isas"]
    assert set(cfg["supported_isas"]) <= {"scalar", "avx2", "avx512"}
    assert cfg["isa"] in cfg["supported_isas"] and cfg["isa"] == bn_simd.get_isa()
    assert isinstance(cfg["openmp"], bool)
    assert isinstance(cfg["num_threads"], int) and cfg["num_threads"] >= 1
    assert cfg["num_threads"] == bn_simd.get_num_threads()


def _cpuinfo(field):
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    return ""


def _cpu_vendor():
    return _cpuinfo("vendor_id")


def _l1d_bytes():
    r = subprocess.run(["getconf", "LEVEL1_DCACHE_SIZE"], capture_output=True, text=True)
    return int(r.stdout.strip() or 0) if r.returncode == 0 and r.stdout.strip().isdigit() else 0


def _l2_bytes():
    r = subprocess.run(["getconf", "LEVEL2_CACHE_SIZE"], capture_output=True, text=True)
    return int(r.stdout.strip() or 0) if r.returncode == 0 and r.stdout.strip().isdigit() else 0


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or shutil.which("getconf") is None,
                    reason="needs /proc/cpuinfo and getconf for the CPU vendor and its L2 size")
def test_slab_budget_follows_the_cpu_and_can_be_set():
    default, default_min = _core.slab_bytes(), _core.slab_min_input()
    # AMD CPUs with an L2 of 512 KiB or less group 4 times their L2 in calls whose inputs exceed 32 MiB, those of
    # family 19h (Zen 3, Zen 4) with an L2 of up to 1 MiB group 2 MiB in such calls, other AMD CPUs take two sweeps
    # (no slab path); others group up to half the L2 (512 KiB when none is reported) in any call
    l2 = _l2_bytes()
    known = 64 << 10 <= l2 <= 1 << 30
    if _cpu_vendor() == "AuthenticAMD":
        if known and l2 <= 512 << 10:
            assert (default, default_min) == (4 * l2, 32 << 20)
        elif known and l2 <= 1 << 20 and _cpuinfo("cpu family") == "25":
            assert (default, default_min) == (2 << 20, 32 << 20)
        else:
            assert (default, default_min) == (0, 0)
    else:
        assert (default, default_min) == (l2 // 2 if known else 512 << 10, 0)
    assert bn_simd.show_config()["slab_bytes"] == default
    assert bn_simd.show_config()["slab_min_input"] == default_min
    _core.set_slab_bytes(3 << 20)
    assert _core.slab_bytes() == 3 << 20 and bn_simd.show_config()["slab_bytes"] == 3 << 20
    assert _core.slab_min_input() == 0  # (a set budget holds for calls of any size)
    _core.set_slab_bytes(0)
    assert _core.slab_bytes() == 0
    for bad, exc in ((-1, ValueError), (1.5, TypeError), ("1M", TypeError), (True, TypeError)):
        with pytest.raises(exc, match="nbytes must be None or an int >= 0"):
            _core.set_slab_bytes(bad)
        assert _core.slab_bytes() == 0
    _core.set_slab_bytes(None)
    assert (_core.slab_bytes(), _core.slab_min_input()) == (default, default_min)


def test_stream_bytes_setting():
    assert _core.stream_bytes() == 32 << 20
    _core.set_stream_bytes(0)
    assert _core.stream_bytes() == 0
    for bad, exc in ((-1, ValueError), (1.5, TypeError), ("1M", TypeError), (True, TypeError)):
        with pytest.raises(exc, match="nbytes must be None or an int >= 0"):
            _core.set_stream_bytes(bad)
        assert _core.stream_bytes() == 0
    _core.set_stream_bytes(None)
    assert _core.stream_bytes() == 32 << 20


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or shutil.which("getconf") is None,
                    reason="needs /proc/cpuinfo and getconf for the CPU vendor and its L1d size")
def test_column_strip_threshold_follows_the_cpu_and_can_be_set():
    default = _core.cl_strip_bytes()
    # CPUs with an L1d of 48 KiB or more: Intel's sweep wide channels-last rows flat, AMD's go in column strips from
    # rows of the L1d's size; every other CPU from 24 KiB of row
    l1 = _l1d_bytes()
    big_l1 = 48 * 1024 <= l1 <= 1 << 20
    if big_l1 and _cpu_vendor() == "GenuineIntel":
        assert default == 2**63 - 1
    elif big_l1 and _cpu_vendor() == "AuthenticAMD":
        assert default == l1
    else:
        assert default == 24576
    # streamed sweeps: the same, except on AMD CPUs with an L2 of 512 KiB or less, where they are flat
    l2 = _l2_bytes()
    stream_flat = _cpu_vendor() == "AuthenticAMD" and 64 << 10 <= l2 <= 512 << 10
    stream_default = _core.cl_stream_strip_bytes()
    assert stream_default == (2**63 - 1 if stream_flat else default)
    assert bn_simd.show_config()["cl_strip_bytes"] == default
    assert bn_simd.show_config()["cl_stream_strip_bytes"] == stream_default
    _core.set_cl_strip_bytes(8192)
    assert _core.cl_strip_bytes() == 8192 and bn_simd.show_config()["cl_strip_bytes"] == 8192
    assert _core.cl_stream_strip_bytes() == 8192
    for bad in (0, 4095, -5):
        with pytest.raises(ValueError, match="nbytes must be None or at least 4096"):
            _core.set_cl_strip_bytes(bad)
        assert _core.cl_strip_bytes() == 8192 and _core.cl_stream_strip_bytes() == 8192
    _core.set_cl_strip_bytes(None)
    assert (_core.cl_strip_bytes(), _core.cl_stream_strip_bytes()) == (default, stream_default)


def test_set_isa_switches_kernels_and_show_config_follows(isa):
    assert bn_simd.get_isa() == isa
    assert bn_simd.show_config()["isa"] == isa


def test_set_isa_takes_a_str_subclass():
    """numpy.str_ (a str subclass, as a name read from an array or a config) selects the kernels as its str does."""
    bn_simd.set_isa("scalar")
    bn_simd.set_isa(np.str_(SUPPORTED_ISAS[-1]))
    assert bn_simd.get_isa() == SUPPORTED_ISAS[-1]


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
def test_get_num_threads_reports_no_more_than_a_call_starts(threads):
    """A setting beyond what a call starts (1024 threads at most, and OpenMP's thread limit) is reported capped."""
    threads(2**31 - 1)
    assert bn_simd.get_num_threads() == min(1024, bn_simd._core.thread_cap())
    assert bn_simd.show_config()["num_threads"] == bn_simd.get_num_threads()


def test_set_isa_auto_picks_the_best_supported():
    bn_simd.set_isa("scalar")
    bn_simd.set_isa("auto")
    cfg = bn_simd.show_config()
    assert cfg["isa"] == cfg.get("best_isa", cfg["isa"]) and cfg["isa"] in SUPPORTED_ISAS


@pytest.mark.parametrize("name,exc", [("sse9", ValueError), ("AVX3", ValueError), ("", ValueError),
                                      ("neon", ValueError), (2, TypeError), (None, TypeError)])
def test_set_isa_rejects_unknown_names_and_keeps_the_current_one(name, exc):
    before = bn_simd.get_isa()
    with pytest.raises(exc):
        bn_simd.set_isa(name)
    assert bn_simd.get_isa() == before


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
def test_set_num_threads_sets_and_none_restores(threads):
    default = bn_simd.get_num_threads()
    for n in (1, 2, 3, np.int64(5)):
        threads(n)
        assert bn_simd.get_num_threads() == n
        assert bn_simd.show_config()["num_threads"] == n
    threads(None)
    assert bn_simd.get_num_threads() == default


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError),
                                     ("2", TypeError), (2.0, TypeError)])
def test_set_num_threads_validates(bad, exc, threads):
    threads(2)
    with pytest.raises(exc):
        bn_simd.set_num_threads(bad)
    assert bn_simd.get_num_threads() == (2 if HAVE_OPENMP else 1)


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
def test_get_num_threads_follows_threadpoolctl_limits():
    default = bn_simd.get_num_threads()
    with threadpool_limits(limits=1, user_api="openmp"):
        assert bn_simd.get_num_threads() == 1
        assert bn_simd.show_config()["num_threads"] == 1
    assert bn_simd.get_num_threads() == default


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
def test_explicit_thread_count_wins_over_threadpoolctl(threads):
    threads(2)
    with threadpool_limits(limits=1, user_api="openmp"):
        assert bn_simd.get_num_threads() == 2


@pytest.mark.skipif(HAVE_OPENMP, reason="only without OpenMP")
def test_without_openmp_there_is_one_thread(threads):
    threads(4)
    assert bn_simd.get_num_threads() == 1


# ---- environment variables, in fresh processes ------------------------------------------------------------------

def _python(code, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("BN_SIMD_ISA", "OMP_NUM_THREADS")}
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


@pytest.mark.parametrize("value", SUPPORTED_ISAS + [SUPPORTED_ISAS[-1].upper(), " scalar "])
def test_bn_simd_isa_environment_variable_selects_the_kernels(value):
    r = _python("import bn_simd; print(bn_simd.get_isa())", BN_SIMD_ISA=value)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == value.strip().lower()


@pytest.mark.parametrize("value", ["auto", ""])
def test_bn_simd_isa_auto_or_empty_picks_the_best(value):
    r = _python("import bn_simd; c = bn_simd.show_config(); print(c['isa'], c['best_isa'])", BN_SIMD_ISA=value)
    assert r.returncode == 0, r.stderr
    isa, best = r.stdout.split()
    assert isa == best


@pytest.mark.parametrize("value", ["neon", "avx1024", "scalar,avx2"])
def test_bad_bn_simd_isa_is_a_clear_error_at_import(value):
    r = _python("import bn_simd", BN_SIMD_ISA=value)
    assert r.returncode != 0
    assert "ValueError" in r.stderr and "BN_SIMD_ISA" in r.stderr and repr(value) in r.stderr
    assert "scalar" in r.stderr  # it lists what is accepted
    assert "Segmentation" not in r.stderr and "core dumped" not in r.stderr


def _digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


_DIGEST_CODE = """
import hashlib, numpy as np, bn_simd
rng = np.random.default_rng(7)
h = hashlib.sha256()
for layout, shape in (("NCHW", (16, 24, 20, 20)), ("NHWC", (16, 20, 20, 24))):
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, m, s = bn_simd.batch_norm_forward(x, layout=layout)
    gx, gw, gb = bn_simd.batch_norm_backward(dy, x, m, s, layout=layout)
    for a in (y, m, s, gx, gw, gb):
        h.update(np.ascontiguousarray(a).tobytes())
print(bn_simd.get_num_threads(), h.hexdigest())
"""


def _digest_here():
    rng = np.random.default_rng(7)
    out = []
    for layout, shape in (("NCHW", (16, 24, 20, 20)), ("NHWC", (16, 20, 20, 24))):
        x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        y, m, s = bn_simd.batch_norm_forward(x, layout=layout)
        out += [y, m, s, *bn_simd.batch_norm_backward(dy, x, m, s, layout=layout)]
    return _digest(out)


@pytest.mark.skipif(not HAVE_OPENMP, reason="built without OpenMP")
def test_omp_num_threads_is_followed_and_gives_the_same_bits():
    r = _python(_DIGEST_CODE, OMP_NUM_THREADS="1", BN_SIMD_ISA=bn_simd.get_isa())
    assert r.returncode == 0, r.stderr
    threads, digest = r.stdout.split()
    assert threads == "1"
    assert digest == _digest_here()


def test_python_m_bn_simd_check_passes():
    r = _python("import sys, bn_simd.__main__ as m; sys.exit(m.main(['check']))")
    assert r.returncode == 0, r.stdout + r.stderr
