/* caprl report: the before/after figures of a finished `make demo` run (scripts/demo.sh): RUN/summary.json, a
 * self-contained RUN/report.html (table, reward and caption-length curves as inline SVG, example images as data
 * URIs) and the table on stdout. Only reads the run's files: no model is loaded. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include "commands.h"
#include "common.h"
#include "opts.h"

#define CMD          "report"
#define JSONL_MAX    ((size_t)4 << 30)
#define JSON_MAX     ((size_t)1 << 30)
#define IMAGE_MAX    ((size_t)64 << 20)
#define EXAMPLES_MAX 16
#define NA           ((double)NAN) /* an absent or undefined figure */

/* ---- strings ------------------------------------------------------------------------------------------------ */

typedef struct sbuf {
    char  *p;
    size_t n, cap;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        b->cap = 2 * (b->n + n + 1) + 256;
        b->p = tool_xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_puts(sbuf *b, const char *s) {
    sb_put(b, s, strlen(s));
}

__attribute__((format(printf, 2, 0))) static void sb_vprintf(sbuf *b, const char *fmt, va_list ap) {
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n <= 0) {
        return;
    }
    if (b->n + (size_t)n + 1 > b->cap) {
        b->cap = 2 * (b->n + (size_t)n + 1) + 256;
        b->p = tool_xrealloc(b->p, b->cap);
    }
    vsnprintf(b->p + b->n, (size_t)n + 1, fmt, ap);
    b->n += (size_t)n;
}

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    sb_vprintf(b, fmt, ap);
    va_end(ap);
}

/* A malloc'd formatted string (paths). */
static char *str_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *str_printf(const char *fmt, ...) {
    sbuf    b = {0};
    va_list ap;
    va_start(ap, fmt);
    sb_vprintf(&b, fmt, ap);
    va_end(ap);
    if (!b.p) {
        b.p = tool_xrealloc(NULL, 1);
        b.p[0] = '\0';
    }
    return b.p;
}

/* Text for HTML element content and attribute values. */
static void sb_html(sbuf *b, const char *s) {
    for (; *s; s++) {
        switch (*s) {
            case '&': sb_puts(b, "&amp;"); break;
            case '<': sb_puts(b, "&lt;"); break;
            case '>': sb_puts(b, "&gt;"); break;
            case '"': sb_puts(b, "&quot;"); break;
            case '\'': sb_puts(b, "&#39;"); break;
            default: sb_put(b, s, 1);
        }
    }
}

static void sb_base64(sbuf *b, const unsigned char *d, size_t n) {
    static const char k[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char              q[4];
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)d[i] << 16;
        v |= i + 1 < n ? (uint32_t)d[i + 1] << 8 : 0;
        v |= i + 2 < n ? (uint32_t)d[i + 2] : 0;
        q[0] = k[(v >> 18) & 63];
        q[1] = k[(v >> 12) & 63];
        q[2] = i + 1 < n ? k[(v >> 6) & 63] : '=';
        q[3] = i + 2 < n ? k[v & 63] : '=';
        sb_put(b, q, 4);
    }
}

static bool is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* A file the report cannot do without: "PATH: missing (what writes it)", exit 2. */
static int need_file(const char *path, const char *what) {
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "caprl %s: error: %s: missing (%s)\n", CMD, path, what);
        return EXIT_DATA;
    }
    if (!S_ISREG(st.st_mode)) {
        fprintf(stderr, "caprl %s: error: %s: not a regular file (%s)\n", CMD, path, what);
        return EXIT_DATA;
    }
    return 0;
}

static int data_error(const char *path, long line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int data_error(const char *path, long line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    if (line > 0) {
        fprintf(stderr, "caprl %s: error: %s:%ld: ", CMD, path, line);
    } else {
        fprintf(stderr, "caprl %s: error: %s: ", CMD, path);
    }
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return EXIT_DATA;
}

/* ---- reading JSON and JSON Lines ---------------------------------------------------------------------------- */

typedef int (*record_fn)(json_t *rec, const char *path, long line, void *ud);

/* Calls fn for every JSON object line of path (blank lines skipped). A last line without its newline that does not
 * parse is what a kill during a write leaves: skipped with a note. what names the writer for a missing file. */
static int read_jsonl(const char *path, const char *what, record_fn fn, void *ud) {
    int rc = need_file(path, what);
    if (rc) {
        return rc;
    }
    char  *text = NULL;
    size_t len = 0;
    rc = tool_read_file(CMD, path, JSONL_MAX, &text, &len);
    if (rc) {
        return rc;
    }
    long line = 0;
    for (size_t pos = 0; pos < len && rc == 0;) {
        const char *start = text + pos;
        const char *nl = memchr(start, '\n', len - pos);
        size_t      n = nl ? (size_t)(nl - start) : len - pos;
        pos += n + 1;
        line++;
        size_t k = 0;
        while (k < n && (start[k] == ' ' || start[k] == '\t' || start[k] == '\r')) {
            k++;
        }
        if (k == n) {
            continue;
        }
        json_error_t jerr;
        json_t      *rec = json_loadb(start, n, 0, &jerr);
        if (!rec && !nl) {
            fprintf(stderr, "caprl %s: note: %s:%ld: ignoring a torn last line\n", CMD, path, line);
            break;
        }
        if (!rec || !json_is_object(rec)) {
            rc = data_error(path, line, "%s", rec ? "not a JSON object" : jerr.text);
        } else {
            rc = fn(rec, path, line, ud);
        }
        json_decref(rec);
    }
    free(text);
    return rc;
}

static int read_json(const char *path, const char *what, json_t **out) {
    int rc = need_file(path, what);
    if (rc) {
        return rc;
    }
    char  *text = NULL;
    size_t len = 0;
    rc = tool_read_file(CMD, path, JSON_MAX, &text, &len);
    if (rc) {
        return rc;
    }
    json_error_t jerr;
    *out = json_loadb(text, len, 0, &jerr);
    free(text);
    if (!*out) {
        return data_error(path, jerr.line, "%s", jerr.text);
    }
    return 0;
}

/* Collects every record into a JSON array. */
static int collect_record(json_t *rec, const char *path, long line, void *ud) {
    (void)path;
    (void)line;
    json_array_append(ud, rec);
    return 0;
}

/* ---- the synthetic world ------------------------------------------------------------------------------------ */

enum { V_SIZE, V_COLOR, V_SHAPE, V_POSITION, V_COUNT };
static const char *const k_vocab_keys[V_COUNT] = {"sizes", "colors", "shapes", "positions"};

typedef struct world {
    char   *dir;
    json_t *manifest;       /* synth.json */
    json_t *vocab[V_COUNT]; /* borrowed from manifest: arrays of strings */
    json_t *scenes;         /* scenes.jsonl records */
} world;

static int scene_check(json_t *rec, const char *path, long line, void *ud) {
    json_t *objs = json_object_get(rec, "objects");
    if (!json_is_string(json_object_get(rec, "image")) || !json_is_array(objs)) {
        return data_error(path, line, "expected a scene {\"id\", \"image\", \"objects\": [...]}");
    }
    size_t  i;
    json_t *o;
    json_array_foreach(objs, i, o) {
        for (int v = 0; v < V_COUNT; v++) {
            const char *key = v == V_SIZE ? "size" : v == V_COLOR ? "color" : v == V_SHAPE ? "shape" : "position";
            if (!json_is_string(json_object_get(o, key))) {
                return data_error(path, line, "objects[%zu]: no string \"%s\"", i, key);
            }
        }
    }
    return collect_record(rec, path, line, ud);
}

static int world_load(world *w, const char *run) {
    w->dir = str_printf("%s/world", run);
    char *path = str_printf("%s/synth.json", w->dir);
    int   rc = read_json(path, "the manifest of `caprl synth --out RUN/world`", &w->manifest);
    for (int v = 0; v < V_COUNT && rc == 0; v++) {
        json_t *a = json_object_get(w->manifest, k_vocab_keys[v]);
        bool    ok = json_is_array(a) && json_array_size(a) > 0;
        for (size_t i = 0; ok && i < json_array_size(a); i++) {
            ok = json_is_string(json_array_get(a, i));
        }
        if (!ok) {
            rc = data_error(path, 0, "\"%s\": expected an array of strings", k_vocab_keys[v]);
        }
        w->vocab[v] = a;
    }
    free(path);
    if (rc == 0) {
        path = str_printf("%s/scenes.jsonl", w->dir);
        w->scenes = json_array();
        rc = read_jsonl(path, "the ground truth of `caprl synth`", scene_check, w->scenes);
        free(path);
    }
    return rc;
}

static void world_free(world *w) {
    free(w->dir);
    json_decref(w->manifest);
    json_decref(w->scenes);
}

/* The scene of an image as the benchmark (hence the captions file) writes it: the same relative path, or an
 * absolute path ending in "/" + the scene's path. */
static json_t *scene_of(const world *w, const char *image) {
    size_t  i, li = strlen(image);
    json_t *s;
    json_array_foreach(w->scenes, i, s) {
        const char *p = json_string_value(json_object_get(s, "image"));
        size_t      lp = strlen(p);
        if (strcmp(p, image) == 0 || (li > lp && image[li - lp - 1] == '/' && strcmp(image + li - lp, p) == 0)) {
            return s;
        }
    }
    return NULL;
}

/* ---- object mentions ---------------------------------------------------------------------------------------- */

/* Lowercased ASCII words of a caption (anything else separates words). */
typedef struct words {
    char  *buf;
    char **w;
    size_t n;
} words;

static void words_split(words *ws, const char *text) {
    size_t len = strlen(text);
    ws->buf = tool_xrealloc(NULL, len + 1);
    ws->w = tool_xrealloc(NULL, (len / 2 + 1) * sizeof *ws->w);
    ws->n = 0;
    bool in = false;
    for (size_t i = 0; i <= len; i++) {
        char c = text[i];
        bool letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        ws->buf[i] = letter ? (char)(c | 0x20) : '\0';
        if (letter && !in) {
            ws->w[ws->n++] = ws->buf + i;
        }
        in = letter;
    }
}

static void words_free(words *ws) {
    free(ws->buf);
    free(ws->w);
}

static bool in_vocab(json_t *arr, const char *word) {
    for (size_t i = 0; i < json_array_size(arr); i++) {
        if (strcmp(json_string_value(json_array_get(arr, i)), word) == 0) {
            return true;
        }
    }
    return false;
}

/* The position phrase (e.g. "top left") starting at word `at`, or NULL. */
static const char *position_at(const world *w, const words *ws, size_t at) {
    json_t *ps = w->vocab[V_POSITION];
    for (size_t i = 0; i < json_array_size(ps); i++) {
        const char *p = json_string_value(json_array_get(ps, i));
        size_t      k = at;
        bool        ok = true;
        for (const char *q = p; *q && ok;) {
            size_t n = strcspn(q, " ");
            ok = k < ws->n && strlen(ws->w[k]) == n && strncmp(ws->w[k], q, n) == 0;
            k++;
            q += n;
            q += *q == ' ';
        }
        if (ok) {
            return p;
        }
    }
    return NULL;
}

typedef struct mentions {
    int64_t mentioned; /* "<size> <color> <shape>" phrases */
    int64_t correct;   /* ... naming an object of the image (size, colour and shape) */
    int64_t exact;     /* ... and followed by "at the <its position>" */
    int64_t covered;   /* distinct objects of the image named correctly */
    int64_t objects;   /* objects in the image */
} mentions;

/* Counts the object phrases of the synthetic grammar ("A large red circle at the top left.") in caption and checks
 * them against the scene's objects. */
static void count_mentions(const world *w, const char *caption, json_t *scene, mentions *m) {
    json_t *objs = json_object_get(scene, "objects");
    size_t  n_obj = json_array_size(objs);
    bool   *seen = tool_xrealloc(NULL, n_obj * sizeof *seen);
    memset(seen, 0, n_obj * sizeof *seen);
    words ws;
    words_split(&ws, caption);
    for (size_t i = 0; i + 2 < ws.n; i++) {
        if (!in_vocab(w->vocab[V_SIZE], ws.w[i]) || !in_vocab(w->vocab[V_COLOR], ws.w[i + 1]) ||
            !in_vocab(w->vocab[V_SHAPE], ws.w[i + 2])) {
            continue;
        }
        m->mentioned++;
        const char *pos = i + 4 < ws.n && strcmp(ws.w[i + 3], "at") == 0 && strcmp(ws.w[i + 4], "the") == 0
                              ? position_at(w, &ws, i + 5)
                              : NULL;
        for (size_t k = 0; k < n_obj; k++) {
            json_t *o = json_array_get(objs, k);
            if (strcmp(json_string_value(json_object_get(o, "size")), ws.w[i]) == 0 &&
                strcmp(json_string_value(json_object_get(o, "color")), ws.w[i + 1]) == 0 &&
                strcmp(json_string_value(json_object_get(o, "shape")), ws.w[i + 2]) == 0) {
                m->correct++;
                m->exact += pos && strcmp(json_string_value(json_object_get(o, "position")), pos) == 0;
                m->covered += !seen[k];
                seen[k] = true;
                break;
            }
        }
        i += 2;
    }
    m->objects += (int64_t)n_obj;
    words_free(&ws);
    free(seen);
}

static int64_t word_count(const char *s) {
    int64_t n = 0;
    bool    in = false;
    for (; *s; s++) {
        bool space = *s == ' ' || *s == '\t' || *s == '\n' || *s == '\r' || *s == '\f' || *s == '\v';
        n += !space && !in;
        in = !space;
    }
    return n;
}

/* ---- Prism evaluations (before = the SFT captioner, after = the GRPO one) ----------------------------------- */

typedef struct side {
    const char *name; /* "before" / "after" */
    const char *tag;
    char       *dir;
    bool        present;
    char       *eval_path;
    double      bon, mean;
    json_t     *caps; /* captions records of every file of the tag, first record per image */
    int64_t     images, errors, captions, words, tokens, n_tokens;
    mentions    m;
} side;

/* Prism_{tag}_step_eval_{step}_final.json with the highest step. */
static int find_eval_file(side *s) {
    DIR *d = opendir(s->dir);
    if (!d) {
        return data_error(s->dir, 0, "cannot open: %s", strerror(errno));
    }
    char  *prefix = str_printf("Prism_%s_step_eval_", s->tag);
    size_t lp = strlen(prefix);
    long   best = -1;
    for (struct dirent *e; (e = readdir(d));) {
        const char *name = e->d_name;
        char       *end = NULL;
        if (strncmp(name, prefix, lp) != 0 || name[lp] < '0' || name[lp] > '9') {
            continue;
        }
        long step = strtol(name + lp, &end, 10);
        if (strcmp(end, "_final.json") == 0 && step > best) {
            best = step;
            free(s->eval_path);
            s->eval_path = str_printf("%s/%s", s->dir, name);
        }
    }
    closedir(d);
    int rc = 0;
    if (best < 0) {
        fprintf(stderr, "caprl %s: error: %s/%s0_final.json: missing (the result of `caprl eval prism --tag %s`)\n",
                CMD, s->dir, prefix, s->tag);
        rc = EXIT_DATA;
    }
    free(prefix);
    return rc;
}

/* ["BoN: <b> Mean: <m>"] */
static int parse_eval(side *s) {
    json_t *v = NULL;
    int     rc = read_json(s->eval_path, "the result of `caprl eval prism`", &v);
    if (rc) {
        return rc;
    }
    const char *t = json_is_array(v) && json_array_size(v) == 1 ? json_string_value(json_array_get(v, 0)) : NULL;
    char       *end = NULL;
    bool        ok = t && strncmp(t, "BoN: ", 5) == 0;
    if (ok) {
        s->bon = strtod(t + 5, &end);
        ok = end != t + 5 && strncmp(end, " Mean: ", 7) == 0;
    }
    if (ok) {
        const char *m = end + 7;
        s->mean = strtod(m, &end);
        ok = end != m && *end == '\0' && isfinite(s->bon) && isfinite(s->mean);
    }
    json_decref(v);
    return ok ? 0 : data_error(s->eval_path, 0, "expected [\"BoN: <number> Mean: <number>\"]");
}

typedef struct caps_ctx {
    side        *s;
    const world *w;
    tool_keyset  seen;
} caps_ctx;

static int caps_record(json_t *rec, const char *path, long line, void *ud) {
    caps_ctx   *c = ud;
    side       *s = c->s;
    const char *image = json_string_value(json_object_get(rec, "image"));
    json_t     *caps = json_object_get(rec, "captions"), *toks = json_object_get(rec, "tokens");
    if (!image) {
        return data_error(path, line, "no string \"image\"");
    }
    if (tool_keyset_has(&c->seen, image)) {
        return 0; /* shards overlap only through an interrupted run; the first record is the one eval prism used */
    }
    tool_keyset_add(&c->seen, image);
    if (json_object_get(rec, "error")) {
        s->errors++;
        return 0;
    }
    if (!json_is_array(caps)) {
        return data_error(path, line, "expected \"captions\" (an array of strings) or \"error\"");
    }
    json_t *scene = scene_of(c->w, image);
    if (!scene) {
        return data_error(path, line, "image %s is not in %s/scenes.jsonl (a captions file of another world?)",
                          image, c->w->dir);
    }
    for (size_t k = 0; k < json_array_size(caps); k++) {
        const char *t = json_string_value(json_array_get(caps, k));
        if (!t) {
            return data_error(path, line, "captions[%zu] is not a string", k);
        }
        s->captions++;
        s->words += word_count(t);
        count_mentions(c->w, t, scene, &s->m);
        json_t *tk = json_array_get(toks, k);
        if (json_is_integer(tk)) {
            s->tokens += json_integer_value(tk);
            s->n_tokens++;
        }
    }
    s->images++;
    json_array_append(s->caps, rec);
    return 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* captions_{tag}.jsonl and its shards captions_{tag}.shard-i-of-k.jsonl, in name order. */
static int read_captions(side *s, const world *w) {
    DIR *d = opendir(s->dir);
    if (!d) {
        return data_error(s->dir, 0, "cannot open: %s", strerror(errno));
    }
    char  *whole = str_printf("captions_%s.jsonl", s->tag), *shard = str_printf("captions_%s.shard-", s->tag);
    char **names = NULL;
    size_t n = 0, ls = strlen(shard);
    for (struct dirent *e; (e = readdir(d));) {
        size_t l = strlen(e->d_name);
        if (strcmp(e->d_name, whole) == 0 ||
            (strncmp(e->d_name, shard, ls) == 0 && l > ls + 6 && strcmp(e->d_name + l - 6, ".jsonl") == 0)) {
            names = tool_xrealloc(names, (n + 1) * sizeof *names);
            names[n++] = str_printf("%s/%s", s->dir, e->d_name);
        }
    }
    closedir(d);
    int rc = 0;
    if (n == 0) {
        fprintf(stderr, "caprl %s: error: %s/%s: missing (stage 1 of `caprl eval prism --tag %s`)\n", CMD, s->dir,
                whole, s->tag);
        rc = EXIT_DATA;
    }
    if (n > 1) {
        qsort(names, n, sizeof *names, cmp_str);
    }
    caps_ctx c = {s, w, {0}};
    s->caps = json_array();
    for (size_t i = 0; i < n && rc == 0; i++) {
        rc = read_jsonl(names[i], "stage 1 of `caprl eval prism`", caps_record, &c);
    }
    for (size_t i = 0; i < n; i++) {
        free(names[i]);
    }
    free(names);
    free(whole);
    free(shard);
    tool_keyset_free(&c.seen);
    return rc;
}

static int side_load(side *s, const char *run, const char *sub, const world *w) {
    s->dir = str_printf("%s/%s", run, sub);
    s->present = is_dir(s->dir);
    if (!s->present) {
        fprintf(stderr, "caprl %s: note: %s is absent: no Prism figures %s training\n", CMD, s->dir, s->name);
        return 0;
    }
    int rc = find_eval_file(s);
    rc = rc ? rc : parse_eval(s);
    return rc ? rc : read_captions(s, w);
}

static void side_free(side *s) {
    free(s->dir);
    free(s->eval_path);
    json_decref(s->caps);
}

/* The first caption of an image, or NULL. */
static const char *first_caption(const side *s, const char *image) {
    size_t  i;
    json_t *r;
    json_array_foreach(s->caps, i, r) {
        if (strcmp(json_string_value(json_object_get(r, "image")), image) == 0) {
            return json_string_value(json_array_get(json_object_get(r, "captions"), 0));
        }
    }
    return NULL;
}

/* ---- training metrics --------------------------------------------------------------------------------------- */

typedef struct step_rec {
    int64_t step;
    double  reward, len;
} step_rec;

typedef struct train {
    char     *path;
    step_rec *steps;
    size_t    n, cap;
    size_t    window;                 /* steps averaged at each end: max(1, n / 10) */
    double    reward_start, reward_end; /* means of reward_mean over the first / last window */
    double    len_start, len_end;     /* the same for caption_len_mean (tokens) */
} train;

static int metrics_record(json_t *rec, const char *path, long line, void *ud) {
    train  *t = ud;
    json_t *st = json_object_get(rec, "step"), *r = json_object_get(rec, "reward_mean"),
           *l = json_object_get(rec, "caption_len_mean");
    const char *bad = !json_is_integer(st) ? "step" : !json_is_number(r) ? "reward_mean"
                                                   : !json_is_number(l)  ? "caption_len_mean"
                                                                         : NULL;
    if (bad) {
        return data_error(path, line, "\"%s\": expected a number (docs/train.md, RUN/metrics.jsonl)", bad);
    }
    int64_t step = json_integer_value(st);
    /* a step written again (a run resumed from an older checkpoint) replaces it and everything after it */
    while (t->n > 0 && t->steps[t->n - 1].step >= step) {
        t->n--;
    }
    if (t->n == t->cap) {
        t->cap = 2 * t->cap + 64;
        t->steps = tool_xrealloc(t->steps, t->cap * sizeof *t->steps);
    }
    t->steps[t->n++] = (step_rec){step, json_number_value(r), json_number_value(l)};
    return 0;
}

static int train_load(train *t, const char *run) {
    t->path = str_printf("%s/train/metrics.jsonl", run);
    int rc = read_jsonl(t->path, "the metrics of `caprl train --out RUN/train`", metrics_record, t);
    if (rc == 0 && t->n == 0) {
        rc = data_error(t->path, 0, "no training step recorded");
    }
    if (rc) {
        return rc;
    }
    t->window = t->n / 10 > 1 ? t->n / 10 : 1;
    double r0 = 0, r1 = 0, l0 = 0, l1 = 0;
    for (size_t i = 0; i < t->window; i++) {
        r0 += t->steps[i].reward;
        l0 += t->steps[i].len;
        r1 += t->steps[t->n - t->window + i].reward;
        l1 += t->steps[t->n - t->window + i].len;
    }
    t->reward_start = r0 / (double)t->window;
    t->reward_end = r1 / (double)t->window;
    t->len_start = l0 / (double)t->window;
    t->len_end = l1 / (double)t->window;
    return 0;
}

/* ---- the QA filter ------------------------------------------------------------------------------------------ */

typedef struct filter {
    bool    present;
    int64_t leaky, leaky_removed, valid, valid_kept;
} filter;

/* Key of a question of an image record: id, a unit separator, the question string. */
static char *question_key(const char *id, const char *q) {
    return str_printf("%s\x1f%s", id, q);
}

static const char *record_id(json_t *rec) {
    json_t *id = json_object_get(rec, "id");
    return json_is_string(id) ? json_string_value(id) : json_string_value(json_object_get(rec, "image"));
}

static int kept_record(json_t *rec, const char *path, long line, void *ud) {
    const char *id = record_id(rec);
    json_t     *qa = json_object_get(rec, "qa");
    if (!id || !json_is_array(qa)) {
        return data_error(path, line, "expected a QA record {\"id\", \"image\", \"qa\": [...]}");
    }
    for (size_t i = 0; i < json_array_size(qa); i++) {
        const char *q = json_string_value(json_object_get(json_array_get(qa, i), "question"));
        if (!q) {
            return data_error(path, line, "qa[%zu]: no string \"question\"", i);
        }
        char *k = question_key(id, q);
        tool_keyset_add(ud, k);
        free(k);
    }
    return 0;
}

typedef struct filter_ctx {
    filter     *f;
    tool_keyset kept;  /* questions of filtered.jsonl */
    tool_keyset leaky; /* "id\x1f<index>" of leaky_ids.json */
    tool_keyset found; /* leaky entries met in train.jsonl */
    tool_keyset input; /* record ids the filter was given (its report's decisions); empty: all of train.jsonl */
} filter_ctx;

static int train_qa_record(json_t *rec, const char *path, long line, void *ud) {
    filter_ctx *c = ud;
    const char *id = record_id(rec);
    json_t     *qa = json_object_get(rec, "qa");
    if (!id || !json_is_array(qa)) {
        return data_error(path, line, "expected a QA record {\"id\", \"image\", \"qa\": [...]}");
    }
    if (c->input.n > 0 && !tool_keyset_has(&c->input, id)) {
        return 0; /* not given to the filter */
    }
    if (c->input.n > 0 && !tool_keyset_has(&c->input, id)) {
        return 0; /* not given to the filter */
    }
    for (size_t i = 0; i < json_array_size(qa); i++) {
        const char *q = json_string_value(json_object_get(json_array_get(qa, i), "question"));
        if (!q) {
            return data_error(path, line, "qa[%zu]: no string \"question\"", i);
        }
        char *lk = str_printf("%s\x1f%zu", id, i), *qk = question_key(id, q);
        bool  leaky = tool_keyset_has(&c->leaky, lk), kept = tool_keyset_has(&c->kept, qk);
        if (leaky) {
            tool_keyset_add(&c->found, lk);
            c->f->leaky++;
            c->f->leaky_removed += !kept;
        } else {
            c->f->valid++;
            c->f->valid_kept += kept;
        }
        free(lk);
        free(qk);
    }
    return 0;
}

static int filter_load(filter *f, const char *run, const world *w) {
    char *dir = str_printf("%s/filter", run);
    f->present = is_dir(dir);
    if (!f->present) {
        fprintf(stderr, "caprl %s: note: %s is absent: no filter figures\n", CMD, dir);
        free(dir);
        return 0;
    }
    char      *kept_path = str_printf("%s/filtered.jsonl", dir), *leaky_path = str_printf("%s/leaky_ids.json", w->dir),
         *train_path = str_printf("%s/train.jsonl", w->dir);
    filter_ctx c = {f, {0}, {0}, {0}, {0}};
    json_t    *leaky = NULL, *freport = NULL;
    int        rc = read_jsonl(kept_path, "the output of `caprl qa filter`", kept_record, &c.kept);
    /* the filter may have been run on part of the training questions: its --report lists what it was given */
    char *report_path = str_printf("%s/report.json", dir);
    if (rc == 0 && access(report_path, F_OK) == 0) {
        rc = read_json(report_path, "the report of `caprl qa filter`", &freport);
        json_t *dec = json_object_get(freport, "decisions");
        for (size_t i = 0; rc == 0 && i < json_array_size(dec); i++) {
            const char *id = json_string_value(json_object_get(json_array_get(dec, i), "id"));
            if (id) {
                tool_keyset_add(&c.input, id);
            }
        }
    }
    json_decref(freport);
    free(report_path);
    rc = rc ? rc : read_json(leaky_path, "the planted leaky questions of `caprl synth`", &leaky);
    json_t *list = json_object_get(leaky, "leaky");
    if (rc == 0 && !json_is_array(list)) {
        rc = data_error(leaky_path, 0, "expected {\"leaky\": [{\"id\", \"index\", ...}, ...]}");
    }
    for (size_t i = 0; rc == 0 && i < json_array_size(list); i++) {
        json_t     *e = json_array_get(list, i), *idx = json_object_get(e, "index");
        const char *id = json_string_value(json_object_get(e, "id"));
        if (!id || !json_is_integer(idx) || json_integer_value(idx) < 0) {
            rc = data_error(leaky_path, 0, "leaky[%zu]: expected {\"id\": string, \"index\": integer >= 0}", i);
            break;
        }
        if (c.input.n > 0 && !tool_keyset_has(&c.input, id)) {
            continue;
        }
        char *k = str_printf("%s\x1f%lld", id, (long long)json_integer_value(idx));
        tool_keyset_add(&c.leaky, k);
        free(k);
    }
    rc = rc ? rc : read_jsonl(train_path, "the training questions of `caprl synth`", train_qa_record, &c);
    if (rc == 0 && c.found.n != c.leaky.n) {
        rc = data_error(leaky_path, 0, "%zu of its %zu questions are not in %s", c.leaky.n - c.found.n, c.leaky.n,
                        train_path);
    }
    json_decref(leaky);
    tool_keyset_free(&c.kept);
    tool_keyset_free(&c.leaky);
    tool_keyset_free(&c.found);
    tool_keyset_free(&c.input);
    free(kept_path);
    free(leaky_path);
    free(train_path);
    free(dir);
    return rc;
}

/* ---- figures ------------------------------------------------------------------------------------------------ */

static double ratio(int64_t a, int64_t b) {
    return b > 0 ? (double)a / (double)b : NA;
}

/* The per-side figures, NA where absent or undefined. */
typedef struct figures {
    double mean, bon, words, tokens, mentioned, precision, exact, recall;
} figures;

static figures side_figures(const side *s) {
    figures f = {NA, NA, NA, NA, NA, NA, NA, NA};
    if (s->present) {
        f.mean = s->mean;
        f.bon = s->bon;
        f.words = ratio(s->words, s->captions);
        f.tokens = ratio(s->tokens, s->n_tokens);
        f.mentioned = ratio(s->m.mentioned, s->captions);
        f.precision = ratio(s->m.correct, s->m.mentioned);
        f.exact = ratio(s->m.exact, s->m.mentioned);
        f.recall = ratio(s->m.covered, s->m.objects);
    }
    return f;
}

static void set_num(json_t *o, const char *key, double v) {
    json_object_set_new(o, key, isfinite(v) ? json_real(v) : json_null());
}

static void set_int(json_t *o, const char *key, bool present, int64_t v) {
    json_object_set_new(o, key, present ? json_integer(v) : json_null());
}

typedef struct report {
    const char *run;
    world       w;
    train       t;
    side        before, after;
    filter      f;
} report;

static json_t *summary_json(const report *r) {
    figures b = side_figures(&r->before), a = side_figures(&r->after);
    json_t *o = json_object();
    char   *abs_run = tool_absolute(r->run);
    json_object_set_new(o, "run", json_string(abs_run));
    free(abs_run);
    json_object_set_new(o, "train_steps", json_integer((json_int_t)r->t.n));
    json_object_set_new(o, "reward_window", json_integer((json_int_t)r->t.window));
    set_num(o, "reward_start", r->t.reward_start);
    set_num(o, "reward_end", r->t.reward_end);
    set_num(o, "reward_rise", r->t.reward_end - r->t.reward_start);
    set_num(o, "train_caption_tokens_start", r->t.len_start);
    set_num(o, "train_caption_tokens_end", r->t.len_end);
    const side    *sides[2] = {&r->before, &r->after};
    const figures *fs[2] = {&b, &a};
    for (int k = 0; k < 2; k++) {
        const side *s = sides[k];
        const char *n = s->name;
        char        key[64];
#define KEY(fmt) (snprintf(key, sizeof key, fmt, n), key)
        json_object_set_new(o, KEY("prism_%s"), json_boolean(s->present));
        set_int(o, KEY("prism_images_%s"), s->present, s->images);
        set_int(o, KEY("prism_image_errors_%s"), s->present, s->errors);
        set_num(o, KEY("prism_mean_%s"), fs[k]->mean);
        set_num(o, KEY("prism_bon_%s"), fs[k]->bon);
        set_int(o, KEY("captions_%s"), s->present, s->captions);
        set_num(o, KEY("caption_words_%s"), fs[k]->words);
        set_num(o, KEY("caption_tokens_%s"), fs[k]->tokens);
        set_num(o, KEY("objects_mentioned_%s"), fs[k]->mentioned);
        set_num(o, KEY("objects_precision_%s"), fs[k]->precision);
        set_num(o, KEY("objects_exact_%s"), fs[k]->exact);
        set_num(o, KEY("objects_recall_%s"), fs[k]->recall);
#undef KEY
    }
    set_num(o, "prism_mean_gain_points", 100.0 * (a.mean - b.mean));
    set_num(o, "prism_bon_gain_points", 100.0 * (a.bon - b.bon));
    json_object_set_new(o, "filter", json_boolean(r->f.present));
    set_int(o, "filter_leaky", r->f.present, r->f.leaky);
    set_int(o, "filter_leaky_removed", r->f.present, r->f.leaky_removed);
    set_num(o, "filter_leaky_removed_frac", r->f.present ? ratio(r->f.leaky_removed, r->f.leaky) : NA);
    set_int(o, "filter_valid", r->f.present, r->f.valid);
    set_int(o, "filter_valid_kept", r->f.present, r->f.valid_kept);
    set_num(o, "filter_valid_kept_frac", r->f.present ? ratio(r->f.valid_kept, r->f.valid) : NA);
    return o;
}

/* ---- the table ---------------------------------------------------------------------------------------------- */

enum { COLS = 4, ROWS_MAX = 16 };

typedef struct table {
    char  *cell[ROWS_MAX][COLS];
    size_t n;
} table;

typedef enum fmt_kind { F_PERCENT, F_FIXED3, F_FIXED2, F_FIXED1 } fmt_kind;

static char *fmt_value(double v, fmt_kind k) {
    if (!isfinite(v)) {
        return str_printf("absent");
    }
    switch (k) {
        case F_PERCENT: return str_printf("%.1f%%", 100.0 * v);
        case F_FIXED3: return str_printf("%.3f", v);
        case F_FIXED2: return str_printf("%.2f", v);
        default: return str_printf("%.1f", v);
    }
}

static char *fmt_change(double b, double a, fmt_kind k) {
    if (!isfinite(a) || !isfinite(b)) {
        return str_printf("-");
    }
    switch (k) {
        case F_PERCENT: return str_printf("%+.1f pts", 100.0 * (a - b));
        case F_FIXED3: return str_printf("%+.3f", a - b);
        case F_FIXED2: return str_printf("%+.2f", a - b);
        default: return str_printf("%+.1f", a - b);
    }
}

static void table_row(table *t, char *label, double b, double a, fmt_kind k) {
    t->cell[t->n][0] = label;
    t->cell[t->n][1] = fmt_value(b, k);
    t->cell[t->n][2] = fmt_value(a, k);
    t->cell[t->n][3] = fmt_change(b, a, k);
    t->n++;
}

static void table_build(const report *r, table *t) {
    figures b = side_figures(&r->before), a = side_figures(&r->after);
    int64_t imgs = r->after.present ? r->after.images : r->before.images;
    t->cell[0][0] = str_printf(" ");
    t->cell[0][1] = str_printf("SFT (before)");
    t->cell[0][2] = str_printf("GRPO (after)");
    t->cell[0][3] = str_printf("change");
    t->n = 1;
    table_row(t, str_printf("Training reward (first / last %zu of %zu steps)", r->t.window, r->t.n),
              r->t.reward_start, r->t.reward_end, F_FIXED3);
    table_row(t, str_printf("Prism Mean accuracy, held-out (%lld images)", (long long)imgs), b.mean, a.mean,
              F_PERCENT);
    table_row(t, str_printf("Prism BoN accuracy, held-out"), b.bon, a.bon, F_PERCENT);
    table_row(t, str_printf("Caption length, words"), b.words, a.words, F_FIXED1);
    table_row(t, str_printf("Caption length, tokens"), b.tokens, a.tokens, F_FIXED1);
    table_row(t, str_printf("Objects mentioned per caption"), b.mentioned, a.mentioned, F_FIXED2);
    table_row(t, str_printf("Mentioned objects that are in the image"), b.precision, a.precision, F_PERCENT);
    table_row(t, str_printf("... with the right position"), b.exact, a.exact, F_PERCENT);
    table_row(t, str_printf("Objects of the image mentioned"), b.recall, a.recall, F_PERCENT);
}

static void table_free(table *t) {
    for (size_t i = 0; i < t->n; i++) {
        for (int c = 0; c < COLS; c++) {
            free(t->cell[i][c]);
        }
    }
}

static char *filter_line(const filter *f, bool leaky) {
    if (!f->present) {
        return str_printf("absent");
    }
    int64_t a = leaky ? f->leaky_removed : f->valid_kept, b = leaky ? f->leaky : f->valid;
    double  x = ratio(a, b);
    return isfinite(x) ? str_printf("%lld / %lld (%.1f%%)", (long long)a, (long long)b, 100.0 * x)
                       : str_printf("%lld / %lld", (long long)a, (long long)b);
}

static void print_table(const report *r, const table *t) {
    size_t w[COLS] = {0};
    for (size_t i = 0; i < t->n; i++) {
        for (int c = 0; c < COLS; c++) {
            size_t l = strlen(t->cell[i][c]);
            w[c] = l > w[c] ? l : w[c];
        }
    }
    for (size_t i = 0; i < t->n; i++) {
        printf("%-*s", (int)w[0], t->cell[i][0]);
        for (int c = 1; c < COLS; c++) {
            printf("  %*s", (int)w[c], t->cell[i][c]);
        }
        putchar('\n');
    }
    char *lk = filter_line(&r->f, true), *vk = filter_line(&r->f, false);
    printf("\nQA filter: planted leaky questions removed  %s\n", lk);
    printf("QA filter: valid questions kept            %s\n", vk);
    free(lk);
    free(vk);
}

/* ---- the page ----------------------------------------------------------------------------------------------- */

/* A round tick spacing (1, 2 or 5 times a power of ten) giving about `target` intervals over range. */
static double nice_step(double range, int target) {
    double raw = range / target;
    double mag = pow(10.0, floor(log10(raw)));
    double f = raw / mag;
    return (f < 1.5 ? 1.0 : f < 3.0 ? 2.0 : f < 7.0 ? 5.0 : 10.0) * mag;
}

static int step_decimals(double step) {
    int d = (int)-floor(log10(step) + 1e-9);
    return d > 0 ? d : 0;
}

/* A line chart of y over the training steps: axes with ticks and labels, one polyline. */
static void svg_chart(sbuf *b, const char *title, const char *ylabel, const train *t, bool reward,
                      const char *color) {
    const double W = 560, H = 320, L = 64, R = 16, T = 34, B = 50;
    double       x0 = (double)t->steps[0].step, x1 = (double)t->steps[t->n - 1].step;
    double       y0 = (double)INFINITY, y1 = -(double)INFINITY;
    for (size_t i = 0; i < t->n; i++) {
        double y = reward ? t->steps[i].reward : t->steps[i].len;
        y0 = y < y0 ? y : y0;
        y1 = y > y1 ? y : y1;
    }
    if (x1 <= x0) {
        x0 -= 1;
        x1 += 1;
    }
    if (y1 - y0 < 1e-9 * (fabs(y0) + 1)) {
        double pad = fabs(y0) > 0 ? 0.1 * fabs(y0) : 0.5;
        y0 -= pad;
        y1 += pad;
    }
    double ys = nice_step(y1 - y0, 5), xs = nice_step(x1 - x0, 6);
    xs = xs < 1 ? 1 : xs;
    y0 = floor(y0 / ys + 1e-9) * ys;
    y1 = ceil(y1 / ys - 1e-9) * ys;
    double pw = W - L - R, ph = H - T - B;
#define PX(x) (L + ((x) - x0) / (x1 - x0) * pw)
#define PY(y) (T + ph - ((y) - y0) / (y1 - y0) * ph)
    sb_printf(b,
              "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
              "font-family=\"sans-serif\" role=\"img\" aria-label=\"",
              W, H, W, H);
    sb_html(b, title);
    sb_puts(b, "\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n");
    sb_printf(b, "<text x=\"%.0f\" y=\"20\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">", W / 2);
    sb_html(b, title);
    sb_puts(b, "</text>\n<g font-size=\"11\" fill=\"#333\">\n");
    int yd = step_decimals(ys);
    for (double y = y0; y <= y1 + ys * 1e-6; y += ys) {
        double py = PY(y);
        sb_printf(b,
                  "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#e3e3e3\"/>"
                  "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>"
                  "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%.*f</text>\n",
                  L, py, W - R, py, L - 5, py, L, py, L - 8, py + 4, yd, fabs(y) < ys * 1e-6 ? 0.0 : y);
    }
    double xt = ceil(x0 / xs - 1e-9) * xs;
    for (double x = xt; x <= x1 + xs * 1e-6; x += xs) {
        double px = PX(x);
        sb_printf(b,
                  "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\"/>"
                  "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%.0f</text>\n",
                  px, T + ph, px, T + ph + 5, px, T + ph + 18, x);
    }
    sb_puts(b, "</g>\n");
    sb_printf(b, "<path d=\"M%.1f %.1fV%.1fH%.1f\" fill=\"none\" stroke=\"#333\"/>\n", L, T, T + ph, W - R);
    sb_printf(b, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"12\">training step</text>\n",
              L + pw / 2, H - 10);
    sb_printf(b, "<text transform=\"translate(16 %.1f) rotate(-90)\" text-anchor=\"middle\" font-size=\"12\">",
              T + ph / 2);
    sb_html(b, ylabel);
    sb_printf(b, "</text>\n<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", color);
    for (size_t i = 0; i < t->n; i++) {
        double y = reward ? t->steps[i].reward : t->steps[i].len;
        sb_printf(b, "%s%.1f,%.1f", i ? " " : "", PX((double)t->steps[i].step), PY(y));
    }
    sb_puts(b, "\"/>\n");
    if (t->n == 1) { /* a lone point draws no line */
        sb_printf(b, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%s\"/>\n", PX((double)t->steps[0].step),
                  PY(reward ? t->steps[0].reward : t->steps[0].len), color);
    }
#undef PX
#undef PY
    sb_puts(b, "</svg>\n");
}

/* One example: the image scaled up, its ground truth, and the first caption of each side. */
static int html_example(sbuf *b, const report *r, json_t *scene) {
    const char *image = json_string_value(json_object_get(scene, "image"));
    const char *id = json_string_value(json_object_get(scene, "id"));
    char       *path = str_printf("%s/%s", r->w.dir, image);
    char       *png = NULL;
    size_t      len = 0;
    int         rc = need_file(path, "an image of `caprl synth`");
    rc = rc ? rc : tool_read_file(CMD, path, IMAGE_MAX, &png, &len);
    free(path);
    if (rc) {
        return rc;
    }
    sb_puts(b, "<div class=\"example\">\n<img class=\"scene\" alt=\"");
    sb_html(b, image);
    sb_puts(b, "\" src=\"data:image/png;base64,");
    sb_base64(b, (const unsigned char *)png, len);
    free(png);
    sb_puts(b, "\">\n<div class=\"text\">\n<h3>");
    sb_html(b, id ? id : image);
    json_t *objs = json_object_get(scene, "objects");
    sb_printf(b, "</h3>\n<p class=\"gt\"><b>Ground truth</b> (%zu object%s):</p>\n<ul>\n", json_array_size(objs),
              json_array_size(objs) == 1 ? "" : "s");
    size_t  i;
    json_t *o;
    json_array_foreach(objs, i, o) {
        sb_puts(b, "<li>");
        sb_html(b, json_string_value(json_object_get(o, "size")));
        sb_puts(b, " ");
        sb_html(b, json_string_value(json_object_get(o, "color")));
        sb_puts(b, " ");
        sb_html(b, json_string_value(json_object_get(o, "shape")));
        sb_puts(b, " at the ");
        sb_html(b, json_string_value(json_object_get(o, "position")));
        sb_puts(b, "</li>\n");
    }
    sb_puts(b, "</ul>\n");
    const side *sides[2] = {&r->before, &r->after};
    const char *names[2] = {"SFT caption", "GRPO caption"};
    for (int k = 0; k < 2; k++) {
        const char *cap = sides[k]->present ? first_caption(sides[k], image) : NULL;
        sb_printf(b, "<p><b>%s</b>", names[k]);
        if (cap) {
            mentions m = {0};
            count_mentions(&r->w, cap, scene, &m);
            int64_t nw = word_count(cap);
            sb_printf(b, " (%lld word%s; %lld object%s mentioned, %lld in the image):</p>\n<blockquote>",
                      (long long)nw, nw == 1 ? "" : "s", (long long)m.mentioned, m.mentioned == 1 ? "" : "s",
                      (long long)m.correct);
            sb_html(b, cap);
            sb_puts(b, "</blockquote>\n");
        } else {
            sb_puts(b, ": <i>absent</i></p>\n");
        }
    }
    sb_puts(b, "</div>\n</div>\n");
    return 0;
}

static const char k_css[] =
    "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1180px;margin:24px auto;"
    "padding:0 16px;color:#222}\n"
    "h1{margin-bottom:4px}.sub{color:#666;margin-top:0}\n"
    "table{border-collapse:collapse;margin:12px 0}th,td{padding:5px 12px;border-bottom:1px solid #ddd}"
    "td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}\n"
    ".charts{display:flex;flex-wrap:wrap;gap:16px}.charts svg{border:1px solid #ddd}\n"
    ".example{display:flex;gap:20px;align-items:flex-start;margin:18px 0;padding:12px;border:1px solid #ddd}\n"
    "img.scene{width:252px;height:252px;image-rendering:pixelated;image-rendering:crisp-edges;flex:none;"
    "border:1px solid #999}\n"
    ".text h3{margin:0 0 6px}.text ul{margin:4px 0 8px;columns:2}"
    "blockquote{margin:4px 0 10px;padding:6px 10px;background:#f7f7f7;border-left:3px solid #bbb}\n";

static void html_table(sbuf *b, const table *t) {
    sb_puts(b, "<table>\n<tr>");
    for (int c = 0; c < COLS; c++) {
        sb_puts(b, c ? "<th class=\"num\">" : "<th>");
        sb_html(b, c ? t->cell[0][c] : "");
        sb_puts(b, "</th>");
    }
    sb_puts(b, "</tr>\n");
    for (size_t i = 1; i < t->n; i++) {
        sb_puts(b, "<tr>");
        for (int c = 0; c < COLS; c++) {
            sb_puts(b, c ? "<td class=\"num\">" : "<td>");
            sb_html(b, t->cell[i][c]);
            sb_puts(b, "</td>");
        }
        sb_puts(b, "</tr>\n");
    }
    sb_puts(b, "</table>\n");
}

static int html_page(sbuf *b, const report *r, const table *t, int32_t n_examples) {
    sb_puts(b, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
               "<title>CapRL demo report</title>\n<style>\n");
    sb_puts(b, k_css);
    sb_puts(b, "</style>\n</head>\n<body>\n<h1>CapRL demo: before and after GRPO with the QA reward</h1>\n"
               "<p class=\"sub\">Run ");
    char *abs_run = tool_absolute(r->run);
    sb_html(b, abs_run);
    free(abs_run);
    sb_puts(b, ". Before: the SFT captioner; after: the same captioner trained with GRPO and the CapRL reward (a "
               "text-only reader answers each image's questions from the caption). Prism figures are on held-out "
               "images; object figures count the phrases &ldquo;&lt;size&gt; &lt;colour&gt; &lt;shape&gt;&rdquo; "
               "of the captions against the scenes' ground truth.</p>\n<h2>Before and after</h2>\n");
    html_table(b, t);
    sb_puts(b, "<h2>Training</h2>\n<div class=\"charts\">\n");
    svg_chart(b, "Training reward", "reward (mean over the step's captions)", &r->t, true, "#1f77b4");
    svg_chart(b, "Caption length", "caption tokens (mean)", &r->t, false, "#d62728");
    sb_puts(b, "</div>\n<h2>Examples (held-out images)</h2>\n");
    /* the first held-out images captioned on every side present; any held-out images when none is */
    int32_t shown = 0;
    for (int pass = 0; pass < 2 && shown == 0; pass++) {
        size_t  i;
        json_t *s;
        json_array_foreach(r->w.scenes, i, s) {
            const char *split = json_string_value(json_object_get(s, "split"));
            const char *image = json_string_value(json_object_get(s, "image"));
            bool        ok = shown < n_examples && split && strcmp(split, "test") == 0;
            if (ok && pass == 0) {
                ok = (!r->before.present || first_caption(&r->before, image)) &&
                     (!r->after.present || first_caption(&r->after, image));
            }
            if (ok) {
                int rc = html_example(b, r, s);
                if (rc) {
                    return rc;
                }
                shown++;
            }
        }
    }
    if (shown == 0) {
        sb_puts(b, "<p><i>No held-out image in the world.</i></p>\n");
    }
    sb_puts(b, "<h2>QA curation filter</h2>\n");
    if (r->f.present) {
        char *lk = filter_line(&r->f, true), *vk = filter_line(&r->f, false);
        sb_puts(b, "<table>\n<tr><td>Planted leaky questions removed</td><td class=\"num\">");
        sb_html(b, lk);
        sb_puts(b, "</td></tr>\n<tr><td>Valid questions kept</td><td class=\"num\">");
        sb_html(b, vk);
        sb_puts(b, "</td></tr>\n</table>\n");
        free(lk);
        free(vk);
    } else {
        sb_puts(b, "<p><i>absent (no filter directory in the run)</i></p>\n");
    }
    sb_puts(b, "</body>\n</html>\n");
    return 0;
}

/* ---- the command -------------------------------------------------------------------------------------------- */

int cmd_report(int argc, char **argv) {
    static const cmd_info info = {
        CMD,
        "caprl report --run RUN [--out RUN/report.html] [--summary RUN/summary.json] [--before-tag sft]\n"
        "             [--after-tag grpo] [--examples 2]",
        "Turn a finished `make demo` run into RUN/report.html (table, reward and caption-length curves, example\n"
        "images with their captions before and after), RUN/summary.json (the same figures, flat keys) and the\n"
        "before/after table on stdout.",
        "Reads RUN/world (caprl synth), RUN/train/metrics.jsonl (caprl train), RUN/prism_before and\n"
        "RUN/prism_after (caprl eval prism: Prism_{tag}_step_eval_{step}_final.json and captions_{tag}.jsonl) and\n"
        "RUN/filter/filtered.jsonl (caprl qa filter); docs/formats.md \"Demo report\" lists the figures. A missing\n"
        "prism or filter directory is reported as absent; a missing file in a present part is an error.\n"
        "Exit codes: 0 ok, 1 usage, 2 a missing or malformed file, or an output that cannot be written."};
    const char *run = NULL, *out = NULL, *summary = NULL, *before_tag = "sft", *after_tag = "grpo";
    int32_t     n_examples = 2;
    opt_spec    specs[] = {
        {"run", OPT_STRING, &run, "the demo's run directory", 0, 0, "RUN", 0},
        {"out", OPT_STRING, &out, "the HTML report (default RUN/report.html)", 0, 0, "FILE", 0},
        {"summary", OPT_STRING, &summary, "the figures as JSON (default RUN/summary.json)", 0, 0, "FILE", 0},
        {"before-tag", OPT_STRING, &before_tag, "eval prism tag in RUN/prism_before", 0, 0, "T", 0},
        {"after-tag", OPT_STRING, &after_tag, "eval prism tag in RUN/prism_after", 0, 0, "T", 0},
        {"examples", OPT_INT, &n_examples, "example images in the report", 0, EXAMPLES_MAX, "N", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!run) {
        return tool_usage_error(CMD, "--run is required");
    }
    if (!is_dir(run)) {
        fprintf(stderr, "caprl %s: error: %s: not a directory (the run directory of `make demo`)\n", CMD, run);
        return EXIT_DATA;
    }
    report r = {.run = run};
    r.before = (side){.name = "before", .tag = before_tag};
    r.after = (side){.name = "after", .tag = after_tag};
    char *out_path = out ? str_printf("%s", out) : str_printf("%s/report.html", run);
    char *sum_path = summary ? str_printf("%s", summary) : str_printf("%s/summary.json", run);
    rc = world_load(&r.w, run);
    rc = rc ? rc : train_load(&r.t, run);
    rc = rc ? rc : side_load(&r.before, run, "prism_before", &r.w);
    rc = rc ? rc : side_load(&r.after, run, "prism_after", &r.w);
    rc = rc ? rc : filter_load(&r.f, run, &r.w);
    table t = {0};
    sbuf  page = {0};
    if (rc == 0) {
        table_build(&r, &t);
        rc = html_page(&page, &r, &t, n_examples);
    }
    if (rc == 0) {
        json_t *s = summary_json(&r);
        char   *text = json_dumps(s, JSON_INDENT(2) | JSON_REAL_PRECISION(10));
        json_decref(s);
        sbuf js = {0};
        sb_puts(&js, text);
        sb_puts(&js, "\n");
        free(text);
        rc = tool_write_file_atomic(CMD, sum_path, js.p, js.n);
        free(js.p);
    }
    rc = rc ? rc : tool_write_file_atomic(CMD, out_path, page.p, page.n);
    if (rc == 0) {
        print_table(&r, &t);
        fflush(stdout);
        fprintf(stderr, "caprl %s: wrote %s and %s\n", CMD, out_path, sum_path);
    }
    free(page.p);
    table_free(&t);
    world_free(&r.w);
    free(r.t.path);
    free(r.t.steps);
    side_free(&r.before);
    side_free(&r.after);
    free(out_path);
    free(sum_path);
    return rc;
}
