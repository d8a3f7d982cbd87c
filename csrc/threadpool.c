/*
 * threadpool.c — a small persistent pthread pool for splitting work across output rows.
 *
 * Why persistent and spinning: a decode GEMV at 2560x2560 takes ~50-100 us, so creating
 * threads per call (~20 us each) or a plain condvar wake-up (~5-20 us latency) would eat a
 * large share of it.  Workers spin on a generation counter for a short while after each job
 * (the next GEMV of a decode step usually follows within microseconds) and then sleep on a
 * condition variable, so an idle process does not burn a core.
 *
 * Each participant walks its own contiguous share and steals from the back of the others when
 * done (see work()); the caller returns when every unit is done, not when every worker has
 * checked in, so on a loaded machine a worker the OS has not scheduled yet simply leaves its
 * share to the caller (measured: with an acknowledge-per-worker design, 2 threads ran 4x
 * slower than 1 while another process kept both cores busy).
 *
 * Safety rules: the pool is used by one caller at a time (a second concurrent caller runs its
 * work inline instead of waiting); after fork() the child starts with no workers (its threads
 * do not exist) and re-creates them on first use.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#include "internal.h"

#define MAX_THREADS 256
/* ~0.2-0.5 ms of pause loops: long enough to bridge the Python work between two kernel
 * calls of a decode step, short enough not to steal a core from torch for long. */
#define SPIN_ITERS 4000

/* One participant's share of the current job, in grain units: [front, back), packed in one
 * word so that the owner (taking from the front) and thieves (taking from the back) agree by
 * a single CAS.  Padded to a cache line so that owners do not false-share. */
typedef struct {
    _Atomic uint64_t fb; /* front:32 | back:32 */
    /* after the job: bytes to prefetch (bitlm_parallel_for_then).  Read by the worker after its
     * units, possibly while the caller already writes the next job's: a torn pair only makes a
     * useless prefetch (prefetches never fault), and a new generation stops the loop. */
    _Atomic uintptr_t pf;
    _Atomic uint64_t pf_len;
    char pad[40];
} range_t;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t tid[MAX_THREADS];
    int nworkers;           /* started worker threads (the caller is thread 0) */
    int sleepers;           /* workers blocked on cv (guarded by mu) */
    atomic_uint gen;        /* bumped to wake the workers for a new job */
    atomic_int stop;
    unsigned create_gen;    /* gen before the job that created the newest workers */
    /* The current job.  Written by the caller before it publishes the ranges, and valid for as
     * long as the job has unclaimed or running work (the caller does not return, and so does
     * not write the next job, before every unit is done). */
    bitlm_task_fn fn;
    void *ctx;
    int64_t n, grain;       /* items [0, n), claimed in units of `grain` items */
    atomic_int njobs;       /* participants: ranges 0 .. njobs-1 */
    atomic_llong done;      /* units finished in the current job */
    range_t rng[MAX_THREADS];
} pool_t;

#define FB(f, b) (((uint64_t)(f) << 32) | (uint64_t)(b))

static pool_t g_pool = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .cv = PTHREAD_COND_INITIALIZER,
};
static pthread_mutex_t g_call_mu = PTHREAD_MUTEX_INITIALIZER; /* one pool user at a time */
static int g_nthreads = 0; /* 0 = not decided yet; written under g_call_mu, read by bitlm_pool_threads without it */
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;

/* An owner claims 1/WS_DIV of what is left of its share at a time.  Measured at 2 threads on
 * the 2-core VM (clean phases, GB/s of a ~78 GB/s probe; b1 / i2 2560x2560 GEMV): whole share
 * at once 50-52 / 60-65, 1/2 45 / -, 1/4 44 / 58, 1/8 39 / 60 — every claim costs a call
 * chain and a stream restart, which short decode calls feel.  1/2 keeps most of that and
 * still leaves at most half a share to wait for if the OS deschedules a worker mid-claim. */
#ifndef WS_DIV
#define WS_DIV 2
#endif

int bitlm_prof_on = 0;
double bitlm_prof_wait_s = 0.0, bitlm_prof_jobs = 0.0;

double bitlm_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void run_units(uint32_t u0, uint32_t u1) {
    const int64_t b = (int64_t)u0 * g_pool.grain;
    const int64_t e = (int64_t)u1 * g_pool.grain < g_pool.n ? (int64_t)u1 * g_pool.grain : g_pool.n;
    g_pool.fn(g_pool.ctx, b, e);
    atomic_fetch_add(&g_pool.done, (long long)(u1 - u0));
}

/* Scheduling: each participant owns one contiguous share and walks it from the front, so every
 * thread reads one long sequential stream, far from the others (measured on the 2-core test
 * VM, 2560x6912 i2 GEMV at 2 threads: 16 interleaved pieces 55 GB/s, 2 halves 63 GB/s of a
 * 78 GB/s probe).  A participant that runs dry steals half of what is left at the back of
 * another's share, so a thread the OS has descheduled (a loaded 2-core machine, torch's
 * OpenMP threads spinning) delays a call by at most its current claim, and completion is
 * counted in units, not threads: the caller returns as soon as every unit is done. */
static void work(int self) {
    const int nj = atomic_load(&g_pool.njobs);
    if (self < nj) { /* own share, front first, in claims of 1/WS_DIV of what is left */
        range_t *r = &g_pool.rng[self];
        uint64_t c = atomic_load(&r->fb);
        for (;;) {
            const uint32_t f = (uint32_t)(c >> 32), b = (uint32_t)c;
            if (f >= b) break;
            const uint32_t k = (b - f + WS_DIV - 1) / WS_DIV;
            if (!atomic_compare_exchange_weak(&r->fb, &c, FB(f + k, b))) continue;
            run_units(f, f + k);
            c = atomic_load(&r->fb);
        }
    }
    for (int pass = 0; pass < 2; pass++) { /* steal: half of the rest, from the back */
        for (int j = 1; j <= nj; j++) {
            range_t *r = &g_pool.rng[(self + j) % nj];
            uint64_t c = atomic_load(&r->fb);
            for (;;) {
                const uint32_t f = (uint32_t)(c >> 32), b = (uint32_t)c;
                if (f >= b) break;
                const uint32_t k = (b - f + 1) / 2;
                if (!atomic_compare_exchange_weak(&r->fb, &c, FB(f, b - k))) continue;
                run_units(b - k, b);
                c = atomic_load(&r->fb);
            }
        }
    }
}

/* Pull [pf, pf + pf_len) of this worker's entry towards its L2 until a new job is published. */
static void prefetch_after(int self, unsigned g) {
    const char *p = (const char *)atomic_load_explicit(&g_pool.rng[self].pf, memory_order_relaxed);
    const uint64_t len = atomic_load_explicit(&g_pool.rng[self].pf_len, memory_order_relaxed);
    for (uint64_t off = 0; off < len; off += 64) {
        if ((off & 2047) == 0 && atomic_load_explicit(&g_pool.gen, memory_order_relaxed) != g) return;
        __builtin_prefetch(p + off, 0, 2);
    }
}

static void *worker_main(void *arg) {
    const int idx = (int)(intptr_t)arg;
    /* the generation current when this worker was created: a job published after
     * pthread_create() but before the thread got scheduled must still be seen as new */
    unsigned seen = g_pool.create_gen;
    for (;;) {
        unsigned g = seen;
        for (int s = 0; s < SPIN_ITERS && (g = atomic_load(&g_pool.gen)) == seen; s++) CPU_RELAX();
        if (g == seen) {
            pthread_mutex_lock(&g_pool.mu);
            g_pool.sleepers++;
            while ((g = atomic_load(&g_pool.gen)) == seen && !atomic_load(&g_pool.stop))
                pthread_cond_wait(&g_pool.cv, &g_pool.mu);
            g_pool.sleepers--;
            pthread_mutex_unlock(&g_pool.mu);
        }
        seen = g;
        if (atomic_load(&g_pool.stop)) break;
        work(idx);
        prefetch_after(idx, g);
    }
    return NULL;
}

static void stop_workers(void) {
    if (g_pool.nworkers == 0) return;
    atomic_store(&g_pool.stop, 1);
    pthread_mutex_lock(&g_pool.mu);
    atomic_fetch_add(&g_pool.gen, 1);
    pthread_cond_broadcast(&g_pool.cv);
    pthread_mutex_unlock(&g_pool.mu);
    for (int i = 1; i <= g_pool.nworkers; i++) pthread_join(g_pool.tid[i], NULL);
    g_pool.nworkers = 0;
    atomic_store(&g_pool.stop, 0);
}

/* In the child of a fork the workers do not exist: forget them (never join). */
static void atfork_child(void) {
    pthread_mutex_init(&g_pool.mu, NULL);
    pthread_cond_init(&g_pool.cv, NULL);
    pthread_mutex_init(&g_call_mu, NULL);
    g_pool.nworkers = 0;
    g_pool.sleepers = 0;
    atomic_store(&g_pool.stop, 0);
}

static void register_atfork(void) { pthread_atfork(NULL, NULL, atfork_child); }

static int default_threads(void) {
    const char *env = getenv("BITLM_NUM_THREADS");
    if (env && *env) {
        const int v = atoi(env);
        if (v >= 1) return v > MAX_THREADS ? MAX_THREADS : v;
    }
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        const int c = CPU_COUNT(&set);
        if (c >= 1) return c > MAX_THREADS ? MAX_THREADS : c;
    }
#endif
    const long c = sysconf(_SC_NPROCESSORS_ONLN);
    return c >= 1 ? (c > MAX_THREADS ? MAX_THREADS : (int)c) : 1;
}

BITLM_API int bitlm_num_threads(void) {
    pthread_mutex_lock(&g_call_mu);
    if (g_nthreads == 0) __atomic_store_n(&g_nthreads, default_threads(), __ATOMIC_RELAXED);
    const int n = g_nthreads;
    pthread_mutex_unlock(&g_call_mu);
    return n;
}

int bitlm_pool_threads(void) {
    const int n = __atomic_load_n(&g_nthreads, __ATOMIC_RELAXED);
    return n ? n : default_threads();
}

BITLM_API int bitlm_set_num_threads(int n) {
    if (n < 1 || n > MAX_THREADS) return BITLM_EINVAL;
    pthread_mutex_lock(&g_call_mu);
    const int prev = g_nthreads == 0 ? default_threads() : g_nthreads;
    if (n != g_nthreads) {
        stop_workers(); /* restarted lazily with the new count */
        __atomic_store_n(&g_nthreads, n, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&g_call_mu);
    return prev;
}

static int ensure_workers(int want) {
    pthread_once(&g_atfork_once, register_atfork);
    g_pool.create_gen = atomic_load(&g_pool.gen);
    while (g_pool.nworkers < want) {
        const int i = g_pool.nworkers + 1;
        if (pthread_create(&g_pool.tid[i], NULL, worker_main, (void *)(intptr_t)i) != 0) break;
        g_pool.nworkers = i;
    }
    return g_pool.nworkers;
}

void bitlm_parallel_for(int64_t n, int64_t grain, int max_threads, bitlm_task_fn fn, void *ctx) {
    bitlm_parallel_for_then(n, grain, max_threads, fn, ctx, NULL, NULL);
}

void bitlm_parallel_for_then(int64_t n, int64_t grain, int max_threads, bitlm_task_fn fn, void *ctx,
                             bitlm_plan_fn plan, void *plan_ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    const int64_t units = (n + grain - 1) / grain;
    if (max_threads < 1) max_threads = 1;
    if (units <= 1 || max_threads == 1 || pthread_mutex_trylock(&g_call_mu) != 0) {
        fn(ctx, 0, n); /* small job, single thread requested, or pool busy: run inline */
        return;
    }
    if (g_nthreads == 0) __atomic_store_n(&g_nthreads, default_threads(), __ATOMIC_RELAXED);
    int nt = g_nthreads < max_threads ? g_nthreads : max_threads;
    if ((int64_t)nt > units) nt = (int)units;
    if (nt > 1) nt = 1 + (ensure_workers(nt - 1) < nt - 1 ? g_pool.nworkers : nt - 1);
    if (nt <= 1) {
        pthread_mutex_unlock(&g_call_mu);
        fn(ctx, 0, n);
        return;
    }
    if (units > 0xFFFFFFFFLL) { /* more units than a 32-bit share can hold: coarser grain */
        grain = (n + 0xFFFFFFFELL) / 0xFFFFFFFFLL;
        grain = grain < 1 ? 1 : grain;
    }
    const int64_t nunits = (n + grain - 1) / grain;
    g_pool.fn = fn;
    g_pool.ctx = ctx;
    g_pool.n = n;
    g_pool.grain = grain;
    atomic_store(&g_pool.done, 0);
    atomic_store(&g_pool.njobs, nt);
    for (int i = 0; i <= g_pool.nworkers; i++) {
        const void *p = NULL;
        size_t len = 0;
        if (plan && i > 0 && i < nt) plan(plan_ctx, i, nt, &p, &len);
        atomic_store_explicit(&g_pool.rng[i].pf, (uintptr_t)p, memory_order_relaxed);
        atomic_store_explicit(&g_pool.rng[i].pf_len, (uint64_t)len, memory_order_relaxed);
    }
    for (int i = 0; i < nt; i++) /* equal contiguous shares; publishing them starts the job */
        atomic_store(&g_pool.rng[i].fb, FB(bitlm_share_begin(nunits, i, nt), bitlm_share_begin(nunits, i + 1, nt)));
    pthread_mutex_lock(&g_pool.mu);
    atomic_fetch_add(&g_pool.gen, 1);
    if (g_pool.sleepers) pthread_cond_broadcast(&g_pool.cv);
    pthread_mutex_unlock(&g_pool.mu);
    work(0);
    const int prof = bitlm_prof_on;
    const double tw = prof ? bitlm_now_s() : 0.0;
    for (unsigned s = 0; atomic_load(&g_pool.done) < nunits; s++) {
        if (s < 20000)
            CPU_RELAX();
        else
            sched_yield(); /* a worker holding a claim was descheduled */
    }
    if (prof) {
        bitlm_prof_wait_s += bitlm_now_s() - tw;
        bitlm_prof_jobs += 1.0;
    }
    pthread_mutex_unlock(&g_call_mu);
}

/* ---- per-thread scratch ------------------------------------------------------------------- */

typedef struct {
    int8_t *buf;
    size_t cap;
} scratch_t;

static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *v) {
    scratch_t *s = (scratch_t *)v;
    free(s->buf);
    free(s);
}

static void scratch_key_init(void) { (void)pthread_key_create(&g_scratch_key, scratch_free); }

int8_t *bitlm_thread_scratch(size_t n) {
    pthread_once(&g_scratch_once, scratch_key_init);
    scratch_t *s = (scratch_t *)pthread_getspecific(g_scratch_key);
    if (!s) {
        s = (scratch_t *)calloc(1, sizeof *s);
        if (!s) return NULL;
        if (pthread_setspecific(g_scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (s->cap < n) {
        free(s->buf);
        s->cap = 0;
        s->buf = (int8_t *)aligned_alloc(64, (n + 63) / 64 * 64);
        if (!s->buf) return NULL;
        s->cap = n;
    }
    return s->buf;
}
