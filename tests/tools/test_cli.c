/* The caprl program end to end: every subcommand's --help, exit codes for bad usage and bad files, init-model ->
 * generate / tokenize / detokenize / forward on a checkpoint the test creates, forward's dump equal to the
 * library's logits, tokenize / detokenize over every case of the Hugging Face golden file (NUL included), and
 * bench --quick --json, bench gemm. */
#include <jansson.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "caprl/model.h"
#include "caprl_test.h"
#include "cli_util.h"


static void expect_fail(const char *cmdline, int code, const char *needle) {
    char err[8192];
    int  rc = run(cmdline, NULL, 0);
    read_stderr(err, sizeof err);
    CHECK_MSG(rc == code, "'%s' exited %d, expected %d; stderr: %s", cmdline, rc, code, err);
    CHECK_MSG(strstr(err, needle) != NULL, "'%s' stderr lacks '%s': %s", cmdline, needle, err);
    /* one clear line, no crash trace */
    CHECK_MSG(strstr(err, "AddressSanitizer") == NULL && strstr(err, "fatal") == NULL, "%s", err);
}

/* Every golden case through the program: its text as a JSON line to tokenize (ids as `tokenizers` gives them),
 * its ids (or, for the decode-only cases, its decode_ids) to detokenize with and without --skip-special (the
 * decoded strings, NULs and all). */
static void test_golden_cli(const char *model_dir) {
    char  path[4600], cmd[16384];
    FILE *golden = fopen(CAPRL_SOURCE_DIR "/tests/fixtures/tok/qwen2_golden.jsonl", "r");
    snprintf(path, sizeof path, "%s/golden_text.jsonl", g_dir);
    FILE *texts = fopen(path, "w");
    snprintf(path, sizeof path, "%s/golden_ids.jsonl", g_dir);
    FILE *ids = fopen(path, "w");
    CHECK(golden && texts && ids);
    if (!golden || !texts || !ids) {
        return;
    }
    json_t *cases = json_array();
    char    line[1 << 16];
    while (fgets(line, sizeof line, golden)) {
        json_error_t jerr;
        json_t      *c = json_loads(line, JSON_ALLOW_NUL, &jerr);
        CHECK_MSG(c != NULL, "golden line: %s", jerr.text);
        if (!c) {
            continue;
        }
        if (json_object_get(c, "text")) {
            char *t = json_dumps(json_object_get(c, "text"), JSON_ENCODE_ANY);
            fprintf(texts, "%s\n", t);
            free(t);
        }
        json_t *to_decode = json_object_get(c, "ids") ? json_object_get(c, "ids") : json_object_get(c, "decode_ids");
        char   *i = json_dumps(to_decode, JSON_COMPACT);
        fprintf(ids, "%s\n", i);
        free(i);
        json_array_append_new(cases, c);
    }
    fclose(golden);
    fclose(texts);
    fclose(ids);
    CHECK(json_array_size(cases) > 100);
    snprintf(cmd, sizeof cmd, "'%s' tokenize --model %s < %s/golden_text.jsonl > %s/tok_out.jsonl", CAPRL_CLI,
             model_dir, g_dir, g_dir);
    CHECK(run(cmd, NULL, 0) == 0);
    snprintf(cmd, sizeof cmd, "'%s' detokenize --model %s < %s/golden_ids.jsonl > %s/detok_out.jsonl", CAPRL_CLI,
             model_dir, g_dir, g_dir);
    CHECK(run(cmd, NULL, 0) == 0);
    snprintf(cmd, sizeof cmd, "'%s' detokenize --skip-special --model %s < %s/golden_ids.jsonl > %s/skip_out.jsonl",
             CAPRL_CLI, model_dir, g_dir, g_dir);
    CHECK(run(cmd, NULL, 0) == 0);
    FILE *outs[3];
    const char *names[3] = {"tok_out", "detok_out", "skip_out"};
    for (int f = 0; f < 3; f++) {
        snprintf(path, sizeof path, "%s/%s.jsonl", g_dir, names[f]);
        outs[f] = fopen(path, "r");
        CHECK(outs[f] != NULL);
    }
    size_t n_ok = 0;
    for (size_t k = 0; outs[0] && outs[1] && outs[2] && k < json_array_size(cases); k++) {
        json_t      *c = json_array_get(cases, k);
        json_error_t jerr;
        bool         ids_ok = true, text_ok = true;
        if (json_object_get(c, "text")) {
            json_t *got_ids = fgets(line, sizeof line, outs[0]) ? json_loads(line, 0, &jerr) : NULL;
            ids_ok = got_ids && json_equal(got_ids, json_object_get(c, "ids"));
            json_decref(got_ids);
        }
        for (int f = 1; f < 3; f++) {
            json_t *got = fgets(line, sizeof line, outs[f]) ? json_loads(line, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr)
                                                            : NULL;
            json_t *want = json_object_get(c, f == 1 ? "decoded" : "decoded_skip");
            text_ok = text_ok && got && json_is_string(got) && json_string_length(got) == json_string_length(want) &&
                      memcmp(json_string_value(got), json_string_value(want), json_string_length(want)) == 0;
            json_decref(got);
        }
        CHECK_MSG(ids_ok && text_ok, "golden case %zu (%s): tokenize %s, detokenize %s", k + 1,
                  json_string_value(json_object_get(c, "text")), ids_ok ? "ok" : "differs", text_ok ? "ok" : "differs");
        n_ok += ids_ok && text_ok;
    }
    CHECK_EQ_I64((int64_t)n_ok, (int64_t)json_array_size(cases));
    for (int f = 0; f < 3; f++) {
        if (outs[f]) {
            fclose(outs[f]);
        }
    }
    json_decref(cases);
}

int main(void) {
    char *tmp = test_tmpdir("cli");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    char cmd[8192], out[1 << 16];
    const char *commands[] = {"generate", "tokenize", "detokenize", "forward", "bench", "init-model", "version"};
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        snprintf(cmd, sizeof cmd, "%s %s --help", CAPRL_CLI, commands[i]);
        CHECK_MSG(run(cmd, out, sizeof out) == 0 && strstr(out, "usage: caprl") != NULL, "%s --help", commands[i]);
        snprintf(cmd, sizeof cmd, "%s help %s", CAPRL_CLI, commands[i]);
        CHECK(run(cmd, out, sizeof out) == 0 && strstr(out, "usage: caprl") != NULL);
    }
    snprintf(cmd, sizeof cmd, "%s nosuchcommand", CAPRL_CLI);
    expect_fail(cmd, 1, "unknown command");
    snprintf(cmd, sizeof cmd, "%s generate --bogus 1", CAPRL_CLI);
    expect_fail(cmd, 1, "unknown option '--bogus'");
    snprintf(cmd, sizeof cmd, "%s generate --model x --prompt a --top-p 2", CAPRL_CLI);
    expect_fail(cmd, 1, "--top-p");
    snprintf(cmd, sizeof cmd, "%s generate --model %s/missing --prompt hi", CAPRL_CLI, tmp);
    expect_fail(cmd, 2, "missing");

    /* a checkpoint with the real tokenizer */
    snprintf(cmd, sizeof cmd, "%s init-model --out %s/m --preset tiny --dtype f32 --seed 3 --tokenizer %s/data/qwen-tokenizer/tokenizer.json",
             CAPRL_CLI, tmp, CAPRL_SHARED_DIR);
    CHECK(run(cmd, NULL, 0) == 0);

    snprintf(cmd, sizeof cmd, "%s generate --model %s/m --chat --prompt hello --max-new-tokens 5 --seed 4 --threads 1", CAPRL_CLI, tmp);
    char out1[4096], out2[4096];
    CHECK(run(cmd, out1, sizeof out1) == 0);
    snprintf(cmd, sizeof cmd, "%s generate --model %s/m --chat --prompt hello --max-new-tokens 5 --seed 4 --threads 2", CAPRL_CLI, tmp);
    CHECK(run(cmd, out2, sizeof out2) == 0);
    CHECK_MSG(strcmp(out1, out2) == 0, "same seed, different threads: '%s' vs '%s'", out1, out2);
    snprintf(cmd, sizeof cmd, "%s generate --model %s/m --prompt hi -n 3 --temperature 1 --max-new-tokens 4", CAPRL_CLI, tmp);
    CHECK(run(cmd, out, sizeof out) == 0 && strstr(out, "--- sample 2") != NULL);
    snprintf(cmd, sizeof cmd, "%s generate --model %s/m --prompt \"$(printf 'a\\377b')\"", CAPRL_CLI, tmp);
    expect_fail(cmd, 1, "UTF-8");

    snprintf(cmd, sizeof cmd, "printf '%%s\\n' '\"Hello world\"' '\" Hello world\"' | %s tokenize --model %s/m", CAPRL_CLI, tmp);
    CHECK(run(cmd, out, sizeof out) == 0);
    CHECK_STR_EQ(out, "[9707, 1879]\n[21927, 1879]\n");
    snprintf(cmd, sizeof cmd, "printf '%%s\\n' '\"<|im_end|>\"' | %s tokenize --model %s/m --no-special", CAPRL_CLI, tmp);
    CHECK(run(cmd, out, sizeof out) == 0 && strncmp(out, "[151645]", 8) != 0);
    snprintf(cmd, sizeof cmd, "printf '%%s\\n' '[9707, 1879, 151645]' | %s detokenize --model %s/m", CAPRL_CLI, tmp);
    CHECK(run(cmd, out, sizeof out) == 0);
    CHECK_STR_EQ(out, "\"Hello world<|im_end|>\"\n");
    snprintf(cmd, sizeof cmd, "printf '%%s\\n' '[1, 2' | %s detokenize --model %s/m", CAPRL_CLI, tmp);
    expect_fail(cmd, 2, "stdin:1");
    snprintf(cmd, sizeof cmd, "%s/m", tmp);
    test_golden_cli(cmd);

    /* forward: the dump equals the library's logits, bit for bit */
    snprintf(cmd, sizeof cmd, "%s forward --model %s/m --ids 9707,1879,11,279 --dump-logits %s/logits.bin", CAPRL_CLI, tmp, tmp);
    CHECK(run(cmd, out, sizeof out) == 0 && strstr(out, "\"tokens\": 4") != NULL);
    char path[4200];
    snprintf(path, sizeof path, "%s/logits.bin", tmp);
    struct stat st;
    CHECK(stat(path, &st) == 0 && st.st_size == (off_t)4 * 151936 * 4);
    caprl_model *m = NULL;
    caprl_error  err = {0};
    snprintf(path, sizeof path, "%s/m", tmp);
    CHECK_OK(caprl_model_load(&m, path, NULL, &err), &err);
    if (m) {
        caprl_context_params cp = caprl_context_default_params();
        cp.n_ctx = 8;
        cp.n_batch_max = 4;
        cp.n_logits_max = 4;
        caprl_context *ctx = NULL;
        CHECK_OK(caprl_context_init(&ctx, m, &cp, &err), &err);
        int32_t     ids[4] = {9707, 1879, 11, 279}, seq[4] = {0};
        int8_t      want[4] = {1, 1, 1, 1};
        caprl_batch b = {.n_tokens = 4, .tokens = ids, .seq_ids = seq, .want_logits = want};
        CHECK_OK(caprl_context_decode(ctx, &b, &err), &err);
        float *dumped = malloc((size_t)4 * 151936 * 4);
        snprintf(path, sizeof path, "%s/logits.bin", tmp);
        FILE *f = fopen(path, "rb");
        CHECK(f && fread(dumped, 4, (size_t)4 * 151936, f) == (size_t)4 * 151936);
        if (f) {
            fclose(f);
        }
        for (int r = 0; r < 4; r++) {
            CHECK(memcmp(dumped + (size_t)r * 151936, caprl_context_logits(ctx, r), 151936 * 4) == 0);
        }
        free(dumped);
        caprl_context_free(ctx);
        caprl_model_free(m);
    }
    snprintf(cmd, sizeof cmd, "%s forward --model %s/m --ids 1,x --dump-logits %s/bad.bin", CAPRL_CLI, tmp, tmp);
    expect_fail(cmd, 1, "token id");
    snprintf(cmd, sizeof cmd, "%s forward --model %s/m --ids 999999 --dump-logits %s/bad.bin", CAPRL_CLI, tmp, tmp);
    expect_fail(cmd, 1, "outside the vocabulary");

    /* a truncated checkpoint is a clean error, and a failed forward does not clobber an existing output */
    snprintf(cmd, sizeof cmd, "cp -r %s/m %s/cut && truncate -s 100000 %s/cut/model.safetensors", tmp, tmp, tmp);
    CHECK(system(cmd) == 0);
    snprintf(cmd, sizeof cmd, "%s forward --model %s/cut --ids 1 --dump-logits %s/logits.bin", CAPRL_CLI, tmp, tmp);
    expect_fail(cmd, 2, "model.safetensors");
    snprintf(path, sizeof path, "%s/logits.bin", tmp);
    CHECK(stat(path, &st) == 0 && st.st_size == (off_t)4 * 151936 * 4);
    snprintf(cmd, sizeof cmd, "printf '{\"model_type\": \"qwen2\",' > %s/cut/config.json", tmp);
    CHECK(system(cmd) == 0);
    snprintf(cmd, sizeof cmd, "%s generate --model %s/cut --prompt hi", CAPRL_CLI, tmp);
    expect_fail(cmd, 2, "config.json");

    /* bench smoke test: all figures present and positive */
    snprintf(cmd, sizeof cmd, "%s bench --quick --json --threads 2 --tokenizer %s/data/qwen-tokenizer/tokenizer.json",
             CAPRL_CLI, CAPRL_SHARED_DIR);
    CHECK(run(cmd, out, sizeof out) == 0);
    CHECK(strstr(out, "\"fp32_fma_gflops\"") && strstr(out, "\"mem_bw_gbs\"") && strstr(out, "\"decode16_over_decode1\"") &&
          strstr(out, "\"tokenizer_mb_per_s_1_thread\""));
    /* a prompt shorter than the 16-sequence decode batch */
    snprintf(cmd, sizeof cmd, "%s bench --quick --json --threads 2 --no-vision --prompt-tokens 8 --decode-steps 2",
             CAPRL_CLI);
    CHECK(run(cmd, out, sizeof out) == 0);
    CHECK(strstr(out, "\"decode16_over_decode1\"") != NULL);
    /* bench gemm: one odd shape, every pass; then bad options */
    snprintf(cmd, sizeof cmd, "%s bench gemm --m 37 --n 50 --k 133 --pass all --reps 1 --threads 2 --json", CAPRL_CLI);
    CHECK(run(cmd, out, sizeof out) == 0);
    CHECK(strstr(out, "\"pass\":\"fwd\"") && strstr(out, "\"pass\":\"bwd-data\"") &&
          strstr(out, "\"pass\":\"bwd-weight\"") && strstr(out, "\"m\":37,\"n\":50,\"k\":133"));
    snprintf(cmd, sizeof cmd, "%s bench gemm --dtype f16", CAPRL_CLI);
    expect_fail(cmd, 1, "--dtype");
    snprintf(cmd, sizeof cmd, "%s bench gemm --m 4 --n 4", CAPRL_CLI);
    expect_fail(cmd, 1, "--k");
    snprintf(cmd, sizeof cmd, "%s bench gemm --pass sideways", CAPRL_CLI);
    expect_fail(cmd, 1, "--pass");
    /* bench attn: the training kind on a small shape; then bad options */
    snprintf(cmd, sizeof cmd, "%s bench attn --kind train --tokens 40 --heads 4 --kv-heads 2 --head-dim 24 --reps 1 "
             "--threads 2 --json", CAPRL_CLI);
    CHECK(run(cmd, out, sizeof out) == 0);
    CHECK(strstr(out, "\"name\":\"train\"") && strstr(out, "\"tokens\":40,\"heads\":4,\"kv_heads\":2") &&
          strstr(out, "\"backward_seconds\"") && !strstr(out, "decoder"));
    snprintf(cmd, sizeof cmd, "%s bench attn --kind sideways", CAPRL_CLI);
    expect_fail(cmd, 1, "--kind");
    snprintf(cmd, sizeof cmd, "%s bench attn --isa sse2", CAPRL_CLI);
    expect_fail(cmd, 1, "--isa");
    snprintf(cmd, sizeof cmd, "%s bench attn --kind decoder --heads 3 --kv-heads 2", CAPRL_CLI);
    expect_fail(cmd, 1, "kv_heads");
    free(tmp);
    return test_finish("test_cli");
}
