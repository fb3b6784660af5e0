"""No kernel reads or writes past the end of its arrays: arrays that end exactly at an inaccessible page.

The channels-first reductions load the last len % (vector width) elements of a channel's run with masked
loads, and the AVX-512 element-wise kernels store a segment's tail with a masked store, which neither
AddressSanitizer nor (for AVX-512) valgrind checks. Here every input and output ends where a PROT_NONE page
begins, so an access that touched one byte past the array would kill the process with SIGSEGV.
The calls run in a child process, on every ISA, 1 and 2 threads, for every run length 1..33 and a row
longer than a reduction chunk, in both layouts, and the child's exit status is the verdict.
"""
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import ctypes, mmap, sys
    import numpy as np
    import bn_simd

    PAGE = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    keep = []

    def guarded(shape, dtype):
        # a C-contiguous array whose last byte is the last byte before a PROT_NONE page
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        npages = -(-nbytes // PAGE) + 1
        buf = mmap.mmap(-1, npages * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        if libc.mprotect(base + (npages - 1) * PAGE, PAGE, 0) != 0:
            sys.exit("mprotect failed")
        keep.append(buf)
        a = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape)), offset=(npages - 1) * PAGE - nbytes)
        return a.reshape(shape)

    rng = np.random.default_rng(5)
    calls = 0
    for isa in bn_simd.show_config()["supported_isas"]:
        bn_simd.set_isa(isa)
        for nt in (1, 2):
            bn_simd.set_num_threads(nt)
            for dtype in (np.float32, np.float64):
                for inner in list(range(1, 34)) + [8192 + 13]:
                    outer = 3 if inner > 100 else 40
                    for layout, shape in (("NCHW", (outer, 5, inner)), ("NHWC", (outer, inner, 5))):
                        x, dy = guarded(shape, dtype), guarded(shape, dtype)
                        x[...] = rng.standard_normal(shape)
                        dy[...] = rng.standard_normal(shape)
                        mean, var = bn_simd.batch_stats(x, layout=layout)
                        bn_simd.backward_reduce(dy, x, mean, layout=layout)
                        # outputs end at a guard page too: the element-wise kernels' masked tail stores
                        out = guarded(shape, dtype)
                        y, m, s = bn_simd.batch_norm_forward(x, layout=layout, out=out)
                        bn_simd.batch_norm_backward(dy, x, m, s, layout=layout, out=guarded(shape, dtype))
                        bn_simd.normalize(x, mean, var, layout=layout, out=guarded(shape, dtype))
                        bn_simd.backward_apply(dy, x, m, s, s, s, layout=layout, out=guarded(shape, dtype))
                        if not (np.isfinite(mean).all() and np.isfinite(var).all() and np.isfinite(y).all()):
                            sys.exit(f"non-finite result: {isa} {nt} {np.dtype(dtype).name} {layout} {shape}")
                        calls += 6
    print(f"guard pages: {calls} calls ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mmap + mprotect guard pages (Linux)")
def test_no_kernel_reads_or_writes_past_the_end_of_its_arrays():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (
        f"child exited with {r.returncode} (-11: SIGSEGV, an access past an array's end)\n{r.stdout}\n{r.stderr}")
    assert "calls ok" in r.stdout
