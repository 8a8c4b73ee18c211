/* libFuzzer target: caprl_tokenizer_load_buffer on arbitrary (small) tokenizer.json text; when a file loads, a few
 * fixed strings are encoded and decoded with it. Any crash, leak or sanitizer report is a bug: every malformed
 * input must come back as an error status. */
#include <stdlib.h>
#include <string.h>

#include "caprl/tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 1 << 20) {
        return 0;
    }
    caprl_tokenizer *tok = NULL;
    caprl_error      err = {0};
    if (caprl_tokenizer_load_buffer(&tok, (const char *)data, size, "fuzz.json", &err) != CAPRL_OK) {
        if (tok != NULL || err.msg[0] == '\0') {
            abort();
        }
        return 0;
    }
    static const char *const texts[] = {"hello world", "aaa <|end|>!! <x> caf\xC3\xA9 e\xCC\x81\xC3\xA9",
                                        "  \n\n 12 'll"};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        int32_t ids[256];
        int64_t n = 0;
        if (caprl_tokenizer_encode(tok, texts[i], strlen(texts[i]), i != 1, ids, 256, &n, &err) != CAPRL_OK) {
            abort(); /* valid UTF-8 always encodes */
        }
        char   out[1024];
        size_t len = 0;
        if (caprl_tokenizer_decode(tok, ids, n < 256 ? n : 256, i == 2, out, sizeof out, &len, &err) != CAPRL_OK) {
            abort();
        }
    }
    for (int32_t id = -1; id < 300; id++) {
        (void)caprl_tokenizer_token_str(tok, id);
        (void)caprl_tokenizer_is_special(tok, id);
        uint8_t b[8];
        (void)caprl_tokenizer_token_bytes(tok, id, false, b, sizeof b);
    }
    caprl_tokenizer_free(tok);
    return 0;
}
