/* Embedding backward: dtable row ids[m] += dy row m, for m = 0..M-1 in order. Threads own column ranges of the
 * table (multiples of a cache line) and each walks every m in order, so an element's additions always come in
 * increasing m whatever the thread count, and repeated ids never race. Plain adds on both paths (identical
 * values). */
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { EMBED_BWD_COL_GRAIN = 64 }; /* columns per thread chunk (a multiple of 16 floats) */

typedef struct embed_bwd_task {
    float         *dtable; /* (V, C) */
    const int32_t *ids;    /* (M) */
    const float   *dy;     /* (M, C) */
    int64_t        M, C;
} embed_bwd_task;

static void embed_bwd_cols(void *ctx, int64_t c0, int64_t c1, int32_t tid) {
    (void)tid;
    const embed_bwd_task *t = ctx;
    for (int64_t m = 0; m < t->M; m++) {
        float       *dst = t->dtable + (int64_t)t->ids[m] * t->C;
        const float *src = t->dy + m * t->C;
        for (int64_t i = c0; i < c1; i++) {
            dst[i] += src[i];
        }
    }
}

#if CAPRL_X86
static CAPRL_AVX2 void embed_bwd_cols_avx2(void *ctx, int64_t c0, int64_t c1, int32_t tid) {
    (void)tid;
    const embed_bwd_task *t = ctx;
    for (int64_t m = 0; m < t->M; m++) {
        float       *dst = t->dtable + (int64_t)t->ids[m] * t->C;
        const float *src = t->dy + m * t->C;
        int64_t      i = c0;
        for (; i + 8 <= c1; i += 8) {
            _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(dst + i), _mm256_loadu_ps(src + i)));
        }
        for (; i < c1; i++) {
            dst[i] += src[i];
        }
    }
}
#endif

void caprl_op_embed_bwd(caprl_cpu_ctx *c, float *dtable, const int32_t *ids, const float *dy, int64_t M, int64_t C) {
    CAPRL_ASSERT(M >= 0 && C > 0);
    for (int64_t m = 0; m < M; m++) {
        CAPRL_ASSERT(ids[m] >= 0); /* the upper bound was checked by the forward's caller (no V here) */
    }
    embed_bwd_task t = {.dtable = dtable, .ids = ids, .dy = dy, .M = M, .C = C};
    caprl_range_fn fn = embed_bwd_cols;
#if CAPRL_X86
    if (c->isa >= CAPRL_ISA_AVX2) {
        fn = embed_bwd_cols_avx2;
    }
#endif
    if (M > 0) {
        caprl_parallel_for_grain(c->pool, C, EMBED_BWD_COL_GRAIN, fn, &t);
    }
}
