/* The math_verify part of the released Prism scoring (eval_impl.h): math_parse(f"${s}$") and verify().
 *
 * math_parse with LatexExtractionConfig finds the $...$ span, normalises it with latex2sympy2_extended's
 * normalize_latex (boxed="all", basic_latex, units, nits, malformed_operators) and converts the result with
 * latex2sympy; it returns [value, normalised string], or [normalised string] when conversion fails, or [] when
 * nothing matched. The normalisation is reproduced here rule by rule, in the library's order (each rule is one
 * regular expression there; the hand-written matchers below follow Python's `re` semantics for them). The
 * conversion is modelled: numbers become exact rationals or Floats as SymPy builds them, other text becomes a
 * canonical string. What the model cannot see (algebraic identities such as \sqrt{12} = 2\sqrt{3}, sets,
 * intervals) compares as text, so caprl can only be stricter than the release there, never more lenient. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error_impl.h"
#include "data/data_impl.h"
#include "eval/eval_impl.h"

/* ---- small string tools ----------------------------------------------------------------------------------- */

static bool starts(const char *s, size_t n, size_t i, const char *w) {
    if (i >= n || s[i] != w[0]) {
        return false; /* the common case, decided without strlen / memcmp */
    }
    size_t k = strlen(w);
    return i + k <= n && memcmp(s + i, w, k) == 0;
}

static bool is_alpha(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static bool is_digit(char c) {
    return c >= '0' && c <= '9';
}

/* Python's \w for str patterns, approximated: ASCII alphanumerics, '_' and every non-ASCII byte. */
static bool is_word(char c) {
    return is_alpha(c) || is_digit(c) || c == '_' || (unsigned char)c >= 0x80;
}

/* Python whitespace at s[i] (0 if none). */
static size_t ws_at(const char *s, size_t n, size_t i) {
    return i < n ? caprl_py_space_len(s + i, n - i) : 0;
}

static size_t skip_ws(const char *s, size_t n, size_t i) {
    size_t k;
    while ((k = ws_at(s, n, i)) > 0) {
        i += k;
    }
    return i;
}

/* Python's str.strip(). */
static void py_strip(const char **s, size_t *n) {
    size_t b = 0, e = *n;
    b = skip_ws(*s, *n, 0);
    while (e > b) {
        /* Walk back over one whitespace character (all are 1-3 bytes). */
        size_t k = 0;
        for (size_t back = 1; back <= 3 && back <= e - b; back++) {
            if (caprl_py_space_len(*s + e - back, back) == back) {
                k = back;
                break;
            }
        }
        if (!k) {
            break;
        }
        e -= k;
    }
    *s += b;
    *n = e - b;
}

static char *dup_n(const char *s, size_t n) {
    return caprl_xstrndup(s, n);
}

/* ---- boxed="all": extract_boxed_content(text, mode="all") --------------------------------------------------- */

/* Last occurrence of w entirely inside [0, end), or -1 (Python's str.rfind(w, 0, end)). */
static int64_t rfind(const char *s, size_t end, const char *w) {
    size_t k = strlen(w);
    for (size_t i = end >= k ? end - k + 1 : 0; i-- > 0;) {
        if (memcmp(s + i, w, k) == 0) {
            return (int64_t)i;
        }
    }
    return -1;
}

static char *boxed_all(const char *s, size_t n) {
    /* Results are collected right to left; reversed at the end. */
    char  **res = NULL;
    size_t *res_n = NULL;
    int32_t n_res = 0, cap = 0;
    size_t  current = n, max_pos = n;
    for (;;) {
        int64_t bi = rfind(s, current, "\\boxed"), fi = rfind(s, current, "\\fbox");
        if (bi < 0 && fi < 0) {
            break;
        }
        size_t start = (size_t)(bi > fi ? bi : fi);
        size_t p = start + (bi > fi ? 6 : 5);
        while (p < max_pos && ws_at(s, n, p)) {
            p += ws_at(s, n, p);
        }
        if (p >= max_pos) {
            break;
        }
        const char *piece = NULL;
        size_t      piece_n = 0;
        bool        stop = false;
        if (s[p] == '{') {
            size_t i = p, depth = 1, close = 0;
            bool   found = false;
            while (i + 1 < max_pos && !found) {
                i++;
                if (s[i] == '{') {
                    depth++;
                } else if (s[i] == '}' && --depth == 0) {
                    close = i;
                    found = true;
                }
            }
            if (!found) {
                stop = true;
                if (n_res == 0) {
                    piece = s + p;
                    piece_n = n - p;
                }
            } else {
                piece = s + p + 1;
                piece_n = close - p - 1;
                py_strip(&piece, &piece_n);
                if (n_res > 0 && res_n[n_res - 1] == piece_n && memcmp(res[n_res - 1], piece, piece_n) == 0) {
                    piece = NULL; /* consecutive duplicates are kept once */
                }
                max_pos = start;
            }
        } else {
            stop = true;
            if (n_res == 0) {
                piece = s + p;
                piece_n = n - p;
            }
        }
        if (piece) {
            if (n_res == cap) {
                cap = cap ? cap * 2 : 4;
                res = caprl_xrealloc(res, (size_t)cap * sizeof *res);
                res_n = caprl_xrealloc(res_n, (size_t)cap * sizeof *res_n);
            }
            res[n_res] = dup_n(piece, piece_n);
            res_n[n_res] = piece_n;
            n_res++;
        }
        if (stop) {
            break;
        }
        current = start;
    }
    caprl_sb b = {0};
    if (n_res == 0) {
        caprl_sb_add(&b, s, n);
    }
    for (int32_t i = n_res - 1; i >= 0; i--) {
        caprl_sb_add(&b, res[i], res_n[i]);
        if (i > 0) {
            caprl_sb_addc(&b, ',');
        }
        free(res[i]);
    }
    free(res);
    free(res_n);
    return caprl_sb_take(&b);
}

/* ---- basic_latex ------------------------------------------------------------------------------------------ */

static char *replace_all(const char *s, const char *from, const char *to) {
    caprl_sb b = {0};
    size_t   n = strlen(s), k = strlen(from);
    for (size_t i = 0; i < n;) {
        if (starts(s, n, i, from)) {
            caprl_sb_adds(&b, to);
            i += k;
        } else {
            caprl_sb_addc(&b, s[i++]);
        }
    }
    return caprl_sb_take(&b);
}

static void replace_in_place(char **s, const char *from, const char *to) {
    char *r = replace_all(*s, from, to);
    free(*s);
    *s = r;
}

static const char *const k_left_tokens[] = {"\\{", "{", "\\|", "|", "[", "(", "\\rbracl", "\\lgroup", "\\lbrace",
                                            "\\lbrack", "\\vert", "\\lvert", "\\lceil", "\\lfloor", "\\langle",
                                            "\\llcorner", "\\ulcorner"};
static const char *const k_right_tokens[] = {"\\}", "}", "\\|", "|", "]", ")", "\\rbrack", "\\rgroup", "\\rbrace",
                                             "\\vert", "\\rvert", "\\rceil", "\\rfloor", "\\rangle", "\\lrcorner",
                                             "\\urcorner"};

/* r_left / r_right: "\left(" -> "(", "\mleft\{" -> "\{", ...; "\left." and "\leftarrow" stay. */
static char *strip_left_right(const char *s, const char *cmd, const char *const *tokens, size_t n_tokens) {
    caprl_sb b = {0};
    size_t   n = strlen(s);
    for (size_t i = 0; i < n;) {
        size_t at = 0;
        if (starts(s, n, i, "\\m") && starts(s, n, i + 2, cmd + 1)) {
            at = i + 2 + strlen(cmd + 1);
        } else if (starts(s, n, i, cmd)) {
            at = i + strlen(cmd);
        }
        bool done = false;
        for (size_t t = 0; at && t < n_tokens && !done; t++) {
            if (starts(s, n, at, tokens[t])) {
                caprl_sb_adds(&b, tokens[t]);
                i = at + strlen(tokens[t]);
                done = true;
            }
        }
        if (!done) {
            caprl_sb_addc(&b, s[i++]);
        }
    }
    return caprl_sb_take(&b);
}

/* to_remove_regex: \mathrm{th}, "\!" and the whitespace after it, an empty \text{ }, \$ and $, unescaped quotes,
 * \displaystyle. */
static char *remove_useless(const char *s) {
    caprl_sb b = {0};
    size_t   n = strlen(s);
    for (size_t i = 0; i < n;) {
        if (starts(s, n, i, "\\mathrm{th}")) {
            i += strlen("\\mathrm{th}");
            continue;
        }
        if (starts(s, n, i, "\\!")) {
            i = skip_ws(s, n, i + 2);
            continue;
        }
        if (starts(s, n, i, "\\text")) {
            size_t j = skip_ws(s, n, i + 5);
            if (j < n && s[j] == '{') {
                j = skip_ws(s, n, j + 1);
                if (j < n && s[j] == '}') {
                    i = j + 1;
                    continue;
                }
            }
        }
        if (starts(s, n, i, "\\$")) {
            i += 2;
            continue;
        }
        if (s[i] == '$' || ((s[i] == '"' || s[i] == '\'') && (i == 0 || s[i - 1] != '\\'))) {
            i++;
            continue;
        }
        if (starts(s, n, i, "\\displaystyle")) {
            i += strlen("\\displaystyle");
            continue;
        }
        caprl_sb_addc(&b, s[i++]);
    }
    return caprl_sb_take(&b);
}

/* skip_ws for a left-to-right scan: every position inside one whitespace run has the same run end, so each run
 * is walked once however many patterns start inside it. */
typedef struct ws_cache {
    size_t lo, end;
    bool   valid;
} ws_cache;

static size_t skip_ws_cached(ws_cache *c, const char *s, size_t n, size_t i) {
    if (!ws_at(s, n, i)) {
        return i;
    }
    if (!c->valid || i < c->lo || i >= c->end) {
        c->lo = i;
        c->end = skip_ws(s, n, i);
        c->valid = true;
    }
    return c->end;
}

/* "\s*\bWORD\b" at i: returns the match end or 0. */
static size_t match_ws_word(ws_cache *wc, const char *s, size_t n, size_t i, const char *word) {
    size_t j = skip_ws_cached(wc, s, n, i);
    bool   boundary_before = j > i ? true : (i == 0 || !is_word(s[i - 1]));
    if (!boundary_before || !starts(s, n, j, word)) {
        return 0;
    }
    size_t e = j + strlen(word);
    if (e < n && is_word(s[e])) {
        return 0;
    }
    return e;
}

/* ",?\s*" then WORD (and | or) at i with no ASCII letter before i or after the word: returns the end or 0. */
static size_t match_and_or(ws_cache *wc, const char *s, size_t n, size_t i) {
    if (i > 0 && is_alpha(s[i - 1])) {
        return 0;
    }
    size_t j = i;
    if (j < n && s[j] == ',') {
        j++;
    }
    j = skip_ws_cached(wc, s, n, j);
    size_t e = starts(s, n, j, "and") ? j + 3 : starts(s, n, j, "or") ? j + 2 : 0;
    if (!e || (e < n && is_alpha(s[e]))) {
        return 0;
    }
    return e;
}

/* ",?\s*\\text{\s*(and|or)\s*}" at i. */
static size_t match_and_or_text(ws_cache *wc, const char *s, size_t n, size_t i) {
    size_t j = i;
    if (j < n && s[j] == ',') {
        j++;
    }
    j = skip_ws_cached(wc, s, n, j);
    if (!starts(s, n, j, "\\text{")) {
        return 0;
    }
    j = skip_ws(s, n, j + 6);
    if (starts(s, n, j, "and")) {
        j += 3;
    } else if (starts(s, n, j, "or")) {
        j += 2;
    } else {
        return 0;
    }
    j = skip_ws(s, n, j);
    return j < n && s[j] == '}' ? j + 1 : 0;
}

/* replace_in_latex: one alternation, tried in this order at each position, left to right. */
static char *replace_in_latex(const char *s) {
    caprl_sb b = {0};
    size_t   n = strlen(s);
    ws_cache wc = {0, 0, false};
    for (size_t i = 0; i < n;) {
        size_t      e = 0;
        const char *rep = NULL;
        /* Every alternative starts with one of these characters (or whitespace); anything else is copied. */
        if (!strchr("\\{~,aiop", s[i]) && !ws_at(s, n, i)) {
            caprl_sb_addc(&b, s[i++]);
            continue;
        }
        if (starts(s, n, i, "\\mathrm") || starts(s, n, i, "\\mathit") || starts(s, n, i, "\\mathbf")) {
            e = i + 7, rep = "\\text";
        } else if (starts(s, n, i, "\\textnormal")) {
            e = i + 11, rep = "\\text";
        } else if (starts(s, n, i, "\\textbf") || starts(s, n, i, "\\textit") || starts(s, n, i, "\\textrm")) {
            e = i + 7, rep = "\\text";
        } else if (starts(s, n, i, "\\dfrac") || starts(s, n, i, "\\tfrac") || starts(s, n, i, "\\cfrac")) {
            e = i + 6, rep = "\\frac";
        } else if (ws_at(s, n, i) && i + ws_at(s, n, i) < n && s[i + ws_at(s, n, i)] == '.') {
            e = i + ws_at(s, n, i) + 1, rep = " 0.";
        } else if (starts(s, n, i, "{.")) {
            e = i + 2, rep = "{0.";
        } else if (starts(s, n, i, "~=")) {
            e = i + 2, rep = "\\approx";
        } else {
            /* comma: \s*\{\s*,\s*\} */
            size_t j = skip_ws_cached(&wc, s, n, i);
            if (j < n && s[j] == '{') {
                j = skip_ws(s, n, j + 1);
                if (j < n && s[j] == ',') {
                    j = skip_ws(s, n, j + 1);
                    if (j < n && s[j] == '}') {
                        e = j + 1, rep = ",";
                    }
                }
            }
        }
        if (!rep && (e = match_and_or(&wc, s, n, i)) > 0) {
            rep = ",";
        }
        if (!rep && (e = match_and_or_text(&wc, s, n, i)) > 0) {
            rep = ",";
        }
        if (!rep && s[i] == '\\' && (i == 0 || s[i - 1] != '\\') && ws_at(s, n, i + 1)) {
            e = i + 1 + ws_at(s, n, i + 1), rep = " ";
        }
        if (!rep && starts(s, n, i, "infinity")) {
            e = i + 8, rep = "\\infty";
        }
        if (!rep && (starts(s, n, i, "\\ldots") || (s[i] == ',' && starts(s, n, i + 1, "\\ldots")))) {
            e = i + 6 + (s[i] == ','), rep = " ";
        }
        if (!rep && (e = match_ws_word(&wc, s, n, i, "percentage")) > 0) {
            rep = "\\%";
        }
        if (!rep && starts(s, n, i, "\\text{percentage}")) {
            e = i + 17, rep = "%";
        }
        if (!rep && (e = match_ws_word(&wc, s, n, i, "percent")) > 0) {
            rep = "\\%";
        }
        if (!rep && starts(s, n, i, "\\text{percent}")) {
            e = i + 14, rep = "%";
        }
        if (!rep && (e = match_ws_word(&wc, s, n, i, "pct")) > 0) {
            rep = "\\%";
        }
        if (!rep && starts(s, n, i, "\\text{pct}")) {
            e = i + 10, rep = "%";
        }
        if (!rep && starts(s, n, i, "inf") && (i == 0 || s[i - 1] != '\\') && !starts(s, n, i + 3, "inity")) {
            e = i + 3, rep = "\\infty";
        }
        if (!rep && starts(s, n, i, " sqrt")) {
            e = i + 5, rep = "\\sqrt";
        }
        if (rep) {
            caprl_sb_adds(&b, rep);
            i = e;
        } else {
            caprl_sb_addc(&b, s[i++]);
        }
    }
    return caprl_sb_take(&b);
}

static char *basic_latex(char *s) {
    replace_in_place(&s, "\\mathrm{T}", "T");
    replace_in_place(&s, "\\mathrm{d}", "d");
    replace_in_place(&s, "{\\rm d}", "d");
    replace_in_place(&s, "\\left[\\begin{matrix}", "\\begin{bmatrix}");
    replace_in_place(&s, "\\end{matrix}\\right]", "\\end{bmatrix}");
    char *t = strip_left_right(s, "\\left", k_left_tokens, sizeof k_left_tokens / sizeof k_left_tokens[0]);
    free(s);
    s = strip_left_right(t, "\\right", k_right_tokens, sizeof k_right_tokens / sizeof k_right_tokens[0]);
    free(t);
    t = remove_useless(s);
    free(s);
    s = replace_in_latex(t);
    free(t);
    replace_in_place(&s, "\n", " ");
    replace_in_place(&s, "\t", " ");
    if (!strstr(s, "matrix")) {
        /* A doubled backslash before a command name is one backslash. */
        caprl_sb b = {0};
        size_t   n = strlen(s);
        for (size_t i = 0; i < n;) {
            if (starts(s, n, i, "\\\\") && i + 2 < n && is_alpha(s[i + 2])) {
                caprl_sb_addc(&b, '\\');
                i += 2;
            } else {
                caprl_sb_addc(&b, s[i++]);
            }
        }
        free(s);
        s = caprl_sb_take(&b);
    }
    return s;
}

/* ---- units ---------------------------------------------------------------------------------------------- */

/* latex2sympy2_extended's unit words, in its order ("integer" "point" is one word there: Python joins adjacent
 * literals). Matched after a digit, '}' or whitespace, optionally plural, at the end of the text. */
static const char *const k_units[] = {
    "integerpoint", "feet", "sue", "digit", "pound", "meal", "edge", "student", "children ticket", "multiple",
    "east", "degree", "mph", "kmph", "ft", "m square", " m east", "sq m", "deg", "mile", "q .", "monkey", "prime",
    "ratio", "profit of rs", "rd", "o", "gm", "p . m", "lb", "tile", "per", "dm", "lt", "gain", "ab", "way", "west",
    "a .", "b .", "c .", "d .", "e .", "f .", "g .", "h .", "t", "h", "no change", "men", "soldier", "pie", "bc",
    "excess", "st", "inches", "noon", "cent", "by", "gal", "kmh", "c", "acre", "rise", "a . m", "th",
    "\xCF\x80 r 2", "sq", "mark", "l", "toy", "coin", "sq . m", "gallon", "\xC2\xB0 f", "profit", "minw", "yr",
    "women", "am", "pm", "hr", "cu cm", "square", "v \xC3\xA2 \xE2\x82\xAC \xE2\x84\xA2", "are", "rupee",
    "rounds", "cubic", "cc", "mtr", "s", "ohm", "number", "kmph", "day", "hour", "minute", "min", "second", "man",
    "woman", "sec", "cube", "mt", "sq inch", "mp", "\xE2\x88\x8F cm \xC2\xB3", "hectare", "more", "sec", "unit",
    "cu . m", "cm 2", "rs .", "rs", "kg", "g", "month", "km", "m", "cm", "mm", "apple", "liter", "loss", "yard",
    "pure", "year", "increase", "decrease", "d", "less", "Surface", "litre", "pi sq m", "s .", "metre", "meter",
    "inch",
};

/* Does s[0..n) (trailing whitespace already cut) read UNIT (s|es)? for some unit? */
static bool is_unit_tail(const char *t, size_t m) {
    for (size_t u = 0; u < sizeof k_units / sizeof k_units[0]; u++) {
        size_t k = strlen(k_units[u]);
        if (m >= k && memcmp(t, k_units[u], k) == 0) {
            size_t rest = m - k;
            if (rest == 0 || (rest == 1 && t[k] == 's') || (rest == 2 && t[k] == 'e' && t[k + 1] == 's')) {
                return true;
            }
        }
    }
    return false;
}

/* Length of the whitespace character that ends at s[end] (exclusive), or 0. */
static size_t ws_before(const char *s, size_t end) {
    for (size_t back = 1; back <= 3 && back <= end; back++) {
        if (caprl_py_space_len(s + end - back, back) == back) {
            return back;
        }
    }
    return 0;
}

/* units_regex.sub(r"\1", s) for (\d|\}|\s)\s*(?:UNITS)(?:s|es)?\s*$: the leftmost digit / '}' / whitespace
 * followed by optional whitespace and a unit word to the end keeps only that character. Returns NULL if there is
 * no match. A unit word (with its plural ending) is at most 17 bytes, so only the last ones can start it; the
 * group character is then the one before the whitespace run that precedes the word, or its first whitespace. */
static char *strip_unit_word(const char *s) {
    size_t n = strlen(s), end = n, k;
    while ((k = ws_before(s, end)) > 0) {
        end -= k;
    }
    size_t best = SIZE_MAX;
    for (size_t u = end > 40 ? end - 40 : 0; u < end; u++) {
        if (!is_unit_tail(s + u, end - u)) {
            continue;
        }
        size_t w0 = u;
        while ((k = ws_before(s, w0)) > 0) {
            w0 -= k;
        }
        size_t keep;
        if (w0 > 0 && (is_digit(s[w0 - 1]) || s[w0 - 1] == '}')) {
            keep = w0; /* the digit or brace before the run is the group */
        } else if (w0 < u) {
            keep = w0 + ws_at(s, n, w0); /* the run's first whitespace is the group */
        } else {
            continue;
        }
        best = keep < best ? keep : best;
    }
    return best == SIZE_MAX ? NULL : dup_n(s, best);
}

/* unit_superscript_regex.sub("", s): a trailing \text{...} or \mbox{...} (optionally ^d or {^d}) is cut,
 * starting at the leftmost \text{ / \mbox{ that reaches the end. Returns a new string (s itself if no match). */
static char *strip_text_suffix(const char *s) {
    size_t n = strlen(s);
    size_t close[3];
    int    n_close = 0;
    if (n >= 1 && s[n - 1] == '}') {
        close[n_close++] = n - 1;
    }
    if (n >= 3 && s[n - 3] == '}' && s[n - 2] == '^' && is_digit(s[n - 1])) {
        close[n_close++] = n - 3;
    }
    if (n >= 5 && s[n - 5] == '}' && s[n - 4] == '{' && s[n - 3] == '^' && is_digit(s[n - 2]) && s[n - 1] == '}') {
        close[n_close++] = n - 5;
    }
    for (size_t i = 0; i < n && n_close; i++) {
        if (!starts(s, n, i, "\\text{") && !starts(s, n, i, "\\mbox{")) {
            continue;
        }
        for (int c = 0; c < n_close; c++) {
            if (close[c] >= i + 6) {
                return dup_n(s, i);
            }
        }
    }
    return caprl_xstrdup(s);
}

static char *units(char *s) {
    char       *t = strip_text_suffix(s);
    const char *ts = t;
    size_t      tn = strlen(t);
    py_strip(&ts, &tn);
    if (tn > 0 && (tn != strlen(s) || memcmp(ts, s, tn) != 0)) {
        char *u = dup_n(ts, tn);
        free(s);
        s = u;
    }
    free(t);
    for (int pass = 0; pass < 2; pass++) {
        char *u = strip_unit_word(s);
        if (u && u[0] != '\0' && strcmp(u, s) != 0) {
            free(s);
            s = u;
        } else {
            free(u);
        }
    }
    return s;
}

/* ---- nits and malformed operators ----------------------------------------------------------------------- */

static char *nits(char *s) {
    if (s[0] == '.') {
        char *t = caprl_xasprintf("0%s", s);
        free(s);
        s = t;
    }
    if (strcmp(s, "0.5") == 0) {
        free(s);
        s = caprl_xstrdup("\\frac{1}{2}");
    }
    return s;
}

/* One optional whitespace character (\s?). */
static size_t opt_ws(const char *s, size_t n, size_t i) {
    return i + ws_at(s, n, i);
}

/* The malformed_operators regexes, in order; each is a left-to-right re.sub. */
static char *fix_operator_patterns(const char *s) {
    char *cur = caprl_xstrdup(s);
    for (int rule = 0; rule < 7; rule++) {
        caprl_sb b = {0};
        size_t   n = strlen(cur);
        /* A lazy "(.*?)\)" fails only when no ')' follows at all; knowing the last one keeps failures O(1). */
        const char *last_paren = strrchr(cur, ')'), *last_brace = strrchr(cur, '}');
        /* Rule 4's lazy "{(.*?)}\s?(\d)" ends at the first '}' that has a digit after it (one optional whitespace
         * between): close_digit[j] is that '}' at or after j, or n. */
        size_t *close_digit = NULL;
        if (rule == 4 && strstr(cur, "\\frac")) {
            close_digit = caprl_xmalloc((n + 1) * sizeof *close_digit);
            close_digit[n] = n;
            for (size_t j = n; j-- > 0;) {
                size_t d = cur[j] == '}' ? opt_ws(cur, n, j + 1) : n;
                close_digit[j] = d < n && is_digit(cur[d]) ? j : close_digit[j + 1];
            }
        }
        for (size_t i = 0; i < n;) {
            size_t e = 0;
            if (rule == 0 && cur[i] == '^') { /* \^\s?\((.*?)\) -> ^{\1} */
                size_t j = opt_ws(cur, n, i + 1);
                const char *close = j < n && cur[j] == '(' && last_paren && last_paren > cur + j
                                        ? memchr(cur + j + 1, ')', n - j - 1)
                                        : NULL;
                if (close) {
                    caprl_sb_addf(&b, "^{%.*s}", (int)(close - cur - j - 1), cur + j + 1);
                    e = (size_t)(close - cur) + 1;
                }
            } else if (rule == 1 && starts(cur, n, i, "sqrt")) { /* sqrt\s?\((.*?)\) -> \sqrt{\1} */
                size_t j = opt_ws(cur, n, i + 4);
                const char *close = j < n && cur[j] == '(' && last_paren && last_paren > cur + j
                                        ? memchr(cur + j + 1, ')', n - j - 1)
                                        : NULL;
                if (close) {
                    caprl_sb_addf(&b, "\\sqrt{%.*s}", (int)(close - cur - j - 1), cur + j + 1);
                    e = (size_t)(close - cur) + 1;
                }
            } else if ((rule == 2 && starts(cur, n, i, "\\frac")) || (rule == 3 && starts(cur, n, i, "\\log_"))) {
                /* \\frac\s?(\d)\s?(\d+) -> \frac{\1}{\2};  \\log_\s?(\d)\s?(\d+) -> \log_{\1}{\2} */
                size_t j = opt_ws(cur, n, i + (rule == 2 ? 5 : 5));
                if (j < n && is_digit(cur[j])) {
                    size_t k = opt_ws(cur, n, j + 1), d = k;
                    while (d < n && is_digit(cur[d])) {
                        d++;
                    }
                    if (d > k) {
                        caprl_sb_addf(&b, "%s{%c}{%.*s}", rule == 2 ? "\\frac" : "\\log_", cur[j], (int)(d - k), cur + k);
                        e = d;
                    }
                }
            } else if (rule == 4 && starts(cur, n, i, "\\frac")) { /* \\frac\s?{(.*?)}\s?(\d) */
                size_t j = opt_ws(cur, n, i + 5);
                if (j < n && cur[j] == '{' && close_digit[j + 1] < n) {
                    size_t c = close_digit[j + 1], d = opt_ws(cur, n, c + 1);
                    caprl_sb_addf(&b, "\\frac{%.*s}{%c}", (int)(c - j - 1), cur + j + 1, cur[d]);
                    e = d + 1;
                }
            } else if (rule == 5 && starts(cur, n, i, "\\frac")) { /* \\frac\s?(\d)\s?{(.*?)} */
                size_t j = opt_ws(cur, n, i + 5);
                if (j < n && is_digit(cur[j])) {
                    size_t k = opt_ws(cur, n, j + 1);
                    const char *close = k < n && cur[k] == '{' && last_brace && last_brace > cur + k
                                            ? memchr(cur + k + 1, '}', n - k - 1)
                                            : NULL;
                    if (close) {
                        caprl_sb_addf(&b, "\\frac{%c}{%.*s}", cur[j], (int)(close - cur - k - 1), cur + k + 1);
                        e = (size_t)(close - cur) + 1;
                    }
                }
            } else if (rule == 6 && starts(cur, n, i, "\\sqrt")) { /* \\sqrt\s?(\d) -> \sqrt{\1} */
                size_t j = opt_ws(cur, n, i + 5);
                if (j < n && is_digit(cur[j])) {
                    caprl_sb_addf(&b, "\\sqrt{%c}", cur[j]);
                    e = j + 1;
                }
            }
            if (e) {
                i = e;
            } else {
                caprl_sb_addc(&b, cur[i++]);
            }
        }
        free(close_digit);
        free(cur);
        cur = caprl_sb_take(&b);
    }
    return cur;
}

/* _fix_sqrt: "\sqrt3" -> "\sqrt{3}". */
static char *fix_sqrt(const char *s) {
    if (!strstr(s, "\\sqrt")) {
        return caprl_xstrdup(s);
    }
    caprl_sb    b = {0};
    const char *p = strstr(s, "\\sqrt");
    caprl_sb_add(&b, s, (size_t)(p - s));
    while (p) {
        const char *part = p + 5;
        const char *next = strstr(part, "\\sqrt");
        size_t      len = next ? (size_t)(next - part) : strlen(part);
        size_t      ws = skip_ws(part, len, 0);
        part += ws;
        len -= ws;
        if (len > 0 && part[0] != '{' && part[0] != '[') {
            caprl_sb_addf(&b, "\\sqrt{%c}%.*s", part[0], (int)(len - 1), part + 1);
        } else {
            caprl_sb_adds(&b, "\\sqrt");
            caprl_sb_add(&b, part, len);
        }
        p = next;
    }
    return caprl_sb_take(&b);
}

/* _fix_fracs: "\frac12" -> "\frac{1}{2}", "\frac1{2}" -> "\frac{1}{2}"; gives up (returns s) on "\frac" + one
 * character. */
static char *fix_fracs(const char *s) {
    const char *p = strstr(s, "\\frac");
    if (!p) {
        return caprl_xstrdup(s);
    }
    caprl_sb b = {0};
    caprl_sb_add(&b, s, (size_t)(p - s));
    while (p) {
        const char *part = p + 5;
        const char *next = strstr(part, "\\frac");
        size_t      len = next ? (size_t)(next - part) : strlen(part);
        size_t      ws = skip_ws(part, len, 0);
        part += ws;
        len -= ws;
        caprl_sb_adds(&b, "\\frac");
        if (len > 0 && part[0] == '{') {
            caprl_sb_add(&b, part, len);
        } else if (len < 2) {
            caprl_sb_free(&b);
            return caprl_xstrdup(s);
        } else if (part[1] != '{') {
            caprl_sb_addf(&b, "{%c}{%c}%.*s", part[0], part[1], (int)(len - 2), part + 2);
        } else {
            caprl_sb_addf(&b, "{%c}%.*s", part[0], (int)(len - 1), part + 1);
        }
        p = next;
    }
    return caprl_sb_take(&b);
}

/* Python's int(t) == v and f"{v}" == t: an optional '-', then digits without a leading zero (or "0"). */
static bool canonical_int(const char *t, size_t n) {
    size_t i = t[0] == '-' ? 1 : 0;
    if (i >= n || (t[i] == '0' && n - i > 1) || (t[i] == '0' && i == 1)) {
        return false;
    }
    for (; i < n; i++) {
        if (!is_digit(t[i])) {
            return false;
        }
    }
    return true;
}

/* _fix_a_slash_b: exactly "a/b" with canonical integers -> \frac{a}{b}. */
static char *fix_a_slash_b(const char *s) {
    const char *slash = strchr(s, '/');
    if (slash && !strchr(slash + 1, '/') && slash > s && slash[1] &&
        canonical_int(s, (size_t)(slash - s)) && canonical_int(slash + 1, strlen(slash + 1))) {
        return caprl_xasprintf("\\frac{%.*s}{%s}", (int)(slash - s), s, slash + 1);
    }
    return caprl_xstrdup(s);
}

static char *malformed_operators(char *s) {
    char *t = fix_operator_patterns(s);
    free(s);
    replace_in_place(&t, " sqrt", "\\sqrt");
    s = fix_sqrt(t);
    free(t);
    t = fix_fracs(s);
    free(s);
    s = fix_a_slash_b(t);
    free(t);
    return s;
}

char *caprl_math_normalize(const char *s, size_t n) {
    char *t = boxed_all(s, n);
    t = basic_latex(t);
    t = units(t);
    t = nits(t);
    t = malformed_operators(t);
    return t;
}

/* ---- values --------------------------------------------------------------------------------------------- */

typedef struct num_val {
    double  v;
    bool    is_float;
    bool    exact;
    int64_t p, q;
} num_val;

static int64_t gcd64(int64_t a, int64_t b) {
    a = a < 0 ? -a : a;
    b = b < 0 ? -b : b;
    while (b) {
        int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

static void num_reduce(num_val *x) {
    if (!x->exact) {
        return;
    }
    if (x->q < 0) {
        if (x->p == INT64_MIN || x->q == INT64_MIN) {
            x->exact = false;
            return;
        }
        x->p = -x->p;
        x->q = -x->q;
    }
    int64_t g = gcd64(x->p, x->q);
    if (g > 1) {
        x->p /= g;
        x->q /= g;
    }
}

/* Returns the index of the brace matching the '{' at i, or n. */
static size_t match_brace(const char *s, size_t n, size_t i) {
    int depth = 0;
    for (size_t k = i; k < n; k++) {
        if (s[k] == '{') {
            depth++;
        } else if (s[k] == '}' && --depth == 0) {
            return k;
        }
    }
    return n;
}

static bool parse_num(const char *s, size_t n, num_val *out, int depth);

/* NUMBER (digits, or digits '.' digits), E_NOTATION, or the comma-thousands form latex2sympy accepts. */
static bool parse_plain_number(const char *s, size_t n, num_val *out) {
    size_t i = 0, int_digits = 0, frac_digits = 0;
    bool   commas = false;
    char   digits[40];
    size_t nd = 0;
    bool   overflow = false;
    while (i < n && (is_digit(s[i]) || (s[i] == ',' && i > 0))) {
        if (s[i] == ',') {
            /* \d{1,3}(,\d{3})+: every group after a comma has exactly three digits */
            if (i + 3 > n || !is_digit(s[i + 1]) || !is_digit(s[i + 2]) || !is_digit(s[i + 3]) ||
                (i + 4 < n && is_digit(s[i + 4]))) {
                return false;
            }
            if (!commas && int_digits > 3) {
                return false;
            }
            commas = true;
            i++;
            continue;
        }
        if (nd < sizeof digits - 1) {
            digits[nd++] = s[i];
        } else {
            overflow = true;
        }
        int_digits++;
        i++;
    }
    bool has_point = false, has_exp = false;
    if (i < n && s[i] == '.') {
        has_point = true;
        i++;
        while (i < n && is_digit(s[i])) {
            if (nd < sizeof digits - 1) {
                digits[nd++] = s[i];
            } else {
                overflow = true;
            }
            frac_digits++;
            i++;
        }
        if (frac_digits == 0) {
            return false; /* "5." is not a NUMBER */
        }
    }
    if (int_digits + frac_digits == 0) {
        return false;
    }
    int64_t exp10 = 0;
    if (i < n && s[i] == 'E' && !commas) { /* latex2sympy's E_NOTATION: a lowercase e is Euler's number */
        size_t j = i + 1;
        bool   neg = j < n && (s[j] == '-' || s[j] == '+') ? s[j++] == '-' : false;
        size_t d0 = j;
        while (j < n && is_digit(s[j]) && j - d0 < 6) {
            exp10 = exp10 * 10 + (s[j] - '0');
            j++;
        }
        if (j == d0 || j != n) {
            return false;
        }
        exp10 = neg ? -exp10 : exp10;
        has_exp = true;
        i = j;
    }
    if (i != n) {
        return false;
    }
    /* The value through strtod of the plain digits (commas dropped), for the right rounding. */
    char buf[96];
    snprintf(buf, sizeof buf, "%.*s%s%.*se%lld", (int)int_digits > 38 ? 38 : (int)int_digits, digits,
             frac_digits ? "." : "", (int)frac_digits > 38 ? 38 : (int)frac_digits, digits + int_digits,
             (long long)exp10);
    out->v = overflow ? HUGE_VAL : strtod(buf, NULL);
    out->is_float = has_point || has_exp;
    out->exact = !overflow && nd <= 18 && !has_exp;
    if (out->exact) {
        int64_t p = 0, q = 1;
        for (size_t k = 0; k < nd; k++) {
            p = p * 10 + (digits[k] - '0');
        }
        for (size_t k = 0; k < frac_digits; k++) {
            q *= 10;
        }
        out->p = p;
        out->q = q;
        num_reduce(out);
    }
    if (overflow) {
        /* Too many digits for the model: keep the double only. */
        snprintf(buf, sizeof buf, "%.*s", (int)(n < 90 ? n : 90), s);
        out->v = strtod(buf, NULL);
    }
    return true;
}

/* The last position of token w in s[0, n) outside every (), {} and [] group, or n. */
static size_t find_top(const char *s, size_t n, const char *w) {
    size_t at = n, wl = strlen(w);
    int    d = 0;
    for (size_t k = 0; k < n; k++) {
        char c = s[k];
        if (c == '\\' && k + 1 < n && (s[k + 1] == '{' || s[k + 1] == '}')) {
            k++;
            continue;
        }
        d += (c == '(' || c == '{' || c == '[') ? 1 : (c == ')' || c == '}' || c == ']') ? -1 : 0;
        if (d == 0 && k + wl <= n && memcmp(s + k, w, wl) == 0) {
            at = k;
        }
    }
    return at;
}

static void num_mul(num_val *out, const num_val *a, const num_val *b) {
    out->v = a->v * b->v;
    out->is_float = a->is_float || b->is_float;
    out->exact = a->exact && b->exact && !__builtin_mul_overflow(a->p, b->p, &out->p) &&
                 !__builtin_mul_overflow(a->q, b->q, &out->q);
    num_reduce(out);
}

/* base ^ e for an exact integer exponent (|e| <= 64): exact when base is and nothing overflows. */
static bool num_pow(num_val *out, const num_val *base, const num_val *e) {
    if (!e->exact || e->q != 1 || e->p > 64 || e->p < -64 || (base->v == 0.0 && e->p < 0)) {
        return false;
    }
    int64_t k = e->p < 0 ? -e->p : e->p;
    num_val r = {.v = 1.0, .is_float = base->is_float, .exact = base->exact, .p = 1, .q = 1};
    for (int64_t i = 0; i < k; i++) {
        num_val t = r;
        num_mul(&r, &t, base);
    }
    if (e->p < 0) {
        r.v = 1.0 / r.v;
        int64_t t = r.p;
        r.p = r.q;
        r.q = t;
        num_reduce(&r);
    }
    *out = r;
    return true;
}

static bool parse_num(const char *s, size_t n, num_val *out, int depth) {
    if (depth > 8) {
        return false;
    }
    size_t b = skip_ws(s, n, 0);
    s += b;
    n -= b;
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t')) {
        n--;
    }
    if (n == 0) {
        return false;
    }
    /* Grouping: "(5)" and "{5}" are 5. */
    if ((s[0] == '(' && s[n - 1] == ')') || (s[0] == '{' && match_brace(s, n, 0) == n - 1)) {
        if (s[0] == '(') {
            int d = 0;
            bool whole = true;
            for (size_t k = 0; k < n && whole; k++) {
                d += s[k] == '(' ? 1 : s[k] == ')' ? -1 : 0;
                whole = d > 0 || k == n - 1;
            }
            if (!whole) {
                return false;
            }
        }
        return parse_num(s + 1, n - 2, out, depth + 1);
    }
    bool neg = false;
    if (s[0] == '-' || s[0] == '+') {
        neg = s[0] == '-';
        if (!parse_num(s + 1, n - 1, out, depth + 1)) {
            return false;
        }
        if (neg) {
            out->v = -out->v;
            out->p = -out->p;
        }
        return true;
    }
    /* Percent: NUMBER WS? (\% | %), or any number form followed by \%. */
    size_t pct = 0;
    if (n >= 2 && s[n - 2] == '\\' && s[n - 1] == '%') {
        pct = 2;
    } else if (s[n - 1] == '%') {
        pct = 1;
    }
    if (pct) {
        if (!parse_num(s, n - pct, out, depth + 1)) {
            return false;
        }
        out->v /= 100.0;
        if (out->exact && !__builtin_mul_overflow(out->q, 100, &out->q)) {
            num_reduce(out);
        } else {
            out->exact = false;
        }
        return true;
    }
    if (starts(s, n, 0, "\\text{") && match_brace(s, n, 5) == n - 1) {
        /* \text{2019} is 2019 and \text{-3} is -3 (math_verify matches their strings), but \text{0.5} is no 1/2
         * and \text{50\%} no 50\%: integers only */
        size_t d0 = (s[6] == '-' || s[6] == '+') ? 7 : 6, k = d0;
        while (k < n - 1 && is_digit(s[k])) {
            k++;
        }
        return k == n - 1 && k > d0 && parse_num(s + 6, n - 7, out, depth + 1);
    }
    /* A degree sign after a number: 60^\circ is 60 (latex2sympy drops it). */
    static const char *const k_degree[] = {"^{\\circ}", "^\\circ"};
    for (size_t k = 0; k < 2; k++) {
        size_t dl = strlen(k_degree[k]);
        if (n > dl && memcmp(s + n - dl, k_degree[k], dl) == 0) {
            return parse_num(s, n - dl, out, depth + 1);
        }
    }
    /* a : b is the ratio a / b; then products (\times, \cdot, *), then powers with an integer exponent */
    size_t op = find_top(s, n, ":");
    if (op < n) {
        num_val a, d;
        if (!parse_num(s, op, &a, depth + 1) || !parse_num(s + op + 1, n - op - 1, &d, depth + 1) || d.v == 0) {
            return false;
        }
        num_val inv = {.v = 1.0 / d.v, .is_float = d.is_float, .exact = d.exact, .p = d.q, .q = d.p};
        num_reduce(&inv);
        num_mul(out, &a, &inv);
        return true;
    }
    static const char *const k_times[] = {"\\times", "\\cdot", "*"};
    for (size_t k = 0; k < 3; k++) {
        op = find_top(s, n, k_times[k]);
        size_t ol = strlen(k_times[k]);
        if (op < n && op > 0) {
            num_val a, b2;
            if (!parse_num(s, op, &a, depth + 1) || !parse_num(s + op + ol, n - op - ol, &b2, depth + 1)) {
                return false;
            }
            num_mul(out, &a, &b2);
            return true;
        }
    }
    op = find_top(s, n, "\\sqrt");
    if (op < n && op > 0) { /* a number times a root: 2\sqrt{3} */
        num_val a, b2;
        if (!parse_num(s, op, &a, depth + 1) || !parse_num(s + op, n - op, &b2, depth + 1)) {
            return false;
        }
        num_mul(out, &a, &b2);
        return true;
    }
    op = find_top(s, n, "^");
    if (op < n && op > 0) {
        num_val a, e;
        return parse_num(s, op, &a, depth + 1) && parse_num(s + op + 1, n - op - 1, &e, depth + 1) &&
               num_pow(out, &a, &e);
    }
    if (starts(s, n, 0, "\\sqrt{") && match_brace(s, n, 5) == n - 1) {
        num_val a;
        if (!parse_num(s + 6, n - 7, &a, depth + 1) || a.v < 0) {
            return false;
        }
        memset(out, 0, sizeof *out);
        out->v = sqrt(a.v);
        /* a rational with square numerator and denominator stays exact; otherwise the irrational root is
         * compared as SymPy's numeric check does, rounded */
        int64_t rp = a.exact ? (int64_t)llround(sqrt((double)a.p)) : -1;
        int64_t rq = a.exact ? (int64_t)llround(sqrt((double)a.q)) : -1;
        if (a.exact && rp * rp == a.p && rq * rq == a.q) {
            out->exact = true;
            out->p = rp;
            out->q = rq;
            out->is_float = a.is_float;
        } else {
            out->is_float = true;
        }
        return true;
    }
    if (starts(s, n, 0, "\\frac{")) {
        size_t c1 = match_brace(s, n, 5);
        if (c1 >= n || c1 + 1 >= n || s[c1 + 1] != '{') {
            return false;
        }
        size_t  c2 = match_brace(s, n, c1 + 1);
        num_val a, d;
        if (c2 != n - 1 || !parse_num(s + 6, c1 - 6, &a, depth + 1) ||
            !parse_num(s + c1 + 2, c2 - c1 - 2, &d, depth + 1) || d.v == 0) {
            return false;
        }
        out->v = a.v / d.v;
        out->is_float = a.is_float || d.is_float;
        out->exact = a.exact && d.exact && !__builtin_mul_overflow(a.p, d.q, &out->p) &&
                     !__builtin_mul_overflow(a.q, d.p, &out->q);
        num_reduce(out);
        return true;
    }
    memset(out, 0, sizeof *out);
    return parse_plain_number(s, n, out);
}

/* Canonical text of a non-numeric value: no whitespace, outer \text{} and parentheses unwrapped. Returns NULL
 * when latex2sympy would not parse it (characters outside plain LaTeX math, unbalanced brackets, a '.' that is
 * not a decimal point). */
static char *canonical_sym(const char *s, bool *word) {
    caprl_sb b = {0};
    size_t   n = strlen(s);
    for (size_t i = 0; i < n;) {
        size_t w = ws_at(s, n, i);
        if (w) {
            i += w;
        } else {
            caprl_sb_addc(&b, s[i++]);
        }
    }
    char  *t = caprl_sb_take(&b);
    size_t m = strlen(t), off = 0;
    *word = false;
    /* Unwrapping is bounded: SymPy's parser gives up on deeper nesting long before (recursion limit). */
    int layers = 0;
    for (bool changed = true; changed && m > 0 && layers < 64; layers++) {
        changed = false;
        if (starts(t + off, m, 0, "\\text{") && match_brace(t + off, m, 5) == m - 1) {
            off += 6;
            m -= 7;
            *word = m > 1;
            changed = true;
        } else if (m >= 4 && starts(t + off, m, 0, "\\{") && t[off + m - 2] == '\\' && t[off + m - 1] == '}') {
            off += 2; /* a set \{...\}: its entries (compared unordered, see sym_canonical) */
            m -= 4;
            changed = true;
        } else if (m >= 2 && t[off] == '[' && t[off + m - 1] == ']' && find_top(t + off + 1, m - 2, ",") == m - 2 &&
                   find_top(t + off, m, "]") == m - 1) {
            off += 1; /* [B]: one entry in brackets is the entry */
            m -= 2;
            changed = true;
        } else if (m >= 2 && ((t[off] == '(' && t[off + m - 1] == ')') ||
                              (t[off] == '{' && match_brace(t + off, m, 0) == m - 1))) {
            int  d = 0;
            bool whole = true;
            for (size_t k = 0; k < m && whole && t[off] == '('; k++) {
                d += t[off + k] == '(' ? 1 : t[off + k] == ')' ? -1 : 0;
                whole = d > 0 || k == m - 1;
            }
            if (whole) {
                off += 1;
                m -= 2;
                changed = true;
            }
        }
    }
    int  paren = 0, brace = 0, bracket = 0;
    bool ok = m > 0;
    for (size_t k = 0; k < m && ok; k++) {
        char c = t[off + k];
        paren += c == '(' ? 1 : c == ')' ? -1 : 0;
        brace += c == '{' ? 1 : c == '}' ? -1 : 0;
        bracket += c == '[' ? 1 : c == ']' ? -1 : 0;
        ok = paren >= 0 && brace >= 0 && bracket >= 0;
        if (c == '.') {
            ok = ok && k > 0 && k + 1 < m && is_digit(t[off + k - 1]) && is_digit(t[off + k + 1]);
        } else if (!(is_alpha(c) || is_digit(c) || strchr("+-*/^_(){}[],|!<>=\\%", c))) {
            ok = false;
        }
    }
    ok = ok && paren == 0 && brace == 0 && bracket == 0;
    char *r = ok ? dup_n(t + off, m) : NULL;
    free(t);
    return r;
}

/* The right-hand side of the last '=' (not part of <=, >=, !=, \=): math_verify compares an equation answer by
 * its right-hand side when the gold is not an equation. */
static const char *last_rhs(const char *s) {
    const char *r = s;
    for (const char *p = s; *p; p++) {
        if (*p == '=' && (p == s || !strchr("<>!\\", p[-1]))) {
            r = p + 1;
        }
    }
    return r;
}

void caprl_math_parse(const char *s, size_t n, caprl_math_parsed *out) {
    memset(out, 0, sizeof *out);
    /* The inline $...$ pattern: no newline inside, and the closing $ must not be escaped. Past
     * CAPRL_MATH_MAX_BYTES nothing is parsed: math_verify gives up after 5 s (parsing_timeout) and returns []. */
    if (n == 0 || n > CAPRL_MATH_MAX_BYTES || memchr(s, '\n', n) || s[n - 1] == '\\') {
        return;
    }
    /* A '$' inside would split the span; normalisation deletes every '$' anyway, so drop them here. The Unicode
     * minus sign (U+2212) is latex2sympy's '-'. */
    caprl_sb b = {0};
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\\' && i + 1 < n && s[i + 1] == '$') {
            i++; /* "\$" is inside the span and removed by the normalisation as a whole */
        } else if (i + 2 < n && memcmp(s + i, "\xe2\x88\x92", 3) == 0) {
            caprl_sb_addc(&b, '-');
            i += 2;
        } else if (s[i] != '$') {
            caprl_sb_addc(&b, s[i]);
        }
    }
    size_t blank = 0; /* only whitespace inside $...$ is no math span for math_verify's extraction: nothing */
    while (blank < b.len && ws_at(b.s, b.len, blank)) {
        blank += ws_at(b.s, b.len, blank);
    }
    if (blank == b.len) {
        caprl_sb_free(&b);
        return;
    }
    char *norm = caprl_math_normalize(b.s, b.len);
    caprl_sb_free(&b);
    const char *rhs = last_rhs(norm);
    if (rhs != norm) { /* an equation: its left-hand side, which must match when both answers are equations */
        char *left = dup_n(norm, (size_t)(rhs - 1 - norm));
        bool  unused = false;
        out->lhs = canonical_sym(left, &unused);
        free(left);
        if (!out->lhs) {
            out->lhs = dup_n("?", 1);
        }
    }
    num_val     v;
    if (parse_num(rhs, strlen(rhs), &v, 0)) {
        out->kind = CAPRL_MATH_VALUE;
        out->vkind = CAPRL_MATH_NUM;
        out->num = v.v;
        out->is_float = v.is_float;
        out->exact = v.exact;
        out->p = v.p;
        out->q = v.q;
    } else {
        bool  word = false;
        char *sym = canonical_sym(rhs, &word);
        if (sym) {
            out->kind = CAPRL_MATH_VALUE;
            out->vkind = CAPRL_MATH_SYM;
            out->sym = sym;
            out->word = word;
            size_t rs = skip_ws(rhs, strlen(rhs), 0);
            out->ordered = rhs[rs] == '(' || rhs[rs] == '[';
        } else {
            out->kind = CAPRL_MATH_STRING;
        }
    }
    /* An empty normalised string with no value leaves nothing to return (math_parse gives []). */
    if (out->kind == CAPRL_MATH_STRING && norm[0] == '\0') {
        out->kind = CAPRL_MATH_NONE;
        free(norm);
        return;
    }
    out->str = norm;
}

void caprl_math_parsed_free(caprl_math_parsed *p) {
    if (!p) {
        return;
    }
    free(p->str);
    free(p->sym);
    free(p->lhs);
    memset(p, 0, sizeof *p);
}

static bool ascii_ieq(const char *a, const char *b) {
    for (; *a && *b; a++, b++) {
        char x = *a >= 'A' && *a <= 'Z' ? (char)(*a - 'A' + 'a') : *a;
        char y = *b >= 'A' && *b <= 'Z' ? (char)(*b - 'A' + 'a') : *b;
        if (x != y) {
            return false;
        }
    }
    return *a == *b;
}

static int cmp_char(const void *a, const void *b) {
    return *(const char *)a - *(const char *)b;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Splits s[0, n) at the top-level occurrences of any character of seps (outside (), {}, []); with keep_sep the
 * separator stays at the head of the following part (a term's sign), and a sign right after ^ or _ does not cut.
 * Returns the number of parts; *parts and each part are malloc'd. */
static size_t split_top(const char *s, size_t n, const char *seps, bool keep_sep, char ***parts) {
    size_t cap = 4, np = 0, start = 0;
    int    d = 0;
    *parts = caprl_xmalloc(cap * sizeof(char *));
    for (size_t k = 0; k <= n; k++) {
        char c = k < n ? s[k] : '\0';
        d += (c == '(' || c == '{' || c == '[') ? 1 : (c == ')' || c == '}' || c == ']') ? -1 : 0;
        bool sep = k < n && d == 0 && strchr(seps, c) != NULL && !(keep_sep && k > 0 && strchr("^_", s[k - 1]));
        if (k < n && !sep) {
            continue;
        }
        if (k > start) {
            if (np == cap) {
                cap *= 2;
                *parts = caprl_xrealloc(*parts, cap * sizeof(char *));
            }
            (*parts)[np++] = dup_n(s + start, k - start);
        }
        start = keep_sep ? k : k + 1;
    }
    return np;
}

/* One term of a sum in canonical form: an explicit sign, then for a product of letters with an optional integer
 * coefficient before or after it (2ab, ba2) the coefficient and the letters sorted; anything else as written. */
static char *term_canonical(const char *in) {
    caprl_sb b = {0}; /* explicit products (x*2) as implicit ones (x2) */
    for (const char *c = in; *c; c++) {
        if (*c != '*') {
            caprl_sb_addc(&b, *c);
        }
    }
    char  *x = caprl_sb_take(&b);
    x = x ? x : dup_n("", 0);
    char   sign = (x[0] == '+' || x[0] == '-') ? x[0] : '+';
    size_t off = (x[0] == '+' || x[0] == '-') ? 1 : 0, len = strlen(x + off);
    size_t lead = 0, letters = 0, trail = 0;
    while (lead < len && is_digit(x[off + lead])) {
        lead++;
    }
    while (lead + letters < len && is_alpha(x[off + lead + letters])) {
        letters++;
    }
    while (lead + letters + trail < len && is_digit(x[off + lead + letters + trail])) {
        trail++;
    }
    char *out = caprl_xmalloc(len + 2);
    out[0] = sign;
    if (letters > 0 && lead + letters + trail == len && (lead == 0 || trail == 0)) {
        memcpy(out + 1, x + off, lead);                             /* 2ab: the coefficient first */
        memcpy(out + 1 + lead, x + off + lead + letters, trail);    /* ba2: the same */
        memcpy(out + 1 + lead + trail, x + off + lead, letters);
        qsort(out + 1 + lead + trail, letters, 1, cmp_char);
        out[len + 1] = '\0';
    } else {
        memcpy(out + 1, x + off, len + 1);
    }
    free(x);
    return out;
}

/* SymPy's canonical order for what math_verify compares as expressions: symbols lowercased (its default
 * lowercase_symbols), the factors of a letter product in any order (ab = BA, 2a = a2), the terms of a sum in any
 * order (a - b = -b + a) and, unbracketed, the entries of a list as a set (A, C = C, A; 1, 2 = 2, 1). */
static char *sym_canonical(const char *sym, bool ordered) {
    char *low = dup_n(sym, strlen(sym));
    for (char *c = low; *c; c++) {
        *c = *c >= 'A' && *c <= 'Z' ? (char)(*c - 'A' + 'a') : *c;
    }
    char **items = NULL;
    size_t n_items = split_top(low, strlen(low), ",", false, &items);
    for (size_t i = 0; i < n_items; i++) {
        char **terms = NULL;
        size_t n_terms = split_top(items[i], strlen(items[i]), "+-", true, &terms);
        for (size_t t = 0; t < n_terms; t++) {
            char *c = term_canonical(terms[t]);
            free(terms[t]);
            terms[t] = c;
        }
        qsort(terms, n_terms, sizeof(char *), cmp_str);
        caprl_sb item = {0};
        for (size_t t = 0; t < n_terms; t++) {
            caprl_sb_adds(&item, terms[t]);
            free(terms[t]);
        }
        free(terms);
        free(items[i]);
        items[i] = caprl_sb_take(&item);
    }
    if (!ordered) {
        qsort(items, n_items, sizeof(char *), cmp_str);
    }
    caprl_sb out = {0};
    for (size_t i = 0; i < n_items; i++) {
        if (i) {
            caprl_sb_addc(&out, ',');
        }
        caprl_sb_adds(&out, items[i]);
        free(items[i]);
    }
    free(items);
    free(low);
    return caprl_sb_take(&out);
}

bool caprl_math_values_equal(const caprl_math_parsed *gold, const caprl_math_parsed *pred) {
    if (gold->kind != CAPRL_MATH_VALUE || pred->kind != CAPRL_MATH_VALUE || gold->vkind != pred->vkind) {
        return false;
    }
    if (gold->lhs && pred->lhs && !ascii_ieq(gold->lhs, pred->lhs)) {
        return false; /* two equations: y = 2 is not x = 2 (one equation against a value compares right sides) */
    }
    if (gold->vkind == CAPRL_MATH_NUM) {
        if (gold->is_float || pred->is_float) {
            /* sympy_numeric_eq: a Float on either side compares both rounded to 6 decimals. */
            if (!isfinite(gold->num) || !isfinite(pred->num)) {
                return gold->num == pred->num;
            }
            char a[400], c[400];
            snprintf(a, sizeof a, "%.6f", gold->num);
            snprintf(c, sizeof c, "%.6f", pred->num);
            const char *x = strcmp(a, "-0.000000") == 0 ? "0.000000" : a;
            const char *y = strcmp(c, "-0.000000") == 0 ? "0.000000" : c;
            return strcmp(x, y) == 0;
        }
        if (gold->exact && pred->exact) {
            return gold->p == pred->p && gold->q == pred->q;
        }
        return gold->num == pred->num;
    }
    if (gold->word || pred->word) {
        /* a Symbol name (\text{...}) matches a name, or the same letters written out (nothing but letters),
         * case-insensitively and in order */
        const char *other = gold->word ? pred->sym : gold->sym;
        bool        letters = (gold->word && pred->word) || other[0] != '\0';
        for (const char *c = other; letters && !(gold->word && pred->word) && *c; c++) {
            letters = is_alpha(*c);
        }
        return letters && ascii_ieq(gold->sym, pred->sym);
    }
    if (strcmp(gold->sym, "I") == 0 || strcmp(pred->sym, "I") == 0) { /* SymPy's imaginary unit is no symbol */
        return strcmp(gold->sym, pred->sym) == 0;
    }
    char *a = sym_canonical(gold->sym, gold->ordered), *b = sym_canonical(pred->sym, pred->ordered);
    bool  same = strcmp(a, b) == 0;
    free(a);
    free(b);
    return same;
}
