/* caprl bench gemm: the speed of each linear layer's matmul of the benchmarked models (the Qwen2.5-0.5B decoder at
 * 512 tokens, the Qwen2.5-VL-3B vision tower at 1036x756), or of one shape, as a fraction of the machine's ceiling
 * for the kernel that ran. For tuning kernels apart from the rest of a forward or a training step. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/bench.h"
#include "caprl/tensor.h"
#include "common.h"
#include "opts.h"
#include "subcommands.h"

typedef struct gemm_shape {
    const char *name;
    int64_t     M, N, K;
} gemm_shape;

/* Rows are tokens: 512 for the decoder, 3996 patches (999 after the 2 x 2 merge) for the tower. */
static const gemm_shape k_text_shapes[] = {
    {"text.q_proj", 512, 896, 896},       {"text.kv_proj", 512, 128, 896}, {"text.o_proj", 512, 896, 896},
    {"text.gate_up_proj", 512, 4864, 896}, {"text.down_proj", 512, 896, 4864}, {"text.lm_head", 512, 151936, 896},
};
static const gemm_shape k_vision_shapes[] = {
    {"vision.qkv", 3996, 3840, 1280},       {"vision.proj", 3996, 1280, 1280},
    {"vision.gate_up_proj", 3996, 3420, 1280}, {"vision.down_proj", 3996, 1280, 3420},
    {"vision.merger_fc1", 999, 5120, 5120}, {"vision.merger_fc2", 999, 2048, 5120},
};

static const char *const k_pass_names[] = {"fwd", "bwd-data", "bwd-weight"};

static int parse_passes(const char *s, bool pass[3]) {
    if (strcmp(s, "all") == 0) {
        pass[0] = pass[1] = pass[2] = true;
        return 0;
    }
    for (int p = 0; p < 3; p++) {
        if (strcmp(s, k_pass_names[p]) == 0) {
            pass[p] = true;
            return 0;
        }
    }
    return -1;
}

typedef struct gemm_row {
    const char        *name;
    caprl_matmul_bench b;
    double             frac;
} gemm_row;

int cmd_bench_gemm(int argc, char **argv) {
    static const cmd_info info = {
        "bench gemm",
        "caprl bench gemm [--threads N] [--dtype f32|bf16] [--shapes text|vision|all] [--pass fwd|bwd-data|"
        "bwd-weight|all] [--m M --n N --k K] [--reps R] [--json]",
        "Time each linear layer's matmul of the benchmarked models (or one M x N x K shape) on the CPU backend,\n"
        "as a fraction of the ceiling of the unit that ran it.",
        "Shapes: the Qwen2.5-0.5B decoder at 512 tokens (text) and the Qwen2.5-VL-3B vision tower at 1036x756,\n"
        "3996 patches (vision). A pass is the forward y = x W^T, the data gradient dx = dy W or the weight\n"
        "gradient dW += dy^T x (bf16 weights prepared for training). GFLOP/s = 2 M N K / the fastest of --reps\n"
        "calls after one warm-up. bf16 on a CPU with a bf16 matrix unit runs on it (AMX tiles, or AVX512-BF16 dot\n"
        "products) and is measured against that unit's probe; everything else against the fp32 FMA probe.\n"
        "CAPRL_AMX_TUNE=\"kc=T,mb=KB\" sets the tile-panel blocking for tuning (T k tiles of 32 per reduction\n"
        "chunk, 0 = none; KB of bf16 activations per row block, 0 = half of L2); blocking never changes a result."};
    int32_t     threads = 0, reps = 3;
    int64_t     M = 0, N = 0, K = 0;
    bool        json = false;
    const char *dtype = "bf16", *shapes = "all", *passes = "fwd";
    opt_spec    specs[] = {
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {"dtype", OPT_STRING, &dtype, "weight dtype: f32 or bf16", 0, 0, "T", 0},
        {"shapes", OPT_STRING, &shapes, "model shapes: text, vision or all", 0, 0, "S", 0},
        {"pass", OPT_STRING, &passes, "fwd, bwd-data, bwd-weight or all", 0, 0, "P", 0},
        {"m", OPT_I64, &M, "one shape instead of the models': rows of x", 0, 1 << 20, "M", 0},
        {"n", OPT_I64, &N, "out features", 0, 1 << 24, "N", 0},
        {"k", OPT_I64, &K, "in features", 0, 1 << 20, "K", 0},
        {"reps", OPT_INT, &reps, "timed calls per shape (the fastest counts)", 1, 1000, "R", 0},
        {"json", OPT_FLAG, &json, "print all figures as one JSON object", 0, 0, NULL, 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    int32_t wdtype = strcmp(dtype, "f32") == 0 ? CAPRL_DTYPE_F32 : strcmp(dtype, "bf16") == 0 ? CAPRL_DTYPE_BF16 : -1;
    if (wdtype < 0) {
        return tool_usage_error(info.name, "--dtype must be f32 or bf16, not \"%s\"", dtype);
    }
    bool pass[3] = {false, false, false};
    if (parse_passes(passes, pass) != 0) {
        return tool_usage_error(info.name, "--pass must be fwd, bwd-data, bwd-weight or all, not \"%s\"", passes);
    }
    bool       one = M > 0 || N > 0 || K > 0;
    gemm_shape custom = {"custom", M, N, K};
    bool       text = strcmp(shapes, "text") == 0 || strcmp(shapes, "all") == 0;
    bool       vision = strcmp(shapes, "vision") == 0 || strcmp(shapes, "all") == 0;
    if (one && (M <= 0 || N <= 0 || K <= 0)) {
        return tool_usage_error(info.name, "--m, --n and --k go together, each at least 1");
    }
    if (!one && !text && !vision) {
        return tool_usage_error(info.name, "--shapes must be text, vision or all, not \"%s\"", shapes);
    }
    const gemm_shape *list[16];
    int               n_shapes = 0;
    if (one) {
        list[n_shapes++] = &custom;
    }
    for (size_t i = 0; !one && text && i < sizeof k_text_shapes / sizeof *k_text_shapes; i++) {
        list[n_shapes++] = &k_text_shapes[i];
    }
    for (size_t i = 0; !one && vision && i < sizeof k_vision_shapes / sizeof *k_vision_shapes; i++) {
        list[n_shapes++] = &k_vision_shapes[i];
    }

    caprl_machine_peaks peaks;
    caprl_error         err = {0};
    fprintf(stderr, "bench gemm: measuring the machine's ceilings...\n");
    caprl_status st = caprl_measure_peaks(threads, &peaks, &err);
    gemm_row     rows[48];
    int          n_rows = 0;
    for (int s = 0; st == CAPRL_OK && s < n_shapes; s++) {
        for (int p = 0; st == CAPRL_OK && p < 3; p++) {
            if (!pass[p]) {
                continue;
            }
            gemm_row *r = &rows[n_rows];
            memset(r, 0, sizeof *r);
            r->name = list[s]->name;
            r->b = (caprl_matmul_bench){
                .M = list[s]->M, .N = list[s]->N, .K = list[s]->K, .weight_dtype = wdtype, .pass = p, .reps = reps};
            fprintf(stderr, "bench gemm: %s %s %lld x %lld x %lld...\n", r->name, k_pass_names[p],
                    (long long)r->b.M, (long long)r->b.N, (long long)r->b.K);
            st = caprl_bench_matmul(threads, &r->b, &err);
            /* a bf16 unit's kernel against that unit's probe, the FMA kernels against the FMA probe */
            bool   on_bf16_unit = strcmp(r->b.kernel, peaks.bf16_unit) == 0;
            double ceiling = on_bf16_unit ? peaks.bf16_matrix_gflops : peaks.fp32_fma_gflops;
            r->frac = ceiling > 0 ? r->b.gflops / ceiling : 0.0;
            n_rows += st == CAPRL_OK;
        }
    }
    if (st != CAPRL_OK) {
        return tool_fail(info.name, st, err.msg);
    }
    const char *tune = getenv("CAPRL_AMX_TUNE");
    if (json) {
        printf("{\"threads\":%d,\"fp32_fma_gflops\":%.1f,\"bf16_matrix_gflops\":%.1f,\"bf16_unit\":\"%s\","
               "\"amx_tune\":\"%s\",\"gemms\":[",
               peaks.n_threads, peaks.fp32_fma_gflops, peaks.bf16_matrix_gflops, peaks.bf16_unit, tune ? tune : "");
        for (int i = 0; i < n_rows; i++) {
            const gemm_row *r = &rows[i];
            printf("%s{\"name\":\"%s\",\"pass\":\"%s\",\"m\":%lld,\"n\":%lld,\"k\":%lld,\"dtype\":\"%s\","
                   "\"kernel\":\"%s\",\"seconds\":%.6f,\"gflops\":%.1f,\"frac\":%.4f}",
                   i ? "," : "", r->name, k_pass_names[r->b.pass], (long long)r->b.M, (long long)r->b.N,
                   (long long)r->b.K, dtype, r->b.kernel, r->b.seconds, r->b.gflops, r->frac);
        }
        printf("]}\n");
        return EXIT_OK;
    }
    printf("threads %d; fp32 FMA peak %.1f GFLOP/s; bf16 matrix peak %.1f GFLOP/s (%s)%s%s\n", peaks.n_threads,
           peaks.fp32_fma_gflops, peaks.bf16_matrix_gflops, peaks.bf16_unit, tune ? "; CAPRL_AMX_TUNE=" : "",
           tune ? tune : "");
    printf("%-20s %-10s %6s %7s %5s  %-8s %9s %9s %7s\n", "shape", "pass", "M", "N", "K", "kernel", "ms",
           "GFLOP/s", "of peak");
    for (int i = 0; i < n_rows; i++) {
        const gemm_row *r = &rows[i];
        printf("%-20s %-10s %6lld %7lld %5lld  %-8s %9.2f %9.1f %6.1f%%\n", r->name, k_pass_names[r->b.pass],
               (long long)r->b.M, (long long)r->b.N, (long long)r->b.K, r->b.kernel, 1e3 * r->b.seconds, r->b.gflops,
               100.0 * r->frac);
    }
    return EXIT_OK;
}
