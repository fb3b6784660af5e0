"""The C kernel test (tests/c/test_kernels.c): every microkernel of src/kernels.def, on every ISA this CPU has, against
the scalar kernel. Built here from the sources with the flags of build_config.py (the ones setup.py gives them), by gcc
(or $CC), in a temporary directory; skipped when there is no compiler.

Run on its own (keeps the build when given a directory):

    python tests/test_c_kernels.py [-v] [BUILD_DIR]
"""
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import build_config  # noqa: E402

TEST_SOURCE = "tests/c/test_kernels.c"


def compiler():
    """The C compiler: $CC, else gcc; None when neither is found."""
    cc = os.environ.get("CC", "gcc").split()
    return cc if cc and shutil.which(cc[0]) else None


def build(cc, out_dir):
    """Compiles the kernel layer and the test into out_dir/test_kernels, two compilers at a time; returns its path.
    Raises RuntimeError with the compiler's output when a step fails."""
    includes = [f"-I{os.path.join(ROOT, d)}" for d in build_config.INCLUDE_DIRS]
    jobs = []
    # the kernels exactly as setup.py compiles them; the test itself at -O1 (a third of -O3's compile time), which
    # keeps -ffp-contract=off: its formulas round as written. The ISA files first: they take longest.
    sources = sorted(build_config.KERNEL_SOURCES, key=lambda s: s not in build_config.ISA_FLAGS) + [TEST_SOURCE]
    for src in sources:
        obj = os.path.join(out_dir, os.path.basename(src)[:-2] + ".o")
        flags = build_config.flags_for(src) + (["-O1"] if src == TEST_SOURCE else [])
        jobs.append((cc + flags + includes + ["-c", os.path.join(ROOT, src), "-o", obj], obj))
    objects, running = [], []
    for cmd, obj in jobs:
        running.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        objects.append(obj)
        if len(running) == 2:
            _finish(*running.pop(0))
    for r in running:
        _finish(*r)
    exe = os.path.join(out_dir, "test_kernels")
    link = cc + objects + ["-o", exe, "-lm"]
    r = subprocess.run(link, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(link)}\n{r.stdout}")
    return exe


def _finish(cmd, proc):
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{out}")


def test_every_listed_kernel_matches_the_scalar_kernel_on_every_isa_of_this_cpu():
    cc = compiler()
    if cc is None:
        pytest.skip("no C compiler (gcc or $CC) to build tests/c/test_kernels.c")
    with tempfile.TemporaryDirectory(prefix="bn_simd_ctest_") as d:
        try:
            exe = build(cc, d)
        except RuntimeError as e:
            pytest.fail(f"building the C kernel test failed:\n{e}")
        r = subprocess.run([exe], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert r.returncode == 0, f"tests/c/test_kernels.c failed (exit {r.returncode}):\n{r.stdout}"
    assert "0 failures" in r.stdout, r.stdout


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "-v"]
    cc = compiler()
    if cc is None:
        sys.exit("no C compiler (gcc or $CC)")
    d = args[0] if args else tempfile.mkdtemp(prefix="bn_simd_ctest_")
    os.makedirs(d, exist_ok=True)
    exe = build(cc, d)
    status = subprocess.run([exe] + (["-v"] if "-v" in sys.argv else [])).returncode
    if not args:
        shutil.rmtree(d)
    sys.exit(status)
