/* Qwen2.5-VL prompt glue: chat rendering with image placeholders, <|image_pad|> expansion, M-RoPE positions. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/tokenizer.h"
#include "caprl/vlm.h"
#include "core/ckmath.h"
#include "core/error_impl.h"

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
