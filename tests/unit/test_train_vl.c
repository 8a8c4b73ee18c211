/* The trainer on a tiny random Qwen2.5-VL (text decoder with M-RoPE + a 2-block vision tower), one image in the
 * first of two packed sequences:
 * - the training forward's log-probabilities equal caprl_context's (features spliced, M-RoPE positions);
 * - text gradients against central finite differences of a float64 reference loss (tests/ref_qwen2.h, M-RoPE,
 *   the image features spliced as doubles);
 * - vision gradients against central finite differences of the same float64 text loss fed with the features
 *   caprl_vision_encode computes from the perturbed tower (f32: the tower's own float64 check is
 *   test_train_vision.c; this one checks the chain through the splice, so its tolerance is looser);
 * - a frozen vision group gets no gradient and leaves the text gradients unchanged; recompute is bit-identical. */
#include <float.h>

#include "caprl/model.h"
#include "caprl/tensor.h"
#include "caprl/train.h"
#include "caprl/vision.h"
#include "caprl/vlm.h"
#include "caprl_test.h"
#include "ref_qwen2.h"

enum { IMG = 50, VSTART = 48, VEND = 49, N_PATCH = 24, PATCH_DIM = 1176, N_FEAT = 6, C_TEXT = 24 };
enum { LEN_A = 11, LEN_B = 5, N_TOK = LEN_A + LEN_B };
static const int32_t k_grid[3] = {1, 4, 6}; /* 24 patches, 2 x 3 merged tokens */
static const int32_t k_tokens[N_TOK] = {3, VSTART, IMG, IMG, IMG, IMG, IMG, IMG, VEND, 17, 9, 22, 5, 38, 5, 12};
static const int32_t k_seq_start[3] = {0, LEN_A, N_TOK};
static const float   k_temp = 0.8f;
static int32_t       g_target[N_TOK], g_pos[3 * N_TOK];
static float         g_dlogp[N_TOK], g_pix[N_PATCH * PATCH_DIM];

static caprl_text_config text_config(void) {
    caprl_text_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 53;
    c.hidden_size = C_TEXT;
    c.intermediate_size = 37;
    c.n_layers = 2;
    c.n_heads = 3;
    c.n_kv_heads = 1;
    c.head_dim = 8;
    c.max_position_embeddings = 64;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = true;
    c.bos_token_id = -1;
    c.eos_token_id = 52;
    c.torch_dtype = -1;
    c.is_vl = true;
    c.n_mrope_sections = 3;
    c.mrope_section[0] = 1;
    c.mrope_section[1] = 1;
    c.mrope_section[2] = 2;
    c.image_token_id = IMG;
    c.vision_start_token_id = VSTART;
    c.vision_end_token_id = VEND;
    return c;
}

static caprl_vision_config vision_config(void) {
    caprl_vision_config c;
    memset(&c, 0, sizeof c);
    c.depth = 2;
    c.hidden_size = 16;
    c.intermediate_size = 24;
    c.num_heads = 2;
    c.in_channels = 3;
    c.out_hidden_size = C_TEXT;
    c.patch_size = 14;
    c.spatial_merge_size = 2;
    c.temporal_patch_size = 2;
    c.window_size = 28; /* one merged token per window in the windowed block */
    c.n_fullatt = 1;
    c.fullatt_block_indexes[0] = 1;
    c.tokens_per_second = 2.0f;
    return c;
}

static void make_data(void) {
    for (int s = 0; s < 2; s++) {
        for (int t = k_seq_start[s]; t < k_seq_start[s + 1]; t++) {
            bool last = t + 1 == k_seq_start[s + 1];
            g_target[t] = last || k_tokens[t + 1] == IMG ? -1 : k_tokens[t + 1]; /* pads are not scored */
        }
    }
    for (int t = 0; t < N_TOK; t++) {
        g_dlogp[t] = (float)(0.4 + 0.1 * ((t * 5) % 7)) * (t % 3 == 2 ? -1.0f : 1.0f);
    }
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < N_PATCH * PATCH_DIM; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        g_pix[i] = (float)((double)(x >> 11) / (double)(1ull << 53) * 2.0 - 1.0);
    }
    /* M-RoPE positions of each sequence, packed */
    int32_t     pa[3 * LEN_A], pb[3 * LEN_B], delta = 0;
    caprl_error err = {0};
    CHECK_OK(caprl_vl_mrope_positions(k_tokens, LEN_A, IMG, k_grid, 1, 2, pa, &delta, &err), &err);
    CHECK_OK(caprl_vl_mrope_positions(k_tokens + LEN_A, LEN_B, IMG, NULL, 0, 2, pb, &delta, &err), &err);
    for (int c = 0; c < 3; c++) {
        memcpy(g_pos + c * N_TOK, pa + c * LEN_A, LEN_A * sizeof(int32_t));
        memcpy(g_pos + c * N_TOK + LEN_A, pb + c * LEN_B, LEN_B * sizeof(int32_t));
    }
}

static caprl_train_batch vl_batch(void) {
    caprl_train_batch b;
    memset(&b, 0, sizeof b);
    b.n_tokens = N_TOK;
    b.tokens = k_tokens;
    b.n_seqs = 2;
    b.seq_start = k_seq_start;
    b.target = g_target;
    b.n_images = 1;
    b.pixel_values = g_pix;
    b.grid_thw = k_grid;
    b.mrope_pos = g_pos;
    return b;
}

typedef struct vl {
    caprl_model   *m;
    caprl_vision  *v;
    caprl_trainer *tr;
} vl;

static vl make_vl(bool recompute, int32_t frozen) {
    vl                  x;
    caprl_text_config   tc = text_config();
    caprl_vision_config vc = vision_config();
    caprl_model_params  mp = caprl_model_default_params();
    mp.n_threads = 2;
    caprl_error err = {0};
    memset(&x, 0, sizeof x);
    CHECK_OK(caprl_model_init_random(&x.m, &tc, CAPRL_DTYPE_F32, 9, 0.25f, &mp, &err), &err);
    CHECK_OK(caprl_vision_init_random(&x.v, &vc, CAPRL_DTYPE_F32, 4, 0.1f, 2, &err), &err);
    caprl_trainer_params p = caprl_trainer_default_params();
    p.max_tokens = N_TOK;
    p.max_seqs = 2;
    p.max_patches = N_PATCH;
    p.logits_chunk = 4;
    p.recompute = recompute;
    p.frozen_groups = frozen;
    if (x.m && x.v) {
        CHECK_OK(caprl_trainer_init(&x.tr, x.m, x.v, &p, &err), &err);
    }
    if (!x.tr) {
        exit(test_finish("test_train_vl"));
    }
    return x;
}

static void vl_free(vl *x) {
    caprl_trainer_free(x->tr);
    caprl_vision_free(x->v);
    caprl_model_free(x->m);
}

static void step(vl *x, float *logp) {
    caprl_train_batch b = vl_batch();
    caprl_error       err = {0};
    CHECK_OK(caprl_trainer_forward(x->tr, &b, k_temp, logp, NULL, &err), &err);
    CHECK_OK(caprl_trainer_backward(x->tr, g_dlogp, &err), &err);
}

static void encode(caprl_vision *v, float *feat) {
    caprl_error err = {0};
    CHECK_OK(caprl_vision_encode(v, g_pix, N_PATCH, PATCH_DIM, k_grid, 1, feat, &err), &err);
}

/* ---- inference parity ------------------------------------------------------------------------------------- */

static void check_parity(vl *x, const float *logp) {
    float feat[N_FEAT * C_TEXT];
    encode(x->v, feat);
    caprl_context_params cp = caprl_context_default_params();
    cp.n_ctx = 16;
    cp.n_batch_max = 16;
    cp.n_logits_max = 16;
    caprl_context *ctx = NULL;
    caprl_error    err = {0};
    CHECK_OK(caprl_context_init(&ctx, x->m, &cp, &err), &err);
    int32_t seq[N_TOK] = {0}, rows[N_TOK], pos[3 * N_TOK];
    int8_t  want[N_TOK];
    memset(want, 1, sizeof want);
    for (int t = 0, r = 0; t < N_TOK; t++) {
        rows[t] = k_tokens[t] == IMG ? r++ : -1;
    }
    for (int s = 0; s < 2 && ctx; s++) {
        int32_t a = k_seq_start[s], n = k_seq_start[s + 1] - a;
        for (int c = 0; c < 3; c++) {
            memcpy(pos + c * n, g_pos + c * N_TOK + a, (size_t)n * sizeof(int32_t));
        }
        caprl_batch b = {.n_tokens = n, .tokens = k_tokens + a, .seq_ids = seq, .want_logits = want,
                         .mrope_pos = pos, .embd = feat, .n_embd = N_FEAT, .embd_row = rows + a};
        caprl_context_seq_clear(ctx, -1);
        CHECK_OK(caprl_context_decode(ctx, &b, &err), &err);
        for (int32_t t = 0; t < n; t++) {
            const float *z = caprl_context_logits(ctx, t);
            double       mx = -INFINITY, sum = 0;
            for (int v = 0; v < 53; v++) {
                mx = fmax(mx, z[v] / (double)k_temp);
            }
            for (int v = 0; v < 53; v++) {
                sum += exp(z[v] / (double)k_temp - mx);
            }
            int32_t tgt = g_target[a + t];
            double  ref = tgt >= 0 ? z[tgt] / (double)k_temp - mx - log(sum) : 0.0;
            CHECK_NEAR(logp[a + t], ref, 0, 64 * FLT_EPSILON * (1 + fabs(ref)));
        }
    }
    caprl_context_free(ctx);
}

/* ---- float64 loss ----------------------------------------------------------------------------------------- */

typedef struct fd_state {
    caprl_text_config cfg;
    ref_param        *params; /* the text tensors as double */
    double          **vals;
    int               n;
    double            feat[N_FEAT * C_TEXT];
} fd_state;

static double ref_loss(const fd_state *s) {
    ref_model r = {s->cfg, NULL};
    double    L = 0;
    g_ref_params = s->params;
    g_ref_n_params = s->n;
    g_ref_embd = s->feat;
    for (int q = 0; q < 2; q++) {
        int     a = k_seq_start[q], T = k_seq_start[q + 1] - a;
        int32_t pos[3 * N_TOK], rows[N_TOK];
        for (int c = 0; c < 3; c++) {
            memcpy(pos + c * T, g_pos + c * N_TOK + a, (size_t)T * sizeof(int32_t));
        }
        for (int t = 0, k = 0; t < T; t++) {
            rows[t] = k_tokens[a + t] == IMG ? k++ : -1; /* only the first sequence has the image */
        }
        ref_input in = {.ids = k_tokens + a, .T = T, .pos3 = pos, .embd_row = rows, .embd = NULL};
        double   *z = ref_forward(&r, &in);
        for (int t = 0; t < T; t++) {
            if (g_target[a + t] < 0) {
                continue;
            }
            double mx = -INFINITY, sum = 0;
            for (int v = 0; v < 53; v++) {
                mx = fmax(mx, z[t * 53 + v] / k_temp);
            }
            for (int v = 0; v < 53; v++) {
                sum += exp(z[t * 53 + v] / k_temp - mx);
            }
            L += g_dlogp[a + t] * (z[t * 53 + g_target[a + t]] / k_temp - mx - log(sum));
        }
        free(z);
    }
    g_ref_params = NULL;
    g_ref_n_params = 0;
    g_ref_embd = NULL;
    return L;
}

static void fd_init(fd_state *s, vl *x) {
    s->cfg = *caprl_model_config(x->m);
    s->n = 0;
    s->params = calloc((size_t)caprl_trainer_n_tensors(x->tr), sizeof *s->params);
    s->vals = calloc((size_t)caprl_trainer_n_tensors(x->tr), sizeof *s->vals);
    const float *flat = caprl_trainer_params_f32(x->tr);
    for (int i = 0; i < caprl_trainer_n_tensors(x->tr); i++) {
        const caprl_param_info *t = caprl_trainer_tensor(x->tr, i);
        if (t->group == CAPRL_GROUP_VISION) {
            continue;
        }
        double *d = malloc((size_t)t->numel * sizeof(double));
        for (int64_t j = 0; j < t->numel; j++) {
            d[j] = flat[t->offset + j];
        }
        s->params[s->n] = (ref_param){t->name, d, t->numel};
        s->vals[s->n++] = d;
    }
    float feat[N_FEAT * C_TEXT];
    encode(x->v, feat);
    for (int i = 0; i < N_FEAT * C_TEXT; i++) {
        s->feat[i] = feat[i];
    }
}

static void fd_free(fd_state *s) {
    for (int i = 0; i < s->n; i++) {
        free(s->vals[i]);
    }
    free(s->params);
    free(s->vals);
}

/* dL/d(element j of text tensor k), float64 throughout */
static double fd_text(fd_state *s, int k, int64_t j) {
    double *d = s->vals[k], p0 = d[j], h = 1e-4 * fmax(1.0, fabs(p0));
    d[j] = p0 + h;
    double lp = ref_loss(s);
    d[j] = p0 - h;
    double lm = ref_loss(s);
    d[j] = p0;
    return (lp - lm) / (2 * h);
}

/* dL/d(flat element e of the tower): the tower re-encodes (f32) on the perturbed live weights */
static double fd_vision(fd_state *s, vl *x, int64_t e) {
    float      *flat = caprl_trainer_params_f32(x->tr), p0 = flat[e], feat[N_FEAT * C_TEXT];
    float       h = 3e-3f * fmaxf(1.0f, fabsf(p0));
    double      L[2];
    caprl_error err = {0};
    double      saved[N_FEAT * C_TEXT];
    memcpy(saved, s->feat, sizeof saved);
    for (int k = 0; k < 2; k++) {
        flat[e] = k == 0 ? p0 + h : p0 - h;
        CHECK_OK(caprl_trainer_sync(x->tr, &err), &err);
        encode(x->v, feat);
        for (int i = 0; i < N_FEAT * C_TEXT; i++) {
            s->feat[i] = feat[i];
        }
        L[k] = ref_loss(s);
    }
    double step2 = (double)(p0 + h) - (double)(p0 - h); /* the step the f32 parameter really took */
    flat[e] = p0;
    CHECK_OK(caprl_trainer_sync(x->tr, &err), &err);
    memcpy(s->feat, saved, sizeof saved);
    return (L[0] - L[1]) / step2;
}

static void check_gradients(void) {
    vl    x = make_vl(false, 0);
    float logp[N_TOK];
    step(&x, logp);
    check_parity(&x, logp);
    const float *g = caprl_trainer_grads(x.tr);
    fd_state     s;
    fd_init(&s, &x);
    double text_scale = 0, vis_scale = 0, text_err = 0, vis_err = 0;
    int    n = caprl_trainer_n_tensors(x.tr), n_vis = 0;
    double an[4 * 64], fd[4 * 64];
    int    kind[4 * 64], tensor[4 * 64], n_samples = 0;
    for (int i = 0, k_text = 0; i < n && n_samples < 4 * 64 - 2; i++) {
        const caprl_param_info *t = caprl_trainer_tensor(x.tr, i);
        bool                    vision = t->group == CAPRL_GROUP_VISION;
        n_vis += vision;
        for (int k = 0; k < 2; k++) {
            int64_t j = (int64_t)(((uint64_t)k * 2654435761u + (uint64_t)i * 40503u + 11u) % (uint64_t)t->numel);
            if (t->group == CAPRL_GROUP_EMBED) {
                j = (int64_t)(k ? 17 : 38) * t->shape[1] + 5 + k; /* rows of scored tokens */
            }
            an[n_samples] = g[t->offset + j];
            fd[n_samples] = vision ? fd_vision(&s, &x, t->offset + j) : fd_text(&s, k_text, j);
            kind[n_samples] = vision;
            tensor[n_samples] = i;
            double *scale = vision ? &vis_scale : &text_scale;
            *scale = fmax(*scale, fabs(fd[n_samples]));
            n_samples++;
        }
        k_text += !vision;
    }
    for (int q = 0; q < n_samples; q++) {
        const caprl_param_info *t = caprl_trainer_tensor(x.tr, tensor[q]);
        double                  d = fabs(an[q] - fd[q]);
        if (kind[q]) {
            /* finite differences of an f32 tower: rounding noise ~1e-7 / 3e-3 of the loss scale */
            vis_err = fmax(vis_err, d / vis_scale);
            CHECK_MSG(d <= 2e-3 * vis_scale + 1e-2 * fabs(fd[q]), "%s: grad %.9g vs fd %.9g", t->name, an[q], fd[q]);
        } else {
            /* float64 differences: as test_train_text.c */
            text_err = fmax(text_err, d / text_scale);
            CHECK_MSG(d <= 2000 * FLT_EPSILON * text_scale + 2e4 * FLT_EPSILON * fabs(fd[q]),
                      "%s: grad %.9g vs fd %.9g", t->name, an[q], fd[q]);
        }
    }
    CHECK(n_vis > 10 && text_scale > 1e-2 && vis_scale > 1e-3);
    fprintf(stderr, "VL finite differences: %d samples; text max error %.3g of %.3g, vision %.3g of %.3g\n", n_samples,
            text_err, text_scale, vis_err, vis_scale);
    fd_free(&s);
    vl_free(&x);
}

static float *grads_of(bool recompute, int32_t frozen, int64_t *n) {
    vl    x = make_vl(recompute, frozen);
    float logp[N_TOK];
    step(&x, logp);
    *n = caprl_trainer_n_params(x.tr);
    float *g = malloc((size_t)*n * sizeof(float));
    memcpy(g, caprl_trainer_grads(x.tr), (size_t)*n * sizeof(float));
    vl_free(&x);
    return g;
}

static void check_frozen_and_recompute(void) {
    int64_t n = 0;
    float  *base = grads_of(false, 0, &n), *rc = grads_of(true, 0, &n);
    float  *fz = grads_of(false, CAPRL_GROUP_VISION, &n);
    CHECK(memcmp(base, rc, (size_t)n * sizeof(float)) == 0);
    vl      x = make_vl(false, 0);
    int64_t vis0 = -1;
    for (int i = 0; i < caprl_trainer_n_tensors(x.tr); i++) {
        const caprl_param_info *t = caprl_trainer_tensor(x.tr, i);
        if (t->group == CAPRL_GROUP_VISION && vis0 < 0) {
            vis0 = t->offset;
        }
    }
    bool vis_zero = true;
    for (int64_t i = vis0; i < n; i++) {
        vis_zero = vis_zero && fz[i] == 0.0f;
    }
    CHECK(vis0 > 0 && vis_zero);
    CHECK(memcmp(base, fz, (size_t)vis0 * sizeof(float)) == 0);
    vl_free(&x);
    free(base);
    free(rc);
    free(fz);
}

int main(void) {
    make_data();
    check_gradients();
    check_frozen_and_recompute();
    return test_finish("test_train_vl");
}
