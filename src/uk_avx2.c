/* AVX2 + FMA microkernels. Compiled with -mavx2 -mfma for this file only; reached through dispatch.c after CPUID says
 * the CPU and OS support both. Each instantiation of ukernels.inc is a storage dtype (its io_<dtype>.h) computed in its
 * compute type TC, over this ISA's vocabulary (vec_avx2.h). */
#include "ukernels.h"
#include "vec_avx2.h"

#define ISA avx2

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
