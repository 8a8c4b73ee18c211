/* A short GRPO run raises the CapRL reward: the demo's SFT captioner (demo/assets/captioner, trained by caprl on
 * short captions) is trained for a few steps against the demo's reader (demo/assets/reader), both made by caprl itself
 * (scripts/demo_assets.sh), on the synthetic world's questions, with a fixed seed. The mean reward of the last steps
 * must exceed that of the first steps by more than four standard errors: each step's reward_std over its
 * rollout_batch * group_size captions gives the standard error of that step's mean.
 * Label "demo": Release builds only (`make test`), not the sanitizer run, where this would take many minutes. */
#include <sys/stat.h>

#include "caprl_test.h"
#include "cli_util.h"

#define STEPS 20
#define WINDOW 3
#define CAPTIONS (16 * 8)

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
    const char *assets = CAPRL_SOURCE_DIR "/demo/assets";
    char        probe[4096];
    snprintf(probe, sizeof probe, "%s/captioner/model.safetensors", assets);
    struct stat st;
    CHECK_MSG(stat(probe, &st) == 0, "%s is missing: run make demo-assets", probe);
    snprintf(g_dir, sizeof g_dir, "%s/test-tmp/grpo_learns.%d", CAPRL_BINARY_DIR, (int)getpid());
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", g_dir, g_dir);
    CHECK(system(cmd) == 0);

    snprintf(cmd, sizeof cmd, "synth --out '%s/world' --train 512 --test 0 --seed 0 --reader-template '%s'", g_dir,
             CAPRL_SOURCE_DIR "/demo/reader_template.txt");
    CHECK(run_cli(cmd, NULL, 0) == 0);
    snprintf(cmd, sizeof cmd,
             "train --policy '%s/captioner' --reader '%s/reader' --data '%s/world/train.jsonl' --out '%s/run' "
             "--reader-template '%s' --reward-mode expected --rollout-batch 16 --group-size 8 --max-new-tokens 96 "
             "--max-steps %d --episodes 1 --lr 1e-4 --warmup 3 --min-lr-ratio 1 --save-every %d --seed 0 "
             "--threads 2",
             assets, assets, g_dir, g_dir, CAPRL_SOURCE_DIR "/demo/reader_template.txt", STEPS, STEPS);
    int rc = run_cli(cmd, NULL, 0);
    if (rc != 0) {
        char err[8192];
        read_stderr(err, sizeof err);
        fprintf(stderr, "%s\n", err);
    }
    CHECK(rc == 0);

    double mean[STEPS], std[STEPS];
    char   path[4200];
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
        CHECK_MSG(last - first > 4.0 * se, "reward rose %.4f, less than 4 standard errors (%.4f)", last - first,
                  4.0 * se);
    }
    if (!g_test_failures) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
        CHECK(system(cmd) == 0);
    }
    printf("test_grpo_learns: %d checks, %d failed\n", g_test_checks, g_test_failures);
    return g_test_failures ? 1 : 0;
}
