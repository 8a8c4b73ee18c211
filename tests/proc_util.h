/* File and process helpers for tests that run the caprl program (on top of cli_util.h: g_dir, run, run_cli):
 * whole files, the last run's stderr as a string, line counts, and a run started in the background to be killed
 * with SIGKILL once it has made some progress (the kill-and-resume tests). Everything is static inline, so a test
 * that uses only part of it builds warning-free. */
#ifndef CAPRL_PROC_UTIL_H
#define CAPRL_PROC_UTIL_H

#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "caprl_test.h"
#include "cli_util.h"

/* ---- files ----------------------------------------------------------------------------------------------------- */

/* The whole file as a malloc'd NUL-terminated string; *len (len may be NULL) is its size, binary contents included.
 * NULL (and *len 0) if it cannot be read. Reads to the end instead of trusting the size: the file may still grow. */
static inline char *read_all(const char *path, size_t *len) {
    if (len) {
        *len = 0;
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    size_t cap = 4096, n = 0, got;
    char  *buf = malloc(cap);
    while (buf && (got = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (n + 1 == cap) {
            char *more = realloc(buf, cap * 2);
            if (!more) {
                free(buf);
            }
            buf = more;
            cap *= 2;
        }
    }
    fclose(f);
    if (buf) {
        buf[n] = '\0';
        if (len) {
            *len = n;
        }
    }
    return buf;
}

/* read_all, or "" (malloc'd) when the file cannot be read. */
static inline char *read_text(const char *path) {
    char *s = read_all(path, NULL);
    return s ? s : calloc(1, 1);
}

static inline bool file_exists(const char *path) {
    return access(path, F_OK) == 0;
}

/* Byte equality of two files (false if either cannot be read). */
static inline bool same_file(const char *a, const char *b) {
    size_t na = 0, nb = 0;
    char  *x = read_all(a, &na), *y = read_all(b, &nb);
    bool   same = x && y && na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    return same;
}

/* The number of '\n' in the file: the complete lines (records) written so far; 0 if it does not exist. */
static inline long count_file_lines(const char *path) {
    char *s = read_all(path, NULL);
    long  n = 0;
    for (const char *p = s; p && *p; p++) {
        n += *p == '\n';
    }
    free(s);
    return n;
}

/* Creates (or truncates) path with text. */
static inline void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    CHECK_MSG(f != NULL, "cannot create %s", path);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

/* Appends text to path: what a kill in the middle of a write leaves, half a record without its newline. */
static inline void append_text(const char *path, const char *text) {
    FILE *f = fopen(path, "ab");
    CHECK_MSG(f != NULL, "cannot append to %s", path);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

/* The stderr of the last run() (g_dir/stderr.txt) as a malloc'd string, "" if there is none; the caller frees it. */
static inline char *last_stderr(void) {
    char path[4200];
    snprintf(path, sizeof path, "%s/stderr.txt", g_dir);
    return read_text(path);
}

/* ---- background runs ------------------------------------------------------------------------------------------- */

static inline double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A command line running in the background. */
typedef struct child {
    pid_t pid;
    int   status; /* its waitpid status once done */
    bool  done;   /* it has ended and been reaped */
} child;

/* Starts "exec cmdline" with /bin/sh in the background, stdout to /dev/null, stderr appended to err_path (appended:
 * a test that starts the same command again and again keeps every attempt's messages). exec makes the child's pid
 * the program's own, so the SIGKILL of child_kill hits the program and not a shell around it. Returns false (a
 * failed check) if it cannot fork. */
static inline bool child_start(child *c, const char *cmdline, const char *err_path) {
    char full[32768];
    snprintf(full, sizeof full, "exec %s 2>>'%s' >/dev/null", cmdline, err_path);
    memset(c, 0, sizeof *c);
    c->pid = fork();
    if (c->pid == 0) {
        execl("/bin/sh", "sh", "-c", full, (char *)NULL);
        _exit(127);
    }
    CHECK(c->pid > 0);
    c->done = c->pid <= 0; /* nothing to wait for or kill: waitpid(-1) would reap any child */
    return c->pid > 0;
}

/* Reaps the child if it has ended, without waiting; returns whether it has. */
static inline bool child_poll(child *c) {
    if (!c->done && waitpid(c->pid, &c->status, WNOHANG) == c->pid) {
        c->done = true;
    }
    return c->done;
}

/* Waits, checking every poll_s seconds, until until(arg) holds, the child ends or timeout_s pass; returns whether
 * until(arg) held. With until NULL it waits out the time (or the end). Kills are triggered by progress (records
 * written, a checkpoint under way) rather than by time alone, so they land where meant however loaded the machine
 * is; poll_s bounds how far past the trigger they land. */
static inline bool child_wait_until(child *c, bool (*until)(const void *arg), const void *arg, double timeout_s,
                                    double poll_s) {
    double t0 = now_s();
    while (now_s() - t0 < timeout_s && !child_poll(c)) {
        if (until && until(arg)) {
            return true;
        }
        struct timespec ts = {(time_t)poll_s, (long)((poll_s - (double)(time_t)poll_s) * 1e9)};
        nanosleep(&ts, NULL);
    }
    return false;
}

/* The condition of child_wait_lines: the file at path has at least `lines` complete lines. */
typedef struct lines_goal {
    const char *path;
    long        lines;
} lines_goal;

static inline bool has_lines(const void *goal) {
    const lines_goal *g = goal;
    return count_file_lines(g->path) >= g->lines;
}

/* child_wait_until the file at path has `lines` complete lines (records). */
static inline bool child_wait_lines(child *c, const char *path, long lines, double timeout_s, double poll_s) {
    lines_goal g = {path, lines};
    return child_wait_until(c, has_lines, &g, timeout_s, poll_s);
}

/* SIGKILLs the child unless it has already been reaped, then reaps it; returns whether a signal ended it (false: it
 * exited on its own, before the signal or just as it came). */
static inline bool child_kill(child *c) {
    if (!c->done) {
        CHECK(kill(c->pid, SIGKILL) == 0);
        CHECK(waitpid(c->pid, &c->status, 0) == c->pid);
        c->done = true;
    }
    return WIFSIGNALED(c->status);
}

#endif /* CAPRL_PROC_UTIL_H */
