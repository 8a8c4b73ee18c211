/* Thread pool: workers wait on a generation counter (spin briefly, then sleep on a condition variable); the
 * caller runs chunk 0 itself and waits for the others. Chunking depends only on (n, n_threads, grain), and
 * kernels partition outputs, so results never depend on scheduling. */
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "core/error_impl.h"
#include "core/pool_impl.h"

#if defined(__x86_64__) || defined(__i386__)
#    include <immintrin.h>
#    define cpu_relax() _mm_pause()
#else
#    define cpu_relax() ((void)0)
#endif

enum { SPIN_ITERS = 1 << 14 };

struct caprl_pool {
    int32_t   n_threads;
    pthread_t *threads;
    struct worker_arg *args; /* one per thread, alive as long as the pool */

    pthread_mutex_t mu;
    pthread_cond_t  cv;
    atomic_uint     generation; /* bumped per task */
    atomic_int      pending;    /* workers still running the current task */
    atomic_bool     quit;

    /* current task (written by the caller before bumping generation) */
    caprl_range_fn fn;
    void          *ctx;
    int64_t        n;
    int64_t        grain;
};

struct worker_arg;
typedef struct worker_arg {
    caprl_pool *pool;
    int32_t     tid;
} worker_arg;

static void chunk_bounds(int64_t n, int64_t grain, int32_t nt, int32_t tid, int64_t *i0, int64_t *i1) {
    int64_t units = (n + grain - 1) / grain;
    int64_t base = units / nt, rem = units % nt;
    int64_t u0 = tid * base + (tid < rem ? tid : rem);
    int64_t u1 = u0 + base + (tid < rem ? 1 : 0);
    *i0 = u0 * grain < n ? u0 * grain : n;
    *i1 = u1 * grain < n ? u1 * grain : n;
}

static void run_chunk(caprl_pool *p, int32_t tid) {
    int64_t i0, i1;
    chunk_bounds(p->n, p->grain, p->n_threads, tid, &i0, &i1);
    if (i1 > i0) {
        p->fn(p->ctx, i0, i1, tid);
    }
}

static void *worker_main(void *arg) {
    worker_arg *wa = arg;
    caprl_pool *p = wa->pool;
    int32_t     tid = wa->tid;
    unsigned    seen = 0; /* the generation at pool creation; a task may already be posted before we get here */
    for (;;) {
        unsigned gen;
        int      spins = 0;
        while ((gen = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen && spins < SPIN_ITERS) {
            cpu_relax();
            spins++;
        }
        if (gen == seen) {
            pthread_mutex_lock(&p->mu);
            while ((gen = atomic_load(&p->generation)) == seen && !atomic_load(&p->quit)) {
                pthread_cond_wait(&p->cv, &p->mu);
            }
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->quit)) {
            break;
        }
        seen = gen;
        run_chunk(p, tid);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_release);
    }
    return NULL;
}

caprl_status caprl_pool_init(caprl_pool **out, int32_t n_threads, caprl_error *err) {
    if (n_threads <= 0) {
        n_threads = caprl_n_cores();
    }
    if (n_threads > 1024) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "thread count %d is out of range (1..1024)", n_threads);
    }
    caprl_pool *p = caprl_xcalloc(1, sizeof *p);
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    atomic_init(&p->generation, 0);
    atomic_init(&p->pending, 0);
    atomic_init(&p->quit, false);
    if (n_threads > 1) {
        p->threads = caprl_xcalloc((size_t)n_threads, sizeof(pthread_t));
        worker_arg *args = caprl_xcalloc((size_t)n_threads, sizeof *args);
        p->args = args;
        for (int32_t t = 1; t < n_threads; t++) {
            args[t].pool = p;
            args[t].tid = t;
            if (pthread_create(&p->threads[t], NULL, worker_main, &args[t]) != 0) {
                p->n_threads = t; /* join what started */
                caprl_pool_free(p);
                return caprl_err_set(err, CAPRL_ERR_BACKEND, "cannot start thread %d of %d", t, n_threads);
            }
        }
    }
    *out = p;
    return CAPRL_OK;
}

void caprl_pool_free(caprl_pool *p) {
    if (!p) {
        return;
    }
    if (p->threads) {
        pthread_mutex_lock(&p->mu);
        atomic_store(&p->quit, true);
        atomic_fetch_add(&p->generation, 1);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
        for (int32_t t = 1; t < p->n_threads; t++) {
            pthread_join(p->threads[t], NULL);
        }
        free(p->args);
        free(p->threads);
    }
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p);
}

int32_t caprl_pool_n_threads(const caprl_pool *p) {
    return p ? p->n_threads : 1;
}

void caprl_parallel_for_grain(caprl_pool *p, int64_t n, int64_t grain, caprl_range_fn fn, void *ctx) {
    CAPRL_ASSERT(grain >= 1);
    if (n <= 0) {
        return;
    }
    if (!p || p->n_threads == 1 || n <= grain) {
        fn(ctx, 0, n, 0);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->n = n;
    p->grain = grain;
    atomic_store_explicit(&p->pending, p->n_threads - 1, memory_order_relaxed);
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    run_chunk(p, 0);
    while (atomic_load_explicit(&p->pending, memory_order_acquire) > 0) {
        cpu_relax();
    }
}

void caprl_parallel_for(caprl_pool *p, int64_t n, caprl_range_fn fn, void *ctx) {
    caprl_parallel_for_grain(p, n, 1, fn, ctx);
}
