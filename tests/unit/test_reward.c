/* The CapRL reward: the reader prompt (length and SHA-256 from spec/caprl.md §6.3), shuffle_options (§6.4) case by
 * case, answer parsing, the length term, and the reader: prefix-cached scoring against full-prompt scoring and
 * against an independent full-prompt forward with a float64 softmax, independence from batching, chunking, item
 * order and thread count, and `expected` against the average of `sample` within a derived statistical bound.
 *
 * Readers are tiny random models. Most tests use a small byte-level tokenizer built here from the shared Qwen
 * tokenizer's pre-tokenizer (256 byte tokens, the nine merges " A" ... " I", three special tokens), so a model
 * with a 268-token vocabulary gives the letters real probability; one test uses the full Qwen tokenizer, whose
 * merges make the tokenization-boundary rule of §1.4 matter. Tests needing the shared tokenizer skip without it. */
#include <jansson.h>
#include <stdint.h>

#include "caprl/model.h"
#include "caprl/reward.h"
#include "caprl/tokenizer.h"
#include "caprl_test.h"
#include "core/sha256_impl.h"
#include "model/model_impl.h"

#define QWEN_TOKENIZER CAPRL_SHARED_DIR "/data/qwen-tokenizer/tokenizer.json"
#define CANNOT_E       "\n   - E) Can not answer based on the caption"
#define CANNOT_F       "\n   - F) Can not answer based on the caption"

/* ---- SHA-256 and the template ----------------------------------------------------------------------------- */

static void hex_of(const char *s, size_t n, char hex[65]) {
    caprl_sha256_hex(s, n, hex);
}

static void test_sha256(void) {
    char hex[65];
    hex_of("", 0, hex); /* FIPS 180-4 example values */
    CHECK_STR_EQ(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    hex_of("abc", 3, hex);
    CHECK_STR_EQ(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"; /* 56 bytes: padding spills */
    hex_of(two, strlen(two), hex);
    CHECK_STR_EQ(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    /* incremental updates in odd pieces give the same digest as one call */
    char *mil = malloc(1000000);
    memset(mil, 'a', 1000000);
    caprl_sha256 s;
    uint8_t      d[32];
    caprl_sha256_init(&s);
    for (size_t off = 0; off < 1000000;) {
        size_t n = 1 + off % 97;
        n = off + n > 1000000 ? 1000000 - off : n;
        caprl_sha256_update(&s, mil + off, n);
        off += n;
    }
    caprl_sha256_final(&s, d);
    static const uint8_t want[4] = {0xcd, 0xc7, 0x6e, 0x5c}; /* cdc76e5c... for one million 'a' */
    CHECK(memcmp(d, want, 4) == 0);
    hex_of(mil, 1000000, hex);
    CHECK_STR_EQ(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    free(mil);
}

static void test_template(void) {
    const char *t = caprl_reader_template_default();
    char        hex[65];
    CHECK_EQ_I64(strlen(t), 1044);
    hex_of(t, strlen(t), hex);
    CHECK_STR_EQ(hex, "83271f8a028c76cbddbb82a2b09941e55c7347941c9bbabe62cd9790930f1c05");
    CHECK(strncmp(t, "<|im_start|>user\n", 17) == 0); /* no system turn */
    CHECK(strcmp(t + strlen(t) - 13, "The answer is") == 0);
    caprl_error err = {0};
    CHECK_OK(caprl_reader_template_check(t, strlen(t), &err), &err);
    CHECK_STATUS(caprl_reader_template_check("only {} one", 11, &err), CAPRL_ERR_FORMAT);
    CHECK_STATUS(caprl_reader_template_check("{}{}{}", 6, &err), CAPRL_ERR_FORMAT);
    CHECK_STATUS(caprl_reader_template_check("no placeholder", 14, &err), CAPRL_ERR_FORMAT);
    CHECK_STATUS(caprl_reader_template_check("{} a\0b {}", 9, &err), CAPRL_ERR_FORMAT);
    CHECK_STATUS(caprl_reader_template_check("{} \xff {}", 8, &err), CAPRL_ERR_FORMAT);
    CHECK_OK(caprl_reader_template_check("x {} { } {}}", 12, &err), &err); /* other braces are text */

    char *p = NULL;
    CHECK_OK(caprl_reader_prompt("C: {}|Q: {}|end", "a {} b", "q {0}", &p, &err), &err);
    CHECK_STR_EQ(p, "C: a {} b|Q: q {0}|end"); /* arguments are not interpreted */
    caprl_free(p);
    CHECK_OK(caprl_reader_prompt(t, "CAP", "QUE", &p, &err), &err);
    CHECK(strstr(p, "Caption: <Caption Start> CAP <Caption End>  \nQuestion: QUE  <|im_end|>\n") != NULL);
    CHECK_EQ_I64(strlen(p), 1044 - 4 + 6);
    caprl_free(p);
}

/* ---- shuffle_options -------------------------------------------------------------------------------------- */

typedef struct parsed_q {
    char    head[256];
    int32_t n;
    char    label[8];
    char    text[8][128];
} parsed_q;

/* Splits a presented question into its first line and "   - X) text" lines (the exact form the shuffle writes). */
static bool parse_presented(const char *s, parsed_q *pq) {
    memset(pq, 0, sizeof *pq);
    const char *nl = strchr(s, '\n');
    size_t      hl = nl ? (size_t)(nl - s) : strlen(s);
    if (hl >= sizeof pq->head) {
        return false;
    }
    memcpy(pq->head, s, hl);
    while (nl) {
        const char *line = nl + 1;
        nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        if (len < 8 || strncmp(line, "   - ", 5) != 0 || line[6] != ')' || line[7] != ' ' || pq->n >= 8 ||
            len - 8 >= 128) {
            return false;
        }
        pq->label[pq->n] = line[5];
        memcpy(pq->text[pq->n], line + 8, len - 8);
        pq->n++;
    }
    return true;
}

static void present(const char *q, char gold, uint64_t stream, char **out, char *g, bool *sh) {
    caprl_error err = {0};
    CHECK_OK(caprl_present_question(q, gold, true, 42, stream, 7, out, g, sh, &err), &err);
}

static void test_shuffle_basic(void) {
    const char *q = "What color is the car?\n   - A) Red\n   - B) Blue\n   - C) Green\n   - D) Black" CANNOT_E;
    const char *orig[4] = {"Red", "Blue", "Green", "Black"};
    int32_t     perm_seen[24] = {0};
    int32_t     gold_pos[4] = {0};
    for (uint64_t st = 0; st < 960; st++) {
        char *out = NULL, g = 0;
        bool  sh = false;
        present(q, 'B', st, &out, &g, &sh);
        parsed_q pq;
        CHECK(sh);
        CHECK(parse_presented(out, &pq));
        CHECK_STR_EQ(pq.head, "What color is the car?");
        CHECK_EQ_I64(pq.n, 5); /* four options and the appended F line; no E */
        CHECK(pq.label[0] == 'A' && pq.label[1] == 'B' && pq.label[2] == 'C' && pq.label[3] == 'D');
        CHECK(pq.label[4] == 'F');
        CHECK_STR_EQ(pq.text[4], "Can not answer based on the caption");
        CHECK(g >= 'A' && g <= 'D');
        CHECK_STR_EQ(pq.text[g - 'A'], "Blue"); /* the gold letter follows its option text */
        gold_pos[g - 'A']++;
        /* the options are a permutation of the originals */
        int32_t code = 0, used = 0;
        for (int32_t k = 0; k < 4; k++) {
            int32_t j = 0;
            while (j < 4 && strcmp(pq.text[k], orig[j]) != 0) {
                j++;
            }
            CHECK(j < 4 && !(used & (1 << j)));
            used |= 1 << j;
            code = code * 4 + j;
        }
        /* rank the permutation to count distinct ones */
        int32_t rank = 0, fact[4] = {6, 2, 1, 1}, avail[4] = {0, 1, 2, 3}, na = 4;
        for (int32_t k = 0, c = code; k < 4; k++) {
            int32_t v = (c >> (2 * (3 - k))) & 3, idx = 0;
            while (avail[idx] != v) {
                idx++;
            }
            rank += idx * fact[k];
            memmove(avail + idx, avail + idx + 1, (size_t)(na - idx - 1) * sizeof(int32_t));
            na--;
        }
        perm_seen[rank]++;
        /* the same (seed, streams) gives the same presentation */
        char *again = NULL, g2 = 0;
        present(q, 'B', st, &again, &g2, NULL);
        CHECK_STR_EQ(again, out);
        CHECK(g2 == g);
        caprl_free(again);
        caprl_free(out);
    }
    /* 960 draws over 24 permutations: each expected 40 times; a uniform shuffle stays within 40 +- 5 sigma */
    for (int32_t i = 0; i < 24; i++) {
        CHECK_MSG(perm_seen[i] >= 10 && perm_seen[i] <= 72, "permutation %d seen %d times", i, perm_seen[i]);
    }
    for (int32_t i = 0; i < 4; i++) { /* 240 expected, sigma 13.4 */
        CHECK_MSG(gold_pos[i] >= 173 && gold_pos[i] <= 307, "gold at %c %d times", 'A' + i, gold_pos[i]);
    }
}

static void test_shuffle_cases(void) {
    caprl_error err = {0};
    char       *out = NULL, g = 0;
    bool        sh = true;
    parsed_q    pq;

    /* shuffle off: exactly as saved, gold unchanged, nothing appended */
    const char *q = "Q?\n   - A) x\n   - B) y" CANNOT_E;
    CHECK_OK(caprl_present_question(q, 'B', false, 1, 2, 3, &out, &g, &sh, &err), &err);
    CHECK_STR_EQ(out, q);
    CHECK(g == 'B' && !sh);
    caprl_free(out);

    /* round trip: presenting a presented question again deletes its F line and shuffles the same options; the
     * original order restored gives the original string with its E line replaced by the F line */
    for (uint64_t st = 0; st < 50; st++) {
        char *once = NULL, *twice = NULL, g1 = 0, g2 = 0;
        present(q, 'B', st, &once, &g1, NULL);
        present(once, g1, st + 1000, &twice, &g2, NULL);
        CHECK(parse_presented(twice, &pq));
        CHECK_EQ_I64(pq.n, 3);
        CHECK_STR_EQ(pq.text[g2 - 'A'], "y");
        parsed_q p1;
        CHECK(parse_presented(once, &p1));
        char rebuilt[256];
        int  ia = strcmp(p1.text[0], "x") == 0 ? 0 : 1;
        snprintf(rebuilt, sizeof rebuilt, "%s\n   - A) %s\n   - B) %s" CANNOT_F, p1.head, p1.text[ia], p1.text[1 - ia]);
        CHECK_STR_EQ(rebuilt, "Q?\n   - A) x\n   - B) y" CANNOT_F);
        caprl_free(once);
        caprl_free(twice);
    }

    /* fallback: the gold label is not an option -> no shuffle, F appended to the E-deleted text, gold kept */
    present(q, 'E', 5, &out, &g, &sh);
    CHECK_STR_EQ(out, "Q?\n   - A) x\n   - B) y" CANNOT_F);
    CHECK(g == 'E' && !sh);
    caprl_free(out);
    present("Only a question line", 'A', 5, &out, &g, &sh);
    CHECK_STR_EQ(out, "Only a question line" CANNOT_F);
    CHECK(g == 'A' && !sh);
    caprl_free(out);

    /* existing "Can not answer" lines are deleted wherever they are, E and F alike (as str.replace) */
    present("Q?" CANNOT_F "\n   - A) x" CANNOT_E "\n   - B) y" CANNOT_F, 'A', 9, &out, &g, &sh);
    CHECK(parse_presented(out, &pq));
    CHECK_EQ_I64(pq.n, 3);
    CHECK(strcmp(pq.text[g - 'A'], "x") == 0 && pq.label[2] == 'F');
    caprl_free(out);
    /* a deleted prefix inside a longer line leaves the rest attached to the line before */
    present("Q?\n   - A) x" CANNOT_E " now\n   - B) y", 'B', 9, &out, &g, &sh);
    CHECK(parse_presented(out, &pq));
    CHECK_EQ_I64(pq.n, 3);
    CHECK(strcmp(pq.text[0], "x now") == 0 || strcmp(pq.text[1], "x now") == 0);
    CHECK_STR_EQ(pq.text[g - 'A'], "y");
    caprl_free(out);

    /* duplicate option texts: the last new label carrying the gold text wins */
    for (uint64_t st = 0; st < 40; st++) {
        present("Q?\n   - A) Red\n   - B) Blue\n   - C) Red\n   - D) Green", 'A', st, &out, &g, &sh);
        CHECK(parse_presented(out, &pq));
        char last = 0;
        for (int32_t k = 0; k < 4; k++) {
            if (strcmp(pq.text[k], "Red") == 0) {
                last = (char)('A' + k);
            }
        }
        CHECK(g == last);
        caprl_free(out);
    }

    /* six options: A-F and then the F line again (the released quirk) */
    present("Q?\n   - A) 1\n   - B) 2\n   - C) 3\n   - D) 4\n   - E) 5\n   - F) 6", 'F', 3, &out, &g, &sh);
    CHECK(parse_presented(out, &pq));
    CHECK_EQ_I64(pq.n, 7);
    CHECK(pq.label[5] == 'F' && pq.label[6] == 'F' && strcmp(pq.text[g - 'A'], "6") == 0);
    caprl_free(out);

    /* a repeated label keeps its first position and its last text (a dict) */
    for (uint64_t st = 0; st < 20; st++) {
        present("Q?\n   - A) first\n   - B) b\n   - A) second", 'A', st, &out, &g, &sh);
        CHECK(parse_presented(out, &pq));
        CHECK_EQ_I64(pq.n, 3);
        CHECK_STR_EQ(pq.text[g - 'A'], "second");
        CHECK(strcmp(pq.text[0], "first") != 0 && strcmp(pq.text[1], "first") != 0);
        caprl_free(out);
    }

    /* the regex as re.search on the stripped line: loose spacing, other prefixes, Unicode whitespace, blank lines */
    present("Q?\n\t-B)   beta \xc2\xa0\n\n  1. -  A) alpha\n   - C)\xe3\x80\x80gamma", 'A', 4, &out, &g, &sh);
    CHECK(parse_presented(out, &pq));
    CHECK_EQ_I64(pq.n, 4);
    CHECK_STR_EQ(pq.text[g - 'A'], "alpha");
    bool has_beta = false, has_gamma = false;
    for (int32_t k = 0; k < 3; k++) {
        has_beta = has_beta || strcmp(pq.text[k], "beta") == 0;
        has_gamma = has_gamma || strcmp(pq.text[k], "gamma") == 0;
    }
    CHECK(has_beta && has_gamma);
    caprl_free(out);
    /* text keeps inner spacing and a later dash does not restart the match */
    present("Q?\n   - A) a - B) b\n   - B) c", 'A', 4, &out, &g, &sh);
    CHECK(parse_presented(out, &pq));
    CHECK_STR_EQ(pq.text[g - 'A'], "a - B) b");
    caprl_free(out);

    /* malformed lines raise, as the released code does */
    CHECK_STATUS(caprl_present_question("Q?\n   - A) x\n   junk", 'A', true, 1, 1, 1, &out, &g, NULL, &err),
                 CAPRL_ERR_FORMAT);
    CHECK(strstr(err.msg, "junk") != NULL);
    CHECK_STATUS(caprl_present_question("Q?\n   - A)", 'A', true, 1, 1, 1, &out, &g, NULL, &err), CAPRL_ERR_FORMAT);
    CHECK_STATUS(caprl_present_question("Q?\n   - G) x", 'A', true, 1, 1, 1, &out, &g, NULL, &err), CAPRL_ERR_FORMAT);
    CHECK_STATUS(caprl_present_question("Q?\n   ", 'A', true, 1, 1, 1, &out, &g, NULL, &err), CAPRL_ERR_FORMAT);
}

static void test_parse_letter(void) {
    static const struct {
        const char *text;
        char        want;
    } cases[] = {
        {"", 0},          {" C.", 'C'},          {" (B)", 'B'},      {"B.", 'B'},          {"garbage", 0},
        {" I think B", 'I'}, /* the pronoun counts: the first [A-I] character wins (§14 pitfall 7) */
        {" a b c", 0},    {" J, K", 0},          {"\n\nD", 'D'},     {" **E**", 'E'},      {" option F", 'F'},
        {"xyzH", 'H'},    {" 12345", 0},         {"\xc3\x89 A", 'A'}, /* É is not A-I: bytes, not letters */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char got = caprl_reward_parse_letter(cases[i].text, strlen(cases[i].text));
        CHECK_MSG(got == cases[i].want, "\"%s\": got %d", cases[i].text, got);
    }
    CHECK(caprl_reward_parse_letter("xx\0B", 4) == 'B'); /* the length bounds the scan, not a NUL */
    CHECK(caprl_reward_parse_letter("xxB", 2) == 0);
    CHECK(caprl_reward_parse_letter(NULL, 0) == 0);
}

static void test_length_term(void) {
    CHECK_NEAR(caprl_reward_length_term(0, 2048, 3072), 1.0, 0, 0);
    CHECK_NEAR(caprl_reward_length_term(2048, 2048, 3072), 1.0, 0, 0);
    CHECK_NEAR(caprl_reward_length_term(2049, 2048, 3072), 1.0 - 1.0 / 1024, 1e-6, 0);
    CHECK_NEAR(caprl_reward_length_term(2560, 2048, 3072), 0.5, 0, 0);
    CHECK_NEAR(caprl_reward_length_term(3072, 2048, 3072), 0.0, 0, 0);
    CHECK_NEAR(caprl_reward_length_term(5000, 2048, 3072), 0.0, 0, 0);
    caprl_reward_params p = caprl_reward_default_params();
    caprl_error         err = {0};
    CHECK_OK(caprl_reward_params_check(&p, &err), &err);
    CHECK(p.mode == CAPRL_REWARD_SAMPLE && p.n_questions == 8 && p.shuffle && p.max_new_tokens == 10);
    CHECK(p.tau == 0.6f && p.temperature == 0.6f && p.length_weight == 0.0f);
    p.length_l2 = p.length_l1;
    CHECK_STATUS(caprl_reward_params_check(&p, &err), CAPRL_ERR_INVALID_ARG);
    p = caprl_reward_default_params();
    p.tau = 0;
    CHECK_STATUS(caprl_reward_params_check(&p, &err), CAPRL_ERR_INVALID_ARG);
    CHECK(caprl_reward_mode_parse("expected") == CAPRL_REWARD_EXPECTED);
    CHECK(caprl_reward_mode_parse("sample") == CAPRL_REWARD_SAMPLE);
    CHECK(caprl_reward_mode_parse("greedy") == -1);
}

/* ---- readers ---------------------------------------------------------------------------------------------- */

/* The byte-level alphabet: printable Latin-1 bytes stand for themselves, the others map to U+0100 onwards. */
static void byte_symbol(int b, char out[3]) {
    static int order[256];
    static bool done;
    if (!done) {
        int extra = 0;
        for (int x = 0; x < 256; x++) {
            bool keep = (x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF);
            order[x] = keep ? x : 0x100 + extra++;
        }
        done = true;
    }
    int cp = order[b];
    memset(out, 0, 3);
    if (cp < 0x80) {
        out[0] = (char)cp;
    } else {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
    }
}

enum { SMALL_V = 268, SMALL_IM_START = 265, SMALL_IM_END = 266, SMALL_EOT = 267 };

/* The shared Qwen tokenizer.json with its vocabulary replaced: ids 0..255 the bytes, 256..264 " A" ... " I",
 * 265..267 <|im_start|>, <|im_end|>, <|endoftext|>. Written to dir/small_tokenizer.json. */
static bool write_small_tokenizer(const char *dir, char *path, size_t cap) {
    json_error_t jerr;
    json_t      *root = json_load_file(QWEN_TOKENIZER, 0, &jerr);
    if (!root) {
        return false;
    }
    json_t *vocab = json_object(), *merges = json_array();
    for (int b = 0; b < 256; b++) {
        char s[3];
        byte_symbol(b, s);
        json_object_set_new(vocab, s, json_integer(b));
    }
    char space[3];
    byte_symbol(' ', space);
    for (int k = 0; k < 9; k++) {
        char letter[2] = {(char)('A' + k), 0}, merged[8];
        snprintf(merged, sizeof merged, "%s%s", space, letter);
        json_object_set_new(vocab, merged, json_integer(256 + k));
        json_array_append_new(merges, json_pack("[s, s]", space, letter));
    }
    json_t *model = json_object_get(root, "model");
    json_object_set_new(model, "vocab", vocab);
    json_object_set_new(model, "merges", merges);
    static const char *const specials[3] = {"<|im_start|>", "<|im_end|>", "<|endoftext|>"};
    json_t *added = json_array();
    for (int i = 0; i < 3; i++) {
        json_array_append_new(added, json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", SMALL_IM_START + i,
                                               "content", specials[i], "single_word", 0, "lstrip", 0, "rstrip", 0,
                                               "normalized", 0, "special", 1));
    }
    json_object_set_new(root, "added_tokens", added);
    snprintf(path, cap, "%s/small_tokenizer.json", dir);
    int rc = json_dump_file(root, path, JSON_COMPACT);
    json_decref(root);
    return rc == 0;
}

static caprl_text_config tiny_config(int32_t vocab, bool tied) {
    caprl_text_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = vocab;
    c.hidden_size = 32;
    c.intermediate_size = 64;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 8;
    c.max_position_embeddings = 4096;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = tied;
    c.bos_token_id = -1;
    c.eos_token_id = -1;
    c.torch_dtype = -1;
    return c;
}

/* A random f32 reader whose lm_head rows of the letter tokens are scaled by boost (untied models only), so the
 * letters carry a sizeable, prompt-dependent share of the next-token mass. */
static caprl_model *make_model(const caprl_text_config *cfg, int32_t threads, const char *tok_path, float boost,
                               int32_t eos) {
    caprl_model_params mp = caprl_model_default_params();
    mp.n_threads = threads;
    caprl_text_config c = *cfg;
    c.eos_token_id = eos;
    caprl_model *m = NULL;
    caprl_error  err = {0};
    CHECK_OK(caprl_model_init_random(&m, &c, CAPRL_DTYPE_F32, 1234, 0.05f, &mp, &err), &err);
    if (!m) {
        return NULL;
    }
    CHECK_OK(caprl_model_load_tokenizer(m, tok_path, &err), &err);
    if (boost != 1.0f) {
        CHECK(!m->tied && m->lm_head.dtype == CAPRL_DTYPE_F32 && !m->lm_head.packed);
        float *w = (float *)(uintptr_t)m->lm_head.data;
        const caprl_tokenizer *tok = caprl_model_tokenizer(m);
        for (int32_t k = 0; k < 9; k++) {
            char    s[3] = {' ', (char)('A' + k), 0};
            int32_t ids[4];
            int64_t n = 0;
            CHECK_OK(caprl_tokenizer_encode(tok, s, 2, false, ids, 4, &n, &err), &err);
            for (int64_t j = 0; n == 1 && j < m->lm_head.cols; j++) {
                w[(int64_t)ids[0] * m->lm_head.cols + j] *= boost;
            }
        }
    }
    return m;
}

/* An independent reference: the whole prompt through a fresh context, softmax(z / t) in float64. Returns the
 * probabilities of " gold" and of the bare letter byte (the other token whose text starts with the gold letter). */
static void reference_probs(caprl_model *m, const char *tmpl, const char *caption, const char *question, char gold,
                            double t, double *p_space, double *p_bare, double *p_other_letter) {
    caprl_error            err = {0};
    const caprl_tokenizer *tok = caprl_model_tokenizer(m);
    char                  *prompt = NULL;
    CHECK_OK(caprl_reader_prompt(tmpl, caption, question, &prompt, &err), &err);
    size_t   len = strlen(prompt);
    int32_t *ids = malloc((len + 1) * sizeof(int32_t));
    int64_t  n = 0;
    CHECK_OK(caprl_tokenizer_encode(tok, prompt, len, true, ids, (int64_t)len + 1, &n, &err), &err);
    caprl_context_params cp = caprl_context_default_params();
    cp.n_ctx = (int32_t)n + 1;
    cp.n_batch_max = (int32_t)n;
    caprl_context *ctx = NULL;
    CHECK_OK(caprl_context_init(&ctx, m, &cp, &err), &err);
    int32_t *seq = calloc((size_t)n, sizeof(int32_t));
    caprl_batch b = {.n_tokens = (int32_t)n, .tokens = ids, .seq_ids = seq, .want_logits = NULL};
    CHECK_OK(caprl_context_decode(ctx, &b, &err), &err);
    const float *z = caprl_context_logits(ctx, 0);
    int32_t      V = caprl_model_config(m)->vocab_size;
    double       mx = -INFINITY, sum = 0.0;
    for (int32_t i = 0; i < V; i++) {
        mx = fmax(mx, (double)z[i] / t);
    }
    for (int32_t i = 0; i < V; i++) {
        sum += exp((double)z[i] / t - mx);
    }
    char    sp[3] = {' ', gold, 0}, bare[2] = {gold, 0};
    int32_t id_sp[2], id_bare[2];
    int64_t n1 = 0, n2 = 0;
    CHECK_OK(caprl_tokenizer_encode(tok, sp, 2, false, id_sp, 2, &n1, &err), &err);
    CHECK_OK(caprl_tokenizer_encode(tok, bare, 1, false, id_bare, 2, &n2, &err), &err);
    *p_space = exp((double)z[id_sp[0]] / t - mx) / sum;
    *p_bare = exp((double)z[id_bare[0]] / t - mx) / sum;
    if (p_other_letter) { /* mass of the " X" tokens of the other letters A..I */
        double o = 0;
        for (char l = 'A'; l <= 'I'; l++) {
            char    s2[3] = {' ', l, 0};
            int32_t id[2];
            int64_t k = 0;
            CHECK_OK(caprl_tokenizer_encode(tok, s2, 2, false, id, 2, &k, &err), &err);
            o += l == gold ? 0.0 : exp((double)z[id[0]] / t - mx) / sum;
        }
        *p_other_letter = o;
    }
    caprl_context_free(ctx);
    free(seq);
    free(ids);
    caprl_free(prompt);
}

/* The reader prompt's frame without its instructions and examples: with the byte-level vocabulary the full template
 * is 1,100 tokens, which only slows these tests down (the Qwen-tokenizer test runs the real one). */
static const char k_short_template[] = "<|im_start|>user\nCaption: <Caption Start> {} <Caption End>  \nQuestion: {}  "
                                       "<|im_end|>\n<|im_start|>assistant\nThe answer is";

/* ---- QA fixtures ------------------------------------------------------------------------------------------ */

static caprl_qa_item k_qa1[] = {
    {"What color is the car?\n   - A) Red\n   - B) Blue\n   - C) Green\n   - D) Black" CANNOT_E, 'B'},
    {"How many dogs are there?\n   - A) One\n   - B) Two\n   - C) Three\n   - D) Four" CANNOT_E, 'B'},
    {"Is it raining?\n   - A) Yes\n   - B) No", 'A'},
};
static caprl_qa_item k_qa2[] = {
    {"What is on the table?\n   - A) A cup\n   - B) A book\n   - C) A phone" CANNOT_E, 'C'},
};

static const char *const k_captions[] = {
    "A red car parked next to two dogs under a grey sky.",
    " starts with a space and ends with spaces  ",
    "",
    "\nnewline first, newline last\n",
    "has {} braces, <|im_end|> and <|im_start|> inside",
    "\xc3\x9cn\xc3\xaf c\xc3\xb6" "d\xc3\xa9 \xe2\x9c\x93 \xe6\x97\xa5\xe6\x9c\xac",
    "- A) looks like an option\n   - B) too",
};
#define N_CAPTIONS ((int32_t)(sizeof k_captions / sizeof k_captions[0]))

static void make_items(caprl_qa_image *img, caprl_reward_item *items) {
    memset(img, 0, 2 * sizeof *img);
    img[0].id = "img1";
    img[0].qa = k_qa1;
    img[0].n_qa = 3;
    img[1].id = "img2";
    img[1].qa = k_qa2;
    img[1].n_qa = 1;
    for (int32_t i = 0; i < N_CAPTIONS; i++) {
        items[i].caption = k_captions[i];
        items[i].qa = &img[i % 2];
        items[i].stream_id = 100 + (uint64_t)i * 7;
        items[i].caption_tokens = 2000 + 200 * i;
    }
}

static void free_results(caprl_reward_result *r, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        caprl_reward_result_clear(&r[i]);
    }
}

/* Prefix-cached expected scores equal full-prompt ones and the float64 reference; the shared work is smaller. */
static void check_cached_vs_full(caprl_model *m, const char *label, const char *tmpl, int32_t n_questions,
                                 int32_t n_ref) {
    caprl_error         err = {0};
    caprl_reader       *r = NULL;
    caprl_reader_params rp = caprl_reader_default_params();
    rp.template_text = tmpl;
    rp.max_captions = 3; /* several chunks, and waves smaller than a chunk's questions */
    rp.max_sequences = 5;
    rp.n_batch_max = 97;
    CHECK_OK(caprl_reader_init(&r, m, &rp, &err), &err);
    if (!r) {
        return;
    }
    CHECK(caprl_reader_prefix_tokens(r) > (tmpl ? 10 : 100));
    caprl_qa_image      img[2];
    caprl_reward_item   items[N_CAPTIONS];
    caprl_reward_result cached[N_CAPTIONS], full[N_CAPTIONS];
    make_items(img, items);
    caprl_reward_params p = caprl_reward_default_params();
    p.mode = CAPRL_REWARD_EXPECTED;
    p.seed = 7;
    p.n_questions = n_questions;
    CHECK_OK(caprl_reward_score(r, items, N_CAPTIONS, &p, cached, &err), &err);
    p.prefix_cache = false;
    CHECK_OK(caprl_reward_score(r, items, N_CAPTIONS, &p, full, &err), &err);
    int64_t tok_cached = 0, tok_full = 0;
    double  max_rel = 0;
    for (int32_t i = 0; i < N_CAPTIONS; i++) {
        tok_cached += cached[i].reader_tokens;
        tok_full += full[i].reader_tokens;
        double sum = 0;
        for (int32_t k = 0; k < p.n_questions; k++) {
            caprl_reward_question *a = &cached[i].questions[k], *b = &full[i].questions[k];
            CHECK_STR_EQ(a->text, b->text);
            CHECK(a->gold == b->gold && a->qa_index == b->qa_index);
            CHECK_NEAR(a->p_gold, b->p_gold, 4e-6, 1e-9); /* same logits up to f32 summation order */
            CHECK(a->score == a->p_gold && a->continuation == NULL);
            sum += a->score;
            if (k < n_ref) { /* the independent reference for a few questions per caption */
                double ps, pb;
                reference_probs(m, caprl_reader_template(r), items[i].caption, a->text, a->gold, 0.6, &ps,
                                &pb, NULL);
                CHECK_NEAR(a->p_gold, ps, 2e-5, 1e-9);
                max_rel = fmax(max_rel, fabs(a->p_gold - ps) / fmax(ps, 1e-30));
            }
        }
        CHECK_NEAR(cached[i].accuracy, sum / p.n_questions, 1e-6, 0);
        CHECK(cached[i].reward == cached[i].accuracy); /* no length term by default */
        CHECK(cached[i].prompt_tokens == full[i].prompt_tokens);
    }
    fprintf(stderr, "%s: reader tokens cached %lld vs full %lld (%.2fx); max rel. diff vs float64 reference %.2g\n",
            label, (long long)tok_cached, (long long)tok_full, (double)tok_full / (double)tok_cached, max_rel);
    CHECK(tok_cached * 2 < tok_full);
    free_results(cached, N_CAPTIONS);
    free_results(full, N_CAPTIONS);
    caprl_reader_free(r);
}

/* Same items through readers with other chunk, wave, batch and thread settings, in another order, alone: the
 * same draws, texts, continuations and scores. */
static void check_batch_independence(caprl_model *m1, caprl_model *m2, const char *tmpl) {
    caprl_error         err = {0};
    caprl_reader       *ra = NULL, *rb = NULL;
    caprl_reader_params pa = caprl_reader_default_params(), pb = caprl_reader_default_params();
    pa.template_text = tmpl;
    pb.template_text = tmpl;
    pb.max_captions = 1;
    pb.max_sequences = 3;
    pb.n_batch_max = 7;
    CHECK_OK(caprl_reader_init(&ra, m1, &pa, &err), &err);
    CHECK_OK(caprl_reader_init(&rb, m2, &pb, &err), &err);
    if (!ra || !rb) {
        caprl_reader_free(ra);
        caprl_reader_free(rb);
        return;
    }
    caprl_qa_image    img[2];
    caprl_reward_item items[N_CAPTIONS], rev[N_CAPTIONS];
    make_items(img, items);
    for (int32_t i = 0; i < N_CAPTIONS; i++) {
        rev[i] = items[N_CAPTIONS - 1 - i];
    }
    for (int32_t mode = 0; mode < CAPRL_REWARD_MODE_COUNT; mode++) {
        caprl_reward_params p = caprl_reward_default_params();
        p.mode = mode;
        p.seed = 99;
        p.n_questions = 4;
        p.max_new_tokens = 4;
        p.length_weight = 0.2f;
        caprl_reward_result a[N_CAPTIONS], b[N_CAPTIONS], one;
        CHECK_OK(caprl_reward_score(ra, items, N_CAPTIONS, &p, a, &err), &err);
        CHECK_OK(caprl_reward_score(rb, rev, N_CAPTIONS, &p, b, &err), &err);
        int32_t n_letters = 0, n_cont = 0;
        for (int32_t i = 0; i < N_CAPTIONS; i++) {
            const caprl_reward_result *x = &a[i], *y = &b[N_CAPTIONS - 1 - i];
            CHECK(x->reward == y->reward && x->accuracy == y->accuracy && x->length == y->length);
            CHECK(x->reader_tokens > 0);
            for (int32_t k = 0; k < p.n_questions; k++) {
                const caprl_reward_question *qx = &x->questions[k], *qy = &y->questions[k];
                CHECK(qx->qa_index == qy->qa_index && qx->gold == qy->gold && qx->shuffled == qy->shuffled);
                CHECK_STR_EQ(qx->text, qy->text);
                CHECK_MSG(qx->p_gold == qy->p_gold, "%.9g vs %.9g", qx->p_gold, qy->p_gold);
                CHECK(qx->score == qy->score);
                if (mode == CAPRL_REWARD_SAMPLE) {
                    CHECK_STR_EQ(qx->continuation, qy->continuation);
                    CHECK(qx->answer == qy->answer);
                    CHECK(qx->score == (qx->answer == qx->gold ? 1.0f : 0.0f));
                    n_letters += qx->answer != 0;
                    n_cont += qx->continuation[0] != '\0';
                }
            }
            /* length term: 2000 + 200 i policy tokens against 2048 / 3072 */
            float want_len = caprl_reward_length_term(items[i].caption_tokens, 2048, 3072);
            CHECK(x->length == want_len);
            CHECK_NEAR(x->reward, x->accuracy + 0.2 * want_len, 1e-6, 0);
        }
        if (mode == CAPRL_REWARD_SAMPLE) {
            CHECK(n_cont > 0 && n_letters > 0);
        }
        /* one item alone gives its result in the batch */
        CHECK_OK(caprl_reward_score(rb, &items[3], 1, &p, &one, &err), &err);
        CHECK(one.reward == a[3].reward);
        for (int32_t k = 0; k < p.n_questions; k++) {
            CHECK_STR_EQ(one.questions[k].text, a[3].questions[k].text);
            CHECK(one.questions[k].p_gold == a[3].questions[k].p_gold);
        }
        caprl_reward_result_clear(&one);
        /* another seed draws differently */
        p.seed = 100;
        CHECK_OK(caprl_reward_score(ra, items, 1, &p, &one, &err), &err);
        bool differ = false;
        for (int32_t k = 0; k < p.n_questions; k++) {
            differ = differ || strcmp(one.questions[k].text, a[0].questions[k].text) != 0;
        }
        CHECK(differ);
        caprl_reward_result_clear(&one);
        free_results(a, N_CAPTIONS);
        free_results(b, N_CAPTIONS);
    }
    caprl_reader_free(ra);
    caprl_reader_free(rb);
}

/* `expected` against `sample`: with max_new_tokens 1 and temperature = tau, the sample score of a question is a
 * Bernoulli variable with mean E = p(" gold") + p("gold") (the two tokens whose text starts with the gold letter in
 * this vocabulary), while `expected` reports p(" gold"). Over K independent draws the sum of sample scores is
 * within 5 sigma = 5 sqrt(sum E (1 - E)) of sum E (a false failure has probability < 1e-6), and
 * |mean sample - mean expected| <= 5 sigma / K + mean p("gold"). */
static void check_expected_vs_sample(caprl_model *m) {
    caprl_error         err = {0};
    caprl_reader       *r = NULL;
    caprl_reader_params rp = caprl_reader_default_params();
    rp.template_text = "Caption: {}\nQuestion: {}\nThe answer is";
    rp.max_sequences = 256;
    CHECK_OK(caprl_reader_init(&r, m, &rp, &err), &err);
    if (!r) {
        return;
    }
    caprl_qa_item  qa[2] = {{"Which fruit is shown?\n   - A) Apple\n   - B) Pear\n   - C) Plum\n   - D) Fig", 'C'},
                            {"Which way?\n   - A) Left\n   - B) Right", 'A'}};
    caprl_qa_image img;
    memset(&img, 0, sizeof img);
    img.id = "fruit";
    img.qa = qa;
    img.n_qa = 2;
    caprl_reward_item it = {"A plum on a plate.", &img, 5, -1};

    /* shuffle off, one question: the gold letter is the one whose probability is nearest 0.3, so the comparison
     * has power whatever the random reader prefers */
    double best = 2.0;
    for (char l = 'A'; l <= 'D'; l++) {
        double ps, pb;
        reference_probs(m, rp.template_text, it.caption, qa[0].question, l, 0.6, &ps, &pb, NULL);
        if (fabs(ps - 0.3) < best) {
            best = fabs(ps - 0.3);
            qa[0].gold = l;
        }
    }
    for (int32_t shuffle = 0; shuffle < 2; shuffle++) {
        caprl_reward_params p = caprl_reward_default_params();
        img.n_qa = shuffle ? 2 : 1;
        p.shuffle = shuffle != 0;
        p.n_questions = shuffle ? 300 : 2000;
        p.max_new_tokens = 1;
        p.seed = 3;
        caprl_reward_result rs, re;
        p.mode = CAPRL_REWARD_SAMPLE;
        CHECK_OK(caprl_reward_score(r, &it, 1, &p, &rs, &err), &err);
        p.mode = CAPRL_REWARD_EXPECTED;
        CHECK_OK(caprl_reward_score(r, &it, 1, &p, &re, &err), &err);
        if (rs.n_questions != p.n_questions || re.n_questions != p.n_questions) {
            free_results(&rs, 1);
            free_results(&re, 1);
            continue;
        }
        /* references per distinct presented question */
        enum { MAXD = 64 };
        const char *dtext[MAXD];
        double      dps[MAXD], dpb[MAXD], dpo[MAXD];
        int32_t     nd = 0;
        double      sum_s = 0, sum_e = 0, sum_var = 0, sum_p = 0, sum_pb = 0, sum_other = 0;
        for (int32_t k = 0; k < p.n_questions; k++) {
            const caprl_reward_question *qs = &rs.questions[k], *qe = &re.questions[k];
            CHECK_STR_EQ(qs->text, qe->text); /* both modes see the same draws and shuffles */
            CHECK(qs->gold == qe->gold);
            CHECK_NEAR(qs->p_gold, qe->p_gold, 4e-6, 1e-9);
            int32_t d = 0;
            while (d < nd && strcmp(dtext[d], qs->text) != 0) {
                d++;
            }
            if (d == nd && nd < MAXD) {
                dtext[nd] = qs->text;
                reference_probs(m, rp.template_text, it.caption, qs->text, qs->gold, 0.6, &dps[nd], &dpb[nd],
                                &dpo[nd]);
                CHECK_NEAR(qe->p_gold, dps[nd], 2e-5, 1e-9);
                nd++;
            }
            if (d >= MAXD) {
                continue;
            }
            double e = dps[d] + dpb[d];
            sum_s += qs->score;
            sum_e += e;
            sum_var += e * (1 - e);
            sum_p += qe->score;
            sum_pb += dpb[d];
            sum_other += dpo[d];
        }
        double K = p.n_questions, sigma = sqrt(sum_var);
        fprintf(stderr,
                "expected vs sample (shuffle %s, %d draws, %d distinct prompts): mean sample %.4f, mean E %.4f, mean "
                "expected %.4f, 5 sigma %.4f, mean p(bare letter) %.4f, mean p(other letters) %.4f\n",
                shuffle ? "on" : "off", p.n_questions, nd, sum_s / K, sum_e / K, sum_p / K, 5 * sigma / K,
                sum_pb / K, sum_other / K);
        CHECK(sum_e / K > (shuffle ? 0.02 : 0.1) && sum_e / K < 0.95); /* the letters carry real mass */
        CHECK(fabs(sum_s - sum_e) <= 5 * sigma);
        CHECK(fabs(sum_s - sum_p) <= 5 * sigma + sum_pb);
        CHECK_NEAR(re.accuracy, sum_p / K, 1e-5, 0);
        if (shuffle) {
            CHECK(nd > 10);
        }
        free_results(&rs, 1);
        free_results(&re, 1);
    }
    caprl_reader_free(r);
}

static void check_reader_errors(caprl_model *m) {
    caprl_error         err = {0};
    caprl_reader       *r = NULL;
    caprl_reader_params rp = caprl_reader_default_params();
    rp.template_text = "one {} only";
    CHECK_STATUS(caprl_reader_init(&r, m, &rp, &err), CAPRL_ERR_FORMAT);
    CHECK(r == NULL);
    rp = caprl_reader_default_params();
    rp.n_ctx_max = 64;
    CHECK_OK(caprl_reader_init(&r, m, &rp, &err), &err);
    if (!r) {
        return;
    }
    const int32_t *ids = caprl_reader_letter_ids(r);
    for (int32_t k = 0; k < 9; k++) {
        CHECK_EQ_I64(ids[k], 256 + k);
    }
    caprl_qa_item       bad[1] = {{"Q?\n   - A) x\n   not an option", 'A'}};
    caprl_qa_image      img = {.id = "bad-image", .qa = bad, .n_qa = 1};
    caprl_reward_item   it = {"cap", &img, 1, -1};
    caprl_reward_result res;
    caprl_reward_params p = caprl_reward_default_params();
    CHECK_STATUS(caprl_reward_score(r, &it, 1, &p, &res, &err), CAPRL_ERR_FORMAT);
    CHECK(strstr(err.msg, "bad-image") != NULL && strstr(err.msg, "not an option") != NULL);
    caprl_reward_result_clear(&res);
    img.qa = k_qa2;
    CHECK_STATUS(caprl_reward_score(r, &it, 1, &p, &res, &err), CAPRL_ERR_INVALID_ARG); /* longer than n_ctx_max */
    CHECK(strstr(err.msg, "n_ctx_max") != NULL);
    caprl_reward_result_clear(&res);
    it.caption = "bad \xff utf-8";
    CHECK_STATUS(caprl_reward_score(r, &it, 1, &p, &res, &err), CAPRL_ERR_INVALID_ARG);
    caprl_reward_result_clear(&res);
    p.n_questions = 0;
    CHECK_STATUS(caprl_reward_score(r, &it, 1, &p, &res, &err), CAPRL_ERR_INVALID_ARG);
    caprl_reader_free(r);
}

int main(void) {
    test_sha256();
    test_template();
    test_shuffle_basic();
    test_shuffle_cases();
    test_parse_letter();
    test_length_term();

    if (access(QWEN_TOKENIZER, R_OK) != 0) {
        fprintf(stderr, "test_reward: %s missing: reader tests skipped\n", QWEN_TOKENIZER);
        int rc = test_finish("test_reward");
        return rc ? rc : 77;
    }
    char *dir = test_tmpdir("test_reward");
    char  small_tok[4200];
    CHECK(write_small_tokenizer(dir, small_tok, sizeof small_tok));
    caprl_text_config small = tiny_config(SMALL_V, false);
    caprl_model      *m1 = make_model(&small, 1, small_tok, 12.0f, SMALL_IM_END);
    caprl_model      *m2 = make_model(&small, 2, small_tok, 12.0f, SMALL_IM_END);
    if (m1 && m2) {
        check_reader_errors(m1);
        check_cached_vs_full(m1, "small tokenizer", k_short_template, 8, 3);
        check_batch_independence(m1, m2, k_short_template);
        check_expected_vs_sample(m1);
    }
    caprl_model_free(m1);
    caprl_model_free(m2);

    /* the real Qwen tokenizer: merges across the caption boundaries */
    caprl_text_config qc = tiny_config(151936, true);
    caprl_model      *mq = make_model(&qc, 1, QWEN_TOKENIZER, 1.0f, 151645);
    if (mq) {
        check_cached_vs_full(mq, "qwen tokenizer", NULL, 4, 2);
    }
    caprl_model_free(mq);
    free(dir);
    return test_finish("test_reward");
}
