/* Tier-1 errors (status + message) and tier-2 invariants (always-on asserts that abort).
 * Tier 1 is for anything that depends on input, files or the environment; tier 2 only for programmer errors. */
#ifndef CAPRL_ERROR_IMPL_H
#define CAPRL_ERROR_IMPL_H

#include "caprl/caprl.h"

/* Records code, source position and a printf-style message in err (if not NULL); returns code. */
caprl_status caprl_err_set_at(caprl_error *err, caprl_status code, const char *file, int line, const char *fmt, ...)
    CAPRL_PRINTF(5, 6);
#define caprl_err_set(err, code, ...) caprl_err_set_at((err), (code), __FILE__, __LINE__, __VA_ARGS__)

/* Prefixes err->msg with "prefix: " (e.g. a file name) keeping the code; returns err->code (or CAPRL_OK if NULL). */
caprl_status caprl_err_prefix(caprl_error *err, const char *fmt, ...) CAPRL_PRINTF(2, 3);

/* Clears err to CAPRL_OK with an empty message. */
void caprl_err_clear(caprl_error *err);

/* Propagates a non-OK status to the caller. */
#define CAPRL_TRY(expr)                                                                                         \
    do {                                                                                                        \
        caprl_status caprl_try_status_ = (expr);                                                                \
        if (caprl_try_status_ != CAPRL_OK) {                                                                    \
            return caprl_try_status_;                                                                           \
        }                                                                                                       \
    } while (0)

_Noreturn void caprl_abort(const char *file, int line, const char *fmt, ...) CAPRL_PRINTF(3, 4);

#define CAPRL_ASSERT(cond)                                                                                      \
    do {                                                                                                        \
        if (!(cond)) {                                                                                          \
            caprl_abort(__FILE__, __LINE__, "assertion failed: %s", #cond);                                     \
        }                                                                                                       \
    } while (0)

#ifdef NDEBUG
#    define CAPRL_DEBUG_ASSERT(cond) ((void)0)
#else
#    define CAPRL_DEBUG_ASSERT(cond) CAPRL_ASSERT(cond)
#endif

/* Small allocations that cannot reasonably fail: abort through the hook on OOM, never return NULL. */
void *caprl_xmalloc(size_t n);
void *caprl_xcalloc(size_t count, size_t size);
void *caprl_xrealloc(void *p, size_t n);
char *caprl_xstrdup(const char *s);
char *caprl_xstrndup(const char *s, size_t n);
/* printf into a fresh caprl_xmalloc'd string. */
char *caprl_xasprintf(const char *fmt, ...) CAPRL_PRINTF(1, 2);

/* Test-only fault injection: the n-th checked allocation after this call fails (returns NULL / OOM).
 * Negative disables. Used by caprl_try_malloc, which large allocations go through. */
void  caprl_test_fail_alloc_after(int64_t n);
/* Large allocation that may fail: returns NULL (callers turn it into CAPRL_ERR_OOM naming the size). */
void *caprl_try_malloc(size_t n);
void *caprl_try_calloc(size_t count, size_t size);
/* 64-byte aligned; free with caprl_aligned_free. */
void *caprl_try_aligned_alloc(size_t n);
void  caprl_aligned_free(void *p);

#endif /* CAPRL_ERROR_IMPL_H */
