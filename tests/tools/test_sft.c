/* caprl sft end to end on a small random Qwen2 checkpoint over a byte-level tokenizer (built here: its checkpoints
 * are small, so the many runs stay fast) and, briefly, on caprl init-model's tiny preset with the Qwen tokenizer:
 * RUN's files (config.json, metrics.jsonl with every field, eval_loss on eval steps, step-N checkpoints that
 * caprl generate loads); a non-empty RUN refused without --resume and a complete run left alone with it; 1 vs 2
 * threads and --recompute bit-identical; kill -9s during start-up, during checkpoint writes and at random points
 * of steps, each followed by --resume, ending with the uninterrupted run's weights, optimizer state and losses bit
 * for bit; --resume with other settings refused; --save-total-limit; the model overfits a tiny dataset; malformed
 * and too long records refused with file:line, or skipped with --skip-bad; a Qwen2.5-VL model with image records
 * (the tower trains, --freeze vision keeps it bit-identical, threads agree). The slow variant adds kill soaks. */
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <sys/stat.h>

#include "byte_tokenizer.h"
#include "caprl/model.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl/tokenizer.h"
#include "caprl/vision.h"
#include "caprl/vlm.h"
#include "caprl_test.h"
#include "proc_util.h"

/* tests/slow/test_sft_long.c builds this file with SFT_LONG 1 */
#ifndef SFT_LONG
#    define SFT_LONG 0
#endif

static char g_model[2300]; /* the small byte-level model most runs train */

/* ---- helpers ------------------------------------------------------------------------------------------------- */

/* Runs cmd and checks that it succeeds, naming what in the message with the command's stderr. */
static void run_ok(const char *cmd, const char *what) {
    int   rc = run(cmd, NULL, 0);
    char *msg = last_stderr();
    CHECK_MSG(rc == 0, "%s exited %d: %s", what, rc, msg);
    free(msg);
}

/* RUN/metrics.jsonl as an array of objects; every line must be complete JSON. */
static json_t *load_metrics(const char *run_dir) {
    char path[2300];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run_dir);
    size_t  len = 0;
    char   *data = read_all(path, &len);
    json_t *arr = json_array();
    for (size_t start = 0; data && start < len;) {
        char *nl = memchr(data + start, '\n', len - start);
        CHECK_MSG(nl != NULL, "%s: last line is torn", path);
        if (!nl) {
            break;
        }
        json_error_t jerr;
        json_t      *rec = json_loadb(data + start, (size_t)(nl - (data + start)), 0, &jerr);
        CHECK_MSG(json_is_object(rec), "%s: bad line: %s", path, jerr.text);
        if (rec) {
            json_array_append_new(arr, rec);
        }
        start = (size_t)(nl - data) + 1;
    }
    free(data);
    return arr;
}

static double metric(const json_t *metrics, size_t i, const char *key) {
    return json_number_value(json_object_get(json_array_get(metrics, i), key));
}

/* ---- fixtures ------------------------------------------------------------------------------------------------ */

/* The small model: hidden 32, 2 layers, a 272-row vocabulary over the byte tokenizer; f32, saved in HF layout.
 * With vl, a Qwen2.5-VL one: M-RoPE text model plus a 2-block vision tower of width 16. */
static void make_small_model(const char *dir, bool vl) {
    char tok_path[2300];
    snprintf(tok_path, sizeof tok_path, "%s/byte_tokenizer.json", g_dir);
    write_byte_tokenizer(tok_path);
    caprl_text_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 272;
    c.hidden_size = 32;
    c.intermediate_size = 64;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 8;
    c.max_position_embeddings = 1024;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = true;
    c.bos_token_id = 256;
    c.eos_token_id = 258; /* <|im_end|> ends a turn */
    c.torch_dtype = -1;
    caprl_vision_config vc;
    memset(&vc, 0, sizeof vc);
    if (vl) {
        c.is_vl = true;
        c.n_mrope_sections = 3;
        c.mrope_section[0] = 2;
        c.mrope_section[1] = 1;
        c.mrope_section[2] = 1;
        c.vision_start_token_id = 259;
        c.image_token_id = 260;
        c.vision_end_token_id = 261;
        vc.depth = 2;
        vc.hidden_size = 16;
        vc.intermediate_size = 32;
        vc.num_heads = 2;
        vc.in_channels = 3;
        vc.out_hidden_size = 32;
        vc.patch_size = 14;
        vc.spatial_merge_size = 2;
        vc.temporal_patch_size = 2;
        vc.window_size = 56;
        vc.n_fullatt = 1;
        vc.fullatt_block_indexes[0] = 1;
        vc.tokens_per_second = 2.0f;
    }
    caprl_model  *m = NULL;
    caprl_vision *v = NULL;
    caprl_error   err = {0};
    CHECK_OK(caprl_model_init_random(&m, &c, CAPRL_DTYPE_F32, 17, 0.1f, NULL, &err), &err);
    if (vl) {
        CHECK_OK(caprl_vision_init_random(&v, &vc, CAPRL_DTYPE_F32, 18, 0.1f, 1, &err), &err);
    }
    if (m && (v || !vl)) {
        CHECK_OK(caprl_model_load_tokenizer(m, tok_path, &err), &err);
        CHECK_OK(vl ? caprl_vl_model_save(m, v, dir, &err) : caprl_model_save(m, dir, &err), &err);
    }
    caprl_vision_free(v);
    caprl_model_free(m);
}

/* Eight short question/answer records, each with its own system turn. */
static const char *const k_qa[8][2] = {
    {"What color is the sky?", "Blue."},         {"What is two plus two?", "Four."},
    {"Name a fruit.", "Apple."},                  {"Say hi.", "Hi there!"},
    {"What is the capital of France?", "Paris."}, {"How many legs does a cat have?", "Four legs."},
    {"What is the opposite of hot?", "Cold."},    {"Spell cat.", "C, A, T."},
};

static void write_data(const char *path, int first, int n) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    for (int i = first; f && i < first + n; i++) {
        fprintf(f,
                "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", "
                "\"content\": \"%s\"}, {\"role\": \"assistant\", \"content\": \"%s\"}], \"id\": %d}\n",
                k_qa[i % 8][0], k_qa[i % 8][1], i);
        if (i == first + 1) {
            fputs("\n", f); /* blank lines are allowed */
        }
    }
    if (f) {
        fclose(f);
    }
}

/* the settings every compared run shares: 8 records, 4 per step, 3 epochs = 6 steps */
#define COMMON "--batch 4 --epochs 3 --lr 3e-3 --warmup 1 --seed 5 --micro-batch-tokens 200"

static void sft_cmd(char *cmd, size_t cap, const char *run_dir, const char *extra) {
    snprintf(cmd, cap, "'%s' sft --model %s --data %s/train.jsonl --out %s " COMMON " %s", CAPRL_CLI, g_model, g_dir,
             run_dir, extra);
}

/* ---- tests --------------------------------------------------------------------------------------------------- */

static double g_run_seconds; /* how long the reference run took (reported) */

static void test_reference_run(void) {
    char cmd[16384], run_dir[2300], p[2600];
    snprintf(run_dir, sizeof run_dir, "%s/ref", g_dir);
    char extra[2600];
    snprintf(extra, sizeof extra, "--eval-every 2 --eval %s/eval.jsonl --save-every 2 --threads 2", g_dir);
    sft_cmd(cmd, sizeof cmd, run_dir, extra);
    double t0 = now_s();
    int    rc = run(cmd, NULL, 0);
    g_run_seconds = now_s() - t0;
    char *msg = last_stderr();
    CHECK_MSG(rc == 0, "reference run exited %d: %s", rc, msg);
    free(msg);
    fprintf(stderr, "test_sft: reference run: %.2f s\n", g_run_seconds);

    json_t *m = load_metrics(run_dir);
    CHECK_EQ_I64(json_array_size(m), 6);
    static const char *const keys[] = {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "loss_tokens",
                                       "tokens_per_s", "skipped"};
    for (size_t i = 0; i < json_array_size(m); i++) {
        json_t *r = json_array_get(m, i);
        for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
            CHECK_MSG(json_object_get(r, keys[k]) != NULL, "metrics line %zu lacks %s", i + 1, keys[k]);
        }
        CHECK_EQ_I64(json_integer_value(json_object_get(r, "step")), (int64_t)i + 1);
        CHECK_NEAR(metric(m, i, "epoch"), (double)(i + 1) / 2.0, 1e-12, 0);
        CHECK(json_is_false(json_object_get(r, "skipped")));
        CHECK_MSG(metric(m, i, "loss") > 0 && metric(m, i, "grad_norm") > 0, "line %zu", i + 1);
        /* eval on steps 2, 4, 6 only */
        CHECK((json_object_get(r, "eval_loss") != NULL) == ((i + 1) % 2 == 0));
    }
    /* warmup 1 (transformers' convention: the first step at rate 0) then cosine to 0.1 x lr at step 6 */
    CHECK(metric(m, 0, "lr") == 0.0);
    CHECK_NEAR(metric(m, 1, "lr"), 3e-3, 1e-6, 0);
    CHECK_NEAR(metric(m, 5, "lr"), 3e-3 * (0.1 + 0.9 * 0.5 * (1 + cos(M_PI * 4.0 / 5.0))), 1e-6, 0);
    /* both batches of an epoch together score every assistant token of the data once */
    CHECK_EQ_I64((int64_t)(metric(m, 0, "loss_tokens") + metric(m, 1, "loss_tokens")),
                 (int64_t)(metric(m, 2, "loss_tokens") + metric(m, 3, "loss_tokens")));
    json_decref(m);

    static const char *const files[] = {"config.json", "metrics.jsonl", "step-2/model.safetensors",
                                        "step-4/training_state.json", "step-6/model.safetensors",
                                        "step-6/tokenizer.json", "step-6/training_state.safetensors"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", run_dir, files[i]);
        CHECK_MSG(file_exists(p), "%s missing", p);
    }
    snprintf(p, sizeof p, "%s/step-1", run_dir);
    CHECK(!file_exists(p));
    snprintf(p, sizeof p, "%s/config.json", run_dir);
    json_error_t jerr;
    json_t      *cfg = json_load_file(p, 0, &jerr);
    CHECK(json_integer_value(json_object_get(cfg, "total_steps")) == 6);
    CHECK(json_integer_value(json_object_get(cfg, "data_records")) == 8);
    CHECK(json_is_string(json_object_get(cfg, "data_fingerprint")));
    json_decref(cfg);

    /* the checkpoint is a model directory caprl generate loads */
    snprintf(cmd, sizeof cmd, "'%s' generate --model %s/step-6 --prompt 'What color is the sky?' --chat --greedy "
             "--max-new-tokens 4", CAPRL_CLI, run_dir);
    run_ok(cmd, "generate on the checkpoint");

    /* RUN is not empty: refused without --resume; with it, a complete run is left alone */
    sft_cmd(cmd, sizeof cmd, run_dir, "");
    rc = run(cmd, NULL, 0);
    msg = last_stderr();
    CHECK_MSG(rc == 1 && strstr(msg, "not empty"), "rerun without --resume: %d: %s", rc, msg);
    free(msg);
    sft_cmd(cmd, sizeof cmd, run_dir, "--resume");
    rc = run(cmd, NULL, 0);
    msg = last_stderr();
    CHECK_MSG(rc == 0 && strstr(msg, "complete"), "--resume of a complete run: %d: %s", rc, msg);
    free(msg);
    /* settings the weights depend on must not change under --resume */
    sft_cmd(cmd, sizeof cmd, run_dir, "--resume --lr 1e-3");
    rc = run(cmd, NULL, 0);
    msg = last_stderr();
    CHECK_MSG(rc == 1 && strstr(msg, "lr"), "--resume with another --lr: %d: %s", rc, msg);
    free(msg);
}

/* run_dir ended exactly as ref_dir: the final checkpoint's weights and optimizer state byte for byte, and the
 * same metrics (losses, norms, eval losses where both ran an eval; not the timings) step by step. */
static void check_same_as(const char *ref, const char *run_dir, int steps, const char *what) {
    char a[2600], b[2600];
    for (int i = 0; i < 2; i++) {
        const char *file = i == 0 ? "model.safetensors" : "training_state.safetensors";
        snprintf(a, sizeof a, "%s/step-%d/%s", ref, steps, file);
        snprintf(b, sizeof b, "%s/step-%d/%s", run_dir, steps, file);
        CHECK_MSG(same_file(a, b), "%s: step-%d/%s differs from the reference run's", what, steps, file);
    }
    json_t *m1 = load_metrics(ref), *m2 = load_metrics(run_dir);
    CHECK_EQ_I64(json_array_size(m2), steps);
    for (size_t i = 0; i < json_array_size(m1) && i < json_array_size(m2); i++) {
        bool both_eval = json_object_get(json_array_get(m1, i), "eval_loss") &&
                         json_object_get(json_array_get(m2, i), "eval_loss");
        CHECK_MSG(metric(m1, i, "loss") == metric(m2, i, "loss") &&
                      metric(m1, i, "grad_norm") == metric(m2, i, "grad_norm") &&
                      (!both_eval || metric(m1, i, "eval_loss") == metric(m2, i, "eval_loss")) &&
                      json_integer_value(json_object_get(json_array_get(m2, i), "step")) == (json_int_t)i + 1,
                  "%s: metrics line %zu differs", what, i + 1);
    }
    json_decref(m1);
    json_decref(m2);
}

/* the test_reference_run run's outcome */
static void check_same_run(const char *run_dir, const char *what) {
    char ref[2300];
    snprintf(ref, sizeof ref, "%s/ref", g_dir);
    check_same_as(ref, run_dir, 6, what);
}

static void test_threads(void) {
    char cmd[16384], run_dir[2300];
    snprintf(run_dir, sizeof run_dir, "%s/one_thread", g_dir);
    sft_cmd(cmd, sizeof cmd, run_dir, "--threads 1 --save-every 3 --save-total-limit 1");
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    check_same_run(run_dir, "--threads 1");
    char p[2600];
    snprintf(p, sizeof p, "%s/step-3", run_dir); /* pruned by --save-total-limit 1 */
    CHECK(!file_exists(p));
    /* recomputing activations in the backward gives the same gradients, bit for bit */
    snprintf(run_dir, sizeof run_dir, "%s/recompute", g_dir);
    sft_cmd(cmd, sizeof cmd, run_dir, "--threads 2 --recompute");
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    check_same_run(run_dir, "--recompute");
}

/* When a kill comes: a delay after the start, once metrics.jsonl has some lines (a step just finished), or as soon
 * as a checkpoint write of this process is under way. Triggers on progress rather than time alone, so the kills
 * land at these moments however fast or loaded the machine is. */
typedef enum { KILL_AFTER, KILL_AT_LINES, KILL_IN_SAVE } kill_when;

/* A checkpoint temporary created after `since` (realtime): a leftover of an earlier kill does not count. */
typedef struct save_watch {
    const char     *run_dir;
    struct timespec since;
} save_watch;

static bool saving_since(const void *arg) {
    const save_watch *w = arg;
    char              p[2600];
    for (int s = 1; s <= 6; s++) {
        struct stat st;
        snprintf(p, sizeof p, "%s/.step-%d.tmp", w->run_dir, s);
        if (stat(p, &st) == 0 && (st.st_mtim.tv_sec > w->since.tv_sec ||
                                  (st.st_mtim.tv_sec == w->since.tv_sec && st.st_mtim.tv_nsec >= w->since.tv_nsec))) {
            return true;
        }
    }
    return false;
}

/* Runs cmd and SIGKILLs it `jitter` seconds after the trigger. Returns true if the kill hit a running process. */
static bool run_and_kill(const char *cmd, const char *run_dir, const char *err_path, kill_when when, double arg,
                         double jitter) {
    char metrics[2600];
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", run_dir);
    save_watch watch = {run_dir, {0, 0}};
    clock_gettime(CLOCK_REALTIME, &watch.since);
    child c;
    if (!child_start(&c, cmd, err_path)) {
        return false;
    }
    const double poll = 1e-4;
    if (when == KILL_AFTER) {
        child_wait_until(&c, NULL, NULL, arg, poll);
    } else if (when == KILL_AT_LINES) {
        child_wait_lines(&c, metrics, (long)arg, 120, poll);
    } else {
        child_wait_until(&c, saving_since, &watch, 120, poll);
    }
    child_wait_until(&c, NULL, NULL, jitter, poll);
    if (c.done) {
        CHECK_MSG(WIFEXITED(c.status) && WEXITSTATUS(c.status) == 0, "a resumed run failed (see %s)", err_path);
        return false;
    }
    return child_kill(&c);
}

static void test_kill_resume(void) {
    char cmd[16384], run_dir[2300], err_path[2400];
    snprintf(run_dir, sizeof run_dir, "%s/killed", g_dir);
    snprintf(err_path, sizeof err_path, "%s/killed.stderr", g_dir);
    sft_cmd(cmd, sizeof cmd, run_dir, "--resume --save-every 1 --save-total-limit 2 --threads 2");
    /* during start-up, in checkpoint writes, and a pseudo-random 0-20 ms after a step's metrics line (in the next
     * step or in a save); each time --resume. The line counts leave room for the stale lines a killed run left. */
    static const struct {
        kill_when when;
        double    arg;
    } plan[] = {{KILL_AFTER, 0.02},  {KILL_IN_SAVE, 0},  {KILL_AT_LINES, 2}, {KILL_IN_SAVE, 0},
                {KILL_AT_LINES, 4}, {KILL_IN_SAVE, 0}, {KILL_AT_LINES, 6}};
    unsigned seed = 12345;
    int      kills = 0, during_save = 0;
    char     where[256] = "";
    for (size_t i = 0; i < sizeof plan / sizeof plan[0]; i++) {
        double jitter = 0;
        if (plan[i].when == KILL_AT_LINES) {
            seed = seed * 1103515245u + 12345u;
            jitter = (double)((seed >> 8) % 1000) / 1000.0 * 0.02;
        }
        bool hit = run_and_kill(cmd, run_dir, err_path, plan[i].when, plan[i].arg, jitter);
        kills += hit;
        during_save += hit && plan[i].when == KILL_IN_SAVE;
        if (hit) { /* where the kills landed: the newest checkpoint then */
            int latest = 0;
            for (int k = 1; k <= 6; k++) {
                char p[2600];
                snprintf(p, sizeof p, "%s/step-%d/training_state.json", run_dir, k);
                latest = file_exists(p) ? k : latest;
            }
            snprintf(where + strlen(where), sizeof where - strlen(where), " %d%s", latest,
                     plan[i].when == KILL_IN_SAVE ? "s" : "");
        }
    }
    fprintf(stderr, "test_sft: %d kills (%d during a checkpoint write); newest checkpoint at each:%s\n", kills,
            during_save, where);
    CHECK(kills >= 5 && during_save >= 2);
    /* whatever state the kills left, --resume finishes the run */
    int   rc = run(cmd, NULL, 0);
    char *msg = last_stderr();
    CHECK_MSG(rc == 0, "final --resume exited %d: %s", rc, msg);
    free(msg);
    check_same_run(run_dir, "kill -9 + --resume");
    char p[2600];
    snprintf(p, sizeof p, "%s/step-4", run_dir); /* --save-total-limit 2 keeps steps 5 and 6 */
    CHECK(!file_exists(p));
}

/* Overfitting: 8 answers of a few characters, a model of ~27k parameters and 30 full-batch steps. The loss starts
 * near ln(272) = 5.6 nats (a random model spreads its mass over the vocabulary); a model that has learnt the
 * answers by heart must end far below: under 0.5 nat per token (each answer character then gets probability
 * above 0.6 on average) and under 10% of the first step's loss. */
static void test_overfit(void) {
    char cmd[16384], run_dir[2300];
    snprintf(run_dir, sizeof run_dir, "%s/overfit", g_dir);
    snprintf(cmd, sizeof cmd,
             "'%s' sft --model %s --data %s/train.jsonl --out %s --batch 8 --max-steps 30 --lr 1e-2 --warmup 2 "
             "--schedule constant --threads 1", CAPRL_CLI, g_model, g_dir, run_dir);
    int   rc = run(cmd, NULL, 0);
    char *msg = last_stderr();
    CHECK_MSG(rc == 0, "overfit run exited %d: %s", rc, msg);
    free(msg);
    json_t *m = load_metrics(run_dir);
    size_t  n = json_array_size(m);
    CHECK_EQ_I64(n, 30);
    if (n > 0) {
        double first = metric(m, 0, "loss"), last = metric(m, n - 1, "loss");
        fprintf(stderr, "test_sft: overfit: loss %.4f -> %.4f\n", first, last);
        CHECK_MSG(first > 0.8 * log(272.0), "first loss %.4f is not that of a random model", first);
        CHECK_MSG(last < 0.5 && last < 0.1 * first, "loss %.4f -> %.4f: did not overfit", first, last);
    }
    json_decref(m);
}

/* A record file with one bad line among good ones: refused naming FILE:LINE and the problem; --skip-bad drops it. */
static void expect_bad(const char *name, const char *bad_line, const char *needle, bool try_skip) {
    char path[2300], cmd[16384], run_dir[2300];
    snprintf(path, sizeof path, "%s/%s.jsonl", g_dir, name);
    snprintf(run_dir, sizeof run_dir, "%s/bad_%s", g_dir, name);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (!f) {
        return;
    }
    fputs("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", "
          "\"content\": \"hello\"}]}\n\n", f);
    fprintf(f, "%s\n", bad_line);
    fclose(f);
    snprintf(cmd, sizeof cmd, "'%s' sft --model %s --data %s --out %s --max-steps 1 --max-seq-len 60 "
             "--micro-batch-tokens 64 --system S --threads 1", CAPRL_CLI, g_model, path, run_dir);
    int   rc = run(cmd, NULL, 0);
    char *msg = last_stderr();
    char  where[2400];
    snprintf(where, sizeof where, "%s:3: ", path);
    CHECK_MSG(rc == 2 && strstr(msg, where) && strstr(msg, needle), "%s: exit %d, stderr: %s", name, rc, msg);
    free(msg);
    char p[2600];
    snprintf(p, sizeof p, "%s/step-1", run_dir);
    CHECK(!file_exists(p));
    if (!try_skip) {
        return;
    }
    /* --skip-bad: the good record trains, the bad one is named and skipped */
    snprintf(cmd, sizeof cmd, "'%s' sft --model %s --data %s --out %s_skip --max-steps 1 --max-seq-len 60 "
             "--micro-batch-tokens 64 --system S --skip-bad --threads 1", CAPRL_CLI, g_model, path, run_dir);
    rc = run(cmd, NULL, 0);
    msg = last_stderr();
    CHECK_MSG(rc == 0 && strstr(msg, where) && strstr(msg, "skipped") && strstr(msg, "1 records (1 skipped)"),
              "%s --skip-bad: exit %d, stderr: %s", name, rc, msg);
    free(msg);
}

/* Every kind of bad record is covered by tests/unit/test_sft_data.c; here the command's side: exit code 2 before
 * anything is trained, FILE:LINE on stderr, and --skip-bad. */
static void test_bad_records(void) {
    expect_bad("not_json", "{\"messages\": [", "invalid JSON", true);
    expect_bad("bad_role", "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}, {\"role\": "
               "\"assistant\", \"content\": \"y\"}]}", "role \"tool\"", false);
    expect_bad("image_text_model", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": "
               "\"assistant\", \"content\": \"y\"}], \"image\": \"a.png\"}", "text-only", false);
    expect_bad("too_long", "{\"messages\": [{\"role\": \"user\", \"content\": \"one two three four five six "
               "seven eight nine ten eleven twelve\"}, {\"role\": \"assistant\", \"content\": \"thirteen "
               "fourteen fifteen sixteen seventeen eighteen nineteen twenty\"}]}", "maximum sequence length 60", true);
}

/* Qwen2.5-VL: image records train the tower too (its tensors move), --freeze vision leaves them bit-identical, and
 * 1 vs 2 threads agree bit for bit. */
static void test_vl(void) {
    char model[2300], data[2300], cmd[16384];
    snprintf(model, sizeof model, "%s/vl_model", g_dir);
    make_small_model(model, true);
    snprintf(data, sizeof data, "%s/vl.jsonl", g_dir);
    FILE *f = fopen(data, "wb");
    CHECK(f != NULL);
    static const char *const images[] = {"rgb8.png", "baseline.jpg", "gray8.png", NULL};
    for (int i = 0; f && i < 4; i++) {
        fprintf(f, "{\"messages\": [{\"role\": \"user\", \"content\": \"%s\"}, {\"role\": \"assistant\", "
                "\"content\": \"%s\"}]", k_qa[i][0], k_qa[i][1]);
        if (images[i]) {
            fprintf(f, ", \"image\": \"%s/tests/fixtures/img/%s\"", CAPRL_SOURCE_DIR, images[i]);
        }
        fputs("}\n", f);
    }
    if (f) {
        fclose(f);
    }
    static const char *const variants[3][2] = {{"vl_t2", "--threads 2"}, {"vl_t1", "--threads 1"},
                                               {"vl_frozen", "--threads 2 --freeze vision"}};
    for (int k = 0; k < 3; k++) {
        snprintf(cmd, sizeof cmd, "'%s' sft --model %s --data %s --out %s/%s --batch 4 --max-steps 3 --lr 1e-2 "
                 "--system S --micro-batch-tokens 256 %s", CAPRL_CLI, model, data, g_dir, variants[k][0],
                 variants[k][1]);
        int   rc = run(cmd, NULL, 0);
        char *msg = last_stderr();
        CHECK_MSG(rc == 0, "VL sft %s exited %d: %s", variants[k][1], rc, msg);
        free(msg);
    }
    char a[2600], b[2600];
    snprintf(a, sizeof a, "%s/vl_t2/step-3/model.safetensors", g_dir);
    snprintf(b, sizeof b, "%s/vl_t1/step-3/model.safetensors", g_dir);
    CHECK_MSG(same_file(a, b), "VL: 1 and 2 threads differ");
    /* the tower's tensors: moved by training, untouched when frozen */
    char init[2600], frozen[2600];
    snprintf(init, sizeof init, "%s/model.safetensors", model);
    snprintf(frozen, sizeof frozen, "%s/vl_frozen/step-3/model.safetensors", g_dir);
    caprl_safetensors *s0 = NULL, *s1 = NULL, *s2 = NULL;
    caprl_error        err = {0};
    CHECK_OK(caprl_safetensors_open(&s0, init, &err), &err);
    CHECK_OK(caprl_safetensors_open(&s1, a, &err), &err);
    CHECK_OK(caprl_safetensors_open(&s2, frozen, &err), &err);
    int n_vis = 0, moved = 0, kept = 0, text_moved = 0;
    for (int64_t i = 0; s0 && s1 && s2 && i < caprl_safetensors_n_tensors(s0); i++) {
        const caprl_st_tensor *t0 = caprl_safetensors_tensor(s0, i);
        const caprl_st_tensor *t1 = caprl_safetensors_find(s1, t0->name), *t2 = caprl_safetensors_find(s2, t0->name);
        CHECK(t1 && t2 && t1->nbytes == t0->nbytes && t2->nbytes == t0->nbytes);
        if (!t1 || !t2) {
            continue;
        }
        bool vis = strncmp(t0->name, "visual.", 7) == 0;
        n_vis += vis;
        moved += vis && memcmp(t0->data, t1->data, t0->nbytes) != 0;
        kept += vis && memcmp(t0->data, t2->data, t0->nbytes) == 0;
        text_moved += !vis && memcmp(t0->data, t2->data, t0->nbytes) != 0;
    }
    CHECK_MSG(n_vis > 10 && moved == n_vis && kept == n_vis && text_moved > 0,
              "VL: %d vision tensors, %d moved by training, %d kept when frozen; %d text tensors moved", n_vis, moved,
              kept, text_moved);
    caprl_safetensors_free(s0);
    caprl_safetensors_free(s1);
    caprl_safetensors_free(s2);
}

/* The long variant (tests/slow/test_sft_long.c): many kills at uniformly random times over whole runs, in bf16
 * mixed precision with recompute and an eval set, then the same for a Qwen2.5-VL model with images. */
static void soak(const char *name, const char *base, int steps, int n_kills) {
    char ref[2300], run_dir[2300], cmd[16384], err_path[2400];
    snprintf(ref, sizeof ref, "%s/%s_ref", g_dir, name);
    snprintf(run_dir, sizeof run_dir, "%s/%s_killed", g_dir, name);
    snprintf(err_path, sizeof err_path, "%s/%s_killed.stderr", g_dir, name);
    snprintf(cmd, sizeof cmd, "%s --out %s --save-every 3", base, ref);
    double t0 = now_s();
    int    rc = run(cmd, NULL, 0);
    double seconds = now_s() - t0;
    char  *msg = last_stderr();
    CHECK_MSG(rc == 0, "%s reference run exited %d: %s", name, rc, msg);
    free(msg);
    snprintf(cmd, sizeof cmd, "%s --out %s --save-every 1 --save-total-limit 3 --resume", base, run_dir);
    /* each attempt: a kill during start-up, in a checkpoint write, or at a random point after the next step's
     * metrics line (within one step's time: in the save or the step after); at most one step of progress each */
    unsigned seed = 777;
    int      kills = 0;
    double   step_time = seconds / steps;
    for (int i = 0; i < n_kills; i++) {
        seed = seed * 1103515245u + 12345u;
        unsigned r = seed >> 8;
        double   u = (double)((r >> 4) % 1000) / 1000.0;
        int      latest = 0;
        for (int k = 1; k <= steps; k++) {
            char p[2600];
            snprintf(p, sizeof p, "%s/step-%d/training_state.json", run_dir, k);
            latest = file_exists(p) ? k : latest;
        }
        if (latest == steps) {
            break;
        }
        switch (r % 4) {
            case 0: kills += run_and_kill(cmd, run_dir, err_path, KILL_AFTER, 0.1 * u, 0); break;
            case 1: kills += run_and_kill(cmd, run_dir, err_path, KILL_IN_SAVE, 0, 0); break;
            default:
                kills += run_and_kill(cmd, run_dir, err_path, KILL_AT_LINES, latest + 1, u * step_time);
        }
    }
    rc = run(cmd, NULL, 0);
    msg = last_stderr();
    CHECK_MSG(rc == 0, "%s final --resume exited %d: %s", name, rc, msg);
    free(msg);
    fprintf(stderr, "test_sft: %s soak: %d kills over a %.2f s run\n", name, kills, seconds);
    CHECK(kills >= steps / 2);
    check_same_as(ref, run_dir, steps, name);
}

static void test_soak(void) {
    char base[16384];
    snprintf(base, sizeof base, "'%s' sft --model %s --data %s/train.jsonl --eval %s/eval.jsonl --eval-every 3 "
             "--batch 3 --epochs 4 --lr 3e-3 --warmup 2 --seed 9 --precision bf16 --recompute --threads 2 "
             "--micro-batch-tokens 200", CAPRL_CLI, g_model, g_dir, g_dir);
    soak("bf16", base, 12, 30);
    snprintf(base, sizeof base, "'%s' sft --model %s/vl_model --data %s/vl.jsonl --batch 2 --epochs 4 --lr 1e-2 "
             "--system S --micro-batch-tokens 256 --threads 2", CAPRL_CLI, g_dir, g_dir);
    soak("vl", base, 8, 20);
}

/* What caprl does not change travels with the weights, byte for byte, so that transformers loads a checkpoint as it
 * loaded the input: the tokenizer's companions (tokenizer_config.json with its chat template, ...) and, of a VL
 * model, the generation and preprocessor configs with keys caprl does not read. */
static void test_side_files(void) {
    char model[2300], run_dir[2300], cmd[16384], a[2400], b[2400];
    snprintf(model, sizeof model, "%s/vl_side", g_dir);
    snprintf(run_dir, sizeof run_dir, "%s/vl_side_run", g_dir);
    snprintf(cmd, sizeof cmd, "cp -r %s/vl_model %s", g_dir, model);
    CHECK(run(cmd, NULL, 0) == 0);
    static const char *const files[][2] = {
        {"tokenizer_config.json", "{\"eos_token\": \"<|im_end|>\", \"chat_template\": \"{{ messages }}\"}\n"},
        {"special_tokens_map.json", "{\"pad_token\": \"<|endoftext|>\"}\n"},
        {"chat_template.json", "{\"chat_template\": \"{{ messages }}\"}\n"},
        {"generation_config.json", "{\"bos_token_id\": 1, \"pad_token_id\": 2, \"do_sample\": false, "
                                   "\"max_new_tokens\": 2048, \"temperature\": 0.1, \"repetition_penalty\": 1.05}\n"},
        {"preprocessor_config.json", NULL}, /* the input's own, with a smaller max_pixels and the fast class */
    };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(a, sizeof a, "%s/%s", model, files[i][0]);
        if (files[i][1]) {
            FILE *f = fopen(a, "wb");
            CHECK(f != NULL);
            if (f) {
                fputs(files[i][1], f);
                fclose(f);
            }
        } else {
            snprintf(cmd, sizeof cmd, "sed -i 's/\"max_pixels\": [0-9]*/\"max_pixels\": 50176/; "
                     "s/Qwen2VLImageProcessor\"/Qwen2VLImageProcessorFast\"/' %s", a);
            CHECK(run(cmd, NULL, 0) == 0);
        }
    }
    snprintf(cmd, sizeof cmd, "'%s' sft --model %s --data %s/vl.jsonl --out %s --batch 4 --max-steps 1 --lr 1e-3 "
             "--micro-batch-tokens 256 --threads 1", CAPRL_CLI, model, g_dir, run_dir);
    run_ok(cmd, "sft");
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(a, sizeof a, "%s/%s", model, files[i][0]);
        snprintf(b, sizeof b, "%s/step-1/%s", run_dir, files[i][0]);
        CHECK_MSG(same_file(a, b), "step-1/%s differs from the input's", files[i][0]);
    }
    char *pp = read_all(a, NULL);
    CHECK(pp && strstr(pp, "\"max_pixels\": 50176") != NULL);
    free(pp);
    /* model.safetensors.index.json maps every tensor of model.safetensors and nothing else (so that servers which
     * glob *.safetensors leave training_state.safetensors alone) */
    snprintf(a, sizeof a, "%s/step-1/model.safetensors.index.json", run_dir);
    json_error_t jerr;
    json_t      *idx = json_load_file(a, 0, &jerr);
    json_t      *map = json_object_get(idx, "weight_map");
    snprintf(b, sizeof b, "%s/step-1/model.safetensors", run_dir);
    caprl_safetensors *st = NULL;
    caprl_error        err = {0};
    CHECK_OK(caprl_safetensors_open(&st, b, &err), &err);
    CHECK_MSG(json_is_object(map) && st && (int64_t)json_object_size(map) == caprl_safetensors_n_tensors(st), "%s: %s",
              a, jerr.text);
    size_t total = 0;
    for (int64_t i = 0; st && i < caprl_safetensors_n_tensors(st); i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(st, i);
        total += t->nbytes;
        CHECK_STR_EQ(json_string_value(json_object_get(map, t->name)), "model.safetensors");
    }
    CHECK_EQ_I64(json_integer_value(json_object_get(json_object_get(idx, "metadata"), "total_size")), (int64_t)total);
    caprl_safetensors_free(st);
    json_decref(idx);
}

/* The init-model preset with the Qwen vocabulary: a short run whose checkpoint caprl generate loads. */
static void test_qwen_tiny(const char *tok) {
    char model[2300], run_dir[2300], cmd[16384];
    snprintf(model, sizeof model, "%s/qwen_tiny", g_dir);
    snprintf(run_dir, sizeof run_dir, "%s/qwen_run", g_dir);
    snprintf(cmd, sizeof cmd, "'%s' init-model --out %s --preset tiny --dtype bf16 --seed 3 --tokenizer %s", CAPRL_CLI,
             model, tok);
    CHECK_EQ_I64(run(cmd, NULL, 0), 0);
    snprintf(cmd, sizeof cmd, "'%s' sft --model %s --data %s/train.jsonl --out %s --batch 2 --max-steps 1 --lr 1e-3 "
             "--freeze embed --precision bf16 --threads 2", CAPRL_CLI, model, g_dir, run_dir);
    run_ok(cmd, "sft on the init-model preset");
    json_t *m = load_metrics(run_dir);
    CHECK_EQ_I64(json_array_size(m), 1);
    CHECK_MSG(fabs(metric(m, 0, "loss") - log(151936.0)) < 1.0, "first loss %.4f, ln(V) = 11.93",
              metric(m, 0, "loss"));
    json_decref(m);
    snprintf(cmd, sizeof cmd, "'%s' generate --model %s/step-1 --prompt 'What color is the sky?' --chat --greedy "
             "--max-new-tokens 4", CAPRL_CLI, run_dir);
    run_ok(cmd, "generate on the checkpoint");
}

int main(void) {
    char *tmp = test_tmpdir(SFT_LONG ? "sft_long" : "sft");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    free(tmp);
    snprintf(g_model, sizeof g_model, "%s/model", g_dir);
    make_small_model(g_model, false);
    char path[2300];
    snprintf(path, sizeof path, "%s/train.jsonl", g_dir);
    write_data(path, 0, 8);
    snprintf(path, sizeof path, "%s/eval.jsonl", g_dir);
    write_data(path, 2, 3);
    static const struct {
        const char *name;
        void (*fn)(void);
    } parts[] = {{"reference run", test_reference_run}, {"threads", test_threads},
                 {"kill and resume", test_kill_resume}, {"overfit", test_overfit},
                 {"bad records", test_bad_records},      {"VL", test_vl},
                 {"side files", test_side_files},
                 {"soak", SFT_LONG ? test_soak : NULL}};
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        double t0 = now_s();
        if (parts[i].fn) {
            parts[i].fn();
            fprintf(stderr, "test_sft: %s: %.1f s\n", parts[i].name, now_s() - t0);
        }
    }
    char tok[2300];
    snprintf(tok, sizeof tok, "%s/data/qwen-tokenizer/tokenizer.json", CAPRL_SHARED_DIR);
    if (file_exists(tok)) {
        test_qwen_tiny(tok);
    } else {
        fprintf(stderr, "test_sft: note: %s not found; the init-model preset run is skipped\n", tok);
    }
    return test_finish(SFT_LONG ? "test_sft_long" : "test_sft");
}
