/* The restricted Python-literal reader (data_impl.h): released CapRL training records store their QA list as
 * str(list_of_tuples), which the released trainer reads with eval(). caprl reads the same text as data only.
 * Recursive descent with a depth bound, so a hostile "[[[[..." cannot exhaust the stack. */
#include <stdlib.h>
#include <string.h>

#include "core/error_impl.h"
#include "data/data_impl.h"
#include "fmt/json_impl.h"

typedef struct lit_reader {
    const char  *s;
    size_t       n, pos;
    caprl_error *err;
} lit_reader;

static caprl_status lit_fail(lit_reader *r, const char *what) {
    return caprl_err_set(r->err, CAPRL_ERR_FORMAT, "offset %zu: %s", r->pos, what);
}

/* Whitespace between tokens: inside brackets Python also allows newlines and backslash continuations. */
static void lit_skip_ws(lit_reader *r) {
    while (r->pos < r->n) {
        char c = r->s[r->pos];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f') {
            r->pos++;
        } else if (c == '\\' && r->pos + 1 < r->n && r->s[r->pos + 1] == '\n') {
            r->pos += 2;
        } else {
            break;
        }
    }
}

static void put_utf8(caprl_sb *b, uint32_t cp) {
    char   u[4];
    size_t k;
    if (cp < 0x80) {
        u[0] = (char)cp;
        k = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3F));
        k = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        k = 3;
    } else {
        u[0] = (char)(0xF0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        k = 4;
    }
    caprl_sb_add(b, u, k);
}

static int hex_val(char c) {
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

/* One escape after a backslash at r->pos - 1 (non-raw string). */
static caprl_status lit_escape(lit_reader *r, caprl_sb *b) {
    if (r->pos >= r->n) {
        return lit_fail(r, "unterminated string");
    }
    char c = r->s[r->pos++];
    switch (c) {
    case '\n': return CAPRL_OK; /* line continuation inside the string */
    case '\\': caprl_sb_addc(b, '\\'); return CAPRL_OK;
    case '\'': caprl_sb_addc(b, '\''); return CAPRL_OK;
    case '"': caprl_sb_addc(b, '"'); return CAPRL_OK;
    case 'a': caprl_sb_addc(b, '\a'); return CAPRL_OK;
    case 'b': caprl_sb_addc(b, '\b'); return CAPRL_OK;
    case 'f': caprl_sb_addc(b, '\f'); return CAPRL_OK;
    case 'n': caprl_sb_addc(b, '\n'); return CAPRL_OK;
    case 'r': caprl_sb_addc(b, '\r'); return CAPRL_OK;
    case 't': caprl_sb_addc(b, '\t'); return CAPRL_OK;
    case 'v': caprl_sb_addc(b, '\v'); return CAPRL_OK;
    case 'x':
    case 'u':
    case 'U': {
        int      digits = c == 'x' ? 2 : c == 'u' ? 4 : 8;
        uint32_t cp = 0;
        for (int i = 0; i < digits; i++) {
            int h = r->pos < r->n ? hex_val(r->s[r->pos]) : -1;
            if (h < 0) {
                return lit_fail(r, "truncated \\x, \\u or \\U escape");
            }
            cp = cp * 16 + (uint32_t)h;
            r->pos++;
        }
        if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
            return lit_fail(r, "escape gives a surrogate or a code point above U+10FFFF");
        }
        put_utf8(b, cp);
        return CAPRL_OK;
    }
    case 'N': return lit_fail(r, "\\N{...} escapes are not supported");
    default:
        if (c >= '0' && c <= '7') {
            uint32_t cp = (uint32_t)(c - '0');
            for (int i = 0; i < 2 && r->pos < r->n && r->s[r->pos] >= '0' && r->s[r->pos] <= '7'; i++) {
                cp = cp * 8 + (uint32_t)(r->s[r->pos++] - '0');
            }
            put_utf8(b, cp);
            return CAPRL_OK;
        }
        /* Python keeps unknown escapes such as "\d" as written (with a warning). */
        caprl_sb_addc(b, '\\');
        r->pos--;
        return CAPRL_OK;
    }
}

/* One string literal starting at r->pos (prefix included); appends its value to b. */
static caprl_status lit_one_string(lit_reader *r, caprl_sb *b) {
    bool raw = false;
    while (r->pos < r->n && strchr("rRuU", r->s[r->pos]) != NULL && r->s[r->pos] != '\0') {
        if (r->s[r->pos] == 'r' || r->s[r->pos] == 'R') {
            raw = true;
        }
        r->pos++;
    }
    if (r->pos >= r->n || (r->s[r->pos] != '\'' && r->s[r->pos] != '"')) {
        return lit_fail(r, "expected a string literal");
    }
    char q = r->s[r->pos];
    bool triple = r->pos + 2 < r->n && r->s[r->pos + 1] == q && r->s[r->pos + 2] == q;
    r->pos += triple ? 3 : 1;
    for (;;) {
        if (r->pos >= r->n) {
            return lit_fail(r, "unterminated string");
        }
        char c = r->s[r->pos];
        if (c == q && (!triple || (r->pos + 2 < r->n && r->s[r->pos + 1] == q && r->s[r->pos + 2] == q))) {
            r->pos += triple ? 3 : 1;
            return CAPRL_OK;
        }
        if (c == '\n' && !triple) {
            return lit_fail(r, "newline inside a single-quoted string");
        }
        if (c == '\0') {
            return lit_fail(r, "NUL byte inside a string");
        }
        r->pos++;
        if (c != '\\') {
            caprl_sb_addc(b, c);
        } else if (raw) {
            /* In raw strings a backslash still protects the next character from ending the string. */
            caprl_sb_addc(b, '\\');
            if (r->pos < r->n) {
                caprl_sb_addc(b, r->s[r->pos++]);
            }
        } else {
            CAPRL_TRY(lit_escape(r, b));
        }
    }
}

static bool is_string_start(const lit_reader *r) {
    size_t p = r->pos;
    for (int k = 0; k < 2 && p < r->n && strchr("rRuU", r->s[p]) != NULL && r->s[p] != '\0'; k++) {
        p++;
    }
    return p < r->n && (r->s[p] == '\'' || r->s[p] == '"');
}

static caprl_status lit_value(lit_reader *r, caprl_pylit *out, int depth);

static caprl_status lit_sequence(lit_reader *r, caprl_pylit *out, int depth) {
    char close = r->s[r->pos] == '[' ? ']' : ')';
    out->kind = close == ']' ? CAPRL_PYLIT_LIST : CAPRL_PYLIT_TUPLE;
    r->pos++;
    int32_t cap = 0;
    bool    saw_comma = false;
    for (;;) {
        lit_skip_ws(r);
        if (r->pos < r->n && r->s[r->pos] == close) {
            r->pos++;
            /* "(x)" is x itself, not a tuple: only "(x,)" makes a one-element tuple. */
            if (out->kind == CAPRL_PYLIT_TUPLE && out->n_items == 1 && !saw_comma) {
                caprl_pylit inner = out->items[0];
                free(out->items);
                *out = inner;
            }
            return CAPRL_OK;
        }
        if (out->n_items > 0 && !saw_comma) {
            return lit_fail(r, close == ']' ? "expected ',' or ']'" : "expected ',' or ')'");
        }
        if (out->n_items == cap) {
            cap = cap ? cap * 2 : 4;
            out->items = caprl_xrealloc(out->items, (size_t)cap * sizeof *out->items);
        }
        memset(&out->items[out->n_items], 0, sizeof out->items[0]);
        out->n_items++;
        CAPRL_TRY(lit_value(r, &out->items[out->n_items - 1], depth + 1));
        lit_skip_ws(r);
        saw_comma = r->pos < r->n && r->s[r->pos] == ',';
        if (saw_comma) {
            r->pos++;
        }
    }
}

static caprl_status lit_number(lit_reader *r, caprl_pylit *out) {
    size_t start = r->pos;
    if (r->s[r->pos] == '-' || r->s[r->pos] == '+') {
        r->pos++;
    }
    size_t digits = 0;
    while (r->pos < r->n && ((r->s[r->pos] >= '0' && r->s[r->pos] <= '9') || r->s[r->pos] == '.' ||
                             r->s[r->pos] == '_' || r->s[r->pos] == 'e' || r->s[r->pos] == 'E' ||
                             ((r->s[r->pos] == '-' || r->s[r->pos] == '+') &&
                              (r->s[r->pos - 1] == 'e' || r->s[r->pos - 1] == 'E')))) {
        digits += r->s[r->pos] >= '0' && r->s[r->pos] <= '9';
        r->pos++;
    }
    if (digits == 0) {
        r->pos = start;
        return lit_fail(r, "expected a string, number, list or tuple");
    }
    out->kind = CAPRL_PYLIT_NUM;
    out->str = caprl_xstrndup(r->s + start, r->pos - start);
    out->len = r->pos - start;
    return CAPRL_OK;
}

static caprl_status lit_value(lit_reader *r, caprl_pylit *out, int depth) {
    if (depth > CAPRL_PYLIT_MAX_DEPTH) {
        return lit_fail(r, "literal nested too deeply");
    }
    lit_skip_ws(r);
    if (r->pos >= r->n) {
        return lit_fail(r, "unexpected end of text");
    }
    char c = r->s[r->pos];
    if (c == '[' || c == '(') {
        return lit_sequence(r, out, depth);
    }
    if (is_string_start(r)) {
        caprl_sb b = {0};
        caprl_status st;
        /* Adjacent literals concatenate: 'a' "b" is 'ab'. */
        do {
            st = lit_one_string(r, &b);
            if (st != CAPRL_OK) {
                caprl_sb_free(&b);
                return st;
            }
            lit_skip_ws(r);
        } while (is_string_start(r));
        out->kind = CAPRL_PYLIT_STR;
        out->len = b.len;
        out->str = caprl_sb_take(&b);
        if (!caprl_utf8_valid(out->str, out->len)) {
            return lit_fail(r, "string is not valid UTF-8");
        }
        return CAPRL_OK;
    }
    if (c == '-' || c == '+' || c == '.' || (c >= '0' && c <= '9')) {
        return lit_number(r, out);
    }
    return lit_fail(r, "expected a string, number, list or tuple (names and expressions are not read)");
}

caprl_status caprl_pylit_parse(const char *text, size_t n, caprl_pylit *out, caprl_error *err) {
    memset(out, 0, sizeof *out);
    lit_reader   r = {text, n, 0, err};
    caprl_status st = lit_value(&r, out, 0);
    if (st == CAPRL_OK) {
        lit_skip_ws(&r);
        if (r.pos != r.n) {
            st = lit_fail(&r, "unexpected text after the literal");
        }
    }
    if (st != CAPRL_OK) {
        caprl_pylit_free(out);
    }
    return st;
}

void caprl_pylit_free(caprl_pylit *v) {
    if (!v) {
        return;
    }
    for (int32_t i = 0; i < v->n_items; i++) {
        caprl_pylit_free(&v->items[i]);
    }
    free(v->items);
    free(v->str);
    memset(v, 0, sizeof *v);
}
