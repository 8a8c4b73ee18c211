/* The policy-gradient objective of the CapRL trainer (spec/caprl.md §1.1, §5.3; spec/grpo.md §1), as pure
 * functions on small arrays: group advantages, batch whitening, and the per-token loss with its derivative with
 * respect to the token's log-probability. The trainer feeds that derivative to caprl_trainer_backward, which turns
 * it into gradients through the fused log-softmax, so every variant below costs the same backward pass.
 *
 * Defaults are the released CapRL run: rloo advantages, whitening over the rollout batch, no ratio / clip, no KL,
 * token-mean aggregation over the whole optimizer step. */
#ifndef CAPRL_GRPO_H
#define CAPRL_GRPO_H

#include "caprl/caprl.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
    CAPRL_ADV_GRPO = 0,    /* (r_i - mean) / (std + eps), std with Bessel's correction (torch.std) */
    CAPRL_ADV_RLOO = 1,    /* r_i - mean of the other G - 1 */
    CAPRL_ADV_DR_GRPO = 2, /* r_i - mean */
};

enum { CAPRL_KL_OFF = 0, CAPRL_KL_K1 = 1, CAPRL_KL_K2 = 2, CAPRL_KL_K3 = 3 };

enum {
    CAPRL_AGG_TOKEN_MEAN = 0,            /* sum over every response token of the step / their count */
    CAPRL_AGG_SEQ_MEAN_TOKEN_MEAN = 1,   /* mean over responses of each response's token mean (original GRPO) */
    CAPRL_AGG_SEQ_MEAN_TOKEN_SUM = 2,    /* mean over responses of each response's token sum */
    CAPRL_AGG_SEQ_MEAN_TOKEN_SUM_NORM = 3, /* token sums / (responses * max_new_tokens): Dr.GRPO's constant */
};

typedef struct caprl_rl_params {
    int32_t estimator;   /* CAPRL_ADV_*; default rloo */
    float   adv_eps;     /* grpo std epsilon; default 1e-6 (verl) */
    bool    whiten;      /* token-weighted whitening over the rollout batch; default true */
    bool    ppo_clip;    /* ratio and clipped surrogate; default false (ratio == 1: REINFORCE) */
    float   clip_low;    /* epsilon_low; default 0.2 */
    float   clip_high;   /* epsilon_high; default 0.2 */
    float   dual_clip;   /* c > 1 bounds the loss of negative advantages at -A c; 0 = off (default) */
    int32_t kl;          /* CAPRL_KL_*; default off */
    float   kl_coef;     /* beta */
    bool    kl_in_reward; /* subtract beta * sum_t k (rollout policy vs reference) from the reward instead */
    int32_t agg;         /* CAPRL_AGG_*; default token-mean */
    bool    mask_truncated; /* responses cut at the token limit get no loss (overlong filtering); default false */
    float   entropy_coef;   /* entropy bonus: the loss gets -c * the same aggregation of the entropy; default 0 */
} caprl_rl_params;

CAPRL_API caprl_rl_params caprl_rl_default_params(void);

/* Advantages of n_groups groups of G rewards each (group-major). G == 1 gives r / (1 + adv_eps) for grpo (verl's
 * singleton rule: mean 0, std 1) and 0 for rloo and dr_grpo. Computed in double. */
CAPRL_API void caprl_group_advantages(const caprl_rl_params *p, const float *rewards, int32_t n_groups, int32_t G,
                                      float *adv);
/* Whitening over every response token of the batch: response i contributes n_tokens[i] copies of adv[i];
 * adv <- (adv - mean) / sqrt(var + 1e-8), var the population variance (OpenRLHF masked normalisation). Responses
 * with n_tokens 0 are left out of the statistics and set to 0. */
CAPRL_API void caprl_whiten_advantages(float *adv, const int32_t *n_tokens, int32_t n);
/* Number of groups whose rewards are all equal (zero std): the zero-signal fraction in the metrics. */
CAPRL_API int32_t caprl_zero_std_groups(const float *rewards, int32_t n_groups, int32_t G);

/* Per-token statistics summed by caprl_rl_token_loss (divide by n_tokens for means). */
typedef struct caprl_rl_stats {
    double  loss;           /* the aggregated loss (the weights applied): what the optimizer step minimises */
    double  pg_loss;        /* aggregated policy-gradient part */
    double  kl_loss;        /* aggregated beta * KL part */
    double  kl_sum;         /* sum of the KL estimator over tokens (unweighted) */
    double  clip_sum;       /* tokens where the clipped branch was taken */
    double  clip_lower_sum; /* tokens where the dual clip bounded a negative advantage */
    double  ratio_sum;
    int64_t n_tokens;       /* tokens with a non-zero weight */
} caprl_rl_stats;

/* The loss of n tokens and its derivative dL/dlogp (written to dlogp): per token
 *     L_t = weight[t] * (pg_t + [kl in loss] beta * k(logp[t] - ref_logp[t]))
 * with pg_t = -adv[t] * rho. Without ppo_clip rho = exp(logp - stop_gradient(logp)) = 1, so the reported pg_loss is
 * -A (close to 0 after whitening) and dpg/dlogp = -A: REINFORCE. With ppo_clip, the clipped surrogate
 * max(-A rho, -A clip(rho)) (and the dual clip) with rho = exp(clamp(logp - old_logp, -20, 20)). k1 = d,
 * k2 = d^2 / 2, k3 = exp(-d) + d - 1 with d = logp - ref_logp; every estimator's value is clamped to [-10, 10]
 * (OpenRLHF), where its gradient is 0. weight[t] is the aggregation weight (1 / N_tok for token-mean,
 * 1 / (N_seq |o_i|) for seq-mean-token-mean, 1 / N_seq for seq-mean-token-sum, 1 / (N_seq max_new_tokens) for
 * seq-mean-token-sum-norm; 0 for prompt, padding and masked tokens). old_logp may be NULL when ppo_clip is off;
 * ref_logp may be NULL when the KL is off or in the reward. stats is accumulated into (not reset). */
CAPRL_API void caprl_rl_token_loss(const caprl_rl_params *p, int64_t n, const float *logp, const float *old_logp,
                                   const float *ref_logp, const float *adv, const float *weight, float *dlogp,
                                   caprl_rl_stats *stats);
/* The KL estimator value k(d) of p->kl (clamped as above), 0 when the KL is off. */
CAPRL_API double caprl_kl_estimate(int32_t kl, double d);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_GRPO_H */
