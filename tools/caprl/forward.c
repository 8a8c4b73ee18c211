/* caprl forward: run a prompt through the model and dump the logits of every position (a parity tool). With
 * --image, the prompt of a Qwen2.5-VL checkpoint gets the image's features spliced at its <|image_pad|> tokens and
 * M-RoPE positions, as the Hugging Face model computes its prefill. --dump-grads runs the trainer instead and
 * writes the gradient of the next-token loss with respect to every parameter (a gradient parity tool). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/image.h"
#include "caprl/model.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl/tokenizer.h"
#include "caprl/train.h"
#include "caprl/vision.h"
#include "caprl/vlm.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

/* One image's side of a VL forward. */
typedef struct vl_inputs {
    float          *features; /* (n_rows, hidden) */
    int64_t         n_rows;
    int32_t         grid[3];  /* t, h, w in patches */
    int32_t         merge;    /* the tower's spatial merge size */
    caprl_vl_prompt prompt;   /* expanded ids, feature rows, M-RoPE positions */
} vl_inputs;

/* Decodes the image and runs the processor and the vision tower of model_dir on it. */
static caprl_status vl_encode(const char *model_dir, const char *image_path, int32_t alpha, int32_t threads,
                              vl_inputs *vi, caprl_error *err) {
    caprl_image             img;
    caprl_vision           *vision = NULL;
    caprl_preprocess_config pp;
    caprl_status st = tool_load_vl_image(model_dir, image_path, alpha, threads, &img, &vision, &pp, err);
    if (st == CAPRL_OK) {
        const caprl_image *imgs[1] = {&img};
        st = caprl_vl_encode_images(vision, &pp, imgs, 1, &vi->features, vi->grid, &vi->n_rows, err);
        vi->merge = caprl_vision_get_config(vision)->spatial_merge_size;
    }
    caprl_vision_free(vision);
    caprl_image_free(&img);
    return st;
}

/* The Qwen2.5-VL chat prompt holding one image, tokenized (one <|image_pad|>). */
static caprl_status vl_prompt_ids(const caprl_model *model, const char *dir, const char *prompt, const char *system,
                                  int32_t **ids, int64_t *n, caprl_error *err) {
    const caprl_tokenizer *tok = caprl_model_tokenizer(model);
    if (!tok) {
        return tool_set_error(err, CAPRL_ERR_IO, "%s has no tokenizer.json (needed for --prompt)", dir);
    }
    char        *text = NULL;
    caprl_status st = caprl_vl_render_prompt(prompt, 1, system, &text, err);
    if (st == CAPRL_OK) {
        st = caprl_tokenizer_encode(tok, text, strlen(text), true, NULL, 0, n, err);
    }
    if (st == CAPRL_OK) {
        *ids = tool_xmalloc((size_t)*n * sizeof(int32_t));
        st = caprl_tokenizer_encode(tok, text, strlen(text), true, *ids, *n, n, err);
    }
    caprl_free(text);
    return st;
}

/* Runs ids (T) through a fresh context in chunks and streams every position's logits into out. vi (may be NULL)
 * supplies the spliced features and M-RoPE positions, sliced per chunk. */
static caprl_status forward_dump(caprl_model *model, const int32_t *ids, int64_t T, const vl_inputs *vi, FILE *out,
                                 const char *tmp, caprl_error *err) {
    const int32_t            chunk = 256;
    const caprl_text_config *cfg = caprl_model_config(model);
    caprl_context_params     cp = caprl_context_default_params();
    cp.n_ctx = (int32_t)T;
    cp.n_batch_max = (int32_t)(T < chunk ? T : chunk);
    cp.n_logits_max = cp.n_batch_max;
    caprl_context *ctx = NULL;
    caprl_status   st = caprl_context_init(&ctx, model, &cp, err);
    int32_t       *seq = tool_xcalloc((size_t)cp.n_batch_max, sizeof(int32_t));
    int32_t       *pos = tool_xmalloc((size_t)cp.n_batch_max * 3 * sizeof(int32_t));
    int8_t        *want = tool_xmalloc((size_t)cp.n_batch_max);
    memset(want, 1, (size_t)cp.n_batch_max);
    for (int64_t start = 0; start < T && st == CAPRL_OK; start += cp.n_batch_max) {
        int32_t     n = (int32_t)(T - start < cp.n_batch_max ? T - start : cp.n_batch_max);
        caprl_batch b = {.n_tokens = n, .tokens = ids + start, .seq_ids = seq, .want_logits = want};
        if (vi) {
            for (int32_t c = 0; c < 3; c++) {
                memcpy(pos + (size_t)c * (size_t)n, vi->prompt.mrope_pos + (size_t)c * (size_t)T + (size_t)start,
                       (size_t)n * sizeof(int32_t));
            }
            b.mrope_pos = pos;
            b.embd = vi->features;
            b.n_embd = (int32_t)vi->n_rows;
            b.embd_row = vi->prompt.embd_row + start;
        }
        st = caprl_context_decode(ctx, &b, err);
        for (int32_t r = 0; r < n && st == CAPRL_OK; r++) {
            if (fwrite(caprl_context_logits(ctx, r), sizeof(float), (size_t)cfg->vocab_size, out) !=
                (size_t)cfg->vocab_size) {
                st = tool_set_error(err, CAPRL_ERR_IO, "%s: write failed", tmp);
            }
        }
    }
    free(seq);
    free(pos);
    free(want);
    caprl_context_free(ctx);
    return st;
}

/* Streams the logits into a temporary file next to path, renamed into place only when complete. */
static caprl_status logits_file(caprl_model *model, const int32_t *ids, int64_t T, const vl_inputs *vi,
                                const char *path, caprl_error *err) {
    size_t tmp_cap = strlen(path) + 32;
    char  *tmp = tool_xmalloc(tmp_cap);
    snprintf(tmp, tmp_cap, "%s.tmp.%ld", path, (long)getpid());
    FILE        *out = fopen(tmp, "wb");
    caprl_status st = out ? forward_dump(model, ids, T, vi, out, tmp, err)
                          : tool_set_error(err, CAPRL_ERR_IO, "%s: cannot create", tmp);
    if (out) {
        bool ok = fflush(out) == 0 && fsync(fileno(out)) == 0;
        ok = fclose(out) == 0 && ok;
        if (st == CAPRL_OK && (!ok || rename(tmp, path) != 0)) {
            st = tool_set_error(err, CAPRL_ERR_IO, "%s: cannot write", path);
        }
        if (st != CAPRL_OK) {
            unlink(tmp);
        }
    }
    free(tmp);
    return st;
}

/* The tower and the processed image of a VL gradient run. */
typedef struct vl_pixels {
    caprl_vision *vision;
    float        *pixels;  /* (n_patches, patch_dim) */
    int64_t       n_patches;
    int32_t       grid[3];
} vl_pixels;

static caprl_status vl_load_pixels(const char *model_dir, const char *image_path, int32_t alpha, int32_t threads,
                                   vl_pixels *vp, caprl_error *err) {
    caprl_image             img;
    caprl_preprocess_config pp;
    caprl_status st = tool_load_vl_image(model_dir, image_path, alpha, threads, &img, &vp->vision, &pp, err);
    if (st == CAPRL_OK) {
        st = caprl_image_preprocess(&img, &pp, &vp->pixels, &vp->n_patches, vp->grid, err);
        caprl_image_free(&img);
    }
    return st;
}

/* L = mean over t in [loss_from, T) of -log p(tokens[t] | tokens before t): position t - 1 scores tokens[t]. One
 * forward and backward through the trainer (and the tower, with vp); the gradients go to path as f32 safetensors
 * under the checkpoint's tensor names. */
static caprl_status grads_dump(caprl_model *model, const vl_pixels *vp, const int32_t *tokens, int64_t T,
                               const int32_t *mrope_pos, int32_t loss_from, const char *path, double *loss,
                               int32_t *n_tensors, caprl_error *err) {
    if (loss_from < 1 || loss_from >= T) {
        return tool_set_error(err, CAPRL_ERR_INVALID_ARG,
                              "--loss-from %d: must be 1..T-1 to score at least one token (T = %lld)", loss_from,
                              (long long)T);
    }
    caprl_trainer_params tp = caprl_trainer_default_params();
    tp.max_tokens = (int32_t)T;
    tp.max_seqs = 1;
    tp.max_patches = vp ? vp->n_patches : 0;
    tp.logits_chunk = 16;
    caprl_trainer *tr = NULL;
    caprl_status   st = caprl_trainer_init(&tr, model, vp ? vp->vision : NULL, &tp, err);
    if (st != CAPRL_OK) {
        return st;
    }
    int32_t *target = tool_xmalloc((size_t)T * sizeof(int32_t));
    float   *logp = tool_xmalloc((size_t)T * sizeof(float)), *dlogp = tool_xcalloc((size_t)T, sizeof(float));
    int64_t  n = T - loss_from;
    for (int64_t p = 0; p < T; p++) {
        target[p] = p >= loss_from - 1 && p + 1 < T ? tokens[p + 1] : -1;
        dlogp[p] = target[p] >= 0 ? (float)(-1.0 / (double)n) : 0.0f;
    }
    int32_t           seq_start[2] = {0, (int32_t)T};
    caprl_train_batch b = {.n_tokens = (int32_t)T, .tokens = tokens, .n_seqs = 1, .seq_start = seq_start,
                           .target = target, .mrope_pos = mrope_pos};
    if (vp) {
        b.n_images = 1;
        b.pixel_values = vp->pixels;
        b.grid_thw = vp->grid;
    }
    st = caprl_trainer_forward(tr, &b, 1.0f, logp, NULL, err);
    if (st == CAPRL_OK) {
        st = caprl_trainer_backward(tr, dlogp, err);
    }
    double sum = 0;
    for (int64_t p = 0; p < T; p++) {
        sum += target[p] >= 0 ? -(double)logp[p] : 0.0;
    }
    caprl_st_writer *w = caprl_st_writer_init();
    const float     *g = caprl_trainer_grads(tr);
    for (int32_t i = 0; i < caprl_trainer_n_tensors(tr) && st == CAPRL_OK; i++) {
        const caprl_param_info *t = caprl_trainer_tensor(tr, i);
        st = caprl_st_writer_add(w, t->name, CAPRL_DTYPE_F32, t->n_dims, t->shape, g + t->offset, err);
    }
    if (st == CAPRL_OK) {
        st = caprl_st_writer_save(w, path, err);
    }
    *loss = sum / (double)n;
    *n_tensors = caprl_trainer_n_tensors(tr);
    caprl_st_writer_free(w);
    free(target);
    free(logp);
    free(dlogp);
    caprl_trainer_free(tr);
    return st;
}

int cmd_forward(int argc, char **argv) {
    static const cmd_info info = {
        "forward",
        "caprl forward --model DIR (--ids 1,2,3 | --ids-file F | --prompt TEXT) [--image PATH] (--dump-logits OUT | "
        "--dump-grads OUT [--loss-from K])",
        "Run token ids through the model; write the logits of every position as raw little-endian float32 [T, vocab],\n"
        "and/or the gradients of the next-token loss with respect to every parameter as f32 safetensors.",
        "The ids are comma- or space-separated, or a JSON array. A one-line JSON summary goes to stdout.\n"
        "The output file is written atomically (temporary file, then rename).\n"
        "With --image (a Qwen2.5-VL checkpoint) the image's features replace its <|image_pad|> tokens and positions\n"
        "are M-RoPE's. The ids then hold one <|image_pad|> (expanded to the image's merged-token count, as the\n"
        "processor does) or the already expanded run; --prompt instead renders the Qwen2.5-VL chat prompt with the\n"
        "image and tokenizes it. T counts the expanded prompt; the summary adds the image's grid_thw.\n"
        "--dump-grads OUT writes d L / d theta for L = mean over t in [K, T) of -log p(x_t | x_<t) (K = --loss-from,\n"
        "default 1; Hugging Face's loss with labels[:K] = -100) under the checkpoint's own tensor names, the vision\n"
        "tower's included with --image; the summary adds the loss."};
    const char *model_dir = NULL, *ids_text = NULL, *ids_file = NULL, *out_path = NULL, *grads_path = NULL;
    const char *image_path = NULL, *prompt = NULL, *system = NULL, *alpha_name = "white";
    int32_t     threads = 0, loss_from = 1;
    bool        print_ids = false;
    opt_spec    specs[] = {
        {"model", OPT_STRING, &model_dir, "checkpoint directory", 0, 0, "DIR", 0},
        {"ids", OPT_STRING, &ids_text, "token ids, e.g. 1,2,3", 0, 0, "IDS", 0},
        {"ids-file", OPT_STRING, &ids_file, "file holding the token ids", 0, 0, "F", 0},
        {"image", OPT_STRING, &image_path, "PNG, JPEG or WebP image spliced at <|image_pad|> (Qwen2.5-VL)", 0, 0,
         "PATH", 0},
        {"prompt", OPT_STRING, &prompt, "with --image: text after the image in the VL chat prompt", 0, 0, "TEXT", 0},
        {"system", OPT_STRING, &system, "with --prompt: system prompt (default: Qwen2.5-VL's; \"\" for none)", 0, 0,
         "TEXT", 0},
        {"alpha", OPT_STRING, &alpha_name, "transparent images: white (qwen-vl-utils) or drop (HF processor)", 0, 0,
         "white|drop", 0},
        {"dump-logits", OPT_STRING, &out_path, "output file for float32 [T, vocab] logits", 0, 0, "OUT", 0},
        {"dump-grads", OPT_STRING, &grads_path, "output safetensors of the loss gradient of every parameter", 0, 0,
         "OUT", 0},
        {"loss-from", OPT_INT, &loss_from, "with --dump-grads: first position whose token the loss scores", 1,
         1 << 24, "K", 0},
        {"print-ids", OPT_FLAG, &print_ids, "add the ids that ran (after pad expansion) to the summary", 0, 0, NULL, 0},
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!model_dir || (!out_path && !grads_path)) {
        return tool_usage_error(info.name, "--model and --dump-logits or --dump-grads are required");
    }
    if ((ids_text != NULL) + (ids_file != NULL) + (prompt != NULL) != 1) {
        return tool_usage_error(info.name, "give exactly one of --ids, --ids-file and --prompt");
    }
    if (prompt && !image_path) {
        return tool_usage_error(info.name, "--prompt renders the Qwen2.5-VL chat prompt and needs --image");
    }
    if (system && !prompt) {
        return tool_usage_error(info.name, "--system needs --prompt");
    }
    int n_image_opts = 0;
    for (int i = 1; i < argc; i++) { /* the parser keeps the last of repeated options: never drop an image */
        n_image_opts += strcmp(argv[i], "--image") == 0 || strncmp(argv[i], "--image=", 8) == 0;
    }
    if (n_image_opts > 1) {
        return tool_usage_error(info.name, "--image given more than once: one image per prompt");
    }
    int32_t alpha = CAPRL_ALPHA_WHITE;
    int     alpha_rc = tool_parse_alpha(info.name, alpha_name, &alpha);
    if (alpha_rc) {
        return alpha_rc;
    }
    int32_t *ids = NULL;
    int64_t  T = 0;
    if (!prompt) {
        char  *file_text = NULL;
        size_t file_len = 0;
        if (ids_file && (rc = tool_read_file(info.name, ids_file, 256u << 20, &file_text, &file_len))) {
            return rc;
        }
        rc = tool_parse_ids(info.name, ids_file ? ids_file : "--ids", ids_file ? file_text : ids_text, &ids, &T);
        free(file_text);
        if (rc) {
            return rc;
        }
    }
    caprl_model *model = NULL;
    if ((rc = tool_load_model(info.name, model_dir, threads, &model))) {
        free(ids);
        return rc;
    }
    const caprl_text_config *cfg = caprl_model_config(model);
    for (int64_t i = 0; i < T; i++) {
        if (ids[i] >= cfg->vocab_size) {
            fprintf(stderr, "caprl forward: error: token id %d at position %lld is outside the vocabulary (0..%d)\n",
                    ids[i], (long long)i, cfg->vocab_size - 1);
            free(ids);
            caprl_model_free(model);
            return EXIT_USAGE;
        }
    }
    caprl_error  err = {0};
    caprl_status st = CAPRL_OK;
    vl_inputs    vi;
    memset(&vi, 0, sizeof vi);
    if (image_path && !cfg->is_vl) {
        st = tool_set_error(&err, CAPRL_ERR_UNSUPPORTED,
                       "%s is a text-only checkpoint: --image needs a Qwen2.5-VL one (model_type qwen2_5_vl)",
                       model_dir);
    }
    if (st == CAPRL_OK && image_path) {
        st = vl_encode(model_dir, image_path, alpha, threads, &vi, &err);
    }
    if (st == CAPRL_OK && prompt) {
        st = vl_prompt_ids(model, model_dir, prompt, system, &ids, &T, &err);
    }
    if (st == CAPRL_OK && image_path) {
        st = caprl_vl_prompt_init(&vi.prompt, ids, T, cfg->image_token_id, vi.grid, 1, vi.merge, 0, &err);
    }
    /* with an image, the expanded prompt is what runs */
    const int32_t *tokens = image_path ? vi.prompt.ids : ids;
    int64_t        n_tokens = image_path ? vi.prompt.n : T;
    if (st == CAPRL_OK && n_tokens > (1 << 24)) {
        st = tool_set_error(&err, CAPRL_ERR_INVALID_ARG, "%lld ids: at most %d", (long long)n_tokens, 1 << 24);
    }
    if (st == CAPRL_OK && out_path) {
        st = logits_file(model, tokens, n_tokens, image_path ? &vi : NULL, out_path, &err);
    }
    /* last: the trainer takes the weights over (f32 copies of the same values) */
    double    loss = 0;
    int32_t   n_grad_tensors = 0;
    vl_pixels vp;
    memset(&vp, 0, sizeof vp);
    if (st == CAPRL_OK && grads_path && image_path) {
        st = vl_load_pixels(model_dir, image_path, alpha, threads, &vp, &err);
        if (st == CAPRL_OK && memcmp(vp.grid, vi.grid, sizeof vp.grid) != 0) {
            st = tool_set_error(&err, CAPRL_ERR_BACKEND, "%s: the processor gave two different grids", image_path);
        }
    }
    if (st == CAPRL_OK && grads_path) {
        st = grads_dump(model, image_path ? &vp : NULL, tokens, n_tokens, image_path ? vi.prompt.mrope_pos : NULL,
                        loss_from, grads_path, &loss, &n_grad_tensors, &err);
    }
    if (st == CAPRL_OK) {
        printf("{\"tokens\": %lld, \"vocab\": %d, \"dtype\": \"float32\"", (long long)n_tokens, cfg->vocab_size);
        if (out_path) {
            printf(", \"file\": \"%s\"", out_path);
        }
        if (grads_path) {
            printf(", \"grads_file\": \"%s\", \"grad_tensors\": %d, \"loss_from\": %d, \"loss\": %.9g", grads_path,
                   n_grad_tensors, loss_from, loss);
        }
        if (image_path) {
            printf(", \"grid_thw\": [%d, %d, %d]", vi.grid[0], vi.grid[1], vi.grid[2]);
        }
        if (print_ids) {
            printf(", \"ids\": [");
            for (int64_t i = 0; i < n_tokens; i++) {
                printf(i ? ", %d" : "%d", tokens[i]);
            }
            printf("]");
        }
        printf("}\n");
    }
    free(ids);
    caprl_free(vp.pixels);
    caprl_vision_free(vp.vision);
    caprl_vl_prompt_free(&vi.prompt);
    caprl_free(vi.features);
    caprl_model_free(model);
    return st == CAPRL_OK ? EXIT_OK : tool_fail(info.name, st, err.msg);
}
