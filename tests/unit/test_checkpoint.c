/* Run-directory checkpoints: the layout (an HF checkpoint directory in the stored dtype that loads as a model, plus
 * the training state), masters / moments / optimizer steps / the caller's state restored bit-exactly into a fresh
 * trainer, continuing after a restore equals continuing without one, temporaries and incomplete directories
 * ignored by caprl_checkpoint_latest, a stale temporary replaced, a mismatched model or frozen set refused, and a
 * Qwen2.5-VL model (text + tower) saved with its vision tensors. */
#include <sys/stat.h>

#include "caprl/model.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl/train.h"
#include "caprl/vision.h"
#include "caprl_test.h"
#include "core/rng_impl.h"
#include "train/adamw_impl.h"

static char *g_dir;

static caprl_text_config tiny_config(int32_t hidden) {
    caprl_text_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 67;
    c.hidden_size = hidden;
    c.intermediate_size = 24;
    c.n_layers = 2;
    c.n_heads = 2;
    c.n_kv_heads = 1;
    c.head_dim = hidden / 2;
    c.max_position_embeddings = 64;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = true;
    c.bos_token_id = -1;
    c.eos_token_id = 66;
    c.torch_dtype = -1;
    return c;
}

static caprl_vision_config tiny_vision(int32_t out_hidden) {
    caprl_vision_config v;
    memset(&v, 0, sizeof v);
    v.depth = 2;
    v.hidden_size = 16;
    v.intermediate_size = 24;
    v.num_heads = 2;
    v.in_channels = 3;
    v.out_hidden_size = out_hidden;
    v.patch_size = 14;
    v.spatial_merge_size = 2;
    v.temporal_patch_size = 2;
    v.window_size = 56;
    v.n_fullatt = 1;
    v.fullatt_block_indexes[0] = 1;
    v.tokens_per_second = 2.0f;
    return v;
}

typedef struct setup {
    caprl_model   *m;
    caprl_vision  *v;
    caprl_trainer *tr;
    caprl_adamw   *opt;
} setup;

/* seed picks the initial weights: a restore must overwrite all of them */
static setup make(uint64_t seed, int32_t dtype, int32_t frozen, bool vl, int32_t hidden) {
    setup             s = {0};
    caprl_text_config cfg = tiny_config(hidden);
    caprl_error       err = {0};
    if (vl) {
        cfg.is_vl = true;
        cfg.n_mrope_sections = 3;
        cfg.mrope_section[0] = 2;
        cfg.mrope_section[1] = 1;
        cfg.mrope_section[2] = 1;
        cfg.image_token_id = 60;
        cfg.vision_start_token_id = 61;
        cfg.vision_end_token_id = 62;
        caprl_vision_config vc = tiny_vision(hidden);
        CHECK_OK(caprl_vision_init_random(&s.v, &vc, dtype, seed + 100, 0.2f, 1, &err), &err);
    }
    CHECK_OK(caprl_model_init_random(&s.m, &cfg, dtype, seed, 0.3f, NULL, &err), &err);
    caprl_trainer_params tp = caprl_trainer_default_params();
    tp.max_tokens = 32;
    tp.max_seqs = 4;
    tp.max_patches = 64;
    tp.frozen_groups = frozen;
    CHECK_OK(caprl_trainer_init(&s.tr, s.m, s.v, &tp, &err), &err);
    caprl_adamw_params ap = caprl_adamw_default_params();
    ap.lr = 1e-2f;
    ap.weight_decay = 0.01f;
    CHECK_OK(caprl_adamw_init(&s.opt, s.tr, &ap, &err), &err);
    if (!s.opt) {
        exit(test_finish("test_checkpoint"));
    }
    return s;
}

static void drop(setup *s) {
    caprl_adamw_free(s->opt);
    caprl_trainer_free(s->tr);
    caprl_vision_free(s->v);
    caprl_model_free(s->m);
}

static void steps(setup *s, int k0, int k1) {
    for (int k = k0; k < k1; k++) {
        caprl_rng r;
        caprl_rng_init(&r, 5, (uint64_t)k, 0);
        float *g = caprl_trainer_grads(s->tr);
        for (int32_t i = 0; i < caprl_trainer_n_tensors(s->tr); i++) {
            const caprl_param_info *t = caprl_trainer_tensor(s->tr, i);
            for (int64_t j = 0; j < t->numel; j++) {
                g[t->offset + j] = 0.05f * caprl_rng_normal(&r);
            }
        }
        caprl_error err = {0};
        CHECK_OK(caprl_adamw_step(s->opt, 1.0f, NULL, &err), &err);
    }
}

static bool same_state(const setup *a, const setup *b) {
    int64_t n = caprl_trainer_n_params(a->tr);
    return n == caprl_trainer_n_params(b->tr) &&
           memcmp(caprl_trainer_params_f32(a->tr), caprl_trainer_params_f32(b->tr), (size_t)n * 4) == 0 &&
           a->opt->n_moments == b->opt->n_moments &&
           memcmp(a->opt->m, b->opt->m, (size_t)a->opt->n_moments * 4) == 0 &&
           memcmp(a->opt->v, b->opt->v, (size_t)a->opt->n_moments * 4) == 0 && a->opt->t == b->opt->t;
}

static bool exists(const char *dir, const char *name) {
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    struct stat st;
    return stat(p, &st) == 0;
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

/* ---- tests -------------------------------------------------------------------------------------------------- */

static void test_roundtrip(int32_t dtype) {
    char run[4200];
    snprintf(run, sizeof run, "%s/run_%s", g_dir, caprl_dtype_name(dtype));
    setup       a = make(1, dtype, 0, false, 16);
    caprl_error err = {0};
    CHECK_EQ_I64(caprl_checkpoint_latest(run), -1); /* no directory yet */
    steps(&a, 0, 3);
    CHECK_OK(caprl_checkpoint_save(run, 3, a.tr, a.opt, "{\"cursor\": 12, \"rng\": [1, 2]}", &err), &err);
    char step_dir[4300];
    snprintf(step_dir, sizeof step_dir, "%s/step-3", run);
    static const char *const files[] = {"config.json", "generation_config.json", "model.safetensors",
                                        "training_state.safetensors", "training_state.json"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        CHECK_MSG(exists(step_dir, files[i]), "%s/%s missing", step_dir, files[i]);
    }
    CHECK(!exists(run, ".step-3.tmp"));
    CHECK_EQ_I64(caprl_checkpoint_latest(run), 3);

    /* the model file is an HF checkpoint in the stored dtype that loads as a model */
    caprl_safetensors *sf = NULL;
    char               path[4400];
    snprintf(path, sizeof path, "%s/model.safetensors", step_dir);
    CHECK_OK(caprl_safetensors_open(&sf, path, &err), &err);
    const caprl_st_tensor *q = sf ? caprl_safetensors_find(sf, "model.layers.0.self_attn.q_proj.weight") : NULL;
    CHECK(q && q->dtype == dtype);
    caprl_safetensors_free(sf);
    caprl_model *loaded = NULL;
    CHECK_OK(caprl_model_load(&loaded, step_dir, NULL, &err), &err);
    if (loaded && dtype == CAPRL_DTYPE_F32) { /* f32: the model file is the masters exactly */
        caprl_trainer *t2 = NULL;
        CHECK_OK(caprl_trainer_init(&t2, loaded, NULL, NULL, &err), &err);
        CHECK(t2 && memcmp(caprl_trainer_params_f32(t2), caprl_trainer_params_f32(a.tr),
                           (size_t)caprl_trainer_n_params(a.tr) * 4) == 0);
        caprl_trainer_free(t2);
    }
    caprl_model_free(loaded);

    /* a fresh model with other weights: everything restored bit for bit, the caller's state verbatim */
    setup b = make(2, dtype, 0, false, 16);
    CHECK(!same_state(&a, &b));
    char *user = NULL;
    CHECK_OK(caprl_checkpoint_load(run, 3, b.tr, b.opt, &user, &err), &err);
    CHECK_STR_EQ(user, "{\"cursor\": 12, \"rng\": [1, 2]}");
    caprl_free(user);
    CHECK(same_state(&a, &b));
    CHECK_EQ_I64(caprl_adamw_steps(b.opt), 3);
    /* and training goes on identically */
    steps(&a, 3, 5);
    steps(&b, 3, 5);
    CHECK(same_state(&a, &b));

    /* a checkpoint is never overwritten; a stale temporary of the next step is replaced */
    CHECK_STATUS(caprl_checkpoint_save(run, 3, a.tr, a.opt, NULL, &check_err_), CAPRL_ERR_INVALID_ARG);
    char tmp[4400];
    snprintf(tmp, sizeof tmp, "%s/.step-5.tmp", run);
    CHECK(mkdir(tmp, 0755) == 0);
    snprintf(path, sizeof path, "%s/model.safetensors.tmp.123", tmp);
    write_file(path, "half a file");
    CHECK_EQ_I64(caprl_checkpoint_latest(run), 3);
    CHECK_OK(caprl_checkpoint_save(run, 5, a.tr, a.opt, NULL, &err), &err);
    CHECK(!exists(run, ".step-5.tmp"));
    CHECK(!exists(run, "step-5/model.safetensors.tmp.123"));
    CHECK_EQ_I64(caprl_checkpoint_latest(run), 5);
    user = NULL;
    CHECK_OK(caprl_checkpoint_load(run, 5, b.tr, b.opt, &user, &err), &err);
    CHECK_STR_EQ(user, "{}");
    caprl_free(user);
    CHECK(same_state(&a, &b));
    drop(&a);
    drop(&b);
}

static void test_latest_ignores_incomplete(void) {
    char run[4200], p[4400];
    snprintf(run, sizeof run, "%s/latest", g_dir);
    setup       a = make(1, CAPRL_DTYPE_F32, 0, false, 16);
    caprl_error err = {0};
    CHECK_OK(caprl_checkpoint_save(run, 4, a.tr, a.opt, NULL, &err), &err);
    /* a temporary of a later step, a directory without state, names that are not checkpoints */
    const char *dirs[] = {".step-9.tmp", "step-8", "step-x", "step-", "step-10a", "notes"};
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", run, dirs[i]);
        CHECK(mkdir(p, 0755) == 0);
    }
    snprintf(p, sizeof p, "%s/.step-9.tmp/training_state.json", run);
    write_file(p, "{}");
    snprintf(p, sizeof p, "%s/step-11", run); /* a file, not a directory */
    write_file(p, "x");
    CHECK_EQ_I64(caprl_checkpoint_latest(run), 4);
    CHECK_EQ_I64(caprl_checkpoint_latest("/nonexistent/run"), -1);
    drop(&a);
}

static void test_mismatch(void) {
    char run[4200], p[4400];
    snprintf(run, sizeof run, "%s/mismatch", g_dir);
    setup       a = make(1, CAPRL_DTYPE_F32, 0, false, 16);
    caprl_error err = {0};
    steps(&a, 0, 1);
    CHECK_OK(caprl_checkpoint_save(run, 1, a.tr, a.opt, NULL, &err), &err);
    /* frozen now, trained then: moments would be dropped silently */
    setup f = make(1, CAPRL_DTYPE_F32, CAPRL_GROUP_EMBED, false, 16);
    CHECK_STATUS(caprl_checkpoint_load(run, 1, f.tr, f.opt, NULL, &check_err_), CAPRL_ERR_INVALID_ARG);
    drop(&f);
    /* another shape */
    setup w = make(1, CAPRL_DTYPE_F32, 0, false, 32);
    float first = caprl_trainer_params_f32(w.tr)[0];
    err.msg[0] = '\0';
    CHECK(caprl_checkpoint_load(run, 1, w.tr, w.opt, NULL, &err) != CAPRL_OK);
    CHECK_MSG(strstr(err.msg, "training_state.safetensors") != NULL, "%s", err.msg);
    CHECK(caprl_trainer_params_f32(w.tr)[0] == first); /* nothing overwritten */
    drop(&w);
    /* a missing step, a non-object caller state, a hand-edited state file */
    CHECK(caprl_checkpoint_load(run, 2, a.tr, a.opt, NULL, &err) == CAPRL_ERR_IO);
    CHECK_STATUS(caprl_checkpoint_save(run, 2, a.tr, a.opt, "[1]", &check_err_), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_checkpoint_save(run, 2, a.tr, a.opt, "{", &check_err_), CAPRL_ERR_FORMAT);
    snprintf(p, sizeof p, "%s/step-1/training_state.json", run);
    write_file(p, "{\"user\": {}, \"format\": \"caprl-training-state\", \"version\": 1, \"step\": 1, "
                  "\"optimizer_steps\": 1}");
    CHECK_STATUS(caprl_checkpoint_load(run, 1, a.tr, a.opt, NULL, &check_err_), CAPRL_ERR_FORMAT);
    drop(&a);
}

static void test_vl(void) {
    char run[4200], p[4400];
    snprintf(run, sizeof run, "%s/vl", g_dir);
    setup       a = make(3, CAPRL_DTYPE_BF16, 0, true, 16);
    caprl_error err = {0};
    steps(&a, 0, 2);
    CHECK_OK(caprl_checkpoint_save(run, 2, a.tr, a.opt, NULL, &err), &err);
    snprintf(p, sizeof p, "%s/step-2", run);
    CHECK(exists(p, "preprocessor_config.json"));
    caprl_vision *v = NULL;
    CHECK_OK(caprl_vision_load(&v, p, 1, &err), &err);
    CHECK(v && caprl_vision_dtype(v) == CAPRL_DTYPE_BF16);
    caprl_vision_free(v);
    caprl_model *m = NULL;
    CHECK_OK(caprl_model_load(&m, p, NULL, &err), &err);
    CHECK(m && caprl_model_config(m)->is_vl);
    caprl_model_free(m);
    setup b = make(4, CAPRL_DTYPE_BF16, 0, true, 16);
    CHECK_OK(caprl_checkpoint_load(run, 2, b.tr, b.opt, NULL, &err), &err);
    CHECK(same_state(&a, &b));
    /* with the tower frozen the state does not match (it has the tower's moments) */
    setup f = make(4, CAPRL_DTYPE_BF16, CAPRL_GROUP_VISION, true, 16);
    CHECK_STATUS(caprl_checkpoint_load(run, 2, f.tr, f.opt, NULL, &check_err_), CAPRL_ERR_INVALID_ARG);
    drop(&f);
    steps(&a, 2, 3);
    steps(&b, 2, 3);
    CHECK(same_state(&a, &b));
    drop(&a);
    drop(&b);
}

int main(void) {
    g_dir = test_tmpdir("checkpoint");
    test_roundtrip(CAPRL_DTYPE_F32);
    test_roundtrip(CAPRL_DTYPE_BF16);
    test_latest_ignores_incomplete();
    test_mismatch();
    test_vl();
    free(g_dir);
    return test_finish("test_checkpoint");
}
