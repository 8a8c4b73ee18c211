/* JSON written the way Python's json module writes it (json.dump(obj, f) and json.dump(obj, f, indent=N), with the
 * defaults ensure_ascii=True and insertion-ordered keys), and Python's float repr. The released CapRL evaluation
 * writes its result files with json.dump; caprl writes the same bytes so the files can be diffed and read by the
 * same tools (spec/caprl.md §9.2).
 * Thread safety: pure functions. */
#ifndef CAPRL_FMT_PYJSON_IMPL_H
#define CAPRL_FMT_PYJSON_IMPL_H

#include "caprl/caprl.h"

/* repr(x) of a Python float: the shortest decimal string that reads back as x, in fixed notation for exponents
 * -4..15 (with ".0" when integral) and "1e+16" / "1.5e-07" style otherwise; "inf", "-inf", "nan". Writes at most
 * cap - 1 bytes and a NUL (cap >= 32 always suffices); returns the length. */
size_t caprl_py_float_repr(double x, char *buf, size_t cap);

/* json.dumps(s) of a string (s[0..n) UTF-8), quotes included: \" \\ \n \r \t \b \f, other characters outside
 * ' '..'~' as \uXXXX (surrogate pairs above U+FFFF). An invalid UTF-8 byte becomes \ufffd. Caller frees. */
char *caprl_pyjson_string(const char *s, size_t n, size_t *out_len);

/* Re-emits JSON text as json.dumps(json.loads(text), indent=indent) would: indent < 0 gives the compact default
 * form ("[1, 2]", "{\"a\": 1}"); indent >= 0 one element per line. `level` is the nesting depth the value sits at
 * inside a larger document, so its inner lines are indented by (level + 1) * indent spaces and its closing
 * bracket by level * indent. Reals are written with caprl_py_float_repr (as Python re-prints them after
 * json.loads). Errors: CAPRL_ERR_FORMAT (invalid JSON, naming the position). *out is malloc'd, caller frees. */
caprl_status caprl_pyjson_reformat(const char *text, size_t n, int32_t indent, int32_t level, char **out,
                                   size_t *out_len, caprl_error *err);

struct json_t;

/* json.dumps of a parsed value (same forms as caprl_pyjson_reformat). Caller frees. */
char *caprl_pyjson_dumps(const struct json_t *v, int32_t indent, int32_t level);

/* Python's str() of the value json.loads gives: a string is itself; numbers as int / float repr; true -> True,
 * null -> None; lists and objects as their repr ("['a', 2.5]", "{'k': None}", strings quoted the way repr
 * quotes them). Caller frees. */
char *caprl_py_str_of_json(const struct json_t *v);

#endif /* CAPRL_FMT_PYJSON_IMPL_H */
