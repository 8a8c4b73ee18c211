/* What `caprl_rl_train(..., resume = true)` checks before it touches RUN: the settings recorded in RUN/config.json
 * (rl_config.c) and the content of the input files recorded in RUN/fingerprints.json (rl_resume.c). A run resumed
 * with other settings or other inputs would continue a different run under the same name, so it is refused, with
 * one message naming what changed, before anything in RUN is written or removed. */
#ifndef CAPRL_RL_IMPL_H
#define CAPRL_RL_IMPL_H

#include "caprl/rl.h"

/* Compares the settings of the stored config (JSON text of RUN/config.json, display name `name`) with now's. Every
 * setting must be equal except out, max_steps, save_every, save_total_limit, samples_every, threads and recompute
 * (they do not change what a step computes) and the input paths policy, reader, data and reader_template (their
 * content is compared instead, caprl_rl_check_fingerprints). A difference is CAPRL_ERR_INVALID_ARG naming the key
 * with its stored and new values; a stored text that is not a valid config is CAPRL_ERR_FORMAT. */
caprl_status caprl_rl_config_check_resume(const caprl_rl_config *now, const char *stored, size_t n,
                                          const char *name, caprl_error *err);

/* The inputs whose content a run depends on, each with a SHA-256 fingerprint (64 hex digits):
 *   data             the QA file's bytes;
 *   policy, reader   the checkpoint directory: for each of its *.json and *.safetensors files (sorted by name,
 *                    training_state.* left out) the name, the size and the bytes, all of them up to 4 MiB and
 *                    beyond that the first and last MiB and 64 evenly spaced 64 KiB blocks (any change of the
 *                    weights that training makes shows in such a sample, and a 15 GB reader costs a few MB of reads);
 *   reader_template  the template file's bytes, or nothing (hex "") when the built-in prompt is used.
 * The images the QA file names are not part of it. */
#define CAPRL_RL_N_INPUTS 4

typedef struct caprl_rl_fingerprints {
    char hex[CAPRL_RL_N_INPUTS][65];
} caprl_rl_fingerprints;

caprl_status caprl_rl_fingerprints_compute(const caprl_rl_config *cfg, caprl_rl_fingerprints *fp, caprl_error *err);
/* RUN/fingerprints.json: {"data": {"path": ..., "sha256": ...}, ..., "reader_template": null | {...}}; caller
 * frees. */
char *caprl_rl_fingerprints_json(const caprl_rl_config *cfg, const caprl_rl_fingerprints *fp);
/* Compares fp with the stored RUN/fingerprints.json (text, display name `name`): a different input is
 * CAPRL_ERR_INVALID_ARG naming the setting, the stored path and fingerprint and the new ones; a damaged file is
 * CAPRL_ERR_FORMAT. */
caprl_status caprl_rl_check_fingerprints(const caprl_rl_config *cfg, const caprl_rl_fingerprints *fp,
                                         const char *stored, size_t n, const char *name, caprl_error *err);

#endif /* CAPRL_RL_IMPL_H */
