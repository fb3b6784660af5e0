"""bn_simd/bn_simd.pxd: a small Cython module cimports the C library's declarations, is built against the package's
header and library (bn_simd.get_include(), get_library_dirs()) and calls the kernels without the GIL; its results are
the Python package's bits. Built once, in a temporary directory; skipped without Cython or a C compiler."""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import bn_simd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PYX = '''# cython: language_level=3, boundscheck=False, wraparound=False
from bn_simd.bn_simd cimport (BN_F32, BN_F64, BN_LAYOUT_NHWC, BN_OK, bn_batch_norm_inference, bn_desc, bn_strerror,
                              bn_version, bn_layer_norm_forward)
import numpy as np


def version():
    return bn_version().decode()


def inference(float[:, ::1] x, double[::1] mean, double[::1] var, double eps):
    """Batch norm inference of an (N, C) float32 array, without the GIL."""
    cdef bn_desc d
    d.dtype, d.param_dtype, d.layout = BN_F32, BN_F64, BN_LAYOUT_NHWC
    d.n, d.c, d.s = x.shape[0], x.shape[1], 1
    y = np.empty_like(np.asarray(x))
    cdef float[:, ::1] yv = y
    cdef int st
    with nogil:
        st = bn_batch_norm_inference(NULL, &d, &x[0, 0], &yv[0, 0], &mean[0], &var[0], NULL, NULL, eps, NULL, 0)
    if st != BN_OK:
        raise ValueError(bn_strerror(st).decode())
    return y


def layer_norm(float[:, ::1] x, double eps):
    cdef bn_desc d
    d.dtype, d.param_dtype, d.layout = BN_F32, BN_F64, BN_LAYOUT_NHWC
    d.n, d.c, d.s = x.shape[0], x.shape[1], 1
    y = np.empty_like(np.asarray(x))
    cdef float[:, ::1] yv = y
    cdef int st
    with nogil:
        st = bn_layer_norm_forward(NULL, &d, &x[0, 0], &yv[0, 0], NULL, NULL, eps, NULL, NULL, NULL, 0)
    if st != BN_OK:
        raise ValueError(bn_strerror(st).decode())
    return y
'''

SETUP = '''import os
import bn_simd
from Cython.Build import cythonize
from setuptools import Extension, setup
dirs = bn_simd.get_library_dirs()
ext = Extension("bn_pxd_probe", ["bn_pxd_probe.pyx"], include_dirs=[bn_simd.get_include()], library_dirs=dirs,
                runtime_library_dirs=dirs, libraries=["bn_simd"], extra_compile_args=["-O0"])  # (a quick build)
# (the README's include_path: the directory holding the package imported)
setup(ext_modules=cythonize([ext], include_path=[os.path.dirname(os.path.dirname(bn_simd.__file__))], quiet=True),
      script_args=["build_ext", "--inplace"])
'''


def _env_without_root(cwd):
    """The build's environment: without the source tree on PYTHONPATH when bn_simd imports from it without (an
    installed package, editable or not: the README's include_path is then what finds the .pxd, Cython's search of
    sys.path does not), else with it (a checkout run through PYTHONPATH)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if p and os.path.abspath(p) != os.path.abspath(ROOT)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    r = subprocess.run([sys.executable, "-c", "import bn_simd, os; print(os.path.dirname(bn_simd.__file__))"],
                       cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if r.returncode == 0 and os.path.samefile(r.stdout.strip(), os.path.dirname(bn_simd.__file__)):
        return env
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + paths))


@pytest.fixture(scope="module")
def probe():
    pytest.importorskip("Cython")
    if not shutil.which(os.environ.get("CC", "gcc")):
        pytest.skip("no C compiler")
    try:
        bn_simd.get_library_dirs()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    d = tempfile.mkdtemp(prefix="bn_simd_pxd_")
    try:
        with open(os.path.join(d, "bn_pxd_probe.pyx"), "w") as f:
            f.write(PYX)
        with open(os.path.join(d, "setup.py"), "w") as f:
            f.write(SETUP)
        env = _env_without_root(d)
        r = subprocess.run([sys.executable, "setup.py"], cwd=d, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-4000:]
        so = next(f for f in os.listdir(d) if f.startswith("bn_pxd_probe") and f.endswith(".so"))
        spec = importlib.util.spec_from_file_location("bn_pxd_probe", os.path.join(d, so))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_cython_module_cimports_the_library_and_gets_the_packages_bits(probe):
    assert probe.version() == bn_simd.__version__
    r = np.random.default_rng(0)
    x = r.standard_normal((37, 5)).astype(np.float32)
    mean, var = r.standard_normal(5), r.random(5) + 0.1
    np.testing.assert_array_equal(probe.inference(x, mean, var, 1e-5),
                                  bn_simd.batch_norm(x, mean.copy(), var.copy(), training=False, eps=1e-5,
                                                     layout="NHWC"))
    np.testing.assert_array_equal(probe.layer_norm(x, 1e-5), bn_simd.layer_norm(x, 5, eps=1e-5))
    with pytest.raises(ValueError, match="eps"):
        probe.inference(x, mean, var, -1.0)
