/* Encoding and decoding with a loaded tokenizer (spec/qwen.md §5.5-§5.6), as Hugging Face `tokenizers` does it:
 * added tokens are split off the raw text first (leftmost-longest literal matches), each remaining segment is NFC
 * normalized, split again on "normalized" added tokens, pre-split by the Qwen2 regex (pretok.c), and every piece is
 * BPE-merged on its bytes. BPE works on token ids: a piece starts as one byte-level symbol per byte, and the merge
 * table maps a pair of ids to (rank, result id), so no byte-level strings are built while encoding.
 * The tokenizer is only read; all mutable state is per call, so any number of threads may encode at once. */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "caprl/tokenizer.h"
#include "core/error_impl.h"
#include "text/tokenizer_impl.h"

/* Per-call memo of piece bytes -> ids. English text repeats its words, and a lookup costs a fraction of a BPE run.
 * Only calls on long inputs get one; it stops growing at half load rather than evicting. */
typedef struct cache_slot {
    uint32_t hash;
    uint16_t len;   /* piece bytes; 0 marks an empty slot */
    uint16_t n_ids;
    uint32_t text;  /* offset into word_cache.text */
    uint32_t ids;   /* offset into word_cache.ids */
} cache_slot;

typedef struct word_cache {
    cache_slot *slots; /* (mask + 1) NULL when the call has no cache */
    uint32_t    mask;
    uint32_t    used;
    uint8_t    *text; /* (text_cap) */
    size_t      text_len, text_cap;
    int32_t    *ids;  /* (ids_cap) */
    size_t      ids_len, ids_cap;
} word_cache;

enum { CACHE_MIN_INPUT = 4096, CACHE_MAX_PIECE = 64 };

/* Per-call state: the output (snprintf contract) and BPE scratch grown to the longest piece so far. */
typedef struct enc_state {
    const caprl_tokenizer *t;
    bool                   parse_special;
    int32_t               *ids; /* (cap) */
    int64_t                cap;
    int64_t                n;    /* ids produced so far, including those past cap */
    int32_t               *sym;  /* (sym_cap) symbol id, -1 once merged into its left neighbour */
    int32_t               *prev; /* (sym_cap) index of the previous live symbol, -1 at the start */
    int32_t               *next; /* (sym_cap) index of the next live symbol, -1 at the end */
    uint64_t              *heap; /* (3 * sym_cap) min-heap of rank << 32 | left index */
    size_t                 sym_cap;
    word_cache             cache;
    uint8_t               *nfc;  /* (nfc_cap) the current segment after NFC */
    size_t                 nfc_cap;
} enc_state;

static inline void emit(enc_state *e, int32_t id) {
    if (e->n < e->cap) {
        e->ids[e->n] = id;
    }
    e->n++;
}

static void cache_free(word_cache *c) {
    free(c->slots);
    free(c->text);
    free(c->ids);
    memset(c, 0, sizeof *c);
}

/* Sizes the cache for an input of len bytes (about one piece per 5 bytes of text); no cache for short inputs or
 * when memory is short (the cache only saves time). */
static void cache_init(word_cache *c, size_t len) {
    if (len < CACHE_MIN_INPUT) {
        return;
    }
    uint32_t slots = 1024;
    while (slots < 65536 && slots < len / 4) {
        slots <<= 1;
    }
    c->slots    = caprl_try_calloc(slots, sizeof *c->slots);
    c->text_cap = (size_t)slots * 8;
    c->ids_cap  = (size_t)slots * 2;
    c->text     = caprl_try_malloc(c->text_cap);
    c->ids      = caprl_try_malloc(c->ids_cap * sizeof *c->ids);
    if (!c->slots || !c->text || !c->ids) {
        cache_free(c);
        return;
    }
    c->mask = slots - 1;
}

static uint32_t piece_hash(const uint8_t *p, size_t m) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < m; i++) {
        h = (h ^ p[i]) * 16777619u;
    }
    return h;
}

/* The slot holding piece p[0..m), or the empty slot where it would go. */
static cache_slot *cache_slot_for(const word_cache *c, const uint8_t *p, size_t m, uint32_t h) {
    for (uint32_t i = h & c->mask;; i = (i + 1) & c->mask) {
        cache_slot *s = &c->slots[i];
        if (s->len == 0 || (s->hash == h && s->len == m && memcmp(c->text + s->text, p, m) == 0)) {
            return s;
        }
    }
}

static void cache_put(word_cache *c, cache_slot *slot, const uint8_t *p, size_t m, uint32_t h, const int32_t *ids,
                      size_t n_ids) {
    if (2 * (c->used + 1) > c->mask + 1 || c->text_len + m > c->text_cap || c->ids_len + n_ids > c->ids_cap) {
        return; /* full: later pieces are merged without the memo */
    }
    memcpy(c->text + c->text_len, p, m);
    memcpy(c->ids + c->ids_len, ids, n_ids * sizeof *ids);
    *slot = (cache_slot){.hash = h, .len = (uint16_t)m, .n_ids = (uint16_t)n_ids, .text = (uint32_t)c->text_len,
                         .ids = (uint32_t)c->ids_len};
    c->text_len += m;
    c->ids_len += n_ids;
    c->used++;
}

static void scratch_free(enc_state *e) {
    free(e->sym);
    free(e->prev);
    free(e->next);
    free(e->heap);
    e->sym = e->prev = e->next = NULL;
    e->heap                    = NULL;
    e->sym_cap                 = 0;
}

static caprl_status scratch_reserve(enc_state *e, size_t m, caprl_error *err) {
    if (m <= e->sym_cap) {
        return CAPRL_OK;
    }
    if (m >= (size_t)INT32_MAX / 4) {
        return caprl_err_set(err, CAPRL_ERR_UNSUPPORTED, "tokenizer: a pre-token of %zu bytes is too long", m);
    }
    size_t cap = m < 64 ? 64 : m + m / 2;
    scratch_free(e);
    e->sym  = caprl_try_malloc(cap * sizeof *e->sym);
    e->prev = caprl_try_malloc(cap * sizeof *e->prev);
    e->next = caprl_try_malloc(cap * sizeof *e->next);
    e->heap = caprl_try_malloc(3 * cap * sizeof *e->heap);
    if (!e->sym || !e->prev || !e->next || !e->heap) {
        scratch_free(e);
        return caprl_err_set(err, CAPRL_ERR_OOM, "tokenizer: cannot allocate BPE scratch for a %zu-byte pre-token", m);
    }
    e->sym_cap = cap;
    return CAPRL_OK;
}

/* ---- BPE ---------------------------------------------------------------------------------------------------- */

static inline void heap_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p] <= v) {
            break;
        }
        h[i] = h[p];
        i    = p;
    }
    h[i] = v;
}

static inline uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top  = h[0];
    uint64_t last = h[--*n];
    size_t   m = *n, i = 0;
    if (m == 0) {
        return top;
    }
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m) {
            break;
        }
        if (c + 1 < m && h[c + 1] < h[c]) {
            c++;
        }
        if (last <= h[c]) {
            break;
        }
        h[i] = h[c];
        i    = c;
    }
    h[i] = last;
    return top;
}

static inline void push_pair(enc_state *e, size_t *hn, int32_t left) {
    const caprl_merge_slot *m = caprl_merge_find(e->t, e->sym[left], e->sym[e->next[left]]);
    if (m != NULL) {
        heap_push(e->heap, hn, ((uint64_t)m->rank << 32) | (uint32_t)left);
    }
}

/* Merges the bytes p[0..m) as Hugging Face's BPE does: repeatedly apply the lowest-ranked merge among adjacent
 * pairs, the leftmost on ties. The heap orders (rank, left index); an entry whose pair has changed since it was
 * pushed is stale and skipped (the ranks of distinct pairs differ, so comparing ranks detects it). */
static caprl_status bpe(enc_state *e, const uint8_t *p, size_t m, caprl_error *err) {
    const caprl_tokenizer *t = e->t;
    if (m == 1) {
        emit(e, t->byte_id[p[0]]);
        return CAPRL_OK;
    }
    word_cache *c    = &e->cache;
    cache_slot *slot = NULL;
    uint32_t    h    = 0;
    if (c->slots != NULL && m <= CACHE_MAX_PIECE) {
        h    = piece_hash(p, m);
        slot = cache_slot_for(c, p, m, h);
        if (slot->len != 0) {
            for (uint32_t k = 0; k < slot->n_ids; k++) {
                emit(e, c->ids[slot->ids + k]);
            }
            return CAPRL_OK;
        }
    }
    CAPRL_TRY(scratch_reserve(e, m, err));
    int32_t *sym = e->sym, *prev = e->prev, *next = e->next;
    int32_t  mm  = (int32_t)m;
    for (int32_t k = 0; k < mm; k++) {
        sym[k]  = t->byte_id[p[k]];
        prev[k] = k - 1;
        next[k] = k + 1 < mm ? k + 1 : -1;
    }
    size_t hn = 0;
    for (int32_t k = 0; k + 1 < mm; k++) {
        push_pair(e, &hn, k);
    }
    while (hn > 0) {
        uint64_t top  = heap_pop(e->heap, &hn);
        int32_t  left = (int32_t)(uint32_t)top, right = next[left];
        if (sym[left] < 0 || right < 0) {
            continue;
        }
        const caprl_merge_slot *mg = caprl_merge_find(t, sym[left], sym[right]);
        if (mg == NULL || mg->rank != (uint32_t)(top >> 32)) {
            continue;
        }
        sym[left]  = mg->result;
        sym[right] = -1;
        next[left] = next[right];
        if (next[left] >= 0) {
            prev[next[left]] = left;
            push_pair(e, &hn, left);
        }
        if (prev[left] >= 0) {
            push_pair(e, &hn, prev[left]);
        }
    }
    /* Compact the result to the front of sym (k only moves forward), emit it, and memoize it. */
    int32_t n_out = 0;
    for (int32_t k = 0; k >= 0; k = next[k]) {
        sym[n_out++] = sym[k];
    }
    for (int32_t k = 0; k < n_out; k++) {
        emit(e, sym[k]);
    }
    if (slot != NULL) {
        cache_put(c, slot, p, m, h, sym, (size_t)n_out);
    }
    return CAPRL_OK;
}

/* ---- splitting ---------------------------------------------------------------------------------------------- */

static caprl_status encode_pieces(enc_state *e, const uint8_t *s, size_t n, caprl_error *err) {
    for (size_t i = 0; i < n;) {
        size_t j = caprl_pretok_next(s, n, i);
        CAPRL_TRY(bpe(e, s + i, j - i, err));
        i = j;
    }
    return CAPRL_OK;
}

/* Finds the next added-token match in s[*pos..n), leftmost then longest; sets *at and *hit, moves *pos past it and
 * returns true, or returns false when none is left. Unless parse_special, a special token's match is passed over
 * and stays text, as Hugging Face's split_special_tokens does: the matcher still consumes it, so no other added
 * token is found inside it. */
static bool next_added(const caprl_added_matcher *m, bool parse_special, const uint8_t *s, size_t n, size_t *pos,
                       size_t *at, const caprl_added_pattern **hit) {
    if (m->n == 0) {
        return false;
    }
    size_t i = *pos;
    while (i < n) {
        const caprl_added_pattern *found = NULL;
        for (uint32_t k = m->first[s[i]]; k < m->first[s[i] + 1] && found == NULL; k++) {
            const caprl_added_pattern *p = &m->pat[k];
            if (p->len <= n - i && memcmp(s + i, p->text, p->len) == 0) {
                found = p;
            }
        }
        if (found == NULL) {
            i++;
        } else if (found->special && !parse_special) {
            i += found->len;
        } else {
            *at  = i;
            *hit = found;
            *pos = i + found->len;
            return true;
        }
    }
    return false;
}

/* A segment after NFC: split on the "normalized" added tokens, then pre-split and BPE. */
static caprl_status encode_normalized(enc_state *e, const uint8_t *s, size_t n, caprl_error *err) {
    size_t                     seg = 0, pos = 0, at;
    const caprl_added_pattern *hit;
    while (next_added(&e->t->norm, e->parse_special, s, n, &pos, &at, &hit)) {
        CAPRL_TRY(encode_pieces(e, s + seg, at - seg, err));
        emit(e, hit->id);
        seg = pos;
    }
    return encode_pieces(e, s + seg, n - seg, err);
}

/* Length of the (valid) UTF-8 character whose lead byte is b. */
static size_t char_len(uint8_t b) {
    return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

static caprl_status nfc_reserve(enc_state *e, size_t need, caprl_error *err) {
    if (need <= e->nfc_cap) {
        return CAPRL_OK;
    }
    size_t   cap = need + need / 2 + 64;
    uint8_t *p   = realloc(e->nfc, cap);
    if (p == NULL) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "tokenizer: cannot allocate %zu bytes for NFC", cap);
    }
    e->nfc     = p;
    e->nfc_cap = cap;
    return CAPRL_OK;
}

/* Appends NFC(s[0..n)) to e->nfc at *o. */
static caprl_status nfc_chunk(enc_state *e, const uint8_t *s, size_t n, size_t *o, caprl_error *err) {
    utf8proc_uint8_t *out = NULL;
    utf8proc_ssize_t  len = utf8proc_map(s, (utf8proc_ssize_t)n, &out,
                                         (utf8proc_option_t)(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (len < 0) {
        free(out);
        return caprl_err_set(err, len == UTF8PROC_ERROR_NOMEM ? CAPRL_ERR_OOM : CAPRL_ERR_INVALID_ARG,
                             "tokenizer: NFC of %zu bytes failed: %s", n, utf8proc_errmsg(len));
    }
    caprl_status st = nfc_reserve(e, *o + (size_t)len, err);
    if (st == CAPRL_OK) {
        memcpy(e->nfc + *o, out, (size_t)len);
        *o += (size_t)len;
    }
    free(out);
    return st;
}

/* NFC of s[0..n) into e->nfc, normalizing only the stretches that can change. A character below U+0300 is a
 * starter that no composition takes as its second part, so NFC never acts across the boundary before it: the text
 * splits there into independently normalized chunks. Such characters are exactly those whose UTF-8 lead byte is
 * below 0xCC (U+0300 is CC 80; continuation bytes are at most BF). A chunk is a run of characters at or above
 * U+0300 together with the character before it, which they may compose with. */
static caprl_status nfc_segment(enc_state *e, const uint8_t *s, size_t n, size_t *out_len, caprl_error *err) {
    size_t o = 0, pos = 0;
    CAPRL_TRY(nfc_reserve(e, n + 16, err));
    while (pos < n) {
        size_t k = pos;
        while (k < n && s[k] < 0xCC) {
            k++;
        }
        size_t start = k;
        if (k < n && k > pos) {
            start = k - 1;
            while (start > pos && (s[start] & 0xC0) == 0x80) {
                start--;
            }
        }
        CAPRL_TRY(nfc_reserve(e, o + (start - pos), err));
        memcpy(e->nfc + o, s + pos, start - pos);
        o += start - pos;
        if (k == n) {
            break;
        }
        size_t end = k;
        while (end < n && s[end] >= 0xCC) {
            end += char_len(s[end]);
        }
        CAPRL_TRY(nfc_chunk(e, s + start, end - start, &o, err));
        pos = end;
    }
    *out_len = o;
    return CAPRL_OK;
}

/* A segment of raw text between added tokens. */
static caprl_status encode_segment(enc_state *e, const uint8_t *s, size_t n, caprl_error *err) {
    if (n == 0) {
        return CAPRL_OK;
    }
    if (!e->t->nfc) {
        return encode_normalized(e, s, n, err);
    }
    size_t k = 0;
    while (k < n && s[k] < 0xCC) {
        k++;
    }
    if (k == n) {
        return encode_normalized(e, s, n, err); /* nothing NFC could change */
    }
    size_t len = 0;
    CAPRL_TRY(nfc_segment(e, s, n, &len, err));
    return encode_normalized(e, e->nfc, len, err);
}

/* ---- public API --------------------------------------------------------------------------------------------- */

caprl_status caprl_tokenizer_encode(const caprl_tokenizer *tok, const char *text, size_t len, bool parse_special,
                                    int32_t *ids, int64_t cap, int64_t *n_ids, caprl_error *err) {
    if (tok == NULL || (text == NULL && len > 0) || n_ids == NULL || cap < 0 || (ids == NULL && cap > 0)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_tokenizer_encode: NULL or negative argument");
    }
    const uint8_t *s   = (const uint8_t *)text;
    size_t         bad = caprl_utf8_validate(s, len);
    if (bad < len) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "tokenizer: invalid UTF-8 at byte offset %zu (byte 0x%02X)",
                             bad, s[bad]);
    }
    enc_state e = {.t = tok, .parse_special = parse_special, .ids = ids, .cap = cap};
    cache_init(&e.cache, len);
    size_t    seg = 0, pos = 0, at;
    const caprl_added_pattern *hit;
    caprl_status               st = CAPRL_OK;
    while (st == CAPRL_OK && next_added(&tok->raw, parse_special, s, len, &pos, &at, &hit)) {
        st = encode_segment(&e, s + seg, at - seg, err);
        emit(&e, hit->id);
        seg = pos;
    }
    if (st == CAPRL_OK) {
        st = encode_segment(&e, s + seg, len - seg, err);
    }
    scratch_free(&e);
    cache_free(&e.cache);
    free(e.nfc);
    if (st == CAPRL_OK) {
        *n_ids = e.n;
    }
    return st;
}

static bool valid_id(const caprl_tokenizer *tok, int32_t id) {
    return id >= 0 && id < tok->n_tokens && tok->flags[id] != 0;
}

caprl_status caprl_tokenizer_decode(const caprl_tokenizer *tok, const int32_t *ids, int64_t n_ids, bool skip_special,
                                    char *buf, size_t cap, size_t *len, caprl_error *err) {
    if (tok == NULL || n_ids < 0 || (ids == NULL && n_ids > 0) || (buf == NULL && cap > 0) || len == NULL) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_tokenizer_decode: NULL or negative argument");
    }
    size_t total = 0;
    for (int64_t i = 0; i < n_ids; i++) {
        int32_t id = ids[i];
        if (id < 0) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "tokenizer: negative token id %d at position %lld", id,
                                 (long long)i);
        }
        /* Ids with no token (the padding rows of a model's vocabulary, which sampling can pick) decode to nothing,
         * as Hugging Face's decode drops ids its vocabulary does not know. */
        if (valid_id(tok, id) && !(skip_special && (tok->flags[id] & CAPRL_TOK_SPECIAL))) {
            total += tok->bytes_off[id + 1] - tok->bytes_off[id];
        }
    }
    /* The bytes of all tokens are joined before the UTF-8 repair: a character may span tokens. */
    uint8_t *joined = caprl_try_malloc(total + 1);
    if (joined == NULL) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "tokenizer: cannot allocate %zu bytes to decode", total + 1);
    }
    size_t o = 0;
    for (int64_t i = 0; i < n_ids; i++) {
        int32_t id = ids[i];
        if (valid_id(tok, id) && !(skip_special && (tok->flags[id] & CAPRL_TOK_SPECIAL))) {
            size_t nb = tok->bytes_off[id + 1] - tok->bytes_off[id];
            memcpy(joined + o, tok->bytes + tok->bytes_off[id], nb);
            o += nb;
        }
    }
    *len = caprl_utf8_repair(joined, total, buf, cap);
    free(joined);
    return CAPRL_OK;
}

int64_t caprl_tokenizer_token_bytes(const caprl_tokenizer *tok, int32_t id, bool skip_special, uint8_t *buf,
                                    size_t cap) {
    if (tok == NULL || !valid_id(tok, id)) {
        return -1;
    }
    if (skip_special && (tok->flags[id] & CAPRL_TOK_SPECIAL)) {
        return 0;
    }
    size_t nb = tok->bytes_off[id + 1] - tok->bytes_off[id];
    if (buf != NULL && cap > 0) {
        memcpy(buf, tok->bytes + tok->bytes_off[id], nb < cap ? nb : cap);
    }
    return (int64_t)nb;
}
