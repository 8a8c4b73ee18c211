/* libFuzzer target: Prism scoring of a reader's output (untrusted model text) against a gold answer. The input is
 * split at its first NUL byte: the prediction before it, the gold after it (the whole input is the prediction when
 * there is none, scored against "A").
 * Properties (a violation traps): every rule gives a score in [0, 1] (never NaN) and the same score twice; the
 * trace's captured answer is NUL-terminated inside its buffer; the parsed-answer column is a string; the JSON gold
 * conversion returns without fault. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/caprl.h"
#include "caprl/eval.h"
#include "fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *buf = malloc(size + 2);
    memcpy(buf, data, size);
    buf[size] = '\0';
    buf[size + 1] = '\0';
    size_t      cut = strlen(buf);
    const char *prediction = buf, *gold = cut < size ? buf + cut + 1 : "A";
    for (int32_t rule = 0; rule < CAPRL_EVAL_RULE_COUNT; rule++) {
        caprl_eval_trace t;
        memset(&t, 0x55, sizeof t);
        double s = caprl_eval_score(prediction, gold, rule, &t);
        FUZZ_REQUIRE(s >= 0.0 && s <= 1.0);
        FUZZ_REQUIRE(memchr(t.answer, '\0', sizeof t.answer) != NULL);
        FUZZ_REQUIRE(caprl_eval_score(prediction, gold, rule, NULL) == s);
    }
    char *parsed = caprl_eval_parsed_answer(prediction);
    FUZZ_REQUIRE(parsed != NULL);
    caprl_free(parsed);
    caprl_free(caprl_eval_answer_text(gold));
    free(buf);
    return 0;
}
