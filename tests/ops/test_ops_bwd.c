/* Training ops of the CPU backend (the backward passes and the training-only forwards) on every ISA level this
 * machine has (scalar, AVX2, AVX-512):
 * - every backward against central finite differences of a float64 forward written here, on small odd shapes
 *   (M = 7, C = 13, D = 6, V = 37, GQA Hq = 4 / Hkv = 2, segments of uneven lengths including 1, causal and not);
 * - the larger shapes that reach the kernels' blocking (reduction chunks, job blocks, key panels, query chunks)
 *   against float64 formulas (the attention formula itself first checked against finite differences);
 * - attn_train_fwd against a float64 attention and against attn_fwd; logprob_fwd / _bwd with inv_temp != 1, rows
 *   without a target, entropy; bf16 weights in matmul_bwd_data against their exact f32 widening;
 * - determinism: 1, 2 and 3 threads bit-identical; a dx row or an attention segment computed alone bit-identical
 *   to the same in a batch; where documented, ISA levels bit-identical.
 * Tolerances: k * FLT_EPSILON * (|ref| + scale), k from the reduction length, scale the tensor's largest value (or
 * the sum of |terms| where it is cheap); the float64 finite differences are far more accurate than that. */
#include <float.h>

#include "amx_util.h"
#include "backend/backend.h"
#include "backend/gemm_impl.h"
#include "caprl/tensor.h"
#include "caprl_test.h"
#include "ops/ops_impl.h"

#define EPS ((double)FLT_EPSILON)

/* ---- helpers --------------------------------------------------------------------------------------------- */

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;

static float frand(void) { /* uniform in [-1, 1) */
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((double)(g_rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static int irand(int n) {
    return (int)((frand() + 1.0f) * 0.5f * (float)n) % n;
}

static float *fvec(int64_t n, float amp) {
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        p[i] = amp * frand();
    }
    return p;
}

static float *fcopy(const float *src, int64_t n) {
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    memcpy(p, src, (size_t)n * sizeof(float));
    return p;
}

static double *dvec(const float *src, int64_t n) { /* exact widening */
    double *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        p[i] = src[i];
    }
    return p;
}

static double *dzeros(int64_t n) {
    return calloc((size_t)(n > 0 ? n : 1), sizeof(double));
}

static bool bits_equal(const float *a, const float *b, int64_t n) {
    return memcmp(a, b, (size_t)n * sizeof(float)) == 0;
}

static const char *isa_name(int32_t isa) {
    return isa == CAPRL_ISA_AVX512 ? "avx512" : isa == CAPRL_ISA_AVX2 ? "avx2" : "scalar";
}

/* got vs ref elementwise: |got - ref| <= k EPS (|ref| + scale), scale = max |ref| (plus extra_scale). Returns the
 * failures (the first three printed). */
static int cmp_scaled(const char *what, const float *got, const double *ref, int64_t n, double k, double extra_scale) {
    double scale = extra_scale;
    for (int64_t i = 0; i < n; i++) {
        scale = fabs(ref[i]) > scale ? fabs(ref[i]) : scale;
    }
    int    bad = 0;
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - ref[i]), tol = k * EPS * (fabs(ref[i]) + scale) + 1e-300;
        worst = err / tol > worst ? err / tol : worst;
        if (!(err <= tol)) {
            if (bad++ < 3) {
                fprintf(stderr, "%s: [%lld] = %.9g, want %.9g (tol %.3g)\n", what, (long long)i, (double)got[i], ref[i],
                        tol);
            }
        }
    }
    CHECK_MSG(bad == 0, "%s: %d of %lld wrong (worst err/tol %.3g)", what, bad, (long long)n, worst);
    return bad;
}

/* Central differences of a float64 loss: g[i] = (f(x + h e_i) - f(x - h e_i)) / (2 h). */
typedef double (*loss_fn)(const void *ctx);

static void fd_grad(double *x, int64_t n, loss_fn f, const void *ctx, double *g) {
    for (int64_t i = 0; i < n; i++) {
        double xi = x[i], h = 1e-5 * (1.0 + fabs(xi));
        x[i] = xi + h;
        double fp = f(ctx);
        x[i] = xi - h;
        double fm = f(ctx);
        x[i] = xi;
        g[i] = (fp - fm) / (2.0 * h);
    }
}

/* One backend per (ISA level, thread count); levels the machine lacks collapse into the one below and are
 * skipped. AMX off (test_matmul_bwd_bf16_unit makes its own backends). */
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
        if (g_have[isa]) {
            fprintf(stderr, "testing ISA level %s\n", isa_name(isa));
        }
    }
}

static void free_backends(void) {
    for (int32_t isa = 0; isa < N_ISA; isa++) {
        for (int32_t t = 0; t < N_THR; t++) {
            caprl_backend_free(g_be[isa][t]);
        }
    }
}

/* ---- matmul ---------------------------------------------------------------------------------------------- */

typedef struct mm_ctx {
    const double *x, *w, *b, *dy; /* (M, K), (N, K), (N), (M, N) */
    int64_t       M, N, K;
} mm_ctx;

static double mm_loss(const void *p) { /* sum dy * (x w^T + b) */
    const mm_ctx *c = p;
    double        L = 0;
    for (int64_t m = 0; m < c->M; m++) {
        for (int64_t n = 0; n < c->N; n++) {
            double s = c->b[n];
            for (int64_t k = 0; k < c->K; k++) {
                s += c->x[m * c->K + k] * c->w[n * c->K + k];
            }
            L += c->dy[m * c->N + n] * s;
        }
    }
    return L;
}

static void test_matmul_fd(void) {
    static const int64_t shapes[][3] = {{7, 13, 6}, {1, 5, 3}, {9, 4, 17}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float  *x = fvec(M * K, 1), *w = fvec(N * K, 1), *b = fvec(N, 1), *dy = fvec(M * N, 1);
        float  *dw0 = fvec(N * K, 1), *db0 = fvec(N, 1);
        double *xd = dvec(x, M * K), *wd = dvec(w, N * K), *bd = dvec(b, N), *dyd = dvec(dy, M * N);
        double *gx = dzeros(M * K), *gw = dzeros(N * K), *gb = dzeros(N);
        mm_ctx  ctx = {.x = xd, .w = wd, .b = bd, .dy = dyd, .M = M, .N = N, .K = K};
        fd_grad(xd, M * K, mm_loss, &ctx, gx);
        fd_grad(wd, N * K, mm_loss, &ctx, gw);
        fd_grad(bd, N, mm_loss, &ctx, gb);
        for (int64_t i = 0; i < N * K; i++) {
            gw[i] += dw0[i];
        }
        for (int64_t i = 0; i < N; i++) {
            gb[i] += db0[i];
        }
        caprl_weight W = {.dtype = CAPRL_DTYPE_F32, .rows = N, .cols = K, .data = w};
        for (int32_t isa = 0; isa < N_ISA; isa++) {
            if (!g_have[isa]) {
                continue;
            }
            caprl_backend *be = g_be[isa][0];
            float         *dx = fvec(M * K, 1), *dw = fcopy(dw0, N * K), *db = fcopy(db0, N);
            be->ops->matmul_bwd_data(be, dx, dy, &W, M);
            be->ops->matmul_bwd_weight(be, dw, db, dy, x, &W, M);
            char what[96];
            snprintf(what, sizeof what, "matmul fd %s M=%lld N=%lld K=%lld", isa_name(isa), (long long)M,
                     (long long)N, (long long)K);
            char name[128];
            snprintf(name, sizeof name, "%s dx", what);
            cmp_scaled(name, dx, gx, M * K, (double)N + 8, 0);
            snprintf(name, sizeof name, "%s dw", what);
            cmp_scaled(name, dw, gw, N * K, (double)M + 8, 0);
            snprintf(name, sizeof name, "%s db", what);
            cmp_scaled(name, db, gb, N, (double)M + 8, 0);
            free(dx);
            free(dw);
            free(db);
        }
        free(x), free(w), free(b), free(dy), free(dw0), free(db0);
        free(xd), free(wd), free(bd), free(dyd), free(gx), free(gw), free(gb);
    }
}

/* Shapes that reach every blocking path (reduction chunks, several job blocks, edge tiles), f32 and bf16 weights,
 * against float64 products with per-element bounds (P + 2) eps sum |terms| + eps |old|. Also 1 vs 2 vs 3 threads,
 * dx rows alone vs in the batch, and AVX2 vs AVX-512 (the same chains) bit for bit. */
static void test_matmul_big(void) {
    /* reduction chunks (P > 256: M = 260 for dw, N = 530 for dx), several column blocks (K > 192), edges */
    static const int64_t shapes[][3] = {{260, 30, 70}, {37, 530, 61}, {5, 40, 400}, {66, 1, 9}, {3, 9, 1}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        for (int32_t dtype = CAPRL_DTYPE_F32; dtype <= CAPRL_DTYPE_BF16; dtype++) {
            int64_t   M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
            float    *x = fvec(M * K, 1), *wf = fvec(N * K, 1), *dy = fvec(M * N, 1);
            float    *dw0 = fvec(N * K, 1), *db0 = fvec(N, 1);
            uint16_t *wh = malloc((size_t)(N * K) * sizeof(uint16_t));
            if (dtype == CAPRL_DTYPE_BF16) {
                for (int64_t i = 0; i < N * K; i++) {
                    wh[i] = caprl_f32_to_bf16(wf[i]);
                    wf[i] = caprl_bf16_to_f32(wh[i]); /* the exact widening the kernel must use */
                }
            }
            caprl_weight W = {.dtype = dtype, .rows = N, .cols = K,
                              .data = dtype == CAPRL_DTYPE_BF16 ? (const void *)wh : (const void *)wf};
            /* float64 references with per-element magnitudes */
            double *rdx = dzeros(M * K), *adx = dzeros(M * K), *rdw = dzeros(N * K), *adw = dzeros(N * K);
            double *rdb = dzeros(N), *adb = dzeros(N);
            for (int64_t m = 0; m < M; m++) {
                for (int64_t n = 0; n < N; n++) {
                    double g = dy[m * N + n];
                    for (int64_t k = 0; k < K; k++) {
                        rdx[m * K + k] += g * wf[n * K + k];
                        adx[m * K + k] += fabs(g * wf[n * K + k]);
                        rdw[n * K + k] += g * x[m * K + k];
                        adw[n * K + k] += fabs(g * x[m * K + k]);
                    }
                    rdb[n] += g;
                    adb[n] += fabs(g);
                }
            }
            for (int32_t isa = 0; isa < N_ISA; isa++) {
                if (!g_have[isa]) {
                    continue;
                }
                float *dx[N_THR], *dw[N_THR], *db[N_THR];
                for (int t = 0; t < N_THR; t++) {
                    caprl_backend *be = g_be[isa][t];
                    dx[t] = fvec(M * K, 1);
                    dw[t] = fcopy(dw0, N * K);
                    db[t] = fcopy(db0, N);
                    be->ops->matmul_bwd_data(be, dx[t], dy, &W, M);
                    be->ops->matmul_bwd_weight(be, dw[t], db[t], dy, x, &W, M);
                }
                int bad = 0;
                for (int64_t i = 0; i < M * K; i++) {
                    double tol = (double)(N + 2) * EPS * adx[i] + 1e-30;
                    bad += !(fabs(dx[0][i] - rdx[i]) <= tol);
                }
                for (int64_t i = 0; i < N * K; i++) {
                    double tol = (double)(M + 2) * EPS * (adw[i] + fabs(dw0[i])) + 1e-30;
                    bad += !(fabs(dw[0][i] - (dw0[i] + rdw[i])) <= tol);
                }
                for (int64_t i = 0; i < N; i++) {
                    double tol = (double)(M + 2) * EPS * (adb[i] + fabs(db0[i])) + 1e-30;
                    bad += !(fabs(db[0][i] - (db0[i] + rdb[i])) <= tol);
                }
                CHECK_MSG(bad == 0, "matmul bwd %s %s M=%lld N=%lld K=%lld: %d wrong", isa_name(isa),
                          caprl_dtype_name(dtype), (long long)M, (long long)N, (long long)K, bad);
                for (int t = 1; t < N_THR; t++) {
                    CHECK_MSG(bits_equal(dx[0], dx[t], M * K) && bits_equal(dw[0], dw[t], N * K) &&
                                  bits_equal(db[0], db[t], N),
                              "matmul bwd %s M=%lld N=%lld K=%lld: %d threads differ from 1", isa_name(isa),
                              (long long)M, (long long)N, (long long)K, t + 1);
                }
                /* dx rows alone (M = 1) and in a 5-row block equal the batch's */
                caprl_backend *be = g_be[isa][1];
                float         *one = malloc((size_t)(5 * K) * sizeof(float));
                bool           rows_ok = true;
                for (int64_t m = 0; m < M; m += 3) {
                    be->ops->matmul_bwd_data(be, one, dy + m * N, &W, 1);
                    rows_ok = rows_ok && bits_equal(one, dx[0] + m * K, K);
                    if (m + 5 <= M) {
                        be->ops->matmul_bwd_data(be, one, dy + m * N, &W, 5);
                        rows_ok = rows_ok && bits_equal(one, dx[0] + m * K, 5 * K);
                    }
                }
                CHECK_MSG(rows_ok, "matmul bwd_data %s M=%lld N=%lld K=%lld: rows depend on M", isa_name(isa),
                          (long long)M, (long long)N, (long long)K);
                free(one);
                if (isa == CAPRL_ISA_AVX512 && g_have[CAPRL_ISA_AVX2]) { /* the same chains on both */
                    float *dx2 = fvec(M * K, 1), *dw2 = fcopy(dw0, N * K);
                    caprl_backend *b2 = g_be[CAPRL_ISA_AVX2][0];
                    b2->ops->matmul_bwd_data(b2, dx2, dy, &W, M);
                    b2->ops->matmul_bwd_weight(b2, dw2, NULL, dy, x, &W, M);
                    CHECK_MSG(bits_equal(dx2, dx[0], M * K) && bits_equal(dw2, dw[0], N * K),
                              "matmul bwd: AVX-512 and AVX2 differ (M=%lld N=%lld K=%lld)", (long long)M, (long long)N,
                              (long long)K);
                    free(dx2);
                    free(dw2);
                }
                for (int t = 0; t < N_THR; t++) {
                    free(dx[t]);
                    free(dw[t]);
                    free(db[t]);
                }
            }
            /* dbias NULL leaves dw as with dbias */
            {
                caprl_backend *be = g_be[0][0];
                float         *dwa = fcopy(dw0, N * K), *dwb = fcopy(dw0, N * K), *dba = fcopy(db0, N);
                be->ops->matmul_bwd_weight(be, dwa, dba, dy, x, &W, M);
                be->ops->matmul_bwd_weight(be, dwb, NULL, dy, x, &W, M);
                CHECK(bits_equal(dwa, dwb, N * K));
                free(dwa), free(dwb), free(dba);
            }
            free(x), free(wf), free(wh), free(dy), free(dw0), free(db0);
            free(rdx), free(adx), free(rdw), free(adw), free(rdb), free(adb);
        }
    }
    /* M = 0: dx untouched, dw and dbias keep their values; N = 0: dx = 0 */
    caprl_backend *be = g_be[1][1];
    float          dx[6] = {1, 2, 3, 4, 5, 6}, dw[6] = {1, 2, 3, 4, 5, 6}, db[2] = {7, 8}, dy[1] = {0};
    float          x[3] = {1, 1, 1};
    caprl_weight   W = {.dtype = CAPRL_DTYPE_F32, .rows = 2, .cols = 3, .data = dw};
    be->ops->matmul_bwd_weight(be, dw, db, dy, x, &W, 0);
    CHECK(dw[0] == 1 && dw[5] == 6 && db[0] == 7 && db[1] == 8);
    W.rows = 0;
    be->ops->matmul_bwd_data(be, dx, dy, &W, 2);
    CHECK(dx[0] == 0 && dx[5] == 0);
}

/* ---- AMX ------------------------------------------------------------------------------------------------- */

/* The documented panel layout (gemm_impl.h) read back element by element: B[k][n] at tile t = k / 32, panel
 * p = n / 16, row (k % 32) / 2, column 2 (n % 16) + k % 2. */
static uint16_t panel_at(const caprl_amx_panels *p, int64_t k, int64_t n) {
    int64_t t = k / 32, panel = n / 16;
    return p->data[(panel * (p->k_pad / 32) + t) * 512 + ((k % 32) / 2) * 32 + 2 * (n % 16) + k % 2];
}

static caprl_amx_panels test_panels(int64_t n, int64_t k) {
    caprl_amx_panels p = {.n = n, .k = k, .n_pad = (n + 31) / 32 * 32, .k_pad = (k + 31) / 32 * 32};
    p.data = malloc((size_t)(p.n_pad * p.k_pad) * sizeof(uint16_t));
    memset(p.data, 0xA5, (size_t)(p.n_pad * p.k_pad) * sizeof(uint16_t)); /* padding must be written as zeros */
    return p;
}

/* f32 values that exercise the rounding: ties to even both ways, NaN with either sign, infinities. */
static float *tricky_fvec(int64_t n) {
    float *v = fvec(n, 3);
    static const uint32_t special[] = {0x3F808000u, 0x3F818000u, 0x7FC12345u, 0xFF800001u, 0x7F800000u, 0x80000000u};
    for (int64_t i = 0; i < n; i += 7) {
        memcpy(&v[i], &special[(i / 7) % 6], sizeof(float));
    }
    return v;
}

/* The packing steps of the AMX products, on every ISA level the machine has (they need no AMX): each element of
 * each panel against the layout, with the rounding of caprl_f32_to_bf16, and zeros in the padding. */
static void test_amx_packing(void) {
    static const int64_t shapes[][3] = {{37, 70, 5},  {64, 96, 32}, {1, 1, 1},
                                        {33, 129, 48}, {50, 31, 17}, {16, 32, 64}};
    for (int32_t isa = 0; isa < N_ISA; isa++) {
        if (!g_have[isa]) {
            continue;
        }
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            int64_t        N = shapes[s][0], K = shapes[s][1], M = shapes[s][2];
            caprl_cpu_ctx *c = g_be[isa][s % N_THR]->impl;
            uint16_t      *w = malloc((size_t)(N * K) * sizeof(uint16_t));
            float         *x = tricky_fvec(M * K), *dy = tricky_fvec(M * N);
            for (int64_t i = 0; i < N * K; i++) {
                w[i] = (uint16_t)(i * 2654435761u >> 7);
            }
            caprl_amx_panels fwd = test_panels(N, K), bwd = test_panels(K, N), xp = test_panels(K, M);
            caprl_amx_pack_weight(c, &fwd, w, false);
            caprl_amx_pack_weight(c, &bwd, w, true);
            caprl_amx_pack_f32(c, &xp, x);
            int64_t   lda = (M + 31) / 32 * 32, n_rows = (N + 15) / 16 * 16;
            uint16_t *a = malloc((size_t)(n_rows * lda) * sizeof(uint16_t));
            memset(a, 0xA5, (size_t)(n_rows * lda) * sizeof(uint16_t));
            caprl_amx_pack_dy_t(c, a, lda, dy, M, N);
            int bad_fwd = 0, bad_bwd = 0, bad_x = 0, bad_a = 0;
            for (int64_t k = 0; k < fwd.k_pad; k++) {
                for (int64_t n = 0; n < fwd.n_pad; n++) {
                    bad_fwd += panel_at(&fwd, k, n) != (k < K && n < N ? w[n * K + k] : 0);
                }
            }
            for (int64_t k = 0; k < bwd.k_pad; k++) {
                for (int64_t n = 0; n < bwd.n_pad; n++) {
                    bad_bwd += panel_at(&bwd, k, n) != (k < N && n < K ? w[k * K + n] : 0);
                }
            }
            for (int64_t k = 0; k < xp.k_pad; k++) {
                for (int64_t n = 0; n < xp.n_pad; n++) {
                    bad_x += panel_at(&xp, k, n) != (k < M && n < K ? caprl_f32_to_bf16(x[k * K + n]) : 0);
                }
            }
            for (int64_t n = 0; n < n_rows; n++) {
                for (int64_t m = 0; m < lda; m++) {
                    /* tiles of 16 x 32, each contiguous (gemm_impl.h) */
                    uint16_t got = a[((n / 16) * (lda / 32) + m / 32) * 512 + (n % 16) * 32 + m % 32];
                    bad_a += got != (n < N && m < M ? caprl_f32_to_bf16(dy[m * N + n]) : 0);
                }
            }
            CHECK_MSG(bad_fwd + bad_bwd + bad_x + bad_a == 0,
                      "amx packing %s N=%lld K=%lld M=%lld: wrong elements fwd %d, bwd %d, x %d, dy^T %d",
                      isa_name(isa), (long long)N, (long long)K, (long long)M, bad_fwd, bad_bwd, bad_x, bad_a);
            free(fwd.data), free(bwd.data), free(xp.data), free(a);
            free(w), free(x), free(dy);
        }
    }
}

/* Both backward products on the bf16 matrix unit (AMX tiles, or vdpbf16ps on AVX512-BF16 CPUs without AMX; only
 * where there is one): a bf16 weight prepared for training, against float64 products of the bf16-rounded operands
 * (dy and x rounded to nearest even, as the kernels do) with the f32 accumulation bound (dbias too, an f32 sum of
 * dy); 1 vs 3 threads bit for bit; dx rows alone equal the batch's; a repack in place after the weight changed
 * equals a fresh pack. */
static void test_matmul_bwd_bf16_unit(void) {
    caprl_error    err = {0};
    caprl_backend *be1 = NULL, *be3 = NULL;
    CHECK_OK(bf16_unit_backends(&be1, &be3, &err), &err);
    if (!bf16_unit_or_skip(be1, be3, "bf16-unit matmul backward test")) {
        return;
    }
    const char *unit = caprl_backend_cpu_amx(be1) ? "amx-bf16" : "avx512-bf16";
    /* N = 9000: the data gradient's reduction is too long for a row block to hold it in L2 (square jobs over
     * chunks, as for the lm_head), with full jobs only and with a partial column range */
    static const int64_t shapes[][3] = {{1, 1, 1},     {37, 50, 133},  {70, 33, 31},   {100, 64, 1000}, {300, 96, 64},
                                        {5, 530, 61}, {64, 1100, 96}, {64, 9000, 64}, {96, 9000, 300}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t   M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        float    *x = fvec(M * K, 1), *dy = fvec(M * N, 1), *wf = fvec(N * K, 1);
        float    *dw0 = fvec(N * K, 1), *db0 = fvec(N, 1);
        uint16_t *wh = malloc((size_t)(N * K) * sizeof(uint16_t));
        for (int64_t i = 0; i < N * K; i++) {
            wh[i] = caprl_f32_to_bf16(wf[i]);
        }
        caprl_weight W = {.dtype = CAPRL_DTYPE_BF16, .rows = N, .cols = K, .data = wh, .backward = true};
        CHECK_OK(be1->ops->weight_prepare(be1, &W, &err), &err);
        CHECK(W.packed != NULL);
        /* float64 references on the rounded operands */
        double *rdx = dzeros(M * K), *adx = dzeros(M * K), *rdw = dzeros(N * K), *adw = dzeros(N * K);
        double *rdb = dzeros(N), *adb = dzeros(N);
        for (int64_t m = 0; m < M; m++) {
            for (int64_t n = 0; n < N; n++) {
                rdb[n] += dy[m * N + n];
                adb[n] += fabs(dy[m * N + n]);
                double g = caprl_bf16_to_f32(caprl_f32_to_bf16(dy[m * N + n]));
                for (int64_t k = 0; k < K; k++) {
                    double wv = caprl_bf16_to_f32(wh[n * K + k]);
                    double xv = caprl_bf16_to_f32(caprl_f32_to_bf16(x[m * K + k]));
                    rdx[m * K + k] += g * wv;
                    adx[m * K + k] += fabs(g * wv);
                    rdw[n * K + k] += g * xv;
                    adw[n * K + k] += fabs(g * xv);
                }
            }
        }
        float *dx1 = fvec(M * K, 1), *dx3 = fvec(M * K, 1), *dw1 = fcopy(dw0, N * K), *dw3 = fcopy(dw0, N * K);
        float *db1 = fcopy(db0, N);
        be1->ops->matmul_bwd_data(be1, dx1, dy, &W, M);
        be1->ops->matmul_bwd_weight(be1, dw1, db1, dy, x, &W, M);
        be3->ops->matmul_bwd_data(be3, dx3, dy, &W, M);
        be3->ops->matmul_bwd_weight(be3, dw3, NULL, dy, x, &W, M);
        int bad_dx = 0, bad_dw = 0, bad_db = 0;
        for (int64_t i = 0; i < M * K; i++) {
            bad_dx += !(fabs(dx1[i] - rdx[i]) <= (double)(N + 2) * EPS * adx[i] + 1e-30);
        }
        for (int64_t i = 0; i < N * K; i++) {
            double tol = (double)(M + 2) * EPS * (adw[i] + fabs(dw0[i])) + 1e-30;
            bad_dw += !(fabs(dw1[i] - (dw0[i] + rdw[i])) <= tol);
        }
        for (int64_t i = 0; i < N; i++) {
            double tol = (double)(M + 2) * EPS * (adb[i] + fabs(db0[i])) + 1e-30;
            bad_db += !(fabs(db1[i] - (db0[i] + rdb[i])) <= tol);
        }
        CHECK_MSG(bad_dx == 0 && bad_dw == 0 && bad_db == 0, "%s bwd M=%lld N=%lld K=%lld: %d dx, %d dw, %d db wrong",
                  unit, (long long)M, (long long)N, (long long)K, bad_dx, bad_dw, bad_db);
        CHECK_MSG(bits_equal(dx1, dx3, M * K) && bits_equal(dw1, dw3, N * K),
                  "%s bwd M=%lld N=%lld K=%lld: 3 threads differ from 1", unit, (long long)M, (long long)N,
                  (long long)K);
        bool rows_ok = true;
        for (int64_t m = 0; m < M; m += 7) {
            be3->ops->matmul_bwd_data(be3, dx3, dy + m * N, &W, 1);
            rows_ok = rows_ok && bits_equal(dx3, dx1 + m * K, K);
        }
        CHECK_MSG(rows_ok, "%s bwd_data M=%lld N=%lld K=%lld: rows computed alone differ", unit, (long long)M,
                  (long long)N, (long long)K);
        /* the optimizer changes the weight in place: a repack equals a fresh pack */
        for (int64_t i = 0; i < N * K; i += 3) {
            wh[i] ^= 0x0100;
        }
        void *before = W.packed;
        CHECK_OK(be1->ops->weight_prepare(be1, &W, &err), &err);
        CHECK(W.packed == before);
        caprl_weight Wn = {.dtype = CAPRL_DTYPE_BF16, .rows = N, .cols = K, .data = wh, .backward = true};
        CHECK_OK(be1->ops->weight_prepare(be1, &Wn, &err), &err);
        be1->ops->matmul_bwd_data(be1, dx1, dy, &W, M);
        be1->ops->matmul_bwd_data(be1, dx3, dy, &Wn, M);
        CHECK_MSG(bits_equal(dx1, dx3, M * K), "%s bwd_data after repack differs from a fresh pack", unit);
        be1->ops->weight_release(be1, &W);
        be1->ops->weight_release(be1, &Wn);
        free(x), free(dy), free(wf), free(dw0), free(db0), free(wh);
        free(rdx), free(adx), free(rdw), free(adw), free(rdb), free(adb);
        free(dx1), free(dx3), free(dw1), free(dw3), free(db1);
    }
    caprl_backend_free(be1);
    caprl_backend_free(be3);
}

/* ---- embedding ------------------------------------------------------------------------------------------- */

typedef struct emb_ctx {
    const double  *table, *dy;
    const int32_t *ids;
    int64_t        M, C;
} emb_ctx;

static double emb_loss(const void *p) {
    const emb_ctx *c = p;
    double         L = 0;
    for (int64_t m = 0; m < c->M; m++) {
        for (int64_t i = 0; i < c->C; i++) {
            L += c->dy[m * c->C + i] * c->table[c->ids[m] * c->C + i];
        }
    }
    return L;
}

static void test_embed_bwd(void) {
    static const int64_t shapes[][3] = {{20, 37, 13}, {50, 7, 200}}; /* M, V, C */
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t  M = shapes[s][0], V = shapes[s][1], C = shapes[s][2];
        int32_t *ids = malloc((size_t)M * sizeof(int32_t));
        for (int64_t m = 0; m < M; m++) {
            ids[m] = m % 4 == 3 ? ids[m - 1] : irand((int)V); /* repeats, adjacent and not */
        }
        float  *tab0 = fvec(V * C, 1), *dy = fvec(M * C, 1);
        double *td = dvec(tab0, V * C), *dyd = dvec(dy, M * C), *g = dzeros(V * C);
        emb_ctx ctx = {.table = td, .dy = dyd, .ids = ids, .M = M, .C = C};
        if (s == 0) {
            fd_grad(td, V * C, emb_loss, &ctx, g);
        }
        /* the exact f32 sequence: each row's contributions in increasing m */
        float *want = fcopy(tab0, V * C);
        for (int64_t m = 0; m < M; m++) {
            for (int64_t i = 0; i < C; i++) {
                want[ids[m] * C + i] += dy[m * C + i];
            }
        }
        for (int32_t isa = 0; isa < N_ISA; isa++) {
            if (!g_have[isa]) {
                continue;
            }
            for (int t = 0; t < N_THR; t++) {
                caprl_backend *be = g_be[isa][t];
                float         *tab = fcopy(tab0, V * C);
                be->ops->embed_bwd(be, tab, ids, dy, M, C);
                CHECK_MSG(bits_equal(tab, want, V * C), "embed_bwd %s %d threads: not the in-order f32 sums",
                          isa_name(isa), t + 1);
                if (s == 0 && t == 0) {
                    for (int64_t i = 0; i < V * C; i++) {
                        g[i] += tab0[i];
                    }
                    cmp_scaled("embed_bwd fd", tab, g, V * C, (double)M + 4, 0);
                    for (int64_t i = 0; i < V * C; i++) {
                        g[i] -= tab0[i];
                    }
                }
                free(tab);
            }
        }
        free(ids), free(tab0), free(dy), free(td), free(dyd), free(g), free(want);
    }
}

/* ---- rmsnorm --------------------------------------------------------------------------------------------- */

typedef struct rms_ctx {
    const double *x, *w, *dy;
    int64_t       M, C;
    double        eps;
} rms_ctx;

static double rms_loss(const void *p) {
    const rms_ctx *c = p;
    double         L = 0;
    for (int64_t m = 0; m < c->M; m++) {
        double ss = 0;
        for (int64_t i = 0; i < c->C; i++) {
            ss += c->x[m * c->C + i] * c->x[m * c->C + i];
        }
        double r = 1.0 / sqrt(ss / (double)c->C + c->eps);
        for (int64_t i = 0; i < c->C; i++) {
            L += c->dy[m * c->C + i] * c->x[m * c->C + i] * r * c->w[i];
        }
    }
    return L;
}

static void test_rmsnorm_bwd(void) {
    static const int64_t shapes[][2] = {{7, 13}, {3, 100}, {40, 37}, {4, 5}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t M = shapes[s][0], C = shapes[s][1];
        float   eps = 1e-6f;
        float  *x = fvec(M * C, 2), *w = fvec(C, 1), *dy = fvec(M * C, 1), *dw0 = fvec(C, 1);
        x[0] = 0.0f; /* rows with small values are fine too */
        double *xd = dvec(x, M * C), *wd = dvec(w, C), *dyd = dvec(dy, M * C);
        double *gx = dzeros(M * C), *gw = dzeros(C);
        rms_ctx ctx = {.x = xd, .w = wd, .dy = dyd, .M = M, .C = C, .eps = eps};
        fd_grad(xd, M * C, rms_loss, &ctx, gx);
        fd_grad(wd, C, rms_loss, &ctx, gw);
        for (int64_t i = 0; i < C; i++) {
            gw[i] += dw0[i];
        }
        for (int32_t isa = 0; isa < N_ISA; isa++) {
            if (!g_have[isa]) {
                continue;
            }
            float *dx[N_THR], *dwt[N_THR];
            for (int t = 0; t < N_THR; t++) {
                caprl_backend *be = g_be[isa][t];
                dx[t] = fvec(M * C, 1);
                dwt[t] = fcopy(dw0, C);
                be->ops->rmsnorm_bwd(be, dx[t], dwt[t], dy, x, w, M, C, eps);
            }
            char what[80];
            snprintf(what, sizeof what, "rmsnorm_bwd %s M=%lld C=%lld dx", isa_name(isa), (long long)M, (long long)C);
            cmp_scaled(what, dx[0], gx, M * C, 4.0 * (double)C + 16, 0);
            snprintf(what, sizeof what, "rmsnorm_bwd %s M=%lld C=%lld dweight", isa_name(isa), (long long)M,
                     (long long)C);
            cmp_scaled(what, dwt[0], gw, C, 4.0 * (double)(M + C) + 16, 0);
            for (int t = 1; t < N_THR; t++) {
                CHECK_MSG(bits_equal(dx[0], dx[t], M * C) && bits_equal(dwt[0], dwt[t], C),
                          "rmsnorm_bwd %s: %d threads differ", isa_name(isa), t + 1);
            }
            /* dx may alias dy */
            caprl_backend *be = g_be[isa][1];
            float         *inplace = fcopy(dy, M * C), *dwa = fcopy(dw0, C);
            be->ops->rmsnorm_bwd(be, inplace, dwa, inplace, x, w, M, C, eps);
            CHECK_MSG(bits_equal(inplace, dx[0], M * C) && bits_equal(dwa, dwt[0], C),
                      "rmsnorm_bwd %s: dx aliasing dy changes the result", isa_name(isa));
            free(inplace), free(dwa);
            for (int t = 0; t < N_THR; t++) {
                free(dx[t]);
                free(dwt[t]);
            }
        }
        free(x), free(w), free(dy), free(dw0), free(xd), free(wd), free(dyd), free(gx), free(gw);
    }
}

/* ---- rope ------------------------------------------------------------------------------------------------ */

typedef struct rope_ctx {
    const double  *x, *dy; /* rows of stride floats */
    const int32_t *pos, *sections;
    const float   *inv_freq;
    int32_t        n_sections;
    int64_t        stride, M, H, D;
} rope_ctx;

static double rope_loss(const void *p) {
    const rope_ctx *c = p;
    double          L = 0;
    int64_t         half = c->D / 2;
    for (int64_t m = 0; m < c->M; m++) {
        for (int64_t j = 0, s = 0, end = c->sections[0]; j < half; j++) {
            while (j >= end) {
                end += c->sections[++s];
            }
            double a = (float)c->pos[s * c->M + m] * c->inv_freq[j]; /* the f32 angle, as the kernels */
            for (int64_t h = 0; h < c->H; h++) {
                const double *x = c->x + m * c->stride + h * c->D, *dy = c->dy + m * c->stride + h * c->D;
                L += dy[j] * (x[j] * cos(a) - x[j + half] * sin(a));
                L += dy[j + half] * (x[j + half] * cos(a) + x[j] * sin(a));
            }
        }
    }
    return L;
}

static void test_rope_bwd(void) {
    static const struct {
        int64_t M, H, D, pad;
        int32_t n_sections, sections[3];
    } cases[] = {{5, 3, 12, 5, 3, {1, 2, 3}}, {7, 2, 8, 0, 1, {4, 0, 0}}, {3, 1, 40, 3, 2, {12, 8, 0}}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        int64_t M = cases[ci].M, H = cases[ci].H, D = cases[ci].D, stride = H * D + cases[ci].pad;
        int32_t ns = cases[ci].n_sections;
        int32_t pos[3 * 7];
        float   inv_freq[20];
        for (int64_t i = 0; i < ns * M; i++) {
            pos[i] = irand(300) - 20;
        }
        for (int64_t j = 0; j < D / 2; j++) {
            inv_freq[j] = powf(10000.0f, -2.0f * (float)j / (float)D);
        }
        float  *x = fvec(M * stride, 1), *dy = fvec(M * stride, 1);
        double *xd = dvec(x, M * stride), *dyd = dvec(dy, M * stride), *g = dzeros(M * stride);
        rope_ctx ctx = {.x = xd, .dy = dyd, .pos = pos, .sections = cases[ci].sections, .inv_freq = inv_freq,
                        .n_sections = ns, .stride = stride, .M = M, .H = H, .D = D};
        fd_grad(xd, M * stride, rope_loss, &ctx, g);
        for (int64_t m = 0; m < M; m++) { /* the padding after H * D is not touched */
            for (int64_t i = H * D; i < stride; i++) {
                g[m * stride + i] = dy[m * stride + i];
            }
        }
        for (int32_t isa = 0; isa < N_ISA; isa++) {
            if (!g_have[isa]) {
                continue;
            }
            float *dx[N_THR];
            for (int t = 0; t < N_THR; t++) {
                caprl_backend *be = g_be[isa][t];
                dx[t] = fcopy(dy, M * stride);
                be->ops->rope_sect_bwd(be, dx[t], stride, pos, inv_freq, cases[ci].sections, ns, M, H, D);
            }
            char what[64];
            snprintf(what, sizeof what, "rope_sect_bwd %s case %zu", isa_name(isa), ci);
            cmp_scaled(what, dx[0], g, M * stride, 16, 0);
            for (int t = 1; t < N_THR; t++) {
                CHECK_MSG(bits_equal(dx[0], dx[t], M * stride), "%s: %d threads differ", what, t + 1);
            }
            /* the backward undoes the forward (a rotation): bwd(fwd(x)) = x up to rounding */
            caprl_backend *be = g_be[isa][0];
            float         *y = fcopy(x, M * stride);
            be->ops->rope_sect_fwd(be, y, stride, pos, inv_freq, cases[ci].sections, ns, M, H, D);
            be->ops->rope_sect_bwd(be, y, stride, pos, inv_freq, cases[ci].sections, ns, M, H, D);
            double *xd2 = dvec(x, M * stride);
            snprintf(what, sizeof what, "rope bwd(fwd(x)) %s case %zu", isa_name(isa), ci);
            cmp_scaled(what, y, xd2, M * stride, 8, 0);
            free(xd2), free(y);
            for (int t = 0; t < N_THR; t++) {
                free(dx[t]);
            }
        }
        free(x), free(dy), free(xd), free(dyd), free(g);
    }
}

/* ---- attention ------------------------------------------------------------------------------------------- */

typedef struct att_cfg {
    int64_t        M, Hq, Hkv, D, n_seg;
    const int64_t *seg;
    double         scale;
    bool           causal;
} att_cfg;

/* Keys of row i in segment [a, b): [a, i] causal, [a, b) otherwise. */
static void att_range(const att_cfg *c, int64_t i, int64_t *a, int64_t *e) {
    int64_t s = 0;
    while (c->seg[s + 1] <= i) {
        s++;
    }
    *a = c->seg[s];
    *e = c->causal ? i + 1 : c->seg[s + 1];
}

/* float64 forward: out (M, Hq, D), lse (M, Hq); p (room for the longest segment) is scratch. */
static void ref_attn(const att_cfg *c, double *out, double *lse, const double *q, const double *k, const double *v,
                     double *p) {
    int64_t D = c->D, G = c->Hq / c->Hkv;
    for (int64_t i = 0; i < c->M; i++) {
        int64_t a, e;
        att_range(c, i, &a, &e);
        for (int64_t h = 0; h < c->Hq; h++) {
            const double *qi = q + (i * c->Hq + h) * D;
            double        mx = -INFINITY, sum = 0;
            for (int64_t j = a; j < e; j++) {
                double s = 0;
                for (int64_t d = 0; d < D; d++) {
                    s += qi[d] * k[(j * c->Hkv + h / G) * D + d];
                }
                p[j - a] = s * c->scale;
                mx = p[j - a] > mx ? p[j - a] : mx;
            }
            for (int64_t j = a; j < e; j++) {
                p[j - a] = exp(p[j - a] - mx);
                sum += p[j - a];
            }
            double *o = out + (i * c->Hq + h) * D;
            for (int64_t d = 0; d < D; d++) {
                double s = 0;
                for (int64_t j = a; j < e; j++) {
                    s += p[j - a] * v[(j * c->Hkv + h / G) * D + d];
                }
                o[d] = s / sum;
            }
            if (lse) {
                lse[i * c->Hq + h] = mx + log(sum);
            }
        }
    }
}

/* float64 backward by the formulas (checked against finite differences in test_attn_fd). */
static void ref_attn_bwd(const att_cfg *c, double *dq, double *dk, double *dv, const double *dout, const double *q,
                         const double *k, const double *v, double *p, double *dp) {
    int64_t D = c->D, G = c->Hq / c->Hkv;
    memset(dq, 0, (size_t)(c->M * c->Hq * D) * sizeof(double));
    memset(dk, 0, (size_t)(c->M * c->Hkv * D) * sizeof(double));
    memset(dv, 0, (size_t)(c->M * c->Hkv * D) * sizeof(double));
    for (int64_t i = 0; i < c->M; i++) {
        int64_t a, e;
        att_range(c, i, &a, &e);
        for (int64_t h = 0; h < c->Hq; h++) {
            const double *qi = q + (i * c->Hq + h) * D, *gi = dout + (i * c->Hq + h) * D;
            double        mx = -INFINITY, sum = 0, dlt = 0;
            for (int64_t j = a; j < e; j++) {
                const double *kj = k + (j * c->Hkv + h / G) * D, *vj = v + (j * c->Hkv + h / G) * D;
                double        s = 0, t = 0;
                for (int64_t d = 0; d < D; d++) {
                    s += qi[d] * kj[d];
                    t += gi[d] * vj[d];
                }
                p[j - a] = s * c->scale;
                dp[j - a] = t;
                mx = p[j - a] > mx ? p[j - a] : mx;
            }
            for (int64_t j = a; j < e; j++) {
                p[j - a] = exp(p[j - a] - mx);
                sum += p[j - a];
            }
            for (int64_t j = a; j < e; j++) {
                p[j - a] /= sum;
                dlt += p[j - a] * dp[j - a];
            }
            for (int64_t j = a; j < e; j++) {
                double  ds = p[j - a] * (dp[j - a] - dlt);
                double *dkj = dk + (j * c->Hkv + h / G) * D, *dvj = dv + (j * c->Hkv + h / G) * D;
                const double *kj = k + (j * c->Hkv + h / G) * D;
                for (int64_t d = 0; d < D; d++) {
                    dq[(i * c->Hq + h) * D + d] += c->scale * ds * kj[d];
                    dkj[d] += c->scale * ds * qi[d];
                    dvj[d] += p[j - a] * gi[d];
                }
            }
        }
    }
}

typedef struct att_ctx {
    const att_cfg *c;
    const double  *q, *k, *v, *dout;
    double        *out, *p;
} att_ctx;

static double att_loss(const void *ptr) {
    const att_ctx *a = ptr;
    ref_attn(a->c, a->out, NULL, a->q, a->k, a->v, a->p);
    double L = 0;
    for (int64_t i = 0; i < a->c->M * a->c->Hq * a->c->D; i++) {
        L += a->dout[i] * a->out[i];
    }
    return L;
}

typedef struct att_data {
    float  *q, *k, *v, *dout;
    double *qd, *kd, *vd, *doutd;
    double *out, *lse, *dq, *dk, *dv, *p, *dp; /* float64 references */
} att_data;

static att_data att_make(const att_cfg *c) {
    int64_t  nq = c->M * c->Hq * c->D, nk = c->M * c->Hkv * c->D;
    att_data d;
    d.q = fvec(nq, 1.5f);
    d.k = fvec(nk, 1.5f);
    d.v = fvec(nk, 1);
    d.dout = fvec(nq, 1);
    d.qd = dvec(d.q, nq);
    d.kd = dvec(d.k, nk);
    d.vd = dvec(d.v, nk);
    d.doutd = dvec(d.dout, nq);
    d.out = dzeros(nq);
    d.lse = dzeros(c->M * c->Hq);
    d.dq = dzeros(nq);
    d.dk = dzeros(nk);
    d.dv = dzeros(nk);
    d.p = dzeros(c->M);
    d.dp = dzeros(c->M);
    ref_attn(c, d.out, d.lse, d.qd, d.kd, d.vd, d.p);
    ref_attn_bwd(c, d.dq, d.dk, d.dv, d.doutd, d.qd, d.kd, d.vd, d.p, d.dp);
    return d;
}

static void att_free(att_data *d) {
    free(d->q), free(d->k), free(d->v), free(d->dout), free(d->qd), free(d->kd), free(d->vd), free(d->doutd);
    free(d->out), free(d->lse), free(d->dq), free(d->dk), free(d->dv), free(d->p), free(d->dp);
}

static int64_t att_max_len(const att_cfg *c) {
    int64_t mx = 0;
    for (int64_t s = 0; s < c->n_seg; s++) {
        mx = c->seg[s + 1] - c->seg[s] > mx ? c->seg[s + 1] - c->seg[s] : mx;
    }
    return mx;
}

/* Runs the kernels on every ISA and thread count and checks them against the float64 references in d: forward
 * (out, lse), backward (dq, dk, dv); threads bit-identical; AVX-512 bit-identical to AVX2 (the same chains on wider
 * vectors); out vs attn_fwd. */
static void att_check(const att_cfg *c, const att_data *d, const char *name) {
    int64_t nq = c->M * c->Hq * c->D, nk = c->M * c->Hkv * c->D, nl = c->M * c->Hq;
    double  kf = 4.0 * (double)(att_max_len(c) + c->D) + 32;
    float  *ref_fwd_attn = malloc((size_t)nq * sizeof(float));
    int64_t *row0 = malloc((size_t)c->M * sizeof(int64_t));
    int32_t *len = malloc((size_t)c->M * sizeof(int32_t));
    for (int64_t i = 0; i < c->M; i++) {
        int64_t a, e;
        att_range(c, i, &a, &e);
        row0[i] = a;
        len[i] = (int32_t)(e - a);
    }
    float *avx2[5] = {NULL, NULL, NULL, NULL, NULL}; /* out, lse, dq, dk, dv of the AVX2 kernels */
    for (int32_t isa = 0; isa < N_ISA; isa++) {
        if (!g_have[isa]) {
            continue;
        }
        float *out[N_THR], *lse[N_THR], *dq[N_THR], *dk[N_THR], *dv[N_THR];
        for (int t = 0; t < N_THR; t++) {
            caprl_backend *be = g_be[isa][t];
            out[t] = fvec(nq, 1);
            lse[t] = fvec(nl, 1);
            dq[t] = fvec(nq, 1);
            dk[t] = fvec(nk, 1);
            dv[t] = fvec(nk, 1);
            be->ops->attn_train_fwd(be, out[t], lse[t], d->q, d->k, d->v, c->seg, c->n_seg, c->M, c->Hq, c->Hkv,
                                    c->D, (float)c->scale, c->causal);
            be->ops->attn_train_bwd(be, dq[t], dk[t], dv[t], d->dout, d->q, d->k, d->v, out[t], lse[t], c->seg,
                                    c->n_seg, c->M, c->Hq, c->Hkv, c->D, (float)c->scale, c->causal);
        }
        char what[128];
        const char *cz = c->causal ? "causal" : "full";
        snprintf(what, sizeof what, "attn %s %s %s out", name, cz, isa_name(isa));
        cmp_scaled(what, out[0], d->out, nq, kf, 0);
        snprintf(what, sizeof what, "attn %s %s %s lse", name, cz, isa_name(isa));
        cmp_scaled(what, lse[0], d->lse, nl, kf, 1);
        snprintf(what, sizeof what, "attn %s %s %s dq", name, cz, isa_name(isa));
        cmp_scaled(what, dq[0], d->dq, nq, 2 * kf, 0);
        snprintf(what, sizeof what, "attn %s %s %s dk", name, cz, isa_name(isa));
        cmp_scaled(what, dk[0], d->dk, nk, 2 * kf * (double)(c->Hq / c->Hkv), 0);
        snprintf(what, sizeof what, "attn %s %s %s dv", name, cz, isa_name(isa));
        cmp_scaled(what, dv[0], d->dv, nk, 2 * kf * (double)(c->Hq / c->Hkv), 0);
        for (int t = 1; t < N_THR; t++) {
            CHECK_MSG(bits_equal(out[0], out[t], nq) && bits_equal(lse[0], lse[t], nl) &&
                          bits_equal(dq[0], dq[t], nq) && bits_equal(dk[0], dk[t], nk) && bits_equal(dv[0], dv[t], nk),
                      "attn %s %s %s: %d threads differ from 1", name, cz, isa_name(isa), t + 1);
        }
        if (isa == CAPRL_ISA_AVX2) {
            avx2[0] = fcopy(out[0], nq), avx2[1] = fcopy(lse[0], nl), avx2[2] = fcopy(dq[0], nq);
            avx2[3] = fcopy(dk[0], nk), avx2[4] = fcopy(dv[0], nk);
        } else if (isa == CAPRL_ISA_AVX512 && avx2[0]) {
            CHECK_MSG(bits_equal(out[0], avx2[0], nq) && bits_equal(lse[0], avx2[1], nl) &&
                          bits_equal(dq[0], avx2[2], nq) && bits_equal(dk[0], avx2[3], nk) &&
                          bits_equal(dv[0], avx2[4], nk),
                      "attn %s %s: AVX-512 differs from AVX2", name, cz);
        }
        /* the inference kernel on the same rows */
        caprl_backend *be = g_be[isa][1];
        be->ops->attn_fwd(be, ref_fwd_attn, d->q, d->k, d->v, row0, len, c->Hkv * c->D, c->M, c->Hq, c->Hkv, c->D,
                          (float)c->scale);
        double *o64 = dvec(ref_fwd_attn, nq);
        snprintf(what, sizeof what, "attn %s %s %s: train fwd vs attn_fwd", name, cz, isa_name(isa));
        cmp_scaled(what, out[0], o64, nq, 2 * kf, 0);
        free(o64);
        for (int t = 0; t < N_THR; t++) {
            free(out[t]), free(lse[t]), free(dq[t]), free(dk[t]), free(dv[t]);
        }
    }
    free(ref_fwd_attn), free(row0), free(len);
    for (int i = 0; i < 5; i++) {
        free(avx2[i]);
    }
}

/* Small shapes: the float64 formulas and the kernels against finite differences. */
static void test_attn_fd(void) {
    static const int64_t seg[] = {0, 5, 6, 6, 13}; /* lengths 5, 1, 0, 7 */
    for (int causal = 0; causal < 2; causal++) {
        att_cfg  c = {.M = 13, .Hq = 4, .Hkv = 2, .D = 6, .n_seg = 4, .seg = seg, .scale = 1.0 / sqrt(6.0),
                      .causal = causal != 0};
        att_data d = att_make(&c);
        int64_t  nq = c.M * c.Hq * c.D, nk = c.M * c.Hkv * c.D;
        double  *gq = dzeros(nq), *gk = dzeros(nk), *gv = dzeros(nk), *out = dzeros(nq);
        att_ctx  ctx = {.c = &c, .q = d.qd, .k = d.kd, .v = d.vd, .dout = d.doutd, .out = out, .p = d.p};
        fd_grad(d.qd, nq, att_loss, &ctx, gq);
        fd_grad(d.kd, nk, att_loss, &ctx, gk);
        fd_grad(d.vd, nk, att_loss, &ctx, gv);
        /* the reference formulas agree with the finite differences (to float64 precision, not f32) */
        double worst = 0, mag = 0;
        for (int64_t i = 0; i < nq; i++) {
            worst = fmax(worst, fabs(gq[i] - d.dq[i]));
            mag = fmax(mag, fabs(gq[i]));
        }
        for (int64_t i = 0; i < nk; i++) {
            worst = fmax(worst, fmax(fabs(gk[i] - d.dk[i]), fabs(gv[i] - d.dv[i])));
            mag = fmax(mag, fmax(fabs(gk[i]), fabs(gv[i])));
        }
        CHECK_MSG(worst <= 1e-7 * mag, "attention float64 formulas vs finite differences: %.3g (scale %.3g)", worst,
                  mag);
        /* and the kernels are checked against the finite differences themselves */
        memcpy(d.dq, gq, (size_t)nq * sizeof(double));
        memcpy(d.dk, gk, (size_t)nk * sizeof(double));
        memcpy(d.dv, gv, (size_t)nk * sizeof(double));
        att_check(&c, &d, "fd M=13");
        free(gq), free(gk), free(gv), free(out);
        att_free(&d);
    }
}

/* Larger segments (several key panels, key tiles, query chunks, D with a masked tail, one KV head for 4 query
 * heads or 3 heads without grouping, a length-1 segment) against the float64 formulas; a segment alone equals the
 * same segment in the batch. */
static void test_attn_big(void) {
    static const int64_t seg[] = {0, 1, 80, 150, 160};
    /* 16 + masked 4; 16 + 16 + 8; 64 + masked 6 (the AVX-512 products' 4-vector pass) */
    static const int64_t D_list[] = {20, 40, 70}, Hq_list[] = {4, 3, 2}, Hkv_list[] = {1, 3, 1};
    for (int di = 0; di < 3; di++) {
        for (int causal = 0; causal < 2; causal++) {
            att_cfg  c = {.M = 160, .Hq = Hq_list[di], .Hkv = Hkv_list[di], .D = D_list[di], .n_seg = 4,
                          .seg = seg,
                          .scale = 1.0 / sqrt((double)D_list[di]), .causal = causal != 0};
            att_data d = att_make(&c);
            char     name[32];
            snprintf(name, sizeof name, "M=160 D=%lld", (long long)c.D);
            att_check(&c, &d, name);
            /* segment [80, 150) alone */
            int64_t        a = 80, L = 70, HqD = c.Hq * c.D, HkD = c.Hkv * c.D;
            const int64_t  seg1[] = {0, L};
            caprl_backend *be = g_be[0][1];
            for (int32_t isa = N_ISA - 1; isa >= 0; isa--) { /* the widest level the machine has */
                if (g_have[isa]) {
                    be = g_be[isa][1];
                    break;
                }
            }
            int64_t nq = c.M * HqD, nk = c.M * HkD;
            float  *out = malloc((size_t)nq * sizeof(float)), *lse = malloc((size_t)(c.M * c.Hq) * sizeof(float));
            float  *dq = malloc((size_t)nq * sizeof(float)), *dk = malloc((size_t)nk * sizeof(float));
            float  *dv = malloc((size_t)nk * sizeof(float));
            float  *out1 = malloc((size_t)(L * HqD) * sizeof(float));
            float  *lse1 = malloc((size_t)(L * c.Hq) * sizeof(float));
            float  *dq1 = malloc((size_t)(L * HqD) * sizeof(float)), *dk1 = malloc((size_t)(L * HkD) * sizeof(float));
            float  *dv1 = malloc((size_t)(L * HkD) * sizeof(float));
            be->ops->attn_train_fwd(be, out, lse, d.q, d.k, d.v, c.seg, c.n_seg, c.M, c.Hq, c.Hkv, c.D, (float)c.scale,
                                    c.causal);
            be->ops->attn_train_bwd(be, dq, dk, dv, d.dout, d.q, d.k, d.v, out, lse, c.seg, c.n_seg, c.M, c.Hq, c.Hkv,
                                    c.D, (float)c.scale, c.causal);
            be->ops->attn_train_fwd(be, out1, lse1, d.q + a * HqD, d.k + a * HkD, d.v + a * HkD, seg1, 1, L, c.Hq,
                                    c.Hkv, c.D, (float)c.scale, c.causal);
            be->ops->attn_train_bwd(be, dq1, dk1, dv1, d.dout + a * HqD, d.q + a * HqD, d.k + a * HkD, d.v + a * HkD,
                                    out1, lse1, seg1, 1, L, c.Hq, c.Hkv, c.D, (float)c.scale, c.causal);
            CHECK_MSG(bits_equal(out1, out + a * HqD, L * HqD) && bits_equal(lse1, lse + a * c.Hq, L * c.Hq) &&
                          bits_equal(dq1, dq + a * HqD, L * HqD) && bits_equal(dk1, dk + a * HkD, L * HkD) &&
                          bits_equal(dv1, dv + a * HkD, L * HkD),
                      "attn %s: a segment alone differs from the same segment in the batch", name);
            free(out), free(lse), free(dq), free(dk), free(dv), free(out1), free(lse1), free(dq1), free(dk1);
            free(dv1);
            att_free(&d);
        }
    }
}

/* ---- swiglu / gelu --------------------------------------------------------------------------------------- */

static double silu64(double g) {
    return g / (1.0 + exp(-g));
}

static double gelu64(double x) {
    return 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
}

static const float k_special[] = {0.0f, 1e-3f, -1e-3f, 1.0f, -1.0f, -1.2785f, 5.0f, -5.0f, 20.0f, -20.0f, 90.0f,
                                  -90.0f, 100.0f, -100.0f, 3.5f, -3.5f};

static void test_swiglu_gelu_bwd(void) {
    const int64_t n = 1003, ns = (int64_t)(sizeof k_special / sizeof k_special[0]);
    float        *g = fvec(n, 6), *u = fvec(n, 2), *d = fvec(n, 1);
    for (int64_t i = 0; i < ns; i++) {
        g[i] = k_special[i];
    }
    double *rg = dzeros(n), *ru = dzeros(n), *tg = dzeros(n), *rx = dzeros(n), *tx = dzeros(n);
    for (int64_t i = 0; i < n; i++) { /* central differences of each element's own float64 function */
        double gi = g[i], h = 1e-6 * (1.0 + fabs(gi)), sig = 1.0 / (1.0 + exp(-gi));
        rg[i] = (double)d[i] * u[i] * (silu64(gi + h) - silu64(gi - h)) / (2 * h);
        ru[i] = (double)d[i] * silu64(gi);
        /* floor: below about -88 the f32 forward's exp(-g) overflows and silu is -0 (true values < 1e-36) */
        tg[i] = 16 * EPS * (fabs(rg[i]) + fabs((double)d[i] * u[i]) * sig * (1.0 + fabs(gi))) + 1e3 * FLT_MIN;
        rx[i] = (double)d[i] * (gelu64(gi + h) - gelu64(gi - h)) / (2 * h);
        tx[i] = 16 * EPS * fabs((double)d[i]) * (1.0 + fabs(gi) * exp(-0.5 * gi * gi));
    }
    float *first_dg = NULL, *first_du = NULL;
    for (int32_t isa = 0; isa < N_ISA; isa++) {
        if (!g_have[isa]) {
            continue;
        }
        for (int t = 0; t < N_THR; t++) {
            caprl_backend *be = g_be[isa][t];
            float         *dg = fvec(n, 1), *du = fvec(n, 1), *dx = fvec(n, 1);
            be->ops->swiglu_bwd(be, dg, du, d, g, u, n);
            be->ops->gelu_bwd(be, dx, d, g, n);
            int bad_g = 0, bad_u = 0, bad_x = 0;
            for (int64_t i = 0; i < n; i++) {
                bad_g += !(fabs(dg[i] - rg[i]) <= tg[i]);
                bad_u += !(fabs(du[i] - ru[i]) <= 8 * EPS * fabs(ru[i]) + 1e3 * FLT_MIN);
                bad_x += !(fabs(dx[i] - rx[i]) <= tx[i]);
                if (!(fabs(dg[i] - rg[i]) <= tg[i]) && bad_g < 3) {
                    fprintf(stderr, "swiglu dgate[%lld] g=%g: %.9g vs %.9g\n", (long long)i, (double)g[i], dg[i],
                            rg[i]);
                }
            }
            CHECK_MSG(bad_g == 0 && bad_u == 0 && bad_x == 0,
                      "swiglu/gelu bwd %s %d threads: %d dgate, %d dup, %d din wrong",
                      isa_name(isa), t + 1, bad_g, bad_u, bad_x);
            /* in place: dgate over gate, dup over up; din over dout */
            float *g2 = fcopy(g, n), *u2 = fcopy(u, n), *d2 = fcopy(d, n);
            be->ops->swiglu_bwd(be, g2, u2, d, g2, u2, n);
            be->ops->gelu_bwd(be, d2, d2, g, n);
            CHECK(bits_equal(g2, dg, n) && bits_equal(u2, du, n) && bits_equal(d2, dx, n));
            /* every path and thread count gives the same bits (same operations, same exp) */
            if (!first_dg) {
                first_dg = fcopy(dg, n);
                first_du = fcopy(du, n);
            } else {
                CHECK_MSG(bits_equal(first_dg, dg, n) && bits_equal(first_du, du, n),
                          "swiglu bwd %s %d threads: differs from scalar", isa_name(isa), t + 1);
            }
            free(dg), free(du), free(dx), free(g2), free(u2), free(d2);
        }
    }
    free(first_dg), free(first_du), free(g), free(u), free(d), free(rg), free(ru), free(tg), free(rx), free(tx);
}

/* ---- logprob --------------------------------------------------------------------------------------------- */

typedef struct lp_ctx {
    const double  *z, *dlogp;
    const int32_t *target;
    int64_t        R, V;
    double         it;
} lp_ctx;

/* float64 logp / entropy / lse of row r. */
static void ref_logprob_row(const double *z, int64_t V, double it, int32_t tg, double *logp, double *ent,
                            double *lse) {
    double mx = -INFINITY, sum = 0, ws = 0;
    for (int64_t i = 0; i < V; i++) {
        mx = fmax(mx, z[i] * it);
    }
    for (int64_t i = 0; i < V; i++) {
        double e = exp(z[i] * it - mx);
        sum += e;
        ws += e * (z[i] * it - mx);
    }
    *lse = mx + log(sum);
    *logp = tg >= 0 ? z[tg] * it - *lse : 0.0;
    *ent = tg >= 0 ? log(sum) - ws / sum : 0.0;
}

static double lp_loss(const void *p) {
    const lp_ctx *c = p;
    double        L = 0;
    for (int64_t r = 0; r < c->R; r++) {
        double logp, ent, lse;
        ref_logprob_row(c->z + r * c->V, c->V, c->it, c->target[r], &logp, &ent, &lse);
        L += c->dlogp[r] * logp;
    }
    return L;
}

static void test_logprob(void) {
    static const struct {
        int64_t R, V;
        float   it, amp;
    } cases[] = {{6, 37, 1.0f, 3.0f}, {6, 37, 0.7f, 3.0f}, {5, 3001, 1.3f, 8.0f}, {3, 8, 1.0f, 1.0f},
                 {4, 5, 2.0f, 1.0f}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        int64_t  R = cases[ci].R, V = cases[ci].V;
        float    it = cases[ci].it;
        float   *z = fvec(R * V, cases[ci].amp), *dlogp = fvec(R, 1);
        int32_t *tg = malloc((size_t)R * sizeof(int32_t));
        for (int64_t r = 0; r < R; r++) {
            tg[r] = r == 1 ? -1 : irand((int)V);
        }
        dlogp[R - 1] = 0.0f; /* a zero coefficient gives a zero row */
        z[2 * V + 1] = 40.0f; /* a peaked row: small entropy */
        double *zd = dvec(z, R * V), *dld = dvec(dlogp, R), *g = dzeros(R * V);
        double *rlogp = dzeros(R), *rent = dzeros(R), *rlse = dzeros(R);
        double  smax = 0;
        for (int64_t i = 0; i < R * V; i++) {
            smax = fmax(smax, fabs(zd[i] * it));
        }
        for (int64_t r = 0; r < R; r++) {
            ref_logprob_row(zd + r * V, V, it, tg[r], &rlogp[r], &rent[r], &rlse[r]);
        }
        lp_ctx ctx = {.z = zd, .dlogp = dld, .target = tg, .R = R, .V = V, .it = it};
        if (V < 100) {
            fd_grad(zd, R * V, lp_loss, &ctx, g);
        } else { /* the same formula analytically: dlogp * it * (onehot - softmax) */
            for (int64_t r = 0; r < R; r++) {
                for (int64_t i = 0; i < V && tg[r] >= 0; i++) {
                    g[r * V + i] = dld[r] * it * ((i == tg[r]) - exp(zd[r * V + i] * it - rlse[r]));
                }
            }
        }
        double kf = (double)V / 8 + 16;
        for (int32_t isa = 0; isa < N_ISA; isa++) {
            if (!g_have[isa]) {
                continue;
            }
            float *lp[N_THR], *ent[N_THR], *lse[N_THR], *zg[N_THR];
            for (int t = 0; t < N_THR; t++) {
                caprl_backend *be = g_be[isa][t];
                lp[t] = fvec(R, 1);
                ent[t] = fvec(R, 1);
                lse[t] = fvec(R, 1);
                zg[t] = fcopy(z, R * V);
                be->ops->logprob_fwd(be, lp[t], ent[t], lse[t], z, tg, R, V, it);
                be->ops->logprob_bwd(be, zg[t], lse[t], tg, dlogp, NULL, R, V, it);
            }
            char what[96];
            snprintf(what, sizeof what, "logprob %s V=%lld it=%g", isa_name(isa), (long long)V, (double)it);
            /* lse: rounding of s = z * it (eps |s|, weighted by p), the sum (kf eps relative), logf and the add;
             * entropy: the p-weighted sum of (s - mx) adds kf eps |s - mx| <= 2 kf eps smax. */
            int bad = 0;
            for (int64_t r = 0; r < R; r++) {
                double tol = 4 * EPS * (kf + smax + fabs(rlse[r]));
                bad += !(fabs(lse[0][r] - rlse[r]) <= tol);
                bad += !(fabs(lp[0][r] - rlogp[r]) <= tol + 4 * EPS * fabs(rlogp[r]));
                bad += !(fabs(ent[0][r] - rent[r]) <= 4 * EPS * kf * (1.0 + 2.0 * smax));
                if (tg[r] < 0) {
                    bad += lp[0][r] != 0.0f || ent[0][r] != 0.0f;
                }
            }
            CHECK_MSG(bad == 0, "%s: %d wrong logp / entropy / lse", what, bad);
            /* gradient c (onehot - p): p's relative error is about eps (|s_i| + |lse| + kf); plus 1e-8 |c| for the
             * finite differences' own error (float64 rounding over h = 1e-5) */
            int bad_g = 0;
            for (int64_t r = 0; r < R; r++) {
                double c = (double)dlogp[r] * it;
                for (int64_t i = 0; i < V && tg[r] >= 0; i++) {
                    double s = zd[r * V + i] * it, p = exp(s - rlse[r]);
                    double tol =
                        4 * EPS * fabs(c) * (p * (kf + fabs(s) + fabs(rlse[r])) + (i == tg[r])) + 1e-8 * fabs(c);
                    if (!(fabs(zg[0][r * V + i] - g[r * V + i]) <= tol) && bad_g++ < 3) {
                        fprintf(stderr, "%s: grad[%lld][%lld] = %.9g, want %.9g (tol %.3g)\n", what, (long long)r,
                                (long long)i, (double)zg[0][r * V + i], g[r * V + i], tol);
                    }
                }
            }
            CHECK_MSG(bad_g == 0, "%s: %d wrong gradient elements", what, bad_g);
            for (int64_t i = 0; i < V; i++) {
                bad += zg[0][1 * V + i] != 0.0f || zg[0][(R - 1) * V + i] != 0.0f;
            }
            CHECK_MSG(bad == 0, "%s: rows without a target or with dlogp 0 must be zero", what);
            for (int t = 1; t < N_THR; t++) {
                CHECK_MSG(bits_equal(lp[0], lp[t], R) && bits_equal(ent[0], ent[t], R) &&
                              bits_equal(lse[0], lse[t], R) &&
                              bits_equal(zg[0], zg[t], R * V),
                          "%s: %d threads differ", what, t + 1);
            }
            /* entropy may be NULL */
            g_be[isa][0]->ops->logprob_fwd(g_be[isa][0], lp[1], NULL, lse[1], z, tg, R, V, it);
            CHECK(bits_equal(lp[0], lp[1], R) && bits_equal(lse[0], lse[1], R));
            for (int t = 0; t < N_THR; t++) {
                free(lp[t]), free(ent[t]), free(lse[t]), free(zg[t]);
            }
        }
        free(z), free(dlogp), free(tg), free(zd), free(dld), free(g), free(rlogp), free(rent), free(rlse);
    }
}

int main(void) {
    make_backends();
    test_matmul_fd();
    test_matmul_big();
    test_amx_packing();
    test_matmul_bwd_bf16_unit();
    test_embed_bwd();
    test_rmsnorm_bwd();
    test_rope_bwd();
    test_attn_fd();
    test_attn_big();
    test_swiglu_gelu_bwd();
    test_logprob();
    free_backends();
    return test_finish("test_ops_bwd");
}
