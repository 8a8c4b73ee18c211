/* The hand-written Qwen2 pre-split matcher (src/text/pretok.c) against PCRE2 compiling the regex of spec/qwen.md §5.3
 * in UTF + Unicode-property mode: first the character classes over every code point, then the pieces of a large
 * random corpus of mixed Unicode strings, which must be identical.
 *
 * The oracle spells \s as \p{White_Space}: with PCRE2_UCP, PCRE2's \s is \p{Z} plus \h and \v, which adds U+180E
 * (MONGOLIAN VOWEL SEPARATOR, White_Space before Unicode 6.3); Oniguruma, which Hugging Face uses, and the spec
 * mean the White_Space property. The two libraries' Unicode versions differ (utf8proc 2.8: Unicode 15.0; PCRE2
 * 10.42: Unicode 14.0), so code points assigned only in the newer version are counted and left out of the
 * corpus; any other class difference fails. */
#include <utf8proc.h>

#include "caprl_test.h"
#include "text/tokenizer_impl.h"

#if CAPRL_HAVE_PCRE2
#    define PCRE2_CODE_UNIT_WIDTH 8
#    include <pcre2.h>

static const char k_oracle_regex[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\p{White_Space}\\p{L}\\p{N}]+[\\r\\n]*|"
    "\\p{White_Space}*[\\r\\n]+|\\p{White_Space}+(?!\\P{White_Space})|\\p{White_Space}+";

static pcre2_code       *g_split;   /* the pre-split regex */
static pcre2_code       *g_class;   /* (\p{L})|(\p{N})|(\p{White_Space})|(\p{Cn}), anchored */
static pcre2_match_data *g_md;
static uint8_t          *g_skip;    /* (0x110000) 1 where the two Unicode versions disagree */

static pcre2_code *compile(const char *pattern, uint32_t extra) {
    int        code;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP | extra, &code,
                                   &off, NULL);
    if (re == NULL) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        fprintf(stderr, "pcre2_compile at %zu: %s\n", (size_t)off, (const char *)msg);
        exit(1);
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* optional: falls back to the interpreter */
    return re;
}

static size_t put_utf8(uint32_t cp, uint8_t *out) {
    utf8proc_ssize_t n = utf8proc_encode_char((utf8proc_int32_t)cp, out);
    return (size_t)n;
}

/* PCRE2's class bits for cp, with CAPRL_PRETOK_CRLF added for CR/LF; *unassigned if PCRE2 says Cn. */
static uint32_t oracle_class(uint32_t cp, bool *unassigned) {
    uint8_t buf[4];
    size_t  n  = put_utf8(cp, buf);
    int     rc = pcre2_match(g_class, buf, n, 0, 0, g_md, NULL);
    *unassigned = false;
    if (rc < 0) {
        return 0;
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(g_md);
    uint32_t    c  = 0;
    if (rc >= 2 && ov[2] != PCRE2_UNSET) {
        c = CAPRL_PRETOK_L;
    } else if (rc >= 3 && ov[4] != PCRE2_UNSET) {
        c = CAPRL_PRETOK_N;
    } else if (rc >= 4 && ov[6] != PCRE2_UNSET) {
        c = CAPRL_PRETOK_S | (cp == '\r' || cp == '\n' ? CAPRL_PRETOK_CRLF : 0);
    } else if (rc >= 5 && ov[8] != PCRE2_UNSET) {
        *unassigned = true;
    }
    return c;
}

static void test_classes(void) {
    g_skip = calloc(0x110000, 1);
    int64_t newer = 0, bad = 0;
    for (uint32_t cp = 0; cp < 0x110000; cp++) {
        if (cp >= 0xD800 && cp <= 0xDFFF) {
            g_skip[cp] = 1; /* not encodable */
            continue;
        }
        bool     unassigned;
        uint32_t want = oracle_class(cp, &unassigned);
        uint32_t got  = caprl_pretok_class(cp);
        if (got == want) {
            continue;
        }
        g_skip[cp] = 1;
        if (unassigned && utf8proc_category((utf8proc_int32_t)cp) != UTF8PROC_CATEGORY_CN) {
            newer++;
        } else {
            bad++;
            if (bad < 10) {
                fprintf(stderr, "class of U+%04X: ours %u, PCRE2 %u\n", cp, got, want);
            }
        }
    }
    fprintf(stderr, "classes: utf8proc Unicode %s; %lld code points assigned only in the newer tables\n",
            utf8proc_unicode_version(), (long long)newer);
    CHECK_EQ_I64(bad, 0);
    CHECK(newer < 20000); /* a version gap, not a broken table */
    /* The spec's White_Space list, spot-checked by hand. */
    static const uint32_t ws[] = {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, 0x2000, 0x200A,
                                  0x2028, 0x2029, 0x202F, 0x205F, 0x3000};
    for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++) {
        CHECK(caprl_pretok_class(ws[i]) & CAPRL_PRETOK_S);
    }
    CHECK(caprl_pretok_class(0x180E) == 0);   /* Cf since Unicode 6.3 */
    CHECK(caprl_pretok_class(0x200B) == 0);   /* ZERO WIDTH SPACE is not White_Space */
    CHECK(caprl_pretok_class(0xFEFF) == 0);
    CHECK(caprl_pretok_class(0x00B2) == CAPRL_PRETOK_N); /* No */
    CHECK(caprl_pretok_class(0x2167) == CAPRL_PRETOK_N); /* Nl */
    CHECK(caprl_pretok_class(0x02B0) == CAPRL_PRETOK_L); /* Lm */
    CHECK(caprl_pretok_class(0x0301) == 0);              /* Mn: "other" */
}

/* ---- random corpus ------------------------------------------------------------------------------------------ */

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static uint32_t rnd(uint32_t n) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)((g_rng >> 11) % n);
}

typedef struct range {
    uint32_t lo, hi;
} range;

/* Interesting code point classes; one is drawn, then a code point inside it. */
static const range k_ranges[] = {
    {'a', 'z'},       {'A', 'Z'},       {'0', '9'},       {'!', '/'},       {':', '@'},       {'[', '`'},
    {'{', '~'},       {' ', ' '},       {'\t', '\r'},     {'\r', '\r'},     {'\n', '\n'},     {0x85, 0x85},
    {0xA0, 0xA0},     {0x1680, 0x1680}, {0x2000, 0x200A}, {0x2028, 0x2029}, {0x202F, 0x202F}, {0x205F, 0x205F},
    {0x3000, 0x3000}, {0x180E, 0x180E}, {0x200B, 0x200F}, {0xFEFF, 0xFEFF}, {0x00AD, 0x00AD}, {0x00, 0x1F},
    {0x7F, 0x9F},     {0xC0, 0x24F},    {0x300, 0x36F},   {0x370, 0x3FF},   {0x400, 0x4FF},   {0x591, 0x5F4},
    {0x600, 0x6FF},   {0x900, 0x97F},   {0xE00, 0xE5B},   {0x1100, 0x11FF}, {0x3040, 0x30FF}, {0x4E00, 0x9FFF},
    {0xAC00, 0xD7A3}, {0xFF00, 0xFFEF}, {0x2160, 0x2188}, {0x2460, 0x249B}, {0xB2, 0xBE},     {0x1F300, 0x1F64F},
    {0x1F3FB, 0x1F3FF}, {0x200D, 0x200D}, {0xFE0F, 0xFE0F}, {0x1F1E6, 0x1F1FF}, {0x20000, 0x2A6DF},
    {0x1D400, 0x1D7FF}, {0xE000, 0xF8FF}, {0x10000, 0x10FFFF}, {0x80, 0xFFFF}, {0x17F, 0x17F}, {0x212A, 0x212A},
};

/* Contractions and near-misses in random case, including U+017F (long s), which folds to 's'. */
static const char *const k_snippets[] = {"'s", "'S", "'t", "'T", "'re", "'RE", "'rE", "'ve", "'Ve", "'m", "'M",
                                         "'ll", "'LL", "'lL", "'d", "'D", "'", "''", "'x", "'r", "'l", "'v",
                                         "\xC5\xBF", "'\xC5\xBF", "'\xC5\xBFt", " '", "'1", "'\n", "\r\n", "\n\n",
                                         "  ", "   ", " \n ", "\t\t"};

static size_t random_string(uint8_t *buf, size_t n_items) {
    size_t o = 0;
    for (size_t k = 0; k < n_items; k++) {
        if (rnd(4) == 0) {
            const char *s = k_snippets[rnd(sizeof k_snippets / sizeof k_snippets[0])];
            size_t      n = strlen(s);
            memcpy(buf + o, s, n);
            o += n;
            continue;
        }
        const range *r = &k_ranges[rnd(sizeof k_ranges / sizeof k_ranges[0])];
        uint32_t     cp;
        do {
            cp = r->lo + rnd(r->hi - r->lo + 1);
        } while (g_skip[cp]);
        o += put_utf8(cp, buf + o);
    }
    return o;
}

/* Compares our pieces of s with PCRE2's repeated search; returns false (after printing) on the first difference. */
static bool compare_split(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        size_t ours = caprl_pretok_next(s, n, i);
        /* PCRE2 checks the whole subject's UTF-8 on every call unless told not to: once is enough. */
        int rc = pcre2_match(g_split, s, n, i, i == 0 ? 0 : PCRE2_NO_UTF_CHECK, g_md, NULL);
        if (rc < 0) {
            fprintf(stderr, "PCRE2 finds no match at %zu\n", i);
            return false;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(g_md);
        if (ov[0] != i || ov[1] != ours) {
            fprintf(stderr, "piece at %zu: ours [%zu,%zu), PCRE2 [%zu,%zu) in: ", i, i, ours, (size_t)ov[0],
                    (size_t)ov[1]);
            for (size_t k = 0; k < n; k++) {
                fprintf(stderr, "%02X", s[k]);
            }
            fputc('\n', stderr);
            return false;
        }
        i = ours;
    }
    return true;
}

static void test_corpus(void) {
    enum { N_STRINGS = 30000, MAX_ITEMS = 48 };
    uint8_t *buf  = malloc(4 * 8 * 100000 + 64);
    int64_t  fail = 0, bytes = 0;
    for (int k = 0; k < N_STRINGS && fail < 5; k++) {
        size_t n = random_string(buf, 1 + rnd(MAX_ITEMS));
        bytes += (int64_t)n;
        fail += !compare_split(buf, n);
    }
    /* One long string: long runs, and backtracking far from the start. */
    size_t n = random_string(buf, 100000);
    bytes += (int64_t)n;
    fail += !compare_split(buf, n);
    fprintf(stderr, "corpus: %d strings, %lld bytes\n", N_STRINGS + 1, (long long)bytes);
    CHECK_EQ_I64(fail, 0);
    free(buf);
}

/* Hand-checked splits (spec/qwen.md §5.3 examples), independent of PCRE2. */
static void test_examples(void) {
    static const struct {
        const char *text;
        const char *pieces; /* separated by '|' */
    } cases[] = {
        {"Hello world", "Hello| world"},
        {"I'm here's", "I|'m| here|'s"},
        {"  x", " | x"},
        {"a  1", "a| | |1"},
        {"12", "1|2"},
        {" \n ", " \n| "},
        {"x\n\n  y", "x|\n\n| | y"},
        {"...\n\ny", "...\n\n|y"},
        {" !!", " !!"},
        {"\t(", "\t|("},
        {"end  ", "end|  "},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const uint8_t *s = (const uint8_t *)cases[c].text;
        size_t         n = strlen(cases[c].text), ends[32];
        size_t         np = caprl_pretok_split(s, n, ends, 32);
        char           joined[128];
        size_t         o = 0, start = 0;
        for (size_t k = 0; k < np && k < 32; k++) {
            if (k > 0) {
                joined[o++] = '|';
            }
            memcpy(joined + o, s + start, ends[k] - start);
            o += ends[k] - start;
            start = ends[k];
        }
        joined[o] = '\0';
        CHECK_STR_EQ(joined, cases[c].pieces);
    }
}

int main(void) {
    g_split = compile(k_oracle_regex, 0);
    g_class = compile("(\\p{L})|(\\p{N})|(\\p{White_Space})|(\\p{Cn})", PCRE2_ANCHORED);
    g_md    = pcre2_match_data_create(8, NULL);
    test_examples();
    test_classes();
    test_corpus();
    pcre2_match_data_free(g_md);
    pcre2_code_free(g_split);
    pcre2_code_free(g_class);
    free(g_skip);
    return test_finish("test_pretok");
}

#else
int main(void) {
    fprintf(stderr, "test_pretok: built without PCRE2, skipped\n");
    return 77;
}
#endif
