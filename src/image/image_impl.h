/* Internals of src/image: the library wrappers (png.c, jpeg.c, webp.c) each turn one compressed buffer into
 * pixels in the layout of the Pillow mode the file opens as, reduced to 3 (RGB) or 4 (RGBA) channels; decode.c
 * dispatches on the signature and applies the alpha rule. resize.c exposes its coefficient tables to the tests.
 *
 * Only png.c, jpeg.c and webp.c include third-party headers; nothing here names a third-party type. */
#ifndef CAPRL_IMAGE_IMPL_H
#define CAPRL_IMAGE_IMPL_H

#include "caprl/image.h"

/* The output of one decoder. channels is 4 only for mode CAPRL_IMAGE_MODE_RGBA; every other Pillow mode is
 * already converted to RGB the way its convert("RGB") does it. */
typedef struct caprl_raw_image {
    int32_t  width, height;
    int32_t  channels; /* 3 or 4 */
    int32_t  mode;     /* CAPRL_IMAGE_MODE_* */
    uint8_t *px;       /* (height, width, channels); caprl_try_malloc'd, free() */
} caprl_raw_image;

/* Checks width, height > 0 and width * height <= max_pixels (and that the byte size of an RGBA buffer fits in
 * size_t) before a decoder allocates anything. name is for the message. */
caprl_status caprl_image_check_dims(int64_t width, int64_t height, int64_t max_pixels, const char *name,
                                    caprl_error *err);

/* Allocates (height, width, channels) bytes or fails with CAPRL_ERR_OOM naming the size. */
caprl_status caprl_image_alloc_px(int32_t width, int32_t height, int32_t channels, const char *name, uint8_t **px,
                                  caprl_error *err);

/* Each decoder: data[0..size) holds a file whose signature matched; name is for messages. On success *out is
 * filled (out->px owned by the caller); on failure nothing is leaked and *out is untouched. */
caprl_status caprl_png_decode(const uint8_t *data, size_t size, const char *name, int64_t max_pixels,
                              caprl_raw_image *out, caprl_error *err);
caprl_status caprl_jpeg_decode(const uint8_t *data, size_t size, const char *name, int64_t max_pixels,
                               caprl_raw_image *out, caprl_error *err);
caprl_status caprl_webp_decode(const uint8_t *data, size_t size, const char *name, int64_t max_pixels,
                               caprl_raw_image *out, caprl_error *err);

/* Pillow's DIV255 (libImaging/ImagingUtils.h): round(x / 255) for 0 <= x <= 255 * 255, exactly as Pillow's
 * integer shortcut computes it. */
static inline uint32_t caprl_pil_div255(uint32_t x) {
    uint32_t t = x + 128u;
    return ((t >> 8) + t) >> 8;
}

/* ---- resize.c -------------------------------------------------------------------------------------------- */

/* Pillow's fixed-point precision for 8-bit images (Resample.c PRECISION_BITS = 32 - 8 - 2). */
#define CAPRL_RESAMPLE_PRECISION_BITS 22

/* The fixed-point coefficients of one axis, as Resample.c precompute_coeffs + normalize_coeffs_8bpc build
 * them for box [0, in_size]: output index i reads input [bounds[2i], bounds[2i] + bounds[2i+1]) with weights
 * kk[i * ksize + 0 ..]. */
typedef struct caprl_resample_axis {
    int32_t  in_size, out_size;
    int32_t  ksize;
    int32_t *bounds; /* (out_size, 2): xmin, count */
    int32_t *kk;     /* (out_size, ksize) */
} caprl_resample_axis;

caprl_status caprl_resample_axis_init(caprl_resample_axis *ax, int32_t in_size, int32_t out_size, caprl_error *err);
void         caprl_resample_axis_free(caprl_resample_axis *ax); /* NULL-safe, safe on zeroed */

/* Pillow's bicubic kernel (a = -0.5), exactly as Resample.c bicubic_filter evaluates it. */
double caprl_bicubic_kernel(double x);

#endif /* CAPRL_IMAGE_IMPL_H */
