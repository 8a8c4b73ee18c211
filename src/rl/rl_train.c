/* The CapRL training loop (include/caprl/rl.h). One step:
 *   1. the step's images: global positions step * B .. step * B + B - 1 of the concatenated per-epoch permutations
 *      of the QA set (Philox (seed, epoch)), so the data cursor is a function of the step alone;
 *   2. rollouts: G captions per image with caprl_vl_generate, sample streams keyed by the global position;
 *   3. rewards: caprl_reward_score on every caption, question draws keyed by the global caption index;
 *   4. advantages (grpo / rloo / dr_grpo, optional whitening, dynamic sampling, overlong masking);
 *   5. updates_per_rollout optimizer steps over mini-batches of groups: packed micro-batches through
 *      caprl_trainer_forward (logits / temperature), dL/dlogp from caprl_rl_token_loss, caprl_trainer_backward;
 *   6. metrics line, sample captions, checkpoint.
 * A checkpoint records only the step (everything random is keyed by it), the weights and the optimizer, so a resumed
 * run is bit-identical to an uninterrupted one. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/image.h"
#include "caprl/qa.h"
#include "caprl/rl.h"
#include "core/clock_impl.h"
#include "caprl/vlm.h"
#include "core/error_impl.h"
#include "core/file_impl.h"
#include "core/log_impl.h"
#include "core/rng_impl.h"
#include "fmt/json_impl.h"
#include "rl/rl_impl.h"

#define RL_STREAM_DATA 0x64617461u /* "data": the epoch permutations */

typedef struct rl_image {
    caprl_image     img;
    float          *pixels;    /* (n_patches, patch_dim) */
    int64_t         n_patches;
    int32_t         grid[3];
    caprl_vl_prompt prompt;    /* expanded ids, M-RoPE positions, rope delta */
    int64_t         qa_index;  /* image in the QA set */
    int64_t         global;    /* global data position (stream id) */
} rl_image;

typedef struct rl_seq {
    int32_t  image;   /* index in the step's images */
    int32_t *resp;    /* sampled tokens, eos included when the caption ended on it */
    int32_t  n_resp;
    int32_t  finish;
    bool     cut;     /* the caption sampled <|image_pad|> and ends before it (see on_token) */
    float    reward;
    float    adv;
    bool     keep;    /* takes part in the update */
    int32_t  n_loss;  /* response tokens that carry loss (0 when masked) */
    int32_t  n_text;  /* tokens of the decoded caption re-encoded (the length term's count, as CapRL++ takes it;
                       * -1 when the term is off) */
    float   *old_lp;  /* (n_resp) old-policy log-probs, when needed */
    float   *ref_lp;  /* (n_resp) reference log-probs, when needed */
    char    *caption;
} rl_seq;

typedef struct rl_run {
    const caprl_rl_config  *cfg;
    caprl_qa_set            qa;
    caprl_model            *policy;
    caprl_vision           *vision;
    caprl_preprocess_config pp;
    caprl_reader           *reader;
    caprl_trainer          *tr;
    caprl_adamw            *opt;
    caprl_model            *ref_model;
    caprl_vision           *ref_vision;
    caprl_trainer          *ref_tr;
    caprl_context          *gen_ctx;
    int64_t                 horizon;     /* optimizer-schedule steps */
    int64_t                 total_steps; /* steps this run goes to */
    int64_t                *perm;        /* permutation of epoch perm_epoch */
    int64_t                 perm_epoch;
    int32_t                 patch_dim;
    /* micro-batch buffers, sized at init */
    caprl_trainer_params    tp;
    int32_t                *mb_tokens, *mb_target, *mb_pos, *mb_seq_start, *mb_grid;
    float                  *mb_pixels, *mb_logp, *mb_entropy, *mb_dlogp, *mb_adv, *mb_weight, *mb_old, *mb_ref;
    float                  *mb_lp_tok, *mb_dl_tok, *mb_dent;
    /* per step */
    rl_image               *images;
    rl_seq                 *seqs;
    caprl_reward_result    *results;
} rl_run;

/* ---- data order ------------------------------------------------------------------------------------------ */

static void epoch_perm(rl_run *r, int64_t epoch) {
    if (r->perm_epoch == epoch) {
        return;
    }
    int64_t   n = r->qa.n_images;
    caprl_rng rng;
    caprl_rng_init(&rng, r->cfg->seed, RL_STREAM_DATA, (uint64_t)epoch);
    for (int64_t i = 0; i < n; i++) {
        r->perm[i] = i;
    }
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)caprl_rng_below(&rng, (uint64_t)(i + 1));
        int64_t t = r->perm[i];
        r->perm[i] = r->perm[j];
        r->perm[j] = t;
    }
    r->perm_epoch = epoch;
}

static int64_t data_index(rl_run *r, int64_t global) {
    epoch_perm(r, global / r->qa.n_images);
    return r->perm[global % r->qa.n_images];
}

/* ---- setup ----------------------------------------------------------------------------------------------- */

static void run_free(rl_run *r) {
    int32_t B = r->cfg->rollout_batch, G = r->cfg->group_size;
    if (r->images) {
        for (int32_t i = 0; i < B; i++) {
            caprl_image_free(&r->images[i].img);
            caprl_free(r->images[i].pixels);
            caprl_vl_prompt_free(&r->images[i].prompt);
        }
    }
    if (r->seqs) {
        for (int32_t s = 0; s < B * G; s++) {
            free(r->seqs[s].resp);
            free(r->seqs[s].old_lp);
            free(r->seqs[s].ref_lp);
            free(r->seqs[s].caption);
        }
    }
    if (r->results) {
        for (int32_t s = 0; s < B * G; s++) {
            caprl_reward_result_clear(&r->results[s]);
        }
    }
    free(r->images);
    free(r->seqs);
    free(r->results);
    void *bufs[] = {r->mb_tokens, r->mb_target, r->mb_pos,    r->mb_seq_start, r->mb_grid,  r->mb_pixels,
                    r->mb_logp,   r->mb_entropy, r->mb_dlogp, r->mb_adv,       r->mb_weight, r->mb_old,
                    r->mb_ref,    r->mb_lp_tok,  r->mb_dl_tok, r->mb_dent, r->perm};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        free(bufs[i]);
    }
    caprl_context_free(r->gen_ctx);
    caprl_adamw_free(r->opt);
    caprl_trainer_free(r->tr);
    caprl_trainer_free(r->ref_tr);
    caprl_reader_free(r->reader);
    caprl_vision_free(r->vision);
    caprl_model_free(r->policy);
    caprl_vision_free(r->ref_vision);
    caprl_model_free(r->ref_model);
    caprl_qa_set_free(&r->qa);
}

static caprl_status load_policy(const caprl_rl_config *cfg, caprl_model **model, caprl_vision **vision,
                                caprl_error *err) {
    caprl_model_params mp = caprl_model_default_params();
    mp.n_threads = cfg->n_threads;
    CAPRL_TRY(caprl_model_load(model, cfg->policy, &mp, err));
    if (!caprl_model_config(*model)->is_vl || !caprl_model_tokenizer(*model)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "%s: the policy must be a Qwen2.5-VL checkpoint with a tokenizer.json", cfg->policy);
    }
    return caprl_vision_load(vision, cfg->policy, cfg->n_threads, err);
}

/* Every setting's range, checked before anything is loaded; the error names the setting as the flag / config key
 * (a wrong reader_temperature is reported as that, not as the reward's own field name). */
static caprl_status check_config(const caprl_rl_config *c, caprl_error *err) {
    const char *missing = !c->policy ? "policy"
                          : !c->reader ? "reader"
                          : !c->data   ? "data"
                          : !c->out    ? "out"
                          : !c->instruction ? "instruction"
                                            : NULL;
    if (missing) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "the training setting '%s' is required", missing);
    }
    const caprl_reward_params *w = &c->reward;
    const caprl_adamw_params  *o = &c->opt;
    const caprl_rl_params     *p = &c->rl;
    /* float settings widen exactly into the table's double column */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdouble-promotion"
    const struct {
        const char *key;
        bool        ok;
        double      value;
        const char *rule;
    } checks[] = {
        {"rollout_batch", c->rollout_batch >= 1, c->rollout_batch, ">= 1"},
        {"group_size", c->group_size >= (p->estimator == CAPRL_ADV_GRPO ? 1 : 2), c->group_size,
         p->estimator == CAPRL_ADV_GRPO ? ">= 1" : ">= 2 (advantage rloo and dr_grpo compare a group's captions)"},
        {"temperature", c->temperature > 0.0f && isfinite(c->temperature), c->temperature, "a number > 0"},
        {"top_p", c->top_p > 0.0f && c->top_p <= 1.0f, c->top_p, "in (0, 1]"},
        {"max_new_tokens", c->max_new_tokens >= 1, c->max_new_tokens, ">= 1"},
        {"episodes", c->episodes >= 1, c->episodes, ">= 1"},
        {"updates_per_rollout", c->updates_per_rollout >= 1 && c->updates_per_rollout <= c->rollout_batch,
         c->updates_per_rollout, "in [1, rollout_batch]"},
        {"micro_batch_tokens", c->micro_batch_tokens >= 16, c->micro_batch_tokens, ">= 16"},
        {"adv_eps", p->adv_eps > 0.0f && isfinite(p->adv_eps), p->adv_eps, "a number > 0"},
        {"clip_low", p->clip_low >= 0.0f && p->clip_low < 1.0f, p->clip_low, "in [0, 1)"},
        {"clip_high", p->clip_high >= 0.0f && isfinite(p->clip_high), p->clip_high, "a number >= 0"},
        {"dual_clip", p->dual_clip == 0.0f || (p->dual_clip > 1.0f && isfinite(p->dual_clip)), p->dual_clip,
         "0 (off) or a number > 1"},
        {"kl_coef", p->kl_coef >= 0.0f && isfinite(p->kl_coef), p->kl_coef, "a number >= 0"},
        {"entropy_coef", isfinite(p->entropy_coef), p->entropy_coef, "a finite number"},
        {"lr", o->lr >= 0.0f && isfinite(o->lr), o->lr, "a number >= 0"},
        {"beta1", o->beta1 >= 0.0f && o->beta1 < 1.0f, o->beta1, "in [0, 1)"},
        {"beta2", o->beta2 >= 0.0f && o->beta2 < 1.0f, o->beta2, "in [0, 1)"},
        {"adam_eps", o->eps >= 0.0f && isfinite(o->eps), o->eps, "a number >= 0"},
        {"weight_decay", o->weight_decay >= 0.0f && isfinite(o->weight_decay), o->weight_decay, "a number >= 0"},
        {"max_grad_norm", isfinite(o->max_grad_norm), o->max_grad_norm, "a number (<= 0: no clipping)"},
        {"warmup", o->warmup_steps >= 0, o->warmup_steps, ">= 0"},
        {"min_lr_ratio", o->min_lr_ratio >= 0.0f && o->min_lr_ratio <= 1.0f, o->min_lr_ratio, "in [0, 1]"},
        {"n_questions", w->n_questions >= 1 && w->n_questions < (1 << 20), w->n_questions, "in [1, 2^20)"},
        {"tau", w->tau > 0.0f && isfinite(w->tau), w->tau, "a number > 0"},
        {"reader_temperature", w->temperature > 0.0f && isfinite(w->temperature), w->temperature, "a number > 0"},
        {"reader_max_tokens", w->max_new_tokens >= 1 && w->max_new_tokens <= 4096, w->max_new_tokens,
         "in [1, 4096]"},
        {"length_weight", w->length_weight >= 0.0f && isfinite(w->length_weight), w->length_weight, "a number >= 0"},
        {"length_l1", w->length_l1 >= 0, w->length_l1, ">= 0"},
        {"length_l2", w->length_l2 > w->length_l1, w->length_l2, "> length_l1"},
        {"save_every", c->save_every >= 0, c->save_every, ">= 0 (0: only the last step)"},
        {"save_total_limit", c->save_total_limit >= 0, c->save_total_limit, ">= 0 (0: keep all)"},
        {"samples_every", c->samples_every >= 0, c->samples_every, ">= 0 (0: never)"},
        {"threads", c->n_threads >= 0, c->n_threads, ">= 0 (0: all cores)"},
    };
#pragma GCC diagnostic pop
    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++) {
        if (!checks[i].ok) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "training setting '%s' must be %s, got %.9g",
                                 checks[i].key, checks[i].rule, checks[i].value);
        }
    }
    return caprl_reward_params_check(&c->reward, err);
}

static caprl_status run_init(rl_run *r, const caprl_rl_config *cfg, caprl_error *err) {
    memset(r, 0, sizeof *r);
    r->cfg = cfg;
    r->perm_epoch = -1;
    CAPRL_TRY(check_config(cfg, err));
    CAPRL_TRY(caprl_qa_set_load(&r->qa, cfg->data, cfg->skip_bad, err));
    CAPRL_TRY(load_policy(cfg, &r->policy, &r->vision, err));
    r->pp = caprl_preprocess_config_default();
    char *pp_path = caprl_path_join(cfg->policy, "preprocessor_config.json");
    caprl_status st = caprl_path_exists(pp_path) ? caprl_preprocess_config_load(&r->pp, pp_path, err) : CAPRL_OK;
    free(pp_path);
    CAPRL_TRY(st);

    caprl_reader_params rp = caprl_reader_default_params();
    char               *tmpl = NULL;
    if (cfg->reader_template) {
        uint8_t *data = NULL;
        size_t   n = 0;
        CAPRL_TRY(caprl_file_read_all(cfg->reader_template, 1 << 20, &data, &n, err));
        tmpl = caprl_xmalloc(n + 1);
        memcpy(tmpl, data, n);
        tmpl[n] = '\0';
        free(data);
        rp.template_text = tmpl;
    }
    rp.max_captions = 8;
    rp.max_sequences = 8 * cfg->reward.n_questions > 64 ? 64 : 8 * cfg->reward.n_questions;
    st = caprl_reader_load(&r->reader, cfg->reader, cfg->n_threads, &rp, err);
    free(tmpl);
    CAPRL_TRY(st);

    const caprl_vision_config *vc = caprl_vision_get_config(r->vision);
    r->patch_dim = vc->in_channels * vc->temporal_patch_size * vc->patch_size * vc->patch_size;
    r->tp = caprl_trainer_default_params();
    r->tp.max_tokens = cfg->micro_batch_tokens;
    r->tp.max_seqs = cfg->micro_batch_tokens / 8 > 1 ? cfg->micro_batch_tokens / 8 : 1;
    /* every image token of a sequence stands for merge^2 patches, so the patches never exceed this */
    r->tp.max_patches = (int64_t)cfg->micro_batch_tokens * vc->spatial_merge_size * vc->spatial_merge_size;
    r->tp.recompute = cfg->recompute;
    r->tp.precision = cfg->precision;
    r->tp.frozen_groups = cfg->frozen_groups;
    CAPRL_TRY(caprl_trainer_init(&r->tr, r->policy, r->vision, &r->tp, err));

    /* OpenRLHF's horizon: episodes x (images x G // train batch), the train batch being B x G / updates_per_rollout
     * samples (at least one step) */
    int64_t per_episode = r->qa.n_images / cfg->rollout_batch;
    r->horizon = cfg->episodes * (per_episode > 0 ? per_episode : 1);
    r->total_steps = cfg->max_steps >= 0 ? cfg->max_steps : r->horizon;
    caprl_adamw_params op = cfg->opt;
    int64_t opt_per_episode = r->qa.n_images * cfg->updates_per_rollout / cfg->rollout_batch;
    op.total_steps = (int32_t)(cfg->episodes * (opt_per_episode > 0 ? opt_per_episode : 1));
    CAPRL_TRY(caprl_adamw_init(&r->opt, r->tr, &op, err));

    if (cfg->rl.kl != CAPRL_KL_OFF && cfg->rl.kl_coef != 0.0f) {
        /* the reference is a frozen copy of the initial policy, loaded only when the KL is on (as OpenRLHF does) */
        CAPRL_TRY(load_policy(cfg, &r->ref_model, &r->ref_vision, err));
        caprl_trainer_params rt = r->tp;
        rt.frozen_groups = CAPRL_GROUP_EMBED | CAPRL_GROUP_TEXT | CAPRL_GROUP_VISION;
        CAPRL_TRY(caprl_trainer_init(&r->ref_tr, r->ref_model, r->ref_vision, &rt, err));
    }

    int32_t B = cfg->rollout_batch, G = cfg->group_size;
    int64_t T = cfg->micro_batch_tokens;
    r->perm = caprl_xcalloc((size_t)r->qa.n_images, sizeof(int64_t));
    r->images = caprl_xcalloc((size_t)B, sizeof(rl_image));
    r->seqs = caprl_xcalloc((size_t)B * G, sizeof(rl_seq));
    r->results = caprl_xcalloc((size_t)B * G, sizeof(caprl_reward_result));
    for (int32_t s = 0; s < B * G; s++) {
        r->seqs[s].resp = caprl_xmalloc((size_t)cfg->max_new_tokens * sizeof(int32_t));
        r->seqs[s].old_lp = caprl_xmalloc((size_t)cfg->max_new_tokens * sizeof(float));
        r->seqs[s].ref_lp = caprl_xmalloc((size_t)cfg->max_new_tokens * sizeof(float));
    }
    r->mb_tokens = caprl_xmalloc((size_t)T * sizeof(int32_t));
    r->mb_target = caprl_xmalloc((size_t)T * sizeof(int32_t));
    r->mb_pos = caprl_xmalloc((size_t)T * 3 * sizeof(int32_t));
    r->mb_seq_start = caprl_xmalloc((size_t)(r->tp.max_seqs + 1) * sizeof(int32_t));
    r->mb_grid = caprl_xmalloc((size_t)r->tp.max_seqs * 3 * sizeof(int32_t));
    r->mb_pixels = caprl_xmalloc((size_t)r->tp.max_patches * (size_t)r->patch_dim * sizeof(float));
    float **fbufs[] = {&r->mb_logp, &r->mb_entropy, &r->mb_dlogp, &r->mb_adv, &r->mb_weight,
                       &r->mb_old,  &r->mb_ref,     &r->mb_lp_tok, &r->mb_dl_tok, &r->mb_dent};
    for (size_t i = 0; i < sizeof fbufs / sizeof fbufs[0]; i++) {
        *fbufs[i] = caprl_xcalloc((size_t)T, sizeof(float));
    }
    return CAPRL_OK;
}

/* ---- one step: images and rollouts ------------------------------------------------------------------------ */

static caprl_status prepare_images(rl_run *r, int64_t step, caprl_error *err) {
    const caprl_rl_config *cfg = r->cfg;
    const caprl_tokenizer *tok = caprl_model_tokenizer(r->policy);
    const caprl_text_config *tc = caprl_model_config(r->policy);
    int32_t merge = caprl_vision_get_config(r->vision)->spatial_merge_size;
    caprl_image_decode_params dp = caprl_image_decode_default_params();
    for (int32_t i = 0; i < cfg->rollout_batch; i++) {
        rl_image *im = &r->images[i];
        caprl_image_free(&im->img);
        caprl_free(im->pixels);
        im->pixels = NULL;
        caprl_vl_prompt_free(&im->prompt);
        im->global = step * cfg->rollout_batch + i;
        im->qa_index = data_index(r, im->global);
        const caprl_qa_image *q = &r->qa.images[im->qa_index];
        caprl_status st = caprl_image_decode_file(q->image, &dp, &im->img, err);
        if (st == CAPRL_OK) {
            st = caprl_image_preprocess(&im->img, &r->pp, &im->pixels, &im->n_patches, im->grid, err);
        }
        if (st != CAPRL_OK) {
            /* the data was checked when the run started; an image that fails now stops the run with its name */
            return caprl_err_set(err, st, "%s (QA record %s, line %lld): %s", q->image, q->id, (long long)q->line,
                                 err->msg);
        }
        int32_t *ids = NULL;
        int64_t  n = 0;
        CAPRL_TRY(caprl_vl_prompt_tokens(tok, cfg->instruction, NULL, &ids, &n, err));
        st = caprl_vl_prompt_init(&im->prompt, ids, n, tc->image_token_id, im->grid, 1, merge, 0, err);
        caprl_free(ids);
        CAPRL_TRY(st);
    }
    return CAPRL_OK;
}

/* A sampled <|image_pad|> ends the caption without being recorded: the trainer reads every <|image_pad|> of a
 * sequence as the slot of an image feature, so a caption holding one could not be trained on (a young policy
 * samples it now and then). The rollout stops that sequence there (it is one of the stop ids) and the caption
 * counts as truncated: its tokens before the pad carry the loss, the stop itself is not scored. */
static bool on_token(int32_t prompt, int32_t sample, int32_t token, void *user) {
    rl_run *r = user;
    rl_seq *s = &r->seqs[prompt * r->cfg->group_size + sample];
    if (token == caprl_model_config(r->policy)->image_token_id) {
        s->cut = true;
    } else if (!s->cut && s->n_resp < r->cfg->max_new_tokens) {
        s->resp[s->n_resp++] = token;
    }
    return true;
}

static caprl_status rollout(rl_run *r, caprl_error *err) {
    const caprl_rl_config *cfg = r->cfg;
    int32_t B = cfg->rollout_batch, G = cfg->group_size;
    caprl_vl_request *reqs = caprl_xcalloc((size_t)B, sizeof *reqs);
    for (int32_t i = 0; i < B; i++) {
        reqs[i].image = &r->images[i].img;
        reqs[i].prompt = cfg->instruction;
        reqs[i].system = NULL;
        reqs[i].stream_id = (uint64_t)r->images[i].global;
    }
    for (int32_t s = 0; s < B * G; s++) {
        r->seqs[s].image = s / G;
        r->seqs[s].n_resp = 0;
        r->seqs[s].cut = false;
    }
    caprl_generate_params gp = caprl_generate_default_params();
    gp.n_samples = G;
    gp.max_new_tokens = cfg->max_new_tokens;
    gp.sampling = caprl_sampling_default_params();
    gp.sampling.do_sample = true;
    gp.sampling.temperature = cfg->temperature;
    gp.sampling.top_p = cfg->top_p;
    gp.sampling.top_k = 0;
    gp.sampling.seed = cfg->seed;
    /* the model's own stop ids, plus <|image_pad|> (on_token) */
    const caprl_generation_config *gc = caprl_model_generation_config(r->policy);
    int32_t                        stop[CAPRL_MAX_EOS + 1];
    memcpy(stop, gc->eos_ids, (size_t)gc->n_eos * sizeof(int32_t));
    stop[gc->n_eos] = caprl_model_config(r->policy)->image_token_id;
    gp.eos_ids = stop;
    gp.n_eos = gc->n_eos + 1;
    int32_t *finish = caprl_xcalloc((size_t)B * G, sizeof(int32_t));
    caprl_status st =
        caprl_vl_generate(r->policy, r->vision, &r->pp, reqs, B, &gp, &r->gen_ctx, on_token, r, finish, NULL, err);
    for (int32_t s = 0; s < B * G && st == CAPRL_OK; s++) {
        r->seqs[s].finish = r->seqs[s].cut ? CAPRL_FINISH_LENGTH : finish[s];
    }
    free(finish);
    free(reqs);
    return st;
}

static caprl_status decode_captions(rl_run *r, caprl_error *err) {
    const caprl_tokenizer *tok = caprl_model_tokenizer(r->policy);
    int32_t n = r->cfg->rollout_batch * r->cfg->group_size;
    for (int32_t s = 0; s < n; s++) {
        rl_seq *q = &r->seqs[s];
        size_t  len = 0;
        CAPRL_TRY(caprl_tokenizer_decode(tok, q->resp, q->n_resp, true, NULL, 0, &len, err));
        free(q->caption);
        q->caption = caprl_xmalloc(len + 1);
        CAPRL_TRY(caprl_tokenizer_decode(tok, q->resp, q->n_resp, true, q->caption, len + 1, &len, err));
        int64_t n_text = -1; /* only the length term reads it */
        if (r->cfg->reward.length_weight > 0.0f) {
            CAPRL_TRY(caprl_tokenizer_encode(tok, q->caption, len, false, NULL, 0, &n_text, err));
        }
        q->n_text = (int32_t)(n_text > INT32_MAX ? INT32_MAX : n_text);
    }
    return CAPRL_OK;
}

static caprl_status score(rl_run *r, int64_t *reader_tokens, caprl_error *err) {
    int32_t n = r->cfg->rollout_batch * r->cfg->group_size;
    caprl_reward_item *items = caprl_xcalloc((size_t)n, sizeof *items);
    for (int32_t s = 0; s < n; s++) {
        const rl_image *im = &r->images[r->seqs[s].image];
        items[s].caption = r->seqs[s].caption;
        items[s].qa = &r->qa.images[im->qa_index];
        items[s].stream_id = (uint64_t)(im->global * r->cfg->group_size + s % r->cfg->group_size);
        items[s].caption_tokens = r->seqs[s].n_text;
        caprl_reward_result_clear(&r->results[s]);
    }
    caprl_status st = caprl_reward_score(r->reader, items, n, &r->cfg->reward, r->results, err);
    free(items);
    CAPRL_TRY(st);
    /* the captions' own tokens: the reader's fixed prefix, run again whenever its context is (re)created (after a
     * resume, or when captions grow), is left out so that the figure is a function of the step alone */
    *reader_tokens = 0;
    for (int32_t s = 0; s < n; s++) {
        r->seqs[s].reward = r->results[s].reward;
        *reader_tokens += r->results[s].reader_tokens;
    }
    return CAPRL_OK;
}

/* ---- micro-batches ------------------------------------------------------------------------------------------ */

static int32_t seq_len(const rl_run *r, const rl_seq *q) {
    return (int32_t)r->images[q->image].prompt.n + q->n_resp;
}

/* Packs seqs list[0..n) (in order) into the micro-batch buffers; the response token k of sequence j is scored at
 * batch position seq_start[j] + P_j - 1 + k. */
static void build_batch(rl_run *r, const int32_t *list, int32_t n, caprl_train_batch *b) {
    int32_t T = 0, n_img = 0;
    int64_t patches = 0;
    for (int32_t j = 0; j < n; j++) {
        T += seq_len(r, &r->seqs[list[j]]);
    }
    r->mb_seq_start[0] = 0;
    for (int32_t j = 0, t0 = 0; j < n; j++) {
        const rl_seq   *q = &r->seqs[list[j]];
        const rl_image *im = &r->images[q->image];
        int32_t         P = (int32_t)im->prompt.n, L = P + q->n_resp;
        for (int32_t t = 0; t < L; t++) {
            int32_t tok = t < P ? im->prompt.ids[t] : q->resp[t - P];
            r->mb_tokens[t0 + t] = tok;
            r->mb_target[t0 + t] = (t >= P - 1 && t < L - 1) ? q->resp[t - P + 1] : -1;
            for (int32_t c = 0; c < 3; c++) {
                r->mb_pos[c * T + t0 + t] = t < P ? im->prompt.mrope_pos[c * P + t] : t + im->prompt.rope_delta;
            }
        }
        memcpy(r->mb_pixels + patches * r->patch_dim, im->pixels, (size_t)im->n_patches * r->patch_dim * sizeof(float));
        patches += im->n_patches;
        memcpy(r->mb_grid + 3 * n_img, im->grid, sizeof im->grid);
        n_img++;
        t0 += L;
        r->mb_seq_start[j + 1] = t0;
    }
    memset(b, 0, sizeof *b);
    b->n_tokens = T;
    b->tokens = r->mb_tokens;
    b->n_seqs = n;
    b->seq_start = r->mb_seq_start;
    b->target = r->mb_target;
    b->n_images = n_img;
    b->pixel_values = r->mb_pixels;
    b->grid_thw = r->mb_grid;
    b->mrope_pos = r->mb_pos;
}

/* Splits list[0..n) into consecutive micro-batches within the trainer's limits; returns their count and writes
 * the first index of each (plus n) to starts. */
static int32_t plan_micro_batches(const rl_run *r, const int32_t *list, int32_t n, int32_t *starts) {
    int32_t count = 0, tokens = 0, seqs = 0;
    int64_t patches = 0;
    for (int32_t j = 0; j < n; j++) {
        const rl_seq *q = &r->seqs[list[j]];
        int32_t       L = seq_len(r, q);
        int64_t       p = r->images[q->image].n_patches;
        if (seqs == 0 || tokens + L > r->tp.max_tokens || seqs + 1 > r->tp.max_seqs ||
            patches + p > r->tp.max_patches) {
            starts[count++] = j;
            tokens = seqs = 0;
            patches = 0;
        }
        tokens += L;
        seqs++;
        patches += p;
    }
    starts[count] = n;
    return count;
}

/* Forward-only log-probs of the response tokens of list[0..n) into each sequence's out (old_lp or ref_lp). */
static caprl_status logprob_pass(rl_run *r, caprl_trainer *tr, const int32_t *list, int32_t n, bool ref,
                                 caprl_error *err) {
    int32_t *starts = caprl_xmalloc((size_t)(n + 1) * sizeof(int32_t));
    int32_t  n_mb = plan_micro_batches(r, list, n, starts);
    caprl_status st = CAPRL_OK;
    for (int32_t m = 0; m < n_mb && st == CAPRL_OK; m++) {
        caprl_train_batch b;
        build_batch(r, list + starts[m], starts[m + 1] - starts[m], &b);
        st = caprl_trainer_forward(tr, &b, r->cfg->temperature, r->mb_logp, NULL, err);
        for (int32_t j = 0; j < b.n_seqs && st == CAPRL_OK; j++) {
            rl_seq *q = &r->seqs[list[starts[m] + j]];
            int32_t P = (int32_t)r->images[q->image].prompt.n, t0 = b.seq_start[j];
            float  *out = ref ? q->ref_lp : q->old_lp;
            memcpy(out, r->mb_logp + t0 + P - 1, (size_t)q->n_resp * sizeof(float));
        }
    }
    free(starts);
    return st;
}

/* ---- the update ---------------------------------------------------------------------------------------------- */

typedef struct update_stats {
    caprl_rl_stats rl;
    double         entropy_sum;
    int64_t        entropy_n;
    double         grad_norm, lr;
    bool           skipped;
} update_stats;

static caprl_status update(rl_run *r, const int32_t *list, int32_t n, bool use_old, update_stats *us,
                           caprl_error *err) {
    const caprl_rl_params *p = &r->cfg->rl;
    /* aggregation over this optimizer step: one global token mean, or a mean over its responses (every response of
     * the step counts in N_seq, a masked one adding 0, as TRL and verl count it) */
    int64_t n_tok = 0;
    for (int32_t j = 0; j < n; j++) {
        n_tok += r->seqs[list[j]].n_loss;
    }
    const double n_seq = (double)n;
    int32_t *starts = caprl_xmalloc((size_t)(n + 1) * sizeof(int32_t));
    int32_t  n_mb = plan_micro_batches(r, list, n, starts);
    caprl_status st = CAPRL_OK;
    for (int32_t m = 0; m < n_mb && st == CAPRL_OK && n_tok > 0; m++) {
        caprl_train_batch b;
        build_batch(r, list + starts[m], starts[m + 1] - starts[m], &b);
        st = caprl_trainer_forward(r->tr, &b, r->cfg->temperature, r->mb_logp, r->mb_entropy, err);
        if (st != CAPRL_OK) {
            break;
        }
        memset(r->mb_dlogp, 0, (size_t)b.n_tokens * sizeof(float));
        memset(r->mb_dent, 0, (size_t)b.n_tokens * sizeof(float));
        for (int32_t j = 0; j < b.n_seqs; j++) {
            const rl_seq *q = &r->seqs[list[starts[m] + j]];
            if (q->n_loss == 0) {
                continue;
            }
            int32_t P = (int32_t)r->images[q->image].prompt.n, t0 = b.seq_start[j] + P - 1;
            double  w = 0.0;
            switch (p->agg) {
            case CAPRL_AGG_SEQ_MEAN_TOKEN_MEAN: w = 1.0 / (n_seq * (double)q->n_loss); break;
            case CAPRL_AGG_SEQ_MEAN_TOKEN_SUM: w = 1.0 / n_seq; break;
            case CAPRL_AGG_SEQ_MEAN_TOKEN_SUM_NORM: w = 1.0 / (n_seq * (double)r->cfg->max_new_tokens); break;
            default: w = 1.0 / (double)n_tok; break;
            }
            for (int32_t k = 0; k < q->n_resp; k++) {
                r->mb_lp_tok[k] = r->mb_logp[t0 + k];
                r->mb_adv[k] = q->adv;
                r->mb_weight[k] = (float)w;
                r->mb_old[k] = use_old ? q->old_lp[k] : r->mb_logp[t0 + k];
                r->mb_ref[k] = r->ref_tr ? q->ref_lp[k] : 0.0f;
                us->entropy_sum += (double)r->mb_entropy[t0 + k];
            }
            us->entropy_n += q->n_resp;
            caprl_rl_token_loss(p, q->n_resp, r->mb_lp_tok, r->mb_old, r->ref_tr ? r->mb_ref : NULL, r->mb_adv,
                                r->mb_weight, r->mb_dl_tok, &us->rl);
            memcpy(r->mb_dlogp + t0, r->mb_dl_tok, (size_t)q->n_resp * sizeof(float));
            if (p->entropy_coef != 0.0f) { /* loss -= c * sum_t w_t H_t: dL/dH_t = -c w_t */
                for (int32_t k = 0; k < q->n_resp; k++) {
                    r->mb_dent[t0 + k] = (float)(-(double)p->entropy_coef * w);
                }
            }
        }
        st = caprl_trainer_backward_entropy(r->tr, r->mb_dlogp, p->entropy_coef != 0.0f ? r->mb_dent : NULL, err);
    }
    free(starts);
    CAPRL_TRY(st);
    caprl_step_info info;
    CAPRL_TRY(caprl_adamw_step(r->opt, 1.0f, &info, err));
    us->grad_norm = (double)info.grad_norm;
    us->lr = (double)info.lr;
    us->skipped = us->skipped || info.skipped;
    return CAPRL_OK;
}

/* ---- files ------------------------------------------------------------------------------------------------- */

static caprl_status append_line(const char *dir, const char *name, const char *line, caprl_error *err) {
    char *path = caprl_path_join(dir, name);
    FILE *f = fopen(path, "a");
    if (!f) {
        caprl_status st = caprl_err_set(err, CAPRL_ERR_IO, "%s: %s", path, strerror(errno));
        free(path);
        return st;
    }
    bool ok = fputs(line, f) >= 0 && fputc('\n', f) != EOF;
    ok = (fclose(f) == 0) && ok;
    caprl_status st = ok ? CAPRL_OK : caprl_err_set(err, CAPRL_ERR_IO, "%s: write failed", path);
    free(path);
    return st;
}

/* Drops the lines of RUN/name whose "step" is above last_step (written after the checkpoint a resumed run starts
 * from), so the files read as if the run had never stopped. */
static caprl_status truncate_after(const char *dir, const char *name, int64_t last_step, caprl_error *err) {
    char *path = caprl_path_join(dir, name);
    if (!caprl_path_exists(path)) {
        free(path);
        return CAPRL_OK;
    }
    uint8_t *data = NULL;
    size_t   n = 0;
    caprl_status st = caprl_file_read_all(path, (size_t)1 << 34, &data, &n, err);
    caprl_atomic_file af;
    if (st == CAPRL_OK) {
        st = caprl_atomic_open(&af, path, err);
    }
    for (size_t i = 0; st == CAPRL_OK && i < n;) {
        size_t e = i;
        while (e < n && data[e] != '\n') {
            e++;
        }
        const char *key = "{\"step\": ";
        long long   s = -1;
        if (e - i > strlen(key) && memcmp(data + i, key, strlen(key)) == 0) {
            s = strtoll((const char *)data + i + strlen(key), NULL, 10);
        }
        if (s >= 0 && s <= last_step && e < n) {
            st = caprl_atomic_write(&af, data + i, e - i + 1, err);
        }
        i = e + 1;
    }
    if (st == CAPRL_OK) {
        st = caprl_atomic_commit(&af, err);
    }
    free(data);
    free(path);
    return st;
}

static char *metrics_line(const caprl_rl_step_metrics *m) {
    char *line = caprl_xmalloc(1024);
    snprintf(line, 1024,
             "{\"step\": %lld, \"reward_mean\": %.6f, \"reward_std\": %.6f, \"reward_std_group\": %.6f, "
             "\"zero_std_frac\": %.4f, "
             "\"caption_len_mean\": %.2f, \"caption_len_max\": %d, \"truncated_frac\": %.4f, \"pg_loss\": %.6g, "
             "\"kl\": %.6g, \"entropy\": %.6f, \"clip_frac\": %.4f, \"clip_frac_lower\": %.4f, \"grad_norm\": %.6g, "
             "\"lr\": %.6g, \"reader_tokens\": %lld, \"seconds_rollout\": %.3f, \"seconds_reward\": %.3f, "
             "\"seconds_update\": %.3f, \"skipped\": %s}",
             (long long)m->step, m->reward_mean, m->reward_std, m->reward_std_group, m->zero_std_frac,
             m->caption_len_mean, m->caption_len_max, m->truncated_frac, m->pg_loss, m->kl, m->entropy, m->clip_frac,
             m->clip_frac_lower,
             m->grad_norm, m->lr, (long long)m->reader_tokens, m->seconds_rollout, m->seconds_reward,
             m->seconds_update, m->skipped ? "true" : "false");
    return line;
}

/* The captions of the step's first two images with their rewards and the questions the reader saw. */
static caprl_status write_samples(rl_run *r, int64_t step, caprl_error *err) {
    int32_t G = r->cfg->group_size, n_img = r->cfg->rollout_batch < 2 ? r->cfg->rollout_batch : 2;
    for (int32_t s = 0; s < n_img * G; s++) {
        const rl_seq              *q = &r->seqs[s];
        const caprl_reward_result *res = &r->results[s];
        const caprl_qa_image      *qa = &r->qa.images[r->images[q->image].qa_index];
        char *caption = caprl_json_quote(q->caption), *id = caprl_json_quote(qa->id),
             *image = caprl_json_quote(qa->image_raw);
        size_t cap = strlen(caption) + strlen(id) + strlen(image) + 256;
        for (int32_t k = 0; k < res->n_questions; k++) {
            cap += 3 * strlen(res->questions[k].text) + 128;
        }
        char  *line = caprl_xmalloc(cap);
        size_t len = (size_t)snprintf(line, cap,
                                      "{\"step\": %lld, \"id\": %s, \"image\": %s, \"sample\": %d, \"reward\": %.6f, "
                                      "\"tokens\": %d, \"caption\": %s, \"questions\": [",
                                      (long long)step, id, image, s % G, (double)res->reward, q->n_resp, caption);
        for (int32_t k = 0; k < res->n_questions; k++) {
            char *text = caprl_json_quote(res->questions[k].text);
            len += (size_t)snprintf(line + len, cap - len, "%s{\"question\": %s, \"gold\": \"%c\", \"score\": %.4f}",
                                    k ? ", " : "", text, res->questions[k].gold, (double)res->questions[k].score);
            free(text);
        }
        snprintf(line + len, cap - len, "]}");
        caprl_status st = append_line(r->cfg->out, "samples.jsonl", line, err);
        free(line);
        free(caption);
        free(id);
        free(image);
        CAPRL_TRY(st);
    }
    return CAPRL_OK;
}

/* ---- the loop ------------------------------------------------------------------------------------------- */

static caprl_status run_step(rl_run *r, int64_t step, caprl_rl_step_metrics *m, caprl_error *err) {
    const caprl_rl_config *cfg = r->cfg;
    int32_t B = cfg->rollout_batch, G = cfg->group_size, N = B * G;
    memset(m, 0, sizeof *m);
    m->step = step + 1;
    double t0 = caprl_seconds_now();
    CAPRL_TRY(prepare_images(r, step, err));
    CAPRL_TRY(rollout(r, err));
    CAPRL_TRY(decode_captions(r, err));
    double t1 = caprl_seconds_now();
    CAPRL_TRY(score(r, &m->reader_tokens, err));
    double t2 = caprl_seconds_now();

    int32_t *all = caprl_xmalloc((size_t)N * sizeof(int32_t));
    for (int32_t s = 0; s < N; s++) {
        all[s] = s;
    }
    bool need_old = cfg->rl.ppo_clip && cfg->updates_per_rollout > 1;
    bool kl_reward = r->ref_tr && cfg->rl.kl_in_reward;
    caprl_status st = CAPRL_OK;
    if (need_old || kl_reward) {
        st = logprob_pass(r, r->tr, all, N, false, err);
    }
    if (st == CAPRL_OK && r->ref_tr) {
        st = logprob_pass(r, r->ref_tr, all, N, true, err);
    }
    float   *rewards = caprl_xmalloc((size_t)N * sizeof(float)), *adv = caprl_xmalloc((size_t)N * sizeof(float));
    int32_t *n_tok = caprl_xmalloc((size_t)N * sizeof(int32_t));
    double   sum = 0.0, ss = 0.0;
    int64_t  len_sum = 0;
    int32_t  truncated = 0;
    for (int32_t s = 0; s < N && st == CAPRL_OK; s++) {
        rl_seq *q = &r->seqs[s];
        rewards[s] = q->reward;
        if (kl_reward) {
            double kl = 0.0;
            for (int32_t k = 0; k < q->n_resp; k++) {
                kl += caprl_kl_estimate(cfg->rl.kl, (double)q->old_lp[k] - (double)q->ref_lp[k]);
            }
            rewards[s] = (float)((double)rewards[s] - (double)cfg->rl.kl_coef * kl);
        }
        sum += (double)q->reward;
        ss += (double)q->reward * (double)q->reward;
        len_sum += q->n_resp;
        m->caption_len_max = q->n_resp > m->caption_len_max ? q->n_resp : m->caption_len_max;
        truncated += q->finish == CAPRL_FINISH_LENGTH;
    }
    if (st == CAPRL_OK) {
        m->reward_mean = sum / N;
        m->reward_std = N > 1 ? sqrt(fmax(0.0, (ss - sum * sum / N) / (N - 1))) : 0.0;
        m->reward_std_group = 0.0;
        for (int32_t g = 0; g < B && G > 1; g++) {
            double gs = 0.0, gss = 0.0;
            for (int32_t i = 0; i < G; i++) {
                double x = (double)r->seqs[g * G + i].reward;
                gs += x;
                gss += x * x;
            }
            m->reward_std_group += sqrt(fmax(0.0, (gss - gs * gs / G) / (G - 1))) / B;
        }
        m->caption_len_mean = (double)len_sum / N;
        m->truncated_frac = (double)truncated / N;
        int32_t zero = caprl_zero_std_groups(rewards, B, G);
        m->zero_std_frac = (double)zero / B;
        caprl_group_advantages(&cfg->rl, rewards, B, G, adv);
        for (int32_t s = 0; s < N; s++) {
            rl_seq      *q = &r->seqs[s];
            const float *gr = rewards + (s / G) * G;
            bool         flat = G > 1; /* verl's filter keeps a group of one */
            for (int32_t i = 1; i < G; i++) {
                flat = flat && gr[i] == gr[0];
            }
            q->keep = !(cfg->dynamic_sampling && flat);
            q->n_loss = (q->keep && !(cfg->rl.mask_truncated && q->finish == CAPRL_FINISH_LENGTH)) ? q->n_resp : 0;
            n_tok[s] = q->n_loss;
        }
        if (cfg->rl.whiten) {
            caprl_whiten_advantages(adv, n_tok, N);
        }
        for (int32_t s = 0; s < N; s++) {
            r->seqs[s].adv = adv[s];
        }
        /* updates_per_rollout mini-batches of whole groups, each one optimizer step */
        update_stats us;
        memset(&us, 0, sizeof us);
        int32_t U = cfg->updates_per_rollout;
        for (int32_t u = 0; u < U && st == CAPRL_OK; u++) {
            int32_t g0 = (int32_t)((int64_t)B * u / U), g1 = (int32_t)((int64_t)B * (u + 1) / U), n = 0;
            for (int32_t s = g0 * G; s < g1 * G; s++) {
                if (r->seqs[s].keep) {
                    all[n++] = s;
                }
            }
            st = update(r, all, n, need_old, &us, err);
        }
        double n_rl = us.rl.n_tokens > 0 ? (double)us.rl.n_tokens : 1.0;
        m->pg_loss = us.rl.pg_loss;
        m->kl = us.rl.kl_sum / n_rl;
        m->clip_frac = us.rl.clip_sum / n_rl;
        m->clip_frac_lower = us.rl.clip_lower_sum / n_rl;
        m->entropy = us.entropy_n ? us.entropy_sum / (double)us.entropy_n : 0.0;
        m->grad_norm = us.grad_norm;
        m->lr = us.lr;
        m->skipped = us.skipped;
    }
    free(all);
    free(rewards);
    free(adv);
    free(n_tok);
    double t3 = caprl_seconds_now();
    m->seconds_rollout = t1 - t0;
    m->seconds_reward = t2 - t1;
    m->seconds_update = t3 - t2;
    return st;
}

/* Writes text to RUN/name atomically. */
static caprl_status write_run_file(const char *dir, const char *name, const char *text, caprl_error *err) {
    char             *path = caprl_path_join(dir, name);
    caprl_atomic_file af;
    caprl_status      st = caprl_atomic_open(&af, path, err);
    if (st == CAPRL_OK) {
        st = caprl_atomic_write(&af, text, strlen(text), err);
    }
    st = st == CAPRL_OK ? caprl_atomic_commit(&af, err) : (caprl_atomic_abort(&af), st);
    free(path);
    return st;
}

/* Checks this call against RUN/name when the run has one: RUN/config.json (fp NULL) or RUN/fingerprints.json. */
static caprl_status check_run_file(const caprl_rl_config *cfg, const char *name, const caprl_rl_fingerprints *fp,
                                   caprl_error *err) {
    char *path = caprl_path_join(cfg->out, name);
    if (!caprl_path_exists(path)) {
        free(path);
        return CAPRL_OK;
    }
    uint8_t     *text = NULL;
    size_t       n = 0;
    caprl_status st = caprl_file_read_all(path, 1 << 20, &text, &n, err);
    if (st == CAPRL_OK) {
        st = fp ? caprl_rl_check_fingerprints(cfg, fp, (const char *)text, n, path, err)
                : caprl_rl_config_check_resume(cfg, (const char *)text, n, path, err);
    }
    free(text);
    free(path);
    return st;
}

/* Before anything in RUN changes: a RUN that holds a run is refused without resume, and with it the run's recorded
 * settings and inputs must be this call's (rl_impl.h). */
static caprl_status check_run_dir(const caprl_rl_config *cfg, bool resume, const caprl_rl_fingerprints *fp,
                                  caprl_error *err) {
    if (!resume) {
        char *metrics = caprl_path_join(cfg->out, "metrics.jsonl");
        bool  used = caprl_checkpoint_latest(cfg->out) >= 0 || caprl_path_exists(metrics);
        free(metrics);
        if (used) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                                 "%s already holds a run; pass --resume to continue it or choose another --out",
                                 cfg->out);
        }
        return CAPRL_OK;
    }
    CAPRL_TRY(check_run_file(cfg, "config.json", NULL, err));
    return fp ? check_run_file(cfg, "fingerprints.json", fp, err) : CAPRL_OK;
}

static caprl_status prepare_run_dir(const caprl_rl_config *cfg, bool resume, const caprl_rl_fingerprints *fp,
                                    int64_t *start_step, rl_run *r, caprl_error *err) {
    *start_step = 0;
    CAPRL_TRY(check_run_dir(cfg, resume, fp, err));
    if (resume) {
        caprl_checkpoint_clean(cfg->out); /* what a killed run left: half-written or half-pruned checkpoints */
        /* a kill between a save and its pruning leaves one checkpoint too many, even when the run is complete */
        caprl_error prune_err = {0};
        if (cfg->save_total_limit > 0 &&
            caprl_checkpoint_prune(cfg->out, cfg->save_total_limit, &prune_err) != CAPRL_OK) {
            LOG_WARN("%s", prune_err.msg); /* as a pruning after a save: not fatal */
        }
    }
    int64_t latest = caprl_checkpoint_latest(cfg->out);
    if (resume && latest >= 0) {
        char *extra = NULL;
        CAPRL_TRY(caprl_checkpoint_load(cfg->out, latest, r->tr, r->opt, &extra, err));
        caprl_free(extra);
        *start_step = latest;
        caprl_log_emit(CAPRL_LOG_INFO, __func__, "resuming %s from step %lld", cfg->out, (long long)latest);
    } else {
        CAPRL_TRY(caprl_mkdir_p(cfg->out, err));
    }
    CAPRL_TRY(truncate_after(cfg->out, "metrics.jsonl", *start_step, err));
    CAPRL_TRY(truncate_after(cfg->out, "samples.jsonl", *start_step, err));
    /* the inputs, then the settings: a run killed between the two resumes with its inputs checked, and a RUN of an
     * older caprl (config.json alone) with its settings checked */
    char *json = caprl_rl_fingerprints_json(cfg, fp);
    caprl_status st = write_run_file(cfg->out, "fingerprints.json", json, err);
    free(json);
    json = NULL;
    if (st == CAPRL_OK) {
        st = caprl_rl_config_to_json(cfg, &json, err);
    }
    if (st == CAPRL_OK) {
        st = write_run_file(cfg->out, "config.json", json, err);
    }
    free(json);
    return st;
}

caprl_status caprl_rl_train(const caprl_rl_config *cfg, bool resume, caprl_rl_step_fn on_step, void *user_data,
                            caprl_error *err) {
    /* the settings are checked before anything is loaded (a refusal is quick), the inputs once the loads have
     * vouched for them (so a missing file is reported as the loader reports it), both before RUN changes */
    CAPRL_TRY(check_config(cfg, err));
    CAPRL_TRY(check_run_dir(cfg, resume, NULL, err));
    rl_run       r;
    caprl_status st = run_init(&r, cfg, err);
    int64_t      step = 0;
    caprl_rl_fingerprints fp;
    if (st == CAPRL_OK) {
        st = caprl_rl_fingerprints_compute(cfg, &fp, err);
    }
    if (st == CAPRL_OK) {
        st = prepare_run_dir(cfg, resume, &fp, &step, &r, err);
    }
    bool stop = false;
    while (st == CAPRL_OK && step < r.total_steps && !stop) {
        caprl_rl_step_metrics m;
        st = run_step(&r, step, &m, err);
        if (st != CAPRL_OK) {
            break;
        }
        step++;
        char *line = metrics_line(&m);
        st = append_line(cfg->out, "metrics.jsonl", line, err);
        free(line);
        if (st == CAPRL_OK && cfg->samples_every > 0 && (step % cfg->samples_every == 0 || step == 1)) {
            st = write_samples(&r, step, err);
        }
        stop = on_step && !on_step(&m, r.total_steps, user_data);
        bool last = step == r.total_steps || stop;
        if (st == CAPRL_OK && ((cfg->save_every > 0 && step % cfg->save_every == 0) || last)) {
            char extra[64];
            snprintf(extra, sizeof extra, "{\"step\": %lld}", (long long)step);
            st = caprl_checkpoint_save(cfg->out, step, r.tr, r.opt, extra, err);
            if (st == CAPRL_OK && cfg->save_total_limit > 0) {
                caprl_checkpoint_prune(cfg->out, cfg->save_total_limit, err);
            }
        }
    }
    run_free(&r);
    return st;
}
