/* libpng writer: RGB8 pixels -> PNG bytes in memory (see png_write_impl.h).
 *
 * The output must be byte-identical across runs and thread counts (`caprl synth` promises it), so nothing that
 * varies is written: no tIME, no text chunks; filter selection and zlib settings are fixed.
 * libpng reports fatal errors by longjmp: the setjmp stays in caprl_png_encode_rgb8, the state the callbacks
 * change lives behind a pointer that is not reassigned after setjmp, and nothing is locked across it. */
#include <png.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error_impl.h"
#include "core/log_impl.h"
#include "image/png_write_impl.h"

#define PNG_WRITE_MAX_SIDE (1 << 24)

typedef struct png_out {
    uint8_t *buf;
    size_t   len, cap;
    bool     oom;
    char     msg[200];
} png_out;

static void on_write(png_structp png, png_bytep data, size_t n) {
    png_out *o = png_get_io_ptr(png);
    if (n > o->cap - o->len) {
        size_t cap = o->cap ? o->cap : 4096;
        while (n > cap - o->len) {
            if (cap > SIZE_MAX / 2) {
                o->oom = true;
                png_error(png, "output too large");
            }
            cap *= 2;
        }
        uint8_t *nb = realloc(o->buf, cap);
        if (!nb) {
            o->oom = true;
            png_error(png, "out of memory");
        }
        o->buf = nb;
        o->cap = cap;
    }
    memcpy(o->buf + o->len, data, n);
    o->len += n;
}

static void on_flush(png_structp png) {
    (void)png;
}

static void on_error(png_structp png, png_const_charp msg) {
    png_out *o = png_get_error_ptr(png);
    snprintf(o->msg, sizeof o->msg, "%s", msg ? msg : "unknown error");
    png_longjmp(png, 1);
}

static void on_warning(png_structp png, png_const_charp msg) {
    (void)png;
    LOG_DEBUG("libpng warning while writing: %s", msg ? msg : "");
}

caprl_status caprl_png_encode_rgb8(const uint8_t *px, int32_t width, int32_t height, int32_t level, uint8_t **out,
                                   size_t *out_size, caprl_error *err) {
    *out = NULL;
    *out_size = 0;
    if (width < 1 || height < 1 || width > PNG_WRITE_MAX_SIDE || height > PNG_WRITE_MAX_SIDE || level < 0 ||
        level > 9) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "PNG encoder: bad size %dx%d or level %d", (int)width,
                             (int)height, (int)level);
    }
    /* On the heap: the callbacks change it between setjmp and a possible longjmp. */
    png_out *o = caprl_try_calloc(1, sizeof *o);
    if (!o) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "PNG encoder: out of memory");
    }
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, o, on_error, on_warning);
    png_infop   info = png ? png_create_info_struct(png) : NULL;
    if (!info) {
        png_destroy_write_struct(&png, NULL);
        free(o);
        return caprl_err_set(err, CAPRL_ERR_OOM, "PNG encoder: cannot create a libpng writer");
    }
    if (setjmp(png_jmpbuf(png))) {
        caprl_status st = o->oom ? caprl_err_set(err, CAPRL_ERR_OOM, "PNG encoder: %s", o->msg)
                                 : caprl_err_set(err, CAPRL_ERR_IO, "PNG encoder: libpng: %s", o->msg);
        png_destroy_write_struct(&png, &info);
        free(o->buf);
        free(o);
        return st;
    }
    png_set_write_fn(png, o, on_write, on_flush);
    png_set_IHDR(png, info, (png_uint_32)width, (png_uint_32)height, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_set_compression_level(png, level);
    png_set_filter(png, PNG_FILTER_TYPE_BASE, PNG_ALL_FILTERS);
    png_write_info(png, info);
    size_t row_bytes = (size_t)width * 3;
    for (int32_t y = 0; y < height; y++) {
        png_write_row(png, px + (size_t)y * row_bytes);
    }
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    *out = o->buf;
    *out_size = o->len;
    free(o);
    return CAPRL_OK;
}
