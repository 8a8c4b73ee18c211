/* Matmul kernels for the CPU backend: out (M, N) = in (M, K) @ W (N, K)^T (+ bias), W f32 or bf16.
 *
 * f32 kernels (scalar, AVX2, AVX-512) are dot-product kernels: a micro-tile of MR rows of `in` times NR rows
 * of W keeps one vector accumulator per output, runs k = 0..K-1 in vector steps (lane l of the accumulator sees
 * k = l, l + VL, l + 2 VL, ...), handles the K tail with one zero-padded step, reduces the lanes with one fixed
 * tree and then adds the bias. Every tile shape (main MR x NR, edges MR x 1, 1 x 6, 1 x 1) performs exactly
 * those operations for each output, so an output's value depends only on its input row, its weight row and the
 * ISA level: not on M, on the tiling, or on the thread that computes it. Long K runs in L1-sized chunks with
 * the vector accumulators parked in memory between chunks, which changes no value either.
 *
 * Work split: jobs are (weight block of nblk rows, row block of MBLK rows), weight-block-major, and threads get
 * contiguous ranges of jobs; K is never split. A weight block is sized to about half of L2. Inside a job, large
 * row blocks let each group of MR input rows (in L1) sweep the weight block (in L2); small ones (decode batches,
 * M <= 16) take each weight tile from memory once and apply it to every row group while it sits in L1.
 * bf16 weights are widened exactly (bits << 16), in registers for small row blocks, or once per weight block into
 * the thread's scratch for large ones (the f32 kernel then runs at full speed); both give the same products.
 *
 * Where the CPU has a bf16 matrix unit, bf16 weights use it instead, for every M, with the inputs rounded to bf16:
 * AMX-BF16 tiles for prepared weights (gemm_amx.c), or else AVX512-BF16 dot products (vdpbf16ps, below; twice
 * the FMA peak on Zen 4 and 5), through the same blocking and tiles as the AVX-512 f32 kernel. */
#include <stdlib.h>
#include <string.h>

#include "backend/gemm_impl.h"
#include "caprl/tensor.h"
#include "core/error_impl.h"

enum {
    MR_AVX2 = 4,           /* AVX2 tile: rows of `in` (measured best of 4x3, 3x4, 6x2, 5x2, 2x6 on Zen 3) */
    NR_AVX2 = 3,           /* AVX2 tile: weight rows */
    MR_AVX512 = 4,         /* AVX-512 tile (4 x 6 and 6 x 4 measured equal on Sapphire Rapids) */
    NR_AVX512 = 6,
    MBLK = 60,             /* rows of `in` per job (a multiple of every MR) */
    NR_ALIGN = 12,         /* weight blocks are multiples of every NR (and of the single-row path's 6) */
    JOBS_PER_THREAD = 4,   /* at least this many jobs per thread when the shape allows (balance) */
    KC_MIN_CHUNKED = 1024, /* K up to this runs in one pass (measured: chunking costs more than it saves) */
    KC_AVX2 = 768,         /* longest K chunk: 4 input rows (12 KB) + 3 weight rows (9 KB) fit a 32 KB L1 */
    KC_AVX512 = 1024,      /* 4 input rows (16 KB) + 6 weight rows (24 KB) fit a 48 KB L1 */
    KC_AVX512BF16 = 2048,  /* the same in bf16: 4 input rows (16 KB) + 6 weight rows (24 KB) */
    SMALL_M = 16,          /* row blocks up to this take each weight tile from memory once (and widen bf16 in
                            * registers); larger ones widen a bf16 weight block once into scratch */
    NBLK_CHUNKED_AVX2 = 60,    /* most weight rows per job when K is chunked (bounds the parked accumulators) */
    NBLK_CHUNKED_AVX512 = 120, /* (measured 8-15% faster than 60 or 96 on Zen 5, 1 MB L2) */
};

/* One job's block of the product: out rows [0, mrows) x columns [0, ncols), pointers already offset to it. */
typedef struct gemm_blk {
    float       *out;  /* (mrows, ldo) */
    int64_t      ldo;
    const void  *in;   /* (mrows, K): f32, or bf16 for the AVX512-BF16 kernel */
    int64_t      K;
    const void  *w;    /* (ncols, ldw) f32 or bf16 */
    int64_t      ldw;
    const float *bias; /* (ncols) or NULL */
    float       *st;   /* room for mrows * ncols parked accumulators (16 floats each) to run long K in L1-sized
                        * chunks, or NULL to run K in one pass (the values are the same either way) */
    int64_t      mrows, ncols;
} gemm_blk;

typedef void (*block_fn)(const gemm_blk *b, bool wbf16);

typedef struct gemm_task {
    caprl_cpu_ctx *c;
    block_fn       block;
    float         *out;  /* (M, N) */
    const void    *in;   /* (M, K), f32 or (the bf16 dot products) bf16 */
    int64_t        insz; /* bytes per element of in */
    const void    *w;    /* (N, K) f32 or bf16 */
    bool           wbf16;
    bool           widen;     /* bf16 blocks widened into scratch before the f32 kernel */
    bool           chunk;     /* K runs in chunks, accumulators parked at the start of the thread's scratch */
    int64_t        st_floats; /* the parked-accumulator area; a widened block follows it */
    const float   *bias;      /* (N) or NULL */
    int64_t        M, N, K;
    int64_t        nblk;      /* weight rows per job */
    int64_t        n_mblocks; /* row blocks per weight block */
    uint64_t       seq;
} gemm_task;

/* ---- scalar kernels (machines without AVX2; also the readable statement of the arithmetic) ------------- */

static float wval(const void *w, int64_t i, bool wbf16) {
    return wbf16 ? caprl_bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

static void block_scalar(const gemm_blk *b, bool wbf16) {
    for (int64_t m = 0; m < b->mrows; m++) {
        for (int64_t n = 0; n < b->ncols; n++) {
            float s = 0.0f;
            for (int64_t k = 0; k < b->K; k++) {
                s += ((const float *)b->in)[m * b->K + k] * wval(b->w, n * b->ldw + k, wbf16);
            }
            b->out[m * b->ldo + n] = b->bias ? s + b->bias[n] : s;
        }
    }
}

static void widen_scalar(float *dst, const uint16_t *src, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        dst[i] = caprl_bf16_to_f32(src[i]);
    }
}

#if CAPRL_X86
/* ---- AVX2 + FMA: 8 lanes, 4 x 3 tile (12 accumulators + 3 weight vectors + 1 input vector = 16 ymm) -------
 * Reduction of an output: its 8 lanes with caprl_hsum4x8_avx2's tree, then + bias. Long K runs in chunks of at
 * most KC_AVX2 (the 4 input rows of a chunk stay in L1); between chunks the accumulators are parked in memory
 * unchanged, so chunking does not alter any value. */

static CAPRL_AVX2_INLINE __m256 bf16x8_avx2(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static CAPRL_AVX2_INLINE __m128i mask4_avx2(int r) {
    static const int32_t tab[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
    return _mm_loadu_si128((const __m128i *)(tab + 4 - r));
}

/* Writes the nr sums of one tile row (bias added), reducing 4 accumulators at a time. */
static CAPRL_AVX2_INLINE void store_row_avx2(const int nr, float *out, const __m256 *acc, const float *bias) {
#    pragma GCC unroll 2
    for (int j0 = 0; j0 < nr; j0 += 4) {
        const int cnt = nr - j0 < 4 ? nr - j0 : 4;
        __m128    s = caprl_hsum4x8_avx2(acc[j0], acc[j0 + (cnt > 1 ? 1 : 0)], acc[j0 + (cnt > 2 ? 2 : 0)],
                                         acc[j0 + (cnt > 3 ? 3 : 0)]);
        if (cnt == 4) {
            if (bias) {
                s = _mm_add_ps(s, _mm_loadu_ps(bias + j0));
            }
            _mm_storeu_ps(out + j0, s);
        } else {
            __m128i m = mask4_avx2(cnt);
            if (bias) {
                s = _mm_add_ps(s, _mm_maskload_ps(bias + j0, m));
            }
            _mm_maskstore_ps(out + j0, m, s);
        }
    }
}

/* One mr x nr tile (mr, nr <= 6) over k in [k0, k1); called with constant shapes so the loops unroll into
 * registers. first: start from zero (else from the parked state st, accumulator (i, j) at st + (i lds + j) VL);
 * last: reduce and store (else park the accumulators in st). pf: weight rows to prefetch at the same k (the next
 * tile, on the paths that stream weights from memory), or NULL. */
static CAPRL_AVX2_INLINE void tile_avx2(const int mr, const int nr, const bool wbf16, float *out, int64_t ldo,
                                        const void *in_rows, int64_t lda, int64_t k0, int64_t k1, const void *w,
                                        int64_t ldw, const float *bias, float *st, int64_t lds, bool first,
                                        bool last, const char *pf) {
    const float    *in = in_rows;
    const float    *wf = wbf16 ? NULL : (const float *)w;
    const uint16_t *wh = wbf16 ? (const uint16_t *)w : NULL;
    const int64_t   esz = wbf16 ? 2 : 4;
    __m256          acc[6][6];
#    pragma GCC unroll 6
    for (int i = 0; i < mr; i++) {
#    pragma GCC unroll 6
        for (int j = 0; j < nr; j++) {
            acc[i][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(st + (i * lds + j) * 8);
        }
    }
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8) {
        __m256 wv[6];
        if (pf && (k & (64 / esz - 1)) == 0) { /* once per 64-byte line */
#    pragma GCC unroll 6
            for (int j = 0; j < nr; j++) {
                _mm_prefetch(pf + (j * ldw + k) * esz, _MM_HINT_T0);
            }
        }
#    pragma GCC unroll 6
        for (int j = 0; j < nr; j++) {
            wv[j] = wbf16 ? bf16x8_avx2(wh + j * ldw + k) : _mm256_loadu_ps(wf + j * ldw + k);
        }
#    pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            __m256 a = _mm256_loadu_ps(in + i * lda + k);
#    pragma GCC unroll 6
            for (int j = 0; j < nr; j++) {
                acc[i][j] = _mm256_fmadd_ps(a, wv[j], acc[i][j]);
            }
        }
    }
    if (k < k1) { /* the K tail (last chunk only) as one more step with zero padding: 0 * 0 changes no lane */
        int64_t r = k1 - k;
        __m256i mask = caprl_mask8_avx2(r);
        __m256  wv[6];
#    pragma GCC unroll 6
        for (int j = 0; j < nr; j++) {
            if (wbf16) {
                uint16_t t[8] = {0};
                memcpy(t, wh + j * ldw + k, (size_t)r * sizeof(uint16_t));
                wv[j] = bf16x8_avx2(t);
            } else {
                wv[j] = _mm256_maskload_ps(wf + j * ldw + k, mask);
            }
        }
#    pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            __m256 a = _mm256_maskload_ps(in + i * lda + k, mask);
#    pragma GCC unroll 6
            for (int j = 0; j < nr; j++) {
                acc[i][j] = _mm256_fmadd_ps(a, wv[j], acc[i][j]);
            }
        }
    }
    if (!last) {
#    pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
#    pragma GCC unroll 6
            for (int j = 0; j < nr; j++) {
                _mm256_storeu_ps(st + (i * lds + j) * 8, acc[i][j]);
            }
        }
        return;
    }
#    pragma GCC unroll 6
    for (int i = 0; i < mr; i++) {
        store_row_avx2(nr, out + i * ldo, acc[i], bias);
    }
}

#    define GB_ISA avx2
#    define GB_INLINE CAPRL_AVX2_INLINE
#    define GB_TARGET CAPRL_AVX2
#    define GB_MR MR_AVX2
#    define GB_NR NR_AVX2
#    define GB_KC KC_AVX2
#    define GB_VL 8
#    define GB_KSTEP 8
#    define GB_INSZ 4
#    define GB_PF_TILES 1
#    include "backend/gemm_block.inc"

static CAPRL_AVX2 void widen_avx2(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(dst + i, bf16x8_avx2(src + i));
    }
    for (; i < n; i++) {
        dst[i] = caprl_bf16_to_f32(src[i]);
    }
}

/* ---- AVX-512: 16 lanes, 4 x 6 tile (24 accumulators + 6 weight vectors + 1 input vector = 31 zmm) ---------
 * Same structure as AVX2. Reduction of an output: lane l + lane l+8, then the 8-lane tree, then + bias. */

static CAPRL_AVX512_INLINE __m512 bf16x16_avx512(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static CAPRL_AVX512_INLINE __m256 fold16_avx512(__m512 v) {
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return _mm256_add_ps(_mm512_castps512_ps256(v), hi);
}

static CAPRL_AVX512_INLINE void store_row_avx512(const int nr, float *out, const __m512 *acc, const float *bias) {
#    pragma GCC unroll 2
    for (int j0 = 0; j0 < nr; j0 += 4) {
        const int cnt = nr - j0 < 4 ? nr - j0 : 4;
        __m128    s = caprl_hsum4x8_avx2(fold16_avx512(acc[j0]), fold16_avx512(acc[j0 + (cnt > 1 ? 1 : 0)]),
                                         fold16_avx512(acc[j0 + (cnt > 2 ? 2 : 0)]),
                                         fold16_avx512(acc[j0 + (cnt > 3 ? 3 : 0)]));
        __mmask8 m = (__mmask8)((1u << cnt) - 1u);
        if (bias) {
            s = _mm_add_ps(s, _mm_maskz_loadu_ps(m, bias + j0));
        }
        _mm_mask_storeu_ps(out + j0, m, s);
    }
}

/* A tile's accumulators: from zero (first chunk) or from their parked state in st (accumulator (i, j) at
 * st + (i lds + j) 16); at the end of a chunk parked again, or (last chunk) reduced and stored with the bias. */
static CAPRL_AVX512_INLINE void acc_start_avx512(const int mr, const int nr, __m512 acc[6][6], const float *st,
                                                 int64_t lds, bool first) {
#    pragma GCC unroll 6
    for (int i = 0; i < mr; i++) {
#    pragma GCC unroll 6
        for (int j = 0; j < nr; j++) {
            acc[i][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(st + (i * lds + j) * 16);
        }
    }
}

static CAPRL_AVX512_INLINE void acc_finish_avx512(const int mr, const int nr, __m512 acc[6][6], float *st,
                                                  int64_t lds, bool last, float *out, int64_t ldo,
                                                  const float *bias) {
    if (!last) {
#    pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
#    pragma GCC unroll 6
            for (int j = 0; j < nr; j++) {
                _mm512_storeu_ps(st + (i * lds + j) * 16, acc[i][j]);
            }
        }
        return;
    }
#    pragma GCC unroll 6
    for (int i = 0; i < mr; i++) {
        store_row_avx512(nr, out + i * ldo, acc[i], bias);
    }
}

static CAPRL_AVX512_INLINE void tile_avx512(const int mr, const int nr, const bool wbf16, float *out, int64_t ldo,
                                            const void *in_rows, int64_t lda, int64_t k0, int64_t k1, const void *w,
                                            int64_t ldw, const float *bias, float *st, int64_t lds, bool first,
                                            bool last, const char *pf) {
    const float    *in = in_rows;
    const float    *wf = wbf16 ? NULL : (const float *)w;
    const uint16_t *wh = wbf16 ? (const uint16_t *)w : NULL;
    const int64_t   esz = wbf16 ? 2 : 4;
    __m512          acc[6][6];
    acc_start_avx512(mr, nr, acc, st, lds, first);
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
        __m512 wv[6];
        if (pf && (k & (64 / esz - 1)) == 0) { /* once per 64-byte line */
#    pragma GCC unroll 6
            for (int j = 0; j < nr; j++) {
                _mm_prefetch(pf + (j * ldw + k) * esz, _MM_HINT_T0);
            }
        }
#    pragma GCC unroll 6
        for (int j = 0; j < nr; j++) {
            wv[j] = wbf16 ? bf16x16_avx512(_mm256_loadu_si256((const __m256i *)(wh + j * ldw + k)))
                          : _mm512_loadu_ps(wf + j * ldw + k);
        }
#    pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            __m512 a = _mm512_loadu_ps(in + i * lda + k);
#    pragma GCC unroll 6
            for (int j = 0; j < nr; j++) {
                acc[i][j] = _mm512_fmadd_ps(a, wv[j], acc[i][j]);
            }
        }
    }
    if (k < k1) {
        __mmask16 mask = (__mmask16)((1u << (k1 - k)) - 1u);
        __m512    wv[6];
#    pragma GCC unroll 6
        for (int j = 0; j < nr; j++) {
            wv[j] = wbf16 ? bf16x16_avx512(_mm256_maskz_loadu_epi16(mask, wh + j * ldw + k))
                          : _mm512_maskz_loadu_ps(mask, wf + j * ldw + k);
        }
#    pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            __m512 a = _mm512_maskz_loadu_ps(mask, in + i * lda + k);
#    pragma GCC unroll 6
            for (int j = 0; j < nr; j++) {
                acc[i][j] = _mm512_fmadd_ps(a, wv[j], acc[i][j]);
            }
        }
    }
    acc_finish_avx512(mr, nr, acc, st, lds, last, out, ldo, bias);
}

#    define GB_ISA avx512
#    define GB_INLINE CAPRL_AVX512_INLINE
#    define GB_TARGET CAPRL_AVX512
#    define GB_MR MR_AVX512
#    define GB_NR NR_AVX512
#    define GB_KC KC_AVX512
#    define GB_VL 16
#    define GB_KSTEP 16
#    define GB_INSZ 4
#    define GB_PF_TILES 1
#    include "backend/gemm_block.inc"

/* ---- AVX512-BF16: vdpbf16ps, the bf16 matrix arithmetic of CPUs that have it without AMX (Zen 4 and 5) --------
 * bf16 weights only. The input rows are rounded to bf16 once per call (caprl_f32_to_bf16, as on AMX), and each
 * vdpbf16ps adds to lane l the products of the k pair (2l, 2l + 1) of a 32-k step, exactly (bf16 x bf16 fits f32),
 * in the instruction's own order. Same 4 x 6 tile, chunking, parking and reduction as the AVX-512 f32 kernel, so
 * an output again depends only on its input row and weight row. The K tail is one masked step (0 x 0 adds 0).
 * pf: the next tile's weight rows go to L1 and the tile after it to L2 (one 64-byte line of each per k step);
 * with only the first, streaming one row of the lm_head from memory ran slower than widening bf16 to f32. */

static CAPRL_AVX512BF16_INLINE void tile_avx512bf16(const int mr, const int nr, const bool wbf16, float *out,
                                                    int64_t ldo, const void *in_rows, int64_t lda, int64_t k0,
                                                    int64_t k1, const void *w, int64_t ldw, const float *bias,
                                                    float *st, int64_t lds, bool first, bool last, const char *pf) {
    (void)wbf16; /* always bf16 */
    const uint16_t *in = in_rows, *wh = w;
    __m512          acc[6][6];
    acc_start_avx512(mr, nr, acc, st, lds, first);
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) { /* one 64-byte line of each weight row per step */
        __m512i wv[6];
        if (pf) {
#    pragma GCC unroll 6
            for (int j = 0; j < nr; j++) {
                _mm_prefetch(pf + (j * ldw + k) * 2, _MM_HINT_T0);
                _mm_prefetch(pf + ((nr + j) * ldw + k) * 2, _MM_HINT_T1);
            }
        }
#    pragma GCC unroll 6
        for (int j = 0; j < nr; j++) {
            wv[j] = _mm512_loadu_si512(wh + j * ldw + k);
        }
#    pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            __m512bh a = (__m512bh)_mm512_loadu_si512(in + i * lda + k);
#    pragma GCC unroll 6
            for (int j = 0; j < nr; j++) {
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, (__m512bh)wv[j]);
            }
        }
    }
    if (k < k1) {
        __mmask32 mask = (__mmask32)((1ull << (k1 - k)) - 1u);
        __m512i   wv[6];
#    pragma GCC unroll 6
        for (int j = 0; j < nr; j++) {
            wv[j] = _mm512_maskz_loadu_epi16(mask, wh + j * ldw + k);
        }
#    pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            __m512bh a = (__m512bh)_mm512_maskz_loadu_epi16(mask, in + i * lda + k);
#    pragma GCC unroll 6
            for (int j = 0; j < nr; j++) {
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, (__m512bh)wv[j]);
            }
        }
    }
    acc_finish_avx512(mr, nr, acc, st, lds, last, out, ldo, bias);
}

#    define GB_ISA avx512bf16
#    define GB_INLINE CAPRL_AVX512BF16_INLINE
#    define GB_TARGET CAPRL_AVX512BF16
#    define GB_MR MR_AVX512
#    define GB_NR NR_AVX512
#    define GB_KC KC_AVX512BF16
#    define GB_VL 16
#    define GB_KSTEP 32
#    define GB_INSZ 2
#    define GB_PF_TILES 2
#    include "backend/gemm_block.inc"

typedef struct round_task {
    uint16_t    *dst; /* (M, K) */
    const float *src; /* (M, K) */
    int64_t      K;
} round_task;

static CAPRL_AVX512 void round_rows_avx512(void *ctx, int64_t m0, int64_t m1, int32_t tid) {
    (void)tid;
    const round_task *t = ctx;
    for (int64_t i = m0 * t->K, end = m1 * t->K; i < end; i += 16) {
        __mmask16 m = end - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (end - i)) - 1u);
        _mm256_mask_storeu_epi16(t->dst + i, m, caprl_bf16_round16_avx512(_mm512_maskz_loadu_ps(m, t->src + i)));
    }
}
#endif /* CAPRL_X86 */

/* ---- the f32 driver ------------------------------------------------------------------------------------- */

static void widen_rows(const caprl_cpu_ctx *c, float *dst, const uint16_t *src, int64_t n) {
#if CAPRL_X86
    if (c->isa >= CAPRL_ISA_AVX2) {
        widen_avx2(dst, src, n);
        return;
    }
#endif
    (void)c;
    widen_scalar(dst, src, n);
}

static void gemm_range(void *ctx, int64_t j0, int64_t j1, int32_t tid) {
    const gemm_task  *g = ctx;
    caprl_cpu_thread *t = &g->c->threads[tid];
    for (int64_t j = j0; j < j1; j++) {
        int64_t     nb = j / g->n_mblocks, mb = j % g->n_mblocks;
        int64_t     n0 = nb * g->nblk, n1 = n0 + g->nblk < g->N ? n0 + g->nblk : g->N;
        int64_t     m0 = mb * MBLK, m1 = m0 + MBLK < g->M ? m0 + MBLK : g->M;
        const void *w;
        bool        wbf16 = g->wbf16;
        if (wbf16 && g->widen) {
            /* Consecutive jobs of a thread mostly share a weight block: widen it once per call. */
            float *wide = (float *)t->buf + g->st_floats;
            if (t->tag_seq != g->seq || t->tag_n0 != n0) {
                widen_rows(g->c, wide, (const uint16_t *)g->w + n0 * g->K, (n1 - n0) * g->K);
                t->tag_seq = g->seq;
                t->tag_n0 = n0;
            }
            w = wide;
            wbf16 = false;
        } else {
            w = (const char *)g->w + (size_t)(n0 * g->K) * (wbf16 ? 2u : 4u);
        }
        gemm_blk b = {
            .out = g->out + m0 * g->N + n0, .ldo = g->N, .in = (const char *)g->in + m0 * g->K * g->insz,
            .K = g->K, .w = w, .ldw = g->K,
            .bias = g->bias ? g->bias + n0 : NULL, .st = g->chunk ? t->buf : NULL, .mrows = m1 - m0, .ncols = n1 - n0,
        };
        g->block(&b, wbf16);
    }
}

static block_fn pick_block(const caprl_cpu_ctx *c, bool bf16_dot) {
#if CAPRL_X86
    if (bf16_dot) {
        return block_avx512bf16;
    }
    if (c->isa >= CAPRL_ISA_AVX512) {
        return block_avx512;
    }
    if (c->isa >= CAPRL_ISA_AVX2) {
        return block_avx2;
    }
#endif
    (void)c;
    (void)bf16_dot;
    return block_scalar;
}

/* `in` rounded to bf16 rows (M, K) in the shared scratch for the AVX512-BF16 kernel; NULL when memory is gone. */
static const uint16_t *round_inputs(caprl_cpu_ctx *c, const float *in, int64_t M, int64_t K) {
#if CAPRL_X86
    uint16_t *dst = caprl_cpu_shared_reserve(c, (size_t)(M * K) * sizeof(uint16_t));
    if (dst) {
        round_task t = {.dst = dst, .src = in, .K = K};
        caprl_parallel_for(c->pool, M, round_rows_avx512, &t);
    }
    return dst;
#else
    (void)c, (void)in, (void)M, (void)K;
    return NULL;
#endif
}

static void gemm_f32(caprl_cpu_ctx *c, float *out, const float *in, const caprl_weight *w, const float *bias,
                     int64_t M) {
    int64_t N = w->rows, K = w->cols;
    int64_t nt = c->n_threads;
    bool    wbf16 = w->dtype == CAPRL_DTYPE_BF16;
    bool    bf16_dot = caprl_gemm_fwd_unit(c, w) == CAPRL_UNIT_DOT;
    int64_t kc_max = bf16_dot ? KC_AVX512BF16 : c->isa >= CAPRL_ISA_AVX512 ? KC_AVX512 : KC_AVX2;
    bool    chunk = c->isa >= CAPRL_ISA_AVX2 && K > (bf16_dot ? KC_AVX512BF16 : KC_MIN_CHUNKED);
    /* The weight rows of a job (one K chunk of them when chunked; f32, or bf16 for the bf16 dot products) take
     * about half of L2, leaving room for the streamed input rows and the parked accumulators. */
    int64_t nblk = (c->l2_bytes / 2) / ((chunk ? kc_max : (K > 0 ? K : 1)) * (bf16_dot ? 2 : 4));
    nblk = nblk / NR_ALIGN * NR_ALIGN;
    nblk = nblk < NR_ALIGN ? NR_ALIGN : nblk;
    int64_t nblk_chunked = c->isa >= CAPRL_ISA_AVX512 ? NBLK_CHUNKED_AVX512 : NBLK_CHUNKED_AVX2;
    nblk = chunk && nblk > nblk_chunked ? nblk_chunked : nblk;
    int64_t n_mblocks = caprl_ceil_div(M, MBLK);
    if (nt > 1 && n_mblocks * caprl_ceil_div(N, nblk) < JOBS_PER_THREAD * nt) {
        int64_t n_nblocks = caprl_ceil_div(JOBS_PER_THREAD * nt, n_mblocks);
        int64_t want = caprl_round_up(caprl_ceil_div(N, n_nblocks), NR_ALIGN);
        if (want < nblk) {
            nblk = want < NR_ALIGN ? NR_ALIGN : want;
        }
    }
    const void *in_rows = in;
    if (bf16_dot) {
        in_rows = round_inputs(c, in, M, K);
        if (!in_rows) { /* the scratch only fails to grow when memory is gone; there is no status to return */
            caprl_abort(__FILE__, __LINE__, "out of memory for the bf16 activations of a %lld x %lld matmul",
                        (long long)M, (long long)K);
        }
    }
    /* Widening into scratch pays off once a block is reused by several row groups. */
    bool    widen = wbf16 && !bf16_dot && (M < MBLK ? M : MBLK) > SMALL_M;
    int64_t st_floats = chunk ? caprl_round_up((M < MBLK ? M : MBLK) * nblk * 16, 16) : 0;
    size_t  bytes = (size_t)(st_floats + (widen ? nblk * K : 0)) * sizeof(float);
    if (bytes > 0 && !caprl_cpu_scratch_reserve(c, bytes)) {
        chunk = widen = false; /* both are only speed-ups: the values are the same without them */
        st_floats = 0;
    }
    gemm_task g = {
        .c = c,
        .block = pick_block(c, bf16_dot),
        .out = out,
        .in = in_rows,
        .insz = bf16_dot ? 2 : 4,
        .w = w->data,
        .wbf16 = wbf16,
        .widen = widen,
        .chunk = chunk,
        .st_floats = st_floats,
        .bias = bias,
        .M = M,
        .N = N,
        .K = K,
        .nblk = nblk,
        .n_mblocks = n_mblocks,
        .seq = ++c->gemm_seq,
    };
    caprl_parallel_for_grain(c->pool, caprl_ceil_div(N, nblk) * n_mblocks, 1, gemm_range, &g);
}

/* ---- entry point ---------------------------------------------------------------------------------------- */

void caprl_gemm(caprl_cpu_ctx *c, float *out, const float *in, const caprl_weight *w, const float *bias,
                int64_t M) {
    CAPRL_ASSERT(w->dtype == CAPRL_DTYPE_F32 || w->dtype == CAPRL_DTYPE_BF16);
    CAPRL_ASSERT(M >= 0 && w->rows >= 0 && w->cols >= 0);
    if (M == 0 || w->rows == 0) {
        return;
    }
#if CAPRL_X86
    if (caprl_gemm_fwd_unit(c, w) == CAPRL_UNIT_AMX) {
        /* The scratch only fails to grow when memory is gone; there is no status to return here. */
        if (!caprl_gemm_amx_fwd(c, out, in, w, bias, M)) {
            caprl_abort(__FILE__, __LINE__, "out of memory for the bf16 activations of a %lld x %lld matmul",
                        (long long)M, (long long)w->cols);
        }
        return;
    }
#endif
    gemm_f32(c, out, in, w, bias, M);
}
