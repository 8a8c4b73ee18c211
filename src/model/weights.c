/* Weights from safetensors entries, and uniform random init (see weights_impl.h). */
#include <string.h>

#include "caprl/tensor.h"
#include "model/weights_impl.h"

static bool misaligned(const caprl_st_tensor *t) {
    return ((uintptr_t)t->data % caprl_dtype_size(t->dtype)) != 0;
}

size_t caprl_weight_owned_bytes(const caprl_st_tensor *t) {
    size_t b = 0;
    if (t->dtype == CAPRL_DTYPE_F16) {
        b = (size_t)t->numel * sizeof(float);
    } else if (misaligned(t)) {
        b = t->nbytes;
    }
    return (b + 63) & ~(size_t)63;
}

void caprl_weight_from_tensor(caprl_weight *w, const caprl_st_tensor *t, uint8_t **cursor) {
    size_t owned = caprl_weight_owned_bytes(t);
    if (t->dtype == CAPRL_DTYPE_F16) { /* the kernels take f32 and bf16 only: widen once */
        caprl_vector_from_tensor((float *)(void *)*cursor, t);
        w->dtype = CAPRL_DTYPE_F32;
        w->data = *cursor;
    } else if (owned) { /* a hostile or odd writer may misalign a tensor: copy it rather than read unaligned */
        memcpy(*cursor, t->data, t->nbytes);
        w->dtype = t->dtype;
        w->data = *cursor;
    } else {
        w->dtype = t->dtype;
        w->data = t->data;
    }
    *cursor += owned;
}

void caprl_vector_from_tensor(float *dst, const caprl_st_tensor *t) {
    const uint8_t *src = t->data;
    for (int64_t i = 0; i < t->numel; i++) {
        if (t->dtype == CAPRL_DTYPE_F32) {
            memcpy(&dst[i], src + 4 * i, 4);
        } else {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            dst[i] = t->dtype == CAPRL_DTYPE_BF16 ? caprl_bf16_to_f32(h) : caprl_f16_to_f32(h);
        }
    }
}

void caprl_fill_uniform(void *dst, int32_t dtype, int64_t n, float std, caprl_rng *rng) {
    float a = std * 1.7320508f;
    for (int64_t i = 0; i < n; i++) {
        float x = (2.0f * caprl_rng_uniform(rng) - 1.0f) * a;
        if (dtype == CAPRL_DTYPE_F32) {
            ((float *)dst)[i] = x;
        } else {
            ((uint16_t *)dst)[i] = caprl_f32_to_bf16(x);
        }
    }
}
