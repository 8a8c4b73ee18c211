/* Qwen2.5-VL vision tower objects (spec/qwen.md §3.1, §3.2): vision_config parsing and checking, the parameter
 * table, loading under both tensor naming schemes, random initialisation, adding the tensors to a safetensors
 * writer, and accessors. The forward pass lives in vision_encode.c.
 *
 * Depends on core, fmt (JSON wrapper, safetensors) and the backend table; never on the text model. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/tensor.h"
#include "core/ckmath.h"
#include "core/error_impl.h"
#include "core/file_impl.h"
#include "core/log_impl.h"
#include "core/rng_impl.h"
#include "fmt/json_impl.h"
#include "model/vision_impl.h"
#include "model/weights_impl.h"

#define CONFIG_MAX_BYTES ((size_t)16 << 20)
#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

/* Bounds far beyond any real tower; they keep size arithmetic (products of two or three of them) in range. */
#define MAX_DEPTH        4096
#define MAX_HIDDEN       (1 << 16)
#define MAX_INTERMEDIATE (1 << 20)
#define MAX_HEADS        4096
#define MAX_OUT_HIDDEN   (1 << 20)
#define MAX_PATCH        1024
#define MAX_SMALL        64      /* in_channels, spatial_merge_size, temporal_patch_size */
#define MAX_WINDOW       (1 << 20)
#define MAX_PATCH_WIDTH  (1 << 24) /* in_channels * temporal * patch^2 */
#define MAX_MERGED_WIDTH (1 << 22) /* merge^2 * hidden_size */

/* Qwen2_5_VLVisionConfig defaults for the optional fields (transformers configuration_qwen2_5_vl.py). */
static const int32_t k_default_fullatt[] = {7, 15, 23, 31};

static const char *const k_vision_known[] = {
    /* used */
    "depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels", "out_hidden_size",
    "patch_size", "spatial_merge_size", "temporal_patch_size", "window_size", "fullatt_block_indexes",
    "tokens_per_second",
    /* informational: duplicates in the original release (HF reads in_channels / patch_size), and config keys
     * without effect on inference */
    "in_chans", "spatial_patch_size", "model_type", "initializer_range", "torch_dtype", "dtype",
    "transformers_version", "_name_or_path", "architectures", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_return_dict", "is_encoder_decoder", "_attn_implementation_autoset",
    "id2label", "label2id"};

/* ---- config: checks ---------------------------------------------------------------------------------------- */

/* "<file>: field 'vision_config.<field>': <message>" */
static caprl_status field_error(const char *file, const char *field, caprl_status code, caprl_error *err,
                                const char *fmt, ...) CAPRL_PRINTF(5, 6);

static caprl_status field_error(const char *file, const char *field, caprl_status code, caprl_error *err,
                                const char *fmt, ...) {
    char    msg[CAPRL_ERROR_MSG_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return caprl_err_set(err, code, "%s: field 'vision_config.%s': %s", file, field, msg);
}

static caprl_status check_range(const char *file, const char *field, int64_t v, int64_t lo, int64_t hi,
                                caprl_error *err) {
    if (v < lo || v > hi) {
        return field_error(file, field, CAPRL_ERR_FORMAT, err, "%lld is out of range [%lld, %lld]", (long long)v,
                           (long long)lo, (long long)hi);
    }
    return CAPRL_OK;
}

static caprl_status check_ranges(const caprl_vision_config *c, const char *file, caprl_error *err) {
    CAPRL_TRY(check_range(file, "depth", c->depth, 1, MAX_DEPTH, err));
    CAPRL_TRY(check_range(file, "hidden_size", c->hidden_size, 1, MAX_HIDDEN, err));
    CAPRL_TRY(check_range(file, "intermediate_size", c->intermediate_size, 1, MAX_INTERMEDIATE, err));
    CAPRL_TRY(check_range(file, "num_heads", c->num_heads, 1, MAX_HEADS, err));
    CAPRL_TRY(check_range(file, "in_channels", c->in_channels, 1, MAX_SMALL, err));
    CAPRL_TRY(check_range(file, "out_hidden_size", c->out_hidden_size, 1, MAX_OUT_HIDDEN, err));
    CAPRL_TRY(check_range(file, "patch_size", c->patch_size, 1, MAX_PATCH, err));
    CAPRL_TRY(check_range(file, "spatial_merge_size", c->spatial_merge_size, 1, MAX_SMALL, err));
    CAPRL_TRY(check_range(file, "temporal_patch_size", c->temporal_patch_size, 1, MAX_SMALL, err));
    CAPRL_TRY(check_range(file, "window_size", c->window_size, 1, MAX_WINDOW, err));
    return check_range(file, "fullatt_block_indexes", c->n_fullatt, 0, CAPRL_VISION_MAX_FULLATT, err);
}

/* The rules shared by the parser and caprl_vision_config_check. */
static caprl_status check_config(const caprl_vision_config *c, const char *file, caprl_error *err) {
    CAPRL_TRY(check_ranges(c, file, err));
    if (c->hidden_size % c->num_heads != 0) {
        return field_error(file, "num_heads", CAPRL_ERR_FORMAT, err, "%d does not divide hidden_size (%d)",
                           (int)c->num_heads, (int)c->hidden_size);
    }
    int32_t D = c->hidden_size / c->num_heads;
    if (D % 4 != 0) {
        return field_error(file, "num_heads", CAPRL_ERR_FORMAT, err,
                           "head_dim = hidden_size / num_heads = %d is not a multiple of 4 (the 2-D rotary splits "
                           "each half of a head into equal height and width parts)",
                           (int)D);
    }
    int64_t width = (int64_t)c->in_channels * c->temporal_patch_size * c->patch_size * c->patch_size;
    if (width > MAX_PATCH_WIDTH) {
        return field_error(file, "patch_size", CAPRL_ERR_FORMAT, err,
                           "in_channels * temporal_patch_size * patch_size^2 = %lld is larger than %d",
                           (long long)width, MAX_PATCH_WIDTH);
    }
    int64_t merged = (int64_t)c->spatial_merge_size * c->spatial_merge_size * c->hidden_size;
    if (merged > MAX_MERGED_WIDTH) {
        return field_error(file, "spatial_merge_size", CAPRL_ERR_FORMAT, err,
                           "spatial_merge_size^2 * hidden_size = %lld is larger than %d", (long long)merged,
                           MAX_MERGED_WIDTH);
    }
    if (c->window_size / c->spatial_merge_size / c->patch_size < 1) {
        return field_error(file, "window_size", CAPRL_ERR_FORMAT, err,
                           "%d is smaller than spatial_merge_size * patch_size = %d (a window must hold a merged "
                           "token)",
                           (int)c->window_size, (int)(c->spatial_merge_size * c->patch_size));
    }
    for (int32_t i = 0; i < c->n_fullatt; i++) {
        int32_t b = c->fullatt_block_indexes[i];
        if (b < 0 || b >= c->depth) {
            return field_error(file, "fullatt_block_indexes", CAPRL_ERR_FORMAT, err,
                               "entry %d is %d, not a block index in [0, depth = %d)", (int)i, (int)b, (int)c->depth);
        }
        for (int32_t j = 0; j < i; j++) {
            if (c->fullatt_block_indexes[j] == b) {
                return field_error(file, "fullatt_block_indexes", CAPRL_ERR_FORMAT, err, "block %d is listed twice",
                                   (int)b);
            }
        }
    }
    if (!(c->tokens_per_second >= 0.0f) || !isfinite(c->tokens_per_second)) {
        return field_error(file, "tokens_per_second", CAPRL_ERR_FORMAT, err, "%g is not a finite number >= 0",
                           (double)c->tokens_per_second);
    }
    return CAPRL_OK;
}

caprl_status caprl_vision_config_check(const caprl_vision_config *cfg, caprl_error *err) {
    return check_config(cfg, "vision config", err);
}

/* ---- config: parsing --------------------------------------------------------------------------------------- */

static caprl_status parse_fullatt(const caprl_json_obj *vc, caprl_vision_config *cfg, caprl_error *err) {
    const struct json_t *a = caprl_json_get(vc, "fullatt_block_indexes");
    if (caprl_json_is_null(a)) {
        cfg->n_fullatt = (int32_t)N_OF(k_default_fullatt);
        memcpy(cfg->fullatt_block_indexes, k_default_fullatt, sizeof k_default_fullatt);
        return CAPRL_OK;
    }
    char got[96];
    if (!caprl_json_is_array(a) || caprl_json_array_size(a) > CAPRL_VISION_MAX_FULLATT) {
        return caprl_json_field_error(vc, "fullatt_block_indexes", CAPRL_ERR_FORMAT, err,
                                      "expected an array of at most %d block indexes, got %s",
                                      CAPRL_VISION_MAX_FULLATT, caprl_json_describe(a, got, sizeof got));
    }
    cfg->n_fullatt = (int32_t)caprl_json_array_size(a);
    for (int32_t i = 0; i < cfg->n_fullatt; i++) {
        int64_t b = 0;
        if (!caprl_json_int_value(caprl_json_array_get(a, (size_t)i), &b) || b < 0 || b > MAX_DEPTH) {
            return caprl_json_field_error(vc, "fullatt_block_indexes", CAPRL_ERR_FORMAT, err,
                                          "entry %d is not a block index: %s", (int)i,
                                          caprl_json_describe(caprl_json_array_get(a, (size_t)i), got, sizeof got));
        }
        cfg->fullatt_block_indexes[i] = (int32_t)b;
    }
    return CAPRL_OK;
}

static caprl_status parse_sizes(const caprl_json_obj *vc, caprl_vision_config *cfg, caprl_error *err) {
    const struct {
        const char *key;
        int32_t     hi;
        int32_t    *out;
    } required[] = {
        {"depth", MAX_DEPTH, &cfg->depth},
        {"hidden_size", MAX_HIDDEN, &cfg->hidden_size},
        {"intermediate_size", MAX_INTERMEDIATE, &cfg->intermediate_size},
        {"num_heads", MAX_HEADS, &cfg->num_heads},
        {"out_hidden_size", MAX_OUT_HIDDEN, &cfg->out_hidden_size},
    };
    for (size_t i = 0; i < N_OF(required); i++) {
        if (!caprl_json_has(vc, required[i].key)) {
            return caprl_json_field_error(vc, required[i].key, CAPRL_ERR_FORMAT, err, "missing (required)");
        }
        CAPRL_TRY(caprl_json_get_i32(vc, required[i].key, 1, required[i].hi, required[i].out, err));
    }
    const struct {
        const char *key;
        int32_t     hi, def;
        int32_t    *out;
    } optional[] = {
        {"in_channels", MAX_SMALL, 3, &cfg->in_channels},
        {"patch_size", MAX_PATCH, 14, &cfg->patch_size},
        {"spatial_merge_size", MAX_SMALL, 2, &cfg->spatial_merge_size},
        {"temporal_patch_size", MAX_SMALL, 2, &cfg->temporal_patch_size},
        {"window_size", MAX_WINDOW, 112, &cfg->window_size},
    };
    for (size_t i = 0; i < N_OF(optional); i++) {
        CAPRL_TRY(caprl_json_opt_i32(vc, optional[i].key, 1, optional[i].hi, optional[i].def, optional[i].out, err));
    }
    return CAPRL_OK;
}

/* The original release repeats in_channels as in_chans and patch_size as spatial_patch_size; HF reads only the
 * former, so a disagreeing duplicate changes nothing but deserves a warning. */
static caprl_status check_duplicates(const caprl_json_obj *vc, const caprl_vision_config *cfg, caprl_error *err) {
    int32_t v = 0;
    CAPRL_TRY(caprl_json_opt_i32(vc, "in_chans", 1, MAX_SMALL, cfg->in_channels, &v, err));
    if (v != cfg->in_channels) {
        LOG_WARN("%s: vision_config.in_chans (%d) differs from in_channels (%d); using in_channels as transformers "
                 "does",
                 vc->file, (int)v, (int)cfg->in_channels);
    }
    CAPRL_TRY(caprl_json_opt_i32(vc, "spatial_patch_size", 1, MAX_PATCH, cfg->patch_size, &v, err));
    if (v != cfg->patch_size) {
        LOG_WARN("%s: vision_config.spatial_patch_size (%d) differs from patch_size (%d); using patch_size as "
                 "transformers does",
                 vc->file, (int)v, (int)cfg->patch_size);
    }
    return CAPRL_OK;
}

static caprl_status parse_vision_object(const caprl_json_obj *vc, caprl_vision_config *cfg, caprl_error *err) {
    if (caprl_json_has(vc, "embed_dim")) {
        return caprl_json_field_error(vc, "embed_dim", CAPRL_ERR_UNSUPPORTED, err,
                                      "present: this is a Qwen2-VL vision tower (LayerNorm, QuickGELU MLP), only "
                                      "Qwen2.5-VL towers are supported");
    }
    CAPRL_TRY(parse_sizes(vc, cfg, err));
    CAPRL_TRY(check_duplicates(vc, cfg, err));
    const char *act = NULL;
    CAPRL_TRY(caprl_json_opt_string(vc, "hidden_act", "silu", &act, err));
    if (strcmp(act, "silu") != 0) {
        return caprl_json_field_error(vc, "hidden_act", CAPRL_ERR_UNSUPPORTED, err,
                                      "'%.32s' is not supported (only \"silu\")", act);
    }
    double tps = 0;
    CAPRL_TRY(caprl_json_opt_number(vc, "tokens_per_second", 4.0, &tps, err));
    if (!(tps >= 0.0 && tps <= 1e6)) {
        return caprl_json_field_error(vc, "tokens_per_second", CAPRL_ERR_FORMAT, err, "%g is not in [0, 1e6]", tps);
    }
    cfg->tokens_per_second = (float)tps;
    CAPRL_TRY(parse_fullatt(vc, cfg, err));
    caprl_json_warn_unknown(vc, k_vision_known, N_OF(k_vision_known));
    return check_config(cfg, vc->file, err);
}

caprl_status caprl_vision_config_parse(caprl_vision_config *cfg, const char *json, size_t n, const char *name,
                                       caprl_error *err) {
    struct json_t *doc = NULL;
    CAPRL_TRY(caprl_json_parse(&doc, json, n, name, err));
    caprl_json_obj      root, vc;
    caprl_vision_config c;
    memset(&c, 0, sizeof c);
    caprl_status st = caprl_json_root(&root, doc, name, err);
    const char  *mt = NULL;
    if (st == CAPRL_OK) {
        st = caprl_json_opt_string(&root, "model_type", NULL, &mt, err);
    }
    if (st == CAPRL_OK && mt && strcmp(mt, "qwen2_5_vl") != 0) {
        st = caprl_json_field_error(&root, "model_type", CAPRL_ERR_UNSUPPORTED, err,
                                    "'%.64s' has no supported vision tower (expected \"qwen2_5_vl\")", mt);
    }
    if (st == CAPRL_OK && !caprl_json_has(&root, "vision_config")) {
        st = caprl_json_field_error(&root, "vision_config", CAPRL_ERR_FORMAT, err,
                                    "missing (not a Qwen2.5-VL checkpoint)");
    }
    if (st == CAPRL_OK) {
        st = caprl_json_get_object(&root, "vision_config", &vc, err);
    }
    if (st == CAPRL_OK) {
        st = parse_vision_object(&vc, &c, err);
    }
    caprl_json_free(doc);
    if (st == CAPRL_OK) {
        *cfg = c;
    }
    return st;
}

caprl_status caprl_vision_config_load(caprl_vision_config *cfg, const char *config_json_path, caprl_error *err) {
    uint8_t *data = NULL;
    size_t   n = 0;
    CAPRL_TRY(caprl_file_read_all(config_json_path, CONFIG_MAX_BYTES, &data, &n, err));
    caprl_status st = caprl_vision_config_parse(cfg, (const char *)data, n, config_json_path, err);
    free(data);
    return st;
}

caprl_status caprl_vision_config_to_json(const caprl_vision_config *cfg, char **out, caprl_error *err) {
    CAPRL_TRY(check_config(cfg, "vision config", err));
    char full[CAPRL_VISION_MAX_FULLATT * 8 + 4] = "";
    for (int32_t i = 0; i < cfg->n_fullatt; i++) {
        size_t len = strlen(full);
        snprintf(full + len, sizeof full - len, "%s%d", i ? ", " : "", (int)cfg->fullatt_block_indexes[i]);
    }
    /* in_chans and spatial_patch_size repeat in_channels and patch_size as the original release does, so files
     * written here read the same in every transformers version. */
    *out = caprl_xasprintf("{\n    \"model_type\": \"qwen2_5_vl\",\n    \"depth\": %d,\n    \"hidden_act\": \"silu\",\n"
                           "    \"hidden_size\": %d,\n    \"intermediate_size\": %d,\n    \"num_heads\": %d,\n"
                           "    \"in_channels\": %d,\n    \"in_chans\": %d,\n    \"out_hidden_size\": %d,\n"
                           "    \"patch_size\": %d,\n    \"spatial_patch_size\": %d,\n    \"spatial_merge_size\": %d,\n"
                           "    \"temporal_patch_size\": %d,\n    \"window_size\": %d,\n"
                           "    \"fullatt_block_indexes\": [%s],\n    \"tokens_per_second\": %.9g\n  }",
                           (int)cfg->depth, (int)cfg->hidden_size, (int)cfg->intermediate_size, (int)cfg->num_heads,
                           (int)cfg->in_channels, (int)cfg->in_channels, (int)cfg->out_hidden_size,
                           (int)cfg->patch_size, (int)cfg->patch_size, (int)cfg->spatial_merge_size,
                           (int)cfg->temporal_patch_size, (int)cfg->window_size, full,
                           (double)cfg->tokens_per_second);
    return CAPRL_OK;
}

/* ---- parameter table --------------------------------------------------------------------------------------- */

static vision_param *add_param(caprl_vision *v, const char *name, int32_t n_dims, const int64_t *shape) {
    vision_param *p = &v->params[v->n_params++];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->n_dims = n_dims;
    memcpy(p->shape, shape, (size_t)n_dims * sizeof(int64_t));
    return p;
}

static void add_matrix(caprl_vision *v, const char *name, caprl_weight *w, int64_t rows, int64_t cols) {
    const int64_t shape[2] = {rows, cols};
    add_param(v, name, 2, shape)->matrix = w;
    w->rows = rows;
    w->cols = cols;
}

static void add_vector(caprl_vision *v, const char *name, float **dst, int64_t len) {
    add_param(v, name, 1, &len)->vector = dst;
}

static void build_param_table(caprl_vision *v) {
    const caprl_vision_config *c = &v->cfg;
    int64_t C = c->hidden_size, F = c->intermediate_size, P = c->patch_size;
    int64_t U = (int64_t)c->spatial_merge_size * c->spatial_merge_size;
    int32_t cap = 1 + 13 * c->depth + 5;
    v->params = caprl_xcalloc((size_t)cap, sizeof *v->params);
    v->blocks = caprl_xcalloc((size_t)c->depth, sizeof *v->blocks);
    const int64_t pe_shape[5] = {C, c->in_channels, c->temporal_patch_size, P, P};
    add_param(v, "patch_embed.proj.weight", 5, pe_shape)->matrix = &v->patch_embed;
    v->patch_embed.rows = C;
    v->patch_embed.cols = (int64_t)c->in_channels * c->temporal_patch_size * P * P;
    char name[VISION_NAME_CAP];
    for (int32_t l = 0; l < c->depth; l++) {
        vision_block *b = &v->blocks[l];
#define BLOCK_NAME(suffix) (snprintf(name, sizeof name, "blocks.%d.%s", (int)l, suffix), name)
        add_vector(v, BLOCK_NAME("norm1.weight"), &b->norm1, C);
        add_matrix(v, BLOCK_NAME("attn.qkv.weight"), &b->qkv, 3 * C, C);
        add_vector(v, BLOCK_NAME("attn.qkv.bias"), &b->qkv_bias, 3 * C);
        add_matrix(v, BLOCK_NAME("attn.proj.weight"), &b->proj, C, C);
        add_vector(v, BLOCK_NAME("attn.proj.bias"), &b->proj_bias, C);
        add_vector(v, BLOCK_NAME("norm2.weight"), &b->norm2, C);
        add_matrix(v, BLOCK_NAME("mlp.gate_proj.weight"), &b->gate, F, C);
        add_vector(v, BLOCK_NAME("mlp.gate_proj.bias"), &b->gate_bias, F);
        add_matrix(v, BLOCK_NAME("mlp.up_proj.weight"), &b->up, F, C);
        add_vector(v, BLOCK_NAME("mlp.up_proj.bias"), &b->up_bias, F);
        add_matrix(v, BLOCK_NAME("mlp.down_proj.weight"), &b->down, C, F);
        add_vector(v, BLOCK_NAME("mlp.down_proj.bias"), &b->down_bias, C);
#undef BLOCK_NAME
    }
    add_vector(v, "merger.ln_q.weight", &v->merger_norm, C);
    add_matrix(v, "merger.mlp.0.weight", &v->merger_fc1, U * C, U * C);
    add_vector(v, "merger.mlp.0.bias", &v->merger_b1, U * C);
    add_matrix(v, "merger.mlp.2.weight", &v->merger_fc2, c->out_hidden_size, U * C);
    add_vector(v, "merger.mlp.2.bias", &v->merger_b2, c->out_hidden_size);
    CAPRL_ASSERT(v->n_params <= cap);
}

static int64_t param_numel(const vision_param *p) {
    int64_t n = 1;
    for (int32_t d = 0; d < p->n_dims; d++) {
        n *= p->shape[d];
    }
    return n;
}

/* Points every vector into one f32 block and every 16-bit stored copy into a second block. */
static caprl_status alloc_vectors(caprl_vision *v, caprl_error *err) {
    size_t n = 0;
    for (int32_t i = 0; i < v->n_params; i++) {
        n += v->params[i].matrix ? 0 : (size_t)v->params[i].shape[0];
    }
    v->vectors = caprl_try_malloc(n * sizeof(float));
    v->half_vectors = caprl_try_malloc(n * sizeof(uint16_t));
    if (!v->vectors || !v->half_vectors) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "vision: cannot allocate %zu bytes for norm weights and biases",
                             n * (sizeof(float) + sizeof(uint16_t)));
    }
    float *p = v->vectors;
    for (int32_t i = 0; i < v->n_params; i++) {
        if (!v->params[i].matrix) {
            *v->params[i].vector = p;
            p += v->params[i].shape[0];
        }
    }
    return CAPRL_OK;
}

/* Records the stored encoding of every vector (exact: the f32 copies hold values of that dtype). */
static void keep_stored_vectors(caprl_vision *v) {
    uint16_t *h = v->half_vectors;
    for (int32_t i = 0; i < v->n_params; i++) {
        vision_param *p = &v->params[i];
        if (p->matrix) {
            continue;
        }
        const float *f = *p->vector;
        if (p->dtype == CAPRL_DTYPE_BF16 || p->dtype == CAPRL_DTYPE_F16) {
            for (int64_t j = 0; j < p->shape[0]; j++) {
                h[j] = p->dtype == CAPRL_DTYPE_BF16 ? caprl_f32_to_bf16(f[j]) : caprl_f32_to_f16(f[j]);
            }
            p->stored = h;
            h += p->shape[0];
        } else {
            p->dtype = CAPRL_DTYPE_F32;
            p->stored = f;
        }
    }
}

/* Full names, flat offsets and the saved dtype of the matrices: what training (vision_train_*) and saving read. */
static void finish_param_table(caprl_vision *v) {
    if (!v->prefix[0]) {
        snprintf(v->prefix, sizeof v->prefix, "visual.");
    }
    int64_t off = 0;
    for (int32_t i = 0; i < v->n_params; i++) {
        vision_param *p = &v->params[i];
        snprintf(p->full_name, sizeof p->full_name, "%s%s", v->prefix, p->name);
        p->offset = off;
        off += param_numel(p);
        if (p->matrix) {
            p->dtype = p->matrix->dtype;
        }
    }
}

static caprl_status finish_vision(caprl_vision *v, int32_t n_threads, caprl_error *err) {
    const caprl_vision_config *c = &v->cfg;
    finish_param_table(v);
    v->head_dim = c->hidden_size / c->num_heads;
    v->fullatt = caprl_xcalloc((size_t)c->depth, sizeof *v->fullatt);
    for (int32_t i = 0; i < c->n_fullatt; i++) {
        v->fullatt[c->fullatt_block_indexes[i]] = true;
    }
    /* VisionRotaryEmbedding(dim = D/2) as transformers computes it in f32: exponent (2i)/dim, theta ** exponent,
     * reciprocal; i < D/4. Repeated for the w section, since the sectioned rotary indexes frequencies globally. */
    int64_t quarter = v->head_dim / 4;
    v->rope_freq = caprl_xmalloc((size_t)(2 * quarter) * sizeof(float));
    for (int64_t i = 0; i < quarter; i++) {
        float x = (float)(2 * i) / (float)(2 * quarter);
        v->rope_freq[i] = 1.0f / powf(VISION_ROPE_THETA, x);
        v->rope_freq[quarter + i] = v->rope_freq[i];
    }
    keep_stored_vectors(v);
    CAPRL_TRY(caprl_backend_cpu_init(&v->be, n_threads, err));
    if (v->be->ops->weight_prepare) {
        for (int32_t i = 0; i < v->n_params; i++) {
            if (v->params[i].matrix) {
                CAPRL_TRY(v->be->ops->weight_prepare(v->be, v->params[i].matrix, err));
            }
        }
    }
    return CAPRL_OK;
}

/* ---- loading ----------------------------------------------------------------------------------------------- */

static bool has_prefix(const char *s, const char *prefix) {
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* Picks "visual." or "model.visual." from the tensors present; a checkpoint must use one scheme. */
static caprl_status pick_prefix(const caprl_safetensors *st, const char *dir, const char **prefix, caprl_error *err) {
    int64_t n_old = 0, n_new = 0;
    for (int64_t i = 0; i < caprl_safetensors_n_tensors(st); i++) {
        const char *name = caprl_safetensors_tensor(st, i)->name;
        n_old += has_prefix(name, "visual.");
        n_new += has_prefix(name, "model.visual.");
    }
    if (n_old && n_new) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT,
                             "%s: vision tensors under both 'visual.' (%lld) and 'model.visual.' (%lld): a checkpoint "
                             "must use one naming scheme",
                             dir, (long long)n_old, (long long)n_new);
    }
    if (!n_old && !n_new) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT,
                             "%s: no vision tensors (neither 'visual.*' nor 'model.visual.*'): not a Qwen2.5-VL "
                             "checkpoint",
                             dir);
    }
    *prefix = n_old ? "visual." : "model.visual.";
    return CAPRL_OK;
}

static caprl_status check_extra_tensors(const caprl_vision *v, const char *prefix, caprl_error *err) {
    size_t plen = strlen(prefix);
    for (int64_t i = 0; i < caprl_safetensors_n_tensors(v->st); i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(v->st, i);
        if (!has_prefix(t->name, prefix)) {
            continue;
        }
        bool known = false;
        for (int32_t p = 0; p < v->n_params && !known; p++) {
            known = strcmp(v->params[p].name, t->name + plen) == 0;
        }
        if (!known) {
            return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                                 "%s: tensor '%s' is not part of a Qwen2.5-VL vision tower with this vision_config",
                                 t->file, t->name);
        }
    }
    return CAPRL_OK;
}

/* Bytes for matrices that cannot be used in place (F16 widened, misaligned copies). */
static caprl_status owned_bytes(const caprl_vision *v, const caprl_st_tensor *const *found, size_t *out,
                                caprl_error *err) {
    size_t total = 0;
    for (int32_t i = 0; i < v->n_params; i++) {
        if (v->params[i].matrix && !caprl_add_size(total, caprl_weight_owned_bytes(found[i]), &total)) {
            return caprl_err_set(err, CAPRL_ERR_OOM, "vision: converted weights overflow size_t");
        }
    }
    *out = total;
    return CAPRL_OK;
}

static caprl_status find_tensors(caprl_vision *v, const char *prefix, const caprl_st_tensor **found,
                                 caprl_error *err) {
    const uint32_t mask = (1u << CAPRL_DTYPE_F32) | (1u << CAPRL_DTYPE_BF16) | (1u << CAPRL_DTYPE_F16);
    char           full[VISION_NAME_CAP + 16];
    for (int32_t i = 0; i < v->n_params; i++) {
        const vision_param *p = &v->params[i];
        snprintf(full, sizeof full, "%s%s", prefix, p->name);
        CAPRL_TRY(caprl_safetensors_expect(v->st, full, mask, p->n_dims, p->shape, &found[i], err));
    }
    return CAPRL_OK;
}

static caprl_status load_weights(caprl_vision *v, const char *dir, caprl_error *err) {
    CAPRL_TRY(caprl_safetensors_open_dir(&v->st, dir, err));
    const char *prefix = NULL;
    CAPRL_TRY(pick_prefix(v->st, dir, &prefix, err));
    snprintf(v->prefix, sizeof v->prefix, "%s", prefix);
    CAPRL_TRY(check_extra_tensors(v, prefix, err));
    const caprl_st_tensor **found = caprl_xcalloc((size_t)v->n_params, sizeof *found);
    size_t                  need = 0;
    caprl_status            st = find_tensors(v, prefix, found, err);
    if (st == CAPRL_OK) {
        st = owned_bytes(v, found, &need, err);
    }
    if (st == CAPRL_OK) {
        st = alloc_vectors(v, err);
    }
    if (st == CAPRL_OK && need) {
        v->owned = caprl_try_aligned_alloc(need);
        if (!v->owned) {
            st = caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot allocate %zu bytes for converted vision weights", dir,
                               need);
        }
    }
    if (st == CAPRL_OK) {
        uint8_t *cursor = v->owned;
        for (int32_t i = 0; i < v->n_params; i++) {
            if (v->params[i].matrix) {
                caprl_weight_from_tensor(v->params[i].matrix, found[i], &cursor);
            } else {
                caprl_vector_from_tensor(*v->params[i].vector, found[i]);
                v->params[i].dtype = found[i]->dtype;
            }
        }
        v->dtype = v->patch_embed.dtype;
    }
    free(found);
    return st;
}

caprl_status caprl_vision_load(caprl_vision **out, const char *dir, int32_t n_threads, caprl_error *err) {
    if (!caprl_path_is_dir(dir)) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: not a directory (expected a Hugging Face checkpoint directory)",
                             dir);
    }
    caprl_vision *v = caprl_xcalloc(1, sizeof *v);
    char         *cfg_path = caprl_path_join(dir, "config.json");
    caprl_status  st = caprl_vision_config_load(&v->cfg, cfg_path, err);
    free(cfg_path);
    if (st == CAPRL_OK) {
        build_param_table(v);
        st = load_weights(v, dir, err);
    }
    if (st == CAPRL_OK) {
        st = finish_vision(v, n_threads, err);
    }
    if (st != CAPRL_OK) {
        caprl_vision_free(v);
        return st;
    }
    LOG_INFO("%s: vision tower, %d blocks, hidden %d, %s weights, %lld parameters", dir, (int)v->cfg.depth,
             (int)v->cfg.hidden_size, caprl_dtype_name(v->dtype), (long long)caprl_vision_n_params(v));
    *out = v;
    return CAPRL_OK;
}

/* ---- random initialisation --------------------------------------------------------------------------------- */

static caprl_status alloc_random_matrices(caprl_vision *v, size_t esize, caprl_error *err) {
    size_t total = 0;
    bool   ok = true;
    for (int32_t i = 0; i < v->n_params && ok; i++) {
        size_t bytes = 0;
        if (v->params[i].matrix) {
            ok = caprl_mul_size((size_t)param_numel(&v->params[i]), esize, &bytes) &&
                 caprl_align_size(bytes, 64, &bytes) && caprl_add_size(total, bytes, &total);
        }
    }
    v->owned = ok ? caprl_try_aligned_alloc(total) : NULL;
    if (!v->owned) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "vision random init: cannot allocate %zu bytes of weights", total);
    }
    return CAPRL_OK;
}

static void fill_random(caprl_vision *v, int32_t dtype, uint64_t seed, float std) {
    size_t   esize = caprl_dtype_size(dtype);
    uint8_t *cursor = v->owned;
    for (int32_t i = 0; i < v->n_params; i++) {
        vision_param *p = &v->params[i];
        caprl_rng     rng;
        caprl_rng_init(&rng, seed, (uint64_t)i, 0x715a);
        if (p->matrix) {
            int64_t n = param_numel(p);
            caprl_fill_uniform(cursor, dtype, n, std, &rng);
            p->matrix->dtype = dtype;
            p->matrix->data = cursor;
            cursor += ((size_t)n * esize + 63) & ~(size_t)63;
            continue;
        }
        bool   is_norm = strstr(p->name, "norm") != NULL || strstr(p->name, "ln_q") != NULL;
        float *dst = *p->vector;
        for (int64_t j = 0; j < p->shape[0]; j++) {
            float x = (is_norm ? 1.0f : 0.0f) + 0.1f * caprl_rng_normal(&rng);
            /* exactly what the stored dtype holds, so a save / load round trip is exact */
            dst[j] = dtype == CAPRL_DTYPE_BF16 ? caprl_bf16_to_f32(caprl_f32_to_bf16(x)) : x;
        }
        p->dtype = dtype;
    }
}

caprl_status caprl_vision_init_random(caprl_vision **out, const caprl_vision_config *cfg, int32_t dtype,
                                      uint64_t seed, float std, int32_t n_threads, caprl_error *err) {
    if (dtype != CAPRL_DTYPE_F32 && dtype != CAPRL_DTYPE_BF16) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vision random init supports F32 and BF16, not %s",
                             caprl_dtype_name(dtype));
    }
    if (!(std > 0.0f) || !isfinite(std)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vision random init: std must be positive and finite");
    }
    CAPRL_TRY(check_config(cfg, "vision config", err));
    caprl_vision *v = caprl_xcalloc(1, sizeof *v);
    v->cfg = *cfg;
    v->dtype = dtype;
    build_param_table(v);
    caprl_status st = alloc_random_matrices(v, caprl_dtype_size(dtype), err);
    if (st == CAPRL_OK) {
        st = alloc_vectors(v, err);
    }
    if (st == CAPRL_OK) {
        fill_random(v, dtype, seed, std);
        st = finish_vision(v, n_threads, err);
    }
    if (st != CAPRL_OK) {
        caprl_vision_free(v);
        return st;
    }
    *out = v;
    return CAPRL_OK;
}

/* ---- saving, accessors, teardown --------------------------------------------------------------------------- */

/* After vision_train_bind: the live values are the trainer's f32 masters. A tensor stored as F32 is referenced
 * there; BF16 is referenced in the bf16 shadow when there is one (it mirrors the masters after every sync) and
 * converted otherwise; F16 is converted. Conversions go to v->save_half, sized by the bind for exactly these
 * tensors, so the referenced data stays valid until the writer saves. */
static caprl_status add_bound_to_writer(const caprl_vision *v, caprl_st_writer *w, caprl_error *err) {
    char      name[VISION_NAME_CAP + 16];
    uint16_t *h = v->save_half;
    for (int32_t i = 0; i < v->n_params; i++) {
        const vision_param *p = &v->params[i];
        const float        *src = v->train_flat + p->offset;
        int64_t             n = param_numel(p);
        const void         *data = src;
        if (p->dtype == CAPRL_DTYPE_BF16 && v->train_shadow) {
            data = v->train_shadow + p->offset;
        } else if (p->dtype == CAPRL_DTYPE_BF16) {
            caprl_f32_to_bf16_row(h, src, (size_t)n);
            data = h;
            h += n;
        } else if (p->dtype == CAPRL_DTYPE_F16) {
            caprl_f32_to_f16_row(h, src, (size_t)n);
            data = h;
            h += n;
        }
        snprintf(name, sizeof name, "%s%s", v->prefix, p->name); /* the naming scheme it was loaded with */
        CAPRL_TRY(caprl_st_writer_add(w, name, p->dtype, p->n_dims, p->shape, data, err));
    }
    return CAPRL_OK;
}

caprl_status caprl_vision_add_to_writer(const caprl_vision *v, caprl_st_writer *w, caprl_error *err) {
    if (v->train_flat) {
        return add_bound_to_writer(v, w, err);
    }
    char name[VISION_NAME_CAP + 16];
    for (int32_t i = 0; i < v->n_params; i++) {
        const vision_param *p = &v->params[i];
        snprintf(name, sizeof name, "%s%s", v->prefix, p->name); /* the naming scheme it was loaded with */
        if (p->matrix) {
            CAPRL_TRY(caprl_st_writer_add(w, name, p->matrix->dtype, p->n_dims, p->shape, p->matrix->data, err));
        } else {
            CAPRL_TRY(caprl_st_writer_add(w, name, p->dtype, 1, p->shape, p->stored, err));
        }
    }
    return CAPRL_OK;
}

void caprl_vision_free(caprl_vision *v) {
    if (!v) {
        return;
    }
    if (v->be && v->be->ops->weight_release) {
        for (int32_t i = 0; i < v->n_params; i++) {
            if (v->params[i].matrix) {
                v->be->ops->weight_release(v->be, v->params[i].matrix);
            }
        }
    }
    caprl_backend_free(v->be);
    caprl_safetensors_free(v->st);
    caprl_aligned_free(v->owned);
    free(v->vectors);
    free(v->half_vectors);
    free(v->save_half);
    free(v->rope_freq);
    free(v->fullatt);
    free(v->params);
    free(v->blocks);
    free(v);
}

const caprl_vision_config *caprl_vision_get_config(const caprl_vision *v) {
    return &v->cfg;
}

int32_t caprl_vision_dtype(const caprl_vision *v) {
    return v->dtype;
}

int64_t caprl_vision_n_params(const caprl_vision *v) {
    int64_t n = 0;
    for (int32_t i = 0; i < v->n_params; i++) {
        n += param_numel(&v->params[i]);
    }
    return n;
}
