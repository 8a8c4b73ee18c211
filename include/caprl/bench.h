/* The machine's own ceilings, measured by probes: fp32 FMA peak, the bf16 matrix-unit peak, memory bandwidth.
 * Benchmarks report every figure as a fraction of these. */
#ifndef CAPRL_BENCH_H
#define CAPRL_BENCH_H

#include "caprl/caprl.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct caprl_machine_peaks {
    int32_t n_threads;
    double  fp32_fma_gflops;    /* independent FMA chains on the widest vector unit, all threads */
    double  bf16_matrix_gflops; /* AMX tile dot-products where available, else AVX512-BF16, else 0 */
    char    bf16_unit[32];      /* "amx-bf16", "avx512-bf16" or "none" */
    double  mem_bw_gbs;         /* STREAM triad a[i] = b[i] + s*c[i], counting 3 float streams (12 B / element) */
    double  mem_read_gbs;       /* read-only streaming of the same arrays (sum of b and c, 8 B / element): the
                                   ceiling of a kernel that only reads, like decode reading the weights */
    char    cpu_features[160];
} caprl_machine_peaks;

/* Runs the probes on n_threads threads (0 = all cores); takes about a second. */
CAPRL_API caprl_status caprl_measure_peaks(int32_t n_threads, caprl_machine_peaks *out, caprl_error *err);

/* Which product of a linear layer y = x W^T (W: N x K, x: M x K) caprl_bench_matmul times. */
typedef enum caprl_matmul_pass {
    CAPRL_MATMUL_FWD = 0,        /* y (M, N) = x W^T */
    CAPRL_MATMUL_BWD_DATA = 1,   /* dx (M, K) = dy W */
    CAPRL_MATMUL_BWD_WEIGHT = 2, /* dW (N, K) += dy^T x */
} caprl_matmul_pass;

typedef struct caprl_matmul_bench {
    int64_t M, N, K;      /* in: rows of x, out features, in features */
    int32_t weight_dtype; /* in: CAPRL_DTYPE_F32 or CAPRL_DTYPE_BF16 */
    int32_t pass;         /* in: caprl_matmul_pass */
    int32_t reps;         /* in: timed calls after one warm-up call (at least 1) */
    double  seconds;      /* out: the fastest timed call */
    double  gflops;       /* out: 2 M N K / seconds */
    char    kernel[16];   /* out: what ran: "amx-bf16", "avx512", "avx2" or "scalar" */
} caprl_matmul_bench;

/* Times one matmul of the CPU backend on n_threads threads (0 = all cores) with random operands, the weight
 * prepared as the model and the trainer prepare theirs (packed for the tile unit where there is one). */
CAPRL_API caprl_status caprl_bench_matmul(int32_t n_threads, caprl_matmul_bench *b, caprl_error *err);

/* Which attention kernel caprl_bench_attention times. */
typedef enum caprl_attn_kind {
    CAPRL_ATTN_DECODER = 0,  /* attn_fwd: causal prefill of `tokens` rows, GQA */
    CAPRL_ATTN_TRAIN = 1,    /* the trainer's causal attention, forward then backward */
    CAPRL_ATTN_SEGMENTS = 2, /* the vision tower's: non-causal within segments of `segment` rows */
    CAPRL_ATTN_STEP = 3,     /* attn_fwd: one decode step, a single query row over `tokens` cached keys, GQA */
} caprl_attn_kind;

typedef struct caprl_attn_bench {
    int32_t kind;                      /* in: caprl_attn_kind */
    int64_t tokens, heads, kv_heads;   /* in: rows, query heads, KV heads (== heads for CAPRL_ATTN_SEGMENTS) */
    int64_t head_dim, segment;         /* in: D; rows per segment for CAPRL_ATTN_SEGMENTS (0 = one segment) */
    int32_t max_isa;                   /* in: 0 = the machine's widest vectors; 1 = AVX2; 2 = AVX-512 */
    int32_t reps;                      /* in: timed calls after one warm-up (at least 1) */
    double  seconds, backward_seconds; /* out: the fastest forward (and, for CAPRL_ATTN_TRAIN, backward) */
    double  flops;                     /* out: 4 x heads x D x (query, key) pairs, the forward's two products */
    char    isa[16];                   /* out: "avx512", "avx2" or "scalar"; for CAPRL_ATTN_SEGMENTS with bf16
                                          on a CPU with a bf16 matrix unit, "amx-bf16" or "avx512-bf16" */
    int32_t bf16;                      /* in: CAPRL_ATTN_SEGMENTS: as a bf16 model's tower runs it (both products
                                          on the bf16 matrix unit where there is one, bf16 operands) */
} caprl_attn_bench;

/* Times one attention kernel of the CPU backend on n_threads threads (0 = all cores) with random inputs. */
CAPRL_API caprl_status caprl_bench_attention(int32_t n_threads, caprl_attn_bench *b, caprl_error *err);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_BENCH_H */
