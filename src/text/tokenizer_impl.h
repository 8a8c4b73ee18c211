/* Tokenizer internals shared with the tests: the Qwen2 pre-split matcher (spec/qwen.md §5.3) and UTF-8 helpers.
 * All functions are pure and thread-safe. */
#ifndef CAPRL_TOKENIZER_IMPL_H
#define CAPRL_TOKENIZER_IMPL_H

#include "caprl/caprl.h"

/* Character classes of the pre-split regex; a code point with none of L, N, S is "other" (punctuation, symbols,
 * marks, controls, format and unassigned characters). CRLF is set together with S for U+000D and U+000A. */
enum {
    CAPRL_PRETOK_L    = 1, /* \p{L}: Lu Ll Lt Lm Lo */
    CAPRL_PRETOK_N    = 2, /* \p{N}: Nd Nl No */
    CAPRL_PRETOK_S    = 4, /* \s: Unicode White_Space */
    CAPRL_PRETOK_CRLF = 8, /* [\r\n] */
};

/* Class bits of one code point (utf8proc's Unicode tables for L and N). */
uint32_t caprl_pretok_class(uint32_t cp);

/* End offset (> i) of the pre-token that starts at byte i of s[0..n) (valid UTF-8, i < n on a character
 * boundary): the leftmost-first match of the Qwen2 regex at i. */
size_t caprl_pretok_next(const uint8_t *s, size_t n, size_t i);

/* Splits s[0..n) (valid UTF-8) into pre-tokens: writes the end offset of each piece to ends[0..cap) and returns
 * the number of pieces (which may exceed cap, snprintf-style). */
size_t caprl_pretok_split(const uint8_t *s, size_t n, size_t *ends, size_t cap);

/* Offset of the first byte of s[0..n) that does not belong to a well-formed UTF-8 sequence (Unicode Table 3-7:
 * no overlongs, surrogates or values above U+10FFFF), or n if all of s is valid. */
size_t caprl_utf8_validate(const uint8_t *s, size_t n);

/* Converts s[0..n) to valid UTF-8, replacing each maximal subpart of an ill-formed sequence by U+FFFD (as Python's
 * bytes.decode("utf-8", "replace") and WHATWG's decoder do). snprintf contract: writes at most cap-1 bytes and a
 * NUL when cap > 0; returns the full length. */
size_t caprl_utf8_repair(const uint8_t *s, size_t n, char *out, size_t cap);

/* UTF-8 of code point cp (at most U+10FFFF) into out[0..4); returns its length. */
size_t caprl_utf8_put(uint32_t cp, uint8_t *out);

/* The byte-level alphabet (spec/qwen.md §5.4): the code point that stands for byte b in tokens. */
uint32_t caprl_byte_level_cp(uint32_t b);

/* ---- layout shared by tokenizer.c (loading) and tok_codec.c (encoding, decoding) ---------------------------- */

enum { CAPRL_TOK_VOCAB = 1, CAPRL_TOK_ADDED = 2, CAPRL_TOK_SPECIAL = 4 };

/* Merge table slot: the pair (left id, right id) packed as left << 32 | right; UINT64_MAX marks an empty slot. */
typedef struct caprl_merge_slot {
    uint64_t key;
    uint32_t rank;   /* index in model.merges: lower merges first */
    int32_t  result; /* id of left + right */
} caprl_merge_slot;

/* String -> id slot (vocab and added tokens); id -1 marks an empty slot. */
typedef struct caprl_vocab_slot {
    uint32_t hash;
    int32_t  id;
} caprl_vocab_slot;

/* One added token as matched in text: its content (raw) or the NFC of its content ("normalized": true). */
typedef struct caprl_added_pattern {
    const char *text; /* points into caprl_tokenizer.strs or .norm_strs */
    uint32_t    len;
    int32_t     id;
    bool        special;
} caprl_added_pattern;

/* Literal leftmost-longest matcher: the patterns starting with byte b are pat[first[b] .. first[b + 1]), longest
 * first. */
typedef struct caprl_added_matcher {
    caprl_added_pattern *pat; /* (n) */
    int32_t              n;
    uint32_t             first[257];
} caprl_added_matcher;

struct caprl_tokenizer {
    int32_t   n_tokens;
    uint8_t  *flags;     /* (n_tokens) CAPRL_TOK_* ; 0 for an id with no token */
    char     *strs;      /* NUL-terminated token strings as stored in tokenizer.json */
    uint32_t *str_off;   /* (n_tokens) offset into strs */
    uint8_t  *bytes;     /* decoded bytes of every token (byte-level inverse, or the literal text) */
    uint32_t *bytes_off; /* (n_tokens + 1) token i's bytes are bytes[bytes_off[i] .. bytes_off[i + 1]) */

    caprl_vocab_slot *vocab_map; /* open addressing, linear probing */
    uint32_t          vocab_mask;
    caprl_merge_slot *merge_map; /* open addressing, linear probing */
    uint32_t          merge_mask;

    int32_t byte_id[256]; /* vocab id of the byte-level symbol of each byte */
    bool    nfc;          /* normalizer NFC (else none) */

    caprl_added_matcher raw;       /* added tokens matched on the raw text ("normalized": false) */
    caprl_added_matcher norm;      /* added tokens matched after NFC ("normalized": true) */
    char               *norm_strs; /* NFC contents of the "normalized" added tokens */
};

/* Merge lookup: the slot of pair (a, b), or NULL. */
static inline const caprl_merge_slot *caprl_merge_find(const struct caprl_tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint64_t h   = key * 0x9E3779B97F4A7C15ull;
    uint32_t i   = (uint32_t)(h >> 32) & t->merge_mask;
    for (;;) {
        const caprl_merge_slot *slot = &t->merge_map[i];
        if (slot->key == key) {
            return slot;
        }
        if (slot->key == UINT64_MAX) {
            return NULL;
        }
        i = (i + 1) & t->merge_mask;
    }
}

#endif /* CAPRL_TOKENIZER_IMPL_H */
