/* Helpers shared by the subcommands: files, id lists, model loading with a clear error. */
#ifndef CAPRL_TOOL_COMMON_H
#define CAPRL_TOOL_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "caprl/image.h"
#include "caprl/model.h"
#include "caprl/vision.h"

/* Reads a whole file (max_bytes bound) into a NUL-terminated malloc'd buffer. Prints the error and returns an
 * exit code on failure, 0 on success. */
int tool_read_file(const char *cmd, const char *path, size_t max_bytes, char **data, size_t *len);

/* Writes data to path atomically (path.tmp.<pid>, fsync, rename). Returns 0 or prints and returns an exit code. */
int tool_write_file_atomic(const char *cmd, const char *path, const void *data, size_t len);

/* Parses "1,2,3", "1 2 3" or a JSON array "[1, 2, 3]" into a malloc'd array. Returns 0 or prints (naming what)
 * and returns EXIT_USAGE / EXIT_DATA. */
int tool_parse_ids(const char *cmd, const char *what, const char *text, int32_t **ids, int64_t *n);

/* Loads a model directory with n_threads, mapping errors to exit codes (0 on success). */
int tool_load_model(const char *cmd, const char *dir, int32_t n_threads, caprl_model **out);

/* For one image with a Qwen2.5-VL checkpoint: decodes image_path (alpha: CAPRL_ALPHA_*), loads the vision tower
 * of model_dir and its preprocessor_config.json (Qwen2.5-VL defaults when absent), and checks that the processor
 * accepts the image's size (the error then names the file). On failure everything is released. */
caprl_status tool_load_vl_image(const char *model_dir, const char *image_path, int32_t alpha, int32_t threads,
                                caprl_image *img, caprl_vision **vision, caprl_preprocess_config *pp, caprl_error *err);

/* Fills err (the program's own errors, in the library's record) and returns code. */
caprl_status tool_set_error(caprl_error *err, caprl_status code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Monotonic seconds. */
double tool_now(void);

/* The standard --threads option help. */
#define THREADS_HELP "threads for compute (0 = all cores)"

#endif /* CAPRL_TOOL_COMMON_H */
