/* Images: decoding PNG, JPEG and WebP files to 8-bit RGB exactly as Pillow opens and converts them, and the
 * Qwen2-VL image preprocessing (smart_resize, Pillow-exact bicubic resize, rescale, normalize, patchify) bit for
 * bit as the Hugging Face slow image processor computes it (spec/qwen.md §3.3, §4).
 *
 * Two pipelines exist upstream (spec/qwen.md §4.3); caprl reproduces both:
 *   A (Hugging Face processor alone): alpha dropped (CAPRL_ALPHA_DROP), HF smart_resize (CAPRL_RESIZE_HF);
 *   B (qwen-vl-utils fetch_image, then the processor): alpha composited on white (CAPRL_ALPHA_WHITE),
 *     qwen-vl-utils smart_resize (CAPRL_RESIZE_QWEN_VL_UTILS), then the processor's own resize check.
 * caprl's default is B (the path the released CapRL evaluation takes). Record the choice with every run.
 *
 * Usage: tools/caprl/preprocess.c. Thread safety: every function here is reentrant; nothing holds global state
 * (decoders log through caprl_log). */
#ifndef CAPRL_IMAGE_H
#define CAPRL_IMAGE_H

#include "caprl/caprl.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- decoded images --------------------------------------------------------------------------------------- */

/* The container a buffer was recognised as. */
enum {
    CAPRL_IMAGE_FORMAT_PNG = 0,
    CAPRL_IMAGE_FORMAT_JPEG = 1,
    CAPRL_IMAGE_FORMAT_WEBP = 2,
    CAPRL_IMAGE_FORMAT_COUNT
};

/* The Pillow mode the file opens as (before convert("RGB")); tells which conversion was applied. Only
 * CAPRL_IMAGE_MODE_RGBA is subject to the alpha rule: every other mode (including LA, P with tRNS, RGB with
 * tRNS) goes through Pillow's convert("RGB") in both pipelines, which ignores transparency. */
enum {
    CAPRL_IMAGE_MODE_RGB = 0,  /* 8-bit RGB; also 16-bit RGB PNG (Pillow keeps the high byte) */
    CAPRL_IMAGE_MODE_RGBA = 1, /* 8/16-bit RGBA PNG, 16-bit gray+alpha PNG (Pillow opens it as RGBA), WebP+alpha */
    CAPRL_IMAGE_MODE_L = 2,    /* gray (1/2/4/8-bit PNG, grayscale JPEG): replicated */
    CAPRL_IMAGE_MODE_LA = 3,   /* 8-bit gray+alpha PNG: gray replicated, alpha dropped */
    CAPRL_IMAGE_MODE_P = 4,    /* palette PNG: looked up, tRNS ignored; indices past the palette give (i, i, i) */
    CAPRL_IMAGE_MODE_I = 5,    /* 16-bit gray PNG: Pillow mode I / I;16, convert("RGB") clips to min(v, 255) */
    CAPRL_IMAGE_MODE_CMYK = 6, /* 4-component JPEG (CMYK or YCCK): Adobe-inverted, Pillow's cmyk2rgb */
    CAPRL_IMAGE_MODE_COUNT
};

/* An 8-bit RGB image, row-major, no padding. */
typedef struct caprl_image {
    int32_t  width;
    int32_t  height;
    uint8_t *data;     /* (height, width, 3); owned, free with caprl_image_free */
    int32_t  format;   /* CAPRL_IMAGE_FORMAT_* of the source */
    int32_t  src_mode; /* CAPRL_IMAGE_MODE_* the source opened as */
} caprl_image;

/* What happens to the alpha channel of an RGBA source (CAPRL_IMAGE_MODE_RGBA only). */
enum {
    /* qwen-vl-utils: Image.new("RGB", size, white).paste(img, mask=alpha), i.e. per channel
     * out = DIV255(255 * (255 - a) + c * a) with Pillow's DIV255(x) = ((x + 128) + ((x + 128) >> 8)) >> 8 */
    CAPRL_ALPHA_WHITE = 0,
    /* Hugging Face convert("RGB"): alpha ignored */
    CAPRL_ALPHA_DROP = 1,
    CAPRL_ALPHA_COUNT
};

/* Pillow refuses images above 2 * Image.MAX_IMAGE_PIXELS = 2 * 89,478,485 pixels (DecompressionBombError). */
#define CAPRL_IMAGE_MAX_PIXELS_DEFAULT INT64_C(178956970)

typedef struct caprl_image_decode_params {
    int32_t alpha;      /* CAPRL_ALPHA_*; default CAPRL_ALPHA_WHITE */
    int64_t max_pixels; /* width * height above this is refused before any pixel buffer is allocated; > 0 */
} caprl_image_decode_params;

CAPRL_API caprl_image_decode_params caprl_image_decode_default_params(void);

/* Decodes a PNG, JPEG or WebP file (recognised by its first bytes, not its name) to RGB8 as Pillow would open
 * it and convert it to RGB under params->alpha. Animated WebP and APNG: the first frame.
 * Errors (the message names the file): CAPRL_ERR_IO (cannot read), CAPRL_ERR_FORMAT (empty, truncated or
 * corrupt), CAPRL_ERR_UNSUPPORTED (another format, named from its signature; a variant caprl does not handle;
 * more than params->max_pixels pixels), CAPRL_ERR_INVALID_ARG (bad params), CAPRL_ERR_OOM.
 * params may be NULL (defaults). On success *out is filled (free with caprl_image_free); on failure it is
 * left untouched. */
CAPRL_API caprl_status caprl_image_decode_file(const char *path, const caprl_image_decode_params *params,
                                               caprl_image *out, caprl_error *err);
/* Same from memory; name (may be NULL) is used in messages only. */
CAPRL_API caprl_status caprl_image_decode_buffer(const void *data, size_t size, const char *name,
                                                 const caprl_image_decode_params *params, caprl_image *out,
                                                 caprl_error *err);
/* Frees img->data and zeroes the struct. NULL-safe. */
CAPRL_API void caprl_image_free(caprl_image *img);

/* Short name of a CAPRL_IMAGE_MODE_* ("RGB", "RGBA", "L", "LA", "P", "I", "CMYK"), "?" if out of range. */
CAPRL_API const char *caprl_image_mode_name(int32_t mode);
/* "png", "jpeg", "webp", "?" if out of range. */
CAPRL_API const char *caprl_image_format_name(int32_t format);

/* ---- Pillow-exact bicubic resize -------------------------------------------------------------------------- */

/* Resizes RGB8 src (h, w, 3) to dst (out_h, out_w, 3) with Pillow's Image.resize((out_w, out_h), BICUBIC)
 * arithmetic (libImaging/Resample.c: 22-bit fixed point, horizontal pass first, 8-bit intermediate). Equal sizes
 * copy. All sizes >= 1; dst must not overlap src. Errors: CAPRL_ERR_INVALID_ARG, CAPRL_ERR_OOM. */
CAPRL_API caprl_status caprl_image_resize_bicubic(const uint8_t *src, int32_t w, int32_t h, uint8_t *dst,
                                                  int32_t out_w, int32_t out_h, caprl_error *err);

/* ---- Qwen2-VL preprocessing ------------------------------------------------------------------------------- */

enum {
    CAPRL_RESIZE_HF = 0,            /* transformers: a side shorter than the factor is an error */
    CAPRL_RESIZE_QWEN_VL_UTILS = 1, /* qwen-vl-utils: each rounded side is clamped to at least the factor */
    CAPRL_RESIZE_COUNT
};

/* smart_resize (spec/qwen.md §4.2) with Python semantics (round half to even, IEEE double). Writes the target
 * (height, width), multiples of factor. Errors: CAPRL_ERR_UNSUPPORTED for an aspect ratio above 200, a side
 * below factor (CAPRL_RESIZE_HF) or a result with a zero side; CAPRL_ERR_INVALID_ARG for non-positive inputs or
 * h * w above 2^53 (where double arithmetic would no longer match Python's exact integers). */
CAPRL_API caprl_status caprl_smart_resize(int64_t h, int64_t w, int32_t factor, int64_t min_pixels,
                                          int64_t max_pixels, int32_t variant, int64_t *out_h, int64_t *out_w,
                                          caprl_error *err);

/* The image processor's constants: preprocessor_config.json plus caprl's pipeline switch. */
typedef struct caprl_preprocess_config {
    int64_t min_pixels;          /* processor bound ("min_pixels" or "size.shortest_edge"); 3136 */
    int64_t max_pixels;          /* processor bound ("max_pixels" or "size.longest_edge"); 12845056 */
    int32_t patch_size;          /* 14 */
    int32_t merge_size;          /* 2 */
    int32_t temporal_patch_size; /* 2 */
    bool    do_resize;           /* false: the image sides must already be multiples of patch*merge */
    bool    do_rescale;
    bool    do_normalize;
    double  rescale_factor;      /* 0.00392156862745098 (1/255) */
    double  image_mean[3];       /* OpenAI CLIP mean; used as float32, as numpy does */
    double  image_std[3];        /* OpenAI CLIP std; > 0 */
    /* caprl's switch (not in the JSON): CAPRL_RESIZE_QWEN_VL_UTILS = pipeline B, which first resizes with
     * qwen-vl-utils' smart_resize and fetch_* bounds, then lets the processor re-check (normally a no-op);
     * CAPRL_RESIZE_HF = pipeline A (the processor alone). */
    int32_t resize_variant;
    int64_t fetch_min_pixels;    /* qwen-vl-utils MIN_PIXELS, 3136 (pipeline B only) */
    int64_t fetch_max_pixels;    /* qwen-vl-utils MAX_PIXELS, 12845056 (pipeline B only) */
} caprl_preprocess_config;

/* The values Qwen2.5-VL ships (spec/qwen.md §4.1), pipeline B. */
CAPRL_API caprl_preprocess_config caprl_preprocess_config_default(void);

/* Starts from caprl_preprocess_config_default() with the transformers class defaults for absent bounds
 * (min 3136, max 1,003,520) and reads path: a preprocessor_config.json file, or a directory holding one.
 * min_pixels / max_pixels win over size.shortest_edge / size.longest_edge (as transformers does). Unknown keys
 * are logged as warnings naming them. resize_variant and fetch_* keep their defaults.
 * Errors: CAPRL_ERR_IO (missing or unreadable), CAPRL_ERR_FORMAT (bad JSON or value; names the field),
 * CAPRL_ERR_UNSUPPORTED (a resample filter other than bicubic). *cfg is written only on success. */
CAPRL_API caprl_status caprl_preprocess_config_load(caprl_preprocess_config *cfg, const char *path,
                                                    caprl_error *err);
/* Checks ranges (sizes positive, std > 0, finite values, known variant). */
CAPRL_API caprl_status caprl_preprocess_config_check(const caprl_preprocess_config *cfg, caprl_error *err);

/* The size caprl_image_preprocess resizes a width x height image to (both smart_resize stages of the pipeline);
 * grid_thw = {1, out_height / patch_size, out_width / patch_size}. */
CAPRL_API caprl_status caprl_image_preprocess_size(int32_t width, int32_t height, const caprl_preprocess_config *cfg,
                                                   int32_t *out_width, int32_t *out_height, caprl_error *err);

/* Runs the whole processor on one RGB8 image: resize (Pillow bicubic, skipped when the size is unchanged),
 * rescale float32(double(u8) * rescale_factor), normalize float32(float32(x - mean) / std) with float32
 * mean/std, temporal duplication, and the patch layout of spec/qwen.md §3.3:
 *   pixel_values[n_patches][3 * temporal_patch_size * patch_size^2], rows in merge_size x merge_size block
 *   order; grid_thw = {1, H / patch_size, W / patch_size}; n_patches = grid_thw[0] * grid_thw[1] * grid_thw[2].
 * *pixel_values is malloc'd: free with caprl_free. Outputs are set only on success.
 * Errors: CAPRL_ERR_INVALID_ARG (bad config), CAPRL_ERR_UNSUPPORTED (smart_resize refuses the image),
 * CAPRL_ERR_OOM. */
CAPRL_API caprl_status caprl_image_preprocess(const caprl_image *rgb, const caprl_preprocess_config *cfg,
                                              float **pixel_values, int64_t *n_patches, int32_t grid_thw[3],
                                              caprl_error *err);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_IMAGE_H */
