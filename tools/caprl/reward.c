/* caprl reward: score captions with the CapRL reward (caprl/reward.h). Captions come as JSON Lines ({"id" or
 * "image", "caption" or "captions"}, the output of caprl caption included) and are matched to the QA records of
 * the same image; every caption gets one output line with its reward and the questions the reader saw. */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/qa.h"
#include "caprl/reward.h"
#include "caprl/tokenizer.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

#define MAX_LINE_BYTES ((size_t)1 << 28)

/* One caption to score, with where it came from. */
typedef struct job {
    const caprl_qa_image *qa;
    char                 *key;     /* the record's "id" (as text) or "image" */
    json_t               *id;      /* the record's "id" value, or NULL */
    char                 *image;   /* the record's "image", or NULL */
    char                 *caption;
    int32_t               index;   /* position in "captions" (0 for "caption") */
    int32_t               tokens;  /* policy tokens, -1 unknown */
    int64_t               line;
    uint64_t              stream;
} job;

typedef struct job_list {
    job    *jobs;
    int64_t n, cap;
    int64_t n_records, n_error_records, n_bad;
} job_list;

static void jobs_free(job_list *l) {
    for (int64_t i = 0; i < l->n; i++) {
        free(l->jobs[i].key);
        free(l->jobs[i].image);
        free(l->jobs[i].caption);
        json_decref(l->jobs[i].id);
    }
    free(l->jobs);
}

/* FNV-1a: the stream of a caption is a function of its record's key and its index, so it does not depend on the
 * order of the file or on batching. */
static uint64_t key_stream(const char *key, int32_t index) {
    uint64_t h = 1469598103934665603ull;
    for (const unsigned char *p = (const unsigned char *)key; *p; p++) {
        h = (h ^ *p) * 1099511628211ull;
    }
    return (h ^ (uint64_t)index * 0x9E3779B97F4A7C15ull) & ((1ull << 44) - 1);
}

/* ---- matching captions to QA records ----------------------------------------------------------------------- */

typedef struct qa_index {
    const caprl_qa_image **by_id;  /* sorted by id */
    const caprl_qa_image **by_raw; /* sorted by image_raw */
    int64_t                n;
} qa_index;

static int cmp_id(const void *a, const void *b) {
    return strcmp((*(const caprl_qa_image *const *)a)->id, (*(const caprl_qa_image *const *)b)->id);
}

static int cmp_raw(const void *a, const void *b) {
    return strcmp((*(const caprl_qa_image *const *)a)->image_raw, (*(const caprl_qa_image *const *)b)->image_raw);
}

static void index_build(qa_index *ix, const caprl_qa_set *set) {
    ix->n = set->n_images;
    ix->by_id = tool_xmalloc((size_t)(set->n_images ? set->n_images : 1) * sizeof *ix->by_id);
    ix->by_raw = tool_xmalloc((size_t)(set->n_images ? set->n_images : 1) * sizeof *ix->by_raw);
    for (int64_t i = 0; i < set->n_images; i++) {
        ix->by_id[i] = &set->images[i];
        ix->by_raw[i] = &set->images[i];
    }
    qsort(ix->by_id, (size_t)ix->n, sizeof *ix->by_id, cmp_id);
    qsort(ix->by_raw, (size_t)ix->n, sizeof *ix->by_raw, cmp_raw);
}

static const caprl_qa_image *find_by(const caprl_qa_image **arr, int64_t n, const char *key, bool raw) {
    caprl_qa_image probe;
    memset(&probe, 0, sizeof probe);
    probe.id = (char *)(uintptr_t)key;
    probe.image_raw = (char *)(uintptr_t)key;
    const caprl_qa_image  *pp = &probe;
    const caprl_qa_image **hit = bsearch(&pp, arr, (size_t)n, sizeof *arr, raw ? cmp_raw : cmp_id);
    return hit ? *hit : NULL;
}

/* The QA record of a captions record: by "id" if it has one, else by "image" against the QA records' image paths
 * as written, then against their resolved paths (the caption's path resolved against its own file's folder). */
static const caprl_qa_image *match(const qa_index *ix, const caprl_qa_set *set, const char *id, const char *image,
                                   const char *captions_dir) {
    if (id) {
        return find_by(ix->by_id, ix->n, id, false);
    }
    const caprl_qa_image *q = find_by(ix->by_raw, ix->n, image, true);
    if (q) {
        return q;
    }
    char resolved[8192];
    if (image[0] == '/' || !captions_dir) {
        snprintf(resolved, sizeof resolved, "%s", image);
    } else {
        snprintf(resolved, sizeof resolved, "%s/%s", captions_dir, image);
    }
    for (int64_t i = 0; i < set->n_images; i++) {
        if (strcmp(set->images[i].image, resolved) == 0) {
            return &set->images[i];
        }
    }
    return find_by(ix->by_id, ix->n, image, false); /* released records use the path as their id */
}

/* ---- reading the captions file ----------------------------------------------------------------------------- */

static void push_job(job_list *l, job j) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->jobs = tool_xrealloc(l->jobs, (size_t)l->cap * sizeof *l->jobs);
    }
    l->jobs[l->n++] = j;
}

/* Checks one captions record and appends its captions; returns false with msg set if it is malformed. */
static bool parse_record(const char *text, size_t n, int64_t line, const qa_index *ix, const caprl_qa_set *set,
                         const char *dir, const caprl_tokenizer *count_tok, job_list *l, char *msg, size_t cap) {
    json_error_t jerr;
    json_t      *rec = json_loadb(text, n, JSON_REJECT_DUPLICATES, &jerr);
    if (!rec || !json_is_object(rec)) {
        snprintf(msg, cap, "not a JSON object%s%s", rec ? "" : ": ", rec ? "" : jerr.text);
        json_decref(rec);
        return false;
    }
    json_t *jid = json_object_get(rec, "id"), *jimg = json_object_get(rec, "image");
    json_t *jcap = json_object_get(rec, "caption"), *jcaps = json_object_get(rec, "captions");
    json_t *jtok = json_object_get(rec, "tokens");
    char    idbuf[32];
    const char *id = NULL, *image = json_is_string(jimg) ? json_string_value(jimg) : NULL;
    bool ok = true;
    if (json_is_string(jid)) {
        id = json_string_value(jid);
    } else if (json_is_integer(jid)) {
        snprintf(idbuf, sizeof idbuf, "%lld", (long long)json_integer_value(jid));
        id = idbuf;
    } else if (jid && !json_is_null(jid)) {
        snprintf(msg, cap, "field 'id' must be a string or an integer");
        ok = false;
    }
    if (ok && !id && !image) {
        snprintf(msg, cap, "needs an \"id\" or an \"image\" string to find its questions");
        ok = false;
    }
    if (ok && json_object_get(rec, "error") && !jcap && !jcaps) { /* caprl caption's record of a failed image */
        l->n_error_records++;
        json_decref(rec);
        return true;
    }
    size_t n_caps = json_is_array(jcaps) ? json_array_size(jcaps) : 1;
    if (ok && !(json_is_string(jcap) && !jcaps) && !(json_is_array(jcaps) && !jcap)) {
        snprintf(msg, cap, "needs either a \"caption\" string or a \"captions\" array of strings");
        ok = false;
    }
    for (size_t k = 0; ok && jcaps && k < n_caps; k++) {
        if (!json_is_string(json_array_get(jcaps, k))) {
            snprintf(msg, cap, "captions[%zu] is not a string", k);
            ok = false;
        }
    }
    if (ok && jtok && !(json_is_integer(jtok) && !jcaps) &&
        !(json_is_array(jtok) && json_array_size(jtok) == n_caps)) {
        snprintf(msg, cap, "field 'tokens' must be an integer per caption (an array as long as \"captions\")");
        ok = false;
    }
    const caprl_qa_image *qa = ok ? match(ix, set, id, image, dir) : NULL;
    if (ok && !qa) {
        snprintf(msg, cap, "no QA record for %s '%s'", id ? "id" : "image", id ? id : image);
        ok = false;
    }
    for (size_t k = 0; ok && k < n_caps; k++) {
        const json_t *c = jcaps ? json_array_get(jcaps, k) : jcap;
        if (strlen(json_string_value(c)) != json_string_length(c)) {
            snprintf(msg, cap, "caption %zu contains a NUL character", k);
            ok = false;
            break;
        }
        job j;
        memset(&j, 0, sizeof j);
        j.qa = qa;
        j.key = tool_xstrdup(id ? id : image);
        j.id = jid && !json_is_null(jid) ? json_incref(jid) : NULL;
        j.image = image ? tool_xstrdup(image) : NULL;
        j.caption = tool_xstrdup(json_string_value(c));
        j.index = (int32_t)k;
        j.line = line;
        j.stream = key_stream(j.key, j.index);
        const json_t *t = jtok ? (jcaps ? json_array_get(jtok, k) : jtok) : NULL;
        j.tokens = -1;
        if (t && json_is_integer(t) && json_integer_value(t) >= 0 && json_integer_value(t) <= INT32_MAX) {
            j.tokens = (int32_t)json_integer_value(t);
        } else if (count_tok) {
            int64_t     nt = 0;
            caprl_error err = {0};
            if (caprl_tokenizer_encode(count_tok, j.caption, strlen(j.caption), false, NULL, 0, &nt, &err) !=
                CAPRL_OK) {
                snprintf(msg, cap, "caption %zu: %s", k, err.msg);
                ok = false;
            }
            j.tokens = (int32_t)(nt > INT32_MAX ? INT32_MAX : nt);
        }
        push_job(l, j);
    }
    json_decref(rec);
    return ok;
}

/* Reads every record; malformed ones (file:line) stop the run unless skip_bad, which reports and skips them. */
static int read_captions(const char *path, const qa_index *ix, const caprl_qa_set *set,
                         const caprl_tokenizer *count_tok, bool skip_bad, job_list *l) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "caprl reward: error: %s: cannot open: %s\n", path, strerror(errno));
        return EXIT_DATA;
    }
    char  dir[4096];
    const char *slash = strrchr(path, '/');
    snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - path) : 1, slash ? path : ".");
    char   *line = NULL;
    size_t  line_cap = 0;
    ssize_t got;
    int64_t line_no = 0;
    int     rc = 0;
    while (rc == 0 && (got = getline(&line, &line_cap, f)) >= 0) {
        line_no++;
        size_t n = (size_t)got;
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) {
            n--;
        }
        size_t first = 0;
        while (first < n && (line[first] == ' ' || line[first] == '\t')) {
            first++;
        }
        if (first == n) {
            continue;
        }
        char    msg[600];
        int64_t before = l->n;
        bool    ok = n <= MAX_LINE_BYTES && parse_record(line, n, line_no, ix, set, dir, count_tok, l, msg, sizeof msg);
        if (n > MAX_LINE_BYTES) {
            snprintf(msg, sizeof msg, "line longer than %zu bytes", MAX_LINE_BYTES);
        }
        if (ok) {
            l->n_records++;
            continue;
        }
        while (l->n > before) { /* drop the captions of a record that failed half way */
            job *j = &l->jobs[--l->n];
            free(j->key);
            free(j->image);
            free(j->caption);
            json_decref(j->id);
        }
        if (!skip_bad) {
            fprintf(stderr, "caprl reward: error: %s:%lld: %s (--skip-bad skips such records)\n", path,
                    (long long)line_no, msg);
            rc = EXIT_DATA;
        } else {
            if (l->n_bad < 20) {
                fprintf(stderr, "caprl reward: warning: %s:%lld: %s: skipped\n", path, (long long)line_no, msg);
            }
            l->n_bad++;
        }
    }
    if (rc == 0 && ferror(f)) {
        fprintf(stderr, "caprl reward: error: %s: read failed: %s\n", path, strerror(errno));
        rc = EXIT_DATA;
    }
    free(line);
    fclose(f);
    return rc;
}

/* ---- output ------------------------------------------------------------------------------------------------ */

typedef struct out_buf {
    char  *p;
    size_t n, cap;
} out_buf;

static void out_add(out_buf *o, const char *s, size_t n) {
    if (o->n + n + 1 > o->cap) {
        o->cap = o->cap ? o->cap : 1 << 16;
        while (o->n + n + 1 > o->cap) {
            o->cap *= 2;
        }
        o->p = tool_xrealloc(o->p, o->cap);
    }
    memcpy(o->p + o->n, s, n);
    o->n += n;
    o->p[o->n] = '\0';
}

static json_t *letter_json(char c) {
    char s[2] = {c, '\0'};
    return c ? json_string(s) : json_null();
}

static void add_record(out_buf *o, const job *j, const caprl_reward_result *r, const caprl_reward_params *p) {
    json_t *rec = json_object();
    if (j->id) {
        json_object_set(rec, "id", j->id);
    }
    if (j->image) {
        json_object_set_new(rec, "image", json_string(j->image));
    }
    json_object_set_new(rec, "caption_index", json_integer(j->index));
    json_object_set_new(rec, "reward", json_real((double)r->reward));
    json_object_set_new(rec, "accuracy", json_real((double)r->accuracy));
    if (p->length_weight > 0) {
        json_object_set_new(rec, "length_term", json_real((double)r->length));
        json_object_set_new(rec, "caption_tokens", json_integer(j->tokens));
    }
    json_object_set_new(rec, "mode", json_string(caprl_reward_mode_name(p->mode)));
    json_object_set_new(rec, p->mode == CAPRL_REWARD_EXPECTED ? "tau" : "temperature",
                        json_real(tool_typed_float(p->mode == CAPRL_REWARD_EXPECTED ? p->tau : p->temperature)));
    json_object_set_new(rec, "reader_tokens", json_integer(r->reader_tokens));
    json_t *qs = json_array();
    for (int32_t k = 0; k < r->n_questions; k++) {
        const caprl_reward_question *q = &r->questions[k];
        json_t *jq = json_object();
        json_object_set_new(jq, "qa_index", json_integer(q->qa_index));
        json_object_set_new(jq, "question", json_string(q->text));
        json_object_set_new(jq, "gold", letter_json(q->gold));
        json_object_set_new(jq, "shuffled", json_boolean(q->shuffled));
        if (p->mode == CAPRL_REWARD_EXPECTED) {
            json_object_set_new(jq, "p_gold", json_real((double)q->p_gold));
        } else {
            json_object_set_new(jq, "continuation", json_string(q->continuation ? q->continuation : ""));
            json_object_set_new(jq, "answer", letter_json(q->answer));
        }
        json_object_set_new(jq, "score", json_real((double)q->score));
        json_array_append_new(qs, jq);
    }
    json_object_set_new(rec, "questions", qs);
    char *s = json_dumps(rec, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(rec);
    if (s) {
        out_add(o, s, strlen(s));
        out_add(o, "\n", 1);
        free(s);
    }
}

/* A bar redrawn in place on a terminal; a plain line every 10 s otherwise. */
static void progress(int64_t done, int64_t total, int64_t questions, double t0, double *last, bool tty, bool fin) {
    double now = tool_now(), el = now - t0;
    if (!fin && now - *last < (tty ? 0.2 : 10.0)) {
        return;
    }
    *last = now;
    double qps = el > 0 ? (double)questions / el : 0;
    double eta = done > 0 ? el * (double)(total - done) / (double)done : 0;
    if (tty) {
        int  width = 30, fill = total ? (int)(width * done / total) : width;
        char bar[32];
        for (int i = 0; i < width; i++) {
            bar[i] = i < fill ? '#' : '.';
        }
        bar[width] = '\0';
        fprintf(stderr, "\r[%s] %lld/%lld captions  %.2f questions/s  ETA %dm%02ds\033[K%s", bar, (long long)done,
                (long long)total, qps, (int)(eta / 60), (int)eta % 60, fin ? "\n" : "");
    } else if (!fin) {
        fprintf(stderr, "caprl reward: %lld/%lld captions, %.2f questions/s, ETA %.0f s\n", (long long)done,
                (long long)total, qps, eta);
    }
}

static int read_template(const char *path, char **out) {
    char  *data = NULL;
    size_t len = 0;
    int    rc = tool_read_file("reward", path, 1 << 24, &data, &len);
    if (rc) {
        return rc;
    }
    caprl_error err = {0};
    if (caprl_reader_template_check(data, len, &err) != CAPRL_OK) {
        fprintf(stderr, "caprl reward: error: %s: %s\n", path, err.msg);
        free(data);
        return EXIT_DATA;
    }
    *out = data;
    return 0;
}

int cmd_reward(int argc, char **argv) {
    static const cmd_info info = {
        "reward",
        "caprl reward --reader DIR --qa qa.jsonl --captions captions.jsonl --out rewards.jsonl [--mode sample|expected]"
        " [options]",
        "Score captions with the CapRL reward: a text-only reader answers each image's multiple-choice questions from\n"
        "the caption alone; the reward is the mean score over --n-questions questions drawn with replacement.",
        "Captions: JSON Lines with \"id\" or \"image\" (matched to the QA file's \"id\", else its image paths) and a\n"
        "\"caption\" string or a \"captions\" array (caprl caption's output; its error records are skipped); an\n"
        "optional \"tokens\" (per caption) gives policy-token counts for the length term, else --tokenizer counts.\n"
        "Output: one line per caption, {id, image, caption_index, reward, accuracy, mode, tau|temperature,\n"
        "reader_tokens, questions: [{qa_index, question (as shown), gold, shuffled, p_gold | continuation and\n"
        "answer, score}]}, written atomically when all are scored.\n"
        "sample: the reader continues after \"The answer is\" at --temperature for up to --max-new-tokens tokens;\n"
        "the first A-I character is its answer (score 1 or 0). expected: the score is softmax(logits / tau) of the\n"
        "token \" <gold>\" (no sampling). The questions of a caption depend only on --seed and the caption's\n"
        "record key (id or image) and index, not on the file order, --batch or --threads. See docs/reward.md."};
    const char *reader_dir = NULL, *qa_path = NULL, *cap_path = NULL, *out_path = NULL, *mode = "sample";
    const char *tmpl_path = NULL, *tok_path = NULL;
    int32_t     n_q = 8, batch = 4, threads = 0, max_new = 10, l1 = 2048, l2 = 3072;
    float       tau = 0.6f, temperature = 0.6f, lw = 0.0f;
    int64_t     seed = 0;
    bool        shuffle = true, skip_bad = false, prefix_cache = true;
    opt_spec    specs[] = {
        {"reader", OPT_STRING, &reader_dir, "text-only reader checkpoint (Qwen2 / Qwen2.5) with tokenizer.json", 0,
         0, "DIR", 0},
        {"qa", OPT_STRING, &qa_path, "QA JSON Lines (caprl's format or released CapRL records)", 0, 0, "FILE", 0},
        {"captions", OPT_STRING, &cap_path, "captions JSON Lines", 0, 0, "FILE", 0},
        {"out", OPT_STRING, &out_path, "output JSON Lines", 0, 0, "FILE", 0},
        {"mode", OPT_STRING, &mode, "sample (released reward) or expected (p(gold), no sampling)", 0, 0,
         "sample|expected", 0},
        {"n-questions", OPT_INT, &n_q, "questions drawn per caption, with replacement", 1, 65536, "N", 0},
        {"shuffle", OPT_FLAG, &shuffle, "shuffle and relabel options, append \"F) Can not answer\"", 0, 0, NULL, 0},
        {"tau", OPT_FLOAT, &tau, "expected mode: softmax temperature", 1e-3, 100, "T", 0},
        {"temperature", OPT_FLOAT, &temperature, "sample mode: sampling temperature", 1e-3, 100, "T", 0},
        {"max-new-tokens", OPT_INT, &max_new, "sample mode: continuation length", 1, 4096, "N", 0},
        {"seed", OPT_I64, &seed, "seed of question draws, shuffles and samples", 0, 9.2e18, "S", 0},
        {"reader-template", OPT_STRING, &tmpl_path, "file replacing the reader prompt (two {}: caption, question)", 0,
         0, "FILE", 0},
        {"skip-bad", OPT_FLAG, &skip_bad, "skip malformed QA and caption records (reported) instead of stopping", 0,
         0, NULL, 0},
        {"batch", OPT_INT, &batch, "captions scored together", 1, 4096, "N", 0},
        {"prefix-cache", OPT_FLAG, &prefix_cache, "share the prompt prefixes' KV caches (off: full prompts)", 0, 0,
         NULL, 0},
        {"length-weight", OPT_FLOAT, &lw, "CapRL++ length term weight (0 = off; CapRL++ uses 0.2)", 0, 100, "W", 0},
        {"length-l1", OPT_INT, &l1, "length term: full up to this many policy tokens", 0, 1 << 30, "N", 0},
        {"length-l2", OPT_INT, &l2, "length term: zero from this many policy tokens", 1, 1 << 30, "N", 0},
        {"tokenizer", OPT_STRING, &tok_path, "policy tokenizer.json to count caption tokens without \"tokens\"", 0,
         0, "FILE", 0},
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!reader_dir || !qa_path || !cap_path || !out_path) {
        return tool_usage_error(info.name, "--reader, --qa, --captions and --out are required");
    }
    caprl_reward_params p = caprl_reward_default_params();
    p.mode = caprl_reward_mode_parse(mode);
    if (p.mode < 0) {
        return tool_usage_error(info.name, "--mode must be sample or expected, got '%s'", mode);
    }
    p.n_questions = n_q;
    p.shuffle = shuffle;
    p.tau = tau;
    p.temperature = temperature;
    p.max_new_tokens = max_new;
    p.seed = (uint64_t)seed;
    p.length_weight = lw;
    p.length_l1 = l1;
    p.length_l2 = l2;
    p.prefix_cache = prefix_cache;
    caprl_error  err = {0};
    caprl_status st = caprl_reward_params_check(&p, &err);
    if (st != CAPRL_OK) {
        return tool_fail(info.name, st, err.msg);
    }
    char *tmpl = NULL;
    if (tmpl_path && (rc = read_template(tmpl_path, &tmpl)) != 0) {
        return rc;
    }
    caprl_tokenizer *count_tok = NULL;
    if (tok_path && (st = caprl_tokenizer_load(&count_tok, tok_path, &err)) != CAPRL_OK) {
        free(tmpl);
        return tool_fail(info.name, st, err.msg);
    }
    caprl_qa_set set;
    memset(&set, 0, sizeof set);
    st = caprl_qa_set_load(&set, qa_path, skip_bad, &err);
    if (st != CAPRL_OK) {
        free(tmpl);
        caprl_tokenizer_free(count_tok);
        return tool_fail(info.name, st, err.msg);
    }
    qa_index ix;
    index_build(&ix, &set);
    job_list jobs;
    memset(&jobs, 0, sizeof jobs);
    rc = read_captions(cap_path, &ix, &set, count_tok, skip_bad, &jobs);
    if (rc == 0 && lw > 0) {
        for (int64_t i = 0; i < jobs.n && rc == 0; i++) {
            if (jobs.jobs[i].tokens < 0) {
                fprintf(stderr, "caprl reward: error: %s:%lld: the length term needs caption token counts: a "
                        "\"tokens\" field or --tokenizer\n", cap_path, (long long)jobs.jobs[i].line);
                rc = EXIT_USAGE;
            }
        }
    }
    if (rc == 0) {
        fprintf(stderr,
                "caprl reward: %lld QA images (%lld questions%s), %lld caption records, %lld captions to score",
                (long long)set.n_images, (long long)caprl_qa_set_n_questions(&set),
                set.n_bad ? ", malformed records skipped" : "", (long long)jobs.n_records, (long long)jobs.n);
        if (jobs.n_error_records || jobs.n_bad) {
            fprintf(stderr, " (%lld error records, %lld malformed records skipped)", (long long)jobs.n_error_records,
                    (long long)jobs.n_bad);
        }
        fprintf(stderr, "\n");
    }
    caprl_reader *reader = NULL;
    if (rc == 0) {
        caprl_reader_params rp = caprl_reader_default_params();
        rp.template_text = tmpl;
        rp.max_captions = batch;
        rp.max_sequences = batch * n_q < 256 ? batch * n_q : 256;
        st = caprl_reader_load(&reader, reader_dir, threads, &rp, &err);
        if (st != CAPRL_OK) {
            rc = tool_fail(info.name, st, err.msg);
        }
    }
    out_buf out = {0};
    out_add(&out, "", 0);
    double  t0 = tool_now(), last = 0, sum_reward = 0;
    int64_t reader_tokens = 0;
    bool    tty = isatty(fileno(stderr));
    int32_t chunk = batch < 16 ? 16 : batch;
    caprl_reward_item   *items = tool_xmalloc((size_t)chunk * sizeof *items);
    caprl_reward_result *res = tool_xcalloc((size_t)chunk, sizeof *res);
    for (int64_t first = 0; rc == 0 && first < jobs.n; first += chunk) {
        int32_t n = (int32_t)(jobs.n - first < chunk ? jobs.n - first : chunk);
        for (int32_t i = 0; i < n; i++) {
            const job *j = &jobs.jobs[first + i];
            items[i].caption = j->caption;
            items[i].qa = j->qa;
            items[i].stream_id = j->stream;
            items[i].caption_tokens = j->tokens;
        }
        st = caprl_reward_score(reader, items, n, &p, res, &err);
        if (st != CAPRL_OK) {
            const job *j = &jobs.jobs[first];
            fprintf(stderr, "\n");
            char msg[CAPRL_ERROR_MSG_CAP + 256];
            snprintf(msg, sizeof msg, "%s (captions from %s:%lld on)", err.msg, cap_path, (long long)j->line);
            rc = tool_fail(info.name, st, msg);
        }
        for (int32_t i = 0; i < n; i++) {
            if (rc == 0) {
                add_record(&out, &jobs.jobs[first + i], &res[i], &p);
                sum_reward += (double)res[i].reward;
                reader_tokens += res[i].reader_tokens;
            }
            caprl_reward_result_clear(&res[i]);
        }
        if (rc == 0) {
            progress(first + n, jobs.n, (first + n) * (int64_t)n_q, t0, &last, tty, false);
        }
    }
    if (rc == 0) {
        progress(jobs.n, jobs.n, jobs.n * (int64_t)n_q, t0, &last, tty, true);
        rc = tool_write_file_atomic(info.name, out_path, out.p, out.n);
    }
    if (rc == 0) {
        char   hex[65];
        const char *t = caprl_reader_template(reader);
        caprl_sha256_hex(t, strlen(t), hex);
        double el = tool_now() - t0;
        fprintf(stderr,
                "caprl reward: %lld captions, mean reward %.4f, mode %s, %lld reader tokens (+%d shared prefix), "
                "%.1f s, %.2f questions/s; template sha256 %.16s...\n",
                (long long)jobs.n, jobs.n ? sum_reward / (double)jobs.n : 0.0, caprl_reward_mode_name(p.mode),
                (long long)reader_tokens, caprl_reader_prefix_tokens(reader), el,
                el > 0 ? (double)jobs.n * n_q / el : 0.0, hex);
    }
    free(items);
    free(res);
    free(out.p);
    caprl_reader_free(reader);
    jobs_free(&jobs);
    free(ix.by_id);
    free(ix.by_raw);
    caprl_qa_set_free(&set);
    caprl_tokenizer_free(count_tok);
    free(tmpl);
    return rc;
}
