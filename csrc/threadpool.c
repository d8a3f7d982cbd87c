/*
 * threadpool.c — a small persistent pthread pool for splitting work across output rows.
 *
 * Why persistent and spinning: a decode GEMV at 2560x2560 takes ~50-100 us, so creating
 * threads per call (~20 us each) or a plain condvar wake-up (~5-20 us latency) would eat a
 * large share of it.  Workers spin on a generation counter for a short while after each job
 * (the next GEMV of a decode step usually follows within microseconds) and then sleep on a
 * condition variable, so an idle process does not burn a core.
 *
 * Work is cut into ~8 pieces per thread that the caller and the workers claim from one atomic
 * word; the caller returns when every piece is done, not when every worker has checked in, so
 * on a loaded machine a worker the OS has not scheduled yet simply leaves its share to the
 * caller (measured: with the acknowledge-per-worker design, 2 threads ran 4x slower than 1
 * while another process kept both cores busy; now they run no slower than 1).
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

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t tid[MAX_THREADS];
    int nworkers;           /* started worker threads (the caller is thread 0) */
    int sleepers;           /* workers blocked on cv (guarded by mu) */
    atomic_uint gen;        /* bumped to wake the workers for a new job */
    atomic_int stop;
    unsigned create_gen;    /* gen before the job that created the newest workers */
    /* The current job.  Written by the caller before it publishes `claim`, and valid for as
     * long as the job has unclaimed or running pieces (the caller does not return, and so does
     * not write the next job, before every piece is done). */
    bitlm_task_fn fn;
    void *ctx;
    int64_t n, piece;       /* [0, n) in pieces of `piece` items */
    atomic_int njobs;       /* participants wanted, caller included */
    _Atomic uint64_t claim; /* seq:16 | npieces:24 | next piece:24 — one word, one CAS */
    atomic_llong done;      /* pieces finished in the current job */
    unsigned seq;
} pool_t;

#define CLAIM(seq, np, nx) (((uint64_t)((seq) & 0xFFFF) << 48) | ((uint64_t)(np) << 24) | (uint64_t)(nx))

static pool_t g_pool = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .cv = PTHREAD_COND_INITIALIZER,
};
static pthread_mutex_t g_call_mu = PTHREAD_MUTEX_INITIALIZER; /* one pool user at a time */
static int g_nthreads = 0;                                      /* 0 = not decided yet */
static pthread_once_t g_atfork_once = PTHREAD_ONCE_INIT;

/* Take pieces of the current job until none is left.  Completion is counted per piece, not
 * per thread: the caller returns as soon as every piece is done, so a worker that the OS has
 * not scheduled yet (a loaded 2-core machine, torch's OpenMP threads) costs nothing — the
 * caller simply runs its share.  A worker can only delay a call by the one piece it holds. */
static void claim_and_run(void) {
    for (;;) {
        uint64_t c = atomic_load(&g_pool.claim);
        const uint64_t np = (c >> 24) & 0xFFFFFF, nx = c & 0xFFFFFF;
        if (nx >= np) return;
        if (!atomic_compare_exchange_weak(&g_pool.claim, &c, c + 1)) continue;
        const int64_t b = (int64_t)nx * g_pool.piece;
        const int64_t e = b + g_pool.piece < g_pool.n ? b + g_pool.piece : g_pool.n;
        g_pool.fn(g_pool.ctx, b, e);
        atomic_fetch_add(&g_pool.done, 1);
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
        if (idx < atomic_load(&g_pool.njobs)) claim_and_run();
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
    if (g_nthreads == 0) g_nthreads = default_threads();
    const int n = g_nthreads;
    pthread_mutex_unlock(&g_call_mu);
    return n;
}

BITLM_API int bitlm_set_num_threads(int n) {
    if (n < 1 || n > MAX_THREADS) return BITLM_EINVAL;
    pthread_mutex_lock(&g_call_mu);
    const int prev = g_nthreads == 0 ? default_threads() : g_nthreads;
    if (n != g_nthreads) {
        stop_workers(); /* restarted lazily with the new count */
        g_nthreads = n;
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
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    const int64_t units = (n + grain - 1) / grain;
    if (max_threads < 1) max_threads = 1;
    if (units <= 1 || max_threads == 1 || pthread_mutex_trylock(&g_call_mu) != 0) {
        fn(ctx, 0, n); /* small job, single thread requested, or pool busy: run inline */
        return;
    }
    if (g_nthreads == 0) g_nthreads = default_threads();
    int nt = g_nthreads < max_threads ? g_nthreads : max_threads;
    if ((int64_t)nt > units) nt = (int)units;
    if (nt > 1) nt = 1 + (ensure_workers(nt - 1) < nt - 1 ? g_pool.nworkers : nt - 1);
    if (nt <= 1) {
        pthread_mutex_unlock(&g_call_mu);
        fn(ctx, 0, n);
        return;
    }
    /* ~8 pieces per participant: enough to rebalance (a preempted worker holds at most 1/16
     * of a 2-thread job), few enough to keep each piece a long sequential stream.  4, 8 and 16
     * measured within noise of each other on the shared test machine; 32 was slower. */
#ifndef PIECES_PER_THREAD
#define PIECES_PER_THREAD 8
#endif
    int64_t piece_units = units / ((int64_t)nt * PIECES_PER_THREAD);
    if (piece_units < 1) piece_units = 1;
    const int64_t piece = piece_units * grain;
    const int64_t npieces = (n + piece - 1) / piece; /* <= 8 * nt + 1, far below 2^24 */
    g_pool.fn = fn;
    g_pool.ctx = ctx;
    g_pool.n = n;
    g_pool.piece = piece;
    atomic_store(&g_pool.done, 0);
    atomic_store(&g_pool.njobs, nt);
    g_pool.seq++;
    atomic_store(&g_pool.claim, CLAIM(g_pool.seq, npieces, 0)); /* publishes the job */
    pthread_mutex_lock(&g_pool.mu);
    atomic_fetch_add(&g_pool.gen, 1);
    if (g_pool.sleepers) pthread_cond_broadcast(&g_pool.cv);
    pthread_mutex_unlock(&g_pool.mu);
    claim_and_run();
    for (unsigned s = 0; atomic_load(&g_pool.done) < npieces; s++) {
        if (s < 20000)
            CPU_RELAX();
        else
            sched_yield(); /* the worker holding the last piece was descheduled */
    }
    pthread_mutex_unlock(&g_call_mu);
}
