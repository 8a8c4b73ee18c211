/* Supervised fine-tuning data: chat records in JSON Lines, rendered with the Qwen ChatML template and tokenized
 * once at load, the loss mask on the assistant tokens, a shuffled record order per epoch and packing of records
 * into the micro-batches that caprl_trainer_forward takes. Usage: tools/caprl/sft.c; the format is in
 * docs/formats.md ("SFT data").
 *
 * Everything here is a pure function of the file, the model's tokenizer and config, and the seed: the same inputs
 * give the same token streams, orders and packings on any machine and thread count (resumed runs rely on it).
 * Thread safety: a loaded caprl_sft_data is immutable and may be shared; a caprl_sft_batch is single-threaded. */
#ifndef CAPRL_DATA_H
#define CAPRL_DATA_H

#include "caprl/caprl.h"
#include "caprl/image.h"
#include "caprl/model.h"
#include "caprl/train.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct caprl_sft_params {
    int32_t     max_seq_len; /* tokens of a rendered record (image tokens included); default 2048 */
    bool        skip_bad;    /* malformed or too long records are skipped with a warning instead of an error */
    const char *system;      /* system turn of records without one; NULL: the template's default (Qwen2.5 or
                              * Qwen2.5-VL, by the model) */
    /* Qwen2.5-VL models: how "image" files are decoded and preprocessed (defaults: pipeline B, Qwen2.5-VL's
     * processor values). Ignored for text models, where a record with an image is malformed. */
    caprl_image_decode_params decode;
    caprl_preprocess_config   pp;
} caprl_sft_params;

CAPRL_API caprl_sft_params caprl_sft_default_params(void);

typedef struct caprl_sft_data caprl_sft_data;

/* Reads path (JSON Lines, one record per non-blank line), chat records
 *   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], "image"?: "path"}
 * or raw records {"prompt": "...", "completion": "..."} (no template: the prompt's tokens, then the completion's,
 * which carry the loss; nothing is added). In chat records a system message may only come first, at least one
 * assistant message is required, and records without a system message get params->system (or the template's
 * default). A content may also be a list of typed parts ({"type": "text", "text"} joined in order, at most one
 * {"type": "image"} per record, in a user message, which places the image there; its path from the part's own
 * "image", the record's "image" or "images": [path]). "image" (VL models only) is relative to the file's folder
 * unless absolute; without an image part the image goes at the start of the first user turn. TRL's conversational
 * {"prompt": [messages], "completion": [messages]} is the two lists in turn, only the completion's replies learning. Each assistant turn's content and its <|im_end|> carry the loss; everything else is
 * context. The text before each assistant reply (ending "<|im_start|>assistant\n") and each reply are tokenized
 * separately, as the model sees them at generation time. Other keys are ignored.
 * Errors name "path:line" and what is wrong (CAPRL_ERR_FORMAT; an image's own errors keep their code); with
 * params->skip_bad such records are counted, logged (the first few) and dropped. A file with no usable record is
 * CAPRL_ERR_FORMAT. The model must carry a tokenizer. *out: caprl_sft_data_free. */
CAPRL_API caprl_status caprl_sft_data_load(caprl_sft_data **out, const char *path, const caprl_model *model,
                                           const caprl_sft_params *params, caprl_error *err);
CAPRL_API void         caprl_sft_data_free(caprl_sft_data *d); /* NULL-safe */

typedef struct caprl_sft_record {
    int64_t line;      /* 1-based line in the file */
    int32_t n_tokens;  /* rendered length, the image's <|image_pad|> run expanded */
    int32_t n_loss;    /* scored tokens: those after the first that carry the loss (assistant contents and their
                        * <|im_end|>; the completion of a raw record) */
    int64_t n_patches; /* vision patches of the image (0 without one) */
} caprl_sft_record;

/* Records kept, records skipped (skip_bad), and totals over the kept ones. */
CAPRL_API int64_t caprl_sft_data_size(const caprl_sft_data *d);
CAPRL_API int64_t caprl_sft_data_n_skipped(const caprl_sft_data *d);
CAPRL_API int64_t caprl_sft_data_n_tokens(const caprl_sft_data *d);
CAPRL_API int64_t caprl_sft_data_n_loss(const caprl_sft_data *d);
/* Record i in [0, size); the pointers live as long as d. loss_mask (may be NULL): n_tokens bytes, 1 where the
 * token carries the loss. */
CAPRL_API const caprl_sft_record *caprl_sft_data_record(const caprl_sft_data *d, int64_t i);
CAPRL_API const int32_t          *caprl_sft_data_tokens(const caprl_sft_data *d, int64_t i, const uint8_t **loss_mask);

/* The record order of epoch `epoch`: a permutation of [0, size) (Fisher-Yates on the Philox stream
 * (seed, epoch)), written to order (size entries). */
CAPRL_API void caprl_sft_epoch_order(const caprl_sft_data *d, uint64_t seed, int64_t epoch, int64_t *order);

/* Packs records idx[0..n) into micro-batches within limits->max_tokens, max_seqs and max_patches: first-fit in
 * order of decreasing length (ties: position in idx). mb[k] receives the micro-batch of idx[k]; *n_mb their
 * number. A record that fits no micro-batch on its own is CAPRL_ERR_INVALID_ARG naming its line and the limit. */
CAPRL_API caprl_status caprl_sft_pack(const caprl_sft_data *d, const int64_t *idx, int32_t n,
                                      const caprl_trainer_params *limits, int32_t *mb, int32_t *n_mb,
                                      caprl_error *err);

/* A micro-batch under construction: owns its arrays and reuses them from one build to the next. */
typedef struct caprl_sft_batch caprl_sft_batch;

CAPRL_API caprl_sft_batch *caprl_sft_batch_init(void);
CAPRL_API void             caprl_sft_batch_free(caprl_sft_batch *b); /* NULL-safe */
/* Packs records idx[0..n), in that order, into one caprl_train_batch: target[t] = tokens[t + 1] where that next
 * token carries the loss, else -1. Records with images are decoded and preprocessed here (pixel_values, grid_thw
 * and the M-RoPE positions of every sequence). The returned batch points into b and is valid until the next build
 * or free; *n_loss (may be NULL) receives the number of scored positions. Errors: an image that no longer decodes
 * (named), CAPRL_ERR_OOM. */
CAPRL_API caprl_status caprl_sft_batch_build(caprl_sft_batch *b, const caprl_sft_data *d, const int64_t *idx,
                                             int32_t n, const caprl_train_batch **batch, int64_t *n_loss,
                                             caprl_error *err);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_DATA_H */
