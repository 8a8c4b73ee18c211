/* Qwen2-VL preprocessing (spec/qwen.md §3.3, §4.2, §4.3): smart_resize against the spec's examples and a table
 * computed by Python's own arithmetic (scripts/dump_pixels.py smart_resize, both variants), the patch layout
 * with images whose pixels encode their coordinates, the rescale/normalize arithmetic, preprocessor_config.json
 * parsing, and whole-pipeline goldens: pixel_values of the HF slow processor written in numpy (hash of the
 * float32 bytes, scripts/dump_pixels.py) for pipelines A and B. */
#include <math.h>
#include <stdint.h>

#include "caprl/image.h"
#include "caprl_test.h"
#include "core/error_impl.h"

#define FIX CAPRL_SOURCE_DIR "/tests/fixtures/img/"

/* ---- smart_resize --------------------------------------------------------------------------------------------- */

typedef struct sr_case {
    int64_t h, w, min_px, max_px;
    int32_t utils;
    int64_t want_h, want_w; /* -1: Python raises (or yields a zero side, which PIL then refuses) */
} sr_case;

/* Generated with /usr/bin/python3 from the smart_resize of scripts/dump_pixels.py (transformers v4.50 and
 * qwen-vl-utils arithmetic), factor 28. */
static const sr_case k_python_cases[] = {
    {2680, 1263, 0, 12845056, 0, 2688, 1260}, {2680, 1263, 0, 12845056, 1, 2688, 1260},
    {5, 275, 3136, 3136, 0, -1, -1}, {5, 275, 3136, 3136, 1, -1, -1}, {2900, 17627, 6272, 12845056, 0, 1428, 8820},
    {2900, 17627, 6272, 12845056, 1, 1428, 8820}, {14, 406, 0, 12845056, 0, -1, -1},
    {14, 406, 0, 12845056, 1, 28, 392}, {1999, 771, 0, 12845056, 0, 1988, 784},
    {1999, 771, 0, 12845056, 1, 1988, 784}, {53, 290, 3136, 1003520, 0, 56, 280},
    {53, 290, 3136, 1003520, 1, 56, 280}, {3027, 19910, 0, 12845056, 0, 1372, 9184},
    {3027, 19910, 0, 12845056, 1, 1372, 9184}, {42, 70, 6272, 3136, 0, 84, 112}, {42, 70, 6272, 3136, 1, 84, 112},
    {3461, 1209, 3136, 200704, 0, 756, 252}, {3461, 1209, 3136, 200704, 1, 756, 252},
    {20, 287, 6272, 12845056, 0, -1, -1}, {20, 287, 6272, 12845056, 1, 28, 280},
    {19717, 7156, 100352, 12845056, 0, 5936, 2156}, {19717, 7156, 100352, 12845056, 1, 5936, 2156},
    {126, 658, 3136, 200704, 0, 112, 672}, {126, 658, 3136, 200704, 1, 112, 672}, {516, 1715, 0, 200704, 0, 224, 812},
    {516, 1715, 0, 200704, 1, 224, 812}, {28, 398, 100352, 12845056, 0, 112, 1204},
    {28, 398, 100352, 12845056, 1, 112, 1204}, {15849, 12848, 100352, 1003520, 0, 1092, 896},
    {15849, 12848, 100352, 1003520, 1, 1092, 896}, {182, 182, 6272, 12845056, 0, 168, 168},
    {182, 182, 6272, 12845056, 1, 168, 168}, {4733, 2487, 0, 3136, 0, 56, 28}, {4733, 2487, 0, 3136, 1, 56, 28},
    {47, 230, 100352, 200704, 0, 168, 728}, {47, 230, 100352, 200704, 1, 168, 728},
    {3398, 4868, 0, 1003520, 0, 812, 1176}, {3398, 4868, 0, 1003520, 1, 812, 1176},
    {182, 322, 6272, 12845056, 0, 168, 336}, {182, 322, 6272, 12845056, 1, 168, 336},
    {3482, 349, 3136, 200704, 0, 1400, 140}, {3482, 349, 3136, 200704, 1, 1400, 140},
    {37, 161, 100352, 3136, 0, -1, -1}, {37, 161, 100352, 3136, 1, -1, -1},
    {17275, 15948, 3136, 12845056, 0, 3724, 3416}, {17275, 15948, 3136, 12845056, 1, 3724, 3416},
    {70, 462, 3136, 12845056, 0, 56, 448}, {70, 462, 3136, 12845056, 1, 56, 448}, {2564, 4762, 0, 3136, 0, 28, 56},
    {2564, 4762, 0, 3136, 1, 28, 56}, {46, 198, 100352, 12845056, 0, 168, 672},
    {46, 198, 100352, 12845056, 1, 168, 672}, {16128, 12647, 6272, 200704, 0, 504, 392},
    {16128, 12647, 6272, 200704, 1, 504, 392}, {14, 462, 3136, 1003520, 0, -1, -1},
    {14, 462, 3136, 1003520, 1, 28, 448}, {2382, 1087, 6272, 12845056, 0, 2380, 1092},
    {2382, 1087, 6272, 12845056, 1, 2380, 1092}, {26, 255, 3136, 1003520, 0, -1, -1},
    {26, 255, 3136, 1003520, 1, 28, 252}, {15718, 14161, 100352, 1003520, 0, 1036, 924},
    {15718, 14161, 100352, 1003520, 1, 1036, 924}, {182, 406, 100352, 12845056, 0, 224, 476},
    {182, 406, 100352, 12845056, 1, 224, 476}, {2967, 3144, 6272, 1003520, 0, 952, 1008},
    {2967, 3144, 6272, 1003520, 1, 952, 1008}, {6, 91, 6272, 1003520, 0, -1, -1}, {6, 91, 6272, 1003520, 1, 28, 336},
    {8645, 1395, 0, 200704, 0, 1092, 168}, {8645, 1395, 0, 200704, 1, 1092, 168},
    {42, 266, 100352, 12845056, 0, 140, 812}, {42, 266, 100352, 12845056, 1, 140, 812},
};

static void check_sr(int64_t h, int64_t w, int64_t mn, int64_t mx, int32_t variant, int64_t wh, int64_t ww) {
    int64_t     oh = -7, ow = -7;
    caprl_error err = {0};
    caprl_status st = caprl_smart_resize(h, w, 28, mn, mx, variant, &oh, &ow, &err);
    if (wh < 0) {
        CHECK_MSG(st == CAPRL_ERR_UNSUPPORTED, "%lldx%lld [%lld, %lld] variant %d: status %d, got %lldx%lld",
                  (long long)h, (long long)w, (long long)mn, (long long)mx, variant, st, (long long)oh, (long long)ow);
        CHECK(oh == -7 && ow == -7); /* outputs untouched on failure */
    } else {
        CHECK_MSG(st == CAPRL_OK && oh == wh && ow == ww,
                  "%lldx%lld [%lld, %lld] variant %d: %lldx%lld, want %lldx%lld (%s)", (long long)h, (long long)w,
                  (long long)mn, (long long)mx, variant, (long long)oh, (long long)ow, (long long)wh, (long long)ww,
                  err.msg);
    }
}

static void test_smart_resize(void) {
    const int64_t MAX = 12845056, HF_MAX = 1003520;
    for (int32_t v = 0; v < CAPRL_RESIZE_COUNT; v++) {
        /* spec/qwen.md §4.2 examples (h x w) */
        check_sr(1080, 1920, 3136, MAX, v, 1092, 1932);
        check_sr(480, 640, 3136, MAX, v, 476, 644);
        check_sr(224, 224, 3136, MAX, v, 224, 224);
        check_sr(70, 70, 3136, MAX, v, 56, 56); /* 2.5 rounds to 2: half to even */
        check_sr(4000, 6000, 3136, MAX, v, 2912, 4368);
        check_sr(1080, 1920, 3136, HF_MAX, v, 728, 1316);
        /* half to even both ways: 1.5 -> 2, 3.5 -> 4, 4.5 -> 4 */
        check_sr(42, 98, 0, MAX, v, 56, 112);
        check_sr(126, 126, 0, MAX, v, 112, 112);
        /* aspect ratio: exactly 200 passes, above 200 fails */
        check_sr(28, 5600, 3136, MAX, v, 28, 5600);
        check_sr(28, 5601, 3136, MAX, v, -1, -1);
        check_sr(5601, 28, 3136, MAX, v, -1, -1);
    }
    /* below the factor: HF raises, qwen-vl-utils clamps the rounded side to 28 */
    check_sr(27, 100, 0, MAX, CAPRL_RESIZE_HF, -1, -1);
    check_sr(10, 300, 3136, MAX, CAPRL_RESIZE_QWEN_VL_UTILS, 28, 308);
    check_sr(1, 1, 3136, MAX, CAPRL_RESIZE_QWEN_VL_UTILS, 56, 56);
    for (size_t i = 0; i < sizeof k_python_cases / sizeof k_python_cases[0]; i++) {
        const sr_case *c = &k_python_cases[i];
        check_sr(c->h, c->w, c->min_px, c->max_px, c->utils ? CAPRL_RESIZE_QWEN_VL_UTILS : CAPRL_RESIZE_HF,
                 c->want_h, c->want_w);
    }
    /* invalid arguments */
    int64_t     oh, ow;
    caprl_error err = {0};
    CHECK_STATUS(caprl_smart_resize(0, 10, 28, 0, MAX, 0, &oh, &ow, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_smart_resize(10, -1, 28, 0, MAX, 0, &oh, &ow, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_smart_resize(10, 10, 0, 0, MAX, 0, &oh, &ow, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_smart_resize(10, 10, 28, 0, 0, 0, &oh, &ow, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_smart_resize(10, 10, 28, 0, MAX, 2, &oh, &ow, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_smart_resize(INT64_C(1) << 27, INT64_C(1) << 27, 28, 0, MAX, 0, &oh, &ow, &err),
                 CAPRL_ERR_INVALID_ARG); /* h * w = 2^54: beyond exact doubles */
}

/* ---- patch layout and arithmetic ------------------------------------------------------------------------------ */

static float normalized(int v, int c, const caprl_preprocess_config *cfg) {
    float x = cfg->do_rescale ? (float)((double)v * cfg->rescale_factor) : (float)v;
    if (cfg->do_normalize) {
        x = (x - (float)cfg->image_mean[c]) / (float)cfg->image_std[c];
    }
    return x;
}

/* R = x, G = y, B = 77 + (x + y) % 5; every element of pixel_values must come from the (c, y, x) the §3.3
 * formula names, with the rescale/normalize arithmetic of §4.3. W x H multiples of patch * merge, no resize. */
static void check_layout(int32_t W, int32_t H, int32_t p, int32_t m, int32_t T, bool raw_values) {
    caprl_image img = {W, H, malloc((size_t)W * (size_t)H * 3), CAPRL_IMAGE_FORMAT_PNG, CAPRL_IMAGE_MODE_RGB};
    for (int32_t y = 0; y < H; y++) {
        for (int32_t x = 0; x < W; x++) {
            uint8_t *q = img.data + ((size_t)y * (size_t)W + (size_t)x) * 3;
            q[0] = (uint8_t)x;
            q[1] = (uint8_t)y;
            q[2] = (uint8_t)(77 + (x + y) % 5);
        }
    }
    caprl_preprocess_config cfg = caprl_preprocess_config_default();
    cfg.patch_size = p;
    cfg.merge_size = m;
    cfg.temporal_patch_size = T;
    cfg.min_pixels = 0;
    cfg.fetch_min_pixels = 0;
    if (raw_values) {
        cfg.do_rescale = false;
        cfg.do_normalize = false;
    }
    float      *pv = NULL;
    int64_t     n = 0;
    int32_t     grid[3] = {0, 0, 0};
    caprl_error err = {0};
    CHECK_OK(caprl_image_preprocess(&img, &cfg, &pv, &n, grid, &err), &err);
    if (!pv) {
        free(img.data);
        return;
    }
    const int32_t gh = H / p, gw = W / p;
    CHECK(grid[0] == 1 && grid[1] == gh && grid[2] == gw);
    CHECK_EQ_I64(n, (int64_t)gh * gw);
    const int64_t D = 3LL * T * p * p;
    int64_t       bad = 0;
    for (int64_t r = 0; r < n; r++) {
        /* invert r = ((bh * (gw/m) + bw) * m + mh) * m + mw */
        int64_t mw = r % m, mh = (r / m) % m, blk = r / ((int64_t)m * m);
        int64_t bw = blk % (gw / m), bh = blk / (gw / m);
        for (int64_t e = 0; e < D; e++) {
            /* invert e = ((c * T + tt) * p + py) * p + px */
            int64_t px = e % p, py = (e / p) % p, ct = e / ((int64_t)p * p), c = ct / T;
            int64_t y = (bh * m + mh) * p + py, x = (bw * m + mw) * p + px;
            int     v = c == 0 ? (int)(x & 255) : c == 1 ? (int)(y & 255) : 77 + (int)((x + y) % 5);
            float   want = normalized(v, (int)c, &cfg);
            float   got = pv[r * D + e];
            bad += memcmp(&got, &want, sizeof got) != 0;
        }
    }
    CHECK_MSG(bad == 0, "layout %dx%d p%d m%d T%d: %lld elements misplaced", W, H, p, m, T, (long long)bad);
    caprl_free(pv);
    free(img.data);
}

static void test_layout(void) {
    check_layout(56, 84, 14, 2, 2, true);
    check_layout(56, 84, 14, 2, 2, false);
    check_layout(84, 56, 14, 2, 2, false);
    check_layout(112, 28, 14, 2, 2, true);
    check_layout(36, 24, 4, 3, 3, true); /* other patch / merge / temporal sizes */
    check_layout(10, 15, 5, 1, 1, false);
}

/* The normalization constants against values computed by numpy (float32 arithmetic as in transformers). */
static void test_normalize_values(void) {
    caprl_preprocess_config cfg = caprl_preprocess_config_default();
    /* numpy: ((np.array([0, 128, 255], np.float64) * 0.00392156862745098).astype(np.float32)
     *          - np.float32(mean)) / np.float32(std), per channel */
    const double want[3][3] = {{-1.7922625541687012, 0.07633614540100098, 1.9303361177444458},
                               {-1.7520971298217773, 0.16889731585979462, 2.0748836994171143},
                               {-1.480219841003418, 0.33994877338409424, 2.1458969116210938}};
    const int   vals[3] = {0, 128, 255};
    for (int c = 0; c < 3; c++) {
        for (int i = 0; i < 3; i++) {
            CHECK_NEAR(normalized(vals[i], c, &cfg), want[c][i], 0, 0); /* exact float32 values */
        }
    }
}

/* ---- whole-pipeline goldens ------------------------------------------------------------------------------------ */

static uint64_t fnv1a64(const void *data, size_t n) {
    const uint8_t *p = data;
    uint64_t       h = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ p[i]) * 0x100000001B3ull;
    }
    return h;
}

static void test_goldens(void) {
    FILE *man = fopen(FIX "preprocess.txt", "r");
    CHECK(man != NULL);
    if (!man) {
        return;
    }
    char line[512];
    int  n_cases = 0;
    while (fgets(line, sizeof line, man)) {
        char               file[128], alpha[16], variant[32];
        long long          mn, mx, fmn, fmx, t, gh, gw, nf;
        unsigned long long hash;
        if (line[0] == '#' || sscanf(line, "%127s %15s %lld %lld %lld %lld %31s %lld %lld %lld %lld %llx", file, alpha,
                                     &mn, &mx, &fmn, &fmx, variant, &t, &gh, &gw, &nf, &hash) != 12) {
            continue;
        }
        n_cases++;
        char path[1024];
        snprintf(path, sizeof path, FIX "%s", file);
        caprl_image probe = {0};
        caprl_error perr = {0};
        if (caprl_image_decode_file(path, NULL, &probe, &perr) == CAPRL_ERR_UNSUPPORTED &&
            strstr(perr.msg, "without WebP")) {
            continue; /* built with -DCAPRL_WEBP=OFF */
        }
        caprl_image_free(&probe);
        caprl_image_decode_params dp = caprl_image_decode_default_params();
        dp.alpha = strcmp(alpha, "white") == 0 ? CAPRL_ALPHA_WHITE : CAPRL_ALPHA_DROP;
        caprl_image img = {0};
        caprl_error err = {0};
        CHECK_OK(caprl_image_decode_file(path, &dp, &img, &err), &err);
        caprl_preprocess_config cfg = caprl_preprocess_config_default();
        cfg.min_pixels = mn;
        cfg.max_pixels = mx;
        if (strcmp(variant, "hf") == 0) {
            cfg.resize_variant = CAPRL_RESIZE_HF;
        } else {
            cfg.resize_variant = CAPRL_RESIZE_QWEN_VL_UTILS;
            cfg.fetch_min_pixels = fmn;
            cfg.fetch_max_pixels = fmx;
        }
        float  *pv = NULL;
        int64_t n = 0;
        int32_t grid[3] = {0, 0, 0};
        CHECK_OK(caprl_image_preprocess(&img, &cfg, &pv, &n, grid, &err), &err);
        if (pv) {
            CHECK_MSG(grid[0] == t && grid[1] == gh && grid[2] == gw, "%s %s: grid %d %d %d vs %lld %lld %lld", file,
                      variant, grid[0], grid[1], grid[2], t, gh, gw);
            CHECK_EQ_I64(n * 1176, nf);
            if (n * 1176 == nf) {
                uint64_t h = fnv1a64(pv, (size_t)nf * sizeof(float));
                CHECK_MSG(h == hash, "%s (%s, %s, max %lld): pixel_values hash %016llx, numpy %016llx", file, alpha,
                          variant, mx, (unsigned long long)h, hash);
            }
            int32_t oh = 0, ow = 0;
            CHECK_OK(caprl_image_preprocess_size(img.width, img.height, &cfg, &ow, &oh, &err), &err);
            CHECK(oh == grid[1] * 14 && ow == grid[2] * 14);
        }
        caprl_free(pv);
        caprl_image_free(&img);
    }
    fclose(man);
    CHECK_MSG(n_cases >= 6, "only %d preprocess goldens", n_cases);
}

static void test_preprocess_errors(void) {
    caprl_image img = {20, 10, calloc(20 * 10, 3), CAPRL_IMAGE_FORMAT_PNG, CAPRL_IMAGE_MODE_RGB};
    caprl_preprocess_config cfg = caprl_preprocess_config_default();
    float      *pv = NULL;
    int64_t     n = -1;
    int32_t     grid[3] = {-1, -1, -1};
    caprl_error err = {0};
    /* pipeline A refuses a side under 28; pipeline B enlarges it */
    cfg.resize_variant = CAPRL_RESIZE_HF;
    CHECK_STATUS(caprl_image_preprocess(&img, &cfg, &pv, &n, grid, &err), CAPRL_ERR_UNSUPPORTED);
    CHECK(pv == NULL && n == -1 && grid[0] == -1);
    cfg.resize_variant = CAPRL_RESIZE_QWEN_VL_UTILS;
    CHECK_OK(caprl_image_preprocess(&img, &cfg, &pv, &n, grid, &err), &err);
    CHECK(grid[1] == 4 && grid[2] == 6); /* h 10, w 20 -> min_pixels 3136 -> 56 x 84 */
    caprl_free(pv);
    pv = NULL;
    cfg.do_resize = false;
    cfg.resize_variant = CAPRL_RESIZE_HF;
    CHECK_STATUS(caprl_image_preprocess(&img, &cfg, &pv, &n, grid, &err), CAPRL_ERR_UNSUPPORTED);
    free(img.data);
    /* aspect ratio above 200 */
    caprl_image wide = {6000, 28, calloc(6000 * 28, 3), CAPRL_IMAGE_FORMAT_PNG, CAPRL_IMAGE_MODE_RGB};
    cfg = caprl_preprocess_config_default();
    CHECK_STATUS(caprl_image_preprocess(&wide, &cfg, &pv, &n, grid, &err), CAPRL_ERR_UNSUPPORTED);
    CHECK(strstr(err.msg, "aspect ratio") != NULL);
    free(wide.data);
    /* bad config */
    cfg = caprl_preprocess_config_default();
    cfg.image_std[1] = 0.0;
    CHECK_STATUS(caprl_preprocess_config_check(&cfg, &err), CAPRL_ERR_INVALID_ARG);
    cfg = caprl_preprocess_config_default();
    cfg.patch_size = 0;
    CHECK_STATUS(caprl_preprocess_config_check(&cfg, &err), CAPRL_ERR_INVALID_ARG);
    cfg = caprl_preprocess_config_default();
    cfg.rescale_factor = NAN;
    CHECK_STATUS(caprl_preprocess_config_check(&cfg, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_image_preprocess(NULL, &cfg, &pv, &n, grid, &err), CAPRL_ERR_INVALID_ARG);
}

/* ---- preprocessor_config.json -------------------------------------------------------------------------------- */

static int  g_warnings;
static char g_last_warning[1024];

static void capture_log(int32_t level, const char *msg, void *ud) {
    (void)ud;
    if (level == CAPRL_LOG_WARN) {
        g_warnings++;
        snprintf(g_last_warning, sizeof g_last_warning, "%s", msg);
    }
}

static char g_dir[4096];

static const char *write_cfg(const char *name, const char *text) {
    static char path[4300];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "wb");
    fputs(text, f);
    fclose(f);
    return path;
}

static caprl_status load_text(const char *text, caprl_preprocess_config *cfg, caprl_error *err) {
    g_warnings = 0;
    g_last_warning[0] = '\0';
    return caprl_preprocess_config_load(cfg, write_cfg("preprocessor_config.json", text), err);
}

static void test_config(void) {
    char *dir = test_tmpdir("test_image_preprocess");
    snprintf(g_dir, sizeof g_dir, "%s", dir);
    free(dir);
    caprl_log_set_callback(capture_log, NULL);
    caprl_log_set_level(CAPRL_LOG_WARN);
    caprl_preprocess_config c, def = caprl_preprocess_config_default();
    caprl_error             err = {0};

    /* Qwen2.5-VL-3B-Instruct's published file */
    CHECK_OK(load_text("{\n  \"min_pixels\": 3136,\n  \"max_pixels\": 12845056,\n  \"patch_size\": 14,\n"
                       "  \"temporal_patch_size\": 2,\n  \"merge_size\": 2,\n"
                       "  \"image_mean\": [0.48145466, 0.4578275, 0.40821073],\n"
                       "  \"image_std\": [0.26862954, 0.26130258, 0.27577711],\n"
                       "  \"image_processor_type\": \"Qwen2VLImageProcessor\",\n"
                       "  \"processor_class\": \"Qwen2_5_VLProcessor\"\n}\n",
                       &c, &err),
             &err);
    CHECK_EQ_I64(g_warnings, 0);
    CHECK(c.min_pixels == 3136 && c.max_pixels == 12845056 && c.patch_size == 14 && c.merge_size == 2 &&
          c.temporal_patch_size == 2);
    CHECK(memcmp(c.image_mean, def.image_mean, sizeof c.image_mean) == 0); /* parsed to the exact same doubles */
    CHECK(memcmp(c.image_std, def.image_std, sizeof c.image_std) == 0);
    CHECK(c.rescale_factor == 0.00392156862745098 && c.do_resize && c.do_rescale && c.do_normalize);
    CHECK(c.resize_variant == def.resize_variant && c.fetch_max_pixels == def.fetch_max_pixels);
    /* a directory works too */
    caprl_preprocess_config c2;
    CHECK_OK(caprl_preprocess_config_load(&c2, g_dir, &err), &err);
    CHECK(memcmp(&c, &c2, sizeof c) == 0);

    /* newer saves: size dict plus min/max, every do_* flag, resample 3 */
    CHECK_OK(load_text("{\"size\": {\"shortest_edge\": 1000, \"longest_edge\": 2000000}, \"do_resize\": true, "
                       "\"do_rescale\": true, \"do_normalize\": false, \"do_convert_rgb\": true, \"resample\": 3, "
                       "\"rescale_factor\": 0.5, \"image_mean\": 0.5, \"image_std\": [1, 2, 3]}",
                       &c, &err),
             &err);
    CHECK(c.min_pixels == 1000 && c.max_pixels == 2000000 && !c.do_normalize && c.rescale_factor == 0.5);
    CHECK(c.image_mean[0] == 0.5 && c.image_mean[2] == 0.5 && c.image_std[0] == 1.0 && c.image_std[2] == 3.0);
    /* min_pixels / max_pixels win over size */
    CHECK_OK(load_text("{\"size\": {\"shortest_edge\": 1000, \"longest_edge\": 2000000}, \"min_pixels\": 3136, "
                       "\"max_pixels\": 12845056}",
                       &c, &err),
             &err);
    CHECK(c.min_pixels == 3136 && c.max_pixels == 12845056);
    /* nothing about bounds: the transformers class defaults */
    CHECK_OK(load_text("{}", &c, &err), &err);
    CHECK(c.min_pixels == 3136 && c.max_pixels == 1003520);
    /* unknown keys warn, naming them */
    CHECK_OK(load_text("{\"min_pixels\": 3136, \"frobnicate\": 1, \"size\": {\"shortest_edge\": 1, "
                       "\"longest_edge\": 2, \"height\": 3}}",
                       &c, &err),
             &err);
    CHECK_EQ_I64(g_warnings, 2);
    CHECK(strstr(g_last_warning, "size.height") != NULL);
    /* the fast processor warns */
    CHECK_OK(load_text("{\"image_processor_type\": \"Qwen2VLImageProcessorFast\"}", &c, &err), &err);
    CHECK(g_warnings == 1 && strstr(g_last_warning, "fast") != NULL);

    /* bad values name their field; *cfg stays untouched */
    struct {
        const char  *text, *needle;
        caprl_status code;
    } bad[] = {
        {"{\"image_mean\": [0.5, 0.5]}", "image_mean", CAPRL_ERR_FORMAT},
        {"{\"image_mean\": [0.5, \"x\", 0.5]}", "image_mean", CAPRL_ERR_FORMAT},
        {"{\"image_std\": [0.5, 0, 0.5]}", "image_std", CAPRL_ERR_FORMAT},
        {"{\"image_mean\": [1e39, 0, 0]}", "image_mean", CAPRL_ERR_FORMAT}, /* infinite as float32 */
        {"{\"image_std\": \"0.5\"}", "image_std", CAPRL_ERR_FORMAT},
        {"{\"patch_size\": \"14\"}", "patch_size", CAPRL_ERR_FORMAT},
        {"{\"patch_size\": 0}", "patch_size", CAPRL_ERR_FORMAT},
        {"{\"merge_size\": 2.5}", "merge_size", CAPRL_ERR_FORMAT},
        {"{\"max_pixels\": -5}", "max_pixels", CAPRL_ERR_FORMAT},
        {"{\"min_pixels\": 1e30}", "min_pixels", CAPRL_ERR_FORMAT},
        {"{\"size\": {\"shortest_edge\": 3136}}", "longest_edge", CAPRL_ERR_FORMAT},
        {"{\"size\": [1, 2]}", "size", CAPRL_ERR_FORMAT},
        {"{\"rescale_factor\": -1}", "rescale_factor", CAPRL_ERR_FORMAT},
        {"{\"do_resize\": 1}", "do_resize", CAPRL_ERR_FORMAT},
        {"{\"resample\": 2}", "resample", CAPRL_ERR_UNSUPPORTED},
        {"{\"min_pixels\": 3136,\n \"max_pixels\": }", "2:", CAPRL_ERR_FORMAT},
        {"[1, 2]", "preprocessor_config.json", CAPRL_ERR_FORMAT},
        {"{\"a\": 1, \"a\": 2}", "duplicate", CAPRL_ERR_FORMAT},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        caprl_preprocess_config keep = def;
        keep.patch_size = 99;
        caprl_status st = load_text(bad[i].text, &keep, &err);
        CHECK_MSG(st == bad[i].code, "%s: status %d, expected %d (%s)", bad[i].text, st, bad[i].code, err.msg);
        CHECK_MSG(strstr(err.msg, bad[i].needle) != NULL, "%s: message lacks '%s': %s", bad[i].text, bad[i].needle,
                  err.msg);
        CHECK_MSG(strstr(err.msg, "preprocessor_config.json") != NULL, "%s: message lacks the file: %s", bad[i].text,
                  err.msg);
        CHECK(keep.patch_size == 99);
    }
    char missing[4400];
    snprintf(missing, sizeof missing, "%s/nope/preprocessor_config.json", g_dir);
    CHECK_STATUS(caprl_preprocess_config_load(&c, missing, &err), CAPRL_ERR_IO);
    caprl_log_set_callback(NULL, NULL);
}

int main(void) {
    test_smart_resize();
    test_layout();
    test_normalize_values();
    test_goldens();
    test_preprocess_errors();
    test_config();
    return test_finish("test_image_preprocess");
}
