/* Prism answer scoring as released (caprl/eval.h, eval_impl.h): Eval_CapRL.py's verify_math and verify_chart,
 * and the VQA helpers they call (relaxed_correctness with its swapped arguments, anls_compute, process_line's
 * list answers). Every step keeps the release's order and its quirks; spec/caprl.md §9.2 and docs/formats.md
 * ("Prism scoring") list them. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <utf8proc.h>

#include "core/error_impl.h"
#include "data/data_impl.h"
#include "eval/eval_impl.h"
#include "fmt/pyjson_impl.h"
#include "text/casemap_impl.h"

/* ---- rules -------------------------------------------------------------------------------------------------- */

const char *caprl_eval_rule_name(int32_t rule) {
    switch (rule) {
    case CAPRL_EVAL_RULE_MATH: return "math";
    case CAPRL_EVAL_RULE_CHART: return "chart";
    case CAPRL_EVAL_RULE_INFO: return "info";
    default: return "unknown";
    }
}

int32_t caprl_eval_rule_parse(const char *name) {
    static const struct {
        const char *name;
        int32_t     rule;
    } k_names[] = {
        {"math", CAPRL_EVAL_RULE_MATH},   {"mc", CAPRL_EVAL_RULE_MATH},       {"mcq", CAPRL_EVAL_RULE_MATH},
        {"multiple_choice", CAPRL_EVAL_RULE_MATH}, {"letter", CAPRL_EVAL_RULE_MATH},
        {"chart", CAPRL_EVAL_RULE_CHART}, {"relaxed", CAPRL_EVAL_RULE_CHART}, {"info", CAPRL_EVAL_RULE_INFO},
        {"anls", CAPRL_EVAL_RULE_INFO},   {"infovqa", CAPRL_EVAL_RULE_INFO},
    };
    for (size_t i = 0; name && i < sizeof k_names / sizeof k_names[0]; i++) {
        if (strcasecmp(name, k_names[i].name) == 0) {
            return k_names[i].rule;
        }
    }
    return -1;
}

int32_t caprl_eval_rule_for_bench(const char *name) {
    char  *low = caprl_xstrdup(name ? name : "");
    for (char *p = low; *p; p++) {
        if (*p >= 'A' && *p <= 'Z') {
            *p = (char)(*p - 'A' + 'a');
        }
    }
    /* Eval_CapRL.py: if 'char' in path or 'info' in path -> verify_chart(use_anls='info' in path). */
    int32_t rule = strstr(low, "info") ? CAPRL_EVAL_RULE_INFO
                   : strstr(low, "char") ? CAPRL_EVAL_RULE_CHART
                                         : CAPRL_EVAL_RULE_MATH;
    free(low);
    return rule;
}

/* ---- the boxed answer ------------------------------------------------------------------------------------- */

static bool at(const char *s, size_t n, size_t i, const char *w) {
    size_t k = strlen(w);
    return i + k <= n && memcmp(s + i, w, k) == 0;
}

bool caprl_eval_boxed_answer(const char *text, size_t n, size_t *start, size_t *len) {
    /* The capture must end at a '}' that still has a "</answer>" somewhere after it: find the last "</answer>". */
    size_t last_close = SIZE_MAX;
    for (size_t i = n >= 9 ? n - 9 + 1 : 0; i-- > 0;) {
        if (at(text, n, i, "</answer>")) {
            last_close = i;
            break;
        }
    }
    if (last_close == SIZE_MAX) {
        return false;
    }
    /* (.*)} greedy: the capture ends at the last '}' before the last "</answer>" (when it is past the box). */
    size_t last_brace = SIZE_MAX;
    for (size_t r = last_close; r-- > 0;) {
        if (text[r] == '}') {
            last_brace = r;
            break;
        }
    }
    if (last_brace == SIZE_MAX) {
        return false;
    }
    /* re.findall scans left to right: the first "</think>" from which the whole pattern matches wins, and no
     * second match can follow it (its greedy capture already reached the last usable '}'). The first "\boxed{"
     * at or after a position only moves right as the position does, so it is searched for once. */
    size_t next_box = 0;
    bool   have_box = false;
    for (size_t t = 0; t + 8 <= n; t++) {
        if (!at(text, n, t, "</think>")) {
            continue;
        }
        size_t i = t + 8, k;
        while ((k = i < n ? caprl_py_space_len(text + i, n - i) : 0) > 0) {
            i += k;
        }
        if (!at(text, n, i, "<answer>")) {
            continue;
        }
        /* .*? then \\boxed{ : the first "\boxed{" after <answer> (a later one can only do worse). */
        if (!have_box || next_box < i + 8) {
            next_box = i + 8;
            while (next_box + 7 <= n && !at(text, n, next_box, "\\boxed{")) {
                next_box++;
            }
            have_box = true;
        }
        if (next_box + 7 > n) {
            return false; /* no box after this point, so none after any later </think> either */
        }
        size_t cap0 = next_box + 7;
        if (last_brace >= cap0) {
            *start = cap0;
            *len = last_brace - cap0;
            return true;
        }
    }
    return false;
}

/* ---- Python string helpers --------------------------------------------------------------------------------- */

static void py_strip_span(const char **s, size_t *n) {
    size_t b = 0, k;
    while (b < *n && (k = caprl_py_space_len(*s + b, *n - b)) > 0) {
        b += k;
    }
    size_t e = *n;
    while (e > b) {
        size_t back = 0;
        for (size_t w = 1; w <= 3 && w <= e - b; w++) {
            if (caprl_py_space_len(*s + e - w, w) == w) {
                back = w;
                break;
            }
        }
        if (!back) {
            break;
        }
        e -= back;
    }
    *s += b;
    *n = e - b;
}

/* One code point of s[i..n): its value and length; an invalid byte counts as one code point of its own. */
static size_t next_cp(const char *str, size_t n, size_t i, uint32_t *cp) {
    const unsigned char *s = (const unsigned char *)str + i;
    size_t               m = n - i;
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    size_t   len = (s[0] & 0xE0) == 0xC0 ? 2 : (s[0] & 0xF0) == 0xE0 ? 3 : (s[0] & 0xF8) == 0xF0 ? 4 : 0;
    uint32_t v = len == 2 ? s[0] & 0x1Fu : len == 3 ? s[0] & 0x0Fu : s[0] & 0x07u;
    bool     ok = len > 0 && len <= m;
    for (size_t k = 1; ok && k < len; k++) {
        ok = (s[k] & 0xC0) == 0x80;
        v = (v << 6) | (s[k] & 0x3Fu);
    }
    if (!ok) {
        *cp = 0xDC00u + s[0]; /* like Python's surrogateescape: a lone byte, distinct from every character */
        return 1;
    }
    *cp = v;
    return len;
}

static void put_cp(caprl_sb *b, uint32_t cp) {
    if (cp >= 0xDC80 && cp <= 0xDCFF) {
        caprl_sb_addc(b, (char)(cp - 0xDC00));
        return;
    }
    char   u[4];
    size_t k;
    if (cp < 0x80) {
        u[0] = (char)cp, k = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | (cp >> 6)), u[1] = (char)(0x80 | (cp & 0x3F)), k = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12)), u[1] = (char)(0x80 | ((cp >> 6) & 0x3F)), u[2] = (char)(0x80 | (cp & 0x3F));
        k = 3;
    } else {
        u[0] = (char)(0xF0 | (cp >> 18)), u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), u[3] = (char)(0x80 | (cp & 0x3F));
        k = 4;
    }
    caprl_sb_add(b, u, k);
}

/* Unicode's Cased and Case_Ignorable (what Python's final-sigma rule reads), from the general category plus the
 * Word_Break MidLetter / MidNumLet / Single_Quote characters. */
static bool cp_cased(uint32_t cp) {
    utf8proc_category_t c = utf8proc_category((utf8proc_int32_t)cp);
    return c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LL || c == UTF8PROC_CATEGORY_LT;
}

static bool cp_case_ignorable(uint32_t cp) {
    switch (cp) {
    case '\'': case '.': case ':': case 0xB7: case 0x387: case 0x5F4: case 0x2018: case 0x2019: case 0x2024:
    case 0x2027: case 0xFE13: case 0xFE52: case 0xFE55: case 0xFF07: case 0xFF0E: case 0xFF1A:
        return true;
    default:
        break;
    }
    utf8proc_category_t c = utf8proc_category((utf8proc_int32_t)cp);
    return c == UTF8PROC_CATEGORY_MN || c == UTF8PROC_CATEGORY_ME || c == UTF8PROC_CATEGORY_CF ||
           c == UTF8PROC_CATEGORY_LM || c == UTF8PROC_CATEGORY_SK;
}

/* Python's s.lower(): simple mappings plus U+0130 -> "i\u0307", and a capital sigma that ends a word (a cased
 * letter before it and none after it, case-ignorable characters skipped) -> final sigma U+03C2. Caller frees. */
static char *py_lower(const char *s, size_t n) {
    uint32_t *cps = caprl_xmalloc((n + 1) * sizeof(uint32_t));
    size_t    m = 0;
    for (size_t i = 0; i < n;) {
        i += next_cp(s, n, i, &cps[m++]);
    }
    caprl_sb b = {0};
    for (size_t k = 0; k < m; k++) {
        uint32_t cp = cps[k];
        if (cp == 0x0130) {
            put_cp(&b, 'i');
            put_cp(&b, 0x0307);
        } else if (cp == 0x03A3) {
            size_t j = k;
            while (j > 0 && cp_case_ignorable(cps[j - 1])) {
                j--;
            }
            bool final = j > 0 && cp_cased(cps[j - 1]);
            for (j = k + 1; final && j < m && cp_case_ignorable(cps[j]); j++) {
            }
            final = final && (j >= m || !cp_cased(cps[j]));
            put_cp(&b, final ? 0x03C2 : 0x03C3);
        } else {
            put_cp(&b, cp >= 0xDC80 && cp <= 0xDCFF ? cp : caprl_cp_lower(cp));
        }
    }
    free(cps);
    return caprl_sb_take(&b);
}

bool caprl_py_float(const char *s, size_t n, double *out) {
    py_strip_span(&s, &n);
    size_t i = 0;
    bool   neg = false;
    if (i < n && (s[i] == '+' || s[i] == '-')) {
        neg = s[i] == '-';
        i++;
    }
    const char *w = s + i;
    size_t      m = n - i;
    if ((m == 3 && strncasecmp(w, "inf", 3) == 0) || (m == 8 && strncasecmp(w, "infinity", 8) == 0)) {
        *out = neg ? -(double)INFINITY : (double)INFINITY;
        return true;
    }
    if (m == 3 && strncasecmp(w, "nan", 3) == 0) {
        *out = neg ? -(double)NAN : (double)NAN;
        return true;
    }
    /* digitpart ("_" digit)*, an optional fraction, an optional exponent; underscores only between digits. */
    caprl_sb b = {0};
    caprl_sb_addc(&b, neg ? '-' : '+');
    size_t digits = 0;
    bool   ok = true, seen_point = false, seen_exp = false, exp_digits = false;
    for (size_t k = 0; k < m && ok; k++) {
        char c = w[k];
        if (c >= '0' && c <= '9') {
            caprl_sb_addc(&b, c);
            if (seen_exp) {
                exp_digits = true;
            } else {
                digits++;
            }
        } else if (c == '_') {
            ok = k > 0 && k + 1 < m && w[k - 1] >= '0' && w[k - 1] <= '9' && w[k + 1] >= '0' && w[k + 1] <= '9';
        } else if (c == '.' && !seen_point && !seen_exp) {
            seen_point = true;
            caprl_sb_addc(&b, c);
        } else if ((c == 'e' || c == 'E') && !seen_exp && digits > 0) {
            seen_exp = true;
            caprl_sb_addc(&b, 'e');
            if (k + 1 < m && (w[k + 1] == '+' || w[k + 1] == '-')) {
                caprl_sb_addc(&b, w[++k]);
            }
        } else {
            ok = false;
        }
    }
    ok = ok && digits > 0 && (!seen_exp || exp_digits);
    if (ok) {
        *out = strtod(b.s, NULL);
    }
    caprl_sb_free(&b);
    return ok;
}

/* relaxed_correctness's _to_float. */
static bool to_float(const char *text, double *out) {
    size_t n = strlen(text);
    if (n > 0 && text[n - 1] == '%') {
        while (n > 0 && text[n - 1] == '%') {
            n--; /* text.rstrip('%') */
        }
        if (!caprl_py_float(text, n, out)) {
            return false;
        }
        *out /= 100.0;
        return true;
    }
    return caprl_py_float(text, n, out);
}

bool caprl_relaxed_correctness(const char *target, const char *prediction) {
    double p, t;
    bool   have_p = to_float(prediction, &p);
    bool   have_t = to_float(target, &t);
    if (have_p && have_t && t != 0.0) { /* `and target_float`: 0.0 is falsy, NaN is truthy */
        return fabs(p - t) / fabs(t) <= 0.05;
    }
    char *a = py_lower(prediction, strlen(prediction)), *b = py_lower(target, strlen(target));
    bool  eq = strcmp(a, b) == 0;
    free(a);
    free(b);
    return eq;
}

/* ' '.join(s.strip().lower().split()) as code points. */
static uint32_t *anls_norm(const char *s, size_t n, size_t *len) {
    char     *low = py_lower(s, n);
    size_t    m = strlen(low), k = 0;
    uint32_t *cps = caprl_xmalloc((m + 1) * sizeof *cps);
    bool      pending_space = false;
    for (size_t i = 0; i < m;) {
        size_t w = caprl_py_space_len(low + i, m - i);
        if (w) {
            pending_space = k > 0;
            i += w;
            continue;
        }
        if (pending_space) {
            cps[k++] = ' ';
            pending_space = false;
        }
        uint32_t cp;
        i += next_cp(low, m, i, &cp);
        cps[k++] = cp;
    }
    free(low);
    *len = k;
    return cps;
}

static size_t upper_len(const char *s) {
    size_t n = strlen(s), len = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += next_cp(s, n, i, &cp);
        len += (size_t)caprl_cp_upper_len(cp);
    }
    return len;
}

double caprl_anls_distance(const char *groundtruth, const char *prediction) {
    size_t    na, nb;
    uint32_t *a = anls_norm(groundtruth, strlen(groundtruth), &na);
    uint32_t *b = anls_norm(prediction, strlen(prediction), &nb);
    if (na > nb) { /* keep the shorter one in the row */
        uint32_t *t = a;
        size_t    tn = na;
        a = b, na = nb, b = t, nb = tn;
    }
    size_t *row = caprl_xmalloc((na + 1) * sizeof *row), *next = caprl_xmalloc((na + 1) * sizeof *next);
    for (size_t i = 0; i <= na; i++) {
        row[i] = i;
    }
    for (size_t j = 0; j < nb; j++) {
        next[0] = j + 1;
        for (size_t i = 0; i < na; i++) {
            if (a[i] == b[j]) {
                next[i + 1] = row[i];
            } else {
                size_t m = row[i] < row[i + 1] ? row[i] : row[i + 1];
                m = m < next[i] ? m : next[i];
                next[i + 1] = 1 + m;
            }
        }
        size_t *t = row;
        row = next;
        next = t;
    }
    size_t dist = row[na];
    free(row);
    free(next);
    free(a);
    free(b);
    size_t la = upper_len(groundtruth), lb = upper_len(prediction);
    size_t length = la > lb ? la : lb;
    return length == 0 ? 0.0 : (double)dist / (double)length;
}

/* ---- gold answers ----------------------------------------------------------------------------------------- */

char **caprl_eval_golds(const char *answer, int32_t *n) {
    caprl_pylit lit;
    caprl_error err = {0};
    char      **out = NULL;
    *n = 0;
    size_t len = strlen(answer);
    /* process_line: istype(answer, list) evaluates the text; only a list (not a tuple) counts. */
    if (caprl_pylit_parse(answer, len, &lit, &err) == CAPRL_OK) {
        bool ok = lit.kind == CAPRL_PYLIT_LIST && lit.n_items > 0;
        for (int32_t i = 0; ok && i < lit.n_items; i++) {
            ok = lit.items[i].kind == CAPRL_PYLIT_STR || lit.items[i].kind == CAPRL_PYLIT_NUM;
        }
        if (ok) {
            out = caprl_xcalloc((size_t)lit.n_items, sizeof *out);
            for (int32_t i = 0; i < lit.n_items; i++) {
                const caprl_pylit *it = &lit.items[i];
                if (it->kind == CAPRL_PYLIT_STR) {
                    out[i] = caprl_xstrndup(it->str, it->len);
                } else {
                    /* str() of the number: floats by repr, ints as written (without '_' and a leading '+'). */
                    caprl_sb b = {0};
                    bool     is_float = strpbrk(it->str, ".eE") != NULL;
                    double   v;
                    if (is_float && caprl_py_float(it->str, it->len, &v)) {
                        char buf[40];
                        caprl_py_float_repr(v, buf, sizeof buf);
                        caprl_sb_adds(&b, buf);
                    } else {
                        for (const char *p = it->str + (it->str[0] == '+'); *p; p++) {
                            if (*p != '_') {
                                caprl_sb_addc(&b, *p);
                            }
                        }
                    }
                    out[i] = caprl_sb_take(&b);
                }
            }
            *n = lit.n_items;
        }
        caprl_pylit_free(&lit);
    }
    if (!out) {
        out = caprl_xcalloc(1, sizeof *out);
        out[0] = caprl_xstrdup(answer);
        *n = 1;
    }
    return out;
}

void caprl_eval_golds_free(char **golds, int32_t n) {
    for (int32_t i = 0; golds && i < n; i++) {
        free(golds[i]);
    }
    free(golds);
}

/* ---- the verifiers ---------------------------------------------------------------------------------------- */

static void trace_answer(caprl_eval_trace *tr, const char *s, size_t n) {
    if (!tr) {
        return;
    }
    size_t k = n < sizeof tr->answer - 1 ? n : sizeof tr->answer - 1;
    memcpy(tr->answer, s, k);
    tr->answer[k] = '\0';
}

/* math_verify.verify's string comparison: both stripped, non-empty and equal. */
static bool strings_equal(const char *a, size_t na, const char *b, size_t nb) {
    py_strip_span(&a, &na);
    py_strip_span(&b, &nb);
    return na > 0 && nb > 0 && na == nb && memcmp(a, b, na) == 0;
}

double caprl_eval_verify_math(const char *content, const char *answer, caprl_eval_trace *trace) {
    caprl_math_parsed gold;
    caprl_math_parse(answer, strlen(answer), &gold);
    if (gold.kind == CAPRL_MATH_NONE) {
        /* "Failed to parse gold solution" -> return 1.0, before the prediction is even looked at. */
        if (trace) {
            trace->gold_unparsed = true;
        }
        return 1.0;
    }
    size_t n = strlen(content), s0 = 0, len = 0;
    bool   found = caprl_eval_boxed_answer(content, n, &s0, &len);
    if (trace) {
        trace->boxed_found = found;
        trace_answer(trace, content + s0, found ? len : 0);
    }
    const char *ans = found ? content + s0 : "";
    size_t      ans_n = found ? len : 0;
    /* verify(answer_parsed, gold_parsed): the raw answer string against the gold's string form. */
    double score = strings_equal(ans, ans_n, gold.str, strlen(gold.str)) ? 1.0 : 0.0;
    if (score == 0.0) {
        /* verify(math_parse(f"${answer}$"), gold_parsed): every pair of (value, string) forms. */
        caprl_math_parsed pred;
        caprl_math_parse(ans, ans_n, &pred);
        if (pred.kind != CAPRL_MATH_NONE &&
            (strings_equal(pred.str, strlen(pred.str), gold.str, strlen(gold.str)) ||
             caprl_math_values_equal(&gold, &pred))) {
            score = 1.0;
        }
        caprl_math_parsed_free(&pred);
    }
    caprl_math_parsed_free(&gold);
    return score;
}

double caprl_eval_verify_chart(const char *content, const char *answer, bool use_anls, caprl_eval_trace *trace) {
    int32_t n_gold = 0;
    char  **golds = caprl_eval_golds(answer, &n_gold);
    size_t  n = strlen(content), s0 = 0, len = 0;
    bool    found = caprl_eval_boxed_answer(content, n, &s0, &len);
    if (trace) {
        trace->boxed_found = found;
        trace_answer(trace, content + s0, found ? len : 0);
    }
    /* student_answer = math_parse(f"${answer_parsed}$")[-1]: the normalised string, or '' (IndexError). */
    caprl_math_parsed parsed;
    caprl_math_parse(found ? content + s0 : "", found ? len : 0, &parsed);
    const char *student = parsed.kind != CAPRL_MATH_NONE ? parsed.str : "";
    double      reward = 0.0, pre;
    if (caprl_py_float(student, strlen(student), &pre)) {
        static const double k_scales[3] = {1.0, 0.01, 100.0};
        for (int s = 0; s < 3; s++) {
            char pred[40];
            caprl_py_float_repr(k_scales[s] * pre, pred, sizeof pred); /* str(scale * pre) */
            for (int32_t g = 0; g < n_gold; g++) {
                if (caprl_relaxed_correctness(pred, golds[g])) {
                    reward = 1.0;
                }
            }
        }
    } else {
        const char *st = student;
        size_t      st_n = strlen(student);
        py_strip_span(&st, &st_n);
        char *pred = caprl_xstrndup(st, st_n);
        for (int32_t g = 0; g < n_gold; g++) {
            if (caprl_relaxed_correctness(pred, golds[g])) {
                reward = 1.0;
            }
        }
        free(pred);
    }
    if (use_anls) {
        double dmin = (double)INFINITY;
        for (int32_t g = 0; g < n_gold; g++) {
            double d = caprl_anls_distance(golds[g], student);
            dmin = d < dmin ? d : dmin;
        }
        double sim = 1.0 - dmin;
        double reward2 = sim < 0.5 ? 0.0 : sim;
        reward = reward > reward2 ? reward : reward2;
    }
    caprl_math_parsed_free(&parsed);
    caprl_eval_golds_free(golds, n_gold);
    return reward;
}

double caprl_eval_score(const char *prediction, const char *answer, int32_t rule, caprl_eval_trace *trace) {
    if (trace) {
        memset(trace, 0, sizeof *trace);
        trace->chart = -1.0;
    }
    prediction = prediction ? prediction : "";
    answer = answer ? answer : "";
    double math = caprl_eval_verify_math(prediction, answer, trace);
    if (trace) {
        trace->math = math;
    }
    if (rule != CAPRL_EVAL_RULE_CHART && rule != CAPRL_EVAL_RULE_INFO) {
        return math;
    }
    /* The release computes verify_chart first; the order does not change the max. */
    caprl_eval_trace tc;
    memset(&tc, 0, sizeof tc);
    double chart = caprl_eval_verify_chart(prediction, answer, rule == CAPRL_EVAL_RULE_INFO, &tc);
    if (trace) {
        trace->chart = chart;
        trace->boxed_found = tc.boxed_found;
        memcpy(trace->answer, tc.answer, sizeof trace->answer);
    }
    return chart > math ? chart : math;
}

char *caprl_eval_parsed_answer(const char *prediction) {
    const char *last = NULL;
    for (const char *p = prediction ? strstr(prediction, "\\boxed") : NULL; p; p = strstr(p + 1, "\\boxed")) {
        last = p;
    }
    if (!last || strlen(last) > CAPRL_MATH_MAX_BYTES) {
        return caprl_xstrdup(""); /* math_parse finds nothing, or times out */
    }
    return caprl_math_normalize(last, strlen(last));
}

/* ---- numpy arithmetic ------------------------------------------------------------------------------------- */

/* numpy's pairwise_sum for float64 (PW_BLOCKSIZE 128, 8-way unrolled), which np.add.reduce uses on contiguous
 * data. */
double caprl_np_sum(const double *x, int64_t n) {
    if (n < 8) {
        double res = 0.0;
        for (int64_t i = 0; i < n; i++) {
            res += x[i];
        }
        return res;
    }
    if (n <= 128) {
        double r[8];
        for (int k = 0; k < 8; k++) {
            r[k] = x[k];
        }
        int64_t i;
        for (i = 8; i < n - (n % 8); i += 8) {
            for (int k = 0; k < 8; k++) {
                r[k] += x[i + k];
            }
        }
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) {
            res += x[i];
        }
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return caprl_np_sum(x, n2) + caprl_np_sum(x + n2, n - n2);
}
