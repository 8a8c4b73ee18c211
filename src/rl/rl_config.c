/* The trainer's configuration: released-recipe defaults, a run.json applied on top (keys = CLI flag names with '_'
 * for '-'), single "key value" settings from the command line, and the resolved config written to RUN/config.json.
 * One key table drives all three, so a flag, a config key and a line of the resolved config can never disagree. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "caprl/rl.h"
#include "core/error_impl.h"
#include "fmt/json_impl.h"
#include "rl/rl_impl.h"

typedef enum { K_STR, K_I32, K_U64, K_F32, K_BOOL, K_ENUM, K_GROUPS } key_kind;

typedef struct key_desc {
    const char        *name;
    key_kind           kind;
    size_t             off;
    const char *const *names; /* K_ENUM: value i is names[i] */
    int32_t            n_names;
} key_desc;

static const char *const k_estimators[] = {"grpo", "rloo", "dr_grpo"};
static const char *const k_kls[] = {"off", "k1", "k2", "k3"};
static const char *const k_aggs[] = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"};
static const char *const k_modes[] = {"sample", "expected"};
static const char *const k_schedules[] = {"constant", "cosine"};
static const char *const k_precisions[] = {"f32", "bf16"};

#define ENUM(arr) arr, (int32_t)(sizeof arr / sizeof arr[0])
#define OFF(field) offsetof(caprl_rl_config, field)

static const key_desc k_keys[] = {
    {"policy", K_STR, OFF(policy), NULL, 0},
    {"reader", K_STR, OFF(reader), NULL, 0},
    {"data", K_STR, OFF(data), NULL, 0},
    {"out", K_STR, OFF(out), NULL, 0},
    {"instruction", K_STR, OFF(instruction), NULL, 0},
    {"reader_template", K_STR, OFF(reader_template), NULL, 0},
    {"seed", K_U64, OFF(seed), NULL, 0},
    {"rollout_batch", K_I32, OFF(rollout_batch), NULL, 0},
    {"group_size", K_I32, OFF(group_size), NULL, 0},
    {"temperature", K_F32, OFF(temperature), NULL, 0},
    {"top_p", K_F32, OFF(top_p), NULL, 0},
    {"max_new_tokens", K_I32, OFF(max_new_tokens), NULL, 0},
    {"episodes", K_I32, OFF(episodes), NULL, 0},
    {"max_steps", K_I32, OFF(max_steps), NULL, 0},
    {"updates_per_rollout", K_I32, OFF(updates_per_rollout), NULL, 0},
    {"micro_batch_tokens", K_I32, OFF(micro_batch_tokens), NULL, 0},
    {"dynamic_sampling", K_BOOL, OFF(dynamic_sampling), NULL, 0},
    {"advantage", K_ENUM, OFF(rl.estimator), ENUM(k_estimators)},
    {"adv_eps", K_F32, OFF(rl.adv_eps), NULL, 0},
    {"whiten", K_BOOL, OFF(rl.whiten), NULL, 0},
    {"ppo_clip", K_BOOL, OFF(rl.ppo_clip), NULL, 0},
    {"clip_low", K_F32, OFF(rl.clip_low), NULL, 0},
    {"clip_high", K_F32, OFF(rl.clip_high), NULL, 0},
    {"dual_clip", K_F32, OFF(rl.dual_clip), NULL, 0},
    {"kl", K_ENUM, OFF(rl.kl), ENUM(k_kls)},
    {"kl_coef", K_F32, OFF(rl.kl_coef), NULL, 0},
    {"kl_in_reward", K_BOOL, OFF(rl.kl_in_reward), NULL, 0},
    {"loss_agg", K_ENUM, OFF(rl.agg), ENUM(k_aggs)},
    {"entropy_coef", K_F32, OFF(rl.entropy_coef), NULL, 0},
    {"mask_truncated", K_BOOL, OFF(rl.mask_truncated), NULL, 0},
    {"lr", K_F32, OFF(opt.lr), NULL, 0},
    {"beta1", K_F32, OFF(opt.beta1), NULL, 0},
    {"beta2", K_F32, OFF(opt.beta2), NULL, 0},
    {"adam_eps", K_F32, OFF(opt.eps), NULL, 0},
    {"weight_decay", K_F32, OFF(opt.weight_decay), NULL, 0},
    {"max_grad_norm", K_F32, OFF(opt.max_grad_norm), NULL, 0},
    {"warmup", K_I32, OFF(opt.warmup_steps), NULL, 0},
    {"schedule", K_ENUM, OFF(opt.schedule), ENUM(k_schedules)},
    {"min_lr_ratio", K_F32, OFF(opt.min_lr_ratio), NULL, 0},
    {"reward_mode", K_ENUM, OFF(reward.mode), ENUM(k_modes)},
    {"n_questions", K_I32, OFF(reward.n_questions), NULL, 0},
    {"shuffle", K_BOOL, OFF(reward.shuffle), NULL, 0},
    {"tau", K_F32, OFF(reward.tau), NULL, 0},
    {"reader_temperature", K_F32, OFF(reward.temperature), NULL, 0},
    {"reader_max_tokens", K_I32, OFF(reward.max_new_tokens), NULL, 0},
    {"length_weight", K_F32, OFF(reward.length_weight), NULL, 0},
    {"length_l1", K_I32, OFF(reward.length_l1), NULL, 0},
    {"length_l2", K_I32, OFF(reward.length_l2), NULL, 0},
    {"freeze", K_GROUPS, OFF(frozen_groups), NULL, 0},
    {"precision", K_ENUM, OFF(precision), ENUM(k_precisions)},
    {"recompute", K_BOOL, OFF(recompute), NULL, 0},
    {"save_every", K_I32, OFF(save_every), NULL, 0},
    {"save_total_limit", K_I32, OFF(save_total_limit), NULL, 0},
    {"samples_every", K_I32, OFF(samples_every), NULL, 0},
    {"threads", K_I32, OFF(n_threads), NULL, 0},
    {"skip_bad", K_BOOL, OFF(skip_bad), NULL, 0},
};

#define N_KEYS ((int32_t)(sizeof k_keys / sizeof k_keys[0]))

static const struct {
    const char *name;
    int32_t     bit;
} k_groups[] = {{"embed", CAPRL_GROUP_EMBED}, {"text", CAPRL_GROUP_TEXT}, {"vision", CAPRL_GROUP_VISION}};

caprl_rl_config caprl_rl_config_default(void) {
    caprl_rl_config c;
    memset(&c, 0, sizeof c);
    c.instruction = strdup(CAPRL_CAPTION_INSTRUCTION);
    c.seed = 0;
    c.rollout_batch = 128;
    c.group_size = 8;
    c.temperature = 1.0f;
    c.top_p = 1.0f;
    c.max_new_tokens = 4096;
    c.episodes = 30;
    c.max_steps = -1;
    c.updates_per_rollout = 1;
    c.micro_batch_tokens = 4096;
    c.rl = caprl_rl_default_params();
    c.opt = caprl_adamw_default_params();
    c.opt.lr = 1e-6f;
    c.opt.beta1 = 0.9f;
    c.opt.beta2 = 0.95f;
    c.opt.weight_decay = 0.0f;
    c.opt.max_grad_norm = 1.0f;
    c.opt.warmup_steps = 20;
    c.opt.schedule = CAPRL_LR_COSINE;
    c.opt.min_lr_ratio = 0.1f;
    c.reward = caprl_reward_default_params();
    c.precision = CAPRL_PRECISION_F32;
    c.save_every = 50;
    c.samples_every = 10;
    return c;
}

void caprl_rl_config_free(caprl_rl_config *cfg) {
    if (!cfg) {
        return;
    }
    for (int32_t i = 0; i < N_KEYS; i++) {
        if (k_keys[i].kind == K_STR) {
            char **s = (char **)(void *)((char *)cfg + k_keys[i].off);
            free(*s);
            *s = NULL;
        }
    }
}

static const key_desc *find_key(const char *name) {
    for (int32_t i = 0; i < N_KEYS; i++) {
        if (strcmp(k_keys[i].name, name) == 0) {
            return &k_keys[i];
        }
    }
    return NULL;
}

static caprl_status parse_groups(const char *text, int32_t *out) {
    int32_t bits = 0;
    char   *copy = strdup(text), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        bool found = false;
        for (size_t g = 0; g < sizeof k_groups / sizeof k_groups[0]; g++) {
            if (strcmp(tok, k_groups[g].name) == 0) {
                bits |= k_groups[g].bit;
                found = true;
            }
        }
        if (!found && strcmp(tok, "none") != 0) {
            free(copy);
            return CAPRL_ERR_INVALID_ARG;
        }
    }
    free(copy);
    *out = bits;
    return CAPRL_OK;
}

/* Sets one key from its text form (a flag's value); the error names the key and the value. */
static caprl_status set_from_text(caprl_rl_config *cfg, const key_desc *k, const char *v, const char *where,
                                  caprl_error *err) {
    void *field = (char *)cfg + k->off;
    char *end = NULL;
    switch (k->kind) {
    case K_STR: {
        char **s = field;
        free(*s);
        *s = strdup(v);
        return CAPRL_OK;
    }
    case K_I32: {
        long long x = strtoll(v, &end, 10);
        if (end == v || *end || x < -1 || x > INT32_MAX) {
            break;
        }
        *(int32_t *)field = (int32_t)x;
        return CAPRL_OK;
    }
    case K_U64: {
        unsigned long long x = strtoull(v, &end, 10);
        if (end == v || *end || v[0] == '-') {
            break;
        }
        *(uint64_t *)field = (uint64_t)x;
        return CAPRL_OK;
    }
    case K_F32: {
        double x = strtod(v, &end);
        if (end == v || *end || !(x == x)) {
            break;
        }
        *(float *)field = (float)x;
        return CAPRL_OK;
    }
    case K_BOOL:
        if (strcmp(v, "true") == 0 || strcmp(v, "1") == 0) {
            *(bool *)field = true;
            return CAPRL_OK;
        }
        if (strcmp(v, "false") == 0 || strcmp(v, "0") == 0) {
            *(bool *)field = false;
            return CAPRL_OK;
        }
        break;
    case K_ENUM:
        for (int32_t i = 0; i < k->n_names; i++) {
            if (strcmp(v, k->names[i]) == 0) {
                *(int32_t *)field = i;
                return CAPRL_OK;
            }
        }
        break;
    case K_GROUPS:
        if (parse_groups(v, (int32_t *)field) == CAPRL_OK) {
            return CAPRL_OK;
        }
        break;
    }
    if (k->kind == K_ENUM) {
        char list[160] = "";
        for (int32_t i = 0; i < k->n_names; i++) {
            strncat(list, i ? ", " : "", sizeof list - strlen(list) - 1);
            strncat(list, k->names[i], sizeof list - strlen(list) - 1);
        }
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "%s: '%s' must be one of %s, got '%s'", where, k->name, list,
                             v);
    }
    static const char *const what[] = {"a string", "an integer", "a non-negative integer", "a number",
                                       "true or false", "", "a comma list of embed, text, vision"};
    return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "%s: '%s' must be %s, got '%s'", where, k->name, what[k->kind],
                         v);
}

caprl_status caprl_rl_config_set(caprl_rl_config *cfg, const char *key, const char *value, caprl_error *err) {
    const key_desc *k = find_key(key);
    if (!k) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "unknown training setting '%s'", key);
    }
    return set_from_text(cfg, k, value, "command line", err);
}

typedef struct json_apply {
    caprl_rl_config *cfg;
    const char      *name;
    caprl_error     *err;
    caprl_status     st;
} json_apply;

static bool apply_member(const char *key, const struct json_t *value, void *user) {
    json_apply     *a = user;
    const key_desc *k = find_key(key);
    if (!k) {
        a->st = caprl_err_set(a->err, CAPRL_ERR_INVALID_ARG, "%s: unknown key '%s'", a->name, key);
        return false;
    }
    if (k->kind == K_STR && caprl_json_is_null(value)) {
        /* null = unset, as the resolved config writes an optional string that has no value (reader_template) */
        char **s = (char **)(void *)((char *)a->cfg + k->off);
        free(*s);
        *s = NULL;
        return true;
    }
    char        text[64];
    const char *v = caprl_json_string_value(value);
    double      num;
    bool        b;
    if (caprl_json_bool_value(value, &b)) {
        v = b ? "true" : "false";
    } else if (caprl_json_number_value(value, &num)) {
        int64_t i;
        if (caprl_json_int_value(value, &i)) {
            snprintf(text, sizeof text, "%lld", (long long)i);
        } else {
            snprintf(text, sizeof text, "%.9g", num);
        }
        v = text;
    }
    if (!v || (k->kind == K_STR && !caprl_json_string_value(value))) {
        char desc[96];
        a->st = caprl_err_set(a->err, CAPRL_ERR_INVALID_ARG, "%s: key '%s' has the wrong type (%s)", a->name, key,
                              caprl_json_describe(value, desc, sizeof desc));
        return false;
    }
    a->st = set_from_text(a->cfg, k, v, a->name, a->err);
    return a->st == CAPRL_OK;
}

caprl_status caprl_rl_config_from_json(caprl_rl_config *cfg, const char *json, size_t n, const char *name,
                                       caprl_error *err) {
    struct json_t *root = NULL;
    CAPRL_TRY(caprl_json_parse(&root, json, n, name, err));
    if (!caprl_json_is_object(root)) {
        caprl_json_free(root);
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: expected a JSON object of training settings", name);
    }
    json_apply a = {.cfg = cfg, .name = name, .err = err, .st = CAPRL_OK};
    caprl_json_object_each(root, apply_member, &a);
    caprl_json_free(root);
    return a.st;
}

/* A float as the shortest decimal that reads back as the same float ("0.001", not 0.00100000005): config.json stays
 * readable and a value read back compares equal. */
static void format_float(float f, char *buf, size_t cap) {
    for (int prec = 6; prec <= 9; prec++) {
        snprintf(buf, cap, "%.*g", prec, (double)f);
        if ((float)strtod(buf, NULL) == f) {
            return;
        }
    }
}

/* One key's value as its JSON text (strings quoted); caller frees. */
static char *value_json(const caprl_rl_config *cfg, const key_desc *k) {
    const void *field = (const char *)cfg + k->off;
    char        value[256];
    switch (k->kind) {
    case K_STR: {
        const char *s = *(char *const *)field;
        return s ? caprl_json_quote(s) : strdup("null");
    }
    case K_I32: snprintf(value, sizeof value, "%d", *(const int32_t *)field); break;
    case K_U64: snprintf(value, sizeof value, "%llu", (unsigned long long)*(const uint64_t *)field); break;
    case K_F32: format_float(*(const float *)field, value, sizeof value); break;
    case K_BOOL: snprintf(value, sizeof value, "%s", *(const bool *)field ? "true" : "false"); break;
    case K_ENUM: {
        int32_t e = *(const int32_t *)field;
        snprintf(value, sizeof value, "\"%s\"", e >= 0 && e < k->n_names ? k->names[e] : "?");
        break;
    }
    case K_GROUPS: {
        int32_t bits = *(const int32_t *)field;
        char    list[64] = "";
        for (size_t g = 0; g < sizeof k_groups / sizeof k_groups[0]; g++) {
            if (bits & k_groups[g].bit) {
                strncat(list, list[0] ? "," : "", sizeof list - strlen(list) - 1);
                strncat(list, k_groups[g].name, sizeof list - strlen(list) - 1);
            }
        }
        snprintf(value, sizeof value, "\"%s\"", list[0] ? list : "none");
        break;
    }
    }
    return strdup(value);
}

caprl_status caprl_rl_config_to_json(const caprl_rl_config *cfg, char **out, caprl_error *err) {
    size_t cap = 4096, len = 0;
    char  *buf = malloc(cap);
    if (!buf) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "out of memory writing the config");
    }
    len += (size_t)snprintf(buf, cap, "{\n");
    for (int32_t i = 0; i < N_KEYS; i++) {
        const key_desc *k = &k_keys[i];
        char           *v = value_json(cfg, k);
        size_t          need = strlen(k->name) + (v ? strlen(v) : 0) + 16;
        if (v && len + need >= cap) {
            cap = 2 * (len + need);
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(v);
                v = NULL;
            } else {
                buf = nb;
            }
        }
        if (!v) {
            free(buf);
            return caprl_err_set(err, CAPRL_ERR_OOM, "out of memory writing the config");
        }
        len += (size_t)snprintf(buf + len, cap - len, "  \"%s\": %s%s\n", k->name, v, i + 1 < N_KEYS ? "," : "");
        free(v);
    }
    snprintf(buf + len, cap - len, "}\n");
    *out = buf;
    return CAPRL_OK;
}

/* ---- resume ------------------------------------------------------------------------------------------------- */

/* What a resumed run may change: where the run goes, how often it records, how far it goes and how it computes,
 * none of which changes a step's weights, metrics or captions (max_steps only says where to stop: the learning-rate
 * horizon comes from episodes; results are bit-identical at any thread count and with or without recompute). The
 * input files are compared by content (rl_impl.h), not by path, so a moved data file or checkpoint is fine. Every
 * other setting decides what the steps compute and must stay as the run started. */
static const char *const k_free_on_resume[] = {"out",           "max_steps", "save_every", "save_total_limit",
                                               "samples_every", "threads",   "recompute"};
static const char *const k_by_content[] = {"policy", "reader", "data", "reader_template"};

static bool in_list(const char *name, const char *const *list, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (strcmp(list[i], name) == 0) {
            return true;
        }
    }
    return false;
}

/* "out, max_steps, ... and recompute" */
static void free_list_text(char *buf, size_t cap) {
    size_t n = sizeof k_free_on_resume / sizeof k_free_on_resume[0];
    buf[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        strncat(buf, i == 0 ? "" : i + 1 == n ? " and " : ", ", cap - strlen(buf) - 1);
        strncat(buf, k_free_on_resume[i], cap - strlen(buf) - 1);
    }
}

caprl_status caprl_rl_config_check_resume(const caprl_rl_config *now, const char *stored, size_t n,
                                          const char *name, caprl_error *err) {
    caprl_rl_config old = caprl_rl_config_default();
    caprl_status    st = caprl_rl_config_from_json(&old, stored, n, name, err);
    if (st == CAPRL_ERR_INVALID_ARG) {
        st = CAPRL_ERR_FORMAT; /* a damaged record of the run, not a wrong flag */
    }
    for (int32_t i = 0; i < N_KEYS && st == CAPRL_OK; i++) {
        const key_desc *k = &k_keys[i];
        if (in_list(k->name, k_free_on_resume, sizeof k_free_on_resume / sizeof k_free_on_resume[0]) ||
            in_list(k->name, k_by_content, sizeof k_by_content / sizeof k_by_content[0])) {
            continue;
        }
        char *a = value_json(&old, k), *b = value_json(now, k);
        if (!a || !b) {
            st = caprl_err_set(err, CAPRL_ERR_OOM, "out of memory comparing the settings");
        } else if (strcmp(a, b) != 0) {
            char free_list[160];
            free_list_text(free_list, sizeof free_list);
            st = caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                               "resume: setting '%s' is %s in %s but %s now; a resumed run must keep the settings it "
                               "started with (only %s may change)",
                               k->name, a, name, b, free_list);
        }
        free(a);
        free(b);
    }
    caprl_rl_config_free(&old);
    return st;
}
