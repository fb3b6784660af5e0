/* The library's own team of threads: see team.h. */
/* (syscall, for the futex: GNU; the rest is POSIX) */
#define _GNU_SOURCE
#include "team.h"

#include <stdint.h>

#if defined(_OPENMP) && defined(__linux__)
#define BN_HAVE_OWN_TEAM 1
#else
#define BN_HAVE_OWN_TEAM 0
#endif

#if BN_HAVE_OWN_TEAM
#include <linux/futex.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "dispatch.h"

/* How long the team's threads spin after a call before they sleep, unless told (bn_simd/_openmp.py's SPIN_US, the
 * library's OpenMP threads' spin: docs/tuning.md, "OpenMP threads between calls"). */
#define BN_TEAM_SPIN_NS 200000
/* How long the caller, its own share done, leaves the others to the spinning team threads before it takes them */
#define BN_TEAM_GRACE_NS 2000
/* How long the caller waiting for the shares taken spins before it yields its core at each further look: a team
 * thread still working after this has most likely lost its core to another thread (perhaps the caller's own). Then
 * it yields its core at each look for BN_TEAM_YIELD_NS, then naps BN_TEAM_NAP_NS between looks (a share that has not
 * ended by then waits for a core that another thread holds: the caller need not hold one too) */
#define BN_TEAM_WAIT_NS 20000
#define BN_TEAM_YIELD_NS 1000000
#define BN_TEAM_NAP_NS 20000
/* The team threads' stacks (the shares' own frames take a few tens of KB) */
#define BN_TEAM_STACK ((size_t)1 << 20)

#define LINE __attribute__((aligned(64)))

/* The caller's line: the job, handed over by the store to word that follows its other fields. word is the team
 * threads' futex word: the job's number times 16 plus its thread count, so that a thread learns from one load whether
 * the job is for it, and one that is not never reads the other fields (the next job's, perhaps, by then) */
#define BN_TEAM_NTH_BITS 4
_Static_assert(BN_OWN_TEAM_MAX < (1 << BN_TEAM_NTH_BITS), "a job's thread count fits its bits of the word");
static struct {
    unsigned word;
    int busy; /* a caller holds the team */
    bn_team_fn fn;
    void* arg;
    const bn_context* ctx; /* the caller's kernel context (OpenMP's copyin of bn_tls_ctx) */
    unsigned csr;          /* the caller's MXCSR (x86: flush-to-zero, rounding), which the shares run with */
} job LINE;
/* The shares' line: the next share of the job to take (the job's word times 2^32 plus the share's number: a thread
 * takes a share by raising it, and only while it still names the job it saw), and the shares done (but the caller's
 * first) */
static struct {
    uint64_t next;
    int done;
} fin LINE;
/* Rarely written: the team threads asleep or spinning, and a request to those spinning to sleep */
static struct {
    int sleeping; /* team threads asleep, or about to be (their check of word follows) */
    int spinning; /* team threads spinning */
    int quiet;    /* set by bn_team_note_omp: sleep now */
} idle LINE;
/* The caller's: configuration, the threads started, the end of the library's last OpenMP region */
static struct {
    int64_t spin_ns;
    int64_t last_omp_ns;
    int64_t runs;   /* jobs run */
    int enabled;
    int started;    /* team threads running (1 .. BN_OWN_TEAM_MAX - 1) */
    int failed;     /* a thread could not be started: the team is not used again */
    int ncpu;       /* CPUs the caller that started the team may run on (its threads' too), 0: not known yet */
} conf LINE = {BN_TEAM_SPIN_NS, INT64_MIN / 2, 0, 1, 0, 0, 0};

/* Team thread i's job word when it was started (written before it starts) */
static unsigned start_word[BN_OWN_TEAM_MAX];
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* The settings from the environment, once, before any other (a C program's; the Python package configures the
 * team again after its import: bn_simd/_openmp.py): BN_SIMD_OWN_TEAM=0 switches the team off; BN_SIMD_SPIN_US is
 * the spin time, and OMP_WAIT_POLICY=passive makes it none */
static pthread_once_t env_once = PTHREAD_ONCE_INIT;
static void read_env(void) {
    const char* v = getenv("BN_SIMD_OWN_TEAM");
    if (v && (!strcmp(v, "0") || !strcasecmp(v, "off") || !strcasecmp(v, "false") || !strcasecmp(v, "no")))
        conf.enabled = 0;
    v = getenv("OMP_WAIT_POLICY");
    if (v && !strcasecmp(v, "passive")) conf.spin_ns = 0;
    v = getenv("BN_SIMD_SPIN_US");
    char* end;
    const double us = v && *v ? strtod(v, &end) : -1.0;
    if (v && *v && !*end && us >= 0.0 && us < 1e9) conf.spin_ns = (int64_t)(us * 1000.0);
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void futex_wait(unsigned* word, unsigned value) {
    syscall(SYS_futex, (int*)word, FUTEX_WAIT_PRIVATE, (int)value, NULL, NULL, 0);
}
static void futex_wake(unsigned* word, int n) { syscall(SYS_futex, (int*)word, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0); }

static unsigned get_csr(void) {
#if defined(__SSE__)
    return __builtin_ia32_stmxcsr();
#else
    return 0;
#endif
}
static void set_csr(unsigned csr) {
#if defined(__SSE__)
    if (__builtin_ia32_stmxcsr() != csr) __builtin_ia32_ldmxcsr(csr);
#else
    (void)csr;
#endif
}

/* Takes and runs shares of the job of word w until none is left (or the job is over); returns how many it ran */
static int run_shares(unsigned w, int nth) {
    int ran = 0;
    for (;;) {
        uint64_t c = __atomic_load_n(&fin.next, __ATOMIC_ACQUIRE);
        if ((unsigned)(c >> 32) != w || (int)(c & 0xffffffffu) >= nth) return ran;
        if (!__atomic_compare_exchange_n(&fin.next, &c, c + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
        /* (the job's fields stay the job's until its shares are all done, this one among them) */
        bn_tls_ctx = job.ctx;
        set_csr(job.csr);
        job.fn(job.arg, (int)(c & 0xffffffffu), nth);
        __atomic_fetch_add(&fin.done, 1, __ATOMIC_RELEASE);
        ran++;
    }
}

/* Team thread i: waits for a job (spinning for conf.spin_ns after a job it was one of the threads of, then asleep;
 * asleep at once after one of fewer threads), takes shares of it while some are left. A job's shares go to whichever
 * thread takes them first, the caller too once its own is done: a team thread that has not woken yet, or waits for a
 * core (the caller's, even), holds no call up. */
static void* team_main(void* p) {
    const int i = (int)(intptr_t)p;
    unsigned seen = start_word[i]; /* (the next job is for it, whenever it first runs) */
    int spin_next = 1;
    pthread_setname_np(pthread_self(), "bn_simd-team");
    for (;;) {
        unsigned w = __atomic_load_n(&job.word, __ATOMIC_ACQUIRE);
        int slept = 0;
        if (w == seen) {
            const int64_t spin = spin_next ? __atomic_load_n(&conf.spin_ns, __ATOMIC_RELAXED) : 0;
            const int64_t until = spin > 0 ? now_ns() + spin : 0;
            __atomic_fetch_add(&idle.spinning, 1, __ATOMIC_RELAXED);
            for (int k = 1; (w = __atomic_load_n(&job.word, __ATOMIC_ACQUIRE)) == seen; k++) {
                cpu_relax();
                if (k % 64 == 0) sched_yield(); /* (a thread of the process waiting for this core gets it) */
                if (until == 0 || (k % 64 == 0 && (__atomic_load_n(&idle.quiet, __ATOMIC_RELAXED) || now_ns() > until))) {
                    /* (a caller that stores word after this thread's sleeping count is seen by the futex's check of
                     * word; one that stored it before sees the count, seq_cst both sides, and wakes it) */
                    __atomic_fetch_sub(&idle.spinning, 1, __ATOMIC_RELAXED);
                    __atomic_fetch_add(&idle.sleeping, 1, __ATOMIC_SEQ_CST);
                    while ((w = __atomic_load_n(&job.word, __ATOMIC_SEQ_CST)) == seen) futex_wait(&job.word, seen);
                    __atomic_fetch_sub(&idle.sleeping, 1, __ATOMIC_RELAXED);
                    slept = 1;
                    break;
                }
            }
            if (!slept) __atomic_fetch_sub(&idle.spinning, 1, __ATOMIC_RELAXED);
        }
        seen = w;
        const int nth = (int)(w & ((1u << BN_TEAM_NTH_BITS) - 1));
        /* (it spins after a job it took a share of, or was woken for; one that spun and found every share taken had
         * no core while it spun: it sleeps until the next job, whose wake-up gets it one) */
        spin_next = run_shares(w, nth) > 0 || slept;
    }
    return NULL;
}

/* In a child of fork() only the forking thread runs: the team starts again when next asked for */
static void team_after_fork_child(void) {
    job.busy = 0;
    job.word = 0;
    fin.next = 0;
    fin.done = 0;
    idle.sleeping = idle.spinning = idle.quiet = 0;
    conf.started = 0;
}

static void register_atfork(void) { pthread_atfork(NULL, NULL, team_after_fork_child); }

/* Starts team threads up to n - 1 of them (the caller holds the team) */
static int team_start(int n) {
    pthread_once(&atfork_once, register_atfork);
    if (!conf.ncpu) {
        cpu_set_t cpus;
        conf.ncpu = sched_getaffinity(0, sizeof(cpus), &cpus) ? BN_OWN_TEAM_MAX : CPU_COUNT(&cpus);
    }
    /* (more threads than CPUs to run them: OpenMP's runtime, which stops spinning then) */
    if (n > conf.ncpu) return 0;
    if (conf.started >= n - 1) return 1;
    pthread_attr_t attr;
    if (pthread_attr_init(&attr)) return 0;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, BN_TEAM_STACK);
    /* (the team's threads take no signal: the process's handlers run on its own threads) */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (conf.started < n - 1) {
        pthread_t t;
        start_word[conf.started + 1] = job.word;
        if (pthread_create(&t, &attr, team_main, (void*)(intptr_t)(conf.started + 1))) {
            __atomic_store_n(&conf.failed, 1, __ATOMIC_RELAXED);
            break;
        }
        conf.started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return conf.started >= n - 1;
}

int bn_team_run(bn_team_fn fn, void* arg, int nth) {
    pthread_once(&env_once, read_env);
    /* (threads bound to places by OMP_PROC_BIND: the caller's binding, which the team's threads would take too) */
    if (nth < 2 || nth > BN_OWN_TEAM_MAX || !__atomic_load_n(&conf.enabled, __ATOMIC_RELAXED) ||
        __atomic_load_n(&conf.failed, __ATOMIC_RELAXED) ||
        omp_in_parallel() || omp_get_proc_bind() != omp_proc_bind_false)
        return 0;
    /* (an OpenMP region of the library's that ended less than the spin time ago: its threads spin still) */
    const int64_t spin = __atomic_load_n(&conf.spin_ns, __ATOMIC_RELAXED);
    if (now_ns() - __atomic_load_n(&conf.last_omp_ns, __ATOMIC_RELAXED) < spin) return 0;
    int free_ = 0;
    if (!__atomic_compare_exchange_n(&job.busy, &free_, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) return 0;
    if (!team_start(nth)) {
        __atomic_store_n(&job.busy, 0, __ATOMIC_RELEASE);
        return 0;
    }
    if (__atomic_load_n(&idle.quiet, __ATOMIC_RELAXED)) __atomic_store_n(&idle.quiet, 0, __ATOMIC_RELAXED);
    job.fn = fn;
    job.arg = arg;
    job.ctx = bn_tls_ctx;
    job.csr = get_csr();
    const unsigned word = ((job.word >> BN_TEAM_NTH_BITS) + 1) << BN_TEAM_NTH_BITS | (unsigned)nth;
    __atomic_store_n(&fin.done, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&fin.next, (uint64_t)word << 32 | 1u, __ATOMIC_RELEASE);
    __atomic_store_n(&job.word, word, __ATOMIC_SEQ_CST);
    /* (the threads asleep that the spinning ones leave a share for) */
    const int asleep = __atomic_load_n(&idle.sleeping, __ATOMIC_SEQ_CST);
    const int wake = nth - 1 - __atomic_load_n(&idle.spinning, __ATOMIC_RELAXED), woke = asleep > 0 && wake > 0;
    if (woke) futex_wake(&job.word, wake);
    fn(arg, 0, nth);
    /* (then the shares no team thread has taken yet, which a thread waking up may not have reached, or one spinning
     * in a yield of its core, given BN_TEAM_GRACE_NS to; then a wait for those taken, which run) */
    if (!woke) {
        const int64_t t0 = now_ns();
        for (int k = 1; (int)(__atomic_load_n(&fin.next, __ATOMIC_RELAXED) & 0xffffffffu) < nth; k++)
            if (k % 16 == 0 && now_ns() - t0 > BN_TEAM_GRACE_NS) break;
            else cpu_relax();
    }
    int late = run_shares(word, nth) > 0 && !woke;
    int64_t until = 0; /* (0: the clock not read yet; -1: the spin is over) */
    int64_t yielding = 0;
    for (int k = 1; __atomic_load_n(&fin.done, __ATOMIC_ACQUIRE) < nth - 1; k++) {
        if (until >= 0) {
            cpu_relax();
            if (k % 64 == 0 && (until == 0 ? (until = now_ns() + BN_TEAM_WAIT_NS, 0) : now_ns() > until)) {
                until = -1;
                yielding = now_ns();
                late = 1;
            }
        } else if (now_ns() - yielding < BN_TEAM_YIELD_NS) {
            sched_yield();
        } else {
            const struct timespec nap = {0, BN_TEAM_NAP_NS};
            nanosleep(&nap, NULL);
        }
    }
    /* (a share of a spinning team thread the caller had to take, or a share taken that kept the caller waiting past
     * the spin: a thread without a core, another spinning on it, an OpenMP thread perhaps, the library's or another
     * library's sharing its libgomp. The next calls take OpenMP regions, as after one of the library's, until one
     * comes the spin time after the last) */
    if (late) __atomic_store_n(&conf.last_omp_ns, now_ns(), __ATOMIC_RELAXED);
    __atomic_store_n(&conf.runs, conf.runs + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&job.busy, 0, __ATOMIC_RELEASE);
    return 1;
}

void bn_team_note_omp(void) {
    __atomic_store_n(&conf.last_omp_ns, now_ns(), __ATOMIC_RELAXED);
    if (__atomic_load_n(&idle.spinning, __ATOMIC_RELAXED) && !__atomic_load_n(&idle.quiet, __ATOMIC_RELAXED))
        __atomic_store_n(&idle.quiet, 1, __ATOMIC_RELAXED);
}

void bn_team_configure(int enabled, double spin_us) {
    pthread_once(&env_once, read_env);
    __atomic_store_n(&conf.enabled, enabled != 0, __ATOMIC_RELAXED);
    if (spin_us >= 0.0) __atomic_store_n(&conf.spin_ns, (int64_t)(spin_us < 1e9 ? spin_us * 1000.0 : 1e12), __ATOMIC_RELAXED);
}

int bn_team_enabled(void) {
    pthread_once(&env_once, read_env);
    return __atomic_load_n(&conf.enabled, __ATOMIC_RELAXED);
}
double bn_team_spin_us(void) {
    pthread_once(&env_once, read_env);
    return (double)__atomic_load_n(&conf.spin_ns, __ATOMIC_RELAXED) / 1000.0;
}
int64_t bn_team_runs(void) { return __atomic_load_n(&conf.runs, __ATOMIC_RELAXED); }

#else /* no OpenMP, or not Linux: no team */

int bn_team_run(bn_team_fn fn, void* arg, int nth) {
    (void)fn;
    (void)arg;
    (void)nth;
    return 0;
}
void bn_team_note_omp(void) {}
void bn_team_configure(int enabled, double spin_us) {
    (void)enabled;
    (void)spin_us;
}
int bn_team_enabled(void) { return 0; }
double bn_team_spin_us(void) { return 0.0; }
int64_t bn_team_runs(void) { return 0; }

#endif
