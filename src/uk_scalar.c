/* Portable microkernels: plain C for the baseline ISA (the compiler may use SSE2). */
#include "ukernels.h"

#define ISA scalar
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
#define DHSUM(v) (v)
#define UK_SFENCE() ((void)0)
/* compute: a "vector" is one TC */
#define VL 1
#define VLOAD(p) (*(p))
#define VSET1(s) (s)
#define VSUB(a, b) ((a) - (b))
#define VFMA(a, b, c) ((a) * (b) + (c))
#define SFMA(a, b, c) ((a) * (b) + (c))
/* storage I/O, for a storage type that converts to TC and to double in C */
#define LOAD_TS(p) ((TC)(*(p)))
#define STORE_TS(p, v) (*(p) = (TS)(v))
#define DLOAD1_TS(p) ((double)*(p))
#define VLOAD_TS(p) LOAD_TS(p)
#define VSTORE_TS(p, v) STORE_TS(p, v)
#define VSTREAM_TS(p, v) STORE_TS(p, v)
#define DLOAD_TS(p) DLOAD1_TS(p)
#define DLOAD_TS_N(p, n) DLOAD_TS(p) /* DL == 1: segments have no tail */

/* float32: stored and computed as float */
#define S f32
#define TS float
#define TC float
#define V float
#include "ukernels.inc"
#undef S
#undef TS
#undef TC
#undef V

/* float64: stored and computed as double */
#define S f64
#define TS double
#define TC double
#define V double
#include "ukernels.inc"
