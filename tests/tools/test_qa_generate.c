/* caprl qa generate end to end on a tiny random Qwen2.5-VL checkpoint: the rendered prompt is the released one byte
 * for byte (system prompt length and SHA-256 from spec/caprl.md §7.2, user text after the image); a folder of images
 * plus a corrupt one gives one record per image with the fields `caprl qa parse` reads (and parse accepts them);
 * a real kill -9 mid-run plus a torn line, then the rerun (with --batch 3) gives the uninterrupted --batch 1 run's
 * records exactly; --shard 1/2 gives its half of them; relative image paths stay relative only when the output sits
 * beside the list. Every run loads the tokenizer (about a second), so the runs are few. */
#include <jansson.h>
#include <stdbool.h>
#include <sys/stat.h>

#include "caprl/reward.h"
#include "caprl_test.h"
#include "image_records.h"
#include "proc_util.h"

#define GEN_ARGS "--max-new-tokens 12 --temperature 1 --seed 5 --threads 1"

static const char *const k_images[] = {"baseline.jpg", "corrupt.png", "pal4.png", "progressive.jpg", "rgb8.png",
                                       "rgba8.png"};
#define N_IMAGES ((int)(sizeof k_images / sizeof k_images[0]))

/* spec/caprl.md §7.2: the QA-generation system prompt. */
#define SYSTEM_BYTES  722
#define SYSTEM_SHA256 "4e275e96ae0126609f8e7bfa1f03f56a2f015179ebd0c6c9d70dc598d1258fcf"

/* The record for list image `name` of the folder run (written with absolute paths: the output is elsewhere). */
static const json_t *record_for(const json_t *recs, const char *name) {
    char key[2048];
    snprintf(key, sizeof key, "%s/imgs/%s", g_dir, name);
    return json_object_get(recs, key);
}

static void check_prompt(void) {
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s qa generate --print-prompt > %s/prompt.txt", CAPRL_CLI, g_dir);
    CHECK(system(cmd) == 0);
    char path[2048];
    snprintf(path, sizeof path, "%s/prompt.txt", g_dir);
    size_t len = 0;
    char  *p = read_all(path, &len);
    CHECK(p != NULL);
    if (!p) {
        return;
    }
    static const char head[] = "<|im_start|>system\n";
    static const char tail[] = "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                               "Here is the image<|im_end|>\n<|im_start|>assistant\n";
    size_t nh = strlen(head), nt = strlen(tail);
    CHECK_MSG(len == nh + SYSTEM_BYTES + nt, "rendered prompt of %zu bytes, expected %zu", len,
              nh + SYSTEM_BYTES + nt);
    if (len == nh + SYSTEM_BYTES + nt) {
        CHECK(memcmp(p, head, nh) == 0);
        CHECK_MSG(memcmp(p + nh + SYSTEM_BYTES, tail, nt) == 0, "after the system prompt: %s", p + nh + SYSTEM_BYTES);
        char hex[65];
        caprl_sha256_hex(p + nh, SYSTEM_BYTES, hex);
        CHECK_STR_EQ(hex, SYSTEM_SHA256);
        /* the whitespace a careless edit loses, checked on its own for a readable failure */
        p[nh + SYSTEM_BYTES] = '\0';
        CHECK(strstr(p + nh, "\n**Answer:** D) Ours   \n------\n") != NULL);
        CHECK(strstr(p + nh, "\n**Answer:** B) Red \n------\n") != NULL);
        CHECK(strstr(p + nh, "All the quesiton should be answered based on the image.\n") != NULL);
    }
    free(p);
}

/* kill -9 after two records, a torn half line on top, then the same command with another batch size: the
 * reference's records exactly (batching changes no token). */
static void check_kill_and_resume(const char *base, const json_t *ref) {
    char out[2048], err_path[2048], cmd[16384];
    snprintf(out, sizeof out, "%s/killed.jsonl", g_dir);
    snprintf(err_path, sizeof err_path, "%s/killed.stderr", g_dir);
    snprintf(cmd, sizeof cmd, "%s --batch 1 --out %s", base, out);
    child c;
    if (!child_start(&c, cmd, err_path)) {
        return;
    }
    child_wait_lines(&c, out, 2, 300.0, 1e-3);
    bool finished = c.done || !child_kill(&c);
    long written = count_file_lines(out);
    if (finished || written >= N_IMAGES) {
        fprintf(stderr, "test_qa_generate: note: the run finished before the kill (%ld records)\n", written);
    } else {
        CHECK(WIFSIGNALED(c.status) && WTERMSIG(c.status) == SIGKILL);
        fprintf(stderr, "test_qa_generate: killed after %ld of %d records\n", written, N_IMAGES);
    }
    append_text(out, "{\"id\": \"rgba8.png\", \"image\": \"rgba8.png\", \"response\": \"#### 1. **Half");
    snprintf(cmd, sizeof cmd, "%s --batch 3 --out %s", base, out);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    char *msg = last_stderr();
    CHECK_MSG(strstr(msg, "torn last record") != NULL, "the rerun did not report the torn line: %s", msg);
    free(msg);
    json_t *got = load_image_records(out);
    CHECK_MSG(got && json_equal(got, ref), "kill + resume differs from the uninterrupted run");
    json_decref(got);
}

int main(void) {
    char *tmp = test_tmpdir("qa_generate");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    char cmd[16384], path[2048], base[8192];

    check_prompt();

    snprintf(cmd, sizeof cmd,
             "%s init-model --preset tiny-vl --seed 7 --out %s/vl --tokenizer %s/data/qwen-tokenizer/tokenizer.json",
             CAPRL_CLI, tmp, CAPRL_SHARED_DIR);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    snprintf(cmd, sizeof cmd, "mkdir %s/imgs %s/out", tmp, tmp);
    CHECK(system(cmd) == 0);
    snprintf(path, sizeof path, "%s/imgs", tmp);
    copy_fixture_images(path, k_images, N_IMAGES);
    snprintf(base, sizeof base, "%s qa generate --vlm %s/vl --images %s/imgs " GEN_ARGS, CAPRL_CLI, tmp, tmp);

    /* the reference run: the output lives elsewhere, so image paths are absolute */
    snprintf(cmd, sizeof cmd, "%s --batch 1 --out %s/out/ref.jsonl", base, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    snprintf(path, sizeof path, "%s/out/ref.jsonl", tmp);
    json_t *ref = load_image_records(path);
    CHECK(ref != NULL);
    if (!ref) {
        return test_finish("test_qa_generate");
    }
    CHECK_EQ_I64(json_object_size(ref), N_IMAGES);
    for (int i = 0; i < N_IMAGES; i++) {
        const json_t *r = record_for(ref, k_images[i]);
        CHECK_MSG(r != NULL, "no record for %s", k_images[i]);
        if (!r) {
            continue;
        }
        CHECK_STR_EQ(json_string_value(json_object_get(r, "id")), k_images[i]);
        if (strcmp(k_images[i], "corrupt.png") == 0) {
            const char *e = json_string_value(json_object_get(r, "error"));
            CHECK_MSG(e && strstr(e, "corrupt.png") && !json_object_get(r, "response"),
                      "the corrupt file must give an error record naming it");
            continue;
        }
        const json_t *resp = json_object_get(r, "response"), *tok = json_object_get(r, "tokens");
        const char   *fin = json_string_value(json_object_get(r, "finish"));
        CHECK_MSG(json_is_string(resp) && json_is_integer(tok) && fin, "%s: fields", k_images[i]);
        CHECK(json_integer_value(tok) >= 0 && json_integer_value(tok) <= 12);
        CHECK(fin && (strcmp(fin, "eos") == 0 || (strcmp(fin, "length") == 0 && json_integer_value(tok) == 12)));
    }
    /* the same command again has nothing to do */
    long lines = count_file_lines(path);
    snprintf(cmd, sizeof cmd, "%s --batch 1 --out %s/out/ref.jsonl", base, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    char *msg = last_stderr();
    CHECK_MSG(strstr(msg, "6 already in") && strstr(msg, "0 to do"), "%s", msg);
    free(msg);
    CHECK_EQ_I64(count_file_lines(path), lines);

    /* `caprl qa parse` reads the records (the corrupt image's error record is a bad record for it) */
    snprintf(cmd, sizeof cmd, "%s qa parse %s --out %s/out/qa.jsonl --skip-bad", CAPRL_CLI, path, tmp);
    int prc = run(cmd, NULL, 0);
    msg = last_stderr();
    CHECK_MSG(prc == 0 && strstr(msg, "5 responses"), "qa parse on the output exited %d: %s", prc, msg);
    free(msg);

    check_kill_and_resume(base, ref);

    /* shard 1/2: list positions 1, 3, 5, each with the reference's record */
    snprintf(cmd, sizeof cmd, "%s --batch 2 --shard 1/2 --out %s/out/shard1.jsonl", base, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    snprintf(path, sizeof path, "%s/out/shard1.jsonl", tmp);
    json_t *got = load_image_records(path);
    CHECK_EQ_I64(json_object_size(got), N_IMAGES / 2);
    for (int i = 1; i < N_IMAGES; i += 2) {
        const json_t *g = record_for(got, k_images[i]);
        CHECK_MSG(g && json_equal(g, record_for(ref, k_images[i])), "%s: shard 1/2 differs from the full run",
                  k_images[i]);
    }
    json_decref(got);

    /* a list in a folder of its own with the output beside it: paths stay as written; the list's extra fields
     * (its own "id") are carried */
    snprintf(cmd, sizeof cmd, "mkdir -p %s/lst && cp %s/imgs/pal4.png %s/lst/", tmp, tmp, tmp);
    CHECK(system(cmd) == 0);
    snprintf(path, sizeof path, "%s/lst/list.jsonl", tmp);
    write_text(path, "{\"image\": \"pal4.png\", \"id\": \"p-4\", \"source\": \"web\"}\n");
    snprintf(cmd, sizeof cmd, "%s qa generate --vlm %s/vl --images %s --out %s/lst/raw.jsonl " GEN_ARGS, CAPRL_CLI,
             tmp, path, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    snprintf(path, sizeof path, "%s/lst/raw.jsonl", tmp);
    got = load_image_records(path);
    const json_t *r = json_object_get(got, "pal4.png");
    CHECK_MSG(r && strcmp(json_string_value(json_object_get(r, "id")), "p-4") == 0 &&
                  strcmp(json_string_value(json_object_get(r, "source")), "web") == 0,
              "a record beside its list keeps the relative path and the list's fields");
    json_decref(got);

    json_decref(ref);
    int rc = test_finish("test_qa_generate");
    if (rc == 0) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        CHECK(system(cmd) == 0);
    }
    free(tmp);
    return rc;
}
