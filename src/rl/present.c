/* What the reader is shown and how its answer is read (spec/caprl.md §6.2-§6.4): the CapRL reader prompt
 * template, the released shuffle_options with its quirks, the answer-letter parser and the CapRL++ length term.
 * Pure functions: no model, no global state. Python semantics are reproduced where the released code relies on
 * them (str.replace, str.split("\n"), str.strip and the regex \s: Python's Unicode whitespace; re.search). */
#include <stdlib.h>
#include <string.h>

#include "caprl/reward.h"
#include "core/error_impl.h"
#include "core/rng_impl.h"
#include "core/sha256_impl.h"
#include "fmt/json_impl.h"

void caprl_sha256_hex(const void *data, size_t n, char hex[65]) {
    static const char digits[] = "0123456789abcdef";
    caprl_sha256 s;
    uint8_t      d[32];
    caprl_sha256_init(&s);
    caprl_sha256_update(&s, data, n);
    caprl_sha256_final(&s, d);
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[d[i] >> 4];
        hex[2 * i + 1] = digits[d[i] & 15];
    }
    hex[64] = '\0';
}

/* ---- Python whitespace ------------------------------------------------------------------------------------ */

/* Python's str.isspace / re \s for str patterns (Py_UNICODE_ISSPACE): the C0 separators 0x09-0x0D and
 * 0x1C-0x1F, space, U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000. */
static bool py_isspace(uint32_t c) {
    if (c < 0x80) {
        return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20);
    }
    return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

/* Decodes the code point at s[i] (i < n); returns its byte length. Malformed bytes count as one non-space
 * "character" of one byte (the loader has rejected invalid UTF-8 already; this only keeps the scan in bounds). */
static size_t utf8_at(const char *s, size_t n, size_t i, uint32_t *cp) {
    const unsigned char *u = (const unsigned char *)s;
    unsigned char        b = u[i];
    size_t               len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
    if (len == 0 || i + len > n) {
        *cp = 0xFFFFFFFFu;
        return 1;
    }
    uint32_t c = len == 1 ? b : len == 2 ? (b & 0x1Fu) : len == 3 ? (b & 0x0Fu) : (b & 0x07u);
    for (size_t k = 1; k < len; k++) {
        if ((u[i + k] & 0xC0) != 0x80) {
            *cp = 0xFFFFFFFFu;
            return 1;
        }
        c = (c << 6) | (u[i + k] & 0x3Fu);
    }
    *cp = c;
    return len;
}

/* Length of the whitespace run starting at s[i]. */
static size_t space_run(const char *s, size_t n, size_t i) {
    size_t j = i;
    while (j < n) {
        uint32_t c;
        size_t   l = utf8_at(s, n, j, &c);
        if (!py_isspace(c)) {
            break;
        }
        j += l;
    }
    return j - i;
}

/* str.strip(): [*b, *e) without leading and trailing whitespace. */
static void py_strip(const char *s, size_t n, size_t *b, size_t *e) {
    size_t lo = space_run(s, n, 0), hi = lo;
    for (size_t i = lo; i < n;) {
        uint32_t c;
        size_t   l = utf8_at(s, n, i, &c);
        i += l;
        if (!py_isspace(c)) {
            hi = i;
        }
    }
    *b = lo;
    *e = hi;
}

/* re.search(r'-\s*([A-F])\)\s*(.+)', line) on a stripped line (no "\n" inside). Because the line ends in a
 * non-space character, the match at a dash is: spaces, a label, ')', spaces, then at least one character, and
 * (.+) is everything after those spaces. Returns false if no dash starts a match. */
static bool match_option(const char *s, size_t n, char *label, size_t *text_at) {
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '-') {
            continue;
        }
        size_t j = i + 1 + space_run(s, n, i + 1);
        if (j + 1 >= n || s[j] < 'A' || s[j] > 'F' || s[j + 1] != ')') {
            continue;
        }
        size_t k = j + 2 + space_run(s, n, j + 2);
        if (k >= n) { /* (.+) needs a character; trailing spaces cannot occur on a stripped line */
            continue;
        }
        *label = s[j];
        *text_at = k;
        return true;
    }
    return false;
}

/* ---- shuffle_options --------------------------------------------------------------------------------------- */

typedef struct str_buf {
    char  *p;
    size_t n, cap;
} str_buf;

static void sb_add(str_buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1) {
            cap *= 2;
        }
        b->p = caprl_xrealloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_adds(str_buf *b, const char *s) {
    sb_add(b, s, strlen(s));
}

/* str.replace(old, "") on the buffer, in place (non-overlapping, left to right). */
static void remove_all(str_buf *b, const char *old) {
    size_t lo = strlen(old), w = 0;
    for (size_t r = 0; r < b->n;) {
        if (r + lo <= b->n && memcmp(b->p + r, old, lo) == 0) {
            r += lo;
        } else {
            b->p[w++] = b->p[r++];
        }
    }
    b->n = w;
    b->p[w] = '\0';
}

#define CANNOT_E "\n   - E) " CAPRL_CANNOT_ANSWER
#define CANNOT_F "\n   - F) " CAPRL_CANNOT_ANSWER

typedef struct option {
    char        label;
    const char *text; /* into the working copy of the question */
    size_t      len;
} option;

caprl_status caprl_present_question(const char *question, char gold, bool shuffle, uint64_t seed, uint64_t stream_a,
                                    uint64_t stream_b, char **out, char *out_gold, bool *shuffled,
                                    caprl_error *err) {
    if (!shuffle) { /* presented as saved: the released server with --shuffle_qa off */
        *out = caprl_xstrdup(question);
        *out_gold = gold;
        if (shuffled) {
            *shuffled = false;
        }
        return CAPRL_OK;
    }
    str_buf q = {0};
    sb_adds(&q, question);
    remove_all(&q, CANNOT_E);
    remove_all(&q, CANNOT_F);

    /* split on "\n": line 0 is the question text, the others options (empty ones skipped) */
    option  opts[6];
    int32_t n_opts = 0;
    size_t  first_end = 0;
    while (first_end < q.n && q.p[first_end] != '\n') {
        first_end++;
    }
    for (size_t ls = first_end + 1; ls <= q.n && first_end < q.n;) {
        size_t le = ls;
        while (le < q.n && q.p[le] != '\n') {
            le++;
        }
        if (le > ls) {
            size_t b, e, at;
            char   label;
            py_strip(q.p + ls, le - ls, &b, &e);
            if (!match_option(q.p + ls + b, e - b, &label, &at)) {
                caprl_status st = caprl_err_set(err, CAPRL_ERR_FORMAT,
                                                "question option line '%.*s' does not match -\\s*([A-F])\\)\\s*(.+)",
                                                (int)(le - ls > 120 ? 120 : le - ls), q.p + ls);
                free(q.p);
                return st;
            }
            int32_t k = 0;
            while (k < n_opts && opts[k].label != label) {
                k++;
            }
            if (k == n_opts) { /* a dict keeps a label's first position and its last text */
                n_opts++;
            }
            opts[k].label = label;
            opts[k].text = q.p + ls + b + at;
            opts[k].len = e - b - at;
        }
        ls = le + 1;
    }
    int32_t g = -1;
    for (int32_t k = 0; k < n_opts; k++) {
        if (opts[k].label == gold) {
            g = k;
        }
    }
    str_buf r = {0};
    if (g < 0) { /* fallback: gold not among the labels -> no shuffle, F appended, gold kept */
        sb_add(&r, q.p, q.n);
        sb_adds(&r, CANNOT_F);
        *out_gold = gold;
    } else {
        option  gold_opt = opts[g];
        caprl_rng rng;
        caprl_rng_init(&rng, seed, stream_a, stream_b);
        for (int32_t i = n_opts - 1; i > 0; i--) { /* Fisher-Yates, as random.shuffle */
            int32_t j = (int32_t)caprl_rng_below(&rng, (uint64_t)i + 1);
            option  t = opts[i];
            opts[i] = opts[j];
            opts[j] = t;
        }
        char new_gold = 0;
        sb_add(&r, q.p, first_end);
        for (int32_t k = 0; k < n_opts; k++) {
            char line[10] = "\n   - A) ";
            line[6] = (char)('A' + k);
            sb_add(&r, line, 9);
            sb_add(&r, opts[k].text, opts[k].len);
            if (opts[k].len == gold_opt.len && memcmp(opts[k].text, gold_opt.text, gold_opt.len) == 0) {
                new_gold = (char)('A' + k); /* the last label with the gold text wins */
            }
        }
        sb_adds(&r, CANNOT_F);
        *out_gold = new_gold;
    }
    if (shuffled) {
        *shuffled = g >= 0;
    }
    free(q.p);
    *out = r.p;
    return CAPRL_OK;
}

/* ---- answers and the length term -------------------------------------------------------------------------- */

char caprl_reward_parse_letter(const char *text, size_t len) {
    for (size_t i = 0; text && i < len; i++) {
        if (text[i] >= 'A' && text[i] <= 'I') {
            return text[i];
        }
    }
    return 0;
}

float caprl_reward_length_term(int64_t tokens, int32_t l1, int32_t l2) {
    if (tokens <= l1) {
        return 1.0f;
    }
    if (tokens > l2 || l2 <= l1) {
        return 0.0f;
    }
    return (float)(1.0 - (double)(tokens - l1) / (double)(l2 - l1));
}
