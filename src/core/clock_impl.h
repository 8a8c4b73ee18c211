/* Wall-clock timing for benchmarks, profiles and progress: the monotonic clock in seconds. */
#ifndef CAPRL_CLOCK_IMPL_H
#define CAPRL_CLOCK_IMPL_H

#include <time.h>

static inline double caprl_seconds_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#endif /* CAPRL_CLOCK_IMPL_H */
