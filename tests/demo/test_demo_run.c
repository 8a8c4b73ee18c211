/* make demo's results, measured by the demo itself: this test runs scripts/demo.sh (synth, qa filter, eval prism,
 * caprl train, eval prism, report) on the tiny models shipped in demo/assets and checks RUN/summary.json and the
 * two Prism evaluations' per-item scores.
 *   - test_demo_run (label "demo", in `make test` and CI): a shortened run, SHORT_STEPS GRPO steps instead of the
 *     demo's 200. Asserted: the training reward and the held-out Prism Mean accuracy both rise by more than
 *     Z_SIGNIFICANT standard errors. The reward's standard error comes from each step's reward_std over its 128
 *     captions, as in test_grpo_learns; the Prism gain's from the paired per-image differences (an image's
 *     questions share its captions, so images, not questions, are the independent units). Measured: reward
 *     0.188 -> 0.431 (28.5 standard errors), Prism Mean +16.4 points (5.5); about 3.5 minutes, run alone.
 *   - test_demo_full (label "slow", `ctest -L slow`): the demo as `make demo` runs it. Asserted: the figures,
 *     reward rise >= 0.2, Prism Mean gain >= 15 points, and the curation filter's (>= 90% of the planted leaky
 *     questions removed, >= 80% of the valid ones kept).
 * Everything is seeded and caprl's results do not depend on the thread count, so a run's figures are reproducible. */
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

#include "caprl_test.h"
#include "cli_util.h"

#define SHORT_STEPS 100
#define CAPTIONS_PER_STEP (16 * 8)
#define Z_SIGNIFICANT 3.0

static json_t *load(const char *run, const char *name) {
    char         path[4400];
    json_error_t e;
    snprintf(path, sizeof path, "%s/%s", run, name);
    json_t *v = json_load_file(path, 0, &e);
    CHECK_MSG(v != NULL, "%s: %s", path, e.text);
    return v;
}

static double num(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    CHECK_MSG(json_is_number(v), "summary.json: no number \"%s\"", key);
    return v ? json_number_value(v) : NAN;
}

/* The reward's rise between the first and the last window of steps (a tenth of them, as caprl report takes) in
 * standard errors. */
static double reward_rise_z(const char *run, int steps) {
    char path[4400];
    snprintf(path, sizeof path, "%s/train/metrics.jsonl", run);
    FILE *f = fopen(path, "r");
    CHECK_MSG(f != NULL, "cannot read %s", path);
    if (!f) {
        return 0.0;
    }
    double *mean = calloc((size_t)steps, sizeof *mean), *sd = calloc((size_t)steps, sizeof *sd);
    char    line[8192];
    int     n = 0;
    while (fgets(line, sizeof line, f) && n < steps) {
        json_t *r = json_loads(line, 0, NULL);
        mean[n] = json_number_value(json_object_get(r, "reward_mean"));
        sd[n] = json_number_value(json_object_get(r, "reward_std"));
        json_decref(r);
        n++;
    }
    fclose(f);
    CHECK_EQ_I64(n, steps);
    int    w = steps / 10 > 1 ? steps / 10 : 1;
    double first = 0.0, last = 0.0, var = 0.0;
    for (int i = 0; i < w; i++) {
        first += mean[i] / w;
        last += mean[steps - w + i] / w;
        var += (sd[i] * sd[i] + sd[steps - w + i] * sd[steps - w + i]) / CAPTIONS_PER_STEP / ((double)w * w);
    }
    free(mean);
    free(sd);
    double z = (last - first) / sqrt(var);
    fprintf(stderr, "reward: %.4f -> %.4f (windows of %d steps), %.1f standard errors\n", first, last, w, z);
    return z;
}

/* Prism Mean per image (its questions' mean score over the captions), from eval prism's details file, in the
 * benchmark's image order; returns the number of images. */
static int per_image_means(const char *run, const char *dir, const char *tag, double *out, int cap) {
    char name[256];
    snprintf(name, sizeof name, "%s/Prism_%s_step_details_0_final.json", dir, tag);
    json_t *items = load(run, name);
    int     n = 0, n_q = 0;
    double  sum = 0.0;
    const char *image = NULL;
    for (size_t i = 0; items && i < json_array_size(items); i++) {
        const json_t *rec = json_array_get(items, i);
        const char   *im = json_string_value(json_object_get(json_array_get(rec, 0), "image"));
        const json_t *scores = json_array_get(rec, 1);
        CHECK(im != NULL && json_array_size(scores) > 0);
        if (!im || !json_array_size(scores)) {
            break;
        }
        if (image && strcmp(image, im) != 0) {
            if (n < cap) {
                out[n] = sum / n_q;
            }
            n++;
            sum = 0.0;
            n_q = 0;
        }
        image = im;
        double s = 0.0;
        for (size_t k = 0; k < json_array_size(scores); k++) {
            s += json_number_value(json_array_get(scores, k));
        }
        sum += s / (double)json_array_size(scores);
        n_q++;
    }
    if (n_q > 0) {
        if (n < cap) {
            out[n] = sum / n_q;
        }
        n++;
    }
    json_decref(items);
    return n;
}

/* The Prism Mean gain (after - before, in accuracy) over its paired per-image standard error. */
static double prism_gain_z(const char *run) {
    double before[256], after[256];
    int    nb = per_image_means(run, "prism_before", "sft", before, 256);
    int    na = per_image_means(run, "prism_after", "grpo", after, 256);
    CHECK(nb == na && nb >= 8 && nb <= 256);
    if (nb != na || nb < 8 || nb > 256) {
        return 0.0;
    }
    double mean = 0.0, var = 0.0;
    for (int i = 0; i < nb; i++) {
        mean += (after[i] - before[i]) / nb;
    }
    for (int i = 0; i < nb; i++) {
        double d = after[i] - before[i] - mean;
        var += d * d / (nb - 1);
    }
    double z = mean / sqrt(var / nb);
    fprintf(stderr, "Prism Mean gain over %d images: %+.1f points, %.1f standard errors\n", nb, 100.0 * mean, z);
    return z;
}

int main(int argc, char **argv) {
    bool  full = argc > 1 && strcmp(argv[1], "--full") == 0;
    char *tmp = test_tmpdir(full ? "demo_full" : "demo_run");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    free(tmp);
    char run_dir[4400], cmd[16384];
    snprintf(run_dir, sizeof run_dir, "%s/run", g_dir);
    char steps_env[64] = "";
    if (!full) {
        snprintf(steps_env, sizeof steps_env, "DEMO_STEPS=%d ", SHORT_STEPS);
    }
    /* demo.sh takes the program from BUILD/caprl and the models from demo/assets, relative to the source tree */
    snprintf(cmd, sizeof cmd, "cd '%s' && %s./scripts/demo.sh '%s' '%s' >'%s/demo.log'", CAPRL_SOURCE_DIR, steps_env,
             CAPRL_BINARY_DIR, run_dir, g_dir);
    int rc = run(cmd, NULL, 0);
    CHECK_MSG(rc == 0, "scripts/demo.sh failed (%d): see %s/demo.log and %s/stderr.txt", rc, g_dir, g_dir);
    if (rc != 0) {
        return test_finish(full ? "test_demo_full" : "test_demo_run");
    }
    json_t *sum = load(run_dir, "summary.json");
    if (!sum) {
        return test_finish(full ? "test_demo_full" : "test_demo_run");
    }
    int steps = (int)num(sum, "train_steps");
    double rise = num(sum, "reward_rise"), gain = num(sum, "prism_mean_gain_points");
    fprintf(stderr, "%d steps: reward rise %.4f, Prism Mean %+.1f points\n", steps, rise, gain);
    CHECK_MSG(reward_rise_z(run_dir, steps) > Z_SIGNIFICANT, "the reward's rise is not significant");
    CHECK_MSG(prism_gain_z(run_dir) > Z_SIGNIFICANT, "the Prism gain is not significant");
    if (full) {
        double removed = num(sum, "filter_leaky_removed_frac"), kept = num(sum, "filter_valid_kept_frac");
        fprintf(stderr, "filter: %.1f%% of the leaky questions removed, %.1f%% of the valid ones kept\n",
                100.0 * removed, 100.0 * kept);
        CHECK_MSG(rise >= 0.2, "reward rose %.4f, less than 0.2", rise);
        CHECK_MSG(gain >= 15.0, "Prism Mean rose %.1f points, less than 15", gain);
        CHECK_MSG(removed >= 0.9, "the filter removed %.1f%% of the leaky questions, less than 90%%", 100.0 * removed);
        CHECK_MSG(kept >= 0.8, "the filter kept %.1f%% of the valid questions, less than 80%%", 100.0 * kept);
    }
    json_decref(sum);
    return test_finish(full ? "test_demo_full" : "test_demo_run");
}
