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

#ifdef __cplusplus
}
#endif

#endif /* CAPRL_TOKENIZER_H */
