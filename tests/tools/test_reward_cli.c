/* caprl reward end to end on a tiny random reader with the Qwen tokenizer: one output line per caption with the
 * fields docs/formats.md lists and rewards that are the mean of their question scores; the same bytes for other
 * --batch / --threads settings and for a reordered captions file; expected mode (with and without prefix caching);
 * --no-shuffle presents questions as saved; the length term; caprl caption's output records (captions arrays,
 * error records) accepted; unmatched or malformed records refused with file:line (or skipped with --skip-bad);
 * bad templates and flags refused; a failed run leaves an existing output untouched. */
#include <jansson.h>
#include <stdbool.h>

#include "caprl_test.h"
#include "proc_util.h"

#define QWEN_TOKENIZER CAPRL_SHARED_DIR "/data/qwen-tokenizer/tokenizer.json"
#define NQ             4

static const char *const k_qa_lines =
    "{\"id\": \"a\", \"image\": \"imgs/a.png\", \"qa\": [{\"question\": \"What color is the car?\\n   - A) Red\\n   "
    "- B) Blue\\n   - C) Green\\n   - D) Black\\n   - E) Can not answer based on the caption\", \"answer\": \"B\"}, "
    "{\"question\": \"How many dogs are there?\\n   - A) One\\n   - B) Two\", \"answer\": \"B\"}]}\n"
    "{\"id\": \"b\", \"image\": \"imgs/b.png\", \"qa\": [{\"question\": \"Is it day?\\n   - A) Yes\\n   - B) No\", "
    "\"answer\": \"A\"}]}\n"
    "{\"id\": \"7\", \"image\": \"imgs/c.png\", \"qa\": [{\"question\": \"What is on the table?\\n   - A) A cup\\n   "
    "- B) A book\\n   - C) A phone\", \"answer\": \"C\"}]}\n";

/* caprl caption's output (captions arrays with token counts, an error record) plus a plain record and an
 * integer id */
static const char *const k_caption_lines =
    "{\"image\": \"imgs/a.png\", \"captions\": [\"A blue car and two dogs.\", \"Nothing to see.\"], \"tokens\": [2100, "
    "2600], \"finish\": [\"eos\", \"eos\"]}\n"
    "{\"image\": \"imgs/missing.png\", \"error\": \"imgs/missing.png: cannot read the image\"}\n"
    "\n"
    "{\"id\": \"b\", \"caption\": \"A sunny day in the park.\", \"tokens\": 10}\n"
    "{\"id\": 7, \"caption\": \"A phone lies on a wooden table.\", \"tokens\": 3500}\n";

/* g_dir/name, in a static buffer (one at a time). */
static const char *in_dir(const char *name) {
    static char path[4200];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    return path;
}

static void write_file(const char *name, const char *text) {
    write_text(in_dir(name), text);
}

static char *read_file(const char *name) {
    return read_all(in_dir(name), NULL);
}

/* Runs caprl reward in g_dir with the common inputs and extra arguments. */
static int reward(const char *out, const char *captions, const char *extra) {
    char args[8192];
    snprintf(args, sizeof args,
             "reward --reader '%s/reader' --qa '%s/qa.jsonl' --captions '%s/%s' --out '%s/%s' --n-questions %d %s",
             g_dir, g_dir, g_dir, captions, g_dir, out, NQ, extra);
    return run_cli(args, NULL, 0);
}

static bool stderr_has(const char *needle) {
    char buf[16384];
    read_stderr(buf, sizeof buf);
    bool ok = strstr(buf, needle) != NULL;
    if (!ok) {
        fprintf(stderr, "stderr lacks \"%s\":\n%s\n", needle, buf);
    }
    return ok;
}

/* Parses the output lines (at most cap). */
static int32_t load_records(const char *name, json_t **recs, int32_t cap) {
    char   *text = read_file(name);
    int32_t n = 0;
    for (char *line = text, *nl; line && *line; line = nl + 1) {
        nl = strchr(line, '\n');
        CHECK(nl != NULL);
        if (!nl) {
            break;
        }
        json_error_t jerr;
        json_t      *rec = json_loadb(line, (size_t)(nl - line), 0, &jerr);
        CHECK_MSG(rec != NULL, "%s: line %d: %s", name, n + 1, jerr.text);
        if (rec && n < cap) {
            recs[n++] = rec;
        } else {
            json_decref(rec);
        }
    }
    free(text);
    return n;
}

static void free_records(json_t **recs, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        json_decref(recs[i]);
    }
}

static double num(const json_t *o, const char *key) {
    return json_number_value(json_object_get(o, key));
}

/* Field-by-field checks of one record: its questions, their scores and the accuracy as their mean. */
static void check_record(const json_t *rec, bool expected, bool shuffled) {
    const json_t *qs = json_object_get(rec, "questions");
    CHECK(json_is_array(qs) && json_array_size(qs) == NQ);
    CHECK(json_is_integer(json_object_get(rec, "caption_index")));
    CHECK(json_integer_value(json_object_get(rec, "reader_tokens")) > 0);
    CHECK_STR_EQ(json_string_value(json_object_get(rec, "mode")), expected ? "expected" : "sample");
    CHECK(num(rec, expected ? "tau" : "temperature") == 0.6); /* the decimal typed, not float32 0.600000024 */
    double sum = 0;
    for (size_t k = 0; k < json_array_size(qs); k++) {
        const json_t *q = json_array_get(qs, k);
        const char   *text = json_string_value(json_object_get(q, "question"));
        const char   *gold = json_string_value(json_object_get(q, "gold"));
        double        score = num(q, "score");
        CHECK(text && gold && strlen(gold) == 1 && gold[0] >= 'A' && gold[0] <= 'F');
        CHECK(json_is_integer(json_object_get(q, "qa_index")));
        if (text && shuffled) {
            CHECK(strstr(text, "\n   - F) Can not answer based on the caption") != NULL);
            CHECK(strstr(text, "E) Can not answer") == NULL);
        }
        if (expected) {
            CHECK(score >= 0 && score <= 1 && score == num(q, "p_gold"));
            CHECK(json_object_get(q, "continuation") == NULL);
        } else {
            const char   *cont = json_string_value(json_object_get(q, "continuation"));
            const json_t *ans = json_object_get(q, "answer");
            char          first = 0;
            for (const char *c = cont; c && *c && !first; c++) {
                first = *c >= 'A' && *c <= 'I' ? *c : 0;
            }
            CHECK(cont != NULL);
            CHECK(first ? json_is_string(ans) && json_string_value(ans)[0] == first : json_is_null(ans));
            CHECK(score == ((first && gold && first == gold[0]) ? 1.0 : 0.0));
        }
        sum += score;
    }
    CHECK_NEAR(num(rec, "accuracy"), sum / NQ, 1e-6, 1e-7);
}

int main(void) {
    if (access(QWEN_TOKENIZER, R_OK) != 0) {
        fprintf(stderr, "test_reward_cli: %s missing: skipped\n", QWEN_TOKENIZER);
        return 77;
    }
    char *dir = test_tmpdir("test_reward_cli");
    snprintf(g_dir, sizeof g_dir, "%s", dir);
    free(dir);
    char args[8192];
    snprintf(args, sizeof args, "init-model --out '%s/reader' --preset tiny --tokenizer '%s'", g_dir, QWEN_TOKENIZER);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 0);
    write_file("qa.jsonl", k_qa_lines);
    write_file("caps.jsonl", k_caption_lines);

    /* sample mode: one line per caption, in file order */
    CHECK_EQ_I64(reward("out.jsonl", "caps.jsonl", "--seed 5 --threads 1"), 0);
    CHECK(stderr_has("4 captions to score") && stderr_has("1 error records"));
    json_t *recs[16];
    int32_t n = load_records("out.jsonl", recs, 16);
    CHECK_EQ_I64(n, 4);
    if (n == 4) {
        CHECK_STR_EQ(json_string_value(json_object_get(recs[0], "image")), "imgs/a.png");
        CHECK_EQ_I64(json_integer_value(json_object_get(recs[1], "caption_index")), 1);
        CHECK_STR_EQ(json_string_value(json_object_get(recs[2], "id")), "b");
        CHECK_EQ_I64(json_integer_value(json_object_get(recs[3], "id")), 7); /* the id as it was written */
        for (int32_t i = 0; i < n; i++) {
            check_record(recs[i], false, true);
            CHECK(num(recs[i], "reward") == num(recs[i], "accuracy")); /* no length term by default */
            CHECK(json_object_get(recs[i], "length_term") == NULL);
        }
    }
    free_records(recs, n);
    char *base = read_file("out.jsonl");

    /* the same bytes with other batching and threads, and per record for a reordered file */
    CHECK_EQ_I64(reward("out2.jsonl", "caps.jsonl", "--seed 5 --threads 2 --batch 1"), 0);
    char *again = read_file("out2.jsonl");
    CHECK(base && again && strcmp(base, again) == 0);
    free(again);
    write_file("caps_rev.jsonl",
               "{\"id\": 7, \"caption\": \"A phone lies on a wooden table.\", \"tokens\": 3500}\n"
               "{\"id\": \"b\", \"caption\": \"A sunny day in the park.\", \"tokens\": 10}\n"
               "{\"image\": \"imgs/a.png\", \"captions\": [\"A blue car and two dogs.\", \"Nothing to see.\"]}\n");
    CHECK_EQ_I64(reward("out3.jsonl", "caps_rev.jsonl", "--seed 5 --threads 1"), 0);
    again = read_file("out3.jsonl");
    if (base && again) {
        char *lines[4] = {0};
        int   k = 0;
        for (char *p = base; *p && k < 4; k++) {
            char *nl = strchr(p, '\n');
            lines[k] = strndup(p, (size_t)(nl - p + 1));
            p = nl + 1;
        }
        for (int i = 0; i < 4; i++) {
            CHECK_MSG(lines[i] && strstr(again, lines[i]) != NULL, "record %d differs after reordering", i);
            free(lines[i]);
        }
    }
    free(again);

    /* expected mode, with and without the prefix caches, and the length term from the "tokens" fields */
    CHECK_EQ_I64(reward("e1.jsonl", "caps.jsonl", "--mode expected --length-weight 0.2 --threads 1"), 0);
    CHECK_EQ_I64(reward("e2.jsonl", "caps.jsonl", "--mode expected --length-weight 0.2 --no-prefix-cache"), 0);
    json_t *e1[8], *e2[8];
    int32_t n1 = load_records("e1.jsonl", e1, 8), n2 = load_records("e2.jsonl", e2, 8);
    CHECK(n1 == 4 && n2 == 4);
    /* 2100, 2600, 10 and 3500 policy tokens against L1 2048, L2 3072 */
    static const double want_len[4] = {1.0 - 52.0 / 1024.0, 1.0 - 552.0 / 1024.0, 1.0, 0.0};
    for (int32_t i = 0; i < n1 && i < n2 && i < 4; i++) {
        check_record(e1[i], true, true);
        CHECK_NEAR(num(e1[i], "length_term"), want_len[i], 1e-6, 1e-7);
        CHECK_NEAR(num(e1[i], "reward"), num(e1[i], "accuracy") + 0.2 * want_len[i], 1e-6, 1e-7);
        const json_t *qa = json_object_get(e1[i], "questions"), *qb = json_object_get(e2[i], "questions");
        for (size_t k = 0; k < NQ; k++) {
            const json_t *a = json_array_get(qa, k), *b = json_array_get(qb, k);
            CHECK_STR_EQ(json_string_value(json_object_get(a, "question")),
                         json_string_value(json_object_get(b, "question")));
            CHECK_NEAR(num(a, "p_gold"), num(b, "p_gold"), 1e-5, 1e-9);
        }
        CHECK(json_integer_value(json_object_get(e1[i], "reader_tokens")) <
              json_integer_value(json_object_get(e2[i], "reader_tokens")));
    }
    free_records(e1, n1);
    free_records(e2, n2);

    /* --no-shuffle: as saved, gold as saved */
    CHECK_EQ_I64(reward("ns.jsonl", "caps.jsonl", "--mode expected --no-shuffle"), 0);
    n = load_records("ns.jsonl", recs, 16);
    CHECK_EQ_I64(n, 4);
    if (n == 4) {
        check_record(recs[2], true, false);
        const json_t *q = json_array_get(json_object_get(recs[2], "questions"), 0);
        CHECK_STR_EQ(json_string_value(json_object_get(q, "question")), "Is it day?\n   - A) Yes\n   - B) No");
        CHECK_STR_EQ(json_string_value(json_object_get(q, "gold")), "A");
        CHECK(json_object_get(q, "shuffled") == json_false());
    }
    free_records(recs, n);

    /* a custom template; a template without two {} is refused */
    write_file("tmpl_ok.txt", "Caption: {}\nQuestion: {}\nThe answer is");
    write_file("tmpl_bad.txt", "Caption: {}\nThe answer is");
    snprintf(args, sizeof args, "--mode expected --reader-template '%s/tmpl_ok.txt'", g_dir);
    CHECK_EQ_I64(reward("t.jsonl", "caps.jsonl", args), 0);
    snprintf(args, sizeof args, "--reader-template '%s/tmpl_bad.txt'", g_dir);
    CHECK_EQ_I64(reward("t2.jsonl", "caps.jsonl", args), 2);
    CHECK(stderr_has("tmpl_bad.txt") && stderr_has("two {} placeholders"));

    /* an unmatched caption: refused with file:line, the existing output untouched; --skip-bad skips it */
    write_file("caps_bad.jsonl", "{\"id\": \"b\", \"caption\": \"x\"}\n"
                                 "{\"image\": \"imgs/zzz.png\", \"caption\": \"y\"}\n"
                                 "{\"id\": \"b\", \"captions\": \"not an array\"}\n");
    write_file("keep.jsonl", "old\n");
    CHECK_EQ_I64(reward("keep.jsonl", "caps_bad.jsonl", ""), 2);
    CHECK(stderr_has("caps_bad.jsonl:2:") && stderr_has("imgs/zzz.png"));
    char *kept = read_file("keep.jsonl");
    CHECK(kept && strcmp(kept, "old\n") == 0);
    free(kept);
    CHECK_EQ_I64(reward("skip.jsonl", "caps_bad.jsonl", "--skip-bad --mode expected"), 0);
    CHECK(stderr_has("caps_bad.jsonl:2:") && stderr_has("caps_bad.jsonl:3:") && stderr_has("skipped"));
    n = load_records("skip.jsonl", recs, 16);
    CHECK_EQ_I64(n, 1);
    free_records(recs, n);

    /* a malformed QA record: refused naming the QA file and line, unless --skip-bad */
    write_file("qa_bad.jsonl", "{\"id\": \"b\", \"image\": \"b.png\", \"qa\": [{\"question\": \"Q?\\n   - A) x\", "
                               "\"answer\": \"A\"}]}\n{\"id\": \"c\", \"qa\": 5}\n");
    snprintf(args, sizeof args,
             "reward --reader '%s/reader' --qa '%s/qa_bad.jsonl' --captions '%s/caps_bad.jsonl' --out '%s/q.jsonl'",
             g_dir, g_dir, g_dir, g_dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 2);
    CHECK(stderr_has("qa_bad.jsonl:2"));

    /* flags */
    CHECK_EQ_I64(reward("f.jsonl", "caps.jsonl", "--mode greedy"), 1);
    write_file("caps_notok.jsonl", "{\"id\": \"b\", \"caption\": \"no token count\"}\n");
    CHECK_EQ_I64(reward("f.jsonl", "caps_notok.jsonl", "--length-weight 0.2"), 1);
    CHECK(stderr_has("caps_notok.jsonl:1") && stderr_has("--tokenizer"));
    snprintf(args, sizeof args, "--mode expected --length-weight 0.2 --tokenizer '%s'", QWEN_TOKENIZER);
    CHECK_EQ_I64(reward("f.jsonl", "caps_notok.jsonl", args), 0);
    CHECK_EQ_I64(run_cli("reward --help", NULL, 0), 0);
    CHECK_EQ_I64(run_cli("reward --qa x", NULL, 0), 1);
    free(base);
    return test_finish("test_reward_cli");
}
