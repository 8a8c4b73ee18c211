/* Rotary forward and backward (rotate_half convention), plain RoPE and the sectioned form, in place on rows of x:
 * row m holds H heads of D floats at x + m * x_stride. Pair (j, j + D/2) belongs to section s(j) (consecutive runs
 * of sections[s] pairs) and turns
 * by angle = (float)pos[s(j) * M + m] * inv_freq[j] (an f32 product), c = cosf(angle), s = sinf(angle):
 *   x'[j] = x[j] * c - x[j + D/2] * s,   x'[j + D/2] = x[j + D/2] * c + x[j] * s
 * with separate multiplies and adds, exactly as rope.c, so one section reproduces rope_fwd bit for bit.
 *
 * Serves the Qwen2.5-VL vision 2-D rotary (spec/qwen.md §3.5: two sections of D/4 pairs, positions (hpos, wpos),
 * frequencies repeated per section) and M-RoPE (§3.10: three sections (t, h, w), global frequency index).
 * Rows are independent and computed in a fixed order; the split over rows never changes a value. */
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { SECT_CHUNK = 128, SECT_GRAIN_ELEMS = 16384, SECT_MAX = 8 };

typedef struct sect_task {
    float         *x;        /* rows of x_stride floats, (H, D) used */
    const int32_t *pos;      /* (n_sections, M) */
    const float   *inv_freq; /* (D / 2) */
    int64_t        x_stride, M, H, D;
    int64_t        end[SECT_MAX]; /* end[s] = first pair index after section s */
    int32_t        n_sections;
    int32_t        isa;
    bool           inverse; /* rotate by -angle: the backward, R(a)^T = R(-a) */
} sect_task;

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

static void sect_rows(void *ctx, int64_t m0, int64_t m1, int32_t tid) {
    (void)tid;
    const sect_task *t = ctx;
    int64_t          half = t->D / 2;
    float            cs[SECT_CHUNK], sn[SECT_CHUNK];
    for (int64_t m = m0; m < m1; m++) {
        int32_t s = 0;
        for (int64_t j0 = 0; j0 < half; j0 += SECT_CHUNK) {
            int64_t n = half - j0 < SECT_CHUNK ? half - j0 : SECT_CHUNK;
            for (int64_t j = 0; j < n; j++) {
                while (j0 + j >= t->end[s]) {
                    s++;
                }
                float angle = (float)t->pos[s * t->M + m] * t->inv_freq[j0 + j];
                cs[j] = cosf(angle);
                sn[j] = t->inverse ? -sinf(angle) : sinf(angle);
            }
            for (int64_t h = 0; h < t->H; h++) {
                float *x1 = t->x + m * t->x_stride + h * t->D + j0;
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

static void rope_sect_run(caprl_cpu_ctx *c, float *x, int64_t x_stride, const int32_t *pos, const float *inv_freq,
                          const int32_t *sections, int32_t n_sections, int64_t M, int64_t H, int64_t D, bool inverse) {
    CAPRL_ASSERT(M >= 0 && H > 0 && D > 0 && D % 2 == 0 && x_stride >= H * D);
    CAPRL_ASSERT(n_sections >= 1 && n_sections <= SECT_MAX);
    sect_task t = {.x = x, .pos = pos, .inv_freq = inv_freq, .x_stride = x_stride, .M = M, .H = H, .D = D,
                   .n_sections = n_sections, .isa = c->isa, .inverse = inverse};
    int64_t   acc = 0;
    for (int32_t s = 0; s < n_sections; s++) {
        CAPRL_ASSERT(sections[s] >= 0);
        acc += sections[s];
        t.end[s] = acc;
    }
    CAPRL_ASSERT(acc == D / 2);
    caprl_parallel_for_grain(c->pool, M, SECT_GRAIN_ELEMS / (H * D) + 1, sect_rows, &t);
}

void caprl_op_rope_sect(caprl_cpu_ctx *c, float *x, int64_t x_stride, const int32_t *pos, const float *inv_freq,
                        const int32_t *sections, int32_t n_sections, int64_t M, int64_t H, int64_t D) {
    rope_sect_run(c, x, x_stride, pos, inv_freq, sections, n_sections, M, H, D, false);
}

/* The backward, in place on the gradient rows: the transpose of each pair's rotation, R(a)^T = R(-a), with the
 * forward's own angles and cos/sin (sin negated exactly, so a * c - b * (-s) is a * c + b * s bit for bit). */
void caprl_op_rope_sect_bwd(caprl_cpu_ctx *c, float *dx, int64_t x_stride, const int32_t *pos,
                            const float *inv_freq, const int32_t *sections, int32_t n_sections, int64_t M, int64_t H,
                            int64_t D) {
    rope_sect_run(c, dx, x_stride, pos, inv_freq, sections, n_sections, M, H, D, true);
}

/* Plain RoPE (spec/qwen.md §2.5): one section covering every pair, positions pos (M). */
void caprl_op_rope(caprl_cpu_ctx *c, float *x, const int32_t *pos, const float *inv_freq, int64_t M, int64_t H,
                   int64_t D) {
    CAPRL_ASSERT(D > 0 && D % 2 == 0 && D / 2 <= INT32_MAX);
    int32_t all_pairs = (int32_t)(D / 2);
    caprl_op_rope_sect(c, x, H * D, pos, inv_freq, &all_pairs, 1, M, H, D);
}
