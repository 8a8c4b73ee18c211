/* `caprl qa parse` and `caprl eval score` end to end: files in, files out, summaries on stderr, exit codes; the
 * parsed QA file loads with the same loader the reward uses. */
#include "caprl/qa.h"
#include "caprl_test.h"
#include "cli_util.h"

static void write_file(const char *name, const char *text) {
    char path[4300];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static char *read_text(const char *name) {
    char path[4300];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    char  *buf = malloc(1 << 20);
    size_t n = fread(buf, 1, (1 << 20) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static int count_lines(const char *s) {
    int n = 0;
    for (; s && *s; s++) {
        n += *s == '\n';
    }
    return n;
}

static void test_qa_parse(void) {
    write_file("raw.jsonl",
               "{\"id\": \"img1\", \"image\": \"imgs/1.png\", \"response\": \"#### 1. **What color?**\\n   - A) Red\\n   "
               "- B) Blue\\n\\n**Answer:** B) Blue\\n------\\n#### 2. **How many?**\\n   - A) 1\\n   - B) 2\\n   - C) 3\\n\\n"
               "**Answer:** C) 3\\n\"}\n"
               "{\"id\": \"img2\", \"image\": \"imgs/2.png\", \"response\": \"#### 1. **Q?**\\n- A) a\\n- B) b\\n**Answer:** "
               "A\\n#### 2. **R?**\\n- A) a\\n- B) b\\n**Answer:** maybe\\n#### 3. **S?**\\n- A) a\"}\n"
               "\n"
               "{\"image_path\": \"imgs/3.png\", \"qa_response\": \"I cannot see the image.\"}\n"
               "{\"image_path\": \"imgs/4.png\", \"qa_response\": \"#### 1. **T?**\\r\\n- A) x\\r\\n- B) y\\r\\nAnswer: B\"}\n");
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "qa parse '%s/raw.jsonl' --out '%s/qa.jsonl' --report '%s/report.jsonl'", g_dir, g_dir,
             g_dir);
    CHECK(run_cli(cmd, NULL, 0) == 0);
    char err[8192];
    read_stderr(err, sizeof err);
    CHECK_MSG(strstr(err, "4 responses -> 4 questions for 3 images; 1 images left without a question; 2 items "
                          "dropped (truncated 1, bad_answer 1)") != NULL, "%s", err);
    char *qa = read_text("qa.jsonl");
    CHECK(count_lines(qa) == 3);
    CHECK(qa && strstr(qa, "{\"id\": \"img1\", \"image\": \"imgs/1.png\", \"qa\": [{\"question\": \"What color?\\n   - "
                           "A) Red\\n   - B) Blue\", \"answer\": \"B\"}") != NULL);
    free(qa);
    char *rep = read_text("report.jsonl");
    CHECK(count_lines(rep) == 2);
    CHECK(rep && strstr(rep, "\"reason\": \"truncated\"") && strstr(rep, "\"reason\": \"bad_answer\""));
    CHECK(rep && strstr(rep, "\"id\": \"img2\"") && strstr(rep, "\"number\": 3"));
    free(rep);
    /* what `caprl qa parse` writes is what the reward and the filter load */
    char path[4300];
    snprintf(path, sizeof path, "%s/qa.jsonl", g_dir);
    caprl_qa_set s;
    caprl_error  e = {0};
    CHECK_OK(caprl_qa_set_load(&s, path, false, &e), &e);
    CHECK(s.n_images == 3 && caprl_qa_set_n_questions(&s) == 4);
    if (s.n_images == 3) {
        CHECK_STR_EQ(s.images[2].id, "imgs/4.png");
        CHECK_STR_EQ(s.images[2].qa[0].question, "T?\n   - A) x\n   - B) y");
        CHECK(s.images[2].qa[0].gold == 'B');
    }
    caprl_qa_set_free(&s);
    /* written into another folder, the relative image paths become absolute (the raw file's folder + the path), so
     * that the QA loaders, which resolve against the QA file's folder, still find the images */
    snprintf(cmd, sizeof cmd, "mkdir -p '%s/elsewhere' && '%s' qa parse '%s/raw.jsonl' --out '%s/elsewhere/qa.jsonl'",
             g_dir, CAPRL_CLI, g_dir, g_dir);
    CHECK(run(cmd, NULL, 0) == 0);
    qa = read_text("elsewhere/qa.jsonl");
    char want[4400];
    snprintf(want, sizeof want, "\"image\": \"%s/imgs/1.png\"", g_dir);
    CHECK_MSG(qa && strstr(qa, want) != NULL, "%s lacks %s", qa ? qa : "(none)", want);
    free(qa);

    /* --append-cannot-answer and --max-options reach the parser */
    snprintf(cmd, sizeof cmd, "qa parse '%s/raw.jsonl' -o '%s/qa2.jsonl' --append-cannot-answer --max-options 2", g_dir,
             g_dir);
    CHECK(run_cli(cmd, NULL, 0) == 0);
    read_stderr(err, sizeof err);
    CHECK_MSG(strstr(err, "too_many_options 1") != NULL, "%s", err);
    qa = read_text("qa2.jsonl");
    /* the two-option questions end with the released E line too */
    CHECK_MSG(qa && strstr(qa, "\\n   - B) ") && strstr(qa, "\\n   - E) Can not answer based on the caption"), "%s", qa);
    free(qa);

    /* a malformed raw record fails with its line, and the output is not written; --skip-bad skips it */
    write_file("raw_bad.jsonl", "{\"image\": \"a.png\", \"response\": \"\"}\n{\"image\": 5, \"response\": \"x\"}\n");
    snprintf(cmd, sizeof cmd, "qa parse '%s/raw_bad.jsonl' --out '%s/qa3.jsonl'", g_dir, g_dir);
    CHECK(run_cli(cmd, NULL, 0) == 2);
    read_stderr(err, sizeof err);
    CHECK_MSG(strstr(err, "raw_bad.jsonl:2: no string \"image\"") != NULL, "%s", err);
    char *none = read_text("qa3.jsonl");
    CHECK(none == NULL);
    free(none);
    snprintf(cmd, sizeof cmd, "qa parse '%s/raw_bad.jsonl' --out '%s/qa3.jsonl' --skip-bad", g_dir, g_dir);
    CHECK(run_cli(cmd, NULL, 0) == 0);
    read_stderr(err, sizeof err);
    CHECK_MSG(strstr(err, "1 malformed records skipped") != NULL, "%s", err);
    char *empty = read_text("qa3.jsonl");
    CHECK(empty && empty[0] == '\0'); /* no question anywhere: an empty file */
    free(empty);

    /* usage */
    CHECK(run_cli("qa parse", NULL, 0) == 1);
    snprintf(cmd, sizeof cmd, "qa parse '%s/raw.jsonl'", g_dir);
    CHECK(run_cli(cmd, NULL, 0) == 1);
    CHECK(run_cli("qa parse --max-options 9 x --out y", NULL, 0) == 1);
    CHECK(run_cli("qa bogus", NULL, 0) == 1);
    CHECK(run_cli("qa", NULL, 0) == 1);
    char out[4096];
    CHECK(run_cli("qa --help", out, sizeof out) == 0 && strstr(out, "parse") != NULL);
    CHECK(run_cli("qa parse --help", out, sizeof out) == 0 && strstr(out, "--report") != NULL);
    CHECK(run_cli("help qa", out, sizeof out) == 0 && strstr(out, "stages:") != NULL);
    snprintf(cmd, sizeof cmd, "qa parse '%s/missing.jsonl' --out '%s/x.jsonl'", g_dir, g_dir);
    CHECK(run_cli(cmd, NULL, 0) == 2);
}

static void test_eval_score(void) {
    write_file("preds.jsonl",
               "{\"id\": 1, \"prediction\": \"<think>x</think><answer>\\\\boxed{B}</answer>\", \"answer\": \"B\", "
               "\"type\": \"mmstar\"}\n"
               "{\"id\": 2, \"prediction\": \"<think>x</think><answer>\\\\boxed{105}</answer>\", \"answer\": 100, "
               "\"type\": \"chart\"}\n"
               "{\"id\": 3, \"prediction\": \"<think>x</think><answer>\\\\boxed{abxy}</answer>\", \"answer\": \"abcd\", "
               "\"type\": \"infovqa\"}\n"
               "{\"id\": 4, \"prediction\": \"no box\", \"answer\": \"A\"}\n"
               "\n"
               "{\"id\": 5, \"prediction\": \"</think><answer>\\\\boxed{blue}</answer>\", \"answer\": [\"red\", \"blue\"], "
               "\"type\": \"ChartQA\"}\n");
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "eval score --in '%s/preds.jsonl' --out '%s/scores.jsonl'", g_dir, g_dir);
    CHECK(run_cli(cmd, NULL, 0) == 0);
    char err[8192];
    read_stderr(err, sizeof err);
    CHECK_MSG(strstr(err, "math  2 records, mean score 0.5000") != NULL, "%s", err);
    CHECK_MSG(strstr(err, "chart 2 records, mean score 1.0000") != NULL, "%s", err);
    CHECK_MSG(strstr(err, "info  1 records, mean score 0.5000") != NULL, "%s", err);
    CHECK_MSG(strstr(err, "all   5 records, mean score 0.7000; 1 without a boxed answer") != NULL, "%s", err);
    char *s = read_text("scores.jsonl");
    CHECK(count_lines(s) == 5);
    CHECK(s && strstr(s, "{\"id\": 1, \"prediction\": \"<think>x</think><answer>\\\\boxed{B}</answer>\", \"answer\": "
                         "\"B\", \"type\": \"mmstar\", \"score\": 1.0}") != NULL);
    CHECK(s && strstr(s, "\"id\": 3") && strstr(s, "\"score\": 0.5}"));
    CHECK(s && strstr(s, "\"id\": 4, \"prediction\": \"no box\", \"answer\": \"A\", \"score\": 0.0}"));
    free(s);

    /* --details and --type */
    snprintf(cmd, sizeof cmd, "eval score -i '%s/preds.jsonl' -o '%s/scores2.jsonl' --details --type info", g_dir,
             g_dir);
    CHECK(run_cli(cmd, NULL, 0) == 0);
    s = read_text("scores2.jsonl");
    CHECK(s && strstr(s, "\"rule\": \"math\", \"boxed\": \"B\", \"math\": 1.0, \"chart\": null, \"gold_unparsed\": "
                         "false") != NULL);
    CHECK(s && strstr(s, "\"id\": 4, \"prediction\": \"no box\", \"answer\": \"A\", \"score\": 0.0, \"rule\": "
                         "\"info\", \"boxed\": null") != NULL);
    free(s);

    /* a bad record: exit 2 with its line; nothing written */
    write_file("bad.jsonl", "{\"prediction\": \"x\", \"answer\": \"A\"}\n{\"answer\": \"A\"}\n");
    snprintf(cmd, sizeof cmd, "eval score --in '%s/bad.jsonl' --out '%s/scores3.jsonl'", g_dir, g_dir);
    CHECK(run_cli(cmd, NULL, 0) == 2);
    read_stderr(err, sizeof err);
    CHECK_MSG(strstr(err, "bad.jsonl:2: no string \"prediction\"") != NULL, "%s", err);
    char *none = read_text("scores3.jsonl");
    CHECK(none == NULL);
    free(none);
    CHECK(run_cli("eval score --in x", NULL, 0) == 1);
    CHECK(run_cli("eval", NULL, 0) == 1);
    CHECK(run_cli("eval nothing", NULL, 0) == 1);
    char out[4096];
    CHECK(run_cli("eval --help", out, sizeof out) == 0 && strstr(out, "score") != NULL);
}

int main(void) {
    char *dir = test_tmpdir("test_qa_eval_cli");
    snprintf(g_dir, sizeof g_dir, "%s", dir);
    free(dir);
    test_qa_parse();
    test_eval_score();
    return test_finish("test_qa_eval_cli");
}
