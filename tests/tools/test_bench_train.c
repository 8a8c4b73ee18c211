/* caprl bench train --quick --json: every field present and consistent with the others and with figures derived by
 * hand for the quick model (hidden 128, 2 layers, 4 heads of 32, 2 KV heads, FFN 512, vocabulary 8192, tied; two
 * sequences of 64 tokens, one timed step). No timing is asserted: only that the speeds are positive and that the
 * derived figures (GFLOP/s, fractions, memory sums) follow from the raw ones. */
#include <jansson.h>
#include <math.h>
#include <stdbool.h>

#include "caprl_test.h"
#include "cli_util.h"

/* The quick model's shape (tools/caprl/bench.c, bench_config(true)). */
enum { C = 128, L = 2, H = 4, D = 32, HKV = 2, F = 512, V = 8192, T = 64, SEQS = 2 };

static double num(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    CHECK_MSG(json_is_number(v), "field '%s' missing or not a number", key);
    return json_is_number(v) ? json_number_value(v) : 0.0; /* the failure is counted; 0 keeps casts defined */
}

static const char *str(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    CHECK_MSG(json_is_string(v), "field '%s' missing or not a string", key);
    return json_is_string(v) ? json_string_value(v) : "";
}

static void check_run(const json_t *top, const json_t *r, const char *precision) {
    CHECK_STR_EQ(str(r, "precision"), precision);
    double tps = num(r, "tokens_per_s"), tps_mean = num(r, "tokens_per_s_mean"), step = num(r, "step_seconds");
    double fwd = num(r, "forward_seconds"), bwd = num(r, "backward_seconds"), opt = num(r, "optimizer_seconds");
    CHECK_MSG(tps > 0 && isfinite(tps) && tps_mean > 0 && tps_mean <= tps * (1 + 1e-3), "%s: %g, mean %g tok/s",
              precision, tps, tps_mean);
    CHECK_MSG(fwd > 0 && bwd > 0 && opt >= 0, "%s: phases %g %g %g", precision, fwd, bwd, opt);
    CHECK_NEAR(fwd + bwd + opt, step, 0, 2e-6);   /* printed to 1e-6 s each */
    CHECK_NEAR(tps, T * SEQS / step, 1e-4, 0);    /* tokens of the fastest step over its time */
    double gflops = num(r, "gflops"), ceiling = num(r, "ceiling_gflops");
    CHECK_NEAR(gflops, num(top, "flops_per_step") * tps / (T * SEQS) / 1e9, 1e-4, 0);
    CHECK_NEAR(num(r, "fraction"), gflops / ceiling, 1e-4, 0);
    /* f32 against the FMA peak; bf16 against the matrix unit where there is one, else the FMA peak too */
    bool matrix = strcmp(precision, "bf16") == 0 && num(top, "bf16_matrix_gflops") > 0;
    CHECK_STR_EQ(str(r, "ceiling"), matrix ? str(top, "bf16_unit") : "fp32-fma");
    CHECK_NEAR(ceiling, matrix ? num(top, "bf16_matrix_gflops") : num(top, "fp32_fma_gflops"), 0, 0.051);
    /* a random model (embedding std 0.02) spreads its mass evenly: loss ln(V) plus about var(logit) / 2 = 0.03 */
    CHECK_NEAR(num(r, "loss"), log((double)V), 0, 0.25);
    double gn = num(r, "grad_norm");
    CHECK_MSG(gn > 0 && isfinite(gn), "%s: grad_norm %g", precision, gn);

    /* memory: AdamW keeps two f32 moments per parameter element */
    double per_layer = 2.0 * C * H * D + 2.0 * C * HKV * D + 3.0 * C * F /* matrices */
                       + H * D + 2.0 * HKV * D + 2.0 * C;                /* q, k, v biases; two norms */
    double numel = (double)V * C + L * per_layer + C;
    double planned = num(r, "planned_bytes"), optim = num(r, "optimizer_bytes"), act = num(r, "activation_bytes");
    double act_rc = num(r, "activation_bytes_recompute");
    CHECK_EQ_I64((int64_t)optim, (int64_t)(8 * numel));
    CHECK_EQ_I64((int64_t)num(r, "step_peak_bytes"), (int64_t)(planned + optim));
    /* planned = flat buffers (params and grads, plus the bf16 shadow in mixed precision; a few alignment gaps)
     * plus the activations */
    double flat = numel * (strcmp(precision, "bf16") == 0 ? 10 : 8);
    CHECK_MSG(planned - act >= flat && planned - act <= flat * 1.01, "%s: planned %g - activations %g vs %g",
              precision, planned, act, flat);
    /* recompute keeps one layer's activation set instead of L: it saves (L - 1) of them; a set holds per token
     * xn1, xmid, xn2 (C each), q and the attention output (H D each), k, v (HKV D each), lse (H), gate, up (F) */
    double set = (double)T * SEQS * (3.0 * C + 2.0 * H * D + 2.0 * HKV * D + H + 2.0 * F) * sizeof(float);
    double saved = num(r, "recompute_saved_bytes");
    CHECK_EQ_I64((int64_t)saved, (int64_t)(act - act_rc));
    CHECK_MSG(act_rc > 0 && saved >= (L - 1) * set && saved <= (L - 1) * set * 1.05, "%s: saved %g, expected %g",
              precision, saved, (L - 1) * set);
    double rss = num(r, "resident_bytes"), growth = num(r, "rss_growth_bytes");
    CHECK_MSG(rss == -1 || rss >= planned, "%s: resident %g below the planned %g", precision, rss, planned);
#if !defined(__SANITIZE_ADDRESS__)
    /* nothing is allocated inside a step: the timed steps add no resident memory after the warm-up step */
    CHECK_MSG(rss == -1 || fabs(growth) < 1e6, "%s: resident memory grew by %g bytes over the timed step", precision,
              growth);
#else
    (void)growth;
#endif
}

int main(void) {
    char *tmp = test_tmpdir("bench_train");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    static char out[1 << 16];
    char        err[8192];

    CHECK(run_cli("bench train --help", out, sizeof out) == 0 && strstr(out, "usage: caprl bench train") != NULL);
    int rc = run_cli("bench train --quick --precision f16", NULL, 0);
    read_stderr(err, sizeof err);
    CHECK_MSG(rc == 1 && strstr(err, "--precision"), "bad --precision: exit %d: %s", rc, err);

    rc = run_cli("bench train --quick --json --threads 2", out, sizeof out);
    read_stderr(err, sizeof err);
    CHECK_MSG(rc == 0, "bench train --quick --json exited %d: %s", rc, err);
    json_error_t jerr;
    json_t      *top = json_loads(out, 0, &jerr);
    CHECK_MSG(json_is_object(top), "stdout is not one JSON object (%s): %s", jerr.text, out);
    if (json_is_object(top)) {
        CHECK_EQ_I64(num(top, "threads"), 2);
        CHECK(num(top, "fp32_fma_gflops") > 0 && num(top, "bf16_matrix_gflops") >= 0 && num(top, "mem_bw_gbs") > 0);
        /* the FMA ceiling is the larger of the two probes */
        const json_t *probes = json_object_get(top, "fp32_fma_gflops_probes");
        CHECK_MSG(json_is_array(probes) && json_array_size(probes) == 2, "fp32_fma_gflops_probes: two numbers");
        double p0 = json_number_value(json_array_get(probes, 0)), p1 = json_number_value(json_array_get(probes, 1));
        CHECK_MSG(p0 > 0 && p1 > 0, "probes %g %g", p0, p1);
        CHECK_NEAR(num(top, "fp32_fma_gflops"), p0 > p1 ? p0 : p1, 0, 1e-9);
        const char *unit = str(top, "bf16_unit");
        CHECK_MSG(strcmp(unit, "amx-bf16") == 0 || strcmp(unit, "avx512-bf16") == 0 || strcmp(unit, "none") == 0,
                  "bf16_unit '%s'", unit);
        CHECK_EQ_I64(num(top, "hidden"), C);
        CHECK_EQ_I64(num(top, "layers"), L);
        CHECK_EQ_I64(num(top, "vocab"), V);
        CHECK_EQ_I64(num(top, "seq_len"), T);
        CHECK_EQ_I64(num(top, "seqs"), SEQS);
        CHECK_EQ_I64(num(top, "tokens_per_step"), T * SEQS);
        CHECK_EQ_I64(num(top, "steps"), 1);
        CHECK(json_is_false(json_object_get(top, "recompute")));
        /* 6 x matmul parameters (the tied lm_head counted as the matmul it is) x tokens + 3 x causal attention */
        double mm = L * (2.0 * C * H * D + 2.0 * C * HKV * D + 3.0 * C * F) + (double)V * C;
        CHECK_NEAR(num(top, "matmul_params"), mm, 0, 0.5);
        double attn = (double)L * H * 4.0 * D * T * (T + 1) / 2.0;
        CHECK_NEAR(num(top, "flops_per_step"), 3.0 * SEQS * (2.0 * mm * T + attn), 1e-5, 0);
        const json_t *runs = json_object_get(top, "runs");
        CHECK_MSG(json_is_array(runs) && json_array_size(runs) == 2, "runs: f32 and bf16 expected");
        if (json_array_size(runs) == 2) {
            check_run(top, json_array_get(runs, 0), "f32");
            check_run(top, json_array_get(runs, 1), "bf16");
        }
    }
    json_decref(top);
    free(tmp);
    return test_finish("test_bench_train");
}
