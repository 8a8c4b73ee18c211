/* caprl generate --image and caprl forward --image on a tiny Qwen2.5-VL checkpoint made by init-model:
 * - generate's text equals the decoded tokens of caprl_vl_generate on the same checkpoint (greedy, the
 *   checkpoint's generation_config), at --threads 1 against the library's default thread count; -n 2 prints both;
 * - forward's dump with --prompt equals forward with the equivalent --ids, in the one-pad and the expanded form,
 *   and equals logits computed here from the lower-level calls (processor, tower, pad expansion, M-RoPE positions,
 *   one decode); its summary names the expanded length and grid_thw;
 * - bad inputs: --image on a text-only checkpoint, a missing or non-image file, pads that do not match the image,
 *   repeated --image, --prompt without --image: the right exit code and one line naming the problem, and no
 *   output file from a failed forward;
 * - init-model --language-model: a VL model built on a text model gives that text model's logits on text (M-RoPE
 *   with equal components is RoPE), and refuses a non-VL preset, shape overrides, a VL source and another dtype;
 * - init-model --vision-model: every visual.* tensor is the vision source's and every text tensor the language
 *   model's, byte for byte; a text-only source or one of another vision shape is refused and leaves nothing. */
#include <sys/stat.h>
#include <sys/wait.h>

#include "caprl/image.h"
#include "caprl/model.h"
#include "caprl/safetensors.h"
#include "caprl/tokenizer.h"
#include "caprl/vision.h"
#include "caprl/vlm.h"
#include "caprl_test.h"
#include "proc_util.h"

enum { VOCAB = 151936, IMAGE_PAD = 151655 };


/* The command fails with exit code `code` and exactly one stderr line containing needle. */
static void expect_fail(const char *cmdline, int code, const char *needle) {
    char err[8192];
    int  rc = run(cmdline, NULL, 0);
    read_stderr(err, sizeof err);
    int lines = 0;
    for (const char *p = err; *p; p++) {
        lines += *p == '\n';
    }
    CHECK_MSG(rc == code, "'%s' exited %d, expected %d; stderr: %s", cmdline, rc, code, err);
    CHECK_MSG(strstr(err, needle) != NULL, "'%s' stderr lacks '%s': %s", cmdline, needle, err);
    CHECK_MSG(lines == 1 && strstr(err, "caprl ") == err, "'%s': expected one error line, got: %s", cmdline, err);
}

static void ids_to_text(const int32_t *ids, int64_t n, char *out, size_t cap) {
    size_t len = 0;
    out[0] = '\0';
    for (int64_t i = 0; i < n && len < cap; i++) {
        len += (size_t)snprintf(out + len, cap - len, "%s%d", i ? "," : "", ids[i]);
    }
}

/* ---- the library's view of the checkpoint ----------------------------------------------------------------- */

typedef struct vl_lib {
    caprl_model            *m;
    caprl_vision           *v;
    caprl_preprocess_config pp;
    caprl_image             img;
} vl_lib;

static bool lib_open(vl_lib *l, const char *dir, const char *image) {
    caprl_error err = {0};
    memset(l, 0, sizeof *l);
    CHECK_OK(caprl_model_load(&l->m, dir, NULL, &err), &err);
    CHECK_OK(caprl_vision_load(&l->v, dir, 0, &err), &err);
    CHECK_OK(caprl_preprocess_config_load(&l->pp, dir, &err), &err);
    CHECK_OK(caprl_image_decode_file(image, NULL, &l->img, &err), &err);
    return l->m && l->v && l->img.data && caprl_model_tokenizer(l->m);
}

static void lib_close(vl_lib *l) {
    caprl_image_free(&l->img);
    caprl_vision_free(l->v);
    caprl_model_free(l->m);
}

typedef struct collected {
    int32_t ids[64];
    int32_t n;
} collected;

static bool collect(int32_t prompt, int32_t sample, int32_t token, void *ud) {
    (void)prompt, (void)sample;
    collected *c = ud;
    if (c->n < 64) {
        c->ids[c->n++] = token;
    }
    return true;
}

/* The greedy caption caprl_vl_generate gives, decoded as generate prints it. */
static void lib_caption(vl_lib *l, const char *prompt, int32_t max_new, char *text, size_t cap) {
    caprl_generate_params gp = caprl_generate_default_params();
    gp.max_new_tokens = max_new;
    gp.sampling.do_sample = false; /* init-model's generation_config.json: do_sample false */
    caprl_vl_request req = {&l->img, prompt, NULL, 0};
    caprl_context   *ctx = NULL;
    collected        c = {{0}, 0};
    caprl_error      err = {0};
    CHECK_OK(caprl_vl_generate(l->m, l->v, &l->pp, &req, 1, &gp, &ctx, collect, &c, NULL, NULL, &err), &err);
    size_t len = 0;
    CHECK_OK(caprl_tokenizer_decode(caprl_model_tokenizer(l->m), c.ids, c.n, true, text, cap, &len, &err), &err);
    CHECK(c.n >= 1 && len < cap);
    caprl_context_free(ctx);
}

/* Logits (T, V) of the expanded prompt, from the processor, the tower and the decoder called directly. */
static float *lib_logits(vl_lib *l, const int32_t *ids, int64_t T) {
    caprl_error err = {0};
    float      *pix = NULL;
    int64_t     n_patches = 0;
    int32_t     grid[3];
    CHECK_OK(caprl_image_preprocess(&l->img, &l->pp, &pix, &n_patches, grid, &err), &err);
    const int64_t n_rows = n_patches / 4, C = caprl_model_config(l->m)->hidden_size;
    float        *feats = malloc((size_t)(n_rows * C) * sizeof(float));
    CHECK_OK(caprl_vision_encode(l->v, pix, n_patches, 1176, grid, 1, feats, &err), &err);
    int32_t *pos = malloc((size_t)T * 3 * sizeof(int32_t)), *rows = malloc((size_t)T * sizeof(int32_t));
    int32_t  delta = 0, row = 0;
    CHECK_OK(caprl_vl_mrope_positions(ids, T, IMAGE_PAD, grid, 1, 2, pos, &delta, &err), &err);
    for (int64_t t = 0; t < T; t++) {
        rows[t] = ids[t] == IMAGE_PAD ? row++ : -1;
    }
    CHECK_EQ_I64(row, n_rows);
    caprl_context_params cp = caprl_context_default_params();
    cp.n_ctx = (int32_t)T;
    cp.n_batch_max = (int32_t)T;
    cp.n_logits_max = (int32_t)T;
    caprl_context *ctx = NULL;
    CHECK_OK(caprl_context_init(&ctx, l->m, &cp, &err), &err);
    int32_t *seq = calloc((size_t)T, sizeof(int32_t));
    int8_t  *want = malloc((size_t)T);
    memset(want, 1, (size_t)T);
    caprl_batch b = {.n_tokens = (int32_t)T, .tokens = ids, .seq_ids = seq, .want_logits = want, .mrope_pos = pos,
                     .embd = feats, .n_embd = (int32_t)n_rows, .embd_row = rows};
    float      *out = calloc((size_t)T * VOCAB, sizeof(float));
    CHECK_OK(caprl_context_decode(ctx, &b, &err), &err);
    for (int64_t t = 0; t < T && caprl_context_logits(ctx, (int32_t)t); t++) {
        memcpy(out + t * VOCAB, caprl_context_logits(ctx, (int32_t)t), (size_t)VOCAB * sizeof(float));
    }
    caprl_context_free(ctx);
    free(seq), free(want), free(pos), free(rows), free(feats);
    caprl_free(pix);
    return out;
}

/* ---- the checks ------------------------------------------------------------------------------------------- */

static void check_generate(const char *tmp, const char *img, vl_lib *l) {
    char cmd[16384], out[1 << 14], want[4096];
    snprintf(cmd, sizeof cmd, "%s generate --model %s/vl --image %s --prompt 'Describe the image.' --max-new-tokens 6 "
                              "--threads 1",
             CAPRL_CLI, tmp, img);
    CHECK(run(cmd, out, sizeof out) == 0);
    lib_caption(l, "Describe the image.", 6, want, sizeof want - 1);
    strcat(want, "\n");
    CHECK_MSG(strcmp(out, want) == 0, "generate --image printed '%s', the library's caption is '%s'", out, want);
    snprintf(cmd, sizeof cmd, "%s generate --model %s/vl --image %s --prompt hi --system '' -n 2 --temperature 1 "
                              "--max-new-tokens 3",
             CAPRL_CLI, tmp, img);
    CHECK(run(cmd, out, sizeof out) == 0 && strstr(out, "--- sample 0") && strstr(out, "--- sample 1"));

    snprintf(cmd, sizeof cmd, "%s generate --model %s/txt --image %s --prompt hi", CAPRL_CLI, tmp, img);
    expect_fail(cmd, 2, "text-only checkpoint");
    snprintf(cmd, sizeof cmd, "%s generate --model %s/vl --image %s/missing.png --prompt hi", CAPRL_CLI, tmp, tmp);
    expect_fail(cmd, 2, "missing.png");
    snprintf(cmd, sizeof cmd, "%s generate --model %s/vl --image %s --image %s --prompt hi", CAPRL_CLI, tmp, img, img);
    expect_fail(cmd, 1, "--image given more than once");
    snprintf(cmd, sizeof cmd, "%s generate --model %s/vl --image %s --prompt hi --alpha grey", CAPRL_CLI, tmp, img);
    expect_fail(cmd, 1, "--alpha");
}

static void check_forward(const char *tmp, const char *img, vl_lib *l) {
    char  cmd[16384], out[4096], path[4200], ids_text[8192];
    const char *prompt = "What is in the picture?";
    /* the ids forward --prompt must arrive at: the rendered prompt, one pad, and its expansion (6 merged tokens) */
    char       *text = NULL;
    caprl_error err = {0};
    CHECK_OK(caprl_vl_render_prompt(prompt, 1, NULL, &text, &err), &err);
    const caprl_tokenizer *tok = caprl_model_tokenizer(l->m);
    int32_t                raw[256], *expanded = NULL;
    int64_t                n_raw = 0, n_exp = 0, n_tok = 6;
    CHECK_OK(caprl_tokenizer_encode(tok, text, strlen(text), true, raw, 256, &n_raw, &err), &err);
    caprl_free(text);
    CHECK_OK(caprl_vl_expand_image_pads(raw, n_raw, IMAGE_PAD, &n_tok, 1, &expanded, &n_exp, &err), &err);
    if (!expanded || n_raw > 256) {
        return;
    }
    snprintf(cmd, sizeof cmd, "%s forward --model %s/vl --image %s --prompt '%s' --dump-logits %s/a.bin", CAPRL_CLI,
             tmp, img, prompt, tmp);
    CHECK(run(cmd, out, sizeof out) == 0);
    char summary[256];
    snprintf(summary, sizeof summary,
             "{\"tokens\": %lld, \"vocab\": %d, \"dtype\": \"float32\", \"file\": \"%s/a.bin\", "
             "\"grid_thw\": [1, 4, 6]}\n",
             (long long)n_exp, VOCAB, tmp);
    CHECK_STR_EQ(out, summary);
    ids_to_text(raw, n_raw, ids_text, sizeof ids_text);
    snprintf(cmd, sizeof cmd, "%s forward --model %s/vl --image %s --ids %s --dump-logits %s/b.bin", CAPRL_CLI, tmp,
             img, ids_text, tmp);
    CHECK(run(cmd, NULL, 0) == 0);
    ids_to_text(expanded, n_exp, ids_text, sizeof ids_text);
    snprintf(cmd, sizeof cmd, "%s forward --model %s/vl --image %s --ids %s --dump-logits %s/c.bin --threads 1",
             CAPRL_CLI, tmp, img, ids_text, tmp);
    CHECK(run(cmd, NULL, 0) == 0);
    size_t len_a = 0, len_b = 0, len_c = 0;
    snprintf(path, sizeof path, "%s/a.bin", tmp);
    char *a = read_all(path, &len_a);
    snprintf(path, sizeof path, "%s/b.bin", tmp);
    char *b = read_all(path, &len_b);
    snprintf(path, sizeof path, "%s/c.bin", tmp);
    char *c = read_all(path, &len_c);
    CHECK_EQ_I64(len_a, (size_t)n_exp * VOCAB * sizeof(float));
    CHECK_MSG(a && b && len_a == len_b && memcmp(a, b, len_a) == 0, "--prompt and one-pad --ids dumps differ");
    CHECK_MSG(a && c && len_a == len_c && memcmp(a, c, len_a) == 0, "--prompt and expanded --ids dumps differ");
    float *ref = lib_logits(l, expanded, n_exp);
    CHECK_MSG(a && len_a == (size_t)n_exp * VOCAB * sizeof(float) && memcmp(a, ref, len_a) == 0,
              "forward --image dump differs from the library's logits");
    free(ref), free(a), free(b), free(c);

    /* two pads for one image, and none; the failed runs write no file */
    snprintf(cmd, sizeof cmd, "%s forward --model %s/vl --image %s --ids 1,%d,2,%d --dump-logits %s/bad.bin", CAPRL_CLI,
             tmp, img, IMAGE_PAD, IMAGE_PAD, tmp);
    expect_fail(cmd, 1, "<|image_pad|>");
    snprintf(cmd, sizeof cmd, "%s forward --model %s/txt --image %s --ids 1,%d,2 --dump-logits %s/bad.bin", CAPRL_CLI,
             tmp, img, IMAGE_PAD, tmp);
    expect_fail(cmd, 2, "text-only checkpoint");
    snprintf(cmd, sizeof cmd, "%s forward --model %s/vl --image %s/vl/config.json --prompt hi --dump-logits %s/bad.bin",
             CAPRL_CLI, tmp, tmp, tmp);
    expect_fail(cmd, 2, "config.json");
    snprintf(cmd, sizeof cmd, "%s forward --model %s/vl --prompt hi --dump-logits %s/bad.bin", CAPRL_CLI, tmp, tmp);
    expect_fail(cmd, 1, "needs --image");
    snprintf(path, sizeof path, "%s/bad.bin", tmp);
    struct stat st;
    CHECK(stat(path, &st) != 0);
    caprl_free(expanded);
}

static void check_language_model(const char *tmp) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "%s init-model --out %s/lm --preset tiny --seed 11 --layers 3 --tokenizer "
                              "%s/data/qwen-tokenizer/tokenizer.json", CAPRL_CLI, tmp, CAPRL_SHARED_DIR);
    CHECK(run(cmd, NULL, 0) == 0);
    snprintf(cmd, sizeof cmd, "%s init-model --out %s/lmvl --preset tiny-vl --seed 3 --language-model %s/lm", CAPRL_CLI,
             tmp, tmp);
    CHECK(run(cmd, NULL, 0) == 0);
    const char *ids = "9707,11,1879,0,576,374,264,1273,315,279,3837,13,151645,198,42";
    for (int k = 0; k < 2; k++) {
        snprintf(cmd, sizeof cmd, "%s forward --model %s/%s --ids %s --dump-logits %s/lm%d.bin", CAPRL_CLI, tmp,
                 k ? "lmvl" : "lm", ids, tmp, k);
        CHECK(run(cmd, NULL, 0) == 0);
    }
    char   pa[4200], pb[4200];
    size_t na = 0, nb = 0;
    snprintf(pa, sizeof pa, "%s/lm0.bin", tmp);
    snprintf(pb, sizeof pb, "%s/lm1.bin", tmp);
    char *a = read_all(pa, &na), *b = read_all(pb, &nb);
    CHECK(a && b && na == nb && na == 15 * (size_t)VOCAB * sizeof(float));
    if (a && b && na == nb) {
        const float *x = (const float *)(const void *)a, *y = (const float *)(const void *)b;
        double       worst = 0, scale = 0;
        for (size_t i = 0; i < na / sizeof(float); i++) {
            worst = fmax(worst, fabs((double)x[i] - y[i]));
            scale = fmax(scale, fabs((double)x[i]));
        }
        /* the same weights and the same rotation angles: equal up to the order of a few f32 operations */
        CHECK_MSG(worst <= 1e-5 * scale && scale > 0, "text logits differ by %g (scale %g)", worst, scale);
    }
    free(a);
    free(b);
    snprintf(cmd, sizeof cmd, "rm -f %s %s", pa, pb);
    CHECK(system(cmd) == 0);
    snprintf(cmd, sizeof cmd, "%s init-model --out %s/x --preset tiny --language-model %s/lm", CAPRL_CLI, tmp, tmp);
    expect_fail(cmd, 1, "--language-model needs --preset tiny-vl");
    snprintf(cmd, sizeof cmd, "%s init-model --out %s/x --preset tiny-vl --hidden 32 --language-model %s/lm", CAPRL_CLI,
             tmp, tmp);
    expect_fail(cmd, 1, "--language-model gives the text shape");
    snprintf(cmd, sizeof cmd, "%s init-model --out %s/x --preset tiny-vl --language-model %s/lmvl", CAPRL_CLI, tmp, tmp);
    expect_fail(cmd, 1, "is already a vision-language model");
    snprintf(cmd, sizeof cmd, "%s init-model --out %s/x --preset tiny-vl --dtype f32 --language-model %s/lm", CAPRL_CLI,
             tmp, tmp);
    expect_fail(cmd, 2, "the weights are BF16: give --dtype bf16");
    snprintf(cmd, sizeof cmd, "%s init-model --out %s/x --preset tiny-vl --language-model %s/no-such-model", CAPRL_CLI,
             tmp, tmp);
    expect_fail(cmd, 2, "no-such-model/config.json");
    char x[4200];
    snprintf(x, sizeof x, "%s/x", tmp);
    CHECK_MSG(!file_exists(x), "a refused init-model left %s behind", x);
}

/* Tensors of the built model (dir/built) equal to the source's (dir/source): the visual.* ones when vision is set,
 * else the others; returns how many were compared. */
static int64_t check_taken(const char *built, const char *source, bool vision) {
    caprl_safetensors *b = NULL, *s = NULL;
    caprl_error        err = {0};
    CHECK_OK(caprl_safetensors_open_dir(&b, built, &err), &err);
    CHECK_OK(caprl_safetensors_open_dir(&s, source, &err), &err);
    int64_t n = 0;
    for (int64_t i = 0; b && s && i < caprl_safetensors_n_tensors(b); i++) {
        const caprl_st_tensor *t = caprl_safetensors_tensor(b, i);
        if ((strncmp(t->name, "visual.", 7) == 0) != vision) {
            continue;
        }
        const caprl_st_tensor *u = caprl_safetensors_find(s, t->name);
        CHECK_MSG(u && u->nbytes == t->nbytes && memcmp(u->data, t->data, t->nbytes) == 0,
                  "%s: tensor %s is not %s's", built, t->name, source);
        n++;
    }
    caprl_safetensors_free(b);
    caprl_safetensors_free(s);
    return n;
}

static void check_vision_model(const char *tmp) {
    char cmd[8192], lm[4200], vsrc[4200], built[4200];
    snprintf(lm, sizeof lm, "%s/lm", tmp); /* check_language_model's text model */
    snprintf(vsrc, sizeof vsrc, "%s/vsrc", tmp);
    snprintf(built, sizeof built, "%s/built", tmp);
    snprintf(cmd, sizeof cmd, "%s init-model --out %s --preset tiny-vl --seed 21", CAPRL_CLI, vsrc);
    CHECK(run(cmd, NULL, 0) == 0);
    snprintf(cmd, sizeof cmd, "%s init-model --out %s --preset tiny-vl --seed 3 --language-model %s --vision-model %s",
             CAPRL_CLI, built, lm, vsrc);
    CHECK(run(cmd, NULL, 0) == 0);
    CHECK_MSG(check_taken(built, vsrc, true) >= 20, "fewer vision tensors than a 2-block tower has");
    CHECK_MSG(check_taken(built, lm, false) > 0, "no text tensor compared");
    /* into an existing model directory: its model replaced, as a run without sources overwrites; other files kept */
    char keep[4300];
    snprintf(keep, sizeof keep, "%s/notes.txt", built);
    FILE *f = fopen(keep, "w");
    CHECK(f != NULL);
    if (f) {
        fclose(f);
    }
    snprintf(cmd, sizeof cmd, "%s init-model --out %s --preset tiny-vl --seed 3 --language-model %s --vision-model %s",
             CAPRL_CLI, built, lm, vsrc);
    CHECK(run(cmd, NULL, 0) == 0);
    CHECK_MSG(check_taken(built, vsrc, true) >= 20, "a rerun into the same directory did not take the tower");
    CHECK_MSG(file_exists(keep), "a rerun into the same directory lost %s", keep);
    char x[4200];
    snprintf(x, sizeof x, "%s/x", tmp);
    snprintf(cmd, sizeof cmd, "%s init-model --out %s --preset tiny-vl --vision-model %s", CAPRL_CLI, x, lm);
    expect_fail(cmd, 2, "not a Qwen2.5-VL checkpoint");
    snprintf(cmd, sizeof cmd, "%s init-model --out %s --preset tiny-vl --vision-hidden 48 --vision-model %s", CAPRL_CLI,
             x, vsrc);
    expect_fail(cmd, 2, "differs in dtype or shape");
    snprintf(cmd, sizeof cmd, "%s init-model --out %s --preset tiny --vision-model %s", CAPRL_CLI, x, vsrc);
    expect_fail(cmd, 1, "need --preset tiny-vl");
    char partial[4300];
    snprintf(partial, sizeof partial, "%s.partial", x);
    CHECK_MSG(!file_exists(x) && !file_exists(partial), "a refused init-model left %s behind", x);
}

int main(void) {
    char *tmp = test_tmpdir("cli_vl");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    char cmd[8192], img[4096], dir[4200];
    snprintf(img, sizeof img, "%s/tests/fixtures/img/rgb8.png", CAPRL_SOURCE_DIR); /* 23 x 17: grid 1 x 4 x 6 */
    snprintf(cmd, sizeof cmd, "(%s init-model --out %s/vl --preset tiny-vl --seed 7 --tokenizer "
                              "%s/data/qwen-tokenizer/tokenizer.json && %s init-model --out %s/txt --preset tiny)",
             CAPRL_CLI, tmp, CAPRL_SHARED_DIR, CAPRL_CLI, tmp);
    CHECK(run(cmd, NULL, 0) == 0);
    vl_lib l;
    snprintf(dir, sizeof dir, "%s/vl", tmp);
    if (lib_open(&l, dir, img)) {
        check_generate(tmp, img, &l);
        check_forward(tmp, img, &l);
    }
    lib_close(&l);
    check_language_model(tmp);
    check_vision_model(tmp);
    /* the dumps are tens of MB: keep them only when something failed */
    if (g_test_failures == 0) {
        snprintf(cmd, sizeof cmd, "rm -f %s/a.bin %s/b.bin %s/c.bin", tmp, tmp, tmp);
        CHECK(system(cmd) == 0);
    }
    free(tmp);
    return test_finish("test_cli_vl");
}
