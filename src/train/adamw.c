/* AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias correction, eps added to the corrected
 * sqrt(v)), global gradient-norm clipping as torch.nn.utils.clip_grad_norm_, and the learning-rate schedules.
 * Reference: torch/optim/adamw.py (_single_tensor_adam with decoupled weight decay), torch/nn/utils/clip_grad.py.
 *
 * Work is split into fixed slices of the trainable tensors (adamw_impl.h) run on the model's thread pool: the
 * update is element-wise and the norm's partial sums are combined in slice order, so results are bit-identical at
 * any thread count. Nothing is allocated after init. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/error_impl.h"
#include "core/log_impl.h"
#include "core/pool_impl.h"
#include "train/adamw_impl.h"
#include "train/train_impl.h"

/* Elements per slice: large enough to amortise the pool's dispatch, small enough to balance threads. */
#define ADAMW_CHUNK 16384

caprl_adamw_params caprl_adamw_default_params(void) {
    caprl_adamw_params p;
    memset(&p, 0, sizeof p);
    p.lr = 1e-5f;
    p.beta1 = 0.9f;
    p.beta2 = 0.95f;
    p.eps = 1e-8f;
    p.weight_decay = 0.0f;
    p.max_grad_norm = 1.0f;
    p.warmup_steps = 0;
    p.total_steps = 1;
    p.schedule = CAPRL_LR_CONSTANT;
    p.min_lr_ratio = 0.1f;
    return p;
}

float caprl_lr_at(const caprl_adamw_params *p, int64_t step) {
    double lr = (double)p->lr;
    if (step < 0) {
        step = 0;
    }
    if (p->warmup_steps > 0 && step < p->warmup_steps) {
        return (float)(lr * (double)(step + 1) / (double)p->warmup_steps);
    }
    if (p->schedule != CAPRL_LR_COSINE) {
        return (float)lr;
    }
    int64_t span = (int64_t)p->total_steps - p->warmup_steps;
    double  progress = span > 0 ? (double)(step - p->warmup_steps) / (double)span : 1.0;
    if (progress > 1.0) {
        progress = 1.0;
    }
    double floor_ratio = (double)p->min_lr_ratio;
    double cosine = 0.5 * (1.0 + cos(3.14159265358979323846 * progress));
    return (float)(lr * (floor_ratio + (1.0 - floor_ratio) * cosine));
}

static caprl_status check_params(const caprl_adamw_params *p, caprl_error *err) {
    bool ok = isfinite(p->lr) && p->lr >= 0.0f && p->beta1 >= 0.0f && p->beta1 < 1.0f && p->beta2 >= 0.0f &&
              p->beta2 < 1.0f && isfinite(p->eps) && p->eps >= 0.0f && isfinite(p->weight_decay) &&
              p->weight_decay >= 0.0f && isfinite(p->max_grad_norm) && p->warmup_steps >= 0 && p->total_steps >= 0 &&
              (p->schedule == CAPRL_LR_CONSTANT || p->schedule == CAPRL_LR_COSINE) && p->min_lr_ratio >= 0.0f &&
              p->min_lr_ratio <= 1.0f;
    if (!ok) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "adamw: parameters out of range (lr %g, betas %g %g, eps %g, weight_decay %g, "
                             "max_grad_norm %g, warmup %d, total %d, schedule %d, min_lr_ratio %g)",
                             (double)p->lr, (double)p->beta1, (double)p->beta2, (double)p->eps,
                             (double)p->weight_decay, (double)p->max_grad_norm, p->warmup_steps, p->total_steps,
                             p->schedule, (double)p->min_lr_ratio);
    }
    return CAPRL_OK;
}

bool adamw_tensor_trained(const caprl_adamw *opt, int32_t i) {
    return opt->moff[i] >= 0;
}

caprl_status caprl_adamw_init(caprl_adamw **out, caprl_trainer *tr, const caprl_adamw_params *p, caprl_error *err) {
    if (!out || !tr || !p) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "adamw init: NULL argument");
    }
    CAPRL_TRY(check_params(p, err));
    int32_t      nt = caprl_trainer_n_tensors(tr);
    caprl_adamw *opt = caprl_xcalloc(1, sizeof *opt);
    opt->tr = tr;
    opt->p = *p;
    opt->moff = caprl_xmalloc((size_t)(nt > 0 ? nt : 1) * sizeof(int64_t));
    for (int32_t i = 0; i < nt; i++) {
        const caprl_param_info *t = caprl_trainer_tensor(tr, i);
        if (t->group & tr->p.frozen_groups) {
            opt->moff[i] = -1;
            continue;
        }
        opt->moff[i] = opt->n_moments;
        opt->n_moments += t->numel;
        opt->n_chunks += (t->numel + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
    }
    size_t bytes = (size_t)(opt->n_moments > 0 ? opt->n_moments : 1) * sizeof(float);
    opt->m = caprl_try_aligned_alloc(bytes);
    opt->v = caprl_try_aligned_alloc(bytes);
    opt->partial = caprl_try_malloc((size_t)(opt->n_chunks > 0 ? opt->n_chunks : 1) * sizeof(double));
    opt->chunks = caprl_try_malloc((size_t)(opt->n_chunks > 0 ? opt->n_chunks : 1) * sizeof(adamw_chunk));
    if (!opt->m || !opt->v || !opt->partial || !opt->chunks) {
        caprl_adamw_free(opt);
        return caprl_err_set(err, CAPRL_ERR_OOM, "adamw: cannot allocate 2 x %zu bytes of moments", bytes);
    }
    memset(opt->m, 0, bytes);
    memset(opt->v, 0, bytes);
    int64_t c = 0;
    for (int32_t i = 0; i < nt; i++) {
        const caprl_param_info *t = caprl_trainer_tensor(tr, i);
        for (int64_t j = 0; opt->moff[i] >= 0 && j < t->numel; j += ADAMW_CHUNK) {
            opt->chunks[c].off = t->offset + j;
            opt->chunks[c].moff = opt->moff[i] + j;
            opt->chunks[c].n = t->numel - j < ADAMW_CHUNK ? t->numel - j : ADAMW_CHUNK;
            c++;
        }
    }
    *out = opt;
    return CAPRL_OK;
}

void caprl_adamw_free(caprl_adamw *opt) {
    if (!opt) {
        return;
    }
    caprl_aligned_free(opt->m);
    caprl_aligned_free(opt->v);
    free(opt->partial);
    free(opt->chunks);
    free(opt->moff);
    free(opt);
}

int64_t caprl_adamw_steps(const caprl_adamw *opt) {
    return opt->t;
}

/* ---- the step ------------------------------------------------------------------------------------------------ */

typedef struct step_ctx {
    caprl_adamw *opt;
    float       *params, *grads;
    float        grad_scale;
    /* update constants, as torch forms them: Python floats rounded once to the tensor's dtype */
    float        clip;       /* gradient multiplier from clipping (1 when not clipped) */
    bool         do_clip;
    float        decay;      /* 1 - lr * weight_decay */
    float        one_m_b1;   /* 1 - beta1 (lerp weight) */
    float        beta2;
    float        one_m_b2;   /* 1 - beta2 */
    float        step_size;  /* lr / (1 - beta1^t) */
    float        bc2_sqrt;   /* sqrt(1 - beta2^t) */
    float        eps;
} step_ctx;

/* Scales the gradients and sums their squares per slice (double accumulation). */
static void scale_sumsq_range(void *vctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    step_ctx *s = vctx;
    for (int64_t c = i0; c < i1; c++) {
        const adamw_chunk *ch = &s->opt->chunks[c];
        float             *g = s->grads + ch->off;
        double             acc = 0.0;
        for (int64_t j = 0; j < ch->n; j++) {
            if (s->grad_scale != 1.0f) {
                g[j] *= s->grad_scale;
            }
            double x = (double)g[j];
            acc += x * x;
        }
        s->opt->partial[c] = acc;
    }
}

static void update_range(void *vctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const step_ctx *s = vctx;
    for (int64_t c = i0; c < i1; c++) {
        const adamw_chunk *ch = &s->opt->chunks[c];
        float             *p = s->params + ch->off;
        const float       *g = s->grads + ch->off;
        float             *m = s->opt->m + ch->moff;
        float             *v = s->opt->v + ch->moff;
        for (int64_t j = 0; j < ch->n; j++) {
            float gj = s->do_clip ? g[j] * s->clip : g[j];
            float pj = p[j] * s->decay;                    /* param.mul_(1 - lr * wd) */
            float mj = m[j] + s->one_m_b1 * (gj - m[j]);   /* exp_avg.lerp_(grad, 1 - beta1) */
            float vj = v[j] * s->beta2 + s->one_m_b2 * gj * gj; /* exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2) */
            float denom = sqrtf(vj) / s->bc2_sqrt + s->eps;
            p[j] = pj - s->step_size * (mj / denom);       /* param.addcdiv_(exp_avg, denom, -step_size) */
            m[j] = mj;
            v[j] = vj;
        }
    }
}

caprl_status caprl_adamw_step(caprl_adamw *opt, float grad_scale, caprl_step_info *info, caprl_error *err) {
    if (!opt) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "adamw step: NULL optimizer");
    }
    caprl_trainer *tr = opt->tr;
    caprl_pool    *pool = tr->m->be->pool;
    step_ctx       s;
    memset(&s, 0, sizeof s);
    s.opt = opt;
    s.params = caprl_trainer_params_f32(tr);
    s.grads = caprl_trainer_grads(tr);
    s.grad_scale = grad_scale;
    caprl_parallel_for(pool, opt->n_chunks, scale_sumsq_range, &s);
    double sumsq = 0.0;
    for (int64_t c = 0; c < opt->n_chunks; c++) {
        sumsq += opt->partial[c];
    }
    double   norm = sqrt(sumsq);
    float    lr = caprl_lr_at(&opt->p, opt->t);
    bool     skip = !isfinite(norm) || !isfinite(grad_scale);
    if (skip) {
        LOG_WARN("adamw: gradient norm is %g at update %lld: step skipped, nothing applied", norm,
                 (long long)opt->t + 1);
    } else {
        /* clip_grad_norm_: coef = max_norm / (norm + 1e-6), applied when below 1 */
        double coef = opt->p.max_grad_norm > 0.0f ? (double)opt->p.max_grad_norm / (norm + 1e-6) : 1.0;
        s.do_clip = coef < 1.0;
        s.clip = (float)coef;
        int64_t t = opt->t + 1;
        double  b1 = (double)opt->p.beta1, b2 = (double)opt->p.beta2;
        s.decay = (float)(1.0 - (double)lr * (double)opt->p.weight_decay);
        s.one_m_b1 = (float)(1.0 - b1);
        s.beta2 = opt->p.beta2;
        s.one_m_b2 = (float)(1.0 - b2);
        s.step_size = (float)((double)lr / (1.0 - pow(b1, (double)t)));
        s.bc2_sqrt = (float)sqrt(1.0 - pow(b2, (double)t));
        s.eps = opt->p.eps;
        caprl_parallel_for(pool, opt->n_chunks, update_range, &s);
        opt->t = t;
    }
    caprl_trainer_zero_grads(tr);
    if (info) {
        info->lr = lr;
        info->grad_norm = (float)norm;
        info->skipped = skip;
        info->step = opt->t;
    }
    return skip ? CAPRL_OK : caprl_trainer_sync(tr, err);
}
