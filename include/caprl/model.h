/* Qwen2 / Qwen2.5 decoder-only language models from Hugging Face checkpoint directories.
 *
 * Usage: tools/caprl/generate.c. A caprl_model holds the weights (in their stored dtype: bf16 stays bf16) and is
 * immutable after load; a caprl_context holds the KV cache and activations for up to n_seq_max sequences and is
 * single-threaded (its ops use the model's thread pool). Memory is planned at context init from the limits in
 * caprl_context_params; decoding never allocates. */
#ifndef CAPRL_MODEL_H
#define CAPRL_MODEL_H

#include "caprl/caprl.h"
#include "caprl/tokenizer.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CAPRL_MAX_EOS 8

/* config.json of a Qwen2 text model (or the text part of a VL model). */
typedef struct caprl_text_config {
    int32_t vocab_size;
    int32_t hidden_size;
    int32_t intermediate_size;
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim; /* hidden_size / n_heads unless config.json says otherwise */
    int32_t max_position_embeddings;
    float   rms_norm_eps;
    double  rope_theta;
    bool    tie_word_embeddings;
    int32_t bos_token_id; /* -1 if absent */
    int32_t eos_token_id; /* -1 if absent; the first of eos_ids */
    int32_t eos_ids[CAPRL_MAX_EOS]; /* the whole eos_token_id of config.json (an id or a list) */
    int32_t n_eos;
    int32_t torch_dtype;  /* CAPRL_DTYPE_* named by torch_dtype/dtype, -1 if absent */
    /* Qwen2.5-VL (model_type "qwen2_5_vl") only; zero / -1 for Qwen2. */
    bool    is_vl;
    int32_t n_mrope_sections;  /* entries of mrope_section (M-RoPE: t, h, w), summing to head_dim / 2 */
    int32_t mrope_section[4];
    int32_t image_token_id;        /* <|image_pad|> */
    int32_t vision_start_token_id; /* <|vision_start|> */
    int32_t vision_end_token_id;   /* <|vision_end|> */
    int32_t video_token_id;        /* <|video_pad|>, -1 if unknown (kept for transformers; caprl has no video) */
    int32_t vision_token_id;       /* <|vision_pad|>, -1 if unknown (likewise) */
} caprl_text_config;

/* generation_config.json (Hugging Face defaults where a field is absent). */
typedef struct caprl_generation_config {
    int32_t eos_ids[CAPRL_MAX_EOS];
    int32_t n_eos;
    bool    do_sample;          /* default false */
    float   temperature;        /* default 1.0 */
    int32_t top_k;              /* default 50 (0 = off) */
    float   top_p;              /* default 1.0 */
    float   repetition_penalty; /* default 1.0 */
    int32_t max_new_tokens;     /* -1 if absent */
} caprl_generation_config;

/* Parses config.json (top-level or nested "text_config"); unknown architectures and absurd values (zero heads,
 * heads not dividing hidden size, ...) are errors that name the field. */
CAPRL_API caprl_status caprl_text_config_parse(caprl_text_config *cfg, const char *json, size_t n, const char *name,
                                               caprl_error *err);
CAPRL_API caprl_status caprl_text_config_load(caprl_text_config *cfg, const char *path, caprl_error *err);
/* Writes config.json for cfg (a Qwen2ForCausalLM config), dtype the stored weight dtype. *out: caprl_free. */
CAPRL_API caprl_status caprl_text_config_to_json(const caprl_text_config *cfg, int32_t dtype, char **out,
                                                 caprl_error *err);
CAPRL_API caprl_generation_config caprl_generation_config_default(void);
CAPRL_API caprl_status caprl_generation_config_parse(caprl_generation_config *gc, const char *json, size_t n,
                                                     const char *name, caprl_error *err);

typedef struct caprl_model caprl_model;

typedef struct caprl_model_params {
    int32_t n_threads; /* 0 = all cores */
    bool    load_tokenizer; /* load DIR/tokenizer.json if present (default true) */
} caprl_model_params;

CAPRL_API caprl_model_params caprl_model_default_params(void);

/* Loads DIR/config.json, DIR/generation_config.json (optional), the safetensors (DIR/model.safetensors or the
 * shards of DIR/model.safetensors.index.json) and DIR/tokenizer.json (optional). Every tensor is checked for
 * name, dtype and shape. F32 and BF16 weights are used as stored (mapped); F16 is widened to F32. */
CAPRL_API caprl_status caprl_model_load(caprl_model **out, const char *dir, const caprl_model_params *params,
                                        caprl_error *err);
/* A model with random weights (normal(0, std) for matrices, 1 for norm weights, small biases) in dtype
 * (CAPRL_DTYPE_F32 or CAPRL_DTYPE_BF16); deterministic in seed. For tests, benchmarks and demos. */
CAPRL_API caprl_status caprl_model_init_random(caprl_model **out, const caprl_text_config *cfg, int32_t dtype,
                                               uint64_t seed, float std, const caprl_model_params *params,
                                               caprl_error *err);
/* Writes a Hugging Face checkpoint directory: config.json, generation_config.json, model.safetensors (and
 * tokenizer.json if the model has a tokenizer). The directory is created if needed. */
CAPRL_API caprl_status caprl_model_save(const caprl_model *model, const char *dir, caprl_error *err);
CAPRL_API void         caprl_model_free(caprl_model *model); /* NULL-safe */

CAPRL_API const caprl_text_config       *caprl_model_config(const caprl_model *model);
CAPRL_API const caprl_generation_config *caprl_model_generation_config(const caprl_model *model);
/* The tokenizer loaded with the model, or NULL. Owned by the model. */
CAPRL_API const caprl_tokenizer *caprl_model_tokenizer(const caprl_model *model);
/* Loads a tokenizer.json and attaches it to the model (replacing any previous one); caprl_model_save copies
 * that file into the checkpoint. The tokenizer's size must not exceed the model's vocab_size. */
CAPRL_API caprl_status caprl_model_load_tokenizer(caprl_model *model, const char *path, caprl_error *err);
/* Stored weight dtype (CAPRL_DTYPE_F32 or CAPRL_DTYPE_BF16). */
CAPRL_API int32_t caprl_model_dtype(const caprl_model *model);
/* Parameters (tied embeddings counted once) and bytes of weights. */
CAPRL_API int64_t caprl_model_n_params(const caprl_model *model);
CAPRL_API int64_t caprl_model_weight_bytes(const caprl_model *model);
CAPRL_API int32_t caprl_model_n_threads(const caprl_model *model);

/* ---- context: KV cache and batched forward ----------------------------------------------------------------- */

typedef struct caprl_context caprl_context;

typedef struct caprl_context_params {
    int32_t n_seq_max;    /* sequences held at once (default 1) */
    int32_t n_ctx;        /* tokens per sequence (default 2048) */
    int32_t n_batch_max;  /* tokens per caprl_context_decode call (default 512) */
    int32_t n_logits_max; /* rows of logits per call (default n_batch_max) */
} caprl_context_params;

CAPRL_API caprl_context_params caprl_context_default_params(void);
CAPRL_API caprl_status caprl_context_init(caprl_context **out, caprl_model *model, const caprl_context_params *params,
                                          caprl_error *err);
CAPRL_API void         caprl_context_free(caprl_context *ctx); /* NULL-safe */
/* Bytes reserved for KV cache and activations. */
CAPRL_API size_t       caprl_context_bytes(const caprl_context *ctx);

/* A batch of tokens. Token i belongs to sequence seq_ids[i] and goes at that sequence's next position
 * (its current length); tokens of one sequence appear in order. want_logits[i] != 0 asks for its logits
 * (NULL = only the last token of each sequence in the batch). */
typedef struct caprl_batch {
    int32_t        n_tokens;
    const int32_t *tokens;
    const int32_t *seq_ids;
    const int8_t  *want_logits;
    /* Qwen2.5-VL: optional M-RoPE position ids (3, n_tokens) as t, h, w rows. NULL: every component is the token's
     * cache index plus its sequence's rope delta (caprl_context_set_rope_delta), i.e. ordinary RoPE. */
    const int32_t *mrope_pos;
    /* Optional embedding rows that replace token embeddings (image features spliced at <|image_pad|>): token i
     * takes row embd_row[i] of embd (n_embd, hidden_size) when embd_row[i] >= 0. */
    const float   *embd;
    int32_t        n_embd;
    const int32_t *embd_row;
} caprl_batch;

/* Runs the decoder on the batch, appending K/V to each sequence's cache. Errors (not aborts) for out-of-range
 * tokens, sequences, or limits, naming the limit. On error no sequence's cache changes. */
CAPRL_API caprl_status caprl_context_decode(caprl_context *ctx, const caprl_batch *batch, caprl_error *err);
/* Logits (vocab_size floats) of the k-th requested row of the last decode call (in batch order), or NULL. */
CAPRL_API const float *caprl_context_logits(const caprl_context *ctx, int32_t k);
CAPRL_API int32_t      caprl_context_n_logits(const caprl_context *ctx);
/* Current length (tokens in cache) of a sequence. */
CAPRL_API int32_t      caprl_context_seq_len(const caprl_context *ctx, int32_t seq);
/* Empties one sequence (seq >= 0) or all (seq < 0). */
CAPRL_API void         caprl_context_seq_clear(caprl_context *ctx, int32_t seq);
/* Qwen2.5-VL: positions of later tokens of seq are cache index + delta (HF's rope_deltas); default 0. */
CAPRL_API void         caprl_context_set_rope_delta(caprl_context *ctx, int32_t seq, int32_t delta);
/* Copies the cache (and rope delta) of src into dst (dst's previous content is dropped). */
CAPRL_API caprl_status caprl_context_seq_copy(caprl_context *ctx, int32_t src, int32_t dst, caprl_error *err);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_MODEL_H */
