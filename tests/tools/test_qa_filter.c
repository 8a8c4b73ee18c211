/* caprl qa filter on small real checkpoints whose answers are forced by their weights, so every keep/drop decision is
 * known in advance (no stub anywhere in the run).
 *
 * The forcing model is a tiny-vl checkpoint rewritten so that:
 *   - every token embeds as e1, except <|vision_start|>, which embeds as e0; the vision merger's last layer is zero,
 *     so image features are zero vectors;
 *   - layer 0's query and key projections are zero, so attention is uniform over the prefix; its value projection
 *     reads dimension 0 (x200) into head 0 and the output projection writes that into dimension 2. At the last
 *     position h = e1 + a e2 with a = 1600 * [<|vision_start|> in the prompt] / position, so a > 0 exactly when the
 *     prompt holds an image; every other weight of both layers is zero;
 *   - lm_head is untied and zero except row T_img = 4 e2 and row T_txt = 4 e1 (both rows added when equal).
 * With the image the logits after the final norm are 32a/sqrt(1+a^2) for T_img against 32/sqrt(1+a^2) for T_txt (a is
 * several units for these prompts), without it 32 for T_txt and 0 for everything else: at temperature 0.1 the first
 * and every later token is T_img with the image and T_txt without it, with a margin of hundreds of nats.
 *
 * Two such models (every run loads the tokenizer, about a second, so the runs are few):
 *   oracle (T_img "ABCDE", T_txt "xyz"): "ABCDE" contains every gold letter A-D, so the substring check passes in
 *          every rotation with the image and fails in every one without it: every question is kept, and the output
 *          is the input minus the unreadable image, question strings as written;
 *   letters (T_img " A", T_txt " B"): correct with the image exactly in the rotations whose gold is A, without it in
 *          those whose gold is B. The golds come from caprl_present_question with the filter's seed and streams, so
 *          the expected accuracies, hence the decision at any thresholds, are computed here; the seed is one where
 *          all four outcomes (kept, answerable_without_image, not_answered_with_image, both) and a boundary case
 *          (accuracy equal to a threshold: strict inequalities) occur.
 * Also: an unreadable image drops its questions (image_error) and the run goes on, images left without questions
 * leave the output, and --batch / --group-images / --threads do not change an output. */
#include <jansson.h>
#include <math.h>
#include <stdbool.h>

#include "caprl/reward.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl/tokenizer.h"
#include "caprl_test.h"
#include "proc_util.h"

#define ROT  4
#define SEED 11

/* ---- the forcing checkpoint -------------------------------------------------------------------------------- */

typedef struct forcing {
    int32_t vision_start, t_img, t_txt, hidden;
} forcing;

static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float    f;
    memcpy(&f, &u, 4);
    return f;
}

/* Exact for the values used here (0, 1, 4, 200). */
static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

static bool starts(const char *s, const char *prefix) {
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static bool ends(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* The new value of every element of tensor `name` (shape rows x cols; vectors have cols 1). */
static void fill(const forcing *fc, const char *name, float *w, int64_t rows, int64_t cols) {
    int64_t n = rows * cols;
    if (strcmp(name, "model.embed_tokens.weight") == 0) {
        for (int64_t t = 0; t < rows; t++) {
            for (int64_t c = 0; c < cols; c++) {
                w[t * cols + c] = t == fc->vision_start ? (c == 0 ? 1.0f : 0.0f) : (c == 1 ? 1.0f : 0.0f);
            }
        }
    } else if (starts(name, "model.layers.") && ends(name, "layernorm.weight")) {
        for (int64_t i = 0; i < n; i++) {
            w[i] = 1.0f;
        }
    } else if (starts(name, "model.layers.")) {
        memset(w, 0, (size_t)n * sizeof(float)); /* both layers silent, except the two entries below */
        if (strcmp(name, "model.layers.0.self_attn.v_proj.weight") == 0) {
            w[0 * cols + 0] = 200.0f; /* kv head 0, dim 0 <- hidden dim 0 */
        } else if (strcmp(name, "model.layers.0.self_attn.o_proj.weight") == 0) {
            w[2 * cols + 0] = 1.0f; /* hidden dim 2 <- head 0, dim 0 */
        }
    } else if (strcmp(name, "model.norm.weight") == 0) {
        for (int64_t i = 0; i < n; i++) {
            w[i] = 1.0f;
        }
    } else if (starts(name, "visual.merger.mlp.2.")) {
        memset(w, 0, (size_t)n * sizeof(float)); /* zero image features */
    }
}

/* Rewrites dir (a tiny-vl checkpoint) into the forcing model for (t_img, t_txt). */
static void make_forcing(const char *dir, const forcing *fc) {
    char path[2048];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    caprl_safetensors *st = NULL;
    caprl_error        err = {0};
    CHECK_MSG(caprl_safetensors_open(&st, path, &err) == CAPRL_OK, "%s", err.msg);
    if (!st) {
        return;
    }
    caprl_st_writer *w = caprl_st_writer_init();
    int64_t          n_t = caprl_safetensors_n_tensors(st), vocab = 0;
    void           **bufs = calloc((size_t)n_t + 1, sizeof *bufs);
    int32_t          dtype = CAPRL_DTYPE_F32;
    for (int64_t i = 0; i < n_t; i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(st, i);
        int64_t                rows = t->shape[0], cols = t->numel / (rows > 0 ? rows : 1);
        float                 *f = malloc((size_t)t->numel * sizeof(float));
        dtype = t->dtype;
        for (int64_t k = 0; k < t->numel; k++) {
            if (t->dtype == CAPRL_DTYPE_BF16) {
                uint16_t h;
                memcpy(&h, (const char *)t->data + 2 * k, 2);
                f[k] = bf16_to_f32(h);
            } else {
                memcpy(&f[k], (const char *)t->data + 4 * k, 4);
            }
        }
        fill(fc, t->name, f, rows, cols);
        if (strcmp(t->name, "model.embed_tokens.weight") == 0) {
            vocab = rows;
        }
        if (t->dtype == CAPRL_DTYPE_BF16) {
            uint16_t *h = malloc((size_t)t->numel * 2);
            for (int64_t k = 0; k < t->numel; k++) {
                h[k] = f32_to_bf16(f[k]);
            }
            free(f);
            bufs[i] = h;
        } else {
            bufs[i] = f;
        }
        CHECK(caprl_st_writer_add(w, t->name, t->dtype, t->n_dims, t->shape, bufs[i], &err) == CAPRL_OK);
    }
    /* the untied head: row t_img reads dimension 2 (image present), row t_txt dimension 1 (always) */
    int64_t shape[2] = {vocab, fc->hidden};
    size_t  esz = dtype == CAPRL_DTYPE_BF16 ? 2 : 4;
    char   *head = calloc((size_t)(vocab * fc->hidden), esz);
    float   v4 = 4.0f;
    for (int k = 0; k < 2; k++) {
        int64_t row = k == 0 ? fc->t_img : fc->t_txt, col = k == 0 ? 2 : 1;
        char   *dst = head + (size_t)(row * fc->hidden + col) * esz;
        if (dtype == CAPRL_DTYPE_BF16) {
            uint16_t h = f32_to_bf16(v4);
            memcpy(dst, &h, 2);
        } else {
            memcpy(dst, &v4, 4);
        }
    }
    bufs[n_t] = head;
    CHECK(caprl_st_writer_add(w, "lm_head.weight", dtype, 2, shape, head, &err) == CAPRL_OK);
    CHECK_MSG(caprl_st_writer_save(w, path, &err) == CAPRL_OK, "%s", err.msg);
    caprl_st_writer_free(w);
    caprl_safetensors_free(st);
    for (int64_t i = 0; i <= n_t; i++) {
        free(bufs[i]);
    }
    free(bufs);
    /* config.json: untie the head */
    snprintf(path, sizeof path, "%s/config.json", dir);
    json_error_t jerr;
    json_t      *cfg = json_load_file(path, 0, &jerr);
    CHECK_MSG(cfg != NULL, "%s: %s", path, jerr.text);
    json_object_set_new(cfg, "tie_word_embeddings", json_false());
    CHECK(json_dump_file(cfg, path, JSON_INDENT(2)) == 0);
    json_decref(cfg);
}

/* A forcing model in tmp/name, from a copy of the tiny-vl checkpoint tmp/base. */
static void build_model(const char *name, int32_t t_img, int32_t t_txt, int32_t vision_start) {
    char cmd[8192], dir[2048];
    snprintf(dir, sizeof dir, "%s/%s", g_dir, name);
    snprintf(cmd, sizeof cmd, "cp -r %s/base %s", g_dir, dir);
    CHECK(system(cmd) == 0);
    forcing fc = {vision_start, t_img, t_txt, 64};
    make_forcing(dir, &fc);
}

/* ---- the QA set ---------------------------------------------------------------------------------------------- */

/* Three images with questions of 2 to 4 options (one with the released "Can not answer" line), one missing image. */
static const char k_qa[] =
    "{\"id\": \"img-a\", \"image\": \"imgs/rgb8.png\", \"qa\": ["
    "{\"question\": \"What color is the square?\\n   - A) Red\\n   - B) Blue\\n   - C) Green\\n   - D) Black\", "
    "\"answer\": \"B\"}, "
    "{\"question\": \"How many dots?\\n   - A) 1\\n   - B) 2\\n   - C) 3\\n   - D) 4\\n   - E) Can not answer based "
    "on the caption\", \"answer\": \"D\"}, "
    "{\"question\": \"Is it day?\\n   - A) yes\\n   - B) no\", \"answer\": \"A\"}]}\n"
    "{\"id\": \"img-b\", \"image\": \"imgs/missing.png\", \"qa\": ["
    "{\"question\": \"Where?\\n   - A) left\\n   - B) right\", \"answer\": \"A\"}]}\n"
    "{\"id\": \"img-c\", \"image\": \"imgs/pal4.png\", \"qa\": ["
    "{\"question\": \"Which shape?\\n   - A) circle\\n   - B) square\\n   - C) star\", \"answer\": \"C\"}, "
    "{\"question\": \"Which side?\\n   - A) top\\n   - B) bottom\", \"answer\": \"B\"}, "
    "{\"question\": \"What is shown?\\n   - A) a cat\\n   - B) a dog\\n   - C) a car\\n   - D) a tree\", "
    "\"answer\": \"A\"}]}\n"
    "{\"id\": \"img-d\", \"image\": \"imgs/baseline.jpg\", \"qa\": ["
    "{\"question\": \"Which way?\\n   - A) up\\n   - B) down\\n   - C) left\", \"answer\": \"A\"}]}\n";

/* Questions in file order: image record, then question index; the missing image's question is global 3. */
#define N_Q       8
#define MISSING_Q 3
static const int k_q_image[N_Q] = {0, 0, 0, 1, 2, 2, 2, 3};

/* Runs the filter; returns the report (NULL on failure). */
static json_t *filter(const char *model, const char *extra, const char *out_name) {
    char cmd[8192], path[2048];
    snprintf(cmd, sizeof cmd,
             "%s qa filter --vlm %s/%s --qa %s/qa.jsonl --out %s/%s.jsonl --report %s/%s.report.json --seed %d "
             "--threads 1 %s",
             CAPRL_CLI, g_dir, model, g_dir, g_dir, out_name, g_dir, out_name, SEED, extra);
    int   rc = run(cmd, NULL, 0);
    char *msg = last_stderr();
    CHECK_MSG(rc == 0, "%s exited %d: %s", cmd, rc, msg);
    CHECK_MSG(strstr(msg, "imgs/missing.png"), "no warning about the missing image: %s", msg);
    free(msg);
    snprintf(path, sizeof path, "%s/%s.report.json", g_dir, out_name);
    json_error_t jerr;
    json_t      *rep = json_load_file(path, 0, &jerr);
    CHECK_MSG(rep != NULL, "%s: %s", path, jerr.text);
    return rep;
}

static const json_t *decision_of(const json_t *rep, int q) {
    return json_array_get(json_object_get(rep, "decisions"), (size_t)q);
}

/* Every question's decision is `want` (the missing image's one: image_error), and the output holds exactly the
 * questions kept. */
static void expect_all(const json_t *rep, const char *want, const char *what) {
    CHECK_EQ_I64(json_array_size(json_object_get(rep, "decisions")), N_Q);
    for (int q = 0; q < N_Q; q++) {
        const char *got = json_string_value(json_object_get(decision_of(rep, q), "decision"));
        const char *exp = q == MISSING_Q ? "image_error" : want;
        CHECK_MSG(got && strcmp(got, exp) == 0, "%s: question %d: %s, expected %s", what, q, got ? got : "?", exp);
    }
}

/* The output file's records as {id: [question, ...]}. */
static json_t *load_output(const char *name) {
    char path[2048];
    snprintf(path, sizeof path, "%s/%s.jsonl", g_dir, name);
    char *text = read_all(path, NULL);
    CHECK_MSG(text != NULL, "no output %s", path);
    json_t *map = json_object();
    for (char *line = text, *nl; line && *line; line = nl + 1) {
        nl = strchr(line, '\n');
        CHECK(nl != NULL);
        if (!nl) {
            break;
        }
        *nl = '\0';
        json_t *rec = json_loads(line, 0, NULL);
        CHECK_MSG(json_is_array(json_object_get(rec, "qa")), "bad output line: %s", line);
        json_object_set(map, json_string_value(json_object_get(rec, "id")), rec);
        json_decref(rec);
    }
    free(text);
    return map;
}

int main(void) {
    char *tmp = test_tmpdir("qa_filter");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    char cmd[8192], path[2048];

    caprl_tokenizer *tok = NULL;
    caprl_error      err = {0};
    snprintf(path, sizeof path, "%s/data/qwen-tokenizer/tokenizer.json", CAPRL_SHARED_DIR);
    CHECK_MSG(caprl_tokenizer_load(&tok, path, &err) == CAPRL_OK, "%s", err.msg);
    if (!tok) {
        return test_finish("test_qa_filter");
    }
    int32_t abcde = caprl_tokenizer_token_id(tok, "ABCDE"), xyz = caprl_tokenizer_token_id(tok, "xyz");
    int32_t space_a = caprl_tokenizer_token_id(tok, "\xC4\xA0" "A"); /* " A": byte-level "\u0120A" */
    int32_t space_b = caprl_tokenizer_token_id(tok, "\xC4\xA0" "B");
    int32_t vstart = caprl_tokenizer_token_id(tok, "<|vision_start|>");
    CHECK_MSG(abcde > 0 && xyz > 0 && space_a > 0 && space_b > 0 && vstart > 0, "token ids %d %d %d %d %d", abcde,
              xyz, space_a, space_b, vstart);
    caprl_tokenizer_free(tok);

    snprintf(cmd, sizeof cmd, "mkdir %s/imgs && cp %s/tests/fixtures/img/rgb8.png %s/tests/fixtures/img/pal4.png "
                              "%s/tests/fixtures/img/baseline.jpg %s/imgs/",
             tmp, CAPRL_SOURCE_DIR, CAPRL_SOURCE_DIR, CAPRL_SOURCE_DIR, tmp);
    CHECK(system(cmd) == 0);
    snprintf(path, sizeof path, "%s/qa.jsonl", tmp);
    write_text(path, k_qa);

    snprintf(cmd, sizeof cmd,
             "%s init-model --preset tiny-vl --seed 3 --out %s/base --tokenizer %s/data/qwen-tokenizer/tokenizer.json",
             CAPRL_CLI, tmp, CAPRL_SHARED_DIR);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);

    /* oracle: every question kept, the output is the input minus the missing image, strings untouched */
    build_model("oracle", abcde, xyz, vstart);
    json_t *rep = filter("oracle", "", "oracle");
    expect_all(rep, "kept", "oracle");
    for (int q = 0; q < N_Q; q++) {
        if (q == MISSING_Q) {
            continue;
        }
        const json_t *d = decision_of(rep, q);
        for (int r = 0; r < ROT; r++) {
            CHECK_STR_EQ(json_string_value(json_array_get(json_object_get(d, "visual_outputs"), (size_t)r)),
                         "ABCDEABCDEABCDEABCDE");
            CHECK_STR_EQ(json_string_value(json_array_get(json_object_get(d, "text_outputs"), (size_t)r)),
                         "xyzxyzxyzxyz");
        }
    }
    const json_t *qs = json_object_get(rep, "questions"), *ims = json_object_get(rep, "images");
    CHECK_EQ_I64(json_integer_value(json_object_get(qs, "in")), N_Q);
    CHECK_EQ_I64(json_integer_value(json_object_get(qs, "kept")), N_Q - 1);
    CHECK_EQ_I64(json_integer_value(json_object_get(json_object_get(qs, "dropped_by_reason"), "image_error")), 1);
    CHECK_EQ_I64(json_integer_value(json_object_get(ims, "kept")), 3);
    CHECK_EQ_I64(json_integer_value(json_object_get(ims, "dropped_unreadable")), 1);
    json_t *out = load_output("oracle");
    json_t *in_a = json_loads(strstr(k_qa, "{\"id\": \"img-a\""), JSON_DISABLE_EOF_CHECK, NULL);
    CHECK_EQ_I64(json_object_size(out), 3);
    CHECK_MSG(in_a && json_equal(json_object_get(json_object_get(out, "img-a"), "qa"), json_object_get(in_a, "qa")),
              "img-a's kept questions must be the input's, strings and answers as written");
    /* the output sits beside the QA file: its relative image paths are kept */
    CHECK_STR_EQ(json_string_value(json_object_get(json_object_get(out, "img-c"), "image")), "imgs/pal4.png");
    CHECK(json_object_get(out, "img-b") == NULL);
    json_decref(in_a);
    json_decref(out);

    json_decref(rep);

    /* the letters model at the default thresholds and at another pair (with other batching, grouping, threads) */
    build_model("letters", space_a, space_b, vstart);
    json_t *in = json_array();
    for (const char *line = k_qa; *line;) {
        const char *nl = strchr(line, '\n');
        json_array_append_new(in, json_loadb(line, (size_t)(nl - line), 0, NULL));
        line = nl + 1;
    }
    int n_a[N_Q] = {0}, n_b[N_Q] = {0};
    for (int q = 0, within = 0; q < N_Q; q++) {
        within = q > 0 && k_q_image[q - 1] == k_q_image[q] ? within + 1 : 0; /* index of q in its image */
        const json_t *item = json_array_get(json_object_get(json_array_get(in, (size_t)k_q_image[q]), "qa"),
                                            (size_t)within);
        const char   *question = json_string_value(json_object_get(item, "question"));
        char          gold = json_string_value(json_object_get(item, "answer"))[0];
        for (int r = 0; r < ROT; r++) {
            char *text = NULL, new_gold = 0;
            CHECK(caprl_present_question(question, gold, true, SEED, (uint64_t)q, (uint64_t)r, &text, &new_gold, NULL,
                                         &err) == CAPRL_OK);
            n_a[q] += new_gold == 'A';
            n_b[q] += new_gold == 'B';
            caprl_free(text);
        }
    }
    json_decref(in);
    static const struct {
        const char *keep_visual, *drop_text, *extra;
    } k_runs[] = {{"0.75", "0.25", ""}, {"0.25", "0.5", "--batch 5 --group-images 2 --threads 2"}};
    int     seen[4] = {0}, boundary = 0;
    json_t *first = NULL;
    for (size_t t = 0; t < sizeof k_runs / sizeof k_runs[0]; t++) {
        char extra[256], name[64];
        /* one new token: " A" / " B" already decides (and the decode steps are the slow part under sanitizers) */
        snprintf(extra, sizeof extra, "--keep-visual %s --drop-text %s --max-new-tokens 1 %s", k_runs[t].keep_visual,
                 k_runs[t].drop_text, k_runs[t].extra);
        snprintf(name, sizeof name, "letters%zu", t);
        rep = filter("letters", extra, name);
        double kv = strtod(k_runs[t].keep_visual, NULL), dt = strtod(k_runs[t].drop_text, NULL);
        for (int q = 0; q < N_Q; q++) {
            const json_t *d = decision_of(rep, q);
            const char   *got = json_string_value(json_object_get(d, "decision"));
            if (q == MISSING_Q) {
                CHECK_STR_EQ(got, "image_error");
                continue;
            }
            /* the report's rotation golds are caprl_present_question's; correctness is gold == A / gold == B */
            const json_t *golds = json_object_get(d, "rotation_answers"), *vis = json_object_get(d, "visual"),
                         *txt = json_object_get(d, "text");
            for (int r = 0; r < ROT; r++) {
                const char *gl = json_string_value(json_array_get(golds, (size_t)r));
                CHECK_MSG(json_is_true(json_array_get(vis, (size_t)r)) == (gl && gl[0] == 'A') &&
                              json_is_true(json_array_get(txt, (size_t)r)) == (gl && gl[0] == 'B'),
                          "question %d rotation %d (gold %s): with the image right iff A, without iff B", q, r,
                          gl ? gl : "?");
            }
            double va = (double)n_a[q] / ROT, ta = (double)n_b[q] / ROT;
            bool   vis_ok = va > kv, txt_ok = ta < dt;
            int    outcome = vis_ok && txt_ok ? 0 : vis_ok ? 1 : txt_ok ? 2 : 3;
            static const char *const k_names[4] = {"kept", "answerable_without_image", "not_answered_with_image",
                                                   "both"};
            seen[outcome]++;
            boundary += va == kv || ta == dt;
            CHECK_MSG(got && strcmp(got, k_names[outcome]) == 0,
                      "thresholds %s / %s: question %d (%d/4 gold A, %d/4 gold B): %s, expected %s",
                      k_runs[t].keep_visual, k_runs[t].drop_text, q, n_a[q], n_b[q], got ? got : "?",
                      k_names[outcome]);
            if (first) { /* the model's outputs do not depend on thresholds, batching, grouping or threads */
                const json_t *d0 = decision_of(first, q);
                CHECK_MSG(json_equal(json_object_get(d, "visual_outputs"), json_object_get(d0, "visual_outputs")) &&
                              json_equal(json_object_get(d, "text_outputs"), json_object_get(d0, "text_outputs")),
                          "question %d: outputs differ between runs (%s)", q, extra);
            }
        }
        /* the output holds exactly the kept questions */
        json_t *out_t = load_output(name);
        size_t  kept_out = 0;
        const char *key;
        json_t     *v;
        json_object_foreach(out_t, key, v) {
            kept_out += json_array_size(json_object_get(v, "qa"));
        }
        CHECK_EQ_I64(kept_out, json_integer_value(json_object_get(json_object_get(rep, "questions"), "kept")));
        json_decref(out_t);
        if (!first) {
            first = rep;
        } else {
            json_decref(rep);
        }
    }
    json_decref(first);
    CHECK_MSG(seen[0] && seen[1] && seen[2] && seen[3] && boundary,
              "seed %d does not cover every outcome (%d kept, %d text, %d visual, %d both) and a boundary (%d)", SEED,
              seen[0], seen[1], seen[2], seen[3], boundary);

    int rc = test_finish("test_qa_filter");
    if (rc == 0) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        CHECK(system(cmd) == 0);
    }
    free(tmp);
    return rc;
}
