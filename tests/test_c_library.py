"""The C library as a C or C++ program links it: examples/c (bn_example.c, bn_example.cpp) built against the Python
package's copy (bn_simd.get_include(), bn_simd.get_library_dirs()) and, when cmake is installed, against a CMake
install (with pkg-config and with find_package(bn_simd)); their outputs are compared with the Python package's results
(the same kernels: the same bits). tests/c/test_api.c (threads' parallel_for, workspace without malloc) runs against the
package's static library. Everything is built once per session in a temporary directory; skipped without a compiler.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import bn_simd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples", "c")


def _which(name):
    return shutil.which(name)


def _run(cmd, **kw):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, **kw)
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-4000:]}")
    return r.stdout


@pytest.fixture(scope="session")
def workdir():
    d = tempfile.mkdtemp(prefix="bn_simd_clib_")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def package_lib():
    """(include dir, library dir) of the package's C library; skips when it was not built."""
    try:
        return bn_simd.get_include(), bn_simd.get_library_dirs()[0]
    except FileNotFoundError as e:
        pytest.skip(str(e))


# ---- the expected values: the Python package on the examples' inputs ----------------------------------------------

def expected():
    """name -> float32 array of what the examples print, computed with bn_simd on the ISA the examples' processes
    use (the CPU's best: BN_SIMD_ISA pins only the Python package's, and the scalar kernels round a * b + c twice
    where the vector ones fuse it)."""
    with bn_simd.Context(isa=bn_simd.show_config()["best_isa"]):
        return _expected()


def _expected():
    N, H, W, C = 2, 3, 3, 4
    i = np.arange(N * H * W * C)
    x = (((i * 37) % 101) / 25.0 - 2.0).astype(np.float32).reshape(N, H, W, C)
    dy = (((i * 53) % 89) / 40.0 - 1.0).astype(np.float32).reshape(N, H, W, C)
    w = np.array([1.0, 0.5, 2.0, -1.0], np.float32)
    b = np.array([0.0, 0.25, -0.5, 1.0], np.float32)
    rm = np.array([0.1, -0.2, 0.0, 0.3], np.float32)
    rv = np.array([1.0, 0.5, 2.0, 1.5], np.float32)
    out = {"y_eval": bn_simd.batch_norm(x, rm.copy(), rv.copy(), w, b, training=False, eps=1e-5, layout="NHWC")}
    out["y_train"], out["save_mean"], out["save_invstd"] = bn_simd.batch_norm_forward(x, w, b, eps=1e-5,
                                                                                      layout="NHWC")
    bn_simd.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5, layout="NHWC")
    out["running_mean"], out["running_var"] = rm, rv
    out["dx"], out["grad_weight"], out["grad_bias"] = bn_simd.batch_norm_backward(
        dy, x, out["save_mean"], out["save_invstd"], w, layout="NHWC")
    return {k: np.asarray(v, np.float32).ravel() for k, v in out.items()}


def check_output(text):
    """The example's printed values equal the Python package's, bit for bit (%.9g round-trips float32)."""
    got = {}
    for line in text.splitlines():
        name, *vals = line.split()
        got[name] = vals
    assert got["version"] == [bn_simd.__version__]
    assert got["bad_eps"][0] == "-6"  # BN_EEPS
    for name, want in expected().items():
        have = np.array([np.float32(v) for v in got[name]], np.float32)
        np.testing.assert_array_equal(have, want, err_msg=name)


# ---- against the Python package's copy ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def package_built(workdir, package_lib):
    """The C and C++ examples and the API test linked against the package's library: {name: executable}."""
    inc, lib = package_lib
    cc, cxx = _which(os.environ.get("CC", "gcc")), _which(os.environ.get("CXX", "g++"))
    if not cc:
        pytest.skip("no C compiler")
    exes = {}
    flags = [f"-I{inc}", f"-L{lib}", "-lbn_simd", f"-Wl,-rpath,{lib}"]
    exes["c"] = os.path.join(workdir, "pkg_bn_example")
    _run([cc, "-std=c11", "-Wall", "-Werror", os.path.join(EXAMPLES, "bn_example.c"), "-o", exes["c"]] + flags)
    if cxx:
        exes["cxx"] = os.path.join(workdir, "pkg_bn_example_cpp")
        _run([cxx, "-std=c++17", "-Wall", "-Werror", os.path.join(EXAMPLES, "bn_example.cpp"), "-o", exes["cxx"],
              "-pthread"] + flags)
    # the API test against the static library: every malloc of the library's objects through the test's counter
    exes["api"] = os.path.join(workdir, "test_api")
    omp = ["-fopenmp"] if bn_simd._core.have_openmp() else []
    _run([cc, "-O1", "-std=c11", "-Wall", f"-I{inc}", os.path.join(ROOT, "tests", "c", "test_api.c"),
          os.path.join(lib, "libbn_simd.a"), "-o", exes["api"], "-lm", "-pthread", "-Wl,--wrap=malloc"] + omp)
    return exes


def test_the_c_example_built_with_get_include_prints_the_packages_results(package_built):
    check_output(_run([package_built["c"]]))


def test_the_cpp_example_on_its_own_thread_pool_prints_the_packages_results(package_built):
    if "cxx" not in package_built:
        pytest.skip("no C++ compiler")
    check_output(_run([package_built["cxx"]]))


@pytest.mark.parametrize("levels", [None, "2"], ids=["default", "nested-teams"])
def test_the_api_on_a_thread_pool_and_in_a_workspace(package_built, levels):
    """levels: OMP_MAX_ACTIVE_LEVELS, so that the library's regions inside the test's own parallel region run real
    nested teams (their barriers included) rather than teams of one."""
    env = dict(os.environ)
    if levels:
        env["OMP_MAX_ACTIVE_LEVELS"] = levels
    out = _run([package_built["api"]], env=env)
    assert " 0 failures" in out, out


# ---- a CMake build and install: pkg-config and find_package -------------------------------------------------------

@pytest.fixture(scope="session")
def cmake_install(workdir):
    """A CMake build without OpenMP (the other configuration than the package's: its results are the same bits) at
    -O0 (a quick build; the flags otherwise as src/sources.txt), with the C tests configured (BN_SIMD_TESTS), installed
    into a prefix. Returns (build directory, prefix). Of the tests only the API's is built: the kernel test's program
    is the one tests/test_c_kernels.py builds and runs with the package's flags."""
    if not _which("cmake"):
        pytest.skip("cmake not installed (pip install cmake)")
    build, prefix = os.path.join(workdir, "cbuild"), os.path.join(workdir, "prefix")
    _run(["cmake", "-S", ROOT, "-B", build, "-DBN_SIMD_OPT=-O0", "-DCMAKE_BUILD_TYPE=None", "-DBN_SIMD_OPENMP=OFF",
          "-DBN_SIMD_TESTS=ON", f"-DCMAKE_INSTALL_PREFIX={os.path.join(workdir, 'configured')}"])
    _run(["cmake", "--build", build, "-j", "2", "--target", "bn_simd", "bn_simd_static", "bn_test_api"])
    # (installed elsewhere than the configured prefix, as the README's `cmake --install ... --prefix P`: the
    # pkg-config file and the package files must point into P)
    _run(["cmake", "--install", build, "--prefix", prefix])
    return build, prefix


def test_ctest_runs_the_c_api_test(cmake_install):
    build, _ = cmake_install
    out = _run(["ctest", "--output-on-failure", "-R", "c_api"], cwd=build)
    assert "100% tests passed" in out, out


def test_cmake_installs_the_header_libraries_pkg_config_and_package_files(cmake_install):
    _, prefix = cmake_install
    libdir = os.path.join(prefix, "lib")
    for rel in ("include/bn_simd_api.h", "lib/libbn_simd.a", "lib/libbn_simd.so", "lib/pkgconfig/bn_simd.pc",
                "lib/cmake/bn_simd/bn_simdConfig.cmake", "lib/cmake/bn_simd/bn_simdConfigVersion.cmake"):
        assert os.path.exists(os.path.join(prefix, rel)), rel
    if _which("nm"):
        out = _run(["nm", "-D", "--defined-only", os.path.join(libdir, "libbn_simd.so")])
        names = {line.split()[-1] for line in out.splitlines()}
        assert names and all(n.startswith("bn_") for n in names), sorted(names)
        # no internal function (the kernel-level drivers, the kernels, their tables)
        assert not {"bn_stats_f32", "bn_normalize_f32", "bn_uk_f32_tables", "bn_scratch_malloc"} & names


def test_the_c_example_built_with_pkg_config_prints_the_packages_results(cmake_install, workdir):
    if not _which("pkg-config"):
        pytest.skip("pkg-config not installed")
    libdir = os.path.join(cmake_install[1], "lib")
    env = dict(os.environ, PKG_CONFIG_PATH=os.path.join(libdir, "pkgconfig"))
    flags = _run(["pkg-config", "--cflags", "--libs", "bn_simd"], env=env).split()
    assert _run(["pkg-config", "--modversion", "bn_simd"], env=env).strip() == bn_simd.__version__
    exe = os.path.join(workdir, "pc_bn_example")
    _run([_which("gcc") or "cc", os.path.join(EXAMPLES, "bn_example.c"), "-o", exe, f"-Wl,-rpath,{libdir}"] + flags)
    check_output(_run([exe]))


def test_the_examples_built_with_find_package_print_the_packages_results(cmake_install, workdir):
    build = os.path.join(workdir, "exbuild")
    _run(["cmake", "-S", EXAMPLES, "-B", build, f"-DCMAKE_PREFIX_PATH={cmake_install[1]}"])
    _run(["cmake", "--build", build, "-j", "2"])
    check_output(_run([os.path.join(build, "bn_example")]))
    check_output(_run([os.path.join(build, "bn_example_cpp")]))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


DLCLOSE_C = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>
#include "bn_simd_api.h"
typedef int (*inference_fn)(const bn_context*, const bn_desc*, const void*, void*, const void*, const void*,
                            const void*, const void*, double, void*, size_t);
static float x[1 << 20], y[1 << 20];
int main(int argc, char** argv) {
    void* h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) return 2;
    inference_fn f = (inference_fn)dlsym(h, "bn_batch_norm_inference");
    float m[4] = {0}, v[4] = {1, 1, 1, 1};
    bn_desc d = {BN_F32, BN_F32, BN_LAYOUT_NCHW, 4, 4, 1 << 16};
    for (int k = 0; k < 3; k++)
        if (f(NULL, &d, x, y, m, v, NULL, NULL, 1e-5, NULL, 0) != BN_OK) return 3;
    dlclose(h);
    usleep(200000); /* (OpenMP's worker threads spin and wait in the code a plain dlclose would unmap) */
    puts("survived");
    return 0;
}
"""


def test_a_host_that_dlcloses_the_library_keeps_running(package_lib, workdir):
    """A plugin host that unloads libbn_simd.so after a threaded call: the library (and the libgomp it brought in)
    stays mapped (-z nodelete), where the unmapping crashed OpenMP's worker threads as they went on waiting."""
    cc = _which(os.environ.get("CC", "gcc"))
    if not cc or not sys.platform.startswith("linux"):
        pytest.skip("no C compiler, or not Linux")
    inc, lib = package_lib
    src, exe = os.path.join(workdir, "dlclose.c"), os.path.join(workdir, "dlclose")
    with open(src, "w") as f:
        f.write(DLCLOSE_C)
    _run([cc, "-std=gnu11", f"-I{inc}", src, "-o", exe, "-ldl"])
    env = dict(os.environ, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="active")
    for _ in range(2):
        assert _run([exe, os.path.join(lib, "libbn_simd.so")], env=env).strip() == "survived"


def test_the_packages_binaries_name_no_run_path():
    """The extensions and libbn_simd.so carry no RUNPATH/RPATH (Python's LDSHARED adds one to its own library
    directory on a pyenv or framework build: a directory of the building machine, which none of them uses)."""
    readelf = _which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not found")
    pkg = os.path.dirname(bn_simd.__file__)
    binaries = [os.path.join(pkg, f) for f in os.listdir(pkg) if f.endswith(".so")]
    binaries.append(os.path.join(pkg, "lib", "libbn_simd.so"))
    assert len(binaries) >= 4
    for path in binaries:
        dynamic = subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=True).stdout
        assert "RUNPATH" not in dynamic and "RPATH" not in dynamic, (path, dynamic)
