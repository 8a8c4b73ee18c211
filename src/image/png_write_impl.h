/* PNG encoding of RGB8 pixels through libpng (src/image/png_write.c), for the images caprl writes itself (the
 * synthetic world of `caprl synth`). Only png_write.c includes <png.h>. */
#ifndef CAPRL_PNG_WRITE_IMPL_H
#define CAPRL_PNG_WRITE_IMPL_H

#include "caprl/caprl.h"

/* Encodes px (height, width, 3) as an 8-bit RGB, non-interlaced PNG with zlib level `level` (0..9) and no
 * ancillary chunks (no time stamp, gamma or text), so the bytes depend only on the pixels, the level and the
 * zlib build. On success *out (malloc'd, free()) holds *out_size bytes; on failure *out is NULL.
 * Errors: CAPRL_ERR_INVALID_ARG (sizes outside 1..2^24, level), CAPRL_ERR_OOM, CAPRL_ERR_IO (a libpng
 * write failure, with its message). Reentrant. */
caprl_status caprl_png_encode_rgb8(const uint8_t *px, int32_t width, int32_t height, int32_t level, uint8_t **out,
                                   size_t *out_size, caprl_error *err);

#endif /* CAPRL_PNG_WRITE_IMPL_H */
