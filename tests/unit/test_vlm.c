/* Qwen2.5-VL prompt glue: the spec's M-RoPE worked example, pad expansion, and the chat rendering. */
#include "caprl/tokenizer.h"
#include "caprl/vlm.h"
#include "caprl_test.h"

enum { PAD = 151655, VSTART = 151652, VEND = 151653 };

static void test_mrope_worked_example(void) {
    /* spec/qwen.md §3.10: 15 text tokens (the last <|vision_start|>), an image with Lh = 2, Lw = 3 (grid 1x4x6),
     * then 5 text tokens (the first <|vision_end|>). */
    int32_t ids[26];
    for (int i = 0; i < 14; i++) {
        ids[i] = 100 + i;
    }
    ids[14] = VSTART;
    for (int i = 15; i < 21; i++) {
        ids[i] = PAD;
    }
    ids[21] = VEND;
    for (int i = 22; i < 26; i++) {
        ids[i] = 200 + i;
    }
    int32_t     grid[3] = {1, 4, 6}, pos[3 * 26], delta = 0;
    caprl_error err = {0};
    CHECK_OK(caprl_vl_mrope_positions(ids, 26, PAD, grid, 1, 2, pos, &delta, &err), &err);
    for (int i = 0; i < 15; i++) {
        CHECK(pos[i] == i && pos[26 + i] == i && pos[52 + i] == i);
    }
    const int expect[6][3] = {{15, 15, 15}, {15, 15, 16}, {15, 15, 17}, {15, 16, 15}, {15, 16, 16}, {15, 16, 17}};
    for (int r = 0; r < 6; r++) {
        CHECK_MSG(pos[15 + r] == expect[r][0] && pos[26 + 15 + r] == expect[r][1] && pos[52 + 15 + r] == expect[r][2],
                  "image token %d: (%d, %d, %d)", r, pos[15 + r], pos[41 + r], pos[67 + r]);
    }
    for (int i = 21; i < 26; i++) {
        CHECK_EQ_I64(pos[i], 18 + (i - 21));
        CHECK_EQ_I64(pos[52 + i], 18 + (i - 21));
    }
    CHECK_EQ_I64(delta, -3); /* 23 - 26: the first generated token (cache index 26) gets position 23 */
    /* text only: 0..n-1 and delta 0 */
    CHECK_OK(caprl_vl_mrope_positions(ids, 14, PAD, grid, 0, 2, pos, &delta, &err), &err);
    CHECK(delta == 0 && pos[13] == 13 && pos[14 + 13] == 13);
    /* a pad run of the wrong length is an error */
    ids[20] = 7;
    CHECK(caprl_vl_mrope_positions(ids, 26, PAD, grid, 1, 2, pos, &delta, &err) == CAPRL_ERR_INVALID_ARG);

    /* an image of 3 frames (grid 3 x 4 x 4, 2 x 2 merged tokens per frame) after 2 text tokens: HF
     * get_rope_index scales the frame index by second_per_grid_t, 0 for images, so every frame sits at time 2;
     * the text after it starts at 2 + max(2, 2) = 4 and rope_delta = 6 - 16 = -10 */
    int32_t ids3[16], grid3[3] = {3, 4, 4}, pos3[3 * 16];
    ids3[0] = 100;
    ids3[1] = 101;
    for (int i = 2; i < 14; i++) {
        ids3[i] = PAD;
    }
    ids3[14] = 102;
    ids3[15] = 103;
    CHECK_OK(caprl_vl_mrope_positions(ids3, 16, PAD, grid3, 1, 2, pos3, &delta, &err), &err);
    for (int r = 0; r < 12; r++) {
        int cell = r % 4;
        CHECK_MSG(pos3[2 + r] == 2 && pos3[16 + 2 + r] == 2 + cell / 2 && pos3[32 + 2 + r] == 2 + cell % 2,
                  "frame %d token %d: (%d, %d, %d)", r / 4, cell, pos3[2 + r], pos3[18 + r], pos3[34 + r]);
    }
    CHECK(pos3[14] == 4 && pos3[15] == 5 && pos3[16 + 15] == 5 && pos3[32 + 14] == 4);
    CHECK_EQ_I64(delta, -10);
}

static void test_expand(void) {
    int32_t     ids[5] = {1, PAD, 2, PAD, 3}, *out = NULL;
    int64_t     n_tok[2] = {3, 2}, n_out = 0;
    caprl_error err = {0};
    CHECK_OK(caprl_vl_expand_image_pads(ids, 5, PAD, n_tok, 2, &out, &n_out, &err), &err);
    int32_t want[8] = {1, PAD, PAD, PAD, 2, PAD, PAD, 3};
    CHECK(n_out == 8 && memcmp(out, want, sizeof want) == 0);
    /* already expanded: unchanged */
    int32_t *again = NULL;
    int64_t  n_again = 0;
    CHECK_OK(caprl_vl_expand_image_pads(out, 8, PAD, n_tok, 2, &again, &n_again, &err), &err);
    CHECK(n_again == 8 && memcmp(again, want, sizeof want) == 0);
    caprl_free(out);
    caprl_free(again);
    CHECK(caprl_vl_expand_image_pads(ids, 5, PAD, n_tok, 3, &out, &n_out, &err) == CAPRL_ERR_INVALID_ARG);
    int32_t wrong[6] = {1, PAD, PAD, 2, PAD, 3};
    CHECK(caprl_vl_expand_image_pads(wrong, 6, PAD, n_tok, 2, &out, &n_out, &err) == CAPRL_ERR_INVALID_ARG);
}

static void test_render(void) {
    char       *s = NULL;
    caprl_error err = {0};
    CHECK_OK(caprl_vl_render_prompt("Please describe this image in detail.", 1, NULL, &s, &err), &err);
    CHECK_STR_EQ(s, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Please describe this image in detail.<|im_end|>\n"
                    "<|im_start|>assistant\n");
    caprl_free(s);
    CHECK_OK(caprl_vl_render_prompt("Q", 2, "", &s, &err), &err);
    CHECK_STR_EQ(s, "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|>"
                    "<|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n");
    caprl_free(s);
}

int main(void) {
    test_mrope_worked_example();
    test_expand();
    test_render();
    return test_finish("test_vlm");
}
