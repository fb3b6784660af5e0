"""The own team's C stress test (tests/c/test_team.c): jobs of changing thread counts, the team spinning, asleep and
told to stop, calls from several threads at once; each share runs once and is done before the call returns. Built
by gcc (or $CC) with OpenMP, and again under ThreadSanitizer where the compiler and the system have it; skipped
without a compiler or OpenMP, and off Linux (no team there)."""
import os
import subprocess
import sys
import tempfile

import pytest

from test_c_kernels import ROOT, compiler

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the own team is Linux's")


def _build(cc, flags, out):
    cmd = cc + ["-std=c11", "-fopenmp", "-I" + os.path.join(ROOT, "include"), "-I" + os.path.join(ROOT, "src"),
                *flags, os.path.join(ROOT, "tests", "c", "test_team.c"), "-o", out]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.parametrize("kind, flags", [("plain", ["-O2"]), ("tsan", ["-O1", "-g", "-fsanitize=thread"])])
def test_team_stress(kind, flags):
    cc = compiler()
    if cc is None:
        pytest.skip("no C compiler")
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "test_team")
        b = _build(cc, flags, exe)
        if b.returncode != 0:
            if kind == "tsan" or "fopenmp" in b.stderr:
                pytest.skip(f"cannot build the {kind} test here: {b.stderr.strip()[-300:]}")
            pytest.fail(b.stderr)
        # (a program of its own: without the sanitizer run's preloaded AddressSanitizer, which ThreadSanitizer's
        # binaries cannot run beside)
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}
        r = subprocess.run([exe], capture_output=True, text=True, timeout=300, env=env)
        if kind == "tsan" and r.returncode != 0 and "ThreadSanitizer" in r.stderr and "WARNING" not in r.stderr:
            pytest.skip(f"ThreadSanitizer cannot run here: {r.stderr.strip()[-300:]}")
        assert r.returncode == 0 and "0 failures" in r.stdout, r.stdout + r.stderr
