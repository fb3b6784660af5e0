/*
 * How the element-wise kernels of ukernels.inc finish an output. Two families: forward (FWD: seg_affine, cl_affine)
 * and backward (BWD: seg_bwd_apply, cl_bwd_apply). An output of either is, in this order, each step written once here:
 *   1. the family's formula, computed in TC:
 *        FWD   y  = (x - m) a + b               UK_AFFINE_V (vectors), UK_AFFINE_S (single elements)
 *        BWD   dx = a dy + b (x - m) + d        UK_DX_V, UK_DX_S
 *   2. the family's epilogue (UK_FWD_EPI_V, ...), which makes it the value to store;
 *   3. the storage type's narrowing store (io_<dtype>.h): whole, streamed, the first n lanes, or one element.
 * The kernels only choose which elements go which way (their loads, head / body / tail / straddle paths, column strips,
 * interleaved coefficients), compute 1 and store through UK_PUT*, which applies 2 and 3: no kernel stores otherwise.
 * Macros over the instantiation's vocabulary (expanded where ukernels.inc uses them), so included once per file. They
 * are macros rather than inline functions so that the machine code is what the kernels had with the formulas written
 * out: even an identity function changed the register allocation of some AVX2 loops (GCC 12).
 */
#ifndef BN_EPILOGUE_H
#define BN_EPILOGUE_H

/* The formulas, each written once over a vocabulary (SUB, FMA): (VSUB, VFMA) for vectors of VL, (UK_SSUB, SFMA) for
 * single elements. FMA rounds a * b + c once where the ISA fuses and twice where not (the scalar kernels), as
 * kernels.def's fma flag says; vectors and single elements of one ISA round alike. */
#define UK_SSUB(a, b) ((a) - (b))
#define UK_AFFINE_OF(SUB, FMA, x, m, a, b) FMA(SUB(x, m), a, b)
#define UK_DX_OF(SUB, FMA, dy, x, m, a, b, d) FMA(a, dy, FMA(b, SUB(x, m), d))
#define UK_AFFINE_V(x, m, a, b) UK_AFFINE_OF(VSUB, VFMA, x, m, a, b)
#define UK_AFFINE_S(x, m, a, b) UK_AFFINE_OF(UK_SSUB, SFMA, x, m, a, b)
#define UK_DX_V(dy, x, m, a, b, d) UK_DX_OF(VSUB, VFMA, dy, x, m, a, b, d)
#define UK_DX_S(dy, x, m, a, b, d) UK_DX_OF(UK_SSUB, SFMA, dy, x, m, a, b, d)
/* The rowcol family (rowcol.inc: layer norm, RMS norm), statistics and affine on different axes, in the same two
 * families FWD and BWD: y = ((x - m) r + c) w + b, dx = (dy w) a + (bb ((x - m) - e) + d), over (SUB, MUL, FMA):
 * (VSUB, VMUL, VFMA) or (UK_SSUB, UK_SMUL, SFMA). */
#define UK_SMUL(a, b) ((a) * (b))
#define UK_RC_AFFINE_OF(SUB, MUL, FMA, x, m, c, r, w, b) FMA(FMA(SUB(x, m), r, c), w, b)
#define UK_RC_DX_OF(SUB, MUL, FMA, dy, x, m, e, a, bb, d, w) FMA(MUL(dy, w), a, FMA(bb, SUB(SUB(x, m), e), d))

/* The epilogues, the one place where an output is finished: UK_<F>_EPI_V(v, p, n) is what to store of family F's
 * value v, a V of the elements at p of which the first n are stored (n == VL: all); UK_<F>_EPI_S(v, p) the same for one
 * element (a TC). A fused epilogue goes here (a statement expression or an inline function, then): its operands (a
 * residual to add, an activation mask to write) come in as kernel arguments, and p says which of their elements are
 * this output's. The only epilogue today, EPI_NONE, is the identity. */
#define UK_FWD_EPI_V(v, p, n) (v)
#define UK_FWD_EPI_S(v, p) (v)
#define UK_BWD_EPI_V(v, p, n) (v)
#define UK_BWD_EPI_S(v, p) (v)

/* Family F's (FWD, BWD) value v through its epilogue, stored at p: a whole vector, a streamed one (p aligned for
 * VSTREAM_TS), the first n lanes (ISAs with VSTORE_TS_N), one element. */
#define UK_PUT(F, p, v) VSTORE_TS(p, UK_##F##_EPI_V(v, p, VL))
#define UK_PUT_NT(F, p, v) VSTREAM_TS(p, UK_##F##_EPI_V(v, p, VL))
#define UK_PUT_N(F, p, v, n) VSTORE_TS_N(p, UK_##F##_EPI_V(v, p, n), n)
#define UK_PUT1(F, p, v) STORE_TS(p, UK_##F##_EPI_S(v, p))

#endif /* BN_EPILOGUE_H */
