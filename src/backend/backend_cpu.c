/* The CPU backend: the op table over the kernels of src/ops and gemm_cpu.c, the ISA choice (made once, from
 * caprl_cpu(), so a backend always runs one code path) and the per-thread scratch the kernels share.
 * Thread safety: one backend is driven by one thread at a time (its pool is not re-entrant). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/gemm_impl.h"
#include "caprl/tensor.h"
#include "core/clock_impl.h"
#include "core/cpu_impl.h"
#include "core/error_impl.h"
#include "core/log_impl.h"

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

/* ---- profile (CAPRL_PROFILE=1) --------------------------------------------------------------------------
 * Wall time, calls and matmul FLOPs of every op, summed per backend and logged when it is freed: where a forward
 * or a training step spends its time, op by op (llama.cpp's perf mode, in short). Off, it costs one branch per op. */

#define PROF_SLOTS(X)                                                                                            \
    X(MATMUL_FWD, "matmul_fwd (fma)")                                                                            \
    X(MATMUL_FWD_AMX, "matmul_fwd (amx-bf16)")                                                                   \
    X(MATMUL_FWD_DOT, "matmul_fwd (avx512-bf16)")                                                                \
    X(MATMUL_FWD_FEW, "matmul_fwd (fma, <= 16 rows)")                                                            \
    X(MATMUL_FWD_AMX_FEW, "matmul_fwd (amx-bf16, <= 16 rows)")                                                   \
    X(MATMUL_FWD_DOT_FEW, "matmul_fwd (avx512-bf16, <= 16 rows)")                                                \
    X(MATMUL_BWD_DATA, "matmul_bwd_data (fma)")                                                                  \
    X(MATMUL_BWD_DATA_AMX, "matmul_bwd_data (amx-bf16)")                                                         \
    X(MATMUL_BWD_DATA_DOT, "matmul_bwd_data (avx512-bf16)")                                                      \
    X(MATMUL_BWD_WEIGHT, "matmul_bwd_weight (fma)")                                                              \
    X(MATMUL_BWD_WEIGHT_AMX, "matmul_bwd_weight (amx-bf16)")                                                     \
    X(MATMUL_BWD_WEIGHT_DOT, "matmul_bwd_weight (avx512-bf16)")                                                  \
    X(EMBED_FWD, "embed_fwd") X(RMSNORM_FWD, "rmsnorm_fwd") X(ROPE_FWD, "rope_fwd") X(ATTN_FWD, "attn_fwd")       \
    X(SWIGLU_FWD, "swiglu_fwd") X(ADD_FWD, "add_fwd") X(GELU_FWD, "gelu_fwd") X(ROPE_SECT_FWD, "rope_sect_fwd")  \
    X(ATTN_SEG_FWD, "attn_seg_fwd") X(ATTN_SEG_FWD_BF16, "attn_seg_fwd (bf16 unit)") X(EMBED_BWD, "embed_bwd")    \
    X(RMSNORM_BWD, "rmsnorm_bwd")                                                                                \
    X(ROPE_SECT_BWD, "rope_sect_bwd") X(ATTN_TRAIN_FWD, "attn_train_fwd") X(ATTN_TRAIN_BWD, "attn_train_bwd")    \
    X(SWIGLU_BWD, "swiglu_bwd") X(GELU_BWD, "gelu_bwd") X(LOGPROB_FWD, "logprob_fwd")                           \
    X(LOGPROB_BWD, "logprob_bwd") X(WEIGHT_PREPARE, "weight_prepare (packing)")

#define PROF_ENUM(slot, name) PROF_##slot,
#define PROF_NAME(slot, name) name,
enum { PROF_SLOTS(PROF_ENUM) PROF_COUNT };
_Static_assert(PROF_MATMUL_FWD_AMX == PROF_MATMUL_FWD + CAPRL_UNIT_AMX &&
                   PROF_MATMUL_FWD_DOT == PROF_MATMUL_FWD + CAPRL_UNIT_DOT &&
                   PROF_MATMUL_FWD_DOT_FEW == PROF_MATMUL_FWD_FEW + CAPRL_UNIT_DOT &&
                   PROF_MATMUL_BWD_DATA_DOT == PROF_MATMUL_BWD_DATA + CAPRL_UNIT_DOT &&
                   PROF_MATMUL_BWD_WEIGHT_DOT == PROF_MATMUL_BWD_WEIGHT + CAPRL_UNIT_DOT,
               "each matmul kind's profile slots follow caprl_matmul_unit");
static const char *const k_prof_names[PROF_COUNT] = {PROF_SLOTS(PROF_NAME)};

struct caprl_cpu_profile {
    double  seconds[PROF_COUNT], flops[PROF_COUNT];
    int64_t calls[PROF_COUNT];
};

#define PROFILED(be, slot, flop_count, call)                                                                         \
    do {                                                                                                             \
        caprl_cpu_profile *prof_ = ((caprl_cpu_ctx *)(be)->impl)->profile;                                           \
        double             t0_ = prof_ ? caprl_seconds_now() : 0.0;                                                  \
        call;                                                                                                        \
        if (prof_) {                                                                                                 \
            int slot_ = (slot);                                                                                      \
            prof_->seconds[slot_] += caprl_seconds_now() - t0_;                                                      \
            prof_->flops[slot_] += (flop_count);                                                                     \
            prof_->calls[slot_]++;                                                                                   \
        }                                                                                                            \
    } while (0)

static double matmul_flops(const caprl_weight *w, int64_t M) {
    return 2.0 * (double)M * (double)w->rows * (double)w->cols;
}

/* The profile as log lines, the largest share first. */
static void profile_log(const caprl_cpu_ctx *c) {
    const caprl_cpu_profile *p = c->profile;
    double                   total = 0.0;
    int                      order[PROF_COUNT], n = 0;
    for (int i = 0; i < PROF_COUNT; i++) {
        total += p->seconds[i];
        if (p->calls[i] > 0) {
            int j = n++;
            for (; j > 0 && p->seconds[order[j - 1]] < p->seconds[i]; j--) {
                order[j] = order[j - 1];
            }
            order[j] = i;
        }
    }
    caprl_log_emit(CAPRL_LOG_INFO, __func__, "op profile, %d threads: %.3f s in backend ops", c->n_threads, total);
    for (int k = 0; k < n; k++) {
        int i = order[k];
        char rate[48] = "";
        if (p->flops[i] > 0 && p->seconds[i] > 0) {
            snprintf(rate, sizeof rate, ", %.1f GFLOP/s", 1e-9 * p->flops[i] / p->seconds[i]);
        }
        caprl_log_emit(CAPRL_LOG_INFO, __func__, "  %-30s %9lld calls %9.3f s %5.1f%%%s", k_prof_names[i],
                       (long long)p->calls[i], p->seconds[i], total > 0 ? 100.0 * p->seconds[i] / total : 0.0, rate);
    }
}

/* ---- op table ------------------------------------------------------------------------------------------- */

static caprl_cpu_ctx *ctx_of(caprl_backend *be) {
    return be->impl;
}

static void cpu_matmul_fwd(caprl_backend *be, float *out, const float *in, const caprl_weight *w, const float *bias,
                           int64_t M) {
    caprl_cpu_ctx *c = ctx_of(be);
    /* the slots of each matmul kind follow caprl_matmul_unit's order; decode (<= 16 rows) apart from prefill */
    int            slot = (M <= 16 ? PROF_MATMUL_FWD_FEW : PROF_MATMUL_FWD) + (int)caprl_gemm_fwd_unit(c, w);
    PROFILED(be, slot, matmul_flops(w, M), caprl_gemm(c, out, in, w, bias, M));
}

static void cpu_embed_fwd(caprl_backend *be, float *out, const int32_t *ids, const caprl_weight *table, int64_t M) {
    PROFILED(be, PROF_EMBED_FWD, 0.0, caprl_op_embed(ctx_of(be), out, ids, table, M));
}

static void cpu_rmsnorm_fwd(caprl_backend *be, float *out, const float *in, const float *weight, int64_t M,
                            int64_t C, float eps) {
    PROFILED(be, PROF_RMSNORM_FWD, 0.0, caprl_op_rmsnorm(ctx_of(be), out, in, weight, M, C, eps));
}

static void cpu_rope_fwd(caprl_backend *be, float *x, const int32_t *pos, const float *inv_freq, int64_t M,
                         int64_t H, int64_t D) {
    PROFILED(be, PROF_ROPE_FWD, 0.0, caprl_op_rope(ctx_of(be), x, pos, inv_freq, M, H, D));
}

static void cpu_attn_fwd(caprl_backend *be, float *out, const float *q, const float *k, const float *v,
                         const int64_t *kv_row0, const int32_t *kv_len, int64_t kv_stride, int64_t M, int64_t Hq,
                         int64_t Hkv, int64_t D, float scale) {
    PROFILED(be, PROF_ATTN_FWD, 0.0,
             caprl_op_attn(ctx_of(be), out, q, k, v, kv_row0, kv_len, kv_stride, M, Hq, Hkv, D, scale));
}

static void cpu_swiglu_fwd(caprl_backend *be, float *out, const float *gate, const float *up, int64_t n) {
    PROFILED(be, PROF_SWIGLU_FWD, 0.0, caprl_op_swiglu(ctx_of(be), out, gate, up, n));
}

static void cpu_add_fwd(caprl_backend *be, float *acc, const float *x, int64_t n) {
    PROFILED(be, PROF_ADD_FWD, 0.0, caprl_op_add(ctx_of(be), acc, x, n));
}

static void cpu_gelu_fwd(caprl_backend *be, float *out, const float *in, int64_t n) {
    PROFILED(be, PROF_GELU_FWD, 0.0, caprl_op_gelu(ctx_of(be), out, in, n));
}

static void cpu_rope_sect_fwd(caprl_backend *be, float *x, int64_t x_stride, const int32_t *pos,
                              const float *inv_freq, const int32_t *sections, int32_t n_sections, int64_t M,
                              int64_t H, int64_t D) {
    PROFILED(be, PROF_ROPE_SECT_FWD, 0.0,
             caprl_op_rope_sect(ctx_of(be), x, x_stride, pos, inv_freq, sections, n_sections, M, H, D));
}

static void cpu_attn_seg_fwd(caprl_backend *be, float *out, const float *q, const float *k, const float *v,
                             const int64_t *seg, int64_t n_seg, int64_t N, int64_t H, int64_t D, float scale,
                             bool bf16) {
    PROFILED(be, bf16 && caprl_bf16_unit_on(ctx_of(be)) ? PROF_ATTN_SEG_FWD_BF16 : PROF_ATTN_SEG_FWD, 0.0,
             caprl_op_attn_seg(ctx_of(be), out, q, k, v, seg, n_seg, N, H, D, scale, bf16));
}

/* ---- training ---- */

static void cpu_matmul_bwd_data(caprl_backend *be, float *dx, const float *dy, const caprl_weight *w, int64_t M) {
    caprl_cpu_ctx *c = ctx_of(be);
    PROFILED(be, PROF_MATMUL_BWD_DATA + (int)caprl_gemm_bwd_unit(c, w), matmul_flops(w, M),
             caprl_gemm_bwd_data(c, dx, dy, w, M));
}

static void cpu_matmul_bwd_weight(caprl_backend *be, float *dw, float *dbias, const float *dy, const float *x,
                                  const caprl_weight *w, int64_t M) {
    caprl_cpu_ctx *c = ctx_of(be);
    PROFILED(be, PROF_MATMUL_BWD_WEIGHT + (int)caprl_gemm_bwd_unit(c, w), matmul_flops(w, M),
             caprl_gemm_bwd_weight(c, dw, dbias, dy, x, w, M));
}

static void cpu_embed_bwd(caprl_backend *be, float *dtable, const int32_t *ids, const float *dy, int64_t M,
                          int64_t C) {
    PROFILED(be, PROF_EMBED_BWD, 0.0, caprl_op_embed_bwd(ctx_of(be), dtable, ids, dy, M, C));
}

static void cpu_rmsnorm_bwd(caprl_backend *be, float *dx, float *dweight, const float *dy, const float *x,
                            const float *weight, int64_t M, int64_t C, float eps) {
    PROFILED(be, PROF_RMSNORM_BWD, 0.0, caprl_op_rmsnorm_bwd(ctx_of(be), dx, dweight, dy, x, weight, M, C, eps));
}

static void cpu_rope_sect_bwd(caprl_backend *be, float *dx, int64_t x_stride, const int32_t *pos,
                              const float *inv_freq, const int32_t *sections, int32_t n_sections, int64_t M,
                              int64_t H, int64_t D) {
    PROFILED(be, PROF_ROPE_SECT_BWD, 0.0,
             caprl_op_rope_sect_bwd(ctx_of(be), dx, x_stride, pos, inv_freq, sections, n_sections, M, H, D));
}

static void cpu_attn_train_fwd(caprl_backend *be, float *out, float *lse, const float *q, const float *k,
                               const float *v, const int64_t *seg, int64_t n_seg, int64_t M, int64_t Hq, int64_t Hkv,
                               int64_t D, float scale, bool causal) {
    PROFILED(be, PROF_ATTN_TRAIN_FWD, 0.0,
             caprl_op_attn_train_fwd(ctx_of(be), out, lse, q, k, v, seg, n_seg, M, Hq, Hkv, D, scale, causal));
}

static void cpu_attn_train_bwd(caprl_backend *be, float *dq, float *dk, float *dv, const float *dout, const float *q,
                               const float *k, const float *v, const float *out, const float *lse,
                               const int64_t *seg, int64_t n_seg, int64_t M, int64_t Hq, int64_t Hkv, int64_t D,
                               float scale, bool causal) {
    PROFILED(be, PROF_ATTN_TRAIN_BWD, 0.0,
             caprl_op_attn_train_bwd(ctx_of(be), dq, dk, dv, dout, q, k, v, out, lse, seg, n_seg, M, Hq, Hkv, D, scale,
                                     causal));
}

static void cpu_swiglu_bwd(caprl_backend *be, float *dgate, float *dup, const float *dout, const float *gate,
                           const float *up, int64_t n) {
    PROFILED(be, PROF_SWIGLU_BWD, 0.0, caprl_op_swiglu_bwd(ctx_of(be), dgate, dup, dout, gate, up, n));
}

static void cpu_gelu_bwd(caprl_backend *be, float *din, const float *dout, const float *in, int64_t n) {
    PROFILED(be, PROF_GELU_BWD, 0.0, caprl_op_gelu_bwd(ctx_of(be), din, dout, in, n));
}

static void cpu_logprob_fwd(caprl_backend *be, float *logp, float *entropy, float *lse, const float *z,
                            const int32_t *target, int64_t R, int64_t V, float inv_temp) {
    PROFILED(be, PROF_LOGPROB_FWD, 0.0,
             caprl_op_logprob_fwd(ctx_of(be), logp, entropy, lse, z, target, R, V, inv_temp));
}

static void cpu_logprob_bwd(caprl_backend *be, float *z, const float *lse, const int32_t *target, const float *dlogp,
                            const float *dentropy, int64_t R, int64_t V, float inv_temp) {
    PROFILED(be, PROF_LOGPROB_BWD, 0.0,
             caprl_op_logprob_bwd(ctx_of(be), z, lse, target, dlogp, dentropy, R, V, inv_temp));
}

static caprl_status cpu_weight_prepare(caprl_backend *be, caprl_weight *w, caprl_error *err) {
    caprl_status st = CAPRL_OK;
    PROFILED(be, PROF_WEIGHT_PREPARE, 0.0, st = caprl_gemm_prepare(ctx_of(be), w, err));
    return st;
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
    .matmul_bwd_data = cpu_matmul_bwd_data,
    .matmul_bwd_weight = cpu_matmul_bwd_weight,
    .embed_bwd = cpu_embed_bwd,
    .rmsnorm_bwd = cpu_rmsnorm_bwd,
    .rope_sect_bwd = cpu_rope_sect_bwd,
    .attn_train_fwd = cpu_attn_train_fwd,
    .attn_train_bwd = cpu_attn_train_bwd,
    .swiglu_bwd = cpu_swiglu_bwd,
    .gelu_bwd = cpu_gelu_bwd,
    .logprob_fwd = cpu_logprob_fwd,
    .logprob_bwd = cpu_logprob_bwd,
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

/* The AMX blocking: the defaults, then CAPRL_AMX_TUNE's "key=value" pairs (kc, mb), for tuning runs such as
 * `caprl bench gemm`. Parsing stops at anything else (blocking never changes a result). */
static caprl_amx_tuning amx_tuning_from_env(void) {
    caprl_amx_tuning tu = {.kc_tiles = 16, .row_block_kb = 0};
    const char      *v = getenv("CAPRL_AMX_TUNE");
    while (v && *v) {
        char key[8] = {0};
        int  val = 0, used = 0;
        if (sscanf(v, "%7[a-z]=%d%n", key, &val, &used) != 2 || val < 0) {
            break;
        }
        if (strcmp(key, "kc") == 0) {
            tu.kc_tiles = val;
        } else if (strcmp(key, "mb") == 0) {
            tu.row_block_kb = val;
        }
        v += used;
        v += *v == ',';
    }
    return tu;
}

caprl_status caprl_backend_cpu_init_isa(caprl_backend **out, int32_t n_threads, int32_t max_isa,
                                        bool allow_bf16_units, caprl_error *err) {
    /* Feature detection first: it requests the AMX tile permission, which the pool's threads then share. */
    const caprl_cpu_features *f = caprl_cpu();
    caprl_pool               *pool = NULL;
    CAPRL_TRY(caprl_pool_init(&pool, n_threads, err));
    caprl_cpu_ctx *c = caprl_xcalloc(1, sizeof *c);
    c->pool = pool;
    c->n_threads = caprl_pool_n_threads(pool);
    int32_t isa = machine_isa();
    c->isa = isa < max_isa ? isa : max_isa;
    c->amx = allow_bf16_units && f->amx_usable && machine_isa() == CAPRL_ISA_AVX512;
    c->bf16_dot = allow_bf16_units && !c->amx && f->avx512_bf16 && c->isa == CAPRL_ISA_AVX512;
    c->l2_bytes = l2_bytes();
    c->amx_tuning = amx_tuning_from_env();
    const char *profile = getenv("CAPRL_PROFILE");
    if (profile && profile[0] && strcmp(profile, "0") != 0) {
        c->profile = caprl_xcalloc(1, sizeof *c->profile);
    }
    c->threads = caprl_xcalloc((size_t)c->n_threads, sizeof *c->threads);
    caprl_backend *be = caprl_xcalloc(1, sizeof *be);
    be->ops = &k_cpu_ops;
    be->pool = pool;
    be->impl = c;
    *out = be;
    return CAPRL_OK;
}

/* CAPRL_BF16_UNITS=0 in the environment (or its older spelling CAPRL_AMX=0) keeps bf16 matmuls off the bf16
 * matrix units, AMX or vdpbf16ps (f32 operands on the FMA units): for comparing numerics with f32-arithmetic
 * references, as ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA do. */
static bool env_is_zero(const char *name) {
    const char *v = getenv(name);
    return v && v[0] == '0' && v[1] == '\0';
}

static bool bf16_units_allowed_by_env(void) {
    return !env_is_zero("CAPRL_BF16_UNITS") && !env_is_zero("CAPRL_AMX");
}

caprl_status caprl_backend_cpu_init(caprl_backend **out, int32_t n_threads, caprl_error *err) {
    return caprl_backend_cpu_init_isa(out, n_threads, CAPRL_ISA_AVX512, bf16_units_allowed_by_env(), err);
}

int32_t caprl_backend_cpu_isa(const caprl_backend *be) {
    return ((const caprl_cpu_ctx *)be->impl)->isa;
}

bool caprl_backend_cpu_amx(const caprl_backend *be) {
    return ((const caprl_cpu_ctx *)be->impl)->amx;
}

bool caprl_backend_cpu_bf16_inputs(const caprl_backend *be) {
    return caprl_bf16_unit_on(be->impl);
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
        if (c->profile) {
            profile_log(c);
            free(c->profile);
        }
        caprl_aligned_free(c->shared);
        free(c);
    }
    caprl_pool_free(be->pool);
    free(be);
}
