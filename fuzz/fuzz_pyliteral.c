/* libFuzzer target: the restricted Python-literal reader (released CapRL training records keep their QA list as a
 * Python literal, which caprl reads without evaluating it) on arbitrary bytes.
 * Properties (a violation traps): a rejected input has CAPRL_ERR_FORMAT, a message starting "offset N:" with N
 * inside the input, and a zeroed result; an accepted one is a well-formed tree (kinds in range, depth within
 * CAPRL_PYLIT_MAX_DEPTH, strings NUL-terminated at their length, numbers non-empty); the same bytes give the same
 * tree. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/data_impl.h"
#include "fuzz_util.h"

static void check_tree(const caprl_pylit *v, int depth) {
    FUZZ_REQUIRE(depth <= CAPRL_PYLIT_MAX_DEPTH);
    switch (v->kind) {
        case CAPRL_PYLIT_STR: FUZZ_REQUIRE(v->str != NULL && v->str[v->len] == '\0'); break;
        case CAPRL_PYLIT_NUM: FUZZ_REQUIRE(v->str != NULL && v->len > 0 && strlen(v->str) == v->len); break;
        case CAPRL_PYLIT_LIST:
        case CAPRL_PYLIT_TUPLE:
            FUZZ_REQUIRE(v->n_items >= 0 && (v->n_items == 0 || v->items != NULL));
            for (int32_t i = 0; i < v->n_items; i++) {
                check_tree(&v->items[i], depth + 1);
            }
            break;
        default: FUZZ_REQUIRE(0 && "kind out of range");
    }
}

static bool same_tree(const caprl_pylit *a, const caprl_pylit *b) {
    if (a->kind != b->kind || a->n_items != b->n_items || a->len != b->len) {
        return false;
    }
    if ((a->kind == CAPRL_PYLIT_STR || a->kind == CAPRL_PYLIT_NUM) && memcmp(a->str, b->str, a->len) != 0) {
        return false;
    }
    for (int32_t i = 0; i < a->n_items; i++) {
        if (!same_tree(&a->items[i], &b->items[i])) {
            return false;
        }
    }
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    caprl_error  err;
    caprl_pylit  v, again;
    memset(&err, 0, sizeof err);
    caprl_status s = caprl_pylit_parse((const char *)data, size, &v, &err);
    if (s != CAPRL_OK) {
        unsigned long long offset = 0;
        FUZZ_REQUIRE(s == CAPRL_ERR_FORMAT && err.code == s);
        FUZZ_REQUIRE(sscanf(err.msg, "offset %llu:", &offset) == 1 && offset <= size);
        FUZZ_REQUIRE(v.str == NULL && v.items == NULL && v.n_items == 0);
        return 0;
    }
    check_tree(&v, 0);
    FUZZ_REQUIRE(caprl_pylit_parse((const char *)data, size, &again, &err) == CAPRL_OK && same_tree(&v, &again));
    caprl_pylit_free(&again);
    caprl_pylit_free(&v);
    return 0;
}
