/* Qwen2.5-VL prompt glue: chat rendering with image placeholders, <|image_pad|> expansion, M-RoPE positions. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/model.h"
#include "caprl/tokenizer.h"
#include "caprl/vlm.h"
#include "core/ckmath.h"
#include "core/error_impl.h"
#include "model/model_impl.h"

#define VISION_BLOCK "<|vision_start|><|image_pad|><|vision_end|>"

caprl_status caprl_vl_render_prompt(const char *text, int32_t n_images, const char *system, char **out,
                                    caprl_error *err) {
    if (!text || n_images < 0 || n_images > 1024) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vl prompt: need text and 0..1024 images");
    }
    const char *sys = system ? system : CAPRL_QWEN25VL_DEFAULT_SYSTEM;
    size_t      n = strlen(text) + strlen(sys) + (size_t)n_images * strlen(VISION_BLOCK) + 128;
    char       *s = caprl_xmalloc(n);
    size_t      len = 0;
    if (sys[0]) {
        len += (size_t)snprintf(s + len, n - len, "<|im_start|>system\n%s<|im_end|>\n", sys);
    }
    len += (size_t)snprintf(s + len, n - len, "<|im_start|>user\n");
    for (int32_t k = 0; k < n_images; k++) {
        len += (size_t)snprintf(s + len, n - len, "%s", VISION_BLOCK);
    }
    snprintf(s + len, n - len, "%s<|im_end|>\n<|im_start|>assistant\n", text);
    *out = s;
    return CAPRL_OK;
}

caprl_status caprl_vl_expand_image_pads(const int32_t *ids, int64_t n, int32_t image_token_id,
                                        const int64_t *n_tokens, int32_t n_images, int32_t **out, int64_t *n_out,
                                        caprl_error *err) {
    /* runs of consecutive pads */
    int64_t runs = 0, pads = 0;
    bool    runs_expanded = true;
    for (int64_t i = 0; i < n;) {
        if (ids[i] != image_token_id) {
            i++;
            continue;
        }
        int64_t j = i;
        while (j < n && ids[j] == image_token_id) {
            j++;
        }
        if (runs >= n_images || j - i != n_tokens[runs]) {
            runs_expanded = false;
        }
        runs++;
        pads += j - i;
        i = j;
    }
    bool single = pads == n_images;
    if (!(runs == n_images && runs_expanded) && !single) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "prompt has %lld <|image_pad|> tokens in %lld runs for %d images: expected one per image "
                             "or each image's full run",
                             (long long)pads, (long long)runs, n_images);
    }
    int64_t total = n;
    if (!(runs == n_images && runs_expanded)) {
        for (int32_t k = 0; k < n_images; k++) {
            if (n_tokens[k] < 1 || !caprl_add_i64(total, n_tokens[k] - 1, &total)) {
                return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "image %d: %lld tokens", k, (long long)n_tokens[k]);
            }
        }
    }
    int32_t *o = caprl_xmalloc((size_t)total * sizeof(int32_t));
    int64_t  w = 0;
    int32_t  k = 0;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] == image_token_id && total != n) {
            for (int64_t r = 0; r < n_tokens[k]; r++) {
                o[w++] = image_token_id;
            }
            k++;
        } else {
            o[w++] = ids[i];
        }
    }
    CAPRL_ASSERT(w == total);
    *out = o;
    *n_out = total;
    return CAPRL_OK;
}

caprl_status caprl_vl_mrope_positions(const int32_t *ids, int64_t n, int32_t image_token_id,
                                      const int32_t *grid_thw, int32_t n_images, int32_t merge, int32_t *pos,
                                      int32_t *rope_delta, caprl_error *err) {
    if (merge < 1) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "mrope positions: merge size %d", merge);
    }
    int32_t *t = pos, *h = pos + n, *w = pos + 2 * n;
    int64_t  next = 0, max_pos = -1;
    int32_t  img = 0;
    for (int64_t i = 0; i < n;) {
        if (ids[i] != image_token_id) {
            t[i] = h[i] = w[i] = (int32_t)next;
            max_pos = next;
            next++;
            i++;
            continue;
        }
        if (img >= n_images) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "mrope positions: more image-pad runs than %d images",
                                 n_images);
        }
        int32_t gt = grid_thw[3 * img], lh = grid_thw[3 * img + 1] / merge, lw = grid_thw[3 * img + 2] / merge;
        int64_t count = (int64_t)gt * lh * lw;
        if (gt < 1 || lh < 1 || lw < 1 || i + count > n) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                                 "mrope positions: image %d (grid %d x %d x %d) needs %lld pad tokens at %lld", img, gt,
                                 grid_thw[3 * img + 1], grid_thw[3 * img + 2], (long long)count, (long long)i);
        }
        for (int64_t r = 0; r < count; r++) {
            if (ids[i + r] != image_token_id) {
                return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                                     "mrope positions: image %d's pad run is %lld tokens, expected %lld", img,
                                     (long long)r, (long long)count);
            }
            int64_t tt = r / ((int64_t)lh * lw), rem = r % ((int64_t)lh * lw);
            /* still images: the temporal index is the frame index (0 for one frame) */
            t[i + r] = (int32_t)(next + tt);
            h[i + r] = (int32_t)(next + rem / lw);
            w[i + r] = (int32_t)(next + rem % lw);
        }
        int64_t span = lh > lw ? lh : lw;
        span = span > gt ? span : gt;
        max_pos = next + span - 1;
        next += span;
        i += count;
        img++;
    }
    if (img != n_images) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "mrope positions: %d image-pad runs for %d images", img,
                             n_images);
    }
    *rope_delta = (int32_t)(max_pos + 1 - n);
    return CAPRL_OK;
}

/* ---- batched image captioning ----------------------------------------------------------------------------- */

typedef struct vl_batch {
    float    **pixels;   /* (n) per-image pixel_values */
    int64_t   *patches;  /* (n) */
    int32_t   *grids;    /* (n, 3) */
    int64_t   *n_img_tok; /* (n) merged tokens per image */
    float     *all_pixels; /* concatenated pixel_values */
    float     *features;   /* (total tokens, hidden) */
    int32_t  **ids;        /* (n) expanded prompt ids */
    int64_t   *lens;       /* (n) */
    int32_t  **embd_rows;  /* (n) */
    int32_t  **mrope;      /* (n) (3, len) */
    caprl_prompt_vision *vis;
    uint64_t  *streams;
} vl_batch;

static void vl_batch_free(vl_batch *b, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        if (b->pixels) {
            caprl_free(b->pixels[i]);
        }
        if (b->ids) {
            caprl_free(b->ids[i]);
        }
        if (b->embd_rows) {
            free(b->embd_rows[i]);
        }
        if (b->mrope) {
            free(b->mrope[i]);
        }
    }
    free(b->pixels);
    free(b->patches);
    free(b->grids);
    free(b->n_img_tok);
    free(b->all_pixels);
    free(b->features);
    free(b->ids);
    free(b->lens);
    free(b->embd_rows);
    free(b->mrope);
    free(b->vis);
    free(b->streams);
}

/* Prompt ids of one request with its image's pads expanded. */
static caprl_status vl_prompt_ids(const caprl_tokenizer *tok, const caprl_text_config *tc, const caprl_vl_request *r,
                                  int64_t n_img_tok, int32_t **ids, int64_t *len, caprl_error *err) {
    char *text = NULL;
    CAPRL_TRY(caprl_vl_render_prompt(r->prompt, 1, r->system, &text, err));
    int64_t      n = 0;
    caprl_status st = caprl_tokenizer_encode(tok, text, strlen(text), true, NULL, 0, &n, err);
    int32_t     *raw = NULL;
    if (st == CAPRL_OK) {
        raw = caprl_xmalloc((size_t)(n ? n : 1) * sizeof(int32_t));
        st = caprl_tokenizer_encode(tok, text, strlen(text), true, raw, n, &n, err);
    }
    caprl_free(text);
    if (st == CAPRL_OK) {
        st = caprl_vl_expand_image_pads(raw, n, tc->image_token_id, &n_img_tok, 1, ids, len, err);
    }
    free(raw);
    return st;
}

static caprl_status ensure_context(caprl_model *m, caprl_context **ctx, int32_t n_seq, int64_t n_ctx,
                                   caprl_error *err) {
    caprl_context *c = *ctx;
    if (c && c->p.n_seq_max >= n_seq && c->p.n_ctx >= n_ctx) {
        return CAPRL_OK;
    }
    caprl_context_params cp = caprl_context_default_params();
    cp.n_seq_max = c && c->p.n_seq_max > n_seq ? c->p.n_seq_max : n_seq;
    cp.n_ctx = (int32_t)(c && c->p.n_ctx > n_ctx ? c->p.n_ctx : n_ctx);
    cp.n_batch_max = 512 > n_seq ? 512 : n_seq;
    cp.n_logits_max = n_seq;
    caprl_context_free(c);
    *ctx = NULL;
    return caprl_context_init(ctx, m, &cp, err);
}

caprl_status caprl_vl_generate(caprl_model *model, caprl_vision *vision, const caprl_preprocess_config *pp,
                               const caprl_vl_request *reqs, int32_t n, const caprl_generate_params *gp,
                               caprl_context **ctx, caprl_token_fn on_token, void *user_data, int32_t *finish,
                               int32_t *n_generated, caprl_error *err) {
    const caprl_text_config   *tc = caprl_model_config(model);
    const caprl_vision_config *vc = caprl_vision_get_config(vision);
    const caprl_tokenizer     *tok = caprl_model_tokenizer(model);
    if (!tc->is_vl || !tok || vc->out_hidden_size != tc->hidden_size || n < 1 || !gp) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "vl generate: need a Qwen2.5-VL model with a tokenizer whose hidden size (%d) equals the "
                             "vision tower's out_hidden_size (%d), and at least one request",
                             tc->hidden_size, vc->out_hidden_size);
    }
    vl_batch b;
    memset(&b, 0, sizeof b);
    b.pixels = caprl_xcalloc((size_t)n, sizeof(float *));
    b.patches = caprl_xcalloc((size_t)n, sizeof(int64_t));
    b.grids = caprl_xcalloc((size_t)n * 3, sizeof(int32_t));
    b.n_img_tok = caprl_xcalloc((size_t)n, sizeof(int64_t));
    b.ids = caprl_xcalloc((size_t)n, sizeof(int32_t *));
    b.lens = caprl_xcalloc((size_t)n, sizeof(int64_t));
    b.embd_rows = caprl_xcalloc((size_t)n, sizeof(int32_t *));
    b.mrope = caprl_xcalloc((size_t)n, sizeof(int32_t *));
    b.vis = caprl_xcalloc((size_t)n, sizeof(caprl_prompt_vision));
    b.streams = caprl_xcalloc((size_t)n, sizeof(uint64_t));
    caprl_status st = CAPRL_OK;
    int64_t      total_patches = 0, total_tokens = 0, longest = 0;
    const int64_t merge2 = (int64_t)pp->merge_size * pp->merge_size;
    for (int32_t i = 0; i < n && st == CAPRL_OK; i++) {
        st = caprl_image_preprocess(reqs[i].image, pp, &b.pixels[i], &b.patches[i], &b.grids[3 * i], err);
        b.n_img_tok[i] = b.patches[i] / merge2;
        total_patches += b.patches[i];
        total_tokens += b.n_img_tok[i];
    }
    /* the preprocessor's row width; the tower checks it against its own patch geometry */
    int64_t row_width = 3 * (int64_t)pp->temporal_patch_size * pp->patch_size * pp->patch_size;
    if (st == CAPRL_OK) {
        b.all_pixels = caprl_try_malloc((size_t)total_patches * (size_t)row_width * sizeof(float));
        b.features = caprl_try_malloc((size_t)total_tokens * (size_t)tc->hidden_size * sizeof(float));
        if (!b.all_pixels || !b.features) {
            st = caprl_err_set(err, CAPRL_ERR_OOM, "vl generate: cannot allocate pixels and features of %lld patches",
                               (long long)total_patches);
        }
    }
    if (st == CAPRL_OK) {
        int64_t at = 0;
        for (int32_t i = 0; i < n; i++) {
            memcpy(b.all_pixels + at * row_width, b.pixels[i], (size_t)(b.patches[i] * row_width) * sizeof(float));
            at += b.patches[i];
        }
        st = caprl_vision_encode(vision, b.all_pixels, total_patches, row_width, b.grids, n, b.features, err);
    }
    int64_t first_row = 0;
    for (int32_t i = 0; i < n && st == CAPRL_OK; i++) {
        st = vl_prompt_ids(tok, tc, &reqs[i], b.n_img_tok[i], &b.ids[i], &b.lens[i], err);
        if (st != CAPRL_OK) {
            break;
        }
        int64_t len = b.lens[i];
        b.embd_rows[i] = caprl_xmalloc((size_t)len * sizeof(int32_t));
        b.mrope[i] = caprl_xmalloc((size_t)len * 3 * sizeof(int32_t));
        int64_t row = first_row;
        for (int64_t t = 0; t < len; t++) {
            b.embd_rows[i][t] = b.ids[i][t] == tc->image_token_id ? (int32_t)row++ : -1;
        }
        first_row = row;
        st = caprl_vl_mrope_positions(b.ids[i], len, tc->image_token_id, &b.grids[3 * i], 1, vc->spatial_merge_size,
                                      b.mrope[i], &b.vis[i].rope_delta, err);
        b.vis[i].embd = b.features;
        b.vis[i].n_embd = (int32_t)total_tokens;
        b.vis[i].embd_row = b.embd_rows[i];
        b.vis[i].mrope_pos = b.mrope[i];
        b.streams[i] = reqs[i].stream_id;
        longest = len > longest ? len : longest;
    }
    if (st == CAPRL_OK) {
        st = ensure_context(model, ctx, n * gp->n_samples, longest + gp->max_new_tokens, err);
    }
    if (st == CAPRL_OK) {
        caprl_generate_params g = *gp;
        g.prompt_streams = b.streams;
        st = caprl_generate(*ctx, (const int32_t *const *)b.ids, b.lens, n, b.vis, &g, on_token, user_data, finish,
                            n_generated, err);
    }
    vl_batch_free(&b, n);
    return st;
}
