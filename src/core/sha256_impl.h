/* SHA-256 (FIPS 180-4), for identifying fixed texts such as the reader prompt template by digest. Not used for
 * anything security-relevant. Incremental: init, update any number of times, final. */
#ifndef CAPRL_SHA256_IMPL_H
#define CAPRL_SHA256_IMPL_H

#include <stddef.h>
#include <stdint.h>

typedef struct caprl_sha256 {
    uint32_t h[8];
    uint64_t n_bytes;  /* message length so far */
    uint8_t  block[64];
    size_t   n_block;  /* bytes waiting in block */
} caprl_sha256;

void caprl_sha256_init(caprl_sha256 *s);
void caprl_sha256_update(caprl_sha256 *s, const void *data, size_t n);
void caprl_sha256_final(caprl_sha256 *s, uint8_t digest[32]);

#endif /* CAPRL_SHA256_IMPL_H */
