/* libjpeg-turbo wrapper: one JPEG buffer -> pixels as Pillow opens and converts them (style.md §3.3, §3.4).
 *
 * Pillow (JpegImagePlugin + libImaging/JpegDecode.c) decodes with libjpeg(-turbo) at its default settings
 * (islow IDCT, fancy upsampling; draft mode and DCT scaling only on request), choosing the output colour space
 * from the number of components in the frame header:
 *   1 -> "L" (JCS_GRAYSCALE), then convert("RGB") replicates the sample;
 *   3 -> "RGB" (JCS_RGB; the source colour space is libjpeg's own guess, YCbCr or Adobe RGB);
 *   4 -> "CMYK" with rawmode "CMYK;I": libjpeg outputs JCS_CMYK (YCCK is converted to CMYK by libjpeg) and
 *        Pillow inverts every channel, "assuming Adobe conventions" whether or not an Adobe marker is present.
 *        convert("RGB") is then Convert.c cmyk2rgb: nk = 255 - K, out = CLIP8(nk - MULDIV255(C, nk)) with
 *        MULDIV255(a, b) = DIV255(a * b). With the inversion undone this is, per channel of the raw decoder
 *        output (c, k): out = k - DIV255((255 - c) * k).
 *   anything else -> Pillow refuses ("cannot handle N-layer images"); so do we (CAPRL_ERR_UNSUPPORTED).
 *
 * A file that ends early, even just before its EOI marker, is an error (Pillow raises "image file is truncated"
 * unless LOAD_TRUNCATED_IMAGES is set): libjpeg's "Premature end of JPEG file" warning, which it emits before
 * padding the data with a fake EOI, is fatal here. Other corrupt-data warnings are not fatal, as in Pillow; the
 * first is logged. Progressive files with an absurd number of scans (a known CPU-exhaustion pattern) are refused.
 *
 * error_exit longjmps back into caprl_jpeg_decode (it must never return or exit); the locals changed after
 * setjmp are volatile. */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jerror.h>
#include <jpeglib.h>

#include "core/error_impl.h"
#include "core/log_impl.h"
#include "image/image_impl.h"

/* Real progressive files use about 10 scans; libjpeg-turbo's own tools cap this at 500. */
#define JPEG_MAX_SCANS 1000
/* libjpeg's working memory (a progressive file keeps all its coefficients: ~2 bytes per sample). */
#define JPEG_MAX_MEMORY (2048L * 1024L * 1024L)

typedef struct jpeg_ctx {
    struct jpeg_error_mgr    pub; /* first: libjpeg hands back a pointer to it */
    struct jpeg_progress_mgr progress;
    jmp_buf                  jb;
    const char              *name;
    int32_t                  n_warnings;
    char                     msg[JMSG_LENGTH_MAX + 64];
} jpeg_ctx;

static void on_error_exit(j_common_ptr cinfo) {
    jpeg_ctx *c = (jpeg_ctx *)(void *)cinfo->err;
    char      buf[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, buf);
    snprintf(c->msg, sizeof c->msg, "corrupt JPEG: libjpeg: %s", buf);
    longjmp(c->jb, 1);
}

static void on_emit_message(j_common_ptr cinfo, int level) {
    if (level >= 0) {
        return; /* trace messages */
    }
    jpeg_ctx *c = (jpeg_ctx *)(void *)cinfo->err;
    char      buf[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, buf);
    if (cinfo->err->msg_code == JWRN_JPEG_EOF) {
        snprintf(c->msg, sizeof c->msg, "truncated JPEG: libjpeg: %s", buf);
        longjmp(c->jb, 1);
    }
    cinfo->err->num_warnings++;
    if (c->n_warnings++ == 0) {
        LOG_WARN("%s: libjpeg warning: %s (decoding anyway, as Pillow does)", c->name, buf);
    }
}

static void on_progress(j_common_ptr cinfo) {
    if (!cinfo->is_decompressor) {
        return;
    }
    j_decompress_ptr d = (j_decompress_ptr)(void *)cinfo;
    if (d->input_scan_number > JPEG_MAX_SCANS) {
        jpeg_ctx *c = (jpeg_ctx *)(void *)cinfo->err;
        snprintf(c->msg, sizeof c->msg, "progressive JPEG with more than %d scans refused", JPEG_MAX_SCANS);
        longjmp(c->jb, 1);
    }
}

/* Pillow's "CMYK;I" unpack followed by cmyk2rgb, on one row of raw JCS_CMYK output. */
static void cmyk_row_to_rgb(const uint8_t *in, uint8_t *out, size_t width) {
    for (size_t x = 0; x < width; x++) {
        const uint8_t *p = in + 4 * x;
        uint32_t       nk = p[3]; /* 255 - K with K = 255 - raw k */
        for (size_t ch = 0; ch < 3; ch++) {
            uint32_t cc = 255u - p[ch]; /* Pillow's C */
            int32_t  v = (int32_t)nk - (int32_t)caprl_pil_div255(cc * nk);
            out[3 * x + ch] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
    }
}

caprl_status caprl_jpeg_decode(const uint8_t *data, size_t size, const char *name, int64_t max_pixels,
                               caprl_raw_image *out, caprl_error *err) {
    struct jpeg_decompress_struct cinfo;
    jpeg_ctx                      ctx;
    memset(&cinfo, 0, sizeof cinfo);
    memset(&ctx, 0, sizeof ctx);
    ctx.name = name;
    cinfo.err = jpeg_std_error(&ctx.pub);
    ctx.pub.error_exit = on_error_exit;
    ctx.pub.emit_message = on_emit_message;
    ctx.progress.progress_monitor = on_progress;

    uint8_t *volatile     px = NULL;  /* (h, w, 3) result */
    uint8_t *volatile     row = NULL; /* one row of CMYK or gray output */
    volatile caprl_status st = CAPRL_OK;
    if (setjmp(ctx.jb)) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: %s", name, ctx.msg);
        goto done;
    }
    jpeg_create_decompress(&cinfo);
    cinfo.progress = &ctx.progress;
    cinfo.mem->max_memory_to_use = JPEG_MAX_MEMORY;
    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    (void)jpeg_read_header(&cinfo, TRUE);

    int32_t mode;
    switch (cinfo.num_components) {
    case 1:
        mode = CAPRL_IMAGE_MODE_L;
        cinfo.out_color_space = JCS_GRAYSCALE;
        break;
    case 3:
        mode = CAPRL_IMAGE_MODE_RGB;
        cinfo.out_color_space = JCS_RGB;
        break;
    case 4:
        mode = CAPRL_IMAGE_MODE_CMYK;
        cinfo.out_color_space = JCS_CMYK;
        break;
    default:
        st = caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: JPEG with %d components (Pillow opens 1, 3 or 4)", name,
                           cinfo.num_components);
        goto done;
    }
    st = caprl_image_check_dims((int64_t)cinfo.image_width, (int64_t)cinfo.image_height, max_pixels, name, err);
    if (st != CAPRL_OK) {
        goto done;
    }
    (void)jpeg_start_decompress(&cinfo);
    int32_t want_comp = mode == CAPRL_IMAGE_MODE_L ? 1 : mode == CAPRL_IMAGE_MODE_RGB ? 3 : 4;
    if (cinfo.output_components != want_comp || cinfo.output_width != cinfo.image_width ||
        cinfo.output_height != cinfo.image_height) {
        st = caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: unexpected libjpeg output (%d components, %ux%u)", name,
                           cinfo.output_components, cinfo.output_width, cinfo.output_height);
        goto done;
    }
    size_t   width = cinfo.output_width;
    uint8_t *pxl = NULL;
    st = caprl_image_alloc_px((int32_t)cinfo.output_width, (int32_t)cinfo.output_height, 3, name, &pxl, err);
    if (st != CAPRL_OK) {
        goto done;
    }
    px = pxl;
    if (want_comp != 3) {
        uint8_t *r = caprl_try_malloc(width * 4);
        if (!r) {
            st = caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot allocate a %zu-byte row", name, width * 4);
            goto done;
        }
        row = r;
    }
    while (cinfo.output_scanline < cinfo.output_height) {
        uint8_t *dst = pxl + (size_t)cinfo.output_scanline * width * 3;
        JSAMPROW sample_row = want_comp == 3 ? dst : row;
        if (jpeg_read_scanlines(&cinfo, &sample_row, 1) != 1) {
            /* Only a suspending data source returns 0 lines; the memory source never suspends. */
            st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: truncated JPEG (no scanline returned)", name);
            goto done;
        }
        if (want_comp == 1) {
            for (size_t x = 0; x < width; x++) {
                dst[3 * x + 0] = dst[3 * x + 1] = dst[3 * x + 2] = row[x];
            }
        } else if (want_comp == 4) {
            cmyk_row_to_rgb(row, dst, width);
        }
    }
    /* Pillow reads through to EOI and calls a file without one truncated; finishing makes libjpeg do the same
     * (a missing EOI raises the fatal "Premature end of JPEG file" warning). */
    (void)jpeg_finish_decompress(&cinfo);
    out->width = (int32_t)cinfo.output_width;
    out->height = (int32_t)cinfo.output_height;
    out->channels = 3;
    out->mode = mode;
    out->px = px;
    px = NULL;

done:
    /* Safe at every stage: cinfo starts zeroed, and destroy skips a memory manager that was never made. */
    jpeg_destroy_decompress(&cinfo);
    free(row);
    free(px);
    return st;
}
