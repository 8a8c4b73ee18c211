/* jansson wrapper: strict loading, typed getters with messages naming file and key path (see json_impl.h).
 * Depends on core only; holds no global state. */
#include <jansson.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error_impl.h"
#include "core/file_impl.h"
#include "core/log_impl.h"
#include "fmt/json_impl.h"

/* ---- loading --------------------------------------------------------------------------------------------- */

caprl_status caprl_json_parse(struct json_t **out, const void *buf, size_t n, const char *name, caprl_error *err) {
    json_error_t je;
    memset(&je, 0, sizeof je);
    /* No JSON_ALLOW_NUL: strings (keys included) never contain NUL, so C string functions see all of them. */
    json_t *j = json_loadb(buf, n, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &je);
    if (!j) {
        caprl_status code = json_error_code(&je) == json_error_out_of_memory ? CAPRL_ERR_OOM : CAPRL_ERR_FORMAT;
        return caprl_err_set(err, code, "%s:%d:%d: %s", name, je.line, je.column, je.text);
    }
    *out = j;
    return CAPRL_OK;
}

caprl_status caprl_json_load_file(struct json_t **out, const char *path, size_t max_size, caprl_error *err) {
    uint8_t *data = NULL;
    size_t   size = 0;
    CAPRL_TRY(caprl_file_read_all(path, max_size, &data, &size, err));
    caprl_status st = caprl_json_parse(out, data, size, path, err);
    free(data);
    return st;
}

void caprl_json_free(struct json_t *j) {
    if (j) {
        json_decref(j);
    }
}

static bool blank_byte(char c) {
    return c == ' ' || c == '\t' || c == '\r';
}

bool caprl_json_starts_array(const char *data, size_t size) {
    size_t i = 0;
    while (i < size && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r')) {
        i++;
    }
    return i < size && data[i] == '[';
}

bool caprl_jsonl_next(const char *data, size_t size, size_t *pos, int64_t *line_no, const char **line, size_t *len) {
    while (*pos < size) {
        const char *start = data + *pos;
        const char *nl = memchr(start, '\n', size - *pos);
        size_t      n = nl ? (size_t)(nl - start) : size - *pos;
        *pos += n + 1;
        ++*line_no;
        size_t s = 0, e = n;
        while (s < e && blank_byte(start[s])) {
            s++;
        }
        while (e > s && blank_byte(start[e - 1])) {
            e--;
        }
        if (s < e) {
            *line = start + s;
            *len = e - s;
            return true;
        }
    }
    return false;
}

caprl_status caprl_json_root(caprl_json_obj *o, const struct json_t *j, const char *file, caprl_error *err) {
    if (!json_is_object(j)) {
        char buf[64];
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: expected a JSON object at the top level, got %s", file,
                             caprl_json_describe(j, buf, sizeof buf));
    }
    o->obj = j;
    o->file = file;
    o->path[0] = '\0';
    return CAPRL_OK;
}

/* ---- values ---------------------------------------------------------------------------------------------- */

bool caprl_json_is_null(const struct json_t *v) {
    return v == NULL || json_is_null(v);
}

bool caprl_json_is_array(const struct json_t *v) {
    return v != NULL && json_is_array(v);
}

bool caprl_json_is_object(const struct json_t *v) {
    return v != NULL && json_is_object(v);
}

size_t caprl_json_array_size(const struct json_t *v) {
    return caprl_json_is_array(v) ? json_array_size(v) : 0;
}

const struct json_t *caprl_json_array_get(const struct json_t *v, size_t i) {
    return caprl_json_is_array(v) ? json_array_get(v, i) : NULL;
}

bool caprl_json_int_value(const struct json_t *v, int64_t *out) {
    if (v == NULL || !json_is_integer(v)) {
        return false;
    }
    *out = (int64_t)json_integer_value(v);
    return true;
}

const char *caprl_json_string_value(const struct json_t *v) {
    return (v != NULL && json_is_string(v)) ? json_string_value(v) : NULL;
}

static const char *type_name(const json_t *v) {
    switch (v ? json_typeof(v) : JSON_NULL) {
        case JSON_OBJECT: return "an object";
        case JSON_ARRAY: return "an array";
        case JSON_STRING: return "a string";
        case JSON_INTEGER: return "an integer";
        case JSON_REAL: return "a real";
        case JSON_TRUE: return "true";
        case JSON_FALSE: return "false";
        case JSON_NULL: return "null";
    }
    return "a value";
}

const char *caprl_json_describe(const struct json_t *v, char *buf, size_t cap) {
    if (cap == 0) {
        return buf;
    }
    if (v == NULL) {
        snprintf(buf, cap, "nothing");
        return buf;
    }
    /* json_dumpb writes into our buffer without allocating (keys are not sorted); when the text is longer than
     * the buffer its contents are unspecified, so fall back to the type. */
    char   text[512];
    size_t n = json_dumpb(v, text, sizeof text, JSON_COMPACT | JSON_ENCODE_ANY);
    if (n == 0 || n > sizeof text) {
        snprintf(buf, cap, "%s", type_name(v));
        return buf;
    }
    if (n < cap) {
        memcpy(buf, text, n);
        buf[n] = '\0';
    } else if (cap > 4) {
        memcpy(buf, text, cap - 4);
        memcpy(buf + cap - 4, "...", 4);
    } else {
        buf[0] = '\0';
    }
    return buf;
}

/* ---- getters --------------------------------------------------------------------------------------------- */

/* "path.key", cut to cap-1 bytes: a message with a shortened path is still useful. */
static void key_path(const caprl_json_obj *o, const char *key, char *buf, size_t cap) {
    int n = o->path[0] ? snprintf(buf, cap, "%s.%s", o->path, key) : snprintf(buf, cap, "%s", key);
    if (n < 0) {
        buf[0] = '\0';
    }
}

static caprl_status vfield_error(const caprl_json_obj *o, const char *key, caprl_status code, caprl_error *err,
                                 const char *fmt, va_list ap) CAPRL_PRINTF(5, 0);

static caprl_status vfield_error(const caprl_json_obj *o, const char *key, caprl_status code, caprl_error *err,
                                 const char *fmt, va_list ap) {
    char path[CAPRL_JSON_PATH_CAP + 64];
    key_path(o, key, path, sizeof path);
    char msg[CAPRL_ERROR_MSG_CAP];
    vsnprintf(msg, sizeof msg, fmt, ap);
    return caprl_err_set(err, code, "%s: field '%s': %s", o->file, path, msg);
}

caprl_status caprl_json_field_error(const caprl_json_obj *o, const char *key, caprl_status code, caprl_error *err,
                                    const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    caprl_status st = vfield_error(o, key, code, err, fmt, ap);
    va_end(ap);
    return st;
}

const struct json_t *caprl_json_get(const caprl_json_obj *o, const char *key) {
    return json_object_get(o->obj, key);
}

bool caprl_json_has(const caprl_json_obj *o, const char *key) {
    return !caprl_json_is_null(caprl_json_get(o, key));
}

static caprl_status missing(const caprl_json_obj *o, const char *key, caprl_error *err) {
    return caprl_json_field_error(o, key, CAPRL_ERR_FORMAT, err, "missing (required)");
}

static caprl_status wrong(const caprl_json_obj *o, const char *key, const char *expected, const json_t *v,
                          caprl_error *err) {
    char got[96];
    return caprl_json_field_error(o, key, CAPRL_ERR_FORMAT, err, "expected %s, got %s", expected,
                                  caprl_json_describe(v, got, sizeof got));
}

static void describe_int_range(int64_t lo, int64_t hi, char *buf, size_t cap) {
    bool        open_top = hi == INT64_MAX || hi == INT32_MAX;
    const char *kind = lo == 1 ? "a positive integer" : lo == 0 ? "a non-negative integer" : NULL;
    if (kind && open_top) {
        snprintf(buf, cap, "%s", kind);
    } else if (kind) {
        snprintf(buf, cap, "%s <= %lld", kind, (long long)hi);
    } else {
        snprintf(buf, cap, "an integer in [%lld, %lld]", (long long)lo, (long long)hi);
    }
}

static caprl_status int_value(const caprl_json_obj *o, const char *key, const json_t *v, int64_t lo, int64_t hi,
                              int64_t *out, caprl_error *err) {
    char expected[96];
    describe_int_range(lo, hi, expected, sizeof expected);
    int64_t x = 0;
    if (!caprl_json_int_value(v, &x) || x < lo || x > hi) {
        return wrong(o, key, expected, v, err);
    }
    *out = x;
    return CAPRL_OK;
}

caprl_status caprl_json_get_int(const caprl_json_obj *o, const char *key, int64_t lo, int64_t hi, int64_t *out,
                                caprl_error *err) {
    const json_t *v = caprl_json_get(o, key);
    if (caprl_json_is_null(v)) {
        return missing(o, key, err);
    }
    return int_value(o, key, v, lo, hi, out, err);
}

caprl_status caprl_json_opt_int(const caprl_json_obj *o, const char *key, int64_t lo, int64_t hi, int64_t def,
                                int64_t *out, caprl_error *err) {
    const json_t *v = caprl_json_get(o, key);
    if (caprl_json_is_null(v)) {
        *out = def;
        return CAPRL_OK;
    }
    return int_value(o, key, v, lo, hi, out, err);
}

caprl_status caprl_json_get_i32(const caprl_json_obj *o, const char *key, int32_t lo, int32_t hi, int32_t *out,
                                caprl_error *err) {
    int64_t x = 0;
    CAPRL_TRY(caprl_json_get_int(o, key, lo, hi, &x, err));
    *out = (int32_t)x;
    return CAPRL_OK;
}

caprl_status caprl_json_opt_i32(const caprl_json_obj *o, const char *key, int32_t lo, int32_t hi, int32_t def,
                                int32_t *out, caprl_error *err) {
    int64_t x = 0;
    CAPRL_TRY(caprl_json_opt_int(o, key, lo, hi, def, &x, err));
    *out = (int32_t)x;
    return CAPRL_OK;
}

static caprl_status number_value(const caprl_json_obj *o, const char *key, const json_t *v, double *out,
                                 caprl_error *err) {
    if (!json_is_number(v)) {
        return wrong(o, key, "a number", v, err);
    }
    *out = json_number_value(v);
    return CAPRL_OK;
}

caprl_status caprl_json_get_number(const caprl_json_obj *o, const char *key, double *out, caprl_error *err) {
    const json_t *v = caprl_json_get(o, key);
    if (caprl_json_is_null(v)) {
        return missing(o, key, err);
    }
    return number_value(o, key, v, out, err);
}

caprl_status caprl_json_opt_number(const caprl_json_obj *o, const char *key, double def, double *out,
                                   caprl_error *err) {
    const json_t *v = caprl_json_get(o, key);
    if (caprl_json_is_null(v)) {
        *out = def;
        return CAPRL_OK;
    }
    return number_value(o, key, v, out, err);
}

static caprl_status bool_value(const caprl_json_obj *o, const char *key, const json_t *v, bool *out,
                               caprl_error *err) {
    if (!json_is_boolean(v)) {
        return wrong(o, key, "true or false", v, err);
    }
    *out = json_is_true(v);
    return CAPRL_OK;
}

caprl_status caprl_json_get_bool(const caprl_json_obj *o, const char *key, bool *out, caprl_error *err) {
    const json_t *v = caprl_json_get(o, key);
    if (caprl_json_is_null(v)) {
        return missing(o, key, err);
    }
    return bool_value(o, key, v, out, err);
}

caprl_status caprl_json_opt_bool(const caprl_json_obj *o, const char *key, bool def, bool *out, caprl_error *err) {
    const json_t *v = caprl_json_get(o, key);
    if (caprl_json_is_null(v)) {
        *out = def;
        return CAPRL_OK;
    }
    return bool_value(o, key, v, out, err);
}

caprl_status caprl_json_get_string(const caprl_json_obj *o, const char *key, const char **out, caprl_error *err) {
    const json_t *v = caprl_json_get(o, key);
    if (caprl_json_is_null(v)) {
        return missing(o, key, err);
    }
    if (!json_is_string(v)) {
        return wrong(o, key, "a string", v, err);
    }
    *out = json_string_value(v);
    return CAPRL_OK;
}

caprl_status caprl_json_opt_string(const caprl_json_obj *o, const char *key, const char *def, const char **out,
                                   caprl_error *err) {
    if (!caprl_json_has(o, key)) {
        *out = def;
        return CAPRL_OK;
    }
    return caprl_json_get_string(o, key, out, err);
}

static caprl_status object_value(const caprl_json_obj *o, const char *key, const json_t *v, caprl_json_obj *child,
                                 caprl_error *err) {
    if (!json_is_object(v)) {
        return wrong(o, key, "an object", v, err);
    }
    child->obj = v;
    child->file = o->file;
    key_path(o, key, child->path, sizeof child->path);
    return CAPRL_OK;
}

caprl_status caprl_json_get_object(const caprl_json_obj *o, const char *key, caprl_json_obj *child,
                                   caprl_error *err) {
    const json_t *v = caprl_json_get(o, key);
    if (caprl_json_is_null(v)) {
        return missing(o, key, err);
    }
    return object_value(o, key, v, child, err);
}

caprl_status caprl_json_opt_object(const caprl_json_obj *o, const char *key, caprl_json_obj *child, bool *present,
                                   caprl_error *err) {
    const json_t *v = caprl_json_get(o, key);
    *present = false;
    if (caprl_json_is_null(v)) {
        return CAPRL_OK;
    }
    CAPRL_TRY(object_value(o, key, v, child, err));
    *present = true;
    return CAPRL_OK;
}

int32_t caprl_json_warn_unknown(const caprl_json_obj *o, const char *const *known, size_t n_known) {
    int32_t     n_unknown = 0;
    const char *key;
    json_t     *value;
    /* json_object_foreach wants a non-const object; iteration does not modify it. */
    json_t *obj = (json_t *)(uintptr_t)o->obj;
    json_object_foreach(obj, key, value) {
        (void)value;
        bool found = false;
        for (size_t i = 0; i < n_known && !found; i++) {
            found = strcmp(known[i], key) == 0;
        }
        if (!found) {
            char path[CAPRL_JSON_PATH_CAP + 64];
            key_path(o, key, path, sizeof path);
            LOG_WARN("%s: unknown field '%s' ignored", o->file, path);
            n_unknown++;
        }
    }
    return n_unknown;
}

/* ---- text ------------------------------------------------------------------------------------------------ */

bool caprl_utf8_valid(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t               i = 0;
    while (i < n) {
        unsigned c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t   len;
        uint32_t cp;
        uint32_t min;
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2, cp = c & 0x1Fu, min = 0x80;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3, cp = c & 0x0Fu, min = 0x800;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4, cp = c & 0x07u, min = 0x10000;
        } else {
            return false; /* continuation byte, overlong C0/C1 lead, or F5..FF */
        }
        if (n - i < len) {
            return false;
        }
        for (size_t k = 1; k < len; k++) {
            unsigned cc = p[i + k];
            if ((cc & 0xC0u) != 0x80u) {
                return false;
            }
            cp = (cp << 6) | (cc & 0x3Fu);
        }
        if (cp < min || cp > 0x10FFFFu || (cp >= 0xD800u && cp <= 0xDFFFu)) {
            return false;
        }
        i += len;
    }
    return true;
}

bool caprl_json_number_value(const struct json_t *v, double *out) {
    if (v == NULL || !json_is_number(v)) {
        return false;
    }
    *out = json_number_value(v);
    return true;
}

bool caprl_json_bool_value(const struct json_t *v, bool *out) {
    if (v == NULL || !json_is_boolean(v)) {
        return false;
    }
    *out = json_is_true(v);
    return true;
}

bool caprl_json_object_each(const struct json_t *v, caprl_json_member_fn fn, void *user) {
    if (!caprl_json_is_object(v)) {
        return true;
    }
    const char *key;
    json_t     *value;
    /* json_object_foreach needs a non-const object; iteration does not modify it */
    json_t *obj = (json_t *)(uintptr_t)v;
    json_object_foreach(obj, key, value) {
        if (!fn(key, value, user)) {
            return false;
        }
    }
    return true;
}

char *caprl_json_quote(const char *s) {
    size_t  n = strlen(s);
    json_t *str = caprl_utf8_valid(s, n) ? json_stringn(s, n) : NULL;
    if (!str) {
        /* replace every byte of an invalid sequence by U+FFFD so the output is still valid JSON */
        char *fixed = malloc(3 * n + 1);
        if (!fixed) {
            return NULL;
        }
        size_t o = 0;
        for (size_t i = 0; i < n;) {
            size_t len = 1;
            while (len <= 4 && i + len <= n && !caprl_utf8_valid(s + i, len)) {
                len++;
            }
            if (len <= 4 && i + len <= n) {
                memcpy(fixed + o, s + i, len);
                o += len;
                i += len;
            } else {
                fixed[o++] = (char)0xEF;
                fixed[o++] = (char)0xBF;
                fixed[o++] = (char)0xBD;
                i++;
            }
        }
        str = json_stringn(fixed, o);
        free(fixed);
        if (!str) {
            return NULL;
        }
    }
    char *out = json_dumps(str, JSON_ENCODE_ANY | JSON_COMPACT);
    json_decref(str);
    return out;
}
