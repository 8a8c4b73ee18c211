/* caprl caption: caption a list of images with a Qwen2.5-VL checkpoint into JSON Lines, resumably. */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/image.h"
#include "caprl/model.h"
#include "caprl/tokenizer.h"
#include "caprl/vision.h"
#include "caprl/vlm.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

typedef tool_image_item item;

/* Fields of the output record; a list record's own copies (e.g. a previous run's output fed back as the list)
 * are dropped so that an error record never carries stale captions. */
static const char *const k_output_fields[] = {"captions", "tokens", "finish", "error", NULL};

/* Resume: the images already in the output. */
static int collect_done(json_t *rec, const char *path, long line, void *ud) {
    (void)path;
    (void)line;
    tool_keyset_add(ud, json_string_value(json_object_get(rec, "image")));
    return 0;
}

/* ---- output records ---------------------------------------------------------------------------------------- */

static json_t *base_record(const tool_vl_job *job, const item *it) {
    (void)job;
    json_t *rec = json_object();
    json_object_set_new(rec, "image", json_string(it->image)); /* first, then the list's own fields */
    if (it->extra) {
        json_object_update(rec, it->extra);
    }
    return rec;
}

static int add_captions(tool_vl_job *job, json_t *rec, const tool_samples *s, int32_t first, const int32_t *finish) {
    return tool_samples_to_json(job->cmd, rec, "captions", caprl_model_tokenizer(job->model), s, first,
                                job->gp.n_samples, finish, &job->text, &job->text_cap);
}

/* The prompt is the same for every image: a bad one (invalid UTF-8) must stop the run, not become an error
 * record for each image. */
static int check_prompt(const caprl_model *model, const char *prompt, const char *system) {
    const caprl_tokenizer *tok = caprl_model_tokenizer(model);
    caprl_error  err = {0};
    char        *text = NULL;
    int64_t      n = 0;
    caprl_status st = caprl_vl_render_prompt(prompt, 1, system, &text, &err);
    if (st == CAPRL_OK) {
        st = caprl_tokenizer_encode(tok, text, strlen(text), true, NULL, 0, &n, &err);
    }
    caprl_free(text);
    if (st != CAPRL_OK) {
        fprintf(stderr, "caprl caption: error: --prompt / --system: %s\n", err.msg);
        return EXIT_USAGE;
    }
    return 0;
}

int cmd_caption(int argc, char **argv) {
    static const cmd_info info = {
        "caption",
        "caprl caption --model DIR --images LIST --out captions.jsonl [--prompt TEXT] [-n N] [--batch B] [--shard i/k]",
        "Caption images with a Qwen2.5-VL checkpoint; one JSON line per image, appended and flushed as it finishes.",
        "LIST is a directory (its .jpg/.jpeg/.png/.webp files, sorted), a text file of paths, JSON Lines with an\n"
        "\"image\" field (other fields are copied to the output) or a JSON array of paths; relative paths are\n"
        "relative to LIST's folder.\n"
        "Output: {\"image\", \"captions\": [...], \"tokens\": [...], \"finish\": [...], ...} or\n"
        "{\"image\", \"error\"} for an image that could not be read. Rerunning the same command resumes: images\n"
        "already in the output (error records included: delete those lines to retry them) are skipped and a torn\n"
        "last line from a killed run is removed; a second process on the same output is refused. --shard i/k takes\n"
        "every k-th image starting at i, so k processes can split one list. Sample k of image i (its position in\n"
        "LIST) uses random stream i*n+k: results do not depend on batching, sharding or resuming. --alpha white is\n"
        "pipeline B (qwen-vl-utils, then the processor), drop is pipeline A (the Hugging Face processor alone), as in\n"
        "caprl preprocess."};
    const char *model_dir = NULL, *list = NULL, *out_path = NULL, *shard = NULL, *alpha = "white";
    const char *prompt = "Please describe this image in detail.", *system = NULL;
    int32_t     n = 4, batch = 1, max_new = 2048, threads = 0, top_k = 0;
    float       temperature = 1.0f, top_p = 1.0f, rep = 1.0f;
    int64_t     seed = 0, max_image_pixels = caprl_image_decode_default_params().max_pixels;
    opt_spec    specs[] = {
        {"model", OPT_STRING, &model_dir, "Qwen2.5-VL checkpoint directory", 0, 0, "DIR", 0},
        {"images", OPT_STRING, &list, "directory, text file of paths, JSONL with \"image\", or JSON array", 0, 0, "LIST",
         0},
        {"out", OPT_STRING, &out_path, "output JSON Lines (appended; resumed when it exists)", 0, 0, "FILE", 0},
        {"prompt", OPT_STRING, &prompt, "instruction after the image", 0, 0, "TEXT", 0},
        {"system", OPT_STRING, &system, "system prompt (default: Qwen2.5-VL's; \"\" for none)", 0, 0, "TEXT", 0},
        {"samples", OPT_INT, &n, "captions per image", 1, 1024, "N", 'n'},
        {"temperature", OPT_FLOAT, &temperature, "sampling temperature (0 = greedy)", 0, 100, "T", 0},
        {"top-p", OPT_FLOAT, &top_p, "nucleus mass in (0, 1]", 1e-6, 1, "P", 0},
        {"top-k", OPT_INT, &top_k, "top-k (0 = off)", 0, 1 << 30, "K", 0},
        {"repetition-penalty", OPT_FLOAT, &rep, "repetition penalty (1 = off)", 1e-6, 100, "R", 0},
        {"max-new-tokens", OPT_INT, &max_new, "caption length limit in tokens", 1, 1 << 20, "M", 0},
        {"batch", OPT_INT, &batch, "images per batched generation", 1, 4096, "B", 0},
        {"shard", OPT_STRING, &shard, "process images i, i+k, i+2k, ... of the list", 0, 0, "i/k", 0},
        {"max-image-pixels", OPT_I64, &max_image_pixels,
         "refuse (and record as an error) images with more pixels than this, before decoding them", 1, 4e18, "N", 0},
        {"alpha", OPT_STRING, &alpha, "transparent images: white (qwen-vl-utils) or drop (HF processor)", 0, 0,
         "white|drop", 0},
        {"seed", OPT_I64, &seed, "random seed", 0, 9.2e18, "S", 0},
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!model_dir || !list || !out_path) {
        return tool_usage_error(info.name, "--model, --images and --out are required");
    }
    long shard_i = 0, shard_k = 1;
    if (shard && !tool_parse_shard(shard, &shard_i, &shard_k)) {
        return tool_usage_error(info.name, "--shard expects i/k with 0 <= i < k, got '%s'", shard);
    }
    tool_vl_job r;
    memset(&r, 0, sizeof r);
    r.cmd = info.name;
    r.dp = caprl_image_decode_default_params();
    r.dp.max_pixels = max_image_pixels;
    rc = tool_parse_alpha(info.name, alpha, &r.dp.alpha);
    if (rc) {
        return rc;
    }
    tool_image_list items = {0};
    rc = tool_image_list_load(info.name, list, k_output_fields, &items);
    /* The output is opened (created) and locked before it is read: a second process on the same file would
     * caption the same images again, and its truncation of a "torn" line could cut the first one's record. */
    int out_fd = -1;
    if (rc == 0) {
        rc = tool_jsonl_open_locked(info.name, out_path, &out_fd);
    }
    tool_keyset done = {0};
    if (rc == 0) {
        rc = tool_jsonl_scan(info.name, out_path, out_fd, "image", JSON_STRING, "caption record", collect_done,
                             &done);
    }
    tool_image_item **todo = NULL;
    int64_t           n_todo = 0;
    if (rc == 0) {
        tool_pending_images(info.name, &items, NULL, &done, shard != NULL, shard_i, shard_k, out_path, "caption", &todo,
                            &n_todo);
    }
    if (rc == 0 && n_todo > 0) {
        /* --alpha picks the whole pipeline, as in caprl preprocess */
        if ((rc = tool_load_vlm(info.name, "checkpoint", model_dir, threads, tool_resize_variant(r.dp.alpha),
                                &r.model, &r.vision, &r.pp)) == 0) {
            rc = check_prompt(r.model, prompt, system);
        }
    }
    if (rc == 0 && n_todo > 0) {
        r.out = fdopen(out_fd, "ab");
        if (!r.out) {
            fprintf(stderr, "caprl caption: error: %s: cannot open for appending: %s\n", out_path, strerror(errno));
            rc = EXIT_DATA;
        } else {
            out_fd = -1; /* now closed with r.out */
        }
    }
    if (rc == 0 && n_todo > 0) {
        r.prompt = prompt;
        r.system = system;
        r.batch = batch;
        r.base_record = base_record;
        r.add_outputs = add_captions;
        r.gp = caprl_generate_default_params();
        r.gp.n_samples = n;
        r.gp.max_new_tokens = max_new;
        r.gp.sampling.do_sample = temperature > 0.0f;
        r.gp.sampling.temperature = temperature > 0.0f ? temperature : 1.0f;
        r.gp.sampling.top_p = top_p;
        r.gp.sampling.top_k = top_k;
        r.gp.sampling.repetition_penalty = rep;
        r.gp.sampling.seed = (uint64_t)seed;
        rc = tool_vl_job_run(&r, todo, n_todo);
    }
    if (r.out && fclose(r.out) != 0 && rc == 0) {
        fprintf(stderr, "caprl caption: error: %s: close failed: %s\n", out_path, strerror(errno));
        rc = EXIT_DATA;
    }
    if (out_fd >= 0) {
        close(out_fd);
    }
    tool_vl_job_free(&r);
    tool_keyset_free(&done);
    free(todo);
    tool_image_list_free(&items);
    return rc;
}
