/* Generation loop: prefill every prompt once (in n_batch_max chunks), copy its cache to the prompt's other
 * samples, then decode all unfinished sequences together, one token each per step. */
#include <stdlib.h>
#include <string.h>

#include "caprl/generate.h"
#include "core/error_impl.h"
#include "model/model_impl.h"

caprl_generate_params caprl_generate_default_params(void) {
    caprl_generate_params p;
    memset(&p, 0, sizeof p);
    p.n_samples = 1;
    p.max_new_tokens = 256;
    p.sampling = caprl_sampling_default_params();
    return p;
}

typedef struct gen_state {
    int32_t  n_seq;
    int32_t  hist_cap;
    int32_t *history;  /* (n_seq, hist_cap) prompt + generated ids */
    int32_t *hist_len; /* (n_seq) */
    int32_t *finish;   /* (n_seq) */
    int32_t *n_gen;    /* (n_seq) */
    int32_t *tokens;   /* (n_batch) */
    int32_t *seq_ids;  /* (n_batch) */
    int8_t  *want;     /* (n_batch) */
    int32_t *embd_row; /* (n_batch) chunk of a VL prompt's embedding rows */
    int32_t *mrope;    /* (3, n_batch) chunk of a VL prompt's positions */
} gen_state;

static void gen_state_free(gen_state *g) {
    free(g->history);
    free(g->hist_len);
    free(g->finish);
    free(g->n_gen);
    free(g->tokens);
    free(g->seq_ids);
    free(g->want);
    free(g->embd_row);
    free(g->mrope);
}

static uint64_t sample_stream(const caprl_generate_params *gp, int32_t prompt, int32_t sample) {
    uint64_t id = gp->prompt_streams ? gp->prompt_streams[prompt] : (uint64_t)prompt;
    return gp->stream_base + id * (uint64_t)gp->n_samples + (uint64_t)sample;
}

static bool is_eos(const int32_t *eos, int32_t n_eos, int32_t tok) {
    for (int32_t i = 0; i < n_eos; i++) {
        if (eos[i] == tok) {
            return true;
        }
    }
    return false;
}

/* Prefills a prompt into sequence seq, in chunks; the logits of its last token end up as row 0. A VL prompt's
 * embedding rows and M-RoPE positions are sliced per chunk. */
static caprl_status prefill(caprl_context *ctx, gen_state *g, const int32_t *prompt, int64_t len,
                            const caprl_prompt_vision *vis, int32_t seq, int32_t n_batch_max, caprl_error *err) {
    for (int64_t start = 0; start < len; start += n_batch_max) {
        int32_t n = (int32_t)(len - start < n_batch_max ? len - start : n_batch_max);
        for (int32_t i = 0; i < n; i++) {
            g->tokens[i] = prompt[start + i];
            g->seq_ids[i] = seq;
            g->want[i] = (start + i == len - 1);
        }
        caprl_batch b = {.n_tokens = n, .tokens = g->tokens, .seq_ids = g->seq_ids, .want_logits = g->want};
        if (vis && vis->embd_row) {
            memcpy(g->embd_row, vis->embd_row + start, (size_t)n * sizeof(int32_t));
            b.embd = vis->embd;
            b.n_embd = vis->n_embd;
            b.embd_row = g->embd_row;
        }
        if (vis && vis->mrope_pos) {
            for (int32_t c = 0; c < 3; c++) {
                memcpy(g->mrope + (size_t)c * (size_t)n, vis->mrope_pos + (size_t)c * (size_t)len + (size_t)start,
                       (size_t)n * sizeof(int32_t));
            }
            b.mrope_pos = g->mrope;
        }
        CAPRL_TRY(caprl_context_decode(ctx, &b, err));
    }
    if (vis) {
        caprl_context_set_rope_delta(ctx, seq, vis->rope_delta);
    }
    return CAPRL_OK;
}

caprl_status caprl_generate(caprl_context *ctx, const int32_t *const *prompts, const int64_t *prompt_lens,
                            int32_t n_prompts, const caprl_prompt_vision *vision, const caprl_generate_params *params,
                            caprl_token_fn on_token,
                            void *user_data, int32_t *finish, int32_t *n_generated, caprl_error *err) {
    caprl_generate_params gp = params ? *params : caprl_generate_default_params();
    const caprl_model    *m = ctx->m;
    const int32_t        *eos = gp.eos_ids ? gp.eos_ids : m->gen.eos_ids;
    int32_t               n_eos = gp.eos_ids ? gp.n_eos : m->gen.n_eos;
    if (n_prompts < 1 || gp.n_samples < 1 || gp.max_new_tokens < 1) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "generate: need >= 1 prompt, sample and new token");
    }
    int64_t n_seq64 = (int64_t)n_prompts * gp.n_samples;
    if (n_seq64 > ctx->p.n_seq_max) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "generate: %lld sequences (%d prompts x %d samples) exceed the context's n_seq_max (%d)",
                             (long long)n_seq64, n_prompts, gp.n_samples, ctx->p.n_seq_max);
    }
    int64_t longest = 0;
    for (int32_t p = 0; p < n_prompts; p++) {
        if (prompt_lens[p] < 1) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "generate: prompt %d is empty", p);
        }
        longest = prompt_lens[p] > longest ? prompt_lens[p] : longest;
    }
    if (longest + gp.max_new_tokens > ctx->p.n_ctx) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "generate: prompt of %lld tokens + %d new tokens exceeds the context size n_ctx (%d)",
                             (long long)longest, gp.max_new_tokens, ctx->p.n_ctx);
    }
    caprl_sampler *sampler = NULL;
    CAPRL_TRY(caprl_sampler_init(&sampler, m->cfg.vocab_size, &gp.sampling, err));

    int32_t   n_seq = (int32_t)n_seq64;
    int32_t   n_batch = ctx->p.n_batch_max;
    gen_state g = {0};
    g.n_seq = n_seq;
    g.hist_cap = (int32_t)(longest + gp.max_new_tokens);
    g.history = caprl_xmalloc((size_t)n_seq * (size_t)g.hist_cap * sizeof(int32_t));
    g.hist_len = caprl_xcalloc((size_t)n_seq, sizeof(int32_t));
    g.finish = caprl_xcalloc((size_t)n_seq, sizeof(int32_t));
    g.n_gen = caprl_xcalloc((size_t)n_seq, sizeof(int32_t));
    g.tokens = caprl_xmalloc((size_t)n_batch * sizeof(int32_t));
    g.seq_ids = caprl_xmalloc((size_t)n_batch * sizeof(int32_t));
    g.want = caprl_xmalloc((size_t)n_batch * sizeof(int8_t));
    g.embd_row = caprl_xmalloc((size_t)n_batch * sizeof(int32_t));
    g.mrope = caprl_xmalloc((size_t)n_batch * 3 * sizeof(int32_t));

    caprl_context_seq_clear(ctx, -1);
    caprl_status st = CAPRL_OK;
    int32_t      n_active = 0;
    /* Prefill each prompt, then sample the first token of each of its samples from the same logits. */
    for (int32_t p = 0; p < n_prompts && st == CAPRL_OK; p++) {
        int32_t seq0 = p * gp.n_samples;
        st = prefill(ctx, &g, prompts[p], prompt_lens[p], vision ? &vision[p] : NULL, seq0, n_batch, err);
        for (int32_t k = 0; k < gp.n_samples && st == CAPRL_OK; k++) {
            int32_t seq = seq0 + k;
            if (k > 0) {
                st = caprl_context_seq_copy(ctx, seq0, seq, err);
            }
            int32_t *h = g.history + (size_t)seq * (size_t)g.hist_cap;
            memcpy(h, prompts[p], (size_t)prompt_lens[p] * sizeof(int32_t));
            g.hist_len[seq] = (int32_t)prompt_lens[p];
        }
        const float *logits = caprl_context_logits(ctx, 0);
        for (int32_t k = 0; k < gp.n_samples && st == CAPRL_OK; k++) {
            int32_t  seq = seq0 + k;
            int32_t *h = g.history + (size_t)seq * (size_t)g.hist_cap;
            int32_t  tok = caprl_sampler_sample(sampler, logits, h, g.hist_len[seq], sample_stream(&gp, p, k), 0);
            h[g.hist_len[seq]++] = tok;
            g.n_gen[seq] = 1;
            if (on_token && !on_token(p, k, tok, user_data)) {
                st = caprl_err_set(err, CAPRL_ERR_ABORTED, "generation stopped by the caller");
            }
            if (is_eos(eos, n_eos, tok)) {
                g.finish[seq] = CAPRL_FINISH_EOS;
            } else if (gp.max_new_tokens == 1) {
                g.finish[seq] = CAPRL_FINISH_LENGTH;
            } else {
                n_active++;
            }
        }
    }
    /* Decode: every unfinished sequence advances one token per step; batches hold at most n_batch sequences. */
    for (int32_t step = 1; n_active > 0 && st == CAPRL_OK; step++) {
        for (int32_t first = 0; first < n_seq && st == CAPRL_OK;) {
            int32_t n = 0, next = first;
            for (; next < n_seq && n < n_batch; next++) {
                if (g.finish[next] == CAPRL_FINISH_NONE) {
                    g.tokens[n] = g.history[(size_t)next * (size_t)g.hist_cap + (size_t)g.hist_len[next] - 1];
                    g.seq_ids[n] = next;
                    g.want[n] = 1;
                    n++;
                }
            }
            first = next;
            if (n == 0) {
                continue;
            }
            caprl_batch b = {.n_tokens = n, .tokens = g.tokens, .seq_ids = g.seq_ids, .want_logits = g.want};
            st = caprl_context_decode(ctx, &b, err);
            for (int32_t r = 0; r < n && st == CAPRL_OK; r++) {
                int32_t  seq = g.seq_ids[r];
                int32_t *h = g.history + (size_t)seq * (size_t)g.hist_cap;
                int32_t  tok = caprl_sampler_sample(sampler, caprl_context_logits(ctx, r), h, g.hist_len[seq],
                                                    sample_stream(&gp, seq / gp.n_samples, seq % gp.n_samples),
                                                    (uint64_t)step);
                h[g.hist_len[seq]++] = tok;
                g.n_gen[seq]++;
                if (on_token && !on_token(seq / gp.n_samples, seq % gp.n_samples, tok, user_data)) {
                    st = caprl_err_set(err, CAPRL_ERR_ABORTED, "generation stopped by the caller");
                }
                if (is_eos(eos, n_eos, tok)) {
                    g.finish[seq] = CAPRL_FINISH_EOS;
                    n_active--;
                } else if (g.n_gen[seq] >= gp.max_new_tokens) {
                    g.finish[seq] = CAPRL_FINISH_LENGTH;
                    n_active--;
                }
            }
        }
    }
    for (int32_t s = 0; s < n_seq; s++) {
        if (finish) {
            finish[s] = g.finish[s] != CAPRL_FINISH_NONE ? g.finish[s] : CAPRL_FINISH_ABORTED;
        }
        if (n_generated) {
            n_generated[s] = g.n_gen[s];
        }
    }
    gen_state_free(&g);
    caprl_sampler_free(sampler);
    return st;
}
