/* caprl preprocess: decode one image and run the Qwen2-VL image processor on it; dump pixel_values (a parity
 * tool against the Hugging Face processor). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "caprl/image.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

/* pixel_values are written little-endian whatever the host. */
static void to_little_endian(float *v, size_t n) {
    const uint32_t one = 1;
    uint8_t        first;
    memcpy(&first, &one, 1);
    if (first == 1) {
        return;
    }
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &v[i], 4);
        u = (u >> 24) | ((u >> 8) & 0xff00u) | ((u << 8) & 0xff0000u) | (u << 24);
        memcpy(&v[i], &u, 4);
    }
}

int cmd_preprocess(int argc, char **argv) {
    static const cmd_info info = {
        "preprocess", "caprl preprocess --model DIR --image PATH --dump-pixels OUT [--alpha white|drop]",
        "Decode an image and run the Qwen2-VL image processor; write pixel_values as raw little-endian float32.",
        "The output is [n_patches, 3 * temporal_patch_size * patch_size^2] (1176 for Qwen2.5-VL), written atomically\n"
        "(temporary file, then rename). stdout gets one JSON line: {\"grid_thw\": [t, h, w], ...}.\n"
        "DIR/preprocessor_config.json supplies the processor constants; without it the Qwen2.5-VL defaults are used.\n"
        "--alpha white (default) is pipeline B: qwen-vl-utils composites RGBA on white and resizes with its own\n"
        "smart_resize first; --alpha drop is pipeline A: the Hugging Face processor alone (alpha ignored).\n"
        "Exit codes: 0 ok, 1 usage, 2 unreadable, corrupt or unsupported image or config."};
    const char *model_dir = NULL, *image_path = NULL, *out_path = NULL, *alpha = "white";
    opt_spec    specs[] = {
        {"model", OPT_STRING, &model_dir, "checkpoint directory (reads preprocessor_config.json)", 0, 0, "DIR", 0},
        {"image", OPT_STRING, &image_path, "PNG, JPEG or WebP file", 0, 0, "PATH", 0},
        {"dump-pixels", OPT_STRING, &out_path, "output file for float32 pixel_values", 0, 0, "OUT", 0},
        {"alpha", OPT_STRING, &alpha, "white (qwen-vl-utils, pipeline B) or drop (Hugging Face, pipeline A)", 0, 0,
         "white|drop", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!model_dir || !image_path || !out_path) {
        return tool_usage_error(info.name, "--model, --image and --dump-pixels are required");
    }
    caprl_image_decode_params dp = caprl_image_decode_default_params();
    int                       alpha_rc = tool_parse_alpha(info.name, alpha, &dp.alpha);
    if (alpha_rc) {
        return alpha_rc;
    }
    int32_t variant = tool_resize_variant(dp.alpha);
    struct stat st_out;
    if (stat(out_path, &st_out) == 0 && !S_ISREG(st_out.st_mode)) {
        /* the output is replaced by rename(): never do that to a device or a directory */
        return tool_usage_error(info.name, "--dump-pixels %s exists and is not a regular file", out_path);
    }
    struct stat st_dir;
    if (stat(model_dir, &st_dir) != 0 || !S_ISDIR(st_dir.st_mode)) {
        fprintf(stderr, "caprl %s: error: %s: not a directory\n", info.name, model_dir);
        return EXIT_DATA;
    }

    caprl_error             err = {0};
    caprl_preprocess_config cfg = caprl_preprocess_config_default();
    size_t                  cfg_cap = strlen(model_dir) + 32;
    char                   *cfg_path = tool_xmalloc(cfg_cap);
    snprintf(cfg_path, cfg_cap, "%s/preprocessor_config.json", model_dir);
    struct stat  st_cfg;
    caprl_status st = CAPRL_OK;
    if (stat(cfg_path, &st_cfg) == 0) {
        st = caprl_preprocess_config_load(&cfg, cfg_path, &err);
    } else {
        fprintf(stderr, "caprl %s: %s not found: using the Qwen2.5-VL defaults (min_pixels 3136, max_pixels "
                        "12845056, patch 14, merge 2, CLIP mean/std)\n",
                info.name, cfg_path);
    }
    free(cfg_path);
    if (st != CAPRL_OK) {
        return tool_fail(info.name, st, err.msg);
    }
    cfg.resize_variant = variant;

    caprl_image img = {0};
    if ((st = caprl_image_decode_file(image_path, &dp, &img, &err)) != CAPRL_OK) {
        return tool_fail(info.name, st, err.msg);
    }
    float  *pv = NULL;
    int64_t n = 0;
    int32_t grid[3] = {0, 0, 0};
    st = caprl_image_preprocess(&img, &cfg, &pv, &n, grid, &err);
    if (st != CAPRL_OK) {
        caprl_image_free(&img);
        return tool_fail(info.name, st, err.msg);
    }
    const size_t dim = (size_t)3 * (size_t)cfg.temporal_patch_size * (size_t)cfg.patch_size * (size_t)cfg.patch_size;
    const size_t n_floats = (size_t)n * dim;
    fprintf(stderr, "caprl %s: %s: %dx%d %s %s -> %dx%d, %lld patches; alpha %s, %s resize\n", info.name,
            image_path, img.width, img.height, caprl_image_format_name(img.format),
            caprl_image_mode_name(img.src_mode), grid[2] * cfg.patch_size, grid[1] * cfg.patch_size, (long long)n,
            alpha, variant == CAPRL_RESIZE_HF ? "Hugging Face" : "qwen-vl-utils + Hugging Face");
    to_little_endian(pv, n_floats);
    rc = tool_write_file_atomic(info.name, out_path, pv, n_floats * sizeof(float));
    if (rc == 0) {
        printf("{\"grid_thw\": [%d, %d, %d], \"n_patches\": %lld, \"dim\": %zu, \"image_size\": [%d, %d], "
               "\"mode\": \"%s\", \"alpha\": \"%s\", \"pipeline\": \"%s\"}\n",
               grid[0], grid[1], grid[2], (long long)n, dim, img.width, img.height,
               caprl_image_mode_name(img.src_mode), alpha, variant == CAPRL_RESIZE_HF ? "hf" : "qwen-vl-utils");
    }
    caprl_free(pv);
    caprl_image_free(&img);
    return rc;
}
