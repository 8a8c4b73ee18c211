/* Batched generation: several prompts, n samples each, sampled with caprl_sampler and stopped on eos ids or a
 * token budget. Sample k of prompt p uses the RNG stream stream_base + id(p) * n_samples + k, where id(p) is
 * prompt_streams[p] (or p when NULL), so the tokens do not depend on thread count, batch size or which other
 * prompts share the batch. */
#ifndef CAPRL_GENERATE_H
#define CAPRL_GENERATE_H

#include "caprl/model.h"
#include "caprl/sampler.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { CAPRL_FINISH_NONE = 0, CAPRL_FINISH_EOS = 1, CAPRL_FINISH_LENGTH = 2, CAPRL_FINISH_ABORTED = 3 };

typedef struct caprl_generate_params {
    int32_t               n_samples;      /* sequences per prompt (default 1) */
    int32_t               max_new_tokens; /* default 256 */
    caprl_sampling_params sampling;
    const int32_t        *eos_ids;        /* NULL: the model's generation_config eos ids */
    int32_t               n_eos;
    uint64_t              stream_base;    /* default 0 */
    const uint64_t       *prompt_streams; /* NULL, or one stream id per prompt (e.g. the item's index in a dataset) */
} caprl_generate_params;

CAPRL_API caprl_generate_params caprl_generate_default_params(void);

/* Per-prompt extras of a Qwen2.5-VL prompt: image features spliced at the pad tokens and M-RoPE positions. */
typedef struct caprl_prompt_vision {
    const float   *embd;      /* (n_embd, hidden) image features, or NULL */
    int32_t        n_embd;
    const int32_t *embd_row;  /* (prompt_len) row of embd per token, -1 = the token's own embedding */
    const int32_t *mrope_pos; /* (3, prompt_len) t, h, w position ids, or NULL for ordinary positions */
    int32_t        rope_delta; /* generated tokens sit at cache index + rope_delta */
} caprl_prompt_vision;

/* Called for every generated token (eos tokens included) in step order; return false to stop generating
 * (caprl_generate then returns CAPRL_ERR_ABORTED). */
typedef bool (*caprl_token_fn)(int32_t prompt, int32_t sample, int32_t token, void *user_data);

/* Generates for n_prompts prompts (prompts[p] has prompt_lens[p] ids; vision may be NULL or hold one entry per
 * prompt for Qwen2.5-VL prompts). The context needs
 * n_seq_max >= n_prompts * n_samples and n_ctx >= longest prompt + max_new_tokens; its caches are cleared first.
 * finish (may be NULL) receives a CAPRL_FINISH_* per sequence (p * n_samples + k); n_generated (may be NULL) the
 * number of generated tokens per sequence (eos included). */
CAPRL_API caprl_status caprl_generate(caprl_context *ctx, const int32_t *const *prompts, const int64_t *prompt_lens,
                                      int32_t n_prompts, const caprl_prompt_vision *vision,
                                      const caprl_generate_params *params, caprl_token_fn on_token,
                                      void *user_data, int32_t *finish, int32_t *n_generated, caprl_error *err);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_GENERATE_H */
