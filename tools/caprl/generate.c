/* caprl generate: sample continuations of a prompt with a Qwen2 model, streaming the text. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/generate.h"
#include "caprl/model.h"
#include "caprl/tokenizer.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

typedef struct stream_state {
    const caprl_tokenizer *tok;
    int32_t                n_seq;
    int32_t                n_samples;
    int32_t              **ids;     /* per sequence generated ids */
    int32_t               *n_ids;
    size_t                *printed; /* bytes of the decoded text already written (streaming mode) */
    bool                   stream;  /* one sequence: print as tokens arrive */
    char                  *text;
    size_t                 text_cap;
} stream_state;

static size_t decode_into(stream_state *s, int32_t seq) {
    size_t      len = 0;
    caprl_error err = {0};
    for (;;) {
        caprl_tokenizer_decode(s->tok, s->ids[seq], s->n_ids[seq], true, s->text, s->text_cap, &len, &err);
        if (len < s->text_cap) {
            return len;
        }
        s->text_cap = 2 * len + 64;
        s->text = realloc(s->text, s->text_cap);
    }
}

static bool on_token(int32_t prompt, int32_t sample, int32_t token, void *ud) {
    stream_state *s = ud;
    int32_t       seq = prompt * s->n_samples + sample;
    s->ids[seq][s->n_ids[seq]++] = token;
    if (s->stream) {
        size_t len = decode_into(s, seq);
        /* hold back a trailing U+FFFD: it may be the first bytes of a character the next token completes */
        size_t stable = len;
        if (len >= 3 && memcmp(s->text + len - 3, "\xEF\xBF\xBD", 3) == 0) {
            stable = len - 3;
        }
        if (stable > s->printed[seq]) {
            fwrite(s->text + s->printed[seq], 1, stable - s->printed[seq], stdout);
            fflush(stdout);
            s->printed[seq] = stable;
        }
    }
    return true;
}

static const char *finish_name(int32_t f) {
    return f == CAPRL_FINISH_EOS ? "eos" : f == CAPRL_FINISH_LENGTH ? "length" : "aborted";
}

int cmd_generate(int argc, char **argv) {
    static const cmd_info info = {
        "generate",
        "caprl generate --model DIR (--prompt TEXT | --prompt-file F) [--chat] [-n N] [options]",
        "Sample continuations of a prompt with a Qwen2 / Qwen2.5 checkpoint and stream the text to stdout.",
        "Sampling settings default to the model's generation_config.json (Hugging Face defaults where it is\n"
        "silent); flags override them. --temperature 0 or --greedy picks the most likely token (after the\n"
        "repetition penalty). Sample k of N uses its own random stream, so results do not depend on --threads.\n"
        "With -n > 1 each sample is printed when all are done, under a '--- sample k (reason) ---' line."};
    const char *model_dir = NULL, *prompt = NULL, *prompt_file = NULL, *system_prompt = NULL;
    bool        chat = false, greedy = false;
    int32_t     n = 1, top_k = -1, max_new = -1, threads = 0;
    int64_t     seed = 0;
    float       temperature = -1.0f, top_p = -1.0f, rep = -1.0f;
    opt_spec    specs[] = {
        {"model", OPT_STRING, &model_dir, "checkpoint directory (config.json, *.safetensors, tokenizer.json)", 0, 0, "DIR", 0},
        {"prompt", OPT_STRING, &prompt, "prompt text", 0, 0, "TEXT", 0},
        {"prompt-file", OPT_STRING, &prompt_file, "read the prompt from a file", 0, 0, "F", 0},
        {"chat", OPT_FLAG, &chat, "wrap the prompt in the Qwen2.5 chat template as a user turn", 0, 0, NULL, 0},
        {"system", OPT_STRING, &system_prompt, "system prompt for --chat (default: Qwen2.5's)", 0, 0, "TEXT", 0},
        {"samples", OPT_INT, &n, "samples per prompt", 1, 4096, "N", 'n'},
        {"temperature", OPT_FLOAT, &temperature, "sampling temperature, 0 = greedy (default: model's)", 0, 100, "T", 0},
        {"top-p", OPT_FLOAT, &top_p, "nucleus sampling mass in (0, 1] (default: model's)", 0, 1, "P", 0},
        {"top-k", OPT_INT, &top_k, "keep the k most likely tokens, 0 = off (default: model's)", 0, 1 << 30, "K", 0},
        {"repetition-penalty", OPT_FLOAT, &rep, "penalty > 0 on tokens already present (default: model's)", 0, 100, "R", 0},
        {"max-new-tokens", OPT_INT, &max_new, "tokens to generate per sample (default: model's, else 256)", 1, 1 << 24, "M", 0},
        {"greedy", OPT_FLAG, &greedy, "always pick the most likely token", 0, 0, NULL, 0},
        {"seed", OPT_I64, &seed, "random seed", 0, 9.2e18, "S", 0},
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!model_dir) {
        return tool_usage_error(info.name, "--model is required");
    }
    if (!prompt == !prompt_file) {
        return tool_usage_error(info.name, "give exactly one of --prompt and --prompt-file");
    }
    if (system_prompt && !chat) {
        return tool_usage_error(info.name, "--system needs --chat");
    }
    if (top_p == 0.0f) {
        return tool_usage_error(info.name, "--top-p must be in (0, 1]");
    }
    if (rep == 0.0f) {
        return tool_usage_error(info.name, "--repetition-penalty must be > 0");
    }
    char  *file_text = NULL;
    size_t file_len = 0;
    if (prompt_file && (rc = tool_read_file(info.name, prompt_file, 64u << 20, &file_text, &file_len))) {
        return rc;
    }
    caprl_model *model = NULL;
    if ((rc = tool_load_model(info.name, model_dir, threads, &model))) {
        free(file_text);
        return rc;
    }
    const caprl_tokenizer *tok = caprl_model_tokenizer(model);
    caprl_context         *ctx = NULL;
    int32_t               *ids = NULL;
    char                  *rendered = NULL;
    caprl_error            err = {0};
    caprl_status           st = CAPRL_OK;
    stream_state           ss = {0};
    if (!tok) {
        fprintf(stderr, "caprl generate: error: %s has no tokenizer.json\n", model_dir);
        caprl_model_free(model);
        free(file_text);
        return EXIT_DATA;
    }
    const char *text = prompt ? prompt : file_text;
    size_t      text_len = prompt ? strlen(prompt) : file_len;
    if (chat) {
        caprl_chat_message msg = {"user", text};
        st = caprl_chat_render(&msg, 1, system_prompt, true, &rendered, &err);
        text = rendered;
        text_len = rendered ? strlen(rendered) : 0;
    }
    int64_t n_ids = 0;
    if (st == CAPRL_OK) {
        st = caprl_tokenizer_encode(tok, text, text_len, true, NULL, 0, &n_ids, &err);
    }
    if (st == CAPRL_OK && n_ids == 0) {
        st = CAPRL_ERR_INVALID_ARG;
        snprintf(err.msg, sizeof err.msg, "the prompt is empty");
    }
    if (st == CAPRL_OK) {
        ids = malloc((size_t)n_ids * sizeof *ids);
        st = caprl_tokenizer_encode(tok, text, text_len, true, ids, n_ids, &n_ids, &err);
    }
    /* sampling: generation_config.json first, flags override */
    const caprl_generation_config *gc = caprl_model_generation_config(model);
    caprl_generate_params          gp = caprl_generate_default_params();
    gp.n_samples = n;
    gp.max_new_tokens = max_new > 0 ? max_new : (gc->max_new_tokens > 0 ? gc->max_new_tokens : 256);
    gp.sampling.do_sample = gc->do_sample;
    gp.sampling.temperature = gc->temperature;
    gp.sampling.top_k = gc->top_k;
    gp.sampling.top_p = gc->top_p;
    gp.sampling.repetition_penalty = gc->repetition_penalty;
    gp.sampling.seed = (uint64_t)seed;
    if (temperature > 0.0f) {
        gp.sampling.temperature = temperature;
    }
    if (top_p > 0.0f) {
        gp.sampling.top_p = top_p;
    }
    if (top_k >= 0) {
        gp.sampling.top_k = top_k;
    }
    if (rep > 0.0f) {
        gp.sampling.repetition_penalty = rep;
    }
    if (temperature > 0.0f || top_p > 0.0f || top_k >= 0) {
        gp.sampling.do_sample = true; /* asking for a sampling setting means sampling */
    }
    if (greedy || temperature == 0.0f) {
        gp.sampling.do_sample = false;
    }
    if (st == CAPRL_OK) {
        st = caprl_sampling_params_check(&gp.sampling, &err);
    }
    if (st == CAPRL_OK) {
        caprl_context_params cp = caprl_context_default_params();
        cp.n_seq_max = n;
        cp.n_ctx = (int32_t)(n_ids + gp.max_new_tokens);
        cp.n_batch_max = (int32_t)(n_ids < 512 ? (n_ids > n ? n_ids : n) : 512);
        if (cp.n_batch_max < n) {
            cp.n_batch_max = n;
        }
        cp.n_logits_max = n;
        st = caprl_context_init(&ctx, model, &cp, &err);
    }
    int32_t *finish = calloc((size_t)n, sizeof(int32_t));
    if (st == CAPRL_OK) {
        ss.tok = tok;
        ss.n_seq = n;
        ss.n_samples = n;
        ss.stream = n == 1;
        ss.ids = calloc((size_t)n, sizeof(int32_t *));
        ss.n_ids = calloc((size_t)n, sizeof(int32_t));
        ss.printed = calloc((size_t)n, sizeof(size_t));
        for (int32_t i = 0; i < n; i++) {
            ss.ids[i] = malloc((size_t)gp.max_new_tokens * sizeof(int32_t));
        }
        ss.text_cap = 4096;
        ss.text = malloc(ss.text_cap);
        const int32_t *prompts[1] = {ids};
        st = caprl_generate(ctx, prompts, &n_ids, 1, NULL, &gp, on_token, &ss, finish, NULL, &err);
    }
    if (st == CAPRL_OK) {
        for (int32_t i = 0; i < n; i++) {
            size_t len = decode_into(&ss, i);
            if (ss.stream) {
                fwrite(ss.text + ss.printed[i], 1, len - ss.printed[i], stdout);
                fputc('\n', stdout);
            } else {
                printf("--- sample %d (%s, %d tokens) ---\n", i, finish_name(finish[i]), ss.n_ids[i]);
                fwrite(ss.text, 1, len, stdout);
                fputc('\n', stdout);
            }
        }
        fflush(stdout);
    }
    for (int32_t i = 0; ss.ids && i < n; i++) {
        free(ss.ids[i]);
    }
    free(ss.ids);
    free(ss.n_ids);
    free(ss.printed);
    free(ss.text);
    free(finish);
    caprl_context_free(ctx);
    free(ids);
    caprl_free(rendered);
    free(file_text);
    caprl_model_free(model);
    return st == CAPRL_OK ? EXIT_OK : tool_fail(info.name, st, err.msg);
}
