/* Run-directory checkpoints (caprl/train.h): RUN/step-N/ = a Hugging Face checkpoint directory of the model as it
 * is now, plus training_state.safetensors (f32 masters and AdamW moments under the tensors' own names) and
 * training_state.json (step, optimizer updates, the caller's state object).
 *
 * Crash safety: everything is written into RUN/.step-N.tmp/ (each file fsync'd by the atomic writers), the
 * directory is fsync'd, renamed to step-N and the run directory fsync'd. A step-N/ that exists is therefore
 * complete; a kill at any moment leaves at most a temporary, which caprl_checkpoint_latest ignores and the next
 * save of that step replaces. One process writes a run directory at a time (the caller's lock). */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl/vlm.h"
#include "core/error_impl.h"
#include "core/file_impl.h"
#include "fmt/json_impl.h"
#include "train/adamw_impl.h"
#include "train/train_impl.h"

#define STATE_FORMAT  "caprl-training-state"
#define STATE_VERSION 1
#define STATE_JSON    "training_state.json"
#define STATE_ST      "training_state.safetensors"
/* training_state.json holds only a few counters and the caller's small state object */
#define STATE_JSON_MAX ((size_t)64 << 20)
/* the line that introduces the caller's object; it is written last, so its text runs to the closing brace */
#define USER_KEY "\n  \"user\": "
#define STATE_TAIL "\n}\n"

static caprl_status fsync_dir(const char *dir, caprl_error *err) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    }
    int rc = fsync(fd);
    int saved = errno;
    close(fd);
    if (rc != 0) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: fsync failed: %s", dir, strerror(saved));
    }
    return CAPRL_OK;
}

/* Removes a temporary checkpoint directory: its files (it holds no subdirectories), then itself. */
static caprl_status remove_flat_dir(const char *dir, caprl_error *err) {
    DIR *d = opendir(dir);
    if (!d) {
        return errno == ENOENT ? CAPRL_OK
                               : caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot open: %s", dir, strerror(errno));
    }
    caprl_status   st = CAPRL_OK;
    struct dirent *e;
    while (st == CAPRL_OK && (e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) {
            continue;
        }
        char *p = caprl_path_join(dir, e->d_name);
        if (unlink(p) != 0) {
            st = caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot remove: %s", p, strerror(errno));
        }
        free(p);
    }
    closedir(d);
    if (st == CAPRL_OK && rmdir(dir) != 0) {
        st = caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot remove: %s", dir, strerror(errno));
    }
    return st;
}

/* ---- save ------------------------------------------------------------------------------------------------------ */

static char *prefixed(const char *prefix, const char *name) {
    return caprl_xasprintf("%s%s", prefix, name);
}

/* training_state.safetensors: names are kept alive in `names` until the writer has saved. */
static caprl_status save_state_tensors(const char *path, caprl_trainer *tr, const caprl_adamw *opt, caprl_error *err) {
    int32_t          nt = caprl_trainer_n_tensors(tr);
    char           **names = caprl_xcalloc((size_t)nt * 3 + 1, sizeof(char *));
    const float     *params = caprl_trainer_params_f32(tr);
    caprl_st_writer *w = caprl_st_writer_init();
    caprl_status     st = caprl_st_writer_set_metadata(w, "format", STATE_FORMAT, err);
    for (int32_t i = 0; i < nt && st == CAPRL_OK; i++) {
        const caprl_param_info *t = caprl_trainer_tensor(tr, i);
        names[3 * i] = prefixed("master.", t->name);
        st = caprl_st_writer_add(w, names[3 * i], CAPRL_DTYPE_F32, t->n_dims, t->shape, params + t->offset, err);
        if (st == CAPRL_OK && adamw_tensor_trained(opt, i)) {
            names[3 * i + 1] = prefixed("adam_m.", t->name);
            names[3 * i + 2] = prefixed("adam_v.", t->name);
            st = caprl_st_writer_add(w, names[3 * i + 1], CAPRL_DTYPE_F32, t->n_dims, t->shape, opt->m + opt->moff[i],
                                     err);
            if (st == CAPRL_OK) {
                st = caprl_st_writer_add(w, names[3 * i + 2], CAPRL_DTYPE_F32, t->n_dims, t->shape,
                                         opt->v + opt->moff[i], err);
            }
        }
    }
    if (st == CAPRL_OK) {
        st = caprl_st_writer_save(w, path, err);
    }
    caprl_st_writer_free(w);
    for (int32_t i = 0; i < 3 * nt; i++) {
        free(names[i]);
    }
    free(names);
    return st;
}

static caprl_status save_state_json(const char *path, int64_t step, const caprl_trainer *tr, const caprl_adamw *opt,
                                    const char *user, caprl_error *err) {
    int32_t nt = caprl_trainer_n_tensors(tr), trained = 0;
    for (int32_t i = 0; i < nt; i++) {
        trained += adamw_tensor_trained(opt, i);
    }
    char *text = caprl_xasprintf("{\n  \"format\": \"%s\",\n  \"version\": %d,\n  \"step\": %lld,\n"
                                 "  \"optimizer_steps\": %lld,\n  \"n_tensors\": %d,\n  \"n_trained_tensors\": %d,"
                                 USER_KEY "%s" STATE_TAIL,
                                 STATE_FORMAT, STATE_VERSION, (long long)step, (long long)opt->t, nt, trained, user);
    caprl_atomic_file af;
    caprl_status      st = caprl_atomic_open(&af, path, err);
    if (st == CAPRL_OK) {
        st = caprl_atomic_write(&af, text, strlen(text), err);
        if (st == CAPRL_OK) {
            st = caprl_atomic_commit(&af, err);
        } else {
            caprl_atomic_abort(&af);
        }
    }
    free(text);
    return st;
}

/* The caller's state must be a JSON object: it is stored verbatim and handed back as it came. */
static caprl_status check_user_json(const char *user, caprl_error *err) {
    struct json_t *j = NULL;
    CAPRL_TRY(caprl_json_parse(&j, user, strlen(user), "checkpoint user state", err));
    bool ok = caprl_json_is_object(j);
    caprl_json_free(j);
    if (!ok) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "checkpoint: the caller's state must be a JSON object");
    }
    return CAPRL_OK;
}

caprl_status caprl_checkpoint_save(const char *run_dir, int64_t step, caprl_trainer *tr, caprl_adamw *opt,
                                   const char *extra_json, caprl_error *err) {
    if (!run_dir || step < 0 || !tr || !opt || opt->tr != tr) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "checkpoint save: need a run directory, a step >= 0, a trainer and its optimizer");
    }
    const char *user = extra_json ? extra_json : "{}";
    CAPRL_TRY(check_user_json(user, err));
    CAPRL_TRY(caprl_mkdir_p(run_dir, err));
    char name[64], tmp_name[64];
    snprintf(name, sizeof name, "step-%lld", (long long)step);
    snprintf(tmp_name, sizeof tmp_name, ".step-%lld.tmp", (long long)step);
    char *final_dir = caprl_path_join(run_dir, name), *tmp = caprl_path_join(run_dir, tmp_name);
    char *st_path = caprl_path_join(tmp, STATE_ST), *json_path = caprl_path_join(tmp, STATE_JSON);
    caprl_status st = CAPRL_OK;
    if (caprl_path_exists(final_dir)) {
        st = caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "%s already exists: a checkpoint is never overwritten",
                           final_dir);
    }
    if (st == CAPRL_OK) { /* a temporary left by an interrupted save of this step */
        st = remove_flat_dir(tmp, err);
    }
    if (st == CAPRL_OK && mkdir(tmp, 0755) != 0) {
        st = caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
    }
    if (st == CAPRL_OK) {
        st = tr->vision ? caprl_vl_model_save(tr->m, tr->vision, tmp, err) : caprl_model_save(tr->m, tmp, err);
    }
    if (st == CAPRL_OK) {
        st = save_state_tensors(st_path, tr, opt, err);
    }
    if (st == CAPRL_OK) {
        st = save_state_json(json_path, step, tr, opt, user, err);
    }
    if (st == CAPRL_OK) {
        st = fsync_dir(tmp, err);
    }
    if (st == CAPRL_OK && rename(tmp, final_dir) != 0) {
        st = caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot rename to %s: %s", tmp, final_dir, strerror(errno));
    }
    if (st == CAPRL_OK) {
        st = fsync_dir(run_dir, err);
    }
    free(final_dir);
    free(tmp);
    free(st_path);
    free(json_path);
    return st;
}

/* ---- find ------------------------------------------------------------------------------------------------------ */

/* N of a directory entry named exactly "step-N" (decimal digits), or -1. */
static int64_t step_of_name(const char *s) {
    if (strncmp(s, "step-", 5) != 0 || s[5] == '\0') {
        return -1;
    }
    int64_t n = 0;
    for (const char *p = s + 5; *p; p++) {
        if (*p < '0' || *p > '9' || n > (INT64_MAX - 9) / 10) {
            return -1;
        }
        n = n * 10 + (*p - '0');
    }
    return n;
}

int64_t caprl_checkpoint_latest(const char *run_dir) {
    DIR *d = run_dir ? opendir(run_dir) : NULL;
    if (!d) {
        return -1;
    }
    int64_t        best = -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int64_t n = step_of_name(e->d_name);
        if (n <= best) {
            continue;
        }
        /* renamed into place only when complete; the state file is checked anyway against copies by hand */
        char *dir = caprl_path_join(run_dir, e->d_name);
        char *state = caprl_path_join(dir, STATE_JSON);
        if (caprl_path_is_dir(dir) && caprl_path_exists(state)) {
            best = n;
        }
        free(dir);
        free(state);
    }
    closedir(d);
    return best;
}

/* ---- housekeeping ------------------------------------------------------------------------------------------- */

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

caprl_status caprl_checkpoint_prune(const char *run_dir, int32_t keep, caprl_error *err) {
    DIR *d = keep >= 1 ? opendir(run_dir) : NULL;
    if (!d) {
        return CAPRL_OK;
    }
    int64_t       *steps = NULL;
    size_t         n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int64_t v = step_of_name(e->d_name);
        if (v >= 0) {
            steps = caprl_xrealloc(steps, (n + 1) * sizeof *steps);
            steps[n++] = v;
        }
    }
    closedir(d);
    if (n > 0) {
        qsort(steps, n, sizeof *steps, cmp_i64);
    }
    caprl_status st = CAPRL_OK;
    for (size_t i = 0; st == CAPRL_OK && i + (size_t)keep < n; i++) {
        /* renamed out of the step-N namespace first, so a kill half-way never leaves a partial step-N */
        char from[64], to[64];
        snprintf(from, sizeof from, "step-%lld", (long long)steps[i]);
        snprintf(to, sizeof to, ".step-%lld.del", (long long)steps[i]);
        char *pf = caprl_path_join(run_dir, from), *pt = caprl_path_join(run_dir, to);
        if (rename(pf, pt) == 0) {
            st = remove_flat_dir(pt, err);
        } else {
            st = caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot remove: %s", pf, strerror(errno));
        }
        free(pf);
        free(pt);
    }
    free(steps);
    return st;
}

void caprl_checkpoint_clean(const char *run_dir) {
    DIR *d = opendir(run_dir);
    if (!d) {
        return;
    }
    struct dirent *e;
    char         **names = NULL;
    size_t         n = 0;
    while ((e = readdir(d)) != NULL) {
        size_t len = strlen(e->d_name);
        if (strncmp(e->d_name, ".step-", 6) == 0 && len > 10 &&
            (strcmp(e->d_name + len - 4, ".tmp") == 0 || strcmp(e->d_name + len - 4, ".del") == 0)) {
            names = caprl_xrealloc(names, (n + 1) * sizeof *names);
            names[n++] = caprl_path_join(run_dir, e->d_name);
        }
    }
    closedir(d);
    for (size_t i = 0; i < n; i++) {
        caprl_error ignored = {0};
        remove_flat_dir(names[i], &ignored);
        free(names[i]);
    }
    free(names);
}

/* ---- load ------------------------------------------------------------------------------------------------------ */

typedef struct state_json {
    int64_t optimizer_steps;
    char   *user; /* malloc'd */
} state_json;

static caprl_status load_state_json(const char *path, int64_t step, state_json *out, caprl_error *err) {
    uint8_t *data = NULL;
    size_t   size = 0;
    CAPRL_TRY(caprl_file_read_all(path, STATE_JSON_MAX, &data, &size, err));
    struct json_t *j = NULL;
    caprl_json_obj root;
    const char    *format = NULL;
    int64_t        version = 0, saved_step = 0;
    caprl_status   st = caprl_json_parse(&j, data, size, path, err);
    if (st == CAPRL_OK) {
        st = caprl_json_root(&root, j, path, err);
    }
    if (st == CAPRL_OK) {
        st = caprl_json_get_string(&root, "format", &format, err);
    }
    if (st == CAPRL_OK && strcmp(format, STATE_FORMAT) != 0) {
        st = caprl_json_field_error(&root, "format", CAPRL_ERR_FORMAT, err, "expected \"%s\"", STATE_FORMAT);
    }
    if (st == CAPRL_OK) {
        st = caprl_json_get_int(&root, "version", STATE_VERSION, STATE_VERSION, &version, err);
    }
    if (st == CAPRL_OK) {
        st = caprl_json_get_int(&root, "step", step, step, &saved_step, err);
    }
    if (st == CAPRL_OK) {
        st = caprl_json_get_int(&root, "optimizer_steps", 0, INT64_MAX, &out->optimizer_steps, err);
    }
    if (st == CAPRL_OK && !caprl_json_is_object(caprl_json_get(&root, "user"))) {
        st = caprl_json_field_error(&root, "user", CAPRL_ERR_FORMAT, err, "expected an object");
    }
    /* the caller's object, verbatim: from the "user" line (written last) to the closing brace */
    const char *text = (const char *)data;
    const char *at = st == CAPRL_OK ? strstr(text, USER_KEY) : NULL;
    size_t      tail = strlen(STATE_TAIL);
    if (st == CAPRL_OK && (!at || size < tail || strcmp(text + size - tail, STATE_TAIL) != 0 ||
                           text + size - tail < at + strlen(USER_KEY))) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: not laid out as caprl writes it (\"user\" last)", path);
    }
    if (st == CAPRL_OK) {
        const char *u = at + strlen(USER_KEY);
        out->user = caprl_xstrndup(u, (size_t)(text + size - tail - u));
        struct json_t *uj = NULL;
        st = caprl_json_parse(&uj, out->user, strlen(out->user), path, err);
        if (st == CAPRL_OK && !caprl_json_is_object(uj)) {
            st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: not laid out as caprl writes it (\"user\" last)", path);
        }
        caprl_json_free(uj);
        if (st != CAPRL_OK) {
            free(out->user);
            out->user = NULL;
        }
    }
    caprl_json_free(j);
    free(data);
    return st;
}

/* Checks that the state file holds exactly what tr and opt need (masters of every tensor, moments of the trained
 * ones); fills found (n_tensors * 3: master, m, v; NULL where not needed). */
static caprl_status match_state(const caprl_safetensors *sf, const char *path, caprl_trainer *tr,
                                const caprl_adamw *opt, const caprl_st_tensor **found, caprl_error *err) {
    int32_t      nt = caprl_trainer_n_tensors(tr);
    int64_t      expected = 0;
    caprl_status st = CAPRL_OK;
    static const char *const prefix[3] = {"master.", "adam_m.", "adam_v."};
    for (int32_t i = 0; i < nt && st == CAPRL_OK; i++) {
        const caprl_param_info *t = caprl_trainer_tensor(tr, i);
        bool                    trained = adamw_tensor_trained(opt, i);
        for (int32_t k = 0; k < 3 && st == CAPRL_OK; k++) {
            char *name = prefixed(prefix[k], t->name);
            if (k == 0 || trained) {
                st = caprl_safetensors_expect(sf, name, 1u << CAPRL_DTYPE_F32, t->n_dims, t->shape, &found[3 * i + k],
                                              err);
                expected++;
            } else if (caprl_safetensors_find(sf, name)) {
                st = caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                                   "%s: holds AdamW moments of '%s', which is frozen now: resume with the frozen "
                                   "groups the run was saved with",
                                   path, t->name);
            }
            free(name);
        }
    }
    if (st == CAPRL_OK && caprl_safetensors_n_tensors(sf) != expected) {
        st = caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                           "%s: %lld tensors where this model and its frozen groups have %lld: not this run's state",
                           path, (long long)caprl_safetensors_n_tensors(sf), (long long)expected);
    }
    if (st != CAPRL_OK && err && strstr(err->msg, "not found")) {
        caprl_err_prefix(err, "%s: resume with the model and frozen groups the run was saved with", path);
    }
    return st;
}

caprl_status caprl_checkpoint_load(const char *run_dir, int64_t step, caprl_trainer *tr, caprl_adamw *opt,
                                   char **extra_json, caprl_error *err) {
    if (!run_dir || step < 0 || !tr || !opt || opt->tr != tr) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "checkpoint load: need a run directory, a step >= 0, a trainer and its optimizer");
    }
    char name[64];
    snprintf(name, sizeof name, "step-%lld", (long long)step);
    char *dir = caprl_path_join(run_dir, name);
    char *json_path = caprl_path_join(dir, STATE_JSON), *st_path = caprl_path_join(dir, STATE_ST);
    state_json            sj = {0, NULL};
    caprl_safetensors    *sf = NULL;
    int32_t               nt = caprl_trainer_n_tensors(tr);
    const caprl_st_tensor **found = caprl_xcalloc((size_t)nt * 3 + 1, sizeof *found);
    caprl_status          st = load_state_json(json_path, step, &sj, err);
    if (st == CAPRL_OK) {
        st = caprl_safetensors_open(&sf, st_path, err);
    }
    if (st == CAPRL_OK) {
        st = match_state(sf, st_path, tr, opt, found, err);
    }
    if (st == CAPRL_OK) { /* everything checked: now overwrite */
        float *params = caprl_trainer_params_f32(tr);
        for (int32_t i = 0; i < nt; i++) {
            const caprl_param_info *t = caprl_trainer_tensor(tr, i);
            memcpy(params + t->offset, found[3 * i]->data, found[3 * i]->nbytes);
            if (found[3 * i + 1]) {
                memcpy(opt->m + opt->moff[i], found[3 * i + 1]->data, found[3 * i + 1]->nbytes);
                memcpy(opt->v + opt->moff[i], found[3 * i + 2]->data, found[3 * i + 2]->nbytes);
            }
        }
        opt->t = sj.optimizer_steps;
        caprl_trainer_zero_grads(tr);
        st = caprl_trainer_sync(tr, err);
    }
    if (st == CAPRL_OK && extra_json) {
        *extra_json = sj.user;
        sj.user = NULL;
    }
    free(sj.user);
    free(found);
    caprl_safetensors_free(sf);
    free(dir);
    free(json_path);
    free(st_path);
    return st;
}
