/* The RL objective (include/caprl/grpo.h): advantages and whitening against hand-computed values, every loss
 * variant against values derived by hand, and the gradient of the whole loss with respect to the logits (through
 * the backend's fused log-softmax) against central finite differences of a float64 recomputation. */
#include "backend/backend.h"
#include "caprl/grpo.h"
#include "caprl_test.h"
#include "core/rng_impl.h"

static void test_advantages(void) {
    caprl_rl_params p = caprl_rl_default_params();
    CHECK(p.estimator == CAPRL_ADV_RLOO && p.whiten && !p.ppo_clip && p.kl == CAPRL_KL_OFF);
    /* one group of 4: rewards 1, 0, 0.5, 0.5 -> mean 0.5, Bessel std sqrt(0.5/3) */
    const float r[8] = {1.0f, 0.0f, 0.5f, 0.5f, 0.25f, 0.25f, 0.25f, 0.25f};
    float       a[8];
    p.estimator = CAPRL_ADV_RLOO;
    caprl_group_advantages(&p, r, 2, 4, a);
    CHECK_NEAR(a[0], 1.0 - 1.0 / 3.0, 1e-6, 1e-7); /* 1 - (0 + .5 + .5) / 3 */
    CHECK_NEAR(a[1], 0.0 - 2.0 / 3.0, 1e-6, 1e-7);
    CHECK_NEAR(a[2], 0.5 - 1.5 / 3.0, 1e-6, 1e-7);
    for (int i = 4; i < 8; i++) {
        CHECK(a[i] == 0.0f); /* zero-std group: no signal */
    }
    float d[8];
    p.estimator = CAPRL_ADV_DR_GRPO;
    caprl_group_advantages(&p, r, 2, 4, d);
    CHECK_NEAR(d[0], 0.5, 1e-6, 1e-7);
    CHECK_NEAR(d[1], -0.5, 1e-6, 1e-7);
    /* spec/caprl.md §1.1: rloo = G / (G - 1) * dr_grpo */
    for (int i = 0; i < 4; i++) {
        CHECK_NEAR(a[i], 4.0 / 3.0 * d[i], 1e-6, 1e-7);
    }
    float g[8];
    p.estimator = CAPRL_ADV_GRPO;
    caprl_group_advantages(&p, r, 2, 4, g);
    double std = sqrt(0.5 / 3.0);
    CHECK_NEAR(g[0], 0.5 / (std + 1e-6), 1e-6, 1e-7);
    CHECK_NEAR(g[3], 0.0, 0, 1e-7);
    CHECK(g[4] == 0.0f);
    /* singleton groups: grpo gives r / (1 + eps) (verl: mean 0, std 1), the baselines give 0 */
    float one;
    caprl_group_advantages(&p, r, 1, 1, &one);
    CHECK(one == (float)(1.0 / (1.0 + (double)p.adv_eps)));
    p.estimator = CAPRL_ADV_RLOO;
    caprl_group_advantages(&p, r, 1, 1, &one);
    CHECK(one == 0.0f);
    CHECK_EQ_I64(caprl_zero_std_groups(r, 2, 4), 1);

    /* whitening is token weighted: adv 1 with 3 tokens, -1 with 1 token -> mean 0.5, var 0.75 */
    float         w[3] = {1.0f, -1.0f, 7.0f};
    const int32_t nt[3] = {3, 1, 0};
    caprl_whiten_advantages(w, nt, 3);
    CHECK_NEAR(w[0], 0.5 / sqrt(0.75 + 0.0), 1e-6, 1e-7);
    CHECK_NEAR(w[1], -1.5 / sqrt(0.75), 1e-6, 1e-7);
    CHECK(w[2] == 0.0f);
    /* with whitening, rloo and dr_grpo agree (the constant factor cancels) */
    const int32_t ones[4] = {5, 2, 9, 1};
    float         wa[4], wd[4];
    memcpy(wa, a, sizeof wa);
    memcpy(wd, d, sizeof wd);
    caprl_whiten_advantages(wa, ones, 4);
    caprl_whiten_advantages(wd, ones, 4);
    for (int i = 0; i < 4; i++) {
        CHECK_NEAR(wa[i], wd[i], 1e-5, 1e-6);
    }
    /* all-equal advantages whiten to 0 without dividing by zero */
    float eq[2] = {0.3f, 0.3f};
    caprl_whiten_advantages(eq, ones, 2);
    CHECK(fabsf(eq[0]) < 1e-4f && isfinite(eq[0]));
}

static void test_token_loss_values(void) {
    caprl_rl_params p = caprl_rl_default_params();
    const float     logp[4] = {-0.5f, -2.0f, -0.1f, -3.0f};
    const float     old[4] = {-0.5f, -2.5f, -0.1f, -2.0f};
    const float     ref[4] = {-0.4f, -2.0f, -0.3f, -3.0f};
    const float     adv[4] = {1.0f, 1.0f, -2.0f, -1.0f};
    const float     wt[4] = {0.25f, 0.25f, 0.25f, 0.0f};
    float           dl[4];
    caprl_rl_stats  s = {0};
    /* REINFORCE: L = -A rho with rho = exp(logp - sg(logp)) = 1, dL/dlogp = -A (times the weight); the value is
     * -A (TRL / verl / OpenRLHF log it so: 0 here), not the -A logp surrogate (0.575 here) */
    caprl_rl_token_loss(&p, 4, logp, NULL, NULL, adv, wt, dl, &s);
    CHECK_NEAR(dl[0], -0.25, 1e-7, 0);
    CHECK_NEAR(dl[2], 0.5, 1e-7, 0);
    CHECK(dl[3] == 0.0f);
    CHECK_EQ_I64(s.n_tokens, 3);
    CHECK_NEAR(s.loss, 0.25 * (-1.0 - 1.0 + 2.0), 0, 1e-9);
    CHECK_NEAR(s.pg_loss, 0.0, 0, 1e-9);
    const float a_one[1] = {0.5f}, w_one[1] = {1.0f};
    float       d_one[1];
    memset(&s, 0, sizeof s);
    caprl_rl_token_loss(&p, 1, logp + 1, NULL, NULL, a_one, w_one, d_one, &s);
    CHECK_NEAR(s.pg_loss, -0.5, 1e-7, 0);

    /* PPO clip: token 1 has rho = e^0.5 = 1.65 > 1.2 with A > 0: clipped, no gradient, loss -1.2 A */
    p.ppo_clip = true;
    memset(&s, 0, sizeof s);
    caprl_rl_token_loss(&p, 4, logp, old, NULL, adv, wt, dl, &s);
    CHECK_NEAR(dl[0], -0.25 * 1.0, 1e-6, 0); /* rho = 1 */
    CHECK(dl[1] == 0.0f);
    CHECK_NEAR(s.clip_sum, 1.0, 0, 0);
    CHECK_NEAR(s.pg_loss, 0.25 * (-1.0 - 1.2 + 2.0), 1e-6, 1e-9);
    /* dual clip: A = -2 at rho = 1 -> loss 2; with c = 1.5 the bound -A c = 3 is not below it: unchanged */
    p.dual_clip = 1.5f;
    const float old2[1] = {-3.0f}, lp2[1] = {-1.0f}, a2[1] = {-2.0f}, w2[1] = {1.0f};
    float       d2[1];
    memset(&s, 0, sizeof s);
    /* rho = e^2 = 7.39; -A rho = 14.8 > -A c = 3 -> the dual clip bounds it at 3, no gradient */
    caprl_rl_token_loss(&p, 1, lp2, old2, NULL, a2, w2, d2, &s);
    CHECK_NEAR(s.pg_loss, 3.0, 1e-6, 0);
    CHECK(d2[0] == 0.0f);
    CHECK_NEAR(s.clip_lower_sum, 1.0, 0, 0);

    /* KL k3 in the loss: d = logp - ref; k3 = e^-d + d - 1, dk3/dd = 1 - e^-d */
    p = caprl_rl_default_params();
    p.kl = CAPRL_KL_K3;
    p.kl_coef = 0.1f;
    memset(&s, 0, sizeof s);
    caprl_rl_token_loss(&p, 4, logp, NULL, ref, adv, wt, dl, &s);
    double dd = -0.1;
    CHECK_NEAR(dl[0], 0.25 * (-1.0 + 0.1 * (1.0 - exp(-dd))), 1e-6, 1e-9);
    CHECK_NEAR(caprl_kl_estimate(CAPRL_KL_K3, dd), exp(0.1) - 0.1 - 1.0, 1e-12, 0);
    CHECK_NEAR(caprl_kl_estimate(CAPRL_KL_K2, 3.0), 4.5, 1e-12, 0);
    CHECK_NEAR(caprl_kl_estimate(CAPRL_KL_K1, -30.0), -10.0, 0, 0); /* clamped */
    /* KL in the reward: the loss has no KL term, the KL is still measured */
    p.kl_in_reward = true;
    memset(&s, 0, sizeof s);
    caprl_rl_token_loss(&p, 4, logp, NULL, ref, adv, wt, dl, &s);
    CHECK_NEAR(dl[0], -0.25, 1e-7, 0);
    CHECK(s.kl_sum > 0.0 && s.kl_loss == 0.0);
}

/* float64 log-softmax at temperature 1 / inv_temp */
static double logp_f64(const float *z, int64_t V, int32_t target, double inv_temp) {
    double mx = -INFINITY;
    for (int64_t v = 0; v < V; v++) {
        mx = fmax(mx, z[v] * inv_temp);
    }
    double s = 0.0;
    for (int64_t v = 0; v < V; v++) {
        s += exp(z[v] * inv_temp - mx);
    }
    return z[target] * inv_temp - mx - log(s);
}

/* float64 entropy of softmax(z / T) */
static double entropy_f64(const float *z, int64_t V, double inv_temp) {
    double mx = -INFINITY, s = 0.0, ps = 0.0;
    for (int64_t v = 0; v < V; v++) {
        mx = fmax(mx, z[v] * inv_temp);
    }
    for (int64_t v = 0; v < V; v++) {
        s += exp(z[v] * inv_temp - mx);
    }
    for (int64_t v = 0; v < V; v++) {
        double lp = z[v] * inv_temp - mx - log(s);
        ps -= exp(lp) * lp;
    }
    return ps;
}

/* The whole objective as a function of the logits, in double: sum_t L_t(logp_t(z)) - c sum_t w_t H_t(z). */
static double loss_f64(const caprl_rl_params *p, const float *z, int64_t R, int64_t V, const int32_t *tgt,
                       const float *old, const float *ref, const float *adv, const float *wt, double inv_temp) {
    double total = 0.0;
    for (int64_t r = 0; r < R; r++) {
        double a = adv[r], l = logp_f64(z + r * V, V, tgt[r], inv_temp), pg;
        if (p->ppo_clip) {
            double rho = exp(l - old[r]), lo = 1.0 - p->clip_low, hi = 1.0 + p->clip_high;
            double rc = rho < lo ? lo : rho > hi ? hi : rho;
            pg = fmax(-a * rho, -a * rc);
        } else {
            pg = -a * l; /* the surrogate whose gradient is the REINFORCE one (its value is reported as -A) */
        }
        double kl = (p->kl != CAPRL_KL_OFF && !p->kl_in_reward) ? p->kl_coef * caprl_kl_estimate(p->kl, l - ref[r])
                                                                : 0.0;
        total += wt[r] * (pg + kl) - (double)p->entropy_coef * wt[r] * entropy_f64(z + r * V, V, inv_temp);
    }
    return total;
}

static void test_loss_gradient_fd(void) {
    caprl_backend *be = NULL;
    caprl_error    err = {0};
    CHECK(caprl_backend_cpu_init(&be, 2, &err) == CAPRL_OK);
    if (!be) {
        return;
    }
    enum { R = 6, V = 23 };
    caprl_rng rng;
    caprl_rng_init(&rng, 42, 0, 0);
    float   z[R * V], zc[R * V], old[R], ref[R], adv[R], wt[R], lse[R], lp[R], dl[R];
    int32_t tgt[R];
    for (int i = 0; i < R * V; i++) {
        z[i] = 2.0f * (caprl_rng_uniform(&rng) - 0.5f);
    }
    for (int r = 0; r < R; r++) {
        tgt[r] = (int32_t)(caprl_rng_u32(&rng) % V);
        adv[r] = 2.0f * (caprl_rng_uniform(&rng) - 0.5f);
        wt[r] = r == 4 ? 0.0f : 1.0f / 5.0f;
    }
    const float inv_temp = 1.0f / 0.7f;
    for (int variant = 0; variant < 5; variant++) {
        caprl_rl_params p = caprl_rl_default_params();
        if (variant == 1) {
            p.ppo_clip = true;
        }
        if (variant == 2) {
            p.kl = CAPRL_KL_K3;
            p.kl_coef = 0.3f;
        }
        if (variant >= 3) { /* the entropy bonus (verl's entropy_coeff), alone and with the PPO clip */
            p.entropy_coef = 0.7f;
            p.ppo_clip = variant == 4;
        }
        be->ops->logprob_fwd(be, lp, NULL, lse, z, tgt, R, V, inv_temp);
        for (int r = 0; r < R; r++) {
            /* old policy near the current one so that some tokens clip and others do not */
            old[r] = lp[r] + (r % 2 ? 0.4f : -0.05f);
            ref[r] = lp[r] - 0.2f;
        }
        caprl_rl_stats s = {0};
        caprl_rl_token_loss(&p, R, lp, old, ref, adv, wt, dl, &s);
        float dent[R];
        for (int r = 0; r < R; r++) {
            dent[r] = -p.entropy_coef * wt[r]; /* what caprl train passes: dL/dH_t = -c w_t */
        }
        memcpy(zc, z, sizeof z);
        be->ops->logprob_bwd(be, zc, lse, tgt, dl, variant >= 3 ? dent : NULL, R, V, inv_temp);
        double max_err = 0.0, max_g = 0.0;
        for (int i = 0; i < R * V; i += 5) {
            float  save = z[i];
            double h = 1e-3;
            z[i] = (float)(save + h);
            double hp = (double)z[i] - save;
            double lplus = loss_f64(&p, z, R, V, tgt, old, ref, adv, wt, inv_temp);
            z[i] = (float)(save - h);
            double hm = save - (double)z[i];
            double lminus = loss_f64(&p, z, R, V, tgt, old, ref, adv, wt, inv_temp);
            z[i] = save;
            double fd = (lplus - lminus) / (hp + hm);
            max_err = fmax(max_err, fabs(fd - zc[i]));
            max_g = fmax(max_g, fabs(fd));
        }
        /* f32 gradients of O(1) quantities: a few hundred ulp at most; FD truncation error O(h^2) */
        CHECK_MSG(max_err <= 1e-4 * fmax(max_g, 1.0), "variant %d: max |fd - grad| = %g (max |g| %g)", variant,
                  max_err, max_g);
    }
    caprl_backend_free(be);
}

int main(void) {
    test_advantages();
    test_token_loss_values();
    test_loss_gradient_fd();
    printf("%d checks, %d failures\n", g_test_checks, g_test_failures);
    return g_test_failures ? 1 : 0;
}
