/* Qwen2 byte-level BPE from a Hugging Face tokenizer.json, and the Qwen ChatML chat template.
 * Encoding matches Hugging Face `tokenizers`: added tokens split first (leftmost-longest), NFC, the Qwen2
 * pre-split regex, byte-to-unicode, BPE merges by rank. No BOS/EOS is ever added.
 * Thread safety: a tokenizer is immutable after load; encode/decode may run concurrently on one tokenizer. */
#ifndef CAPRL_TOKENIZER_H
#define CAPRL_TOKENIZER_H

#include "caprl/caprl.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct caprl_tokenizer caprl_tokenizer;

CAPRL_API caprl_status caprl_tokenizer_load(caprl_tokenizer **out, const char *path, caprl_error *err);
/* json is parsed from memory (length n); name appears in error messages. */
CAPRL_API caprl_status caprl_tokenizer_load_buffer(caprl_tokenizer **out, const char *json, size_t n,
                                                   const char *name, caprl_error *err);
CAPRL_API void         caprl_tokenizer_free(caprl_tokenizer *tok); /* NULL-safe */

/* One past the largest token id (vocab and added tokens). */
CAPRL_API int32_t caprl_tokenizer_n_tokens(const caprl_tokenizer *tok);
/* The token's string as stored (byte-level alphabet for vocab entries, literal text for added tokens);
 * NULL for an id with no token. */
CAPRL_API const char *caprl_tokenizer_token_str(const caprl_tokenizer *tok, int32_t id);
/* Id of an exact token string (vocab or added), or -1. */
CAPRL_API int32_t caprl_tokenizer_token_id(const caprl_tokenizer *tok, const char *str);
/* True for added tokens marked "special". */
CAPRL_API bool caprl_tokenizer_is_special(const caprl_tokenizer *tok, int32_t id);

/* Encodes len bytes of UTF-8 text. parse_special: match added/special token strings in the text (HF default).
 * With parse_special false, special tokens (<|im_start|>, ...) are encoded as plain text, while non-special added
 * tokens (<tool_call>, <|fim_prefix|>, ...) are still matched, as HF does with split_special_tokens=True.
 * snprintf contract: writes at most cap ids and sets *n_ids to the full count; call again with a bigger
 * buffer if *n_ids > cap. Invalid UTF-8 gives CAPRL_ERR_INVALID_ARG naming the byte offset. */
CAPRL_API caprl_status caprl_tokenizer_encode(const caprl_tokenizer *tok, const char *text, size_t len,
                                              bool parse_special, int32_t *ids, int64_t cap, int64_t *n_ids,
                                              caprl_error *err);

/* Decodes ids to UTF-8 (invalid byte sequences become U+FFFD, as Hugging Face does with errors="replace").
 * skip_special drops added tokens marked special. snprintf contract on bytes: writes at most cap-1 bytes plus
 * a NUL and sets *len to the full length. Ids with no token (e.g. the padding rows of a model's vocabulary) decode
 * to nothing, as Hugging Face's decode drops them; negative ids give CAPRL_ERR_INVALID_ARG. */
CAPRL_API caprl_status caprl_tokenizer_decode(const caprl_tokenizer *tok, const int32_t *ids, int64_t n_ids,
                                              bool skip_special, char *buf, size_t cap, size_t *len,
                                              caprl_error *err);

/* Raw bytes of one token before UTF-8 repair (for streaming: accumulate bytes, print complete characters).
 * Returns the byte count (may exceed cap, snprintf-style, without NUL); -1 for an unknown id; 0 for a special
 * token when skip_special. */
CAPRL_API int64_t caprl_tokenizer_token_bytes(const caprl_tokenizer *tok, int32_t id, bool skip_special,
                                              uint8_t *buf, size_t cap);

/* ---- chat template (Qwen2.5 ChatML) ------------------------------------------------------------------------ */

typedef struct caprl_chat_message {
    const char *role;    /* "system", "user", "assistant" */
    const char *content; /* UTF-8 */
} caprl_chat_message;

/* The Qwen2.5 Instruct default system prompt. */
#define CAPRL_QWEN25_DEFAULT_SYSTEM "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

/* Renders messages as Qwen2.5's chat template does: a system turn first (messages[0] if its role is "system",
 * else default_system, or CAPRL_QWEN25_DEFAULT_SYSTEM when default_system is NULL), then each message, then
 * "<|im_start|>assistant\n" if add_generation_prompt. *out is malloc'd; free with caprl_free. */
CAPRL_API caprl_status caprl_chat_render(const caprl_chat_message *msgs, int32_t n_msgs, const char *default_system,
                                         bool add_generation_prompt, char **out, caprl_error *err);

/* ---- training a byte-level BPE tokenizer ------------------------------------------------------------------- */

typedef struct caprl_bpe_train_params {
    int32_t vocab_size;    /* all ids: the 256 byte tokens, the merged tokens and the added tokens (default 32000) */
    int32_t min_frequency; /* merge only pairs occurring at least this often in the corpus (default 2, >= 1) */
    bool    qwen_added;    /* add Qwen2's 22 added tokens (<|endoftext|>, <|im_start|>, <|im_end|>, <|vision_start|>,
                            * ..., <|image_pad|>, <|video_pad|>, <tool_call>, ..., <|file_sep|>) in Qwen2's order,
                            * with Qwen2's "special" flags (default true) */
    const char *const *specials; /* (n_specials) more added tokens, special = true, after those; a content already
                                  * listed is not added twice */
    int32_t            n_specials;
} caprl_bpe_train_params;

typedef struct caprl_bpe_train_stats {
    int64_t n_pieces;      /* pre-tokens in the corpus (outside added tokens) */
    int64_t n_words;       /* distinct pre-tokens */
    int32_t n_merges;      /* model.merges entries */
    int32_t n_vocab;       /* model.vocab entries (256 + merged tokens); added tokens take ids n_vocab.. */
    int32_t n_added;       /* added tokens */
    bool    exhausted;     /* stopped before vocab_size: no pair left occurring min_frequency times */
    int64_t corpus_tokens; /* tokens the trained tokenizer encodes the corpus to (added tokens parsed) */
} caprl_bpe_train_stats;

CAPRL_API caprl_bpe_train_params caprl_bpe_train_default_params(void);

/* Trains a byte-level BPE tokenizer on corpus[0..len) (UTF-8) and returns it as tokenizer.json text in the layout of
 * Qwen2's (spec/qwen.md §5.1): NFC normalizer, the Qwen2 Split regex + ByteLevel pre-tokenizer, ByteLevel
 * post-processor and decoder, a BPE model (no dropout, no byte fallback, no unk token), merges as ["left", "right"]
 * pairs, and the added tokens after the vocab. caprl_tokenizer_load and Hugging Face `tokenizers` load it.
 *
 * The corpus is prepared as encoding prepares text: added tokens are cut out of it (leftmost-longest), the rest is
 * NFC-normalized and pre-split by the Qwen2 regex; each distinct piece is a word with its count. The vocab starts
 * with the 256 byte-level symbols (ids 0..255 in code point order, as Qwen2's) and grows by merging the most
 * frequent adjacent pair of symbols over the word counts, everywhere, left to right, until vocab_size minus the
 * added tokens is reached or no pair occurs min_frequency times. Ties go to the pair whose left token's bytes come
 * first in byte order (a proper prefix before its extensions), then likewise the right token's: the result is
 * deterministic, byte for byte, and independent of the platform. A merge whose concatenation equals an existing
 * token reuses its id.
 *
 * name (may be NULL) names the corpus in messages. *json is NUL-terminated and malloc'd (free with caprl_free);
 * json_len and stats may be NULL. Errors: CAPRL_ERR_INVALID_ARG (vocab_size below 256 + the added tokens, a bad
 * added token: empty, not UTF-8, over 1024 bytes, or equal to a vocab token), CAPRL_ERR_FORMAT (an empty corpus, one
 * with only added tokens, invalid UTF-8: the message names the line and byte offset), CAPRL_ERR_OOM.
 * Thread safety: no shared state; concurrent calls are safe. */
CAPRL_API caprl_status caprl_bpe_train(const char *corpus, size_t len, const char *name,
                                       const caprl_bpe_train_params *params, char **json, size_t *json_len,
                                       caprl_bpe_train_stats *stats, caprl_error *err);

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_TOKENIZER_H */
