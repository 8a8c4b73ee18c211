/* Turning safetensors entries into the weights the kernels take, shared by the text model and the vision tower:
 * matrices stay in their stored dtype and in the mapping where possible (F16 is widened to F32 once, a tensor
 * misaligned for its dtype is copied), vectors become f32 copies; and the uniform random init of both. */
#ifndef CAPRL_WEIGHTS_IMPL_H
#define CAPRL_WEIGHTS_IMPL_H

#include "backend/backend.h"
#include "caprl/safetensors.h"
#include "core/rng_impl.h"

/* Bytes (a multiple of 64) the matrix t needs outside the mapping; 0 when it is used in place. */
size_t caprl_weight_owned_bytes(const caprl_st_tensor *t);
/* Points w at t (F32/BF16 in place) or converts/copies it to *cursor, advancing it by caprl_weight_owned_bytes. */
void caprl_weight_from_tensor(caprl_weight *w, const caprl_st_tensor *t, uint8_t **cursor);
/* dst (t->numel) = t as f32 (F32, BF16 or F16; any alignment). */
void caprl_vector_from_tensor(float *dst, const caprl_st_tensor *t);
/* n values uniform in (-a, a), a = std * sqrt(3) (standard deviation std), stored as F32 or BF16. Uniform is much
 * cheaper to draw than normal, which matters for the 0.5B- and 3B-shaped benchmark weights. */
void caprl_fill_uniform(void *dst, int32_t dtype, int64_t n, float std, caprl_rng *rng);

#endif /* CAPRL_WEIGHTS_IMPL_H */
