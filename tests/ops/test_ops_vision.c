/* Forward ops added for the Qwen2.5-VL vision tower, against float64 references written here, on every ISA level
 * this machine has: gelu_fwd (exact erf form), rope_sect_fwd (sectioned rotary: the vision 2-D layout, the M-RoPE
 * layout, strided rows, one section equal to rope_fwd bit for bit) and attn_seg_fwd (segment attention: lengths
 * around the tile and panel sizes, odd head dims, large logits). Also the determinism contract: bit-identical
 * results for 1, 2 and 3 threads, a segment computed alone equal to the same segment in a batch, the vector path
 * equal to the scalar one where no reduction is involved, and in-place use. Tolerances derive from float32
 * epsilon. */
#include <float.h>

#include "backend/backend.h"
#include "backend/gemm_impl.h"
#include "caprl_test.h"
#include "ops/ops_impl.h"

#define EPS ((double)FLT_EPSILON)

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;

static float frand(void) { /* uniform in [-1, 1) */
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((double)(g_rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static float *fvec(int64_t n, float scale) {
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        p[i] = frand() * scale;
    }
    return p;
}

static bool bits_equal(const float *a, const float *b, int64_t n) {
    return memcmp(a, b, (size_t)n * sizeof(float)) == 0;
}

enum { N_ISA = 3, N_THR = 3 };
static caprl_backend *g_be[N_ISA][N_THR];
static bool           g_have[N_ISA];

static void make_backends(void) {
    caprl_error err = {0};
    for (int32_t isa = 0; isa < N_ISA; isa++) {
        for (int32_t t = 0; t < N_THR; t++) {
            CHECK_OK(caprl_backend_cpu_init_isa(&g_be[isa][t], t + 1, isa, false, &err), &err);
        }
        g_have[isa] = caprl_backend_cpu_isa(g_be[isa][0]) == isa;
    }
}

static void free_backends(void) {
    for (int32_t isa = 0; isa < N_ISA; isa++) {
        for (int32_t t = 0; t < N_THR; t++) {
            caprl_backend_free(g_be[isa][t]);
        }
    }
}

/* ---- gelu -------------------------------------------------------------------------------------------------- */

static void test_gelu(void) {
    int64_t n = 70001; /* several threads' worth, odd */
    float  *x = fvec(n, 6.0f), *y = malloc((size_t)n * sizeof(float)), *y2 = malloc((size_t)n * sizeof(float));
    static const float special[] = {0.0f, -0.0f, 1.0f, -1.0f, 10.0f, -10.0f, -30.0f, 1e-30f, 3e38f, -3e38f};
    memcpy(x, special, sizeof special);
    x[n - 1] = NAN;
    x[n - 2] = INFINITY;
    x[n - 3] = -INFINITY;
    for (int32_t isa = 0; isa < N_ISA; isa++) {
        if (!g_have[isa]) {
            continue;
        }
        g_be[isa][0]->ops->gelu_fwd(g_be[isa][0], y, x, n);
        int bad = 0;
        for (int64_t i = 0; i < n - 3; i++) {
            double xi = x[i], want = 0.5 * xi * (1.0 + erf(xi / sqrt(2.0)));
            /* erff ~1 ulp, three roundings; for x < 0 the 1 + erf cancellation costs |x| eps absolute at most */
            double tol = 6 * EPS * fabs(want) + 2 * EPS * fabs(xi) * (xi < 0 ? 1.0 : 0.0) + 1e-44;
            if (!(fabs(y[i] - want) <= tol) && bad++ < 3) {
                fprintf(stderr, "gelu(%.9g) = %.9g, want %.9g\n", x[i], y[i], want);
            }
        }
        CHECK_MSG(bad == 0, "gelu isa %d: %d wrong", (int)isa, bad);
        CHECK(y[0] == 0.0f && y[4] == 10.0f && y[6] == 0.0f);
        CHECK(isnan(y[n - 1]) && y[n - 2] == INFINITY);
        for (int t = 1; t < N_THR; t++) {
            g_be[isa][t]->ops->gelu_fwd(g_be[isa][t], y2, x, n);
            CHECK(bits_equal(y, y2, n));
        }
        memcpy(y2, x, (size_t)n * sizeof(float)); /* in place */
        g_be[isa][1]->ops->gelu_fwd(g_be[isa][1], y2, y2, n);
        CHECK(bits_equal(y, y2, n));
        if (isa > 0) {
            g_be[0][0]->ops->gelu_fwd(g_be[0][0], y2, x, n);
            CHECK(bits_equal(y, y2, n));
        }
    }
    free(x);
    free(y);
    free(y2);
}

/* ---- sectioned rotary -------------------------------------------------------------------------------------- */

typedef struct sect_case {
    int64_t        M, H, D, stride;
    int32_t        n_sec;
    const int32_t *sections;
    float          theta;
    bool           restart; /* frequencies restart per section (the vision table) */
} sect_case;

static int check_sect(const sect_case *c, const float *x, const float *y, const int32_t *pos, const float *inv) {
    int     bad = 0;
    int64_t half = c->D / 2;
    for (int64_t m = 0; m < c->M; m++) {
        for (int64_t h = 0; h < c->H; h++) {
            const float *xr = x + m * c->stride + h * c->D;
            const float *yr = y + m * c->stride + h * c->D;
            int32_t      s = 0, end = c->sections[0];
            for (int64_t j = 0; j < half; j++) {
                while (j >= end) {
                    end += c->sections[++s];
                }
                float  angle = (float)pos[s * c->M + m] * inv[j]; /* the f32 angle rule */
                double cs = cos((double)angle), sn = sin((double)angle);
                double a = xr[j], b = xr[j + half];
                double tol = 4 * EPS * (fabs(a) + fabs(b)) + 1e-30;
                bad += !(fabs(yr[j] - (a * cs - b * sn)) <= tol);
                bad += !(fabs(yr[j + half] - (b * cs + a * sn)) <= tol);
            }
        }
        /* the gap between the heads and the next row is left alone */
        for (int64_t g = c->H * c->D; g < c->stride; g++) {
            bad += y[m * c->stride + g] != x[m * c->stride + g];
        }
    }
    return bad;
}

static void run_sect_case(const sect_case *c) {
    int64_t  half = c->D / 2, n = c->M * c->stride;
    float   *inv = malloc((size_t)half * sizeof(float));
    int32_t *pos = malloc((size_t)(c->n_sec * c->M + 1) * sizeof(int32_t));
    int64_t  j = 0;
    for (int32_t s = 0; s < c->n_sec; s++) {
        for (int32_t i = 0; i < c->sections[s]; i++, j++) {
            int64_t fi = c->restart ? i : j, dim = c->restart ? 2 * c->sections[s] : c->D;
            inv[j] = 1.0f / powf(c->theta, (float)(2 * fi) / (float)dim);
        }
    }
    for (int64_t i = 0; i < c->n_sec * c->M; i++) {
        pos[i] = (int32_t)((frand() + 1.0f) * 2000.0f);
    }
    pos[0] = 0; /* the zero angle (one spare entry when M = 0) */
    float *x = fvec(n, 1.0f), *y = malloc((size_t)n * sizeof(float)), *y2 = malloc((size_t)n * sizeof(float));
    for (int32_t isa = 0; isa < N_ISA; isa++) {
        if (!g_have[isa]) {
            continue;
        }
        memcpy(y, x, (size_t)n * sizeof(float));
        g_be[isa][0]->ops->rope_sect_fwd(g_be[isa][0], y, c->stride, pos, inv, c->sections, c->n_sec, c->M, c->H,
                                         c->D);
        int bad = check_sect(c, x, y, pos, inv);
        CHECK_MSG(bad == 0, "rope_sect isa %d M=%lld H=%lld D=%lld stride=%lld sections=%d: %d wrong", (int)isa,
                  (long long)c->M, (long long)c->H, (long long)c->D, (long long)c->stride, (int)c->n_sec, bad);
        for (int t = 1; t < N_THR; t++) {
            memcpy(y2, x, (size_t)n * sizeof(float));
            g_be[isa][t]->ops->rope_sect_fwd(g_be[isa][t], y2, c->stride, pos, inv, c->sections, c->n_sec, c->M,
                                             c->H, c->D);
            CHECK(bits_equal(y, y2, n));
        }
        if (isa > 0) { /* no fused operations: every ISA level gives the scalar bits */
            memcpy(y2, x, (size_t)n * sizeof(float));
            g_be[0][0]->ops->rope_sect_fwd(g_be[0][0], y2, c->stride, pos, inv, c->sections, c->n_sec, c->M, c->H,
                                           c->D);
            CHECK(bits_equal(y, y2, n));
        }
    }
    free(inv);
    free(pos);
    free(x);
    free(y);
    free(y2);
}

static void test_rope_sect(void) {
    static const int32_t vis80[] = {20, 20}, vis16[] = {4, 4}, vis8[] = {2, 2}, mrope[] = {16, 24, 24};
    static const int32_t odd[] = {1, 0, 5, 3}, one12[] = {6};
    const sect_case      cases[] = {
        /* vision: head_dim 80 (the 3B tower), q and k rotated inside a fused qkv row (stride 3 C, 2 H heads) */
        {.M = 37, .H = 2 * 16, .D = 80, .stride = 3 * 16 * 80, .n_sec = 2, .sections = vis80, .theta = 1e4f,
              .restart = true},
        {.M = 300, .H = 4, .D = 16, .stride = 3 * 2 * 16, .n_sec = 2, .sections = vis16, .theta = 1e4f, .restart = true},
        {.M = 5, .H = 1, .D = 8, .stride = 8, .n_sec = 2, .sections = vis8, .theta = 1e4f, .restart = true},
        /* M-RoPE: head_dim 128, sections (t, h, w) = (16, 24, 24), global frequency index */
        {.M = 23, .H = 3, .D = 128, .stride = 3 * 128, .n_sec = 3, .sections = mrope, .theta = 1e6f},
        /* an empty section and uneven ones */
        {.M = 9, .H = 2, .D = 18, .stride = 40, .n_sec = 4, .sections = odd, .theta = 1e4f},
        {.M = 0, .H = 2, .D = 12, .stride = 24, .n_sec = 1, .sections = one12, .theta = 1e4f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        run_sect_case(&cases[i]);
    }
}

/* With a single section and contiguous rows, rope_sect_fwd is rope_fwd. */
static void test_rope_sect_equals_rope(void) {
    int64_t  M = 29, H = 3, D = 64, n = M * H * D;
    int32_t  sec[1] = {(int32_t)(D / 2)};
    float   *inv = malloc((size_t)(D / 2) * sizeof(float));
    int32_t *pos = malloc((size_t)M * sizeof(int32_t));
    for (int64_t j = 0; j < D / 2; j++) {
        inv[j] = 1.0f / powf(1e6f, (float)(2 * j) / (float)D);
    }
    for (int64_t m = 0; m < M; m++) {
        pos[m] = (int32_t)(m * 977 % 30011);
    }
    float *x = fvec(n, 1.0f), *a = malloc((size_t)n * sizeof(float)), *b = malloc((size_t)n * sizeof(float));
    for (int32_t isa = 0; isa < N_ISA; isa++) {
        if (!g_have[isa]) {
            continue;
        }
        memcpy(a, x, (size_t)n * sizeof(float));
        memcpy(b, x, (size_t)n * sizeof(float));
        g_be[isa][1]->ops->rope_fwd(g_be[isa][1], a, pos, inv, M, H, D);
        g_be[isa][1]->ops->rope_sect_fwd(g_be[isa][1], b, H * D, pos, inv, sec, 1, M, H, D);
        CHECK_MSG(bits_equal(a, b, n), "rope_sect with one section differs from rope (isa %d)", (int)isa);
    }
    free(inv);
    free(pos);
    free(x);
    free(a);
    free(b);
}

/* ---- segment attention ------------------------------------------------------------------------------------- */

static double bf16_value(double x) {
    return caprl_bf16_to_f32(caprl_f32_to_bf16((float)x));
}

/* out (H, N, D) against float64, with attn_fwd's error model: score errors (D + 2) eps sum|q k| scale perturb each
 * p_i relatively by twice that (plus exp's few ulp), and the sums add L roundings.
 * bf16 (the matrix-unit form): q, k and v enter as bf16 values, and each numerator p_i as its bf16 rounding. The
 * kernel rounds its f32 numerator, which is within rel = 2 (score error) + 8 eps + its exponential's error of p_i:
 * where that interval holds a rounding boundary either neighbour is right, so the reference takes their midpoint
 * and the tolerance half their gap times |v|. Everywhere else the rounded numerator is exact, so the check stays
 * near float32 precision. */
static int check_attn_seg(const float *out, const float *q, const float *k, const float *v, const int64_t *seg,
                          int64_t n_seg, int64_t N, int64_t H, int64_t D, float scale, bool bf16) {
    int     bad = 0;
    double *p = malloc((size_t)(N + 1) * sizeof(double)), *pr = malloc((size_t)(N + 1) * sizeof(double));
    double *spread = malloc((size_t)(N + 1) * sizeof(double));
    for (int64_t h = 0; h < H; h++) {
        for (int64_t s = 0; s < n_seg; s++) {
            int64_t a = seg[s], L = seg[s + 1] - a;
            for (int64_t m = a; m < seg[s + 1]; m++) {
                const float *qv = q + (h * N + m) * D;
                double       mx = -INFINITY, sum = 0, ds_max = 0, vmax = 0;
                for (int64_t i = 0; i < L; i++) {
                    const float *kr = k + (h * N + a + i) * D;
                    double       d0 = 0, sa = 0;
                    for (int64_t d = 0; d < D; d++) {
                        double qd = bf16 ? bf16_value(qv[d]) : qv[d], kd = bf16 ? bf16_value(kr[d]) : kr[d];
                        d0 += qd * kd;
                        sa += fabs(qd * kd);
                    }
                    p[i] = d0 * scale;
                    mx = fmax(mx, p[i]);
                    ds_max = fmax(ds_max, ((double)D + 2) * EPS * sa * scale);
                    for (int64_t d = 0; d < D; d++) {
                        vmax = fmax(vmax, fabs(v[(h * N + a + i) * D + d]));
                    }
                }
                /* the bf16 path's exponential is a degree-6 polynomial, within 3e-7 (attn_seg.c) */
                double exp_rel = bf16 ? 3e-7 : 0.0, rel = 2 * ds_max + 8 * EPS + exp_rel;
                for (int64_t i = 0; i < L; i++) {
                    p[i] = exp(p[i] - mx);
                    sum += p[i];
                    double lo = bf16 ? bf16_value(p[i] * (1 - rel)) : p[i];
                    double hi = bf16 ? bf16_value(p[i] * (1 + rel)) : p[i];
                    pr[i] = (lo + hi) / 2;
                    spread[i] = (hi - lo) / 2;
                }
                double tol = (4 * ds_max + 8 * EPS + 2 * exp_rel + ((double)L + 4) * EPS) * vmax + 1e-30;
                for (int64_t d = 0; d < D; d++) {
                    double want = 0, tol_d = tol;
                    for (int64_t i = 0; i < L; i++) {
                        double vd = v[(h * N + a + i) * D + d];
                        vd = bf16 ? bf16_value(vd) : vd;
                        want += pr[i] * vd;
                        tol_d += spread[i] * fabs(vd) / sum;
                    }
                    want /= sum;
                    double got = out[(h * N + m) * D + d];
                    if (!(fabs(got - want) <= tol_d) && bad++ < 3) {
                        fprintf(stderr, "attn_seg%s h=%lld m=%lld d=%lld: %.9g want %.9g tol %.3g\n",
                                bf16 ? " (bf16)" : "", (long long)h, (long long)m, (long long)d, got, want, tol_d);
                    }
                }
            }
        }
    }
    free(p), free(pr), free(spread);
    return bad;
}

/* seg (n_seg + 1) = the running sums of lens; returns the rows in all. */
static int64_t segment_bounds(int64_t *seg, const int64_t *lens, int64_t n_seg) {
    seg[0] = 0;
    for (int64_t s = 0; s < n_seg; s++) {
        seg[s + 1] = seg[s] + lens[s];
    }
    return seg[n_seg];
}

/* Whether rows [a, a + L) of every head, attended to as one segment on their own, give the bits of o (the batch). */
static bool segment_alone_matches(caprl_backend *be, const float *o, const float *q, const float *k, const float *v,
                                  int64_t a, int64_t L, int64_t N, int64_t H, int64_t D, float scale, bool bf16) {
    int64_t one[2] = {0, L};
    float  *qa = malloc((size_t)(H * L * D) * sizeof(float)), *ka = malloc((size_t)(H * L * D) * sizeof(float));
    float  *va = malloc((size_t)(H * L * D) * sizeof(float)), *oa = malloc((size_t)(H * L * D) * sizeof(float));
    for (int64_t h = 0; h < H; h++) {
        memcpy(qa + h * L * D, q + (h * N + a) * D, (size_t)(L * D) * sizeof(float));
        memcpy(ka + h * L * D, k + (h * N + a) * D, (size_t)(L * D) * sizeof(float));
        memcpy(va + h * L * D, v + (h * N + a) * D, (size_t)(L * D) * sizeof(float));
    }
    be->ops->attn_seg_fwd(be, oa, qa, ka, va, one, 1, L, H, D, scale, bf16);
    bool same = true;
    for (int64_t h = 0; h < H; h++) {
        same = same && bits_equal(oa + h * L * D, o + (h * N + a) * D, L * D);
    }
    free(qa), free(ka), free(va), free(oa);
    return same;
}

static void test_attn_seg(void) {
    /* segment lengths around the tile (8) and panel (64) sizes, an empty segment, and one long segment */
    static const int64_t lens[] = {1, 7, 8, 9, 0, 63, 64, 65, 16, 130, 3, 31, 32, 33};
    static const int64_t ds[] = {80, 16, 12, 5, 33, 24};
    const int64_t        n_seg = (int64_t)(sizeof lens / sizeof lens[0]), H = 3;
    int64_t              seg[sizeof lens / sizeof lens[0] + 1];
    int64_t N = segment_bounds(seg, lens, n_seg);
    for (size_t di = 0; di < sizeof ds / sizeof ds[0]; di++) {
        int64_t D = ds[di], n = H * N * D;
        float   scale = (float)(1.0 / sqrt((double)D));
        /* large logits in one case, so the max subtraction matters */
        float *q = fvec(n, di == 1 ? 12.0f : 1.0f), *k = fvec(n, di == 1 ? 12.0f : 1.0f), *v = fvec(n, 1.0f);
        float *o = malloc((size_t)n * sizeof(float)), *o2 = malloc((size_t)n * sizeof(float));
        for (int32_t isa = 0; isa < N_ISA; isa++) {
            if (!g_have[isa]) {
                continue;
            }
            g_be[isa][0]->ops->attn_seg_fwd(g_be[isa][0], o, q, k, v, seg, n_seg, N, H, D, scale, false);
            int bad = check_attn_seg(o, q, k, v, seg, n_seg, N, H, D, scale, false);
            CHECK_MSG(bad == 0, "attn_seg isa %d D=%lld: %d wrong", (int)isa, (long long)D, bad);
            for (int t = 1; t < N_THR; t++) {
                g_be[isa][t]->ops->attn_seg_fwd(g_be[isa][t], o2, q, k, v, seg, n_seg, N, H, D, scale, false);
                CHECK_MSG(bits_equal(o, o2, n), "attn_seg isa %d D=%lld: %d threads differ", (int)isa, (long long)D,
                          t + 1);
            }
            /* segment 9 (130 rows) alone: the same bits as inside the batch */
            CHECK_MSG(segment_alone_matches(g_be[isa][1], o, q, k, v, seg[9], lens[9], N, H, D, scale, false),
                      "attn_seg isa %d D=%lld: a segment alone differs from the batch", (int)isa, (long long)D);
            /* the AVX-512 tile does the AVX2 tile's arithmetic on wider vectors: the same bits */
            if (isa == CAPRL_ISA_AVX512 && g_have[CAPRL_ISA_AVX2]) {
                g_be[CAPRL_ISA_AVX2][0]->ops->attn_seg_fwd(g_be[CAPRL_ISA_AVX2][0], o2, q, k, v, seg, n_seg, N, H, D,
                                                           scale, false);
                CHECK_MSG(bits_equal(o, o2, n), "attn_seg D=%lld: AVX-512 differs from AVX2", (long long)D);
            }
        }
        free(q), free(k), free(v), free(o), free(o2);
    }
    /* no rows at all */
    int64_t z[2] = {0, 0};
    g_be[0][1]->ops->attn_seg_fwd(g_be[0][1], NULL, NULL, NULL, NULL, z, 1, 0, 2, 8, 1.0f, false);
}

/* The bf16 form (a bf16 model's tower) on the machine's bf16 matrix unit: against float64 from the bf16 operands,
 * 1 vs 2 vs 3 threads bit for bit, a segment alone equal to the batch. Segments around the 32-query tiles and the
 * 32-key padding, head dims around the 32-wide reduction tiles. Without a unit the flag must change nothing. */
static void test_attn_seg_bf16(void) {
    static const int64_t lens[] = {33, 1, 64, 0, 31, 130, 32, 7, 97};
    static const int64_t ds[] = {80, 16, 64, 5, 33, 130};
    const int64_t        n_seg = (int64_t)(sizeof lens / sizeof lens[0]), H = 2;
    int64_t              seg[sizeof lens / sizeof lens[0] + 1];
    int64_t        N = segment_bounds(seg, lens, n_seg);
    caprl_backend *be[N_THR];
    caprl_error    err = {0};
    for (int32_t t = 0; t < N_THR; t++) {
        CHECK_OK(caprl_backend_cpu_init_isa(&be[t], t + 1, CAPRL_ISA_AVX512, true, &err), &err);
    }
    bool unit = caprl_backend_cpu_bf16_inputs(be[0]);
    for (size_t di = 0; di < sizeof ds / sizeof ds[0]; di++) {
        int64_t D = ds[di], n = H * N * D;
        float   scale = (float)(1.0 / sqrt((double)D));
        float  *q = fvec(n, di == 1 ? 12.0f : 1.0f), *k = fvec(n, di == 1 ? 12.0f : 1.0f), *v = fvec(n, 1.0f);
        float  *o = malloc((size_t)n * sizeof(float)), *o2 = malloc((size_t)n * sizeof(float));
        be[0]->ops->attn_seg_fwd(be[0], o, q, k, v, seg, n_seg, N, H, D, scale, true);
        if (!unit) {
            be[0]->ops->attn_seg_fwd(be[0], o2, q, k, v, seg, n_seg, N, H, D, scale, false);
            CHECK_MSG(bits_equal(o, o2, n), "attn_seg bf16 D=%lld: without a bf16 unit the f32 bits change",
                      (long long)D);
            free(q), free(k), free(v), free(o), free(o2);
            continue;
        }
        int bad = check_attn_seg(o, q, k, v, seg, n_seg, N, H, D, scale, true);
        CHECK_MSG(bad == 0, "attn_seg bf16 D=%lld: %d wrong", (long long)D, bad);
        for (int t = 1; t < N_THR; t++) {
            be[t]->ops->attn_seg_fwd(be[t], o2, q, k, v, seg, n_seg, N, H, D, scale, true);
            CHECK_MSG(bits_equal(o, o2, n), "attn_seg bf16 D=%lld: %d threads differ", (long long)D, t + 1);
        }
        CHECK_MSG(segment_alone_matches(be[1], o, q, k, v, seg[5], lens[5], N, H, D, scale, true),
                  "attn_seg bf16 D=%lld: the 130-row segment alone differs from the batch", (long long)D);
        free(q), free(k), free(v), free(o), free(o2);
    }
    for (int32_t t = 0; t < N_THR; t++) {
        caprl_backend_free(be[t]);
    }
}

int main(void) {
    make_backends();
    test_gelu();
    test_rope_sect();
    test_rope_sect_equals_rope();
    test_attn_seg();
    test_attn_seg_bf16();
    free_backends();
    return test_finish("test_ops_vision");
}
