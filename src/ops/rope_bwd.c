/* Rotary backward: the forward (rope.c) multiplies each pair (j, j + D/2) by the rotation R(a); its gradient is
 * R(a)^T = R(-a), applied in place to the gradient rows with the forward's own angles and cos/sin:
 *   dx'[j] = dx[j] * c + dx[j + D/2] * s,   dx'[j + D/2] = dx[j + D/2] * c - dx[j] * s
 * angle = (float)pos[s(j) * M + m] * inv_freq[j], c = cosf(angle), s = sinf(angle), as rope.c. Separate multiplies
 * and adds on both paths (identical values); rows are independent, so the split over rows changes nothing. */
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { ROPE_BWD_CHUNK = 128, ROPE_BWD_GRAIN_ELEMS = 16384, ROPE_BWD_MAX_SECT = 8 };

typedef struct rope_bwd_task {
    float         *x;        /* rows of x_stride floats, (H, D) used */
    const int32_t *pos;      /* (n_sections, M) */
    const float   *inv_freq; /* (D / 2) */
    int64_t        x_stride, M, H, D;
    int64_t        end[ROPE_BWD_MAX_SECT]; /* end[s] = first pair index after section s */
    int32_t        isa;
} rope_bwd_task;

static void unrotate_scalar(float *x1, float *x2, const float *cs, const float *sn, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        float a = x1[j], b = x2[j];
        x1[j] = a * cs[j] + b * sn[j];
        x2[j] = b * cs[j] - a * sn[j];
    }
}

#if CAPRL_X86
static CAPRL_AVX2 void unrotate_avx2(float *x1, float *x2, const float *cs, const float *sn, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 a = _mm256_loadu_ps(x1 + j), b = _mm256_loadu_ps(x2 + j);
        __m256 c = _mm256_loadu_ps(cs + j), s = _mm256_loadu_ps(sn + j);
        _mm256_storeu_ps(x1 + j, _mm256_add_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
        _mm256_storeu_ps(x2 + j, _mm256_sub_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s)));
    }
    unrotate_scalar(x1 + j, x2 + j, cs + j, sn + j, n - j);
}
#endif

static void rope_bwd_rows(void *ctx, int64_t m0, int64_t m1, int32_t tid) {
    (void)tid;
    const rope_bwd_task *t = ctx;
    int64_t              half = t->D / 2;
    float                cs[ROPE_BWD_CHUNK], sn[ROPE_BWD_CHUNK];
    for (int64_t m = m0; m < m1; m++) {
        int32_t s = 0;
        for (int64_t j0 = 0; j0 < half; j0 += ROPE_BWD_CHUNK) {
            int64_t n = half - j0 < ROPE_BWD_CHUNK ? half - j0 : ROPE_BWD_CHUNK;
            for (int64_t j = 0; j < n; j++) {
                while (j0 + j >= t->end[s]) {
                    s++;
                }
                float angle = (float)t->pos[s * t->M + m] * t->inv_freq[j0 + j];
                cs[j] = cosf(angle);
                sn[j] = sinf(angle);
            }
            for (int64_t h = 0; h < t->H; h++) {
                float *x1 = t->x + m * t->x_stride + h * t->D + j0;
#if CAPRL_X86
                if (t->isa >= CAPRL_ISA_AVX2) {
                    unrotate_avx2(x1, x1 + half, cs, sn, n);
                    continue;
                }
#endif
                unrotate_scalar(x1, x1 + half, cs, sn, n);
            }
        }
    }
}

void caprl_op_rope_sect_bwd(caprl_cpu_ctx *c, float *dx, int64_t x_stride, const int32_t *pos,
                            const float *inv_freq, const int32_t *sections, int32_t n_sections, int64_t M, int64_t H,
                            int64_t D) {
    CAPRL_ASSERT(M >= 0 && H > 0 && D > 0 && D % 2 == 0 && x_stride >= H * D);
    CAPRL_ASSERT(n_sections >= 1 && n_sections <= ROPE_BWD_MAX_SECT);
    rope_bwd_task t = {.x = dx, .pos = pos, .inv_freq = inv_freq, .x_stride = x_stride, .M = M, .H = H, .D = D,
                       .isa = c->isa};
    int64_t       acc = 0;
    for (int32_t s = 0; s < n_sections; s++) {
        CAPRL_ASSERT(sections[s] >= 0);
        acc += sections[s];
        t.end[s] = acc;
    }
    CAPRL_ASSERT(acc == D / 2);
    caprl_parallel_for_grain(c->pool, M, ROPE_BWD_GRAIN_ELEMS / (H * D) + 1, rope_bwd_rows, &t);
}
