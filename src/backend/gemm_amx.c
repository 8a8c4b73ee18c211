/* Matmuls on the AMX tile unit (bf16 operands, f32 accumulation): the forward out = in @ W^T and both backward
 * products of a linear layer, dx = dy @ W and dw += dy^T @ x, all through one driver for C (R, Nc) (+)= A (R, Kr)
 * @ B (Kr, Nc):
 *   forward:  A = in (rounded per call),   B = W^T (packed once per weight, caprl_amx_weight.fwd)
 *   data:     A = dy (rounded per call),   B = W   (packed once per weight for training, caprl_amx_weight.bwd)
 *   weight:   A = dy^T (transposed and rounded per call), B = x (packed per call), C starts from dw
 * A is bf16 in tile blocks (caprl_amx_a_index: each 16 x 32 tile contiguous, so a tile load reads 1 KB in one
 * stream instead of 16 rows of a long matrix) with rows padded to 16 and the reduction to 32 with zeros; B is in
 * tile panels (caprl_amx_panels, gemm_impl.h). Each output row of a tile product depends only on the matching row
 * of A, and the reduction runs in the same tile order for every blocking and thread count (partial sums parked in
 * C are exact f32), so results do not depend on R or on the partition.
 *
 * CPUs with AVX512-BF16 and no AMX (Zen 4 and 5) run the backward products through the same driver, panels and A
 * blocks, with a vdpbf16ps kernel in place of the tile products (dot_block); their forward reads the stored weights
 * (gemm_cpu.c). So the driver and the packing run, and are tested, on those machines too. The packing code is
 * plain C with AVX2 fast paths for whole tiles (every AMX machine has AVX2). */
#include <stdlib.h>
#include <string.h>

#include "backend/gemm_impl.h"
#include "caprl/tensor.h"
#include "core/error_impl.h"

/* ---- packing ------------------------------------------------------------------------------------------- */

/* Where B comes from: B[k][n] = W[n][k] (bf16, forward), B[k][n] = W[k][n] (bf16, backward data),
 * B[k][n] = bf16(x[k][n]) (f32, backward weight; attention values) or B[k][n] = bf16(x[n][k]) (f32, attention
 * keys); ld is the source's row stride in elements. */
typedef enum { SRC_BF16_T, SRC_BF16, SRC_F32, SRC_F32_T } src_kind;

typedef struct pack_task {
    const caprl_amx_panels *p;
    const void             *src;
    int64_t                 ld;
    src_kind                kind;
    bool                    avx2;
} pack_task;

static uint16_t src_at(const pack_task *t, int64_t k, int64_t n) {
    if (k >= t->p->k || n >= t->p->n) {
        return 0;
    }
    switch (t->kind) {
    case SRC_BF16_T: return ((const uint16_t *)t->src)[n * t->ld + k];
    case SRC_BF16: return ((const uint16_t *)t->src)[k * t->ld + n];
    case SRC_F32_T: return caprl_f32_to_bf16(((const float *)t->src)[n * t->ld + k]);
    default: return caprl_f32_to_bf16(((const float *)t->src)[k * t->ld + n]);
    }
}

static void pack_tile_scalar(const pack_task *t, uint16_t *tile, int64_t panel, int64_t tk) {
    for (int64_t r = 0; r < 16; r++) {
        for (int64_t col = 0; col < 16; col++) {
            tile[r * 32 + 2 * col] = src_at(t, 32 * tk + 2 * r, 16 * panel + col);
            tile[r * 32 + 2 * col + 1] = src_at(t, 32 * tk + 2 * r + 1, 16 * panel + col);
        }
    }
}

#if CAPRL_X86
/* r[i] <- column i of the 8 x 8 block of 32-bit words in r (moves only: the bits are kept). */
static CAPRL_AVX2_INLINE void transpose8x8_avx2(__m256 r[8]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++) {
        s[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
        s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
        s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
        s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
    }
}

/* Eight f32 -> bf16 in the low half of each 32-bit lane, the rounding of caprl_f32_to_bf16 (nearest even, NaN kept
 * quiet with its sign). */
static CAPRL_AVX2_INLINE __m256i bf16_round8_avx2(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i hi = _mm256_srli_epi32(u, 16);
    __m256i bias = _mm256_add_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
}

/* Pairs of reduction rows k, k + 1 of an f32 source, eight columns:
 * lane i = bf16(row k)[i] | bf16(row k + 1)[i] << 16. */
static CAPRL_AVX2_INLINE __m256i pair_f32_avx2(const float *row0, const float *row1) {
    __m256i lo = bf16_round8_avx2(_mm256_loadu_ps(row0)), hi = bf16_round8_avx2(_mm256_loadu_ps(row1));
    return _mm256_or_si256(lo, _mm256_slli_epi32(hi, 16));
}

/* One whole tile (every element inside B). As 32-bit words the tile is word[r][c] = (B[32tk + 2r][16p + c],
 * B[32tk + 2r + 1][16p + c]). */
static CAPRL_AVX2 void pack_tile_avx2(const pack_task *t, uint16_t *tile, int64_t panel, int64_t tk) {
    int64_t k0 = 32 * tk, n0 = 16 * panel, ld = t->ld;
    if (t->kind == SRC_BF16_T || t->kind == SRC_F32_T) {
        /* word[r][c] is the pair at source row n0 + c, columns k0 + 2r and k0 + 2r + 1: a 16 x 16 transpose of
         * words, in 8 x 8 blocks (an f32 source's 8 words are made from 16 rounded floats) */
        for (int cb = 0; cb < 16; cb += 8) {
            for (int rb = 0; rb < 16; rb += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) {
                    int64_t at = (n0 + cb + i) * ld + k0 + 2 * rb;
                    if (t->kind == SRC_BF16_T) {
                        r[i] = _mm256_loadu_ps((const float *)(const void *)((const uint16_t *)t->src + at));
                        continue;
                    }
                    const float *row = (const float *)t->src + at;
                    __m256i      lo = bf16_round8_avx2(_mm256_loadu_ps(row));
                    __m256i      hi = bf16_round8_avx2(_mm256_loadu_ps(row + 8));
                    /* 16-bit halves in order: lanes (lo 0-3, hi 0-3, lo 4-7, hi 4-7) put back as (lo, hi) */
                    r[i] = _mm256_castsi256_ps(_mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8));
                }
                transpose8x8_avx2(r);
                for (int i = 0; i < 8; i++) {
                    _mm256_storeu_ps((float *)(void *)(tile + (rb + i) * 32 + 2 * cb), r[i]);
                }
            }
        }
    } else if (t->kind == SRC_BF16) {
        const uint16_t *w = t->src;
        for (int r = 0; r < 16; r++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(const void *)(w + (k0 + 2 * r) * ld + n0));
            __m256i b = _mm256_loadu_si256((const __m256i *)(const void *)(w + (k0 + 2 * r + 1) * ld + n0));
            __m256i lo = _mm256_unpacklo_epi16(a, b), hi = _mm256_unpackhi_epi16(a, b); /* per 128-bit lane */
            _mm256_storeu_si256((__m256i *)(void *)(tile + r * 32), _mm256_permute2x128_si256(lo, hi, 0x20));
            _mm256_storeu_si256((__m256i *)(void *)(tile + r * 32 + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
        }
    } else {
        const float *x = t->src;
        for (int r = 0; r < 16; r++) {
            const float *r0 = x + (k0 + 2 * r) * ld + n0, *r1 = r0 + ld;
            _mm256_storeu_si256((__m256i *)(void *)(tile + r * 32), pair_f32_avx2(r0, r1));
            _mm256_storeu_si256((__m256i *)(void *)(tile + r * 32 + 16), pair_f32_avx2(r0 + 8, r1 + 8));
        }
    }
}
#endif

static void pack_range(void *ctx, int64_t p0, int64_t p1, int32_t tid) {
    (void)tid;
    const pack_task        *t = ctx;
    const caprl_amx_panels *p = t->p;
    int64_t                 kt = p->k_pad / 32;
    for (int64_t panel = p0; panel < p1; panel++) {
        for (int64_t tk = 0; tk < kt; tk++) {
            uint16_t *tile = p->data + (panel * kt + tk) * 512;
#if CAPRL_X86
            if (t->avx2 && 16 * panel + 16 <= p->n && 32 * tk + 32 <= p->k) {
                pack_tile_avx2(t, tile, panel, tk);
                continue;
            }
#endif
            pack_tile_scalar(t, tile, panel, tk);
        }
    }
}

static void pack_panels(caprl_cpu_ctx *c, const caprl_amx_panels *p, const void *src, int64_t ld, src_kind kind) {
    pack_task t = {.p = p, .src = src, .ld = ld, .kind = kind, .avx2 = c->isa >= CAPRL_ISA_AVX2};
    caprl_parallel_for(c->pool, p->n_pad / 16, pack_range, &t);
}

void caprl_amx_pack_weight(caprl_cpu_ctx *c, const caprl_amx_panels *p, const uint16_t *w, bool backward) {
    pack_panels(c, p, w, backward ? p->n : p->k, backward ? SRC_BF16 : SRC_BF16_T);
}

void caprl_amx_pack_f32(caprl_cpu_ctx *c, const caprl_amx_panels *p, const float *x) {
    pack_panels(c, p, x, p->n, SRC_F32);
}

typedef struct pack_at_task {
    uint16_t    *a;   /* caprl_round_up(N, 16) rows x lda, in tile blocks */
    const float *dy;  /* (M, N) */
    int64_t      M, N, lda;
    bool         avx2;
} pack_at_task;

#if CAPRL_X86
/* Words [0, j_full) of rows n0 .. n0 + 7 (all inside N; j_full a multiple of 8 with 2 j_full <= M). */
static CAPRL_AVX2 void pack_at_block_avx2(const pack_at_task *t, int64_t n0, int64_t j_full) {
    int64_t N = t->N;
    for (int64_t j0 = 0; j0 < j_full; j0 += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; i++) {
            const float *row = t->dy + 2 * (j0 + i) * N + n0;
            r[i] = _mm256_castsi256_ps(pair_f32_avx2(row, row + N));
        }
        transpose8x8_avx2(r);
        for (int i = 0; i < 8; i++) { /* 16 elements of row n0 + i from m = 2 j0: inside one tile */
            _mm256_storeu_ps((float *)(void *)(t->a + caprl_amx_a_index(n0 + i, 2 * j0, t->lda)), r[i]);
        }
    }
}
#endif

/* Rows [8 g0, 8 g1) of A = bf16(dy^T): A[n][m] = bf16(dy[m][n]), zero beyond M and N. As 32-bit words
 * A[n][j] = (bf16(dy[2j][n]), bf16(dy[2j + 1][n])): whole 8 x 8 blocks of words are 8 vectors of pairs over n,
 * transposed. */
static void pack_at_range(void *ctx, int64_t g0, int64_t g1, int32_t tid) {
    (void)tid;
    const pack_at_task *t = ctx;
    int64_t             M = t->M, N = t->N, lda = t->lda, n_rows = caprl_round_up(N, 16);
    for (int64_t g = g0; g < g1; g++) {
        int64_t   n0 = 8 * g;
        int64_t   j_full = (n0 + 8 <= N) ? M / 16 * 8 : 0; /* words done by whole blocks */
#if CAPRL_X86
        if (t->avx2 && j_full > 0) {
            pack_at_block_avx2(t, n0, j_full);
        } else {
            j_full = 0;
        }
#else
        j_full = 0;
#endif
        for (int64_t n = n0; n < n0 + 8 && n < n_rows; n++) {
            for (int64_t m = 2 * j_full; m < lda; m++) {
                t->a[caprl_amx_a_index(n, m, lda)] = n < N && m < M ? caprl_f32_to_bf16(t->dy[m * N + n]) : 0;
            }
        }
    }
}

void caprl_amx_pack_dy_t(caprl_cpu_ctx *c, uint16_t *a, int64_t lda, const float *dy, int64_t M, int64_t N) {
    pack_at_task t = {.a = a, .dy = dy, .M = M, .N = N, .lda = lda, .avx2 = c->isa >= CAPRL_ISA_AVX2};
    caprl_parallel_for(c->pool, caprl_round_up(N, 16) / 8, pack_at_range, &t);
}

/* ---- packed weights ------------------------------------------------------------------------------------ */

static caprl_amx_panels panels_of(int64_t n, int64_t k) {
    return (caprl_amx_panels){.n = n, .k = k, .n_pad = caprl_round_up(n, 32), .k_pad = caprl_round_up(k, 32)};
}

static size_t panels_bytes(const caprl_amx_panels *p) {
    return (size_t)p->n_pad * (size_t)p->k_pad * sizeof(uint16_t);
}

caprl_status caprl_gemm_prepare(caprl_cpu_ctx *c, caprl_weight *w, caprl_error *err) {
    /* AMX multiplies from panels in every pass; vdpbf16ps only in the backward ones (its forward kernel reads the
     * weight as stored, gemm_cpu.c) */
    bool fwd_panels = c->amx, bwd_panels = caprl_bf16_unit_on(c) && w->backward;
    if ((!fwd_panels && !bwd_panels) || w->dtype != CAPRL_DTYPE_BF16 || w->rows <= 0 || w->cols <= 0) {
        return CAPRL_OK;
    }
    caprl_amx_panels fwd = panels_of(w->rows, w->cols), bwd = panels_of(w->cols, w->rows);
    caprl_amx_weight *pw = w->packed;
    if (pw && (pw->fwd.n != fwd.n || pw->fwd.k != fwd.k || (pw->fwd.data != NULL) != fwd_panels ||
               (pw->bwd.data != NULL) != bwd_panels)) {
        caprl_gemm_release(w);
        pw = NULL;
    }
    if (!pw) { /* the header, then the panels (64-byte aligned) */
        size_t head = caprl_round_up((int64_t)sizeof(caprl_amx_weight), 64);
        size_t fwd_bytes = fwd_panels ? panels_bytes(&fwd) : 0;
        size_t bytes = head + fwd_bytes + (bwd_panels ? panels_bytes(&bwd) : 0);
        pw = caprl_try_aligned_alloc(bytes);
        if (!pw) {
            return caprl_err_set(err, CAPRL_ERR_OOM, "cannot allocate %zu bytes for a packed %lld x %lld weight",
                                 bytes, (long long)w->rows, (long long)w->cols);
        }
        uint16_t *panels = (uint16_t *)(void *)((char *)pw + head);
        pw->fwd = fwd;
        pw->fwd.data = fwd_panels ? panels : NULL;
        pw->bwd = bwd;
        pw->bwd.data = bwd_panels ? panels + fwd_bytes / sizeof(uint16_t) : NULL;
        w->packed = pw;
    }
    /* a weight updated in place by the optimizer is packed again into the same memory */
    if (pw->fwd.data) {
        caprl_amx_pack_weight(c, &pw->fwd, w->data, false);
    }
    if (pw->bwd.data) {
        caprl_amx_pack_weight(c, &pw->bwd, w->data, true);
    }
    return CAPRL_OK;
}

void caprl_gemm_release(caprl_weight *w) {
    caprl_aligned_free(w->packed);
    w->packed = NULL;
}

/* ---- the tile driver ----------------------------------------------------------------------------------- */

#if CAPRL_X86
#    define CAPRL_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

enum {
    AMX_NALIGN = 32, /* columns per job are a multiple of this (two 16-column B panels per block) */
    AMX_JOBS_PER_THREAD = 4,
    AMX_LONG_K_ROWS = 64,   /* fewer rows of the whole reduction than this in half of L2: a long reduction */
    AMX_LONG_K_BLOCK = 256, /* rows and columns of a job over a long reduction */
};

typedef struct amx_task {
    float                  *out;   /* (R, ldo) */
    int64_t                 ldo;
    const uint16_t         *a;     /* caprl_round_up(R, 16) rows x p->k_pad, bf16 in tile blocks */
    const caprl_amx_panels *p;     /* B; C has p->n columns */
    const float            *bias;  /* (p->n) or NULL */
    bool                    accum; /* C starts from out (else from zero) */
    bool                    dot;   /* set by amx_run: the blocks on vdpbf16ps (no AMX) instead of the tiles */
    int64_t                 kc_tiles; /* k tiles per reduction chunk (caprl_amx_tuning.kc_tiles, 0: all) */
    int64_t                 R;
    int64_t                 mblk, nblk; /* rows and columns of one job */
    int64_t                 n_nblocks;  /* jobs per row block: job j covers rows of block j / n_nblocks */
} amx_task;

typedef struct convert_task {
    uint16_t    *a;   /* R rounded up to 16 rows x lda, in tile blocks */
    const float *in;  /* (R, K) */
    int64_t      R, K, lda;
} convert_task;

/* A = bf16(in) row by row into tile blocks, f32 -> bf16 with round-to-nearest-even, NaN kept quiet
 * (caprl_f32_to_bf16's rule), zero beyond R and K. */
static CAPRL_AVX512 void amx_convert_rows(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    (void)tid;
    const convert_task *t = ctx;
    for (int64_t m = r0; m < r1; m++) {
        const float *src = t->in + m * t->K;
        for (int64_t k = 0; k < t->lda; k += 16) { /* 16 elements never straddle a 32-wide tile */
            int64_t   r = m >= t->R ? 0 : t->K - k < 0 ? 0 : t->K - k < 16 ? t->K - k : 16;
            __mmask16 mask = (__mmask16)((1u << r) - 1u);
            __m512    x = _mm512_maskz_loadu_ps(mask, r > 0 ? src + k : t->in);
            _mm256_storeu_si256((__m256i *)(void *)(t->a + caprl_amx_a_index(m, k, t->lda)),
                                caprl_bf16_round16_avx512(x));
        }
    }
}

/* Writes the rows x cols valid part of the 32 x 32 product held in tiles 0..3 (2..3 only when two) to out at
 * (m, n), adding the bias. Full blocks go straight to out; edge blocks through cbuf. */
static CAPRL_AMX void amx_store(const amx_task *t, float *cbuf, int64_t m, int64_t n, int64_t rows, int64_t cols,
                                bool two) {
    float  *dst = cbuf;
    int64_t ld = 32;
    if (rows == 32 && cols == 32) {
        dst = t->out + m * t->ldo + n;
        ld = t->ldo;
    }
    _tile_stored(0, dst, ld * 4);
    _tile_stored(1, dst + 16, ld * 4);
    if (two) {
        _tile_stored(2, dst + 16 * ld, ld * 4);
        _tile_stored(3, dst + 16 * ld + 16, ld * 4);
    }
    __mmask16 m0 = (__mmask16)(cols >= 16 ? 0xFFFFu : (1u << cols) - 1u);
    __mmask16 m1 = (__mmask16)(cols >= 32 ? 0xFFFFu : cols > 16 ? (1u << (cols - 16)) - 1u : 0u);
    __m512    b0 = t->bias ? _mm512_maskz_loadu_ps(m0, t->bias + n) : _mm512_setzero_ps();
    __m512    b1 = t->bias ? _mm512_maskz_loadu_ps(m1, t->bias + n + 16) : _mm512_setzero_ps();
    for (int64_t i = 0; i < rows; i++) {
        float *o = t->out + (m + i) * t->ldo + n;
        __m512 v0 = _mm512_maskz_loadu_ps(m0, dst + i * ld), v1 = _mm512_maskz_loadu_ps(m1, dst + i * ld + 16);
        if (t->bias) {
            v0 = _mm512_add_ps(v0, b0);
            v1 = _mm512_add_ps(v1, b1);
        } else if (dst != cbuf) {
            continue; /* already in place */
        }
        _mm512_mask_storeu_ps(o, m0, v0);
        _mm512_mask_storeu_ps(o + 16, m1, v1);
    }
}

/* Loads tiles 0..3 with the rows x cols block of out at (m, n), zero elsewhere (the first chunk of an
 * accumulating product). */
static CAPRL_AMX void amx_load_c(const amx_task *t, float *cbuf, int64_t m, int64_t n, int64_t rows, int64_t cols) {
    const float *src = t->out + m * t->ldo + n;
    int64_t      ld = t->ldo;
    if (rows < 32 || cols < 32) {
        for (int64_t i = 0; i < 32; i++) {
            for (int64_t j = 0; j < 32; j++) {
                cbuf[i * 32 + j] = i < rows && j < cols ? src[i * t->ldo + j] : 0.0f;
            }
        }
        src = cbuf;
        ld = 32;
    }
    _tile_loadd(0, src, ld * 4);
    _tile_loadd(1, src + 16, ld * 4);
    _tile_loadd(2, src + 16 * ld, ld * 4);
    _tile_loadd(3, src + 16 * ld + 16, ld * 4);
}

/* The 32 x 32 block of C at (m, n) over the k tiles [k0, k1): tiles 0..3 start from zero or from out (first
 * chunk, as t->accum says) or from the partial sums parked in out (later chunks, full blocks only), and are
 * parked there again unless this is the last chunk. Storing and reloading f32 tiles is exact, so the chain of
 * tile products per element is the same for every chunking. */
static CAPRL_AMX void amx_block(const amx_task *t, float *cbuf, const uint16_t *b0, const uint16_t *b1, int64_t m,
                                int64_t n, int64_t k0, int64_t k1, int64_t rows, int64_t cols) {
    int64_t         kp = t->p->k_pad;
    const uint16_t *a0 = t->a + caprl_amx_a_index(m, 0, kp), *a1 = a0 + kp * 16; /* row tiles of m, m + 16 */
    bool            two = m + 16 < t->R; /* a second 16-row tile holds real rows */
    bool            first = k0 == 0, last = k1 == kp / 32;
    float          *park = t->out + m * t->ldo + n;
    int64_t         ld = t->ldo * 4;
    if (first && !t->accum) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    } else {
        amx_load_c(t, cbuf, m, n, rows, cols);
    }
    if (two) {
        for (int64_t tk = k0; tk < k1; tk++) {
            _tile_loadd(4, a0 + tk * 512, 64);
            _tile_loadd(5, a1 + tk * 512, 64);
            _tile_loadd(6, b0 + tk * 512, 64);
            _tile_loadd(7, b1 + tk * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    } else {
        for (int64_t tk = k0; tk < k1; tk++) {
            _tile_loadd(4, a0 + tk * 512, 64);
            _tile_loadd(6, b0 + tk * 512, 64);
            _tile_loadd(7, b1 + tk * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
        }
    }
    if (last) {
        amx_store(t, cbuf, m, n, rows, cols, two);
    } else {
        _tile_stored(0, park, ld);
        _tile_stored(1, park + 16, ld);
        _tile_stored(2, park + 16 * t->ldo, ld);
        _tile_stored(3, park + 16 * t->ldo + 16, ld);
    }
}

/* The same 32 x 32 block on vdpbf16ps, for CPUs with AVX512-BF16 and no AMX, from the same A tile blocks and B
 * panels: row r of a B tile holds the k pair (2r, 2r + 1) of 16 columns, so one vdpbf16ps with the pair of a row
 * of A broadcast adds both products to 16 outputs. Eight rows at a time (16 accumulators, two B rows, one
 * broadcast); each output is one chain over the k pairs in order, started from zero or from out and parked in out
 * (exact) between chunks, so again nothing depends on the blocking. Rows past R (up to the 16-row padding of A,
 * zeros) are computed and not stored. */
static CAPRL_AVX512BF16 void dot_block(const amx_task *t, float *cbuf, const uint16_t *b0, const uint16_t *b1,
                                       int64_t m, int64_t n, int64_t k0, int64_t k1, int64_t rows, int64_t cols) {
    (void)cbuf;
    int64_t   kp = t->p->k_pad;
    bool      from_out = k0 > 0 || t->accum, last = k1 == kp / 32;
    __mmask16 m0 = (__mmask16)(cols >= 16 ? 0xFFFFu : (1u << cols) - 1u);
    __mmask16 m1 = (__mmask16)(cols >= 32 ? 0xFFFFu : cols > 16 ? (1u << (cols - 16)) - 1u : 0u);
    for (int64_t i0 = 0; i0 < rows; i0 += 8) {
        float  *o = t->out + (m + i0) * t->ldo + n;
        int64_t nr = rows - i0 < 8 ? rows - i0 : 8;
        __m512  acc[8][2];
#    pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            bool load = from_out && i < nr;
            acc[i][0] = load ? _mm512_maskz_loadu_ps(m0, o + i * t->ldo) : _mm512_setzero_ps();
            acc[i][1] = load ? _mm512_maskz_loadu_ps(m1, o + i * t->ldo + 16) : _mm512_setzero_ps();
        }
        for (int64_t tk = k0; tk < k1; tk++) {
            /* rows m + i0 .. + 7 lie in one 16-row tile block (m is a multiple of 32, i0 of 8) */
            const uint16_t *a = t->a + caprl_amx_a_index(m + i0, 32 * tk, kp);
            const uint16_t *w0 = b0 + tk * 512, *w1 = b1 + tk * 512;
            /* k pairs past the reduction's end are zeros in both operands, and so are columns past 16 of a block
             * of at most 16: both are skipped (attention's head dims, such as 80, leave a half-empty tile) */
            int64_t pairs = (t->p->k - 32 * tk + 1) / 2 < 16 ? (t->p->k - 32 * tk + 1) / 2 : 16;
            if (cols <= 16) {
                for (int r = 0; r < pairs; r++) {
                    __m512bh wv0 = (__m512bh)_mm512_loadu_si512(w0 + 32 * r);
#    pragma GCC unroll 8
                    for (int i = 0; i < 8; i++) {
                        int32_t pair;
                        memcpy(&pair, a + 32 * i + 2 * r, sizeof pair);
                        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_set1_epi32(pair), wv0);
                    }
                }
                continue;
            }
            for (int r = 0; r < pairs; r++) {
                __m512bh wv0 = (__m512bh)_mm512_loadu_si512(w0 + 32 * r);
                __m512bh wv1 = (__m512bh)_mm512_loadu_si512(w1 + 32 * r);
#    pragma GCC unroll 8
                for (int i = 0; i < 8; i++) {
                    int32_t pair;
                    memcpy(&pair, a + 32 * i + 2 * r, sizeof pair);
                    __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
                    acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, wv0);
                    acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, wv1);
                }
            }
        }
        __m512 bias0 = last && t->bias ? _mm512_maskz_loadu_ps(m0, t->bias + n) : _mm512_setzero_ps();
        __m512 bias1 = last && t->bias ? _mm512_maskz_loadu_ps(m1, t->bias + n + 16) : _mm512_setzero_ps();
        for (int i = 0; i < nr; i++) {
            _mm512_mask_storeu_ps(o + i * t->ldo, m0, last && t->bias ? _mm512_add_ps(acc[i][0], bias0) : acc[i][0]);
            _mm512_mask_storeu_ps(o + i * t->ldo + 16, m1,
                                  last && t->bias ? _mm512_add_ps(acc[i][1], bias1) : acc[i][1]);
        }
    }
}

typedef void (*block_fn)(const amx_task *t, float *cbuf, const uint16_t *b0, const uint16_t *b1, int64_t m,
                         int64_t n, int64_t k0, int64_t k1, int64_t rows, int64_t cols);

/* Jobs [j0, j1). Within a job the reduction runs in chunks of t->kc_tiles k tiles: a chunk of the two B panels
 * (2 KB per k tile) stays in L1 while every 32-row block of the job's rows streams its A tiles from L2 against it;
 * without chunks both operands would come from L2 for each block (the whole K of a panel does not fit in L1). Jobs
 * holding a partial 32 x 32 block run their whole K in one chunk (partial sums are parked in out only for full
 * blocks). */
static void run_jobs(const amx_task *t, int64_t j0, int64_t j1, block_fn block, float *cbuf) {
    int64_t         kt = t->p->k_pad / 32, N = t->p->n;
    const uint16_t *b = t->p->data;
    int64_t n_chunks = caprl_ceil_div(kt, t->kc_tiles > 0 ? t->kc_tiles : kt), chunk = caprl_ceil_div(kt, n_chunks);
    for (int64_t j = j0; j < j1; j++) {
        int64_t mb = j / t->n_nblocks, nb = j % t->n_nblocks;
        int64_t n0 = nb * t->nblk, n1 = n0 + t->nblk < N ? n0 + t->nblk : N;
        int64_t m0 = mb * t->mblk, m1 = m0 + t->mblk < t->R ? m0 + t->mblk : t->R;
        bool    full = (m1 - m0) % 32 == 0 && (n1 - n0) % 32 == 0;
        int64_t kc = full ? chunk : kt;
        for (int64_t k0 = 0; k0 < kt; k0 += kc) {
            int64_t k1 = k0 + kc < kt ? k0 + kc : kt;
            for (int64_t n = n0; n < n1; n += 32) {
                const uint16_t *b0 = b + (n / 16) * kt * 512, *b1 = b0 + kt * 512;
                for (int64_t m = m0; m < m1; m += 32) {
                    block(t, cbuf, b0, b1, m, n, k0, k1, m1 - m < 32 ? m1 - m : 32, n1 - n < 32 ? n1 - n : 32);
                }
            }
        }
    }
}

static CAPRL_AMX void amx_range(void *ctx, int64_t j0, int64_t j1, int32_t tid) {
    (void)tid;
    _Alignas(64) float cbuf[32 * 32];
    caprl_amx_config_tiles();
    run_jobs(ctx, j0, j1, amx_block, cbuf);
    _tile_release();
}

static void dot_range(void *ctx, int64_t j0, int64_t j1, int32_t tid) {
    (void)tid;
    run_jobs(ctx, j0, j1, dot_block, NULL);
}

/* Sizes the jobs and runs C (+)= A @ B with A ready in t->a. */
static void amx_run(caprl_cpu_ctx *c, amx_task *t) {
    const caprl_amx_panels *p = t->p;
    int64_t                 nt = c->n_threads, R = t->R, N = p->n;
    /* Jobs are row blocks x column ranges, row-block major, and each thread takes a contiguous run of them: a
     * thread keeps its row block of A (bf16) in L2 while the B panels stream past it, so B is read once per row
     * block and A once in all. Row blocks fill half of L2 (multiples of the 32-row step); large images (R in the
     * thousands) would otherwise stream all of A from L3 once per column range. A 32-column B panel is
     * k_pad * 128 bytes; a job gets a few hundred KB of them, fewer for balance. */
    const caprl_amx_tuning *tu = &c->amx_tuning;
    int64_t row_block_bytes = tu->row_block_kb > 0 ? 1024 * (int64_t)tu->row_block_kb : c->l2_bytes / 2;
    int64_t mblk = row_block_bytes / (p->k_pad * 2) / 32 * 32;
    int64_t nblk = caprl_round_up(256 * 1024 / (p->k_pad * 128) * 32, AMX_NALIGN);
    if (mblk < AMX_LONG_K_ROWS && tu->row_block_kb == 0 && tu->kc_tiles > 0) {
        /* A long reduction (the lm_head's data gradient: K = the vocabulary): no row block's whole reduction fits
         * L2, and 32 x 32 jobs would stream both operands from memory at 16 FLOP per byte. Square jobs run it in
         * chunks whose A and B parts (256 rows and columns x kc_tiles) stay in L2: 128 FLOP per byte. */
        mblk = AMX_LONG_K_BLOCK;
        nblk = AMX_LONG_K_BLOCK;
    }
    mblk = mblk < 32 ? 32 : mblk;
    mblk = mblk < caprl_round_up(R, 32) ? mblk : caprl_round_up(R, 32);
    nblk = nblk < AMX_NALIGN ? AMX_NALIGN : nblk;
    int64_t n_mblocks = caprl_ceil_div(R, mblk);
    if (nt > 1 && n_mblocks * caprl_ceil_div(N, nblk) < AMX_JOBS_PER_THREAD * nt) {
        int64_t per_row_block = caprl_ceil_div(AMX_JOBS_PER_THREAD * nt, n_mblocks);
        int64_t want = caprl_round_up(caprl_ceil_div(N, per_row_block), AMX_NALIGN);
        nblk = want < nblk ? want : nblk;
    }
    t->kc_tiles = tu->kc_tiles;
    t->mblk = mblk;
    t->nblk = nblk;
    t->n_nblocks = caprl_ceil_div(N, nblk);
    t->dot = !c->amx;
    caprl_parallel_for_grain(c->pool, t->n_nblocks * n_mblocks, 1, t->dot ? dot_range : amx_range, t);
}

/* A = bf16(in) (R, K) into the shared scratch, rows padded to 16 and K to lda; NULL when memory is gone. */
static uint16_t *convert_a(caprl_cpu_ctx *c, const float *in, int64_t R, int64_t K, int64_t lda) {
    int64_t   r_pad = caprl_round_up(R, 16);
    uint16_t *a = caprl_cpu_shared_reserve(c, (size_t)(r_pad * lda) * sizeof(uint16_t));
    if (a) {
        convert_task t = {.a = a, .in = in, .R = R, .K = K, .lda = lda};
        caprl_parallel_for(c->pool, r_pad, amx_convert_rows, &t);
    }
    return a;
}

/* ---- serial forms, for kernels that run their own threads (the segment attention) ---------------------- */

void caprl_amx_pack_f32_serial(const caprl_cpu_ctx *c, const caprl_amx_panels *p, const float *src, int64_t ld,
                               bool transposed) {
    pack_task t = {
        .p = p, .src = src, .ld = ld, .kind = transposed ? SRC_F32_T : SRC_F32, .avx2 = c->isa >= CAPRL_ISA_AVX2};
    pack_range(&t, 0, p->n_pad / 16, 0);
}

void caprl_amx_convert_serial(uint16_t *a, const float *in, int64_t R, int64_t K, int64_t lda) {
    convert_task t = {.a = a, .in = in, .R = R, .K = K, .lda = lda};
    amx_convert_rows(&t, 0, caprl_round_up(R, 16), 0);
}

static void serial_blocks(const amx_task *t, block_fn block, float *cbuf) {
    int64_t kt = t->p->k_pad / 32, N = t->p->n;
    for (int64_t n = 0; n < N; n += 32) {
        const uint16_t *b0 = t->p->data + (n / 16) * kt * 512, *b1 = b0 + kt * 512;
        for (int64_t m = 0; m < t->R; m += 32) {
            block(t, cbuf, b0, b1, m, n, 0, kt, t->R - m < 32 ? t->R - m : 32, N - n < 32 ? N - n : 32);
        }
    }
}

static CAPRL_AMX void amx_serial(const amx_task *t) {
    _Alignas(64) float cbuf[32 * 32];
    caprl_amx_config_tiles();
    serial_blocks(t, amx_block, cbuf);
    _tile_release();
}

void caprl_bf16_matmul_serial(const caprl_cpu_ctx *c, float *out, int64_t ldo, const uint16_t *a,
                              const caprl_amx_panels *p, int64_t R) {
    CAPRL_ASSERT(caprl_bf16_unit_on(c));
    amx_task t = {.out = out, .ldo = ldo, .a = a, .p = p, .R = R, .dot = !c->amx};
    if (t.dot) {
        serial_blocks(&t, dot_block, NULL);
    } else {
        amx_serial(&t);
    }
}

bool caprl_gemm_amx_fwd(caprl_cpu_ctx *c, float *out, const float *in, const caprl_weight *w, const float *bias,
                        int64_t M) {
    const caprl_amx_weight *pw = w->packed;
    const uint16_t         *a = convert_a(c, in, M, w->cols, pw->fwd.k_pad);
    if (!a) {
        return false;
    }
    amx_task t = {.out = out, .ldo = w->rows, .a = a, .p = &pw->fwd, .bias = bias, .R = M};
    amx_run(c, &t);
    return true;
}

bool caprl_gemm_amx_bwd_data(caprl_cpu_ctx *c, float *dx, const float *dy, const caprl_weight *w, int64_t M) {
    const caprl_amx_weight *pw = w->packed;
    const uint16_t         *a = convert_a(c, dy, M, w->rows, pw->bwd.k_pad);
    if (!a) {
        return false;
    }
    amx_task t = {.out = dx, .ldo = w->cols, .a = a, .p = &pw->bwd, .R = M};
    amx_run(c, &t);
    return true;
}

bool caprl_gemm_amx_bwd_weight(caprl_cpu_ctx *c, float *dw, const float *dy, const float *x, int64_t M, int64_t N,
                               int64_t K) {
    /* one scratch: A = bf16(dy^T) (N rows padded to 16, M to 32), then x in panels (K columns, M reduction) */
    caprl_amx_panels xp = panels_of(K, M);
    size_t           a_bytes = (size_t)caprl_round_up(caprl_round_up(N, 16) * xp.k_pad * 2, 64);
    char            *buf = caprl_cpu_shared_reserve(c, a_bytes + panels_bytes(&xp));
    if (!buf) {
        return false;
    }
    uint16_t *a = (uint16_t *)(void *)buf;
    xp.data = (uint16_t *)(void *)(buf + a_bytes);
    caprl_amx_pack_dy_t(c, a, xp.k_pad, dy, M, N);
    caprl_amx_pack_f32(c, &xp, x);
    amx_task t = {.out = dw, .ldo = K, .a = a, .p = &xp, .accum = true, .R = N};
    amx_run(c, &t);
    return true;
}
#endif /* CAPRL_X86 */
