/* Probes for choosing the OpenMP runtime's settings before it is loaded (runtime_probe.c). */
#ifndef BN_RUNTIME_PROBE_H
#define BN_RUNTIME_PROBE_H

/* Nanoseconds one iteration of an idle OpenMP thread's spin loop takes on this CPU (the fastest of a few runs). */
double bn_probe_spin_ns(void);
/* 1 when GCC's OpenMP runtime (libgomp.so.1) is already loaded in this process. */
int bn_probe_libgomp_loaded(void);
/* 1 when this file (and so the whole extension) was compiled by GCC, whose OpenMP runtime is libgomp. */
int bn_probe_compiler_is_gcc(void);

#endif /* BN_RUNTIME_PROBE_H */
