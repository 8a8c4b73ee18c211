/* Fingerprints of a run's input files (rl_impl.h): what RUN/fingerprints.json records when a run starts and what
 * a resumed run must find unchanged. Content, not paths: a data file or checkpoint moved elsewhere is the same
 * input, a file edited in place is not. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/error_impl.h"
#include "core/file_impl.h"
#include "core/sha256_impl.h"
#include "fmt/json_impl.h"
#include "rl/rl_impl.h"

#define WHOLE_MAX ((size_t)4 << 20) /* files up to this size are hashed whole */
#define END_BYTES ((size_t)1 << 20) /* else their first and last MiB */
#define BLOCK_BYTES ((size_t)64 << 10)
#define N_BLOCKS 64                 /* and this many evenly spaced blocks */

static const char *const k_inputs[CAPRL_RL_N_INPUTS] = {"data", "policy", "reader", "reader_template"};

static const char *input_path(const caprl_rl_config *cfg, int32_t i) {
    const char *paths[CAPRL_RL_N_INPUTS] = {cfg->data, cfg->policy, cfg->reader, cfg->reader_template};
    return paths[i];
}

/* The file's size, then its bytes (whole, or the sample of a large file). */
static caprl_status hash_file(caprl_sha256 *h, const char *path, bool sample, caprl_error *err) {
    caprl_mapped_file mf;
    CAPRL_TRY(caprl_file_map(&mf, path, err));
    uint64_t size = (uint64_t)mf.size;
    uint8_t  le[8];
    for (int b = 0; b < 8; b++) {
        le[b] = (uint8_t)(size >> (8 * b));
    }
    caprl_sha256_update(h, le, sizeof le);
    if (!sample || mf.size <= WHOLE_MAX) {
        caprl_sha256_update(h, mf.data, mf.size);
    } else {
        caprl_sha256_update(h, mf.data, END_BYTES);
        caprl_sha256_update(h, mf.data + mf.size - END_BYTES, END_BYTES);
        for (size_t k = 0; k < N_BLOCKS; k++) {
            size_t at = (size_t)((uint64_t)(mf.size - BLOCK_BYTES) * k / (N_BLOCKS - 1));
            caprl_sha256_update(h, mf.data + at, BLOCK_BYTES);
        }
    }
    caprl_file_unmap(&mf);
    return CAPRL_OK;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static bool ends_with(const char *s, const char *tail) {
    size_t n = strlen(s), m = strlen(tail);
    return n >= m && strcmp(s + n - m, tail) == 0;
}

/* A checkpoint directory: name and content of each file a model load can read (training state left out: a step-N
 * directory of caprl sft or train holds one that loading the model ignores). */
static caprl_status hash_checkpoint(caprl_sha256 *h, const char *dir, caprl_error *err) {
    DIR *d = opendir(dir);
    if (!d) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot list the checkpoint directory", dir);
    }
    char  **names = NULL;
    size_t  n = 0, cap = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        const char *name = e->d_name;
        if (name[0] == '.' || strncmp(name, "training_state", 14) == 0 ||
            !(ends_with(name, ".json") || ends_with(name, ".safetensors"))) {
            continue;
        }
        char       *path = caprl_path_join(dir, name);
        struct stat st;
        bool        regular = stat(path, &st) == 0 && S_ISREG(st.st_mode);
        free(path);
        if (!regular) {
            continue;
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            char **nn = realloc(names, cap * sizeof *names);
            if (!nn) {
                break;
            }
            names = nn;
        }
        names[n++] = caprl_xstrdup(name);
    }
    closedir(d);
    if (n > 0) {
        qsort(names, n, sizeof *names, cmp_names);
    }
    caprl_status st = CAPRL_OK;
    for (size_t i = 0; i < n; i++) {
        if (st == CAPRL_OK) {
            char *path = caprl_path_join(dir, names[i]);
            caprl_sha256_update(h, names[i], strlen(names[i]) + 1);
            st = hash_file(h, path, true, err);
            free(path);
        }
        free(names[i]);
    }
    free(names);
    return st;
}

caprl_status caprl_rl_fingerprints_compute(const caprl_rl_config *cfg, caprl_rl_fingerprints *fp, caprl_error *err) {
    memset(fp, 0, sizeof *fp);
    for (int32_t i = 0; i < CAPRL_RL_N_INPUTS; i++) {
        const char *path = input_path(cfg, i);
        if (!path) {
            continue; /* reader_template unset: the built-in prompt */
        }
        caprl_sha256 h;
        caprl_sha256_init(&h);
        bool is_dir = caprl_path_is_dir(path);
        CAPRL_TRY(is_dir ? hash_checkpoint(&h, path, err) : hash_file(&h, path, false, err));
        uint8_t digest[32];
        caprl_sha256_final(&h, digest);
        for (int b = 0; b < 32; b++) {
            snprintf(fp->hex[i] + 2 * b, 3, "%02x", digest[b]);
        }
    }
    return CAPRL_OK;
}

char *caprl_rl_fingerprints_json(const caprl_rl_config *cfg, const caprl_rl_fingerprints *fp) {
    size_t cap = 256, len = 0;
    for (int32_t i = 0; i < CAPRL_RL_N_INPUTS; i++) {
        cap += 2 * (input_path(cfg, i) ? 6 * strlen(input_path(cfg, i)) : 0) + 160;
    }
    char *buf = caprl_xmalloc(cap);
    len += (size_t)snprintf(buf, cap, "{\n");
    for (int32_t i = 0; i < CAPRL_RL_N_INPUTS; i++) {
        const char *sep = i + 1 < CAPRL_RL_N_INPUTS ? "," : "";
        if (!input_path(cfg, i)) {
            len += (size_t)snprintf(buf + len, cap - len, "  \"%s\": null%s\n", k_inputs[i], sep);
            continue;
        }
        char *path = caprl_json_quote(input_path(cfg, i));
        len += (size_t)snprintf(buf + len, cap - len, "  \"%s\": {\"path\": %s, \"sha256\": \"%s\"}%s\n", k_inputs[i],
                                path, fp->hex[i], sep);
        free(path);
    }
    snprintf(buf + len, cap - len, "}\n");
    return buf;
}

caprl_status caprl_rl_check_fingerprints(const caprl_rl_config *cfg, const caprl_rl_fingerprints *fp,
                                         const char *stored, size_t n, const char *name, caprl_error *err) {
    struct json_t *root = NULL;
    CAPRL_TRY(caprl_json_parse(&root, stored, n, name, err));
    caprl_json_obj o;
    caprl_status   st = caprl_json_root(&o, root, name, err);
    for (int32_t i = 0; i < CAPRL_RL_N_INPUTS && st == CAPRL_OK; i++) {
        caprl_json_obj entry;
        bool           present = false;
        const char    *old_hex = "", *old_path = NULL;
        st = caprl_json_opt_object(&o, k_inputs[i], &entry, &present, err);
        if (st == CAPRL_OK && present) {
            st = caprl_json_get_string(&entry, "sha256", &old_hex, err);
        }
        if (st == CAPRL_OK && present) {
            st = caprl_json_opt_string(&entry, "path", NULL, &old_path, err);
        }
        if (st != CAPRL_OK || strcmp(old_hex, fp->hex[i]) == 0) {
            continue;
        }
        const char *now_path = input_path(cfg, i);
        st = caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                           "resume: '%s' (now %s) is not the %s the run started with (%s): its fingerprint is %.16s in "
                           "%s but %.16s now; a resumed run must keep its inputs",
                           k_inputs[i], now_path ? now_path : "the built-in prompt",
                           i == 0 ? "data file" : i == 3 ? "reader template" : "checkpoint",
                           present ? (old_path ? old_path : "?") : "the built-in prompt",
                           present ? old_hex : "(none)", name, now_path ? fp->hex[i] : "(none)");
    }
    caprl_json_free(root);
    return st;
}
