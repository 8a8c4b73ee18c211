/* caprl tokenizer train end to end: the subcommand dispatcher and help, a trained file that caprl's loader and
 * `caprl tokenize` accept, repeated --special, --no-qwen-specials, byte-identical reruns, and every error (missing
 * options, unreadable / empty / non-UTF-8 corpus, vocab too small, bad values) with its exit code, one clear line,
 * and no output file left behind. */
#include "caprl/tokenizer.h"
#include "caprl_test.h"
#include "proc_util.h"

static void expect_fail(const char *args, int code, const char *needle) {
    char err[8192];
    int  rc = run_cli(args, NULL, 0);
    read_stderr(err, sizeof err);
    CHECK_MSG(rc == code, "'%s' exited %d, expected %d; stderr: %s", args, rc, code, err);
    CHECK_MSG(strstr(err, needle) != NULL, "'%s' stderr lacks '%s': %s", args, needle, err);
    CHECK_MSG(strstr(err, "AddressSanitizer") == NULL && strstr(err, "fatal") == NULL, "%s", err);
}

static void write_file(const char *path, const char *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
}

int main(void) {
    char *tmp = test_tmpdir("tokenizer_cli");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    char args[8192], out[1 << 16], path[4200], path2[4200];

    /* dispatcher */
    CHECK(run_cli("tokenizer --help", out, sizeof out) == 0 && strstr(out, "train") != NULL);
    CHECK(run_cli("help tokenizer", out, sizeof out) == 0 && strstr(out, "subcommands") != NULL);
    CHECK(run_cli("--help", out, sizeof out) == 0 && strstr(out, "tokenizer") != NULL);
    CHECK(run_cli("tokenizer train --help", out, sizeof out) == 0 && strstr(out, "usage: caprl tokenizer train") &&
          strstr(out, "--vocab-size") && strstr(out, "--special"));
    expect_fail("tokenizer", 1, "subcommand");
    expect_fail("tokenizer frobnicate", 1, "unknown subcommand 'frobnicate'");

    /* a corpus with added tokens in it */
    char corpus[4200];
    snprintf(corpus, sizeof corpus, "%s/corpus.txt", tmp);
    size_t cap = 200000, n = 0;
    char  *text = malloc(cap);
    static const char *const lines[] = {
        "The quick brown fox jumps over the lazy dog.\n",
        "<|im_start|>user\nDescribe the image in detail.<|im_end|>\n",
        "A caption: a red bicycle leaning against a white wall, photographed at noon.\n",
        "Numbers 12345 and café, naïve, 中文, emoji 😀 appear too.\n",
    };
    for (size_t i = 0; n + 200 < cap; i++) {
        const char *l = lines[i % 4];
        memcpy(text + n, l, strlen(l));
        n += strlen(l);
        /* a pseudo-word per line (base 5 digits as letters) so there are more than 120 pairs to merge */
        text[n++] = ' ';
        for (size_t v = i % 3125, k = 0; k < 5; k++, v /= 5) {
            text[n++] = "aeiou"[v % 5];
        }
        text[n++] = '\n';
    }
    write_file(corpus, text, n);

    /* train, load, encode */
    snprintf(path, sizeof path, "%s/tok.json", tmp);
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 400 --out '%s' --special '<|caption|>' "
             "--special=\"<|box|>\" --min-frequency 2", corpus, path);
    int rc = run_cli(args, out, sizeof out);
    char err_text[8192];
    read_stderr(err_text, sizeof err_text);
    CHECK_MSG(rc == 0, "exit %d: %s", rc, err_text);
    CHECK_MSG(strstr(err_text, "merges") != NULL && strstr(err_text, "bytes/token") != NULL, "%s", err_text);
    CHECK(out[0] == '\0'); /* nothing on stdout */
    caprl_tokenizer *tok = NULL;
    caprl_error      err = {0};
    CHECK_OK(caprl_tokenizer_load(&tok, path, &err), &err);
    if (tok) {
        CHECK_EQ_I64(caprl_tokenizer_n_tokens(tok), 400);
        int32_t caption = caprl_tokenizer_token_id(tok, "<|caption|>"), box = caprl_tokenizer_token_id(tok, "<|box|>");
        int32_t eot     = caprl_tokenizer_token_id(tok, "<|endoftext|>");
        CHECK_EQ_I64(caption, 398);
        CHECK_EQ_I64(box, 399);
        CHECK_EQ_I64(eot, 376);
        CHECK(caprl_tokenizer_is_special(tok, caption) && caprl_tokenizer_is_special(tok, box));
        caprl_tokenizer_free(tok);
    }
    snprintf(args, sizeof args, "printf '%%s\\n' '\"<|caption|>The quick brown fox\"' | '%s' tokenize --tokenizer '%s'",
             CAPRL_CLI, path);
    CHECK(run(args, out, sizeof out) == 0 && strncmp(out, "[398, ", 6) == 0);

    /* the same inputs give the same bytes; --no-qwen-specials leaves only the --special ones */
    snprintf(path2, sizeof path2, "%s/tok2.json", tmp);
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 400 --out '%s' --special '<|caption|>' "
             "--special '<|box|>' --quiet", corpus, path2);
    CHECK(run_cli(args, NULL, 0) == 0);
    read_stderr(err_text, sizeof err_text);
    CHECK_MSG(err_text[0] == '\0', "--quiet printed: %s", err_text);
    size_t n1 = 0, n2 = 0;
    char  *a = read_all(path, &n1), *b = read_all(path2, &n2);
    CHECK(a && b && n1 == n2 && memcmp(a, b, n1) == 0);
    free(a);
    free(b);
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 300 --out '%s' --no-qwen-specials "
             "--special '<|caption|>'", corpus, path2);
    CHECK(run_cli(args, NULL, 0) == 0);
    CHECK_OK(caprl_tokenizer_load(&tok, path2, &err), &err);
    if (tok) {
        CHECK_EQ_I64(caprl_tokenizer_token_id(tok, "<|caption|>"), 299);
        CHECK_EQ_I64(caprl_tokenizer_token_id(tok, "<|im_start|>"), -1);
        caprl_tokenizer_free(tok);
    }

    /* a tiny corpus runs out of pairs: a note, still success */
    char small[4200];
    snprintf(small, sizeof small, "%s/small.txt", tmp);
    write_file(small, "abc abc\n", 8);
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 1000 --out '%s/small.json'", small, tmp);
    CHECK(run_cli(args, NULL, 0) == 0);
    read_stderr(err_text, sizeof err_text);
    CHECK_MSG(strstr(err_text, "note: stopped at") != NULL, "%s", err_text);

    /* errors: exit code, one line naming the problem, the previous output untouched, no temporary left */
    size_t before = 0;
    char  *prev   = read_all(path, &before);
    snprintf(args, sizeof args, "tokenizer train --vocab-size 400 --out '%s'", path);
    expect_fail(args, 1, "--corpus FILE and --out FILE are required");
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 400", corpus);
    expect_fail(args, 1, "required");
    snprintf(args, sizeof args, "tokenizer train --corpus '%s/missing.txt' --vocab-size 400 --out '%s'", tmp, path);
    expect_fail(args, 2, "missing.txt: cannot open");
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 400 --out '%s'", tmp, path);
    expect_fail(args, 2, "not a regular file");
    snprintf(path2, sizeof path2, "%s/empty.txt", tmp);
    write_file(path2, "", 0);
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 400 --out '%s'", path2, path);
    expect_fail(args, 2, "empty.txt: the corpus is empty");
    write_file(path2, "fine\nbad \xc3\x28 byte\n", 17);
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 400 --out '%s'", path2, path);
    expect_fail(args, 2, "empty.txt:2: invalid UTF-8 at byte offset 9");
    write_file(path2, "<|im_end|>", 10);
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 400 --out '%s'", path2, path);
    expect_fail(args, 2, "no text outside");
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 270 --out '%s'", corpus, path);
    expect_fail(args, 1, "vocab_size 270 is too small");
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 300 --out '%s' --special ''", corpus, path);
    expect_fail(args, 1, "empty");
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 300 --out '%s' --special", corpus, path);
    expect_fail(args, 1, "--special needs a value");
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size abc --out '%s'", corpus, path);
    expect_fail(args, 1, "--vocab-size");
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 400 --out '%s' --min-frequency 0", corpus,
             path);
    expect_fail(args, 1, "--min-frequency");
    snprintf(args, sizeof args, "tokenizer train --corpus '%s' --vocab-size 400 --out '%s/no/such/dir/t.json'", corpus,
             tmp);
    expect_fail(args, 2, "cannot create");
    size_t after = 0;
    char  *now   = read_all(path, &after);
    CHECK(prev && now && before == after && memcmp(prev, now, before) == 0);
    free(prev);
    free(now);
    snprintf(args, sizeof args, "ls '%s' | grep -c tmp", tmp);
    CHECK(run(args, out, sizeof out) != 0 || strcmp(out, "0\n") == 0);

    free(text);
    free(tmp);
    return test_finish("test_tokenizer_cli");
}
