/* A short GRPO run raises the CapRL reward, on small checkpoints this test builds itself with caprl, in a "colour
 * world" of sixteen solid-colour 112x112 images (four each of red, green, blue and yellow; 16 image tokens each,
 * enough for the policy to find the colour in a few steps):
 *   - a byte-level BPE tokenizer (caprl tokenizer train) on the world's text;
 *   - a reader: a 2-layer Qwen2 text model (width 64) that caprl sft teaches to answer "What colour is the image?"
 *     with the options in a fixed order (A red, B green, C blue, D yellow, E can not answer) from a caption:
 *     " A." for "It is red." and its variants, " E." for captions that name no colour (so that a broken caption
 *     scores 0 instead of whatever an untaught reader would say);
 *   - a captioner: a 2-layer Qwen2.5-VL model (width 64, one vision block) that caprl sft trains on
 *     "It is <colour>." with the colour unrelated to the image: every image gets each colour exactly once in four
 *     records (balanced rather than drawn, so no image leans to a colour), so the SFT captioner names the image's
 *     colour about a quarter of the time (reward ~0.25), whatever the image;
 *   - caprl train (expected-mode reward, options not shuffled so that they keep their order, constant lr 2e-3,
 *     fixed seed) for STEPS steps of 16 images x 8 captions.
 * Asserted: the first WINDOW steps' mean reward is low (the captioner is blind to the colour), and the mean reward of
 * the last WINDOW steps exceeds it by more than four standard errors (each step's reward_std over its 128 captions
 * gives the standard error of that step's mean) and by at least MIN_RISE. (Seed 0 goes from 0.21 to 0.86; train seeds
 * 0-9 rose by 0.34 to 0.71; with --lr 0 the reward stays near 0.25 and the test fails.) Everything is seeded;
 * caprl's results do not depend on the thread count, and one thread is the fastest on a busy 2-core machine.
 * Label "demo": Release builds only (`make test`), not the sanitizer run; about 30 s of CPU time. */
#include <jansson.h>
#include <sys/stat.h>
#include <time.h>

#include "caprl_test.h"
#include "cli_util.h"
#include "core/error_impl.h"
#include "image/png_write_impl.h"

#define STEPS 20
#define WINDOW 3
#define CAPTIONS (16 * 8)
#define MIN_RISE 0.2
#define N_IMAGES 16
#define SIZE 112

static const char *const k_colours[4] = {"red", "green", "blue", "yellow"};
static const uint8_t     k_rgb[4][3] = {{220, 30, 30}, {30, 180, 40}, {30, 50, 220}, {230, 220, 30}};
static const char        k_question[] = "What colour is the image?\n   - A) red\n   - B) green\n   - C) blue\n"
                                        "   - D) yellow\n   - E) Can not answer based on the caption";
/* a short reader prompt; caprl train gets it with --reader-template */
static const char k_template[] = "<|im_start|>user\nCaption: {}\nQuestion: {}<|im_end|>\n<|im_start|>assistant\n"
                                 "The answer is";

static FILE *open_in_dir(const char *name) {
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "w");
    CHECK_MSG(f != NULL, "cannot write %s", path);
    return f;
}

/* One JSON value as a compact line of f (consumes v). */
static void put_json(FILE *f, json_t *v) {
    char *s = json_dumps(v, JSON_COMPACT | JSON_PRESERVE_ORDER);
    fprintf(f, "%s\n", s);
    free(s);
    json_decref(v);
}

/* The reader prompt for a caption: the template with its two {} filled. */
static char *reader_prompt(const char *caption) {
    const char *a = strstr(k_template, "{}"), *b = strstr(a + 2, "{}");
    size_t      n = strlen(k_template) + strlen(caption) + strlen(k_question) + 1;
    char       *p = malloc(n);
    snprintf(p, n, "%.*s%s%.*s%s%s", (int)(a - k_template), k_template, caption, (int)(b - a - 2), a + 2, k_question,
             b + 2);
    return p;
}

static bool write_world(void) {
    caprl_error err = {0};
    uint8_t    *px = malloc((size_t)SIZE * SIZE * 3);
    char        path[4400];
    snprintf(path, sizeof path, "%s/img", g_dir);
    mkdir(path, 0755);
    for (int i = 0; i < N_IMAGES; i++) {
        for (int p = 0; p < SIZE * SIZE; p++) {
            memcpy(px + 3 * p, k_rgb[i % 4], 3);
        }
        uint8_t *png = NULL;
        size_t   n = 0;
        CHECK_OK(caprl_png_encode_rgb8(px, SIZE, SIZE, 6, &png, &n, &err), &err);
        snprintf(path, sizeof path, "%s/img/%02d.png", g_dir, i);
        FILE *f = fopen(path, "wb");
        CHECK_MSG(f && png && fwrite(png, 1, n, f) == n, "cannot write %s", path);
        if (f) {
            fclose(f);
        }
        free(png);
    }
    free(px);

    FILE *tmpl = open_in_dir("reader_template.txt"), *qa = open_in_dir("qa.jsonl"), *cap = open_in_dir("cap.jsonl"),
         *rd = open_in_dir("reader.jsonl"), *corpus = open_in_dir("corpus.txt");
    if (!tmpl || !qa || !cap || !rd || !corpus) {
        return false;
    }
    fputs(k_template, tmpl);
    char image[32], id[32], text[64];
    for (int i = 0; i < N_IMAGES; i++) {
        snprintf(image, sizeof image, "img/%02d.png", i);
        snprintf(id, sizeof id, "img%02d", i);
        char gold[2] = {(char)('A' + i % 4), '\0'};
        put_json(qa, json_pack("{s:s, s:s, s:[{s:s, s:s}]}", "id", id, "image", image, "qa", "question", k_question,
                               "answer", gold));
    }
    /* the captioner's SFT records: image i gets colour (i / 4 + k) % 4 in its k-th record, so each image (and each
     * image colour) sees every caption colour exactly once per four records */
    for (int k = 0; k < 4; k++) {
        for (int i = 0; i < N_IMAGES; i++) {
            snprintf(image, sizeof image, "img/%02d.png", i);
            snprintf(text, sizeof text, "It is %s.", k_colours[(i / 4 + k) % 4]);
            put_json(cap, json_pack("{s:s, s:[{s:s, s:s}, {s:s, s:s}]}", "image", image, "messages", "role", "user",
                                    "content", "Please describe this image in detail.", "role", "assistant",
                                    "content", text));
        }
    }
    /* the reader's records: a caption that names one colour -> its letter; one that names none -> E */
    static const struct {
        const char *before, *after; /* around the colour word (twice when twice) */
        bool        twice;
    } forms[] = {{"It is ", ".", false}, {"It is ", "", false}, {"", ".", false},
                 {"It ", ".", false},    {"is ", ".", false},   {"It is ", ".", true}};
    static const char *const blind[] = {"",        "It",    "It is",     "It is.",
                                        "It is is.", ".",   "is.",       "It.",
                                        "It is it.", "Please describe this image in detail.", "It is It is.", "is"};
    for (int c = 0; c < 4; c++) {
        for (size_t f = 0; f < sizeof forms / sizeof forms[0]; f++) {
            snprintf(text, sizeof text, "%s%s%s%s%s", forms[f].before, k_colours[c], forms[f].twice ? " " : "",
                     forms[f].twice ? k_colours[c] : "", forms[f].after);
            char *prompt = reader_prompt(text), completion[8];
            snprintf(completion, sizeof completion, " %c.", 'A' + c);
            put_json(rd, json_pack("{s:s, s:s}", "prompt", prompt, "completion", completion));
            free(prompt);
        }
    }
    for (size_t g = 0; g < sizeof blind / sizeof blind[0]; g++) {
        char *prompt = reader_prompt(blind[g]);
        put_json(rd, json_pack("{s:s, s:s}", "prompt", prompt, "completion", " E."));
        free(prompt);
    }
    /* the tokenizer's corpus: every text above, and the letters often enough that " A" .. " I" are tokens */
    char *all = reader_prompt("It is red. It is green. It is blue. It is yellow.");
    for (int r = 0; r < 20; r++) {
        fprintf(corpus, "%s\nYou are a helpful assistant. Please describe this image in detail.\n", all);
    }
    for (int r = 0; r < 40; r++) {
        fputs(" A B C D E F G H I\n", corpus);
    }
    free(all);
    fclose(tmpl);
    fclose(qa);
    fclose(cap);
    fclose(rd);
    fclose(corpus);
    return g_test_failures == 0;
}

/* Runs one caprl command (arguments after the program name) and prints its wall time; on failure its stderr. */
static bool step(const char *what, const char *args) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int rc = run_cli(args, NULL, 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    fprintf(stderr, "test_grpo_learns: %s: %.1f s\n", what,
            (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    if (rc != 0) {
        char err[8192];
        read_stderr(err, sizeof err);
        fprintf(stderr, "%s\n", err);
    }
    CHECK_MSG(rc == 0, "%s: exit %d", what, rc);
    return rc == 0;
}

static int read_metrics(const char *path, double *mean, double *std) {
    FILE *f = fopen(path, "r");
    if (!f) {
        return 0;
    }
    char line[4096];
    int  n = 0;
    while (n < STEPS && fgets(line, sizeof line, f)) {
        const char *m = strstr(line, "\"reward_mean\": "), *s = strstr(line, "\"reward_std\": ");
        if (m && s) {
            mean[n] = strtod(m + 15, NULL);
            std[n] = strtod(s + 14, NULL);
            n++;
        }
    }
    fclose(f);
    return n;
}

int main(void) {
    char *tmp = test_tmpdir("grpo_learns");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    free(tmp);
    if (!write_world()) {
        return test_finish("test_grpo_learns");
    }
    const char *d = g_dir;
    char        cmd[16384];
    snprintf(cmd, sizeof cmd, "tokenizer train --corpus '%s/corpus.txt' --vocab-size 320 --out '%s/tok.json' --quiet",
             d, d);
    bool ok = step("tokenizer train", cmd);
    static const char text_shape[] =
        "--vocab-size -1 --hidden 64 --intermediate 128 --layers 2 --heads 4 --kv-heads 2 --dtype f32 --std 0.05";
    snprintf(cmd, sizeof cmd, "init-model --out '%s/reader0' --preset tiny --tokenizer '%s/tok.json' %s --seed 2", d, d,
             text_shape);
    ok = ok && step("init-model reader", cmd);
    snprintf(cmd, sizeof cmd,
             "sft --model '%s/reader0' --data '%s/reader.jsonl' --out '%s/reader-run' --lr 3e-3 --batch 12 "
             "--max-steps 100 --warmup 5 --save-every 0 --threads 1",
             d, d, d);
    ok = ok && step("sft reader", cmd);
    snprintf(cmd, sizeof cmd,
             "init-model --out '%s/captioner0' --preset tiny-vl --tokenizer '%s/tok.json' %s --vision-depth 1 "
             "--vision-hidden 32 --vision-heads 2 --vision-intermediate 64 --seed 3",
             d, d, text_shape);
    ok = ok && step("init-model captioner", cmd);
    snprintf(cmd, sizeof cmd,
             "sft --model '%s/captioner0' --data '%s/cap.jsonl' --out '%s/captioner-run' --lr 3e-3 --batch 16 "
             "--max-steps 200 --warmup 5 --save-every 0 --threads 1",
             d, d, d);
    ok = ok && step("sft captioner", cmd);
    snprintf(cmd, sizeof cmd,
             "train --policy '%s/captioner-run/step-200' --reader '%s/reader-run/step-100' --data '%s/qa.jsonl' "
             "--out '%s/run' --reader-template '%s/reader_template.txt' --reward-mode expected --no-shuffle "
             "--rollout-batch 16 --group-size 8 --max-new-tokens 8 --max-steps %d --episodes 40 --lr 2e-3 --warmup 0 "
             "--min-lr-ratio 1 --save-every %d --seed 0 --threads 1",
             d, d, d, d, d, STEPS, STEPS);
    ok = ok && step("train", cmd);
    if (!ok) {
        return test_finish("test_grpo_learns");
    }

    double mean[STEPS], std[STEPS];
    char   path[4400];
    snprintf(path, sizeof path, "%s/run/metrics.jsonl", g_dir);
    int n = read_metrics(path, mean, std);
    CHECK_EQ_I64(n, STEPS);
    if (n == STEPS) {
        double first = 0.0, last = 0.0, var_first = 0.0, var_last = 0.0;
        for (int i = 0; i < WINDOW; i++) {
            first += mean[i] / WINDOW;
            last += mean[STEPS - WINDOW + i] / WINDOW;
            var_first += std[i] * std[i] / CAPTIONS / (WINDOW * WINDOW);
            var_last += std[STEPS - WINDOW + i] * std[STEPS - WINDOW + i] / CAPTIONS / (WINDOW * WINDOW);
        }
        double se = sqrt(var_first + var_last);
        fprintf(stderr, "reward: first %d steps %.4f, last %d steps %.4f, rise %.4f = %.1f standard errors\n", WINDOW,
                first, WINDOW, last, last - first, (last - first) / se);
        CHECK_MSG(first < 0.4, "the SFT captioner already scores %.4f: it should be blind to the colour", first);
        CHECK_MSG(last - first > 4.0 * se, "reward rose %.4f, less than 4 standard errors (%.4f)", last - first,
                  4.0 * se);
        CHECK_MSG(last - first >= MIN_RISE, "reward rose %.4f, less than %.2f", last - first, MIN_RISE);
    }
    if (!g_test_failures) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
        CHECK(system(cmd) == 0);
    }
    return test_finish("test_grpo_learns");
}
