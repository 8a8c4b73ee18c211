/* The CPU backend: the op table over the kernels of src/ops and gemm_cpu.c, the ISA choice (made once, from
 * caprl_cpu(), so a backend always runs one code path) and the per-thread scratch the kernels share.
 * Thread safety: one backend is driven by one thread at a time (its pool is not re-entrant). */
#include <stdlib.h>
#include <unistd.h>

#include "backend/gemm_impl.h"
#include "caprl/tensor.h"
#include "core/cpu_impl.h"
#include "core/error_impl.h"

/* ---- scratch -------------------------------------------------------------------------------------------- */

bool caprl_cpu_scratch_reserve(caprl_cpu_ctx *c, size_t bytes) {
    for (int32_t t = 0; t < c->n_threads; t++) {
        caprl_cpu_thread *th = &c->threads[t];
        if (th->cap >= bytes) {
            continue;
        }
        void *p = caprl_try_aligned_alloc(bytes);
        if (!p) {
            return false;
        }
        caprl_aligned_free(th->buf);
        th->buf = p;
        th->cap = bytes;
        th->tag_seq = 0;
    }
    return true;
}

void *caprl_cpu_shared_reserve(caprl_cpu_ctx *c, size_t bytes) {
    if (c->shared_cap >= bytes) {
        return c->shared;
    }
    void *p = caprl_try_aligned_alloc(bytes);
    if (!p) {
        return NULL;
    }
    caprl_aligned_free(c->shared);
    c->shared = p;
    c->shared_cap = bytes;
    return p;
}

/* ---- op table ------------------------------------------------------------------------------------------- */

static caprl_cpu_ctx *ctx_of(caprl_backend *be) {
    return be->impl;
}

static void cpu_matmul_fwd(caprl_backend *be, float *out, const float *in, const caprl_weight *w, const float *bias,
                           int64_t M) {
    caprl_gemm(ctx_of(be), out, in, w, bias, M);
}

static void cpu_embed_fwd(caprl_backend *be, float *out, const int32_t *ids, const caprl_weight *table, int64_t M) {
    caprl_op_embed(ctx_of(be), out, ids, table, M);
}

static void cpu_rmsnorm_fwd(caprl_backend *be, float *out, const float *in, const float *weight, int64_t M,
                            int64_t C, float eps) {
    caprl_op_rmsnorm(ctx_of(be), out, in, weight, M, C, eps);
}

static void cpu_rope_fwd(caprl_backend *be, float *x, const int32_t *pos, const float *inv_freq, int64_t M,
                         int64_t H, int64_t D) {
    caprl_op_rope(ctx_of(be), x, pos, inv_freq, M, H, D);
}

static void cpu_attn_fwd(caprl_backend *be, float *out, const float *q, const float *k, const float *v,
                         const int64_t *kv_row0, const int32_t *kv_len, int64_t kv_stride, int64_t M, int64_t Hq,
                         int64_t Hkv, int64_t D, float scale) {
    caprl_op_attn(ctx_of(be), out, q, k, v, kv_row0, kv_len, kv_stride, M, Hq, Hkv, D, scale);
}

static void cpu_swiglu_fwd(caprl_backend *be, float *out, const float *gate, const float *up, int64_t n) {
    caprl_op_swiglu(ctx_of(be), out, gate, up, n);
}

static void cpu_add_fwd(caprl_backend *be, float *acc, const float *x, int64_t n) {
    caprl_op_add(ctx_of(be), acc, x, n);
}

static void cpu_gelu_fwd(caprl_backend *be, float *out, const float *in, int64_t n) {
    caprl_op_gelu(ctx_of(be), out, in, n);
}

static void cpu_rope_sect_fwd(caprl_backend *be, float *x, int64_t x_stride, const int32_t *pos,
                              const float *inv_freq, const int32_t *sections, int32_t n_sections, int64_t M,
                              int64_t H, int64_t D) {
    caprl_op_rope_sect(ctx_of(be), x, x_stride, pos, inv_freq, sections, n_sections, M, H, D);
}

static void cpu_attn_seg_fwd(caprl_backend *be, float *out, const float *q, const float *k, const float *v,
                             const int64_t *seg, int64_t n_seg, int64_t N, int64_t H, int64_t D, float scale) {
    caprl_op_attn_seg(ctx_of(be), out, q, k, v, seg, n_seg, N, H, D, scale);
}

static caprl_status cpu_weight_prepare(caprl_backend *be, caprl_weight *w, caprl_error *err) {
    return caprl_gemm_prepare(ctx_of(be), w, err);
}

static void cpu_weight_release(caprl_backend *be, caprl_weight *w) {
    (void)be;
    caprl_gemm_release(w);
}

static const caprl_backend_ops k_cpu_ops = {
    .abi = CAPRL_BACKEND_ABI,
    .name = "cpu",
    .matmul_fwd = cpu_matmul_fwd,
    .embed_fwd = cpu_embed_fwd,
    .rmsnorm_fwd = cpu_rmsnorm_fwd,
    .rope_fwd = cpu_rope_fwd,
    .attn_fwd = cpu_attn_fwd,
    .swiglu_fwd = cpu_swiglu_fwd,
    .add_fwd = cpu_add_fwd,
    .weight_prepare = cpu_weight_prepare,
    .weight_release = cpu_weight_release,
    .gelu_fwd = cpu_gelu_fwd,
    .rope_sect_fwd = cpu_rope_sect_fwd,
    .attn_seg_fwd = cpu_attn_seg_fwd,
};

/* ---- init / free ---------------------------------------------------------------------------------------- */

/* Per-core L2 for cache blocking (blocking never changes results, only speed); 512 KB when unknown. */
static int64_t l2_bytes(void) {
    long v = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (v < 256 * 1024) {
        v = 512 * 1024;
    }
    if (v > 2 * 1024 * 1024) {
        v = 2 * 1024 * 1024;
    }
    return v;
}

static int32_t machine_isa(void) {
    const caprl_cpu_features *f = caprl_cpu();
    if (f->avx512f && f->avx512bw && f->avx512vl && f->avx2 && f->fma && f->f16c) {
        return CAPRL_ISA_AVX512;
    }
    if (f->avx2 && f->fma && f->f16c) {
        return CAPRL_ISA_AVX2;
    }
    return CAPRL_ISA_SCALAR;
}

caprl_status caprl_backend_cpu_init_isa(caprl_backend **out, int32_t n_threads, int32_t max_isa, bool allow_amx,
                                        caprl_error *err) {
    /* Feature detection first: it requests the AMX tile permission, which the pool's threads then share. */
    const caprl_cpu_features *f = caprl_cpu();
    caprl_pool               *pool = NULL;
    CAPRL_TRY(caprl_pool_init(&pool, n_threads, err));
    caprl_cpu_ctx *c = caprl_xcalloc(1, sizeof *c);
    c->pool = pool;
    c->n_threads = caprl_pool_n_threads(pool);
    int32_t isa = machine_isa();
    c->isa = isa < max_isa ? isa : max_isa;
    c->amx = allow_amx && f->amx_usable && machine_isa() == CAPRL_ISA_AVX512;
    c->l2_bytes = l2_bytes();
    c->threads = caprl_xcalloc((size_t)c->n_threads, sizeof *c->threads);
    caprl_backend *be = caprl_xcalloc(1, sizeof *be);
    be->ops = &k_cpu_ops;
    be->pool = pool;
    be->impl = c;
    *out = be;
    return CAPRL_OK;
}

caprl_status caprl_backend_cpu_init(caprl_backend **out, int32_t n_threads, caprl_error *err) {
    return caprl_backend_cpu_init_isa(out, n_threads, CAPRL_ISA_AVX512, true, err);
}

int32_t caprl_backend_cpu_isa(const caprl_backend *be) {
    return ((const caprl_cpu_ctx *)be->impl)->isa;
}

bool caprl_backend_cpu_amx(const caprl_backend *be) {
    return ((const caprl_cpu_ctx *)be->impl)->amx;
}

void caprl_backend_free(caprl_backend *be) {
    if (!be) {
        return;
    }
    caprl_cpu_ctx *c = be->impl;
    if (c) {
        for (int32_t t = 0; t < c->n_threads; t++) {
            caprl_aligned_free(c->threads[t].buf);
        }
        free(c->threads);
        caprl_aligned_free(c->shared);
        free(c);
    }
    caprl_pool_free(be->pool);
    free(be);
}
