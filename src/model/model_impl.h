/* Internals of the Qwen2 decoder: the parameter table, the model struct and the context.
 *
 * The parameter table lists every tensor once (HF name, shape, where it lives); it drives loading, random
 * initialisation, saving and parameter counting, so no pass repeats per-layer pointer arithmetic. Matrices stay in
 * their stored dtype (caprl_weight); vectors (norm weights, q/k/v biases) are kept as f32 copies. */
#ifndef CAPRL_MODEL_IMPL_H
#define CAPRL_MODEL_IMPL_H

#include "backend/backend.h"
#include "caprl/model.h"
#include "caprl/safetensors.h"
#include "core/arena_impl.h"

#define CAPRL_PARAM_NAME_CAP 96

typedef struct layer_weights {
    caprl_weight q, k, v, o;      /* (Hq*D, C) (Hkv*D, C) (Hkv*D, C) (C, Hq*D) */
    caprl_weight gate, up, down;  /* (F, C) (F, C) (C, F) */
    float       *q_bias;          /* (Hq*D) */
    float       *k_bias;          /* (Hkv*D) */
    float       *v_bias;          /* (Hkv*D) */
    float       *input_norm;      /* (C) */
    float       *post_attn_norm;  /* (C) */
} layer_weights;

typedef enum param_kind { PARAM_MATRIX, PARAM_VECTOR } param_kind;

typedef struct param_desc {
    char       name[CAPRL_PARAM_NAME_CAP];
    param_kind kind;
    int64_t    shape[2];   /* (rows, cols) for matrices; (n, 1) for vectors */
    caprl_weight *matrix;  /* PARAM_MATRIX */
    float      **vector;   /* PARAM_VECTOR: points at the f32 copy pointer */
    int32_t    *vector_dtype; /* dtype the vector was stored in (for saving) */
} param_desc;

struct caprl_model {
    caprl_text_config       cfg;
    caprl_generation_config gen;
    int32_t                 dtype; /* dtype of the embedding (the checkpoint's weight dtype) */

    caprl_weight   embed;     /* (V, C) */
    caprl_weight   lm_head;   /* (V, C); shares embed's data when tied */
    bool           tied;
    float         *final_norm; /* (C) */
    layer_weights *layers;     /* (L) */
    int32_t       *vector_dtypes; /* per vector param, in table order */

    param_desc *params;
    int32_t     n_params;
    const char *text_prefix; /* "model." or, in re-saved Qwen2.5-VL checkpoints, "model.language_model." */

    caprl_safetensors *st;        /* keeps the mapped checkpoint alive; NULL for random init */
    void              *owned;     /* matrices not backed by the mapping (random init, F16 widened) */
    float             *vectors;   /* all f32 vector copies, one block */
    float             *inv_freq;  /* (D/2) RoPE inverse frequencies */
    caprl_backend     *be;
    caprl_tokenizer   *tok;
    char              *tokenizer_path; /* the tokenizer.json tok came from (copied by caprl_model_save) */
    char              *load_dir;       /* the checkpoint directory it was loaded from (NULL: built in memory) */

    /* Training (src/train): once bound, every parameter lives in a flat f32 block owned by a trainer (or, after
     * the trainer is freed, by the model: train_block). */
    int32_t  *stored_dtypes; /* (n_params) dtype each tensor had before the first bind: what a save writes */
    int32_t  *file_dtypes;   /* (n_params) dtype in the checkpoint it was loaded from (F16 matrices are widened to
                              * F32 in memory and written back as F16); NULL when built in memory */
    int64_t  *train_offset;  /* (n_params) first element of each tensor in the flat layout; NULL until bound */
    float    *train_flat;    /* the f32 masters */
    uint16_t *train_bf16;    /* bf16 copies the matrices point at (mixed precision), or NULL */
    void     *train_block;   /* adopted from a freed trainer (caprl_aligned_free) */
};

/* Activations and KV cache for up to n_seq_max sequences; planned and reserved once at init. */
struct caprl_context {
    caprl_model         *m;
    caprl_context_params p;
    caprl_arena          arena;

    float   *k_cache;  /* (L, S, T, Hkv*D) keys after RoPE */
    float   *v_cache;  /* (L, S, T, Hkv*D) */
    int32_t *seq_len;  /* (S) */

    /* activations for up to M = n_batch_max tokens */
    float   *x;      /* (M, C) residual stream */
    float   *xn;     /* (M, C) normed input of a sub-block */
    float   *tmp;    /* (M, C) sub-block output before the residual add */
    float   *q;      /* (M, Hq*D) */
    float   *k;      /* (M, Hkv*D) */
    float   *v;      /* (M, Hkv*D) */
    float   *att;    /* (M, Hq*D) */
    float   *gate;   /* (M, F) */
    float   *up;     /* (M, F) */
    float   *hsel;   /* (R, C) final hidden rows whose logits were asked for */
    float   *logits; /* (R, V) */
    int32_t *pos;    /* (M) position of each token in its sequence */
    int64_t *kv_row0; /* (M) first cache row of the token's sequence */
    int32_t *kv_len;  /* (M) keys visible to the token (causal) */
    int32_t *logit_rows; /* (R) batch index of each logits row */
    int32_t *batch_count; /* (S) scratch: tokens per sequence in the current batch */
    int32_t *rope_delta;  /* (S) M-RoPE: position = cache index + delta for tokens without explicit positions */
    int32_t *pos3;        /* (3, M) M-RoPE position ids of the batch (VL models) */
    int32_t  n_logits;
};

/* Builds the parameter table for m->cfg (allocates m->params; pointers into m's fields). */
void model_build_param_table(caprl_model *m);

/* ---- training (src/train) ------------------------------------------------------------------------------- *
 * The flat layout of the text parameters: the table's tensors back to back in table order, each starting on a
 * multiple of CAPRL_TRAIN_ALIGN elements (the gaps stay zero). */
#define CAPRL_TRAIN_ALIGN 16

/* Elements of the layout; offsets (n_params, may be NULL) receives each tensor's first element. */
int64_t      model_train_layout(const caprl_model *m, int64_t *offsets);
/* Copies every parameter's current value (exactly, as f32) into flat at its layout offset and re-points the
 * model there: vectors at flat; matrices at flat (F32) or, with bf16 != NULL, at bf16 (same offsets, BF16,
 * refreshed by model_train_sync). The first bind records the stored dtypes for caprl_model_save; the storage the
 * weights came from (mapping, owned copies) is released. The caller frees a previous train_block afterwards. */
caprl_status model_train_bind(caprl_model *m, float *flat, uint16_t *bf16, caprl_error *err);
/* After the flat values changed: rounds the bf16 copies (nearest even) and re-prepares packed weights. */
caprl_status model_train_sync(caprl_model *m, caprl_error *err);
/* The second half of model_train_sync alone, for callers that wrote the bf16 copies themselves (the optimizer
 * step): re-prepares the packed weights from the current storage. */
caprl_status model_train_refresh_packed(caprl_model *m, caprl_error *err);

#endif /* CAPRL_MODEL_IMPL_H */
