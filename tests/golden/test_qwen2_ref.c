/* Parity with an independent implementation: tiny Qwen2 checkpoints written by scripts/qwen2_reference.py (its
 * own safetensors writer, transformers-style config.json) and the logits of its PyTorch forward. caprl must load
 * the foreign files and reproduce the logits to float32 accuracy. */
#include <float.h>

#include "caprl/model.h"
#include "caprl_test.h"

static void check_variant(const char *name) {
    char dir[4096], path[4200];
    snprintf(dir, sizeof dir, "%s/tests/fixtures/qwen2_ref/%s", CAPRL_SOURCE_DIR, name);
    caprl_model *m = NULL;
    caprl_error  err = {0};
    CHECK_OK(caprl_model_load(&m, dir, NULL, &err), &err);
    if (!m) {
        return;
    }
    int32_t ids[64];
    int     T = 0;
    snprintf(path, sizeof path, "%s.ids", dir);
    FILE *f = fopen(path, "r");
    CHECK(f != NULL);
    while (f && T < 64 && fscanf(f, "%d,", &ids[T]) == 1) {
        T++;
    }
    if (f) {
        fclose(f);
    }
    CHECK(T == 16);
    int    V = caprl_model_config(m)->vocab_size;
    float *ref = malloc((size_t)T * V * sizeof(float));
    snprintf(path, sizeof path, "%s.logits", dir);
    f = fopen(path, "rb");
    CHECK(f && fread(ref, sizeof(float), (size_t)T * V, f) == (size_t)T * V);
    if (f) {
        fclose(f);
    }
    caprl_context_params cp = caprl_context_default_params();
    cp.n_ctx = T;
    cp.n_batch_max = T;
    cp.n_logits_max = T;
    caprl_context *ctx = NULL;
    CHECK_OK(caprl_context_init(&ctx, m, &cp, &err), &err);
    int32_t seq[64] = {0};
    int8_t  want[64];
    memset(want, 1, sizeof want);
    caprl_batch b = {.n_tokens = T, .tokens = ids, .seq_ids = seq, .want_logits = want};
    CHECK_OK(caprl_context_decode(ctx, &b, &err), &err);
    double scale = 1.0, max_diff = 0.0;
    for (int i = 0; i < T * V; i++) {
        scale = fmax(scale, fabs(ref[i]));
    }
    for (int t = 0; t < T; t++) {
        const float *got = caprl_context_logits(ctx, t);
        for (int v = 0; v < V; v++) {
            max_diff = fmax(max_diff, fabs((double)got[v] - ref[(size_t)t * V + v]));
        }
    }
    /* Both sides compute in float32 with different summation orders: per-logit error is a few hundred ulps of
     * the logit scale at most after two layers; 1000 * eps * scale (1.2e-4 * scale) still fails on any
     * semantic difference (those are O(0.1)). */
    CHECK_MSG(max_diff <= 1000 * FLT_EPSILON * scale, "%s: max |logit diff| %.3g (scale %.3g)", name, max_diff, scale);
    fprintf(stderr, "%s: max |logit diff| vs PyTorch %.3g\n", name, max_diff);
    free(ref);
    caprl_context_free(ctx);
    caprl_model_free(m);
}

int main(void) {
    /* The PyTorch reference computes in float32 (bf16 weights widened); on a CPU with a bf16 matrix unit (AMX or
     * AVX512-BF16) caprl would round the bf16 model's activations to bf16 too, which test_model checks against
     * its own float64 reference. */
    setenv("CAPRL_BF16_UNITS", "0", 1);
    check_variant("f32_tied");
    check_variant("f32_untied");
    check_variant("bf16_tied");
    return test_finish("test_qwen2_ref");
}
