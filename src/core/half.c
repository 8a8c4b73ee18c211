/* dtype table and bf16 / f16 conversions (bit-exact with PyTorch's round-to-nearest-even). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/tensor.h"

static const struct {
    const char *name;
    size_t      size;
} k_dtypes[CAPRL_DTYPE_COUNT] = {
    [CAPRL_DTYPE_F32] = {"F32", 4}, [CAPRL_DTYPE_BF16] = {"BF16", 2}, [CAPRL_DTYPE_F16] = {"F16", 2},
    [CAPRL_DTYPE_F64] = {"F64", 8}, [CAPRL_DTYPE_I64] = {"I64", 8},   [CAPRL_DTYPE_I32] = {"I32", 4},
    [CAPRL_DTYPE_I16] = {"I16", 2}, [CAPRL_DTYPE_I8] = {"I8", 1},     [CAPRL_DTYPE_U8] = {"U8", 1},
    [CAPRL_DTYPE_BOOL] = {"BOOL", 1}, [CAPRL_DTYPE_U16] = {"U16", 2}, [CAPRL_DTYPE_U32] = {"U32", 4},
    [CAPRL_DTYPE_U64] = {"U64", 8},
};

size_t caprl_dtype_size(int32_t dtype) {
    return (dtype >= 0 && dtype < CAPRL_DTYPE_COUNT) ? k_dtypes[dtype].size : 0;
}

const char *caprl_dtype_name(int32_t dtype) {
    return (dtype >= 0 && dtype < CAPRL_DTYPE_COUNT) ? k_dtypes[dtype].name : "?";
}

int32_t caprl_dtype_from_name(const char *name) {
    for (int32_t i = 0; i < CAPRL_DTYPE_COUNT; i++) {
        if (strcmp(k_dtypes[i].name, name) == 0) {
            return i;
        }
    }
    return -1;
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float caprl_bf16_to_f32(uint16_t h) {
    return bits_f32((uint32_t)h << 16);
}

uint16_t caprl_f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
        return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN, sign kept */
    }
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float caprl_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    uint32_t u;
    if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                mant <<= 1;
            } while ((mant & 0x400u) == 0);
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3FFu) << 13);
        }
    } else if (exp == 0x1F) {
        u = sign | 0x7F800000u | (mant << 13) | (mant ? 0x00400000u : 0u);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    return bits_f32(u);
}

uint16_t caprl_f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7FFFFFFFu;
    if (abs > 0x7F800000u) {
        return (uint16_t)(sign | 0x7E00u);
    }
    if (abs >= 0x477FF000u) { /* rounds to >= 65520: overflow to Inf */
        return (uint16_t)(sign | 0x7C00u);
    }
    if (abs < 0x38800000u) { /* below the smallest normal half (2^-14): subnormal or zero */
        if (abs < 0x33000000u) { /* < 2^-25 rounds to zero */
            return sign;
        }
        uint32_t e = abs >> 23;
        uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14 + (127-15-1) offsets folded: value = mant * 2^(e-150) */
        /* half subnormal unit is 2^-24: result = mant * 2^(e-150+24) = mant >> (126 - e) */
        uint32_t q = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) {
            q++;
        }
        return (uint16_t)(sign | q);
    }
    uint32_t r = abs - 0x38000000u; /* rebias exponent 127 -> 15 */
    uint32_t q = r >> 13;
    uint32_t rem = r & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) {
        q++;
    }
    return (uint16_t)(sign | q);
}

void caprl_bf16_to_f32_row(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        dst[i] = bits_f32((uint32_t)src[i] << 16);
    }
}

void caprl_f32_to_bf16_row(uint16_t *dst, const float *src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        dst[i] = caprl_f32_to_bf16(src[i]);
    }
}

void caprl_f16_to_f32_row(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        dst[i] = caprl_f16_to_f32(src[i]);
    }
}

void caprl_f32_to_f16_row(uint16_t *dst, const float *src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        dst[i] = caprl_f32_to_f16(src[i]);
    }
}

void caprl_f32_shortest(float f, char *out) {
    for (int digits = 1; digits <= 9; digits++) { /* 9 significant digits always read back as the same float */
        snprintf(out, 32, "%.*g", digits, (double)f);
        if (strtof(out, NULL) == f) {
            return;
        }
    }
}
