/* Qwen2.5-VL glue between the vision tower and the text decoder (spec/qwen.md §3.9-§3.11, §5.8): the chat
 * prompt with image placeholders, expansion of <|image_pad|> to one token per merged patch, the M-RoPE position
 * ids with their rope delta (pure functions, thread-safe), and caprl_vl_generate, which runs the whole
 * image -> pixel_values -> vision tower -> spliced prompt -> sampled text path for a batch of images. */
#ifndef CAPRL_VLM_H
#define CAPRL_VLM_H

#include "caprl/caprl.h"
#include "caprl/generate.h"
#include "caprl/image.h"
#include "caprl/vision.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Qwen2.5-VL's default system prompt (chat_template.json). */
#define CAPRL_QWEN25VL_DEFAULT_SYSTEM "You are a helpful assistant."

/* One user turn holding n_images images (each "<|vision_start|><|image_pad|><|vision_end|>") followed by text,
 * then the assistant prompt, as Qwen2.5-VL's chat template renders it. system NULL: the default system turn;
 * "" : no system turn. *out: caprl_free. */
CAPRL_API caprl_status caprl_vl_render_prompt(const char *text, int32_t n_images, const char *system, char **out,
                                              caprl_error *err);

/* caprl_vl_render_prompt(prompt, 1, system) tokenized with tok (special tokens parsed): the ids of a one-image
 * request with a single <|image_pad|>, ready for caprl_vl_prompt_init. *ids is malloc'd (caprl_free). */
CAPRL_API caprl_status caprl_vl_prompt_tokens(const caprl_tokenizer *tok, const char *prompt, const char *system,
                                              int32_t **ids, int64_t *len, caprl_error *err);
/* Replaces the k-th image_token_id of ids by n_tokens[k] copies (the processor's expansion). A prompt whose pad
 * runs already have the expanded lengths is copied unchanged. Any other number of pads than n_images (or runs
 * that match neither form) is CAPRL_ERR_INVALID_ARG. *out is malloc'd (caprl_free). */
CAPRL_API caprl_status caprl_vl_expand_image_pads(const int32_t *ids, int64_t n, int32_t image_token_id,
                                                  const int64_t *n_tokens, int32_t n_images, int32_t **out,
                                                  int64_t *n_out, caprl_error *err);

/* M-RoPE position ids (HF get_rope_index, still images): pos is (3, n) as t, h, w rows. Text tokens get
 * (s, s, s) with s counting on; the k-th run of image_token_id (grid_thw[3k..3k+2] in patches, merge the
 * spatial merge size) gets (st, st + i, st + j) over its merged grid, every frame of it at time st (an image's
 * frames are not spread in time), and the next text starts at
 * st + max(grid_h, grid_w) / merge. *rope_delta = max position + 1 - n: later tokens sit at cache index + delta. */
CAPRL_API caprl_status caprl_vl_mrope_positions(const int32_t *ids, int64_t n, int32_t image_token_id,
                                                const int32_t *grid_thw, int32_t n_images, int32_t merge,
                                                int32_t *pos, int32_t *rope_delta, caprl_error *err);

/* Image features of n images from one vision-tower call: each image goes through the processor (pp), the
 * pixel_values are concatenated and encoded together (bit-identical to encoding each image alone). Fills
 * grid_thw (n, 3), in patch units, and n_tokens (n), the merged tokens (= feature rows) of each image; *features is
 * (sum of n_tokens, out_hidden_size), image after image, malloc'd (caprl_free). pp's patch, merge and temporal
 * sizes must equal the tower's (CAPRL_ERR_INVALID_ARG naming both otherwise); the processor's errors pass through.
 * Outputs are set only on success. Uses the tower's thread pool: one call per caprl_vision at a time. */
CAPRL_API caprl_status caprl_vl_encode_images(caprl_vision *vision, const caprl_preprocess_config *pp,
                                              const caprl_image *const *images, int32_t n, float **features,
                                              int32_t *grid_thw, int64_t *n_tokens, caprl_error *err);

/* A tokenized Qwen2.5-VL prompt made ready for the decoder: what caprl_batch (tokens, embd_row, mrope_pos) and
 * caprl_prompt_vision take. */
typedef struct caprl_vl_prompt {
    int32_t *ids;        /* (n) every image's <|image_pad|> run at full length */
    int64_t  n;
    int32_t *embd_row;   /* (n) first_row + k at the k-th pad token, -1 at every other token */
    int32_t *mrope_pos;  /* (3, n) t, h, w position rows */
    int32_t  rope_delta; /* later tokens sit at cache index + rope_delta */
} caprl_vl_prompt;

/* Prepares ids holding n_images images (one <|image_pad|> each or each image's expanded run, as
 * caprl_vl_expand_image_pads accepts) whose grids are grid_thw (n_images, 3) in patch units, merge the tower's
 * spatial merge size: expands the pads, numbers the feature rows from first_row (where these images' rows start in
 * a feature block that several prompts share) and computes the M-RoPE positions. Errors (CAPRL_ERR_INVALID_ARG):
 * a grid that is not whole merged tokens, pads that match neither form, rows beyond INT32_MAX. *out is zeroed on
 * failure; release it with caprl_vl_prompt_free. Pure function, thread-safe. */
CAPRL_API caprl_status caprl_vl_prompt_init(caprl_vl_prompt *out, const int32_t *ids, int64_t n,
                                            int32_t image_token_id, const int32_t *grid_thw, int32_t n_images,
                                            int32_t merge, int64_t first_row, caprl_error *err);
/* Frees the arrays of a prompt and zeroes it. NULL-safe, and safe on a zeroed struct. */
CAPRL_API void         caprl_vl_prompt_free(caprl_vl_prompt *p);

/* Writes a Qwen2.5-VL checkpoint directory: config.json (text fields, M-RoPE and "vision_config"),
 * generation_config.json, preprocessor_config.json (caprl's defaults: the Qwen2.5-VL release values), one
 * model.safetensors with the text tensors (model.*) and the tower's (visual.*), and tokenizer.json if the model has
 * one. model must be a Qwen2.5-VL text model (caprl_text_config.is_vl). */
CAPRL_API caprl_status caprl_vl_model_save(const caprl_model *model, const caprl_vision *vision, const char *dir,
                                           caprl_error *err);

/* One image and its instruction. */
typedef struct caprl_vl_request {
    const caprl_image *image;     /* decoded RGB8 */
    const char        *prompt;    /* user text after the image */
    const char        *system;    /* NULL: the default Qwen2.5-VL system turn; "": none */
    uint64_t           stream_id; /* RNG stream id of this request (prompt_streams of caprl_generate) */
} caprl_vl_request;

/* Captions n requests in one batch: preprocess each image (pp), one vision-tower call for all, prompts rendered,
 * tokenized and spliced, then caprl_generate with n_samples per request (on_token's prompt index is the request
 * index). The model must be a Qwen2.5-VL text model whose hidden size equals the tower's out_hidden_size and carry
 * a tokenizer. *ctx is reused, or (re)created when NULL or too small for this batch (freed by the caller).
 * finish / n_generated (may be NULL) have n * n_samples entries. */
CAPRL_API caprl_status caprl_vl_generate(caprl_model *model, caprl_vision *vision, const caprl_preprocess_config *pp,
                                         const caprl_vl_request *reqs, int32_t n, const caprl_generate_params *gp,
                                         caprl_context **ctx, caprl_token_fn on_token, void *user_data,
                                         int32_t *finish, int32_t *n_generated, caprl_error *err);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_VLM_H */
