/* Internals of the synthetic world (src/data/synth.c): scenes, their drawing, captions, questions and the reader
 * prompt, exposed for the tests (tests/unit/test_synth.c). caprl_synth_write in include/caprl/synth.h strings
 * them together into files.
 *
 * The world: a grey square image cut into a 3x3 grid; each object sits alone in its cell and has a shape (4), a
 * colour (6) and a size (2); no two objects of a scene share both shape and colour, so "the red circle" always
 * names one object. Objects are kept in reading order (cell index ascending), which is also the order every
 * caption lists them in. Depends on core/ and image/ only. */
#ifndef CAPRL_SYNTH_IMPL_H
#define CAPRL_SYNTH_IMPL_H

#include "caprl/synth.h"
#include "core/rng_impl.h"

enum { CAPRL_SYNTH_CIRCLE = 0, CAPRL_SYNTH_SQUARE, CAPRL_SYNTH_TRIANGLE, CAPRL_SYNTH_DIAMOND, CAPRL_SYNTH_N_SHAPES };
enum {
    CAPRL_SYNTH_RED = 0,
    CAPRL_SYNTH_GREEN,
    CAPRL_SYNTH_BLUE,
    CAPRL_SYNTH_YELLOW,
    CAPRL_SYNTH_WHITE,
    CAPRL_SYNTH_BLACK,
    CAPRL_SYNTH_N_COLORS
};
enum { CAPRL_SYNTH_SMALL = 0, CAPRL_SYNTH_LARGE, CAPRL_SYNTH_N_SIZES };
enum { CAPRL_SYNTH_GRID = 3, CAPRL_SYNTH_N_CELLS = 9 };
enum { CAPRL_SYNTH_SPLIT_TRAIN = 0, CAPRL_SYNTH_SPLIT_TEST = 1 };

/* Random streams: one per (seed, split, image index, purpose). */
enum {
    CAPRL_SYNTH_PURPOSE_SCENE = 1,        /* objects */
    CAPRL_SYNTH_PURPOSE_QA = 2,           /* valid questions */
    CAPRL_SYNTH_PURPOSE_LEAKY = 3,        /* leaky questions and where they go */
    CAPRL_SYNTH_PURPOSE_CAPTION = 4,      /* which objects the short caption names */
    CAPRL_SYNTH_PURPOSE_READER = 5,       /* the reader's SFT records: captions and option shuffles */
    CAPRL_SYNTH_PURPOSE_FILTER = 6,       /* the curation model's SFT records: option shuffles */
    CAPRL_SYNTH_PURPOSE_BIND = 7,         /* the reader's letter-binding records */
    CAPRL_SYNTH_PURPOSE_FILTER_BIND = 8,  /* the curation model's letter-binding records */
    CAPRL_SYNTH_PURPOSE_FILTER_KEYED = 9, /* the curation model's keyed lookups: option shuffles */
};
void caprl_synth_rng(caprl_rng *r, uint64_t seed, int32_t split, int64_t index, int32_t purpose);

/* The background of grid cell `cell` (0..8, reading order): a grey 100 + 7 * cell in every channel, so each cell
 * is told apart by its shade (vision features carry no absolute position otherwise: the tower's rotary is relative);
 * every palette colour differs from all of them by at least 90 in some channel. */
void caprl_synth_background(int32_t cell, uint8_t rgb[3]);

const char *caprl_synth_shape_name(int32_t shape);   /* "circle", ... */
const char *caprl_synth_shape_plural(int32_t shape); /* "circles", ... */
const char *caprl_synth_color_name(int32_t color);   /* "red", ... */
const char *caprl_synth_size_name(int32_t size);     /* "small", "large" */
const char *caprl_synth_cell_name(int32_t cell);     /* "top left", "top middle", ..., "center", ... */
void        caprl_synth_color_rgb(int32_t color, uint8_t rgb[3]);

/* ---- scenes ----------------------------------------------------------------------------------------------- */

typedef struct caprl_synth_object {
    int32_t shape, color, size, cell; /* CAPRL_SYNTH_* enums; cell = row * 3 + column, 0..8 */
} caprl_synth_object;

typedef struct caprl_synth_scene {
    int32_t            n;                        /* 1..9 */
    caprl_synth_object obj[CAPRL_SYNTH_N_CELLS]; /* (n) in reading order: cells strictly increasing */
} caprl_synth_scene;

/* The scene of image `index` of `split`: min_obj..max_obj objects (1 <= min <= max <= 9), a pure function of
 * (seed, split, index). */
void caprl_synth_scene_make(caprl_synth_scene *s, uint64_t seed, int32_t split, int64_t index, int32_t min_obj,
                            int32_t max_obj);

/* Draws the scene into px (size, size, 3), size > 0, without anti-aliasing: a pixel takes an object's colour when
 * its centre lies inside the shape. Geometry, with the cell centre (cx, cy) = ((2c + 1), (2r + 1)) * size / 6
 * and the half extent h = 0.4 * size / 3 (large) or 0.225 * size / 3 (small), on (dx, dy) = pixel centre - (cx, cy):
 *   circle dx^2 + dy^2 <= h^2; square |dx|, |dy| <= h; diamond |dx| + |dy| <= h;
 *   triangle (apex up) -h <= dy <= h and 2 |dx| <= dy + h.
 * Computed exactly in integers in units of 1/6 pixel (pixel centre 6x + 3, h = floor(4 size / 5) or
 * floor(9 size / 20)), so the pixels do not depend on floating-point details. */
void caprl_synth_render(const caprl_synth_scene *s, int32_t size, uint8_t *px);

/* ---- captions --------------------------------------------------------------------------------------------- */

/* One sentence per listed object, in reading order: "A large red circle at the top left." joined by spaces;
 * with count_sentence, preceded by "There are N objects." (or "There is 1 object."). listed: bit i = s->obj[i].
 * The dense caption is (all objects, count sentence); short and partial captions list a subset and have no count
 * sentence. Returns a caprl_xmalloc'd string (free()). */
char *caprl_synth_caption(const caprl_synth_scene *s, uint32_t listed, bool count_sentence);

/* A uniform random k-subset of n objects (0 <= k <= n <= 9) as a bit mask. */
uint32_t caprl_synth_subset(caprl_rng *r, int32_t n, int32_t k);

/* The objects the short caption of an image names: one or two (one when the scene has one), uniformly chosen. */
uint32_t caprl_synth_short_listed(const caprl_synth_scene *s, uint64_t seed, int32_t split, int64_t index);

/* ---- questions -------------------------------------------------------------------------------------------- */

enum {
    CAPRL_SYNTH_Q_COLOR_AT = 0,   /* What color is the object at the top left? */
    CAPRL_SYNTH_Q_COLOR_OF_SHAPE, /* What color is the circle? (its shape is unique in the scene) */
    CAPRL_SYNTH_Q_SHAPE_AT,       /* What shape is the object at the center? */
    CAPRL_SYNTH_Q_SHAPE_OF_COLOR, /* What shape is the red object? (its colour is unique in the scene) */
    CAPRL_SYNTH_Q_POSITION,       /* Where is the red circle? */
    CAPRL_SYNTH_Q_SIZE,           /* Which of these objects is large? (one option of that size) */
    CAPRL_SYNTH_Q_EXISTS,         /* Which of these objects is in the image? */
    CAPRL_SYNTH_Q_NOT_EXISTS,     /* Which of these objects is not in the image? */
    CAPRL_SYNTH_Q_COUNT_ALL,      /* How many objects are there? */
    CAPRL_SYNTH_Q_COUNT_COLOR,    /* How many red objects are there? */
    CAPRL_SYNTH_Q_COUNT_SHAPE,    /* How many circles are there? */
    CAPRL_SYNTH_Q_STATEMENT,      /* Which of these objects does the image show? (CAPRL_SYNTH_STATEMENT style: full
                                   * descriptions, one of them true) */
    /* leaky: answerable without the image */
    CAPRL_SYNTH_Q_LEAK_COLOR,     /* What color is the red circle? */
    CAPRL_SYNTH_Q_LEAK_SHAPE,     /* What shape is the red circle? */
    CAPRL_SYNTH_Q_LEAK_SIDES,     /* How many sides does the red triangle have? */
    CAPRL_SYNTH_Q_LEAK_ROUND,     /* Which of these shapes is round? */
    CAPRL_SYNTH_Q_COUNT
};

#define CAPRL_SYNTH_N_OPTIONS 4
#define CAPRL_SYNTH_TEXT_CAP 96
#define CAPRL_SYNTH_OPTION_CAP 64 /* "a large yellow triangle at the bottom middle" */

typedef struct caprl_synth_question {
    int32_t type;                                                 /* CAPRL_SYNTH_Q_* */
    bool    leaky;
    char    text[CAPRL_SYNTH_TEXT_CAP];                           /* the question line */
    char    options[CAPRL_SYNTH_N_OPTIONS][CAPRL_SYNTH_OPTION_CAP]; /* in the order written to the QA file */
    int32_t gold;                                                 /* index of the correct option */
    /* What a caption must say for the answer to follow from it (caprl_synth_answerable). */
    bool     needs_count; /* the count sentence (only the dense caption has it) */
    bool     no_caption;  /* world knowledge (leaky sides / round): no caption states it */
    uint32_t need_a;      /* answerable when every object of need_a is listed, */
    uint32_t need_b;      /* or (need_b != 0) every object of need_b (elimination), */
    uint32_t gold_shown;  /* or (the absent style) any object of gold_shown: it has the gold value, and no object
                             has another option's, so naming the value answers */
} caprl_synth_question;

/* Whether a caption listing the objects of `listed` (bit i = s->obj[i]), with the count sentence or not,
 * states the answer of q. */
bool caprl_synth_answerable(const caprl_synth_question *q, uint32_t listed, bool count_sentence);

/* The questions of one image: up to n_valid distinct valid questions (colour, shape, position, size, existence,
 * at most one count question; families taken in turn) and then n_leaky leaky ones (distinct templates) inserted
 * at random places. Options are shuffled, so the gold letter is uniform. out has room for n_valid + n_leaky
 * (n_valid <= 16, n_leaky <= 4). style (CAPRL_SYNTH_LOOKUP, _STATEMENT or _ABSENT) is how the valid questions
 * ask. Returns the number written. A pure function of (seed, split, index, n_valid, n_leaky, style) and
 * the scene; the lookup style gives the questions it always gave. */
int32_t caprl_synth_questions(const caprl_synth_scene *s, uint64_t seed, int32_t split, int64_t index,
                              int32_t n_valid, int32_t n_leaky, int32_t style, caprl_synth_question *out);

/* The CapRL question string "text\n   - A) opt\n   - B) opt..." with the options in the order order[0..3]
 * (indices into q->options; NULL = file order) and, with cannot_answer, the line
 * "\n   - F) Can not answer based on the caption" appended as the reward does (spec/caprl.md §6.4).
 * Returns a caprl_xmalloc'd string. */
char *caprl_synth_question_string(const caprl_synth_question *q, const int32_t *order, bool cannot_answer);

/* The benchmark form: "text\nA. opt\nB. opt\nC. opt\nD. opt\nAnswer with the option's letter from the given
 * choices directly." with option k taken from order[k] (NULL: file order). caprl_xmalloc'd. */
char *caprl_synth_question_bench(const caprl_synth_question *q, const int32_t *order);

/* ---- the reader prompt ------------------------------------------------------------------------------------ */

/* The reader prompt: tmpl (two "{}": caption, then question; NULL: the CapRL image reader prompt of spec/caprl.md
 * §6.3, caprl_reader_template_default) filled with caption and question. caprl_synth_reader_prompt(tmpl, "{}", "{}")
 * gives the template itself. Heap-allocated (free). */
char *caprl_synth_reader_prompt(const char *tmpl, const char *caption, const char *question);

#endif /* CAPRL_SYNTH_IMPL_H */
