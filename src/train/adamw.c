/* AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias correction, eps added to the corrected
 * sqrt(v)), global gradient-norm clipping as torch.nn.utils.clip_grad_norm_, and the learning-rate schedules.
 * Reference: torch/optim/adamw.py (_single_tensor_adam with decoupled weight decay), torch/nn/utils/clip_grad.py.
 *
 * Work is split into fixed slices of the trainable tensors (adamw_impl.h) run on the model's thread pool: the
 * update is element-wise and the norm's partial sums are combined in slice order, so results are bit-identical at
 * any thread count. Nothing is allocated after init.
 *
 * The step is memory-bound (it reads parameters, gradients and both moments and writes three of them back, plus
 * the bf16 shadow in mixed precision), so the kernels are vectorised (AVX2) to run at memory speed, and
 * the update writes the bf16 copy of each new parameter itself instead of a second pass over the buffer. They do
 * exactly the scalar arithmetic, lane by lane: IEEE mul, add, sub, div and sqrt, never contracted into fused
 * multiply-adds (this file is compiled with -ffp-contract=off, and the target attributes do not enable FMA), and
 * each chunk's sum of squares is still taken element after element in double, several chunks side by side in the
 * lanes of a vector. Every ISA level therefore gives the same bytes (tests/unit/test_adamw.c compares them). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/tensor.h"
#include "core/cpu_impl.h"
#include "core/error_impl.h"
#include "core/log_impl.h"
#include "core/pool_impl.h"
#include "ops/ops_impl.h"
#include "train/adamw_impl.h"
#include "train/train_impl.h"

/* Elements per slice: large enough to amortise the pool's dispatch, small enough to balance threads. */
#define ADAMW_CHUNK 16384

bool caprl_adamw_decays(const char *name) {
    /* OpenRLHF's no_decay_name_list (get_optimizer_grouped_parameters); for Qwen2 and Qwen2.5-VL transformers'
     * Trainer leaves out the same tensors */
    static const char *const no_decay[] = {"bias", "layer_norm.weight", "layernorm.weight", "norm.weight",
                                           "ln_f.weight"};
    for (size_t i = 0; name && i < sizeof no_decay / sizeof no_decay[0]; i++) {
        if (strstr(name, no_decay[i])) {
            return false;
        }
    }
    return true;
}

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
    /* transformers' warmup (the scheduler of TRL, OpenRLHF and verl): step s at lr * s / warmup, so step 0 is 0 */
    if (p->warmup_steps > 0 && step < p->warmup_steps) {
        return (float)(lr * (double)step / (double)p->warmup_steps);
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
    opt->isa = adamw_best_isa();
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
        bool                    decay = caprl_adamw_decays(t->name);
        for (int64_t j = 0; opt->moff[i] >= 0 && j < t->numel; j += ADAMW_CHUNK) {
            opt->chunks[c].off = t->offset + j;
            opt->chunks[c].moff = opt->moff[i] + j;
            opt->chunks[c].n = t->numel - j < ADAMW_CHUNK ? t->numel - j : ADAMW_CHUNK;
            opt->chunks[c].decay = decay;
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

/* ---- kernels ------------------------------------------------------------------------------------------------ */

/* AVX2 at most: both kernels run at memory speed with 8 lanes (an AVX-512 update measured no faster on a Xeon),
 * so wider lanes would only add code. */
int32_t adamw_best_isa(void) {
#if CAPRL_X86
    if (caprl_cpu()->avx2) {
        return CAPRL_ISA_AVX2;
    }
#endif
    return CAPRL_ISA_SCALAR;
}

/* One chunk's sum of squares, continued from acc. The statement of the arithmetic every level reproduces. */
static double sumsq_scalar(double acc, float grad_scale, const float *g, int64_t j0, int64_t n) {
    for (int64_t j = j0; j < n; j++) {
        float  gj = grad_scale != 1.0f ? g[j] * grad_scale : g[j];
        double x = (double)gj;
        acc += x * x;
    }
    return acc;
}

/* The torch.optim.AdamW update of elements [j0, n), in torch's order of operations. */
static void update_scalar(const adamw_consts *k, float *p, const float *g, float *m, float *v, uint16_t *shadow,
                          int64_t j0, int64_t n) {
    for (int64_t j = j0; j < n; j++) {
        float gj = k->grad_scale != 1.0f ? g[j] * k->grad_scale : g[j];
        if (k->do_clip) {
            gj *= k->clip;
        }
        float pj = p[j] * k->decay;                          /* param.mul_(1 - lr * wd) */
        float mj = m[j] + k->one_m_b1 * (gj - m[j]);         /* exp_avg.lerp_(grad, 1 - beta1) */
        float vj = v[j] * k->beta2 + k->one_m_b2 * gj * gj;  /* exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2) */
        float denom = sqrtf(vj) / k->bc2_sqrt + k->eps;
        float pn = pj - k->step_size * (mj / denom);         /* param.addcdiv_(exp_avg, denom, -step_size) */
        p[j] = pn;
        m[j] = mj;
        v[j] = vj;
        if (shadow) {
            shadow[j] = caprl_f32_to_bf16(pn);
        }
    }
}

#if CAPRL_X86
/* No "fma" in the targets: the compiler cannot contract what it cannot emit (and -ffp-contract=off besides). */
#    define ADAMW_AVX2 __attribute__((target("avx2")))
#    define ADAMW_AVX2_INLINE __attribute__((target("avx2"), always_inline)) inline

/* (double)x * (double)x per lane: exact (a float's square fits a double's mantissa). */
static ADAMW_AVX2_INLINE __m256d square_pd(__m128 x) {
    __m256d d = _mm256_cvtps_pd(x);
    return _mm256_mul_pd(d, d);
}

/* Sums of squares of 8 chunks side by side: lane i of acc[0] belongs to chunk i, of acc[1] to chunk 4 + i. Each
 * step loads 4 elements of every chunk, transposes them so that a vector holds element j of 4 chunks, and adds
 * the squares of elements j, j + 1, j + 2, j + 3 one after the other: every chunk's chain is the scalar one. The
 * 8 independent chains hide the add latency; a chunk's sum depends only on its own elements. */
ADAMW_AVX2 static void sumsq8_avx2(float grad_scale, const float *const *g, int64_t len, double *acc8) {
    const float *g0 = g[0], *g1 = g[1], *g2 = g[2], *g3 = g[3], *g4 = g[4], *g5 = g[5], *g6 = g[6], *g7 = g[7];
    const __m128 sc = _mm_set1_ps(grad_scale);
    const bool   scaled = grad_scale != 1.0f;
    __m256d      acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
    for (int64_t j = 0; j + 4 <= len; j += 4) {
        __m128 r0 = _mm_loadu_ps(g0 + j), r1 = _mm_loadu_ps(g1 + j), r2 = _mm_loadu_ps(g2 + j);
        __m128 r3 = _mm_loadu_ps(g3 + j), r4 = _mm_loadu_ps(g4 + j), r5 = _mm_loadu_ps(g5 + j);
        __m128 r6 = _mm_loadu_ps(g6 + j), r7 = _mm_loadu_ps(g7 + j);
        if (scaled) {
            r0 = _mm_mul_ps(r0, sc);
            r1 = _mm_mul_ps(r1, sc);
            r2 = _mm_mul_ps(r2, sc);
            r3 = _mm_mul_ps(r3, sc);
            r4 = _mm_mul_ps(r4, sc);
            r5 = _mm_mul_ps(r5, sc);
            r6 = _mm_mul_ps(r6, sc);
            r7 = _mm_mul_ps(r7, sc);
        }
        _MM_TRANSPOSE4_PS(r0, r1, r2, r3); /* r0: element j of chunks 0..3, r1: element j + 1, ... */
        _MM_TRANSPOSE4_PS(r4, r5, r6, r7);
        acc0 = _mm256_add_pd(acc0, square_pd(r0));
        acc1 = _mm256_add_pd(acc1, square_pd(r4));
        acc0 = _mm256_add_pd(acc0, square_pd(r1));
        acc1 = _mm256_add_pd(acc1, square_pd(r5));
        acc0 = _mm256_add_pd(acc0, square_pd(r2));
        acc1 = _mm256_add_pd(acc1, square_pd(r6));
        acc0 = _mm256_add_pd(acc0, square_pd(r3));
        acc1 = _mm256_add_pd(acc1, square_pd(r7));
    }
    _mm256_storeu_pd(acc8, acc0);
    _mm256_storeu_pd(acc8 + 4, acc1);
}

static void sumsq_avx2(float grad_scale, const float *const *g, const int64_t *n, int32_t count, double *out) {
    int32_t c = 0;
    for (; c + 8 <= count; c += 8) {
        int64_t len = n[c];
        for (int32_t i = 1; i < 8; i++) {
            len = n[c + i] < len ? n[c + i] : len;
        }
        len = len / 4 * 4;
        double acc[8];
        sumsq8_avx2(grad_scale, g + c, len, acc);
        for (int32_t i = 0; i < 8; i++) { /* each chain goes on from where the vectors left it */
            out[c + i] = sumsq_scalar(acc[i], grad_scale, g[c + i], len, n[c + i]);
        }
    }
    for (; c < count; c++) {
        out[c] = sumsq_scalar(0.0, grad_scale, g[c], 0, n[c]);
    }
}

/* Round to nearest even of 8 floats to bf16, as caprl_f32_to_bf16 (NaN: quieted, sign and top payload kept). */
static ADAMW_AVX2_INLINE __m128i bf16x8_avx2(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i hi = _mm256_srli_epi32(u, 16);
    __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    __m256i rne = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    __m256i qnan = _mm256_or_si256(hi, _mm256_set1_epi32(0x0040));
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                     _mm256_set1_epi32(0x7F800000));
    __m256i r = _mm256_blendv_epi8(rne, qnan, nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

ADAMW_AVX2 static void update_avx2(const adamw_consts *k, float *p, const float *g, float *m, float *v,
                                   uint16_t *shadow, int64_t n) {
    const __m256 gs = _mm256_set1_ps(k->grad_scale), clip = _mm256_set1_ps(k->clip);
    const __m256 decay = _mm256_set1_ps(k->decay), omb1 = _mm256_set1_ps(k->one_m_b1);
    const __m256 b2 = _mm256_set1_ps(k->beta2), omb2 = _mm256_set1_ps(k->one_m_b2);
    const __m256 step = _mm256_set1_ps(k->step_size), bc2 = _mm256_set1_ps(k->bc2_sqrt);
    const __m256 eps = _mm256_set1_ps(k->eps);
    const bool   scaled = k->grad_scale != 1.0f, clipped = k->do_clip;
    int64_t      j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 gj = _mm256_loadu_ps(g + j);
        gj = scaled ? _mm256_mul_ps(gj, gs) : gj;
        gj = clipped ? _mm256_mul_ps(gj, clip) : gj;
        __m256 mo = _mm256_loadu_ps(m + j), vo = _mm256_loadu_ps(v + j);
        __m256 pj = _mm256_mul_ps(_mm256_loadu_ps(p + j), decay);
        __m256 mj = _mm256_add_ps(mo, _mm256_mul_ps(omb1, _mm256_sub_ps(gj, mo)));
        __m256 vj = _mm256_add_ps(_mm256_mul_ps(vo, b2), _mm256_mul_ps(_mm256_mul_ps(omb2, gj), gj));
        __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vj), bc2), eps);
        __m256 pn = _mm256_sub_ps(pj, _mm256_mul_ps(step, _mm256_div_ps(mj, denom)));
        _mm256_storeu_ps(p + j, pn);
        _mm256_storeu_ps(m + j, mj);
        _mm256_storeu_ps(v + j, vj);
        if (shadow) {
            _mm_storeu_si128((__m128i *)(void *)(shadow + j), bf16x8_avx2(pn));
        }
    }
    update_scalar(k, p, g, m, v, shadow, j, n);
}

#endif /* CAPRL_X86 */

/* A level the machine lacks falls back to the widest it has (all give the same bytes). */
static int32_t usable_isa(int32_t isa) {
    int32_t best = adamw_best_isa();
    return isa < best ? isa : best;
}

void adamw_sumsq(int32_t isa, float grad_scale, const float *const *g, const int64_t *n, int32_t count,
                 double *out) {
#if CAPRL_X86
    if (usable_isa(isa) >= CAPRL_ISA_AVX2) {
        sumsq_avx2(grad_scale, g, n, count, out);
        return;
    }
#endif
    (void)isa;
    for (int32_t c = 0; c < count; c++) {
        out[c] = sumsq_scalar(0.0, grad_scale, g[c], 0, n[c]);
    }
}

void adamw_update(int32_t isa, const adamw_consts *k, float *p, const float *g, float *m, float *v, uint16_t *shadow,
                  int64_t n) {
#if CAPRL_X86
    if (usable_isa(isa) >= CAPRL_ISA_AVX2) {
        update_avx2(k, p, g, m, v, shadow, n);
        return;
    }
#endif
    (void)isa;
    update_scalar(k, p, g, m, v, shadow, 0, n);
}

/* ---- the step ------------------------------------------------------------------------------------------------ */

/* Chunks handed to one adamw_sumsq call (its vector kernel takes them 8 at a time). */
enum { SUMSQ_BATCH = 32 };

typedef struct step_ctx {
    caprl_adamw *opt;
    float       *params, *grads;
    uint16_t    *shadow; /* the trainer's bf16 shadow (same offsets as params), or NULL */
    adamw_consts k;
} step_ctx;

/* Sums the squares of the scaled gradients per chunk (double accumulation); the gradients are only read: the
 * update applies grad_scale again, with the same rounding. */
static void sumsq_range(void *vctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const step_ctx *s = vctx;
    const float    *g[SUMSQ_BATCH];
    int64_t         n[SUMSQ_BATCH];
    for (int64_t c0 = i0; c0 < i1; c0 += SUMSQ_BATCH) {
        int32_t count = i1 - c0 < SUMSQ_BATCH ? (int32_t)(i1 - c0) : SUMSQ_BATCH;
        for (int32_t i = 0; i < count; i++) {
            const adamw_chunk *ch = &s->opt->chunks[c0 + i];
            g[i] = s->grads + ch->off;
            n[i] = ch->n;
        }
        adamw_sumsq(s->opt->isa, s->k.grad_scale, g, n, count, s->opt->partial + c0);
    }
}

static void update_range(void *vctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const step_ctx *s = vctx;
    adamw_consts no_decay = s->k;
    no_decay.decay = 1.0f;
    for (int64_t c = i0; c < i1; c++) {
        const adamw_chunk *ch = &s->opt->chunks[c];
        adamw_update(s->opt->isa, ch->decay ? &s->k : &no_decay, s->params + ch->off, s->grads + ch->off,
                     s->opt->m + ch->moff, s->opt->v + ch->moff, s->shadow ? s->shadow + ch->off : NULL, ch->n);
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
    s.shadow = tr->bf16;
    s.k.grad_scale = grad_scale;
    caprl_parallel_for(pool, opt->n_chunks, sumsq_range, &s);
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
        s.k.do_clip = coef < 1.0;
        s.k.clip = (float)coef;
        int64_t t = opt->t + 1;
        double  b1 = (double)opt->p.beta1, b2 = (double)opt->p.beta2;
        s.k.decay = (float)(1.0 - (double)lr * (double)opt->p.weight_decay);
        s.k.one_m_b1 = (float)(1.0 - b1);
        s.k.beta2 = opt->p.beta2;
        s.k.one_m_b2 = (float)(1.0 - b2);
        s.k.step_size = (float)((double)lr / (1.0 - pow(b1, (double)t)));
        s.k.bc2_sqrt = (float)sqrt(1.0 - pow(b2, (double)t));
        s.k.eps = opt->p.eps;
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
    /* the update rounded every element it changed into the shadow (frozen tensors and the gaps did not change) */
    return skip ? CAPRL_OK : trainer_sync_packed(tr, err);
}
