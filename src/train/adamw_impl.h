/* Internals of the optimizer (caprl/train.h) shared with the checkpoint writer: where each trainable tensor's
 * AdamW moments live and how many updates were applied. */
#ifndef CAPRL_ADAMW_IMPL_H
#define CAPRL_ADAMW_IMPL_H

#include "caprl/train.h"

/* A fixed slice of one tensor: the unit of parallel work and of the grad-norm partial sums. Slices depend only on
 * the tensor table, never on the thread count, so every sum is taken in the same order. */
typedef struct adamw_chunk {
    int64_t off;  /* first element in the flat parameter / gradient buffers */
    int64_t moff; /* first element in the moment buffers */
    int64_t n;
} adamw_chunk;

struct caprl_adamw {
    caprl_trainer     *tr;
    caprl_adamw_params p;
    int64_t            t;         /* updates applied (skipped steps do not count) */
    int64_t           *moff;      /* (n_tensors) offset of each tensor's moments, -1 for a frozen tensor */
    int64_t            n_moments; /* elements of m and v */
    float             *m;         /* (n_moments) first moments, tensor after tensor */
    float             *v;         /* (n_moments) second moments */
    adamw_chunk       *chunks;    /* (n_chunks) trainable elements in tensor order */
    int64_t            n_chunks;
    double            *partial;   /* (n_chunks) sum of squares per chunk */
};

/* True when tensor i of the trainer is trained (its group is not frozen). */
bool adamw_tensor_trained(const caprl_adamw *opt, int32_t i);

#endif /* CAPRL_ADAMW_IMPL_H */
