/* The vector vocabulary of the plain-C kernels (uk_scalar.c, baseline flags): a "vector" is one element. Included
 * once by uk_scalar.c before its instantiations of ukernels.inc; the names are those ukernels.inc documents, each
 * compute type's with its type as a suffix (VFMA_float; ukernels.inc picks the instantiation's TC). The storage
 * types' loads and stores are in io_<dtype>.h. */
#ifndef BN_VEC_SCALAR_H
#define BN_VEC_SCALAR_H

#define UK_ISA_SCALAR 1 /* (the section of io_<dtype>.h to take) */
#define UK_HAVE_VBLEND 0

/* doubles (reductions) */
#define D double
#define DL 1
#define DZERO() 0.0
#define DKEEP_N(v, n) (v)
#define DLOAD(p) (*(p))
#define DSTORE(p, v) (*(p) = (v))
#define DSET1(s) (s)
#define DADD(a, b) ((a) + (b))
#define DSUB(a, b) ((a) - (b))
#define DMUL(a, b) ((a) * (b))
#define DFMA(a, b, c) ((a) * (b) + (c))
#define DSUB_FMA(a, b) ((a) - (b))
#define DHSUM(v) (v)
#define UK_SFENCE() ((void)0)

/* VREG(v): nothing here (vec_avx2.h's is an empty asm) */
#define VREG(v) ((void)0)

/* compute in float; a * b + c rounds twice (-ffp-contract=off), as kernels.def says of this ISA (fma 0) */
#define V_float float
#define VL_float 1
#define VLOAD_float(p) (*(p))
#define VSET1_float(s) (s)
#define VMUL_float(a, b) ((a) * (b))
#define VSUB_float(a, b) ((a) - (b))
#define VFMA_float(a, b, c) ((a) * (b) + (c))
#define SFMA_float(a, b, c) ((a) * (b) + (c))
/* a V of TC stored; DL elements of TC loaded as a D (exact) */
#define VSTORE_float(p, v) (*(p) = (v))
#define DLOADC_float(p) ((double)*(p))

/* compute in double */
#define V_double double
#define VL_double 1
#define VLOAD_double(p) (*(p))
#define VSET1_double(s) (s)
#define VMUL_double(a, b) ((a) * (b))
#define VSUB_double(a, b) ((a) - (b))
#define VFMA_double(a, b, c) ((a) * (b) + (c))
#define SFMA_double(a, b, c) ((a) * (b) + (c))
#define VSTORE_double(p, v) (*(p) = (v))
#define DLOADC_double(p) (*(p))


/* The fused epilogues' vocabulary (epilogue.h): a "vector" is one element, so these are epilogue.h's single-element
 * forms. */
#define VADD_float(a, b) ((a) + (b))
#define VDIV_float(a, b) ((a) / (b))
#define VMAX_float(a, b) UK_SMAX(a, b)
#define VMIN_float(a, b) UK_SMIN(a, b)
#define VSELNEG_float(c, a, b) UK_SSELNEG(c, a, b)
#define VGRELU_float(u, dy) UK_SGRELU(u, dy)
#define VGKEEP_float(u, lo, hi, hopen, g) UK_SGKEEP(u, lo, hi, hopen, g)
#define VPOW2K_float(k) uk_pow2k_float(k)
#define VADD_double(a, b) ((a) + (b))
#define VDIV_double(a, b) ((a) / (b))
#define VMAX_double(a, b) UK_SMAX(a, b)
#define VMIN_double(a, b) UK_SMIN(a, b)
#define VSELNEG_double(c, a, b) UK_SSELNEG(c, a, b)
#define VGRELU_double(u, dy) UK_SGRELU(u, dy)
#define VGKEEP_double(u, lo, hi, hopen, g) UK_SGKEEP(u, lo, hi, hopen, g)
#define VPOW2K_double(k) uk_pow2k_double(k)

#endif /* BN_VEC_SCALAR_H */
