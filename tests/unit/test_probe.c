/* caprl_measure_peaks: positive finite figures, a sane unit string, the thread count honoured, the CPU
 * description filled in. */
#include "caprl/bench.h"
#include "caprl_test.h"

static void check_peaks(int32_t n_threads) {
    caprl_machine_peaks p;
    caprl_error         err = {0};
    memset(&p, 0xAB, sizeof p);
    CHECK_OK(caprl_measure_peaks(n_threads, &p, &err), &err);
    fprintf(stderr, "threads %d: fp32 %.1f GFLOP/s, %s %.1f GFLOP/s, triad %.1f GB/s, cpu: %s\n", p.n_threads,
            p.fp32_fma_gflops, p.bf16_unit, p.bf16_matrix_gflops, p.mem_bw_gbs, p.cpu_features);
    CHECK(p.n_threads == n_threads);
    CHECK(isfinite(p.fp32_fma_gflops) && p.fp32_fma_gflops > 0.1 && p.fp32_fma_gflops < 1e6);
    CHECK(isfinite(p.mem_bw_gbs) && p.mem_bw_gbs > 0.1 && p.mem_bw_gbs < 1e5);
    CHECK(memchr(p.bf16_unit, '\0', sizeof p.bf16_unit) != NULL);
    CHECK(memchr(p.cpu_features, '\0', sizeof p.cpu_features) != NULL);
    if (strcmp(p.bf16_unit, "none") == 0) {
        CHECK(p.bf16_matrix_gflops == 0.0);
    } else {
        CHECK(strcmp(p.bf16_unit, "amx-bf16") == 0 || strcmp(p.bf16_unit, "avx512-bf16") == 0);
        CHECK(isfinite(p.bf16_matrix_gflops) && p.bf16_matrix_gflops > p.fp32_fma_gflops / 4);
    }
}

int main(void) {
    check_peaks(1);
    check_peaks(2);
    caprl_error err = {0};
    caprl_machine_peaks p;
    CHECK_STATUS(caprl_measure_peaks(5000, &p, &err), CAPRL_ERR_INVALID_ARG);
    return test_finish("test_probe");
}
