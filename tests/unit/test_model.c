/* Qwen2 decoder: a small random checkpoint in exact HF layout, saved and reloaded, whose logits are checked against
 * an independent float64 forward pass written here from spec/qwen.md §2 (reading the tensors straight from the
 * safetensors file); KV-cache decode equals full recomputation; batched equals unbatched; identical results at
 * 1, 2 and 3 threads; generation determinism; checkpoint errors. */
#include <float.h>

#include "caprl/generate.h"
#include "caprl/model.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl_test.h"
#include "proc_util.h"

static caprl_text_config tiny_config(bool tied) {
    caprl_text_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 301;
    c.hidden_size = 64;
    c.intermediate_size = 88;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 16;
    c.max_position_embeddings = 256;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = tied;
    c.bos_token_id = -1;
    c.eos_token_id = 300;
    c.torch_dtype = -1;
    return c;
}

#include "ref_qwen2.h"

/* logits (T, V) of one text sequence: positions 0..T-1 in every component, no splice */
static double *ref_forward_text(const ref_model *r, const int32_t *ids, int T) {
    int32_t *pos3 = malloc((size_t)3 * T * sizeof(int32_t));
    for (int c = 0; c < 3; c++) {
        for (int t = 0; t < T; t++) {
            pos3[c * T + t] = t;
        }
    }
    ref_input in = {.ids = ids, .T = T, .pos3 = pos3, .embd_row = NULL, .embd = NULL};
    double   *logits = ref_forward(r, &in);
    free(pos3);
    return logits;
}

/* ---- helpers ---------------------------------------------------------------------------------------------- */

static caprl_model *load(const char *dir, int32_t n_threads) {
    caprl_model_params mp = caprl_model_default_params();
    mp.n_threads = n_threads;
    caprl_model *m = NULL;
    caprl_error  err = {0};
    CHECK_OK(caprl_model_load(&m, dir, &mp, &err), &err);
    if (!m) {
        exit(test_finish("test_model"));
    }
    return m;
}

/* Runs one sequence through a fresh context and returns all logits (T, V). */
static float *forward_all(caprl_model *m, const int32_t *ids, int T) {
    caprl_context_params cp = caprl_context_default_params();
    cp.n_ctx = 64;
    cp.n_batch_max = T;
    cp.n_logits_max = T;
    caprl_context *ctx = NULL;
    caprl_error    err = {0};
    CHECK_OK(caprl_context_init(&ctx, m, &cp, &err), &err);
    int32_t *seq = calloc((size_t)T, sizeof(int32_t));
    int8_t  *want = malloc((size_t)T);
    memset(want, 1, (size_t)T);
    caprl_batch b = {.n_tokens = T, .tokens = ids, .seq_ids = seq, .want_logits = want};
    CHECK_OK(caprl_context_decode(ctx, &b, &err), &err);
    int    V = caprl_model_config(m)->vocab_size;
    float *out = malloc((size_t)T * V * sizeof(float));
    for (int t = 0; t < T; t++) {
        memcpy(out + (size_t)t * V, caprl_context_logits(ctx, t), (size_t)V * sizeof(float));
    }
    free(seq);
    free(want);
    caprl_context_free(ctx);
    return out;
}

static const int32_t k_ids[12] = {5, 17, 299, 0, 42, 42, 100, 7, 250, 3, 64, 128};

static void check_against_reference(const char *dir, const caprl_text_config *cfg) {
    ref_model r = {*cfg, NULL};
    caprl_error err = {0};
    CHECK_OK(caprl_safetensors_open_dir(&r.st, dir, &err), &err);
    double      *ref = ref_forward_text(&r, k_ids, 12);
    caprl_model *m = load(dir, 2);
    float       *got = forward_all(m, k_ids, 12);
    /* Error budget: f32 rounding (eps = 2^-23) in dot products of length <= 88, two residual blocks and a
     * normalisation per layer; the observed error is ~1e-6 relative, so 2000 * eps (2.4e-4) of the logit scale
     * fails on any real bug (a wrong rotation, a missing bias, a misplaced head all give O(1e-1) differences).
     * bf16 weights on AMX: the matmul operands are rounded to bf16, and the reference rounds them too; an operand
     * whose f32 and float64 values straddle a bf16 rounding boundary can still round apart (rarely), so the
     * budget there is one bf16 unit roundoff (2^-9) of the scale, while skipping the operand rounding in the
     * reference leaves ~5e-3. */
    double tol = 2000 * FLT_EPSILON;
    if (g_ref_bf16_operands) {
        tol = ldexp(1.0, -9);
    }
    double scale = 1.0, max_diff = 0.0;
    int    V = cfg->vocab_size;
    for (int i = 0; i < 12 * V; i++) {
        scale = fmax(scale, fabs(ref[i]));
    }
    for (int i = 0; i < 12 * V; i++) {
        max_diff = fmax(max_diff, fabs((double)got[i] - ref[i]));
    }
    CHECK_MSG(max_diff <= tol * scale, "max |logit diff| %.3g (scale %.3g) in %s", max_diff, scale, dir);
    fprintf(stderr, "%s: max |logit diff| %.3g of the scale (tolerance %.3g%s)\n", dir, max_diff / scale, tol,
            g_ref_bf16_operands ? ", bf16 operands on AMX" : "");
    free(ref);
    free(got);
    caprl_model_free(m);
    caprl_safetensors_free(r.st);
}

static void make_checkpoint(const char *dir, bool tied, int32_t dtype) {
    caprl_text_config cfg = tiny_config(tied);
    caprl_model      *m = NULL;
    caprl_error       err = {0};
    CHECK_OK(caprl_model_init_random(&m, &cfg, dtype, 11, 0.08f, NULL, &err), &err);
    CHECK_OK(caprl_model_save(m, dir, &err), &err);
    caprl_model_free(m);
}

/* KV-cache decode and batching must not change a single bit of the logits. */
static void check_cache_and_batching(const char *dir) {
    caprl_model *m = load(dir, 2);
    int          V = caprl_model_config(m)->vocab_size;
    float       *full = forward_all(m, k_ids, 12);
    caprl_context_params cp = caprl_context_default_params();
    cp.n_seq_max = 3;
    cp.n_ctx = 64;
    cp.n_batch_max = 32;
    cp.n_logits_max = 32;
    caprl_context *ctx = NULL;
    caprl_error    err = {0};
    CHECK_OK(caprl_context_init(&ctx, m, &cp, &err), &err);
    /* prefill 8 tokens, then 4 single-token steps */
    int32_t seq0[12] = {0};
    caprl_batch pre = {.n_tokens = 8, .tokens = k_ids, .seq_ids = seq0, .want_logits = NULL};
    CHECK_OK(caprl_context_decode(ctx, &pre, &err), &err);
    CHECK(caprl_context_n_logits(ctx) == 1);
    CHECK(memcmp(caprl_context_logits(ctx, 0), full + 7 * V, (size_t)V * sizeof(float)) == 0);
    for (int t = 8; t < 12; t++) {
        caprl_batch one = {.n_tokens = 1, .tokens = &k_ids[t], .seq_ids = seq0, .want_logits = NULL};
        CHECK_OK(caprl_context_decode(ctx, &one, &err), &err);
        CHECK_MSG(memcmp(caprl_context_logits(ctx, 0), full + (size_t)t * V, (size_t)V * sizeof(float)) == 0,
                  "cached decode differs from full recomputation at position %d", t);
    }
    CHECK_EQ_I64(caprl_context_seq_len(ctx, 0), 12);
    /* three sequences of different lengths in one batch, interleaved, vs each alone */
    caprl_context_seq_clear(ctx, -1);
    int32_t toks[21], seqs[21];
    int     n = 0;
    for (int t = 0; t < 12; t++) {
        toks[n] = k_ids[t], seqs[n++] = 0;
        if (t < 5) {
            toks[n] = k_ids[11 - t], seqs[n++] = 1;
        }
        if (t < 4) {
            toks[n] = k_ids[(t * 5) % 12], seqs[n++] = 2;
        }
    }
    caprl_batch mixed = {.n_tokens = n, .tokens = toks, .seq_ids = seqs, .want_logits = NULL};
    CHECK_OK(caprl_context_decode(ctx, &mixed, &err), &err);
    CHECK_EQ_I64(caprl_context_n_logits(ctx), 3);
    int32_t alone1[5], alone2[4];
    for (int t = 0; t < 5; t++) {
        alone1[t] = k_ids[11 - t];
    }
    for (int t = 0; t < 4; t++) {
        alone2[t] = k_ids[(t * 5) % 12];
    }
    float *l1 = forward_all(m, alone1, 5), *l2 = forward_all(m, alone2, 4);
    /* logits rows come in batch order of each sequence's last token: seq 2 ends first, then 1, then 0 */
    CHECK(memcmp(caprl_context_logits(ctx, 0), l2 + 3 * V, (size_t)V * sizeof(float)) == 0);
    CHECK(memcmp(caprl_context_logits(ctx, 1), l1 + 4 * V, (size_t)V * sizeof(float)) == 0);
    CHECK(memcmp(caprl_context_logits(ctx, 2), full + 11 * V, (size_t)V * sizeof(float)) == 0);
    /* a sequence copy continues exactly like the original */
    CHECK_OK(caprl_context_seq_copy(ctx, 1, 2, &err), &err);
    int32_t     nxt[2] = {9, 9}, s12[2] = {1, 2};
    caprl_batch two = {.n_tokens = 2, .tokens = nxt, .seq_ids = s12, .want_logits = NULL};
    CHECK_OK(caprl_context_decode(ctx, &two, &err), &err);
    CHECK(memcmp(caprl_context_logits(ctx, 0), caprl_context_logits(ctx, 1), (size_t)V * sizeof(float)) == 0);
    /* errors leave the caches untouched */
    int32_t     bad_tok = V, zero = 0;
    caprl_batch bad = {.n_tokens = 1, .tokens = &bad_tok, .seq_ids = &zero, .want_logits = NULL};
    CHECK(caprl_context_decode(ctx, &bad, &err) == CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "vocabulary") != NULL);
    int32_t     bad_seq = 3;
    caprl_batch bad2 = {.n_tokens = 1, .tokens = &zero, .seq_ids = &bad_seq, .want_logits = NULL};
    CHECK(caprl_context_decode(ctx, &bad2, &err) == CAPRL_ERR_INVALID_ARG);
    CHECK_EQ_I64(caprl_context_seq_len(ctx, 0), 12);
    CHECK_EQ_I64(caprl_context_seq_len(ctx, 1), 6);
    free(full), free(l1), free(l2);
    caprl_context_free(ctx);
    caprl_model_free(m);
}

typedef struct collected {
    int32_t tokens[4][64];
    int32_t n[4];
} collected;

static bool collect(int32_t prompt, int32_t sample, int32_t token, void *ud) {
    collected *c = ud;
    int        s = prompt * 2 + sample;
    c->tokens[s][c->n[s]++] = token;
    return true;
}

static void generate_with(caprl_model *m, collected *out, int32_t *finish) {
    caprl_context_params cp = caprl_context_default_params();
    cp.n_seq_max = 4;
    cp.n_ctx = 64;
    cp.n_batch_max = 16;
    caprl_context *ctx = NULL;
    caprl_error    err = {0};
    CHECK_OK(caprl_context_init(&ctx, m, &cp, &err), &err);
    const int32_t        *prompts[2] = {k_ids, k_ids + 6};
    int64_t               lens[2] = {6, 3};
    caprl_generate_params gp = caprl_generate_default_params();
    gp.n_samples = 2;
    gp.max_new_tokens = 20;
    gp.sampling.seed = 99;
    gp.sampling.temperature = 1.5f;
    memset(out, 0, sizeof *out);
    CHECK_OK(caprl_generate(ctx, prompts, lens, 2, NULL, &gp, collect, out, finish, NULL, &err), &err);
    caprl_context_free(ctx);
}

static void check_threads_and_generation(const char *dir) {
    float     *ref = NULL;
    collected  ref_gen;
    int32_t    ref_finish[4];
    for (int32_t nt = 1; nt <= 3; nt++) {
        caprl_model *m = load(dir, nt);
        float       *got = forward_all(m, k_ids, 12);
        collected    gen;
        int32_t      finish[4];
        generate_with(m, &gen, finish);
        if (!ref) {
            ref = got;
            ref_gen = gen;
            memcpy(ref_finish, finish, sizeof finish);
            for (int s = 0; s < 4; s++) {
                CHECK(gen.n[s] >= 1 && gen.n[s] <= 20);
                CHECK(finish[s] == CAPRL_FINISH_EOS || finish[s] == CAPRL_FINISH_LENGTH);
                CHECK(finish[s] != CAPRL_FINISH_EOS || gen.tokens[s][gen.n[s] - 1] == 300);
            }
            /* two samples of one prompt draw from different streams */
            CHECK(memcmp(gen.tokens[0], gen.tokens[1], sizeof gen.tokens[0]) != 0);
        } else {
            int V = caprl_model_config(m)->vocab_size;
            CHECK_MSG(memcmp(ref, got, (size_t)12 * V * sizeof(float)) == 0, "logits differ at %d threads", nt);
            CHECK_MSG(memcmp(&ref_gen, &gen, sizeof gen) == 0, "generated tokens differ at %d threads", nt);
            CHECK(memcmp(ref_finish, finish, sizeof finish) == 0);
            free(got);
        }
        caprl_model_free(m);
    }
    free(ref);
}

/* ---- bad checkpoints -------------------------------------------------------------------------------------- */

static void write_file(const char *dir, const char *name, const char *text) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static void expect_load_error(const char *dir, caprl_status code, const char *needle) {
    caprl_model *m = NULL;
    caprl_error  err = {0};
    caprl_status st = caprl_model_load(&m, dir, NULL, &err);
    CHECK_MSG(st == code, "%s: status %d (%s), expected %d", dir, st, err.msg, code);
    CHECK_MSG(strstr(err.msg, needle) != NULL, "message '%s' lacks '%s'", err.msg, needle);
    CHECK(m == NULL);
}

static void check_bad_checkpoints(const char *base) {
    char dir[4096], cmd[8400];
    /* weights of a tied model under a config that says untied: lm_head.weight is missing */
    snprintf(dir, sizeof dir, "%s/tied", base);
    caprl_text_config cfg = tiny_config(false);
    char             *json = NULL;
    caprl_error       err = {0};
    CHECK_OK(caprl_text_config_to_json(&cfg, CAPRL_DTYPE_F32, &json, &err), &err);
    snprintf(cmd, sizeof cmd, "rm -rf %s/untied_cfg && cp -r %s %s/untied_cfg", base, dir, base);
    CHECK(system(cmd) == 0);
    snprintf(dir, sizeof dir, "%s/untied_cfg", base);
    write_file(dir, "config.json", json);
    caprl_free(json);
    expect_load_error(dir, CAPRL_ERR_FORMAT, "lm_head.weight");

    /* vocab mismatch: config says 400 rows, the embedding has 301 */
    cfg = tiny_config(true);
    cfg.vocab_size = 400;
    CHECK_OK(caprl_text_config_to_json(&cfg, CAPRL_DTYPE_F32, &json, &err), &err);
    write_file(dir, "config.json", json);
    caprl_free(json);
    expect_load_error(dir, CAPRL_ERR_FORMAT, "model.embed_tokens.weight");

    /* a different hidden size: every shape is checked */
    cfg = tiny_config(true);
    cfg.intermediate_size = 96;
    CHECK_OK(caprl_text_config_to_json(&cfg, CAPRL_DTYPE_F32, &json, &err), &err);
    write_file(dir, "config.json", json);
    caprl_free(json);
    expect_load_error(dir, CAPRL_ERR_FORMAT, "mlp");

    /* fewer layers in the config than in the file: the extra tensors are named */
    cfg = tiny_config(true);
    cfg.n_layers = 1;
    CHECK_OK(caprl_text_config_to_json(&cfg, CAPRL_DTYPE_F32, &json, &err), &err);
    write_file(dir, "config.json", json);
    caprl_free(json);
    expect_load_error(dir, CAPRL_ERR_UNSUPPORTED, "model.layers.1.");

    /* zero heads, invalid JSON, no weights, not a directory */
    cfg = tiny_config(true);
    CHECK_OK(caprl_text_config_to_json(&cfg, CAPRL_DTYPE_F32, &json, &err), &err);
    char *heads = strstr(json, "\"num_attention_heads\": 4");
    CHECK(heads != NULL);
    if (heads) {
        heads[strlen("\"num_attention_heads\": ")] = '0';
    }
    write_file(dir, "config.json", json);
    caprl_free(json);
    expect_load_error(dir, CAPRL_ERR_FORMAT, "num_attention_heads");
    write_file(dir, "config.json", "{\"model_type\": \"qwen2\",");
    expect_load_error(dir, CAPRL_ERR_FORMAT, "config.json");
    snprintf(cmd, sizeof cmd, "rm -f %s/model.safetensors", dir);
    CHECK(system(cmd) == 0);
    cfg = tiny_config(true);
    CHECK_OK(caprl_text_config_to_json(&cfg, CAPRL_DTYPE_F32, &json, &err), &err);
    write_file(dir, "config.json", json);
    caprl_free(json);
    expect_load_error(dir, CAPRL_ERR_IO, "safetensors");
    expect_load_error("/nonexistent-dir", CAPRL_ERR_IO, "/nonexistent-dir");
}

/* An F16 checkpoint (transformers' torch_dtype float16) is held widened to f32 and saved back as F16, bit for bit,
 * with torch_dtype float16 again. */
static void check_f16_roundtrip(const char *base) {
    char src[4200], f16[4200], back[4200], path[4300];
    snprintf(src, sizeof src, "%s/untied", base);
    snprintf(f16, sizeof f16, "%s/f16", base);
    snprintf(back, sizeof back, "%s/f16_back", base);
    caprl_error        err = {0};
    caprl_safetensors *st = NULL;
    snprintf(path, sizeof path, "%s/model.safetensors", src);
    CHECK_OK(caprl_safetensors_open(&st, path, &err), &err);
    if (!st) {
        return;
    }
    int64_t          n = caprl_safetensors_n_tensors(st);
    uint16_t       **halves = calloc((size_t)n, sizeof *halves);
    caprl_st_writer *w = caprl_st_writer_init();
    for (int64_t i = 0; i < n; i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(st, i);
        CHECK(t->dtype == CAPRL_DTYPE_F32);
        float *v = malloc((size_t)t->numel * sizeof(float));
        memcpy(v, t->data, (size_t)t->numel * sizeof(float));
        halves[i] = malloc((size_t)t->numel * sizeof(uint16_t));
        caprl_f32_to_f16_row(halves[i], v, (size_t)t->numel);
        free(v);
        CHECK_OK(caprl_st_writer_add(w, t->name, CAPRL_DTYPE_F16, t->n_dims, t->shape, halves[i], &err), &err);
    }
    snprintf(path, sizeof path, "mkdir -p '%s' && sed 's/\"torch_dtype\": \"float32\"/\"torch_dtype\": \"float16\"/' "
             "'%s/config.json' > '%s/config.json'", f16, src, f16);
    CHECK(system(path) == 0);
    snprintf(path, sizeof path, "%s/model.safetensors", f16);
    CHECK_OK(caprl_st_writer_save(w, path, &err), &err);
    caprl_st_writer_free(w);
    caprl_model *m = load(f16, 1);
    CHECK_OK(caprl_model_save(m, back, &err), &err);
    caprl_model_free(m);
    caprl_safetensors *out = NULL;
    snprintf(path, sizeof path, "%s/model.safetensors", back);
    CHECK_OK(caprl_safetensors_open(&out, path, &err), &err);
    for (int64_t i = 0; out && i < n; i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(st, i), *o = caprl_safetensors_find(out, t->name);
        CHECK_MSG(o && o->dtype == CAPRL_DTYPE_F16 && memcmp(o->data, halves[i], (size_t)t->numel * 2) == 0,
                  "%s: not written back as the same F16", t->name);
        free(halves[i]);
    }
    free(halves);
    caprl_safetensors_free(out);
    caprl_safetensors_free(st);
    snprintf(path, sizeof path, "%s/config.json", back);
    char *cfg = read_text(path);
    CHECK(cfg && strstr(cfg, "\"torch_dtype\": \"float16\"") != NULL);
    free(cfg);
}

int main(void) {
    char *base = test_tmpdir("model");
    char  dir[4096];
    for (int variant = 0; variant < 3; variant++) {
        bool    tied = variant != 1;
        int32_t dtype = variant == 2 ? CAPRL_DTYPE_BF16 : CAPRL_DTYPE_F32;
        snprintf(dir, sizeof dir, "%s/%s", base, variant == 0 ? "tied" : variant == 1 ? "untied" : "bf16");
        make_checkpoint(dir, tied, dtype);
        caprl_text_config cfg = tiny_config(tied);
        g_ref_bf16_operands = dtype == CAPRL_DTYPE_BF16 && default_backend_rounds_bf16();
        check_against_reference(dir, &cfg);
        g_ref_bf16_operands = false;
    }
    snprintf(dir, sizeof dir, "%s/tied", base);
    check_cache_and_batching(dir);
    check_threads_and_generation(dir);
    snprintf(dir, sizeof dir, "%s/bf16", base);
    check_cache_and_batching(dir);
    check_bad_checkpoints(base);
    check_f16_roundtrip(base);
    free(base);
    return test_finish("test_model");
}
