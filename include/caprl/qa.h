/* Multiple-choice QA data: parsing a QA generator's raw output (spec/caprl.md §7.2–§7.3) and loading QA sets for
 * the reward and the visual-dependency filter (§7.6).
 *
 * A question string is always "<question text>\n   - A) <opt>\n   - B) <opt>..." (one line of question text,
 * then one option line per label with three spaces, a dash and "X) "), exactly the form the released reward
 * server and filter parse with the regex `-\s*([A-F])\)\s*(.+)` after splitting on "\n"; the gold answer is one
 * letter 'A'..'F'. Option labels are consecutive from A; a last line "   - E) Can not answer based on the caption" (or
 * F), which the released strings carry whatever their number of options, stands outside that sequence and is
 * never the gold answer.
 *
 * Files (docs/formats.md, "QA records"):
 *   caprl QA JSONL    one object per line: {"id": str, "image": str, "qa": [{"question": str, "answer": "B"}, ...]}
 *   released records  one object per line with "message": a JSON string (or array) holding the three-message
 *                     list of spec/caprl.md §7.6: the user message carries {"type":"image","image":path} and the
 *                     "answer" message a Python-literal list of (question, letter) pairs, read by a restricted
 *                     literal parser (lists, tuples, string literals; never evaluated).
 * caprl_qa_set_load tells them apart per line (a "message" key means a released record).
 *
 * Usage: tools/caprl/qa.c (`caprl qa parse`), the reward and `caprl qa filter`.
 * Thread safety: every function is reentrant; a loaded caprl_qa_set is immutable and may be read from several
 * threads. */
#ifndef CAPRL_QA_H
#define CAPRL_QA_H

#include "caprl/caprl.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- QA sets ---------------------------------------------------------------------------------------------- */

typedef struct caprl_qa_item {
    char *question; /* "<question text>\n   - A) ...\n   - B) ..." as written in the file; owned */
    char  gold;     /* 'A'..'F', one of the question's option labels */
} caprl_qa_item;

typedef struct caprl_qa_image {
    char          *id;        /* the record's "id"; for released records (which have none) the image path as written */
    char          *image;     /* image path resolved against the JSONL file's directory (absolute paths kept) */
    caprl_qa_item *qa;        /* (n_qa) in file order; owned */
    int32_t        n_qa;      /* >= 1 */
    char          *image_raw; /* the image path exactly as written in the record; owned */
    int64_t        line;      /* 1-based line of the record in its file (for messages) */
} caprl_qa_image;

typedef struct caprl_qa_set {
    caprl_qa_image *images;   /* (n_images) in file order; owned */
    int64_t         n_images;
    int64_t         n_bad;    /* records skipped as malformed (only with skip_bad) */
} caprl_qa_set;

/* Loads a QA file (caprl QA JSONL or released training records, mixed freely; blank lines ignored).
 * A record is malformed when its JSON is invalid, a field is missing or of the wrong type, it has no question,
 * a question string breaks the form above (empty question text, no option, a line that is not an option,
 * labels not consecutive from A or beyond F, invalid UTF-8), or a gold answer is not one of its labels.
 * skip_bad false: the first malformed record fails the load with CAPRL_ERR_FORMAT, the message naming
 * "path:line" and the field. skip_bad true: malformed records are skipped, counted in n_bad and each is logged
 * as a warning with the same message (the first 20; then a count). A file with no valid record at all is
 * CAPRL_ERR_FORMAT either way. Other errors: CAPRL_ERR_IO (cannot read), CAPRL_ERR_OOM.
 * On success *out is filled (free with caprl_qa_set_free); on failure *out is zeroed. */
CAPRL_API caprl_status caprl_qa_set_load(caprl_qa_set *out, const char *path, bool skip_bad, caprl_error *err);
/* NULL-safe and safe on a zeroed set; leaves *s zeroed. */
CAPRL_API void         caprl_qa_set_free(caprl_qa_set *s);

/* Total number of questions over all images. */
CAPRL_API int64_t caprl_qa_set_n_questions(const caprl_qa_set *s);

/* Checks one question string and gold letter against the form above. On success returns CAPRL_OK and, if
 * n_options is not NULL, sets it to the number of options (counting a "Can not answer" line). On failure
 * CAPRL_ERR_FORMAT with a message describing the problem (no file prefix; callers add it). */
CAPRL_API caprl_status caprl_qa_check_question(const char *question, char gold, int32_t *n_options,
                                               caprl_error *err);

/* ---- parsing a generator's raw output ------------------------------------------------------------------- */

/* Why an item of a raw response was dropped. Append-only. */
enum {
    CAPRL_QA_DROP_NO_QUESTION = 0,     /* options or an answer without question text before them */
    CAPRL_QA_DROP_NO_OPTIONS,          /* a question with no option line */
    CAPRL_QA_DROP_TOO_FEW_OPTIONS,     /* fewer than 2 options */
    CAPRL_QA_DROP_TOO_MANY_OPTIONS,    /* more than params->max_options */
    CAPRL_QA_DROP_BAD_LABELS,          /* labels repeated or not consecutive from A */
    CAPRL_QA_DROP_EMPTY_OPTION,        /* "- C)" with no text */
    CAPRL_QA_DROP_DUPLICATE_OPTIONS,   /* two options with the same text (case and spacing ignored) */
    CAPRL_QA_DROP_NO_ANSWER,           /* no "**Answer:** X)" line before the next question */
    CAPRL_QA_DROP_TRUNCATED,           /* the response ends inside the item (the last item has no answer) */
    CAPRL_QA_DROP_BAD_ANSWER,          /* an answer line without a letter A-F */
    CAPRL_QA_DROP_ANSWER_NOT_IN_OPTIONS, /* the answer letter is not one of the option labels */
    CAPRL_QA_DROP_ANSWER_MISMATCH,     /* the answer's text names another option than its letter */
    CAPRL_QA_DROP_CONFLICTING_ANSWERS, /* two answer lines with different letters */
    CAPRL_QA_DROP_DUPLICATE_QUESTION,  /* the same question text again in the same response */
    CAPRL_QA_DROP_TOO_LONG,            /* question string longer than params->max_question_bytes */
    CAPRL_QA_DROP_BAD_TEXT,            /* invalid UTF-8 or control characters */
    CAPRL_QA_DROP_TOO_MANY_ITEMS,      /* more than CAPRL_QA_PARSE_MAX_ITEMS valid questions in one response */
    CAPRL_QA_DROP_COUNT
};

/* Short stable name of a drop reason ("no_answer", ...) for summaries and reports; "unknown" if out of range. */
CAPRL_API const char *caprl_qa_drop_reason_name(int32_t reason);

/* A response is asked for five questions; past this many valid ones it is runaway output. */
#define CAPRL_QA_PARSE_MAX_ITEMS 64

typedef struct caprl_qa_parse_params {
    int32_t max_options;          /* 2..6; default 4: the filter adds "E) None of the above" and the reward
                                     "F) Can not answer", which collide with real options E / F */
    int64_t max_question_bytes;   /* > 0; default 4096 */
    bool    append_cannot_answer; /* default false: append "\n   - E) Can not answer based on the caption"
                                     (label = next after the last option, E or F only) as the released
                                     strings evidently did (§7.3); the reward and filter strip it again */
} caprl_qa_parse_params;

CAPRL_API caprl_qa_parse_params caprl_qa_parse_default_params(void);

typedef struct caprl_qa_drop {
    int32_t reason; /* CAPRL_QA_DROP_* */
    int32_t number; /* the "#### n." number of the item, or -1 if it had none */
    int64_t line;   /* 1-based line of the response where the item starts */
} caprl_qa_drop;

typedef struct caprl_qa_parse_result {
    caprl_qa_item *items;   /* (n_items) kept questions in response order; owned */
    int32_t        n_items;
    caprl_qa_drop *drops;   /* (n_drops) in response order; owned */
    int32_t        n_drops;
    bool           gaps;    /* the "#### n." numbering of the kept and dropped items skips or repeats */
} caprl_qa_parse_result;

/* Parses one raw QA-generator response (n bytes, need not be NUL-terminated, may hold anything) into questions
 * in the form above. Accepts the §7.2 format and common deviations: CRLF, missing "####" or bold, "A." for "A)",
 * "Answer:" without bold, extra blank lines or whitespace, numbering gaps, explanations after the answer.
 * Every item that cannot become a valid question is dropped with a reason; a response with no item is not an
 * error (n_items == 0). params may be NULL (defaults). Errors: CAPRL_ERR_INVALID_ARG (bad params), CAPRL_ERR_OOM.
 * On success *out is filled (free with caprl_qa_parse_result_free); on failure it is zeroed. */
CAPRL_API caprl_status caprl_qa_parse_response(const char *text, size_t n, const caprl_qa_parse_params *params,
                                               caprl_qa_parse_result *out, caprl_error *err);
/* NULL-safe and safe on a zeroed result. */
CAPRL_API void caprl_qa_parse_result_free(caprl_qa_parse_result *r);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_QA_H */
