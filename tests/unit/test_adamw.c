/* AdamW, gradient clipping and the LR schedules against a float64 re-implementation of torch's formulas
 * (torch/optim/adamw.py single-tensor path, torch/nn/utils/clip_grad.py), written here independently: a tiny random
 * Qwen2 model under a trainer, gradients set by hand, several steps with warmup + cosine, weight decay, clipping that
 * is active on some steps and not on others, and a grad_scale != 1. Also: frozen groups get no moments and are left
 * bit-for-bit alone (and stay out of the norm), a non-finite norm skips the update and zeroes the gradients, and
 * 1 vs 2 threads give bit-identical parameters. */
#include <float.h>

#include "caprl/model.h"
#include "caprl/tensor.h"
#include "caprl/train.h"
#include "caprl_test.h"
#include "core/rng_impl.h"
#include "train/adamw_impl.h"

static caprl_text_config tiny_config(bool tied) {
    caprl_text_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 67;
    c.hidden_size = 16;
    c.intermediate_size = 24;
    c.n_layers = 2;
    c.n_heads = 2;
    c.n_kv_heads = 1;
    c.head_dim = 8;
    c.max_position_embeddings = 64;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = tied;
    c.bos_token_id = -1;
    c.eos_token_id = 66;
    c.torch_dtype = -1;
    return c;
}

typedef struct setup {
    caprl_model   *m;
    caprl_trainer *tr;
    caprl_adamw   *opt;
} setup;

static setup make(int32_t threads, int32_t frozen, bool tied, const caprl_adamw_params *ap) {
    setup              s = {0};
    caprl_text_config  cfg = tiny_config(tied);
    caprl_model_params mp = caprl_model_default_params();
    mp.n_threads = threads;
    caprl_error err = {0};
    CHECK_OK(caprl_model_init_random(&s.m, &cfg, CAPRL_DTYPE_F32, 7, 0.3f, &mp, &err), &err);
    caprl_trainer_params tp = caprl_trainer_default_params();
    tp.max_tokens = 32;
    tp.max_seqs = 4;
    tp.frozen_groups = frozen;
    CHECK_OK(caprl_trainer_init(&s.tr, s.m, NULL, &tp, &err), &err);
    CHECK_OK(caprl_adamw_init(&s.opt, s.tr, ap, &err), &err);
    if (!s.opt) {
        exit(test_finish("test_adamw"));
    }
    return s;
}

static void drop(setup *s) {
    caprl_adamw_free(s->opt);
    caprl_trainer_free(s->tr);
    caprl_model_free(s->m);
}

/* Gradients of step k: normal with a per-step magnitude, so the global norm is sometimes above the clip and
 * sometimes below. Only the tensors' own elements are set (the layout has alignment gaps). */
static void set_grads(setup *s, int k, float magnitude) {
    caprl_rng r;
    caprl_rng_init(&r, 99, (uint64_t)k, 3);
    float *g = caprl_trainer_grads(s->tr);
    for (int32_t i = 0; i < caprl_trainer_n_tensors(s->tr); i++) {
        const caprl_param_info *t = caprl_trainer_tensor(s->tr, i);
        for (int64_t j = 0; j < t->numel; j++) {
            g[t->offset + j] = magnitude * caprl_rng_normal(&r);
        }
    }
}

/* ---- the float64 reference ------------------------------------------------------------------------------- */

typedef struct ref_state {
    double *p, *m, *v; /* (n_params) flat, like the trainer's layout */
    int64_t t;
} ref_state;

static double ref_lr(const caprl_adamw_params *a, int64_t step) {
    double lr = (double)a->lr;
    if (step < a->warmup_steps) {
        return lr * (double)(step + 1) / (double)a->warmup_steps;
    }
    if (a->schedule == CAPRL_LR_CONSTANT) {
        return lr;
    }
    double x = (double)(step - a->warmup_steps) / (double)(a->total_steps - a->warmup_steps);
    x = x > 1 ? 1 : x;
    double floor_ratio = (double)a->min_lr_ratio;
    return lr * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + cos(M_PI * x)));
}

/* One torch AdamW step on the trained tensors; returns the clip_grad_norm_ total norm. */
static double ref_step(ref_state *rs, const setup *s, const float *grads, double scale,
                       const caprl_adamw_params *a) {
    int32_t nt = caprl_trainer_n_tensors(s->tr);
    double  sumsq = 0;
    for (int32_t i = 0; i < nt; i++) {
        const caprl_param_info *t = caprl_trainer_tensor(s->tr, i);
        for (int64_t j = 0; adamw_tensor_trained(s->opt, i) && j < t->numel; j++) {
            double g = (double)grads[t->offset + j] * scale;
            sumsq += g * g;
        }
    }
    double norm = sqrt(sumsq);
    double coef = (double)a->max_grad_norm / (norm + 1e-6);
    coef = coef < 1 ? coef : 1;
    double lr = ref_lr(a, rs->t);
    rs->t++;
    double b1 = (double)a->beta1, b2 = (double)a->beta2;
    double bc1 = 1 - pow(b1, (double)rs->t), bc2 = 1 - pow(b2, (double)rs->t);
    for (int32_t i = 0; i < nt; i++) {
        const caprl_param_info *t = caprl_trainer_tensor(s->tr, i);
        for (int64_t j = 0; adamw_tensor_trained(s->opt, i) && j < t->numel; j++) {
            int64_t o = t->offset + j;
            double  g = (double)grads[o] * scale * coef;
            rs->p[o] *= 1 - lr * (double)a->weight_decay;
            rs->m[o] = b1 * rs->m[o] + (1 - b1) * g;
            rs->v[o] = b2 * rs->v[o] + (1 - b2) * g * g;
            double denom = sqrt(rs->v[o]) / sqrt(bc2) + (double)a->eps;
            rs->p[o] -= lr / bc1 * rs->m[o] / denom;
        }
    }
    return norm;
}

/* Max over elements of |p - ref| / (|ref| + lr): float32 arithmetic on the same inputs stays within a few
 * FLT_EPSILON per step of that scale (each step rounds p, and the update, whose size is about lr, to float). */
static double max_scaled_err(const setup *s, const ref_state *rs, double lr) {
    const float *p = caprl_trainer_params_f32(s->tr);
    double       worst = 0;
    for (int32_t i = 0; i < caprl_trainer_n_tensors(s->tr); i++) {
        const caprl_param_info *t = caprl_trainer_tensor(s->tr, i);
        for (int64_t j = 0; j < t->numel; j++) {
            int64_t o = t->offset + j;
            double  e = fabs((double)p[o] - rs->p[o]) / (fabs(rs->p[o]) + lr);
            worst = e > worst ? e : worst;
        }
    }
    return worst;
}

static ref_state ref_init(const setup *s) {
    int64_t   n = caprl_trainer_n_params(s->tr);
    ref_state rs = {calloc((size_t)n, sizeof(double)), calloc((size_t)n, sizeof(double)),
                    calloc((size_t)n, sizeof(double)), 0};
    const float *p = caprl_trainer_params_f32(s->tr);
    for (int64_t i = 0; i < n; i++) {
        rs.p[i] = (double)p[i];
    }
    return rs;
}

static void ref_free(ref_state *rs) {
    free(rs->p);
    free(rs->m);
    free(rs->v);
}

/* ---- tests -------------------------------------------------------------------------------------------------- */

static void test_schedule(void) {
    caprl_adamw_params a = caprl_adamw_default_params();
    CHECK(a.beta1 == 0.9f && a.beta2 == 0.95f && a.eps == 1e-8f && a.weight_decay == 0.0f &&
          a.max_grad_norm == 1.0f && a.min_lr_ratio == 0.1f && a.schedule == CAPRL_LR_CONSTANT);
    a.lr = 2.0f;
    a.warmup_steps = 2;
    a.total_steps = 6;
    a.schedule = CAPRL_LR_COSINE;
    /* hand values: warmup (k+1)/2 * lr, then 0.1 + 0.9 * (1 + cos(pi x)) / 2 with x = (k - 2) / 4 */
    CHECK_NEAR(caprl_lr_at(&a, 0), 1.0, 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 1), 2.0, 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 2), 2.0, 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 4), 2.0 * 0.55, 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 3), 2.0 * (0.1 + 0.45 * (1 + sqrt(0.5))), 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 6), 0.2, 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 100), 0.2, 1e-7, 0);
    a.schedule = CAPRL_LR_CONSTANT;
    CHECK_NEAR(caprl_lr_at(&a, 0), 1.0, 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 5), 2.0, 0, 0);
    a.warmup_steps = 0;
    CHECK(caprl_lr_at(&a, 0) == 2.0f);
}

static caprl_adamw_params test_params(void) {
    caprl_adamw_params a = caprl_adamw_default_params();
    a.lr = 1e-2f;
    a.beta1 = 0.9f;
    a.beta2 = 0.95f;
    a.eps = 1e-8f;
    a.weight_decay = 0.1f;
    a.max_grad_norm = 1.0f;
    a.warmup_steps = 2;
    a.total_steps = 6;
    a.schedule = CAPRL_LR_COSINE;
    a.min_lr_ratio = 0.1f;
    return a;
}

/* Per-step gradient magnitudes: the norm of n N(0, s^2) entries is about sqrt(n) s, with n from ~1000 (only the
 * embedding trained) to ~6000 and the 0.25 scale, so steps 0, 2, 4 clip and steps 1, 3, 5 do not. */
static const float k_mag[6] = {0.5f, 0.002f, 0.3f, 0.004f, 1.0f, 0.001f};
static const float k_scale = 0.25f;

static void test_against_reference(bool tied, int32_t frozen) {
    caprl_adamw_params a = test_params();
    setup              s = make(1, frozen, tied, &a);
    ref_state          rs = ref_init(&s);
    int64_t            n = caprl_trainer_n_params(s.tr);
    float             *g_copy = malloc((size_t)n * sizeof(float));
    float             *p_before = malloc((size_t)n * sizeof(float));
    memcpy(p_before, caprl_trainer_params_f32(s.tr), (size_t)n * sizeof(float));
    int clipped = 0;
    for (int k = 0; k < 6; k++) {
        set_grads(&s, k, k_mag[k]);
        memcpy(g_copy, caprl_trainer_grads(s.tr), (size_t)n * sizeof(float));
        double          norm = ref_step(&rs, &s, g_copy, k_scale, &a);
        caprl_step_info info;
        caprl_error     err = {0};
        CHECK_OK(caprl_adamw_step(s.opt, k_scale, &info, &err), &err);
        clipped += norm > a.max_grad_norm;
        CHECK(!info.skipped);
        CHECK_EQ_I64(info.step, k + 1);
        CHECK_NEAR(info.grad_norm, norm, 4 * FLT_EPSILON, 0);
        CHECK_NEAR(info.lr, ref_lr(&a, k), 2 * FLT_EPSILON, 0);
        double e = max_scaled_err(&s, &rs, (double)a.lr);
        CHECK_MSG(e < 8.0 * (k + 1) * FLT_EPSILON, "tied %d frozen %d step %d: scaled error %.3g", tied, frozen, k,
                  e);
        /* the gradients are consumed */
        const float *g = caprl_trainer_grads(s.tr);
        bool         zero = true;
        for (int64_t i = 0; i < n; i++) {
            zero = zero && g[i] == 0.0f;
        }
        CHECK(zero);
    }
    CHECK(clipped == 3); /* the test covers both branches of the clip */
    CHECK_EQ_I64(caprl_adamw_steps(s.opt), 6);
    /* frozen tensors: untouched bit for bit, no moments; trained ones moved */
    const float *p = caprl_trainer_params_f32(s.tr);
    int64_t      moments = 0;
    for (int32_t i = 0; i < caprl_trainer_n_tensors(s.tr); i++) {
        const caprl_param_info *t = caprl_trainer_tensor(s.tr, i);
        bool                    same = memcmp(p + t->offset, p_before + t->offset, (size_t)t->numel * 4) == 0;
        bool                    is_frozen = (t->group & frozen) != 0;
        CHECK_MSG(same == is_frozen, "%s: frozen %d, unchanged %d", t->name, is_frozen, same);
        CHECK(adamw_tensor_trained(s.opt, i) == !is_frozen);
        moments += is_frozen ? 0 : t->numel;
    }
    CHECK_EQ_I64(s.opt->n_moments, moments);
    free(g_copy);
    free(p_before);
    ref_free(&rs);
    drop(&s);
}

static void test_non_finite(void) {
    caprl_adamw_params a = test_params();
    setup              s = make(1, 0, true, &a);
    int64_t            n = caprl_trainer_n_params(s.tr);
    caprl_error        err = {0};
    caprl_step_info    info;
    set_grads(&s, 0, 0.01f);
    CHECK_OK(caprl_adamw_step(s.opt, 1.0f, &info, &err), &err);
    float *before = malloc((size_t)n * sizeof(float));
    float *m_before = malloc((size_t)s.opt->n_moments * sizeof(float));
    memcpy(before, caprl_trainer_params_f32(s.tr), (size_t)n * sizeof(float));
    memcpy(m_before, s.opt->m, (size_t)s.opt->n_moments * sizeof(float));
    const float bad[2] = {NAN, INFINITY};
    for (int b = 0; b < 2; b++) {
        set_grads(&s, 1, 0.01f);
        caprl_trainer_grads(s.tr)[caprl_trainer_tensor(s.tr, 3)->offset + 5] = bad[b];
        CHECK_OK(caprl_adamw_step(s.opt, 1.0f, &info, &err), &err);
        CHECK(info.skipped);
        CHECK(!isfinite(info.grad_norm));
        CHECK_EQ_I64(info.step, 1);
        CHECK(memcmp(before, caprl_trainer_params_f32(s.tr), (size_t)n * sizeof(float)) == 0);
        CHECK(memcmp(m_before, s.opt->m, (size_t)s.opt->n_moments * sizeof(float)) == 0);
        bool zero = true;
        for (int64_t i = 0; i < n; i++) {
            zero = zero && caprl_trainer_grads(s.tr)[i] == 0.0f;
        }
        CHECK(zero);
    }
    /* the next finite step is update 2 (bias correction counts applied updates only) */
    set_grads(&s, 2, 0.01f);
    CHECK_OK(caprl_adamw_step(s.opt, 1.0f, &info, &err), &err);
    CHECK(!info.skipped && info.step == 2);
    free(before);
    free(m_before);
    drop(&s);
}

static void test_threads_bitwise(void) {
    caprl_adamw_params a = test_params();
    setup              s1 = make(1, 0, false, &a), s2 = make(2, 0, false, &a);
    int64_t            n = caprl_trainer_n_params(s1.tr);
    CHECK_EQ_I64(n, caprl_trainer_n_params(s2.tr));
    for (int k = 0; k < 4; k++) {
        caprl_step_info i1, i2;
        caprl_error     err = {0};
        set_grads(&s1, k, k_mag[k]);
        set_grads(&s2, k, k_mag[k]);
        CHECK_OK(caprl_adamw_step(s1.opt, k_scale, &i1, &err), &err);
        CHECK_OK(caprl_adamw_step(s2.opt, k_scale, &i2, &err), &err);
        CHECK(memcmp(&i1.grad_norm, &i2.grad_norm, sizeof(float)) == 0);
    }
    CHECK(memcmp(caprl_trainer_params_f32(s1.tr), caprl_trainer_params_f32(s2.tr), (size_t)n * sizeof(float)) == 0);
    CHECK(memcmp(s1.opt->v, s2.opt->v, (size_t)s1.opt->n_moments * sizeof(float)) == 0);
    drop(&s1);
    drop(&s2);
}

static void test_bad_params(void) {
    caprl_adamw_params a = test_params();
    setup              s = make(1, 0, true, &a);
    caprl_adamw       *o = NULL;
    caprl_adamw_params b = a;
    b.beta1 = 1.0f;
    CHECK_STATUS(caprl_adamw_init(&o, s.tr, &b, &check_err_), CAPRL_ERR_INVALID_ARG);
    b = a;
    b.lr = NAN;
    CHECK_STATUS(caprl_adamw_init(&o, s.tr, &b, &check_err_), CAPRL_ERR_INVALID_ARG);
    b = a;
    b.schedule = 7;
    CHECK_STATUS(caprl_adamw_init(&o, s.tr, &b, &check_err_), CAPRL_ERR_INVALID_ARG);
    CHECK(o == NULL);
    drop(&s);
}

int main(void) {
    caprl_log_set_level(CAPRL_LOG_ERROR); /* the skipped steps warn on purpose */
    test_schedule();
    test_against_reference(true, 0);
    test_against_reference(false, 0);
    test_against_reference(false, CAPRL_GROUP_EMBED);
    test_against_reference(true, CAPRL_GROUP_TEXT);
    test_non_finite();
    test_threads_bitwise();
    test_bad_params();
    return test_finish("test_adamw");
}
