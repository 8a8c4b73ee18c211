/* Qwen2 model objects: the parameter table, loading from a Hugging Face checkpoint directory, random
 * initialisation, saving, and accessors. Forward passes live in context.c. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "caprl/image.h"
#include "caprl/tensor.h"
#include "caprl/vlm.h"
#include "core/ckmath.h"
#include "core/error_impl.h"
#include "core/file_impl.h"
#include "core/log_impl.h"
#include "core/rng_impl.h"
#include "model/model_impl.h"
#include "model/weights_impl.h"

#define MAX_CONFIG_BYTES (16u << 20)

caprl_model_params caprl_model_default_params(void) {
    caprl_model_params p = {0};
    p.n_threads = 0;
    p.load_tokenizer = true;
    return p;
}

/* ---- parameter table -------------------------------------------------------------------------------------- */

static void add_matrix(caprl_model *m, int32_t *n, const char *name, caprl_weight *w, int64_t rows, int64_t cols) {
    param_desc *d = &m->params[(*n)++];
    snprintf(d->name, sizeof d->name, "%s", name);
    d->kind = PARAM_MATRIX;
    d->shape[0] = rows;
    d->shape[1] = cols;
    d->matrix = w;
    w->rows = rows;
    w->cols = cols;
}

static void add_vector(caprl_model *m, int32_t *n, const char *name, float **v, int64_t len) {
    param_desc *d = &m->params[*n];
    snprintf(d->name, sizeof d->name, "%s", name);
    d->kind = PARAM_VECTOR;
    d->shape[0] = len;
    d->shape[1] = 1;
    d->vector = v;
    d->vector_dtype = &m->vector_dtypes[*n];
    (*n)++;
}

void model_build_param_table(caprl_model *m) {
    const caprl_text_config *c = &m->cfg;
    int64_t C = c->hidden_size, F = c->intermediate_size, V = c->vocab_size, D = c->head_dim;
    int64_t qd = (int64_t)c->n_heads * D, kvd = (int64_t)c->n_kv_heads * D;
    int32_t cap = 3 + 12 * c->n_layers;
    m->params = caprl_xcalloc((size_t)cap, sizeof *m->params);
    m->vector_dtypes = caprl_xcalloc((size_t)cap, sizeof *m->vector_dtypes);
    m->layers = caprl_xcalloc((size_t)c->n_layers, sizeof *m->layers);
    int32_t     n = 0;
    char        name[CAPRL_PARAM_NAME_CAP];
    const char *pre = m->text_prefix ? m->text_prefix : "model.";
    snprintf(name, sizeof name, "%sembed_tokens.weight", pre);
    add_matrix(m, &n, name, &m->embed, V, C);
    for (int32_t l = 0; l < c->n_layers; l++) {
        layer_weights *lw = &m->layers[l];
#define LAYER_NAME(suffix) (snprintf(name, sizeof name, "%slayers.%d.%s", pre, l, suffix), name)
        add_vector(m, &n, LAYER_NAME("input_layernorm.weight"), &lw->input_norm, C);
        add_matrix(m, &n, LAYER_NAME("self_attn.q_proj.weight"), &lw->q, qd, C);
        add_vector(m, &n, LAYER_NAME("self_attn.q_proj.bias"), &lw->q_bias, qd);
        add_matrix(m, &n, LAYER_NAME("self_attn.k_proj.weight"), &lw->k, kvd, C);
        add_vector(m, &n, LAYER_NAME("self_attn.k_proj.bias"), &lw->k_bias, kvd);
        add_matrix(m, &n, LAYER_NAME("self_attn.v_proj.weight"), &lw->v, kvd, C);
        add_vector(m, &n, LAYER_NAME("self_attn.v_proj.bias"), &lw->v_bias, kvd);
        add_matrix(m, &n, LAYER_NAME("self_attn.o_proj.weight"), &lw->o, C, qd);
        add_vector(m, &n, LAYER_NAME("post_attention_layernorm.weight"), &lw->post_attn_norm, C);
        add_matrix(m, &n, LAYER_NAME("mlp.gate_proj.weight"), &lw->gate, F, C);
        add_matrix(m, &n, LAYER_NAME("mlp.up_proj.weight"), &lw->up, F, C);
        add_matrix(m, &n, LAYER_NAME("mlp.down_proj.weight"), &lw->down, C, F);
#undef LAYER_NAME
    }
    snprintf(name, sizeof name, "%snorm.weight", pre);
    add_vector(m, &n, name, &m->final_norm, C);
    if (!m->tied) {
        add_matrix(m, &n, "lm_head.weight", &m->lm_head, V, C);
    }
    CAPRL_ASSERT(n <= cap);
    m->n_params = n;
}

static size_t vector_floats(const caprl_model *m) {
    size_t total = 0;
    for (int32_t i = 0; i < m->n_params; i++) {
        if (m->params[i].kind == PARAM_VECTOR) {
            total += (size_t)m->params[i].shape[0];
        }
    }
    return total;
}

/* Points every vector param into one f32 block. */
static caprl_status alloc_vectors(caprl_model *m, caprl_error *err) {
    size_t n = vector_floats(m);
    m->vectors = caprl_try_malloc(n * sizeof(float));
    if (!m->vectors) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "cannot allocate %zu bytes for norm weights and biases",
                             n * sizeof(float));
    }
    float *p = m->vectors;
    for (int32_t i = 0; i < m->n_params; i++) {
        if (m->params[i].kind == PARAM_VECTOR) {
            *m->params[i].vector = p;
            p += m->params[i].shape[0];
        }
    }
    return CAPRL_OK;
}

static void init_inv_freq(caprl_model *m) {
    int32_t D = m->cfg.head_dim;
    m->inv_freq = caprl_xmalloc((size_t)(D / 2) * sizeof(float));
    /* As transformers computes it: exponents in f32, base ** x in f32, reciprocal in f32. */
    for (int32_t i = 0; i < D / 2; i++) {
        float x = (float)(2 * i) / (float)D;
        m->inv_freq[i] = 1.0f / powf((float)m->cfg.rope_theta, x);
    }
}

/* Packs (or repacks in place) every weight a matmul reads: all matrices but the embedding table, which is only
 * looked up (a tied lm_head is its own weight here). */
static caprl_status prepare_matmul_weights(caprl_model *m, caprl_error *err) {
    if (!m->be->ops->weight_prepare) {
        return CAPRL_OK;
    }
    for (int32_t i = 0; i < m->n_params; i++) {
        if (m->params[i].kind == PARAM_MATRIX && m->params[i].matrix != &m->embed) {
            CAPRL_TRY(m->be->ops->weight_prepare(m->be, m->params[i].matrix, err));
        }
    }
    if (m->tied) {
        CAPRL_TRY(m->be->ops->weight_prepare(m->be, &m->lm_head, err));
    }
    return CAPRL_OK;
}

static caprl_status finish_model(caprl_model *m, int32_t n_threads, caprl_error *err) {
    if (m->tied) {
        m->lm_head = m->embed;
        m->lm_head.packed = NULL;
    }
    init_inv_freq(m);
    CAPRL_TRY(caprl_backend_cpu_init(&m->be, n_threads, err));
    return prepare_matmul_weights(m, err);
}

/* ---- loading ---------------------------------------------------------------------------------------------- */

static caprl_status check_extra_tensors(const caprl_model *m, const caprl_safetensors *st, const char *dir,
                                        caprl_error *err) {
    int64_t n = caprl_safetensors_n_tensors(st);
    for (int64_t i = 0; i < n; i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(st, i);
        bool                   known = false;
        for (int32_t p = 0; p < m->n_params && !known; p++) {
            known = strcmp(m->params[p].name, t->name) == 0;
        }
        if (!known && m->cfg.is_vl &&
            (strncmp(t->name, "visual.", 7) == 0 || strncmp(t->name, "model.visual.", 13) == 0)) {
            known = true; /* the vision tower's, loaded by caprl_vision_load */
        }
        if (!known && m->tied && strcmp(t->name, "lm_head.weight") == 0) {
            /* transformers ties lm_head to the embedding after loading, so a stored copy is ignored there too */
            LOG_WARN("%s: 'lm_head.weight' present but tie_word_embeddings is true: using the embedding", dir);
            known = true;
        }
        if (!known) {
            return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                                 "%s: tensor '%s' is not part of a Qwen2 model with this config.json", t->file,
                                 t->name);
        }
    }
    return CAPRL_OK;
}

/* Bytes needed for matrices that cannot be used in place (F16 widened, misaligned copies). */
static bool owned_bytes_needed(const caprl_model *m, const caprl_st_tensor *const *found, size_t *total) {
    *total = 0;
    for (int32_t i = 0; i < m->n_params; i++) {
        if (m->params[i].kind == PARAM_MATRIX && !caprl_add_size(*total, caprl_weight_owned_bytes(found[i]), total)) {
            return false;
        }
    }
    return true;
}

static caprl_status load_weights(caprl_model *m, const char *dir, caprl_error *err) {
    CAPRL_TRY(caprl_safetensors_open_dir(&m->st, dir, err));
    /* Qwen2.5-VL checkpoints re-saved by newer transformers keep the text stack under model.language_model. */
    if (m->cfg.is_vl && caprl_safetensors_find(m->st, "model.language_model.embed_tokens.weight")) {
        m->text_prefix = "model.language_model.";
    }
    model_build_param_table(m);
    CAPRL_TRY(check_extra_tensors(m, m->st, dir, err));
    const uint32_t          mask = (1u << CAPRL_DTYPE_F32) | (1u << CAPRL_DTYPE_BF16) | (1u << CAPRL_DTYPE_F16);
    const caprl_st_tensor **found = caprl_xcalloc((size_t)m->n_params, sizeof *found);
    caprl_status            st = CAPRL_OK;
    for (int32_t i = 0; i < m->n_params && st == CAPRL_OK; i++) {
        const param_desc *d = &m->params[i];
        if (d->kind == PARAM_MATRIX) {
            st = caprl_safetensors_expect(m->st, d->name, mask, 2, d->shape, &found[i], err);
        } else {
            st = caprl_safetensors_expect(m->st, d->name, mask, 1, d->shape, &found[i], err);
        }
        if (st != CAPRL_OK && !caprl_safetensors_find(m->st, d->name) && strcmp(d->name, "lm_head.weight") == 0) {
            caprl_err_set(err, CAPRL_ERR_FORMAT,
                          "%s: tensor 'lm_head.weight' is missing and config.json has tie_word_embeddings false", dir);
        }
    }
    if (st == CAPRL_OK) {
        st = alloc_vectors(m, err);
    }
    if (st == CAPRL_OK) {
        size_t need = 0;
        bool   fits = owned_bytes_needed(m, found, &need);
        if (fits && need) {
            m->owned = caprl_try_aligned_alloc(need);
        }
        if (!fits || (need && !m->owned)) {
            st = caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot allocate %zu bytes for converted weights", dir, need);
        }
    }
    if (st == CAPRL_OK) {
        uint8_t *cursor = m->owned;
        m->file_dtypes = caprl_xcalloc((size_t)m->n_params, sizeof(int32_t));
        for (int32_t i = 0; i < m->n_params; i++) {
            m->file_dtypes[i] = found[i]->dtype;
            if (m->params[i].kind == PARAM_MATRIX) {
                caprl_weight_from_tensor(m->params[i].matrix, found[i], &cursor);
            } else {
                caprl_vector_from_tensor(*m->params[i].vector, found[i]);
                *m->params[i].vector_dtype = found[i]->dtype;
            }
        }
        m->dtype = m->embed.dtype;
    }
    free(found);
    return st;
}

static caprl_status load_generation_config(caprl_model *m, const char *dir, caprl_error *err) {
    m->gen = caprl_generation_config_default();
    char *path = caprl_path_join(dir, "generation_config.json");
    caprl_status st = CAPRL_OK;
    if (caprl_path_exists(path)) {
        uint8_t *data = NULL;
        size_t   n = 0;
        st = caprl_file_read_all(path, MAX_CONFIG_BYTES, &data, &n, err);
        if (st == CAPRL_OK) {
            st = caprl_generation_config_parse(&m->gen, (const char *)data, n, path, err);
            free(data);
        }
    }
    if (st == CAPRL_OK && m->gen.n_eos == 0) { /* as GenerationConfig.from_model_config: config.json's list */
        memcpy(m->gen.eos_ids, m->cfg.eos_ids, sizeof m->gen.eos_ids);
        m->gen.n_eos = m->cfg.n_eos;
    }
    free(path);
    return st;
}

caprl_status caprl_model_load_tokenizer(caprl_model *model, const char *path, caprl_error *err) {
    caprl_tokenizer *tok = NULL;
    CAPRL_TRY(caprl_tokenizer_load(&tok, path, err));
    if (caprl_tokenizer_n_tokens(tok) > model->cfg.vocab_size) {
        caprl_status st = caprl_err_set(err, CAPRL_ERR_FORMAT,
                                        "%s: tokenizer has %d tokens but the model's vocab_size is %d (vocab mismatch)",
                                        path, caprl_tokenizer_n_tokens(tok), model->cfg.vocab_size);
        caprl_tokenizer_free(tok);
        return st;
    }
    caprl_tokenizer_free(model->tok);
    free(model->tokenizer_path);
    model->tok = tok;
    model->tokenizer_path = caprl_xstrdup(path);
    return CAPRL_OK;
}

caprl_status caprl_model_load(caprl_model **out, const char *dir, const caprl_model_params *params,
                              caprl_error *err) {
    caprl_model_params p = params ? *params : caprl_model_default_params();
    if (!caprl_path_is_dir(dir)) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: not a directory (expected a Hugging Face checkpoint directory)",
                             dir);
    }
    caprl_model *m = caprl_xcalloc(1, sizeof *m);
    m->load_dir = caprl_xstrdup(dir);
    char        *cfg_path = caprl_path_join(dir, "config.json");
    caprl_status st = caprl_text_config_load(&m->cfg, cfg_path, err);
    free(cfg_path);
    if (st == CAPRL_OK) {
        m->tied = m->cfg.tie_word_embeddings;
        st = load_weights(m, dir, err);
    }
    if (st == CAPRL_OK) {
        st = load_generation_config(m, dir, err);
    }
    if (st == CAPRL_OK && p.load_tokenizer) {
        char *tok_path = caprl_path_join(dir, "tokenizer.json");
        if (caprl_path_exists(tok_path)) {
            st = caprl_model_load_tokenizer(m, tok_path, err);
        }
        free(tok_path);
    }
    if (st == CAPRL_OK) {
        st = finish_model(m, p.n_threads, err);
    }
    if (st != CAPRL_OK) {
        caprl_model_free(m);
        return st;
    }
    LOG_INFO("%s: %d layers, hidden %d, %s weights, %lld parameters", dir, m->cfg.n_layers, m->cfg.hidden_size,
             caprl_dtype_name(m->dtype), (long long)caprl_model_n_params(m));
    *out = m;
    return CAPRL_OK;
}

/* ---- random initialisation -------------------------------------------------------------------------------- */

caprl_status caprl_model_init_random(caprl_model **out, const caprl_text_config *cfg, int32_t dtype, uint64_t seed,
                                     float std, const caprl_model_params *params, caprl_error *err) {
    caprl_model_params p = params ? *params : caprl_model_default_params();
    if (dtype != CAPRL_DTYPE_F32 && dtype != CAPRL_DTYPE_BF16) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "random init supports F32 and BF16, not %s",
                             caprl_dtype_name(dtype));
    }
    if (!(std > 0.0f) || !isfinite(std)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "random init: std must be positive and finite");
    }
    /* Validate through the same checks as config.json by round-tripping the struct. */
    char *json = NULL;
    CAPRL_TRY(caprl_text_config_to_json(cfg, dtype, &json, err));
    caprl_model *m = caprl_xcalloc(1, sizeof *m);
    caprl_status st = caprl_text_config_parse(&m->cfg, json, strlen(json), "random-init config", err);
    caprl_free(json);
    if (st != CAPRL_OK) {
        caprl_model_free(m);
        return st;
    }
    m->tied = m->cfg.tie_word_embeddings;
    m->dtype = dtype;
    m->gen = caprl_generation_config_default();
    memcpy(m->gen.eos_ids, m->cfg.eos_ids, sizeof m->gen.eos_ids);
    m->gen.n_eos = m->cfg.n_eos;
    model_build_param_table(m);
    size_t esize = caprl_dtype_size(dtype), total = 0;
    bool   ok = true;
    for (int32_t i = 0; i < m->n_params; i++) {
        size_t bytes = 0;
        if (m->params[i].kind == PARAM_MATRIX) {
            ok = ok && caprl_mul_size((size_t)m->params[i].shape[0] * (size_t)m->params[i].shape[1], esize, &bytes) &&
                 caprl_add_size(total, bytes, &total);
        }
    }
    if (ok) {
        m->owned = caprl_try_aligned_alloc(total);
    }
    if (!ok || !m->owned) {
        caprl_model_free(m);
        return caprl_err_set(err, CAPRL_ERR_OOM, "random init: cannot allocate %zu bytes of weights", total);
    }
    st = alloc_vectors(m, err);
    uint8_t *cursor = m->owned;
    for (int32_t i = 0; i < m->n_params && st == CAPRL_OK; i++) {
        param_desc *d = &m->params[i];
        caprl_rng   rng;
        caprl_rng_init(&rng, seed, (uint64_t)i, 0x7a11);
        if (d->kind == PARAM_MATRIX) {
            int64_t n = d->shape[0] * d->shape[1];
            caprl_fill_uniform(cursor, dtype, n, std, &rng);
            d->matrix->dtype = dtype;
            d->matrix->data = cursor;
            cursor += (size_t)n * esize;
        } else {
            bool   is_norm = strstr(d->name, "norm") != NULL;
            float *v = *d->vector;
            for (int64_t j = 0; j < d->shape[0]; j++) {
                float x = (is_norm ? 1.0f : 0.0f) + 0.1f * caprl_rng_normal(&rng);
                /* keep exactly what the stored dtype can hold, so a save/load round trip is exact */
                v[j] = dtype == CAPRL_DTYPE_BF16 ? caprl_bf16_to_f32(caprl_f32_to_bf16(x)) : x;
            }
            *d->vector_dtype = dtype;
        }
    }
    if (st == CAPRL_OK) {
        st = finish_model(m, p.n_threads, err);
    }
    if (st != CAPRL_OK) {
        caprl_model_free(m);
        return st;
    }
    *out = m;
    return CAPRL_OK;
}

/* ---- saving ----------------------------------------------------------------------------------------------- */

static caprl_status write_text_file(const char *path, const char *text, caprl_error *err) {
    caprl_atomic_file af;
    CAPRL_TRY(caprl_atomic_open(&af, path, err));
    caprl_status st = caprl_atomic_write(&af, text, strlen(text), err);
    if (st == CAPRL_OK) {
        st = caprl_atomic_commit(&af, err);
    } else {
        caprl_atomic_abort(&af);
    }
    return st;
}

/* f as json.dump writes the float the user typed: its shortest decimal, with ".0" on an integer value. */
static void short_float(char out[32], float f) {
    caprl_f32_shortest(f, out);
    if (!strpbrk(out, ".eni")) {
        strncat(out, ".0", 31 - strlen(out));
    }
}

static char *generation_config_json(const caprl_generation_config *g) {
    char eos[CAPRL_MAX_EOS * 12 + 4] = "[";
    for (int32_t i = 0; i < g->n_eos; i++) {
        size_t len = strlen(eos);
        snprintf(eos + len, sizeof eos - len, "%s%d", i ? ", " : "", g->eos_ids[i]);
    }
    strncat(eos, "]", sizeof eos - strlen(eos) - 1);
    char t[32], p[32], r[32];
    short_float(t, g->temperature);
    short_float(p, g->top_p);
    short_float(r, g->repetition_penalty);
    return caprl_xasprintf("{\n  \"do_sample\": %s,\n  \"eos_token_id\": %s,\n  \"temperature\": %s,\n"
                           "  \"top_k\": %d,\n  \"top_p\": %s,\n  \"repetition_penalty\": %s\n}\n",
                           g->do_sample ? "true" : "false", eos, t, g->top_k, p, r);
}

static caprl_status copy_file(const char *src, const char *dst, caprl_error *err) {
    uint8_t *data = NULL;
    size_t   n = 0;
    CAPRL_TRY(caprl_file_read_all(src, (size_t)1 << 30, &data, &n, err));
    caprl_atomic_file af;
    caprl_status      st = caprl_atomic_open(&af, dst, err);
    if (st == CAPRL_OK) {
        st = caprl_atomic_write(&af, data, n, err);
        st = st == CAPRL_OK ? caprl_atomic_commit(&af, err) : (caprl_atomic_abort(&af), st);
    }
    free(data);
    return st;
}

/* dir/name copied to out_dir/name when it exists there (and is not the same file): true when copied. */
static caprl_status copy_sibling(const char *dir, const char *name, const char *out_dir, bool *copied,
                                 caprl_error *err) {
    char        *src = caprl_path_join(dir, name), *dst = caprl_path_join(out_dir, name);
    caprl_status st = CAPRL_OK;
    *copied = caprl_path_exists(src);
    if (*copied && strcmp(src, dst) != 0) {
        st = copy_file(src, dst, err);
    }
    free(src);
    free(dst);
    return st;
}

/* preprocessor_config.json of a Qwen2.5-VL checkpoint, from the processor settings caprl uses. */
static char *preprocessor_config_json(const caprl_preprocess_config *pp) {
    return caprl_xasprintf("{\n  \"do_convert_rgb\": true,\n  \"do_normalize\": %s,\n  \"do_rescale\": %s,\n"
                           "  \"do_resize\": %s,\n  \"image_mean\": [%.17g, %.17g, %.17g],\n"
                           "  \"image_processor_type\": \"Qwen2VLImageProcessor\",\n"
                           "  \"image_std\": [%.17g, %.17g, %.17g],\n  \"max_pixels\": %lld,\n"
                           "  \"merge_size\": %d,\n  \"min_pixels\": %lld,\n  \"patch_size\": %d,\n"
                           "  \"processor_class\": \"Qwen2_5_VLProcessor\",\n  \"resample\": 3,\n"
                           "  \"rescale_factor\": %.17g,\n  \"temporal_patch_size\": %d\n}\n",
                           pp->do_normalize ? "true" : "false", pp->do_rescale ? "true" : "false",
                           pp->do_resize ? "true" : "false", pp->image_mean[0], pp->image_mean[1], pp->image_mean[2],
                           pp->image_std[0], pp->image_std[1], pp->image_std[2], (long long)pp->max_pixels,
                           pp->merge_size, (long long)pp->min_pixels, pp->patch_size, pp->rescale_factor,
                           pp->temporal_patch_size);
}

/* The dtype a save writes matrix i in: F16 when the checkpoint had it (in memory it is F32), else as held. */
static int32_t saved_matrix_dtype(const caprl_model *m, int32_t i) {
    const param_desc *d = &m->params[i];
    bool widened = m->file_dtypes && m->file_dtypes[i] == CAPRL_DTYPE_F16 && d->matrix->dtype == CAPRL_DTYPE_F32;
    return widened ? CAPRL_DTYPE_F16 : d->matrix->dtype;
}

/* torch_dtype of a saved config: the embedding's dtype as written. */
static int32_t saved_dtype(const caprl_model *m) {
    for (int32_t i = 0; i < m->n_params; i++) {
        if (m->params[i].kind == PARAM_MATRIX && m->params[i].matrix == &m->embed) {
            return m->stored_dtypes ? m->stored_dtypes[i] : saved_matrix_dtype(m, i);
        }
    }
    return m->dtype;
}

/* config.json for a VL checkpoint: the text config with the tower's "vision_config" added before the closing
 * brace. */
static caprl_status vl_config_json(const caprl_model *m, const caprl_vision *v, char **out, caprl_error *err) {
    char *text = NULL, *vis = NULL;
    CAPRL_TRY(caprl_text_config_to_json(&m->cfg, saved_dtype(m), &text, err));
    caprl_status st = caprl_vision_config_to_json(caprl_vision_get_config(v), &vis, err);
    if (st == CAPRL_OK) {
        char *close = strrchr(text, '}');
        CAPRL_ASSERT(close != NULL);
        *close = '\0';
        size_t n = strlen(text);
        while (n && (text[n - 1] == '\n' || text[n - 1] == ' ')) {
            text[--n] = '\0';
        }
        *out = caprl_xasprintf("%s,\n  \"vision_config\": %s\n}\n", text, vis);
    }
    caprl_free(text);
    caprl_free(vis);
    return st;
}

static caprl_status model_save(const caprl_model *m, const caprl_vision *vision, const char *dir, caprl_error *err);

/* The values of matrix i in the stored dtype dt. A trained model holds f32 masters (and maybe bf16 copies):
 * those are written back in the checkpoint's own dtype, rounded to nearest even, so a checkpoint keeps its size
 * and dtype however it was trained. *buf receives a conversion buffer (free) when one was needed. */
static caprl_status matrix_for_save(const caprl_model *m, int32_t i, int32_t dt, const void **data, void **buf,
                                    caprl_error *err) {
    const param_desc *d = &m->params[i];
    if (dt == d->matrix->dtype) {
        *data = d->matrix->data; /* as stored, or the bf16 copies mixed precision keeps in sync */
        return CAPRL_OK;
    }
    /* the f32 values: the training masters, or an F16 matrix widened at load */
    CAPRL_ASSERT(m->train_flat != NULL || (dt == CAPRL_DTYPE_F16 && d->matrix->dtype == CAPRL_DTYPE_F32));
    const float *master = m->train_flat ? m->train_flat + m->train_offset[i] : (const float *)d->matrix->data;
    if (dt == CAPRL_DTYPE_F32) {
        *data = master;
        return CAPRL_OK;
    }
    CAPRL_ASSERT(dt == CAPRL_DTYPE_BF16 || dt == CAPRL_DTYPE_F16);
    size_t    n = (size_t)d->shape[0] * (size_t)d->shape[1];
    uint16_t *h = caprl_try_malloc(n * sizeof(uint16_t));
    if (!h) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "saving '%s': cannot allocate %zu bytes to convert it to %s",
                             d->name, n * sizeof(uint16_t), dt == CAPRL_DTYPE_BF16 ? "bf16" : "f16");
    }
    if (dt == CAPRL_DTYPE_BF16) {
        caprl_f32_to_bf16_row(h, master, n);
    } else {
        caprl_f32_to_f16_row(h, master, n);
    }
    *data = h;
    *buf = h;
    return CAPRL_OK;
}

caprl_status caprl_model_save(const caprl_model *m, const char *dir, caprl_error *err) {
    return model_save(m, NULL, dir, err);
}

caprl_status caprl_vl_model_save(const caprl_model *m, const caprl_vision *vision, const char *dir,
                                 caprl_error *err) {
    if (!m->cfg.is_vl || !vision || caprl_vision_get_config(vision)->out_hidden_size != m->cfg.hidden_size) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "saving a VL checkpoint needs a Qwen2.5-VL text model and a vision tower whose "
                             "out_hidden_size equals its hidden size");
    }
    return model_save(m, vision, dir, err);
}

/* model.safetensors.index.json for the one file: vLLM and SGLang then load only the tensors it maps (a step
 * directory also holds training_state.safetensors, which they would otherwise read as weights); transformers
 * still opens model.safetensors directly. */
static caprl_status write_weight_index(const char *dir, caprl_error *err) {
    char              *path = caprl_path_join(dir, "model.safetensors");
    caprl_safetensors *st = NULL;
    caprl_status       status = caprl_safetensors_open(&st, path, err);
    free(path);
    CAPRL_TRY(status);
    size_t  total = 0;
    int64_t n = caprl_safetensors_n_tensors(st);
    char   *map = caprl_xstrdup("");
    for (int64_t i = 0; i < n; i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(st, i);
        total += t->nbytes;
        char *next = caprl_xasprintf("%s%s    \"%s\": \"model.safetensors\"", map, i ? ",\n" : "", t->name);
        free(map);
        map = next;
    }
    caprl_safetensors_free(st);
    char *json = caprl_xasprintf("{\n  \"metadata\": {\n    \"total_size\": %zu\n  },\n"
                                 "  \"weight_map\": {\n%s\n  }\n}\n",
                                 total, map);
    free(map);
    path = caprl_path_join(dir, "model.safetensors.index.json");
    status = write_text_file(path, json, err);
    free(path);
    free(json);
    return status;
}

static caprl_status model_save(const caprl_model *m, const caprl_vision *vision, const char *dir, caprl_error *err) {
    CAPRL_TRY(caprl_mkdir_p(dir, err));
    /* Vectors are held as f32; write them back in the dtype they were stored in (exact: they came from it). */
    uint16_t *half_vectors = caprl_xmalloc(vector_floats(m) * sizeof(uint16_t));
    uint16_t *hv = half_vectors;
    caprl_st_writer *w = caprl_st_writer_init();
    caprl_status     st = CAPRL_OK;
    void           **converted = caprl_xcalloc((size_t)m->n_params, sizeof(void *));
    for (int32_t i = 0; i < m->n_params && st == CAPRL_OK; i++) {
        const param_desc *d = &m->params[i];
        if (d->kind == PARAM_MATRIX) {
            const void *data = NULL;
            int32_t     dt = m->stored_dtypes ? m->stored_dtypes[i] : saved_matrix_dtype(m, i);
            st = matrix_for_save(m, i, dt, &data, &converted[i], err);
            if (st == CAPRL_OK) {
                st = caprl_st_writer_add(w, d->name, dt, 2, d->shape, data, err);
            }
            continue;
        }
        int32_t      vdt = *d->vector_dtype;
        const float *v = *d->vector;
        const void  *data = v;
        if (vdt == CAPRL_DTYPE_BF16 || vdt == CAPRL_DTYPE_F16) {
            for (int64_t j = 0; j < d->shape[0]; j++) {
                hv[j] = vdt == CAPRL_DTYPE_BF16 ? caprl_f32_to_bf16(v[j]) : caprl_f32_to_f16(v[j]);
            }
            data = hv;
            hv += d->shape[0];
        } else {
            vdt = CAPRL_DTYPE_F32;
        }
        st = caprl_st_writer_add(w, d->name, vdt, 1, d->shape, data, err);
    }
    if (st == CAPRL_OK && vision) {
        st = caprl_vision_add_to_writer(vision, w, err);
    }
    char *path = caprl_path_join(dir, "model.safetensors");
    if (st == CAPRL_OK) {
        st = caprl_st_writer_save(w, path, err);
    }
    free(path);
    if (st == CAPRL_OK) {
        st = write_weight_index(dir, err);
    }
    caprl_st_writer_free(w);
    free(half_vectors);
    for (int32_t i = 0; i < m->n_params; i++) {
        free(converted[i]);
    }
    free(converted);
    char *json = NULL;
    if (st == CAPRL_OK) {
        st = vision ? vl_config_json(m, vision, &json, err)
                    : caprl_text_config_to_json(&m->cfg, saved_dtype(m), &json, err);
    }
    /* the files caprl does not change are copied as they were (fields it does not read stay), else written */
    bool copied = false;
    if (st == CAPRL_OK && vision && m->load_dir) {
        st = copy_sibling(m->load_dir, "preprocessor_config.json", dir, &copied, err);
    }
    if (st == CAPRL_OK && vision && !copied) {
        caprl_preprocess_config pp = caprl_preprocess_config_default();
        char                   *ppj = preprocessor_config_json(&pp);
        path = caprl_path_join(dir, "preprocessor_config.json");
        st = write_text_file(path, ppj, err);
        free(path);
        free(ppj);
    }
    if (st == CAPRL_OK) {
        path = caprl_path_join(dir, "config.json");
        st = write_text_file(path, json, err);
        free(path);
        caprl_free(json);
    }
    copied = false;
    if (st == CAPRL_OK && m->load_dir) {
        st = copy_sibling(m->load_dir, "generation_config.json", dir, &copied, err);
    }
    if (st == CAPRL_OK && !copied) {
        char *gen = generation_config_json(&m->gen);
        path = caprl_path_join(dir, "generation_config.json");
        st = write_text_file(path, gen, err);
        free(path);
        free(gen);
    }
    if (st == CAPRL_OK && m->tokenizer_path) {
        path = caprl_path_join(dir, "tokenizer.json");
        if (strcmp(path, m->tokenizer_path) != 0) {
            st = copy_file(m->tokenizer_path, path, err);
        }
        free(path);
        /* the tokenizer's companions (eos / pad tokens, the chat template, the slow tokenizer's files), which
         * transformers' AutoTokenizer and AutoProcessor read */
        static const char *const side[] = {"tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                                           "vocab.json",            "merges.txt",              "chat_template.json",
                                           "chat_template.jinja"};
        char *tok_dir = caprl_path_dir(m->tokenizer_path);
        for (size_t i = 0; st == CAPRL_OK && i < sizeof side / sizeof side[0]; i++) {
            st = copy_sibling(tok_dir, side[i], dir, &copied, err);
        }
        free(tok_dir);
    }
    return st;
}

/* ---- training: binding to the flat parameter block --------------------------------------------------------- */

int64_t model_train_layout(const caprl_model *m, int64_t *offsets) {
    int64_t off = 0;
    for (int32_t i = 0; i < m->n_params; i++) {
        if (offsets) {
            offsets[i] = off;
        }
        int64_t n = m->params[i].shape[0] * m->params[i].shape[1];
        off += (n + CAPRL_TRAIN_ALIGN - 1) / CAPRL_TRAIN_ALIGN * CAPRL_TRAIN_ALIGN;
    }
    return off;
}

static void release_packed(caprl_model *m) {
    if (!m->be->ops->weight_release) {
        return;
    }
    for (int32_t i = 0; i < m->n_params; i++) {
        if (m->params[i].kind == PARAM_MATRIX) {
            m->be->ops->weight_release(m->be, m->params[i].matrix);
        }
    }
    if (m->tied) {
        m->be->ops->weight_release(m->be, &m->lm_head);
    }
}

caprl_status model_train_bind(caprl_model *m, float *flat, uint16_t *bf16, caprl_error *err) {
    if (!m->stored_dtypes) {
        m->stored_dtypes = caprl_xcalloc((size_t)m->n_params, sizeof(int32_t));
        for (int32_t i = 0; i < m->n_params; i++) {
            const param_desc *d = &m->params[i];
            m->stored_dtypes[i] = d->kind == PARAM_MATRIX ? saved_matrix_dtype(m, i) : *d->vector_dtype;
        }
        m->train_offset = caprl_xcalloc((size_t)m->n_params, sizeof(int64_t));
        model_train_layout(m, m->train_offset);
    }
    /* copy first: the values may still live in the mapping, the owned copies or a previous block (whose f32
     * masters, not its bf16 copies, are the values) */
    for (int32_t i = 0; i < m->n_params; i++) {
        const param_desc *d = &m->params[i];
        size_t            n = (size_t)d->shape[0] * (size_t)d->shape[1];
        float            *dst = flat + m->train_offset[i];
        if (m->train_flat) {
            memcpy(dst, m->train_flat + m->train_offset[i], n * sizeof(float));
        } else if (d->kind == PARAM_VECTOR) {
            memcpy(dst, *d->vector, n * sizeof(float));
        } else if (d->matrix->dtype == CAPRL_DTYPE_BF16) {
            caprl_bf16_to_f32_row(dst, d->matrix->data, n);
        } else {
            CAPRL_ASSERT(d->matrix->dtype == CAPRL_DTYPE_F32);
            memcpy(dst, d->matrix->data, n * sizeof(float));
        }
    }
    release_packed(m);
    for (int32_t i = 0; i < m->n_params; i++) {
        const param_desc *d = &m->params[i];
        int64_t           off = m->train_offset[i];
        if (d->kind == PARAM_VECTOR) {
            *d->vector = flat + off;
        } else {
            d->matrix->dtype = bf16 ? CAPRL_DTYPE_BF16 : CAPRL_DTYPE_F32;
            d->matrix->backward = true;
            d->matrix->data = bf16 ? (const void *)(bf16 + off) : (const void *)(flat + off);
        }
    }
    if (m->tied) {
        m->lm_head = m->embed;
        m->lm_head.packed = NULL;
    }
    m->train_flat = flat;
    m->train_bf16 = bf16;
    /* nothing points at the old storage any more */
    caprl_aligned_free(m->owned);
    m->owned = NULL;
    free(m->vectors);
    m->vectors = NULL;
    caprl_safetensors_free(m->st);
    m->st = NULL;
    return model_train_sync(m, err);
}

typedef struct round_task {
    const float *src;
    uint16_t    *dst;
} round_task;

enum { ROUND_BLOCK = 1 << 16 };

static void round_range(void *ctx, int64_t b0, int64_t b1, int32_t tid) {
    (void)tid;
    const round_task *t = ctx;
    for (int64_t b = b0; b < b1; b++) {
        caprl_f32_to_bf16_row(t->dst + b * ROUND_BLOCK, t->src + b * ROUND_BLOCK, ROUND_BLOCK);
    }
}

caprl_status model_train_sync(caprl_model *m, caprl_error *err) {
    if (m->train_bf16) {
        /* the whole text block at once (vectors and gaps included: cheaper than per-tensor calls) */
        int64_t    n = model_train_layout(m, NULL), full = n / ROUND_BLOCK * ROUND_BLOCK;
        round_task t = {m->train_flat, m->train_bf16};
        caprl_parallel_for(m->be->pool, full / ROUND_BLOCK, round_range, &t);
        caprl_f32_to_bf16_row(m->train_bf16 + full, m->train_flat + full, (size_t)(n - full));
    }
    return model_train_refresh_packed(m, err);
}

caprl_status model_train_refresh_packed(caprl_model *m, caprl_error *err) {
    return prepare_matmul_weights(m, err);
}

/* ---- accessors and teardown ------------------------------------------------------------------------------- */

void caprl_model_free(caprl_model *m) {
    if (!m) {
        return;
    }
    if (m->be && m->be->ops->weight_release) {
        for (int32_t i = 0; i < m->n_params; i++) {
            if (m->params[i].kind == PARAM_MATRIX) {
                m->be->ops->weight_release(m->be, m->params[i].matrix);
            }
        }
        if (m->tied) {
            m->be->ops->weight_release(m->be, &m->lm_head);
        }
    }
    caprl_backend_free(m->be);
    caprl_safetensors_free(m->st);
    caprl_aligned_free(m->owned);
    free(m->vectors);
    free(m->inv_freq);
    free(m->params);
    free(m->vector_dtypes);
    free(m->stored_dtypes);
    free(m->file_dtypes);
    free(m->train_offset);
    caprl_aligned_free(m->train_block);
    free(m->layers);
    caprl_tokenizer_free(m->tok);
    free(m->tokenizer_path);
    free(m->load_dir);
    free(m);
}

const caprl_text_config *caprl_model_config(const caprl_model *m) {
    return &m->cfg;
}

const caprl_generation_config *caprl_model_generation_config(const caprl_model *m) {
    return &m->gen;
}

const caprl_tokenizer *caprl_model_tokenizer(const caprl_model *m) {
    return m->tok;
}

int32_t caprl_model_dtype(const caprl_model *m) {
    return m->dtype;
}

int32_t caprl_model_n_threads(const caprl_model *m) {
    return caprl_pool_n_threads(m->be->pool);
}

int64_t caprl_model_n_params(const caprl_model *m) {
    int64_t n = 0;
    for (int32_t i = 0; i < m->n_params; i++) {
        n += m->params[i].shape[0] * m->params[i].shape[1];
    }
    return n;
}

int64_t caprl_model_weight_bytes(const caprl_model *m) {
    int64_t n = 0;
    for (int32_t i = 0; i < m->n_params; i++) {
        const param_desc *d = &m->params[i];
        int32_t dt = d->kind == PARAM_MATRIX ? d->matrix->dtype : CAPRL_DTYPE_F32;
        n += d->shape[0] * d->shape[1] * (int64_t)caprl_dtype_size(dt);
    }
    return n;
}
