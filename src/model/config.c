/* config.json and generation_config.json of Qwen2 / Qwen2.5 and Qwen2.5-VL checkpoints (spec/qwen.md §2.1, §3.1,
 * §5.9): parsing with validation (every error names the file and the field), and writing an HF-style
 * Qwen2ForCausalLM config.json that parses back to the same values.
 *
 * Unknown keys are never silently ignored: keys we use or know to be informational are listed below; any other
 * key is logged as a warning. Depends on core and fmt/json (never on jansson directly). */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/model.h"
#include "caprl/tensor.h"
#include "core/error_impl.h"
#include "core/log_impl.h"
#include "fmt/json_impl.h"

#define CONFIG_MAX_BYTES ((size_t)16 << 20)

/* Upper bounds far beyond any real checkpoint; they keep later size arithmetic far from overflow. */
#define MAX_VOCAB        (1 << 24)
#define MAX_HIDDEN       (1 << 20)
#define MAX_INTERMEDIATE (1 << 22)
#define MAX_LAYERS       4096
#define MAX_HEADS        4096
#define MAX_HEAD_DIM     (1 << 14)
#define MAX_POSITIONS    (1 << 30)

/* Defaults for optional fields: transformers' Qwen2Config (configuration_qwen2.py) and, where they differ,
 * Qwen2_5_VLTextConfig (configuration_qwen2_5_vl.py). */
#define DEFAULT_MAX_POSITIONS    32768
#define DEFAULT_RMS_EPS          1e-6
#define DEFAULT_ROPE_THETA       10000.0
#define DEFAULT_VL_RMS_EPS       1e-5
#define DEFAULT_VL_ROPE_THETA    1000000.0
#define DEFAULT_MAX_WINDOW_LAYERS 28

#define WRITTEN_TRANSFORMERS_VERSION "4.49.0"

typedef enum { ARCH_QWEN2 = 0, ARCH_QWEN2_5_VL = 1 } arch_kind;

/* Keys read by the parser, plus informational keys of published Qwen2 / Qwen2.5-VL configs. */
static const char *const k_config_known[] = {
    /* used */
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_parameters", "rope_scaling", "hidden_act", "use_sliding_window", "layer_types",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "torch_dtype", "dtype", "text_config",
    /* informational (no effect on inference, or inert while use_sliding_window is false) */
    "transformers_version", "initializer_range", "max_window_layers", "sliding_window", "attention_dropout",
    "use_cache", "_name_or_path", "pad_token_id", "output_attentions", "output_hidden_states", "return_dict",
    "is_encoder_decoder", "id2label", "label2id", "tokenizer_class", "use_return_dict", "torchscript",
    "_attn_implementation_autoset", "pretraining_tp",
    /* Qwen2.5-VL: the vision tower and special tokens, read by the VL loader */
    "vision_config", "vision_start_token_id", "vision_end_token_id", "vision_token_id", "image_token_id",
    "video_token_id"};

static const char *const k_rope_known[] = {"rope_type", "type", "rope_theta", "mrope_section"};

static const char *const k_generation_known[] = {
    "eos_token_id", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens",
    "bos_token_id", "pad_token_id", "transformers_version", "_from_model_config", "max_length", "use_cache"};

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

/* ---- architecture ---------------------------------------------------------------------------------------- */

static bool array_has_string(const struct json_t *arr, const char *s) {
    for (size_t i = 0; i < caprl_json_array_size(arr); i++) {
        const char *v = caprl_json_string_value(caprl_json_array_get(arr, i));
        if (v && strcmp(v, s) == 0) {
            return true;
        }
    }
    return false;
}

static caprl_status detect_arch(const caprl_json_obj *root, arch_kind *kind, caprl_error *err) {
    const char *mt = NULL;
    CAPRL_TRY(caprl_json_opt_string(root, "model_type", NULL, &mt, err));
    const struct json_t *archs = caprl_json_get(root, "architectures");
    bool                 has_archs = !caprl_json_is_null(archs);
    if (has_archs) {
        bool ok = caprl_json_is_array(archs);
        for (size_t i = 0; ok && i < caprl_json_array_size(archs); i++) {
            ok = caprl_json_string_value(caprl_json_array_get(archs, i)) != NULL;
        }
        if (!ok) {
            char got[96];
            return caprl_json_field_error(root, "architectures", CAPRL_ERR_FORMAT, err,
                                          "expected an array of strings, got %s",
                                          caprl_json_describe(archs, got, sizeof got));
        }
    }
    bool text = array_has_string(archs, "Qwen2ForCausalLM");
    bool vl = array_has_string(archs, "Qwen2_5_VLForConditionalGeneration");
    if (mt && strcmp(mt, "qwen2") == 0) {
        *kind = ARCH_QWEN2;
    } else if (mt && strcmp(mt, "qwen2_5_vl") == 0) {
        *kind = ARCH_QWEN2_5_VL;
    } else if (mt) {
        return caprl_json_field_error(root, "model_type", CAPRL_ERR_UNSUPPORTED, err,
                                      "'%.64s' is not supported (expected \"qwen2\" or \"qwen2_5_vl\")", mt);
    } else if (text || vl) {
        *kind = text ? ARCH_QWEN2 : ARCH_QWEN2_5_VL;
    } else if (!has_archs) {
        return caprl_json_field_error(root, "model_type", CAPRL_ERR_FORMAT, err,
                                      "missing (and no architectures to tell the model)");
    }
    const char *want = *kind == ARCH_QWEN2 ? "Qwen2ForCausalLM" : "Qwen2_5_VLForConditionalGeneration";
    if (has_archs && !array_has_string(archs, want)) {
        char got[96];
        return caprl_json_field_error(root, "architectures", CAPRL_ERR_UNSUPPORTED, err,
                                      "%s is not supported (expected %s)",
                                      caprl_json_describe(archs, got, sizeof got), want);
    }
    return CAPRL_OK;
}

/* ---- text fields ----------------------------------------------------------------------------------------- */

/* Where a text field lives: the text object, or (VL configs with text_config) the top level when the text
 * object lacks it, since saves of different transformers versions put e.g. tie_word_embeddings at either. */
typedef struct text_src {
    const caprl_json_obj *text;
    const caprl_json_obj *root; /* NULL when the text fields are the top level */
} text_src;

static const caprl_json_obj *pick(const text_src *s, const char *key) {
    if (s->root && !caprl_json_has(s->text, key) && caprl_json_has(s->root, key)) {
        return s->root;
    }
    return s->text;
}

static caprl_status parse_dtype_name(const caprl_json_obj *o, const char *key, int32_t *out, caprl_error *err) {
    static const struct {
        const char *name;
        int32_t     dtype;
    } names[] = {{"float32", CAPRL_DTYPE_F32}, {"bfloat16", CAPRL_DTYPE_BF16}, {"float16", CAPRL_DTYPE_F16},
                 {"float64", CAPRL_DTYPE_F64}, {"torch.float32", CAPRL_DTYPE_F32},
                 {"torch.bfloat16", CAPRL_DTYPE_BF16}, {"torch.float16", CAPRL_DTYPE_F16}};
    const char *s = NULL;
    CAPRL_TRY(caprl_json_get_string(o, key, &s, err));
    for (size_t i = 0; i < N_OF(names); i++) {
        if (strcmp(names[i].name, s) == 0) {
            *out = names[i].dtype;
            return CAPRL_OK;
        }
    }
    if (strcmp(s, "auto") == 0) {
        *out = -1;
        return CAPRL_OK;
    }
    return caprl_json_field_error(o, key, CAPRL_ERR_UNSUPPORTED, err,
                                  "'%.32s' is not supported (float32, bfloat16, float16 or float64)", s);
}

/* An id that may be an integer, a list (the first entry counts) or null. */
static caprl_status parse_token_id(const caprl_json_obj *o, const char *key, int32_t *out, caprl_error *err) {
    const struct json_t *v = caprl_json_get(o, key);
    *out = -1;
    if (caprl_json_is_null(v)) {
        return CAPRL_OK;
    }
    if (caprl_json_is_array(v)) {
        v = caprl_json_array_get(v, 0); /* NULL for [] */
        if (!v) {
            return CAPRL_OK;
        }
    }
    int64_t id = 0;
    if (!caprl_json_int_value(v, &id) || id < 0 || id > INT32_MAX) {
        char got[96];
        return caprl_json_field_error(o, key, CAPRL_ERR_FORMAT, err, "expected a token id or a list of them, got %s",
                                      caprl_json_describe(caprl_json_get(o, key), got, sizeof got));
    }
    *out = (int32_t)id;
    return CAPRL_OK;
}

/* eos_token_id as an id or a list of ids (config.json and generation_config.json); null or absent: none. */
static caprl_status parse_eos_list(const caprl_json_obj *o, int32_t *ids, int32_t *n_ids, caprl_error *err) {
    *n_ids = 0;
    const struct json_t *v = caprl_json_get(o, "eos_token_id");
    if (caprl_json_is_null(v)) {
        return CAPRL_OK;
    }
    size_t n = caprl_json_is_array(v) ? caprl_json_array_size(v) : 1;
    if (n > CAPRL_MAX_EOS) {
        return caprl_json_field_error(o, "eos_token_id", CAPRL_ERR_UNSUPPORTED, err,
                                      "%zu ids, more than the %d supported", n, CAPRL_MAX_EOS);
    }
    for (size_t i = 0; i < n; i++) {
        const struct json_t *e = caprl_json_is_array(v) ? caprl_json_array_get(v, i) : v;
        int64_t              id = 0;
        if (!caprl_json_int_value(e, &id) || id < 0 || id > INT32_MAX) {
            char got[96];
            return caprl_json_field_error(o, "eos_token_id", CAPRL_ERR_FORMAT, err,
                                          "expected a token id or a list of them, got %s",
                                          caprl_json_describe(v, got, sizeof got));
        }
        ids[i] = (int32_t)id;
    }
    *n_ids = (int32_t)n;
    return CAPRL_OK;
}

static caprl_status parse_rope(const text_src *s, arch_kind kind, caprl_text_config *cfg, caprl_error *err) {
    const caprl_json_obj *o = pick(s, "rope_theta");
    double                theta_top = 0;
    bool                  has_top = caprl_json_has(o, "rope_theta");
    if (has_top) {
        CAPRL_TRY(caprl_json_get_number(o, "rope_theta", &theta_top, err));
    }
    caprl_json_obj rp;
    bool           has_rp = false;
    double         theta_rp = 0;
    bool           has_rp_theta = false;
    CAPRL_TRY(caprl_json_opt_object(pick(s, "rope_parameters"), "rope_parameters", &rp, &has_rp, err));
    if (has_rp) {
        const char *type = NULL;
        CAPRL_TRY(caprl_json_opt_string(&rp, "rope_type", NULL, &type, err));
        if (!type) {
            CAPRL_TRY(caprl_json_opt_string(&rp, "type", "default", &type, err));
        }
        bool ok = strcmp(type, "default") == 0 || (kind == ARCH_QWEN2_5_VL && strcmp(type, "mrope") == 0);
        if (!ok) {
            return caprl_json_field_error(&rp, "rope_type", CAPRL_ERR_UNSUPPORTED, err,
                                          "'%.32s' is not supported (only the default RoPE%s)", type,
                                          kind == ARCH_QWEN2_5_VL ? " and mrope" : "");
        }
        has_rp_theta = caprl_json_has(&rp, "rope_theta");
        if (has_rp_theta) {
            CAPRL_TRY(caprl_json_get_number(&rp, "rope_theta", &theta_rp, err));
        }
        if (has_rp_theta && has_top && theta_rp != theta_top) {
            return caprl_json_field_error(&rp, "rope_theta", CAPRL_ERR_FORMAT, err, "%g disagrees with rope_theta %g",
                                          theta_rp, theta_top);
        }
        caprl_json_warn_unknown(&rp, k_rope_known, N_OF(k_rope_known));
    }
    cfg->rope_theta = has_rp_theta ? theta_rp
                      : has_top    ? theta_top
                                   : (kind == ARCH_QWEN2_5_VL ? DEFAULT_VL_ROPE_THETA : DEFAULT_ROPE_THETA);
    if (!(cfg->rope_theta > 0.0)) {
        return caprl_json_field_error(has_rp_theta ? &rp : o, "rope_theta", CAPRL_ERR_FORMAT, err,
                                      "%g is not a positive number", cfg->rope_theta);
    }

    const caprl_json_obj *so = pick(s, "rope_scaling");
    const struct json_t  *sc = caprl_json_get(so, "rope_scaling");
    if (caprl_json_is_null(sc)) {
        return CAPRL_OK;
    }
    char got[128];
    if (caprl_json_is_object(sc)) {
        caprl_json_obj sco;
        CAPRL_TRY(caprl_json_get_object(so, "rope_scaling", &sco, err));
        const char *type = NULL;
        CAPRL_TRY(caprl_json_opt_string(&sco, "type", NULL, &type, err));
        if (!type) {
            CAPRL_TRY(caprl_json_opt_string(&sco, "rope_type", "default", &type, err));
        }
        /* "default" is plain RoPE; HF maps "type": "mrope" to it too, mrope_section being the only extra
         * information */
        if (strcmp(type, "default") == 0 || (kind == ARCH_QWEN2_5_VL && strcmp(type, "mrope") == 0)) {
            return CAPRL_OK;
        }
    }
    return caprl_json_field_error(so, "rope_scaling", CAPRL_ERR_UNSUPPORTED, err,
                                  "%s is not supported (only null%s)", caprl_json_describe(sc, got, sizeof got),
                                  kind == ARCH_QWEN2_5_VL ? " or mrope" : ", the default RoPE");
}

static caprl_status parse_attention_kind(const text_src *s, int32_t n_layers, caprl_error *err) {
    const caprl_json_obj *o = pick(s, "use_sliding_window");
    bool                  sliding = false;
    CAPRL_TRY(caprl_json_opt_bool(o, "use_sliding_window", false, &sliding, err));
    if (sliding) {
        /* transformers slides layer i only when sliding_window is set and i >= max_window_layers */
        const caprl_json_obj *mo = pick(s, "max_window_layers"), *wo = pick(s, "sliding_window");
        int32_t               first_sliding = 0;
        CAPRL_TRY(caprl_json_opt_i32(mo, "max_window_layers", 0, INT32_MAX, DEFAULT_MAX_WINDOW_LAYERS, &first_sliding,
                                     err));
        const struct json_t *sw = caprl_json_get(wo, "sliding_window"); /* absent: transformers' default 4096 */
        bool                 window = !(sw != NULL && caprl_json_is_null(sw));
        if (window && first_sliding < n_layers) {
            return caprl_json_field_error(o, "use_sliding_window", CAPRL_ERR_UNSUPPORTED, err,
                                          "sliding-window attention (layers %d to %d) is not supported",
                                          (int)first_sliding, (int)n_layers - 1);
        }
    }
    o = pick(s, "layer_types");
    const struct json_t *lt = caprl_json_get(o, "layer_types");
    if (caprl_json_is_null(lt)) {
        return CAPRL_OK;
    }
    if (!caprl_json_is_array(lt) || caprl_json_array_size(lt) != (size_t)n_layers) {
        return caprl_json_field_error(o, "layer_types", CAPRL_ERR_FORMAT, err,
                                      "expected an array of num_hidden_layers (%d) strings", (int)n_layers);
    }
    for (size_t i = 0; i < caprl_json_array_size(lt); i++) {
        const char *t = caprl_json_string_value(caprl_json_array_get(lt, i));
        if (!t || strcmp(t, "full_attention") != 0) {
            return caprl_json_field_error(o, "layer_types", CAPRL_ERR_UNSUPPORTED, err,
                                          "entry %zu is not \"full_attention\" (only full attention is supported)", i);
        }
    }
    return CAPRL_OK;
}

/* ---- consistency (shared by parse and to_json) ------------------------------------------------------------ */

typedef struct field_ctx {
    const char  *file;
    const char  *prefix; /* "" or "text_config" */
    caprl_status code;
} field_ctx;

static caprl_status ctx_error(const field_ctx *c, const char *field, caprl_error *err, const char *fmt, ...)
    CAPRL_PRINTF(4, 5);

static caprl_status ctx_error(const field_ctx *c, const char *field, caprl_error *err, const char *fmt, ...) {
    char    msg[CAPRL_ERROR_MSG_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return caprl_err_set(err, c->code, "%s: field '%s%s%s': %s", c->file, c->prefix, c->prefix[0] ? "." : "", field,
                         msg);
}

static caprl_status check_range(const field_ctx *c, const char *field, int64_t v, int64_t lo, int64_t hi,
                                caprl_error *err) {
    if (v < lo || v > hi) {
        return ctx_error(c, field, err, "%lld is out of range [%lld, %lld]", (long long)v, (long long)lo,
                         (long long)hi);
    }
    return CAPRL_OK;
}

static caprl_status check_config(const caprl_text_config *cfg, const field_ctx *c, caprl_error *err) {
    CAPRL_TRY(check_range(c, "vocab_size", cfg->vocab_size, 1, MAX_VOCAB, err));
    CAPRL_TRY(check_range(c, "hidden_size", cfg->hidden_size, 1, MAX_HIDDEN, err));
    CAPRL_TRY(check_range(c, "intermediate_size", cfg->intermediate_size, 1, MAX_INTERMEDIATE, err));
    CAPRL_TRY(check_range(c, "num_hidden_layers", cfg->n_layers, 1, MAX_LAYERS, err));
    CAPRL_TRY(check_range(c, "num_attention_heads", cfg->n_heads, 1, MAX_HEADS, err));
    CAPRL_TRY(check_range(c, "num_key_value_heads", cfg->n_kv_heads, 1, MAX_HEADS, err));
    CAPRL_TRY(check_range(c, "head_dim", cfg->head_dim, 2, MAX_HEAD_DIM, err));
    CAPRL_TRY(check_range(c, "max_position_embeddings", cfg->max_position_embeddings, 1, MAX_POSITIONS, err));
    if (cfg->n_heads % cfg->n_kv_heads != 0) {
        return ctx_error(c, "num_key_value_heads", err, "num_attention_heads (%d) is not a multiple of %d",
                         (int)cfg->n_heads, (int)cfg->n_kv_heads);
    }
    if (cfg->head_dim % 2 != 0) {
        return ctx_error(c, "head_dim", err, "%d is odd (RoPE rotates pairs of dimensions)", (int)cfg->head_dim);
    }
    /* the attention width must stay in the same range as the residual width */
    if ((int64_t)cfg->n_heads * cfg->head_dim > MAX_HIDDEN) {
        return ctx_error(c, "head_dim", err, "num_attention_heads * head_dim = %lld is larger than %d",
                         (long long)cfg->n_heads * cfg->head_dim, MAX_HIDDEN);
    }
    if (!(cfg->rms_norm_eps > 0.0f && cfg->rms_norm_eps < 1.0f)) {
        return ctx_error(c, "rms_norm_eps", err, "%g is not in (0, 1)", (double)cfg->rms_norm_eps);
    }
    if (!(cfg->rope_theta > 0.0 && isfinite(cfg->rope_theta))) {
        return ctx_error(c, "rope_theta", err, "%g is not a positive number", cfg->rope_theta);
    }
    if (cfg->bos_token_id < -1 || cfg->eos_token_id < -1) {
        return ctx_error(c, cfg->bos_token_id < -1 ? "bos_token_id" : "eos_token_id", err, "negative token id");
    }
    return CAPRL_OK;
}

/* ---- parse ----------------------------------------------------------------------------------------------- */

static caprl_status parse_sizes(const text_src *s, caprl_text_config *cfg, caprl_error *err) {
    const struct {
        const char *key;
        int32_t     hi;
        int32_t    *out;
    } required[] = {
        {"vocab_size", MAX_VOCAB, &cfg->vocab_size},
        {"hidden_size", MAX_HIDDEN, &cfg->hidden_size},
        {"intermediate_size", MAX_INTERMEDIATE, &cfg->intermediate_size},
        {"num_hidden_layers", MAX_LAYERS, &cfg->n_layers},
        {"num_attention_heads", MAX_HEADS, &cfg->n_heads},
    };
    /* Values first, presence second: a present but absurd value is the more useful message. 0 marks absence
     * (every present value is >= 1). */
    for (size_t i = 0; i < N_OF(required); i++) {
        CAPRL_TRY(caprl_json_opt_i32(pick(s, required[i].key), required[i].key, 1, required[i].hi, 0,
                                     required[i].out, err));
    }
    for (size_t i = 0; i < N_OF(required); i++) {
        if (*required[i].out == 0) {
            return caprl_json_field_error(pick(s, required[i].key), required[i].key, CAPRL_ERR_FORMAT, err,
                                          "missing (required)");
        }
    }
    const caprl_json_obj *oh = pick(s, "num_attention_heads");
    CAPRL_TRY(caprl_json_opt_i32(pick(s, "num_key_value_heads"), "num_key_value_heads", 1, MAX_HEADS, cfg->n_heads,
                                 &cfg->n_kv_heads, err));
    const caprl_json_obj *od = pick(s, "head_dim");
    if (caprl_json_has(od, "head_dim")) {
        CAPRL_TRY(caprl_json_get_i32(od, "head_dim", 1, MAX_HEAD_DIM, &cfg->head_dim, err));
    } else if (cfg->hidden_size % cfg->n_heads != 0) {
        return caprl_json_field_error(oh, "num_attention_heads", CAPRL_ERR_FORMAT, err,
                                      "%d does not divide hidden_size (%d) and head_dim is absent", (int)cfg->n_heads,
                                      (int)cfg->hidden_size);
    } else {
        cfg->head_dim = cfg->hidden_size / cfg->n_heads;
    }
    CAPRL_TRY(caprl_json_opt_i32(pick(s, "max_position_embeddings"), "max_position_embeddings", 1, MAX_POSITIONS,
                                 DEFAULT_MAX_POSITIONS, &cfg->max_position_embeddings, err));
    return CAPRL_OK;
}

static caprl_status parse_text(const text_src *s, arch_kind kind, caprl_text_config *cfg, caprl_error *err) {
    CAPRL_TRY(parse_sizes(s, cfg, err));
    const caprl_json_obj *o = pick(s, "rms_norm_eps");
    double                eps = 0;
    CAPRL_TRY(caprl_json_opt_number(o, "rms_norm_eps", kind == ARCH_QWEN2_5_VL ? DEFAULT_VL_RMS_EPS : DEFAULT_RMS_EPS,
                                    &eps, err));
    /* checked in double first: a value below FLT_MIN would otherwise pass as a float 0 check with a worse message */
    if (!(eps > 0.0 && eps < 1.0) || (float)eps <= 0.0f) {
        return caprl_json_field_error(o, "rms_norm_eps", CAPRL_ERR_FORMAT, err, "%g is not in (0, 1)", eps);
    }
    cfg->rms_norm_eps = (float)eps;
    CAPRL_TRY(parse_rope(s, kind, cfg, err));
    o = pick(s, "hidden_act");
    const char *act = NULL;
    CAPRL_TRY(caprl_json_opt_string(o, "hidden_act", "silu", &act, err));
    if (strcmp(act, "silu") != 0 && strcmp(act, "swish") != 0) { /* transformers' ACT2FN: swish is SiLU */
        return caprl_json_field_error(o, "hidden_act", CAPRL_ERR_UNSUPPORTED, err,
                                      "'%.32s' is not supported (only \"silu\")", act);
    }
    CAPRL_TRY(parse_attention_kind(s, cfg->n_layers, err));
    CAPRL_TRY(caprl_json_opt_bool(pick(s, "tie_word_embeddings"), "tie_word_embeddings", false,
                                  &cfg->tie_word_embeddings, err));
    CAPRL_TRY(parse_token_id(pick(s, "bos_token_id"), "bos_token_id", &cfg->bos_token_id, err));
    CAPRL_TRY(parse_eos_list(pick(s, "eos_token_id"), cfg->eos_ids, &cfg->n_eos, err));
    cfg->eos_token_id = cfg->n_eos > 0 ? cfg->eos_ids[0] : -1;
    cfg->torch_dtype = -1;
    const char *dtype_key = caprl_json_has(pick(s, "dtype"), "dtype") ? "dtype" : "torch_dtype";
    o = pick(s, dtype_key);
    if (caprl_json_has(o, dtype_key)) {
        CAPRL_TRY(parse_dtype_name(o, dtype_key, &cfg->torch_dtype, err));
    }
    return CAPRL_OK;
}

/* mrope_section from rope_scaling or rope_parameters (whichever holds it); it must cover head_dim / 2 pairs. */
static caprl_status parse_mrope(const text_src *s, caprl_text_config *cfg, caprl_error *err) {
    static const char *const where[] = {"rope_scaling", "rope_parameters"};
    for (size_t w = 0; w < N_OF(where); w++) {
        const caprl_json_obj *o = pick(s, where[w]);
        if (!caprl_json_is_object(caprl_json_get(o, where[w]))) {
            continue;
        }
        caprl_json_obj ro;
        CAPRL_TRY(caprl_json_get_object(o, where[w], &ro, err));
        const struct json_t *sec = caprl_json_get(&ro, "mrope_section");
        if (caprl_json_is_null(sec)) {
            continue;
        }
        size_t  n = caprl_json_array_size(sec);
        int64_t sum = 0;
        bool    ok = caprl_json_is_array(sec) && n == 3; /* t, h, w */
        for (size_t i = 0; ok && i < n; i++) {
            int64_t v = 0;
            ok = caprl_json_int_value(caprl_json_array_get(sec, i), &v) && v > 0 && v <= cfg->head_dim;
            cfg->mrope_section[i] = ok ? (int32_t)v : 0;
            sum += v;
        }
        if (!ok || sum != cfg->head_dim / 2) {
            char got[96];
            return caprl_json_field_error(&ro, "mrope_section", CAPRL_ERR_FORMAT, err,
                                          "expected 3 positive integers (t, h, w) summing to head_dim / 2 (%d), got %s",
                                          cfg->head_dim / 2, caprl_json_describe(sec, got, sizeof got));
        }
        cfg->n_mrope_sections = (int32_t)n;
        return CAPRL_OK;
    }
    return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: a qwen2_5_vl config needs rope_scaling.mrope_section",
                         s->text->file);
}

static caprl_status parse_vl(const caprl_json_obj *root, const text_src *s, caprl_text_config *cfg,
                             caprl_error *err) {
    cfg->is_vl = true;
    CAPRL_TRY(parse_mrope(s, cfg, err));
    const int32_t hi = cfg->vocab_size - 1;
    CAPRL_TRY(caprl_json_opt_i32(root, "image_token_id", 0, hi, 151655, &cfg->image_token_id, err));
    CAPRL_TRY(caprl_json_opt_i32(root, "vision_start_token_id", 0, hi, 151652, &cfg->vision_start_token_id, err));
    CAPRL_TRY(caprl_json_opt_i32(root, "vision_end_token_id", 0, hi, 151653, &cfg->vision_end_token_id, err));
    /* ids caprl does not use but transformers' get_rope_index reads (4.49-4.51 have no default for video_token_id):
     * kept to be written back; an absent one is Qwen2.5-VL's value when the vocabulary holds it */
    CAPRL_TRY(caprl_json_opt_i32(root, "video_token_id", -1, INT32_MAX, 151656, &cfg->video_token_id, err));
    CAPRL_TRY(caprl_json_opt_i32(root, "vision_token_id", -1, INT32_MAX, 151654, &cfg->vision_token_id, err));
    cfg->video_token_id = cfg->video_token_id <= hi ? cfg->video_token_id : -1;
    cfg->vision_token_id = cfg->vision_token_id <= hi ? cfg->vision_token_id : -1;
    /* an absent id takes Qwen2.5-VL's value, which a smaller vocabulary cannot hold: say so instead of writing a
     * config that would not load back */
    const struct {
        const char *key;
        int32_t     value;
    } ids[] = {{"image_token_id", cfg->image_token_id},
               {"vision_start_token_id", cfg->vision_start_token_id},
               {"vision_end_token_id", cfg->vision_end_token_id}};
    for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++) {
        if (ids[i].value > hi) {
            return caprl_json_field_error(root, ids[i].key, CAPRL_ERR_FORMAT, err,
                                          "absent, and the Qwen2.5-VL default %d is not below vocab_size %d",
                                          (int)ids[i].value, (int)cfg->vocab_size);
        }
    }
    return CAPRL_OK;
}

static caprl_status parse_root(caprl_text_config *out, const caprl_json_obj *root, caprl_error *err) {
    arch_kind kind = ARCH_QWEN2;
    CAPRL_TRY(detect_arch(root, &kind, err));
    caprl_json_obj text;
    bool           nested = false;
    if (kind == ARCH_QWEN2_5_VL) {
        CAPRL_TRY(caprl_json_opt_object(root, "text_config", &text, &nested, err));
    }
    text_src src = {.text = nested ? &text : root, .root = nested ? root : NULL};
    caprl_text_config cfg;
    memset(&cfg, 0, sizeof cfg);
    CAPRL_TRY(parse_text(&src, kind, &cfg, err));
    field_ctx c = {.file = root->file, .prefix = src.text->path, .code = CAPRL_ERR_FORMAT};
    CAPRL_TRY(check_config(&cfg, &c, err));
    cfg.image_token_id = cfg.vision_start_token_id = cfg.vision_end_token_id = -1;
    cfg.video_token_id = cfg.vision_token_id = -1;
    if (kind == ARCH_QWEN2_5_VL) {
        CAPRL_TRY(parse_vl(root, &src, &cfg, err));
    }
    caprl_json_warn_unknown(root, k_config_known, N_OF(k_config_known));
    if (nested) {
        caprl_json_warn_unknown(&text, k_config_known, N_OF(k_config_known));
    }
    *out = cfg;
    return CAPRL_OK;
}

caprl_status caprl_text_config_parse(caprl_text_config *cfg, const char *json, size_t n, const char *name,
                                     caprl_error *err) {
    if (!cfg || (!json && n)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_text_config_parse: NULL argument");
    }
    const char     *label = name ? name : "config.json";
    struct json_t  *doc = NULL;
    caprl_json_obj  root;
    CAPRL_TRY(caprl_json_parse(&doc, json, n, label, err));
    caprl_status st = caprl_json_root(&root, doc, label, err);
    if (st == CAPRL_OK) {
        st = parse_root(cfg, &root, err);
    }
    caprl_json_free(doc);
    return st;
}

caprl_status caprl_text_config_load(caprl_text_config *cfg, const char *path, caprl_error *err) {
    if (!cfg || !path) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_text_config_load: NULL argument");
    }
    struct json_t *doc = NULL;
    caprl_json_obj root;
    CAPRL_TRY(caprl_json_load_file(&doc, path, CONFIG_MAX_BYTES, err));
    caprl_status st = caprl_json_root(&root, doc, path, err);
    if (st == CAPRL_OK) {
        st = parse_root(cfg, &root, err);
    }
    caprl_json_free(doc);
    return st;
}

/* ---- write ----------------------------------------------------------------------------------------------- */

/* Bounded text builder; overflow is a programmer error (the config has a fixed, small set of fields). */
typedef struct text_buf {
    char   data[4096];
    size_t len;
} text_buf;

static void tb_printf(text_buf *b, const char *fmt, ...) CAPRL_PRINTF(2, 3);

static void tb_printf(text_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->data + b->len, sizeof b->data - b->len, fmt, ap);
    va_end(ap);
    CAPRL_ASSERT(n >= 0 && (size_t)n < sizeof b->data - b->len);
    b->len += (size_t)n;
}

/* Python's float repr style, which jansson and Python both read back exactly: integral values as "1000000.0",
 * others with the fewest significant digits that round-trip ("1e-06", "0.02"). With as_float the digits are
 * the fewest that give back the same float. The decimal separator is forced to '.' whatever the C locale. */
static const char *fmt_real(double v, bool as_float, char *buf, size_t cap) {
    if (fabs(v) < 1e16 && v == floor(v)) {
        snprintf(buf, cap, "%.1f", v);
    } else {
        for (int prec = 1; prec <= 17; prec++) {
            snprintf(buf, cap, "%.*g", prec, v);
            double back = strtod(buf, NULL);
            if (as_float ? (float)back == (float)v : back == v) {
                break;
            }
        }
    }
    for (char *p = buf; *p; p++) {
        if (*p == ',') {
            *p = '.';
        }
    }
    return buf;
}

static void tb_id(text_buf *b, const char *key, int32_t id) {
    if (id >= 0) {
        tb_printf(b, "  \"%s\": %d,\n", key, (int)id);
    } else {
        tb_printf(b, "  \"%s\": null,\n", key);
    }
}

caprl_status caprl_text_config_to_json(const caprl_text_config *cfg, int32_t dtype, char **out, caprl_error *err) {
    if (!cfg || !out) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_text_config_to_json: NULL argument");
    }
    const char *dtype_name = dtype == CAPRL_DTYPE_F32    ? "float32"
                             : dtype == CAPRL_DTYPE_BF16 ? "bfloat16"
                             : dtype == CAPRL_DTYPE_F16  ? "float16"
                                                         : NULL;
    if (!dtype_name) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_text_config_to_json: dtype %s is not a weight dtype",
                             caprl_dtype_name(dtype));
    }
    field_ctx c = {.file = "caprl_text_config_to_json", .prefix = "", .code = CAPRL_ERR_INVALID_ARG};
    CAPRL_TRY(check_config(cfg, &c, err));

    /* Keys in sorted order with a 2-space indent, as transformers writes config.json (sort_keys=True). */
    text_buf *b = caprl_xcalloc(1, sizeof *b);
    char      num[64];
    tb_printf(b, "{\n  \"architectures\": [\n    \"%s\"\n  ],\n",
              cfg->is_vl ? "Qwen2_5_VLForConditionalGeneration" : "Qwen2ForCausalLM");
    tb_printf(b, "  \"attention_dropout\": 0.0,\n");
    tb_id(b, "bos_token_id", cfg->bos_token_id);
    if (cfg->n_eos > 1) {
        tb_printf(b, "  \"eos_token_id\": [");
        for (int32_t i = 0; i < cfg->n_eos; i++) {
            tb_printf(b, i ? ", %d" : "%d", (int)cfg->eos_ids[i]);
        }
        tb_printf(b, "],\n");
    } else {
        tb_id(b, "eos_token_id", cfg->eos_token_id);
    }
    if (cfg->head_dim * cfg->n_heads != cfg->hidden_size) { /* written only when it is not the derived value */
        tb_printf(b, "  \"head_dim\": %d,\n", (int)cfg->head_dim);
    }
    tb_printf(b, "  \"hidden_act\": \"silu\",\n");
    tb_printf(b, "  \"hidden_size\": %d,\n", (int)cfg->hidden_size);
    if (cfg->is_vl) {
        tb_id(b, "image_token_id", cfg->image_token_id);
    }
    tb_printf(b, "  \"initializer_range\": 0.02,\n");
    tb_printf(b, "  \"intermediate_size\": %d,\n", (int)cfg->intermediate_size);
    tb_printf(b, "  \"max_position_embeddings\": %d,\n", (int)cfg->max_position_embeddings);
    tb_printf(b, "  \"max_window_layers\": %d,\n", (int)cfg->n_layers);
    tb_printf(b, "  \"model_type\": \"%s\",\n", cfg->is_vl ? "qwen2_5_vl" : "qwen2");
    tb_printf(b, "  \"num_attention_heads\": %d,\n", (int)cfg->n_heads);
    tb_printf(b, "  \"num_hidden_layers\": %d,\n", (int)cfg->n_layers);
    tb_printf(b, "  \"num_key_value_heads\": %d,\n", (int)cfg->n_kv_heads);
    tb_printf(b, "  \"rms_norm_eps\": %s,\n", fmt_real((double)cfg->rms_norm_eps, true, num, sizeof num));
    if (cfg->is_vl) {
        tb_printf(b, "  \"rope_scaling\": {\n    \"mrope_section\": [");
        for (int32_t i = 0; i < cfg->n_mrope_sections; i++) {
            tb_printf(b, "%s%d", i ? ", " : "", (int)cfg->mrope_section[i]);
        }
        tb_printf(b, "],\n    \"rope_type\": \"default\",\n    \"type\": \"mrope\"\n  },\n");
    } else {
        tb_printf(b, "  \"rope_scaling\": null,\n");
    }
    tb_printf(b, "  \"rope_theta\": %s,\n", fmt_real(cfg->rope_theta, false, num, sizeof num));
    tb_printf(b, "  \"sliding_window\": null,\n");
    tb_printf(b, "  \"tie_word_embeddings\": %s,\n", cfg->tie_word_embeddings ? "true" : "false");
    tb_printf(b, "  \"torch_dtype\": \"%s\",\n", dtype_name);
    tb_printf(b, "  \"transformers_version\": \"%s\",\n", WRITTEN_TRANSFORMERS_VERSION);
    tb_printf(b, "  \"use_cache\": true,\n");
    tb_printf(b, "  \"use_sliding_window\": false,\n");
    if (cfg->is_vl && cfg->video_token_id > 0) { /* 0: a config built in memory without it */
        tb_id(b, "video_token_id", cfg->video_token_id);
    }
    if (cfg->is_vl) {
        tb_id(b, "vision_end_token_id", cfg->vision_end_token_id);
        tb_id(b, "vision_start_token_id", cfg->vision_start_token_id);
    }
    if (cfg->is_vl && cfg->vision_token_id > 0) {
        tb_id(b, "vision_token_id", cfg->vision_token_id);
    }
    tb_printf(b, "  \"vocab_size\": %d\n}\n", (int)cfg->vocab_size);
    *out = caprl_xstrndup(b->data, b->len);
    free(b);
    return CAPRL_OK;
}

/* ---- generation_config.json ------------------------------------------------------------------------------ */

caprl_generation_config caprl_generation_config_default(void) {
    caprl_generation_config gc;
    memset(&gc, 0, sizeof gc);
    gc.n_eos = 0;
    gc.do_sample = false;
    gc.temperature = 1.0f;
    gc.top_k = 50;
    gc.top_p = 1.0f;
    gc.repetition_penalty = 1.0f;
    gc.max_new_tokens = -1;
    return gc;
}

/* A float field with default def that must satisfy lo <(=) v <(=) hi. */
static caprl_status get_float(const caprl_json_obj *o, const char *key, double def, double lo, bool lo_open,
                              double hi, float *out, caprl_error *err) {
    double v = 0;
    CAPRL_TRY(caprl_json_opt_number(o, key, def, &v, err));
    bool ok = (lo_open ? v > lo : v >= lo) && v <= hi;
    if (!ok) {
        return caprl_json_field_error(o, key, CAPRL_ERR_FORMAT, err, "%g is out of range %s%g, %g]", v,
                                      lo_open ? "(" : "[", lo, hi);
    }
    *out = (float)v;
    return CAPRL_OK;
}

static caprl_status parse_generation(caprl_generation_config *out, const caprl_json_obj *o, caprl_error *err) {
    caprl_generation_config gc = caprl_generation_config_default();
    CAPRL_TRY(parse_eos_list(o, gc.eos_ids, &gc.n_eos, err));
    CAPRL_TRY(caprl_json_opt_bool(o, "do_sample", false, &gc.do_sample, err));
    /* temperature 0 appears in greedy configs (do_sample false); sampling needs it positive, as HF checks */
    CAPRL_TRY(get_float(o, "temperature", 1.0, 0.0, gc.do_sample, 1e6, &gc.temperature, err));
    CAPRL_TRY(caprl_json_opt_i32(o, "top_k", 0, INT32_MAX, 50, &gc.top_k, err));
    CAPRL_TRY(get_float(o, "top_p", 1.0, 0.0, false, 1.0, &gc.top_p, err));
    CAPRL_TRY(get_float(o, "repetition_penalty", 1.0, 0.0, true, 1e6, &gc.repetition_penalty, err));
    CAPRL_TRY(caprl_json_opt_i32(o, "max_new_tokens", 1, INT32_MAX, -1, &gc.max_new_tokens, err));
    caprl_json_warn_unknown(o, k_generation_known, N_OF(k_generation_known));
    *out = gc;
    return CAPRL_OK;
}

caprl_status caprl_generation_config_parse(caprl_generation_config *gc, const char *json, size_t n, const char *name,
                                           caprl_error *err) {
    if (!gc || (!json && n)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_generation_config_parse: NULL argument");
    }
    const char    *label = name ? name : "generation_config.json";
    struct json_t *doc = NULL;
    caprl_json_obj root;
    CAPRL_TRY(caprl_json_parse(&doc, json, n, label, err));
    caprl_status st = caprl_json_root(&root, doc, label, err);
    if (st == CAPRL_OK) {
        st = parse_generation(gc, &root, err);
    }
    caprl_json_free(doc);
    return st;
}
