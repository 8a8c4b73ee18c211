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
            int64_t rem = r % ((int64_t)lh * lw);
            /* still images: every frame at temporal position st (HF scales the frame index by second_per_grid_t,
             * which is 0 for images) */
            t[i + r] = (int32_t)next;
            h[i + r] = (int32_t)(next + rem / lw);
            w[i + r] = (int32_t)(next + rem % lw);
        }
        int64_t span = lh > lw ? lh : lw;
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

/* ---- one prompt's decoder inputs -------------------------------------------------------------------------- */

caprl_status caprl_vl_encode_images(caprl_vision *vision, const caprl_preprocess_config *pp,
                                    const caprl_image *const *images, int32_t n, float **features, int32_t *grid_thw,
                                    int64_t *n_tokens, caprl_error *err) {
    const caprl_vision_config *vc = caprl_vision_get_config(vision);
    if (n < 1 || !images || !pp || !features || !grid_thw || !n_tokens) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vl encode: need at least one image and output arrays");
    }
    /* a processor cut for another geometry gives grids the tower would mis-merge: say which file disagrees */
    if (pp->patch_size != vc->patch_size || pp->merge_size != vc->spatial_merge_size ||
        pp->temporal_patch_size != vc->temporal_patch_size) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "vl encode: preprocessor patch_size %d, merge_size %d, temporal_patch_size %d do not "
                             "match the vision tower's %d, %d, %d",
                             pp->patch_size, pp->merge_size, pp->temporal_patch_size, vc->patch_size,
                             vc->spatial_merge_size, vc->temporal_patch_size);
    }
    float      **pixels = caprl_xcalloc((size_t)n, sizeof(float *));
    int64_t     *patches = caprl_xcalloc((size_t)n, sizeof(int64_t));
    int32_t     *grids = caprl_xcalloc((size_t)n * 3, sizeof(int32_t));
    float       *all = NULL, *feats = NULL;
    caprl_status st = CAPRL_OK;
    int64_t      total_patches = 0;
    for (int32_t i = 0; i < n && st == CAPRL_OK; i++) {
        st = images[i] ? caprl_image_preprocess(images[i], pp, &pixels[i], &patches[i], &grids[3 * i], err)
                       : caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vl encode: image %d is NULL", i);
        total_patches += patches[i];
    }
    /* the preprocessor's row width; the tower checks it against its own patch geometry */
    const int64_t row_width = 3 * (int64_t)pp->temporal_patch_size * pp->patch_size * pp->patch_size;
    const int64_t merge2 = (int64_t)vc->spatial_merge_size * vc->spatial_merge_size;
    const int64_t total_tokens = total_patches / merge2;
    size_t        pix_bytes = 0, feat_bytes = 0;
    if (st == CAPRL_OK) {
        bool ok = caprl_mul_size((size_t)total_patches, (size_t)row_width * sizeof(float), &pix_bytes) &&
                  caprl_mul_size((size_t)total_tokens, (size_t)vc->out_hidden_size * sizeof(float), &feat_bytes);
        all = ok ? caprl_try_malloc(pix_bytes) : NULL;
        feats = ok ? caprl_try_malloc(feat_bytes) : NULL;
        if (!all || !feats) {
            st = caprl_err_set(err, CAPRL_ERR_OOM, "vl encode: cannot allocate pixels and features of %lld patches",
                               (long long)total_patches);
        }
    }
    if (st == CAPRL_OK) {
        int64_t at = 0;
        for (int32_t i = 0; i < n; i++) {
            memcpy(all + at * row_width, pixels[i], (size_t)(patches[i] * row_width) * sizeof(float));
            at += patches[i];
        }
        st = caprl_vision_encode(vision, all, total_patches, row_width, grids, n, feats, err);
    }
    if (st == CAPRL_OK) {
        memcpy(grid_thw, grids, (size_t)n * 3 * sizeof(int32_t));
        for (int32_t i = 0; i < n; i++) {
            n_tokens[i] = patches[i] / merge2;
        }
        *features = feats;
        feats = NULL;
    }
    for (int32_t i = 0; i < n; i++) {
        caprl_free(pixels[i]);
    }
    free(pixels);
    free(patches);
    free(grids);
    free(all);
    free(feats);
    return st;
}

caprl_status caprl_vl_prompt_init(caprl_vl_prompt *out, const int32_t *ids, int64_t n, int32_t image_token_id,
                                  const int32_t *grid_thw, int32_t n_images, int32_t merge, int64_t first_row,
                                  caprl_error *err) {
    memset(out, 0, sizeof *out);
    if (!ids || n < 1 || n_images < 0 || (n_images > 0 && !grid_thw) || merge < 1 || first_row < 0 ||
        first_row > INT32_MAX) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "vl prompt: need ids, grids of %d images, a merge size >= 1 and a first row in "
                             "0..INT32_MAX",
                             n_images);
    }
    int64_t     *n_tok = caprl_xcalloc((size_t)(n_images > 0 ? n_images : 1), sizeof(int64_t));
    int64_t      rows = 0;
    caprl_status st = CAPRL_OK;
    for (int32_t k = 0; k < n_images && st == CAPRL_OK; k++) {
        const int32_t *g = grid_thw + 3 * k;
        int64_t        hw = 0;
        if (g[0] < 1 || g[1] < 1 || g[2] < 1 || g[1] % merge != 0 || g[2] % merge != 0 ||
            !caprl_mul_i64(g[1] / merge, g[2] / merge, &hw) || !caprl_mul_i64(hw, g[0], &n_tok[k]) ||
            !caprl_add_i64(rows, n_tok[k], &rows)) {
            st = caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                               "vl prompt: image %d: grid %d x %d x %d is not whole %d x %d merged tokens", k, g[0],
                               g[1], g[2], merge, merge);
        }
    }
    /* embd_row holds int32 row numbers (caprl_batch) */
    if (st == CAPRL_OK && rows > INT32_MAX - first_row) {
        st = caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vl prompt: feature rows %lld + %lld exceed INT32_MAX",
                           (long long)first_row, (long long)rows);
    }
    if (st == CAPRL_OK) {
        st = caprl_vl_expand_image_pads(ids, n, image_token_id, n_tok, n_images, &out->ids, &out->n, err);
    }
    if (st == CAPRL_OK && out->n > INT32_MAX) {
        st = caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "vl prompt: %lld tokens after expansion", (long long)out->n);
    }
    if (st == CAPRL_OK) {
        out->embd_row = caprl_xmalloc((size_t)out->n * sizeof(int32_t));
        out->mrope_pos = caprl_xmalloc((size_t)out->n * 3 * sizeof(int32_t));
        int64_t row = first_row;
        for (int64_t t = 0; t < out->n; t++) {
            out->embd_row[t] = out->ids[t] == image_token_id ? (int32_t)row++ : -1;
        }
        st = caprl_vl_mrope_positions(out->ids, out->n, image_token_id, grid_thw, n_images, merge, out->mrope_pos,
                                      &out->rope_delta, err);
    }
    free(n_tok);
    if (st != CAPRL_OK) {
        caprl_vl_prompt_free(out);
    }
    return st;
}

void caprl_vl_prompt_free(caprl_vl_prompt *p) {
    if (!p) {
        return;
    }
    free(p->ids);
    free(p->embd_row);
    free(p->mrope_pos);
    memset(p, 0, sizeof *p);
}

/* ---- batched image captioning ----------------------------------------------------------------------------- */

typedef struct vl_batch {
    const caprl_image  **images;    /* (n) */
    int32_t             *grids;     /* (n, 3) */
    int64_t             *n_img_tok; /* (n) merged tokens per image */
    float               *features;  /* (total tokens, hidden), image after image */
    caprl_vl_prompt     *prompts;   /* (n) */
    const int32_t      **ids;       /* (n) the prompts' expanded ids */
    int64_t             *lens;      /* (n) */
    caprl_prompt_vision *vis;       /* (n) */
    uint64_t            *streams;   /* (n) */
} vl_batch;

static void vl_batch_free(vl_batch *b, int32_t n) {
    for (int32_t i = 0; b->prompts && i < n; i++) {
        caprl_vl_prompt_free(&b->prompts[i]);
    }
    free(b->images);
    free(b->grids);
    free(b->n_img_tok);
    free(b->features);
    free(b->prompts);
    free(b->ids);
    free(b->lens);
    free(b->vis);
    free(b->streams);
}

/* The request's chat prompt, tokenized: one <|image_pad|> for its image. *ids: free(). */
caprl_status caprl_vl_prompt_tokens(const caprl_tokenizer *tok, const char *prompt, const char *system, int32_t **ids,
                                    int64_t *len, caprl_error *err) {
    char *text = NULL;
    CAPRL_TRY(caprl_vl_render_prompt(prompt, 1, system, &text, err));
    int64_t      n = 0;
    caprl_status st = caprl_tokenizer_encode(tok, text, strlen(text), true, NULL, 0, &n, err);
    int32_t     *raw = NULL;
    if (st == CAPRL_OK) {
        raw = caprl_xmalloc((size_t)(n ? n : 1) * sizeof(int32_t));
        st = caprl_tokenizer_encode(tok, text, strlen(text), true, raw, n, &n, err);
    }
    caprl_free(text);
    if (st != CAPRL_OK) {
        free(raw);
        return st;
    }
    *ids = raw;
    *len = n;
    return CAPRL_OK;
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
    b.images = caprl_xcalloc((size_t)n, sizeof(caprl_image *));
    b.grids = caprl_xcalloc((size_t)n * 3, sizeof(int32_t));
    b.n_img_tok = caprl_xcalloc((size_t)n, sizeof(int64_t));
    b.prompts = caprl_xcalloc((size_t)n, sizeof(caprl_vl_prompt));
    b.ids = caprl_xcalloc((size_t)n, sizeof(int32_t *));
    b.lens = caprl_xcalloc((size_t)n, sizeof(int64_t));
    b.vis = caprl_xcalloc((size_t)n, sizeof(caprl_prompt_vision));
    b.streams = caprl_xcalloc((size_t)n, sizeof(uint64_t));
    for (int32_t i = 0; i < n; i++) {
        b.images[i] = reqs[i].image;
    }
    /* one tower call for the whole batch */
    caprl_status st = caprl_vl_encode_images(vision, pp, b.images, n, &b.features, b.grids, b.n_img_tok, err);
    int64_t      total_tokens = 0, longest = 0;
    for (int32_t i = 0; i < n; i++) {
        total_tokens += b.n_img_tok[i];
    }
    int64_t first_row = 0;
    for (int32_t i = 0; i < n && st == CAPRL_OK; i++) {
        int32_t *raw = NULL;
        int64_t  n_raw = 0;
        st = caprl_vl_prompt_tokens(tok, reqs[i].prompt, reqs[i].system, &raw, &n_raw, err);
        if (st == CAPRL_OK) {
            st = caprl_vl_prompt_init(&b.prompts[i], raw, n_raw, tc->image_token_id, &b.grids[3 * i], 1,
                                      vc->spatial_merge_size, first_row, err);
        }
        free(raw);
        first_row += b.n_img_tok[i];
        b.ids[i] = b.prompts[i].ids;
        b.lens[i] = b.prompts[i].n;
        b.vis[i].embd = b.features;
        b.vis[i].n_embd = (int32_t)total_tokens;
        b.vis[i].embd_row = b.prompts[i].embd_row;
        b.vis[i].mrope_pos = b.prompts[i].mrope_pos;
        b.vis[i].rope_delta = b.prompts[i].rope_delta;
        b.streams[i] = reqs[i].stream_id;
        longest = b.lens[i] > longest ? b.lens[i] : longest;
    }
    if (st == CAPRL_OK) {
        st = ensure_context(model, ctx, n * gp->n_samples, longest + gp->max_new_tokens, err);
    }
    if (st == CAPRL_OK) {
        caprl_generate_params g = *gp;
        g.prompt_streams = b.streams;
        st = caprl_generate(*ctx, b.ids, b.lens, n, b.vis, &g, on_token, user_data, finish, n_generated, err);
    }
    vl_batch_free(&b, n);
    return st;
}
