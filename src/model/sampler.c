/* Sampling in Hugging Face's order (spec/qwen.md §5.9): repetition penalty over the distinct ids seen so far,
 * then (when sampling) temperature, top-k (ties with the k-th value kept), top-p (drop the ascending-sorted
 * prefix whose cumulative probability is <= 1 - top_p, always keeping the most likely token), softmax and one
 * multinomial draw. The uniform for the draw is Philox(seed, stream, step): no hidden state. */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/sampler.h"
#include "caprl/tensor.h"
#include "core/error_impl.h"
#include "core/rng_impl.h"

struct caprl_sampler {
    caprl_sampling_params p;
    int32_t               n_vocab;
    float                *work;   /* (V) processed logits */
    float                *probs;  /* (V) final distribution */
    uint32_t             *seen;   /* (V) stamp per id, for "once per distinct id" */
    uint32_t              stamp;
    int32_t              *cand;   /* (V) candidate ids */
    float                 top_p_cut; /* 1 - top_p as transformers compares it (see select_candidates) */
};

caprl_sampling_params caprl_sampling_default_params(void) {
    caprl_sampling_params p;
    p.do_sample = true;
    p.temperature = 1.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.repetition_penalty = 1.0f;
    p.seed = 0;
    return p;
}

caprl_status caprl_sampling_params_check(const caprl_sampling_params *p, caprl_error *err) {
    /* greedy decoding reads no temperature (transformers accepts do_sample false with temperature 0) */
    if ((p->do_sample ? !(p->temperature > 0.0f) : !(p->temperature >= 0.0f)) || !isfinite(p->temperature)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "temperature must be a %s number, got %g",
                             p->do_sample ? "positive" : "non-negative", (double)p->temperature);
    }
    if (p->top_k < 0) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "top_k must be >= 0 (0 = off), got %d", p->top_k);
    }
    if (!(p->top_p >= 0.0f && p->top_p <= 1.0f)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "top_p must be in [0, 1], got %g", (double)p->top_p);
    }
    if (!(p->repetition_penalty > 0.0f) || !isfinite(p->repetition_penalty)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "repetition_penalty must be a positive number, got %g",
                             (double)p->repetition_penalty);
    }
    return CAPRL_OK;
}

caprl_status caprl_sampler_init(caprl_sampler **out, int32_t n_vocab, const caprl_sampling_params *params,
                                caprl_error *err) {
    caprl_sampling_params p = params ? *params : caprl_sampling_default_params();
    CAPRL_TRY(caprl_sampling_params_check(&p, err));
    if (n_vocab < 1) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "sampler: vocabulary size %d", n_vocab);
    }
    caprl_sampler *s = caprl_xcalloc(1, sizeof *s);
    s->p = p;
    /* 1 - top_p taken as Python computes it from the decimal the user wrote (0.8 -> 0.19999999999999996 -> 0.2f)
     * rather than from the float 0.8f, so that exact ties at the boundary (equal logits) fall the same way */
    char typed[32];
    caprl_f32_shortest(p.top_p, typed);
    s->top_p_cut = (float)(1.0 - strtod(typed, NULL));
    s->n_vocab = n_vocab;
    s->work = caprl_xmalloc((size_t)n_vocab * sizeof(float));
    s->probs = caprl_xmalloc((size_t)n_vocab * sizeof(float));
    s->seen = caprl_xcalloc((size_t)n_vocab, sizeof(uint32_t));
    s->cand = caprl_xmalloc((size_t)n_vocab * sizeof(int32_t));
    *out = s;
    return CAPRL_OK;
}

void caprl_sampler_free(caprl_sampler *s) {
    if (!s) {
        return;
    }
    free(s->work);
    free(s->probs);
    free(s->seen);
    free(s->cand);
    free(s);
}

const float *caprl_sampler_probs(const caprl_sampler *s) {
    return s->probs;
}

static void apply_repetition_penalty(caprl_sampler *s, const int32_t *history, int64_t n_history) {
    float rp = s->p.repetition_penalty;
    if (rp == 1.0f) {
        return;
    }
    if (++s->stamp == 0) { /* stamp wrapped: clear and restart */
        memset(s->seen, 0, (size_t)s->n_vocab * sizeof(uint32_t));
        s->stamp = 1;
    }
    for (int64_t i = 0; i < n_history; i++) {
        int32_t id = history[i];
        if (id < 0 || id >= s->n_vocab || s->seen[id] == s->stamp) {
            continue;
        }
        s->seen[id] = s->stamp;
        float l = s->work[id];
        s->work[id] = l < 0.0f ? l * rp : l / rp;
    }
}

static int cmp_id(const void *a, const void *b) {
    int32_t ia = *(const int32_t *)a, ib = *(const int32_t *)b;
    return ia < ib ? -1 : (ia > ib);
}

static int32_t argmax(const float *x, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++) {
        if (x[i] > x[best]) {
            best = i;
        }
    }
    return best;
}

static int cmp_ascending_logit(const void *a, const void *b, void *logits) {
    int32_t      ia = *(const int32_t *)a, ib = *(const int32_t *)b;
    const float *l = logits;
    float        la = l[ia], lb = l[ib];
    if (la < lb) {
        return -1;
    }
    if (la > lb) {
        return 1;
    }
    return ia < ib ? -1 : (ia > ib);
}

/* The k-th largest value of x (1-based k), by selection on a copy. */
static float kth_largest(const float *x, int32_t n, int32_t k, float *scratch) {
    memcpy(scratch, x, (size_t)n * sizeof(float));
    int32_t lo = 0, hi = n - 1, want = k - 1; /* index in descending order */
    while (lo < hi) {
        float   pivot = scratch[lo + (hi - lo) / 2];
        int32_t i = lo, j = hi;
        while (i <= j) {
            while (scratch[i] > pivot) {
                i++;
            }
            while (scratch[j] < pivot) {
                j--;
            }
            if (i <= j) {
                float t = scratch[i];
                scratch[i] = scratch[j];
                scratch[j] = t;
                i++;
                j--;
            }
        }
        if (want <= j) {
            hi = j;
        } else if (want >= i) {
            lo = i;
        } else {
            return scratch[want];
        }
    }
    return scratch[want];
}

/* Collects the ids that survive top-k and top-p into s->cand in ascending id order; returns their count. work holds
 * the logits after penalty and temperature; -INFINITY marks removed ids. */
static int32_t select_candidates(caprl_sampler *s) {
    const int32_t V = s->n_vocab;
    float        *w = s->work;
    int32_t       n = 0;
    if (s->p.top_k > 0 && s->p.top_k < V) {
        float kth = kth_largest(w, V, s->p.top_k, s->probs);
        for (int32_t i = 0; i < V; i++) {
            if (w[i] >= kth) {
                s->cand[n++] = i;
            }
        }
    } else {
        for (int32_t i = 0; i < V; i++) {
            if (w[i] > -INFINITY) {
                s->cand[n++] = i;
            }
        }
    }
    if (s->p.top_p >= 1.0f || n <= 1) {
        return n;
    }
    /* transformers' TopPLogitsWarper: over the ascending order, remove every id whose cumulative probability (f32)
     * is <= 1 - top_p, the most likely always kept */
    const float threshold = s->top_p_cut;
    float       mx = -INFINITY;
    for (int32_t j = 0; j < n; j++) {
        mx = fmaxf(mx, w[s->cand[j]]);
    }
    double total = 0.0;
    for (int32_t j = 0; j < n; j++) {
        total += exp((double)(w[s->cand[j]] - mx));
    }
    /* Ids with probability below threshold / n together hold less than the threshold and are the least likely, so
     * they lie in the prefix of the ascending order that top-p removes: drop them before sorting the rest. */
    const double cut = (double)threshold / (double)n;
    double       removed_mass = 0.0;
    int32_t      kept = 0;
    for (int32_t j = 0; j < n; j++) {
        double pj = exp((double)(w[s->cand[j]] - mx)) / total;
        if (pj < cut) {
            removed_mass += pj;
        } else {
            s->cand[kept++] = s->cand[j];
        }
    }
    /* the most likely id has p = 1 / total >= 1 / n >= cut (total sums n terms <= 1), so one stays */
    CAPRL_ASSERT(kept > 0);
    qsort_r(s->cand, (size_t)kept, sizeof(int32_t), cmp_ascending_logit, w);
    double  cum = removed_mass;
    int32_t first_kept = kept - 1; /* the most likely is always kept */
    for (int32_t j = 0; j < kept - 1; j++) {
        cum += (double)(float)(exp((double)(w[s->cand[j]] - mx)) / total);
        if ((float)cum > threshold) {
            first_kept = j;
            break;
        }
    }
    int32_t n_kept = kept - first_kept;
    memmove(s->cand, s->cand + first_kept, (size_t)n_kept * sizeof(int32_t));
    /* back to ascending id order, which the draw relies on */
    qsort(s->cand, (size_t)n_kept, sizeof(int32_t), cmp_id);
    return n_kept;
}

int32_t caprl_sampler_sample(caprl_sampler *s, const float *logits, const int32_t *history, int64_t n_history,
                             uint64_t stream, uint64_t step) {
    const int32_t V = s->n_vocab;
    memcpy(s->work, logits, (size_t)V * sizeof(float));
    apply_repetition_penalty(s, history, n_history);
    if (!s->p.do_sample) {
        int32_t best = argmax(s->work, V);
        memset(s->probs, 0, (size_t)V * sizeof(float));
        s->probs[best] = 1.0f;
        return best;
    }
    if (s->p.temperature != 1.0f) {
        for (int32_t i = 0; i < V; i++) {
            s->work[i] /= s->p.temperature;
        }
    }
    int32_t n = select_candidates(s);
    if (n == 0) { /* every logit was -inf or NaN: fall back to the first maximum, never index garbage */
        int32_t best = argmax(logits, V);
        memset(s->probs, 0, (size_t)V * sizeof(float));
        s->probs[best] = 1.0f;
        return best;
    }
    /* candidates come in ascending id order, so the draw does not depend on how they were selected */
    const int32_t *c = s->cand;
    float mx = -INFINITY;
    for (int32_t j = 0; j < n; j++) {
        mx = fmaxf(mx, s->work[c[j]]);
    }
    double total = 0.0;
    memset(s->probs, 0, (size_t)V * sizeof(float));
    for (int32_t j = 0; j < n; j++) {
        float e = (float)exp((double)(s->work[c[j]] - mx));
        s->probs[c[j]] = e;
        total += (double)e;
    }
    caprl_rng rng;
    caprl_rng_init(&rng, s->p.seed, stream, step);
    double  u = caprl_rng_uniform_f64(&rng) * total;
    double  acc = 0.0;
    int32_t pick = c[n - 1];
    for (int32_t j = 0; j < n; j++) {
        acc += (double)s->probs[c[j]];
        if (u < acc) {
            pick = c[j];
            break;
        }
    }
    for (int32_t j = 0; j < n; j++) {
        s->probs[c[j]] = (float)((double)s->probs[c[j]] / total);
    }
    return pick;
}
