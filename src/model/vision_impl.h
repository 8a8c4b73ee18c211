/* Internals of the Qwen2.5-VL vision tower: the parameter table, the tower struct and the window ordering shared
 * by the encoder (vision_encode.c) and the object code (vision.c).
 *
 * The parameter table lists every tensor once (name without the "visual." prefix, stored shape, where it lives);
 * it drives loading under either naming scheme, random initialisation, saving and counting. Matrices stay in
 * their stored dtype (caprl_weight); vectors (norm weights, biases) are held as f32 copies, with their stored
 * encoding kept beside them so a save writes back exactly what was loaded. */
#ifndef CAPRL_VISION_IMPL_H
#define CAPRL_VISION_IMPL_H

#include "backend/backend.h"
#include "caprl/vision.h"

#define VISION_NAME_CAP 96
#define VISION_MAX_DIMS 5
#define VISION_RMS_EPS 1e-6f            /* hard-coded in HF's vision blocks and merger (spec/qwen.md §3.2) */
#define VISION_ROPE_THETA 10000.0f       /* VisionRotaryEmbedding default theta */
#define VISION_MAX_PATCHES (1LL << 28)  /* per encode call; keeps int32 row indices far from overflow */

typedef struct vision_block {
    float       *norm1;     /* (Cv) */
    caprl_weight qkv;       /* (3 Cv, Cv): rows Q, K, V; head h = rows h*D .. h*D+D-1 within each */
    float       *qkv_bias;  /* (3 Cv) */
    caprl_weight proj;      /* (Cv, Cv) */
    float       *proj_bias; /* (Cv) */
    float       *norm2;     /* (Cv) */
    caprl_weight gate;      /* (Fv, Cv) */
    float       *gate_bias; /* (Fv) */
    caprl_weight up;        /* (Fv, Cv) */
    float       *up_bias;   /* (Fv) */
    caprl_weight down;      /* (Cv, Fv) */
    float       *down_bias; /* (Cv) */
} vision_block;

typedef struct vision_param {
    char          name[VISION_NAME_CAP];  /* without the "visual." / "model.visual." prefix */
    char          full_name[VISION_NAME_CAP + 16]; /* with the checkpoint's prefix (vision_train_tensor) */
    int32_t       n_dims;
    int64_t       shape[VISION_MAX_DIMS]; /* as stored in safetensors */
    int64_t       offset;                 /* first element in the table-order flat layout (vision_train_bind) */
    caprl_weight *matrix;                 /* matrices: the weight (rows, cols) = (shape[0], rest) */
    float       **vector;                 /* vectors: points at the f32 copy pointer */
    int32_t       dtype;                  /* the dtype a save writes: vectors as stored, matrices as held at load */
    const void   *stored;                 /* vectors: the values in dtype, referenced when saving (before bind) */
} vision_param;

struct caprl_vision {
    caprl_vision_config cfg;
    int32_t             dtype;    /* dtype of the patch embedding (the checkpoint's weight dtype) */
    int64_t             head_dim; /* D = Cv / Hv */

    caprl_weight  patch_embed; /* (Cv, in_channels * temporal * patch * patch), Conv3d weight flattened */
    vision_block *blocks;      /* (depth) */
    float        *merger_norm; /* (Cv) ln_q */
    caprl_weight  merger_fc1;  /* (U Cv, U Cv), U = merge^2 */
    float        *merger_b1;   /* (U Cv) */
    caprl_weight  merger_fc2;  /* (out_hidden, U Cv) */
    float        *merger_b2;   /* (out_hidden) */
    bool         *fullatt;     /* (depth) block uses full (per-frame) attention */
    float        *rope_freq;   /* (D/2): the D/4 rotary frequencies, twice (h section, w section) */

    vision_param *params;
    int32_t       n_params;

    char                      prefix[16]; /* "visual." or "model.visual.", as in the checkpoint */

    /* Set by vision_train_bind (src/train/vision_train.c): the weights then live in the trainer's flat f32
     * buffer (matrices in its bf16 shadow in mixed precision), and a save converts from there. */
    const float              *train_flat;   /* (caprl_vision_n_params) table order; NULL when not bound */
    const uint16_t           *train_shadow; /* bf16 mirror of train_flat, or NULL (f32 training) */
    uint16_t                 *save_half;    /* conversions of 16-bit stored tensors at save time, or NULL */

    caprl_safetensors        *st;      /* keeps the mapped checkpoint alive; NULL for random init */
    void                     *owned;   /* matrices not backed by the mapping (random init, F16 widened) */
    float                    *vectors; /* all f32 vector copies, one block */
    uint16_t                 *half_vectors; /* stored bf16 / f16 encodings of the vectors, one block */
    caprl_backend            *be;
};

/* Validates grids against cfg (tier 1, messages name the image and the value); sets the totals. */
caprl_status vision_check_grids(const caprl_vision_config *cfg, const int32_t *grid_thw, int32_t n_images,
                                int64_t *n_patches, int64_t *n_tokens, caprl_error *err);
/* HF get_window_index for validated grids: win (n_tokens), cu (<= n_tokens + 1, duplicates removed); returns the
 * number of cu entries. */
int32_t vision_window_order(const caprl_vision_config *cfg, const int32_t *grid_thw, int32_t n_images, int32_t *win,
                            int32_t *cu);

#endif /* CAPRL_VISION_IMPL_H */
