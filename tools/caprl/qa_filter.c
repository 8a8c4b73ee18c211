/* caprl qa filter: the visual-dependency filter of CapRL's QA curation (spec/caprl.md §7.4-§7.5, §14 pitfall 6).
 * Every question is asked R times with shuffled options, once with the image (plus "E) None of the above") and once
 * without it, by a Qwen2.5-VL checkpoint; a question stays iff it is answered with the image more often than
 * --keep-visual and without it less often than --drop-text. */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "caprl/image.h"
#include "caprl/model.h"
#include "caprl/qa.h"
#include "caprl/reward.h"
#include "caprl/tokenizer.h"
#include "caprl/vision.h"
#include "caprl/vlm.h"
#include "common.h"
#include "opts.h"
#include "subcommands.h"

#define CMD "qa filter"

/* answer_with_without_image.py: the question (options shuffled) in this template; the with-image query also lists
 * this extra option after the real ones. */
#define TEMPLATE_TAIL ". Answer the question with only the correct letter"
#define NONE_OPTION   "\n   - E) None of the above"
/* caprl_present_question appends the reward's "cannot answer" line; the filter's rotation has none (§7.4 step 1) */
#define CANNOT_F      "\n   - F) " CAPRL_CANNOT_ANSWER

/* Why a question was dropped (the report's names). */
enum { KEPT = 0, DROP_TEXT, DROP_VISUAL, DROP_BOTH, DROP_IMAGE, DROP_BAD, N_DECISIONS };
static const char *const k_decision[N_DECISIONS] = {"kept", "answerable_without_image", "not_answered_with_image",
                                                    "both", "image_error", "bad_question"};

/* One question: its R rotations, each asked with and without the image. */
typedef struct question {
    int64_t image;     /* index into the QA set's images */
    int32_t qa;        /* index into that image's questions */
    int64_t global;    /* position among all questions of the file (random streams) */
    char   *golds;     /* (R) gold letter of each rotation */
    char  **texts;     /* (R) the rotated question string */
    bool   *ok;        /* (2R) correct with the image (r), without it (R + r) */
    char  **outputs;   /* (2R) the model's decoded outputs */
    int32_t decision;
} question;

/* One generation request: rotation r of question q, with (mode 0) or without (mode 1) the image. */
typedef struct query {
    question *q;
    int32_t   r, mode;
    int32_t   image_slot; /* the image's position in the group's feature block (mode 0) */
} query;

typedef struct run_ctx {
    caprl_model              *model;
    caprl_vision             *vision;
    caprl_preprocess_config   pp;
    caprl_image_decode_params dp;
    caprl_generate_params     gp;
    caprl_context            *ctx;
    int32_t                   ctx_seq;   /* what ctx was made for */
    int64_t                   ctx_len;
    int32_t                   rotations, batch;
    uint64_t                  seed;
    /* per chunk */
    int32_t                 **tokens;
    int32_t                  *n_tok;
    char                     *text;
    size_t                    text_cap;
} run_ctx;

static bool collect_token(int32_t prompt, int32_t sample, int32_t token, void *ud) {
    (void)sample;
    run_ctx *r = ud;
    if (r->n_tok[prompt] < r->gp.max_new_tokens) {
        r->tokens[prompt][r->n_tok[prompt]++] = token;
    }
    return true;
}

/* The context, (re)made when too small for n_seq sequences of n_ctx tokens (never shrunk). */
/* The decoded output (special tokens skipped) into r->text. */
static caprl_status output_text(run_ctx *r, const int32_t *ids, int32_t n, caprl_error *err) {
    size_t len = 0;
    return tool_decode_text(caprl_model_tokenizer(r->model), ids, n, &r->text, &r->text_cap, &len, err);
}

/* The tokens of one query's prompt: the Qwen2.5-VL chat template with its default system turn (the released script
 * sends chat messages to a vLLM server), the user turn holding the image (mode 0) and the text. */
static caprl_status query_tokens(run_ctx *r, const query *qy, int32_t **ids, int64_t *n, caprl_error *err) {
    const char *qtext = qy->q->texts[qy->r];
    size_t      cap = strlen(qtext) + sizeof NONE_OPTION + sizeof TEMPLATE_TAIL;
    char       *user = tool_xmalloc(cap);
    snprintf(user, cap, "%s%s%s", qtext, qy->mode == 0 ? NONE_OPTION : "", TEMPLATE_TAIL);
    caprl_status st;
    if (qy->mode == 0) {
        st = caprl_vl_prompt_tokens(caprl_model_tokenizer(r->model), user, NULL, ids, n, err);
    } else {
        char *text = NULL;
        st = caprl_vl_render_prompt(user, 0, NULL, &text, err);
        const caprl_tokenizer *tok = caprl_model_tokenizer(r->model);
        if (st == CAPRL_OK) {
            st = caprl_tokenizer_encode(tok, text, strlen(text), true, NULL, 0, n, err);
        }
        if (st == CAPRL_OK) {
            *ids = tool_xmalloc((size_t)(*n) * sizeof(int32_t));
            st = caprl_tokenizer_encode(tok, text, strlen(text), true, *ids, *n, n, err);
        }
        caprl_free(text);
    }
    free(user);
    return st;
}

/* Runs queries [0, n) of one image group (features: the group's images encoded together; grids, first rows) and
 * records each answer. */
static caprl_status run_chunk(run_ctx *r, const query *qs, int32_t n, const float *features, int32_t n_feat_rows,
                              const int32_t *grids, const int64_t *first_rows, caprl_error *err) {
    const caprl_text_config   *tc = caprl_model_config(r->model);
    const caprl_vision_config *vc = caprl_vision_get_config(r->vision);
    caprl_vl_prompt           *vp = tool_xcalloc((size_t)n, sizeof *vp);
    caprl_prompt_vision       *vis = tool_xcalloc((size_t)n, sizeof *vis);
    const int32_t            **ids = tool_xcalloc((size_t)n, sizeof *ids);
    int32_t                  **text_ids = tool_xcalloc((size_t)n, sizeof *text_ids);
    int64_t                   *lens = tool_xcalloc((size_t)n, sizeof *lens);
    uint64_t                  *streams = tool_xcalloc((size_t)n, sizeof *streams);
    int32_t                   *finish = tool_xcalloc((size_t)n, sizeof *finish);
    caprl_status               st = CAPRL_OK;
    int64_t                    longest = 0;
    for (int32_t i = 0; i < n && st == CAPRL_OK; i++) {
        const query *qy = &qs[i];
        int32_t     *raw = NULL;
        int64_t      n_raw = 0;
        st = query_tokens(r, qy, &raw, &n_raw, err);
        if (st == CAPRL_OK && qy->mode == 0) {
            st = caprl_vl_prompt_init(&vp[i], raw, n_raw, tc->image_token_id, &grids[3 * qy->image_slot], 1,
                                      vc->spatial_merge_size, first_rows[qy->image_slot], err);
            free(raw);
            ids[i] = vp[i].ids;
            lens[i] = vp[i].n;
            vis[i].embd = features;
            vis[i].n_embd = n_feat_rows;
            vis[i].embd_row = vp[i].embd_row;
            vis[i].mrope_pos = vp[i].mrope_pos;
            vis[i].rope_delta = vp[i].rope_delta;
        } else if (st == CAPRL_OK) {
            text_ids[i] = raw; /* text only: ordinary positions, no rows (a zeroed vision entry) */
            ids[i] = raw;
            lens[i] = n_raw;
        }
        /* independent of batching: one stream per (question, rotation, mode) */
        streams[i] = ((uint64_t)qy->q->global * (uint64_t)r->rotations + (uint64_t)qy->r) * 2u + (uint64_t)qy->mode;
        longest = lens[i] > longest ? lens[i] : longest;
        r->n_tok[i] = 0;
    }
    if (st == CAPRL_OK) {
        st = tool_ensure_context(&r->ctx, &r->ctx_seq, &r->ctx_len, r->model, n, longest + r->gp.max_new_tokens, err);
    }
    if (st == CAPRL_OK) {
        caprl_generate_params g = r->gp;
        g.prompt_streams = streams;
        st = caprl_generate(r->ctx, ids, lens, n, vis, &g, collect_token, r, finish, NULL, err);
    }
    for (int32_t i = 0; i < n && st == CAPRL_OK; i++) {
        const query *qy = &qs[i];
        int32_t      n_text = r->n_tok[i] - (finish[i] == CAPRL_FINISH_EOS ? 1 : 0);
        st = output_text(r, r->tokens[i], n_text, err);
        if (st == CAPRL_OK) {
            int32_t slot = qy->mode * r->rotations + qy->r;
            /* the released check: `ans in out`, the gold letter as a substring of the output */
            qy->q->ok[slot] = strchr(r->text, qy->q->golds[qy->r]) != NULL;
            qy->q->outputs[slot] = tool_xstrdup(r->text);
        }
    }
    for (int32_t i = 0; i < n; i++) {
        caprl_vl_prompt_free(&vp[i]);
        free(text_ids[i]);
    }
    free(vp);
    free(vis);
    free(ids);
    free(text_ids);
    free(lens);
    free(streams);
    free(finish);
    return st;
}

/* A group of images whose queries run together: one vision-tower call for all of them. */
static caprl_status run_group(run_ctx *r, caprl_image *imgs, int32_t n_imgs, const query *qs, int64_t n_q,
                              caprl_error *err) {
    const caprl_image **ptrs = tool_xcalloc((size_t)n_imgs, sizeof *ptrs);
    int32_t            *grids = tool_xcalloc((size_t)n_imgs * 3, sizeof *grids);
    int64_t            *n_tok = tool_xcalloc((size_t)n_imgs, sizeof *n_tok);
    int64_t            *first = tool_xcalloc((size_t)n_imgs, sizeof *first);
    float              *features = NULL;
    for (int32_t i = 0; i < n_imgs; i++) {
        ptrs[i] = &imgs[i];
    }
    caprl_status st = caprl_vl_encode_images(r->vision, &r->pp, ptrs, n_imgs, &features, grids, n_tok, err);
    int64_t      rows = 0;
    for (int32_t i = 0; i < n_imgs; i++) {
        first[i] = rows;
        rows += n_tok[i];
    }
    if (st == CAPRL_OK && rows > INT32_MAX) {
        st = tool_set_error(err, CAPRL_ERR_INVALID_ARG, "too many image tokens in one group (%lld)", (long long)rows);
    }
    for (int64_t s = 0; s < n_q && st == CAPRL_OK; s += r->batch) {
        int32_t n = (int32_t)(n_q - s < r->batch ? n_q - s : r->batch);
        st = run_chunk(r, qs + s, n, features, (int32_t)rows, grids, first, err);
    }
    caprl_free(features);
    free(ptrs);
    free(grids);
    free(n_tok);
    free(first);
    return st;
}

/* Rotation r of a question: options shuffled and relabelled as the released shuffle_options does, "cannot answer"
 * lines removed and none appended. */
static caprl_status rotate(const caprl_qa_item *it, uint64_t seed, int64_t global, int32_t rot, char **out,
                           char *gold, caprl_error *err) {
    char        *text = NULL;
    caprl_status st = caprl_present_question(it->question, it->gold, true, seed, (uint64_t)global, (uint64_t)rot,
                                             &text, gold, NULL, err);
    if (st != CAPRL_OK) {
        return st;
    }
    size_t n = strlen(text), k = strlen(CANNOT_F);
    if (n >= k && strcmp(text + n - k, CANNOT_F) == 0) {
        text[n - k] = '\0';
    }
    *out = tool_xstrdup(text);
    caprl_free(text);
    return CAPRL_OK;
}

/* The image path to write: relative paths of the QA file are relative to its folder, so they are kept when the
 * output lives in the same folder and made absolute otherwise. */
static json_t *image_path_json(const caprl_qa_image *im, bool same_dir) {
    if (im->image_raw[0] == '/' || same_dir) {
        return json_string(im->image_raw);
    }
    char   *abs = tool_absolute(im->image);
    json_t *j = json_string(abs);
    free(abs);
    return j;
}

static json_t *bool_array(const bool *v, int32_t n) {
    json_t *a = json_array();
    for (int32_t i = 0; i < n; i++) {
        json_array_append_new(a, json_boolean(v[i]));
    }
    return a;
}

static json_t *string_array(char *const *v, int32_t n) {
    json_t *a = json_array();
    for (int32_t i = 0; i < n; i++) {
        json_array_append_new(a, json_string(v[i] ? v[i] : ""));
    }
    return a;
}

static double acc(const bool *v, int32_t n) {
    int32_t c = 0;
    for (int32_t i = 0; i < n; i++) {
        c += v[i];
    }
    return (double)c / (double)n;
}

int cmd_qa_filter(int argc, char **argv) {
    static const cmd_info info = {
        CMD,
        "caprl qa filter --vlm DIR --qa qa.jsonl --out filtered.jsonl [--rotations 4] [--keep-visual 0.75]\n"
        "                [--drop-text 0.25] [--report FILE] [--seed S]",
        "Keep the questions that need the image: answered with it, not without it (CapRL's visual-dependency filter).",
        "Each question is asked --rotations times with its options shuffled (the reward's shuffle, \"cannot answer\"\n"
        "lines removed): with the image, listing one more option \"E) None of the above\", and without the image,\n"
        "each as \"{question}. Answer the question with only the correct letter\" in the model's chat template\n"
        "(default system turn); temperature 0.1, repetition penalty 1.05, at most 4 new tokens. A rotation counts as\n"
        "correct when its gold letter occurs anywhere in the output (the released `ans in out`). A question is kept\n"
        "iff its accuracy with the image is > --keep-visual and without it < --drop-text (4 rotations: 4/4 and 0/4).\n"
        "Images left with no question are dropped. Output: caprl QA records with the kept questions as they were\n"
        "written. The summary goes to stderr; --report writes it as JSON with every question's rotations, outputs\n"
        "and decision. Results depend only on --seed (not on --batch or --threads); an unreadable image drops its\n"
        "questions (reason image_error) and the job goes on."};
    const char *vlm_dir = NULL, *qa_path = NULL, *out_path = NULL, *report_path = NULL, *alpha = "white";
    int32_t     rotations = 4, batch = 32, max_new = 4, threads = 0, group_images = 8;
    float       keep_visual = 0.75f, drop_text = 0.25f, temperature = 0.1f, rep = 1.05f;
    int64_t     seed = 0, max_image_pixels = caprl_image_decode_default_params().max_pixels;
    bool        skip_bad = false;
    opt_spec    specs[] = {
        {"vlm", OPT_STRING, &vlm_dir, "Qwen2.5-VL checkpoint directory (the filter model)", 0, 0, "DIR", 0},
        {"qa", OPT_STRING, &qa_path, "QA file: caprl QA JSONL or released training records", 0, 0, "FILE", 0},
        {"out", OPT_STRING, &out_path, "output caprl QA JSONL (written atomically at the end)", 0, 0, "FILE", 0},
        {"rotations", OPT_INT, &rotations, "shuffled presentations per question", 1, 64, "R", 0},
        {"keep-visual", OPT_FLOAT, &keep_visual, "keep only if accuracy with the image is above this", 0, 1, "X", 0},
        {"drop-text", OPT_FLOAT, &drop_text, "keep only if accuracy without the image is below this", 0, 1, "X", 0},
        {"report", OPT_STRING, &report_path, "write the summary and every decision as JSON", 0, 0, "FILE", 0},
        {"temperature", OPT_FLOAT, &temperature, "sampling temperature (0 = greedy)", 0, 100, "T", 0},
        {"repetition-penalty", OPT_FLOAT, &rep, "repetition penalty (1 = off)", 1e-6, 100, "R", 0},
        {"max-new-tokens", OPT_INT, &max_new, "answer length limit in tokens", 1, 4096, "M", 0},
        {"batch", OPT_INT, &batch, "queries per batched generation", 1, 4096, "B", 0},
        {"group-images", OPT_INT, &group_images, "images encoded per vision-tower call", 1, 4096, "N", 0},
        {"max-image-pixels", OPT_I64, &max_image_pixels, "refuse images with more pixels than this", 1, 4e18, "N",
         0},
        {"alpha", OPT_STRING, &alpha, "transparent images: white (qwen-vl-utils) or drop (HF processor)", 0, 0,
         "white|drop", 0},
        {"skip-bad", OPT_FLAG, &skip_bad, "skip malformed QA records (counted) instead of failing", 0, 0, NULL, 0},
        {"seed", OPT_I64, &seed, "random seed (option shuffles and sampling)", 0, 9.2e18, "S", 0},
        {"threads", OPT_INT, &threads, THREADS_HELP, 0, 1024, "N", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!vlm_dir || !qa_path || !out_path) {
        return tool_usage_error(info.name, "--vlm, --qa and --out are required");
    }
    run_ctx r;
    memset(&r, 0, sizeof r);
    r.dp = caprl_image_decode_default_params();
    r.dp.max_pixels = max_image_pixels;
    rc = tool_parse_alpha(info.name, alpha, &r.dp.alpha);
    if (rc) {
        return rc;
    }
    r.rotations = rotations;
    r.batch = batch;
    r.seed = (uint64_t)seed;

    caprl_qa_set set;
    caprl_error  err = {0};
    caprl_status st = caprl_qa_set_load(&set, qa_path, skip_bad, &err);
    if (st != CAPRL_OK) {
        return tool_fail(info.name, st, err.msg);
    }
    int64_t   n_questions = caprl_qa_set_n_questions(&set);
    question *qs = tool_xcalloc((size_t)n_questions, sizeof *qs);
    /* image i: qs[first_q[i], first_q[i+1]) */
    int64_t  *first_q = tool_xcalloc((size_t)set.n_images + 1, sizeof *first_q);
    int64_t   g = 0;
    for (int64_t i = 0; i < set.n_images; i++) {
        first_q[i] = g;
        for (int32_t k = 0; k < set.images[i].n_qa; k++, g++) {
            question *q = &qs[g];
            q->image = i;
            q->qa = k;
            q->global = g;
            q->golds = tool_xcalloc((size_t)rotations, 1);
            q->texts = tool_xcalloc((size_t)rotations, sizeof(char *));
            q->ok = tool_xcalloc((size_t)rotations * 2, sizeof(bool));
            q->outputs = tool_xcalloc((size_t)rotations * 2, sizeof(char *));
            for (int32_t rot = 0; rot < rotations && q->decision == KEPT; rot++) {
                caprl_error qerr = {0};
                if (rotate(&set.images[i].qa[k], r.seed, g, rot, &q->texts[rot], &q->golds[rot], &qerr) != CAPRL_OK) {
                    fprintf(stderr, "caprl %s: warning: %s:%lld: question %d dropped: %s\n", CMD, qa_path,
                            (long long)set.images[i].line, k + 1, qerr.msg);
                    q->decision = DROP_BAD;
                }
            }
        }
    }
    first_q[set.n_images] = g;

    rc = tool_load_vlm(info.name, "checkpoint", vlm_dir, threads, tool_resize_variant(r.dp.alpha), &r.model,
                       &r.vision, &r.pp);
    if (rc == 0) {
        r.gp = caprl_generate_default_params();
        r.gp.n_samples = 1;
        r.gp.max_new_tokens = max_new;
        r.gp.sampling.do_sample = temperature > 0.0f;
        r.gp.sampling.temperature = temperature > 0.0f ? temperature : 1.0f;
        r.gp.sampling.repetition_penalty = rep;
        r.gp.sampling.seed = r.seed;
        r.tokens = tool_xcalloc((size_t)batch, sizeof(int32_t *));
        r.n_tok = tool_xcalloc((size_t)batch, sizeof(int32_t));
        for (int32_t i = 0; i < batch; i++) {
            r.tokens[i] = tool_xmalloc((size_t)max_new * sizeof(int32_t));
        }
    }

    /* images in groups of at most --group-images; every query of a group in chunks of --batch */
    tool_progress prog;
    tool_progress_start(&prog, CMD, "images", "img/s", set.n_images);
    caprl_image *imgs = tool_xcalloc((size_t)group_images, sizeof *imgs);
    query       *queries = NULL;
    size_t       queries_cap = 0;
    for (int64_t next = 0; rc == 0 && next < set.n_images;) {
        int32_t n_imgs = 0;
        int64_t n_q = 0;
        while (next < set.n_images && n_imgs < group_images) {
            const caprl_qa_image *im = &set.images[next];
            int64_t               q0 = first_q[next], q1 = first_q[next + 1];
            caprl_error           ierr = {0};
            caprl_status          ist = caprl_image_decode_file(im->image, &r.dp, &imgs[n_imgs], &ierr);
            int32_t               rw = 0, rh = 0;
            if (ist == CAPRL_OK) {
                ist = caprl_image_preprocess_size(imgs[n_imgs].width, imgs[n_imgs].height, &r.pp, &rw, &rh, &ierr);
                if (ist != CAPRL_OK) {
                    caprl_image_free(&imgs[n_imgs]);
                }
            }
            next++;
            if (ist != CAPRL_OK) { /* its questions are dropped; the job goes on */
                if (strstr(ierr.msg, im->image)) { /* the decoder's messages name the file */
                    fprintf(stderr, "caprl %s: warning: %s\n", CMD, ierr.msg);
                } else {
                    fprintf(stderr, "caprl %s: warning: %s: %s\n", CMD, im->image, ierr.msg);
                }
                for (int64_t q = q0; q < q1; q++) {
                    qs[q].decision = DROP_IMAGE;
                }
                prog.done++;
                prog.failed++;
                continue;
            }
            size_t need = (size_t)(n_q + (q1 - q0) * 2 * rotations);
            if (need > queries_cap) {
                queries_cap = 2 * need;
                queries = tool_xrealloc(queries, queries_cap * sizeof *queries);
            }
            for (int64_t q = q0; q < q1; q++) {
                for (int32_t rot = 0; rot < rotations && qs[q].decision == KEPT; rot++) {
                    for (int32_t mode = 0; mode < 2; mode++) {
                        queries[n_q++] = (query){&qs[q], rot, mode, n_imgs};
                    }
                }
            }
            n_imgs++;
        }
        if (n_imgs > 0) {
            st = n_q > 0 ? run_group(&r, imgs, n_imgs, queries, n_q, &err) : CAPRL_OK;
            if (st != CAPRL_OK) {
                rc = tool_fail(info.name, st, err.msg);
            }
            prog.done += n_imgs;
        }
        for (int32_t i = 0; i < n_imgs; i++) {
            caprl_image_free(&imgs[i]);
        }
        tool_progress_show(&prog, false);
    }
    if (rc == 0) {
        tool_progress_show(&prog, true);
    }
    free(imgs);
    free(queries);

    /* decisions, the output and the summary */
    int64_t count[N_DECISIONS] = {0};
    int64_t images_kept = 0, images_emptied = 0, images_failed = 0;
    json_t *report_items = json_array();
    char   *out_text = NULL;
    size_t  out_len = 0, out_cap = 0;
    char   *qa_dir = tool_folder_of(qa_path), *out_dir = tool_folder_of(out_path);
    bool    same_dir = qa_dir && out_dir && strcmp(qa_dir, out_dir) == 0;
    free(qa_dir);
    free(out_dir);
    for (int64_t i = 0; rc == 0 && i < set.n_images; i++) {
        const caprl_qa_image *im = &set.images[i];
        json_t               *kept = json_array();
        bool                  failed = false;
        for (int64_t qi = first_q[i]; qi < first_q[i + 1]; qi++) {
            question *q = &qs[qi];
            double    va = acc(q->ok, rotations), ta = acc(q->ok + rotations, rotations);
            if (q->decision == KEPT) {
                /* the strict inequalities of the released README: with 4 rotations, 4/4 and 0/4 */
                bool vis_ok = va > tool_typed_float(keep_visual), txt_ok = ta < tool_typed_float(drop_text);
                q->decision = vis_ok && txt_ok     ? KEPT
                              : !vis_ok && !txt_ok ? DROP_BOTH
                              : vis_ok             ? DROP_TEXT
                                                   : DROP_VISUAL;
            }
            failed = failed || q->decision == DROP_IMAGE;
            count[q->decision]++;
            const caprl_qa_item *it = &im->qa[q->qa];
            if (q->decision == KEPT) {
                json_array_append_new(kept, json_pack("{s:s, s:s#}", "question", it->question, "answer", &it->gold,
                                                      (int)1));
            }
            if (report_path) {
                json_t *golds = json_array();
                for (int32_t rot = 0; rot < rotations; rot++) {
                    json_array_append_new(golds, q->golds[rot] ? json_stringn(&q->golds[rot], 1) : json_null());
                }
                json_t *d = json_pack("{s:s, s:s, s:i, s:s, s:s#, s:s, s:o}", "id", im->id, "image", im->image_raw,
                                      "question_index", (int)q->qa, "question", it->question, "answer", &it->gold,
                                      (int)1, "decision", k_decision[q->decision], "rotation_answers", golds);
                if (q->decision != DROP_IMAGE && q->decision != DROP_BAD) {
                    json_object_set_new(d, "visual", bool_array(q->ok, rotations));
                    json_object_set_new(d, "text", bool_array(q->ok + rotations, rotations));
                    json_object_set_new(d, "visual_acc", json_real(va));
                    json_object_set_new(d, "text_acc", json_real(ta));
                    json_object_set_new(d, "visual_outputs", string_array(q->outputs, rotations));
                    json_object_set_new(d, "text_outputs", string_array(q->outputs + rotations, rotations));
                }
                json_array_append_new(report_items, d);
            }
        }
        if (json_array_size(kept) > 0) {
            images_kept++;
            json_t *rec = json_object();
            json_object_set_new(rec, "id", json_string(im->id));
            json_object_set_new(rec, "image", image_path_json(im, same_dir));
            json_object_set_new(rec, "qa", kept);
            char *line = json_dumps(rec, JSON_COMPACT);
            json_decref(rec);
            size_t n = strlen(line);
            if (out_len + n + 2 > out_cap) {
                out_cap = 2 * (out_len + n + 2);
                out_text = tool_xrealloc(out_text, out_cap);
            }
            memcpy(out_text + out_len, line, n);
            out_text[out_len + n] = '\n';
            out_len += n + 1;
            free(line);
        } else {
            json_decref(kept);
            if (failed) {
                images_failed++;
            } else {
                images_emptied++;
            }
        }
    }
    if (rc == 0) {
        rc = tool_write_file_atomic(info.name, out_path, out_text ? out_text : "", out_len);
    }
    if (rc == 0) {
        int64_t dropped = n_questions - count[KEPT];
        fprintf(stderr,
                "caprl %s: %lld questions on %lld images: kept %lld on %lld images; dropped %lld (%lld answerable "
                "without the image, %lld not answered with it, %lld both, %lld unreadable image, %lld malformed); "
                "images dropped: %lld left with no question, %lld unreadable\n",
                CMD, (long long)n_questions, (long long)set.n_images, (long long)count[KEPT], (long long)images_kept,
                (long long)dropped, (long long)count[DROP_TEXT], (long long)count[DROP_VISUAL],
                (long long)count[DROP_BOTH], (long long)count[DROP_IMAGE], (long long)count[DROP_BAD],
                (long long)images_emptied, (long long)images_failed);
    }
    if (rc == 0 && report_path) {
        json_t *dropped = json_object();
        for (int32_t d = 1; d < N_DECISIONS; d++) {
            json_object_set_new(dropped, k_decision[d], json_integer(count[d]));
        }
        json_t *summary = json_pack(
            "{s:s, s:s, s:s, s:{s:i, s:f, s:f, s:f, s:i, s:f, s:I}, s:{s:I, s:I, s:I, s:I}, s:{s:I, s:I, s:I, s:o}, "
            "s:o}",
            "qa", qa_path, "vlm", vlm_dir, "out", out_path,
            "settings", "rotations", (int)rotations, "keep_visual", tool_typed_float(keep_visual), "drop_text",
            tool_typed_float(drop_text), "temperature", tool_typed_float(temperature), "max_new_tokens", (int)max_new,
            "repetition_penalty", tool_typed_float(rep), "seed", (json_int_t)seed,
            "images", "in", (json_int_t)set.n_images, "kept", (json_int_t)images_kept, "dropped_no_question",
            (json_int_t)images_emptied, "dropped_unreadable", (json_int_t)images_failed,
            "questions", "in", (json_int_t)n_questions, "kept", (json_int_t)count[KEPT], "dropped",
            (json_int_t)(n_questions - count[KEPT]), "dropped_by_reason", dropped,
            "decisions", report_items);
        report_items = NULL;
        char *text = summary ? json_dumps(summary, JSON_INDENT(2)) : NULL;
        json_decref(summary);
        if (!text) {
            fprintf(stderr, "caprl %s: error: cannot encode the report (a path that is not UTF-8?)\n", CMD);
            rc = EXIT_DATA;
        } else {
            size_t n = strlen(text);
            text[n] = '\n'; /* json_dumps leaves room for the NUL, which the newline replaces */
            rc = tool_write_file_atomic(info.name, report_path, text, n + 1);
            free(text);
        }
    }
    json_decref(report_items);
    free(out_text);
    for (int64_t q = 0; q < n_questions; q++) {
        for (int32_t rot = 0; rot < rotations; rot++) {
            free(qs[q].texts[rot]);
            free(qs[q].outputs[rot]);
            free(qs[q].outputs[rotations + rot]);
        }
        free(qs[q].golds);
        free(qs[q].texts);
        free(qs[q].ok);
        free(qs[q].outputs);
    }
    free(qs);
    free(first_q);
    if (r.tokens) {
        for (int32_t i = 0; i < batch; i++) {
            free(r.tokens[i]);
        }
    }
    free(r.tokens);
    free(r.n_tok);
    free(r.text);
    caprl_context_free(r.ctx);
    caprl_vision_free(r.vision);
    caprl_model_free(r.model);
    caprl_qa_set_free(&set);
    return rc;
}
