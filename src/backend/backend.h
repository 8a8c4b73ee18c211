/* The backend op table. Model code is written once against these entry points and never loops over raw
 * floats itself; the CPU backend (backend_cpu.c) is the reference and the only backend today.
 *
 * Conventions: row-major, last dimension contiguous; linear weights are (out, in) and y = x W^T + b.
 * Activations are f32. Weights are f32 or bf16 as stored; accumulation is f32. Every kernel partitions its
 * *outputs* across the pool's threads with a partition that does not change the arithmetic of any single output,
 * so results are bit-identical for any thread count. Forward kernels overwrite their outputs unless stated. */
#ifndef CAPRL_BACKEND_H
#define CAPRL_BACKEND_H

#include "caprl/caprl.h"
#include "core/pool_impl.h"

#define CAPRL_BACKEND_ABI 4

/* A linear weight (N, K) = (out, in) in its stored dtype, plus an optional backend-private packed copy. */
typedef struct caprl_weight {
    int32_t     dtype; /* CAPRL_DTYPE_F32 or CAPRL_DTYPE_BF16 */
    int64_t     rows;  /* N (out features) */
    int64_t     cols;  /* K (in features) */
    const void *data;  /* rows * cols elements, row-major */
    void       *packed; /* owned by the backend (weight_prepare / weight_release), NULL if unused */
    bool        backward; /* trained: weight_prepare also packs what the backward products need */
} caprl_weight;

typedef struct caprl_backend caprl_backend;

typedef struct caprl_backend_ops {
    int32_t     abi; /* CAPRL_BACKEND_ABI */
    const char *name;

    /* out (M, N) = in (M, K) @ w^T (+ bias (N), may be NULL). */
    void (*matmul_fwd)(caprl_backend *be, float *out, const float *in, const caprl_weight *w, const float *bias,
                       int64_t M);

    /* out (M, C) = rows ids[m] of table (V, C); ids are in range (checked by the caller). */
    void (*embed_fwd)(caprl_backend *be, float *out, const int32_t *ids, const caprl_weight *table, int64_t M);

    /* out (M, C) = in * rsqrt(mean(in^2) + eps) * weight (C). out may alias in. */
    void (*rmsnorm_fwd)(caprl_backend *be, float *out, const float *in, const float *weight, int64_t M, int64_t C,
                        float eps);

    /* In place on x (M, H, D): rotate_half RoPE, pairs (j, j + D/2), angle pos[m] * inv_freq[j] computed in f32
     * (inv_freq has D/2 entries). */
    void (*rope_fwd)(caprl_backend *be, float *x, const int32_t *pos, const float *inv_freq, int64_t M, int64_t H,
                     int64_t D);

    /* Attention for M query rows. q (M, Hq, D); query m attends to kv_len[m] key/value rows starting at row
     * kv_row0[m] of k and v (each row Hkv * D floats, row stride kv_stride floats). Query head h uses KV head
     * h / (Hq / Hkv). softmax(scale * q k^T) v in f32, max-subtracted. out (M, Hq, D). Causality is expressed by
     * the caller through kv_len. */
    void (*attn_fwd)(caprl_backend *be, float *out, const float *q, const float *k, const float *v,
                     const int64_t *kv_row0, const int32_t *kv_len, int64_t kv_stride, int64_t M, int64_t Hq,
                     int64_t Hkv, int64_t D, float scale);

    /* out (n) = silu(gate) * up. out may alias gate or up. */
    void (*swiglu_fwd)(caprl_backend *be, float *out, const float *gate, const float *up, int64_t n);

    /* acc (n) += x (n). */
    void (*add_fwd)(caprl_backend *be, float *acc, const float *x, int64_t n);

    /* Optional: pack w for faster matmuls (sets w->packed); weight_release frees it. May be NULL. */
    caprl_status (*weight_prepare)(caprl_backend *be, caprl_weight *w, caprl_error *err);
    void (*weight_release)(caprl_backend *be, caprl_weight *w);

    /* out (n) = gelu(in) in the exact erf form, (in * 0.5) * (1 + erf(in * sqrt(1/2))) in f32 (torch nn.GELU(),
     * approximate='none'; the Qwen2.5-VL merger, spec/qwen.md §3.8). out may alias in. */
    void (*gelu_fwd)(caprl_backend *be, float *out, const float *in, int64_t n);

    /* In place, sectioned rotate_half rotary (Qwen2.5-VL vision 2-D rotary §3.5, M-RoPE §3.10). Row m of x holds H
     * heads of D floats starting at x + m * x_stride (x_stride >= H * D, so q and k may be rotated inside a fused
     * qkv row). Pair (j, j + D/2), j < D/2, belongs to section s(j): the first sections[0] pairs to section 0, the
     * next sections[1] to section 1, ... (n_sections in [1, 8], the sections sum to D/2). Its angle is the f32
     * product (float)pos[s(j) * M + m] * inv_freq[j] (pos (n_sections, M), inv_freq (D/2) indexed by the global
     * j: a caller whose frequencies restart per section, like the vision rotary, repeats them in the table);
     * cos/sin in f32 and the rotation as in rope_fwd. With one section it equals rope_fwd bit for bit. */
    void (*rope_sect_fwd)(caprl_backend *be, float *x, int64_t x_stride, const int32_t *pos, const float *inv_freq,
                          const int32_t *sections, int32_t n_sections, int64_t M, int64_t H, int64_t D);

    /* Non-causal attention within segments, head-major (Qwen2.5-VL vision windows and frames, §3.7). q, k, v and
     * out are (H, N, D): head h's rows at offset h * N * D. seg (n_seg + 1) are non-decreasing row boundaries with
     * seg[0] = 0 and seg[n_seg] = N; a query row in [seg[s], seg[s+1]) attends to the key rows of that range:
     * softmax(scale * q k^T) v in f32, max-subtracted. out must not alias the inputs. Each query's arithmetic is
     * independent of the other segments, of N and of the thread count (a segment gives the same bits alone or in a
     * batch). Unlike attn_fwd it shares every pass over the keys among several queries of a head, which is what
     * long full-attention segments need. With bf16 set (a model with bf16 weights) and a bf16 matrix unit on, both
     * products may run there as the matmuls do: q, k, v and the softmax numerators rounded to bf16, f32 sums; the
     * scale, the softmax and the normalisation stay f32. */
    void (*attn_seg_fwd)(caprl_backend *be, float *out, const float *q, const float *k, const float *v,
                         const int64_t *seg, int64_t n_seg, int64_t N, int64_t H, int64_t D, float scale, bool bf16);

    /* ---- training (backward passes and the training-only forwards they need) ----------------------------- *
     * Backward kernels follow the same rule as the forwards: outputs are partitioned across threads so every
     * element is computed by one fixed sequence of float operations (bit-identical at any thread count).
     * "+=" outputs accumulate into what the caller holds (parameter gradients over micro-batches); the others
     * overwrite. Gradients are f32. */

    /* dx (M, K) = dy (M, N) @ w (N, K), w as stored (f32 or bf16). Overwrites dx. A bf16 weight prepared with
     * w->backward may run with bf16 operands (mixed precision, f32 accumulation), as matmul_fwd does. */
    void (*matmul_bwd_data)(caprl_backend *be, float *dx, const float *dy, const caprl_weight *w, int64_t M);
    /* dw (N, K) += dy^T (N, M) @ x (M, K), (N, K) the shape of w (whose packing picks the precision as for
     * matmul_bwd_data; its values are not read); dbias (N) += column sums of dy when dbias is not NULL. */
    void (*matmul_bwd_weight)(caprl_backend *be, float *dw, float *dbias, const float *dy, const float *x,
                              const caprl_weight *w, int64_t M);
    /* dtable (V, C) += dy rows scattered by ids (M): row ids[m] of dtable gets dy row m. Deterministic: each
     * dtable row sums its contributions in increasing m. */
    void (*embed_bwd)(caprl_backend *be, float *dtable, const int32_t *ids, const float *dy, int64_t M, int64_t C);
    /* Backward of rmsnorm_fwd given its input x: dx (M, C) = d/dx, dweight (C) += d/dweight. dx may alias dy. */
    void (*rmsnorm_bwd)(caprl_backend *be, float *dx, float *dweight, const float *dy, const float *x,
                        const float *weight, int64_t M, int64_t C, float eps);
    /* Backward of rope_sect_fwd (same arguments): in place on the gradient dx, the transposed rotation (angle -a). */
    void (*rope_sect_bwd)(caprl_backend *be, float *dx, int64_t x_stride, const int32_t *pos, const float *inv_freq,
                          const int32_t *sections, int32_t n_sections, int64_t M, int64_t H, int64_t D);
    /* Training attention over packed segments, token-major: q (M, Hq, D), k and v (M, Hkv, D), out (M, Hq, D),
     * lse (M, Hq) the log-sum-exp of each query's scaled scores (saved for the backward). seg (n_seg + 1) are
     * non-decreasing row boundaries, seg[0] = 0, seg[n_seg] = M. Row i of segment [a, b) attends to rows [a, i]
     * when causal (text: packed sequences) or [a, b) otherwise (vision windows and frames). GQA as attn_fwd.
     * f32 softmax, max-subtracted. out must not alias the inputs. */
    void (*attn_train_fwd)(caprl_backend *be, float *out, float *lse, const float *q, const float *k, const float *v,
                           const int64_t *seg, int64_t n_seg, int64_t M, int64_t Hq, int64_t Hkv, int64_t D,
                           float scale, bool causal);
    /* Its backward: dq (M, Hq, D), dk and dv (M, Hkv, D), all overwritten, from dout and the forward's q, k, v,
     * out and lse. dk / dv rows are owned by their key row (each sums over its queries in a fixed order). */
    void (*attn_train_bwd)(caprl_backend *be, float *dq, float *dk, float *dv, const float *dout, const float *q,
                           const float *k, const float *v, const float *out, const float *lse, const int64_t *seg,
                           int64_t n_seg, int64_t M, int64_t Hq, int64_t Hkv, int64_t D, float scale, bool causal);
    /* Backward of swiglu_fwd: dgate = dout * up * silu'(gate), dup = dout * silu(gate). dgate may alias gate and
     * dup may alias up (each element is read before it is written); dout must not alias either. */
    void (*swiglu_bwd)(caprl_backend *be, float *dgate, float *dup, const float *dout, const float *gate,
                       const float *up, int64_t n);
    /* Backward of gelu_fwd (exact erf form): din = dout * gelu'(in). din may alias dout. */
    void (*gelu_bwd)(caprl_backend *be, float *din, const float *dout, const float *in, int64_t n);
    /* Token log-probabilities from a block of logits z (R, V), at temperature 1 / inv_temp: with s = z * inv_temp,
     * lse[r] = logsumexp(s_r), logp[r] = s_r[target[r]] - lse[r], entropy[r] = -sum p log p (entropy may be
     * NULL). Rows whose target is < 0 get logp 0 and entropy 0 (their lse is still set). */
    void (*logprob_fwd)(caprl_backend *be, float *logp, float *entropy, float *lse, const float *z,
                        const int32_t *target, int64_t R, int64_t V, float inv_temp);
    /* Its backward, in place on z: z[r] becomes dlogp[r] * inv_temp * (onehot(target[r]) - softmax(s_r)), using
     * the forward's lse; rows with target < 0 or dlogp 0 become 0. The fused cross-entropy: dlogp = -w / n.
     * dentropy (may be NULL): dL/dentropy[r] as well, adding -dentropy[r] * inv_temp * p (log p + H) (the RL
     * entropy bonus). */
    void (*logprob_bwd)(caprl_backend *be, float *z, const float *lse, const int32_t *target, const float *dlogp,
                        const float *dentropy, int64_t R, int64_t V, float inv_temp);
} caprl_backend_ops;

struct caprl_backend {
    const caprl_backend_ops *ops;
    caprl_pool              *pool; /* owned */
    void                    *impl; /* backend-private state (scratch, primitive caches) */
};

/* The CPU backend with n_threads threads (0 = all cores). */
caprl_status caprl_backend_cpu_init(caprl_backend **out, int32_t n_threads, caprl_error *err);
void         caprl_backend_free(caprl_backend *be); /* NULL-safe */

#endif /* CAPRL_BACKEND_H */
