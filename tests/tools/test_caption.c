/* caprl caption end to end on a tiny random Qwen2.5-VL checkpoint: a folder of PNG/JPEG/WebP files plus a corrupt
 * one; every image exactly once with n captions, the corrupt one as an error record; a real kill -9 mid-run plus a
 * torn line, then the rerun gives the uninterrupted run's records exactly; --batch 3 and --shard 0/2 + 1/2 give
 * them too; text and JSONL lists (relative paths, extra fields); bad lists and foreign outputs are refused without
 * touching anything; the non-terminal progress line. */
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <sys/stat.h>

#include "caprl_test.h"
#include "image_records.h"
#include "proc_util.h"

#define N_SAMPLES 2
#define MAX_NEW   24
/* the sampling settings of every run; captions are compared across runs, so they must match */
#define GEN_ARGS "-n 2 --max-new-tokens 24 --temperature 1 --seed 11 --threads 1"

/* The folder's images in the order caprl lists them (sorted names); notes.txt must be ignored. */
static const char *const k_images[] = {"cmyk.jpg",         "corrupt.png", "gray16.png", "interlaced_rgb.png",
                                       "lossy_alpha.webp", "pal4.png",    "progressive.jpg", "rgba8.png"};
#define N_IMAGES ((int)(sizeof k_images / sizeof k_images[0]))

/* The output of the reference run: the images of k_images exactly, n captions each, the corrupt file an error. */
static void check_reference(const json_t *recs) {
    CHECK_EQ_I64(json_object_size(recs), N_IMAGES);
    for (int i = 0; i < N_IMAGES; i++) {
        const json_t *r = json_object_get(recs, k_images[i]);
        CHECK_MSG(r != NULL, "no record for %s", k_images[i]);
        if (!r) {
            continue;
        }
        const json_t *e = json_object_get(r, "error");
        if (strcmp(k_images[i], "corrupt.png") == 0) {
            CHECK_MSG(json_is_string(e) && strstr(json_string_value(e), "corrupt.png"),
                      "the corrupt file's record must be an error naming it");
            CHECK(json_object_get(r, "captions") == NULL);
            continue;
        }
        if (e && strstr(json_string_value(e), "without WebP")) {
            continue; /* a build configured with -DCAPRL_WEBP=OFF */
        }
        CHECK_MSG(e == NULL, "%s: %s", k_images[i], json_string_value(e));
        const json_t *caps = json_object_get(r, "captions"), *tok = json_object_get(r, "tokens"),
                     *fin = json_object_get(r, "finish");
        CHECK_MSG(json_array_size(caps) == N_SAMPLES && json_array_size(tok) == N_SAMPLES &&
                      json_array_size(fin) == N_SAMPLES,
                  "%s: captions/tokens/finish must have %d entries", k_images[i], N_SAMPLES);
        for (size_t k = 0; k < json_array_size(caps); k++) {
            const json_t *t = json_array_get(tok, k);
            const char   *f = json_string_value(json_array_get(fin, k));
            CHECK(json_is_string(json_array_get(caps, k)));
            CHECK_MSG(json_is_integer(t) && json_integer_value(t) >= 0 && json_integer_value(t) <= MAX_NEW,
                      "%s: token count", k_images[i]);
            CHECK_MSG(f && (strcmp(f, "eos") == 0 || strcmp(f, "length") == 0), "%s: finish %s", k_images[i],
                      f ? f : "(none)");
            /* "length" means the budget ran out */
            CHECK(strcmp(f ? f : "", "length") != 0 || json_integer_value(t) == MAX_NEW);
        }
    }
}

/* Every record of got equals the reference's record for the same image, field for field; returns how many were
 * compared. */
static size_t expect_same(const json_t *ref, json_t *got, const char *what) {
    const char *key;
    json_t     *rec;
    size_t      n = 0;
    json_object_foreach(got, key, rec) {
        const json_t *want = json_object_get(ref, key);
        CHECK_MSG(want != NULL, "%s: %s is not in the list", what, key);
        CHECK_MSG(want && json_equal(want, rec), "%s: %s differs from the uninterrupted --batch 1 run", what, key);
        n++;
    }
    return n;
}

static void expect_same_captions(const json_t *want, const json_t *got, const char *what) {
    static const char *const fields[] = {"captions", "tokens", "finish"};
    CHECK_MSG(want && got, "%s: missing record", what);
    for (size_t i = 0; want && got && i < 3; i++) {
        CHECK_MSG(json_equal(json_object_get(want, fields[i]), json_object_get(got, fields[i])),
                  "%s: %s differ from the directory run (same list position, same random stream)", what, fields[i]);
    }
}

/* A real kill -9 of a run once it has written two records, a torn partial record on top, then the same command
 * again: the result must be the uninterrupted run's, record for record. */
static void check_kill_and_resume(const char *base_cmd, const json_t *ref) {
    char out[2048], err_path[2048], cmd[16384];
    snprintf(out, sizeof out, "%s/killed.jsonl", g_dir);
    snprintf(err_path, sizeof err_path, "%s/killed.stderr", g_dir);
    snprintf(cmd, sizeof cmd, "%s --batch 1 --out %s", base_cmd, out);
    child c;
    if (!child_start(&c, cmd, err_path)) {
        return;
    }
    child_wait_lines(&c, out, 2, 300.0, 2e-3);
    CHECK_MSG(c.done || count_file_lines(out) >= 2, "the background run wrote fewer than 2 records in 300 s");
    if (!c.done) {
        /* while it runs, a second process on the same output must be refused (no image captioned twice) */
        int   rc = run(cmd, NULL, 0);
        char *msg = last_stderr();
        child_poll(&c);
        CHECK_MSG(rc == 2 ? strstr(msg, "another caprl caption") != NULL : c.done,
                  "a concurrent run on the same output exited %d: %s", rc, msg);
        free(msg);
    }
    bool finished = c.done || !child_kill(&c); /* it may have exited just before the signal */
    long written = count_file_lines(out);
    if (finished || written >= N_IMAGES) {
        fprintf(stderr, "test_caption: note: the run finished before the kill came (%ld records); checking the "
                        "resume anyway\n", written);
    } else {
        CHECK(WIFSIGNALED(c.status) && WTERMSIG(c.status) == SIGKILL);
        fprintf(stderr, "test_caption: killed after %ld of %d records\n", written, N_IMAGES);
    }
    /* a kill in the middle of a write leaves half a record without its newline */
    append_text(out, "{\"image\": \"rgba8.png\", \"captions\": [\"half a capt");
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    char *msg = last_stderr();
    CHECK_MSG(strstr(msg, "torn last record") != NULL, "the rerun did not report the torn line: %s", msg);
    free(msg);
    json_t *got = load_image_records(out);
    CHECK_EQ_I64(json_object_size(got), N_IMAGES);
    CHECK_EQ_I64(expect_same(ref, got, "kill + resume"), N_IMAGES);
    json_decref(got);
}

static void expect_fail(const char *cmdline, int code, const char *needle) {
    int   rc = run(cmdline, NULL, 0);
    char *msg = last_stderr();
    CHECK_MSG(rc == code, "'%s' exited %d, expected %d; stderr: %s", cmdline, rc, code, msg);
    CHECK_MSG(strstr(msg, needle) != NULL, "'%s': stderr lacks '%s': %s", cmdline, needle, msg);
    free(msg);
}

int main(void) {
    char *tmp = test_tmpdir("caption");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    char cmd[16384], path[2048], base[8192];

    snprintf(cmd, sizeof cmd,
             "%s init-model --preset tiny-vl --dtype f32 --seed 3 --out %s/m --tokenizer "
             "%s/data/qwen-tokenizer/tokenizer.json",
             CAPRL_CLI, tmp, CAPRL_SHARED_DIR);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    snprintf(cmd, sizeof cmd, "mkdir %s/imgs && echo 'not an image' > %s/imgs/notes.txt", tmp, tmp);
    CHECK(system(cmd) == 0);
    snprintf(path, sizeof path, "%s/imgs", tmp);
    copy_fixture_images(path, k_images, N_IMAGES);
    snprintf(base, sizeof base, "%s caption --model %s/m --images %s/imgs " GEN_ARGS, CAPRL_CLI, tmp, tmp);

    /* the uninterrupted reference run */
    snprintf(cmd, sizeof cmd, "%s --batch 1 --out %s/ref.jsonl", base, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    char *msg = last_stderr();
    /* stderr is a file here: plain periodic lines, no carriage-return bar */
    CHECK_MSG(strstr(msg, "caprl caption: 8/8 images") && strstr(msg, "img/s") && !strchr(msg, '\r'),
              "no plain progress line on stderr: %s", msg);
    free(msg);
    snprintf(path, sizeof path, "%s/ref.jsonl", tmp);
    json_t *ref = load_image_records(path);
    CHECK(ref != NULL);
    if (!ref) {
        return test_finish("test_caption");
    }
    check_reference(ref);
    /* the same command again has nothing left to do and leaves the file as it is */
    long ref_lines = count_file_lines(path);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    msg = last_stderr();
    CHECK_MSG(strstr(msg, "8 already in") && strstr(msg, "0 to caption"), "%s", msg);
    free(msg);
    CHECK_EQ_I64(count_file_lines(path), ref_lines);

    check_kill_and_resume(base, ref);

    /* batching does not change a single token */
    snprintf(cmd, sizeof cmd, "%s --batch 3 --out %s/b3.jsonl", base, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    snprintf(path, sizeof path, "%s/b3.jsonl", tmp);
    json_t *got = load_image_records(path);
    CHECK_EQ_I64(json_object_size(got), N_IMAGES);
    CHECK_EQ_I64(expect_same(ref, got, "--batch 3"), N_IMAGES);
    json_decref(got);

    /* two shards: disjoint, every image, the same records */
    json_t *shards[2];
    for (int s = 0; s < 2; s++) {
        snprintf(cmd, sizeof cmd, "%s --batch 2 --shard %d/2 --out %s/shard%d.jsonl", base, s, tmp, s);
        CHECK_EQ_I64(run(cmd, NULL, 0), 0);
        snprintf(path, sizeof path, "%s/shard%d.jsonl", tmp, s);
        shards[s] = load_image_records(path);
        CHECK_EQ_I64(json_object_size(shards[s]), N_IMAGES / 2);
        expect_same(ref, shards[s], s ? "--shard 1/2" : "--shard 0/2");
    }
    for (int i = 0; i < N_IMAGES; i++) {
        /* every k-th image: list position i goes to shard i % 2 */
        CHECK_MSG(json_object_get(shards[i % 2], k_images[i]) && !json_object_get(shards[1 - i % 2], k_images[i]),
                  "%s must be in shard %d only", k_images[i], i % 2);
    }
    json_decref(shards[0]);
    json_decref(shards[1]);

    /* a text list of paths relative to the list's folder (not the working directory); blank lines and CRLF are
     * fine; the first two images keep their list positions, hence their random streams and captions */
    snprintf(path, sizeof path, "%s/paths.txt", tmp);
    write_text(path, "imgs/cmyk.jpg\r\n\nimgs/corrupt.png\n");
    snprintf(cmd, sizeof cmd, "%s caption --model %s/m --images %s --out %s/paths.jsonl " GEN_ARGS, CAPRL_CLI, tmp,
             path, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    snprintf(path, sizeof path, "%s/paths.jsonl", tmp);
    got = load_image_records(path);
    CHECK_EQ_I64(json_object_size(got), 2);
    expect_same_captions(json_object_get(ref, "cmyk.jpg"), json_object_get(got, "imgs/cmyk.jpg"), "text list");
    const json_t *bad = json_object_get(got, "imgs/corrupt.png");
    const char   *bad_msg = bad ? json_string_value(json_object_get(bad, "error")) : NULL;
    CHECK_MSG(bad_msg && strstr(bad_msg, "corrupt.png"), "text list: no error record for imgs/corrupt.png");
    json_decref(got);

    /* JSON Lines: extra fields are carried to the output */
    snprintf(cmd, sizeof cmd, "mkdir -p %s/lists", tmp);
    CHECK(system(cmd) == 0);
    snprintf(path, sizeof path, "%s/lists/items.jsonl", tmp);
    write_text(path, "{\"image\": \"../imgs/cmyk.jpg\", \"id\": 7, \"meta\": {\"x\": 1}}\n"
                     "{\"id\": 8, \"image\": \"../imgs/corrupt.png\", \"tags\": [\"a\", \"b\"]}\n");
    snprintf(cmd, sizeof cmd, "%s caption --model %s/m --images %s --out %s/items.out.jsonl " GEN_ARGS, CAPRL_CLI,
             tmp, path, tmp);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    snprintf(path, sizeof path, "%s/items.out.jsonl", tmp);
    got = load_image_records(path);
    CHECK_EQ_I64(json_object_size(got), 2);
    const json_t *r0 = json_object_get(got, "../imgs/cmyk.jpg"), *r1 = json_object_get(got, "../imgs/corrupt.png");
    expect_same_captions(json_object_get(ref, "cmyk.jpg"), r0, "JSONL list");
    json_t *meta = json_pack("{s:i}", "x", 1), *tags = json_pack("[s,s]", "a", "b");
    CHECK_MSG(r0 && json_integer_value(json_object_get(r0, "id")) == 7 && json_equal(json_object_get(r0, "meta"), meta),
              "extra fields of line 1 not carried");
    CHECK_MSG(r1 && json_integer_value(json_object_get(r1, "id")) == 8 &&
                  json_equal(json_object_get(r1, "tags"), tags) && json_is_string(json_object_get(r1, "error")),
              "extra fields of line 2 not carried to its error record");
    json_decref(meta);
    json_decref(tags);
    json_decref(got);

    /* a JSONL line without "image" (line 3: blank lines count): exit 2 naming LIST:line, nothing written */
    snprintf(path, sizeof path, "%s/lists/bad.jsonl", tmp);
    write_text(path, "{\"image\": \"../imgs/cmyk.jpg\"}\n\n{\"id\": 1}\n");
    snprintf(cmd, sizeof cmd, "%s caption --model %s/m --images %s --out %s/bad.out.jsonl " GEN_ARGS, CAPRL_CLI, tmp,
             path, tmp);
    char needle[2100];
    snprintf(needle, sizeof needle, "%s:3:", path);
    expect_fail(cmd, 2, needle);
    struct stat st;
    snprintf(path, sizeof path, "%s/bad.out.jsonl", tmp);
    CHECK_MSG(stat(path, &st) != 0 && errno == ENOENT, "a refused list must not create the output");
    /* an image listed twice would be captioned twice */
    snprintf(path, sizeof path, "%s/dup.txt", tmp);
    write_text(path, "imgs/cmyk.jpg\nimgs/pal4.png\nimgs/cmyk.jpg\n");
    snprintf(cmd, sizeof cmd, "%s caption --model %s/m --images %s --out %s/dup.out.jsonl " GEN_ARGS, CAPRL_CLI, tmp,
             path, tmp);
    expect_fail(cmd, 2, "listed twice");

    /* an output with a bad line that is not the last one is not ours: refused, left byte for byte */
    size_t ref_len = 0;
    snprintf(path, sizeof path, "%s/ref.jsonl", tmp);
    char *ref_text = read_all(path, &ref_len);
    char *first_nl = ref_text ? strchr(ref_text, '\n') : NULL;
    CHECK(first_nl != NULL);
    if (first_nl) {
        snprintf(path, sizeof path, "%s/foreign.jsonl", tmp);
        FILE *f = fopen(path, "wb");
        CHECK(f != NULL);
        if (f) {
            fwrite(ref_text, 1, (size_t)(first_nl + 1 - ref_text), f);
            fputs("this is not JSON\n", f);
            fputs(first_nl + 1, f);
            fclose(f);
        }
        size_t before_len = 0, after_len = 0;
        char  *before = read_all(path, &before_len);
        snprintf(cmd, sizeof cmd, "%s --out %s", base, path);
        char line_needle[2100];
        snprintf(line_needle, sizeof line_needle, "%s:2:", path);
        expect_fail(cmd, 2, line_needle);
        char *after = read_all(path, &after_len);
        CHECK_MSG(before && after && before_len == after_len && memcmp(before, after, before_len) == 0,
                  "a refused output was modified");
        free(before);
        free(after);
    }
    free(ref_text);

    /* usage errors */
    snprintf(cmd, sizeof cmd, "%s --out %s/x.jsonl --shard 2/2", base, tmp);
    expect_fail(cmd, 1, "--shard");
    snprintf(cmd, sizeof cmd, "%s --out %s/x.jsonl --shard /2", base, tmp);
    expect_fail(cmd, 1, "--shard");
    snprintf(cmd, sizeof cmd, "%s --out %s/x.jsonl --prompt \"$(printf 'a\\377b')\"", base, tmp);
    expect_fail(cmd, 1, "--prompt");
    snprintf(cmd, sizeof cmd,
             "%s init-model --preset tiny --dtype f32 --out %s/text-only --tokenizer "
             "%s/data/qwen-tokenizer/tokenizer.json",
             CAPRL_CLI, tmp, CAPRL_SHARED_DIR);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    snprintf(cmd, sizeof cmd, "%s caption --model %s/text-only --images %s/imgs --out %s/x.jsonl", CAPRL_CLI, tmp,
             tmp, tmp);
    expect_fail(cmd, 2, "Qwen2.5-VL");
    snprintf(path, sizeof path, "%s/x.jsonl", tmp);
    CHECK_MSG(count_file_lines(path) == 0, "a refused run wrote records");
    snprintf(cmd, sizeof cmd, "%s caption --help", CAPRL_CLI);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);

    json_decref(ref);
    free(tmp);
    return test_finish("test_caption");
}
