/* libwebp wrapper: one WebP buffer -> pixels as Pillow opens them (style.md §3.3, §3.4).
 *
 * Pillow (WebPImagePlugin + _webp.c, built with the animation API as Debian's is) decodes every WebP file,
 * still or animated, lossy or lossless, through WebPAnimDecoder with default options (MODE_RGBA, no threads)
 * and takes the first frame of the canvas. The mode comes from WebPGetFeatures on the whole file: "RGBA" if
 * it reports alpha, else "RGB" (rawmode "RGBX", the alpha byte ignored). We do the same calls, so the pixels
 * are libwebp's own; only "RGBA" is subject to the alpha rule. Canvas areas the first frame does not cover are
 * transparent black, as in Pillow.
 *
 * The canvas size is read with WebPDemux and checked against the pixel budget before WebPAnimDecoderNew, which
 * allocates two canvases. Built without CAPRL_WEBP, WebP files are CAPRL_ERR_UNSUPPORTED. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error_impl.h"
#include "image/image_impl.h"

#ifdef CAPRL_HAVE_WEBP

#    include <webp/decode.h>
#    include <webp/demux.h>

caprl_status caprl_webp_decode(const uint8_t *data, size_t size, const char *name, int64_t max_pixels,
                               caprl_raw_image *out, caprl_error *err) {
    WebPBitstreamFeatures features;
    VP8StatusCode         vst = WebPGetFeatures(data, size, &features);
    if (vst != VP8_STATUS_OK) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: corrupt or truncated WebP (libwebp status %d%s)", name,
                             (int)vst, vst == VP8_STATUS_NOT_ENOUGH_DATA ? ": not enough data" : "");
    }
    WebPData     wd = {data, size};
    WebPDemuxer *demux = WebPDemux(&wd);
    if (!demux) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: corrupt or truncated WebP (demux failed)", name);
    }
    int64_t canvas_w = WebPDemuxGetI(demux, WEBP_FF_CANVAS_WIDTH);
    int64_t canvas_h = WebPDemuxGetI(demux, WEBP_FF_CANVAS_HEIGHT);
    int64_t n_frames = WebPDemuxGetI(demux, WEBP_FF_FRAME_COUNT);
    WebPDemuxDelete(demux);
    CAPRL_TRY(caprl_image_check_dims(canvas_w, canvas_h, max_pixels, name, err));
    if (n_frames < 1) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: WebP without frames", name);
    }

    WebPAnimDecoder *dec = WebPAnimDecoderNew(&wd, NULL);
    if (!dec) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: corrupt WebP (libwebp cannot create a decoder)", name);
    }
    WebPAnimInfo info;
    uint8_t     *frame = NULL;
    int          timestamp = 0;
    if (!WebPAnimDecoderGetInfo(dec, &info) || (int64_t)info.canvas_width != canvas_w ||
        (int64_t)info.canvas_height != canvas_h || !WebPAnimDecoderGetNext(dec, &frame, &timestamp) || !frame) {
        WebPAnimDecoderDelete(dec);
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: corrupt or truncated WebP (cannot decode the first frame)",
                             name);
    }
    int32_t  w = (int32_t)canvas_w, h = (int32_t)canvas_h;
    int32_t  channels = features.has_alpha ? 4 : 3;
    uint8_t *px = NULL;
    caprl_status st = caprl_image_alloc_px(w, h, channels, name, &px, err);
    if (st != CAPRL_OK) {
        WebPAnimDecoderDelete(dec);
        return st;
    }
    size_t n = (size_t)w * (size_t)h;
    if (channels == 4) {
        memcpy(px, frame, n * 4);
    } else {
        for (size_t i = 0; i < n; i++) {
            memcpy(px + 3 * i, frame + 4 * i, 3);
        }
    }
    WebPAnimDecoderDelete(dec);
    out->width = w;
    out->height = h;
    out->channels = channels;
    out->mode = channels == 4 ? CAPRL_IMAGE_MODE_RGBA : CAPRL_IMAGE_MODE_RGB;
    out->px = px;
    return CAPRL_OK;
}

#else /* !CAPRL_HAVE_WEBP */

caprl_status caprl_webp_decode(const uint8_t *data, size_t size, const char *name, int64_t max_pixels,
                               caprl_raw_image *out, caprl_error *err) {
    (void)data;
    (void)size;
    (void)max_pixels;
    (void)out;
    return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: WebP file, but caprl was built without WebP "
                                                     "(configure with -DCAPRL_WEBP=ON and libwebp-dev)", name);
}

#endif
