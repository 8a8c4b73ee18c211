/* The CapRL reward (spec/caprl.md §1.2, §1.4, §6, §13.2): a frozen text-only reader answers multiple-choice
 * questions about an image from a caption alone, and the caption's reward is the mean score over N questions
 * drawn from the image's QA list.
 *
 * Per caption: draw N questions (default 8) uniformly with replacement; present each one as the released
 * shuffle_options does (options shuffled and relabelled, the gold letter remapped, "F) Can not answer based on the
 * caption" appended); fill the CapRL reader prompt (caption first, question second); score it in one of two modes:
 *   sample    the reader continues after "The answer is" at temperature 0.6, top-p 1, at most 10 tokens; the first
 *             character in [A-I] of the continuation is the answer: 1 if it is the gold letter, else 0;
 *   expected  p(gold) = softmax(z / tau)[id(" " + gold)] over the next-token logits z after "The answer is":
 *             with tau = the sampling temperature, the probability that sample mode's first token is the gold
 *             letter, with no sampling noise.
 * Reward = mean of the N scores, in [0, 1], plus an optional CapRL++ length term (off by default).
 *
 * Randomness is counter-based and keyed by (seed, item stream id): the questions drawn, their shuffles and the
 * reader's samples for an item depend only on those, never on batching, item order or thread count.
 *
 * The reader runs the fixed part of the prompt before the caption once (its KV cache is kept for the reader's
 * lifetime), prefills each caption once on top of it, and runs the question suffixes of all of a caption's
 * questions as batched forwards on copies of that cache. Shared parts are longest common token prefixes of the
 * actual tokenized prompts, so the scores equal those of full-prompt passes (prefix_cache false).
 *
 * Usage: tools/caprl/reward.c. Thread safety: a caprl_reader is single-threaded (its model's pool does the
 * parallel work); the template, shuffle and parse functions are pure and reentrant. */
#ifndef CAPRL_REWARD_H
#define CAPRL_REWARD_H

#include "caprl/caprl.h"
#include "caprl/model.h"
#include "caprl/qa.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- reader prompt ---------------------------------------------------------------------------------------- */

/* The CapRL image reader prompt (spec/caprl.md §6.3): raw ChatML, no system turn, assistant turn pre-filled with
 * "The answer is"; 1,044 bytes with its two "{}" placeholders (caption, then question). Static, NUL-terminated. */
CAPRL_API const char *caprl_reader_template_default(void);

/* Checks a replacement template: valid UTF-8 without NUL bytes and exactly two "{}" placeholders (the first takes
 * the caption, the second the question; any other brace is literal text). CAPRL_ERR_FORMAT saying what is wrong. */
CAPRL_API caprl_status caprl_reader_template_check(const char *tmpl, size_t len, caprl_error *err);

/* The template with its first "{}" replaced by caption and its second by question (Python str.format with two
 * positional arguments; braces inside the arguments are not interpreted). *out: caprl_free. */
CAPRL_API caprl_status caprl_reader_prompt(const char *tmpl, const char *caption, const char *question, char **out,
                                           caprl_error *err);

/* Lowercase hex SHA-256 of n bytes into hex[65] (NUL-terminated): identifies the template a run used. */
CAPRL_API void caprl_sha256_hex(const void *data, size_t n, char hex[65]);

/* ---- questions as the reader sees them ------------------------------------------------------------------- */

#define CAPRL_CANNOT_ANSWER "Can not answer based on the caption"

/* The released shuffle_options (spec/caprl.md §6.4), step by step:
 *  1. delete every "\n   - E) Can not answer based on the caption", then every "\n   - F) ..." (plain substring
 *     replacement, as str.replace);
 *  2. split on "\n": line 0 is the question text; every other non-empty line must match, after stripping
 *     whitespace at both ends, the regex -\s*([A-F])\)\s*(.+) somewhere (re.search; \s and the strip are Python's
 *     Unicode whitespace); a repeated label keeps its first position and its last text (a dict);
 *  3. shuffle the options (Fisher-Yates driven by Philox(seed, stream_a, stream_b)) and relabel them A, B, ...;
 *  4. the new gold is the last new label whose text equals the old gold option's text;
 *  5. rebuild as the question line and "   - X) text" lines joined with "\n", then append
 *     "\n   - F) Can not answer based on the caption" (so 4 options show A-D and F: E is skipped, as released);
 *  6. fallback: when the gold letter is not among the parsed labels (or there are none), no shuffle: the text of
 *     step 1 plus the F line, gold unchanged.
 * shuffle false presents the question exactly as saved (no deletion, no F line; the released default).
 * *out (caprl_free) and *out_gold are set on success; *shuffled (may be NULL) tells whether step 3 ran.
 * A non-empty line that does not match is CAPRL_ERR_FORMAT quoting the line (the released code raises). */
CAPRL_API caprl_status caprl_present_question(const char *question, char gold, bool shuffle, uint64_t seed,
                                              uint64_t stream_a, uint64_t stream_b, char **out, char *out_gold,
                                              bool *shuffled, caprl_error *err);

/* The reader's answer in a continuation: the first byte in 'A'..'I' anywhere in text[0..len) (the released
 * parse_easy: re.findall('[A-I]')[0]), or 0 when there is none. */
CAPRL_API char caprl_reward_parse_letter(const char *text, size_t len);

/* CapRL++ length term (spec/caprl.md §13.2): 1 up to l1 tokens, linear down to 0 at l2, 0 beyond (l2 > l1). */
CAPRL_API float caprl_reward_length_term(int64_t tokens, int32_t l1, int32_t l2);

/* ---- the reader ------------------------------------------------------------------------------------------- */

enum { CAPRL_REWARD_SAMPLE = 0, CAPRL_REWARD_EXPECTED = 1, CAPRL_REWARD_MODE_COUNT };

/* "sample" / "expected"; "unknown" if out of range. */
CAPRL_API const char *caprl_reward_mode_name(int32_t mode);
/* The mode named by name, or -1. */
CAPRL_API int32_t     caprl_reward_mode_parse(const char *name);

typedef struct caprl_reader caprl_reader;

typedef struct caprl_reader_params {
    const char *template_text;  /* NULL: caprl_reader_template_default(); else checked, copied */
    int32_t     max_captions;   /* captions whose prefix caches are held together (default 4) */
    int32_t     max_sequences;  /* question sequences run together (default 32); the KV cache holds
                                   1 + max_captions + max_sequences sequences */
    int32_t     n_batch_max;    /* tokens per forward call (default 512) */
    int32_t     n_ctx_max;      /* longest reader prompt + continuation accepted (default 32768); the KV cache
                                   grows to the longest prompt actually seen, in steps of 256 tokens */
} caprl_reader_params;

CAPRL_API caprl_reader_params caprl_reader_default_params(void);

/* A reader over a loaded model with a tokenizer (not owned: it must outlive the reader; a Qwen2.5-VL checkpoint's
 * text part works too, with ordinary positions). Resolves the ids of " A" ... " I" (each must be one token inside
 * the vocabulary: CAPRL_ERR_UNSUPPORTED otherwise) and finds the template's fixed prefix, which the first scoring
 * call runs once. Errors: no tokenizer or limits out of range (CAPRL_ERR_INVALID_ARG), a bad template
 * (CAPRL_ERR_FORMAT). */
CAPRL_API caprl_status caprl_reader_init(caprl_reader **out, caprl_model *model, const caprl_reader_params *params,
                                         caprl_error *err);
/* caprl_model_load(dir) (with n_threads) + caprl_reader_init; the reader then owns the model. */
CAPRL_API caprl_status caprl_reader_load(caprl_reader **out, const char *dir, int32_t n_threads,
                                         const caprl_reader_params *params, caprl_error *err);
CAPRL_API void         caprl_reader_free(caprl_reader *r); /* NULL-safe */

CAPRL_API const caprl_model *caprl_reader_model(const caprl_reader *r);
/* The template in use (owned by the reader) and the ids of " A" ... " I" (9 entries). */
CAPRL_API const char    *caprl_reader_template(const caprl_reader *r);
CAPRL_API const int32_t *caprl_reader_letter_ids(const caprl_reader *r);
/* Tokens of the shared fixed prefix (run once) and all tokens the reader has run forwards over so far. */
CAPRL_API int32_t caprl_reader_prefix_tokens(const caprl_reader *r);
CAPRL_API int64_t caprl_reader_tokens_total(const caprl_reader *r);

/* ---- scoring ---------------------------------------------------------------------------------------------- */

typedef struct caprl_reward_params {
    int32_t  mode;           /* CAPRL_REWARD_SAMPLE (default) or CAPRL_REWARD_EXPECTED */
    int32_t  n_questions;    /* questions drawn per caption, with replacement (8) */
    bool     shuffle;        /* present questions through caprl_present_question's shuffle (true) */
    float    tau;            /* expected mode: softmax temperature (0.6) */
    float    temperature;    /* sample mode: sampling temperature (0.6); top-p 1, repetition penalty 1 */
    int32_t  max_new_tokens; /* sample mode: continuation length cap (10); generation also stops at eos */
    uint64_t seed;           /* draws, shuffles and samples (0) */
    float    length_weight;  /* CapRL++ length term weight; 0 = off (default; CapRL++ uses 0.2) */
    int32_t  length_l1;      /* 2048 policy tokens */
    int32_t  length_l2;      /* 3072 */
    bool     prefix_cache;   /* share prefix KV caches (true); false runs every question's full prompt */
} caprl_reward_params;

CAPRL_API caprl_reward_params caprl_reward_default_params(void);
/* Range checks with a message naming the field. */
CAPRL_API caprl_status caprl_reward_params_check(const caprl_reward_params *p, caprl_error *err);

typedef struct caprl_reward_item {
    const char           *caption;        /* UTF-8, NUL-terminated */
    const caprl_qa_image *qa;             /* the image's questions (n_qa >= 1) */
    uint64_t              stream_id;      /* keys this caption's draws, shuffles and samples */
    int32_t               caption_tokens; /* caption length in policy tokens (length term); < 0 = unknown */
} caprl_reward_item;

typedef struct caprl_reward_question {
    int32_t qa_index;     /* the drawn question: item->qa->qa[qa_index] */
    char   *text;         /* the question as shown to the reader (after shuffling); owned */
    char    gold;         /* the gold letter as shown */
    bool    shuffled;     /* the options were shuffled (false: shuffle off or the fallback of §6.4 step 6) */
    float   p_gold;       /* expected: softmax(z / tau)[" " + gold]; sample: the same at temperature, for the
                             first token (diagnostic) */
    char   *continuation; /* sample mode: the decoded continuation, special tokens skipped; NULL in expected */
    char    answer;       /* sample mode: caprl_reward_parse_letter(continuation), 0 if none */
    float   score;        /* expected: p_gold; sample: 1 or 0 */
} caprl_reward_question;

typedef struct caprl_reward_result {
    float                  reward;        /* accuracy + length_weight * length */
    float                  accuracy;      /* mean of the questions' scores */
    float                  length;        /* the length term in [0, 1] (1 if caption_tokens < 0 or weight 0) */
    int32_t                n_questions;
    caprl_reward_question *questions;     /* (n_questions) in draw order; owned */
    int64_t                reader_tokens; /* tokens the reader ran for this caption (its share of shared work
                                             excluded: the fixed prefix is counted once per reader) */
    int32_t                prompt_tokens; /* tokens of the longest of its prompts */
} caprl_reward_result;

/* Scores n items into results[0..n) (each zeroed first, then filled; free with caprl_reward_result_clear, also
 * on failure). Items are processed in chunks of max_captions. Errors name the item: a question that fails to
 * present (CAPRL_ERR_FORMAT), a prompt longer than n_ctx_max (CAPRL_ERR_INVALID_ARG), invalid UTF-8 in a caption
 * (CAPRL_ERR_INVALID_ARG), bad params. */
CAPRL_API caprl_status caprl_reward_score(caprl_reader *r, const caprl_reward_item *items, int32_t n,
                                          const caprl_reward_params *params, caprl_reward_result *results,
                                          caprl_error *err);
/* Frees what a result owns and zeroes it. NULL-safe. */
CAPRL_API void caprl_reward_result_clear(caprl_reward_result *res);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_REWARD_H */
