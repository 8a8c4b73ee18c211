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
#include "data/data_impl.h"
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
            const char *text;
            size_t      text_len;
            char        label = caprl_qa_option_line(q.p + ls, le - ls, &text, &text_len);
            if (!label) {
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
            opts[k].text = text;
            opts[k].len = text_len;
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
