/* QA sets (caprl/qa.h): caprl QA JSONL and released CapRL training records (spec/caprl.md §7.6) into one in-memory
 * list of images with (question string, gold letter) pairs, shared by the reward and the visual-dependency filter.
 * Every question is checked against the form the released reward server parses (§6.4), so a malformed question
 * fails here, with its file and line, instead of inside a training step. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/qa.h"
#include "core/error_impl.h"
#include "core/file_impl.h"
#include "core/log_impl.h"
#include "data/data_impl.h"
#include "fmt/json_impl.h"

/* A QA file is read whole; 16 GiB is far above CapRL-QA-75K (about 100 MB) and below anything that fits nowhere. */
#define QA_FILE_MAX ((size_t)16 << 30)
/* Skipped records are logged one by one up to this many, then only counted. */
#define QA_WARN_MAX 20

/* ---- question strings ----------------------------------------------------------------------------------- */

caprl_status caprl_qa_check_question(const char *question, char gold, int32_t *n_options, caprl_error *err) {
    size_t n = strlen(question);
    if (!caprl_utf8_valid(question, n)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "question is not valid UTF-8");
    }
    const char *nl = memchr(question, '\n', n);
    size_t      first = nl ? (size_t)(nl - question) : n;
    bool        has_text = false;
    for (size_t i = 0; i < first && !has_text; i++) {
        has_text = question[i] != ' ' && question[i] != '\t' && question[i] != '\r';
    }
    if (!has_text) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "question text (the first line) is empty");
    }
    /* What the released shuffle_options accepts: every non-empty line after the first matches the option regex
     * (it raises otherwise); labels in any order, a repeated one keeping its first place and last text; a gold
     * that is none of the labels (the "cannot answer" letter, say) is presented as saved with F appended. */
    uint32_t labels = 0;
    bool     cannot = false;
    for (size_t pos = first; pos < n;) {
        pos++; /* the '\n' */
        const char *line = question + pos;
        const char *end = memchr(line, '\n', n - pos);
        size_t      len = end ? (size_t)(end - line) : n - pos;
        pos += len;
        if (len == 0) {
            continue;
        }
        const char *text;
        size_t      text_len;
        char        label = caprl_qa_option_line(line, len, &text, &text_len);
        if (!label) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT,
                                 "line \"%.*s\" is not an option line \"   - X) text\" (X in A-F)",
                                 (int)(len > 80 ? 80 : len), line);
        }
        /* the released strings end with "   - E) Can not answer ..." (F after five options), a line the reward
         * and the filter remove before anything else */
        if (len == strlen("   - E) " CAPRL_QA_CANNOT_ANSWER) && (memcmp(line, "   - E) ", 8) == 0 ||
                                                                  memcmp(line, "   - F) ", 8) == 0) &&
            memcmp(line + 8, CAPRL_QA_CANNOT_ANSWER, len - 8) == 0) {
            cannot = true;
            continue;
        }
        labels |= 1u << (label - 'A');
    }
    if (labels == 0) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "question has no option lines");
    }
    (void)gold; /* any letter A-F (the caller checks that); one outside the labels takes the release's fallback */
    if (n_options) {
        *n_options = __builtin_popcount(labels) + (cannot ? 1 : 0);
    }
    return CAPRL_OK;
}

/* ---- records -------------------------------------------------------------------------------------------- */

typedef struct qa_list {
    caprl_qa_item *items;
    int32_t        n, cap;
} qa_list;

static void qa_list_free(qa_list *l) {
    for (int32_t i = 0; i < l->n; i++) {
        free(l->items[i].question);
    }
    free(l->items);
    memset(l, 0, sizeof *l);
}

/* Checks and appends one (question, answer) pair; `where` names it in messages ("qa[2]"). */
static caprl_status qa_list_push(qa_list *l, const char *question, size_t q_len, const char *answer, size_t a_len,
                                 const char *where, caprl_error *err) {
    if (strlen(question) != q_len) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: question contains a NUL character", where);
    }
    /* The reward compares the reader's letter with the gold string as it is, so only one letter can ever match. */
    size_t s = 0, e = a_len;
    while (s < e && (answer[s] == ' ' || answer[s] == '\t' || answer[s] == '\n' || answer[s] == '\r')) {
        s++;
    }
    while (e > s && (answer[e - 1] == ' ' || answer[e - 1] == '\t' || answer[e - 1] == '\n' || answer[e - 1] == '\r')) {
        e--;
    }
    if (e - s != 1 || answer[s] < 'A' || answer[s] > 'F') {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: answer \"%.*s\" is not a single letter A-F", where,
                             (int)(a_len > 40 ? 40 : a_len), answer);
    }
    caprl_error e2 = {0};
    if (caprl_qa_check_question(question, answer[s], NULL, &e2) != CAPRL_OK) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: %s", where, e2.msg);
    }
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 8;
        l->items = caprl_xrealloc(l->items, (size_t)l->cap * sizeof *l->items);
    }
    l->items[l->n].question = caprl_xstrndup(question, q_len);
    l->items[l->n].gold = answer[s];
    l->n++;
    return CAPRL_OK;
}

/* A child object of a JSON array element, for the typed getters (which name file and path in messages). */
static void json_child(caprl_json_obj *child, const caprl_json_obj *parent, const struct json_t *v, const char *key,
                       size_t index) {
    child->obj = v;
    child->file = parent->file;
    /* A path longer than the buffer is only cut in messages. */
    char  *p = caprl_xasprintf("%s%s%s[%zu]", parent->path, parent->path[0] ? "." : "", key, index);
    size_t n = strlen(p) < sizeof child->path - 1 ? strlen(p) : sizeof child->path - 1;
    memcpy(child->path, p, n);
    child->path[n] = '\0';
    free(p);
}

static caprl_status read_caprl_record(const caprl_json_obj *o, qa_list *l, const char **image, const char **id,
                                      caprl_error *err) {
    CAPRL_TRY(caprl_json_get_string(o, "image", image, err));
    CAPRL_TRY(caprl_json_opt_string(o, "id", *image, id, err));
    const struct json_t *qa = caprl_json_get(o, "qa");
    if (!caprl_json_is_array(qa)) {
        return caprl_json_field_error(o, "qa", CAPRL_ERR_FORMAT, err, "expected an array of {\"question\", \"answer\"}");
    }
    for (size_t i = 0; i < caprl_json_array_size(qa); i++) {
        const struct json_t *v = caprl_json_array_get(qa, i);
        if (!caprl_json_is_object(v)) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: qa[%zu] is not an object", o->file, i);
        }
        caprl_json_obj c;
        json_child(&c, o, v, "qa", i);
        const char *q, *a;
        CAPRL_TRY(caprl_json_get_string(&c, "question", &q, err));
        CAPRL_TRY(caprl_json_get_string(&c, "answer", &a, err));
        char where[64];
        snprintf(where, sizeof where, "qa[%zu]", i);
        CAPRL_TRY(qa_list_push(l, q, strlen(q), a, strlen(a), where, err));
    }
    return CAPRL_OK;
}

/* The user message's image path: the first {"type": "image", "image": path} content element. */
static const char *message_image(const struct json_t *msgs) {
    for (size_t m = 0; m < caprl_json_array_size(msgs); m++) {
        const struct json_t *msg = caprl_json_array_get(msgs, m);
        if (!caprl_json_is_object(msg)) {
            continue;
        }
        caprl_json_obj mo = {msg, "", ""};
        const struct json_t *content = caprl_json_get(&mo, "content");
        for (size_t k = 0; k < caprl_json_array_size(content); k++) {
            const struct json_t *el = caprl_json_array_get(content, k);
            if (!caprl_json_is_object(el)) {
                continue;
            }
            caprl_json_obj eo = {el, "", ""};
            const char *type = caprl_json_string_value(caprl_json_get(&eo, "type"));
            const char *img = caprl_json_string_value(caprl_json_get(&eo, "image"));
            if (img && img[0] && (!type || strcmp(type, "image") == 0)) {
                return img;
            }
        }
    }
    return NULL;
}

/* The content string of the message whose role is "answer". */
static const char *message_answer(const struct json_t *msgs) {
    for (size_t m = 0; m < caprl_json_array_size(msgs); m++) {
        const struct json_t *msg = caprl_json_array_get(msgs, m);
        if (!caprl_json_is_object(msg)) {
            continue;
        }
        caprl_json_obj mo = {msg, "", ""};
        const char *role = caprl_json_string_value(caprl_json_get(&mo, "role"));
        if (role && strcmp(role, "answer") == 0) {
            return caprl_json_string_value(caprl_json_get(&mo, "content"));
        }
    }
    return NULL;
}

static caprl_status read_released_qa(const char *text, qa_list *l, caprl_error *err) {
    caprl_pylit  lit;
    caprl_error  e2 = {0};
    if (caprl_pylit_parse(text, strlen(text), &lit, &e2) != CAPRL_OK) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "the \"answer\" message is not a Python list literal: %s", e2.msg);
    }
    caprl_status st = CAPRL_OK;
    if (lit.kind != CAPRL_PYLIT_LIST && lit.kind != CAPRL_PYLIT_TUPLE) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "the \"answer\" message is not a list of (question, answer) pairs");
    }
    for (int32_t i = 0; st == CAPRL_OK && i < lit.n_items; i++) {
        const caprl_pylit *p = &lit.items[i];
        char where[64];
        snprintf(where, sizeof where, "QA pair %d", i);
        if ((p->kind != CAPRL_PYLIT_LIST && p->kind != CAPRL_PYLIT_TUPLE) || p->n_items != 2 ||
            p->items[0].kind != CAPRL_PYLIT_STR || p->items[1].kind != CAPRL_PYLIT_STR) {
            st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: expected a pair of strings (question, answer)", where);
            break;
        }
        st = qa_list_push(l, p->items[0].str, p->items[0].len, p->items[1].str, p->items[1].len, where, err);
    }
    caprl_pylit_free(&lit);
    return st;
}

static caprl_status read_released_record(const caprl_json_obj *o, qa_list *l, const char **image,
                                         struct json_t **owned, caprl_error *err) {
    const struct json_t *msgs = caprl_json_get(o, "message");
    const char          *text = caprl_json_string_value(msgs);
    if (text) {
        /* OpenRLHF's input_key "message" holds the message list as a JSON string. */
        caprl_error e2 = {0};
        if (caprl_json_parse(owned, text, strlen(text), "message", &e2) != CAPRL_OK) {
            return caprl_json_field_error(o, "message", CAPRL_ERR_FORMAT, err, "invalid JSON inside the string: %s",
                                          e2.msg);
        }
        msgs = *owned;
    }
    if (!caprl_json_is_array(msgs)) {
        return caprl_json_field_error(o, "message", CAPRL_ERR_FORMAT, err,
                                      "expected a list of messages (or a JSON string holding one)");
    }
    *image = message_image(msgs);
    if (!*image) {
        return caprl_json_field_error(o, "message", CAPRL_ERR_FORMAT, err,
                                      "no {\"type\": \"image\", \"image\": path} element in any message");
    }
    const char *answer = message_answer(msgs);
    if (!answer) {
        return caprl_json_field_error(o, "message", CAPRL_ERR_FORMAT, err,
                                      "no message with role \"answer\" and a string content");
    }
    return read_released_qa(answer, l, err);
}

/* ---- the set ---------------------------------------------------------------------------------------------- */

typedef struct set_builder {
    caprl_qa_set set;
    int64_t      cap;
    char        *dir; /* the file's directory, for relative image paths ("" for the current one) */
} set_builder;

static char *resolve_image(const char *dir, const char *raw) {
    const char *p = strncmp(raw, "file://", 7) == 0 ? raw + 7 : raw;
    if (p[0] == '/' || dir[0] == '\0') {
        return caprl_xstrdup(p);
    }
    return caprl_path_join(dir, p);
}

/* One parsed record, line line_no of a JSON Lines file or element line_no of a JSON array; on success appends an
 * image to b. */
static caprl_status read_record(set_builder *b, const char *path, int64_t line_no, const struct json_t *doc,
                                caprl_error *err) {
    char name[64];
    snprintf(name, sizeof name, "line %" PRId64, line_no);
    struct json_t *inner = NULL;
    caprl_error    e2 = {0};
    caprl_json_obj o;
    qa_list        l = {0};
    const char    *image = NULL, *id = NULL;
    caprl_status   st = caprl_json_root(&o, doc, name, &e2);
    if (st == CAPRL_OK) {
        if (caprl_json_has(&o, "message")) {
            st = read_released_record(&o, &l, &image, &inner, &e2);
            id = image;
        } else if (caprl_json_has(&o, "qa")) {
            st = read_caprl_record(&o, &l, &image, &id, &e2);
        } else {
            st = caprl_err_set(&e2, CAPRL_ERR_FORMAT,
                               "neither a caprl QA record (\"qa\") nor a released training record (\"message\")");
        }
    }
    if (st == CAPRL_OK && l.n == 0) {
        st = caprl_err_set(&e2, CAPRL_ERR_FORMAT, "record has no question");
    }
    if (st == CAPRL_OK && (!caprl_utf8_valid(image, strlen(image)) || !caprl_utf8_valid(id, strlen(id)))) {
        st = caprl_err_set(&e2, CAPRL_ERR_FORMAT, "image path or id is not valid UTF-8");
    }
    if (st != CAPRL_OK) {
        /* e2 may already start with "line N: " (the JSON getters name the document); keep one position only. */
        const char *msg = strncmp(e2.msg, name, strlen(name)) == 0 && e2.msg[strlen(name)] == ':'
                              ? e2.msg + strlen(name) + 1 + (e2.msg[strlen(name) + 1] == ' ')
                              : e2.msg;
        st = caprl_err_set(err, e2.code, "%s:%" PRId64 ": %s", path, line_no, msg);
        qa_list_free(&l);
    } else {
        if (b->set.n_images == b->cap) {
            b->cap = b->cap ? b->cap * 2 : 64;
            b->set.images = caprl_xrealloc(b->set.images, (size_t)b->cap * sizeof *b->set.images);
        }
        caprl_qa_image *im = &b->set.images[b->set.n_images++];
        im->id = caprl_xstrdup(id);
        im->image_raw = caprl_xstrdup(image);
        im->image = resolve_image(b->dir, image);
        im->qa = l.items;
        im->n_qa = l.n;
        im->line = line_no;
    }
    caprl_json_free(inner);
    return st;
}

/* Parses one non-blank line as a record. */
static caprl_status read_line(set_builder *b, const char *path, int64_t line_no, const char *line, size_t n,
                              caprl_error *err) {
    struct json_t *doc = NULL;
    caprl_error    e2 = {0};
    /* With an empty document name jansson's position reads ":1:COL: text"; only the column is worth keeping. */
    if (caprl_json_parse(&doc, line, n, "", &e2) != CAPRL_OK) {
        const char *at = strncmp(e2.msg, ":1:", 3) == 0 ? e2.msg + 3 : e2.msg;
        return caprl_err_set(err, e2.code, "%s:%" PRId64 ": invalid JSON at column %s", path, line_no, at);
    }
    caprl_status st = read_record(b, path, line_no, doc, err);
    caprl_json_free(doc);
    return st;
}

/* Counts a malformed record under skip_bad (st becomes OK), or passes the error on. */
static caprl_status take_error(set_builder *b, bool skip_bad, caprl_status st, const caprl_error *e2, caprl_error *err) {
    if (st == CAPRL_ERR_FORMAT && skip_bad) {
        if (b->set.n_bad < QA_WARN_MAX) {
            LOG_WARN("skipped: %s", e2->msg);
        }
        b->set.n_bad++;
        return CAPRL_OK;
    }
    if (st != CAPRL_OK && err) {
        *err = *e2;
    }
    return st;
}

caprl_status caprl_qa_set_load(caprl_qa_set *out, const char *path, bool skip_bad, caprl_error *err) {
    memset(out, 0, sizeof *out);
    if (!path) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "QA set: no path given");
    }
    uint8_t *data = NULL;
    size_t   size = 0;
    CAPRL_TRY(caprl_file_read_all(path, QA_FILE_MAX, &data, &size, err));
    set_builder  b = {.dir = caprl_path_dir(path)};
    caprl_status st = CAPRL_OK;
    bool         is_array = caprl_json_starts_array((const char *)data, size);
    if (is_array) { /* a JSON array of records (a released dataset saved with json.dump): element i is "line" i + 1 */
        struct json_t *arr = NULL;
        st = caprl_json_parse(&arr, data, size, path, err);
        for (size_t i = 0; st == CAPRL_OK && i < caprl_json_array_size(arr); i++) {
            caprl_error e2 = {0};
            st = take_error(&b, skip_bad, read_record(&b, path, (int64_t)i + 1, caprl_json_array_get(arr, i), &e2),
                            &e2, err);
        }
        caprl_json_free(arr);
    }
    int64_t     line_no = 0;
    const char *line = NULL;
    size_t      pos = 0, len = 0;
    while (st == CAPRL_OK && !is_array && caprl_jsonl_next((const char *)data, size, &pos, &line_no, &line, &len)) {
        caprl_error e2 = {0};
        st = take_error(&b, skip_bad, read_line(&b, path, line_no, line, len, &e2), &e2, err);
    }
    free(data);
    free(b.dir);
    if (st == CAPRL_OK && b.set.n_bad > QA_WARN_MAX) {
        LOG_WARN("%s: %" PRId64 " malformed records skipped in all (the first %d shown)", path, b.set.n_bad,
                 QA_WARN_MAX);
    }
    if (st == CAPRL_OK && b.set.n_images == 0) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: no valid QA record (%" PRId64 " malformed)", path, b.set.n_bad);
    }
    if (st != CAPRL_OK) {
        caprl_qa_set_free(&b.set);
        return st;
    }
    *out = b.set;
    return CAPRL_OK;
}

void caprl_qa_set_free(caprl_qa_set *s) {
    if (!s) {
        return;
    }
    for (int64_t i = 0; i < s->n_images; i++) {
        caprl_qa_image *im = &s->images[i];
        for (int32_t k = 0; k < im->n_qa; k++) {
            free(im->qa[k].question);
        }
        free(im->qa);
        free(im->id);
        free(im->image);
        free(im->image_raw);
    }
    free(s->images);
    memset(s, 0, sizeof *s);
}

int64_t caprl_qa_set_n_questions(const caprl_qa_set *s) {
    int64_t n = 0;
    for (int64_t i = 0; s && i < s->n_images; i++) {
        n += s->images[i].n_qa;
    }
    return n;
}
