import numpy as np, bn_simd, ml_dtypes, sys
from benchmarks.harness.timing import interleaved_medians
bn_simd.set_num_threads(int(sys.argv[1]))
shape=tuple(int(a) for a in sys.argv[2:6])
x=np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
C=shape[1]
w,b,rm,rv=np.ones(C,np.float32),np.zeros(C,np.float32),np.zeros(C,np.float32),np.ones(C,np.float32)
xs=[x, x.astype(np.float16), x.astype(ml_dtypes.bfloat16)]
ys=[np.empty_like(a) for a in xs]
for name,mk in [("eval",lambda a,y:(lambda: bn_simd.batch_norm(a,rm,rv,w,b,out=y))),("fwd",lambda a,y:(lambda: bn_simd.batch_norm_forward(a,w,b,out=y))),("stats",lambda a,y:(lambda: bn_simd.batch_stats(a)))]:
    t=[r[0]*1e3 for r in interleaved_medians([mk(a,y) for a,y in zip(xs,ys)], target_s=0.5)]
    print(name, " ".join(f"{v:7.3f}" for v in t), f" f32/f16 {t[0]/t[1]:.2f} f32/bf16 {t[0]/t[2]:.2f}")
