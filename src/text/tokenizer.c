/* Loading a Hugging Face tokenizer.json for the Qwen2 byte-level BPE (spec/qwen.md §5.1-§5.2), and the token
 * getters. The accepted configuration is exactly Qwen2's: NFC (or no) normalizer, the Qwen2 Split regex followed by
 * ByteLevel without its own regex, a BPE model without dropout, byte fallback, subword affixes or ignore_merges,
 * and a ByteLevel decoder. Anything else is an error naming the field, because encoding it differently from the
 * reference without saying so would corrupt every downstream result. The built tokenizer is immutable.
 * Encoding and decoding are in tok_codec.c. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "caprl/tokenizer.h"
#include "core/error_impl.h"
#include "core/file_impl.h"
#include "text/tokenizer_impl.h"

#define TOK_MAX_FILE_BYTES ((size_t)1 << 30)
#define TOK_MAX_ID         (1 << 24) /* ids beyond 16M are a corrupt file, not a vocabulary */

/* The pre-split regex of Qwen2 (spec/qwen.md §5.3), as the string tokenizer.json holds after JSON unescaping. */
static const char k_qwen2_regex[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                                    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";



/* ---- string -> id map --------------------------------------------------------------------------------------- */

static uint32_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 0xCBF29CE484222325ull; /* FNV-1a 64, folded */
    for (size_t i = 0; i < n; i++) {
        h = (h ^ (uint8_t)s[i]) * 0x100000001B3ull;
    }
    return (uint32_t)(h ^ (h >> 32));
}

static uint32_t pow2_at_least(size_t n) {
    uint32_t cap = 16;
    while (cap < n) {
        cap <<= 1;
    }
    return cap;
}

/* Zeroed table sized by the file's contents, or NULL with CAPRL_ERR_OOM in err: a big allocation may fail. */
static void *table_alloc(size_t count, size_t size, const char *name, const char *what, caprl_error *err) {
    void *p = caprl_try_calloc(count, size);
    if (p == NULL) {
        caprl_err_set(err, CAPRL_ERR_OOM, "%s: cannot allocate %zu x %zu bytes for %s", name, count, size, what);
    }
    return p;
}

static const char *tok_str(const caprl_tokenizer *t, int32_t id) {
    return t->strs + t->str_off[id];
}

static int32_t vocab_find(const caprl_tokenizer *t, const char *s, size_t n) {
    uint32_t h = hash_bytes(s, n);
    for (uint32_t i = h & t->vocab_mask;; i = (i + 1) & t->vocab_mask) {
        const caprl_vocab_slot *slot = &t->vocab_map[i];
        if (slot->id < 0) {
            return -1;
        }
        const char *str = tok_str(t, slot->id);
        if (slot->hash == h && memcmp(str, s, n) == 0 && str[n] == '\0') {
            return slot->id;
        }
    }
}

/* Inserts id under its string; the caller has checked that the string is not present. */
static void vocab_insert(caprl_tokenizer *t, int32_t id) {
    const char *s = tok_str(t, id);
    uint32_t    h = hash_bytes(s, strlen(s));
    uint32_t    i = h & t->vocab_mask;
    while (t->vocab_map[i].id >= 0) {
        i = (i + 1) & t->vocab_mask;
    }
    t->vocab_map[i].hash = h;
    t->vocab_map[i].id   = id;
}

/* Vocab (not added) id of s[0..n), or -1. */
static int32_t model_find(const caprl_tokenizer *t, const char *s, size_t n) {
    int32_t id = vocab_find(t, s, n);
    return id >= 0 && (t->flags[id] & CAPRL_TOK_VOCAB) ? id : -1;
}

/* ---- configuration checks ----------------------------------------------------------------------------------- */

/* jansson's object iteration takes a non-const json_t although it does not modify it. */
static json_t *iterable(const json_t *obj) {
    return (json_t *)(uintptr_t)obj;
}

static bool absent(const json_t *v) {
    return v == NULL || json_is_null(v);
}

/* Fails unless every key of obj is in allowed (NULL-terminated): an unknown setting may change the encoding. */
static caprl_status check_keys(const json_t *obj, const char *const *allowed, const char *name, const char *where,
                               caprl_error *err) {
    const char *key;
    json_t     *value;
    json_object_foreach(iterable(obj), key, value) {
        (void)value;
        bool known = false;
        for (size_t i = 0; allowed[i] && !known; i++) {
            known = strcmp(key, allowed[i]) == 0;
        }
        if (!known) {
            return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: %s.%s: unknown setting", name, where, key);
        }
    }
    return CAPRL_OK;
}

/* obj must be an object whose "type" is the string want. */
static caprl_status check_type(const json_t *obj, const char *want, const char *name, const char *where,
                               caprl_error *err) {
    if (!json_is_object(obj)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: %s: expected an object", name, where);
    }
    const json_t *type = json_object_get(obj, "type");
    if (!json_is_string(type)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: %s.type: expected a string", name, where);
    }
    if (strcmp(json_string_value(type), want) != 0) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: %s.type \"%.64s\" is not supported (expected \"%s\")",
                             name, where, json_string_value(type), want);
    }
    return CAPRL_OK;
}

/* Optional boolean field; want < 0 accepts either value, else the value must be want. */
static caprl_status check_bool(const json_t *obj, const char *key, int want, const char *name, const char *where,
                               caprl_error *err) {
    const json_t *v = json_object_get(obj, key);
    if (v == NULL) {
        return CAPRL_OK;
    }
    if (!json_is_boolean(v)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: %s.%s: expected true or false", name, where, key);
    }
    if (want >= 0 && json_is_true(v) != (want != 0)) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: %s.%s: %s is not supported", name, where, key,
                             json_is_true(v) ? "true" : "false");
    }
    return CAPRL_OK;
}

/* A ByteLevel post-processor or decoder: its flags only concern offsets and prefix spaces, not the bytes. */
static caprl_status check_byte_level(const json_t *obj, const char *name, const char *where, caprl_error *err) {
    static const char *const keys[] = {"type", "add_prefix_space", "trim_offsets", "use_regex", NULL};
    CAPRL_TRY(check_type(obj, "ByteLevel", name, where, err));
    CAPRL_TRY(check_keys(obj, keys, name, where, err));
    CAPRL_TRY(check_bool(obj, "add_prefix_space", -1, name, where, err));
    CAPRL_TRY(check_bool(obj, "trim_offsets", -1, name, where, err));
    return check_bool(obj, "use_regex", -1, name, where, err);
}

static caprl_status check_pre_tokenizer(const json_t *pre, const char *name, caprl_error *err) {
    static const char *const seq_keys[]   = {"type", "pretokenizers", NULL};
    static const char *const split_keys[] = {"type", "pattern", "behavior", "invert", NULL};
    static const char *const pat_keys[]   = {"Regex", NULL};
    static const char *const bl_keys[]    = {"type", "add_prefix_space", "trim_offsets", "use_regex", NULL};
    if (absent(pre)) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: pre_tokenizer: missing (expected Qwen2's Split + "
                             "ByteLevel sequence)", name);
    }
    CAPRL_TRY(check_type(pre, "Sequence", name, "pre_tokenizer", err));
    CAPRL_TRY(check_keys(pre, seq_keys, name, "pre_tokenizer", err));
    const json_t *list = json_object_get(pre, "pretokenizers");
    if (!json_is_array(list) || json_array_size(list) != 2) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: pre_tokenizer.pretokenizers: expected [Split, ByteLevel]",
                             name);
    }
    const char   *w0    = "pre_tokenizer.pretokenizers[0]";
    const json_t *split = json_array_get(list, 0);
    CAPRL_TRY(check_type(split, "Split", name, w0, err));
    CAPRL_TRY(check_keys(split, split_keys, name, w0, err));
    const json_t *pattern = json_object_get(split, "pattern");
    if (!json_is_object(pattern)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: %s.pattern: expected an object", name, w0);
    }
    CAPRL_TRY(check_keys(pattern, pat_keys, name, "pre_tokenizer.pretokenizers[0].pattern", err));
    const json_t *regex = json_object_get(pattern, "Regex");
    if (!json_is_string(regex) || strcmp(json_string_value(regex), k_qwen2_regex) != 0) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: %s.pattern.Regex: not Qwen2's pre-split regex", name, w0);
    }
    const json_t *behavior = json_object_get(split, "behavior");
    if (!json_is_string(behavior) || strcmp(json_string_value(behavior), "Isolated") != 0) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: %s.behavior: only \"Isolated\" is supported", name, w0);
    }
    CAPRL_TRY(check_bool(split, "invert", 0, name, w0, err));
    const char   *w1 = "pre_tokenizer.pretokenizers[1]";
    const json_t *bl = json_array_get(list, 1);
    CAPRL_TRY(check_type(bl, "ByteLevel", name, w1, err));
    CAPRL_TRY(check_keys(bl, bl_keys, name, w1, err));
    CAPRL_TRY(check_bool(bl, "add_prefix_space", 0, name, w1, err));
    CAPRL_TRY(check_bool(bl, "trim_offsets", -1, name, w1, err));
    return check_bool(bl, "use_regex", 0, name, w1, err);
}

static caprl_status check_model(const json_t *model, const char *name, caprl_error *err) {
    static const char *const keys[] = {"type",     "dropout",      "unk_token",     "continuing_subword_prefix",
                                       "end_of_word_suffix", "fuse_unk", "byte_fallback", "ignore_merges",
                                       "vocab",    "merges",       NULL};
    if (model == NULL) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model: missing", name);
    }
    CAPRL_TRY(check_type(model, "BPE", name, "model", err));
    CAPRL_TRY(check_keys(model, keys, name, "model", err));
    if (!absent(json_object_get(model, "dropout"))) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: model.dropout: only null is supported", name);
    }
    /* unk_token is never used: every byte has a token (checked in load_byte_ids), so nothing is unknown. */
    const json_t *unk = json_object_get(model, "unk_token");
    if (!absent(unk) && !json_is_string(unk)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.unk_token: expected a string or null", name);
    }
    static const char *const affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t i = 0; i < 2; i++) {
        const json_t *v = json_object_get(model, affixes[i]);
        if (!absent(v) && !(json_is_string(v) && json_string_length(v) == 0)) {
            return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: model.%s: only \"\" or null is supported", name,
                                 affixes[i]);
        }
    }
    CAPRL_TRY(check_bool(model, "fuse_unk", -1, name, "model", err));
    CAPRL_TRY(check_bool(model, "byte_fallback", 0, name, "model", err));
    CAPRL_TRY(check_bool(model, "ignore_merges", 0, name, "model", err));
    if (!json_is_object(json_object_get(model, "vocab"))) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.vocab: expected an object", name);
    }
    if (!json_is_array(json_object_get(model, "merges"))) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.merges: expected an array", name);
    }
    return CAPRL_OK;
}

static caprl_status check_config(caprl_tokenizer *t, const json_t *root, const char *name, caprl_error *err) {
    /* truncation and padding are reset by transformers before every call and never apply to plain encoding
     * (spec/qwen.md §5.1), so any value is accepted. */
    static const char *const keys[] = {"version",        "truncation", "padding", "added_tokens", "normalizer",
                                       "pre_tokenizer", "post_processor", "decoder", "model", NULL};
    static const char *const norm_keys[] = {"type", NULL};
    if (!json_is_object(root)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: expected a JSON object at the top level", name);
    }
    CAPRL_TRY(check_keys(root, keys, name, "(top level)", err));
    const json_t *norm = json_object_get(root, "normalizer");
    if (!absent(norm)) {
        CAPRL_TRY(check_type(norm, "NFC", name, "normalizer", err));
        CAPRL_TRY(check_keys(norm, norm_keys, name, "normalizer", err));
        t->nfc = true;
    }
    CAPRL_TRY(check_pre_tokenizer(json_object_get(root, "pre_tokenizer"), name, err));
    const json_t *post = json_object_get(root, "post_processor");
    if (!absent(post)) {
        CAPRL_TRY(check_byte_level(post, name, "post_processor", err));
    }
    const json_t *dec = json_object_get(root, "decoder");
    if (absent(dec)) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: decoder: missing (expected ByteLevel)", name);
    }
    CAPRL_TRY(check_byte_level(dec, name, "decoder", err));
    return check_model(json_object_get(root, "model"), name, err);
}

/* ---- tokens ------------------------------------------------------------------------------------------------- */

/* Checks one added_tokens entry; sets its id, content and flags. */
static caprl_status check_added(const json_t *a, size_t i, const char *name, int64_t *id, const char **content,
                                bool *special, bool *normalized, caprl_error *err) {
    static const char *const keys[] = {"id", "content", "single_word", "lstrip", "rstrip", "normalized", "special",
                                       NULL};
    char where[48];
    snprintf(where, sizeof where, "added_tokens[%zu]", i);
    if (!json_is_object(a)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: %s: expected an object", name, where);
    }
    CAPRL_TRY(check_keys(a, keys, name, where, err));
    const json_t *jid = json_object_get(a, "id"), *jc = json_object_get(a, "content");
    if (!json_is_integer(jid) || json_integer_value(jid) < 0 || json_integer_value(jid) >= TOK_MAX_ID) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: %s.id: expected an integer in [0, %d)", name, where,
                             TOK_MAX_ID);
    }
    if (!json_is_string(jc) || json_string_length(jc) == 0) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: %s.content: expected a non-empty string", name, where);
    }
    /* lstrip, rstrip and single_word change where a token matches; Qwen uses none of them. */
    CAPRL_TRY(check_bool(a, "single_word", 0, name, where, err));
    CAPRL_TRY(check_bool(a, "lstrip", 0, name, where, err));
    CAPRL_TRY(check_bool(a, "rstrip", 0, name, where, err));
    CAPRL_TRY(check_bool(a, "normalized", -1, name, where, err));
    CAPRL_TRY(check_bool(a, "special", -1, name, where, err));
    *id      = json_integer_value(jid);
    *content = json_string_value(jc);
    *special = json_is_true(json_object_get(a, "special"));
    /* Hugging Face's default: added tokens are normalized unless special. */
    const json_t *jn = json_object_get(a, "normalized");
    *normalized      = jn ? json_is_true(jn) : !*special;
    return CAPRL_OK;
}

/* Sizes the tables: the largest id and the total string bytes over vocab and added tokens. */
static caprl_status scan_tokens(const json_t *vocab, const json_t *added, const char *name, int64_t *max_id,
                                size_t *str_bytes, caprl_error *err) {
    const char *key;
    json_t     *value;
    *max_id    = -1;
    *str_bytes = 0;
    json_object_foreach(iterable(vocab), key, value) {
        if (!json_is_integer(value) || json_integer_value(value) < 0 || json_integer_value(value) >= TOK_MAX_ID) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.vocab[\"%.64s\"]: expected an integer id in [0, %d)",
                                 name, key, TOK_MAX_ID);
        }
        *max_id = json_integer_value(value) > *max_id ? json_integer_value(value) : *max_id;
        *str_bytes += strlen(key) + 1;
    }
    for (size_t i = 0; i < json_array_size(added); i++) {
        int64_t     id;
        const char *content;
        bool        special, normalized;
        CAPRL_TRY(check_added(json_array_get(added, i), i, name, &id, &content, &special, &normalized, err));
        *max_id = id > *max_id ? id : *max_id;
        *str_bytes += strlen(content) + 1;
    }
    if (*max_id < 0) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.vocab: empty", name);
    }
    if (*str_bytes >= UINT32_MAX) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.vocab: token strings exceed 4 GiB", name);
    }
    return CAPRL_OK;
}

static caprl_status load_tokens(caprl_tokenizer *t, const json_t *vocab, const json_t *added, const char *name,
                                caprl_error *err) {
    if (!absent(added) && !json_is_array(added)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: added_tokens: expected an array", name);
    }
    int64_t max_id;
    size_t  str_bytes;
    CAPRL_TRY(scan_tokens(vocab, added, name, &max_id, &str_bytes, err));
    t->n_tokens = (int32_t)(max_id + 1);
    t->flags = table_alloc((size_t)t->n_tokens, 1, name, "token flags", err);
    if (t->flags == NULL) {
        return CAPRL_ERR_OOM;
    }
    t->str_off = table_alloc((size_t)t->n_tokens, sizeof *t->str_off, name, "token offsets", err);
    if (t->str_off == NULL) {
        return CAPRL_ERR_OOM;
    }
    t->strs = table_alloc(str_bytes + 1, 1, name, "token strings", err);
    if (t->strs == NULL) {
        return CAPRL_ERR_OOM;
    }
    size_t used = 0;

    const char *key;
    json_t     *value;
    json_object_foreach(iterable(vocab), key, value) {
        int32_t id = (int32_t)json_integer_value(value);
        if (t->flags[id]) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.vocab: id %d is used by \"%.64s\" and \"%.64s\"",
                                 name, id, tok_str(t, id), key);
        }
        size_t len = strlen(key);
        memcpy(t->strs + used, key, len + 1);
        t->str_off[id] = (uint32_t)used;
        t->flags[id]   = CAPRL_TOK_VOCAB;
        used += len + 1;
    }
    size_t n_vocab = json_object_size(vocab), n_added = json_array_size(added);
    t->vocab_mask  = pow2_at_least(2 * (n_vocab + n_added)) - 1;
    t->vocab_map = table_alloc((size_t)t->vocab_mask + 1, sizeof *t->vocab_map, name, "the vocab map", err);
    if (t->vocab_map == NULL) {
        return CAPRL_ERR_OOM;
    }
    memset(t->vocab_map, 0xFF, ((size_t)t->vocab_mask + 1) * sizeof *t->vocab_map); /* id -1: empty */
    for (int32_t id = 0; id < t->n_tokens; id++) {
        if (t->flags[id]) {
            vocab_insert(t, id);
        }
    }
    for (size_t i = 0; i < n_added; i++) {
        int64_t     id64;
        const char *content;
        bool        special, normalized;
        CAPRL_TRY(check_added(json_array_get(added, i), i, name, &id64, &content, &special, &normalized, err));
        int32_t id = (int32_t)id64, have = vocab_find(t, content, strlen(content));
        if (t->flags[id] & CAPRL_TOK_ADDED) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: added_tokens[%zu]: id %d appears twice", name, i, id);
        }
        if ((have >= 0 && have != id) || (have < 0 && t->flags[id])) {
            /* Hugging Face gives an added token that is also a vocab entry the vocab id; anything else is corrupt. */
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: added_tokens[%zu] (\"%.64s\", id %d) conflicts with "
                                 "the vocab token \"%.64s\"", name, i, content, id,
                                 have >= 0 ? tok_str(t, have) : tok_str(t, id));
        }
        if (have < 0) {
            size_t len = strlen(content);
            memcpy(t->strs + used, content, len + 1);
            t->str_off[id] = (uint32_t)used;
            used += len + 1;
            t->flags[id] = CAPRL_TOK_ADDED;
            vocab_insert(t, id);
        }
        t->flags[id] |= (uint8_t)(CAPRL_TOK_ADDED | (special ? CAPRL_TOK_SPECIAL : 0));
    }
    return CAPRL_OK;
}

static caprl_status load_byte_ids(caprl_tokenizer *t, const char *name, caprl_error *err) {
    for (uint32_t b = 0; b < 256; b++) {
        uint8_t buf[4];
        size_t  n    = caprl_utf8_put(caprl_byte_level_cp(b), buf);
        t->byte_id[b] = model_find(t, (const char *)buf, n);
        if (t->byte_id[b] < 0) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.vocab: no token for byte 0x%02X (\"%.*s\"); not "
                                 "a byte-level vocabulary", name, b, (int)n, (const char *)buf);
        }
    }
    return CAPRL_OK;
}

/* ---- merges ------------------------------------------------------------------------------------------------- */

/* The two symbols of merge i: a string "left right" (one U+0020; byte-level symbols never contain a space) or a
 * pair ["left", "right"]. */
static caprl_status merge_parts(const json_t *m, size_t i, const char *name, const char **a, size_t *na,
                                const char **b, size_t *nb, caprl_error *err) {
    if (json_is_string(m)) {
        const char *s  = json_string_value(m);
        const char *sp = strchr(s, ' ');
        if (sp == NULL || strchr(sp + 1, ' ') != NULL) {
            return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.merges[%zu]: \"%.64s\" is not two symbols "
                                 "separated by one space", name, i, s);
        }
        *a  = s;
        *na = (size_t)(sp - s);
        *b  = sp + 1;
        *nb = strlen(sp + 1);
        return CAPRL_OK;
    }
    if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
        json_is_string(json_array_get(m, 1))) {
        *a  = json_string_value(json_array_get(m, 0));
        *na = json_string_length(json_array_get(m, 0));
        *b  = json_string_value(json_array_get(m, 1));
        *nb = json_string_length(json_array_get(m, 1));
        return CAPRL_OK;
    }
    return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.merges[%zu]: expected \"a b\" or [\"a\", \"b\"]", name, i);
}

/* Resolves merge i to (left id, right id, result id); cat is scratch for the concatenation. */
static caprl_status resolve_merge(const caprl_tokenizer *t, const json_t *m, size_t i, const char *name, char **cat,
                                  size_t *cat_cap, int32_t ids[3], caprl_error *err) {
    const char *a = NULL, *b = NULL;
    size_t      na = 0, nb = 0;
    CAPRL_TRY(merge_parts(m, i, name, &a, &na, &b, &nb, err));
    ids[0] = model_find(t, a, na);
    ids[1] = model_find(t, b, nb);
    if (ids[0] < 0 || ids[1] < 0) {
        const char *bad = ids[0] < 0 ? a : b;
        size_t      nbad = ids[0] < 0 ? na : nb;
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.merges[%zu]: symbol \"%.*s\" is not in model.vocab",
                             name, i, (int)(nbad < 64 ? nbad : 64), bad);
    }
    if (na + nb > *cat_cap) {
        *cat_cap = 2 * (na + nb);
        *cat     = caprl_xrealloc(*cat, *cat_cap);
    }
    memcpy(*cat, a, na);
    memcpy(*cat + na, b, nb);
    ids[2] = model_find(t, *cat, na + nb);
    if (ids[2] < 0) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.merges[%zu]: result \"%.*s\" is not in model.vocab",
                             name, i, (int)(na + nb < 64 ? na + nb : 64), *cat);
    }
    return CAPRL_OK;
}

static caprl_status load_merges(caprl_tokenizer *t, const json_t *merges, const char *name, caprl_error *err) {
    size_t n = json_array_size(merges);
    if (n >= UINT32_MAX / 2) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: model.merges: %zu entries is too many", name, n);
    }
    /* Load factor below 0.6 keeps linear probing short; 151k merges fit 262k slots (4 MiB). */
    t->merge_mask = pow2_at_least(n + n / 2 + 1) - 1;
    t->merge_map = table_alloc((size_t)t->merge_mask + 1, sizeof *t->merge_map, name, "the merge map", err);
    if (t->merge_map == NULL) {
        return CAPRL_ERR_OOM;
    }
    memset(t->merge_map, 0xFF, ((size_t)t->merge_mask + 1) * sizeof *t->merge_map); /* key UINT64_MAX: empty */
    char        *cat     = NULL;
    size_t       cat_cap = 0;
    caprl_status st      = CAPRL_OK;
    for (size_t i = 0; i < n && st == CAPRL_OK; i++) {
        int32_t ids[3] = {-1, -1, -1};
        st = resolve_merge(t, json_array_get(merges, i), i, name, &cat, &cat_cap, ids, err);
        if (st != CAPRL_OK) {
            break;
        }
        /* A repeated pair keeps its last rank, as Hugging Face's merge map does. */
        uint64_t key = ((uint64_t)(uint32_t)ids[0] << 32) | (uint32_t)ids[1];
        uint32_t j   = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & t->merge_mask;
        while (t->merge_map[j].key != UINT64_MAX && t->merge_map[j].key != key) {
            j = (j + 1) & t->merge_mask;
        }
        t->merge_map[j].key    = key;
        t->merge_map[j].rank   = (uint32_t)i;
        t->merge_map[j].result = ids[2];
    }
    free(cat);
    return st;
}

/* ---- decoding table and added-token matchers ---------------------------------------------------------------- */

/* Bytes each token decodes to (spec/qwen.md §5.6): through the inverse byte map if every character of the string
 * is in it, else the string's own UTF-8 (the rule of Hugging Face's ByteLevel decoder, added tokens included). */
static caprl_status build_bytes(caprl_tokenizer *t, const char *name, caprl_error *err) {
    int16_t inv[0x144];
    for (size_t i = 0; i < 0x144; i++) {
        inv[i] = -1;
    }
    for (uint32_t b = 0; b < 256; b++) {
        inv[caprl_byte_level_cp(b)] = (int16_t)b;
    }
    size_t total = 0;
    for (int32_t id = 0; id < t->n_tokens; id++) {
        total += t->flags[id] ? strlen(tok_str(t, id)) : 0;
    }
    t->bytes = table_alloc(total + 1, 1, name, "token bytes", err);
    if (t->bytes == NULL) {
        return CAPRL_ERR_OOM;
    }
    t->bytes_off = table_alloc((size_t)t->n_tokens + 1, sizeof *t->bytes_off, name, "token byte offsets", err);
    if (t->bytes_off == NULL) {
        return CAPRL_ERR_OOM;
    }
    uint32_t o   = 0;
    for (int32_t id = 0; id < t->n_tokens; id++) {
        t->bytes_off[id] = o;
        if (!t->flags[id]) {
            continue;
        }
        const uint8_t *s = (const uint8_t *)tok_str(t, id);
        size_t         n = strlen((const char *)s), i = 0;
        uint32_t       start = o;
        while (i < n) {
            utf8proc_int32_t cp;
            utf8proc_ssize_t len = utf8proc_iterate(s + i, (utf8proc_ssize_t)(n - i), &cp);
            if (len <= 0 || cp >= 0x144 || inv[cp] < 0) {
                break;
            }
            t->bytes[o++] = (uint8_t)inv[cp];
            i += (size_t)len;
        }
        if (i < n) {
            o = start;
            memcpy(t->bytes + o, s, n);
            o += (uint32_t)n;
        }
    }
    t->bytes_off[t->n_tokens] = o;
    return CAPRL_OK;
}

static int compare_patterns(const void *pa, const void *pb) {
    const caprl_added_pattern *a = pa, *b = pb;
    uint8_t                    fa = (uint8_t)a->text[0], fb = (uint8_t)b->text[0];
    if (fa != fb) {
        return fa < fb ? -1 : 1;
    }
    if (a->len != b->len) {
        return a->len > b->len ? -1 : 1; /* longest first: leftmost-longest matching */
    }
    return memcmp(a->text, b->text, a->len);
}

static void build_matcher(caprl_added_matcher *m) {
    qsort(m->pat, (size_t)m->n, sizeof *m->pat, compare_patterns);
    uint32_t k = 0;
    for (uint32_t b = 0; b < 256; b++) {
        m->first[b] = k;
        while (k < (uint32_t)m->n && (uint8_t)m->pat[k].text[0] == b) {
            k++;
        }
    }
    m->first[256] = k;
}

/* NFC of s as a fresh malloc'd string (utf8proc's), or NULL on failure. */
static char *nfc_dup(const char *s, size_t *len) {
    utf8proc_uint8_t *out = NULL;
    utf8proc_ssize_t  n   = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)strlen(s), &out,
                                         (utf8proc_option_t)(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (n < 0) {
        free(out);
        return NULL;
    }
    *len = (size_t)n;
    return (char *)out;
}

static caprl_status build_matchers(caprl_tokenizer *t, const json_t *added, const char *name, caprl_error *err) {
    size_t n     = json_array_size(added);
    t->raw.pat   = caprl_xcalloc(n + 1, sizeof *t->raw.pat);
    t->norm.pat  = caprl_xcalloc(n + 1, sizeof *t->norm.pat);
    char  **nfc  = caprl_xcalloc(n + 1, sizeof *nfc);
    size_t *lens = caprl_xcalloc(n + 1, sizeof *lens);
    /* "normalized" tokens match the normalized text, so they are matched by their own NFC form. */
    size_t       norm_bytes = 0;
    caprl_status st         = CAPRL_OK;
    for (size_t i = 0; i < n && st == CAPRL_OK; i++) {
        int64_t     id;
        const char *content;
        bool        special, normalized;
        st = check_added(json_array_get(added, i), i, name, &id, &content, &special, &normalized, err);
        if (st == CAPRL_OK && normalized && t->nfc) {
            nfc[i] = nfc_dup(content, &lens[i]);
            if (nfc[i] == NULL) {
                st = caprl_err_set(err, CAPRL_ERR_OOM, "%s: added_tokens[%zu]: NFC of the content failed", name, i);
            }
            norm_bytes += lens[i] + 1;
        }
    }
    if (st == CAPRL_OK) {
        t->norm_strs = caprl_xmalloc(norm_bytes + 1);
        size_t used  = 0;
        for (size_t i = 0; i < n; i++) {
            int64_t     id;
            const char *content;
            bool        special, normalized;
            st = check_added(json_array_get(added, i), i, name, &id, &content, &special, &normalized, err);
            CAPRL_ASSERT(st == CAPRL_OK); /* the first pass checked it */
            caprl_added_pattern p = {.text = tok_str(t, (int32_t)id), .id = (int32_t)id, .special = special};
            if (nfc[i] != NULL) {
                memcpy(t->norm_strs + used, nfc[i], lens[i] + 1);
                p.text = t->norm_strs + used;
                used += lens[i] + 1;
            }
            p.len                  = (uint32_t)strlen(p.text);
            caprl_added_matcher *m = normalized ? &t->norm : &t->raw;
            m->pat[m->n++]         = p;
        }
        build_matcher(&t->raw);
        build_matcher(&t->norm);
    }
    for (size_t i = 0; i < n; i++) {
        free(nfc[i]);
    }
    free(nfc);
    free(lens);
    return st;
}

/* ---- public API --------------------------------------------------------------------------------------------- */

static caprl_status build(caprl_tokenizer *t, const json_t *root, const char *name, caprl_error *err) {
    CAPRL_TRY(check_config(t, root, name, err));
    const json_t *model = json_object_get(root, "model");
    const json_t *added = json_object_get(root, "added_tokens");
    CAPRL_TRY(load_tokens(t, json_object_get(model, "vocab"), added, name, err));
    CAPRL_TRY(load_byte_ids(t, name, err));
    CAPRL_TRY(load_merges(t, json_object_get(model, "merges"), name, err));
    CAPRL_TRY(build_bytes(t, name, err));
    return build_matchers(t, added, name, err);
}

caprl_status caprl_tokenizer_load_buffer(caprl_tokenizer **out, const char *json, size_t n, const char *name,
                                         caprl_error *err) {
    if (out == NULL || (json == NULL && n > 0)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_tokenizer_load_buffer: NULL argument");
    }
    *out = NULL;
    name = name ? name : "tokenizer.json";
    json_error_t jerr;
    json_t      *root = json_loadb(json ? json : "", n, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s:%d:%d: %s", name, jerr.line, jerr.column, jerr.text);
    }
    caprl_tokenizer *t  = caprl_xcalloc(1, sizeof *t);
    caprl_status     st = build(t, root, name, err);
    json_decref(root);
    if (st != CAPRL_OK) {
        caprl_tokenizer_free(t);
        return st;
    }
    *out = t;
    return CAPRL_OK;
}

caprl_status caprl_tokenizer_load(caprl_tokenizer **out, const char *path, caprl_error *err) {
    if (out == NULL || path == NULL) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_tokenizer_load: NULL argument");
    }
    *out = NULL;
    uint8_t *data;
    size_t   size;
    CAPRL_TRY(caprl_file_read_all(path, TOK_MAX_FILE_BYTES, &data, &size, err));
    caprl_status st = caprl_tokenizer_load_buffer(out, (const char *)data, size, path, err);
    free(data);
    return st;
}

void caprl_tokenizer_free(caprl_tokenizer *tok) {
    if (tok == NULL) {
        return;
    }
    free(tok->flags);
    free(tok->strs);
    free(tok->str_off);
    free(tok->bytes);
    free(tok->bytes_off);
    free(tok->vocab_map);
    free(tok->merge_map);
    free(tok->raw.pat);
    free(tok->norm.pat);
    free(tok->norm_strs);
    free(tok);
}

int32_t caprl_tokenizer_n_tokens(const caprl_tokenizer *tok) {
    return tok ? tok->n_tokens : 0;
}

const char *caprl_tokenizer_token_str(const caprl_tokenizer *tok, int32_t id) {
    if (tok == NULL || id < 0 || id >= tok->n_tokens || !tok->flags[id]) {
        return NULL;
    }
    return tok_str(tok, id);
}

int32_t caprl_tokenizer_token_id(const caprl_tokenizer *tok, const char *str) {
    if (tok == NULL || str == NULL) {
        return -1;
    }
    return vocab_find(tok, str, strlen(str));
}

bool caprl_tokenizer_is_special(const caprl_tokenizer *tok, int32_t id) {
    return tok != NULL && id >= 0 && id < tok->n_tokens && (tok->flags[id] & CAPRL_TOK_SPECIAL) != 0;
}
