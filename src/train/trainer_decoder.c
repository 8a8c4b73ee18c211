/* The Qwen2 decoder's training pass over packed sequences: forward with the activations kept, the vocabulary-
 * chunked log-probability head, and the exact backward into the flat gradients (train_impl.h).
 *
 * The forward runs the same backend kernels as caprl_context_decode (context.c) on the same weights, except for
 * attention (attn_train_fwd over the packed sequences instead of attn_fwd over a KV cache), so its logits agree
 * with inference to f32 rounding. Reference: transformers' modeling_qwen2.py (spec/qwen.md §2.3), M-RoPE §3.10.
 * Layer backward in order: MLP (down, SwiGLU, gate/up, post-attention norm, residual), then attention (o_proj,
 * attention, RoPE, q/k/v with biases, input norm, residual). */
#include <math.h>
#include <string.h>

#include "core/error_impl.h"
#include "train/train_impl.h"

/* ---- activation layout ------------------------------------------------------------------------------------ */

typedef struct carver {
    caprl_arena_plan *plan;  /* planning */
    caprl_arena      *arena; /* or carving */
} carver;

static void *take(carver *c, size_t count, size_t elem) {
    if (c->plan) {
        caprl_arena_plan_add(c->plan, count, elem);
        return NULL;
    }
    return caprl_arena_must_alloc(c->arena, count * elem);
}

void trainer_layout_activations(caprl_trainer *tr, caprl_arena_plan *plan) {
    const caprl_text_config *c = &tr->m->cfg;
    carver  cv = {plan, &tr->arena};
    size_t  M = (size_t)tr->p.max_tokens, K = (size_t)tr->p.logits_chunk, L = (size_t)c->n_layers;
    size_t  C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size, V = (size_t)c->vocab_size;
    size_t  Hq = (size_t)c->n_heads, qd = Hq * (size_t)c->head_dim, kvd = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    size_t  n_sets = tr->p.recompute ? 1 : L;
    const size_t fl = sizeof(float);

    /* at most one feature row per token, and the tower merges merge^2 patches into one */
    tr->max_features = 0;
    if (tr->vision) {
        int64_t merge = caprl_vision_get_config(tr->vision)->spatial_merge_size;
        int64_t rows = tr->p.max_patches / (merge * merge);
        tr->max_features = rows < (int64_t)M ? rows : (int64_t)M;
    }
    if (!plan && !tr->acts) {
        tr->acts = caprl_xcalloc(n_sets, sizeof *tr->acts);
    }
    tr->xs = take(&cv, (L + 1) * M, C * fl);
    for (size_t s = 0; s < n_sets; s++) {
        layer_acts a;
        a.xn1 = take(&cv, M, C * fl);
        a.q = take(&cv, M, qd * fl);
        a.k = take(&cv, M, kvd * fl);
        a.v = take(&cv, M, kvd * fl);
        a.att = take(&cv, M, qd * fl);
        a.lse = take(&cv, M, Hq * fl);
        a.xmid = take(&cv, M, C * fl);
        a.xn2 = take(&cv, M, C * fl);
        a.gate = take(&cv, M, F * fl);
        a.up = take(&cv, M, F * fl);
        if (!plan) {
            tr->acts[s] = a;
        }
    }
    tr->hn = take(&cv, M, C * fl);
    tr->h = take(&cv, M, F * fl);
    tr->tmp = take(&cv, M, C * fl);
    tr->dx = take(&cv, M, C * fl);
    tr->dxn = take(&cv, M, C * fl);
    tr->dtmp = take(&cv, M, C * fl);
    tr->dh = take(&cv, M, F * fl);
    tr->datt = take(&cv, M, qd * fl);
    tr->dq = take(&cv, M, qd * fl);
    tr->dk = take(&cv, M, kvd * fl);
    tr->dv = take(&cv, M, kvd * fl);
    tr->dw_sink = take(&cv, C, fl);
    tr->logits = take(&cv, K, V * fl);
    tr->hsel = take(&cv, K, C * fl);
    tr->dhsel = take(&cv, K, C * fl);
    tr->chunk_logp = take(&cv, K, fl);
    tr->chunk_ent = take(&cv, K, fl);
    tr->chunk_dlogp = take(&cv, K, fl);
    tr->chunk_dent = take(&cv, K, fl);
    tr->score_lse = take(&cv, M, fl);
    tr->score_row = take(&cv, M, sizeof(int32_t));
    tr->score_tgt = take(&cv, M, sizeof(int32_t));
    tr->tokens = take(&cv, M, sizeof(int32_t));
    tr->pos = take(&cv, 3 * M, sizeof(int32_t));
    tr->pad_row = take(&cv, M, sizeof(int32_t));
    tr->seg = take(&cv, (size_t)tr->p.max_seqs + 1, sizeof(int64_t));
    tr->features = take(&cv, (size_t)tr->max_features, C * fl);
    tr->dfeatures = take(&cv, (size_t)tr->max_features, C * fl);
}

/* ---- batch checks and positions --------------------------------------------------------------------------- */

static caprl_status check_batch(const caprl_trainer *tr, const caprl_train_batch *b, float temperature,
                                const float *logp, caprl_error *err) {
    const caprl_text_config *c = &tr->m->cfg;
    if (!b || !b->tokens || !b->seq_start || !b->target || !logp) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "trainer forward: NULL batch, tokens, seq_start, target or logp");
    }
    if (b->n_tokens < 1 || b->n_tokens > tr->p.max_tokens) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "trainer batch of %d tokens: must be 1..max_tokens (%d)",
                             b->n_tokens, tr->p.max_tokens);
    }
    if (b->n_seqs < 1 || b->n_seqs > tr->p.max_seqs) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "trainer batch of %d sequences: must be 1..max_seqs (%d)",
                             b->n_seqs, tr->p.max_seqs);
    }
    if (b->seq_start[0] != 0 || b->seq_start[b->n_seqs] != b->n_tokens) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "trainer batch: seq_start must run from 0 to n_tokens (%d), got %d .. %d", b->n_tokens,
                             b->seq_start[0], b->seq_start[b->n_seqs]);
    }
    for (int32_t s = 0; s < b->n_seqs; s++) {
        if (b->seq_start[s + 1] < b->seq_start[s]) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "trainer batch: seq_start decreases at sequence %d", s);
        }
    }
    for (int32_t t = 0; t < b->n_tokens; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= c->vocab_size) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                                 "trainer batch token %d: id %d outside the vocabulary (0..%d)", t, b->tokens[t],
                                 c->vocab_size - 1);
        }
        if (b->target[t] >= c->vocab_size) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                                 "trainer batch target %d: id %d outside the vocabulary (0..%d)", t, b->target[t],
                                 c->vocab_size - 1);
        }
    }
    if (!(temperature > 0.0f) || !isfinite(temperature)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "trainer forward: temperature %g must be positive and finite",
                             (double)temperature);
    }
    if (b->mrope_pos && (!c->is_vl || c->n_mrope_sections > 3)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "trainer batch: mrope_pos needs a Qwen2.5-VL model with (t, h, w) M-RoPE sections");
    }
    return CAPRL_OK;
}

/* Image batches: the tower must be there, and the grids must make exactly as many features as there are
 * <|image_pad|> tokens (which receive them in order). Fills pad_row and n_pad. */
static caprl_status check_images(caprl_trainer *tr, const caprl_train_batch *b, caprl_error *err) {
    tr->n_pad = 0;
    if (b->n_images == 0) {
        return CAPRL_OK;
    }
    if (b->n_images < 0 || !tr->vt || !b->pixel_values || !b->grid_thw) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "trainer batch with %d images: needs a trainer made with a vision tower, pixel_values "
                             "and grid_thw",
                             b->n_images);
    }
    int64_t patches = 0, rows = 0;
    CAPRL_TRY(caprl_vision_count(caprl_vision_get_config(tr->vision), b->grid_thw, b->n_images, &patches, &rows, err));
    if (patches > tr->p.max_patches) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "trainer batch: %lld image patches exceed max_patches (%lld)",
                             (long long)patches, (long long)tr->p.max_patches);
    }
    int32_t pad = tr->m->cfg.image_token_id, n = 0;
    for (int32_t t = 0; t < b->n_tokens; t++) {
        if (b->tokens[t] == pad) {
            tr->pad_row[n++] = t;
        }
    }
    if (n != rows) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "trainer batch: %d <|image_pad|> tokens for %lld image features (grids of %d images)", n,
                             (long long)rows, b->n_images);
    }
    tr->n_pad = n;
    return CAPRL_OK;
}

/* Sequence boundaries, rotary positions (one section at 0.. within each sequence, or the caller's M-RoPE rows)
 * and the scored rows. */
static void prepare_batch(caprl_trainer *tr, const caprl_train_batch *b, float temperature) {
    const caprl_text_config *c = &tr->m->cfg;
    int32_t                  M = b->n_tokens;
    tr->M = M;
    tr->n_seg = b->n_seqs;
    memcpy(tr->tokens, b->tokens, (size_t)M * sizeof(int32_t));
    for (int32_t s = 0; s <= b->n_seqs; s++) {
        tr->seg[s] = b->seq_start[s];
    }
    if (b->mrope_pos) {
        tr->n_sections = c->n_mrope_sections;
        memcpy(tr->sections, c->mrope_section, sizeof tr->sections);
        memcpy(tr->pos, b->mrope_pos, (size_t)M * 3 * sizeof(int32_t));
    } else {
        /* equal t, h, w positions are ordinary RoPE, bit for bit with one section */
        tr->n_sections = 1;
        tr->sections[0] = c->head_dim / 2;
        for (int32_t s = 0; s < b->n_seqs; s++) {
            for (int32_t t = b->seq_start[s]; t < b->seq_start[s + 1]; t++) {
                tr->pos[t] = t - b->seq_start[s];
            }
        }
    }
    int32_t n = 0;
    for (int32_t t = 0; t < M; t++) {
        if (b->target[t] >= 0) {
            tr->score_row[n] = t;
            tr->score_tgt[n] = b->target[t];
            n++;
        }
    }
    tr->n_scored = n;
    tr->inv_temp = 1.0f / temperature;
}

/* ---- one layer -------------------------------------------------------------------------------------------- */

static float attn_scale(const caprl_text_config *c) {
    return (float)(1.0 / sqrt((double)c->head_dim)); /* as context.c */
}

/* Layer l from xin. full: also the MLP output and xout (the forward); otherwise only what the backward reads
 * (the recompute before a layer's backward). */
static void layer_forward(caprl_trainer *tr, int32_t l, const layer_acts *a, const float *xin, float *xout,
                          bool full) {
    const caprl_model       *m = tr->m;
    const caprl_text_config *c = &m->cfg;
    const caprl_backend_ops *ops = m->be->ops;
    caprl_backend           *be = m->be;
    const layer_weights     *lw = &m->layers[l];
    int64_t M = tr->M, C = c->hidden_size, F = c->intermediate_size, D = c->head_dim;
    int64_t Hq = c->n_heads, Hkv = c->n_kv_heads;

    ops->rmsnorm_fwd(be, a->xn1, xin, lw->input_norm, M, C, c->rms_norm_eps);
    ops->matmul_fwd(be, a->q, a->xn1, &lw->q, lw->q_bias, M);
    ops->matmul_fwd(be, a->k, a->xn1, &lw->k, lw->k_bias, M);
    ops->matmul_fwd(be, a->v, a->xn1, &lw->v, lw->v_bias, M);
    ops->rope_sect_fwd(be, a->q, Hq * D, tr->pos, m->inv_freq, tr->sections, tr->n_sections, M, Hq, D);
    ops->rope_sect_fwd(be, a->k, Hkv * D, tr->pos, m->inv_freq, tr->sections, tr->n_sections, M, Hkv, D);
    ops->attn_train_fwd(be, a->att, a->lse, a->q, a->k, a->v, tr->seg, tr->n_seg, M, Hq, Hkv, D, attn_scale(c),
                        true);
    ops->matmul_fwd(be, tr->tmp, a->att, &lw->o, NULL, M);
    memcpy(a->xmid, xin, (size_t)(M * C) * sizeof(float));
    ops->add_fwd(be, a->xmid, tr->tmp, M * C);
    ops->rmsnorm_fwd(be, a->xn2, a->xmid, lw->post_attn_norm, M, C, c->rms_norm_eps);
    ops->matmul_fwd(be, a->gate, a->xn2, &lw->gate, NULL, M);
    ops->matmul_fwd(be, a->up, a->xn2, &lw->up, NULL, M);
    if (full) {
        ops->swiglu_fwd(be, tr->h, a->gate, a->up, M * F);
        ops->matmul_fwd(be, tr->tmp, tr->h, &lw->down, NULL, M);
        memcpy(xout, a->xmid, (size_t)(M * C) * sizeof(float));
        ops->add_fwd(be, xout, tr->tmp, M * C);
    }
}

/* dx: dL/d(layer output) in, dL/d(layer input) out. train: accumulate the layer's weight gradients. */
static void layer_backward(caprl_trainer *tr, int32_t l, const layer_acts *a, const float *xin, bool train) {
    const caprl_model       *m = tr->m;
    const caprl_text_config *c = &m->cfg;
    const caprl_backend_ops *ops = m->be->ops;
    caprl_backend           *be = m->be;
    const layer_weights     *lw = &m->layers[l];
    int64_t M = tr->M, C = c->hidden_size, F = c->intermediate_size, D = c->head_dim;
    int64_t Hq = c->n_heads, Hkv = c->n_kv_heads, qd = Hq * D, kvd = Hkv * D;
    float  *g[LAYER_TENSORS];
    for (int32_t j = 0; j < LAYER_TENSORS; j++) {
        g[j] = tr->grads + tr->layer_offset[(size_t)l * LAYER_TENSORS + (size_t)j];
    }
    float *dx = tr->dx, *dxn = tr->dxn, *dtmp = tr->dtmp;

    /* MLP: out = xmid + down(silu(gate) * up) */
    ops->swiglu_fwd(be, tr->h, a->gate, a->up, M * F);
    if (train) {
        ops->matmul_bwd_weight(be, g[LT_DOWN], NULL, dx, tr->h, &lw->down, M);
    }
    ops->matmul_bwd_data(be, tr->dh, dx, &lw->down, M);
    ops->swiglu_bwd(be, a->gate, a->up, tr->dh, a->gate, a->up, M * F); /* gate, up become their gradients */
    if (train) {
        ops->matmul_bwd_weight(be, g[LT_GATE], NULL, a->gate, a->xn2, &lw->gate, M);
        ops->matmul_bwd_weight(be, g[LT_UP], NULL, a->up, a->xn2, &lw->up, M);
    }
    ops->matmul_bwd_data(be, dxn, a->gate, &lw->gate, M);
    ops->matmul_bwd_data(be, dtmp, a->up, &lw->up, M);
    ops->add_fwd(be, dxn, dtmp, M * C);
    ops->rmsnorm_bwd(be, dxn, train ? g[LT_POST_NORM] : tr->dw_sink, dxn, a->xmid, lw->post_attn_norm, M, C,
                     c->rms_norm_eps);
    ops->add_fwd(be, dx, dxn, M * C); /* dx = dL/dxmid */

    /* attention: xmid = xin + o(attn(rope(q), rope(k), v)) */
    if (train) {
        ops->matmul_bwd_weight(be, g[LT_O], NULL, dx, a->att, &lw->o, M);
    }
    ops->matmul_bwd_data(be, tr->datt, dx, &lw->o, M);
    ops->attn_train_bwd(be, tr->dq, tr->dk, tr->dv, tr->datt, a->q, a->k, a->v, a->att, a->lse, tr->seg, tr->n_seg,
                        M, Hq, Hkv, D, attn_scale(c), true);
    ops->rope_sect_bwd(be, tr->dq, qd, tr->pos, m->inv_freq, tr->sections, tr->n_sections, M, Hq, D);
    ops->rope_sect_bwd(be, tr->dk, kvd, tr->pos, m->inv_freq, tr->sections, tr->n_sections, M, Hkv, D);
    if (train) {
        ops->matmul_bwd_weight(be, g[LT_Q], g[LT_Q_BIAS], tr->dq, a->xn1, &lw->q, M);
        ops->matmul_bwd_weight(be, g[LT_K], g[LT_K_BIAS], tr->dk, a->xn1, &lw->k, M);
        ops->matmul_bwd_weight(be, g[LT_V], g[LT_V_BIAS], tr->dv, a->xn1, &lw->v, M);
    }
    ops->matmul_bwd_data(be, dxn, tr->dq, &lw->q, M);
    ops->matmul_bwd_data(be, dtmp, tr->dk, &lw->k, M);
    ops->add_fwd(be, dxn, dtmp, M * C);
    ops->matmul_bwd_data(be, dtmp, tr->dv, &lw->v, M);
    ops->add_fwd(be, dxn, dtmp, M * C);
    ops->rmsnorm_bwd(be, dxn, train ? g[LT_INPUT_NORM] : tr->dw_sink, dxn, xin, lw->input_norm, M, C,
                     c->rms_norm_eps);
    ops->add_fwd(be, dx, dxn, M * C); /* dx = dL/dxin */
}

static const layer_acts *acts_of(const caprl_trainer *tr, int32_t l) {
    return tr->p.recompute ? &tr->acts[0] : &tr->acts[l];
}

static float *xs_of(const caprl_trainer *tr, int32_t l) {
    return tr->xs + (size_t)l * (size_t)tr->p.max_tokens * (size_t)tr->m->cfg.hidden_size;
}

/* ---- forward ---------------------------------------------------------------------------------------------- */

/* The log-probability head: for logits_chunk scored rows at a time, logits = hn @ lm_head^T, then
 * logprob_fwd. Only each row's lse is kept; the backward recomputes the logits. */
static void head_forward(caprl_trainer *tr, float *logp, float *entropy) {
    const caprl_model       *m = tr->m;
    const caprl_backend_ops *ops = m->be->ops;
    int64_t C = m->cfg.hidden_size, V = m->cfg.vocab_size, K = tr->p.logits_chunk;
    memset(logp, 0, (size_t)tr->M * sizeof(float));
    if (entropy) {
        memset(entropy, 0, (size_t)tr->M * sizeof(float));
    }
    for (int64_t r0 = 0; r0 < tr->n_scored; r0 += K) {
        int64_t k = tr->n_scored - r0 < K ? tr->n_scored - r0 : K;
        for (int64_t i = 0; i < k; i++) {
            memcpy(tr->hsel + i * C, tr->hn + (size_t)tr->score_row[r0 + i] * (size_t)C, (size_t)C * sizeof(float));
        }
        ops->matmul_fwd(m->be, tr->logits, tr->hsel, &m->lm_head, NULL, k);
        ops->logprob_fwd(m->be, tr->chunk_logp, entropy ? tr->chunk_ent : NULL, tr->score_lse + r0, tr->logits,
                         tr->score_tgt + r0, k, V, tr->inv_temp);
        for (int64_t i = 0; i < k; i++) {
            logp[tr->score_row[r0 + i]] = tr->chunk_logp[i];
            if (entropy) {
                entropy[tr->score_row[r0 + i]] = tr->chunk_ent[i];
            }
        }
    }
}

caprl_status caprl_trainer_forward(caprl_trainer *tr, const caprl_train_batch *b, float temperature, float *logp,
                                   float *entropy, caprl_error *err) {
    tr->have_forward = false;
    CAPRL_TRY(check_batch(tr, b, temperature, logp, err));
    CAPRL_TRY(check_images(tr, b, err));
    prepare_batch(tr, b, temperature);
    const caprl_model       *m = tr->m;
    const caprl_backend_ops *ops = m->be->ops;
    int64_t M = tr->M, C = m->cfg.hidden_size;
    int32_t L = m->cfg.n_layers;

    float *x0 = xs_of(tr, 0);
    ops->embed_fwd(m->be, x0, tr->tokens, &m->embed, M);
    if (tr->n_pad > 0) { /* image features replace the <|image_pad|> embeddings, in order */
        int64_t n_feat = 0;
        CAPRL_TRY(vision_train_forward(tr->vt, b->pixel_values, b->grid_thw, b->n_images, tr->features, &n_feat, err));
        CAPRL_ASSERT(n_feat == tr->n_pad);
        for (int32_t i = 0; i < tr->n_pad; i++) {
            memcpy(x0 + (size_t)tr->pad_row[i] * (size_t)C, tr->features + (size_t)i * (size_t)C,
                   (size_t)C * sizeof(float));
        }
    }
    for (int32_t l = 0; l < L; l++) {
        layer_forward(tr, l, acts_of(tr, l), xs_of(tr, l), xs_of(tr, l + 1), true);
    }
    ops->rmsnorm_fwd(m->be, tr->hn, xs_of(tr, L), m->final_norm, M, C, m->cfg.rms_norm_eps);
    head_forward(tr, logp, entropy);
    tr->have_forward = true;
    return CAPRL_OK;
}

/* ---- backward --------------------------------------------------------------------------------------------- */

/* Per chunk: the logits again, logprob_bwd in place (dL/dlogits), the lm_head gradient (train_head) and, when
 * the layers need it (dx), dL/dhn into the chunk's rows of dx (zero elsewhere). */
static void head_backward(caprl_trainer *tr, const float *dlogp, const float *dent, bool train_head, bool need_dx) {
    const caprl_model       *m = tr->m;
    const caprl_backend_ops *ops = m->be->ops;
    int64_t C = m->cfg.hidden_size, V = m->cfg.vocab_size, K = tr->p.logits_chunk;
    float  *g_head = tr->grads + tr->lm_head_offset;
    if (need_dx) {
        memset(tr->dx, 0, (size_t)tr->M * (size_t)C * sizeof(float));
    }
    for (int64_t r0 = 0; r0 < tr->n_scored; r0 += K) {
        int64_t k = tr->n_scored - r0 < K ? tr->n_scored - r0 : K;
        bool    any = false;
        for (int64_t i = 0; i < k; i++) {
            tr->chunk_dlogp[i] = dlogp[tr->score_row[r0 + i]];
            tr->chunk_dent[i] = dent ? dent[tr->score_row[r0 + i]] : 0.0f;
            any = any || tr->chunk_dlogp[i] != 0.0f || tr->chunk_dent[i] != 0.0f;
        }
        if (!any) { /* masked-out rows (RL, SFT prompts) cost nothing */
            continue;
        }
        for (int64_t i = 0; i < k; i++) {
            memcpy(tr->hsel + i * C, tr->hn + (size_t)tr->score_row[r0 + i] * (size_t)C, (size_t)C * sizeof(float));
        }
        ops->matmul_fwd(m->be, tr->logits, tr->hsel, &m->lm_head, NULL, k);
        ops->logprob_bwd(m->be, tr->logits, tr->score_lse + r0, tr->score_tgt + r0, tr->chunk_dlogp,
                         dent ? tr->chunk_dent : NULL, k, V, tr->inv_temp);
        if (train_head) {
            ops->matmul_bwd_weight(m->be, g_head, NULL, tr->logits, tr->hsel, &m->lm_head, k);
        }
        if (need_dx) {
            ops->matmul_bwd_data(m->be, tr->dhsel, tr->logits, &m->lm_head, k);
            for (int64_t i = 0; i < k; i++) {
                memcpy(tr->dx + (size_t)tr->score_row[r0 + i] * (size_t)C, tr->dhsel + i * C,
                       (size_t)C * sizeof(float));
            }
        }
    }
}

/* dx = dL/dxs[0]: the spliced rows' gradient goes to the tower (vision), the rest to the embedding (embed). */
static caprl_status input_backward(caprl_trainer *tr, bool embed, bool vision, caprl_error *err) {
    const caprl_model *m = tr->m;
    size_t             C = (size_t)m->cfg.hidden_size;
    for (int32_t i = 0; i < tr->n_pad; i++) {
        float *row = tr->dx + (size_t)tr->pad_row[i] * C;
        memcpy(tr->dfeatures + (size_t)i * C, row, C * sizeof(float));
        memset(row, 0, C * sizeof(float)); /* adds nothing to the <|image_pad|> embedding */
    }
    if (embed) {
        m->be->ops->embed_bwd(m->be, tr->grads + tr->embed_offset, tr->tokens, tr->dx, tr->M, (int64_t)C);
    }
    if (vision) {
        CAPRL_TRY(vision_train_backward(tr->vt, tr->dfeatures, tr->grads + tr->vision_offset, err));
    }
    return CAPRL_OK;
}

caprl_status caprl_trainer_backward(caprl_trainer *tr, const float *dlogp, caprl_error *err) {
    return caprl_trainer_backward_entropy(tr, dlogp, NULL, err);
}

caprl_status caprl_trainer_backward_entropy(caprl_trainer *tr, const float *dlogp, const float *dentropy,
                                            caprl_error *err) {
    if (!tr->have_forward || !dlogp) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "trainer backward: needs dlogp and a forward since the last backward");
    }
    tr->have_forward = false; /* the backward consumes saved activations */
    const caprl_model *m = tr->m;
    int32_t            frozen = tr->p.frozen_groups, L = m->cfg.n_layers;
    bool               text = !(frozen & CAPRL_GROUP_TEXT), embed = !(frozen & CAPRL_GROUP_EMBED);
    bool               vision = tr->n_pad > 0 && !(frozen & CAPRL_GROUP_VISION);
    bool               head = m->tied ? embed : text;
    bool               layers = text || embed || vision; /* someone below the head wants a gradient */
    if (!head && !layers) {
        return CAPRL_OK;
    }
    head_backward(tr, dlogp, dentropy, head, layers);
    if (!layers) {
        return CAPRL_OK;
    }
    m->be->ops->rmsnorm_bwd(m->be, tr->dx, text ? tr->grads + tr->final_norm_offset : tr->dw_sink, tr->dx,
                            xs_of(tr, L), m->final_norm, tr->M, m->cfg.hidden_size, m->cfg.rms_norm_eps);
    for (int32_t l = L - 1; l >= 0; l--) {
        if (tr->p.recompute) {
            layer_forward(tr, l, acts_of(tr, l), xs_of(tr, l), NULL, false);
        }
        layer_backward(tr, l, acts_of(tr, l), xs_of(tr, l), text);
    }
    return input_backward(tr, embed, vision, err);
}
