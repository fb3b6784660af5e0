"""Configuration: ISA selection, threads, show_config."""
import os
import subprocess
import sys

import pytest
from threadpoolctl import threadpool_limits

import bn_simd


def test_show_config_keys():
    cfg = bn_simd.show_config()
    assert {"version", "isa", "supported_isas", "openmp", "num_threads"} <= set(cfg)
    assert cfg["isa"] in cfg["supported_isas"] and "scalar" in cfg["supported_isas"]
    assert cfg["version"] == bn_simd.__version__
    assert cfg["num_threads"] >= 1


def test_set_num_threads(threads):
    threads(3)
    assert bn_simd.get_num_threads() == (3 if bn_simd.show_config()["openmp"] else 1)
    for bad, exc in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc):
            bn_simd.set_num_threads(bad)


def test_threadpoolctl_is_respected():
    if not bn_simd.show_config()["openmp"]:
        pytest.skip("built without OpenMP")
    with threadpool_limits(1, "openmp"):
        assert bn_simd.get_num_threads() == 1


def test_set_isa_validates():
    with pytest.raises(ValueError, match="must be one of"):
        bn_simd.set_isa("sse9")
    with pytest.raises(TypeError):
        bn_simd.set_isa(2)
    prev = bn_simd.get_isa()
    bn_simd.set_isa("scalar")
    assert bn_simd.get_isa() == "scalar"
    bn_simd.set_isa("auto")
    assert bn_simd.get_isa() == bn_simd.show_config()["best_isa"]
    bn_simd.set_isa(prev)


def _run(code, **env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


@pytest.mark.parametrize("isa", bn_simd.show_config()["supported_isas"])
def test_env_var_selects_isa(isa):
    r = _run("import bn_simd; print(bn_simd.get_isa())", BN_SIMD_ISA=isa)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == isa


def test_env_var_bad_value_is_a_clear_error():
    r = _run("import bn_simd", BN_SIMD_ISA="neon")
    assert r.returncode != 0
    assert "BN_SIMD_ISA must be one of" in r.stderr
    assert "Segmentation" not in r.stderr


def test_omp_num_threads_is_respected():
    r = _run("import bn_simd; print(bn_simd.get_num_threads())", OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


def test_main_self_check_runs():
    r = _run("import sys, bn_simd.__main__ as m; sys.exit(m.main(['check']))")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all passed" in r.stdout
