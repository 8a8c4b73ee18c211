/* Attention forward (spec/qwen.md §2.6) for M query rows with GQA: query head h reads KV head h / (Hq / Hkv).
 * Per (m, h): s_i = dot(q, k_i) * scale for the kv_len[m] rows starting at kv_row0[m]; p_i = exp(s_i - max s);
 * out = (sum_i p_i v_i) * (1 / sum_i p_i), all in f32. Each (m, h) is computed by one thread in a fixed order
 * (dot products: 8 lanes over D and one tree, the same for 1 or 4 keys at a time; sums over i: 8 lanes and one
 * tree; P.V: one sequential chain over i per output element), so results do not depend on M or on the thread
 * count. Units u = m * Hq + h are
 * split into contiguous ranges of equal work (causal rows have very different kv_len). A row with kv_len 0
 * gives zeros. */
#include <stdlib.h>

#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { ATTN_INLINE_WORK = 32768, ATTN_UNIT_COST = 16 };

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
    int64_t       *bounds; /* (n_threads + 1) unit boundaries */
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
#endif

/* ---- driver --------------------------------------------------------------------------------------------- */

static void attn_range(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    const attn_task *t = ctx;
    float           *sc = t->c->threads[tid].buf;
    for (int64_t u = t->bounds[r0]; u < t->bounds[r1]; u++) {
        int64_t m = u / t->Hq, h = u % t->Hq;
#if CAPRL_X86
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
    int64_t max_len = 0, work = 0;
    for (int64_t m = 0; m < M; m++) {
        CAPRL_ASSERT(kv_len[m] >= 0 && kv_row0[m] >= 0);
        max_len = kv_len[m] > max_len ? kv_len[m] : max_len;
        work += (kv_len[m] + ATTN_UNIT_COST) * Hq;
    }
    if (!caprl_cpu_scratch_reserve(c, (size_t)(max_len + 8) * sizeof(float))) {
        caprl_abort(__FILE__, __LINE__, "out of memory for attention scores (%lld keys)", (long long)max_len);
    }
    int32_t  nt = c->n_threads;
    int64_t  stack_bounds[17];
    int64_t *bounds = nt < 17 ? stack_bounds : caprl_xmalloc((size_t)(nt + 1) * sizeof(int64_t));
    /* Thread r starts at the first unit whose preceding work reaches r / nt of the total. */
    int64_t  acc = 0, u = 0;
    bounds[0] = 0;
    for (int32_t r = 1; r < nt; r++) {
        int64_t target = work / nt * r + work % nt * r / nt;
        while (u < M * Hq && acc + (kv_len[u / Hq] + ATTN_UNIT_COST) <= target) {
            acc += kv_len[u / Hq] + ATTN_UNIT_COST;
            u++;
        }
        bounds[r] = u;
    }
    bounds[nt] = M * Hq;
    attn_task t = {
        .c = c, .out = out, .q = q, .k = k, .v = v, .kv_row0 = kv_row0, .kv_len = kv_len,
        .kv_stride = kv_stride, .M = M, .Hq = Hq, .Hkv = Hkv, .D = D, .scale = scale, .bounds = bounds,
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
