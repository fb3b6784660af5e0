"""The version of bn_simd: written here. pyproject.toml reads it (setuptools' static attr), setup.py and
CMakeLists.txt compile it into the C library (bn_version()). include/bn_simd_api.h repeats its numbers
(BN_SIMD_VERSION_MAJOR/_MINOR/_PATCH); the C library's build stops where they differ."""
__version__ = "0.1.0"
