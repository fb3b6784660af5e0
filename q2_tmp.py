import numpy as np, bn_simd, ml_dtypes
from benchmarks.harness.timing import interleaved_medians
bn_simd.set_num_threads(2)
x=np.random.default_rng(0).standard_normal((32,64,112,112), dtype=np.float32)
C=64; w,b=np.ones(C,np.float32),np.zeros(C,np.float32)
xs=[x, x.astype(np.float16), x.astype(ml_dtypes.bfloat16)]
ys=[np.empty_like(a) for a in xs]
ctx=bn_simd.Context(slab_bytes=2<<20)
def f(a,y,c=None):
    if c is None: return lambda: bn_simd.batch_norm_forward(a,w,b,out=y)
    def g():
        with c: bn_simd.batch_norm_forward(a,w,b,out=y)
    return g
fns=[f(xs[0],ys[0]), f(xs[1],ys[1]), f(xs[1],ys[1],ctx), f(xs[2],ys[2]), f(xs[2],ys[2],ctx)]
t=[r[0]*1e3 for r in interleaved_medians(fns, target_s=1.5)]
print("f32 %.2f | f16 sweeps %.2f slab %.2f | bf16 sweeps %.2f slab %.2f"%tuple(t))
