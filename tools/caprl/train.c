/* caprl train: the CapRL GRPO / RLOO trainer. Every training setting is a key of the resolved config
 * (RUN/config.json); a run.json given with --config sets keys first, then each --flag-name VALUE on the command line
 * sets key flag_name, so flags override the file. Booleans take --name (true) or --no-name (false). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/rl.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

static const char k_usage[] =
    "usage: caprl train --policy DIR --reader DIR --data qa.jsonl --out RUN [--config run.json] [--resume]\n"
    "                   [--SETTING VALUE ...]\n"
    "\n"
    "Trains a Qwen2.5-VL captioner with the CapRL reward: per step, group_size captions for each of rollout_batch\n"
    "images, each scored by the reader answering n_questions of the image's multiple-choice questions from the\n"
    "caption alone; advantages, policy-gradient loss and one AdamW step per rollout batch. Writes RUN/config.json\n"
    "(the resolved settings), RUN/fingerprints.json (the input files' content), RUN/metrics.jsonl (one line per\n"
    "step), RUN/samples.jsonl (captions with their rewards every samples_every steps) and RUN/step-N/ checkpoints;\n"
    "--resume continues from the newest one, bit-identically, and refuses settings or inputs other than the run's\n"
    "own (out, max_steps, save_every, save_total_limit, samples_every, threads and recompute may change).\n"
    "Settings (--name-with-dashes VALUE or config key name_with_underscores) and their defaults, the released\n"
    "CapRL recipe (docs/train.md explains each):\n";

typedef struct progress {
    bool   tty;
    double t0;
} progress;

static bool on_step(const caprl_rl_step_metrics *m, int64_t total, void *user) {
    progress *p = user;
    double    elapsed = tool_now() - p->t0;
    fprintf(stderr,
            "%sstep %lld/%lld  reward %.3f (std %.3f, zero-std %.0f%%)  len %.1f  entropy %.3f  grad %.3g  lr %.3g  "
            "[rollout %.1fs reward %.1fs update %.1fs, %.0fs]%s%s",
            p->tty ? "\r\033[K" : "", (long long)m->step, (long long)total, m->reward_mean, m->reward_std,
            100.0 * m->zero_std_frac, m->caption_len_mean, m->entropy, m->grad_norm, m->lr, m->seconds_rollout,
            m->seconds_reward, m->seconds_update, elapsed, m->skipped ? "  SKIPPED (non-finite gradient)" : "",
            p->tty && m->step < total ? "" : "\n");
    fflush(stderr);
    return true;
}

static char *key_of(const char *flag) {
    char *k = tool_xstrdup(flag);
    for (char *c = k; *c; c++) {
        *c = *c == '-' ? '_' : *c;
    }
    return k;
}

int cmd_train(int argc, char **argv) {
    const char     *cmd = "train";
    caprl_rl_config cfg = caprl_rl_config_default();
    caprl_error     err = {0};
    bool            resume = false;
    int             rc = EXIT_OK;
    /* the config file first, wherever --config appears, so that every flag overrides it */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            char *json = NULL;
            fputs(k_usage, stdout);
            if (caprl_rl_config_to_json(&cfg, &json, &err) == CAPRL_OK) {
                fputs(json, stdout);
            }
            caprl_free(json);
            caprl_rl_config_free(&cfg);
            return EXIT_OK;
        }
        if (strcmp(argv[i], "--config") == 0) {
            if (i + 1 >= argc) {
                caprl_rl_config_free(&cfg);
                return tool_usage_error(cmd, "--config needs a file");
            }
            char  *text = NULL;
            size_t len = 0;
            rc = tool_read_file(cmd, argv[i + 1], 1 << 20, &text, &len);
            if (rc == EXIT_OK && caprl_rl_config_from_json(&cfg, text, len, argv[i + 1], &err) != CAPRL_OK) {
                rc = tool_fail(cmd, err.code, err.msg);
            }
            free(text);
            if (rc != EXIT_OK) {
                caprl_rl_config_free(&cfg);
                return rc;
            }
        }
    }
    for (int i = 1; i < argc && rc == EXIT_OK; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--config") == 0) {
            i++;
            continue;
        }
        if (strcmp(a, "--resume") == 0) {
            resume = true;
            continue;
        }
        if (strncmp(a, "--", 2) != 0 || !a[2]) {
            rc = tool_usage_error(cmd, "unexpected argument '%s' (settings are --name VALUE; see --help)", a);
            break;
        }
        const char *name = a + 2, *value;
        char       *key;
        if (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0) {
            key = key_of(name);
            value = argv[++i];
        } else if (strncmp(name, "no-", 3) == 0) {
            key = key_of(name + 3);
            value = "false";
        } else {
            key = key_of(name);
            value = "true";
        }
        if (caprl_rl_config_set(&cfg, key, value, &err) != CAPRL_OK) {
            rc = tool_usage_error(cmd, "%s", err.msg);
        }
        free(key);
    }
    if (rc == EXIT_OK) {
        progress p = {.tty = isatty(STDERR_FILENO) != 0, .t0 = tool_now()};
        if (caprl_rl_train(&cfg, resume, on_step, &p, &err) != CAPRL_OK) {
            rc = tool_fail(cmd, err.code, err.msg);
        } else {
            fprintf(stderr, "caprl train: done; checkpoints, metrics.jsonl and samples.jsonl are in %s\n", cfg.out);
        }
    }
    caprl_rl_config_free(&cfg);
    return rc;
}
