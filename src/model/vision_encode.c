/* Qwen2.5-VL vision forward (spec/qwen.md §3.3-§3.8), written against the backend op table:
 *
 *   x = pixel_values @ Wpe^T                                   (N, Cv)  patch embedding, no bias
 *   reorder rows by window (groups of U = merge^2 rows follow window_index), positions likewise
 *   per block l: segments = frames if l is full-attention else windows
 *       x += proj(attn(rope2d(qkv(rmsnorm1(x))), segments))
 *       x += down(silu(gate(n)) * up(n)),  n = rmsnorm2(x)       all linear layers with bias
 *   z = fc2(gelu(fc1(rmsnorm_q(x) viewed as (N/U, U Cv))))        (N/U, out_hidden)
 *   out[window_index[k]] = z[k]                                  back to raster order
 *
 * Attention uses head-major copies of q, k and v and the segment kernel (attn_seg_fwd), which shares each pass
 * over a head's keys among a tile of queries: full-attention blocks over thousands of patches would otherwise
 * stream every head's keys from memory once per query. Every op partitions its outputs, and a row's values depend
 * only on its own segment, so results are bit-identical for any thread count and for images encoded together or
 * alone. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/tensor.h"
#include "core/ckmath.h"
#include "core/error_impl.h"
#include "model/vision_impl.h"

/* ---- grids and window order -------------------------------------------------------------------------------- */

caprl_status vision_check_grids(const caprl_vision_config *cfg, const int32_t *grid_thw, int32_t n_images,
                                int64_t *n_patches, int64_t *n_tokens, caprl_error *err) {
    if (n_images < 1 || !grid_thw) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vision: need at least one image grid (n_images = %d)",
                             (int)n_images);
    }
    int32_t s = cfg->spatial_merge_size;
    int64_t total = 0;
    for (int32_t i = 0; i < n_images; i++) {
        const int32_t *g = grid_thw + 3 * i;
        if (g[0] < 1 || g[1] < 1 || g[2] < 1) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vision: image %d: grid_thw (%d, %d, %d) has an entry < 1",
                                 (int)i, (int)g[0], (int)g[1], (int)g[2]);
        }
        if (g[1] % s != 0 || g[2] % s != 0) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                                 "vision: image %d: grid_thw (%d, %d, %d): h and w must be multiples of "
                                 "spatial_merge_size %d",
                                 (int)i, (int)g[0], (int)g[1], (int)g[2], (int)s);
        }
        total += (int64_t)g[0] * g[1] * g[2]; /* each factor < 2^31: the product fits, the sum is capped below */
        if (total > VISION_MAX_PATCHES) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vision: more than %lld patches in one call (image %d)",
                                 (long long)VISION_MAX_PATCHES, (int)i);
        }
    }
    if (n_patches) {
        *n_patches = total;
    }
    if (n_tokens) {
        *n_tokens = total / ((int64_t)s * s);
    }
    return CAPRL_OK;
}

caprl_status caprl_vision_count(const caprl_vision_config *cfg, const int32_t *grid_thw, int32_t n_images,
                                int64_t *n_patches, int64_t *n_tokens, caprl_error *err) {
    return vision_check_grids(cfg, grid_thw, n_images, n_patches, n_tokens, err);
}

/* HF get_window_index: each frame's Lh x Lw merged grid is tiled by ws x ws windows from (0, 0), visited in raster
 * order, tokens in raster order inside; HF pads the grid to (Lh / ws + 1) x (Lw / ws + 1) windows (one extra row
 * or column of empty windows when ws divides the side) and unique_consecutive drops the empty windows' repeated
 * boundaries, which is the same as skipping windows without tokens. */
int32_t vision_window_order(const caprl_vision_config *cfg, const int32_t *grid_thw, int32_t n_images, int32_t *win,
                            int32_t *cu) {
    int32_t s = cfg->spatial_merge_size, U = s * s;
    int32_t ws = cfg->window_size / s / cfg->patch_size;
    int32_t n_cu = 1, base = 0, k = 0;
    cu[0] = 0;
    for (int32_t i = 0; i < n_images; i++) {
        int32_t T = grid_thw[3 * i], Lh = grid_thw[3 * i + 1] / s, Lw = grid_thw[3 * i + 2] / s;
        int32_t nwh = Lh / ws + 1, nww = Lw / ws + 1;
        for (int32_t t = 0; t < T; t++) {
            for (int32_t wy = 0; wy < nwh; wy++) {
                for (int32_t wx = 0; wx < nww; wx++) {
                    int32_t y1 = (wy + 1) * ws < Lh ? (wy + 1) * ws : Lh;
                    int32_t x1 = (wx + 1) * ws < Lw ? (wx + 1) * ws : Lw;
                    int32_t k0 = k;
                    for (int32_t y = wy * ws; y < y1; y++) {
                        for (int32_t x = wx * ws; x < x1; x++) {
                            win[k++] = base + (t * Lh + y) * Lw + x;
                        }
                    }
                    if (k > k0) {
                        cu[n_cu] = cu[n_cu - 1] + (k - k0) * U;
                        n_cu++;
                    }
                }
            }
        }
        base += T * Lh * Lw;
    }
    return n_cu;
}

caprl_status caprl_vision_window_index(const caprl_vision_config *cfg, const int32_t *grid_thw, int32_t n_images,
                                       int32_t *window_index, int32_t *cu_seqlens, int32_t *n_cu, caprl_error *err) {
    CAPRL_TRY(caprl_vision_config_check(cfg, err));
    CAPRL_TRY(vision_check_grids(cfg, grid_thw, n_images, NULL, NULL, err));
    *n_cu = vision_window_order(cfg, grid_thw, n_images, window_index, cu_seqlens);
    return CAPRL_OK;
}

/* ---- cost ---------------------------------------------------------------------------------------------------- */

/* Sum of squared tile lengths when a side of L is cut into tiles of ws (the last one shorter). */
static double tiles_sq(int64_t L, int64_t ws) {
    int64_t r = L % ws;
    return (double)(L / ws) * (double)(ws * ws) + (double)(r * r);
}

double caprl_vision_encode_flops(const caprl_vision_config *cfg, const int32_t *grid_thw, int32_t n_images) {
    int64_t N = 0, T = 0;
    if (caprl_vision_config_check(cfg, NULL) != CAPRL_OK ||
        vision_check_grids(cfg, grid_thw, n_images, &N, &T, NULL) != CAPRL_OK) {
        return 0.0;
    }
    double  C = cfg->hidden_size, F = cfg->intermediate_size, O = cfg->out_hidden_size;
    int64_t s = cfg->spatial_merge_size, ws = cfg->window_size / s / cfg->patch_size;
    double  U = (double)(s * s);
    double  K0 = (double)cfg->in_channels * cfg->temporal_patch_size * cfg->patch_size * cfg->patch_size;
    double  per_row = 3.0 * C * C + C * C + 3.0 * F * C; /* qkv, proj, gate, up, down multiply-adds */
    double  flops = 2.0 * (double)N * C * K0 + 2.0 * (double)N * per_row * cfg->depth;
    flops += 2.0 * (double)T * (U * C * U * C + U * C * O);
    double full_sq = 0, win_sq = 0; /* sums of squared segment lengths in patches */
    for (int32_t i = 0; i < n_images; i++) {
        double  t = grid_thw[3 * i];
        int64_t h = grid_thw[3 * i + 1], w = grid_thw[3 * i + 2];
        full_sq += t * (double)(h * w) * (double)(h * w);
        win_sq += t * U * U * tiles_sq(h / s, ws) * tiles_sq(w / s, ws);
    }
    /* scores and weighted sum: 2 multiply-adds per (query, key, head dim) pair, over Cv = heads * head_dim */
    flops += 4.0 * C * (full_sq * cfg->n_fullatt + win_sq * (cfg->depth - cfg->n_fullatt));
    return flops;
}

/* ---- one encode -------------------------------------------------------------------------------------------- */

typedef struct vision_run {
    caprl_vision *v;
    int64_t       N, T;          /* patches, merged tokens */
    int64_t       C, F, H, D, U; /* width, MLP width, heads, head dim, merge unit */
    float        *x;             /* (N, C) residual stream, window order */
    float        *xn;            /* (N, C) normed sub-block input; heads merged back after attention */
    float        *tmp;           /* (N, C) patch embedding; head-major attention output (H, N, D); sub-block out */
    float        *big;           /* qkv (N, 3C) + heads (3, H, N, D) | gate (N, F) + up (N, F) | merger */
    int32_t      *win;           /* (T) window_index */
    int32_t      *cu;            /* (T + 1) cu_window_seqlens */
    int32_t      *pos;           /* (2, N) hpos then wpos of each row, window order */
    int32_t      *pos_in;        /* (2, N) the same in input order */
    int64_t      *seg_full;      /* (n_full + 1) frame boundaries, rows */
    int64_t      *seg_win;       /* (n_win + 1) window boundaries, rows (cu_window_seqlens) */
    int64_t       n_frames;      /* frames over all images */
    int64_t       n_full, n_win; /* segments */
    void         *block;         /* the one allocation */
} vision_run;

/* Carves every buffer out of one allocation; sizes checked for overflow. */
static caprl_status plan_run(vision_run *r, caprl_error *err) {
    const caprl_vision_config *c = &r->v->cfg;
    int64_t N = r->N, C = r->C, UC = r->U * C;
    int64_t big = 6 * N * C;
    big = 2 * N * r->F > big ? 2 * N * r->F : big;
    big = r->T * (UC + c->out_hidden_size) > big ? r->T * (UC + c->out_hidden_size) : big;
    /* element counts, in allocation order: floats, int64 segment bounds, int32 indices */
    const int64_t counts[3] = {3 * N * C + big, r->n_frames + 1 + r->T + 1, 2 * r->T + 1 + 4 * N};
    const size_t  esize[3] = {sizeof(float), sizeof(int64_t), sizeof(int32_t)};
    size_t        off[3], total = 0;
    for (int i = 0; i < 3; i++) {
        size_t bytes = 0;
        off[i] = total;
        if (!caprl_mul_size((size_t)counts[i], esize[i], &bytes) || !caprl_align_size(bytes, 64, &bytes) ||
            !caprl_add_size(total, bytes, &total)) {
            return caprl_err_set(err, CAPRL_ERR_OOM, "vision: activations for %lld patches overflow size_t",
                                 (long long)N);
        }
    }
    uint8_t *b = caprl_try_aligned_alloc(total);
    if (!b) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "vision: cannot allocate %zu bytes of activations for %lld patches",
                             total, (long long)N);
    }
    r->block = b;
    float *f = (float *)(void *)(b + off[0]);
    r->x = f;
    r->xn = f + N * C;
    r->tmp = f + 2 * N * C;
    r->big = f + 3 * N * C;
    int64_t *l = (int64_t *)(void *)(b + off[1]);
    r->seg_full = l;
    r->seg_win = l + r->n_frames + 1;
    int32_t *s = (int32_t *)(void *)(b + off[2]);
    r->win = s;
    r->cu = s + r->T;
    r->pos = s + 2 * r->T + 1;
    r->pos_in = r->pos + 2 * N;
    return CAPRL_OK;
}

/* Positions of the input rows (§3.5): row ((t Lh + bh) Lw + bw) U + mh s + mw of an image sits at patch row
 * bh s + mh, column bw s + mw, for every frame t. */
static void input_positions(const vision_run *r, const int32_t *grid_thw, int32_t n_images) {
    int32_t s = r->v->cfg.spatial_merge_size;
    int64_t row = 0;
    for (int32_t i = 0; i < n_images; i++) {
        int32_t T = grid_thw[3 * i], Lh = grid_thw[3 * i + 1] / s, Lw = grid_thw[3 * i + 2] / s;
        for (int32_t t = 0; t < T; t++) {
            for (int32_t bh = 0; bh < Lh; bh++) {
                for (int32_t bw = 0; bw < Lw; bw++) {
                    for (int32_t mh = 0; mh < s; mh++) {
                        for (int32_t mw = 0; mw < s; mw++, row++) {
                            r->pos_in[row] = bh * s + mh;
                            r->pos_in[r->N + row] = bw * s + mw;
                        }
                    }
                }
            }
        }
    }
}

/* Attention segments in window order: frames (HF cu_seqlens; contiguous after reordering, since each image's
 * windows are listed frame by frame) and windows (cu_window_seqlens). */
static void segments(vision_run *r, const int32_t *grid_thw, int32_t n_images, int32_t n_cu) {
    int64_t a = 0, f = 0;
    r->seg_full[0] = 0;
    for (int32_t i = 0; i < n_images; i++) {
        for (int32_t t = 0; t < grid_thw[3 * i]; t++) {
            a += (int64_t)grid_thw[3 * i + 1] * grid_thw[3 * i + 2];
            r->seg_full[++f] = a;
        }
    }
    r->n_full = f;
    for (int32_t w = 0; w < n_cu; w++) {
        r->seg_win[w] = r->cu[w];
    }
    r->n_win = n_cu - 1;
}

/* Patch embedding, then rows (and their positions) in window order. */
static void embed_and_reorder(const vision_run *r, const float *pixel_values) {
    caprl_vision *v = r->v;
    v->be->ops->matmul_fwd(v->be, r->tmp, pixel_values, &v->patch_embed, NULL, r->N);
    int64_t U = r->U, C = r->C;
    for (int64_t k = 0; k < r->T; k++) {
        int64_t o = r->win[k];
        memcpy(r->x + k * U * C, r->tmp + o * U * C, (size_t)(U * C) * sizeof(float));
        for (int64_t u = 0; u < U; u++) {
            r->pos[k * U + u] = r->pos_in[o * U + u];
            r->pos[r->N + k * U + u] = r->pos_in[r->N + o * U + u];
        }
    }
}

/* qkv (N, 3, H, D) -> heads (3, H, N, D) */
static void split_heads(float *heads, const float *qkv, int64_t N, int64_t H, int64_t D) {
    for (int64_t m = 0; m < N; m++) {
        for (int64_t p = 0; p < 3 * H; p++) {
            memcpy(heads + (p * N + m) * D, qkv + (m * 3 * H + p) * D, (size_t)D * sizeof(float));
        }
    }
}

/* heads (H, N, D) -> out (N, H, D) */
static void merge_heads(float *out, const float *heads, int64_t N, int64_t H, int64_t D) {
    for (int64_t m = 0; m < N; m++) {
        for (int64_t h = 0; h < H; h++) {
            memcpy(out + (m * H + h) * D, heads + (h * N + m) * D, (size_t)D * sizeof(float));
        }
    }
}

static void attention(const vision_run *r, const vision_block *b, bool full) {
    caprl_vision            *v = r->v;
    caprl_backend           *be = v->be;
    const caprl_backend_ops *ops = be->ops;
    int64_t                  N = r->N, C = r->C, H = r->H, D = r->D;
    float                   *qkv = r->big, *heads = r->big + 3 * N * C;
    const int32_t            sections[2] = {(int32_t)(D / 4), (int32_t)(D / 4)};
    const float              scale = (float)(1.0 / sqrt((double)D));
    ops->rmsnorm_fwd(be, r->xn, r->x, b->norm1, N, C, VISION_RMS_EPS);
    ops->matmul_fwd(be, qkv, r->xn, &b->qkv, b->qkv_bias, N);
    /* q and k heads are adjacent in a qkv row: rotate them as 2H heads in one call */
    ops->rope_sect_fwd(be, qkv, 3 * C, r->pos, v->rope_freq, sections, 2, N, 2 * H, D);
    split_heads(heads, qkv, N, H, D);
    ops->attn_seg_fwd(be, r->tmp, heads, heads + N * C, heads + 2 * N * C, full ? r->seg_full : r->seg_win,
                      full ? r->n_full : r->n_win, N, H, D, scale, b->qkv.dtype == CAPRL_DTYPE_BF16);
    merge_heads(r->xn, r->tmp, N, H, D);
    ops->matmul_fwd(be, r->tmp, r->xn, &b->proj, b->proj_bias, N);
    ops->add_fwd(be, r->x, r->tmp, N * C);
}

static void mlp(const vision_run *r, const vision_block *b) {
    caprl_backend           *be = r->v->be;
    const caprl_backend_ops *ops = be->ops;
    int64_t                  N = r->N, C = r->C, F = r->F;
    float                   *gate = r->big, *up = r->big + N * F;
    ops->rmsnorm_fwd(be, r->xn, r->x, b->norm2, N, C, VISION_RMS_EPS);
    ops->matmul_fwd(be, gate, r->xn, &b->gate, b->gate_bias, N);
    ops->matmul_fwd(be, up, r->xn, &b->up, b->up_bias, N);
    ops->swiglu_fwd(be, gate, gate, up, N * F);
    ops->matmul_fwd(be, r->tmp, gate, &b->down, b->down_bias, N);
    ops->add_fwd(be, r->x, r->tmp, N * C);
}

/* ln_q, (N/U, U C) view, fc1 + GELU + fc2, rows back to raster order. */
static void merger(const vision_run *r, float *out) {
    caprl_vision            *v = r->v;
    caprl_backend           *be = v->be;
    const caprl_backend_ops *ops = be->ops;
    int64_t                  T = r->T, UC = r->U * r->C, O = v->cfg.out_hidden_size;
    float                   *h1 = r->big, *z = r->big + T * UC;
    ops->rmsnorm_fwd(be, r->xn, r->x, v->merger_norm, r->N, r->C, VISION_RMS_EPS);
    ops->matmul_fwd(be, h1, r->xn, &v->merger_fc1, v->merger_b1, T);
    ops->gelu_fwd(be, h1, h1, T * UC);
    ops->matmul_fwd(be, z, h1, &v->merger_fc2, v->merger_b2, T);
    for (int64_t k = 0; k < T; k++) {
        memcpy(out + (int64_t)r->win[k] * O, z + k * O, (size_t)O * sizeof(float));
    }
}

caprl_status caprl_vision_encode(caprl_vision *v, const float *pixel_values, int64_t n_patches, int64_t patch_dim,
                                 const int32_t *grid_thw, int32_t n_images, float *out, caprl_error *err) {
    const caprl_vision_config *c = &v->cfg;
    vision_run                 r;
    memset(&r, 0, sizeof r);
    if (patch_dim != v->patch_embed.cols) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "vision: pixel_values rows have %lld values but the tower takes in_channels (%d) * "
                             "temporal_patch_size (%d) * patch_size^2 (%d^2) = %lld (preprocessor and vision_config "
                             "disagree)",
                             (long long)patch_dim, (int)c->in_channels, (int)c->temporal_patch_size,
                             (int)c->patch_size, (long long)v->patch_embed.cols);
    }
    CAPRL_TRY(vision_check_grids(c, grid_thw, n_images, &r.N, &r.T, err));
    if (r.N != n_patches) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "vision: grid_thw of %d image(s) gives %lld patches but n_patches is %lld", (int)n_images,
                             (long long)r.N, (long long)n_patches);
    }
    if (!pixel_values || !out) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vision: pixel_values and out must not be NULL");
    }
    CAPRL_ASSERT(v->be->ops->rope_sect_fwd && v->be->ops->gelu_fwd && v->be->ops->attn_seg_fwd);
    r.v = v;
    r.C = c->hidden_size;
    r.F = c->intermediate_size;
    r.H = c->num_heads;
    r.D = v->head_dim;
    r.U = (int64_t)c->spatial_merge_size * c->spatial_merge_size;
    for (int32_t i = 0; i < n_images; i++) {
        r.n_frames += grid_thw[3 * i];
    }
    CAPRL_TRY(plan_run(&r, err));
    int32_t n_cu = vision_window_order(c, grid_thw, n_images, r.win, r.cu);
    input_positions(&r, grid_thw, n_images);
    segments(&r, grid_thw, n_images, n_cu);
    embed_and_reorder(&r, pixel_values);
    for (int32_t l = 0; l < c->depth; l++) {
        attention(&r, &v->blocks[l], v->fullatt[l]);
        mlp(&r, &v->blocks[l]);
    }
    merger(&r, out);
    caprl_aligned_free(r.block);
    return CAPRL_OK;
}
