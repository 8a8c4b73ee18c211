/* Small text helpers of the data module: a growable string, Python's notion of whitespace, and the option-line
 * reader that the released QA scripts imply (data_impl.h). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error_impl.h"
#include "data/data_impl.h"

/* ---- growable string ------------------------------------------------------------------------------------ */

static void sb_reserve(caprl_sb *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) {
        return;
    }
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra + 1) {
        CAPRL_ASSERT(cap <= SIZE_MAX / 2);
        cap *= 2;
    }
    b->s = caprl_xrealloc(b->s, cap);
    b->cap = cap;
}

void caprl_sb_add(caprl_sb *b, const char *s, size_t n) {
    sb_reserve(b, n);
    if (n) {
        memcpy(b->s + b->len, s, n);
    }
    b->len += n;
    b->s[b->len] = '\0';
}

void caprl_sb_addc(caprl_sb *b, char c) {
    if (b->len + 2 <= b->cap) { /* the byte-at-a-time builders call this for every character */
        b->s[b->len++] = c;
        b->s[b->len] = '\0';
        return;
    }
    caprl_sb_add(b, &c, 1);
}

void caprl_sb_adds(caprl_sb *b, const char *s) {
    caprl_sb_add(b, s, strlen(s));
}

void caprl_sb_addf(caprl_sb *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int need = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    CAPRL_ASSERT(need >= 0);
    sb_reserve(b, (size_t)need);
    va_start(ap, fmt);
    vsnprintf(b->s + b->len, (size_t)need + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)need;
}

char *caprl_sb_str(caprl_sb *b) {
    sb_reserve(b, 0);
    b->s[b->len] = '\0';
    return b->s;
}

char *caprl_sb_take(caprl_sb *b) {
    char *s = caprl_sb_str(b);
    memset(b, 0, sizeof *b);
    return s;
}

void caprl_sb_free(caprl_sb *b) {
    free(b->s);
    memset(b, 0, sizeof *b);
}

/* ---- Python whitespace ---------------------------------------------------------------------------------- */

size_t caprl_py_space_len(const char *s, size_t n) {
    if (n == 0) {
        return 0;
    }
    unsigned char c = (unsigned char)s[0];
    if (c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F)) {
        return 1;
    }
    if (c == 0xC2 && n >= 2) {
        unsigned char d = (unsigned char)s[1];
        return d == 0x85 || d == 0xA0 ? 2 : 0;
    }
    if (c == 0xE1 && n >= 3) {
        return (unsigned char)s[1] == 0x9A && (unsigned char)s[2] == 0x80 ? 3 : 0; /* U+1680 */
    }
    if (c == 0xE2 && n >= 3) {
        unsigned char d = (unsigned char)s[1], e = (unsigned char)s[2];
        if (d == 0x80 && ((e >= 0x80 && e <= 0x8A) || e == 0xA8 || e == 0xA9 || e == 0xAF)) {
            return 3; /* U+2000-U+200A, U+2028, U+2029, U+202F */
        }
        return d == 0x81 && e == 0x9F ? 3 : 0; /* U+205F */
    }
    if (c == 0xE3 && n >= 3) {
        return (unsigned char)s[1] == 0x80 && (unsigned char)s[2] == 0x80 ? 3 : 0; /* U+3000 */
    }
    return 0;
}

/* ---- option lines --------------------------------------------------------------------------------------- */

/* Length of the run of Python whitespace starting at s[i]. */
static size_t py_space_run(const char *s, size_t n, size_t i) {
    size_t j = i, l;
    while (j < n && (l = caprl_py_space_len(s + j, n - j)) > 0) {
        j += l;
    }
    return j - i;
}

char caprl_qa_option_line(const char *line, size_t n, const char **text, size_t *text_len) {
    /* line.strip(), then re.search(r'-\s*([A-F])\)\s*(.+)'): the first dash that starts a match; (.+) is the
     * rest of the stripped line, which ends in a non-space character */
    size_t b = py_space_run(line, n, 0), e = n;
    for (size_t k = b; k < n;) {
        size_t l = caprl_py_space_len(line + k, n - k);
        if (l == 0) {
            l = 1;
            while (k + l < n && ((unsigned char)line[k + l] & 0xC0) == 0x80) {
                l++;
            }
            e = k + l;
        }
        k += l;
    }
    for (size_t i = b; i < e; i++) {
        if (line[i] != '-') {
            continue;
        }
        size_t j = i + 1 + py_space_run(line, e, i + 1);
        if (j + 1 >= e || line[j] < 'A' || line[j] > 'F' || line[j + 1] != ')') {
            continue;
        }
        size_t k = j + 2 + py_space_run(line, e, j + 2);
        if (k >= e) {
            continue;
        }
        *text = line + k;
        *text_len = e - k;
        return line[j];
    }
    return 0;
}
