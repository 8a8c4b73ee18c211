/* Prism evaluation (spec/caprl.md §9): answer scoring exactly as the released Prism_Evaluation/Eval_CapRL.py
 * scores, benchmark loading, the stage-2 reader prompt, and the BoN / Mean aggregation with the released output
 * files. Captioning and answering (the model runs) belong to the `caprl eval prism` driver, which is built on this
 * header:
 *
 *   caprl_eval_bench_load            the benchmark: released lmm_eval_*.json or caprl's simple JSONL
 *   stage 1: caption each item's image n times with CAPRL_PRISM_CAPTION_PROMPT (the driver)
 *   caprl_prism_reader_prompt        stage 2: the item's prompt with the image placeholder replaced by a caption
 *   (the reader answers each prompt; the driver)
 *   caprl_eval_score                 one reader answer against the item's gold answer under the item's rule
 *   caprl_eval_parsed_answer         the parsed answer the details file shows ("pres")
 *   caprl_prism_aggregate            BoN and Mean over the items
 *   caprl_prism_write_details / _eval  Prism_{tag}_step_details_{step}_final.json / _step_eval_{step}_final.json
 *
 * Thread safety: every function is reentrant; a loaded benchmark is immutable. */
#ifndef CAPRL_EVAL_H
#define CAPRL_EVAL_H

#include "caprl/caprl.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- scoring ------------------------------------------------------------------------------------------------ */

/* Which released verifier scores a benchmark. The release picks by substring of the benchmark's data path
 * (lowercased): "info" -> INFO, else "char" -> CHART, else MATH (multiple-choice sets included: their answers are
 * boxed letters). */
enum {
    CAPRL_EVAL_RULE_MATH = 0,  /* verify_math: the boxed answer is math_verify-equivalent to the gold */
    CAPRL_EVAL_RULE_CHART = 1, /* max(verify_chart: relaxed accuracy 5% trying x1, x0.01, x100; verify_math) */
    CAPRL_EVAL_RULE_INFO = 2,  /* max(verify_chart with ANLS >= 0.5 also counted; verify_math) */
    CAPRL_EVAL_RULE_COUNT
};

/* "math", "chart", "info"; "unknown" if out of range. */
CAPRL_API const char *caprl_eval_rule_name(int32_t rule);
/* A rule by name: "math" (also "mc", "mcq", "multiple_choice", "letter"), "chart" (also "relaxed"), "info"
 * (also "anls", "infovqa"); case-insensitive. -1 if unknown. */
CAPRL_API int32_t     caprl_eval_rule_parse(const char *name);
/* The released choice for a benchmark name or path (see above). */
CAPRL_API int32_t     caprl_eval_rule_for_bench(const char *name);

/* What the scoring saw, for reports and debugging. */
typedef struct caprl_eval_trace {
    bool   boxed_found;   /* the </think> <answer> ... \boxed{...} ... </answer> pattern matched */
    bool   gold_unparsed; /* verify_math returned 1.0 because the gold answer yields no parse (released quirk) */
    double math;          /* verify_math score */
    double chart;         /* verify_chart score (CHART / INFO rules; -1 otherwise) */
    char   answer[256];   /* the boxed answer as captured ("" if none), cut to fit */
} caprl_eval_trace;

/* Scores one reader output against the gold answer under rule (CAPRL_EVAL_RULE_*), as the release does:
 *   - the answer is the capture of </think>\s*<answer>.*?\\boxed{(.*)}.*?</answer> (DOTALL, greedy capture);
 *     with no match the answer is "" (which scores 0, except that an unparseable gold scores 1 under MATH);
 *   - MATH: 1 if the answer (raw, or normalised) equals the normalised gold, or their values are equal
 *     (numbers with commas, units, percentages, fractions, \frac / \dfrac, \text{}, $...$; letters);
 *   - CHART: max(relaxed accuracy of the normalised answer scaled by 1, 0.01 and 100 within 5% of the gold
 *     (relative to the prediction, as the release's swapped arguments make it), MATH);
 *   - INFO: as CHART, and also the ANLS similarity 1 - d/len when it is >= 0.5 (so scores can be fractional).
 * `answer` is the gold as Python's str() writes it (caprl_eval_bench_load converts JSON values); a Python list
 * literal there means several accepted answers for CHART / INFO. Inputs are NUL-terminated UTF-8 (invalid
 * bytes are compared as they are). Returns the score in [0, 1]; an out-of-range rule scores as MATH.
 * trace may be NULL. */
CAPRL_API double caprl_eval_score(const char *prediction, const char *answer, int32_t rule, caprl_eval_trace *trace);

/* The gold text caprl_eval_score expects for a gold answer given as JSON text: Python's str() of the value
 * (a string as is, 3 -> "3", 2.5 -> "2.5", ["a", "b"] -> "['a', 'b']", true -> "True", null -> "None"), as the
 * release's f"${gt}$" formats it. NULL if json is not valid JSON. Free with caprl_free. */
CAPRL_API char *caprl_eval_answer_text(const char *json);

/* The "parsed answer" of the released details file (math_parse(output)[-1]): the normalised content of the last
 * \boxed{...} of the output, or "" if there is none. An approximation: math_parse also tries other patterns;
 * this column is for reading only and never affects scores. Free with caprl_free. */
CAPRL_API char *caprl_eval_parsed_answer(const char *prediction);

/* ---- benchmarks --------------------------------------------------------------------------------------------- */

/* The image placeholder of the released evaluation prompts, and the stage-1 caption prompt (raw ChatML, no system
 * turn, no final period after "detail"; spec/caprl.md §9.2). */
#define CAPRL_PRISM_IMAGE_PLACEHOLDER "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
#define CAPRL_PRISM_CAPTION_PROMPT                                                                                \
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Please describe this image in detail<|im_end|>\n" \
    "<|im_start|>assistant\n"
/* Stage 2 replaces every placeholder with this, {cap} being the caption (spec/caprl.md §9.2). */
#define CAPRL_PRISM_CAPTION_PREFIX "<|im_start|>user\nHere is a detailed caption of an image: "
#define CAPRL_PRISM_CAPTION_SUFFIX ". Please answer the question based on the caption."
/* caprl's prompt for simple-JSONL questions (the released JSONs carry their own prompts, which are not published;
 * this one asks for the <think>/<answer>/\boxed{} form the scoring needs): the question goes between the two. */
#define CAPRL_PRISM_SIMPLE_PROMPT_HEAD CAPRL_PRISM_IMAGE_PLACEHOLDER
#define CAPRL_PRISM_SIMPLE_PROMPT_TAIL                                                                             \
    "\nFirst think about the question step by step inside <think> </think> tags, then give the final answer "   \
    "inside <answer> </answer> tags, written as \\boxed{answer}. For a multiple-choice question the answer is "  \
    "the option's letter.<|im_end|>\n<|im_start|>assistant\n"

enum {
    CAPRL_EVAL_FORMAT_RELEASED = 0, /* a record with "prompt": the released lmm_eval_*.json shape */
    CAPRL_EVAL_FORMAT_SIMPLE = 1,   /* a record with "question": caprl's simple JSONL */
};

typedef struct caprl_eval_item {
    char   *id;          /* the record's "id" (string or integer), else its 0-based index in the file, as text */
    char   *image;       /* image path resolved against the benchmark file's directory ("file://" dropped) */
    char   *image_raw;   /* the path as written */
    char   *prompt;      /* stage-2 prompt template containing CAPRL_PRISM_IMAGE_PLACEHOLDER (see format) */
    char   *question;    /* SIMPLE: the question as written; RELEASED: NULL */
    char   *answer;      /* the gold as Python's str() of the JSON value (string as is, 3, 2.5, ['a', 'b'], ...) */
    int32_t rule;        /* CAPRL_EVAL_RULE_* */
    int32_t format;      /* CAPRL_EVAL_FORMAT_* */
    char   *record_json; /* the original record, compact JSON: written back as "original_sample" in the details */
    int64_t min_pixels;  /* RELEASED: from the qwen-vl-utils image element when given, else 0 */
    int64_t max_pixels;
} caprl_eval_item;

typedef struct caprl_eval_bench {
    caprl_eval_item *items; /* (n_items) in file order; owned */
    int64_t          n_items;
    int64_t          n_bad; /* records skipped as malformed (skip_bad only) */
} caprl_eval_bench;

typedef struct caprl_eval_bench_params {
    int32_t rule;     /* CAPRL_EVAL_RULE_* for every item, or -1 (default): a simple record's "type" if it has
                         one, else caprl_eval_rule_for_bench of the benchmark's path as given (the release's
                         data_path.lower()) */
    bool    skip_bad; /* default false: the first malformed record fails the load */
    const char *image_root; /* relative image paths are under this folder (the release's --image-root); NULL
                               (default): the working directory, else the benchmark file's folder */
} caprl_eval_bench_params;

CAPRL_API caprl_eval_bench_params caprl_eval_bench_default_params(void);

/* Loads a benchmark file: a JSON array of records (the released lmm_eval_*.json) or JSON Lines (blank lines
 * ignored). Each record is either
 *   RELEASED: {"image": <path | {"image": path, ...} | [{"type": "image", "image": path}, ...] | messages with such
 *              content, as qwen-vl-utils' process_vision_info reads them>, "prompt": str, "answer": any, ...}
 *   SIMPLE:   {"image": str, "question": str, "answer": any, "type"?: str, "id"?: str | int}
 * Errors (messages name file and record: "bench.json: record 12: ..." or "bench.jsonl:13: ..."):
 * CAPRL_ERR_FORMAT (a malformed record unless skip_bad, or no valid record), CAPRL_ERR_IO, CAPRL_ERR_OOM.
 * On success *out is filled (free with caprl_eval_bench_free); on failure it is zeroed. */
CAPRL_API caprl_status caprl_eval_bench_load(caprl_eval_bench *out, const char *path,
                                             const caprl_eval_bench_params *params, caprl_error *err);
CAPRL_API void         caprl_eval_bench_free(caprl_eval_bench *b); /* NULL-safe; leaves *b zeroed */

/* ---- Prism stage 2 and results ----------------------------------------------------------------------------- */

/* prompt.replace(CAPRL_PRISM_IMAGE_PLACEHOLDER, PREFIX + caption + SUFFIX) as Python's str.replace: every
 * occurrence, left to right, non-overlapping. *n_replaced (may be NULL) gets the count; 0 means the reader never
 * sees the caption (the release does not check; the driver should warn). Free with caprl_free. */
CAPRL_API char *caprl_prism_reader_prompt(const char *prompt, const char *caption, int32_t *n_replaced);

/* One benchmark item's results over its n captions (borrowed pointers). */
typedef struct caprl_prism_record {
    const char        *record_json;   /* the item's record_json */
    int32_t            n;             /* captions (>= 1) */
    const double      *scores;        /* (n) caprl_eval_score of each reader output */
    const char *const *parsed;        /* (n) caprl_eval_parsed_answer of each output, or NULL: "" each */
    const int64_t     *reader_tokens; /* (n) token count of each reader output, or NULL: 0 each */
    const char *const *captions;      /* (n) stage-1 captions */
    const char *const *outputs;       /* (n) stage-2 reader outputs */
} caprl_prism_record;

typedef struct caprl_prism_metrics {
    double  bon;       /* mean over items of the max score over the item's captions */
    double  mean;      /* mean over items of the mean score over the item's captions (Table 3 reports this) */
    int64_t n_items;
    int64_t n_answers; /* total scored reader outputs */
} caprl_prism_metrics;

/* BoN and Mean with numpy's arithmetic (np.max, np.mean with pairwise summation), so the numbers match the
 * released script's bit for bit. n == 0 gives zeros. Records with r->n < 1 are skipped. */
CAPRL_API void caprl_prism_aggregate(const caprl_prism_record *recs, int64_t n, caprl_prism_metrics *out);

/* "{dir}/Prism_{tag}_step_details_{step}_final.json" and "{dir}/Prism_{tag}_step_eval_{step}_final.json".
 * Free with caprl_free. */
CAPRL_API char *caprl_prism_details_path(const char *dir, const char *tag, int64_t step);
CAPRL_API char *caprl_prism_eval_path(const char *dir, const char *tag, int64_t step);

/* Writes the details file as the release does (json.dump(..., indent=4)): a list with one entry per record,
 * [original_sample, [score per caption], [parsed answer per caption], [reader tokens per caption],
 *  [captions..., reader outputs...]]. Atomic (temp file + rename). Errors: CAPRL_ERR_IO, CAPRL_ERR_FORMAT (a
 * record_json that is not JSON), CAPRL_ERR_INVALID_ARG (a record with n < 1 or NULL arrays). */
CAPRL_API caprl_status caprl_prism_write_details(const char *path, const caprl_prism_record *recs, int64_t n,
                                                 caprl_error *err);
/* Writes the summary file as the release does: ["BoN: {bon} Mean: {mean}"] with Python's float repr. Atomic. */
CAPRL_API caprl_status caprl_prism_write_eval(const char *path, const caprl_prism_metrics *m, caprl_error *err);
/* The summary line itself ("BoN: 0.5416666666666666 Mean: 0.3255"). Free with caprl_free. */
CAPRL_API char *caprl_prism_summary_line(const caprl_prism_metrics *m);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_EVAL_H */
