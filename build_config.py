"""The C sources of bn_simd and their compiler flags: the one place that setup.py (the extension) and
tests/test_c_kernels.py (the C kernel test) read them from. Plain data, importable without building anything.

* Each ISA's kernels (src/uk_<isa>.c) get that ISA's flags and nothing else does: no host-tuned -march flag
  anywhere; dispatch.c picks among them at run time from CPUID.
* -ffp-contract=off: no compiler fuses a * b + c (GCC in ISO C mode does not anyway, clang would), so every ISA
  computes the same per-channel coefficients; the kernels that want FMA call it explicitly.
"""

# the kernels of each ISA, with the flags of that file only
ISA_FLAGS = {
    # -mf16c: the float16 kernels' conversions (io_f16.h), reached only on CPUs with F16C (dispatch.c)
    "src/uk_avx2.c": ["-mavx2", "-mfma", "-mf16c"],
    "src/uk_avx512.c": ["-mavx512f", "-mavx2", "-mfma", "-mf16c"],
}
# baseline-ISA C of the library: the scalar kernels, the kernel tables (from src/kernels.def), dispatch, drivers
PORTABLE_SOURCES = ["src/uk_scalar.c", "src/kernels.c", "src/dispatch.c", "src/batchnorm.c"]
# the sources of the kernel layer alone (kernels, their tables and dispatch.c, which they call): what the C kernel
# test links
KERNEL_SOURCES = ["src/uk_scalar.c", *ISA_FLAGS, "src/kernels.c", "src/dispatch.c"]
BASE_FLAGS = ["-O3", "-std=c11", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Wno-unused-function",
              "-Wno-unreachable-code"]
# -fsanitize builds (BN_SIMD_SANITIZE=1, .ci/asan): compile and link flags
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                  "-O1", "-g"]
SANITIZE_LINK_FLAGS = ["-fsanitize=address,undefined"]
INCLUDE_DIRS = ["include", "src"]
# headers and templates the C sources include
DEPENDS = ["include/bn_simd.h", "src/ukernels.h", "src/ukernels.inc", "src/kernels.def", "src/batchnorm.inc",
           "src/groupnorm.inc", "src/rownorm.inc", "src/rowcol.inc", "src/dispatch.h", "src/uk_undef_type.h",
           # the kernels' vocabularies: each ISA's vectors, each storage dtype's I/O, the outputs' epilogue
           "src/vec_scalar.h", "src/vec_avx2.h", "src/vec_avx512.h", "src/io_f32.h", "src/io_f64.h",
           "src/io_f16.h", "src/io_bf16.h", "src/half.h", "src/epilogue.h",
           # the fused epilogues: the normalise kernels' bodies, included once per epilogue, and the public header
           "src/epi_each.inc", "src/apply_fwd_seg.inc", "src/apply_fwd_cl.inc", "src/act_grad.inc",
           "include/bn_simd_epilogue.h"]


def flags_for(source):
    """The compile flags of one C source (a path relative to the repository root), sanitizers aside."""
    return BASE_FLAGS + ISA_FLAGS.get(source, [])
