/* libpng wrapper: one PNG buffer -> pixels as Pillow opens and converts them (style.md §3.3, §3.4).
 *
 * Pillow (9.4 and current, PngImagePlugin._MODES + Unpack.c + Convert.c) opens PNGs as:
 *   gray 1/2/4/8 bit  -> "1"/"L" (samples scaled by 255, 85, 17: what png_set_expand_gray_1_2_4_to_8 does)
 *   gray 16 bit       -> "I" (9.4) or "I;16" (newer); convert("RGB") gives min(v, 255) in both
 *   RGB 8/16          -> "RGB", 16-bit samples reduced to their HIGH byte (unpackRGB16B takes in[0], in[2],
 *                        in[4]): truncation, i.e. png_set_strip_16, not png_set_scale_16's rounding
 *   palette 1/2/4/8   -> "P"; convert("RGB") looks indices up in a 256-entry palette initialised to the gray
 *                        ramp (i, i, i) and overwritten by the PLTE entries (Palette.c ImagingPaletteNew)
 *   gray+alpha 8      -> "LA" (convert("RGB") drops alpha)
 *   gray+alpha 16     -> "RGBA" (rawmode "LA;16B": high bytes, gray replicated) -> subject to the alpha rule
 *   RGBA 8/16         -> "RGBA" (high bytes)
 * tRNS never becomes alpha: modes P/L/RGB keep it as info["transparency"], which convert("RGB") ignores.
 * No gamma, sBIT or colour-profile transform is applied (Pillow applies none). The chunks after the image data
 * are not read: Pillow tolerates a file cut after its last IDAT, so do we.
 *
 * libpng reports fatal errors by longjmp: the setjmp stays inside caprl_png_decode, the locals it changes after
 * setjmp are volatile, and no caprl lock or arena is held across it. Warnings go to caprl_log at debug level
 * (real files often carry harmless ones such as "iCCP: known incorrect sRGB profile"). */
#include <png.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error_impl.h"
#include "core/log_impl.h"
#include "image/image_impl.h"

/* Ancillary chunks bigger than this are an attack, not metadata (libpng's own default is 8 MB). */
#define PNG_CHUNK_MALLOC_MAX ((png_alloc_size_t)8 << 20)
/* Per-dimension limits: PNG's maximum; the pixel budget is the real limit and is checked after IHDR. */
#define PNG_DIM_MAX 0x7fffffffu

typedef struct png_ctx {
    const uint8_t *data;
    size_t         size, pos;
    const char    *name;
    char           msg[200];
} png_ctx;

static void on_read(png_structp png, png_bytep out, size_t n) {
    png_ctx *c = png_get_io_ptr(png);
    if (n > c->size - c->pos) {
        png_error(png, "unexpected end of file (truncated)");
    }
    memcpy(out, c->data + c->pos, n);
    c->pos += n;
}

static void on_error(png_structp png, png_const_charp msg) {
    png_ctx *c = png_get_error_ptr(png);
    snprintf(c->msg, sizeof c->msg, "%s", msg ? msg : "unknown error");
    png_longjmp(png, 1);
}

static void on_warning(png_structp png, png_const_charp msg) {
    png_ctx *c = png_get_error_ptr(png);
    LOG_DEBUG("%s: libpng warning: %s", c->name, msg ? msg : "");
}

/* 16-bit gray (big-endian samples) -> RGB: Pillow's i2rgb / I16_RGB clip to 255. */
static void gray16_to_rgb(const uint8_t *in, uint8_t *out, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t v = ((uint32_t)in[2 * i] << 8) | in[2 * i + 1];
        uint8_t  g = v > 255u ? 255u : (uint8_t)v;
        out[3 * i + 0] = out[3 * i + 1] = out[3 * i + 2] = g;
    }
}

/* Palette indices -> RGB through Pillow's 256-entry table. */
static void palette_to_rgb(const uint8_t *in, uint8_t *out, size_t n, const uint8_t table[256 * 3]) {
    for (size_t i = 0; i < n; i++) {
        memcpy(out + 3 * i, table + 3 * (size_t)in[i], 3);
    }
}

caprl_status caprl_png_decode(const uint8_t *data, size_t size, const char *name, int64_t max_pixels,
                              caprl_raw_image *out, caprl_error *err) {
    png_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.data = data;
    ctx.size = size;
    ctx.name = name;
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &ctx, on_error, on_warning);
    if (!png) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot create a libpng reader", name);
    }
    png_infop info = png_create_info_struct(png);
    if (!info) {
        png_destroy_read_struct(&png, NULL, NULL);
        return caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot create a libpng info struct", name);
    }
    /* Everything assigned after setjmp and read after a longjmp is volatile. */
    uint8_t *volatile      px = NULL;   /* (h, w, channels) result */
    uint8_t *volatile      raw = NULL;  /* (h, rowbytes) when the libpng layout differs from the result */
    png_bytep *volatile    rows = NULL; /* h row pointers */
    volatile caprl_status  st = CAPRL_OK;
    if (setjmp(png_jmpbuf(png))) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: corrupt or truncated PNG: libpng: %s", name, ctx.msg);
        goto done;
    }
    png_set_read_fn(png, &ctx, on_read);
    png_set_user_limits(png, PNG_DIM_MAX, PNG_DIM_MAX);
    png_set_chunk_malloc_max(png, PNG_CHUNK_MALLOC_MAX);
    png_read_info(png, info);

    png_uint_32 w = 0, h = 0;
    int         depth = 0, color = 0, interlace = 0;
    png_get_IHDR(png, info, &w, &h, &depth, &color, &interlace, NULL, NULL);
    st = caprl_image_check_dims((int64_t)w, (int64_t)h, max_pixels, name, err);
    if (st != CAPRL_OK) {
        goto done;
    }
    int32_t mode, channels;        /* of the result */
    size_t  raw_bytes_per_px = 0;  /* nonzero: decode into raw, then convert */
    uint8_t table[256 * 3];
    switch (color) {
    case PNG_COLOR_TYPE_GRAY:
        if (depth == 16) {
            mode = CAPRL_IMAGE_MODE_I;
            raw_bytes_per_px = 2;
        } else {
            mode = CAPRL_IMAGE_MODE_L;
            if (depth < 8) {
                png_set_expand_gray_1_2_4_to_8(png);
            }
            png_set_gray_to_rgb(png);
        }
        channels = 3;
        break;
    case PNG_COLOR_TYPE_PALETTE: {
        mode = CAPRL_IMAGE_MODE_P;
        channels = 3;
        raw_bytes_per_px = 1;
        if (depth < 8) {
            png_set_packing(png);
        }
        for (int i = 0; i < 256; i++) {
            table[3 * i + 0] = table[3 * i + 1] = table[3 * i + 2] = (uint8_t)i;
        }
        png_colorp plte = NULL;
        int        n_plte = 0;
        if (png_get_PLTE(png, info, &plte, &n_plte) == PNG_INFO_PLTE && plte) {
            for (int i = 0; i < n_plte && i < 256; i++) {
                table[3 * i + 0] = plte[i].red;
                table[3 * i + 1] = plte[i].green;
                table[3 * i + 2] = plte[i].blue;
            }
        }
        break;
    }
    case PNG_COLOR_TYPE_RGB:
        mode = CAPRL_IMAGE_MODE_RGB;
        channels = 3;
        if (depth == 16) {
            png_set_strip_16(png);
        }
        break;
    case PNG_COLOR_TYPE_RGB_ALPHA:
        mode = CAPRL_IMAGE_MODE_RGBA;
        channels = 4;
        if (depth == 16) {
            png_set_strip_16(png);
        }
        break;
    case PNG_COLOR_TYPE_GRAY_ALPHA:
        png_set_gray_to_rgb(png);
        if (depth == 16) {
            png_set_strip_16(png);
            mode = CAPRL_IMAGE_MODE_RGBA;
            channels = 4;
        } else {
            png_set_strip_alpha(png);
            mode = CAPRL_IMAGE_MODE_LA;
            channels = 3;
        }
        break;
    default:
        /* png_read_info already rejects other colour types; kept as a Tier-1 error for safety. */
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: PNG colour type %d is invalid", name, color);
        goto done;
    }
    (void)png_set_interlace_handling(png);
    png_read_update_info(png, info);

    size_t width = (size_t)w, height = (size_t)h;
    size_t want_rowbytes = width * (raw_bytes_per_px ? raw_bytes_per_px : (size_t)channels);
    size_t rowbytes = png_get_rowbytes(png, info);
    if (rowbytes != want_rowbytes) {
        /* A transform combination we did not plan for: a bug, but file-dependent, so Tier 1. */
        st = caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                           "%s: PNG colour type %d, bit depth %d: unexpected row size %zu (wanted %zu)", name, color,
                           depth, rowbytes, want_rowbytes);
        goto done;
    }
    uint8_t *pxl = NULL;
    st = caprl_image_alloc_px((int32_t)w, (int32_t)h, channels, name, &pxl, err);
    if (st != CAPRL_OK) {
        goto done;
    }
    px = pxl;
    uint8_t *target = pxl;
    if (raw_bytes_per_px) {
        uint8_t *r = NULL;
        st = caprl_image_alloc_px((int32_t)w, (int32_t)h, (int32_t)raw_bytes_per_px, name, &r, err);
        if (st != CAPRL_OK) {
            goto done;
        }
        raw = r;
        target = r;
    }
    png_bytep *rp = caprl_try_malloc(height * sizeof *rp);
    if (!rp) {
        st = caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot allocate %zu row pointers", name, height);
        goto done;
    }
    rows = rp;
    for (size_t y = 0; y < height; y++) {
        rp[y] = target + y * rowbytes;
    }
    png_read_image(png, rp);

    if (color == PNG_COLOR_TYPE_GRAY && depth == 16) {
        gray16_to_rgb(raw, px, width * height);
    } else if (color == PNG_COLOR_TYPE_PALETTE) {
        palette_to_rgb(raw, px, width * height, table);
    }
    out->width = (int32_t)w;
    out->height = (int32_t)h;
    out->channels = channels;
    out->mode = mode;
    out->px = px;
    px = NULL; /* ownership passed to out */

done:
    free(rows);
    free(raw);
    free(px);
    png_destroy_read_struct(&png, &info, NULL);
    return st;
}
