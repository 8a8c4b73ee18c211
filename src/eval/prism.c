/* Prism stage 2 and results (caprl/eval.h): the reader prompt, BoN / Mean with numpy's arithmetic, and the two
 * result files in the released layout (json.dump with indent=4 for the details, compact for the summary). */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error_impl.h"
#include "core/file_impl.h"
#include "data/data_impl.h"
#include "eval/eval_impl.h"
#include "fmt/pyjson_impl.h"

char *caprl_prism_reader_prompt(const char *prompt, const char *caption, int32_t *n_replaced) {
    caprl_sb    b = {0};
    size_t      k = strlen(CAPRL_PRISM_IMAGE_PLACEHOLDER);
    int32_t     count = 0;
    const char *p = prompt ? prompt : "";
    for (const char *hit; (hit = strstr(p, CAPRL_PRISM_IMAGE_PLACEHOLDER)) != NULL; p = hit + k) {
        caprl_sb_add(&b, p, (size_t)(hit - p));
        caprl_sb_adds(&b, CAPRL_PRISM_CAPTION_PREFIX);
        caprl_sb_adds(&b, caption ? caption : "");
        caprl_sb_adds(&b, CAPRL_PRISM_CAPTION_SUFFIX);
        count++;
    }
    caprl_sb_adds(&b, p);
    if (n_replaced) {
        *n_replaced = count;
    }
    return caprl_sb_take(&b);
}

void caprl_prism_aggregate(const caprl_prism_record *recs, int64_t n, caprl_prism_metrics *out) {
    memset(out, 0, sizeof *out);
    double *bon = caprl_xcalloc(n > 0 ? (size_t)n : 1, sizeof *bon);
    double *mean = caprl_xcalloc(n > 0 ? (size_t)n : 1, sizeof *mean);
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        const caprl_prism_record *r = &recs[i];
        if (r->n < 1 || !r->scores) {
            continue;
        }
        /* np.max propagates NaN; np.mean is the pairwise sum over the count. */
        double mx = r->scores[0];
        for (int32_t j = 1; j < r->n; j++) {
            if (isnan(r->scores[j]) || isnan(mx)) {
                mx = (double)NAN;
            } else if (r->scores[j] > mx) {
                mx = r->scores[j];
            }
        }
        bon[k] = mx;
        mean[k] = caprl_np_sum(r->scores, r->n) / (double)r->n;
        out->n_answers += r->n;
        k++;
    }
    out->n_items = k;
    if (k > 0) {
        out->bon = caprl_np_sum(bon, k) / (double)k;
        out->mean = caprl_np_sum(mean, k) / (double)k;
    }
    free(bon);
    free(mean);
}

char *caprl_prism_details_path(const char *dir, const char *tag, int64_t step) {
    return caprl_xasprintf("%s/Prism_%s_step_details_%" PRId64 "_final.json", dir, tag, step);
}

char *caprl_prism_eval_path(const char *dir, const char *tag, int64_t step) {
    return caprl_xasprintf("%s/Prism_%s_step_eval_%" PRId64 "_final.json", dir, tag, step);
}

/* json.dump float: repr, with NaN / Infinity bare. */
static void add_py_float(caprl_sb *b, double x) {
    char buf[40];
    if (isnan(x)) {
        caprl_sb_adds(b, "NaN");
    } else if (isinf(x)) {
        caprl_sb_adds(b, x < 0 ? "-Infinity" : "Infinity");
    } else {
        caprl_py_float_repr(x, buf, sizeof buf);
        caprl_sb_adds(b, buf);
    }
}

static void add_indent(caprl_sb *b, int level) {
    caprl_sb_addc(b, '\n');
    for (int i = 0; i < 4 * level; i++) {
        caprl_sb_addc(b, ' ');
    }
}

static void add_py_string(caprl_sb *b, const char *s) {
    size_t len;
    char  *q = caprl_pyjson_string(s ? s : "", s ? strlen(s) : 0, &len);
    caprl_sb_add(b, q, len);
    free(q);
}

/* One inner list of the details entry, at nesting level 2 (elements at level 3). */
enum { COL_SCORES, COL_PARSED, COL_TOKENS, COL_TEXTS };

static void add_column(caprl_sb *b, const caprl_prism_record *r, int col) {
    int32_t count = col == COL_TEXTS ? 2 * r->n : r->n;
    caprl_sb_addc(b, '[');
    for (int32_t j = 0; j < count; j++) {
        if (j) {
            caprl_sb_addc(b, ',');
        }
        add_indent(b, 3);
        switch (col) {
        case COL_SCORES: add_py_float(b, r->scores[j]); break;
        case COL_PARSED: add_py_string(b, r->parsed ? r->parsed[j] : ""); break;
        case COL_TOKENS: caprl_sb_addf(b, "%" PRId64, r->reader_tokens ? r->reader_tokens[j] : 0); break;
        default: add_py_string(b, j < r->n ? r->captions[j] : r->outputs[j - r->n]); break;
        }
    }
    add_indent(b, 2);
    caprl_sb_addc(b, ']');
}

static caprl_status write_atomic(const char *path, const char *data, size_t n, caprl_error *err) {
    caprl_atomic_file af;
    CAPRL_TRY(caprl_atomic_open(&af, path, err));
    caprl_status st = caprl_atomic_write(&af, data, n, err);
    if (st == CAPRL_OK) {
        st = caprl_atomic_commit(&af, err);
    }
    if (st != CAPRL_OK) {
        caprl_atomic_abort(&af);
    }
    return st;
}

caprl_status caprl_prism_write_details(const char *path, const caprl_prism_record *recs, int64_t n,
                                       caprl_error *err) {
    for (int64_t i = 0; i < n; i++) {
        const caprl_prism_record *r = &recs[i];
        if (r->n < 1 || !r->record_json || !r->scores || !r->captions || !r->outputs) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "%s: result %" PRId64 " has no captions or scores", path,
                                 i);
        }
    }
    caprl_sb b = {0};
    if (n == 0) {
        caprl_sb_adds(&b, "[]");
    } else {
        caprl_sb_addc(&b, '[');
    }
    for (int64_t i = 0; i < n; i++) {
        const caprl_prism_record *r = &recs[i];
        char                     *sample = NULL;
        caprl_error               e2 = {0};
        if (caprl_pyjson_reformat(r->record_json, strlen(r->record_json), 4, 2, &sample, NULL, &e2) != CAPRL_OK) {
            caprl_sb_free(&b);
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: result %" PRId64 ": original sample: %s", path, i, e2.msg);
        }
        if (i) {
            caprl_sb_addc(&b, ',');
        }
        add_indent(&b, 1);
        caprl_sb_addc(&b, '[');
        add_indent(&b, 2);
        caprl_sb_adds(&b, sample);
        free(sample);
        for (int col = COL_SCORES; col <= COL_TEXTS; col++) {
            caprl_sb_addc(&b, ',');
            add_indent(&b, 2);
            add_column(&b, r, col);
        }
        add_indent(&b, 1);
        caprl_sb_addc(&b, ']');
    }
    if (n > 0) {
        add_indent(&b, 0);
        caprl_sb_addc(&b, ']');
    }
    caprl_status st = write_atomic(path, caprl_sb_str(&b), b.len, err);
    caprl_sb_free(&b);
    return st;
}

char *caprl_prism_summary_line(const caprl_prism_metrics *m) {
    if (m->n_items == 0) {
        return caprl_xstrdup("BoN: 0 Mean: 0"); /* the release's `else 0` */
    }
    char bon[40], mean[40];
    caprl_py_float_repr(m->bon, bon, sizeof bon);
    caprl_py_float_repr(m->mean, mean, sizeof mean);
    return caprl_xasprintf("BoN: %s Mean: %s", bon, mean);
}

caprl_status caprl_prism_write_eval(const char *path, const caprl_prism_metrics *m, caprl_error *err) {
    char    *line = caprl_prism_summary_line(m);
    caprl_sb b = {0};
    caprl_sb_addc(&b, '[');
    add_py_string(&b, line);
    caprl_sb_addc(&b, ']');
    free(line);
    caprl_status st = write_atomic(path, caprl_sb_str(&b), b.len, err);
    caprl_sb_free(&b);
    return st;
}
