/* Library logging: routed to the callback set with caprl_log_set_callback (default: stderr).
 * The level is checked before the arguments are formatted. */
#ifndef CAPRL_LOG_IMPL_H
#define CAPRL_LOG_IMPL_H

#include "caprl/caprl.h"

void caprl_log_emit(int32_t level, const char *func, const char *fmt, ...) CAPRL_PRINTF(3, 4);

#define CAPRL_LOG_AT(level, ...)                                                                                \
    do {                                                                                                        \
        if ((level) <= caprl_log_level()) {                                                                     \
            caprl_log_emit((level), __func__, __VA_ARGS__);                                                     \
        }                                                                                                       \
    } while (0)
#define LOG_ERROR(...) CAPRL_LOG_AT(CAPRL_LOG_ERROR, __VA_ARGS__)
#define LOG_WARN(...)  CAPRL_LOG_AT(CAPRL_LOG_WARN, __VA_ARGS__)
#define LOG_INFO(...)  CAPRL_LOG_AT(CAPRL_LOG_INFO, __VA_ARGS__)
#define LOG_DEBUG(...) CAPRL_LOG_AT(CAPRL_LOG_DEBUG, __VA_ARGS__)
#define LOG_TRACE(...) CAPRL_LOG_AT(CAPRL_LOG_TRACE, __VA_ARGS__)

#endif /* CAPRL_LOG_IMPL_H */
