/* caprl_bench_matmul: one linear layer's product timed on the CPU backend, the weight prepared as the model and the
 * trainer prepare theirs, so that per-shape speeds (and the AMX blocking, CAPRL_AMX_TUNE) can be measured apart
 * from the rest of a forward or a training step. */
#include <stdio.h>
#include <time.h>

#include "backend/gemm_impl.h"
#include "caprl/bench.h"
#include "caprl/tensor.h"
#include "core/error_impl.h"
#include "ops/ops_impl.h"

static double seconds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Element i of a stream: uniform in [-1, 1) from a hash of (stream, i), cheap enough for a 136M-element weight.
 * Never zeros, which would run faster than real data on some units. */
static float random_at(uint64_t stream, size_t i) {
    uint64_t u = ((uint64_t)i + 1) * 0x9E3779B97F4A7C15ull ^ stream * 0xBF58476D1CE4E5B9ull;
    u ^= u >> 31;
    u *= 0x94D049BB133111EBull;
    u ^= u >> 29;
    return (float)(u >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

static void fill_random(float *x, size_t n, uint64_t stream) {
    for (size_t i = 0; i < n; i++) {
        x[i] = random_at(stream, i);
    }
}

static void fill_random_bf16(uint16_t *x, size_t n, uint64_t stream) {
    for (size_t i = 0; i < n; i++) {
        x[i] = caprl_f32_to_bf16(random_at(stream, i));
    }
}

static const char *kernel_name(const caprl_backend *be, const caprl_weight *w) {
    const caprl_cpu_ctx *c = be->impl;
    if (w->packed) {
        return "amx-bf16";
    }
    return c->isa == CAPRL_ISA_AVX512 ? "avx512" : c->isa == CAPRL_ISA_AVX2 ? "avx2" : "scalar";
}

static void run_pass(caprl_backend *be, const caprl_matmul_bench *b, const caprl_weight *w, float *x, float *y,
                     float *dw) {
    const caprl_backend_ops *ops = be->ops;
    switch (b->pass) {
    case CAPRL_MATMUL_FWD: ops->matmul_fwd(be, y, x, w, NULL, b->M); break;
    case CAPRL_MATMUL_BWD_DATA: ops->matmul_bwd_data(be, x, y, w, b->M); break;
    default: ops->matmul_bwd_weight(be, dw, NULL, y, x, w, b->M); break;
    }
}

caprl_status caprl_bench_matmul(int32_t n_threads, caprl_matmul_bench *b, caprl_error *err) {
    if (b->M <= 0 || b->N <= 0 || b->K <= 0 || b->reps < 1 || b->pass < CAPRL_MATMUL_FWD ||
        b->pass > CAPRL_MATMUL_BWD_WEIGHT ||
        (b->weight_dtype != CAPRL_DTYPE_F32 && b->weight_dtype != CAPRL_DTYPE_BF16)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "matmul bench: need M, N, K > 0, reps >= 1, a known pass and an f32 or bf16 weight "
                             "(got %lld x %lld x %lld, reps %d, pass %d, dtype %d)",
                             (long long)b->M, (long long)b->N, (long long)b->K, b->reps, b->pass, b->weight_dtype);
    }
    size_t nw = (size_t)(b->N * b->K), nx = (size_t)(b->M * b->K), ny = (size_t)(b->M * b->N);
    size_t ndw = b->pass == CAPRL_MATMUL_BWD_WEIGHT ? nw : 0;
    size_t w_bytes = nw * (b->weight_dtype == CAPRL_DTYPE_BF16 ? sizeof(uint16_t) : sizeof(float));
    /* one buffer: x (M, K), y (M, N), dW (N, K) for the weight gradient, then the weight (N, K) */
    size_t bytes = (nx + ny + ndw) * sizeof(float) + w_bytes;
    char  *buf = caprl_try_aligned_alloc(bytes);
    if (!buf) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "matmul bench: cannot allocate %zu bytes for %lld x %lld x %lld",
                             bytes, (long long)b->M, (long long)b->N, (long long)b->K);
    }
    float *x = (float *)(void *)buf, *y = x + nx, *dw = y + ny;
    void  *wdata = dw + ndw;
    fill_random(x, nx, 1);
    fill_random(y, ny, 2);
    fill_random(dw, ndw, 3);
    if (b->weight_dtype == CAPRL_DTYPE_BF16) {
        fill_random_bf16(wdata, nw, 4);
    } else {
        fill_random(wdata, nw, 4);
    }

    caprl_backend *be = NULL;
    caprl_status   st = caprl_backend_cpu_init(&be, n_threads, err);
    caprl_weight   w = {.dtype = b->weight_dtype, .rows = b->N, .cols = b->K,
                        .data = wdata,
                        .backward = b->pass != CAPRL_MATMUL_FWD};
    if (st == CAPRL_OK && be->ops->weight_prepare) {
        st = be->ops->weight_prepare(be, &w, err);
    }
    if (st == CAPRL_OK) {
        snprintf(b->kernel, sizeof b->kernel, "%s", kernel_name(be, &w));
        b->seconds = 0.0;
        for (int32_t r = 0; r <= b->reps; r++) { /* call 0 warms the caches and the scratch up */
            double t0 = seconds_now();
            run_pass(be, b, &w, x, y, dw);
            double dt = seconds_now() - t0;
            if (r > 0 && (b->seconds == 0.0 || dt < b->seconds)) {
                b->seconds = dt;
            }
        }
        b->gflops = 2.0 * (double)b->M * (double)b->N * (double)b->K / b->seconds * 1e-9;
    }
    if (be && be->ops->weight_release) {
        be->ops->weight_release(be, &w);
    }
    caprl_backend_free(be);
    caprl_aligned_free(buf);
    return st;
}
