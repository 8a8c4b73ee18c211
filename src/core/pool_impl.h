/* A fixed-size pthreads pool with one primitive: parallel_for over [0, n) in contiguous chunks, one chunk per
 * thread, barrier at the end. Kernels partition *outputs* so results are bit-identical for any thread count.
 * A pool is driven by one thread at a time (not re-entrant: a task must not call parallel_for on its pool). */
#ifndef CAPRL_POOL_IMPL_H
#define CAPRL_POOL_IMPL_H

#include "caprl/caprl.h"

typedef struct caprl_pool caprl_pool;

/* Work function: handles [i0, i1) on thread tid (0 <= tid < n_threads). */
typedef void (*caprl_range_fn)(void *ctx, int64_t i0, int64_t i1, int32_t tid);

/* n_threads <= 0 means all cores. With 1 thread no thread is started and work runs inline. */
caprl_status caprl_pool_init(caprl_pool **out, int32_t n_threads, caprl_error *err);
void         caprl_pool_free(caprl_pool *p); /* NULL-safe */
int32_t      caprl_pool_n_threads(const caprl_pool *p);

/* Splits [0, n) into n_threads contiguous chunks (the first n % nt chunks one larger) and runs fn on each.
 * Returns after every chunk is done. p may be NULL (runs inline, tid 0). */
void caprl_parallel_for(caprl_pool *p, int64_t n, caprl_range_fn fn, void *ctx);

/* Like caprl_parallel_for but chunk boundaries are multiples of grain (except the end), so kernels that tile
 * by `grain` see the same tiles whatever the thread count. */
void caprl_parallel_for_grain(caprl_pool *p, int64_t n, int64_t grain, caprl_range_fn fn, void *ctx);

#endif /* CAPRL_POOL_IMPL_H */
