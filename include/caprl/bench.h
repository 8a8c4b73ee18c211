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

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_BENCH_H */
