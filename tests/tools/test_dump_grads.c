/* caprl forward --dump-grads on checkpoints written by caprl init-model:
 * - the file holds one f32 tensor per checkpoint tensor, under the checkpoint's own name and shape;
 * - the summary's loss equals the loss recomputed (in double) from --dump-logits of the same run;
 * - sampled gradient values equal central finite differences of that loss computed by a float64 forward
 *   (tests/ref_qwen2.h reading the checkpoint, one tensor perturbed in double);
 * - with --image on a Qwen2.5-VL checkpoint the vision tower's tensors (visual.*) are there too, non-zero;
 * - --loss-from outside 1..T-1 and a missing output are errors, and no file is left behind. */
#include <float.h>

#include "caprl/model.h"
#include "caprl/safetensors.h"
#include "caprl/tensor.h"
#include "caprl_test.h"
#include "cli_util.h"
#include "ref_qwen2.h"

enum { T_IDS = 7, K_FROM = 3 };
static const int32_t k_ids[T_IDS] = {9, 151, 2024, 77, 151, 5, 30000};

/* The loss the CLI documents, in double, from logits (T, V) of any precision given as a double accessor. */
static double loss_from_logits(const float *zf, const double *zd, int V) {
    double L = 0;
    for (int t = K_FROM; t < T_IDS; t++) {
        size_t row = (size_t)(t - 1) * V;
        double mx = -INFINITY, sum = 0;
        for (int v = 0; v < V; v++) {
            mx = fmax(mx, zf ? zf[row + v] : zd[row + v]);
        }
        for (int v = 0; v < V; v++) {
            sum += exp((zf ? zf[row + v] : zd[row + v]) - mx);
        }
        L += -((zf ? zf[row + k_ids[t]] : zd[row + k_ids[t]]) - mx - log(sum));
    }
    return L / (T_IDS - K_FROM);
}

static double ref_loss(const ref_model *r) {
    int32_t pos3[3 * T_IDS];
    for (int c = 0; c < 3; c++) {
        for (int t = 0; t < T_IDS; t++) {
            pos3[c * T_IDS + t] = t;
        }
    }
    ref_input in = {.ids = k_ids, .T = T_IDS, .pos3 = pos3, .embd_row = NULL, .embd = NULL};
    double   *z = ref_forward(r, &in);
    double    L = loss_from_logits(NULL, z, r->c.vocab_size);
    free(z);
    return L;
}

/* Finite difference of the float64 loss in element j of tensor name (its values overridden in double). */
static double fd_grad(const ref_model *r, const char *name, int64_t j) {
    const caprl_st_tensor *t = caprl_safetensors_find(r->st, name);
    double                *d = malloc((size_t)t->numel * sizeof(double));
    for (int64_t i = 0; i < t->numel; i++) {
        float f;
        memcpy(&f, (const uint8_t *)t->data + 4 * i, 4);
        d[i] = f;
    }
    ref_param p = {name, d, t->numel};
    g_ref_params = &p;
    g_ref_n_params = 1;
    double p0 = d[j], h = 1e-3 * fmax(1.0, fabs(p0));
    d[j] = p0 + h;
    double lp = ref_loss(r);
    d[j] = p0 - h;
    double lm = ref_loss(r);
    g_ref_params = NULL;
    g_ref_n_params = 0;
    free(d);
    return (lp - lm) / (2 * h);
}

static float grad_at(const caprl_safetensors *g, const char *name, int64_t j) {
    const caprl_st_tensor *t = caprl_safetensors_find(g, name);
    float                  f = NAN;
    if (t && t->dtype == CAPRL_DTYPE_F32 && j < t->numel) {
        memcpy(&f, (const uint8_t *)t->data + 4 * j, 4);
    }
    return f;
}

/* Every checkpoint tensor has an f32 gradient of the same shape (and nothing else is in the file). */
static void check_names(const caprl_safetensors *model, const caprl_safetensors *g, const char *prefix,
                        int64_t *n_vision) {
    CHECK_EQ_I64(caprl_safetensors_n_tensors(g), caprl_safetensors_n_tensors(model));
    *n_vision = 0;
    for (int64_t i = 0; i < caprl_safetensors_n_tensors(model); i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(model, i);
        const caprl_st_tensor *u = caprl_safetensors_find(g, t->name);
        bool                   same = u && u->dtype == CAPRL_DTYPE_F32 && u->n_dims == t->n_dims;
        for (int32_t d = 0; same && d < t->n_dims; d++) {
            same = u->shape[d] == t->shape[d];
        }
        CHECK_MSG(same, "gradient of %s: missing or wrong shape", t->name);
        if (u && strncmp(t->name, prefix, strlen(prefix)) == 0) {
            double s = 0;
            for (int64_t j = 0; j < u->numel; j++) {
                float f;
                memcpy(&f, (const uint8_t *)u->data + 4 * j, 4);
                s += fabs(f);
            }
            CHECK_MSG(s > 0, "gradient of %s is zero", t->name);
            (*n_vision)++;
        }
    }
}

static double summary_number(const char *out, const char *key) {
    const char *p = strstr(out, key);
    return p ? strtod(p + strlen(key), NULL) : NAN;
}

static void check_text(const char *tmp) {
    char cmd[8192], out[4096];
    snprintf(cmd, sizeof cmd, "init-model --out %s/m --preset tiny --dtype f32 --seed 3 --std 0.1", tmp);
    CHECK(run_cli(cmd, NULL, 0) == 0);
    snprintf(cmd, sizeof cmd,
             "forward --model %s/m --ids 9,151,2024,77,151,5,30000 --loss-from %d --dump-grads %s/g.safetensors "
             "--dump-logits %s/l.bin",
             tmp, K_FROM, tmp, tmp);
    CHECK(run_cli(cmd, out, sizeof out) == 0);
    double loss = summary_number(out, "\"loss\": ");

    caprl_text_config cfg;
    caprl_error       err = {0};
    snprintf(cmd, sizeof cmd, "%s/m/config.json", tmp);
    CHECK_OK(caprl_text_config_load(&cfg, cmd, &err), &err);
    int V = cfg.vocab_size;
    /* the summary's loss is the loss of the dumped logits */
    snprintf(cmd, sizeof cmd, "%s/l.bin", tmp);
    FILE  *f = fopen(cmd, "rb");
    float *z = malloc((size_t)T_IDS * V * sizeof(float));
    CHECK(f && fread(z, sizeof(float), (size_t)T_IDS * V, f) == (size_t)T_IDS * V);
    if (f) {
        fclose(f);
    }
    double L = loss_from_logits(z, NULL, V);
    CHECK_NEAR(loss, L, 64 * FLT_EPSILON, 0);
    free(z);

    ref_model          r = {cfg, NULL};
    caprl_safetensors *g = NULL;
    snprintf(cmd, sizeof cmd, "%s/m", tmp);
    CHECK_OK(caprl_safetensors_open_dir(&r.st, cmd, &err), &err);
    snprintf(cmd, sizeof cmd, "%s/g.safetensors", tmp);
    CHECK_OK(caprl_safetensors_open(&g, cmd, &err), &err);
    if (!r.st || !g) {
        return;
    }
    int64_t none = 0;
    check_names(r.st, g, "model.", &none);
    CHECK_EQ_I64(none, caprl_safetensors_n_tensors(r.st));
    CHECK_NEAR(ref_loss(&r), loss, 1e-5, 0); /* f32 against float64 on the same weights */
    /* a few elements (each costs two float64 forwards over the 151936-token vocabulary): the embedding row of a
     * scored token (input and tied head), the first and the last layer */
    enum { N_SAMPLES = 4 };
    static const struct {
        const char *name;
        int64_t     j;
    } k_samples[N_SAMPLES] = {
        {"model.embed_tokens.weight", 77LL * 64 + 40},
        {"model.layers.0.self_attn.q_proj.weight", 333},
        {"model.layers.1.mlp.down_proj.weight", 1234},
        {"model.layers.0.input_layernorm.weight", 17},
    };
    double an[N_SAMPLES], fd[N_SAMPLES], scale = 0;
    for (int i = 0; i < N_SAMPLES; i++) {
        an[i] = grad_at(g, k_samples[i].name, k_samples[i].j);
        fd[i] = fd_grad(&r, k_samples[i].name, k_samples[i].j);
        scale = fmax(scale, fabs(fd[i]));
    }
    /* f32 gradients against float64 differences: 1e-3 of the largest sampled gradient is ~1e4 f32 eps and well
     * above the observed ~1e-6, yet a wrong term would be off by O(1) of its own size */
    for (int i = 0; i < N_SAMPLES; i++) {
        CHECK_MSG(fabs(an[i] - fd[i]) <= 1e-3 * scale + 1e-3 * fabs(fd[i]), "%s[%lld]: grad %.9g vs fd %.9g",
                  k_samples[i].name, (long long)k_samples[i].j, an[i], fd[i]);
    }
    CHECK(scale > 1e-4);
    caprl_safetensors_free(g);
    caprl_safetensors_free(r.st);

    /* errors: nothing written */
    snprintf(cmd, sizeof cmd, "forward --model %s/m --ids 9,151 --loss-from 2 --dump-grads %s/bad.safetensors", tmp,
             tmp);
    CHECK(run_cli(cmd, NULL, 0) != 0);
    snprintf(cmd, sizeof cmd, "%s/bad.safetensors", tmp);
    CHECK(access(cmd, F_OK) != 0);
    snprintf(cmd, sizeof cmd, "forward --model %s/m --ids 9,151 --loss-from 0 --dump-grads %s/bad.safetensors", tmp,
             tmp);
    CHECK(run_cli(cmd, NULL, 0) == 1);
}

static void check_vl(const char *tmp) {
    char cmd[8192], out[4096];
    snprintf(cmd, sizeof cmd, "init-model --out %s/vl --preset tiny-vl --dtype f32 --seed 5 --std 0.1", tmp);
    CHECK(run_cli(cmd, NULL, 0) == 0);
    /* rgb8.png is 23 x 17: grid 1 x 4 x 6, six merged tokens for the one <|image_pad|> */
    snprintf(cmd, sizeof cmd,
             "forward --model %s/vl --image %s/tests/fixtures/img/rgb8.png --ids 9,151652,151655,151653,77,5,30000 "
             "--loss-from 2 --dump-grads %s/gv.safetensors",
             tmp, CAPRL_SOURCE_DIR, tmp);
    int rc = run_cli(cmd, out, sizeof out);
    CHECK_MSG(rc == 0, "forward --image --dump-grads: exit %d", rc);
    CHECK(strstr(out, "\"grid_thw\": [1, 4, 6]") != NULL);
    CHECK(summary_number(out, "\"tokens\": ") == 12);
    caprl_safetensors *model = NULL, *g = NULL;
    caprl_error        err = {0};
    snprintf(cmd, sizeof cmd, "%s/vl", tmp);
    CHECK_OK(caprl_safetensors_open_dir(&model, cmd, &err), &err);
    snprintf(cmd, sizeof cmd, "%s/gv.safetensors", tmp);
    CHECK_OK(caprl_safetensors_open(&g, cmd, &err), &err);
    if (model && g) {
        int64_t n_vision = 0;
        check_names(model, g, "visual.", &n_vision);
        CHECK(n_vision > 10);
    }
    caprl_safetensors_free(g);
    caprl_safetensors_free(model);
}

int main(void) {
    char *tmp = test_tmpdir("test_dump_grads");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    check_text(tmp);
    check_vl(tmp);
    free(tmp);
    return test_finish("test_dump_grads");
}
