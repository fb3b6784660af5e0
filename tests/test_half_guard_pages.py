"""No 16-bit kernel reads or writes past the end of its arrays (float16; bfloat16 too with ml_dtypes): every input
and output ends where a PROT_NONE page begins (tests/test_guard_pages.py's arrays), for run lengths 1..33 and a row
longer than a reduction chunk, both layouts, every ISA, 1 and 2 threads, batch norm's, group norm's and layer / RMS
norm's calls. The 16-bit reductions' tails (fewer than a vector of doubles) and the element-wise kernels' tails are
masked loads and stores on AVX-512, a copy through a buffer and element-by-element stores on AVX2: an access one byte
past an array kills the child."""
import subprocess
import sys

import pytest

from test_guard_pages import CHILD as _BN_CHILD

CHILD = _BN_CHILD.split("rng = np.random")[0] + """
rng = np.random.default_rng(6)
dtypes = [np.dtype(np.float16)]
try:
    import ml_dtypes
    dtypes.append(np.dtype(ml_dtypes.bfloat16))
except ImportError:
    pass
calls = 0
for isa in bn_simd.show_config()["supported_isas"]:
    bn_simd.set_isa(isa)
    for nt in (1, 2):
        bn_simd.set_num_threads(nt)
        for dtype in dtypes:
            for inner in list(range(1, 34)) + [16384 + 13]:
                outer = 3 if inner > 100 else 24
                for layout, shape in (("NCHW", (outer, 4, inner)), ("NHWC", (outer, inner, 4))):
                    x, dy = guarded(shape, dtype), guarded(shape, dtype)
                    x[...] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
                    dy[...] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
                    mean, var = bn_simd.batch_stats(x, layout=layout)
                    bn_simd.backward_reduce(dy, x, mean, layout=layout)
                    y, m, s = bn_simd.batch_norm_forward(x, layout=layout, out=guarded(shape, dtype))
                    bn_simd.batch_norm_backward(dy, x, m, s, layout=layout, out=guarded(shape, dtype))
                    bn_simd.normalize(x, mean, var, layout=layout, out=guarded(shape, dtype))
                    g, gm, gs = bn_simd.group_norm_forward(x, 2, layout=layout, out=guarded(shape, dtype))
                    bn_simd.group_norm_backward(dy, x, gm, gs, 2, layout=layout, out=guarded(shape, dtype))
                    ln, lm, ls = bn_simd.layer_norm_forward(x, shape[-1], out=guarded(shape, dtype))
                    bn_simd.layer_norm_backward(dy, x, lm, ls, shape[-1], out=guarded(shape, dtype))
                    r, rs = bn_simd.rms_norm_forward(x, shape[-1], out=guarded(shape, dtype))
                    bn_simd.rms_norm_backward(dy, x, rs, shape[-1], out=guarded(shape, dtype))
                    if layout == "NCHW":
                        bn_simd.layer_norm(x, 4, layout="NCHW", out=guarded(shape, dtype))
                    if not (np.isfinite(mean).all() and np.isfinite(y.astype(np.float32)).all()):
                        sys.exit(f"non-finite result: {isa} {nt} {dtype.name} {layout} {shape}")
                    calls += 12
print(f"guard pages: {calls} calls ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mmap + mprotect guard pages (Linux)")
def test_no_16_bit_kernel_reads_or_writes_past_the_end_of_its_arrays():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (
        f"child exited with {r.returncode} (-11: SIGSEGV, an access past an array's end)\n{r.stdout}\n{r.stderr}")
    assert "calls ok" in r.stdout
