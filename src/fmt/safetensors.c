/* safetensors reader (single files, sharded directories, in-memory images) and atomic writer.
 *
 * Format (spec/qwen.md §1): u64le N, N bytes of JSON header (an object, may be right-padded with spaces), then
 * the data buffer. Every value taken from a file is validated before use (style.md §11.5): the header length
 * against the file and the 100 MB limit, the JSON (jansson, duplicates rejected), each tensor's fields, dtype,
 * dims and shape product (overflow-checked), data_offsets against the buffer and the byte size, and the
 * reference reader's tiling rule: sorted by begin, the tensors cover the buffer exactly with no hole or overlap.
 * The data pointers handed out point into the mapping and may be unaligned for their dtype.
 *
 * Depends on core (errors, checked math, files, log) and fmt/json. Allocations whose size depends on the file
 * go through caprl_try_malloc, so a failed one is CAPRL_ERR_OOM, never an abort. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/safetensors.h"
#include "core/ckmath.h"
#include "core/error_impl.h"
#include "core/file_impl.h"
#include "core/log_impl.h"
#include "fmt/json_impl.h"
#include "fmt/safetensors_impl.h"

#define ST_INDEX_NAME     "model.safetensors.index.json"
#define ST_SINGLE_NAME    "model.safetensors"
#define ST_INDEX_MAX      ((size_t)64 << 20) /* weight maps of the largest public checkpoints are ~2 MB */
#define ST_METADATA_KEY   "__metadata__"
#define ST_SHAPE_STR_CAP  160

typedef struct st_meta {
    const char *key; /* in st_file.strings */
    const char *value;
} st_meta;

/* One parsed file. */
typedef struct st_file {
    char             *name;    /* display name (path or buffer name); caprl_st_tensor.file points here */
    caprl_mapped_file map;     /* zeroed for in-memory images */
    char             *strings; /* tensor names and metadata, one block */
    caprl_st_tensor  *tensors; /* name order; NULL once moved into the reader */
    int64_t           n_tensors;
    st_meta          *meta;
    int64_t           n_meta;
} st_file;

struct caprl_safetensors {
    char            *source; /* file, directory or buffer name, for messages */
    st_file         *files;  /* a sharded set: shard names in sorted order */
    int32_t          n_files;
    caprl_st_tensor *tensors; /* all files, name order */
    int64_t          n_tensors;
};

/* A tensor's byte range, for the tiling check. */
typedef struct st_span {
    size_t      begin;
    size_t      end;
    const char *name;
} st_span;

/* ---- small helpers --------------------------------------------------------------------------------------- */

bool caprl_rd_u64le(const uint8_t *buf, size_t size, size_t off, uint64_t *out) {
    if (off > size || size - off < 8) {
        return false;
    }
    uint8_t b[8];
    memcpy(b, buf + off, 8);
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | b[i];
    }
    *out = v;
    return true;
}

static void wr_u64le(uint8_t *dst, uint64_t v) {
    for (int i = 0; i < 8; i++) {
        dst[i] = (uint8_t)(v >> (8 * i));
    }
}

static const char *shape_str(const int64_t *shape, int32_t n_dims, char *buf, size_t cap) {
    size_t pos = 0;
    buf[0] = '\0';
    for (int32_t i = 0; i < n_dims && pos + 1 < cap; i++) {
        int k = snprintf(buf + pos, cap - pos, "%s%lld", i ? ", " : "[", (long long)shape[i]);
        if (k < 0) {
            break;
        }
        pos += (size_t)k;
    }
    if (n_dims == 0) {
        snprintf(buf, cap, "[]");
    } else if (pos + 1 < cap) {
        snprintf(buf + pos, cap - pos, "]");
    }
    return buf;
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const caprl_st_tensor *)a)->name, ((const caprl_st_tensor *)b)->name);
}

static int cmp_span(const void *a, const void *b) {
    const st_span *x = a, *y = b;
    if (x->begin != y->begin) {
        return x->begin < y->begin ? -1 : 1;
    }
    if (x->end != y->end) {
        return x->end < y->end ? -1 : 1;
    }
    return strcmp(x->name, y->name);
}

static int cmp_cstr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void file_release(st_file *f) {
    if (!f) {
        return;
    }
    free(f->name);
    caprl_file_unmap(&f->map);
    free(f->strings);
    free(f->tensors);
    free(f->meta);
    memset(f, 0, sizeof *f);
}

/* ---- header parsing -------------------------------------------------------------------------------------- */

/* Known to safetensors but not to caprl: named explicitly so the message can say "not supported" rather than
 * "unknown" (both are CAPRL_ERR_UNSUPPORTED). */
static bool dtype_known_elsewhere(const char *s) {
    static const char *const names[] = {"F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
                                        "F4",      "F6_E2M3", "F6_E3M2", "C64"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strcmp(names[i], s) == 0) {
            return true;
        }
    }
    return false;
}

static caprl_status parse_dtype(const st_file *f, const char *name, const json_t *v, int32_t *out,
                                caprl_error *err) {
    if (!json_is_string(v)) {
        char got[64];
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': dtype must be a string, got %s", f->name, name,
                             caprl_json_describe(v, got, sizeof got));
    }
    const char *s = json_string_value(v);
    int32_t     dt = caprl_dtype_from_name(s);
    if (dt < 0) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: tensor '%s': dtype '%.32s' is %s", f->name, name, s,
                             dtype_known_elsewhere(s) ? "not supported by caprl" : "unknown");
    }
    *out = dt;
    return CAPRL_OK;
}

static caprl_status parse_shape(const st_file *f, const char *name, const json_t *v, caprl_st_tensor *t,
                                caprl_error *err) {
    char got[64];
    if (!json_is_array(v)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': shape must be an array, got %s", f->name, name,
                             caprl_json_describe(v, got, sizeof got));
    }
    size_t n = json_array_size(v);
    if (n > CAPRL_ST_MAX_DIMS) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: tensor '%s': %zu dims, more than the %d supported",
                             f->name, name, n, CAPRL_ST_MAX_DIMS);
    }
    int64_t numel = 1;
    for (size_t i = 0; i < n; i++) {
        const json_t *d = json_array_get(v, i);
        int64_t       x = 0;
        if (!caprl_json_int_value(d, &x)) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': shape[%zu] must be an integer, got %s",
                                 f->name, name, i, caprl_json_describe(d, got, sizeof got));
        }
        if (x < 0) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': shape[%zu] is negative (%lld)", f->name,
                                 name, i, (long long)x);
        }
        if (!caprl_mul_i64(numel, x, &numel)) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': the product of shape %s overflows",
                                 f->name, name, caprl_json_describe(v, got, sizeof got));
        }
        t->shape[i] = x;
    }
    t->n_dims = (int32_t)n;
    t->numel = numel;
    /* numel fits in int64; the byte count must also fit in size_t */
    if ((uint64_t)numel > (uint64_t)SIZE_MAX || !caprl_mul_size((size_t)numel, caprl_dtype_size(t->dtype),
                                                                &t->nbytes)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': %lld elements of %s overflow the byte count",
                             f->name, name, (long long)numel, caprl_dtype_name(t->dtype));
    }
    return CAPRL_OK;
}

static caprl_status parse_offsets(const st_file *f, const char *name, const json_t *v, size_t data_size,
                                  const caprl_st_tensor *t, st_span *span, caprl_error *err) {
    char got[64];
    if (!json_is_array(v) || json_array_size(v) != 2) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': data_offsets must be [begin, end], got %s",
                             f->name, name, caprl_json_describe(v, got, sizeof got));
    }
    int64_t b = 0, e = 0;
    if (!caprl_json_int_value(json_array_get(v, 0), &b) || !caprl_json_int_value(json_array_get(v, 1), &e) || b < 0 ||
        e < 0) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT,
                             "%s: tensor '%s': data_offsets must be two non-negative integers, got %s", f->name, name,
                             caprl_json_describe(v, got, sizeof got));
    }
    if (e < b) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': data_offsets [%lld,%lld) end before they begin",
                             f->name, name, (long long)b, (long long)e);
    }
    if ((uint64_t)e > (uint64_t)data_size) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': data_offsets [%lld,%lld) exceed data size %zu",
                             f->name, name, (long long)b, (long long)e, data_size);
    }
    size_t begin = (size_t)b, end = (size_t)e;
    if (end - begin != t->nbytes) {
        char shape[ST_SHAPE_STR_CAP];
        return caprl_err_set(err, CAPRL_ERR_FORMAT,
                             "%s: tensor '%s': data_offsets [%zu,%zu) hold %zu bytes but %s %s needs %zu", f->name,
                             name, begin, end, end - begin, caprl_dtype_name(t->dtype),
                             shape_str(t->shape, t->n_dims, shape, sizeof shape), t->nbytes);
    }
    span->begin = begin;
    span->end = end;
    span->name = name;
    return CAPRL_OK;
}

/* One header entry {"dtype", "shape", "data_offsets"}; name already copied into the string block. */
static caprl_status parse_tensor(const st_file *f, const char *name, const json_t *v, size_t data_size,
                                 caprl_st_tensor *t, st_span *span, caprl_error *err) {
    char got[64];
    if (!json_is_object(v)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': expected an object, got %s", f->name, name,
                             caprl_json_describe(v, got, sizeof got));
    }
    const json_t *fields[3] = {NULL, NULL, NULL};
    static const char *const field_names[3] = {"dtype", "shape", "data_offsets"};
    const char              *key;
    json_t                  *value;
    json_object_foreach((json_t *)(uintptr_t)v, key, value) {
        int k = 0;
        while (k < 3 && strcmp(key, field_names[k]) != 0) {
            k++;
        }
        if (k == 3) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': unknown field '%.64s'", f->name, name, key);
        }
        fields[k] = value;
    }
    for (int k = 0; k < 3; k++) {
        if (!fields[k]) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': missing field '%s'", f->name, name,
                                 field_names[k]);
        }
    }
    t->name = name;
    t->file = f->name;
    CAPRL_TRY(parse_dtype(f, name, fields[0], &t->dtype, err));
    CAPRL_TRY(parse_shape(f, name, fields[1], t, err));
    return parse_offsets(f, name, fields[2], data_size, t, span, err);
}

/* Counts tensors, metadata entries and the bytes of their strings; checks __metadata__'s shape. */
static caprl_status count_header(const st_file *f, const json_t *root, int64_t *n_tensors, int64_t *n_meta,
                                 size_t *str_bytes, caprl_error *err) {
    const char *key;
    json_t     *value;
    size_t      bytes = 0;
    int64_t     nt = 0, nm = 0;
    json_object_foreach((json_t *)(uintptr_t)root, key, value) {
        if (strcmp(key, ST_METADATA_KEY) != 0) {
            nt++;
            bytes += strlen(key) + 1; /* bounded by the header length, itself <= CAPRL_ST_MAX_HEADER */
            continue;
        }
        char got[64];
        if (!json_is_object(value)) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: __metadata__ must be an object of strings, got %s",
                                 f->name, caprl_json_describe(value, got, sizeof got));
        }
        const char *mk;
        json_t     *mv;
        json_object_foreach(value, mk, mv) {
            if (!json_is_string(mv)) {
                return caprl_err_set(err, CAPRL_ERR_FORMAT,
                                     "%s: __metadata__ value for key '%.64s' is not a string: %s", f->name, mk,
                                     caprl_json_describe(mv, got, sizeof got));
            }
            nm++;
            bytes += strlen(mk) + 1 + strlen(json_string_value(mv)) + 1;
        }
    }
    *n_tensors = nt;
    *n_meta = nm;
    *str_bytes = bytes;
    return CAPRL_OK;
}

/* The reference reader's rule: sorted by begin, each tensor starts where the previous ended, the first at 0, and
 * the last ends at the end of the buffer. Zero-byte tensors may sit anywhere on that chain. */
static caprl_status check_tiling(const st_file *f, st_span *spans, int64_t n, size_t data_size, caprl_error *err) {
    qsort(spans, (size_t)n, sizeof *spans, cmp_span);
    size_t      pos = 0;
    const char *prev = NULL;
    for (int64_t i = 0; i < n; i++) {
        const st_span *s = &spans[i];
        if (s->begin < pos) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT,
                                 "%s: tensor '%s': data_offsets [%zu,%zu) overlap tensor '%s', which ends at %zu",
                                 f->name, s->name, s->begin, s->end, prev ? prev : "?", pos);
        }
        if (s->begin > pos) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT,
                                 "%s: tensor '%s': data_offsets [%zu,%zu) leave a hole of %zu bytes after %s%s%s",
                                 f->name, s->name, s->begin, s->end, s->begin - pos, prev ? "tensor '" : "",
                                 prev ? prev : "the start of the data", prev ? "'" : "");
        }
        pos = s->end;
        prev = s->name;
    }
    if (pos != data_size) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT,
                             "%s: the data buffer has %zu bytes but the tensors end at %zu (%zu bytes belong to no "
                             "tensor)",
                             f->name, data_size, pos, data_size - pos);
    }
    return CAPRL_OK;
}

/* Copies s into the string block at *pos. */
static const char *put_str(char *block, size_t *pos, const char *s) {
    size_t n = strlen(s) + 1;
    char  *dst = block + *pos;
    memcpy(dst, s, n);
    *pos += n;
    return dst;
}

static caprl_status fill_header(st_file *f, const json_t *root, const uint8_t *data, size_t data_size,
                                st_span *spans, caprl_error *err) {
    const char *key;
    json_t     *value;
    size_t      pos = 0;
    int64_t     it = 0, im = 0;
    json_object_foreach((json_t *)(uintptr_t)root, key, value) {
        if (strcmp(key, ST_METADATA_KEY) == 0) {
            const char *mk;
            json_t     *mv;
            json_object_foreach(value, mk, mv) {
                f->meta[im].key = put_str(f->strings, &pos, mk);
                f->meta[im].value = put_str(f->strings, &pos, json_string_value(mv));
                im++;
            }
            continue;
        }
        caprl_st_tensor *t = &f->tensors[it];
        const char      *name = put_str(f->strings, &pos, key);
        CAPRL_TRY(parse_tensor(f, name, value, data_size, t, &spans[it], err));
        /* data + begin stays inside the buffer (begin <= end <= data_size); for an empty buffer data may be the
         * one-past-the-end pointer, never dereferenced since those tensors have 0 bytes. */
        t->data = data + spans[it].begin;
        it++;
    }
    return CAPRL_OK;
}

static caprl_status parse_json_header(st_file *f, const json_t *root, const uint8_t *data, size_t data_size,
                                      caprl_error *err) {
    int64_t n_tensors = 0, n_meta = 0;
    size_t  str_bytes = 0;
    CAPRL_TRY(count_header(f, root, &n_tensors, &n_meta, &str_bytes, err));

    size_t span_bytes = 0;
    bool   sizes_ok = caprl_mul_size((size_t)n_tensors, sizeof(st_span), &span_bytes);
    f->strings = caprl_try_malloc(str_bytes);
    f->tensors = caprl_try_calloc((size_t)n_tensors, sizeof(caprl_st_tensor));
    f->meta = caprl_try_calloc((size_t)n_meta, sizeof(st_meta));
    st_span *spans = sizes_ok ? caprl_try_malloc(span_bytes) : NULL;
    if (!f->strings || !f->tensors || !f->meta || !spans) {
        free(spans);
        return caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot allocate the index of %lld tensors", f->name,
                             (long long)n_tensors);
    }
    caprl_status st = fill_header(f, root, data, data_size, spans, err);
    if (st == CAPRL_OK) {
        st = check_tiling(f, spans, n_tensors, data_size, err);
    }
    free(spans);
    CAPRL_TRY(st);
    f->n_tensors = n_tensors;
    f->n_meta = n_meta;
    qsort(f->tensors, (size_t)n_tensors, sizeof *f->tensors, cmp_tensor_name);
    return CAPRL_OK;
}

/* Parses a whole file image buf[0..size) into f (f->name already set). On failure f holds partial state that
 * file_release frees. */
static caprl_status parse_file(st_file *f, const uint8_t *buf, size_t size, caprl_error *err) {
    uint64_t n = 0;
    if (!caprl_rd_u64le(buf, size, 0, &n)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: file is %zu bytes, too short for the 8-byte header length",
                             f->name, size);
    }
    if (n > CAPRL_ST_MAX_HEADER) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: header length %llu exceeds the limit of %u bytes", f->name,
                             (unsigned long long)n, CAPRL_ST_MAX_HEADER);
    }
    if (n > size - 8) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: header length %llu runs past the end of the %zu-byte file",
                             f->name, (unsigned long long)n, size);
    }
    size_t hlen = (size_t)n;
    if (hlen == 0 || buf[8] != '{') {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: the header does not start with '{'", f->name);
    }
    json_t      *root = NULL;
    char         label[CAPRL_ERROR_MSG_CAP / 2];
    caprl_status st;
    snprintf(label, sizeof label, "%s (header)", f->name);
    CAPRL_TRY(caprl_json_parse(&root, buf + 8, hlen, label, err));
    if (!json_is_object(root)) { /* unreachable after the '{' check, kept for clarity of the contract */
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: the header is not a JSON object", f->name);
    } else {
        size_t data_off = 8 + hlen;
        st = parse_json_header(f, root, buf + data_off, size - data_off, err);
    }
    json_decref(root);
    return st;
}

/* ---- the reader ------------------------------------------------------------------------------------------ */

static void reader_free_files(st_file *files, int32_t n) {
    for (int32_t i = 0; files && i < n; i++) {
        file_release(&files[i]);
    }
    free(files);
}

/* Builds the reader from parsed files (takes ownership of files and source in all cases). */
static caprl_status reader_new(caprl_safetensors **out, char *source, st_file *files, int32_t n_files,
                               caprl_error *err) {
    caprl_st_tensor *all = NULL;
    size_t           total = 0;
    caprl_status     st = CAPRL_OK;
    for (int32_t i = 0; i < n_files; i++) {
        total += (size_t)files[i].n_tensors; /* each count <= its header length / 2: no overflow */
    }
    if (n_files == 1) {
        all = files[0].tensors;
        files[0].tensors = NULL;
    } else {
        all = caprl_try_calloc(total, sizeof *all);
        if (!all) {
            st = caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot allocate the index of %zu tensors", source, total);
            goto fail;
        }
        size_t pos = 0;
        for (int32_t i = 0; i < n_files; i++) {
            if (files[i].n_tensors) {
                memcpy(all + pos, files[i].tensors, (size_t)files[i].n_tensors * sizeof *all);
            }
            pos += (size_t)files[i].n_tensors;
            free(files[i].tensors);
            files[i].tensors = NULL;
        }
        qsort(all, total, sizeof *all, cmp_tensor_name);
        for (size_t i = 1; i < total; i++) {
            if (strcmp(all[i - 1].name, all[i].name) == 0) {
                st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s' appears in both %s and %s", source,
                                   all[i].name, all[i - 1].file, all[i].file);
                goto fail;
            }
        }
    }
    caprl_safetensors *r = caprl_xcalloc(1, sizeof *r);
    r->source = source;
    r->files = files;
    r->n_files = n_files;
    r->tensors = all;
    r->n_tensors = (int64_t)total;
    *out = r;
    return CAPRL_OK;
fail:
    free(all);
    reader_free_files(files, n_files);
    free(source);
    return st;
}

/* Maps and parses path into f (f zeroed by the caller). */
static caprl_status open_mapped(st_file *f, const char *path, caprl_error *err) {
    f->name = caprl_xstrdup(path);
    CAPRL_TRY(caprl_file_map(&f->map, path, err));
    return parse_file(f, f->map.data, f->map.size, err);
}

caprl_status caprl_safetensors_open(caprl_safetensors **out, const char *path, caprl_error *err) {
    if (!out || !path) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_safetensors_open: NULL argument");
    }
    st_file *files = caprl_xcalloc(1, sizeof *files);
    caprl_status st = open_mapped(&files[0], path, err);
    if (st != CAPRL_OK) {
        reader_free_files(files, 1);
        return st;
    }
    return reader_new(out, caprl_xstrdup(path), files, 1, err);
}

caprl_status caprl_safetensors_open_buffer(caprl_safetensors **out, const void *buf, size_t size, const char *name,
                                           caprl_error *err) {
    if (!out || (!buf && size)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_safetensors_open_buffer: NULL argument");
    }
    const char *label = name ? name : "(buffer)";
    st_file    *files = caprl_xcalloc(1, sizeof *files);
    files[0].name = caprl_xstrdup(label);
    caprl_status st = parse_file(&files[0], buf, size, err);
    if (st != CAPRL_OK) {
        reader_free_files(files, 1);
        return st;
    }
    return reader_new(out, caprl_xstrdup(label), files, 1, err);
}

void caprl_safetensors_free(caprl_safetensors *st) {
    if (!st) {
        return;
    }
    reader_free_files(st->files, st->n_files);
    free(st->tensors);
    free(st->source);
    free(st);
}

int64_t caprl_safetensors_n_tensors(const caprl_safetensors *st) {
    return st ? st->n_tensors : 0;
}

const caprl_st_tensor *caprl_safetensors_tensor(const caprl_safetensors *st, int64_t i) {
    if (!st || i < 0 || i >= st->n_tensors) {
        return NULL;
    }
    return &st->tensors[i];
}

const caprl_st_tensor *caprl_safetensors_find(const caprl_safetensors *st, const char *name) {
    if (!st || !name) {
        return NULL;
    }
    int64_t lo = 0, hi = st->n_tensors;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        int     c = strcmp(st->tensors[mid].name, name);
        if (c == 0) {
            return &st->tensors[mid];
        }
        if (c < 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return NULL;
}

const char *caprl_safetensors_metadata(const caprl_safetensors *st, const char *key) {
    if (!st || !key || st->n_files == 0) {
        return NULL;
    }
    const st_file *f = &st->files[0];
    for (int64_t i = 0; i < f->n_meta; i++) {
        if (strcmp(f->meta[i].key, key) == 0) {
            return f->meta[i].value;
        }
    }
    return NULL;
}

/* "F32 or BF16" */
static const char *mask_str(uint32_t mask, char *buf, size_t cap) {
    size_t pos = 0;
    buf[0] = '\0';
    for (int32_t d = 0; d < CAPRL_DTYPE_COUNT; d++) {
        if (!(mask & (1u << d))) {
            continue;
        }
        int k = snprintf(buf + pos, cap - pos, "%s%s", pos ? " or " : "", caprl_dtype_name(d));
        if (k < 0 || (size_t)k >= cap - pos) {
            break;
        }
        pos += (size_t)k;
    }
    if (pos == 0) {
        snprintf(buf, cap, "(none)");
    }
    return buf;
}

caprl_status caprl_safetensors_expect(const caprl_safetensors *st, const char *name, uint32_t dtype_mask,
                                      int32_t n_dims, const int64_t *shape, const caprl_st_tensor **out,
                                      caprl_error *err) {
    if (!st || !name || n_dims < 0 || n_dims > CAPRL_ST_MAX_DIMS || (n_dims > 0 && !shape)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_safetensors_expect: invalid arguments");
    }
    const caprl_st_tensor *t = caprl_safetensors_find(st, name);
    if (!t) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s' not found", st->source, name);
    }
    if (!(dtype_mask & (1u << t->dtype))) {
        char want[96];
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: tensor '%s': dtype %s, expected %s", t->file, name,
                             caprl_dtype_name(t->dtype), mask_str(dtype_mask, want, sizeof want));
    }
    bool same = t->n_dims == n_dims;
    for (int32_t i = 0; same && i < n_dims; i++) {
        same = t->shape[i] == shape[i];
    }
    if (!same) {
        char have[ST_SHAPE_STR_CAP], want[ST_SHAPE_STR_CAP];
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: tensor '%s': shape %s, expected %s", t->file, name,
                             shape_str(t->shape, t->n_dims, have, sizeof have),
                             shape_str(shape, n_dims, want, sizeof want));
    }
    if (out) {
        *out = t;
    }
    return CAPRL_OK;
}

/* ---- sharded checkpoints ----------------------------------------------------------------------------------- */

/* A shard must be a plain file name: no directory part, not "." or "..", so that it cannot leave the
 * checkpoint directory. Backslashes are refused too, so a Windows-made index cannot point elsewhere there. */
static bool plain_file_name(const char *s) {
    return s[0] != '\0' && strcmp(s, ".") != 0 && strcmp(s, "..") != 0 && strchr(s, '/') == NULL &&
           strchr(s, '\\') == NULL;
}

typedef struct st_index {
    json_t      *root;
    const char **names;   /* weight_map keys, in document order */
    const char **shards;  /* weight_map values, same order */
    const char **uniq;    /* distinct shard names, sorted */
    size_t       n;
    size_t       n_uniq;
} st_index;

static void index_release(st_index *ix) {
    free(ix->names);
    free(ix->shards);
    free(ix->uniq);
    caprl_json_free(ix->root);
    memset(ix, 0, sizeof *ix);
}

static caprl_status index_parse(st_index *ix, const char *path, caprl_error *err) {
    CAPRL_TRY(caprl_json_load_file(&ix->root, path, ST_INDEX_MAX, err));
    caprl_json_obj root, wm, meta;
    bool           has_meta = false;
    CAPRL_TRY(caprl_json_root(&root, ix->root, path, err));
    CAPRL_TRY(caprl_json_get_object(&root, "weight_map", &wm, err));
    CAPRL_TRY(caprl_json_opt_object(&root, "metadata", &meta, &has_meta, err));
    size_t n = json_object_size(wm.obj);
    if (n == 0) {
        return caprl_json_field_error(&root, "weight_map", CAPRL_ERR_FORMAT, err, "no tensors listed");
    }
    ix->names = caprl_try_calloc(n, sizeof *ix->names);
    ix->shards = caprl_try_calloc(n, sizeof *ix->shards);
    ix->uniq = caprl_try_calloc(n, sizeof *ix->uniq);
    if (!ix->names || !ix->shards || !ix->uniq) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot allocate the weight map of %zu tensors", path, n);
    }
    const char *key;
    json_t     *value;
    size_t      i = 0;
    json_object_foreach((json_t *)(uintptr_t)wm.obj, key, value) {
        const char *shard = caprl_json_string_value(value);
        if (!shard) {
            return caprl_json_field_error(&wm, key, CAPRL_ERR_FORMAT, err, "expected a shard file name (a string)");
        }
        if (!plain_file_name(shard)) {
            return caprl_json_field_error(&wm, key, CAPRL_ERR_FORMAT, err,
                                          "shard '%.96s' is not a plain file name inside the checkpoint directory",
                                          shard);
        }
        ix->names[i] = key;
        ix->shards[i] = shard;
        ix->uniq[i] = shard;
        i++;
    }
    ix->n = n;
    qsort(ix->uniq, n, sizeof *ix->uniq, cmp_cstr);
    size_t u = 0;
    for (size_t k = 0; k < n; k++) {
        if (u == 0 || strcmp(ix->uniq[u - 1], ix->uniq[k]) != 0) {
            ix->uniq[u++] = ix->uniq[k];
        }
    }
    ix->n_uniq = u;
    return CAPRL_OK;
}

/* Every weight_map entry must be in the shard it names (duplicates across shards were refused by reader_new). */
static caprl_status index_verify(const st_index *ix, const caprl_safetensors *r, const char *path,
                                 caprl_error *err) {
    for (size_t i = 0; i < ix->n; i++) {
        const caprl_st_tensor *t = caprl_safetensors_find(r, ix->names[i]);
        const char *const     *k = bsearch(&ix->shards[i], ix->uniq, ix->n_uniq, sizeof *ix->uniq, cmp_cstr);
        CAPRL_ASSERT(k != NULL); /* every shard name went into uniq */
        const char *want = r->files[k - ix->uniq].name;
        if (!t || t->file != want) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT,
                                 "%s: weight_map puts tensor '%s' in %s, which does not hold it%s%s", path,
                                 ix->names[i], want, t ? "; it is in " : "", t ? t->file : "");
        }
    }
    if ((size_t)r->n_tensors > ix->n) {
        LOG_WARN("%s: the shards hold %lld tensors not listed in weight_map", path,
                 (long long)((size_t)r->n_tensors - ix->n));
    }
    return CAPRL_OK;
}

static caprl_status open_index(caprl_safetensors **out, const char *dir, const char *path, caprl_error *err) {
    st_index     ix = {0};
    st_file     *files = NULL;
    int32_t      n_files = 0;
    caprl_status st = index_parse(&ix, path, err);
    if (st != CAPRL_OK) {
        goto fail;
    }
    if (ix.n_uniq > (size_t)INT32_MAX) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: too many shards (%zu)", path, ix.n_uniq);
        goto fail;
    }
    files = caprl_try_calloc(ix.n_uniq, sizeof *files);
    if (!files) {
        st = caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot allocate %zu shard records", path, ix.n_uniq);
        goto fail;
    }
    for (size_t k = 0; k < ix.n_uniq; k++) {
        char *shard_path = caprl_path_join(dir, ix.uniq[k]);
        n_files++;
        st = open_mapped(&files[k], shard_path, err);
        free(shard_path);
        if (st != CAPRL_OK) {
            caprl_err_prefix(err, "%s", path);
            goto fail;
        }
    }
    caprl_safetensors *r = NULL;
    st = reader_new(&r, caprl_xstrdup(dir), files, n_files, err);
    files = NULL; /* owned by reader_new now, freed by it on failure */
    if (st != CAPRL_OK) {
        goto fail;
    }
    st = index_verify(&ix, r, path, err);
    if (st != CAPRL_OK) {
        caprl_safetensors_free(r);
        goto fail;
    }
    index_release(&ix);
    *out = r;
    return CAPRL_OK;
fail:
    reader_free_files(files, n_files);
    index_release(&ix);
    return st;
}

caprl_status caprl_safetensors_open_dir(caprl_safetensors **out, const char *dir, caprl_error *err) {
    if (!out || !dir) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_safetensors_open_dir: NULL argument");
    }
    if (!caprl_path_is_dir(dir)) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: not a directory", dir);
    }
    char        *index = caprl_path_join(dir, ST_INDEX_NAME);
    caprl_status st;
    if (caprl_path_exists(index)) {
        st = open_index(out, dir, index, err);
    } else {
        char *single = caprl_path_join(dir, ST_SINGLE_NAME);
        if (caprl_path_exists(single)) {
            st = caprl_safetensors_open(out, single, err);
        } else {
            st = caprl_err_set(err, CAPRL_ERR_IO, "%s: neither %s nor %s found", dir, ST_INDEX_NAME, ST_SINGLE_NAME);
        }
        free(single);
    }
    free(index);
    return st;
}

/* ---- the writer ------------------------------------------------------------------------------------------ */

typedef struct st_entry {
    char       *name;
    int32_t     dtype;
    int32_t     n_dims;
    int64_t     shape[CAPRL_ST_MAX_DIMS];
    size_t      nbytes;
    const void *data;
} st_entry;

struct caprl_st_writer {
    st_entry *entries;
    size_t    n, cap;
    char    **meta_keys;
    char    **meta_values;
    size_t    n_meta, cap_meta;
};

caprl_st_writer *caprl_st_writer_init(void) {
    return caprl_xcalloc(1, sizeof(caprl_st_writer));
}

void caprl_st_writer_free(caprl_st_writer *w) {
    if (!w) {
        return;
    }
    for (size_t i = 0; i < w->n; i++) {
        free(w->entries[i].name);
    }
    for (size_t i = 0; i < w->n_meta; i++) {
        free(w->meta_keys[i]);
        free(w->meta_values[i]);
    }
    free(w->entries);
    free(w->meta_keys);
    free(w->meta_values);
    free(w);
}

caprl_status caprl_st_writer_add(caprl_st_writer *w, const char *name, int32_t dtype, int32_t n_dims,
                                 const int64_t *shape, const void *data, caprl_error *err) {
    if (!w || !name) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_st_writer_add: NULL argument");
    }
    /* "" is a legal key (the reader accepts it), so it is accepted here too: whatever we read we can write */
    if (strcmp(name, ST_METADATA_KEY) == 0 || !caprl_utf8_valid(name, strlen(name))) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "safetensors writer: invalid tensor name '%.64s'", name);
    }
    if (caprl_dtype_size(dtype) == 0) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "safetensors writer: tensor '%s': invalid dtype %d", name,
                             (int)dtype);
    }
    if (n_dims < 0 || n_dims > CAPRL_ST_MAX_DIMS || (n_dims > 0 && !shape)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "safetensors writer: tensor '%s': invalid n_dims %d", name,
                             (int)n_dims);
    }
    st_entry e = {.dtype = dtype, .n_dims = n_dims, .data = data};
    int64_t  numel = 1;
    for (int32_t i = 0; i < n_dims; i++) {
        if (shape[i] < 0 || !caprl_mul_i64(numel, shape[i], &numel)) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "safetensors writer: tensor '%s': invalid shape", name);
        }
        e.shape[i] = shape[i];
    }
    if ((uint64_t)numel > (uint64_t)SIZE_MAX || !caprl_mul_size((size_t)numel, caprl_dtype_size(dtype), &e.nbytes)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "safetensors writer: tensor '%s': too large", name);
    }
    if (e.nbytes > 0 && !data) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "safetensors writer: tensor '%s': NULL data", name);
    }
    for (size_t i = 0; i < w->n; i++) {
        if (strcmp(w->entries[i].name, name) == 0) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "safetensors writer: duplicate tensor '%s'", name);
        }
    }
    if (w->n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 16;
        w->entries = caprl_xrealloc(w->entries, w->cap * sizeof *w->entries);
    }
    e.name = caprl_xstrdup(name);
    w->entries[w->n++] = e;
    return CAPRL_OK;
}

caprl_status caprl_st_writer_set_metadata(caprl_st_writer *w, const char *key, const char *value,
                                          caprl_error *err) {
    if (!w || !key || !value) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_st_writer_set_metadata: NULL argument");
    }
    if (!caprl_utf8_valid(key, strlen(key)) || !caprl_utf8_valid(value, strlen(value))) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "safetensors writer: metadata '%.64s' is not valid UTF-8",
                             key);
    }
    for (size_t i = 0; i < w->n_meta; i++) {
        if (strcmp(w->meta_keys[i], key) == 0) {
            free(w->meta_values[i]);
            w->meta_values[i] = caprl_xstrdup(value);
            return CAPRL_OK;
        }
    }
    if (w->n_meta == w->cap_meta) {
        w->cap_meta = w->cap_meta ? 2 * w->cap_meta : 4;
        w->meta_keys = caprl_xrealloc(w->meta_keys, w->cap_meta * sizeof *w->meta_keys);
        w->meta_values = caprl_xrealloc(w->meta_values, w->cap_meta * sizeof *w->meta_values);
    }
    w->meta_keys[w->n_meta] = caprl_xstrdup(key);
    w->meta_values[w->n_meta] = caprl_xstrdup(value);
    w->n_meta++;
    return CAPRL_OK;
}

/* Descending element size (natural alignment of every tensor relative to the buffer start), then name. */
static int cmp_entry_order(const void *a, const void *b) {
    const st_entry *x = *(const st_entry *const *)a, *y = *(const st_entry *const *)b;
    size_t          sx = caprl_dtype_size(x->dtype), sy = caprl_dtype_size(y->dtype);
    if (sx != sy) {
        return sx > sy ? -1 : 1;
    }
    return strcmp(x->name, y->name);
}

/* The write plan: entries in file order, the padded header, the data size. */
typedef struct st_plan {
    const st_entry **order;
    char            *header; /* JSON text from jansson (free()) */
    size_t           header_len;
    size_t           padded_len; /* multiple of 8 */
    size_t           data_size;
} st_plan;

static void plan_release(st_plan *p) {
    free(p->order);
    free(p->header);
    memset(p, 0, sizeof *p);
}

/* jansson setters return -1 on failure and release the value, which may be NULL after a failed allocation. */
static int add_tensor_json(json_t *root, const st_entry *e, size_t begin) {
    json_t *info = json_object();
    json_t *shape = json_array();
    json_t *offs = json_array();
    int     bad = 0;
    for (int32_t d = 0; d < e->n_dims; d++) {
        bad |= json_array_append_new(shape, json_integer((json_int_t)e->shape[d]));
    }
    bad |= json_array_append_new(offs, json_integer((json_int_t)begin));
    bad |= json_array_append_new(offs, json_integer((json_int_t)(begin + e->nbytes)));
    bad |= json_object_set_new(info, "dtype", json_string(caprl_dtype_name(e->dtype)));
    bad |= json_object_set_new(info, "shape", shape);
    bad |= json_object_set_new(info, "data_offsets", offs);
    bad |= json_object_set_new(root, e->name, info);
    return bad;
}

static caprl_status plan_build(caprl_st_writer *w, st_plan *p, caprl_error *err) {
    memset(p, 0, sizeof *p);
    p->order = caprl_try_calloc(w->n, sizeof *p->order);
    if (!p->order) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "safetensors writer: cannot allocate the order of %zu tensors", w->n);
    }
    for (size_t i = 0; i < w->n; i++) {
        p->order[i] = &w->entries[i];
    }
    qsort(p->order, w->n, sizeof *p->order, cmp_entry_order);

    json_t *root = json_object();
    json_t *meta = json_object();
    int     bad = 0;
    if (w->n_meta == 0) {
        bad |= json_object_set_new(meta, "format", json_string("pt"));
    }
    for (size_t i = 0; i < w->n_meta; i++) {
        bad |= json_object_set_new(meta, w->meta_keys[i], json_string(w->meta_values[i]));
    }
    bad |= json_object_set_new(root, ST_METADATA_KEY, meta);
    size_t pos = 0;
    for (size_t i = 0; i < w->n && !bad; i++) {
        bad |= add_tensor_json(root, p->order[i], pos);
        /* offsets are written as JSON (int64) integers */
        if (!caprl_add_size(pos, p->order[i]->nbytes, &pos) || pos > (size_t)INT64_MAX) {
            json_decref(root);
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "safetensors writer: total data size overflows");
        }
    }
    p->data_size = pos;
    p->header = bad ? NULL : json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (!p->header) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "safetensors writer: cannot build the header of %zu tensors", w->n);
    }
    p->header_len = strlen(p->header);
    if (!caprl_align_size(p->header_len, 8, &p->padded_len) || p->padded_len > CAPRL_ST_MAX_HEADER) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "safetensors writer: header of %zu bytes exceeds the limit",
                             p->header_len);
    }
    return CAPRL_OK;
}

/* Writes the 8-byte length, the header and its space padding: 8 + padded_len bytes. */
static void plan_write_prefix(const st_plan *p, uint8_t *dst) {
    wr_u64le(dst, (uint64_t)p->padded_len);
    memcpy(dst + 8, p->header, p->header_len);
    memset(dst + 8 + p->header_len, ' ', p->padded_len - p->header_len);
}

caprl_status caprl_st_writer_serialize(caprl_st_writer *w, uint8_t **out, size_t *size, caprl_error *err) {
    if (!w || !out || !size) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_st_writer_serialize: NULL argument");
    }
    st_plan p;
    caprl_status st = plan_build(w, &p, err);
    if (st != CAPRL_OK) {
        plan_release(&p);
        return st;
    }
    size_t   total = 0;
    uint8_t *buf = NULL;
    if (caprl_add_size(8 + p.padded_len, p.data_size, &total)) {
        buf = caprl_try_malloc(total);
    }
    if (!buf) {
        plan_release(&p);
        return caprl_err_set(err, CAPRL_ERR_OOM, "safetensors writer: cannot allocate %zu bytes", total);
    }
    plan_write_prefix(&p, buf);
    size_t pos = 8 + p.padded_len;
    for (size_t i = 0; i < w->n; i++) {
        if (p.order[i]->nbytes) {
            memcpy(buf + pos, p.order[i]->data, p.order[i]->nbytes);
        }
        pos += p.order[i]->nbytes;
    }
    plan_release(&p);
    *out = buf;
    *size = total;
    return CAPRL_OK;
}

caprl_status caprl_st_writer_save(caprl_st_writer *w, const char *path, caprl_error *err) {
    if (!w || !path) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_st_writer_save: NULL argument");
    }
    st_plan      p;
    caprl_status st = plan_build(w, &p, err);
    if (st != CAPRL_OK) {
        plan_release(&p);
        return st;
    }
    uint8_t *prefix = caprl_try_malloc(8 + p.padded_len);
    if (prefix) {
        plan_write_prefix(&p, prefix);
    } else {
        st = caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot allocate the %zu-byte header", path, p.padded_len);
        plan_release(&p);
        return st;
    }
    caprl_atomic_file af;
    st = caprl_atomic_open(&af, path, err);
    if (st == CAPRL_OK) {
        st = caprl_atomic_write(&af, prefix, 8 + p.padded_len, err);
        /* tensor data is streamed from the caller's buffers, never copied into one image */
        for (size_t i = 0; i < w->n && st == CAPRL_OK; i++) {
            st = caprl_atomic_write(&af, p.order[i]->data, p.order[i]->nbytes, err);
        }
        if (st == CAPRL_OK) {
            st = caprl_atomic_commit(&af, err);
        } else {
            caprl_atomic_abort(&af);
        }
    }
    free(prefix);
    plan_release(&p);
    return st;
}
