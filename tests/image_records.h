/* Helpers for the tests of the commands that write one JSON line per image (caption, qa generate): the output as a
 * map, and a folder of fixture images with one corrupt file. */
#ifndef CAPRL_IMAGE_RECORDS_H
#define CAPRL_IMAGE_RECORDS_H

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "caprl_test.h"
#include "proc_util.h"

/* An output as {image: record}. Every line must be a complete JSON object ending in '\n' whose "image" appears
 * only once: a torn or duplicated record fails the test. NULL if the file does not exist. */
static inline json_t *load_image_records(const char *path) {
    size_t len = 0;
    char  *data = read_all(path, &len);
    if (!data) {
        return NULL;
    }
    json_t *map = json_object();
    size_t  start = 0;
    for (long line = 1; start < len; line++) {
        char *nl = memchr(data + start, '\n', len - start);
        CHECK_MSG(nl != NULL, "%s:%ld: last line has no newline (a torn record)", path, line);
        if (!nl) {
            break;
        }
        json_error_t jerr;
        json_t      *rec = json_loadb(data + start, (size_t)(nl - (data + start)), 0, &jerr);
        json_t      *img = rec ? json_object_get(rec, "image") : NULL;
        CHECK_MSG(json_is_object(rec) && json_is_string(img), "%s:%ld: not a record: %s", path, line,
                  rec ? "no string \"image\"" : jerr.text);
        if (json_is_string(img)) {
            CHECK_MSG(!json_object_get(map, json_string_value(img)), "%s:%ld: %s twice", path, line,
                      json_string_value(img));
            json_object_set(map, json_string_value(img), rec);
        }
        json_decref(rec);
        start = (size_t)(nl - data) + 1;
    }
    free(data);
    return map;
}

/* Copies the named files of tests/fixtures/img into dir (which exists); "corrupt.png" is made instead: a PNG cut
 * inside its header chunk. */
static inline void copy_fixture_images(const char *dir, const char *const *names, int n) {
    char cmd[8192];
    for (int i = 0; i < n; i++) {
        if (strcmp(names[i], "corrupt.png") == 0) {
            snprintf(cmd, sizeof cmd, "head -c 30 %s/tests/fixtures/img/rgba8.png > %s/corrupt.png", CAPRL_SOURCE_DIR,
                     dir);
        } else {
            snprintf(cmd, sizeof cmd, "cp %s/tests/fixtures/img/%s %s/", CAPRL_SOURCE_DIR, names[i], dir);
        }
        CHECK(system(cmd) == 0);
    }
}

#endif /* CAPRL_IMAGE_RECORDS_H */
