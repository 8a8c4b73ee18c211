/* The Qwen2-VL image processor (HF Qwen2VLImageProcessor, slow path; spec/qwen.md §3.3, §4.2, §4.3) and its
 * preprocessor_config.json.
 *
 * Bit-exactness rests on doing the reference's arithmetic in the reference's precision:
 *   smart_resize: IEEE double with Python semantics (round() is half-to-even: nearbyint in the default rounding
 *     mode; int / int is one correctly rounded division, which double division reproduces while every operand
 *     is an exact double, hence the 2^53 bound on h * w);
 *   rescale: numpy upcasts uint8 to float64, multiplies by the Python float, casts to float32;
 *   normalize: float32 (x - mean) then float32 division by std, mean and std cast to float32 first.
 * Rescale + normalize depend only on (channel, byte), so they are tabulated: 3 x 256 floats computed once.
 * This file is compiled with -ffp-contract=off (CMakeLists.txt) so no multiply-add is fused. */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/ckmath.h"
#include "core/error_impl.h"
#include "core/file_impl.h"
#include "core/log_impl.h"
#include "fmt/json_impl.h"
#include "image/image_impl.h"

#define PREPROCESSOR_CONFIG_NAME      "preprocessor_config.json"
#define PREPROCESSOR_CONFIG_MAX_BYTES ((size_t)1 << 20)

/* transformers Qwen2VLImageProcessor class defaults, used when the file gives no bounds. */
#define HF_CLASS_MIN_PIXELS INT64_C(3136)
#define HF_CLASS_MAX_PIXELS INT64_C(1003520)
/* Qwen2.5-VL's shipped preprocessor_config.json, and qwen-vl-utils MIN_PIXELS / MAX_PIXELS. */
#define QWEN_MIN_PIXELS INT64_C(3136)
#define QWEN_MAX_PIXELS INT64_C(12845056)
#define MAX_RATIO       200.0
/* Beyond this, double no longer holds every integer, and Python's exact int arithmetic would differ. */
#define EXACT_INT_MAX (INT64_C(1) << 53)

static const double k_clip_mean[3] = {0.48145466, 0.4578275, 0.40821073};
static const double k_clip_std[3] = {0.26862954, 0.26130258, 0.27577711};

/* ---- smart_resize ----------------------------------------------------------------------------------------- */

caprl_status caprl_smart_resize(int64_t h, int64_t w, int32_t factor, int64_t min_pixels, int64_t max_pixels,
                                int32_t variant, int64_t *out_h, int64_t *out_w, caprl_error *err) {
    int64_t hw = 0;
    if (h <= 0 || w <= 0 || factor <= 0 || min_pixels < 0 || min_pixels > EXACT_INT_MAX || max_pixels <= 0 ||
        max_pixels > EXACT_INT_MAX || variant < 0 || variant >= CAPRL_RESIZE_COUNT || !out_h || !out_w ||
        !caprl_mul_i64(h, w, &hw) || hw > EXACT_INT_MAX) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "smart_resize: bad arguments (h %lld, w %lld, factor %d, min %lld, max %lld, variant %d)",
                             (long long)h, (long long)w, factor, (long long)min_pixels, (long long)max_pixels,
                             variant);
    }
    if (variant == CAPRL_RESIZE_HF && (h < factor || w < factor)) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                             "image %lldx%lld (w x h): height and width must be at least %d for the Hugging Face "
                             "processor (qwen-vl-utils would enlarge it)",
                             (long long)w, (long long)h, factor);
    }
    const int64_t big = h > w ? h : w, small = h > w ? w : h;
    if ((double)big / (double)small > MAX_RATIO) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                             "image %lldx%lld (w x h): aspect ratio %.1f is above %.0f, which Qwen2-VL refuses",
                             (long long)w, (long long)h, (double)big / (double)small, MAX_RATIO);
    }
    const double f = (double)factor;
    int64_t      hb = (int64_t)nearbyint((double)h / f) * factor;
    int64_t      wb = (int64_t)nearbyint((double)w / f) * factor;
    if (variant == CAPRL_RESIZE_QWEN_VL_UTILS) {
        hb = hb < factor ? factor : hb;
        wb = wb < factor ? factor : wb;
    }
    if (hb * wb > max_pixels) {
        double beta = sqrt((double)hw / (double)max_pixels);
        hb = (int64_t)floor((double)h / beta / f) * factor;
        wb = (int64_t)floor((double)w / beta / f) * factor;
    } else if (hb * wb < min_pixels) {
        double beta = sqrt((double)min_pixels / (double)hw);
        hb = (int64_t)ceil((double)h * beta / f) * factor;
        wb = (int64_t)ceil((double)w * beta / f) * factor;
    }
    if (hb <= 0 || wb <= 0 || hb > INT32_MAX || wb > INT32_MAX) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                             "image %lldx%lld (w x h): smart_resize gives %lldx%lld with bounds [%lld, %lld]",
                             (long long)w, (long long)h, (long long)wb, (long long)hb, (long long)min_pixels,
                             (long long)max_pixels);
    }
    *out_h = hb;
    *out_w = wb;
    return CAPRL_OK;
}

/* ---- configuration ---------------------------------------------------------------------------------------- */

caprl_preprocess_config caprl_preprocess_config_default(void) {
    caprl_preprocess_config c;
    memset(&c, 0, sizeof c);
    c.min_pixels = QWEN_MIN_PIXELS;
    c.max_pixels = QWEN_MAX_PIXELS;
    c.patch_size = 14;
    c.merge_size = 2;
    c.temporal_patch_size = 2;
    c.do_resize = true;
    c.do_rescale = true;
    c.do_normalize = true;
    c.rescale_factor = 0.00392156862745098; /* Python's 1 / 255 */
    memcpy(c.image_mean, k_clip_mean, sizeof c.image_mean);
    memcpy(c.image_std, k_clip_std, sizeof c.image_std);
    c.resize_variant = CAPRL_RESIZE_QWEN_VL_UTILS;
    c.fetch_min_pixels = QWEN_MIN_PIXELS;
    c.fetch_max_pixels = QWEN_MAX_PIXELS;
    return c;
}

caprl_status caprl_preprocess_config_check(const caprl_preprocess_config *c, caprl_error *err) {
    if (!c) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "preprocess config: NULL");
    }
    if (c->patch_size < 1 || c->patch_size > 1024 || c->merge_size < 1 || c->merge_size > 64 ||
        c->temporal_patch_size < 1 || c->temporal_patch_size > 64 ||
        (int64_t)c->patch_size * c->merge_size > (1 << 16)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "preprocess config: patch_size %d, merge_size %d, temporal_patch_size %d out of range",
                             c->patch_size, c->merge_size, c->temporal_patch_size);
    }
    if (c->min_pixels < 0 || c->min_pixels > EXACT_INT_MAX || c->max_pixels < 1 || c->max_pixels > EXACT_INT_MAX ||
        c->fetch_min_pixels < 0 || c->fetch_min_pixels > EXACT_INT_MAX || c->fetch_max_pixels < 1 ||
        c->fetch_max_pixels > EXACT_INT_MAX) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "preprocess config: pixel bounds out of range (min %lld, max %lld, fetch %lld..%lld)",
                             (long long)c->min_pixels, (long long)c->max_pixels, (long long)c->fetch_min_pixels,
                             (long long)c->fetch_max_pixels);
    }
    if (c->resize_variant < 0 || c->resize_variant >= CAPRL_RESIZE_COUNT) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "preprocess config: unknown resize variant %d",
                             c->resize_variant);
    }
    if (!isfinite(c->rescale_factor)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "preprocess config: rescale_factor is not finite");
    }
    for (int i = 0; i < 3; i++) {
        /* numpy uses them as float32: they must stay finite there too */
        if (!(fabs(c->image_mean[i]) <= (double)FLT_MAX) || !(c->image_std[i] <= (double)FLT_MAX) ||
            !((float)c->image_std[i] > 0.0f)) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                                 "preprocess config: image_mean[%d] = %g / image_std[%d] = %g (both finite in float32, "
                                 "std > 0)",
                                 i, c->image_mean[i], i, c->image_std[i]);
        }
    }
    return CAPRL_OK;
}

static const char *const k_preproc_known[] = {
    /* used */
    "min_pixels", "max_pixels", "size", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std",
    "rescale_factor", "do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "resample",
    "image_processor_type",
    /* informational */
    "processor_class", "feature_extractor_type", "auto_map", "_processor_class", "data_format", "input_data_format",
    "default_to_square", "device", "return_tensors", "disable_grouping", "do_center_crop", "crop_size", "do_pad",
    "pad_size", "video_processor_type", "image_seq_length"};

/* A JSON number as a double. The json wrapper's getters take object keys; for array elements we read the value
 * through caprl_json_describe, which prints reals with 17 significant digits (jansson's default), so strtod
 * gives back the exact double jansson parsed. */
static bool json_number_value(const struct json_t *v, double *out) {
    int64_t iv = 0;
    if (caprl_json_int_value(v, &iv)) {
        *out = (double)iv;
        return true;
    }
    char buf[64];
    caprl_json_describe(v, buf, sizeof buf);
    if (!(buf[0] == '-' || (buf[0] >= '0' && buf[0] <= '9'))) {
        return false;
    }
    char  *end = NULL;
    double d = strtod(buf, &end);
    if (!end || *end != '\0' || !isfinite(d)) {
        return false;
    }
    *out = d;
    return true;
}

/* image_mean / image_std: a list of 3 numbers, or one number for all channels (as transformers accepts). */
static caprl_status read_triple(const caprl_json_obj *o, const char *key, double out[3], caprl_error *err) {
    const struct json_t *v = caprl_json_get(o, key);
    if (caprl_json_is_null(v)) {
        return CAPRL_OK;
    }
    double vals[3];
    if (caprl_json_is_array(v)) {
        if (caprl_json_array_size(v) != 3) {
            return caprl_json_field_error(o, key, CAPRL_ERR_FORMAT, err, "expected 3 numbers (R, G, B), got %zu",
                                          caprl_json_array_size(v));
        }
        for (size_t i = 0; i < 3; i++) {
            if (!json_number_value(caprl_json_array_get(v, i), &vals[i])) {
                char buf[64];
                return caprl_json_field_error(o, key, CAPRL_ERR_FORMAT, err, "element %zu: expected a number, got %s",
                                              i, caprl_json_describe(caprl_json_array_get(v, i), buf, sizeof buf));
            }
        }
    } else if (json_number_value(v, &vals[0])) {
        vals[1] = vals[2] = vals[0];
    } else {
        char buf[64];
        return caprl_json_field_error(o, key, CAPRL_ERR_FORMAT, err, "expected a list of 3 numbers, got %s",
                                      caprl_json_describe(v, buf, sizeof buf));
    }
    memcpy(out, vals, sizeof vals);
    return CAPRL_OK;
}

static caprl_status parse_preprocessor(const caprl_json_obj *root, caprl_preprocess_config *c, caprl_error *err) {
    caprl_json_warn_unknown(root, k_preproc_known, sizeof k_preproc_known / sizeof k_preproc_known[0]);

    /* Bounds: min_pixels / max_pixels win over size.{shortest,longest}_edge, as in transformers'
     * "backward compatibility" code; with neither, the class defaults apply. */
    int64_t        min_px = HF_CLASS_MIN_PIXELS, max_px = HF_CLASS_MAX_PIXELS;
    caprl_json_obj size;
    bool           has_size = false;
    CAPRL_TRY(caprl_json_opt_object(root, "size", &size, &has_size, err));
    if (has_size) {
        static const char *const size_known[] = {"shortest_edge", "longest_edge"};
        caprl_json_warn_unknown(&size, size_known, 2);
        CAPRL_TRY(caprl_json_get_int(&size, "shortest_edge", 0, EXACT_INT_MAX, &min_px, err));
        CAPRL_TRY(caprl_json_get_int(&size, "longest_edge", 1, EXACT_INT_MAX, &max_px, err));
    }
    CAPRL_TRY(caprl_json_opt_int(root, "min_pixels", 0, EXACT_INT_MAX, min_px, &min_px, err));
    CAPRL_TRY(caprl_json_opt_int(root, "max_pixels", 1, EXACT_INT_MAX, max_px, &max_px, err));
    if (!has_size && !caprl_json_has(root, "min_pixels") && !caprl_json_has(root, "max_pixels")) {
        LOG_INFO("%s: no min_pixels/max_pixels/size: transformers class defaults [%lld, %lld] apply", root->file,
                 (long long)min_px, (long long)max_px);
    }
    c->min_pixels = min_px;
    c->max_pixels = max_px;

    CAPRL_TRY(caprl_json_opt_i32(root, "patch_size", 1, 1024, c->patch_size, &c->patch_size, err));
    CAPRL_TRY(caprl_json_opt_i32(root, "merge_size", 1, 64, c->merge_size, &c->merge_size, err));
    CAPRL_TRY(caprl_json_opt_i32(root, "temporal_patch_size", 1, 64, c->temporal_patch_size,
                                 &c->temporal_patch_size, err));
    CAPRL_TRY(caprl_json_opt_bool(root, "do_resize", c->do_resize, &c->do_resize, err));
    CAPRL_TRY(caprl_json_opt_bool(root, "do_rescale", c->do_rescale, &c->do_rescale, err));
    CAPRL_TRY(caprl_json_opt_bool(root, "do_normalize", c->do_normalize, &c->do_normalize, err));
    bool convert_rgb = true;
    CAPRL_TRY(caprl_json_opt_bool(root, "do_convert_rgb", true, &convert_rgb, err));
    if (!convert_rgb) {
        LOG_WARN("%s: do_convert_rgb is false; caprl always decodes images to RGB", root->file);
    }
    CAPRL_TRY(caprl_json_opt_number(root, "rescale_factor", c->rescale_factor, &c->rescale_factor, err));
    if (!(c->rescale_factor > 0.0)) {
        return caprl_json_field_error(root, "rescale_factor", CAPRL_ERR_FORMAT, err, "must be positive, got %g",
                                      c->rescale_factor);
    }
    CAPRL_TRY(read_triple(root, "image_mean", c->image_mean, err));
    CAPRL_TRY(read_triple(root, "image_std", c->image_std, err));
    for (int i = 0; i < 3; i++) {
        if (!((float)c->image_std[i] > 0.0f)) {
            return caprl_json_field_error(root, "image_std", CAPRL_ERR_FORMAT, err,
                                          "element %d must be positive, got %g", i, c->image_std[i]);
        }
    }
    int64_t resample = 3;
    CAPRL_TRY(caprl_json_opt_int(root, "resample", 0, 5, 3, &resample, err));
    if (resample != 3) {
        return caprl_json_field_error(root, "resample", CAPRL_ERR_UNSUPPORTED, err,
                                      "PIL filter %lld; caprl reproduces only BICUBIC (3)", (long long)resample);
    }
    const char *type = NULL;
    CAPRL_TRY(caprl_json_opt_string(root, "image_processor_type", NULL, &type, err));
    if (type && strstr(type, "Fast")) {
        LOG_WARN("%s: image_processor_type %s: the torchvision 'fast' processor differs in low bits; caprl computes "
                 "the slow (PIL) processor's values",
                 root->file, type);
    } else if (type && strcmp(type, "Qwen2VLImageProcessor") != 0) {
        LOG_WARN("%s: image_processor_type %s: caprl implements Qwen2VLImageProcessor", root->file, type);
    }
    return CAPRL_OK;
}

caprl_status caprl_preprocess_config_load(caprl_preprocess_config *cfg, const char *path, caprl_error *err) {
    if (!cfg || !path) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_preprocess_config_load: NULL argument");
    }
    char *file = caprl_path_is_dir(path) ? caprl_path_join(path, PREPROCESSOR_CONFIG_NAME) : caprl_xstrdup(path);
    struct json_t *doc = NULL;
    caprl_status   st = caprl_json_load_file(&doc, file, PREPROCESSOR_CONFIG_MAX_BYTES, err);
    caprl_json_obj root;
    caprl_preprocess_config c = caprl_preprocess_config_default();
    if (st == CAPRL_OK) {
        st = caprl_json_root(&root, doc, file, err);
    }
    if (st == CAPRL_OK) {
        st = parse_preprocessor(&root, &c, err);
    }
    if (st == CAPRL_OK) {
        st = caprl_preprocess_config_check(&c, err);
        if (st != CAPRL_OK) {
            caprl_err_prefix(err, "%s", file);
            st = CAPRL_ERR_FORMAT;
            if (err) {
                err->code = st;
            }
        }
    }
    caprl_json_free(doc);
    free(file);
    if (st == CAPRL_OK) {
        *cfg = c;
    }
    return st;
}

/* ---- the processor ---------------------------------------------------------------------------------------- */

caprl_status caprl_image_preprocess_size(int32_t width, int32_t height, const caprl_preprocess_config *cfg,
                                         int32_t *out_width, int32_t *out_height, caprl_error *err) {
    CAPRL_TRY(caprl_preprocess_config_check(cfg, err));
    const int32_t factor = cfg->patch_size * cfg->merge_size;
    int64_t       h = height, w = width;
    if (cfg->resize_variant == CAPRL_RESIZE_QWEN_VL_UTILS) {
        CAPRL_TRY(caprl_smart_resize(h, w, factor, cfg->fetch_min_pixels, cfg->fetch_max_pixels,
                                     CAPRL_RESIZE_QWEN_VL_UTILS, &h, &w, err));
    }
    if (cfg->do_resize) {
        CAPRL_TRY(caprl_smart_resize(h, w, factor, cfg->min_pixels, cfg->max_pixels, CAPRL_RESIZE_HF, &h, &w, err));
    } else if (h % factor != 0 || w % factor != 0) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                             "image %lldx%lld (w x h): do_resize is false but the sides are not multiples of %d",
                             (long long)w, (long long)h, factor);
    }
    *out_height = (int32_t)h;
    *out_width = (int32_t)w;
    return CAPRL_OK;
}

/* Resizes *img (w x h) to (nw x nh) when the size differs, replacing *img (owned) with a fresh buffer. */
static caprl_status resize_stage(uint8_t **img, int32_t *w, int32_t *h, int32_t nw, int32_t nh, bool *owned,
                                 caprl_error *err) {
    if (nw == *w && nh == *h) {
        return CAPRL_OK; /* PIL returns a copy: nothing to compute */
    }
    uint8_t *out = NULL;
    CAPRL_TRY(caprl_image_alloc_px(nw, nh, 3, "preprocess", &out, err));
    caprl_status st = caprl_image_resize_bicubic(*img, *w, *h, out, nw, nh, err);
    if (st != CAPRL_OK) {
        free(out);
        return st;
    }
    if (*owned) {
        free(*img);
    }
    *img = out;
    *owned = true;
    *w = nw;
    *h = nh;
    return CAPRL_OK;
}

caprl_status caprl_image_preprocess(const caprl_image *rgb, const caprl_preprocess_config *cfg, float **pixel_values,
                                    int64_t *n_patches, int32_t grid_thw[3], caprl_error *err) {
    if (!rgb || !rgb->data || rgb->width < 1 || rgb->height < 1 || !pixel_values || !n_patches || !grid_thw) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_image_preprocess: bad arguments");
    }
    CAPRL_TRY(caprl_preprocess_config_check(cfg, err));
    const int32_t factor = cfg->patch_size * cfg->merge_size;

    /* The resize stages, as the pipelines run them: qwen-vl-utils' fetch_image, then the processor's own. */
    uint8_t *img = rgb->data;
    bool     owned = false;
    int32_t  w = rgb->width, h = rgb->height;
    int64_t  th = h, tw = w;
    caprl_status st = CAPRL_OK;
    if (cfg->resize_variant == CAPRL_RESIZE_QWEN_VL_UTILS) {
        st = caprl_smart_resize(h, w, factor, cfg->fetch_min_pixels, cfg->fetch_max_pixels,
                                CAPRL_RESIZE_QWEN_VL_UTILS, &th, &tw, err);
        if (st == CAPRL_OK) {
            st = resize_stage(&img, &w, &h, (int32_t)tw, (int32_t)th, &owned, err);
        }
    }
    if (st == CAPRL_OK && cfg->do_resize) {
        st = caprl_smart_resize(h, w, factor, cfg->min_pixels, cfg->max_pixels, CAPRL_RESIZE_HF, &th, &tw, err);
        if (st == CAPRL_OK) {
            st = resize_stage(&img, &w, &h, (int32_t)tw, (int32_t)th, &owned, err);
        }
    } else if (st == CAPRL_OK && (h % factor != 0 || w % factor != 0)) {
        st = caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                           "image %dx%d (w x h): do_resize is false but the sides are not multiples of %d", w, h,
                           factor);
    }
    if (st != CAPRL_OK) {
        if (owned) {
            free(img);
        }
        return st;
    }

    /* rescale + normalize, tabulated per (channel, byte) */
    float lut[3][256];
    for (int c = 0; c < 3; c++) {
        const float mean = (float)cfg->image_mean[c], std = (float)cfg->image_std[c];
        for (int v = 0; v < 256; v++) {
            float x = cfg->do_rescale ? (float)((double)v * cfg->rescale_factor) : (float)v;
            if (cfg->do_normalize) {
                float centered = x - mean;
                x = centered / std;
            }
            lut[c][v] = x;
        }
    }

    /* patchify: spec/qwen.md §3.3 with merge size m, patch p, T temporal copies of the single frame */
    const int32_t p = cfg->patch_size, m = cfg->merge_size, T = cfg->temporal_patch_size;
    const int32_t gh = h / p, gw = w / p;
    const size_t  row_len = (size_t)3 * (size_t)T * (size_t)p * (size_t)p;
    const size_t  n_rows = (size_t)gh * (size_t)gw;
    size_t        n_floats = 0, n_bytes = 0;
    float        *pv = NULL;
    if (!caprl_mul_size(n_rows, row_len, &n_floats) || !caprl_mul_size(n_floats, sizeof(float), &n_bytes) ||
        !(pv = caprl_try_malloc(n_bytes))) {
        if (owned) {
            free(img);
        }
        return caprl_err_set(err, CAPRL_ERR_OOM, "preprocess: cannot allocate pixel_values [%zu, %zu]", n_rows,
                             row_len);
    }
    size_t r = 0;
    for (int32_t bh = 0; bh < gh / m; bh++) {
        for (int32_t bw = 0; bw < gw / m; bw++) {
            for (int32_t mh = 0; mh < m; mh++) {
                for (int32_t mw = 0; mw < m; mw++, r++) {
                    float        *row = pv + r * row_len;
                    const int32_t y0 = (bh * m + mh) * p, x0 = (bw * m + mw) * p;
                    size_t        e = 0;
                    for (int32_t c = 0; c < 3; c++) {
                        for (int32_t tt = 0; tt < T; tt++) {
                            for (int32_t py = 0; py < p; py++) {
                                const uint8_t *src = img + ((size_t)(y0 + py) * (size_t)w + (size_t)x0) * 3 + c;
                                for (int32_t px = 0; px < p; px++) {
                                    row[e++] = lut[c][src[(size_t)px * 3]];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    CAPRL_ASSERT(r == n_rows);
    if (owned) {
        free(img);
    }
    *pixel_values = pv;
    *n_patches = (int64_t)n_rows;
    grid_thw[0] = 1;
    grid_thw[1] = gh;
    grid_thw[2] = gw;
    return CAPRL_OK;
}
