/* libFuzzer target: caprl_image_decode_buffer (PNG, JPEG, WebP through our libpng / libjpeg-turbo / libwebp
 * wrappers, so the limits, the longjmp paths and the Pillow mode conversions all run) and caprl_image_preprocess
 * on whatever decodes, with a small pixel budget so each input stays cheap.
 * Properties (a violation traps): a rejected input has an error status and a message naming the buffer; an
 * accepted one has positive sides within the budget; the two alpha rules agree unless the source is RGBA; the
 * preprocessed grid matches caprl_image_preprocess_size and every value is finite and within the range the
 * normalization allows.
 * Build with -DCAPRL_FUZZ_MAIN for a plain replayer: fuzz_image FILE... */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/image.h"
#include "fuzz_util.h"

#define FUZZ_MAX_PIXELS (1 << 16)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_preprocess(const caprl_image *img) {
    caprl_preprocess_config cfg = caprl_preprocess_config_default();
    cfg.max_pixels = 28 * 28 * 16;
    cfg.fetch_max_pixels = 28 * 28 * 16;
    float      *pv = NULL;
    int64_t     n = 0;
    int32_t     grid[3] = {0, 0, 0};
    caprl_error err;
    memset(&err, 0, sizeof err);
    caprl_status s = caprl_image_preprocess(img, &cfg, &pv, &n, grid, &err);
    if (s != CAPRL_OK) {
        /* only smart_resize may refuse a decoded image (aspect ratio above 200) */
        FUZZ_REQUIRE(s == CAPRL_ERR_UNSUPPORTED && pv == NULL);
        return;
    }
    int32_t oh = 0, ow = 0;
    FUZZ_REQUIRE(caprl_image_preprocess_size(img->width, img->height, &cfg, &ow, &oh, &err) == CAPRL_OK);
    FUZZ_REQUIRE(grid[0] == 1 && grid[1] * 14 == oh && grid[2] * 14 == ow && n == (int64_t)grid[1] * grid[2]);
    FUZZ_REQUIRE((int64_t)oh * ow <= cfg.max_pixels && oh % 28 == 0 && ow % 28 == 0);
    for (int64_t i = 0; i < n * 1176; i++) {
        int   c = (int)((i % 1176) / (2 * 14 * 14));
        float lo = (0.0f - (float)cfg.image_mean[c]) / (float)cfg.image_std[c];
        float hi = (1.0f - (float)cfg.image_mean[c]) / (float)cfg.image_std[c];
        FUZZ_REQUIRE(isfinite(pv[i]) && pv[i] >= lo && pv[i] <= hi);
    }
    caprl_free(pv);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    caprl_log_set_level(CAPRL_LOG_ERROR); /* libjpeg's corrupt-data warnings would flood the output */
    caprl_image               img[CAPRL_ALPHA_COUNT];
    caprl_status              st[CAPRL_ALPHA_COUNT];
    caprl_image_decode_params p = caprl_image_decode_default_params();
    p.max_pixels = FUZZ_MAX_PIXELS;
    for (int a = 0; a < CAPRL_ALPHA_COUNT; a++) {
        caprl_error err;
        memset(&err, 0, sizeof err);
        memset(&img[a], 0, sizeof img[a]);
        p.alpha = a;
        st[a] = caprl_image_decode_buffer(data, size, "fuzz-image", &p, &img[a], &err);
        if (st[a] != CAPRL_OK) {
            FUZZ_REQUIRE(st[a] < 0 && err.code == st[a] && strstr(err.msg, "fuzz-image") != NULL);
            FUZZ_REQUIRE(img[a].data == NULL);
        } else {
            FUZZ_REQUIRE(img[a].width > 0 && img[a].height > 0 && img[a].data != NULL);
            FUZZ_REQUIRE((int64_t)img[a].width * img[a].height <= FUZZ_MAX_PIXELS);
            FUZZ_REQUIRE(img[a].src_mode >= 0 && img[a].src_mode < CAPRL_IMAGE_MODE_COUNT);
        }
    }
    /* decoding is deterministic: the alpha rule is the only difference */
    FUZZ_REQUIRE(st[0] == st[1]);
    if (st[0] == CAPRL_OK) {
        FUZZ_REQUIRE(img[0].width == img[1].width && img[0].height == img[1].height &&
                     img[0].src_mode == img[1].src_mode);
        if (img[0].src_mode != CAPRL_IMAGE_MODE_RGBA) {
            FUZZ_REQUIRE(memcmp(img[0].data, img[1].data, (size_t)img[0].width * (size_t)img[0].height * 3) == 0);
        }
        check_preprocess(&img[0]);
    }
    for (int a = 0; a < CAPRL_ALPHA_COUNT; a++) {
        caprl_image_free(&img[a]);
    }
    return 0;
}
