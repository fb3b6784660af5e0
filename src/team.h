/* Internal: the library's own team of threads for short calls whose threads never wait for each other (team.c).
 *
 * A call of a few microseconds on two threads spends about one of them in the OpenMP runtime's start and end of a
 * parallel region (libgomp: a futex system call at each, whether or not a thread sleeps; docs/tuning.md, "What a
 * two-thread region costs"). The team's threads instead wait for work by spinning on a counter for a while after each
 * call (as long as the library's OpenMP threads do: bn_simd/_openmp.py), then sleep; the caller hands them a job by a
 * store and waits for them by a load. Only for functions whose share of the work needs no barrier, no atomic and no
 * OpenMP call: a job is fn(arg, th, nth) on each of nth threads, th = 0 the caller. */
#ifndef BN_TEAM_H
#define BN_TEAM_H

#include <stdint.h>

typedef void (*bn_team_fn)(void* arg, int th, int nth);

/* Runs fn(arg, th, nth) for th = 0 .. nth-1, th 0 on the calling thread, and returns 1; or runs nothing and returns
 * 0 (the caller then uses OpenMP) where the team cannot: a build without OpenMP or not on Linux, nth outside
 * 2 .. BN_OWN_TEAM_MAX, the caller inside a parallel region, the team busy with another thread's call, its threads
 * not started, the team switched off (bn_team_configure), or an OpenMP region of the library's that ended less than
 * the spin time ago (its threads still spin, on the cores the team would take). */
int bn_team_run(bn_team_fn fn, void* arg, int nth);

/* Notes an OpenMP region of the library's about to start: the team's spinning threads go to sleep. */
void bn_team_note_omp(void);

/* enabled: 0 switches the team off; spin_us: how long its threads spin after a call before they sleep (< 0: leave) */
void bn_team_configure(int enabled, double spin_us);

/* Whether the team may run (1), its spin time, and how many jobs it has run (in this process) */
int bn_team_enabled(void);
double bn_team_spin_us(void);
int64_t bn_team_runs(void);

#define BN_OWN_TEAM_MAX 8

#endif /* BN_TEAM_H */
