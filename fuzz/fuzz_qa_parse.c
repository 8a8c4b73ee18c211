/* libFuzzer target: caprl_qa_parse_response on arbitrary bytes (a QA generator's raw output is untrusted text).
 * Properties (a violation traps): any input parses (the only error is out of memory); every kept question passes
 * caprl_qa_check_question with its gold letter and has at most max_options options (one more with the appended
 * "Can not answer" line); at most CAPRL_QA_PARSE_MAX_ITEMS are kept; every drop has a named reason and a line
 * inside the response (LF, CRLF or CR ending a line); the same bytes give the same result. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/qa.h"
#include "fuzz_util.h"

static bool same_result(const caprl_qa_parse_result *a, const caprl_qa_parse_result *b) {
    if (a->n_items != b->n_items || a->n_drops != b->n_drops || a->gaps != b->gaps) {
        return false;
    }
    for (int32_t i = 0; i < a->n_items; i++) {
        if (a->items[i].gold != b->items[i].gold || strcmp(a->items[i].question, b->items[i].question) != 0) {
            return false;
        }
    }
    return a->n_drops == 0 || memcmp(a->drops, b->drops, (size_t)a->n_drops * sizeof *a->drops) == 0;
}

static void check(const uint8_t *data, size_t size, bool append_cannot_answer) {
    caprl_qa_parse_params p = caprl_qa_parse_default_params();
    p.append_cannot_answer = append_cannot_answer;
    caprl_error           err;
    caprl_qa_parse_result r, again;
    memset(&err, 0, sizeof err);
    FUZZ_REQUIRE(caprl_qa_parse_response((const char *)data, size, &p, &r, &err) == CAPRL_OK);
    FUZZ_REQUIRE(r.n_items >= 0 && r.n_items <= CAPRL_QA_PARSE_MAX_ITEMS && r.n_drops >= 0);
    int64_t lines = 1; /* LF, CRLF and a lone CR each end a line */
    for (size_t i = 0; i < size; i++) {
        lines += data[i] == '\n' || (data[i] == '\r' && (i + 1 == size || data[i + 1] != '\n'));
    }
    for (int32_t i = 0; i < r.n_items; i++) {
        int32_t n_options = 0;
        FUZZ_REQUIRE(caprl_qa_check_question(r.items[i].question, r.items[i].gold, &n_options, &err) == CAPRL_OK);
        FUZZ_REQUIRE(n_options >= 2 && n_options <= p.max_options + (append_cannot_answer ? 1 : 0));
        FUZZ_REQUIRE((int64_t)strlen(r.items[i].question) <= p.max_question_bytes);
    }
    for (int32_t i = 0; i < r.n_drops; i++) {
        FUZZ_REQUIRE(strcmp(caprl_qa_drop_reason_name(r.drops[i].reason), "unknown") != 0);
        FUZZ_REQUIRE(r.drops[i].line >= 1 && r.drops[i].line <= lines);
    }
    FUZZ_REQUIRE(caprl_qa_parse_response((const char *)data, size, &p, &again, &err) == CAPRL_OK);
    FUZZ_REQUIRE(same_result(&r, &again));
    caprl_qa_parse_result_free(&again);
    caprl_qa_parse_result_free(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    check(data, size, false);
    check(data, size, true);
    return 0;
}
