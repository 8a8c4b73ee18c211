/* The CapRL trainer (spec/caprl.md §1, §5): per step, G captions per image sampled from the Qwen2.5-VL policy,
 * scored by a frozen text-only reader answering the image's multiple-choice questions from each caption
 * (caprl/reward.h), advantages and the policy-gradient loss of caprl/grpo.h, and one AdamW step per rollout batch
 * (caprl/train.h). Everything random is a counter-based stream of (seed, step, item), so a run resumed from a
 * checkpoint continues exactly as if it had never stopped.
 *
 * caprl_rl_config_default gives the released CapRL recipe; caprl_rl_config_from_json applies a run.json on top of
 * any config (keys = the CLI flag names with '_' for '-'), and caprl_rl_config_to_json writes the resolved config
 * that the run records in RUN/config.json. */
#ifndef CAPRL_RL_H
#define CAPRL_RL_H

#include "caprl/caprl.h"
#include "caprl/grpo.h"
#include "caprl/reward.h"
#include "caprl/train.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CAPRL_CAPTION_INSTRUCTION "Please describe this image in detail."

typedef struct caprl_rl_config {
    char    *policy;        /* Qwen2.5-VL checkpoint directory */
    char    *reader;        /* text-only Qwen2 reader checkpoint directory */
    char    *data;          /* QA JSONL (caprl/qa.h) */
    char    *out;           /* run directory */
    char    *instruction;   /* the captioning request; CAPRL_CAPTION_INSTRUCTION */
    char    *reader_template; /* NULL: the CapRL reader prompt; else a file with two {} */
    uint64_t seed;
    int32_t  rollout_batch;  /* images per step (128) */
    int32_t  group_size;     /* captions per image, G (8) */
    float    temperature;    /* rollout sampling temperature (1.0); logits are divided by it in the update */
    float    top_p;          /* 1.0 */
    int32_t  max_new_tokens; /* caption cap (4096) */
    int32_t  episodes;       /* passes over the data that set the LR horizon (30) */
    int32_t  max_steps;      /* stop after this many steps (-1: the horizon) */
    int32_t  updates_per_rollout; /* optimizer steps per rollout batch (mini-batches; 1) */
    int32_t  micro_batch_tokens;  /* tokens per forward/backward (4096) */
    bool     dynamic_sampling;    /* drop zero-std groups from the update (false) */
    caprl_rl_params      rl;
    caprl_adamw_params   opt;     /* lr 1e-6, betas (0.9, 0.95), wd 0, clip 1, warmup 20, cosine to 0.1 */
    caprl_reward_params  reward;
    int32_t  frozen_groups; /* CAPRL_GROUP_* (none) */
    int32_t  precision;     /* CAPRL_PRECISION_* (f32) */
    bool     recompute;
    int32_t  save_every;    /* checkpoint every N steps (50); the last step is always saved */
    int32_t  save_total_limit; /* keep the newest N checkpoints (0 = all) */
    int32_t  samples_every; /* write captions with rewards to RUN/samples.jsonl every N steps (10) */
    int32_t  n_threads;     /* 0 = all cores */
    bool     skip_bad;      /* skip malformed QA records instead of refusing to start */
} caprl_rl_config;

CAPRL_API caprl_rl_config caprl_rl_config_default(void);
/* Applies the keys of a JSON object (text) to cfg. Unknown keys, values of the wrong type and bad values are
 * CAPRL_ERR_INVALID_ARG naming the file and the key (as a wrong flag is); a text that is not a JSON object is
 * CAPRL_ERR_FORMAT. */
CAPRL_API caprl_status caprl_rl_config_from_json(caprl_rl_config *cfg, const char *json, size_t n, const char *name,
                                                 caprl_error *err);
/* Sets one key from its text form (a command-line flag: --group-size 4 is key "group_size", value "4"; booleans
 * take true / false; enums their names; freeze a comma list of embed, text, vision). Errors name the key. */
CAPRL_API caprl_status caprl_rl_config_set(caprl_rl_config *cfg, const char *key, const char *value,
                                           caprl_error *err);
/* The resolved config as a JSON object (text, caprl_free). */
CAPRL_API caprl_status caprl_rl_config_to_json(const caprl_rl_config *cfg, char **out, caprl_error *err);
CAPRL_API void         caprl_rl_config_free(caprl_rl_config *cfg); /* frees the strings */

/* One step's metrics (also written as a line of RUN/metrics.jsonl). */
typedef struct caprl_rl_step_metrics {
    int64_t step;
    double  reward_mean, reward_std; /* over the step's captions */
    double  reward_std_group;  /* mean over the step's groups of the std within a group (Bessel) */
    double  zero_std_frac;     /* groups whose rewards are all equal */
    double  caption_len_mean;  /* tokens */
    int32_t caption_len_max;
    double  truncated_frac;    /* captions cut at max_new_tokens */
    double  pg_loss, kl, entropy, clip_frac, clip_frac_lower;
    double  grad_norm, lr;
    int64_t reader_tokens;
    double  seconds_rollout, seconds_reward, seconds_update;
    bool    skipped;           /* the optimizer skipped a non-finite update */
} caprl_rl_step_metrics;

/* Called after every step (may be NULL); returning false stops the run after that step's checkpoint. */
typedef bool (*caprl_rl_step_fn)(const caprl_rl_step_metrics *m, int64_t total_steps, void *user_data);

/* Runs (or with resume, continues) the training described by cfg. */
CAPRL_API caprl_status caprl_rl_train(const caprl_rl_config *cfg, bool resume, caprl_rl_step_fn on_step,
                                      void *user_data, caprl_error *err);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_RL_H */
