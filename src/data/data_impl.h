/* Internals of the data module (QA sets, QA parsing): the restricted Python-literal reader that training records
 * need (spec/caprl.md §7.6) and small text helpers shared by qa_data.c and qa_parse.c.
 * Depends on core/ only; no jansson here (JSON goes through fmt/json_impl.h). */
#ifndef CAPRL_DATA_IMPL_H
#define CAPRL_DATA_IMPL_H

#include "caprl/caprl.h"

/* ---- Python literals ------------------------------------------------------------------------------------
 * Reads str literals (prefixes r, u in either case; '...', "...", '''...''', """..."""; every escape Python 3
 * decodes except \N{name}; adjacent literals concatenate), list and tuple displays (trailing comma allowed), and
 * int / float numbers (kept as their text). Anything else (names, calls, operators, comments, bytes, f-strings)
 * is an error: the text is never evaluated. */

enum { CAPRL_PYLIT_STR = 0, CAPRL_PYLIT_NUM = 1, CAPRL_PYLIT_LIST = 2, CAPRL_PYLIT_TUPLE = 3 };

#define CAPRL_PYLIT_MAX_DEPTH 32

typedef struct caprl_pylit {
    int32_t             kind;    /* CAPRL_PYLIT_* */
    char               *str;     /* STR: decoded UTF-8 (NUL-terminated, may hold embedded NULs up to len); NUM: text */
    size_t              len;
    struct caprl_pylit *items;   /* LIST / TUPLE: (n_items) */
    int32_t             n_items;
} caprl_pylit;

/* Parses text[0..n) as exactly one literal (surrounding whitespace allowed). Errors: CAPRL_ERR_FORMAT with
 * "offset N: <what>" (no file prefix). Invalid UTF-8 in the text, lone surrogates and code points above U+10FFFF
 * from escapes are errors. On success *out is filled (free with caprl_pylit_free); on failure it is zeroed. */
caprl_status caprl_pylit_parse(const char *text, size_t n, caprl_pylit *out, caprl_error *err);
void         caprl_pylit_free(caprl_pylit *v); /* NULL-safe; leaves *v zeroed */

/* ---- text helpers ------------------------------------------------------------------------------------- */

/* A growable byte string; s is NUL-terminated whenever len > 0 or after caprl_sb_str. */
typedef struct caprl_sb {
    char  *s;
    size_t len, cap;
} caprl_sb;

void  caprl_sb_add(caprl_sb *b, const char *s, size_t n);
void  caprl_sb_addc(caprl_sb *b, char c);
void  caprl_sb_adds(caprl_sb *b, const char *s);
void  caprl_sb_addf(caprl_sb *b, const char *fmt, ...) CAPRL_PRINTF(2, 3);
char *caprl_sb_str(caprl_sb *b); /* never NULL; the buffer stays owned by b */
char *caprl_sb_take(caprl_sb *b); /* caller frees; b is reset */
void  caprl_sb_free(caprl_sb *b);

/* Python's str.isspace() for the code point starting at s[0..n): returns its byte length, or 0 if it is not
 * whitespace (ASCII \t\n\v\f\r, space, \x1c-\x1f, and U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029,
 * U+202F, U+205F, U+3000). */
size_t caprl_py_space_len(const char *s, size_t n);

/* The option label of a question-string line as the released shuffle_options reads it: re.search of
 * -\s*([A-F])\)\s*(.+) on line.strip() (Python's whitespace). Returns the letter and sets *text / *text_len to
 * the option text (the rest of the stripped line), or returns 0 if no dash starts a match. */
char caprl_qa_option_line(const char *line, size_t n, const char **text, size_t *text_len);

/* The text of the "cannot answer" option the released QA strings end with (spec/caprl.md §6.4, §7.3). */
#define CAPRL_QA_CANNOT_ANSWER "Can not answer based on the caption"

#endif /* CAPRL_DATA_IMPL_H */
