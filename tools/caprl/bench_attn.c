/* caprl bench attn: the attention kernels on their own (the decoder's causal prefill, the trainer's forward and
 * backward, the vision tower's full and windowed attention) at the benchmarked models' shapes or one given shape,
 * as a fraction of the fp32 FMA peak (of the bf16 matrix unit for the vision tower's bf16 form), optionally
 * limited to AVX2 to compare vector widths. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/bench.h"
#include "common.h"
#include "opts.h"
#include "subcommands.h"

typedef struct attn_case {
    const char *name;
    int32_t     kind;
    int64_t     tokens, heads, kv_heads, head_dim, segment;
} attn_case;

/* Qwen2.5-0.5B at 512 tokens (and one decode step over 2048 cached ones); the Qwen2.5-VL-3B tower at 1036x756
 * (3996 patches), whole and in 8 x 8 windows. */
static const attn_case k_cases[] = {
    {"decoder", CAPRL_ATTN_DECODER, 512, 14, 2, 64, 0},
    {"decoder.step", CAPRL_ATTN_STEP, 2048, 14, 2, 64, 0},
    {"train", CAPRL_ATTN_TRAIN, 512, 14, 2, 64, 0},
    {"vision.full", CAPRL_ATTN_SEGMENTS, 3996, 16, 16, 80, 0},
    {"vision.window", CAPRL_ATTN_SEGMENTS, 3996, 16, 16, 80, 64},
};

int cmd_bench_attn(int argc, char **argv) {
    static const cmd_info info = {
        "bench attn",
        "caprl bench attn [--threads N] [--kind decoder|train|vision|all] [--isa best|avx2] [--bf16] [--tokens T "
        "--heads H --kv-heads K --head-dim D --segment S] [--reps R] [--json]",
        "Time the attention kernels on their own, as a fraction of the fp32 FMA peak.",
        "Kinds: the decoder's causal prefill (attn_fwd) and the trainer's causal attention (forward, then backward)\n"
        "at Qwen2.5-0.5B's shape (512 tokens, 14 heads, 2 KV heads, D 64); one single-sequence decode step at that\n"
        "shape (decoder.step: one query row over 2048 cached keys; --kind decoder runs it too); the vision tower's\n"
        "segment attention at Qwen2.5-VL-3B's (3996 patches of a 1036x756 image, 16 heads, D 80), whole and in\n"
        "64-patch windows.\n"
        "--tokens/--heads/--kv-heads/--head-dim/--segment replace the shape of every kind run. FLOPs = 4 x heads x D\n"
        "x (query, key) pairs (the forward's two products; the backward is timed against the same count).\n"
        "--isa avx2 runs the AVX2 kernels on an AVX-512 machine, to compare the two (the same bits, by design).\n"
        "--bf16 runs the vision kinds as a bf16 model's tower does: both products on the bf16 matrix unit (AMX or\n"
        "AVX512-BF16) with bf16 operands, measured against that unit's peak; without such a unit it changes nothing.\n"
        "The isa column is the backend's vector level, or the matrix unit that ran."};
    int32_t     threads = 0, reps = 3;
    int64_t     tokens = 0, heads = 0, kv_heads = 0, head_dim = 0, segment = -1;
    bool        json = false, bf16 = false;
    const char *kind = "all", *isa = "best";
    opt_spec    specs[] = {
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {"kind", OPT_STRING, &kind, "decoder, train, vision or all", 0, 0, "K", 0},
        {"isa", OPT_STRING, &isa, "best or avx2", 0, 0, "I", 0},
        {"bf16", OPT_FLAG, &bf16, "vision: bf16 operands on the bf16 matrix unit", 0, 0, NULL, 0},
        {"tokens", OPT_I64, &tokens, "rows (0: each kind's own)", 0, 1 << 20, "T", 0},
        {"heads", OPT_I64, &heads, "query heads (0: each kind's own)", 0, 4096, "H", 0},
        {"kv-heads", OPT_I64, &kv_heads, "KV heads (0: each kind's own; vision: = heads)", 0, 4096, "K", 0},
        {"head-dim", OPT_I64, &head_dim, "D (0: each kind's own)", 0, 4096, "D", 0},
        {"segment", OPT_I64, &segment, "vision: rows per segment, 0 = whole (-1: each case's own)", -1, 1 << 20,
         "S", 0},
        {"reps", OPT_INT, &reps, "timed calls per case (the fastest counts)", 1, 1000, "R", 0},
        {"json", OPT_FLAG, &json, "print all figures as one JSON object", 0, 0, NULL, 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    bool all = strcmp(kind, "all") == 0;
    if (!all && strcmp(kind, "decoder") != 0 && strcmp(kind, "train") != 0 && strcmp(kind, "vision") != 0) {
        return tool_usage_error(info.name, "--kind must be decoder, train, vision or all, not \"%s\"", kind);
    }
    int32_t max_isa = strcmp(isa, "best") == 0 ? 0 : strcmp(isa, "avx2") == 0 ? 1 : -1;
    if (max_isa < 0) {
        return tool_usage_error(info.name, "--isa must be best or avx2, not \"%s\"", isa);
    }
    caprl_machine_peaks peaks;
    caprl_error         err = {0};
    fprintf(stderr, "bench attn: measuring the machine's ceilings...\n");
    caprl_status     st = caprl_measure_peaks(threads, &peaks, &err);
    caprl_attn_bench runs[sizeof k_cases / sizeof k_cases[0]];
    const char      *names[sizeof k_cases / sizeof k_cases[0]];
    int              n = 0;
    for (size_t i = 0; st == CAPRL_OK && i < sizeof k_cases / sizeof k_cases[0]; i++) {
        const attn_case *c = &k_cases[i];
        if (!all && strncmp(c->name, kind, strlen(kind)) != 0) {
            continue;
        }
        caprl_attn_bench *b = &runs[n];
        memset(b, 0, sizeof *b);
        b->kind = c->kind;
        b->tokens = tokens > 0 ? tokens : c->tokens;
        b->heads = heads > 0 ? heads : c->heads;
        b->kv_heads = c->kind == CAPRL_ATTN_SEGMENTS ? b->heads : kv_heads > 0 ? kv_heads : c->kv_heads;
        b->head_dim = head_dim > 0 ? head_dim : c->head_dim;
        b->segment = segment >= 0 ? segment : c->segment;
        b->max_isa = max_isa;
        b->bf16 = bf16;
        b->reps = reps;
        names[n] = c->name;
        fprintf(stderr, "bench attn: %s, %lld tokens...\n", c->name, (long long)b->tokens);
        st = caprl_bench_attention(threads, b, &err);
        n += st == CAPRL_OK;
    }
    if (st != CAPRL_OK) {
        return tool_fail(info.name, st, err.msg);
    }
    double peak = peaks.fp32_fma_gflops;
    if (json) {
        printf("{\"threads\":%d,\"fp32_fma_gflops\":%.1f,\"bf16_matrix_gflops\":%.1f,\"attention\":[",
               peaks.n_threads, peak, peaks.bf16_matrix_gflops);
    } else {
        printf("threads %d; fp32 FMA peak %.1f GFLOP/s; bf16 matrix peak %.1f GFLOP/s (%s)\n", peaks.n_threads,
               peak, peaks.bf16_matrix_gflops, peaks.bf16_unit);
        printf("%-15s %-11s %6s %5s %3s %4s %6s %10s %9s %7s %10s\n", "kind", "isa", "tokens", "heads", "kv", "D",
               "seg", "fwd ms", "GFLOP/s", "of peak", "bwd ms");
    }
    for (int i = 0; i < n; i++) {
        const caprl_attn_bench *b = &runs[i];
        bool   on_unit = strstr(b->isa, "bf16") != NULL;
        double ceiling = on_unit ? peaks.bf16_matrix_gflops : peak;
        double gflops = 1e-9 * b->flops / b->seconds, frac = ceiling > 0 ? gflops / ceiling : 0.0;
        if (json) {
            printf("%s{\"name\":\"%s\",\"isa\":\"%s\",\"tokens\":%lld,\"heads\":%lld,\"kv_heads\":%lld,"
                   "\"head_dim\":%lld,\"segment\":%lld,\"seconds\":%.6f,\"backward_seconds\":%.6f,\"gflops\":%.1f,"
                   "\"frac\":%.4f}",
                   i ? "," : "", names[i], b->isa, (long long)b->tokens, (long long)b->heads, (long long)b->kv_heads,
                   (long long)b->head_dim, (long long)b->segment, b->seconds, b->backward_seconds, gflops, frac);
        } else {
            printf("%-15s %-11s %6lld %5lld %3lld %4lld %6lld %10.3f %9.1f %6.1f%% ", names[i], b->isa,
                   (long long)b->tokens, (long long)b->heads, (long long)b->kv_heads, (long long)b->head_dim,
                   (long long)b->segment, 1e3 * b->seconds, gflops, 100.0 * frac);
            if (b->kind == CAPRL_ATTN_TRAIN) {
                printf("%10.3f\n", 1e3 * b->backward_seconds);
            } else {
                printf("%10s\n", "-");
            }
        }
    }
    if (json) {
        printf("]}\n");
    }
    return EXIT_OK;
}
