/* BPE training (caprl_bpe_train): merges derived by hand on tiny corpora (including the tie-break rule), the same
 * merges as a naive trainer that recounts every pair from scratch at each step, the tokenizer.json layout against
 * Qwen2's real file, loading the result with caprl's loader, encode/decode round trips of the corpus and of
 * arbitrary UTF-8 (unseen bytes, emoji, NUL, a decomposed accent), fewer tokens than bytes, the corpus token count
 * the trainer predicts, added tokens as single ids, determinism, and every error. */
#include <jansson.h>
#include <time.h>

#include "caprl/tokenizer.h"
#include "caprl_test.h"
#include "text/tokenizer_impl.h"

#define QWEN_TOKENIZER CAPRL_SHARED_DIR "/data/qwen-tokenizer/tokenizer.json"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* GPT-2's bytes_to_unicode, written from its definition: the printable bytes keep their code point, the others
 * take 256, 257, ... in byte order. */
static uint32_t b2u(uint8_t b) {
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE) {
        return b;
    }
    uint32_t n = 0;
    for (uint32_t c = 0; c < b; c++) {
        bool printable = (c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE;
        n += !printable;
    }
    return 256 + n;
}

/* Byte-level string of raw bytes p[0..n) into out (NUL-terminated). */
static void byte_level(const uint8_t *p, size_t n, char *out) {
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = b2u(p[i]);
        if (cp < 0x80) {
            out[o++] = (char)cp;
        } else {
            out[o++] = (char)(0xC0 | (cp >> 6));
            out[o++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    out[o] = '\0';
}

static char *train_ok(const char *corpus, size_t len, caprl_bpe_train_params p, caprl_bpe_train_stats *stats) {
    char       *json = NULL;
    size_t      json_len = 0;
    caprl_error err = {0};
    CHECK_OK(caprl_bpe_train(corpus, len, "test-corpus", &p, &json, &json_len, stats, &err), &err);
    CHECK(json == NULL || strlen(json) == json_len);
    return json;
}

static json_t *parse(const char *json) {
    json_error_t jerr;
    json_t      *j = json ? json_loads(json, JSON_REJECT_DUPLICATES, &jerr) : NULL;
    CHECK_MSG(j != NULL, "%s", json ? jerr.text : "no JSON");
    return j;
}

/* Checks that merges[i] is [left[i], right[i]] and that vocab[left+right] == 256 + i (all new tokens). */
static void check_merges(const char *json, const char *const (*want)[2], size_t n_want) {
    json_t *j = parse(json);
    if (!j) {
        return;
    }
    const json_t *model  = json_object_get(j, "model");
    const json_t *merges = json_object_get(model, "merges");
    const json_t *vocab  = json_object_get(model, "vocab");
    CHECK_EQ_I64(json_array_size(merges), n_want);
    CHECK_EQ_I64(json_object_size(vocab), 256 + n_want);
    for (size_t i = 0; i < n_want && i < json_array_size(merges); i++) {
        const json_t *m = json_array_get(merges, i);
        const char   *l = json_string_value(json_array_get(m, 0)), *r = json_string_value(json_array_get(m, 1));
        CHECK_MSG(l && r && strcmp(l, want[i][0]) == 0 && strcmp(r, want[i][1]) == 0, "merge %zu: [%s, %s], want "
                  "[%s, %s]", i, l ? l : "?", r ? r : "?", want[i][0], want[i][1]);
        char cat[256];
        snprintf(cat, sizeof cat, "%s%s", want[i][0], want[i][1]);
        CHECK_EQ_I64(json_integer_value(json_object_get(vocab, cat)), 256 + (int64_t)i);
    }
    json_decref(j);
}

/* ---- hand-derived merges ------------------------------------------------------------------------------------ */

static void test_hand_merges(void) {
    caprl_bpe_train_params p = caprl_bpe_train_default_params();
    p.qwen_added             = false;
    p.min_frequency          = 1;

    /* One word (all letters), "aaabdaaabac". Pair counts: aa 4 (aaa counts twice), ab 2, bd da ba ac 1.
     * 1. (a,a) -> Z a b d Z a b a c        counts: Za 2, ab 2, bd 1, dZ 1, ba 1, ac 1
     * 2. tie at 2: left "a" < "aa" -> (a,b) -> Z Y d Z Y a c    counts: ZY 2, Yd 1, dZ 1, Ya 1, ac 1
     * 3. (aa,ab) -> X d X a c; all at 1: left bytes "a" (ac) < "aaab" < "d" -> (a,c)
     * 4. (X,ac) vs (X,d) vs (d,X): left "aaab" twice, right "ac" < "d" -> (aaab,ac) */
    static const char *const want_a[][2] = {{"a", "a"}, {"a", "b"}, {"aa", "ab"}, {"a", "c"}, {"aaab", "ac"}};
    p.vocab_size                         = 256 + 5;
    caprl_bpe_train_stats st;
    char                 *json = train_ok("aaabdaaabac", 11, p, &st);
    check_merges(json, want_a, 5);
    CHECK_EQ_I64(st.n_words, 1);
    CHECK_EQ_I64(st.corpus_tokens, 3); /* aaab d aaabac */
    free(json);

    /* Pre-split words: "hug" 1, " hug" 2, " pug" 1, " pun" 1, " bun" 1, " hugs" 1 (the space joins the word).
     * ug 5 -> "ug"; h ug 4 -> "hug"; Ġ hug 3 -> "Ġhug"; then Ġp 2 and un 2 tie: the left token " " (byte 0x20)
     * comes before "u" in byte order (its byte-level form Ġ = U+0120 would not) -> "Ġp"; then un 2 -> "un". */
    static const char *const want_h[][2] = {{"u", "g"}, {"h", "ug"}, {"Ġ", "hug"}, {"Ġ", "p"}, {"u", "n"}};
    const char              *hug         = "hug hug hug pug pun bun hugs";
    json = train_ok(hug, strlen(hug), p, &st);
    check_merges(json, want_h, 5);
    CHECK_EQ_I64(st.n_pieces, 7);
    CHECK_EQ_I64(st.n_words, 6);
    CHECK(!st.exhausted);
    free(json);

    /* min_frequency 3 stops after the three merges seen at least 3 times */
    p.min_frequency = 3;
    p.vocab_size    = 1000;
    json            = train_ok(hug, strlen(hug), p, &st);
    check_merges(json, want_h, 3);
    CHECK(st.exhausted);
    CHECK_EQ_I64(st.n_vocab, 259);
    free(json);
}

/* ---- a naive reference trainer: recounts all pairs at every step ------------------------------------------- */

typedef struct naive_tok {
    uint8_t b[64];
    size_t  n;
} naive_tok;

typedef struct naive_pair {
    int32_t a, b;
    int64_t f;
} naive_pair;

static int cmp_pair_ids(const void *x, const void *y) {
    const naive_pair *p = x, *q = y;
    if (p->a != q->a) {
        return p->a < q->a ? -1 : 1;
    }
    return p->b < q->b ? -1 : p->b > q->b;
}

static int cmp_tok(const naive_tok *x, const naive_tok *y) {
    size_t n = x->n < y->n ? x->n : y->n;
    int    c = memcmp(x->b, y->b, n);
    return c ? c : (x->n < y->n ? -1 : x->n > y->n);
}

/* Trains on text (no added tokens, already NFC) until 256 + n_merges tokens (at most 2 * n_merges merges, as a
 * merge may reuse a token) and writes each merge's two byte-level strings to out. */
static size_t naive_train(const char *text, size_t len, size_t n_merges, int64_t min_freq, char (*out)[2][200]) {
    size_t  cap_pieces = len + 1;
    size_t *ends       = malloc(cap_pieces * sizeof *ends);
    size_t  n_pieces   = caprl_pretok_split((const uint8_t *)text, len, ends, cap_pieces);
    /* distinct words (quadratic, small corpus) */
    int32_t  **sym  = calloc(n_pieces, sizeof *sym);
    size_t    *slen = calloc(n_pieces, sizeof *slen);
    int64_t   *freq = calloc(n_pieces, sizeof *freq);
    size_t    *wo   = calloc(n_pieces, sizeof *wo);
    size_t     n_words = 0;
    naive_tok *toks    = calloc(256 + n_merges, sizeof *toks);
    size_t     n_toks  = 256;
    for (size_t b = 0; b < 256; b++) {
        toks[b].b[0] = (uint8_t)b;
        toks[b].n    = 1;
    }
    for (size_t i = 0, start = 0; i < n_pieces; start = ends[i++]) {
        size_t n = ends[i] - start, w;
        for (w = 0; w < n_words; w++) {
            if (slen[w] == n && memcmp(text + wo[w], text + start, n) == 0) {
                break;
            }
        }
        if (w == n_words) {
            wo[w]   = start;
            slen[w] = n;
            sym[w]  = malloc(n * sizeof *sym[w]);
            for (size_t k = 0; k < n; k++) {
                sym[w][k] = (uint8_t)text[start + k];
            }
            n_words++;
        }
        freq[w]++;
    }
    size_t      done  = 0;
    naive_pair *pairs = malloc((len + 1) * sizeof *pairs);
    while (n_toks < 256 + n_merges && done < 2 * n_merges) {
        size_t np = 0;
        for (size_t w = 0; w < n_words; w++) {
            for (size_t k = 0; k + 1 < slen[w]; k++) {
                pairs[np++] = (naive_pair){sym[w][k], sym[w][k + 1], freq[w]};
            }
        }
        qsort(pairs, np, sizeof *pairs, cmp_pair_ids);
        naive_pair best = {-1, -1, 0};
        for (size_t i = 0; i < np;) {
            naive_pair s = pairs[i++];
            while (i < np && pairs[i].a == s.a && pairs[i].b == s.b) {
                s.f += pairs[i++].f;
            }
            int c = 0;
            if (best.a >= 0 && s.f == best.f) {
                c = cmp_tok(&toks[s.a], &toks[best.a]);
                c = c ? c : cmp_tok(&toks[s.b], &toks[best.b]);
            }
            if (best.a < 0 || s.f > best.f || (s.f == best.f && c < 0)) {
                best = s;
            }
        }
        if (best.a < 0 || best.f < min_freq) {
            break;
        }
        naive_tok z = toks[best.a];
        if (z.n + toks[best.b].n > sizeof z.b) {
            CHECK_MSG(false, "naive trainer: token longer than %zu bytes", sizeof z.b);
            break;
        }
        memcpy(z.b + z.n, toks[best.b].b, toks[best.b].n);
        z.n += toks[best.b].n;
        int32_t zid = -1;
        for (size_t t = 0; t < n_toks && zid < 0; t++) {
            if (cmp_tok(&toks[t], &z) == 0) {
                zid = (int32_t)t;
            }
        }
        if (zid < 0) {
            zid           = (int32_t)n_toks;
            toks[n_toks++] = z;
        }
        byte_level(toks[best.a].b, toks[best.a].n, out[done][0]);
        byte_level(toks[best.b].b, toks[best.b].n, out[done][1]);
        done++;
        for (size_t w = 0; w < n_words; w++) {
            size_t o = 0;
            for (size_t k = 0; k < slen[w];) {
                if (k + 1 < slen[w] && sym[w][k] == best.a && sym[w][k + 1] == best.b) {
                    sym[w][o++] = zid;
                    k += 2;
                } else {
                    sym[w][o++] = sym[w][k++];
                }
            }
            slen[w] = o;
        }
    }
    for (size_t w = 0; w < n_words; w++) {
        free(sym[w]);
    }
    free(sym);
    free(slen);
    free(freq);
    free(wo);
    free(toks);
    free(pairs);
    free(ends);
    return done;
}

/* ---- generated corpora -------------------------------------------------------------------------------------- */

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static uint32_t rnd(uint32_t n) {
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)((g_rng >> 33) % n);
}

typedef struct buf {
    char  *p;
    size_t n, cap;
} buf;

static void put(buf *b, const char *s) {
    size_t n = strlen(s);
    if (b->n + n + 1 > b->cap) {
        b->cap = 2 * (b->n + n + 1);
        b->p   = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, s, n + 1);
    b->n += n;
}

/* Lines of pseudo-words with punctuation, numbers, contractions, whitespace runs, CRLF, and (if rich) precomposed
 * accents, CJK, emoji and added tokens. */
static char *make_corpus(size_t target, bool rich, size_t *len) {
    static const char *const syl[]   = {"the", "ca", "pr", "ion", "ing", "er", "an", "st", "o", "re", "model", "to",
                                        "im", "age", "cap", "tion", "a", "of", "in", "un", "de", "x", "qu", "ly"};
    static const char *const punct[] = {".", ",", "!", "?", ";", ":", "...", "(", ")", "\"", "'s", "'ll", " -", "--"};
    static const char *const extra[] = {"café", "naïve", "Überraschung", "中文字", "😀", "ñandú", "été", "Ωmega"};
    buf b = {0};
    while (b.n < target) {
        size_t n_words = 3 + rnd(12);
        for (size_t w = 0; w < n_words; w++) {
            if (w > 0) {
                put(&b, rnd(20) == 0 ? "  " : rnd(30) == 0 ? "\t" : " ");
            }
            uint32_t kind = rnd(20);
            if (rich && kind == 0) {
                put(&b, extra[rnd(sizeof extra / sizeof extra[0])]);
            } else if (kind == 1) {
                char num[16];
                snprintf(num, sizeof num, "%u", rnd(5000));
                put(&b, num);
            } else {
                size_t n_syl = 1 + rnd(3);
                for (size_t s = 0; s < n_syl; s++) {
                    put(&b, syl[rnd(sizeof syl / sizeof syl[0])]);
                }
                if (rnd(12) == 0) {
                    put(&b, "ed");
                }
            }
            if (rnd(6) == 0) {
                put(&b, punct[rnd(sizeof punct / sizeof punct[0])]);
            }
        }
        if (rich && rnd(15) == 0) {
            put(&b, rnd(2) ? "<|im_end|>" : "<|im_start|>assistant");
        }
        put(&b, rnd(25) == 0 ? "\r\n" : rnd(10) == 0 ? "\n\n" : "\n");
    }
    *len = b.n;
    return b.p;
}

static void test_naive_reference(void) {
    size_t len;
    g_rng      = 7;
    char *text = make_corpus(12000, false, &len);
    for (int64_t min_freq = 1; min_freq <= 2; min_freq++) {
        enum { N_MERGES = 150 };
        char(*want)[2][200] = calloc(2 * N_MERGES, sizeof *want);
        size_t n_want       = naive_train(text, len, N_MERGES, min_freq, want);
        CHECK_EQ_I64(n_want, N_MERGES);

        caprl_bpe_train_params p = caprl_bpe_train_default_params();
        p.qwen_added             = false;
        p.min_frequency          = (int32_t)min_freq;
        p.vocab_size             = 256 + N_MERGES;
        caprl_bpe_train_stats st;
        char                 *json = train_ok(text, len, p, &st);
        json_t               *j    = parse(json);
        const json_t         *m    = json_object_get(json_object_get(j, "model"), "merges");
        CHECK_EQ_I64(json_array_size(m), n_want);
        size_t bad = 0;
        for (size_t i = 0; i < n_want && i < json_array_size(m); i++) {
            const char *l = json_string_value(json_array_get(json_array_get(m, i), 0));
            const char *r = json_string_value(json_array_get(json_array_get(m, i), 1));
            if (bad < 3 && (!l || !r || strcmp(l, want[i][0]) != 0 || strcmp(r, want[i][1]) != 0)) {
                CHECK_MSG(false, "min_freq %d merge %zu: [%s, %s], naive [%s, %s]", (int)min_freq, i, l ? l : "?",
                          r ? r : "?", want[i][0], want[i][1]);
                bad++;
            }
        }
        json_decref(j);
        free(json);
        free(want);
    }
    free(text);
}

/* ---- layout against Qwen2's tokenizer.json ------------------------------------------------------------------ */

static void test_layout_vs_qwen(void) {
    size_t len;
    g_rng      = 11;
    char *text = make_corpus(20000, true, &len);
    caprl_bpe_train_params p = caprl_bpe_train_default_params();
    p.vocab_size             = 400;
    char   *json             = train_ok(text, len, p, NULL);
    json_t *ours             = parse(json);
    json_error_t jerr;
    json_t      *qwen = json_load_file(QWEN_TOKENIZER, 0, &jerr);
    CHECK_MSG(qwen != NULL, "%s: %s", QWEN_TOKENIZER, jerr.text);
    if (ours && qwen) {
        /* same keys in the same order at the top and in the model */
        const char *kq, *ko;
        json_t     *vq, *vo;
        void       *iq = json_object_iter(qwen), *io = json_object_iter(ours);
        for (; iq && io; iq = json_object_iter_next(qwen, iq), io = json_object_iter_next(ours, io)) {
            kq = json_object_iter_key(iq);
            ko = json_object_iter_key(io);
            CHECK_STR_EQ(ko, kq);
            vq = json_object_iter_value(iq);
            vo = json_object_iter_value(io);
            if (strcmp(kq, "model") != 0 && strcmp(kq, "added_tokens") != 0) {
                CHECK_MSG(json_equal(vq, vo), "top-level \"%s\" differs from Qwen2's", kq);
            }
        }
        CHECK(iq == NULL && io == NULL);
        const json_t *mq = json_object_get(qwen, "model"), *mo = json_object_get(ours, "model");
        iq = json_object_iter((json_t *)(uintptr_t)mq);
        io = json_object_iter((json_t *)(uintptr_t)mo);
        for (; iq && io; iq = json_object_iter_next((json_t *)(uintptr_t)mq, iq),
                         io = json_object_iter_next((json_t *)(uintptr_t)mo, io)) {
            kq = json_object_iter_key(iq);
            CHECK_STR_EQ(json_object_iter_key(io), kq);
            if (strcmp(kq, "vocab") != 0 && strcmp(kq, "merges") != 0) {
                CHECK_MSG(json_equal(json_object_iter_value(iq), json_object_iter_value(io)), "model.%s differs", kq);
            }
        }
        CHECK(iq == NULL && io == NULL);
        /* the 22 added tokens: same entries, ids after our vocab */
        const json_t *aq = json_object_get(qwen, "added_tokens"), *ao = json_object_get(ours, "added_tokens");
        size_t        n_vocab = json_object_size(json_object_get(mo, "vocab"));
        CHECK_EQ_I64(json_array_size(ao), 22);
        CHECK_EQ_I64(n_vocab + 22, 400);
        for (size_t i = 0; i < json_array_size(aq) && i < json_array_size(ao); i++) {
            json_t *q = json_deep_copy(json_array_get(aq, i));
            json_object_set_new(q, "id", json_integer((json_int_t)(n_vocab + i)));
            CHECK_MSG(json_equal(q, json_array_get(ao, i)), "added_tokens[%zu] differs", i);
            json_decref(q);
        }
        /* ids 0..255 are Qwen2's byte tokens */
        const json_t *vocq = json_object_get(mq, "vocab"), *voco = json_object_get(mo, "vocab");
        const char   *key;
        json_t       *val;
        int           n_bytes = 0;
        json_object_foreach((json_t *)(uintptr_t)voco, key, val) {
            if (json_integer_value(val) < 256) {
                n_bytes++;
                CHECK_MSG(json_equal(val, json_object_get(vocq, key)), "byte token %s", key);
            }
        }
        CHECK_EQ_I64(n_bytes, 256);
        /* each merge result is in the vocab, as the format requires */
        const json_t *merges = json_object_get(mo, "merges");
        for (size_t i = 0; i < json_array_size(merges); i++) {
            char cat[512];
            snprintf(cat, sizeof cat, "%s%s", json_string_value(json_array_get(json_array_get(merges, i), 0)),
                     json_string_value(json_array_get(json_array_get(merges, i), 1)));
            CHECK_MSG(json_object_get(voco, cat) != NULL, "merge %zu result %s not in vocab", i, cat);
        }
    }
    json_decref(qwen);
    json_decref(ours);
    free(json);
    free(text);
}

/* ---- load, encode, decode ----------------------------------------------------------------------------------- */

static int64_t encode(const caprl_tokenizer *tok, const char *s, size_t n, int32_t **ids, int64_t *cap) {
    caprl_error err = {0};
    int64_t     n_ids = 0;
    caprl_status st   = caprl_tokenizer_encode(tok, s, n, true, *ids, *cap, &n_ids, &err);
    if (st == CAPRL_OK && n_ids > *cap) {
        *cap = n_ids;
        *ids = realloc(*ids, (size_t)n_ids * sizeof **ids);
        st   = caprl_tokenizer_encode(tok, s, n, true, *ids, *cap, &n_ids, &err);
    }
    CHECK_MSG(st == CAPRL_OK, "%s", err.msg);
    return st == CAPRL_OK ? n_ids : -1;
}

/* decode(encode(s)) == want (s itself unless NFC changes it) */
static void check_round_trip(const caprl_tokenizer *tok, const char *s, size_t n, const char *want, size_t want_n) {
    int32_t *ids   = NULL;
    int64_t  cap   = 0;
    int64_t  n_ids = encode(tok, s, n, &ids, &cap);
    if (n_ids < 0) {
        free(ids);
        return;
    }
    size_t      cap_out = 4 * n + 16, out_len = 0;
    char       *out     = malloc(cap_out);
    caprl_error err     = {0};
    CHECK_OK(caprl_tokenizer_decode(tok, ids, n_ids, false, out, cap_out, &out_len, &err), &err);
    CHECK_MSG(out_len == want_n && memcmp(out, want, want_n) == 0, "round trip of %zu bytes \"%.40s\" gave %zu bytes "
              "\"%.40s\"", n, s, out_len, out);
    free(out);
    free(ids);
}

static size_t put_utf8(uint32_t cp, char *o) {
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static void test_encode_decode(void) {
    size_t len;
    g_rng      = 3;
    char *text = make_corpus(60000, true, &len);
    caprl_bpe_train_params p = caprl_bpe_train_default_params();
    p.vocab_size             = 700;
    const char *extra[]      = {"<|caption|>", "<|im_end|>"}; /* the second is already a Qwen token: not repeated */
    p.specials               = extra;
    p.n_specials             = 2;
    caprl_bpe_train_stats st;
    char                 *json = train_ok(text, len, p, &st);
    caprl_tokenizer      *tok  = NULL;
    caprl_error           err  = {0};
    if (json) {
        CHECK_OK(caprl_tokenizer_load_buffer(&tok, json, strlen(json), "trained", &err), &err);
    }
    if (!tok) {
        free(json);
        free(text);
        return;
    }
    CHECK_EQ_I64(st.n_added, 23);
    CHECK(!st.exhausted);
    CHECK_EQ_I64(st.n_vocab + st.n_added, 700);
    CHECK_EQ_I64(caprl_tokenizer_n_tokens(tok), 700);

    /* the whole corpus encodes to the count training predicts (same split, normalization and merges) */
    int32_t *ids   = NULL;
    int64_t  cap   = 0;
    int64_t  n_all = encode(tok, text, len, &ids, &cap);
    CHECK_EQ_I64(n_all, st.corpus_tokens);
    CHECK_MSG(n_all > 0 && (double)len / (double)n_all > 2.0, "%zu bytes -> %lld tokens", len, (long long)n_all);

    /* every line: round trip, and fewer tokens than bytes */
    size_t n_lines = 0, n_fewer = 0;
    for (size_t i = 0; i < len;) {
        size_t e = i;
        while (e < len && text[e] != '\n') {
            e++;
        }
        size_t n = e - i;
        check_round_trip(tok, text + i, n, text + i, n);
        if (n >= 8) {
            n_lines++;
            int64_t k = encode(tok, text + i, n, &ids, &cap);
            n_fewer += k >= 0 && (size_t)k < n;
        }
        i = e + 1;
    }
    CHECK_MSG(n_lines > 100 && n_fewer == n_lines, "%zu of %zu lines have fewer tokens than bytes", n_fewer, n_lines);

    /* arbitrary UTF-8: bytes never seen in training, emoji, NUL, controls, 4-byte characters */
    static const char nul[] = "a\0b\x01\x02\x7f\x1b[0m";
    check_round_trip(tok, nul, sizeof nul - 1, nul, sizeof nul - 1);
    const char *fixed[] = {"😀🎉🧪 emoji never trained on", "\xef\xbb\xbf" "BOM", "\r\n\t\v\f", "ÿþý \xc2\xa0 nbsp",
                           "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 🏳️‍🌈", "   leading and trailing   ", "' 's 'S 'LL", ""};
    for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) {
        check_round_trip(tok, fixed[i], strlen(fixed[i]), fixed[i], strlen(fixed[i]));
    }
    /* a decomposed accent comes back composed (NFC) */
    check_round_trip(tok, "cafe\xcc\x81", 6, "caf\xc3\xa9", 5);
    /* random code points from ranges NFC leaves alone */
    static const uint32_t ranges[][2] = {{0x01, 0x7F}, {0xA0, 0x2FF}, {0x4E00, 0x9FFF}, {0xAC00, 0xD7A3},
                                         {0x1F300, 0x1F64F}, {0x10000, 0x1007F}};
    char s[600];
    for (int rep = 0; rep < 200; rep++) {
        size_t n = 0, k = 1 + rnd(100);
        for (size_t c = 0; c < k; c++) {
            const uint32_t *r = ranges[rnd(6)];
            n += put_utf8(r[0] + rnd(r[1] - r[0] + 1), s + n);
        }
        check_round_trip(tok, s, n, s, n);
    }

    /* added tokens are single ids after the vocab; Qwen2's special flags; --special ones are special */
    const char *chat = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|caption|><|im_end|>\n";
    int64_t     n    = encode(tok, chat, strlen(chat), &ids, &cap);
    int32_t     nv   = st.n_vocab;
    CHECK(n >= 8);
    if (n >= 8) {
        CHECK_EQ_I64(ids[0], nv + 1); /* <|im_start|> */
        CHECK_EQ_I64(ids[n - 2], nv + 2); /* <|im_end|> */
        CHECK_EQ_I64(ids[n - 3], nv + 22); /* <|caption|> */
        CHECK_EQ_I64(caprl_tokenizer_token_id(tok, "<|image_pad|>"), nv + 12);
    }
    int32_t pad = caprl_tokenizer_token_id(tok, "<|image_pad|>");
    for (int64_t i = 0; i < n; i++) {
        const char *str = caprl_tokenizer_token_str(tok, ids[i]);
        CHECK(ids[i] < nv || caprl_tokenizer_is_special(tok, ids[i]));
        CHECK(str != NULL);
    }
    CHECK(pad >= 0 && caprl_tokenizer_is_special(tok, pad));
    CHECK(caprl_tokenizer_is_special(tok, caprl_tokenizer_token_id(tok, "<|caption|>")));
    CHECK(!caprl_tokenizer_is_special(tok, caprl_tokenizer_token_id(tok, "<tool_call>")));
    CHECK_EQ_I64(caprl_tokenizer_token_id(tok, "<|endoftext|>"), nv);
    check_round_trip(tok, chat, strlen(chat), chat, strlen(chat));

    free(ids);
    caprl_tokenizer_free(tok);
    free(json);
    free(text);
}

/* ---- determinism, errors, speed ----------------------------------------------------------------------------- */

static void test_determinism(void) {
    size_t len;
    g_rng      = 5;
    char *text = make_corpus(30000, true, &len);
    caprl_bpe_train_params p = caprl_bpe_train_default_params();
    p.vocab_size             = 500;
    char *a = train_ok(text, len, p, NULL), *b = train_ok(text, len, p, NULL);
    CHECK(a && b && strcmp(a, b) == 0);
    free(a);
    free(b);
    free(text);
}

static void expect_error(const char *corpus, size_t len, caprl_bpe_train_params p, caprl_status code,
                         const char *needle) {
    static char untouched[] = "untouched";
    char       *json        = untouched;
    caprl_error err  = {0};
    caprl_status st  = caprl_bpe_train(corpus, len, "c.txt", &p, &json, NULL, NULL, &err);
    CHECK_MSG(st == code, "status %d, want %d (%s)", (int)st, (int)code, err.msg);
    CHECK_MSG(strstr(err.msg, needle) != NULL, "message \"%s\" lacks \"%s\"", err.msg, needle);
    CHECK(strcmp(json, "untouched") == 0);
}

static void test_errors(void) {
    caprl_bpe_train_params p = caprl_bpe_train_default_params();
    p.vocab_size             = 1000;
    expect_error("", 0, p, CAPRL_ERR_FORMAT, "c.txt: the corpus is empty");
    expect_error("<|im_end|><|endoftext|>", 23, p, CAPRL_ERR_FORMAT, "no text outside");
    expect_error("ok\nok\nbad \xff here", 16, p, CAPRL_ERR_FORMAT, "c.txt:3: invalid UTF-8 at byte offset 10");
    expect_error("ab", 2, (caprl_bpe_train_params){.vocab_size = 277, .min_frequency = 1, .qwen_added = true},
                 CAPRL_ERR_INVALID_ARG, "at least 278");
    expect_error("ab", 2, (caprl_bpe_train_params){.vocab_size = 255, .min_frequency = 1}, CAPRL_ERR_INVALID_ARG,
                 "at least 256");
    expect_error("ab", 2, (caprl_bpe_train_params){.vocab_size = 300, .min_frequency = 0}, CAPRL_ERR_INVALID_ARG,
                 "min_frequency");
    const char *empty[] = {""};
    expect_error("ab", 2, (caprl_bpe_train_params){.vocab_size = 300, .min_frequency = 1, .specials = empty,
                                                   .n_specials = 1}, CAPRL_ERR_INVALID_ARG, "empty");
    const char *bad[] = {"<\xc3>"};
    expect_error("ab", 2, (caprl_bpe_train_params){.vocab_size = 300, .min_frequency = 1, .specials = bad,
                                                   .n_specials = 1}, CAPRL_ERR_INVALID_ARG, "UTF-8");
    /* a special equal to a byte token ("a") or a merged token ("Ġthe", byte-level for " the") */
    const char *clash[] = {"a"};
    expect_error("a a a", 5, (caprl_bpe_train_params){.vocab_size = 300, .min_frequency = 1, .specials = clash,
                                                      .n_specials = 1}, CAPRL_ERR_INVALID_ARG, "\"a\" is also a token");
    const char *clash2[] = {"Ġthe"};
    expect_error("the the the the", 15, (caprl_bpe_train_params){.vocab_size = 300, .min_frequency = 1,
                                                                 .specials = clash2, .n_specials = 1},
                 CAPRL_ERR_INVALID_ARG, "also a token");
    char *json = NULL;
    CHECK_STATUS(caprl_bpe_train("ab", 2, NULL, &p, NULL, NULL, NULL, NULL), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_bpe_train("ab", 2, NULL, NULL, &json, NULL, NULL, NULL), CAPRL_ERR_INVALID_ARG);

    /* the smallest vocab: bytes and added tokens, no merges; it still loads and encodes byte by byte */
    p.vocab_size = 278;
    caprl_bpe_train_stats st;
    json = train_ok("hello hello", 11, p, &st);
    CHECK_EQ_I64(st.n_merges, 0);
    caprl_tokenizer *tok = NULL;
    caprl_error      err = {0};
    if (json) {
        CHECK_OK(caprl_tokenizer_load_buffer(&tok, json, strlen(json), "min", &err), &err);
    }
    if (tok) {
        int32_t *ids = NULL;
        int64_t  cap = 0;
        CHECK_EQ_I64(encode(tok, "hello", 5, &ids, &cap), 5);
        free(ids);
    }
    caprl_tokenizer_free(tok);
    free(json);
}

static void test_speed(void) {
    size_t len;
    g_rng      = 9;
    char *text = make_corpus(400000, true, &len);
    caprl_bpe_train_params p = caprl_bpe_train_default_params();
    p.vocab_size             = 2000;
    double t0                = now_s();
    caprl_bpe_train_stats st;
    char  *json = train_ok(text, len, p, &st);
    double dt   = now_s() - t0;
    fprintf(stderr, "train: %zu bytes, vocab %d (%d merges): %.2f s\n", len, p.vocab_size, st.n_merges, dt);
    /* seconds at most, even under sanitizers on a busy machine; a full recount per merge would take minutes */
    CHECK_MSG(dt < 60.0, "%.1f s", dt);
    free(json);
    free(text);
}

int main(void) {
    test_hand_merges();
    test_naive_reference();
    test_layout_vs_qwen();
    test_encode_decode();
    test_determinism();
    test_errors();
    test_speed();
    return test_finish("test_bpe_train");
}
