/* Image decoding front end: recognises PNG, JPEG and WebP by their signatures (never by file name), names
 * anything else from its first bytes, enforces the pixel budget through the wrappers, and turns the decoder's
 * Pillow-mode output into RGB8 with the alpha rule of the chosen pipeline (spec/qwen.md §4.3, style.md §3.4).
 *
 * The alpha rule applies only where Pillow's mode is RGBA: qwen-vl-utils' to_rgb pastes an RGBA image onto a
 * white RGB canvas with the alpha band as mask, and every other mode goes through convert("RGB"). Pillow's
 * paste with an "L" mask (libImaging/Paste.c paste_mask_L) blends each channel as
 * BLEND(a, out, in) = DIV255(out * (255 - a) + in * a), with out = 255 here. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/ckmath.h"
#include "core/error_impl.h"
#include "core/file_impl.h"
#include "image/image_impl.h"

/* No real image file comes close; the bound only keeps a mistaken path (a disk image) from being read. */
#define IMAGE_FILE_MAX_BYTES ((size_t)1 << 30)

caprl_image_decode_params caprl_image_decode_default_params(void) {
    caprl_image_decode_params p;
    memset(&p, 0, sizeof p);
    p.alpha = CAPRL_ALPHA_WHITE;
    p.max_pixels = CAPRL_IMAGE_MAX_PIXELS_DEFAULT;
    return p;
}

const char *caprl_image_mode_name(int32_t mode) {
    static const char *const names[CAPRL_IMAGE_MODE_COUNT] = {"RGB", "RGBA", "L", "LA", "P", "I", "CMYK"};
    return mode >= 0 && mode < CAPRL_IMAGE_MODE_COUNT ? names[mode] : "?";
}

const char *caprl_image_format_name(int32_t format) {
    static const char *const names[CAPRL_IMAGE_FORMAT_COUNT] = {"png", "jpeg", "webp"};
    return format >= 0 && format < CAPRL_IMAGE_FORMAT_COUNT ? names[format] : "?";
}

void caprl_image_free(caprl_image *img) {
    if (img) {
        free(img->data);
        memset(img, 0, sizeof *img);
    }
}

/* ---- shared helpers for the wrappers ---------------------------------------------------------------------- */

caprl_status caprl_image_check_dims(int64_t width, int64_t height, int64_t max_pixels, const char *name,
                                    caprl_error *err) {
    if (width <= 0 || height <= 0) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: image size %lldx%lld has a zero side", name,
                             (long long)width, (long long)height);
    }
    int64_t n = 0;
    if (width > INT32_MAX || height > INT32_MAX || !caprl_mul_i64(width, height, &n) || n > max_pixels) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                             "%s: image size %lldx%lld exceeds the limit of %lld pixels (decompression bomb guard; "
                             "Pillow refuses above 178956970)",
                             name, (long long)width, (long long)height, (long long)max_pixels);
    }
    size_t bytes = 0;
    if (!caprl_mul_size((size_t)n, 8, &bytes)) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: image size %lldx%lld does not fit in memory", name,
                             (long long)width, (long long)height);
    }
    return CAPRL_OK;
}

caprl_status caprl_image_alloc_px(int32_t width, int32_t height, int32_t channels, const char *name, uint8_t **px,
                                  caprl_error *err) {
    size_t n = 0;
    if (width <= 0 || height <= 0 || channels <= 0 || !caprl_mul_size((size_t)width, (size_t)height, &n) ||
        !caprl_mul_size(n, (size_t)channels, &n)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "%s: bad image size %dx%dx%d", name, width, height,
                             channels);
    }
    uint8_t *p = caprl_try_malloc(n);
    if (!p) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot allocate %zu bytes for %dx%d pixels", name, n, width,
                             height);
    }
    *px = p;
    return CAPRL_OK;
}

/* ---- signatures ------------------------------------------------------------------------------------------ */

static bool has_prefix(const uint8_t *d, size_t n, const void *sig, size_t k) {
    return n >= k && memcmp(d, sig, k) == 0;
}

/* Names the format of a buffer we do not decode, for the UNSUPPORTED message; NULL if unrecognised. */
static const char *other_format_name(const uint8_t *d, size_t n) {
    if (has_prefix(d, n, "GIF87a", 6) || has_prefix(d, n, "GIF89a", 6)) {
        return "GIF";
    }
    if (has_prefix(d, n, "BM", 2)) {
        return "BMP";
    }
    if (has_prefix(d, n, "II*\0", 4) || has_prefix(d, n, "MM\0*", 4)) {
        return "TIFF";
    }
    if (n >= 12 && memcmp(d + 4, "ftyp", 4) == 0) {
        if (memcmp(d + 8, "avif", 4) == 0 || memcmp(d + 8, "avis", 4) == 0) {
            return "AVIF";
        }
        if (memcmp(d + 8, "heic", 4) == 0 || memcmp(d + 8, "heix", 4) == 0 || memcmp(d + 8, "mif1", 4) == 0 ||
            memcmp(d + 8, "msf1", 4) == 0) {
            return "HEIF/HEIC";
        }
        return "an ISO media file (MP4/MOV/HEIF family)";
    }
    if (has_prefix(d, n, "\xff\x0a", 2) || has_prefix(d, n, "\0\0\0\x0cJXL \r\n\x87\n", 12)) {
        return "JPEG XL";
    }
    if (has_prefix(d, n, "\0\0\0\x0cjP  \r\n\x87\n", 12) || has_prefix(d, n, "\xff\x4f\xff\x51", 4)) {
        return "JPEG 2000";
    }
    if (has_prefix(d, n, "\0\0\1\0", 4)) {
        return "ICO";
    }
    if (has_prefix(d, n, "8BPS", 4)) {
        return "PSD";
    }
    if (has_prefix(d, n, "qoif", 4)) {
        return "QOI";
    }
    if (has_prefix(d, n, "%PDF", 4)) {
        return "PDF";
    }
    if (has_prefix(d, n, "RIFF", 4)) {
        return "a RIFF file that is not WebP";
    }
    if (has_prefix(d, n, "PK\3\4", 4)) {
        return "a ZIP archive";
    }
    if (has_prefix(d, n, "\x1f\x8b", 2)) {
        return "gzip data";
    }
    if (n >= 2 && d[0] == 'P' && d[1] >= '1' && d[1] <= '7') {
        return "PNM (PBM/PGM/PPM/PAM)";
    }
    size_t i = 0;
    while (i < n && i < 64 && (d[i] == ' ' || d[i] == '\t' || d[i] == '\r' || d[i] == '\n')) {
        i++;
    }
    if (i < n && d[i] == '<') {
        return "XML/HTML/SVG text";
    }
    if (i < n && (d[i] == '{' || d[i] == '[')) {
        return "JSON text";
    }
    return NULL;
}

/* Appends up to 8 leading bytes as hex and printable text, e.g. "3c 3f 78 6d ... \"<?xm\"". */
static void describe_bytes(const uint8_t *d, size_t n, char *buf, size_t cap) {
    size_t k = n < 8 ? n : 8, used = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < k && used + 4 < cap; i++) {
        int w = snprintf(buf + used, cap - used, "%s%02x", i ? " " : "", d[i]);
        used += w > 0 ? (size_t)w : 0;
    }
    if (used + 4 < cap) {
        buf[used++] = ' ';
        buf[used++] = '"';
        for (size_t i = 0; i < k && used + 2 < cap; i++) {
            buf[used++] = d[i] >= 0x20 && d[i] < 0x7f ? (char)d[i] : '.';
        }
        buf[used++] = '"';
        buf[used] = '\0';
    }
}

/* ---- the alpha rule ---------------------------------------------------------------------------------------- */

/* Converts a decoder's output to RGB8 in place of out->data (fresh buffer for RGBA input). */
static caprl_status to_rgb(caprl_raw_image *raw, int32_t alpha, const char *name, uint8_t **rgb, caprl_error *err) {
    if (raw->channels == 3) {
        *rgb = raw->px;
        raw->px = NULL;
        return CAPRL_OK;
    }
    CAPRL_ASSERT(raw->channels == 4);
    uint8_t *out = NULL;
    CAPRL_TRY(caprl_image_alloc_px(raw->width, raw->height, 3, name, &out, err));
    size_t         n = (size_t)raw->width * (size_t)raw->height;
    const uint8_t *in = raw->px;
    if (alpha == CAPRL_ALPHA_DROP) {
        for (size_t i = 0; i < n; i++) {
            out[3 * i + 0] = in[4 * i + 0];
            out[3 * i + 1] = in[4 * i + 1];
            out[3 * i + 2] = in[4 * i + 2];
        }
    } else {
        for (size_t i = 0; i < n; i++) {
            uint32_t a = in[4 * i + 3], inv = 255u - a;
            for (size_t c = 0; c < 3; c++) {
                out[3 * i + c] = (uint8_t)caprl_pil_div255(255u * inv + (uint32_t)in[4 * i + c] * a);
            }
        }
    }
    free(raw->px);
    raw->px = NULL;
    *rgb = out;
    return CAPRL_OK;
}

/* ---- entry points ------------------------------------------------------------------------------------------ */

caprl_status caprl_image_decode_buffer(const void *data, size_t size, const char *name,
                                       const caprl_image_decode_params *params, caprl_image *out, caprl_error *err) {
    const caprl_image_decode_params defaults = caprl_image_decode_default_params();
    const caprl_image_decode_params *p = params ? params : &defaults;
    const char                      *nm = name ? name : "<buffer>";
    if (!out || (!data && size > 0)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "%s: caprl_image_decode_buffer: NULL argument", nm);
    }
    if (p->alpha < 0 || p->alpha >= CAPRL_ALPHA_COUNT || p->max_pixels <= 0) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "%s: bad decode params (alpha %d, max_pixels %lld)", nm,
                             p->alpha, (long long)p->max_pixels);
    }
    const uint8_t *d = data;
    if (size == 0) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: empty file (0 bytes)", nm);
    }
    caprl_raw_image raw;
    memset(&raw, 0, sizeof raw);
    caprl_status st;
    int32_t      format;
    if (has_prefix(d, size, "\x89PNG\r\n\x1a\n", 8)) {
        format = CAPRL_IMAGE_FORMAT_PNG;
        st = caprl_png_decode(d, size, nm, p->max_pixels, &raw, err);
    } else if (has_prefix(d, size, "\xff\xd8\xff", 3)) {
        format = CAPRL_IMAGE_FORMAT_JPEG;
        st = caprl_jpeg_decode(d, size, nm, p->max_pixels, &raw, err);
    } else if (size >= 12 && memcmp(d, "RIFF", 4) == 0 && memcmp(d + 8, "WEBP", 4) == 0) {
        format = CAPRL_IMAGE_FORMAT_WEBP;
        st = caprl_webp_decode(d, size, nm, p->max_pixels, &raw, err);
    } else if (has_prefix(d, size, "\x89PNG\r\n\x1a\n", size < 8 ? size : 8) ||
               has_prefix(d, size, "\xff\xd8\xff", size < 3 ? size : 3) ||
               (has_prefix(d, size, "RIFF", size < 4 ? size : 4) && size < 12)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: truncated file (%zu bytes, shorter than its signature)",
                             nm, size);
    } else {
        const char *other = other_format_name(d, size);
        char        bytes[64];
        describe_bytes(d, size, bytes, sizeof bytes);
        if (other) {
            return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                                 "%s: looks like %s (first bytes %s); caprl decodes PNG, JPEG and WebP", nm, other,
                                 bytes);
        }
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                             "%s: not a PNG, JPEG or WebP file (first bytes %s)", nm, bytes);
    }
    if (st != CAPRL_OK) {
        return st;
    }
    CAPRL_ASSERT(raw.px && raw.width > 0 && raw.height > 0);
    uint8_t *rgb = NULL;
    st = to_rgb(&raw, p->alpha, nm, &rgb, err);
    free(raw.px);
    if (st != CAPRL_OK) {
        return st;
    }
    memset(out, 0, sizeof *out);
    out->width = raw.width;
    out->height = raw.height;
    out->data = rgb;
    out->format = format;
    out->src_mode = raw.mode;
    return CAPRL_OK;
}

caprl_status caprl_image_decode_file(const char *path, const caprl_image_decode_params *params, caprl_image *out,
                                     caprl_error *err) {
    if (!path || !out) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_image_decode_file: NULL argument");
    }
    uint8_t *data = NULL;
    size_t   size = 0;
    CAPRL_TRY(caprl_file_read_all(path, IMAGE_FILE_MAX_BYTES, &data, &size, err));
    caprl_status st = caprl_image_decode_buffer(data, size, path, params, out, err);
    free(data);
    return st;
}
