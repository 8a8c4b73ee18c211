/* caprl tokenize / caprl detokenize: JSON Lines in on stdin, JSON Lines out on stdout. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/tokenizer.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

#define MAX_LINE_BYTES (256u << 20)

/* --model DIR means DIR/tokenizer.json; --tokenizer FILE names the file directly. */
static int load_tokenizer(const char *cmd, const char *model_dir, const char *tok_file, caprl_tokenizer **out) {
    if (!model_dir == !tok_file) {
        return tool_usage_error(cmd, "give exactly one of --model DIR and --tokenizer FILE");
    }
    char path[4096];
    if (model_dir) {
        snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
    } else {
        snprintf(path, sizeof path, "%s", tok_file);
    }
    caprl_error  err = {0};
    caprl_status st = caprl_tokenizer_load(out, path, &err);
    return st == CAPRL_OK ? 0 : tool_fail(cmd, st, err.msg);
}

/* Reads stdin line by line; fn handles one non-empty line (1-based line number) and returns an exit code. */
static int for_each_line(const char *cmd, int (*fn)(const char *line, size_t len, long line_no, void *ud), void *ud) {
    char   *line = NULL;
    size_t  cap = 0;
    ssize_t n;
    long    line_no = 0;
    int     rc = 0;
    while (rc == 0 && (n = getline(&line, &cap, stdin)) >= 0) {
        line_no++;
        if ((size_t)n > MAX_LINE_BYTES) {
            fprintf(stderr, "caprl %s: error: stdin:%ld: line longer than %u bytes\n", cmd, line_no, MAX_LINE_BYTES);
            rc = EXIT_DATA;
            break;
        }
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) {
            line[--n] = '\0';
        }
        if (n == 0) {
            continue;
        }
        rc = fn(line, (size_t)n, line_no, ud);
    }
    free(line);
    fflush(stdout);
    return rc;
}

typedef struct tok_job {
    const caprl_tokenizer *tok;
    bool                   special;
    int32_t               *ids;
    int64_t                cap;
} tok_job;

static int tokenize_line(const char *line, size_t len, long line_no, void *ud) {
    tok_job     *job = ud;
    json_error_t jerr;
    json_t      *v = json_loadb(line, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr); /* "\u0000" is text too */
    if (!v || !json_is_string(v)) {
        fprintf(stderr, "caprl tokenize: error: stdin:%ld: expected a JSON string per line (%s)\n", line_no,
                v ? "got another JSON value" : jerr.text);
        json_decref(v);
        return EXIT_DATA;
    }
    caprl_error  err = {0};
    int64_t      n = 0;
    const char  *s = json_string_value(v);
    size_t       slen = json_string_length(v);
    caprl_status st = caprl_tokenizer_encode(job->tok, s, slen, job->special, job->ids, job->cap, &n, &err);
    if (st == CAPRL_OK && n > job->cap) {
        job->cap = n;
        job->ids = tool_xrealloc(job->ids, (size_t)n * sizeof(int32_t));
        st = caprl_tokenizer_encode(job->tok, s, slen, job->special, job->ids, job->cap, &n, &err);
    }
    json_decref(v);
    if (st != CAPRL_OK) {
        char msg[CAPRL_ERROR_MSG_CAP + 32];
        snprintf(msg, sizeof msg, "stdin:%ld: %s", line_no, err.msg);
        return tool_fail("tokenize", st, msg);
    }
    putchar('[');
    for (int64_t i = 0; i < n; i++) {
        printf(i ? ", %d" : "%d", job->ids[i]);
    }
    fputs("]\n", stdout);
    return 0;
}

int cmd_tokenize(int argc, char **argv) {
    static const cmd_info info = {"tokenize", "caprl tokenize (--model DIR | --tokenizer FILE) [--no-special] < in.jsonl",
                                  "Read JSON Lines of strings on stdin; write one JSON array of token ids per line.",
                                  "Special and added tokens written in the text (\"<|im_end|>\") become their ids, as\n"
                                  "Hugging Face does; --no-special encodes them as plain text. No BOS/EOS is added."};
    const char *model_dir = NULL, *tok_file = NULL;
    bool        special = true;
    opt_spec    specs[] = {
        {"model", OPT_STRING, &model_dir, "checkpoint directory holding tokenizer.json", 0, 0, "DIR", 0},
        {"tokenizer", OPT_STRING, &tok_file, "a tokenizer.json file", 0, 0, "FILE", 0},
        {"special", OPT_FLAG, &special, "parse special/added tokens in the text", 0, 0, NULL, 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    tok_job job = {NULL, special, NULL, 0};
    caprl_tokenizer *tok = NULL;
    if ((rc = load_tokenizer(info.name, model_dir, tok_file, &tok))) {
        return rc;
    }
    job.tok = tok;
    job.cap = 4096;
    job.ids = tool_xmalloc((size_t)job.cap * sizeof(int32_t));
    rc = for_each_line(info.name, tokenize_line, &job);
    free(job.ids);
    caprl_tokenizer_free(tok);
    return rc;
}

typedef struct detok_job {
    const caprl_tokenizer *tok;
    bool                   skip_special;
    char                  *buf;
    size_t                 cap;
    int32_t               *ids;
    size_t                 ids_cap;
} detok_job;

static int detokenize_line(const char *line, size_t len, long line_no, void *ud) {
    detok_job   *job = ud;
    json_error_t jerr;
    json_t      *v = json_loadb(line, len, JSON_DECODE_ANY, &jerr);
    if (!v || !json_is_array(v)) {
        fprintf(stderr, "caprl detokenize: error: stdin:%ld: expected a JSON array of ids per line (%s)\n", line_no,
                v ? "got another JSON value" : jerr.text);
        json_decref(v);
        return EXIT_DATA;
    }
    size_t n = json_array_size(v);
    if (n > job->ids_cap) {
        job->ids_cap = n;
        job->ids = tool_xrealloc(job->ids, n * sizeof(int32_t));
    }
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(v, i);
        if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) > INT32_MAX) {
            fprintf(stderr, "caprl detokenize: error: stdin:%ld: element %zu is not a token id\n", line_no, i);
            json_decref(v);
            return EXIT_DATA;
        }
        job->ids[i] = (int32_t)json_integer_value(e);
    }
    json_decref(v);
    caprl_error  err = {0};
    size_t       out_len = 0;
    caprl_status st;
    while ((st = caprl_tokenizer_decode(job->tok, job->ids, (int64_t)n, job->skip_special, job->buf, job->cap,
                                        &out_len, &err)) == CAPRL_OK &&
           out_len >= job->cap) {
        job->cap = out_len + 1;
        job->buf = tool_xrealloc(job->buf, job->cap);
    }
    if (st != CAPRL_OK) {
        char msg[CAPRL_ERROR_MSG_CAP + 32];
        snprintf(msg, sizeof msg, "stdin:%ld: %s", line_no, err.msg);
        return tool_fail("detokenize", st, msg);
    }
    json_t *s = json_stringn(job->buf, out_len);
    char   *dumped = s ? json_dumps(s, JSON_ENCODE_ANY) : NULL;
    if (!dumped) {
        json_decref(s);
        fprintf(stderr, "caprl detokenize: error: stdin:%ld: cannot encode the text as JSON\n", line_no);
        return EXIT_DATA;
    }
    fputs(dumped, stdout);
    fputc('\n', stdout);
    free(dumped);
    json_decref(s);
    return 0;
}

int cmd_detokenize(int argc, char **argv) {
    static const cmd_info info = {
        "detokenize", "caprl detokenize (--model DIR | --tokenizer FILE) [--skip-special] < ids.jsonl",
        "Read JSON Lines of id arrays on stdin; write one JSON string per line.",
        "Byte sequences that are not valid UTF-8 become U+FFFD, as Hugging Face's decode does."};
    const char *model_dir = NULL, *tok_file = NULL;
    bool        skip_special = false;
    opt_spec    specs[] = {
        {"model", OPT_STRING, &model_dir, "checkpoint directory holding tokenizer.json", 0, 0, "DIR", 0},
        {"tokenizer", OPT_STRING, &tok_file, "a tokenizer.json file", 0, 0, "FILE", 0},
        {"skip-special", OPT_FLAG, &skip_special, "drop special tokens from the text", 0, 0, NULL, 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    caprl_tokenizer *tok = NULL;
    if ((rc = load_tokenizer(info.name, model_dir, tok_file, &tok))) {
        return rc;
    }
    detok_job job = {tok, skip_special, tool_xmalloc(4096), 4096, NULL, 0};
    rc = for_each_line(info.name, detokenize_line, &job);
    free(job.buf);
    free(job.ids);
    caprl_tokenizer_free(tok);
    return rc;
}
