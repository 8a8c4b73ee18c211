/* Token log-probabilities from logits and their backward (the fused log-softmax / cross-entropy of training).
 * Row r, s = z * inv_temp (one f32 multiply per element, also in the backward):
 *   mx = max s,  S = sum exp(s - mx),  lse = mx + logf(S),  logp = s[t] - lse,
 *   entropy = logf(S) - (sum exp(s - mx) (s - mx)) / S            (= -sum p log p, both terms >= 0)
 *   backward: z <- c (onehot(t) - exp(s - lse)),  c = dlogp * inv_temp
 *   with an entropy gradient g = dL/dentropy on the row (RL's entropy bonus) it adds, with p = exp(s - lse) and
 *   H = lse - sum p s:  z <- z - g * inv_temp * p (s - lse + H)   (dH/ds = -p (log p + H)); such rows take the
 *   scalar path, with the sum in double
 * exp is caprl's (ops_impl.h). Sums use 8 lanes and one tree on AVX2, one chain on the scalar path; a maximum is
 * exact in any order. Rows are independent and split over threads whole, so no value depends on the split. */
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { LOGPROB_GRAIN_ELEMS = 65536 };

typedef struct logprob_task {
    float         *logp;    /* (R) */
    float         *entropy; /* (R) or NULL */
    float         *lse;     /* (R), forward */
    const float   *lse_in;  /* (R), backward */
    const float   *z;       /* (R, V), forward */
    float         *zg;      /* (R, V), backward: the logits, overwritten by their gradient */
    const int32_t *target;  /* (R) */
    const float   *dlogp;   /* (R), backward only */
    const float   *dent;    /* (R) or NULL, backward only: dL/dentropy */
    int64_t        V;
    float          it;      /* inv_temp */
} logprob_task;

/* ---- scalar --------------------------------------------------------------------------------------------- */

static void fwd_rows_scalar(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    (void)tid;
    const logprob_task *t = ctx;
    int64_t             V = t->V;
    for (int64_t r = r0; r < r1; r++) {
        const float *z = t->z + r * V;
        float        mx = -INFINITY;
        for (int64_t i = 0; i < V; i++) {
            float s = z[i] * t->it;
            mx = s > mx ? s : mx;
        }
        float sum = 0.0f, wsum = 0.0f;
        for (int64_t i = 0; i < V; i++) {
            float d = z[i] * t->it - mx;
            float e = caprl_expf_ref(d);
            sum += e;
            wsum += e * d;
        }
        float ls = logf(sum);
        int32_t tg = t->target[r];
        t->lse[r] = mx + ls;
        t->logp[r] = tg >= 0 ? z[tg] * t->it - t->lse[r] : 0.0f;
        if (t->entropy) {
            t->entropy[r] = tg >= 0 ? ls - wsum / sum : 0.0f;
        }
    }
}

/* One row with an entropy gradient: z <- inv_temp (dlogp (onehot - p) - g p (s - lse + H)). */
static void bwd_row_entropy(const logprob_task *t, int64_t r) {
    int64_t V = t->V;
    float  *z = t->zg + r * V;
    int32_t tg = t->target[r];
    float   lse = t->lse_in[r];
    double  ps = 0.0;
    for (int64_t i = 0; i < V; i++) {
        float s = z[i] * t->it;
        ps += (double)caprl_expf_ref(s - lse) * (double)s;
    }
    double h = (double)lse - ps, g = (double)t->dent[r], c = (double)t->dlogp[r];
    for (int64_t i = 0; i < V; i++) {
        double s = (double)(z[i] * t->it), p = (double)caprl_expf_ref((float)s - lse);
        z[i] = (float)((double)t->it * (c * ((i == tg ? 1.0 : 0.0) - p) - g * p * (s - (double)lse + h)));
    }
}

static bool row_has_entropy(const logprob_task *t, int64_t r) {
    return t->dent && t->dent[r] != 0.0f && t->target[r] >= 0;
}

static void bwd_rows_scalar(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    (void)tid;
    const logprob_task *t = ctx;
    int64_t             V = t->V;
    for (int64_t r = r0; r < r1; r++) {
        float  *z = t->zg + r * V;
        int32_t tg = t->target[r];
        if (row_has_entropy(t, r)) {
            bwd_row_entropy(t, r);
            continue;
        }
        if (tg < 0 || t->dlogp[r] == 0.0f) {
            memset(z, 0, (size_t)V * sizeof(float));
            continue;
        }
        float c = t->dlogp[r] * t->it, lse = t->lse_in[r];
        float pt = caprl_expf_ref(z[tg] * t->it - lse);
        for (int64_t i = 0; i < V; i++) {
            z[i] = -(c * caprl_expf_ref(z[i] * t->it - lse));
        }
        z[tg] = c * (1.0f - pt);
    }
}

/* ---- AVX2 ----------------------------------------------------------------------------------------------- */

#if CAPRL_X86
static CAPRL_AVX2 void fwd_rows_avx2(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    (void)tid;
    const logprob_task *t = ctx;
    int64_t             V = t->V, v8 = V & ~(int64_t)7;
    __m256              it = _mm256_set1_ps(t->it);
    __m256i             tail = caprl_mask8_avx2(V - v8);
    for (int64_t r = r0; r < r1; r++) {
        const float *z = t->z + r * V;
        __m256       mv = _mm256_set1_ps(-INFINITY);
        for (int64_t i = 0; i < v8; i += 8) {
            mv = _mm256_max_ps(mv, _mm256_mul_ps(_mm256_loadu_ps(z + i), it));
        }
        float mt[8];
        _mm256_storeu_ps(mt, mv);
        float mx = -INFINITY;
        for (int i = 0; i < 8; i++) {
            mx = mt[i] > mx ? mt[i] : mx;
        }
        for (int64_t i = v8; i < V; i++) {
            float s = z[i] * t->it;
            mx = s > mx ? s : mx;
        }
        __m256 mxv = _mm256_set1_ps(mx), sum = _mm256_setzero_ps(), wsum = _mm256_setzero_ps();
        for (int64_t i = 0; i < v8; i += 8) {
            __m256 d = _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(z + i), it), mxv);
            __m256 e = caprl_exp8_avx2(d);
            sum = _mm256_add_ps(sum, e);
            wsum = _mm256_add_ps(wsum, _mm256_mul_ps(e, d));
        }
        if (v8 < V) {
            __m256 d = _mm256_sub_ps(_mm256_mul_ps(_mm256_maskload_ps(z + v8, tail), it), mxv);
            __m256 e = _mm256_and_ps(caprl_exp8_avx2(d), _mm256_castsi256_ps(tail));
            sum = _mm256_add_ps(sum, e);
            wsum = _mm256_add_ps(wsum, _mm256_and_ps(_mm256_mul_ps(e, d), _mm256_castsi256_ps(tail)));
        }
        float   s = caprl_hsum8_avx2(sum), ls = logf(s);
        int32_t tg = t->target[r];
        t->lse[r] = mx + ls;
        t->logp[r] = tg >= 0 ? z[tg] * t->it - t->lse[r] : 0.0f;
        if (t->entropy) {
            t->entropy[r] = tg >= 0 ? ls - caprl_hsum8_avx2(wsum) / s : 0.0f;
        }
    }
}

static CAPRL_AVX2 void bwd_rows_avx2(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    (void)tid;
    const logprob_task *t = ctx;
    int64_t             V = t->V;
    __m256              it = _mm256_set1_ps(t->it);
    for (int64_t r = r0; r < r1; r++) {
        float  *z = t->zg + r * V;
        int32_t tg = t->target[r];
        if (row_has_entropy(t, r)) {
            bwd_row_entropy(t, r);
            continue;
        }
        if (tg < 0 || t->dlogp[r] == 0.0f) {
            memset(z, 0, (size_t)V * sizeof(float));
            continue;
        }
        float  c = t->dlogp[r] * t->it, lse = t->lse_in[r];
        float  pt = caprl_expf_ref(z[tg] * t->it - lse);
        __m256 lv = _mm256_set1_ps(lse), nc = _mm256_set1_ps(-c);
        for (int64_t i = 0; i < V; i += 8) {
            __m256i mask = caprl_mask8_avx2(V - i < 8 ? V - i : 8);
            __m256  p = caprl_exp8_avx2(_mm256_sub_ps(_mm256_mul_ps(_mm256_maskload_ps(z + i, mask), it), lv));
            _mm256_maskstore_ps(z + i, mask, _mm256_mul_ps(nc, p));
        }
        z[tg] = c * (1.0f - pt);
    }
}
#endif

void caprl_op_logprob_fwd(caprl_cpu_ctx *c, float *logp, float *entropy, float *lse, const float *z,
                          const int32_t *target, int64_t R, int64_t V, float inv_temp) {
    CAPRL_ASSERT(R >= 0 && V > 0);
    for (int64_t r = 0; r < R; r++) {
        CAPRL_ASSERT(target[r] < V);
    }
    logprob_task   t = {.logp = logp, .entropy = entropy, .lse = lse, .z = z, .target = target,
                        .V = V, .it = inv_temp};
    caprl_range_fn fn = fwd_rows_scalar;
#if CAPRL_X86
    if (c->isa >= CAPRL_ISA_AVX2) {
        fn = fwd_rows_avx2;
    }
#endif
    caprl_parallel_for_grain(c->pool, R, LOGPROB_GRAIN_ELEMS / V + 1, fn, &t);
}

void caprl_op_logprob_bwd(caprl_cpu_ctx *c, float *z, const float *lse, const int32_t *target, const float *dlogp,
                          const float *dentropy, int64_t R, int64_t V, float inv_temp) {
    CAPRL_ASSERT(R >= 0 && V > 0);
    for (int64_t r = 0; r < R; r++) {
        CAPRL_ASSERT(target[r] < V);
    }
    logprob_task   t = {.lse_in = lse, .zg = z, .target = target, .dlogp = dlogp, .dent = dentropy, .V = V,
                        .it = inv_temp};
    caprl_range_fn fn = bwd_rows_scalar;
#if CAPRL_X86
    if (c->isa >= CAPRL_ISA_AVX2) {
        fn = bwd_rows_avx2;
    }
#endif
    caprl_parallel_for_grain(c->pool, R, LOGPROB_GRAIN_ELEMS / V + 1, fn, &t);
}
