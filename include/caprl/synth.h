/* The synthetic world of the demo (`caprl synth`): procedurally drawn scenes of a few coloured shapes on a grey
 * background, with everything CapRL needs around them: multiple-choice questions from each scene's ground truth
 * (plus planted "leaky" questions that need no image), a dense and a short caption per image, SFT data for a tiny
 * captioner and a tiny reader, a held-out Prism benchmark and a text corpus for fitting a tokenizer.
 * docs/formats.md ("Synthetic world") describes every file.
 *
 * Everything is a pure function of the parameters below (not of n_threads): image i of a split draws from its
 * own random streams keyed by (seed, split, i, purpose), so adding images or leaky questions never changes the
 * others, and two runs write the same bytes.
 *
 * Usage: tools/caprl/synth.c. Thread safety: reentrant; nothing here holds global state. */
#ifndef CAPRL_SYNTH_H
#define CAPRL_SYNTH_H

#include "caprl/caprl.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct caprl_synth_params {
    int32_t  n_train;         /* training images, >= 0; default 512 */
    int32_t  n_test;          /* held-out images (test QA and benchmark), >= 0; default 64 */
    uint64_t seed;            /* default 0 */
    int32_t  size;            /* image side in pixels, a multiple of 28 in [56, 1120]; default 84 (a 3x3 grid
                                 whose cells are exactly one Qwen2.5-VL merged token: 2x2 patches of 14) */
    int32_t  min_objects;     /* objects per scene, 1 <= min <= max <= 9 (the grid cells); default 2 */
    int32_t  max_objects;     /* default 6 */
    int32_t  leaky_per_image; /* leaky questions planted per training image, 0..4; default 1 */
    int32_t  qa_per_image;    /* valid questions per image (fewer when a scene cannot give that many distinct
                                 ones), 1..16; default 8 */
    int32_t  n_threads;       /* drawing and PNG encoding; <= 0 means all cores; the output does not depend on it */
    const char *reader_template; /* reader prompt of sft_reader.jsonl: NULL = the CapRL template (spec/caprl.md
                                    §6.3); else a template with exactly two "{}" (caption, question), the one the
                                    reward will use (`caprl train --reader-template`) */
    int32_t question_style; /* CAPRL_SYNTH_LOOKUP (default), _STATEMENT or _ABSENT: how the valid questions ask
                               (see enum below) */
} caprl_synth_params;

/* How the valid questions about one object's colour, shape or position ask:
 * - LOOKUP: "What color is the object at the top left?", "Where is the red circle?" (find one attribute of an
 *   object named by the others);
 * - STATEMENT: "Which of these objects does the image show?" with the object's full description ("a large red
 *   circle at the top left") against three that change its colour (or shape, or position) to one the image lacks:
 *   answered by matching a description against the caption's sentences;
 * - ABSENT: the lookup questions, with distractors the image does not have wherever it allows ("What color is the
 *   object at the top left?": the gold colour and three colours no object has; "Where is the red circle?": its cell
 *   and three empty ones): a caption that names the gold value answers, one that does not leaves nothing to choose
 *   by. What the question measures is whether the caption mentions the fact, which is the reward CapRL wants; it
 *   asks less of the reader than lookup does (finding a value, not which object holds it). */
enum { CAPRL_SYNTH_LOOKUP = 0, CAPRL_SYNTH_STATEMENT = 1, CAPRL_SYNTH_ABSENT = 2 };

/* "lookup", "statement", "absent"; "?" for any other value. */
CAPRL_API const char *caprl_synth_style_name(int32_t style);
/* The style named s (one of the names above); -1 when none. */
CAPRL_API int32_t caprl_synth_style_parse(const char *s);

CAPRL_API caprl_synth_params caprl_synth_default_params(void);

/* Checks every field's range; CAPRL_ERR_INVALID_ARG naming the field (e.g. "size: 50 is not a multiple of 28"). */
CAPRL_API caprl_status caprl_synth_params_check(const caprl_synth_params *p, caprl_error *err);

/* What caprl_synth_write wrote. */
typedef struct caprl_synth_summary {
    int64_t n_images;          /* train + test */
    int64_t n_train_questions; /* in train.jsonl, leaky ones included */
    int64_t n_leaky;           /* of those, planted leaky questions (listed in leaky_ids.json) */
    int64_t n_test_questions;  /* in test_qa.jsonl and bench.jsonl */
    int64_t n_reader_records;  /* in sft_reader.jsonl */
    int64_t n_reader_cannot;   /* of those, with target F (the caption does not state the answer) */
    int64_t n_reader_free;     /* answer-in-words records in sft_reader.jsonl (besides the n_reader_records) */
    int64_t n_reader_bind;     /* letter-binding records in sft_reader_bind.jsonl */
    int64_t n_filter_bind;     /* the same in the curation model's form, in sft_filter_bind.jsonl */
    int64_t n_filter_keyed;    /* keyed lookups with the image, in sft_filter_keyed.jsonl */
    int64_t bytes_written;     /* all files together */
} caprl_synth_summary;

/* Writes the world into dir (created with its parents if needed). Every file is replaced atomically (temporary
 * file, fsync, rename); synth.json, the manifest, is removed first and written last, so a directory with
 * synth.json is complete. Files of an earlier run with more images are not removed.
 * params may be NULL (defaults); summary may be NULL.
 * Errors: CAPRL_ERR_INVALID_ARG (params), CAPRL_ERR_IO (naming the file or directory), CAPRL_ERR_OOM. */
CAPRL_API caprl_status caprl_synth_write(const char *dir, const caprl_synth_params *params,
                                         caprl_synth_summary *summary, caprl_error *err);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_SYNTH_H */
