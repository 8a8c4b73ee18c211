/* caprl sft: supervised fine-tuning of a Qwen2 / Qwen2.5-VL checkpoint on chat records, with run-directory
 * checkpoints that resume bit-exactly.
 *
 * Everything that decides the weights is a function of the step number: the record order of an epoch is drawn from
 * (seed, epoch), the records of step s are positions [s' B, s' B + B) of that order (s' = s mod steps per epoch),
 * their packing into micro-batches is a pure function of those records, and the trainer and the optimizer are
 * bit-identical at any thread count. So a checkpoint needs to hold only the weights, the optimizer and the step:
 * resuming from RUN/step-N replays steps N+1.. exactly as the uninterrupted run computed them. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "caprl/data.h"
#include "caprl/model.h"
#include "caprl/train.h"
#include "caprl/vision.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

#define CMD "sft"

typedef struct sft_opts {
    const char *model_dir, *data, *out, *eval, *schedule, *freeze, *precision, *system;
    float       lr, min_lr_ratio, weight_decay, max_grad_norm;
    int32_t     batch, micro_batch_tokens, epochs, warmup, threads, max_seq_len, save_total_limit;
    int64_t     max_steps, save_every, eval_every, seed;
    bool        resume, recompute, skip_bad;
} sft_opts;

/* The run: data, model, trainer, optimizer and the files of RUN. */
typedef struct sft_run {
    const sft_opts     *o;
    int32_t             frozen;
    caprl_model        *model;
    caprl_vision       *vision;
    caprl_sft_data     *train, *eval;
    caprl_trainer      *tr;
    caprl_adamw        *opt;
    caprl_sft_batch    *mb;
    caprl_trainer_params tp;
    caprl_adamw_params  ap;
    int64_t             n_records, steps_per_epoch, total_steps;
    uint64_t            fingerprint; /* of the tokenized training data */
    int64_t            *order;       /* (n_records) record order of order_epoch */
    int64_t             order_epoch;
    int64_t            *idx;         /* (batch) records of the step */
    int64_t            *sel;         /* (batch) records of one micro-batch */
    int32_t            *mb_of;       /* (batch) micro-batch of each record of a step */
    float              *logp, *dlogp; /* (max_tokens) */
    FILE               *metrics;
    int                 lock_fd;
    double              t0;
    int64_t             first_step; /* where this process started (progress rate) */
    double              last_print;
    bool                tty;
} sft_run;

/* ---- files of the run directory --------------------------------------------------------------------------- */

static int mkdir_parents(const char *dir) {
    char *p = tool_xstrdup(dir);
    for (char *s = p + 1; *s; s++) {
        if (*s == '/') {
            *s = '\0';
            if (mkdir(p, 0755) != 0 && errno != EEXIST) {
                break;
            }
            *s = '/';
        }
    }
    int rc = mkdir(p, 0755) != 0 && errno != EEXIST ? -1 : 0;
    struct stat st;
    if (rc == 0 && (stat(p, &st) != 0 || !S_ISDIR(st.st_mode))) {
        rc = -1;
    }
    if (rc) {
        fprintf(stderr, "caprl sft: error: %s: cannot create the run directory: %s\n", dir, strerror(errno));
    }
    free(p);
    return rc ? EXIT_DATA : 0;
}

/* True if dir holds anything at all. */
static bool dir_has_entries(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) {
        return false;
    }
    struct dirent *e;
    bool           any = false;
    while (!any && (e = readdir(d)) != NULL) {
        any = strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    }
    closedir(d);
    return any;
}

/* Leftovers of a killed run: checkpoint temporaries and half-pruned checkpoints (the library's cleanup), and the
 * temporaries of config.json / metrics.jsonl rewrites. */
static void remove_leftovers(const char *run) {
    caprl_checkpoint_clean(run);
    DIR *d = opendir(run);
    if (!d) {
        return;
    }
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "config.json.tmp.", 16) == 0 || strncmp(e->d_name, "metrics.jsonl.tmp.", 18) == 0) {
            char *p = tool_path_join(run, e->d_name);
            unlink(p);
            free(p);
        }
    }
    closedir(d);
}

/* Keeps the lines of RUN/metrics.jsonl up to `step` (a killed run may have logged steps after its last
 * checkpoint, and its last line may be torn), so the resumed file reads as one run. */
static int truncate_metrics(const char *path, int64_t step) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        return 0;
    }
    char   *line = NULL, *kept = NULL;
    size_t  cap = 0, n_kept = 0;
    ssize_t got;
    while ((got = getline(&line, &cap, f)) > 0) {
        if (line[got - 1] != '\n') {
            break; /* torn */
        }
        json_error_t jerr;
        json_t      *rec = json_loadb(line, (size_t)got, 0, &jerr);
        json_t      *s = rec ? json_object_get(rec, "step") : NULL;
        bool         keep = json_is_integer(s) && json_integer_value(s) <= step;
        json_decref(rec);
        if (keep) {
            kept = tool_xrealloc(kept, n_kept + (size_t)got);
            memcpy(kept + n_kept, line, (size_t)got);
            n_kept += (size_t)got;
        }
    }
    free(line);
    fclose(f);
    int rc = tool_write_file_atomic(CMD, path, kept ? kept : "", n_kept);
    free(kept);
    return rc;
}

/* ---- configuration ------------------------------------------------------------------------------------------ */

/* FNV-1a over every record's tokens and loss mask: what resume must find unchanged (file, tokenizer, template,
 * system prompt, length limit and skipped records all show up in it). */
static uint64_t data_fingerprint(const caprl_sft_data *d) {
    uint64_t h = 1469598103934665603ull;
    for (int64_t i = 0; i < caprl_sft_data_size(d); i++) {
        const uint8_t *mask = NULL;
        const int32_t *ids = caprl_sft_data_tokens(d, i, &mask);
        int32_t        n = caprl_sft_data_record(d, i)->n_tokens;
        for (int32_t t = 0; t < n; t++) {
            uint32_t v = (uint32_t)ids[t] ^ ((uint32_t)mask[t] << 31);
            for (int b = 0; b < 4; b++) {
                h = (h ^ ((v >> (8 * b)) & 0xFF)) * 1099511628211ull;
            }
        }
        h = (h ^ 0xFF) * 1099511628211ull; /* record boundary */
    }
    return h;
}

/* The settings the weights depend on: a resumed run must use the same (threads, saving and eval cadence may
 * change). */
static const char *const k_math_keys[] = {
    "lr", "batch", "micro_batch_tokens", "epochs", "max_steps", "seed", "warmup", "schedule", "min_lr_ratio",
    "weight_decay", "max_grad_norm", "freeze", "precision", "data_records", "data_fingerprint", "adam_beta1",
    "adam_beta2", "adam_eps"};

/* A float setting as the shortest decimal that reads back as the same float ("0.003", not 0.0030000000260770321),
 * so config.json is readable and compares equal after a round trip. */
static json_t *json_float(float f) {
    char buf[32];
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        if ((float)strtod(buf, NULL) == f) {
            break;
        }
    }
    return json_real(strtod(buf, NULL));
}

static json_t *resolved_config(const sft_run *r, const caprl_adamw_params *ap) {
    const sft_opts *o = r->o;
    char            fp[32];
    snprintf(fp, sizeof fp, "%016llx", (unsigned long long)r->fingerprint);
    json_t *c = json_object();
    json_object_set_new(c, "command", json_string("sft"));
    json_object_set_new(c, "caprl_version", json_string(CAPRL_VERSION_STRING));
    json_object_set_new(c, "model", json_string(o->model_dir));
    json_object_set_new(c, "data", json_string(o->data));
    json_object_set_new(c, "eval", o->eval ? json_string(o->eval) : json_null());
    json_object_set_new(c, "data_records", json_integer(r->n_records));
    json_object_set_new(c, "data_skipped", json_integer(caprl_sft_data_n_skipped(r->train)));
    json_object_set_new(c, "data_fingerprint", json_string(fp));
    json_object_set_new(c, "lr", json_float(o->lr));
    json_object_set_new(c, "batch", json_integer(o->batch));
    json_object_set_new(c, "micro_batch_tokens", json_integer(o->micro_batch_tokens));
    json_object_set_new(c, "epochs", json_integer(o->epochs));
    json_object_set_new(c, "max_steps", json_integer(o->max_steps));
    json_object_set_new(c, "total_steps", json_integer(r->total_steps));
    json_object_set_new(c, "steps_per_epoch", json_integer(r->steps_per_epoch));
    json_object_set_new(c, "seed", json_integer(o->seed));
    json_object_set_new(c, "warmup", json_integer(o->warmup));
    json_object_set_new(c, "schedule", json_string(o->schedule));
    json_object_set_new(c, "min_lr_ratio", json_float(o->min_lr_ratio));
    json_object_set_new(c, "weight_decay", json_float(o->weight_decay));
    json_object_set_new(c, "max_grad_norm", json_float(o->max_grad_norm));
    json_object_set_new(c, "adam_beta1", json_float(ap->beta1));
    json_object_set_new(c, "adam_beta2", json_float(ap->beta2));
    json_object_set_new(c, "adam_eps", json_float(ap->eps));
    json_object_set_new(c, "freeze", json_string(o->freeze ? o->freeze : ""));
    json_object_set_new(c, "precision", json_string(o->precision));
    json_object_set_new(c, "recompute", json_boolean(o->recompute));
    json_object_set_new(c, "max_seq_len", json_integer(o->max_seq_len));
    json_object_set_new(c, "system", o->system ? json_string(o->system) : json_null());
    json_object_set_new(c, "skip_bad", json_boolean(o->skip_bad));
    json_object_set_new(c, "save_every", json_integer(o->save_every));
    json_object_set_new(c, "save_total_limit", json_integer(o->save_total_limit));
    json_object_set_new(c, "eval_every", json_integer(o->eval_every));
    json_object_set_new(c, "threads", json_integer(o->threads));
    return c;
}

/* Writes RUN/config.json when the run starts; on resume checks the stored one against this invocation's settings
 * instead. */
static int write_config(const sft_run *r, const caprl_adamw_params *ap) {
    char   *path = tool_path_join(r->o->out, "config.json");
    json_t *now = resolved_config(r, ap);
    int     rc = 0;
    bool    keep = r->o->resume && access(path, F_OK) == 0; /* the run's own record stays as it started */
    if (keep) {
        json_error_t jerr;
        json_t      *old = json_load_file(path, 0, &jerr);
        if (!old) {
            fprintf(stderr, "caprl sft: error: %s:%d: %s\n", path, jerr.line, jerr.text);
            rc = EXIT_DATA;
        }
        for (size_t i = 0; rc == 0 && i < sizeof k_math_keys / sizeof k_math_keys[0]; i++) {
            json_t *a = json_object_get(old, k_math_keys[i]), *b = json_object_get(now, k_math_keys[i]);
            if (!a || !json_equal(a, b)) {
                char *sa = a ? json_dumps(a, JSON_ENCODE_ANY) : tool_xstrdup("(absent)");
                char *sb = json_dumps(b, JSON_ENCODE_ANY);
                fprintf(stderr,
                        "caprl sft: error: --resume: %s is %s in %s but %s now; a resumed run must use the settings "
                        "(and data) it started with\n",
                        k_math_keys[i], sa, path, sb);
                free(sa);
                free(sb);
                rc = EXIT_USAGE;
            }
        }
        json_decref(old);
    }
    if (rc == 0 && !keep) {
        char *text = json_dumps(now, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9));
        size_t n = strlen(text);
        text = tool_xrealloc(text, n + 2);
        text[n] = '\n';
        text[n + 1] = '\0';
        rc = tool_write_file_atomic(CMD, path, text, n + 1);
        free(text);
    }
    json_decref(now);
    free(path);
    return rc;
}

static int parse_freeze(const char *list, int32_t *groups) {
    *groups = 0;
    if (!list || !list[0]) {
        return 0;
    }
    char *copy = tool_xstrdup(list), *save = NULL;
    int   rc = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok && rc == 0; tok = strtok_r(NULL, ",", &save)) {
        if (strcmp(tok, "vision") == 0) {
            *groups |= CAPRL_GROUP_VISION;
        } else if (strcmp(tok, "embed") == 0) {
            *groups |= CAPRL_GROUP_EMBED;
        } else if (strcmp(tok, "text") == 0) {
            *groups |= CAPRL_GROUP_TEXT;
        } else {
            rc = tool_usage_error(CMD, "--freeze takes a comma list of vision, embed, text; got '%s'", tok);
        }
    }
    free(copy);
    return rc;
}

/* ---- model and data ---------------------------------------------------------------------------------------- */

static int load_model(sft_run *r) {
    const sft_opts *o = r->o;
    int             rc = tool_load_model(CMD, o->model_dir, o->threads, &r->model);
    if (rc) {
        return rc;
    }
    if (!caprl_model_tokenizer(r->model)) {
        fprintf(stderr, "caprl sft: error: %s has no tokenizer.json\n", o->model_dir);
        return EXIT_DATA;
    }
    if (caprl_model_config(r->model)->is_vl) {
        caprl_error  err = {0};
        caprl_status st = caprl_vision_load(&r->vision, o->model_dir, o->threads, &err);
        if (st != CAPRL_OK) {
            return tool_fail(CMD, st, err.msg);
        }
    }
    return 0;
}

static int load_data(sft_run *r, const char *path, caprl_sft_data **out) {
    const sft_opts  *o = r->o;
    caprl_sft_params sp = caprl_sft_default_params();
    sp.max_seq_len = o->max_seq_len;
    sp.skip_bad = o->skip_bad;
    sp.system = o->system;
    caprl_error  err = {0};
    caprl_status st = CAPRL_OK;
    if (r->vision) {
        char *pp_path = tool_path_join(o->model_dir, "preprocessor_config.json");
        if (access(pp_path, F_OK) == 0) {
            st = caprl_preprocess_config_load(&sp.pp, pp_path, &err);
        }
        free(pp_path);
        const caprl_vision_config *vc = caprl_vision_get_config(r->vision);
        if (st == CAPRL_OK && (sp.pp.patch_size != vc->patch_size || sp.pp.merge_size != vc->spatial_merge_size ||
                               sp.pp.temporal_patch_size != vc->temporal_patch_size)) {
            st = tool_set_error(&err, CAPRL_ERR_FORMAT,
                                "%s: preprocessor_config.json's patch/merge/temporal sizes (%d/%d/%d) differ from the "
                                "vision tower's (%d/%d/%d)",
                                o->model_dir, sp.pp.patch_size, sp.pp.merge_size, sp.pp.temporal_patch_size,
                                vc->patch_size, vc->spatial_merge_size, vc->temporal_patch_size);
        }
    }
    if (st == CAPRL_OK) {
        st = caprl_sft_data_load(out, path, r->model, &sp, &err);
    }
    if (st != CAPRL_OK) {
        return tool_fail(CMD, st, err.msg);
    }
    const caprl_sft_data *d = *out;
    fprintf(stderr, "caprl sft: %s: %lld records (%lld skipped), %lld tokens, %lld scored\n", path,
            (long long)caprl_sft_data_size(d), (long long)caprl_sft_data_n_skipped(d),
            (long long)caprl_sft_data_n_tokens(d), (long long)caprl_sft_data_n_loss(d));
    return 0;
}

static int init_training(sft_run *r, caprl_adamw_params *ap) {
    const sft_opts *o = r->o;
    r->tp = caprl_trainer_default_params();
    r->tp.max_tokens = o->micro_batch_tokens;
    r->tp.max_seqs = o->batch < o->micro_batch_tokens ? o->batch : o->micro_batch_tokens;
    r->tp.recompute = o->recompute;
    r->tp.precision = strcmp(o->precision, "bf16") == 0 ? CAPRL_PRECISION_BF16 : CAPRL_PRECISION_F32;
    r->tp.frozen_groups = r->frozen;
    /* every image record must fit a micro-batch on its own: plan for the largest one if it exceeds the default */
    const caprl_sft_data *sets[2] = {r->train, r->eval};
    for (int k = 0; k < 2; k++) {
        for (int64_t i = 0; sets[k] && i < caprl_sft_data_size(sets[k]); i++) {
            int64_t np = caprl_sft_data_record(sets[k], i)->n_patches;
            r->tp.max_patches = np > r->tp.max_patches ? np : r->tp.max_patches;
        }
    }
    caprl_error  err = {0};
    caprl_status st = caprl_trainer_init(&r->tr, r->model, r->vision, &r->tp, &err);
    if (st == CAPRL_OK) {
        st = caprl_adamw_init(&r->opt, r->tr, ap, &err);
    }
    if (st != CAPRL_OK) {
        return tool_fail(CMD, st, err.msg);
    }
    size_t m = (size_t)o->micro_batch_tokens;
    r->logp = tool_xmalloc(m * sizeof(float));
    r->dlogp = tool_xmalloc(m * sizeof(float));
    r->idx = tool_xmalloc((size_t)o->batch * sizeof(int64_t));
    r->sel = tool_xmalloc((size_t)o->batch * sizeof(int64_t));
    r->mb_of = tool_xmalloc((size_t)o->batch * sizeof(int32_t)); /* eval goes in slices of --batch records too */
    r->order = tool_xmalloc((size_t)r->n_records * sizeof(int64_t));
    r->order_epoch = -1;
    r->mb = caprl_sft_batch_init();
    int64_t trained = 0, all = 0;
    for (int32_t i = 0; i < caprl_trainer_n_tensors(r->tr); i++) {
        const caprl_param_info *t = caprl_trainer_tensor(r->tr, i);
        all += t->numel;
        trained += (t->group & r->frozen) ? 0 : t->numel;
    }
    fprintf(stderr, "caprl sft: %lld parameters, %lld trained; %.1f MiB planned; %lld steps (%lld per epoch)\n",
            (long long)all, (long long)trained, (double)caprl_trainer_bytes(r->tr) / 1048576.0,
            (long long)r->total_steps, (long long)r->steps_per_epoch);
    return 0;
}

/* ---- one step ------------------------------------------------------------------------------------------------ */

/* Forward (and, with dlogp_value != 0, backward) over records idx[0..n) packed into micro-batches; adds
 * sum(-logp) over scored positions to *loss_sum and the tokens seen to *tokens. */
static int run_records(sft_run *r, const caprl_sft_data *d, const int64_t *idx, int32_t n, float dlogp_value,
                       double *loss_sum, int64_t *tokens) {
    caprl_error  err = {0};
    int32_t      n_mb = 0;
    caprl_status st = caprl_sft_pack(d, idx, n, &r->tp, r->mb_of, &n_mb, &err);
    for (int32_t b = 0; b < n_mb && st == CAPRL_OK; b++) {
        int32_t k = 0;
        for (int32_t i = 0; i < n; i++) {
            if (r->mb_of[i] == b) {
                r->sel[k++] = idx[i];
            }
        }
        const caprl_train_batch *batch = NULL;
        st = caprl_sft_batch_build(r->mb, d, r->sel, k, &batch, NULL, &err);
        if (st == CAPRL_OK) {
            st = caprl_trainer_forward(r->tr, batch, 1.0f, r->logp, NULL, &err);
        }
        if (st != CAPRL_OK) {
            break;
        }
        for (int32_t t = 0; t < batch->n_tokens; t++) {
            bool scored = batch->target[t] >= 0;
            *loss_sum -= scored ? (double)r->logp[t] : 0.0;
            r->dlogp[t] = scored ? dlogp_value : 0.0f;
        }
        *tokens += batch->n_tokens;
        if (dlogp_value != 0.0f) {
            st = caprl_trainer_backward(r->tr, r->dlogp, &err);
        }
    }
    return st == CAPRL_OK ? 0 : tool_fail(CMD, st, err.msg);
}

static int eval_loss(sft_run *r, double *loss) {
    int64_t  n = caprl_sft_data_size(r->eval), tokens = 0;
    int64_t *all = tool_xmalloc((size_t)n * sizeof(int64_t));
    double   sum = 0.0;
    int      rc = 0;
    /* in file order, in slices of at most one step's records (the trainer's sequence limit) */
    for (int64_t i = 0; i < n; i++) {
        all[i] = i;
    }
    for (int64_t s = 0; s < n && rc == 0; s += r->o->batch) {
        int32_t k = (int32_t)(n - s < r->o->batch ? n - s : r->o->batch);
        rc = run_records(r, r->eval, all + s, k, 0.0f, &sum, &tokens);
    }
    free(all);
    *loss = sum / (double)caprl_sft_data_n_loss(r->eval);
    return rc;
}

typedef struct step_result {
    double          loss, eval_loss;
    bool            has_eval;
    int64_t         tokens, scored;
    double          seconds;
    caprl_step_info info;
} step_result;

static int train_step(sft_run *r, int64_t step, step_result *res) {
    int64_t epoch = step / r->steps_per_epoch, pos = step % r->steps_per_epoch;
    if (epoch != r->order_epoch) {
        caprl_sft_epoch_order(r->train, (uint64_t)r->o->seed, epoch, r->order);
        r->order_epoch = epoch;
    }
    int64_t first = pos * r->o->batch;
    int32_t n = (int32_t)(r->n_records - first < r->o->batch ? r->n_records - first : r->o->batch);
    res->scored = 0;
    for (int32_t k = 0; k < n; k++) {
        r->idx[k] = r->order[first + k];
        res->scored += caprl_sft_data_record(r->train, r->idx[k])->n_loss;
    }
    double t0 = tool_now(), loss_sum = 0.0;
    res->tokens = 0;
    /* the step's loss is the mean over all its scored tokens, whatever micro-batch they fall in */
    int rc = run_records(r, r->train, r->idx, n, (float)(-1.0 / (double)res->scored), &loss_sum, &res->tokens);
    if (rc) {
        return rc;
    }
    res->loss = loss_sum / (double)res->scored;
    caprl_error  err = {0};
    caprl_status st = CAPRL_OK;
    if (!isfinite(res->loss)) { /* never applied: the gradients of a non-finite loss are meaningless */
        fprintf(stderr, "caprl sft: warning: step %lld: loss is %g; update skipped\n", (long long)step + 1,
                res->loss);
        caprl_trainer_zero_grads(r->tr);
        res->info.lr = caprl_lr_at(&r->ap, caprl_adamw_steps(r->opt));
        res->info.grad_norm = NAN;
        res->info.skipped = true;
        res->info.step = caprl_adamw_steps(r->opt);
    } else {
        st = caprl_adamw_step(r->opt, 1.0f, &res->info, &err);
    }
    res->seconds = tool_now() - t0;
    return st == CAPRL_OK ? 0 : tool_fail(CMD, st, err.msg);
}

static json_t *json_number_or_null(double v) {
    return isfinite(v) ? json_real(v) : json_null();
}

static int write_metrics(sft_run *r, int64_t step, const step_result *res) {
    json_t *m = json_object();
    json_object_set_new(m, "step", json_integer(step));
    json_object_set_new(m, "epoch", json_real((double)step / (double)r->steps_per_epoch));
    json_object_set_new(m, "loss", json_number_or_null(res->loss));
    json_object_set_new(m, "lr", json_float(res->info.lr));
    json_object_set_new(m, "grad_norm",
                        isfinite(res->info.grad_norm) ? json_float(res->info.grad_norm) : json_null());
    json_object_set_new(m, "tokens", json_integer(res->tokens));
    json_object_set_new(m, "loss_tokens", json_integer(res->scored));
    json_object_set_new(m, "tokens_per_s", json_real(res->seconds > 0 ? (double)res->tokens / res->seconds : 0.0));
    json_object_set_new(m, "skipped", json_boolean(res->info.skipped));
    if (res->has_eval) {
        json_object_set_new(m, "eval_loss", json_number_or_null(res->eval_loss));
    }
    char *line = json_dumps(m, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(10));
    json_decref(m);
    /* one write per line: a kill leaves at most a torn last line, which resume drops */
    bool ok = line && fprintf(r->metrics, "%s\n", line) > 0 && fflush(r->metrics) == 0;
    free(line);
    if (!ok) {
        fprintf(stderr, "caprl sft: error: metrics.jsonl: write failed: %s\n", strerror(errno));
        return EXIT_DATA;
    }
    return 0;
}

static int save_checkpoint(sft_run *r, int64_t step) {
    /* metrics up to this step reach the disk before the checkpoint that vouches for them */
    if (fsync(fileno(r->metrics)) != 0) {
        fprintf(stderr, "caprl sft: error: metrics.jsonl: fsync failed: %s\n", strerror(errno));
        return EXIT_DATA;
    }
    char user[256];
    snprintf(user, sizeof user,
             "{\"step\": %lld, \"epoch\": %lld, \"records_done_in_epoch\": %lld, \"seed\": %lld, "
             "\"data_fingerprint\": \"%016llx\"}",
             (long long)step, (long long)(step / r->steps_per_epoch),
             (long long)(step % r->steps_per_epoch * r->o->batch), (long long)r->o->seed,
             (unsigned long long)r->fingerprint);
    caprl_error  err = {0};
    caprl_status st = caprl_checkpoint_save(r->o->out, step, r->tr, r->opt, user, &err);
    if (st != CAPRL_OK) {
        return tool_fail(CMD, st, err.msg);
    }
    caprl_error prune_err = {0};
    if (caprl_checkpoint_prune(r->o->out, r->o->save_total_limit, &prune_err) != CAPRL_OK) {
        fprintf(stderr, "caprl sft: warning: %s\n", prune_err.msg);
    }
    return 0;
}

static void show_progress(sft_run *r, int64_t step, const step_result *res, bool final) {
    double now = tool_now();
    if (!r->tty && !final && now - r->last_print < 10.0 && step != r->first_step + 1) {
        return;
    }
    r->last_print = now;
    double rate = (double)(step - r->first_step) / (now - r->t0 > 0 ? now - r->t0 : 1e-9);
    double eta = rate > 0 ? (double)(r->total_steps - step) / rate : 0.0;
    double tps = res->seconds > 0 ? (double)res->tokens / res->seconds : 0.0;
    if (r->tty) {
        int  width = 24, fill = (int)(width * step / r->total_steps);
        char bar[32];
        for (int i = 0; i < width; i++) {
            bar[i] = i < fill ? '#' : '.';
        }
        bar[width] = '\0';
        fprintf(stderr, "\r[%s] step %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s  ETA %dm%02ds\033[K%s", bar,
                (long long)step, (long long)r->total_steps, res->loss, (double)res->info.lr, tps, (int)(eta / 60),
                (int)eta % 60, final ? "\n" : "");
    } else {
        fprintf(stderr, "caprl sft: step %lld/%lld, loss %.4f, lr %.3g, grad_norm %.3g, %.0f tok/s, ETA %.0f s\n",
                (long long)step, (long long)r->total_steps, res->loss, (double)res->info.lr,
                (double)res->info.grad_norm, tps, eta);
    }
}

/* ---- resume -------------------------------------------------------------------------------------------------- */

/* The step to start from: 0, or the latest complete checkpoint restored. */
static int restore(sft_run *r, int64_t *start) {
    *start = 0;
    int64_t latest = r->o->resume ? caprl_checkpoint_latest(r->o->out) : -1;
    if (latest < 0) {
        if (r->o->resume) {
            fprintf(stderr, "caprl sft: --resume: no checkpoint in %s yet; starting from step 0\n", r->o->out);
        }
        return 0;
    }
    caprl_error  err = {0};
    char        *user = NULL;
    caprl_status st = caprl_checkpoint_load(r->o->out, latest, r->tr, r->opt, &user, &err);
    if (st != CAPRL_OK) {
        return tool_fail(CMD, st, err.msg);
    }
    json_error_t jerr;
    json_t      *u = json_loads(user, 0, &jerr);
    char         fp[32];
    snprintf(fp, sizeof fp, "%016llx", (unsigned long long)r->fingerprint);
    json_t *ufp = json_object_get(u, "data_fingerprint");
    int     rc = 0;
    if (!json_is_string(ufp) || strcmp(json_string_value(ufp), fp) != 0 ||
        json_integer_value(json_object_get(u, "seed")) != r->o->seed) {
        fprintf(stderr, "caprl sft: error: %s/step-%lld was saved with other data or another seed\n", r->o->out,
                (long long)latest);
        rc = EXIT_USAGE;
    }
    json_decref(u);
    caprl_free(user);
    *start = latest;
    if (rc == 0) {
        fprintf(stderr, "caprl sft: resuming from %s/step-%lld (%lld optimizer updates)\n", r->o->out,
                (long long)latest, (long long)caprl_adamw_steps(r->opt));
    }
    return rc;
}

/* ---- the command ------------------------------------------------------------------------------------------------ */

static int check_opts(sft_opts *o) {
    if (!o->model_dir || !o->data || !o->out) {
        return tool_usage_error(CMD, "--model, --data and --out are required");
    }
    if (strcmp(o->schedule, "cosine") != 0 && strcmp(o->schedule, "constant") != 0) {
        return tool_usage_error(CMD, "--schedule must be cosine or constant, got '%s'", o->schedule);
    }
    if (strcmp(o->precision, "f32") != 0 && strcmp(o->precision, "bf16") != 0) {
        return tool_usage_error(CMD, "--precision must be f32 or bf16, got '%s'", o->precision);
    }
    if (o->max_seq_len == 0) {
        o->max_seq_len = o->micro_batch_tokens;
    }
    if (o->max_seq_len > o->micro_batch_tokens) {
        return tool_usage_error(CMD, "--max-seq-len %d exceeds --micro-batch-tokens %d: such a record fits no "
                                "micro-batch", o->max_seq_len, o->micro_batch_tokens);
    }
    if (o->eval_every > 0 && !o->eval) {
        return tool_usage_error(CMD, "--eval-every needs --eval FILE");
    }
    return 0;
}

/* RUN: refused when it holds anything and --resume is not given; created and locked otherwise. */
static int open_run_dir(sft_run *r) {
    const sft_opts *o = r->o;
    if (!o->resume && dir_has_entries(o->out)) {
        fprintf(stderr, "caprl sft: error: %s is not empty: pass --resume to continue that run, or choose a new "
                "--out\n", o->out);
        return EXIT_USAGE;
    }
    int rc = mkdir_parents(o->out);
    if (rc) {
        return rc;
    }
    char *lock = tool_path_join(o->out, ".lock");
    r->lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    free(lock);
    if (r->lock_fd < 0 || flock(r->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        fprintf(stderr, "caprl sft: error: %s: %s\n", o->out,
                r->lock_fd < 0 ? strerror(errno) : "another caprl sft is writing this run");
        return EXIT_DATA;
    }
    return 0;
}

static int open_metrics(sft_run *r, int64_t start) {
    char *path = tool_path_join(r->o->out, "metrics.jsonl");
    int   rc = truncate_metrics(path, start);
    if (rc == 0) {
        r->metrics = fopen(path, "ab");
        if (!r->metrics) {
            fprintf(stderr, "caprl sft: error: %s: cannot open: %s\n", path, strerror(errno));
            rc = EXIT_DATA;
        }
    }
    free(path);
    return rc;
}

static int train_loop(sft_run *r, int64_t start) {
    r->t0 = tool_now();
    r->first_step = start;
    r->tty = isatty(fileno(stderr));
    step_result res;
    memset(&res, 0, sizeof res);
    int rc = 0;
    for (int64_t s = start; s < r->total_steps && rc == 0; s++) {
        memset(&res, 0, sizeof res);
        rc = train_step(r, s, &res);
        int64_t done = s + 1;
        bool    last = done == r->total_steps;
        if (rc == 0 && r->eval && ((r->o->eval_every > 0 && done % r->o->eval_every == 0) || last)) {
            res.has_eval = true;
            rc = eval_loss(r, &res.eval_loss);
        }
        if (rc == 0) {
            rc = write_metrics(r, done, &res);
        }
        if (rc == 0 && ((r->o->save_every > 0 && done % r->o->save_every == 0) || last)) {
            rc = save_checkpoint(r, done);
        }
        if (rc == 0) {
            show_progress(r, done, &res, last);
        }
    }
    if (rc == 0) {
        fprintf(stderr, "caprl sft: done: %s/step-%lld (final loss %.4f%s)\n", r->o->out, (long long)r->total_steps,
                res.loss, res.has_eval ? ", see eval_loss in metrics.jsonl" : "");
    }
    return rc;
}

static void run_free(sft_run *r) {
    if (r->metrics) {
        fclose(r->metrics);
    }
    if (r->lock_fd >= 0) {
        close(r->lock_fd);
    }
    caprl_sft_batch_free(r->mb);
    caprl_adamw_free(r->opt);
    caprl_trainer_free(r->tr);
    caprl_sft_data_free(r->train);
    caprl_sft_data_free(r->eval);
    caprl_vision_free(r->vision);
    caprl_model_free(r->model);
    free(r->order);
    free(r->idx);
    free(r->sel);
    free(r->mb_of);
    free(r->logp);
    free(r->dlogp);
}

static int sft_main(sft_run *r) {
    const sft_opts *o = r->o;
    int             rc = parse_freeze(o->freeze, &r->frozen);
    if (rc == 0) {
        rc = open_run_dir(r);
    }
    if (rc == 0) {
        rc = load_model(r);
    }
    if (rc == 0) {
        rc = load_data(r, o->data, &r->train);
    }
    if (rc == 0 && o->eval) {
        rc = load_data(r, o->eval, &r->eval);
    }
    if (rc) {
        return rc;
    }
    r->n_records = caprl_sft_data_size(r->train);
    r->steps_per_epoch = (r->n_records + o->batch - 1) / o->batch;
    r->total_steps = o->max_steps > 0 ? o->max_steps : (int64_t)o->epochs * r->steps_per_epoch;
    r->fingerprint = data_fingerprint(r->train);
    caprl_adamw_params *ap = &r->ap;
    *ap = caprl_adamw_default_params();
    ap->lr = o->lr;
    ap->weight_decay = o->weight_decay;
    ap->max_grad_norm = o->max_grad_norm;
    ap->warmup_steps = o->warmup;
    ap->total_steps = (int32_t)(r->total_steps < INT32_MAX ? r->total_steps : INT32_MAX);
    ap->schedule = strcmp(o->schedule, "cosine") == 0 ? CAPRL_LR_COSINE : CAPRL_LR_CONSTANT;
    ap->min_lr_ratio = o->min_lr_ratio;
    rc = write_config(r, ap);
    if (rc == 0) {
        rc = init_training(r, ap);
    }
    int64_t start = 0;
    if (rc == 0) {
        remove_leftovers(o->out);
        caprl_error prune_err = {0}; /* a kill may have come between a save and its pruning */
        if (caprl_checkpoint_prune(o->out, o->save_total_limit, &prune_err) != CAPRL_OK) {
            fprintf(stderr, "caprl sft: warning: %s\n", prune_err.msg);
        }
        rc = restore(r, &start);
    }
    if (rc == 0 && start >= r->total_steps) {
        fprintf(stderr, "caprl sft: %s is complete (step-%lld); nothing to do\n", o->out, (long long)start);
        return 0;
    }
    if (rc == 0) {
        rc = open_metrics(r, start);
    }
    return rc ? rc : train_loop(r, start);
}

int cmd_sft(int argc, char **argv) {
    static const cmd_info info = {
        "sft",
        "caprl sft --model DIR --data train.jsonl --out RUN [--eval FILE] [--lr X] [--batch N] [--epochs N] "
        "[--resume] [options]",
        "Supervised fine-tuning on chat records, loss on the assistant tokens, with resumable checkpoints in RUN.",
        "Records: {\"messages\": [{\"role\": \"system\"|\"user\"|\"assistant\", \"content\": \"...\"}, ...],\n"
        "\"image\"?: PATH} (images for Qwen2.5-VL checkpoints; relative to the data file; contents may be lists of\n"
        "typed text/image parts), TRL's {\"prompt\": [messages], \"completion\": [messages]} (loss on the\n"
        "completion's replies), or raw {\"prompt\": \"...\", \"completion\": \"...\"} (loss on the completion, no\n"
        "template). A step takes --batch\n"
        "records in an order shuffled per epoch by --seed, packs them into micro-batches of at most\n"
        "--micro-batch-tokens tokens, and minimises the mean loss over all their assistant tokens.\n"
        "RUN gets config.json (the resolved settings), metrics.jsonl (one line per step) and step-N/ checkpoints\n"
        "(a Hugging Face checkpoint directory plus the training state) every --save-every steps and at the end;\n"
        "the last one is the trained model. --resume continues from the newest complete checkpoint and gives\n"
        "bit-identical weights to an uninterrupted run, even after a kill -9. docs/formats.md has the details."};
    sft_opts o;
    memset(&o, 0, sizeof o);
    o.lr = 1e-5f;
    o.batch = 8;
    o.micro_batch_tokens = 2048;
    o.epochs = 1;
    o.schedule = "cosine";
    o.min_lr_ratio = 0.1f;
    o.max_grad_norm = 1.0f;
    o.precision = "f32";
    opt_spec specs[] = {
        {"model", OPT_STRING, &o.model_dir, "checkpoint to fine-tune (with tokenizer.json)", 0, 0, "DIR", 0},
        {"data", OPT_STRING, &o.data, "training records (JSON Lines)", 0, 0, "FILE", 0},
        {"out", OPT_STRING, &o.out, "run directory (must be empty unless --resume)", 0, 0, "RUN", 0},
        {"eval", OPT_STRING, &o.eval, "held-out records for eval_loss", 0, 0, "FILE", 0},
        {"resume", OPT_FLAG, &o.resume, "continue RUN from its newest complete checkpoint", 0, 0, NULL, 0},
        {"lr", OPT_FLOAT, &o.lr, "peak learning rate", 0, 10, "X", 0},
        {"batch", OPT_INT, &o.batch, "records (sequences) per optimizer step", 1, 1 << 20, "N", 0},
        {"micro-batch-tokens", OPT_INT, &o.micro_batch_tokens, "tokens per forward/backward pass", 2, 1 << 24,
         "N", 0},
        {"epochs", OPT_INT, &o.epochs, "passes over the data", 1, 1 << 20, "N", 0},
        {"max-steps", OPT_I64, &o.max_steps, "optimizer steps (0 = epochs x steps per epoch)", 0, 1e12, "N", 0},
        {"warmup", OPT_INT, &o.warmup, "linear warmup steps", 0, 1 << 30, "N", 0},
        {"schedule", OPT_STRING, &o.schedule, "learning-rate schedule after warmup: cosine or constant", 0, 0,
         "NAME", 0},
        {"min-lr-ratio", OPT_FLOAT, &o.min_lr_ratio, "cosine floor as a fraction of --lr", 0, 1, "X", 0},
        {"weight-decay", OPT_FLOAT, &o.weight_decay, "AdamW decoupled weight decay", 0, 10, "X", 0},
        {"max-grad-norm", OPT_FLOAT, &o.max_grad_norm, "global gradient-norm clip (0 = off)", 0, 1e9, "X", 0},
        {"freeze", OPT_STRING, &o.freeze, "parameter groups not trained: comma list of vision, embed, text", 0, 0,
         "LIST", 0},
        {"recompute", OPT_FLAG, &o.recompute, "recompute activations in the backward (less memory)", 0, 0, NULL, 0},
        {"precision", OPT_STRING, &o.precision, "matmul operands: f32, or bf16 (f32 masters and gradients)", 0, 0,
         "P", 0},
        {"max-seq-len", OPT_INT, &o.max_seq_len, "longest record in tokens (0 = --micro-batch-tokens)", 0, 1 << 24,
         "N", 0},
        {"system", OPT_STRING, &o.system, "system prompt of records without one (default: the template's)", 0, 0,
         "TEXT", 0},
        {"skip-bad", OPT_FLAG, &o.skip_bad, "skip malformed or too long records (with a warning) instead of failing",
         0, 0, NULL, 0},
        {"save-every", OPT_I64, &o.save_every, "checkpoint every N steps (0 = only at the end)", 0, 1e12, "N", 0},
        {"save-total-limit", OPT_INT, &o.save_total_limit, "keep only the newest N checkpoints (0 = all)", 0,
         1 << 30, "N", 0},
        {"eval-every", OPT_I64, &o.eval_every, "eval_loss every N steps (0 = only at the end)", 0, 1e12, "N", 0},
        {"seed", OPT_I64, &o.seed, "seed of the data order", 0, 9.2e18, "S", 0},
        {"threads", OPT_INT, &o.threads, THREADS_HELP, 0, 1024, "N", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    rc = check_opts(&o);
    if (rc) {
        return rc;
    }
    sft_run r;
    memset(&r, 0, sizeof r);
    r.o = &o;
    r.lock_fd = -1;
    rc = sft_main(&r);
    run_free(&r);
    return rc;
}
