/* The two half-precision storage formats, as 16-bit patterns (uint16_t), and their exact conversions in plain C:
 *   float16  (IEEE binary16):  1 sign, 5 exponent (bias 15), 10 fraction bits; subnormals below 2^-14
 *   bfloat16 (brain float):    1 sign, 8 exponent (bias 127), 7 fraction bits: the top half of a float32
 * Widening is exact. Narrowing rounds once, to nearest with ties to even, as IEEE 754 says: a value overflows to
 * +-Inf only when its rounding with an unbounded exponent exceeds the largest finite value (65504 for float16,
 * (2 - 2^-7) 2^127 for bfloat16); subnormal results are kept (never flushed); a NaN stays a NaN with its sign, made
 * quiet, its payload's top bits kept. These are the scalar kernels' conversions and the reference of the vector ones
 * (io_f16.h, io_bf16.h), which must give the same bits (tests/c/test_kernels.c checks all 65536 patterns one way and
 * a large set of float32 patterns the other). Plain integer arithmetic: no dependence on the rounding mode, MXCSR or
 * the compiler's floating-point flags. */
#ifndef BN_HALF_H
#define BN_HALF_H

#include <stdint.h>
#include <string.h>

static inline uint32_t bn_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}
static inline float bn_f32_of_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* bfloat16 -> float: the pattern is a float32's top 16 bits (exact, NaNs' bits included) */
static inline float bn_bf16_to_f32(uint16_t h) { return bn_f32_of_bits((uint32_t)h << 16); }

/* float -> bfloat16, round to nearest even: add half an ulp of the result, minus one unless the kept part is odd,
 * then truncate. A carry out of the fraction steps the exponent (up to Inf past the largest finite value: exactly
 * IEEE's overflow rule); subnormals round the same way. NaN: quiet bit set, sign and top payload bits kept. */
static inline uint16_t bn_bf16_from_f32(float f) {
    const uint32_t u = bn_f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x0040u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* float16 -> float: exact. Subnormals (e == 0) are m 2^-24, exact in float; NaNs are returned quiet (as F16C's
 * vcvtph2ps does), the fraction in the top bits. */
static inline float bn_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) return bn_f32_of_bits(sign | 0x7F800000u | (m << 13) | (m ? 0x00400000u : 0u));
    if (e) return bn_f32_of_bits(sign | ((e + 112u) << 23) | (m << 13));
    return bn_f32_of_bits(sign | bn_f32_bits((float)m * 0x1p-24f)); /* (m < 2^10: exact, and 0 for m = 0) */
}

/* float -> float16, round to nearest even.
 *   |f| >= 65520 (the midpoint of 65504 and 2^16, which ties to the even 2^16): Inf
 *   |f| >= 2^-14: normal; the float's exponent is rebiased (127 -> 15) and its 23-bit fraction rounded to 10 bits
 *   |f| <  2^-14: subnormal, units of 2^-24: the 24-bit significand shifted right by 126 - e with the remainder
 *                 rounded; at most 2^-25 (a tie with 0) gives zero, and rounding up to 2^-14 gives the smallest
 *                 normal */
static inline uint16_t bn_f16_from_f32(float f) {
    const uint32_t u = bn_f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);
    if (a >= 0x38800000u) return (uint16_t)(sign | ((a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13));
    const uint32_t e = a >> 23;
    if (e < 102) return (uint16_t)sign; /* below 2^-25 */
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u, shift = 126 - e; /* 14 .. 24 */
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    r += rem > half || (rem == half && (r & 1u));
    return (uint16_t)(sign | r);
}

/* double -> float rounded to odd (truncated, the last bit set when inexact): a value so rounded and then rounded to
 * nearest even into a format of at least 2 fewer significand bits gives the double's correctly rounded value in that
 * format (no double rounding). Beyond float's range the truncation gives FLT_MAX with its last bit set, which both
 * half formats round to Inf, as the double itself would. */
static inline float bn_f32_round_odd(double d) {
    if (d != d) return (float)d;
    float f = (float)d;
    if ((double)f == d) return f;
    uint32_t u = bn_f32_bits(f);
    const double af = f < 0 ? -(double)f : (double)f, ad = d < 0 ? -d : d;
    if (af > ad) u -= 1; /* (f rounded away from zero: truncate; inf - 1 is FLT_MAX) */
    return bn_f32_of_bits(u | 1u);
}
static inline uint16_t bn_f16_from_f64(double d) { return bn_f16_from_f32(bn_f32_round_odd(d)); }
static inline uint16_t bn_bf16_from_f64(double d) { return bn_bf16_from_f32(bn_f32_round_odd(d)); }

#endif /* BN_HALF_H */
