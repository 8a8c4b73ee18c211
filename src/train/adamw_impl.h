/* Internals of the optimizer (caprl/train.h) shared with the checkpoint writer: where each trainable tensor's
 * AdamW moments live and how many updates were applied; and the step's kernels, exposed so that tests can run
 * every ISA level on the same data. */
#ifndef CAPRL_ADAMW_IMPL_H
#define CAPRL_ADAMW_IMPL_H

#include "caprl/train.h"

/* A fixed slice of one tensor: the unit of parallel work and of the grad-norm partial sums. Slices depend only on
 * the tensor table, never on the thread count, so every sum is taken in the same order. */
typedef struct adamw_chunk {
    int64_t off;  /* first element in the flat parameter / gradient buffers */
    int64_t moff; /* first element in the moment buffers */
    int64_t n;
    bool    decay; /* weight decay applies (not to biases and norm weights) */
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
    int32_t            isa;       /* CAPRL_ISA_* level of the kernels (adamw_best_isa() at init; tests lower it) */
};

/* True when tensor i of the trainer is trained (its group is not frozen). */
bool adamw_tensor_trained(const caprl_adamw *opt, int32_t i);

/* ---- the step's kernels ----------------------------------------------------------------------------------- *
 * Every ISA level (CAPRL_ISA_SCALAR and _AVX2 of ops/ops_impl.h) computes each element with the same IEEE
 * operations in the same order (no fused multiply-adds: adamw.c is compiled with -ffp-contract=off), and each sum of
 * squares in element order, so every level, like every thread count, gives the same bytes. */

/* The constants of one update, as torch forms them: Python floats rounded once to the tensor's dtype. */
typedef struct adamw_consts {
    float grad_scale; /* the caller's gradient multiplier, applied first (skipped when 1) */
    float clip;       /* the multiplier from clipping, applied second (skipped unless do_clip) */
    bool  do_clip;
    float decay;      /* 1 - lr * weight_decay */
    float one_m_b1;   /* 1 - beta1 (lerp weight) */
    float beta2;
    float one_m_b2;   /* 1 - beta2 */
    float step_size;  /* lr / (1 - beta1^t) */
    float bc2_sqrt;   /* sqrt(1 - beta2^t) */
    float eps;
} adamw_consts;

/* The widest level this machine runs. */
int32_t adamw_best_isa(void);
/* out[k] = the sum over j = 0, 1, ..., n[k] - 1, in that order and in double, of x * x with x = (double)g[k][j]
 * (times grad_scale, in float, first when grad_scale != 1), for k < count. A level the machine lacks runs as the
 * widest one it has (here and in adamw_update). */
void adamw_sumsq(int32_t isa, float grad_scale, const float *const *g, const int64_t *n, int32_t count,
                 double *out);
/* One AdamW update of n elements (p, g, m, v; g is only read), and the bf16 copy (nearest even) of each new p into
 * shadow when it is not NULL. */
void adamw_update(int32_t isa, const adamw_consts *k, float *p, const float *g, float *m, float *v, uint16_t *shadow,
                  int64_t n);

#endif /* CAPRL_ADAMW_IMPL_H */
