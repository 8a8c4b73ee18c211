/* CPU op kernels behind the backend table: the shared CPU context (pool, ISA level, per-thread scratch), the
 * forward kernels of src/ops and the exp used by softmax and SiLU.
 *
 * Every kernel partitions its outputs across the pool with a split that never changes the arithmetic of an
 * output: a row (or element) is computed by the same sequence of float operations whatever the thread count,
 * the number of rows M, or the tile that happens to contain it. The ISA level is fixed when the context is
 * created, so one backend always runs one code path. Different ISA levels (scalar, AVX2, AVX-512) may differ in
 * the last bits of reductions; they are never mixed within one backend. */
#ifndef CAPRL_OPS_IMPL_H
#define CAPRL_OPS_IMPL_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "backend/backend.h"
#include "core/pool_impl.h"

#if defined(__x86_64__) && defined(__GNUC__)
#    define CAPRL_X86 1
#    include <immintrin.h>
#else
#    define CAPRL_X86 0
#endif

static inline int64_t caprl_ceil_div(int64_t a, int64_t b) {
    return (a + b - 1) / b;
}

static inline int64_t caprl_round_up(int64_t a, int64_t b) {
    return caprl_ceil_div(a, b) * b;
}

/* Kernel families, lowest to widest. AMX is a separate switch (it changes the matmul numerics on purpose). */
enum { CAPRL_ISA_SCALAR = 0, CAPRL_ISA_AVX2 = 1, CAPRL_ISA_AVX512 = 2 };

/* One thread's scratch: a 64-byte aligned buffer plus a tag naming what it holds (gemm caches a widened
 * weight block across consecutive jobs). Padded so neighbours do not share a cache line. */
typedef struct caprl_cpu_thread {
    void    *buf;
    size_t   cap;     /* bytes */
    uint64_t tag_seq; /* gemm call that filled buf, 0 = nothing */
    int64_t  tag_n0;  /* first weight row widened into buf */
    char     pad_[32];
} caprl_cpu_thread;

/* How the AMX matmul blocks its work (gemm_amx.c). Blocking never changes a result, only speed; CAPRL_AMX_TUNE
 * (e.g. "kc=8,mb=256") overrides the defaults for tuning runs (`caprl bench gemm`). */
typedef struct caprl_amx_tuning {
    int32_t kc_tiles;     /* k tiles (32 wide) per reduction chunk; 0 = the whole reduction in one chunk */
    int32_t row_block_kb; /* bf16 activations per row block in KB; 0 = half of L2 (and long reductions blocked
                             square) */
} caprl_amx_tuning;

typedef struct caprl_cpu_profile caprl_cpu_profile;

typedef struct caprl_cpu_ctx {
    caprl_pool       *pool;      /* borrowed from the backend */
    int32_t           n_threads;
    int32_t           isa;       /* CAPRL_ISA_*, fixed for the context's life */
    bool              amx;       /* matmul may use AMX-BF16 on prepared bf16 weights */
    bool              bf16_dot;  /* no AMX but AVX512-BF16: bf16-weight matmuls run on vdpbf16ps */
    int64_t           l2_bytes;  /* per-core L2 size used for cache blocking */
    caprl_amx_tuning  amx_tuning; /* AMX blocking (speed only) */
    caprl_cpu_profile *profile;  /* per-op times when CAPRL_PROFILE is set (backend_cpu.c), else NULL */
    caprl_cpu_thread *threads;   /* (n_threads) */
    uint64_t          gemm_seq;  /* bumped by every matmul call (scratch tags) */
    void             *shared;    /* AMX and vdpbf16ps: the activations converted to bf16 */
    size_t            shared_cap;
} caprl_cpu_ctx;

/* Makes every thread's scratch at least `bytes` (called by the driving thread, never inside a task).
 * Returns false when the memory cannot be had; the old buffers are then kept. */
bool caprl_cpu_scratch_reserve(caprl_cpu_ctx *c, size_t bytes);
/* Shared scratch of at least `bytes`; NULL when it cannot be had. */
void *caprl_cpu_shared_reserve(caprl_cpu_ctx *c, size_t bytes);

/* ---- forward kernels (semantics: backend/backend.h) -------------------------------------------------------- */

void caprl_op_embed(caprl_cpu_ctx *c,
                    float *out,                /* (M, C) */
                    const int32_t *ids,        /* (M) */
                    const caprl_weight *table, /* (V, C) f32 or bf16 */
                    int64_t M);
void caprl_op_rmsnorm(caprl_cpu_ctx *c,
                      float *out,          /* (M, C), may alias in */
                      const float *in,     /* (M, C) */
                      const float *weight, /* (C) */
                      int64_t M, int64_t C, float eps);
void caprl_op_rope(caprl_cpu_ctx *c,
                   float *x,              /* (M, H, D), in place */
                   const int32_t *pos,    /* (M) */
                   const float *inv_freq, /* (D / 2) */
                   int64_t M, int64_t H, int64_t D);
void caprl_op_attn(caprl_cpu_ctx *c,
                   float *out,             /* (M, Hq, D) */
                   const float *q,         /* (M, Hq, D) */
                   const float *k,         /* rows of kv_stride floats, (Hkv, D) of each used */
                   const float *v,         /* rows of kv_stride floats, (Hkv, D) of each used */
                   const int64_t *kv_row0, /* (M) */
                   const int32_t *kv_len,  /* (M) */
                   int64_t kv_stride, int64_t M, int64_t Hq, int64_t Hkv, int64_t D, float scale);
void caprl_op_swiglu(caprl_cpu_ctx *c,
                     float *out,        /* (n), may alias gate or up */
                     const float *gate, /* (n) */
                     const float *up,   /* (n) */
                     int64_t n);
void caprl_op_add(caprl_cpu_ctx *c,
                  float *acc,     /* (n) */
                  const float *x, /* (n) */
                  int64_t n);
void caprl_op_gelu(caprl_cpu_ctx *c,
                   float *out,      /* (n), may alias in */
                   const float *in, /* (n) */
                   int64_t n);
void caprl_op_rope_sect(caprl_cpu_ctx *c,
                        float *x,               /* rows of x_stride floats, (H, D) of each used, in place */
                        int64_t x_stride,
                        const int32_t *pos,      /* (n_sections, M) */
                        const float *inv_freq,   /* (D / 2) */
                        const int32_t *sections, /* (n_sections) pairs per section, summing to D / 2 */
                        int32_t n_sections, int64_t M, int64_t H, int64_t D);
void caprl_op_attn_seg(caprl_cpu_ctx *c,
                       float *out,         /* (H, N, D) */
                       const float *q,     /* (H, N, D) */
                       const float *k,     /* (H, N, D) */
                       const float *v,     /* (H, N, D) */
                       const int64_t *seg, /* (n_seg + 1) segment row boundaries */
                       int64_t n_seg, int64_t N, int64_t H, int64_t D, float scale,
                       bool bf16);         /* both products on the bf16 matrix unit, when the context has one */

/* ---- training kernels (semantics: backend/backend.h, "training") ------------------------------------------ */

void caprl_op_embed_bwd(caprl_cpu_ctx *c,
                        float *dtable,      /* (V, C), += */
                        const int32_t *ids, /* (M) */
                        const float *dy,    /* (M, C) */
                        int64_t M, int64_t C);
void caprl_op_rmsnorm_bwd(caprl_cpu_ctx *c,
                          float *dx,           /* (M, C), may alias dy */
                          float *dweight,      /* (C), += */
                          const float *dy,     /* (M, C) */
                          const float *x,      /* (M, C) the forward's input */
                          const float *weight, /* (C) */
                          int64_t M, int64_t C, float eps);
void caprl_op_rope_sect_bwd(caprl_cpu_ctx *c,
                            float *dx,              /* rows of x_stride floats, (H, D) of each used, in place */
                            int64_t x_stride,
                            const int32_t *pos,      /* (n_sections, M) */
                            const float *inv_freq,   /* (D / 2) */
                            const int32_t *sections, /* (n_sections) */
                            int32_t n_sections, int64_t M, int64_t H, int64_t D);
void caprl_op_attn_train_fwd(caprl_cpu_ctx *c,
                             float *out,         /* (M, Hq, D) */
                             float *lse,         /* (M, Hq) */
                             const float *q,     /* (M, Hq, D) */
                             const float *k,     /* (M, Hkv, D) */
                             const float *v,     /* (M, Hkv, D) */
                             const int64_t *seg, /* (n_seg + 1) */
                             int64_t n_seg, int64_t M, int64_t Hq, int64_t Hkv, int64_t D, float scale, bool causal);
void caprl_op_attn_train_bwd(caprl_cpu_ctx *c,
                             float *dq,          /* (M, Hq, D) */
                             float *dk,          /* (M, Hkv, D) */
                             float *dv,          /* (M, Hkv, D) */
                             const float *dout,  /* (M, Hq, D) */
                             const float *q, const float *k, const float *v,
                             const float *out,   /* (M, Hq, D) the forward's output */
                             const float *lse,   /* (M, Hq) the forward's log-sum-exp */
                             const int64_t *seg, /* (n_seg + 1) */
                             int64_t n_seg, int64_t M, int64_t Hq, int64_t Hkv, int64_t D, float scale, bool causal);
void caprl_op_swiglu_bwd(caprl_cpu_ctx *c,
                         float *dgate,      /* (n), may alias gate */
                         float *dup,        /* (n), may alias up */
                         const float *dout, /* (n) */
                         const float *gate, /* (n) */
                         const float *up,   /* (n) */
                         int64_t n);
void caprl_op_gelu_bwd(caprl_cpu_ctx *c,
                       float *din,        /* (n), may alias dout */
                       const float *dout, /* (n) */
                       const float *in,   /* (n) */
                       int64_t n);
void caprl_op_logprob_fwd(caprl_cpu_ctx *c,
                          float *logp,           /* (R) */
                          float *entropy,        /* (R) or NULL */
                          float *lse,            /* (R) */
                          const float *z,        /* (R, V) */
                          const int32_t *target, /* (R), < 0: no target */
                          int64_t R, int64_t V, float inv_temp);
void caprl_op_logprob_bwd(caprl_cpu_ctx *c,
                          float *z,              /* (R, V) in place: logits in, gradient out */
                          const float *lse,      /* (R) */
                          const int32_t *target, /* (R) */
                          const float *dlogp,    /* (R) */
                          const float *dentropy, /* (R) or NULL: dL/dentropy */
                          int64_t R, int64_t V, float inv_temp);

/* ---- exp ---------------------------------------------------------------------------------------------------
 * Cephes-style expf: n = rint(x log2e), r = x - n ln2 (two-part constant), a degree-5 polynomial, then the
 * scale 2^n applied as two factors so that overflow gives Inf and deep underflow gives (sub)normals or 0.
 * Max relative error about 2 ulp. The scalar and AVX2 versions perform the identical operations (fmaf vs
 * vfmadd, rint vs vroundps), so tails computed by either agree bit for bit. NaN in, NaN out. */

#define CAPRL_EXP_LO (-104.0f)
#define CAPRL_EXP_HI (89.0f)
#define CAPRL_EXP_LOG2E 1.44269504088896341f
#define CAPRL_EXP_C1 0.693359375f
#define CAPRL_EXP_C2 (-2.12194440e-4f)
#define CAPRL_EXP_P0 1.9875691500e-4f
#define CAPRL_EXP_P1 1.3981999507e-3f
#define CAPRL_EXP_P2 8.3334519073e-3f
#define CAPRL_EXP_P3 4.1665795894e-2f
#define CAPRL_EXP_P4 1.6666665459e-1f
#define CAPRL_EXP_P5 5.0000001201e-1f

static inline float caprl_expf_ref(float x) {
    if (x != x) {
        return x;
    }
    if (x < CAPRL_EXP_LO) {
        return 0.0f;
    }
    float xc = x > CAPRL_EXP_HI ? CAPRL_EXP_HI : x;
    float n = rintf(xc * CAPRL_EXP_LOG2E);
    float r = fmaf(n, -CAPRL_EXP_C1, xc);
    r = fmaf(n, -CAPRL_EXP_C2, r);
    float p = fmaf(CAPRL_EXP_P0, r, CAPRL_EXP_P1);
    p = fmaf(p, r, CAPRL_EXP_P2);
    p = fmaf(p, r, CAPRL_EXP_P3);
    p = fmaf(p, r, CAPRL_EXP_P4);
    p = fmaf(p, r, CAPRL_EXP_P5);
    p = fmaf(p, r * r, r);
    p = p + 1.0f;
    int32_t ni = (int32_t)n;
    int32_t n1 = ni >> 1; /* floor(ni / 2): both halves stay in the normal exponent range */
    int32_t n2 = ni - n1;
    uint32_t b1 = (uint32_t)(n1 + 127) << 23, b2 = (uint32_t)(n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, 4);
    memcpy(&s2, &b2, 4);
    return (p * s1) * s2;
}

#if CAPRL_X86
#    define CAPRL_AVX2 __attribute__((target("avx2,fma,f16c")))
#    define CAPRL_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline
#    define CAPRL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#    define CAPRL_AVX512_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"), always_inline)) inline
/* AVX-512 with the bf16 dot product (vdpbf16ps): Zen 4 and 5, Cooper Lake, and the AMX Xeons */
#    define CAPRL_AVX512BF16 __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#    define CAPRL_AVX512BF16_INLINE                                                                            \
        __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx2,fma,f16c"), always_inline)) inline

static CAPRL_AVX2_INLINE __m256 caprl_exp8_avx2(__m256 x) {
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(CAPRL_EXP_LO)), _mm256_set1_ps(CAPRL_EXP_HI));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(CAPRL_EXP_LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-CAPRL_EXP_C1), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-CAPRL_EXP_C2), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(CAPRL_EXP_P0), r, _mm256_set1_ps(CAPRL_EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CAPRL_EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CAPRL_EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CAPRL_EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CAPRL_EXP_P5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
    p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i n1 = _mm256_srai_epi32(ni, 1);
    __m256i n2 = _mm256_sub_epi32(ni, n1);
    __m256i bias = _mm256_set1_epi32(127);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    __m256 res = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    res = _mm256_blendv_ps(res, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(CAPRL_EXP_LO), _CMP_LT_OQ));
    return _mm256_blendv_ps(res, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

/* Sum of the 8 lanes in one fixed tree: (l + l+4), then (l + l+2), then lane 0 + lane 1. Every kernel that
 * reduces an 8-lane accumulator uses this, so edge and main paths agree. */
static CAPRL_AVX2_INLINE float caprl_hsum8_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Four 8-lane sums at once, lane i of the result = sum of v_i in the fixed tree ((l0 + l1) + (l2 + l3)) +
 * ((l4 + l5) + (l6 + l7)). Passing the same vector several times gives that vector's sum with the same tree, so
 * kernels reduce 1 to 4 accumulators at a time and still agree bit for bit. */
static CAPRL_AVX2_INLINE __m128 caprl_hsum4x8_avx2(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* Lane mask with the first r (0..8) lanes set, for maskload/maskstore. */
static CAPRL_AVX2_INLINE __m256i caprl_mask8_avx2(int64_t r) {
    static const int32_t tab[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i *)(tab + 8 - r));
}

/* The maximum of row[0, n) (-inf for n = 0), 8 lanes then the lanes in order (a NaN lane is skipped). */
static CAPRL_AVX2_INLINE float caprl_row_max_avx2(const float *row, int64_t n) {
    int64_t n8 = n & ~(int64_t)7;
    __m256  mv = _mm256_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n8; i += 8) { /* a maximum is exact: any grouping gives the same value */
        mv = _mm256_max_ps(mv, _mm256_loadu_ps(row + i));
    }
    float mt[8];
    _mm256_storeu_ps(mt, mv);
    float mx = -INFINITY;
    for (int i = 0; i < 8; i++) {
        mx = mt[i] > mx ? mt[i] : mx;
    }
    for (int64_t i = n8; i < n; i++) {
        mx = row[i] > mx ? row[i] : mx;
    }
    return mx;
}

/* Softmax numerators exp(x - max) of row[0, n) in place (nothing past n is written); returns their sum (8 lane
 * chains, then caprl_hsum8_avx2) and the max in *mx_out (-inf and 0 for n = 0). Every attention kernel uses this
 * one, so forward, segmented and training attention agree bit for bit. */
static CAPRL_AVX2_INLINE float caprl_softmax_numerators_avx2(float *row, int64_t n, float *mx_out) {
    int64_t n8 = n & ~(int64_t)7;
    float   mx = caprl_row_max_avx2(row, n);
    __m256  mxv = _mm256_set1_ps(mx), sumv = _mm256_setzero_ps();
    for (int64_t i = 0; i < n8; i += 8) {
        __m256 p = caprl_exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(row + i), mxv));
        _mm256_storeu_ps(row + i, p);
        sumv = _mm256_add_ps(sumv, p);
    }
    if (n8 < n) {
        __m256i m = caprl_mask8_avx2(n - n8);
        __m256  p = caprl_exp8_avx2(_mm256_sub_ps(_mm256_maskload_ps(row + n8, m), mxv));
        p = _mm256_and_ps(p, _mm256_castsi256_ps(m));
        _mm256_maskstore_ps(row + n8, m, p);
        sumv = _mm256_add_ps(sumv, p);
    }
    *mx_out = mx;
    return caprl_hsum8_avx2(sumv);
}

/* o (4 rows, stride ldo) += A B over t < n: o[r][c] += A[t ats + r ars] B[t ldb + c], one FMA chain over t per
 * element, for the 16 nv columns at o (the last vector takes the lanes of `last`). The weighted sums of the
 * attention kernels (P.V, dS.K, P^T.dout, dS^T.q); the AVX2 forms compute the same chains 8 columns at a time. */
static CAPRL_AVX512_INLINE void caprl_accum4_avx512(const int nv, __mmask16 last, float *o, int64_t ldo,
                                                    const float *A, int64_t ars, int64_t ats, const float *B,
                                                    int64_t ldb, int64_t n) {
    __m512 acc[4][4];
#    pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
#    pragma GCC unroll 4
        for (int j = 0; j < nv; j++) {
            acc[r][j] = _mm512_maskz_loadu_ps(j == nv - 1 ? last : (__mmask16)0xFFFF, o + r * ldo + 16 * j);
        }
    }
    for (int64_t t = 0; t < n; t++) {
        const float *br = B + t * ldb, *at = A + t * ats;
        __m512       b[4];
#    pragma GCC unroll 4
        for (int j = 0; j < nv; j++) {
            b[j] = _mm512_maskz_loadu_ps(j == nv - 1 ? last : (__mmask16)0xFFFF, br + 16 * j);
        }
#    pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            __m512 a = _mm512_set1_ps(at[r * ars]);
#    pragma GCC unroll 4
            for (int j = 0; j < nv; j++) {
                acc[r][j] = _mm512_fmadd_ps(a, b[j], acc[r][j]);
            }
        }
    }
#    pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
#    pragma GCC unroll 4
        for (int j = 0; j < nv; j++) {
            _mm512_mask_storeu_ps(o + r * ldo + 16 * j, j == nv - 1 ? last : (__mmask16)0xFFFF, acc[r][j]);
        }
    }
}

/* caprl_exp8_avx2's operations on 16 lanes: the same value in every lane. */
static CAPRL_AVX512_INLINE __m512 caprl_exp16_avx512(__m512 x) {
    __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(CAPRL_EXP_LO)), _mm512_set1_ps(CAPRL_EXP_HI));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(CAPRL_EXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-CAPRL_EXP_C1), xc);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-CAPRL_EXP_C2), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(CAPRL_EXP_P0), r, _mm512_set1_ps(CAPRL_EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CAPRL_EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CAPRL_EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CAPRL_EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CAPRL_EXP_P5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
    __m512i ni = _mm512_cvtps_epi32(n);
    __m512i n1 = _mm512_srai_epi32(ni, 1);
    __m512i n2 = _mm512_sub_epi32(ni, n1);
    __m512i bias = _mm512_set1_epi32(127);
    __m512  s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n1, bias), 23));
    __m512  s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n2, bias), 23));
    __m512  res = _mm512_mul_ps(_mm512_mul_ps(p, s1), s2);
    res = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(CAPRL_EXP_LO), _CMP_LT_OQ), res,
                               _mm512_setzero_ps());
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), res, x);
}

/* caprl_softmax_numerators_avx2 with the exponentials 16 at a time: the same max, the same values, and each half
 * added to the same 8 lane chains in the same order, so the same bits. */
static CAPRL_AVX512_INLINE float caprl_softmax_numerators_avx512(float *row, int64_t n, float *mx_out) {
    float   mx = caprl_row_max_avx2(row, n);
    __m512  mxv = _mm512_set1_ps(mx);
    __m256  sumv = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 p = caprl_exp16_avx512(_mm512_sub_ps(_mm512_loadu_ps(row + i), mxv));
        _mm512_storeu_ps(row + i, p);
        sumv = _mm256_add_ps(sumv, _mm512_castps512_ps256(p));
        sumv = _mm256_add_ps(sumv, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1)));
    }
    if (i < n) { /* lanes past n are +0, as in the AVX2 tail */
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        __m512    p = _mm512_maskz_mov_ps(m, caprl_exp16_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + i), mxv)));
        _mm512_mask_storeu_ps(row + i, m, p);
        sumv = _mm256_add_ps(sumv, _mm512_castps512_ps256(p));
        if (n - i > 8) {
            sumv = _mm256_add_ps(sumv, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1)));
        }
    }
    *mx_out = mx;
    return caprl_hsum8_avx2(sumv);
}

/* The same over all D columns of o, 64 at a time (not forced inline: callers dispatch to it from plain code). */
static CAPRL_AVX512 inline void caprl_accum4xd_avx512(float *o, int64_t ldo, const float *A, int64_t ars, int64_t ats,
                                                       const float *B, int64_t ldb, int64_t n, int64_t D) {
    for (int64_t d = 0; d < D; d += 64) {
        int64_t   cols = D - d < 64 ? D - d : 64;
        __mmask16 last = (__mmask16)(cols % 16 ? (1u << (cols % 16)) - 1u : 0xFFFFu);
        switch ((cols + 15) / 16) { /* constant nv per call, so each body keeps its accumulators in registers */
        case 1: caprl_accum4_avx512(1, last, o + d, ldo, A, ars, ats, B + d, ldb, n); break;
        case 2: caprl_accum4_avx512(2, last, o + d, ldo, A, ars, ats, B + d, ldb, n); break;
        case 3: caprl_accum4_avx512(3, last, o + d, ldo, A, ars, ats, B + d, ldb, n); break;
        default: caprl_accum4_avx512(4, last, o + d, ldo, A, ars, ats, B + d, ldb, n); break;
        }
    }
}
#endif

#endif /* CAPRL_OPS_IMPL_H */
