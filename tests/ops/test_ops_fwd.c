/* Forward ops of the CPU backend against float64 references written here, on every ISA level this machine has
 * (scalar, AVX2, AVX-512; AMX when usable): matmul (f32 / bf16 weights, bias, odd shapes), embed, rmsnorm, rope,
 * attention (GQA, odd D, per-row kv windows), swiglu, add. Also the determinism contract: bit-identical results
 * for 1, 2 and 3 threads, and row m of a batched call bit-identical to the same row computed alone or in a
 * block of 16. Tolerances derive from float32 epsilon and the reduction length. */
#include <float.h>

#include "amx_util.h"
#include "backend/backend.h"
#include "backend/gemm_impl.h"
#include "caprl/tensor.h"
#include "caprl_test.h"
#include "ops/ops_impl.h"

#define EPS ((double)FLT_EPSILON)

/* ---- helpers --------------------------------------------------------------------------------------------- */

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static float frand(void) { /* uniform in [-1, 1) */
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((double)(g_rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static int irand(int n) {
    return (int)((frand() + 1.0f) * 0.5f * (float)n) % n;
}

static float *fvec(int64_t n) {
    float *p = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        p[i] = frand();
    }
    return p;
}

static bool bits_equal(const float *a, const float *b, int64_t n) {
    return memcmp(a, b, (size_t)n * sizeof(float)) == 0;
}

static const char *isa_name(int32_t isa) {
    return isa == CAPRL_ISA_AVX512 ? "avx512" : isa == CAPRL_ISA_AVX2 ? "avx2" : "scalar";
}

/* One backend per (ISA level, thread count); levels the machine lacks collapse into the one below and are
 * skipped. AMX off here: it changes the numerics and has its own test. */
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

typedef struct wbuf {
    caprl_weight w;
    float       *f;  /* the weight's values as f32 (N, K) */
    uint16_t    *h;  /* bf16 storage when dtype is BF16 */
} wbuf;

static wbuf make_weight(int64_t N, int64_t K, int32_t dtype) {
    wbuf b = {0};
    b.f = fvec(N * K);
    if (dtype == CAPRL_DTYPE_BF16) {
        b.h = malloc((size_t)(N * K > 0 ? N * K : 1) * sizeof(uint16_t));
        for (int64_t i = 0; i < N * K; i++) {
            b.h[i] = caprl_f32_to_bf16(b.f[i]);
            b.f[i] = caprl_bf16_to_f32(b.h[i]);
        }
    }
    b.w.dtype = dtype;
    b.w.rows = N;
    b.w.cols = K;
    b.w.data = dtype == CAPRL_DTYPE_BF16 ? (const void *)b.h : (const void *)b.f;
    return b;
}

static void free_weight(wbuf *b) {
    free(b->f);
    free(b->h);
}

/* Checks out (M, N) against a float64 reference: |err| <= (K + 2) eps sum|a b| + eps |bias| + tiny. With
 * round_in, the activations are first rounded to bf16 (the AMX operand rule). Returns the failures. */
static int check_matmul(const float *out, const float *in, const wbuf *wb, const float *bias, int64_t M, int64_t N,
                        int64_t K, bool round_in, const char *what) {
    int bad = 0;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t n = 0; n < N; n++) {
            double s = 0, sa = 0;
            for (int64_t k = 0; k < K; k++) {
                double a = round_in ? caprl_bf16_to_f32(caprl_f32_to_bf16(in[m * K + k])) : in[m * K + k];
                double p = a * wb->f[n * K + k];
                s += p;
                sa += fabs(p);
            }
            double bz = bias ? bias[n] : 0.0;
            double tol = (double)(K + 2) * EPS * sa + EPS * fabs(bz) + 1e-30;
            double got = out[m * N + n];
            if (!(fabs(got - (s + bz)) <= tol)) {
                if (bad++ < 3) {
                    fprintf(stderr, "%s: M=%lld N=%lld K=%lld out[%lld][%lld] = %.9g, want %.9g (tol %.3g)\n", what,
                            (long long)M, (long long)N, (long long)K, (long long)m, (long long)n, got, s + bz, tol);
                }
            }
        }
    }
    return bad;
}

static void test_matmul_shapes(void) {
    static const int64_t dims[] = {1, 2, 3, 5, 7, 13, 17, 31, 33, 64, 100, 129};
    static const int64_t ks[] = {1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 129, 200};
    const int            nd = (int)(sizeof dims / sizeof dims[0]), nk = (int)(sizeof ks / sizeof ks[0]);
    int                  combos = 0;
    for (int im = 0; im < nd; im++) {
        for (int in_ = 0; in_ < nd; in_++) {
            int64_t M = dims[im], N = dims[in_], K = ks[(im * 5 + in_ * 3) % nk];
            int32_t dtype = (im + in_) % 2 ? CAPRL_DTYPE_BF16 : CAPRL_DTYPE_F32;
            bool    with_bias = (im + 2 * in_) % 3 != 0;
            wbuf    wb = make_weight(N, K, dtype);
            float  *in = fvec(M * K), *bias = with_bias ? fvec(N) : NULL;
            float  *out = malloc((size_t)(M * N) * sizeof(float));
            for (int32_t isa = 0; isa < N_ISA; isa++) {
                if (!g_have[isa]) {
                    continue;
                }
                caprl_backend *be = g_be[isa][0];
                be->ops->matmul_fwd(be, out, in, &wb.w, bias, M);
                char what[64];
                snprintf(what, sizeof what, "matmul %s %s%s", isa_name(isa), caprl_dtype_name(dtype),
                         with_bias ? " +bias" : "");
                int bad = check_matmul(out, in, &wb, bias, M, N, K, false, what);
                CHECK_MSG(bad == 0, "%s: %d wrong outputs", what, bad);
            }
            combos++;
            free(out);
            free(in);
            free(bias);
            free_weight(&wb);
        }
    }
    CHECK(combos == nd * nd);
}

/* Bit-identity: 1 vs 2 vs 3 threads; row m of an M=37 (or 70) call vs the row alone, inside a 16-row call and
 * inside a 5-row call; on shapes that exercise the edge tiles, the K tail, K chunking (K > 1024), the widened-bf16
 * path (M > 16) and the on-the-fly one (M <= 16). */
static void test_matmul_determinism(void) {
    static const struct {
        int64_t N, K;
    } shapes[] = {{50, 133}, {7, 1000}, {97, 64}, {40, 3001}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        for (int32_t dtype = CAPRL_DTYPE_F32; dtype <= CAPRL_DTYPE_BF16; dtype++) {
            int64_t N = shapes[s].N, K = shapes[s].K, M = s == 0 ? 70 : 37; /* 70: two row blocks, the last small */
            wbuf    wb = make_weight(N, K, dtype);
            float  *in = fvec(M * K), *bias = fvec(N);
            float  *ref = malloc((size_t)(M * N) * sizeof(float)), *got = malloc((size_t)(M * N) * sizeof(float));
            for (int32_t isa = 0; isa < N_ISA; isa++) {
                if (!g_have[isa]) {
                    continue;
                }
                g_be[isa][0]->ops->matmul_fwd(g_be[isa][0], ref, in, &wb.w, bias, M);
                CHECK(check_matmul(ref, in, &wb, bias, M, N, K, false, "determinism shape") == 0);
                for (int t = 1; t < N_THR; t++) {
                    memset(got, 0xFF, (size_t)(M * N) * sizeof(float));
                    g_be[isa][t]->ops->matmul_fwd(g_be[isa][t], got, in, &wb.w, bias, M);
                    CHECK_MSG(bits_equal(ref, got, M * N), "%s %s N=%lld K=%lld: %d threads differ from 1",
                              isa_name(isa), caprl_dtype_name(dtype), (long long)N, (long long)K, t + 1);
                }
                for (int t = 0; t < N_THR; t += 1) {
                    caprl_backend *be = g_be[isa][t];
                    bool           rows_ok = true, blocks_ok = true, small_ok = true;
                    for (int64_t m = 0; m < M; m++) {
                        be->ops->matmul_fwd(be, got, in + m * K, &wb.w, bias, 1);
                        rows_ok = rows_ok && bits_equal(got, ref + m * N, N);
                    }
                    for (int64_t m0 = 0; m0 + 16 <= M; m0 += 7) {
                        be->ops->matmul_fwd(be, got, in + m0 * K, &wb.w, bias, 16);
                        blocks_ok = blocks_ok && bits_equal(got, ref + m0 * N, 16 * N);
                    }
                    for (int64_t m0 = 0; m0 + 5 <= M; m0 += 11) {
                        be->ops->matmul_fwd(be, got, in + m0 * K, &wb.w, bias, 5);
                        small_ok = small_ok && bits_equal(got, ref + m0 * N, 5 * N);
                    }
                    CHECK_MSG(rows_ok && blocks_ok && small_ok,
                              "%s %s N=%lld K=%lld threads=%d: batched rows differ (M=1 %d, M=16 %d, M=5 %d)",
                              isa_name(isa), caprl_dtype_name(dtype), (long long)N, (long long)K, t + 1, rows_ok,
                              blocks_ok, small_ok);
                }
            }
            free(ref);
            free(got);
            free(in);
            free(bias);
            free_weight(&wb);
        }
    }
}

/* Degenerate sizes: K = 0 gives the bias (or zeros); M = 0 writes nothing; weight_prepare without AMX is a
 * no-op. */
static void test_matmul_edges(void) {
    caprl_backend *be = g_be[0][0];
    caprl_weight   w = {.dtype = CAPRL_DTYPE_F32, .rows = 3, .cols = 0, .data = NULL};
    float          bias[3] = {1.5f, -2.0f, 0.25f}, out[6] = {9, 9, 9, 9, 9, 9}, in[1] = {0};
    be->ops->matmul_fwd(be, out, in, &w, bias, 2);
    CHECK(out[0] == 1.5f && out[4] == -2.0f && out[5] == 0.25f);
    be->ops->matmul_fwd(be, out, in, &w, NULL, 2);
    CHECK(out[0] == 0.0f && out[5] == 0.0f);
    out[0] = 7.0f;
    be->ops->matmul_fwd(be, out, in, &w, bias, 0);
    CHECK(out[0] == 7.0f);
    wbuf        wb = make_weight(4, 8, CAPRL_DTYPE_BF16);
    caprl_error err = {0};
    CHECK_OK(be->ops->weight_prepare(be, &wb.w, &err), &err);
    CHECK(wb.w.packed == NULL);
    be->ops->weight_release(be, &wb.w);
    free_weight(&wb);
}

/* The bf16 matrix unit (AMX, or vdpbf16ps on AVX512-BF16 CPUs without AMX; only where there is one): bf16
 * activations x bf16 weights, checked against the reference with the inputs rounded to bf16, plus the same
 * determinism contract as the f32 kernels (any thread count, rows alone or in any batch). */
static void test_matmul_bf16_unit(void) {
    caprl_error    err = {0};
    caprl_backend *be1 = NULL, *be3 = NULL;
    CHECK_OK(bf16_unit_backends(&be1, &be3, &err), &err);
    if (!bf16_unit_or_skip(be1, be3, "bf16-unit matmul test")) {
        return;
    }
    bool        amx = caprl_backend_cpu_amx(be1);
    const char *unit = amx ? "amx-bf16" : "avx512-bf16";
    static const struct {
        int64_t M, N, K;
    } shapes[] = {{1, 1, 1},       {37, 50, 133},  {5, 100, 64},  {70, 33, 31},
                  {16, 129, 200}, {100, 64, 1000}, {23, 30, 2100}, {61, 7, 4161}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t M = shapes[s].M, N = shapes[s].N, K = shapes[s].K;
        wbuf    wb = make_weight(N, K, CAPRL_DTYPE_BF16);
        CHECK_OK(be1->ops->weight_prepare(be1, &wb.w, &err), &err);
        CHECK(amx == (wb.w.packed != NULL)); /* only AMX packs */
        float *in = fvec(M * K), *bias = s % 2 ? fvec(N) : NULL;
        if (s == 2) { /* halfway cases: rounding to nearest even, not away, moves each by 2^-8 relative */
            for (int64_t i = 0; i < M * K; i++) {
                in[i] = ldexpf(i % 3 ? 1.0f + 0x1p-8f : 1.0f + 0x3p-8f, (int)(i % 7) - 3) * (i % 2 ? -1.0f : 1.0f);
            }
        }
        float *ref = malloc((size_t)(M * N) * sizeof(float)), *got = malloc((size_t)(M * N) * sizeof(float));
        be1->ops->matmul_fwd(be1, ref, in, &wb.w, bias, M);
        int bad = check_matmul(ref, in, &wb, bias, M, N, K, true, unit);
        CHECK_MSG(bad == 0, "%s M=%lld N=%lld K=%lld: %d wrong outputs", unit, (long long)M, (long long)N,
                  (long long)K, bad);
        be3->ops->matmul_fwd(be3, got, in, &wb.w, bias, M);
        CHECK_MSG(bits_equal(ref, got, M * N), "%s: 3 threads differ from 1", unit);
        bool rows_ok = true;
        for (int64_t m = 0; m < M; m++) {
            be3->ops->matmul_fwd(be3, got, in + m * K, &wb.w, bias, 1);
            rows_ok = rows_ok && bits_equal(got, ref + m * N, N);
        }
        for (int64_t m0 = 0; m0 + 5 <= M; m0 += 5) { /* row groups of 4 and a leftover row */
            be1->ops->matmul_fwd(be1, got, in + m0 * K, &wb.w, bias, 5);
            rows_ok = rows_ok && bits_equal(got, ref + m0 * N, 5 * N);
        }
        CHECK_MSG(rows_ok, "%s M=%lld N=%lld K=%lld: rows computed alone differ", unit, (long long)M, (long long)N,
                  (long long)K);
        be1->ops->weight_release(be1, &wb.w);
        CHECK(wb.w.packed == NULL);
        free(ref);
        free(got);
        free(in);
        free(bias);
        free_weight(&wb);
    }
    caprl_backend_free(be1);
    caprl_backend_free(be3);
}

/* ---- embed, rmsnorm, rope -------------------------------------------------------------------------------- */

static void test_embed(void) {
    int64_t V = 37, C = 19, M = 23;
    for (int32_t dtype = CAPRL_DTYPE_F32; dtype <= CAPRL_DTYPE_BF16; dtype++) {
        wbuf     wb = make_weight(V, C, dtype);
        int32_t *ids = malloc((size_t)M * sizeof(int32_t));
        for (int64_t m = 0; m < M; m++) {
            ids[m] = m == 0 ? 0 : m == 1 ? (int32_t)(V - 1) : irand((int)V);
        }
        float *out = malloc((size_t)(M * C) * sizeof(float));
        for (int32_t t = 0; t < N_THR; t++) {
            memset(out, 0xFF, (size_t)(M * C) * sizeof(float));
            g_be[0][t]->ops->embed_fwd(g_be[0][t], out, ids, &wb.w, M);
            bool ok = true;
            for (int64_t m = 0; m < M; m++) {
                ok = ok && bits_equal(out + m * C, wb.f + ids[m] * C, C);
            }
            CHECK_MSG(ok, "embed %s threads=%d", caprl_dtype_name(dtype), t + 1);
        }
        free(out);
        free(ids);
        free_weight(&wb);
    }
}

static void test_rmsnorm(void) {
    static const int64_t cs[] = {1, 7, 8, 9, 64, 100, 896};
    for (size_t ci = 0; ci < sizeof cs / sizeof cs[0]; ci++) {
        int64_t C = cs[ci], M = 9;
        float  *x = fvec(M * C), *w = fvec(C), *y = malloc((size_t)(M * C) * sizeof(float));
        float  *y1 = malloc((size_t)(M * C) * sizeof(float));
        float   eps = 1e-6f;
        for (int64_t i = 0; i < C; i++) { /* a row with large values: rsqrt must not overflow */
            x[i] *= 1e15f;
        }
        for (int32_t isa = 0; isa < N_ISA; isa++) {
            if (!g_have[isa]) {
                continue;
            }
            caprl_backend *be = g_be[isa][0];
            be->ops->rmsnorm_fwd(be, y, x, w, M, C, eps);
            int bad = 0;
            for (int64_t m = 0; m < M; m++) {
                double ss = 0;
                for (int64_t i = 0; i < C; i++) {
                    ss += (double)x[m * C + i] * x[m * C + i];
                }
                double r = 1.0 / sqrt(ss / (double)C + (double)eps);
                for (int64_t i = 0; i < C; i++) {
                    double want = (double)x[m * C + i] * r * w[i];
                    double tol = fabs(want) * ((double)C / 2 + 6) * EPS + 1e-37;
                    bad += !(fabs(y[m * C + i] - want) <= tol);
                }
            }
            CHECK_MSG(bad == 0, "rmsnorm %s C=%lld: %d wrong", isa_name(isa), (long long)C, bad);
            for (int t = 1; t < N_THR; t++) {
                g_be[isa][t]->ops->rmsnorm_fwd(g_be[isa][t], y1, x, w, M, C, eps);
                CHECK(bits_equal(y, y1, M * C));
            }
            memcpy(y1, x, (size_t)(M * C) * sizeof(float)); /* in place */
            be->ops->rmsnorm_fwd(be, y1, y1, w, M, C, eps);
            CHECK(bits_equal(y, y1, M * C));
            be->ops->rmsnorm_fwd(be, y1, x + 3 * C, w, 1, C, eps); /* one row alone */
            CHECK(bits_equal(y + 3 * C, y1, C));
        }
        free(x);
        free(w);
        free(y);
        free(y1);
    }
}

static void test_rope(void) {
    static const int64_t ds[] = {2, 8, 20, 64, 80, 128};
    for (size_t di = 0; di < sizeof ds / sizeof ds[0]; di++) {
        int64_t  D = ds[di], H = 3, M = 11, half = D / 2;
        float   *inv = malloc((size_t)half * sizeof(float));
        int32_t *pos = malloc((size_t)M * sizeof(int32_t));
        for (int64_t j = 0; j < half; j++) {
            inv[j] = 1.0f / powf(1000000.0f, (float)(2 * j) / (float)D);
        }
        for (int64_t m = 0; m < M; m++) {
            pos[m] = m < 3 ? (int32_t)m : irand(100000);
        }
        float *x = fvec(M * H * D), *y = malloc((size_t)(M * H * D) * sizeof(float));
        for (int32_t isa = 0; isa < N_ISA; isa++) {
            if (!g_have[isa]) {
                continue;
            }
            memcpy(y, x, (size_t)(M * H * D) * sizeof(float));
            g_be[isa][0]->ops->rope_fwd(g_be[isa][0], y, pos, inv, M, H, D);
            int bad = 0;
            for (int64_t m = 0; m < M; m++) {
                for (int64_t h = 0; h < H; h++) {
                    const float *xr = x + (m * H + h) * D;
                    const float *yr = y + (m * H + h) * D;
                    for (int64_t j = 0; j < half; j++) {
                        float  angle = (float)pos[m] * inv[j]; /* the f32 angle rule */
                        double c = cos((double)angle), s = sin((double)angle);
                        double a = xr[j], b = xr[j + half];
                        double tol = 4 * EPS * (fabs(a) + fabs(b)) + 1e-30;
                        bad += !(fabs(yr[j] - (a * c - b * s)) <= tol);
                        bad += !(fabs(yr[j + half] - (b * c + a * s)) <= tol);
                    }
                }
            }
            CHECK_MSG(bad == 0, "rope %s D=%lld: %d wrong", isa_name(isa), (long long)D, bad);
            float *y2 = malloc((size_t)(M * H * D) * sizeof(float));
            memcpy(y2, x, (size_t)(M * H * D) * sizeof(float));
            g_be[isa][2]->ops->rope_fwd(g_be[isa][2], y2, pos, inv, M, H, D);
            CHECK(bits_equal(y, y2, M * H * D));
            free(y2);
        }
        if (g_have[CAPRL_ISA_AVX2]) { /* no fused ops: the vector path equals the scalar one */
            float *y2 = malloc((size_t)(M * H * D) * sizeof(float));
            memcpy(y, x, (size_t)(M * H * D) * sizeof(float));
            memcpy(y2, x, (size_t)(M * H * D) * sizeof(float));
            g_be[0][0]->ops->rope_fwd(g_be[0][0], y, pos, inv, M, H, D);
            g_be[CAPRL_ISA_AVX2][0]->ops->rope_fwd(g_be[CAPRL_ISA_AVX2][0], y2, pos, inv, M, H, D);
            CHECK(bits_equal(y, y2, M * H * D));
            free(y2);
        }
        free(inv);
        free(pos);
        free(x);
        free(y);
    }
}

/* ---- attention ------------------------------------------------------------------------------------------- */

typedef struct attn_case {
    int64_t M, Hq, Hkv, D, T; /* T: rows in the KV buffer */
    int64_t stride;
    float  *q, *k, *v;
    int64_t *row0;
    int32_t *len;
} attn_case;

static attn_case make_attn(int64_t M, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_len) {
    attn_case a = {.M = M, .Hq = Hq, .Hkv = Hkv, .D = D};
    a.stride = Hkv * D + 3; /* padded rows: the kernel must honour kv_stride */
    a.T = max_len + 12;
    a.q = fvec(M * Hq * D);
    a.k = fvec(a.T * a.stride);
    a.v = fvec(a.T * a.stride);
    for (int64_t i = 0; i < a.T * a.stride; i++) {
        a.k[i] *= 3.0f; /* spread the scores so the softmax is not flat */
    }
    a.row0 = malloc((size_t)M * sizeof(int64_t));
    a.len = malloc((size_t)M * sizeof(int32_t));
    for (int64_t m = 0; m < M; m++) {
        a.len[m] = m == 0 ? 1 : m == 1 ? (int32_t)max_len : 1 + irand((int)max_len);
        a.row0[m] = irand(12);
    }
    return a;
}

static void free_attn(attn_case *a) {
    free(a->q);
    free(a->k);
    free(a->v);
    free(a->row0);
    free(a->len);
}

static void run_attn(caprl_backend *be, float *out, const attn_case *a, float scale) {
    be->ops->attn_fwd(be, out, a->q, a->k, a->v, a->row0, a->len, a->stride, a->M, a->Hq, a->Hkv, a->D, scale);
}

static int check_attn(const float *out, const attn_case *a, float scale) {
    int     bad = 0;
    double *p = malloc((size_t)(a->T + 1) * sizeof(double));
    for (int64_t m = 0; m < a->M; m++) {
        for (int64_t h = 0; h < a->Hq; h++) {
            int64_t      g = h / (a->Hq / a->Hkv), n = a->len[m];
            const float *qv = a->q + (m * a->Hq + h) * a->D;
            double       mx = -INFINITY, sum = 0, ds_max = 0, vmax = 0;
            for (int64_t i = 0; i < n; i++) {
                const float *kr = a->k + (a->row0[m] + i) * a->stride + g * a->D;
                double       s = 0, sa = 0;
                for (int64_t d = 0; d < a->D; d++) {
                    s += (double)qv[d] * kr[d];
                    sa += fabs((double)qv[d] * kr[d]);
                }
                p[i] = s * scale;
                mx = p[i] > mx ? p[i] : mx;
                double ds = ((double)a->D + 2) * EPS * sa * scale;
                ds_max = ds > ds_max ? ds : ds_max;
            }
            for (int64_t i = 0; i < n; i++) {
                p[i] = exp(p[i] - mx);
                sum += p[i];
            }
            for (int64_t i = 0; i < n; i++) {
                const float *vr = a->v + (a->row0[m] + i) * a->stride + g * a->D;
                for (int64_t d = 0; d < a->D; d++) {
                    vmax = fabs(vr[d]) > vmax ? fabs(vr[d]) : vmax;
                }
            }
            /* score errors perturb each p_i by a relative 2 ds (+ exp's few ulp); the sums add n roundings */
            double tol = (4 * ds_max + 8 * EPS + ((double)n + 4) * EPS) * vmax + 1e-30;
            for (int64_t d = 0; d < a->D; d++) {
                double want = 0;
                for (int64_t i = 0; i < n; i++) {
                    want += p[i] * a->v[(a->row0[m] + i) * a->stride + g * a->D + d];
                }
                want /= sum;
                double got = out[(m * a->Hq + h) * a->D + d];
                if (!(fabs(got - want) <= tol) && bad++ < 3) {
                    fprintf(stderr, "attn m=%lld h=%lld d=%lld: %.9g want %.9g tol %.3g\n", (long long)m,
                            (long long)h, (long long)d, got, want, tol);
                }
            }
        }
    }
    free(p);
    return bad;
}

static void test_attention(void) {
    static const struct {
        int64_t M, Hq, Hkv, D, max_len;
    } cases[] = {{7, 6, 2, 8, 9},     {9, 14, 2, 64, 40},  {5, 6, 2, 20, 17},  {6, 4, 4, 80, 33},
                 {4, 2, 1, 3, 5},     {20, 6, 2, 64, 50},  {3, 14, 2, 128, 70}, {5, 4, 2, 150, 23},
                 {8, 18, 2, 12, 30},  {6, 16, 1, 64, 37},  {9, 10, 2, 80, 21},  {7, 8, 4, 8, 11},
                 {5, 12, 3, 24, 140}, {4, 14, 2, 64, 200}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        attn_case a = make_attn(cases[ci].M, cases[ci].Hq, cases[ci].Hkv, cases[ci].D, cases[ci].max_len);
        float     scale = 1.0f / sqrtf((float)a.D);
        int64_t   n_out = a.M * a.Hq * a.D;
        float    *out = malloc((size_t)n_out * sizeof(float)), *o2 = malloc((size_t)n_out * sizeof(float));
        float    *avx2 = malloc((size_t)n_out * sizeof(float));
        for (int32_t isa = 0; isa < N_ISA; isa++) {
            if (!g_have[isa]) {
                continue;
            }
            run_attn(g_be[isa][0], out, &a, scale);
            int bad = check_attn(out, &a, scale);
            CHECK_MSG(bad == 0, "attention %s case %zu: %d wrong", isa_name(isa), ci, bad);
            /* AVX-512 (GQA groups of heads at once) computes AVX2's arithmetic */
            if (isa == CAPRL_ISA_AVX2) {
                memcpy(avx2, out, (size_t)n_out * sizeof(float));
            } else if (isa == CAPRL_ISA_AVX512 && g_have[CAPRL_ISA_AVX2]) {
                CHECK_MSG(bits_equal(out, avx2, n_out), "attention case %zu: AVX-512 differs from AVX2", ci);
            }
            for (int t = 1; t < N_THR; t++) {
                memset(o2, 0xFF, (size_t)n_out * sizeof(float));
                run_attn(g_be[isa][t], o2, &a, scale);
                CHECK_MSG(bits_equal(out, o2, n_out), "attention %s case %zu: %d threads differ", isa_name(isa),
                          ci, t + 1);
            }
            /* each query row alone gives the same bits */
            bool rows_ok = true;
            for (int64_t m = 0; m < a.M; m++) {
                g_be[isa][1]->ops->attn_fwd(g_be[isa][1], o2, a.q + m * a.Hq * a.D, a.k, a.v, a.row0 + m,
                                            a.len + m, a.stride, 1, a.Hq, a.Hkv, a.D, scale);
                rows_ok = rows_ok && bits_equal(o2, out + m * a.Hq * a.D, a.Hq * a.D);
            }
            CHECK_MSG(rows_ok, "attention %s case %zu: single rows differ", isa_name(isa), ci);
        }
        free(out);
        free(o2);
        free(avx2);
        free_attn(&a);
    }
    /* kv_len 0 gives zeros, not NaN */
    attn_case a = make_attn(2, 2, 1, 8, 4);
    a.len[1] = 0;
    float out[2 * 2 * 8];
    for (int32_t isa = 0; isa < N_ISA; isa++) {
        if (g_have[isa]) {
            run_attn(g_be[isa][0], out, &a, 0.5f);
            CHECK(out[2 * 8] == 0.0f && out[4 * 8 - 1] == 0.0f);
        }
    }
    free_attn(&a);
}

/* ---- swiglu, add, exp ------------------------------------------------------------------------------------ */

static void test_exp(void) {
    int bad = 0;
    for (int i = 0; i <= 200000; i++) {
        float  x = -103.0f + (float)i * (88.7f + 103.0f) / 200000.0f;
        double want = exp((double)x);
        double got = caprl_expf_ref(x);
        double tol = want >= (double)FLT_MIN ? 3 * EPS * want : 1.5e-45; /* subnormal results: absolute */
        bad += !(fabs(got - want) <= tol);
    }
    CHECK_MSG(bad == 0, "expf_ref: %d values off by more than 3 ulp", bad);
    CHECK(caprl_expf_ref(0.0f) == 1.0f);
    CHECK(caprl_expf_ref(-200.0f) == 0.0f);
    CHECK(isinf(caprl_expf_ref(89.0f)) && isinf(caprl_expf_ref(INFINITY)));
    CHECK(caprl_expf_ref(-INFINITY) == 0.0f);
    CHECK(isnan(caprl_expf_ref(NAN)));
    CHECK(caprl_expf_ref(88.7f) < INFINITY && caprl_expf_ref(88.7f) > 3.0e38f);
}

static void test_swiglu_add(void) {
    int64_t n = 100003; /* large enough to run on several threads, odd for the tail */
    float  *g = fvec(n), *u = fvec(n), *out = malloc((size_t)n * sizeof(float));
    float  *o2 = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        g[i] *= i % 5 == 0 ? 100.0f : 8.0f;
    }
    g[0] = 0.0f;
    g[1] = -0.0f;
    g[2] = NAN;
    g[3] = 95.0f;
    g[4] = -95.0f;
    for (int32_t isa = 0; isa < N_ISA; isa++) {
        if (!g_have[isa]) {
            continue;
        }
        g_be[isa][0]->ops->swiglu_fwd(g_be[isa][0], out, g, u, n);
        int bad = 0;
        for (int64_t i = 3; i < n; i++) {
            double want = (double)g[i] / (1.0 + exp(-(double)g[i])) * u[i];
            /* for g < -88.72 exp(-g) overflows f32 and the f32 formula gives -0: |g u| / FLT_MAX absolute */
            double tol = 8 * EPS * fabs(want) + 2 * fabs((double)g[i] * u[i]) / (double)FLT_MAX;
            if (!(fabs(out[i] - want) <= tol) && bad++ < 3) {
                fprintf(stderr, "swiglu(%.9g, %.9g) = %.9g, want %.9g\n", g[i], u[i], out[i], want);
            }
        }
        CHECK_MSG(bad == 0, "swiglu %s: %d wrong", isa_name(isa), bad);
        CHECK(out[0] == 0.0f && isnan(out[2]));
        for (int t = 1; t < N_THR; t++) {
            g_be[isa][t]->ops->swiglu_fwd(g_be[isa][t], o2, g, u, n);
            CHECK(bits_equal(out, o2, n));
        }
        if (isa > 0) { /* the vector exp performs the scalar one's exact operations */
            g_be[0][0]->ops->swiglu_fwd(g_be[0][0], o2, g, u, n);
            CHECK_MSG(bits_equal(out, o2, n), "swiglu %s differs from the scalar path", isa_name(isa));
        }
        memcpy(o2, g, (size_t)n * sizeof(float)); /* out aliasing gate */
        g_be[isa][1]->ops->swiglu_fwd(g_be[isa][1], o2, o2, u, n);
        CHECK(bits_equal(out, o2, n));

        memcpy(o2, u, (size_t)n * sizeof(float));
        g_be[isa][2]->ops->add_fwd(g_be[isa][2], o2, g, n);
        bool ok = true;
        for (int64_t i = 3; i < n; i++) {
            ok = ok && o2[i] == u[i] + g[i];
        }
        CHECK_MSG(ok, "add %s", isa_name(isa));
    }
    free(g);
    free(u);
    free(out);
    free(o2);
}

/* CAPRL_PROFILE=1: a backend created under it logs, when freed, each op's calls and time, matmuls split by unit
 * and by row count (<= 16 rows: decode) with their GFLOP/s; without it, nothing is logged. */
static char g_log[8192];

static void capture_log(int32_t level, const char *msg, void *user_data) {
    (void)level, (void)user_data;
    size_t used = strlen(g_log);
    snprintf(g_log + used, sizeof g_log - used, "%s\n", msg);
}

static void profile_matmuls(void) {
    caprl_error    err = {0};
    caprl_backend *be = NULL;
    float         *x = fvec(20 * 24), *wf = fvec(40 * 24), *y = fvec(20 * 40);
    caprl_weight   w = {.dtype = CAPRL_DTYPE_F32, .rows = 40, .cols = 24, .data = wf};
    CHECK_OK(caprl_backend_cpu_init(&be, 2, &err), &err);
    be->ops->matmul_fwd(be, y, x, &w, NULL, 20);
    be->ops->matmul_fwd(be, y, x, &w, NULL, 20);
    be->ops->matmul_fwd(be, y, x, &w, NULL, 3);
    be->ops->add_fwd(be, y, x, 8);
    caprl_backend_free(be);
    free(x), free(wf), free(y);
}

static void test_profile(void) {
    g_log[0] = '\0';
    caprl_log_set_callback(capture_log, NULL);
    profile_matmuls();
    CHECK_MSG(g_log[0] == '\0', "logged without CAPRL_PROFILE: %s", g_log);
    setenv("CAPRL_PROFILE", "1", 1);
    profile_matmuls();
    unsetenv("CAPRL_PROFILE");
    caprl_log_set_callback(NULL, NULL);
    const char *many = strstr(g_log, "matmul_fwd (fma) "), *few = strstr(g_log, "matmul_fwd (fma, <= 16 rows)");
    const char *add = strstr(g_log, "add_fwd");
    CHECK_MSG(strstr(g_log, "op profile, 2 threads") && many && few && add, "profile log: %s", g_log);
    if (many && few && add) {
        long calls_many = strtol(many + strlen("matmul_fwd (fma) "), NULL, 10);
        long calls_few = strtol(few + strlen("matmul_fwd (fma, <= 16 rows)"), NULL, 10);
        long calls_add = strtol(add + strlen("add_fwd"), NULL, 10);
        CHECK_MSG(calls_many == 2 && calls_few == 1 && calls_add == 1, "calls %ld %ld %ld", calls_many, calls_few,
                  calls_add);
        CHECK(strstr(many, "GFLOP/s") != NULL && strchr(many, '\n') > strstr(many, "GFLOP/s"));
    }
}

int main(void) {
    test_profile();
    make_backends();
    test_exp();
    test_matmul_shapes();
    test_matmul_determinism();
    test_matmul_edges();
    test_matmul_bf16_unit();
    test_embed();
    test_rmsnorm();
    test_rope();
    test_attention();
    test_swiglu_add();
    free_backends();
    return test_finish("test_ops_fwd");
}
