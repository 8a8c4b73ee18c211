/* caprl init-model: write a Qwen2 checkpoint with random weights in exact Hugging Face layout (for tests,
 * benchmarks and the demo: no weights can be downloaded here). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "caprl/model.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl/tokenizer.h"
#include "caprl/vision.h"
#include "caprl/vlm.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

/* Qwen2.5-0.5B's shape (spec/qwen.md §2.8). */
static caprl_text_config preset_qwen25_05b(void) {
    caprl_text_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 151936;
    c.hidden_size = 896;
    c.intermediate_size = 4864;
    c.n_layers = 24;
    c.n_heads = 14;
    c.n_kv_heads = 2;
    c.head_dim = 64;
    c.max_position_embeddings = 32768;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 1000000.0;
    c.tie_word_embeddings = true;
    c.bos_token_id = 151643;
    c.eos_token_id = 151645;
    c.torch_dtype = -1;
    return c;
}

/* A few-MB model with the Qwen vocabulary: fast enough for demos and smoke tests. */
static caprl_text_config preset_tiny(void) {
    caprl_text_config c = preset_qwen25_05b();
    c.hidden_size = 64;
    c.intermediate_size = 160;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 16;
    return c;
}

/* tiny text part with M-RoPE and a small vision tower whose windows split small images. */
static caprl_text_config preset_tiny_vl(caprl_vision_config *vc) {
    caprl_text_config c = preset_tiny();
    c.is_vl = true;
    c.n_mrope_sections = 3;
    c.mrope_section[0] = 2;
    c.mrope_section[1] = 3;
    c.mrope_section[2] = 3;
    c.image_token_id = 151655;
    c.vision_start_token_id = 151652;
    c.video_token_id = 151656;
    c.vision_token_id = 151654;
    c.vision_end_token_id = 151653;
    memset(vc, 0, sizeof *vc);
    vc->depth = 2;
    vc->hidden_size = 32;
    vc->intermediate_size = 48;
    vc->num_heads = 2;
    vc->in_channels = 3;
    vc->out_hidden_size = c.hidden_size;
    vc->patch_size = 14;
    vc->spatial_merge_size = 2;
    vc->temporal_patch_size = 2;
    vc->window_size = 56;
    vc->n_fullatt = 1;
    vc->fullatt_block_indexes[0] = 1;
    vc->tokens_per_second = 2.0f;
    return c;
}

/* Opens the checkpoint in dir whose weights init-model takes, after checking that it has the tensor key (missing:
 * what its absence means) in the dtype of the model being made. */
static caprl_status open_weight_source(caprl_safetensors **out, const char *dir, const char *key, int32_t dtype,
                                       const char *missing, caprl_error *err) {
    caprl_status st = caprl_safetensors_open_dir(out, dir, err);
    if (st != CAPRL_OK) {
        return st;
    }
    const caprl_st_tensor *t = caprl_safetensors_find(*out, key);
    if (t && (int32_t)t->dtype == dtype) {
        return CAPRL_OK;
    }
    if (!t) {
        snprintf(err->msg, sizeof err->msg, "%s: no tensor '%s'%s", dir, key, missing);
    } else {
        snprintf(err->msg, sizeof err->msg, "%s: %s", dir,
                 t->dtype == CAPRL_DTYPE_F32    ? "the weights are F32: give --dtype f32"
                 : t->dtype == CAPRL_DTYPE_BF16 ? "the weights are BF16: give --dtype bf16"
                                                : "the weights are neither F32 nor BF16");
    }
    caprl_safetensors_free(*out);
    *out = NULL;
    return err->code = CAPRL_ERR_FORMAT;
}

/* The files of a checkpoint directory that init-model writes. */
static const char *const k_checkpoint_files[] = {"config.json", "generation_config.json", "preprocessor_config.json",
                                                 "model.safetensors", "model.safetensors.index.json",
                                                 "tokenizer.json"};
enum { N_CHECKPOINT_FILES = sizeof k_checkpoint_files / sizeof *k_checkpoint_files };

/* Removes a checkpoint directory that init-model wrote (its files only, then the directory). */
static void remove_checkpoint_dir(const char *dir) {
    char path[4400];
    for (int i = 0; i < N_CHECKPOINT_FILES; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, k_checkpoint_files[i]);
        remove(path);
    }
    rmdir(dir);
}

/* Moves the complete checkpoint in partial into out file by file (each rename replaces a file of a model already
 * there at once, and other files of out stay, as a run without sources writes), then removes partial. */
static caprl_status move_checkpoint(const char *partial, const char *out, caprl_error *err) {
    if (mkdir(out, 0755) != 0 && errno != EEXIST) {
        snprintf(err->msg, sizeof err->msg, "%.200s: cannot create directory: %s", out, strerror(errno));
        return err->code = CAPRL_ERR_IO;
    }
    char from[4400], to[4400];
    for (int i = 0; i < N_CHECKPOINT_FILES; i++) {
        snprintf(from, sizeof from, "%s/%s", partial, k_checkpoint_files[i]);
        snprintf(to, sizeof to, "%s/%s", out, k_checkpoint_files[i]);
        if (rename(from, to) != 0 && errno != ENOENT) {
            snprintf(err->msg, sizeof err->msg, "%.200s: cannot move %s into place: %s", out, k_checkpoint_files[i],
                     strerror(errno));
            return err->code = CAPRL_ERR_IO;
        }
    }
    rmdir(partial);
    return CAPRL_OK;
}

/* A trained checkpoint whose weights replace the fresh model's: a language model gives every tensor both have (the
 * whole text stack, under the same Qwen2 names); a vision source (prefix "visual.") gives the vision tower and the
 * merger, every one of whose tensors it must have. */
typedef struct weight_source {
    const char              *dir;
    const caprl_safetensors *st;
    const char              *prefix; /* NULL: any tensor the source has */
} weight_source;

/* Rewrites the checkpoint just written to out with the sources' tensors in place of the fresh ones. */
static caprl_status take_weights(const char *out, const weight_source src[2], int n_src, caprl_error *err) {
    char path[4400];
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    caprl_safetensors *fresh = NULL;
    caprl_status       st = caprl_safetensors_open(&fresh, path, err);
    caprl_st_writer *w = caprl_st_writer_init();
    int64_t          n_taken[2] = {0, 0};
    for (int64_t i = 0; st == CAPRL_OK && i < caprl_safetensors_n_tensors(fresh); i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(fresh, i), *use = t;
        for (int k = 0; k < n_src && use == t; k++) {
            bool in_part = !src[k].prefix || strncmp(t->name, src[k].prefix, strlen(src[k].prefix)) == 0;
            const caprl_st_tensor *from = in_part ? caprl_safetensors_find(src[k].st, t->name) : NULL;
            if (in_part && !from && src[k].prefix) {
                snprintf(err->msg, sizeof err->msg, "%s: no tensor '%s' (a Qwen2.5-VL checkpoint with the vision "
                         "shape the --vision-* options give is needed)", src[k].dir, t->name);
                st = err->code = CAPRL_ERR_FORMAT;
                break;
            }
            if (!from) {
                continue;
            }
            bool same = from->dtype == t->dtype && from->n_dims == t->n_dims;
            for (int32_t d = 0; same && d < t->n_dims; d++) {
                same = from->shape[d] == t->shape[d];
            }
            if (!same) {
                snprintf(err->msg, sizeof err->msg, "%s: tensor '%s' differs in dtype or shape from the one the new "
                         "model needs (give --dtype%s as the source's)", src[k].dir, t->name,
                         src[k].prefix ? " and the --vision-* shape" : "");
                st = err->code = CAPRL_ERR_FORMAT;
                break;
            }
            use = from;
            n_taken[k]++;
        }
        if (st == CAPRL_OK) {
            st = caprl_st_writer_add(w, use->name, (int32_t)use->dtype, use->n_dims, use->shape, use->data, err);
        }
    }
    for (int k = 0; st == CAPRL_OK && k < n_src; k++) {
        if (n_taken[k] == 0) {
            snprintf(err->msg, sizeof err->msg, "%s: no tensor matches the new model's names", src[k].dir);
            st = err->code = CAPRL_ERR_FORMAT;
        }
    }
    if (st == CAPRL_OK) {
        st = caprl_st_writer_set_metadata(w, "format", "pt", err);
    }
    if (st == CAPRL_OK) {
        st = caprl_st_writer_save(w, path, err);
    }
    caprl_st_writer_free(w);
    caprl_safetensors_free(fresh);
    return st;
}

int cmd_init_model(int argc, char **argv) {
    static const cmd_info info = {
        "init-model", "caprl init-model --out DIR [--preset tiny|qwen2.5-0.5b] [--dtype f32|bf16] [--tokenizer FILE]",
        "Write a Qwen2 checkpoint with random weights (config.json, generation_config.json, model.safetensors and,\n"
        "with --tokenizer, tokenizer.json) that caprl and Hugging Face transformers both load.",
        "Presets: 'tiny' (hidden 64, 2 layers, Qwen vocabulary), 'tiny-vl' (the same text part as a Qwen2.5-VL\n"
        "model with a 2-block vision tower) and 'qwen2.5-0.5b' (the real model's shape).\n"
        "Weights are uniform with the given standard deviation; norm weights near 1. Deterministic in --seed.\n"
        "With --preset tiny-vl --language-model DIR the text part is DIR's Qwen2 model, shape and weights (and its\n"
        "tokenizer unless --tokenizer is given): a vision-language model built from a trained language model and a\n"
        "new vision tower, as Qwen2.5-VL was. M-RoPE on text alone is DIR's RoPE, so its text behaviour is kept.\n"
        "--vision-model DIR takes the vision tower and merger (the visual.* tensors) from DIR, a Qwen2.5-VL\n"
        "checkpoint of the shape the --vision-* options give: a trained tower under another language model."};
    const char *out = NULL, *preset = "tiny", *dtype_name = "bf16", *tok_path = NULL, *lm_dir = NULL;
    const char *vision_dir = NULL;
    int64_t     seed = 1;
    float       stddev = 0.02f;
    int32_t     layers = 0, vocab = 0, hidden = 0, inter = 0, heads = 0, kv_heads = 0, head_dim = 0;
    int32_t     v_depth = 0, v_hidden = 0, v_heads = 0, v_inter = 0, v_window = 0;
    opt_spec    specs[] = {
        {"out", OPT_STRING, &out, "output directory (created)", 0, 0, "DIR", 0},
        {"preset", OPT_STRING, &preset, "model shape: tiny, tiny-vl or qwen2.5-0.5b", 0, 0, "NAME", 0},
        {"layers", OPT_INT, &layers, "override the number of layers (0 = preset's)", 0, 1024, "N", 0},
        {"vocab-size", OPT_INT, &vocab, "override the vocabulary size (0 = preset's; -1 = the --tokenizer's size "
                                        "rounded up to 64)", -1, 1 << 24, "N", 0},
        {"hidden", OPT_INT, &hidden, "override the hidden size", 0, 1 << 16, "N", 0},
        {"intermediate", OPT_INT, &inter, "override the MLP width", 0, 1 << 18, "N", 0},
        {"heads", OPT_INT, &heads, "override the attention heads", 0, 1024, "N", 0},
        {"kv-heads", OPT_INT, &kv_heads, "override the key/value heads", 0, 1024, "N", 0},
        {"head-dim", OPT_INT, &head_dim, "override the head dimension", 0, 1024, "N", 0},
        {"vision-depth", OPT_INT, &v_depth, "tiny-vl: vision blocks", 0, 256, "N", 0},
        {"vision-hidden", OPT_INT, &v_hidden, "tiny-vl: vision hidden size", 0, 1 << 16, "N", 0},
        {"vision-heads", OPT_INT, &v_heads, "tiny-vl: vision heads", 0, 256, "N", 0},
        {"vision-intermediate", OPT_INT, &v_inter, "tiny-vl: vision MLP width", 0, 1 << 18, "N", 0},
        {"window-size", OPT_INT, &v_window, "tiny-vl: attention window in pixels", 0, 1 << 16, "PX", 0},
        {"dtype", OPT_STRING, &dtype_name, "weight dtype: f32 or bf16", 0, 0, "T", 0},
        {"tokenizer", OPT_STRING, &tok_path, "tokenizer.json to include", 0, 0, "FILE", 0},
        {"language-model", OPT_STRING, &lm_dir, "tiny-vl: take the text part (shape and weights) from this Qwen2 "
                                                "checkpoint", 0, 0, "DIR", 0},
        {"vision-model", OPT_STRING, &vision_dir, "tiny-vl: take the vision tower and merger weights from this "
                                                  "Qwen2.5-VL checkpoint", 0, 0, "DIR", 0},
        {"seed", OPT_I64, &seed, "random seed", 0, 9.2e18, "S", 0},
        {"std", OPT_FLOAT, &stddev, "standard deviation of matrix weights", 1e-6, 10, "X", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!out) {
        return tool_usage_error(info.name, "--out is required");
    }
    caprl_text_config   cfg;
    caprl_vision_config vcfg;
    bool                vl = false;
    if (strcmp(preset, "tiny") == 0) {
        cfg = preset_tiny();
    } else if (strcmp(preset, "tiny-vl") == 0) {
        cfg = preset_tiny_vl(&vcfg);
        vl = true;
    } else if (strcmp(preset, "qwen2.5-0.5b") == 0) {
        cfg = preset_qwen25_05b();
    } else {
        return tool_usage_error(info.name, "unknown --preset '%s' (tiny, tiny-vl, qwen2.5-0.5b)", preset);
    }
    char lm_tokenizer[4096];
    if (lm_dir) {
        if (!vl) {
            return tool_usage_error(info.name, "--language-model needs --preset tiny-vl");
        }
        if (layers || vocab || hidden || inter || heads || kv_heads || head_dim) {
            return tool_usage_error(info.name, "--language-model gives the text shape: drop --layers, --hidden, "
                                               "--intermediate, --heads, --kv-heads, --head-dim and --vocab-size");
        }
        char        path[4096];
        caprl_error lerr = {0};
        snprintf(path, sizeof path, "%s/config.json", lm_dir);
        caprl_text_config lm;
        caprl_status      lst = caprl_text_config_load(&lm, path, &lerr);
        if (lst != CAPRL_OK) {
            return tool_fail(info.name, lst, lerr.msg);
        }
        if (lm.is_vl) {
            return tool_usage_error(info.name, "%s is already a vision-language model", lm_dir);
        }
        lm.is_vl = true;
        lm.n_mrope_sections = 3;
        lm.image_token_id = cfg.image_token_id;
        lm.vision_start_token_id = cfg.vision_start_token_id;
        lm.vision_end_token_id = cfg.vision_end_token_id;
        lm.video_token_id = cfg.video_token_id;
        lm.vision_token_id = cfg.vision_token_id;
        lm.torch_dtype = cfg.torch_dtype;
        cfg = lm;
        vocab = cfg.vocab_size;
        if (!tok_path) {
            snprintf(lm_tokenizer, sizeof lm_tokenizer, "%s/tokenizer.json", lm_dir);
            tok_path = lm_tokenizer;
        }
    }
    if (layers > 0) {
        cfg.n_layers = layers;
    }
    cfg.hidden_size = hidden > 0 ? hidden : cfg.hidden_size;
    cfg.intermediate_size = inter > 0 ? inter : cfg.intermediate_size;
    cfg.n_heads = heads > 0 ? heads : cfg.n_heads;
    cfg.n_kv_heads = kv_heads > 0 ? kv_heads : cfg.n_kv_heads;
    cfg.head_dim = head_dim > 0 ? head_dim : (hidden > 0 || heads > 0) ? cfg.hidden_size / cfg.n_heads : cfg.head_dim;
    if (vl) {
        vcfg.depth = v_depth > 0 ? v_depth : vcfg.depth;
        vcfg.hidden_size = v_hidden > 0 ? v_hidden : vcfg.hidden_size;
        vcfg.num_heads = v_heads > 0 ? v_heads : vcfg.num_heads;
        vcfg.intermediate_size = v_inter > 0 ? v_inter : vcfg.intermediate_size;
        vcfg.window_size = v_window > 0 ? v_window : vcfg.window_size;
        vcfg.out_hidden_size = cfg.hidden_size;
        vcfg.n_fullatt = 1;
        vcfg.fullatt_block_indexes[0] = vcfg.depth - 1;
        /* M-RoPE sections (t, h, w) split head_dim / 2 as Qwen2.5-VL's 16 / 24 / 24 split 64 */
        int32_t half = cfg.head_dim / 2, t = half / 4, h = (half - t) / 2;
        cfg.mrope_section[0] = t;
        cfg.mrope_section[1] = h;
        cfg.mrope_section[2] = half - t - h;
    } else if (v_depth || v_hidden || v_heads || v_inter || v_window || vision_dir) {
        return tool_usage_error(info.name, "the --vision-* and --window-size options need --preset tiny-vl");
    }
    int32_t dtype;
    if (strcmp(dtype_name, "f32") == 0) {
        dtype = CAPRL_DTYPE_F32;
    } else if (strcmp(dtype_name, "bf16") == 0) {
        dtype = CAPRL_DTYPE_BF16;
    } else {
        return tool_usage_error(info.name, "--dtype must be f32 or bf16, got '%s'", dtype_name);
    }
    caprl_error  err = {0};
    caprl_status st = CAPRL_OK;
    if (tok_path) {
        /* a tokenizer of its own (e.g. from `caprl tokenizer train`): the vocabulary and every special id follow it */
        caprl_tokenizer *tok = NULL;
        st = caprl_tokenizer_load(&tok, tok_path, &err);
        if (st != CAPRL_OK) {
            return tool_fail(info.name, st, err.msg);
        }
        int32_t n_tok = caprl_tokenizer_n_tokens(tok);
        if (vocab < 0) {
            vocab = (n_tok + 63) / 64 * 64;
        }
        static const char *const names[] = {"<|endoftext|>",  "<|im_end|>",     "<|image_pad|>", "<|vision_start|>",
                                             "<|vision_end|>", "<|video_pad|>", "<|vision_pad|>"};
        int32_t ids[7];
        for (int i = 0; i < 7; i++) {
            ids[i] = caprl_tokenizer_token_id(tok, names[i]);
        }
        caprl_tokenizer_free(tok);
        for (int i = 0; i < (vl ? 5 : 2); i++) {
            if (ids[i] < 0) {
                return tool_usage_error(info.name, "%s has no %s token", tok_path, names[i]);
            }
        }
        cfg.bos_token_id = ids[0];
        cfg.eos_token_id = ids[1];
        if (vl) {
            cfg.image_token_id = ids[2];
            cfg.vision_start_token_id = ids[3];
            cfg.vision_end_token_id = ids[4];
            cfg.video_token_id = ids[5]; /* -1 when the tokenizer has none: not written */
            cfg.vision_token_id = ids[6];
        }
    }
    if (vocab < 0) {
        return tool_usage_error(info.name, "--vocab-size -1 needs --tokenizer");
    }
    if (vocab > 0) {
        cfg.vocab_size = vocab;
    }
    /* the sources are checked before anything is written: a failed run must not leave a random model behind */
    caprl_safetensors *lm_weights = NULL, *vision_weights = NULL;
    if (lm_dir) {
        st = open_weight_source(&lm_weights, lm_dir, "model.embed_tokens.weight", dtype, "", &err);
    }
    if (st == CAPRL_OK && vision_dir) {
        st = open_weight_source(&vision_weights, vision_dir, "visual.patch_embed.proj.weight", dtype,
                                ": not a Qwen2.5-VL checkpoint", &err);
    }
    if (st != CAPRL_OK) {
        caprl_safetensors_free(lm_weights);
        return tool_fail(info.name, st, err.msg);
    }
    caprl_model_params mp = caprl_model_default_params();
    mp.load_tokenizer = false;
    caprl_model *model = NULL;
    st = caprl_model_init_random(&model, &cfg, dtype, (uint64_t)seed, stddev, &mp, &err);
    if (st == CAPRL_OK && tok_path) {
        st = caprl_model_load_tokenizer(model, tok_path, &err);
    }
    caprl_vision *vision = NULL;
    if (st == CAPRL_OK && vl) {
        st = caprl_vision_init_random(&vision, &vcfg, dtype, (uint64_t)seed + 1, stddev, 0, &err);
    }
    weight_source sources[2];
    int           n_sources = 0;
    if (lm_dir) {
        sources[n_sources++] = (weight_source){lm_dir, lm_weights, NULL};
    }
    if (vision_dir) {
        sources[n_sources++] = (weight_source){vision_dir, vision_weights, "visual."};
    }
    /* with weights to take, the model is put together beside out and moved into place once complete, so that a
     * source of the wrong shape leaves nothing behind */
    char partial[4200];
    snprintf(partial, sizeof partial, "%s.partial", out);
    const char *write_to = n_sources > 0 ? partial : out;
    if (n_sources > 0) {
        remove_checkpoint_dir(partial);
    }
    if (st == CAPRL_OK) {
        st = vl ? caprl_vl_model_save(model, vision, write_to, &err) : caprl_model_save(model, write_to, &err);
    }
    if (st == CAPRL_OK && n_sources > 0) {
        st = take_weights(partial, sources, n_sources, &err);
        if (st == CAPRL_OK) {
            st = move_checkpoint(partial, out, &err);
        }
        if (st != CAPRL_OK) {
            remove_checkpoint_dir(partial);
        }
    }
    if (st == CAPRL_OK) {
        fprintf(stderr, "caprl init-model: wrote %s (%lld parameters, %s)\n", out,
                (long long)caprl_model_n_params(model), caprl_dtype_name(dtype));
    }
    caprl_safetensors_free(lm_weights);
    caprl_safetensors_free(vision_weights);
    caprl_vision_free(vision);
    caprl_model_free(model);
    return st == CAPRL_OK ? EXIT_OK : tool_fail(info.name, st, err.msg);
}
