/* safetensors: read (mmap, every offset and shape bounds-checked; single files and sharded checkpoints through
 * model.safetensors.index.json) and write (atomic: temp file, fsync, rename).
 * Thread safety: a reader is immutable after open and may be shared; a writer is single-threaded. */
#ifndef CAPRL_SAFETENSORS_H
#define CAPRL_SAFETENSORS_H

#include "caprl/caprl.h"
#include "caprl/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CAPRL_ST_MAX_DIMS 8
#define CAPRL_ST_MAX_HEADER 100000000u /* the reference reader's MAX_HEADER_SIZE */

typedef struct caprl_st_tensor {
    const char *name;
    int32_t     dtype; /* CAPRL_DTYPE_* */
    int32_t     n_dims;
    int64_t     shape[CAPRL_ST_MAX_DIMS];
    int64_t     numel;
    size_t      nbytes;
    const void *data; /* into the mapping; may be unaligned for its dtype: read with memcpy or check */
    const char *file; /* the file that holds it */
} caprl_st_tensor;

typedef struct caprl_safetensors caprl_safetensors;

/* Opens one .safetensors file. */
CAPRL_API caprl_status caprl_safetensors_open(caprl_safetensors **out, const char *path, caprl_error *err);
/* Opens a checkpoint directory: model.safetensors.index.json (all shards) if present, else model.safetensors.
 * Shard names must be plain file names inside dir. */
CAPRL_API caprl_status caprl_safetensors_open_dir(caprl_safetensors **out, const char *dir, caprl_error *err);
/* Parses an in-memory file image (not copied: buf must outlive the reader). name is used in messages. */
CAPRL_API caprl_status caprl_safetensors_open_buffer(caprl_safetensors **out, const void *buf, size_t size,
                                                     const char *name, caprl_error *err);
CAPRL_API void         caprl_safetensors_free(caprl_safetensors *st); /* NULL-safe */

CAPRL_API int64_t                caprl_safetensors_n_tensors(const caprl_safetensors *st);
/* Tensors in name order; i in [0, n_tensors). */
CAPRL_API const caprl_st_tensor *caprl_safetensors_tensor(const caprl_safetensors *st, int64_t i);
/* NULL if absent. */
CAPRL_API const caprl_st_tensor *caprl_safetensors_find(const caprl_safetensors *st, const char *name);
/* __metadata__ value for key, or NULL (first file of a sharded set). */
CAPRL_API const char *caprl_safetensors_metadata(const caprl_safetensors *st, const char *key);

/* Checks that a named tensor exists with the given shape (n_dims entries) and one of the allowed dtypes
 * (bitmask of 1u << CAPRL_DTYPE_*); the error names the tensor, the file and what differs. */
CAPRL_API caprl_status caprl_safetensors_expect(const caprl_safetensors *st, const char *name, uint32_t dtype_mask,
                                                int32_t n_dims, const int64_t *shape, const caprl_st_tensor **out,
                                                caprl_error *err);

/* ---- writing --------------------------------------------------------------------------------------------- */

typedef struct caprl_st_writer caprl_st_writer;

CAPRL_API caprl_st_writer *caprl_st_writer_init(void);
CAPRL_API void             caprl_st_writer_free(caprl_st_writer *w); /* NULL-safe */
/* Adds a tensor; data is referenced, not copied, and must stay valid until save returns. */
CAPRL_API caprl_status caprl_st_writer_add(caprl_st_writer *w, const char *name, int32_t dtype, int32_t n_dims,
                                           const int64_t *shape, const void *data, caprl_error *err);
CAPRL_API caprl_status caprl_st_writer_set_metadata(caprl_st_writer *w, const char *key, const char *value,
                                                    caprl_error *err);
/* Writes atomically: header padded with spaces to a multiple of 8, tensors sorted by descending dtype
 * alignment then name (as the reference writer does). */
CAPRL_API caprl_status caprl_st_writer_save(caprl_st_writer *w, const char *path, caprl_error *err);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_SAFETENSORS_H */
