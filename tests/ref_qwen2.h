/* A float64 Qwen2 / Qwen2.5-VL text decoder written from spec/qwen.md §2 and §3.10 for the tests: it reads the
 * tensors straight from the safetensors file (not through caprl's model code) and computes the logits of one
 * sequence with explicit (t, h, w) positions and optional embedding rows spliced in. Ordinary RoPE is the case
 * of a non-VL config (one section) or equal t, h, w. */
#ifndef CAPRL_REF_QWEN2_H
#define CAPRL_REF_QWEN2_H

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amx_util.h"
#include "caprl/model.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"

/* ---- float64 reference ------------------------------------------------------------------------------------ */

typedef struct ref_model {
    caprl_text_config  c;
    caprl_safetensors *st;
} ref_model;

/* Gradient checks perturb parameters in double: while g_ref_params is set, a tensor named there is taken from it
 * (its numel values) instead of the safetensors file (st may then be NULL), and g_ref_embd, when set, replaces
 * ref_input.embd as the spliced rows (image features computed in double). Tests set and clear these around
 * their calls. */
typedef struct ref_param {
    const char   *name;
    const double *data;
    int64_t       numel;
} ref_param;

static const ref_param *g_ref_params;
static int              g_ref_n_params;
static const double    *g_ref_embd;

/* Set while checking a bf16 model on a CPU whose backend runs bf16 matmuls on AMX: there the activations entering
 * every weight matmul are rounded to bf16 (nearest even, from their f32 value) before the product, and the
 * reference does the same so that it keeps testing the arithmetic rather than the rounding. */
static bool g_ref_bf16_operands;

static double ref_operand(double x) {
    return g_ref_bf16_operands ? (double)caprl_bf16_to_f32(caprl_f32_to_bf16((float)x)) : x;
}

static double *tensor_f64(const ref_model *r, const char *name) {
    for (int i = 0; i < g_ref_n_params; i++) {
        if (strcmp(g_ref_params[i].name, name) == 0) {
            double *out = malloc((size_t)g_ref_params[i].numel * sizeof(double));
            memcpy(out, g_ref_params[i].data, (size_t)g_ref_params[i].numel * sizeof(double));
            return out;
        }
    }
    const caprl_st_tensor *t = r->st ? caprl_safetensors_find(r->st, name) : NULL;
    if (!t) {
        fprintf(stderr, "reference: missing %s\n", name);
        exit(1);
    }
    double        *out = malloc((size_t)t->numel * sizeof(double));
    const uint8_t *p = t->data;
    for (int64_t i = 0; i < t->numel; i++) {
        if (t->dtype == CAPRL_DTYPE_F32) {
            float f;
            memcpy(&f, p + 4 * i, 4);
            out[i] = f;
        } else {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            out[i] = t->dtype == CAPRL_DTYPE_BF16 ? caprl_bf16_to_f32(h) : caprl_f16_to_f32(h);
        }
    }
    return out;
}

static double *layer_tensor(const ref_model *r, int l, const char *suffix) {
    char name[128];
    snprintf(name, sizeof name, "model.layers.%d.%s", l, suffix);
    return tensor_f64(r, name);
}

static void ref_rmsnorm(double *y, const double *x, const double *w, int C, double eps) {
    double ss = 0;
    for (int i = 0; i < C; i++) {
        ss += x[i] * x[i];
    }
    double inv = 1.0 / sqrt(ss / C + eps);
    for (int i = 0; i < C; i++) {
        y[i] = x[i] * inv * w[i];
    }
}

static void ref_linear(double *y, const double *x, const double *W, const double *b, int N, int K) {
    for (int n = 0; n < N; n++) {
        double s = b ? b[n] : 0.0;
        for (int k = 0; k < K; k++) {
            s += ref_operand(x[k]) * W[(size_t)n * K + k];
        }
        y[n] = s;
    }
}

/* M-RoPE of one token (spec §3.10): pair (j, j + D/2) uses the position of the section j falls in, (t, h, w) =
 * pos[0..2], and the frequency of the global index j. sections == NULL: one section, ordinary RoPE at pos[0]. */
static void ref_mrope(double *x, int H, int D, const int pos[3], const int32_t *sections, int n_sections,
                      double theta) {
    for (int h = 0; h < H; h++) {
        double *v = x + h * D;
        int     s = 0, end = sections ? sections[0] : D / 2;
        for (int j = 0; j < D / 2; j++) {
            while (j >= end) {
                s++;
                end += s < n_sections ? sections[s] : D / 2;
            }
            double inv = 1.0 / pow(theta, (2.0 * j) / D), ang = pos[s] * inv;
            double a = v[j], b = v[j + D / 2];
            v[j] = a * cos(ang) - b * sin(ang);
            v[j + D / 2] = b * cos(ang) + a * sin(ang);
        }
    }
}

/* The inputs of one reference run: ids (T), positions (3, T) as t, h, w rows, and the rows of embd (hidden wide)
 * that replace the embeddings where embd_row[t] >= 0 (embd_row NULL: no splice). */
typedef struct ref_input {
    const int32_t *ids;
    int            T;
    const int32_t *pos3;
    const int32_t *embd_row;
    const float   *embd;
} ref_input;

static void ref_attention(const ref_model *r, double *x, const double *q, const double *k, const double *v,
                          const double *Wo, int T) {
    const caprl_text_config *c = &r->c;
    int     C = c->hidden_size, D = c->head_dim, H = c->n_heads, Hk = c->n_kv_heads;
    double *sc = calloc((size_t)T, sizeof(double)), *att = calloc((size_t)H * D, sizeof(double));
    double *tmp = calloc((size_t)C, sizeof(double));
    for (int t = 0; t < T; t++) {
        for (int h = 0; h < H; h++) {
            int           kh = h / (H / Hk);
            double        mx = -INFINITY, z = 0;
            const double *qh = q + ((size_t)t * H + h) * D;
            for (int s = 0; s <= t; s++) {
                double d = 0;
                for (int j = 0; j < D; j++) {
                    d += qh[j] * k[((size_t)s * Hk + kh) * D + j];
                }
                sc[s] = d / sqrt((double)D);
                mx = fmax(mx, sc[s]);
            }
            for (int s = 0; s <= t; s++) {
                sc[s] = exp(sc[s] - mx);
                z += sc[s];
            }
            for (int j = 0; j < D; j++) {
                double o = 0;
                for (int s = 0; s <= t; s++) {
                    o += sc[s] / z * v[((size_t)s * Hk + kh) * D + j];
                }
                att[h * D + j] = o;
            }
        }
        ref_linear(tmp, att, Wo, NULL, C, H * D);
        for (int i = 0; i < C; i++) {
            x[(size_t)t * C + i] += tmp[i];
        }
    }
    free(sc), free(att), free(tmp);
}

static void ref_mlp(const ref_model *r, double *x, int l, int T) {
    const caprl_text_config *c = &r->c;
    int     C = c->hidden_size, F = c->intermediate_size;
    double *w_post = layer_tensor(r, l, "post_attention_layernorm.weight");
    double *Wg = layer_tensor(r, l, "mlp.gate_proj.weight"), *Wu = layer_tensor(r, l, "mlp.up_proj.weight");
    double *Wd = layer_tensor(r, l, "mlp.down_proj.weight");
    double *xn = calloc((size_t)C, sizeof(double)), *g = calloc((size_t)F, sizeof(double));
    double *u = calloc((size_t)F, sizeof(double)), *tmp = calloc((size_t)C, sizeof(double));
    for (int t = 0; t < T; t++) {
        ref_rmsnorm(xn, x + (size_t)t * C, w_post, C, c->rms_norm_eps);
        ref_linear(g, xn, Wg, NULL, F, C);
        ref_linear(u, xn, Wu, NULL, F, C);
        for (int i = 0; i < F; i++) {
            g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
        }
        ref_linear(tmp, g, Wd, NULL, C, F);
        for (int i = 0; i < C; i++) {
            x[(size_t)t * C + i] += tmp[i];
        }
    }
    free(w_post), free(Wg), free(Wu), free(Wd), free(xn), free(g), free(u), free(tmp);
}

/* logits (T, V) of one sequence, full causal forward in float64 */
static double *ref_forward(const ref_model *r, const ref_input *in) {
    const caprl_text_config *c = &r->c;
    int     T = in->T, C = c->hidden_size, V = c->vocab_size, D = c->head_dim, H = c->n_heads, Hk = c->n_kv_heads;
    double *E = tensor_f64(r, "model.embed_tokens.weight");
    double *x = calloc((size_t)T * C, sizeof(double)), *xn = calloc((size_t)C, sizeof(double));
    double *q = calloc((size_t)T * H * D, sizeof(double)), *k = calloc((size_t)T * Hk * D, sizeof(double));
    double *v = calloc((size_t)T * Hk * D, sizeof(double));
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < C; i++) {
            bool spliced = in->embd_row && in->embd_row[t] >= 0;
            size_t e = spliced ? (size_t)in->embd_row[t] * C + i : 0;
            x[(size_t)t * C + i] = !spliced    ? E[(size_t)in->ids[t] * C + i]
                                   : g_ref_embd ? g_ref_embd[e]
                                                : (double)in->embd[e];
        }
    }
    const int32_t *sections = c->is_vl ? c->mrope_section : NULL;
    for (int l = 0; l < c->n_layers; l++) {
        double *w_in = layer_tensor(r, l, "input_layernorm.weight");
        double *Wq = layer_tensor(r, l, "self_attn.q_proj.weight"), *bq = layer_tensor(r, l, "self_attn.q_proj.bias");
        double *Wk = layer_tensor(r, l, "self_attn.k_proj.weight"), *bk = layer_tensor(r, l, "self_attn.k_proj.bias");
        double *Wv = layer_tensor(r, l, "self_attn.v_proj.weight"), *bv = layer_tensor(r, l, "self_attn.v_proj.bias");
        double *Wo = layer_tensor(r, l, "self_attn.o_proj.weight");
        for (int t = 0; t < T; t++) {
            int pos[3] = {in->pos3[t], in->pos3[T + t], in->pos3[2 * T + t]};
            ref_rmsnorm(xn, x + (size_t)t * C, w_in, C, c->rms_norm_eps);
            ref_linear(q + (size_t)t * H * D, xn, Wq, bq, H * D, C);
            ref_linear(k + (size_t)t * Hk * D, xn, Wk, bk, Hk * D, C);
            ref_linear(v + (size_t)t * Hk * D, xn, Wv, bv, Hk * D, C);
            ref_mrope(q + (size_t)t * H * D, H, D, pos, sections, c->n_mrope_sections, c->rope_theta);
            ref_mrope(k + (size_t)t * Hk * D, Hk, D, pos, sections, c->n_mrope_sections, c->rope_theta);
        }
        ref_attention(r, x, q, k, v, Wo, T);
        ref_mlp(r, x, l, T);
        free(w_in), free(Wq), free(bq), free(Wk), free(bk), free(Wv), free(bv), free(Wo);
    }
    double *wn = tensor_f64(r, "model.norm.weight");
    double *lm = c->tie_word_embeddings ? E : tensor_f64(r, "lm_head.weight");
    double *logits = malloc((size_t)T * V * sizeof(double));
    for (int t = 0; t < T; t++) {
        ref_rmsnorm(xn, x + (size_t)t * C, wn, C, c->rms_norm_eps);
        ref_linear(logits + (size_t)t * V, xn, lm, NULL, V, C);
    }
    if (lm != E) {
        free(lm);
    }
    free(E), free(wn), free(x), free(xn), free(q), free(k), free(v);
    return logits;
}

#endif /* CAPRL_REF_QWEN2_H */
