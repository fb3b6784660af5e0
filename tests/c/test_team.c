/* The own team (src/team.c) under stress: jobs of changing thread counts (2 .. BN_OWN_TEAM_MAX, more than the
 * threads of the last job, then fewer), each share run exactly once and every share done before the call returns,
 * the team spinning, asleep, told to stop spinning, and used from several threads at once. The team's file is
 * included, so that the test can say how many CPUs it may count on (a 2-CPU machine would otherwise never start
 * more than one team thread). Built and run by tests/test_c_team.py (also under ThreadSanitizer when the compiler
 * has it); exit status 0 when every check passed. */
#include "../../src/team.c"

#include <stdio.h>

_Thread_local const bn_context* bn_tls_ctx = NULL;

#define SHARES 64
typedef struct {
    int nth;
    int ran[BN_OWN_TEAM_MAX]; /* each thread's count of runs of its share */
    long sum[BN_OWN_TEAM_MAX];
    const bn_context* ctx[BN_OWN_TEAM_MAX];
    int spin;
} work;

static void share(void* p, int th, int nth) {
    work* w = (work*)p;
    if (nth != w->nth) __atomic_store_n(&w->ran[0], -1000, __ATOMIC_RELAXED);
    long s = 0;
    for (int k = 0; k < w->spin * (th + 1); k++) s += k ^ th;
    w->sum[th] = s;
    w->ctx[th] = bn_tls_ctx;
    __atomic_fetch_add(&w->ran[th], 1, __ATOMIC_RELAXED);
}

static int failures = 0;

static void check(const work* w, int ran_on_team, const char* what, int iter) {
    for (int th = 0; th < w->nth; th++) {
        const int expect = 1;
        if (w->ran[th] != expect || w->ctx[th] != bn_tls_ctx) {
            if (failures++ < 10)
                fprintf(stderr, "%s, call %d: share %d of %d ran %d times (team: %d)\n", what, iter, th, w->nth,
                        w->ran[th], ran_on_team);
        }
    }
}

static void one_call(int nth, int spin, const char* what, int iter) {
    work w = {0};
    w.nth = nth;
    w.spin = spin;
    const int on_team = bn_team_run(share, &w, nth);
    if (!on_team)
        for (int th = 0; th < nth; th++) share(&w, th, nth);
    check(&w, on_team, what, iter);
}

static void* caller(void* p) {
    const int id = (int)(intptr_t)p;
    static const bn_context* fake[4];
    bn_tls_ctx = (const bn_context*)&fake[id];
    for (int it = 0; it < 3000; it++) one_call(2 + (it + id) % (BN_OWN_TEAM_MAX - 1), it % 7 * 50, "concurrent", it);
    return NULL;
}

int main(void) {
    bn_team_configure(1, 200.0);
    pthread_once(&atfork_once, register_atfork);
    conf.ncpu = BN_OWN_TEAM_MAX; /* (see above) */
    static const bn_context* fake;
    bn_tls_ctx = (const bn_context*)&fake;
    const int counts[] = {2, 8, 4, 2, 3, 8, 5, 2, 7, 6};
    int runs = 0;
    for (int it = 0; it < 20000; it++) {
        const int nth = counts[it % 10] > BN_OWN_TEAM_MAX ? BN_OWN_TEAM_MAX : counts[it % 10];
        if (it % 1000 == 999) bn_team_note_omp(); /* (the threads told to stop spinning; the next calls take OpenMP) */
        if (it % 500 == 250) bn_team_configure(1, it % 1000 == 250 ? 0.0 : 200.0); /* (asleep at once, or spinning) */
        const int64_t before = bn_team_runs();
        one_call(nth, it % 13 * 20, "alternating", it);
        runs += bn_team_runs() != before;
    }
    /* back to back with the threads spinning (how many ran on the team is reported, not checked: a late share sends
     * the calls of the next spin time to the caller alone, and on a busy machine most are) */
    bn_team_configure(1, 200.0);
    const int64_t spun0 = bn_team_runs();
    for (int it = 0; it < 5000; it++) one_call(2, 100, "spinning", it);
    const int spun = (int)(bn_team_runs() - spun0);
    struct timespec pause = {0, 2000000}; /* (past the spin time: the threads asleep) */
    nanosleep(&pause, NULL);
    for (int it = 0; it < 200; it++) {
        one_call(2 + it % 3, 10, "after a sleep", it);
        if (it % 20 == 0) nanosleep(&pause, NULL);
    }
    pthread_t t[4];
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, caller, (void*)(intptr_t)i);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    /* (a call whose team thread came late sends the next ones to OpenMP for the spin time: fewer on a busy machine) */
    if (runs < 1000) { /* (the calls with no spin take the team whatever came before) */
        fprintf(stderr, "only %d of 20000 calls ran on the team\n", runs);
        failures++;
    }
    printf("test_team: %d jobs on the team (%d of 5000 back to back), %d failures\n", (int)bn_team_runs(), spun,
           failures);
    return failures != 0;
}
