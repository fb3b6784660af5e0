/* The kernel tables, one per ISA and dtype, filled from the list in kernels.def: the row
 * BN_UKERNEL(avx2, f32, seg_sum, bn_f32_seg_sum__avx2) becomes [BN_ISA_AVX2].seg_sum = bn_f32_seg_sum__avx2 in
 * bn_uk_f32_tables. dispatch.c picks the active ISA's. */
#include "ukernels.h"

#define BN_UKERNEL_TABLE(isa, dtype, vl_, fma) UK_ROW_##dtype([BN_UK_ISA_##isa].vl = (vl_))
#define BN_UKERNEL(isa, dtype, shape, name) UK_ROW_##dtype([BN_UK_ISA_##isa].shape = name)
#define UK_ROW_f32(init) init,
#define UK_ROW_f64(init)
#define UK_ROW_f16(init)
#define UK_ROW_bf16(init)
const bn_uk_f32 bn_uk_f32_tables[BN_ISA_COUNT] = {
#include "kernels.def"
};
#undef UK_ROW_f32
#undef UK_ROW_f64
#undef UK_ROW_f16
#undef UK_ROW_bf16

#define BN_UKERNEL_TABLE(isa, dtype, vl_, fma) UK_ROW_##dtype([BN_UK_ISA_##isa].vl = (vl_))
#define BN_UKERNEL(isa, dtype, shape, name) UK_ROW_##dtype([BN_UK_ISA_##isa].shape = name)
#define UK_ROW_f32(init)
#define UK_ROW_f64(init) init,
#define UK_ROW_f16(init)
#define UK_ROW_bf16(init)
const bn_uk_f64 bn_uk_f64_tables[BN_ISA_COUNT] = {
#include "kernels.def"
};
#undef UK_ROW_f32
#undef UK_ROW_f64
#undef UK_ROW_f16
#undef UK_ROW_bf16

#define BN_UKERNEL_TABLE(isa, dtype, vl_, fma) UK_ROW_##dtype([BN_UK_ISA_##isa].vl = (vl_))
#define BN_UKERNEL(isa, dtype, shape, name) UK_ROW_##dtype([BN_UK_ISA_##isa].shape = name)
#define UK_ROW_f32(init)
#define UK_ROW_f64(init)
#define UK_ROW_f16(init) init,
#define UK_ROW_bf16(init)
const bn_uk_f16 bn_uk_f16_tables[BN_ISA_COUNT] = {
#include "kernels.def"
};
#undef UK_ROW_f32
#undef UK_ROW_f64
#undef UK_ROW_f16
#undef UK_ROW_bf16

#define BN_UKERNEL_TABLE(isa, dtype, vl_, fma) UK_ROW_##dtype([BN_UK_ISA_##isa].vl = (vl_))
#define BN_UKERNEL(isa, dtype, shape, name) UK_ROW_##dtype([BN_UK_ISA_##isa].shape = name)
#define UK_ROW_f32(init)
#define UK_ROW_f64(init)
#define UK_ROW_f16(init)
#define UK_ROW_bf16(init) init,
const bn_uk_bf16 bn_uk_bf16_tables[BN_ISA_COUNT] = {
#include "kernels.def"
};
#undef UK_ROW_f32
#undef UK_ROW_f64
#undef UK_ROW_f16
#undef UK_ROW_bf16
