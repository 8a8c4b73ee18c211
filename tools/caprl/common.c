/* Helpers shared by the subcommands (see common.h). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "caprl/tensor.h"
#include "caprl/vlm.h"
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
    char  *buf = tool_xmalloc(n + 1);
    if (fread(buf, 1, n, f) != n) {
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
    char  *tmp = tool_xmalloc(plen);
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
    int32_t *out = tool_xmalloc(cap * sizeof *out);
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
            out = tool_xrealloc(out, cap * sizeof *out);
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

caprl_status tool_ensure_context(caprl_context **ctx, int32_t *ctx_seq, int64_t *ctx_len, caprl_model *model,
                                 int32_t n_seq, int64_t n_ctx, caprl_error *err) {
    if (*ctx && *ctx_seq >= n_seq && *ctx_len >= n_ctx) {
        return CAPRL_OK;
    }
    if (n_ctx > INT32_MAX) {
        return tool_set_error(err, CAPRL_ERR_INVALID_ARG, "a prompt of %lld tokens is too long", (long long)n_ctx);
    }
    *ctx_seq = *ctx_seq > n_seq ? *ctx_seq : n_seq;
    *ctx_len = *ctx_len > n_ctx ? *ctx_len : n_ctx;
    caprl_context_params cp = caprl_context_default_params();
    cp.n_seq_max = *ctx_seq;
    cp.n_ctx = (int32_t)*ctx_len;
    cp.n_batch_max = 512 > *ctx_seq ? 512 : *ctx_seq;
    cp.n_logits_max = *ctx_seq;
    caprl_context_free(*ctx);
    *ctx = NULL;
    return caprl_context_init(ctx, model, &cp, err);
}

/* DIR/preprocessor_config.json when the checkpoint has one, the Qwen2.5-VL defaults otherwise. */
static caprl_status load_preprocess_config(const char *model_dir, caprl_preprocess_config *pp, caprl_error *err) {
    *pp = caprl_preprocess_config_default();
    char path[4096];
    snprintf(path, sizeof path, "%s/preprocessor_config.json", model_dir);
    return access(path, F_OK) == 0 ? caprl_preprocess_config_load(pp, path, err) : CAPRL_OK;
}

int tool_load_vlm(const char *cmd, const char *role, const char *dir, int32_t n_threads, int32_t resize_variant,
                  caprl_model **model, caprl_vision **vision, caprl_preprocess_config *pp) {
    int rc = tool_load_model(cmd, dir, n_threads, model);
    if (rc == 0 && (!caprl_model_config(*model)->is_vl || !caprl_model_tokenizer(*model))) {
        fprintf(stderr, "caprl %s: error: %s: the %s must be a Qwen2.5-VL model with a tokenizer.json\n", cmd, dir,
                role);
        rc = EXIT_DATA;
    }
    caprl_error  err = {0};
    caprl_status st = CAPRL_OK;
    if (rc == 0 && (st = caprl_vision_load(vision, dir, n_threads, &err)) == CAPRL_OK) {
        st = load_preprocess_config(dir, pp, &err);
        pp->resize_variant = resize_variant;
    }
    if (rc == 0 && st != CAPRL_OK) {
        rc = tool_fail(cmd, st, err.msg);
    }
    return rc;
}

double tool_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double tool_typed_float(float x) {
    char buf[32];
    caprl_f32_shortest(x, buf);
    return strtod(buf, NULL);
}

char *tool_path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char  *p = tool_xmalloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

char *tool_folder_of(const char *path) {
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        return realpath(path, NULL);
    }
    char       *copy = tool_xstrdup(path);
    char       *slash = strrchr(copy, '/');
    const char *dir = ".";
    if (slash) {
        slash[slash == copy ? 1 : 0] = '\0'; /* "/x" lives in "/" */
        dir = copy;
    }
    char *res = realpath(dir, NULL);
    free(copy);
    return res;
}

static void *out_of_memory(size_t n) {
    fprintf(stderr, "caprl: error: out of memory (allocating %zu bytes)\n", n);
    exit(EXIT_BACKEND);
}

void *tool_xmalloc(size_t n) {
    void *q = malloc(n ? n : 1);
    return q ? q : out_of_memory(n);
}

void *tool_xcalloc(size_t count, size_t size) {
    void *q = calloc(count ? count : 1, size ? size : 1);
    return q ? q : out_of_memory(count * size);
}

void *tool_xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    return q ? q : out_of_memory(n);
}

char *tool_xstrdup(const char *s) {
    char *q = strdup(s);
    return q ? q : out_of_memory(strlen(s) + 1);
}

char *tool_absolute(const char *path) {
    char *res = realpath(path, NULL);
    if (res || path[0] == '/') {
        return res ? res : tool_xstrdup(path);
    }
    char cwd[4096];
    if (!getcwd(cwd, sizeof cwd)) {
        return tool_xstrdup(path);
    }
    size_t n = strlen(cwd) + strlen(path) + 2;
    res = tool_xmalloc(n);
    snprintf(res, n, "%s/%s", cwd, path);
    return res;
}

int tool_mkdir_p(const char *cmd, const char *dir) {
    char  *p = tool_xstrdup(dir);
    size_t n = strlen(p);
    int    rc = 0;
    for (size_t i = 1; i <= n && rc == 0; i++) {
        if (p[i] != '/' && p[i] != '\0') {
            continue;
        }
        char c = p[i];
        p[i] = '\0';
        struct stat st;
        if (mkdir(p, 0755) != 0 && errno != EEXIST) {
            fprintf(stderr, "caprl %s: error: %s: cannot create directory: %s\n", cmd, p, strerror(errno));
            rc = EXIT_DATA;
        } else if (stat(p, &st) != 0 || !S_ISDIR(st.st_mode)) {
            fprintf(stderr, "caprl %s: error: %s: not a directory\n", cmd, p);
            rc = EXIT_DATA;
        }
        p[i] = c;
    }
    free(p);
    return rc;
}

caprl_status tool_load_vl_image(const char *model_dir, const char *image_path, int32_t alpha, int32_t threads,
                                caprl_image *img, caprl_vision **vision, caprl_preprocess_config *pp,
                                caprl_error *err) {
    caprl_image_decode_params dp = caprl_image_decode_default_params();
    dp.alpha = alpha;
    *pp = caprl_preprocess_config_default();
    *vision = NULL;
    memset(img, 0, sizeof *img);
    caprl_status st = caprl_image_decode_file(image_path, &dp, img, err);
    if (st == CAPRL_OK) {
        st = caprl_vision_load(vision, model_dir, threads, err);
    }
    if (st == CAPRL_OK) {
        st = load_preprocess_config(model_dir, pp, err);
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

/* ---- image lists ------------------------------------------------------------------------------------------- */

static void list_push(tool_image_list *l, const char *image, const char *base_dir, json_t *extra, long line) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 256;
        l->items = tool_xrealloc(l->items, (size_t)l->cap * sizeof(tool_image_item));
    }
    tool_image_item *it = &l->items[l->n];
    it->image = tool_xstrdup(image);
    if (image[0] == '/' || !base_dir) {
        it->path = tool_xstrdup(image);
    } else {
        size_t n = strlen(base_dir) + strlen(image) + 2;
        it->path = tool_xmalloc(n);
        snprintf(it->path, n, "%s/%s", base_dir, image);
    }
    it->extra = extra;
    it->index = l->n;
    it->line = line;
    l->n++;
}

void tool_image_list_free(tool_image_list *l) {
    for (int64_t i = 0; i < l->n; i++) {
        free(l->items[i].image);
        free(l->items[i].path);
        json_decref(l->items[i].extra);
    }
    free(l->items);
    memset(l, 0, sizeof *l);
}

static bool is_directory(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static bool has_image_ext(const char *name) {
    const char *dot = strrchr(name, '.');
    static const char *exts[] = {".jpg", ".jpeg", ".png", ".webp"};
    for (size_t i = 0; dot && i < sizeof exts / sizeof exts[0]; i++) {
        if (strcasecmp(dot, exts[i]) == 0) {
            return true;
        }
    }
    return false;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int list_dir(const char *cmd, const char *dir, tool_image_list *l) {
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "caprl %s: error: %s: cannot open directory: %s\n", cmd, dir, strerror(errno));
        return EXIT_DATA;
    }
    char         **names = NULL;
    size_t         n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || !has_image_ext(e->d_name)) {
            continue;
        }
        json_t *name = json_string(e->d_name);
        if (!name) { /* the output's key is a JSON string */
            fprintf(stderr, "caprl %s: warning: %s: skipping a file whose name is not UTF-8\n", cmd, dir);
            continue;
        }
        json_decref(name);
        if (n == cap) {
            cap = cap ? 2 * cap : 256;
            names = tool_xrealloc(names, cap * sizeof *names);
        }
        names[n++] = tool_xstrdup(e->d_name);
    }
    closedir(d);
    if (n) { /* qsort's array must not be NULL, even when empty */
        qsort(names, n, sizeof *names, cmp_str);
    }
    for (size_t i = 0; i < n; i++) {
        list_push(l, names[i], dir, NULL, 0);
        free(names[i]);
    }
    free(names);
    return 0;
}

/* A list record's fields carried to the output: all but "image" and drop_fields. */
static json_t *carried_fields(const json_t *rec, const char *const *drop_fields) {
    json_t *extra = json_deep_copy(rec);
    json_object_del(extra, "image");
    for (size_t i = 0; drop_fields && drop_fields[i]; i++) {
        json_object_del(extra, drop_fields[i]);
    }
    return extra;
}

/* A JSON array of paths (the released gen_qa.py's --data-path list; entries may also be {"image": ...} objects):
 * each entry counts as line i + 1 in messages. */
static int list_json_array(const char *cmd, const char *path, const char *data, size_t len, const char *base,
                           const char *const *drop_fields, tool_image_list *l) {
    json_error_t jerr;
    json_t      *arr = json_loadb(data, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!arr || !json_is_array(arr)) {
        fprintf(stderr, "caprl %s: error: %s:%d: %s\n", cmd, path, arr ? 1 : jerr.line,
                arr ? "expected a JSON array of image paths" : jerr.text);
        json_decref(arr);
        return EXIT_DATA;
    }
    int rc = 0;
    for (size_t i = 0; i < json_array_size(arr) && rc == 0; i++) {
        json_t *e = json_array_get(arr, i), *img = json_is_object(e) ? json_object_get(e, "image") : e;
        if (!json_is_string(img) || json_string_length(img) == 0 ||
            strlen(json_string_value(img)) != json_string_length(img)) {
            fprintf(stderr, "caprl %s: error: %s: entry %zu: expected a non-empty path or {\"image\": path}\n", cmd,
                    path, i + 1);
            rc = EXIT_DATA;
            break;
        }
        list_push(l, json_string_value(img), base, json_is_object(e) ? carried_fields(e, drop_fields) : NULL,
                  (long)i + 1);
    }
    json_decref(arr);
    return rc;
}

/* A text file of paths, JSON Lines with an "image" field, or a JSON array of paths; relative paths are relative to
 * the list's folder. */
static int list_file(const char *cmd, const char *path, const char *const *drop_fields, tool_image_list *l) {
    char  *data = NULL;
    size_t len = 0;
    int    rc = tool_read_file(cmd, path, (size_t)1 << 31, &data, &len);
    if (rc) {
        return rc;
    }
    char *base = tool_xstrdup(path), *slash = strrchr(base, '/');
    if (slash) {
        slash[slash == base ? 1 : 0] = '\0'; /* "/x.txt" lives in "/" */
    } else {
        free(base); /* a list in the working directory: its paths are used as written */
        base = NULL;
    }
    size_t start = len >= 3 && memcmp(data, "\xEF\xBB\xBF", 3) == 0 ? 3 : 0; /* a BOM some editors write */
    size_t first = start;
    while (first < len && (data[first] == ' ' || data[first] == '\n' || data[first] == '\r' || data[first] == '\t')) {
        first++;
    }
    if (first < len && data[first] == '[') {
        rc = list_json_array(cmd, path, data + first, len - first, base, drop_fields, l);
        free(base);
        free(data);
        return rc;
    }
    bool jsonl = first < len && data[first] == '{';
    /* split by hand rather than with strtok: empty lines must still count, or LIST:line would point elsewhere */
    for (long line_no = 1; start < len && rc == 0; line_no++) {
        char  *line = data + start;
        char  *nl = memchr(line, '\n', len - start);
        size_t n = nl ? (size_t)(nl - line) : len - start;
        start += n + 1;
        while (n && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t')) {
            n--;
        }
        line[n] = '\0'; /* the '\n' or the buffer's own terminator */
        if (n == 0) {
            continue;
        }
        if (!jsonl) {
            json_t *name = json_stringn(line, n);
            if (!name || strlen(line) != n) { /* the output's key is a JSON string */
                fprintf(stderr, "caprl %s: error: %s:%ld: the path is not valid UTF-8 text\n", cmd, path, line_no);
                json_decref(name);
                rc = EXIT_DATA;
                break;
            }
            json_decref(name);
            list_push(l, line, base, NULL, line_no);
            continue;
        }
        json_error_t jerr;
        json_t      *rec = json_loadb(line, n, JSON_REJECT_DUPLICATES, &jerr);
        json_t      *img = rec ? json_object_get(rec, "image") : NULL;
        if (!rec || !json_is_object(rec) || !json_is_string(img) || json_string_length(img) == 0 ||
            strlen(json_string_value(img)) != json_string_length(img)) {
            fprintf(stderr, "caprl %s: error: %s:%ld: %s\n", cmd, path, line_no,
                    !rec ? jerr.text : "expected a JSON object with a non-empty string field \"image\"");
            json_decref(rec);
            rc = EXIT_DATA;
            break;
        }
        list_push(l, json_string_value(img), base, carried_fields(rec, drop_fields), line_no);
        json_decref(rec);
    }
    free(base);
    free(data);
    return rc;
}

static int cmp_item_image(const void *a, const void *b) {
    const tool_image_item *x = *(const tool_image_item *const *)a, *y = *(const tool_image_item *const *)b;
    int                    c = strcmp(x->image, y->image);
    return c ? c : (x->index > y->index) - (x->index < y->index);
}

/* Outputs are keyed by "image": a name listed twice would be processed twice in one run and then skipped twice on
 * resume, so it is refused up front. */
static int check_duplicates(const char *cmd, const char *list, const tool_image_list *l) {
    if (l->n < 2) {
        return 0;
    }
    const tool_image_item **sorted = tool_xmalloc((size_t)l->n * sizeof *sorted);
    for (int64_t i = 0; i < l->n; i++) {
        sorted[i] = &l->items[i];
    }
    qsort(sorted, (size_t)l->n, sizeof *sorted, cmp_item_image);
    int rc = 0;
    for (int64_t i = 1; i < l->n && rc == 0; i++) {
        if (strcmp(sorted[i - 1]->image, sorted[i]->image) == 0) {
            fprintf(stderr, "caprl %s: error: %s:%ld: image \"%s\" is listed twice (first on line %ld)\n", cmd, list,
                    sorted[i]->line, sorted[i]->image, sorted[i - 1]->line);
            rc = EXIT_DATA;
        }
    }
    free(sorted);
    return rc;
}

int tool_image_list_load(const char *cmd, const char *list, const char *const *drop_fields, tool_image_list *out) {
    memset(out, 0, sizeof *out);
    int rc = is_directory(list) ? list_dir(cmd, list, out) : list_file(cmd, list, drop_fields, out);
    if (rc == 0) {
        rc = check_duplicates(cmd, list, out);
    }
    if (rc) {
        tool_image_list_free(out);
    }
    return rc;
}

bool tool_parse_shard(const char *text, long *i, long *k) {
    char *end = NULL;
    errno = 0;
    *i = strtol(text, &end, 10);
    if (end == text || *end != '/' || errno) {
        return false;
    }
    const char *kt = end + 1;
    *k = strtol(kt, &end, 10);
    return end != kt && !*end && !errno && *k >= 1 && *i >= 0 && *i < *k;
}

/* ---- resumable JSON Lines outputs --------------------------------------------------------------------------- */

int tool_jsonl_open_locked(const char *cmd, const char *path, int *fd) {
    *fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (*fd < 0) {
        fprintf(stderr, "caprl %s: error: %s: cannot open for appending: %s\n", cmd, path, strerror(errno));
        return EXIT_DATA;
    }
    if (flock(*fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK) {
        fprintf(stderr, "caprl %s: error: %s: another caprl %s is writing to it\n", cmd, path, cmd);
        close(*fd);
        *fd = -1;
        return EXIT_DATA;
    }
    return 0;
}

int tool_jsonl_scan(const char *cmd, const char *path, int fd, const char *key, int key_type, const char *what,
                    tool_record_fn fn, void *user_data) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (fd < 0 && errno == ENOENT) {
            return 0;
        }
        fprintf(stderr, "caprl %s: error: %s: cannot read: %s\n", cmd, path, strerror(errno));
        return EXIT_DATA;
    }
    char   *line = NULL;
    size_t  line_cap = 0;
    ssize_t got;
    off_t   good_end = 0;
    long    line_no = 0;
    int     rc = 0;
    bool    torn = false;
    while (rc == 0 && (got = getline(&line, &line_cap, f)) > 0) {
        line_no++;
        bool         has_nl = line[got - 1] == '\n';
        json_error_t jerr;
        json_t      *rec = json_loadb(line, (size_t)got - (has_nl ? 1 : 0), 0, &jerr);
        json_t      *k = rec ? json_object_get(rec, key) : NULL;
        if (!rec || !k || (int)json_typeof(k) != key_type || !has_nl) {
            json_decref(rec);
            /* complete JSON without its newline is torn too: the newline is written with the record */
            if (!has_nl || getc(f) == EOF) {
                torn = true;
                break;
            }
            fprintf(stderr, "caprl %s: error: %s:%ld: not a %s; refusing to append to it\n", cmd, path, line_no,
                    what);
            rc = EXIT_DATA;
            break;
        }
        rc = fn ? fn(rec, path, line_no, user_data) : 0;
        json_decref(rec);
        good_end += (off_t)got;
    }
    if (rc == 0 && ferror(f)) {
        fprintf(stderr, "caprl %s: error: %s: read failed: %s\n", cmd, path, strerror(errno));
        rc = EXIT_DATA;
    }
    free(line);
    fclose(f);
    if (rc == 0 && torn && fd >= 0) {
        struct stat st;
        long long   size = fstat(fd, &st) == 0 ? (long long)st.st_size : -1;
        fprintf(stderr, "caprl %s: %s: removing a torn last record (%lld bytes) left by an interrupted run\n", cmd,
                path, size - (long long)good_end);
        if (ftruncate(fd, good_end) != 0) {
            fprintf(stderr, "caprl %s: error: %s: cannot truncate: %s\n", cmd, path, strerror(errno));
            rc = EXIT_DATA;
        }
    }
    return rc;
}

int tool_jsonl_write(const char *cmd, FILE *out, json_t *rec) {
    char *line = json_dumps(rec, JSON_COMPACT);
    json_decref(rec);
    if (!line) {
        fprintf(stderr, "caprl %s: error: cannot encode a record\n", cmd);
        return EXIT_DATA;
    }
    /* one write per record, then flush + fsync: a kill leaves at most one torn line, repaired on resume */
    size_t n = strlen(line);
    line[n] = '\n';
    bool ok = fwrite(line, 1, n + 1, out) == n + 1 && fflush(out) == 0 && fsync(fileno(out)) == 0;
    free(line);
    if (!ok) {
        fprintf(stderr, "caprl %s: error: write failed: %s\n", cmd, strerror(errno));
        return EXIT_DATA;
    }
    return 0;
}

void tool_keyset_add(tool_keyset *s, const char *key) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 256;
        s->keys = tool_xrealloc(s->keys, s->cap * sizeof(char *));
    }
    s->keys[s->n++] = tool_xstrdup(key);
    s->sorted = false;
}

bool tool_keyset_has(tool_keyset *s, const char *key) {
    if (s->n == 0) {
        return false;
    }
    if (!s->sorted) {
        qsort(s->keys, s->n, sizeof(char *), cmp_str);
        s->sorted = true;
    }
    return bsearch(&key, s->keys, s->n, sizeof(char *), cmp_str) != NULL;
}

void tool_keyset_free(tool_keyset *s) {
    for (size_t i = 0; i < s->n; i++) {
        free(s->keys[i]);
    }
    free(s->keys);
    memset(s, 0, sizeof *s);
}

void tool_pending_images(const char *cmd, const tool_image_list *items, char *const *keys, tool_keyset *done,
                         bool sharded, long shard_i, long shard_k, const char *out_path, const char *verb,
                         tool_image_item ***todo, int64_t *n_todo) {
    *todo = tool_xmalloc((size_t)items->n * sizeof **todo);
    *n_todo = 0;
    int64_t n_shard = 0;
    for (int64_t i = shard_i; i < items->n; i += shard_k) {
        n_shard++;
        if (!tool_keyset_has(done, keys ? keys[i] : items->items[i].image)) {
            (*todo)[(*n_todo)++] = &items->items[i];
        }
    }
    fprintf(stderr, "caprl %s: %lld images in the list", cmd, (long long)items->n);
    if (sharded) {
        fprintf(stderr, ", %lld in shard %ld/%ld", (long long)n_shard, shard_i, shard_k);
    }
    fprintf(stderr, ", %lld already in %s, %lld to %s\n", (long long)(n_shard - *n_todo), out_path,
            (long long)*n_todo, verb);
}

/* ---- progress ----------------------------------------------------------------------------------------------- */

void tool_progress_start(tool_progress *p, const char *cmd, const char *unit, const char *rate_unit, int64_t total) {
    memset(p, 0, sizeof *p);
    p->cmd = cmd;
    p->unit = unit;
    p->rate_unit = rate_unit;
    p->total = total;
    p->printed = -1;
    p->t0 = tool_now();
    p->tty = isatty(fileno(stderr));
}

void tool_progress_show(tool_progress *p, bool final) {
    double now = tool_now(), el = now - p->t0;
    if (!p->tty && (final ? p->printed == p->done : p->printed >= 0 && now - p->last_print < 10.0)) {
        return;
    }
    p->last_print = now;
    p->printed = p->done;
    double rate = el > 0 ? (double)p->done / el : 0;
    double eta = rate > 0 ? (double)(p->total - p->done) / rate : 0;
    if (p->tty) {
        int  width = 30, fill = p->total ? (int)(width * p->done / p->total) : width;
        char bar[32];
        for (int i = 0; i < width; i++) {
            bar[i] = i < fill ? '#' : '.';
        }
        bar[width] = '\0';
        /* \033[K clears what a longer previous line left behind */
        fprintf(stderr, "\r[%s] %lld/%lld %s  %.2f %s  ETA %dm%02ds  (%lld failed)\033[K%s", bar, (long long)p->done,
                (long long)p->total, p->unit, rate, p->rate_unit, (int)(eta / 60), (int)eta % 60,
                (long long)p->failed, final ? "\n" : "");
    } else {
        fprintf(stderr, "caprl %s: %lld/%lld %s, %.2f %s, ETA %.0f s, %lld failed\n", p->cmd, (long long)p->done,
                (long long)p->total, p->unit, rate, p->rate_unit, eta, (long long)p->failed);
    }
}

const char *tool_finish_name(int32_t finish) {
    return finish == CAPRL_FINISH_EOS ? "eos" : finish == CAPRL_FINISH_LENGTH ? "length" : "aborted";
}

void tool_samples_init(tool_samples *s, int32_t n_sequences, int32_t per_prompt, int32_t cap) {
    s->n_sequences = n_sequences;
    s->per_prompt = per_prompt;
    s->cap = cap;
    s->tokens = tool_xcalloc((size_t)n_sequences, sizeof(int32_t *));
    s->n = tool_xcalloc((size_t)n_sequences, sizeof(int32_t));
    for (int32_t i = 0; i < n_sequences; i++) {
        s->tokens[i] = tool_xmalloc((size_t)cap * sizeof(int32_t));
    }
}

void tool_samples_free(tool_samples *s) {
    for (int32_t i = 0; i < s->n_sequences; i++) {
        free(s->tokens[i]);
    }
    free(s->tokens);
    free(s->n);
}

bool tool_samples_collect(int32_t prompt, int32_t sample, int32_t token, void *user_data) {
    tool_samples *s = user_data;
    int32_t       q = prompt * s->per_prompt + sample;
    if (s->n[q] < s->cap) {
        s->tokens[q][s->n[q]++] = token;
    }
    return true;
}

int tool_samples_to_json(const char *cmd, json_t *rec, const char *key, const caprl_tokenizer *tok,
                         const tool_samples *s, int32_t first, int32_t count, const int32_t *finish, char **buf,
                         size_t *cap) {
    json_t *texts = json_array(), *ntok = json_array(), *fin = json_array();
    int     rc = 0;
    for (int32_t q = first; q < first + count && rc == 0; q++) {
        int32_t     n_text = s->n[q] - (finish[q] == CAPRL_FINISH_EOS ? 1 : 0);
        size_t      len = 0;
        caprl_error err = {0};
        if (tool_decode_text(tok, s->tokens[q], n_text, buf, cap, &len, &err) != CAPRL_OK) {
            rc = tool_fail(cmd, err.code, err.msg);
            break;
        }
        json_array_append_new(texts, json_stringn(*buf, len));
        json_array_append_new(ntok, json_integer(n_text));
        json_array_append_new(fin, json_string(tool_finish_name(finish[q])));
    }
    json_object_set_new(rec, key, texts);
    json_object_set_new(rec, "tokens", ntok);
    json_object_set_new(rec, "finish", fin);
    return rc;
}

caprl_status tool_decode_text(const caprl_tokenizer *tok, const int32_t *ids, int32_t n, char **buf, size_t *cap,
                              size_t *len, caprl_error *err) {
    for (;;) {
        caprl_status st = caprl_tokenizer_decode(tok, ids, n, true, *buf, *cap, len, err);
        if (st != CAPRL_OK) {
            return st;
        }
        if (*buf && *len < *cap) {
            return CAPRL_OK;
        }
        char *grown = realloc(*buf, 2 * *len + 64);
        if (!grown) {
            return tool_set_error(err, CAPRL_ERR_OOM, "out of memory decoding %d tokens", n);
        }
        *buf = grown;
        *cap = 2 * *len + 64;
    }
}

json_t *tool_image_error_text(const char *path, const char *image, const char *msg) {
    bool    named = strstr(msg, path) != NULL;
    json_t *text = named ? json_string(msg) : json_sprintf("%s: %s", path, msg);
    if (!text) {
        text = json_sprintf("%s: %s", image, named ? "cannot read the image" : msg);
    }
    return text ? text : json_string("cannot read the image");
}

int tool_parse_alpha(const char *cmd, const char *name, int32_t *alpha) {
    if (strcmp(name, "white") == 0 || strcmp(name, "drop") == 0) {
        *alpha = name[0] == 'w' ? CAPRL_ALPHA_WHITE : CAPRL_ALPHA_DROP;
        return 0;
    }
    return tool_usage_error(cmd, "--alpha must be white or drop, got '%s'", name);
}

int32_t tool_resize_variant(int32_t alpha) {
    return alpha == CAPRL_ALPHA_WHITE ? CAPRL_RESIZE_QWEN_VL_UTILS : CAPRL_RESIZE_HF;
}

/* ---- batched image generation ---------------------------------------------------------------------------------- */

static json_t *vl_error_record(const tool_vl_job *job, const tool_image_item *it, const char *msg) {
    json_t *rec = job->base_record(job, it);
    json_object_set_new(rec, "error", tool_image_error_text(it->path, it->image, msg));
    return rec;
}

/* Generates for `count` decoded images and writes their records. */
static int vl_job_batch(tool_vl_job *job, tool_image_item **its, caprl_image *imgs, int32_t count) {
    caprl_vl_request *reqs = tool_xcalloc((size_t)count, sizeof *reqs);
    int32_t           ns = count * job->gp.n_samples;
    int32_t          *finish = tool_xcalloc((size_t)ns, sizeof(int32_t));
    tool_samples      samples;
    tool_samples_init(&samples, ns, job->gp.n_samples, job->gp.max_new_tokens);
    for (int32_t i = 0; i < count; i++) {
        reqs[i].image = &imgs[i];
        reqs[i].prompt = job->prompt;
        reqs[i].system = job->system;
        reqs[i].stream_id = (uint64_t)its[i]->index;
    }
    caprl_error  err = {0};
    caprl_status st = caprl_vl_generate(job->model, job->vision, &job->pp, reqs, count, &job->gp, &job->ctx,
                                        tool_samples_collect, &samples, finish, NULL, &err);
    int rc = 0;
    if (st == CAPRL_ERR_OOM || st == CAPRL_ERR_BACKEND) {
        rc = tool_fail(job->cmd, st, err.msg); /* the machine's problem, not the images' */
    } else if (st != CAPRL_OK && count > 1) {
        for (int32_t i = 0; i < count && rc == 0; i++) { /* one image may have sunk the batch */
            rc = vl_job_batch(job, &its[i], &imgs[i], 1);
        }
    } else {
        for (int32_t i = 0; i < count && rc == 0; i++) {
            json_t *rec;
            if (st != CAPRL_OK) {
                rec = vl_error_record(job, its[i], err.msg);
                job->prog.failed++;
            } else {
                rec = job->base_record(job, its[i]);
                rc = job->add_outputs(job, rec, &samples, i * job->gp.n_samples, finish);
                if (rc) {
                    json_decref(rec);
                    break;
                }
            }
            rc = tool_jsonl_write(job->cmd, job->out, rec);
            job->prog.done++;
        }
    }
    tool_samples_free(&samples);
    free(finish);
    free(reqs);
    return rc;
}

int tool_vl_job_run(tool_vl_job *job, tool_image_item **todo, int64_t n_todo) {
    tool_progress_start(&job->prog, job->cmd, "images", "img/s", n_todo);
    caprl_image      *imgs = tool_xcalloc((size_t)job->batch, sizeof *imgs);
    tool_image_item **its = tool_xcalloc((size_t)job->batch, sizeof *its);
    int               rc = 0;
    for (int64_t next = 0; next < n_todo && rc == 0;) {
        int32_t count = 0;
        while (next < n_todo && count < job->batch && rc == 0) {
            tool_image_item *it = todo[next++];
            caprl_error      err = {0};
            caprl_status     st = caprl_image_decode_file(it->path, &job->dp, &imgs[count], &err);
            int32_t          rw = 0, rh = 0;
            if (st == CAPRL_OK) { /* size problems (tiny, extreme aspect) stay with their image, not the batch */
                st = caprl_image_preprocess_size(imgs[count].width, imgs[count].height, &job->pp, &rw, &rh, &err);
                if (st != CAPRL_OK) {
                    caprl_image_free(&imgs[count]);
                }
            }
            if (st != CAPRL_OK) { /* recorded and skipped */
                rc = tool_jsonl_write(job->cmd, job->out, vl_error_record(job, it, err.msg));
                job->prog.done++;
                job->prog.failed++;
                continue;
            }
            its[count++] = it;
        }
        if (count > 0 && rc == 0) {
            rc = vl_job_batch(job, its, imgs, count);
        }
        for (int32_t i = 0; i < count; i++) {
            caprl_image_free(&imgs[i]);
        }
        tool_progress_show(&job->prog, false);
    }
    tool_progress_show(&job->prog, true);
    free(imgs);
    free(its);
    return rc;
}

void tool_vl_job_free(tool_vl_job *job) {
    caprl_context_free(job->ctx);
    caprl_vision_free(job->vision);
    caprl_model_free(job->model);
    free(job->text);
}
