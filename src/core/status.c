/* Status strings, the error record, the abort path and the allocation wrappers. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/error_impl.h"
#include "core/log_impl.h"

const char *caprl_status_str(caprl_status code) {
    switch (code) {
        case CAPRL_OK: return "ok";
        case CAPRL_ERR_INVALID_ARG: return "invalid argument";
        case CAPRL_ERR_IO: return "I/O error";
        case CAPRL_ERR_FORMAT: return "malformed input";
        case CAPRL_ERR_UNSUPPORTED: return "unsupported";
        case CAPRL_ERR_OOM: return "out of memory";
        case CAPRL_ERR_BACKEND: return "backend error";
        case CAPRL_ERR_NUMERIC: return "numeric error";
        case CAPRL_ERR_ABORTED: return "aborted";
        default: return "unknown status";
    }
}

caprl_status caprl_err_set_at(caprl_error *err, caprl_status code, const char *file, int line, const char *fmt, ...) {
    if (err) {
        err->code = code;
        err->file = file;
        err->line = line;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
    }
    return code;
}

caprl_status caprl_err_prefix(caprl_error *err, const char *fmt, ...) {
    if (!err) {
        return CAPRL_OK;
    }
    char    prefix[CAPRL_ERROR_MSG_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    char old[CAPRL_ERROR_MSG_CAP];
    memcpy(old, err->msg, sizeof old);
    /* Truncation is acceptable here: the message stays NUL-terminated and starts with the prefix. */
    size_t np = strlen(prefix);
    if (np + 2 < sizeof err->msg) {
        memcpy(err->msg, prefix, np);
        memcpy(err->msg + np, ": ", 2);
        size_t room = sizeof err->msg - np - 3;
        size_t no = strnlen(old, room);
        memcpy(err->msg + np + 2, old, no);
        err->msg[np + 2 + no] = '\0';
    }
    return err->code;
}

void caprl_err_clear(caprl_error *err) {
    if (err) {
        memset(err, 0, sizeof *err);
    }
}

static caprl_abort_fn g_abort_hook;

void caprl_set_abort_hook(caprl_abort_fn fn) {
    g_abort_hook = fn;
}

_Noreturn void caprl_abort(const char *file, int line, const char *fmt, ...) {
    char    msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(msg, sizeof msg, "%s:%d: ", file, line);
    if (n < 0 || (size_t)n >= sizeof msg) {
        n = 0;
    }
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
    va_end(ap);
    fflush(stdout);
    fprintf(stderr, "caprl: fatal: %s\n", msg);
    fflush(stderr);
    if (g_abort_hook) {
        g_abort_hook(msg);
    }
    abort();
}

/* ---- allocation ------------------------------------------------------------------------------------------ */

static _Noreturn void oom(size_t n) {
    caprl_abort(__FILE__, __LINE__, "out of memory allocating %zu bytes", n);
}

void *caprl_xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        oom(n);
    }
    return p;
}

void *caprl_xcalloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) {
        oom(count * size);
    }
    return p;
}

void *caprl_xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        oom(n);
    }
    return q;
}

char *caprl_xstrdup(const char *s) {
    return caprl_xstrndup(s, strlen(s));
}

char *caprl_xstrndup(const char *s, size_t n) {
    char *d = caprl_xmalloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

char *caprl_xasprintf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    CAPRL_ASSERT(n >= 0);
    char *s = caprl_xmalloc((size_t)n + 1);
    vsnprintf(s, (size_t)n + 1, fmt, ap2);
    va_end(ap2);
    return s;
}

/* Fault injection for the loader tests. Not thread-safe by design: tests use it single-threaded. */
static int64_t g_fail_alloc_after = -1;

void caprl_test_fail_alloc_after(int64_t n) {
    g_fail_alloc_after = n;
}

static bool injected_failure(void) {
    if (g_fail_alloc_after < 0) {
        return false;
    }
    if (g_fail_alloc_after == 0) {
        g_fail_alloc_after = -1;
        return true;
    }
    g_fail_alloc_after--;
    return false;
}

void *caprl_try_malloc(size_t n) {
    if (injected_failure()) {
        return NULL;
    }
    return malloc(n ? n : 1);
}

void *caprl_try_calloc(size_t count, size_t size) {
    if (injected_failure()) {
        return NULL;
    }
    return calloc(count ? count : 1, size ? size : 1);
}

/* Buffers from this size up (weights, packed panels, activations, optimizer moments) start on a 2 MB boundary
 * and ask for transparent huge pages: first touch then faults once per 2 MB instead of once per 4 KB, which
 * halves the time to fault in a model's memory on virtual machines. The advice is best effort ("never" in
 * /sys/kernel/mm/transparent_hugepage/enabled wins). */
enum { HUGE_ALLOC_MIN = 4 << 20, HUGE_PAGE_BYTES = 2 << 20 };

void *caprl_try_aligned_alloc(size_t n) {
    if (injected_failure()) {
        return NULL;
    }
    void *p = NULL;
    bool  huge = n >= HUGE_ALLOC_MIN;
    if (posix_memalign(&p, huge ? HUGE_PAGE_BYTES : 64, n ? n : 64) != 0) {
        return NULL;
    }
#ifdef MADV_HUGEPAGE
    if (huge) {
        (void)madvise(p, n / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES, MADV_HUGEPAGE);
    }
#endif
    return p;
}

void caprl_aligned_free(void *p) {
    free(p);
}

int32_t caprl_n_cores(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (int32_t)n;
}
