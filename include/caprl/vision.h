/* The Qwen2.5-VL vision tower (spec/qwen.md §3.1-§3.8): patch embedding, 2-D rotary, window / full attention
 * blocks and the patch merger, in float32 semantics as transformers' modeling_qwen2_5_vl.py computes them.
 *
 * Usage: load a checkpoint directory (or make random weights), then caprl_vision_encode turns pixel_values (the
 * HF processor's layout, §3.3) into one out_hidden_size row per merged token, image after image in raster order:
 * the rows that replace the <|image_pad|> tokens of the prompt (§3.9).
 *
 * Ownership and threads: a caprl_vision owns its weights (mapped from the checkpoint or allocated) and a CPU
 * backend with its own thread pool; the weights never change after load. caprl_vision_encode uses that pool and
 * the backend's scratch, so one caprl_vision runs one encode at a time (callers serialise; separate objects may
 * run concurrently). Results are bit-identical for any thread count and for any grouping of images into calls. */
#ifndef CAPRL_VISION_H
#define CAPRL_VISION_H

#include "caprl/caprl.h"
#include "caprl/safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CAPRL_VISION_MAX_FULLATT 64

/* "vision_config" of a Qwen2.5-VL config.json (HF Qwen2_5_VLVisionConfig). */
typedef struct caprl_vision_config {
    int32_t depth;               /* blocks */
    int32_t hidden_size;         /* Cv */
    int32_t intermediate_size;   /* Fv, SwiGLU width */
    int32_t num_heads;           /* Hv; head_dim = hidden_size / num_heads, a multiple of 4 */
    int32_t in_channels;         /* 3 */
    int32_t out_hidden_size;     /* width of the merged tokens = the text model's hidden_size */
    int32_t patch_size;          /* 14 */
    int32_t spatial_merge_size;  /* 2: merge^2 patches make one token */
    int32_t temporal_patch_size; /* 2 */
    int32_t window_size;         /* pixels; a multiple of spatial_merge_size * patch_size windows merged tokens */
    int32_t n_fullatt;           /* entries of fullatt_block_indexes */
    int32_t fullatt_block_indexes[CAPRL_VISION_MAX_FULLATT]; /* blocks with full (per-frame) attention */
    float   tokens_per_second;   /* video temporal positions (§3.10); informational for images */
} caprl_vision_config;

typedef struct caprl_vision caprl_vision;

/* Parses the "vision_config" object of a whole config.json text (n bytes; name is used in messages). Every bad
 * value is an error naming the field ("config.json: field 'vision_config.num_heads': ..."); unknown keys are
 * logged as warnings. Fields absent from the file take transformers' defaults, except depth, hidden_size,
 * num_heads, intermediate_size and out_hidden_size, which are required (HF's defaults are not real models). */
CAPRL_API caprl_status caprl_vision_config_parse(caprl_vision_config *cfg, const char *json, size_t n,
                                                 const char *name, caprl_error *err);
CAPRL_API caprl_status caprl_vision_config_load(caprl_vision_config *cfg, const char *config_json_path,
                                                caprl_error *err);
/* Checks a config built in code with the same rules as the parser (errors name the field). */
CAPRL_API caprl_status caprl_vision_config_check(const caprl_vision_config *cfg, caprl_error *err);
/* The JSON object for cfg, to be stored as "vision_config" in config.json (it parses back to cfg).
 * *out is NUL-terminated and freed with caprl_free. */
CAPRL_API caprl_status caprl_vision_config_to_json(const caprl_vision_config *cfg, char **out, caprl_error *err);

/* Loads DIR/config.json (its vision_config) and the vision tensors of the checkpoint (DIR/model.safetensors or
 * the shards of DIR/model.safetensors.index.json), named either `visual.*` (original releases) or `model.visual.*`
 * (transformers >= 4.52 saves). Every vision tensor is checked for name, dtype (F32, BF16, F16) and shape, and
 * tensors under the prefix that the config does not call for are errors; the text tensors are ignored. F32 and
 * BF16 matrices are used as stored (mapped), F16 is widened to F32. n_threads: 0 = all cores.
 * On failure *out is untouched and nothing is leaked. */
CAPRL_API caprl_status caprl_vision_load(caprl_vision **out, const char *dir, int32_t n_threads, caprl_error *err);
/* A tower with random weights in dtype (CAPRL_DTYPE_F32 or CAPRL_DTYPE_BF16): matrices uniform with standard
 * deviation std, norm weights 1 + N(0, 0.1), biases N(0, 0.1); deterministic in seed. */
CAPRL_API caprl_status caprl_vision_init_random(caprl_vision **out, const caprl_vision_config *cfg, int32_t dtype,
                                                uint64_t seed, float std, int32_t n_threads, caprl_error *err);
CAPRL_API void         caprl_vision_free(caprl_vision *v); /* NULL-safe */

/* Adds every vision tensor under its original `visual.*` name and stored shape and dtype (the patch embedding
 * as [Cv, in_channels, temporal, patch, patch]) to a writer the caller saves. The data belongs to v and must stay
 * valid (v not freed) until caprl_st_writer_save returns. */
CAPRL_API caprl_status caprl_vision_add_to_writer(const caprl_vision *v, caprl_st_writer *w, caprl_error *err);

CAPRL_API const caprl_vision_config *caprl_vision_get_config(const caprl_vision *v);
/* Stored dtype of the matrices (CAPRL_DTYPE_F32 or CAPRL_DTYPE_BF16). */
CAPRL_API int32_t caprl_vision_dtype(const caprl_vision *v);
CAPRL_API int64_t caprl_vision_n_params(const caprl_vision *v);

/* Patches and merged tokens for the grids (n_images x (t, h, w), patch units), after validating them against cfg
 * (each entry >= 1, h and w multiples of spatial_merge_size). Either output may be NULL. */
CAPRL_API caprl_status caprl_vision_count(const caprl_vision_config *cfg, const int32_t *grid_thw, int32_t n_images,
                                          int64_t *n_patches, int64_t *n_tokens, caprl_error *err);
/* Floating-point operations of one encode of these grids (2 per multiply-add: matmuls plus attention). */
CAPRL_API double caprl_vision_encode_flops(const caprl_vision_config *cfg, const int32_t *grid_thw,
                                           int32_t n_images);

/* pixel_values (n_patches, patch_dim) f32 in the HF layout (§3.3), images back to back, where patch_dim is what the
 * preprocessor produced and must equal in_channels * temporal_patch_size * patch_size^2 of the tower (so a
 * preprocessor configured for another patch size is an error, not garbage); grid_thw (n_images, 3) = (t, h, w) per
 * image in patch units. Writes out (n_tokens, out_hidden_size), n_tokens = n_patches / merge^2: merged tokens in
 * raster order of each image's merged grid, image after image (after the un-permutation of §3.8). Errors
 * (CAPRL_ERR_INVALID_ARG, naming the value): patch_dim mismatch, grids that do not add up to n_patches, h or w not
 * a multiple of the merge size, non-positive entries. Allocates its activations for the call (CAPRL_ERR_OOM naming
 * the size) and frees them before returning; out is untouched on error. */
CAPRL_API caprl_status caprl_vision_encode(caprl_vision *v, const float *pixel_values, int64_t n_patches,
                                           int64_t patch_dim, const int32_t *grid_thw, int32_t n_images, float *out,
                                           caprl_error *err);

/* The window order of HF get_window_index (§3.6) for these grids: window_index (n_tokens entries: the original
 * merged-token index, offset by the tokens of earlier images, of each token in window order) and
 * cu_window_seqlens in patch units with consecutive duplicates removed (HF's unique_consecutive), starting with
 * 0; cu_seqlens must hold n_tokens + 1 entries, *n_cu receives how many were written. */
CAPRL_API caprl_status caprl_vision_window_index(const caprl_vision_config *cfg, const int32_t *grid_thw,
                                                 int32_t n_images, int32_t *window_index, int32_t *cu_seqlens,
                                                 int32_t *n_cu, caprl_error *err);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_VISION_H */
