/* Image decoding: every fixture in tests/fixtures/img against Pillow's own decode (scripts/dump_pixels.py wrote
 * Image.open(f).convert("RGB") and qwen-vl-utils' white composite with Pillow 9.4 + libjpeg-turbo 2.1.5 +
 * libwebp 1.2.4), the alpha formula over all 65,536 (alpha, colour) pairs, the pinned 16-bit behaviours, and bad
 * input: truncation at many lengths, empty and missing files, other formats, corrupt data, and headers that claim
 * more pixels than the budget (refused before any pixel buffer exists). */
#include <stdint.h>

#include "caprl/image.h"
#include "caprl_test.h"
#include "core/error_impl.h"
#include "image/image_impl.h"

#define FIX CAPRL_SOURCE_DIR "/tests/fixtures/img/"

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)len + 1);
    if (!buf || fread(buf, 1, (size_t)len, f) != (size_t)len) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(1);
    }
    fclose(f);
    *n = (size_t)len;
    return buf;
}

/* Built with -DCAPRL_WEBP=OFF, WebP files are CAPRL_ERR_UNSUPPORTED and their checks are skipped. */
static bool g_have_webp = true;

static bool skip_file(const char *name) {
    return !g_have_webp && strstr(name, ".webp") != NULL;
}

static void probe_webp(void) {
    caprl_image img = {0};
    caprl_error err = {0};
    if (caprl_image_decode_file(FIX "lossy.webp", NULL, &img, &err) == CAPRL_ERR_UNSUPPORTED &&
        strstr(err.msg, "without WebP")) {
        g_have_webp = false;
        fprintf(stderr, "test_image_decode: built without WebP, skipping WebP checks\n");
    }
    caprl_image_free(&img);
}

/* ---- goldens ------------------------------------------------------------------------------------------------ */

static int32_t mode_from_pillow(const char *m) {
    if (!strcmp(m, "RGB")) {
        return CAPRL_IMAGE_MODE_RGB;
    }
    if (!strcmp(m, "RGBA")) {
        return CAPRL_IMAGE_MODE_RGBA;
    }
    if (!strcmp(m, "L") || !strcmp(m, "1")) {
        return CAPRL_IMAGE_MODE_L;
    }
    if (!strcmp(m, "LA")) {
        return CAPRL_IMAGE_MODE_LA;
    }
    if (!strcmp(m, "P")) {
        return CAPRL_IMAGE_MODE_P;
    }
    if (!strcmp(m, "I") || !strcmp(m, "I;16")) {
        return CAPRL_IMAGE_MODE_I;
    }
    if (!strcmp(m, "CMYK")) {
        return CAPRL_IMAGE_MODE_CMYK;
    }
    return -1;
}

static void compare_rgb(const char *what, const caprl_image *img, const uint8_t *want, size_t want_n) {
    size_t n = (size_t)img->width * (size_t)img->height * 3;
    CHECK_MSG(n == want_n, "%s: %zu bytes vs golden %zu", what, n, want_n);
    if (n != want_n) {
        return;
    }
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        if (img->data[i] != want[i]) {
            if (!bad) {
                first = i;
            }
            bad++;
        }
    }
    CHECK_MSG(bad == 0, "%s: %zu of %zu bytes differ from Pillow; first at pixel (%zu, %zu) channel %zu: %u vs %u",
              what, bad, n, (first / 3) % (size_t)img->width, (first / 3) / (size_t)img->width, first % 3,
              img->data[first], want[first]);
}

static void test_goldens(void) {
    FILE *man = fopen(FIX "decode.txt", "r");
    CHECK(man != NULL);
    if (!man) {
        return;
    }
    char line[512];
    int  n_files = 0;
    while (fgets(line, sizeof line, man)) {
        if (line[0] == '#') {
            continue;
        }
        char file[128], mode[16], gdrop[128], gwhite[128];
        int  w = 0, h = 0;
        if (sscanf(line, "%127s %15s %d %d %127s %127s", file, mode, &w, &h, gdrop, gwhite) != 6) {
            continue;
        }
        n_files++;
        if (skip_file(file)) {
            continue;
        }
        char path[1024];
        snprintf(path, sizeof path, FIX "%s", file);
        for (int alpha = 0; alpha < CAPRL_ALPHA_COUNT; alpha++) {
            caprl_image_decode_params p = caprl_image_decode_default_params();
            p.alpha = alpha;
            caprl_image img = {0};
            caprl_error err = {0};
            caprl_status st = caprl_image_decode_file(path, &p, &img, &err);
            CHECK_MSG(st == CAPRL_OK, "%s: %s", file, err.msg);
            if (st != CAPRL_OK) {
                continue;
            }
            CHECK_MSG(img.width == w && img.height == h, "%s: %dx%d vs Pillow %dx%d", file, img.width, img.height, w,
                      h);
            CHECK_MSG(img.src_mode == mode_from_pillow(mode), "%s: mode %s vs Pillow %s", file,
                      caprl_image_mode_name(img.src_mode), mode);
            const char *gname = alpha == CAPRL_ALPHA_WHITE && strcmp(gwhite, "-") != 0 ? gwhite : gdrop;
            snprintf(path, sizeof path, FIX "%s", gname);
            size_t   gn = 0;
            uint8_t *g = slurp(path, &gn);
            char     what[300];
            snprintf(what, sizeof what, "%s (alpha %s)", file, alpha == CAPRL_ALPHA_WHITE ? "white" : "drop");
            compare_rgb(what, &img, g, gn);
            free(g);
            caprl_image_free(&img);
            CHECK(img.data == NULL && img.width == 0);
            snprintf(path, sizeof path, FIX "%s", file);
        }
    }
    fclose(man);
    CHECK_MSG(n_files >= 28, "only %d fixtures listed", n_files);
}

/* ---- pinned Pillow behaviours ------------------------------------------------------------------------------- */

static void test_pinned(void) {
    caprl_image_decode_params p = caprl_image_decode_default_params();
    caprl_image               img = {0};
    caprl_error               err = {0};
    /* 16-bit RGB: Pillow keeps the high byte. rgb16.png's pixel (0, 0) has G = 0x12ff: truncation gives 0x12,
     * png_set_scale_16's rounding would give 0x13. */
    CHECK_OK(caprl_image_decode_file(FIX "rgb16.png", &p, &img, &err), &err);
    if (img.data) {
        CHECK_EQ_I64(img.data[1], 0x12);
        CHECK_EQ_I64(img.src_mode, CAPRL_IMAGE_MODE_RGB);
    }
    caprl_image_free(&img);
    /* 16-bit gray: min(v, 255). gray16.png's pixel (1, 0) is 13, pixel (2, 1) is 2 * 13 + 1 = 27. */
    CHECK_OK(caprl_image_decode_file(FIX "gray16.png", &p, &img, &err), &err);
    if (img.data) {
        CHECK_EQ_I64(img.data[3 * 1], 13);
        CHECK_EQ_I64(img.data[3 * (23 + 2)], 27);
        CHECK_EQ_I64(img.src_mode, CAPRL_IMAGE_MODE_I);
    }
    caprl_image_free(&img);
    /* 16-bit gray + alpha opens as RGBA in Pillow, so the alpha rule applies; 8-bit gray + alpha is LA. */
    CHECK_OK(caprl_image_decode_file(FIX "graya16.png", &p, &img, &err), &err);
    CHECK_EQ_I64(img.src_mode, CAPRL_IMAGE_MODE_RGBA);
    caprl_image_free(&img);
    CHECK_OK(caprl_image_decode_file(FIX "graya8.png", &p, &img, &err), &err);
    CHECK_EQ_I64(img.src_mode, CAPRL_IMAGE_MODE_LA);
    caprl_image_free(&img);
    /* names */
    CHECK_STR_EQ(caprl_image_mode_name(CAPRL_IMAGE_MODE_CMYK), "CMYK");
    CHECK_STR_EQ(caprl_image_mode_name(99), "?");
    CHECK_STR_EQ(caprl_image_format_name(CAPRL_IMAGE_FORMAT_WEBP), "webp");
}

/* ---- a minimal PNG writer (stored deflate blocks), independent of libpng ------------------------------------- */

/* zlib's checksums, written out so the test needs no zlib link */
static uint32_t crc32_of(const uint8_t *d, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= d[i];
        for (int k = 0; k < 8; k++) {
            c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
        }
    }
    return ~c;
}

static uint32_t adler32_of(const uint8_t *d, size_t n) {
    uint32_t a = 1, b = 0;
    for (size_t i = 0; i < n; i++) {
        a = (a + d[i]) % 65521u;
        b = (b + a) % 65521u;
    }
    return (b << 16) | a;
}

typedef struct buf {
    uint8_t *p;
    size_t   n, cap;
} buf;

static void put(buf *b, const void *d, size_t n) {
    if (n == 0) {
        return;
    }
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}

static void put_u32be(buf *b, uint32_t v) {
    uint8_t x[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    put(b, x, 4);
}

static void put_chunk(buf *b, const char *tag, const uint8_t *d, size_t n) {
    put_u32be(b, (uint32_t)n);
    size_t start = b->n;
    put(b, tag, 4);
    put(b, d, n);
    put_u32be(b, crc32_of(b->p + start, n + 4));
}

/* 8-bit RGBA (color type 6) or any header-only PNG when px == NULL. */
static buf make_png(uint32_t w, uint32_t h, int color, const uint8_t *px, size_t row_bytes) {
    buf b = {0};
    put(&b, "\x89PNG\r\n\x1a\n", 8);
    uint8_t ihdr[13];
    for (int i = 0; i < 4; i++) {
        ihdr[i] = (uint8_t)(w >> (24 - 8 * i));
        ihdr[4 + i] = (uint8_t)(h >> (24 - 8 * i));
    }
    ihdr[8] = 8;
    ihdr[9] = (uint8_t)color;
    ihdr[10] = ihdr[11] = ihdr[12] = 0;
    put_chunk(&b, "IHDR", ihdr, 13);
    buf raw = {0}, z = {0};
    if (px) {
        for (uint32_t y = 0; y < h; y++) {
            uint8_t f = 0;
            put(&raw, &f, 1);
            put(&raw, px + y * row_bytes, row_bytes);
        }
    } else {
        uint8_t junk[64] = {0};
        put(&raw, junk, sizeof junk);
    }
    uint8_t zh[2] = {0x78, 0x01};
    put(&z, zh, 2);
    for (size_t off = 0; off < raw.n; off += 65535) {
        size_t  len = raw.n - off < 65535 ? raw.n - off : 65535;
        uint8_t bh[5] = {(uint8_t)(off + len == raw.n), (uint8_t)len, (uint8_t)(len >> 8), (uint8_t)~len,
                         (uint8_t)(~len >> 8)};
        put(&z, bh, 5);
        put(&z, raw.p + off, len);
    }
    put_u32be(&z, adler32_of(raw.p, raw.n));
    put_chunk(&b, "IDAT", z.p, z.n);
    put_chunk(&b, "IEND", NULL, 0);
    free(raw.p);
    free(z.p);
    return b;
}

/* White composite for every (alpha, colour) pair: round((255 * (255 - a) + c * a) / 255), which Pillow's
 * DIV255 computes exactly; drop keeps c. */
static void test_alpha_all_pairs(void) {
    const uint32_t W = 256, H = 256;
    uint8_t       *px = malloc((size_t)W * H * 4);
    for (uint32_t a = 0; a < H; a++) {
        for (uint32_t c = 0; c < W; c++) {
            uint8_t *q = px + ((size_t)a * W + c) * 4;
            q[0] = (uint8_t)c;
            q[1] = (uint8_t)(255 - c);
            q[2] = (uint8_t)(c ^ 0x5a);
            q[3] = (uint8_t)a;
        }
    }
    buf png = make_png(W, H, 6, px, W * 4);
    for (int alpha = 0; alpha < CAPRL_ALPHA_COUNT; alpha++) {
        caprl_image_decode_params p = caprl_image_decode_default_params();
        p.alpha = alpha;
        caprl_image img = {0};
        caprl_error err = {0};
        CHECK_OK(caprl_image_decode_buffer(png.p, png.n, "pairs.png", &p, &img, &err), &err);
        if (!img.data) {
            continue;
        }
        CHECK_EQ_I64(img.src_mode, CAPRL_IMAGE_MODE_RGBA);
        int bad = 0;
        for (size_t i = 0; i < (size_t)W * H; i++) {
            uint32_t a = px[4 * i + 3];
            for (int ch = 0; ch < 3; ch++) {
                uint32_t c = px[4 * i + (size_t)ch];
                uint32_t want = alpha == CAPRL_ALPHA_DROP ? c : (2 * (255 * (255 - a) + c * a) + 255) / 510;
                bad += img.data[3 * i + (size_t)ch] != want;
            }
        }
        CHECK_MSG(bad == 0, "alpha %d: %d channel values differ from the rounding formula", alpha, bad);
        caprl_image_free(&img);
    }
    free(png.p);
    free(px);
}

/* ---- bad input ------------------------------------------------------------------------------------------------ */

static void expect_fail(const char *what, const void *d, size_t n, caprl_status code, const char *needle) {
    caprl_image img = {0};
    caprl_error err = {0};
    caprl_status st = caprl_image_decode_buffer(d, n, what, NULL, &img, &err);
    CHECK_MSG(st == code, "%s: status %d (%s), expected %d", what, st, err.msg, code);
    CHECK_MSG(strstr(err.msg, what) != NULL, "%s: message does not name the file: %s", what, err.msg);
    if (needle) {
        CHECK_MSG(strstr(err.msg, needle) != NULL, "%s: message lacks '%s': %s", what, needle, err.msg);
    }
    CHECK(img.data == NULL);
    caprl_image_free(&img);
}

/* Every cut of a file shorter than `ok_from` must fail with CAPRL_ERR_FORMAT; cuts from ok_from on decode (PNG:
 * Pillow never reads IEND, so a file cut inside it still opens). */
static void truncations(const char *file, size_t ok_tail) {
    if (skip_file(file)) {
        return;
    }
    char path[512];
    snprintf(path, sizeof path, FIX "%s", file);
    size_t   n = 0;
    uint8_t *d = slurp(path, &n);
    size_t   cuts[] = {1, 2, 3, 4, 7, 8, 11, 12, 16, 20, 25, 33, 40, 50, 64, 100, n / 4, n / 3, n / 2, 2 * n / 3,
                       3 * n / 4, n - 40, n - 20, n - 13, n - 12, n - 8, n - 4, n - 2, n - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        size_t k = cuts[i];
        if (k == 0 || k >= n) {
            continue;
        }
        /* a private copy of exactly k bytes, so ASan sees any read past the end */
        uint8_t *cut = malloc(k);
        memcpy(cut, d, k);
        char what[600];
        snprintf(what, sizeof what, "%s[cut at %zu of %zu]", file, k, n);
        caprl_image img = {0};
        caprl_error err = {0};
        caprl_status st = caprl_image_decode_buffer(cut, k, what, NULL, &img, &err);
        if (k >= n - ok_tail) {
            CHECK_MSG(st == CAPRL_OK, "%s: %s", what, err.msg);
        } else {
            CHECK_MSG(st == CAPRL_ERR_FORMAT, "%s: status %d: %s", what, st, err.msg);
            CHECK_MSG(strstr(err.msg, what) != NULL, "%s: message does not name the file: %s", what, err.msg);
        }
        caprl_image_free(&img);
        free(cut);
    }
    free(d);
}

static void test_truncated(void) {
    /* The IEND chunk is 12 bytes; Pillow ignores it (verified: every cut inside it opens). */
    truncations("rgb8.png", 12);
    truncations("interlaced_rgb.png", 12);
    truncations("rgba16.png", 12);
    truncations("pal4.png", 12);
    /* Pillow calls a JPEG without its EOI marker truncated; WebP is checked against its RIFF size. */
    truncations("baseline.jpg", 0);
    truncations("progressive.jpg", 0);
    truncations("gray.jpg", 0);
    truncations("cmyk.jpg", 0);
    truncations("lossy.webp", 0);
    truncations("lossless_alpha.webp", 0);
    truncations("animated.webp", 0);
}

static void test_bad_files(void) {
    char *dir = test_tmpdir("test_image_decode");
    char  path[4200];
    snprintf(path, sizeof path, "%s/empty.png", dir);
    FILE *f = fopen(path, "wb");
    fclose(f);
    caprl_image img = {0};
    caprl_error err = {0};
    CHECK_STATUS(caprl_image_decode_file(path, NULL, &img, &err), CAPRL_ERR_FORMAT);
    CHECK(strstr(err.msg, "empty.png") && strstr(err.msg, "empty"));
    snprintf(path, sizeof path, "%s/missing.jpg", dir);
    CHECK_STATUS(caprl_image_decode_file(path, NULL, &img, &err), CAPRL_ERR_IO);
    CHECK(strstr(err.msg, "missing.jpg") != NULL);
    CHECK_STATUS(caprl_image_decode_file(dir, NULL, &img, &err), CAPRL_ERR_IO); /* a directory */
    free(dir);

    expect_fail("zero.bin", "", 0, CAPRL_ERR_FORMAT, "empty");
    expect_fail("a.gif", "GIF89a\x01\x00\x01\x00\x00\x00\x00", 13, CAPRL_ERR_UNSUPPORTED, "GIF");
    expect_fail("a.bmp", "BM\x3a\x00\x00\x00\x00\x00", 8, CAPRL_ERR_UNSUPPORTED, "BMP");
    expect_fail("a.tif", "II*\x00\x08\x00\x00\x00", 8, CAPRL_ERR_UNSUPPORTED, "TIFF");
    expect_fail("a.avif", "\x00\x00\x00\x1c" "ftypavif\x00\x00\x00\x00", 16, CAPRL_ERR_UNSUPPORTED, "AVIF");
    expect_fail("a.heic", "\x00\x00\x00\x18" "ftypheic\x00\x00\x00\x00", 16, CAPRL_ERR_UNSUPPORTED, "HEIF");
    expect_fail("a.svg", "  <svg xmlns=...>", 17, CAPRL_ERR_UNSUPPORTED, "SVG");
    expect_fail("a.wav", "RIFF\x24\x00\x00\x00WAVEfmt ", 16, CAPRL_ERR_UNSUPPORTED, "not WebP");
    expect_fail("garbage.bin", "\x01\x02\x03\x04hello", 9, CAPRL_ERR_UNSUPPORTED, "01 02 03 04");
    expect_fail("short.png", "\x89PN", 3, CAPRL_ERR_FORMAT, "truncated");
    expect_fail("short.jpg", "\xff\xd8", 2, CAPRL_ERR_FORMAT, "truncated");
    expect_fail("short.webp", "RIFF\0\0", 6, CAPRL_ERR_FORMAT, "truncated");
    expect_fail("sig_only.png", "\x89PNG\r\n\x1a\n", 8, CAPRL_ERR_FORMAT, "PNG");
    expect_fail("soi_only.jpg", "\xff\xd8\xff", 3, CAPRL_ERR_FORMAT, "JPEG");
    expect_fail("riff_only.webp", "RIFF\x04\x00\x00\x00WEBP", 12,
                g_have_webp ? CAPRL_ERR_FORMAT : CAPRL_ERR_UNSUPPORTED, "WebP");

    /* bad params */
    caprl_image_decode_params p = caprl_image_decode_default_params();
    p.alpha = 7;
    CHECK_STATUS(caprl_image_decode_buffer("x", 1, "p", &p, &img, &err), CAPRL_ERR_INVALID_ARG);
    p = caprl_image_decode_default_params();
    p.max_pixels = 0;
    CHECK_STATUS(caprl_image_decode_buffer("x", 1, "p", &p, &img, &err), CAPRL_ERR_INVALID_ARG);
}

/* Corrupt bytes inside the data: PNG's CRC catches them; JPEG and WebP may decode garbage (as Pillow does) or
 * fail, but never crash. */
static void test_corrupt(void) {
    const char *files[] = {"rgb8.png", "interlaced_rgb.png", "baseline.jpg", "progressive.jpg", "cmyk.jpg",
                           "lossy.webp", "lossless_alpha.webp", "animated.webp"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        if (skip_file(files[i])) {
            continue;
        }
        char path[512];
        snprintf(path, sizeof path, FIX "%s", files[i]);
        size_t   n = 0;
        uint8_t *d = slurp(path, &n);
        for (size_t pos = 20; pos < n; pos += n / 13 + 1) {
            uint8_t *c = malloc(n);
            memcpy(c, d, n);
            c[pos] ^= 0xA5;
            c[(pos * 7 + 3) % n] ^= 0x3C;
            caprl_image img = {0};
            caprl_error err = {0};
            caprl_status st = caprl_image_decode_buffer(c, n, files[i], NULL, &img, &err);
            CHECK_MSG(st == CAPRL_OK || st == CAPRL_ERR_FORMAT || st == CAPRL_ERR_UNSUPPORTED,
                      "%s flipped at %zu: status %d: %s", files[i], pos, st, err.msg);
            if (strstr(files[i], ".png") && st == CAPRL_OK) {
                /* a flipped PNG byte lands in a CRC-protected chunk; only ancillary data may be skipped */
                CHECK_MSG(pos < 33, "%s flipped at %zu decoded", files[i], pos);
            }
            caprl_image_free(&img);
            free(c);
        }
        free(d);
    }
}

/* Headers claiming too many pixels are refused before any pixel buffer is allocated: with allocation failure
 * injected, the status is still the pixel-budget error, not CAPRL_ERR_OOM. */
static void test_pixel_budget(void) {
    buf png = make_png(100000, 100000, 2, NULL, 0);
    caprl_test_fail_alloc_after(0);
    expect_fail("huge.png", png.p, png.n, CAPRL_ERR_UNSUPPORTED, "exceeds the limit");
    caprl_test_fail_alloc_after(-1);
    free(png.p);

    /* JPEG: patch the SOF0 dimensions of baseline.jpg to 65000 x 65000 */
    size_t   n = 0;
    uint8_t *d = slurp(FIX "baseline.jpg", &n);
    bool     patched = false;
    for (size_t i = 2; i + 9 < n; i++) {
        if (d[i] == 0xFF && (d[i + 1] == 0xC0 || d[i + 1] == 0xC2)) {
            d[i + 5] = 0xFD;
            d[i + 6] = 0xE8;
            d[i + 7] = 0xFD;
            d[i + 8] = 0xE8;
            patched = true;
            break;
        }
    }
    CHECK(patched);
    caprl_test_fail_alloc_after(0);
    expect_fail("huge.jpg", d, n, CAPRL_ERR_UNSUPPORTED, "exceeds the limit");
    caprl_test_fail_alloc_after(-1);
    free(d);

    /* WebP (simple lossy VP8): the 14-bit width and height at offsets 26 and 28 set to 16383 */
    if (g_have_webp) {
        d = slurp(FIX "lossy.webp", &n);
        CHECK(n > 30 && memcmp(d + 12, "VP8 ", 4) == 0);
        d[26] = 0xFF;
        d[27] = 0x3F;
        d[28] = 0xFF;
        d[29] = 0x3F;
        caprl_test_fail_alloc_after(0);
        expect_fail("huge.webp", d, n, CAPRL_ERR_UNSUPPORTED, "exceeds the limit");
        caprl_test_fail_alloc_after(-1);
        free(d);
    }

    /* the budget is inclusive */
    d = slurp(FIX "rgb8.png", &n);
    caprl_image_decode_params p = caprl_image_decode_default_params();
    caprl_image               img = {0};
    caprl_error               err = {0};
    p.max_pixels = 23 * 17;
    CHECK_OK(caprl_image_decode_buffer(d, n, "rgb8.png", &p, &img, &err), &err);
    caprl_image_free(&img);
    p.max_pixels = 23 * 17 - 1;
    CHECK_STATUS(caprl_image_decode_buffer(d, n, "rgb8.png", &p, &img, &err), CAPRL_ERR_UNSUPPORTED);
    free(d);

    /* a zero-height IHDR is invalid PNG */
    png = make_png(5, 0, 2, NULL, 0);
    expect_fail("zero_h.png", png.p, png.n, CAPRL_ERR_FORMAT, NULL);
    free(png.p);
}

/* Allocation failures inside a decode give CAPRL_ERR_OOM (or a clean error), never a leak or crash. */
static void test_alloc_failures(void) {
    const char *files[] = {"rgb8.png", "pal4.png", "gray16.png", "rgba8.png", "baseline.jpg", "cmyk.jpg",
                           "lossless_alpha.webp"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        if (skip_file(files[i])) {
            continue;
        }
        char path[512];
        snprintf(path, sizeof path, FIX "%s", files[i]);
        size_t   n = 0;
        uint8_t *d = slurp(path, &n);
        for (int64_t k = 0; k < 6; k++) {
            caprl_image img = {0};
            caprl_error err = {0};
            caprl_test_fail_alloc_after(k);
            caprl_status st = caprl_image_decode_buffer(d, n, files[i], NULL, &img, &err);
            caprl_test_fail_alloc_after(-1);
            CHECK_MSG(st == CAPRL_OK || st == CAPRL_ERR_OOM, "%s, failing allocation %lld: %d %s", files[i],
                      (long long)k, st, err.msg);
            caprl_image_free(&img);
        }
        free(d);
    }
}

int main(void) {
    caprl_log_set_level(CAPRL_LOG_ERROR); /* corrupt-data warnings are expected below */
    probe_webp();
    test_goldens();
    test_pinned();
    test_alpha_all_pairs();
    test_truncated();
    test_bad_files();
    test_corrupt();
    test_pixel_budget();
    test_alloc_failures();
    return test_finish("test_image_decode");
}
