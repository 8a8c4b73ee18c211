/* caprl_synth_write: the synthetic world's files (docs/formats.md, "Synthetic world").
 *
 * Two passes over the images. The first draws and PNG-encodes a chunk of images on the pool (each image depends
 * only on its own random streams, so the bytes do not depend on the thread count) and writes them in order. The
 * second builds every text file in one sweep over the images, streaming each through an atomic writer.
 * synth.json, the manifest, goes first (removed) and last (written): its presence means the directory is complete.
 *
 * Every file appears by rename, so no reader ever sees a partial one. The text files are fsync'd one by one; the
 * hundreds of small PNGs are not (one fsync each costs seconds on a busy disk): one syncfs of the output's file
 * system makes them durable before the manifest is written.
 *
 * JSON is written by hand: the strings are our own ASCII text, escaped by json_str below; the tests parse every
 * file back with jansson. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/eval.h"
#include "core/error_impl.h"
#include "core/file_impl.h"
#include "core/pool_impl.h"
#include "data/synth_impl.h"
#include "image/png_write_impl.h"

#define MAX_IMAGES 1000000
#define PNG_LEVEL 6 /* level 9 is 5x slower for 10% smaller files */
#define IMAGE_CHUNK 256
#define FLUSH_BYTES ((size_t)1 << 20)
#define MAX_QUESTIONS 20 /* qa_per_image (16) + leaky_per_image (4) */
#define BIND_PER_IMAGE 24
#define FILTER_BIND_PER_IMAGE 9

static const char k_caption_instruction[] = "Please describe this image in detail.";
/* The instruction of the perception records (sft_describe.jsonl), deliberately not the captioning one: they stand
 * for the vision-language pretraining a real base model had before its short-caption SFT. */
static const char k_describe_instruction[] = "List every object in this image.";

static const char *const k_style_names[] = {"lookup", "statement", "absent"};

const char *caprl_synth_style_name(int32_t style) {
    return style >= 0 && style < (int32_t)(sizeof k_style_names / sizeof *k_style_names) ? k_style_names[style] : "?";
}

int32_t caprl_synth_style_parse(const char *s) {
    for (int32_t k = 0; k < (int32_t)(sizeof k_style_names / sizeof *k_style_names); k++) {
        if (strcmp(s, k_style_names[k]) == 0) {
            return k;
        }
    }
    return -1;
}

caprl_synth_params caprl_synth_default_params(void) {
    caprl_synth_params p;
    memset(&p, 0, sizeof p);
    p.n_train = 512;
    p.n_test = 64;
    p.seed = 0;
    p.size = 84;
    p.min_objects = 2;
    p.max_objects = 6;
    p.leaky_per_image = 1;
    p.qa_per_image = 8;
    p.n_threads = 0;
    return p;
}

caprl_status caprl_synth_params_check(const caprl_synth_params *p, caprl_error *err) {
    if (p->n_train < 0 || p->n_train > MAX_IMAGES) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "train: %d is outside 0..%d", (int)p->n_train, MAX_IMAGES);
    }
    if (p->n_test < 0 || p->n_test > MAX_IMAGES) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "test: %d is outside 0..%d", (int)p->n_test, MAX_IMAGES);
    }
    if (p->size % 28 != 0 || p->size < 56 || p->size > 1120) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "size: %d is not a multiple of 28 in 56..1120 (patch 14 x merge 2; 56 x 56 is the "
                             "processor's minimum)",
                             (int)p->size);
    }
    if (p->min_objects < 1 || p->min_objects > CAPRL_SYNTH_N_CELLS) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "min-objects: %d is outside 1..%d", (int)p->min_objects,
                             CAPRL_SYNTH_N_CELLS);
    }
    if (p->max_objects < p->min_objects || p->max_objects > CAPRL_SYNTH_N_CELLS) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "max-objects: %d is outside min-objects..%d (= %d..%d)",
                             (int)p->max_objects, CAPRL_SYNTH_N_CELLS, (int)p->min_objects, CAPRL_SYNTH_N_CELLS);
    }
    if (p->leaky_per_image < 0 || p->leaky_per_image > 4) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "leaky-per-image: %d is outside 0..4",
                             (int)p->leaky_per_image);
    }
    if (p->qa_per_image < 1 || p->qa_per_image > 16) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "qa-per-image: %d is outside 1..16", (int)p->qa_per_image);
    }
    if (p->question_style < CAPRL_SYNTH_LOOKUP || p->question_style > CAPRL_SYNTH_ABSENT) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "question-style: %d is none of lookup (0), statement (1), "
                             "absent (2)", (int)p->question_style);
    }
    int32_t holes = 0;
    for (const char *c = p->reader_template; c && (c = strstr(c, "{}")) != NULL; c += 2) {
        holes++;
    }
    if (p->reader_template && holes != 2) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "reader-template: needs exactly two {} (caption, then question), found %d", (int)holes);
    }
    return CAPRL_OK;
}

/* ---- output buffers --------------------------------------------------------------------------------------- */

typedef struct sbuf {
    char  *p;
    size_t len, cap;
} sbuf;

static void sb_put(sbuf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (b->len + n + 1 > cap) {
            cap *= 2;
        }
        b->p = caprl_xrealloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_puts(sbuf *b, const char *s) {
    sb_put(b, s, strlen(s));
}

static void sb_printf(sbuf *b, const char *fmt, ...) CAPRL_PRINTF(2, 3);
static void sb_printf(sbuf *b, const char *fmt, ...) {
    char    tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    CAPRL_ASSERT(n >= 0 && (size_t)n < sizeof tmp);
    sb_put(b, tmp, (size_t)n);
}

/* A JSON string literal (RFC 8259 escapes; our text is ASCII, other bytes pass through as UTF-8). */
static void json_str(sbuf *b, const char *s) {
    sb_put(b, "\"", 1);
    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        switch (c) {
            case '"': sb_put(b, "\\\"", 2); break;
            case '\\': sb_put(b, "\\\\", 2); break;
            case '\n': sb_put(b, "\\n", 2); break;
            case '\t': sb_put(b, "\\t", 2); break;
            case '\r': sb_put(b, "\\r", 2); break;
            default:
                if (c < 0x20) {
                    sb_printf(b, "\\u%04x", c);
                } else {
                    sb_put(b, (const char *)&c, 1);
                }
        }
    }
    sb_put(b, "\"", 1);
}

/* ---- files ------------------------------------------------------------------------------------------------ */

enum {
    F_SCENES = 0,
    F_TRAIN,
    F_TEST_QA,
    F_LEAKY,
    F_DENSE,
    F_SHORT,
    F_SFT_CAPTIONER,
    F_SFT_READER,
    F_BENCH,
    F_CORPUS,
    F_SFT_FILTER,
    F_TRAIN_VALID,
    F_SFT_READER_BIND,
    F_SFT_DESCRIBE,
    F_SFT_FILTER_BIND,
    F_SFT_FILTER_KEYED,
    N_FILES
};

static const char *const k_file_names[N_FILES] = {
    "scenes.jsonl",        "train.jsonl",       "test_qa.jsonl",      "leaky_ids.json", "captions_dense.jsonl",
    "captions_short.jsonl", "sft_captioner.jsonl", "sft_reader.jsonl", "bench.jsonl",    "corpus.txt",
    "sft_filter.jsonl", "train_valid.jsonl", "sft_reader_bind.jsonl", "sft_describe.jsonl", "sft_filter_bind.jsonl",
    "sft_filter_keyed.jsonl",
};

typedef struct out_file {
    caprl_atomic_file af;
    sbuf              b;
    bool              open;
} out_file;

typedef struct writer {
    const caprl_synth_params *p;
    const char               *dir;
    out_file                  f[N_FILES];
    caprl_synth_summary       sum;
    int64_t                   n_leaky_listed; /* entries written to leaky_ids.json so far */
} writer;

static caprl_status flush_file(writer *w, int32_t k, bool force, caprl_error *err) {
    out_file *f = &w->f[k];
    if (f->b.len == 0 || (!force && f->b.len < FLUSH_BYTES)) {
        return CAPRL_OK;
    }
    CAPRL_TRY(caprl_atomic_write(&f->af, f->b.p, f->b.len, err));
    w->sum.bytes_written += (int64_t)f->b.len;
    f->b.len = 0;
    return CAPRL_OK;
}

static caprl_status open_files(writer *w, caprl_error *err) {
    for (int32_t k = 0; k < N_FILES; k++) {
        char        *path = caprl_path_join(w->dir, k_file_names[k]);
        caprl_status st = caprl_atomic_open(&w->f[k].af, path, err);
        free(path);
        CAPRL_TRY(st);
        w->f[k].open = true;
    }
    return CAPRL_OK;
}

static caprl_status commit_files(writer *w, caprl_error *err) {
    for (int32_t k = 0; k < N_FILES; k++) {
        CAPRL_TRY(flush_file(w, k, true, err));
        w->f[k].open = false;
        CAPRL_TRY(caprl_atomic_commit(&w->f[k].af, err));
    }
    return CAPRL_OK;
}

static void close_files(writer *w) {
    for (int32_t k = 0; k < N_FILES; k++) {
        if (w->f[k].open) {
            caprl_atomic_abort(&w->f[k].af);
        }
        free(w->f[k].b.p);
    }
}

static caprl_status write_whole(writer *w, const char *path, const void *data, size_t n, caprl_error *err) {
    caprl_atomic_file af;
    CAPRL_TRY(caprl_atomic_open(&af, path, err));
    caprl_status st = caprl_atomic_write(&af, data, n, err);
    if (st != CAPRL_OK) {
        caprl_atomic_abort(&af);
        return st;
    }
    CAPRL_TRY(caprl_atomic_commit(&af, err));
    w->sum.bytes_written += (int64_t)n;
    return CAPRL_OK;
}

static const char *split_name(int32_t split) {
    return split == CAPRL_SYNTH_SPLIT_TRAIN ? "train" : "test";
}

static void image_id(char *buf, size_t cap, int32_t split, int64_t i) {
    snprintf(buf, cap, "%s-%05lld", split_name(split), (long long)i);
}

static void image_rel(char *buf, size_t cap, int32_t split, int64_t i) {
    snprintf(buf, cap, "images/%s/%05lld.png", split_name(split), (long long)i);
}

/* tmp file + rename without fsync (see the file comment). */
static caprl_status write_unsynced(writer *w, const char *path, const void *data, size_t n, caprl_error *err) {
    char *tmp = caprl_xasprintf("%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        caprl_status st = caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
        free(tmp);
        return st;
    }
    bool ok = fwrite(data, 1, n, f) == n;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        caprl_status st = caprl_err_set(err, CAPRL_ERR_IO, "%s: write failed: %s", path, strerror(errno));
        (void)unlink(tmp);
        free(tmp);
        return st;
    }
    free(tmp);
    w->sum.bytes_written += (int64_t)n;
    return CAPRL_OK;
}

/* Makes everything written so far under dir durable. */
static caprl_status sync_dir_fs(const char *dir, caprl_error *err) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot open: %s", dir, strerror(errno));
    }
#if defined(__linux__)
    int rc = syncfs(fd);
#else
    sync();
    int rc = 0;
#endif
    int e = errno;
    close(fd);
    if (rc != 0) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: sync failed: %s", dir, strerror(e));
    }
    return CAPRL_OK;
}

/* ---- images ----------------------------------------------------------------------------------------------- */

typedef struct draw_job {
    const caprl_synth_params *p;
    int32_t                   split;
    int64_t                   first;    /* image index of slot 0 */
    uint8_t                 **png;      /* (chunk) encoded files */
    size_t                   *png_size; /* (chunk) */
    caprl_status             *st;       /* (chunk) */
} draw_job;

static void draw_range(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    draw_job *j = ctx;
    size_t    n_bytes = (size_t)j->p->size * (size_t)j->p->size * 3;
    uint8_t  *px = caprl_try_malloc(n_bytes);
    for (int64_t i = i0; i < i1; i++) {
        if (!px) {
            j->st[i] = CAPRL_ERR_OOM;
            continue;
        }
        caprl_synth_scene s;
        caprl_synth_scene_make(&s, j->p->seed, j->split, j->first + i, j->p->min_objects, j->p->max_objects);
        caprl_synth_render(&s, j->p->size, px);
        j->st[i] = caprl_png_encode_rgb8(px, j->p->size, j->p->size, PNG_LEVEL, &j->png[i], &j->png_size[i], NULL);
    }
    free(px);
}

static caprl_status write_images(writer *w, caprl_pool *pool, int32_t split, int64_t n, caprl_error *err) {
    char *sub = caprl_xasprintf("%s/images/%s", w->dir, split_name(split));
    caprl_status st = caprl_mkdir_p(sub, err);
    free(sub);
    CAPRL_TRY(st);
    uint8_t     *png[IMAGE_CHUNK];
    size_t       png_size[IMAGE_CHUNK];
    caprl_status pst[IMAGE_CHUNK];
    for (int64_t first = 0; first < n && st == CAPRL_OK; first += IMAGE_CHUNK) {
        int64_t m = n - first < IMAGE_CHUNK ? n - first : IMAGE_CHUNK;
        memset(png, 0, sizeof png);
        draw_job job = {w->p, split, first, png, png_size, pst};
        caprl_parallel_for(pool, m, draw_range, &job);
        for (int64_t i = 0; i < m; i++) {
            char rel[64];
            image_rel(rel, sizeof rel, split, first + i);
            if (st == CAPRL_OK && pst[i] != CAPRL_OK) {
                st = caprl_err_set(err, pst[i], "%s/%s: cannot draw the image: %s", w->dir, rel,
                                   caprl_status_str(pst[i]));
            }
            if (st == CAPRL_OK) {
                char *path = caprl_path_join(w->dir, rel);
                st = write_unsynced(w, path, png[i], png_size[i], err);
                free(path);
            }
            free(png[i]);
        }
    }
    return st;
}

/* ---- text ------------------------------------------------------------------------------------------------- */

/* Fixed texts first: prompts and the answer forms, which no per-image text contains. */
static void corpus_header(sbuf *b, const char *reader_template) {
    char *tpl = caprl_synth_reader_prompt(reader_template, "{}", "{}");
    sb_puts(b, k_caption_instruction);
    sb_puts(b, "\nPlease describe this image in detail\n");
    sb_puts(b, tpl);
    sb_puts(b, "\n   - F) Can not answer based on the caption\n");
    /* the reward reads the answer as one of the tokens " A" ... " I": each must occur twice for BPE to merge it */
    for (int rep = 0; rep < 2; rep++) {
        for (char c = 'A'; c <= 'I'; c++) {
            sb_printf(b, "The answer is %c.\n", c);
        }
    }
    sb_puts(b, "<|im_start|>user\nHere is a detailed caption of an image: . Please answer the question based on the "
               "caption.\n");
    free(tpl);
}

static void put_qa_record(sbuf *b, const char *id, const char *image, const caprl_synth_question *q, int32_t n,
                          bool with_leaky) {
    sb_puts(b, "{\"id\": ");
    json_str(b, id);
    sb_puts(b, ", \"image\": ");
    json_str(b, image);
    sb_puts(b, ", \"qa\": [");
    bool first = true;
    for (int32_t k = 0; k < n; k++) {
        if (q[k].leaky && !with_leaky) {
            continue;
        }
        char *qs = caprl_synth_question_string(&q[k], NULL, false);
        sb_puts(b, first ? "{\"question\": " : ", {\"question\": ");
        json_str(b, qs);
        sb_printf(b, ", \"answer\": \"%c\"}", 'A' + q[k].gold);
        free(qs);
        first = false;
    }
    sb_puts(b, "]}\n");
}

static void put_caption(sbuf *b, const char *id, const char *image, const char *caption) {
    sb_puts(b, "{\"id\": ");
    json_str(b, id);
    sb_puts(b, ", \"image\": ");
    json_str(b, image);
    sb_puts(b, ", \"caption\": ");
    json_str(b, caption);
    sb_puts(b, "}\n");
}

/* A one-turn SFT record with the image: the instruction, answered with `answer`. */
static void put_image_chat(sbuf *b, const char *id, const char *image, const char *instruction, const char *answer) {
    sb_puts(b, "{\"id\": ");
    json_str(b, id);
    sb_puts(b, ", \"image\": ");
    json_str(b, image);
    sb_puts(b, ", \"messages\": [{\"role\": \"user\", \"content\": ");
    json_str(b, instruction);
    sb_puts(b, "}, {\"role\": \"assistant\", \"content\": ");
    json_str(b, answer);
    sb_puts(b, "}]}\n");
}

static void put_scene(sbuf *b, const char *id, const char *image, int32_t split, const caprl_synth_scene *s) {
    sb_puts(b, "{\"id\": ");
    json_str(b, id);
    sb_puts(b, ", \"image\": ");
    json_str(b, image);
    sb_printf(b, ", \"split\": \"%s\", \"objects\": [", split_name(split));
    for (int32_t i = 0; i < s->n; i++) {
        const caprl_synth_object *o = &s->obj[i];
        sb_printf(b, "%s{\"shape\": \"%s\", \"color\": \"%s\", \"size\": \"%s\", \"position\": \"%s\"}",
                  i ? ", " : "", caprl_synth_shape_name(o->shape), caprl_synth_color_name(o->color),
                  caprl_synth_size_name(o->size), caprl_synth_cell_name(o->cell));
    }
    sb_puts(b, "]}\n");
}

/* order = 0..3 uniformly shuffled: order[i] is the option shown at letter 'A' + i. */
static void shuffle_options(caprl_rng *r, int32_t order[CAPRL_SYNTH_N_OPTIONS]) {
    for (int32_t i = 0; i < CAPRL_SYNTH_N_OPTIONS; i++) {
        order[i] = i;
    }
    for (int32_t i = CAPRL_SYNTH_N_OPTIONS - 1; i > 0; i--) {
        int32_t j = (int32_t)caprl_rng_below(r, (uint64_t)(i + 1));
        int32_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

/* The reader's SFT records of one training image: each valid question once, with the dense, the short or a
 * partial caption (a random proper subset of the objects), its options reshuffled and F appended as the reward
 * presents them; the target is the gold letter when the caption states the answer, F otherwise. */
static void put_reader_records(writer *w, int64_t index, const char *id, const caprl_synth_scene *s,
                               const caprl_synth_question *q, int32_t n_q, uint32_t short_listed) {
    static const char *const kinds[3] = {"dense", "short", "partial"};
    sbuf     *b = &w->f[F_SFT_READER].b;
    caprl_rng r;
    caprl_synth_rng(&r, w->p->seed, CAPRL_SYNTH_SPLIT_TRAIN, index, CAPRL_SYNTH_PURPOSE_READER);
    uint32_t all = (1u << s->n) - 1u;
    for (int32_t k = 0; k < n_q; k++) {
        if (q[k].leaky) {
            continue;
        }
        int32_t  kind = (int32_t)caprl_rng_below(&r, 3);
        uint32_t listed = kind == 0 ? all : short_listed;
        if (kind == 2 && s->n >= 2) {
            listed = caprl_synth_subset(&r, s->n, 1 + (int32_t)caprl_rng_below(&r, (uint64_t)(s->n - 1)));
        }
        int32_t order[CAPRL_SYNTH_N_OPTIONS];
        shuffle_options(&r, order);
        char letter = 'F';
        if (caprl_synth_answerable(&q[k], listed, kind == 0)) {
            for (int32_t i = 0; i < CAPRL_SYNTH_N_OPTIONS; i++) {
                if (order[i] == q[k].gold) {
                    letter = (char)('A' + i);
                }
            }
        } else {
            w->sum.n_reader_cannot++;
        }
        char *caption = caprl_synth_caption(s, listed, kind == 0);
        char *qs = caprl_synth_question_string(&q[k], order, true);
        char *prompt = caprl_synth_reader_prompt(w->p->reader_template, caption, qs);
        sb_puts(b, "{\"id\": ");
        sb_printf(b, "\"%s-r%d\", \"kind\": \"%s\", \"prompt\": ", id, (int)k, kinds[kind]);
        json_str(b, prompt);
        sb_printf(b, ", \"completion\": \" %c.\"}\n", letter);
        free(prompt);
        /* the same caption and question as `caprl eval prism` stage 2 asks it of a simple-JSONL benchmark: the
         * benchmark has no "cannot answer" option, so a caption without the fact gets a guess */
        char *bq = caprl_synth_question_bench(&q[k], order);
        char *cap_part = caprl_xasprintf("%s%s%s", CAPRL_PRISM_CAPTION_PREFIX, caption, CAPRL_PRISM_CAPTION_SUFFIX);
        char *pprompt = caprl_xasprintf("%s%s%s", cap_part, bq, CAPRL_PRISM_SIMPLE_PROMPT_TAIL);
        char  guess = letter == 'F' ? (char)('A' + caprl_rng_below(&r, CAPRL_SYNTH_N_OPTIONS)) : letter;
        sb_printf(b, "{\"id\": \"%s-p%d\", \"kind\": \"prism-%s\", \"prompt\": ", id, (int)k, kinds[kind]);
        json_str(b, pprompt);
        /* the released scoring reads the box after </think>; the answer ends the turn (generation stops there) */
        sb_printf(b, ", \"completion\": \"<think></think><answer>\\\\boxed{%c}</answer><|im_end|>\"}\n", guess);
        free(pprompt);
        free(cap_part);
        free(bq);
        /* the answer in words, without options: the skill of finding the fact in the caption, learnt apart
         * from choosing its letter (questions that name their options, "which of these", have no such form) */
        bool names_options = q[k].type == CAPRL_SYNTH_Q_SIZE || q[k].type == CAPRL_SYNTH_Q_EXISTS ||
                             q[k].type == CAPRL_SYNTH_Q_NOT_EXISTS || q[k].type == CAPRL_SYNTH_Q_STATEMENT;
        if (letter != 'F' && !names_options) {
            char *fprompt = caprl_synth_reader_prompt(w->p->reader_template, caption, q[k].text);
            sb_printf(b, "{\"id\": \"%s-a%d\", \"kind\": \"free-%s\", \"prompt\": ", id, (int)k, kinds[kind]);
            json_str(b, fprompt);
            char *answer = caprl_xasprintf(" %s.", q[k].options[q[k].gold]);
            sb_puts(b, ", \"completion\": ");
            json_str(b, answer);
            sb_puts(b, "}\n");
            free(answer);
            free(fprompt);
            w->sum.n_reader_free++;
        }
        free(qs);
        free(caption);
        w->sum.n_reader_records++;
    }
}

/* One option of a binding record: a colour, a shape, a position, a count or an object, as options read. */
static void bind_option(caprl_rng *r, char *out, size_t cap) {
    int32_t color = (int32_t)caprl_rng_below(r, CAPRL_SYNTH_N_COLORS);
    int32_t shape = (int32_t)caprl_rng_below(r, CAPRL_SYNTH_N_SHAPES);
    switch (caprl_rng_below(r, 6)) {
    case 0: snprintf(out, cap, "%s", caprl_synth_color_name(color)); break;
    case 1: snprintf(out, cap, "%s", caprl_synth_shape_name(shape)); break;
    case 2: snprintf(out, cap, "%s", caprl_synth_cell_name((int32_t)caprl_rng_below(r, CAPRL_SYNTH_N_CELLS))); break;
    case 3: snprintf(out, cap, "%d", (int)caprl_rng_below(r, 10)); break;
    case 4: snprintf(out, cap, "the %s %s", caprl_synth_color_name(color), caprl_synth_shape_name(shape)); break;
    default: snprintf(out, cap, "a %s %s", caprl_synth_color_name(color), caprl_synth_shape_name(shape)); break;
    }
}

/* Four distinct binding options, appended to listing as the question lists them ("\n   - A) ..."), and the gold
 * one: its text into gold_text, its letter returned. */
static char bind_draw(caprl_rng *r, sbuf *listing, char gold_text[CAPRL_SYNTH_OPTION_CAP]) {
    char options[CAPRL_SYNTH_N_OPTIONS][CAPRL_SYNTH_OPTION_CAP];
    for (int32_t i = 0; i < CAPRL_SYNTH_N_OPTIONS; i++) {
        bool distinct;
        do {
            bind_option(r, options[i], CAPRL_SYNTH_OPTION_CAP);
            distinct = true;
            for (int32_t j = 0; j < i; j++) {
                distinct = distinct && strcmp(options[i], options[j]) != 0;
            }
        } while (!distinct);
        sb_printf(listing, "\n   - %c) %s", 'A' + i, options[i]);
    }
    int32_t gold = (int32_t)caprl_rng_below(r, CAPRL_SYNTH_N_OPTIONS);
    memcpy(gold_text, options[gold], CAPRL_SYNTH_OPTION_CAP);
    return (char)('A' + gold);
}

/* The reader's letter-binding records of one training image (sft_reader_bind.jsonl): the caption is one option's
 * text, the question has no words, and the target is that option's letter. A small reader trained from scratch
 * on the full reader records stays at chance on the letter; this first stage teaches it to find the option that
 * matches and answer with its letter, before it has to find the fact in a caption. */
static void put_bind_records(writer *w, int64_t index, const char *id) {
    sbuf     *b = &w->f[F_SFT_READER_BIND].b;
    caprl_rng r;
    caprl_synth_rng(&r, w->p->seed, CAPRL_SYNTH_SPLIT_TRAIN, index, CAPRL_SYNTH_PURPOSE_BIND);
    for (int32_t k = 0; k < BIND_PER_IMAGE; k++) {
        char gold_text[CAPRL_SYNTH_OPTION_CAP];
        sbuf question = {0};
        sb_puts(&question, "?");
        char  letter = bind_draw(&r, &question, gold_text);
        char *caption = caprl_xasprintf("%s.", gold_text);
        char *prompt = caprl_synth_reader_prompt(w->p->reader_template, caption, question.p);
        sb_printf(b, "{\"id\": \"%s-b%d\", \"prompt\": ", id, (int)k);
        json_str(b, prompt);
        sb_printf(b, ", \"completion\": \" %c.\"}\n", letter);
        free(prompt);
        free(caption);
        free(question.p);
        w->sum.n_reader_bind++;
    }
}

/* The same binding in the curation model's form (sft_filter_bind.jsonl, text only): "Which of these is <option>?"
 * with the options as `caprl qa filter` lists them, "E) None of the above" in half of them, answered with the
 * letter. The curation model's decoder loses the binding while it learns to see (sft_describe.jsonl); these
 * records, mixed into its training, keep it. */
static void put_filter_bind_records(writer *w, int64_t index, const char *id) {
    sbuf     *b = &w->f[F_SFT_FILTER_BIND].b;
    caprl_rng r;
    caprl_synth_rng(&r, w->p->seed, CAPRL_SYNTH_SPLIT_TRAIN, index, CAPRL_SYNTH_PURPOSE_FILTER_BIND);
    for (int32_t k = 0; k < FILTER_BIND_PER_IMAGE; k++) {
        char gold_text[CAPRL_SYNTH_OPTION_CAP];
        sbuf listing = {0}, user = {0};
        char letter = bind_draw(&r, &listing, gold_text);
        sb_printf(&user, "Which of these is %s?%s%s. Answer the question with only the correct letter", gold_text,
                  listing.p, caprl_rng_below(&r, 2) ? "\n   - E) None of the above" : "");
        sb_printf(b, "{\"id\": \"%s-g%d\", \"messages\": [{\"role\": \"user\", \"content\": ", id, (int)k);
        json_str(b, user.p);
        sb_printf(b, "}, {\"role\": \"assistant\", \"content\": \"%c\"}]}\n", letter);
        free(listing.p);
        free(user.p);
        w->sum.n_filter_bind++;
    }
}

/* One record of sft_filter_keyed.jsonl: the question about the image, answered with `answer`. */
static void put_keyed_record(writer *w, const char *id, int32_t *n_image, const char *image, const char *question,
                             const char *answer) {
    sbuf *b = &w->f[F_SFT_FILTER_KEYED].b;
    sb_printf(b, "{\"id\": \"%s-k%d\", \"image\": ", id, (int)(*n_image)++);
    json_str(b, image);
    sb_puts(b, ", \"messages\": [{\"role\": \"user\", \"content\": ");
    json_str(b, question);
    sb_puts(b, "}, {\"role\": \"assistant\", \"content\": ");
    json_str(b, answer);
    sb_puts(b, "}]}\n");
    w->sum.n_filter_keyed++;
}

/* A keyed lookup twice: answered in words, then as `caprl qa filter` asks it, over the four `options` (the gold
 * first) shuffled plus "E) None of the above", answered with the letter. */
static void put_keyed_pair(writer *w, caprl_rng *r, const char *id, int32_t *n_image, const char *image,
                           const char *question, const char *const options[CAPRL_SYNTH_N_OPTIONS]) {
    int32_t order[CAPRL_SYNTH_N_OPTIONS];
    shuffle_options(r, order);
    sbuf user = {0};
    char letter[2] = {0, 0};
    sb_puts(&user, question);
    for (int32_t i = 0; i < CAPRL_SYNTH_N_OPTIONS; i++) {
        sb_printf(&user, "\n   - %c) %s", 'A' + i, options[order[i]]);
        letter[0] = order[i] == 0 ? (char)('A' + i) : letter[0];
    }
    sb_puts(&user, "\n   - E) None of the above. Answer the question with only the correct letter");
    put_keyed_record(w, id, n_image, image, question, options[0]);
    put_keyed_record(w, id, n_image, image, user.p, letter);
    free(user.p);
}

/* The curation model's keyed lookups of one training image (sft_filter_keyed.jsonl): for an object whose colour is
 * unique in the scene, "What shape is the red object?"; for one whose shape is unique, "What color is the circle?".
 * The questions of the absent style can be answered by spotting which option's value is in the image at all; these
 * make the model find the object the question names and read another of its attributes, which the shape questions
 * and the counts of a shape need. */
static void put_filter_keyed_records(writer *w, int64_t index, const char *id, const char *image,
                                     const caprl_synth_scene *s) {
    caprl_rng r;
    caprl_synth_rng(&r, w->p->seed, CAPRL_SYNTH_SPLIT_TRAIN, index, CAPRL_SYNTH_PURPOSE_FILTER_KEYED);
    int32_t n_image = 0;
    for (int32_t k = 0; k < s->n; k++) {
        const caprl_synth_object *o = &s->obj[k];
        int32_t                   same_color = 0, same_shape = 0;
        for (int32_t j = 0; j < s->n; j++) {
            same_color += s->obj[j].color == o->color;
            same_shape += s->obj[j].shape == o->shape;
        }
        char question[96];
        if (same_color == 1) {
            const char *shapes[CAPRL_SYNTH_N_SHAPES];
            for (int32_t i = 0; i < CAPRL_SYNTH_N_SHAPES; i++) {
                shapes[i] = caprl_synth_shape_name((o->shape + i) % CAPRL_SYNTH_N_SHAPES);
            }
            snprintf(question, sizeof question, "What shape is the %s object?", caprl_synth_color_name(o->color));
            put_keyed_pair(w, &r, id, &n_image, image, question, shapes);
        }
        if (same_shape == 1) {
            const char *colors[CAPRL_SYNTH_N_OPTIONS];
            colors[0] = caprl_synth_color_name(o->color);
            uint32_t others = caprl_synth_subset(&r, CAPRL_SYNTH_N_COLORS - 1, CAPRL_SYNTH_N_OPTIONS - 1);
            for (int32_t i = 0, n = 1; i < CAPRL_SYNTH_N_COLORS - 1; i++) {
                if (others & (1u << i)) {
                    colors[n++] = caprl_synth_color_name((o->color + 1 + i) % CAPRL_SYNTH_N_COLORS);
                }
            }
            snprintf(question, sizeof question, "What color is the %s?", caprl_synth_shape_name(o->shape));
            put_keyed_pair(w, &r, id, &n_image, image, question, colors);
        }
    }
}

/* The curation model's SFT records of one training image, in the form `caprl qa filter` asks: every question
 * (valid and leaky) once with the image, options shuffled plus "E) None of the above", answered with the gold
 * letter; and once without the image, answered with the gold letter when the wording gives it away (leaky) and
 * "None" otherwise, as a model that knows it cannot see the picture would. */
static void put_filter_records(writer *w, int64_t index, const char *id, const char *image,
                               const caprl_synth_question *q, int32_t n_q) {
    sbuf     *b = &w->f[F_SFT_FILTER].b;
    caprl_rng r;
    caprl_synth_rng(&r, w->p->seed, CAPRL_SYNTH_SPLIT_TRAIN, index, CAPRL_SYNTH_PURPOSE_FILTER);
    for (int32_t k = 0; k < n_q; k++) {
        for (int32_t with_image = 1; with_image >= 0; with_image--) {
            int32_t order[CAPRL_SYNTH_N_OPTIONS];
            shuffle_options(&r, order);
            char letter = 0;
            for (int32_t i = 0; i < CAPRL_SYNTH_N_OPTIONS; i++) {
                letter = order[i] == q[k].gold ? (char)('A' + i) : letter;
            }
            char *qs = caprl_synth_question_string(&q[k], order, false);
            char *user = caprl_xasprintf("%s%s. Answer the question with only the correct letter", qs,
                                         with_image ? "\n   - E) None of the above" : "");
            sb_printf(b, "{\"id\": \"%s-f%d%s\", ", id, (int)k, with_image ? "i" : "t");
            if (with_image) {
                sb_puts(b, "\"image\": ");
                json_str(b, image);
                sb_puts(b, ", ");
            }
            sb_puts(b, "\"messages\": [{\"role\": \"user\", \"content\": ");
            json_str(b, user);
            char answer[8];
            snprintf(answer, sizeof answer, "%c", letter);
            sb_puts(b, "}, {\"role\": \"assistant\", \"content\": ");
            json_str(b, with_image || q[k].leaky ? answer : "None");
            sb_puts(b, "}]}\n");
            free(user);
            free(qs);
        }
    }
}

static void put_leaky_entries(writer *w, const char *id, const caprl_synth_question *q, int32_t n_q) {
    sbuf *b = &w->f[F_LEAKY].b;
    for (int32_t k = 0; k < n_q; k++) {
        if (!q[k].leaky) {
            continue;
        }
        char *qs = caprl_synth_question_string(&q[k], NULL, false);
        sb_puts(b, w->n_leaky_listed ? ",\n  {\"id\": " : "\n  {\"id\": ");
        json_str(b, id);
        sb_printf(b, ", \"index\": %d, \"question\": ", (int)k);
        json_str(b, qs);
        sb_printf(b, ", \"answer\": \"%c\"}", 'A' + q[k].gold);
        free(qs);
        w->n_leaky_listed++;
    }
}

static caprl_status write_text_image(writer *w, int32_t split, int64_t i, caprl_error *err) {
    const caprl_synth_params *p = w->p;
    bool                      train = split == CAPRL_SYNTH_SPLIT_TRAIN;
    char                      id[48], image[64];
    image_id(id, sizeof id, split, i);
    image_rel(image, sizeof image, split, i);
    caprl_synth_scene s;
    caprl_synth_scene_make(&s, p->seed, split, i, p->min_objects, p->max_objects);
    caprl_synth_question q[MAX_QUESTIONS];
    int32_t n_q = caprl_synth_questions(&s, p->seed, split, i, p->qa_per_image, train ? p->leaky_per_image : 0,
                                        p->question_style, q);
    uint32_t short_listed = caprl_synth_short_listed(&s, p->seed, split, i);
    char    *dense = caprl_synth_caption(&s, (1u << s.n) - 1u, true);
    char    *shrt = caprl_synth_caption(&s, short_listed, false);

    put_scene(&w->f[F_SCENES].b, id, image, split, &s);
    put_caption(&w->f[F_DENSE].b, id, image, dense);
    put_caption(&w->f[F_SHORT].b, id, image, shrt);
    sbuf *corpus = &w->f[F_CORPUS].b;
    sb_puts(corpus, dense);
    sb_puts(corpus, "\n");
    sb_puts(corpus, shrt);
    sb_puts(corpus, "\n");
    for (int32_t k = 0; k < n_q; k++) {
        char *qs = caprl_synth_question_string(&q[k], NULL, false);
        sb_puts(corpus, qs);
        sb_puts(corpus, "\n");
        free(qs);
    }
    if (train) {
        put_qa_record(&w->f[F_TRAIN].b, id, image, q, n_q, true);
        put_qa_record(&w->f[F_TRAIN_VALID].b, id, image, q, n_q, false);
        put_leaky_entries(w, id, q, n_q);
        put_image_chat(&w->f[F_SFT_CAPTIONER].b, id, image, k_caption_instruction, shrt);
        put_image_chat(&w->f[F_SFT_DESCRIBE].b, id, image, k_describe_instruction, dense);
        put_reader_records(w, i, id, &s, q, n_q, short_listed);
        put_bind_records(w, i, id);
        put_filter_bind_records(w, i, id);
        put_filter_records(w, i, id, image, q, n_q);
        put_filter_keyed_records(w, i, id, image, &s);
        for (int32_t k = 0; k < n_q; k++) {
            w->sum.n_train_questions++;
            w->sum.n_leaky += q[k].leaky ? 1 : 0;
        }
    } else {
        put_qa_record(&w->f[F_TEST_QA].b, id, image, q, n_q, false);
        for (int32_t k = 0; k < n_q; k++) {
            char *bq = caprl_synth_question_bench(&q[k], NULL);
            sbuf *b = &w->f[F_BENCH].b;
            sb_printf(b, "{\"id\": \"%s-q%d\", \"image\": ", id, (int)k);
            json_str(b, image);
            sb_puts(b, ", \"question\": ");
            json_str(b, bq);
            sb_printf(b, ", \"answer\": \"%c\", \"type\": \"multiple_choice\"}\n", 'A' + q[k].gold);
            sb_puts(corpus, bq);
            sb_puts(corpus, "\n");
            free(bq);
            w->sum.n_test_questions++;
        }
    }
    free(dense);
    free(shrt);
    for (int32_t k = 0; k < N_FILES; k++) {
        CAPRL_TRY(flush_file(w, k, false, err));
    }
    return CAPRL_OK;
}

static caprl_status write_text(writer *w, caprl_error *err) {
    CAPRL_TRY(open_files(w, err));
    corpus_header(&w->f[F_CORPUS].b, w->p->reader_template);
    sb_puts(&w->f[F_LEAKY].b, "{\"leaky\": [");
    for (int32_t split = 0; split < 2; split++) {
        int64_t n = split == CAPRL_SYNTH_SPLIT_TRAIN ? w->p->n_train : w->p->n_test;
        for (int64_t i = 0; i < n; i++) {
            CAPRL_TRY(write_text_image(w, split, i, err));
        }
    }
    sb_printf(&w->f[F_LEAKY].b, "%s],\n \"n_leaky\": %lld, \"n_questions\": %lld}\n", w->n_leaky_listed ? "\n" : "",
              (long long)w->sum.n_leaky, (long long)w->sum.n_train_questions);
    return commit_files(w, err);
}

static caprl_status write_manifest(writer *w, caprl_error *err) {
    const caprl_synth_params *p = w->p;
    sbuf                      b = {0};
    sb_printf(&b,
              "{\n  \"format\": \"caprl-synth\",\n  \"version\": 1,\n  \"seed\": %llu,\n  \"size\": %d,\n"
              "  \"train\": %d,\n  \"test\": %d,\n  \"min_objects\": %d,\n  \"max_objects\": %d,\n"
              "  \"leaky_per_image\": %d,\n  \"qa_per_image\": %d,\n  \"question_style\": \"%s\",\n",
              (unsigned long long)p->seed, (int)p->size, (int)p->n_train, (int)p->n_test, (int)p->min_objects,
              (int)p->max_objects, (int)p->leaky_per_image, (int)p->qa_per_image,
              caprl_synth_style_name(p->question_style));
    sb_printf(&b,
              "  \"train_questions\": %lld,\n  \"leaky_questions\": %lld,\n  \"test_questions\": %lld,\n"
              "  \"reader_records\": %lld,\n  \"reader_cannot_answer\": %lld,\n  \"reader_free_records\": %lld,\n"
              "  \"reader_bind_records\": %lld,\n  \"filter_bind_records\": %lld,\n"
              "  \"filter_keyed_records\": %lld,\n",
              (long long)w->sum.n_train_questions, (long long)w->sum.n_leaky, (long long)w->sum.n_test_questions,
              (long long)w->sum.n_reader_records, (long long)w->sum.n_reader_cannot, (long long)w->sum.n_reader_free,
              (long long)w->sum.n_reader_bind, (long long)w->sum.n_filter_bind,
              (long long)w->sum.n_filter_keyed);
    sb_puts(&b, "  \"caption_instruction\": ");
    json_str(&b, k_caption_instruction);
    struct {
        const char *key;
        int32_t     n;
        const char *(*name)(int32_t);
    } vocab[4] = {
        {"shapes", CAPRL_SYNTH_N_SHAPES, caprl_synth_shape_name},
        {"colors", CAPRL_SYNTH_N_COLORS, caprl_synth_color_name},
        {"sizes", CAPRL_SYNTH_N_SIZES, caprl_synth_size_name},
        {"positions", CAPRL_SYNTH_N_CELLS, caprl_synth_cell_name},
    };
    for (int32_t v = 0; v < 4; v++) {
        sb_printf(&b, ",\n  \"%s\": [", vocab[v].key);
        for (int32_t i = 0; i < vocab[v].n; i++) {
            sb_printf(&b, "%s\"%s\"", i ? ", " : "", vocab[v].name(i));
        }
        sb_puts(&b, "]");
    }
    sb_puts(&b, "\n}\n");
    char        *path = caprl_path_join(w->dir, "synth.json");
    caprl_status st = write_whole(w, path, b.p, b.len, err);
    free(path);
    free(b.p);
    return st;
}

caprl_status caprl_synth_write(const char *dir, const caprl_synth_params *params, caprl_synth_summary *summary,
                               caprl_error *err) {
    caprl_synth_params p = params ? *params : caprl_synth_default_params();
    CAPRL_TRY(caprl_synth_params_check(&p, err));
    CAPRL_TRY(caprl_mkdir_p(dir, err));
    char *manifest = caprl_path_join(dir, "synth.json");
    int   rc = unlink(manifest);
    int   e = errno;
    free(manifest);
    if (rc != 0 && e != ENOENT) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s/synth.json: cannot remove the old manifest: %s", dir,
                             strerror(e));
    }
    caprl_pool *pool = NULL;
    CAPRL_TRY(caprl_pool_init(&pool, p.n_threads, err));
    writer w;
    memset(&w, 0, sizeof w);
    w.p = &p;
    w.dir = dir;
    caprl_status st = write_images(&w, pool, CAPRL_SYNTH_SPLIT_TRAIN, p.n_train, err);
    if (st == CAPRL_OK) {
        st = write_images(&w, pool, CAPRL_SYNTH_SPLIT_TEST, p.n_test, err);
    }
    caprl_pool_free(pool);
    if (st == CAPRL_OK) {
        st = write_text(&w, err);
    }
    close_files(&w);
    if (st == CAPRL_OK) {
        st = sync_dir_fs(dir, err);
    }
    if (st == CAPRL_OK) {
        st = write_manifest(&w, err);
    }
    if (st == CAPRL_OK) {
        w.sum.n_images = (int64_t)p.n_train + p.n_test;
        if (summary) {
            *summary = w.sum;
        }
    }
    return st;
}
