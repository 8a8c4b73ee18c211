/* RoPE forward, rotate_half ("NeoX") convention (spec/qwen.md §2.5), in place on x (M, H, D):
 * for j < D/2, angle = (float)pos[m] * inv_freq[j] (an f32 product), c = cosf(angle), s = sinf(angle),
 * x'[j] = x[j] * c - x[j + D/2] * s, x'[j + D/2] = x[j + D/2] * c + x[j] * s (separate multiplies and adds, no
 * fusing, so the vector and scalar paths give identical bits). Rows are independent; split over rows. */
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { ROPE_CHUNK = 128, ROPE_GRAIN_ELEMS = 16384 };

typedef struct rope_task {
    float         *x;        /* (M, H, D) */
    const int32_t *pos;      /* (M) */
    const float   *inv_freq; /* (D / 2) */
    int64_t        H, D;
    int32_t        isa;
} rope_task;

static void rotate_scalar(float *x1, float *x2, const float *cs, const float *sn, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        float a = x1[j], b = x2[j];
        x1[j] = a * cs[j] - b * sn[j];
        x2[j] = b * cs[j] + a * sn[j];
    }
}

#if CAPRL_X86
static CAPRL_AVX2 void rotate_avx2(float *x1, float *x2, const float *cs, const float *sn, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 a = _mm256_loadu_ps(x1 + j), b = _mm256_loadu_ps(x2 + j);
        __m256 c = _mm256_loadu_ps(cs + j), s = _mm256_loadu_ps(sn + j);
        _mm256_storeu_ps(x1 + j, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
        _mm256_storeu_ps(x2 + j, _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s)));
    }
    rotate_scalar(x1 + j, x2 + j, cs + j, sn + j, n - j);
}
#endif

static void rope_rows(void *ctx, int64_t m0, int64_t m1, int32_t tid) {
    (void)tid;
    const rope_task *t = ctx;
    int64_t          half = t->D / 2;
    float            cs[ROPE_CHUNK], sn[ROPE_CHUNK];
    for (int64_t m = m0; m < m1; m++) {
        float p = (float)t->pos[m];
        for (int64_t j0 = 0; j0 < half; j0 += ROPE_CHUNK) {
            int64_t n = half - j0 < ROPE_CHUNK ? half - j0 : ROPE_CHUNK;
            for (int64_t j = 0; j < n; j++) {
                float angle = p * t->inv_freq[j0 + j];
                cs[j] = cosf(angle);
                sn[j] = sinf(angle);
            }
            for (int64_t h = 0; h < t->H; h++) {
                float *x1 = t->x + (m * t->H + h) * t->D + j0;
#if CAPRL_X86
                if (t->isa >= CAPRL_ISA_AVX2) {
                    rotate_avx2(x1, x1 + half, cs, sn, n);
                    continue;
                }
#endif
                rotate_scalar(x1, x1 + half, cs, sn, n);
            }
        }
    }
}

void caprl_op_rope(caprl_cpu_ctx *c, float *x, const int32_t *pos, const float *inv_freq, int64_t M, int64_t H,
                   int64_t D) {
    CAPRL_ASSERT(M >= 0 && H > 0 && D > 0 && D % 2 == 0);
    rope_task t = {.x = x, .pos = pos, .inv_freq = inv_freq, .H = H, .D = D, .isa = c->isa};
    caprl_parallel_for_grain(c->pool, M, ROPE_GRAIN_ELEMS / (H * D) + 1, rope_rows, &t);
}
