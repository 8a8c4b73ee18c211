/* The synthetic world: scenes, drawing, captions, questions and the reader prompt (see synth_impl.h).
 *
 * Why this world looks the way it does:
 * - 3x3 grid at 84 x 84 pixels by default: one cell is 28 x 28 pixels, exactly one Qwen2.5-VL merged token
 *   (2 x 2 patches of 14), so the 9 image tokens of the tiny captioner line up with the 9 places an object can be.
 *   At 56 pixels a 3x3 grid would cut objects across patches, and a 2x2 grid cannot hold 6 objects.
 * - 4 shapes x 6 colours x 2 sizes, a grey background (one shade per grid cell) that every colour stands out from, no anti-aliasing: a
 *   vocabulary a tiny vision tower learns quickly, and pixels a test can check exactly.
 * - Captions use one fixed sentence per object, in reading order; the short caption is the dense one cut down to
 *   one or two objects, so "describe more" is a small step for a policy that learnt the short ones.
 * - Questions name objects only through properties that are unique in the scene and always have four options,
 *   drawn to be plausible (colours and places of other objects, shapes and colours that are in the scene).
 *
 * Randomness: one Philox stream per (seed, split, image, purpose), so scenes, valid questions, leaky questions
 * and captions can each change without moving the others. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/reward.h"
#include "core/error_impl.h"
#include "data/synth_impl.h"

void caprl_synth_background(int32_t cell, uint8_t rgb[3]) {
    uint8_t grey = (uint8_t)(100 + 7 * cell);
    rgb[0] = rgb[1] = rgb[2] = grey;
}

static const char *const k_shapes[CAPRL_SYNTH_N_SHAPES] = {"circle", "square", "triangle", "diamond"};
static const char *const k_shapes_plural[CAPRL_SYNTH_N_SHAPES] = {"circles", "squares", "triangles", "diamonds"};
static const char *const k_colors[CAPRL_SYNTH_N_COLORS] = {"red", "green", "blue", "yellow", "white", "black"};
static const uint8_t     k_rgb[CAPRL_SYNTH_N_COLORS][3] = {
    {220, 40, 40}, {40, 170, 60}, {40, 80, 230}, {240, 220, 40}, {250, 250, 250}, {20, 20, 20},
};
static const char *const k_sizes[CAPRL_SYNTH_N_SIZES] = {"small", "large"};
static const char *const k_cells[CAPRL_SYNTH_N_CELLS] = {
    "top left", "top middle", "top right", "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
};


const char *caprl_synth_shape_name(int32_t shape) {
    CAPRL_ASSERT(shape >= 0 && shape < CAPRL_SYNTH_N_SHAPES);
    return k_shapes[shape];
}

const char *caprl_synth_shape_plural(int32_t shape) {
    CAPRL_ASSERT(shape >= 0 && shape < CAPRL_SYNTH_N_SHAPES);
    return k_shapes_plural[shape];
}

const char *caprl_synth_color_name(int32_t color) {
    CAPRL_ASSERT(color >= 0 && color < CAPRL_SYNTH_N_COLORS);
    return k_colors[color];
}

const char *caprl_synth_size_name(int32_t size) {
    CAPRL_ASSERT(size >= 0 && size < CAPRL_SYNTH_N_SIZES);
    return k_sizes[size];
}

const char *caprl_synth_cell_name(int32_t cell) {
    CAPRL_ASSERT(cell >= 0 && cell < CAPRL_SYNTH_N_CELLS);
    return k_cells[cell];
}

void caprl_synth_color_rgb(int32_t color, uint8_t rgb[3]) {
    CAPRL_ASSERT(color >= 0 && color < CAPRL_SYNTH_N_COLORS);
    memcpy(rgb, k_rgb[color], 3);
}

void caprl_synth_rng(caprl_rng *r, uint64_t seed, int32_t split, int64_t index, int32_t purpose) {
    caprl_rng_init(r, seed, ((uint64_t)(uint32_t)split << 40) ^ (uint64_t)index, (uint64_t)purpose);
}

static int32_t below(caprl_rng *r, int32_t n) {
    return (int32_t)caprl_rng_below(r, (uint64_t)n);
}

static void shuffle_i32(caprl_rng *r, int32_t *a, int32_t n) {
    for (int32_t i = n - 1; i > 0; i--) {
        int32_t j = below(r, i + 1);
        int32_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

/* ---- scenes ----------------------------------------------------------------------------------------------- */

void caprl_synth_scene_make(caprl_synth_scene *s, uint64_t seed, int32_t split, int64_t index, int32_t min_obj,
                            int32_t max_obj) {
    CAPRL_ASSERT(min_obj >= 1 && min_obj <= max_obj && max_obj <= CAPRL_SYNTH_N_CELLS);
    caprl_rng r;
    caprl_synth_rng(&r, seed, split, index, CAPRL_SYNTH_PURPOSE_SCENE);
    memset(s, 0, sizeof *s);
    s->n = min_obj + below(&r, max_obj - min_obj + 1);
    int32_t cells[CAPRL_SYNTH_N_CELLS];
    for (int32_t i = 0; i < CAPRL_SYNTH_N_CELLS; i++) {
        cells[i] = i;
    }
    for (int32_t i = 0; i < s->n; i++) { /* partial Fisher-Yates: the first n are a uniform n-subset */
        int32_t j = i + below(&r, CAPRL_SYNTH_N_CELLS - i);
        int32_t t = cells[i];
        cells[i] = cells[j];
        cells[j] = t;
    }
    for (int32_t i = 1; i < s->n; i++) { /* reading order */
        int32_t v = cells[i], j = i;
        for (; j > 0 && cells[j - 1] > v; j--) {
            cells[j] = cells[j - 1];
        }
        cells[j] = v;
    }
    /* (shape, colour) drawn uniformly among the pairs not used yet, so each pair names one object. */
    bool used[CAPRL_SYNTH_N_SHAPES * CAPRL_SYNTH_N_COLORS] = {false};
    for (int32_t i = 0; i < s->n; i++) {
        int32_t k = below(&r, CAPRL_SYNTH_N_SHAPES * CAPRL_SYNTH_N_COLORS - i), pair = 0;
        for (;; pair++) {
            if (!used[pair] && k-- == 0) {
                break;
            }
        }
        used[pair] = true;
        s->obj[i].shape = pair / CAPRL_SYNTH_N_COLORS;
        s->obj[i].color = pair % CAPRL_SYNTH_N_COLORS;
        s->obj[i].size = below(&r, CAPRL_SYNTH_N_SIZES);
        s->obj[i].cell = cells[i];
    }
}

/* ---- drawing ---------------------------------------------------------------------------------------------- */

/* Half extent in 1/6 pixel: 0.4 (large) or 0.225 (small) of a cell side size / 3, times 6. */
static int64_t half_extent6(int32_t size, int32_t obj_size) {
    return obj_size == CAPRL_SYNTH_LARGE ? (int64_t)size * 4 / 5 : (int64_t)size * 9 / 20;
}

static bool inside6(int32_t shape, int64_t dx, int64_t dy, int64_t h) {
    int64_t ax = dx < 0 ? -dx : dx, ay = dy < 0 ? -dy : dy;
    switch (shape) {
        case CAPRL_SYNTH_CIRCLE: return dx * dx + dy * dy <= h * h;
        case CAPRL_SYNTH_SQUARE: return ax <= h && ay <= h;
        case CAPRL_SYNTH_DIAMOND: return ax + ay <= h;
        default: return dy >= -h && dy <= h && 2 * ax <= dy + h; /* triangle, apex up */
    }
}

void caprl_synth_render(const caprl_synth_scene *s, int32_t size, uint8_t *px) {
    CAPRL_ASSERT(size > 0);
    size_t n_px = (size_t)size * (size_t)size;
    for (size_t i = 0; i < n_px; i++) {
        size_t  x = i % (size_t)size, y = i / (size_t)size;
        int32_t cell = (int32_t)(y * CAPRL_SYNTH_GRID / (size_t)size) * CAPRL_SYNTH_GRID +
                       (int32_t)(x * CAPRL_SYNTH_GRID / (size_t)size);
        caprl_synth_background(cell, px + 3 * i);
    }
    for (int32_t k = 0; k < s->n; k++) {
        const caprl_synth_object *o = &s->obj[k];
        int64_t cx = (int64_t)(2 * (o->cell % CAPRL_SYNTH_GRID) + 1) * size; /* 1/6 pixel units */
        int64_t cy = (int64_t)(2 * (o->cell / CAPRL_SYNTH_GRID) + 1) * size;
        int64_t h = half_extent6(size, o->size);
        /* pixels whose centre 6x + 3 can lie within [c - h, c + h] */
        int64_t x0 = (cx - h - 3) / 6, x1 = (cx + h - 3) / 6 + 1;
        int64_t y0 = (cy - h - 3) / 6, y1 = (cy + h - 3) / 6 + 1;
        x0 = x0 < 0 ? 0 : x0;
        y0 = y0 < 0 ? 0 : y0;
        x1 = x1 > size - 1 ? size - 1 : x1;
        y1 = y1 > size - 1 ? size - 1 : y1;
        for (int64_t y = y0; y <= y1; y++) {
            for (int64_t x = x0; x <= x1; x++) {
                if (inside6(o->shape, 6 * x + 3 - cx, 6 * y + 3 - cy, h)) {
                    memcpy(px + 3 * ((size_t)y * (size_t)size + (size_t)x), k_rgb[o->color], 3);
                }
            }
        }
    }
}

/* ---- growing strings -------------------------------------------------------------------------------------- */

typedef struct str {
    char  *p;
    size_t len, cap;
} str;

static void str_add(str *b, const char *s) {
    size_t n = strlen(s);
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->len + n + 1 > cap) {
            cap *= 2;
        }
        b->p = caprl_xrealloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n + 1);
    b->len += n;
}

/* ---- captions --------------------------------------------------------------------------------------------- */

char *caprl_synth_caption(const caprl_synth_scene *s, uint32_t listed, bool count_sentence) {
    str  b = {0};
    char line[128];
    str_add(&b, ""); /* an empty caption is "", not NULL */
    if (count_sentence) {
        if (s->n == 1) {
            str_add(&b, "There is 1 object.");
        } else {
            snprintf(line, sizeof line, "There are %d objects.", (int)s->n);
            str_add(&b, line);
        }
    }
    for (int32_t i = 0; i < s->n; i++) {
        if (!(listed >> i & 1u)) {
            continue;
        }
        const caprl_synth_object *o = &s->obj[i];
        snprintf(line, sizeof line, "%sA %s %s %s at the %s.", b.len ? " " : "", k_sizes[o->size], k_colors[o->color],
                 k_shapes[o->shape], k_cells[o->cell]);
        str_add(&b, line);
    }
    return b.p;
}

uint32_t caprl_synth_subset(caprl_rng *r, int32_t n, int32_t k) {
    CAPRL_ASSERT(k >= 0 && k <= n && n <= CAPRL_SYNTH_N_CELLS);
    int32_t idx[CAPRL_SYNTH_N_CELLS];
    for (int32_t i = 0; i < n; i++) {
        idx[i] = i;
    }
    uint32_t mask = 0;
    for (int32_t i = 0; i < k; i++) {
        int32_t j = i + below(r, n - i);
        int32_t t = idx[i];
        idx[i] = idx[j];
        idx[j] = t;
        mask |= 1u << idx[i];
    }
    return mask;
}

uint32_t caprl_synth_short_listed(const caprl_synth_scene *s, uint64_t seed, int32_t split, int64_t index) {
    caprl_rng r;
    caprl_synth_rng(&r, seed, split, index, CAPRL_SYNTH_PURPOSE_CAPTION);
    int32_t k = s->n >= 2 ? 1 + below(&r, 2) : 1;
    return caprl_synth_subset(&r, s->n, k);
}

/* ---- questions -------------------------------------------------------------------------------------------- */

bool caprl_synth_answerable(const caprl_synth_question *q, uint32_t listed, bool count_sentence) {
    if (q->no_caption) {
        return false;
    }
    if (q->needs_count) {
        return count_sentence;
    }
    if ((q->need_a & listed) == q->need_a) {
        return true;
    }
    if (q->need_b != 0 && (q->need_b & listed) == q->need_b) {
        return true;
    }
    return (q->gold_shown & listed) != 0;
}

/* Indices of the scene's objects by property, and the (shape, colour) pairs it lacks. */
typedef struct scene_index {
    int32_t n_shape[CAPRL_SYNTH_N_SHAPES];
    int32_t n_color[CAPRL_SYNTH_N_COLORS];
    int32_t n_size[CAPRL_SYNTH_N_SIZES];
    bool    has_pair[CAPRL_SYNTH_N_SHAPES * CAPRL_SYNTH_N_COLORS];
    bool    occupied[CAPRL_SYNTH_N_CELLS];
} scene_index;

static void index_scene(const caprl_synth_scene *s, scene_index *ix) {
    memset(ix, 0, sizeof *ix);
    for (int32_t i = 0; i < s->n; i++) {
        const caprl_synth_object *o = &s->obj[i];
        ix->n_shape[o->shape]++;
        ix->n_color[o->color]++;
        ix->n_size[o->size]++;
        ix->has_pair[o->shape * CAPRL_SYNTH_N_COLORS + o->color] = true;
        ix->occupied[o->cell] = true;
    }
}

/* Option 0 is the gold; the rest come from the candidates, preferred ones first (each group shuffled). Values are
 * turned into text by name. n_pref + n_rest >= 3. */
static void fill_options(caprl_rng *r, caprl_synth_question *q, int32_t gold, int32_t *pref, int32_t n_pref,
                         int32_t *rest, int32_t n_rest, const char *(*name)(int32_t)) {
    CAPRL_ASSERT(n_pref + n_rest >= CAPRL_SYNTH_N_OPTIONS - 1);
    shuffle_i32(r, pref, n_pref);
    shuffle_i32(r, rest, n_rest);
    snprintf(q->options[0], CAPRL_SYNTH_OPTION_CAP, "%s", name(gold));
    for (int32_t k = 1; k < CAPRL_SYNTH_N_OPTIONS; k++) {
        int32_t v = k - 1 < n_pref ? pref[k - 1] : rest[k - 1 - n_pref];
        snprintf(q->options[k], CAPRL_SYNTH_OPTION_CAP, "%s", name(v));
    }
    q->gold = 0;
}

/* Shuffles the options so that the gold letter is uniform. */
static void shuffle_options(caprl_rng *r, caprl_synth_question *q) {
    int32_t order[CAPRL_SYNTH_N_OPTIONS] = {0, 1, 2, 3};
    shuffle_i32(r, order, CAPRL_SYNTH_N_OPTIONS);
    char    tmp[CAPRL_SYNTH_N_OPTIONS][CAPRL_SYNTH_OPTION_CAP];
    int32_t gold = 0;
    for (int32_t k = 0; k < CAPRL_SYNTH_N_OPTIONS; k++) {
        memcpy(tmp[k], q->options[order[k]], CAPRL_SYNTH_OPTION_CAP);
        if (order[k] == q->gold) {
            gold = k;
        }
    }
    memcpy(q->options, tmp, sizeof tmp);
    q->gold = gold;
}

static const char *name_color(int32_t v) {
    return k_colors[v];
}

static const char *name_shape(int32_t v) {
    return k_shapes[v];
}

static const char *name_cell(int32_t v) {
    return k_cells[v];
}

static const char *name_count(int32_t v) {
    static const char *const digits[10] = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};
    return digits[v];
}

/* Distractor values of a property: the other values, split into those the scene has (pref) and the rest. */
static void split_values(const int32_t *count, int32_t n_values, int32_t gold, int32_t *pref, int32_t *n_pref,
                         int32_t *rest, int32_t *n_rest) {
    *n_pref = *n_rest = 0;
    for (int32_t v = 0; v < n_values; v++) {
        if (v == gold) {
            continue;
        }
        if (count[v] > 0) {
            pref[(*n_pref)++] = v;
        } else {
            rest[(*n_rest)++] = v;
        }
    }
}

/* Distractors by property: the scene's other values first (the lookup style: the caption must say which object has
 * which), or, in the absent style, values the scene lacks first (a caption that names the gold value anywhere
 * answers, one that does not gives nothing to choose by). */
static void options_of(caprl_rng *r, const int32_t *count, int32_t n_values, int32_t gold, bool absent_first,
                       const char *(*name)(int32_t), caprl_synth_question *q) {
    int32_t pref[CAPRL_SYNTH_N_CELLS], rest[CAPRL_SYNTH_N_CELLS], np, nr;
    CAPRL_ASSERT(n_values <= CAPRL_SYNTH_N_CELLS);
    split_values(count, n_values, gold, pref, &np, rest, &nr);
    if (absent_first) {
        fill_options(r, q, gold, rest, nr, pref, np, name);
    } else {
        fill_options(r, q, gold, pref, np, rest, nr, name);
    }
}

static void options_color(caprl_rng *r, const scene_index *ix, int32_t gold, bool absent_first,
                          caprl_synth_question *q) {
    options_of(r, ix->n_color, CAPRL_SYNTH_N_COLORS, gold, absent_first, name_color, q);
}

static void options_shape(caprl_rng *r, const scene_index *ix, int32_t gold, bool absent_first,
                          caprl_synth_question *q) {
    options_of(r, ix->n_shape, CAPRL_SYNTH_N_SHAPES, gold, absent_first, name_shape, q);
}

static void options_cell(caprl_rng *r, const scene_index *ix, int32_t gold, bool absent_first,
                         caprl_synth_question *q) {
    int32_t occ[CAPRL_SYNTH_N_CELLS];
    for (int32_t c = 0; c < CAPRL_SYNTH_N_CELLS; c++) {
        occ[c] = ix->occupied[c] ? 1 : 0;
    }
    options_of(r, occ, CAPRL_SYNTH_N_CELLS, gold, absent_first, name_cell, q);
}

/* Four consecutive counts within [lo, hi] holding gold at a random rank (where the range allows). */
static void options_count(caprl_rng *r, int32_t gold, int32_t lo, int32_t hi, caprl_synth_question *q) {
    int32_t first = gold - below(r, CAPRL_SYNTH_N_OPTIONS);
    first = first < lo ? lo : first;
    first = first > hi - 3 ? hi - 3 : first;
    int32_t others[CAPRL_SYNTH_N_OPTIONS - 1], n = 0;
    for (int32_t v = first; v < first + CAPRL_SYNTH_N_OPTIONS; v++) {
        if (v != gold) {
            others[n++] = v;
        }
    }
    fill_options(r, q, gold, others, n, NULL, 0, name_count);
}

static int32_t obj_pair(const caprl_synth_object *o) {
    return o->shape * CAPRL_SYNTH_N_COLORS + o->color;
}

static void pair_text(char *out, const char *article, int32_t pair) {
    snprintf(out, CAPRL_SYNTH_OPTION_CAP, "%s %s %s", article, k_colors[pair % CAPRL_SYNTH_N_COLORS],
             k_shapes[pair / CAPRL_SYNTH_N_COLORS]);
}

/* The (shape, colour) pairs absent from the scene, shuffled, then ordered by how much they share with the scene's
 * objects. Lookup style: pairs sharing a shape or a colour with an object first (plausible distractors). Absent
 * style: pairs sharing nothing first, then those sharing only the shape, then the colour (so that the caption's
 * colour words tell the gold apart where the scene allows). Returns how many (>= 24 - 9). */
static int32_t absent_pairs(caprl_rng *r, const scene_index *ix, bool absent_first, int32_t *out) {
    enum { N_PAIRS = CAPRL_SYNTH_N_SHAPES * CAPRL_SYNTH_N_COLORS };
    int32_t tier[3][N_PAIRS], n_tier[3] = {0, 0, 0};
    for (int32_t p = 0; p < N_PAIRS; p++) {
        if (ix->has_pair[p]) {
            continue;
        }
        bool shares_shape = ix->n_shape[p / CAPRL_SYNTH_N_COLORS] > 0;
        bool shares_color = ix->n_color[p % CAPRL_SYNTH_N_COLORS] > 0;
        int32_t t = absent_first ? (shares_color ? 2 : shares_shape ? 1 : 0) : (shares_shape || shares_color ? 0 : 2);
        tier[t][n_tier[t]++] = p;
    }
    int32_t n = 0;
    for (int32_t t = 0; t < 3; t++) {
        shuffle_i32(r, tier[t], n_tier[t]);
        memcpy(out + n, tier[t], (size_t)n_tier[t] * sizeof *out);
        n += n_tier[t];
    }
    return n;
}

/* "Which of these objects is <size>?": gold one object of that size, distractors objects of the other size, then
 * absent pairs. Needs at least one object of each size. */
static void make_size(caprl_rng *r, const caprl_synth_scene *s, const scene_index *ix, int32_t size,
                      bool absent_first, caprl_synth_question *q) {
    int32_t same[CAPRL_SYNTH_N_CELLS], other[CAPRL_SYNTH_N_CELLS], ns = 0, no = 0;
    for (int32_t i = 0; i < s->n; i++) {
        if (s->obj[i].size == size) {
            same[ns++] = i;
        } else {
            other[no++] = i;
        }
    }
    CAPRL_ASSERT(ns > 0 && no > 0);
    int32_t gold = same[below(r, ns)];
    shuffle_i32(r, other, no);
    int32_t absent[CAPRL_SYNTH_N_SHAPES * CAPRL_SYNTH_N_COLORS];
    (void)absent_pairs(r, ix, absent_first, absent);
    snprintf(q->text, sizeof q->text, "Which of these objects is %s?", k_sizes[size]);
    pair_text(q->options[0], "the", obj_pair(&s->obj[gold]));
    q->need_a = 1u << gold;
    uint32_t distractors = 0;
    for (int32_t k = 1; k < CAPRL_SYNTH_N_OPTIONS; k++) {
        if (k - 1 < no) {
            pair_text(q->options[k], "the", obj_pair(&s->obj[other[k - 1]]));
            distractors |= 1u << other[k - 1];
        } else {
            pair_text(q->options[k], "the", absent[k - 1 - no]);
        }
    }
    /* Elimination works only when every distractor is an object the caption can call the other size. */
    q->need_b = no >= CAPRL_SYNTH_N_OPTIONS - 1 ? distractors : 0;
    q->gold = 0;
}

static void make_exists(caprl_rng *r, const caprl_synth_scene *s, const scene_index *ix, int32_t obj,
                        bool absent_first, caprl_synth_question *q) {
    int32_t absent[CAPRL_SYNTH_N_SHAPES * CAPRL_SYNTH_N_COLORS];
    (void)absent_pairs(r, ix, absent_first, absent);
    snprintf(q->text, sizeof q->text, "Which of these objects is in the image?");
    pair_text(q->options[0], "a", obj_pair(&s->obj[obj]));
    for (int32_t k = 1; k < CAPRL_SYNTH_N_OPTIONS; k++) {
        pair_text(q->options[k], "a", absent[k - 1]);
    }
    q->need_a = 1u << obj;
    q->gold = 0;
}

/* Needs at least 3 objects: all three present ones must be listed to single out the absent one. */
static void make_not_exists(caprl_rng *r, const caprl_synth_scene *s, const scene_index *ix,
                            bool absent_first, caprl_synth_question *q) {
    int32_t absent[CAPRL_SYNTH_N_SHAPES * CAPRL_SYNTH_N_COLORS], objs[CAPRL_SYNTH_N_CELLS];
    (void)absent_pairs(r, ix, absent_first, absent);
    for (int32_t i = 0; i < s->n; i++) {
        objs[i] = i;
    }
    shuffle_i32(r, objs, s->n);
    snprintf(q->text, sizeof q->text, "Which of these objects is not in the image?");
    pair_text(q->options[0], "a", absent[0]);
    q->need_a = 0;
    for (int32_t k = 1; k < CAPRL_SYNTH_N_OPTIONS; k++) {
        pair_text(q->options[k], "a", obj_pair(&s->obj[objs[k - 1]]));
        q->need_a |= 1u << objs[k - 1];
    }
    q->gold = 0;
}

static void describe(char *out, const caprl_synth_object *o) {
    snprintf(out, CAPRL_SYNTH_OPTION_CAP, "a %s %s %s at the %s", k_sizes[o->size], k_colors[o->color],
             k_shapes[o->shape], k_cells[o->cell]);
}

enum { ATTR_COLOR, ATTR_SHAPE, ATTR_CELL };

static caprl_synth_object with_attr(caprl_synth_object o, int32_t attr, int32_t value) {
    *(attr == ATTR_COLOR ? &o.color : attr == ATTR_SHAPE ? &o.shape : &o.cell) = value;
    return o;
}

/* Statement form about object obj: its full description (the words of the caption's sentence for it) against three
 * near misses that change one attribute, attr, to values no object of the scene has together with the other three
 * (another object of the same size, colour and shape may sit at a near miss's cell: those cells are left out). The
 * line depends on attr, so an image asks at most one of each. false when fewer than three near misses exist. */
static bool make_statement(caprl_rng *r, const caprl_synth_scene *s, int32_t obj, int32_t attr,
                           caprl_synth_question *q) {
    static const char *const lines[3] = {"Which of these objects does the image show?",
                                         "Which of these objects appears in the image?",
                                         "Which of these descriptions matches an object in the image?"};
    static const int32_t     n_values[3] = {CAPRL_SYNTH_N_COLORS, CAPRL_SYNTH_N_SHAPES, CAPRL_SYNTH_N_CELLS};
    const caprl_synth_object *o = &s->obj[obj];
    int32_t                   miss[CAPRL_SYNTH_N_CELLS], n_miss = 0;
    for (int32_t v = 0; v < n_values[attr]; v++) {
        caprl_synth_object x = with_attr(*o, attr, v);
        bool               present = false;
        for (int32_t i = 0; i < s->n; i++) {
            const caprl_synth_object *y = &s->obj[i];
            present = present || (y->size == x.size && y->color == x.color && y->shape == x.shape && y->cell == x.cell);
        }
        if (!present) {
            miss[n_miss++] = v;
        }
    }
    if (n_miss < CAPRL_SYNTH_N_OPTIONS - 1) {
        return false;
    }
    shuffle_i32(r, miss, n_miss);
    q->type = CAPRL_SYNTH_Q_STATEMENT;
    snprintf(q->text, sizeof q->text, "%s", lines[attr]);
    describe(q->options[0], o);
    for (int32_t k = 1; k < CAPRL_SYNTH_N_OPTIONS; k++) {
        caprl_synth_object x = with_attr(*o, attr, miss[k - 1]);
        describe(q->options[k], &x);
    }
    q->need_a = 1u << obj;
    q->gold = 0;
    return true;
}

/* The attribute a question about one object (a type up to POSITION) asks for. */
static int32_t attr_asked(int32_t t) {
    return t == CAPRL_SYNTH_Q_POSITION                                    ? ATTR_CELL
           : t == CAPRL_SYNTH_Q_COLOR_AT || t == CAPRL_SYNTH_Q_COLOR_OF_SHAPE ? ATTR_COLOR
                                                                              : ATTR_SHAPE;
}

/* The absent style's rule for a question about one attribute (attr) of an object: no object of the scene may have
 * a distractor's value. Sets gold_shown to the objects with the gold value; false when the rule fails. */
static bool distractors_absent(const caprl_synth_scene *s, int32_t attr, caprl_synth_question *q) {
    for (int32_t i = 0; i < s->n; i++) {
        const caprl_synth_object *o = &s->obj[i];
        const char *v = attr == ATTR_COLOR ? k_colors[o->color] : attr == ATTR_SHAPE ? k_shapes[o->shape]
                                                                                      : k_cells[o->cell];
        for (int32_t k = 0; k < CAPRL_SYNTH_N_OPTIONS; k++) {
            if (strcmp(v, q->options[k]) == 0) {
                if (k != q->gold) {
                    return false;
                }
                q->gold_shown |= 1u << i;
            }
        }
    }
    return true;
}

/* One valid question of type t about arg (an object index, a size, a colour or a shape, by type); in the statement
 * style the colour, shape and position types become statement questions about the object. false when the scene
 * cannot give that question (in the absent style: when three values of the attribute asked are not left absent). */
static bool make_valid(caprl_rng *r, const caprl_synth_scene *s, const scene_index *ix, int32_t t, int32_t arg,
                       int32_t style, caprl_synth_question *q) {
    memset(q, 0, sizeof *q);
    if (style == CAPRL_SYNTH_STATEMENT && t <= CAPRL_SYNTH_Q_POSITION) {
        if (!make_statement(r, s, arg, attr_asked(t), q)) {
            return false;
        }
        shuffle_options(r, q);
        return true;
    }
    q->type = t;
    bool absent_first = style == CAPRL_SYNTH_ABSENT;
    /* types up to POSITION are about one object, arg */
    const caprl_synth_object *o = t <= CAPRL_SYNTH_Q_POSITION ? &s->obj[arg] : NULL;
    switch (t) {
        case CAPRL_SYNTH_Q_COLOR_AT:
            snprintf(q->text, sizeof q->text, "What color is the object at the %s?", k_cells[o->cell]);
            options_color(r, ix, o->color, absent_first, q);
            break;
        case CAPRL_SYNTH_Q_COLOR_OF_SHAPE:
            snprintf(q->text, sizeof q->text, "What color is the %s?", k_shapes[o->shape]);
            options_color(r, ix, o->color, absent_first, q);
            break;
        case CAPRL_SYNTH_Q_SHAPE_AT:
            snprintf(q->text, sizeof q->text, "What shape is the object at the %s?", k_cells[o->cell]);
            options_shape(r, ix, o->shape, absent_first, q);
            break;
        case CAPRL_SYNTH_Q_SHAPE_OF_COLOR:
            snprintf(q->text, sizeof q->text, "What shape is the %s object?", k_colors[o->color]);
            options_shape(r, ix, o->shape, absent_first, q);
            break;
        case CAPRL_SYNTH_Q_POSITION:
            snprintf(q->text, sizeof q->text, "Where is the %s %s?", k_colors[o->color], k_shapes[o->shape]);
            options_cell(r, ix, o->cell, absent_first, q);
            break;
        case CAPRL_SYNTH_Q_SIZE: make_size(r, s, ix, arg, absent_first, q); break;
        case CAPRL_SYNTH_Q_EXISTS: make_exists(r, s, ix, arg, absent_first, q); break;
        case CAPRL_SYNTH_Q_NOT_EXISTS: make_not_exists(r, s, ix, absent_first, q); break;
        case CAPRL_SYNTH_Q_COUNT_ALL:
            snprintf(q->text, sizeof q->text, "How many objects are there?");
            options_count(r, s->n, 1, CAPRL_SYNTH_N_CELLS, q);
            break;
        case CAPRL_SYNTH_Q_COUNT_COLOR:
            snprintf(q->text, sizeof q->text, "How many %s objects are there?", k_colors[arg]);
            options_count(r, ix->n_color[arg], 0, CAPRL_SYNTH_N_CELLS, q);
            break;
        case CAPRL_SYNTH_Q_COUNT_SHAPE:
            snprintf(q->text, sizeof q->text, "How many %s are there?", k_shapes_plural[arg]);
            options_count(r, ix->n_shape[arg], 0, CAPRL_SYNTH_N_CELLS, q);
            break;
        default: CAPRL_ASSERT(0 && "not a valid question type");
    }
    if (o) {
        q->need_a = 1u << arg;
        if (absent_first && !distractors_absent(s, attr_asked(t), q)) {
            return false;
        }
    }
    q->needs_count = t >= CAPRL_SYNTH_Q_COUNT_ALL && t <= CAPRL_SYNTH_Q_COUNT_SHAPE;
    shuffle_options(r, q);
    return true;
}

/* Leaky templates: the answer is in the wording (colour, shape) or common knowledge (sides, round). */
static void make_leaky(caprl_rng *r, const caprl_synth_scene *s, const scene_index *ix, int32_t t,
                       caprl_synth_question *q) {
    memset(q, 0, sizeof *q);
    q->type = t;
    q->leaky = true;
    int32_t obj = below(r, s->n);
    const caprl_synth_object *o = &s->obj[obj];
    switch (t) {
        case CAPRL_SYNTH_Q_LEAK_COLOR:
            snprintf(q->text, sizeof q->text, "What color is the %s %s?", k_colors[o->color],
                     k_shapes[o->shape]);
            options_color(r, ix, o->color, false, q);
            q->need_a = 1u << obj;
            break;
        case CAPRL_SYNTH_Q_LEAK_SHAPE:
            snprintf(q->text, sizeof q->text, "What shape is the %s %s?", k_colors[o->color],
                     k_shapes[o->shape]);
            options_shape(r, ix, o->shape, false, q);
            q->need_a = 1u << obj;
            break;
        case CAPRL_SYNTH_Q_LEAK_SIDES: {
            int32_t cand[CAPRL_SYNTH_N_CELLS], nc = 0;
            for (int32_t i = 0; i < s->n; i++) {
                if (s->obj[i].shape != CAPRL_SYNTH_CIRCLE) {
                    cand[nc++] = i;
                }
            }
            int32_t sides;
            if (nc > 0) {
                const caprl_synth_object *p = &s->obj[cand[below(r, nc)]];
                snprintf(q->text, sizeof q->text, "How many sides does the %s %s have?", k_colors[p->color],
                         k_shapes[p->shape]);
                sides = p->shape == CAPRL_SYNTH_TRIANGLE ? 3 : 4;
            } else {
                snprintf(q->text, sizeof q->text, "How many sides does a %s have?", k_shapes[CAPRL_SYNTH_TRIANGLE]);
                sides = 3;
            }
            int32_t others[3] = {3, 5, 6};
            others[0] = sides == 3 ? 4 : 3;
            fill_options(r, q, sides, others, 3, NULL, 0, name_count);
            q->no_caption = true;
            break;
        }
        default: { /* CAPRL_SYNTH_Q_LEAK_ROUND */
            snprintf(q->text, sizeof q->text, "Which of these shapes is round?");
            int32_t others[3] = {CAPRL_SYNTH_SQUARE, CAPRL_SYNTH_TRIANGLE, CAPRL_SYNTH_DIAMOND};
            fill_options(r, q, CAPRL_SYNTH_CIRCLE, others, 3, NULL, 0, name_shape);
            q->no_caption = true;
            break;
        }
    }
    shuffle_options(r, q);
}

/* Question families taken in turn so that an image's questions cover every kind of fact. */
enum { FAM_COLOR = 0, FAM_SHAPE, FAM_POSITION, FAM_SIZE, FAM_EXIST, FAM_COUNT, N_FAMILIES };
#define MAX_CANDIDATES 32

typedef struct candidate {
    int32_t type, arg;
} candidate;

/* Every (type, arg) that makes a distinct valid question of the scene, by family. */
static void list_candidates(const caprl_synth_scene *s, const scene_index *ix,
                            candidate cand[N_FAMILIES][MAX_CANDIDATES], int32_t n_cand[N_FAMILIES]) {
    memset(n_cand, 0, N_FAMILIES * sizeof *n_cand);
#define ADD(fam, t, a)                                                                                          \
    do {                                                                                                        \
        cand[fam][n_cand[fam]].type = (t);                                                                      \
        cand[fam][n_cand[fam]].arg = (a);                                                                       \
        n_cand[fam]++;                                                                                          \
    } while (0)
    for (int32_t i = 0; i < s->n; i++) {
        const caprl_synth_object *o = &s->obj[i];
        ADD(FAM_COLOR, CAPRL_SYNTH_Q_COLOR_AT, i);
        if (ix->n_shape[o->shape] == 1) {
            ADD(FAM_COLOR, CAPRL_SYNTH_Q_COLOR_OF_SHAPE, i);
        }
        ADD(FAM_SHAPE, CAPRL_SYNTH_Q_SHAPE_AT, i);
        if (ix->n_color[o->color] == 1) {
            ADD(FAM_SHAPE, CAPRL_SYNTH_Q_SHAPE_OF_COLOR, i);
        }
        ADD(FAM_POSITION, CAPRL_SYNTH_Q_POSITION, i);
        ADD(FAM_EXIST, CAPRL_SYNTH_Q_EXISTS, i);
    }
    if (ix->n_size[CAPRL_SYNTH_SMALL] > 0 && ix->n_size[CAPRL_SYNTH_LARGE] > 0) {
        ADD(FAM_SIZE, CAPRL_SYNTH_Q_SIZE, CAPRL_SYNTH_SMALL);
        ADD(FAM_SIZE, CAPRL_SYNTH_Q_SIZE, CAPRL_SYNTH_LARGE);
    }
    if (s->n >= CAPRL_SYNTH_N_OPTIONS - 1) {
        ADD(FAM_EXIST, CAPRL_SYNTH_Q_NOT_EXISTS, 0);
    }
    ADD(FAM_COUNT, CAPRL_SYNTH_Q_COUNT_ALL, 0);
    for (int32_t c = 0; c < CAPRL_SYNTH_N_COLORS; c++) {
        ADD(FAM_COUNT, CAPRL_SYNTH_Q_COUNT_COLOR, c);
    }
    for (int32_t sh = 0; sh < CAPRL_SYNTH_N_SHAPES; sh++) {
        ADD(FAM_COUNT, CAPRL_SYNTH_Q_COUNT_SHAPE, sh);
    }
#undef ADD
}

static bool text_used(const caprl_synth_question *q, int32_t n, const char *text) {
    for (int32_t i = 0; i < n; i++) {
        if (strcmp(q[i].text, text) == 0) {
            return true;
        }
    }
    return false;
}

int32_t caprl_synth_questions(const caprl_synth_scene *s, uint64_t seed, int32_t split, int64_t index,
                              int32_t n_valid, int32_t n_leaky, int32_t style, caprl_synth_question *out) {
    CAPRL_ASSERT(n_valid >= 0 && n_valid <= 16 && n_leaky >= 0 && n_leaky <= 4);
    scene_index ix;
    index_scene(s, &ix);
    caprl_rng r;
    caprl_synth_rng(&r, seed, split, index, CAPRL_SYNTH_PURPOSE_QA);

    candidate cand[N_FAMILIES][MAX_CANDIDATES];
    int32_t   n_cand[N_FAMILIES], next[N_FAMILIES] = {0}, order[N_FAMILIES];
    list_candidates(s, &ix, cand, n_cand);
    for (int32_t f = 0; f < N_FAMILIES; f++) {
        order[f] = f;
        /* shuffle each family's candidates (pairs moved together) */
        for (int32_t i = n_cand[f] - 1; i > 0; i--) {
            int32_t   j = below(&r, i + 1);
            candidate t = cand[f][i];
            cand[f][i] = cand[f][j];
            cand[f][j] = t;
        }
    }
    shuffle_i32(&r, order, N_FAMILIES);
    /* A count needs the count sentence, which only the dense caption has: at most one per image, so the reward
     * mostly pays for objects described. */
    n_cand[FAM_COUNT] = n_cand[FAM_COUNT] > 1 ? 1 : n_cand[FAM_COUNT];
    int32_t n = 0;
    for (bool more = true; more && n < n_valid;) {
        more = false;
        for (int32_t k = 0; k < N_FAMILIES && n < n_valid; k++) {
            int32_t f = order[k];
            /* the family's next candidate whose question line is new (one "Which of these objects is in the
             * image?" per image: the line names the question in reports and filters) */
            while (next[f] < n_cand[f]) {
                const candidate *c = &cand[f][next[f]++];
                if (make_valid(&r, s, &ix, c->type, c->arg, style, &out[n]) && !text_used(out, n, out[n].text)) {
                    n++;
                    more = true;
                    break;
                }
            }
        }
    }

    caprl_rng lr;
    caprl_synth_rng(&lr, seed, split, index, CAPRL_SYNTH_PURPOSE_LEAKY);
    int32_t templates[4] = {CAPRL_SYNTH_Q_LEAK_COLOR, CAPRL_SYNTH_Q_LEAK_SHAPE, CAPRL_SYNTH_Q_LEAK_SIDES,
                            CAPRL_SYNTH_Q_LEAK_ROUND};
    shuffle_i32(&lr, templates, 4);
    for (int32_t k = 0; k < n_leaky; k++) {
        caprl_synth_question q;
        make_leaky(&lr, s, &ix, templates[k], &q);
        int32_t at = below(&lr, n + 1); /* anywhere in the list: the place must not give it away */
        memmove(&out[at + 1], &out[at], (size_t)(n - at) * sizeof *out);
        out[at] = q;
        n++;
    }
    return n;
}

/* ---- question strings ------------------------------------------------------------------------------------- */

char *caprl_synth_question_string(const caprl_synth_question *q, const int32_t *order, bool cannot_answer) {
    str  b = {0};
    char line[CAPRL_SYNTH_OPTION_CAP + 16];
    str_add(&b, q->text);
    for (int32_t k = 0; k < CAPRL_SYNTH_N_OPTIONS; k++) {
        snprintf(line, sizeof line, "\n   - %c) %s", 'A' + k, q->options[order ? order[k] : k]);
        str_add(&b, line);
    }
    if (cannot_answer) {
        str_add(&b, "\n   - F) Can not answer based on the caption");
    }
    return b.p;
}

char *caprl_synth_question_bench(const caprl_synth_question *q, const int32_t *order) {
    str  b = {0};
    char line[CAPRL_SYNTH_OPTION_CAP + 16];
    str_add(&b, q->text);
    for (int32_t k = 0; k < CAPRL_SYNTH_N_OPTIONS; k++) {
        snprintf(line, sizeof line, "\n%c. %s", 'A' + k, q->options[order ? order[k] : k]);
        str_add(&b, line);
    }
    str_add(&b, "\nAnswer with the option's letter from the given choices directly.");
    return b.p;
}

/* ---- the reader prompt ------------------------------------------------------------------------------------ */

char *caprl_synth_reader_prompt(const char *tmpl, const char *caption, const char *question) {
    char       *out = NULL;
    caprl_error err = {0};
    /* a replacement template was checked for its two placeholders when the world's parameters were */
    if (caprl_reader_prompt(tmpl ? tmpl : caprl_reader_template_default(), caption, question, &out, &err) !=
        CAPRL_OK) {
        caprl_abort(__FILE__, __LINE__, "%s", err.msg);
    }
    return out;
}
