/* AdamW, gradient clipping and the LR schedules against a float64 re-implementation of torch's formulas
 * (torch/optim/adamw.py single-tensor path, torch/nn/utils/clip_grad.py), written here independently: a tiny random
 * Qwen2 model under a trainer, gradients set by hand, several steps with warmup + cosine, weight decay, clipping that
 * is active on some steps and not on others, and a grad_scale != 1. Also: frozen groups get no moments and are left
 * bit-for-bit alone (and stay out of the norm), a non-finite norm skips the update and zeroes the gradients, and
 * 1 vs 2 threads give bit-identical parameters. The vector kernels (AVX2 where the machine has it) give
 * the scalar kernels' bytes: the update (parameters, moments, bf16 shadow) and the per-chunk sums of squares on odd
 * lengths, and whole optimizer steps in mixed precision, whose shadow must also equal a fresh rounding of the
 * masters (what caprl_trainer_sync writes). */
#include <float.h>

#include "caprl/model.h"
#include "caprl/tensor.h"
#include "caprl/train.h"
#include "caprl_test.h"
#include "core/rng_impl.h"
#include "ops/ops_impl.h"
#include "train/adamw_impl.h"
#include "train/train_impl.h"

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

static setup make_with(const caprl_text_config *cfg, int32_t threads, int32_t frozen, int32_t precision,
                       const caprl_adamw_params *ap) {
    setup              s = {0};
    caprl_model_params mp = caprl_model_default_params();
    mp.n_threads = threads;
    caprl_error err = {0};
    CHECK_OK(caprl_model_init_random(&s.m, cfg, CAPRL_DTYPE_F32, 7, 0.3f, &mp, &err), &err);
    caprl_trainer_params tp = caprl_trainer_default_params();
    tp.max_tokens = 32;
    tp.max_seqs = 4;
    tp.frozen_groups = frozen;
    tp.precision = precision;
    CHECK_OK(caprl_trainer_init(&s.tr, s.m, NULL, &tp, &err), &err);
    CHECK_OK(caprl_adamw_init(&s.opt, s.tr, ap, &err), &err);
    if (!s.opt) {
        exit(test_finish("test_adamw"));
    }
    return s;
}

static setup make(int32_t threads, int32_t frozen, bool tied, const caprl_adamw_params *ap) {
    caprl_text_config cfg = tiny_config(tied);
    return make_with(&cfg, threads, frozen, CAPRL_PRECISION_F32, ap);
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

/* Decay or not, as OpenRLHF and transformers' Trainer group Qwen2 tensors: biases and the RMSNorm weights
 * (input_layernorm, post_attention_layernorm, the final model.norm) are left out. */
static bool ref_decays(const char *name) {
    size_t n = strlen(name);
    bool   bias = n >= 5 && strcmp(name + n - 5, ".bias") == 0;
    bool   norm = strstr(name, "layernorm.weight") != NULL || strcmp(name, "model.norm.weight") == 0;
    return !bias && !norm;
}

static double ref_lr(const caprl_adamw_params *a, int64_t step) {
    double lr = (double)a->lr;
    if (step < a->warmup_steps) {
        return lr * (double)step / (double)a->warmup_steps;
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
            rs->p[o] *= 1 - lr * (double)a->weight_decay * (ref_decays(t->name) ? 1.0 : 0.0);
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
    /* hand values (transformers' get_cosine_with_min_lr_schedule_with_warmup): warmup k/2 * lr, then
     * 0.1 + 0.9 * (1 + cos(pi x)) / 2 with x = (k - 2) / 4 */
    CHECK(caprl_lr_at(&a, 0) == 0.0f);
    CHECK_NEAR(caprl_lr_at(&a, 1), 1.0, 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 2), 2.0, 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 4), 2.0 * 0.55, 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 3), 2.0 * (0.1 + 0.45 * (1 + sqrt(0.5))), 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 6), 0.2, 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 100), 0.2, 1e-7, 0);
    a.schedule = CAPRL_LR_CONSTANT;
    CHECK_NEAR(caprl_lr_at(&a, 1), 1.0, 1e-7, 0);
    CHECK_NEAR(caprl_lr_at(&a, 5), 2.0, 0, 0);
    a.warmup_steps = 0;
    CHECK(caprl_lr_at(&a, 0) == 2.0f);

    /* weight decay groups (OpenRLHF's names; transformers' Trainer agrees on these models): a vision block's
     * norm1 / norm2 are decayed by both, so they are here too */
    CHECK(caprl_adamw_decays("model.layers.0.self_attn.q_proj.weight"));
    CHECK(caprl_adamw_decays("model.embed_tokens.weight"));
    CHECK(!caprl_adamw_decays("model.layers.0.self_attn.q_proj.bias"));
    CHECK(!caprl_adamw_decays("visual.merger.mlp.0.bias"));
    CHECK(!caprl_adamw_decays("model.layers.3.input_layernorm.weight") && !caprl_adamw_decays("model.norm.weight"));
    CHECK(!caprl_adamw_decays("model.language_model.layers.1.post_attention_layernorm.weight"));
    CHECK(caprl_adamw_decays("visual.blocks.0.norm1.weight") && caprl_adamw_decays("visual.merger.ln_q.weight"));
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

/* ---- vector kernels against the scalar ones ------------------------------------------------------------------ */

/* The levels this machine runs above scalar (AVX2), as far as the machine has them. */
static int32_t n_vector_levels(void) {
    return adamw_best_isa() - CAPRL_ISA_SCALAR;
}

static float uniform(caprl_rng *r, float lo, float hi) {
    return lo + (hi - lo) * caprl_rng_uniform(r);
}

/* Random inputs of one update of n elements. Every fifth parameter is a special value with g = m = 0, so that
 * without weight decay the update leaves it as it is (p - step * 0) and every branch of the bf16 rounding runs in
 * the vector lanes too: NaNs with payloads (whose rounding would carry into the exponent), infinities, ties to
 * even both ways, just below and above a tie, the largest float (rounds to infinity), a subnormal tie. */
static void fill_update_inputs(float *p, float *g, float *m, float *v, int64_t n, uint64_t seed) {
    caprl_rng r;
    caprl_rng_init(&r, seed, 0, 5);
    for (int64_t j = 0; j < n; j++) {
        p[j] = uniform(&r, -2.0f, 2.0f);
        g[j] = uniform(&r, -0.5f, 0.5f);
        m[j] = uniform(&r, -0.1f, 0.1f);
        v[j] = uniform(&r, 0.0f, 0.01f);
    }
    static const uint32_t special[12] = {0x7FC00001u, 0xFFC1FFFFu, 0x7FFFFFFFu, 0x7F800000u,
                                         0xFF800000u, 0x3F808000u, 0x3F818000u, 0xBF808000u,
                                         0x3F807FFFu, 0x3F808001u, 0x7F7FFFFFu, 0x00018000u};
    for (int64_t j = 0; j < n; j += 5) {
        uint32_t u = special[(j / 5) % 12];
        memcpy(&p[j], &u, sizeof u);
        g[j] = m[j] = 0.0f;
    }
    if (n > 3) { /* 0 / 0 in the update: m = v = g = 0 with eps = 0 (the second constant set) */
        m[3] = v[3] = g[3] = 0.0f;
    }
}

/* Constants of a third step with lr 1e-3; weight decay 0.1 with clipping, none without. */
static adamw_consts update_consts(bool clip, float grad_scale, float eps) {
    adamw_consts k;
    memset(&k, 0, sizeof k);
    k.grad_scale = grad_scale;
    k.do_clip = clip;
    k.clip = clip ? 0.3f : 1.0f;
    k.decay = clip ? (float)(1.0 - 1e-3 * 0.1) : 1.0f;
    k.one_m_b1 = (float)(1.0 - 0.9);
    k.beta2 = 0.95f;
    k.one_m_b2 = (float)(1.0 - 0.95);
    k.step_size = (float)(1e-3 / (1.0 - pow(0.9, 3.0)));
    k.bc2_sqrt = (float)sqrt(1.0 - pow(0.95, 3.0));
    k.eps = eps;
    return k;
}

static void test_update_kernels(void) {
    static const int64_t lengths[5] = {1, 7, 15, 17, 1000003};
    for (int32_t li = 0; li < 5; li++) {
        int64_t   n = lengths[li];
        size_t    fb = (size_t)n * sizeof(float), hb = (size_t)n * sizeof(uint16_t);
        float    *in[4], *out[2][4];
        uint16_t *sh[2];
        for (int32_t a = 0; a < 4; a++) {
            in[a] = malloc(fb);
            out[0][a] = malloc(fb);
            out[1][a] = malloc(fb);
        }
        sh[0] = malloc(hb);
        sh[1] = malloc(hb);
        fill_update_inputs(in[0], in[1], in[2], in[3], n, 11 + (uint64_t)li);
        for (int32_t variant = 0; variant < 8; variant++) {
            bool         clip = variant & 1, with_shadow = variant & 2;
            adamw_consts k = update_consts(clip, (variant & 4) ? 0.37f : 1.0f, n > 3 && li % 2 ? 0.0f : 1e-8f);
            for (int32_t level = 0; level <= n_vector_levels(); level++) {
                int32_t side = level == 0 ? 0 : 1;
                for (int32_t a = 0; a < 4; a++) {
                    memcpy(out[side][a], in[a], fb);
                }
                memset(sh[side], 0xAB, hb);
                adamw_update(CAPRL_ISA_SCALAR + level, &k, out[side][0], out[side][1], out[side][2], out[side][3],
                             with_shadow ? sh[side] : NULL, n);
                if (level == 0) {
                    /* the scalar shadow is caprl_f32_to_bf16 of the new parameters; g is never written */
                    bool ok = memcmp(out[0][1], in[1], fb) == 0;
                    for (int64_t j = 0; with_shadow && j < n; j++) {
                        ok = ok && sh[0][j] == caprl_f32_to_bf16(out[0][0][j]);
                    }
                    CHECK_MSG(ok, "n %lld variant %d: scalar shadow or gradients", (long long)n, variant);
                    continue;
                }
                bool same = memcmp(out[0][0], out[1][0], fb) == 0 && memcmp(out[0][2], out[1][2], fb) == 0 &&
                            memcmp(out[0][3], out[1][3], fb) == 0 && memcmp(out[1][1], in[1], fb) == 0 &&
                            memcmp(sh[0], sh[1], hb) == 0;
                CHECK_MSG(same, "n %lld clip %d shadow %d grad_scale %s: level %d differs from scalar", (long long)n,
                          clip, with_shadow, (variant & 4) ? "0.37" : "1", level);
            }
        }
        for (int32_t a = 0; a < 4; a++) {
            free(in[a]);
            free(out[0][a]);
            free(out[1][a]);
        }
        free(sh[0]);
        free(sh[1]);
    }
}

/* Sums of squares: every level against the definition (element order, double), on chunks of mixed odd lengths in
 * counts around the vector kernel's group of 8: the first group long (the vector loop runs up to its shortest
 * chunk, then each chain goes on alone), the second with short chunks, a ninth, seventeenth chunk alone. */
static void test_sumsq_kernels(void) {
    static const int64_t lengths[17] = {16384, 1000003, 16385, 16383, 16384, 20001, 16387, 16390, 17,
                                        16384, 15,      7,     16384, 1,     16384, 16384, 33};
    static const int32_t counts[6] = {1, 7, 8, 9, 16, 17};
    int64_t              total = 0;
    for (int32_t c = 0; c < 17; c++) {
        total += lengths[c];
    }
    float    *data = malloc((size_t)total * sizeof(float));
    caprl_rng r;
    caprl_rng_init(&r, 5, 1, 2);
    for (int64_t j = 0; j < total; j++) {
        data[j] = caprl_rng_normal(&r) * (j % 3 ? 1e-3f : 7.0f);
    }
    const float *g[17];
    int64_t      n[17];
    for (int32_t c = 0, off = 0; c < 17; off += (int32_t)lengths[c], c++) {
        n[c] = lengths[c];
        g[c] = data + off;
    }
    for (int32_t ci = 0; ci < 6; ci++) {
        for (int32_t si = 0; si < 2; si++) {
            float  scale = si ? 0.37f : 1.0f;
            double want[17], got[17];
            for (int32_t c = 0; c < counts[ci]; c++) {
                double acc = 0.0;
                for (int64_t j = 0; j < n[c]; j++) {
                    double x = (double)(si ? g[c][j] * scale : g[c][j]);
                    acc += x * x;
                }
                want[c] = acc;
            }
            for (int32_t level = 0; level <= n_vector_levels(); level++) {
                adamw_sumsq(CAPRL_ISA_SCALAR + level, scale, g, n, counts[ci], got);
                CHECK_MSG(memcmp(want, got, (size_t)counts[ci] * sizeof(double)) == 0,
                          "sumsq level %d, %d chunks, grad_scale %g: not the element-order sums", level, counts[ci],
                          (double)scale);
            }
        }
    }
    free(data);
}

/* Whole steps in mixed precision, scalar kernels against the machine's widest, on a model with enough chunks for
 * the vector sum of squares (two 131k-element tensors): masters, moments, norms and shadow bit for bit, clipping
 * on and off, grad_scale != 1, one tensor group frozen or none. */
static void test_step_levels_bitwise(int32_t frozen) {
    caprl_adamw_params a = test_params();
    caprl_text_config  cfg = tiny_config(false);
    cfg.vocab_size = 8209; /* 131344 elements: 8 full chunks and a tail, for embed_tokens and lm_head each */
    setup   s1 = make_with(&cfg, 1, frozen, CAPRL_PRECISION_BF16, &a);
    setup   s2 = make_with(&cfg, 1, frozen, CAPRL_PRECISION_BF16, &a);
    int64_t n = caprl_trainer_n_params(s1.tr);
    s1.opt->isa = CAPRL_ISA_SCALAR;
    static const float mag[4] = {0.05f, 0.0005f, 0.02f, 0.0002f}; /* clipped, not, clipped, not */
    int                clipped = 0;
    for (int k = 0; k < 4; k++) {
        caprl_step_info i1, i2;
        caprl_error     err = {0};
        set_grads(&s1, k, mag[k]);
        set_grads(&s2, k, mag[k]);
        CHECK_OK(caprl_adamw_step(s1.opt, k_scale, &i1, &err), &err);
        CHECK_OK(caprl_adamw_step(s2.opt, k_scale, &i2, &err), &err);
        CHECK(memcmp(&i1.grad_norm, &i2.grad_norm, sizeof(float)) == 0);
        clipped += i1.grad_norm > a.max_grad_norm;
    }
    CHECK(clipped == 2);
    CHECK(memcmp(caprl_trainer_params_f32(s1.tr), caprl_trainer_params_f32(s2.tr), (size_t)n * sizeof(float)) == 0);
    CHECK(memcmp(s1.opt->m, s2.opt->m, (size_t)s1.opt->n_moments * sizeof(float)) == 0);
    CHECK(memcmp(s1.opt->v, s2.opt->v, (size_t)s1.opt->n_moments * sizeof(float)) == 0);
    CHECK(memcmp(s1.tr->bf16, s2.tr->bf16, (size_t)n * sizeof(uint16_t)) == 0);
    /* the step rounded what it changed; the rest was already the rounding of the masters: a full sync rewrites
     * the same bytes */
    uint16_t *before = malloc((size_t)n * sizeof(uint16_t));
    memcpy(before, s2.tr->bf16, (size_t)n * sizeof(uint16_t));
    caprl_error err = {0};
    CHECK_OK(caprl_trainer_sync(s2.tr, &err), &err);
    CHECK(memcmp(before, s2.tr->bf16, (size_t)n * sizeof(uint16_t)) == 0);
    free(before);
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
    test_update_kernels();
    test_sumsq_kernels();
    test_step_levels_bitwise(0);
    test_step_levels_bitwise(CAPRL_GROUP_TEXT);
    test_bad_params();
    return test_finish("test_adamw");
}
