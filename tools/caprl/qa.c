/* caprl qa: the QA curation pipeline (spec/caprl.md §7), one subcommand per stage:
 *   generate  images -> raw generator outputs (raw.jsonl)          tools/caprl/qa_generate.c
 *   parse     raw.jsonl -> caprl QA records (qa.jsonl)             here
 *   filter    qa.jsonl -> visually dependent questions only         tools/caprl/qa_filter.c
 * Each stage is one function with the usual (argc, argv) signature (argv[0] is the stage's name) and one row of
 * k_stages below; stages in other files are declared in subcommands.h. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/qa.h"
#include "commands.h"
#include "common.h"
#include "opts.h"
#include "subcommands.h"

#define RAW_FILE_MAX ((size_t)16 << 30)

/* ---- caprl qa parse ------------------------------------------------------------------------------------------ */

typedef struct parse_totals {
    int64_t responses, bad_records, images_kept, images_empty, questions;
    int64_t drops[CAPRL_QA_DROP_COUNT];
} parse_totals;

/* Appends one compact JSON line to buf; frees v. */
static void append_json_line(char **buf, size_t *len, size_t *cap, json_t *v) {
    char  *s = json_dumps(v, JSON_ENSURE_ASCII | JSON_PRESERVE_ORDER);
    size_t n = strlen(s);
    if (*len + n + 2 > *cap) {
        *cap = (*len + n + 2) * 2;
        *buf = tool_xrealloc(*buf, *cap);
    }
    memcpy(*buf + *len, s, n);
    (*buf)[*len + n] = '\n';
    *len += n + 1;
    (*buf)[*len] = '\0';
    free(s);
    json_decref(v);
}

/* The raw record's fields: caprl's {"id", "image", "response"} or gen_qa.py's {"image_path", "qa_response"}.
 * A string field, or NULL if absent or not a string. */
static json_t *field(json_t *rec, const char *a, const char *b) {
    json_t *v = json_object_get(rec, a);
    if (!v && b) {
        v = json_object_get(rec, b);
    }
    return json_is_string(v) ? v : NULL;
}

/* A path or id: a string without NUL characters. */
static const char *plain_str(json_t *v) {
    return v && strlen(json_string_value(v)) == json_string_length(v) ? json_string_value(v) : NULL;
}

typedef struct parse_job {
    caprl_qa_parse_params params;
    bool                  skip_bad;
    const char           *in;
    char                 *raw_dir;  /* folder of the raw file, against which its relative image paths resolve */
    bool                  same_dir; /* the output sits in that folder: relative paths stay as written */
    char                 *out, *report;
    size_t                out_len, out_cap, report_len, report_cap;
    bool                  want_report;
    parse_totals          t;
} parse_job;

/* One raw line; returns an exit code (0 = go on). */
static int parse_line(parse_job *job, const char *line, size_t len, long line_no) {
    json_error_t jerr;
    /* A response may hold NUL characters (the parser drops the items they touch); paths and ids may not. */
    json_t      *rec = json_loadb(line, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    bool         obj = rec && json_is_object(rec);
    const char  *image = obj ? plain_str(field(rec, "image", "image_path")) : NULL;
    json_t      *resp = obj ? field(rec, "response", "qa_response") : NULL;
    const char  *id = obj ? plain_str(field(rec, "id", NULL)) : NULL;
    if (!image || !resp) {
        char why[256];
        snprintf(why, sizeof why, "%s", !rec ? jerr.text : !obj ? "not a JSON object"
                                        : !image ? "no string \"image\" (without NUL)"
                                                 : "no string \"response\"");
        json_decref(rec);
        if (!job->skip_bad) {
            fprintf(stderr, "caprl qa parse: error: %s:%ld: %s (--skip-bad skips such records)\n", job->in, line_no,
                    why);
            return EXIT_DATA;
        }
        job->t.bad_records++;
        if (job->want_report) {
            append_json_line(&job->report, &job->report_len, &job->report_cap,
                             json_pack("{s:i, s:s, s:s}", "line", (json_int_t)line_no, "reason", "bad_record", "error",
                                       why));
        }
        return 0;
    }
    char id_buf[32];
    if (!id && json_is_integer(json_object_get(rec, "id"))) {
        snprintf(id_buf, sizeof id_buf, "%" JSON_INTEGER_FORMAT, json_integer_value(json_object_get(rec, "id")));
        id = id_buf;
    }
    id = id ? id : image;
    job->t.responses++;
    caprl_qa_parse_result r;
    caprl_error           err = {0};
    caprl_status          st = caprl_qa_parse_response(json_string_value(resp), json_string_length(resp), &job->params,
                                                       &r, &err);
    if (st != CAPRL_OK) {
        json_decref(rec);
        return tool_fail("qa parse", st, err.msg);
    }
    for (int32_t i = 0; i < r.n_drops; i++) {
        job->t.drops[r.drops[i].reason]++;
        if (job->want_report) {
            append_json_line(&job->report, &job->report_len, &job->report_cap,
                             json_pack("{s:s, s:s, s:i, s:i, s:i, s:s}", "id", id, "image", image, "line",
                                       (json_int_t)line_no, "item_line", (json_int_t)r.drops[i].line, "number",
                                       (json_int_t)r.drops[i].number, "reason",
                                       caprl_qa_drop_reason_name(r.drops[i].reason)));
        }
    }
    if (r.n_items == 0) {
        job->t.images_empty++;
    } else {
        json_t *qa = json_array();
        for (int32_t i = 0; i < r.n_items; i++) {
            char gold[2] = {r.items[i].gold, '\0'};
            json_array_append_new(qa, json_pack("{s:s, s:s}", "question", r.items[i].question, "answer", gold));
        }
        /* a relative path is kept when the QA file sits beside the raw one, else made absolute, so that the QA
         * loaders (which resolve against the QA file's folder) still find the image */
        char *abs = NULL;
        if (image[0] != '/' && !job->same_dir && job->raw_dir) {
            char *joined = tool_path_join(job->raw_dir, image);
            abs = tool_absolute(joined);
            free(joined);
        }
        append_json_line(&job->out, &job->out_len, &job->out_cap,
                         json_pack("{s:s, s:s, s:o}", "id", id, "image", abs ? abs : image, "qa", qa));
        free(abs);
        job->t.images_kept++;
        job->t.questions += r.n_items;
    }
    caprl_qa_parse_result_free(&r);
    json_decref(rec);
    return 0;
}

static void print_parse_summary(const parse_job *job) {
    const parse_totals *t = &job->t;
    int64_t             dropped = 0;
    for (int i = 0; i < CAPRL_QA_DROP_COUNT; i++) {
        dropped += t->drops[i];
    }
    fprintf(stderr, "caprl qa parse: %lld responses -> %lld questions for %lld images; %lld images left without a "
                    "question; %lld items dropped",
            (long long)t->responses, (long long)t->questions, (long long)t->images_kept, (long long)t->images_empty,
            (long long)dropped);
    const char *sep = dropped ? " (" : "";
    for (int i = 0; i < CAPRL_QA_DROP_COUNT; i++) {
        if (t->drops[i]) {
            fprintf(stderr, "%s%s %lld", sep, caprl_qa_drop_reason_name(i), (long long)t->drops[i]);
            sep = ", ";
        }
    }
    fprintf(stderr, "%s", dropped ? ")" : "");
    if (t->bad_records) {
        fprintf(stderr, "; %lld malformed records skipped", (long long)t->bad_records);
    }
    fprintf(stderr, "\n");
}

static int qa_parse(int argc, char **argv) {
    static const cmd_info info = {
        "qa parse", "caprl qa parse RAW.jsonl --out QA.jsonl [--report FILE] [options]",
        "Extract multiple-choice questions from QA-generator outputs into caprl QA records.",
        "RAW.jsonl has one {\"id\", \"image\", \"response\"} object per line (gen_qa.py's {\"image_path\",\n"
        "\"qa_response\"} is read too). Each response is parsed in the \"#### n. **Question**\" / \"   - A) ...\" /\n"
        "\"**Answer:** X) ...\" format (spec/caprl.md 7.2), tolerating CRLF, missing bold or ####, \"A.\" options\n"
        "and stray text; items that cannot become an unambiguous question are dropped and counted by reason.\n"
        "Images left without a question are not written. The summary goes to stderr; --report lists every\n"
        "dropped item as JSON Lines. Both outputs are written atomically. docs/formats.md describes the files."};
    const char *out = NULL, *report = NULL;
    int32_t     max_options = 4;
    int64_t     max_bytes = 4096;
    bool        append_cannot = false, skip_bad = false;
    opt_spec    specs[] = {
        {"out", OPT_STRING, &out, "QA records to write (caprl QA JSONL)", 0, 0, "FILE", 'o'},
        {"report", OPT_STRING, &report, "write every dropped item (and skipped record) here as JSON Lines", 0, 0,
         "FILE", 0},
        {"max-options", OPT_INT, &max_options, "drop questions with more options than this", 2, 6, NULL, 0},
        {"max-question-bytes", OPT_I64, &max_bytes, "drop question strings longer than this", 1, 1e9, NULL, 0},
        {"append-cannot-answer", OPT_FLAG, &append_cannot,
         "end questions with \"E) Can not answer based on the caption\" (F after five options) as the released data did",
         0, 0, NULL, 0},
        {"skip-bad", OPT_FLAG, &skip_bad, "skip (and count) malformed input records instead of failing", 0, 0, NULL,
         0},
        {0},
    };
    const char *pos[1];
    int         npos = 0;
    int         rc = opts_parse(&info, specs, argc, argv, pos, 1, &npos);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (npos != 1 || !out) {
        return tool_usage_error(info.name, "give the raw file and --out FILE");
    }
    parse_job job;
    memset(&job, 0, sizeof job);
    job.params = caprl_qa_parse_default_params();
    job.params.max_options = max_options;
    job.params.max_question_bytes = max_bytes;
    job.params.append_cannot_answer = append_cannot;
    job.skip_bad = skip_bad;
    job.in = pos[0];
    job.raw_dir = tool_folder_of(pos[0]);
    char *out_dir = tool_folder_of(out);
    job.same_dir = job.raw_dir && out_dir && strcmp(job.raw_dir, out_dir) == 0;
    free(out_dir);
    job.want_report = report != NULL;
    char  *data = NULL;
    size_t size = 0;
    if ((rc = tool_read_file(info.name, pos[0], RAW_FILE_MAX, &data, &size))) {
        free(job.raw_dir);
        return rc;
    }
    long line_no = 0;
    for (size_t p = 0; p < size && rc == 0;) {
        const char *line = data + p;
        const char *nl = memchr(line, '\n', size - p);
        size_t      len = nl ? (size_t)(nl - line) : size - p;
        p += len + 1;
        line_no++;
        while (len > 0 && (line[len - 1] == '\r' || line[len - 1] == ' ' || line[len - 1] == '\t')) {
            len--;
        }
        if (len == 0) {
            continue;
        }
        rc = parse_line(&job, line, len, line_no);
    }
    free(data);
    if (rc == 0) {
        rc = tool_write_file_atomic(info.name, out, job.out ? job.out : "", job.out_len);
    }
    if (rc == 0 && report) {
        rc = tool_write_file_atomic(info.name, report, job.report ? job.report : "", job.report_len);
    }
    if (rc == 0) {
        print_parse_summary(&job);
    }
    free(job.out);
    free(job.report);
    free(job.raw_dir);
    return rc;
}

/* ---- dispatch ----------------------------------------------------------------------------------------------- */

typedef struct qa_stage {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} qa_stage;

static const qa_stage k_stages[] = {
    {"generate", cmd_qa_generate, "a VLM writes five multiple-choice questions per image (raw JSON Lines)"},
    {"parse", qa_parse, "raw QA-generator outputs -> caprl QA records, malformed items dropped by reason"},
    {"filter", cmd_qa_filter, "keep the questions answered with the image and not without it"},
};

int cmd_qa(int argc, char **argv) {
    size_t n = sizeof k_stages / sizeof k_stages[0];
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        FILE *f = argc < 2 ? stderr : stdout;
        fprintf(f, "usage: caprl qa <stage> [options]   (caprl qa <stage> --help for its options)\n\n"
                   "QA curation (spec/caprl.md 7): images -> questions -> filtered QA records.\n\nstages:\n");
        for (size_t i = 0; i < n; i++) {
            fprintf(f, "  %-10s %s\n", k_stages[i].name, k_stages[i].help);
        }
        return argc < 2 ? EXIT_USAGE : EXIT_OK;
    }
    for (size_t i = 0; i < n; i++) {
        if (strcmp(argv[1], k_stages[i].name) == 0) {
            return k_stages[i].run(argc - 1, argv + 1);
        }
    }
    fprintf(stderr, "caprl qa: error: unknown stage '%s' (see 'caprl qa --help')\n", argv[1]);
    return EXIT_USAGE;
}
