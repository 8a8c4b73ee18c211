/* caprl qa generate: a Qwen2.5-VL checkpoint writes five multiple-choice questions per image with the CapRL
 * QA-generation prompt (spec/caprl.md §7.2), into resumable, shardable JSON Lines that `caprl qa parse` reads. */
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
#include "common.h"
#include "opts.h"
#include "subcommands.h"

#define CMD "qa generate"

/* The system prompt of the released gen_qa.py (P-App.E Fig. 18), byte for byte: its spelling mistakes, the three
 * spaces after "D) Ours", the one after "B) Red" and the final newline are part of it (722 bytes, SHA-256
 * 4e275e96...8fcf, checked by tests/tools/test_qa_generate.c). */
static const char k_system[] =
    "Your task is to generate five multiple-choice questions and their answers about the object based on the "
    "provided image.\n"
    "The questions should be challenge and focus on the image content, you answer should strictly follow the "
    "following format:\n"
    "#### 1. **Which method achieves the highest accuracy (Acc) on the FF++ (HQ) dataset?**\n"
    "   - A) Method \"a\"\n"
    "   - B) Method \"b\"\n"
    "   - C) Method \"c\"\n"
    "   - D) Ours\n"
    "\n"
    "**Answer:** D) Ours   \n"
    "------\n"
    "#### 2. **What is the primary color of the kayak in the image?**\n"
    "   - A) Blue\n"
    "   - B) Red\n"
    "   - C) Black\n"
    "   - D) White\n"
    "\n"
    "**Answer:** B) Red \n"
    "------\n"
    "You should strictly follow the above format and should not generate irrelevant sentences. All the quesiton "
    "should be answered based on the image.\n";

/* The user message: the image first, then this text (gen_qa.py). */
static const char k_user_text[] = "Here is the image";

/* Fields this command writes; a list record's own copies are dropped so that an error record never carries a stale
 * response. */
static const char *const k_output_fields[] = {"response", "tokens", "finish", "error", NULL};

static int collect_done(json_t *rec, const char *path, long line, void *ud) {
    (void)path;
    (void)line;
    tool_keyset_add(ud, json_string_value(json_object_get(rec, "image")));
    return 0;
}

/* The "image" written for an item. `caprl qa parse` copies it and the QA loaders resolve a relative path against the
 * folder of the file holding it, so a relative path is kept as written when the output sits in the list's folder and
 * made absolute otherwise. It is also the resume key: the same list and output give the same strings. */
static char *output_image(const tool_image_item *it, bool same_dir) {
    return it->image[0] == '/' || same_dir ? tool_xstrdup(it->image) : tool_absolute(it->path);
}

/* {"id", "image", the list record's other fields...}: "id" is the list's own "id" when it has one, else the image
 * as written in the list, so every record of the file has one for `caprl qa parse`. */
static json_t *base_record(const tool_vl_job *job, const tool_image_item *it) {
    char *const *keys = job->user; /* (list size) the "image" written for each list item */
    json_t      *rec = json_object();
    json_object_set_new(rec, "id", json_string(it->image));
    json_object_set_new(rec, "image", json_string(keys[it->index]));
    if (it->extra) {
        json_object_update(rec, it->extra);
    }
    return rec;
}

static int add_response(tool_vl_job *job, json_t *rec, const tool_samples *s, int32_t first, const int32_t *finish) {
    int32_t     n_text = s->n[first] - (finish[first] == CAPRL_FINISH_EOS ? 1 : 0);
    size_t      len = 0;
    caprl_error err = {0};
    if (tool_decode_text(caprl_model_tokenizer(job->model), s->tokens[first], n_text, &job->text, &job->text_cap, &len,
                         &err) != CAPRL_OK) {
        return tool_fail(job->cmd, err.code, err.msg);
    }
    json_object_set_new(rec, "response", json_stringn(job->text, len));
    json_object_set_new(rec, "tokens", json_integer(n_text));
    json_object_set_new(rec, "finish", json_string(tool_finish_name(finish[first])));
    return 0;
}

int cmd_qa_generate(int argc, char **argv) {
    static const cmd_info info = {
        CMD,
        "caprl qa generate --vlm DIR --images LIST --out raw.jsonl [--batch B] [--shard i/k] [--seed S]",
        "Ask a Qwen2.5-VL checkpoint for five multiple-choice questions per image (the CapRL QA-generation prompt);\n"
        "one JSON line per image with the raw response, appended and flushed as it finishes.",
        "The request is the released gen_qa.py's: the CapRL system prompt (--print-prompt shows it), then a user turn\n"
        "with the image and \"Here is the image\"; temperature 0.1, top-p 1, repetition penalty 1.05, at most 2048\n"
        "new tokens. LIST is a directory (its .jpg/.jpeg/.png/.webp files, sorted), a text file of paths, JSON\n"
        "Lines with an \"image\" field (other fields are copied to the output) or a JSON array of paths; relative\n"
        "paths are relative to LIST's folder. Output: {\"id\", \"image\", \"response\", \"tokens\", \"finish\"}, or\n"
        "{\"id\", \"image\", \"error\"} for an image that could not be read; \"id\" is the list record's own id, else\n"
        "the image as listed; \"image\" is the listed path when the output sits in LIST's folder, else absolute, so\n"
        "that later stages find it. `caprl qa parse` turns the responses into QA records. Rerunning the same\n"
        "command resumes:\n"
        "images already in the output are skipped and a torn last line from a killed run is removed; a second\n"
        "process on the same output is refused. --shard i/k takes every k-th image starting at i. Image i (its\n"
        "position in LIST) samples with random stream i: results do not depend on batching, sharding or resuming."};
    const char *vlm_dir = NULL, *list = NULL, *out_path = NULL, *shard = NULL, *alpha = "white";
    int32_t     batch = 1, max_new = 2048, threads = 0;
    float       temperature = 0.1f, top_p = 1.0f, rep = 1.05f;
    int64_t     seed = 0, max_image_pixels = caprl_image_decode_default_params().max_pixels;
    bool        print_prompt = false;
    opt_spec    specs[] = {
        {"vlm", OPT_STRING, &vlm_dir, "Qwen2.5-VL checkpoint directory (the question writer)", 0, 0, "DIR", 0},
        {"images", OPT_STRING, &list, "directory, text file of paths, JSONL with \"image\", or JSON array", 0, 0, "LIST",
         0},
        {"out", OPT_STRING, &out_path, "output JSON Lines (appended; resumed when it exists)", 0, 0, "FILE", 0},
        {"temperature", OPT_FLOAT, &temperature, "sampling temperature (0 = greedy)", 0, 100, "T", 0},
        {"top-p", OPT_FLOAT, &top_p, "nucleus mass in (0, 1]", 1e-6, 1, "P", 0},
        {"repetition-penalty", OPT_FLOAT, &rep, "repetition penalty (1 = off)", 1e-6, 100, "R", 0},
        {"max-new-tokens", OPT_INT, &max_new, "response length limit in tokens", 1, 1 << 20, "M", 0},
        {"batch", OPT_INT, &batch, "images per batched generation", 1, 4096, "B", 0},
        {"shard", OPT_STRING, &shard, "process images i, i+k, i+2k, ... of the list", 0, 0, "i/k", 0},
        {"max-image-pixels", OPT_I64, &max_image_pixels,
         "refuse (and record as an error) images with more pixels than this, before decoding them", 1, 4e18, "N", 0},
        {"alpha", OPT_STRING, &alpha, "transparent images: white (qwen-vl-utils) or drop (HF processor)", 0, 0,
         "white|drop", 0},
        {"seed", OPT_I64, &seed, "random seed", 0, 9.2e18, "S", 0},
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {"print-prompt", OPT_FLAG, &print_prompt, "print the rendered prompt (ChatML, one <|image_pad|>) and exit", 0,
         0, NULL, 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (print_prompt) { /* the model's whole input text, the image as its single <|image_pad|> */
        char        *text = NULL;
        caprl_error  perr = {0};
        caprl_status pst = caprl_vl_render_prompt(k_user_text, 1, k_system, &text, &perr);
        if (pst != CAPRL_OK) {
            return tool_fail(info.name, pst, perr.msg);
        }
        fputs(text, stdout);
        caprl_free(text);
        return EXIT_OK;
    }
    if (!vlm_dir || !list || !out_path) {
        return tool_usage_error(info.name, "--vlm, --images and --out are required");
    }
    long shard_i = 0, shard_k = 1;
    if (shard && !tool_parse_shard(shard, &shard_i, &shard_k)) {
        return tool_usage_error(info.name, "--shard expects i/k with 0 <= i < k, got '%s'", shard);
    }
    tool_vl_job r;
    memset(&r, 0, sizeof r);
    r.cmd = CMD;
    r.dp = caprl_image_decode_default_params();
    r.dp.max_pixels = max_image_pixels;
    rc = tool_parse_alpha(info.name, alpha, &r.dp.alpha);
    if (rc) {
        return rc;
    }
    tool_image_list items = {0};
    rc = tool_image_list_load(info.name, list, k_output_fields, &items);
    /* opened and locked before it is read (see caprl caption) */
    int out_fd = -1;
    if (rc == 0) {
        rc = tool_jsonl_open_locked(info.name, out_path, &out_fd);
    }
    char **keys = NULL;
    if (rc == 0) {
        char *list_dir = tool_folder_of(list), *out_dir = tool_folder_of(out_path);
        bool  same_dir = list_dir && out_dir && strcmp(list_dir, out_dir) == 0;
        free(list_dir);
        free(out_dir);
        keys = tool_xcalloc((size_t)items.n, sizeof(char *));
        for (int64_t i = 0; i < items.n; i++) {
            keys[i] = output_image(&items.items[i], same_dir);
        }
    }
    tool_keyset done = {0};
    if (rc == 0) {
        rc = tool_jsonl_scan(info.name, out_path, out_fd, "image", JSON_STRING, "qa generate record", collect_done,
                             &done);
    }
    tool_image_item **todo = NULL;
    int64_t           n_todo = 0;
    if (rc == 0) {
        tool_pending_images(CMD, &items, keys, &done, shard != NULL, shard_i, shard_k, out_path, "do", &todo,
                            &n_todo);
    }
    if (rc == 0 && n_todo > 0) {
        rc = tool_load_vlm(info.name, "checkpoint", vlm_dir, threads, tool_resize_variant(r.dp.alpha), &r.model,
                           &r.vision, &r.pp);
    }
    if (rc == 0 && n_todo > 0) {
        r.out = fdopen(out_fd, "ab");
        if (!r.out) {
            fprintf(stderr, "caprl %s: error: %s: cannot open for appending: %s\n", CMD, out_path, strerror(errno));
            rc = EXIT_DATA;
        } else {
            out_fd = -1; /* now closed with r.out */
        }
    }
    if (rc == 0 && n_todo > 0) {
        r.prompt = k_user_text;
        r.system = k_system;
        r.batch = batch;
        r.base_record = base_record;
        r.add_outputs = add_response;
        r.user = keys;
        r.gp = caprl_generate_default_params();
        r.gp.n_samples = 1;
        r.gp.max_new_tokens = max_new;
        r.gp.sampling.do_sample = temperature > 0.0f;
        r.gp.sampling.temperature = temperature > 0.0f ? temperature : 1.0f;
        r.gp.sampling.top_p = top_p;
        r.gp.sampling.repetition_penalty = rep;
        r.gp.sampling.seed = (uint64_t)seed;
        rc = tool_vl_job_run(&r, todo, n_todo);
    }
    if (r.out && fclose(r.out) != 0 && rc == 0) {
        fprintf(stderr, "caprl %s: error: %s: close failed: %s\n", CMD, out_path, strerror(errno));
        rc = EXIT_DATA;
    }
    if (out_fd >= 0) {
        close(out_fd);
    }
    tool_vl_job_free(&r);
    tool_keyset_free(&done);
    for (int64_t i = 0; keys && i < items.n; i++) {
        free(keys[i]);
    }
    free(keys);
    free(todo);
    tool_image_list_free(&items);
    return rc;
}
