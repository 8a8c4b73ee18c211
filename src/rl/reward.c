/* The reader and the CapRL reward (spec/caprl.md §1.4, §6.2): question draws, prompts, prefix-shared KV caches,
 * and the two scoring modes.
 *
 * Sequences of the reader's context: 0 holds the template's fixed prefix (run once per context); 1..C hold the
 * caption prefixes of the current chunk of captions (copied from 0, then the caption part prefilled); the next
 * max_sequences slots are question sequences, each a copy of its caption's slot followed by its own suffix. Shared
 * parts are longest common prefixes of the actual token sequences (the tokenization-boundary rule of §1.4), so
 * each question's logits are those of its full prompt; with prefix_cache off every question runs its whole
 * prompt in its own sequence (the naive reference).
 *
 * Randomness, all keyed by the item's stream id: question draws Philox(seed, id, 0); the shuffle of question k
 * Philox(seed, id, 1 + k); reader samples caprl_sampler(seed ^ (SAMPLE_KEY << 48), stream (id << 20) | k, step).
 * Nothing depends on chunking, batching, item order or the thread count. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/reward.h"
#include "caprl/sampler.h"
#include "core/error_impl.h"
#include "core/rng_impl.h"

#define N_LETTERS       9            /* " A" ... " I" */
#define SAMPLE_KEY      0x5341u      /* separates the sampler's key space from the draw / shuffle streams */
#define MAX_QUESTIONS   (1 << 20)    /* sample streams are (stream_id << 20) | k */
#define CTX_STEP        256          /* the KV cache grows in steps of this many tokens */

struct caprl_reader {
    caprl_model           *model;
    bool                   owns_model;
    const caprl_tokenizer *tok;
    char                  *tmpl;
    caprl_reader_params    p;
    int32_t                letter_ids[N_LETTERS];
    int32_t                eos[CAPRL_MAX_EOS];
    int32_t                n_eos;
    int32_t               *prefix;   /* (n_prefix) tokens every prompt starts with */
    int32_t                n_prefix;
    caprl_context         *ctx;      /* NULL until the first score call */
    int32_t                ctx_len;  /* its n_ctx */
    int64_t                tokens_total;
    int32_t               *b_tok;    /* (n_batch_max) batch being built */
    int32_t               *b_seq;
    int8_t                *b_want;
    int32_t               *b_unit;   /* (n_batch_max) unit of each logits row */
    int32_t                b_n, b_rows;
};

caprl_reader_params caprl_reader_default_params(void) {
    caprl_reader_params p;
    p.template_text = NULL;
    p.max_captions = 4;
    p.max_sequences = 32;
    p.n_batch_max = 512;
    p.n_ctx_max = 32768;
    return p;
}

caprl_reward_params caprl_reward_default_params(void) {
    caprl_reward_params p;
    memset(&p, 0, sizeof p);
    p.mode = CAPRL_REWARD_SAMPLE;
    p.n_questions = 8;
    p.shuffle = true;
    p.tau = 0.6f;
    p.temperature = 0.6f;
    p.max_new_tokens = 10;
    p.seed = 0;
    p.length_weight = 0.0f;
    p.length_l1 = 2048;
    p.length_l2 = 3072;
    p.prefix_cache = true;
    return p;
}

const char *caprl_reward_mode_name(int32_t mode) {
    return mode == CAPRL_REWARD_SAMPLE ? "sample" : mode == CAPRL_REWARD_EXPECTED ? "expected" : "unknown";
}

int32_t caprl_reward_mode_parse(const char *name) {
    for (int32_t m = 0; m < CAPRL_REWARD_MODE_COUNT; m++) {
        if (strcmp(name, caprl_reward_mode_name(m)) == 0) {
            return m;
        }
    }
    return -1;
}

caprl_status caprl_reward_params_check(const caprl_reward_params *p, caprl_error *err) {
    if (p->mode < 0 || p->mode >= CAPRL_REWARD_MODE_COUNT) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "reward: mode %d is neither sample nor expected", p->mode);
    }
    if (p->n_questions < 1 || p->n_questions >= MAX_QUESTIONS) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "reward: n_questions must be in [1, %d), got %d",
                             MAX_QUESTIONS, p->n_questions);
    }
    if (!(p->tau > 0.0f) || !isfinite(p->tau)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "reward: tau must be a positive number, got %g",
                             (double)p->tau);
    }
    if (!(p->temperature > 0.0f) || !isfinite(p->temperature)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "reward: temperature must be a positive number, got %g",
                             (double)p->temperature);
    }
    if (p->max_new_tokens < 1 || p->max_new_tokens > 4096) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "reward: max_new_tokens must be in [1, 4096], got %d",
                             p->max_new_tokens);
    }
    if (!(p->length_weight >= 0.0f) || !isfinite(p->length_weight)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "reward: length_weight must be >= 0, got %g",
                             (double)p->length_weight);
    }
    if (p->length_l1 < 0 || p->length_l2 <= p->length_l1) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "reward: length limits need 0 <= l1 < l2, got l1 %d, l2 %d",
                             p->length_l1, p->length_l2);
    }
    return CAPRL_OK;
}

/* ---- tokens ------------------------------------------------------------------------------------------------ */

/* Tokenizes text with special tokens matched (as vLLM tokenizes a prompt string). *ids: free. */
static caprl_status encode(const caprl_tokenizer *tok, const char *text, int32_t **ids, int32_t *n,
                           caprl_error *err) {
    size_t   len = strlen(text);
    int64_t  cap = (int64_t)len + 1, got = 0; /* every token covers at least one byte */
    int32_t *buf = caprl_try_malloc((size_t)cap * sizeof(int32_t));
    if (!buf) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "reader: cannot allocate %lld token ids", (long long)cap);
    }
    caprl_status st = caprl_tokenizer_encode(tok, text, len, true, buf, cap, &got, err);
    if (st == CAPRL_OK && (got > cap || got > INT32_MAX)) {
        st = caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "reader: prompt of %lld tokens is too long", (long long)got);
    }
    if (st != CAPRL_OK) {
        free(buf);
        return st;
    }
    *ids = buf;
    *n = (int32_t)got;
    return CAPRL_OK;
}

/* FNV-1a of a NUL-terminated string. */
static uint64_t text_hash(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        h = (h ^ *p) * 1099511628211ull;
    }
    return h;
}

static int32_t common_prefix(const int32_t *a, int32_t na, const int32_t *b, int32_t nb) {
    int32_t n = na < nb ? na : nb, i = 0;
    while (i < n && a[i] == b[i]) {
        i++;
    }
    return i;
}

/* The tokens every prompt of this template starts with: the longest common prefix of the text before the first
 * placeholder followed by a set of probes that attach to the boundary differently (letters, spaces, newlines,
 * punctuation, digits, non-ASCII, a special token). Each prompt is still checked against it before it is used. */
static caprl_status fixed_prefix(caprl_reader *r, caprl_error *err) {
    static const char *const probes[] = {"", "A", "a", " ", "  x", "\n", ".", "1", "'s", "\xc3\xa9", "<|im_end|>", "-"};
    const char *ph = strstr(r->tmpl, "{}");
    size_t      head = (size_t)(ph - r->tmpl);
    r->n_prefix = 0;
    if (head == 0) {
        return CAPRL_OK;
    }
    char *text = caprl_xmalloc(head + 16);
    for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++) {
        memcpy(text, r->tmpl, head);
        memcpy(text + head, probes[i], strlen(probes[i]) + 1);
        int32_t *ids = NULL, n = 0;
        caprl_status st = encode(r->tok, text, &ids, &n, err);
        if (st != CAPRL_OK) {
            free(text);
            return st;
        }
        if (i == 0) {
            r->prefix = ids;
            r->n_prefix = n;
        } else {
            r->n_prefix = common_prefix(r->prefix, r->n_prefix, ids, n);
            free(ids);
        }
    }
    free(text);
    return CAPRL_OK;
}

/* ---- the reader -------------------------------------------------------------------------------------------- */

caprl_status caprl_reader_init(caprl_reader **out, caprl_model *model, const caprl_reader_params *params,
                               caprl_error *err) {
    caprl_reader_params p = params ? *params : caprl_reader_default_params();
    if (p.max_captions < 1 || p.max_captions > 4096 || p.max_sequences < 1 || p.max_sequences > 65536 ||
        p.n_batch_max < 1 || p.n_batch_max > (1 << 20) || p.n_ctx_max < 16 || p.n_ctx_max > (1 << 24)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "reader: limits out of range: max_captions %d, max_sequences %d, n_batch_max %d, "
                             "n_ctx_max %d",
                             p.max_captions, p.max_sequences, p.n_batch_max, p.n_ctx_max);
    }
    const caprl_tokenizer *tok = caprl_model_tokenizer(model);
    if (!tok) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "reader: the model has no tokenizer (tokenizer.json)");
    }
    const char *tmpl = p.template_text ? p.template_text : caprl_reader_template_default();
    CAPRL_TRY(caprl_reader_template_check(tmpl, strlen(tmpl), err));

    caprl_reader *r = caprl_xcalloc(1, sizeof *r);
    r->model = model;
    r->tok = tok;
    r->p = p;
    r->p.template_text = NULL;
    r->tmpl = caprl_xstrdup(tmpl);
    caprl_status st = CAPRL_OK;
    const int32_t V = caprl_model_config(model)->vocab_size;
    for (int32_t k = 0; k < N_LETTERS && st == CAPRL_OK; k++) {
        char    s[3] = {' ', (char)('A' + k), '\0'};
        int32_t ids[4];
        int64_t n = 0;
        st = caprl_tokenizer_encode(tok, s, 2, false, ids, 4, &n, err);
        if (st == CAPRL_OK && (n != 1 || ids[0] >= V)) {
            st = caprl_err_set(err, CAPRL_ERR_UNSUPPORTED,
                               "reader: \" %c\" must be a single token inside the model's vocabulary (got %lld tokens)",
                               'A' + k, (long long)n);
        }
        r->letter_ids[k] = st == CAPRL_OK ? ids[0] : -1;
    }
    const caprl_generation_config *gc = caprl_model_generation_config(model);
    for (int32_t i = 0; i < gc->n_eos && i < CAPRL_MAX_EOS; i++) {
        r->eos[r->n_eos++] = gc->eos_ids[i];
    }
    if (st == CAPRL_OK) {
        st = fixed_prefix(r, err);
    }
    if (st != CAPRL_OK) {
        caprl_reader_free(r);
        return st;
    }
    size_t nb = (size_t)p.n_batch_max;
    r->b_tok = caprl_xmalloc(nb * sizeof(int32_t));
    r->b_seq = caprl_xmalloc(nb * sizeof(int32_t));
    r->b_want = caprl_xmalloc(nb);
    r->b_unit = caprl_xmalloc(nb * sizeof(int32_t));
    *out = r;
    return CAPRL_OK;
}

caprl_status caprl_reader_load(caprl_reader **out, const char *dir, int32_t n_threads,
                               const caprl_reader_params *params, caprl_error *err) {
    caprl_model_params mp = caprl_model_default_params();
    mp.n_threads = n_threads;
    caprl_model *m = NULL;
    CAPRL_TRY(caprl_model_load(&m, dir, &mp, err));
    caprl_status st = caprl_reader_init(out, m, params, err);
    if (st != CAPRL_OK) {
        caprl_model_free(m);
        return st;
    }
    (*out)->owns_model = true;
    return CAPRL_OK;
}

void caprl_reader_free(caprl_reader *r) {
    if (!r) {
        return;
    }
    caprl_context_free(r->ctx);
    if (r->owns_model) {
        caprl_model_free(r->model);
    }
    free(r->tmpl);
    free(r->prefix);
    free(r->b_tok);
    free(r->b_seq);
    free(r->b_want);
    free(r->b_unit);
    free(r);
}

const caprl_model *caprl_reader_model(const caprl_reader *r) {
    return r->model;
}

const char *caprl_reader_template(const caprl_reader *r) {
    return r->tmpl;
}

const int32_t *caprl_reader_letter_ids(const caprl_reader *r) {
    return r->letter_ids;
}

int32_t caprl_reader_prefix_tokens(const caprl_reader *r) {
    return r->n_prefix;
}

int64_t caprl_reader_tokens_total(const caprl_reader *r) {
    return r->tokens_total;
}

/* ---- batches ----------------------------------------------------------------------------------------------- */

static caprl_status batch_flush(caprl_reader *r, caprl_error *err) {
    if (r->b_n == 0) {
        return CAPRL_OK;
    }
    caprl_batch b = {.n_tokens = r->b_n, .tokens = r->b_tok, .seq_ids = r->b_seq, .want_logits = r->b_want};
    caprl_status st = caprl_context_decode(r->ctx, &b, err);
    r->tokens_total += r->b_n;
    r->b_n = 0;
    return st;
}

/* Appends one token; unit >= 0 asks for its logits row. The caller flushes when b_n reaches n_batch_max. */
static void batch_add(caprl_reader *r, int32_t tok, int32_t seq, int32_t unit) {
    if (r->b_n == 0) {
        r->b_rows = 0;
    }
    r->b_tok[r->b_n] = tok;
    r->b_seq[r->b_n] = seq;
    r->b_want[r->b_n] = unit >= 0;
    if (unit >= 0) {
        r->b_unit[r->b_rows++] = unit;
    }
    r->b_n++;
}

/* (Re)creates the context when it is missing or shorter than n_needed tokens per sequence, and runs the fixed
 * prefix into sequence 0. */
static caprl_status ensure_context(caprl_reader *r, int32_t n_needed, caprl_error *err) {
    if (r->ctx && r->ctx_len >= n_needed) {
        return CAPRL_OK;
    }
    int64_t len = ((int64_t)n_needed + CTX_STEP - 1) / CTX_STEP * CTX_STEP;
    len = len > r->p.n_ctx_max ? r->p.n_ctx_max : len;
    caprl_context_free(r->ctx);
    r->ctx = NULL;
    caprl_context_params cp = caprl_context_default_params();
    cp.n_seq_max = 1 + r->p.max_captions + r->p.max_sequences;
    cp.n_ctx = (int32_t)len;
    cp.n_batch_max = r->p.n_batch_max;
    cp.n_logits_max = r->p.n_batch_max < r->p.max_sequences ? r->p.n_batch_max : r->p.max_sequences;
    CAPRL_TRY(caprl_context_init(&r->ctx, r->model, &cp, err));
    r->ctx_len = (int32_t)len;
    r->b_n = 0;
    for (int32_t i = 0; i < r->n_prefix; i++) {
        batch_add(r, r->prefix[i], 0, -1);
        if (r->b_n == r->p.n_batch_max || i == r->n_prefix - 1) {
            caprl_status st = batch_flush(r, err);
            if (st != CAPRL_OK) {
                caprl_context_free(r->ctx);
                r->ctx = NULL;
                return st;
            }
        }
    }
    return CAPRL_OK;
}

/* ---- scoring ----------------------------------------------------------------------------------------------- */

/* softmax(logits / t)[id], computed as caprl_sampler does (f32 division, max-subtracted, f32 exponentials summed
 * in double), so that it is exactly the sampler's probability of drawing id. */
static float gold_prob(const float *logits, int32_t V, float t, int32_t id) {
    float mx = -INFINITY;
    for (int32_t i = 0; i < V; i++) {
        mx = fmaxf(mx, logits[i] / t);
    }
    double total = 0.0;
    for (int32_t i = 0; i < V; i++) {
        total += (double)(float)exp((double)(logits[i] / t - mx));
    }
    if (id < 0 || !(total > 0.0)) {
        return 0.0f;
    }
    return (float)((double)(float)exp((double)(logits[id] / t - mx)) / total);
}

/* One sequence of reader work: question q of caption c (several questions with identical prompts share a unit in
 * expected mode). */
typedef struct unit {
    int32_t  c, q;
    int32_t  from;    /* first prompt token this unit runs (its caption's shared length, or 0) */
    int32_t  slot;    /* context sequence during its wave */
    int32_t  n_gen;   /* sample mode: tokens generated */
    int32_t *gen;     /* (max_new_tokens) */
    bool     done;
    float    p_gold;
    int32_t  first;   /* sample mode: first sampled token */
} unit;

typedef struct cap_work {
    int32_t **ids;     /* (N) prompt tokens per question */
    int32_t  *len;     /* (N) */
    int32_t   shared;  /* tokens shared by all its prompts (at most the shortest - 1) */
    int32_t   start;   /* tokens already provided by sequence 0 (n_prefix or 0) */
    int32_t   slot;    /* its caption sequence */
    int32_t  *unit_of; /* (N) */
    int32_t  *same_as; /* (N) the first question presented with the same text */
} cap_work;

typedef struct score_state {
    caprl_reader              *r;
    const caprl_reward_params *p;
    const caprl_reward_item   *items;
    caprl_reward_result       *res;
    caprl_sampler             *sampler;
    int32_t                    n_cap; /* captions in this chunk */
    cap_work                  *cw;    /* (n_cap) */
    unit                      *units;
    int32_t                    n_units;
    int32_t                   *gen_buf;
    char                      *text_buf;
    size_t                     text_cap;
} score_state;

static int32_t letter_id(const caprl_reader *r, char letter) {
    return letter >= 'A' && letter <= 'I' ? r->letter_ids[letter - 'A'] : -1;
}

static bool is_eos(const caprl_reader *r, int32_t tok) {
    for (int32_t i = 0; i < r->n_eos; i++) {
        if (r->eos[i] == tok) {
            return true;
        }
    }
    return false;
}

static uint64_t sample_stream(const caprl_reward_item *it, int32_t q) {
    return (it->stream_id << 20) | (uint64_t)q;
}

/* Draws and presents the questions of item i (results filled), tokenizes its prompts into cw. */
static caprl_status prepare_item(score_state *s, int32_t i, cap_work *cw, caprl_error *err) {
    const caprl_reward_params *p = s->p;
    const caprl_reward_item   *it = &s->items[i];
    caprl_reward_result       *res = &s->res[i];
    const int32_t              N = p->n_questions;
    if (!it->caption || !it->qa || it->qa->n_qa < 1) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "reward item %d: needs a caption and at least one question",
                             i);
    }
    res->n_questions = N;
    res->questions = caprl_xcalloc((size_t)N, sizeof(caprl_reward_question));
    cw->ids = caprl_xcalloc((size_t)N, sizeof(int32_t *));
    cw->len = caprl_xcalloc((size_t)N, sizeof(int32_t));
    cw->unit_of = caprl_xcalloc((size_t)N, sizeof(int32_t));
    cw->same_as = caprl_xcalloc((size_t)N, sizeof(int32_t));
    /* questions presented identically (drawn twice with the same shuffle, or shuffling off) share one
     * tokenization: an open-addressing table of the texts seen so far */
    size_t tcap = 16;
    while (tcap < 2 * (size_t)N) {
        tcap *= 2;
    }
    int32_t *table = caprl_xmalloc(tcap * sizeof(int32_t));
    memset(table, 0xff, tcap * sizeof(int32_t));
    caprl_rng rng;
    caprl_rng_init(&rng, p->seed, it->stream_id, 0);
    caprl_status st = CAPRL_OK;
    for (int32_t k = 0; k < N && st == CAPRL_OK; k++) {
        caprl_reward_question *q = &res->questions[k];
        q->qa_index = (int32_t)caprl_rng_below(&rng, (uint64_t)it->qa->n_qa);
        const caprl_qa_item *qa = &it->qa->qa[q->qa_index];
        st = caprl_present_question(qa->question, qa->gold, p->shuffle, p->seed, it->stream_id, 1 + (uint64_t)k,
                                    &q->text, &q->gold, &q->shuffled, err);
        size_t h = st == CAPRL_OK ? (size_t)text_hash(q->text) & (tcap - 1) : 0;
        while (st == CAPRL_OK && table[h] >= 0 && strcmp(res->questions[table[h]].text, q->text) != 0) {
            h = (h + 1) & (tcap - 1);
        }
        if (st == CAPRL_OK && table[h] >= 0) {
            int32_t j = table[h];
            cw->same_as[k] = j;
            cw->len[k] = cw->len[j];
            cw->ids[k] = caprl_xmalloc((size_t)cw->len[j] * sizeof(int32_t));
            memcpy(cw->ids[k], cw->ids[j], (size_t)cw->len[j] * sizeof(int32_t));
            continue;
        }
        char *prompt = NULL;
        if (st == CAPRL_OK) {
            table[h] = k;
            cw->same_as[k] = k;
            st = caprl_reader_prompt(s->r->tmpl, it->caption, q->text, &prompt, err);
        }
        if (st == CAPRL_OK) {
            st = encode(s->r->tok, prompt, &cw->ids[k], &cw->len[k], err);
            free(prompt);
        }
        if (st != CAPRL_OK) {
            caprl_err_prefix(err, "reward item %d (image '%s'), question %d", i, it->qa->id ? it->qa->id : "?",
                             q->qa_index);
        }
    }
    free(table);
    if (st != CAPRL_OK) {
        return st;
    }
    for (int32_t k = 0; k < N; k++) {
        int64_t need = (int64_t)cw->len[k] + (p->mode == CAPRL_REWARD_SAMPLE ? p->max_new_tokens : 0);
        if (need > s->r->p.n_ctx_max) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                                 "reward item %d (image '%s'): reader prompt of %d tokens (+ continuation) exceeds "
                                 "n_ctx_max (%d)",
                                 i, it->qa->id ? it->qa->id : "?", cw->len[k], s->r->p.n_ctx_max);
        }
        res->prompt_tokens = cw->len[k] > res->prompt_tokens ? cw->len[k] : res->prompt_tokens;
    }
    /* shared part: longest common prefix, leaving every prompt at least one token of its own */
    int32_t shared = cw->len[0] - 1;
    for (int32_t k = 1; k < N; k++) {
        int32_t c = common_prefix(cw->ids[0], cw->len[0], cw->ids[k], cw->len[k]);
        shared = c < shared ? c : shared;
        shared = cw->len[k] - 1 < shared ? cw->len[k] - 1 : shared;
    }
    cw->shared = shared < 0 ? 0 : shared;
    const caprl_reader *r = s->r;
    bool has_prefix = r->n_prefix > 0 && cw->shared >= r->n_prefix &&
                      common_prefix(cw->ids[0], cw->len[0], r->prefix, r->n_prefix) == r->n_prefix;
    cw->start = has_prefix ? r->n_prefix : 0;
    return CAPRL_OK;
}

static void free_work(score_state *s) {
    for (int32_t c = 0; c < s->n_cap; c++) {
        cap_work *cw = &s->cw[c];
        for (int32_t k = 0; cw->ids && k < s->p->n_questions; k++) {
            free(cw->ids[k]);
        }
        free(cw->ids);
        free(cw->len);
        free(cw->unit_of);
        free(cw->same_as);
    }
    memset(s->cw, 0, (size_t)s->r->p.max_captions * sizeof(cap_work));
    for (int32_t u = 0; u < s->n_units; u++) {
        free(s->units[u].gen);
    }
    free(s->units);
    s->units = NULL;
    s->n_units = 0;
    s->n_cap = 0;
}

/* The units of the chunk: one per question, or with prefix caching in expected mode one per distinct prompt. */
static void build_units(score_state *s) {
    const int32_t N = s->p->n_questions;
    bool          dedupe = s->p->prefix_cache && s->p->mode == CAPRL_REWARD_EXPECTED;
    s->units = caprl_xcalloc((size_t)s->n_cap * (size_t)N, sizeof(unit));
    for (int32_t c = 0; c < s->n_cap; c++) {
        cap_work *cw = &s->cw[c];
        for (int32_t k = 0; k < N; k++) {
            if (dedupe && cw->same_as[k] != k) { /* same text, same tokens: same score */
                cw->unit_of[k] = cw->unit_of[cw->same_as[k]];
                continue;
            }
            unit *u = &s->units[s->n_units];
            u->c = c;
            u->q = k;
            u->from = s->p->prefix_cache ? cw->shared : 0;
            if (s->p->mode == CAPRL_REWARD_SAMPLE) {
                u->gen = caprl_xmalloc((size_t)s->p->max_new_tokens * sizeof(int32_t));
            }
            cw->unit_of[k] = s->n_units++;
        }
    }
}

/* Prefills each caption's part [start, shared) into its caption sequence, on top of a copy of the fixed prefix. */
static caprl_status prefill_captions(score_state *s, int32_t first_item, caprl_error *err) {
    caprl_reader *r = s->r;
    for (int32_t c = 0; c < s->n_cap; c++) {
        cap_work *cw = &s->cw[c];
        cw->slot = 1 + c;
        if (cw->start > 0) {
            CAPRL_TRY(caprl_context_seq_copy(r->ctx, 0, cw->slot, err));
        } else {
            caprl_context_seq_clear(r->ctx, cw->slot);
        }
        s->res[first_item + c].reader_tokens += cw->shared - cw->start;
        for (int32_t t = cw->start; t < cw->shared; t++) {
            batch_add(r, cw->ids[0][t], cw->slot, -1);
            if (r->b_n == r->p.n_batch_max) {
                CAPRL_TRY(batch_flush(r, err));
            }
        }
    }
    return batch_flush(r, err);
}

/* Handles the logits rows of the last flush. Step 0 (the last prompt position) records p(gold) at the mode's
 * temperature; in sample mode every step draws the unit's next token. */
static void read_rows(score_state *s, int32_t first_item, int32_t step) {
    caprl_reader *r = s->r;
    const int32_t V = caprl_model_config(r->model)->vocab_size;
    for (int32_t row = 0; row < r->b_rows; row++) {
        unit        *u = &s->units[r->b_unit[row]];
        const float *z = caprl_context_logits(r->ctx, row);
        if (step == 0) {
            const caprl_reward_question *q = &s->res[first_item + u->c].questions[u->q];
            float t = s->p->mode == CAPRL_REWARD_EXPECTED ? s->p->tau : s->p->temperature;
            u->p_gold = gold_prob(z, V, t, letter_id(r, q->gold));
        }
        if (s->p->mode == CAPRL_REWARD_SAMPLE) {
            int32_t tok = caprl_sampler_sample(s->sampler, z, NULL, 0,
                                               sample_stream(&s->items[first_item + u->c], u->q), (uint64_t)step);
            u->gen[u->n_gen++] = tok;
            u->done = is_eos(r, tok) || u->n_gen >= s->p->max_new_tokens;
        }
    }
    r->b_rows = 0;
}

/* Sample mode: decodes the wave's unfinished units one token per step until eos or max_new_tokens. */
static caprl_status decode_wave(score_state *s, int32_t first_item, int32_t u0, int32_t u1, caprl_error *err) {
    caprl_reader *r = s->r;
    for (int32_t step = 1; step < s->p->max_new_tokens; step++) {
        int32_t n_active = 0;
        r->b_n = 0;
        for (int32_t i = u0; i < u1; i++) {
            unit *u = &s->units[i];
            if (u->done) {
                continue;
            }
            n_active++;
            batch_add(r, u->gen[u->n_gen - 1], u->slot, i);
            s->res[first_item + u->c].reader_tokens++;
            if (r->b_n == r->p.n_batch_max) {
                CAPRL_TRY(batch_flush(r, err));
                read_rows(s, first_item, step);
            }
        }
        if (n_active == 0) {
            break;
        }
        CAPRL_TRY(batch_flush(r, err));
        read_rows(s, first_item, step);
    }
    return CAPRL_OK;
}

/* Runs the units in waves of max_sequences: copy the caption sequence (or start empty), run the suffix, read the
 * last position's logits, then (sample mode) decode. */
static caprl_status run_units(score_state *s, int32_t first_item, caprl_error *err) {
    caprl_reader *r = s->r;
    const int32_t slot0 = 1 + r->p.max_captions;
    for (int32_t u0 = 0; u0 < s->n_units; u0 += r->p.max_sequences) {
        int32_t u1 = u0 + r->p.max_sequences < s->n_units ? u0 + r->p.max_sequences : s->n_units;
        r->b_n = 0;
        for (int32_t i = u0; i < u1; i++) {
            unit     *u = &s->units[i];
            cap_work *cw = &s->cw[u->c];
            u->slot = slot0 + (i - u0);
            if (u->from > 0) {
                CAPRL_TRY(caprl_context_seq_copy(r->ctx, cw->slot, u->slot, err));
            } else {
                caprl_context_seq_clear(r->ctx, u->slot);
            }
            const int32_t *ids = cw->ids[u->q];
            int32_t        len = cw->len[u->q];
            s->res[first_item + u->c].reader_tokens += len - u->from;
            for (int32_t t = u->from; t < len; t++) {
                batch_add(r, ids[t], u->slot, t == len - 1 ? i : -1);
                if (r->b_n == r->p.n_batch_max) {
                    CAPRL_TRY(batch_flush(r, err));
                    read_rows(s, first_item, 0);
                }
            }
        }
        CAPRL_TRY(batch_flush(r, err));
        read_rows(s, first_item, 0);
        if (s->p->mode == CAPRL_REWARD_SAMPLE) {
            CAPRL_TRY(decode_wave(s, first_item, u0, u1, err));
        }
    }
    return CAPRL_OK;
}

/* Copies the units' outcomes into the results and computes the rewards. */
static caprl_status finish_chunk(score_state *s, int32_t first_item, caprl_error *err) {
    const caprl_reward_params *p = s->p;
    for (int32_t c = 0; c < s->n_cap; c++) {
        caprl_reward_result     *res = &s->res[first_item + c];
        const caprl_reward_item *it = &s->items[first_item + c];
        double                   sum = 0.0;
        for (int32_t k = 0; k < p->n_questions; k++) {
            caprl_reward_question *q = &res->questions[k];
            const unit            *u = &s->units[s->cw[c].unit_of[k]];
            q->p_gold = u->p_gold;
            if (p->mode == CAPRL_REWARD_EXPECTED) {
                q->score = q->p_gold;
            } else {
                size_t len = 0;
                int32_t n = u->n_gen;
                CAPRL_TRY(caprl_tokenizer_decode(s->r->tok, u->gen, n, true, s->text_buf, s->text_cap, &len, err));
                if (len + 1 > s->text_cap) {
                    s->text_cap = len + 1;
                    s->text_buf = caprl_xrealloc(s->text_buf, s->text_cap);
                    CAPRL_TRY(caprl_tokenizer_decode(s->r->tok, u->gen, n, true, s->text_buf, s->text_cap, &len,
                                                     err));
                }
                q->continuation = caprl_xstrndup(s->text_buf, len);
                q->answer = caprl_reward_parse_letter(q->continuation, len);
                q->score = q->answer != 0 && q->answer == q->gold ? 1.0f : 0.0f;
            }
            sum += (double)q->score;
        }
        res->accuracy = (float)(sum / p->n_questions);
        res->length = p->length_weight > 0.0f && it->caption_tokens >= 0
                          ? caprl_reward_length_term(it->caption_tokens, p->length_l1, p->length_l2)
                          : 1.0f;
        res->reward = res->accuracy + (p->length_weight > 0.0f ? p->length_weight * res->length : 0.0f);
    }
    return CAPRL_OK;
}

static caprl_status score_chunk(score_state *s, int32_t first, int32_t count, caprl_error *err) {
    s->n_cap = count;
    int32_t longest = 0;
    for (int32_t c = 0; c < count; c++) {
        CAPRL_TRY(prepare_item(s, first + c, &s->cw[c], err));
        for (int32_t k = 0; k < s->p->n_questions; k++) {
            longest = s->cw[c].len[k] > longest ? s->cw[c].len[k] : longest;
        }
    }
    int32_t need = longest + (s->p->mode == CAPRL_REWARD_SAMPLE ? s->p->max_new_tokens : 0);
    CAPRL_TRY(ensure_context(s->r, need, err));
    build_units(s);
    if (s->p->prefix_cache) {
        CAPRL_TRY(prefill_captions(s, first, err));
    }
    CAPRL_TRY(run_units(s, first, err));
    return finish_chunk(s, first, err);
}

caprl_status caprl_reward_score(caprl_reader *r, const caprl_reward_item *items, int32_t n,
                                const caprl_reward_params *params, caprl_reward_result *results, caprl_error *err) {
    caprl_reward_params p = params ? *params : caprl_reward_default_params();
    for (int32_t i = 0; i < n; i++) {
        memset(&results[i], 0, sizeof results[i]);
    }
    CAPRL_TRY(caprl_reward_params_check(&p, err));
    if (n < 0) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "reward: %d items", n);
    }
    score_state s;
    memset(&s, 0, sizeof s);
    s.r = r;
    s.p = &p;
    s.items = items;
    s.res = results;
    s.cw = caprl_xcalloc((size_t)r->p.max_captions, sizeof(cap_work));
    caprl_status st = CAPRL_OK;
    if (p.mode == CAPRL_REWARD_SAMPLE) {
        caprl_sampling_params sp = caprl_sampling_default_params();
        sp.temperature = p.temperature;
        sp.seed = p.seed ^ ((uint64_t)SAMPLE_KEY << 48);
        st = caprl_sampler_init(&s.sampler, caprl_model_config(r->model)->vocab_size, &sp, err);
        s.text_cap = 256;
        s.text_buf = caprl_xmalloc(s.text_cap);
    }
    for (int32_t first = 0; first < n && st == CAPRL_OK; first += r->p.max_captions) {
        int32_t count = n - first < r->p.max_captions ? n - first : r->p.max_captions;
        st = score_chunk(&s, first, count, err);
        free_work(&s);
    }
    free_work(&s);
    free(s.cw);
    free(s.text_buf);
    caprl_sampler_free(s.sampler);
    return st;
}

void caprl_reward_result_clear(caprl_reward_result *res) {
    if (!res) {
        return;
    }
    for (int32_t k = 0; res->questions && k < res->n_questions; k++) {
        free(res->questions[k].text);
        free(res->questions[k].continuation);
    }
    free(res->questions);
    memset(res, 0, sizeof *res);
}
