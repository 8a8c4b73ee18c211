/* RMSNorm forward (HF Qwen2RMSNorm, spec/qwen.md §2.4, in f32): per row, ms = sum(x^2) / C, r = 1 / sqrtf(ms + eps),
 * y = (x * r) * w. Rows are independent and each row's sum of squares has a fixed order (8 lanes + one tree on
 * AVX2, sequential otherwise), so results do not depend on M or on the thread split. out may alias in. */
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { NORM_GRAIN_ELEMS = 16384 };

typedef struct norm_task {
    float       *out;    /* (M, C) */
    const float *in;     /* (M, C) */
    const float *weight; /* (C) */
    int64_t      C;
    float        eps;
} norm_task;

static void norm_row_scalar(float *y, const float *x, const float *w, int64_t C, float eps) {
    float ss = 0.0f;
    for (int64_t i = 0; i < C; i++) {
        ss += x[i] * x[i];
    }
    float r = 1.0f / sqrtf(ss / (float)C + eps);
    for (int64_t i = 0; i < C; i++) {
        y[i] = (x[i] * r) * w[i];
    }
}

static void norm_rows_scalar(void *ctx, int64_t m0, int64_t m1, int32_t tid) {
    (void)tid;
    const norm_task *t = ctx;
    for (int64_t m = m0; m < m1; m++) {
        norm_row_scalar(t->out + m * t->C, t->in + m * t->C, t->weight, t->C, t->eps);
    }
}

#if CAPRL_X86
static CAPRL_AVX2 void norm_rows_avx2(void *ctx, int64_t m0, int64_t m1, int32_t tid) {
    (void)tid;
    const norm_task *t = ctx;
    int64_t          C = t->C, c8 = C & ~(int64_t)7;
    __m256i          tail = caprl_mask8_avx2(C - c8);
    for (int64_t m = m0; m < m1; m++) {
        const float *x = t->in + m * C;
        float       *y = t->out + m * C;
        __m256       acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < c8; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        if (c8 < C) {
            __m256 v = _mm256_maskload_ps(x + c8, tail);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float  r = 1.0f / sqrtf(caprl_hsum8_avx2(acc) / (float)C + t->eps);
        __m256 rv = _mm256_set1_ps(r);
        for (int64_t i = 0; i < c8; i += 8) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), rv);
            _mm256_storeu_ps(y + i, _mm256_mul_ps(v, _mm256_loadu_ps(t->weight + i)));
        }
        if (c8 < C) {
            __m256 v = _mm256_mul_ps(_mm256_maskload_ps(x + c8, tail), rv);
            _mm256_maskstore_ps(y + c8, tail, _mm256_mul_ps(v, _mm256_maskload_ps(t->weight + c8, tail)));
        }
    }
}
#endif

void caprl_op_rmsnorm(caprl_cpu_ctx *c, float *out, const float *in, const float *weight, int64_t M, int64_t C,
                      float eps) {
    CAPRL_ASSERT(M >= 0 && C > 0);
    norm_task      t = {.out = out, .in = in, .weight = weight, .C = C, .eps = eps};
    int64_t        grain = NORM_GRAIN_ELEMS / C + 1;
    caprl_range_fn fn = norm_rows_scalar;
#if CAPRL_X86
    if (c->isa >= CAPRL_ISA_AVX2) {
        fn = norm_rows_avx2;
    }
#endif
    caprl_parallel_for_grain(c->pool, M, grain, fn, &t);
}
