"""The version of bn_simd: the one place it is written. pyproject.toml reads it (setuptools' static attr), setup.py and
CMakeLists.txt compile it into the C library (bn_version())."""
__version__ = "0.1.0"
