"""Where the C library that the package carries lives: its public header (bn_simd_api.h) and libbn_simd (.so and .a),
for C, C++ and Cython code built against bn_simd, as NumPy's numpy.get_include() is for NumPy's C API:

    cc prog.c -I"$(python -c 'import bn_simd; print(bn_simd.get_include())')" \\
              -L"$(python -c 'import bn_simd; print(bn_simd.get_library_dirs()[0])')" -lbn_simd

The library is built by setup.py together with the extension (the same objects, src/sources.txt); a program linked
with the shared one needs the directory at run time too (-Wl,-rpath,DIR, or LD_LIBRARY_PATH). README.md, "Embedding".
"""
import os

_PKG = os.path.dirname(os.path.abspath(__file__))


def get_include():
    """The directory holding bn_simd's public C header, bn_simd_api.h (a str). Raises FileNotFoundError when the package
    was built without it (a build older than the C library)."""
    d = os.path.join(_PKG, "include")
    if not os.path.isfile(os.path.join(d, "bn_simd_api.h")):
        raise FileNotFoundError(f"bn_simd's C header is not in {d}: rebuild the package (setup.py build_ext)")
    return d


def get_library_dirs():
    """The directories holding libbn_simd.so and libbn_simd.a (a list of str, as numpy's get_library_dirs does;
    link with -lbn_simd). Raises FileNotFoundError when the package was built without them."""
    d = os.path.join(_PKG, "lib")
    if not os.path.isfile(os.path.join(d, "libbn_simd.so")):
        raise FileNotFoundError(f"bn_simd's C library is not in {d}: rebuild the package (setup.py build_ext)")
    return [d]
