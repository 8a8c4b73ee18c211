/* Python-compatible JSON output (pyjson_impl.h). Python's json encoder: ensure_ascii escapes every character
 * outside ' '..'~' (so DEL and all non-ASCII become \uXXXX), floats use float.__repr__, NaN / Infinity are
 * written bare, and indent=N puts each element on its own line with ", " item separators reduced to ",". */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error_impl.h"
#include "fmt/json_impl.h"
#include "fmt/pyjson_impl.h"

/* ---- a growable buffer (fmt sits below the data module, so it keeps its own) ------------------------------ */

typedef struct pj_buf {
    char  *s;
    size_t len, cap;
} pj_buf;

static void pj_add(pj_buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) {
            CAPRL_ASSERT(cap <= SIZE_MAX / 2);
            cap *= 2;
        }
        b->s = caprl_xrealloc(b->s, cap);
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void pj_adds(pj_buf *b, const char *s) {
    pj_add(b, s, strlen(s));
}

/* ---- float repr ------------------------------------------------------------------------------------------- */

size_t caprl_py_float_repr(double x, char *buf, size_t cap) {
    char out[64];
    if (isnan(x)) {
        snprintf(out, sizeof out, "nan");
    } else if (isinf(x)) {
        snprintf(out, sizeof out, "%s", x < 0 ? "-inf" : "inf");
    } else if (x == 0) {
        snprintf(out, sizeof out, "%s", signbit(x) ? "-0.0" : "0.0");
    } else {
        /* Shortest round trip: the first precision whose %e form reads back exactly. */
        char e[40];
        for (int p = 1; p <= 17; p++) {
            snprintf(e, sizeof e, "%.*e", p - 1, x);
            if (strtod(e, NULL) == x) {
                break;
            }
        }
        /* e = [-]d[.ddd]e[+-]XX: split into sign, digits and decimal exponent. */
        const char *s = e;
        bool        neg = *s == '-';
        s += neg;
        char digits[24];
        int  nd = 0;
        for (; *s && *s != 'e'; s++) {
            if (*s >= '0' && *s <= '9') {
                digits[nd++] = *s;
            }
        }
        while (nd > 1 && digits[nd - 1] == '0') {
            nd--;
        }
        digits[nd] = '\0';
        int exp10 = atoi(s + 1); /* value = 0.d1d2... * 10^(exp10 + 1) */
        char *o = out;
        if (neg) {
            *o++ = '-';
        }
        if (exp10 >= -4 && exp10 < 16) {
            if (exp10 < 0) {
                o += sprintf(o, "0.");
                for (int i = 0; i < -exp10 - 1; i++) {
                    *o++ = '0';
                }
                o += sprintf(o, "%s", digits);
            } else {
                for (int i = 0; i <= exp10; i++) {
                    *o++ = i < nd ? digits[i] : '0';
                }
                *o++ = '.';
                if (nd > exp10 + 1) {
                    o += sprintf(o, "%s", digits + exp10 + 1);
                } else {
                    *o++ = '0';
                }
            }
            *o = '\0';
        } else {
            *o++ = digits[0];
            if (nd > 1) {
                o += sprintf(o, ".%s", digits + 1);
            }
            sprintf(o, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
        }
    }
    size_t len = strlen(out);
    if (cap > 0) {
        size_t k = len < cap - 1 ? len : cap - 1;
        memcpy(buf, out, k);
        buf[k] = '\0';
    }
    return len;
}

/* ---- strings ---------------------------------------------------------------------------------------------- */

/* Decodes one UTF-8 sequence at s[0..n); returns its length, or 0 if it is not well-formed. */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    size_t   len;
    uint32_t v, min;
    if ((s[0] & 0xE0) == 0xC0) {
        len = 2, v = s[0] & 0x1Fu, min = 0x80;
    } else if ((s[0] & 0xF0) == 0xE0) {
        len = 3, v = s[0] & 0x0Fu, min = 0x800;
    } else if ((s[0] & 0xF8) == 0xF0) {
        len = 4, v = s[0] & 0x07u, min = 0x10000;
    } else {
        return 0;
    }
    if (n < len) {
        return 0;
    }
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) {
            return 0;
        }
        v = (v << 6) | (s[i] & 0x3Fu);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) {
        return 0;
    }
    *cp = v;
    return len;
}

static void pj_string(pj_buf *b, const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    pj_add(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t   k = utf8_decode(s + i, n - i, &cp);
        if (k == 0) {
            cp = 0xFFFD;
            k = 1;
        }
        i += k;
        char esc[16];
        switch (cp) {
        case '"': pj_add(b, "\\\"", 2); continue;
        case '\\': pj_add(b, "\\\\", 2); continue;
        case '\n': pj_add(b, "\\n", 2); continue;
        case '\r': pj_add(b, "\\r", 2); continue;
        case '\t': pj_add(b, "\\t", 2); continue;
        case '\b': pj_add(b, "\\b", 2); continue;
        case '\f': pj_add(b, "\\f", 2); continue;
        default: break;
        }
        if (cp >= 0x20 && cp <= 0x7E) {
            char c = (char)cp;
            pj_add(b, &c, 1);
        } else if (cp < 0x10000) {
            snprintf(esc, sizeof esc, "\\u%04x", (unsigned)cp);
            pj_adds(b, esc);
        } else {
            uint32_t v = cp - 0x10000;
            snprintf(esc, sizeof esc, "\\u%04x\\u%04x", (unsigned)(0xD800 + (v >> 10)), (unsigned)(0xDC00 + (v & 0x3FF)));
            pj_adds(b, esc);
        }
    }
    pj_add(b, "\"", 1);
}

char *caprl_pyjson_string(const char *s, size_t n, size_t *out_len) {
    pj_buf b = {0};
    pj_string(&b, s, n);
    if (out_len) {
        *out_len = b.len;
    }
    return b.s;
}

/* ---- values ----------------------------------------------------------------------------------------------- */

static void pj_newline(pj_buf *b, int32_t indent, int32_t level) {
    pj_add(b, "\n", 1);
    for (int32_t i = 0; i < indent * level; i++) {
        pj_add(b, " ", 1);
    }
}

static void pj_value(pj_buf *b, const json_t *v, int32_t indent, int32_t level) {
    char num[64];
    switch (json_typeof(v)) {
    case JSON_NULL: pj_adds(b, "null"); return;
    case JSON_TRUE: pj_adds(b, "true"); return;
    case JSON_FALSE: pj_adds(b, "false"); return;
    case JSON_INTEGER:
        snprintf(num, sizeof num, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        pj_adds(b, num);
        return;
    case JSON_REAL: {
        double x = json_real_value(v);
        if (isnan(x)) {
            pj_adds(b, "NaN");
        } else if (isinf(x)) {
            pj_adds(b, x < 0 ? "-Infinity" : "Infinity");
        } else {
            caprl_py_float_repr(x, num, sizeof num);
            pj_adds(b, num);
        }
        return;
    }
    case JSON_STRING: pj_string(b, json_string_value(v), json_string_length(v)); return;
    case JSON_ARRAY: {
        size_t n = json_array_size(v);
        if (n == 0) {
            pj_adds(b, "[]");
            return;
        }
        pj_adds(b, "[");
        for (size_t i = 0; i < n; i++) {
            if (i) {
                pj_adds(b, indent >= 0 ? "," : ", ");
            }
            if (indent >= 0) {
                pj_newline(b, indent, level + 1);
            }
            pj_value(b, json_array_get(v, i), indent, level + 1);
        }
        if (indent >= 0) {
            pj_newline(b, indent, level);
        }
        pj_adds(b, "]");
        return;
    }
    case JSON_OBJECT: {
        if (json_object_size(v) == 0) {
            pj_adds(b, "{}");
            return;
        }
        pj_adds(b, "{");
        const char *key;
        json_t     *val;
        bool        first = true;
        /* jansson iterates objects in insertion order, which is the order Python's dict keeps after json.loads. */
        json_object_foreach((json_t *)(uintptr_t)v, key, val) {
            if (!first) {
                pj_adds(b, indent >= 0 ? "," : ", ");
            }
            first = false;
            if (indent >= 0) {
                pj_newline(b, indent, level + 1);
            }
            pj_string(b, key, strlen(key));
            pj_adds(b, ": ");
            pj_value(b, val, indent, level + 1);
        }
        if (indent >= 0) {
            pj_newline(b, indent, level);
        }
        pj_adds(b, "}");
        return;
    }
    }
}

char *caprl_pyjson_dumps(const struct json_t *v, int32_t indent, int32_t level) {
    pj_buf b = {0};
    pj_value(&b, v, indent, level);
    if (!b.s) {
        pj_add(&b, "", 0);
    }
    return b.s;
}

/* ---- Python repr / str ------------------------------------------------------------------------------------ */

/* repr(str): single quotes unless the text has a ' and no "; \\, the quote, \n \r \t escaped, other
 * non-printable ASCII as \xNN; other characters kept (Python keeps printable non-ASCII). */
static void py_repr_string(pj_buf *b, const char *s, size_t n) {
    bool has_single = memchr(s, '\'', n) != NULL, has_double = memchr(s, '"', n) != NULL;
    char q = has_single && !has_double ? '"' : '\'';
    pj_add(b, &q, 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char          esc[8];
        if (c == '\\' || c == (unsigned char)q) {
            esc[0] = '\\', esc[1] = (char)c;
            pj_add(b, esc, 2);
        } else if (c == '\n') {
            pj_adds(b, "\\n");
        } else if (c == '\r') {
            pj_adds(b, "\\r");
        } else if (c == '\t') {
            pj_adds(b, "\\t");
        } else if (c < 0x20 || c == 0x7F) {
            snprintf(esc, sizeof esc, "\\x%02x", c);
            pj_adds(b, esc);
        } else {
            pj_add(b, (const char *)&c, 1);
        }
    }
    pj_add(b, &q, 1);
}

static void py_repr(pj_buf *b, const json_t *v, bool top) {
    char num[64];
    switch (json_typeof(v)) {
    case JSON_NULL: pj_adds(b, "None"); return;
    case JSON_TRUE: pj_adds(b, "True"); return;
    case JSON_FALSE: pj_adds(b, "False"); return;
    case JSON_INTEGER:
        snprintf(num, sizeof num, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        pj_adds(b, num);
        return;
    case JSON_REAL:
        caprl_py_float_repr(json_real_value(v), num, sizeof num);
        pj_adds(b, num);
        return;
    case JSON_STRING:
        if (top) {
            pj_add(b, json_string_value(v), json_string_length(v));
        } else {
            py_repr_string(b, json_string_value(v), json_string_length(v));
        }
        return;
    case JSON_ARRAY:
        pj_adds(b, "[");
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i) {
                pj_adds(b, ", ");
            }
            py_repr(b, json_array_get(v, i), false);
        }
        pj_adds(b, "]");
        return;
    case JSON_OBJECT: {
        pj_adds(b, "{");
        const char *key;
        json_t     *val;
        bool        first = true;
        json_object_foreach((json_t *)(uintptr_t)v, key, val) {
            if (!first) {
                pj_adds(b, ", ");
            }
            first = false;
            py_repr_string(b, key, strlen(key));
            pj_adds(b, ": ");
            py_repr(b, val, false);
        }
        pj_adds(b, "}");
        return;
    }
    }
}

char *caprl_py_str_of_json(const struct json_t *v) {
    pj_buf b = {0};
    py_repr(&b, v, true);
    if (!b.s) {
        pj_add(&b, "", 0);
    }
    return b.s;
}

caprl_status caprl_pyjson_reformat(const char *text, size_t n, int32_t indent, int32_t level, char **out,
                                   size_t *out_len, caprl_error *err) {
    json_t *j = NULL;
    CAPRL_TRY(caprl_json_parse(&j, text, n, "JSON value", err));
    pj_buf b = {0};
    pj_value(&b, j, indent, level);
    json_decref(j);
    if (!b.s) {
        pj_add(&b, "", 0);
    }
    *out = b.s;
    if (out_len) {
        *out_len = b.len;
    }
    return CAPRL_OK;
}
