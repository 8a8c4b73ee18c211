/* caprl eval prism end to end with real checkpoints: a tiny random Qwen2.5-VL captioner and a tiny text reader whose
 * weights force its answer.
 *
 * The reader is a `tiny` checkpoint rewritten as a token automaton: both layers are zero (the residual stream is the
 * token's embedding), the embedding of each automaton state is its own unit vector e_j, and the untied lm_head row of
 * each successor token is 10 e_j of its predecessor state, every other row zero. After the final norm the successor's
 * logit is 80 and every other token's 0, so at the released temperature 1.0 the reader writes, after any prompt
 * ending in "\n" (every prompt here ends "<|im_start|>assistant\n"),
 *     </think><answer>\boxed{X}</answer><|im_end|>      (tokens "</" "think" "><" "answer" ">\" "boxed" "{" X
 *                                                        "}</" "ans" "wer" ">": every state distinct)
 * where X is "A" or "B" with probability 1/2 each (both rows are 10 e_{"{"}): one sampled bit per answer, drawn from
 * the answer's own random stream. Each answer's score is therefore known from its text alone ("\boxed{gold}" in
 * it or not), and BoN / Mean are recomputed here from the answers file and compared with the result files.
 *
 * Checked: stage 1 captions every distinct image n times (two questions share one image; an unreadable image gets an
 * error record and its question scores 0); stage 2's answers are the automaton's; the details file (released layout:
 * sample, scores, parsed answers, reader tokens with the end token, captions then outputs) and the eval file
 * ("BoN: x Mean: y") agree with the recomputation; --stage 1 then --stage 2, each killed by SIGKILL mid-run with a
 * torn line added and rerun with other batch sizes, give the result files of a --shard 0/2 + 1/2 run byte for byte; a
 * rerun with other settings and stage 2 without captions are refused. */
#include <jansson.h>
#include <stdbool.h>

#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl/tokenizer.h"
#include "caprl_test.h"
#include "proc_util.h"

#define N_CAPS    3
#define SEED      3
#define N_ITEMS   6
#define MISSING   4 /* the item whose image does not exist */
#define CHAIN_LEN 12

/* Item i: image, gold. Items 0 and 1 share an image. */
static const char *const k_items[N_ITEMS][2] = {{"rgb8.png", "A"},    {"rgb8.png", "B"},        {"pal4.png", "B"},
                                                {"baseline.jpg", "A"}, {"missing.png", "A"}, {"progressive.jpg", "B"}};

/* JSON Lines as {key: record}, key the string or integer field `key` (as text); every line complete, keys unique. */
static json_t *load_jsonl(const char *path, const char *key) {
    size_t len = 0;
    char  *data = read_all(path, &len);
    CHECK_MSG(data != NULL, "cannot read %s", path);
    json_t *map = json_object();
    for (size_t start = 0; data && start < len;) {
        char *nl = memchr(data + start, '\n', len - start);
        CHECK_MSG(nl != NULL, "%s: a torn last line", path);
        if (!nl) {
            break;
        }
        json_t *rec = json_loadb(data + start, (size_t)(nl - data) - start, 0, NULL);
        json_t *k = json_object_get(rec, key);
        char    kbuf[64];
        if (json_is_integer(k)) {
            snprintf(kbuf, sizeof kbuf, "%lld", (long long)json_integer_value(k));
        }
        const char *ks = json_is_string(k) ? json_string_value(k) : json_is_integer(k) ? kbuf : NULL;
        CHECK_MSG(ks && !json_object_get(map, ks), "%s: bad or repeated key in line %.80s", path, data + start);
        if (ks) {
            json_object_set(map, ks, rec);
        }
        json_decref(rec);
        start = (size_t)(nl - data) + 1;
    }
    free(data);
    return map;
}

/* ---- the automaton reader -------------------------------------------------------------------------------------- */

static uint16_t f32_to_bf16(float f) { /* exact for 0, 1 and 10 */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

/* Writes one element of a tensor of dtype F32 or BF16. */
static void put(void *data, int32_t dtype, int64_t i, float v) {
    if (dtype == CAPRL_DTYPE_BF16) {
        uint16_t h = f32_to_bf16(v);
        memcpy((char *)data + 2 * i, &h, 2);
    } else {
        memcpy((char *)data + 4 * i, &v, 4);
    }
}

typedef struct automaton {
    int32_t state[CHAIN_LEN + 2]; /* token of each state: "\n", the chain, then the second letter ("B") */
    int32_t n_states;
    int32_t succ[CHAIN_LEN + 3][2]; /* transitions (from state index, to token) */
    int32_t n_succ;
} automaton;

static void make_reader(const char *dir, const automaton *a, int32_t hidden) {
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
        size_t                 esz = t->dtype == CAPRL_DTYPE_BF16 ? 2 : 4;
        bufs[i] = calloc((size_t)t->numel, esz); /* zero unless set below */
        dtype = t->dtype;
        bool norm = strstr(t->name, "norm.weight") != NULL;
        for (int64_t k = 0; norm && k < t->numel; k++) {
            put(bufs[i], t->dtype, k, 1.0f);
        }
        if (strcmp(t->name, "model.embed_tokens.weight") == 0) {
            vocab = t->shape[0];
            for (int32_t j = 0; j < a->n_states; j++) {
                put(bufs[i], t->dtype, (int64_t)a->state[j] * hidden + j, 1.0f);
            }
        }
        CHECK(t->dtype == CAPRL_DTYPE_BF16 || t->dtype == CAPRL_DTYPE_F32);
        CHECK(caprl_st_writer_add(w, t->name, t->dtype, t->n_dims, t->shape, bufs[i], &err) == CAPRL_OK);
    }
    size_t esz = dtype == CAPRL_DTYPE_BF16 ? 2 : 4;
    bufs[n_t] = calloc((size_t)(vocab * hidden), esz);
    for (int32_t s = 0; s < a->n_succ; s++) {
        put(bufs[n_t], dtype, (int64_t)a->succ[s][1] * hidden + a->succ[s][0], 10.0f);
    }
    int64_t shape[2] = {vocab, hidden};
    CHECK(caprl_st_writer_add(w, "lm_head.weight", dtype, 2, shape, bufs[n_t], &err) == CAPRL_OK);
    CHECK_MSG(caprl_st_writer_save(w, path, &err) == CAPRL_OK, "%s", err.msg);
    caprl_st_writer_free(w);
    caprl_safetensors_free(st);
    for (int64_t i = 0; i <= n_t; i++) {
        free(bufs[i]);
    }
    free(bufs);
    snprintf(path, sizeof path, "%s/config.json", dir);
    json_t *cfg = json_load_file(path, 0, NULL);
    CHECK(cfg != NULL);
    json_object_set_new(cfg, "tie_word_embeddings", json_false());
    CHECK(json_dump_file(cfg, path, JSON_INDENT(2)) == 0);
    json_decref(cfg);
}

/* The automaton: "\n" -> chain[0] -> ... -> "{" -> "A" | "B" -> "}</" -> ... -> ">" -> <|im_end|>. */
static bool build_automaton(automaton *a) {
    static const char *const chain[CHAIN_LEN] = {"</", "think", "><", "answer", ">\\", "boxed",
                                                 "{",  "A",     "}</", "ans",    "wer", ">"};
    caprl_tokenizer         *tok = NULL;
    caprl_error              err = {0};
    char                     path[2048];
    snprintf(path, sizeof path, "%s/data/qwen-tokenizer/tokenizer.json", CAPRL_SHARED_DIR);
    CHECK_MSG(caprl_tokenizer_load(&tok, path, &err) == CAPRL_OK, "%s", err.msg);
    if (!tok) {
        return false;
    }
    memset(a, 0, sizeof *a);
    a->state[a->n_states++] = caprl_tokenizer_token_id(tok, "\xC4\x8A"); /* "\n" */
    for (int i = 0; i < CHAIN_LEN; i++) {
        a->state[a->n_states++] = caprl_tokenizer_token_id(tok, chain[i]);
    }
    int32_t b = caprl_tokenizer_token_id(tok, "B"), eos = caprl_tokenizer_token_id(tok, "<|im_end|>");
    a->state[a->n_states++] = b;
    bool ok = b > 0 && eos > 0;
    for (int i = 0; i < a->n_states; i++) {
        ok = ok && a->state[i] >= 0;
        for (int j = 0; j < i; j++) {
            ok = ok && a->state[i] != a->state[j];
        }
    }
    CHECK_MSG(ok, "the automaton's tokens must exist and be distinct");
    /* state k (0..CHAIN_LEN-1) -> token of state k+1; "{" (state 7) -> "B" too; "A" (8) and "B" -> "}</" (9);
     * ">" (state CHAIN_LEN) -> <|im_end|> */
    for (int k = 0; k < CHAIN_LEN; k++) {
        a->succ[a->n_succ][0] = k;
        a->succ[a->n_succ++][1] = a->state[k + 1];
    }
    a->succ[a->n_succ][0] = 7;
    a->succ[a->n_succ++][1] = b;
    a->succ[a->n_succ][0] = a->n_states - 1;
    a->succ[a->n_succ++][1] = a->state[9];
    a->succ[a->n_succ][0] = CHAIN_LEN;
    a->succ[a->n_succ++][1] = eos;
    caprl_tokenizer_free(tok);
    return ok;
}

/* ---- checks ------------------------------------------------------------------------------------------------------ */

static const char *const k_answer_a = "</think><answer>\\boxed{A}</answer>";
static const char *const k_answer_b = "</think><answer>\\boxed{B}</answer>";

/* A stage's records: kind_t.jsonl, or with shards the union of kind_t.shard-i-of-2.jsonl (disjoint). */
static json_t *load_stage(const char *dir, const char *kind, const char *key, bool sharded) {
    char path[2048];
    if (!sharded) {
        snprintf(path, sizeof path, "%s/%s_t.jsonl", dir, kind);
        return load_jsonl(path, key);
    }
    json_t *all = json_object();
    for (int s = 0; s < 2; s++) {
        snprintf(path, sizeof path, "%s/%s_t.shard-%d-of-2.jsonl", dir, kind, s);
        json_t     *part = load_jsonl(path, key);
        const char *k;
        json_t     *v;
        json_object_foreach(part, k, v) {
            CHECK_MSG(!json_object_get(all, k), "%s %s in both shards", kind, k);
        }
        json_object_update(all, part);
        json_decref(part);
    }
    return all;
}

/* BoN and Mean of the run in dir recomputed from its captions and answers files, compared with its result files
 * field by field. */
static void check_run(const char *dir, bool sharded) {
    char    path[2048];
    json_t *caps = load_stage(dir, "captions", "image", sharded);
    json_t *ans = load_stage(dir, "answers", "index", sharded);
    CHECK_EQ_I64(json_object_size(caps), 5); /* 5 distinct images, the missing one as an error record */
    CHECK_EQ_I64(json_object_size(ans), N_ITEMS);
    snprintf(path, sizeof path, "%s/Prism_t_step_details_7_final.json", dir);
    json_error_t jerr;
    json_t      *details = json_load_file(path, 0, &jerr);
    CHECK_MSG(json_is_array(details) && json_array_size(details) == N_ITEMS, "%s: %s", path, jerr.text);
    double bon = 0, mean = 0;
    int    mixed = 0;
    for (int i = 0; i < N_ITEMS && details; i++) {
        char key[16];
        snprintf(key, sizeof key, "%d", i);
        const json_t *a = json_object_get(ans, key), *c = json_object_get(caps, k_items[i][0]);
        const json_t *d = json_array_get(details, (size_t)i);
        CHECK_MSG(a && c && json_array_size(d) == 5, "item %d: records", i);
        if (!a || !c || json_array_size(d) != 5) {
            continue;
        }
        const json_t *sample = json_array_get(d, 0), *scores = json_array_get(d, 1), *parsed = json_array_get(d, 2),
                     *tokens = json_array_get(d, 3), *texts = json_array_get(d, 4);
        CHECK_STR_EQ(json_string_value(json_object_get(sample, "image")), k_items[i][0]);
        CHECK_STR_EQ(json_string_value(json_object_get(sample, "answer")), k_items[i][1]);
        CHECK_EQ_I64(json_array_size(texts), 2 * N_CAPS);
        double best = 0, sum = 0;
        for (int k = 0; k < N_CAPS; k++) {
            double      score = json_real_value(json_array_get(scores, (size_t)k));
            const char *caption = json_string_value(json_array_get(texts, (size_t)k));
            const char *output = json_string_value(json_array_get(texts, (size_t)(N_CAPS + k)));
            if (i == MISSING) {
                CHECK(json_is_string(json_object_get(c, "error")) && json_is_string(json_object_get(a, "error")));
                CHECK_MSG(score == 0.0 && caption && !caption[0] && output && !output[0],
                          "the unreadable image's question scores 0 with empty texts");
                continue;
            }
            const char *want_cap = json_string_value(json_array_get(json_object_get(c, "captions"), (size_t)k));
            const char *out = json_string_value(json_array_get(json_object_get(a, "outputs"), (size_t)k));
            CHECK_MSG(out && (strcmp(out, k_answer_a) == 0 || strcmp(out, k_answer_b) == 0),
                      "item %d answer %d is not the automaton's: %s", i, k, out ? out : "?");
            CHECK_STR_EQ(caption, want_cap);
            CHECK_STR_EQ(output, out);
            CHECK_STR_EQ(json_string_value(json_array_get(json_object_get(a, "finish"), (size_t)k)), "eos");
            CHECK_EQ_I64(json_integer_value(json_array_get(json_object_get(a, "tokens"), (size_t)k)), CHAIN_LEN);
            /* the output text's tokens as the release's tokenizer(text).input_ids counts them: the Qwen tokenizer
             * splits "</think><answer>\\boxed{A}</answer>" into 11 ids (the automaton emits it in 12, and the
             * <|im_end|> after it is no part of the text) */
            CHECK_EQ_I64(json_integer_value(json_array_get(tokens, (size_t)k)), 11);
            char letter[2] = {out ? out[strlen("</think><answer>\\boxed{")] : 0, 0};
            CHECK_STR_EQ(json_string_value(json_array_get(parsed, (size_t)k)), letter);
            double want = strcmp(letter, k_items[i][1]) == 0 ? 1.0 : 0.0;
            CHECK_MSG(score == want, "item %d answer %d: score %g, expected %g", i, k, score, want);
            best = want > best ? want : best;
            sum += want;
        }
        mixed += sum > 0 && sum < N_CAPS;
        bon += best;
        mean += sum / N_CAPS;
    }
    bon /= N_ITEMS;
    mean /= N_ITEMS;
    CHECK_MSG(mixed > 0, "no item with both right and wrong answers: BoN and Mean are not told apart");
    snprintf(path, sizeof path, "%s/Prism_t_step_eval_7_final.json", dir);
    json_t     *ev = json_load_file(path, 0, &jerr);
    const char *line = json_string_value(json_array_get(ev, 0));
    double      got_bon = -1, got_mean = -1;
    CHECK_MSG(line && sscanf(line, "BoN: %lf Mean: %lf", &got_bon, &got_mean) == 2, "%s: %s", path,
              line ? line : jerr.text);
    CHECK_NEAR(got_bon, bon, 0, 1e-15);
    CHECK_NEAR(got_mean, mean, 0, 1e-15);
    json_decref(ev);
    json_decref(details);
    json_decref(caps);
    json_decref(ans);
}

/* The two result files of two runs are byte-identical. */
static void same_results(const char *dir_a, const char *dir_b, const char *what) {
    static const char *const names[2] = {"Prism_t_step_details_7_final.json", "Prism_t_step_eval_7_final.json"};
    for (int f = 0; f < 2; f++) {
        char pa[2048], pb[2048];
        snprintf(pa, sizeof pa, "%s/%s", dir_a, names[f]);
        snprintf(pb, sizeof pb, "%s/%s", dir_b, names[f]);
        size_t la = 0, lb = 0;
        char  *a = read_all(pa, &la), *b = read_all(pb, &lb);
        CHECK_MSG(a && b && la == lb && memcmp(a, b, la) == 0, "%s: %s differs from the reference run", what,
                  names[f]);
        free(a);
        free(b);
    }
}

/* Runs cmdline in the background, kills it with SIGKILL once `file` has `lines` lines, appends a torn half record to
 * it; reports whether the kill came before the end. */
static void kill_midway(const char *cmdline, const char *file, long lines, const char *torn) {
    char err_path[4200];
    snprintf(err_path, sizeof err_path, "%s/killed.stderr", g_dir);
    child c;
    if (!child_start(&c, cmdline, err_path)) {
        return;
    }
    child_wait_lines(&c, file, lines, 300.0, 1e-3);
    bool finished = c.done || !child_kill(&c);
    fprintf(stderr, "test_eval_prism_cli: %s after %ld records of %s\n",
            finished ? "note: the run finished before the kill," : "killed", count_file_lines(file), file);
    append_text(file, torn);
}

/* cmdline exits with code and its stderr holds needle. */
static void expect_exit(const char *cmdline, int code, const char *needle, const char *what) {
    CHECK_EQ_I64(run(cmdline, NULL, 0), code);
    char *msg = last_stderr();
    CHECK_MSG(strstr(msg, needle) != NULL, "%s: expected \"%s\" in: %s", what, needle, msg);
    free(msg);
}

int main(void) {
    char *tmp = test_tmpdir("eval_prism_cli");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    char cmd[16384], base[8192], path[2048];

    automaton au;
    if (!build_automaton(&au)) {
        return test_finish("test_eval_prism_cli");
    }
    snprintf(cmd, sizeof cmd,
             "(%s init-model --preset tiny-vl --seed 9 --out %s/cap --tokenizer %s/data/qwen-tokenizer/tokenizer.json "
             "&& %s init-model --preset tiny --seed 4 --out %s/reader --tokenizer "
             "%s/data/qwen-tokenizer/tokenizer.json)",
             CAPRL_CLI, tmp, CAPRL_SHARED_DIR, CAPRL_CLI, tmp, CAPRL_SHARED_DIR);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    snprintf(path, sizeof path, "%s/reader", tmp);
    make_reader(path, &au, 64);

    /* the benchmark (caprl's simple JSONL) and its images */
    snprintf(cmd, sizeof cmd, "mkdir %s/b && cd %s/tests/fixtures/img && cp rgb8.png pal4.png baseline.jpg "
                              "progressive.jpg %s/b/",
             tmp, CAPRL_SOURCE_DIR, tmp);
    CHECK(system(cmd) == 0);
    snprintf(path, sizeof path, "%s/b/bench.jsonl", tmp);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    for (int i = 0; f && i < N_ITEMS; i++) {
        fprintf(f, "{\"image\": \"%s\", \"question\": \"Which letter, question %d?\", \"answer\": \"%s\", "
                   "\"type\": \"multiple_choice\"}\n",
                k_items[i][0], i, k_items[i][1]);
    }
    if (f) {
        fclose(f);
    }
    snprintf(base, sizeof base,
             "%s eval prism --captioner %s/cap --reader %s/reader --bench %s/b/bench.jsonl --tag t --step 7 "
             "-n %d --max-new-tokens 4 --reader-max-new-tokens 16 --seed %d --threads 1",
             CAPRL_CLI, tmp, tmp, tmp, N_CAPS, SEED);

    /* the reference (each run loads the tokenizer of each model it uses, about a second each, so the runs are
     * few): two shards, both stages in each run; the first cannot finish the set, the second writes the results */
    snprintf(cmd, sizeof cmd, "%s --out %s/ref --shard 0/2", base, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    char *msg = last_stderr();
    CHECK_MSG(strstr(msg, "items answered; the result files are written once"), "shard 0/2: %s", msg);
    free(msg);
    snprintf(cmd, sizeof cmd, "%s --out %s/ref --shard 1/2", base, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    msg = last_stderr();
    CHECK_MSG(strstr(msg, "BoN: ") && strstr(msg, "Mean: ") && strstr(msg, "Prism_t_step_eval_7_final.json"),
              "no summary: %s", msg);
    free(msg);
    char ref_dir[2048], other[2048];
    snprintf(ref_dir, sizeof ref_dir, "%s/ref", tmp);
    check_run(ref_dir, true);

    /* unsharded, stage by stage, each stage killed midway with a torn line and rerun with other batch sizes: the
     * same result files byte for byte */
    snprintf(cmd, sizeof cmd, "%s --out %s/staged --stage 1 --batch 1", base, tmp);
    snprintf(path, sizeof path, "%s/staged/captions_t.jsonl", tmp);
    kill_midway(cmd, path, 1, "{\"image\": \"pal4.png\", \"captions\": [\"half");
    snprintf(cmd, sizeof cmd, "%s --out %s/staged --stage 1 --batch 3", base, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    msg = last_stderr();
    CHECK_MSG(strstr(msg, "torn last record"), "stage 1 rerun: no repair note: %s", msg);
    free(msg);
    snprintf(cmd, sizeof cmd, "%s --out %s/staged --stage 2 --reader-batch 4", base, tmp);
    snprintf(path, sizeof path, "%s/staged/answers_t.jsonl", tmp);
    kill_midway(cmd, path, 3, "{\"index\": 5, \"id\": \"5\", \"outputs\": [\"</thi");
    snprintf(cmd, sizeof cmd, "%s --out %s/staged --stage 2 --reader-batch 16", base, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    msg = last_stderr();
    CHECK_MSG(strstr(msg, "torn last record"), "stage 2 rerun: no repair note: %s", msg);
    free(msg);
    snprintf(other, sizeof other, "%s/staged", tmp);
    check_run(other, false);
    same_results(ref_dir, other, "--stage 1 / --stage 2 with kills vs two shards");

    /* stage 1 from a file: the reference captions keyed by absolute paths (also "file://"), in another order, with a
     * record of an image outside the benchmark and a later duplicate; the same results as captioning */
    snprintf(cmd, sizeof cmd,
             "mkdir -p %s/ext && cat %s/ref/captions_t.shard-1-of-2.jsonl %s/ref/captions_t.shard-0-of-2.jsonl | "
             "sed -e '1s#\"image\":\"#\"image\":\"file://%s/b/#' -e '2,$s#\"image\":\"#\"image\":\"%s/b/#' "
             "> %s/ext/caps.jsonl && echo '{\"image\":\"%s/b/other.png\",\"captions\":[]}' >> %s/ext/caps.jsonl && "
             "head -n 1 %s/ref/captions_t.shard-0-of-2.jsonl | sed 's#\"captions\":\\[#\"captions\":[\"x\",#' >> "
             "%s/ext/caps.jsonl",
             tmp, tmp, tmp, tmp, tmp, tmp, tmp, tmp, tmp, tmp);
    CHECK(system(cmd) == 0);
    char import_base[8192];
    snprintf(import_base, sizeof import_base,
             "%s eval prism --reader %s/reader --bench %s/b/bench.jsonl --tag t --step 7 -n %d "
             "--reader-max-new-tokens 16 --seed %d --threads 1",
             CAPRL_CLI, tmp, tmp, N_CAPS, SEED);
    snprintf(cmd, sizeof cmd, "%s --captions %s/ext/caps.jsonl --out %s/imported", import_base, tmp, tmp);
    expect_exit(cmd, 0, "took the captions of 5 images", "--captions");
    snprintf(other, sizeof other, "%s/imported", tmp);
    same_results(ref_dir, other, "--captions with the reference's captions vs captioning");
    /* a file without one of the images: refused naming it, nothing written */
    snprintf(cmd, sizeof cmd, "grep -v pal4 %s/ext/caps.jsonl > %s/ext/missing.jsonl", tmp, tmp);
    CHECK(system(cmd) == 0);
    snprintf(cmd, sizeof cmd, "%s --captions %s/ext/missing.jsonl --out %s/missing", import_base, tmp, tmp);
    expect_exit(cmd, 2, "missing.jsonl: no captions for 1 of the 5 images to caption (the first: pal4.png)",
                "a missing image");
    snprintf(path, sizeof path, "%s/missing/captions_t.jsonl", tmp);
    CHECK_EQ_I64(count_file_lines(path), 0);
    /* a record with the wrong number of captions, first for its image: refused naming file and line */
    snprintf(cmd, sizeof cmd, "tail -n 1 %s/ext/caps.jsonl > %s/ext/count.jsonl && cat %s/ext/caps.jsonl >> "
                              "%s/ext/count.jsonl",
             tmp, tmp, tmp, tmp);
    CHECK(system(cmd) == 0);
    snprintf(cmd, sizeof cmd, "%s --captions %s/ext/count.jsonl --out %s/count", import_base, tmp, tmp);
    expect_exit(cmd, 2, "count.jsonl:1: expected \"captions\" with 3 strings", "a wrong caption count");
    /* -n 1 also takes {"image", "caption"} (caprl synth's ground-truth captions) */
    snprintf(path, sizeof path, "%s/ext/one.jsonl", tmp);
    f = fopen(path, "wb");
    CHECK(f != NULL);
    for (int i = 0; f && i < N_ITEMS; i++) {
        if (i != 1) { /* items 0 and 1 share an image */
            fprintf(f, "{\"image\": \"%s\", \"caption\": \"caption of %s\"}\n", k_items[i][0], k_items[i][0]);
        }
    }
    if (f) {
        fclose(f);
    }
    snprintf(cmd, sizeof cmd,
             "%s eval prism --reader %s/reader --bench %s/b/bench.jsonl --tag one -n 1 --reader-max-new-tokens 16 "
             "--threads 1 --captions %s/ext/one.jsonl --out %s/one --stage 1",
             CAPRL_CLI, tmp, tmp, tmp, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    snprintf(path, sizeof path, "%s/one/captions_one.jsonl", tmp);
    json_t *one = load_jsonl(path, "image");
    const json_t *pal = json_object_get(json_object_get(one, "pal4.png"), "captions");
    const char   *pal0 = json_string_value(json_array_get(pal, 0));
    CHECK_MSG(json_object_size(one) == 5 && json_array_size(pal) == 1 && pal0 && !strcmp(pal0, "caption of pal4.png"),
              "-n 1 with \"caption\" records: %s", path);
    json_decref(one);
    /* both sources at once is a usage error */
    snprintf(cmd, sizeof cmd, "%s --captions %s/ext/caps.jsonl --out %s/both", base, tmp, tmp);
    expect_exit(cmd, 1, "--captioner or --captions (one of them)", "both stage-1 sources");

    /* other settings on the same tag are refused, nothing touched */
    snprintf(cmd, sizeof cmd, "%s --out %s/ref -n 2", base, tmp);
    expect_exit(cmd, 2, "n_captions", "a rerun with -n 2 must be refused naming n_captions");
    /* stage 2 before stage 1 */
    snprintf(cmd, sizeof cmd, "%s --out %s/early --stage 2", base, tmp);
    expect_exit(cmd, 2, "run stage 1", "stage 2 without captions");

    int rc = test_finish("test_eval_prism_cli");
    if (rc == 0) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        CHECK(system(cmd) == 0);
    }
    free(tmp);
    return rc;
}
