/* The synthetic world (src/data/synth.c, synth_write.c, src/image/png_write.c) against independent checks:
 * - the reader prompt is byte-identical to the fenced template in spec/caprl.md §6.3 (1,044 bytes);
 * - scenes keep their invariants; drawn pixels match the ground truth (object centres carry the object's colour,
 *   coloured pixels stay in their object's cell, widths follow the stated geometry); PNGs decode to the pixels;
 * - every question's gold follows from the dense caption by a small question "oracle" written here from the
 *   question wording alone, and caprl_synth_answerable agrees with that oracle on partial captions;
 * - leaky questions are flagged and answerable from their wording; valid ones are not;
 * - caprl_synth_write: files parse, agree with each other (QA vs captions vs reader records vs benchmark), two runs
 *   at different thread counts give the same bytes, and a failed run leaves no manifest. */
#include <dirent.h>
#include <jansson.h>
#include <sys/stat.h>

#include "caprl/eval.h"
#include "core/error_impl.h"
#include "caprl/image.h"
#include "caprl_test.h"
#include "data/synth_impl.h"
#include "image/png_write_impl.h"

/* ---- caption and question parsing (independent of the generator) --------------------------------------- */

typedef struct tobj {
    char size[16], color[16], shape[16], pos[24];
} tobj;

typedef struct tcap {
    int  n;
    tobj o[9];
    int  count; /* from "There are N objects."; -1 when absent */
} tcap;

static bool take(const char **p, const char *prefix) {
    size_t n = strlen(prefix);
    if (strncmp(*p, prefix, n) != 0) {
        return false;
    }
    *p += n;
    return true;
}

/* Copies up to the next ' ' (or end) into out; false if empty. */
static bool word(const char **p, char *out, size_t cap) {
    size_t n = 0;
    while ((*p)[n] && (*p)[n] != ' ' && (*p)[n] != '.' && n + 1 < cap) {
        n++;
    }
    memcpy(out, *p, n);
    out[n] = '\0';
    *p += n;
    return n > 0;
}

static bool parse_caption(const char *cap, tcap *t) {
    memset(t, 0, sizeof *t);
    t->count = -1;
    const char *p = cap;
    int         count;
    if (sscanf(p, "There are %d objects.", &count) == 1 || sscanf(p, "There is %d object.", &count) == 1) {
        t->count = count;
        p = strchr(p, '.') + 1;
        if (*p == ' ') {
            p++;
        }
    }
    while (*p) {
        tobj *o = &t->o[t->n];
        if (t->n >= 9 || !take(&p, "A ") || !word(&p, o->size, sizeof o->size) || !take(&p, " ") ||
            !word(&p, o->color, sizeof o->color) || !take(&p, " ") || !word(&p, o->shape, sizeof o->shape) ||
            !take(&p, " at the ")) {
            return false;
        }
        const char *dot = strchr(p, '.');
        if (!dot || (size_t)(dot - p) >= sizeof o->pos) {
            return false;
        }
        memcpy(o->pos, p, (size_t)(dot - p));
        o->pos[dot - p] = '\0';
        p = dot + 1;
        t->n++;
        if (*p == ' ') {
            p++;
        }
    }
    return true;
}

typedef struct tq {
    char text[128];
    char opt[6][48];
    int  n_opt;
    bool has_f; /* a "F) Can not answer based on the caption" option (not counted in n_opt) */
} tq;

/* CapRL form ("text\n   - A) opt...") or, with bench, the benchmark form ("text\nA. opt...\nAnswer with..."). */
static bool parse_question(const char *s, tq *q, bool bench) {
    memset(q, 0, sizeof *q);
    const char *nl = strchr(s, '\n');
    if (!nl || (size_t)(nl - s) >= sizeof q->text) {
        return false;
    }
    memcpy(q->text, s, (size_t)(nl - s));
    const char *p = nl + 1;
    while (*p) {
        const char *end = strchr(p, '\n');
        size_t      len = end ? (size_t)(end - p) : strlen(p);
        char        line[128];
        if (len >= sizeof line) {
            return false;
        }
        memcpy(line, p, len);
        line[len] = '\0';
        char label = (char)('A' + q->n_opt);
        if (bench) {
            if (strcmp(line, "Answer with the option's letter from the given choices directly.") == 0) {
                if (end) {
                    return false;
                }
                break;
            }
            if (len < 4 || line[0] != label || line[1] != '.' || line[2] != ' ') {
                return false;
            }
            snprintf(q->opt[q->n_opt++], sizeof q->opt[0], "%s", line + 3);
        } else if (strcmp(line, "   - F) Can not answer based on the caption") == 0) {
            q->has_f = true;
        } else {
            if (q->has_f || len < 8 || strncmp(line, "   - ", 5) != 0 || line[5] != label || line[6] != ')' ||
                line[7] != ' ' || q->n_opt >= 6) {
                return false;
            }
            snprintf(q->opt[q->n_opt++], sizeof q->opt[0], "%s", line + 8);
        }
        p = end ? end + 1 : p + len;
    }
    return q->n_opt > 0;
}

static int find_opt(const tq *q, const char *text) {
    for (int i = 0; i < q->n_opt; i++) {
        if (strcmp(q->opt[i], text) == 0) {
            return i;
        }
    }
    return -1;
}

static const tobj *find_obj(const tcap *c, const char *color, const char *shape, const char *pos) {
    for (int i = 0; i < c->n; i++) {
        const tobj *o = &c->o[i];
        if ((!color || !strcmp(o->color, color)) && (!shape || !strcmp(o->shape, shape)) &&
            (!pos || !strcmp(o->pos, pos))) {
            return o;
        }
    }
    return NULL;
}

enum { UNKNOWN = -1, UNPARSED = -2 };

/* The absent style's convention, which a reader of that world learns: the options of a question about one
 * attribute are values of which only the gold one is in the image, so the one option that the caption names for
 * any object is the answer. g_absent turns it on. */
static bool g_absent;

static const char *obj_attr(const tobj *o, char attr) {
    return attr == 'c' ? o->color : attr == 's' ? o->shape : o->pos;
}

/* o's attr value as an option, else (the absent convention) the one option some listed object has as its attr. */
static int answer_attr(const tq *q, const tcap *c, const tobj *o, char attr) {
    if (o) {
        return find_opt(q, obj_attr(o, attr));
    }
    int found = UNKNOWN, n_found = 0;
    for (int i = 0; g_absent && i < q->n_opt; i++) {
        for (int j = 0; j < c->n; j++) {
            if (!strcmp(q->opt[i], obj_attr(&c->o[j], attr))) {
                found = i;
                n_found++;
                break;
            }
        }
    }
    return n_found == 1 ? found : UNKNOWN;
}

/* What a careful reader concludes from caption c (NULL: no caption) about q: the index of the option the
 * caption or the wording determines, UNKNOWN if it does not, UNPARSED for a question this oracle does not
 * know. Questions presuppose what they say (one circle in "the circle"); a caption without its count sentence
 * says nothing about objects it does not list. */
static int oracle(const tq *q, const tcap *c) {
    static tcap none = {.count = -1};
    c = c ? c : &none;
    const char *p = q->text;
    char        a[32], b[32], rest[64];
    const tobj *o;
    if (take(&p, "What color is the object at the ")) {
        snprintf(rest, sizeof rest, "%.*s", (int)strlen(p) - 1, p);
        return answer_attr(q, c, find_obj(c, NULL, NULL, rest), 'c');
    }
    if (take(&p, "What shape is the object at the ")) {
        snprintf(rest, sizeof rest, "%.*s", (int)strlen(p) - 1, p);
        return answer_attr(q, c, find_obj(c, NULL, NULL, rest), 's');
    }
    if (sscanf(q->text, "What color is the %31s %31[^?]?", a, b) == 2) { /* leaky: the answer is in the wording */
        return find_opt(q, a);
    }
    if (sscanf(q->text, "What color is the %31[^?]?", a) == 1) {
        return answer_attr(q, c, find_obj(c, NULL, a, NULL), 'c');
    }
    if (sscanf(q->text, "What shape is the %31s object?", a) == 1 && strstr(q->text, " object?")) {
        return answer_attr(q, c, find_obj(c, a, NULL, NULL), 's');
    }
    if (sscanf(q->text, "What shape is the %31s %31[^?]?", a, b) == 2) {
        return find_opt(q, b);
    }
    if (sscanf(q->text, "Where is the %31s %31[^?]?", a, b) == 2) {
        return answer_attr(q, c, find_obj(c, a, b, NULL), 'p');
    }
    if (sscanf(q->text, "How many sides does the %31s %31s have?", a, b) == 2 ||
        sscanf(q->text, "How many sides does a %31s have?", b) == 1) {
        return find_opt(q, !strcmp(b, "triangle") ? "3" : "4");
    }
    if (!strcmp(q->text, "Which of these shapes is round?")) {
        return find_opt(q, "circle");
    }
    if (!strcmp(q->text, "Which of these objects is small?") || !strcmp(q->text, "Which of these objects is large?")) {
        const char *want = strstr(q->text, "small") ? "small" : "large";
        int         open = -1, n_open = 0;
        for (int i = 0; i < q->n_opt; i++) {
            if (sscanf(q->opt[i], "the %31s %31s", a, b) != 2) {
                return UNPARSED;
            }
            o = find_obj(c, a, b, NULL);
            if (o && !strcmp(o->size, want)) {
                return i;
            }
            if (!o) {
                open = i;
                n_open++;
            }
        }
        return n_open == 1 ? open : UNKNOWN; /* the other three are described with the other size */
    }
    if (!strcmp(q->text, "Which of these objects is in the image?") ||
        !strcmp(q->text, "Which of these objects is not in the image?")) {
        bool not = strstr(q->text, " not ") != NULL;
        int  listed = 0, unlisted = -1, n_listed = 0;
        for (int i = 0; i < q->n_opt; i++) {
            if (sscanf(q->opt[i], "a %31s %31s", a, b) != 2) {
                return UNPARSED;
            }
            if (find_obj(c, a, b, NULL)) {
                listed = i;
                n_listed++;
            } else {
                unlisted = i;
            }
        }
        if (!not) {
            return n_listed == 1 ? listed : UNKNOWN;
        }
        return n_listed == q->n_opt - 1 ? unlisted : UNKNOWN; /* the other three are described */
    }
    if (!strcmp(q->text, "Which of these objects does the image show?") ||
        !strcmp(q->text, "Which of these objects appears in the image?") ||
        !strcmp(q->text, "Which of these descriptions matches an object in the image?")) {
        /* statement form: the option whose every word matches a sentence of the caption */
        int match = UNKNOWN;
        for (int i = 0; i < q->n_opt; i++) {
            char size[16], color[16], shape[16], pos[24];
            if (sscanf(q->opt[i], "a %15s %15s %15s at the %23[^\n]", size, color, shape, pos) != 4) {
                return UNPARSED;
            }
            o = find_obj(c, color, shape, pos);
            if (o && !strcmp(o->size, size)) {
                match = match == UNKNOWN ? i : UNPARSED; /* two true descriptions: a broken question */
            }
        }
        return match;
    }
    if (take(&p, "How many ")) {
        if (c->count < 0) {
            return UNKNOWN;
        }
        int n = 0;
        if (!strcmp(q->text, "How many objects are there?")) {
            n = c->n;
            if (c->count != c->n) {
                return UNPARSED;
            }
        } else if (strstr(q->text, " objects are there?") && sscanf(q->text, "How many %31s", a) == 1) {
            for (int i = 0; i < c->n; i++) {
                n += !strcmp(c->o[i].color, a);
            }
        } else if (sscanf(q->text, "How many %31s are there?", a) == 1 && strlen(a) > 1 && a[strlen(a) - 1] == 's') {
            a[strlen(a) - 1] = '\0'; /* "circles" -> "circle" */
            for (int i = 0; i < c->n; i++) {
                n += !strcmp(c->o[i].shape, a);
            }
        } else {
            return UNPARSED;
        }
        char num[8];
        snprintf(num, sizeof num, "%d", n);
        return find_opt(q, num);
    }
    return UNPARSED;
}

/* ---- the reader prompt ------------------------------------------------------------------------------------ */

static void test_reader_template(void) {
    char *tpl = caprl_synth_reader_prompt(NULL, "{}", "{}");
    CHECK_EQ_I64(strlen(tpl), 1044);
    FILE *f = fopen(CAPRL_SHARED_DIR "/spec/caprl.md", "rb");
    if (!f) {
        fprintf(stderr, "note: %s/spec/caprl.md not found; template compared by length only\n", CAPRL_SHARED_DIR);
        free(tpl);
        return;
    }
    static char spec[1 << 20];
    size_t      n = fread(spec, 1, sizeof spec - 1, f);
    fclose(f);
    spec[n] = '\0';
    /* The fenced block of §6.3: from "```\n<|im_start|>user\nYou will be given" to the closing fence. */
    const char *start = strstr(spec, "```\n<|im_start|>user\nYou will be given");
    CHECK(start != NULL);
    if (start) {
        start += 4;
        const char *end = strstr(start, "\n```");
        CHECK(end != NULL);
        if (end) {
            CHECK_EQ_I64(end - start, 1044);
            CHECK(strlen(tpl) == (size_t)(end - start) && memcmp(tpl, start, strlen(tpl)) == 0);
        }
    }
    free(tpl);
    char *filled = caprl_synth_reader_prompt(NULL, "CAP", "Q?");
    CHECK(strstr(filled, "Caption: <Caption Start> CAP <Caption End>  \nQuestion: Q?  <|im_end|>\n") != NULL);
    CHECK(strlen(filled) > 13 && strcmp(filled + strlen(filled) - 13, "The answer is") == 0);
    free(filled);
}

/* ---- scenes and pixels ------------------------------------------------------------------------------------ */

static void test_scenes(void) {
    int hist[10] = {0};
    for (uint64_t seed = 0; seed < 3; seed++) {
        for (int64_t i = 0; i < 300; i++) {
            caprl_synth_scene s, s2;
            caprl_synth_scene_make(&s, seed, (int32_t)(i & 1), i, 2, 6);
            caprl_synth_scene_make(&s2, seed, (int32_t)(i & 1), i, 2, 6);
            CHECK(memcmp(&s, &s2, sizeof s) == 0);
            CHECK(s.n >= 2 && s.n <= 6);
            hist[s.n]++;
            for (int32_t k = 0; k < s.n; k++) {
                const caprl_synth_object *o = &s.obj[k];
                CHECK(o->cell >= 0 && o->cell < 9 && (k == 0 || o->cell > s.obj[k - 1].cell));
                CHECK(o->shape >= 0 && o->shape < CAPRL_SYNTH_N_SHAPES && o->color >= 0 &&
                      o->color < CAPRL_SYNTH_N_COLORS && (o->size == 0 || o->size == 1));
                for (int32_t j = 0; j < k; j++) {
                    CHECK(!(s.obj[j].shape == o->shape && s.obj[j].color == o->color));
                }
            }
        }
    }
    for (int n = 2; n <= 6; n++) {
        CHECK_MSG(hist[n] > 900 / 5 / 2, "scenes with %d objects: %d of 900", n, hist[n]);
    }
    caprl_synth_scene a, b;
    caprl_synth_scene_make(&a, 0, 0, 5, 9, 9);
    CHECK_EQ_I64(a.n, 9);
    caprl_synth_scene_make(&a, 0, 0, 5, 2, 6);
    caprl_synth_scene_make(&b, 1, 0, 5, 2, 6);
    caprl_synth_scene c;
    caprl_synth_scene_make(&c, 0, 1, 5, 2, 6);
    CHECK(memcmp(&a, &b, sizeof a) != 0 || memcmp(&a, &c, sizeof a) != 0);
}

static int color_at(const uint8_t *px, int size, int x, int y) {
    for (int c = 0; c < CAPRL_SYNTH_N_COLORS; c++) {
        uint8_t rgb[3];
        caprl_synth_color_rgb(c, rgb);
        if (memcmp(px + 3 * (y * size + x), rgb, 3) == 0) {
            return c;
        }
    }
    uint8_t bg[3];
    caprl_synth_background((y * CAPRL_SYNTH_GRID / size) * CAPRL_SYNTH_GRID + x * CAPRL_SYNTH_GRID / size, bg);
    return memcmp(px + 3 * (y * size + x), bg, 3) == 0 ? -1 : -2;
}

/* Object geometry from the header's description, in float64: the cell centre and the half extent. */
static void expect_geometry(int size, const caprl_synth_object *o, double *cx, double *cy, double *h) {
    double cell = size / 3.0;
    *cx = (o->cell % 3 + 0.5) * cell;
    *cy = (o->cell / 3 + 0.5) * cell;
    *h = (o->size == CAPRL_SYNTH_LARGE ? 0.4 : 0.225) * cell;
}

static void check_pixels(const caprl_synth_scene *s, int size, const uint8_t *px) {
    int owner[9];
    for (int c = 0; c < 9; c++) {
        owner[c] = -1;
    }
    for (int k = 0; k < s->n; k++) {
        owner[s->obj[k].cell] = k;
        double cx, cy, h;
        expect_geometry(size, &s->obj[k], &cx, &cy, &h);
        CHECK_EQ_I64(color_at(px, size, (int)cx, (int)cy), s->obj[k].color);
        /* the widest run of the object's colour on its centre row */
        int w = 0;
        for (int x = 0; x < size; x++) {
            if (color_at(px, size, x, (int)cy) == s->obj[k].color && (int)(x * 3 / size) == s->obj[k].cell % 3) {
                w++;
            }
        }
        double want = s->obj[k].shape == CAPRL_SYNTH_TRIANGLE ? h : 2 * h; /* triangle: half the base at mid-height */
        CHECK_MSG(fabs(w - want) <= 2.0, "object %d (shape %d) of width %d, expected %.2f at size %d", k,
                  (int)s->obj[k].shape, w, want, size);
    }
    for (int y = 0; y < size; y++) {
        for (int x = 0; x < size; x++) {
            int c = color_at(px, size, x, y);
            int cell = (y * 3 / size) * 3 + x * 3 / size;
            if (c == -2 || (c >= 0 && (owner[cell] < 0 || s->obj[owner[cell]].color != c))) {
                CHECK_MSG(0, "pixel (%d, %d) has colour %d, not its cell's object or the background", x, y, c);
                return;
            }
        }
    }
    for (int cell = 0; cell < 9; cell++) { /* empty cells are background at their centre */
        if (owner[cell] < 0) {
            int x = (int)((cell % 3 + 0.5) * size / 3.0), y = (int)((cell / 3 + 0.5) * size / 3.0);
            CHECK_EQ_I64(color_at(px, size, x, y), -1);
        }
    }
}

static void test_render_and_png(void) {
    static const int sizes[] = {56, 84, 112, 224};
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
        int      size = sizes[si];
        uint8_t *px = malloc((size_t)size * size * 3);
        for (int64_t i = 0; i < 40; i++) {
            caprl_synth_scene s;
            caprl_synth_scene_make(&s, 7, 0, i, 1, 9);
            caprl_synth_render(&s, size, px);
            check_pixels(&s, size, px);
            if (i < 4) {
                caprl_error err = {0};
                uint8_t    *png = NULL, *png2 = NULL;
                size_t      n = 0, n2 = 0;
                CHECK_OK(caprl_png_encode_rgb8(px, size, size, 6, &png, &n, &err), &err);
                CHECK_OK(caprl_png_encode_rgb8(px, size, size, 6, &png2, &n2, &err), &err);
                CHECK(n == n2 && png && png2 && memcmp(png, png2, n) == 0);
                caprl_image img = {0};
                CHECK_OK(caprl_image_decode_buffer(png, n, "synth.png", NULL, &img, &err), &err);
                CHECK(img.width == size && img.height == size && img.src_mode == CAPRL_IMAGE_MODE_RGB &&
                      img.data && memcmp(img.data, px, (size_t)size * size * 3) == 0);
                caprl_image_free(&img);
                free(png);
                free(png2);
            }
        }
        free(px);
    }
    uint8_t     one[3] = {1, 2, 3};
    uint8_t    *out = (uint8_t *)1;
    size_t      n = 1;
    caprl_error err = {0};
    CHECK_EQ_I64(caprl_png_encode_rgb8(one, 0, 1, 6, &out, &n, &err), CAPRL_ERR_INVALID_ARG);
    CHECK(out == NULL && n == 0);
    CHECK_EQ_I64(caprl_png_encode_rgb8(one, 1, 1, 10, &out, &n, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_OK(caprl_png_encode_rgb8(one, 1, 1, 0, &out, &n, &err), &err);
    free(out);
}

/* ---- questions -------------------------------------------------------------------------------------------- */

static bool is_leaky_type(int32_t t) {
    return t >= CAPRL_SYNTH_Q_LEAK_COLOR;
}

static void check_question(const caprl_synth_scene *s, const caprl_synth_question *q, const tcap *dense,
                           caprl_rng *r, int *n_short_ok, int *n_valid) {
    char *qs = caprl_synth_question_string(q, NULL, false);
    tq    t;
    CHECK_MSG(parse_question(qs, &t, false), "%s", qs);
    CHECK_EQ_I64(t.n_opt, 4);
    for (int i = 0; i < t.n_opt; i++) {
        for (int j = 0; j < i; j++) {
            CHECK_MSG(strcmp(t.opt[i], t.opt[j]) != 0, "duplicate option in %s", qs);
        }
    }
    CHECK_EQ_I64(q->leaky, is_leaky_type(q->type));
    /* Gold from the dense caption. */
    CHECK_MSG(oracle(&t, dense) == q->gold, "%s: oracle %d, gold %d", qs, oracle(&t, dense), (int)q->gold);
    /* Leaky questions are answerable from the wording alone; valid ones are not and do not spell their answer. */
    int blind = oracle(&t, NULL);
    if (q->leaky) {
        CHECK_MSG(blind == q->gold, "leaky question not answerable from its wording: %s", qs);
    } else {
        CHECK_MSG(blind == UNKNOWN, "valid question answerable without a caption: %s", qs);
        CHECK_MSG(strstr(t.text, t.opt[q->gold]) == NULL, "the question spells its answer: %s", qs);
        CHECK(caprl_synth_answerable(q, (1u << s->n) - 1u, true));
        /* Partial captions: answerable exactly when the oracle can tell from that caption. */
        for (int rep = 0; rep < 4; rep++) {
            int32_t  k = (int32_t)caprl_rng_below(r, (uint64_t)s->n + 1);
            uint32_t listed = caprl_synth_subset(r, s->n, k);
            char    *cap = caprl_synth_caption(s, listed, false);
            tcap     pc;
            CHECK(parse_caption(cap, &pc));
            int  got = oracle(&t, &pc);
            bool ans = caprl_synth_answerable(q, listed, false);
            CHECK_MSG(ans ? got == q->gold : got == UNKNOWN, "%s\ncaption: %s\nanswerable %d, oracle %d, gold %d",
                      qs, cap, ans, got, (int)q->gold);
            free(cap);
        }
        (*n_valid)++;
    }
    free(qs);
    (void)n_short_ok;
}

static void test_questions(void) {
    int        n_valid = 0, n_short_ok = 0, n_short_total = 0, letters[4] = {0}, n_absent_attr = 0;
    caprl_rng  r;
    caprl_rng_init(&r, 99, 0, 0);
    for (uint64_t seed = 0; seed < 6; seed++) {
        int32_t style = seed < 2 ? CAPRL_SYNTH_LOOKUP : seed < 4 ? CAPRL_SYNTH_STATEMENT : CAPRL_SYNTH_ABSENT;
        g_absent = style == CAPRL_SYNTH_ABSENT;
        for (int64_t i = 0; i < 200; i++) {
            int32_t           split = (int32_t)(i % 2);
            caprl_synth_scene s;
            caprl_synth_scene_make(&s, seed, split, i, 1, 9);
            caprl_synth_question q[20], q0[20], q2[20];
            int32_t              n = caprl_synth_questions(&s, seed, split, i, 8, 3, style, q);
            int32_t              n0 = caprl_synth_questions(&s, seed, split, i, 8, 0, style, q0);
            int32_t              n2 = caprl_synth_questions(&s, seed, split, i, 8, 3, style, q2);
            CHECK(n2 == n && memcmp(q, q2, (size_t)n * sizeof *q) == 0);
            CHECK_EQ_I64(n, n0 + 3);
            /* the statement style asks one question of each of its three lines per image, and the absent style
             * none about an attribute whose values the scene's objects nearly all have */
            CHECK_MSG(style == CAPRL_SYNTH_LOOKUP ? s.n < 2 || n0 == 8 : n0 >= (style == CAPRL_SYNTH_ABSENT ? 3 : 4),
                      "style %d: %d questions of a %d-object scene", (int)style, (int)n0, (int)s.n);
            int32_t n_statement = 0;
            for (int32_t k = 0; k < n0; k++) {
                n_statement += q0[k].type == CAPRL_SYNTH_Q_STATEMENT;
                CHECK(style == CAPRL_SYNTH_STATEMENT || q0[k].type != CAPRL_SYNTH_Q_STATEMENT);
                CHECK(style != CAPRL_SYNTH_STATEMENT || q0[k].type > CAPRL_SYNTH_Q_POSITION);
                n_absent_attr += style == CAPRL_SYNTH_ABSENT && q0[k].type <= CAPRL_SYNTH_Q_POSITION;
                /* absent style: no object of the scene has a distractor's colour, shape or position */
                for (int32_t m = 0; style == CAPRL_SYNTH_ABSENT && q0[k].type <= CAPRL_SYNTH_Q_POSITION && m < 4; m++) {
                    for (int32_t oi = 0; m != q0[k].gold && oi < s.n; oi++) {
                        const caprl_synth_object *o = &s.obj[oi];
                        const char *v[3] = {caprl_synth_color_name(o->color), caprl_synth_shape_name(o->shape),
                                            caprl_synth_cell_name(o->cell)};
                        for (int a = 0; a < 3; a++) {
                            CHECK_MSG(strcmp(q0[k].options[m], v[a]) != 0, "%s: option %s is in the image",
                                      q0[k].text, q0[k].options[m]);
                        }
                    }
                }
            }
            CHECK(style != CAPRL_SYNTH_STATEMENT || (n_statement >= 2 && n_statement <= 3));
            /* leaky questions do not move the valid ones */
            int32_t j = 0, n_leaky = 0, n_count = 0;
            for (int32_t k = 0; k < n; k++) {
                if (q[k].leaky) {
                    n_leaky++;
                } else {
                    CHECK(j < n0 && memcmp(&q[k], &q0[j], sizeof q[k]) == 0);
                    j++;
                }
                n_count += q[k].needs_count;
                for (int32_t m = 0; m < k; m++) {
                    CHECK(strcmp(q[k].text, q[m].text) != 0);
                }
            }
            CHECK_EQ_I64(n_leaky, 3);
            CHECK(n_count <= 1);
            char *dense = caprl_synth_caption(&s, (1u << s.n) - 1u, true);
            tcap  dc;
            CHECK_MSG(parse_caption(dense, &dc), "%s", dense);
            CHECK_EQ_I64(dc.n, s.n);
            CHECK_EQ_I64(dc.count, s.n);
            uint32_t short_listed = caprl_synth_short_listed(&s, seed, split, i);
            int      pop = __builtin_popcount(short_listed);
            CHECK(pop >= 1 && pop <= 2 && (s.n >= 2 || pop == 1) && short_listed < (1u << s.n));
            for (int32_t k = 0; k < n; k++) {
                check_question(&s, &q[k], &dc, &r, &n_short_ok, &n_valid);
                if (!q[k].leaky) {
                    letters[q[k].gold]++;
                    n_short_total++;
                    n_short_ok += caprl_synth_answerable(&q[k], short_listed, false);
                }
            }
            free(dense);
        }
    }
    g_absent = false;
    /* the absent style still asks about single attributes, where the scene allows it */
    CHECK_MSG(n_absent_attr > 400, "%d absent-style attribute questions", n_absent_attr);
    /* Short captions leave most questions open; gold letters are about uniform. */
    CHECK_MSG(n_short_ok * 2 < n_short_total, "%d of %d answerable from the short caption", n_short_ok,
              n_short_total);
    for (int l = 0; l < 4; l++) {
        CHECK_MSG(letters[l] * 5 > n_valid && letters[l] * 3 < n_valid, "letter %c: %d of %d", 'A' + l, letters[l],
                  n_valid);
    }
    /* The reward's form: options in a given order, then F; the benchmark form. */
    caprl_synth_scene s;
    caprl_synth_scene_make(&s, 0, 0, 0, 2, 6);
    caprl_synth_question q[8];
    CHECK(caprl_synth_questions(&s, 0, 0, 0, 1, 0, CAPRL_SYNTH_LOOKUP, q) == 1);
    int32_t order[4] = {3, 2, 1, 0};
    char   *qs = caprl_synth_question_string(&q[0], order, true);
    tq      t;
    CHECK(parse_question(qs, &t, false) && t.has_f && t.n_opt == 4 && strcmp(t.opt[0], q[0].options[3]) == 0);
    free(qs);
    char *bq = caprl_synth_question_bench(&q[0], NULL);
    CHECK(parse_question(bq, &t, true) && !t.has_f && t.n_opt == 4 && strcmp(t.opt[2], q[0].options[2]) == 0);
    free(bq);
}

/* ---- the files -------------------------------------------------------------------------------------------- */

static char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)len + 1);
    *n = fread(buf, 1, (size_t)len, f);
    buf[*n] = '\0';
    fclose(f);
    return buf;
}

static char *path2(const char *dir, const char *name) {
    char *p = malloc(strlen(dir) + strlen(name) + 2);
    sprintf(p, "%s/%s", dir, name);
    return p;
}

/* Every line of a JSONL file as a parsed array. */
static json_t *load_jsonl(const char *dir, const char *name) {
    char  *p = path2(dir, name);
    size_t n;
    char  *text = read_all(p, &n);
    free(p);
    json_t *arr = json_array();
    CHECK_MSG(text != NULL, "%s missing", name);
    if (!text) {
        return arr;
    }
    char *save = NULL;
    int   line = 0;
    for (char *l = strtok_r(text, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
        json_error_t e;
        json_t      *v = json_loads(l, JSON_REJECT_DUPLICATES, &e);
        line++;
        CHECK_MSG(v != NULL, "%s:%d: %s", name, line, e.text);
        if (v) {
            json_array_append_new(arr, v);
        }
    }
    free(text);
    return arr;
}

static const char *jstr(json_t *o, const char *key) {
    const char *s = json_string_value(json_object_get(o, key));
    CHECK_MSG(s != NULL, "missing string '%s'", key);
    return s ? s : "";
}

static bool same_file(const char *a, const char *b) {
    size_t na, nb;
    char  *x = read_all(a, &na), *y = read_all(b, &nb);
    bool   same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

static int count_tmp_files(const char *dir) {
    DIR *d = opendir(dir);
    int  n = 0;
    if (!d) {
        return 0;
    }
    for (struct dirent *e; (e = readdir(d));) {
        n += strstr(e->d_name, ".tmp.") != NULL;
    }
    closedir(d);
    return n;
}

/* The dense caption of each id. */
static const char *dense_of(json_t *dense, const char *id) {
    for (size_t i = 0; i < json_array_size(dense); i++) {
        if (!strcmp(jstr(json_array_get(dense, i), "id"), id)) {
            return jstr(json_array_get(dense, i), "caption");
        }
    }
    CHECK_MSG(0, "no dense caption for %s", id);
    return "";
}

static void check_qa_file(json_t *qa, json_t *dense, bool allow_leaky, int *n_leaky_seen) {
    for (size_t i = 0; i < json_array_size(qa); i++) {
        json_t *rec = json_array_get(qa, i);
        tcap    c;
        CHECK(parse_caption(dense_of(dense, jstr(rec, "id")), &c));
        json_t *items = json_object_get(rec, "qa");
        CHECK(json_array_size(items) >= 1);
        for (size_t k = 0; k < json_array_size(items); k++) {
            json_t     *it = json_array_get(items, k);
            const char *ans = jstr(it, "answer");
            tq          t;
            CHECK(parse_question(jstr(it, "question"), &t, false) && t.n_opt == 4 && !t.has_f);
            CHECK(strlen(ans) == 1 && oracle(&t, &c) == ans[0] - 'A');
            if (oracle(&t, NULL) >= 0) {
                (*n_leaky_seen)++;
                CHECK(allow_leaky);
            }
        }
    }
}

/* A Prism-form record follows each CapRL-form one: the same caption and option order as `caprl eval prism` asks a
 * simple-JSONL question, answered with the same letter (or a guess among A-D where the CapRL record says F). */
static void check_prism_record(json_t *rec, json_t *prev) {
    const char *prompt = jstr(rec, "prompt"), *completion = jstr(rec, "completion");
    const char *pprompt = jstr(prev, "prompt"), *pcompletion = jstr(prev, "completion");
    const char *cs = strstr(pprompt, "<Caption Start> ");
    while (cs && strstr(cs + 16, "<Caption Start> ")) {
        cs = strstr(cs + 16, "<Caption Start> ");
    }
    const char *ce = cs ? strstr(cs, " <Caption End>") : NULL;
    CHECK(cs && ce);
    if (!cs || !ce) {
        return;
    }
    char *caption = strndup(cs + 16, (size_t)(ce - cs - 16));
    char *head = caprl_xasprintf("%s%s%s", CAPRL_PRISM_CAPTION_PREFIX, caption, CAPRL_PRISM_CAPTION_SUFFIX);
    CHECK(strncmp(prompt, head, strlen(head)) == 0);
    size_t tail = strlen(CAPRL_PRISM_SIMPLE_PROMPT_TAIL);
    CHECK(strlen(prompt) > tail && strcmp(prompt + strlen(prompt) - tail, CAPRL_PRISM_SIMPLE_PROMPT_TAIL) == 0);
    char letter = 0;
    CHECK(sscanf(completion, "<think></think><answer>\\boxed{%c}</answer>", &letter) == 1 && letter >= 'A' && letter <= 'D');
    if (pcompletion[1] != 'F') {
        CHECK(letter == pcompletion[1]);
    }
    free(head);
    free(caption);
}

/* The caption and question a reader prompt (the CapRL template) was filled with; false if it has not that form. */
static bool split_reader_prompt(const char *prompt, char **caption, char **question) {
    const char *cs = prompt, *next;
    while ((next = strstr(cs, "<Caption Start> "))) {
        cs = next + 16;
    }
    const char *ce = strstr(cs, " <Caption End>  \nQuestion: ");
    const char *qe = ce ? strstr(ce, "  <|im_end|>\n<|im_start|>assistant\nThe answer is") : NULL;
    if (!ce || !qe) {
        return false;
    }
    *caption = strndup(cs, (size_t)(ce - cs));
    *question = strndup(ce + 27, (size_t)(qe - ce - 27));
    return true;
}

/* An answer-in-words record follows the CapRL-form and Prism-form records of the same question: the same caption,
 * the question line without options, and the text of the option the oracle picks from the caption. */
static void check_free_record(json_t *rec, json_t *reader_rec) {
    char *caption = NULL, *question = NULL, *rcaption = NULL, *rquestion = NULL;
    CHECK(split_reader_prompt(jstr(rec, "prompt"), &caption, &question));
    CHECK(split_reader_prompt(jstr(reader_rec, "prompt"), &rcaption, &rquestion));
    if (!caption || !rcaption) {
        return;
    }
    CHECK(strcmp(caption, rcaption) == 0);
    CHECK(strchr(question, '\n') == NULL && strncmp(rquestion, question, strlen(question)) == 0 &&
          rquestion[strlen(question)] == '\n');
    tcap c;
    tq   t;
    CHECK(parse_caption(caption, &c) && parse_question(rquestion, &t, false));
    int o = oracle(&t, &c);
    CHECK_MSG(o >= 0, "%s: an answer in words for a question the caption does not answer", jstr(rec, "id"));
    if (o >= 0) {
        char want[64];
        snprintf(want, sizeof want, " %s.", t.opt[o]);
        CHECK_MSG(strcmp(jstr(rec, "completion"), want) == 0, "%s: '%s' instead of '%s'", jstr(rec, "id"),
                  jstr(rec, "completion"), want);
    }
    CHECK(strstr(question, "these") == NULL); /* questions that name their options have no such form */
    free(caption);
    free(question);
    free(rcaption);
    free(rquestion);
}

/* Letter-binding records: the caption is one of four distinct options, the target its letter. */
static void check_bind_records(json_t *bind) {
    int per_letter[4] = {0};
    for (size_t i = 0; i < json_array_size(bind); i++) {
        json_t *rec = json_array_get(bind, i);
        char   *caption = NULL, *question = NULL;
        CHECK(split_reader_prompt(jstr(rec, "prompt"), &caption, &question));
        if (!caption) {
            continue;
        }
        char opts[4][64];
        CHECK(sscanf(question, "?\n   - A) %63[^\n]\n   - B) %63[^\n]\n   - C) %63[^\n]\n   - D) %63[^\n]", opts[0],
                     opts[1], opts[2], opts[3]) == 4);
        char *rebuilt = caprl_synth_reader_prompt(NULL, caption, question);
        CHECK(strcmp(rebuilt, jstr(rec, "prompt")) == 0);
        const char *completion = jstr(rec, "completion");
        CHECK(strlen(completion) == 3 && completion[0] == ' ' && completion[2] == '.');
        int gold = completion[1] - 'A';
        CHECK(gold >= 0 && gold < 4);
        if (gold >= 0 && gold < 4) {
            per_letter[gold]++;
            CHECK(strlen(caption) == strlen(opts[gold]) + 1 && strncmp(caption, opts[gold], strlen(opts[gold])) == 0);
        }
        for (int a = 0; a < 4; a++) {
            for (int b = a + 1; b < 4; b++) {
                CHECK(strcmp(opts[a], opts[b]) != 0);
            }
        }
        free(rebuilt);
        free(caption);
        free(question);
    }
    for (int l = 0; l < 4; l++) {
        CHECK_MSG(per_letter[l] * 8 > (int)json_array_size(bind), "letter %c is the target of %d of %zu", 'A' + l,
                  per_letter[l], json_array_size(bind));
    }
}

/* The curation model's keyed lookups against the dense captions: one pair (in words, then over four options plus
 * "E) None of the above" with the letter) per object whose colour is unique in its scene and per object whose shape
 * is, and the word answer is that object's other attribute. */
static void check_keyed_records(json_t *keyed, json_t *dense, int32_t n_train) {
    size_t expected = 0;
    for (int32_t i = 0; i < n_train; i++) {
        tcap c;
        CHECK(parse_caption(jstr(json_array_get(dense, (size_t)i), "caption"), &c));
        for (int a = 0; a < c.n; a++) {
            int same_color = 0, same_shape = 0;
            for (int b = 0; b < c.n; b++) {
                same_color += !strcmp(c.o[a].color, c.o[b].color);
                same_shape += !strcmp(c.o[a].shape, c.o[b].shape);
            }
            expected += 2 * (size_t)(same_color == 1) + 2 * (size_t)(same_shape == 1);
        }
    }
    CHECK_EQ_I64(json_array_size(keyed), (int64_t)expected);
    int per_letter[4] = {0};
    for (size_t i = 0; i + 1 < json_array_size(keyed); i += 2) {
        json_t     *words = json_array_get(keyed, i), *letter = json_array_get(keyed, i + 1);
        const char *id = jstr(words, "id"), *image = jstr(words, "image");
        CHECK(!strcmp(image, jstr(letter, "image")) && strncmp(id, jstr(letter, "id"), 11) == 0);
        json_t     *wm = json_object_get(words, "messages"), *lm = json_object_get(letter, "messages");
        const char *question = jstr(json_array_get(wm, 0), "content");
        const char *answer = jstr(json_array_get(wm, 1), "content");
        char        key[16], id11[16];
        snprintf(id11, sizeof id11, "%.11s", id);
        tcap c;
        CHECK(parse_caption(dense_of(dense, id11), &c));
        int found = 0;
        for (int a = 0; a < c.n; a++) {
            bool by_color = sscanf(question, "What shape is the %15s object?", key) == 1 && !strcmp(key, c.o[a].color);
            bool by_shape = sscanf(question, "What color is the %15[a-z]?", key) == 1 && !strcmp(key, c.o[a].shape);
            found += by_color && !strcmp(answer, c.o[a].shape);
            found += by_shape && !strcmp(answer, c.o[a].color);
        }
        CHECK_MSG(found == 1, "%s: '%s' answered '%s' fits %d objects, not one", id, question, answer, found);
        const char *mcq = jstr(json_array_get(lm, 0), "content"), *gold = jstr(json_array_get(lm, 1), "content");
        char        opts[4][32];
        size_t      qlen = strlen(question);
        CHECK(strncmp(mcq, question, qlen) == 0);
        CHECK(sscanf(mcq + qlen,
                     "\n   - A) %31[^\n]\n   - B) %31[^\n]\n   - C) %31[^\n]\n   - D) %31[^\n]\n   - E) None of the above. "
                     "Answer the question with only the correct letter",
                     opts[0], opts[1], opts[2], opts[3]) == 4);
        CHECK(strlen(gold) == 1 && gold[0] >= 'A' && gold[0] <= 'D');
        if (strlen(gold) == 1 && gold[0] >= 'A' && gold[0] <= 'D') {
            per_letter[gold[0] - 'A']++;
            CHECK_MSG(!strcmp(opts[gold[0] - 'A'], answer), "%s: letter %s is '%s', not '%s'", jstr(letter, "id"),
                      gold, opts[gold[0] - 'A'], answer);
        }
        for (int a = 0; a < 4; a++) {
            for (int b = a + 1; b < 4; b++) {
                CHECK(strcmp(opts[a], opts[b]) != 0);
            }
        }
    }
    for (int l = 0; l < 4; l++) {
        CHECK_MSG(per_letter[l] * 8 > (int)json_array_size(keyed) / 2, "letter %c is the target of %d of %zu",
                  'A' + l, per_letter[l], json_array_size(keyed) / 2);
    }
}

static void check_reader_records(json_t *reader, json_t *dense) {
    int    n_f = 0, n_free = 0;
    size_t n = 0;
    for (size_t i = 0; i < json_array_size(reader); i++) {
        json_t     *rec = json_array_get(reader, i);
        const char *prompt = jstr(rec, "prompt"), *completion = jstr(rec, "completion");
        if (strncmp(jstr(rec, "kind"), "prism-", 6) == 0) {
            CHECK(i > 0);
            if (i > 0) {
                check_prism_record(rec, json_array_get(reader, i - 1));
            }
            continue;
        }
        if (strncmp(jstr(rec, "kind"), "free-", 5) == 0) {
            CHECK(i > 1);
            if (i > 1) {
                check_free_record(rec, json_array_get(reader, i - 2));
                n_free++;
            }
            continue;
        }
        n++;
        /* the filled caption and question: after the template's last "<Caption Start> " */
        char *caption = NULL, *question = NULL;
        CHECK(split_reader_prompt(prompt, &caption, &question));
        if (!caption) {
            continue;
        }
        char *rebuilt = caprl_synth_reader_prompt(NULL, caption, question);
        CHECK(strcmp(rebuilt, prompt) == 0);
        tcap c;
        tq   t;
        CHECK_MSG(parse_caption(caption, &c), "%s", caption);
        CHECK(parse_question(question, &t, false) && t.has_f && t.n_opt == 4);
        int  o = oracle(&t, &c);
        char want[8];
        snprintf(want, sizeof want, " %c.", o >= 0 ? 'A' + o : 'F');
        CHECK_MSG(o != UNPARSED && strcmp(completion, want) == 0, "%s: completion '%s', oracle '%s'\n%s\n%s",
                  jstr(rec, "id"), completion, want, caption, question);
        n_f += o < 0;
        /* the caption is the image's dense caption or a subset of its sentences */
        char id[32];
        snprintf(id, sizeof id, "%.11s", jstr(rec, "id"));
        tcap d;
        CHECK(parse_caption(dense_of(dense, id), &d));
        for (int k = 0; k < c.n; k++) {
            CHECK(find_obj(&d, c.o[k].color, c.o[k].shape, c.o[k].pos) != NULL);
        }
        free(rebuilt);
        free(caption);
        free(question);
    }
    /* both targets are well represented, and a fair share of the answerable questions have a free-form record */
    CHECK_MSG(n_f * 5 > (int)n && n_f * 5 < 4 * (int)n, "%d of %zu reader targets are F", n_f, n);
    CHECK_MSG(n_free * 3 > (int)n - n_f && n_free <= (int)n - n_f, "%d free-form records for %zu answerable", n_free,
              n - (size_t)n_f);
}

static const char *const k_files[] = {
    "scenes.jsonl",         "train.jsonl",          "test_qa.jsonl",       "leaky_ids.json",   "captions_dense.jsonl",
    "captions_short.jsonl", "sft_captioner.jsonl", "sft_reader.jsonl", "bench.jsonl",       "corpus.txt",
    "synth.json",
};

static void check_world(const char *dir, const caprl_synth_params *p) {
    json_t *scenes = load_jsonl(dir, "scenes.jsonl"), *dense = load_jsonl(dir, "captions_dense.jsonl");
    json_t *shrt = load_jsonl(dir, "captions_short.jsonl"), *train = load_jsonl(dir, "train.jsonl");
    json_t *test = load_jsonl(dir, "test_qa.jsonl"), *bench = load_jsonl(dir, "bench.jsonl");
    json_t *sftc = load_jsonl(dir, "sft_captioner.jsonl"), *reader = load_jsonl(dir, "sft_reader.jsonl");
    int64_t n_img = (int64_t)p->n_train + p->n_test;
    CHECK_EQ_I64(json_array_size(scenes), n_img);
    CHECK_EQ_I64(json_array_size(dense), n_img);
    CHECK_EQ_I64(json_array_size(shrt), n_img);
    CHECK_EQ_I64(json_array_size(train), p->n_train);
    CHECK_EQ_I64(json_array_size(sftc), p->n_train);
    CHECK_EQ_I64(json_array_size(test), p->n_test);

    /* Pixels of the written PNGs against scenes.jsonl (names mapped back through the vocabulary). */
    for (size_t i = 0; i < json_array_size(scenes); i++) {
        json_t           *sc = json_array_get(scenes, i);
        caprl_synth_scene s;
        memset(&s, 0, sizeof s);
        json_t *objs = json_object_get(sc, "objects");
        s.n = (int32_t)json_array_size(objs);
        CHECK(s.n >= p->min_objects && s.n <= p->max_objects);
        for (int32_t k = 0; k < s.n && k < 9; k++) {
            json_t *o = json_array_get(objs, (size_t)k);
            s.obj[k].shape = s.obj[k].color = s.obj[k].cell = s.obj[k].size = -1;
            for (int32_t v = 0; v < 9; v++) {
                if (v < CAPRL_SYNTH_N_SHAPES && !strcmp(jstr(o, "shape"), caprl_synth_shape_name(v))) {
                    s.obj[k].shape = v;
                }
                if (v < CAPRL_SYNTH_N_COLORS && !strcmp(jstr(o, "color"), caprl_synth_color_name(v))) {
                    s.obj[k].color = v;
                }
                if (v < CAPRL_SYNTH_N_SIZES && !strcmp(jstr(o, "size"), caprl_synth_size_name(v))) {
                    s.obj[k].size = v;
                }
                if (!strcmp(jstr(o, "position"), caprl_synth_cell_name(v))) {
                    s.obj[k].cell = v;
                }
            }
            CHECK(s.obj[k].shape >= 0 && s.obj[k].color >= 0 && s.obj[k].size >= 0 && s.obj[k].cell >= 0);
        }
        char       *img_path = path2(dir, jstr(sc, "image"));
        caprl_image img = {0};
        caprl_error err = {0};
        CHECK_OK(caprl_image_decode_file(img_path, NULL, &img, &err), &err);
        if (img.data) {
            CHECK(img.width == p->size && img.height == p->size);
            check_pixels(&s, p->size, img.data);
        }
        caprl_image_free(&img);
        free(img_path);
        /* the dense caption lists the same objects */
        tcap c;
        CHECK(parse_caption(jstr(json_array_get(dense, i), "caption"), &c) && c.n == s.n && c.count == s.n);
        CHECK(!strcmp(jstr(json_array_get(dense, i), "id"), jstr(sc, "id")));
    }

    /* QA against the dense captions; leaky questions only in train.jsonl, and exactly those of leaky_ids.json. */
    int n_leaky_train = 0, n_leaky_test = 0;
    check_qa_file(train, dense, true, &n_leaky_train);
    check_qa_file(test, dense, false, &n_leaky_test);
    CHECK_EQ_I64(n_leaky_train, (int64_t)p->n_train * p->leaky_per_image);
    char        *lp = path2(dir, "leaky_ids.json");
    json_error_t e;
    json_t      *leaky = json_load_file(lp, JSON_REJECT_DUPLICATES, &e);
    free(lp);
    CHECK_MSG(leaky != NULL, "leaky_ids.json: %s", e.text);
    json_t *list = json_object_get(leaky, "leaky");
    CHECK_EQ_I64(json_array_size(list), n_leaky_train);
    CHECK_EQ_I64(json_integer_value(json_object_get(leaky, "n_leaky")), n_leaky_train);
    for (size_t i = 0; i < json_array_size(list); i++) {
        json_t *ent = json_array_get(list, i);
        int     idx = (int)json_integer_value(json_object_get(ent, "index"));
        char    num[16];
        snprintf(num, sizeof num, "%.5s", jstr(ent, "id") + 6);
        json_t *rec = json_array_get(train, (size_t)atoi(num));
        CHECK(!strcmp(jstr(rec, "id"), jstr(ent, "id")));
        json_t *it = json_array_get(json_object_get(rec, "qa"), (size_t)idx);
        CHECK(it && !strcmp(jstr(it, "question"), jstr(ent, "question")) &&
              !strcmp(jstr(it, "answer"), jstr(ent, "answer")));
        tq t;
        CHECK(parse_question(jstr(ent, "question"), &t, false) && oracle(&t, NULL) == jstr(ent, "answer")[0] - 'A');
    }
    json_decref(leaky);

    /* Benchmark: the test questions in Prism form, gold from the dense caption. */
    size_t n_test_q = 0;
    for (size_t i = 0; i < json_array_size(test); i++) {
        n_test_q += json_array_size(json_object_get(json_array_get(test, i), "qa"));
    }
    CHECK_EQ_I64(json_array_size(bench), n_test_q);
    for (size_t i = 0; i < json_array_size(bench); i++) {
        json_t *b = json_array_get(bench, i);
        char    id[32];
        snprintf(id, sizeof id, "%.10s", jstr(b, "id"));
        tcap c;
        tq   t;
        CHECK(parse_caption(dense_of(dense, id), &c));
        CHECK(parse_question(jstr(b, "question"), &t, true) && t.n_opt == 4);
        CHECK(!strcmp(jstr(b, "type"), "multiple_choice"));
        CHECK(oracle(&t, &c) == jstr(b, "answer")[0] - 'A');
        CHECK(strncmp(jstr(b, "image"), "images/test/", 12) == 0);
    }

    /* SFT data. */
    for (size_t i = 0; i < json_array_size(sftc); i++) {
        json_t *rec = json_array_get(sftc, i), *msgs = json_object_get(rec, "messages");
        CHECK(json_array_size(msgs) == 2);
        CHECK(!strcmp(jstr(json_array_get(msgs, 0), "role"), "user") &&
              !strcmp(jstr(json_array_get(msgs, 0), "content"), "Please describe this image in detail."));
        CHECK(!strcmp(jstr(json_array_get(msgs, 1), "role"), "assistant") &&
              !strcmp(jstr(json_array_get(msgs, 1), "content"), jstr(json_array_get(shrt, i), "caption")));
        CHECK(!strcmp(jstr(rec, "image"), jstr(json_array_get(shrt, i), "image")));
        tcap c;
        CHECK(parse_caption(jstr(json_array_get(shrt, i), "caption"), &c) && c.n >= 1 && c.n <= 2 && c.count < 0);
    }
    size_t n_free = 0;
    for (size_t i = 0; i < json_array_size(reader); i++) {
        n_free += strncmp(jstr(json_array_get(reader, i), "kind"), "free-", 5) == 0;
    }
    CHECK_EQ_I64(json_array_size(reader) - n_free, 2 * (int64_t)p->n_train * p->qa_per_image);
    check_reader_records(reader, dense);
    json_t *bind = load_jsonl(dir, "sft_reader_bind.jsonl");
    CHECK_EQ_I64(json_array_size(bind), 24 * (int64_t)p->n_train);
    check_bind_records(bind);
    json_decref(bind);
    /* perception records: every training image with its dense caption, under an instruction of their own */
    json_t *describe = load_jsonl(dir, "sft_describe.jsonl");
    CHECK_EQ_I64(json_array_size(describe), p->n_train);
    for (size_t i = 0; i < json_array_size(describe); i++) {
        json_t *rec = json_array_get(describe, i), *msgs = json_object_get(rec, "messages");
        CHECK(!strcmp(jstr(rec, "image"), jstr(json_array_get(dense, i), "image")));
        CHECK(!strcmp(jstr(json_array_get(msgs, 0), "content"), "List every object in this image."));
        CHECK(!strcmp(jstr(json_array_get(msgs, 1), "content"), jstr(json_array_get(dense, i), "caption")));
    }
    json_decref(describe);
    json_t *keyed = load_jsonl(dir, "sft_filter_keyed.jsonl");
    check_keyed_records(keyed, dense, p->n_train);
    json_decref(keyed);

    /* The corpus holds every caption. */
    char  *cp = path2(dir, "corpus.txt");
    size_t n;
    char  *corpus = read_all(cp, &n);
    free(cp);
    CHECK(corpus != NULL);
    for (size_t i = 0; corpus && i < json_array_size(dense); i++) {
        CHECK(strstr(corpus, jstr(json_array_get(dense, i), "caption")) != NULL);
        CHECK(strstr(corpus, jstr(json_array_get(shrt, i), "caption")) != NULL);
    }
    free(corpus);
    json_decref(scenes);
    json_decref(dense);
    json_decref(shrt);
    json_decref(train);
    json_decref(test);
    json_decref(bench);
    json_decref(sftc);
    json_decref(reader);
}

static void test_write(void) {
    char              *root = test_tmpdir("synth");
    char              *d1 = path2(root, "a"), *d2 = path2(root, "b/c");
    caprl_synth_params p = caprl_synth_default_params();
    p.n_train = 24;
    p.n_test = 6;
    p.seed = 11;
    p.n_threads = 1;
    caprl_error         err = {0};
    caprl_synth_summary sum;
    CHECK_OK(caprl_synth_write(d1, &p, &sum, &err), &err);
    CHECK_EQ_I64(sum.n_images, 30);
    CHECK_EQ_I64(sum.n_train_questions, 24 * 9);
    CHECK_EQ_I64(sum.n_leaky, 24);
    CHECK_EQ_I64(sum.n_reader_records, 24 * 8);
    check_world(d1, &p);

    /* Same bytes at another thread count, in a directory that does not exist yet. */
    p.n_threads = 3;
    CHECK_OK(caprl_synth_write(d2, &p, NULL, &err), &err);
    for (size_t k = 0; k < sizeof k_files / sizeof *k_files; k++) {
        char *a = path2(d1, k_files[k]), *b = path2(d2, k_files[k]);
        CHECK_MSG(same_file(a, b), "%s differs", k_files[k]);
        free(a);
        free(b);
    }
    for (int split = 0; split < 2; split++) {
        for (int i = 0; i < (split ? 6 : 24); i++) {
            char rel[64];
            snprintf(rel, sizeof rel, "images/%s/%05d.png", split ? "test" : "train", i);
            char *a = path2(d1, rel), *b = path2(d2, rel);
            CHECK_MSG(same_file(a, b), "%s differs", rel);
            free(a);
            free(b);
        }
    }
    char *it = path2(d1, "images/train"), *ie = path2(d1, "images/test");
    CHECK(count_tmp_files(d1) == 0 && count_tmp_files(it) == 0 && count_tmp_files(ie) == 0);
    free(it);
    free(ie);

    /* Rerunning over an existing world replaces it; a different seed changes it. */
    p.seed = 12;
    CHECK_OK(caprl_synth_write(d2, &p, NULL, &err), &err);
    char *a = path2(d1, "train.jsonl"), *b = path2(d2, "train.jsonl");
    CHECK(!same_file(a, b));
    free(a);
    free(b);

    /* A failed run leaves no manifest: images/ is a regular file here, so the run stops before any text. */
    char *d3 = path2(root, "bad"), *man = path2(d3, "synth.json"), *img = path2(d3, "images");
    mkdir(d3, 0755);
    FILE *f = fopen(man, "w");
    fputs("{}", f);
    fclose(f);
    f = fopen(img, "w");
    fclose(f);
    CHECK_EQ_I64(caprl_synth_write(d3, &p, NULL, &err), CAPRL_ERR_IO);
    CHECK(strstr(err.msg, "images") != NULL);
    struct stat st;
    CHECK(stat(man, &st) != 0);
    free(d3);
    free(man);
    free(img);

    /* Bad parameters name the field. */
    caprl_synth_params bad = caprl_synth_default_params();
    bad.size = 70;
    CHECK_EQ_I64(caprl_synth_params_check(&bad, &err), CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "size") && strstr(err.msg, "multiple of 28"));
    bad = caprl_synth_default_params();
    bad.n_train = -1;
    CHECK_EQ_I64(caprl_synth_write(d1, &bad, NULL, &err), CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "train") != NULL);
    bad = caprl_synth_default_params();
    bad.min_objects = 5;
    bad.max_objects = 4;
    CHECK_EQ_I64(caprl_synth_params_check(&bad, &err), CAPRL_ERR_INVALID_ARG);
    bad = caprl_synth_default_params();
    bad.leaky_per_image = 5;
    CHECK_EQ_I64(caprl_synth_params_check(&bad, &err), CAPRL_ERR_INVALID_ARG);
    bad = caprl_synth_default_params();
    bad.size = 28;
    CHECK_EQ_I64(caprl_synth_params_check(&bad, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_OK(caprl_synth_params_check(&p, &err), &err);

    free(d1);
    free(d2);
    free(root);
}

int main(void) {
    test_reader_template();
    test_scenes();
    test_render_and_png();
    test_questions();
    test_write();
    return test_finish("test_synth");
}
