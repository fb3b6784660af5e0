/*
 * Every microkernel of src/kernels.def, on every ISA this CPU runs, against the scalar kernel of its dtype and shape.
 * Plain C, no framework; tests/test_c_kernels.py builds it with build_config.py's flags and runs it.
 *
 *   test_kernels [-v]          exit status 0 when every check passed; -v: one line per kernel
 *
 * What each kernel is held to (tests/c/test_kernels.inc has the cases):
 *   reductions (seg_sum, seg_dev, seg_bwd_sums, cl_sum, cl_dev, cl_bwd_sums)
 *       add in double in their own order: within (n + 2) eps |terms| of an 80-bit sum, and within twice that of the
 *       scalar kernel, n the terms one result adds and eps double's (the data of either dtype widen exactly). The
 *       drivers rely on more, bit for bit: a segment's sums are the same whatever segments share the call, whatever
 *       the prefetch argument and the input's alignment; a channels-last column block from a multiple of 64 channels
 *       (BN_CL_COL_ALIGN, batchnorm.c) gives its channels the bits of the whole rows.
 *   element-wise kernels (seg_affine, seg_bwd_apply, cl_affine, cl_bwd_apply)
 *       every output element is bit for bit its formula in T, a * b + c rounded once where kernels.def says the
 *       ISA fuses (fma 1) and twice where not, whatever the size, alignments, store mode, column strips or flat
 *       runs, interleaved coefficients and in place; so the same bits for every thread split and path, and within
 *       a rounding of the product of the scalar kernel's (which rounds twice).
 *   rowcol kernels (rc_*, cr_*: layer norm, RMS norm): tests/c/test_rowcol.inc says what each is held to
 *   the 16-bit dtypes' kernels (f16, bf16): the float32 kernel of their ISA with a conversion at each load and store
 *       (tests/c/test_half.inc); their conversions (half.h and every ISA's) against this file's own correct rounding,
 *       all 65536 patterns widened, ties, their neighbours and a sweep of float patterns narrowed (test_conversions).
 *   coefficients and bookkeeping (norm_params, bwd_params, cl_chunk_finish, cl_combine, cl_sum_rows)
 *       the scalar kernel's bits on every ISA (a NaN for a NaN: its sign and payload may differ), return value
 *       included, at every alignment of their arrays.
 * Every output has 64 bytes of canaries before and after it (and in place, the array written over); every case's
 * arrays are also placed to end and to start at an inaccessible page (a read or write past either end faults: the
 * case is printed); the memory around inputs is NaN, which a reduction reading outside its rows would return.
 * Sizes sweep 1 .. 4 vl + 2 and more around multiples of the vector length vl, and a few large ones; offsets every
 * element of a cache line (which covers every offset within a vector: vl elements are at most 64 bytes), every pair
 * of input and output offsets for the short channels-first runs.
 */
#define _GNU_SOURCE
#include <float.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "ukernels.h"

/* the ISA and its table row (kernels.def's BN_UKERNEL_TABLE) of the kernel under test */
typedef struct {
    int isa, vl, fma;
    const char* name;
} kctx;

static int verbose;
static long failures, checks, calls;
/* the case being run, printed if it faults */
static char current[512];
static long current_params[8];

#define MAX_FAILURES_SHOWN 25

static void fail(const kctx* c, const char* fmt, ...) {
    failures++;
    if (failures > MAX_FAILURES_SHOWN) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL %s (%s): ", c->name, bn_isa_name(c->isa));
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void on_fault(int sig) {
    /* (not async-signal-safe, but the process is going down either way) */
    fprintf(stderr,
            "FAULT (signal %d) in %s, case params %ld %ld %ld %ld %ld %ld %ld %ld: an access outside its arrays\n", sig,
            current, current_params[0], current_params[1], current_params[2], current_params[3], current_params[4],
            current_params[5], current_params[6], current_params[7]);
    fflush(stderr);
    _exit(3);
}

static void note_case(const kctx* c, const char* what, long p0, long p1, long p2, long p3, long p4, long p5, long p6,
                      long p7) {
    snprintf(current, sizeof current, "%s (%s) %s", c->name, bn_isa_name(c->isa), what);
    const long p[8] = {p0, p1, p2, p3, p4, p5, p6, p7};
    memcpy(current_params, p, sizeof p);
    calls++;
}

/* ---- deterministic random numbers (xorshift64*) ---- */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng_next(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}
static double rng_uniform(double lo, double hi) { return lo + (hi - lo) * (double)(rng_next() >> 11) * 0x1p-53; }
static int64_t rng_int(int64_t n) { return (int64_t)(rng_next() % (uint64_t)n); }

/* ---- memory: slots of pages between two inaccessible pages ----
 * place() puts an input array in a slot: AT_OFFSET `off` elements past a cache line, 64 bytes (or more) into the slot,
 * or ending (AT_END) or starting (AT_START) at an inaccessible page; the bytes around it (64 each side, or up to the
 * page) are set to 0xff, a NaN in either dtype, which a reduction reading them would return. place_out() places an
 * output array so, with bytes 0xa5 around it (a number in either dtype, which no out-of-bounds write of a value
 * computed from those NaNs gives): the canaries that canaries_ok() finds intact. */
enum { AT_OFFSET, AT_END, AT_START };
#define CANARY 64
#define NSLOTS 11
#define SLOT_BYTES ((size_t)1 << 20)
#define IN_FILL 0xff
#define OUT_FILL 0xa5
static unsigned char* slot_lo[NSLOTS];
static unsigned char slot_fill[NSLOTS];
static size_t page;

static void slots_init(void) {
    page = (size_t)sysconf(_SC_PAGESIZE);
    for (int s = 0; s < NSLOTS; s++) {
        unsigned char* p =
            mmap(NULL, SLOT_BYTES + 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED || mprotect(p, page, PROT_NONE) || mprotect(p + page + SLOT_BYTES, page, PROT_NONE)) {
            perror("test_kernels: mmap");
            exit(2);
        }
        slot_lo[s] = p + page;
    }
}

static void* place_filled(int slot, int where, int64_t off, size_t esize, int64_t n, unsigned char fill) {
    const size_t bytes = (size_t)n * esize;
    unsigned char* const lo = slot_lo[slot];
    unsigned char* p;
    if (where == AT_END) p = lo + SLOT_BYTES - bytes;
    else if (where == AT_START) p = lo;
    else p = lo + CANARY + (size_t)off * esize;
    if (bytes + 2 * CANARY + 64 > SLOT_BYTES) {
        fprintf(stderr, "test_kernels: an array of %zu bytes does not fit a slot\n", bytes);
        exit(2);
    }
    unsigned char* a = p - lo >= CANARY ? p - CANARY : lo;
    unsigned char* b = (size_t)(lo + SLOT_BYTES - (p + bytes)) >= CANARY ? p + bytes + CANARY : lo + SLOT_BYTES;
    memset(a, fill, (size_t)(b - a));
    slot_fill[slot] = fill;
    return p;
}
static void* place(int slot, int where, int64_t off, size_t esize, int64_t n) {
    return place_filled(slot, where, off, esize, n, IN_FILL);
}
static void* place_out(int slot, int where, int64_t off, size_t esize, int64_t n) {
    return place_filled(slot, where, off, esize, n, OUT_FILL);
}

/* whether the canaries around the n-element array at p (in its slot) are intact */
static int canaries_ok(int slot, const void* p, size_t esize, int64_t n) {
    const unsigned char* const lo = slot_lo[slot];
    const unsigned char* q = p;
    const unsigned char* a = q - lo >= CANARY ? q - CANARY : lo;
    const unsigned char* e = q + (size_t)n * esize;
    const unsigned char* b = (size_t)(lo + SLOT_BYTES - e) >= CANARY ? e + CANARY : lo + SLOT_BYTES;
    for (const unsigned char* r = a; r < q; r++)
        if (*r != slot_fill[slot]) return 0;
    for (const unsigned char* r = e; r < b; r++)
        if (*r != slot_fill[slot]) return 0;
    return 1;
}

/* ---- comparisons ---- */
static int same_bits(double a, double b) { return memcmp(&a, &b, sizeof a) == 0; }
static int same_bits_f(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }
/* the same bits, or both NaN (the coefficient kernels promise nothing of a NaN's sign or payload) */
static int same_or_nan(double a, double b) { return same_bits(a, b) || (isnan(a) && isnan(b)); }

/* A sum of n terms of magnitude sum_abs (and one earlier value) in any order: |error| <= (n + 1) eps/2 sum_abs
 * (first order); twice that, for margin, against the exact sum, and twice again between two such sums. */
static double sum_tol(int64_t n, double sum_abs) { return (double)(n + 2) * DBL_EPSILON * sum_abs; }

/* sizes around multiples of vl: 1 .. 4 vl + 2, then a few past 5 vl, 8 vl, and large ones; sorted, distinct */
static int sizes(int vl, int64_t* out, int large) {
    int k = 0;
    for (int64_t n = 1; n <= 4 * vl + 2; n++) out[k++] = n;
    const int64_t more[] = {5 * vl - 1, 5 * vl + 3, 8 * vl - 1, 8 * vl + 5, 63, 64, 65, 100};
    for (size_t i = 0; i < sizeof more / sizeof *more; i++) out[k++] = more[i];
    if (large) {
        const int64_t big[] = {257, 1031, 2500};
        for (size_t i = 0; i < sizeof big / sizeof *big; i++) out[k++] = big[i];
    }
    /* sort, drop repeats */
    for (int i = 1; i < k; i++)
        for (int j = i; j > 0 && out[j - 1] > out[j]; j--) {
            const int64_t t = out[j];
            out[j] = out[j - 1];
            out[j - 1] = t;
        }
    int m = 0;
    for (int i = 0; i < k; i++)
        if (m == 0 || out[m - 1] != out[i]) out[m++] = out[i];
    return m;
}

/* the element offsets of a cache line (every offset within a vector of any ISA) */
#define LINE_ELEMS(T) ((int64_t)(64 / sizeof(T)))

/* the placements of a case's arrays: at most every pair of offsets in a line of float32, then two at page ends */
#define MAX_PLACEMENTS (16 * 16 + 2)
/* the slots of the arrays: element-wise kernels; reductions (and which: the sums of x; of x - m and its square; of dy
 * and dy (x - m)); coefficient kernels */
enum { E_X, E_DY, E_Y, E_M, E_A, E_B, E_D, E_IL };
enum { R_IN_X, R_IN_DY, R_OUT1, R_OUT2, R_M };
enum { R_SUM, R_DEV, R_BWD };
enum { P_MEAN, P_VAR, P_W, P_B, P_OM, P_OA, P_OB, P_OD, P_GW, P_GB, P_W2 };

/* ---- the testers, one per shape and dtype: test_<dtype>_<shape>(ctx, kernel) ---- */
#define T float
#define S f32
#define TFMA(a, b, c) fmaf((a), (b), (c))
#define TSAME(a, b) same_bits_f((a), (b))
#include "test_kernels.inc"
#undef T
#undef S
#undef TFMA
#undef TSAME

#define T double
#define S f64
#define TFMA(a, b, c) fma((a), (b), (c))
#define TSAME(a, b) same_bits((a), (b))
#include "test_kernels.inc"
#undef T
#undef S
#undef TFMA
#undef TSAME

/* the 16-bit dtypes: each kernel against the float32 kernel of its ISA on the widened data (test_half.inc) */
#include "half.h"
#define S f16
#define WIDEN(h) bn_f16_to_f32(h)
#define NARROW(f) bn_f16_from_f32(f)
#include "test_half.inc"
#undef S
#undef WIDEN
#undef NARROW
#define S bf16
#define WIDEN(h) bn_bf16_to_f32(h)
#define NARROW(f) bn_bf16_from_f32(f)
#include "test_half.inc"
#undef S
#undef WIDEN
#undef NARROW

/* ---- the conversions of the 16-bit dtypes, against this file's own rounding ----
 * Each format: p significand bits (the implicit one included), emin the exponent of its smallest normal, its largest
 * finite value. The correctly rounded value of a float f is rint(|f| / q) q with q = 2^(max(E, emin) - p + 1), E the
 * exponent of |f| (exact in double: a power-of-two scaling and an integer rounding to nearest even), Inf when that
 * exceeds the largest finite value; a NaN gives a NaN of f's sign. Widening is checked value for value (ldexp of
 * the fields), signed zeros and NaNs by their bits. */
typedef struct {
    const char* name;
    int p, emin, ebits;
    double max;
    float (*widen)(uint16_t);
    uint16_t (*narrow)(float);
    void (*vwiden[BN_ISA_COUNT])(const uint16_t*, float*, int64_t);
    void (*vnarrow[BN_ISA_COUNT])(const float*, uint16_t*, int64_t);
} half_format;

static double ref_value(const half_format* f, uint16_t h) {
    const int fb = f->p - 1, e = (h >> fb) & ((1 << f->ebits) - 1), m = h & ((1 << fb) - 1);
    const double s = h & 0x8000 ? -1.0 : 1.0;
    if (e == (1 << f->ebits) - 1) return m ? NAN : s * INFINITY;
    if (e == 0) return s * ldexp(m, f->emin - fb);
    return s * ldexp((double)((1 << fb) + m), e - (1 << (f->ebits - 1)) + 1 - fb);
}
static double ref_round(const half_format* f, float x) {
    if (isnan(x)) return NAN;
    const double a = fabs((double)x);
    if (isinf(x) || a == 0) return (double)x;
    int e;
    frexp(a, &e);
    const double q = ldexp(1.0, (e - 1 > f->emin ? e - 1 : f->emin) - f->p + 1);
    const double r = rint(a / q) * q;
    return copysign(r > f->max ? INFINITY : r, (double)x);
}
/* whether pattern h is the rounding of x: its value (and its sign, for zeros and NaNs; a NaN: quiet) */
static int narrowed_ok(const half_format* f, float x, uint16_t h) {
    const double want = ref_round(f, x), got = ref_value(f, h);
    if (((h & 0x8000) != 0) != (signbit(x) != 0)) return 0;
    if (isnan(want)) return isnan(got) && (h >> (f->p - 2) & 1); /* (the quiet bit: the fraction's top bit) */
    return got == want;
}

static void test_conversions(const half_format* f, int isa) {
    const kctx c = {isa, 0, 0, f->name};
    /* widen: every pattern */
    uint16_t* all = malloc(sizeof(uint16_t) * 65536);
    float* wide = malloc(sizeof(float) * 65536);
    for (uint32_t h = 0; h < 65536; h++) all[h] = (uint16_t)h;
    f->vwiden[isa](all, wide, 65536);
    checks++;
    for (uint32_t h = 0; h < 65536; h++) {
        const double want = ref_value(f, (uint16_t)h);
        const float got = wide[h];
        const int ok = isnan(want) ? isnan(got) && (signbit(got) != 0) == ((h & 0x8000) != 0)
                                   : (double)got == want && (signbit(got) != 0) == ((h & 0x8000) != 0);
        if (!ok || !same_bits_f(got, f->widen((uint16_t)h))) {
            fail(&c, "widening 0x%04x gives %.9g (its scalar conversion %.9g, its value %.9g)", h, (double)got,
                 (double)f->widen((uint16_t)h), want);
            break;
        }
    }
    /* narrow: every pattern's value, the midpoints between neighbours (ties) and the floats either side of them,
     * a strided sweep of all float patterns (NaNs, Inf, subnormals, near-overflow values among them) */
    const int64_t nmax = 65536 * 4 + (1 << 20) + 64;
    float* xs = malloc(sizeof(float) * nmax);
    int64_t n = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        const double v = ref_value(f, (uint16_t)h), w = ref_value(f, (uint16_t)(h + 1));
        xs[n++] = (float)v;
        if (isfinite(v) && isfinite(w) && (h & 0x7FFF) != 0x7FFF && fabs(w) > fabs(v)) {
            const float mid = (float)((v + w) / 2); /* (exact: the formats have far fewer bits than float) */
            xs[n++] = mid;
            xs[n++] = nextafterf(mid, 0.0f);
            xs[n++] = nextafterf(mid, mid > 0 ? INFINITY : -INFINITY);
        }
    }
    for (uint64_t u = 0; u < (1ull << 32); u += 4099) xs[n++] = bn_f32_of_bits((uint32_t)u);
    const uint32_t extra[] = {0x7F800000u, 0xFF800000u, 0x7F800001u, 0x7FC00000u, 0xFFFFFFFFu, 0x7F7FFFFFu,
                              0x477FEFFFu, 0x477FF000u, 0x477FF001u, 0x7F7F7FFFu, 0x7F7F8000u, 0x00000001u,
                              0x80000001u, 0x33000000u, 0x33000001u, 0x337FFFFFu, 0x00400000u, 0x007FFFFFu};
    for (size_t i = 0; i < sizeof extra / sizeof *extra; i++) xs[n++] = bn_f32_of_bits(extra[i]);
    uint16_t* hs = malloc(sizeof(uint16_t) * (size_t)n);
    f->vnarrow[isa](xs, hs, n);
    checks++;
    for (int64_t i = 0; i < n; i++)
        if (!narrowed_ok(f, xs[i], hs[i]) || hs[i] != f->narrow(xs[i])) {
            fail(&c, "narrowing %.9g (0x%08x) gives 0x%04x (its scalar conversion 0x%04x; the correct value %.9g)",
                 (double)xs[i], bn_f32_bits(xs[i]), hs[i], f->narrow(xs[i]), ref_round(f, xs[i]));
            break;
        }
    free(all);
    free(wide);
    free(xs);
    free(hs);
}

static const half_format half_formats[] = {
    {"float16 conversions", 11, -14, 5, 65504.0, bn_f16_to_f32, bn_f16_from_f32,
     {bn_f16_widen__scalar, bn_f16_widen__avx2, bn_f16_widen__avx512},
     {bn_f16_narrow__scalar, bn_f16_narrow__avx2, bn_f16_narrow__avx512}},
    {"bfloat16 conversions", 8, -126, 8, 0x1.FEp127, bn_bf16_to_f32, bn_bf16_from_f32,
     {bn_bf16_widen__scalar, bn_bf16_widen__avx2, bn_bf16_widen__avx512},
     {bn_bf16_narrow__scalar, bn_bf16_narrow__avx2, bn_bf16_narrow__avx512}},
};

/* ---- the list ---- */
enum { DT_f32, DT_f64, DT_f16, DT_bf16, DT_COUNT };
static const char* const dt_names[DT_COUNT] = {"f32", "f64", "f16", "bf16"};
typedef struct {
    int listed, vl, fma;
} table_row;
static table_row tables[BN_ISA_COUNT][DT_COUNT];

static void read_table_rows(void) {
#define BN_UKERNEL(isa, dtype, shape, name)
#define BN_UKERNEL_TABLE(isa, dtype, vl_, fma_) \
    tables[BN_UK_ISA_##isa][DT_##dtype] = (table_row){tables[BN_UK_ISA_##isa][DT_##dtype].listed + 1, (vl_), (fma_)};
#include "kernels.def"
}

/* per listed kernel: whether its table slot holds it, and its test */
#define BN_UKERNEL_TABLE(isa, dtype, vl, fma)
#define BN_UKERNEL(isa, dtype, shape, name)                                                     \
    static int in_table_##name(void) { return bn_uk_##dtype##_tables[BN_UK_ISA_##isa].shape == name; } \
    static void test_##name(const kctx* c) { test_##dtype##_##shape(c, name); }
#include "kernels.def"

typedef struct {
    int isa, dt;
    const char *shape, *name;
    int (*in_table)(void);
    void (*test)(const kctx*);
} kernel_row;
static const kernel_row kernels[] = {
#define BN_UKERNEL_TABLE(isa, dtype, vl, fma)
#define BN_UKERNEL(isa, dtype, shape, name) \
    {BN_UK_ISA_##isa, DT_##dtype, #shape, #name, in_table_##name, test_##name},
#include "kernels.def"
};
#define NKERNELS ((int)(sizeof kernels / sizeof *kernels))

/* every slot of every table is filled, each listed kernel is in its slot, each table's vl is the listed one */
static int check_list(void) {
    int bad = 0;
    for (int isa = 0; isa < BN_ISA_COUNT; isa++)
        for (int dt = 0; dt < DT_COUNT; dt++)
            if (tables[isa][dt].listed != 1) {
                fprintf(stderr, "FAIL kernels.def: %d BN_UKERNEL_TABLE rows for %s %s (1 expected)\n",
                        tables[isa][dt].listed, bn_isa_name(isa), dt_names[dt]);
                bad++;
            }
    int nslots = 0;
    for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
        const bn_uk_f32* t32 = &bn_uk_f32_tables[isa];
        const bn_uk_f64* t64 = &bn_uk_f64_tables[isa];
        const bn_uk_f16* t16 = &bn_uk_f16_tables[isa];
        const bn_uk_bf16* tb16 = &bn_uk_bf16_tables[isa];
#define SLOT(shape)                                                                                             \
    if (!t32->shape || !t64->shape || !t16->shape || !tb16->shape) {                                            \
        fprintf(stderr, "FAIL kernels.def: no %s kernel of some dtype for %s\n", #shape, bn_isa_name(isa));     \
        bad++;                                                                                                  \
    }                                                                                                           \
    if (isa == 0) nslots++;
        BN_UK_SHAPES(SLOT)
#undef SLOT
        if (t16->vl != tables[isa][DT_f16].vl || tb16->vl != tables[isa][DT_bf16].vl || t16->vl != t32->vl ||
            tb16->vl != t32->vl) {
            fprintf(stderr, "FAIL kernels.c: the %s 16-bit tables' vl are not the listed ones, or not float32's\n",
                    bn_isa_name(isa));
            bad++;
        }
        if (t32->vl != tables[isa][DT_f32].vl || t64->vl != tables[isa][DT_f64].vl || t32->vl > UK_MAX_VL ||
            t64->vl > UK_MAX_VL) {
            fprintf(stderr, "FAIL kernels.c: the %s tables' vl %d, %d are not the listed %d, %d\n", bn_isa_name(isa),
                    t32->vl, t64->vl, tables[isa][DT_f32].vl, tables[isa][DT_f64].vl);
            bad++;
        }
    }
    for (int i = 0; i < NKERNELS; i++)
        if (!kernels[i].in_table()) {
            fprintf(stderr, "FAIL kernels.c: %s is not in its table's %s slot\n", kernels[i].name, kernels[i].shape);
            bad++;
        }
    if (NKERNELS != nslots * BN_ISA_COUNT * DT_COUNT) {
        fprintf(stderr, "FAIL kernels.def: %d kernels listed, %d slots in all\n", NKERNELS,
                nslots * BN_ISA_COUNT * DT_COUNT);
        bad++;
    }
    return bad;
}

int main(int argc, char** argv) {
    verbose = argc > 1 && strcmp(argv[1], "-v") == 0;
    signal(SIGSEGV, on_fault);
    signal(SIGBUS, on_fault);
    slots_init();
    read_table_rows();
    failures += check_list();

    int run = 0, skipped = 0;
    char isas[64] = "", missing[64] = "";
    for (int isa = 0; isa < BN_ISA_COUNT; isa++) {
        char* to = bn_isa_supported(isa) ? isas : missing;
        strncat(to, " ", sizeof isas - strlen(to) - 1);
        strncat(to, bn_isa_name(isa), sizeof isas - strlen(to) - 1);
    }
    for (int i = 0; i < NKERNELS; i++) {
        const kernel_row* k = &kernels[i];
        if (!bn_isa_supported(k->isa) || (k->dt == DT_f16 && k->isa != BN_ISA_SCALAR && !bn_have_f16c())) {
            skipped++;
            continue;
        }
        const kctx c = {k->isa, tables[k->isa][k->dt].vl, tables[k->isa][k->dt].fma, k->name};
        const long f0 = failures, n0 = checks, c0 = calls;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        k->test(&c);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        bn_set_cl_strip_bytes(-1);
        run++;
        if (verbose)
            printf("%-32s %8ld calls %10ld checks %6.2f s %s\n", k->name, calls - c0, checks - n0,
                   (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec),
                   failures > f0 ? "FAILED" : "ok");
    }
    for (int isa = 0; isa < BN_ISA_COUNT; isa++)
        for (int fi = 0; fi < 2; fi++)
            if (bn_isa_supported(isa) && (fi == 1 || isa == BN_ISA_SCALAR || bn_have_f16c()))
                test_conversions(&half_formats[fi], isa);
    printf("test_kernels: %d kernels run on the ISAs%s, %d not run (ISAs this CPU lacks:%s); %ld calls, %ld checks, "
           "%ld failures\n",
           run, isas, skipped, missing[0] ? missing : " none", calls, checks, failures);
    if (failures > MAX_FAILURES_SHOWN) printf("(the first %d failures shown)\n", MAX_FAILURES_SHOWN);
    return failures ? 1 : 0;
}
