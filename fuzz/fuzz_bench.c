/* libFuzzer target: a Prism benchmark file (the released lmm_eval_*.json array or caprl's simple JSON Lines)
 * loaded from arbitrary bytes, strictly and with skip_bad.
 * Properties (a violation traps): a failed load has an error status whose message names the file, and a zeroed
 * benchmark; a loaded one has at least one item, and every item an id, an image path, a prompt (holding the image
 * placeholder when caprl wrote it), a gold answer, the original record, a rule and a format in range; a strict load that succeeds gives
 * the same items as the skip_bad load. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/caprl.h"
#include "caprl/eval.h"
#include "fuzz_util.h"

static char g_path[FUZZ_TEMP_PATH_CAP];

static bool load(bool skip_bad, caprl_eval_bench *b) {
    caprl_eval_bench_params p = caprl_eval_bench_default_params();
    p.skip_bad = skip_bad;
    caprl_error err;
    memset(&err, 0, sizeof err);
    caprl_status s = caprl_eval_bench_load(b, g_path, &p, &err);
    if (s != CAPRL_OK) {
        FUZZ_REQUIRE(s < 0 && strstr(err.msg, g_path) != NULL);
        FUZZ_REQUIRE(b->items == NULL && b->n_items == 0);
        return false;
    }
    FUZZ_REQUIRE(b->n_items >= 1 && (skip_bad || b->n_bad == 0));
    for (int64_t i = 0; i < b->n_items; i++) {
        const caprl_eval_item *it = &b->items[i];
        FUZZ_REQUIRE(it->id && it->image && it->image_raw && it->prompt && it->answer && it->record_json);
        FUZZ_REQUIRE(it->format != CAPRL_EVAL_FORMAT_SIMPLE || strstr(it->prompt, CAPRL_PRISM_IMAGE_PLACEHOLDER));
        FUZZ_REQUIRE(it->rule >= 0 && it->rule < CAPRL_EVAL_RULE_COUNT);
        FUZZ_REQUIRE(it->format == CAPRL_EVAL_FORMAT_RELEASED || it->format == CAPRL_EVAL_FORMAT_SIMPLE);
        FUZZ_REQUIRE((it->format == CAPRL_EVAL_FORMAT_SIMPLE) == (it->question != NULL));
    }
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    caprl_log_set_callback(fuzz_quiet_log, NULL); /* skip_bad warns once per bad record */
    if (!fuzz_write_temp(g_path, "bench", "jsonl", data, size)) {
        return 0;
    }
    caprl_eval_bench strict, lenient;
    bool             ok_strict = load(false, &strict), ok_lenient = load(true, &lenient);
    if (ok_strict) {
        FUZZ_REQUIRE(ok_lenient && lenient.n_bad == 0 && lenient.n_items == strict.n_items);
        for (int64_t i = 0; i < strict.n_items; i++) {
            FUZZ_REQUIRE(strcmp(strict.items[i].record_json, lenient.items[i].record_json) == 0);
        }
    }
    caprl_eval_bench_free(&strict);
    caprl_eval_bench_free(&lenient);
    unlink(g_path);
    return 0;
}
