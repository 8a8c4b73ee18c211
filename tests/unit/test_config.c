/* config.json / generation_config.json: the published Qwen2.5-0.5B-Instruct and Qwen2.5-VL-3B-Instruct layouts
 * (values from spec/qwen.md §2.8, §3.1, §5.9), the nested text_config + rope_parameters layout of newer saves,
 * absurd values (each error names its field), invalid JSON with line:col, unknown-key warnings, the
 * to_json round trip, and generation_config cases. Also the json wrapper's getters directly. */
#include "caprl/model.h"
#include "caprl/tensor.h"
#include "caprl_test.h"
#include "core/error_impl.h"
#include "fmt/json_impl.h"

/* ---- captured warnings ------------------------------------------------------------------------------------ */

static int  g_warnings;
static char g_last_warning[1024];

static void capture_log(int32_t level, const char *msg, void *ud) {
    (void)ud;
    if (level == CAPRL_LOG_WARN) {
        g_warnings++;
        snprintf(g_last_warning, sizeof g_last_warning, "%s", msg);
    }
}

static void reset_warnings(void) {
    g_warnings = 0;
    g_last_warning[0] = '\0';
}

/* ---- the published configs --------------------------------------------------------------------------------- */

static const char *k_qwen25_05b =
    "{\n"
    "  \"architectures\": [\n    \"Qwen2ForCausalLM\"\n  ],\n"
    "  \"attention_dropout\": 0.0,\n"
    "  \"bos_token_id\": 151643,\n"
    "  \"eos_token_id\": 151645,\n"
    "  \"hidden_act\": \"silu\",\n"
    "  \"hidden_size\": 896,\n"
    "  \"initializer_range\": 0.02,\n"
    "  \"intermediate_size\": 4864,\n"
    "  \"max_position_embeddings\": 32768,\n"
    "  \"max_window_layers\": 21,\n"
    "  \"model_type\": \"qwen2\",\n"
    "  \"num_attention_heads\": 14,\n"
    "  \"num_hidden_layers\": 24,\n"
    "  \"num_key_value_heads\": 2,\n"
    "  \"rms_norm_eps\": 1e-06,\n"
    "  \"rope_scaling\": null,\n"
    "  \"rope_theta\": 1000000.0,\n"
    "  \"sliding_window\": 32768,\n"
    "  \"tie_word_embeddings\": true,\n"
    "  \"torch_dtype\": \"bfloat16\",\n"
    "  \"transformers_version\": \"4.43.1\",\n"
    "  \"use_cache\": true,\n"
    "  \"use_sliding_window\": false,\n"
    "  \"vocab_size\": 151936\n"
    "}\n";

static const char *k_qwen25_vl_3b =
    "{\n"
    "  \"architectures\": [\"Qwen2_5_VLForConditionalGeneration\"],\n"
    "  \"attention_dropout\": 0.0,\n"
    "  \"bos_token_id\": 151643,\n"
    "  \"eos_token_id\": 151645,\n"
    "  \"vision_start_token_id\": 151652,\n"
    "  \"vision_end_token_id\": 151653,\n"
    "  \"vision_token_id\": 151654,\n"
    "  \"image_token_id\": 151655,\n"
    "  \"video_token_id\": 151656,\n"
    "  \"hidden_act\": \"silu\",\n"
    "  \"hidden_size\": 2048,\n"
    "  \"initializer_range\": 0.02,\n"
    "  \"intermediate_size\": 11008,\n"
    "  \"max_position_embeddings\": 128000,\n"
    "  \"max_window_layers\": 70,\n"
    "  \"model_type\": \"qwen2_5_vl\",\n"
    "  \"num_attention_heads\": 16,\n"
    "  \"num_hidden_layers\": 36,\n"
    "  \"num_key_value_heads\": 2,\n"
    "  \"rms_norm_eps\": 1e-06,\n"
    "  \"rope_theta\": 1000000.0,\n"
    "  \"sliding_window\": 32768,\n"
    "  \"tie_word_embeddings\": true,\n"
    "  \"torch_dtype\": \"bfloat16\",\n"
    "  \"transformers_version\": \"4.41.2\",\n"
    "  \"use_cache\": true,\n"
    "  \"use_sliding_window\": false,\n"
    "  \"vision_config\": {\n"
    "    \"depth\": 32, \"hidden_act\": \"silu\", \"hidden_size\": 1280, \"intermediate_size\": 3420,\n"
    "    \"num_heads\": 16, \"in_chans\": 3, \"out_hidden_size\": 2048, \"patch_size\": 14,\n"
    "    \"spatial_merge_size\": 2, \"spatial_patch_size\": 14, \"window_size\": 112,\n"
    "    \"fullatt_block_indexes\": [7, 15, 23, 31], \"tokens_per_second\": 2, \"temporal_patch_size\": 2\n"
    "  },\n"
    "  \"rope_scaling\": {\n    \"type\": \"mrope\",\n    \"mrope_section\": [16, 24, 24]\n  },\n"
    "  \"vocab_size\": 151936\n"
    "}\n";

/* transformers >= 4.52 / v5 layout: text fields nested, rope_parameters, dtype instead of torch_dtype */
static const char *k_qwen25_vl_nested =
    "{\n"
    "  \"architectures\": [\"Qwen2_5_VLForConditionalGeneration\"],\n"
    "  \"model_type\": \"qwen2_5_vl\",\n"
    "  \"dtype\": \"bfloat16\",\n"
    "  \"image_token_id\": 151655, \"video_token_id\": 151656,\n"
    "  \"vision_start_token_id\": 151652, \"vision_end_token_id\": 151653,\n"
    "  \"tie_word_embeddings\": true,\n"
    "  \"transformers_version\": \"5.0.0\",\n"
    "  \"text_config\": {\n"
    "    \"model_type\": \"qwen2_5_vl_text\",\n"
    "    \"hidden_size\": 2048, \"intermediate_size\": 11008, \"num_hidden_layers\": 36,\n"
    "    \"num_attention_heads\": 16, \"num_key_value_heads\": 2, \"vocab_size\": 151936,\n"
    "    \"max_position_embeddings\": 128000, \"rms_norm_eps\": 1e-06, \"hidden_act\": \"silu\",\n"
    "    \"bos_token_id\": 151643, \"eos_token_id\": 151645,\n"
    "    \"layer_types\": [" /* 36 entries follow */
    "\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\","
    "\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\","
    "\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\","
    "\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\","
    "\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\","
    "\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\","
    "\"full_attention\"],\n"
    "    \"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 1000000.0,"
    " \"mrope_section\": [16, 24, 24]},\n"
    "    \"use_sliding_window\": false, \"sliding_window\": null, \"max_window_layers\": 70\n"
    "  },\n"
    "  \"vision_config\": {\"depth\": 32, \"hidden_size\": 1280, \"out_hidden_size\": 2048}\n"
    "}\n";

static caprl_status parse(caprl_text_config *cfg, const char *json, caprl_error *err) {
    return caprl_text_config_parse(cfg, json, strlen(json), "config.json", err);
}

static void check_qwen25_05b(const caprl_text_config *c) {
    CHECK_EQ_I64(c->vocab_size, 151936);
    CHECK_EQ_I64(c->hidden_size, 896);
    CHECK_EQ_I64(c->intermediate_size, 4864);
    CHECK_EQ_I64(c->n_layers, 24);
    CHECK_EQ_I64(c->n_heads, 14);
    CHECK_EQ_I64(c->n_kv_heads, 2);
    CHECK_EQ_I64(c->head_dim, 64);
    CHECK_EQ_I64(c->max_position_embeddings, 32768);
    CHECK(c->rms_norm_eps == 1e-6f);
    CHECK(c->rope_theta == 1e6);
    CHECK(c->tie_word_embeddings);
    CHECK_EQ_I64(c->bos_token_id, 151643);
    CHECK_EQ_I64(c->eos_token_id, 151645);
    CHECK_EQ_I64(c->torch_dtype, CAPRL_DTYPE_BF16);
}

static void check_vl_3b(const caprl_text_config *c) {
    CHECK_EQ_I64(c->vocab_size, 151936);
    CHECK_EQ_I64(c->hidden_size, 2048);
    CHECK_EQ_I64(c->intermediate_size, 11008);
    CHECK_EQ_I64(c->n_layers, 36);
    CHECK_EQ_I64(c->n_heads, 16);
    CHECK_EQ_I64(c->n_kv_heads, 2);
    CHECK_EQ_I64(c->head_dim, 128);
    CHECK_EQ_I64(c->max_position_embeddings, 128000);
    CHECK(c->rms_norm_eps == 1e-6f);
    CHECK(c->rope_theta == 1e6);
    CHECK(c->tie_word_embeddings);
    CHECK_EQ_I64(c->bos_token_id, 151643);
    CHECK_EQ_I64(c->eos_token_id, 151645);
    CHECK_EQ_I64(c->torch_dtype, CAPRL_DTYPE_BF16);
}

static void test_published(void) {
    caprl_error       err = {0};
    caprl_text_config c;
    reset_warnings();
    CHECK_OK(parse(&c, k_qwen25_05b, &err), &err);
    check_qwen25_05b(&c);
    CHECK_MSG(g_warnings == 0, "unexpected warning: %s", g_last_warning);

    reset_warnings();
    CHECK_OK(parse(&c, k_qwen25_vl_3b, &err), &err);
    check_vl_3b(&c);
    CHECK_MSG(g_warnings == 0, "unexpected warning: %s", g_last_warning);

    reset_warnings();
    CHECK_OK(parse(&c, k_qwen25_vl_nested, &err), &err);
    check_vl_3b(&c);
    CHECK_MSG(g_warnings == 0, "unexpected warning: %s", g_last_warning);
}

/* ---- edits of the 0.5B config ---------------------------------------------------------------------------- */

/* Replaces the first occurrence of `from` in base by `to` (the edit must apply). Caller frees. */
static char *edit(const char *base, const char *from, const char *to) {
    const char *p = strstr(base, from);
    CHECK_MSG(p != NULL, "edit: '%s' not found", from);
    if (!p) {
        return strdup(base);
    }
    size_t n = strlen(base) - strlen(from) + strlen(to) + 1;
    char  *out = malloc(n);
    size_t head = (size_t)(p - base);
    memcpy(out, base, head);
    memcpy(out + head, to, strlen(to));
    memcpy(out + head + strlen(to), p + strlen(from), strlen(p + strlen(from)) + 1);
    return out;
}

typedef struct bad_case {
    const char  *from;
    const char  *to;
    caprl_status want;
    const char  *needles[3];
} bad_case;

static const bad_case k_bad[] = {
    {"\"num_attention_heads\": 14", "\"num_attention_heads\": -3", CAPRL_ERR_FORMAT,
     {"config.json: field 'num_attention_heads'", "positive integer", "-3"}},
    {"\"num_attention_heads\": 14", "\"num_attention_heads\": 0", CAPRL_ERR_FORMAT, {"'num_attention_heads'", "got 0"}},
    {"\"num_attention_heads\": 14", "\"num_attention_heads\": 13", CAPRL_ERR_FORMAT,
     {"'num_attention_heads'", "does not divide hidden_size (896)"}},
    {"\"num_attention_heads\": 14", "\"num_attention_heads\": \"14\"", CAPRL_ERR_FORMAT,
     {"'num_attention_heads'", "\"14\""}},
    {"\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3", CAPRL_ERR_FORMAT,
     {"'num_key_value_heads'", "not a multiple"}},
    {"\"num_key_value_heads\": 2", "\"num_key_value_heads\": 28", CAPRL_ERR_FORMAT, {"'num_key_value_heads'"}},
    {"\"num_key_value_heads\": 2", "\"num_key_value_heads\": 0", CAPRL_ERR_FORMAT, {"'num_key_value_heads'"}},
    {"\"vocab_size\": 151936", "\"vocab_size\": 0", CAPRL_ERR_FORMAT, {"'vocab_size'"}},
    {"\"vocab_size\": 151936", "\"vocab_size\": -1", CAPRL_ERR_FORMAT, {"'vocab_size'"}},
    {"\"vocab_size\": 151936", "\"vocab_size\": 99999999999999", CAPRL_ERR_FORMAT, {"'vocab_size'"}},
    {"\"vocab_size\": 151936", "\"vocab_size\": 151936.5", CAPRL_ERR_FORMAT, {"'vocab_size'", "151936.5"}},
    {",\n  \"vocab_size\": 151936", "", CAPRL_ERR_FORMAT, {"'vocab_size'", "missing"}},
    {"\"hidden_size\": 896", "\"hidden_size\": 2097152", CAPRL_ERR_FORMAT, {"'hidden_size'"}},
    {"\"intermediate_size\": 4864", "\"intermediate_size\": 0", CAPRL_ERR_FORMAT, {"'intermediate_size'"}},
    {"\"num_hidden_layers\": 24", "\"num_hidden_layers\": 2.5", CAPRL_ERR_FORMAT, {"'num_hidden_layers'"}},
    {"\"num_hidden_layers\": 24", "\"num_hidden_layers\": true", CAPRL_ERR_FORMAT, {"'num_hidden_layers'"}},
    {"\"hidden_size\": 896", "\"head_dim\": 63, \"hidden_size\": 896", CAPRL_ERR_FORMAT, {"'head_dim'", "odd"}},
    {"\"hidden_size\": 896", "\"hidden_size\": 98", CAPRL_ERR_FORMAT, {"'head_dim'", "7 is odd"}},
    {"\"hidden_size\": 896", "\"head_dim\": 0, \"hidden_size\": 896", CAPRL_ERR_FORMAT, {"'head_dim'"}},
    {"\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": 0", CAPRL_ERR_FORMAT, {"'rms_norm_eps'"}},
    {"\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": 1.5", CAPRL_ERR_FORMAT, {"'rms_norm_eps'"}},
    {"\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": -1e-06", CAPRL_ERR_FORMAT, {"'rms_norm_eps'"}},
    {"\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": 1e-300", CAPRL_ERR_FORMAT, {"'rms_norm_eps'"}},
    {"\"rms_norm_eps\": 1e-06", "\"rms_norm_eps\": \"1e-6\"", CAPRL_ERR_FORMAT, {"'rms_norm_eps'"}},
    {"\"rope_theta\": 1000000.0", "\"rope_theta\": 0", CAPRL_ERR_FORMAT, {"'rope_theta'"}},
    {"\"rope_theta\": 1000000.0", "\"rope_theta\": -10000.0", CAPRL_ERR_FORMAT, {"'rope_theta'"}},
    {"\"rope_theta\": 1000000.0", "\"rope_theta\": 1e999", CAPRL_ERR_FORMAT, {"config.json:20:", "overflow"}},
    {"\"rope_scaling\": null", "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0}", CAPRL_ERR_UNSUPPORTED,
     {"'rope_scaling'", "yarn"}},
    {"\"rope_scaling\": null", "\"rope_scaling\": {\"type\": \"mrope\", \"mrope_section\": [16, 24, 24]}",
     CAPRL_ERR_UNSUPPORTED, {"'rope_scaling'"}},
    {"\"rope_theta\": 1000000.0", "\"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 4.0}",
     CAPRL_ERR_UNSUPPORTED, {"'rope_parameters.rope_type'", "yarn"}},
    {"\"rope_theta\": 1000000.0", "\"rope_theta\": 1000000.0, \"rope_parameters\": {\"rope_theta\": 10000.0}",
     CAPRL_ERR_FORMAT, {"'rope_parameters.rope_theta'", "disagrees"}},
    {"\"rope_theta\": 1000000.0", "\"rope_parameters\": {\"rope_theta\": -1.0}", CAPRL_ERR_FORMAT,
     {"'rope_parameters.rope_theta'"}},
    {"\"rope_theta\": 1000000.0", "\"rope_parameters\": 5", CAPRL_ERR_FORMAT, {"'rope_parameters'"}},
    {"\"use_sliding_window\": false", "\"use_sliding_window\": true", CAPRL_ERR_UNSUPPORTED, {"'use_sliding_window'"}},
    {"\"use_sliding_window\": false", "\"use_sliding_window\": 0", CAPRL_ERR_FORMAT, {"'use_sliding_window'"}},
    {"\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\"", CAPRL_ERR_UNSUPPORTED, {"'hidden_act'", "gelu"}},
    {"\"model_type\": \"qwen2\"", "\"model_type\": \"llama\"", CAPRL_ERR_UNSUPPORTED, {"'model_type'", "llama"}},
    {"\"model_type\": \"qwen2\"", "\"model_type\": 2", CAPRL_ERR_FORMAT, {"'model_type'"}},
    {"\"Qwen2ForCausalLM\"", "\"LlamaForCausalLM\"", CAPRL_ERR_UNSUPPORTED, {"'architectures'", "LlamaForCausalLM"}},
    {"\"Qwen2ForCausalLM\"", "3", CAPRL_ERR_FORMAT, {"'architectures'"}},
    {"\"torch_dtype\": \"bfloat16\"", "\"torch_dtype\": \"int8\"", CAPRL_ERR_UNSUPPORTED, {"'torch_dtype'", "int8"}},
    {"\"torch_dtype\": \"bfloat16\"", "\"torch_dtype\": 16", CAPRL_ERR_FORMAT, {"'torch_dtype'"}},
    {"\"max_position_embeddings\": 32768", "\"max_position_embeddings\": -1", CAPRL_ERR_FORMAT,
     {"'max_position_embeddings'"}},
    {"\"tie_word_embeddings\": true", "\"tie_word_embeddings\": \"yes\"", CAPRL_ERR_FORMAT, {"'tie_word_embeddings'"}},
    {"\"bos_token_id\": 151643", "\"bos_token_id\": -5", CAPRL_ERR_FORMAT, {"'bos_token_id'"}},
    {"\"eos_token_id\": 151645", "\"eos_token_id\": \"eos\"", CAPRL_ERR_FORMAT, {"'eos_token_id'"}},
    {"\"vocab_size\": 151936", "\"vocab_size\": 151936, \"layer_types\": [\"sliding_attention\"]",
     CAPRL_ERR_FORMAT, {"'layer_types'", "24"}},
    {"\"num_hidden_layers\": 24",
     "\"num_hidden_layers\": 2, \"layer_types\": [\"full_attention\", \"sliding_attention\"]",
     CAPRL_ERR_UNSUPPORTED, {"'layer_types'", "entry 1"}},
    /* JSON-level errors carry line:column */
    {"\"hidden_size\": 896,", "\"hidden_size\": 896,,", CAPRL_ERR_FORMAT, {"config.json:9:", "near"}},
    {"\"hidden_size\": 896,", "\"hidden_size\": 896, \"hidden_size\": 896,", CAPRL_ERR_FORMAT,
     {"config.json:9:", "duplicate"}},
    {"\"silu\"", "\"s\xffu\"", CAPRL_ERR_FORMAT, {"config.json:8:"}},
};

static void test_bad_values(void) {
    for (size_t i = 0; i < sizeof k_bad / sizeof k_bad[0]; i++) {
        const bad_case   *b = &k_bad[i];
        char             *json = edit(k_qwen25_05b, b->from, b->to);
        caprl_error       err = {0};
        caprl_text_config c;
        memset(&c, 0x5a, sizeof c);
        caprl_status st = parse(&c, json, &err);
        CHECK_MSG(st == b->want, "case %zu (%s): status %d, expected %d: %s", i, b->to, (int)st, (int)b->want,
                  err.msg);
        for (int k = 0; k < 3 && b->needles[k]; k++) {
            CHECK_MSG(strstr(err.msg, b->needles[k]) != NULL, "case %zu: '%s' not in '%s'", i, b->needles[k],
                      err.msg);
        }
        CHECK_MSG(c.vocab_size == 0x5a5a5a5a, "case %zu: output written on failure", i);
        free(json);
    }
}

static void test_variants(void) {
    caprl_error       err = {0};
    caprl_text_config c;

    /* num_key_value_heads null or absent = num_attention_heads; head_dim explicit; rope_parameters only */
    char *j1 = edit(k_qwen25_05b, "\"num_key_value_heads\": 2", "\"num_key_value_heads\": null, \"head_dim\": 128");
    char *j2 = edit(j1, "\"rope_theta\": 1000000.0", "\"rope_parameters\": {\"rope_type\": \"default\", "
                                                     "\"rope_theta\": 500000.0}");
    CHECK_OK(parse(&c, j2, &err), &err);
    CHECK_EQ_I64(c.n_kv_heads, 14);
    CHECK_EQ_I64(c.head_dim, 128);
    CHECK(c.rope_theta == 500000.0);
    free(j1);
    free(j2);

    /* no model_type: architectures decides; absent optional fields take Qwen2Config's defaults */
    const char *minimal = "{\"architectures\": [\"Qwen2ForCausalLM\"], \"vocab_size\": 1000, \"hidden_size\": 64,"
                          " \"intermediate_size\": 128, \"num_hidden_layers\": 2, \"num_attention_heads\": 4}";
    CHECK_OK(parse(&c, minimal, &err), &err);
    CHECK_EQ_I64(c.n_kv_heads, 4);
    CHECK_EQ_I64(c.head_dim, 16);
    CHECK_EQ_I64(c.max_position_embeddings, 32768);
    CHECK(c.rms_norm_eps == 1e-6f);
    CHECK(c.rope_theta == 10000.0);
    CHECK(!c.tie_word_embeddings);
    CHECK_EQ_I64(c.bos_token_id, -1);
    CHECK_EQ_I64(c.eos_token_id, -1);
    CHECK_EQ_I64(c.torch_dtype, -1);

    /* neither model_type nor architectures */
    CHECK_EQ_I64(parse(&c, "{\"vocab_size\": 1000}", &err), CAPRL_ERR_FORMAT);
    CHECK(strstr(err.msg, "'model_type'") != NULL);
    /* not an object, empty, garbage */
    CHECK_EQ_I64(parse(&c, "[1, 2]", &err), CAPRL_ERR_FORMAT);
    CHECK(strstr(err.msg, "config.json") != NULL);
    CHECK_EQ_I64(parse(&c, "", &err), CAPRL_ERR_FORMAT);
    CHECK_EQ_I64(parse(&c, "{\n\n   x", &err), CAPRL_ERR_FORMAT);
    CHECK_MSG(strstr(err.msg, "config.json:3:") != NULL, "%s", err.msg);

    /* eos as a list: eos_token_id the first, eos_ids the whole list (what generation falls back to, as
     * GenerationConfig.from_model_config); to_json writes the list back; dtype "float32" */
    char *j3 = edit(k_qwen25_05b, "\"eos_token_id\": 151645", "\"eos_token_id\": [151645, 151643]");
    char *j4 = edit(j3, "\"bfloat16\"", "\"float32\"");
    CHECK_OK(parse(&c, j4, &err), &err);
    CHECK_EQ_I64(c.eos_token_id, 151645);
    CHECK(c.n_eos == 2 && c.eos_ids[0] == 151645 && c.eos_ids[1] == 151643);
    CHECK_EQ_I64(c.torch_dtype, CAPRL_DTYPE_F32);
    char *back = NULL;
    CHECK_OK(caprl_text_config_to_json(&c, CAPRL_DTYPE_F32, &back, &err), &err);
    caprl_text_config c2;
    CHECK_OK(parse(&c2, back, &err), &err);
    CHECK(c2.n_eos == 2 && c2.eos_ids[1] == 151643);
    caprl_free(back);

    /* what transformers runs unchanged: rope_scaling of the default type, swish (= SiLU), use_sliding_window with
     * no layer at or past max_window_layers, or with sliding_window null */
    const char *accepted[][2] = {
        {"\"rope_scaling\": null", "\"rope_scaling\": {\"rope_type\": \"default\"}"},
        {"\"hidden_act\": \"silu\"", "\"hidden_act\": \"swish\""},
        {"\"max_window_layers\": 21,", "\"max_window_layers\": 24, \"use_sliding_window\": true,"},
        {"\"sliding_window\": 32768", "\"sliding_window\": null, \"use_sliding_window\": true"},
    };
    for (size_t i = 0; i < sizeof accepted / sizeof accepted[0]; i++) {
        char *e = edit(k_qwen25_05b, accepted[i][0], accepted[i][1]);
        if (strstr(accepted[i][1], "use_sliding_window")) { /* drop the original false */
            char *e2 = edit(e, "\"use_sliding_window\": false,\n", "");
            free(e);
            e = e2;
        }
        CHECK_MSG(parse(&c, e, &err) == CAPRL_OK, "%s: %s", accepted[i][1], err.msg);
        free(e);
    }
    char *slide = edit(k_qwen25_05b, "\"use_sliding_window\": false", "\"use_sliding_window\": true");
    CHECK_EQ_I64(parse(&c, slide, &err), CAPRL_ERR_UNSUPPORTED); /* layers 21 to 23 would slide */
    CHECK_MSG(strstr(err.msg, "layers 21 to 23") != NULL, "%s", err.msg);
    free(slide);

    /* Qwen2.5-VL's own defaults (Qwen2_5_VLTextConfig): rms_norm_eps 1e-5 and rope_theta 1e6 */
    char *v1 = edit(k_qwen25_vl_3b, "  \"rms_norm_eps\": 1e-06,\n", "");
    char *v2 = edit(v1, "  \"rope_theta\": 1000000.0,\n", "");
    CHECK_OK(parse(&c, v2, &err), &err);
    CHECK(c.rms_norm_eps == 1e-5f && c.rope_theta == 1e6);
    free(v1);
    free(v2);
    /* video_token_id / vision_token_id: unused by caprl but kept and written back for transformers */
    CHECK_OK(parse(&c, k_qwen25_vl_3b, &err), &err);
    CHECK(c.video_token_id == 151656 && c.vision_token_id == 151654);
    char *vj = NULL;
    CHECK_OK(caprl_text_config_to_json(&c, CAPRL_DTYPE_BF16, &vj, &err), &err);
    CHECK(vj && strstr(vj, "\"video_token_id\": 151656") && strstr(vj, "\"vision_token_id\": 151654"));
    caprl_free(vj);
    /* mrope_section is t, h, w: any other number of entries is refused */
    char *v3 = edit(k_qwen25_vl_3b, "[16, 24, 24]", "[16, 16, 16, 16]");
    CHECK_EQ_I64(parse(&c, v3, &err), CAPRL_ERR_FORMAT);
    CHECK_MSG(strstr(err.msg, "mrope_section") != NULL && strstr(err.msg, "3 positive") != NULL, "%s", err.msg);
    free(v3);
    free(j3);
    free(j4);

    /* VL: nested errors name the nested path; qwen2_5_vl rope_scaling other than mrope is refused */
    char *j5 = edit(k_qwen25_vl_nested, "\"num_attention_heads\": 16", "\"num_attention_heads\": -3");
    CHECK_EQ_I64(parse(&c, j5, &err), CAPRL_ERR_FORMAT);
    CHECK_MSG(strstr(err.msg, "field 'text_config.num_attention_heads'") != NULL, "%s", err.msg);
    free(j5);
    char *j6 = edit(k_qwen25_vl_3b, "\"mrope\"", "\"yarn\"");
    CHECK_EQ_I64(parse(&c, j6, &err), CAPRL_ERR_UNSUPPORTED);
    CHECK(strstr(err.msg, "'rope_scaling'") != NULL);
    free(j6);
    char *j7 = edit(k_qwen25_vl_3b, "\"Qwen2_5_VLForConditionalGeneration\"", "\"Qwen2VLForConditionalGeneration\"");
    CHECK_EQ_I64(parse(&c, j7, &err), CAPRL_ERR_UNSUPPORTED);
    CHECK(strstr(err.msg, "'architectures'") != NULL);
    free(j7);
    /* text_config fields win over the top level; missing ones fall back to it */
    char *j8 = edit(k_qwen25_vl_nested, "\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false");
    CHECK_OK(parse(&c, j8, &err), &err);
    CHECK(!c.tie_word_embeddings);
    free(j8);

    /* load from a file: success and a missing file */
    char *dir = test_tmpdir("config");
    char  path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *fp = fopen(path, "wb");
    fputs(k_qwen25_05b, fp);
    fclose(fp);
    CHECK_OK(caprl_text_config_load(&c, path, &err), &err);
    check_qwen25_05b(&c);
    snprintf(path, sizeof path, "%s/missing.json", dir);
    CHECK_EQ_I64(caprl_text_config_load(&c, path, &err), CAPRL_ERR_IO);
    CHECK(strstr(err.msg, "missing.json") != NULL);
    free(dir);
}

static void test_unknown_keys(void) {
    caprl_error       err = {0};
    caprl_text_config c;
    char *j = edit(k_qwen25_05b, "\"use_cache\": true", "\"use_cache\": true, \"frobnicate\": 3");
    reset_warnings();
    CHECK_OK(parse(&c, j, &err), &err);
    CHECK_EQ_I64(g_warnings, 1);
    CHECK_MSG(strstr(g_last_warning, "'frobnicate'") && strstr(g_last_warning, "config.json"), "%s", g_last_warning);
    free(j);

    j = edit(k_qwen25_vl_nested, "\"max_window_layers\": 70", "\"max_window_layers\": 70, \"mystery\": 1");
    reset_warnings();
    CHECK_OK(parse(&c, j, &err), &err);
    CHECK_EQ_I64(g_warnings, 1);
    CHECK_MSG(strstr(g_last_warning, "'text_config.mystery'") != NULL, "%s", g_last_warning);
    free(j);

    j = edit(k_qwen25_05b, "\"rope_theta\": 1000000.0", "\"rope_parameters\": {\"rope_theta\": 1e6, \"odd\": 1}");
    reset_warnings();
    CHECK_OK(parse(&c, j, &err), &err);
    CHECK_MSG(g_warnings == 1 && strstr(g_last_warning, "'rope_parameters.odd'"), "%s", g_last_warning);
    free(j);
}

/* ---- to_json ------------------------------------------------------------------------------------------------ */

static bool same_config(const caprl_text_config *a, const caprl_text_config *b) {
    return a->vocab_size == b->vocab_size && a->hidden_size == b->hidden_size &&
           a->intermediate_size == b->intermediate_size && a->n_layers == b->n_layers && a->n_heads == b->n_heads &&
           a->n_kv_heads == b->n_kv_heads && a->head_dim == b->head_dim &&
           a->max_position_embeddings == b->max_position_embeddings && a->rms_norm_eps == b->rms_norm_eps &&
           a->rope_theta == b->rope_theta && a->tie_word_embeddings == b->tie_word_embeddings &&
           a->bos_token_id == b->bos_token_id && a->eos_token_id == b->eos_token_id;
}

static void roundtrip(const caprl_text_config *c, int32_t dtype) {
    caprl_error err = {0};
    char       *json = NULL;
    CHECK_OK(caprl_text_config_to_json(c, dtype, &json, &err), &err);
    if (!json) {
        return;
    }
    caprl_text_config back;
    reset_warnings();
    CHECK_OK(parse(&back, json, &err), &err);
    CHECK_MSG(same_config(c, &back), "round trip differs:\n%s", json);
    CHECK_EQ_I64(back.torch_dtype, dtype);
    CHECK_MSG(g_warnings == 0, "warning on our own output: %s", g_last_warning);
    free(json);
}

static void test_to_json(void) {
    caprl_error       err = {0};
    caprl_text_config c;
    CHECK_OK(parse(&c, k_qwen25_05b, &err), &err);
    char *json = NULL;
    CHECK_OK(caprl_text_config_to_json(&c, CAPRL_DTYPE_BF16, &json, &err), &err);
    /* HF style: sorted keys, 2-space indent, Python float spelling */
    CHECK(json && strncmp(json, "{\n  \"architectures\": [\n    \"Qwen2ForCausalLM\"\n  ],\n", 50) == 0);
    CHECK(json && strstr(json, "  \"rms_norm_eps\": 1e-06,\n") != NULL);
    CHECK(json && strstr(json, "  \"rope_theta\": 1000000.0,\n") != NULL);
    CHECK(json && strstr(json, "  \"torch_dtype\": \"bfloat16\",\n") != NULL);
    CHECK(json && strstr(json, "  \"model_type\": \"qwen2\",\n") != NULL);
    CHECK(json && strstr(json, "\"head_dim\"") == NULL); /* derived: not written */
    CHECK(json && strstr(json, "\"transformers_version\"") != NULL);
    free(json);
    roundtrip(&c, CAPRL_DTYPE_BF16);
    roundtrip(&c, CAPRL_DTYPE_F32);

    /* awkward values: explicit head_dim, odd eps and theta, no bos/eos, untied */
    c.head_dim = 48;
    c.rms_norm_eps = 1.2345678e-5f;
    c.rope_theta = 12345.678901234567;
    c.bos_token_id = -1;
    c.eos_token_id = -1;
    c.tie_word_embeddings = false;
    roundtrip(&c, CAPRL_DTYPE_F16);
    c.rms_norm_eps = 0.1f;
    c.rope_theta = 1e20;
    roundtrip(&c, CAPRL_DTYPE_F32);

    /* invalid configs and dtypes are refused, naming the field */
    caprl_text_config bad = c;
    bad.n_heads = 0;
    CHECK_EQ_I64(caprl_text_config_to_json(&bad, CAPRL_DTYPE_F32, &json, &err), CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "num_attention_heads") != NULL);
    bad = c;
    bad.n_kv_heads = 5;
    CHECK_EQ_I64(caprl_text_config_to_json(&bad, CAPRL_DTYPE_F32, &json, &err), CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "num_key_value_heads") != NULL);
    bad = c;
    bad.rms_norm_eps = 0.0f;
    CHECK_EQ_I64(caprl_text_config_to_json(&bad, CAPRL_DTYPE_F32, &json, &err), CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "rms_norm_eps") != NULL);
    CHECK_EQ_I64(caprl_text_config_to_json(&c, CAPRL_DTYPE_I32, &json, &err), CAPRL_ERR_INVALID_ARG);
}

/* ---- generation_config.json ------------------------------------------------------------------------------ */

static caprl_status gparse(caprl_generation_config *g, const char *json, caprl_error *err) {
    return caprl_generation_config_parse(g, json, strlen(json), "generation_config.json", err);
}

static void test_generation(void) {
    caprl_error             err = {0};
    caprl_generation_config g = caprl_generation_config_default();
    CHECK(!g.do_sample && g.temperature == 1.0f && g.top_k == 50 && g.top_p == 1.0f && g.repetition_penalty == 1.0f);
    CHECK(g.n_eos == 0 && g.max_new_tokens == -1);

    /* Qwen2.5-Instruct */
    reset_warnings();
    CHECK_OK(gparse(&g,
                    "{\n  \"bos_token_id\": 151643,\n  \"pad_token_id\": 151643,\n  \"do_sample\": true,\n"
                    "  \"eos_token_id\": [\n    151645,\n    151643\n  ],\n  \"repetition_penalty\": 1.1,\n"
                    "  \"temperature\": 0.7,\n  \"top_p\": 0.8,\n  \"top_k\": 20,\n"
                    "  \"transformers_version\": \"4.37.0\"\n}\n",
                    &err),
             &err);
    CHECK(g.do_sample && g.n_eos == 2 && g.eos_ids[0] == 151645 && g.eos_ids[1] == 151643);
    CHECK(g.repetition_penalty == 1.1f && g.temperature == 0.7f && g.top_p == 0.8f && g.top_k == 20);
    CHECK_EQ_I64(g_warnings, 0);
    /* Qwen2.5-VL: top_p 0.001, top_k 1 */
    CHECK_OK(gparse(&g,
                    "{\"bos_token_id\": 151643, \"pad_token_id\": 151643, \"do_sample\": true, "
                    "\"eos_token_id\": [151645, 151643], \"repetition_penalty\": 1.05, \"temperature\": 0.1, "
                    "\"top_p\": 0.001, \"top_k\": 1, \"transformers_version\": \"4.49.0\"}",
                    &err),
             &err);
    CHECK(g.top_k == 1 && g.top_p == 0.001f && g.temperature == 0.1f);
    /* base model: a single eos id, defaults elsewhere */
    CHECK_OK(gparse(&g, "{\"bos_token_id\": 151643, \"eos_token_id\": 151643, \"max_new_tokens\": 2048, "
                        "\"do_sample\": false, \"_from_model_config\": true}",
                    &err),
             &err);
    CHECK(g.n_eos == 1 && g.eos_ids[0] == 151643 && !g.do_sample && g.max_new_tokens == 2048 && g.top_k == 50);
    CHECK_OK(gparse(&g, "{}", &err), &err);
    CHECK(g.n_eos == 0 && g.temperature == 1.0f);
    /* greedy configs may say temperature 0 */
    CHECK_OK(gparse(&g, "{\"do_sample\": false, \"temperature\": 0.0}", &err), &err);

    static const struct {
        const char  *json;
        caprl_status want;
        const char  *needle;
    } bad[] = {
        {"{\"eos_token_id\": [1,2,3,4,5,6,7,8,9]}", CAPRL_ERR_UNSUPPORTED, "'eos_token_id'"},
        {"{\"eos_token_id\": \"x\"}", CAPRL_ERR_FORMAT, "'eos_token_id'"},
        {"{\"eos_token_id\": [1, -2]}", CAPRL_ERR_FORMAT, "'eos_token_id'"},
        {"{\"eos_token_id\": [1, 2.5]}", CAPRL_ERR_FORMAT, "'eos_token_id'"},
        {"{\"do_sample\": \"yes\"}", CAPRL_ERR_FORMAT, "'do_sample'"},
        {"{\"temperature\": -1}", CAPRL_ERR_FORMAT, "'temperature'"},
        {"{\"do_sample\": true, \"temperature\": 0}", CAPRL_ERR_FORMAT, "'temperature'"},
        {"{\"top_p\": 1.5}", CAPRL_ERR_FORMAT, "'top_p'"},
        {"{\"top_p\": -0.1}", CAPRL_ERR_FORMAT, "'top_p'"},
        {"{\"top_k\": -1}", CAPRL_ERR_FORMAT, "'top_k'"},
        {"{\"top_k\": 1.5}", CAPRL_ERR_FORMAT, "'top_k'"},
        {"{\"repetition_penalty\": 0}", CAPRL_ERR_FORMAT, "'repetition_penalty'"},
        {"{\"max_new_tokens\": 0}", CAPRL_ERR_FORMAT, "'max_new_tokens'"},
        {"{\"top_k\": 20,\n \"top_k\": 20}", CAPRL_ERR_FORMAT, "generation_config.json:2:"},
        {"[]", CAPRL_ERR_FORMAT, "generation_config.json"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        caprl_generation_config before = caprl_generation_config_default();
        g = before;
        caprl_status st = gparse(&g, bad[i].json, &err);
        CHECK_MSG(st == bad[i].want, "gen case %zu: status %d: %s", i, (int)st, err.msg);
        CHECK_MSG(strstr(err.msg, bad[i].needle) != NULL, "gen case %zu: '%s' not in '%s'", i, bad[i].needle,
                  err.msg);
        CHECK_MSG(strstr(err.msg, "generation_config.json") != NULL, "gen case %zu: %s", i, err.msg);
        CHECK(memcmp(&g, &before, sizeof g) == 0);
    }
    reset_warnings();
    CHECK_OK(gparse(&g, "{\"num_beams\": 4}", &err), &err);
    CHECK_MSG(g_warnings == 1 && strstr(g_last_warning, "'num_beams'"), "%s", g_last_warning);
}

/* ---- the wrapper's getters -------------------------------------------------------------------------------- */

static void test_json_wrapper(void) {
    caprl_error    err = {0};
    struct json_t *doc = NULL;
    const char    *text = "{\"a\": 5, \"r\": 2.5, \"s\": \"hi\", \"b\": true, \"n\": null, \"o\": {\"k\": -7},"
                          " \"arr\": [1, \"x\"]}";
    CHECK_OK(caprl_json_parse(&doc, text, strlen(text), "w.json", &err), &err);
    caprl_json_obj o, child;
    CHECK_OK(caprl_json_root(&o, doc, "w.json", &err), &err);
    int64_t     i = 0;
    int32_t     i32 = 0;
    double      d = 0;
    bool        b = false, present = true;
    const char *s = NULL;
    CHECK_OK(caprl_json_get_int(&o, "a", 0, 10, &i, &err), &err);
    CHECK(i == 5);
    CHECK_EQ_I64(caprl_json_get_int(&o, "a", 6, 10, &i, &err), CAPRL_ERR_FORMAT);
    CHECK_STR_EQ(err.msg, "w.json: field 'a': expected an integer in [6, 10], got 5");
    CHECK_EQ_I64(caprl_json_get_int(&o, "r", 0, 10, &i, &err), CAPRL_ERR_FORMAT);
    CHECK_EQ_I64(caprl_json_get_int(&o, "zz", 0, 10, &i, &err), CAPRL_ERR_FORMAT);
    CHECK_STR_EQ(err.msg, "w.json: field 'zz': missing (required)");
    CHECK_EQ_I64(caprl_json_get_int(&o, "n", 0, 10, &i, &err), CAPRL_ERR_FORMAT); /* null counts as missing */
    CHECK_OK(caprl_json_opt_i32(&o, "n", 0, 10, 7, &i32, &err), &err);
    CHECK(i32 == 7);
    CHECK_OK(caprl_json_get_number(&o, "a", &d, &err), &err);
    CHECK(d == 5.0);
    CHECK_OK(caprl_json_get_number(&o, "r", &d, &err), &err);
    CHECK(d == 2.5);
    CHECK_EQ_I64(caprl_json_get_number(&o, "s", &d, &err), CAPRL_ERR_FORMAT);
    CHECK_STR_EQ(err.msg, "w.json: field 's': expected a number, got \"hi\"");
    CHECK_OK(caprl_json_get_bool(&o, "b", &b, &err), &err);
    CHECK(b);
    CHECK_EQ_I64(caprl_json_get_bool(&o, "a", &b, &err), CAPRL_ERR_FORMAT);
    CHECK_OK(caprl_json_get_string(&o, "s", &s, &err), &err);
    CHECK_STR_EQ(s, "hi");
    CHECK_OK(caprl_json_opt_string(&o, "zz", "def", &s, &err), &err);
    CHECK_STR_EQ(s, "def");
    CHECK_OK(caprl_json_get_object(&o, "o", &child, &err), &err);
    CHECK_STR_EQ(child.path, "o");
    CHECK_EQ_I64(caprl_json_get_int(&child, "k", 1, INT32_MAX, &i, &err), CAPRL_ERR_FORMAT);
    CHECK_STR_EQ(err.msg, "w.json: field 'o.k': expected a positive integer, got -7");
    CHECK_EQ_I64(caprl_json_get_int(&child, "k", 0, 100, &i, &err), CAPRL_ERR_FORMAT);
    CHECK_STR_EQ(err.msg, "w.json: field 'o.k': expected a non-negative integer <= 100, got -7");
    CHECK_OK(caprl_json_opt_object(&o, "n", &child, &present, &err), &err);
    CHECK(!present);
    const struct json_t *arr = caprl_json_get(&o, "arr");
    CHECK(caprl_json_array_size(arr) == 2 && caprl_json_int_value(caprl_json_array_get(arr, 0), &i) && i == 1);
    CHECK_STR_EQ(caprl_json_string_value(caprl_json_array_get(arr, 1)), "x");
    CHECK(caprl_json_array_get(arr, 2) == NULL);
    char desc[8];
    CHECK_STR_EQ(caprl_json_describe(caprl_json_get(&o, "o"), desc, sizeof desc), "{\"k\"...");
    reset_warnings();
    static const char *const known[] = {"a", "r", "s", "b", "n", "o"};
    CHECK_EQ_I64(caprl_json_warn_unknown(&o, known, 6), 1);
    CHECK(strstr(g_last_warning, "'arr'") != NULL);
    caprl_json_free(doc);

    CHECK(caprl_utf8_valid("caf\xc3\xa9", 5));
    CHECK(!caprl_utf8_valid("\xc0\xaf", 2));         /* overlong */
    CHECK(!caprl_utf8_valid("\xed\xa0\x80", 3));     /* surrogate */
    CHECK(!caprl_utf8_valid("\xf4\x90\x80\x80", 4)); /* above U+10FFFF */
    CHECK(!caprl_utf8_valid("\xe2\x82", 2));         /* truncated */
    CHECK(caprl_utf8_valid("\xf0\x9f\x98\x80", 4));
}

int main(void) {
    caprl_log_set_callback(capture_log, NULL);
    test_published();
    test_bad_values();
    test_variants();
    test_unknown_keys();
    test_to_json();
    test_generation();
    test_json_wrapper();
    caprl_log_set_callback(NULL, NULL);
    return test_finish("test_config");
}
