/* The trainer object (caprl/train.h): the flat parameter, gradient and bf16-shadow buffers, the tensor table,
 * binding the model and the vision tower to them, and the activation arena. The training forward and backward
 * live in trainer_decoder.c. */
#include <stdlib.h>
#include <string.h>

#include "caprl/tensor.h"
#include "core/ckmath.h"
#include "core/error_impl.h"
#include "train/train_impl.h"

caprl_trainer_params caprl_trainer_default_params(void) {
    caprl_trainer_params p;
    memset(&p, 0, sizeof p);
    p.max_tokens = 2048;
    p.max_seqs = 64;
    p.max_patches = 16384;
    p.logits_chunk = 256;
    p.recompute = false;
    p.precision = CAPRL_PRECISION_F32;
    p.frozen_groups = 0;
    return p;
}

static caprl_status check_params(const caprl_trainer_params *p, const caprl_model *m, const caprl_vision *v,
                                 caprl_error *err) {
    if (p->max_tokens < 1 || p->max_tokens > (1 << 24) || p->max_seqs < 1 || p->max_seqs > p->max_tokens ||
        p->logits_chunk < 1 || p->logits_chunk > (1 << 20) || p->max_patches < 0 || p->max_patches > (1LL << 28)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "trainer limits out of range: max_tokens %d (1..2^24), max_seqs %d (1..max_tokens), "
                             "logits_chunk %d (1..2^20), max_patches %lld (0..2^28)",
                             p->max_tokens, p->max_seqs, p->logits_chunk, (long long)p->max_patches);
    }
    if (p->precision != CAPRL_PRECISION_F32 && p->precision != CAPRL_PRECISION_BF16) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "trainer precision %d: expected CAPRL_PRECISION_F32 or _BF16",
                             p->precision);
    }
    const int32_t all = CAPRL_GROUP_EMBED | CAPRL_GROUP_TEXT | CAPRL_GROUP_VISION;
    if (p->frozen_groups & ~all) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "trainer frozen_groups 0x%x: unknown group bits",
                             (unsigned)p->frozen_groups);
    }
    const caprl_text_config *c = &m->cfg;
    if (v && (!c->is_vl || caprl_vision_get_config(v)->out_hidden_size != c->hidden_size)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                             "trainer: a vision tower needs a Qwen2.5-VL text model whose hidden size (%d) equals the "
                             "tower's out_hidden_size (%d)",
                             c->hidden_size, caprl_vision_get_config(v)->out_hidden_size);
    }
    return CAPRL_OK;
}

/* ---- layout and tensor table -------------------------------------------------------------------------------- */

static void build_tensor_table(caprl_trainer *tr, const int64_t *text_offsets) {
    const caprl_model *m = tr->m;
    int32_t            n_vis = tr->vision ? vision_train_n_tensors(tr->vision) : 0;
    tr->n_text_tensors = m->n_params;
    tr->n_tensors = m->n_params + n_vis;
    tr->tensors = caprl_xcalloc((size_t)tr->n_tensors, sizeof *tr->tensors);
    for (int32_t i = 0; i < m->n_params; i++) {
        const param_desc *d = &m->params[i];
        caprl_param_info *t = &tr->tensors[i];
        t->name = d->name;
        t->offset = text_offsets[i];
        t->numel = d->shape[0] * d->shape[1];
        t->n_dims = d->kind == PARAM_MATRIX ? 2 : 1;
        t->shape[0] = d->shape[0];
        t->shape[1] = d->kind == PARAM_MATRIX ? d->shape[1] : 0;
        t->group = d->matrix == &m->embed ? CAPRL_GROUP_EMBED : CAPRL_GROUP_TEXT;
    }
    for (int32_t i = 0; i < n_vis; i++) {
        caprl_param_info *t = &tr->tensors[m->n_params + i];
        vision_train_tensor(tr->vision, i, t);
        t->offset += tr->vision_offset;
        t->group = CAPRL_GROUP_VISION;
    }
    /* the decoder's own view: where each tensor it differentiates lives */
    int32_t L = m->cfg.n_layers;
    tr->embed_offset = text_offsets[0];
    tr->layer_offset = caprl_xcalloc((size_t)L * LAYER_TENSORS, sizeof(int64_t));
    for (int32_t l = 0; l < L; l++) {
        for (int32_t j = 0; j < LAYER_TENSORS; j++) {
            tr->layer_offset[(size_t)l * LAYER_TENSORS + (size_t)j] = text_offsets[1 + l * LAYER_TENSORS + j];
        }
    }
    tr->final_norm_offset = text_offsets[1 + L * LAYER_TENSORS];
    tr->lm_head_offset = m->tied ? tr->embed_offset : text_offsets[2 + L * LAYER_TENSORS];
}

/* Allocates the parameter block (masters and, in mixed precision, the bf16 shadow) and the gradients, zeroed. */
static caprl_status alloc_buffers(caprl_trainer *tr, caprl_error *err) {
    size_t n = (size_t)tr->n_params, fbytes = 0, hbytes = 0, total = 0;
    bool   ok = caprl_mul_size(n, sizeof(float), &fbytes) && caprl_mul_size(n, sizeof(uint16_t), &hbytes) &&
              caprl_align_size(hbytes, 64, &hbytes) &&
              caprl_add_size(fbytes, tr->p.precision == CAPRL_PRECISION_BF16 ? hbytes : 0, &total);
    tr->block = ok ? caprl_try_aligned_alloc(total) : NULL;
    tr->grads = ok ? caprl_try_aligned_alloc(fbytes) : NULL;
    if (!tr->block || !tr->grads) {
        return caprl_err_set(err, CAPRL_ERR_OOM,
                             "trainer: cannot allocate %zu bytes of parameters and %zu bytes of gradients "
                             "(%lld parameters)",
                             total, fbytes, (long long)tr->n_params);
    }
    memset(tr->block, 0, total);
    memset(tr->grads, 0, fbytes);
    tr->params = tr->block;
    if (tr->p.precision == CAPRL_PRECISION_BF16) {
        tr->bf16 = (uint16_t *)(void *)((uint8_t *)tr->block + fbytes);
    }
    return CAPRL_OK;
}

/* Points the model and the tower at the new block. The previous block the model adopted (an earlier trainer's)
 * is freed only after both copied their values out of it. */
static caprl_status bind_weights(caprl_trainer *tr, caprl_error *err) {
    caprl_model *m = tr->m;
    void        *old = m->train_block;
    m->train_block = NULL;
    caprl_status st = model_train_bind(m, tr->params, tr->bf16, err);
    if (tr->vision) {
        vision_train_bind(tr->vision, tr->params + tr->vision_offset, tr->bf16 ? tr->bf16 + tr->vision_offset : NULL);
    }
    caprl_aligned_free(old);
    return st;
}

caprl_status caprl_trainer_init(caprl_trainer **out, caprl_model *model, caprl_vision *vision,
                                const caprl_trainer_params *params, caprl_error *err) {
    if (!out || !model) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "trainer init: NULL model");
    }
    caprl_trainer_params p = params ? *params : caprl_trainer_default_params();
    CAPRL_TRY(check_params(&p, model, vision, err));
    if (p.logits_chunk > p.max_tokens) { /* a chunk never holds more rows than a batch has */
        p.logits_chunk = p.max_tokens;
    }
    caprl_trainer *tr = caprl_xcalloc(1, sizeof *tr);
    tr->m = model;
    tr->vision = vision;
    tr->p = p;
    int64_t *text_offsets = caprl_xcalloc((size_t)model->n_params, sizeof(int64_t));
    int64_t  n_text = model_train_layout(model, text_offsets);
    tr->vision_offset = n_text; /* a multiple of CAPRL_TRAIN_ALIGN already */
    tr->n_params = n_text + (vision ? vision_train_n_params(vision) : 0);
    build_tensor_table(tr, text_offsets);
    free(text_offsets);

    caprl_status st = alloc_buffers(tr, err);
    if (st == CAPRL_OK) {
        st = bind_weights(tr, err);
    }
    caprl_arena_plan plan = {0};
    if (st == CAPRL_OK) {
        trainer_layout_activations(tr, &plan);
        if (plan.overflow) {
            st = caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                               "trainer limits too large: activations for max_tokens %d overflow the address space",
                               p.max_tokens);
        }
    }
    if (st == CAPRL_OK) {
        st = caprl_arena_reserve(&tr->arena, "trainer activations", plan.bytes, err);
    }
    if (st == CAPRL_OK) {
        trainer_layout_activations(tr, NULL);
        if (vision) {
            st = vision_train_init(&tr->vt, vision, p.max_patches, p.recompute, err);
        }
    }
    if (st != CAPRL_OK) {
        caprl_trainer_free(tr); /* once bound, the model adopts the block as after any trainer */
        return st;
    }
    *out = tr;
    return CAPRL_OK;
}

void caprl_trainer_free(caprl_trainer *tr) {
    if (!tr) {
        return;
    }
    vision_train_free(tr->vt);
    caprl_arena_free(&tr->arena);
    caprl_aligned_free(tr->grads);
    /* The model keeps running on the trained values: it adopts the block (the tower's weights are in it too). A
     * block the model no longer uses (a later trainer rebound it) is simply freed. */
    if (tr->params && tr->m->train_flat == tr->params) {
        caprl_aligned_free(tr->m->train_block);
        tr->m->train_block = tr->block;
    } else {
        caprl_aligned_free(tr->block);
    }
    free(tr->tensors);
    free(tr->layer_offset);
    free(tr->acts);
    free(tr);
}

/* ---- accessors ------------------------------------------------------------------------------------------------ */

int32_t caprl_trainer_n_tensors(const caprl_trainer *tr) {
    return tr->n_tensors;
}

const caprl_param_info *caprl_trainer_tensor(const caprl_trainer *tr, int32_t i) {
    return i >= 0 && i < tr->n_tensors ? &tr->tensors[i] : NULL;
}

int64_t caprl_trainer_n_params(const caprl_trainer *tr) {
    return tr->n_params;
}

float *caprl_trainer_params_f32(caprl_trainer *tr) {
    return tr->params;
}

float *caprl_trainer_grads(caprl_trainer *tr) {
    return tr->grads;
}

void caprl_trainer_zero_grads(caprl_trainer *tr) {
    memset(tr->grads, 0, (size_t)tr->n_params * sizeof(float));
}

caprl_status caprl_trainer_sync(caprl_trainer *tr, caprl_error *err) {
    CAPRL_TRY(model_train_sync(tr->m, err));
    if (tr->vision) {
        vision_train_sync(tr->vision, tr->params + tr->vision_offset, tr->bf16 ? tr->bf16 + tr->vision_offset : NULL);
    }
    return CAPRL_OK;
}

caprl_status trainer_sync_packed(caprl_trainer *tr, caprl_error *err) {
    CAPRL_TRY(model_train_refresh_packed(tr->m, err));
    if (tr->vision) {
        vision_train_sync_packed(tr->vision);
    }
    return CAPRL_OK;
}

size_t caprl_trainer_activation_bytes(const caprl_trainer *tr) {
    return tr->arena.cap + (tr->vt ? vision_train_bytes(tr->vt) : 0);
}

size_t caprl_trainer_bytes(const caprl_trainer *tr) {
    size_t n = (size_t)tr->n_params;
    size_t per = sizeof(float) * 2 + (tr->bf16 ? sizeof(uint16_t) : 0); /* params, grads, shadow */
    return n * per + caprl_trainer_activation_bytes(tr);
}
