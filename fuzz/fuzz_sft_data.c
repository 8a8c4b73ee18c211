/* libFuzzer target: an SFT data file (chat records with string or typed-part contents, raw prompt/completion
 * records) loaded from arbitrary bytes with the demo's reader (a text model and its tokenizer), strictly and with
 * skip_bad.
 * Properties (a violation traps): a failed load is CAPRL_ERR_FORMAT with a message that names the file; a loaded set
 * has at least one record, each of 2..max_seq_len tokens inside the vocabulary, 1..n-1 scored (loss) positions
 * after the first token, no image, and totals that add up; a strict load that succeeds skips nothing and gives the
 * same token streams as the skip_bad load. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/data.h"
#include "caprl/model.h"
#include "fuzz_util.h"

#ifndef CAPRL_SOURCE_DIR
#    define CAPRL_SOURCE_DIR "."
#endif

enum { MAX_SEQ = 256 };

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static caprl_model *g_model;
static char         g_path[FUZZ_TEMP_PATH_CAP];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    caprl_log_set_callback(fuzz_quiet_log, NULL);
    caprl_error err = {0};
    if (caprl_model_load(&g_model, CAPRL_SOURCE_DIR "/demo/assets/reader", NULL, &err) != CAPRL_OK) {
        fprintf(stderr, "fuzz_sft_data: %s\n", err.msg);
        abort();
    }
    return 0;
}

static caprl_sft_data *load(bool skip_bad) {
    caprl_sft_params p = caprl_sft_default_params();
    p.max_seq_len = MAX_SEQ;
    p.skip_bad = skip_bad;
    caprl_sft_data *d = NULL;
    caprl_error     err = {0};
    caprl_status    st = caprl_sft_data_load(&d, g_path, g_model, &p, &err);
    if (st != CAPRL_OK) {
        FUZZ_REQUIRE(st == CAPRL_ERR_FORMAT && d == NULL && strstr(err.msg, g_path) != NULL);
        return NULL;
    }
    FUZZ_REQUIRE(d != NULL && caprl_sft_data_size(d) >= 1 && (skip_bad || caprl_sft_data_n_skipped(d) == 0));
    int64_t tokens = 0, loss = 0;
    for (int64_t i = 0; i < caprl_sft_data_size(d); i++) {
        const caprl_sft_record *r = caprl_sft_data_record(d, i);
        const uint8_t          *mask = NULL;
        const int32_t          *ids = caprl_sft_data_tokens(d, i, &mask);
        FUZZ_REQUIRE(r->n_tokens >= 2 && r->n_tokens <= MAX_SEQ && r->n_patches == 0 && r->line >= 1);
        int32_t n_loss = 0; /* scored positions: the first token, with nothing before it, never is */
        for (int32_t t = 0; t < r->n_tokens; t++) {
            FUZZ_REQUIRE(ids[t] >= 0 && ids[t] < caprl_model_config(g_model)->vocab_size && mask[t] <= 1);
            n_loss += t > 0 ? mask[t] : 0;
        }
        FUZZ_REQUIRE(n_loss == r->n_loss && n_loss >= 1 && n_loss < r->n_tokens);
        tokens += r->n_tokens;
        loss += n_loss;
    }
    FUZZ_REQUIRE(tokens == caprl_sft_data_n_tokens(d) && loss == caprl_sft_data_n_loss(d));
    return d;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 1 << 16 || !fuzz_write_temp(g_path, "sft", "jsonl", data, size)) {
        return 0;
    }
    caprl_sft_data *strict = load(false), *lenient = load(true);
    FUZZ_REQUIRE(!strict || lenient);
    if (strict && lenient) {
        FUZZ_REQUIRE(caprl_sft_data_size(strict) == caprl_sft_data_size(lenient));
        for (int64_t i = 0; i < caprl_sft_data_size(strict); i++) {
            const int32_t *a = caprl_sft_data_tokens(strict, i, NULL), *b = caprl_sft_data_tokens(lenient, i, NULL);
            int32_t        n = caprl_sft_data_record(strict, i)->n_tokens;
            FUZZ_REQUIRE(n == caprl_sft_data_record(lenient, i)->n_tokens && memcmp(a, b, (size_t)n * 4) == 0);
        }
    }
    caprl_sft_data_free(strict);
    caprl_sft_data_free(lenient);
    remove(g_path);
    return 0;
}
