/* SFT data (include/caprl/data.h): JSON Lines chat records -> token streams with loss masks, per-epoch orders,
 * packing into micro-batches, and the caprl_train_batch of a micro-batch (images decoded and preprocessed there).
 * Depends on core, fmt (JSON through the wrapper), text (tokenizer), image and model (config, VL prompt helpers);
 * nothing here knows about the trainer beyond the batch layout of train.h. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/data.h"
#include "caprl/tokenizer.h"
#include "caprl/vlm.h"
#include "core/ckmath.h"
#include "core/error_impl.h"
#include "core/file_impl.h"
#include "core/log_impl.h"
#include "core/rng_impl.h"
#include "fmt/json_impl.h"

/* One line of a data file longer than this is refused (records are text; images are referenced by path). */
#define SFT_MAX_LINE ((size_t)64 << 20)
/* How many skipped records are logged one by one under skip_bad before only the count is kept. */
#define SFT_LOG_SKIPPED 10
/* The Philox stream of the epoch orders (purpose id, so other consumers of the seed draw other numbers). */
#define SFT_ORDER_STREAM 0x5346544F52445231ull

#define VISION_BLOCK "<|vision_start|><|image_pad|><|vision_end|>"

struct caprl_sft_data {
    char             *path;
    caprl_sft_params  p; /* p.system points into system_copy */
    char             *system_copy;
    bool              vl;
    int32_t           image_token_id;
    caprl_sft_record *recs;    /* (n) */
    int64_t          *tok_off; /* (n + 1) into tokens / mask */
    char            **images;  /* (n) resolved image path or NULL */
    int32_t          *grids;   /* (n, 3) image grid in patches (zeros without image) */
    int32_t          *tokens;
    uint8_t          *mask;
    int64_t           n, cap, n_tok, tok_cap, n_skipped, n_loss;
};

caprl_sft_params caprl_sft_default_params(void) {
    caprl_sft_params p;
    memset(&p, 0, sizeof p);
    p.max_seq_len = 2048;
    p.skip_bad = false;
    p.system = NULL;
    p.decode = caprl_image_decode_default_params();
    p.pp = caprl_preprocess_config_default();
    return p;
}

/* ---- loading: one record ------------------------------------------------------------------------------------ */

typedef struct text_buf {
    char  *s;
    size_t len, cap;
} text_buf;

static void tb_put(text_buf *b, const char *s) {
    size_t n = strlen(s);
    if (b->len + n + 1 > b->cap) {
        b->cap = 2 * (b->len + n + 1);
        b->s = caprl_xrealloc(b->s, b->cap);
    }
    memcpy(b->s + b->len, s, n + 1);
    b->len += n;
}

static void tb_turn(text_buf *b, const char *role, const char *prefix, const char *content) {
    tb_put(b, "<|im_start|>");
    tb_put(b, role);
    tb_put(b, "\n");
    tb_put(b, prefix);
    tb_put(b, content);
    tb_put(b, "<|im_end|>\n");
}

/* The record being tokenized: ids and mask grow together. */
typedef struct rec_buf {
    int32_t *ids;
    uint8_t *mask;
    int64_t  n, cap;
} rec_buf;

static void rb_reserve(rec_buf *r, int64_t extra) {
    if (r->n + extra <= r->cap) {
        return;
    }
    r->cap = 2 * (r->n + extra);
    r->ids = caprl_xrealloc(r->ids, (size_t)r->cap * sizeof(int32_t));
    r->mask = caprl_xrealloc(r->mask, (size_t)r->cap);
}

static caprl_status rb_encode(rec_buf *r, const caprl_tokenizer *tok, const char *text, uint8_t loss,
                              caprl_error *err) {
    size_t  len = strlen(text);
    int64_t got = 0;
    rb_reserve(r, (int64_t)len / 2 + 16);
    CAPRL_TRY(caprl_tokenizer_encode(tok, text, len, true, r->ids + r->n, r->cap - r->n, &got, err));
    if (got > r->cap - r->n) { /* snprintf contract: encode again into room for all of them */
        rb_reserve(r, got);
        CAPRL_TRY(caprl_tokenizer_encode(tok, text, len, true, r->ids + r->n, r->cap - r->n, &got, err));
    }
    memset(r->mask + r->n, loss, (size_t)got);
    r->n += got;
    return CAPRL_OK;
}

/* Messages of a record, checked. A content given as a list of typed parts is joined into owned text, the image
 * part becoming VISION_BLOCK where it stands. */
typedef struct rec_msgs {
    const char **role, **content;
    char       **owned;      /* (n) joined part lists, or NULL */
    size_t       n;
    const char  *list[2];    /* where the messages come from: "messages", or TRL's "prompt" then "completion" */
    size_t       n_first;    /* messages from list[0] */
    size_t       first_loss; /* assistant messages from here on carry the loss (the prompt form: n_first) */
    bool         image_part; /* an {"type": "image"} part placed the image */
    const char  *part_image; /* that part's own "image" path, or NULL */
} rec_msgs;

/* "%s[%zu]" arguments naming message i in the record: its list and its index there. */
#define MSG_AT(m, i) ((i) < (m)->n_first ? (m)->list[0] : (m)->list[1]), (i) - ((i) < (m)->n_first ? 0 : (m)->n_first)

static void rec_msgs_free(rec_msgs *m) {
    for (size_t i = 0; m->owned && i < m->n; i++) {
        free(m->owned[i]);
    }
    free(m->owned);
    free(m->role);
    free(m->content);
}

/* The Hugging Face / qwen-vl-utils multimodal form of message i's content: [{"type": "text", "text": ...},
 * {"type": "image"[, "image": path]}, ...], joined in order. One image per record, in a user message. */
static caprl_status join_parts(const struct json_t *parts, size_t i, rec_msgs *m, caprl_error *err) {
    text_buf b = {0};
    tb_put(&b, "");
    caprl_status st = CAPRL_OK;
    for (size_t k = 0; k < caprl_json_array_size(parts) && st == CAPRL_OK; k++) {
        caprl_json_obj part = {caprl_json_array_get(parts, k), "", ""};
        const char    *type = caprl_json_string_value(caprl_json_get(&part, "type"));
        const char    *text = caprl_json_string_value(caprl_json_get(&part, "text"));
        if (!caprl_json_is_object(part.obj) || !type) {
            st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s[%zu].content[%zu] is not a {\"type\": ...} part",
                               MSG_AT(m, i), k);
        } else if (strcmp(type, "text") == 0) {
            if (text) {
                tb_put(&b, text);
            } else {
                st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s[%zu].content[%zu]: a text part needs a string "
                                   "\"text\"", MSG_AT(m, i), k);
            }
        } else if (strcmp(type, "image") != 0) {
            st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s[%zu].content[%zu]: part type \"%.40s\" is not text or "
                               "image", MSG_AT(m, i), k, type);
        } else if (m->image_part || strcmp(m->role[i], "user") != 0) {
            st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s[%zu].content[%zu]: %s", MSG_AT(m, i), k,
                               m->image_part ? "a second image part (one image per record)"
                                             : "an image part outside a user message");
        } else {
            const struct json_t *path = caprl_json_get(&part, "image");
            if (!caprl_json_is_null(path) && !caprl_json_string_value(path)) {
                st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s[%zu].content[%zu]: \"image\" must be a path",
                                   MSG_AT(m, i), k);
            }
            m->image_part = true;
            m->part_image = caprl_json_string_value(path);
            tb_put(&b, VISION_BLOCK);
        }
    }
    if (st != CAPRL_OK) {
        free(b.s);
        return st;
    }
    if (!m->owned) {
        m->owned = caprl_xcalloc(m->n, sizeof(char *));
    }
    m->owned[i] = b.s;
    m->content[i] = b.s;
    return CAPRL_OK;
}

/* Fills err with "msg" (the caller prefixes path:line). */
static caprl_status check_messages(const caprl_json_obj *root, bool prompt_form, rec_msgs *m, caprl_error *err) {
    const struct json_t *lists[2] = {caprl_json_get(root, prompt_form ? "prompt" : "messages"),
                                     prompt_form ? caprl_json_get(root, "completion") : NULL};
    m->list[0] = prompt_form ? "prompt" : "messages";
    m->list[1] = "completion";
    if (!caprl_json_is_array(lists[0]) || caprl_json_array_size(lists[0]) == 0 ||
        (prompt_form && (!caprl_json_is_array(lists[1]) || caprl_json_array_size(lists[1]) == 0))) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, prompt_form ? "\"prompt\" and \"completion\" must be non-empty "
                                                                  "arrays of {role, content} (or both strings)"
                                                                : "\"messages\" must be a non-empty array of {role, "
                                                                  "content}");
    }
    m->n_first = caprl_json_array_size(lists[0]);
    m->first_loss = prompt_form ? m->n_first : 0;
    m->n = m->n_first + caprl_json_array_size(lists[1]);
    m->role = caprl_xcalloc(m->n, sizeof(char *));
    m->content = caprl_xcalloc(m->n, sizeof(char *));
    bool any_assistant = false;
    for (size_t i = 0; i < m->n; i++) {
        const struct json_t *msg = i < m->n_first ? caprl_json_array_get(lists[0], i)
                                                  : caprl_json_array_get(lists[1], i - m->n_first);
        caprl_json_obj       o = {msg, "", ""};
        if (!caprl_json_is_object(msg)) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s[%zu] is not an object", MSG_AT(m, i));
        }
        m->role[i] = caprl_json_string_value(caprl_json_get(&o, "role"));
        m->content[i] = caprl_json_string_value(caprl_json_get(&o, "content"));
        if (!m->role[i]) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s[%zu] has no string \"role\"", MSG_AT(m, i));
        }
        if (!m->content[i] && caprl_json_is_array(caprl_json_get(&o, "content"))) {
            CAPRL_TRY(join_parts(caprl_json_get(&o, "content"), i, m, err));
        }
        bool sys = strcmp(m->role[i], "system") == 0, asst = strcmp(m->role[i], "assistant") == 0;
        if (!sys && !asst && strcmp(m->role[i], "user") != 0) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT,
                                 "%s[%zu]: role \"%.40s\" is not system, user or assistant", MSG_AT(m, i), m->role[i]);
        }
        if (!m->content[i]) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s[%zu] (%s) has no string or part-list \"content\"",
                                 MSG_AT(m, i), m->role[i]);
        }
        if (sys && i > 0) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s[%zu]: a system message may only come first", MSG_AT(m, i));
        }
        any_assistant = any_assistant || (asst && i >= m->first_loss);
    }
    if (!any_assistant) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, prompt_form ? "no assistant message in \"completion\": nothing "
                                                                  "to learn from"
                                                                : "no assistant message: nothing to learn from");
    }
    return CAPRL_OK;
}

/* The raw form: {"prompt": "...", "completion": "..."}, both strings, the completion not empty. */
static caprl_status check_raw(const caprl_json_obj *root, caprl_error *err) {
    const char *prompt = caprl_json_string_value(caprl_json_get(root, "prompt"));
    const char *completion = caprl_json_string_value(caprl_json_get(root, "completion"));
    if (!prompt || !completion) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "\"prompt\" and \"completion\" must both be strings");
    }
    if (!completion[0]) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "empty \"completion\": nothing to learn from");
    }
    return CAPRL_OK;
}

/* The ChatML rendering of the messages, tokenized: context text as one piece up to and including each
 * "<|im_start|>assistant\n", then the reply with its <|im_end|> (loss), then the context goes on. */
static caprl_status tokenize_messages(const caprl_sft_data *d, const caprl_tokenizer *tok, const rec_msgs *m,
                                      bool has_image, rec_buf *r, caprl_error *err) {
    text_buf     ctx = {0};
    size_t       first = 0;
    caprl_status st = CAPRL_OK;
    tb_put(&ctx, "");
    if (strcmp(m->role[0], "system") == 0) {
        tb_turn(&ctx, "system", "", m->content[0]);
        first = 1;
    } else {
        const char *def = d->vl ? CAPRL_QWEN25VL_DEFAULT_SYSTEM : CAPRL_QWEN25_DEFAULT_SYSTEM;
        tb_turn(&ctx, "system", "", d->p.system ? d->p.system : def);
    }
    bool image_placed = false;
    for (size_t i = first; i < m->n && st == CAPRL_OK; i++) {
        if (strcmp(m->role[i], "assistant") != 0 || i < m->first_loss) {
            bool here = has_image && !m->image_part && !image_placed && strcmp(m->role[i], "user") == 0;
            tb_turn(&ctx, m->role[i], here ? VISION_BLOCK : "", m->content[i]);
            image_placed = image_placed || here;
            continue;
        }
        tb_put(&ctx, "<|im_start|>assistant\n");
        st = rb_encode(r, tok, ctx.s, 0, err);
        ctx.len = 0;
        ctx.s[0] = '\0';
        text_buf reply = {0};
        tb_put(&reply, m->content[i]);
        tb_put(&reply, "<|im_end|>");
        if (st == CAPRL_OK) {
            st = rb_encode(r, tok, reply.s, 1, err);
        }
        free(reply.s);
        tb_put(&ctx, "\n");
    }
    if (st == CAPRL_OK && has_image && !image_placed && !m->image_part) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "the record has an \"image\" but no user message to put it in");
    }
    if (st == CAPRL_OK) {
        st = rb_encode(r, tok, ctx.s, 0, err);
    }
    free(ctx.s);
    return st;
}

/* The record's image path: "image", TRL's "images" (a list of one) or the image part's own "image" (a "file://"
 * prefix dropped); NULL when the record has none. */
static caprl_status record_image(const caprl_json_obj *root, const rec_msgs *m, bool raw, const char **out,
                                 caprl_error *err) {
    const struct json_t *img = caprl_json_get(root, "image"), *imgs = caprl_json_get(root, "images");
    *out = NULL;
    if (caprl_json_is_null(img) && caprl_json_is_null(imgs) && !m->part_image) {
        return m->image_part ? caprl_err_set(err, CAPRL_ERR_FORMAT, "an image part but no image path (\"image\" in "
                                             "the part or the record)")
                             : CAPRL_OK;
    }
    if (raw) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "an \"image\" needs the chat form (\"messages\")");
    }
    if (!caprl_json_is_null(imgs)) {
        if (!caprl_json_is_null(img) || caprl_json_array_size(imgs) != 1) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "\"images\" must be a list of one path (one image per "
                                 "record), without \"image\"");
        }
        img = caprl_json_array_get(imgs, 0);
    }
    const char *path = m->part_image ? m->part_image : caprl_json_string_value(img);
    if (m->part_image && !caprl_json_is_null(img) &&
        (!caprl_json_string_value(img) || strcmp(caprl_json_string_value(img), path) != 0)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "the image part's \"image\" and the record's differ");
    }
    if (path && strncmp(path, "file://", 7) == 0) {
        path += 7;
    }
    if (!path || !path[0]) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "\"image\" must be a non-empty string (a file path)");
    }
    *out = path;
    return CAPRL_OK;
}

/* Decodes the image to learn its processed size: grid (1, h, w) in patches and the merged tokens it becomes. */
static caprl_status image_grid(const caprl_sft_data *d, const char *path, int32_t grid[3], int64_t *n_img_tokens,
                               caprl_error *err) {
    caprl_image img;
    CAPRL_TRY(caprl_image_decode_file(path, &d->p.decode, &img, err));
    int32_t      w = 0, h = 0;
    caprl_status st = caprl_image_preprocess_size(img.width, img.height, &d->p.pp, &w, &h, err);
    caprl_image_free(&img);
    if (st != CAPRL_OK) {
        caprl_err_prefix(err, "%s", path);
        return st;
    }
    int32_t ps = d->p.pp.patch_size, ms = d->p.pp.merge_size;
    grid[0] = 1;
    grid[1] = h / ps;
    grid[2] = w / ps;
    *n_img_tokens = (int64_t)(grid[1] / ms) * (grid[2] / ms);
    return CAPRL_OK;
}

/* Replaces the record's one <|image_pad|> (from VISION_BLOCK) by the image's run; any other pad in the text is an
 * error (the text would claim image tokens no image fills). */
static caprl_status expand_image(const caprl_sft_data *d, rec_buf *r, bool has_image, int64_t n_img_tokens,
                                 caprl_error *err) {
    int64_t pads = 0, at = -1;
    for (int64_t t = 0; t < r->n; t++) {
        if (r->ids[t] == d->image_token_id) {
            pads++;
            at = t;
        }
    }
    if (pads != (has_image ? 1 : 0)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "the text holds <|image_pad|> tokens of its own (%lld)",
                             (long long)(pads - (has_image ? 1 : 0)));
    }
    if (!has_image) {
        return CAPRL_OK;
    }
    int64_t extra = n_img_tokens - 1;
    rb_reserve(r, extra);
    memmove(r->ids + at + 1 + extra, r->ids + at + 1, (size_t)(r->n - at - 1) * sizeof(int32_t));
    memmove(r->mask + at + 1 + extra, r->mask + at + 1, (size_t)(r->n - at - 1));
    for (int64_t t = at; t <= at + extra; t++) {
        r->ids[t] = d->image_token_id;
        r->mask[t] = 0;
    }
    r->n += extra;
    return CAPRL_OK;
}

static char *resolve_image(const char *data_path, const char *image) {
    if (image[0] == '/') {
        return caprl_xstrdup(image);
    }
    const char *slash = strrchr(data_path, '/');
    if (!slash) {
        return caprl_xstrdup(image);
    }
    return caprl_xasprintf("%.*s/%s", (int)(slash - data_path), data_path, image);
}

static void data_push(caprl_sft_data *d, const rec_buf *r, int64_t line, char *image, const int32_t grid[3]) {
    if (d->n == d->cap) {
        d->cap = d->cap ? 2 * d->cap : 256;
        d->recs = caprl_xrealloc(d->recs, (size_t)d->cap * sizeof *d->recs);
        d->tok_off = caprl_xrealloc(d->tok_off, (size_t)(d->cap + 1) * sizeof *d->tok_off);
        d->images = caprl_xrealloc(d->images, (size_t)d->cap * sizeof *d->images);
        d->grids = caprl_xrealloc(d->grids, (size_t)d->cap * 3 * sizeof *d->grids);
    }
    if (d->n_tok + r->n > d->tok_cap) {
        d->tok_cap = 2 * (d->n_tok + r->n);
        d->tokens = caprl_xrealloc(d->tokens, (size_t)d->tok_cap * sizeof(int32_t));
        d->mask = caprl_xrealloc(d->mask, (size_t)d->tok_cap);
    }
    memcpy(d->tokens + d->n_tok, r->ids, (size_t)r->n * sizeof(int32_t));
    memcpy(d->mask + d->n_tok, r->mask, (size_t)r->n);
    caprl_sft_record *rec = &d->recs[d->n];
    rec->line = line;
    rec->n_tokens = (int32_t)r->n;
    rec->n_loss = 0;
    for (int64_t t = 1; t < r->n; t++) { /* the first token is never scored (nothing comes before it) */
        rec->n_loss += r->mask[t];
    }
    rec->n_patches = image ? (int64_t)grid[0] * grid[1] * grid[2] : 0;
    d->images[d->n] = image;
    memcpy(d->grids + 3 * d->n, grid, 3 * sizeof(int32_t));
    d->tok_off[d->n] = d->n_tok;
    d->n_tok += r->n;
    d->tok_off[d->n + 1] = d->n_tok;
    d->n_loss += rec->n_loss;
    d->n++;
}

/* Parses, checks and tokenizes one line; on success appends it to d. Errors carry no position (the caller adds
 * path:line). */
static caprl_status load_record(caprl_sft_data *d, const caprl_tokenizer *tok, const char *line, size_t len,
                                int64_t line_no, rec_buf *r, caprl_error *err) {
    struct json_t *j = NULL;
    caprl_status   st = caprl_json_parse(&j, line, len, "", err);
    if (st != CAPRL_OK) {
        /* jansson counts lines within this one line: keep only its column and text */
        char   msg[CAPRL_ERROR_MSG_CAP];
        size_t skip = strncmp(err->msg, ":1:", 3) == 0 ? 3 : 0;
        snprintf(msg, sizeof msg, "%s", err->msg + skip);
        return caprl_err_set(err, st, "invalid JSON%s%s", skip ? " at column " : ": ", msg);
    }
    caprl_json_obj root = {j, "", ""};
    rec_msgs       m = {0};
    char          *image = NULL;
    int32_t        grid[3] = {0, 0, 0};
    int64_t        n_img_tokens = 0;
    bool           raw = false;
    if (!caprl_json_is_object(j)) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT,
                           "a record must be a JSON object with \"messages\" (or \"prompt\" and \"completion\")");
    } else if (!caprl_json_has(&root, "messages") &&
               (caprl_json_has(&root, "prompt") || caprl_json_has(&root, "completion"))) {
        bool prompt_form = caprl_json_is_array(caprl_json_get(&root, "prompt")) ||
                           caprl_json_is_array(caprl_json_get(&root, "completion"));
        raw = !prompt_form;
        st = prompt_form ? check_messages(&root, true, &m, err) : check_raw(&root, err);
    } else {
        st = check_messages(&root, false, &m, err);
    }
    const char *img_path = NULL;
    if (st == CAPRL_OK) {
        st = record_image(&root, &m, raw, &img_path, err);
    }
    if (st == CAPRL_OK && img_path) {
        if (!d->vl) {
            st = caprl_err_set(err, CAPRL_ERR_FORMAT, "the record has an \"image\" but the model is text-only");
        } else {
            image = resolve_image(d->path, img_path);
            st = image_grid(d, image, grid, &n_img_tokens, err);
        }
    }
    r->n = 0;
    if (st == CAPRL_OK && raw) { /* prompt (context) then completion (loss), nothing added */
        st = rb_encode(r, tok, caprl_json_string_value(caprl_json_get(&root, "prompt")), 0, err);
        if (st == CAPRL_OK) {
            st = rb_encode(r, tok, caprl_json_string_value(caprl_json_get(&root, "completion")), 1, err);
        }
    } else if (st == CAPRL_OK) {
        st = tokenize_messages(d, tok, &m, image != NULL, r, err);
    }
    if (st == CAPRL_OK && (r->n < 2 || memchr(r->mask + 1, 1, (size_t)(r->n - 1)) == NULL)) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "no token to learn (the first token has nothing before it)");
    }
    if (st == CAPRL_OK && d->vl) {
        st = expand_image(d, r, image != NULL, n_img_tokens, err);
    }
    if (st == CAPRL_OK && r->n > d->p.max_seq_len) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%lld tokens, more than the maximum sequence length %d",
                           (long long)r->n, d->p.max_seq_len);
    }
    if (st == CAPRL_OK) {
        data_push(d, r, line_no, image, grid);
        image = NULL;
    }
    free(image);
    rec_msgs_free(&m);
    caprl_json_free(j);
    return st;
}

/* ---- loading: the file -------------------------------------------------------------------------------------- */

static caprl_status check_params(const caprl_model *model, const caprl_sft_params *p, caprl_error *err) {
    if (!model || !p) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "sft data: NULL model or params");
    }
    if (!caprl_model_tokenizer(model)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "sft data: the model has no tokenizer (tokenizer.json)");
    }
    if (p->max_seq_len < 2) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "sft data: max_seq_len %d is below 2", p->max_seq_len);
    }
    if (caprl_model_config(model)->is_vl) {
        CAPRL_TRY(caprl_preprocess_config_check(&p->pp, err));
    }
    return CAPRL_OK;
}

caprl_status caprl_sft_data_load(caprl_sft_data **out, const char *path, const caprl_model *model,
                                 const caprl_sft_params *params, caprl_error *err) {
    CAPRL_TRY(check_params(model, params, err));
    FILE *f = fopen(path, "rb");
    if (!f) {
        return caprl_err_set(err, CAPRL_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    caprl_sft_data *d = caprl_xcalloc(1, sizeof *d);
    d->path = caprl_xstrdup(path);
    d->p = *params;
    if (params->system) {
        d->system_copy = caprl_xstrdup(params->system);
        d->p.system = d->system_copy;
    }
    const caprl_text_config *cfg = caprl_model_config(model);
    d->vl = cfg->is_vl;
    d->image_token_id = cfg->is_vl ? cfg->image_token_id : -1;
    const caprl_tokenizer *tok = caprl_model_tokenizer(model);
    rec_buf                r = {0};
    char                  *line = NULL;
    size_t                 line_cap = 0;
    ssize_t                got;
    caprl_status           st = CAPRL_OK;
    for (int64_t line_no = 1; st == CAPRL_OK && (got = getline(&line, &line_cap, f)) >= 0; line_no++) {
        size_t n = (size_t)got;
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t')) {
            n--;
        }
        size_t lead = line_no == 1 && n >= 3 && memcmp(line, "\xEF\xBB\xBF", 3) == 0 ? 3 : 0; /* editors' BOM */
        size_t k = lead;
        while (k < n && (line[k] == ' ' || line[k] == '\t')) {
            k++;
        }
        if (k == n) {
            continue; /* blank lines are allowed (and still counted) */
        }
        caprl_error rerr = {0};
        caprl_status rst = n > SFT_MAX_LINE
                               ? caprl_err_set(&rerr, CAPRL_ERR_FORMAT, "line longer than %zu bytes", SFT_MAX_LINE)
                               : load_record(d, tok, line + lead, n - lead, line_no, &r, &rerr);
        if (rst == CAPRL_OK) {
            continue;
        }
        if (rst == CAPRL_ERR_OOM || !params->skip_bad) {
            st = caprl_err_set(err, rst, "%s:%lld: %s", path, (long long)line_no, rerr.msg);
            break;
        }
        if (d->n_skipped++ < SFT_LOG_SKIPPED) {
            LOG_WARN("%s:%lld: skipped: %s", path, (long long)line_no, rerr.msg);
        }
    }
    if (st == CAPRL_OK && ferror(f)) {
        st = caprl_err_set(err, CAPRL_ERR_IO, "%s: read failed: %s", path, strerror(errno));
    }
    if (st == CAPRL_OK && d->n == 0) {
        st = caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: no usable record (%lld skipped)", path,
                           (long long)d->n_skipped);
    }
    if (st == CAPRL_OK && d->n_skipped > SFT_LOG_SKIPPED) {
        LOG_WARN("%s: %lld records skipped in all", path, (long long)d->n_skipped);
    }
    free(line);
    free(r.ids);
    free(r.mask);
    fclose(f);
    if (st != CAPRL_OK) {
        caprl_sft_data_free(d);
        return st;
    }
    *out = d;
    return CAPRL_OK;
}

void caprl_sft_data_free(caprl_sft_data *d) {
    if (!d) {
        return;
    }
    for (int64_t i = 0; i < d->n; i++) {
        free(d->images[i]);
    }
    free(d->images);
    free(d->grids);
    free(d->recs);
    free(d->tok_off);
    free(d->tokens);
    free(d->mask);
    free(d->system_copy);
    free(d->path);
    free(d);
}

int64_t caprl_sft_data_size(const caprl_sft_data *d) {
    return d->n;
}

int64_t caprl_sft_data_n_skipped(const caprl_sft_data *d) {
    return d->n_skipped;
}

int64_t caprl_sft_data_n_tokens(const caprl_sft_data *d) {
    return d->n_tok;
}

int64_t caprl_sft_data_n_loss(const caprl_sft_data *d) {
    return d->n_loss;
}

const caprl_sft_record *caprl_sft_data_record(const caprl_sft_data *d, int64_t i) {
    CAPRL_ASSERT(i >= 0 && i < d->n);
    return &d->recs[i];
}

const int32_t *caprl_sft_data_tokens(const caprl_sft_data *d, int64_t i, const uint8_t **loss_mask) {
    CAPRL_ASSERT(i >= 0 && i < d->n);
    if (loss_mask) {
        *loss_mask = d->mask + d->tok_off[i];
    }
    return d->tokens + d->tok_off[i];
}

/* ---- order and packing ------------------------------------------------------------------------------------- */

void caprl_sft_epoch_order(const caprl_sft_data *d, uint64_t seed, int64_t epoch, int64_t *order) {
    for (int64_t i = 0; i < d->n; i++) {
        order[i] = i;
    }
    caprl_rng r;
    caprl_rng_init(&r, seed, (uint64_t)epoch, SFT_ORDER_STREAM);
    for (int64_t i = d->n - 1; i > 0; i--) {
        int64_t j = (int64_t)caprl_rng_below(&r, (uint64_t)i + 1);
        int64_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

typedef struct pack_item {
    int32_t len;
    int32_t pos;
} pack_item;

static int cmp_pack_item(const void *a, const void *b) {
    const pack_item *x = a, *y = b;
    if (x->len != y->len) {
        return x->len > y->len ? -1 : 1;
    }
    return (x->pos > y->pos) - (x->pos < y->pos);
}

caprl_status caprl_sft_pack(const caprl_sft_data *d, const int64_t *idx, int32_t n,
                            const caprl_trainer_params *limits, int32_t *mb, int32_t *n_mb, caprl_error *err) {
    if (n < 0 || (n > 0 && (!idx || !mb)) || !limits || !n_mb || limits->max_tokens < 1 || limits->max_seqs < 1) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "sft pack: bad arguments or limits");
    }
    for (int32_t k = 0; k < n; k++) {
        const caprl_sft_record *r = caprl_sft_data_record(d, idx[k]);
        if (r->n_tokens > limits->max_tokens || r->n_patches > limits->max_patches) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG,
                                 "%s:%lld: %d tokens and %lld image patches do not fit one micro-batch (%d tokens, "
                                 "%lld patches)",
                                 d->path, (long long)r->line, r->n_tokens, (long long)r->n_patches,
                                 limits->max_tokens, (long long)limits->max_patches);
        }
    }
    pack_item *items = caprl_xmalloc((size_t)(n > 0 ? n : 1) * sizeof *items);
    int64_t   *load = caprl_xcalloc((size_t)(n > 0 ? n : 1) * 3, sizeof(int64_t)); /* tokens, seqs, patches */
    for (int32_t k = 0; k < n; k++) {
        items[k].len = caprl_sft_data_record(d, idx[k])->n_tokens;
        items[k].pos = k;
    }
    if (n > 0) {
        qsort(items, (size_t)n, sizeof *items, cmp_pack_item);
    }
    int32_t open = 0;
    for (int32_t s = 0; s < n; s++) {
        const caprl_sft_record *r = caprl_sft_data_record(d, idx[items[s].pos]);
        int32_t                 b = 0;
        while (b < open && (load[3 * b] + r->n_tokens > limits->max_tokens || load[3 * b + 1] + 1 > limits->max_seqs ||
                            load[3 * b + 2] + r->n_patches > limits->max_patches)) {
            b++;
        }
        if (b == open) {
            open++;
        }
        load[3 * b] += r->n_tokens;
        load[3 * b + 1] += 1;
        load[3 * b + 2] += r->n_patches;
        mb[items[s].pos] = b;
    }
    free(items);
    free(load);
    *n_mb = open;
    return CAPRL_OK;
}

/* ---- micro-batches ----------------------------------------------------------------------------------------- */

struct caprl_sft_batch {
    caprl_train_batch tb;
    int32_t          *tokens, *target, *seq_start, *grid_thw, *mrope_pos;
    float            *pixels;
    size_t            tok_cap, seq_cap, img_cap, pix_cap;
};

caprl_sft_batch *caprl_sft_batch_init(void) {
    return caprl_xcalloc(1, sizeof(caprl_sft_batch));
}

void caprl_sft_batch_free(caprl_sft_batch *b) {
    if (!b) {
        return;
    }
    free(b->tokens);
    free(b->target);
    free(b->seq_start);
    free(b->grid_thw);
    free(b->mrope_pos);
    free(b->pixels);
    free(b);
}

static void batch_reserve(caprl_sft_batch *b, size_t n_tok, size_t n_seq, size_t n_img) {
    if (n_tok > b->tok_cap) {
        b->tok_cap = n_tok;
        b->tokens = caprl_xrealloc(b->tokens, n_tok * sizeof(int32_t));
        b->target = caprl_xrealloc(b->target, n_tok * sizeof(int32_t));
        b->mrope_pos = caprl_xrealloc(b->mrope_pos, 3 * n_tok * sizeof(int32_t));
    }
    if (n_seq + 1 > b->seq_cap) {
        b->seq_cap = n_seq + 1;
        b->seq_start = caprl_xrealloc(b->seq_start, b->seq_cap * sizeof(int32_t));
    }
    if (n_img > b->img_cap) {
        b->img_cap = n_img;
        b->grid_thw = caprl_xrealloc(b->grid_thw, 3 * n_img * sizeof(int32_t));
    }
}

/* Decodes and preprocesses record i's image and appends its pixel_values (checked against the grid found at
 * load: a file replaced in between must not silently change the token count). */
static caprl_status append_pixels(caprl_sft_batch *b, const caprl_sft_data *d, int64_t i, int64_t *n_pix_rows,
                                  caprl_error *err) {
    caprl_image img;
    CAPRL_TRY(caprl_image_decode_file(d->images[i], &d->p.decode, &img, err));
    float       *pv = NULL;
    int64_t      np = 0;
    int32_t      grid[3];
    caprl_status st = caprl_image_preprocess(&img, &d->p.pp, &pv, &np, grid, err);
    caprl_image_free(&img);
    if (st != CAPRL_OK) {
        caprl_err_prefix(err, "%s", d->images[i]);
        return st;
    }
    const int32_t *want = d->grids + 3 * i;
    if (grid[0] != want[0] || grid[1] != want[1] || grid[2] != want[2]) {
        caprl_free(pv);
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: the image changed since the data was loaded", d->images[i]);
    }
    size_t dim = (size_t)3 * (size_t)d->p.pp.temporal_patch_size * (size_t)d->p.pp.patch_size *
                 (size_t)d->p.pp.patch_size;
    size_t need = ((size_t)*n_pix_rows + (size_t)np) * dim;
    if (need > b->pix_cap) {
        size_t cap = need + need / 2;
        float *grown = realloc(b->pixels, cap * sizeof(float)); /* images can make this large: a clean OOM */
        if (!grown) {
            caprl_free(pv);
            return caprl_err_set(err, CAPRL_ERR_OOM, "sft batch: cannot allocate %zu bytes of pixel_values",
                                 cap * sizeof(float));
        }
        b->pixels = grown;
        b->pix_cap = cap;
    }
    memcpy(b->pixels + (size_t)*n_pix_rows * dim, pv, (size_t)np * dim * sizeof(float));
    caprl_free(pv);
    *n_pix_rows += np;
    return CAPRL_OK;
}

/* M-RoPE rows of one sequence at [off, off + len) of the batch's (3, n_tokens) positions. */
static caprl_status sequence_mrope(caprl_sft_batch *b, const caprl_sft_data *d, int64_t i, int32_t off,
                                   int32_t n_total, caprl_error *err) {
    const caprl_sft_record *r = &d->recs[i];
    if (!d->images[i]) {
        for (int32_t t = 0; t < r->n_tokens; t++) {
            b->mrope_pos[off + t] = b->mrope_pos[n_total + off + t] = b->mrope_pos[2 * n_total + off + t] = t;
        }
        return CAPRL_OK;
    }
    caprl_vl_prompt p;
    CAPRL_TRY(caprl_vl_prompt_init(&p, d->tokens + d->tok_off[i], r->n_tokens, d->image_token_id, d->grids + 3 * i, 1,
                                   d->p.pp.merge_size, 0, err));
    CAPRL_ASSERT(p.n == r->n_tokens); /* the run was expanded at load */
    for (int32_t row = 0; row < 3; row++) {
        memcpy(b->mrope_pos + (size_t)row * (size_t)n_total + (size_t)off, p.mrope_pos + (size_t)row * (size_t)p.n,
               (size_t)p.n * sizeof(int32_t));
    }
    caprl_vl_prompt_free(&p);
    return CAPRL_OK;
}

caprl_status caprl_sft_batch_build(caprl_sft_batch *b, const caprl_sft_data *d, const int64_t *idx, int32_t n,
                                   const caprl_train_batch **batch, int64_t *n_loss, caprl_error *err) {
    if (!b || !d || !idx || n < 1 || !batch) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "sft batch: NULL argument or no records");
    }
    int64_t total = 0, n_img = 0;
    for (int32_t k = 0; k < n; k++) {
        CAPRL_ASSERT(idx[k] >= 0 && idx[k] < d->n);
        total += d->recs[idx[k]].n_tokens;
        n_img += d->images[idx[k]] ? 1 : 0;
    }
    if (total > INT32_MAX) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "sft batch: %lld tokens", (long long)total);
    }
    batch_reserve(b, (size_t)total, (size_t)n, (size_t)n_img);
    int32_t off = 0, img = 0;
    int64_t scored = 0, pix_rows = 0;
    for (int32_t k = 0; k < n; k++) {
        int64_t        i = idx[k];
        int32_t        len = d->recs[i].n_tokens;
        const int32_t *ids = d->tokens + d->tok_off[i];
        const uint8_t *mask = d->mask + d->tok_off[i];
        b->seq_start[k] = off;
        memcpy(b->tokens + off, ids, (size_t)len * sizeof(int32_t));
        for (int32_t t = 0; t < len; t++) {
            bool scored_here = t + 1 < len && mask[t + 1];
            b->target[off + t] = scored_here ? ids[t + 1] : -1;
            scored += scored_here;
        }
        if (d->images[i]) {
            memcpy(b->grid_thw + 3 * img, d->grids + 3 * i, 3 * sizeof(int32_t));
            img++;
            CAPRL_TRY(append_pixels(b, d, i, &pix_rows, err));
        }
        off += len;
    }
    b->seq_start[n] = off;
    if (n_img > 0) {
        for (int32_t k = 0; k < n; k++) {
            CAPRL_TRY(sequence_mrope(b, d, idx[k], b->seq_start[k], (int32_t)total, err));
        }
    }
    caprl_train_batch *tb = &b->tb;
    memset(tb, 0, sizeof *tb);
    tb->n_tokens = (int32_t)total;
    tb->tokens = b->tokens;
    tb->n_seqs = n;
    tb->seq_start = b->seq_start;
    tb->target = b->target;
    tb->n_images = (int32_t)n_img;
    tb->pixel_values = n_img ? b->pixels : NULL;
    tb->grid_thw = n_img ? b->grid_thw : NULL;
    tb->mrope_pos = n_img ? b->mrope_pos : NULL;
    *batch = tb;
    if (n_loss) {
        *n_loss = scored;
    }
    return CAPRL_OK;
}
