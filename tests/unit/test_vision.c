/* Qwen2.5-VL vision tower (spec/qwen.md §3):
 * - window_index / cu_window_seqlens against the spec's worked example and against a literal transcription of HF
 *   get_window_index (explicit -100 padding, the (T, nh, ws, nw, ws) permutation, unique_consecutive);
 * - a small random tower saved in exact HF layout (config.json with text fields and vision_config, safetensors
 *   holding text and vision tensors) and loaded back under both naming schemes and in F32, F16 and BF16; its encode
 *   of two images of different sizes (one a 2-frame clip) checked against an independent float64 forward written
 *   here from the spec. The reference never reorders rows: it defines windows spatially (a patch's window is
 *   (frame, hpos / (ws * merge), wpos / (ws * merge))) and reads merged tokens straight off consecutive input rows,
 *   so the C code's window permutation and its inverse are checked, not copied. A control computes the reference
 *   with full attention in every block and must disagree, so the test can tell windows from no windows;
 * - images encoded together bit-identical to each alone; 1 and 2 threads bit-identical; a loaded tower identical
 *   to the object it was saved from;
 * - errors: grids not matching n_patches, odd grids, zero entries, missing / mis-shaped / unexpected tensors, mixed
 *   naming, bad vision_config fields (each error names the field or tensor). */
#include <float.h>

#include "amx_util.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl/vision.h"
#include "caprl_test.h"

#define EPS ((double)FLT_EPSILON)

/* ---- window index ------------------------------------------------------------------------------------------ */

/* HF get_window_index + unique_consecutive, transcribed literally. Returns the number of cu entries. */
static int hf_window_index(int ws, int s, const int32_t *grid, int n_images, int32_t *win, int32_t *cu) {
    int n_cu = 1, n_win = 0, wid = 0;
    int cu_raw[4096], n_raw = 1;
    cu_raw[0] = 0;
    for (int i = 0; i < n_images; i++) {
        int T = grid[3 * i], Lh = grid[3 * i + 1] / s, Lw = grid[3 * i + 2] / s;
        int pad_h = ws - Lh % ws, pad_w = ws - Lw % ws;
        int Ph = Lh + pad_h, Pw = Lw + pad_w, nh = Ph / ws, nw = Pw / ws;
        int *padded = malloc((size_t)(T * Ph * Pw) * sizeof(int));
        for (int t = 0; t < T; t++) {
            for (int y = 0; y < Ph; y++) {
                for (int x = 0; x < Pw; x++) {
                    padded[(t * Ph + y) * Pw + x] = (y < Lh && x < Lw) ? (t * Lh + y) * Lw + x : -100;
                }
            }
        }
        int last = cu_raw[n_raw - 1], cum = 0;
        for (int t = 0; t < T; t++) {
            for (int a = 0; a < nh; a++) {
                for (int b = 0; b < nw; b++) {
                    int cnt = 0;
                    for (int yy = 0; yy < ws; yy++) {
                        for (int xx = 0; xx < ws; xx++) {
                            int v = padded[(t * Ph + a * ws + yy) * Pw + b * ws + xx];
                            if (v != -100) {
                                win[n_win++] = v + wid;
                                cnt++;
                            }
                        }
                    }
                    cum += cnt; /* seqlens.cumsum(0) * U + cu_window_seqlens[-1] */
                    cu_raw[n_raw++] = cum * s * s + last;
                }
            }
        }
        wid += T * Lh * Lw;
        free(padded);
    }
    cu[0] = cu_raw[0];
    for (int i = 1; i < n_raw; i++) {
        if (cu_raw[i] != cu[n_cu - 1]) {
            cu[n_cu++] = cu_raw[i];
        }
    }
    return n_cu;
}

static caprl_vision_config base_config(void) {
    caprl_vision_config c;
    memset(&c, 0, sizeof c);
    c.depth = 4;
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_heads = 2;
    c.in_channels = 3;
    c.out_hidden_size = 24;
    c.patch_size = 14;
    c.spatial_merge_size = 2;
    c.temporal_patch_size = 2;
    c.window_size = 56;
    c.n_fullatt = 1;
    c.fullatt_block_indexes[0] = 2;
    c.tokens_per_second = 2.0f;
    return c;
}

static void test_window_example(void) {
    caprl_vision_config c = base_config();
    c.window_size = 112; /* ws = 112 / 2 / 14 = 4 merged tokens */
    const int32_t grid[3] = {1, 12, 12};
    static const int32_t want[36] = {0,  1,  2,  3,  6,  7,  8,  9,  12, 13, 14, 15, 18, 19, 20, 21, 4,  5,
                                     10, 11, 16, 17, 22, 23, 24, 25, 26, 27, 30, 31, 32, 33, 28, 29, 34, 35};
    static const int32_t want_cu[5] = {0, 64, 96, 128, 144};
    int32_t              win[36], cu[37], n_cu = 0;
    caprl_error          err = {0};
    CHECK_OK(caprl_vision_window_index(&c, grid, 1, win, cu, &n_cu, &err), &err);
    CHECK(memcmp(win, want, sizeof want) == 0);
    CHECK_EQ_I64(n_cu, 5);
    CHECK(memcmp(cu, want_cu, sizeof want_cu) == 0);
}

static void test_window_shapes(void) {
    static const struct {
        int32_t window; /* pixels; ws = window / 28 */
        int     n;
        int32_t grid[9];
    } cases[] = {
        {112, 1, {1, 8, 8}},                 /* Lh = Lw = 4 = ws: HF's extra all-padding row and column */
        {112, 1, {1, 16, 24}},               /* multiples of ws */
        {112, 1, {1, 10, 6}},                /* not multiples, smaller than a window on one side */
        {112, 1, {1, 2, 2}},                 /* one merged token */
        {112, 1, {2, 12, 8}},                /* a 2-frame clip */
        {112, 2, {1, 12, 12, 1, 8, 20}},     /* two images */
        {56, 3, {1, 8, 12, 2, 6, 4, 1, 2, 30}}, /* ws = 2, three images */
        {84, 1, {1, 14, 22}},                /* ws = 3 */
        {100, 1, {1, 10, 10}},               /* window not a multiple of 28: ws = floor(100 / 28) = 3 */
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        caprl_vision_config c = base_config();
        c.window_size = cases[ci].window;
        int n_tok = 0;
        for (int i = 0; i < cases[ci].n; i++) {
            n_tok += cases[ci].grid[3 * i] * cases[ci].grid[3 * i + 1] * cases[ci].grid[3 * i + 2] / 4;
        }
        int32_t    *win = malloc((size_t)n_tok * sizeof(int32_t)), *cu = malloc((size_t)(n_tok + 1) * sizeof(int32_t));
        int32_t    *w2 = malloc((size_t)n_tok * sizeof(int32_t)), *cu2 = malloc(4096 * sizeof(int32_t));
        int32_t     n_cu = 0;
        caprl_error err = {0};
        CHECK_OK(caprl_vision_window_index(&c, cases[ci].grid, cases[ci].n, win, cu, &n_cu, &err), &err);
        int n_cu2 = hf_window_index(c.window_size / 28, 2, cases[ci].grid, cases[ci].n, w2, cu2);
        CHECK_MSG(memcmp(win, w2, (size_t)n_tok * sizeof(int32_t)) == 0, "case %zu: window_index differs", ci);
        CHECK_MSG(n_cu == n_cu2 && memcmp(cu, cu2, (size_t)n_cu * sizeof(int32_t)) == 0,
                  "case %zu: cu_window_seqlens differ (%d vs %d entries)", ci, (int)n_cu, n_cu2);
        CHECK_EQ_I64(cu[n_cu - 1], 4 * n_tok);
        free(win);
        free(cu);
        free(w2);
        free(cu2);
    }
    /* a 4 x 4 grid of merged tokens with ws = 4: one window, the padding windows vanish */
    caprl_vision_config c = base_config();
    c.window_size = 112;
    const int32_t g[3] = {1, 8, 8};
    int32_t       win[16], cu[17], n_cu = 0;
    caprl_error   err = {0};
    CHECK_OK(caprl_vision_window_index(&c, g, 1, win, cu, &n_cu, &err), &err);
    CHECK(n_cu == 2 && cu[0] == 0 && cu[1] == 64);
    for (int i = 0; i < 16; i++) {
        CHECK_EQ_I64(win[i], i);
    }
    const int32_t odd[3] = {1, 7, 8};
    CHECK_STATUS(caprl_vision_window_index(&c, odd, 1, win, cu, &n_cu, &check_err_), CAPRL_ERR_INVALID_ARG);
}

/* ---- checkpoints ------------------------------------------------------------------------------------------- */

/* config.json in the layout of the original Qwen2.5-VL release: text fields at the top, vision_config with the
 * in_chans / spatial_patch_size duplicates. */
static const char k_config_json[] =
    "{\n"
    "  \"architectures\": [\"Qwen2_5_VLForConditionalGeneration\"],\n"
    "  \"model_type\": \"qwen2_5_vl\",\n"
    "  \"hidden_size\": 24, \"intermediate_size\": 40, \"num_hidden_layers\": 1, \"num_attention_heads\": 2,\n"
    "  \"num_key_value_heads\": 1, \"vocab_size\": 10, \"rms_norm_eps\": 1e-06, \"rope_theta\": 1000000.0,\n"
    "  \"tie_word_embeddings\": true, \"torch_dtype\": \"bfloat16\",\n"
    "  \"rope_scaling\": {\"type\": \"mrope\", \"mrope_section\": [2, 2, 2]},\n"
    "  \"vision_start_token_id\": 151652, \"vision_end_token_id\": 151653, \"vision_token_id\": 151654,\n"
    "  \"image_token_id\": 151655, \"video_token_id\": 151656,\n"
    "  \"vision_config\": {\n"
    "    \"depth\": 4, \"hidden_act\": \"silu\", \"hidden_size\": 32, \"intermediate_size\": 48, \"num_heads\": 2,\n"
    "    \"in_chans\": 3, \"out_hidden_size\": 24, \"patch_size\": 14, \"spatial_merge_size\": 2,\n"
    "    \"spatial_patch_size\": 14, \"window_size\": 56, \"fullatt_block_indexes\": [2],\n"
    "    \"tokens_per_second\": 2, \"temporal_patch_size\": 2\n"
    "  }\n"
    "}\n";

static void write_text(const char *dir, const char *name, const char *text) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(text, 1, strlen(text), f) != strlen(text) || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
}

static char *subdir(const char *root, const char *name) {
    char *p = malloc(4200);
    snprintf(p, 4200, "%s/%s", root, name);
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", p);
    if (system(cmd) != 0) {
        exit(1);
    }
    return p;
}

/* A tower's tensors plus two text tensors (which the vision loader must ignore), with the HF config.json. */
static void save_checkpoint(const caprl_vision *v, const char *dir) {
    caprl_error      err = {0};
    caprl_st_writer *w = caprl_st_writer_init();
    static float     embed[10 * 24], norm[24];
    const int64_t    es[2] = {10, 24}, ns[1] = {24};
    CHECK_OK(caprl_vision_add_to_writer(v, w, &err), &err);
    CHECK_OK(caprl_st_writer_add(w, "model.embed_tokens.weight", CAPRL_DTYPE_F32, 2, es, embed, &err), &err);
    CHECK_OK(caprl_st_writer_add(w, "model.norm.weight", CAPRL_DTYPE_F32, 1, ns, norm, &err), &err);
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK_OK(caprl_st_writer_save(w, path, &err), &err);
    caprl_st_writer_free(w);
    write_text(dir, "config.json", k_config_json);
}

typedef enum rewrite_kind {
    RW_NEW_NAMES_F16, /* model.visual.* / model.language_model.*, every tensor converted to F16 */
    RW_DROP,          /* without visual.blocks.1.mlp.up_proj.bias */
    RW_BAD_SHAPE,     /* visual.blocks.0.attn.proj.bias with one element too few */
    RW_EXTRA,         /* plus visual.blocks.7.norm1.weight (depth is 4) */
    RW_MIXED,         /* plus model.visual.merger.ln_q.weight */
} rewrite_kind;

static double read_elem(const caprl_st_tensor *t, int64_t i) {
    const uint8_t *p = t->data;
    if (t->dtype == CAPRL_DTYPE_F32) {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return t->dtype == CAPRL_DTYPE_BF16 ? caprl_bf16_to_f32(h) : caprl_f16_to_f32(h);
}

/* Copies the checkpoint in src to dst with one change. */
static void rewrite(const char *src, const char *dst, rewrite_kind kind) {
    caprl_error        err = {0};
    caprl_safetensors *st = NULL;
    char               path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", src);
    CHECK_OK(caprl_safetensors_open(&st, path, &err), &err);
    if (!st) {
        exit(test_finish("test_vision"));
    }
    caprl_st_writer *w = caprl_st_writer_init();
    int64_t          n = caprl_safetensors_n_tensors(st);
    uint16_t       **conv = calloc((size_t)n + 1, sizeof *conv);
    char             name[256];
    for (int64_t i = 0; i < n; i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(st, i);
        int64_t                shape[8];
        memcpy(shape, t->shape, sizeof shape);
        snprintf(name, sizeof name, "%s", t->name);
        const void *data = t->data;
        int32_t     dtype = t->dtype;
        if (kind == RW_NEW_NAMES_F16) {
            bool vis = strncmp(t->name, "visual.", 7) == 0;
            snprintf(name, sizeof name, "%s%s", vis ? "model." : "model.language_model.", t->name + (vis ? 0 : 6));
            conv[i] = malloc((size_t)t->numel * sizeof(uint16_t));
            for (int64_t j = 0; j < t->numel; j++) {
                conv[i][j] = caprl_f32_to_f16((float)read_elem(t, j));
            }
            data = conv[i];
            dtype = CAPRL_DTYPE_F16;
        }
        if (kind == RW_DROP && strcmp(name, "visual.blocks.1.mlp.up_proj.bias") == 0) {
            continue;
        }
        if (kind == RW_BAD_SHAPE && strcmp(name, "visual.blocks.0.attn.proj.bias") == 0) {
            shape[0] -= 1;
        }
        CHECK_OK(caprl_st_writer_add(w, name, dtype, t->n_dims, shape, data, &err), &err);
    }
    static float  extra[32];
    const int64_t es[1] = {32};
    if (kind == RW_EXTRA) {
        CHECK_OK(caprl_st_writer_add(w, "visual.blocks.7.norm1.weight", CAPRL_DTYPE_F32, 1, es, extra, &err), &err);
    }
    if (kind == RW_MIXED) {
        CHECK_OK(caprl_st_writer_add(w, "model.visual.merger.ln_q.weight", CAPRL_DTYPE_F32, 1, es, extra, &err), &err);
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dst);
    CHECK_OK(caprl_st_writer_save(w, path, &err), &err);
    caprl_st_writer_free(w);
    for (int64_t i = 0; i < n; i++) {
        free(conv[i]);
    }
    free(conv);
    caprl_safetensors_free(st);
    write_text(dst, "config.json", k_config_json);
}

/* ---- float64 reference ------------------------------------------------------------------------------------- */

typedef struct ref_tower {
    caprl_vision_config c;
    caprl_safetensors  *st;
    const char         *prefix; /* "visual." or "model.visual." */
} ref_tower;

/* prefix + "blocks.<l>." + suffix for l >= 0, prefix + suffix otherwise */
static double *tensor_f64(const ref_tower *r, int l, const char *suffix) {
    char name[160];
    if (l >= 0) {
        snprintf(name, sizeof name, "%sblocks.%d.%s", r->prefix, l, suffix);
    } else {
        snprintf(name, sizeof name, "%s%s", r->prefix, suffix);
    }
    const caprl_st_tensor *t = caprl_safetensors_find(r->st, name);
    if (!t) {
        fprintf(stderr, "reference: missing %s\n", name);
        exit(1);
    }
    double *out = malloc((size_t)t->numel * sizeof(double));
    for (int64_t i = 0; i < t->numel; i++) {
        out[i] = read_elem(t, i);
    }
    return out;
}

static void ref_rmsnorm(double *y, const double *x, const double *w, int C) {
    double ss = 0;
    for (int i = 0; i < C; i++) {
        ss += x[i] * x[i];
    }
    double inv = 1.0 / sqrt(ss / C + 1e-6);
    for (int i = 0; i < C; i++) {
        y[i] = x[i] * inv * w[i];
    }
}

/* Set while checking bf16 weights on a CPU whose backend runs bf16 matmuls on a bf16 matrix unit (AMX or
 * AVX512-BF16): the activations entering each weight matmul, and q, k, v and the softmax numerators of the
 * attention, are then rounded to bf16 (nearest even, from f32), in caprl and in this reference alike. */
static bool g_bf16_operands;

static double operand(double x) {
    return g_bf16_operands ? (double)caprl_bf16_to_f32(caprl_f32_to_bf16((float)x)) : x;
}

static void ref_linear(double *y, const double *x, const double *W, const double *b, int N, int K) {
    for (int n = 0; n < N; n++) {
        double s = b ? b[n] : 0.0;
        for (int k = 0; k < K; k++) {
            double xk = operand(x[k]);
            s += xk * W[(size_t)n * K + k];
        }
        y[n] = s;
    }
}

/* Where a pixel_values row sits (§3.3): image, frame, patch row and column. */
typedef struct ref_row {
    int img, t, hpos, wpos;
} ref_row;

static ref_row *ref_rows(const int32_t *grid, int n_images, int N) {
    ref_row *rows = malloc((size_t)N * sizeof *rows);
    int      r = 0;
    for (int i = 0; i < n_images; i++) {
        for (int t = 0; t < grid[3 * i]; t++) {
            for (int bh = 0; bh < grid[3 * i + 1] / 2; bh++) {
                for (int bw = 0; bw < grid[3 * i + 2] / 2; bw++) {
                    for (int mh = 0; mh < 2; mh++) {
                        for (int mw = 0; mw < 2; mw++, r++) {
                            rows[r] = (ref_row){i, t, 2 * bh + mh, 2 * bw + mw};
                        }
                    }
                }
            }
        }
    }
    return rows;
}

/* Same attention segment: the same frame, and with windows also the same ws x ws block of merged tokens. */
static bool same_segment(const ref_row *a, const ref_row *b, bool full, int ws_patches) {
    if (a->img != b->img || a->t != b->t) {
        return false;
    }
    return full || (a->hpos / ws_patches == b->hpos / ws_patches && a->wpos / ws_patches == b->wpos / ws_patches);
}

/* 2-D rotary on one head (§3.5): pair (j, j + D/2); j < D/4 turns by hpos * f_j, D/4 <= j < D/2 by
 * wpos * f_(j - D/4), f_i = 10000^(-2i / (D/2)). */
static void ref_rotary(double *v, int D, const ref_row *row) {
    int q = D / 4;
    for (int j = 0; j < D / 2; j++) {
        int    i = j < q ? j : j - q;
        double ang = (j < q ? row->hpos : row->wpos) * pow(10000.0, -(2.0 * i) / (D / 2));
        double a = v[j], b = v[j + D / 2];
        v[j] = a * cos(ang) - b * sin(ang);
        v[j + D / 2] = b * cos(ang) + a * sin(ang);
    }
}

static void ref_attention(double *x, const ref_tower *r, int l, const ref_row *rows, int N, bool full) {
    const caprl_vision_config *c = &r->c;
    int     C = c->hidden_size, H = c->num_heads, D = C / H;
    int     ws_patches = c->window_size / c->patch_size; /* window side in patches */
    double *n1 = tensor_f64(r, l, "norm1.weight"), *Wqkv = tensor_f64(r, l, "attn.qkv.weight");
    double *bqkv = tensor_f64(r, l, "attn.qkv.bias"), *Wp = tensor_f64(r, l, "attn.proj.weight");
    double *bp = tensor_f64(r, l, "attn.proj.bias");
    double *qkv = malloc((size_t)N * 3 * C * sizeof(double)), *xn = malloc((size_t)C * sizeof(double));
    double *att = malloc((size_t)N * C * sizeof(double)), *sc = malloc((size_t)N * sizeof(double));
    double *o = malloc((size_t)C * sizeof(double));
    for (int m = 0; m < N; m++) {
        ref_rmsnorm(xn, x + (size_t)m * C, n1, C);
        ref_linear(qkv + (size_t)m * 3 * C, xn, Wqkv, bqkv, 3 * C, C);
        for (int h = 0; h < 2 * H; h++) { /* q heads then k heads */
            ref_rotary(qkv + (size_t)m * 3 * C + h * D, D, &rows[m]);
        }
    }
    for (int m = 0; m < N; m++) {
        for (int h = 0; h < H; h++) {
            double mx = -INFINITY, z = 0;
            for (int k = 0; k < N; k++) {
                sc[k] = -INFINITY;
                if (same_segment(&rows[m], &rows[k], full, ws_patches)) {
                    double d = 0;
                    for (int j = 0; j < D; j++) {
                        double qj = operand(qkv[(size_t)m * 3 * C + h * D + j]);
                        d += qj * operand(qkv[(size_t)k * 3 * C + C + h * D + j]);
                    }
                    sc[k] = d / sqrt((double)D);
                    mx = fmax(mx, sc[k]);
                }
            }
            for (int k = 0; k < N; k++) {
                sc[k] = sc[k] == -INFINITY ? 0.0 : exp(sc[k] - mx);
                z += sc[k];
                sc[k] = operand(sc[k]); /* the sum is of the unrounded numerators */
            }
            for (int j = 0; j < D; j++) {
                double s = 0;
                for (int k = 0; k < N; k++) {
                    s += sc[k] / z * operand(qkv[(size_t)k * 3 * C + 2 * C + h * D + j]);
                }
                att[(size_t)m * C + h * D + j] = s;
            }
        }
    }
    for (int m = 0; m < N; m++) {
        ref_linear(o, att + (size_t)m * C, Wp, bp, C, C);
        for (int i = 0; i < C; i++) {
            x[(size_t)m * C + i] += o[i];
        }
    }
    free(n1), free(Wqkv), free(bqkv), free(Wp), free(bp), free(qkv), free(xn), free(att), free(sc), free(o);
}

static void ref_mlp(double *x, const ref_tower *r, int l, int N) {
    int     C = r->c.hidden_size, F = r->c.intermediate_size;
    double *n2 = tensor_f64(r, l, "norm2.weight");
    double *Wg = tensor_f64(r, l, "mlp.gate_proj.weight"), *bg = tensor_f64(r, l, "mlp.gate_proj.bias");
    double *Wu = tensor_f64(r, l, "mlp.up_proj.weight"), *bu = tensor_f64(r, l, "mlp.up_proj.bias");
    double *Wd = tensor_f64(r, l, "mlp.down_proj.weight"), *bd = tensor_f64(r, l, "mlp.down_proj.bias");
    double *xn = malloc((size_t)C * sizeof(double)), *g = malloc((size_t)F * sizeof(double));
    double *u = malloc((size_t)F * sizeof(double)), *o = malloc((size_t)C * sizeof(double));
    for (int m = 0; m < N; m++) {
        ref_rmsnorm(xn, x + (size_t)m * C, n2, C);
        ref_linear(g, xn, Wg, bg, F, C);
        ref_linear(u, xn, Wu, bu, F, C);
        for (int i = 0; i < F; i++) {
            g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
        }
        ref_linear(o, g, Wd, bd, C, F);
        for (int i = 0; i < C; i++) {
            x[(size_t)m * C + i] += o[i];
        }
    }
    free(n2), free(Wg), free(bg), free(Wu), free(bu), free(Wd), free(bd), free(xn), free(g), free(u), free(o);
}

/* out (N/4, out_hidden): merged tokens in input order, which is raster order of each image's merged grid. */
static double *ref_encode(const ref_tower *r, const float *pix, const int32_t *grid, int n_images, int N,
                          bool windows) {
    const caprl_vision_config *c = &r->c;
    int      C = c->hidden_size, K0 = 3 * 2 * 14 * 14, UC = 4 * C, O = c->out_hidden_size, T = N / 4;
    ref_row *rows = ref_rows(grid, n_images, N);
    double  *x = malloc((size_t)N * C * sizeof(double)), *px = malloc((size_t)K0 * sizeof(double));
    double  *Wpe = tensor_f64(r, -1, "patch_embed.proj.weight");
    for (int m = 0; m < N; m++) {
        for (int k = 0; k < K0; k++) {
            px[k] = pix[(size_t)m * K0 + k];
        }
        ref_linear(x + (size_t)m * C, px, Wpe, NULL, C, K0);
    }
    for (int l = 0; l < c->depth; l++) {
        bool full = !windows;
        for (int i = 0; i < c->n_fullatt; i++) {
            full = full || c->fullatt_block_indexes[i] == l;
        }
        ref_attention(x, r, l, rows, N, full);
        ref_mlp(x, r, l, N);
    }
    double *lnq = tensor_f64(r, -1, "merger.ln_q.weight"), *W0 = tensor_f64(r, -1, "merger.mlp.0.weight");
    double *b0 = tensor_f64(r, -1, "merger.mlp.0.bias"), *W2 = tensor_f64(r, -1, "merger.mlp.2.weight");
    double *b2 = tensor_f64(r, -1, "merger.mlp.2.bias");
    double *y = malloc((size_t)UC * sizeof(double)), *h = malloc((size_t)UC * sizeof(double));
    double *out = malloc((size_t)T * O * sizeof(double));
    for (int g = 0; g < T; g++) {
        for (int u = 0; u < 4; u++) {
            ref_rmsnorm(y + u * C, x + (size_t)(4 * g + u) * C, lnq, C);
        }
        ref_linear(h, y, W0, b0, UC, UC);
        for (int i = 0; i < UC; i++) {
            h[i] = 0.5 * h[i] * (1.0 + erf(h[i] / sqrt(2.0)));
        }
        ref_linear(out + (size_t)g * O, h, W2, b2, O, UC);
    }
    free(rows), free(x), free(px), free(Wpe), free(lnq), free(W0), free(b0), free(W2), free(b2), free(y), free(h);
    return out;
}

/* ---- encode tests ------------------------------------------------------------------------------------------ */

/* Image A: 8 x 12 patches (4 x 6 merged, windows of 2 x 2 merged tokens split it into 2 x 3); image B: a 2-frame
 * clip of 6 x 4 patches (3 x 2 merged: a row of half windows). */
static const int32_t k_grid[6] = {1, 8, 12, 2, 6, 4};
enum { N_A = 96, N_B = 48, N_ALL = N_A + N_B, K0 = 1176, OUT = 24 };

static float *make_pixels(void) {
    float   *p = malloc((size_t)N_ALL * K0 * sizeof(float));
    uint64_t s = 0x853c49e6748fea9bull;
    for (int64_t i = 0; i < (int64_t)N_ALL * K0; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = (float)((double)(s >> 40) / (double)(1ull << 24) * 4.0 - 2.0); /* normalized pixels are ~[-2, 2] */
    }
    return p;
}

static caprl_vision *load(const char *dir, int32_t n_threads) {
    caprl_vision *v = NULL;
    caprl_error   err = {0};
    CHECK_OK(caprl_vision_load(&v, dir, n_threads, &err), &err);
    if (!v) {
        exit(test_finish("test_vision"));
    }
    return v;
}

static float *encode(caprl_vision *v, const float *pix, int64_t n, const int32_t *grid, int n_images) {
    float      *out = malloc((size_t)(n / 4) * OUT * sizeof(float));
    caprl_error err = {0};
    CHECK_OK(caprl_vision_encode(v, pix, n, K0, grid, n_images, out, &err), &err);
    return out;
}

/* max |got - ref| / max |ref|. The bound: f32 reductions of up to K0 = 1176 terms round like sqrt(K) eps for
 * random data, and the angles of the rotary are f32 products (HF's rule) where the reference uses exact ones;
 * 4 sqrt(K0) eps (1.6e-5) relative to the largest output leaves a wide margin over the 3e-7 observed, while any
 * structural slip (wrong window, position, order) changes outputs by O(1e-2) or more. */
static double rel_err(const float *got, const double *ref, int64_t n) {
    double mx = 0, md = 0;
    for (int64_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs(ref[i]));
        md = fmax(md, fabs(got[i] - ref[i]));
    }
    return md / mx;
}

static double g_tol;

static void check_vs_reference(const char *dir, const char *prefix, const float *pix, const char *what,
                               bool control) {
    caprl_vision *v = load(dir, 2);
    float        *got = encode(v, pix, N_ALL, k_grid, 2);
    ref_tower     r = {.c = *caprl_vision_get_config(v), .prefix = prefix};
    caprl_error   err = {0};
    char          path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK_OK(caprl_safetensors_open(&r.st, path, &err), &err);
    double *ref = ref_encode(&r, pix, k_grid, 2, N_ALL, true);
    double  e = rel_err(got, ref, (int64_t)N_ALL / 4 * OUT);
    fprintf(stderr, "%s: max error %.3g of max |out| (tolerance %.3g)\n", what, e, g_tol);
    CHECK_MSG(e <= g_tol, "%s: encode differs from the float64 reference by %.3g", what, e);
    if (control) { /* the same reference without windows must be far off, or the test could not see windows */
        double *nowin = ref_encode(&r, pix, k_grid, 2, N_ALL, false);
        double  e2 = rel_err(got, nowin, (int64_t)N_ALL / 4 * OUT);
        fprintf(stderr, "%s: control without windows differs by %.3g\n", what, e2);
        CHECK(e2 > 100 * g_tol);
        free(nowin);
    }
    free(ref);
    free(got);
    caprl_safetensors_free(r.st);
    caprl_vision_free(v);
}

static void test_encode(const char *root) {
    caprl_vision_config c = base_config();
    caprl_error         err = {0};
    g_tol = 4.0 * sqrt((double)K0) * EPS;
    float *pix = make_pixels();

    caprl_vision *v32 = NULL, *v16 = NULL;
    CHECK_OK(caprl_vision_init_random(&v32, &c, CAPRL_DTYPE_F32, 42, 0.15f, 1, &err), &err);
    CHECK_OK(caprl_vision_init_random(&v16, &c, CAPRL_DTYPE_BF16, 43, 0.15f, 2, &err), &err);
    if (!v32 || !v16) {
        exit(test_finish("test_vision"));
    }
    CHECK_EQ_I64(caprl_vision_n_params(v32),
                 32 * K0 + 4 * (32 + 3 * 32 * 32 + 3 * 32 + 32 * 32 + 32 + 32 + 3 * 48 * 32 + 2 * 48 + 32) + 32 +
                     128 * 128 + 128 + 24 * 128 + 24);
    char *d32 = subdir(root, "f32"), *d16 = subdir(root, "bf16"), *dnew = subdir(root, "f16_new_names");
    save_checkpoint(v32, d32);
    save_checkpoint(v16, d16);
    rewrite(d32, dnew, RW_NEW_NAMES_F16);

    check_vs_reference(d32, "visual.", pix, "f32, visual.*", true);
    /* on a bf16 matrix unit the bf16 operands (matmuls and attention) are mirrored in the reference; what remains
     * is operands whose f32 and float64 values round to neighbouring bf16 numbers, amplified through four blocks:
     * budget one bf16 unit roundoff (2^-9) of the output scale (measured with the matmul operands mirrored: 9.1e-4
     * on a Xeon with AMX, 2.1e-3 without the mirror; with the attention's too, 7.3e-4 on AVX512-BF16) */
    g_bf16_operands = default_backend_rounds_bf16();
    double f32_tol = g_tol;
    if (g_bf16_operands) {
        g_tol = ldexp(1.0, -9);
    }
    check_vs_reference(d16, "visual.", pix, "bf16, visual.*", false);
    g_bf16_operands = false;
    g_tol = f32_tol;
    check_vs_reference(dnew, "model.visual.", pix, "f16, model.visual.*", false);
    /* a tower loaded under model.visual.* is written back under the same scheme (its text stack, under
     * model.language_model.*, keeps its names too: one checkpoint, one scheme) */
    {
        caprl_vision *vn = load(dnew, 1);
        char         *dback = subdir(root, "new_names_back");
        save_checkpoint(vn, dback);
        caprl_safetensors *st = NULL;
        CHECK_OK(caprl_safetensors_open_dir(&st, dback, &err), &err);
        CHECK(st && caprl_safetensors_find(st, "model.visual.patch_embed.proj.weight") != NULL);
        CHECK(st && caprl_safetensors_find(st, "visual.patch_embed.proj.weight") == NULL);
        caprl_safetensors_free(st);
        caprl_vision_free(vn);
        free(dback);
    }

    /* a loaded tower computes exactly what the object it was saved from computes */
    caprl_vision *l1 = load(d32, 1), *l2 = load(d32, 2);
    float        *a = encode(v32, pix, N_ALL, k_grid, 2);
    float        *b = encode(l1, pix, N_ALL, k_grid, 2);
    float        *b2 = encode(l2, pix, N_ALL, k_grid, 2);
    CHECK_MSG(memcmp(a, b, (size_t)(N_ALL / 4) * OUT * sizeof(float)) == 0, "loaded tower differs from the saved one");
    CHECK_MSG(memcmp(b, b2, (size_t)(N_ALL / 4) * OUT * sizeof(float)) == 0, "1 and 2 threads differ");
    /* each image alone gives the rows of the batched call, bit for bit */
    float *alone_a = encode(l2, pix, N_A, k_grid, 1);
    float *alone_b = encode(l2, pix + (size_t)N_A * K0, N_B, k_grid + 3, 1);
    CHECK(memcmp(alone_a, b2, (size_t)(N_A / 4) * OUT * sizeof(float)) == 0);
    CHECK(memcmp(alone_b, b2 + (size_t)(N_A / 4) * OUT, (size_t)(N_B / 4) * OUT * sizeof(float)) == 0);
    /* and the reverse order: B then A */
    const int32_t rev[6] = {2, 6, 4, 1, 8, 12};
    float        *pr = malloc((size_t)N_ALL * K0 * sizeof(float));
    memcpy(pr, pix + (size_t)N_A * K0, (size_t)N_B * K0 * sizeof(float));
    memcpy(pr + (size_t)N_B * K0, pix, (size_t)N_A * K0 * sizeof(float));
    float *c2 = encode(l1, pr, N_ALL, rev, 2);
    CHECK(memcmp(c2, alone_b, (size_t)(N_B / 4) * OUT * sizeof(float)) == 0);
    CHECK(memcmp(c2 + (size_t)(N_B / 4) * OUT, alone_a, (size_t)(N_A / 4) * OUT * sizeof(float)) == 0);

    /* bad calls leave out untouched */
    float         sentinel = 12345.0f;
    const int32_t odd[3] = {1, 8, 11}, zero[3] = {1, 0, 12}, short_grid[3] = {1, 8, 8};
    a[0] = sentinel;
    CHECK_STATUS(caprl_vision_encode(l1, pix, N_ALL, K0, k_grid, 1, a, &check_err_), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_vision_encode(l1, pix, 88, K0, odd, 1, a, &check_err_), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_vision_encode(l1, pix, 0, K0, zero, 1, a, &check_err_), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_vision_encode(l1, pix, N_A, K0, short_grid, 1, a, &check_err_), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_vision_encode(l1, pix, N_A, K0, k_grid, 0, a, &check_err_), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_vision_encode(l1, pix, N_A, 3 * 2 * 16 * 16, k_grid, 1, a, &check_err_), CAPRL_ERR_INVALID_ARG);
    CHECK_STATUS(caprl_vision_encode(l1, NULL, N_A, K0, k_grid, 1, a, &check_err_), CAPRL_ERR_INVALID_ARG);
    CHECK(a[0] == sentinel);
    caprl_error e2 = {0};
    caprl_vision_encode(l1, pix, 88, K0, odd, 1, a, &e2);
    CHECK_MSG(strstr(e2.msg, "multiples of spatial_merge_size") != NULL, "%s", e2.msg);
    caprl_vision_encode(l1, pix, N_ALL, K0, k_grid, 1, a, &e2);
    CHECK_MSG(strstr(e2.msg, "n_patches") != NULL, "%s", e2.msg);
    caprl_vision_encode(l1, pix, N_A, 1536, k_grid, 1, a, &e2);
    CHECK_MSG(strstr(e2.msg, "1536 values") != NULL && strstr(e2.msg, "= 1176") != NULL, "%s", e2.msg);

    free(a), free(b), free(b2), free(alone_a), free(alone_b), free(pr), free(c2), free(pix);
    caprl_vision_free(l1);
    caprl_vision_free(l2);
    caprl_vision_free(v32);
    caprl_vision_free(v16);
    free(d16), free(dnew);

    /* checkpoint errors */
    static const struct {
        rewrite_kind kind;
        caprl_status code;
        const char  *needle;
    } bad[] = {
        {RW_DROP, CAPRL_ERR_FORMAT, "visual.blocks.1.mlp.up_proj.bias' not found"},
        {RW_BAD_SHAPE, CAPRL_ERR_FORMAT, "visual.blocks.0.attn.proj.bias': shape"},
        {RW_EXTRA, CAPRL_ERR_UNSUPPORTED, "visual.blocks.7.norm1.weight"},
        {RW_MIXED, CAPRL_ERR_FORMAT, "both 'visual.'"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char name[32];
        snprintf(name, sizeof name, "bad%zu", i);
        char *d = subdir(root, name);
        rewrite(d32, d, bad[i].kind);
        caprl_vision *v = NULL;
        caprl_error   e = {0};
        CHECK_EQ_I64(caprl_vision_load(&v, d, 1, &e), bad[i].code);
        CHECK(v == NULL);
        CHECK_MSG(strstr(e.msg, bad[i].needle) != NULL, "message '%s' lacks '%s'", e.msg, bad[i].needle);
        free(d);
    }
    caprl_vision *v = NULL;
    caprl_error   e = {0};
    char         *none = subdir(root, "none");
    CHECK_EQ_I64(caprl_vision_load(&v, none, 1, &e), CAPRL_ERR_IO); /* no config.json */
    write_text(none, "config.json", k_config_json);
    CHECK_EQ_I64(caprl_vision_load(&v, none, 1, &e), CAPRL_ERR_IO); /* no safetensors */
    free(none);
    free(d32);
}

/* ---- config ------------------------------------------------------------------------------------------------ */

/* Parses k_config_json with the vision_config entry `from` replaced by `to`. */
static caprl_status parse_edit(const char *from, const char *to, caprl_vision_config *cfg, caprl_error *err) {
    char        buf[4096];
    const char *at = strstr(k_config_json, from);
    if (!at) {
        fprintf(stderr, "test bug: '%s' not in the config\n", from);
        exit(1);
    }
    snprintf(buf, sizeof buf, "%.*s%s%s", (int)(at - k_config_json), k_config_json, to, at + strlen(from));
    return caprl_vision_config_parse(cfg, buf, strlen(buf), "config.json", err);
}

static void test_config(void) {
    caprl_vision_config c, want = base_config();
    caprl_error         err = {0};
    CHECK_OK(caprl_vision_config_parse(&c, k_config_json, strlen(k_config_json), "config.json", &err), &err);
    CHECK(memcmp(&c, &want, sizeof c) == 0);

    /* to_json parses back to the same struct (3B-shaped tower) */
    caprl_vision_config big = want;
    big.depth = 32, big.hidden_size = 1280, big.intermediate_size = 3420, big.num_heads = 16;
    big.out_hidden_size = 2048, big.window_size = 112, big.n_fullatt = 4;
    for (int i = 0; i < 4; i++) {
        big.fullatt_block_indexes[i] = 8 * i + 7;
    }
    char *json = NULL;
    CHECK_OK(caprl_vision_config_to_json(&big, &json, &err), &err);
    char *doc = malloc(strlen(json) + 64);
    sprintf(doc, "{\"model_type\": \"qwen2_5_vl\", \"vision_config\": %s}", json);
    CHECK_OK(caprl_vision_config_parse(&c, doc, strlen(doc), "written", &err), &err);
    CHECK(memcmp(&c, &big, sizeof c) == 0);
    free(doc);
    caprl_free(json);

    /* defaults for optional fields */
    CHECK_OK(parse_edit("\"window_size\": 56, ", "", &c, &err), &err);
    CHECK(c.window_size == 112);
    caprl_error ed = {0}; /* the default [7, 15, 23, 31] does not fit depth 4 */
    CHECK(parse_edit("\"fullatt_block_indexes\": [2],", "", &c, &ed) == CAPRL_ERR_FORMAT);
    CHECK_MSG(strstr(ed.msg, "entry 0 is 7") != NULL, "%s", ed.msg);
    CHECK_OK(parse_edit("\"depth\": 4, \"hidden_act\": \"silu\", \"hidden_size\": 32, \"intermediate_size\": 48, "
                        "\"num_heads\": 2,\n    \"in_chans\": 3,",
                        "\"depth\": 32, \"hidden_size\": 32, \"intermediate_size\": 48, \"num_heads\": 2,", &c, &err),
             &err);
    CHECK(c.depth == 32 && c.n_fullatt == 1 && c.in_channels == 3);

    static const struct {
        const char  *from, *to;
        caprl_status code;
        const char  *needle;
    } bad[] = {
        {"\"num_heads\": 2", "\"num_heads\": 0", CAPRL_ERR_FORMAT, "vision_config.num_heads"},
        {"\"num_heads\": 2", "\"num_heads\": 3", CAPRL_ERR_FORMAT, "does not divide hidden_size"},
        {"\"num_heads\": 2", "\"num_heads\": 16", CAPRL_ERR_FORMAT, "multiple of 4"}, /* head_dim 2 */
        {"\"hidden_size\": 32", "\"hidden_size\": 20", CAPRL_ERR_FORMAT, "multiple of 4"},
        {"\"depth\": 4,", "", CAPRL_ERR_FORMAT, "vision_config.depth': missing"},
        {"[2]", "[4]", CAPRL_ERR_FORMAT, "fullatt_block_indexes"},
        {"[2]", "[2, 2]", CAPRL_ERR_FORMAT, "listed twice"},
        {"[2]", "[\"2\"]", CAPRL_ERR_FORMAT, "fullatt_block_indexes"},
        {"\"window_size\": 56", "\"window_size\": 27", CAPRL_ERR_FORMAT, "vision_config.window_size"},
        {"\"hidden_act\": \"silu\"", "\"hidden_act\": \"quick_gelu\"", CAPRL_ERR_UNSUPPORTED, "hidden_act"},
        {"\"depth\": 4,", "\"depth\": 4, \"embed_dim\": 1280,", CAPRL_ERR_UNSUPPORTED, "Qwen2-VL"},
        {"\"patch_size\": 14", "\"patch_size\": -14", CAPRL_ERR_FORMAT, "vision_config.patch_size"},
        {"\"model_type\": \"qwen2_5_vl\"", "\"model_type\": \"qwen2_vl\"", CAPRL_ERR_UNSUPPORTED, "model_type"},
        {"\"vision_config\"", "\"vision_cfg\"", CAPRL_ERR_FORMAT, "vision_config': missing"},
        {"\"tokens_per_second\": 2", "\"tokens_per_second\": -1", CAPRL_ERR_FORMAT, "tokens_per_second"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        caprl_error e = {0};
        c = want;
        caprl_status st = parse_edit(bad[i].from, bad[i].to, &c, &e);
        CHECK_MSG(st == bad[i].code, "case %zu: status %d, want %d (%s)", i, (int)st, (int)bad[i].code, e.msg);
        CHECK_MSG(strstr(e.msg, bad[i].needle) != NULL, "case %zu: message '%s' lacks '%s'", i, e.msg,
                  bad[i].needle);
        CHECK(memcmp(&c, &want, sizeof c) == 0); /* untouched on error */
    }
    /* unknown keys only warn */
    CHECK_OK(parse_edit("\"depth\": 4,", "\"depth\": 4, \"fancy_new_field\": 1,", &c, &err), &err);

    /* code-built configs get the same checks, and random init refuses bad ones */
    caprl_vision_config b = want;
    b.spatial_merge_size = 0;
    CHECK_STATUS(caprl_vision_config_check(&b, &check_err_), CAPRL_ERR_FORMAT);
    caprl_vision *v = NULL;
    CHECK_STATUS(caprl_vision_init_random(&v, &b, CAPRL_DTYPE_F32, 1, 0.1f, 1, &check_err_), CAPRL_ERR_FORMAT);
    CHECK_STATUS(caprl_vision_init_random(&v, &want, CAPRL_DTYPE_F16, 1, 0.1f, 1, &check_err_),
                 CAPRL_ERR_INVALID_ARG);
    CHECK(v == NULL);
}

static void test_flops(void) {
    caprl_vision_config c = base_config();
    c.depth = 32, c.hidden_size = 1280, c.intermediate_size = 3420, c.num_heads = 16, c.out_hidden_size = 2048;
    c.window_size = 112, c.n_fullatt = 4;
    for (int i = 0; i < 4; i++) {
        c.fullatt_block_indexes[i] = 8 * i + 7;
    }
    const int32_t grid[3] = {1, 32, 32};
    double        N = 1024, C = 1280, F = 3420;
    double        mm = 2 * N * C * 1176 + 32 * 2 * N * (4 * C * C + 3 * F * C) + 2 * 256 * (5120.0 * 5120 + 5120.0 * 2048);
    /* 16 x 16 merged grid in 4 x 4 windows: 16 windows of 64 patches */
    double att = 4 * C * (4 * N * N + 28 * 16 * 64.0 * 64);
    CHECK_NEAR(caprl_vision_encode_flops(&c, grid, 1), mm + att, 1e-12, 0);
    int64_t np = 0, nt = 0;
    caprl_error err = {0};
    CHECK_OK(caprl_vision_count(&c, grid, 1, &np, &nt, &err), &err);
    CHECK(np == 1024 && nt == 256);
}

int main(void) {
    test_window_example();
    test_window_shapes();
    test_config();
    test_flops();
    char *root = test_tmpdir("test_vision");
    test_encode(root);
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    if (g_test_failures == 0 && system(cmd) != 0) {
        fprintf(stderr, "could not remove %s\n", root);
    }
    free(root);
    return test_finish("test_vision");
}
