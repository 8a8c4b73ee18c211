/* Benchmarks for the Prism evaluation (caprl/eval.h): the released lmm_eval_*.json (a JSON array of records with
 * "image", "prompt" and "answer") and caprl's simple JSONL ("image", "question", "answer", "type"). Records are
 * kept with their original JSON, which the details file writes back as "original_sample". */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error_impl.h"
#include "core/file_impl.h"
#include "core/log_impl.h"
#include "data/data_impl.h"
#include "eval/eval_impl.h"
#include "fmt/json_impl.h"
#include "fmt/pyjson_impl.h"

#define BENCH_FILE_MAX ((size_t)8 << 30)
#define BENCH_WARN_MAX 20

caprl_eval_bench_params caprl_eval_bench_default_params(void) {
    caprl_eval_bench_params p;
    memset(&p, 0, sizeof p);
    p.rule = -1;
    p.skip_bad = false;
    return p;
}

char *caprl_eval_answer_text(const char *json) {
    struct json_t *v = NULL;
    if (!json || caprl_json_parse(&v, json, strlen(json), "answer", NULL) != CAPRL_OK) {
        return NULL;
    }
    char *s = caprl_py_str_of_json(v);
    caprl_json_free(v);
    return s;
}

/* ---- images ------------------------------------------------------------------------------------------------- */

typedef struct image_ref {
    const char *path;
    int64_t     min_pixels, max_pixels;
} image_ref;

/* An element qwen-vl-utils would treat as an image: {"image": path, ...} (with "type": "image" or no type). */
static bool image_element(const struct json_t *el, image_ref *ref) {
    if (!caprl_json_is_object(el)) {
        return false;
    }
    caprl_json_obj o = {el, "", ""};
    const char    *type = caprl_json_string_value(caprl_json_get(&o, "type"));
    const char    *path = caprl_json_string_value(caprl_json_get(&o, "image"));
    if (!path || !path[0] || (type && strcmp(type, "image") != 0)) {
        return false;
    }
    ref->path = path;
    int64_t v;
    if (caprl_json_int_value(caprl_json_get(&o, "min_pixels"), &v) && v > 0) {
        ref->min_pixels = v;
    }
    if (caprl_json_int_value(caprl_json_get(&o, "max_pixels"), &v) && v > 0) {
        ref->max_pixels = v;
    }
    return true;
}

/* The first image in what process_vision_info accepts: a path, an image element, a list of elements, messages
 * whose "content" lists elements, or a list of such conversations. */
static bool find_image(const struct json_t *v, image_ref *ref, int depth) {
    if (depth > 4 || !v) {
        return false;
    }
    const char *s = caprl_json_string_value(v);
    if (s) {
        ref->path = s;
        return s[0] != '\0';
    }
    if (image_element(v, ref)) {
        return true;
    }
    if (caprl_json_is_object(v)) {
        caprl_json_obj o = {v, "", ""};
        return find_image(caprl_json_get(&o, "content"), ref, depth + 1);
    }
    for (size_t i = 0; i < caprl_json_array_size(v); i++) {
        if (find_image(caprl_json_array_get(v, i), ref, depth + 1)) {
            return true;
        }
    }
    return false;
}

/* ---- records ---------------------------------------------------------------------------------------------- */

typedef struct bench_builder {
    caprl_eval_bench              b;
    int64_t                       cap;
    const char                   *path;
    char                         *dir;
    int32_t                       file_rule; /* the rule from the file name */
    const caprl_eval_bench_params *params;
} bench_builder;

/* A relative image path is opened from the working directory, as the release's process_vision_info does; when no
 * such file exists there, from the benchmark file's directory (a benchmark moved with its images). */
static char *resolve(const char *dir, const char *root, const char *raw) {
    const char *p = strncmp(raw, "file://", 7) == 0 ? raw + 7 : raw;
    if (p[0] != '/' && root) {
        return caprl_path_join(root, p);
    }
    if (p[0] == '/' || dir[0] == '\0' || caprl_path_exists(p)) {
        return caprl_xstrdup(p);
    }
    return caprl_path_join(dir, p);
}

/* Reads one record; `where` ("record 3" or "line 4") names it in messages. */
static caprl_status read_record(bench_builder *bb, const struct json_t *rec, int64_t index, const char *where,
                                caprl_error *err) {
    caprl_json_obj o;
    CAPRL_TRY(caprl_json_root(&o, rec, where, err));
    caprl_eval_item it;
    memset(&it, 0, sizeof it);
    image_ref   ref = {0};
    const char *prompt = NULL, *question = NULL, *type = NULL;
    if (caprl_json_has(&o, "prompt")) {
        it.format = CAPRL_EVAL_FORMAT_RELEASED;
        CAPRL_TRY(caprl_json_get_string(&o, "prompt", &prompt, err));
        if (!find_image(caprl_json_get(&o, "image"), &ref, 0)) {
            return caprl_json_field_error(&o, "image", CAPRL_ERR_FORMAT, err,
                                          "no image path (a string, {\"image\": path} or messages holding one)");
        }
    } else if (caprl_json_has(&o, "question")) {
        it.format = CAPRL_EVAL_FORMAT_SIMPLE;
        CAPRL_TRY(caprl_json_get_string(&o, "question", &question, err));
        CAPRL_TRY(caprl_json_get_string(&o, "image", &ref.path, err));
        if (!ref.path[0]) {
            return caprl_json_field_error(&o, "image", CAPRL_ERR_FORMAT, err, "empty path");
        }
    } else {
        return caprl_err_set(err, CAPRL_ERR_FORMAT,
                             "%s: neither a released record (\"prompt\") nor a simple one (\"question\")", where);
    }
    const struct json_t *answer = caprl_json_get(&o, "answer");
    if (!answer) {
        return caprl_json_field_error(&o, "answer", CAPRL_ERR_FORMAT, err, "missing");
    }
    /* "type" names a scoring rule in caprl's own records; the released ones may carry other keys, which the release
     * ignores */
    if (it.format == CAPRL_EVAL_FORMAT_SIMPLE) {
        CAPRL_TRY(caprl_json_opt_string(&o, "type", NULL, &type, err));
    }
    int32_t rule = bb->params->rule;
    if (rule < 0 && type) {
        rule = caprl_eval_rule_parse(type);
        if (rule < 0) {
            return caprl_json_field_error(&o, "type", CAPRL_ERR_FORMAT, err,
                                          "unknown scoring type \"%s\" (math, mc, chart, info, anls)", type);
        }
    }
    if (rule < 0) {
        rule = bb->file_rule;
    }
    const struct json_t *id = caprl_json_get(&o, "id");
    int64_t              id_int;
    if (caprl_json_string_value(id)) {
        it.id = caprl_xstrdup(caprl_json_string_value(id));
    } else if (caprl_json_int_value(id, &id_int)) {
        it.id = caprl_xasprintf("%" PRId64, id_int);
    } else {
        it.id = caprl_xasprintf("%" PRId64, index);
    }
    it.rule = rule;
    it.image_raw = caprl_xstrdup(ref.path);
    it.image = resolve(bb->dir, bb->params->image_root, ref.path);
    it.min_pixels = ref.min_pixels;
    it.max_pixels = ref.max_pixels;
    it.answer = caprl_py_str_of_json(answer);
    if (prompt) {
        it.prompt = caprl_xstrdup(prompt);
    } else {
        it.question = caprl_xstrdup(question);
        it.prompt = caprl_xasprintf("%s%s%s", CAPRL_PRISM_SIMPLE_PROMPT_HEAD, question, CAPRL_PRISM_SIMPLE_PROMPT_TAIL);
    }
    it.record_json = caprl_pyjson_dumps(rec, -1, 0);
    if (bb->b.n_items == bb->cap) {
        bb->cap = bb->cap ? bb->cap * 2 : 64;
        bb->b.items = caprl_xrealloc(bb->b.items, (size_t)bb->cap * sizeof *bb->b.items);
    }
    bb->b.items[bb->b.n_items++] = it;
    return CAPRL_OK;
}

/* Handles one record's outcome: a format error is fatal unless skip_bad. The message gets the file prefix. */
static caprl_status take(bench_builder *bb, caprl_status st, const caprl_error *e2, caprl_error *err) {
    if (st == CAPRL_OK) {
        return CAPRL_OK;
    }
    if (st == CAPRL_ERR_FORMAT && bb->params->skip_bad) {
        if (bb->b.n_bad < BENCH_WARN_MAX) {
            LOG_WARN("%s: skipped: %s", bb->path, e2->msg);
        }
        bb->b.n_bad++;
        return CAPRL_OK;
    }
    return caprl_err_set(err, st, "%s: %s", bb->path, e2->msg);
}

static caprl_status load_array(bench_builder *bb, const char *data, size_t size, caprl_error *err) {
    struct json_t *doc = NULL;
    CAPRL_TRY(caprl_json_parse(&doc, data, size, bb->path, err));
    caprl_status st = CAPRL_OK;
    if (!caprl_json_is_array(doc)) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: expected a JSON array of records", bb->path);
    }
    for (size_t i = 0; st == CAPRL_OK && i < caprl_json_array_size(doc); i++) {
        char where[48];
        snprintf(where, sizeof where, "record %zu", i);
        caprl_error e2 = {0};
        st = take(bb, read_record(bb, caprl_json_array_get(doc, i), (int64_t)i, where, &e2), &e2, err);
    }
    caprl_json_free(doc);
    return st;
}

static caprl_status load_lines(bench_builder *bb, const char *data, size_t size, caprl_error *err) {
    int64_t     line_no = 0, index = 0;
    const char *line = NULL;
    size_t      pos = 0, len = 0;
    while (caprl_jsonl_next(data, size, &pos, &line_no, &line, &len)) {
        char where[48];
        snprintf(where, sizeof where, "line %" PRId64, line_no);
        struct json_t *rec = NULL;
        caprl_error    e2 = {0};
        caprl_status   st = caprl_json_parse(&rec, line, len, where, &e2);
        if (st == CAPRL_OK) {
            st = read_record(bb, rec, index, where, &e2);
        }
        caprl_json_free(rec);
        index++;
        CAPRL_TRY(take(bb, st, &e2, err));
    }
    return CAPRL_OK;
}

caprl_status caprl_eval_bench_load(caprl_eval_bench *out, const char *path, const caprl_eval_bench_params *params,
                                   caprl_error *err) {
    memset(out, 0, sizeof *out);
    caprl_eval_bench_params pp = params ? *params : caprl_eval_bench_default_params();
    if (!path || pp.rule >= CAPRL_EVAL_RULE_COUNT) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "benchmark: no path, or rule %d out of range", (int)pp.rule);
    }
    uint8_t *data = NULL;
    size_t   size = 0;
    CAPRL_TRY(caprl_file_read_all(path, BENCH_FILE_MAX, &data, &size, err));
    /* the release lowercases the whole data path it was given and looks for "info" / "char" in it */
    bench_builder bb = {
        .path = path, .dir = caprl_path_dir(path), .file_rule = caprl_eval_rule_for_bench(path), .params = &pp};
    caprl_status st = caprl_json_starts_array((const char *)data, size)
                          ? load_array(&bb, (const char *)data, size, err)
                          : load_lines(&bb, (const char *)data, size, err);
    free(data);
    free(bb.dir);
    if (st == CAPRL_OK && bb.b.n_items == 0) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: no valid benchmark record (%" PRId64 " malformed)", path,
                           bb.b.n_bad);
    }
    if (st != CAPRL_OK) {
        caprl_eval_bench_free(&bb.b);
        return st;
    }
    if (bb.b.n_bad > BENCH_WARN_MAX) {
        LOG_WARN("%s: %" PRId64 " malformed records skipped in all", path, bb.b.n_bad);
    }
    *out = bb.b;
    return CAPRL_OK;
}

void caprl_eval_bench_free(caprl_eval_bench *b) {
    if (!b) {
        return;
    }
    for (int64_t i = 0; i < b->n_items; i++) {
        caprl_eval_item *it = &b->items[i];
        free(it->id);
        free(it->image);
        free(it->image_raw);
        free(it->prompt);
        free(it->question);
        free(it->answer);
        free(it->record_json);
    }
    free(b->items);
    memset(b, 0, sizeof *b);
}
