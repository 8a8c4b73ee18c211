/* libFuzzer target: caprl_safetensors_open_buffer on arbitrary bytes.
 * Properties checked on every accepted input (a violation traps, so the fuzzer reports it):
 *   - every tensor lies inside the input, its byte count is numel * dtype size, find() returns it, and
 *     expect() with its own dtype and shape succeeds;
 *   - writing the parsed tensors back with the writer and reading the image again gives the same tensors,
 *     bit for bit, and the same metadata.
 * Rejected inputs must come with an error status and a non-empty message.
 * Build with -DCAPRL_FUZZ_MAIN for a plain replayer: fuzz_safetensors FILE... */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/safetensors.h"
#include "fmt/safetensors_impl.h"
#include "fuzz_util.h"

static void check_tensors(const caprl_safetensors *st, const uint8_t *data, size_t size) {
    for (int64_t i = 0; i < caprl_safetensors_n_tensors(st); i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(st, i);
        const uint8_t         *p = t->data;
        FUZZ_REQUIRE(p >= data + 8 && p <= data + size && t->nbytes <= (size_t)(data + size - p));
        FUZZ_REQUIRE(t->nbytes == (size_t)t->numel * caprl_dtype_size(t->dtype));
        FUZZ_REQUIRE(caprl_safetensors_find(st, t->name) == t);
        const caprl_st_tensor *e = NULL;
        FUZZ_REQUIRE(caprl_safetensors_expect(st, t->name, 1u << t->dtype, t->n_dims, t->shape, &e, NULL) ==
                         CAPRL_OK &&
                     e == t);
        if (i > 0) {
            FUZZ_REQUIRE(strcmp(caprl_safetensors_tensor(st, i - 1)->name, t->name) < 0);
        }
    }
}

static void check_rewrite(const caprl_safetensors *st) {
    caprl_st_writer *w = caprl_st_writer_init();
    for (int64_t i = 0; i < caprl_safetensors_n_tensors(st); i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(st, i);
        FUZZ_REQUIRE(caprl_st_writer_add(w, t->name, t->dtype, t->n_dims, t->shape, t->data, NULL) == CAPRL_OK);
    }
    const char *fmt = caprl_safetensors_metadata(st, "format");
    if (fmt) {
        FUZZ_REQUIRE(caprl_st_writer_set_metadata(w, "format", fmt, NULL) == CAPRL_OK);
    }
    uint8_t *img = NULL;
    size_t   n = 0;
    if (caprl_st_writer_serialize(w, &img, &n, NULL) == CAPRL_OK) {
        caprl_safetensors *back = NULL;
        FUZZ_REQUIRE(caprl_safetensors_open_buffer(&back, img, n, "rewrite", NULL) == CAPRL_OK);
        FUZZ_REQUIRE(caprl_safetensors_n_tensors(back) == caprl_safetensors_n_tensors(st));
        for (int64_t i = 0; i < caprl_safetensors_n_tensors(st); i++) {
            const caprl_st_tensor *a = caprl_safetensors_tensor(st, i), *b = caprl_safetensors_tensor(back, i);
            FUZZ_REQUIRE(strcmp(a->name, b->name) == 0 && a->dtype == b->dtype && a->n_dims == b->n_dims);
            FUZZ_REQUIRE(memcmp(a->shape, b->shape, (size_t)a->n_dims * sizeof a->shape[0]) == 0);
            FUZZ_REQUIRE(a->nbytes == b->nbytes && (a->nbytes == 0 || memcmp(a->data, b->data, a->nbytes) == 0));
        }
        const char *fmt2 = caprl_safetensors_metadata(back, "format");
        FUZZ_REQUIRE(fmt2 != NULL && strcmp(fmt2, fmt ? fmt : "pt") == 0);
        caprl_safetensors_free(back);
        free(img);
    }
    caprl_st_writer_free(w);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    caprl_log_set_level(CAPRL_LOG_ERROR);
    caprl_safetensors *st = NULL;
    caprl_error        err;
    memset(&err, 0, sizeof err);
    caprl_status s = caprl_safetensors_open_buffer(&st, data, size, "fuzz.safetensors", &err);
    if (s != CAPRL_OK) {
        FUZZ_REQUIRE(s < 0 && st == NULL && err.code == s && err.msg[0] != '\0');
        return 0;
    }
    check_tensors(st, data, size);
    check_rewrite(st);
    caprl_safetensors_free(st);
    return 0;
}
