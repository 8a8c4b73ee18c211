/* JSON through jansson: strict loading (duplicate keys rejected, no NUL in strings, "file:line:col: message"
 * errors) and typed getters whose errors name the file and the key path, e.g.
 *   config.json: field 'text_config.num_attention_heads': expected a positive integer, got -3
 *
 * Only src/fmt/ and src/text/ may include <jansson.h>; every other module sees `struct json_t` as an opaque
 * type through this header. Values returned by the getters (strings, child objects) are borrowed from the
 * document and live until caprl_json_free on its root.
 *
 * Allocation: jansson keeps its default allocator (malloc). It is deliberately not routed through
 * caprl_try_malloc: jansson 2.14 crashes when an allocation fails inside json_loadb (seen under fault injection),
 * so injected failures would test jansson's bugs, not ours. A failure jansson does report becomes CAPRL_ERR_OOM.
 * Thread safety: a parsed document may be read from several threads; nothing here holds global state. */
#ifndef CAPRL_FMT_JSON_IMPL_H
#define CAPRL_FMT_JSON_IMPL_H

#include "caprl/caprl.h"

struct json_t;

#define CAPRL_JSON_PATH_CAP 192

/* A JSON object inside a named document, with the key path that leads to it (for messages). */
typedef struct caprl_json_obj {
    const struct json_t *obj;
    const char          *file;                     /* display name, e.g. "config.json"; not owned */
    char                 path[CAPRL_JSON_PATH_CAP]; /* "" for the root, else "text_config", "a.b", ... */
} caprl_json_obj;

/* ---- loading --------------------------------------------------------------------------------------------- */

/* Parses n bytes (any JSON value at the top). Errors: CAPRL_ERR_FORMAT "name:line:col: message" (invalid UTF-8,
 * syntax, duplicate key, \u0000, integer overflow), CAPRL_ERR_OOM. *out owned by the caller (caprl_json_free). */
caprl_status caprl_json_parse(struct json_t **out, const void *buf, size_t n, const char *name, caprl_error *err);
/* Reads and parses a file of at most max_size bytes. */
caprl_status caprl_json_load_file(struct json_t **out, const char *path, size_t max_size, caprl_error *err);
void         caprl_json_free(struct json_t *j); /* NULL-safe */

/* JSON Lines: the next line of data[*pos .. size) that is not blank, without its surrounding spaces, tabs and CRs,
 * in *line / *len; *line_no counts every line passed (1-based). false at the end of the data. */
bool caprl_jsonl_next(const char *data, size_t size, size_t *pos, int64_t *line_no, const char **line, size_t *len);

/* Whether a document's first non-blank character is '[' (a JSON array rather than JSON Lines of objects). */
bool caprl_json_starts_array(const char *data, size_t size);

/* Makes o the root of document j (named file); CAPRL_ERR_FORMAT if j is not an object. */
caprl_status caprl_json_root(caprl_json_obj *o, const struct json_t *j, const char *file, caprl_error *err);

/* ---- typed getters ----------------------------------------------------------------------------------------
 * get_*: the key must be present and non-null. opt_*: absent or null gives def. Every error is
 * CAPRL_ERR_FORMAT and names o->file and the key path, with the offending value. */

caprl_status caprl_json_get_int(const caprl_json_obj *o, const char *key, int64_t lo, int64_t hi, int64_t *out,
                                caprl_error *err);
caprl_status caprl_json_opt_int(const caprl_json_obj *o, const char *key, int64_t lo, int64_t hi, int64_t def,
                                int64_t *out, caprl_error *err);
/* int32 conveniences (lo and hi must lie in the int32 range). */
caprl_status caprl_json_get_i32(const caprl_json_obj *o, const char *key, int32_t lo, int32_t hi, int32_t *out,
                                caprl_error *err);
caprl_status caprl_json_opt_i32(const caprl_json_obj *o, const char *key, int32_t lo, int32_t hi, int32_t def,
                                int32_t *out, caprl_error *err);
/* Integer or real; always finite (jansson rejects overflowing reals). */
caprl_status caprl_json_get_number(const caprl_json_obj *o, const char *key, double *out, caprl_error *err);
caprl_status caprl_json_opt_number(const caprl_json_obj *o, const char *key, double def, double *out,
                                   caprl_error *err);
caprl_status caprl_json_get_bool(const caprl_json_obj *o, const char *key, bool *out, caprl_error *err);
caprl_status caprl_json_opt_bool(const caprl_json_obj *o, const char *key, bool def, bool *out, caprl_error *err);
/* The string is borrowed from the document. */
caprl_status caprl_json_get_string(const caprl_json_obj *o, const char *key, const char **out, caprl_error *err);
caprl_status caprl_json_opt_string(const caprl_json_obj *o, const char *key, const char *def, const char **out,
                                   caprl_error *err);
/* A nested object; child->path becomes "path.key". opt: *present tells whether it was there (absent or null
 * gives false). */
caprl_status caprl_json_get_object(const caprl_json_obj *o, const char *key, caprl_json_obj *child, caprl_error *err);
caprl_status caprl_json_opt_object(const caprl_json_obj *o, const char *key, caprl_json_obj *child, bool *present,
                                   caprl_error *err);

/* Raw access for arrays and mixed-type fields: the value of key or NULL if absent (a JSON null is returned). */
const struct json_t *caprl_json_get(const caprl_json_obj *o, const char *key);
/* true if key is present with a non-null value */
bool                 caprl_json_has(const caprl_json_obj *o, const char *key);

/* Formats "file: field 'path.key': <message>" into err with code; returns code. */
caprl_status caprl_json_field_error(const caprl_json_obj *o, const char *key, caprl_status code, caprl_error *err,
                                    const char *fmt, ...) CAPRL_PRINTF(5, 6);
/* Logs a warning "file: unknown field 'path.key' ignored" for each key of o not in known[0..n_known);
 * returns how many there were. */
int32_t caprl_json_warn_unknown(const caprl_json_obj *o, const char *const *known, size_t n_known);

/* ---- values -------------------------------------------------------------------------------------------- */

bool        caprl_json_is_null(const struct json_t *v); /* NULL pointer counts as null */
bool        caprl_json_is_array(const struct json_t *v);
bool        caprl_json_is_object(const struct json_t *v);
size_t      caprl_json_array_size(const struct json_t *v); /* 0 if not an array */
/* i < size; NULL if not an array or out of range */
const struct json_t *caprl_json_array_get(const struct json_t *v, size_t i);
/* An integer value (JSON integers only, no reals). */
bool        caprl_json_int_value(const struct json_t *v, int64_t *out);
/* The string of a string value, NULL otherwise. */
const char *caprl_json_string_value(const struct json_t *v);
/* Short description of v for messages: compact JSON, cut to cap-1 bytes with "..." if longer. Returns buf. */
const char *caprl_json_describe(const struct json_t *v, char *buf, size_t cap);

/* A number (integer or real) as a double. */
bool        caprl_json_number_value(const struct json_t *v, double *out);
/* A JSON true / false. */
bool        caprl_json_bool_value(const struct json_t *v, bool *out);
/* Calls fn(key, value, user) for each member of object v in document order; stops and returns false as soon as
 * fn does. */
typedef bool (*caprl_json_member_fn)(const char *key, const struct json_t *value, void *user);
bool        caprl_json_object_each(const struct json_t *v, caprl_json_member_fn fn, void *user);
/* s as a JSON string literal (quoted, escaped; invalid UTF-8 becomes U+FFFD), malloc'd; NULL on OOM. */
char       *caprl_json_quote(const char *s);

/* ---- text ---------------------------------------------------------------------------------------------- */

/* true if s[0..n) is well-formed UTF-8 (no overlongs, surrogates or code points above U+10FFFF). */
bool caprl_utf8_valid(const char *s, size_t n);

#endif /* CAPRL_FMT_JSON_IMPL_H */
