/* caprl generate: sample continuations of a prompt with a Qwen2 model, or describe an image with a Qwen2.5-VL
 * model, streaming the text. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/generate.h"
#include "caprl/image.h"
#include "caprl/model.h"
#include "caprl/tokenizer.h"
#include "caprl/vision.h"
#include "caprl/vlm.h"
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
        s->text = tool_xrealloc(s->text, s->text_cap);
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

static void stream_init(stream_state *ss, const caprl_tokenizer *tok, int32_t n, int32_t max_new) {
    ss->tok = tok;
    ss->n_seq = n;
    ss->n_samples = n;
    ss->stream = n == 1;
    ss->ids = tool_xcalloc((size_t)n, sizeof(int32_t *));
    ss->n_ids = tool_xcalloc((size_t)n, sizeof(int32_t));
    ss->printed = tool_xcalloc((size_t)n, sizeof(size_t));
    for (int32_t i = 0; i < n; i++) {
        ss->ids[i] = tool_xmalloc((size_t)max_new * sizeof(int32_t));
    }
    ss->text_cap = 4096;
    ss->text = tool_xmalloc(ss->text_cap);
}

static void stream_free(stream_state *ss) {
    for (int32_t i = 0; ss->ids && i < ss->n_seq; i++) {
        free(ss->ids[i]);
    }
    free(ss->ids);
    free(ss->n_ids);
    free(ss->printed);
    free(ss->text);
}

/* The rest of a streamed sample, or every sample under its header. */
static void print_samples(stream_state *ss, const int32_t *finish) {
    for (int32_t i = 0; i < ss->n_seq; i++) {
        size_t len = decode_into(ss, i);
        if (ss->stream) {
            fwrite(ss->text + ss->printed[i], 1, len - ss->printed[i], stdout);
            fputc('\n', stdout);
        } else {
            printf("--- sample %d (%s, %d tokens) ---\n", i, tool_finish_name(finish[i]), ss->n_ids[i]);
            fwrite(ss->text, 1, len, stdout);
            fputc('\n', stdout);
        }
    }
    fflush(stdout);
}

/* The sampling flags; negative numbers mean "not given". */
typedef struct sampling_flags {
    int32_t n, top_k, max_new;
    int64_t seed;
    float   temperature, top_p, rep;
    bool    greedy;
} sampling_flags;

/* generation_config.json first, flags override. */
static caprl_generate_params sampling_params(const caprl_model *model, const sampling_flags *f) {
    const caprl_generation_config *gc = caprl_model_generation_config(model);
    caprl_generate_params          gp = caprl_generate_default_params();
    gp.n_samples = f->n;
    gp.max_new_tokens = f->max_new > 0 ? f->max_new : (gc->max_new_tokens > 0 ? gc->max_new_tokens : 256);
    gp.sampling.do_sample = gc->do_sample;
    gp.sampling.temperature = gc->temperature;
    gp.sampling.top_k = gc->top_k;
    gp.sampling.top_p = gc->top_p;
    gp.sampling.repetition_penalty = gc->repetition_penalty;
    gp.sampling.seed = (uint64_t)f->seed;
    if (f->temperature > 0.0f) {
        gp.sampling.temperature = f->temperature;
    }
    if (f->top_p > 0.0f) {
        gp.sampling.top_p = f->top_p;
    }
    if (f->top_k >= 0) {
        gp.sampling.top_k = f->top_k;
    }
    if (f->rep > 0.0f) {
        gp.sampling.repetition_penalty = f->rep;
    }
    if (f->temperature > 0.0f || f->top_p > 0.0f || f->top_k >= 0) {
        gp.sampling.do_sample = true; /* asking for a sampling setting means sampling */
    }
    if (f->greedy || f->temperature == 0.0f) {
        gp.sampling.do_sample = false;
    }
    return gp;
}

/* The text path: optional chat rendering, tokenization, one prompt through caprl_generate. */
static caprl_status run_text(caprl_model *model, const char *text, size_t text_len, bool chat, const char *system,
                             const caprl_generate_params *gp, stream_state *ss, int32_t *finish, caprl_error *err) {
    const caprl_tokenizer *tok = caprl_model_tokenizer(model);
    caprl_context         *ctx = NULL;
    int32_t               *ids = NULL;
    char                  *rendered = NULL;
    caprl_status           st = CAPRL_OK;
    if (chat) {
        caprl_chat_message msg = {"user", text};
        st = caprl_chat_render(&msg, 1, system, true, &rendered, err);
        text = rendered;
        text_len = rendered ? strlen(rendered) : 0;
    }
    int64_t n_ids = 0;
    if (st == CAPRL_OK) {
        st = caprl_tokenizer_encode(tok, text, text_len, true, NULL, 0, &n_ids, err);
    }
    if (st == CAPRL_OK && n_ids == 0) {
        st = tool_set_error(err, CAPRL_ERR_INVALID_ARG, "the prompt is empty");
    }
    if (st == CAPRL_OK) {
        ids = tool_xmalloc((size_t)n_ids * sizeof *ids);
        st = caprl_tokenizer_encode(tok, text, text_len, true, ids, n_ids, &n_ids, err);
    }
    const int32_t n = gp->n_samples;
    if (st == CAPRL_OK) {
        caprl_context_params cp = caprl_context_default_params();
        cp.n_seq_max = n;
        cp.n_ctx = (int32_t)(n_ids + gp->max_new_tokens);
        cp.n_batch_max = (int32_t)(n_ids < 512 ? (n_ids > n ? n_ids : n) : 512);
        if (cp.n_batch_max < n) {
            cp.n_batch_max = n;
        }
        cp.n_logits_max = n;
        st = caprl_context_init(&ctx, model, &cp, err);
    }
    if (st == CAPRL_OK) {
        const int32_t *prompts[1] = {ids};
        st = caprl_generate(ctx, prompts, &n_ids, 1, NULL, gp, on_token, ss, finish, NULL, err);
    }
    caprl_context_free(ctx);
    free(ids);
    caprl_free(rendered);
    return st;
}

/* The image path (a Qwen2.5-VL model): the image and the prompt in one user turn of the Qwen2.5-VL chat template,
 * through the vision tower and caprl_vl_generate. */
static caprl_status run_vl(caprl_model *model, const char *model_dir, const char *image_path, int32_t alpha,
                           const char *text, const char *system, int32_t threads, const caprl_generate_params *gp,
                           stream_state *ss, int32_t *finish, caprl_error *err) {
    caprl_image             img;
    caprl_vision           *vision = NULL;
    caprl_context          *ctx = NULL;
    caprl_preprocess_config pp;
    caprl_status st = tool_load_vl_image(model_dir, image_path, alpha, threads, &img, &vision, &pp, err);
    if (st == CAPRL_OK) {
        caprl_vl_request req = {&img, text, system, 0};
        st = caprl_vl_generate(model, vision, &pp, &req, 1, gp, &ctx, on_token, ss, finish, NULL, err);
    }
    caprl_context_free(ctx);
    caprl_vision_free(vision);
    caprl_image_free(&img);
    return st;
}

/* The option parser keeps the last value of a repeated option; a second image must not be dropped silently. */
static int count_image_options(int argc, char **argv) {
    int n = 0;
    for (int i = 1; i < argc; i++) {
        n += strcmp(argv[i], "--image") == 0 || strncmp(argv[i], "--image=", 8) == 0;
    }
    return n;
}

int cmd_generate(int argc, char **argv) {
    static const cmd_info info = {
        "generate",
        "caprl generate --model DIR (--prompt TEXT | --prompt-file F) [--image PATH] [--chat] [-n N] [options]",
        "Sample continuations of a prompt with a Qwen2 / Qwen2.5 checkpoint, or describe an image with a Qwen2.5-VL\n"
        "checkpoint, and stream the text to stdout.",
        "Sampling settings default to the model's generation_config.json (Hugging Face defaults where it is\n"
        "silent); flags override them. --temperature 0 or --greedy picks the most likely token (after the\n"
        "repetition penalty). Sample k of N uses its own random stream, so results do not depend on --threads.\n"
        "With -n > 1 each sample is printed when all are done, under a '--- sample k (reason) ---' line.\n"
        "With --image (one image; needs a Qwen2.5-VL checkpoint) the image and the prompt form one user turn of the\n"
        "Qwen2.5-VL chat template, whose system prompt \"" CAPRL_QWEN25VL_DEFAULT_SYSTEM "\" --system replaces\n"
        "(\"\" for none); DIR/preprocessor_config.json sets the image processor (Qwen2.5-VL defaults without it)."};
    const char    *model_dir = NULL, *prompt = NULL, *prompt_file = NULL, *system_prompt = NULL;
    const char    *image_path = NULL, *alpha_name = "white";
    bool           chat = false;
    int32_t        threads = 0;
    sampling_flags f = {.n = 1, .top_k = -1, .max_new = -1, .temperature = -1.0f, .top_p = -1.0f, .rep = -1.0f};
    opt_spec       specs[] = {
        {"model", OPT_STRING, &model_dir, "checkpoint directory (config.json, *.safetensors, tokenizer.json)",
         0, 0, "DIR", 0},
        {"prompt", OPT_STRING, &prompt, "prompt text", 0, 0, "TEXT", 0},
        {"prompt-file", OPT_STRING, &prompt_file, "read the prompt from a file", 0, 0, "F", 0},
        {"image", OPT_STRING, &image_path, "PNG, JPEG or WebP image the prompt is about (Qwen2.5-VL checkpoints)",
         0, 0, "PATH", 0},
        {"alpha", OPT_STRING, &alpha_name, "transparent images: white (qwen-vl-utils) or drop (HF processor)",
         0, 0, "white|drop", 0},
        {"chat", OPT_FLAG, &chat, "wrap the prompt in the Qwen2.5 chat template as a user turn", 0, 0, NULL, 0},
        {"system", OPT_STRING, &system_prompt, "system prompt for --chat or --image (default: the model family's)",
         0, 0, "TEXT", 0},
        {"samples", OPT_INT, &f.n, "samples per prompt", 1, 4096, "N", 'n'},
        {"temperature", OPT_FLOAT, &f.temperature, "sampling temperature, 0 = greedy (default: model's)",
         0, 100, "T", 0},
        {"top-p", OPT_FLOAT, &f.top_p, "nucleus sampling mass in (0, 1] (default: model's)", 0, 1, "P", 0},
        {"top-k", OPT_INT, &f.top_k, "keep the k most likely tokens, 0 = off (default: model's)", 0, 1 << 30, "K", 0},
        {"repetition-penalty", OPT_FLOAT, &f.rep, "penalty > 0 on tokens already present (default: model's)",
         0, 100, "R", 0},
        {"max-new-tokens", OPT_INT, &f.max_new, "tokens to generate per sample (default: model's, else 256)",
         1, 1 << 24, "M", 0},
        {"greedy", OPT_FLAG, &f.greedy, "always pick the most likely token", 0, 0, NULL, 0},
        {"seed", OPT_I64, &f.seed, "random seed", 0, 9.2e18, "S", 0},
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
    if (system_prompt && !chat && !image_path) {
        return tool_usage_error(info.name, "--system needs --chat or --image");
    }
    if (count_image_options(argc, argv) > 1) {
        return tool_usage_error(info.name, "--image given more than once: one image per prompt");
    }
    int32_t alpha = CAPRL_ALPHA_WHITE;
    int     alpha_rc = tool_parse_alpha(info.name, alpha_name, &alpha);
    if (alpha_rc) {
        return alpha_rc;
    }
    if (f.top_p == 0.0f) {
        return tool_usage_error(info.name, "--top-p must be in (0, 1]");
    }
    if (f.rep == 0.0f) {
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
    if (image_path && !caprl_model_config(model)->is_vl) {
        fprintf(stderr, "caprl generate: error: %s is a text-only checkpoint: --image needs a Qwen2.5-VL one "
                        "(model_type qwen2_5_vl)\n",
                model_dir);
        caprl_model_free(model);
        free(file_text);
        return EXIT_DATA;
    }
    const caprl_tokenizer *tok = caprl_model_tokenizer(model);
    if (!tok) {
        fprintf(stderr, "caprl generate: error: %s has no tokenizer.json\n", model_dir);
        caprl_model_free(model);
        free(file_text);
        return EXIT_DATA;
    }
    const char           *text = prompt ? prompt : file_text;
    size_t                text_len = prompt ? strlen(prompt) : file_len;
    caprl_generate_params gp = sampling_params(model, &f);
    caprl_error           err = {0};
    caprl_status          st = caprl_sampling_params_check(&gp.sampling, &err);
    stream_state          ss = {0};
    int32_t              *finish = tool_xcalloc((size_t)f.n, sizeof(int32_t));
    if (st == CAPRL_OK) {
        stream_init(&ss, tok, f.n, gp.max_new_tokens);
        st = image_path ? run_vl(model, model_dir, image_path, alpha, text, system_prompt, threads, &gp, &ss, finish,
                                 &err)
                        : run_text(model, text, text_len, chat, system_prompt, &gp, &ss, finish, &err);
    }
    if (st == CAPRL_OK) {
        print_samples(&ss, finish);
    }
    stream_free(&ss);
    free(finish);
    free(file_text);
    caprl_model_free(model);
    return st == CAPRL_OK ? EXIT_OK : tool_fail(info.name, st, err.msg);
}
