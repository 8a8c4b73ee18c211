/* safetensors: writer -> reader round trips (every dtype, scalar and empty tensors, metadata, bit-exact data),
 * a hand-written file from the format description, sharded directories, the expect helper, writer argument
 * checks and allocation-failure injection. Malformed inputs are in tests/corrupt/test_corrupt_safetensors.c. */
#include "caprl/safetensors.h"
#include "caprl_test.h"
#include "core/error_impl.h"
#include "fmt/safetensors_impl.h"

/* Deterministic pseudo-random bytes (NaN payloads, denormals and all) so bit-exactness is really tested. */
static void fill_bytes(uint8_t *p, size_t n, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1u;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        p[i] = (uint8_t)(x >> 24);
    }
}

static uint8_t *read_file(const char *path, size_t *size) {
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        return NULL;
    }
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *buf = malloc((size_t)n + 1);
    *size = fread(buf, 1, (size_t)n, fp);
    fclose(fp);
    return buf;
}

static void write_text(const char *path, const char *text) {
    FILE *fp = fopen(path, "wb");
    if (!fp) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    fputs(text, fp);
    fclose(fp);
}

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char  *p = malloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* ---- one tensor of each dtype plus edge shapes ---------------------------------------------------------- */

#define N_EXTRA 4

typedef struct fixture {
    char     names[CAPRL_DTYPE_COUNT + N_EXTRA][32];
    int32_t  dtypes[CAPRL_DTYPE_COUNT + N_EXTRA];
    int32_t  n_dims[CAPRL_DTYPE_COUNT + N_EXTRA];
    int64_t  shapes[CAPRL_DTYPE_COUNT + N_EXTRA][CAPRL_ST_MAX_DIMS];
    uint8_t *data[CAPRL_DTYPE_COUNT + N_EXTRA];
    size_t   nbytes[CAPRL_DTYPE_COUNT + N_EXTRA];
    int      n;
} fixture;

static void fixture_add(fixture *f, const char *name, int32_t dtype, int32_t n_dims, const int64_t *shape) {
    int i = f->n++;
    snprintf(f->names[i], sizeof f->names[i], "%s", name);
    f->dtypes[i] = dtype;
    f->n_dims[i] = n_dims;
    size_t numel = 1;
    for (int32_t d = 0; d < n_dims; d++) {
        f->shapes[i][d] = shape[d];
        numel *= (size_t)shape[d];
    }
    f->nbytes[i] = numel * caprl_dtype_size(dtype);
    f->data[i] = malloc(f->nbytes[i] ? f->nbytes[i] : 1);
    fill_bytes(f->data[i], f->nbytes[i], (uint32_t)i + 7u);
}

static void fixture_init(fixture *f) {
    memset(f, 0, sizeof *f);
    for (int32_t d = 0; d < CAPRL_DTYPE_COUNT; d++) {
        char          name[32];
        const int64_t shape[3] = {2, 3, d + 1};
        snprintf(name, sizeof name, "w.%s", caprl_dtype_name(d));
        fixture_add(f, name, d, 3, shape);
    }
    const int64_t empty[2] = {0, 5}, empty2[2] = {3, 0}, big[1] = {1000};
    fixture_add(f, "scalar", CAPRL_DTYPE_F32, 0, NULL);
    fixture_add(f, "empty.a", CAPRL_DTYPE_BF16, 2, empty);
    fixture_add(f, "empty.b", CAPRL_DTYPE_I64, 2, empty2);
    fixture_add(f, "model.layers.0.mlp.up_proj.weight", CAPRL_DTYPE_BF16, 1, big);
}

static void fixture_free(fixture *f) {
    for (int i = 0; i < f->n; i++) {
        free(f->data[i]);
    }
}

static caprl_st_writer *fixture_writer(const fixture *f, bool with_meta) {
    caprl_st_writer *w = caprl_st_writer_init();
    caprl_error      err = {0};
    /* added in reverse so that the writer's own ordering is what the file shows */
    for (int i = f->n - 1; i >= 0; i--) {
        CHECK_OK(caprl_st_writer_add(w, f->names[i], f->dtypes[i], f->n_dims[i], f->shapes[i], f->data[i], &err),
                 &err);
    }
    if (with_meta) {
        CHECK_OK(caprl_st_writer_set_metadata(w, "format", "pt", &err), &err);
        CHECK_OK(caprl_st_writer_set_metadata(w, "note", "caf\xc3\xa9 \"quoted\"", &err), &err);
        CHECK_OK(caprl_st_writer_set_metadata(w, "note", "caf\xc3\xa9 \"quoted\" v2", &err), &err); /* replaces */
    }
    return w;
}

static void check_fixture(const caprl_safetensors *st, const fixture *f) {
    CHECK_EQ_I64(caprl_safetensors_n_tensors(st), f->n);
    for (int i = 0; i < f->n; i++) {
        const caprl_st_tensor *t = caprl_safetensors_find(st, f->names[i]);
        CHECK_MSG(t != NULL, "%s missing", f->names[i]);
        if (!t) {
            continue;
        }
        CHECK_STR_EQ(t->name, f->names[i]);
        CHECK_EQ_I64(t->dtype, f->dtypes[i]);
        CHECK_EQ_I64(t->n_dims, f->n_dims[i]);
        int64_t numel = 1;
        for (int32_t d = 0; d < t->n_dims; d++) {
            CHECK_EQ_I64(t->shape[d], f->shapes[i][d]);
            numel *= f->shapes[i][d];
        }
        CHECK_EQ_I64(t->numel, numel);
        CHECK_EQ_I64(t->nbytes, f->nbytes[i]);
        CHECK_MSG(f->nbytes[i] == 0 || memcmp(t->data, f->data[i], f->nbytes[i]) == 0, "%s data differs",
                  f->names[i]);
    }
    /* name order through caprl_safetensors_tensor */
    for (int64_t i = 1; i < caprl_safetensors_n_tensors(st); i++) {
        CHECK(strcmp(caprl_safetensors_tensor(st, i - 1)->name, caprl_safetensors_tensor(st, i)->name) < 0);
    }
    CHECK(caprl_safetensors_tensor(st, -1) == NULL);
    CHECK(caprl_safetensors_tensor(st, f->n) == NULL);
    CHECK(caprl_safetensors_find(st, "nope") == NULL);
    CHECK(caprl_safetensors_find(st, "") == NULL);
}

static void test_roundtrip(const char *dir) {
    fixture f;
    fixture_init(&f);
    caprl_error      err = {0};
    caprl_st_writer *w = fixture_writer(&f, true);
    char            *path = join(dir, "model.safetensors");
    CHECK_OK(caprl_st_writer_save(w, path, &err), &err);

    /* the in-memory image is byte-identical to the file */
    uint8_t *img = NULL;
    size_t   img_size = 0;
    CHECK_OK(caprl_st_writer_serialize(w, &img, &img_size, &err), &err);
    size_t   file_size = 0;
    uint8_t *file = read_file(path, &file_size);
    CHECK(file != NULL && file_size == img_size && memcmp(file, img, img_size) == 0);

    /* layout: the header length is a multiple of 8, the header opens with the metadata, padding is spaces,
     * and every tensor is naturally aligned relative to the data start (writer sorted by element size) */
    uint64_t hlen = 0;
    CHECK(caprl_rd_u64le(img, img_size, 0, &hlen));
    CHECK(hlen % 8 == 0 && hlen + 8 <= img_size);
    CHECK(memcmp(img + 8, "{\"__metadata__\":{\"format\":\"pt\",\"note\":", 38) == 0);
    CHECK(img[8 + hlen - 1] == ' ' || img[8 + hlen - 1] == '}');

    caprl_safetensors *st = NULL;
    CHECK_OK(caprl_safetensors_open(&st, path, &err), &err);
    if (st) {
        check_fixture(st, &f);
        CHECK_STR_EQ(caprl_safetensors_metadata(st, "format"), "pt");
        CHECK_STR_EQ(caprl_safetensors_metadata(st, "note"), "caf\xc3\xa9 \"quoted\" v2");
        CHECK(caprl_safetensors_metadata(st, "missing") == NULL);
        CHECK_STR_EQ(caprl_safetensors_find(st, "scalar")->file, path);
        caprl_safetensors_free(st);
    }

    st = NULL;
    CHECK_OK(caprl_safetensors_open_buffer(&st, img, img_size, "image", &err), &err);
    if (st) {
        check_fixture(st, &f);
        const uint8_t *data0 = img + 8 + hlen;
        for (int64_t i = 0; i < caprl_safetensors_n_tensors(st); i++) {
            const caprl_st_tensor *t = caprl_safetensors_tensor(st, i);
            size_t                 off = (size_t)((const uint8_t *)t->data - data0);
            CHECK_MSG(off % caprl_dtype_size(t->dtype) == 0, "%s at %zu", t->name, off);
        }
        caprl_safetensors_free(st);
    }

    /* the directory form finds model.safetensors */
    st = NULL;
    CHECK_OK(caprl_safetensors_open_dir(&st, dir, &err), &err);
    if (st) {
        check_fixture(st, &f);
        caprl_safetensors_free(st);
    }
    free(file);
    free(img);
    free(path);
    caprl_st_writer_free(w);
    fixture_free(&f);
}

static void test_default_metadata_and_empty(void) {
    caprl_error      err = {0};
    caprl_st_writer *w = caprl_st_writer_init();
    uint8_t         *img = NULL;
    size_t           n = 0;
    CHECK_OK(caprl_st_writer_serialize(w, &img, &n, &err), &err);
    caprl_safetensors *st = NULL;
    CHECK_OK(caprl_safetensors_open_buffer(&st, img, n, "empty", &err), &err);
    if (st) {
        CHECK_EQ_I64(caprl_safetensors_n_tensors(st), 0);
        CHECK_STR_EQ(caprl_safetensors_metadata(st, "format"), "pt");
        CHECK(caprl_safetensors_tensor(st, 0) == NULL);
        caprl_safetensors_free(st);
    }
    /* 32 bytes of JSON, already a multiple of 8: no padding */
    CHECK(n == 8 + 32 && memcmp(img + 8, "{\"__metadata__\":{\"format\":\"pt\"}}", 32) == 0);
    CHECK(img[0] == 32 && img[1] == 0 && img[7] == 0);
    free(img);
    caprl_st_writer_free(w);
}

/* The example of the safetensors README, written by hand (not by our writer), plus padding with spaces. */
static void test_handwritten(void) {
    const char *hdr = "{\"test\":{\"dtype\":\"I32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                      "\"__metadata__\":{\"foo\":\"bar\"}}";
    size_t   hl = strlen(hdr), padded = (hl + 7) / 8 * 8, size = 8 + padded + 16;
    uint8_t *buf = malloc(size);
    for (int i = 0; i < 8; i++) {
        buf[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    }
    memcpy(buf + 8, hdr, hl);
    memset(buf + 8 + hl, ' ', padded - hl);
    const int32_t vals[4] = {1, -2, 3, 0x7fffffff};
    for (int i = 0; i < 4; i++) { /* little-endian, whatever the host */
        for (int b = 0; b < 4; b++) {
            buf[8 + padded + 4 * (size_t)i + (size_t)b] = (uint8_t)((uint32_t)vals[i] >> (8 * b));
        }
    }
    caprl_error        err = {0};
    caprl_safetensors *st = NULL;
    CHECK_OK(caprl_safetensors_open_buffer(&st, buf, size, "readme", &err), &err);
    if (st) {
        const caprl_st_tensor *t = caprl_safetensors_find(st, "test");
        CHECK(t && t->dtype == CAPRL_DTYPE_I32 && t->n_dims == 2 && t->shape[0] == 2 && t->shape[1] == 2);
        CHECK(t && t->numel == 4 && t->nbytes == 16);
        if (t) {
            int32_t got[4];
            memcpy(got, t->data, sizeof got);
            CHECK(got[0] == 1 && got[1] == -2 && got[2] == 3 && got[3] == 0x7fffffff);
        }
        CHECK_STR_EQ(caprl_safetensors_metadata(st, "foo"), "bar");
        caprl_safetensors_free(st);
    }
    free(buf);
}

/* ---- sharded checkpoints ------------------------------------------------------------------------------ */

static void write_shard(const char *dir, const char *name, const char *const *tensors, int n, uint32_t seed,
                        const char *meta) {
    caprl_st_writer *w = caprl_st_writer_init();
    caprl_error      err = {0};
    uint8_t          data[8][24];
    for (int i = 0; i < n; i++) {
        const int64_t shape[2] = {2, 3};
        fill_bytes(data[i], 24, seed + (uint32_t)i);
        CHECK_OK(caprl_st_writer_add(w, tensors[i], CAPRL_DTYPE_F32, 2, shape, data[i], &err), &err);
    }
    if (meta) {
        CHECK_OK(caprl_st_writer_set_metadata(w, "shard", meta, &err), &err);
    }
    char *path = join(dir, name);
    CHECK_OK(caprl_st_writer_save(w, path, &err), &err);
    free(path);
    caprl_st_writer_free(w);
}

static void test_sharded(const char *root) {
    char *dir = join(root, "sharded");
    char  cmd[4200];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", dir);
    CHECK(system(cmd) == 0);
    const char *a[] = {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"};
    const char *b[] = {"lm_head.weight", "model.norm.weight", "model.layers.1.mlp.up_proj.weight"};
    write_shard(dir, "model-00001-of-00002.safetensors", a, 2, 100, "first");
    write_shard(dir, "model-00002-of-00002.safetensors", b, 3, 200, "second");
    char *index = join(dir, "model.safetensors.index.json");
    write_text(index, "{\n  \"metadata\": {\"total_size\": 120},\n  \"weight_map\": {\n"
                      "    \"lm_head.weight\": \"model-00002-of-00002.safetensors\",\n"
                      "    \"model.embed_tokens.weight\": \"model-00001-of-00002.safetensors\",\n"
                      "    \"model.layers.0.mlp.up_proj.weight\": \"model-00001-of-00002.safetensors\",\n"
                      "    \"model.layers.1.mlp.up_proj.weight\": \"model-00002-of-00002.safetensors\",\n"
                      "    \"model.norm.weight\": \"model-00002-of-00002.safetensors\"\n  }\n}\n");
    /* a stray single-file checkpoint must be ignored when the index exists */
    write_shard(dir, "model.safetensors", a, 1, 999, "stray");

    caprl_error        err = {0};
    caprl_safetensors *st = NULL;
    CHECK_OK(caprl_safetensors_open_dir(&st, dir, &err), &err);
    if (st) {
        CHECK_EQ_I64(caprl_safetensors_n_tensors(st), 5);
        CHECK_STR_EQ(caprl_safetensors_metadata(st, "shard"), "first");
        for (int k = 0; k < 2; k++) {
            const char *const *names = k == 0 ? a : b;
            int                n = k == 0 ? 2 : 3;
            for (int i = 0; i < n; i++) {
                const caprl_st_tensor *t = caprl_safetensors_find(st, names[i]);
                CHECK_MSG(t != NULL, "%s", names[i]);
                if (!t) {
                    continue;
                }
                uint8_t want[24];
                fill_bytes(want, 24, (k == 0 ? 100u : 200u) + (uint32_t)i);
                CHECK(memcmp(t->data, want, 24) == 0);
                CHECK(strstr(t->file, k == 0 ? "model-00001-of-00002" : "model-00002-of-00002") != NULL);
            }
        }
        for (int64_t i = 1; i < caprl_safetensors_n_tensors(st); i++) {
            CHECK(strcmp(caprl_safetensors_tensor(st, i - 1)->name, caprl_safetensors_tensor(st, i)->name) < 0);
        }
        /* expect(): found, wrong dtype, wrong shape, missing */
        const int64_t          shape[2] = {2, 3}, bad_shape[2] = {3, 2};
        const caprl_st_tensor *t = NULL;
        CHECK_OK(caprl_safetensors_expect(st, "model.norm.weight", 1u << CAPRL_DTYPE_F32, 2, shape, &t, &err), &err);
        CHECK(t != NULL && strcmp(t->name, "model.norm.weight") == 0);
        CHECK_EQ_I64(caprl_safetensors_expect(st, "model.norm.weight",
                                              (1u << CAPRL_DTYPE_BF16) | (1u << CAPRL_DTYPE_F16), 2, shape, NULL, &err),
                     CAPRL_ERR_UNSUPPORTED);
        CHECK(strstr(err.msg, "model.norm.weight") && strstr(err.msg, "F32") && strstr(err.msg, "BF16 or F16"));
        CHECK(strstr(err.msg, "model-00002-of-00002.safetensors") != NULL);
        CHECK_EQ_I64(caprl_safetensors_expect(st, "model.norm.weight", 1u << CAPRL_DTYPE_F32, 2, bad_shape, NULL,
                                              &err),
                     CAPRL_ERR_FORMAT);
        CHECK(strstr(err.msg, "model.norm.weight") && strstr(err.msg, "[2, 3]") && strstr(err.msg, "[3, 2]"));
        CHECK_EQ_I64(caprl_safetensors_expect(st, "model.norm.weight", 1u << CAPRL_DTYPE_F32, 1, shape, NULL, &err),
                     CAPRL_ERR_FORMAT);
        CHECK_EQ_I64(caprl_safetensors_expect(st, "nope.weight", 1u << CAPRL_DTYPE_F32, 2, shape, NULL, &err),
                     CAPRL_ERR_FORMAT);
        CHECK(strstr(err.msg, "nope.weight") && strstr(err.msg, "not found"));
        CHECK_EQ_I64(caprl_safetensors_expect(st, "model.norm.weight", 1u << CAPRL_DTYPE_F32, 9, shape, NULL, &err),
                     CAPRL_ERR_INVALID_ARG);
        caprl_safetensors_free(st);
    }

    /* allocation failures anywhere in the sharded path give CAPRL_ERR_OOM and leak nothing */
    int64_t n_fail = 0;
    for (;; n_fail++) {
        caprl_test_fail_alloc_after(n_fail);
        st = NULL;
        caprl_status s = caprl_safetensors_open_dir(&st, dir, &err);
        if (s == CAPRL_OK) {
            caprl_safetensors_free(st);
            break;
        }
        CHECK_MSG(s == CAPRL_ERR_OOM, "n=%lld: status %d: %s", (long long)n_fail, (int)s, err.msg);
        CHECK(st == NULL);
        if (n_fail > 100000) {
            CHECK_MSG(0, "fault injection never stops failing");
            break;
        }
    }
    caprl_test_fail_alloc_after(-1);
    CHECK(n_fail > 5);
    fprintf(stderr, "open_dir: %lld injected allocation failures handled\n", (long long)n_fail);
    free(index);
    free(dir);
}

/* ---- writer argument checks and fault injection -------------------------------------------------------- */

static void test_writer_errors(const char *dir) {
    caprl_error      err = {0};
    caprl_st_writer *w = caprl_st_writer_init();
    float            x[6] = {0};
    const int64_t    shape[2] = {2, 3}, neg[2] = {2, -3}, huge[2] = {INT64_MAX, 2};
    const int64_t    nine[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    CHECK_OK(caprl_st_writer_add(w, "a", CAPRL_DTYPE_F32, 2, shape, x, &err), &err);
    CHECK_EQ_I64(caprl_st_writer_add(w, "a", CAPRL_DTYPE_F32, 2, shape, x, &err), CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "duplicate") && strstr(err.msg, "'a'"));
    CHECK_EQ_I64(caprl_st_writer_add(w, "b", CAPRL_DTYPE_F32, 2, neg, x, &err), CAPRL_ERR_INVALID_ARG);
    CHECK(strstr(err.msg, "'b'") != NULL);
    CHECK_EQ_I64(caprl_st_writer_add(w, "b", CAPRL_DTYPE_F32, 2, huge, x, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_EQ_I64(caprl_st_writer_add(w, "b", CAPRL_DTYPE_F32, 9, nine, x, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_EQ_I64(caprl_st_writer_add(w, "b", CAPRL_DTYPE_COUNT, 2, shape, x, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_EQ_I64(caprl_st_writer_add(w, "b", -1, 2, shape, x, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_EQ_I64(caprl_st_writer_add(w, "b", CAPRL_DTYPE_F32, 2, shape, NULL, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_EQ_I64(caprl_st_writer_add(w, "__metadata__", CAPRL_DTYPE_F32, 2, shape, x, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_OK(caprl_st_writer_add(w, "", CAPRL_DTYPE_F32, 2, shape, x, &err), &err); /* legal, if odd */
    CHECK_EQ_I64(caprl_st_writer_add(w, "bad\xff", CAPRL_DTYPE_F32, 2, shape, x, &err), CAPRL_ERR_INVALID_ARG);
    CHECK_EQ_I64(caprl_st_writer_set_metadata(w, "k", "\xc3", &err), CAPRL_ERR_INVALID_ARG);
    CHECK_OK(caprl_st_writer_add(w, "zero", CAPRL_DTYPE_F32, 2, (const int64_t[]){0, 3}, NULL, &err), &err);

    /* a save into a missing directory is an I/O error naming the path and leaves nothing behind */
    char *bad = join(dir, "no/such/dir/x.safetensors");
    CHECK_EQ_I64(caprl_st_writer_save(w, bad, &err), CAPRL_ERR_IO);
    CHECK(strstr(err.msg, "no/such/dir") != NULL);
    free(bad);

    /* fault injection on the writer */
    int64_t n_fail = 0;
    for (;; n_fail++) {
        uint8_t *img = NULL;
        size_t   n = 0;
        caprl_test_fail_alloc_after(n_fail);
        caprl_status s = caprl_st_writer_serialize(w, &img, &n, &err);
        if (s == CAPRL_OK) {
            free(img);
            break;
        }
        CHECK_MSG(s == CAPRL_ERR_OOM, "n=%lld: status %d: %s", (long long)n_fail, (int)s, err.msg);
        if (n_fail > 10000) {
            break;
        }
    }
    caprl_test_fail_alloc_after(-1);
    CHECK(n_fail >= 2); /* the order array and the image */
    caprl_st_writer_free(w);
    caprl_st_writer_free(NULL);
}

static void test_open_errors(const char *dir) {
    caprl_error        err = {0};
    caprl_safetensors *st = NULL;
    char              *missing = join(dir, "missing.safetensors");
    CHECK_EQ_I64(caprl_safetensors_open(&st, missing, &err), CAPRL_ERR_IO);
    CHECK(st == NULL && strstr(err.msg, "missing.safetensors") != NULL);
    char *empty_dir = join(dir, "emptydir");
    char  cmd[4200];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", empty_dir);
    CHECK(system(cmd) == 0);
    CHECK_EQ_I64(caprl_safetensors_open_dir(&st, empty_dir, &err), CAPRL_ERR_IO);
    CHECK(strstr(err.msg, "emptydir") != NULL);
    CHECK_EQ_I64(caprl_safetensors_open_dir(&st, missing, &err), CAPRL_ERR_IO);
    CHECK(strstr(err.msg, "missing.safetensors") != NULL);
    CHECK_EQ_I64(caprl_safetensors_open_buffer(&st, NULL, 5, "x", &err), CAPRL_ERR_INVALID_ARG);
    CHECK(st == NULL);
    caprl_safetensors_free(NULL);
    CHECK(caprl_safetensors_n_tensors(NULL) == 0);
    free(missing);
    free(empty_dir);
}

static void test_fault_injection_single(void) {
    fixture f;
    fixture_init(&f);
    caprl_error      err = {0};
    caprl_st_writer *w = fixture_writer(&f, true);
    uint8_t         *img = NULL;
    size_t           n = 0;
    CHECK_OK(caprl_st_writer_serialize(w, &img, &n, &err), &err);
    int64_t k = 0;
    for (;; k++) {
        caprl_safetensors *st = NULL;
        caprl_test_fail_alloc_after(k);
        caprl_status s = caprl_safetensors_open_buffer(&st, img, n, "image", &err);
        if (s == CAPRL_OK) {
            check_fixture(st, &f);
            caprl_safetensors_free(st);
            break;
        }
        CHECK_MSG(s == CAPRL_ERR_OOM, "k=%lld: status %d: %s", (long long)k, (int)s, err.msg);
        if (k > 100000) {
            break;
        }
    }
    caprl_test_fail_alloc_after(-1);
    CHECK(k >= 4); /* names, tensors, metadata, spans */
    fprintf(stderr, "open_buffer: %lld injected allocation failures handled\n", (long long)k);
    free(img);
    caprl_st_writer_free(w);
    fixture_free(&f);
}

int main(void) {
    char *dir = test_tmpdir("safetensors");
    test_roundtrip(dir);
    test_default_metadata_and_empty();
    test_handwritten();
    test_sharded(dir);
    test_writer_errors(dir);
    test_open_errors(dir);
    test_fault_injection_single();
    free(dir);
    return test_finish("test_safetensors");
}
