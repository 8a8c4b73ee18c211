/* Non-causal attention within segments, head-major (the Qwen2.5-VL vision windows and frames, spec/qwen.md §3.7).
 * q, k, v, out are (H, N, D); a query row in [seg[s], seg[s+1]) attends to the key rows of that range:
 *   s_i = dot(q, k_i) * scale,  p_i = exp(s_i - max s),  out = (sum_i p_i v_i) * (1 / sum_i p_i)   (f32)
 *
 * Why not attn_fwd: that kernel walks one query at a time through all its keys, so a full-attention block over
 * ~4000 patches streams a head's 1.3 MB of keys and values from L3 for every query. Here:
 * - the keys of every segment are first packed, per head, into panels of SEG_BK keys transposed to (D, SEG_BK)
 *   (zero-padded past the segment's end): O(N D) work against O(N L D) for the products, and each panel is one
 *   contiguous 20 KB block (D = 80) instead of D rows a whole head apart;
 * - a tile of up to 32 queries of one head shares every pass over a panel and its SEG_BK value rows, which stay
 *   in L1 while every query group and column chunk uses them (its score rows, 32 x the segment, stay in L2);
 * - both products are broadcast-FMA micro-kernels with no horizontal sums: on AVX2 4 queries x 16 keys for the
 *   scores and 4 queries x 16 columns for P.V (6 loads per 8 FMAs); on AVX-512 8 queries x 32 keys and 4 queries x
 *   64 columns (10 loads per 16 FMAs, 8 per 16), the same arithmetic per element, so the same bits.
 *
 * Determinism: every query's arithmetic is fixed whatever tile, panel or thread it lands in: a score is one FMA
 * chain over d = 0..D-1; the softmax sum one 8-lane chain over the keys in order and one tree; each output element
 * one FMA chain over the keys in order (an accumulator parked in memory between panels is the same float). A short
 * tile repeats its last query and drops the copies; padded keys get scores that are never read. So results are
 * bit-identical for any thread count and for a segment computed in any batch. The scalar path (no AVX2) reads k
 * directly in its own fixed order. Units (head, tile) are split into contiguous ranges of about equal work.
 *
 * bf16 (a bf16 model's tower, on a CPU with a bf16 matrix unit): each segment's keys and values are packed per head
 * as bf16 tile panels, and a tile's two products run on the unit (AMX tiles or vdpbf16ps) with the queries and the
 * softmax numerators rounded to bf16 and f32 sums, as the tower's matmuls do; the scale, the softmax and the
 * normalisation stay f32. Every query row is again its own rows of both products, so the same determinism holds. */
#include <stdlib.h>

#include "backend/gemm_impl.h"
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum {
    SEG_TQ = 32,       /* queries per tile: each key panel and value block is used by all of them */
    SEG_QG = 8,        /* the AVX-512 score kernel's queries at once; a tile runs whole groups of these */
    SEG_BK = 64,       /* keys per panel */
    SEG_UNIT_COST = 8, /* per-tile overhead in key-equivalents, for the work split */
    SEG_INLINE_WORK = 32768,
};

typedef struct seg_tile {
    int64_t row0;  /* first query row */
    int64_t a;     /* first key row of its segment */
    int64_t panel; /* first key panel of its segment (within a head) */
    int64_t key32; /* bf16 path: its segment's first key with every earlier segment padded to 32 keys */
    int32_t nq;    /* queries, 1..SEG_TQ */
    int32_t L;     /* keys in its segment */
} seg_tile;

typedef struct seg_task {
    caprl_cpu_ctx  *c;
    float          *out; /* (H, N, D) */
    const float    *q;   /* (H, N, D) */
    const float    *k;   /* (H, N, D) */
    const float    *v;   /* (H, N, D) */
    float          *kp;  /* (H, n_panels, D, SEG_BK) packed keys; NULL on the scalar path */
    int64_t         N, D;
    float           scale;
    const seg_tile *tiles; /* (n_tiles) the tiles of one head */
    int64_t         n_tiles;
    const int64_t  *seg;   /* (n_seg + 1) */
    int64_t         n_seg;
    int64_t         n_panels; /* per head */
    const int64_t  *bounds;   /* (n_threads + 1) unit boundaries, unit = h * n_tiles + tile */
    int64_t         lp_max;   /* score row stride: longest segment rounded up to SEG_BK */
    /* the bf16 path: each segment's keys and values of every head in tile panels, rounded to bf16 */
    uint16_t       *kb, *vb; /* (H, keys32, dp) each: a segment's panels at (h keys32 + key32) dp */
    int64_t         keys32;  /* per head: the segments' lengths rounded up to 32, summed */
    int64_t         dp;      /* D rounded up to 32 */
} seg_task;

/* ---- scalar --------------------------------------------------------------------------------------------- */

static void query_scalar(const seg_task *t, const float *qv, const float *kb, const float *vb, int64_t L, float *o,
                         float *sc) {
    int64_t D = t->D;
    float   mx = -INFINITY;
    for (int64_t i = 0; i < L; i++) {
        float s = 0.0f;
        for (int64_t d = 0; d < D; d++) {
            s += qv[d] * kb[i * D + d];
        }
        sc[i] = s * t->scale;
        mx = sc[i] > mx ? sc[i] : mx;
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < L; i++) {
        sc[i] = caprl_expf_ref(sc[i] - mx);
        sum += sc[i];
    }
    for (int64_t d = 0; d < D; d++) {
        o[d] = 0.0f;
    }
    for (int64_t i = 0; i < L; i++) {
        for (int64_t d = 0; d < D; d++) {
            o[d] += sc[i] * vb[i * D + d];
        }
    }
    float inv = 1.0f / sum;
    for (int64_t d = 0; d < D; d++) {
        o[d] *= inv;
    }
}

static void tile_scalar(const seg_task *t, int64_t h, const seg_tile *tl, float *sc) {
    int64_t      D = t->D, base = h * t->N;
    const float *kb = t->k + (base + tl->a) * D, *vb = t->v + (base + tl->a) * D;
    for (int32_t i = 0; i < tl->nq; i++) {
        int64_t row = base + tl->row0 + i;
        query_scalar(t, t->q + row * D, kb, vb, tl->L, t->out + row * D, sc);
    }
}

/* ---- packing -------------------------------------------------------------------------------------------- */

/* Head h's keys, segment by segment, into (D, SEG_BK) panels: kp[(panel * D + d) * SEG_BK + j] = key j of the
 * panel, component d; zeros past the segment's end. */
static void pack_heads(void *ctx, int64_t h0, int64_t h1, int32_t tid) {
    (void)tid;
    const seg_task *t = ctx;
    int64_t         D = t->D;
    for (int64_t h = h0; h < h1; h++) {
        float *p = t->kp + h * t->n_panels * D * SEG_BK;
        for (int64_t s = 0; s < t->n_seg; s++) {
            for (int64_t a = t->seg[s]; a < t->seg[s + 1]; a += SEG_BK, p += D * SEG_BK) {
                int64_t n = t->seg[s + 1] - a < SEG_BK ? t->seg[s + 1] - a : SEG_BK;
                for (int64_t j = 0; j < n; j++) {
                    const float *kr = t->k + (h * t->N + a + j) * D;
                    for (int64_t d = 0; d < D; d++) {
                        p[d * SEG_BK + j] = kr[d];
                    }
                }
                for (int64_t d = 0; d < D; d++) {
                    for (int64_t j = n; j < SEG_BK; j++) {
                        p[d * SEG_BK + j] = 0.0f;
                    }
                }
            }
        }
    }
}

/* ---- AVX2 ----------------------------------------------------------------------------------------------- */

#if CAPRL_X86
/* Scores of 4 queries against the SEG_BK keys of one panel: sc[q * lp + j], one FMA chain over d per score. */
static CAPRL_AVX2_INLINE void scores_panel_avx2(float *sc, int64_t lp, const float *const *qr, const float *panel,
                                                int64_t D, __m256 scale) {
    for (int64_t j = 0; j < SEG_BK; j += 16) {
        __m256 acc[4][2];
#    pragma GCC unroll 4
        for (int q = 0; q < 4; q++) {
            acc[q][0] = _mm256_setzero_ps();
            acc[q][1] = _mm256_setzero_ps();
        }
        for (int64_t d = 0; d < D; d++) {
            __m256 k0 = _mm256_loadu_ps(panel + d * SEG_BK + j), k1 = _mm256_loadu_ps(panel + d * SEG_BK + j + 8);
#    pragma GCC unroll 4
            for (int q = 0; q < 4; q++) {
                __m256 qd = _mm256_broadcast_ss(qr[q] + d);
                acc[q][0] = _mm256_fmadd_ps(qd, k0, acc[q][0]);
                acc[q][1] = _mm256_fmadd_ps(qd, k1, acc[q][1]);
            }
        }
#    pragma GCC unroll 4
        for (int q = 0; q < 4; q++) {
            _mm256_storeu_ps(sc + q * lp + j, _mm256_mul_ps(acc[q][0], scale));
            _mm256_storeu_ps(sc + q * lp + j + 8, _mm256_mul_ps(acc[q][1], scale));
        }
    }
}


/* ob[q][0 .. 8 nv) += sum_{i in [i0, i1)} p_q,i v_i[0 .. 8 nv) for 4 queries, one chain per element. */
static CAPRL_AVX2_INLINE void pv4_avx2(const int nv, const bool masked, __m256i m, float *ob, int64_t ostride,
                                       const float *vb, int64_t D, const float *p, int64_t lp, int64_t i0,
                                       int64_t i1) {
    __m256 acc[4][2];
#    pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        for (int j = 0; j < nv; j++) {
            float *o = ob + q * ostride + 8 * j;
            acc[q][j] = masked ? _mm256_maskload_ps(o, m) : _mm256_loadu_ps(o);
        }
    }
    for (int64_t i = i0; i < i1; i++) {
        const float *vr = vb + i * D;
        __m256       v0 = masked ? _mm256_maskload_ps(vr, m) : _mm256_loadu_ps(vr);
        __m256       v1 = nv > 1 ? _mm256_loadu_ps(vr + 8) : v0;
#    pragma GCC unroll 4
        for (int q = 0; q < 4; q++) {
            __m256 pq = _mm256_broadcast_ss(p + q * lp + i);
            acc[q][0] = _mm256_fmadd_ps(pq, v0, acc[q][0]);
            if (nv > 1) {
                acc[q][1] = _mm256_fmadd_ps(pq, v1, acc[q][1]);
            }
        }
    }
#    pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
        for (int j = 0; j < nv; j++) {
            float *o = ob + q * ostride + 8 * j;
            if (masked) {
                _mm256_maskstore_ps(o, m, acc[q][j]);
            } else {
                _mm256_storeu_ps(o, acc[q][j]);
            }
        }
    }
}

/* One key block of P.V for 4 queries over all of D: 16-wide column chunks, then 8, then a masked rest. */
static CAPRL_AVX2_INLINE void pv_block_avx2(float *ob, int64_t ostride, const float *vb, int64_t D, const float *p,
                                            int64_t lp, int64_t i0, int64_t i1) {
    int64_t d = 0, d8 = D & ~(int64_t)7;
    __m256i none = _mm256_setzero_si256();
    for (; d + 16 <= d8; d += 16) {
        pv4_avx2(2, false, none, ob + d, ostride, vb + d, D, p, lp, i0, i1);
    }
    if (d < d8) {
        pv4_avx2(1, false, none, ob + d, ostride, vb + d, D, p, lp, i0, i1);
        d += 8;
    }
    if (d < D) {
        pv4_avx2(1, true, caprl_mask8_avx2(D - d), ob + d, ostride, vb + d, D, p, lp, i0, i1);
    }
}

/* Parts shared by the AVX2 and AVX-512 tiles. The query rows of a tile in whole groups of `group` (the extra rows
 * repeat the last query); returns the rows with the padding. */
static int tile_queries(const seg_task *t, int64_t h, const seg_tile *tl, const float **qr, int group) {
    int nq = (tl->nq + group - 1) / group * group;
    for (int q = 0; q < nq; q++) {
        qr[q] = t->q + (h * t->N + tl->row0 + (q < tl->nq ? q : tl->nq - 1)) * t->D;
    }
    return nq;
}

/* Each real query's score row to softmax numerators; inv[q] = 1 / their sum. */
static CAPRL_AVX2 void tile_softmax(const seg_tile *tl, float *sc, int64_t lp, float *inv) {
    for (int q = 0; q < tl->nq; q++) {
        float mx;
        inv[q] = 1.0f / caprl_softmax_numerators_avx2(sc + q * lp, tl->L, &mx);
    }
}

static CAPRL_AVX512 void tile_softmax_avx512(const seg_tile *tl, float *sc, int64_t lp, float *inv) {
    for (int q = 0; q < tl->nq; q++) {
        float mx;
        inv[q] = 1.0f / caprl_softmax_numerators_avx512(sc + q * lp, tl->L, &mx);
    }
}

/* out rows = the unnormalised rows ob times inv (one multiply per element, as a vector multiply does). */
static void tile_store(const seg_task *t, int64_t h, const seg_tile *tl, const float *ob, const float *inv) {
    for (int32_t q = 0; q < tl->nq; q++) {
        float *o = t->out + (h * t->N + tl->row0 + q) * t->D;
        for (int64_t d = 0; d < t->D; d++) {
            o[d] = ob[q * t->D + d] * inv[q];
        }
    }
}

static CAPRL_AVX2 void tile_avx2(const seg_task *t, int64_t h, const seg_tile *tl, float *sc) {
    int64_t      D = t->D, base = h * t->N, L = tl->L, lp = t->lp_max;
    const float *panels = t->kp + (h * t->n_panels + tl->panel) * D * SEG_BK;
    const float *vb = t->v + (base + tl->a) * D;
    const float *qr[SEG_TQ];
    float       *ob = sc + SEG_TQ * lp; /* (SEG_TQ, D) unnormalised outputs */
    float        inv[SEG_TQ];
    __m256       scale = _mm256_set1_ps(t->scale);
    int          nq = tile_queries(t, h, tl, qr, 4);
    for (int64_t k0 = 0, b = 0; k0 < L; k0 += SEG_BK, b++) {
        for (int g = 0; g < nq; g += 4) {
            scores_panel_avx2(sc + g * lp + k0, lp, qr + g, panels + b * D * SEG_BK, D, scale);
        }
    }
    tile_softmax(tl, sc, lp, inv);
    memset(ob, 0, (size_t)(nq * D) * sizeof(float));
    for (int64_t k0 = 0; k0 < L; k0 += SEG_BK) {
        int64_t k1 = k0 + SEG_BK < L ? k0 + SEG_BK : L;
        for (int g = 0; g < nq; g += 4) {
            pv_block_avx2(ob + g * D, D, vb, D, sc + g * lp, lp, k0, k1);
        }
    }
    tile_store(t, h, tl, ob, inv);
}

/* ---- AVX-512 -------------------------------------------------------------------------------------------- */

/* The AVX2 tile's arithmetic on 16 lanes with more accumulators: every score is the same FMA chain over d, every
 * output element the same chain over the keys, and the softmax is the shared AVX2 one, so both tiles give the
 * same bits. Scores: all 8 queries against 32 keys at a time (16 accumulators, 2 key loads and 8 broadcasts per
 * 16 FMAs). P.V: caprl_accum4xd_avx512, 4 queries x up to 4 column vectors (16 accumulators). */
static CAPRL_AVX512_INLINE void scores_panel_avx512(float *sc, int64_t lp, const float *const *qr,
                                                    const float *panel, int64_t D, __m512 scale) {
    for (int64_t j = 0; j < SEG_BK; j += 32) {
        __m512 acc[SEG_QG][2];
#    pragma GCC unroll 8
        for (int q = 0; q < SEG_QG; q++) {
            acc[q][0] = _mm512_setzero_ps();
            acc[q][1] = _mm512_setzero_ps();
        }
        for (int64_t d = 0; d < D; d++) {
            __m512 k0 = _mm512_loadu_ps(panel + d * SEG_BK + j), k1 = _mm512_loadu_ps(panel + d * SEG_BK + j + 16);
#    pragma GCC unroll 8
            for (int q = 0; q < SEG_QG; q++) {
                __m512 qd = _mm512_set1_ps(qr[q][d]);
                acc[q][0] = _mm512_fmadd_ps(qd, k0, acc[q][0]);
                acc[q][1] = _mm512_fmadd_ps(qd, k1, acc[q][1]);
            }
        }
#    pragma GCC unroll 8
        for (int q = 0; q < SEG_QG; q++) {
            _mm512_storeu_ps(sc + q * lp + j, _mm512_mul_ps(acc[q][0], scale));
            _mm512_storeu_ps(sc + q * lp + j + 16, _mm512_mul_ps(acc[q][1], scale));
        }
    }
}

static CAPRL_AVX512 void tile_avx512(const seg_task *t, int64_t h, const seg_tile *tl, float *sc) {
    int64_t      D = t->D, base = h * t->N, L = tl->L, lp = t->lp_max;
    const float *panels = t->kp + (h * t->n_panels + tl->panel) * D * SEG_BK;
    const float *vb = t->v + (base + tl->a) * D;
    const float *qr[SEG_TQ];
    float       *ob = sc + SEG_TQ * lp; /* (SEG_TQ, D) unnormalised outputs */
    float        inv[SEG_TQ];
    __m512       scale = _mm512_set1_ps(t->scale);
    int          nq = tile_queries(t, h, tl, qr, SEG_QG);
    for (int64_t k0 = 0, b = 0; k0 < L; k0 += SEG_BK, b++) {
        for (int g = 0; g < nq; g += SEG_QG) {
            scores_panel_avx512(sc + g * lp + k0, lp, qr + g, panels + b * D * SEG_BK, D, scale);
        }
    }
    tile_softmax_avx512(tl, sc, lp, inv);
    memset(ob, 0, (size_t)(nq * D) * sizeof(float));
    for (int64_t k0 = 0; k0 < L; k0 += SEG_BK) {
        int64_t k1 = k0 + SEG_BK < L ? k0 + SEG_BK : L;
        for (int g = 0; g < nq; g += 4) {
            caprl_accum4xd_avx512(ob + g * D, D, sc + g * lp + k0, lp, 1, vb + k0 * D, D, k1 - k0, D);
        }
    }
    tile_store(t, h, tl, ob, inv);
}
#endif

/* ---- bf16 operands on the matrix unit ------------------------------------------------------------------ */

#if CAPRL_X86
/* Head h's keys as the B of q k^T (n = the segment's keys, k = D) and its values as the B of p v (n = D, k = the
 * keys), segment by segment, both bf16 in tile panels of the same size (keys rounded up to 32 times dp). */
static void pack_heads_bf16(void *ctx, int64_t h0, int64_t h1, int32_t tid) {
    (void)tid;
    const seg_task *t = ctx;
    int64_t         D = t->D, dp = t->dp;
    for (int64_t h = h0; h < h1; h++) {
        for (int64_t s = 0, key32 = 0; s < t->n_seg; s++) {
            int64_t          a = t->seg[s], L = t->seg[s + 1] - a, l32 = caprl_round_up(L, 32);
            size_t           at = (size_t)((h * t->keys32 + key32) * dp);
            const float     *k = t->k + (h * t->N + a) * D, *v = t->v + (h * t->N + a) * D;
            caprl_amx_panels kp = {.n = L, .k = D, .n_pad = l32, .k_pad = dp, .data = t->kb + at};
            caprl_amx_panels vp = {.n = D, .k = L, .n_pad = dp, .k_pad = l32, .data = t->vb + at};
            caprl_amx_pack_f32_serial(t->c, &kp, k, D, true);
            caprl_amx_pack_f32_serial(t->c, &vp, v, D, false);
            key32 += l32;
        }
    }
}

/* exp(x) for the numerators of the bf16 path (x <= 0, NaN kept): a degree-6 Taylor polynomial on the reduced
 * argument (|r| <= ln 2 / 2) scaled by scalef, within 3e-7 relative (measured over [-80, 0]: 2.3e-7), cheaper than
 * caprl_exp16_avx512's range handling. Below -87 the value is exp(-87), about 1.6e-38, which no sum notices. A
 * degree-5 polynomial (3.3e-6) was faster still, but it moved enough numerators across bf16 rounding boundaries
 * to double the tower's error against its float64 reference (test_vision). */
static CAPRL_AVX512_INLINE __m512 exp_for_bf16_avx512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(CAPRL_EXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(CAPRL_EXP_C1), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(CAPRL_EXP_C2), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.0f / 720), r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* One tile on the bf16 unit: scores = bf16(q) bf16(k)^T (f32 sums) times scale, the softmax numerators and their
 * sum in f32, then bf16(numerators) bf16(v) times 1 / sum. Each query row is its own rows of both products, so
 * its bits do not depend on the tile, the thread or the batch either. */
static CAPRL_AVX512 void tile_bf16(const seg_task *t, int64_t h, const seg_tile *tl, float *scratch) {
    int64_t          D = t->D, dp = t->dp, L = tl->L, l32 = caprl_round_up(L, 32), nq = tl->nq;
    int64_t          lmax = t->lp_max;
    float           *sc = scratch;                       /* (nq, l32) scores */
    float           *ob = sc + SEG_TQ * lmax;             /* (nq, D) unnormalised outputs */
    uint16_t        *pa = (uint16_t *)(ob + SEG_TQ * D);  /* numerators in tile blocks, (32, l32) */
    uint16_t        *qa = pa + SEG_TQ * lmax;             /* queries in tile blocks, (32, dp) */
    size_t           at = (size_t)((h * t->keys32 + tl->key32) * dp);
    caprl_amx_panels kp = {.n = L, .k = D, .n_pad = l32, .k_pad = dp, .data = t->kb + at};
    caprl_amx_panels vp = {.n = D, .k = L, .n_pad = dp, .k_pad = l32, .data = t->vb + at};
    float            inv[SEG_TQ];
    caprl_amx_convert_serial(qa, t->q + (h * t->N + tl->row0) * D, nq, D, dp);
    caprl_bf16_matmul_serial(t->c, sc, l32, qa, &kp, nq);
    /* per row: the max of the scaled scores, then numerators, their sum (16 lane chains, then a fixed tree) and
     * their bf16 roundings in one pass */
    __m512 scale = _mm512_set1_ps(t->scale);
    for (int64_t q = 0; q < caprl_round_up(nq, 16); q++) {
        const float *row = sc + q * l32;
        __m512       hi = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        int64_t      len = q < nq ? L : 0;
        for (int64_t j = 0; j < len; j += 16) {
            __mmask16 m = (__mmask16)(len - j >= 16 ? 0xFFFFu : (1u << (len - j)) - 1u);
            hi = _mm512_mask_max_ps(hi, m, hi, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), scale));
        }
        __m512 mxv = _mm512_set1_ps(_mm512_reduce_max_ps(hi));
        for (int64_t j = 0; j < l32; j += 16) { /* zeros past L and in the padding rows */
            int64_t   n = len - j;
            __mmask16 m = (__mmask16)(n >= 16 ? 0xFFFFu : n > 0 ? (1u << n) - 1u : 0u);
            __m512    x = _mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), scale), mxv);
            __m512    p = _mm512_maskz_mov_ps(m, exp_for_bf16_avx512(x));
            sum = _mm512_add_ps(sum, p);
            __m256i   pb = caprl_bf16_round16_avx512(p);
            _mm256_storeu_si256((__m256i *)(void *)(pa + caprl_amx_a_index(q, j, l32)), pb);
        }
        if (q < nq) {
            __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(sum),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sum), 1)));
            inv[q] = 1.0f / caprl_hsum8_avx2(s8);
        }
    }
    caprl_bf16_matmul_serial(t->c, ob, D, pa, &vp, nq);
    tile_store(t, h, tl, ob, inv);
}
#endif

/* ---- driver --------------------------------------------------------------------------------------------- */

static void seg_range(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    const seg_task *t = ctx;
    float          *sc = t->c->threads[tid].buf;
    for (int64_t u = t->bounds[r0]; u < t->bounds[r1]; u++) {
        int64_t         h = u / t->n_tiles;
        const seg_tile *tl = &t->tiles[u % t->n_tiles];
#if CAPRL_X86
        if (t->kb) {
            tile_bf16(t, h, tl, sc);
            continue;
        }
        if (t->kp && t->c->isa >= CAPRL_ISA_AVX512) {
            tile_avx512(t, h, tl, sc);
            continue;
        }
        if (t->kp) {
            tile_avx2(t, h, tl, sc);
            continue;
        }
#endif
        tile_scalar(t, h, tl, sc);
    }
}

/* The tiles of one head, in segment order; sets the longest segment and the panels per head. */
static int64_t make_tiles(seg_tile *tiles, const int64_t *seg, int64_t n_seg, int64_t *max_len, int64_t *n_panels,
                          int64_t *keys32) {
    int64_t n = 0, panel = 0, key32 = 0;
    *max_len = 0;
    for (int64_t s = 0; s < n_seg; s++) {
        int64_t a = seg[s], b = seg[s + 1];
        *max_len = b - a > *max_len ? b - a : *max_len;
        for (int64_t r = a; r < b; r += SEG_TQ) {
            tiles[n].row0 = r;
            tiles[n].a = a;
            tiles[n].panel = panel;
            tiles[n].key32 = key32;
            tiles[n].nq = (int32_t)(b - r < SEG_TQ ? b - r : SEG_TQ);
            tiles[n].L = (int32_t)(b - a);
            n++;
        }
        panel += (b - a + SEG_BK - 1) / SEG_BK;
        key32 += caprl_round_up(b - a, 32);
    }
    *n_panels = panel;
    *keys32 = key32;
    return n;
}

/* Thread r starts at the first unit whose preceding work reaches r / nt of the total. Returns the total. */
static int64_t split_work(int64_t *bounds, int32_t nt, const seg_tile *tiles, int64_t n_tiles, int64_t H) {
    int64_t work = 0, units = H * n_tiles, acc = 0, u = 0;
    for (int64_t i = 0; i < n_tiles; i++) {
        work += tiles[i].L + SEG_UNIT_COST;
    }
    work *= H;
    bounds[0] = 0;
    for (int32_t r = 1; r < nt; r++) {
        int64_t target = work / nt * r + work % nt * r / nt;
        while (u < units && acc + tiles[u % n_tiles].L + SEG_UNIT_COST <= target) {
            acc += tiles[u % n_tiles].L + SEG_UNIT_COST;
            u++;
        }
        bounds[r] = u;
    }
    bounds[nt] = units;
    return work;
}

void caprl_op_attn_seg(caprl_cpu_ctx *c, float *out, const float *q, const float *k, const float *v,
                       const int64_t *seg, int64_t n_seg, int64_t N, int64_t H, int64_t D, float scale, bool bf16) {
    CAPRL_ASSERT(N >= 0 && H > 0 && D > 0 && n_seg >= 0 && seg[0] == 0 && seg[n_seg] == N);
    for (int64_t s = 0; s < n_seg; s++) {
        CAPRL_ASSERT(seg[s] <= seg[s + 1] && seg[s + 1] - seg[s] <= INT32_MAX);
    }
    if (N == 0) {
        return;
    }
    seg_tile *tiles = caprl_xmalloc((size_t)(N / SEG_TQ + n_seg + 1) * sizeof *tiles);
    int64_t   max_len = 0, n_panels = 0, keys32 = 0;
    int64_t   n_tiles = make_tiles(tiles, seg, n_seg, &max_len, &n_panels, &keys32);
    int64_t   lp = (max_len + SEG_BK - 1) / SEG_BK * SEG_BK;
    bf16 = bf16 && CAPRL_X86 && caprl_bf16_unit_on(c);
    int64_t dp = caprl_round_up(D, 32);
    /* f32: scores and outputs; bf16: scores, outputs, and the numerators and queries in tile blocks */
    size_t scratch = (size_t)(SEG_TQ * (lp + D)) * sizeof(float) +
                     (bf16 ? (size_t)(SEG_TQ * (lp + dp)) * sizeof(uint16_t) : 0);
    if (!caprl_cpu_scratch_reserve(c, scratch)) {
        caprl_abort(__FILE__, __LINE__, "out of memory for attention scores (%lld keys)", (long long)max_len);
    }
    int32_t  nt = c->n_threads;
    int64_t  stack_bounds[17];
    int64_t *bounds = nt < 17 ? stack_bounds : caprl_xmalloc((size_t)(nt + 1) * sizeof(int64_t));
    int64_t  work = split_work(bounds, nt, tiles, n_tiles, H);
    seg_task t = {.c = c, .out = out, .q = q, .k = k, .v = v, .N = N, .D = D, .scale = scale, .tiles = tiles,
                  .n_tiles = n_tiles, .seg = seg, .n_seg = n_seg, .n_panels = n_panels, .bounds = bounds,
                  .lp_max = lp};
    if (bf16) {
        size_t each = (size_t)(H * keys32 * dp) * sizeof(uint16_t);
        t.kb = caprl_cpu_shared_reserve(c, 2 * each);
        if (!t.kb) {
            caprl_abort(__FILE__, __LINE__, "out of memory for packed attention keys (%zu bytes)", 2 * each);
        }
        t.vb = t.kb + each / sizeof(uint16_t);
        t.keys32 = keys32;
        t.dp = dp;
#if CAPRL_X86
        caprl_parallel_for(c->pool, H, pack_heads_bf16, &t);
#endif
    } else if (c->isa >= CAPRL_ISA_AVX2) {
        size_t bytes = (size_t)(H * n_panels * D * SEG_BK) * sizeof(float);
        t.kp = caprl_cpu_shared_reserve(c, bytes);
        if (!t.kp) {
            caprl_abort(__FILE__, __LINE__, "out of memory for packed attention keys (%zu bytes)", bytes);
        }
        caprl_parallel_for(c->pool, H, pack_heads, &t);
    }
    if (nt == 1 || work < SEG_INLINE_WORK / D) {
        seg_range(&t, 0, nt, 0);
    } else {
        caprl_parallel_for(c->pool, nt, seg_range, &t);
    }
    if (bounds != stack_bounds) {
        free(bounds);
    }
    free(tiles);
}
