/* Tokenizer: golden encode/decode cases on the real Qwen2 vocabulary (expected ids from Hugging Face's JS port of
 * `tokenizers`, scripts/gen_tok_golden.mjs), concurrent encoding, invalid UTF-8, U+FFFD repair, small synthetic
 * tokenizers with hand-derived results (BPE order, both merge serialisations, added-token matching), corrupt
 * tokenizer.json files, and the Qwen2.5 chat template. */
#include <jansson.h>
#include <pthread.h>
#include <time.h>

#include "caprl/tokenizer.h"
#include "byte_tokenizer.h"
#include "caprl_test.h"
#include "core/error_impl.h"
#include "text/tokenizer_impl.h"

#define QWEN_TOKENIZER CAPRL_SHARED_DIR "/data/qwen-tokenizer/tokenizer.json"
#define GOLDEN_FILE    CAPRL_SOURCE_DIR "/tests/fixtures/tok/qwen2_golden.jsonl"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- golden cases ------------------------------------------------------------------------------------------- */

typedef struct golden {
    char    *text; /* NULL for a decode-only case */
    size_t   text_len;
    int32_t *ids;
    int64_t  n_ids;
    char    *decoded, *decoded_skip;
    size_t   decoded_len, decoded_skip_len;
} golden;

static char *dup_json_string(const json_t *s, size_t *len) {
    *len    = json_string_length(s);
    char *p = malloc(*len + 1);
    memcpy(p, json_string_value(s), *len + 1);
    return p;
}

static golden *load_golden(int *n_out) {
    FILE *fp = fopen(GOLDEN_FILE, "rb");
    if (!fp) {
        fprintf(stderr, "cannot open %s\n", GOLDEN_FILE);
        exit(1);
    }
    golden *g = NULL;
    int     n = 0, cap = 0;
    char   *line = NULL;
    size_t  line_cap = 0;
    ssize_t got;
    while ((got = getline(&line, &line_cap, fp)) > 0) {
        json_error_t jerr;
        /* JSON_ALLOW_NUL: one case contains U+0000. */
        json_t *o = json_loadb(line, (size_t)got, JSON_ALLOW_NUL, &jerr);
        if (!o) {
            fprintf(stderr, "%s:%d: %s\n", GOLDEN_FILE, n + 1, jerr.text);
            exit(1);
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            g   = realloc(g, (size_t)cap * sizeof *g);
        }
        golden *c = &g[n++];
        memset(c, 0, sizeof *c);
        const json_t *ids = json_object_get(o, "ids");
        if (json_object_get(o, "text")) {
            c->text = dup_json_string(json_object_get(o, "text"), &c->text_len);
        } else {
            ids = json_object_get(o, "decode_ids");
        }
        c->n_ids = (int64_t)json_array_size(ids);
        c->ids   = malloc(((size_t)c->n_ids + 1) * sizeof *c->ids);
        for (int64_t i = 0; i < c->n_ids; i++) {
            c->ids[i] = (int32_t)json_integer_value(json_array_get(ids, (size_t)i));
        }
        c->decoded      = dup_json_string(json_object_get(o, "decoded"), &c->decoded_len);
        c->decoded_skip = dup_json_string(json_object_get(o, "decoded_skip"), &c->decoded_skip_len);
        json_decref(o);
    }
    free(line);
    fclose(fp);
    *n_out = n;
    return g;
}

static void free_golden(golden *g, int n) {
    for (int i = 0; i < n; i++) {
        free(g[i].text);
        free(g[i].ids);
        free(g[i].decoded);
        free(g[i].decoded_skip);
    }
    free(g);
}

/* Encodes c->text and compares with c->ids; returns true on a match. Quiet unless verbose. */
static bool encode_matches(const caprl_tokenizer *tok, const golden *c, bool verbose) {
    int32_t     ids[4096];
    int64_t     n   = -1;
    caprl_error err = {0};
    if (caprl_tokenizer_encode(tok, c->text, c->text_len, true, ids, 4096, &n, &err) != CAPRL_OK) {
        if (verbose) {
            fprintf(stderr, "encode failed: %s\n", err.msg);
        }
        return false;
    }
    bool same = n == c->n_ids && memcmp(ids, c->ids, (size_t)n * sizeof *ids) == 0;
    if (!same && verbose) {
        fprintf(stderr, "encode mismatch for \"%.*s\":\n  got ", (int)c->text_len, c->text);
        for (int64_t i = 0; i < n && i < 4096; i++) {
            fprintf(stderr, " %d", ids[i]);
        }
        fprintf(stderr, "\n  want");
        for (int64_t i = 0; i < c->n_ids; i++) {
            fprintf(stderr, " %d", c->ids[i]);
        }
        fputc('\n', stderr);
    }
    return same;
}

static void check_decode(const caprl_tokenizer *tok, const golden *c, bool skip) {
    char        buf[16384];
    size_t      len = 0;
    caprl_error err = {0};
    CHECK_OK(caprl_tokenizer_decode(tok, c->ids, c->n_ids, skip, buf, sizeof buf, &len, &err), &err);
    const char *want     = skip ? c->decoded_skip : c->decoded;
    size_t      want_len = skip ? c->decoded_skip_len : c->decoded_len;
    CHECK_MSG(len == want_len && memcmp(buf, want, len) == 0, "decode (skip %d) of case \"%.40s\": \"%.*s\"",
              (int)skip, c->text ? c->text : "(ids)", (int)len, buf);
}

static void test_golden(const caprl_tokenizer *tok, const golden *g, int n) {
    int n_encode = 0;
    for (int i = 0; i < n; i++) {
        if (g[i].text) {
            CHECK(encode_matches(tok, &g[i], true));
            n_encode++;
        }
        check_decode(tok, &g[i], false);
        check_decode(tok, &g[i], true);
    }
    CHECK(n_encode >= 150); /* the fixture is complete */
}

typedef struct thread_arg {
    const caprl_tokenizer *tok;
    const golden          *g;
    int                    n;
    int                    mismatches;
} thread_arg;

static void *encode_all(void *p) {
    thread_arg *a = p;
    for (int rep = 0; rep < 5; rep++) {
        for (int i = 0; i < a->n; i++) {
            if (a->g[i].text && !encode_matches(a->tok, &a->g[i], false)) {
                a->mismatches++;
            }
        }
    }
    return NULL;
}

static void test_threads(const caprl_tokenizer *tok, const golden *g, int n) {
    pthread_t  th[2];
    thread_arg args[2] = {{tok, g, n, 0}, {tok, g, n, 0}};
    for (int i = 0; i < 2; i++) {
        CHECK(pthread_create(&th[i], NULL, encode_all, &args[i]) == 0);
    }
    for (int i = 0; i < 2; i++) {
        pthread_join(th[i], NULL);
        CHECK_EQ_I64(args[i].mismatches, 0);
    }
}

/* ---- the real vocabulary: getters, contracts, parse_special, errors ------------------------------------------ */

static void test_basics(const caprl_tokenizer *tok) {
    CHECK_EQ_I64(caprl_tokenizer_n_tokens(tok), 151665);
    CHECK_STR_EQ(caprl_tokenizer_token_str(tok, 151645), "<|im_end|>");
    CHECK_STR_EQ(caprl_tokenizer_token_str(tok, 9707), "Hello");
    CHECK_STR_EQ(caprl_tokenizer_token_str(tok, 220), "\xC4\xA0"); /* "Ġ": byte 0x20 */
    CHECK(caprl_tokenizer_token_str(tok, -1) == NULL);
    CHECK(caprl_tokenizer_token_str(tok, 151665) == NULL);
    CHECK_EQ_I64(caprl_tokenizer_token_id(tok, "Hello"), 9707);
    CHECK_EQ_I64(caprl_tokenizer_token_id(tok, "<|im_start|>"), 151644);
    CHECK_EQ_I64(caprl_tokenizer_token_id(tok, "no such token at all"), -1);
    for (int32_t id = 151643; id <= 151656; id++) {
        CHECK(caprl_tokenizer_is_special(tok, id));
    }
    for (int32_t id = 151657; id <= 151664; id++) {
        CHECK(!caprl_tokenizer_is_special(tok, id));
    }
    CHECK(!caprl_tokenizer_is_special(tok, 9707));

    uint8_t b[16];
    CHECK_EQ_I64(caprl_tokenizer_token_bytes(tok, 220, false, b, sizeof b), 1);
    CHECK(b[0] == ' ');
    CHECK_EQ_I64(caprl_tokenizer_token_bytes(tok, 151645, false, b, sizeof b), 10);
    CHECK(memcmp(b, "<|im_end|>", 10) == 0);
    CHECK_EQ_I64(caprl_tokenizer_token_bytes(tok, 151645, true, b, sizeof b), 0);
    CHECK_EQ_I64(caprl_tokenizer_token_bytes(tok, 151645, false, b, 3), 10); /* snprintf-style: full length */
    CHECK_EQ_I64(caprl_tokenizer_token_bytes(tok, 151665, false, b, sizeof b), -1);
    CHECK_EQ_I64(caprl_tokenizer_token_bytes(tok, -5, false, b, sizeof b), -1);

    /* snprintf contract of encode: the full count with a short buffer, untouched ids past cap. */
    int32_t     ids[4] = {-7, -7, -7, -7};
    int64_t     n      = 0;
    caprl_error err    = {0};
    CHECK_OK(caprl_tokenizer_encode(tok, "The quick brown fox", 19, true, ids, 2, &n, &err), &err);
    CHECK_EQ_I64(n, 4);
    CHECK_EQ_I64(ids[0], 785);
    CHECK_EQ_I64(ids[1], 3974);
    CHECK_EQ_I64(ids[2], -7);
    CHECK_OK(caprl_tokenizer_encode(tok, "The quick brown fox", 19, true, NULL, 0, &n, &err), &err);
    CHECK_EQ_I64(n, 4);
    CHECK_OK(caprl_tokenizer_encode(tok, NULL, 0, true, NULL, 0, &n, &err), &err);
    CHECK_EQ_I64(n, 0);

    /* snprintf contract of decode. */
    int32_t hw[2] = {9707, 1879};
    char    out[8];
    size_t  len = 0;
    CHECK_OK(caprl_tokenizer_decode(tok, hw, 2, false, out, 6, &len, &err), &err);
    CHECK_EQ_I64(len, 11);
    CHECK_STR_EQ(out, "Hello");
    CHECK_OK(caprl_tokenizer_decode(tok, hw, 2, false, NULL, 0, &len, &err), &err);
    CHECK_EQ_I64(len, 11);
}

/* parse_special false: special tokens are text, as with Hugging Face's split_special_tokens=True; non-special added
 * tokens (<tool_call>, <|fim_prefix|>, ...) are still matched there too. */
static void test_parse_special(const caprl_tokenizer *tok) {
    const char *text = "a<|im_end|>b<tool_call>c";
    int32_t     ids[64];
    int64_t     n   = 0;
    caprl_error err = {0};
    CHECK_OK(caprl_tokenizer_encode(tok, text, strlen(text), true, ids, 64, &n, &err), &err);
    CHECK_EQ_I64(n, 5);
    CHECK_EQ_I64(ids[1], 151645);
    CHECK_EQ_I64(ids[3], 151657);
    CHECK_OK(caprl_tokenizer_encode(tok, text, strlen(text), false, ids, 64, &n, &err), &err);
    bool has_special = false, has_tool = false;
    for (int64_t i = 0; i < n; i++) {
        has_special |= ids[i] >= 151643 && ids[i] <= 151656;
        has_tool |= ids[i] == 151657;
    }
    CHECK(!has_special);
    CHECK(has_tool);
    CHECK(n > 5);
    char   out[64];
    size_t len = 0;
    CHECK_OK(caprl_tokenizer_decode(tok, ids, n, true, out, sizeof out, &len, &err), &err);
    CHECK_STR_EQ(out, text); /* nothing is special any more, so nothing is skipped */
}

static void test_invalid_input(const caprl_tokenizer *tok) {
    static const struct {
        const char *bytes;
        size_t      len, offset;
    } bad[] = {
        {"ab\xFF", 3, 2},             /* never valid */
        {"\x80", 1, 0},               /* lone continuation */
        {"ok \xE4\xB8", 5, 3},        /* truncated 3-byte sequence */
        {"\xC0\xAF", 2, 0},           /* overlong '/' */
        {"x\xED\xA0\x80", 4, 1},      /* UTF-16 surrogate D800 */
        {"\xF4\x90\x80\x80", 4, 0},   /* above U+10FFFF */
        {"\xE0\x80\xAF", 3, 0},       /* overlong 3-byte */
        {"<|im_end|>\xFE", 11, 10},   /* after a special token */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int32_t     ids[16];
        int64_t     n   = 0;
        caprl_error err = {0};
        CHECK(caprl_tokenizer_encode(tok, bad[i].bytes, bad[i].len, true, ids, 16, &n, &err) ==
              CAPRL_ERR_INVALID_ARG);
        char want[64];
        snprintf(want, sizeof want, "byte offset %zu", bad[i].offset);
        CHECK_MSG(strstr(err.msg, want) != NULL, "case %zu: %s", i, err.msg);
    }
    /* NUL is a valid character. */
    int32_t     ids[8];
    int64_t     n   = 0;
    caprl_error err = {0};
    CHECK_OK(caprl_tokenizer_encode(tok, "a\0b", 3, true, ids, 8, &n, &err), &err);
    CHECK(n >= 2);

    /* Ids without a token (a model's padding rows) decode to nothing, as Hugging Face drops them; negative ids are
     * errors. */
    int32_t unknown[4] = {9707, 151665, 1879, 2000000};
    char    out[32];
    size_t  len = 0;
    CHECK_OK(caprl_tokenizer_decode(tok, unknown, 4, false, out, sizeof out, &len, &err), &err);
    CHECK_STR_EQ(out, "Hello world");
    int32_t negative[2] = {9707, -1};
    CHECK(caprl_tokenizer_decode(tok, negative, 2, false, out, sizeof out, &len, &err) == CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "-1") != NULL && strstr(err.msg, "position 1") != NULL);
}

/* Decoding ids whose bytes are not UTF-8. The expected strings follow from the maximal-subpart rule (Unicode §3.9,
 * Table 3-7; Python's errors="replace"), worked out by hand: at an invalid byte, take the longest prefix of a
 * well-formed sequence starting there (at least one byte) and replace it by one U+FFFD. */
static void test_replacement(const caprl_tokenizer *tok) {
    /* Token ids of single bytes, by their byte-level strings (spec/qwen.md §5.4). */
    int32_t xA4 = caprl_tokenizer_token_id(tok, "\xC2\xA4");  /* U+00A4 <- byte A4 */
    int32_t xE4 = caprl_tokenizer_token_id(tok, "\xC3\xA4");  /* U+00E4 <- byte E4 */
    int32_t xB8 = caprl_tokenizer_token_id(tok, "\xC2\xB8");  /* U+00B8 <- byte B8 */
    int32_t xAD = caprl_tokenizer_token_id(tok, "\xC5\x83");  /* U+0143 <- byte AD */
    int32_t xF0 = caprl_tokenizer_token_id(tok, "\xC3\xB0");  /* U+00F0 <- byte F0 */
    int32_t x9F = caprl_tokenizer_token_id(tok, "\xC5\x81");  /* U+0141 <- byte 9F */
    int32_t xED = caprl_tokenizer_token_id(tok, "\xC3\xAD");  /* U+00ED <- byte ED */
    int32_t xA0 = caprl_tokenizer_token_id(tok, "\xC5\x82");  /* U+0142 <- byte A0 */
    int32_t xC0 = caprl_tokenizer_token_id(tok, "\xC3\x80");  /* U+00C0 <- byte C0 */
    int32_t xAF = caprl_tokenizer_token_id(tok, "\xC2\xAF");  /* U+00AF <- byte AF */
    int32_t a = 64, b = 65;                                   /* "a", "b" */
    CHECK(xA4 >= 0 && xE4 >= 0 && xB8 >= 0 && xAD >= 0 && xF0 >= 0 && x9F >= 0 && xED >= 0 && xA0 >= 0 &&
          xC0 >= 0 && xAF >= 0);
#define FFFD "\xEF\xBF\xBD"
    int32_t c0[] = {xA4};                   /* A4: a continuation byte cannot start a sequence: one U+FFFD */
    int32_t c1[] = {xE4, xB8};              /* E4 B8: a 3-byte sequence cut short: one U+FFFD for both */
    int32_t c2[] = {a, xE4, xB8, b};        /* the same between letters */
    int32_t c3[] = {xE4, xB8, xE4};         /* two truncated sequences: two U+FFFD */
    int32_t c4[] = {xE4, xB8, xAD};         /* E4 B8 AD = U+4E2D, split across three tokens: valid */
    int32_t c5[] = {xF0, x9F, a};           /* F0 9F: a prefix (F0 takes 90..BF next): one U+FFFD, then "a" */
    int32_t c6[] = {xED, xA0};              /* ED takes only 80..9F next: ED alone, then A0 alone */
    int32_t c7[] = {xC0, xAF};              /* C0 never starts a sequence: two U+FFFD */
    int32_t c8[] = {xE4, xB8, 151645, xAD}; /* a special token between: E4 B8 | "<|im_end|>" | AD */
    const struct {
        const int32_t *ids;
        int            n;
        bool           skip;
        const char    *want;
    } list[] = {
        {c0, 1, false, FFFD},
        {c1, 2, false, FFFD},
        {c2, 4, false, "a" FFFD "b"},
        {c3, 3, false, FFFD FFFD},
        {c4, 3, false, "\xE4\xB8\xAD"},
        {c5, 3, false, FFFD "a"},
        {c6, 2, false, FFFD FFFD},
        {c7, 2, false, FFFD FFFD},
        {c8, 4, false, FFFD "<|im_end|>" FFFD},
        {c8, 4, true, "\xE4\xB8\xAD"}, /* skipping the special token joins the bytes into U+4E2D */
    };
    for (size_t i = 0; i < sizeof list / sizeof list[0]; i++) {
        char        out[64];
        size_t      len = 0;
        caprl_error err = {0};
        CHECK_OK(caprl_tokenizer_decode(tok, list[i].ids, list[i].n, list[i].skip, out, sizeof out, &len, &err),
                 &err);
        CHECK_MSG(strcmp(out, list[i].want) == 0 && len == strlen(list[i].want), "replacement case %zu", i);
    }

    /* The repair function on raw bytes, including a 4-byte character truncated at the end. */
    char   out[64];
    size_t len = caprl_utf8_repair((const uint8_t *)"\xF0\x9F\x98", 3, out, sizeof out);
    CHECK(len == 3 && strcmp(out, FFFD) == 0);
    len = caprl_utf8_repair((const uint8_t *)"\xF0\x9F\x98\x80\xF5", 5, out, sizeof out);
    CHECK(len == 7 && strcmp(out, "\xF0\x9F\x98\x80" FFFD) == 0);
    len = caprl_utf8_repair((const uint8_t *)"\xF4\x90", 2, out, sizeof out); /* F4 allows only 80..8F next */
    CHECK(len == 6 && strcmp(out, FFFD FFFD) == 0);
    len = caprl_utf8_repair((const uint8_t *)"ab\xC3", 3, out, 3); /* truncation keeps the NUL */
    CHECK(len == 5 && strcmp(out, "ab") == 0);
#undef FFFD
}

/* ---- synthetic tokenizers with hand-derived results ---------------------------------------------------------- */

static const char k_regex[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                              "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static json_t *byte_level(void) {
    return json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 0,
                     "use_regex", 0);
}

static json_t *added_token(int id, const char *content, bool special, bool normalized) {
    return json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", id, "content", content, "single_word", 0, "lstrip",
                     0, "rstrip", 0, "normalized", normalized, "special", special);
}

/* Vocab: ids 0..255 are the byte symbols (id = byte value), then aa, he, ll, hell, hello, Ġhello (256..261). Added
 * tokens: <|end|> (262, special), <|end|>!! (263, special), <x> (264), éé (265, normalized). */
static json_t *make_tokenizer(bool pair_merges) {
    json_t *vocab = json_object();
    for (int b = 0; b < 256; b++) {
        json_object_set_new(vocab, byte_symbol(b), json_integer(b));
    }
    static const char *const merged[] = {"aa", "he", "ll", "hell", "hello", "\xC4\xA0hello"};
    static const char *const left[]   = {"a", "h", "l", "he", "hell", "\xC4\xA0"};
    static const char *const right[]  = {"a", "e", "l", "ll", "o", "hello"};
    json_t                  *merges   = json_array();
    for (int i = 0; i < 6; i++) {
        json_object_set_new(vocab, merged[i], json_integer(256 + i));
        if (pair_merges) {
            json_array_append_new(merges, json_pack("[s, s]", left[i], right[i]));
        } else {
            char s[64];
            snprintf(s, sizeof s, "%s %s", left[i], right[i]);
            json_array_append_new(merges, json_string(s));
        }
    }
    json_t *added = json_pack("[o, o, o, o]", added_token(262, "<|end|>", true, false),
                              added_token(263, "<|end|>!!", true, false), added_token(264, "<x>", false, false),
                              added_token(265, "\xC3\xA9\xC3\xA9", false, true));
    json_t *pre = json_pack("{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, o]}", "type", "Sequence", "pretokenizers", "type",
                            "Split", "pattern", "Regex", k_regex, "behavior", "Isolated", "invert", 0, byte_level());
    json_t *model = json_pack("{s:s, s:n, s:n, s:s, s:s, s:b, s:b, s:b, s:o, s:o}", "type", "BPE", "dropout",
                              "unk_token", "continuing_subword_prefix", "", "end_of_word_suffix", "", "fuse_unk", 0,
                              "byte_fallback", 0, "ignore_merges", 0, "vocab", vocab, "merges", merges);
    return json_pack("{s:s, s:n, s:n, s:o, s:{s:s}, s:o, s:o, s:o, s:o}", "version", "1.0", "truncation", "padding",
                     "added_tokens", added, "normalizer", "type", "NFC", "pre_tokenizer", pre, "post_processor",
                     byte_level(), "decoder", byte_level(), "model", model);
}

static caprl_status load_json(const json_t *j, caprl_tokenizer **tok, caprl_error *err) {
    char        *text = json_dumps(j, JSON_COMPACT);
    caprl_status st   = caprl_tokenizer_load_buffer(tok, text, strlen(text), "synthetic.json", err);
    free(text);
    return st;
}

static void expect_ids(const caprl_tokenizer *tok, const char *text, bool parse_special, const int32_t *want,
                       int64_t n_want) {
    int32_t     ids[64];
    int64_t     n   = -1;
    caprl_error err = {0};
    CHECK_OK(caprl_tokenizer_encode(tok, text, strlen(text), parse_special, ids, 64, &n, &err), &err);
    bool same = n == n_want && memcmp(ids, want, (size_t)n * sizeof *ids) == 0;
    CHECK_MSG(same, "\"%s\": %lld ids, first %d", text, (long long)n, n > 0 ? ids[0] : -1);
}

#define EXPECT_IDS(tok, text, ps, ...)                                                                          \
    do {                                                                                                        \
        const int32_t want_[] = {__VA_ARGS__};                                                                  \
        expect_ids((tok), (text), (ps), want_, (int64_t)(sizeof want_ / sizeof want_[0]));                      \
    } while (0)

/* Code points that are letters or numbers in Unicode 15.0 but unassigned in 14.0, the tables of the Oniguruma that
 * Hugging Face tokenizers use: outside \p{L} / \p{N} there, so ",q" after U+31350 is its own pre-token and
 * U+1D2C0 does not join " " as a word. Ids from a reference pre-tokenizer on Unicode 14.0 data with the real
 * vocabulary and merges (it reproduces every case of the golden file). */
static void test_unicode_version(const caprl_tokenizer *tok) {
    EXPECT_IDS(tok, "\xf0\xb1\x8d\x90,q", false, 172, 109, 235, 238, 11, 80);      /* U+31350 CJK Ext. H */
    EXPECT_IDS(tok, "a \xf0\x9d\x8b\x80", false, 64, 81250, 233, 222);             /* U+1D2C0 Kaktovik 0 */
    EXPECT_IDS(tok, "\xf0\x9e\x93\xab_l", false, 172, 252, 241, 104, 62, 75);       /* U+1E4EB Nag Mundari */
    EXPECT_IDS(tok, "\xf0\x9b\x84\xb2-T", false, 172, 74209, 110, 12, 51);          /* U+1B132 small kana */
}

static void test_synthetic(void) {
    for (int form = 0; form < 2; form++) {
        json_t          *j   = make_tokenizer(form == 1);
        caprl_tokenizer *tok = NULL;
        caprl_error      err = {0};
        CHECK_OK(load_json(j, &tok, &err), &err);
        json_decref(j);
        if (!tok) {
            return;
        }
        CHECK_EQ_I64(caprl_tokenizer_n_tokens(tok), 266);
        /* "a a" applies at the leftmost pair first: (aa)(a), not (a)(aa). */
        EXPECT_IDS(tok, "aaa", true, 256, 'a');
        EXPECT_IDS(tok, "aaaa", true, 256, 256);
        /* hello: h-e (rank 1) and l-l (rank 2), then he-ll, hell-o; " hello" adds Ġ-hello. */
        EXPECT_IDS(tok, "hello hello", true, 260, 261);
        EXPECT_IDS(tok, "hel", true, 257, 'l');
        /* Added tokens: leftmost-longest; "!" is byte 0x21. */
        EXPECT_IDS(tok, "a<|end|>!!b", true, 'a', 263, 'b');
        EXPECT_IDS(tok, "a<|end|>!b", true, 'a', 262, '!', 'b');
        EXPECT_IDS(tok, "<x><|end|>", true, 264, 262);
        /* Specials as text: pieces a | <| | end | |>!! | b, each byte its own token (no merges apply). */
        EXPECT_IDS(tok, "a<|end|>!!b", false, 'a', '<', '|', 'e', 'n', 'd', '|', '>', '!', '!', 'b');
        EXPECT_IDS(tok, "<x>", false, 264); /* not special: still matched */
        /* The normalized added token éé matches after NFC, also when written e + U+0301, and inside a word;
         * a single é is the bytes C3 A9, each its own token. */
        EXPECT_IDS(tok, "e\xCC\x81\xC3\xA9", true, 265);
        EXPECT_IDS(tok, "caf\xC3\xA9\xC3\xA9", true, 'c', 'a', 'f', 265);
        EXPECT_IDS(tok, "e\xCC\x81", true, 0xC3, 0xA9);
        /* NFC composes across a piece: "e" U+0301 "x" -> é matched, then x. Bytes of U+00E8 (è) are C3 A8. */
        EXPECT_IDS(tok, "e\xCC\x80x", true, 0xC3, 0xA8, 'x');
        caprl_tokenizer_free(tok);
    }

    /* Without a normalizer, e + U+0301 stays decomposed: "e" (letters), U+0301 alone (a mark is "other"). */
    json_t *j = make_tokenizer(false);
    json_object_set_new(j, "normalizer", json_null());
    caprl_tokenizer *tok = NULL;
    caprl_error      err = {0};
    CHECK_OK(load_json(j, &tok, &err), &err);
    json_decref(j);
    if (tok) {
        EXPECT_IDS(tok, "e\xCC\x81", true, 'e', 0xCC, 0x81);
        caprl_tokenizer_free(tok);
    }

    /* Allocation failures while encoding and decoding give CAPRL_ERR_OOM, never a crash. */
    j = make_tokenizer(false);
    CHECK_OK(load_json(j, &tok, &err), &err);
    json_decref(j);
    if (tok) {
        int32_t ids[8];
        int64_t n = 0;
        caprl_test_fail_alloc_after(0);
        CHECK(caprl_tokenizer_encode(tok, "hello", 5, true, ids, 8, &n, &err) == CAPRL_ERR_OOM);
        caprl_test_fail_alloc_after(0);
        char   out[16];
        size_t len = 0;
        CHECK(caprl_tokenizer_decode(tok, ids, 0, false, out, sizeof out, &len, &err) == CAPRL_ERR_OOM);
        caprl_test_fail_alloc_after(-1);
        caprl_tokenizer_free(tok);
    }

    /* Each checked allocation of a load failing in turn: a clean CAPRL_ERR_OOM every time, nothing leaked (ASan). */
    j          = make_tokenizer(true);
    char *text = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    int n_oom = 0;
    for (int k = 0; k < 64; k++) {
        caprl_tokenizer *t2 = NULL;
        caprl_test_fail_alloc_after(k);
        caprl_status st = caprl_tokenizer_load_buffer(&t2, text, strlen(text), "synthetic.json", &err);
        caprl_test_fail_alloc_after(-1);
        if (st == CAPRL_OK) {
            caprl_tokenizer_free(t2);
            break;
        }
        CHECK_MSG(st == CAPRL_ERR_OOM && t2 == NULL && strstr(err.msg, "cannot allocate") != NULL, "k %d: %s", k,
                  err.msg);
        n_oom++;
    }
    CHECK(n_oom >= 7); /* the tables sized by the file */
    free(text);
}

/* ---- corrupt tokenizer.json ---------------------------------------------------------------------------------- */

typedef void (*mutate_fn)(json_t *root);

static json_t *model_of(json_t *r) {
    return json_object_get(r, "model");
}
static void m_no_model(json_t *r) {
    json_object_del(r, "model");
}
static void m_model_type(json_t *r) {
    json_object_set_new(model_of(r), "type", json_string("WordPiece"));
}
static void m_model_no_type(json_t *r) {
    json_object_del(model_of(r), "type");
}
static void m_byte_fallback(json_t *r) {
    json_object_set_new(model_of(r), "byte_fallback", json_true());
}
static void m_ignore_merges(json_t *r) {
    json_object_set_new(model_of(r), "ignore_merges", json_true());
}
static void m_dropout(json_t *r) {
    json_object_set_new(model_of(r), "dropout", json_real(0.1));
}
static void m_prefix(json_t *r) {
    json_object_set_new(model_of(r), "continuing_subword_prefix", json_string("##"));
}
static void m_model_unknown_key(json_t *r) {
    json_object_set_new(model_of(r), "max_length", json_integer(10));
}
static void m_nfkc(json_t *r) {
    json_object_set_new(r, "normalizer", json_pack("{s:s}", "type", "NFKC"));
}
static void m_regex(json_t *r) {
    json_t *split = json_array_get(json_object_get(json_object_get(r, "pre_tokenizer"), "pretokenizers"), 0);
    json_object_set_new(json_object_get(split, "pattern"), "Regex", json_string("\\s+|\\S+"));
}
static void m_behavior(json_t *r) {
    json_t *split = json_array_get(json_object_get(json_object_get(r, "pre_tokenizer"), "pretokenizers"), 0);
    json_object_set_new(split, "behavior", json_string("Removed"));
}
static void m_no_pre(json_t *r) {
    json_object_del(r, "pre_tokenizer");
}
static void m_decoder(json_t *r) {
    json_object_set_new(r, "decoder", json_pack("{s:s}", "type", "WordPiece"));
}
static void m_post(json_t *r) {
    json_object_set_new(r, "post_processor", json_pack("{s:s}", "type", "TemplateProcessing"));
}
static void m_top_unknown(json_t *r) {
    json_object_set_new(r, "foo", json_integer(1));
}
static void m_vocab_type(json_t *r) {
    json_object_set_new(json_object_get(model_of(r), "vocab"), "zz", json_string("7"));
}
static void m_vocab_negative(json_t *r) {
    json_object_set_new(json_object_get(model_of(r), "vocab"), "zz", json_integer(-3));
}
static void m_vocab_huge(json_t *r) {
    json_object_set_new(json_object_get(model_of(r), "vocab"), "zz", json_integer(2000000000));
}
static void m_vocab_dup_id(json_t *r) {
    json_object_set_new(json_object_get(model_of(r), "vocab"), "zz", json_integer(5));
}
static void m_vocab_not_object(json_t *r) {
    json_object_set_new(model_of(r), "vocab", json_array());
}
static void m_no_byte(json_t *r) {
    json_object_del(json_object_get(model_of(r), "vocab"), byte_symbol(0));
}
static void m_merges_not_array(json_t *r) {
    json_object_set_new(model_of(r), "merges", json_object());
}
static void m_merge_unknown(json_t *r) {
    json_array_append_new(json_object_get(model_of(r), "merges"), json_string("a zz"));
}
static void m_merge_result(json_t *r) {
    json_array_append_new(json_object_get(model_of(r), "merges"), json_string("a b"));
}
static void m_merge_spaces(json_t *r) {
    json_array_append_new(json_object_get(model_of(r), "merges"), json_string("a  a"));
}
static void m_merge_ints(json_t *r) {
    json_array_append_new(json_object_get(model_of(r), "merges"), json_pack("[i, i]", 1, 2));
}
static void m_merge_triple(json_t *r) {
    json_array_append_new(json_object_get(model_of(r), "merges"), json_pack("[s, s, s]", "a", "a", "a"));
}
static void m_added_lstrip(json_t *r) {
    json_object_set_new(json_array_get(json_object_get(r, "added_tokens"), 0), "lstrip", json_true());
}
static void m_added_id(json_t *r) {
    json_object_set_new(json_array_get(json_object_get(r, "added_tokens"), 0), "id", json_string("262"));
}
static void m_added_conflict(json_t *r) {
    json_array_append_new(json_object_get(r, "added_tokens"), added_token(300, "a", true, false));
}
static void m_added_dup_id(json_t *r) {
    json_array_append_new(json_object_get(r, "added_tokens"), added_token(262, "<|other|>", true, false));
}
static void m_added_empty(json_t *r) {
    json_array_append_new(json_object_get(r, "added_tokens"), added_token(300, "", true, false));
}
static void m_added_not_array(json_t *r) {
    json_object_set_new(r, "added_tokens", json_object());
}

static void test_corrupt(void) {
    static const struct {
        mutate_fn    fn;
        caprl_status code;
        const char  *msg; /* expected substring */
    } cases[] = {
        {m_no_model, CAPRL_ERR_FORMAT, "model: missing"},
        {m_model_type, CAPRL_ERR_UNSUPPORTED, "model.type \"WordPiece\""},
        {m_model_no_type, CAPRL_ERR_FORMAT, "model.type"},
        {m_byte_fallback, CAPRL_ERR_UNSUPPORTED, "model.byte_fallback"},
        {m_ignore_merges, CAPRL_ERR_UNSUPPORTED, "model.ignore_merges"},
        {m_dropout, CAPRL_ERR_UNSUPPORTED, "model.dropout"},
        {m_prefix, CAPRL_ERR_UNSUPPORTED, "model.continuing_subword_prefix"},
        {m_model_unknown_key, CAPRL_ERR_UNSUPPORTED, "model.max_length"},
        {m_nfkc, CAPRL_ERR_UNSUPPORTED, "normalizer.type \"NFKC\""},
        {m_regex, CAPRL_ERR_UNSUPPORTED, "pattern.Regex"},
        {m_behavior, CAPRL_ERR_UNSUPPORTED, "behavior"},
        {m_no_pre, CAPRL_ERR_UNSUPPORTED, "pre_tokenizer: missing"},
        {m_decoder, CAPRL_ERR_UNSUPPORTED, "decoder.type"},
        {m_post, CAPRL_ERR_UNSUPPORTED, "post_processor.type"},
        {m_top_unknown, CAPRL_ERR_UNSUPPORTED, "foo"},
        {m_vocab_type, CAPRL_ERR_FORMAT, "model.vocab[\"zz\"]"},
        {m_vocab_negative, CAPRL_ERR_FORMAT, "model.vocab[\"zz\"]"},
        {m_vocab_huge, CAPRL_ERR_FORMAT, "model.vocab[\"zz\"]"},
        {m_vocab_dup_id, CAPRL_ERR_FORMAT, "id 5"},
        {m_vocab_not_object, CAPRL_ERR_FORMAT, "model.vocab"},
        {m_no_byte, CAPRL_ERR_FORMAT, "no token for byte 0x00"},
        {m_merges_not_array, CAPRL_ERR_FORMAT, "model.merges"},
        {m_merge_unknown, CAPRL_ERR_FORMAT, "model.merges[6]: symbol \"zz\""},
        {m_merge_result, CAPRL_ERR_FORMAT, "model.merges[6]: result \"ab\""},
        {m_merge_spaces, CAPRL_ERR_FORMAT, "model.merges[6]"},
        {m_merge_ints, CAPRL_ERR_FORMAT, "model.merges[6]"},
        {m_merge_triple, CAPRL_ERR_FORMAT, "model.merges[6]"},
        {m_added_lstrip, CAPRL_ERR_UNSUPPORTED, "added_tokens[0].lstrip"},
        {m_added_id, CAPRL_ERR_FORMAT, "added_tokens[0].id"},
        {m_added_conflict, CAPRL_ERR_FORMAT, "added_tokens[4]"},
        {m_added_dup_id, CAPRL_ERR_FORMAT, "added_tokens[4]"},
        {m_added_empty, CAPRL_ERR_FORMAT, "added_tokens[4].content"},
        {m_added_not_array, CAPRL_ERR_FORMAT, "added_tokens"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *j = make_tokenizer(i % 2 == 1);
        cases[i].fn(j);
        caprl_tokenizer *tok = (caprl_tokenizer *)&tok; /* must be reset to NULL on failure */
        caprl_error      err = {0};
        caprl_status     st  = load_json(j, &tok, &err);
        json_decref(j);
        CHECK_MSG(st == cases[i].code && tok == NULL, "case %zu: status %d", i, (int)st);
        CHECK_MSG(strstr(err.msg, cases[i].msg) != NULL && strncmp(err.msg, "synthetic.json: ", 16) == 0,
                  "case %zu: message \"%s\" lacks \"%s\"", i, err.msg, cases[i].msg);
        if (st == CAPRL_OK) {
            caprl_tokenizer_free(tok);
        }
    }

    /* Syntax errors carry name:line:column from jansson. */
    static const struct {
        const char *json;
        const char *msg;
    } raw[] = {
        {"{\n  \"model\": {\n    \"type\": \"BPE\",,\n", "bad.json:3:"},
        {"{\"version\": \"1.0\", \"version\": \"2.0\"}", "duplicate"},
        {"", "bad.json:"},
        {"[1, 2]", "top level"},
        {"{\"model\": \"\xFF\"}", "bad.json:1:"},
    };
    for (size_t i = 0; i < sizeof raw / sizeof raw[0]; i++) {
        caprl_tokenizer *tok = NULL;
        caprl_error      err = {0};
        CHECK(caprl_tokenizer_load_buffer(&tok, raw[i].json, strlen(raw[i].json), "bad.json", &err) ==
              CAPRL_ERR_FORMAT);
        CHECK_MSG(strstr(err.msg, raw[i].msg) != NULL, "raw case %zu: \"%s\"", i, err.msg);
        CHECK(tok == NULL);
    }
    caprl_tokenizer *tok = NULL;
    caprl_error      err = {0};
    CHECK(caprl_tokenizer_load(&tok, "/nonexistent/tokenizer.json", &err) == CAPRL_ERR_IO);
    CHECK(strstr(err.msg, "/nonexistent/tokenizer.json") != NULL);
    CHECK(caprl_tokenizer_load_buffer(NULL, "{}", 2, NULL, &err) == CAPRL_ERR_INVALID_ARG);
    caprl_tokenizer_free(NULL);
}

/* ---- chat template ------------------------------------------------------------------------------------------- */

static void expect_chat(const caprl_chat_message *m, int32_t n, const char *def, bool gen, const char *want) {
    char       *out = NULL;
    caprl_error err = {0};
    CHECK_OK(caprl_chat_render(m, n, def, gen, &out, &err), &err);
    CHECK_STR_EQ(out, want);
    caprl_free(out);
}

static void test_chat(void) {
    const caprl_chat_message user[] = {{"user", "Hi"}};
    expect_chat(user, 1, NULL, true,
                "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    const caprl_chat_message sys[] = {{"system", "Be brief."}, {"user", "Hi"}};
    expect_chat(sys, 2, "ignored when messages[0] is a system turn", true,
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    expect_chat(user, 1, "You are a helpful assistant.", true,
                "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                "<|im_start|>assistant\n");
    const caprl_chat_message multi[] = {{"user", "2+2?"}, {"assistant", "4"}, {"user", "And 3+3?"}};
    expect_chat(multi, 3, NULL, true,
                "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
                "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n");
    expect_chat(multi, 2, NULL, false,
                "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n");
    /* A later system turn is rendered like any other turn. */
    const caprl_chat_message late[] = {{"user", "a"}, {"system", "b"}};
    expect_chat(late, 2, "S", false,
                "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>system\nb<|im_end|>\n");
    expect_chat(NULL, 0, NULL, true,
                "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                "<|im_start|>assistant\n");

    char                    *out = NULL;
    caprl_error              err = {0};
    const caprl_chat_message bad[] = {{"tool", "x"}};
    CHECK(caprl_chat_render(bad, 1, NULL, true, &out, &err) == CAPRL_ERR_INVALID_ARG && out == NULL);
    const caprl_chat_message null_content[] = {{"user", NULL}};
    CHECK(caprl_chat_render(null_content, 1, NULL, true, &out, &err) == CAPRL_ERR_INVALID_ARG);
    CHECK(caprl_chat_render(NULL, 1, NULL, true, &out, &err) == CAPRL_ERR_INVALID_ARG);
}

int main(void) {
    test_chat();
    test_synthetic();
    test_corrupt();
    if (access(QWEN_TOKENIZER, R_OK) != 0) {
        fprintf(stderr, "test_tokenizer: %s not found; real-vocabulary cases skipped\n", QWEN_TOKENIZER);
        int failed = test_finish("test_tokenizer");
        return failed ? failed : 77;
    }
    caprl_tokenizer *tok = NULL;
    caprl_error      err = {0};
    double           t0  = now_s();
    CHECK_OK(caprl_tokenizer_load(&tok, QWEN_TOKENIZER, &err), &err);
    fprintf(stderr, "test_tokenizer: loaded %s in %.3f s\n", QWEN_TOKENIZER, now_s() - t0);
    if (!tok) {
        return test_finish("test_tokenizer");
    }
    int     n_golden = 0;
    golden *g        = load_golden(&n_golden);
    test_basics(tok);
    test_golden(tok, g, n_golden);
    test_parse_special(tok);
    test_invalid_input(tok);
    test_replacement(tok);
    test_unicode_version(tok);
    test_threads(tok, g, n_golden);
    free_golden(g, n_golden);
    caprl_tokenizer_free(tok);
    return test_finish("test_tokenizer");
}
