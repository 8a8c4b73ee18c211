/* caprl forward: run a prompt through the model and dump the logits of every position (a parity tool). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/model.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

int cmd_forward(int argc, char **argv) {
    static const cmd_info info = {
        "forward", "caprl forward --model DIR (--ids 1,2,3 | --ids-file F) --dump-logits OUT [--threads N]",
        "Run token ids through the model; write the logits of every position as raw little-endian float32 [T, vocab].",
        "The ids are comma- or space-separated, or a JSON array. A one-line JSON summary goes to stdout.\n"
        "The output file is written atomically (temporary file, then rename)."};
    const char *model_dir = NULL, *ids_text = NULL, *ids_file = NULL, *out_path = NULL;
    int32_t     threads = 0;
    opt_spec    specs[] = {
        {"model", OPT_STRING, &model_dir, "checkpoint directory", 0, 0, "DIR", 0},
        {"ids", OPT_STRING, &ids_text, "token ids, e.g. 1,2,3", 0, 0, "IDS", 0},
        {"ids-file", OPT_STRING, &ids_file, "file holding the token ids", 0, 0, "F", 0},
        {"dump-logits", OPT_STRING, &out_path, "output file for float32 [T, vocab] logits", 0, 0, "OUT", 0},
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!model_dir || !out_path) {
        return tool_usage_error(info.name, "--model and --dump-logits are required");
    }
    if (!ids_text == !ids_file) {
        return tool_usage_error(info.name, "give exactly one of --ids and --ids-file");
    }
    char  *file_text = NULL;
    size_t file_len = 0;
    if (ids_file && (rc = tool_read_file(info.name, ids_file, 256u << 20, &file_text, &file_len))) {
        return rc;
    }
    int32_t *ids = NULL;
    int64_t  T = 0;
    rc = tool_parse_ids(info.name, ids_file ? ids_file : "--ids", ids_file ? file_text : ids_text, &ids, &T);
    free(file_text);
    if (rc) {
        return rc;
    }
    caprl_model *model = NULL;
    if ((rc = tool_load_model(info.name, model_dir, threads, &model))) {
        free(ids);
        return rc;
    }
    const caprl_text_config *cfg = caprl_model_config(model);
    for (int64_t i = 0; i < T; i++) {
        if (ids[i] >= cfg->vocab_size) {
            fprintf(stderr, "caprl forward: error: token id %d at position %lld is outside the vocabulary (0..%d)\n",
                    ids[i], (long long)i, cfg->vocab_size - 1);
            free(ids);
            caprl_model_free(model);
            return EXIT_USAGE;
        }
    }
    const int32_t            chunk = 256;
    caprl_context_params     cp = caprl_context_default_params();
    cp.n_ctx = (int32_t)(T < (1 << 24) ? T : (1 << 24));
    cp.n_batch_max = (int32_t)(T < chunk ? T : chunk);
    cp.n_logits_max = cp.n_batch_max;
    caprl_context *ctx = NULL;
    caprl_error    err = {0};
    caprl_status   st = T > (1 << 24) ? CAPRL_ERR_INVALID_ARG : caprl_context_init(&ctx, model, &cp, &err);
    if (T > (1 << 24)) {
        snprintf(err.msg, sizeof err.msg, "%lld ids: at most %d", (long long)T, 1 << 24);
    }
    /* stream rows into a temporary file next to OUT, renamed into place only when complete */
    size_t tmp_cap = strlen(out_path) + 32;
    char  *tmp = malloc(tmp_cap);
    snprintf(tmp, tmp_cap, "%s.tmp.%ld", out_path, (long)getpid());
    FILE *out = st == CAPRL_OK ? fopen(tmp, "wb") : NULL;
    if (st == CAPRL_OK && !out) {
        st = CAPRL_ERR_IO;
        snprintf(err.msg, sizeof err.msg, "%s: cannot create", tmp);
    }
    int32_t *seq = calloc((size_t)cp.n_batch_max, sizeof(int32_t));
    int8_t  *want = malloc((size_t)cp.n_batch_max);
    memset(want, 1, (size_t)cp.n_batch_max);
    for (int64_t start = 0; start < T && st == CAPRL_OK; start += cp.n_batch_max) {
        int32_t     n = (int32_t)(T - start < cp.n_batch_max ? T - start : cp.n_batch_max);
        caprl_batch b = {.n_tokens = n, .tokens = ids + start, .seq_ids = seq, .want_logits = want};
        st = caprl_context_decode(ctx, &b, &err);
        for (int32_t r = 0; r < n && st == CAPRL_OK; r++) {
            if (fwrite(caprl_context_logits(ctx, r), sizeof(float), (size_t)cfg->vocab_size, out) !=
                (size_t)cfg->vocab_size) {
                st = CAPRL_ERR_IO;
                snprintf(err.msg, sizeof err.msg, "%s: write failed", tmp);
            }
        }
    }
    if (out) {
        bool ok = fflush(out) == 0 && fsync(fileno(out)) == 0;
        ok = fclose(out) == 0 && ok;
        if (st == CAPRL_OK && (!ok || rename(tmp, out_path) != 0)) {
            st = CAPRL_ERR_IO;
            snprintf(err.msg, sizeof err.msg, "%s: cannot write", out_path);
        }
        if (st != CAPRL_OK) {
            unlink(tmp);
        }
    }
    if (st == CAPRL_OK) {
        printf("{\"tokens\": %lld, \"vocab\": %d, \"dtype\": \"float32\", \"file\": \"%s\"}\n", (long long)T,
               cfg->vocab_size, out_path);
    }
    free(tmp);
    free(seq);
    free(want);
    caprl_context_free(ctx);
    free(ids);
    caprl_model_free(model);
    return st == CAPRL_OK ? EXIT_OK : tool_fail(info.name, st, err.msg);
}
