/* Files: read whole, map read-only, and write atomically (temp file, fsync, rename) so that a crash never leaves
 * a half-written output where a complete one is expected. */
#ifndef CAPRL_FILE_IMPL_H
#define CAPRL_FILE_IMPL_H

#include "caprl/caprl.h"

typedef struct caprl_mapped_file {
    const uint8_t *data; /* NULL for an empty file */
    size_t         size;
    char          *path; /* owned copy */
} caprl_mapped_file;

/* Reads a whole file into a fresh buffer (NUL-terminated, *size excludes the NUL). max_size bounds it. */
caprl_status caprl_file_read_all(const char *path, size_t max_size, uint8_t **data, size_t *size, caprl_error *err);
/* Maps a file read-only (empty files give data == NULL, size 0). */
caprl_status caprl_file_map(caprl_mapped_file *mf, const char *path, caprl_error *err);
void         caprl_file_unmap(caprl_mapped_file *mf); /* NULL-safe and safe on zeroed */

/* Atomic writer: opens "path.tmp.<pid>" next to path; commit fsyncs, renames over path and fsyncs the dir.
 * abort removes the temp file. */
typedef struct caprl_atomic_file {
    void *fp; /* FILE * */
    char *path;
    char *tmp_path;
} caprl_atomic_file;
caprl_status caprl_atomic_open(caprl_atomic_file *af, const char *path, caprl_error *err);
caprl_status caprl_atomic_write(caprl_atomic_file *af, const void *data, size_t n, caprl_error *err);
caprl_status caprl_atomic_commit(caprl_atomic_file *af, caprl_error *err);
void         caprl_atomic_abort(caprl_atomic_file *af); /* NULL-safe; no-op after commit */

/* Joins dir and name with one '/'; caller frees. */
char *caprl_path_join(const char *dir, const char *name);
/* The folder part of path: "" when it has none, "/" for a file at the root; caller frees. */
char *caprl_path_dir(const char *path);
bool  caprl_path_exists(const char *path);
/* Creates dir and any missing parents (mode 0755); an existing directory is fine. */
caprl_status caprl_mkdir_p(const char *dir, caprl_error *err);
bool  caprl_path_is_dir(const char *path);

#endif /* CAPRL_FILE_IMPL_H */
