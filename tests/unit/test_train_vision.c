/* Training pass of the Qwen2.5-VL vision tower (src/train/vision_train.c), on a tiny random tower: 3 blocks (block
 * 1 with full attention, the others in windows of 2 x 2 merged tokens), hidden 32, 4 heads of 8, and two images of
 * different grids (8 x 12 patches: six windows; a 2-frame clip of 6 x 4 patches: half windows, two frames; the
 * finite differences use 4 x 8 patches in place of 8 x 12).
 * - the parameter table: names, offsets, shapes; the bind copies every tensor exactly (checked against what the
 *   tower saved before binding), and a save after binding writes the same bytes in the stored dtypes (F32, BF16
 *   without and with a bf16 shadow, a loaded checkpoint under "model.visual." names), then the live values;
 * - the training forward against caprl_vision_encode on the same live weights (f32 and bf16 mixed precision);
 * - gradients of sampled elements of every tensor for L = sum(features * R) against central finite differences of
 *   an independent float64 forward written here from the spec. The reference never reorders rows: a patch's
 *   attention segment is its frame, and within window blocks also its ws x ws block of merged tokens, so the window
 *   permutation, its inverse and the positions of the C code are checked, not copied;
 * - recompute on and off, 1 and 2 threads: features and gradients bit-identical; a second forward / backward adds
 *   exactly the same gradients again (+=);
 * - errors: too many patches, bad grids, backward without forward, a second backward, max_patches out of range. */
#include <float.h>

#include "amx_util.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl_test.h"
#include "model/vision_impl.h"
#include "train/vision_train_impl.h"

#define EPS ((double)FLT_EPSILON)

static const int32_t k_grid[6] = {1, 8, 12, 2, 6, 4};
enum { N_ALL = 96 + 48, T_ALL = N_ALL / 4, K0 = 1176, OUT = 24, DEPTH = 3, CV = 32, FV = 40 };

/* The finite differences use smaller images (the float64 forward runs some 170 times): 4 x 8 patches (two
 * windows) and a 2-frame clip of 6 x 4 patches (a whole and a half window per frame). */
static const int32_t k_grid_fd[6] = {1, 4, 8, 2, 6, 4};
enum { N_FD = 32 + 48, T_FD = N_FD / 4 };

static caprl_vision_config tiny_config(void) {
    caprl_vision_config c;
    memset(&c, 0, sizeof c);
    c.depth = DEPTH;
    c.hidden_size = CV;
    c.intermediate_size = FV;
    c.num_heads = 4;
    c.in_channels = 3;
    c.out_hidden_size = OUT;
    c.patch_size = 14;
    c.spatial_merge_size = 2;
    c.temporal_patch_size = 2;
    c.window_size = 56; /* 2 x 2 merged tokens */
    c.n_fullatt = 1;
    c.fullatt_block_indexes[0] = 1;
    c.tokens_per_second = 2.0f;
    return c;
}

static uint64_t g_lcg = 0x853c49e6748fea9bull;

static double uniform(double lo, double hi) {
    g_lcg = g_lcg * 6364136223846793005ull + 1442695040888963407ull;
    return lo + (hi - lo) * (double)(g_lcg >> 11) / (double)(1ull << 53);
}

static float *random_floats(int64_t n, double lo, double hi) {
    float *p = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        p[i] = (float)uniform(lo, hi);
    }
    return p;
}

static caprl_vision *tower(int32_t dtype, uint64_t seed, int32_t n_threads) {
    caprl_vision_config c = tiny_config();
    caprl_vision       *v = NULL;
    caprl_error         err = {0};
    CHECK_OK(caprl_vision_init_random(&v, &c, dtype, seed, 0.15f, n_threads, &err), &err);
    if (!v) {
        exit(test_finish("test_train_vision"));
    }
    return v;
}

static float *encode(caprl_vision *v, const float *pix) {
    float      *out = malloc((size_t)T_ALL * OUT * sizeof(float));
    caprl_error err = {0};
    CHECK_OK(caprl_vision_encode(v, pix, N_ALL, K0, k_grid, 2, out, &err), &err);
    return out;
}

/* One training forward + backward with L = sum(features * R): features and gradients (fresh buffers). */
typedef struct pass {
    float *features;
    float *grads;
} pass;

static pass train_pass_grid(caprl_vision *v, const float *pix, const float *R, bool recompute, const int32_t *grid,
                            int64_t n_tokens) {
    pass          p = {calloc((size_t)n_tokens * OUT, sizeof(float)), calloc((size_t)caprl_vision_n_params(v), 4)};
    vision_train *vt = NULL;
    caprl_error   err = {0};
    int64_t       n_feat = 0;
    CHECK_OK(vision_train_init(&vt, v, N_ALL + 8, recompute, &err), &err);
    if (!vt) {
        exit(test_finish("test_train_vision"));
    }
    CHECK(vision_train_bytes(vt) > 0);
    CHECK_OK(vision_train_forward(vt, pix, grid, 2, p.features, &n_feat, &err), &err);
    CHECK_EQ_I64(n_feat, n_tokens);
    CHECK_OK(vision_train_backward(vt, R, p.grads, &err), &err);
    vision_train_free(vt);
    return p;
}

static pass train_pass(caprl_vision *v, const float *pix, const float *R, bool recompute) {
    return train_pass_grid(v, pix, R, recompute, k_grid, T_ALL);
}

static void pass_free(pass *p) {
    free(p->features);
    free(p->grads);
}

/* ---- files ---------------------------------------------------------------------------------------------- */

static void save_vision(const caprl_vision *v, const char *path) {
    caprl_error      err = {0};
    caprl_st_writer *w = caprl_st_writer_init();
    CHECK_OK(caprl_vision_add_to_writer(v, w, &err), &err);
    CHECK_OK(caprl_st_writer_save(w, path, &err), &err);
    caprl_st_writer_free(w);
}

static uint8_t *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(*n ? *n : 1);
    if (fread(b, 1, *n, f) != *n) {
        exit(1);
    }
    fclose(f);
    return b;
}

static bool same_file(const char *a, const char *b) {
    size_t   na = 0, nb = 0;
    uint8_t *da = read_all(a, &na), *db = read_all(b, &nb);
    bool     same = na == nb && memcmp(da, db, na) == 0;
    free(da);
    free(db);
    return same;
}

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

/* ---- the parameter table and binding -------------------------------------------------------------------- */

/* Every table entry against the tensors v saved before the bind (names under "visual.", stored order), and the
 * bound flat values against them. */
static void check_table(const caprl_vision *v, const float *flat, const char *saved, const char *prefix) {
    caprl_error        err = {0};
    caprl_safetensors *st = NULL;
    CHECK_OK(caprl_safetensors_open(&st, saved, &err), &err);
    if (!st) {
        return;
    }
    int32_t n = vision_train_n_tensors(v);
    CHECK_EQ_I64(n, caprl_safetensors_n_tensors(st));
    CHECK_EQ_I64(n, 1 + 12 * DEPTH + 5);
    int64_t off = 0;
    int     bad_values = 0;
    for (int32_t i = 0; i < n; i++) {
        caprl_param_info info;
        vision_train_tensor(v, i, &info);
        CHECK_EQ_I64(info.offset, off);
        CHECK_EQ_I64(info.group, CAPRL_GROUP_VISION);
        CHECK_MSG(strncmp(info.name, prefix, strlen(prefix)) == 0, "%s lacks the prefix %s", info.name, prefix);
        /* saved under the naming scheme it was loaded with, the name the trainer reports */
        const caprl_st_tensor *t = caprl_safetensors_find(st, info.name);
        CHECK_MSG(t != NULL, "%s not in the saved tower", info.name);
        if (!t) {
            continue;
        }
        CHECK_EQ_I64(info.n_dims, t->n_dims);
        for (int32_t d = 0; d < t->n_dims && d < 5; d++) {
            CHECK_EQ_I64(info.shape[d], t->shape[d]);
        }
        CHECK_EQ_I64(info.numel, t->numel);
        for (int64_t j = 0; j < t->numel; j++) {
            bad_values += (double)flat[info.offset + j] != read_elem(t, j);
        }
        off += info.numel;
    }
    CHECK_EQ_I64(off, vision_train_n_params(v));
    CHECK_MSG(bad_values == 0, "%d bound values differ from the saved tensors", bad_values);
    caprl_param_info first;
    vision_train_tensor(v, 0, &first);
    CHECK(strstr(first.name, "patch_embed.proj.weight") && first.n_dims == 5 && first.shape[1] == 3 &&
          first.shape[2] == 2 && first.shape[3] == 14 && first.shape[4] == 14);
    caprl_safetensors_free(st);
}

/* Saves v, binds it (shadow or not), checks the table and that a save now writes the same bytes; then changes
 * one flat value and checks that the save follows it. Returns the flat buffer (caller frees). */
static float *bind_and_check(caprl_vision *v, uint16_t **shadow_out, bool shadow, const char *dir, const char *tag,
                             const char *prefix) {
    char before[4200], after[4200], later[4200];
    snprintf(before, sizeof before, "%s/%s-before.safetensors", dir, tag);
    snprintf(after, sizeof after, "%s/%s-after.safetensors", dir, tag);
    snprintf(later, sizeof later, "%s/%s-changed.safetensors", dir, tag);
    save_vision(v, before);
    int64_t   n = vision_train_n_params(v);
    float    *flat = malloc((size_t)n * sizeof(float));
    uint16_t *sh = shadow ? malloc((size_t)n * sizeof(uint16_t)) : NULL;
    vision_train_bind(v, flat, sh);
    check_table(v, flat, before, prefix);
    save_vision(v, after);
    CHECK_MSG(same_file(before, after), "%s: the save after binding differs from the one before", tag);
    if (sh) {
        int bad = 0;
        for (int64_t i = 0; i < n; i++) {
            bad += sh[i] != caprl_f32_to_bf16(flat[i]);
        }
        CHECK_MSG(bad == 0, "%s: %d shadow elements are not bf16(flat)", tag, bad);
    }
    /* the save reads the live values: change the last merger bias element (and restore it) */
    float keep = flat[n - 1];
    flat[n - 1] = 0.5f;
    vision_train_sync(v, flat, sh);
    save_vision(v, later);
    caprl_error        err = {0};
    caprl_safetensors *st = NULL;
    CHECK_OK(caprl_safetensors_open(&st, later, &err), &err);
    char bias_name[64];
    snprintf(bias_name, sizeof bias_name, "%smerger.mlp.2.bias", prefix);
    const caprl_st_tensor *t = st ? caprl_safetensors_find(st, bias_name) : NULL;
    CHECK(t && read_elem(t, OUT - 1) == 0.5);
    caprl_safetensors_free(st);
    flat[n - 1] = keep;
    vision_train_sync(v, flat, sh);
    *shadow_out = sh;
    return flat;
}

/* A checkpoint directory holding v's tensors under "model.visual." (transformers >= 4.52 names). */
static void write_new_names(const caprl_vision *v, const char *saved, const char *dir) {
    caprl_error        err = {0};
    caprl_safetensors *st = NULL;
    CHECK_OK(caprl_safetensors_open(&st, saved, &err), &err);
    caprl_st_writer *w = caprl_st_writer_init();
    char           **names = calloc((size_t)caprl_safetensors_n_tensors(st), sizeof *names);
    for (int64_t i = 0; i < caprl_safetensors_n_tensors(st); i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(st, i);
        names[i] = malloc(200);
        snprintf(names[i], 200, "model.%s", t->name);
        CHECK_OK(caprl_st_writer_add(w, names[i], t->dtype, t->n_dims, t->shape, t->data, &err), &err);
    }
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK_OK(caprl_st_writer_save(w, path, &err), &err);
    for (int64_t i = 0; i < caprl_safetensors_n_tensors(st); i++) {
        free(names[i]);
    }
    free(names);
    caprl_st_writer_free(w);
    caprl_safetensors_free(st);
    char *vc = NULL;
    CHECK_OK(caprl_vision_config_to_json(caprl_vision_get_config(v), &vc, &err), &err);
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    fprintf(f, "{\n  \"model_type\": \"qwen2_5_vl\",\n  \"vision_config\": %s\n}\n", vc ? vc : "{}");
    fclose(f);
    caprl_free(vc);
}

static void test_bind(const char *dir, const float *pix) {
    static const struct {
        int32_t     dtype;
        bool        shadow;
        const char *tag;
    } cases[] = {{CAPRL_DTYPE_F32, false, "f32"}, {CAPRL_DTYPE_BF16, false, "bf16"}, {CAPRL_DTYPE_BF16, true, "mixed"}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        caprl_vision *v = tower(cases[ci].dtype, 7 + ci, 2);
        float        *enc_before = encode(v, pix);
        uint16_t     *sh = NULL;
        float        *flat = bind_and_check(v, &sh, cases[ci].shadow, dir, cases[ci].tag, "visual.");
        /* same values in the same dtype (f32 matrices in flat, bf16 ones in the shadow): same bits */
        if (cases[ci].dtype == CAPRL_DTYPE_F32 || cases[ci].shadow) {
            float *enc_after = encode(v, pix);
            CHECK_MSG(memcmp(enc_before, enc_after, (size_t)T_ALL * OUT * sizeof(float)) == 0,
                      "%s: encode changed with binding", cases[ci].tag);
            free(enc_after);
        }
        free(enc_before);
        caprl_vision_free(v);
        free(flat);
        free(sh);
    }
    /* a loaded BF16 checkpoint under the new names: the table keeps them, saving still writes the stored dtype */
    caprl_vision *src = tower(CAPRL_DTYPE_BF16, 11, 1);
    char          saved[4200], ckpt[4200];
    snprintf(saved, sizeof saved, "%s/src.safetensors", dir);
    snprintf(ckpt, sizeof ckpt, "%s/new_names", dir);
    save_vision(src, saved);
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", ckpt);
    CHECK(system(cmd) == 0);
    write_new_names(src, saved, ckpt);
    caprl_vision *v = NULL;
    caprl_error   err = {0};
    CHECK_OK(caprl_vision_load(&v, ckpt, 1, &err), &err);
    if (v) {
        uint16_t *sh = NULL;
        float    *flat = bind_and_check(v, &sh, false, dir, "loaded", "model.visual.");
        caprl_param_info info;
        vision_train_tensor(v, 1, &info);
        CHECK_STR_EQ(info.name, "model.visual.blocks.0.norm1.weight");
        caprl_vision_free(v);
        free(flat);
    }
    caprl_vision_free(src);
}

/* ---- forward against encode, determinism, accumulation, errors ------------------------------------------- */

/* max |a - b| / max |b| */
static double rel_diff(const float *a, const float *b, int64_t n) {
    double mx = 0, md = 0;
    for (int64_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs((double)b[i]));
        md = fmax(md, fabs((double)a[i] - (double)b[i]));
    }
    return mx > 0 ? md / mx : md;
}

/* The training forward uses the token-major training attention (it keeps the log-sum-exp) where encode uses the
 * head-major segment kernel; everything else is the same ops on the same rows. Bit-identity is reported; the
 * check is f32 tolerance: 4 sqrt(K0) eps relative to the largest feature (as test_vision's encode bound). Except
 * for bf16 weights on a CPU with a bf16 matrix unit: encode's attention then runs there with q, k, v and the
 * softmax numerators rounded to bf16, the training attention in f32, so the bound is those four roundings,
 * 4 x 2^-9 of the largest feature. */
static void test_forward_matches_encode(const float *pix, const float *R) {
    for (int mixed = 0; mixed < 2; mixed++) {
        double tol = mixed && default_backend_rounds_bf16() ? 4 * ldexp(1.0, -9) : 4.0 * sqrt((double)K0) * EPS;
        caprl_vision *v = tower(mixed ? CAPRL_DTYPE_BF16 : CAPRL_DTYPE_F32, 21, 2);
        int64_t       n = vision_train_n_params(v);
        float        *flat = malloc((size_t)n * sizeof(float));
        uint16_t     *sh = mixed ? malloc((size_t)n * sizeof(uint16_t)) : NULL;
        vision_train_bind(v, flat, sh);
        float *enc = encode(v, pix);
        pass   p = train_pass(v, pix, R, false);
        double d = rel_diff(p.features, enc, (int64_t)T_ALL * OUT);
        bool   same = memcmp(p.features, enc, (size_t)T_ALL * OUT * sizeof(float)) == 0;
        fprintf(stderr, "%s: training forward vs encode: %s (max rel diff %.3g)\n", mixed ? "bf16 mixed" : "f32",
                same ? "bit-identical" : "not bit-identical", d);
        CHECK_MSG(d <= tol, "training forward differs from encode by %.3g", d);
        /* after a change of the flat values and a sync, both follow the new weights */
        for (int64_t i = 0; i < n; i++) {
            flat[i] *= 1.0625f;
        }
        vision_train_sync(v, flat, sh);
        float *enc2 = encode(v, pix);
        pass   p2 = train_pass(v, pix, R, false);
        CHECK(rel_diff(enc2, enc, (int64_t)T_ALL * OUT) > 1e-3);
        CHECK(rel_diff(p2.features, enc2, (int64_t)T_ALL * OUT) <= tol);
        pass_free(&p);
        pass_free(&p2);
        free(enc);
        free(enc2);
        caprl_vision_free(v);
        free(flat);
        free(sh);
    }
}

static void test_determinism(const float *pix, const float *R) {
    caprl_vision *v1 = tower(CAPRL_DTYPE_F32, 31, 1), *v2 = tower(CAPRL_DTYPE_F32, 31, 2);
    int64_t       n = vision_train_n_params(v1);
    float        *f1 = malloc((size_t)n * sizeof(float)), *f2 = malloc((size_t)n * sizeof(float));
    vision_train_bind(v1, f1, NULL);
    vision_train_bind(v2, f2, NULL);
    pass a = train_pass(v1, pix, R, false), b = train_pass(v2, pix, R, false), c = train_pass(v2, pix, R, true);
    size_t fb = (size_t)T_ALL * OUT * sizeof(float), gb = (size_t)n * sizeof(float);
    CHECK_MSG(memcmp(a.features, b.features, fb) == 0 && memcmp(a.grads, b.grads, gb) == 0,
              "1 and 2 threads differ");
    CHECK_MSG(memcmp(b.features, c.features, fb) == 0 && memcmp(b.grads, c.grads, gb) == 0,
              "recompute on and off differ");
    /* += : a pass into a buffer that already holds the gradients adds them again. Kernels may add a sum once or
     * term by term, so 2 g holds to the rounding of M = N_ALL additions relative to the tensor's largest term. */
    vision_train *vt = NULL;
    caprl_error   err = {0};
    float        *feat = malloc(fb), *g = malloc(gb);
    memcpy(g, a.grads, gb);
    CHECK_OK(vision_train_init(&vt, v2, N_ALL, true, &err), &err);
    if (vt) {
        CHECK_OK(vision_train_forward(vt, pix, k_grid, 2, feat, NULL, &err), &err);
        CHECK_OK(vision_train_backward(vt, R, g, &err), &err);
    }
    int bad = 0;
    for (int32_t ti = 0; ti < vision_train_n_tensors(v2); ti++) {
        caprl_param_info info;
        vision_train_tensor(v2, ti, &info);
        double mx = 0;
        for (int64_t j = info.offset; j < info.offset + info.numel; j++) {
            mx = fmax(mx, fabs((double)a.grads[j]));
        }
        for (int64_t j = info.offset; j < info.offset + info.numel; j++) {
            bad += fabs((double)g[j] - 2.0 * a.grads[j]) > N_ALL * EPS * mx;
        }
    }
    CHECK_MSG(bad == 0, "%d gradients are not accumulated", bad);
    vision_train_free(vt);
    free(feat);
    free(g);
    pass_free(&a);
    pass_free(&b);
    pass_free(&c);
    caprl_vision_free(v1);
    caprl_vision_free(v2);
    free(f1);
    free(f2);
}

static void test_errors(const float *pix, const float *R) {
    caprl_vision *v = tower(CAPRL_DTYPE_F32, 41, 1);
    int64_t       n = vision_train_n_params(v);
    float        *flat = malloc((size_t)n * sizeof(float)), *g = calloc((size_t)n, sizeof(float));
    float        *feat = malloc((size_t)T_ALL * OUT * sizeof(float));
    vision_train_bind(v, flat, NULL);
    vision_train *vt = NULL;
    caprl_error   err = {0};
    CHECK(vision_train_init(&vt, v, 0, false, &err) == CAPRL_ERR_INVALID_ARG && strstr(err.msg, "max_patches"));
    CHECK_OK(vision_train_init(&vt, v, 96, false, &err), &err);
    if (vt) {
        CHECK(vision_train_backward(vt, R, g, &err) == CAPRL_ERR_INVALID_ARG && strstr(err.msg, "without a forward"));
        CHECK(vision_train_forward(vt, pix, k_grid, 2, feat, NULL, &err) == CAPRL_ERR_INVALID_ARG);
        CHECK_MSG(strstr(err.msg, "144 patches") && strstr(err.msg, "max_patches"), "%s", err.msg);
        const int32_t odd[3] = {1, 7, 12};
        CHECK(vision_train_forward(vt, pix, odd, 1, feat, NULL, &err) == CAPRL_ERR_INVALID_ARG);
        CHECK_MSG(strstr(err.msg, "(1, 7, 12)"), "%s", err.msg);
        const int32_t zero[3] = {0, 8, 12};
        CHECK(vision_train_forward(vt, pix, zero, 1, feat, NULL, &err) == CAPRL_ERR_INVALID_ARG);
        int64_t nf = 0;
        CHECK_OK(vision_train_forward(vt, pix, k_grid, 1, feat, &nf, &err), &err); /* image A alone fits */
        CHECK_EQ_I64(nf, 24);
        CHECK_OK(vision_train_backward(vt, R, g, &err), &err);
        CHECK(vision_train_backward(vt, R, g, &err) == CAPRL_ERR_INVALID_ARG);
        /* a failed forward leaves nothing to differentiate */
        CHECK(vision_train_forward(vt, pix, odd, 1, feat, NULL, &err) == CAPRL_ERR_INVALID_ARG);
        CHECK(vision_train_backward(vt, R, g, &err) == CAPRL_ERR_INVALID_ARG);
    }
    vision_train_free(vt);
    caprl_vision_free(v);
    free(flat);
    free(g);
    free(feat);
}

/* ---- float64 reference and finite differences ----------------------------------------------------------- */

typedef struct ref_row {
    int img, t, hpos, wpos;
} ref_row;

enum { B_NORM1, B_QKV_W, B_QKV_B, B_PROJ_W, B_PROJ_B, B_NORM2, B_GATE_W, B_GATE_B, B_UP_W, B_UP_B, B_DOWN_W,
       B_DOWN_B, B_COUNT };
static const char *const k_block_names[B_COUNT] = {
    "norm1.weight",         "attn.qkv.weight",    "attn.qkv.bias",      "attn.proj.weight",
    "attn.proj.bias",       "norm2.weight",       "mlp.gate_proj.weight", "mlp.gate_proj.bias",
    "mlp.up_proj.weight",   "mlp.up_proj.bias",   "mlp.down_proj.weight", "mlp.down_proj.bias"};

typedef struct ref_model {
    caprl_vision_config c;
    const float        *pix;   /* (N, K0) input order */
    const float        *R;     /* (T, O) */
    ref_row             rows[N_FD];
    int64_t             pe, lnq, w1, b1, w2, b2; /* offsets into the parameters */
    int64_t             blk[DEPTH][B_COUNT];
    bool                full[DEPTH];
    double             *cache; /* (DEPTH + 1, N, C): block inputs of the unperturbed parameters */
    double             *x, *qkv, *att, *tmp;
} ref_model;

static int64_t offset_of(const caprl_vision *v, const char *suffix) {
    char want[200];
    snprintf(want, sizeof want, "visual.%s", suffix);
    for (int32_t i = 0; i < vision_train_n_tensors(v); i++) {
        caprl_param_info info;
        vision_train_tensor(v, i, &info);
        if (strcmp(info.name, want) == 0) {
            return info.offset;
        }
    }
    fprintf(stderr, "reference: no tensor %s\n", want);
    exit(1);
}

static void ref_init(ref_model *m, const caprl_vision *v, const float *pix, const float *R) {
    memset(m, 0, sizeof *m);
    m->c = *caprl_vision_get_config(v);
    m->pix = pix;
    m->R = R;
    int r = 0;
    for (int i = 0; i < 2; i++) {
        for (int t = 0; t < k_grid_fd[3 * i]; t++) {
            for (int bh = 0; bh < k_grid_fd[3 * i + 1] / 2; bh++) {
                for (int bw = 0; bw < k_grid_fd[3 * i + 2] / 2; bw++) {
                    for (int mh = 0; mh < 2; mh++) {
                        for (int mw = 0; mw < 2; mw++, r++) {
                            m->rows[r] = (ref_row){i, t, 2 * bh + mh, 2 * bw + mw};
                        }
                    }
                }
            }
        }
    }
    m->pe = offset_of(v, "patch_embed.proj.weight");
    m->lnq = offset_of(v, "merger.ln_q.weight");
    m->w1 = offset_of(v, "merger.mlp.0.weight");
    m->b1 = offset_of(v, "merger.mlp.0.bias");
    m->w2 = offset_of(v, "merger.mlp.2.weight");
    m->b2 = offset_of(v, "merger.mlp.2.bias");
    for (int l = 0; l < DEPTH; l++) {
        char name[120];
        for (int k = 0; k < B_COUNT; k++) {
            snprintf(name, sizeof name, "blocks.%d.%s", l, k_block_names[k]);
            m->blk[l][k] = offset_of(v, name);
        }
        for (int i = 0; i < m->c.n_fullatt; i++) {
            m->full[l] = m->full[l] || m->c.fullatt_block_indexes[i] == l;
        }
    }
    m->cache = malloc((size_t)(DEPTH + 1) * N_FD * CV * sizeof(double));
    m->x = malloc((size_t)N_FD * CV * sizeof(double));
    m->qkv = malloc((size_t)N_FD * 3 * CV * sizeof(double));
    m->att = malloc((size_t)N_FD * CV * sizeof(double));
    m->tmp = malloc((size_t)N_FD * 4 * CV * sizeof(double));
}

static void ref_free(ref_model *m) {
    free(m->cache), free(m->x), free(m->qkv), free(m->att), free(m->tmp);
}

static void rmsnorm(double *y, const double *x, const double *w, int C) {
    double ss = 0;
    for (int i = 0; i < C; i++) {
        ss += x[i] * x[i];
    }
    double inv = 1.0 / sqrt(ss / C + 1e-6);
    for (int i = 0; i < C; i++) {
        y[i] = x[i] * inv * w[i];
    }
}

static void linear(double *y, const double *x, const double *W, const double *b, int N, int K) {
    for (int n = 0; n < N; n++) {
        double s = b ? b[n] : 0.0;
        for (int k = 0; k < K; k++) {
            s += x[k] * W[(size_t)n * K + k];
        }
        y[n] = s;
    }
}

/* 2-D rotary on one head (§3.5): pair (j, j + D/2); j < D/4 turns by hpos f_j, D/4 <= j < D/2 by wpos f_(j-D/4),
 * f_i = 10000^(-2i / (D/2)). */
static void rotary(double *v, int D, const ref_row *row) {
    int q = D / 4;
    for (int j = 0; j < D / 2; j++) {
        int    i = j < q ? j : j - q;
        double ang = (j < q ? row->hpos : row->wpos) * pow(10000.0, -(2.0 * i) / (D / 2));
        double a = v[j], b = v[j + D / 2];
        v[j] = a * cos(ang) - b * sin(ang);
        v[j + D / 2] = b * cos(ang) + a * sin(ang);
    }
}

/* The same frame, and in window blocks the same ws x ws block of merged tokens (ws s patches a side). */
static bool same_segment(const ref_model *m, const ref_row *a, const ref_row *b, bool full) {
    int side = m->c.window_size / m->c.spatial_merge_size / m->c.patch_size * m->c.spatial_merge_size;
    if (a->img != b->img || a->t != b->t) {
        return false;
    }
    return full || (a->hpos / side == b->hpos / side && a->wpos / side == b->wpos / side);
}

static void ref_block(ref_model *m, const double *P, int l) {
    const int64_t *o = m->blk[l];
    int            C = CV, H = m->c.num_heads, D = C / H, F = FV, N = N_FD;
    double        *x = m->x, *qkv = m->qkv, *att = m->att, *t = m->tmp;
    for (int r = 0; r < N; r++) {
        rmsnorm(t, x + (size_t)r * C, P + o[B_NORM1], C);
        linear(qkv + (size_t)r * 3 * C, t, P + o[B_QKV_W], P + o[B_QKV_B], 3 * C, C);
        for (int h = 0; h < 2 * H; h++) {
            rotary(qkv + (size_t)r * 3 * C + h * D, D, &m->rows[r]);
        }
    }
    /* a segment id per row, so each query visits only its own segment's keys */
    int sid[N_FD];
    for (int r = 0; r < N; r++) {
        sid[r] = r;
        for (int k = 0; k < r; k++) {
            if (same_segment(m, &m->rows[r], &m->rows[k], m->full[l])) {
                sid[r] = sid[k];
                break;
            }
        }
    }
    double sc[N_FD];
    for (int r = 0; r < N; r++) {
        for (int h = 0; h < H; h++) {
            double        mx = -INFINITY, z = 0, *out = att + (size_t)r * C + h * D;
            const double *qr = qkv + (size_t)r * 3 * C + h * D;
            for (int k = 0; k < N; k++) {
                if (sid[k] == sid[r]) {
                    double d = 0;
                    for (int j = 0; j < D; j++) {
                        d += qr[j] * qkv[(size_t)k * 3 * C + C + h * D + j];
                    }
                    sc[k] = d / sqrt((double)D);
                    mx = fmax(mx, sc[k]);
                }
            }
            for (int k = 0; k < N; k++) {
                if (sid[k] == sid[r]) {
                    sc[k] = exp(sc[k] - mx);
                    z += sc[k];
                }
            }
            memset(out, 0, (size_t)D * sizeof(double));
            for (int k = 0; k < N; k++) {
                if (sid[k] == sid[r]) {
                    for (int j = 0; j < D; j++) {
                        out[j] += sc[k] / z * qkv[(size_t)k * 3 * C + 2 * C + h * D + j];
                    }
                }
            }
        }
    }
    double *g = t + C, *u = g + F;
    for (int r = 0; r < N; r++) {
        double *xr = x + (size_t)r * C;
        linear(t, att + (size_t)r * C, P + o[B_PROJ_W], P + o[B_PROJ_B], C, C);
        for (int i = 0; i < C; i++) {
            xr[i] += t[i];
        }
        rmsnorm(t, xr, P + o[B_NORM2], C);
        linear(g, t, P + o[B_GATE_W], P + o[B_GATE_B], F, C);
        linear(u, t, P + o[B_UP_W], P + o[B_UP_B], F, C);
        for (int i = 0; i < F; i++) {
            g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
        }
        linear(t, g, P + o[B_DOWN_W], P + o[B_DOWN_B], C, F);
        for (int i = 0; i < C; i++) {
            xr[i] += t[i];
        }
    }
}

/* L = sum(features * R) for parameters P, starting at block `start` from the cached block input (start < 0:
 * from the pixels); record stores the block inputs into the cache. */
static double ref_loss(ref_model *m, const double *P, int start, bool record) {
    int C = CV, UC = 4 * CV, O = OUT;
    if (start < 0) {
        double px[K0];
        for (int r = 0; r < N_FD; r++) {
            for (int k = 0; k < K0; k++) {
                px[k] = m->pix[(size_t)r * K0 + k];
            }
            linear(m->x + (size_t)r * C, px, P + m->pe, NULL, C, K0);
        }
        start = 0;
    } else {
        memcpy(m->x, m->cache + (size_t)start * N_FD * C, (size_t)N_FD * C * sizeof(double));
    }
    for (int l = start; l <= DEPTH; l++) {
        if (record) {
            memcpy(m->cache + (size_t)l * N_FD * C, m->x, (size_t)N_FD * C * sizeof(double));
        }
        if (l < DEPTH) {
            ref_block(m, P, l);
        }
    }
    double L = 0, *y = m->tmp, *h = m->tmp + UC, z[OUT];
    for (int g = 0; g < T_FD; g++) { /* merged token g of the input order = feature row g */
        for (int u = 0; u < 4; u++) {
            rmsnorm(y + u * C, m->x + (size_t)(4 * g + u) * C, P + m->lnq, C);
        }
        linear(h, y, P + m->w1, P + m->b1, UC, UC);
        for (int i = 0; i < UC; i++) {
            h[i] = 0.5 * h[i] * (1.0 + erf(h[i] / sqrt(2.0)));
        }
        linear(z, h, P + m->w2, P + m->b2, O, UC);
        for (int i = 0; i < O; i++) {
            L += z[i] * m->R[(size_t)g * O + i];
        }
    }
    return L;
}

/* The first block a tensor's perturbation changes (-1: patch embedding, DEPTH: merger). */
static int start_block(const char *name) {
    if (strstr(name, "patch_embed")) {
        return -1;
    }
    const char *b = strstr(name, "blocks.");
    return b ? atoi(b + 7) : DEPTH;
}

/* Central differences for two elements of every tensor (its largest analytic gradient, a random one), compared
 * with the analytic gradient relative to the tensor's largest one. The bound: the f32 forward and backward sum
 * up to K0 = 1176 products per value, so errors near sqrt(K0) eps of the magnitudes involved are expected;
 * 64 sqrt(K0) eps (2.6e-4) leaves room for the chain of 3 blocks, while a wrong sign, transposition, window,
 * position or missing term moves gradients by O(1) of their size. The step h = 1e-3 gives truncation errors near
 * h^2 = 1e-6 relative, well inside. */
static void test_gradients(const float *pix, const float *R) {
    caprl_vision *v = tower(CAPRL_DTYPE_F32, 51, 2);
    int64_t       n = vision_train_n_params(v);
    float        *flat = malloc((size_t)n * sizeof(float));
    vision_train_bind(v, flat, NULL);
    pass    p = train_pass_grid(v, pix, R, false, k_grid_fd, T_FD);
    double *P = malloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        P[i] = flat[i];
    }
    ref_model *m = malloc(sizeof *m);
    ref_init(m, v, pix, R);
    double L0 = ref_loss(m, P, -1, true), Lf = 0;
    for (int64_t i = 0; i < (int64_t)T_FD * OUT; i++) {
        Lf += (double)p.features[i] * R[i];
    }
    CHECK_NEAR(Lf, L0, 1e-4, 1e-6); /* the reference computes the same tower */
    const double tol = 64.0 * sqrt((double)K0) * EPS, h = 1e-3;
    double       worst = 0;
    const char  *worst_name = "";
    for (int32_t ti = 0; ti < vision_train_n_tensors(v); ti++) {
        caprl_param_info info;
        vision_train_tensor(v, ti, &info);
        const float *g = p.grads + info.offset;
        int64_t      imax = 0;
        double       gmax = 0;
        for (int64_t j = 0; j < info.numel; j++) {
            if (fabs((double)g[j]) > gmax) {
                gmax = fabs((double)g[j]);
                imax = j;
            }
        }
        CHECK_MSG(gmax > 0, "%s: all gradients are zero", info.name);
        int64_t pick[2] = {imax, (int64_t)uniform(0, (double)info.numel)};
        for (int s = 0; s < 2; s++) {
            int64_t j = info.offset + pick[s];
            double  keep = P[j];
            P[j] = keep + h;
            double lp = ref_loss(m, P, start_block(info.name), false);
            P[j] = keep - h;
            double lm = ref_loss(m, P, start_block(info.name), false);
            P[j] = keep;
            double fd = (lp - lm) / (2 * h), e = fabs(g[pick[s]] - fd) / gmax;
            if (e > worst) {
                worst = e;
                worst_name = info.name;
            }
            CHECK_MSG(e <= tol, "%s[%lld]: analytic %.9g vs finite differences %.9g (max |grad| %.3g)", info.name,
                      (long long)pick[s], (double)g[pick[s]], fd, gmax);
        }
    }
    fprintf(stderr, "gradients: worst error %.3g of the tensor's max |grad| (%s), tolerance %.3g\n", worst,
            worst_name, tol);
    ref_free(m);
    free(m);
    free(P);
    pass_free(&p);
    caprl_vision_free(v);
    free(flat);
}

int main(void) {
    float *pix = random_floats((int64_t)N_ALL * K0, -2.0, 2.0); /* normalized pixels are ~[-2, 2] */
    float *R = random_floats((int64_t)T_ALL * OUT, -1.0, 1.0);
    char  *dir = test_tmpdir("test_train_vision");
    test_bind(dir, pix);
    test_forward_matches_encode(pix, R);
    test_determinism(pix, R);
    test_errors(pix, R);
    test_gradients(pix, R);
    free(pix);
    free(R);
    free(dir);
    return test_finish("test_train_vision");
}
