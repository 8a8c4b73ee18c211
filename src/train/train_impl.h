/* Internals of the trainer (caprl/train.h): the flat parameter layout, the activations planned at init and the
 * decoder's training forward and backward (trainer_decoder.c) over packed sequences.
 *
 * Layout of the flat buffers (parameters, gradients, bf16 shadow): the text model's tensors in its parameter-table
 * order (model_train_layout: embed_tokens, layers 0..L-1, norm, untied lm_head), then the vision tower's block
 * (vision_train_impl.h), whose first element is a multiple of CAPRL_TRAIN_ALIGN. A tied lm_head is the embedding:
 * one tensor, whose gradient sums both uses.
 *
 * Activations: every buffer is sized for max_tokens packed tokens and carved from one arena at init. Per layer
 * the forward keeps what the backward reads (layer_acts); with recompute only the layer inputs (xs) are kept and
 * a layer's activations are recomputed, with the same kernels on the same inputs (so the gradients are
 * bit-identical), into one shared set just before its backward. */
#ifndef CAPRL_TRAIN_IMPL_H
#define CAPRL_TRAIN_IMPL_H

#include "caprl/train.h"
#include "core/arena_impl.h"
#include "model/model_impl.h"
#include "train/vision_train_impl.h"

/* What one decoder layer's backward reads. */
typedef struct layer_acts {
    float *xn1;  /* (M, C) input_layernorm output */
    float *q;    /* (M, Hq*D) after RoPE */
    float *k;    /* (M, Hkv*D) after RoPE */
    float *v;    /* (M, Hkv*D) */
    float *att;  /* (M, Hq*D) attention output (o_proj input) */
    float *lse;  /* (M, Hq) log-sum-exp of each query's scaled scores */
    float *xmid; /* (M, C) residual stream after the attention block */
    float *xn2;  /* (M, C) post_attention_layernorm output */
    float *gate; /* (M, F) gate_proj output (before SiLU); the backward turns it into its gradient */
    float *up;   /* (M, F) up_proj output; likewise */
} layer_acts;

struct caprl_trainer {
    caprl_model         *m;
    caprl_vision        *vision; /* may be NULL */
    vision_train        *vt;     /* the tower's training pass; NULL without a tower */
    caprl_trainer_params p;

    caprl_param_info *tensors; /* (n_tensors) text then vision */
    int32_t           n_tensors;
    int32_t           n_text_tensors;
    int64_t           n_params;      /* elements of the flat buffers */
    int64_t           vision_offset; /* first element of the vision block */
    int64_t           embed_offset;  /* embed_tokens (= tied lm_head) */
    int64_t           lm_head_offset;
    int64_t           final_norm_offset;
    int64_t          *layer_offset; /* (L, LAYER_TENSORS) offsets of each layer's tensors, in table order */

    void     *block;  /* one allocation: params, then (mixed precision) the bf16 shadow; the model adopts it */
    float    *params; /* (n_params) f32 masters */
    uint16_t *bf16;   /* (n_params) bf16 shadow, or NULL */
    float    *grads;  /* (n_params) */

    /* ---- activations (arena) ---- */
    caprl_arena arena;
    float      *xs;          /* (L + 1, M, C) input of each layer; xs[L] is the final norm's input */
    layer_acts *acts;        /* (L), or (1) shared with recompute */
    float      *hn;          /* (M, C) final norm output */
    float      *h;           /* (M, F) SwiGLU output (scratch, recomputed in the backward) */
    float      *tmp;         /* (M, C) sub-block output before the residual add */
    float      *dx;          /* (M, C) gradient of the residual stream */
    float      *dxn;         /* (M, C) gradient of a norm output */
    float      *dtmp;        /* (M, C) */
    float      *dh;          /* (M, F) */
    float      *datt;        /* (M, Hq*D) */
    float      *dq;          /* (M, Hq*D) */
    float      *dk;          /* (M, Hkv*D) */
    float      *dv;          /* (M, Hkv*D) */
    float      *dw_sink;     /* (max(C, ...)) norm-weight gradients of frozen tensors go here, unread */
    float      *logits;      /* (K, V) one chunk of logits, then its gradient */
    float      *hsel;        /* (K, C) the chunk's hidden rows */
    float      *dhsel;       /* (K, C) */
    float      *chunk_logp;  /* (K) */
    float      *chunk_ent;   /* (K) */
    float      *chunk_dlogp; /* (K) */
    float      *chunk_dent;  /* (K) dL/dentropy of the chunk's rows */
    float      *score_lse;   /* (M) lse of each scored row, in row order */
    int32_t    *score_row;   /* (M) scored rows (target >= 0) in order */
    int32_t    *score_tgt;   /* (M) their targets */
    int32_t    *tokens;      /* (M) copy of the batch's tokens */
    int32_t    *pos;         /* (3, M) rotary positions, one row per section */
    int64_t    *seg;         /* (max_seqs + 1) sequence boundaries */
    int32_t    *pad_row;     /* (M) rows that took image features, in order */
    float      *features;    /* (max_features, C) the tower's output for the batch */
    float      *dfeatures;   /* (max_features, C) */
    int64_t     max_features;

    /* ---- the last forward ---- */
    bool    have_forward;
    int32_t M;
    int32_t n_seg;
    int32_t n_scored;
    int32_t n_pad;        /* rows spliced from features (0 for text batches) */
    int32_t sections[4];  /* rotary sections (pairs per section) */
    int32_t n_sections;
    float   inv_temp;
};

/* Offsets of a layer's tensors within layer_offset, in the model's table order. */
enum {
    LT_INPUT_NORM,
    LT_Q,
    LT_Q_BIAS,
    LT_K,
    LT_K_BIAS,
    LT_V,
    LT_V_BIAS,
    LT_O,
    LT_POST_NORM,
    LT_GATE,
    LT_UP,
    LT_DOWN,
    LAYER_TENSORS
};

/* caprl_trainer_sync after an optimizer step that wrote the bf16 copy of every element it changed into the shadow
 * itself (adamw.c): the packed weight copies are refreshed, the rounding pass over the whole buffer is skipped. */
caprl_status trainer_sync_packed(caprl_trainer *tr, caprl_error *err);

/* The decoder's activations for tr->p and the model (trainer_decoder.c), in one fixed order: with plan != NULL
 * their sizes are added to plan; with plan NULL they are carved from tr->arena (reserved from that plan). */
void trainer_layout_activations(caprl_trainer *tr, caprl_arena_plan *plan);

#endif /* CAPRL_TRAIN_IMPL_H */
