/* Logging: one callback, one level; the default writes "caprl: [level] func: msg" to stderr. */
#include <stdarg.h>
#include <stdio.h>

#include "core/log_impl.h"

static caprl_log_fn g_log_fn;
static void        *g_log_ud;
static int32_t      g_log_level = CAPRL_LOG_WARN;

static const char *level_name(int32_t level) {
    static const char *names[] = {"error", "warn", "info", "debug", "trace"};
    return (level >= 0 && level <= CAPRL_LOG_TRACE) ? names[level] : "log";
}

void caprl_log_set_callback(caprl_log_fn fn, void *user_data) {
    g_log_fn = fn;
    g_log_ud = user_data;
}

void caprl_log_set_level(int32_t level) {
    g_log_level = level;
}

int32_t caprl_log_level(void) {
    return g_log_level;
}

void caprl_log_emit(int32_t level, const char *func, const char *fmt, ...) {
    char    msg[2048];
    int     n = snprintf(msg, sizeof msg, "%s: ", func);
    va_list ap;
    va_start(ap, fmt);
    if (n < 0 || (size_t)n >= sizeof msg) {
        n = 0;
    }
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
    va_end(ap);
    if (g_log_fn) {
        g_log_fn(level, msg, g_log_ud);
    } else {
        fprintf(stderr, "caprl: [%s] %s\n", level_name(level), msg);
    }
}
