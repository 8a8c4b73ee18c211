/* Internals of the evaluation module, shared with the tests: the pieces of the released Prism scoring
 * (Prism_Evaluation/Eval_CapRL.py with math_verify and the VQA helpers it imports; spec/caprl.md §9.2) that
 * caprl reproduces one by one, so each can be checked against hand-derived values.
 *
 * Where the release calls math_verify (LaTeX normalisation, then SymPy), caprl reproduces the normalisation
 * step by step and replaces SymPy by a small value model: numbers (integers, decimals, thousands separators,
 * percentages, fractions) compare as SymPy's Integer / Rational / Float would, everything else compares as
 * canonical text (docs/formats.md, "Prism scoring", lists what differs). */
#ifndef CAPRL_EVAL_IMPL_H
#define CAPRL_EVAL_IMPL_H

#include "caprl/eval.h"

/* ---- answer extraction ------------------------------------------------------------------------------------ */

/* The released pattern re.findall(r"</think>\s*<answer>.*?\\boxed{(.*)}.*?</answer>", text, re.DOTALL)[-1]:
 * true and the capture [*start, *start + *len) if it matches. The capture is greedy: it runs from the first
 * "\boxed{" after "<answer>" to the last '}' that still has a "</answer>" after it (not a balanced-brace match). */
bool caprl_eval_boxed_answer(const char *text, size_t n, size_t *start, size_t *len);

/* ---- math_verify model -------------------------------------------------------------------------------------- */

enum { CAPRL_MATH_NONE = 0, CAPRL_MATH_STRING = 1, CAPRL_MATH_VALUE = 2 };
enum { CAPRL_MATH_NUM = 0, CAPRL_MATH_SYM = 1 };

/* Longer text is not parsed (kind NONE), standing in for math_verify's 5-second parse timeout, after which it
 * returns []; real reader answers are a few hundred bytes. */
#define CAPRL_MATH_MAX_BYTES 65536

/* math_parse(f"${s}$") of the release: NONE is the empty list, STRING a list holding only the normalised string
 * (LaTeX that did not parse), VALUE a parsed value plus the normalised string. */
typedef struct caprl_math_parsed {
    int32_t kind;     /* CAPRL_MATH_NONE / STRING / VALUE */
    char   *str;      /* STRING, VALUE: the normalised LaTeX (what the release keeps as the string form) */
    int32_t vkind;    /* VALUE: CAPRL_MATH_NUM or CAPRL_MATH_SYM */
    double  num;      /* NUM: the value (a percentage already divided by 100) */
    bool    is_float; /* NUM: a decimal point or exponent made SymPy build a Float (compared to 6 decimals) */
    bool    exact;    /* NUM: num == p / q exactly, with the fraction reduced and q > 0 */
    int64_t p, q;
    char   *sym;      /* SYM: canonical text (no whitespace, \text{} and outer parentheses unwrapped) */
    bool    word;     /* SYM: the whole value was \text{...} of more than one character (a SymPy Symbol name) */
    bool    ordered;  /* SYM: the value was bracketed, ( ) or [ ]: a tuple or interval, its entries in order */
    char   *lhs;      /* an equation's left-hand side (canonical text), NULL when the answer is no equation */
} caprl_math_parsed;

/* latex2sympy2_extended's normalize_latex with the configuration math_verify's LatexExtractionConfig uses
 * (basic_latex, units, malformed_operators, nits, boxed="all"). Caller frees. */
char *caprl_math_normalize(const char *s, size_t n);
void  caprl_math_parse(const char *s, size_t n, caprl_math_parsed *out);
void  caprl_math_parsed_free(caprl_math_parsed *p); /* NULL-safe; leaves *p zeroed */
/* math_verify.verify on two parsed values (SymPy-equivalence model; see the file comment). */
bool  caprl_math_values_equal(const caprl_math_parsed *gold, const caprl_math_parsed *pred);

/* ---- the VQA helpers (openrlhf.models.remote_rm.vqa_eval, as VLMEvalKit's vqa_eval) ---------------------- */

/* Python's float(s): optional whitespace, sign, digits with single underscores, '.', exponent, inf / infinity /
 * nan in any case. */
bool caprl_py_float(const char *s, size_t n, double *out);

/* relaxed_correctness(target, prediction) with its parameter names: numeric (a trailing '%' divides by 100) when
 * prediction parses and target parses to a non-zero value, |prediction - target| / |target| <= 0.05; otherwise
 * prediction.lower() == target.lower(). The release calls it with the model's answer as `target`. */
bool caprl_relaxed_correctness(const char *target, const char *prediction);

/* anls_compute(groundtruth, prediction): Levenshtein distance of the lowercased, whitespace-collapsed strings over
 * max(len(groundtruth.upper()), len(prediction.upper())) in code points; 0 when both are empty. */
double caprl_anls_distance(const char *groundtruth, const char *prediction);

/* The gold answers the VQA helpers compare with: a gold text that is a Python list literal ("['a', 'b']") is
 * its elements (process_line's eval), anything else the text itself. Caller frees with caprl_eval_golds_free. */
char **caprl_eval_golds(const char *answer, int32_t *n);
void   caprl_eval_golds_free(char **golds, int32_t n);

/* verify_math(content, "$" + answer + "$") and verify_chart(content, "$" + answer + "$", use_anls). trace may be
 * NULL. */
double caprl_eval_verify_math(const char *content, const char *answer, caprl_eval_trace *trace);
double caprl_eval_verify_chart(const char *content, const char *answer, bool use_anls, caprl_eval_trace *trace);

/* numpy's pairwise summation (np.add.reduce on a contiguous float64 array), so means match np.mean bit for bit. */
double caprl_np_sum(const double *x, int64_t n);

#endif /* CAPRL_EVAL_IMPL_H */
