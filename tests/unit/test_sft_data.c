/* SFT data (caprl/data.h) over a byte-level tokenizer, where every character is its own token, so the expected
 * token streams are written by hand from the ChatML text: the rendering (default, overridden and own system turns,
 * several assistant turns), the loss mask on exactly the assistant contents and their <|im_end|>, targets of a
 * packed batch, raw prompt/completion records, an image's pad run, pixels and M-RoPE positions (Qwen2.5-VL),
 * epoch orders (permutations, seeded), packing within the limits and deterministic, and errors that name
 * file:line (or skips with skip_bad). */
#include <jansson.h>

#include "byte_tokenizer.h"
#include "caprl/data.h"
#include "caprl/model.h"
#include "caprl/tensor.h"
#include "caprl_test.h"

static char *g_dir;

enum { TOK_EOT = 256, TOK_START = 257, TOK_END = 258, TOK_VSTART = 259, TOK_PAD = 260, TOK_VEND = 261 };

static caprl_model *make_model(bool vl) {
    caprl_text_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 272;
    c.hidden_size = 16;
    c.intermediate_size = 24;
    c.n_layers = 1;
    c.n_heads = 2;
    c.n_kv_heads = 1;
    c.head_dim = 8;
    c.max_position_embeddings = 1024;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = true;
    c.bos_token_id = -1;
    c.eos_token_id = TOK_END;
    c.torch_dtype = -1;
    if (vl) {
        c.is_vl = true;
        c.n_mrope_sections = 3;
        c.mrope_section[0] = 2;
        c.mrope_section[1] = 1;
        c.mrope_section[2] = 1;
        c.image_token_id = TOK_PAD;
        c.vision_start_token_id = TOK_VSTART;
        c.vision_end_token_id = TOK_VEND;
    }
    caprl_model *m = NULL;
    caprl_error  err = {0};
    char         path[4200];
    snprintf(path, sizeof path, "%s/tokenizer.json", g_dir);
    CHECK_OK(caprl_model_init_random(&m, &c, CAPRL_DTYPE_F32, 1, 0.1f, NULL, &err), &err);
    CHECK_OK(caprl_model_load_tokenizer(m, path, &err), &err);
    return m;
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

/* Expected stream: text with "<S>" / "<E>" / "<P>" standing for <|im_start|> / <|im_end|> / one image pad, and
 * [ ... ] around the characters that carry the loss. */
typedef struct expect {
    int32_t ids[1024];
    uint8_t loss[1024];
    int32_t n;
} expect;

static expect make_expect(const char *s) {
    expect  e = {{0}, {0}, 0};
    uint8_t in_loss = 0;
    while (*s && e.n < 1024) {
        if (*s == '[' || *s == ']') {
            in_loss = *s == '[';
            s++;
            continue;
        }
        int32_t id = (uint8_t)*s;
        size_t  skip = 1;
        if (strncmp(s, "<S>", 3) == 0 || strncmp(s, "<E>", 3) == 0 || strncmp(s, "<P>", 3) == 0) {
            id = s[1] == 'S' ? TOK_START : s[1] == 'E' ? TOK_END : TOK_PAD;
            skip = 3;
        } else if (strncmp(s, "<V>", 3) == 0 || strncmp(s, "</V>", 4) == 0) {
            id = s[1] == 'V' ? TOK_VSTART : TOK_VEND;
            skip = s[1] == 'V' ? 3 : 4;
        }
        e.ids[e.n] = id;
        e.loss[e.n] = in_loss;
        e.n++;
        s += skip;
    }
    return e;
}

static void check_record(const caprl_sft_data *d, int64_t i, const char *want_text) {
    expect         e = make_expect(want_text);
    const uint8_t *mask = NULL;
    const int32_t *ids = caprl_sft_data_tokens(d, i, &mask);
    const caprl_sft_record *r = caprl_sft_data_record(d, i);
    CHECK_EQ_I64(r->n_tokens, e.n);
    int32_t n_loss = 0;
    for (int32_t t = 0; t < e.n && t < r->n_tokens; t++) {
        CHECK_MSG(ids[t] == e.ids[t] && mask[t] == e.loss[t], "record %lld token %d: id %d mask %d, expected %d %d",
                  (long long)i, t, ids[t], mask[t], e.ids[t], e.loss[t]);
        n_loss += e.loss[t];
    }
    CHECK_EQ_I64(r->n_loss, n_loss);
}

static caprl_sft_data *load(const char *name, const char *text, const caprl_model *m, const caprl_sft_params *p,
                            caprl_status want, caprl_error *err) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    write_file(path, text);
    caprl_sft_data *d = NULL;
    caprl_status    st = caprl_sft_data_load(&d, path, m, p, err);
    CHECK_MSG(st == want, "%s: status %d (%s), expected %d", name, st, err->msg, want);
    return d;
}

static void test_render(void) {
    caprl_model     *m = make_model(false);
    caprl_sft_params p = caprl_sft_default_params();
    p.system = "Sys";
    caprl_error     err = {0};
    caprl_sft_data *d = load("render.jsonl",
                             "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", "
                             "\"content\": \"Yo!\"}]}\n"
                             "\n"
                             "{\"messages\": [{\"role\": \"system\", \"content\": \"Own\"}, {\"role\": \"user\", "
                             "\"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}, {\"role\": \"user\", "
                             "\"content\": \"c\"}, {\"role\": \"assistant\", \"content\": \"\"}], \"id\": 3}\n",
                             m, &p, CAPRL_OK, &err);
    if (d) {
        CHECK_EQ_I64(caprl_sft_data_size(d), 2);
        CHECK_EQ_I64(caprl_sft_data_record(d, 0)->line, 1);
        CHECK_EQ_I64(caprl_sft_data_record(d, 1)->line, 3);
        check_record(d, 0, "<S>system\nSys<E>\n<S>user\nHi<E>\n<S>assistant\n[Yo!<E>]\n");
        check_record(d, 1, "<S>system\nOwn<E>\n<S>user\na<E>\n<S>assistant\n[b<E>]\n<S>user\nc<E>\n<S>assistant\n"
                           "[<E>]\n");
        CHECK_EQ_I64(caprl_sft_data_n_loss(d), 4 + 2 + 1);
        CHECK_EQ_I64(caprl_sft_data_n_tokens(d), caprl_sft_data_record(d, 0)->n_tokens +
                                                     caprl_sft_data_record(d, 1)->n_tokens);
    }
    caprl_sft_data_free(d);
    /* the template's default system turn */
    p.system = NULL;
    d = load("default.jsonl",
             "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": "
             "\"Yo\"}]}\n",
             m, &p, CAPRL_OK, &err);
    if (d) {
        check_record(d, 0, "<S>system\n" CAPRL_QWEN25_DEFAULT_SYSTEM "<E>\n<S>user\nHi<E>\n<S>assistant\n[Yo<E>]\n");
    }
    caprl_sft_data_free(d);
    /* TRL's conversational prompt/completion: the prompt's assistant turn is context, only the completion learns */
    d = load("prompt_form.jsonl",
             "{\"prompt\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"few\"}, "
             "{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"q2\"}]}], \"completion\": "
             "[{\"role\": \"assistant\", \"content\": \"a\"}]}\n",
             m, &p, CAPRL_OK, &err);
    if (d) {
        check_record(d, 0,
                     "<S>system\n" CAPRL_QWEN25_DEFAULT_SYSTEM
                     "<E>\n<S>user\nq<E>\n<S>assistant\nfew<E>\n<S>user\nq2<E>\n<S>assistant\n[a<E>]\n");
    }
    /* a batch of both records: targets where the next token carries the loss */
    caprl_sft_data_free(d);
    p.system = "Sys";
    d = load("render2.jsonl",
             "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": "
             "\"Yo!\"}]}\n{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", "
             "\"content\": \"y\"}]}\n",
             m, &p, CAPRL_OK, &err);
    caprl_sft_batch *b = caprl_sft_batch_init();
    if (d) {
        int64_t                  idx[2] = {1, 0};
        const caprl_train_batch *tb = NULL;
        int64_t                  scored = 0;
        CHECK_OK(caprl_sft_batch_build(b, d, idx, 2, &tb, &scored, &err), &err);
        int32_t n1 = caprl_sft_data_record(d, 1)->n_tokens, n0 = caprl_sft_data_record(d, 0)->n_tokens;
        CHECK(tb && tb->n_seqs == 2 && tb->seq_start[0] == 0 && tb->seq_start[1] == n1 &&
              tb->seq_start[2] == n1 + n0 && tb->n_tokens == n0 + n1 && tb->n_images == 0 && !tb->mrope_pos);
        CHECK_EQ_I64(scored, 2 + 4);
        for (int32_t k = 0; tb && k < 2; k++) {
            const uint8_t *mask = NULL;
            const int32_t *ids = caprl_sft_data_tokens(d, idx[k], &mask);
            int32_t        off = tb->seq_start[k], len = tb->seq_start[k + 1] - off;
            for (int32_t t = 0; t < len; t++) {
                int32_t want = t + 1 < len && mask[t + 1] ? ids[t + 1] : -1;
                CHECK(tb->tokens[off + t] == ids[t] && tb->target[off + t] == want);
            }
        }
    }
    caprl_sft_batch_free(b);
    caprl_sft_data_free(d);
    /* raw records: the prompt's tokens then the completion's, no template, nothing added */
    d = load("raw.jsonl", "{\"prompt\": \"Q: x<|im_end|>\", \"completion\": \" C.\", \"kind\": \"dense\"}\n", m,
             &p, CAPRL_OK, &err);
    if (d) {
        check_record(d, 0, "Q: x<E>[ C.]");
    }
    caprl_sft_data_free(d);
    caprl_model_free(m);
}

static void test_errors(void) {
    caprl_model     *m = make_model(false);
    caprl_sft_params p = caprl_sft_default_params();
    p.max_seq_len = 64;
    caprl_error     err = {0};
    static const char good[] = "{\"messages\": [{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", "
                               "\"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n";
    static const struct {
        const char *line, *needle;
    } cases[] = {
        {"{\"messages\": [", "invalid JSON at column"},
        {"\"text\"", "a record must be a JSON object"},
        {"{\"messages\": []}", "non-empty array"},
        {"{\"messages\": [3]}", "messages[0] is not an object"},
        {"{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}", "role \"bot\""},
        {"{\"messages\": [{\"role\": \"user\", \"content\": 3}]}", "no string or part-list \"content\""},
        {"{\"prompt\": [{\"role\": \"user\", \"content\": \"x\"}], \"completion\": \"y\"}",
         "must be non-empty arrays of {role, content}"},
        {"{\"prompt\": [{\"role\": \"assistant\", \"content\": \"x\"}], \"completion\": [{\"role\": \"user\", "
         "\"content\": \"y\"}]}",
         "no assistant message in \"completion\""},
        {"{\"prompt\": [{\"role\": \"user\", \"content\": \"x\"}], \"completion\": [{\"role\": \"assistant\"}]}",
         "completion[0] (assistant) has no string or part-list \"content\""},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [\"x\"]}]}", "messages[0].content[0] is not a"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"video\"}]}]}", "\"video\" is not text or"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]}", "needs a string \"text\""},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"image\"}]}]}",
         "a second image part"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": "
         "[{\"type\": \"image\"}]}]}",
         "an image part outside a user message"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}]}, {\"role\": \"assistant\", "
         "\"content\": \"y\"}]}",
         "no image path"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": \"a.png\"}]}, "
         "{\"role\": \"assistant\", \"content\": \"y\"}], \"image\": \"b.png\"}",
         "the image part's \"image\" and the record's differ"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}], "
         "\"images\": [\"a.png\", \"b.png\"]}",
         "a list of one path"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": \"a.png\"}]}, "
         "{\"role\": \"assistant\", \"content\": \"y\"}]}",
         "text-only"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}", "no assistant message"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"system\", \"content\": \"x\"}, "
         "{\"role\": \"assistant\", \"content\": \"x\"}]}",
         "messages[1]: a system message may only come first"},
        {"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}], "
         "\"image\": \"a.png\"}",
         "text-only"},
        {"{\"messages\": [{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", \"content\": "
         "\"0123456789012345678901234567890123456789\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}",
         "more than the maximum sequence length 64"},
        {"{\"prompt\": 3, \"completion\": \"x\"}", "must both be strings"},
        {"{\"prompt\": \"p\", \"completion\": \"\"}", "empty \"completion\""},
        {"{\"completion\": \"x\"}", "must both be strings"},
        {"{\"prompt\": \"\", \"completion\": \"x\"}", "no token to learn"},
        {"{\"prompt\": \"p\", \"completion\": \"x\", \"image\": \"a.png\"}", "needs the chat form"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char text[2048], name[64], where[4300];
        snprintf(text, sizeof text, "%s\n%s\n%s", good, cases[i].line, good);
        snprintf(name, sizeof name, "bad%zu.jsonl", i);
        snprintf(where, sizeof where, "%s/%s:3: ", g_dir, name);
        caprl_sft_data *d = load(name, text, m, &p, CAPRL_ERR_FORMAT, &err);
        CHECK(d == NULL);
        CHECK_MSG(strstr(err.msg, where) && strstr(err.msg, cases[i].needle), "case %zu: %s", i, err.msg);
        /* skipped with skip_bad: the two good records remain */
        caprl_sft_params ps = p;
        ps.skip_bad = true;
        caprl_log_set_level(CAPRL_LOG_ERROR); /* the skip warnings are expected */
        d = load(name, text, m, &ps, CAPRL_OK, &err);
        caprl_log_set_level(CAPRL_LOG_WARN);
        CHECK(d && caprl_sft_data_size(d) == 2 && caprl_sft_data_n_skipped(d) == 1 &&
              caprl_sft_data_record(d, 1)->line == 4);
        caprl_sft_data_free(d);
    }
    caprl_sft_data *d = load("empty.jsonl", "\n\n", m, &p, CAPRL_ERR_FORMAT, &err);
    CHECK(d == NULL && strstr(err.msg, "no usable record"));
    char missing[4200];
    snprintf(missing, sizeof missing, "%s/missing.jsonl", g_dir);
    CHECK(caprl_sft_data_load(&d, missing, m, &p, &err) == CAPRL_ERR_IO);
    caprl_model_free(m);
}

/* n records whose lengths differ: record k has a reply of k characters */
static caprl_sft_data *make_lengths(const caprl_model *m, int n) {
    size_t cap = (size_t)n * 200 + 1;
    char  *text = malloc(cap);
    size_t len = 0;
    for (int k = 0; k < n; k++) {
        len += (size_t)snprintf(text + len, cap - len,
                                "{\"messages\": [{\"role\": \"system\", \"content\": \"\"}, {\"role\": \"user\", "
                                "\"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"%.*s\"}]}\n",
                                k % 37, "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz");
    }
    caprl_sft_params p = caprl_sft_default_params();
    caprl_error      err = {0};
    caprl_sft_data  *d = load("lengths.jsonl", text, m, &p, CAPRL_OK, &err);
    free(text);
    return d;
}

static void test_order_and_pack(void) {
    caprl_model    *m = make_model(false);
    caprl_sft_data *d = make_lengths(m, 50);
    if (!d) {
        caprl_model_free(m);
        return;
    }
    int64_t o1[50], o2[50], o3[50];
    caprl_sft_epoch_order(d, 7, 0, o1);
    caprl_sft_epoch_order(d, 7, 0, o2);
    caprl_sft_epoch_order(d, 7, 1, o3);
    CHECK(memcmp(o1, o2, sizeof o1) == 0);
    CHECK(memcmp(o1, o3, sizeof o1) != 0);
    bool seen[50] = {false}, perm = true, moved = false;
    for (int i = 0; i < 50; i++) {
        perm = perm && o1[i] >= 0 && o1[i] < 50 && !seen[o1[i]];
        seen[o1[i] >= 0 && o1[i] < 50 ? o1[i] : 0] = true;
        moved = moved || o1[i] != i;
    }
    CHECK(perm && moved);
    caprl_sft_epoch_order(d, 8, 0, o2);
    CHECK(memcmp(o1, o2, sizeof o1) != 0);

    caprl_trainer_params lim = caprl_trainer_default_params();
    lim.max_tokens = 100;
    lim.max_seqs = 3;
    int32_t     mb[50], mb2[50], n_mb = 0, n_mb2 = 0;
    caprl_error err = {0};
    CHECK_OK(caprl_sft_pack(d, o1, 50, &lim, mb, &n_mb, &err), &err);
    CHECK_OK(caprl_sft_pack(d, o1, 50, &lim, mb2, &n_mb2, &err), &err);
    CHECK(n_mb == n_mb2 && memcmp(mb, mb2, sizeof mb) == 0);
    int64_t total = 0;
    for (int b = 0; b < n_mb; b++) {
        int64_t tok = 0, seqs = 0;
        for (int i = 0; i < 50; i++) {
            if (mb[i] == b) {
                tok += caprl_sft_data_record(d, o1[i])->n_tokens;
                seqs++;
            }
        }
        CHECK_MSG(tok <= 100 && seqs <= 3 && seqs >= 1, "micro-batch %d: %lld tokens, %lld sequences", b,
                  (long long)tok, (long long)seqs);
        total += tok;
    }
    CHECK_EQ_I64(total, caprl_sft_data_n_tokens(d));
    /* packing is a lower bound's worth: never more micro-batches than records, at least ceil(tokens / limit) */
    CHECK(n_mb <= 50 && n_mb >= (int32_t)((total + 99) / 100) && n_mb >= 17);
    lim.max_tokens = 40; /* the longest record (reply of 36 characters) no longer fits */
    CHECK_STATUS(caprl_sft_pack(d, o1, 50, &lim, mb, &n_mb, &check_err_), CAPRL_ERR_INVALID_ARG);
    caprl_sft_data_free(d);
    caprl_model_free(m);
}

/* The processed grid of a fixture image (patch units), from the processor's own size function. */
static void fixture_grid(const char *file, int32_t grid[3]) {
    char                    path[4200];
    caprl_image             img;
    caprl_error             err = {0};
    caprl_preprocess_config pp = caprl_preprocess_config_default();
    int32_t                 w = 0, h = 0;
    snprintf(path, sizeof path, "%s/tests/fixtures/img/%s", CAPRL_SOURCE_DIR, file);
    CHECK_OK(caprl_image_decode_file(path, NULL, &img, &err), &err);
    CHECK_OK(caprl_image_preprocess_size(img.width, img.height, &pp, &w, &h, &err), &err);
    caprl_image_free(&img);
    grid[0] = 1;
    grid[1] = h / 14;
    grid[2] = w / 14;
}

static void pads(char *buf, size_t cap, const char *before, const int32_t grid[3], const char *after) {
    size_t len = (size_t)snprintf(buf, cap, "%s<V>", before);
    for (int32_t k = 0; k < grid[1] / 2 * (grid[2] / 2); k++) {
        len += (size_t)snprintf(buf + len, cap - len, "<P>");
    }
    snprintf(buf + len, cap - len, "</V>%s", after);
}

static void test_image(void) {
    caprl_model     *m = make_model(true);
    caprl_sft_params p = caprl_sft_default_params();
    p.system = "";
    caprl_error err = {0};
    char        text[4096];
    snprintf(text, sizeof text,
             "{\"messages\": [{\"role\": \"user\", \"content\": \"A\"}, {\"role\": \"assistant\", \"content\": "
             "\"B\"}], \"image\": \"%s/tests/fixtures/img/rgb8.png\"}\n"
             "{\"messages\": [{\"role\": \"user\", \"content\": \"A\"}, {\"role\": \"assistant\", \"content\": "
             "\"B\"}, {\"role\": \"user\", \"content\": \"C\"}, {\"role\": \"assistant\", \"content\": \"D\"}], "
             "\"image\": \"%s/tests/fixtures/img/baseline.jpg\"}\n"
             "{\"messages\": [{\"role\": \"user\", \"content\": \"<|image_pad|>\"}, {\"role\": \"assistant\", "
             "\"content\": \"B\"}]}\n"
             /* typed parts: the image where its part stands, with its own file:// path */
             "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"A\"}, {\"type\": "
             "\"image\", \"image\": \"file://%s/tests/fixtures/img/rgb8.png\"}]}, {\"role\": \"assistant\", "
             "\"content\": [{\"type\": \"text\", \"text\": \"B\"}]}]}\n"
             /* TRL's form: "images", a bare image part first */
             "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", "
             "\"text\": \"A\"}]}, {\"role\": \"assistant\", \"content\": \"B\"}], \"images\": "
             "[\"%s/tests/fixtures/img/rgb8.png\"]}\n",
             CAPRL_SOURCE_DIR, CAPRL_SOURCE_DIR, CAPRL_SOURCE_DIR, CAPRL_SOURCE_DIR);
    caprl_sft_data *d = load("image.jsonl", text, m, &p, CAPRL_ERR_FORMAT, &err);
    CHECK(strstr(err.msg, "image.jsonl:3: ") && strstr(err.msg, "<|image_pad|>"));
    p.skip_bad = true;
    caprl_log_set_level(CAPRL_LOG_ERROR);
    d = load("image.jsonl", text, m, &p, CAPRL_OK, &err);
    caprl_log_set_level(CAPRL_LOG_WARN);
    if (!d) {
        caprl_model_free(m);
        return;
    }
    int32_t g_png[3], g_jpg[3];
    fixture_grid("rgb8.png", g_png);
    fixture_grid("baseline.jpg", g_jpg);
    char want[4096];
    pads(want, sizeof want, "<S>system\n<E>\n<S>user\n", g_png, "A<E>\n<S>assistant\n[B<E>]\n");
    check_record(d, 0, want);
    check_record(d, 3, want);
    CHECK_EQ_I64(caprl_sft_data_size(d), 4);
    pads(want, sizeof want, "<S>system\n<E>\n<S>user\nA", g_png, "<E>\n<S>assistant\n[B<E>]\n");
    check_record(d, 2, want);
    pads(want, sizeof want, "<S>system\n<E>\n<S>user\n", g_jpg,
         "A<E>\n<S>assistant\n[B<E>]\n<S>user\nC<E>\n<S>assistant\n[D<E>]\n");
    check_record(d, 1, want);
    CHECK_EQ_I64(caprl_sft_data_record(d, 0)->n_patches, g_png[1] * g_png[2]);
    CHECK_EQ_I64(caprl_sft_data_record(d, 1)->n_patches, g_jpg[1] * g_jpg[2]);
    caprl_sft_batch         *b = caprl_sft_batch_init();
    int64_t                  idx[2] = {1, 0};
    const caprl_train_batch *tb = NULL;
    CHECK_OK(caprl_sft_batch_build(b, d, idx, 2, &tb, NULL, &err), &err);
    if (tb) {
        CHECK(tb->n_images == 2 && tb->pixel_values && tb->mrope_pos);
        CHECK(memcmp(tb->grid_thw, g_jpg, sizeof g_jpg) == 0 && memcmp(tb->grid_thw + 3, g_png, sizeof g_png) == 0);
        /* M-RoPE of sequence 0 (baseline.jpg, merged grid hm x wm): text counts up to st, merged token k is
         * (st, st + k / wm, st + k % wm), the text after goes on from st + max(hm, wm) */
        int32_t N = tb->n_tokens, st = 0, hm = g_jpg[1] / 2, wm = g_jpg[2] / 2;
        while (tb->tokens[st] != TOK_PAD) {
            CHECK(tb->mrope_pos[st] == st && tb->mrope_pos[N + st] == st && tb->mrope_pos[2 * N + st] == st);
            st++;
        }
        for (int32_t k = 0; k < hm * wm; k++) {
            CHECK(tb->mrope_pos[st + k] == st && tb->mrope_pos[N + st + k] == st + k / wm &&
                  tb->mrope_pos[2 * N + st + k] == st + k % wm);
        }
        int32_t after = st + hm * wm, next = st + (hm > wm ? hm : wm);
        CHECK(tb->mrope_pos[after] == next && tb->mrope_pos[N + after] == next &&
              tb->mrope_pos[2 * N + after] == next);
        /* sequence 1 starts again at 0 */
        int32_t s1 = tb->seq_start[1];
        CHECK(tb->mrope_pos[s1] == 0 && tb->mrope_pos[N + s1] == 0 && tb->mrope_pos[2 * N + s1] == 0);
        /* the pixel rows: the processor's own output for each image, concatenated in sequence order */
        static const char *const files[2] = {"baseline.jpg", "rgb8.png"};
        size_t                   off = 0;
        for (int k = 0; k < 2; k++) {
            char                    ipath[4200];
            caprl_image             img;
            float                  *pv = NULL;
            int64_t                 np = 0;
            int32_t                 grid[3];
            caprl_preprocess_config pp = caprl_preprocess_config_default();
            snprintf(ipath, sizeof ipath, "%s/tests/fixtures/img/%s", CAPRL_SOURCE_DIR, files[k]);
            CHECK_OK(caprl_image_decode_file(ipath, NULL, &img, &err), &err);
            CHECK_OK(caprl_image_preprocess(&img, &pp, &pv, &np, grid, &err), &err);
            CHECK(pv && memcmp(tb->pixel_values + off, pv, (size_t)np * 1176 * sizeof(float)) == 0);
            off += (size_t)np * 1176;
            caprl_free(pv);
            caprl_image_free(&img);
        }
    }
    caprl_sft_batch_free(b);
    caprl_sft_data_free(d);
    caprl_model_free(m);
}

int main(void) {
    g_dir = test_tmpdir("sft_data");
    char path[4200];
    snprintf(path, sizeof path, "%s/tokenizer.json", g_dir);
    write_byte_tokenizer(path);
    test_render();
    test_errors();
    test_order_and_pack();
    test_image();
    free(g_dir);
    return test_finish("test_sft_data");
}
