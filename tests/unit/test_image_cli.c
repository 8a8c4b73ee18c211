/* `caprl preprocess` end to end: the dumped pixel_values equal the numpy reference of the HF processor (hashes
 * in tests/fixtures/img/preprocess.txt) for pipelines A and B, the JSON line on stdout, the defaults message,
 * exit codes for bad usage, bad images and bad configs, and no output file left behind on failure.
 * Skipped (77) when the program has not been built. */
#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "caprl_test.h"
#include "cli_util.h"

#define FIX CAPRL_SOURCE_DIR "/tests/fixtures/img/"


static uint64_t fnv1a64_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    *size = 0;
    if (!f) {
        return 0;
    }
    uint64_t h = 0xCBF29CE484222325ull;
    int      c;
    while ((c = fgetc(f)) != EOF) {
        h = (h ^ (uint8_t)c) * 0x100000001B3ull;
        (*size)++;
    }
    fclose(f);
    return h;
}

/* The numpy hash of the preprocess.txt row for (file, alpha) with the shipped bounds. */
static bool golden_hash(const char *file, const char *alpha, unsigned long long *hash, long long *n_floats,
                        char *grid, size_t grid_cap) {
    FILE *man = fopen(FIX "preprocess.txt", "r");
    if (!man) {
        return false;
    }
    char line[512];
    bool found = false;
    while (!found && fgets(line, sizeof line, man)) {
        char      f[128], a[16], v[32];
        long long mn, mx, fmn, fmx, t, gh, gw;
        if (line[0] != '#' && sscanf(line, "%127s %15s %lld %lld %lld %lld %31s %lld %lld %lld %lld %llx", f, a, &mn,
                                     &mx, &fmn, &fmx, v, &t, &gh, &gw, n_floats, hash) == 12 &&
            !strcmp(f, file) && !strcmp(a, alpha) && mx == 12845056 && (fmn == 0 || fmn == 3136)) {
            snprintf(grid, grid_cap, "\"grid_thw\": [%lld, %lld, %lld]", t, gh, gw);
            found = true;
        }
    }
    fclose(man);
    return found;
}

static void check_dump(const char *file, const char *alpha) {
    unsigned long long want = 0;
    long long          n_floats = 0;
    char               grid[128], args[8192], out[4096], path[1100];
    CHECK(golden_hash(file, alpha, &want, &n_floats, grid, sizeof grid));
    snprintf(path, sizeof path, "%s/out_%s.f32", g_dir, alpha);
    snprintf(args, sizeof args, "preprocess --model '%s' --image '%s%s' --dump-pixels '%s' --alpha %s", g_dir, FIX,
             file, path, alpha);
    CHECK_EQ_I64(run_cli(args, out, sizeof out), 0);
    CHECK_MSG(strstr(out, grid) != NULL, "%s: stdout %s lacks %s", file, out, grid);
    size_t   size = 0;
    uint64_t h = fnv1a64_file(path, &size);
    CHECK_EQ_I64(size, n_floats * 4);
    CHECK_MSG(h == want, "%s --alpha %s: dump hash %016llx, numpy %016llx", file, alpha, (unsigned long long)h, want);
    char err[4096];
    read_stderr(err, sizeof err);
    CHECK(strstr(err, "Qwen2.5-VL defaults") != NULL); /* no preprocessor_config.json in g_dir */
}

int main(void) {
    struct stat st;
    if (stat(CAPRL_CLI, &st) != 0) {
        fprintf(stderr, "test_image_cli: %s not built, skipping\n", CAPRL_CLI);
        return 77;
    }
    char *dir = test_tmpdir("test_image_cli");
    snprintf(g_dir, sizeof g_dir, "%s", dir);
    free(dir);

    check_dump("rgba8.png", "white");
    check_dump("baseline.jpg", "white");
    char probe[2300];
    snprintf(probe, sizeof probe, "preprocess --model '%s' --image '" FIX "lossy.webp' --dump-pixels '%s/probe.f32'",
             g_dir, g_dir);
    if (run_cli(probe, NULL, 0) == 0) {
        check_dump("lossless_alpha.webp", "drop"); /* skipped when built without WebP */
    }

    char args[8192], err[4096], out_path[1100], cfg_dir[1100];
    snprintf(out_path, sizeof out_path, "%s/never.f32", g_dir);
    CHECK_EQ_I64(run_cli("preprocess", NULL, 0), 1);
    CHECK_EQ_I64(run_cli("help preprocess >/dev/null", NULL, 0), 0);
    snprintf(args, sizeof args, "preprocess --model '%s' --image '%srgb8.png' --dump-pixels '%s' --alpha pink", g_dir,
             FIX, out_path);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 1);
    snprintf(args, sizeof args, "preprocess --model '%s' --image '%s/missing.png' --dump-pixels '%s'", g_dir, g_dir,
             out_path);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 2);
    read_stderr(err, sizeof err);
    CHECK(strstr(err, "missing.png") != NULL);
    snprintf(args, sizeof args, "preprocess --model '%s' --image '%sdecode.txt' --dump-pixels '%s'", g_dir, FIX,
             out_path);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 2);
    read_stderr(err, sizeof err);
    CHECK(strstr(err, "decode.txt") != NULL && strstr(err, "not a PNG, JPEG or WebP") != NULL);
    snprintf(args, sizeof args, "preprocess --model '%s/nodir' --image '%srgb8.png' --dump-pixels '%s'", g_dir, FIX,
             out_path);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 2);
    /* pipeline A refuses a 23x17 image (a side under 28) */
    snprintf(args, sizeof args, "preprocess --model '%s' --image '%srgb8.png' --dump-pixels '%s' --alpha drop",
             g_dir, FIX, out_path);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 2);
    /* a bad preprocessor_config.json names its field */
    snprintf(cfg_dir, sizeof cfg_dir, "%s/model", g_dir);
    mkdir(cfg_dir, 0755);
    char cfg_path[1200];
    snprintf(cfg_path, sizeof cfg_path, "%s/preprocessor_config.json", cfg_dir);
    FILE *f = fopen(cfg_path, "w");
    fputs("{\"image_std\": [0.5, 0, 0.5]}", f);
    fclose(f);
    snprintf(args, sizeof args, "preprocess --model '%s' --image '%srgb8.png' --dump-pixels '%s'", cfg_dir, FIX,
             out_path);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 2);
    read_stderr(err, sizeof err);
    CHECK(strstr(err, "image_std") != NULL);
    CHECK(stat(out_path, &st) != 0); /* no output from any failed run */
    /* the output must be a regular file (it is replaced by rename) */
    snprintf(args, sizeof args, "preprocess --model '%s' --image '%srgba8.png' --dump-pixels '%s'", g_dir, FIX,
             g_dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 1);
    return test_finish("test_image_cli");
}
