/* RMSNorm backward (forward in norm.c: r = 1 / sqrtf(sum(x^2) / C + eps), y = (x * r) * w). With g = dy * w:
 *   dx = (g - x * k) * r,   k = (sum(g * x) / C) * (r * r)
 *   dweight[i] += sum over rows m of dy[m][i] * (x[m][i] * r[m])
 * Three passes, each partitioned so no value depends on the split:
 *   1. rows: r (the forward's own sum-of-squares order, so r is the forward's value) and k, into scratch;
 *   2. columns: dweight, one chain per column over m in order starting from its old value (dy is still intact);
 *   3. rows: dx (may overwrite dy: dweight is done).
 * Row sums use 8 lanes and one tree on AVX2 (sequential on the scalar path), as the forward. */
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { NORM_BWD_GRAIN_ELEMS = 16384 };

typedef struct norm_bwd_task {
    float       *dx;      /* (M, C) */
    float       *dweight; /* (C) */
    const float *dy;      /* (M, C) */
    const float *x;       /* (M, C) */
    const float *w;       /* (C) */
    float       *rk;      /* (M, 2): r, k per row */
    int64_t      M, C;
    float        eps;
} norm_bwd_task;

/* ---- scalar --------------------------------------------------------------------------------------------- */

static void rows_rk_scalar(void *ctx, int64_t m0, int64_t m1, int32_t tid) {
    (void)tid;
    const norm_bwd_task *t = ctx;
    int64_t              C = t->C;
    for (int64_t m = m0; m < m1; m++) {
        const float *x = t->x + m * C, *dy = t->dy + m * C;
        float        ss = 0.0f, gx = 0.0f;
        for (int64_t i = 0; i < C; i++) {
            ss += x[i] * x[i];
            gx += (dy[i] * t->w[i]) * x[i];
        }
        float r = 1.0f / sqrtf(ss / (float)C + t->eps);
        t->rk[2 * m] = r;
        t->rk[2 * m + 1] = (gx / (float)C) * (r * r);
    }
}

static void cols_dw_scalar(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const norm_bwd_task *t = ctx;
    int64_t              C = t->C;
    for (int64_t i = i0; i < i1; i++) {
        float s = t->dweight[i];
        for (int64_t m = 0; m < t->M; m++) {
            s += t->dy[m * C + i] * (t->x[m * C + i] * t->rk[2 * m]);
        }
        t->dweight[i] = s;
    }
}

static void rows_dx_scalar(void *ctx, int64_t m0, int64_t m1, int32_t tid) {
    (void)tid;
    const norm_bwd_task *t = ctx;
    int64_t              C = t->C;
    for (int64_t m = m0; m < m1; m++) {
        const float *x = t->x + m * C, *dy = t->dy + m * C;
        float       *dx = t->dx + m * C;
        float        r = t->rk[2 * m], k = t->rk[2 * m + 1];
        for (int64_t i = 0; i < C; i++) {
            dx[i] = (dy[i] * t->w[i] - x[i] * k) * r;
        }
    }
}

/* ---- AVX2 ----------------------------------------------------------------------------------------------- */

#if CAPRL_X86
static CAPRL_AVX2 void rows_rk_avx2(void *ctx, int64_t m0, int64_t m1, int32_t tid) {
    (void)tid;
    const norm_bwd_task *t = ctx;
    int64_t              C = t->C, c8 = C & ~(int64_t)7;
    __m256i              tail = caprl_mask8_avx2(C - c8);
    for (int64_t m = m0; m < m1; m++) {
        const float *x = t->x + m * C, *dy = t->dy + m * C;
        __m256       ss = _mm256_setzero_ps(), gx = _mm256_setzero_ps();
        for (int64_t i = 0; i < c8; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            ss = _mm256_fmadd_ps(v, v, ss);
            gx = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(dy + i), _mm256_loadu_ps(t->w + i)), v, gx);
        }
        if (c8 < C) {
            __m256 v = _mm256_maskload_ps(x + c8, tail);
            ss = _mm256_fmadd_ps(v, v, ss);
            __m256 g = _mm256_mul_ps(_mm256_maskload_ps(dy + c8, tail), _mm256_maskload_ps(t->w + c8, tail));
            gx = _mm256_fmadd_ps(g, v, gx);
        }
        float r = 1.0f / sqrtf(caprl_hsum8_avx2(ss) / (float)C + t->eps);
        t->rk[2 * m] = r;
        t->rk[2 * m + 1] = (caprl_hsum8_avx2(gx) / (float)C) * (r * r);
    }
}

/* Columns [i0, i1) (multiples of 8 except at C), 32 at a time (whole cache lines of dy and x per row): lane j of
 * accumulator v is column i + 8 v + j's own chain over m. */
static CAPRL_AVX2 void cols_dw_avx2(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const norm_bwd_task *t = ctx;
    int64_t              C = t->C;
    for (int64_t i = i0; i < i1; i += 32) {
        __m256i mask[4];
        __m256  s[4];
        for (int v = 0; v < 4; v++) {
            int64_t left = i1 - i - 8 * v;
            mask[v] = caprl_mask8_avx2(left < 0 ? 0 : left < 8 ? left : 8);
            s[v] = _mm256_maskload_ps(t->dweight + i + 8 * v, mask[v]);
        }
        for (int64_t m = 0; m < t->M; m++) {
            __m256       r = _mm256_set1_ps(t->rk[2 * m]);
            const float *xr = t->x + m * C + i, *dyr = t->dy + m * C + i;
#    pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {
                __m256 xn = _mm256_mul_ps(_mm256_maskload_ps(xr + 8 * v, mask[v]), r);
                s[v] = _mm256_fmadd_ps(_mm256_maskload_ps(dyr + 8 * v, mask[v]), xn, s[v]);
            }
        }
        for (int v = 0; v < 4; v++) {
            _mm256_maskstore_ps(t->dweight + i + 8 * v, mask[v], s[v]);
        }
    }
}

static CAPRL_AVX2 void rows_dx_avx2(void *ctx, int64_t m0, int64_t m1, int32_t tid) {
    (void)tid;
    const norm_bwd_task *t = ctx;
    int64_t              C = t->C;
    for (int64_t m = m0; m < m1; m++) {
        const float *x = t->x + m * C, *dy = t->dy + m * C;
        float       *dx = t->dx + m * C;
        __m256       r = _mm256_set1_ps(t->rk[2 * m]), k = _mm256_set1_ps(t->rk[2 * m + 1]);
        for (int64_t i = 0; i < C; i += 8) {
            __m256i mask = caprl_mask8_avx2(C - i < 8 ? C - i : 8);
            __m256  g = _mm256_mul_ps(_mm256_maskload_ps(dy + i, mask), _mm256_maskload_ps(t->w + i, mask));
            __m256  v = _mm256_sub_ps(g, _mm256_mul_ps(_mm256_maskload_ps(x + i, mask), k));
            _mm256_maskstore_ps(dx + i, mask, _mm256_mul_ps(v, r));
        }
    }
}
#endif

void caprl_op_rmsnorm_bwd(caprl_cpu_ctx *c, float *dx, float *dweight, const float *dy, const float *x,
                          const float *weight, int64_t M, int64_t C, float eps) {
    CAPRL_ASSERT(M >= 0 && C > 0);
    if (M == 0) {
        return;
    }
    size_t bytes = (size_t)(2 * M) * sizeof(float);
    float *rk = caprl_cpu_shared_reserve(c, bytes);
    if (!rk) {
        caprl_abort(__FILE__, __LINE__, "out of memory for rmsnorm backward scratch (%zu bytes)", bytes);
    }
    norm_bwd_task  t = {.dx = dx, .dweight = dweight, .dy = dy, .x = x, .w = weight, .rk = rk, .M = M, .C = C,
                        .eps = eps};
    int64_t        row_grain = NORM_BWD_GRAIN_ELEMS / C + 1;
    caprl_range_fn rk_fn = rows_rk_scalar, dw_fn = cols_dw_scalar, dx_fn = rows_dx_scalar;
#if CAPRL_X86
    if (c->isa >= CAPRL_ISA_AVX2) {
        rk_fn = rows_rk_avx2;
        dw_fn = cols_dw_avx2;
        dx_fn = rows_dx_avx2;
    }
#endif
    caprl_parallel_for_grain(c->pool, M, row_grain, rk_fn, &t);
    /* Column chunks of 16 floats (a cache line) keep threads off each other's lines of dweight. */
    int64_t col_grain = (NORM_BWD_GRAIN_ELEMS / M + 16) / 16 * 16;
    caprl_parallel_for_grain(c->pool, C, col_grain, dw_fn, &t);
    caprl_parallel_for_grain(c->pool, M, row_grain, dx_fn, &t);
}
