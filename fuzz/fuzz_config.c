/* libFuzzer target: caprl_text_config_parse and caprl_generation_config_parse on arbitrary bytes.
 * Properties (a violation traps): a rejected input has an error status and a message naming the file; an
 * accepted config.json converts back with caprl_text_config_to_json, and that text parses to the same values
 * without warnings.
 * Build with -DCAPRL_FUZZ_MAIN for a plain replayer: fuzz_config FILE... */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/model.h"
#include "caprl/tensor.h"
#include "fuzz_util.h"

static int g_warnings;

static void count_log(int32_t level, const char *msg, void *ud) {
    (void)msg;
    (void)ud;
    if (level == CAPRL_LOG_WARN) {
        g_warnings++;
    }
}

static bool same_config(const caprl_text_config *a, const caprl_text_config *b) {
    return a->vocab_size == b->vocab_size && a->hidden_size == b->hidden_size &&
           a->intermediate_size == b->intermediate_size && a->n_layers == b->n_layers && a->n_heads == b->n_heads &&
           a->n_kv_heads == b->n_kv_heads && a->head_dim == b->head_dim &&
           a->max_position_embeddings == b->max_position_embeddings && a->rms_norm_eps == b->rms_norm_eps &&
           a->rope_theta == b->rope_theta && a->tie_word_embeddings == b->tie_word_embeddings &&
           a->bos_token_id == b->bos_token_id && a->eos_token_id == b->eos_token_id;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    caprl_log_set_callback(count_log, NULL);
    caprl_error       err;
    caprl_text_config cfg;
    memset(&err, 0, sizeof err);
    caprl_status s = caprl_text_config_parse(&cfg, (const char *)data, size, "fuzz-config.json", &err);
    if (s != CAPRL_OK) {
        FUZZ_REQUIRE(s < 0 && err.code == s && strstr(err.msg, "fuzz-config.json") != NULL);
    } else {
        char *json = NULL;
        FUZZ_REQUIRE(caprl_text_config_to_json(&cfg, CAPRL_DTYPE_BF16, &json, &err) == CAPRL_OK);
        caprl_text_config back;
        g_warnings = 0;
        FUZZ_REQUIRE(caprl_text_config_parse(&back, json, strlen(json), "roundtrip", &err) == CAPRL_OK);
        FUZZ_REQUIRE(same_config(&cfg, &back) && back.torch_dtype == CAPRL_DTYPE_BF16 && g_warnings == 0);
        free(json);
    }
    caprl_generation_config gc;
    s = caprl_generation_config_parse(&gc, (const char *)data, size, "fuzz-generation.json", &err);
    if (s != CAPRL_OK) {
        FUZZ_REQUIRE(s < 0 && strstr(err.msg, "fuzz-generation.json") != NULL);
    } else {
        FUZZ_REQUIRE(gc.n_eos >= 0 && gc.n_eos <= CAPRL_MAX_EOS && gc.top_p >= 0.0f && gc.top_p <= 1.0f);
        FUZZ_REQUIRE(gc.repetition_penalty > 0.0f && gc.temperature >= 0.0f && gc.top_k >= 0);
    }
    return 0;
}
