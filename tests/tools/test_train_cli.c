/* caprl train end to end on a tiny Qwen2.5-VL policy and a tiny text reader over a small BPE tokenizer trained here
 * (checkpoints of a few hundred KB, so the many runs take a few seconds), with four synthetic images:
 *   - a 3-step run: metrics.jsonl has one line per step with every key docs/train.md documents (and no other),
 *     samples.jsonl, RUN/config.json with the resolved settings (every documented setting, and no other) that is
 *     accepted back as --config and reproduces the run, step-N/ checkpoints that caprl generate loads;
 *   - flags override --config values wherever --config appears; unknown settings and bad values (flag or config
 *     key) exit 1 naming the setting; a used RUN without --resume is refused, a complete one with it left alone;
 *   - --resume refuses changed settings (lr, group_size, seed, whiten), another data file and another reader
 *     (same config, other weights) with exit 1 and one line naming the setting with its recorded and new values,
 *     and leaves RUN byte for byte as it was; other threads, checkpoint and sample periods, a larger max_steps and
 *     a byte-identical copy of the data under another name are accepted, and the run ends as the uninterrupted one;
 *   - bit-exact resume: SIGKILLs during start-up, during checkpoint writes and at pseudo-random moments after a
 *     step's metrics line, each followed by --resume, end with the uninterrupted run's step-4/ weights and
 *     optimizer state, samples.jsonl and metrics.jsonl byte for byte (bar the seconds_* wall times), with
 *     --save-total-limit pruning and no checkpoint temporaries left;
 *   - 1 and 2 threads give the same weights, metrics and samples. */
#include <dirent.h>
#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "caprl_test.h"
#include "proc_util.h"

static char g_policy[4200], g_reader[4200], g_data[4200];

/* ---- helpers ------------------------------------------------------------------------------------------------- */

/* Runs `caprl train` with the given arguments; returns the exit status, stderr in err. */
static int train(const char *args, char *err, size_t cap) {
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "train %s", args);
    int rc = run_cli(cmd, NULL, 0);
    read_stderr(err, cap);
    return rc;
}

/* The settings of the runs compared here (the brief's run, with the step count and threads left to each). */
#define SETTINGS "--rollout-batch 2 --group-size 4 --max-new-tokens 8 --reward-mode expected --save-every 1 --lr 1e-3"

static void base_args(char *buf, size_t cap, const char *run_dir, const char *extra) {
    snprintf(buf, cap, "--policy '%s' --reader '%s' --data '%s' --out '%s' " SETTINGS " %s", g_policy, g_reader,
             g_data, run_dir, extra);
}

/* The first-column names of a table of docs/train.md: the `backticked` words of every "| `...` |" row after the
 * heading `section`, up to the next heading. Returns a JSON array of strings. */
static json_t *doc_table_names(const char *section) {
    char path[4200];
    snprintf(path, sizeof path, "%s/docs/train.md", CAPRL_SOURCE_DIR);
    char   *doc = read_all(path, NULL);
    json_t *names = json_array();
    char   *p = doc ? strstr(doc, section) : NULL;
    CHECK_MSG(p != NULL, "docs/train.md has no section '%s'", section);
    for (p = p ? strchr(p, '\n') : NULL; p && p[1] && p[1] != '#'; p = strchr(p + 1, '\n')) {
        if (strncmp(p + 1, "| `", 3) != 0) {
            continue;
        }
        char *end = strchr(p + 2, '|'); /* end of the first cell */
        for (char *q = p + 2; end && (q = strchr(q, '`')) && q < end;) {
            char *close = strchr(q + 1, '`');
            json_array_append_new(names, json_stringn(q + 1, (size_t)(close - q - 1)));
            q = close + 1;
        }
    }
    free(doc);
    return names;
}

/* RUN/metrics.jsonl as an array of objects; every line complete JSON. */
static json_t *load_lines(const char *run_dir, const char *name) {
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", run_dir, name);
    size_t  len = 0;
    char   *data = read_all(path, &len);
    json_t *arr = json_array();
    CHECK_MSG(data != NULL, "%s missing", path);
    for (char *line = data; data && line < data + len;) {
        char *nl = strchr(line, '\n');
        CHECK_MSG(nl != NULL, "%s: the last line is torn", path);
        if (!nl) {
            break;
        }
        json_error_t jerr;
        json_t      *rec = json_loadb(line, (size_t)(nl - line), 0, &jerr);
        CHECK_MSG(json_is_object(rec), "%s: bad line: %s", path, jerr.text);
        if (rec) {
            json_array_append_new(arr, rec);
        }
        line = nl + 1;
    }
    free(data);
    return arr;
}

/* metrics.jsonl without the "seconds_*" members: wall times are the only values a run cannot repeat. */
static char *metrics_without_seconds(const char *run_dir) {
    char path[4400];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    char *s = read_all(path, NULL);
    for (char *p; s && (p = strstr(s, "\"seconds_")) != NULL;) {
        char *e = p + strcspn(p, ",}"); /* the values are numbers: no comma or brace inside */
        if (*e == ',') {
            e += 1 + strspn(e + 1, " ");
        } else if (p > s + 2 && p[-2] == ',') {
            p -= 2; /* the last member: drop the comma before it */
        }
        memmove(p, e, strlen(e) + 1);
    }
    return s;
}

/* run_dir ends as ref_dir did: step-N/ weights and optimizer state, samples.jsonl and metrics.jsonl (bar the
 * wall times) byte for byte. */
static void check_same_run(const char *ref_dir, const char *run_dir, int steps, const char *what) {
    char a[4400], b[4400];
    static const char *const files[] = {"model.safetensors", "training_state.safetensors", "training_state.json"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(a, sizeof a, "%s/step-%d/%s", ref_dir, steps, files[i]);
        snprintf(b, sizeof b, "%s/step-%d/%s", run_dir, steps, files[i]);
        CHECK_MSG(same_file(a, b), "%s: step-%d/%s differs from the reference run's", what, steps, files[i]);
    }
    snprintf(a, sizeof a, "%s/samples.jsonl", ref_dir);
    snprintf(b, sizeof b, "%s/samples.jsonl", run_dir);
    CHECK_MSG(same_file(a, b), "%s: samples.jsonl differs from the reference run's", what);
    char *m1 = metrics_without_seconds(ref_dir), *m2 = metrics_without_seconds(run_dir);
    CHECK_MSG(m1 && m2 && strcmp(m1, m2) == 0, "%s: metrics.jsonl differs from the reference run's:\n%s\nvs\n%s", what,
              m1 ? m1 : "(none)", m2 ? m2 : "(none)");
    free(m1);
    free(m2);
}

/* ---- fixtures ------------------------------------------------------------------------------------------------ */

/* Four synthetic 84x84 scenes with their questions, a BPE tokenizer trained on the world's text (every option
 * letter " A" .. " I" a token of its own, as the reader needs), a Qwen2.5-VL policy and a Qwen2 reader of width 32. */
static bool make_fixtures(void) {
    char cmd[16384], err[8192];
    snprintf(cmd, sizeof cmd, "synth --out '%s/syn' --train 4 --test 1 --qa-per-image 3 --threads 1", g_dir);
    int rc = run_cli(cmd, NULL, 0);
    read_stderr(err, sizeof err);
    CHECK_MSG(rc == 0, "synth: %d: %s", rc, err);
    snprintf(cmd, sizeof cmd,
             "cat '%s/syn/corpus.txt' > '%s/corpus.txt' && for i in 1 2 3 4; do echo ' A B C D E F G H I'; done"
             " >> '%s/corpus.txt'", g_dir, g_dir, g_dir);
    CHECK(run(cmd, NULL, 0) == 0);
    snprintf(cmd, sizeof cmd, "tokenizer train --corpus '%s/corpus.txt' --vocab-size 1000 --out '%s/tok.json' --quiet",
             g_dir, g_dir);
    rc = run_cli(cmd, NULL, 0);
    read_stderr(err, sizeof err);
    CHECK_MSG(rc == 0, "tokenizer train: %d: %s", rc, err);
    snprintf(g_policy, sizeof g_policy, "%s/policy", g_dir);
    snprintf(g_reader, sizeof g_reader, "%s/reader", g_dir);
    snprintf(g_data, sizeof g_data, "%s/syn/train.jsonl", g_dir);
    static const char shape[] = "--vocab-size -1 --hidden 32 --heads 2 --kv-heads 1 --intermediate 64 --dtype f32";
    snprintf(cmd, sizeof cmd,
             "init-model --out '%s' --preset tiny-vl --tokenizer '%s/tok.json' %s --vision-hidden 16 --vision-heads 2 "
             "--vision-intermediate 32 --seed 1",
             g_policy, g_dir, shape);
    rc = run_cli(cmd, NULL, 0);
    read_stderr(err, sizeof err);
    CHECK_MSG(rc == 0, "init-model policy: %d: %s", rc, err);
    snprintf(cmd, sizeof cmd, "init-model --out '%s' --preset tiny --tokenizer '%s/tok.json' %s --seed 2", g_reader,
             g_dir, shape);
    rc = run_cli(cmd, NULL, 0);
    read_stderr(err, sizeof err);
    CHECK_MSG(rc == 0, "init-model reader: %d: %s", rc, err);
    return g_test_failures == 0;
}

/* ---- tests --------------------------------------------------------------------------------------------------- */

/* The brief's run: 3 steps, a checkpoint after each. */
static void test_run(void) {
    char args[16384], err[8192], run_dir[4200], p[4400];
    snprintf(run_dir, sizeof run_dir, "%s/run3", g_dir);
    base_args(args, sizeof args, run_dir, "--max-steps 3 --threads 1");
    double t0 = now_s();
    int    rc = train(args, err, sizeof err);
    fprintf(stderr, "test_train_cli: 3-step run: %.2f s\n", now_s() - t0);
    CHECK_MSG(rc == 0, "caprl train exited %d: %s", rc, err);

    /* metrics: one line per step, exactly the documented keys */
    json_t *keys = doc_table_names("## `RUN/metrics.jsonl`");
    CHECK_MSG(json_array_size(keys) >= 19, "docs/train.md documents %zu metrics", json_array_size(keys));
    json_t *m = load_lines(run_dir, "metrics.jsonl");
    CHECK_EQ_I64(json_array_size(m), 3);
    /* With these seeds a caption of step 1 samples <|image_pad|>: it must end there (shorter than 8 tokens, counted
     * as truncated) rather than reach the update, which reads every <|image_pad|> as an image feature slot. */
    CHECK_MSG(json_number_value(json_object_get(json_array_get(m, 0), "caption_len_mean")) < 8 &&
                  json_number_value(json_object_get(json_array_get(m, 0), "truncated_frac")) == 1,
              "step 1 was expected to cut a caption at a sampled <|image_pad|>");
    for (size_t i = 0; i < json_array_size(m); i++) {
        json_t *line = json_array_get(m, i);
        for (size_t k = 0; k < json_array_size(keys); k++) {
            const char *key = json_string_value(json_array_get(keys, k));
            CHECK_MSG(json_object_get(line, key) != NULL, "metrics line %zu lacks '%s'", i + 1, key);
        }
        CHECK_MSG(json_object_size(line) == json_array_size(keys), "metrics line %zu has %zu keys, %zu documented",
                  i + 1, json_object_size(line), json_array_size(keys));
        CHECK_EQ_I64(json_integer_value(json_object_get(line, "step")), (int64_t)i + 1);
        double reward = json_number_value(json_object_get(line, "reward_mean"));
        CHECK_MSG(reward >= 0 && reward <= 1, "line %zu: reward_mean %g", i + 1, reward);
        CHECK(json_number_value(json_object_get(line, "caption_len_max")) <= 8);
        CHECK(json_number_value(json_object_get(line, "kl")) == 0); /* kl off */
        CHECK(json_number_value(json_object_get(line, "grad_norm")) > 0);
        CHECK(json_number_value(json_object_get(line, "reader_tokens")) > 0);
        CHECK(json_is_false(json_object_get(line, "skipped")));
        /* linear warmup over the default 20 steps, transformers' convention: lr i / 20 at step i + 1 */
        CHECK_NEAR(json_number_value(json_object_get(line, "lr")), 1e-3 * (double)i / 20.0, 1e-6, 1e-12);
    }
    json_decref(m);
    json_decref(keys);

    /* samples: the two images' four captions at step 1 (samples_every 10 also writes the first step) */
    json_t *s = load_lines(run_dir, "samples.jsonl");
    CHECK_EQ_I64(json_array_size(s), 8);
    static const char *const sample_keys[] = {"step", "id", "image", "sample", "reward", "tokens", "caption",
                                              "questions"};
    for (size_t i = 0; i < json_array_size(s); i++) {
        json_t *line = json_array_get(s, i);
        for (size_t k = 0; k < sizeof sample_keys / sizeof sample_keys[0]; k++) {
            CHECK_MSG(json_object_get(line, sample_keys[k]) != NULL, "samples line %zu lacks %s", i + 1,
                      sample_keys[k]);
        }
        CHECK_EQ_I64(json_integer_value(json_object_get(line, "sample")), (int64_t)(i % 4));
        CHECK_EQ_I64(json_array_size(json_object_get(line, "questions")), 8); /* n_questions */
    }
    json_decref(s);

    /* the resolved settings: every documented setting, the flags' values and the defaults */
    snprintf(p, sizeof p, "%s/config.json", run_dir);
    json_error_t jerr;
    json_t      *cfg = json_load_file(p, 0, &jerr);
    CHECK_MSG(json_is_object(cfg), "%s: %s", p, jerr.text);
    json_t *settings = doc_table_names("## Settings");
    for (size_t k = 0; k < json_array_size(settings); k++) {
        const char *key = json_string_value(json_array_get(settings, k));
        CHECK_MSG(json_object_get(cfg, key) != NULL, "config.json lacks the documented setting '%s'", key);
    }
    CHECK_MSG(json_object_size(cfg) == json_array_size(settings), "config.json has %zu keys, docs/train.md %zu",
              json_object_size(cfg), json_array_size(settings));
    json_decref(settings);
    CHECK_EQ_I64(json_integer_value(json_object_get(cfg, "rollout_batch")), 2);
    CHECK_EQ_I64(json_integer_value(json_object_get(cfg, "group_size")), 4);
    CHECK_EQ_I64(json_integer_value(json_object_get(cfg, "max_new_tokens")), 8);
    CHECK_EQ_I64(json_integer_value(json_object_get(cfg, "max_steps")), 3);
    CHECK_EQ_I64(json_integer_value(json_object_get(cfg, "save_every")), 1);
    CHECK_EQ_I64(json_integer_value(json_object_get(cfg, "threads")), 1);
    CHECK_STR_EQ(json_string_value(json_object_get(cfg, "reward_mode")), "expected");
    CHECK_NEAR(json_number_value(json_object_get(cfg, "lr")), 1e-3, 1e-7, 0); /* the float nearest 1e-3 */
    CHECK_STR_EQ(json_string_value(json_object_get(cfg, "advantage")), "rloo");
    CHECK(json_is_true(json_object_get(cfg, "whiten")));
    CHECK_STR_EQ(json_string_value(json_object_get(cfg, "instruction")), "Please describe this image in detail.");
    json_decref(cfg);

    static const char *const files[] = {"step-1/model.safetensors", "step-2/training_state.json",
                                        "step-3/config.json",       "step-3/tokenizer.json",
                                        "step-3/model.safetensors", "step-3/preprocessor_config.json",
                                        "step-3/training_state.safetensors"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", run_dir, files[i]);
        CHECK_MSG(file_exists(p), "%s missing", p);
    }
    /* the weights move every step */
    char a[4400], b[4400];
    snprintf(a, sizeof a, "%s/step-2/model.safetensors", run_dir);
    snprintf(b, sizeof b, "%s/step-3/model.safetensors", run_dir);
    CHECK(!same_file(a, b));

    /* the checkpoint is a Qwen2.5-VL model directory that caprl generate loads */
    char cmd[16384], out[4096];
    snprintf(cmd, sizeof cmd, "generate --model '%s/step-3' --image '%s/syn/images/train/00000.png' --prompt "
             "'Please describe this image in detail.' --max-new-tokens 4 --seed 1 --threads 1", run_dir, g_dir);
    rc = run_cli(cmd, out, sizeof out);
    read_stderr(err, sizeof err);
    CHECK_MSG(rc == 0, "generate on step-3: %d: %s", rc, err);

    /* a used RUN is refused without --resume; with it, a complete run is left as it is */
    rc = train(args, err, sizeof err);
    CHECK_MSG(rc == 1 && strstr(err, "--resume") && strstr(err, run_dir), "rerun without --resume: %d: %s", rc, err);
    char *before = metrics_without_seconds(run_dir);
    base_args(args, sizeof args, run_dir, "--max-steps 3 --threads 1 --resume");
    rc = train(args, err, sizeof err);
    CHECK_MSG(rc == 0, "--resume of a complete run: %d: %s", rc, err);
    char *after = metrics_without_seconds(run_dir);
    CHECK(before && after && strcmp(before, after) == 0);
    free(before);
    free(after);
    snprintf(p, sizeof p, "%s/step-4", run_dir);
    CHECK(!file_exists(p));

    /* RUN/config.json is a --config file: with another --out it repeats the run (its first step here) exactly */
    char again[4200];
    snprintf(again, sizeof again, "%s/again", g_dir);
    snprintf(args, sizeof args, "--config '%s/config.json' --out '%s' --max-steps 1", run_dir, again);
    rc = train(args, err, sizeof err);
    CHECK_MSG(rc == 0, "--config RUN/config.json: %d: %s", rc, err);
    snprintf(a, sizeof a, "%s/step-1/model.safetensors", run_dir);
    snprintf(b, sizeof b, "%s/step-1/model.safetensors", again);
    CHECK_MSG(same_file(a, b), "--config RUN/config.json: step-1 differs");
    char *m1 = metrics_without_seconds(run_dir), *m2 = metrics_without_seconds(again);
    CHECK_MSG(m1 && m2 && strncmp(m1, m2, strlen(m2)) == 0 && strlen(m2) > 0, "--config RUN/config.json: step 1's "
              "metrics differ:\n%s\nvs\n%s", m1 ? m1 : "", m2 ? m2 : "");
    free(m1);
    free(m2);
    snprintf(a, sizeof a, "%s/config.json", run_dir);
    snprintf(b, sizeof b, "%s/config.json", again);
    char *c1 = read_all(a, NULL), *c2 = read_all(b, NULL);
    char *o1 = c1 ? strstr(c1, "\n  \"out\": ") : NULL, *o2 = c2 ? strstr(c2, "\n  \"out\": ") : NULL;
    CHECK(o1 && o2);
    if (o1 && o2) { /* the same text up to the "out" line, and after it but for max_steps */
        CHECK(o1 - c1 == o2 - c2 && memcmp(c1, c2, (size_t)(o1 - c1)) == 0);
        char *s1 = strstr(o1, "\"max_steps\": 3,"), *s2 = strstr(o2, "\"max_steps\": 1,");
        CHECK(s1 && s2);
        if (s1 && s2) {
            s1[13] = s2[13] = 'N';
            CHECK_STR_EQ(strchr(o1 + 1, '\n'), strchr(o2 + 1, '\n'));
        }
    }
    free(c1);
    free(c2);
}

/* Flags override --config, wherever --config appears; --max-steps 0 resolves and records the settings only. */
static void test_config_override(void) {
    char path[4200], args[16384], err[8192], run_dir[4200];
    snprintf(path, sizeof path, "%s/over.json", g_dir);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) {
        return;
    }
    fprintf(f, "{\"group_size\": 2, \"lr\": 0.5, \"whiten\": true, \"advantage\": \"grpo\", \"seed\": 7, "
               "\"freeze\": \"vision\", \"reader_template\": null, \"max_steps\": 0}\n");
    fclose(f);
    snprintf(run_dir, sizeof run_dir, "%s/over", g_dir);
    snprintf(args, sizeof args, "--policy '%s' --reader '%s' --data '%s' --out '%s' --group-size 3 --config '%s' "
             "--no-whiten --threads 1", g_policy, g_reader, g_data, run_dir, path);
    int rc = train(args, err, sizeof err);
    CHECK_MSG(rc == 0, "--config with flags: %d: %s", rc, err);
    char p[4400];
    snprintf(p, sizeof p, "%s/config.json", run_dir);
    json_error_t jerr;
    json_t      *cfg = json_load_file(p, 0, &jerr);
    CHECK_MSG(json_is_object(cfg), "%s: %s", p, jerr.text);
    CHECK_EQ_I64(json_integer_value(json_object_get(cfg, "group_size")), 3);   /* the flag, before --config */
    CHECK(json_is_false(json_object_get(cfg, "whiten")));                     /* the flag, after it */
    CHECK_NEAR(json_number_value(json_object_get(cfg, "lr")), 0.5, 0, 0);      /* the file */
    CHECK_STR_EQ(json_string_value(json_object_get(cfg, "advantage")), "grpo"); /* the file */
    CHECK_EQ_I64(json_integer_value(json_object_get(cfg, "seed")), 7);
    CHECK_STR_EQ(json_string_value(json_object_get(cfg, "freeze")), "vision");
    CHECK(json_is_null(json_object_get(cfg, "reader_template")));
    CHECK_EQ_I64(json_integer_value(json_object_get(cfg, "rollout_batch")), 128); /* the default */
    json_decref(cfg);
    snprintf(p, sizeof p, "%s/step-0", run_dir);
    CHECK(!file_exists(p));
}

/* One bad setting: exit code and the setting's name in the one-line error. */
static void expect_bad(const char *extra, const char *config, int code, const char *needle) {
    char args[16384], err[8192], run_dir[4200], path[4200] = "";
    snprintf(run_dir, sizeof run_dir, "%s/bad", g_dir);
    if (config) {
        snprintf(path, sizeof path, "%s/bad.json", g_dir);
        FILE *f = fopen(path, "w");
        if (f) {
            fputs(config, f);
            fclose(f);
        }
    }
    char more[4600];
    snprintf(more, sizeof more, "--threads 1 --max-steps 1 %s%s%s", extra, config ? " --config " : "", path);
    base_args(args, sizeof args, run_dir, more);
    int rc = train(args, err, sizeof err);
    CHECK_MSG(rc == code && strstr(err, needle) != NULL, "'%s' %s: exit %d (expected %d), stderr lacks '%s': %s",
              extra, config ? config : "", rc, code, needle, err);
    CHECK_MSG(strstr(err, "AddressSanitizer") == NULL && strchr(err, '\n') == strrchr(err, '\n'),
              "one line of error expected: %s", err);
    char p[4400];
    snprintf(p, sizeof p, "%s/metrics.jsonl", run_dir);
    CHECK_MSG(!file_exists(p), "'%s': a refused run trained", extra);
}

static void test_bad_settings(void) {
    expect_bad("--bogus-setting 3", NULL, 1, "bogus_setting");
    expect_bad("--group-size four", NULL, 1, "group_size");
    expect_bad("--group-size 0", NULL, 1, "group_size");
    expect_bad("--group-size 1", NULL, 1, "group_size"); /* rloo needs two captions per image */
    expect_bad("--lr -1", NULL, 1, "'lr'");
    expect_bad("--top-p 1.5", NULL, 1, "top_p");
    expect_bad("--advantage ppo", NULL, 1, "advantage");
    expect_bad("--whiten maybe", NULL, 1, "whiten");
    expect_bad("--freeze arms", NULL, 1, "freeze");
    expect_bad("--reader-temperature 0", NULL, 1, "reader_temperature");
    expect_bad("--seed -3", NULL, 1, "seed");
    expect_bad("--dual-clip 0.5", NULL, 1, "dual_clip");
    expect_bad("stray", NULL, 1, "stray");
    expect_bad("", "{\"bogus\": 1}", 1, "bogus");
    expect_bad("", "{\"lr\": \"fast\"}", 1, "'lr'");
    expect_bad("", "{\"whiten\": 3}", 1, "whiten");
    expect_bad("", "{\"policy\": 5}", 1, "policy");
    expect_bad("", "[1, 2]", 2, "bad.json");
    /* a required setting missing */
    char err[8192], args[8192];
    snprintf(args, sizeof args, "--reader '%s' --data '%s' --out '%s/bad'", g_reader, g_data, g_dir);
    int rc = train(args, err, sizeof err);
    CHECK_MSG(rc == 1 && strstr(err, "policy"), "no --policy: %d: %s", rc, err);
}

/* --resume refuses a run whose settings or inputs changed, and changes nothing in RUN then; settings that only say
 * where the run goes, how often it records, how far it goes or how it computes (threads) may change, and the data
 * file may move. */
static void test_resume_checks(void) {
    char run_dir[4200], before[4300], args[16384], err[8192], cmd[16384], other[4300], same[4300];
    snprintf(run_dir, sizeof run_dir, "%s/res", g_dir);
    snprintf(before, sizeof before, "%s/res.before", g_dir);
    base_args(args, sizeof args, run_dir, "--max-steps 1 --threads 1");
    int rc = train(args, err, sizeof err);
    CHECK_MSG(rc == 0, "1-step run: %d: %s", rc, err);
    snprintf(cmd, sizeof cmd, "cp -a '%s' '%s'", run_dir, before);
    CHECK(run(cmd, NULL, 0) == 0);
    /* another data file (the first three of the four records) and a byte-identical copy of the run's own */
    snprintf(other, sizeof other, "%s/syn/other.jsonl", g_dir);
    snprintf(same, sizeof same, "%s/syn/same.jsonl", g_dir);
    snprintf(cmd, sizeof cmd, "head -n 3 '%s' > '%s' && cp '%s' '%s'", g_data, other, g_data, same);
    CHECK(run(cmd, NULL, 0) == 0);

    /* another reader: the same shape, tokenizer and config.json, other weights */
    char reader2[4300], reader_flag[4400], data_flag[4400];
    snprintf(reader2, sizeof reader2, "%s/reader2", g_dir);
    snprintf(cmd, sizeof cmd, "init-model --out '%s' --preset tiny --tokenizer '%s/tok.json' --vocab-size -1 "
             "--hidden 32 --heads 2 --kv-heads 1 --intermediate 64 --dtype f32 --seed 3", reader2, g_dir);
    rc = run_cli(cmd, NULL, 0);
    CHECK_MSG(rc == 0, "init-model reader2: %d", rc);
    snprintf(reader_flag, sizeof reader_flag, "--reader '%s'", reader2);
    snprintf(data_flag, sizeof data_flag, "--data '%s'", other);
    const struct {
        const char *extra, *needle1, *needle2;
    } refused[] = {
        {"--lr 2e-3", "setting 'lr' is 0.001 in", "but 0.002 now"},
        {"--group-size 3", "setting 'group_size' is 4 in", "but 3 now"},
        {"--seed 5", "setting 'seed' is 0 in", "but 5 now"},
        {"--no-whiten", "setting 'whiten' is true in", "but false now"},
        {data_flag, "'data' (now", "other.jsonl"},
        {reader_flag, "'reader' (now", "reader2"},
    };
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        char more[4600];
        snprintf(more, sizeof more, "--max-steps 3 --threads 1 --resume %s", refused[i].extra);
        base_args(args, sizeof args, run_dir, more);
        rc = train(args, err, sizeof err);
        CHECK_MSG(rc == 1 && strstr(err, refused[i].needle1) && strstr(err, refused[i].needle2),
                  "--resume %s: exit %d (expected 1), stderr lacks '%s' / '%s': %s", refused[i].extra, rc,
                  refused[i].needle1, refused[i].needle2, err);
        CHECK_MSG(strchr(err, '\n') == strrchr(err, '\n'), "one line of error expected: %s", err);
        snprintf(cmd, sizeof cmd, "diff -r '%s' '%s' >/dev/null", before, run_dir);
        CHECK_MSG(run(cmd, NULL, 0) == 0, "--resume %s changed %s", refused[i].extra, run_dir);
    }

    /* other threads, checkpoint and sample periods, a longer run and the data under another name: the run goes on
     * as if it had run the 3 steps at once */
    snprintf(cmd, sizeof cmd, "--max-steps 3 --threads 2 --save-every 2 --save-total-limit 3 --samples-every 7 "
             "--resume --data '%s'", same);
    base_args(args, sizeof args, run_dir, cmd);
    rc = train(args, err, sizeof err);
    CHECK_MSG(rc == 0, "--resume with other threads and periods: %d: %s", rc, err);
    char ref[4200];
    snprintf(ref, sizeof ref, "%s/run3", g_dir);
    check_same_run(ref, run_dir, 3, "--resume with other threads and periods");
    /* RUN/config.json records the settings of the run's latest invocation */
    char p[4400];
    snprintf(p, sizeof p, "%s/config.json", run_dir);
    json_error_t jerr;
    json_t      *cfg = json_load_file(p, 0, &jerr);
    CHECK_MSG(json_is_object(cfg), "%s: %s", p, jerr.text);
    CHECK_EQ_I64(json_integer_value(json_object_get(cfg, "threads")), 2);
    CHECK_EQ_I64(json_integer_value(json_object_get(cfg, "save_every")), 2);
    CHECK_EQ_I64(json_integer_value(json_object_get(cfg, "max_steps")), 3);
    CHECK_STR_EQ(json_string_value(json_object_get(cfg, "data")), same);
    json_decref(cfg);
}

/* A checkpoint temporary RUN/.step-N.tmp that appeared after `since`: this process is writing a checkpoint. */
static bool saving(const char *run_dir, const struct timespec *since) {
    char p[4400];
    for (int s = 1; s <= 4; s++) {
        struct stat st;
        snprintf(p, sizeof p, "%s/.step-%d.tmp", run_dir, s);
        if (stat(p, &st) == 0 && (st.st_mtim.tv_sec > since->tv_sec ||
                                  (st.st_mtim.tv_sec == since->tv_sec && st.st_mtim.tv_nsec >= since->tv_nsec))) {
            return true;
        }
    }
    return false;
}

/* When a kill comes: `arg` seconds after the start, once metrics.jsonl has `arg` lines (a step just ended), or as
 * soon as a checkpoint write is under way; then `delay` seconds later. Returns true if the SIGKILL hit a running
 * process (false: it finished first, which must have been a success). */
typedef enum { AFTER_SECONDS, AFTER_LINES, IN_SAVE } kill_when;

/* The condition of run_and_kill: the chosen kind of progress. */
typedef struct kill_goal {
    kill_when              when;
    double                 arg, t0;
    const char            *metrics, *run_dir;
    const struct timespec *since;
} kill_goal;

static bool kill_now(const void *goal) {
    const kill_goal *g = goal;
    return g->when == AFTER_SECONDS ? now_s() - g->t0 >= g->arg
           : g->when == AFTER_LINES ? count_file_lines(g->metrics) >= (long)g->arg
                                    : saving(g->run_dir, g->since);
}

static bool run_and_kill(const char *args, const char *run_dir, const char *err_path, kill_when when, double arg,
                         double delay) {
    char metrics[4400], cmd[20000];
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", run_dir);
    snprintf(cmd, sizeof cmd, "'%s' train %s", CAPRL_CLI, args);
    struct timespec since;
    clock_gettime(CLOCK_REALTIME, &since);
    child c;
    if (!child_start(&c, cmd, err_path)) {
        return false;
    }
    kill_goal g = {when, arg, now_s(), metrics, run_dir, &since};
    child_wait_until(&c, kill_now, &g, 120, 1e-4);
    child_wait_until(&c, NULL, NULL, delay, 1e-4);
    if (c.done) {
        CHECK_MSG(WIFEXITED(c.status) && WEXITSTATUS(c.status) == 0, "a resumed run failed (see %s)", err_path);
        return false;
    }
    return child_kill(&c) && WTERMSIG(c.status) == SIGKILL;
}

static void test_resume_and_threads(void) {
    char ref[4200], args[16384], err[8192];
    snprintf(ref, sizeof ref, "%s/ref4", g_dir);
    base_args(args, sizeof args, ref, "--max-steps 4 --threads 1");
    double t0 = now_s();
    int    rc = train(args, err, sizeof err);
    double run_s = now_s() - t0;
    CHECK_MSG(rc == 0, "4-step run: %d: %s", rc, err);

    /* kills during start-up, in checkpoint writes and a pseudo-random 0-30 ms after a step's metrics line (inside
     * the next step or the save), each followed by --resume. A metrics line of a step whose checkpoint a kill
     * prevented is run again after the resume, so the line thresholds leave room for it. */
    char killed[4200], err_path[4400];
    snprintf(killed, sizeof killed, "%s/killed", g_dir);
    snprintf(err_path, sizeof err_path, "%s/killed.stderr", g_dir);
    base_args(args, sizeof args, killed, "--max-steps 4 --threads 1 --resume --save-total-limit 2");
    static const struct {
        kill_when when;
        double    arg;
    } plan[] = {{AFTER_SECONDS, 0.01}, {IN_SAVE, 0}, {AFTER_LINES, 2}, {IN_SAVE, 0},
                {AFTER_LINES, 3},      {IN_SAVE, 0}, {AFTER_LINES, 4}};
    uint32_t seed = 20251126u;
    int      kills = 0, in_save = 0;
    char     where[256] = "";
    for (size_t i = 0; i < sizeof plan / sizeof plan[0]; i++) {
        seed = seed * 1664525u + 1013904223u;
        double delay = plan[i].when == AFTER_LINES ? 0.03 * (double)(seed >> 8) / 16777216.0 : 0.0;
        bool   hit = run_and_kill(args, killed, err_path, plan[i].when, plan[i].arg, delay);
        kills += hit;
        in_save += hit && plan[i].when == IN_SAVE;
        if (hit) {
            int latest = 0;
            for (int k = 1; k <= 4; k++) {
                char p[4400];
                snprintf(p, sizeof p, "%s/step-%d/training_state.json", killed, k);
                latest = file_exists(p) ? k : latest;
            }
            snprintf(where + strlen(where), sizeof where - strlen(where), " %d%s", latest,
                     plan[i].when == IN_SAVE ? " (in a save)" : "");
        }
    }
    fprintf(stderr, "test_train_cli: 4-step run %.2f s; %d kills, newest checkpoint at each:%s\n", run_s, kills,
            where);
    CHECK_MSG(kills >= 4 && in_save >= 1, "%d kills, %d in a checkpoint write", kills, in_save);
    rc = train(args, err, sizeof err);
    CHECK_MSG(rc == 0, "final --resume: %d: %s", rc, err);
    check_same_run(ref, killed, 4, "SIGKILLs + --resume");
    /* --save-total-limit 2 kept steps 3 and 4, and the resumes cleared what the kills left (.step-N.tmp / .del) */
    for (int k = 1; k <= 4; k++) {
        char p[4400];
        snprintf(p, sizeof p, "%s/step-%d", killed, k);
        CHECK_MSG(file_exists(p) == (k >= 3), "%s: %s", p, k >= 3 ? "missing" : "not pruned");
    }
    DIR *d = opendir(killed);
    for (struct dirent *e; d && (e = readdir(d)) != NULL;) {
        CHECK_MSG(strncmp(e->d_name, ".step-", 6) != 0, "%s/%s left behind", killed, e->d_name);
    }
    if (d) {
        closedir(d);
    }

    /* two threads: the same run */
    char two[4200];
    snprintf(two, sizeof two, "%s/two_threads", g_dir);
    base_args(args, sizeof args, two, "--max-steps 4 --threads 2");
    rc = train(args, err, sizeof err);
    CHECK_MSG(rc == 0, "--threads 2: %d: %s", rc, err);
    check_same_run(ref, two, 4, "--threads 2");
}

/* The loss aggregations against one another on the same first step (same rollouts, same rewards): the gradient of
 * seq-mean-token-sum is token-mean's times N_tok / N_seq (the mean caption length, nothing masked here), and
 * seq-mean-token-sum-norm's that divided by max_new_tokens; the logged pg_loss of the whitened REINFORCE loss is -A
 * averaged over tokens, 0; reward_std_group is the mean within-group std of the samples' rewards. */
static void test_loss_aggregation(void) {
    char        args[16384], err[8192], run_dir[4200];
    const char *aggs[3] = {"token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"};
    double      norm[3] = {0}, len = 0;
    for (int a = 0; a < 3; a++) {
        snprintf(run_dir, sizeof run_dir, "%s/agg%d", g_dir, a);
        char extra[256];
        snprintf(extra, sizeof extra, "--max-steps 1 --threads 1 --loss-agg %s", aggs[a]);
        base_args(args, sizeof args, run_dir, extra);
        int rc = train(args, err, sizeof err);
        CHECK_MSG(rc == 0, "--loss-agg %s: exit %d: %s", aggs[a], rc, err);
        json_t *m = load_lines(run_dir, "metrics.jsonl");
        json_t *line = json_array_get(m, 0);
        norm[a] = json_number_value(json_object_get(line, "grad_norm"));
        len = json_number_value(json_object_get(line, "caption_len_mean"));
        CHECK_MSG(fabs(json_number_value(json_object_get(line, "pg_loss"))) < 1e-5, "%s: pg_loss %g", aggs[a],
                  json_number_value(json_object_get(line, "pg_loss")));
        if (a == 0) {
            /* reward_std_group from the step's 8 captions (samples_every writes step 1): 2 groups of 4 */
            json_t *s = load_lines(run_dir, "samples.jsonl");
            double  want = 0.0;
            for (int g = 0; g < 2 && json_array_size(s) == 8; g++) {
                double sum = 0.0, ss = 0.0;
                for (int i = 0; i < 4; i++) {
                    double r = json_number_value(json_object_get(json_array_get(s, (size_t)(4 * g + i)), "reward"));
                    sum += r;
                    ss += r * r;
                }
                want += sqrt(fmax(0.0, (ss - sum * sum / 4.0) / 3.0)) / 2.0;
            }
            CHECK_EQ_I64(json_array_size(s), 8);
            CHECK_NEAR(json_number_value(json_object_get(line, "reward_std_group")), want, 1e-4, 1e-5);
            json_decref(s);
        }
        json_decref(m);
    }
    CHECK_MSG(len > 1.0 && norm[0] > 0.0, "caption_len_mean %g, grad_norm %g", len, norm[0]);
    CHECK_NEAR(norm[1], norm[0] * len, 1e-4, 0);
    CHECK_NEAR(norm[2], norm[1] / 8.0, 1e-5, 0);

    /* the LR horizon is OpenRLHF's episodes x (images // rollout_batch): 2 x (4 // 3) = 2 steps, so with cosine and
     * no warmup the second step is at 0.1 + 0.9 (1 + cos(pi / 2)) / 2 = 0.55 of the peak (not 0.775, as over
     * ceil(8 / 3) = 3 steps) */
    snprintf(run_dir, sizeof run_dir, "%s/horizon", g_dir);
    snprintf(args, sizeof args,
             "--policy '%s' --reader '%s' --data '%s' --out '%s' --rollout-batch 3 --group-size 2 --max-new-tokens 4 "
             "--reward-mode expected --lr 1e-3 --warmup 0 --episodes 2 --threads 1 --save-every 0",
             g_policy, g_reader, g_data, run_dir);
    int rc = train(args, err, sizeof err);
    CHECK_MSG(rc == 0, "horizon run: exit %d: %s", rc, err);
    json_t *h = load_lines(run_dir, "metrics.jsonl");
    CHECK_EQ_I64(json_array_size(h), 2);
    CHECK_NEAR(json_number_value(json_object_get(json_array_get(h, 1), "lr")), 1e-3 * 0.55, 1e-6, 0);
    json_decref(h);

    /* the entropy bonus reaches the update (its gradient is checked against finite differences in test_grpo) */
    snprintf(run_dir, sizeof run_dir, "%s/agg_entropy", g_dir);
    base_args(args, sizeof args, run_dir, "--max-steps 1 --threads 1 --entropy-coef 0.5");
    CHECK(train(args, err, sizeof err) == 0);
    json_t *m = load_lines(run_dir, "metrics.jsonl");
    double  with_entropy = json_number_value(json_object_get(json_array_get(m, 0), "grad_norm"));
    CHECK_MSG(with_entropy > 0.0 && fabs(with_entropy - norm[0]) > 1e-3 * norm[0], "grad_norm %g with the bonus, %g without",
              with_entropy, norm[0]);
    json_decref(m);
}

int main(void) {
    char *tmp = test_tmpdir("train_cli");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    free(tmp);
    if (!make_fixtures()) {
        return test_finish("test_train_cli");
    }
    test_run();
    test_loss_aggregation();
    test_config_override();
    test_bad_settings();
    test_resume_checks();
    test_resume_and_threads();
    return test_finish("test_train_cli");
}
