"""The C sources of bn_simd and their compiler flags, as src/sources.txt lists them (the one list, which CMakeLists.txt
reads too): what setup.py (the extension, the wheel's C library) and tests/test_c_kernels.py (the C kernel test) build.
Plain data, importable without building anything.

* Each ISA's kernels (src/uk_<isa>.c) get that ISA's flags and nothing else does: no host-tuned -march flag
  anywhere; dispatch.c picks among them at run time from CPUID.
* -ffp-contract=off (src/sources.txt says why).
"""
import os
import re

ROOT = os.path.dirname(os.path.abspath(__file__))
SOURCES_FILE = "src/sources.txt"


def read_sources(path=os.path.join(ROOT, SOURCES_FILE)):
    """{kind: [(path or None, [flags])]} from a sources file (src/sources.txt's format)."""
    out = {}
    with open(path) as f:
        for line in f:
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            kind, rest = words[0], words[1:]
            if kind in ("flags", "warn"):
                out.setdefault(kind, []).append((None, rest))
            elif kind in ("kernel", "driver", "api") and rest:
                out.setdefault(kind, []).append((rest[0], rest[1:]))
            else:
                raise ValueError(f"{path}: cannot read line {line.rstrip()!r}")
    return out


_LISTED = read_sources()
# the kernels of each ISA, with the flags of that file only
ISA_FLAGS = {src: flags for kind in ("kernel", "driver", "api") for src, flags in _LISTED.get(kind, []) if flags}
# the sources of the kernel layer alone (kernels, their tables and dispatch.c, which they call): what the C kernel
# test links
KERNEL_SOURCES = [src for src, _ in _LISTED["kernel"]]
# baseline-ISA C of the Python extension: the scalar kernels, the kernel tables, dispatch, drivers
PORTABLE_SOURCES = [src for kind in ("kernel", "driver") for src, flags in _LISTED[kind] if not flags]
# the public C API's sources (the C library = PORTABLE_SOURCES + ISA_FLAGS + API_SOURCES)
API_SOURCES = [src for src, _ in _LISTED.get("api", [])]
LIBRARY_SOURCES = KERNEL_SOURCES + [src for src, _ in _LISTED["driver"]] + API_SOURCES
BASE_FLAGS = [f for kind in ("flags", "warn") for _, flags in _LISTED.get(kind, []) for f in flags]
# -fsanitize builds (BN_SIMD_SANITIZE=1, .ci/asan): compile and link flags
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                  "-O1", "-g"]
SANITIZE_LINK_FLAGS = ["-fsanitize=address,undefined"]
INCLUDE_DIRS = ["include", "src"]
# the public headers, installed with the C library and carried by the wheel (bn_simd.get_include())
PUBLIC_HEADERS = ["include/bn_simd_api.h"]
# headers and templates the C sources include
DEPENDS = ["include/bn_simd.h", "include/bn_simd_api.h", "src/ukernels.h", "src/ukernels.inc", "src/kernels.def",
           "src/batchnorm.inc", "src/groupnorm.inc", "src/rownorm.inc", "src/rowcol.inc", "src/dispatch.h",
           "src/uk_undef_type.h", "src/scratch.h", SOURCES_FILE,
           # the kernels' vocabularies: each ISA's vectors, each storage dtype's I/O, the outputs' epilogue
           "src/vec_scalar.h", "src/vec_avx2.h", "src/vec_avx512.h", "src/io_f32.h", "src/io_f64.h",
           "src/io_f16.h", "src/io_bf16.h", "src/half.h", "src/epilogue.h",
           # the fused epilogues: the normalise kernels' bodies, included once per epilogue, and the public header
           "src/epi_each.inc", "src/apply_fwd_seg.inc", "src/apply_fwd_cl.inc", "src/act_grad.inc",
           "src/bwd_sums_act.inc", "src/bwd_apply_seg.inc", "src/bwd_sums_cl.inc", "src/bwd_apply_cl.inc",
           "src/rowcol_fwd.inc",
           "include/bn_simd_epilogue.h"]


def version():
    """The package's version, from bn_simd/_version.py (the one place it is written), without importing it."""
    with open(os.path.join(ROOT, "bn_simd", "_version.py")) as f:
        m = re.search(r'^__version__\s*=\s*"([^"]+)"', f.read(), re.M)
    if not m:
        raise RuntimeError("bn_simd/_version.py has no __version__ = \"...\" line")
    return m.group(1)


def version_macros():
    """The macros src/api.c is compiled with: the version string, and its numbers (checked there against the public
    header's BN_SIMD_VERSION_* macros)."""
    v = version()
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", v)
    if not m:
        raise RuntimeError(f"bn_simd/_version.py: expected a MAJOR.MINOR.PATCH version, got {v!r}")
    return [("BN_SIMD_VERSION", f'"{v}"')] + [(f"BN_SIMD_BUILD_{k}", n) for k, n in zip(("MAJOR", "MINOR", "PATCH"),
                                                                                    m.groups())]


def flags_for(source):
    """The compile flags of one C source (a path relative to the repository root), sanitizers aside."""
    return BASE_FLAGS + ISA_FLAGS.get(source, [])
