/* `caprl synth` end to end: the files of a small world, the same bytes on a rerun and at another --threads,
 * the summary line, --help, and exit codes for bad options (size not a multiple of 28, negative counts, a missing
 * --out) and an unwritable output directory. Skipped (77) when the program has not been built. */
#include <stdbool.h>
#include <sys/stat.h>

#include "caprl_test.h"
#include "proc_util.h"

static const char *const k_files[] = {
    "synth.json",         "scenes.jsonl",         "train.jsonl",         "test_qa.jsonl",    "leaky_ids.json",
    "captions_dense.jsonl", "captions_short.jsonl", "sft_captioner.jsonl", "sft_reader.jsonl", "bench.jsonl",
    "corpus.txt",         "sft_reader_bind.jsonl", "sft_describe.jsonl", "sft_filter.jsonl", "sft_filter_bind.jsonl",
    "sft_filter_keyed.jsonl", "images/train/00000.png", "images/train/00009.png", "images/test/00000.png",
    "images/test/00002.png",
};

static void check_same_world(const char *d1, const char *d2) {
    for (size_t k = 0; k < sizeof k_files / sizeof *k_files; k++) {
        char a[4400], b[4400];
        snprintf(a, sizeof a, "%s/%s", d1, k_files[k]);
        snprintf(b, sizeof b, "%s/%s", d2, k_files[k]);
        CHECK_MSG(same_file(a, b), "%s differs between %s and %s", k_files[k], d1, d2);
    }
}

int main(void) {
    struct stat st;
    if (stat(CAPRL_CLI, &st) != 0) {
        fprintf(stderr, "skip: %s not built\n", CAPRL_CLI);
        return 77;
    }
    char *dir = test_tmpdir("synth_cli");
    snprintf(g_dir, sizeof g_dir, "%s", dir);
    char args[8192], err[8192], path[4400];

    snprintf(args, sizeof args, "synth --out '%s/w1' --train 10 --test 3 --seed 5 --threads 1", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 0);
    read_stderr(err, sizeof err);
    CHECK_MSG(strstr(err, "13 images") &&
                  strstr(err, "90 training questions (10 leaky)"),
              "%s", err);
    for (size_t k = 0; k < sizeof k_files / sizeof *k_files; k++) {
        snprintf(path, sizeof path, "%s/w1/%s", dir, k_files[k]);
        CHECK_MSG(stat(path, &st) == 0 && st.st_size > 0, "%s missing or empty", path);
    }
    snprintf(path, sizeof path, "%s/w1/images/train/00010.png", dir);
    CHECK(stat(path, &st) != 0);

    /* Same bytes at another thread count and on a rerun over the same directory. */
    snprintf(args, sizeof args, "synth --out '%s/w2' --train 10 --test 3 --seed 5 --threads 2", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 0);
    char d1[4400], d2[4400];
    snprintf(d1, sizeof d1, "%s/w1", dir);
    snprintf(d2, sizeof d2, "%s/w2", dir);
    check_same_world(d1, d2);
    snprintf(args, sizeof args, "synth --out '%s/w2' --train 10 --test 3 --seed 5", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 0);
    check_same_world(d1, d2);

    /* The defaults written to the manifest; another seed gives other images. */
    snprintf(path, sizeof path, "%s/w1/synth.json", dir);
    FILE  *f = fopen(path, "rb");
    char   man[4096] = {0};
    size_t n = f ? fread(man, 1, sizeof man - 1, f) : 0;
    man[n] = '\0';
    if (f) {
        fclose(f);
    }
    CHECK(strstr(man, "\"size\": 84") && strstr(man, "\"seed\": 5") && strstr(man, "\"leaky_per_image\": 1") &&
          strstr(man, "\"question_style\": \"lookup\"") && strstr(man, "\"filter_bind_records\": 90"));
    /* The absent style: named in the manifest, the same images */
    snprintf(args, sizeof args, "synth --out '%s/w4' --train 10 --test 3 --seed 5 --question-style absent", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 0);
    snprintf(path, sizeof path, "%s/w4/synth.json", dir);
    f = fopen(path, "rb");
    n = f ? fread(man, 1, sizeof man - 1, f) : 0;
    man[n] = '\0';
    if (f) {
        fclose(f);
    }
    CHECK_MSG(strstr(man, "\"question_style\": \"absent\""), "%s", man);
    snprintf(path, sizeof path, "%s/w4/images/train/00009.png", dir);
    snprintf(d2, sizeof d2, "%s/w1/images/train/00009.png", dir);
    CHECK(same_file(path, d2));
    snprintf(args, sizeof args, "synth --out '%s/bad' --question-style vague", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 1);
    read_stderr(err, sizeof err);
    CHECK_MSG(strstr(err, "--question-style") && strstr(err, "vague"), "%s", err);
    snprintf(args, sizeof args, "synth --out '%s/w3' --train 10 --test 3 --seed 6 --size 56", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 0);
    char a[4400], b[4400];
    snprintf(a, sizeof a, "%s/w1/images/train/00000.png", dir);
    snprintf(b, sizeof b, "%s/w3/images/train/00000.png", dir);
    CHECK(!same_file(a, b));

    /* Usage errors: exit 1 and a message naming the option. */
    snprintf(args, sizeof args, "synth --out '%s/bad' --size 70", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 1);
    read_stderr(err, sizeof err);
    CHECK_MSG(strstr(err, "multiple of 28") != NULL, "%s", err);
    snprintf(args, sizeof args, "synth --out '%s/bad' --size 50", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 1);
    snprintf(args, sizeof args, "synth --out '%s/bad' --train -1", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 1);
    read_stderr(err, sizeof err);
    CHECK_MSG(strstr(err, "train") != NULL, "%s", err);
    snprintf(args, sizeof args, "synth --out '%s/bad' --test -3", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 1);
    snprintf(args, sizeof args, "synth --out '%s/bad' --min-objects 5 --max-objects 3", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 1);
    snprintf(args, sizeof args, "synth --out '%s/bad' --leaky-per-image 9", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 1);
    CHECK_EQ_I64(run_cli("synth --train 3", NULL, 0), 1);
    snprintf(path, sizeof path, "%s/bad", dir);
    CHECK(stat(path, &st) != 0); /* nothing created for a rejected command line */

    /* An output directory that cannot be created (its parent is a regular file): exit 2, naming the path. */
    snprintf(path, sizeof path, "%s/file", dir);
    f = fopen(path, "w");
    fclose(f);
    snprintf(args, sizeof args, "synth --out '%s/file/sub' --train 2 --test 1", dir);
    CHECK_EQ_I64(run_cli(args, NULL, 0), 2);
    read_stderr(err, sizeof err);
    CHECK_MSG(strstr(err, "file/sub") != NULL, "%s", err);

    char out[8192];
    CHECK_EQ_I64(run_cli("synth --help", out, sizeof out), 0);
    CHECK(strstr(out, "--leaky-per-image") != NULL || strstr(out, "leaky") != NULL);
    free(dir);
    return test_finish("test_synth_cli");
}
