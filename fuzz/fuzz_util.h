/* Shared by the fuzz targets: the property check (a violation prints the property and the file's line, then traps,
 * which libFuzzer and the replayers report as a crash), a silent log callback, and a per-process temporary file for
 * targets whose function under test reads a path. */
#ifndef CAPRL_FUZZ_UTIL_H
#define CAPRL_FUZZ_UTIL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#define FUZZ_REQUIRE(cond)                                                                                      \
    do {                                                                                                        \
        if (!(cond)) {                                                                                          \
            fprintf(stderr, "%s: property failed: %s (line %d)\n", __FILE__, #cond, __LINE__);                 \
            __builtin_trap();                                                                                   \
        }                                                                                                       \
    } while (0)

static inline void fuzz_quiet_log(int32_t level, const char *msg, void *user_data) {
    (void)level;
    (void)msg;
    (void)user_data;
}

#define FUZZ_TEMP_PATH_CAP 96

/* Writes data to /tmp/caprl-fuzz-<kind>-<pid>.<ext>, its name in path[FUZZ_TEMP_PATH_CAP]; false if it cannot. */
static inline bool fuzz_write_temp(char *path, const char *kind, const char *ext, const uint8_t *data, size_t size) {
    snprintf(path, FUZZ_TEMP_PATH_CAP, "/tmp/caprl-fuzz-%s-%ld.%s", kind, (long)getpid(), ext);
    FILE *f = fopen(path, "wb");
    if (!f) {
        return false;
    }
    bool ok = fwrite(data, 1, size, f) == size;
    return fclose(f) == 0 && ok;
}

#endif /* CAPRL_FUZZ_UTIL_H */
