/* caprl sft against an independent float64 PyTorch implementation of the same run (scripts/sft_reference.py, its
 * outputs in tests/fixtures/sft_ref): a tiny random Qwen2 over the byte tokenizer, raw and chat records (default and
 * own system prompt, two assistant turns), several micro-batches per step. Per run, every step's loss, learning
 * rate, gradient norm and loss-token count, and the final weights, must match the reference: the record rendering,
 * loss masking, token-count normalisation across micro-batches, gradients, clipping, AdamW with decoupled weight
 * decay, the warmup/cosine schedule and --freeze all enter these numbers. The bf16 mixed-precision run follows the
 * same reference within bf16's rounding. */
#include <float.h>
#include <jansson.h>
#include <math.h>

#include "byte_tokenizer.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl_test.h"
#include "proc_util.h"

static char g_fixture[4096];

/* max |a - b| over every tensor of two float32 checkpoints with the same names and shapes */
static double max_weight_diff(const char *a_path, const char *b_path, double *max_ref) {
    caprl_safetensors *a = NULL, *b = NULL;
    caprl_error        err = {0};
    CHECK_OK(caprl_safetensors_open(&a, a_path, &err), &err);
    CHECK_OK(caprl_safetensors_open(&b, b_path, &err), &err);
    double worst = 0.0;
    *max_ref = 0.0;
    for (int64_t i = 0; a && b && i < caprl_safetensors_n_tensors(b); i++) {
        const caprl_st_tensor *tb = caprl_safetensors_tensor(b, i);
        const caprl_st_tensor *ta = caprl_safetensors_find(a, tb->name);
        CHECK_MSG(ta && ta->dtype == CAPRL_DTYPE_F32 && ta->numel == tb->numel, "%s: %s missing or reshaped",
                  a_path, tb->name);
        for (int64_t j = 0; ta && ta->dtype == CAPRL_DTYPE_F32 && ta->numel == tb->numel && j < tb->numel; j++) {
            float x, y;
            memcpy(&x, (const char *)ta->data + 4 * j, 4);
            memcpy(&y, (const char *)tb->data + 4 * j, 4);
            worst = fmax(worst, fabs((double)x - (double)y));
            *max_ref = fmax(*max_ref, fabs((double)y));
        }
    }
    CHECK(a && b && caprl_safetensors_n_tensors(a) == caprl_safetensors_n_tensors(b));
    caprl_safetensors_free(a);
    caprl_safetensors_free(b);
    return worst;
}

static bool same_tensor(const char *a_path, const char *b_path, const char *name) {
    caprl_safetensors *a = NULL, *b = NULL;
    caprl_error        err = {0};
    CHECK_OK(caprl_safetensors_open(&a, a_path, &err), &err);
    CHECK_OK(caprl_safetensors_open(&b, b_path, &err), &err);
    const caprl_st_tensor *ta = a ? caprl_safetensors_find(a, name) : NULL;
    const caprl_st_tensor *tb = b ? caprl_safetensors_find(b, name) : NULL;
    bool same = ta && tb && ta->nbytes == tb->nbytes && memcmp(ta->data, tb->data, ta->nbytes) == 0;
    caprl_safetensors_free(a);
    caprl_safetensors_free(b);
    return same;
}

/* bf16: the matmul operands rounded to bf16 (unit roundoff u = 2^-8) with f32 masters and gradients; the errors of
 * many roundings average out in the sums, so the loss stays within u / 4 and the gradient norm within 4u of the
 * float64 reference (measured: 1.4e-4 and 4.8e-3 at worst). The weights are not compared: where a gradient is
 * near zero its sign, and so Adam's step, is noise at this precision. */
static void check_run(const char *name, const char *model, bool bf16) {
    char path[4400], run_dir[4400], cmd[16384];
    snprintf(path, sizeof path, "%s/%s.json", g_fixture, name);
    json_error_t jerr;
    json_t      *ref = json_load_file(path, 0, &jerr);
    CHECK_MSG(ref != NULL, "%s: %s", path, jerr.text);
    if (!ref) {
        return;
    }
    json_t *steps = json_object_get(ref, "steps");
    size_t  n_steps = json_array_size(steps);
    snprintf(run_dir, sizeof run_dir, "%s/%s%s", g_dir, name, bf16 ? "-bf16" : "");
    snprintf(cmd, sizeof cmd, "'%s' sft --model '%s' --data '%s/train.jsonl' --out '%s' %s --threads 2%s", CAPRL_CLI,
             model, g_fixture, run_dir, json_string_value(json_object_get(ref, "args")),
             bf16 ? " --precision bf16" : "");
    int   rc = run(cmd, NULL, 0);
    char *msg = last_stderr();
    CHECK_MSG(rc == 0, "%s: caprl sft exited %d: %s", name, rc, msg);
    free(msg);

    /* Tolerances from float32 arithmetic against a float64 reference. Step 1 sees the same weights: its loss
     * (about 6, a mean of 74 log-softmaxes over 262 logits) to 64 float32 epsilons, its gradient norm to 1e-5
     * relative (sums over ~25k parameters of products of float32 activations). Later steps start from weights
     * that already differ by the update rounding, which AdamW scales to about lr x 1e-5 per step, so losses stay
     * within 1e-5 relative. */
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    char  *metrics = read_all(path, NULL);
    char  *line = metrics;
    size_t i = 0;
    for (; line && *line && i < n_steps; i++) {
        json_t *got = json_loads(line, JSON_DISABLE_EOF_CHECK, &jerr);
        CHECK_MSG(got != NULL, "%s: metrics line %zu: %s", name, i + 1, jerr.text);
        json_t *want = json_array_get(steps, i);
        double  loss = json_number_value(json_object_get(got, "loss"));
        double  want_loss = json_number_value(json_object_get(want, "loss"));
        double  loss_rtol = bf16 ? 0x1p-8 / 4 : i == 0 ? 64 * FLT_EPSILON : 1e-5;
        CHECK_MSG(fabs(loss - want_loss) <= loss_rtol * want_loss,
                  "%s step %zu: loss %.9g, reference %.9g", name, i + 1, loss, want_loss);
        CHECK_NEAR(json_number_value(json_object_get(got, "lr")), json_number_value(json_object_get(want, "lr")),
                   4 * FLT_EPSILON, 0);
        CHECK_NEAR(json_number_value(json_object_get(got, "grad_norm")),
                   json_number_value(json_object_get(want, "grad_norm")), bf16 ? 4 * 0x1p-8 : 1e-4, 0);
        CHECK_EQ_I64(json_integer_value(json_object_get(got, "loss_tokens")),
                     json_integer_value(json_object_get(ref, "loss_tokens")));
        CHECK(json_is_false(json_object_get(got, "skipped")));
        json_decref(got);
        line = strchr(line, '\n');
        line = line ? line + 1 : NULL;
    }
    CHECK_MSG(i == n_steps, "%s: %zu metrics lines, the reference has %zu steps", name, i, n_steps);
    free(metrics);
    if (bf16) {
        json_decref(ref);
        return;
    }

    /* Final weights: each of the n steps moves a weight by at most about lr (Adam's normalised step), and the
     * float32 run's update differs from the float64 one by the relative rounding of m / sqrt(v), which is large
     * only where the gradient is tiny: allow 0.2% of one step's lr per step, far below what a wrong formula (a
     * missing bias correction, decay on the wrong term, another schedule) moves. */
    double lr = json_number_value(json_object_get(json_array_get(steps, 1), "lr"));
    char   got_w[4600], want_w[4600];
    snprintf(got_w, sizeof got_w, "%s/step-%zu/model.safetensors", run_dir, n_steps);
    snprintf(want_w, sizeof want_w, "%s/%s.safetensors", g_fixture, name);
    double max_ref = 0.0, diff = max_weight_diff(got_w, want_w, &max_ref);
    fprintf(stderr, "test_sft_ref: %s: max |w - w_ref| %.3g (lr %.3g, max |w| %.3g)\n", name, diff, lr, max_ref);
    CHECK_MSG(diff <= 0.002 * lr * (double)n_steps, "%s: final weights differ from the reference by %.3g", name,
              diff);
    json_decref(ref);
}

int main(void) {
    snprintf(g_fixture, sizeof g_fixture, "%s/tests/fixtures/sft_ref", CAPRL_SOURCE_DIR);
    char *tmp = test_tmpdir("test_sft_ref");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    free(tmp);

    char model[4400], from[4600], to[4600], cmd[9000];
    snprintf(model, sizeof model, "%s/model", g_dir);
    snprintf(cmd, sizeof cmd, "cp -r '%s/model' '%s'", g_fixture, model);
    CHECK(run(cmd, NULL, 0) == 0);
    snprintf(to, sizeof to, "%s/tokenizer.json", model);
    write_byte_tokenizer(to);

    check_run("cosine_clip_wd", model, false);
    check_run("constant_frozen_embed", model, false);
    check_run("cosine_clip_wd", model, true);
    /* frozen: the tied embedding leaves the run bit for bit as it came in */
    snprintf(from, sizeof from, "%s/model/model.safetensors", g_fixture);
    snprintf(to, sizeof to, "%s/constant_frozen_embed/step-6/model.safetensors", g_dir);
    CHECK(same_tensor(from, to, "model.embed_tokens.weight"));
    return test_finish("test_sft_ref");
}
