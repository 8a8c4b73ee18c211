/* caprl_measure_peaks: positive finite figures, a sane unit string, the thread count honoured, the CPU
 * description filled in. caprl_bench_matmul: every pass of odd shapes times and names its kernel; bad shapes,
 * passes and dtypes are refused with the shape in the message. caprl_bench_attention: every kind at two vector
 * widths on odd shapes, its FLOP count, the bf16 form naming the matrix unit it ran on, and bad shapes refused. */
#include "caprl/bench.h"
#include "caprl/tensor.h"
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

static void check_matmul_bench(void) {
    static const int64_t shapes[][3] = {{1, 1, 1}, {37, 50, 133}, {64, 96, 9000}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        for (int32_t dtype = CAPRL_DTYPE_F32; dtype <= CAPRL_DTYPE_BF16; dtype++) {
            char fwd_kernel[32] = "";
            for (int32_t pass = CAPRL_MATMUL_FWD; pass <= CAPRL_MATMUL_BWD_WEIGHT; pass++) {
                caprl_matmul_bench b = {
                    .M = shapes[s][0], .N = shapes[s][1], .K = shapes[s][2], .weight_dtype = dtype, .pass = pass,
                    .reps = 2};
                caprl_error err = {0};
                CHECK_OK(caprl_bench_matmul(2, &b, &err), &err);
                CHECK(b.seconds > 0 && isfinite(b.gflops) && b.gflops > 0);
                CHECK(fabs(b.gflops - 2e-9 * (double)(b.M * b.N * b.K) / b.seconds) <= 1e-9 * b.gflops);
                bool bf16_unit = strcmp(b.kernel, "amx-bf16") == 0 || strcmp(b.kernel, "avx512-bf16") == 0;
                bool known = bf16_unit || strcmp(b.kernel, "avx512") == 0 || strcmp(b.kernel, "avx2") == 0 ||
                             strcmp(b.kernel, "scalar") == 0;
                CHECK_MSG(known, "kernel \"%s\"", b.kernel);
                CHECK(dtype == CAPRL_DTYPE_BF16 || !bf16_unit);
                /* a weight's three products run on one unit */
                if (pass == CAPRL_MATMUL_FWD) {
                    snprintf(fwd_kernel, sizeof fwd_kernel, "%s", b.kernel);
                }
                CHECK_MSG(strcmp(b.kernel, fwd_kernel) == 0, "pass %d on %s, forward on %s", pass, b.kernel,
                          fwd_kernel);
            }
        }
    }
    caprl_matmul_bench bad[] = {
        {.M = 0, .N = 4, .K = 4, .weight_dtype = CAPRL_DTYPE_F32, .pass = CAPRL_MATMUL_FWD, .reps = 1},
        {.M = 4, .N = 4, .K = 4, .weight_dtype = CAPRL_DTYPE_F32, .pass = 3, .reps = 1},
        {.M = 4, .N = 4, .K = 4, .weight_dtype = CAPRL_DTYPE_F16, .pass = CAPRL_MATMUL_FWD, .reps = 1},
        {.M = 4, .N = 4, .K = 4, .weight_dtype = CAPRL_DTYPE_F32, .pass = CAPRL_MATMUL_FWD, .reps = 0},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        caprl_error err = {0};
        CHECK_STATUS(caprl_bench_matmul(1, &bad[i], &err), CAPRL_ERR_INVALID_ARG);
        CHECK(strstr(err.msg, "matmul bench") != NULL);
    }
}

static void check_attention_bench(void) {
    for (int32_t kind = CAPRL_ATTN_DECODER; kind <= CAPRL_ATTN_STEP; kind++) {
        for (int32_t isa = 0; isa <= 1; isa++) {
            caprl_attn_bench b = {.kind = kind, .tokens = 37, .heads = 6, .head_dim = 20, .segment = 16,
                                  .max_isa = isa, .reps = 2};
            b.kv_heads = kind == CAPRL_ATTN_SEGMENTS ? 6 : 2;
            caprl_error      err = {0};
            CHECK_OK(caprl_bench_attention(2, &b, &err), &err);
            /* causal: 1 + 2 + ... + 37 pairs; segments of 16, 16 and 5 rows: 16^2 + 16^2 + 5^2 pairs; a decode
             * step: one query over 37 keys */
            double pairs = kind == CAPRL_ATTN_SEGMENTS ? 16.0 * 16 + 16.0 * 16 + 5.0 * 5
                           : kind == CAPRL_ATTN_STEP   ? 37.0
                                                       : 37.0 * 38 / 2;
            CHECK_MSG(b.flops == 4.0 * 6 * 20 * pairs, "attention kind %d: %.0f flops", kind, b.flops);
            CHECK(b.seconds > 0 && (kind == CAPRL_ATTN_TRAIN) == (b.backward_seconds > 0));
            CHECK(strcmp(b.isa, "avx512") == 0 || strcmp(b.isa, "avx2") == 0 || strcmp(b.isa, "scalar") == 0);
            CHECK(isa != 1 || strcmp(b.isa, "avx512") != 0);
        }
    }
    /* bf16: the vision kind runs on the machine's bf16 matrix unit and names it (unless CAPRL_BF16_UNITS turns the
     * units off, or there is none); other kinds ignore the flag */
    caprl_machine_peaks p;
    caprl_error         perr = {0};
    CHECK_OK(caprl_measure_peaks(1, &p, &perr), &perr);
    bool units = strcmp(p.bf16_unit, "none") != 0 && !getenv("CAPRL_BF16_UNITS") && !getenv("CAPRL_AMX");
    for (int32_t kind = CAPRL_ATTN_DECODER; kind <= CAPRL_ATTN_STEP; kind++) {
        caprl_attn_bench b = {.kind = kind, .tokens = 37, .heads = 6, .head_dim = 20, .segment = 16, .reps = 1,
                              .bf16 = 1};
        b.kv_heads = kind == CAPRL_ATTN_SEGMENTS ? 6 : 2;
        caprl_error err = {0};
        CHECK_OK(caprl_bench_attention(2, &b, &err), &err);
        bool vector = strcmp(b.isa, "avx512") == 0 || strcmp(b.isa, "avx2") == 0 || strcmp(b.isa, "scalar") == 0;
        CHECK_MSG(kind == CAPRL_ATTN_SEGMENTS && units ? strcmp(b.isa, p.bf16_unit) == 0 : vector,
                  "attention kind %d with bf16: isa \"%s\" (bf16 unit %s)", kind, b.isa, p.bf16_unit);
        CHECK(b.seconds > 0);
    }
    caprl_attn_bench bad[] = {
        {.kind = 4, .tokens = 8, .heads = 2, .kv_heads = 2, .head_dim = 8, .reps = 1},
        {.kind = CAPRL_ATTN_DECODER, .tokens = 8, .heads = 3, .kv_heads = 2, .head_dim = 8, .reps = 1},
        {.kind = CAPRL_ATTN_SEGMENTS, .tokens = 8, .heads = 4, .kv_heads = 2, .head_dim = 8, .reps = 1},
        {.kind = CAPRL_ATTN_TRAIN, .tokens = 0, .heads = 2, .kv_heads = 2, .head_dim = 8, .reps = 1},
        {.kind = CAPRL_ATTN_TRAIN, .tokens = 8, .heads = 2, .kv_heads = 2, .head_dim = 8, .reps = 1, .max_isa = 3},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        caprl_error err = {0};
        CHECK_STATUS(caprl_bench_attention(1, &bad[i], &err), CAPRL_ERR_INVALID_ARG);
        CHECK(strstr(err.msg, "attention bench") != NULL);
    }
}

int main(void) {
    check_matmul_bench();
    check_attention_bench();
    check_peaks(1);
    check_peaks(2);
    caprl_error err = {0};
    caprl_machine_peaks p;
    CHECK_STATUS(caprl_measure_peaks(5000, &p, &err), CAPRL_ERR_INVALID_ARG);
    return test_finish("test_probe");
}
