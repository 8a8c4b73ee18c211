/* Single kernels of the CPU backend timed apart from the rest of a forward or a training step: caprl_bench_matmul
 * (one linear layer's product, the weight prepared as the model and the trainer prepare theirs; the AMX blocking,
 * CAPRL_AMX_TUNE, applies) and caprl_bench_attention (the decoder's, the trainer's and the vision tower's
 * attention, at a chosen vector width). */
#include <math.h>
#include <stdio.h>

#include "backend/gemm_impl.h"
#include "caprl/bench.h"
#include "caprl/tensor.h"
#include "core/clock_impl.h"
#include "core/error_impl.h"
#include "ops/ops_impl.h"

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

static const char *isa_name(int32_t isa) {
    return isa == CAPRL_ISA_AVX512 ? "avx512" : isa == CAPRL_ISA_AVX2 ? "avx2" : "scalar";
}

/* The unit a pass runs on, by the backend's own dispatch rules. */
static const char *kernel_name(const caprl_backend *be, const caprl_weight *w, int32_t pass) {
    const caprl_cpu_ctx *c = be->impl;
    caprl_matmul_unit u = pass == CAPRL_MATMUL_FWD ? caprl_gemm_fwd_unit(c, w) : caprl_gemm_bwd_unit(c, w);
    return u == CAPRL_UNIT_FMA ? isa_name(c->isa) : caprl_matmul_unit_name(u);
}

/* best = the smaller of best and t, best 0 meaning none yet. */
static void keep_fastest(double *best, double t) {
    if (*best == 0.0 || t < *best) {
        *best = t;
    }
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
        snprintf(b->kernel, sizeof b->kernel, "%s", kernel_name(be, &w, b->pass));
        b->seconds = 0.0;
        for (int32_t r = 0; r <= b->reps; r++) { /* call 0 warms the caches and the scratch up */
            double t0 = caprl_seconds_now();
            run_pass(be, b, &w, x, y, dw);
            if (r > 0) {
                keep_fastest(&b->seconds, caprl_seconds_now() - t0);
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

caprl_status caprl_bench_attention(int32_t n_threads, caprl_attn_bench *b, caprl_error *err) {
    int64_t T = b->tokens, Hq = b->heads, Hkv = b->kv_heads, D = b->head_dim;
    if (b->kind < CAPRL_ATTN_DECODER || b->kind > CAPRL_ATTN_STEP || T <= 0 || Hq <= 0 || Hkv <= 0 ||
        Hq % Hkv != 0 || D <= 0 || b->segment < 0 || b->reps < 1 || b->max_isa < 0 || b->max_isa > CAPRL_ISA_AVX512 ||
        (b->kind == CAPRL_ATTN_SEGMENTS && Hkv != Hq) || T > (int64_t)1 << 24 || Hq > 4096 || D > 4096) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "attention bench: need a known kind, tokens, heads, head_dim > 0, heads a multiple of "
                             "kv_heads (equal for segments), reps >= 1, max_isa 0..2 (got kind %d, %lld tokens, %lld "
                             "/ %lld heads, D %lld, segment %lld, reps %d, max_isa %d)",
                             b->kind, (long long)T, (long long)Hq, (long long)Hkv, (long long)D,
                             (long long)b->segment, b->reps, b->max_isa);
    }
    int64_t seg_len = b->kind == CAPRL_ATTN_SEGMENTS && b->segment > 0 && b->segment < T ? b->segment : T;
    int64_t n_seg = caprl_ceil_div(T, seg_len);
    size_t  nq = (size_t)(T * Hq * D), nkv = (size_t)(T * Hkv * D);
    /* q, out, dout, dq (T, Hq, D); k, v, dk, dv (T, Hkv, D); lse (T, Hq); then the segment and row tables */
    size_t  floats = 4 * nq + 4 * nkv + (size_t)(T * Hq);
    size_t  bytes = floats * sizeof(float) + (size_t)(n_seg + 1 + T) * sizeof(int64_t) + (size_t)T * sizeof(int32_t);
    char   *buf = caprl_try_aligned_alloc(bytes);
    if (!buf) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "attention bench: cannot allocate %zu bytes", bytes);
    }
    float   *q = (float *)(void *)buf, *out = q + nq, *dout = out + nq, *dq = dout + nq;
    float   *k = dq + nq, *v = k + nkv, *dk = v + nkv, *dv = dk + nkv, *lse = dv + nkv;
    int64_t *seg = (int64_t *)(void *)(lse + T * Hq), *row0 = seg + n_seg + 1;
    int32_t *len = (int32_t *)(void *)(row0 + T);
    fill_random(q, nq, 5);
    fill_random(k, nkv, 6);
    fill_random(v, nkv, 7);
    fill_random(dout, nq, 8);
    b->flops = 0.0;
    for (int64_t s = 0; s <= n_seg; s++) {
        seg[s] = s * seg_len < T ? s * seg_len : T;
    }
    for (int64_t m = 0; m < T; m++) {
        row0[m] = 0;
        len[m] = (int32_t)(m + 1);
        if (b->kind == CAPRL_ATTN_DECODER || b->kind == CAPRL_ATTN_TRAIN) {
            b->flops += 4.0 * (double)(Hq * D) * (double)(m + 1);
        }
    }
    if (b->kind == CAPRL_ATTN_STEP) { /* the last row alone: the query of the step after T - 1 cached tokens */
        b->flops = 4.0 * (double)(Hq * D) * (double)T;
    }
    for (int64_t s = 0; b->kind == CAPRL_ATTN_SEGMENTS && s < n_seg; s++) {
        double L = (double)(seg[s + 1] - seg[s]);
        b->flops += 4.0 * (double)(Hq * D) * L * L;
    }
    float          scale = 1.0f / sqrtf((float)D);
    bool           bf16 = b->bf16 && b->kind == CAPRL_ATTN_SEGMENTS;
    caprl_backend *be = NULL;
    caprl_status   st = caprl_backend_cpu_init_isa(&be, n_threads, b->max_isa ? b->max_isa : CAPRL_ISA_AVX512, bf16,
                                                   err);
    if (st == CAPRL_OK) {
        const caprl_backend_ops *ops = be->ops;
        const caprl_cpu_ctx     *c = be->impl;
        bool                     on_unit = bf16 && caprl_bf16_unit_on(c);
        snprintf(b->isa, sizeof b->isa, "%s",
                 on_unit ? caprl_matmul_unit_name(c->amx ? CAPRL_UNIT_AMX : CAPRL_UNIT_DOT)
                         : isa_name(caprl_backend_cpu_isa(be)));
        b->seconds = b->backward_seconds = 0.0;
        for (int32_t r = 0; r <= b->reps; r++) { /* call 0 warms the caches and the scratch up */
            double t0 = caprl_seconds_now(), t1 = 0.0;
            switch (b->kind) {
            case CAPRL_ATTN_DECODER:
                ops->attn_fwd(be, out, q, k, v, row0, len, Hkv * D, T, Hq, Hkv, D, scale);
                break;
            case CAPRL_ATTN_STEP:
                ops->attn_fwd(be, out, q + (T - 1) * Hq * D, k, v, row0 + T - 1, len + T - 1, Hkv * D, 1, Hq, Hkv,
                              D, scale);
                break;
            case CAPRL_ATTN_TRAIN:
                ops->attn_train_fwd(be, out, lse, q, k, v, seg, n_seg, T, Hq, Hkv, D, scale, true);
                t1 = caprl_seconds_now();
                ops->attn_train_bwd(be, dq, dk, dv, dout, q, k, v, out, lse, seg, n_seg, T, Hq, Hkv, D, scale, true);
                break;
            default: ops->attn_seg_fwd(be, out, q, k, v, seg, n_seg, T, Hq, D, scale, bf16); break;
            }
            double t2 = caprl_seconds_now();
            if (r > 0) {
                keep_fastest(&b->seconds, t1 > 0.0 ? t1 - t0 : t2 - t0);
            }
            if (r > 0 && t1 > 0.0) {
                keep_fastest(&b->backward_seconds, t2 - t1);
            }
        }
    }
    caprl_backend_free(be);
    caprl_aligned_free(buf);
    return st;
}
