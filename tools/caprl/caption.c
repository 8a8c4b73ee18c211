/* caprl caption: caption a list of images with a Qwen2.5-VL checkpoint into JSON Lines, resumably. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "caprl/image.h"
#include "caprl/model.h"
#include "caprl/tokenizer.h"
#include "caprl/vision.h"
#include "caprl/vlm.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

typedef struct item {
    char   *image;    /* as written in the list (the resume key) */
    char   *path;     /* resolved path */
    json_t *extra;    /* other fields of a JSONL record, or NULL */
    int64_t index;    /* position in the whole list (RNG stream id) */
} item;

typedef struct item_list {
    item   *items;
    int64_t n, cap;
} item_list;

static void list_push(item_list *l, const char *image, const char *base_dir, json_t *extra) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 256;
        l->items = realloc(l->items, (size_t)l->cap * sizeof(item));
    }
    item *it = &l->items[l->n];
    it->image = strdup(image);
    if (image[0] == '/' || !base_dir) {
        it->path = strdup(image);
    } else {
        size_t n = strlen(base_dir) + strlen(image) + 2;
        it->path = malloc(n);
        snprintf(it->path, n, "%s/%s", base_dir, image);
    }
    it->extra = extra;
    it->index = l->n;
    l->n++;
}

static void list_free(item_list *l) {
    for (int64_t i = 0; i < l->n; i++) {
        free(l->items[i].image);
        free(l->items[i].path);
        json_decref(l->items[i].extra);
    }
    free(l->items);
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

static int list_dir(const char *dir, item_list *l) {
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "caprl caption: error: %s: cannot open directory: %s\n", dir, strerror(errno));
        return EXIT_DATA;
    }
    char  **names = NULL;
    size_t  n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || !has_image_ext(e->d_name)) {
            continue;
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 256;
            names = realloc(names, cap * sizeof *names);
        }
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof *names, cmp_str);
    for (size_t i = 0; i < n; i++) {
        list_push(l, names[i], dir, NULL);
        free(names[i]);
    }
    free(names);
    return 0;
}

/* A text file of paths, or JSON Lines with an "image" field; relative paths are relative to the list's folder. */
static int list_file(const char *path, item_list *l) {
    char  *data = NULL;
    size_t len = 0;
    int    rc = tool_read_file("caption", path, (size_t)1 << 31, &data, &len);
    if (rc) {
        return rc;
    }
    char *base = strdup(path), *slash = strrchr(base, '/');
    if (slash) {
        *slash = '\0';
    } else {
        strcpy(base, ".");
    }
    const char *p = data;
    while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t') {
        p++;
    }
    bool  jsonl = *p == '{';
    long  line_no = 0;
    char *save = NULL;
    for (char *line = strtok_r(data, "\n", &save); line && rc == 0; line = strtok_r(NULL, "\n", &save)) {
        line_no++;
        size_t n = strlen(line);
        while (n && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t')) {
            line[--n] = '\0';
        }
        if (n == 0) {
            continue;
        }
        if (!jsonl) {
            list_push(l, line, base, NULL);
            continue;
        }
        json_error_t jerr;
        json_t      *rec = json_loadb(line, n, JSON_REJECT_DUPLICATES, &jerr);
        json_t      *img = rec ? json_object_get(rec, "image") : NULL;
        if (!rec || !json_is_object(rec) || !json_is_string(img) || json_string_length(img) == 0) {
            fprintf(stderr, "caprl caption: error: %s:%ld: %s\n", path, line_no,
                    !rec ? jerr.text : "expected a JSON object with a non-empty string field \"image\"");
            json_decref(rec);
            rc = EXIT_DATA;
            break;
        }
        json_t *extra = json_deep_copy(rec);
        json_object_del(extra, "image");
        list_push(l, json_string_value(img), base, extra);
        json_decref(rec);
    }
    free(base);
    free(data);
    return rc;
}

/* ---- resume ------------------------------------------------------------------------------------------------ */

/* Reads an existing output: collects the "image" keys already written (sorted) and cuts a torn last line. */
static int load_done(const char *out_path, char ***done, size_t *n_done) {
    *done = NULL;
    *n_done = 0;
    struct stat st;
    if (stat(out_path, &st) != 0) {
        return 0; /* a fresh run */
    }
    char  *data = NULL;
    size_t len = 0;
    int    rc = tool_read_file("caption", out_path, (size_t)1 << 34, &data, &len);
    if (rc) {
        return rc;
    }
    size_t good_end = 0, cap = 0, start = 0;
    long   line_no = 0;
    while (start < len) {
        char  *nl = memchr(data + start, '\n', len - start);
        size_t end = nl ? (size_t)(nl - data) : len;
        line_no++;
        json_error_t jerr;
        json_t      *rec = json_loadb(data + start, end - start, 0, &jerr);
        json_t      *img = rec ? json_object_get(rec, "image") : NULL;
        if (!rec || !json_is_string(img)) {
            json_decref(rec);
            if (!nl || end + 1 == len) {
                break; /* the torn last record of a killed run: rewritten below */
            }
            fprintf(stderr, "caprl caption: error: %s:%ld: not a caption record; refusing to append to it\n", out_path,
                    line_no);
            free(data);
            return EXIT_DATA;
        }
        if (!nl) {
            json_decref(rec);
            break; /* complete JSON but no newline: also torn (the newline is written with the record) */
        }
        if (*n_done == cap) {
            cap = cap ? 2 * cap : 256;
            *done = realloc(*done, cap * sizeof(char *));
        }
        (*done)[(*n_done)++] = strdup(json_string_value(img));
        json_decref(rec);
        good_end = end + 1;
        start = end + 1;
    }
    free(data);
    if (good_end < len) {
        fprintf(stderr, "caprl caption: %s: removing a torn last record (%zu bytes) left by an interrupted run\n",
                out_path, len - good_end);
        if (truncate(out_path, (off_t)good_end) != 0) {
            fprintf(stderr, "caprl caption: error: %s: cannot truncate: %s\n", out_path, strerror(errno));
            return EXIT_DATA;
        }
    }
    qsort(*done, *n_done, sizeof(char *), cmp_str);
    return 0;
}

static bool is_done(char **done, size_t n_done, const char *image) {
    return n_done && bsearch(&image, done, n_done, sizeof(char *), cmp_str) != NULL;
}

/* ---- generation and output --------------------------------------------------------------------------------- */

typedef struct collector {
    int32_t   n_samples;
    int32_t **tokens; /* (batch * n_samples) */
    int32_t  *n;
    int32_t   cap;
} collector;

static bool collect_token(int32_t prompt, int32_t sample, int32_t token, void *ud) {
    collector *c = ud;
    int32_t    s = prompt * c->n_samples + sample;
    if (c->n[s] < c->cap) {
        c->tokens[s][c->n[s]++] = token;
    }
    return true;
}

static int write_record(FILE *out, json_t *rec) {
    char *line = json_dumps(rec, JSON_COMPACT);
    json_decref(rec);
    if (!line) {
        fprintf(stderr, "caprl caption: error: cannot encode a record\n");
        return EXIT_DATA;
    }
    /* one write per record, then flush + fsync: a kill leaves at most one torn line, repaired on resume */
    size_t n = strlen(line);
    line[n] = '\n';
    bool ok = fwrite(line, 1, n + 1, out) == n + 1 && fflush(out) == 0 && fsync(fileno(out)) == 0;
    free(line);
    if (!ok) {
        fprintf(stderr, "caprl caption: error: write failed: %s\n", strerror(errno));
        return EXIT_DATA;
    }
    return 0;
}

static json_t *base_record(const item *it) {
    json_t *rec = it->extra ? json_deep_copy(it->extra) : json_object();
    json_object_set_new(rec, "image", json_string(it->image));
    return rec;
}

typedef struct progress {
    int64_t total, done, failed;
    double  t0, last_print;
    bool    tty;
} progress;

static void show_progress(progress *p, bool final) {
    double now = tool_now(), el = now - p->t0;
    if (!final && !p->tty && now - p->last_print < 10.0) {
        return;
    }
    p->last_print = now;
    double rate = el > 0 ? (double)p->done / el : 0;
    double eta = rate > 0 ? (double)(p->total - p->done) / rate : 0;
    if (p->tty) {
        int  width = 30, fill = p->total ? (int)(width * p->done / p->total) : width;
        char bar[32];
        for (int i = 0; i < width; i++) {
            bar[i] = i < fill ? '#' : '.';
        }
        bar[width] = '\0';
        fprintf(stderr, "\r[%s] %lld/%lld images  %.2f img/s  ETA %dm%02ds  (%lld failed)%s", bar,
                (long long)p->done, (long long)p->total, rate, (int)(eta / 60), (int)eta % 60, (long long)p->failed,
                final ? "\n" : "");
    } else {
        fprintf(stderr, "caprl caption: %lld/%lld images, %.2f img/s, ETA %.0f s, %lld failed\n", (long long)p->done,
                (long long)p->total, rate, eta, (long long)p->failed);
    }
}

static const char *finish_str(int32_t f) {
    return f == CAPRL_FINISH_EOS ? "eos" : f == CAPRL_FINISH_LENGTH ? "length" : "aborted";
}

typedef struct run_ctx {
    caprl_model             *model;
    caprl_vision            *vision;
    caprl_preprocess_config  pp;
    caprl_image_decode_params dp;
    caprl_generate_params    gp;
    const char              *prompt;
    const char              *system;
    caprl_context           *ctx;
    FILE                    *out;
    progress                 prog;
    char                    *text;
    size_t                   text_cap;
} run_ctx;

/* Captions up to `count` decoded images; writes their records. Returns an exit code. */
static int caption_batch(run_ctx *r, item **its, caprl_image *imgs, int32_t count) {
    caprl_vl_request *reqs = calloc((size_t)count, sizeof *reqs);
    int32_t           ns = count * r->gp.n_samples;
    collector         col = {r->gp.n_samples, calloc((size_t)ns, sizeof(int32_t *)), calloc((size_t)ns, sizeof(int32_t)),
                             r->gp.max_new_tokens};
    int32_t          *finish = calloc((size_t)ns, sizeof(int32_t));
    for (int32_t i = 0; i < ns; i++) {
        col.tokens[i] = malloc((size_t)r->gp.max_new_tokens * sizeof(int32_t));
    }
    for (int32_t i = 0; i < count; i++) {
        reqs[i].image = &imgs[i];
        reqs[i].prompt = r->prompt;
        reqs[i].system = r->system;
        reqs[i].stream_id = (uint64_t)its[i]->index;
    }
    caprl_error  err = {0};
    caprl_status st = caprl_vl_generate(r->model, r->vision, &r->pp, reqs, count, &r->gp, &r->ctx, collect_token, &col,
                                        finish, NULL, &err);
    int rc = 0;
    const caprl_tokenizer *tok = caprl_model_tokenizer(r->model);
    for (int32_t i = 0; i < count && rc == 0; i++) {
        json_t *rec = base_record(its[i]);
        if (st != CAPRL_OK) {
            json_object_set_new(rec, "error", json_string(err.msg));
            r->prog.failed++;
        } else {
            json_t *caps = json_array(), *ntok = json_array(), *fin = json_array();
            for (int32_t k = 0; k < r->gp.n_samples; k++) {
                int32_t s = i * r->gp.n_samples + k;
                size_t  len = 0;
                int32_t n_text = col.n[s] - (finish[s] == CAPRL_FINISH_EOS ? 1 : 0);
                while (caprl_tokenizer_decode(tok, col.tokens[s], n_text, true, r->text, r->text_cap, &len, &err) ==
                           CAPRL_OK &&
                       len >= r->text_cap) {
                    r->text_cap = 2 * len + 64;
                    r->text = realloc(r->text, r->text_cap);
                }
                json_array_append_new(caps, json_stringn(r->text, len));
                json_array_append_new(ntok, json_integer(n_text));
                json_array_append_new(fin, json_string(finish_str(finish[s])));
            }
            json_object_set_new(rec, "captions", caps);
            json_object_set_new(rec, "tokens", ntok);
            json_object_set_new(rec, "finish", fin);
        }
        rc = write_record(r->out, rec);
        r->prog.done++;
    }
    for (int32_t i = 0; i < ns; i++) {
        free(col.tokens[i]);
    }
    free(col.tokens);
    free(col.n);
    free(finish);
    free(reqs);
    /* a whole-batch failure is recorded per image; only errors of the model itself (memory) stop the run */
    if (st == CAPRL_ERR_OOM || st == CAPRL_ERR_BACKEND) {
        return tool_fail("caption", st, err.msg);
    }
    return rc;
}

int cmd_caption(int argc, char **argv) {
    static const cmd_info info = {
        "caption",
        "caprl caption --model DIR --images LIST --out captions.jsonl [--prompt TEXT] [-n N] [--batch B] [--shard i/k]",
        "Caption images with a Qwen2.5-VL checkpoint; one JSON line per image, appended and flushed as it finishes.",
        "LIST is a directory (its .jpg/.jpeg/.png/.webp files, sorted), a text file of paths, or JSON Lines with an\n"
        "\"image\" field (other fields are copied to the output); relative paths are relative to LIST's folder.\n"
        "Output: {\"image\", \"captions\": [...], \"tokens\": [...], \"finish\": [...], ...} or {\"image\", \"error\"} for an\n"
        "image that could not be read. Rerunning the same command resumes: images already in the output are skipped\n"
        "and a torn last line from a killed run is removed. --shard i/k takes every k-th image starting at i, so k\n"
        "processes can split one list. Sample k of image i uses random stream i*n+k: results do not depend on\n"
        "batching, sharding or resuming."};
    const char *model_dir = NULL, *list = NULL, *out_path = NULL, *shard = NULL, *alpha = "white";
    const char *prompt = "Please describe this image in detail.", *system = NULL;
    int32_t     n = 4, batch = 1, max_new = 2048, threads = 0, top_k = 0;
    float       temperature = 1.0f, top_p = 1.0f, rep = 1.0f;
    int64_t     seed = 0;
    opt_spec    specs[] = {
        {"model", OPT_STRING, &model_dir, "Qwen2.5-VL checkpoint directory", 0, 0, "DIR", 0},
        {"images", OPT_STRING, &list, "directory, text file of paths, or JSONL with \"image\"", 0, 0, "LIST", 0},
        {"out", OPT_STRING, &out_path, "output JSON Lines (appended; resumed when it exists)", 0, 0, "FILE", 0},
        {"prompt", OPT_STRING, &prompt, "instruction after the image", 0, 0, "TEXT", 0},
        {"system", OPT_STRING, &system, "system prompt (default: Qwen2.5-VL's; \"\" for none)", 0, 0, "TEXT", 0},
        {"samples", OPT_INT, &n, "captions per image", 1, 1024, "N", 'n'},
        {"temperature", OPT_FLOAT, &temperature, "sampling temperature (0 = greedy)", 0, 100, "T", 0},
        {"top-p", OPT_FLOAT, &top_p, "nucleus mass in (0, 1]", 1e-6, 1, "P", 0},
        {"top-k", OPT_INT, &top_k, "top-k (0 = off)", 0, 1 << 30, "K", 0},
        {"repetition-penalty", OPT_FLOAT, &rep, "repetition penalty (1 = off)", 1e-6, 100, "R", 0},
        {"max-new-tokens", OPT_INT, &max_new, "caption length limit in tokens", 1, 1 << 20, "M", 0},
        {"batch", OPT_INT, &batch, "images per batched generation", 1, 4096, "B", 0},
        {"shard", OPT_STRING, &shard, "process images i, i+k, i+2k, ... of the list", 0, 0, "i/k", 0},
        {"alpha", OPT_STRING, &alpha, "transparent images: white (qwen-vl-utils) or drop (HF processor)", 0, 0, "M", 0},
        {"seed", OPT_I64, &seed, "random seed", 0, 9.2e18, "S", 0},
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!model_dir || !list || !out_path) {
        return tool_usage_error(info.name, "--model, --images and --out are required");
    }
    long shard_i = 0, shard_k = 1;
    if (shard) {
        char *end = NULL;
        shard_i = strtol(shard, &end, 10);
        if (!end || *end != '/' || (shard_k = strtol(end + 1, &end, 10)) < 1 || *end || shard_i < 0 ||
            shard_i >= shard_k) {
            return tool_usage_error(info.name, "--shard expects i/k with 0 <= i < k, got '%s'", shard);
        }
    }
    run_ctx r;
    memset(&r, 0, sizeof r);
    r.dp = caprl_image_decode_default_params();
    if (strcmp(alpha, "white") == 0) {
        r.dp.alpha = CAPRL_ALPHA_WHITE;
    } else if (strcmp(alpha, "drop") == 0) {
        r.dp.alpha = CAPRL_ALPHA_DROP;
    } else {
        return tool_usage_error(info.name, "--alpha must be white or drop, got '%s'", alpha);
    }
    item_list items = {0};
    rc = is_directory(list) ? list_dir(list, &items) : list_file(list, &items);
    char **done = NULL;
    size_t n_done = 0;
    if (rc == 0) {
        rc = load_done(out_path, &done, &n_done);
    }
    /* this shard's pending images */
    item  **todo = NULL;
    int64_t n_todo = 0;
    for (int64_t i = 0; rc == 0 && i < items.n; i++) {
        if (i % shard_k == shard_i && !is_done(done, n_done, items.items[i].image)) {
            todo = realloc(todo, (size_t)(n_todo + 1) * sizeof *todo);
            todo[n_todo++] = &items.items[i];
        }
    }
    if (rc == 0) {
        fprintf(stderr, "caprl caption: %lld images in the list, %zu already in %s, %lld to caption%s\n",
                (long long)items.n, n_done, out_path, (long long)n_todo, shard ? " in this shard" : "");
    }
    caprl_error err = {0};
    caprl_status st = CAPRL_OK;
    if (rc == 0 && n_todo > 0) {
        if ((rc = tool_load_model(info.name, model_dir, threads, &r.model)) == 0) {
            st = caprl_vision_load(&r.vision, model_dir, threads, &err);
            char pp_path[4096];
            snprintf(pp_path, sizeof pp_path, "%s/preprocessor_config.json", model_dir);
            r.pp = caprl_preprocess_config_default();
            if (st == CAPRL_OK && access(pp_path, F_OK) == 0) {
                st = caprl_preprocess_config_load(&r.pp, pp_path, &err);
            }
            if (st != CAPRL_OK) {
                rc = tool_fail(info.name, st, err.msg);
            }
        }
    }
    if (rc == 0 && n_todo > 0) {
        r.out = fopen(out_path, "ab");
        if (!r.out) {
            fprintf(stderr, "caprl caption: error: %s: cannot open for appending: %s\n", out_path, strerror(errno));
            rc = EXIT_DATA;
        }
    }
    if (rc == 0 && n_todo > 0) {
        r.prompt = prompt;
        r.system = system;
        r.gp = caprl_generate_default_params();
        r.gp.n_samples = n;
        r.gp.max_new_tokens = max_new;
        r.gp.sampling.do_sample = temperature > 0.0f;
        r.gp.sampling.temperature = temperature > 0.0f ? temperature : 1.0f;
        r.gp.sampling.top_p = top_p;
        r.gp.sampling.top_k = top_k;
        r.gp.sampling.repetition_penalty = rep;
        r.gp.sampling.seed = (uint64_t)seed;
        r.prog.total = n_todo;
        r.prog.t0 = tool_now();
        r.prog.tty = isatty(fileno(stderr));
        caprl_image *imgs = calloc((size_t)batch, sizeof *imgs);
        item       **its = calloc((size_t)batch, sizeof *its);
        for (int64_t next = 0; next < n_todo && rc == 0;) {
            int32_t count = 0;
            while (next < n_todo && count < batch) {
                item *it = todo[next++];
                st = caprl_image_decode_file(it->path, &r.dp, &imgs[count], &err);
                int32_t rh = 0, rw = 0;
                if (st == CAPRL_OK) { /* size problems (tiny, extreme aspect) stay with their image, not the batch */
                    st = caprl_image_preprocess_size(imgs[count].width, imgs[count].height, &r.pp, &rh, &rw, &err);
                    if (st != CAPRL_OK) {
                        caprl_image_free(&imgs[count]);
                    }
                }
                if (st != CAPRL_OK) { /* recorded and skipped: one bad file never stops a batch job */
                    json_t *rec = base_record(it);
                    json_object_set_new(rec, "error", json_string(err.msg));
                    rc = write_record(r.out, rec);
                    r.prog.done++;
                    r.prog.failed++;
                    if (rc) {
                        break;
                    }
                    continue;
                }
                its[count++] = it;
            }
            if (count > 0 && rc == 0) {
                rc = caption_batch(&r, its, imgs, count);
            }
            for (int32_t i = 0; i < count; i++) {
                caprl_image_free(&imgs[i]);
            }
            show_progress(&r.prog, false);
        }
        show_progress(&r.prog, true);
        free(imgs);
        free(its);
    }
    if (r.out && fclose(r.out) != 0 && rc == 0) {
        rc = EXIT_DATA;
    }
    caprl_context_free(r.ctx);
    caprl_vision_free(r.vision);
    caprl_model_free(r.model);
    free(r.text);
    for (size_t i = 0; i < n_done; i++) {
        free(done[i]);
    }
    free(done);
    free(todo);
    list_free(&items);
    return rc;
}
