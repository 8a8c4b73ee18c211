/* The training engine: exact gradients of a Qwen2 / Qwen2.5-VL model, AdamW, LR schedules and run-directory
 * checkpoints that resume bit-exactly. SFT (tools/caprl/sft.c) and the GRPO trainer are built on it.
 *
 * Model of use:
 *   caprl_trainer_init       makes the model trainable: every parameter (text decoder, and the vision tower when
 *                            one is given) moves into one flat f32 buffer in a fixed order (the "parameter
 *                            layout"), and the model's weights point into it (or into a bf16 shadow of it in
 *                            mixed precision), so caprl_context / caprl_vl_generate sample from the current
 *                            weights without copies. Gradients live in a second flat f32 buffer, same layout.
 *   caprl_trainer_forward    runs one micro-batch of packed sequences and returns log p(target) (and the entropy)
 *                            at every position that has a target; activations are kept for the backward.
 *   caprl_trainer_backward   takes dL/dlogp per position and accumulates the gradients. SFT passes -1/n_tokens at
 *                            the assistant tokens; the RL losses pass their own per-token coefficients, so one
 *                            fused, vocabulary-chunked log-softmax serves both and no [tokens, vocab] tensor
 *                            exists for a whole batch.
 *   caprl_adamw_step         updates the flat parameters (frozen groups skipped) and, in mixed precision, their
 *                            bf16 shadows in the same pass, then refreshes the packed copies the forward reads.
 *                            After changing the f32 parameters by other means, call caprl_trainer_sync.
 * Memory is planned at init from caprl_trainer_params; forward / backward / step never allocate.
 * Everything is bit-identical at any thread count. */
#ifndef CAPRL_TRAIN_H
#define CAPRL_TRAIN_H

#include "caprl/caprl.h"
#include "caprl/model.h"
#include "caprl/vision.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Parameter groups (bit flags), for freezing and reporting. */
enum {
    CAPRL_GROUP_EMBED  = 1, /* embed_tokens (and the tied lm_head) */
    CAPRL_GROUP_TEXT   = 2, /* decoder layers, final norm, untied lm_head */
    CAPRL_GROUP_VISION = 4, /* visual.*: patch embedding, blocks, merger */
};

typedef struct caprl_param_info {
    const char *name;  /* the checkpoint's own tensor name, e.g. "model.layers.0.self_attn.q_proj.weight" */
    int64_t     offset; /* first element in the flat buffers */
    int64_t     numel;
    int32_t     n_dims;
    int64_t     shape[5]; /* as stored in safetensors (n_dims entries; vectors have n_dims 1) */
    int32_t     group;  /* CAPRL_GROUP_* */
} caprl_param_info;

enum { CAPRL_PRECISION_F32 = 0, CAPRL_PRECISION_BF16 = 1 };

typedef struct caprl_trainer_params {
    int32_t max_tokens;    /* tokens per micro-batch (all packed sequences together); default 2048 */
    int32_t max_seqs;      /* sequences per micro-batch; default 64 */
    int64_t max_patches;   /* VL: vision patches per micro-batch (before merging); default 16384 */
    int32_t logits_chunk;  /* rows of [rows, vocab] logits materialised at once; default 256 */
    bool    recompute;     /* keep only each layer's input and recompute the rest in the backward */
    int32_t precision;     /* CAPRL_PRECISION_*: bf16 = bf16 matmul operands, f32 masters and gradients */
    int32_t frozen_groups; /* CAPRL_GROUP_* bits that get no gradient (backward stops at them) */
} caprl_trainer_params;

CAPRL_API caprl_trainer_params caprl_trainer_default_params(void);

typedef struct caprl_trainer caprl_trainer;

/* Takes over model (and vision, may be NULL; required for image batches) for training. They stay owned by the
 * caller and must outlive the trainer; their weights are replaced by the trainable copies (exact f32 widenings of
 * the loaded values; caprl_model_save / caprl_vl_model_save still write every tensor in its stored dtype, from
 * the masters). Planning errors name the limit (CAPRL_ERR_INVALID_ARG) or the size (CAPRL_ERR_OOM).
 * caprl_trainer_free leaves the model running on the trained values: it adopts the block that holds them,
 * the tower's included, so a tower must not be used after its model is freed. A later trainer on the same model
 * starts from those values. */
CAPRL_API caprl_status caprl_trainer_init(caprl_trainer **out, caprl_model *model, caprl_vision *vision,
                                          const caprl_trainer_params *params, caprl_error *err);
CAPRL_API void         caprl_trainer_free(caprl_trainer *tr); /* NULL-safe */

CAPRL_API int32_t                 caprl_trainer_n_tensors(const caprl_trainer *tr);
CAPRL_API const caprl_param_info *caprl_trainer_tensor(const caprl_trainer *tr, int32_t i);
/* Elements of the flat buffers: every tensor's numel, plus zero gaps that align each text tensor's start. */
CAPRL_API int64_t                 caprl_trainer_n_params(const caprl_trainer *tr);
CAPRL_API float                  *caprl_trainer_params_f32(caprl_trainer *tr);     /* flat master weights */
CAPRL_API float                  *caprl_trainer_grads(caprl_trainer *tr);          /* flat gradients */
CAPRL_API void                    caprl_trainer_zero_grads(caprl_trainer *tr);
/* After the flat parameters changed (optimizer step, checkpoint restore): refresh bf16 shadows and packed copies. */
CAPRL_API caprl_status            caprl_trainer_sync(caprl_trainer *tr, caprl_error *err);
/* Bytes planned at init: everything (parameters, gradients, bf16 shadow, activations, scratch), and the
 * activations and scratch alone (the part recompute shrinks: from L layers' saved activations to one). */
CAPRL_API size_t                  caprl_trainer_bytes(const caprl_trainer *tr);
CAPRL_API size_t                  caprl_trainer_activation_bytes(const caprl_trainer *tr);

/* One micro-batch: n_seqs sequences packed back to back. Sequence s is tokens[seq_start[s] .. seq_start[s+1]),
 * attending causally within itself only. target[t] is the token whose log-probability is scored at position t
 * (normally tokens[t + 1] of the same sequence), or negative (-1) for no score there. */
typedef struct caprl_train_batch {
    int32_t        n_tokens;
    const int32_t *tokens;    /* (n_tokens) */
    int32_t        n_seqs;
    const int32_t *seq_start; /* (n_seqs + 1), seq_start[0] = 0, seq_start[n_seqs] = n_tokens */
    const int32_t *target;    /* (n_tokens) */
    /* Qwen2.5-VL images (n_images = 0 for text): pixel_values (n_patches, patch_dim) of all images concatenated,
     * grid_thw (n_images, 3); the tokens hold each image's expanded <|image_pad|> run: the k-th <|image_pad|> of
     * the batch takes the k-th merged feature row (their counts must match); mrope_pos (3, n_tokens) are the
     * M-RoPE positions (caprl_vl_prompt_init per sequence). NULL mrope_pos = positions 0.. within each sequence
     * (ordinary RoPE). */
    int32_t        n_images;
    const float   *pixel_values;
    const int32_t *grid_thw;
    const int32_t *mrope_pos;
} caprl_train_batch;

/* Forward pass. logp (n_tokens): log p(target[t] | tokens before t) with logits divided by temperature
 * (1 for SFT; the sampling temperature for RL), 0 where target < 0. entropy (n_tokens, may be NULL): entropy of
 * that distribution (caprl_trainer_backward_entropy takes its gradient). Errors (CAPRL_ERR_INVALID_ARG) name
 * the limit or the bad token; a failed forward leaves nothing for the backward. */
CAPRL_API caprl_status caprl_trainer_forward(caprl_trainer *tr, const caprl_train_batch *batch, float temperature,
                                             float *logp, float *entropy, caprl_error *err);
/* Backward of the last forward, once (it consumes the saved activations): dlogp (n_tokens) = dL/dlogp[t] (read
 * where target >= 0 only); gradients are added (+=) to caprl_trainer_grads, so micro-batches accumulate until
 * caprl_trainer_zero_grads. Frozen groups get nothing and cost nothing. Without a forward: CAPRL_ERR_INVALID_ARG. */
CAPRL_API caprl_status caprl_trainer_backward(caprl_trainer *tr, const float *dlogp, caprl_error *err);
/* The same with dL/dentropy[t] too (dentropy (n_tokens), may be NULL; read where target >= 0): the gradient of a
 * loss term on the entropy that caprl_trainer_forward reports, as RL's entropy bonus -c * H. */
CAPRL_API caprl_status caprl_trainer_backward_entropy(caprl_trainer *tr, const float *dlogp, const float *dentropy,
                                                      caprl_error *err);

/* ---- optimizer ----------------------------------------------------------------------------------------- */

typedef struct caprl_adamw_params {
    float lr;           /* peak learning rate */
    float beta1, beta2; /* default 0.9, 0.95 */
    float eps;          /* default 1e-8 */
    float weight_decay; /* decoupled, on every tensor caprl_adamw_decays names; default 0 */
    float max_grad_norm; /* global clip; <= 0 = off; default 1.0 */
    int32_t warmup_steps;  /* linear from 0 */
    int32_t total_steps;   /* schedule horizon */
    int32_t schedule;      /* CAPRL_LR_* */
    float   min_lr_ratio;  /* cosine floor as a fraction of lr; default 0.1 */
} caprl_adamw_params;

enum { CAPRL_LR_CONSTANT = 0, CAPRL_LR_COSINE = 1 };

CAPRL_API caprl_adamw_params caprl_adamw_default_params(void);
/* Learning rate at optimizer step `step` (0-based): warmup (step + 1) / warmup * lr, then constant or cosine to
 * min_lr_ratio * lr at total_steps. */
CAPRL_API float caprl_lr_at(const caprl_adamw_params *p, int64_t step);

typedef struct caprl_adamw caprl_adamw;
/* Moments for the tensors of tr whose group is not frozen. */
CAPRL_API caprl_status caprl_adamw_init(caprl_adamw **out, caprl_trainer *tr, const caprl_adamw_params *p,
                                        caprl_error *err);
CAPRL_API void         caprl_adamw_free(caprl_adamw *opt);

typedef struct caprl_step_info {
    float   lr;
    float   grad_norm; /* before clipping */
    bool    skipped;   /* non-finite gradient norm: nothing was applied */
    int64_t step;      /* optimizer steps taken so far (after this one) */
} caprl_step_info;

/* Scales the gradients by grad_scale (token-count normalisation of accumulated micro-batches), clips, applies
 * AdamW with bias correction to every trainable tensor, zeroes the gradients and syncs the trainer. A non-finite
 * norm skips the update (info->skipped) and still zeroes the gradients. */
CAPRL_API caprl_status caprl_adamw_step(caprl_adamw *opt, float grad_scale, caprl_step_info *info, caprl_error *err);
CAPRL_API int64_t      caprl_adamw_steps(const caprl_adamw *opt);
/* Whether weight decay applies to the tensor of this name: not to biases and norm weights (names holding "bias",
 * "layer_norm.weight", "layernorm.weight", "norm.weight" or "ln_f.weight", OpenRLHF's list). */
CAPRL_API bool caprl_adamw_decays(const char *name);

/* ---- checkpoints ------------------------------------------------------------------------------------------ *
 * RUN/step-N/ is a Hugging Face checkpoint directory in the model's stored dtype (config.json,
 * generation_config.json, model.safetensors, tokenizer.json, preprocessor_config.json for VL models; loadable by
 * `caprl generate --model RUN/step-N` and by transformers) plus the training state beside it:
 * training_state.safetensors (f32 master weights, AdamW moments, each under the tensor's own name with a
 * "master." / "adam_m." / "adam_v." prefix) and training_state.json (step, optimizer step, the caller's state:
 * RNG states, data cursor). It is written as RUN/.step-N.tmp/, every file fsync'd, then renamed and the run
 * directory fsync'd: a step-N/ that exists is complete. */

/* extra_json: a JSON object (text) with the caller's state, stored as "user" in state.json; may be NULL. */
CAPRL_API caprl_status caprl_checkpoint_save(const char *run_dir, int64_t step, caprl_trainer *tr, caprl_adamw *opt,
                                             const char *extra_json, caprl_error *err);
/* The largest N with a complete RUN/step-N/, or -1 when there is none. Incomplete temporaries are ignored. */
CAPRL_API int64_t      caprl_checkpoint_latest(const char *run_dir);
/* Keeps the newest `keep` complete checkpoints of run_dir (keep < 1: all). Each removed one is first renamed out of
 * the step-N namespace, so a kill half-way never leaves a partial step-N that a resume would trust. */
CAPRL_API caprl_status caprl_checkpoint_prune(const char *run_dir, int32_t keep, caprl_error *err);
/* Removes what a killed run may leave: checkpoint temporaries (.step-N.tmp) and half-pruned checkpoints. */
CAPRL_API void         caprl_checkpoint_clean(const char *run_dir);
/* Restores masters and moments from RUN/step-N (layout and names must match tr), syncs, and returns the caller's
 * state object as text in *extra_json (caprl_free; "{}" when absent). */
CAPRL_API caprl_status caprl_checkpoint_load(const char *run_dir, int64_t step, caprl_trainer *tr, caprl_adamw *opt,
                                             char **extra_json, caprl_error *err);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_TRAIN_H */
