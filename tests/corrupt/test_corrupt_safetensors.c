/* Malformed safetensors files and sharded checkpoints (the llama.cpp test-gguf pattern): an enum of corruption
 * kinds, each file built here, each expecting a specific status and a message that names the file and the
 * tensor or field. Plus: every prefix of a valid file, every header length, and byte substitutions in the
 * header must give an error (never a crash, never an out-of-bounds pointer). Buffers are allocated at their
 * exact size so that ASan sees any over-read. */
#include "caprl/safetensors.h"
#include "caprl_test.h"
#include "core/error_impl.h"
#include "fmt/safetensors_impl.h"

#define FILE_NAME "bad.safetensors"

/* Builds u64le(N) + header + padding + data_size zero bytes; N = padded header length unless n_override. */
static uint8_t *make_file(const char *header, size_t header_len, size_t pad, size_t data_size, bool use_override,
                          uint64_t n_override, size_t *size) {
    size_t   hl = header_len + pad;
    size_t   n = 8 + hl + data_size;
    uint8_t *buf = malloc(n ? n : 1);
    uint64_t N = use_override ? n_override : (uint64_t)hl;
    for (int i = 0; i < 8; i++) {
        buf[i] = (uint8_t)(N >> (8 * i));
    }
    memcpy(buf + 8, header, header_len);
    memset(buf + 8 + header_len, ' ', pad);
    memset(buf + 8 + hl, 0, data_size);
    *size = n;
    return buf;
}

/* ---- the table -------------------------------------------------------------------------------------------- */

enum corrupt_kind {
    K_EMPTY_FILE,
    K_SHORT_FILE,
    K_HEADER_OVER_LIMIT,
    K_HEADER_U64_MAX,
    K_HEADER_PAST_END,
    K_HEADER_ZERO,
    K_NOT_BRACE,
    K_LEADING_SPACE,
    K_INVALID_UTF8,
    K_OVERLONG_UTF8,
    K_INVALID_JSON,
    K_TRAILING_GARBAGE,
    K_NUL_ESCAPE,
    K_RAW_NUL,
    K_DEEP_NESTING,
    K_TENSOR_NOT_OBJECT,
    K_MISSING_DTYPE,
    K_MISSING_SHAPE,
    K_MISSING_OFFSETS,
    K_EXTRA_FIELD,
    K_DTYPE_NOT_STRING,
    K_DTYPE_UNKNOWN,
    K_DTYPE_F8,
    K_DTYPE_LOWERCASE,
    K_SHAPE_NOT_ARRAY,
    K_SHAPE_NEGATIVE,
    K_SHAPE_REAL,
    K_SHAPE_STRING,
    K_SHAPE_NULL,
    K_SHAPE_HUGE_DIM,
    K_SHAPE_INT_OVERFLOW,
    K_SHAPE_PRODUCT_OVERFLOW,
    K_TOO_MANY_DIMS,
    K_OFFSETS_NOT_ARRAY,
    K_OFFSETS_ONE,
    K_OFFSETS_THREE,
    K_OFFSETS_NEGATIVE,
    K_OFFSETS_REAL,
    K_END_BEFORE_BEGIN,
    K_PAST_DATA,
    K_PAST_DATA_HUGE,
    K_SIZE_MISMATCH,
    K_OVERLAP,
    K_SAME_RANGE,
    K_EMPTY_INSIDE_OTHER,
    K_HOLE,
    K_FIRST_NOT_ZERO,
    K_TRAILING_BYTES,
    K_NO_TENSORS_BUT_DATA,
    K_DUPLICATE_NAME,
    K_METADATA_NOT_OBJECT,
    K_METADATA_NON_STRING,
    K_METADATA_NESTED,
    K_COUNT
};

typedef struct corrupt_case {
    int          kind;
    const char  *header; /* NULL: built in make_case */
    size_t       data_size;
    caprl_status want;
    const char  *needle; /* besides the file name, which every message must contain */
} corrupt_case;

#define F32A(offs) "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":" offs "}}"

static const corrupt_case k_cases[] = {
    {K_EMPTY_FILE, NULL, 0, CAPRL_ERR_FORMAT, "too short"},
    {K_SHORT_FILE, NULL, 0, CAPRL_ERR_FORMAT, "too short"},
    {K_HEADER_OVER_LIMIT, NULL, 0, CAPRL_ERR_FORMAT, "limit"},
    {K_HEADER_U64_MAX, NULL, 0, CAPRL_ERR_FORMAT, "limit"},
    {K_HEADER_PAST_END, NULL, 0, CAPRL_ERR_FORMAT, "past the end"},
    {K_HEADER_ZERO, NULL, 0, CAPRL_ERR_FORMAT, "'{'"},
    {K_NOT_BRACE, "[{\"a\":1}]", 0, CAPRL_ERR_FORMAT, "'{'"},
    {K_LEADING_SPACE, " {}", 0, CAPRL_ERR_FORMAT, "'{'"},
    {K_INVALID_UTF8, "{\"a\xff\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_FORMAT,
     ":1:"},
    {K_OVERLONG_UTF8, "{\"a\xc0\xaf\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_FORMAT,
     ":1:"},
    {K_INVALID_JSON, "{\"a\":{\"dtype\":\"F32\",", 0, CAPRL_ERR_FORMAT, ":1:"},
    {K_TRAILING_GARBAGE, F32A("[0,8]") " x", 8, CAPRL_ERR_FORMAT, ":1:"},
    {K_NUL_ESCAPE, "{\"a\\u0000b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_FORMAT,
     ":1:"},
    {K_RAW_NUL, NULL, 8, CAPRL_ERR_FORMAT, ":1:"},
    {K_DEEP_NESTING, NULL, 0, CAPRL_ERR_FORMAT, ":1:"},
    {K_TENSOR_NOT_OBJECT, "{\"a\":[1]}", 0, CAPRL_ERR_FORMAT, "tensor 'a'"},
    {K_MISSING_DTYPE, "{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_FORMAT, "'dtype'"},
    {K_MISSING_SHAPE, "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_FORMAT, "'shape'"},
    {K_MISSING_OFFSETS, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, CAPRL_ERR_FORMAT, "'data_offsets'"},
    {K_EXTRA_FIELD, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"strides\":[1]}}", 8,
     CAPRL_ERR_FORMAT, "'strides'"},
    {K_DTYPE_NOT_STRING, "{\"a\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_FORMAT, "dtype"},
    {K_DTYPE_UNKNOWN, "{\"a\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_UNSUPPORTED,
     "'F33'"},
    {K_DTYPE_F8, "{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2, CAPRL_ERR_UNSUPPORTED,
     "'F8_E4M3'"},
    {K_DTYPE_LOWERCASE, "{\"a\":{\"dtype\":\"f32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_UNSUPPORTED,
     "'f32'"},
    {K_SHAPE_NOT_ARRAY, "{\"a\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_FORMAT,
     "shape"},
    {K_SHAPE_NEGATIVE, "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_FORMAT,
     "negative"},
    {K_SHAPE_REAL, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_FORMAT,
     "integer"},
    {K_SHAPE_STRING, "{\"a\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_FORMAT,
     "integer"},
    {K_SHAPE_NULL, "{\"a\":{\"dtype\":\"F32\",\"shape\":[null],\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_FORMAT,
     "integer"},
    {K_SHAPE_HUGE_DIM, "{\"a\":{\"dtype\":\"F32\",\"shape\":[9223372036854775807],\"data_offsets\":[0,8]}}", 8,
     CAPRL_ERR_FORMAT, "overflow"},
    {K_SHAPE_INT_OVERFLOW, "{\"a\":{\"dtype\":\"F32\",\"shape\":[18446744073709551616],\"data_offsets\":[0,8]}}", 8,
     CAPRL_ERR_FORMAT, ":1:"},
    {K_SHAPE_PRODUCT_OVERFLOW,
     "{\"a\":{\"dtype\":\"I8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", 8, CAPRL_ERR_FORMAT,
     "overflows"},
    {K_TOO_MANY_DIMS, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
     CAPRL_ERR_UNSUPPORTED, "9 dims"},
    {K_OFFSETS_NOT_ARRAY, F32A("0"), 8, CAPRL_ERR_FORMAT, "data_offsets"},
    {K_OFFSETS_ONE, F32A("[0]"), 8, CAPRL_ERR_FORMAT, "data_offsets"},
    {K_OFFSETS_THREE, F32A("[0,8,8]"), 8, CAPRL_ERR_FORMAT, "data_offsets"},
    {K_OFFSETS_NEGATIVE, F32A("[-8,0]"), 8, CAPRL_ERR_FORMAT, "non-negative"},
    {K_OFFSETS_REAL, F32A("[0,8.0]"), 8, CAPRL_ERR_FORMAT, "data_offsets"},
    {K_END_BEFORE_BEGIN, F32A("[8,0]"), 8, CAPRL_ERR_FORMAT, "end before"},
    {K_PAST_DATA, F32A("[0,8]"), 4, CAPRL_ERR_FORMAT, "exceed data size 4"},
    {K_PAST_DATA_HUGE, F32A("[9223372036854775799,9223372036854775807]"), 8, CAPRL_ERR_FORMAT, "exceed data size"},
    {K_SIZE_MISMATCH, F32A("[0,12]"), 12, CAPRL_ERR_FORMAT, "needs 8"},
    {K_OVERLAP,
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
     12, CAPRL_ERR_FORMAT, "overlap"},
    {K_SAME_RANGE,
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"b\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
     8, CAPRL_ERR_FORMAT, "overlap"},
    {K_EMPTY_INSIDE_OTHER,
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]}}",
     8, CAPRL_ERR_FORMAT, "tensor 'a'"},
    {K_HOLE,
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}",
     20, CAPRL_ERR_FORMAT, "hole of 4 bytes after tensor 'a'"},
    {K_FIRST_NOT_ZERO, F32A("[4,12]"), 12, CAPRL_ERR_FORMAT, "hole of 4 bytes after the start"},
    {K_TRAILING_BYTES, F32A("[0,8]"), 12, CAPRL_ERR_FORMAT, "belong to no tensor"},
    {K_NO_TENSORS_BUT_DATA, "{\"__metadata__\":{\"format\":\"pt\"}}", 4, CAPRL_ERR_FORMAT, "belong to no tensor"},
    {K_DUPLICATE_NAME,
     "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
     16, CAPRL_ERR_FORMAT, "duplicate"},
    {K_METADATA_NOT_OBJECT,
     "{\"__metadata__\":\"pt\",\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
     CAPRL_ERR_FORMAT, "__metadata__"},
    {K_METADATA_NON_STRING, "{\"__metadata__\":{\"format\":1}}", 0, CAPRL_ERR_FORMAT, "'format'"},
    {K_METADATA_NESTED, "{\"__metadata__\":{\"x\":{\"y\":\"z\"}}}", 0, CAPRL_ERR_FORMAT, "'x'"},
};

/* The file image of a case (plain header string, or built here). Caller frees. */
static uint8_t *make_case(const corrupt_case *c, size_t *size) {
    switch (c->kind) {
        case K_EMPTY_FILE: *size = 0; return malloc(1);
        case K_SHORT_FILE: {
            uint8_t *b = malloc(5);
            memcpy(b, "\x10\0\0\0\0", 5);
            *size = 5;
            return b;
        }
        case K_HEADER_OVER_LIMIT: return make_file("{}", 2, 6, 0, true, (uint64_t)CAPRL_ST_MAX_HEADER + 1, size);
        case K_HEADER_U64_MAX: return make_file("{}", 2, 6, 0, true, UINT64_MAX, size);
        case K_HEADER_PAST_END: return make_file("{}", 2, 6, 0, true, 9, size);
        case K_HEADER_ZERO: return make_file("{}", 2, 6, 0, true, 0, size);
        case K_RAW_NUL: {
            const char *h = F32A("[0,8]");
            size_t      n = strlen(h);
            char        tmp[128];
            memcpy(tmp, h, n);
            memset(tmp + n, 0, 3); /* padded with NUL instead of spaces */
            return make_file(tmp, n + 3, 0, 8, false, 0, size);
        }
        case K_DEEP_NESTING: {
            /* jansson limits depth (2048), so this is an error, not a stack overflow */
            size_t depth = 100000, n = 5 + 2 * depth + 1;
            char  *h = malloc(n);
            memcpy(h, "{\"a\":", 5);
            memset(h + 5, '[', depth);
            memset(h + 5 + depth, ']', depth);
            h[n - 1] = '}';
            uint8_t *b = make_file(h, n, 0, 0, false, 0, size);
            free(h);
            return b;
        }
        default: return make_file(c->header, strlen(c->header), 0, c->data_size, false, 0, size);
    }
}

static void test_table(void) {
    CHECK_EQ_I64(sizeof k_cases / sizeof k_cases[0], K_COUNT);
    for (size_t i = 0; i < sizeof k_cases / sizeof k_cases[0]; i++) {
        const corrupt_case *c = &k_cases[i];
        CHECK_EQ_I64(c->kind, (int64_t)i); /* the table follows the enum */
        size_t   size = 0;
        uint8_t *full = make_case(c, &size);
        /* exact-size copy so that ASan catches any read past the end */
        uint8_t *buf = malloc(size ? size : 1);
        memcpy(buf, full, size);
        free(full);
        caprl_error        err = {0};
        caprl_safetensors *st = NULL;
        caprl_status       s = caprl_safetensors_open_buffer(&st, buf, size, FILE_NAME, &err);
        CHECK_MSG(s == c->want, "case %zu: status %d, expected %d: %s", i, (int)s, (int)c->want, err.msg);
        CHECK_MSG(st == NULL, "case %zu: output set on failure", i);
        CHECK_MSG(strstr(err.msg, FILE_NAME) != NULL, "case %zu: no file name in '%s'", i, err.msg);
        CHECK_MSG(strstr(err.msg, c->needle) != NULL, "case %zu: '%s' not in '%s'", i, c->needle, err.msg);
        if (s == CAPRL_OK) {
            caprl_safetensors_free(st);
        }
        free(buf);
    }
}

/* ---- systematic mutations of a valid file ------------------------------------------------------------------ */

static uint8_t *valid_file(size_t *size) {
    caprl_st_writer *w = caprl_st_writer_init();
    caprl_error      err = {0};
    static uint8_t   data[64];
    for (size_t i = 0; i < sizeof data; i++) {
        data[i] = (uint8_t)(i * 37u + 1u);
    }
    const int64_t s1[2] = {2, 3}, s2[1] = {4}, s3[2] = {0, 2};
    CHECK_OK(caprl_st_writer_add(w, "w", CAPRL_DTYPE_F32, 2, s1, data, &err), &err);
    CHECK_OK(caprl_st_writer_add(w, "b", CAPRL_DTYPE_BF16, 1, s2, data, &err), &err);
    CHECK_OK(caprl_st_writer_add(w, "e", CAPRL_DTYPE_I64, 2, s3, NULL, &err), &err);
    CHECK_OK(caprl_st_writer_add(w, "s", CAPRL_DTYPE_U8, 0, NULL, data, &err), &err);
    CHECK_OK(caprl_st_writer_set_metadata(w, "format", "pt", &err), &err);
    uint8_t *img = NULL;
    CHECK_OK(caprl_st_writer_serialize(w, &img, size, &err), &err);
    caprl_st_writer_free(w);
    return img;
}

/* Opens an exact-size copy; on success checks that every tensor lies inside the buffer. */
static caprl_status open_copy(const uint8_t *src, size_t n, caprl_error *err) {
    uint8_t *buf = malloc(n ? n : 1);
    memcpy(buf, src, n);
    caprl_safetensors *st = NULL;
    caprl_status       s = caprl_safetensors_open_buffer(&st, buf, n, FILE_NAME, err);
    if (s == CAPRL_OK) {
        for (int64_t i = 0; i < caprl_safetensors_n_tensors(st); i++) {
            const caprl_st_tensor *t = caprl_safetensors_tensor(st, i);
            const uint8_t         *p = t->data;
            CHECK(p >= buf + 8 && p <= buf + n && t->nbytes <= (size_t)(buf + n - p));
        }
        caprl_safetensors_free(st);
    } else {
        CHECK_MSG(strstr(err->msg, FILE_NAME) != NULL, "no file name in '%s'", err->msg);
    }
    free(buf);
    return s;
}

static void test_mutations(void) {
    size_t   size = 0;
    uint8_t *img = valid_file(&size);
    caprl_error err = {0};
    CHECK_OK(open_copy(img, size, &err), &err);

    /* every proper prefix is an error */
    for (size_t len = 0; len < size; len++) {
        caprl_status s = open_copy(img, len, &err);
        CHECK_MSG(s == CAPRL_ERR_FORMAT, "prefix %zu of %zu: status %d", len, size, (int)s);
    }
    /* every extension by trailing bytes is an error (they belong to no tensor) */
    uint8_t *longer = calloc(1, size + 16);
    memcpy(longer, img, size);
    for (size_t extra = 1; extra <= 16; extra++) {
        CHECK_EQ_I64(open_copy(longer, size + extra, &err), CAPRL_ERR_FORMAT);
    }
    free(longer);

    /* every header length other than the true one is an error */
    uint64_t hlen = 0;
    CHECK(caprl_rd_u64le(img, size, 0, &hlen));
    uint8_t *mut = malloc(size);
    for (uint64_t n = 0; n <= hlen + 64; n++) {
        memcpy(mut, img, size);
        for (int i = 0; i < 8; i++) {
            mut[i] = (uint8_t)(n >> (8 * i));
        }
        caprl_status s = open_copy(mut, size, &err);
        /* a shorter length that only cuts trailing padding spaces still parses, but then the data buffer
         * starts early and no longer tiles */
        CHECK_MSG((n == hlen) == (s == CAPRL_OK), "header length %llu: status %d", (unsigned long long)n, (int)s);
    }

    /* byte substitutions in the header: never a crash, and an accepted file stays in bounds */
    static const uint8_t subs[] = {'{', '}', '[', ']', '"', ',', ':', '0', '1', '9', '-', ' ', 'e', '.', 0x00, 0xff,
                                   0x80, 'F', 'a'};
    int n_ok = 0, n_err = 0;
    for (size_t pos = 8; pos < 8 + hlen; pos++) {
        for (size_t k = 0; k < sizeof subs; k++) {
            memcpy(mut, img, size);
            if (mut[pos] == subs[k]) {
                continue;
            }
            mut[pos] = subs[k];
            if (open_copy(mut, size, &err) == CAPRL_OK) {
                n_ok++;
            } else {
                n_err++;
            }
        }
    }
    CHECK(n_err > 0);
    fprintf(stderr, "header substitutions: %d accepted, %d rejected\n", n_ok, n_err);
    free(mut);
    free(img);
}

/* ---- sharded checkpoints ------------------------------------------------------------------------------------ */

enum index_kind {
    I_SHARD_PARENT,
    I_SHARD_ABSOLUTE,
    I_SHARD_SUBDIR,
    I_SHARD_DOTDOT,
    I_SHARD_EMPTY,
    I_SHARD_BACKSLASH,
    I_SHARD_MISSING,
    I_TENSOR_NOT_IN_SHARD,
    I_WRONG_SHARD,
    I_DUPLICATE_ACROSS_SHARDS,
    I_SHARD_CORRUPT,
    I_INVALID_JSON,
    I_NOT_OBJECT,
    I_NO_WEIGHT_MAP,
    I_WEIGHT_MAP_NOT_OBJECT,
    I_WEIGHT_MAP_EMPTY,
    I_VALUE_NOT_STRING,
    I_DUPLICATE_KEY,
    I_METADATA_NOT_OBJECT,
    I_COUNT
};

typedef struct index_case {
    int          kind;
    const char  *index;
    caprl_status want;
    const char  *needle;
} index_case;

/* Every case directory holds s.safetensors {x, y}, t.safetensors {w}, u.safetensors {x, x2} and a corrupt
 * junk.safetensors. */
static const index_case k_index_cases[] = {
    {I_SHARD_PARENT, "{\"weight_map\":{\"x\":\"../s.safetensors\"}}", CAPRL_ERR_FORMAT, "'../s.safetensors'"},
    {I_SHARD_ABSOLUTE, "{\"weight_map\":{\"x\":\"/etc/passwd\"}}", CAPRL_ERR_FORMAT, "'/etc/passwd'"},
    {I_SHARD_SUBDIR, "{\"weight_map\":{\"x\":\"sub/s.safetensors\"}}", CAPRL_ERR_FORMAT, "'sub/s.safetensors'"},
    {I_SHARD_DOTDOT, "{\"weight_map\":{\"x\":\"..\"}}", CAPRL_ERR_FORMAT, "weight_map.x"},
    {I_SHARD_EMPTY, "{\"weight_map\":{\"x\":\"\"}}", CAPRL_ERR_FORMAT, "weight_map.x"},
    {I_SHARD_BACKSLASH, "{\"weight_map\":{\"x\":\"..\\\\s.safetensors\"}}", CAPRL_ERR_FORMAT, "weight_map.x"},
    {I_SHARD_MISSING, "{\"weight_map\":{\"x\":\"s.safetensors\",\"q\":\"nope.safetensors\"}}", CAPRL_ERR_IO,
     "nope.safetensors"},
    {I_TENSOR_NOT_IN_SHARD, "{\"weight_map\":{\"x\":\"s.safetensors\",\"zz\":\"s.safetensors\"}}",
     CAPRL_ERR_FORMAT, "'zz'"},
    {I_WRONG_SHARD, "{\"weight_map\":{\"x\":\"t.safetensors\",\"w\":\"t.safetensors\",\"y\":\"s.safetensors\"}}",
     CAPRL_ERR_FORMAT, "'x'"},
    {I_DUPLICATE_ACROSS_SHARDS,
     "{\"weight_map\":{\"x\":\"s.safetensors\",\"y\":\"s.safetensors\",\"x2\":\"u.safetensors\"}}",
     CAPRL_ERR_FORMAT, "appears in both"},
    {I_SHARD_CORRUPT, "{\"weight_map\":{\"x\":\"junk.safetensors\"}}", CAPRL_ERR_FORMAT,
     "junk.safetensors: header length 64 runs past the end"},
    {I_INVALID_JSON, "{\"weight_map\":{\"x\":\"s.safetensors\",}}", CAPRL_ERR_FORMAT, "index.json:1:"},
    {I_NOT_OBJECT, "[]", CAPRL_ERR_FORMAT, "index.json"},
    {I_NO_WEIGHT_MAP, "{\"metadata\":{\"total_size\":8}}", CAPRL_ERR_FORMAT, "'weight_map'"},
    {I_WEIGHT_MAP_NOT_OBJECT, "{\"weight_map\":[\"s.safetensors\"]}", CAPRL_ERR_FORMAT, "'weight_map'"},
    {I_WEIGHT_MAP_EMPTY, "{\"weight_map\":{}}", CAPRL_ERR_FORMAT, "'weight_map'"},
    {I_VALUE_NOT_STRING, "{\"weight_map\":{\"x\":3}}", CAPRL_ERR_FORMAT, "'weight_map.x'"},
    {I_DUPLICATE_KEY, "{\"weight_map\":{\"x\":\"s.safetensors\",\"x\":\"s.safetensors\"}}", CAPRL_ERR_FORMAT,
     "duplicate"},
    {I_METADATA_NOT_OBJECT, "{\"metadata\":5,\"weight_map\":{\"x\":\"s.safetensors\"}}", CAPRL_ERR_FORMAT,
     "'metadata'"},
};

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    if (!fp || fwrite(data, 1, n, fp) != n) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    fclose(fp);
}

static void write_shard(const char *dir, const char *name, const char *const *names, int n) {
    caprl_st_writer *w = caprl_st_writer_init();
    caprl_error      err = {0};
    static float     data[4] = {1, 2, 3, 4};
    const int64_t    shape[1] = {4};
    for (int i = 0; i < n; i++) {
        CHECK_OK(caprl_st_writer_add(w, names[i], CAPRL_DTYPE_F32, 1, shape, data, &err), &err);
    }
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    CHECK_OK(caprl_st_writer_save(w, path, &err), &err);
    caprl_st_writer_free(w);
}

static void test_index(const char *root) {
    CHECK_EQ_I64(sizeof k_index_cases / sizeof k_index_cases[0], I_COUNT);
    /* u.safetensors repeats x: a weight_map that opens both s and u must be refused */
    const char *s_names[] = {"x", "y"}, *t_names[] = {"w"}, *u_names[] = {"x", "x2"};
    for (size_t i = 0; i < sizeof k_index_cases / sizeof k_index_cases[0]; i++) {
        const index_case *c = &k_index_cases[i];
        CHECK_EQ_I64(c->kind, (int64_t)i);
        char dir[4200], cmd[8500], path[4300];
        snprintf(dir, sizeof dir, "%s/index%02zu", root, i);
        snprintf(cmd, sizeof cmd, "mkdir -p '%s/sub'", dir);
        CHECK(system(cmd) == 0);
        write_shard(dir, "s.safetensors", s_names, 2);
        write_shard(dir, "t.safetensors", t_names, 1);
        write_shard(dir, "u.safetensors", u_names, 2);
        snprintf(path, sizeof path, "%s/junk.safetensors", dir);
        write_bytes(path, "\x40\0\0\0\0\0\0\0{}", 10); /* header length past the end */
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
        write_bytes(path, c->index, strlen(c->index));

        caprl_error        err = {0};
        caprl_safetensors *st = NULL;
        caprl_status       s = caprl_safetensors_open_dir(&st, dir, &err);
        CHECK_MSG(s == c->want, "index case %zu: status %d, expected %d: %s", i, (int)s, (int)c->want, err.msg);
        CHECK_MSG(st == NULL, "index case %zu: output set on failure", i);
        CHECK_MSG(strstr(err.msg, c->needle) != NULL, "index case %zu: '%s' not in '%s'", i, c->needle, err.msg);
        CHECK_MSG(strstr(err.msg, dir) != NULL, "index case %zu: directory not in '%s'", i, err.msg);
        if (s == CAPRL_OK) {
            caprl_safetensors_free(st);
        }
    }
}

int main(void) {
    caprl_log_set_level(CAPRL_LOG_ERROR);
    char *dir = test_tmpdir("corrupt_safetensors");
    test_table();
    test_mutations();
    test_index(dir);
    free(dir);
    return test_finish("test_corrupt_safetensors");
}
