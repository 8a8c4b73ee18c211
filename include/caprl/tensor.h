/* Element types and the bf16 / f16 <-> f32 conversions. Pure functions, thread-safe. */
#ifndef CAPRL_TENSOR_H
#define CAPRL_TENSOR_H

#include "caprl/caprl.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Append-only. The names are safetensors' dtype strings. */
enum {
    CAPRL_DTYPE_F32 = 0,
    CAPRL_DTYPE_BF16,
    CAPRL_DTYPE_F16,
    CAPRL_DTYPE_F64,
    CAPRL_DTYPE_I64,
    CAPRL_DTYPE_I32,
    CAPRL_DTYPE_I16,
    CAPRL_DTYPE_I8,
    CAPRL_DTYPE_U8,
    CAPRL_DTYPE_BOOL,
    CAPRL_DTYPE_U16,
    CAPRL_DTYPE_U32,
    CAPRL_DTYPE_U64,
    CAPRL_DTYPE_COUNT
};

/* Bytes per element; 0 for an invalid dtype. */
CAPRL_API size_t caprl_dtype_size(int32_t dtype);
/* "F32", "BF16", ...; "?" for an invalid dtype. */
CAPRL_API const char *caprl_dtype_name(int32_t dtype);
/* Inverse of caprl_dtype_name; -1 if unknown. */
CAPRL_API int32_t caprl_dtype_from_name(const char *name);

/* bf16: exact widening; narrowing rounds to nearest even, NaN stays a (quiet) NaN. */
CAPRL_API float    caprl_bf16_to_f32(uint16_t h);
CAPRL_API uint16_t caprl_f32_to_bf16(float f);
/* IEEE binary16 with subnormals; narrowing rounds to nearest even, overflow gives Inf. */
CAPRL_API float    caprl_f16_to_f32(uint16_t h);
CAPRL_API uint16_t caprl_f32_to_f16(float f);

/* Bulk row conversions (n elements). */
CAPRL_API void caprl_bf16_to_f32_row(float *dst, const uint16_t *src, size_t n);
CAPRL_API void caprl_f32_to_bf16_row(uint16_t *dst, const float *src, size_t n);
CAPRL_API void caprl_f16_to_f32_row(float *dst, const uint16_t *src, size_t n);
CAPRL_API void caprl_f32_to_f16_row(uint16_t *dst, const float *src, size_t n);

/* The shortest decimal that reads back as f ("0.1" for 0.1f, not 0.100000001): the value a user typed, as Python
 * would print it. out holds at least 32 bytes. */
CAPRL_API void caprl_f32_shortest(float f, char *out);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_TENSOR_H */
