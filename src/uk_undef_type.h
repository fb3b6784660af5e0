/* Ends one dtype's instantiation of ukernels.inc in a uk_<isa>.c file: the dtype's macros (its types, the compute
 * vocabulary and the storage I/O). */
#undef S
#undef TS
#undef TC
#undef V
#undef VL
#undef VLOAD
#undef VSET1
#undef VSUB
#undef VFMA
#undef SFMA
#undef VBLEND_N
#undef LOAD_TS
#undef STORE_TS
#undef DLOAD1_TS
#undef VLOAD_TS
#undef VSTORE_TS
#undef VSTREAM_TS
#undef VLOAD_TS_N
#undef VSTORE_TS_N
#undef DLOAD_TS
#undef DLOAD_TS_N
