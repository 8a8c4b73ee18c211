/* Internal additions to the safetensors module (include/caprl/safetensors.h): an in-memory writer for tests,
 * fuzz corpora and checkpoints, and the bounds-checked little-endian reader used by the parser. */
#ifndef CAPRL_FMT_SAFETENSORS_IMPL_H
#define CAPRL_FMT_SAFETENSORS_IMPL_H

#include "caprl/safetensors.h"

/* The exact bytes caprl_st_writer_save would write, in a fresh buffer (*out: free()). Same validation and
 * errors as save; CAPRL_ERR_OOM if the image cannot be allocated. */
caprl_status caprl_st_writer_serialize(caprl_st_writer *w, uint8_t **out, size_t *size, caprl_error *err);

/* Reads a little-endian u64 at buf[off..off+8) if it lies inside buf[0..size); false (out untouched) otherwise. */
bool caprl_rd_u64le(const uint8_t *buf, size_t size, size_t off, uint64_t *out);

#endif /* CAPRL_FMT_SAFETENSORS_IMPL_H */
