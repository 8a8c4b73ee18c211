/* Attention forward (spec/qwen.md §2.6) for M query rows with GQA: query head h reads KV head h / (Hq / Hkv).
 * Per (m, h): s_i = dot(q, k_i) * scale for the kv_len[m] rows starting at kv_row0[m]; p_i = exp(s_i - max s);
 * out = (sum_i p_i v_i) * (1 / sum_i p_i), all in f32. Each (m, h) is computed by one thread in a fixed order
 * (dot products: 8 lanes over D and one tree, the same for 1 or 4 keys at a time; sums over i: 8 lanes and one
 * tree; P.V: one sequential chain over i per output element), so results do not depend on M or on the thread
 * count. On AVX-512 a unit is a whole GQA group of one row (its heads share every key and value load, see below)
 * when there are enough of them for the threads, otherwise one head, as on AVX2: the same arithmetic either way.
 * Units are split into contiguous ranges of equal work (causal rows have very different kv_len). A row with
 * kv_len 0 gives zeros. */
#include <stdlib.h>
#include <string.h>

#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { ATTN_INLINE_WORK = 32768, ATTN_UNIT_COST = 16, ATTN_MAX_GROUP = 64 /* query heads per KV head, grouped */ };

typedef struct attn_task {
    caprl_cpu_ctx *c;
    float         *out;     /* (M, Hq, D) */
    const float   *q;       /* (M, Hq, D) */
    const float   *k;       /* rows of kv_stride floats, (Hkv, D) used */
    const float   *v;       /* rows of kv_stride floats, (Hkv, D) used */
    const int64_t *kv_row0; /* (M) */
    const int32_t *kv_len;  /* (M) */
    int64_t        kv_stride, M, Hq, Hkv, D;
    float          scale;
    int64_t        heads_per_unit; /* 1, or Hq / Hkv: a GQA group (AVX-512) */
    int64_t        ldsc;           /* floats per score row in a thread's scratch */
    int64_t       *bounds;         /* (n_threads + 1) unit boundaries */
} attn_task;

/* ---- scalar --------------------------------------------------------------------------------------------- */

static void attn_unit_scalar(const attn_task *t, int64_t m, int64_t h, float *sc) {
    int64_t      D = t->D, n = t->kv_len[m];
    int64_t      g = h / (t->Hq / t->Hkv);
    const float *qv = t->q + (m * t->Hq + h) * D;
    const float *kb = t->k + t->kv_row0[m] * t->kv_stride + g * D;
    const float *vb = t->v + t->kv_row0[m] * t->kv_stride + g * D;
    float       *o = t->out + (m * t->Hq + h) * D;
    float        mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        float s = 0.0f;
        for (int64_t d = 0; d < D; d++) {
            s += qv[d] * kb[i * t->kv_stride + d];
        }
        sc[i] = s * t->scale;
        mx = sc[i] > mx ? sc[i] : mx;
    }
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        sc[i] = caprl_expf_ref(sc[i] - mx);
        sum += sc[i];
    }
    for (int64_t d = 0; d < D; d++) {
        o[d] = 0.0f;
    }
    for (int64_t i = 0; i < n; i++) {
        for (int64_t d = 0; d < D; d++) {
            o[d] += sc[i] * vb[i * t->kv_stride + d];
        }
    }
    float inv = n > 0 ? 1.0f / sum : 0.0f;
    for (int64_t d = 0; d < D; d++) {
        o[d] *= inv;
    }
}

/* ---- AVX2 ----------------------------------------------------------------------------------------------- */

#if CAPRL_X86
/* Scores for nk (1 or 4) keys at once: independent accumulators hide the FMA latency; each score's arithmetic
 * is the same as with nk = 1. */
static CAPRL_AVX2_INLINE void scores_avx2(const int nk, float *sc, const float *qv, const float *kr, int64_t stride,
                                          int64_t D, float scale) {
    __m256  acc[4];
    int64_t d8 = D & ~(int64_t)7;
#    pragma GCC unroll 4
    for (int j = 0; j < nk; j++) {
        acc[j] = _mm256_setzero_ps();
    }
    for (int64_t d = 0; d < d8; d += 8) {
        __m256 qd = _mm256_loadu_ps(qv + d);
#    pragma GCC unroll 4
        for (int j = 0; j < nk; j++) {
            acc[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(kr + j * stride + d), acc[j]);
        }
    }
    if (d8 < D) {
        __m256i mask = caprl_mask8_avx2(D - d8);
        __m256  qd = _mm256_maskload_ps(qv + d8, mask);
#    pragma GCC unroll 4
        for (int j = 0; j < nk; j++) {
            acc[j] = _mm256_fmadd_ps(qd, _mm256_maskload_ps(kr + j * stride + d8, mask), acc[j]);
        }
    }
    __m128 s = caprl_hsum4x8_avx2(acc[0], acc[nk > 1 ? 1 : 0], acc[nk > 2 ? 2 : 0], acc[nk > 3 ? 3 : 0]);
    s = _mm_mul_ps(s, _mm_set1_ps(scale));
    if (nk == 4) {
        _mm_storeu_ps(sc, s);
    } else {
        _mm_store_ss(sc, s);
    }
}

/* o[0 .. 8 nv) = inv * sum_i p_i v_i[0 .. 8 nv), one chain over i per element; the last vector may be partial. */
static CAPRL_AVX2_INLINE void pv_avx2(const int nv, const bool masked, __m256i mask, float *o, const float *vb,
                                      int64_t stride, const float *p, int64_t n, float inv) {
    __m256 acc[8];
#    pragma GCC unroll 8
    for (int j = 0; j < nv; j++) {
        acc[j] = _mm256_setzero_ps();
    }
    for (int64_t i = 0; i < n; i++) {
        __m256       pi = _mm256_broadcast_ss(p + i);
        const float *vr = vb + i * stride;
#    pragma GCC unroll 8
        for (int j = 0; j < nv; j++) {
            __m256 vv = masked ? _mm256_maskload_ps(vr + 8 * j, mask) : _mm256_loadu_ps(vr + 8 * j);
            acc[j] = _mm256_fmadd_ps(pi, vv, acc[j]);
        }
    }
    __m256 iv = _mm256_set1_ps(inv);
#    pragma GCC unroll 8
    for (int j = 0; j < nv; j++) {
        if (masked) {
            _mm256_maskstore_ps(o + 8 * j, mask, _mm256_mul_ps(acc[j], iv));
        } else {
            _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(acc[j], iv));
        }
    }
}

static CAPRL_AVX2 void attn_unit_avx2(const attn_task *t, int64_t m, int64_t h, float *sc) {
    int64_t      D = t->D, n = t->kv_len[m], stride = t->kv_stride;
    int64_t      g = h / (t->Hq / t->Hkv);
    const float *qv = t->q + (m * t->Hq + h) * D;
    const float *kb = t->k + t->kv_row0[m] * stride + g * D;
    const float *vb = t->v + t->kv_row0[m] * stride + g * D;
    float       *o = t->out + (m * t->Hq + h) * D;

    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        scores_avx2(4, sc + i, qv, kb + i * stride, stride, D, t->scale);
    }
    for (; i < n; i++) {
        scores_avx2(1, sc + i, qv, kb + i * stride, stride, D, t->scale);
    }
    float   mx;
    float   sum = caprl_softmax_numerators_avx2(sc, n, &mx);
    float   inv = n > 0 ? 1.0f / sum : 0.0f;
    int64_t d = 0, d8 = D & ~(int64_t)7;
    __m256i none = _mm256_setzero_si256();
    for (; d + 64 <= d8; d += 64) {
        pv_avx2(8, false, none, o + d, vb + d, stride, sc, n, inv);
    }
    if (d + 32 <= d8) {
        pv_avx2(4, false, none, o + d, vb + d, stride, sc, n, inv);
        d += 32;
    }
    if (d + 16 <= d8) {
        pv_avx2(2, false, none, o + d, vb + d, stride, sc, n, inv);
        d += 16;
    }
    if (d + 8 <= d8) {
        pv_avx2(1, false, none, o + d, vb + d, stride, sc, n, inv);
        d += 8;
    }
    if (d < D) {
        pv_avx2(1, true, caprl_mask8_avx2(D - d), o + d, vb + d, stride, sc, n, inv);
    }
}

/* ---- AVX-512: a GQA group at a time ------------------------------------------------------------------------
 * The query heads that share a KV head read the same key and value rows; a unit here is all of them for one query
 * row, so each row is loaded once for the group, with exactly the AVX2 unit's arithmetic for every head:
 * - scores: two heads per 16-lane accumulator (lanes 0-7 one head, 8-15 the next, both multiplied by the same 8
 *   key values), up to 4 head pairs x 4 keys at once; each half is the AVX2 accumulator and is reduced with
 *   caprl_hsum4x8_avx2's tree (both halves at once);
 * - P.V: up to 4 heads x 64 columns at once, one chain over the keys per element (lane-independent, so wider
 *   vectors keep the AVX2 bits).
 * The query rows are first interleaved in pairs, (pair, 8-column chunk, 16), zero past D and past the last head. */

/* lo in lanes 0-7, hi in lanes 8-15 */
static CAPRL_AVX512_INLINE __m512 halves_avx512(__m256 lo, __m256 hi) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}

/* _mm256_hadd_ps in each 256-bit half: per 128-bit lane {a0 + a1, a2 + a3, b0 + b1, b2 + b3} */
static CAPRL_AVX512_INLINE __m512 hadd_lanes_avx512(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Scores of nk (1 or 4) keys for the 2 np heads of np pairs: sc + head * ldsc + key, heads past nh dropped. */
static CAPRL_AVX512_INLINE void scores_group_avx512(const int np, const int nk, float *sc, int64_t ldsc, int nh,
                                                    const float *qi, int64_t nc, const float *kr, int64_t stride,
                                                    int64_t D, float scale) {
    __m512  acc[4][4];
    int64_t c8 = D / 8;
#    pragma GCC unroll 4
    for (int p = 0; p < np; p++) {
#    pragma GCC unroll 4
        for (int j = 0; j < nk; j++) {
            acc[p][j] = _mm512_setzero_ps();
        }
    }
    for (int64_t ci = 0; ci < nc; ci++) {
        __m512 kv[4];
        if (ci < c8) {
#    pragma GCC unroll 4
            for (int j = 0; j < nk; j++) {
                kv[j] = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd((const double *)(kr + j * stride +
                                                                                                 ci * 8))));
            }
        } else { /* the tail chunk: zeros past D, as AVX2's masked loads */
            __mmask8 m = (__mmask8)((1u << (D - ci * 8)) - 1u);
#    pragma GCC unroll 4
            for (int j = 0; j < nk; j++) {
                __m256 x = _mm256_maskz_loadu_ps(m, kr + j * stride + ci * 8);
                kv[j] = halves_avx512(x, x);
            }
        }
#    pragma GCC unroll 4
        for (int p = 0; p < np; p++) {
            __m512 qv = _mm512_loadu_ps(qi + (p * nc + ci) * 16);
#    pragma GCC unroll 4
            for (int j = 0; j < nk; j++) {
                acc[p][j] = _mm512_fmadd_ps(qv, kv[j], acc[p][j]);
            }
        }
    }
    /* Both halves reduced at once: within each 128-bit lane, shuffles + add are _mm256_hadd_ps's sums, and the
     * last step adds the two 128-bit lanes of each half as caprl_hsum4x8_avx2 does. */
    __m512 vs = _mm512_set1_ps(scale);
#    pragma GCC unroll 4
    for (int p = 0; p < np; p++) {
        __m512 x[4];
#    pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            x[j] = acc[p][j < nk ? j : 0];
        }
        __m512 t = hadd_lanes_avx512(hadd_lanes_avx512(x[0], x[1]), hadd_lanes_avx512(x[2], x[3]));
        t = _mm512_mul_ps(_mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1))), vs);
        float *dst = sc + 2 * p * ldsc;
        if (nk == 4) {
            _mm_storeu_ps(dst, _mm512_castps512_ps128(t));
        } else {
            _mm_store_ss(dst, _mm512_castps512_ps128(t));
        }
        if (2 * p + 1 < nh) {
            __m128 b = _mm512_extractf32x4_ps(t, 2);
            if (nk == 4) {
                _mm_storeu_ps(dst + ldsc, b);
            } else {
                _mm_store_ss(dst + ldsc, b);
            }
        }
    }
}

/* All n keys' scores for np pairs of heads (the 2 np heads from the first of sc, nh of them kept). */
static CAPRL_AVX512_INLINE void scores_keys_avx512(const int np, float *sc, int64_t ldsc, int nh, const float *qi,
                                                   int64_t nc, const float *kb, int64_t n, int64_t stride,
                                                   int64_t D, float scale) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        scores_group_avx512(np, 4, sc + i, ldsc, nh, qi, nc, kb + i * stride, stride, D, scale);
    }
    for (; i < n; i++) {
        scores_group_avx512(np, 1, sc + i, ldsc, nh, qi, nc, kb + i * stride, stride, D, scale);
    }
}

static CAPRL_AVX512 void scores_keys(int np, float *sc, int64_t ldsc, int nh, const float *qi, int64_t nc,
                                     const float *kb, int64_t n, int64_t stride, int64_t D, float scale) {
    switch (np) { /* constant np per call, so each body keeps its accumulators in registers */
        case 1: scores_keys_avx512(1, sc, ldsc, nh, qi, nc, kb, n, stride, D, scale); break;
        case 2: scores_keys_avx512(2, sc, ldsc, nh, qi, nc, kb, n, stride, D, scale); break;
        case 3: scores_keys_avx512(3, sc, ldsc, nh, qi, nc, kb, n, stride, D, scale); break;
        default: scores_keys_avx512(4, sc, ldsc, nh, qi, nc, kb, n, stride, D, scale); break;
    }
}

/* The hg heads [h0, h0 + hg) of query row m (one KV head). sc: round_up(hg, 4) score rows of ldsc, then the
 * interleaved q, then 4 D floats for a last group of fewer than 4 heads. */
static CAPRL_AVX512 void attn_group_avx512(const attn_task *t, int64_t m, int64_t h0, float *sc, int64_t ldsc) {
    const int     hg = (int)(t->Hq / t->Hkv), npairs = (hg + 1) / 2, rows = (hg + 3) / 4 * 4;
    const int64_t D = t->D, n = t->kv_len[m], stride = t->kv_stride, nc = (D + 7) / 8;
    const float  *kb = t->k + t->kv_row0[m] * stride + h0 / hg * D;
    const float  *vb = t->v + t->kv_row0[m] * stride + h0 / hg * D;
    float        *qi = sc + rows * ldsc, *o4 = qi + npairs * nc * 16;
    float        *o = t->out + (m * t->Hq + h0) * D;
    for (int p = 0; p < npairs; p++) { /* pairs of query rows interleaved by 8 columns, zero past D and hg */
        const float *qa = t->q + (m * t->Hq + h0 + 2 * p) * D, *qb = qa + D;
        for (int64_t ci = 0; ci < nc; ci++) {
            int64_t  cnt = D - ci * 8 < 8 ? D - ci * 8 : 8;
            __mmask8 mk = (__mmask8)((1u << cnt) - 1u);
            __m256   lo = _mm256_maskz_loadu_ps(mk, qa + ci * 8);
            __m256   hi = 2 * p + 1 < hg ? _mm256_maskz_loadu_ps(mk, qb + ci * 8) : _mm256_setzero_ps();
            _mm512_storeu_ps(qi + (p * nc + ci) * 16, halves_avx512(lo, hi));
        }
    }
    for (int p0 = 0; p0 < npairs; p0 += 4) {
        int np = npairs - p0 < 4 ? npairs - p0 : 4, nh = hg - 2 * p0 < 8 ? hg - 2 * p0 : 8;
        scores_keys(np, sc + 2 * p0 * ldsc, ldsc, nh, qi + p0 * nc * 16, nc, kb, n, stride, D, t->scale);
    }
    float inv[ATTN_MAX_GROUP];
    for (int h = 0; h < hg; h++) {
        float mx, sum = caprl_softmax_numerators_avx512(sc + h * ldsc, n, &mx);
        inv[h] = n > 0 ? 1.0f / sum : 0.0f;
    }
    /* P.V 4 heads at a time from zero; a last group of fewer runs on zero score rows into o4 */
    int h = 0;
    for (; h + 4 <= hg; h += 4) {
        memset(o + h * D, 0, (size_t)(4 * D) * sizeof(float));
        caprl_accum4xd_avx512(o + h * D, D, sc + h * ldsc, ldsc, 1, vb, stride, n, D);
    }
    if (h < hg) {
        for (int r = hg; r < rows; r++) {
            memset(sc + r * ldsc, 0, (size_t)n * sizeof(float));
        }
        memset(o4, 0, (size_t)(4 * D) * sizeof(float));
        caprl_accum4xd_avx512(o4, D, sc + h * ldsc, ldsc, 1, vb, stride, n, D);
        memcpy(o + h * D, o4, (size_t)((hg - h) * D) * sizeof(float));
    }
    for (h = 0; h < hg; h++) { /* acc * inv per element, as AVX2 */
        __m512 iv = _mm512_set1_ps(inv[h]);
        for (int64_t d = 0; d < D; d += 16) {
            __mmask16 mk = (__mmask16)(D - d >= 16 ? 0xFFFFu : (1u << (D - d)) - 1u);
            _mm512_mask_storeu_ps(o + h * D + d, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, o + h * D + d), iv));
        }
    }
}
#endif

/* ---- driver --------------------------------------------------------------------------------------------- */

static void attn_range(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    const attn_task *t = ctx;
    float           *sc = t->c->threads[tid].buf;
    int64_t          units_per_row = t->Hq / t->heads_per_unit;
    for (int64_t u = t->bounds[r0]; u < t->bounds[r1]; u++) {
        int64_t m = u / units_per_row, h = u % units_per_row * t->heads_per_unit;
#if CAPRL_X86
        if (t->heads_per_unit > 1) {
            attn_group_avx512(t, m, h, sc, t->ldsc);
            continue;
        }
        if (t->c->isa >= CAPRL_ISA_AVX2) {
            attn_unit_avx2(t, m, h, sc);
            continue;
        }
#endif
        attn_unit_scalar(t, m, h, sc);
    }
}

void caprl_op_attn(caprl_cpu_ctx *c, float *out, const float *q, const float *k, const float *v,
                   const int64_t *kv_row0, const int32_t *kv_len, int64_t kv_stride, int64_t M, int64_t Hq,
                   int64_t Hkv, int64_t D, float scale) {
    CAPRL_ASSERT(M >= 0 && Hq > 0 && Hkv > 0 && Hq % Hkv == 0 && D > 0 && kv_stride >= Hkv * D);
    if (M == 0) {
        return;
    }
    /* A GQA group per unit where the groups alone give every thread work (a decode step of one sequence has
     * only Hkv of them); either way each head gets the same bits. */
    int64_t group = Hq / Hkv, max_len = 0;
    bool    grouped = CAPRL_X86 && c->isa >= CAPRL_ISA_AVX512 && group > 1 && group <= ATTN_MAX_GROUP &&
                   M * Hkv >= (int64_t)c->n_threads;
    int64_t per_unit = grouped ? group : 1, units = M * Hq / per_unit, units_per_row = Hq / per_unit;
    for (int64_t m = 0; m < M; m++) {
        CAPRL_ASSERT(kv_len[m] >= 0 && kv_row0[m] >= 0);
        max_len = kv_len[m] > max_len ? kv_len[m] : max_len;
    }
    int64_t ldsc = caprl_round_up(max_len + 8, 16);
    size_t  scratch = (size_t)(grouped ? (group + 3) / 4 * 4 * ldsc + (group + 1) / 2 * (D + 7) / 8 * 16 + 4 * D
                                       : ldsc) * sizeof(float);
    if (!caprl_cpu_scratch_reserve(c, scratch)) {
        caprl_abort(__FILE__, __LINE__, "out of memory for attention scores (%lld keys)", (long long)max_len);
    }
    int64_t work = 0;
    for (int64_t m = 0; m < M; m++) {
        work += (kv_len[m] + ATTN_UNIT_COST) * Hq;
    }
    int32_t  nt = c->n_threads;
    int64_t  stack_bounds[17];
    int64_t *bounds = nt < 17 ? stack_bounds : caprl_xmalloc((size_t)(nt + 1) * sizeof(int64_t));
    /* Thread r starts at the first unit whose preceding work reaches r / nt of the total. */
    int64_t  acc = 0, u = 0;
    bounds[0] = 0;
    for (int32_t r = 1; r < nt; r++) {
        int64_t target = work / nt * r + work % nt * r / nt;
        while (u < units && acc + (kv_len[u / units_per_row] + ATTN_UNIT_COST) * per_unit <= target) {
            acc += (kv_len[u / units_per_row] + ATTN_UNIT_COST) * per_unit;
            u++;
        }
        bounds[r] = u;
    }
    bounds[nt] = units;
    attn_task t = {
        .c = c, .out = out, .q = q, .k = k, .v = v, .kv_row0 = kv_row0, .kv_len = kv_len,
        .kv_stride = kv_stride, .M = M, .Hq = Hq, .Hkv = Hkv, .D = D, .scale = scale,
        .heads_per_unit = per_unit, .ldsc = ldsc, .bounds = bounds,
    };
    if (nt == 1 || work * D < ATTN_INLINE_WORK) {
        attn_range(&t, 0, nt, 0);
    } else {
        caprl_parallel_for(c->pool, nt, attn_range, &t);
    }
    if (bounds != stack_bounds) {
        free(bounds);
    }
}
