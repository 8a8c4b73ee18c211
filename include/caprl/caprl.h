/* caprl: CapRL in C. Umbrella header: version, status codes, the error record, logging and the abort hook.
 *
 * Every fallible function returns a caprl_status and takes a `caprl_error *err` last (may be NULL). On failure
 * err->msg names the object at fault (file, tensor, record) and the outputs are left untouched.
 * Global state is only the log callback, the log level and the abort hook: set them once, before any other call
 * (the setters are not thread-safe). */
#ifndef CAPRL_CAPRL_H
#define CAPRL_CAPRL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#    define CAPRL_API __attribute__((visibility("default")))
#    define CAPRL_PRINTF(fmt_idx, arg_idx) __attribute__((format(printf, fmt_idx, arg_idx)))
#else
#    define CAPRL_API
#    define CAPRL_PRINTF(fmt_idx, arg_idx)
#endif

#define CAPRL_VERSION_MAJOR 0
#define CAPRL_VERSION_MINOR 1
#define CAPRL_VERSION_PATCH 0
#define CAPRL_VERSION_STRING "0.1.0"

/* Status codes: 0 is success, errors are negative, append-only, never reused. */
typedef int32_t caprl_status;
enum {
    CAPRL_OK                  = 0,
    CAPRL_ERR_INVALID_ARG     = -1, /* a caller-supplied value is out of range or inconsistent */
    CAPRL_ERR_IO              = -2, /* a file could not be opened, read, written or renamed */
    CAPRL_ERR_FORMAT          = -3, /* a file's contents are malformed */
    CAPRL_ERR_UNSUPPORTED     = -4, /* well-formed but not something caprl handles (dtype, architecture) */
    CAPRL_ERR_OOM             = -5, /* a large allocation failed */
    CAPRL_ERR_BACKEND         = -6, /* a compute backend failed */
    CAPRL_ERR_NUMERIC         = -7, /* NaN or Inf where a finite value is required */
    CAPRL_ERR_ABORTED         = -8, /* the caller asked to stop */
    CAPRL_ERR_STATUS_COUNT_   = 9
};

#define CAPRL_ERROR_MSG_CAP 512

typedef struct caprl_error {
    caprl_status code;
    int32_t      line; /* source line in libcaprl that raised it */
    const char  *file; /* source file in libcaprl that raised it (static string) */
    char         msg[CAPRL_ERROR_MSG_CAP];
} caprl_error;

/* Static text for a status ("invalid argument", ...). Never NULL. */
CAPRL_API const char *caprl_status_str(caprl_status code);

/* ---- logging --------------------------------------------------------------------------------------------- */

enum { CAPRL_LOG_ERROR = 0, CAPRL_LOG_WARN = 1, CAPRL_LOG_INFO = 2, CAPRL_LOG_DEBUG = 3, CAPRL_LOG_TRACE = 4 };

/* msg is one line without its newline; valid only during the call. */
typedef void (*caprl_log_fn)(int32_t level, const char *msg, void *user_data);

/* Default: messages at or below CAPRL_LOG_WARN go to stderr. NULL restores the default. Not thread-safe. */
CAPRL_API void    caprl_log_set_callback(caprl_log_fn fn, void *user_data);
CAPRL_API void    caprl_log_set_level(int32_t level);
CAPRL_API int32_t caprl_log_level(void);

/* Called with the message before abort() on a broken internal invariant. Not thread-safe. */
typedef void (*caprl_abort_fn)(const char *msg);
CAPRL_API void caprl_set_abort_hook(caprl_abort_fn fn);

/* Frees memory that a caprl function returned and documented as "free with caprl_free". NULL-safe. */
CAPRL_API void caprl_free(void *p);

/* Number of online CPU cores (at least 1). */
CAPRL_API int32_t caprl_n_cores(void);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_CAPRL_H */
