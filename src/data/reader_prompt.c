/* The CapRL reader prompt (spec/caprl.md §6.3): the released template and how a template is checked and filled.
 * Here, below both the reward (src/rl) and the synthetic world's reader records (src/data/synth), so that the two
 * share one copy of the bytes. */
#include <stdlib.h>
#include <string.h>

#include "caprl/reward.h"
#include "core/error_impl.h"
#include "fmt/json_impl.h"

/* spec/caprl.md §6.3, byte for byte: lines ending in two spaces keep them, "Question: {}" is followed by two
 * spaces and <|im_end|>, and there is no newline after "The answer is". Tested by length and SHA-256. */
static const char k_reader_template[] =
    "<|im_start|>user\n"
    "You will be given an image caption describing the visual content.  \n"
    "Your task is to answer the multiple-choice question **strictly based on the caption**, even if the answer may "
    "seem obvious from prior knowledge or question wording.\n"
    "\n"
    "Ignore any external knowledge. Do not make assumptions beyond what the caption explicitly or implicitly states.\n"
    "\n"
    "Example 1:\n"
    "Caption: <Caption Start> A woman in a red coat is walking a black dog across a snowy park. <Caption End>  \n"
    "Question: What color is the dog?\n"
    "- A) Brown  \n"
    "- B) White  \n"
    "- C) Black  \n"
    "- D) Gray\n"
    "- E) Can not answer based on the caption\n"
    "\n"
    "The answer is C.\n"
    "\n"
    "Example 2:\n"
    "Caption: <Caption Start> A child is waving a British flag during a parade. <Caption End>  \n"
    "Question: What color is the flag?\n"
    "- A) Red  \n"
    "- B) Blue  \n"
    "- C) Red, white, and blue  \n"
    "- D) White\n"
    "- E) Can not answer based on the caption\n"
    "\n"
    "The answer is E.\n"
    "\n"
    "Now, answer the question based on the following caption:\n"
    "\n"
    "Caption: <Caption Start> {} <Caption End>  \n"
    "Question: {}  <|im_end|>\n"
    "<|im_start|>assistant\n"
    "The answer is";

const char *caprl_reader_template_default(void) {
    return k_reader_template;
}

/* Offsets of the "{}" placeholders, scanning left to right without overlap; returns how many there are (all of
 * them, even beyond cap). */
static int32_t find_placeholders(const char *t, size_t len, size_t *at, int32_t cap) {
    int32_t n = 0;
    for (size_t i = 0; i + 1 < len; i++) {
        if (t[i] == '{' && t[i + 1] == '}') {
            if (n < cap) {
                at[n] = i;
            }
            n++;
            i++;
        }
    }
    return n;
}

caprl_status caprl_reader_template_check(const char *tmpl, size_t len, caprl_error *err) {
    if (memchr(tmpl, '\0', len)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "reader template: contains a NUL byte");
    }
    if (!caprl_utf8_valid(tmpl, len)) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT, "reader template: not valid UTF-8");
    }
    size_t  at[2];
    int32_t n = find_placeholders(tmpl, len, at, 2);
    if (n != 2) {
        return caprl_err_set(err, CAPRL_ERR_FORMAT,
                             "reader template: needs exactly two {} placeholders (caption, then question), found %d",
                             n);
    }
    return CAPRL_OK;
}

caprl_status caprl_reader_prompt(const char *tmpl, const char *caption, const char *question, char **out,
                                 caprl_error *err) {
    size_t len = strlen(tmpl);
    size_t at[2];
    if (find_placeholders(tmpl, len, at, 2) != 2) {
        return caprl_err_set(err, CAPRL_ERR_INVALID_ARG, "reader template: needs exactly two {} placeholders");
    }
    size_t lc = strlen(caption), lq = strlen(question);
    size_t n = len - 4 + lc + lq;
    char  *s = caprl_try_malloc(n + 1);
    if (!s) {
        return caprl_err_set(err, CAPRL_ERR_OOM, "reader prompt: cannot allocate %zu bytes", n + 1);
    }
    size_t o = 0;
    memcpy(s + o, tmpl, at[0]);
    o += at[0];
    memcpy(s + o, caption, lc);
    o += lc;
    memcpy(s + o, tmpl + at[0] + 2, at[1] - at[0] - 2);
    o += at[1] - at[0] - 2;
    memcpy(s + o, question, lq);
    o += lq;
    memcpy(s + o, tmpl + at[1] + 2, len - at[1] - 2);
    o += len - at[1] - 2;
    s[o] = '\0';
    *out = s;
    return CAPRL_OK;
}
