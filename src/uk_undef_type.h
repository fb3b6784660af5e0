/* Ends one dtype's instantiation of ukernels.inc in a uk_<isa>.c file: the type-specific macros. */
#undef T
#undef S
#undef V
#undef VL
#undef VLOAD
#undef VSTORE
#undef VSTREAM
#undef VSET1
#undef VSUB
#undef VFMA
#undef SFMA
#undef DLOADT
#undef DLOADT_N
#undef VLOAD_N
#undef VSTORE_N
#undef VBLEND_N
