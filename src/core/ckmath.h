/* Overflow-checked size arithmetic. Every size computed from file contents goes through these. */
#ifndef CAPRL_CKMATH_H
#define CAPRL_CKMATH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Each returns true and stores the result on success, false (out untouched) on overflow. */
static inline bool caprl_mul_size(size_t a, size_t b, size_t *out) {
    size_t r;
    if (__builtin_mul_overflow(a, b, &r)) {
        return false;
    }
    *out = r;
    return true;
}
static inline bool caprl_add_size(size_t a, size_t b, size_t *out) {
    size_t r;
    if (__builtin_add_overflow(a, b, &r)) {
        return false;
    }
    *out = r;
    return true;
}
static inline bool caprl_mul_i64(int64_t a, int64_t b, int64_t *out) {
    int64_t r;
    if (__builtin_mul_overflow(a, b, &r)) {
        return false;
    }
    *out = r;
    return true;
}
static inline bool caprl_add_i64(int64_t a, int64_t b, int64_t *out) {
    int64_t r;
    if (__builtin_add_overflow(a, b, &r)) {
        return false;
    }
    *out = r;
    return true;
}
/* Rounds n up to a multiple of align (a power of two). */
static inline bool caprl_align_size(size_t n, size_t align, size_t *out) {
    size_t r;
    if (__builtin_add_overflow(n, align - 1, &r)) {
        return false;
    }
    *out = r & ~(align - 1);
    return true;
}

#endif /* CAPRL_CKMATH_H */
