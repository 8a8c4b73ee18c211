/* libFuzzer target: a QA file (caprl QA JSON Lines or released CapRL training records with their Python-literal QA
 * list) loaded from arbitrary bytes, strictly and with skip_bad.
 * Properties (a violation traps): a failed load has an error status whose message names the file, and a zeroed
 * set; a loaded set has at least one image, every image at least one question, and every question passes
 * caprl_qa_check_question with its gold letter; a strict load that succeeds skips nothing and gives the same set as
 * the skip_bad load. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/caprl.h"
#include "caprl/qa.h"
#include "fuzz_util.h"

static char g_path[FUZZ_TEMP_PATH_CAP];

static bool load(bool skip_bad, caprl_qa_set *set) {
    caprl_error err;
    memset(&err, 0, sizeof err);
    caprl_status s = caprl_qa_set_load(set, g_path, skip_bad, &err);
    if (s != CAPRL_OK) {
        FUZZ_REQUIRE(s < 0 && strstr(err.msg, g_path) != NULL);
        FUZZ_REQUIRE(set->images == NULL && set->n_images == 0);
        return false;
    }
    FUZZ_REQUIRE(set->n_images >= 1 && (skip_bad || set->n_bad == 0));
    for (int64_t i = 0; i < set->n_images; i++) {
        const caprl_qa_image *im = &set->images[i];
        FUZZ_REQUIRE(im->n_qa >= 1 && im->id != NULL && im->image != NULL && im->line >= 1);
        for (int32_t k = 0; k < im->n_qa; k++) {
            FUZZ_REQUIRE(caprl_qa_check_question(im->qa[k].question, im->qa[k].gold, NULL, &err) == CAPRL_OK);
        }
    }
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    caprl_log_set_callback(fuzz_quiet_log, NULL); /* skip_bad warns once per bad record */
    if (!fuzz_write_temp(g_path, "qa", "jsonl", data, size)) {
        return 0;
    }
    caprl_qa_set strict, lenient;
    bool         ok_strict = load(false, &strict), ok_lenient = load(true, &lenient);
    if (ok_strict) {
        FUZZ_REQUIRE(ok_lenient && lenient.n_bad == 0 && lenient.n_images == strict.n_images);
        FUZZ_REQUIRE(caprl_qa_set_n_questions(&lenient) == caprl_qa_set_n_questions(&strict));
    }
    caprl_qa_set_free(&strict);
    caprl_qa_set_free(&lenient);
    unlink(g_path);
    return 0;
}
