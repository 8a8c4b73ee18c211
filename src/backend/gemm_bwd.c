/* Matmul backward for the CPU backend. Both products have one form, C (R, NC) = C0 + A (R, P) @ B (P, NC), with B
 * read along C's columns:
 *   data:    dx (M, K)  = dy (M, N) @ W (N, K)      A = dy,    B = W (f32 or bf16), C0 = 0
 *   weight:  dw (N, K) += dy^T (N, M) @ x (M, K)    A = dy^T,  B = x,               C0 = dw
 *
 * Why not the forward's kernels on transposed operands: the forward kernels reduce along rows of both operands
 * (dot products), so dx would need W^T, an O(N K) copy per call: for the lm_head chunks the trainer sends (M = 64
 * rows against a 151936 x 896 table) that is 544 MB written and read again per 17 GFLOP, a large fraction of the
 * product's time. This form reads B in place, accumulates into C natively (dw +=) and has no horizontal sums.
 *
 * Arithmetic: every element of C is one chain over p = 0..P-1, acc = fma(A[r][p], B[p][c], acc), starting from 0
 * (data) or from the element's old value (weight: "+=" is the start of the chain). Jobs, reduction chunks, tile
 * shapes and the thread split only decide where the chain is parked in C between chunks (an exact float store),
 * never its operations, so each output depends only on its operands: bit-identical for any thread count, and dx
 * row m depends only on dy row m (not on M). The AVX2 and AVX-512 kernels perform the same chains and agree bit
 * for bit; the scalar kernel (machines without FMA) uses a separate multiply and add. dbias (weight) is one chain
 * per column over m in order, starting from its old value.
 *
 * bf16 weights prepared for training on a machine with a bf16 matrix unit (AMX-BF16, or AVX512-BF16 without AMX)
 * take that unit instead (gemm_amx.c); the bias gradient is one pass of its own with the chains described above,
 * whichever kernels compute dw.
 *
 * Blocking (BLIS-like): A is packed once per call into groups of MR rows interleaved along p (shared scratch). A
 * job owns a range of column panels (PW columns each) over a range of rows (all of R unless more jobs are needed
 * for balance). Per reduction chunk of KC steps it packs its B chunk once (thread scratch, bf16 widened exactly),
 * then for each block of RB rows (its A chunk, RB x KC, stays in L2) sweeps every B panel (KC x PW, in L1) over
 * the block's row groups. Packing costs O(P (R + NC)) against O(P R NC) for the products. */
#include "backend/gemm_impl.h"
#include "caprl/tensor.h"
#include "core/error_impl.h"

enum {
    BW_MR = 4,           /* rows of C per micro-tile; packed A interleaves this many rows */
    BW_PW_SCALAR = 8,    /* panel widths (columns of C per micro-tile) */
    BW_PW_AVX2 = 24,     /* 3 ymm: 12 accumulators + 3 B vectors + 1 broadcast = 16 registers */
    BW_PW_AVX512 = 64,   /* 4 zmm: 16 accumulators */
    BW_KC = 256,         /* reduction steps per chunk */
    BW_RB = 128,         /* rows per L2 block: the A chunk (RB x KC) is 128 KB */
    BW_CB_MAX = 240,     /* most columns per job: the packed B chunk (KC x CB) stays within L2 with the A chunk */
    BW_JOBS_PER_THREAD = 4,
    BW_PACK_GROUPS = 16, /* weight-side packing: A groups per step (4 cache lines of dy) */
};

/* One micro-tile: c (MR x PW, row stride ldc) = (zero ? 0 : c) + a (kc x MR) @ b (kc x PW), one FMA chain per
 * element in step order. */
typedef void (*bw_ukr_fn)(const float *a, const float *b, int64_t kc, float *c, int64_t ldc, bool zero);

typedef struct bw_task {
    caprl_cpu_ctx *c;
    bw_ukr_fn      ukr;
    int64_t        pw;    /* panel width of ukr */
    float         *C;     /* (R, NC), row stride NC */
    const float   *apack; /* (ceil(R / MR), P, MR) */
    const void    *B;     /* (P, NC), row stride NC, f32 or bf16 */
    bool           bbf16;
    bool           accum; /* chains start from C (else from 0) */
    int64_t        R, NC, P;
    int64_t        n_rjobs, n_cjobs; /* jobs = row ranges x panel ranges, each split as evenly as possible */
    int64_t        n_panels;         /* ceil(NC / pw) */
    int64_t        kc;               /* reduction chunk */
} bw_task;

/* ---- micro-kernels -------------------------------------------------------------------------------------- */

static void ukr_scalar(const float *a, const float *b, int64_t kc, float *c, int64_t ldc, bool zero) {
    for (int i = 0; i < BW_MR; i++) {
        for (int j = 0; j < BW_PW_SCALAR; j++) {
            float s = zero ? 0.0f : c[i * ldc + j];
            for (int64_t p = 0; p < kc; p++) {
                s += a[p * BW_MR + i] * b[p * BW_PW_SCALAR + j];
            }
            c[i * ldc + j] = s;
        }
    }
}

#if CAPRL_X86
static CAPRL_AVX2 void ukr_avx2(const float *a, const float *b, int64_t kc, float *c, int64_t ldc, bool zero) {
    __m256 acc[BW_MR][3];
#    pragma GCC unroll 4
    for (int i = 0; i < BW_MR; i++) {
#    pragma GCC unroll 3
        for (int j = 0; j < 3; j++) {
            acc[i][j] = zero ? _mm256_setzero_ps() : _mm256_loadu_ps(c + i * ldc + 8 * j);
        }
    }
    for (int64_t p = 0; p < kc; p++) {
        const float *bp = b + p * BW_PW_AVX2;
        __m256       b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8), b2 = _mm256_loadu_ps(bp + 16);
#    pragma GCC unroll 4
        for (int i = 0; i < BW_MR; i++) {
            __m256 ai = _mm256_broadcast_ss(a + p * BW_MR + i);
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
            acc[i][2] = _mm256_fmadd_ps(ai, b2, acc[i][2]);
        }
    }
#    pragma GCC unroll 4
    for (int i = 0; i < BW_MR; i++) {
#    pragma GCC unroll 3
        for (int j = 0; j < 3; j++) {
            _mm256_storeu_ps(c + i * ldc + 8 * j, acc[i][j]);
        }
    }
}

static CAPRL_AVX512 void ukr_avx512(const float *a, const float *b, int64_t kc, float *c, int64_t ldc, bool zero) {
    __m512 acc[BW_MR][4];
#    pragma GCC unroll 4
    for (int i = 0; i < BW_MR; i++) {
#    pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            acc[i][j] = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + 16 * j);
        }
    }
    for (int64_t p = 0; p < kc; p++) {
        const float *bp = b + p * BW_PW_AVX512;
        __m512       b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
        __m512       b2 = _mm512_loadu_ps(bp + 32), b3 = _mm512_loadu_ps(bp + 48);
#    pragma GCC unroll 4
        for (int i = 0; i < BW_MR; i++) {
            __m512 ai = _mm512_set1_ps(a[p * BW_MR + i]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(ai, b2, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(ai, b3, acc[i][3]);
        }
    }
#    pragma GCC unroll 4
    for (int i = 0; i < BW_MR; i++) {
#    pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {
            _mm512_storeu_ps(c + i * ldc + 16 * j, acc[i][j]);
        }
    }
}
#endif

/* ---- packing -------------------------------------------------------------------------------------------- */

/* B rows [p0, p0 + kc), columns [c0, c0 + nc) into panels of pw columns: bp[(panel * kc + p) * pw + j], zeros
 * past nc. bf16 is widened exactly. Pure data movement: every path gives the same bits. */
static void pack_b_scalar(float *bp, const bw_task *t, int64_t p0, int64_t kc, int64_t c0, int64_t nc) {
    int64_t pw = t->pw;
    for (int64_t j0 = 0; j0 < nc; j0 += pw) {
        int64_t n = nc - j0 < pw ? nc - j0 : pw;
        float  *dst = bp + (j0 / pw) * kc * pw;
        for (int64_t p = 0; p < kc; p++) {
            int64_t off = (p0 + p) * t->NC + c0 + j0;
            for (int64_t j = 0; j < pw; j++) {
                float v = 0.0f;
                if (j < n) {
                    v = t->bbf16 ? caprl_bf16_to_f32(((const uint16_t *)t->B)[off + j])
                                 : ((const float *)t->B)[off + j];
                }
                dst[p * pw + j] = v;
            }
        }
    }
}

#if CAPRL_X86
static CAPRL_AVX2_INLINE __m256 load8_avx2(const void *B, bool bbf16, int64_t off) {
    if (bbf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)B + off));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)B + off);
}

/* Full panels with 8-wide moves (pw a multiple of 8); the partial last panel through the scalar rule. */
static CAPRL_AVX2 void pack_b_avx2(float *bp, const bw_task *t, int64_t p0, int64_t kc, int64_t c0, int64_t nc) {
    int64_t pw = t->pw, full = nc / pw * pw;
    for (int64_t j0 = 0; j0 < full; j0 += pw) {
        float *dst = bp + (j0 / pw) * kc * pw;
        for (int64_t p = 0; p < kc; p++) {
            int64_t off = (p0 + p) * t->NC + c0 + j0;
            for (int64_t j = 0; j < pw; j += 8) {
                _mm256_storeu_ps(dst + p * pw + j, load8_avx2(t->B, t->bbf16, off + j));
            }
        }
    }
    if (full < nc) {
        pack_b_scalar(bp + (full / pw) * kc * pw, t, p0, kc, c0 + full, nc - full);
    }
}
#endif

static void pack_b(float *bp, const bw_task *t, int64_t p0, int64_t kc, int64_t c0, int64_t nc) {
#if CAPRL_X86
    if (t->c->isa >= CAPRL_ISA_AVX2) {
        pack_b_avx2(bp, t, p0, kc, c0, nc);
        return;
    }
#endif
    pack_b_scalar(bp, t, p0, kc, c0, nc);
}

typedef struct pack_a_task {
    float       *apack; /* (ceil(R / MR), P, MR) */
    const float *dy;    /* (M, N) */
    int64_t      M, N;
} pack_a_task;

/* Data side, A = dy (R = M, P = N): group g holds rows 4g..4g+3 interleaved, apack[(g P + n) 4 + i]. Full groups
 * transpose 4 x 8 blocks in registers on AVX2 (the same bits as the scalar moves). */
static void pack_a_data_group(const pack_a_task *t, int64_t g, int64_t n0) {
    int64_t N = t->N;
    float  *dst = t->apack + g * N * BW_MR;
    for (int64_t n = n0; n < N; n++) {
        for (int i = 0; i < BW_MR; i++) {
            int64_t m = g * BW_MR + i;
            dst[n * BW_MR + i] = m < t->M ? t->dy[m * N + n] : 0.0f;
        }
    }
}

static void pack_a_data(void *ctx, int64_t g0, int64_t g1, int32_t tid) {
    (void)tid;
    const pack_a_task *t = ctx;
    for (int64_t g = g0; g < g1; g++) {
        pack_a_data_group(t, g, 0);
    }
}

#if CAPRL_X86
static CAPRL_AVX2 void pack_a_data_avx2(void *ctx, int64_t g0, int64_t g1, int32_t tid) {
    (void)tid;
    const pack_a_task *t = ctx;
    int64_t            N = t->N, n8 = N & ~(int64_t)7;
    for (int64_t g = g0; g < g1; g++) {
        if ((g + 1) * BW_MR > t->M) {
            pack_a_data_group(t, g, 0);
            continue;
        }
        const float *r = t->dy + g * BW_MR * N;
        float       *dst = t->apack + g * N * BW_MR;
        for (int64_t n = 0; n < n8; n += 8) {
            __m256 r0 = _mm256_loadu_ps(r + n), r1 = _mm256_loadu_ps(r + N + n);
            __m256 r2 = _mm256_loadu_ps(r + 2 * N + n), r3 = _mm256_loadu_ps(r + 3 * N + n);
            __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
            __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
            __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE); /* n, n+4 | n+1, n+5 */
            __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE); /* n+2, n+6 | n+3, n+7 */
            float *d = dst + n * BW_MR;
            _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u1, 0x20));
            _mm256_storeu_ps(d + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
            _mm256_storeu_ps(d + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
            _mm256_storeu_ps(d + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
        }
        pack_a_data_group(t, g, n8);
    }
}
#endif

/* Weight side, A = dy^T (R = N, P = M): apack[(g M + m) 4 + i] = dy[m][4g + i]. Groups are taken BW_PACK_GROUPS at
 * a time so each pass over m reads whole cache lines of dy. */
static void pack_a_weight(void *ctx, int64_t b0, int64_t b1, int32_t tid) {
    (void)tid;
    const pack_a_task *t = ctx;
    int64_t            M = t->M, N = t->N, n_groups = caprl_ceil_div(N, BW_MR);
    for (int64_t blk = b0; blk < b1; blk++) {
        int64_t g0 = blk * BW_PACK_GROUPS, g1 = g0 + BW_PACK_GROUPS < n_groups ? g0 + BW_PACK_GROUPS : n_groups;
        int64_t n0 = g0 * BW_MR, n1 = g1 * BW_MR < N ? g1 * BW_MR : N, full = (n1 - n0) / BW_MR;
        for (int64_t m = 0; m < M; m++) {
            const float *row = t->dy + m * N + n0;
            float       *dst = t->apack + (g0 * M + m) * BW_MR;
            for (int64_t g = 0; g < full; g++) {
                memcpy(dst + g * M * BW_MR, row + g * BW_MR, BW_MR * sizeof(float));
            }
            if (full < g1 - g0) { /* the last group of N, zero-padded */
                for (int64_t i = 0; i < BW_MR; i++) {
                    dst[full * M * BW_MR + i] = full * BW_MR + i < n1 - n0 ? row[full * BW_MR + i] : 0.0f;
                }
            }
        }
    }
}

/* ---- driver --------------------------------------------------------------------------------------------- */

/* One micro-tile at (r, jc); edge tiles go through a full-size buffer (the valid elements see the same chains). */
static void bw_tile(const bw_task *t, const float *a, const float *b, int64_t kc, int64_t r, int64_t jc, int64_t nr,
                    int64_t nc, bool zero) {
    const int64_t pw = t->pw, NC = t->NC;
    float        *cp = t->C + r * NC + jc;
    if (nr == BW_MR && nc == pw) {
        t->ukr(a, b, kc, cp, NC, zero);
        return;
    }
    _Alignas(64) float edge[BW_MR * BW_PW_AVX512];
    for (int64_t i = 0; i < BW_MR; i++) {
        for (int64_t j = 0; j < pw; j++) {
            edge[i * pw + j] = i < nr && j < nc && !zero ? cp[i * NC + j] : 0.0f;
        }
    }
    t->ukr(a, b, kc, edge, pw, zero);
    for (int64_t i = 0; i < nr; i++) {
        memcpy(cp + i * NC, edge + i * pw, (size_t)nc * sizeof(float));
    }
}

static void bw_range(void *ctx, int64_t j0, int64_t j1, int32_t tid) {
    const bw_task *t = ctx;
    float         *bp = t->c->threads[tid].buf;
    const int64_t  pw = t->pw, P = t->P, n_groups = caprl_ceil_div(t->R, BW_MR);
    for (int64_t j = j0; j < j1; j++) {
        int64_t rj = j / t->n_cjobs, cj = j % t->n_cjobs;
        int64_t r0 = rj * n_groups / t->n_rjobs * BW_MR, r1 = (rj + 1) * n_groups / t->n_rjobs * BW_MR;
        int64_t c0 = cj * t->n_panels / t->n_cjobs * pw, c1 = (cj + 1) * t->n_panels / t->n_cjobs * pw;
        r1 = r1 < t->R ? r1 : t->R;
        c1 = c1 < t->NC ? c1 : t->NC;
        int64_t p0 = 0;
        do { /* P == 0 still runs once: dx = 0 */
            int64_t kc = P - p0 < t->kc ? P - p0 : t->kc;
            bool    zero = !t->accum && p0 == 0;
            pack_b(bp, t, p0, kc, c0, c1 - c0);
            for (int64_t rb0 = r0; rb0 < r1; rb0 += BW_RB) {
                int64_t rb1 = rb0 + BW_RB < r1 ? rb0 + BW_RB : r1;
                for (int64_t jc = c0; jc < c1; jc += pw) {
                    const float *b = bp + ((jc - c0) / pw) * kc * pw;
                    int64_t      nc = c1 - jc < pw ? c1 - jc : pw;
                    for (int64_t r = rb0; r < rb1; r += BW_MR) {
                        const float *a = t->apack + ((r / BW_MR) * P + p0) * BW_MR;
                        if (!zero && r + 2 * BW_MR <= rb1) {
                            /* The next tile's C rows (dw: often from memory) arrive while this one computes. */
                            const float *nx = t->C + (r + BW_MR) * t->NC + jc;
                            for (int64_t i = 0; i < BW_MR; i++) {
                                __builtin_prefetch(nx + i * t->NC);
                                __builtin_prefetch(nx + i * t->NC + nc - 1);
                            }
                        }
                        bw_tile(t, a, b, kc, r, jc, rb1 - r < BW_MR ? rb1 - r : BW_MR, nc, zero);
                    }
                }
            }
            p0 += kc;
        } while (p0 < P);
    }
}

/* Runs C = C0 + A @ B with A already packed; sizes the jobs and the B scratch. */
static void bw_run(caprl_cpu_ctx *c, bw_task *t) {
    int64_t pw = BW_PW_SCALAR;
    t->ukr = ukr_scalar;
#if CAPRL_X86
    if (c->isa >= CAPRL_ISA_AVX512) {
        pw = BW_PW_AVX512;
        t->ukr = ukr_avx512;
    } else if (c->isa >= CAPRL_ISA_AVX2) {
        pw = BW_PW_AVX2;
        t->ukr = ukr_avx2;
    }
#endif
    t->pw = pw;
    t->c = c;
    t->kc = BW_KC;
    t->n_panels = caprl_ceil_div(t->NC, pw);
    /* Column jobs first (each packs its B chunks once for all rows); row ranges only when the columns cannot
     * give every thread BW_JOBS_PER_THREAD jobs. */
    int64_t want = c->n_threads > 1 ? BW_JOBS_PER_THREAD * c->n_threads : 1;
    int64_t max_panels = BW_CB_MAX / pw > 0 ? BW_CB_MAX / pw : 1;
    t->n_cjobs = caprl_ceil_div(t->n_panels, max_panels);
    t->n_cjobs = t->n_cjobs < want ? (want < t->n_panels ? want : t->n_panels) : t->n_cjobs;
    int64_t n_groups = caprl_ceil_div(t->R, BW_MR);
    t->n_rjobs = t->n_cjobs < want ? caprl_ceil_div(want, t->n_cjobs) : 1;
    t->n_rjobs = t->n_rjobs < n_groups ? t->n_rjobs : n_groups;
    size_t bytes = (size_t)(t->kc * caprl_ceil_div(t->n_panels, t->n_cjobs) * pw) * sizeof(float);
    if (!caprl_cpu_scratch_reserve(c, bytes)) {
        caprl_abort(__FILE__, __LINE__, "out of memory for matmul backward scratch (%zu bytes per thread)", bytes);
    }
    caprl_parallel_for(c->pool, t->n_rjobs * t->n_cjobs, bw_range, t);
}

static void out_of_scratch(int64_t M, const caprl_weight *w) {
    caprl_abort(__FILE__, __LINE__,
                "out of memory for the bf16 operands of a %lld-row backward of a %lld x %lld matmul", (long long)M,
                (long long)w->rows, (long long)w->cols);
}

void caprl_gemm_bwd_data(caprl_cpu_ctx *c, float *dx, const float *dy, const caprl_weight *w, int64_t M) {
    CAPRL_ASSERT(w->dtype == CAPRL_DTYPE_F32 || w->dtype == CAPRL_DTYPE_BF16);
    CAPRL_ASSERT(M >= 0 && w->rows >= 0 && w->cols >= 0);
    int64_t N = w->rows, K = w->cols;
    if (M == 0 || K == 0) {
        return;
    }
#if CAPRL_X86
    if (caprl_gemm_bwd_unit(c, w) != CAPRL_UNIT_FMA) {
        if (!caprl_gemm_amx_bwd_data(c, dx, dy, w, M)) {
            out_of_scratch(M, w);
        }
        return;
    }
#endif
    size_t bytes = (size_t)(caprl_round_up(M, BW_MR) * (N > 0 ? N : 1)) * sizeof(float);
    float *apack = caprl_cpu_shared_reserve(c, bytes);
    if (!apack) {
        caprl_abort(__FILE__, __LINE__, "out of memory for matmul backward scratch (%zu bytes)", bytes);
    }
    pack_a_task    pa = {.apack = apack, .dy = dy, .M = M, .N = N};
    caprl_range_fn pack = pack_a_data;
#if CAPRL_X86
    if (c->isa >= CAPRL_ISA_AVX2) {
        pack = pack_a_data_avx2;
    }
#endif
    caprl_parallel_for(c->pool, caprl_ceil_div(M, BW_MR), pack, &pa);
    bw_task t = {.C = dx, .apack = apack, .B = w->data, .bbf16 = w->dtype == CAPRL_DTYPE_BF16, .accum = false,
                 .R = M, .NC = K, .P = N};
    bw_run(c, &t);
}

typedef struct bias_task {
    float       *dbias;
    const float *dy;
    int64_t      M, N;
} bias_task;

/* dbias[n] = (dbias[n] + dy[0][n]) + dy[1][n] ... for the columns of the 64-column blocks [b0, b1). */
static void bias_range(void *ctx, int64_t b0, int64_t b1, int32_t tid) {
    (void)tid;
    const bias_task *t = ctx;
    int64_t          n0 = b0 * 64, n1 = b1 * 64 < t->N ? b1 * 64 : t->N;
    for (int64_t m = 0; m < t->M; m++) {
        const float *row = t->dy + m * t->N;
        for (int64_t n = n0; n < n1; n++) {
            t->dbias[n] += row[n];
        }
    }
}

void caprl_gemm_bwd_weight(caprl_cpu_ctx *c, float *dw, float *dbias, const float *dy, const float *x,
                           const caprl_weight *w, int64_t M) {
    int64_t N = w->rows, K = w->cols;
    CAPRL_ASSERT(M >= 0 && N >= 0 && K >= 0);
    if (M == 0 || N == 0) {
        return; /* empty chains: dw and dbias keep their values */
    }
    if (dbias) { /* the same chains whichever kernels compute dw */
        bias_task bt = {.dbias = dbias, .dy = dy, .M = M, .N = N};
        caprl_parallel_for(c->pool, caprl_ceil_div(N, 64), bias_range, &bt);
    }
    if (K == 0) {
        return;
    }
#if CAPRL_X86
    if (caprl_gemm_bwd_unit(c, w) != CAPRL_UNIT_FMA) {
        if (!caprl_gemm_amx_bwd_weight(c, dw, dy, x, M, N, K)) {
            out_of_scratch(M, w);
        }
        return;
    }
#endif
    int64_t n_groups = caprl_ceil_div(N, BW_MR);
    size_t  bytes = (size_t)(n_groups * BW_MR * M) * sizeof(float);
    float  *apack = caprl_cpu_shared_reserve(c, bytes);
    if (!apack) {
        caprl_abort(__FILE__, __LINE__, "out of memory for matmul backward scratch (%zu bytes)", bytes);
    }
    pack_a_task pa = {.apack = apack, .dy = dy, .M = M, .N = N};
    caprl_parallel_for(c->pool, caprl_ceil_div(n_groups, BW_PACK_GROUPS), pack_a_weight, &pa);
    bw_task t = {.C = dw, .apack = apack, .B = x, .bbf16 = false, .accum = true, .R = N, .NC = K, .P = M};
    bw_run(c, &t);
}
