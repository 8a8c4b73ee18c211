/* libFuzzer target: encode and decode arbitrary bytes with the real Qwen2 tokenizer. The first input byte picks
 * parse_special / skip_special; the rest is the text, then reinterpreted as token ids. Invariants checked (abort on
 * violation): invalid UTF-8 is rejected and valid UTF-8 accepted; the count contract of encode holds; ASCII text
 * round-trips exactly (NFC is the identity on ASCII and added tokens decode to their literal text); decode output
 * is valid UTF-8; the pre-split pieces tile the text.
 * The tokenizer comes from $CAPRL_FUZZ_TOKENIZER, else from ../shared next to the source tree. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/tokenizer.h"
#include "text/tokenizer_impl.h"

#ifndef CAPRL_SOURCE_DIR
#    define CAPRL_SOURCE_DIR "."
#endif

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static caprl_tokenizer *g_tok;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *path = getenv("CAPRL_FUZZ_TOKENIZER");
    if (path == NULL) {
        path = CAPRL_SOURCE_DIR "/../shared/data/qwen-tokenizer/tokenizer.json";
    }
    caprl_error err = {0};
    if (caprl_tokenizer_load(&g_tok, path, &err) != CAPRL_OK) {
        fprintf(stderr, "fuzz_tokenizer: %s (set CAPRL_FUZZ_TOKENIZER)\n", err.msg);
        abort();
    }
    return 0;
}

static void check_pieces(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t j = caprl_pretok_next(s, n, i);
        if (j <= i || j > n) {
            abort();
        }
        i = j;
    }
}

static void check_decode(const int32_t *ids, int64_t n, bool skip) {
    size_t      len = 0;
    caprl_error err = {0};
    if (caprl_tokenizer_decode(g_tok, ids, n, skip, NULL, 0, &len, &err) != CAPRL_OK) {
        return; /* unknown ids */
    }
    char *buf = malloc(len + 1);
    if (caprl_tokenizer_decode(g_tok, ids, n, skip, buf, len + 1, &len, &err) != CAPRL_OK ||
        caprl_utf8_validate((const uint8_t *)buf, len) != len) {
        abort();
    }
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0 || size > 1 << 16) {
        return 0;
    }
    bool           parse_special = data[0] & 1, skip = (data[0] & 2) != 0;
    const uint8_t *text          = data + 1;
    size_t         n             = size - 1;
    bool           valid         = caprl_utf8_validate(text, n) == n;
    int64_t        count         = -1;
    caprl_error    err           = {0};
    caprl_status   st = caprl_tokenizer_encode(g_tok, (const char *)text, n, parse_special, NULL, 0, &count, &err);
    if (valid != (st == CAPRL_OK)) {
        abort();
    }
    if (valid) {
        check_pieces(text, n);
        int32_t *ids = malloc(((size_t)count + 1) * sizeof *ids);
        int64_t  again = -1;
        if (caprl_tokenizer_encode(g_tok, (const char *)text, n, parse_special, ids, count, &again, &err) != CAPRL_OK ||
            again != count) {
            abort();
        }
        bool ascii = true;
        for (size_t i = 0; i < n; i++) {
            ascii &= text[i] < 0x80;
        }
        if (ascii) {
            char  *out = malloc(n + 1);
            size_t len = 0;
            if (caprl_tokenizer_decode(g_tok, ids, count, false, out, n + 1, &len, &err) != CAPRL_OK || len != n ||
                memcmp(out, text, n) != 0) {
                abort();
            }
            free(out);
        }
        check_decode(ids, count, skip);
        free(ids);
    }
    /* The same bytes as token ids, most of them valid. */
    size_t   n_ids = n / 4;
    int32_t *raw   = malloc((n_ids + 1) * sizeof *raw);
    int32_t  nt    = caprl_tokenizer_n_tokens(g_tok);
    for (size_t i = 0; i < n_ids; i++) {
        uint32_t v;
        memcpy(&v, text + 4 * i, 4);
        raw[i] = (v & 0x80000000u) ? (int32_t)v : (int32_t)(v % (uint32_t)(nt + 8));
        uint8_t b[64];
        (void)caprl_tokenizer_token_bytes(g_tok, raw[i], skip, b, sizeof b);
    }
    check_decode(raw, (int64_t)n_ids, skip);
    free(raw);
    return 0;
}
