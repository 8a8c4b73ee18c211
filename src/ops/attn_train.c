/* Training attention over packed segments, token-major: q (M, Hq, D), k and v (M, Hkv, D), GQA (query head h reads
 * KV head g = h / (Hq / Hkv)). Row i of segment [a, b) sees keys [a, i] (causal) or [a, b).
 *
 * Forward:   s_ij = (q_i . k_j) * scale,  mx = max_j s_ij,  S = sum_j exp(s_ij - mx),
 *            out_i = (sum_j exp(s_ij - mx) v_j) * (1 / S),  lse_i = mx + logf(S)
 * Backward (flash style: P is recomputed from q, k and lse, never stored):
 *            p_ij = exp(s_ij - lse_i),  dp_ij = dout_i . v_j,  Dlt_i = dout_i . out_i,  ds_ij = p_ij (dp_ij - Dlt_i)
 *            dq_i = scale * sum_j ds_ij k_j                  (pass 1: owned by query rows)
 *            dv_j = sum_h sum_i p_ij dout_i,  dk_j = scale * sum_h sum_i ds_ij q_i   (pass 2: owned by key rows)
 * The two passes recompute the scores; this costs two extra products per score but keeps every gradient row
 * owned by one thread (no atomics, no partial sums merged across threads).
 *
 * Kernels: keys (and, for the backward, values) of each KV head are packed per segment into panels of AT_BK keys
 * transposed to (D, AT_BK), zero-padded; scores and dp are a broadcast-FMA micro-kernel (4 rows x 16 keys, one
 * chain over d per score, then the scale); the weighted sums (P.V, dS.K, P^T.dout, dS^T.q) are another (4 rows x
 * 16 columns, one chain over the summed index per element). No horizontal sums anywhere.
 *
 * Determinism: tiles are laid out from each segment's first row (query tiles of AT_TQ rows, key tiles of AT_KT
 * rows, key panels of AT_BK, query chunks of AT_QC), so every chain (over d, over keys in order, over (h, i) in
 * order for dk/dv) and every masked (zero) term in it is fixed by the segment alone: results are bit-identical for
 * any thread count and for a segment computed alone or in any batch. A short tile repeats its last row and drops
 * the copies. Softmax sums and Dlt use 8 lanes and one tree on AVX2, a chain on the scalar path; exp is caprl's
 * (identical on both). Units (tile, head) are split into contiguous ranges of about equal work. */
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum {
    AT_TQ = 8,          /* query rows per tile (forward, dq pass): two 4-row groups share each key panel */
    AT_BK = 64,         /* keys per packed panel */
    AT_KT = 16,         /* key rows per tile (dk/dv pass) */
    AT_QC = 64,         /* query rows per chunk (dk/dv pass) */
    AT_UNIT_COST = 16,  /* per-unit overhead in key-equivalents, for the work split */
    AT_INLINE_WORK = 16384,
};

typedef struct at_tile {
    int64_t r0;    /* first row: a query row (query tiles) or a key row (key tiles) */
    int64_t a, b;  /* its segment */
    int64_t panel; /* query tiles: the segment's first panel; key tiles: the panel holding r0 */
    int64_t work;  /* per unit, for the split */
    int32_t n;     /* rows in the tile */
    int32_t col;   /* key tiles: r0's column in its panel */
} at_tile;

typedef struct at_panel {
    int64_t row0; /* first key row */
    int64_t n;    /* keys, 1..AT_BK */
} at_panel;

typedef struct at_task {
    caprl_cpu_ctx  *c;
    int32_t         isa;
    const float    *q, *k, *v;      /* (M, Hq, D), (M, Hkv, D), (M, Hkv, D) */
    const float    *out, *dout;     /* (M, Hq, D): forward output (backward input), its gradient */
    const float    *lse_in;         /* (M, Hq) */
    float          *o, *lse;        /* forward outputs */
    float          *dq, *dk, *dv;   /* backward outputs */
    float          *kp, *vp;        /* (Hkv, n_panels, D, AT_BK) packed keys / values */
    float          *dlt;            /* (M, Hq) */
    const at_tile  *tiles;
    int64_t         n_tiles;
    int64_t         per;            /* units per tile (heads) */
    const at_panel *panels;
    int64_t         n_panels;
    const int64_t  *bounds;         /* (n_threads + 1) */
    int64_t         M, Hq, Hkv, D, G; /* G = Hq / Hkv */
    int64_t         lp;             /* forward score row stride */
    float           scale;
    bool            causal;
} at_task;

/* ---- micro-kernels -------------------------------------------------------------------------------------- *
 * scores: c[r ldc + j] = scale * sum_d rows[r][d] panel[d AT_BK + j], r < 4, j < 16 nb (one chain over d).
 * accum:  o[r ldo + d] += sum_{t < n} A[r ars + t ats] B[t ldb + d], r < 4, d < D (one chain over t).
 * p_ds_row / softmax_row: elementwise, with caprl's exp (identical values on both paths). */

static void scores_scalar(float *c, int64_t ldc, const float *const *rows, const float *panel, int64_t nb, int64_t D,
                          float scale) {
    for (int r = 0; r < 4; r++) {
        for (int64_t j = 0; j < 16 * nb; j++) {
            float s = 0.0f;
            for (int64_t d = 0; d < D; d++) {
                s += rows[r][d] * panel[d * AT_BK + j];
            }
            c[r * ldc + j] = s * scale;
        }
    }
}

static void accum_scalar(float *o, int64_t ldo, const float *A, int64_t ars, int64_t ats, const float *B,
                         int64_t ldb, int64_t n, int64_t D) {
    for (int r = 0; r < 4; r++) {
        for (int64_t d = 0; d < D; d++) {
            float s = o[r * ldo + d];
            for (int64_t t = 0; t < n; t++) {
                s += A[r * ars + t * ats] * B[t * ldb + d];
            }
            o[r * ldo + d] = s;
        }
    }
}

#if CAPRL_X86
static CAPRL_AVX2 void scores_avx2(float *c, int64_t ldc, const float *const *rows, const float *panel, int64_t nb,
                                   int64_t D, float scale) {
    __m256 sv = _mm256_set1_ps(scale);
    for (int64_t j = 0; j < 16 * nb; j += 16) {
        __m256 acc[4][2];
#    pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            acc[r][0] = _mm256_setzero_ps();
            acc[r][1] = _mm256_setzero_ps();
        }
        const float *pj = panel + j;
        for (int64_t d = 0; d < D; d++) {
            __m256 k0 = _mm256_loadu_ps(pj + d * AT_BK), k1 = _mm256_loadu_ps(pj + d * AT_BK + 8);
#    pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                __m256 a = _mm256_broadcast_ss(rows[r] + d);
                acc[r][0] = _mm256_fmadd_ps(a, k0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(a, k1, acc[r][1]);
            }
        }
#    pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            _mm256_storeu_ps(c + r * ldc + j, _mm256_mul_ps(acc[r][0], sv));
            _mm256_storeu_ps(c + r * ldc + j + 8, _mm256_mul_ps(acc[r][1], sv));
        }
    }
}

/* 4 rows x (8 nv) columns of accum; the last vector may be partial (masked). */
static CAPRL_AVX2_INLINE void accum4_avx2(const int nv, const bool masked, __m256i m, float *o, int64_t ldo,
                                          const float *A, int64_t ars, int64_t ats, const float *B, int64_t ldb,
                                          int64_t n) {
    __m256 acc[4][2];
#    pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        for (int j = 0; j < nv; j++) {
            acc[r][j] = masked ? _mm256_maskload_ps(o + r * ldo + 8 * j, m) : _mm256_loadu_ps(o + r * ldo + 8 * j);
        }
    }
    for (int64_t t = 0; t < n; t++) {
        const float *br = B + t * ldb;
        __m256       b0 = masked && nv == 1 ? _mm256_maskload_ps(br, m) : _mm256_loadu_ps(br);
        __m256       b1 = nv > 1 ? (masked ? _mm256_maskload_ps(br + 8, m) : _mm256_loadu_ps(br + 8)) : b0;
        const float *at = A + t * ats;
#    pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            __m256 a = _mm256_broadcast_ss(at + r * ars);
            acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
            if (nv > 1) {
                acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
            }
        }
    }
#    pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        for (int j = 0; j < nv; j++) {
            float *p = o + r * ldo + 8 * j;
            if (masked && j == nv - 1) {
                _mm256_maskstore_ps(p, m, acc[r][j]);
            } else {
                _mm256_storeu_ps(p, acc[r][j]);
            }
        }
    }
}

static CAPRL_AVX2 void accum_avx2(float *o, int64_t ldo, const float *A, int64_t ars, int64_t ats, const float *B,
                                  int64_t ldb, int64_t n, int64_t D) {
    int64_t d = 0;
    __m256i none = _mm256_setzero_si256();
    for (; d + 16 <= D; d += 16) {
        accum4_avx2(2, false, none, o + d, ldo, A, ars, ats, B + d, ldb, n);
    }
    if (d + 8 <= D) {
        accum4_avx2(1, false, none, o + d, ldo, A, ars, ats, B + d, ldb, n);
        d += 8;
    }
    if (d < D) {
        accum4_avx2(1, true, caprl_mask8_avx2(D - d), o + d, ldo, A, ars, ats, B + d, ldb, n);
    }
}

/* AVX-512 scores: the same chain per score (over d), 32 keys per pass instead of 16, so the same bits as AVX2 (the
 * weighted sums are caprl_accum4xd_avx512, ops_impl.h). */
static CAPRL_AVX512 void scores_avx512(float *c, int64_t ldc, const float *const *rows, const float *panel,
                                       int64_t nb, int64_t D, float scale) {
    __m512 sv = _mm512_set1_ps(scale);
    for (int64_t j = 0; j < 16 * nb; j += 32) {
        bool   two = j + 16 < 16 * nb;
        __m512 acc[4][2];
#    pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            acc[r][0] = _mm512_setzero_ps();
            acc[r][1] = _mm512_setzero_ps();
        }
        const float *pj = panel + j;
        if (two) {
            for (int64_t d = 0; d < D; d++) {
                __m512 k0 = _mm512_loadu_ps(pj + d * AT_BK), k1 = _mm512_loadu_ps(pj + d * AT_BK + 16);
#    pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    __m512 a = _mm512_set1_ps(rows[r][d]);
                    acc[r][0] = _mm512_fmadd_ps(a, k0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(a, k1, acc[r][1]);
                }
            }
        } else {
            for (int64_t d = 0; d < D; d++) {
                __m512 k0 = _mm512_loadu_ps(pj + d * AT_BK);
#    pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    acc[r][0] = _mm512_fmadd_ps(_mm512_set1_ps(rows[r][d]), k0, acc[r][0]);
                }
            }
        }
#    pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            _mm512_storeu_ps(c + r * ldc + j, _mm512_mul_ps(acc[r][0], sv));
            if (two) {
                _mm512_storeu_ps(c + r * ldc + j + 16, _mm512_mul_ps(acc[r][1], sv));
            }
        }
    }
}

/* p[j] = exp(s[j] - lse) for j < lim, 0 for lim <= j < n, then dp[j] <- p[j] * (dp[j] - dlt), in place (n a multiple
 * of 8: the score buffers are padded). */
static CAPRL_AVX2 void p_ds_row_avx2(float *p, float *dp, int64_t n, int64_t lim, float lse, float dlt) {
    __m256 lv = _mm256_set1_ps(lse), dv = _mm256_set1_ps(dlt);
    for (int64_t j = 0; j < n; j += 8) {
        int64_t left = lim - j;
        __m256  e = caprl_exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(p + j), lv));
        if (left < 8) {
            e = _mm256_and_ps(e, _mm256_castsi256_ps(caprl_mask8_avx2(left < 0 ? 0 : left)));
        }
        _mm256_storeu_ps(p + j, e);
        _mm256_storeu_ps(dp + j, _mm256_mul_ps(e, _mm256_sub_ps(_mm256_loadu_ps(dp + j), dv)));
    }
}

/* Softmax numerators of a score row in place over [0, lim) (zeros on [lim, n)); returns the max and the sum. */
static CAPRL_AVX2 float softmax_row_avx2(float *row, int64_t n, int64_t lim, float *mx_out) {
    float sum = caprl_softmax_numerators_avx2(row, lim, mx_out);
    for (int64_t i = lim; i < n; i++) {
        row[i] = 0.0f;
    }
    return sum;
}

static CAPRL_AVX512 float softmax_row_avx512(float *row, int64_t n, int64_t lim, float *mx_out) {
    float sum = caprl_softmax_numerators_avx512(row, lim, mx_out);
    for (int64_t i = lim; i < n; i++) {
        row[i] = 0.0f;
    }
    return sum;
}

/* Dot product with 8 lanes and one tree (Dlt). */
static CAPRL_AVX2 float dot_avx2(const float *x, const float *y, int64_t D) {
    int64_t d8 = D & ~(int64_t)7;
    __m256  acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < d8; d += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d), acc);
    }
    if (d8 < D) {
        __m256i m = caprl_mask8_avx2(D - d8);
        acc = _mm256_fmadd_ps(_mm256_maskload_ps(x + d8, m), _mm256_maskload_ps(y + d8, m), acc);
    }
    return caprl_hsum8_avx2(acc);
}
#endif

static void p_ds_row_scalar(float *p, float *dp, int64_t n, int64_t lim, float lse, float dlt) {
    for (int64_t j = 0; j < n; j++) {
        p[j] = j < lim ? caprl_expf_ref(p[j] - lse) : 0.0f;
        dp[j] = p[j] * (dp[j] - dlt);
    }
}

static float softmax_row_scalar(float *row, int64_t n, int64_t lim, float *mx_out) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < lim; i++) {
        mx = row[i] > mx ? row[i] : mx;
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        row[i] = i < lim ? caprl_expf_ref(row[i] - mx) : 0.0f;
        sum += row[i];
    }
    *mx_out = mx;
    return sum;
}

static float dot_scalar(const float *x, const float *y, int64_t D) {
    float s = 0.0f;
    for (int64_t d = 0; d < D; d++) {
        s += x[d] * y[d];
    }
    return s;
}

/* ISA dispatch (fixed per backend). */
static void scores(const at_task *t, float *c, int64_t ldc, const float *const *rows, const float *panel, int64_t nb,
                   float scale) {
#if CAPRL_X86
    if (t->isa >= CAPRL_ISA_AVX512) {
        scores_avx512(c, ldc, rows, panel, nb, t->D, scale);
        return;
    }
    if (t->isa >= CAPRL_ISA_AVX2) {
        scores_avx2(c, ldc, rows, panel, nb, t->D, scale);
        return;
    }
#endif
    scores_scalar(c, ldc, rows, panel, nb, t->D, scale);
}

static void accum(const at_task *t, float *o, int64_t ldo, const float *A, int64_t ars, int64_t ats, const float *B,
                  int64_t ldb, int64_t n) {
#if CAPRL_X86
    if (t->isa >= CAPRL_ISA_AVX512) {
        caprl_accum4xd_avx512(o, ldo, A, ars, ats, B, ldb, n, t->D);
        return;
    }
    if (t->isa >= CAPRL_ISA_AVX2) {
        accum_avx2(o, ldo, A, ars, ats, B, ldb, n, t->D);
        return;
    }
#endif
    accum_scalar(o, ldo, A, ars, ats, B, ldb, n, t->D);
}

static void p_ds_row(const at_task *t, float *p, float *dp, int64_t n, int64_t lim, float lse, float dlt) {
#if CAPRL_X86
    if (t->isa >= CAPRL_ISA_AVX2) {
        p_ds_row_avx2(p, dp, n, lim, lse, dlt);
        return;
    }
#endif
    p_ds_row_scalar(p, dp, n, lim, lse, dlt);
}

static float softmax_row(const at_task *t, float *row, int64_t n, int64_t lim, float *mx) {
#if CAPRL_X86
    if (t->isa >= CAPRL_ISA_AVX512) {
        return softmax_row_avx512(row, n, lim, mx);
    }
    if (t->isa >= CAPRL_ISA_AVX2) {
        return softmax_row_avx2(row, n, lim, mx);
    }
#endif
    return softmax_row_scalar(row, n, lim, mx);
}

static float dot(const at_task *t, const float *x, const float *y) {
#if CAPRL_X86
    if (t->isa >= CAPRL_ISA_AVX2) {
        return dot_avx2(x, y, t->D);
    }
#endif
    return dot_scalar(x, y, t->D);
}

/* ---- packing -------------------------------------------------------------------------------------------- */

/* Unit u = g * n_panels + panel: keys (and values) of that panel, transposed to (D, AT_BK), zeros past its end. */
static void pack_range(void *ctx, int64_t u0, int64_t u1, int32_t tid) {
    (void)tid;
    const at_task *t = ctx;
    int64_t        D = t->D;
    for (int64_t u = u0; u < u1; u++) {
        int64_t         g = u / t->n_panels;
        const at_panel *pn = &t->panels[u % t->n_panels];
        for (int pass = 0; pass < 2; pass++) {
            const float *src = pass == 0 ? t->k : t->v;
            float       *dst = pass == 0 ? t->kp : t->vp;
            if (!dst) {
                continue;
            }
            dst += u * D * AT_BK;
            for (int64_t j = 0; j < pn->n; j++) {
                const float *row = src + ((pn->row0 + j) * t->Hkv + g) * D;
                for (int64_t d = 0; d < D; d++) {
                    dst[d * AT_BK + j] = row[d];
                }
            }
            for (int64_t d = 0; d < D; d++) {
                for (int64_t j = pn->n; j < AT_BK; j++) {
                    dst[d * AT_BK + j] = 0.0f;
                }
            }
        }
    }
}

/* ---- forward -------------------------------------------------------------------------------------------- */

static void fwd_unit(const at_task *t, const at_tile *tl, int64_t h, float *sc) {
    int64_t      D = t->D, lp = t->lp, g = h / t->G;
    int64_t      kend = t->causal ? tl->r0 + tl->n : tl->b, L = kend - tl->a;
    int64_t      ngrp = caprl_ceil_div(tl->n, 4);
    float       *ob = sc + AT_TQ * lp; /* (AT_TQ, D) unnormalised outputs */
    const float *rows[AT_TQ];
    float        inv[AT_TQ], lse[AT_TQ];
    for (int i = 0; i < AT_TQ; i++) {
        rows[i] = t->q + ((tl->r0 + (i < tl->n ? i : tl->n - 1)) * t->Hq + h) * D;
    }
    const float *panels = t->kp + (g * t->n_panels + tl->panel) * D * AT_BK;
    for (int64_t k0 = 0, pb = 0; k0 < L; k0 += AT_BK, pb++) {
        int64_t nb = caprl_ceil_div(L - k0 < AT_BK ? L - k0 : AT_BK, 16);
        for (int64_t grp = 0; grp < ngrp; grp++) {
            scores(t, sc + grp * 4 * lp + k0, lp, rows + 4 * grp, panels + pb * D * AT_BK, nb, t->scale);
        }
    }
    for (int64_t i = 0; i < 4 * ngrp; i++) {
        int64_t qi = tl->r0 + (i < tl->n ? i : tl->n - 1);
        int64_t lim = t->causal ? qi - tl->a + 1 : L;
        float   mx;
        float   sum = softmax_row(t, sc + i * lp, L, lim, &mx);
        inv[i] = 1.0f / sum;
        lse[i] = mx + logf(sum);
    }
    memset(ob, 0, (size_t)(AT_TQ * D) * sizeof(float));
    const float *vb = t->v + (tl->a * t->Hkv + g) * D;
    for (int64_t grp = 0; grp < ngrp; grp++) {
        accum(t, ob + grp * 4 * D, D, sc + grp * 4 * lp, lp, 1, vb, t->Hkv * D, L);
    }
    for (int32_t i = 0; i < tl->n; i++) {
        int64_t row = (tl->r0 + i) * t->Hq + h;
        float  *o = t->o + row * D;
        for (int64_t d = 0; d < D; d++) {
            o[d] = ob[i * D + d] * inv[i];
        }
        t->lse[row] = lse[i];
    }
}

static void fwd_range(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    const at_task *t = ctx;
    float         *sc = t->c->threads[tid].buf;
    for (int64_t u = t->bounds[r0]; u < t->bounds[r1]; u++) {
        fwd_unit(t, &t->tiles[u / t->per], u % t->per, sc);
    }
}

/* ---- backward pass 1: dq, owned by query rows ----------------------------------------------------------- */

static void dq_unit(const at_task *t, const at_tile *tl, int64_t h, float *buf) {
    int64_t      D = t->D, g = h / t->G;
    int64_t      kend = t->causal ? tl->r0 + tl->n : tl->b, L = kend - tl->a;
    int64_t      ngrp = caprl_ceil_div(tl->n, 4);
    float       *sp = buf;                     /* (AT_TQ, AT_BK) scores, then p */
    float       *dp = sp + AT_TQ * AT_BK;      /* (AT_TQ, AT_BK) dp, then ds */
    float       *acc = dp + AT_TQ * AT_BK;     /* (AT_TQ, D) */
    const float *qr[AT_TQ], *dr[AT_TQ];
    float        lse[AT_TQ], dlt[AT_TQ];
    int64_t      qi[AT_TQ];
    for (int i = 0; i < AT_TQ; i++) {
        qi[i] = tl->r0 + (i < tl->n ? i : tl->n - 1);
        qr[i] = t->q + (qi[i] * t->Hq + h) * D;
        dr[i] = t->dout + (qi[i] * t->Hq + h) * D;
        lse[i] = t->lse_in[qi[i] * t->Hq + h];
        dlt[i] = t->dlt[qi[i] * t->Hq + h];
    }
    memset(acc, 0, (size_t)(AT_TQ * D) * sizeof(float));
    const float *kpan = t->kp + (g * t->n_panels + tl->panel) * D * AT_BK;
    const float *vpan = t->vp + (g * t->n_panels + tl->panel) * D * AT_BK;
    for (int64_t k0 = 0, pb = 0; k0 < L; k0 += AT_BK, pb++) {
        int64_t n = L - k0 < AT_BK ? L - k0 : AT_BK, nb = caprl_ceil_div(n, 16);
        for (int64_t grp = 0; grp < ngrp; grp++) {
            scores(t, sp + grp * 4 * AT_BK, AT_BK, qr + 4 * grp, kpan + pb * D * AT_BK, nb, t->scale);
            scores(t, dp + grp * 4 * AT_BK, AT_BK, dr + 4 * grp, vpan + pb * D * AT_BK, nb, 1.0f);
        }
        for (int64_t i = 0; i < 4 * ngrp; i++) {
            int64_t lim = t->causal ? qi[i] - (tl->a + k0) + 1 : n;
            lim = lim < 0 ? 0 : lim > n ? n : lim;
            p_ds_row(t, sp + i * AT_BK, dp + i * AT_BK, nb * 16, lim, lse[i], dlt[i]);
        }
        const float *kb = t->k + ((tl->a + k0) * t->Hkv + g) * D;
        for (int64_t grp = 0; grp < ngrp; grp++) {
            accum(t, acc + grp * 4 * D, D, dp + grp * 4 * AT_BK, AT_BK, 1, kb, t->Hkv * D, n);
        }
    }
    for (int32_t i = 0; i < tl->n; i++) {
        float *o = t->dq + ((tl->r0 + i) * t->Hq + h) * D;
        for (int64_t d = 0; d < D; d++) {
            o[d] = acc[i * D + d] * t->scale;
        }
    }
}

static void dq_range(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    const at_task *t = ctx;
    float         *buf = t->c->threads[tid].buf;
    for (int64_t u = t->bounds[r0]; u < t->bounds[r1]; u++) {
        dq_unit(t, &t->tiles[u / t->per], u % t->per, buf);
    }
}

/* ---- backward pass 2: dk and dv, owned by key rows ------------------------------------------------------ */

static void dkv_unit(const at_task *t, const at_tile *tl, int64_t g, float *buf) {
    int64_t      D = t->D, j0 = tl->r0, nk = tl->n;
    int64_t      kgrp = caprl_ceil_div(nk, 4);
    float       *sp = buf;                    /* (AT_QC, AT_KT) scores, then p */
    float       *dp = sp + AT_QC * AT_KT;     /* (AT_QC, AT_KT) dp, then ds */
    float       *ak = dp + AT_QC * AT_KT;     /* (AT_KT, D) */
    float       *av = ak + AT_KT * D;         /* (AT_KT, D) */
    const float *kpan = t->kp + (g * t->n_panels + tl->panel) * D * AT_BK + tl->col;
    const float *vpan = t->vp + (g * t->n_panels + tl->panel) * D * AT_BK + tl->col;
    int64_t      qstart = t->causal ? j0 : tl->a;
    memset(ak, 0, (size_t)(2 * AT_KT * D) * sizeof(float));
    for (int64_t h = g * t->G; h < (g + 1) * t->G; h++) {
        for (int64_t q0 = qstart; q0 < tl->b; q0 += AT_QC) {
            int64_t nq = tl->b - q0 < AT_QC ? tl->b - q0 : AT_QC;
            for (int64_t r = 0; r < nq; r += 4) {
                const float *qr[4], *dr[4];
                for (int i = 0; i < 4; i++) {
                    int64_t row = (q0 + (r + i < nq ? r + i : nq - 1)) * t->Hq + h;
                    qr[i] = t->q + row * D;
                    dr[i] = t->dout + row * D;
                }
                scores(t, sp + r * AT_KT, AT_KT, qr, kpan, 1, t->scale);
                scores(t, dp + r * AT_KT, AT_KT, dr, vpan, 1, 1.0f);
            }
            for (int64_t i = 0; i < nq; i++) {
                int64_t row = (q0 + i) * t->Hq + h;
                int64_t lim = t->causal ? q0 + i - j0 + 1 : nk;
                lim = lim > nk ? nk : lim;
                p_ds_row(t, sp + i * AT_KT, dp + i * AT_KT, AT_KT, lim, t->lse_in[row], t->dlt[row]);
            }
            const float *dob = t->dout + (q0 * t->Hq + h) * D, *qb = t->q + (q0 * t->Hq + h) * D;
            for (int64_t kg = 0; kg < kgrp; kg++) {
                accum(t, av + kg * 4 * D, D, sp + kg * 4, 1, AT_KT, dob, t->Hq * D, nq);
                accum(t, ak + kg * 4 * D, D, dp + kg * 4, 1, AT_KT, qb, t->Hq * D, nq);
            }
        }
    }
    for (int64_t j = 0; j < nk; j++) {
        int64_t row = (j0 + j) * t->Hkv + g;
        for (int64_t d = 0; d < D; d++) {
            t->dv[row * D + d] = av[j * D + d];
            t->dk[row * D + d] = ak[j * D + d] * t->scale;
        }
    }
}

static void dkv_range(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    const at_task *t = ctx;
    float         *buf = t->c->threads[tid].buf;
    for (int64_t u = t->bounds[r0]; u < t->bounds[r1]; u++) {
        dkv_unit(t, &t->tiles[u / t->per], u % t->per, buf);
    }
}

static void dlt_range(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    (void)tid;
    const at_task *t = ctx;
    for (int64_t r = r0; r < r1; r++) { /* r = i * Hq + h */
        t->dlt[r] = dot(t, t->dout + r * t->D, t->out + r * t->D);
    }
}

/* ---- setup ---------------------------------------------------------------------------------------------- */

/* Scratch carved from the shared buffer: panel and tile tables, packed keys / values, Dlt, split bounds. */
typedef struct at_layout {
    at_panel *panels;
    at_tile  *tiles;
    float    *kp, *vp, *dlt;
    int64_t  *bounds;
    int64_t   n_panels, n_tiles, max_len;
} at_layout;

static size_t round64(size_t n) {
    return (n + 63) / 64 * 64;
}

static void check_segments(const int64_t *seg, int64_t n_seg, int64_t M) {
    CAPRL_ASSERT(n_seg >= 0 && seg[0] == 0 && seg[n_seg] == M);
    for (int64_t s = 0; s < n_seg; s++) {
        CAPRL_ASSERT(seg[s] <= seg[s + 1] && seg[s + 1] - seg[s] <= INT32_MAX);
    }
}

/* Reserves the shared scratch and fills the panel table and the tiles (query tiles of AT_TQ rows, or key tiles
 * of AT_KT rows when key_tiles). with_v: room for packed values and Dlt too. */
static void layout(caprl_cpu_ctx *c, at_layout *ly, const int64_t *seg, int64_t n_seg, int64_t M, int64_t Hq,
                   int64_t Hkv, int64_t D, bool key_tiles, bool with_v) {
    int64_t n_panels = 0, max_len = 0, n_tiles = 0, max_tiles = 0, tile_rows = key_tiles ? AT_KT : AT_TQ;
    for (int64_t s = 0; s < n_seg; s++) {
        int64_t L = seg[s + 1] - seg[s];
        n_panels += caprl_ceil_div(L, AT_BK);
        n_tiles += caprl_ceil_div(L, tile_rows);
        max_tiles += caprl_ceil_div(L, AT_TQ < AT_KT ? AT_TQ : AT_KT);
        max_len = L > max_len ? L : max_len;
    }
    /* The tile table has room for either kind, so the regions after it sit at the same offsets in both. */
    size_t sz_pan = round64((size_t)n_panels * sizeof(at_panel));
    size_t sz_til = round64((size_t)max_tiles * sizeof(at_tile));
    size_t sz_kp = round64((size_t)(Hkv * n_panels * D * AT_BK) * sizeof(float));
    size_t sz_dlt = with_v ? round64((size_t)(M * Hq) * sizeof(float)) : 0;
    size_t sz_bnd = round64((size_t)(c->n_threads + 1) * sizeof(int64_t));
    size_t total = sz_pan + sz_til + sz_kp * (with_v ? 2 : 1) + sz_dlt + sz_bnd;
    char  *p = caprl_cpu_shared_reserve(c, total);
    if (!p) {
        caprl_abort(__FILE__, __LINE__, "out of memory for attention scratch (%zu bytes)", total);
    }
    ly->panels = (void *)p;
    ly->tiles = (void *)(p + sz_pan);
    ly->kp = (void *)(p + sz_pan + sz_til);
    ly->vp = with_v ? (void *)(p + sz_pan + sz_til + sz_kp) : NULL;
    ly->dlt = with_v ? (void *)(p + sz_pan + sz_til + 2 * sz_kp) : NULL;
    ly->bounds = (void *)(p + sz_pan + sz_til + sz_kp * (with_v ? 2 : 1) + sz_dlt);
    ly->n_panels = n_panels;
    ly->n_tiles = n_tiles;
    ly->max_len = max_len;
    int64_t pi = 0, ti = 0;
    for (int64_t s = 0; s < n_seg; s++) {
        int64_t a = seg[s], b = seg[s + 1], first = pi;
        for (int64_t r = a; r < b; r += AT_BK) {
            ly->panels[pi].row0 = r;
            ly->panels[pi].n = b - r < AT_BK ? b - r : AT_BK;
            pi++;
        }
        for (int64_t r = a; r < b; r += tile_rows) {
            at_tile *tl = &ly->tiles[ti++];
            tl->r0 = r;
            tl->a = a;
            tl->b = b;
            tl->n = (int32_t)(b - r < tile_rows ? b - r : tile_rows);
            tl->panel = key_tiles ? first + (r - a) / AT_BK : first;
            tl->col = key_tiles ? (int32_t)((r - a) % AT_BK) : 0;
        }
    }
}

/* Thread r starts at the first unit whose preceding work reaches r / nt of the total. Returns the total. */
static int64_t split_work(int64_t *bounds, int32_t nt, const at_tile *tiles, int64_t n_tiles, int64_t per) {
    int64_t work = 0, units = n_tiles * per, acc = 0, u = 0;
    for (int64_t i = 0; i < n_tiles; i++) {
        work += tiles[i].work * per;
    }
    bounds[0] = 0;
    for (int32_t r = 1; r < nt; r++) {
        int64_t target = work / nt * r + work % nt * r / nt;
        while (u < units && acc + tiles[u / per].work <= target) {
            acc += tiles[u / per].work;
            u++;
        }
        bounds[r] = u;
    }
    bounds[nt] = units;
    return work;
}

static void run_units(caprl_cpu_ctx *c, at_task *t, const at_layout *ly, caprl_range_fn fn, int64_t unit_dim) {
    t->tiles = ly->tiles;
    t->n_tiles = ly->n_tiles;
    t->per = unit_dim;
    t->bounds = ly->bounds;
    int32_t nt = c->n_threads;
    int64_t work = split_work(ly->bounds, nt, ly->tiles, ly->n_tiles, unit_dim);
    if (nt == 1 || work * t->D < AT_INLINE_WORK) {
        fn(t, 0, nt, 0);
    } else {
        caprl_parallel_for(c->pool, nt, fn, t);
    }
}

static void reserve_thread_scratch(caprl_cpu_ctx *c, size_t floats) {
    if (!caprl_cpu_scratch_reserve(c, floats * sizeof(float))) {
        caprl_abort(__FILE__, __LINE__, "out of memory for attention scratch (%zu floats per thread)", floats);
    }
}

void caprl_op_attn_train_fwd(caprl_cpu_ctx *c, float *out, float *lse, const float *q, const float *k,
                             const float *v, const int64_t *seg, int64_t n_seg, int64_t M, int64_t Hq, int64_t Hkv,
                             int64_t D, float scale, bool causal) {
    CAPRL_ASSERT(M >= 0 && Hq > 0 && Hkv > 0 && Hq % Hkv == 0 && D > 0);
    check_segments(seg, n_seg, M);
    if (M == 0) {
        return;
    }
    at_layout ly;
    layout(c, &ly, seg, n_seg, M, Hq, Hkv, D, false, false);
    at_task t = {.c = c, .isa = c->isa, .q = q, .k = k, .v = v, .o = out, .lse = lse, .kp = ly.kp,
                 .panels = ly.panels, .n_panels = ly.n_panels, .M = M, .Hq = Hq, .Hkv = Hkv, .D = D,
                 .G = Hq / Hkv, .lp = caprl_ceil_div(ly.max_len, AT_BK) * AT_BK, .scale = scale, .causal = causal};
    for (int64_t i = 0; i < ly.n_tiles; i++) {
        at_tile *tl = &ly.tiles[i];
        tl->work = (causal ? tl->r0 + tl->n - tl->a : tl->b - tl->a) + AT_UNIT_COST;
    }
    reserve_thread_scratch(c, (size_t)(AT_TQ * (t.lp + D)));
    caprl_parallel_for(c->pool, Hkv * ly.n_panels, pack_range, &t);
    run_units(c, &t, &ly, fwd_range, Hq);
}

void caprl_op_attn_train_bwd(caprl_cpu_ctx *c, float *dq, float *dk, float *dv, const float *dout, const float *q,
                             const float *k, const float *v, const float *out, const float *lse, const int64_t *seg,
                             int64_t n_seg, int64_t M, int64_t Hq, int64_t Hkv, int64_t D, float scale, bool causal) {
    CAPRL_ASSERT(M >= 0 && Hq > 0 && Hkv > 0 && Hq % Hkv == 0 && D > 0);
    check_segments(seg, n_seg, M);
    if (M == 0) {
        return;
    }
    at_task t = {.c = c, .isa = c->isa, .q = q, .k = k, .v = v, .out = out, .dout = dout, .lse_in = lse, .dq = dq,
                 .dk = dk, .dv = dv, .M = M, .Hq = Hq, .Hkv = Hkv, .D = D, .G = Hq / Hkv, .scale = scale,
                 .causal = causal};
    size_t per_thread = (size_t)(2 * AT_TQ * AT_BK + AT_TQ * D);
    size_t per_thread2 = (size_t)(2 * AT_QC * AT_KT + 2 * AT_KT * D);
    reserve_thread_scratch(c, per_thread > per_thread2 ? per_thread : per_thread2);

    /* Pass 1 on query tiles; the key tiles of pass 2 reuse the same packed panels and Dlt (the layout only
     * rewrites the tile table, which comes before them). */
    at_layout ly;
    layout(c, &ly, seg, n_seg, M, Hq, Hkv, D, false, true);
    t.kp = ly.kp;
    t.vp = ly.vp;
    t.dlt = ly.dlt;
    t.panels = ly.panels;
    t.n_panels = ly.n_panels;
    caprl_parallel_for(c->pool, Hkv * ly.n_panels, pack_range, &t);
    caprl_parallel_for_grain(c->pool, M * Hq, 64, dlt_range, &t);
    for (int64_t i = 0; i < ly.n_tiles; i++) {
        at_tile *tl = &ly.tiles[i];
        tl->work = (causal ? tl->r0 + tl->n - tl->a : tl->b - tl->a) + AT_UNIT_COST;
    }
    run_units(c, &t, &ly, dq_range, Hq);

    at_layout ly2;
    layout(c, &ly2, seg, n_seg, M, Hq, Hkv, D, true, true);
    CAPRL_ASSERT(ly2.kp == ly.kp); /* same buffer, same offsets: the packed data is still there */
    for (int64_t i = 0; i < ly2.n_tiles; i++) {
        at_tile *tl = &ly2.tiles[i];
        tl->work = (causal ? tl->b - tl->r0 : tl->b - tl->a) * t.G + AT_UNIT_COST;
    }
    run_units(c, &t, &ly2, dkv_range, Hkv);
}
