/* Token sampling with Hugging Face's logits-processor order: repetition penalty, temperature, top-k, top-p,
 * then softmax and a multinomial draw (or argmax when not sampling).
 * Randomness is counter-based: the draw for (seed, stream, step) is fixed, so results do not depend on thread
 * count, batch composition or the order in which sequences are sampled. */
#ifndef CAPRL_SAMPLER_H
#define CAPRL_SAMPLER_H

#include "caprl/caprl.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct caprl_sampling_params {
    bool     do_sample;          /* false = greedy (argmax after the repetition penalty) */
    float    temperature;        /* > 0 when sampling (ignored by greedy decoding); 1 = unchanged */
    int32_t  top_k;              /* 0 = off */
    float    top_p;              /* [0, 1]; 1 = off, 0 keeps only the most likely id */
    float    repetition_penalty; /* > 0; 1 = off */
    uint64_t seed;
} caprl_sampling_params;

/* do_sample true, temperature 1, top_k 0, top_p 1, repetition_penalty 1, seed 0. */
CAPRL_API caprl_sampling_params caprl_sampling_default_params(void);
CAPRL_API caprl_status caprl_sampling_params_check(const caprl_sampling_params *p, caprl_error *err);

typedef struct caprl_sampler caprl_sampler;

CAPRL_API caprl_status caprl_sampler_init(caprl_sampler **out, int32_t n_vocab, const caprl_sampling_params *params,
                                          caprl_error *err);
CAPRL_API void         caprl_sampler_free(caprl_sampler *s); /* NULL-safe */

/* Picks the next token from logits[n_vocab]. history[0..n_history) are the ids so far (prompt and generated),
 * used by the repetition penalty. The random draw is a function of (seed, stream, step) only. logits is
 * not modified. */
CAPRL_API int32_t caprl_sampler_sample(caprl_sampler *s, const float *logits, const int32_t *history,
                                       int64_t n_history, uint64_t stream, uint64_t step);

/* The processed distribution after the last caprl_sampler_sample call: probabilities over n_vocab (zeros
 * outside the top-k / top-p set). For tests and for scoring. */
CAPRL_API const float *caprl_sampler_probs(const caprl_sampler *s);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_SAMPLER_H */
