/* Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11). */
#include <math.h>

#include "core/rng_impl.h"

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

void caprl_philox4x32(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)PHILOX_M0 * c0;
        uint64_t p1 = (uint64_t)PHILOX_M1 * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n1 = (uint32_t)p1;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        uint32_t n3 = (uint32_t)p0;
        c0 = n0;
        c1 = n1;
        c2 = n2;
        c3 = n3;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

/* splitmix64 finaliser: spreads a 64-bit id so nearby stream ids give unrelated keys. */
static uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

void caprl_rng_init(caprl_rng *r, uint64_t seed, uint64_t stream_a, uint64_t stream_b) {
    uint64_t k = mix64(seed);
    uint64_t s = mix64(stream_a ^ mix64(stream_b + 0x632BE59BD9B4E019ull));
    r->key[0] = (uint32_t)k;
    r->key[1] = (uint32_t)(k >> 32);
    r->ctr[0] = 0;
    r->ctr[1] = 0;
    r->ctr[2] = (uint32_t)s;
    r->ctr[3] = (uint32_t)(s >> 32);
    r->buf_left = 0;
}

uint32_t caprl_rng_u32(caprl_rng *r) {
    if (r->buf_left == 0) {
        caprl_philox4x32(r->ctr, r->key, r->buf);
        if (++r->ctr[0] == 0) {
            r->ctr[1]++;
        }
        r->buf_left = 4;
    }
    return r->buf[4 - r->buf_left--];
}

uint64_t caprl_rng_u64(caprl_rng *r) {
    uint64_t hi = caprl_rng_u32(r);
    return (hi << 32) | caprl_rng_u32(r);
}

float caprl_rng_uniform(caprl_rng *r) {
    return (float)(caprl_rng_u32(r) >> 8) * (1.0f / 16777216.0f);
}

double caprl_rng_uniform_f64(caprl_rng *r) {
    return (double)(caprl_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
}

uint64_t caprl_rng_below(caprl_rng *r, uint64_t n) {
    uint64_t limit = UINT64_MAX - (UINT64_MAX % n);
    uint64_t x;
    do {
        x = caprl_rng_u64(r);
    } while (x >= limit);
    return x % n;
}

float caprl_rng_normal(caprl_rng *r) {
    double u1 = caprl_rng_uniform_f64(r);
    double u2 = caprl_rng_uniform_f64(r);
    if (u1 < 1e-300) {
        u1 = 1e-300;
    }
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
