/* Helpers shared by the subcommands: files, id lists, model loading with a clear error. */
#ifndef CAPRL_TOOL_COMMON_H
#define CAPRL_TOOL_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <stdio.h>

#include "caprl/generate.h"
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

/* Makes *ctx (a context of model) hold n_seq sequences of n_ctx tokens: recreated when smaller, for the largest of
 * each asked so far (*ctx_seq, *ctx_len), so batches of varying shape do not rebuild it every time. */
caprl_status tool_ensure_context(caprl_context **ctx, int32_t *ctx_seq, int64_t *ctx_len, caprl_model *model,
                                 int32_t n_seq, int64_t n_ctx, caprl_error *err);

/* A Qwen2.5-VL checkpoint for captioning: the language model (it must have a tokenizer), the vision tower, and the
 * image processor settings (DIR/preprocessor_config.json, or the Qwen2.5-VL defaults) with resize_variant. role
 * names the checkpoint in the error ("checkpoint", "captioner"). Returns the exit code; on failure the caller frees
 * what was loaded (NULL otherwise). */
int tool_load_vlm(const char *cmd, const char *role, const char *dir, int32_t n_threads, int32_t resize_variant,
                  caprl_model **model, caprl_vision **vision, caprl_preprocess_config *pp);

/* For one image with a Qwen2.5-VL checkpoint: decodes image_path (alpha: CAPRL_ALPHA_*), loads the vision tower
 * of model_dir and its preprocessor_config.json (Qwen2.5-VL defaults when absent), and checks that the processor
 * accepts the image's size (the error then names the file). On failure everything is released. */
caprl_status tool_load_vl_image(const char *model_dir, const char *image_path, int32_t alpha, int32_t threads,
                                caprl_image *img, caprl_vision **vision, caprl_preprocess_config *pp, caprl_error *err);

/* Fills err (the program's own errors, in the library's record) and returns code. */
caprl_status tool_set_error(caprl_error *err, caprl_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Monotonic seconds. */
double tool_now(void);

/* The decimal a float option was typed as (0.7f -> 0.7), for thresholds compared against exact fractions and for
 * settings written as JSON. */
double tool_typed_float(float x);

/* The folder, resolved (realpath; malloc'd), against which the relative paths written in `path` are resolved: path
 * itself when it is a directory, else the folder holding it. NULL if it cannot be resolved. */
char *tool_folder_of(const char *path);

/* path made absolute: realpath when it exists, else joined to the working directory. malloc'd. */
char *tool_absolute(const char *path);

/* dir + "/" + name, malloc'd. */
char *tool_path_join(const char *dir, const char *name);

/* malloc, calloc, realloc and strdup for the program's own buffers: out of memory, they report the size on stderr
 * and exit with EXIT_BACKEND (the library's large allocations fail with CAPRL_ERR_OOM instead, which the commands
 * map to the same code). A zero size is allocated as one byte. Never NULL. */
void *tool_xmalloc(size_t n);
void *tool_xcalloc(size_t count, size_t size);
void *tool_xrealloc(void *p, size_t n);
char *tool_xstrdup(const char *s);

/* --alpha white|drop as CAPRL_ALPHA_WHITE / CAPRL_ALPHA_DROP: 0, or the exit code of the usage error it printed. */
int tool_parse_alpha(const char *cmd, const char *name, int32_t *alpha);
/* The image pipeline --alpha picks: white is qwen-vl-utils then the processor (B), drop the Hugging Face processor
 * alone (A); a CAPRL_RESIZE_* value. */
int32_t tool_resize_variant(int32_t alpha);

/* "eos", "length" or "aborted": a generation's finish code (CAPRL_FINISH_*) as the output files spell it. */
const char *tool_finish_name(int32_t finish);

/* Generated token sequences, n_sequences of at most cap tokens, sequence s = prompt * per_prompt + sample. */
typedef struct tool_samples {
    int32_t   n_sequences, per_prompt, cap;
    int32_t **tokens;
    int32_t  *n;
} tool_samples;

void tool_samples_init(tool_samples *s, int32_t n_sequences, int32_t per_prompt, int32_t cap);
void tool_samples_free(tool_samples *s);
/* The generation token callback that fills a tool_samples (its user data). */
bool tool_samples_collect(int32_t prompt, int32_t sample, int32_t token, void *user_data);
/* Sets rec's key to the texts of sequences first .. first + count - 1 (special tokens skipped, the end-of-sequence
 * token left out), "tokens" to their token counts and "finish" to how each ended. buf/cap is the caller's decode
 * buffer. Returns an exit code. */
int tool_samples_to_json(const char *cmd, json_t *rec, const char *key, const caprl_tokenizer *tok,
                         const tool_samples *s, int32_t first, int32_t count, const int32_t *finish, char **buf,
                         size_t *cap);

/* The text of ids, special tokens skipped (ids without a token, which a sampling model can draw from the padding rows
 * of its vocabulary, decode to nothing), into *buf (malloc'd, grown to *cap bytes as needed); *len its length. */
caprl_status tool_decode_text(const caprl_tokenizer *tok, const int32_t *ids, int32_t n, char **buf, size_t *cap,
                              size_t *len, caprl_error *err);

/* The "error" string of an image's output record: msg as it is when it names path already (decoder messages do),
 * else "path: msg"; when the folder part of path is not UTF-8 (JSON cannot carry it), the image as the list wrote
 * it instead of path. Never NULL. */
json_t *tool_image_error_text(const char *path, const char *image, const char *msg);

/* mkdir -p. Returns 0 or prints "caprl <cmd>: error: ..." and returns an exit code. */
int tool_mkdir_p(const char *cmd, const char *dir);

/* The standard --threads option help. */
#define THREADS_HELP "threads for compute (0 = all cores)"

/* ---- image lists, resumable JSON Lines outputs, progress (caption, qa generate, eval prism) ------------------ */

typedef struct tool_image_item {
    char   *image; /* as written in the list (the resume key) */
    char   *path;  /* resolved path */
    json_t *extra; /* other fields of a JSONL record, or NULL */
    int64_t index; /* position in the whole list (RNG stream id) */
    long    line;  /* line of a list file (0 for a directory), for messages */
} tool_image_item;

typedef struct tool_image_list {
    tool_image_item *items;
    int64_t          n, cap;
} tool_image_list;

/* Loads LIST: a directory (its .jpg/.jpeg/.png/.webp files, sorted by name), a text file of paths, or JSON Lines
 * with a string field "image" (its other fields, minus the NULL-terminated drop_fields, kept in extra); relative
 * paths are relative to the list's folder. An image listed twice is refused (outputs are keyed by it). Prints
 * "caprl <cmd>: error: LIST:line: ..." and returns an exit code, or 0. */
int  tool_image_list_load(const char *cmd, const char *list, const char *const *drop_fields, tool_image_list *out);
void tool_image_list_free(tool_image_list *l);

/* "i/k" with 0 <= i < k. Returns false when text is malformed. */
bool tool_parse_shard(const char *text, long *i, long *k);

/* Opens (creates) path for appending and takes an exclusive non-blocking lock on it, so that a second process
 * appending to the same output is refused ("another caprl <cmd> is writing to it"). Sets *fd or returns an exit
 * code after printing. */
int tool_jsonl_open_locked(const char *cmd, const char *path, int *fd);

/* Called by tool_jsonl_scan for each complete record (borrowed; json_incref to keep it). Returns 0 to go on or an
 * exit code to stop the scan with. */
typedef int (*tool_record_fn)(json_t *rec, const char *path, long line, void *user_data);

/* Streams a resumable JSON Lines output: every line must be a JSON object whose field `key` has the JSON type
 * key_type (JSON_STRING or JSON_INTEGER), ending in a newline. A last line that is incomplete (no newline, or not
 * such a record) is what a kill during a write leaves: with fd >= 0 (the locked output, from
 * tool_jsonl_open_locked) it is cut off, with a note; with fd < 0 (another process's file, read only) it is
 * ignored. Any other bad line means this is not our file: "refusing to append to it" (what names the record kind,
 * e.g. "caption record"). A missing file with fd < 0 is an empty scan. Returns 0 or an exit code. */
int tool_jsonl_scan(const char *cmd, const char *path, int fd, const char *key, int key_type, const char *what,
                    tool_record_fn fn, void *user_data);

/* Appends rec (stolen) as one line with one write, then flush + fsync: a kill leaves at most one torn line, which
 * tool_jsonl_scan repairs. Returns 0 or an exit code after printing. */
int tool_jsonl_write(const char *cmd, FILE *out, json_t *rec);

/* A sorted set of strings (resume keys). */
typedef struct tool_keyset {
    char **keys;
    size_t n, cap;
    bool   sorted;
} tool_keyset;

void tool_keyset_add(tool_keyset *s, const char *key); /* copies key */
bool tool_keyset_has(tool_keyset *s, const char *key); /* sorts on first use after adds */
void tool_keyset_free(tool_keyset *s);

/* This shard's pending images: list positions i with i % shard_k == shard_i whose key (keys[i], or the item's
 * image when keys is NULL) is not in done, in list order, in a new array *todo (free it). Prints "caprl CMD: N
 * images in the list[, S in shard i/k], D already in OUT, T to VERB". */
void tool_pending_images(const char *cmd, const tool_image_list *items, char *const *keys, tool_keyset *done,
                         bool sharded, long shard_i, long shard_k, const char *out_path, const char *verb,
                         tool_image_item ***todo, int64_t *n_todo);

/* Progress on stderr: a bar redrawn in place on a terminal; otherwise (a log file) the first update, then a plain
 * line "caprl <cmd>: done/total <unit>, <rate> <rate_unit>, ETA ..." every 10 s and the total at the end. */
typedef struct tool_progress {
    const char *cmd, *unit, *rate_unit;
    int64_t     total, done, failed;
    int64_t     printed; /* done at the last plain line, -1 before the first */
    double      t0, last_print;
    bool        tty;
} tool_progress;

void tool_progress_start(tool_progress *p, const char *cmd, const char *unit, const char *rate_unit, int64_t total);
void tool_progress_show(tool_progress *p, bool final);

/* ---- batched image generation (caption, qa generate) ------------------------------------------------------- */

typedef struct tool_vl_job tool_vl_job;

struct tool_vl_job {
    const char               *cmd;
    caprl_model              *model;
    caprl_vision             *vision;
    caprl_preprocess_config   pp;
    caprl_image_decode_params dp;
    caprl_generate_params     gp;             /* gp.n_samples sequences per image */
    const char               *prompt, *system; /* every image's user text and system prompt */
    int32_t                   batch;           /* images per generation call */
    FILE                     *out;
    tool_progress             prog;
    caprl_context            *ctx;
    char                     *text; /* decode buffer */
    size_t                    text_cap;
    /* an image's record without the command's outputs (its list fields) */
    json_t *(*base_record)(const tool_vl_job *job, const tool_image_item *it);
    /* adds the outputs of an image from s's sequences first .. first + gp.n_samples - 1; returns an exit code */
    int   (*add_outputs)(tool_vl_job *job, json_t *rec, const tool_samples *s, int32_t first, const int32_t *finish);
    void *user;
};

/* Decodes todo[0 .. n_todo) in batches of job->batch and appends one record per image to job->out, with progress:
 * base_record + add_outputs, or base_record + "error" for an image that cannot be decoded, sized or generated (one
 * bad file never stops the job; a batch that fails is retried image by image, so every record is what --batch 1
 * writes). Out-of-memory and backend failures stop the job without records, so a rerun does those images. Returns
 * an exit code. */
int tool_vl_job_run(tool_vl_job *job, tool_image_item **todo, int64_t n_todo);

/* Frees what the job loaded (model, tower, context) and its buffer; closes nothing. */
void tool_vl_job_free(tool_vl_job *job);

#endif /* CAPRL_TOOL_COMMON_H */
