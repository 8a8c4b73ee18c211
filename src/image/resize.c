/* Pillow-exact bicubic resize of 8-bit RGB (spec/qwen.md §4.4; Pillow libImaging/Resample.c, 9.x-11.x).
 *
 * Reproduces, operation for operation:
 *   precompute_coeffs: per output index, double-precision kernel weights over [xmin, xmin + count),
 *     normalised by their sum; the box is [0, in] held in float, as Pillow's _resize passes it;
 *   normalize_coeffs_8bpc: k = (int)(w * 2^22 +- 0.5), truncating toward zero;
 *   the horizontal pass first, only over the source rows the vertical pass will read, into an 8-bit
 *     intermediate; then the vertical pass; each output = clip8((2^21 + sum src * k) >> 22);
 *   a pass runs only if its dimension changes; equal sizes copy.
 * The vertical pass accumulates row by row instead of column by column; integer sums are exact, so the result
 * is identical.
 *
 * The double arithmetic of the weights must not be contracted into fused multiply-adds: this file is compiled
 * with -ffp-contract=off (CMakeLists.txt), and x86-64 evaluates double in SSE registers (no excess precision).
 *
 * Accumulator range: the normalised weights of this kernel sum to 1 with |w| summing to under 1.3, so
 * |acc| < 2^21 + 255 * 1.3 * 2^22 < 2^31; int32 as in Pillow. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/ckmath.h"
#include "core/error_impl.h"
#include "image/image_impl.h"

#define BICUBIC_SUPPORT 2.0

double caprl_bicubic_kernel(double x) {
    const double a = -0.5;
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    }
    if (x < 2.0) {
        return (((x - 5) * x + 8) * x - 4) * a;
    }
    return 0.0;
}

void caprl_resample_axis_free(caprl_resample_axis *ax) {
    if (ax) {
        free(ax->bounds);
        free(ax->kk);
        memset(ax, 0, sizeof *ax);
    }
}

caprl_status caprl_resample_axis_init(caprl_resample_axis *ax, int32_t in_size, int32_t out_size, caprl_error *err) {
    memset(ax, 0, sizeof *ax);
    if (in_size < 1 || out_size < 1) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "resize: sizes must be positive (in %d, out %d)", in_size,
                             out_size);
    }
    /* Pillow's box is float[4] = {0, 0, xsize, ysize}; scale = (double)(in1 - in0) / outSize. */
    const float in0 = 0.0f, in1 = (float)in_size;
    double      scale = (double)(in1 - in0) / out_size;
    double      filterscale = scale < 1.0 ? 1.0 : scale;
    double      support = BICUBIC_SUPPORT * filterscale;
    double      ksize_d = ceil(support) * 2 + 1;
    if (ksize_d > (double)(INT32_MAX / 2)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "resize: %d -> %d needs too many taps", in_size, out_size);
    }
    int32_t ksize = (int32_t)ksize_d;
    size_t  n_k = 0, n_b = 0;
    if (!caprl_mul_size((size_t)out_size, (size_t)ksize, &n_k) || !caprl_mul_size(n_k, sizeof(double), &n_k) ||
        !caprl_mul_size((size_t)out_size, 2 * sizeof(int32_t), &n_b)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "resize: %d -> %d: coefficient table too large", in_size,
                             out_size);
    }
    double  *w = caprl_try_malloc((size_t)ksize * sizeof(double));
    int32_t *kk = caprl_try_malloc(n_k / sizeof(double) * sizeof(int32_t));
    int32_t *bounds = caprl_try_malloc(n_b);
    if (!w || !kk || !bounds) {
        free(w);
        free(kk);
        free(bounds);
        return caprl_err_set(err, CAPRL_ERR_OOM, "resize: cannot allocate coefficients for %d -> %d", in_size,
                             out_size);
    }
    for (int32_t xx = 0; xx < out_size; xx++) {
        double center = (double)in0 + (xx + 0.5) * scale;
        double ww = 0.0;
        double ss = 1.0 / filterscale;
        /* (int) truncates toward zero, as in Pillow ("round the value" comments notwithstanding). */
        int32_t xmin = (int32_t)(center - support + 0.5);
        if (xmin < 0) {
            xmin = 0;
        }
        int32_t xmax = (int32_t)(center + support + 0.5);
        if (xmax > in_size) {
            xmax = in_size;
        }
        xmax -= xmin;
        for (int32_t x = 0; x < xmax; x++) {
            double v = caprl_bicubic_kernel((x + xmin - center + 0.5) * ss);
            w[x] = v;
            ww += v;
        }
        int32_t *k = kk + (size_t)xx * (size_t)ksize;
        for (int32_t x = 0; x < ksize; x++) {
            double v = 0.0;
            if (x < xmax) {
                v = ww != 0.0 ? w[x] / ww : w[x];
            }
            k[x] = v < 0 ? (int32_t)(-0.5 + v * (1 << CAPRL_RESAMPLE_PRECISION_BITS))
                         : (int32_t)(0.5 + v * (1 << CAPRL_RESAMPLE_PRECISION_BITS));
        }
        bounds[2 * xx + 0] = xmin;
        bounds[2 * xx + 1] = xmax;
    }
    free(w);
    ax->in_size = in_size;
    ax->out_size = out_size;
    ax->ksize = ksize;
    ax->bounds = bounds;
    ax->kk = kk;
    return CAPRL_OK;
}

static inline uint8_t clip8(int32_t v) {
    if (v < 0) {
        return 0;
    }
    v >>= CAPRL_RESAMPLE_PRECISION_BITS;
    return v > 255 ? 255 : (uint8_t)v;
}

/* Rows [row0, row0 + n_rows) of src (w wide) -> dst (n_rows x ax->out_size). */
static void pass_horizontal(const uint8_t *src, int32_t w, int32_t row0, int32_t n_rows, const caprl_resample_axis *ax,
                            uint8_t *dst) {
    const int32_t ow = ax->out_size;
    for (int32_t y = 0; y < n_rows; y++) {
        const uint8_t *in = src + ((size_t)(row0 + y) * (size_t)w) * 3;
        uint8_t       *out = dst + (size_t)y * (size_t)ow * 3;
        for (int32_t xx = 0; xx < ow; xx++) {
            const int32_t *k = ax->kk + (size_t)xx * (size_t)ax->ksize;
            const int32_t  xmin = ax->bounds[2 * xx], count = ax->bounds[2 * xx + 1];
            const uint8_t *p = in + (size_t)xmin * 3;
            int32_t        s0 = 1 << (CAPRL_RESAMPLE_PRECISION_BITS - 1), s1 = s0, s2 = s0;
            for (int32_t x = 0; x < count; x++) {
                s0 += p[3 * x + 0] * k[x];
                s1 += p[3 * x + 1] * k[x];
                s2 += p[3 * x + 2] * k[x];
            }
            out[3 * xx + 0] = clip8(s0);
            out[3 * xx + 1] = clip8(s1);
            out[3 * xx + 2] = clip8(s2);
        }
    }
}

/* src (rows shifted so that row 0 is the first the axis reads: bounds minus row_shift) -> dst. acc holds one
 * output row of accumulators. */
static void pass_vertical(const uint8_t *src, int32_t w, int32_t row_shift, const caprl_resample_axis *ax,
                          int32_t *acc, uint8_t *dst) {
    const size_t n = (size_t)w * 3;
    for (int32_t yy = 0; yy < ax->out_size; yy++) {
        const int32_t *k = ax->kk + (size_t)yy * (size_t)ax->ksize;
        const int32_t  ymin = ax->bounds[2 * yy] - row_shift, count = ax->bounds[2 * yy + 1];
        for (size_t i = 0; i < n; i++) {
            acc[i] = 1 << (CAPRL_RESAMPLE_PRECISION_BITS - 1);
        }
        for (int32_t y = 0; y < count; y++) {
            const uint8_t *row = src + (size_t)(ymin + y) * n;
            const int32_t  ky = k[y];
            for (size_t i = 0; i < n; i++) {
                acc[i] += row[i] * ky;
            }
        }
        uint8_t *out = dst + (size_t)yy * n;
        for (size_t i = 0; i < n; i++) {
            out[i] = clip8(acc[i]);
        }
    }
}

caprl_status caprl_image_resize_bicubic(const uint8_t *src, int32_t w, int32_t h, uint8_t *dst, int32_t out_w,
                                        int32_t out_h, caprl_error *err) {
    if (!src || !dst || w < 1 || h < 1 || out_w < 1 || out_h < 1) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "resize: bad arguments (%dx%d -> %dx%d)", w, h, out_w,
                             out_h);
    }
    size_t out_bytes = 0, in_bytes = 0;
    if (!caprl_mul_size((size_t)out_w * 3, (size_t)out_h, &out_bytes) ||
        !caprl_mul_size((size_t)w * 3, (size_t)h, &in_bytes)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "resize: %dx%d -> %dx%d is too large", w, h, out_w, out_h);
    }
    const bool need_h = out_w != w, need_v = out_h != h;
    if (!need_h && !need_v) {
        memcpy(dst, src, in_bytes);
        return CAPRL_OK;
    }
    caprl_resample_axis ax_h, ax_v;
    memset(&ax_h, 0, sizeof ax_h);
    memset(&ax_v, 0, sizeof ax_v);
    caprl_status st = CAPRL_OK;
    uint8_t     *tmp = NULL;
    int32_t     *acc = NULL;
    if ((st = caprl_resample_axis_init(&ax_v, h, out_h, err)) != CAPRL_OK) {
        goto done;
    }
    /* Rows of the source the vertical pass reads (all of them when it does not run). */
    const int32_t first = need_v ? ax_v.bounds[0] : 0;
    const int32_t last = need_v ? ax_v.bounds[2 * out_h - 2] + ax_v.bounds[2 * out_h - 1] : h;
    const uint8_t *vsrc = src;
    int32_t        vshift = 0;
    if (need_h) {
        if ((st = caprl_resample_axis_init(&ax_h, w, out_w, err)) != CAPRL_OK) {
            goto done;
        }
        uint8_t *target = dst;
        if (need_v) {
            tmp = caprl_try_malloc((size_t)out_w * 3 * (size_t)(last - first));
            if (!tmp) {
                st = caprl_err_set(err, CAPRL_ERR_OOM, "resize: cannot allocate the %dx%d intermediate", out_w,
                                   last - first);
                goto done;
            }
            target = tmp;
        }
        pass_horizontal(src, w, first, last - first, &ax_h, target);
        vsrc = tmp;
        vshift = first;
    }
    if (need_v) {
        acc = caprl_try_malloc((size_t)out_w * 3 * sizeof *acc);
        if (!acc) {
            st = caprl_err_set(err, CAPRL_ERR_OOM, "resize: cannot allocate a %d-pixel accumulator row", out_w);
            goto done;
        }
        pass_vertical(vsrc, out_w, vshift, &ax_v, acc, dst);
    }
done:
    free(acc);
    free(tmp);
    caprl_resample_axis_free(&ax_h);
    caprl_resample_axis_free(&ax_v);
    return st;
}
