/* caprl eval: the Prism evaluation (spec/caprl.md §9).
 *   score   apply the released scoring to {"prediction", "answer", "type"} records (checks the rules alone)
 *   prism   caption a benchmark, answer from the captions, score, BoN / Mean (tools/caprl/eval_prism.c)
 * Each subcommand is one function with the usual (argc, argv) signature (argv[0] is its name) and one row of
 * k_subs below; subcommands in other files are declared in subcommands.h. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "caprl/eval.h"
#include "commands.h"
#include "common.h"
#include "opts.h"
#include "subcommands.h"

#define PRED_FILE_MAX ((size_t)16 << 30)

/* ---- caprl eval score --------------------------------------------------------------------------------------- */

/* Per-rule totals for the summary. */
typedef struct score_totals {
    int64_t n[CAPRL_EVAL_RULE_COUNT];
    double  sum[CAPRL_EVAL_RULE_COUNT];
    int64_t no_box;
} score_totals;

/* "type": a rule name (math, chart, info and aliases) or a benchmark name judged by the release's substring rule
 * (chartqa -> chart, infovqa -> info, anything else -> math). */
static int32_t rule_of(const char *type, int32_t def) {
    if (!type) {
        return def;
    }
    int32_t r = caprl_eval_rule_parse(type);
    return r >= 0 ? r : caprl_eval_rule_for_bench(type);
}

static int score_line(const char *in, long line_no, const char *line, size_t len, int32_t def_rule, bool details,
                      score_totals *t, json_t **out) {
    json_error_t jerr;
    json_t      *rec = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr);
    json_t      *pred = rec && json_is_object(rec) ? json_object_get(rec, "prediction") : NULL;
    json_t      *ans = rec && json_is_object(rec) ? json_object_get(rec, "answer") : NULL;
    json_t      *type = rec && json_is_object(rec) ? json_object_get(rec, "type") : NULL;
    const char  *why = !rec ? jerr.text
                      : !json_is_object(rec)                   ? "not a JSON object"
                      : !json_is_string(pred)                  ? "no string \"prediction\""
                      : !ans || json_is_null(ans)              ? "no \"answer\""
                      : type && !json_is_string(type)          ? "\"type\" is not a string"
                                                               : NULL;
    if (why) {
        fprintf(stderr, "caprl eval score: error: %s:%ld: %s\n", in, line_no, why);
        json_decref(rec);
        return EXIT_DATA;
    }
    char *ans_json = json_dumps(ans, JSON_ENCODE_ANY | JSON_COMPACT);
    char *gold = caprl_eval_answer_text(ans_json);
    free(ans_json);
    int32_t          rule = rule_of(type ? json_string_value(type) : NULL, def_rule);
    caprl_eval_trace tr;
    double           s = caprl_eval_score(json_string_value(pred), gold ? gold : "", rule, &tr);
    free(gold);
    json_object_set_new(rec, "score", json_real(s));
    if (details) {
        json_object_set_new(rec, "rule", json_string(caprl_eval_rule_name(rule)));
        json_object_set_new(rec, "boxed", tr.boxed_found ? json_string(tr.answer) : json_null());
        json_object_set_new(rec, "math", json_real(tr.math));
        json_object_set_new(rec, "chart", tr.chart >= 0 ? json_real(tr.chart) : json_null());
        json_object_set_new(rec, "gold_unparsed", json_boolean(tr.gold_unparsed));
    }
    t->n[rule]++;
    t->sum[rule] += s;
    t->no_box += !tr.boxed_found;
    *out = rec;
    return 0;
}

static int eval_score(int argc, char **argv) {
    static const cmd_info info = {
        "eval score", "caprl eval score --in PREDS.jsonl --out SCORES.jsonl [--type RULE] [--details]",
        "Score reader answers with the released Prism rules; writes each record with \"score\" added.",
        "Each input line is {\"prediction\": reader output, \"answer\": gold (any JSON), \"type\": rule}; other\n"
        "fields are kept. The answer is the \\boxed{...} inside </think><answer>...</answer>; \"type\" is a rule\n"
        "(math: boxed letters and numbers with math_verify equivalence; chart: also relaxed accuracy within 5%\n"
        "with x1/x0.01/x100; info: also ANLS >= 0.5) or a benchmark name (chartqa, infovqa, mmstar, ...: the\n"
        "release's choice by name). --details adds the boxed answer and each verifier's score. The output is\n"
        "written atomically; the mean score per rule goes to stderr. Rules: docs/formats.md, Prism scoring."};
    const char *in = NULL, *out = NULL, *type = "math";
    bool        details = false;
    opt_spec    specs[] = {
        {"in", OPT_STRING, &in, "records to score (JSON Lines)", 0, 0, "FILE", 'i'},
        {"out", OPT_STRING, &out, "scored records (JSON Lines)", 0, 0, "FILE", 'o'},
        {"type", OPT_STRING, &type, "rule for records without \"type\" (math, chart, info, or a benchmark name)", 0, 0,
         "RULE", 0},
        {"details", OPT_FLAG, &details, "add rule, boxed answer, math and chart scores to each record", 0, 0, NULL,
         0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!in || !out) {
        return tool_usage_error(info.name, "give --in FILE and --out FILE");
    }
    int32_t def_rule = rule_of(type, CAPRL_EVAL_RULE_MATH);
    char   *data = NULL;
    size_t  size = 0;
    if ((rc = tool_read_file(info.name, in, PRED_FILE_MAX, &data, &size))) {
        return rc;
    }
    score_totals t;
    memset(&t, 0, sizeof t);
    char  *buf = NULL;
    size_t len = 0, cap = 0;
    long   line_no = 0;
    for (size_t p = 0; p < size && rc == 0;) {
        const char *line = data + p;
        const char *nl = memchr(line, '\n', size - p);
        size_t      n = nl ? (size_t)(nl - line) : size - p;
        p += n + 1;
        line_no++;
        while (n > 0 && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t')) {
            n--;
        }
        if (n == 0) {
            continue;
        }
        json_t *rec = NULL;
        if ((rc = score_line(in, line_no, line, n, def_rule, details, &t, &rec))) {
            break;
        }
        char  *s = json_dumps(rec, JSON_PRESERVE_ORDER);
        size_t k = strlen(s);
        if (len + k + 2 > cap) {
            cap = (len + k + 2) * 2;
            buf = tool_xrealloc(buf, cap);
        }
        memcpy(buf + len, s, k);
        buf[len + k] = '\n';
        len += k + 1;
        free(s);
        json_decref(rec);
    }
    free(data);
    if (rc == 0) {
        rc = tool_write_file_atomic(info.name, out, buf ? buf : "", len);
    }
    free(buf);
    if (rc == 0) {
        int64_t total = 0;
        double  sum = 0;
        for (int r = 0; r < CAPRL_EVAL_RULE_COUNT; r++) {
            total += t.n[r];
            sum += t.sum[r];
            if (t.n[r]) {
                fprintf(stderr, "caprl eval score: %-5s %lld records, mean score %.4f\n", caprl_eval_rule_name(r),
                        (long long)t.n[r], t.sum[r] / (double)t.n[r]);
            }
        }
        fprintf(stderr, "caprl eval score: all   %lld records, mean score %.4f; %lld without a boxed answer\n",
                (long long)total, total ? sum / (double)total : 0.0, (long long)t.no_box);
    }
    return rc;
}

/* ---- dispatch ----------------------------------------------------------------------------------------------- */

typedef struct eval_sub {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} eval_sub;

static const eval_sub k_subs[] = {
    {"score", eval_score, "score reader answers with the released Prism rules (no model needed)"},
    {"prism", cmd_eval_prism, "captioner -> captions -> reader answers -> BoN / Mean, as the released Eval_CapRL.py"},
};

int cmd_eval(int argc, char **argv) {
    size_t n = sizeof k_subs / sizeof k_subs[0];
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        FILE *f = argc < 2 ? stderr : stdout;
        fprintf(f, "usage: caprl eval <subcommand> [options]   (caprl eval <subcommand> --help for its options)\n\n"
                   "Prism evaluation (spec/caprl.md 9): captions -> reader answers -> released scoring.\n\n"
                   "subcommands:\n");
        for (size_t i = 0; i < n; i++) {
            fprintf(f, "  %-10s %s\n", k_subs[i].name, k_subs[i].help);
        }
        return argc < 2 ? EXIT_USAGE : EXIT_OK;
    }
    for (size_t i = 0; i < n; i++) {
        if (strcmp(argv[1], k_subs[i].name) == 0) {
            return k_subs[i].run(argc - 1, argv + 1);
        }
    }
    fprintf(stderr, "caprl eval: error: unknown subcommand '%s' (see 'caprl eval --help')\n", argv[1]);
    return EXIT_USAGE;
}
