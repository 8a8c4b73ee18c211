/* The Qwen2 decoder forward pass over a batch of tokens from several sequences, with a per-sequence KV cache.
 * Memory is planned once from the context limits; caprl_context_decode never allocates.
 * Reference: transformers' modeling_qwen2.py (spec/qwen.md §2.3): pre-norm blocks, RoPE on q and k, GQA. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/arena_impl.h"
#include "core/ckmath.h"
#include "core/error_impl.h"
#include "model/model_impl.h"

caprl_context_params caprl_context_default_params(void) {
    caprl_context_params p;
    p.n_seq_max = 1;
    p.n_ctx = 2048;
    p.n_batch_max = 512;
    p.n_logits_max = 0; /* 0: n_seq_max */
    return p;
}

static caprl_status plan_context(const caprl_text_config *c, const caprl_context_params *p, caprl_arena_plan *plan) {
    size_t S = (size_t)p->n_seq_max, T = (size_t)p->n_ctx, M = (size_t)p->n_batch_max, R = (size_t)p->n_logits_max;
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size, V = (size_t)c->vocab_size;
    size_t qd = (size_t)c->n_heads * (size_t)c->head_dim, kvd = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    size_t kv = 0;
    bool   ok = caprl_mul_size(S, T, &kv) && caprl_mul_size(kv, kvd, &kv) && caprl_mul_size(kv, (size_t)c->n_layers, &kv);
    if (!ok) {
        plan->overflow = true;
        return CAPRL_OK;
    }
    caprl_arena_plan_add(plan, kv, sizeof(float)); /* k_cache */
    caprl_arena_plan_add(plan, kv, sizeof(float)); /* v_cache */
    caprl_arena_plan_add(plan, S, sizeof(int32_t) * 3);
    caprl_arena_plan_add(plan, M, sizeof(int32_t) * 3);
    caprl_arena_plan_add(plan, M * C, sizeof(float) * 3);
    caprl_arena_plan_add(plan, M * qd, sizeof(float) * 2);
    caprl_arena_plan_add(plan, M * kvd, sizeof(float) * 2);
    caprl_arena_plan_add(plan, M * F, sizeof(float) * 2);
    caprl_arena_plan_add(plan, R * C, sizeof(float));
    caprl_arena_plan_add(plan, R, V * sizeof(float));
    caprl_arena_plan_add(plan, M, sizeof(int32_t) * 2 + sizeof(int64_t));
    caprl_arena_plan_add(plan, R, sizeof(int32_t));
    return CAPRL_OK;
}

caprl_status caprl_context_init(caprl_context **out, caprl_model *m, const caprl_context_params *params,
                                caprl_error *err) {
    caprl_context_params p = params ? *params : caprl_context_default_params();
    if (p.n_logits_max == 0) {
        p.n_logits_max = p.n_seq_max;
    }
    if (p.n_seq_max < 1 || p.n_ctx < 1 || p.n_batch_max < 1 || p.n_logits_max < 1 || p.n_seq_max > (1 << 20) ||
        p.n_ctx > (1 << 24) || p.n_batch_max > (1 << 24) || p.n_logits_max > p.n_batch_max) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "context limits out of range: n_seq_max %d, n_ctx %d, n_batch_max %d, n_logits_max %d "
                             "(each >= 1, n_logits_max <= n_batch_max)",
                             p.n_seq_max, p.n_ctx, p.n_batch_max, p.n_logits_max);
    }
    const caprl_text_config *c = &m->cfg;
    caprl_arena_plan         plan = {0};
    CAPRL_TRY(plan_context(c, &p, &plan));
    if (plan.overflow) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "context limits too large: memory size overflows");
    }
    caprl_context *ctx = caprl_xcalloc(1, sizeof *ctx);
    ctx->m = m;
    ctx->p = p;
    caprl_status st = caprl_arena_reserve(&ctx->arena, "context", plan.bytes, err);
    if (st != CAPRL_OK) {
        free(ctx);
        return st;
    }
    size_t S = (size_t)p.n_seq_max, M = (size_t)p.n_batch_max, R = (size_t)p.n_logits_max;
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size, V = (size_t)c->vocab_size;
    size_t qd = (size_t)c->n_heads * (size_t)c->head_dim, kvd = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    size_t kv = S * (size_t)p.n_ctx * kvd * (size_t)c->n_layers;
    caprl_arena *a = &ctx->arena;
    ctx->k_cache = caprl_arena_must_alloc(a, kv * sizeof(float));
    ctx->v_cache = caprl_arena_must_alloc(a, kv * sizeof(float));
    ctx->seq_len = caprl_arena_must_alloc(a, S * sizeof(int32_t) * 3);
    ctx->batch_count = ctx->seq_len + S;
    ctx->rope_delta = ctx->seq_len + 2 * S;
    ctx->pos3 = caprl_arena_must_alloc(a, M * sizeof(int32_t) * 3);
    float *xs = caprl_arena_must_alloc(a, M * C * 3 * sizeof(float));
    ctx->x = xs;
    ctx->xn = xs + M * C;
    ctx->tmp = xs + 2 * M * C;
    ctx->q = caprl_arena_must_alloc(a, M * qd * 2 * sizeof(float));
    ctx->att = ctx->q + M * qd;
    ctx->k = caprl_arena_must_alloc(a, M * kvd * 2 * sizeof(float));
    ctx->v = ctx->k + M * kvd;
    ctx->gate = caprl_arena_must_alloc(a, M * F * 2 * sizeof(float));
    ctx->up = ctx->gate + M * F;
    ctx->hsel = caprl_arena_must_alloc(a, R * C * sizeof(float));
    ctx->logits = caprl_arena_must_alloc(a, R * V * sizeof(float));
    uint8_t *idx = caprl_arena_must_alloc(a, M * (sizeof(int32_t) * 2 + sizeof(int64_t)));
    ctx->kv_row0 = (int64_t *)(void *)idx;
    ctx->pos = (int32_t *)(void *)(idx + M * sizeof(int64_t));
    ctx->kv_len = ctx->pos + M;
    ctx->logit_rows = caprl_arena_must_alloc(a, R * sizeof(int32_t));
    memset(ctx->seq_len, 0, S * sizeof(int32_t));
    memset(ctx->rope_delta, 0, S * sizeof(int32_t));
    *out = ctx;
    return CAPRL_OK;
}

void caprl_context_free(caprl_context *ctx) {
    if (!ctx) {
        return;
    }
    caprl_arena_free(&ctx->arena);
    free(ctx);
}

size_t caprl_context_bytes(const caprl_context *ctx) {
    return ctx->arena.cap;
}

int32_t caprl_context_seq_len(const caprl_context *ctx, int32_t seq) {
    return (seq >= 0 && seq < ctx->p.n_seq_max) ? ctx->seq_len[seq] : -1;
}

void caprl_context_seq_clear(caprl_context *ctx, int32_t seq) {
    if (seq < 0) {
        memset(ctx->seq_len, 0, (size_t)ctx->p.n_seq_max * sizeof(int32_t));
        memset(ctx->rope_delta, 0, (size_t)ctx->p.n_seq_max * sizeof(int32_t));
    } else if (seq < ctx->p.n_seq_max) {
        ctx->seq_len[seq] = 0;
        ctx->rope_delta[seq] = 0;
    }
}

void caprl_context_set_rope_delta(caprl_context *ctx, int32_t seq, int32_t delta) {
    if (seq >= 0 && seq < ctx->p.n_seq_max) {
        ctx->rope_delta[seq] = delta;
    }
}

static size_t kv_dim(const caprl_context *ctx) {
    return (size_t)ctx->m->cfg.n_kv_heads * (size_t)ctx->m->cfg.head_dim;
}

/* First float of the cache row (layer, seq, pos). */
static size_t cache_offset(const caprl_context *ctx, int32_t layer, int32_t seq, int32_t pos) {
    size_t rows = ((size_t)layer * (size_t)ctx->p.n_seq_max + (size_t)seq) * (size_t)ctx->p.n_ctx + (size_t)pos;
    return rows * kv_dim(ctx);
}

caprl_status caprl_context_seq_copy(caprl_context *ctx, int32_t src, int32_t dst, caprl_error *err) {
    if (src < 0 || src >= ctx->p.n_seq_max || dst < 0 || dst >= ctx->p.n_seq_max) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "sequence copy %d -> %d: sequences are 0..%d", src, dst,
                             ctx->p.n_seq_max - 1);
    }
    if (src == dst) {
        return CAPRL_OK;
    }
    size_t n = (size_t)ctx->seq_len[src] * kv_dim(ctx) * sizeof(float);
    for (int32_t l = 0; l < ctx->m->cfg.n_layers; l++) {
        memcpy(ctx->k_cache + cache_offset(ctx, l, dst, 0), ctx->k_cache + cache_offset(ctx, l, src, 0), n);
        memcpy(ctx->v_cache + cache_offset(ctx, l, dst, 0), ctx->v_cache + cache_offset(ctx, l, src, 0), n);
    }
    ctx->seq_len[dst] = ctx->seq_len[src];
    ctx->rope_delta[dst] = ctx->rope_delta[src];
    return CAPRL_OK;
}

/* Checks the whole batch before anything changes, and fills positions, cache rows and logits rows. */
static caprl_status prepare_batch(caprl_context *ctx, const caprl_batch *b, caprl_error *err) {
    const int32_t S = ctx->p.n_seq_max;
    if (b->n_tokens < 1 || b->n_tokens > ctx->p.n_batch_max) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "batch of %d tokens: must be 1..n_batch_max (%d)",
                             b->n_tokens, ctx->p.n_batch_max);
    }
    memset(ctx->batch_count, 0, (size_t)S * sizeof(int32_t));
    for (int32_t i = 0; i < b->n_tokens; i++) {
        int32_t s = b->seq_ids[i], t = b->tokens[i];
        if (s < 0 || s >= S) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "batch token %d: sequence %d outside 0..%d", i, s, S - 1);
        }
        if (t < 0 || t >= ctx->m->cfg.vocab_size) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "batch token %d: id %d outside the vocabulary (0..%d)", i,
                                 t, ctx->m->cfg.vocab_size - 1);
        }
        int32_t p = ctx->seq_len[s] + ctx->batch_count[s]++;
        if (p >= ctx->p.n_ctx) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "sequence %d would exceed the context size n_ctx (%d)",
                                 s, ctx->p.n_ctx);
        }
        ctx->pos[i] = p;
        ctx->kv_row0[i] = (int64_t)s * ctx->p.n_ctx;
        ctx->kv_len[i] = p + 1;
        if (b->embd_row && b->embd_row[i] >= 0 && (b->embd_row[i] >= b->n_embd || !b->embd)) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "batch token %d: embedding row %d outside 0..%d", i,
                                 b->embd_row[i], b->n_embd - 1);
        }
        for (int32_t c = 0; c < 3; c++) {
            ctx->pos3[(size_t)c * (size_t)b->n_tokens + (size_t)i] =
                b->mrope_pos ? b->mrope_pos[(size_t)c * (size_t)b->n_tokens + (size_t)i] : p + ctx->rope_delta[s];
        }
    }
    int32_t n_logits = 0;
    for (int32_t i = 0; i < b->n_tokens; i++) {
        bool want;
        if (b->want_logits) {
            want = b->want_logits[i] != 0;
        } else { /* last token of its sequence in this batch */
            want = ctx->pos[i] == ctx->seq_len[b->seq_ids[i]] + ctx->batch_count[b->seq_ids[i]] - 1;
        }
        if (want) {
            if (n_logits >= ctx->p.n_logits_max) {
                return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "batch asks for more than n_logits_max (%d) logits rows",
                                     ctx->p.n_logits_max);
            }
            ctx->logit_rows[n_logits++] = i;
        }
    }
    ctx->n_logits = n_logits;
    return CAPRL_OK;
}

static void store_kv(caprl_context *ctx, int32_t layer, const caprl_batch *b) {
    size_t kvd = kv_dim(ctx);
    for (int32_t i = 0; i < b->n_tokens; i++) {
        size_t off = cache_offset(ctx, layer, b->seq_ids[i], ctx->pos[i]);
        memcpy(ctx->k_cache + off, ctx->k + (size_t)i * kvd, kvd * sizeof(float));
        memcpy(ctx->v_cache + off, ctx->v + (size_t)i * kvd, kvd * sizeof(float));
    }
}

static void attention_block(caprl_context *ctx, int32_t l, const caprl_batch *b) {
    const caprl_model       *m = ctx->m;
    const caprl_backend_ops *ops = m->be->ops;
    caprl_backend           *be = m->be;
    const layer_weights     *lw = &m->layers[l];
    const caprl_text_config *c = &m->cfg;
    int64_t M = b->n_tokens, C = c->hidden_size, D = c->head_dim;
    float   scale = (float)(1.0 / sqrt((double)D));

    ops->rmsnorm_fwd(be, ctx->xn, ctx->x, lw->input_norm, M, C, c->rms_norm_eps);
    ops->matmul_fwd(be, ctx->q, ctx->xn, &lw->q, lw->q_bias, M);
    ops->matmul_fwd(be, ctx->k, ctx->xn, &lw->k, lw->k_bias, M);
    ops->matmul_fwd(be, ctx->v, ctx->xn, &lw->v, lw->v_bias, M);
    if (c->is_vl) { /* M-RoPE: pair j rotates by the t, h or w position of its section (spec/qwen.md §3.10) */
        ops->rope_sect_fwd(be, ctx->q, c->n_heads * D, ctx->pos3, m->inv_freq, c->mrope_section, c->n_mrope_sections,
                           M, c->n_heads, D);
        ops->rope_sect_fwd(be, ctx->k, c->n_kv_heads * D, ctx->pos3, m->inv_freq, c->mrope_section,
                           c->n_mrope_sections, M, c->n_kv_heads, D);
    } else {
        ops->rope_fwd(be, ctx->q, ctx->pos, m->inv_freq, M, c->n_heads, D);
        ops->rope_fwd(be, ctx->k, ctx->pos, m->inv_freq, M, c->n_kv_heads, D);
    }
    store_kv(ctx, l, b);
    size_t layer_off = cache_offset(ctx, l, 0, 0);
    ops->attn_fwd(be, ctx->att, ctx->q, ctx->k_cache + layer_off, ctx->v_cache + layer_off, ctx->kv_row0, ctx->kv_len,
                  (int64_t)kv_dim(ctx), M, c->n_heads, c->n_kv_heads, D, scale);
    ops->matmul_fwd(be, ctx->tmp, ctx->att, &lw->o, NULL, M);
    ops->add_fwd(be, ctx->x, ctx->tmp, M * C);
}

static void mlp_block(caprl_context *ctx, int32_t l, int64_t M) {
    const caprl_model       *m = ctx->m;
    const caprl_backend_ops *ops = m->be->ops;
    caprl_backend           *be = m->be;
    const layer_weights     *lw = &m->layers[l];
    int64_t C = m->cfg.hidden_size, F = m->cfg.intermediate_size;

    ops->rmsnorm_fwd(be, ctx->xn, ctx->x, lw->post_attn_norm, M, C, m->cfg.rms_norm_eps);
    ops->matmul_fwd(be, ctx->gate, ctx->xn, &lw->gate, NULL, M);
    ops->matmul_fwd(be, ctx->up, ctx->xn, &lw->up, NULL, M);
    ops->swiglu_fwd(be, ctx->gate, ctx->gate, ctx->up, M * F);
    ops->matmul_fwd(be, ctx->tmp, ctx->gate, &lw->down, NULL, M);
    ops->add_fwd(be, ctx->x, ctx->tmp, M * C);
}

caprl_status caprl_context_decode(caprl_context *ctx, const caprl_batch *b, caprl_error *err) {
    CAPRL_TRY(prepare_batch(ctx, b, err));
    const caprl_model       *m = ctx->m;
    const caprl_backend_ops *ops = m->be->ops;
    int64_t M = b->n_tokens, C = m->cfg.hidden_size;

    ops->embed_fwd(m->be, ctx->x, b->tokens, &m->embed, M);
    for (int32_t i = 0; b->embd_row && i < b->n_tokens; i++) {
        if (b->embd_row[i] >= 0) {
            memcpy(ctx->x + (size_t)i * (size_t)C, b->embd + (size_t)b->embd_row[i] * (size_t)C, (size_t)C * sizeof(float));
        }
    }
    for (int32_t l = 0; l < m->cfg.n_layers; l++) {
        attention_block(ctx, l, b);
        mlp_block(ctx, l, M);
    }
    /* The final norm and lm_head run only on the rows whose logits were asked for. */
    for (int32_t r = 0; r < ctx->n_logits; r++) {
        memcpy(ctx->hsel + (size_t)r * (size_t)C, ctx->x + (size_t)ctx->logit_rows[r] * (size_t)C,
               (size_t)C * sizeof(float));
    }
    if (ctx->n_logits > 0) {
        ops->rmsnorm_fwd(m->be, ctx->hsel, ctx->hsel, m->final_norm, ctx->n_logits, C, m->cfg.rms_norm_eps);
        ops->matmul_fwd(m->be, ctx->logits, ctx->hsel, &m->lm_head, NULL, ctx->n_logits);
    }
    for (int32_t s = 0; s < ctx->p.n_seq_max; s++) {
        ctx->seq_len[s] += ctx->batch_count[s];
    }
    return CAPRL_OK;
}

const float *caprl_context_logits(const caprl_context *ctx, int32_t k) {
    if (k < 0 || k >= ctx->n_logits) {
        return NULL;
    }
    return ctx->logits + (size_t)k * (size_t)ctx->m->cfg.vocab_size;
}

int32_t caprl_context_n_logits(const caprl_context *ctx) {
    return ctx->n_logits;
}
