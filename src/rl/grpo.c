/* Group advantages, batch whitening and the per-token policy-gradient loss (include/caprl/grpo.h). Statistics
 * are taken in double so that the result does not depend on the batch's order of magnitude; the per-token
 * outputs are f32 because they feed the f32 backward. */
#include "caprl/grpo.h"

#include <math.h>

#define LOG_RATIO_CLAMP 20.0 /* verl / OpenRLHF clamp of logp - old_logp before exp */
#define KL_CLAMP 10.0        /* OpenRLHF clamps every KL estimator's value */
#define WHITEN_VAR_FLOOR 1e-8

caprl_rl_params caprl_rl_default_params(void) {
    return (caprl_rl_params){
        .estimator = CAPRL_ADV_RLOO,
        .adv_eps = 1e-6f,
        .whiten = true,
        .ppo_clip = false,
        .clip_low = 0.2f,
        .clip_high = 0.2f,
        .dual_clip = 0.0f,
        .kl = CAPRL_KL_OFF,
        .kl_coef = 0.0f,
        .kl_in_reward = false,
        .agg = CAPRL_AGG_TOKEN_MEAN,
        .mask_truncated = false,
        .entropy_coef = 0.0f,
    };
}

void caprl_group_advantages(const caprl_rl_params *p, const float *rewards, int32_t n_groups, int32_t G,
                            float *adv) {
    for (int32_t g = 0; g < n_groups; g++) {
        const float *r = rewards + (int64_t)g * G;
        float       *a = adv + (int64_t)g * G;
        double       sum = 0.0;
        for (int32_t i = 0; i < G; i++) {
            sum += (double)r[i];
        }
        double mean = sum / G;
        if (G == 1) {
            /* verl: a singleton group has mean 0 and std 1, so r / (1 + eps); leave-one-out and mean-centring have
             * no baseline */
            a[0] = p->estimator == CAPRL_ADV_GRPO ? (float)((double)r[0] / (1.0 + (double)p->adv_eps)) : 0.0f;
            continue;
        }
        double std = 0.0;
        if (p->estimator == CAPRL_ADV_GRPO) {
            double ss = 0.0;
            for (int32_t i = 0; i < G; i++) {
                ss += ((double)r[i] - mean) * ((double)r[i] - mean);
            }
            std = sqrt(ss / (G - 1));
        }
        for (int32_t i = 0; i < G; i++) {
            double v;
            switch (p->estimator) {
            case CAPRL_ADV_GRPO: v = ((double)r[i] - mean) / (std + (double)p->adv_eps); break;
            case CAPRL_ADV_RLOO: v = (double)r[i] - (sum - (double)r[i]) / (G - 1); break;
            default: v = (double)r[i] - mean; break;
            }
            a[i] = (float)v;
        }
    }
}

void caprl_whiten_advantages(float *adv, const int32_t *n_tokens, int32_t n) {
    double w = 0.0, sum = 0.0;
    for (int32_t i = 0; i < n; i++) {
        w += n_tokens[i];
        sum += (double)n_tokens[i] * (double)adv[i];
    }
    if (w <= 0.0) {
        for (int32_t i = 0; i < n; i++) {
            adv[i] = 0.0f;
        }
        return;
    }
    double mean = sum / w, ss = 0.0;
    for (int32_t i = 0; i < n; i++) {
        ss += (double)n_tokens[i] * ((double)adv[i] - mean) * ((double)adv[i] - mean);
    }
    double var = ss / w;
    double rstd = 1.0 / sqrt(var > WHITEN_VAR_FLOOR ? var : WHITEN_VAR_FLOOR);
    for (int32_t i = 0; i < n; i++) {
        adv[i] = n_tokens[i] > 0 ? (float)(((double)adv[i] - mean) * rstd) : 0.0f;
    }
}

int32_t caprl_zero_std_groups(const float *rewards, int32_t n_groups, int32_t G) {
    int32_t count = 0;
    for (int32_t g = 0; g < n_groups; g++) {
        const float *r = rewards + (int64_t)g * G;
        bool         equal = true;
        for (int32_t i = 1; i < G && equal; i++) {
            equal = r[i] == r[0];
        }
        count += equal;
    }
    return count;
}

double caprl_kl_estimate(int32_t kl, double d) {
    double k;
    switch (kl) {
    case CAPRL_KL_K1: k = d; break;
    case CAPRL_KL_K2: k = 0.5 * d * d; break;
    case CAPRL_KL_K3: k = exp(-d) + d - 1.0; break;
    default: return 0.0;
    }
    return k < -KL_CLAMP ? -KL_CLAMP : k > KL_CLAMP ? KL_CLAMP : k;
}

/* dk/dd of the estimator, 0 where its value is clamped. */
static double kl_derivative(int32_t kl, double d) {
    double k = 0.0, dk = 0.0;
    switch (kl) {
    case CAPRL_KL_K1: k = d; dk = 1.0; break;
    case CAPRL_KL_K2: k = 0.5 * d * d; dk = d; break;
    case CAPRL_KL_K3: k = exp(-d) + d - 1.0; dk = 1.0 - exp(-d); break;
    default: return 0.0;
    }
    return (k < -KL_CLAMP || k > KL_CLAMP) ? 0.0 : dk;
}

void caprl_rl_token_loss(const caprl_rl_params *p, int64_t n, const float *logp, const float *old_logp,
                         const float *ref_logp, const float *adv, const float *weight, float *dlogp,
                         caprl_rl_stats *stats) {
    bool kl_in_loss = p->kl != CAPRL_KL_OFF && !p->kl_in_reward && p->kl_coef != 0.0f && ref_logp;
    for (int64_t t = 0; t < n; t++) {
        double w = (double)weight[t];
        if (w == 0.0) {
            dlogp[t] = 0.0f;
            continue;
        }
        double a = (double)adv[t], lp = (double)logp[t];
        double pg, dpg;
        if (p->ppo_clip) {
            double d = lp - (double)old_logp[t];
            bool   clamped_d = d < -LOG_RATIO_CLAMP || d > LOG_RATIO_CLAMP;
            d = d < -LOG_RATIO_CLAMP ? -LOG_RATIO_CLAMP : d > LOG_RATIO_CLAMP ? LOG_RATIO_CLAMP : d;
            double rho = exp(d);
            double lo = 1.0 - (double)p->clip_low, hi = 1.0 + (double)p->clip_high;
            double rho_c = rho < lo ? lo : rho > hi ? hi : rho;
            double l1 = -a * rho, l2 = -a * rho_c;
            /* max(l1, l2): the clipped branch carries no gradient; on a tie both branches have the same one */
            bool clipped = l2 > l1;
            pg = clipped ? l2 : l1;
            dpg = (clipped || clamped_d) ? 0.0 : -a * rho;
            stats->clip_sum += clipped;
            if (p->dual_clip > 1.0f && a < 0.0) {
                double l3 = -a * (double)p->dual_clip;
                if (l3 < pg) {
                    pg = l3;
                    dpg = 0.0;
                    stats->clip_lower_sum += 1.0;
                }
            }
            stats->ratio_sum += rho;
        } else {
            /* on-policy: rho = exp(logp - sg(logp)) = 1, so the value is -A and d(-A rho)/dlogp = -A */
            pg = -a;
            dpg = -a;
            stats->ratio_sum += 1.0;
        }
        double kl_val = 0.0, dkl = 0.0;
        if (ref_logp && p->kl != CAPRL_KL_OFF) {
            double d = lp - (double)ref_logp[t];
            kl_val = caprl_kl_estimate(p->kl, d);
            stats->kl_sum += kl_val;
            if (kl_in_loss) {
                dkl = (double)p->kl_coef * kl_derivative(p->kl, d);
            }
        }
        double kl_term = kl_in_loss ? (double)p->kl_coef * kl_val : 0.0;
        stats->pg_loss += w * pg;
        stats->kl_loss += w * kl_term;
        stats->loss += w * (pg + kl_term);
        stats->n_tokens++;
        dlogp[t] = (float)(w * (dpg + dkl));
    }
}
