/* The Qwen2 pre-split regex (spec/qwen.md §5.3) as a hand-written matcher:
 *
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 *
 * Each alternative is resolved in regex order with the backtracking outcome worked out in closed form, so a match
 * costs one forward scan. Every character starts some alternative, so the pieces tile the input. Classes come from
 * utf8proc (L, N) and the White_Space list (\s); tests/unit/test_pretok.c checks both and the whole matcher
 * against PCRE2. Pure functions: no state, thread-safe. Input must be valid UTF-8 (the encoder validates it). */
#include <utf8proc.h>

#include "text/tokenizer_impl.h"

enum { L = CAPRL_PRETOK_L, N = CAPRL_PRETOK_N, S = CAPRL_PRETOK_S, NL = CAPRL_PRETOK_CRLF };

/* ASCII classes: the hot path for English text and code. */
static const uint8_t k_ascii_class[128] = {
    /* 0x00 */ 0, 0, 0, 0, 0, 0, 0, 0, 0, S, S | NL, S, S, S | NL, 0, 0,
    /* 0x10 */ 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    /* 0x20 */ S, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    /* 0x30 */ N, N, N, N, N, N, N, N, N, N, 0, 0, 0, 0, 0, 0,
    /* 0x40 */ 0, L, L, L, L, L, L, L, L, L, L, L, L, L, L, L,
    /* 0x50 */ L, L, L, L, L, L, L, L, L, L, L, 0, 0, 0, 0, 0,
    /* 0x60 */ 0, L, L, L, L, L, L, L, L, L, L, L, L, L, L, L,
    /* 0x70 */ L, L, L, L, L, L, L, L, L, L, L, 0, 0, 0, 0, 0,
};

/* Letters and numbers of Unicode 15.0 (utf8proc 2.8) that Unicode 14.0 leaves unassigned: Hugging Face tokenizers
 * match \p{L} and \p{N} with Oniguruma 6.9.8, whose tables are 14.0 (scripts/gen_unicode14.py writes this). */
static const uint32_t k_not_in_unicode14[][2] = {
    {0x1123F, 0x11240},
    {0x11F02, 0x11F02},
    {0x11F04, 0x11F10},
    {0x11F12, 0x11F33},
    {0x11F50, 0x11F59},
    {0x1342F, 0x1342F},
    {0x13441, 0x13446},
    {0x1B132, 0x1B132},
    {0x1B155, 0x1B155},
    {0x1D2C0, 0x1D2D3},
    {0x1DF25, 0x1DF2A},
    {0x1E030, 0x1E06D},
    {0x1E4D0, 0x1E4EB},
    {0x1E4F0, 0x1E4F9},
    {0x2B739, 0x2B739},
    {0x31350, 0x323AF},
};

uint32_t caprl_pretok_class(uint32_t cp) {
    if (cp < 0x80) {
        return k_ascii_class[cp];
    }
    /* White_Space outside ASCII (Unicode PropList.txt). PCRE2's \s with UCP would add U+180E, which left
     * White_Space in Unicode 6.3; Oniguruma, which Hugging Face uses, follows White_Space. */
    switch (cp) {
    case 0x85: case 0xA0: case 0x1680: case 0x2000: case 0x2001: case 0x2002: case 0x2003: case 0x2004:
    case 0x2005: case 0x2006: case 0x2007: case 0x2008: case 0x2009: case 0x200A: case 0x2028: case 0x2029:
    case 0x202F: case 0x205F: case 0x3000:
        return S;
    default:
        break;
    }
    for (size_t i = 0; cp >= 0x11000 && i < sizeof k_not_in_unicode14 / sizeof k_not_in_unicode14[0]; i++) {
        if (cp >= k_not_in_unicode14[i][0] && cp <= k_not_in_unicode14[i][1]) {
            return 0;
        }
    }
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT: case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
        return L;
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO:
        return N;
    default:
        return 0;
    }
}

/* Decodes the (valid) UTF-8 character at s[i] and returns its class; *len = its byte length. */
static inline uint32_t class_at(const uint8_t *s, size_t i, size_t *len) {
    uint8_t b = s[i];
    if (b < 0x80) {
        *len = 1;
        return k_ascii_class[b];
    }
    uint32_t cp;
    if (b < 0xE0) {
        cp = ((uint32_t)(b & 0x1F) << 6) | (s[i + 1] & 0x3Fu);
        *len = 2;
    } else if (b < 0xF0) {
        cp = ((uint32_t)(b & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3Fu);
        *len = 3;
    } else {
        cp = ((uint32_t)(b & 0x07) << 18) | ((uint32_t)(s[i + 1] & 0x3F) << 12) | ((uint32_t)(s[i + 2] & 0x3F) << 6) |
             (s[i + 3] & 0x3Fu);
        *len = 4;
    }
    return caprl_pretok_class(cp);
}

/* End of the run of characters from i whose class intersects `want` (want_none: whose class has none of mask). */
static size_t run_end(const uint8_t *s, size_t n, size_t i, uint32_t mask, bool want_none) {
    while (i < n) {
        size_t   len;
        uint32_t c = class_at(s, i, &len);
        if (want_none ? (c & mask) != 0 : (c & mask) == 0) {
            break;
        }
        i += len;
    }
    return i;
}

static size_t newlines_end(const uint8_t *s, size_t n, size_t i) {
    while (i < n && (s[i] == '\r' || s[i] == '\n')) {
        i++;
    }
    return i;
}

/* Alternative 1 after the apostrophe at j-1: end of 's|'t|'re|'ve|'m|'ll|'d (case-insensitive), or 0. Case folding
 * is Unicode's, as in Oniguruma and PCRE2: U+017F LATIN SMALL LETTER LONG S folds to 's'. No other character folds
 * to one of these letters. */
static size_t contraction_end(const uint8_t *s, size_t n, size_t j) {
    uint8_t b = s[j];
    if (b == 0xC5 && j + 1 < n && s[j + 1] == 0xBF) {
        return j + 2;
    }
    if (b >= 0x80) {
        return 0;
    }
    /* b | 0x20 lowers an ASCII letter and maps no other byte onto a lowercase letter. */
    uint8_t lo = (uint8_t)(b | 0x20);
    if (lo == 's' || lo == 't' || lo == 'm' || lo == 'd') {
        return j + 1;
    }
    if (j + 1 < n) {
        uint8_t lo2 = (uint8_t)(s[j + 1] | 0x20);
        if (((lo == 'r' || lo == 'v') && lo2 == 'e') || (lo == 'l' && lo2 == 'l')) {
            return j + 2;
        }
    }
    return 0;
}

size_t caprl_pretok_next(const uint8_t *s, size_t n, size_t i) {
    size_t   len0;
    uint32_t c0 = class_at(s, i, &len0);
    size_t   j  = i + len0;

    /* 1: contractions */
    if (s[i] == '\'' && j < n) {
        size_t e = contraction_end(s, n, j);
        if (e != 0) {
            return e;
        }
    }
    /* 2: [^\r\n\p{L}\p{N}]?\p{L}+ -- the optional character is taken only if a letter follows it */
    if (c0 & L) {
        return run_end(s, n, j, L, false);
    }
    size_t   len1 = 0;
    uint32_t c1   = j < n ? class_at(s, j, &len1) : 0;
    if (!(c0 & (N | NL)) && (c1 & L)) {
        return run_end(s, n, j + len1, L, false);
    }
    /* 3: a single number character */
    if (c0 & N) {
        return j;
    }
    /* 4: ' ?[^\s\p{L}\p{N}]+[\r\n]*' */
    if (!(c0 & S)) {
        return newlines_end(s, n, run_end(s, n, j, L | N | S, true));
    }
    if (s[i] == ' ' && j < n && !(c1 & (L | N | S))) {
        return newlines_end(s, n, run_end(s, n, j + len1, L | N | S, true));
    }
    /* 5-7: c0 starts a whitespace run [i, k) */
    size_t k = i, last_start = i, nl_end = 0;
    while (k < n) {
        size_t   len;
        uint32_t c = class_at(s, k, &len);
        if (!(c & S)) {
            break;
        }
        if (c & NL) {
            nl_end = k + len;
        }
        last_start = k;
        k += len;
    }
    if (nl_end != 0) {
        return nl_end; /* 5: \s*[\r\n]+ backtracks to the run's last CR/LF */
    }
    if (k == n) {
        return n; /* 6 at the end of the text */
    }
    if (last_start > i) {
        return last_start; /* 6: the run minus its last character, which the next piece takes */
    }
    return k; /* 7: one whitespace character before a non-space */
}

size_t caprl_pretok_split(const uint8_t *s, size_t n, size_t *ends, size_t cap) {
    size_t count = 0;
    for (size_t i = 0; i < n;) {
        i = caprl_pretok_next(s, n, i);
        if (count < cap) {
            ends[count] = i;
        }
        count++;
    }
    return count;
}
