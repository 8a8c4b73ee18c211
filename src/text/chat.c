/* The Qwen2.5 Instruct chat template without tools (spec/qwen.md §5.7), rendered directly instead of through a
 * Jinja engine: the template's output for plain system/user/assistant turns is fixed ChatML text. */
#include <stdlib.h>
#include <string.h>

#include "caprl/tokenizer.h"
#include "core/error_impl.h"

void caprl_free(void *p) {
    free(p);
}

typedef struct chat_buf {
    char  *data;
    size_t len, cap;
} chat_buf;

static void put(chat_buf *b, const char *s) {
    size_t n = strlen(s);
    if (b->len + n + 1 > b->cap) {
        b->cap  = 2 * (b->len + n + 1);
        b->data = caprl_xrealloc(b->data, b->cap);
    }
    memcpy(b->data + b->len, s, n + 1);
    b->len += n;
}

static void put_turn(chat_buf *b, const char *role, const char *content) {
    put(b, "<|im_start|>");
    put(b, role);
    put(b, "\n");
    put(b, content);
    put(b, "<|im_end|>\n");
}

caprl_status caprl_chat_render(const caprl_chat_message *msgs, int32_t n_msgs, const char *default_system,
                               bool add_generation_prompt, char **out, caprl_error *err) {
    if (out == NULL || n_msgs < 0 || (msgs == NULL && n_msgs > 0)) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "caprl_chat_render: NULL or negative argument");
    }
    for (int32_t i = 0; i < n_msgs; i++) {
        const char *role = msgs[i].role;
        if (role == NULL || msgs[i].content == NULL) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "chat: message %d has no role or content", i);
        }
        /* "tool" turns and tool calls need the template's tool branches, which caprl does not use. */
        if (strcmp(role, "system") != 0 && strcmp(role, "user") != 0 && strcmp(role, "assistant") != 0) {
            return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "chat: message %d: role \"%.32s\" is not system, user "
                                 "or assistant", i, role);
        }
    }
    chat_buf b     = {0};
    int32_t  first = 0;
    if (n_msgs > 0 && strcmp(msgs[0].role, "system") == 0) {
        put_turn(&b, "system", msgs[0].content);
        first = 1;
    } else {
        put_turn(&b, "system", default_system ? default_system : CAPRL_QWEN25_DEFAULT_SYSTEM);
    }
    for (int32_t i = first; i < n_msgs; i++) {
        put_turn(&b, msgs[i].role, msgs[i].content);
    }
    if (add_generation_prompt) {
        put(&b, "<|im_start|>assistant\n");
    }
    *out = b.data;
    return CAPRL_OK;
}
