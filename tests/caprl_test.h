/* Minimal test harness: CHECK macros print file:line and count failures; a test's exit code is the number of
 * failures (capped), so a failing check always fails the test. 77 means "skipped" (CTest SKIP_RETURN_CODE). */
#ifndef CAPRL_TEST_H
#define CAPRL_TEST_H

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int g_test_failures;
static int g_test_checks;

#define CHECK(cond)                                                                                             \
    do {                                                                                                        \
        g_test_checks++;                                                                                        \
        if (!(cond)) {                                                                                          \
            g_test_failures++;                                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);                           \
        }                                                                                                       \
    } while (0)

#define CHECK_MSG(cond, ...)                                                                                    \
    do {                                                                                                        \
        g_test_checks++;                                                                                        \
        if (!(cond)) {                                                                                          \
            g_test_failures++;                                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond);                            \
            fprintf(stderr, __VA_ARGS__);                                                                       \
            fputc('\n', stderr);                                                                                \
        }                                                                                                       \
    } while (0)

#define CHECK_EQ_I64(a, b)                                                                                      \
    do {                                                                                                        \
        int64_t check_a_ = (int64_t)(a), check_b_ = (int64_t)(b);                                               \
        CHECK_MSG(check_a_ == check_b_, "%" PRId64 " != %" PRId64, check_a_, check_b_);                         \
    } while (0)

#define CHECK_STR_EQ(a, b)                                                                                      \
    do {                                                                                                        \
        const char *check_a_ = (a), *check_b_ = (b);                                                            \
        CHECK_MSG(check_a_ && check_b_ && strcmp(check_a_, check_b_) == 0, "\"%s\" != \"%s\"",                  \
                  check_a_ ? check_a_ : "(null)", check_b_ ? check_b_ : "(null)");                              \
    } while (0)

/* |a - b| <= atol + rtol * |b| */
#define CHECK_NEAR(a, b, rtol, atol)                                                                            \
    do {                                                                                                        \
        double check_a_ = (double)(a), check_b_ = (double)(b);                                                  \
        CHECK_MSG(fabs(check_a_ - check_b_) <= (atol) + (rtol)*fabs(check_b_), "%.9g vs %.9g (diff %.3g)",      \
                  check_a_, check_b_, fabs(check_a_ - check_b_));                                               \
    } while (0)

/* Expects a caprl call to return the given status; prints the error message otherwise. */
#define CHECK_STATUS(expr, code)                                                                                \
    do {                                                                                                        \
        caprl_error check_err_ = {0};                                                                           \
        caprl_status check_st_ = (expr);                                                                        \
        (void)check_err_;                                                                                       \
        CHECK_MSG(check_st_ == (code), "status %d, expected %d", (int)check_st_, (int)(code));                  \
    } while (0)

#define CHECK_OK(expr, errp)                                                                                    \
    do {                                                                                                        \
        caprl_status check_st_ = (expr);                                                                        \
        CHECK_MSG(check_st_ == CAPRL_OK, "status %d: %s", (int)check_st_, (errp)->msg);                         \
    } while (0)

static inline int test_finish(const char *name) {
    fprintf(stderr, "%s: %d checks, %d failed\n", name, g_test_checks, g_test_failures);
    return g_test_failures > 100 ? 100 : g_test_failures;
}

/* Fresh empty directory under the build tree for this test's files; caller frees. */
static inline char *test_tmpdir(const char *name) {
    char *path = malloc(4096);
    snprintf(path, 4096, "%s/test-tmp/%s.%ld", CAPRL_BINARY_DIR, name, (long)getpid());
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", path, path);
    if (system(cmd) != 0) {
        fprintf(stderr, "cannot create %s\n", path);
        exit(1);
    }
    return path;
}

#endif /* CAPRL_TEST_H */
