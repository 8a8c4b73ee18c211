/* The trainer on a tiny random Qwen2 (odd sizes, GQA 3:1, tied and untied, two sequences packed):
 * - the training forward's log-probabilities equal those computed from caprl_context's logits;
 * - gradients of sampled elements of every tensor equal central finite differences of a float64 reference loss
 *   (tests/ref_qwen2.h with the parameters perturbed in double);
 * - recompute on/off and 1 vs 2 threads give bit-identical gradients; frozen groups get none (and the others are
 *   unchanged); two micro-batches accumulate to the packed batch; backward twice doubles;
 * - bf16 mixed precision runs close to f32; sync makes inference see new weights; a trained bf16 checkpoint is
 *   saved in bf16; the model keeps the trained weights after the trainer is freed; batch errors. */
#include <float.h>

#include "caprl/model.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl/train.h"
#include "caprl_test.h"
#include "ref_qwen2.h"

static caprl_text_config small_config(bool tied) {
    caprl_text_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 53;
    c.hidden_size = 24;
    c.intermediate_size = 37;
    c.n_layers = 2;
    c.n_heads = 3;
    c.n_kv_heads = 1;
    c.head_dim = 8;
    c.max_position_embeddings = 64;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = tied;
    c.bos_token_id = -1;
    c.eos_token_id = 52;
    c.torch_dtype = -1;
    return c;
}

/* ---- the batch: two sequences (7 and 5 tokens) packed ------------------------------------------------------ */

enum { N_TOK = 12, N_SEQ = 2 };
static const int32_t k_tokens[N_TOK] = {3, 17, 44, 17, 9, 51, 0, 22, 5, 38, 5, 12};
static const int32_t k_seq_start[N_SEQ + 1] = {0, 7, 12};
static int32_t       g_target[N_TOK];
static float         g_dlogp[N_TOK]; /* dL/dlogp: the loss is sum_t dlogp[t] * logp[t] */
static const float   k_temp = 0.7f;

static void make_batch_data(void) {
    for (int s = 0; s < N_SEQ; s++) {
        for (int t = k_seq_start[s]; t < k_seq_start[s + 1]; t++) {
            g_target[t] = t + 1 < k_seq_start[s + 1] ? k_tokens[t + 1] : -1;
        }
    }
    g_target[2] = -1; /* a masked position inside a sequence */
    for (int t = 0; t < N_TOK; t++) {
        g_dlogp[t] = (float)(0.3 + 0.1 * ((t * 7) % 5)) * (t % 3 == 1 ? -1.0f : 1.0f);
    }
}

static caprl_train_batch whole_batch(void) {
    caprl_train_batch b;
    memset(&b, 0, sizeof b);
    b.n_tokens = N_TOK;
    b.tokens = k_tokens;
    b.n_seqs = N_SEQ;
    b.seq_start = k_seq_start;
    b.target = g_target;
    return b;
}

/* ---- setup helpers ---------------------------------------------------------------------------------------- */

static caprl_model *make_model(bool tied, int32_t dtype, int32_t n_threads) {
    caprl_text_config  cfg = small_config(tied);
    caprl_model_params mp = caprl_model_default_params();
    mp.n_threads = n_threads;
    caprl_model *m = NULL;
    caprl_error  err = {0};
    CHECK_OK(caprl_model_init_random(&m, &cfg, dtype, 5, 0.25f, &mp, &err), &err);
    if (!m) {
        exit(test_finish("test_train_text"));
    }
    return m;
}

static caprl_trainer_params small_params(void) {
    caprl_trainer_params p = caprl_trainer_default_params();
    p.max_tokens = 16;
    p.max_seqs = 4;
    p.logits_chunk = 4; /* 10 scored rows: chunks of 4, 4, 2 */
    return p;
}

static caprl_trainer *make_trainer(caprl_model *m, const caprl_trainer_params *p) {
    caprl_trainer *tr = NULL;
    caprl_error    err = {0};
    CHECK_OK(caprl_trainer_init(&tr, m, NULL, p, &err), &err);
    if (!tr) {
        exit(test_finish("test_train_text"));
    }
    return tr;
}

/* One forward + backward of the whole batch; returns logp (N_TOK) in out_logp when not NULL. */
static void step(caprl_trainer *tr, const caprl_train_batch *b, const float *dlogp, float *out_logp) {
    float       logp[N_TOK], ent[N_TOK];
    caprl_error err = {0};
    CHECK_OK(caprl_trainer_forward(tr, b, k_temp, logp, ent, &err), &err);
    CHECK_OK(caprl_trainer_backward(tr, dlogp, &err), &err);
    if (out_logp) {
        memcpy(out_logp, logp, (size_t)b->n_tokens * sizeof(float));
    }
}

static float *copy_grads(caprl_trainer *tr) {
    size_t n = (size_t)caprl_trainer_n_params(tr);
    float *g = malloc(n * sizeof(float));
    memcpy(g, caprl_trainer_grads(tr), n * sizeof(float));
    return g;
}

/* ---- inference parity ------------------------------------------------------------------------------------- */

/* log p(target) and entropy at temperature T, in double, from caprl_context's f32 logits of each sequence. */
static void inference_logp(caprl_model *m, double *logp, double *ent) {
    int32_t              V = caprl_model_config(m)->vocab_size;
    caprl_context_params cp = caprl_context_default_params();
    cp.n_ctx = 16;
    cp.n_batch_max = 16;
    cp.n_logits_max = 16;
    caprl_context *ctx = NULL;
    caprl_error    err = {0};
    CHECK_OK(caprl_context_init(&ctx, m, &cp, &err), &err);
    int32_t seq[N_TOK] = {0};
    int8_t  want[N_TOK];
    memset(want, 1, sizeof want);
    for (int s = 0; s < N_SEQ; s++) {
        int32_t     a = k_seq_start[s], n = k_seq_start[s + 1] - a;
        caprl_batch b = {.n_tokens = n, .tokens = k_tokens + a, .seq_ids = seq, .want_logits = want};
        caprl_context_seq_clear(ctx, -1);
        CHECK_OK(caprl_context_decode(ctx, &b, &err), &err);
        for (int32_t t = 0; t < n; t++) {
            const float *z = caprl_context_logits(ctx, t);
            double       mx = -INFINITY, sum = 0, plogp = 0;
            for (int32_t v = 0; v < V; v++) {
                mx = fmax(mx, z[v] / (double)k_temp);
            }
            for (int32_t v = 0; v < V; v++) {
                sum += exp(z[v] / (double)k_temp - mx);
            }
            double lse = mx + log(sum);
            for (int32_t v = 0; v < V; v++) {
                double lp = z[v] / (double)k_temp - lse;
                plogp += exp(lp) * lp;
            }
            int32_t tgt = g_target[a + t];
            logp[a + t] = tgt >= 0 ? z[tgt] / (double)k_temp - lse : 0.0;
            ent[a + t] = tgt >= 0 ? -plogp : 0.0;
        }
    }
    caprl_context_free(ctx);
}

static void check_forward_parity(bool tied) {
    caprl_model         *m = make_model(tied, CAPRL_DTYPE_F32, 2);
    caprl_trainer_params p = small_params();
    caprl_trainer       *tr = make_trainer(m, &p);
    caprl_train_batch    b = whole_batch();
    float                logp[N_TOK], ent[N_TOK];
    double               ref_lp[N_TOK], ref_ent[N_TOK];
    caprl_error          err = {0};
    CHECK_OK(caprl_trainer_forward(tr, &b, k_temp, logp, ent, &err), &err);
    inference_logp(m, ref_lp, ref_ent);
    /* Same kernels except attention (packed-segment vs KV-cache): f32 rounding of a few reductions of length
     * <= 53 on values of size ~|logp|; 64 eps relative to that is far below any real error (1e-2 and up). */
    for (int t = 0; t < N_TOK; t++) {
        CHECK_NEAR(logp[t], ref_lp[t], 0, 64 * FLT_EPSILON * (1 + fabs(ref_lp[t])));
        CHECK_NEAR(ent[t], ref_ent[t], 0, 64 * FLT_EPSILON * (1 + fabs(ref_ent[t])));
        if (g_target[t] < 0) {
            CHECK(logp[t] == 0.0f && ent[t] == 0.0f);
        }
    }
    caprl_trainer_free(tr);
    caprl_model_free(m);
}

/* ---- finite differences against the float64 reference ----------------------------------------------------- */

typedef struct fd_state {
    caprl_text_config cfg;
    ref_param        *params; /* (n) the trainer's tensors as double */
    double          **vals;   /* (n) the same arrays, writable */
    int               n;
} fd_state;

static void fd_init(fd_state *s, caprl_trainer *tr, const caprl_text_config *cfg) {
    s->cfg = *cfg;
    s->n = caprl_trainer_n_tensors(tr);
    s->params = calloc((size_t)s->n, sizeof *s->params);
    s->vals = calloc((size_t)s->n, sizeof *s->vals);
    const float *flat = caprl_trainer_params_f32(tr);
    for (int i = 0; i < s->n; i++) {
        const caprl_param_info *t = caprl_trainer_tensor(tr, i);
        double                 *d = malloc((size_t)t->numel * sizeof(double));
        for (int64_t j = 0; j < t->numel; j++) {
            d[j] = flat[t->offset + j];
        }
        s->params[i] = (ref_param){t->name, d, t->numel};
        s->vals[i] = d;
    }
}

static void fd_free(fd_state *s) {
    for (int i = 0; i < s->n; i++) {
        free(s->vals[i]);
    }
    free(s->params);
    free(s->vals);
}

/* L = sum over scored t of dlogp[t] * log softmax(logits_t / T)[target t], in double. */
static double ref_loss(const fd_state *s) {
    ref_model r = {s->cfg, NULL};
    int       V = s->cfg.vocab_size;
    double    L = 0;
    g_ref_params = s->params;
    g_ref_n_params = s->n;
    for (int q = 0; q < N_SEQ; q++) {
        int      a = k_seq_start[q], T = k_seq_start[q + 1] - a;
        int32_t *pos3 = malloc((size_t)3 * T * sizeof(int32_t));
        for (int c = 0; c < 3; c++) {
            for (int t = 0; t < T; t++) {
                pos3[c * T + t] = t;
            }
        }
        ref_input in = {.ids = k_tokens + a, .T = T, .pos3 = pos3, .embd_row = NULL, .embd = NULL};
        double   *z = ref_forward(&r, &in);
        for (int t = 0; t < T; t++) {
            if (g_target[a + t] < 0) {
                continue;
            }
            double mx = -INFINITY, sum = 0;
            for (int v = 0; v < V; v++) {
                mx = fmax(mx, z[(size_t)t * V + v] / k_temp);
            }
            for (int v = 0; v < V; v++) {
                sum += exp(z[(size_t)t * V + v] / k_temp - mx);
            }
            L += g_dlogp[a + t] * (z[(size_t)t * V + g_target[a + t]] / k_temp - mx - log(sum));
        }
        free(z);
        free(pos3);
    }
    g_ref_params = NULL;
    g_ref_n_params = 0;
    return L;
}

static double fd_grad(fd_state *s, int i, int64_t j) {
    double *d = s->vals[i], p0 = d[j], h = 1e-4 * fmax(1.0, fabs(p0));
    d[j] = p0 + h;
    double lp = ref_loss(s);
    d[j] = p0 - h;
    double lm = ref_loss(s);
    d[j] = p0;
    return (lp - lm) / (2 * h);
}

static void check_finite_differences(bool tied) {
    caprl_model         *m = make_model(tied, CAPRL_DTYPE_F32, 2);
    caprl_trainer_params p = small_params();
    caprl_trainer       *tr = make_trainer(m, &p);
    caprl_train_batch    b = whole_batch();
    step(tr, &b, g_dlogp, NULL);
    const float *g = caprl_trainer_grads(tr);
    fd_state     s;
    fd_init(&s, tr, caprl_model_config(m));
    enum { PER_TENSOR = 4 };
    int     n = caprl_trainer_n_tensors(tr);
    double *fd = calloc((size_t)n * PER_TENSOR, sizeof(double)), *an = calloc((size_t)n * PER_TENSOR, sizeof(double));
    int64_t idx[PER_TENSOR];
    double  scale = 0;
    for (int i = 0; i < n; i++) {
        const caprl_param_info *t = caprl_trainer_tensor(tr, i);
        for (int k = 0; k < PER_TENSOR; k++) {
            if (t->group == CAPRL_GROUP_EMBED) { /* rows of tokens in the batch (input and head), and one not */
                int32_t row = k < 3 ? k_tokens[(5 * k + 1) % N_TOK] : 50;
                idx[k] = (int64_t)row * t->shape[1] + (7 * k + 3) % t->shape[1];
            } else {
                idx[k] = (int64_t)((k * 2654435761u + (uint32_t)i * 40503u) % (uint64_t)t->numel);
            }
            fd[i * PER_TENSOR + k] = fd_grad(&s, i, idx[k]);
            an[i * PER_TENSOR + k] = g[t->offset + idx[k]];
            scale = fmax(scale, fabs(fd[i * PER_TENSOR + k]));
        }
    }
    /* f32 forward and backward through two layers and a 53-way softmax: observed errors are ~1e-6 of the largest
     * gradient; 2000 eps (2.4e-4) of it plus 2e4 eps relative still fails on any wrong term (>= 1e-2). */
    double max_err = 0;
    for (int i = 0; i < n; i++) {
        const caprl_param_info *t = caprl_trainer_tensor(tr, i);
        for (int k = 0; k < PER_TENSOR; k++) {
            double a = an[i * PER_TENSOR + k], f = fd[i * PER_TENSOR + k];
            max_err = fmax(max_err, fabs(a - f) / scale);
            CHECK_MSG(fabs(a - f) <= 2000 * FLT_EPSILON * scale + 2e4 * FLT_EPSILON * fabs(f),
                      "%s tied=%d element %d: grad %.9g vs finite difference %.9g", t->name, tied, k, a, f);
        }
    }
    CHECK(scale > 1e-2); /* the check has something to compare */
    fprintf(stderr, "finite differences (tied=%d): %d tensors, max error %.3g of the largest gradient %.3g\n", tied, n,
            max_err, scale);
    free(fd);
    free(an);
    fd_free(&s);
    caprl_trainer_free(tr);
    caprl_model_free(m);
}

/* ---- determinism, freezing, accumulation ------------------------------------------------------------------ */

static float *grads_with(bool tied, int32_t n_threads, bool recompute, int32_t frozen) {
    caprl_model         *m = make_model(tied, CAPRL_DTYPE_F32, n_threads);
    caprl_trainer_params p = small_params();
    p.recompute = recompute;
    p.frozen_groups = frozen;
    caprl_trainer    *tr = make_trainer(m, &p);
    caprl_train_batch b = whole_batch();
    step(tr, &b, g_dlogp, NULL);
    float *g = copy_grads(tr);
    caprl_trainer_free(tr);
    caprl_model_free(m);
    return g;
}

static void check_determinism_and_freezing(bool tied) {
    caprl_model         *m = make_model(tied, CAPRL_DTYPE_F32, 1);
    caprl_trainer_params p = small_params();
    caprl_trainer       *tr = make_trainer(m, &p);
    size_t               n = (size_t)caprl_trainer_n_params(tr);
    float               *base = grads_with(tied, 1, false, 0);
    float               *rc = grads_with(tied, 1, true, 0);
    float               *t2 = grads_with(tied, 2, false, 0);
    float               *t2rc = grads_with(tied, 2, true, 0);
    CHECK(memcmp(base, rc, n * sizeof(float)) == 0);
    CHECK(memcmp(base, t2, n * sizeof(float)) == 0);
    CHECK(memcmp(base, t2rc, n * sizeof(float)) == 0);
    const int32_t sets[3] = {CAPRL_GROUP_TEXT, CAPRL_GROUP_EMBED, CAPRL_GROUP_TEXT | CAPRL_GROUP_EMBED};
    for (int k = 0; k < 3; k++) {
        float *fz = grads_with(tied, 2, k == 1, sets[k]);
        for (int32_t i = 0; i < caprl_trainer_n_tensors(tr); i++) {
            const caprl_param_info *t = caprl_trainer_tensor(tr, i);
            bool                    frozen = (t->group & sets[k]) != 0, same = true, zero = true, nonzero = false;
            for (int64_t j = 0; j < t->numel; j++) {
                same = same && fz[t->offset + j] == base[t->offset + j];
                zero = zero && fz[t->offset + j] == 0.0f;
                nonzero = nonzero || base[t->offset + j] != 0.0f;
            }
            /* frozen: nothing; trainable: exactly what the unfrozen run computes */
            CHECK_MSG(frozen ? zero : same, "frozen 0x%x: %s", sets[k], t->name);
            CHECK_MSG(nonzero, "%s has an all-zero gradient", t->name);
        }
        free(fz);
    }
    free(base);
    free(rc);
    free(t2);
    free(t2rc);
    caprl_trainer_free(tr);
    caprl_model_free(m);
}

static double max_abs(const float *a, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) {
        s = fmax(s, fabs(a[i]));
    }
    return s;
}

static void check_accumulation(bool tied) {
    caprl_model         *m = make_model(tied, CAPRL_DTYPE_F32, 2);
    caprl_trainer_params p = small_params();
    caprl_trainer       *tr = make_trainer(m, &p);
    size_t               n = (size_t)caprl_trainer_n_params(tr);
    caprl_train_batch    b = whole_batch();
    step(tr, &b, g_dlogp, NULL);
    float *once = copy_grads(tr);
    double scale = max_abs(once, n);
    /* backward twice: twice the gradient */
    step(tr, &b, g_dlogp, NULL);
    const float *g = caprl_trainer_grads(tr);
    for (size_t i = 0; i < n; i++) {
        CHECK_NEAR(g[i], 2.0 * once[i], 0, 16 * FLT_EPSILON * scale);
    }
    /* the two sequences as two micro-batches */
    caprl_trainer_zero_grads(tr);
    for (int s = 0; s < N_SEQ; s++) {
        int32_t           a = k_seq_start[s], len = k_seq_start[s + 1] - a, starts[2] = {0, len};
        caprl_train_batch mb = whole_batch();
        mb.n_tokens = len;
        mb.tokens = k_tokens + a;
        mb.n_seqs = 1;
        mb.seq_start = starts;
        mb.target = g_target + a;
        step(tr, &mb, g_dlogp + a, NULL);
    }
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        bad += fabs(g[i] - once[i]) > 64 * FLT_EPSILON * scale;
    }
    CHECK_MSG(bad == 0, "%d gradients differ between one batch and two micro-batches", bad);
    free(once);
    caprl_trainer_free(tr);
    caprl_model_free(m);
}

/* ---- mixed precision, sync, save, ownership --------------------------------------------------------------- */

static double rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / den);
}

static void check_bf16(void) {
    caprl_model         *m32 = make_model(true, CAPRL_DTYPE_F32, 2), *m16 = make_model(true, CAPRL_DTYPE_F32, 2);
    caprl_trainer_params p = small_params();
    caprl_trainer       *t32 = make_trainer(m32, &p);
    p.precision = CAPRL_PRECISION_BF16;
    caprl_trainer    *t16 = make_trainer(m16, &p);
    caprl_train_batch b = whole_batch();
    float             lp32[N_TOK], lp16[N_TOK];
    step(t32, &b, g_dlogp, lp32);
    step(t16, &b, g_dlogp, lp16);
    /* bf16 operands (8 significant bits): logp moves by O(1e-2), gradients by a few percent */
    for (int t = 0; t < N_TOK; t++) {
        CHECK_NEAR(lp16[t], lp32[t], 0, 0.05 * (1 + fabs(lp32[t])));
    }
    size_t n = (size_t)caprl_trainer_n_params(t32);
    double e = rel_l2(caprl_trainer_grads(t16), caprl_trainer_grads(t32), n);
    CHECK_MSG(e < 0.05 && e > 0, "bf16 vs f32 gradients: relative L2 difference %.3g", e);
    /* inference on the mixed-precision model reads the same bf16 weights */
    double ref_lp[N_TOK], ref_ent[N_TOK];
    float  ent[N_TOK];
    inference_logp(m16, ref_lp, ref_ent);
    caprl_error err = {0};
    CHECK_OK(caprl_trainer_forward(t16, &b, k_temp, lp16, ent, &err), &err);
    for (int t = 0; t < N_TOK; t++) {
        CHECK_NEAR(lp16[t], ref_lp[t], 0, 64 * FLT_EPSILON * (1 + fabs(ref_lp[t])));
    }
    /* change the masters, sync: both forwards see the new weights (the shadow was refreshed) */
    float *flat = caprl_trainer_params_f32(t16);
    for (int64_t i = 0; i < caprl_trainer_n_params(t16); i++) {
        flat[i] *= 1.1f;
    }
    CHECK_OK(caprl_trainer_sync(t16, &err), &err);
    float lp_new[N_TOK];
    CHECK_OK(caprl_trainer_forward(t16, &b, k_temp, lp_new, NULL, &err), &err);
    inference_logp(m16, ref_lp, ref_ent);
    bool moved = false;
    for (int t = 0; t < N_TOK; t++) {
        CHECK_NEAR(lp_new[t], ref_lp[t], 0, 64 * FLT_EPSILON * (1 + fabs(ref_lp[t])));
        moved = moved || fabs(lp_new[t] - lp16[t]) > 1e-3;
    }
    CHECK(moved);
    /* a later trainer starts from the f32 masters, not from their bf16 copies */
    size_t n_all = (size_t)caprl_trainer_n_params(t16);
    float *masters = malloc(n_all * sizeof(float));
    memcpy(masters, flat, n_all * sizeof(float));
    caprl_trainer_free(t16);
    p.precision = CAPRL_PRECISION_F32;
    t16 = make_trainer(m16, &p);
    CHECK(memcmp(caprl_trainer_params_f32(t16), masters, n_all * sizeof(float)) == 0); /* gaps: 1.1 * 0 */
    free(masters);
    caprl_trainer_free(t32);
    caprl_trainer_free(t16);
    caprl_model_free(m32);
    caprl_model_free(m16);
}

/* A bf16 checkpoint trained in f32 is saved in bf16 (rounded masters), vectors included; the model keeps the
 * trained weights once the trainer is gone. */
static void check_save_and_ownership(void) {
    caprl_model         *m = make_model(false, CAPRL_DTYPE_BF16, 2);
    caprl_trainer_params p = small_params();
    caprl_trainer       *tr = make_trainer(m, &p);
    float               *flat = caprl_trainer_params_f32(tr);
    for (int64_t i = 0; i < caprl_trainer_n_params(tr); i++) {
        flat[i] += 1e-3f * (float)((i % 7) - 3); /* not representable in bf16 in general */
    }
    caprl_error err = {0};
    CHECK_OK(caprl_trainer_sync(tr, &err), &err);
    double lp_before[N_TOK], ent[N_TOK];
    inference_logp(m, lp_before, ent);
    char *dir = test_tmpdir("test_train_text");
    CHECK_OK(caprl_model_save(m, dir, &err), &err);
    caprl_safetensors *st = NULL;
    CHECK_OK(caprl_safetensors_open_dir(&st, dir, &err), &err);
    int32_t n_checked = 0;
    for (int32_t i = 0; st && i < caprl_trainer_n_tensors(tr); i++) {
        const caprl_param_info *t = caprl_trainer_tensor(tr, i);
        const caprl_st_tensor  *s = caprl_safetensors_find(st, t->name);
        CHECK_MSG(s && s->dtype == CAPRL_DTYPE_BF16 && s->numel == t->numel, "%s saved as bf16", t->name);
        for (int64_t j = 0; s && s->dtype == CAPRL_DTYPE_BF16 && j < t->numel; j++) {
            uint16_t h;
            memcpy(&h, (const uint8_t *)s->data + 2 * j, 2);
            n_checked += h == caprl_f32_to_bf16(flat[t->offset + j]);
        }
    }
    int64_t total = 0;
    for (int32_t i = 0; i < caprl_trainer_n_tensors(tr); i++) {
        total += caprl_trainer_tensor(tr, i)->numel;
    }
    CHECK_EQ_I64(n_checked, total);
    caprl_safetensors_free(st);
    size_t n = (size_t)caprl_trainer_n_params(tr);
    float *trained = malloc(n * sizeof(float));
    memcpy(trained, flat, n * sizeof(float));
    caprl_trainer_free(tr);
    double lp_after[N_TOK];
    inference_logp(m, lp_after, ent);
    CHECK(memcmp(lp_before, lp_after, sizeof lp_after) == 0);
    /* a second trainer on the same model starts from the trained values */
    caprl_trainer *tr2 = make_trainer(m, &p);
    for (int32_t i = 0; i < caprl_trainer_n_tensors(tr2); i++) {
        const caprl_param_info *t = caprl_trainer_tensor(tr2, i);
        CHECK(memcmp(caprl_trainer_params_f32(tr2) + t->offset, trained + t->offset,
                     (size_t)t->numel * sizeof(float)) == 0);
    }
    free(trained);
    caprl_trainer_free(tr2);
    inference_logp(m, lp_after, ent);
    CHECK(memcmp(lp_before, lp_after, sizeof lp_after) == 0);
    free(dir);
    caprl_model_free(m);
}

static void check_errors(void) {
    caprl_model         *m = make_model(true, CAPRL_DTYPE_F32, 1);
    caprl_trainer_params p = small_params();
    caprl_trainer       *tr = make_trainer(m, &p);
    caprl_error          err = {0};
    float                logp[N_TOK];
    CHECK(caprl_trainer_backward(tr, g_dlogp, &err) == CAPRL_ERR_INVALID_ARG);
    caprl_train_batch b = whole_batch();
    int32_t           bad_tokens[N_TOK];
    memcpy(bad_tokens, k_tokens, sizeof bad_tokens);
    bad_tokens[4] = 53;
    b.tokens = bad_tokens;
    CHECK(caprl_trainer_forward(tr, &b, 1.0f, logp, NULL, &err) == CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "token 4") != NULL);
    b = whole_batch();
    CHECK(caprl_trainer_forward(tr, &b, 0.0f, logp, NULL, &err) == CAPRL_ERR_INVALID_ARG);
    int32_t starts[2] = {0, 11};
    b.n_seqs = 1;
    b.seq_start = starts;
    CHECK(caprl_trainer_forward(tr, &b, 1.0f, logp, NULL, &err) == CAPRL_ERR_INVALID_ARG);
    b = whole_batch();
    b.n_tokens = 17;
    CHECK(caprl_trainer_forward(tr, &b, 1.0f, logp, NULL, &err) == CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "max_tokens") != NULL);
    b = whole_batch();
    b.n_images = 1;
    CHECK(caprl_trainer_forward(tr, &b, 1.0f, logp, NULL, &err) == CAPRL_ERR_INVALID_ARG);
    /* a failed forward leaves nothing to differentiate */
    CHECK(caprl_trainer_backward(tr, g_dlogp, &err) == CAPRL_ERR_INVALID_ARG);
    /* a good one after errors works, once */
    b = whole_batch();
    CHECK_OK(caprl_trainer_forward(tr, &b, 1.0f, logp, NULL, &err), &err);
    CHECK_OK(caprl_trainer_backward(tr, g_dlogp, &err), &err);
    CHECK(caprl_trainer_backward(tr, g_dlogp, &err) == CAPRL_ERR_INVALID_ARG);
    CHECK(caprl_trainer_bytes(tr) > caprl_trainer_activation_bytes(tr));
    size_t full = caprl_trainer_activation_bytes(tr);
    caprl_trainer_free(tr);
    p.recompute = true;
    tr = make_trainer(m, &p);
    CHECK(caprl_trainer_activation_bytes(tr) < full); /* one layer's activations instead of two */
    caprl_trainer_free(tr);
    p.recompute = false;
    p.max_seqs = 0;
    CHECK(caprl_trainer_init(&tr, m, NULL, &p, &err) == CAPRL_ERR_INVALID_ARG);
    caprl_model_free(m);
}

int main(void) {
    make_batch_data();
    for (int tied = 0; tied <= 1; tied++) {
        check_forward_parity(tied);
        check_finite_differences(tied);
        check_determinism_and_freezing(tied);
        check_accumulation(tied);
    }
    check_bf16();
    check_save_and_ownership();
    check_errors();
    return test_finish("test_train_text");
}
