/* Portable microkernels: plain C for the baseline ISA (the compiler may use SSE2). */
#include "ukernels.h"

#define ISA scalar
#define D double
#define DL 1
#define DZERO() 0.0
#define DLOADT(p) ((double)*(p))
#define DLOADT_N(p, n) DLOADT(p) /* DL == 1: segments have no tail */
#define DKEEP_N(v, n) (v)
#define DLOAD(p) (*(p))
#define DSTORE(p, v) (*(p) = (v))
#define DSET1(s) (s)
#define DADD(a, b) ((a) + (b))
#define DSUB(a, b) ((a) - (b))
#define DMUL(a, b) ((a) * (b))
#define DFMA(a, b, c) ((a) * (b) + (c))
#define DHSUM(v) (v)
#define VL 1
#define VLOAD(p) (*(p))
#define VSTORE(p, v) (*(p) = (v))
#define VSTREAM(p, v) VSTORE(p, v)
#define UK_SFENCE() ((void)0)
#define VSET1(s) (s)
#define VSUB(a, b) ((a) - (b))
#define VFMA(a, b, c) ((a) * (b) + (c))
#define SFMA(a, b, c) ((a) * (b) + (c))

#define T float
#define S f32
#define V float
#include "ukernels.inc"
#undef T
#undef S
#undef V

#define T double
#define S f64
#define V double
#include "ukernels.inc"
