/* Ends one instantiation of ukernels.inc in a uk_<isa>.c file: its dtype's names (S), types (TS, TC) and storage I/O
 * (io_<dtype>.h). The ISA's vocabulary (vec_<isa>.h) stays for the next instantiation. */
#undef S
#undef TS
#undef TC
#undef LOAD_TS
#undef STORE_TS
#undef DLOAD1_TS
#undef VLOAD_TS
#undef VSTORE_TS
#undef VSTREAM_TS
#undef VLOAD_TS_N
#undef VLOAD_TS_PART
#undef VSTORE_TS_N
#undef VSTORE_TS_EXACT
#undef DLOAD_TS
#undef DLOAD_TS_N
#undef UK_F16_RNE
#undef UK_IO_CONVERTS
