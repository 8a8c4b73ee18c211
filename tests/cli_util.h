/* Helpers for tests that run the caprl program: a shell command line with stderr captured to g_dir/stderr.txt.
 * g_dir is the test's scratch directory, set by the test before the first run. proc_util.h adds file helpers,
 * the last run's stderr as a string and background runs to kill. */
#ifndef CAPRL_CLI_UTIL_H
#define CAPRL_CLI_UTIL_H

#include <stdio.h>
#include <string.h>
#include <sys/wait.h>

static char g_dir[4096];

/* Runs cmdline; returns its exit status (or -1) and captures stdout into out (may be NULL, cap bytes; with NULL the
 * output is read and dropped). */
static inline int run(const char *cmdline, char *out, size_t cap) {
    char full[32768];
    snprintf(full, sizeof full, "%s 2>'%s/stderr.txt'", cmdline, g_dir);
    FILE *p = popen(full, "r");
    if (!p) {
        return -1;
    }
    size_t n = 0, got;
    char   buf[4096];
    while ((got = fread(buf, 1, sizeof buf, p)) > 0) {
        if (out && n + got < cap) {
            memcpy(out + n, buf, got);
            n += got;
        }
    }
    if (out) {
        out[n] = '\0';
    }
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* run() of the caprl program with the given arguments. */
static inline int run_cli(const char *args, char *out, size_t cap) {
    char full[16384];
    snprintf(full, sizeof full, "'%s' %s", CAPRL_CLI, args);
    return run(full, out, cap);
}

/* The stderr of the last run. */
static inline void read_stderr(char *buf, size_t cap) {
    char path[4200];
    snprintf(path, sizeof path, "%s/stderr.txt", g_dir);
    FILE  *f = fopen(path, "r");
    size_t n = f ? fread(buf, 1, cap - 1, f) : 0;
    buf[n] = '\0';
    if (f) {
        fclose(f);
    }
}

#endif /* CAPRL_CLI_UTIL_H */
