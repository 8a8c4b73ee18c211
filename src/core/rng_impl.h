/* Counter-based RNG (Philox4x32-10). A stream is a key (seed, stream id); a draw is a pure function of
 * (key, counter), so any sample can be replayed and results do not depend on threads or batching. */
#ifndef CAPRL_RNG_IMPL_H
#define CAPRL_RNG_IMPL_H

#include <stdint.h>

typedef struct caprl_rng {
    uint32_t key[2];
    uint32_t ctr[4]; /* ctr[0..1] advance per block; ctr[2..3] = stream-local sub-stream */
    uint32_t buf[4];
    int32_t  buf_left;
} caprl_rng;

/* Philox4x32-10 block function. */
void caprl_philox4x32(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

/* Stream keyed by seed and two 64-bit identifiers (e.g. sequence index and purpose). */
void     caprl_rng_init(caprl_rng *r, uint64_t seed, uint64_t stream_a, uint64_t stream_b);
uint32_t caprl_rng_u32(caprl_rng *r);
uint64_t caprl_rng_u64(caprl_rng *r);
/* Uniform in [0, 1) with 24 random bits (exactly representable in float). */
float    caprl_rng_uniform(caprl_rng *r);
/* Uniform in [0, 1) with 53 random bits. */
double   caprl_rng_uniform_f64(caprl_rng *r);
/* Uniform integer in [0, n), unbiased (rejection). n > 0. */
uint64_t caprl_rng_below(caprl_rng *r, uint64_t n);
/* Standard normal (Box-Muller, both halves used deterministically: one value per call). */
float    caprl_rng_normal(caprl_rng *r);

#endif /* CAPRL_RNG_IMPL_H */
