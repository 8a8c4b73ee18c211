/* Backward of the activations (forwards in act.c and gelu.c).
 *
 * SwiGLU, out = silu(g) * u with silu(g) = g / (1 + e), e = exp(-g) (caprl's exp, as the forward):
 *   sig = 1 / (1 + e),  dup = dout * silu(g),  dgate = (dout * u) * (sig * (1 + g * (1 - sig)))
 * with silu(g) computed exactly as the forward does. The AVX2 and scalar paths perform the same operations (no
 * fused multiply-adds, the same exp), so every element's value is the same on either path and wherever the
 * vector blocks and thread chunks fall.
 *
 * GELU, exact erf form: gelu'(x) = 0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi). One scalar path for
 * every ISA level, like the forward (erff from libm). */
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { ACT_BWD_GRAIN = 16384 }; /* elements per thread chunk: small vectors run inline */

#define GELU_SQRT1_2 0.70710678118654752440f
#define GELU_INV_SQRT_2PI 0.39894228040143267794f

typedef struct act_bwd_task {
    float       *d0;   /* dgate / din */
    float       *d1;   /* dup */
    const float *dout;
    const float *a;    /* gate / in */
    const float *b;    /* up */
} act_bwd_task;

static void swiglu_bwd_scalar(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const act_bwd_task *t = ctx;
    for (int64_t i = i0; i < i1; i++) {
        float g = t->a[i], u = t->b[i], d = t->dout[i];
        float den = 1.0f + caprl_expf_ref(-g);
        float sig = 1.0f / den;
        float silu = g / den;
        t->d1[i] = d * silu;
        t->d0[i] = (d * u) * (sig * (1.0f + g * (1.0f - sig)));
    }
}

#if CAPRL_X86
static CAPRL_AVX2_INLINE void swiglu_bwd8_avx2(__m256 g, __m256 u, __m256 d, __m256 *dg, __m256 *du) {
    __m256 one = _mm256_set1_ps(1.0f);
    __m256 den = _mm256_add_ps(one, caprl_exp8_avx2(_mm256_xor_ps(g, _mm256_set1_ps(-0.0f))));
    __m256 sig = _mm256_div_ps(one, den);
    __m256 silu = _mm256_div_ps(g, den);
    *du = _mm256_mul_ps(d, silu);
    __m256 ds = _mm256_mul_ps(sig, _mm256_add_ps(one, _mm256_mul_ps(g, _mm256_sub_ps(one, sig))));
    *dg = _mm256_mul_ps(_mm256_mul_ps(d, u), ds);
}

static CAPRL_AVX2 void swiglu_bwd_avx2(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const act_bwd_task *t = ctx;
    int64_t             i = i0;
    __m256              dg, du;
    for (; i + 8 <= i1; i += 8) {
        swiglu_bwd8_avx2(_mm256_loadu_ps(t->a + i), _mm256_loadu_ps(t->b + i), _mm256_loadu_ps(t->dout + i), &dg,
                         &du);
        _mm256_storeu_ps(t->d0 + i, dg);
        _mm256_storeu_ps(t->d1 + i, du);
    }
    if (i < i1) {
        __m256i mask = caprl_mask8_avx2(i1 - i);
        swiglu_bwd8_avx2(_mm256_maskload_ps(t->a + i, mask), _mm256_maskload_ps(t->b + i, mask),
                         _mm256_maskload_ps(t->dout + i, mask), &dg, &du);
        _mm256_maskstore_ps(t->d0 + i, mask, dg);
        _mm256_maskstore_ps(t->d1 + i, mask, du);
    }
}
#endif

void caprl_op_swiglu_bwd(caprl_cpu_ctx *c, float *dgate, float *dup, const float *dout, const float *gate,
                         const float *up, int64_t n) {
    CAPRL_ASSERT(n >= 0);
    act_bwd_task   t = {.d0 = dgate, .d1 = dup, .dout = dout, .a = gate, .b = up};
    caprl_range_fn fn = swiglu_bwd_scalar;
#if CAPRL_X86
    if (c->isa >= CAPRL_ISA_AVX2) {
        fn = swiglu_bwd_avx2;
    }
#endif
    caprl_parallel_for_grain(c->pool, n, ACT_BWD_GRAIN, fn, &t);
}

static void gelu_bwd_range(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const act_bwd_task *t = ctx;
    for (int64_t i = i0; i < i1; i++) {
        float x = t->a[i];
        float cdf = 0.5f * (1.0f + erff(x * GELU_SQRT1_2));
        float pdf = caprl_expf_ref(-0.5f * (x * x)) * GELU_INV_SQRT_2PI;
        t->d0[i] = t->dout[i] * (cdf + x * pdf);
    }
}

void caprl_op_gelu_bwd(caprl_cpu_ctx *c, float *din, const float *dout, const float *in, int64_t n) {
    CAPRL_ASSERT(n >= 0);
    act_bwd_task t = {.d0 = din, .dout = dout, .a = in};
    caprl_parallel_for_grain(c->pool, n, ACT_BWD_GRAIN, gelu_bwd_range, &t);
}
