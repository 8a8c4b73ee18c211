/* GELU forward, exact erf form as torch's nn.GELU() (approximate='none') computes it in f32 on CPU:
 * out = (x * 0.5) * (1 + erf(x * sqrt(1/2))). Used by the Qwen2.5-VL patch merger (spec/qwen.md §3.8; llama.cpp's
 * tanh approximation there is a known deviation, §7.1).
 *
 * One scalar path for every ISA level: erff from libm is accurate to about 1 ulp, and the merger applies GELU to
 * (patches / 4) x (4 C) values once per image, far below the cost of the matmuls around it, so a vector erf would
 * buy nothing measurable and would make ISA levels disagree. Elements are independent; split over elements. */
#include "core/error_impl.h"
#include "ops/ops_impl.h"

enum { GELU_GRAIN = 16384 }; /* elements per thread chunk: small vectors run inline */

#define GELU_SQRT1_2 0.70710678118654752440f

typedef struct gelu_task {
    float       *out; /* (n) */
    const float *in;  /* (n) */
} gelu_task;

static void gelu_range(void *ctx, int64_t i0, int64_t i1, int32_t tid) {
    (void)tid;
    const gelu_task *t = ctx;
    for (int64_t i = i0; i < i1; i++) {
        float x = t->in[i];
        t->out[i] = (x * 0.5f) * (1.0f + erff(x * GELU_SQRT1_2));
    }
}

void caprl_op_gelu(caprl_cpu_ctx *c, float *out, const float *in, int64_t n) {
    CAPRL_ASSERT(n >= 0);
    gelu_task t = {.out = out, .in = in};
    caprl_parallel_for_grain(c->pool, n, GELU_GRAIN, gelu_range, &t);
}
