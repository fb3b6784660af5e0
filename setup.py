"""Build of the bn_simd extension.

* The ISA microkernels get their ISA's flags and nothing else does (no host-tuned -march flag anywhere): each
  uk_<isa>.c is compiled to an object with its own flags (build_config.py, which the C kernel test reads too) and
  linked into the one extension; dispatch.c picks among them at run time from CPUID.
* OpenMP is used when the compiler can build and link a test program with -fopenmp; BN_SIMD_OPENMP=0
  forces a build without it (the kernels then run on one thread).
* The C library: the extension's objects (compiled with -fvisibility=hidden, so that only the public API's BN_API
  functions leave a library made of them) and the public API's (src/api.c) are also linked into bn_simd/lib/
  libbn_simd.so and archived into bn_simd/lib/libbn_simd.a, and the public header is copied into bn_simd/include/:
  the wheel carries them (bn_simd.get_include(), bn_simd.get_library_dirs()). CMakeLists.txt builds the same library
  from the same list (src/sources.txt) for a system install.
* BN_SIMD_SANITIZE=1 builds with -fsanitize=address,undefined at -O1 with debug info, for the memory-safety
  CI step (.ci/asan). Undefined behaviour aborts at the first report (-fno-sanitize-recover) instead of
  printing and going on. Load the result with the ASan runtime first: LD_PRELOAD=$(gcc -print-file-name=libasan.so).
* Release builds drop the debug information Python's CFLAGS ask for (-g0; the same code, a tenth of the bytes);
  BN_SIMD_DEBUG=1 keeps it.
"""
import os
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
# the C sources and their flags (build_config.py, which the C kernel test reads too)
from build_config import (API_SOURCES, BASE_FLAGS, DEPENDS, INCLUDE_DIRS, ISA_FLAGS,  # noqa: E402
                          PORTABLE_SOURCES, PUBLIC_HEADERS, SANITIZE_FLAGS, SANITIZE_LINK_FLAGS, version_macros)


def _env_flag(name, default):
    v = os.environ.get(name)
    return default if v is None else v.strip().lower() not in ("0", "no", "false", "off", "")


def _compiler_accepts(compiler_cmd, flags):
    """True when `compiler_cmd flags` compiles and links a small OpenMP program."""
    src = "#include <omp.h>\nint main(void){int n=0;\n#pragma omp parallel reduction(+:n)\nn+=1;\nreturn n>0?0:1;}\n"
    with tempfile.TemporaryDirectory() as d:
        c = os.path.join(d, "t.c")
        with open(c, "w") as f:
            f.write(src)
        try:
            r = subprocess.run(compiler_cmd + [c, "-o", os.path.join(d, "t")] + flags,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0


def _without_python_run_path(args):
    """args without the linker options that set a run path to Python's LIBDIR (-Wl,-rpath,DIR, -Wl,-rpath=DIR,
    -Wl,-R,DIR, -Wl,-RDIR, -RDIR)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir:
        return list(args)
    libdir = os.path.normpath(libdir)
    ours = {f"-Wl,-rpath,{libdir}", f"-Wl,-rpath={libdir}", f"-Wl,-R,{libdir}", f"-Wl,-R{libdir}", f"-R{libdir}"}
    return [a for a in args if a.rstrip("/") not in ours]


class BuildExt(build_ext):
    def build_extensions(self):
        cc = list(self.compiler.compiler_so[:1]) if hasattr(self.compiler, "compiler_so") else ["cc"]
        use_omp = _env_flag("BN_SIMD_OPENMP", True) and _compiler_accepts(cc, ["-fopenmp"])
        sanitize = _env_flag("BN_SIMD_SANITIZE", False)
        # hidden visibility: the library objects also make libbn_simd (build_c_library), which exports only BN_API
        extra = list(BASE_FLAGS) + ["-fvisibility=hidden"]
        link = []
        if use_omp:
            extra.append("-fopenmp")
            link.append("-fopenmp")
        if sanitize:
            extra += SANITIZE_FLAGS
            link += SANITIZE_LINK_FLAGS
        elif not _env_flag("BN_SIMD_DEBUG", False):
            # Python's CFLAGS carry -g: debug information is most of the binaries' bytes (the extension and the C
            # library grow about tenfold) and does not change the code. BN_SIMD_DEBUG=1 keeps it.
            extra.append("-g0")
        print(f"bn_simd build: OpenMP={'yes' if use_omp else 'no'} sanitize={'yes' if sanitize else 'no'}")
        # Linked without the run path to Python's own library directory that Python's LDSHARED may add (a
        # framework or pyenv build's): neither the extensions nor the C library use libpython, and the binaries of a
        # wheel should not name a directory of the machine that built it. Other run paths (a user's LDFLAGS: a
        # toolchain's libgomp, say) stay.
        self.compiler.linker_so = _without_python_run_path(self.compiler.linker_so)
        for ext in self.extensions:
            # the checker and the probes: portable C, no OpenMP (the probes' reason: bn_simd/_openmp.py)
            if ext.name != "bn_simd._core":
                ext.extra_compile_args = [f for f in extra if f not in ("-fopenmp", "-fvisibility=hidden")]
                ext.extra_link_args = [f for f in link if f != "-fopenmp"]
                continue
            # Every C file of the extension (the Cython module's, the portable ones, each ISA's with its flags) is
            # compiled on its own, as many at once as there are CPUs, then linked: the build is a large part of an
            # install's time, and of the CI's, which builds twice (the sanitizer step).
            jobs = [(src, extra + ISA_FLAGS.get(src, [])) for src in list(ext.sources) + list(ISA_FLAGS)]
            for src, _ in jobs:  # (the output directories first: the compiler object makes them unlocked)
                for obj in self.compiler.object_filenames([src], output_dir=self.build_temp):
                    os.makedirs(os.path.dirname(obj) or ".", exist_ok=True)

            def compile_one(job):
                return self.compiler.compile([job[0]], output_dir=self.build_temp, macros=ext.define_macros,
                                             include_dirs=ext.include_dirs, extra_postargs=job[1],
                                             depends=ext.depends)

            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                objects = [obj for objs in pool.map(compile_one, jobs) for obj in objs]
            # linked from the objects alone; the fresh objects in depends make the link happen
            ext.sources = []
            ext.depends = list(ext.depends) + objects
            ext.extra_objects = objects
            ext.extra_compile_args = extra
            ext.extra_link_args = link
        super().build_extensions()
        self.build_c_library(extra, link)

    def build_c_library(self, extra, link):
        """libbn_simd.so and libbn_simd.a in bn_simd/lib/, the public header in bn_simd/include/ (of the build, or of
        the source tree with --inplace): the extension's library objects and the public API's."""
        ext = next(e for e in self.extensions if e.name == "bn_simd._core")
        pkg = os.path.dirname(self.get_ext_fullpath(ext.name))
        libdir, incdir = os.path.join(pkg, "lib"), os.path.join(pkg, "include")
        os.makedirs(libdir, exist_ok=True)
        os.makedirs(incdir, exist_ok=True)
        for h in PUBLIC_HEADERS:
            self.copy_file(h, os.path.join(incdir, os.path.basename(h)))
        api = self.compiler.compile(API_SOURCES, output_dir=self.build_temp, include_dirs=ext.include_dirs,
                                    macros=version_macros(), extra_postargs=extra,
                                    depends=ext.depends)
        # the library's objects of the extension (not the Cython module's), and the API's
        objects = self.compiler.object_filenames(PORTABLE_SOURCES + list(ISA_FLAGS), output_dir=self.build_temp)
        objects += api
        archive = self.compiler.library_filename("bn_simd", output_dir=libdir)
        if os.path.exists(archive):  # (ar adds to an archive: start afresh)
            os.remove(archive)
        self.compiler.create_static_lib(objects, "bn_simd", output_dir=libdir)
        # (linked, as the extensions, without a run path to Python's library directory: build_extensions; -z nodelete:
        # a dlclose must not unmap the library, nor the libgomp it brought in, under OpenMP's worker threads, which
        # spin and wait in that code after a call: a plugin host that unloads it crashed in them)
        nodelete = ["-Wl,-z,nodelete"] if sys.platform.startswith("linux") else []
        self.compiler.link_shared_object(objects, os.path.join(libdir, "libbn_simd.so"), libraries=["m"],
                                         extra_postargs=link + ["-Wl,-soname,libbn_simd.so"] + nodelete)
        self._clib_pkg = pkg

    def copy_extensions_to_source(self):
        """--inplace: setuptools builds in build/ and copies the extensions to the sources; the C library too."""
        super().copy_extensions_to_source()
        for sub in ("lib", "include"):
            self.copy_tree(os.path.join(self._clib_pkg, sub), os.path.join(ROOT, "bn_simd", sub))


ext = Extension(
    "bn_simd._core",
    sources=["bn_simd/_core.pyx"] + PORTABLE_SOURCES,
    include_dirs=INCLUDE_DIRS + [numpy.get_include()],
    depends=DEPENDS + ["bn_simd/_args.pxd", "bn_simd/_epilogue.pxi", "bn_simd/_epilogue_ops.pxi"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

# The argument checker (bn_simd/_args.pyx): NumPy's C API, no kernel and no OpenMP; bn_simd._core cimports it.
args = Extension(
    "bn_simd._args",
    sources=["bn_simd/_args.pyx"],
    include_dirs=["src", numpy.get_include()],  # (src/half.h: bfloat16 rounding of per-channel values)
    depends=["bn_simd/_args.pxd", "src/half.h"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

# Probes run before the OpenMP runtime is loaded (bn_simd/_openmp.py): built without OpenMP, so that importing them
# does not load it.
runtime = Extension(
    "bn_simd._runtime",
    sources=["bn_simd/_runtime.pyx", "src/runtime_probe.c"],
    include_dirs=["src"],
    depends=["src/runtime_probe.h"],
)

setup(
    ext_modules=cythonize([args, ext, runtime], compiler_directives={"language_level": 3}),
    cmdclass={"build_ext": BuildExt},
)
