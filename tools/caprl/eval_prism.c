/* caprl eval prism: the Prism evaluation as released in Eval_CapRL.py (spec/caprl.md §9.2). Stage 1 captions every
 * benchmark image n times with the captioner; stage 2 has a text reader answer each question from each caption;
 * the answers are scored by the benchmark's rule and aggregated into BoN and Mean. Both stages append to resumable
 * JSON Lines in --out, shard by image, and the result files are written once every item is answered. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/eval.h"
#include "caprl/image.h"
#include "caprl/model.h"
#include "caprl/tokenizer.h"
#include "caprl/vision.h"
#include "caprl/vlm.h"
#include "common.h"
#include "opts.h"
#include "subcommands.h"

#define CMD "eval prism"

/* The released stage-1 request: no system turn, the image, then this text (no final period); rendered it is
 * exactly CAPRL_PRISM_CAPTION_PROMPT, which is checked before any captioning. */
#define CAPTION_TEXT "Please describe this image in detail"

/* One distinct benchmark image (several questions may share one). */
typedef struct image_entry {
    const char *raw;        /* the image path as the benchmark writes it: the captions file's key */
    const char *path;       /* resolved */
    int64_t     min_pixels; /* qwen-vl-utils bounds of its first item (0: defaults) */
    int64_t     max_pixels;
    json_t     *caps;       /* its captions record (held), or NULL */
} image_entry;

typedef struct prism {
    const char      *out_dir, *tag, *bench_path;
    int32_t          n;            /* captions per image */
    long             shard_i, shard_k;
    caprl_eval_bench bench;
    image_entry     *images; /* (n_images) in order of first appearance: image u samples with streams u*n+k */
    int64_t          n_images;
    int64_t         *item_image; /* (n_items) */
    int64_t         *by_raw;     /* (n_images) image indices sorted by raw path, for lookups */
    json_t         **answers;    /* (n_items) answer records (held), or NULL */
} prism;

/* ---- file names -------------------------------------------------------------------------------------------- */

/* "{out}/{kind}_{tag}.jsonl", or "{out}/{kind}_{tag}.shard-{i}-of-{k}.jsonl" for a sharded run. */
static char *stage_file(const prism *p, const char *kind, bool sharded) {
    size_t n = strlen(p->out_dir) + strlen(kind) + strlen(p->tag) + 64;
    char  *s = tool_xmalloc(n);
    if (sharded) {
        snprintf(s, n, "%s/%s_%s.shard-%ld-of-%ld.jsonl", p->out_dir, kind, p->tag, p->shard_i, p->shard_k);
    } else {
        snprintf(s, n, "%s/%s_%s.jsonl", p->out_dir, kind, p->tag);
    }
    return s;
}

/* Whether name is "{kind}_{tag}.jsonl" or "{kind}_{tag}.shard-I-of-K.jsonl" (I, K decimal). */
static bool is_stage_file(const char *name, const char *kind, const char *tag) {
    size_t nk = strlen(kind), nt = strlen(tag);
    if (strncmp(name, kind, nk) != 0 || name[nk] != '_' || strncmp(name + nk + 1, tag, nt) != 0) {
        return false;
    }
    const char *rest = name + nk + 1 + nt;
    if (strcmp(rest, ".jsonl") == 0) {
        return true;
    }
    long i = -1, k = -1;
    int  used = 0;
    return sscanf(rest, ".shard-%ld-of-%ld.jsonl%n", &i, &k, &used) == 2 && used > 0 && rest[used] == '\0' &&
           i >= 0 && k > i;
}

typedef int (*stage_scan_fn)(prism *p, const char *path, int own_fd);

/* Scans every stage file of kind in the output folder: own (the path this run appends to, fd locked) is repaired,
 * the others (other shards' files, possibly being written) are read as they are. */
static int scan_stage_files(prism *p, const char *kind, const char *own, int own_fd, stage_scan_fn fn) {
    int rc = 0;
    if (own) {
        rc = fn(p, own, own_fd);
    }
    DIR *d = opendir(p->out_dir);
    if (!d) {
        fprintf(stderr, "caprl %s: error: %s: cannot open directory: %s\n", CMD, p->out_dir, strerror(errno));
        return EXIT_DATA;
    }
    char         **names = NULL;
    size_t         n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (is_stage_file(e->d_name, kind, p->tag)) {
            names = tool_xrealloc(names, (n + 1) * sizeof *names);
            names[n++] = tool_xstrdup(e->d_name);
        }
    }
    closedir(d);
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(p->out_dir) + strlen(names[i]) + 2;
        char  *path = tool_xmalloc(len);
        snprintf(path, len, "%s/%s", p->out_dir, names[i]);
        const char *own_name = own ? strrchr(own, '/') + 1 : NULL;
        if (rc == 0 && !(own_name && strcmp(own_name, names[i]) == 0)) {
            rc = fn(p, path, -1);
        }
        free(path);
        free(names[i]);
    }
    free(names);
    return rc;
}

/* ---- the run's settings, kept next to its files --------------------------------------------------------------- */

/* OUT/run_{tag}.json records what each stage ran with. A rerun with other settings would mix two experiments in
 * one resumable file, so it is refused; a stage's settings are added when it first runs. */
static int check_settings(const prism *p, const char *stage, json_t *mine) {
    size_t n = strlen(p->out_dir) + strlen(p->tag) + 32;
    char  *path = tool_xmalloc(n);
    snprintf(path, n, "%s/run_%s.json", p->out_dir, p->tag);
    json_error_t jerr;
    json_t      *all = NULL;
    int          rc = 0;
    if (access(path, F_OK) == 0) {
        all = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
        if (!json_is_object(all)) {
            fprintf(stderr, "caprl %s: error: %s: not a caprl eval prism settings file: %s\n", CMD, path,
                    all ? "not an object" : jerr.text);
            rc = EXIT_DATA;
        }
    } else {
        all = json_object();
    }
    json_t *had = rc == 0 ? json_object_get(all, stage) : NULL;
    if (had && !json_equal(had, mine)) {
        const char *key;
        json_t     *v;
        json_object_foreach(mine, key, v) {
            json_t *w = json_object_get(had, key);
            if (!w || !json_equal(v, w)) {
                char *a = json_dumps(v, JSON_ENCODE_ANY), *b = w ? json_dumps(w, JSON_ENCODE_ANY) : NULL;
                fprintf(stderr,
                        "caprl %s: error: %s: %s of tag '%s' ran with %s %s, this run has %s: use another --tag or "
                        "--out, or the same settings to resume\n",
                        CMD, path, stage, p->tag, key, b ? b : "(nothing)", a ? a : "?");
                free(a);
                free(b);
                break;
            }
        }
        rc = EXIT_DATA;
    }
    if (rc == 0 && !had) {
        json_object_set(all, stage, mine);
        char *text = json_dumps(all, JSON_INDENT(2));
        rc = text ? tool_write_file_atomic(CMD, path, text, strlen(text)) : EXIT_DATA;
        free(text);
    }
    json_decref(all);
    free(path);
    return rc;
}

/* A directory as an absolute path (settings compare checkpoints, not spellings of their paths). */
static json_t *dir_json(const char *dir) {
    char   *abs = realpath(dir, NULL);
    json_t *j = json_string(abs ? abs : dir);
    free(abs);
    return j;
}

/* ---- benchmark images ----------------------------------------------------------------------------------------- */

typedef struct raw_ref {
    const char *raw;
    int64_t     item;
} raw_ref;

static int cmp_raw_ref(const void *a, const void *b) {
    const raw_ref *x = a, *y = b;
    int            c = strcmp(x->raw, y->raw);
    return c ? c : (x->item > y->item) - (x->item < y->item);
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* The distinct images, numbered in order of first appearance; item_image maps each item to its image. */
static void index_images(prism *p) {
    int64_t  n = p->bench.n_items;
    raw_ref *refs = tool_xcalloc((size_t)n, sizeof *refs);
    int64_t *first = tool_xcalloc((size_t)n, sizeof *first); /* first item of each distinct image */
    for (int64_t i = 0; i < n; i++) {
        refs[i].raw = p->bench.items[i].image_raw;
        refs[i].item = i;
    }
    qsort(refs, (size_t)n, sizeof *refs, cmp_raw_ref);
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        if (i == 0 || strcmp(refs[i].raw, refs[i - 1].raw) != 0) {
            first[m++] = refs[i].item;
        }
    }
    qsort(first, (size_t)m, sizeof *first, cmp_i64);
    p->images = tool_xcalloc((size_t)m, sizeof *p->images);
    p->n_images = m;
    p->item_image = tool_xcalloc((size_t)n, sizeof *p->item_image);
    p->by_raw = tool_xcalloc((size_t)m, sizeof *p->by_raw);
    for (int64_t u = 0; u < m; u++) {
        const caprl_eval_item *it = &p->bench.items[first[u]];
        p->images[u].raw = it->image_raw;
        p->images[u].path = it->image;
        p->images[u].min_pixels = it->min_pixels;
        p->images[u].max_pixels = it->max_pixels;
    }
    /* each item's image: the position of its group's first item among the sorted firsts */
    for (int64_t i = 0, u0 = 0, g = 0; i < n; i++) {
        if (i == 0 || strcmp(refs[i].raw, refs[i - 1].raw) != 0) {
            int64_t lo = 0, hi = m - 1, target = refs[i].item;
            while (lo < hi) {
                int64_t mid = (lo + hi) / 2;
                if (first[mid] < target) {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            u0 = lo;
            p->by_raw[g++] = u0; /* groups come in raw-path order */
        }
        p->item_image[refs[i].item] = u0;
    }
    free(refs);
    free(first);
}

static int64_t find_image(const prism *p, const char *raw) {
    int64_t lo = 0, hi = p->n_images - 1;
    while (lo <= hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int     c = strcmp(p->images[p->by_raw[mid]].raw, raw);
        if (c == 0) {
            return p->by_raw[mid];
        }
        if (c < 0) {
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    return -1;
}

/* ---- stage 1: captions ------------------------------------------------------------------------------------------ */

/* A captions record must hold n caption strings or an "error" string; anything else is not this run's. */
static int check_captions_record(const prism *p, json_t *rec, const char *path, long line) {
    json_t *caps = json_object_get(rec, "captions"), *e = json_object_get(rec, "error");
    bool    ok = json_is_string(e) || (json_is_array(caps) && (int64_t)json_array_size(caps) == p->n);
    for (size_t k = 0; ok && !json_is_string(e) && k < json_array_size(caps); k++) {
        ok = json_is_string(json_array_get(caps, k));
    }
    if (!ok) {
        fprintf(stderr, "caprl %s: error: %s:%ld: expected \"captions\" with %d strings or an \"error\"\n", CMD, path,
                line, p->n);
        return EXIT_DATA;
    }
    return 0;
}

static int take_caption(prism *p, json_t *rec, const char *path, long line) {
    int64_t u = find_image(p, json_string_value(json_object_get(rec, "image")));
    if (u < 0 || p->images[u].caps) {
        return 0; /* not in this benchmark, or already seen in another file: the first one counts */
    }
    int rc = check_captions_record(p, rec, path, line);
    if (rc == 0) {
        p->images[u].caps = json_incref(rec);
    }
    return rc;
}

typedef struct scan_ud {
    prism *p;
    int (*take)(prism *p, json_t *rec, const char *path, long line);
} scan_ud;

static int scan_record(json_t *rec, const char *path, long line, void *ud) {
    scan_ud *s = ud;
    return s->take(s->p, rec, path, line);
}

static int scan_captions(prism *p, const char *path, int fd) {
    scan_ud s = {p, take_caption};
    return tool_jsonl_scan(CMD, path, fd, "image", JSON_STRING, "captions record", scan_record, &s);
}

typedef struct stage1 {
    caprl_model              *model;
    caprl_vision             *vision;
    caprl_preprocess_config   pp;
    caprl_image_decode_params dp;
    caprl_generate_params     gp;
    caprl_context            *ctx;
    FILE                     *out;
    tool_progress             prog;
    char                     *text; /* decode buffer */
    size_t                    text_cap;
} stage1;

static json_t *caption_error_record(const image_entry *im, const char *msg) {
    json_t *rec = json_object();
    json_object_set_new(rec, "image", json_string(im->raw));
    json_object_set_new(rec, "error", tool_image_error_text(im->path, im->raw, msg));
    return rec;
}

/* Captions the images us[0..count) (decoded in imgs, all with the same pixel bounds) and appends their records. */
static int caption_batch(prism *p, stage1 *s, const int64_t *us, caprl_image *imgs, int32_t count,
                         const char *instruction) {
    caprl_vl_request *reqs = tool_xcalloc((size_t)count, sizeof *reqs);
    int32_t           ns = count * p->n;
    int32_t          *finish = tool_xcalloc((size_t)ns, sizeof(int32_t));
    tool_samples      g;
    tool_samples_init(&g, ns, p->n, s->gp.max_new_tokens);
    for (int32_t i = 0; i < count; i++) {
        reqs[i].image = &imgs[i];
        reqs[i].prompt = instruction ? instruction : CAPTION_TEXT;
        reqs[i].system = instruction ? NULL : ""; /* released: raw ChatML with no system turn */
        reqs[i].stream_id = (uint64_t)us[i];
    }
    caprl_preprocess_config pp = s->pp;
    if (p->images[us[0]].min_pixels > 0) { /* the benchmark's qwen-vl-utils bounds */
        pp.fetch_min_pixels = p->images[us[0]].min_pixels;
    }
    if (p->images[us[0]].max_pixels > 0) {
        pp.fetch_max_pixels = p->images[us[0]].max_pixels;
    }
    caprl_error  err = {0};
    caprl_status st = caprl_vl_generate(s->model, s->vision, &pp, reqs, count, &s->gp, &s->ctx, tool_samples_collect,
                                        &g, finish, NULL, &err);
    int rc = 0;
    if (st == CAPRL_ERR_OOM || st == CAPRL_ERR_BACKEND) {
        rc = tool_fail(CMD, st, err.msg); /* the machine's problem: no records, a rerun does them */
    } else if (st != CAPRL_OK && count > 1) {
        for (int32_t i = 0; i < count && rc == 0; i++) { /* one image may have sunk the batch */
            rc = caption_batch(p, s, &us[i], &imgs[i], 1, instruction);
        }
    } else {
        const caprl_tokenizer *tok = caprl_model_tokenizer(s->model);
        for (int32_t i = 0; i < count && rc == 0; i++) {
            json_t *rec;
            if (st != CAPRL_OK) {
                rec = caption_error_record(&p->images[us[i]], err.msg);
                s->prog.failed++;
            } else {
                rec = json_object();
                json_object_set_new(rec, "image", json_string(p->images[us[i]].raw));
                rc = tool_samples_to_json(CMD, rec, "captions", tok, &g, i * p->n, p->n, finish, &s->text,
                                          &s->text_cap);
            }
            if (rc) {
                json_decref(rec);
                break;
            }
            p->images[us[i]].caps = json_incref(rec);
            rc = tool_jsonl_write(CMD, s->out, rec);
            s->prog.done++;
        }
    }
    tool_samples_free(&g);
    free(finish);
    free(reqs);
    return rc;
}

static bool same_bounds(const image_entry *a, const image_entry *b) {
    return a->min_pixels == b->min_pixels && a->max_pixels == b->max_pixels;
}

/* ---- stage 1 from a file of captions (--captions) ---------------------------------------------------------- */

typedef struct import_ud {
    prism   *p;
    char   **keys;   /* (n_images) each image's file key (owned) */
    raw_ref *sorted; /* (n_images) the keys sorted (raw = the key, item = the image) */
    char    *dir;    /* the captions file's folder */
    json_t **found;  /* (n_images) the file's first record for each image (held), or NULL */
} import_ud;

/* A key naming a file however its path is written: its real path, or (a missing file: a captioner's error record)
 * its folder's real path and its name. malloc'd. */
static char *file_key(const char *path) {
    char *real = realpath(path, NULL);
    if (real) {
        return real;
    }
    const char *slash = strrchr(path, '/');
    char       *folder = tool_folder_of(path);
    char       *key = NULL;
    if (folder) {
        const char *name = slash ? slash + 1 : path;
        size_t      n = strlen(folder) + strlen(name) + 2;
        key = tool_xmalloc(n);
        snprintf(key, n, "%s/%s", folder, name);
        free(folder);
    }
    return key ? key : tool_absolute(path);
}

/* The benchmark image a record's "image" names: the same string as the benchmark, or the same file (relative to the
 * captions file's folder, "file://" dropped). -1 if none. */
static int64_t import_match(const import_ud *d, const char *image) {
    int64_t u = find_image(d->p, image);
    if (u >= 0 || !image) {
        return u;
    }
    const char *s = strncmp(image, "file://", 7) == 0 ? image + 7 : image;
    const char *dir = d->dir ? d->dir : ".";
    size_t      n = strlen(dir) + strlen(s) + 2;
    char       *joined = tool_xmalloc(n);
    snprintf(joined, n, "%s%s%s", s[0] == '/' ? "" : dir, s[0] == '/' ? "" : "/", s);
    char   *key = file_key(joined);
    raw_ref probe = {key, -1};
    int64_t lo = 0, hi = d->p->n_images;
    while (lo < hi) { /* the first entry >= probe: item -1 sorts before every image with the same key */
        int64_t mid = lo + (hi - lo) / 2;
        if (cmp_raw_ref(&d->sorted[mid], &probe) < 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    u = lo < d->p->n_images && strcmp(d->sorted[lo].raw, key) == 0 ? d->sorted[lo].item : -1;
    free(key);
    free(joined);
    return u;
}

static int import_record(json_t *rec, const char *path, long line, void *ud) {
    import_ud *d = ud;
    int64_t    u = import_match(d, json_string_value(json_object_get(rec, "image")));
    if (u < 0 || d->found[u]) {
        return 0; /* not a benchmark image, or named again: the first record counts */
    }
    json_t *one = json_object_get(rec, "caption");
    if (d->p->n == 1 && json_is_string(one) && !json_object_get(rec, "captions")) { /* {"image", "caption"} */
        json_object_set_new(rec, "captions", json_pack("[O]", one));
    }
    int rc = check_captions_record(d->p, rec, path, line);
    if (rc == 0) {
        d->found[u] = json_incref(rec);
    }
    return rc;
}

/* Takes the captions of todo[0..n_todo) from file (the JSON Lines of caprl caption: "image", "captions" with n
 * strings or "error"; with n = 1 also "caption" with one string) and appends them, keyed by the benchmark's paths,
 * to out. Every image must be there: nothing is written otherwise. */
static int import_captions(prism *p, const char *file, const int64_t *todo, int64_t n_todo, FILE *out) {
    if (access(file, R_OK) != 0) {
        fprintf(stderr, "caprl %s: error: %s: cannot read: %s\n", CMD, file, strerror(errno));
        return EXIT_DATA;
    }
    size_t    n_img = (size_t)p->n_images;
    import_ud d = {p, tool_xcalloc(n_img, sizeof(char *)), tool_xcalloc(n_img, sizeof(raw_ref)), tool_folder_of(file),
                   tool_xcalloc(n_img, sizeof(json_t *))};
    for (int64_t u = 0; u < p->n_images; u++) {
        d.keys[u] = file_key(p->images[u].path);
        d.sorted[u] = (raw_ref){d.keys[u], u};
    }
    qsort(d.sorted, n_img, sizeof *d.sorted, cmp_raw_ref);
    int     rc = tool_jsonl_scan(CMD, file, -1, "image", JSON_STRING, "captions record", import_record, &d);
    int64_t n_missing = 0, first_missing = -1;
    for (int64_t i = 0; rc == 0 && i < n_todo; i++) {
        if (!d.found[todo[i]]) {
            first_missing = n_missing++ == 0 ? todo[i] : first_missing;
        }
    }
    if (rc == 0 && n_missing > 0) {
        fprintf(stderr, "caprl %s: error: %s: no captions for %lld of the %lld images to caption (the first: %s)\n",
                CMD, file, (long long)n_missing, (long long)n_todo, p->images[first_missing].raw);
        rc = EXIT_DATA;
    }
    for (int64_t i = 0; rc == 0 && i < n_todo; i++) {
        json_t *rec = json_deep_copy(d.found[todo[i]]);
        json_object_set_new(rec, "image", json_string(p->images[todo[i]].raw));
        p->images[todo[i]].caps = json_incref(rec);
        rc = tool_jsonl_write(CMD, out, rec);
    }
    if (rc == 0) {
        fprintf(stderr, "caprl %s: stage 1: took the captions of %lld images from %s\n", CMD, (long long)n_todo, file);
    }
    for (int64_t u = 0; u < p->n_images; u++) {
        json_decref(d.found[u]);
        free(d.keys[u]);
    }
    free(d.keys);
    free(d.sorted);
    free(d.found);
    free(d.dir);
    return rc;
}

typedef struct stage1_opts {
    const char *captioner;     /* or NULL with captions_file */
    const char *captions_file; /* take the captions from this file instead of a captioner */
    const char *instruction;   /* NULL: the released raw prompt; else this text in the chat template (default system) */
    int32_t     threads, batch, max_new;
    float       temperature, top_p;
    uint64_t    seed;
} stage1_opts;

static int run_stage1(prism *p, const stage1_opts *o) {
    char *own = stage_file(p, "captions", p->shard_k > 1);
    int   fd = -1;
    int   rc = tool_jsonl_open_locked(CMD, own, &fd);
    if (rc == 0) {
        rc = scan_stage_files(p, "captions", own, fd, scan_captions);
    }
    int64_t *todo = tool_xcalloc((size_t)p->n_images, sizeof *todo);
    int64_t  n_todo = 0, n_shard = 0;
    for (int64_t u = 0; rc == 0 && u < p->n_images; u++) {
        if (u % p->shard_k == p->shard_i) {
            n_shard++;
            if (!p->images[u].caps) {
                todo[n_todo++] = u;
            }
        }
    }
    if (rc == 0) {
        fprintf(stderr, "caprl %s: stage 1: %lld images", CMD, (long long)p->n_images);
        if (p->shard_k > 1) {
            fprintf(stderr, ", %lld in shard %ld/%ld", (long long)n_shard, p->shard_i, p->shard_k);
        }
        fprintf(stderr, ", %lld already captioned, %lld to caption (%d captions each)\n",
                (long long)(n_shard - n_todo), (long long)n_todo, p->n);
    }
    stage1       s;
    caprl_error  err = {0};
    caprl_status st = CAPRL_OK;
    memset(&s, 0, sizeof s);
    if (rc == 0 && n_todo > 0 && o->captioner) {
        /* the release reads images with qwen-vl-utils (process_vision_info): pipeline B, alpha on white */
        rc = tool_load_vlm(CMD, "captioner", o->captioner, o->threads, CAPRL_RESIZE_QWEN_VL_UTILS, &s.model, &s.vision,
                           &s.pp);
        char *rendered = NULL;
        if (rc == 0 && (st = caprl_vl_render_prompt(CAPTION_TEXT, 1, "", &rendered, &err)) == CAPRL_OK &&
            strcmp(rendered, CAPRL_PRISM_CAPTION_PROMPT) != 0) {
            st = tool_set_error(&err, CAPRL_ERR_UNSUPPORTED, "the caption prompt renders unlike the release's");
        }
        caprl_free(rendered);
        if (rc == 0 && st != CAPRL_OK) {
            rc = tool_fail(CMD, st, err.msg);
        }
    }
    if (rc == 0 && n_todo > 0) {
        s.out = fdopen(fd, "ab");
        if (!s.out) {
            fprintf(stderr, "caprl %s: error: %s: cannot open for appending: %s\n", CMD, own, strerror(errno));
            rc = EXIT_DATA;
        } else {
            fd = -1;
        }
    }
    if (rc == 0 && n_todo > 0 && o->captions_file) {
        rc = import_captions(p, o->captions_file, todo, n_todo, s.out);
    } else if (rc == 0 && n_todo > 0) {
        s.dp = caprl_image_decode_default_params();
        s.dp.alpha = CAPRL_ALPHA_WHITE;
        s.gp = caprl_generate_default_params();
        s.gp.n_samples = p->n;
        s.gp.max_new_tokens = o->max_new;
        s.gp.sampling.do_sample = o->temperature > 0.0f;
        s.gp.sampling.temperature = o->temperature > 0.0f ? o->temperature : 1.0f;
        s.gp.sampling.top_p = o->top_p;
        s.gp.sampling.seed = o->seed;
        tool_progress_start(&s.prog, CMD, "images", "img/s", n_todo);
        caprl_image *imgs = tool_xcalloc((size_t)o->batch, sizeof *imgs);
        int64_t     *us = tool_xcalloc((size_t)o->batch, sizeof *us);
        for (int64_t next = 0; next < n_todo && rc == 0;) {
            int32_t count = 0;
            while (next < n_todo && count < o->batch && rc == 0 &&
                   (count == 0 || same_bounds(&p->images[todo[next]], &p->images[us[0]]))) {
                int64_t      u = todo[next++];
                caprl_status ist = caprl_image_decode_file(p->images[u].path, &s.dp, &imgs[count], &err);
                int32_t      rw = 0, rh = 0;
                if (ist == CAPRL_OK) {
                    ist = caprl_image_preprocess_size(imgs[count].width, imgs[count].height, &s.pp, &rw, &rh, &err);
                    if (ist != CAPRL_OK) {
                        caprl_image_free(&imgs[count]);
                    }
                }
                if (ist != CAPRL_OK) { /* recorded; its questions score 0 in stage 2 */
                    json_t *rec = caption_error_record(&p->images[u], err.msg);
                    p->images[u].caps = json_incref(rec);
                    rc = tool_jsonl_write(CMD, s.out, rec);
                    s.prog.done++;
                    s.prog.failed++;
                    continue;
                }
                us[count++] = u;
            }
            if (count > 0 && rc == 0) {
                rc = caption_batch(p, &s, us, imgs, count, o->instruction);
            }
            for (int32_t i = 0; i < count; i++) {
                caprl_image_free(&imgs[i]);
            }
            tool_progress_show(&s.prog, false);
        }
        if (rc == 0) {
            tool_progress_show(&s.prog, true);
        }
        free(imgs);
        free(us);
    }
    if (s.out && fclose(s.out) != 0 && rc == 0) {
        fprintf(stderr, "caprl %s: error: %s: close failed: %s\n", CMD, own, strerror(errno));
        rc = EXIT_DATA;
    }
    if (fd >= 0) {
        close(fd);
    }
    caprl_context_free(s.ctx);
    caprl_vision_free(s.vision);
    caprl_model_free(s.model);
    free(s.text);
    free(todo);
    free(own);
    return rc;
}

/* ---- stage 2: answers ------------------------------------------------------------------------------------------ */

/* An answer record: {"index", "id", "outputs": [n], "tokens": [n], "finish": [n]} or {"index", "id", "error"}. Its
 * id must be the benchmark item's at that index: otherwise the file belongs to another benchmark. */
static int take_answer(prism *p, json_t *rec, const char *path, long line) {
    json_int_t idx = json_integer_value(json_object_get(rec, "index"));
    json_t    *id = json_object_get(rec, "id");
    if (idx < 0 || idx >= p->bench.n_items || !json_is_string(id) ||
        strcmp(json_string_value(id), p->bench.items[idx].id) != 0) {
        fprintf(stderr,
                "caprl %s: error: %s:%ld: answer for item %lld (id %s) does not match %s (which has %lld items): "
                "refusing to mix benchmarks\n",
                CMD, path, line, (long long)idx, json_is_string(id) ? json_string_value(id) : "?", p->bench_path,
                (long long)p->bench.n_items);
        return EXIT_DATA;
    }
    if (p->answers[idx]) {
        return 0; /* already seen in another file */
    }
    json_t *outs = json_object_get(rec, "outputs"), *toks = json_object_get(rec, "tokens"),
           *fin = json_object_get(rec, "finish");
    bool ok = json_is_string(json_object_get(rec, "error")) ||
              (json_is_array(outs) && json_is_array(toks) && json_is_array(fin) &&
               (int64_t)json_array_size(outs) == p->n && (int64_t)json_array_size(toks) == p->n &&
               (int64_t)json_array_size(fin) == p->n);
    for (int32_t k = 0; ok && json_is_array(outs) && k < p->n; k++) {
        ok = json_is_string(json_array_get(outs, (size_t)k)) && json_is_integer(json_array_get(toks, (size_t)k)) &&
             json_is_string(json_array_get(fin, (size_t)k));
    }
    if (!ok) {
        fprintf(stderr,
                "caprl %s: error: %s:%ld: expected %d \"outputs\", \"tokens\" and \"finish\", or an \"error\"\n", CMD,
                path, line, p->n);
        return EXIT_DATA;
    }
    p->answers[idx] = json_incref(rec);
    return 0;
}

static int scan_answers(prism *p, const char *path, int fd) {
    scan_ud s = {p, take_answer};
    return tool_jsonl_scan(CMD, path, fd, "index", JSON_INTEGER, "answers record", scan_record, &s);
}

typedef struct stage2_opts {
    const char *reader;
    int32_t     threads, batch, max_new;
    float       temperature, top_p;
    uint64_t    seed;
} stage2_opts;

typedef struct stage2 {
    caprl_model          *model;
    caprl_context        *ctx;
    int32_t               ctx_seq;
    int64_t               ctx_len;
    caprl_generate_params gp;
    FILE                 *out;
    tool_progress         prog;
    int64_t               no_placeholder; /* items whose prompt has no image placeholder */
    char                 *text;           /* decode buffer */
    size_t                text_cap;
} stage2;

/* Answers items[0..count) (every one with captions) and appends their records. Returns an exit code. */
static int answer_batch(prism *p, stage2 *s, const int64_t *items, int32_t count) {
    const caprl_tokenizer *tok = caprl_model_tokenizer(s->model);
    int32_t                np = count * p->n;
    int32_t              **ids = tool_xcalloc((size_t)np, sizeof *ids);
    int64_t               *lens = tool_xcalloc((size_t)np, sizeof *lens);
    uint64_t              *streams = tool_xcalloc((size_t)np, sizeof *streams);
    int32_t               *finish = tool_xcalloc((size_t)np, sizeof *finish);
    tool_samples           g;
    tool_samples_init(&g, np, 1, s->gp.max_new_tokens);
    caprl_error  err = {0};
    caprl_status st = CAPRL_OK;
    int64_t      longest = 0;
    for (int32_t i = 0; i < count && st == CAPRL_OK; i++) {
        const caprl_eval_item *it = &p->bench.items[items[i]];
        json_t                *caps = json_object_get(p->images[p->item_image[items[i]]].caps, "captions");
        for (int32_t k = 0; k < p->n && st == CAPRL_OK; k++) {
            int32_t q = i * p->n + k, replaced = 0;
            /* prompt.replace(placeholder, "...caption of an image: {cap}. Please answer ...") as released */
            char *prompt = caprl_prism_reader_prompt(it->prompt, json_string_value(json_array_get(caps, (size_t)k)),
                                                     &replaced);
            if (k == 0 && replaced == 0) {
                s->no_placeholder++;
            }
            st = caprl_tokenizer_encode(tok, prompt, strlen(prompt), true, NULL, 0, &lens[q], &err);
            if (st == CAPRL_OK) {
                ids[q] = tool_xmalloc((size_t)lens[q] * sizeof(int32_t));
                st = caprl_tokenizer_encode(tok, prompt, strlen(prompt), true, ids[q], lens[q], &lens[q], &err);
            }
            if (st != CAPRL_OK) { /* the message names the item; a long one is cut */
                char msg[sizeof err.msg];
                int  w = snprintf(msg, sizeof msg, "%s: item %s: ", p->bench_path, it->id);
                if (w > 0 && (size_t)w < sizeof msg) {
                    snprintf(msg + w, sizeof msg - (size_t)w, "%.*s", (int)(sizeof msg - (size_t)w - 1), err.msg);
                }
                memcpy(err.msg, msg, sizeof msg);
            }
            caprl_free(prompt);
            streams[q] = (uint64_t)items[i] * (uint64_t)p->n + (uint64_t)k; /* item i's answer k: stream i*n+k */
            longest = lens[q] > longest ? lens[q] : longest;
        }
    }
    if (st == CAPRL_OK) {
        st = tool_ensure_context(&s->ctx, &s->ctx_seq, &s->ctx_len, s->model, np, longest + s->gp.max_new_tokens, &err);
    }
    if (st == CAPRL_OK) {
        caprl_generate_params gp = s->gp;
        gp.prompt_streams = streams;
        st = caprl_generate(s->ctx, (const int32_t *const *)ids, lens, np, NULL, &gp, tool_samples_collect, &g, finish,
                            NULL, &err);
    }
    int rc = st != CAPRL_OK ? tool_fail(CMD, st, err.msg) : 0;
    for (int32_t i = 0; i < count && rc == 0; i++) {
        json_t *rec = json_object();
        json_object_set_new(rec, "index", json_integer(items[i]));
        json_object_set_new(rec, "id", json_string(p->bench.items[items[i]].id));
        rc = tool_samples_to_json(CMD, rec, "outputs", tok, &g, i * p->n, p->n, finish, &s->text, &s->text_cap);
        if (rc) {
            json_decref(rec);
            break;
        }
        p->answers[items[i]] = json_incref(rec);
        rc = tool_jsonl_write(CMD, s->out, rec);
        s->prog.done++;
    }
    for (int32_t q = 0; q < np; q++) {
        free(ids[q]);
    }
    tool_samples_free(&g);
    free(ids);
    free(lens);
    free(streams);
    free(finish);
    return rc;
}

static int run_stage2(prism *p, const stage2_opts *o, bool have_captions) {
    int rc = 0;
    if (!have_captions) { /* stage 1 ran elsewhere: read every captions file as it is */
        rc = scan_stage_files(p, "captions", NULL, -1, scan_captions);
    }
    char *own = stage_file(p, "answers", p->shard_k > 1);
    int   fd = -1;
    if (rc == 0) {
        rc = tool_jsonl_open_locked(CMD, own, &fd);
    }
    if (rc == 0) {
        rc = scan_stage_files(p, "answers", own, fd, scan_answers);
    }
    stage2 s;
    memset(&s, 0, sizeof s);
    if (rc == 0) {
        s.out = fdopen(fd, "ab");
        if (!s.out) {
            fprintf(stderr, "caprl %s: error: %s: cannot open for appending: %s\n", CMD, own, strerror(errno));
            rc = EXIT_DATA;
        } else {
            fd = -1; /* now closed with s.out */
        }
    }
    int64_t     *todo = tool_xcalloc((size_t)p->bench.n_items, sizeof *todo);
    int64_t      n_todo = 0, n_shard = 0, n_missing = 0, n_uncaptioned = 0;
    const char  *first_missing = NULL;
    for (int64_t i = 0; rc == 0 && i < p->bench.n_items; i++) {
        const image_entry *im = &p->images[p->item_image[i]];
        if (p->item_image[i] % p->shard_k != p->shard_i) {
            continue; /* shards split by image, as in stage 1, so a shard answers from its own captions */
        }
        n_shard++;
        if (p->answers[i]) {
            continue;
        }
        if (!im->caps) {
            n_missing++;
            first_missing = first_missing ? first_missing : im->raw;
        } else if (json_is_string(json_object_get(im->caps, "error"))) {
            /* stage 1 could not read the image: recorded, scored 0, never retried here */
            json_t *rec = json_object();
            json_object_set_new(rec, "index", json_integer(i));
            json_object_set_new(rec, "id", json_string(p->bench.items[i].id));
            json_object_set_new(rec, "error", json_sprintf("no captions: %s",
                                                           json_string_value(json_object_get(im->caps, "error"))));
            p->answers[i] = json_incref(rec);
            rc = tool_jsonl_write(CMD, s.out, rec);
            n_uncaptioned++;
        } else {
            todo[n_todo++] = i;
        }
    }
    if (rc == 0) {
        fprintf(stderr, "caprl %s: stage 2: %lld items", CMD, (long long)p->bench.n_items);
        if (p->shard_k > 1) {
            fprintf(stderr, ", %lld in shard %ld/%ld", (long long)n_shard, p->shard_i, p->shard_k);
        }
        fprintf(stderr, ", %lld already answered, %lld to answer (%d answers each)",
                (long long)(n_shard - n_todo - n_missing - n_uncaptioned), (long long)n_todo, p->n);
        if (n_uncaptioned > 0) {
            fprintf(stderr, ", %lld whose image could not be captioned (scored 0)", (long long)n_uncaptioned);
        }
        fputc('\n', stderr);
    }
    if (rc == 0 && n_missing > 0) {
        fprintf(stderr,
                "caprl %s: error: %lld items have no captions yet (the first: image %s); run stage 1 (--stage 1, "
                "same --tag, --out and --shard) first\n",
                CMD, (long long)n_missing, first_missing);
        rc = EXIT_DATA;
    }
    if (rc == 0 && n_todo > 0) {
        rc = tool_load_model(CMD, o->reader, o->threads, &s.model);
        if (rc == 0 && !caprl_model_tokenizer(s.model)) {
            fprintf(stderr, "caprl %s: error: %s: the reader has no tokenizer.json\n", CMD, o->reader);
            rc = EXIT_DATA;
        }
    }
    if (rc == 0 && n_todo > 0) {
        s.gp = caprl_generate_default_params();
        s.gp.n_samples = 1;
        s.gp.max_new_tokens = o->max_new;
        s.gp.sampling.do_sample = o->temperature > 0.0f;
        s.gp.sampling.temperature = o->temperature > 0.0f ? o->temperature : 1.0f;
        s.gp.sampling.top_p = o->top_p;
        s.gp.sampling.seed = o->seed;
        tool_progress_start(&s.prog, CMD, "items", "items/s", n_todo);
        /* whole items per batch: at least one, at most --reader-batch prompts when n allows */
        int32_t per = o->batch / p->n > 0 ? o->batch / p->n : 1;
        for (int64_t next = 0; next < n_todo && rc == 0; next += per) {
            int32_t count = (int32_t)(n_todo - next < per ? n_todo - next : per);
            rc = answer_batch(p, &s, todo + next, count);
            tool_progress_show(&s.prog, false);
        }
        if (rc == 0) {
            tool_progress_show(&s.prog, true);
        }
        if (s.no_placeholder > 0) {
            fprintf(stderr,
                    "caprl %s: warning: %lld prompts have no image placeholder (%s): the reader never saw their "
                    "captions\n",
                    CMD, (long long)s.no_placeholder, "<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>");
        }
    }
    if (s.out && fclose(s.out) != 0 && rc == 0) {
        fprintf(stderr, "caprl %s: error: %s: close failed: %s\n", CMD, own, strerror(errno));
        rc = EXIT_DATA;
    }
    if (fd >= 0) {
        close(fd);
    }
    caprl_context_free(s.ctx);
    caprl_model_free(s.model);
    free(s.text);
    free(todo);
    free(own);
    return rc;
}

/* ---- results ---------------------------------------------------------------------------------------------------- */

/* Scores every item once all are answered and writes the two released result files; prints the summary. */
static int write_results(prism *p, int64_t step, const char *tokenizer_dir) {
    int64_t n = p->bench.n_items, answered = 0;
    for (int64_t i = 0; i < n; i++) {
        answered += p->answers[i] != NULL;
    }
    if (answered < n) {
        fprintf(stderr,
                "caprl %s: %lld of %lld items answered; the result files are written once every item is (by the "
                "last shard to finish, or by a rerun without --shard)\n",
                CMD, (long long)answered, (long long)n);
        return 0;
    }
    /* each output's tokens counted as the release does, original_tokenizer(text).input_ids */
    char            *tok_path = tool_path_join(tokenizer_dir, "tokenizer.json");
    caprl_tokenizer *tok = NULL;
    caprl_error      terr = {0};
    caprl_status     tst = caprl_tokenizer_load(&tok, tok_path, &terr);
    free(tok_path);
    if (tst != CAPRL_OK) {
        return tool_fail(CMD, tst, terr.msg);
    }
    int32_t             N = p->n;
    caprl_prism_record *recs = tool_xcalloc((size_t)n, sizeof *recs);
    double             *scores = tool_xcalloc((size_t)(n * N), sizeof *scores);
    char              **parsed = tool_xcalloc((size_t)(n * N), sizeof *parsed);
    int64_t            *tokens = tool_xcalloc((size_t)(n * N), sizeof *tokens);
    const char        **caps = tool_xcalloc((size_t)(n * N), sizeof *caps);
    const char        **outs = tool_xcalloc((size_t)(n * N), sizeof *outs);
    int64_t             boxed = 0, failed = 0, rule_items[CAPRL_EVAL_RULE_COUNT] = {0}, total_tokens = 0;
    double              rule_mean[CAPRL_EVAL_RULE_COUNT] = {0};
    for (int64_t i = 0; i < n; i++) {
        const caprl_eval_item *it = &p->bench.items[i];
        const json_t          *ans = p->answers[i];
        const json_t          *cj = json_object_get(p->images[p->item_image[i]].caps, "captions");
        bool                   err = json_is_string(json_object_get(ans, "error"));
        double                 item_sum = 0;
        failed += err;
        for (int32_t k = 0; k < N; k++) {
            int64_t q = i * N + k;
            caps[q] = json_is_array(cj) ? json_string_value(json_array_get(cj, (size_t)k)) : "";
            if (err) {
                outs[q] = "";
                parsed[q] = NULL;
                scores[q] = 0.0;
                continue;
            }
            caprl_eval_trace tr;
            outs[q] = json_string_value(json_array_get(json_object_get(ans, "outputs"), (size_t)k));
            scores[q] = caprl_eval_score(outs[q], it->answer, it->rule, &tr);
            parsed[q] = caprl_eval_parsed_answer(outs[q]);
            int64_t n_tok = 0;
            caprl_error e2 = {0};
            if (caprl_tokenizer_encode(tok, outs[q], strlen(outs[q]), true, NULL, 0, &n_tok, &e2) != CAPRL_OK) {
                n_tok = json_integer_value(json_array_get(json_object_get(ans, "tokens"), (size_t)k));
            }
            tokens[q] = n_tok;
            total_tokens += tokens[q];
            boxed += tr.boxed_found;
            item_sum += scores[q];
        }
        int32_t rule = it->rule >= 0 && it->rule < CAPRL_EVAL_RULE_COUNT ? it->rule : CAPRL_EVAL_RULE_MATH;
        rule_items[rule]++;
        rule_mean[rule] += item_sum / N;
        recs[i].record_json = it->record_json;
        recs[i].n = N;
        recs[i].scores = scores + i * N;
        recs[i].parsed = (const char *const *)(parsed + i * N);
        recs[i].reader_tokens = tokens + i * N;
        recs[i].captions = caps + i * N;
        recs[i].outputs = outs + i * N;
    }
    /* the released details show "" where the parser found nothing */
    for (int64_t q = 0; q < n * N; q++) {
        if (!parsed[q]) {
            parsed[q] = caprl_eval_parsed_answer("");
        }
    }
    caprl_prism_metrics m;
    caprl_prism_aggregate(recs, n, &m);
    char        *details = caprl_prism_details_path(p->out_dir, p->tag, step);
    char        *eval = caprl_prism_eval_path(p->out_dir, p->tag, step);
    caprl_error  err = {0};
    caprl_status st = caprl_prism_write_details(details, recs, n, &err);
    if (st == CAPRL_OK) {
        st = caprl_prism_write_eval(eval, &m, &err);
    }
    int rc = st == CAPRL_OK ? 0 : tool_fail(CMD, st, err.msg);
    if (rc == 0) {
        char *line = caprl_prism_summary_line(&m);
        fprintf(stderr, "caprl %s: %s step %lld: %s (%lld items x %d captions; Table 3 reports Mean)\n", CMD, p->tag,
                (long long)step, line, (long long)n, N);
        caprl_free(line);
        for (int32_t r = 0; r < CAPRL_EVAL_RULE_COUNT; r++) {
            if (rule_items[r] > 0) {
                fprintf(stderr, "caprl %s:   rule %-5s %6lld items, Mean %.4f\n", CMD, caprl_eval_rule_name(r),
                        (long long)rule_items[r], rule_mean[r] / (double)rule_items[r]);
            }
        }
        int64_t answers = (n - failed) * N;
        fprintf(stderr,
                "caprl %s:   %lld of %lld reader outputs had a <answer>...\\boxed{} answer; mean output %.1f tokens; "
                "%lld items without captions scored 0\n",
                CMD, (long long)boxed, (long long)answers, answers > 0 ? (double)total_tokens / (double)answers : 0.0,
                (long long)failed);
        fprintf(stderr, "caprl %s: wrote %s and %s\n", CMD, details, eval);
        if (failed == n) { /* nothing was evaluated: the images are not where the benchmark says */
            fprintf(stderr, "caprl %s: error: none of the %lld items could be captioned (see OUT/captions_%s.jsonl for "
                            "why)\n", CMD, (long long)n, p->tag);
            rc = EXIT_DATA;
        }
    }
    caprl_free(details);
    caprl_free(eval);
    for (int64_t q = 0; q < n * N; q++) {
        caprl_free(parsed[q]);
    }
    free(recs);
    free(scores);
    free(parsed);
    free(tokens);
    free(caps);
    free(outs);
    caprl_tokenizer_free(tok);
    return rc;
}

/* ---- the command --------------------------------------------------------------------------------------------- */

static void prism_free(prism *p) {
    for (int64_t u = 0; u < p->n_images; u++) {
        json_decref(p->images[u].caps);
    }
    for (int64_t i = 0; p->answers && i < p->bench.n_items; i++) {
        json_decref(p->answers[i]);
    }
    free(p->answers);
    free(p->images);
    free(p->item_image);
    free(p->by_raw);
    caprl_eval_bench_free(&p->bench);
}

int cmd_eval_prism(int argc, char **argv) {
    static const cmd_info info = {
        CMD,
        "caprl eval prism (--captioner DIR | --captions FILE) --reader DIR --bench FILE --tag T --out DIR [-n 4]\n"
        "                 [--stage 1|2] [--step N] [--shard i/k] [--seed S]",
        "Prism evaluation as released (Eval_CapRL.py): caption each benchmark image n times, have a text reader\n"
        "answer every question from every caption, score, and write BoN and Mean.",
        "Stage 1 (needs --captioner, a Qwen2.5-VL checkpoint): every distinct image of --bench gets --n-captions\n"
        "captions from the released raw ChatML prompt (no system turn; the text is \"Please describe this image in\n"
        "detail\", no final period), temperature 1.0, top-p 1, at most 2048 new tokens, appended to\n"
        "OUT/captions_{tag}.jsonl. --captions FILE takes them instead from a file of caprl caption's JSON Lines\n"
        "(any captioner's output: \"image\" as the benchmark or the list wrote it, \"captions\" with n strings, or\n"
        "with -n 1 \"caption\"), which must hold every image.\n"
        "Stage 2 (needs --reader, a text checkpoint): each item's prompt with its image placeholder replaced by\n"
        "\"<|im_start|>user\\nHere is a detailed caption of an image: {cap}. Please answer the question based on\n"
        "the caption.\", one answer per caption at temperature 1.0, top-p 1, at most 2048 new tokens, appended to\n"
        "OUT/answers_{tag}.jsonl. Scoring follows the benchmark's rule (file name: 'info' -> ANLS + relaxed\n"
        "accuracy, 'char' -> relaxed accuracy, else math equivalence; a simple-JSONL record's \"type\" or --rule\n"
        "overrides). Results: OUT/Prism_{tag}_step_details_{step}_final.json and\n"
        "OUT/Prism_{tag}_step_eval_{step}_final.json (\"BoN: x Mean: y\"; the paper's Table 3 reports Mean), and a\n"
        "summary on stderr. Without --stage both stages run. Rerunning resumes both (a torn last line from a kill is\n"
        "removed); OUT/run_{tag}.json records each stage's settings, and a rerun with other settings is refused.\n"
        "--shard i/k takes every k-th distinct image and its questions, into\n"
        "OUT/{captions,answers}_{tag}.shard-i-of-k.jsonl; the shard that completes the set (or any later run)\n"
        "writes the results. Caption k of image u samples with random stream u*n+k, answer k of item i with i*n+k:\n"
        "results do not depend on batching, sharding or resuming."};
    const char *captioner = NULL, *reader = NULL, *bench_path = NULL, *tag = NULL, *out_dir = NULL, *shard = NULL,
                *image_root = NULL;
    const char *rule_name = NULL, *instruction = NULL, *captions_file = NULL;
    int32_t     n = 4, stage = 0, max_new = 2048, reader_max_new = 2048, threads = 0, batch = 1, reader_batch = 8;
    float       temperature = 1.0f, top_p = 1.0f, reader_temperature = 1.0f, reader_top_p = 1.0f;
    int64_t     seed = 0, step = 0;
    opt_spec    specs[] = {
        {"captioner", OPT_STRING, &captioner, "stage 1: Qwen2.5-VL checkpoint that captions", 0, 0, "DIR", 0},
        {"captions", OPT_STRING, &captions_file,
         "stage 1: take the captions from this file (caprl caption's JSON Lines) instead of a captioner", 0, 0, "FILE",
         0},
        {"reader", OPT_STRING, &reader, "stage 2: text checkpoint that answers from captions", 0, 0, "DIR", 0},
        {"bench", OPT_STRING, &bench_path, "benchmark: released lmm_eval_*.json or caprl simple JSONL", 0, 0, "FILE",
         0},
        {"image-root", OPT_STRING, &image_root, "folder of the benchmark's relative image paths (the release's "
                                                "--image-root; default: the working directory, else the benchmark's "
                                                "folder)", 0, 0, "DIR", 0},
        {"tag", OPT_STRING, &tag, "name of this evaluation in the output file names", 0, 0, "T", 0},
        {"out", OPT_STRING, &out_dir, "output directory (created)", 0, 0, "DIR", 0},
        {"n-captions", OPT_INT, &n, "captions per image (answers per question)", 1, 1024, "N", 'n'},
        {"stage", OPT_INT, &stage, "run only stage 1 (captions) or 2 (answers and results); 0 = both", 0, 2, "S", 0},
        {"step", OPT_I64, &step, "step number in the result file names", 0, 9.2e18, "N", 0},
        {"instruction", OPT_STRING, &instruction, "stage 1: caption with this request in the captioner's chat template "
                                                  "(default system turn) instead of the released raw prompt (for "
                                                  "captioners trained with it, e.g. by caprl train)", 0, 0, "TEXT", 0},
        {"temperature", OPT_FLOAT, &temperature, "captioner sampling temperature (0 = greedy)", 0, 100, "T", 0},
        {"top-p", OPT_FLOAT, &top_p, "captioner nucleus mass in (0, 1]", 1e-6, 1, "P", 0},
        {"max-new-tokens", OPT_INT, &max_new, "caption length limit in tokens", 1, 1 << 20, "M", 0},
        {"reader-temperature", OPT_FLOAT, &reader_temperature, "reader sampling temperature (0 = greedy)", 0, 100,
         "T", 0},
        {"reader-top-p", OPT_FLOAT, &reader_top_p, "reader nucleus mass in (0, 1]", 1e-6, 1, "P", 0},
        {"reader-max-new-tokens", OPT_INT, &reader_max_new, "answer length limit in tokens", 1, 1 << 20, "M", 0},
        {"rule", OPT_STRING, &rule_name, "score every item with this rule: math, chart or info (default: per file)",
         0, 0, "R", 0},
        {"batch", OPT_INT, &batch, "stage 1: images per batched generation", 1, 4096, "B", 0},
        {"reader-batch", OPT_INT, &reader_batch, "stage 2: prompts per batched generation (whole items)", 1, 65536,
         "B", 0},
        {"shard", OPT_STRING, &shard, "process distinct images i, i+k, i+2k, ... (and their questions)", 0, 0, "i/k",
         0},
        {"seed", OPT_I64, &seed, "random seed", 0, 9.2e18, "S", 0},
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!bench_path || !tag || !out_dir) {
        return tool_usage_error(info.name, "--bench, --tag and --out are required");
    }
    if (stage != 2 && !captioner == !captions_file) {
        return tool_usage_error(info.name, "stage 1 needs --captioner or --captions (one of them)");
    }
    if (stage != 1 && !reader) {
        return tool_usage_error(info.name, "stage 2 needs --reader");
    }
    if (!tag[0] || strchr(tag, '/')) {
        return tool_usage_error(info.name, "--tag must be a non-empty name without '/', got '%s'", tag);
    }
    prism p;
    memset(&p, 0, sizeof p);
    p.out_dir = out_dir;
    p.tag = tag;
    p.bench_path = bench_path;
    p.n = n;
    p.shard_k = 1;
    if (shard && !tool_parse_shard(shard, &p.shard_i, &p.shard_k)) {
        return tool_usage_error(info.name, "--shard expects i/k with 0 <= i < k, got '%s'", shard);
    }
    caprl_eval_bench_params bp = caprl_eval_bench_default_params();
    bp.image_root = image_root;
    if (rule_name && (bp.rule = caprl_eval_rule_parse(rule_name)) < 0) {
        return tool_usage_error(info.name, "--rule must be math, chart or info, got '%s'", rule_name);
    }
    caprl_error  err = {0};
    caprl_status st = caprl_eval_bench_load(&p.bench, bench_path, &bp, &err);
    if (st != CAPRL_OK) {
        return tool_fail(info.name, st, err.msg);
    }
    index_images(&p);
    p.answers = tool_xcalloc((size_t)p.bench.n_items, sizeof *p.answers);
    rc = tool_mkdir_p(info.name, out_dir);
    char *bench_abs = tool_absolute(bench_path), *captions_abs = captions_file ? tool_absolute(captions_file) : NULL;
    if (rc == 0 && stage != 2) {
        json_t *mine = captions_file
                           ? json_pack("{s:s, s:I, s:s, s:i}", "bench", bench_abs, "items", (json_int_t)p.bench.n_items,
                                       "captions_file", captions_abs, "n_captions", (int)n)
                           : json_pack("{s:s, s:I, s:o, s:i, s:f, s:f, s:i, s:I, s:s?}", "bench", bench_abs, "items",
                                       (json_int_t)p.bench.n_items, "captioner", dir_json(captioner), "n_captions",
                                       (int)n, "temperature", tool_typed_float(temperature), "top_p",
                                       tool_typed_float(top_p), "max_new_tokens", (int)max_new, "seed",
                                       (json_int_t)seed, "instruction", instruction);
        rc = check_settings(&p, "stage1", mine);
        json_decref(mine);
        if (rc == 0) {
            stage1_opts o = {.captioner = captioner,
                             .captions_file = captions_file,
                             .instruction = instruction,
                             .threads = threads,
                             .batch = batch,
                             .max_new = max_new,
                             .temperature = temperature,
                             .top_p = top_p,
                             .seed = (uint64_t)seed};
            rc = run_stage1(&p, &o);
        }
    }
    if (rc == 0 && stage != 1) {
        json_t *mine = json_pack("{s:s, s:I, s:o, s:i, s:f, s:f, s:i, s:I, s:s}", "bench", bench_abs, "items",
                                 (json_int_t)p.bench.n_items, "reader", dir_json(reader), "n_captions", (int)n,
                                 "temperature", tool_typed_float(reader_temperature), "top_p",
                                 tool_typed_float(reader_top_p),
                                 "max_new_tokens", (int)reader_max_new, "seed", (json_int_t)seed, "rule",
                                 rule_name ? rule_name : "per file");
        rc = check_settings(&p, "stage2", mine);
        json_decref(mine);
        if (rc == 0) {
            stage2_opts o = {reader, threads, reader_batch, reader_max_new, reader_temperature, reader_top_p,
                             (uint64_t)seed};
            rc = run_stage2(&p, &o, stage == 0);
        }
        if (rc == 0) {
            /* the release counts output tokens with the captioner's tokenizer (its original_tokenizer) */
            rc = write_results(&p, step, captioner ? captioner : reader);
        }
    }
    free(bench_abs);
    free(captions_abs);
    prism_free(&p);
    return rc;
}
