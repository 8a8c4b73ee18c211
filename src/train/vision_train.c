/* Training pass of the Qwen2.5-VL vision tower (spec/qwen.md §3.4-§3.8), against the backend's training ops.
 *
 * Forward (rows in window order from the patch embedding on, as in vision_encode.c):
 *   x0 = pix_w @ Wpe^T                                       pix_w: pixel rows in window order
 *   block l: n1 = rmsnorm(x, norm1); qkv = n1 Wqkv^T + b; rope2d(q, k); o, lse = attn(q, k, v, segments)
 *            xm = x + o Wp^T + bp;  n2 = rmsnorm(xm, norm2); g = n2 Wg^T + bg; u = n2 Wu^T + bu
 *            x' = xm + silu(g) u Wd^T + bd
 *   merger:  y = rmsnorm(x, ln_q) as (T, U C); h1 = y W1^T + b1; z = gelu(h1) W2^T + b2; out[win[k]] = z[k]
 * Kept for the backward: every block input x (and the merger's h1); without recompute also each block's xm, q, k,
 * v (rotated), o, lse, g and u. The normed inputs n1, n2, y and the products silu(g) u, gelu(h1) are recomputed
 * in the backward by the same ops on the same inputs, so they are the forward's bits. With recompute a block's
 * whole forward is rerun from its saved input, which again reproduces its bits: results do not depend on
 * recompute. Every op is bit-identical at any thread count, and the copies here are plain row moves.
 *
 * Backward per block, dx = dL/dx' in window order:
 *   dWd += dx^T (silu(g) u); dh = dx Wd; dg, du = swiglu_bwd(dh); dWg += dg^T n2; dWu += du^T n2
 *   dx += rmsnorm_bwd(dg Wg + du Wu)                          (and dnorm2)
 *   dWp += dx^T o; do = dx Wp; dq, dk, dv = attn_bwd(do); rope2d^T(dq, dk)
 *   dWqkv += [dq dk dv]^T n1; dx += rmsnorm_bwd([dq dk dv] Wqkv)   (and dnorm1)
 * and finally dWpe += dx^T pix_w. Bias gradients are the column sums of the same dy. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/tensor.h"
#include "core/arena_impl.h"
#include "core/error_impl.h"
#include "core/log_impl.h"
#include "model/vision_impl.h"
#include "train/vision_train_impl.h"

/* What a block keeps between its forward and its backward (all rows in window order). */
typedef struct block_acts {
    float *x_mid; /* (N, C) residual after attention */
    float *q;     /* (N, C) rotated queries, token-major (N, H, D) */
    float *k;     /* (N, C) rotated keys */
    float *v;     /* (N, C) values */
    float *o;     /* (N, C) attention output (input of proj) */
    float *lse;   /* (N, H) log-sum-exp of each query's scores */
    float *gate;  /* (N, F) gate projection before SiLU; its gradient in the backward */
    float *up;    /* (N, F) up projection; its gradient in the backward */
} block_acts;

struct vision_train {
    caprl_vision *v;
    int64_t       max_n;      /* patches planned for */
    bool          recompute;
    int64_t       C, F, H, D, U, K0, O, depth;
    caprl_arena   arena;

    float      *pix;          /* (N, K0) pixel rows in window order */
    float     **xs;           /* (depth + 1) x (N, C): input of every block, then the merger's input */
    block_acts *acts;         /* depth sets, or one reused set with recompute */
    float      *h1;           /* (T, U C) merger fc1 output before GELU */
    float      *xn;           /* (N, C) normed input of the current sub-block */
    float      *qkv;          /* (N, 3C) fused projection; its gradient in the backward */
    float      *tmp;          /* (N, C) sub-block output / gradient scratch; gelu(h1) in the merger */
    float      *hbuf;         /* (N, F) silu(g) u, then its gradient */
    float      *dx;           /* (N, C) gradient of the residual stream */
    float      *dq, *dk, *dv; /* (N, C) each, attention gradients (dq doubles as scratch in the MLP backward) */
    float      *z;            /* (T, O) merger output in window order, then its gradient */
    int32_t    *win;          /* (T) window_index */
    int32_t    *cu;           /* (T + 1) cu_window_seqlens */
    int32_t    *perm;         /* (N) input row of each window-order row */
    int32_t    *pos;          /* (2, N) hpos then wpos of each window-order row (stride: this forward's N) */
    int32_t    *tok_pos;      /* (T, 2) merged row and column of each merged token, input order */
    int64_t    *seg_full;     /* (T + 1) frame boundaries, rows */
    int64_t    *seg_win;      /* (T + 1) window boundaries, rows */

    /* the last forward */
    int64_t N, T, n_full, n_win;
    bool    ready;            /* a forward whose backward has not run yet */
};

/* ---- parameter table ------------------------------------------------------------------------------------ */

static int64_t numel_of(const vision_param *p) {
    int64_t n = 1;
    for (int32_t d = 0; d < p->n_dims; d++) {
        n *= p->shape[d];
    }
    return n;
}

int64_t vision_train_n_params(const caprl_vision *v) {
    return caprl_vision_n_params(v);
}

int32_t vision_train_n_tensors(const caprl_vision *v) {
    return v->n_params;
}

void vision_train_tensor(const caprl_vision *v, int32_t i, caprl_param_info *info) {
    CAPRL_ASSERT(i >= 0 && i < v->n_params);
    const vision_param *p = &v->params[i];
    memset(info, 0, sizeof *info);
    info->name = p->full_name;
    info->offset = p->offset;
    info->numel = numel_of(p);
    info->n_dims = p->n_dims;
    memcpy(info->shape, p->shape, (size_t)p->n_dims * sizeof(int64_t));
    info->group = CAPRL_GROUP_VISION;
}

/* ---- binding -------------------------------------------------------------------------------------------- */

typedef struct to_bf16_task {
    uint16_t    *dst;
    const float *src;
} to_bf16_task;

enum { CONVERT_CHUNK = 1 << 16 };

static void to_bf16_range(void *ctx, int64_t c0, int64_t c1, int32_t tid) {
    (void)tid;
    const to_bf16_task *t = ctx;
    caprl_f32_to_bf16_row(t->dst + c0 * CONVERT_CHUNK, t->src + c0 * CONVERT_CHUNK,
                          (size_t)((c1 - c0) * CONVERT_CHUNK));
}

/* shadow (n) = bf16(flat), in chunks over the tower's pool (elementwise: any split gives the same bits). */
static void fill_shadow(caprl_vision *v, uint16_t *shadow, const float *flat, int64_t n) {
    to_bf16_task t = {shadow, flat};
    int64_t      full = n / CONVERT_CHUNK;
    caprl_parallel_for(v->be->pool, full, to_bf16_range, &t);
    caprl_f32_to_bf16_row(shadow + full * CONVERT_CHUNK, flat + full * CONVERT_CHUNK,
                          (size_t)(n - full * CONVERT_CHUNK));
}

static void release_packed(caprl_vision *v) {
    for (int32_t i = 0; i < v->n_params; i++) {
        if (v->params[i].matrix && v->be->ops->weight_release) {
            v->be->ops->weight_release(v->be, v->params[i].matrix);
        }
    }
}

/* Packs every matrix (repacked in place after an update). Packed copies (AMX panels of bf16 weights) only speed
 * the matmuls up; a tower that cannot get one computes with the plain kernels, so a failure is a warning, not an
 * error of the step. */
void vision_train_sync_packed(caprl_vision *v) {
    if (!v->be->ops->weight_prepare) {
        return;
    }
    for (int32_t i = 0; i < v->n_params; i++) {
        caprl_error err = {0};
        if (v->params[i].matrix && v->be->ops->weight_prepare(v->be, v->params[i].matrix, &err) != CAPRL_OK) {
            LOG_WARN("vision: %s: %s (the plain matmul kernels are used for it)", v->params[i].full_name, err.msg);
        }
    }
}

/* The current values of parameter p as f32 (before the first bind: from the loaded weights). */
static void read_param(const caprl_vision *v, const vision_param *p, float *dst) {
    int64_t n = numel_of(p);
    if (v->train_flat) {
        if (dst != v->train_flat + p->offset) {
            memmove(dst, v->train_flat + p->offset, (size_t)n * sizeof(float));
        }
    } else if (!p->matrix) {
        memcpy(dst, *p->vector, (size_t)n * sizeof(float));
    } else if (p->matrix->dtype == CAPRL_DTYPE_BF16) {
        caprl_bf16_to_f32_row(dst, p->matrix->data, (size_t)n);
    } else {
        CAPRL_ASSERT(p->matrix->dtype == CAPRL_DTYPE_F32); /* F16 was widened at load */
        memcpy(dst, p->matrix->data, (size_t)n * sizeof(float));
    }
}

void vision_train_bind(caprl_vision *v, float *flat, uint16_t *bf16_shadow) {
    for (int32_t i = 0; i < v->n_params; i++) {
        read_param(v, &v->params[i], flat + v->params[i].offset);
    }
    release_packed(v);
    int64_t n_half = 0;
    for (int32_t i = 0; i < v->n_params; i++) {
        vision_param *p = &v->params[i];
        if (p->matrix) {
            p->matrix->dtype = bf16_shadow ? CAPRL_DTYPE_BF16 : CAPRL_DTYPE_F32;
            p->matrix->backward = true;
            p->matrix->data = bf16_shadow ? (const void *)(bf16_shadow + p->offset) : (const void *)(flat + p->offset);
        } else {
            *p->vector = flat + p->offset;
            p->stored = NULL;
        }
        /* what a save must convert (caprl_vision_add_to_writer references F32 in flat and BF16 in the shadow) */
        if (p->dtype == CAPRL_DTYPE_F16 || (p->dtype == CAPRL_DTYPE_BF16 && !bf16_shadow)) {
            n_half += numel_of(p);
        }
    }
    /* The loaded weights (mapping, converted copies, vector copies) are no longer referenced. */
    caprl_safetensors_free(v->st);
    v->st = NULL;
    caprl_aligned_free(v->owned);
    v->owned = NULL;
    free(v->vectors);
    v->vectors = NULL;
    free(v->half_vectors);
    v->half_vectors = NULL;
    free(v->save_half);
    /* untouched until the first save, so mostly virtual until then */
    v->save_half = n_half ? caprl_xmalloc((size_t)n_half * sizeof(uint16_t)) : NULL;
    v->train_flat = flat;
    v->train_shadow = bf16_shadow;
    vision_train_sync(v, flat, bf16_shadow);
}

void vision_train_sync(caprl_vision *v, const float *flat, uint16_t *bf16_shadow) {
    CAPRL_ASSERT(flat == v->train_flat && bf16_shadow == v->train_shadow);
    if (bf16_shadow) {
        fill_shadow(v, bf16_shadow, flat, caprl_vision_n_params(v));
    }
    vision_train_sync_packed(v);
}

/* ---- planning ------------------------------------------------------------------------------------------- */

/* One pass over the buffers, run twice: first to size the arena (plan), then to carve it (arena). */
typedef struct carver {
    caprl_arena_plan plan;
    caprl_arena     *arena; /* NULL while planning */
} carver;

static void *take(carver *c, int64_t count, size_t esize) {
    if (!c->arena) {
        caprl_arena_plan_add(&c->plan, (size_t)count, esize);
        return NULL;
    }
    return caprl_arena_must_alloc(c->arena, (size_t)count * esize);
}

static void carve(vision_train *vt, carver *c) {
    int64_t N = vt->max_n, T = N / vt->U, C = vt->C, F = vt->F, NC = N * C;
    int64_t n_sets = vt->recompute ? 1 : vt->depth;
    vt->pix = take(c, N * vt->K0, sizeof(float));
    vt->xs = take(c, vt->depth + 1, sizeof(float *));
    for (int64_t l = 0; l <= vt->depth; l++) {
        float *x = take(c, NC, sizeof(float));
        if (c->arena) {
            vt->xs[l] = x;
        }
    }
    vt->acts = take(c, n_sets, sizeof(block_acts));
    for (int64_t s = 0; s < n_sets; s++) {
        block_acts a;
        a.x_mid = take(c, NC, sizeof(float));
        a.q = take(c, NC, sizeof(float));
        a.k = take(c, NC, sizeof(float));
        a.v = take(c, NC, sizeof(float));
        a.o = take(c, NC, sizeof(float));
        a.lse = take(c, N * vt->H, sizeof(float));
        a.gate = take(c, N * F, sizeof(float));
        a.up = take(c, N * F, sizeof(float));
        if (c->arena) {
            vt->acts[s] = a;
        }
    }
    vt->h1 = take(c, NC, sizeof(float)); /* T * U C = N C */
    vt->xn = take(c, NC, sizeof(float));
    vt->qkv = take(c, 3 * NC, sizeof(float));
    vt->tmp = take(c, NC, sizeof(float));
    vt->hbuf = take(c, N * F, sizeof(float));
    vt->dx = take(c, NC, sizeof(float));
    vt->dq = take(c, NC, sizeof(float));
    vt->dk = take(c, NC, sizeof(float));
    vt->dv = take(c, NC, sizeof(float));
    vt->z = take(c, T * vt->O, sizeof(float));
    vt->win = take(c, T, sizeof(int32_t));
    vt->cu = take(c, T + 1, sizeof(int32_t));
    vt->perm = take(c, N, sizeof(int32_t));
    vt->pos = take(c, 2 * N, sizeof(int32_t));
    vt->tok_pos = take(c, 2 * T, sizeof(int32_t));
    /* a frame holds at least U patches (h and w are multiples of the merge size), so frames <= T */
    vt->seg_full = take(c, T + 1, sizeof(int64_t));
    vt->seg_win = take(c, T + 1, sizeof(int64_t));
}

static caprl_status check_ops(const caprl_backend_ops *ops, caprl_error *err) {
    const struct {
        bool        present;
        const char *name;
    } need[] = {
        {ops->matmul_bwd_data != NULL, "matmul_bwd_data"},
        {ops->matmul_bwd_weight != NULL, "matmul_bwd_weight"},
        {ops->rmsnorm_bwd != NULL, "rmsnorm_bwd"},
        {ops->rope_sect_bwd != NULL, "rope_sect_bwd"},
        {ops->attn_train_fwd != NULL, "attn_train_fwd"},
        {ops->attn_train_bwd != NULL, "attn_train_bwd"},
        {ops->swiglu_bwd != NULL, "swiglu_bwd"},
        {ops->gelu_bwd != NULL, "gelu_bwd"},
    };
    for (size_t i = 0; i < sizeof need / sizeof need[0]; i++) {
        if (!need[i].present) {
            return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                                 "vision training: backend '%s' has no %s kernel (it cannot train the vision tower)",
                                 ops->name, need[i].name);
        }
    }
    return CAPRL_OK;
}

caprl_status vision_train_init(vision_train **out, caprl_vision *v, int64_t max_patches, bool recompute,
                               caprl_error *err) {
    const caprl_vision_config *c = &v->cfg;
    int64_t                    U = (int64_t)c->spatial_merge_size * c->spatial_merge_size;
    if (max_patches < U || max_patches > VISION_MAX_PATCHES) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "vision training: max_patches = %lld is outside [%lld, %lld] (spatial_merge_size^2 "
                             "patches make one merged token)",
                             (long long)max_patches, (long long)U, (long long)VISION_MAX_PATCHES);
    }
    CAPRL_TRY(check_ops(v->be->ops, err));
    vision_train *vt = caprl_xcalloc(1, sizeof *vt);
    vt->v = v;
    vt->max_n = max_patches / U * U; /* whole merged tokens */
    vt->recompute = recompute;
    vt->C = c->hidden_size;
    vt->F = c->intermediate_size;
    vt->H = c->num_heads;
    vt->D = v->head_dim;
    vt->U = U;
    vt->K0 = v->patch_embed.cols;
    vt->O = c->out_hidden_size;
    vt->depth = c->depth;
    carver plan = {{0, false}, NULL};
    carve(vt, &plan);
    caprl_status st = CAPRL_OK;
    if (plan.plan.overflow) {
        st = caprl_err_set(err, CAPRL_ERR_OOM,
                           "vision training: activations for %lld patches overflow the address space",
                           (long long)max_patches);
    }
    if (st == CAPRL_OK) {
        st = caprl_arena_reserve(&vt->arena, "vision training activations", plan.plan.bytes, err);
    }
    if (st != CAPRL_OK) {
        free(vt);
        return st;
    }
    carver real = {{0, false}, &vt->arena};
    carve(vt, &real);
    *out = vt;
    return CAPRL_OK;
}

void vision_train_free(vision_train *vt) {
    if (!vt) {
        return;
    }
    caprl_arena_free(&vt->arena);
    free(vt);
}

size_t vision_train_bytes(const vision_train *vt) {
    return vt->arena.cap;
}

/* ---- row moves ------------------------------------------------------------------------------------------ */

/* dst row (dst_idx ? dst_idx[r] : r) = src row (src_idx ? src_idx[r] : r), width floats each. */
typedef struct row_copy {
    float         *dst;
    const float   *src;
    int64_t        dst_stride, src_stride, width;
    const int32_t *dst_idx, *src_idx;
} row_copy;

static void row_copy_range(void *ctx, int64_t r0, int64_t r1, int32_t tid) {
    (void)tid;
    const row_copy *t = ctx;
    for (int64_t r = r0; r < r1; r++) {
        int64_t d = t->dst_idx ? t->dst_idx[r] : r, s = t->src_idx ? t->src_idx[r] : r;
        memcpy(t->dst + d * t->dst_stride, t->src + s * t->src_stride, (size_t)t->width * sizeof(float));
    }
}

static void copy_rows(const vision_train *vt, row_copy t, int64_t n_rows) {
    caprl_parallel_for(vt->v->be->pool, n_rows, row_copy_range, &t);
}

/* qkv (N, 3C) <-> q, k, v (N, C) each */
static void split_qkv(const vision_train *vt, const block_acts *a) {
    int64_t C = vt->C;
    float  *dst[3] = {a->q, a->k, a->v};
    for (int p = 0; p < 3; p++) {
        copy_rows(vt, (row_copy){dst[p], vt->qkv + p * C, C, 3 * C, C, NULL, NULL}, vt->N);
    }
}

static void join_qkv(const vision_train *vt) {
    int64_t      C = vt->C;
    const float *src[3] = {vt->dq, vt->dk, vt->dv};
    for (int p = 0; p < 3; p++) {
        copy_rows(vt, (row_copy){vt->qkv + p * C, src[p], 3 * C, C, C, NULL, NULL}, vt->N);
    }
}

/* ---- forward -------------------------------------------------------------------------------------------- */

/* Window order, patch positions in that order, and the attention segments of both kinds (as vision_encode.c). */
static void layout(vision_train *vt, const int32_t *grid_thw, int32_t n_images) {
    const caprl_vision_config *c = &vt->v->cfg;
    int32_t                    s = c->spatial_merge_size;
    int64_t                    N = vt->N, U = vt->U;
    int32_t                    n_cu = vision_window_order(c, grid_thw, n_images, vt->win, vt->cu);
    for (int64_t k = 0; k < vt->T; k++) {
        for (int64_t u = 0; u < U; u++) {
            vt->perm[k * U + u] = (int32_t)(vt->win[k] * U + u);
        }
    }
    /* merged token t Lh Lw + bh Lw + bw of a frame (raster order, §3.3) covers patches (bh s + mh, bw s + mw),
     * u = mh s + mw (§3.5); tok_pos holds (bh, bw) of every token in input order */
    int64_t tok = 0, f = 0, rows = 0;
    vt->seg_full[0] = 0;
    for (int32_t i = 0; i < n_images; i++) {
        int64_t Lh = grid_thw[3 * i + 1] / s, Lw = grid_thw[3 * i + 2] / s;
        for (int32_t t = 0; t < grid_thw[3 * i]; t++) {
            for (int64_t j = 0; j < Lh * Lw; j++, tok++) {
                vt->tok_pos[2 * tok] = (int32_t)(j / Lw);
                vt->tok_pos[2 * tok + 1] = (int32_t)(j % Lw);
            }
            rows += Lh * Lw * U;
            vt->seg_full[++f] = rows;
        }
    }
    for (int64_t k = 0; k < vt->T; k++) {
        const int32_t *tp = vt->tok_pos + 2 * (int64_t)vt->win[k];
        for (int64_t u = 0; u < U; u++) {
            vt->pos[k * U + u] = (int32_t)(tp[0] * s + u / s);
            vt->pos[N + k * U + u] = (int32_t)(tp[1] * s + u % s);
        }
    }
    vt->n_full = f;
    for (int32_t w = 0; w < n_cu; w++) {
        vt->seg_win[w] = vt->cu[w];
    }
    vt->n_win = n_cu - 1;
}

static void rope(const vision_train *vt, float *x, bool backward) {
    caprl_vision  *v = vt->v;
    const int32_t  sections[2] = {(int32_t)(vt->D / 4), (int32_t)(vt->D / 4)};
    /* q and k heads are adjacent in a qkv row: rotate them as 2H heads in one call */
    if (backward) {
        v->be->ops->rope_sect_bwd(v->be, x, 3 * vt->C, vt->pos, v->rope_freq, sections, 2, vt->N, 2 * vt->H, vt->D);
    } else {
        v->be->ops->rope_sect_fwd(v->be, x, 3 * vt->C, vt->pos, v->rope_freq, sections, 2, vt->N, 2 * vt->H, vt->D);
    }
}

static const int64_t *segs(const vision_train *vt, int32_t l, int64_t *n_seg) {
    bool full = vt->v->fullatt[l];
    *n_seg = full ? vt->n_full : vt->n_win;
    return full ? vt->seg_full : vt->seg_win;
}

static float attn_scale(const vision_train *vt) {
    return (float)(1.0 / sqrt((double)vt->D));
}

/* Block l from its input xs[l] into a; with want_out also its output xs[l + 1] (not needed when recomputing). */
static void block_forward(const vision_train *vt, int32_t l, const block_acts *a, bool want_out) {
    caprl_vision            *v = vt->v;
    caprl_backend           *be = v->be;
    const caprl_backend_ops *ops = be->ops;
    const vision_block      *b = &v->blocks[l];
    int64_t                  N = vt->N, C = vt->C, F = vt->F, n_seg = 0;
    const float             *x = vt->xs[l];
    const int64_t           *seg = segs(vt, l, &n_seg);
    ops->rmsnorm_fwd(be, vt->xn, x, b->norm1, N, C, VISION_RMS_EPS);
    ops->matmul_fwd(be, vt->qkv, vt->xn, &b->qkv, b->qkv_bias, N);
    rope(vt, vt->qkv, false);
    split_qkv(vt, a);
    ops->attn_train_fwd(be, a->o, a->lse, a->q, a->k, a->v, seg, n_seg, N, vt->H, vt->H, vt->D, attn_scale(vt),
                        false);
    ops->matmul_fwd(be, vt->tmp, a->o, &b->proj, b->proj_bias, N);
    memcpy(a->x_mid, x, (size_t)(N * C) * sizeof(float));
    ops->add_fwd(be, a->x_mid, vt->tmp, N * C);
    ops->rmsnorm_fwd(be, vt->xn, a->x_mid, b->norm2, N, C, VISION_RMS_EPS);
    ops->matmul_fwd(be, a->gate, vt->xn, &b->gate, b->gate_bias, N);
    ops->matmul_fwd(be, a->up, vt->xn, &b->up, b->up_bias, N);
    if (!want_out) {
        return;
    }
    ops->swiglu_fwd(be, vt->hbuf, a->gate, a->up, N * F);
    ops->matmul_fwd(be, vt->tmp, vt->hbuf, &b->down, b->down_bias, N);
    memcpy(vt->xs[l + 1], a->x_mid, (size_t)(N * C) * sizeof(float));
    ops->add_fwd(be, vt->xs[l + 1], vt->tmp, N * C);
}

static const block_acts *acts_of(const vision_train *vt, int32_t l) {
    return vt->recompute ? &vt->acts[0] : &vt->acts[l];
}

caprl_status vision_train_forward(vision_train *vt, const float *pixel_values, const int32_t *grid_thw,
                                  int32_t n_images, float *features, int64_t *n_features, caprl_error *err) {
    caprl_vision            *v = vt->v;
    caprl_backend           *be = v->be;
    const caprl_backend_ops *ops = be->ops;
    int64_t                  N = 0, T = 0;
    vt->ready = false;
    CAPRL_TRY(vision_check_grids(&v->cfg, grid_thw, n_images, &N, &T, err));
    if (N > vt->max_n) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "vision training: the %d image(s) have %lld patches, more than the %lld planned at init "
                             "(max_patches)",
                             (int)n_images, (long long)N, (long long)vt->max_n);
    }
    if (!pixel_values || !features) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vision training: pixel_values and features must not be NULL");
    }
    vt->N = N;
    vt->T = T;
    layout(vt, grid_thw, n_images);
    /* pixel rows in window order: the matmul's rows are independent, so this equals embedding then reordering */
    copy_rows(vt, (row_copy){vt->pix, pixel_values, vt->K0, vt->K0, vt->K0, NULL, vt->perm}, N);
    ops->matmul_fwd(be, vt->xs[0], vt->pix, &v->patch_embed, NULL, N);
    for (int32_t l = 0; l < vt->depth; l++) {
        block_forward(vt, l, acts_of(vt, l), true);
    }
    int64_t UC = vt->U * vt->C;
    ops->rmsnorm_fwd(be, vt->xn, vt->xs[vt->depth], v->merger_norm, N, vt->C, VISION_RMS_EPS);
    ops->matmul_fwd(be, vt->h1, vt->xn, &v->merger_fc1, v->merger_b1, T);
    ops->gelu_fwd(be, vt->tmp, vt->h1, T * UC);
    ops->matmul_fwd(be, vt->z, vt->tmp, &v->merger_fc2, v->merger_b2, T);
    copy_rows(vt, (row_copy){features, vt->z, vt->O, vt->O, vt->O, vt->win, NULL}, T);
    if (n_features) {
        *n_features = T;
    }
    vt->ready = true;
    return CAPRL_OK;
}

/* ---- backward ------------------------------------------------------------------------------------------- */

/* Where the gradient of the tensor held in `slot` (a caprl_weight or a vector pointer of the tower) starts. */
static float *grad_of(const vision_train *vt, float *grad_flat, const void *slot) {
    const caprl_vision *v = vt->v;
    for (int32_t i = 0; i < v->n_params; i++) {
        const vision_param *p = &v->params[i];
        if ((const void *)p->matrix == slot || (const void *)p->vector == slot) {
            return grad_flat + p->offset;
        }
    }
    caprl_abort(__FILE__, __LINE__, "vision training: a tensor missing from the parameter table");
}

/* the gradient of a tower field (a caprl_weight or a vector pointer) */
#define GRAD(field) grad_of(vt, grad_flat, (const void *)&(field))

/* dx = dL/d(merger input) from dz = dL/dz (window order, in vt->z). */
static void merger_backward(const vision_train *vt, float *grad_flat) {
    caprl_vision            *v = vt->v;
    caprl_backend           *be = v->be;
    const caprl_backend_ops *ops = be->ops;
    int64_t                  N = vt->N, T = vt->T, C = vt->C, UC = vt->U * C;
    const float             *x = vt->xs[vt->depth];
    ops->gelu_fwd(be, vt->tmp, vt->h1, T * UC);
    ops->matmul_bwd_weight(be, GRAD(v->merger_fc2), GRAD(v->merger_b2), vt->z, vt->tmp, &v->merger_fc2, T);
    ops->matmul_bwd_data(be, vt->tmp, vt->z, &v->merger_fc2, T);
    ops->gelu_bwd(be, vt->tmp, vt->tmp, vt->h1, T * UC);
    ops->rmsnorm_fwd(be, vt->xn, x, v->merger_norm, N, C, VISION_RMS_EPS);
    ops->matmul_bwd_weight(be, GRAD(v->merger_fc1), GRAD(v->merger_b1), vt->tmp, vt->xn, &v->merger_fc1, T);
    ops->matmul_bwd_data(be, vt->dx, vt->tmp, &v->merger_fc1, T);
    ops->rmsnorm_bwd(be, vt->dx, GRAD(v->merger_norm), vt->dx, x, v->merger_norm, N, C, VISION_RMS_EPS);
}

/* vt->dx: dL/d(output of block l) in, dL/d(input of block l) out. */
static void block_backward(const vision_train *vt, int32_t l, float *grad_flat) {
    caprl_vision            *v = vt->v;
    caprl_backend           *be = v->be;
    const caprl_backend_ops *ops = be->ops;
    vision_block            *b = &v->blocks[l];
    const block_acts        *a = acts_of(vt, l);
    int64_t                  N = vt->N, C = vt->C, F = vt->F, n_seg = 0;
    const float             *x = vt->xs[l];
    const int64_t           *seg = segs(vt, l, &n_seg);
    if (vt->recompute) {
        block_forward(vt, l, a, false);
    }
    /* MLP */
    ops->rmsnorm_fwd(be, vt->xn, a->x_mid, b->norm2, N, C, VISION_RMS_EPS);
    ops->swiglu_fwd(be, vt->hbuf, a->gate, a->up, N * F);
    ops->matmul_bwd_weight(be, GRAD(b->down), GRAD(b->down_bias), vt->dx, vt->hbuf, &b->down, N);
    ops->matmul_bwd_data(be, vt->hbuf, vt->dx, &b->down, N);
    ops->swiglu_bwd(be, a->gate, a->up, vt->hbuf, a->gate, a->up, N * F);
    ops->matmul_bwd_weight(be, GRAD(b->gate), GRAD(b->gate_bias), a->gate, vt->xn, &b->gate, N);
    ops->matmul_bwd_weight(be, GRAD(b->up), GRAD(b->up_bias), a->up, vt->xn, &b->up, N);
    ops->matmul_bwd_data(be, vt->tmp, a->gate, &b->gate, N);
    ops->matmul_bwd_data(be, vt->dq, a->up, &b->up, N);
    ops->add_fwd(be, vt->tmp, vt->dq, N * C);
    ops->rmsnorm_bwd(be, vt->tmp, GRAD(b->norm2), vt->tmp, a->x_mid, b->norm2, N, C, VISION_RMS_EPS);
    ops->add_fwd(be, vt->dx, vt->tmp, N * C);
    /* attention */
    ops->matmul_bwd_weight(be, GRAD(b->proj), GRAD(b->proj_bias), vt->dx, a->o, &b->proj, N);
    ops->matmul_bwd_data(be, vt->tmp, vt->dx, &b->proj, N);
    ops->attn_train_bwd(be, vt->dq, vt->dk, vt->dv, vt->tmp, a->q, a->k, a->v, a->o, a->lse, seg, n_seg, N, vt->H,
                        vt->H, vt->D, attn_scale(vt), false);
    join_qkv(vt);
    rope(vt, vt->qkv, true);
    ops->rmsnorm_fwd(be, vt->xn, x, b->norm1, N, C, VISION_RMS_EPS);
    ops->matmul_bwd_weight(be, GRAD(b->qkv), GRAD(b->qkv_bias), vt->qkv, vt->xn, &b->qkv, N);
    ops->matmul_bwd_data(be, vt->tmp, vt->qkv, &b->qkv, N);
    ops->rmsnorm_bwd(be, vt->tmp, GRAD(b->norm1), vt->tmp, x, b->norm1, N, C, VISION_RMS_EPS);
    ops->add_fwd(be, vt->dx, vt->tmp, N * C);
}

caprl_status vision_train_backward(vision_train *vt, const float *dfeatures, float *grad_flat, caprl_error *err) {
    if (!vt->ready) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "vision training: backward without a forward (each forward allows one backward)");
    }
    if (!dfeatures || !grad_flat) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vision training: dfeatures and grad_flat must not be NULL");
    }
    vt->ready = false;
    caprl_vision *v = vt->v;
    copy_rows(vt, (row_copy){vt->z, dfeatures, vt->O, vt->O, vt->O, NULL, vt->win}, vt->T);
    merger_backward(vt, grad_flat);
    for (int32_t l = (int32_t)vt->depth - 1; l >= 0; l--) {
        block_backward(vt, l, grad_flat);
    }
    v->be->ops->matmul_bwd_weight(v->be, GRAD(v->patch_embed), NULL, vt->dx, vt->pix, &v->patch_embed, vt->N);
    return CAPRL_OK;
}
