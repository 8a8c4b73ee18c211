/* The byte-level tokenizer of the SFT tests (tools/test_sft.c, unit/test_sft_data.c): token streams can be written
 * by hand, and models over it are tiny. */
#ifndef CAPRL_BYTE_TOKENIZER_H
#define CAPRL_BYTE_TOKENIZER_H

#include <jansson.h>
#include <stdbool.h>

#include "caprl_test.h"

/* GPT-2's bytes_to_unicode: printable bytes keep their value, the others take 256, 257, ... in byte order. */
static inline const char *byte_symbol(int b) {
    static char sym[256][4];
    static bool done;
    if (!done) {
        int n = 0;
        for (int x = 0; x < 256; x++) {
            bool printable = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF);
            int  cp = printable ? x : 256 + n++;
            if (cp < 0x80) {
                sym[x][0] = (char)cp;
            } else {
                sym[x][0] = (char)(0xC0 | (cp >> 6));
                sym[x][1] = (char)(0x80 | (cp & 0x3F));
            }
        }
        done = true;
    }
    return sym[b];
}

/* A byte-level tokenizer.json in Qwen2's layout without merges: ids 0..255 are the bytes, then <|endoftext|>,
 * <|im_start|>, <|im_end|>, <|vision_start|>, <|image_pad|>, <|vision_end|> (256..261). Every character is a
 * token, so the vocabulary and the model stay small: checkpoints of a few hundred KB keep the many runs fast. */
static inline void write_byte_tokenizer(const char *path) {
    json_t *vocab = json_object();
    for (int b = 0; b < 256; b++) {
        json_object_set_new(vocab, byte_symbol(b), json_integer(b));
    }
    static const char *const specials[] = {"<|endoftext|>",    "<|im_start|>",  "<|im_end|>",
                                           "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"};
    json_t                  *added = json_array();
    for (int i = 0; i < 6; i++) {
        json_array_append_new(added, json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", 256 + i, "content",
                                               specials[i], "single_word", 0, "lstrip", 0, "rstrip", 0, "normalized",
                                               0, "special", 1));
    }
    static const char regex[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                                "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    json_t *bl = json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 0,
                           "use_regex", 0);
    json_t *pre = json_pack("{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, O]}", "type", "Sequence", "pretokenizers", "type",
                            "Split", "pattern", "Regex", regex, "behavior", "Isolated", "invert", 0, bl);
    json_t *model = json_pack("{s:s, s:n, s:n, s:s, s:s, s:b, s:b, s:b, s:o, s:[]}", "type", "BPE", "dropout",
                              "unk_token", "continuing_subword_prefix", "", "end_of_word_suffix", "", "fuse_unk", 0,
                              "byte_fallback", 0, "ignore_merges", 0, "vocab", vocab, "merges");
    json_t *tok = json_pack("{s:s, s:n, s:n, s:o, s:{s:s}, s:o, s:O, s:O, s:o}", "version", "1.0", "truncation",
                            "padding", "added_tokens", added, "normalizer", "type", "NFC", "pre_tokenizer", pre,
                            "post_processor", bl, "decoder", bl, "model", model);
    CHECK(tok != NULL && json_dump_file(tok, path, JSON_COMPACT) == 0);
    json_decref(tok);
    json_decref(bl);
}

#endif /* CAPRL_BYTE_TOKENIZER_H */
