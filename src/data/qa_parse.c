/* Parsing a QA generator's raw output (caprl/qa.h, spec/caprl.md §7.2–§7.3). The released extraction script is not
 * published; what the later stages consume fixes the output: one question line, option lines "   - X) text" with
 * labels from A, and a gold letter. The input is whatever a 72B model wrote at temperature 0.1, so the reader is
 * line-based and forgiving about decoration (CRLF, "####", bold, "A." for "A)", spacing, numbering) but strict
 * about meaning: every item that cannot become an unambiguous question is dropped with a reason.
 *
 * Lines are classified (blank, separator, answer, question header, option, other) and fed to a small state
 * machine; an item ends at the next header, separator, unheaded question or the end of the text, and is then
 * validated. Linear in the input size; no recursion. */
#include <stdlib.h>
#include <string.h>

#include "caprl/qa.h"
#include "core/error_impl.h"
#include "data/data_impl.h"
#include "fmt/json_impl.h"

static const char *const k_drop_names[CAPRL_QA_DROP_COUNT] = {
    "no_question",       "no_options",           "too_few_options", "too_many_options", "bad_labels",
    "empty_option",      "duplicate_options",    "no_answer",       "truncated",        "bad_answer",
    "answer_not_in_options", "answer_mismatch", "conflicting_answers", "duplicate_question", "too_long",
    "bad_text",          "too_many_items",
};

const char *caprl_qa_drop_reason_name(int32_t reason) {
    return reason >= 0 && reason < CAPRL_QA_DROP_COUNT ? k_drop_names[reason] : "unknown";
}

caprl_qa_parse_params caprl_qa_parse_default_params(void) {
    caprl_qa_parse_params p;
    memset(&p, 0, sizeof p);
    p.max_options = 4;
    p.max_question_bytes = 4096;
    p.append_cannot_answer = false;
    return p;
}

/* ---- line classification ---------------------------------------------------------------------------------- */

typedef struct span {
    const char *s;
    size_t      n;
} span;

enum { LINE_BLANK, LINE_SEP, LINE_ANSWER, LINE_HEADER, LINE_OPTION, LINE_OTHER };

typedef struct line_info {
    int32_t kind;
    int32_t number; /* HEADER: the question number, or -1 */
    char    letter; /* OPTION / ANSWER: the label (0 for an answer line without a letter) */
    span    text;   /* HEADER: question text; OPTION: option text; ANSWER: text after the letter; OTHER: the line */
} line_info;

static bool is_ws(char c) {
    return c == ' ' || c == '\t' || c == '\f' || c == '\v';
}

static span trim(span t) {
    while (t.n && is_ws(t.s[0])) {
        t.s++;
        t.n--;
    }
    while (t.n && is_ws(t.s[t.n - 1])) {
        t.n--;
    }
    return t;
}

/* Drops markdown emphasis around a span: leading and trailing runs of '*' and '_' (and the spaces inside them). */
static span strip_emphasis(span t) {
    t = trim(t);
    while (t.n && (t.s[0] == '*' || t.s[0] == '_')) {
        t.s++;
        t.n--;
    }
    while (t.n && (t.s[t.n - 1] == '*' || t.s[t.n - 1] == '_')) {
        t.n--;
    }
    return trim(t);
}

static bool starts_ci(span t, const char *w) {
    size_t k = strlen(w);
    if (t.n < k) {
        return false;
    }
    for (size_t i = 0; i < k; i++) {
        char c = t.s[i];
        if (c >= 'A' && c <= 'Z') {
            c = (char)(c - 'A' + 'a');
        }
        if (c != w[i]) {
            return false;
        }
    }
    return true;
}

static span skip(span t, size_t k) {
    t.s += k;
    t.n -= k;
    return t;
}

static span skip_chars(span t, const char *set) {
    while (t.n && strchr(set, t.s[0]) != NULL && t.s[0] != '\0') {
        t = skip(t, 1);
    }
    return t;
}

static bool is_separator(span t) {
    if (t.n < 3) {
        return false;
    }
    for (size_t i = 0; i < t.n; i++) {
        if (t.s[i] != t.s[0] || strchr("-=*_", t.s[i]) == NULL) {
            return false;
        }
    }
    return true;
}

/* "**Answer:** B) Red", "Answer: (B)", "**Correct answer: B**", "Answer：B". */
static bool classify_answer(span t, line_info *li) {
    t = skip_chars(t, "*_# ");
    if (starts_ci(t, "correct answer")) {
        t = skip(t, strlen("correct answer"));
    } else if (starts_ci(t, "answer")) {
        t = skip(t, strlen("answer"));
    } else {
        return false;
    }
    t = skip_chars(t, "*_ ");
    if (t.n >= 3 && memcmp(t.s, "\xEF\xBC\x9A", 3) == 0) { /* U+FF1A fullwidth colon */
        t = skip(t, 3);
    } else if (t.n && t.s[0] == ':') {
        t = skip(t, 1);
    } else {
        return false;
    }
    t = skip_chars(t, "*_ \t");
    li->kind = LINE_ANSWER;
    li->letter = 0;
    bool paren = t.n && t.s[0] == '(';
    if (paren) {
        t = skip(t, 1);
    }
    if (t.n && t.s[0] >= 'A' && t.s[0] <= 'F' &&
        (t.n == 1 || strchr(").:* \t", t.s[1]) != NULL)) {
        li->letter = t.s[0];
        t = skip(t, 1);
        t = skip_chars(t, ").:*_ \t");
        li->text = strip_emphasis(t);
    }
    return true;
}

static int32_t read_number(span *t) {
    int32_t v = 0, digits = 0;
    while (t->n && t->s[0] >= '0' && t->s[0] <= '9' && digits < 4) {
        v = v * 10 + (t->s[0] - '0');
        *t = skip(*t, 1);
        digits++;
    }
    return digits ? v : -1;
}

/* "#### 1. **Question?**", "### Question 2: ...", "**3. Question?**", "4) Question?" (the last form only when
 * bold or ending with '?', so numbered explanation lines do not open items). */
static bool classify_header(span t, line_info *li) {
    bool hashes = t.n && t.s[0] == '#';
    t = skip_chars(t, "#");
    t = trim(t);
    bool bold = t.n && (t.s[0] == '*' || t.s[0] == '_');
    t = skip_chars(t, "*_ ");
    if (starts_ci(t, "question")) {
        t = trim(skip(t, strlen("question")));
    }
    int32_t number = read_number(&t);
    if (number < 0 || !t.n || strchr(".):", t.s[0]) == NULL) {
        return false;
    }
    t = skip(t, 1);
    span text = strip_emphasis(t);
    span rest = trim(t);
    bold = bold || (rest.n && (rest.s[0] == '*' || rest.s[0] == '_'));
    bool question_mark = text.n && text.s[text.n - 1] == '?';
    if (!hashes && !bold && !question_mark) {
        return false;
    }
    /* "Question:" written inside the bold text. */
    if (starts_ci(text, "question:")) {
        text = strip_emphasis(skip(text, strlen("question:")));
    }
    li->kind = LINE_HEADER;
    li->number = number;
    li->text = text;
    return true;
}

/* "   - A) text", "- **A)** text", "A. text", "(B) text", "• C) text". "A. text" without a bullet counts only
 * while a question is open (in_item), since question text may itself start with "A. ". */
static bool classify_option(span t, bool in_item, line_info *li) {
    bool bullet = false;
    if (t.n && (t.s[0] == '-' || t.s[0] == '*' || t.s[0] == '+')) {
        bullet = t.n >= 2 && (t.s[1] == ' ' || t.s[1] == '\t' || (t.s[0] == '-' && t.s[1] >= 'A' && t.s[1] <= 'F')) ;
        if (!bullet && !(t.s[0] == '*' && t.n >= 2 && t.s[1] == '*')) {
            return false;
        }
        if (bullet) {
            t = skip(t, 1);
        }
    } else if (t.n >= 3 && (memcmp(t.s, "\xE2\x80\xA2", 3) == 0 || memcmp(t.s, "\xE2\x80\x93", 3) == 0)) {
        bullet = true; /* U+2022 bullet, U+2013 en dash */
        t = skip(t, 3);
    }
    t = skip_chars(t, " \t*_");
    bool paren = t.n && t.s[0] == '(';
    if (paren) {
        t = skip(t, 1);
    }
    if (t.n < 2 || t.s[0] < 'A' || t.s[0] > 'F') {
        return false;
    }
    char letter = t.s[0];
    char after = t.s[1];
    if (after == ')') {
        /* fine: "A)" or "(A)" */
    } else if ((after == '.' || after == ':') && !paren && (bullet || in_item)) {
        /* "A." / "A:" */
    } else {
        return false;
    }
    t = skip(t, 2);
    if (t.n && !is_ws(t.s[0]) && t.s[0] != '*' && t.s[0] != '_') {
        return false; /* "A.B.C" is text, not an option */
    }
    li->kind = LINE_OPTION;
    li->letter = letter;
    li->text = strip_emphasis(t);
    return true;
}

static line_info classify(span line, bool in_item) {
    line_info li;
    memset(&li, 0, sizeof li);
    li.number = -1;
    span t = trim(line);
    if (t.n == 0) {
        li.kind = LINE_BLANK;
        return li;
    }
    if (is_separator(t)) {
        li.kind = LINE_SEP;
        return li;
    }
    if (classify_answer(t, &li) || classify_header(t, &li) || classify_option(t, in_item, &li)) {
        return li;
    }
    li.kind = LINE_OTHER;
    li.text = strip_emphasis(t);
    return li;
}

/* ---- items -------------------------------------------------------------------------------------------------- */

typedef struct option {
    char letter;
    span text;
} option;

typedef struct item {
    bool     open;
    int32_t  number;
    int64_t  line;
    caprl_sb question;
    option  *opts;
    int32_t  n_opts, cap_opts;
    char     answer;        /* 0: no answer line yet */
    bool     answer_seen;   /* an answer line was read (possibly without a letter) */
    bool     answer_bad;    /* an answer line had no letter */
    bool     answer_conflict;
    span     answer_text;
} item;

typedef struct parser {
    const caprl_qa_parse_params *params;
    caprl_qa_parse_result       *out;
    int32_t                      cap_items, cap_drops;
    int32_t                      last_number; /* for numbering gaps; 0 before the first numbered item */
    item                         cur;
    span                         pending;      /* the last unconsumed "other" line: a possible unheaded question */
    int64_t                      pending_line;
} parser;

static void drop(parser *p, int32_t reason, const item *it) {
    caprl_qa_parse_result *o = p->out;
    if (o->n_drops == p->cap_drops) {
        p->cap_drops = p->cap_drops ? p->cap_drops * 2 : 8;
        o->drops = caprl_xrealloc(o->drops, (size_t)p->cap_drops * sizeof *o->drops);
    }
    o->drops[o->n_drops].reason = reason;
    o->drops[o->n_drops].number = it->number;
    o->drops[o->n_drops].line = it->line;
    o->n_drops++;
}

/* Lowercase, whitespace-collapsed, emphasis- and end-punctuation-free form of a text, for "same text" tests. */
static char *norm_text(span t) {
    caprl_sb b = {0};
    t = strip_emphasis(t);
    while (t.n && strchr(".;,", t.s[t.n - 1]) != NULL && t.s[t.n - 1] != '\0') {
        t.n--;
    }
    bool space = false;
    for (size_t i = 0; i < t.n; i++) {
        char c = t.s[i];
        if (is_ws(c)) {
            space = b.len > 0;
            continue;
        }
        if (space) {
            caprl_sb_addc(&b, ' ');
            space = false;
        }
        caprl_sb_addc(&b, c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c);
    }
    return caprl_sb_take(&b);
}

static bool same_text(span a, span b) {
    char *x = norm_text(a), *y = norm_text(b);
    bool  eq = strcmp(x, y) == 0;
    free(x);
    free(y);
    return eq;
}

/* Text fit for a question string: valid UTF-8, no control characters except tab. */
static bool clean_text(const char *s, size_t n) {
    if (!caprl_utf8_valid(s, n)) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c < 0x20 && c != '\t') || c == 0x7F) {
            return false;
        }
    }
    return true;
}

/* Appends t with tabs turned into spaces (the option regex and the reader see plain spaces). */
static void add_clean(caprl_sb *b, span t) {
    for (size_t i = 0; i < t.n; i++) {
        caprl_sb_addc(b, t.s[i] == '\t' ? ' ' : t.s[i]);
    }
}

static int32_t validate(parser *p, const item *it, bool at_end) {
    const caprl_qa_parse_params *pp = p->params;
    if (it->question.len == 0) {
        return CAPRL_QA_DROP_NO_QUESTION;
    }
    bool clean = clean_text(it->question.s, it->question.len);
    for (int32_t i = 0; i < it->n_opts && clean; i++) {
        clean = clean_text(it->opts[i].text.s, it->opts[i].text.n);
    }
    if (!clean) {
        return CAPRL_QA_DROP_BAD_TEXT;
    }
    if (!it->answer_seen && at_end) {
        return CAPRL_QA_DROP_TRUNCATED;
    }
    if (it->n_opts == 0) {
        return CAPRL_QA_DROP_NO_OPTIONS;
    }
    for (int32_t i = 0; i < it->n_opts; i++) {
        if (it->opts[i].text.n == 0) {
            return CAPRL_QA_DROP_EMPTY_OPTION;
        }
    }
    if (it->n_opts < 2) {
        return CAPRL_QA_DROP_TOO_FEW_OPTIONS;
    }
    if (it->n_opts > pp->max_options) {
        return CAPRL_QA_DROP_TOO_MANY_OPTIONS;
    }
    for (int32_t i = 0; i < it->n_opts; i++) {
        if (it->opts[i].letter != 'A' + i) {
            return CAPRL_QA_DROP_BAD_LABELS;
        }
    }
    for (int32_t i = 0; i < it->n_opts; i++) {
        for (int32_t j = i + 1; j < it->n_opts; j++) {
            if (same_text(it->opts[i].text, it->opts[j].text)) {
                return CAPRL_QA_DROP_DUPLICATE_OPTIONS;
            }
        }
    }
    if (!it->answer_seen) {
        return CAPRL_QA_DROP_NO_ANSWER;
    }
    if (it->answer_conflict) {
        return CAPRL_QA_DROP_CONFLICTING_ANSWERS;
    }
    if (it->answer == 0) {
        return CAPRL_QA_DROP_BAD_ANSWER;
    }
    int32_t gold = it->answer - 'A';
    if (gold >= it->n_opts) {
        return CAPRL_QA_DROP_ANSWER_NOT_IN_OPTIONS;
    }
    /* "**Answer:** B) Red" where B is "Blue" and another option is "Red": which one is meant is unknown. */
    if (it->answer_text.n && !same_text(it->answer_text, it->opts[gold].text)) {
        for (int32_t i = 0; i < it->n_opts; i++) {
            if (i != gold && same_text(it->answer_text, it->opts[i].text)) {
                return CAPRL_QA_DROP_ANSWER_MISMATCH;
            }
        }
    }
    return -1;
}

static void finish_item(parser *p, bool at_end) {
    item *it = &p->cur;
    if (!it->open) {
        return;
    }
    if (it->number >= 0) {
        if (it->number != p->last_number + 1) {
            p->out->gaps = true;
        }
        p->last_number = it->number;
    }
    int32_t reason = validate(p, it, at_end);
    char   *q = NULL;
    if (reason < 0) {
        caprl_sb b = {0};
        add_clean(&b, (span){it->question.s, it->question.len});
        for (int32_t i = 0; i < it->n_opts; i++) {
            caprl_sb_addf(&b, "\n   - %c) ", it->opts[i].letter);
            add_clean(&b, it->opts[i].text);
        }
        /* the released strings end with "E) Can not answer ..." whatever the option count (spec/caprl.md 7.3);
         * after a fifth option E that line is F, and a sixth option leaves no letter for it */
        if (p->params->append_cannot_answer && it->n_opts <= 5) {
            caprl_sb_addf(&b, "\n   - %c) %s", it->n_opts <= 4 ? 'E' : 'F', CAPRL_QA_CANNOT_ANSWER);
        }
        q = caprl_sb_take(&b);
        if ((int64_t)strlen(q) > p->params->max_question_bytes) {
            reason = CAPRL_QA_DROP_TOO_LONG;
        }
    }
    if (reason < 0 && p->out->n_items >= CAPRL_QA_PARSE_MAX_ITEMS) {
        reason = CAPRL_QA_DROP_TOO_MANY_ITEMS;
    }
    if (reason < 0) {
        span this_q = {it->question.s, it->question.len};
        for (int32_t i = 0; i < p->out->n_items && reason < 0; i++) {
            const char *prev = p->out->items[i].question;
            const char *nl = strchr(prev, '\n');
            if (same_text(this_q, (span){prev, nl ? (size_t)(nl - prev) : strlen(prev)})) {
                reason = CAPRL_QA_DROP_DUPLICATE_QUESTION;
            }
        }
    }
    if (reason >= 0) {
        drop(p, reason, it);
        free(q);
    } else {
        caprl_qa_parse_result *o = p->out;
        if (o->n_items == p->cap_items) {
            p->cap_items = p->cap_items ? p->cap_items * 2 : 8;
            o->items = caprl_xrealloc(o->items, (size_t)p->cap_items * sizeof *o->items);
        }
        o->items[o->n_items].question = q;
        o->items[o->n_items].gold = it->answer;
        o->n_items++;
    }
    caprl_sb_free(&it->question);
    free(it->opts);
    memset(it, 0, sizeof *it);
    p->pending.n = 0;
}

static void start_item(parser *p, int32_t number, span question, int64_t line) {
    finish_item(p, false);
    item *it = &p->cur;
    it->open = true;
    it->number = number;
    it->line = line;
    add_clean(&it->question, trim(question));
    p->pending.n = 0;
}

/* An option or answer with no open question: a question without a header, whose text (if any) is the last
 * unconsumed line. */
static void start_unheaded(parser *p, int64_t line) {
    span    q = p->pending;
    int64_t at = p->pending.n ? p->pending_line : line;
    start_item(p, -1, q, at);
}

static void add_option(item *it, char letter, span text) {
    if (it->n_opts == it->cap_opts) {
        it->cap_opts = it->cap_opts ? it->cap_opts * 2 : 8;
        it->opts = caprl_xrealloc(it->opts, (size_t)it->cap_opts * sizeof *it->opts);
    }
    it->opts[it->n_opts].letter = letter;
    it->opts[it->n_opts].text = text;
    it->n_opts++;
}

static void feed(parser *p, span line, int64_t line_no) {
    item     *it = &p->cur;
    line_info li = classify(line, it->open && !it->answer_seen);
    switch (li.kind) {
    case LINE_BLANK: break;
    case LINE_SEP: finish_item(p, false); break;
    case LINE_HEADER: start_item(p, li.number, li.text, line_no); break;
    case LINE_OPTION:
        if (!it->open || it->answer_seen) {
            start_unheaded(p, line_no);
        }
        add_option(it, li.letter, li.text);
        break;
    case LINE_ANSWER:
        if (!it->open) {
            start_unheaded(p, line_no);
        }
        if (it->answer_seen && li.letter != it->answer) {
            it->answer_conflict = true;
        }
        if (!it->answer_seen) {
            it->answer = li.letter;
            it->answer_text = li.text;
        }
        it->answer_seen = true;
        break;
    default:
        if (it->open && it->n_opts == 0 && !it->answer_seen) {
            /* The question text continues (or, after an empty "#### 1." header, starts) on this line. */
            if (it->question.len) {
                caprl_sb_addc(&it->question, ' ');
            }
            add_clean(&it->question, li.text);
        } else {
            p->pending = li.text;
            p->pending_line = line_no;
        }
        break;
    }
}

caprl_status caprl_qa_parse_response(const char *text, size_t n, const caprl_qa_parse_params *params,
                                     caprl_qa_parse_result *out, caprl_error *err) {
    memset(out, 0, sizeof *out);
    caprl_qa_parse_params pp = params ? *params : caprl_qa_parse_default_params();
    if (pp.max_options < 2 || pp.max_options > 6 || pp.max_question_bytes <= 0 || (n > 0 && !text)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "QA parse: max_options must be in 2..6 and max_question_bytes > 0 (got %d, %lld)",
                             (int)pp.max_options, (long long)pp.max_question_bytes);
    }
    parser p;
    memset(&p, 0, sizeof p);
    p.params = &pp;
    p.out = out;
    int64_t line_no = 0;
    /* CRLF and lone CR both end a line. */
    for (size_t pos = 0; pos < n;) {
        size_t end = pos;
        while (end < n && text[end] != '\n' && text[end] != '\r') {
            end++;
        }
        line_no++;
        feed(&p, (span){text + pos, end - pos}, line_no);
        pos = end;
        if (pos < n && text[pos] == '\r') {
            pos++;
            if (pos < n && text[pos] == '\n') {
                pos++;
            }
        } else if (pos < n) {
            pos++;
        }
    }
    finish_item(&p, true);
    return CAPRL_OK;
}

void caprl_qa_parse_result_free(caprl_qa_parse_result *r) {
    if (!r) {
        return;
    }
    for (int32_t i = 0; i < r->n_items; i++) {
        free(r->items[i].question);
    }
    free(r->items);
    free(r->drops);
    memset(r, 0, sizeof *r);
}
