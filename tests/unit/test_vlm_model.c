/* Qwen2.5-VL text decoder and captioning path:
 * - a small random VL checkpoint (text decoder plus a tiny vision tower, written by caprl_vl_model_save and reloaded)
 *   fed a prompt with two images' feature rows spliced at the <|image_pad|> tokens and explicit M-RoPE positions,
 *   checked against an independent float64 forward written here from spec/qwen.md §2.3, §3.9 and §3.10 (embedding
 *   rows replaced at image positions; pair j of a head turned by the position component of j's section, with the
 *   GLOBAL frequency index j). Two controls (ordinary positions; no splice) must disagree with the decoder, so the
 *   test can tell M-RoPE from RoPE and spliced from unspliced. Chunked prefill equals one-shot prefill bit for bit,
 *   and a decode step after the prompt sits at cache index + rope delta;
 * - with t = h = w the VL decoder is bit-identical to the same weights run as a text-only Qwen2 model;
 * - caprl_vl_prompt_init and caprl_vl_encode_images against the lower-level functions, and their errors;
 * - caprl_vl_generate: two different images in one batch give each image's tokens alone (same stream ids), in
 *   either order, identical at 1 and 2 threads; the two samples of one image differ; the image changes the
 *   greedy caption. */
#include <float.h>

#include "caprl/image.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl/tokenizer.h"
#include "caprl/vision.h"
#include "caprl/vlm.h"
#include "caprl_test.h"

enum { PAD = 290, VSTART = 288, VEND = 289, EOS = 300 };

static caprl_text_config text_config(bool vl) {
    caprl_text_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 301;
    c.hidden_size = 64;
    c.intermediate_size = 88;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 16;
    c.max_position_embeddings = 256;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 10000.0;
    c.tie_word_embeddings = false;
    c.bos_token_id = -1;
    c.eos_token_id = EOS;
    c.torch_dtype = -1;
    c.image_token_id = c.vision_start_token_id = c.vision_end_token_id = -1;
    if (vl) {
        c.is_vl = true;
        c.n_mrope_sections = 3; /* t, h, w: 2 + 3 + 3 = head_dim / 2 pairs */
        c.mrope_section[0] = 2;
        c.mrope_section[1] = 3;
        c.mrope_section[2] = 3;
        c.image_token_id = PAD;
        c.vision_start_token_id = VSTART;
        c.vision_end_token_id = VEND;
    }
    return c;
}

static caprl_vision_config tower_config(int32_t out_hidden) {
    caprl_vision_config c;
    memset(&c, 0, sizeof c);
    c.depth = 2;
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_heads = 2;
    c.in_channels = 3;
    c.out_hidden_size = out_hidden;
    c.patch_size = 14;
    c.spatial_merge_size = 2;
    c.temporal_patch_size = 2;
    c.window_size = 56;
    c.n_fullatt = 1;
    c.fullatt_block_indexes[0] = 1;
    c.tokens_per_second = 2.0f;
    return c;
}

#include "ref_qwen2.h"

/* ---- helpers ---------------------------------------------------------------------------------------------- */

static caprl_model *load(const char *dir, int32_t n_threads) {
    caprl_model_params mp = caprl_model_default_params();
    mp.n_threads = n_threads;
    caprl_model *m = NULL;
    caprl_error  err = {0};
    CHECK_OK(caprl_model_load(&m, dir, &mp, &err), &err);
    if (!m) {
        exit(test_finish("test_vlm_model"));
    }
    return m;
}

/* Prefills one sequence in chunks of `chunk` tokens (the M-RoPE rows sliced per chunk) into a fresh context and
 * returns every position's logits (T, V). pos3 and embd_row may be NULL. With ctx_out, the context is kept. */
static float *forward_vl(caprl_model *m, const int32_t *ids, int T, const int32_t *pos3, const int32_t *embd_row,
                         const float *embd, int32_t n_embd, int chunk, caprl_context **ctx_out) {
    caprl_context_params cp = caprl_context_default_params();
    cp.n_ctx = 64;
    cp.n_batch_max = chunk;
    cp.n_logits_max = chunk;
    caprl_context *ctx = NULL;
    caprl_error    err = {0};
    CHECK_OK(caprl_context_init(&ctx, m, &cp, &err), &err);
    int     V = caprl_model_config(m)->vocab_size;
    float  *out = calloc((size_t)T * V, sizeof(float));
    int32_t seq[64] = {0}, slice[3 * 64];
    int8_t  want[64];
    memset(want, 1, sizeof want);
    for (int start = 0; ctx && start < T; start += chunk) {
        int         n = T - start < chunk ? T - start : chunk;
        caprl_batch b = {.n_tokens = n, .tokens = ids + start, .seq_ids = seq, .want_logits = want};
        if (pos3) {
            for (int c = 0; c < 3; c++) {
                memcpy(slice + c * n, pos3 + c * T + start, (size_t)n * sizeof(int32_t));
            }
            b.mrope_pos = slice;
        }
        if (embd_row) {
            b.embd = embd;
            b.n_embd = n_embd;
            b.embd_row = embd_row + start;
        }
        CHECK_OK(caprl_context_decode(ctx, &b, &err), &err);
        for (int r = 0; r < n && caprl_context_logits(ctx, r); r++) {
            memcpy(out + (size_t)(start + r) * V, caprl_context_logits(ctx, r), (size_t)V * sizeof(float));
        }
    }
    if (ctx_out) {
        *ctx_out = ctx;
    } else {
        caprl_context_free(ctx);
    }
    return out;
}

static double max_abs(const double *a, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        m = fmax(m, fabs(a[i]));
    }
    return m;
}

static double max_diff(const float *got, const double *ref, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        m = fmax(m, fabs((double)got[i] - ref[i]));
    }
    return m;
}

/* Deterministic values in [-1, 1). */
static void fill_lcg(float *x, int64_t n, uint32_t seed) {
    for (int64_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)(seed >> 8) / (float)(1u << 23) - 1.0f;
    }
}

/* ---- the decoder against the float64 reference ------------------------------------------------------------ */

/* text, image 0 (grid 1x4x6: 2 x 3 merged tokens), text, image 1 (grid 1x6x2: 3 x 1), text; one pad per image */
static const int32_t k_prompt[17] = {3, 17, 250, 42, 7, VSTART, PAD, VEND, 100, 5, 64, VSTART, PAD, VEND, 11, 12, 13};
static const int32_t k_grids[6] = {1, 4, 6, 1, 6, 2};
enum { K_FIRST_ROW = 1, K_ROWS = 1 + 6 + 3, K_T = 17 + 5 + 2 };

static void check_prompt_init(const caprl_vl_prompt *vp) {
    /* the helper equals the lower-level functions */
    int32_t    *exp_ids = NULL;
    int64_t     n_tok[2] = {6, 3}, n_exp = 0;
    int32_t     pos[3 * K_T], delta = 0;
    caprl_error err = {0};
    CHECK_OK(caprl_vl_expand_image_pads(k_prompt, 17, PAD, n_tok, 2, &exp_ids, &n_exp, &err), &err);
    CHECK_EQ_I64(vp->n, K_T);
    CHECK(n_exp == K_T && exp_ids && memcmp(exp_ids, vp->ids, sizeof(int32_t) * K_T) == 0);
    CHECK_OK(caprl_vl_mrope_positions(exp_ids, K_T, PAD, k_grids, 2, 2, pos, &delta, &err), &err);
    CHECK(memcmp(pos, vp->mrope_pos, sizeof pos) == 0);
    CHECK_EQ_I64(vp->rope_delta, delta);
    /* positions of the spec's rule: image 0 starts at 6 and spans max(2, 3) = 3; image 1 at 12 spans 3 */
    CHECK_EQ_I64(vp->mrope_pos[6 + 5], 6);               /* t of image 0's last token */
    CHECK_EQ_I64(vp->mrope_pos[K_T + 6 + 5], 7);         /* h */
    CHECK_EQ_I64(vp->mrope_pos[2 * K_T + 6 + 5], 8);     /* w */
    CHECK_EQ_I64(vp->mrope_pos[2 * K_T + K_T - 1], 20);  /* the last text token */
    CHECK_EQ_I64(delta, 21 - K_T);
    int row = K_FIRST_ROW;
    for (int t = 0; t < K_T; t++) {
        CHECK(vp->embd_row[t] == (exp_ids[t] == PAD ? row++ : -1));
    }
    CHECK_EQ_I64(row, K_ROWS);
    caprl_free(exp_ids);
    /* the expanded form gives the same prompt */
    caprl_vl_prompt again;
    CHECK_OK(caprl_vl_prompt_init(&again, vp->ids, vp->n, PAD, k_grids, 2, 2, K_FIRST_ROW, &err), &err);
    CHECK(again.n == vp->n && memcmp(again.ids, vp->ids, sizeof(int32_t) * K_T) == 0 &&
          memcmp(again.embd_row, vp->embd_row, sizeof(int32_t) * K_T) == 0 &&
          memcmp(again.mrope_pos, vp->mrope_pos, sizeof(int32_t) * 3 * K_T) == 0);
    caprl_vl_prompt_free(&again);
    caprl_vl_prompt_free(&again); /* twice: safe on a zeroed struct */
    /* errors: pads for another number of images, a grid that is not whole merged tokens, rows past INT32_MAX */
    CHECK(caprl_vl_prompt_init(&again, k_prompt, 17, PAD, k_grids, 1, 2, 0, &err) == CAPRL_ERR_INVALID_ARG);
    CHECK(again.ids == NULL && strstr(err.msg, "image_pad") != NULL);
    const int32_t odd[6] = {1, 4, 6, 1, 5, 2};
    CHECK(caprl_vl_prompt_init(&again, k_prompt, 17, PAD, odd, 2, 2, 0, &err) == CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "image 1") != NULL);
    CHECK(caprl_vl_prompt_init(&again, k_prompt, 17, PAD, k_grids, 2, 2, INT32_MAX - 3, &err) ==
          CAPRL_ERR_INVALID_ARG);
}

static void check_against_reference(const char *dir) {
    caprl_text_config cfg = text_config(true);
    ref_model         r = {cfg, NULL};
    caprl_error       err = {0};
    CHECK_OK(caprl_safetensors_open_dir(&r.st, dir, &err), &err);
    caprl_model *m = load(dir, 2);
    CHECK(caprl_model_config(m)->is_vl && caprl_model_config(m)->mrope_section[1] == 3);
    caprl_vl_prompt vp;
    CHECK_OK(caprl_vl_prompt_init(&vp, k_prompt, 17, PAD, k_grids, 2, 2, K_FIRST_ROW, &err), &err);
    if (!vp.ids || !r.st) {
        exit(test_finish("test_vlm_model"));
    }
    check_prompt_init(&vp);
    /* feature rows of the size of real ones (the tower's output is O(1)), far from the 0.08-std embeddings */
    float *embd = malloc((size_t)K_ROWS * 64 * sizeof(float));
    fill_lcg(embd, (int64_t)K_ROWS * 64, 7);
    int           V = cfg.vocab_size;
    ref_input     in = {vp.ids, K_T, vp.mrope_pos, vp.embd_row, embd};
    double       *ref = ref_forward(&r, &in);
    caprl_context *ctx = NULL;
    float        *got = forward_vl(m, vp.ids, K_T, vp.mrope_pos, vp.embd_row, embd, K_ROWS, 32, &ctx);
    /* Error budget as in test_model.c: f32 rounding (eps = 2^-23) through dot products of length <= 88, two layers;
     * 2000 * eps of the logit scale. */
    double scale = fmax(1.0, max_abs(ref, (int64_t)K_T * V)), tol = 2000 * FLT_EPSILON * scale;
    double diff = max_diff(got, ref, (int64_t)K_T * V);
    CHECK_MSG(diff <= tol, "spliced M-RoPE prompt: max |logit diff| %.3g > %.3g", diff, tol);
    /* controls: ordinary positions, or no splice, must be told apart */
    int32_t plain[3 * K_T];
    for (int c = 0; c < 3; c++) {
        for (int t = 0; t < K_T; t++) {
            plain[c * K_T + t] = t;
        }
    }
    ref_input in_rope = {vp.ids, K_T, plain, vp.embd_row, embd}, in_nosplice = {vp.ids, K_T, vp.mrope_pos, NULL, NULL};
    double   *ref_rope = ref_forward(&r, &in_rope), *ref_nosplice = ref_forward(&r, &in_nosplice);
    double    d_rope = max_diff(got, ref_rope, (int64_t)K_T * V);
    double    d_nosplice = max_diff(got, ref_nosplice, (int64_t)K_T * V);
    CHECK_MSG(d_rope > 20 * tol, "ordinary RoPE positions not told apart: %.3g vs tolerance %.3g", d_rope, tol);
    CHECK_MSG(d_nosplice > 20 * tol, "unspliced embeddings not told apart: %.3g vs tolerance %.3g", d_nosplice, tol);
    fprintf(stderr, "spliced M-RoPE prompt: max |diff| %.3g (tolerance %.3g); controls: RoPE %.3g, no splice %.3g\n",
            diff, tol, d_rope, d_nosplice);
    /* prefill in chunks of 5 (M-RoPE rows sliced) changes no bit */
    float *chunked = forward_vl(m, vp.ids, K_T, vp.mrope_pos, vp.embd_row, embd, K_ROWS, 5, NULL);
    CHECK(memcmp(chunked, got, (size_t)K_T * V * sizeof(float)) == 0);
    /* a decode step after the prompt: cache index K_T at position K_T + delta in all three components */
    int32_t ids1[K_T + 1], pos1[3 * (K_T + 1)], rows1[K_T + 1];
    memcpy(ids1, vp.ids, sizeof(int32_t) * K_T);
    ids1[K_T] = 9;
    memcpy(rows1, vp.embd_row, sizeof(int32_t) * K_T);
    rows1[K_T] = -1;
    for (int c = 0; c < 3; c++) {
        memcpy(pos1 + c * (K_T + 1), vp.mrope_pos + c * K_T, sizeof(int32_t) * K_T);
        pos1[c * (K_T + 1) + K_T] = K_T + vp.rope_delta;
    }
    ref_input in1 = {ids1, K_T + 1, pos1, rows1, embd};
    double   *ref1 = ref_forward(&r, &in1);
    if (ctx) {
        caprl_context_set_rope_delta(ctx, 0, vp.rope_delta);
        int32_t     zero = 0;
        caprl_batch one = {.n_tokens = 1, .tokens = &ids1[K_T], .seq_ids = &zero, .want_logits = NULL};
        CHECK_OK(caprl_context_decode(ctx, &one, &err), &err);
        const float *l = caprl_context_logits(ctx, 0);
        double       d1 = l ? max_diff(l, ref1 + (size_t)K_T * V, V) : INFINITY;
        CHECK_MSG(d1 <= tol, "decode step after the image prompt: max |logit diff| %.3g > %.3g", d1, tol);
    }
    free(ref), free(got), free(ref_rope), free(ref_nosplice), free(chunked), free(ref1), free(embd);
    caprl_context_free(ctx);
    caprl_vl_prompt_free(&vp);
    caprl_model_free(m);
    caprl_safetensors_free(r.st);
}

/* t = h = w: the VL decoder computes ordinary RoPE, so the same weights as a Qwen2 model give the same bits. */
static void check_text_equivalence(const char *vl_dir, const char *text_dir) {
    caprl_model  *vl = load(vl_dir, 2), *txt = load(text_dir, 2);
    const int32_t ids[12] = {5, 17, 299, 0, 42, 42, 100, 7, 250, 3, 64, 128};
    int32_t       pos3[36];
    for (int c = 0; c < 3; c++) {
        for (int t = 0; t < 12; t++) {
            pos3[c * 12 + t] = t;
        }
    }
    int    V = caprl_model_config(vl)->vocab_size;
    float *a = forward_vl(vl, ids, 12, pos3, NULL, NULL, 0, 12, NULL);
    float *b = forward_vl(vl, ids, 12, NULL, NULL, NULL, 0, 12, NULL);
    float *c = forward_vl(txt, ids, 12, NULL, NULL, NULL, 0, 12, NULL);
    CHECK(!caprl_model_config(txt)->is_vl);
    CHECK_MSG(memcmp(a, c, (size_t)12 * V * sizeof(float)) == 0, "VL decoder with t = h = w differs from Qwen2");
    CHECK(memcmp(b, c, (size_t)12 * V * sizeof(float)) == 0);
    free(a), free(b), free(c);
    caprl_model_free(vl);
    caprl_model_free(txt);
}

static void make_checkpoints(const char *vl_dir, const char *text_dir) {
    caprl_text_config   tc = text_config(true), plain = text_config(false);
    caprl_vision_config vc = tower_config(tc.hidden_size);
    caprl_model        *m = NULL, *t = NULL;
    caprl_vision       *v = NULL;
    caprl_error         err = {0};
    CHECK_OK(caprl_model_init_random(&m, &tc, CAPRL_DTYPE_F32, 21, 0.08f, NULL, &err), &err);
    CHECK_OK(caprl_vision_init_random(&v, &vc, CAPRL_DTYPE_F32, 22, 0.1f, 1, &err), &err);
    /* same seed and parameter table: the text-only twin holds the very same weights */
    CHECK_OK(caprl_model_init_random(&t, &plain, CAPRL_DTYPE_F32, 21, 0.08f, NULL, &err), &err);
    if (!m || !v || !t) {
        exit(test_finish("test_vlm_model"));
    }
    CHECK_OK(caprl_vl_model_save(m, v, vl_dir, &err), &err);
    CHECK_OK(caprl_model_save(t, text_dir, &err), &err);
    /* a text model cannot be saved as a VL checkpoint */
    CHECK(caprl_vl_model_save(t, v, text_dir, &err) == CAPRL_ERR_INVALID_ARG);
    caprl_vision *back = NULL;
    CHECK_OK(caprl_vision_load(&back, vl_dir, 1, &err), &err);
    caprl_vision_free(back);
    caprl_model_free(m);
    caprl_model_free(t);
    caprl_vision_free(v);
}

/* ---- image features --------------------------------------------------------------------------------------- */

static void decode_fixture(const char *name, caprl_image *img) {
    char        path[4096];
    caprl_error err = {0};
    snprintf(path, sizeof path, "%s/tests/fixtures/img/%s", CAPRL_SOURCE_DIR, name);
    CHECK_OK(caprl_image_decode_file(path, NULL, img, &err), &err);
    if (!img->data) {
        exit(test_finish("test_vlm_model"));
    }
}

/* caprl_vl_encode_images equals caprl_image_preprocess + caprl_vision_encode image by image. */
static void check_encode_images(caprl_vision *v, const caprl_image *imgs) {
    const caprl_image      *ptrs[2] = {&imgs[0], &imgs[1]};
    caprl_preprocess_config pp = caprl_preprocess_config_default();
    float                  *feats = NULL;
    int32_t                 grids[6] = {0};
    int64_t                 n_tok[2] = {0};
    caprl_error             err = {0};
    CHECK_OK(caprl_vl_encode_images(v, &pp, ptrs, 2, &feats, grids, n_tok, &err), &err);
    int64_t row0 = 0;
    for (int i = 0; i < 2 && feats; i++) {
        float  *pix = NULL;
        int64_t n = 0;
        int32_t g[3];
        CHECK_OK(caprl_image_preprocess(&imgs[i], &pp, &pix, &n, g, &err), &err);
        CHECK(memcmp(g, grids + 3 * i, sizeof g) == 0 && n_tok[i] == n / 4);
        float *alone = malloc((size_t)(n / 4) * 64 * sizeof(float));
        CHECK_OK(caprl_vision_encode(v, pix, n, 1176, g, 1, alone, &err), &err);
        CHECK_MSG(memcmp(alone, feats + row0 * 64, (size_t)(n / 4) * 64 * sizeof(float)) == 0,
                  "image %d: features differ from its own encode", i);
        row0 += n / 4;
        free(alone);
        caprl_free(pix);
    }
    /* the two fixtures have different grids, so the batch really mixes sizes */
    CHECK(memcmp(grids, grids + 3, 3 * sizeof(int32_t)) != 0);
    caprl_free(feats);
    feats = NULL;
    pp.merge_size = 1;
    CHECK(caprl_vl_encode_images(v, &pp, ptrs, 2, &feats, grids, n_tok, &err) == CAPRL_ERR_INVALID_ARG);
    CHECK(feats == NULL && strstr(err.msg, "merge_size") != NULL);
}

/* ---- caprl_vl_generate ------------------------------------------------------------------------------------ */

enum { GEN_MAX = 6 };

typedef struct gen_out {
    int32_t tok[2][2][GEN_MAX]; /* (request, sample, step) */
    int32_t n[2][2];
    int32_t finish[4];
} gen_out;

static bool collect(int32_t prompt, int32_t sample, int32_t token, void *ud) {
    gen_out *o = ud;
    if (o->n[prompt][sample] < GEN_MAX) {
        o->tok[prompt][sample][o->n[prompt][sample]++] = token;
    }
    return true;
}

typedef struct vl_pair {
    caprl_model   *m;
    caprl_vision  *v;
    caprl_context *ctx;
} vl_pair;

static void make_pair(vl_pair *p, int32_t n_threads, const char *tok_path) {
    caprl_text_config tc = text_config(true);
    tc.vocab_size = 151936; /* the Qwen tokenizer's ids */
    tc.eos_token_id = 151645;
    tc.image_token_id = 151655;
    tc.vision_start_token_id = 151652;
    tc.vision_end_token_id = 151653;
    caprl_vision_config vc = tower_config(tc.hidden_size);
    caprl_model_params  mp = caprl_model_default_params();
    mp.n_threads = n_threads;
    caprl_error err = {0};
    memset(p, 0, sizeof *p);
    CHECK_OK(caprl_model_init_random(&p->m, &tc, CAPRL_DTYPE_BF16, 31, 0.1f, &mp, &err), &err);
    CHECK_OK(caprl_vision_init_random(&p->v, &vc, CAPRL_DTYPE_F32, 32, 0.1f, n_threads, &err), &err);
    if (!p->m || !p->v) {
        exit(test_finish("test_vlm_model"));
    }
    CHECK_OK(caprl_model_load_tokenizer(p->m, tok_path, &err), &err);
}

static void free_pair(vl_pair *p) {
    caprl_context_free(p->ctx);
    caprl_vision_free(p->v);
    caprl_model_free(p->m);
}

/* Captions images[order[i]] with stream ids streams[order[i]] in one call; out is indexed by image, not by
 * position in the batch. */
static void generate(vl_pair *p, const caprl_image *imgs, const int *order, int n, const caprl_generate_params *gp,
                     gen_out *out) {
    caprl_preprocess_config pp = caprl_preprocess_config_default();
    static const uint64_t   streams[2] = {10, 20};
    caprl_vl_request        reqs[2];
    gen_out                 o;
    memset(&o, 0, sizeof o);
    for (int i = 0; i < n; i++) {
        reqs[i].image = &imgs[order[i]];
        reqs[i].prompt = "Describe the picture.";
        reqs[i].system = NULL;
        reqs[i].stream_id = streams[order[i]];
    }
    caprl_error err = {0};
    CHECK_OK(caprl_vl_generate(p->m, p->v, &pp, reqs, n, gp, &p->ctx, collect, &o, o.finish, NULL, &err), &err);
    for (int i = 0; i < n; i++) {
        memcpy(out->tok[order[i]], o.tok[i], sizeof o.tok[i]);
        memcpy(out->n[order[i]], o.n[i], sizeof o.n[i]);
        memcpy(out->finish + 2 * order[i], o.finish + 2 * i, 2 * sizeof(int32_t));
    }
}

static bool same_image_out(const gen_out *a, const gen_out *b, int img) {
    return memcmp(a->tok[img], b->tok[img], sizeof a->tok[img]) == 0 &&
           memcmp(a->n[img], b->n[img], sizeof a->n[img]) == 0 &&
           memcmp(a->finish + 2 * img, b->finish + 2 * img, 2 * sizeof(int32_t)) == 0;
}

static void check_generate(const caprl_image *imgs, const char *tok_path) {
    vl_pair p1, p2;
    make_pair(&p1, 1, tok_path);
    make_pair(&p2, 2, tok_path);
    check_encode_images(p1.v, imgs);
    caprl_generate_params gp = caprl_generate_default_params();
    gp.n_samples = 2;
    gp.max_new_tokens = GEN_MAX;
    gp.sampling.do_sample = true;
    gp.sampling.temperature = 1.0f;
    gp.sampling.top_k = 0;
    gp.sampling.seed = 5;
    const int both[2] = {0, 1}, rev[2] = {1, 0}, only0[1] = {0}, only1[1] = {1};
    gen_out   batch, batch_rev, alone, threads2;
    memset(&batch, 0, sizeof batch);
    memset(&batch_rev, 0, sizeof batch_rev);
    memset(&alone, 0, sizeof alone);
    memset(&threads2, 0, sizeof threads2);
    generate(&p1, imgs, both, 2, &gp, &batch);
    generate(&p1, imgs, only0, 1, &gp, &alone);
    generate(&p1, imgs, only1, 1, &gp, &alone);
    generate(&p1, imgs, rev, 2, &gp, &batch_rev);
    generate(&p2, imgs, both, 2, &gp, &threads2);
    for (int img = 0; img < 2; img++) {
        CHECK(batch.n[img][0] >= 1 && batch.n[img][1] >= 1);
        CHECK_MSG(same_image_out(&batch, &alone, img), "image %d: batched tokens differ from the image alone", img);
        CHECK_MSG(same_image_out(&batch, &batch_rev, img), "image %d: batch order changes its tokens", img);
        CHECK_MSG(same_image_out(&batch, &threads2, img), "image %d: 1 and 2 threads differ", img);
        CHECK_MSG(memcmp(batch.tok[img][0], batch.tok[img][1], sizeof batch.tok[img][0]) != 0,
                  "image %d: its two samples are identical", img);
    }
    /* the image reaches the decoder: the greedy captions of the two images differ */
    caprl_generate_params greedy = caprl_generate_default_params();
    greedy.n_samples = 1;
    greedy.sampling.do_sample = false;
    greedy.max_new_tokens = GEN_MAX;
    gen_out g;
    memset(&g, 0, sizeof g);
    generate(&p1, imgs, both, 2, &greedy, &g);
    CHECK_MSG(memcmp(g.tok[0][0], g.tok[1][0], sizeof g.tok[0][0]) != 0, "greedy captions ignore the image");
    free_pair(&p1);
    free_pair(&p2);
}

int main(void) {
    char *base = test_tmpdir("vlm_model");
    char  vl_dir[4096], text_dir[4096], tok_path[4096];
    snprintf(vl_dir, sizeof vl_dir, "%s/vl", base);
    snprintf(text_dir, sizeof text_dir, "%s/text", base);
    make_checkpoints(vl_dir, text_dir);
    check_against_reference(vl_dir);
    check_text_equivalence(vl_dir, text_dir);
    snprintf(tok_path, sizeof tok_path, "%s/data/qwen-tokenizer/tokenizer.json", CAPRL_SHARED_DIR);
    caprl_image imgs[2];
    memset(imgs, 0, sizeof imgs);
    decode_fixture("rgb8.png", &imgs[0]); /* grid 1 x 4 x 6 */
    decode_fixture("px1.png", &imgs[1]);  /* grid 1 x 4 x 4 */
    if (access(tok_path, R_OK) == 0) {
        check_generate(imgs, tok_path);
    } else {
        fprintf(stderr, "test_vlm_model: %s missing: caprl_vl_generate checks skipped\n", tok_path);
    }
    caprl_image_free(&imgs[0]);
    caprl_image_free(&imgs[1]);
    free(base);
    return test_finish("test_vlm_model");
}
