/* AVX-512 microkernels. Compiled with -mavx512f -mavx512bw -mavx512vl -mavx2 -mfma for this file only; reached through
 * dispatch.c after CPUID says the CPU and OS support AVX-512 F, BW and VL (every AVX-512 CPU but the Xeon Phis; BW and
 * VL: io_bf16.h's word permutations, the 16-bit masked loads and stores). Each instantiation of ukernels.inc is a
 * storage dtype (its io_<dtype>.h) computed in its compute type TC, over this ISA's vocabulary (vec_avx512.h). */
#include "ukernels.h"
#include "vec_avx512.h"

#define ISA avx512

/* float32: stored and computed as float */
#define S f32
#define TS float
#define TC float
#include "io_f32.h"
#include "ukernels.inc"
#include "uk_undef_type.h"

/* float64: stored and computed as double */
#define S f64
#define TS double
#define TC double
#include "io_f64.h"
#include "ukernels.inc"
#include "uk_undef_type.h"

/* float16: stored as uint16_t patterns, computed as float */
#define S f16
#define TS uint16_t
#define TC float
#include "io_f16.h"
#include "ukernels.inc"
#include "uk_undef_type.h"

/* bfloat16: stored as uint16_t patterns, computed as float */
#define S bf16
#define TS uint16_t
#define TC float
#include "io_bf16.h"
#include "ukernels.inc"
#include "uk_undef_type.h"
