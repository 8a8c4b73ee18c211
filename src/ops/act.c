/* Elementwise forward ops: SwiGLU out = silu(gate) * up with silu(g) = g / (1 + exp(-g)) (spec/qwen.md §2.7), and
 * the residual add acc += x. exp is caprl's own (ops_impl.h), identical in the vector and scalar paths, so every
 * element's value is independent of where the vector blocks and the thread chunks fall. */
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { ACT_GRAIN = 32768 }; /* elements per thread chunk: small vectors run inline */

typedef struct act_task {
    float       *out; /* (n) */
    const float *a;   /* (n) */
    const float *b;   /* (n) */
} act_task;

static float silu_mul(float g, float u) {
    return g / (1.0f + caprl_expf_ref(-g)) * u;
}

static void swiglu_scalar(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const act_task *t = ctx;
    for (int64_t i = i0; i < i1; i++) {
        t->out[i] = silu_mul(t->a[i], t->b[i]);
    }
}

static void add_scalar(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const act_task *t = ctx;
    for (int64_t i = i0; i < i1; i++) {
        t->out[i] += t->a[i];
    }
}

#if CAPRL_X86
static CAPRL_AVX2_INLINE __m256 silu_mul_avx2(__m256 g, __m256 u) {
    __m256 e = caprl_exp8_avx2(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f))); /* exact -g, as in the scalar path */
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

static CAPRL_AVX2 void swiglu_avx2(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const act_task *t = ctx;
    int64_t         i = i0;
    for (; i + 8 <= i1; i += 8) {
        _mm256_storeu_ps(t->out + i, silu_mul_avx2(_mm256_loadu_ps(t->a + i), _mm256_loadu_ps(t->b + i)));
    }
    if (i < i1) {
        __m256i mask = caprl_mask8_avx2(i1 - i);
        __m256  r = silu_mul_avx2(_mm256_maskload_ps(t->a + i, mask), _mm256_maskload_ps(t->b + i, mask));
        _mm256_maskstore_ps(t->out + i, mask, r);
    }
}

static CAPRL_AVX2 void add_avx2(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const act_task *t = ctx;
    int64_t         i = i0;
    for (; i + 8 <= i1; i += 8) {
        _mm256_storeu_ps(t->out + i, _mm256_add_ps(_mm256_loadu_ps(t->out + i), _mm256_loadu_ps(t->a + i)));
    }
    for (; i < i1; i++) {
        t->out[i] += t->a[i];
    }
}
#endif

void caprl_op_swiglu(caprl_cpu_ctx *c, float *out, const float *gate, const float *up, int64_t n) {
    CAPRL_ASSERT(n >= 0);
    act_task       t = {.out = out, .a = gate, .b = up};
    caprl_range_fn fn = swiglu_scalar;
#if CAPRL_X86
    if (c->isa >= CAPRL_ISA_AVX2) {
        fn = swiglu_avx2;
    }
#endif
    caprl_parallel_for_grain(c->pool, n, ACT_GRAIN, fn, &t);
}

void caprl_op_add(caprl_cpu_ctx *c, float *acc, const float *x, int64_t n) {
    CAPRL_ASSERT(n >= 0);
    act_task       t = {.out = acc, .a = x};
    caprl_range_fn fn = add_scalar;
#if CAPRL_X86
    if (c->isa >= CAPRL_ISA_AVX2) {
        fn = add_avx2;
    }
#endif
    caprl_parallel_for_grain(c->pool, n, ACT_GRAIN * 2, fn, &t);
}
