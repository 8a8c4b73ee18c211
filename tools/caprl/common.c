/* Helpers shared by the subcommands (see common.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common.h"
#include "opts.h"

int tool_read_file(const char *cmd, const char *path, size_t max_bytes, char **data, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "caprl %s: error: %s: cannot open: %s\n", cmd, path, strerror(errno));
        return EXIT_DATA;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode) || (size_t)st.st_size > max_bytes) {
        fprintf(stderr, "caprl %s: error: %s: not a regular file of at most %zu bytes\n", cmd, path, max_bytes);
        fclose(f);
        return EXIT_DATA;
    }
    size_t n = (size_t)st.st_size;
    char  *buf = malloc(n + 1);
    if (!buf || fread(buf, 1, n, f) != n) {
        fprintf(stderr, "caprl %s: error: %s: read failed\n", cmd, path);
        free(buf);
        fclose(f);
        return EXIT_DATA;
    }
    fclose(f);
    buf[n] = '\0';
    *data = buf;
    *len = n;
    return 0;
}

int tool_write_file_atomic(const char *cmd, const char *path, const void *data, size_t len) {
    size_t plen = strlen(path) + 32;
    char  *tmp = malloc(plen);
    snprintf(tmp, plen, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        fprintf(stderr, "caprl %s: error: %s: cannot create: %s\n", cmd, tmp, strerror(errno));
        free(tmp);
        return EXIT_DATA;
    }
    bool ok = fwrite(data, 1, len, f) == len && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        fprintf(stderr, "caprl %s: error: %s: write failed: %s\n", cmd, path, strerror(errno));
        unlink(tmp);
        free(tmp);
        return EXIT_DATA;
    }
    free(tmp);
    return 0;
}

int tool_parse_ids(const char *cmd, const char *what, const char *text, int32_t **ids, int64_t *n) {
    size_t   cap = 64, count = 0;
    int32_t *out = malloc(cap * sizeof *out);
    const char *p = text;
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') {
        p++;
    }
    bool bracket = *p == '[';
    if (bracket) {
        p++;
    }
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ',') {
            p++;
        }
        if (*p == '\0' || (bracket && *p == ']')) {
            break;
        }
        char *end = NULL;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "caprl %s: error: %s: expected a token id (non-negative integer) at '%.20s'\n", cmd, what,
                    p);
            free(out);
            return EXIT_USAGE;
        }
        if (count == cap) {
            cap *= 2;
            out = realloc(out, cap * sizeof *out);
        }
        out[count++] = (int32_t)v;
        p = end;
    }
    if (count == 0) {
        fprintf(stderr, "caprl %s: error: %s: no token ids\n", cmd, what);
        free(out);
        return EXIT_USAGE;
    }
    *ids = out;
    *n = (int64_t)count;
    return 0;
}

int tool_load_model(const char *cmd, const char *dir, int32_t n_threads, caprl_model **out) {
    caprl_model_params mp = caprl_model_default_params();
    mp.n_threads = n_threads;
    caprl_error  err = {0};
    caprl_status st = caprl_model_load(out, dir, &mp, &err);
    if (st != CAPRL_OK) {
        return tool_fail(cmd, st, err.msg);
    }
    return 0;
}

double tool_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

caprl_status tool_load_vl_image(const char *model_dir, const char *image_path, int32_t alpha, int32_t threads,
                                caprl_image *img, caprl_vision **vision, caprl_preprocess_config *pp, caprl_error *err) {
    caprl_image_decode_params dp = caprl_image_decode_default_params();
    dp.alpha = alpha;
    *pp = caprl_preprocess_config_default();
    *vision = NULL;
    memset(img, 0, sizeof *img);
    caprl_status st = caprl_image_decode_file(image_path, &dp, img, err);
    if (st == CAPRL_OK) {
        st = caprl_vision_load(vision, model_dir, threads, err);
    }
    char pp_path[4096];
    snprintf(pp_path, sizeof pp_path, "%s/preprocessor_config.json", model_dir);
    if (st == CAPRL_OK && access(pp_path, F_OK) == 0) {
        st = caprl_preprocess_config_load(pp, pp_path, err);
    }
    int32_t out_w = 0, out_h = 0;
    if (st == CAPRL_OK &&
        (st = caprl_image_preprocess_size(img->width, img->height, pp, &out_w, &out_h, err)) != CAPRL_OK) {
        /* the processor's message lacks the file; truncating the combined message is acceptable */
        char   msg[sizeof err->msg];
        size_t np = strnlen(image_path, sizeof msg / 2);
        memcpy(msg, image_path, np);
        memcpy(msg + np, ": ", 2);
        size_t nm = strnlen(err->msg, sizeof msg - np - 3);
        memcpy(msg + np + 2, err->msg, nm);
        msg[np + 2 + nm] = '\0';
        memcpy(err->msg, msg, sizeof msg);
    }
    if (st != CAPRL_OK) {
        caprl_vision_free(*vision);
        *vision = NULL;
        caprl_image_free(img);
    }
    return st;
}

caprl_status tool_set_error(caprl_error *err, caprl_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    err->code = code;
    return code;
}
