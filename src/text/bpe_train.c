/* Training a byte-level BPE tokenizer and writing it as a Hugging Face tokenizer.json shaped like Qwen2's
 * (spec/qwen.md §5): NFC normalizer, the Qwen2 Split regex + ByteLevel pre-tokenizer, ByteLevel post-processor and
 * decoder, a BPE model whose vocab starts with the 256 byte-level symbols, and added tokens after the vocab.
 *
 * The corpus goes through exactly the steps encoding takes (tok_codec.c), so training and encoding see the same
 * pieces: added tokens are cut out of the raw text (leftmost-longest), each remaining segment is NFC-normalized and
 * pre-split by the same matcher (pretok.c), and every piece is a "word" counted in a dictionary.
 *
 * Training is the classic BPE loop over the word counts: merge the most frequent adjacent pair, everywhere, left to
 * right without overlaps; repeat. Pair counts are kept incrementally: every pair records the words it occurs in,
 * a merge rewrites only those words and adjusts the counts of the pairs next to each rewritten occurrence. A
 * max-heap holds (count, pair); counts only fall for pairs that already exist, so an entry whose count is out of
 * date is re-pushed with the current count when it reaches the top (lazy deletion), and pairs whose count rose are
 * pushed once per merge.
 *
 * Tie-breaking (documented in caprl/tokenizer.h): the highest count, then the pair whose left token's bytes come
 * first in byte order (a shorter prefix first), then the same for the right token. Distinct tokens have distinct
 * bytes, so this is a total order and the result does not depend on hash-table or word order.
 *
 * A merge whose concatenation equals an existing token reuses that token's id (as Hugging Face's trainer does), so
 * the vocab never holds a string twice. The state is per call: concurrent calls are safe. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "caprl/tokenizer.h"
#include "core/error_impl.h"
#include "text/tokenizer_impl.h"

#define BPE_MAX_VOCAB      (1 << 24) /* the loader's limit on ids */
#define BPE_MAX_ADDED_LEN  1024      /* bytes of one added token's content */
#define BPE_NFC_CHUNK      65536     /* NFC is applied to chunks of about this many bytes */

/* The pre-split regex of Qwen2 (spec/qwen.md §5.3) as tokenizer.json holds it after JSON unescaping; the loader
 * accepts exactly this string, which the tests check by loading every trained file. */
static const char k_qwen2_regex[] = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
                                    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/* Qwen2's added tokens in id order, with their "special" flags (spec/qwen.md §5.2). */
static const struct {
    const char *content;
    bool        special;
} k_qwen_added[] = {
    {"<|endoftext|>", true},      {"<|im_start|>", true},     {"<|im_end|>", true},     {"<|object_ref_start|>", true},
    {"<|object_ref_end|>", true}, {"<|box_start|>", true},    {"<|box_end|>", true},    {"<|quad_start|>", true},
    {"<|quad_end|>", true},       {"<|vision_start|>", true}, {"<|vision_end|>", true}, {"<|vision_pad|>", true},
    {"<|image_pad|>", true},      {"<|video_pad|>", true},    {"<tool_call>", false},   {"</tool_call>", false},
    {"<|fim_prefix|>", false},    {"<|fim_middle|>", false},  {"<|fim_suffix|>", false}, {"<|fim_pad|>", false},
    {"<|repo_name|>", false},     {"<|file_sep|>", false},
};

caprl_bpe_train_params caprl_bpe_train_default_params(void) {
    return (caprl_bpe_train_params){
        .vocab_size = 32000, .min_frequency = 2, .qwen_added = true, .specials = NULL, .n_specials = 0};
}



/* ---- growable arrays ---------------------------------------------------------------------------------------- */

/* Returns p grown to hold at least need elements of elem bytes (by 1.5x), or NULL with p and *cap unchanged. */
static void *grow(void *p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) {
        return p;
    }
    size_t n = *cap < 16 ? 16 : *cap;
    while (n < need) {
        n += n / 2;
    }
    if (n > SIZE_MAX / elem) {
        return NULL;
    }
    void *q = realloc(p, n * elem);
    if (q != NULL) {
        *cap = n;
    }
    return q;
}

static caprl_status oom(caprl_error *err, const char *name, const char *what) {
    return caprl_err_set(err, CAPRL_ERR_OOM, "%s: out of memory for %s", name, what);
}

/* ---- interned byte strings (the words of the corpus; the tokens) -------------------------------------------- */

typedef struct strtab {
    uint8_t  *bytes; /* all strings, back to back */
    size_t    n_bytes, cap_bytes;
    size_t   *off;   /* (cap) string i is bytes[off[i] .. off[i] + len[i]) */
    uint32_t *len;   /* (cap) */
    uint32_t *hash;  /* (cap) */
    size_t    cap;
    int32_t   n;
    int32_t  *slots; /* (mask + 1) open addressing, linear probing; -1 is empty */
    uint32_t  mask;
} strtab;

static void strtab_free(strtab *s) {
    free(s->bytes);
    free(s->off);
    free(s->len);
    free(s->hash);
    free(s->slots);
    memset(s, 0, sizeof *s);
}

static uint32_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 0xCBF29CE484222325ull; /* FNV-1a 64, folded */
    for (size_t i = 0; i < n; i++) {
        h = (h ^ p[i]) * 0x100000001B3ull;
    }
    return (uint32_t)(h ^ (h >> 32));
}

static const uint8_t *strtab_str(const strtab *s, int32_t i) {
    return s->bytes + s->off[i];
}

/* The slot of p[0..n) (hash h): the slot holding it, or the empty slot where it would go. */
static uint32_t strtab_slot(const strtab *s, const uint8_t *p, size_t n, uint32_t h) {
    for (uint32_t i = h & s->mask;; i = (i + 1) & s->mask) {
        int32_t k = s->slots[i];
        if (k < 0 || (s->hash[k] == h && s->len[k] == n && memcmp(strtab_str(s, k), p, n) == 0)) {
            return i;
        }
    }
}

static int32_t strtab_find(const strtab *s, const uint8_t *p, size_t n) {
    if (s->slots == NULL) {
        return -1;
    }
    return s->slots[strtab_slot(s, p, n, hash_bytes(p, n))];
}

static caprl_status strtab_rehash(strtab *s, uint32_t n_slots, const char *name, caprl_error *err) {
    int32_t *slots = caprl_try_malloc((size_t)n_slots * sizeof *slots);
    if (slots == NULL) {
        return oom(err, name, "a hash table");
    }
    memset(slots, 0xFF, (size_t)n_slots * sizeof *slots);
    free(s->slots);
    s->slots = slots;
    s->mask  = n_slots - 1;
    for (int32_t k = 0; k < s->n; k++) {
        uint32_t i = s->hash[k] & s->mask;
        while (s->slots[i] >= 0) {
            i = (i + 1) & s->mask;
        }
        s->slots[i] = k;
    }
    return CAPRL_OK;
}

/* Room for at least need strings (the three per-string arrays share one capacity). */
static caprl_status strtab_reserve(strtab *s, size_t need, const char *name, caprl_error *err) {
    size_t cap = s->cap < 16 ? 16 : s->cap;
    while (cap < need) {
        cap += cap / 2;
    }
    size_t   *off  = realloc(s->off, cap * sizeof *off);
    if (off != NULL) {
        s->off = off;
    }
    uint32_t *len  = realloc(s->len, cap * sizeof *len);
    if (len != NULL) {
        s->len = len;
    }
    uint32_t *hash = realloc(s->hash, cap * sizeof *hash);
    if (hash != NULL) {
        s->hash = hash;
    }
    if (off == NULL || len == NULL || hash == NULL) {
        return oom(err, name, "a string table");
    }
    s->cap = cap;
    return CAPRL_OK;
}

/* Index of p[0..n), adding it if new (*added tells which). */
static caprl_status strtab_intern(strtab *s, const uint8_t *p, size_t n, int32_t *idx, bool *added, const char *name,
                                  caprl_error *err) {
    if (s->slots == NULL || 2 * ((size_t)s->n + 1) > (size_t)s->mask + 1) {
        if (s->mask >= (1u << 30)) {
            return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: more than 2^29 distinct strings", name);
        }
        CAPRL_TRY(strtab_rehash(s, s->slots == NULL ? 1024 : 2 * (s->mask + 1), name, err));
    }
    uint32_t h    = hash_bytes(p, n);
    uint32_t slot = strtab_slot(s, p, n, h);
    if (s->slots[slot] >= 0) {
        *idx   = s->slots[slot];
        *added = false;
        return CAPRL_OK;
    }
    if ((size_t)s->n + 1 > s->cap) {
        CAPRL_TRY(strtab_reserve(s, (size_t)s->n + 1, name, err));
    }
    uint8_t *bytes = grow(s->bytes, &s->cap_bytes, s->n_bytes + n + 1, 1);
    if (bytes == NULL) {
        return oom(err, name, "string bytes");
    }
    s->bytes = bytes;
    memcpy(s->bytes + s->n_bytes, p, n);
    s->off[s->n]  = s->n_bytes;
    s->len[s->n]  = (uint32_t)n;
    s->hash[s->n] = h;
    s->n_bytes += n;
    s->slots[slot] = s->n;
    *idx           = s->n++;
    *added         = true;
    return CAPRL_OK;
}

/* Byte order of strings x and y of s, a proper prefix first. */
static int strtab_cmp(const strtab *s, int32_t x, int32_t y) {
    if (x == y) {
        return 0;
    }
    uint32_t lx = s->len[x], ly = s->len[y];
    int      c  = memcmp(strtab_str(s, x), strtab_str(s, y), lx < ly ? lx : ly);
    if (c != 0) {
        return c;
    }
    return lx < ly ? -1 : lx > ly ? 1 : 0;
}

/* ---- trainer state ------------------------------------------------------------------------------------------ */

typedef struct pair_info {
    uint64_t key;      /* left id << 32 | right id */
    int64_t  count;    /* occurrences in the corpus (word frequency times occurrences in the word) */
    int32_t *where;    /* words the pair was counted in (may repeat, may be out of date: rechecked on use) */
    size_t   n_where, cap_where;
    int32_t  stamp;    /* last merge step whose count increase was recorded in `touched` */
} pair_info;

typedef struct heap_entry {
    int64_t count;
    int32_t pair;
} heap_entry;

typedef struct added_token {
    const char *content;
    uint32_t    len;
    bool        special;
} added_token;

typedef struct trainer {
    const char *name;
    /* added tokens, and the literal matcher over them: those starting with byte b are by_first[first[b] ..
     * first[b + 1]), longest first */
    added_token *added;
    int32_t      n_added;
    int32_t     *by_first;
    uint32_t     first[257];
    /* the words: distinct pieces, their counts and their current symbols */
    strtab   words;
    int64_t *freq;    /* (cap_freq) */
    size_t   cap_freq;
    int64_t  n_pieces;
    int64_t  n_added_hits; /* added tokens found in the corpus */
    int32_t *sym;     /* every word's symbols; word w owns sym[sym_off[w] .. + its byte length) */
    size_t  *sym_off; /* (n words) */
    int32_t *sym_len; /* (n words) current number of symbols */
    /* the tokens: id i's raw bytes */
    strtab  toks;
    int32_t byte_id[256];
    /* pairs: key -> index map and the pair records */
    pair_info *pairs;
    size_t     n_pairs, cap_pairs;
    int32_t   *pair_slots; /* (pair_mask + 1) -1 empty */
    uint32_t   pair_mask;
    heap_entry *heap;
    size_t      n_heap, cap_heap;
    int32_t    *touched; /* pairs whose count rose in this step */
    size_t      n_touched, cap_touched;
    int32_t     step;
    int32_t    *pos; /* merge positions in one word */
    size_t      cap_pos;
    int32_t    *merges; /* (2 * n_merges) left, right ids */
    size_t      n_merges, cap_merges;
    uint8_t    *scratch; /* concatenation of a merged pair */
    size_t      cap_scratch;
    uint8_t    *nfc; /* one corpus segment after NFC */
    size_t      nfc_len, cap_nfc;
} trainer;

static void trainer_free(trainer *t) {
    free(t->added);
    free(t->by_first);
    strtab_free(&t->words);
    free(t->freq);
    free(t->sym);
    free(t->sym_off);
    free(t->sym_len);
    strtab_free(&t->toks);
    for (size_t i = 0; i < t->n_pairs; i++) {
        free(t->pairs[i].where);
    }
    free(t->pairs);
    free(t->pair_slots);
    free(t->heap);
    free(t->touched);
    free(t->pos);
    free(t->merges);
    free(t->scratch);
    free(t->nfc);
}

/* ---- added tokens ------------------------------------------------------------------------------------------- */

static caprl_status add_added(trainer *t, const char *content, bool special, size_t index, caprl_error *err) {
    if (content == NULL || content[0] == '\0') {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_bpe_train: special token %zu is empty", index);
    }
    size_t len = strlen(content);
    if (len > BPE_MAX_ADDED_LEN) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_bpe_train: special token \"%.32s...\" is longer "
                             "than %d bytes", content, BPE_MAX_ADDED_LEN);
    }
    size_t bad = caprl_utf8_validate((const uint8_t *)content, len);
    if (bad < len) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_bpe_train: special token %zu is not valid UTF-8 "
                             "(byte %zu)", index, bad);
    }
    for (int32_t i = 0; i < t->n_added; i++) {
        if (strcmp(t->added[i].content, content) == 0) {
            return CAPRL_OK; /* already listed: one token */
        }
    }
    t->added[t->n_added++] = (added_token){.content = content, .len = (uint32_t)len, .special = special};
    return CAPRL_OK;
}

static caprl_status collect_added(trainer *t, const caprl_bpe_train_params *p, caprl_error *err) {
    size_t n_qwen = p->qwen_added ? sizeof k_qwen_added / sizeof k_qwen_added[0] : 0;
    t->added      = caprl_xcalloc(n_qwen + (size_t)p->n_specials + 1, sizeof *t->added);
    for (size_t i = 0; i < n_qwen; i++) {
        CAPRL_TRY(add_added(t, k_qwen_added[i].content, k_qwen_added[i].special, i, err));
    }
    for (int32_t i = 0; i < p->n_specials; i++) {
        CAPRL_TRY(add_added(t, p->specials[i], true, (size_t)i, err));
    }
    /* matcher: group by first byte, longest first (leftmost-longest, as the encoder) */
    t->by_first = caprl_xcalloc((size_t)t->n_added + 1, sizeof *t->by_first);
    int32_t k   = 0;
    for (uint32_t b = 0; b < 256; b++) {
        t->first[b] = (uint32_t)k;
        int32_t start = k;
        for (int32_t i = 0; i < t->n_added; i++) {
            if ((uint8_t)t->added[i].content[0] == b) {
                int32_t j = k++;
                while (j > start && t->added[t->by_first[j - 1]].len < t->added[i].len) {
                    t->by_first[j] = t->by_first[j - 1];
                    j--;
                }
                t->by_first[j] = i;
            }
        }
    }
    t->first[256] = (uint32_t)k;
    return CAPRL_OK;
}

/* Length of the added token matching s[i..n) (the longest), or 0. */
static size_t added_match(const trainer *t, const uint8_t *s, size_t n, size_t i) {
    for (uint32_t k = t->first[s[i]]; k < t->first[s[i] + 1]; k++) {
        const added_token *a = &t->added[t->by_first[k]];
        if (a->len <= n - i && memcmp(s + i, a->content, a->len) == 0) {
            return a->len;
        }
    }
    return 0;
}

/* ---- corpus -> word counts ---------------------------------------------------------------------------------- */

static caprl_status nfc_append(trainer *t, const uint8_t *s, size_t n, caprl_error *err) {
    uint8_t *buf = grow(t->nfc, &t->cap_nfc, t->nfc_len + n + 16, 1);
    if (buf == NULL) {
        return oom(err, t->name, "NFC");
    }
    t->nfc = buf;
    bool plain = true; /* a character at or above U+0300 has a lead byte >= 0xCC; below it NFC changes nothing */
    for (size_t i = 0; i < n && plain; i++) {
        plain = s[i] < 0xCC;
    }
    if (plain) {
        memcpy(t->nfc + t->nfc_len, s, n);
        t->nfc_len += n;
        return CAPRL_OK;
    }
    utf8proc_uint8_t *out = NULL;
    utf8proc_ssize_t  len = utf8proc_map(s, (utf8proc_ssize_t)n, &out,
                                         (utf8proc_option_t)(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (len < 0) {
        free(out);
        return caprl_err_set(err, len == UTF8PROC_ERROR_NOMEM ? CAPRL_ERR_OOM : CAPRL_ERR_FORMAT,
                             "%s: NFC failed: %s", t->name, utf8proc_errmsg(len));
    }
    buf = grow(t->nfc, &t->cap_nfc, t->nfc_len + (size_t)len, 1);
    if (buf == NULL) {
        free(out);
        return oom(err, t->name, "NFC");
    }
    t->nfc = buf;
    memcpy(t->nfc + t->nfc_len, out, (size_t)len);
    t->nfc_len += (size_t)len;
    free(out);
    return CAPRL_OK;
}

static caprl_status count_word(trainer *t, const uint8_t *p, size_t n, caprl_error *err) {
    if (n > UINT32_MAX / 2) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: a pre-token of %zu bytes is too long", t->name, n);
    }
    int32_t w;
    bool    added;
    CAPRL_TRY(strtab_intern(&t->words, p, n, &w, &added, t->name, err));
    if (added) {
        int64_t *freq = grow(t->freq, &t->cap_freq, (size_t)w + 1, sizeof *freq);
        if (freq == NULL) {
            return oom(err, t->name, "word counts");
        }
        t->freq    = freq;
        t->freq[w] = 0;
    }
    t->freq[w]++;
    t->n_pieces++;
    return CAPRL_OK;
}

/* One stretch of raw text between added tokens: NFC (in chunks cut before an ASCII character, which NFC never
 * composes with what precedes it, so the chunks normalize independently), then the pre-split, then counting. */
static caprl_status count_segment(trainer *t, const uint8_t *s, size_t n, caprl_error *err) {
    t->nfc_len = 0;
    for (size_t i = 0; i < n;) {
        size_t e = i + BPE_NFC_CHUNK < n ? i + BPE_NFC_CHUNK : n;
        while (e < n && s[e] >= 0x80) {
            e++;
        }
        CAPRL_TRY(nfc_append(t, s + i, e - i, err));
        i = e;
    }
    const uint8_t *u = t->nfc;
    for (size_t i = 0; i < t->nfc_len;) {
        size_t j = caprl_pretok_next(u, t->nfc_len, i);
        CAPRL_TRY(count_word(t, u + i, j - i, err));
        i = j;
    }
    return CAPRL_OK;
}

static caprl_status count_corpus(trainer *t, const uint8_t *s, size_t n, caprl_error *err) {
    size_t seg = 0;
    for (size_t i = 0; i < n;) {
        size_t m = added_match(t, s, n, i);
        if (m == 0) {
            i++;
            continue;
        }
        CAPRL_TRY(count_segment(t, s + seg, i - seg, err));
        t->n_added_hits++;
        i += m;
        seg = i;
    }
    return count_segment(t, s + seg, n - seg, err);
}

/* ---- pairs -------------------------------------------------------------------------------------------------- */

static uint32_t pair_hash(uint64_t key) {
    return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32);
}

static caprl_status pair_rehash(trainer *t, uint32_t n_slots, caprl_error *err) {
    int32_t *slots = caprl_try_malloc((size_t)n_slots * sizeof *slots);
    if (slots == NULL) {
        return oom(err, t->name, "the pair table");
    }
    memset(slots, 0xFF, (size_t)n_slots * sizeof *slots);
    free(t->pair_slots);
    t->pair_slots = slots;
    t->pair_mask  = n_slots - 1;
    for (size_t k = 0; k < t->n_pairs; k++) {
        uint32_t i = pair_hash(t->pairs[k].key) & t->pair_mask;
        while (t->pair_slots[i] >= 0) {
            i = (i + 1) & t->pair_mask;
        }
        t->pair_slots[i] = (int32_t)k;
    }
    return CAPRL_OK;
}

/* Index of pair (a, b), or -1. */
static int32_t pair_find(const trainer *t, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (uint32_t i = pair_hash(key) & t->pair_mask;; i = (i + 1) & t->pair_mask) {
        int32_t k = t->pair_slots[i];
        if (k < 0 || t->pairs[k].key == key) {
            return k;
        }
    }
}

/* Adds f occurrences of pair (a, b) found in word w. */
static caprl_status pair_add(trainer *t, int32_t a, int32_t b, int64_t f, int32_t w, caprl_error *err) {
    if (t->pair_slots == NULL || 2 * (t->n_pairs + 1) > (size_t)t->pair_mask + 1) {
        if (t->pair_mask >= (1u << 30)) {
            return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "%s: more than 2^29 distinct pairs", t->name);
        }
        CAPRL_TRY(pair_rehash(t, t->pair_slots == NULL ? 4096 : 2 * (t->pair_mask + 1), err));
    }
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint32_t i   = pair_hash(key) & t->pair_mask;
    while (t->pair_slots[i] >= 0 && t->pairs[t->pair_slots[i]].key != key) {
        i = (i + 1) & t->pair_mask;
    }
    if (t->pair_slots[i] < 0) {
        pair_info *pairs = grow(t->pairs, &t->cap_pairs, t->n_pairs + 1, sizeof *pairs);
        if (pairs == NULL) {
            return oom(err, t->name, "pair records");
        }
        t->pairs                = pairs;
        t->pairs[t->n_pairs]    = (pair_info){.key = key, .stamp = -1};
        t->pair_slots[i]        = (int32_t)t->n_pairs++;
    }
    int32_t    k = t->pair_slots[i];
    pair_info *p = &t->pairs[k];
    p->count += f;
    if (p->n_where == 0 || p->where[p->n_where - 1] != w) {
        int32_t *where = grow(p->where, &p->cap_where, p->n_where + 1, sizeof *where);
        if (where == NULL) {
            return oom(err, t->name, "pair word lists");
        }
        p->where               = where;
        p->where[p->n_where++] = w;
    }
    if (p->stamp != t->step) {
        p->stamp         = t->step;
        int32_t *touched = grow(t->touched, &t->cap_touched, t->n_touched + 1, sizeof *touched);
        if (touched == NULL) {
            return oom(err, t->name, "the pair update list");
        }
        t->touched                 = touched;
        t->touched[t->n_touched++] = k;
    }
    return CAPRL_OK;
}

static void pair_sub(trainer *t, int32_t a, int32_t b, int64_t f) {
    int32_t k = pair_find(t, a, b);
    CAPRL_ASSERT(k >= 0 && t->pairs[k].count >= f);
    t->pairs[k].count -= f;
}

/* ---- heap of (count, pair): the most frequent pair on top, ties by the pair's token bytes -------------------- */

static bool heap_before(const trainer *t, heap_entry x, heap_entry y) {
    if (x.count != y.count) {
        return x.count > y.count;
    }
    uint64_t kx = t->pairs[x.pair].key, ky = t->pairs[y.pair].key;
    int      c  = strtab_cmp(&t->toks, (int32_t)(kx >> 32), (int32_t)(ky >> 32));
    if (c == 0) {
        c = strtab_cmp(&t->toks, (int32_t)(uint32_t)kx, (int32_t)(uint32_t)ky);
    }
    return c < 0;
}

static caprl_status heap_push(trainer *t, heap_entry e, caprl_error *err) {
    heap_entry *heap = grow(t->heap, &t->cap_heap, t->n_heap + 1, sizeof *heap);
    if (heap == NULL) {
        return oom(err, t->name, "the pair heap");
    }
    t->heap  = heap;
    size_t i = t->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!heap_before(t, e, t->heap[parent])) {
            break;
        }
        t->heap[i] = t->heap[parent];
        i          = parent;
    }
    t->heap[i] = e;
    return CAPRL_OK;
}

static heap_entry heap_pop(trainer *t) {
    heap_entry top  = t->heap[0];
    heap_entry last = t->heap[--t->n_heap];
    size_t     n = t->n_heap, i = 0;
    if (n == 0) {
        return top;
    }
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) {
            break;
        }
        if (c + 1 < n && heap_before(t, t->heap[c + 1], t->heap[c])) {
            c++;
        }
        if (!heap_before(t, t->heap[c], last)) {
            break;
        }
        t->heap[i] = t->heap[c];
        i          = c;
    }
    t->heap[i] = last;
    return top;
}

/* Pushes the pairs whose count rose since the last call. */
static caprl_status push_touched(trainer *t, caprl_error *err) {
    for (size_t i = 0; i < t->n_touched; i++) {
        int32_t k = t->touched[i];
        if (t->pairs[k].count > 0) {
            CAPRL_TRY(heap_push(t, (heap_entry){t->pairs[k].count, k}, err));
        }
    }
    t->n_touched = 0;
    return CAPRL_OK;
}

/* The most frequent pair (ties as heap_before), or -1 when none is left. */
static caprl_status best_pair(trainer *t, int32_t *best, caprl_error *err) {
    *best = -1;
    while (t->n_heap > 0) {
        heap_entry e   = heap_pop(t);
        int64_t    cur = t->pairs[e.pair].count;
        if (cur == e.count) {
            *best = e.pair;
            return CAPRL_OK;
        }
        if (cur > 0) {
            CAPRL_TRY(heap_push(t, (heap_entry){cur, e.pair}, err)); /* out of date: retry with the current count */
        }
    }
    return CAPRL_OK;
}

/* ---- training ----------------------------------------------------------------------------------------------- */

/* Token ids 0..255: the byte-level symbols in code point order, as in Qwen2's (and GPT-2's) vocab. */
static caprl_status init_tokens(trainer *t, caprl_error *err) {
    uint32_t cp[256];
    for (uint32_t b = 0; b < 256; b++) {
        cp[b] = caprl_byte_level_cp(b);
    }
    uint8_t by_id[256];
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t rank = 0;
        for (uint32_t c = 0; c < 256; c++) {
            rank += cp[c] < cp[b];
        }
        by_id[rank] = (uint8_t)b;
    }
    for (uint32_t id = 0; id < 256; id++) {
        int32_t k;
        bool    added;
        CAPRL_TRY(strtab_intern(&t->toks, &by_id[id], 1, &k, &added, t->name, err));
        CAPRL_ASSERT(added && k == (int32_t)id);
        t->byte_id[by_id[id]] = k;
    }
    return CAPRL_OK;
}

static caprl_status init_words(trainer *t, caprl_error *err) {
    size_t n_words = (size_t)t->words.n;
    t->sym         = caprl_try_malloc((t->words.n_bytes + 1) * sizeof *t->sym);
    t->sym_off     = caprl_try_malloc((n_words + 1) * sizeof *t->sym_off);
    t->sym_len     = caprl_try_malloc((n_words + 1) * sizeof *t->sym_len);
    if (t->sym == NULL || t->sym_off == NULL || t->sym_len == NULL) {
        return oom(err, t->name, "word symbols");
    }
    for (int32_t w = 0; w < t->words.n; w++) {
        const uint8_t *p = strtab_str(&t->words, w);
        uint32_t       n = t->words.len[w];
        int32_t       *s = t->sym + t->words.off[w];
        t->sym_off[w]    = t->words.off[w];
        t->sym_len[w]    = (int32_t)n;
        for (uint32_t i = 0; i < n; i++) {
            s[i] = t->byte_id[p[i]];
        }
        for (uint32_t i = 0; i + 1 < n; i++) {
            CAPRL_TRY(pair_add(t, s[i], s[i + 1], t->freq[w], w, err));
        }
    }
    return push_touched(t, err);
}

/* Rewrites word w with every non-overlapping occurrence of (a, b), left to right, replaced by z, and moves the
 * counts of the pairs around each occurrence from the old neighbours to the new ones. */
static caprl_status merge_word(trainer *t, int32_t w, int32_t a, int32_t b, int32_t z, caprl_error *err) {
    int32_t *s = t->sym + t->sym_off[w];
    int32_t  n = t->sym_len[w];
    int64_t  f = t->freq[w];
    int32_t *pos = grow(t->pos, &t->cap_pos, (size_t)n / 2 + 1, sizeof *pos);
    if (pos == NULL) {
        return oom(err, t->name, "merge positions");
    }
    t->pos     = pos;
    int32_t np = 0;
    for (int32_t i = 0; i + 1 < n;) {
        if (s[i] == a && s[i + 1] == b) {
            pos[np++] = i;
            i += 2;
        } else {
            i++;
        }
    }
    if (np == 0) {
        return CAPRL_OK; /* an out-of-date entry of the word list */
    }
    /* pair j is (s[j], s[j + 1]); the pairs touching occurrence i are i-1, i, i+1, each removed once */
    int32_t last = -1;
    for (int32_t k = 0; k < np; k++) {
        for (int32_t j = pos[k] - 1; j <= pos[k] + 1; j++) {
            if (j >= 0 && j + 1 < n && j > last) {
                pair_sub(t, s[j], s[j + 1], f);
                last = j;
            }
        }
    }
    int32_t o = 0, k = 0;
    for (int32_t i = 0; i < n;) {
        if (k < np && pos[k] == i) {
            pos[k++] = o;
            s[o++]   = z;
            i += 2;
        } else {
            s[o++] = s[i++];
        }
    }
    t->sym_len[w] = o;
    last          = -1;
    for (k = 0; k < np; k++) {
        for (int32_t j = pos[k] - 1; j <= pos[k]; j++) {
            if (j >= 0 && j + 1 < o && j > last) {
                CAPRL_TRY(pair_add(t, s[j], s[j + 1], f, w, err));
                last = j;
            }
        }
    }
    return CAPRL_OK;
}

/* Applies the merge of pair k everywhere; the result token is the concatenation, new or (same bytes) reused. */
static caprl_status apply_merge(trainer *t, int32_t k, caprl_error *err) {
    t->step++; /* a new step for pair_add's stamps: the counts that rise now are pushed after the merge */
    int32_t a = (int32_t)(t->pairs[k].key >> 32), b = (int32_t)(uint32_t)t->pairs[k].key;
    size_t  la = t->toks.len[a], lb = t->toks.len[b];
    uint8_t *cat = grow(t->scratch, &t->cap_scratch, la + lb, 1);
    if (cat == NULL) {
        return oom(err, t->name, "a token");
    }
    t->scratch = cat;
    memcpy(cat, strtab_str(&t->toks, a), la);
    memcpy(cat + la, strtab_str(&t->toks, b), lb);
    int32_t z;
    bool    added;
    CAPRL_TRY(strtab_intern(&t->toks, cat, la + lb, &z, &added, t->name, err));
    int32_t *merges = grow(t->merges, &t->cap_merges, 2 * (t->n_merges + 1), sizeof *merges);
    if (merges == NULL) {
        return oom(err, t->name, "the merge list");
    }
    t->merges                       = merges;
    t->merges[2 * t->n_merges]      = a;
    t->merges[2 * t->n_merges + 1]  = b;
    t->n_merges++;
    /* The pair's word list is consumed here: after the merge no word holds the pair. */
    int32_t *where   = t->pairs[k].where;
    size_t   n_where = t->pairs[k].n_where;
    t->pairs[k].where     = NULL;
    t->pairs[k].n_where   = 0;
    t->pairs[k].cap_where = 0;
    caprl_status st = CAPRL_OK;
    for (size_t i = 0; i < n_where && st == CAPRL_OK; i++) {
        st = merge_word(t, where[i], a, b, z, err);
    }
    free(where);
    CAPRL_TRY(st);
    CAPRL_ASSERT(t->pairs[k].count == 0);
    return push_touched(t, err);
}

static caprl_status train(trainer *t, int32_t n_vocab_target, int64_t min_frequency, bool *exhausted,
                          caprl_error *err) {
    *exhausted = false;
    while (t->toks.n < n_vocab_target) {
        int32_t best;
        CAPRL_TRY(best_pair(t, &best, err));
        if (best < 0 || t->pairs[best].count < min_frequency) {
            *exhausted = true;
            break;
        }
        CAPRL_TRY(apply_merge(t, best, err));
    }
    return CAPRL_OK;
}

/* ---- tokenizer.json ----------------------------------------------------------------------------------------- */

/* Token id's byte-level string into t->scratch (NUL-terminated). */
static caprl_status token_string(trainer *t, int32_t id, const char **out, caprl_error *err) {
    uint32_t n   = t->toks.len[id];
    uint8_t *buf = grow(t->scratch, &t->cap_scratch, 3 * (size_t)n + 1, 1);
    if (buf == NULL) {
        return oom(err, t->name, "a token string");
    }
    t->scratch       = buf;
    const uint8_t *p = strtab_str(&t->toks, id);
    size_t         o = 0;
    for (uint32_t i = 0; i < n; i++) {
        o += caprl_utf8_put(caprl_byte_level_cp(p[i]), buf + o);
    }
    buf[o] = '\0';
    *out   = (const char *)buf;
    return CAPRL_OK;
}

/* An added token whose content is also a vocab string would get the vocab id from Hugging Face and be rejected by
 * caprl's loader; it is refused here with its name. */
static caprl_status check_added_vs_vocab(trainer *t, caprl_error *err) {
    for (int32_t i = 0; i < t->n_added; i++) {
        const uint8_t *s = (const uint8_t *)t->added[i].content;
        size_t         n = t->added[i].len, o = 0;
        uint8_t       *raw = grow(t->scratch, &t->cap_scratch, n + 1, 1);
        if (raw == NULL) {
            return oom(err, t->name, "a token");
        }
        t->scratch   = raw;
        bool byte_lv = true; /* every character is a byte-level symbol: then it names those raw bytes */
        for (size_t j = 0; j < n && byte_lv;) {
            utf8proc_int32_t cp;
            utf8proc_ssize_t len = utf8proc_iterate(s + j, (utf8proc_ssize_t)(n - j), &cp);
            byte_lv              = false;
            for (uint32_t b = 0; b < 256 && len > 0 && !byte_lv; b++) {
                if (caprl_byte_level_cp(b) == (uint32_t)cp) {
                    raw[o++] = (uint8_t)b;
                    byte_lv  = true;
                }
            }
            j += len > 0 ? (size_t)len : n;
        }
        if (byte_lv && strtab_find(&t->toks, raw, o) >= 0) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_bpe_train: special token \"%s\" is also a token "
                                 "of the byte-level vocabulary", t->added[i].content);
        }
    }
    return CAPRL_OK;
}

static json_t *byte_level_object(void) {
    return json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 0,
                     "use_regex", 0);
}

/* json_object_set_new takes the value's reference even when it fails (or the value is NULL). */
static bool put(json_t *obj, const char *key, json_t *value) {
    return json_object_set_new(obj, key, value) == 0;
}

/* The document in Qwen2's key order. The containers are attached first, so root owns everything from then on. */
static caprl_status build_json(trainer *t, json_t **out, caprl_error *err) {
    json_t *root = json_object();
    if (root == NULL) {
        return oom(err, t->name, "the JSON document");
    }
    json_t *added = json_array(), *vocab = json_object(), *merges = json_array();
    json_t *model = json_pack("{s:s, s:n, s:n, s:s, s:s, s:b, s:b, s:b}", "type", "BPE", "dropout", "unk_token",
                              "continuing_subword_prefix", "", "end_of_word_suffix", "", "fuse_unk", 0,
                              "byte_fallback", 0, "ignore_merges", 0);
    json_t *pre   = json_pack("{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, o]}", "type", "Sequence", "pretokenizers", "type",
                              "Split", "pattern", "Regex", k_qwen2_regex, "behavior", "Isolated", "invert", 0,
                              byte_level_object());
    bool ok = model != NULL && vocab != NULL && merges != NULL;
    if (ok) {
        bool vocab_ok = put(model, "vocab", json_incref(vocab)); /* both run: each takes its reference */
        ok = put(model, "merges", json_incref(merges)) && vocab_ok;
    }
    ok = put(root, "version", json_string("1.0")) & ok;
    ok = put(root, "truncation", json_null()) & ok;
    ok = put(root, "padding", json_null()) & ok;
    ok = put(root, "added_tokens", json_incref(added)) & ok;
    ok = put(root, "normalizer", json_pack("{s:s}", "type", "NFC")) & ok;
    ok = put(root, "pre_tokenizer", pre) & ok;
    ok = put(root, "post_processor", byte_level_object()) & ok;
    ok = put(root, "decoder", byte_level_object()) & ok;
    ok = put(root, "model", model) & ok;
    for (int32_t i = 0; i < t->n_added && ok; i++) {
        json_t *a = json_pack("{s:I, s:s, s:b, s:b, s:b, s:b, s:b}", "id", (json_int_t)(t->toks.n + i), "content",
                              t->added[i].content, "single_word", 0, "lstrip", 0, "rstrip", 0, "normalized", 0,
                              "special", (int)t->added[i].special);
        ok = json_array_append_new(added, a) == 0;
    }
    caprl_status st = CAPRL_OK;
    for (int32_t id = 0; id < t->toks.n && ok && st == CAPRL_OK; id++) {
        const char *s;
        st = token_string(t, id, &s, err);
        ok = st == CAPRL_OK && json_object_set_new_nocheck(vocab, s, json_integer(id)) == 0;
    }
    for (size_t m = 0; m < t->n_merges && ok && st == CAPRL_OK; m++) {
        json_t *pair = json_array();
        ok           = json_array_append_new(merges, pair) == 0;
        for (size_t side = 0; side < 2 && ok && st == CAPRL_OK; side++) {
            const char *s;
            st = token_string(t, t->merges[2 * m + side], &s, err);
            ok = st == CAPRL_OK && json_array_append_new(pair, json_string_nocheck(s)) == 0;
        }
    }
    json_decref(added);
    json_decref(vocab);
    json_decref(merges);
    if (st != CAPRL_OK || !ok) {
        json_decref(root);
        return st != CAPRL_OK ? st : oom(err, t->name, "the JSON document");
    }
    *out = root;
    return CAPRL_OK;
}

/* ---- public API --------------------------------------------------------------------------------------------- */

static caprl_status check_params(const caprl_bpe_train_params *p, const char *corpus, size_t len, char **json,
                                 caprl_error *err) {
    if (p == NULL || json == NULL || (corpus == NULL && len > 0) || (p->n_specials > 0 && p->specials == NULL) ||
        p->n_specials < 0) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_bpe_train: NULL or negative argument");
    }
    if (p->min_frequency < 1) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_bpe_train: min_frequency %d must be at least 1",
                             p->min_frequency);
    }
    if (p->vocab_size > BPE_MAX_VOCAB) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_bpe_train: vocab_size %d is above the limit %d",
                             p->vocab_size, BPE_MAX_VOCAB);
    }
    return CAPRL_OK;
}

static caprl_status run(trainer *t, const uint8_t *s, size_t len, const caprl_bpe_train_params *p, json_t **doc,
                        caprl_bpe_train_stats *stats, caprl_error *err) {
    CAPRL_TRY(collect_added(t, p, err));
    if (p->vocab_size < 256 + t->n_added) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_bpe_train: vocab_size %d is too small: the 256 byte "
                             "tokens and the %d added tokens need at least %d", p->vocab_size, t->n_added,
                             256 + t->n_added);
    }
    if (len == 0) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: the corpus is empty", t->name);
    }
    size_t bad = caprl_utf8_validate(s, len);
    if (bad < len) {
        size_t line = 1;
        for (size_t i = 0; i < bad; i++) {
            line += s[i] == '\n';
        }
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s:%zu: invalid UTF-8 at byte offset %zu (byte 0x%02X)", t->name,
                             line, bad, s[bad]);
    }
    CAPRL_TRY(count_corpus(t, s, len, err));
    if (t->n_pieces == 0) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "%s: the corpus has no text outside its added tokens", t->name);
    }
    CAPRL_TRY(init_tokens(t, err));
    CAPRL_TRY(init_words(t, err));
    bool exhausted;
    CAPRL_TRY(train(t, p->vocab_size - t->n_added, p->min_frequency, &exhausted, err));
    CAPRL_TRY(check_added_vs_vocab(t, err));
    CAPRL_TRY(build_json(t, doc, err));
    if (stats != NULL) {
        int64_t tokens = t->n_added_hits;
        for (int32_t w = 0; w < t->words.n; w++) {
            tokens += t->freq[w] * t->sym_len[w];
        }
        *stats = (caprl_bpe_train_stats){.n_pieces = t->n_pieces, .n_words = t->words.n,
                                         .n_merges = (int32_t)t->n_merges, .n_vocab = t->toks.n,
                                         .n_added = t->n_added, .exhausted = exhausted, .corpus_tokens = tokens};
    }
    return CAPRL_OK;
}

caprl_status caprl_bpe_train(const char *corpus, size_t len, const char *name, const caprl_bpe_train_params *params,
                             char **json, size_t *json_len, caprl_bpe_train_stats *stats, caprl_error *err) {
    CAPRL_TRY(check_params(params, corpus, len, json, err));
    trainer t   = {.name = name ? name : "corpus"};
    json_t *doc = NULL;
    caprl_status st = run(&t, (const uint8_t *)(corpus ? corpus : ""), len, params, &doc, stats, err);
    trainer_free(&t);
    if (st != CAPRL_OK) {
        return st;
    }
    /* Compact, keys in insertion order, UTF-8 unescaped: the layout of Qwen2's own tokenizer.json. */
    size_t need = json_dumpb(doc, NULL, 0, JSON_COMPACT);
    char  *buf  = need > 0 ? caprl_try_malloc(need + 1) : NULL;
    if (buf == NULL || json_dumpb(doc, buf, need, JSON_COMPACT) != need) {
        free(buf);
        json_decref(doc);
        return oom(err, name ? name : "corpus", "the tokenizer.json text");
    }
    json_decref(doc);
    buf[need] = '\0';
    *json     = buf;
    if (json_len != NULL) {
        *json_len = need;
    }
    return CAPRL_OK;
}
