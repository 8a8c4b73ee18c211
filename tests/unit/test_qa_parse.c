/* QA extraction from raw generator outputs (spec/caprl.md §7.2–§7.3): the prompt's own example format, messy
 * variants a 72B model writes, and hostile outputs; every dropped item is counted with its reason. */
#include "caprl/qa.h"
#include "caprl_test.h"

static caprl_qa_parse_result parse(const char *text) {
    caprl_qa_parse_result r;
    caprl_error           err = {0};
    CHECK_OK(caprl_qa_parse_response(text, strlen(text), NULL, &r, &err), &err);
    return r;
}

static int32_t count_reason(const caprl_qa_parse_result *r, int32_t reason) {
    int32_t n = 0;
    for (int32_t i = 0; i < r->n_drops; i++) {
        n += r->drops[i].reason == reason;
    }
    return n;
}

/* The exact format of the generation prompt (Fig. 18), five questions, trailing spaces after the answers. */
static const char *k_well_formed =
    "#### 1. **Which method achieves the highest accuracy (Acc) on the FF++ (HQ) dataset?**\n"
    "   - A) Method \"a\"\n"
    "   - B) Method \"b\"\n"
    "   - C) Method \"c\"\n"
    "   - D) Ours\n"
    "\n"
    "**Answer:** D) Ours   \n"
    "------\n"
    "#### 2. **What is the primary color of the kayak in the image?**\n"
    "   - A) Blue\n"
    "   - B) Red\n"
    "   - C) Black\n"
    "   - D) White\n"
    "\n"
    "**Answer:** B) Red \n"
    "------\n"
    "#### 3. **How many people are in the boat?**\n"
    "   - A) 1\n"
    "   - B) 2\n"
    "   - C) 3\n"
    "   - D) 4\n"
    "\n"
    "**Answer:** A) 1\n"
    "------\n"
    "#### 4. **What is written on the sign?**\n"
    "   - A) STOP\n"
    "   - B) EXIT\n"
    "   - C) OPEN\n"
    "   - D) SALE\n"
    "\n"
    "**Answer:** C) OPEN\n"
    "------\n"
    "#### 5. **Which season is shown?**\n"
    "   - A) Winter\n"
    "   - B) Spring\n"
    "   - C) Summer\n"
    "   - D) Autumn\n"
    "\n"
    "**Answer:** D) Autumn\n"
    "------\n";

static void test_well_formed(void) {
    caprl_qa_parse_result r = parse(k_well_formed);
    CHECK(r.n_items == 5 && r.n_drops == 0 && !r.gaps);
    if (r.n_items == 5) {
        CHECK_STR_EQ(r.items[0].question, "Which method achieves the highest accuracy (Acc) on the FF++ (HQ) dataset?\n"
                                          "   - A) Method \"a\"\n   - B) Method \"b\"\n   - C) Method \"c\"\n   - D) Ours");
        CHECK(r.items[0].gold == 'D');
        CHECK_STR_EQ(r.items[1].question, "What is the primary color of the kayak in the image?\n   - A) Blue\n"
                                          "   - B) Red\n   - C) Black\n   - D) White");
        CHECK(r.items[1].gold == 'B' && r.items[2].gold == 'A' && r.items[3].gold == 'C' && r.items[4].gold == 'D');
        /* Every question string passes the loader's check (the form the reward parses). */
        for (int32_t i = 0; i < r.n_items; i++) {
            caprl_error err = {0};
            int32_t     n = 0;
            CHECK_OK(caprl_qa_check_question(r.items[i].question, r.items[i].gold, &n, &err), &err);
            CHECK(n == 4);
        }
    }
    caprl_qa_parse_result_free(&r);
    CHECK(r.items == NULL && r.n_items == 0);
    caprl_qa_parse_result_free(&r);
    caprl_qa_parse_result_free(NULL);

    /* append_cannot_answer adds the released "E) Can not answer ..." line. */
    caprl_qa_parse_params p = caprl_qa_parse_default_params();
    CHECK(p.max_options == 4 && p.max_question_bytes == 4096 && !p.append_cannot_answer);
    p.append_cannot_answer = true;
    caprl_error err = {0};
    CHECK_OK(caprl_qa_parse_response(k_well_formed, strlen(k_well_formed), &p, &r, &err), &err);
    CHECK(r.n_items == 5);
    if (r.n_items == 5) {
        CHECK_STR_EQ(r.items[1].question, "What is the primary color of the kayak in the image?\n   - A) Blue\n"
                                          "   - B) Red\n   - C) Black\n   - D) White\n"
                                          "   - E) Can not answer based on the caption");
        CHECK_OK(caprl_qa_check_question(r.items[1].question, 'B', NULL, &err), &err);
    }
    caprl_qa_parse_result_free(&r);
}

static void test_messy(void) {
    /* CRLF, a preamble, missing bold and ####, "A." options, tabs, blank lines between options, numbering gaps,
     * answers in several spellings, explanations after the answer. */
    const char *text =
        "Here are five questions about the image:\r\n"
        "\r\n"
        "#### 1. What color is the car?\r\n"
        "  - A) Red\r\n"
        "\r\n"
        "  - B)   Blue  \r\n"
        "  - C) Green\r\n"
        "  - D) Black\r\n"
        "Answer: B\r\n"
        "Explanation: the car is clearly blue.\r\n"
        "---\r\n"
        "**2. How many wheels are visible?**\n"
        "A. Two\n"
        "B. Three\n"
        "C. Four\n"
        "D. Five\n"
        "**Answer: C**\n"
        "\n"
        "### 4.   **What is the weather like?**   \n"
        "\t-\tA)\tSunny\n"
        "   - **B)** Rainy\n"
        "   - C) Snowy\n"
        "   - D) Foggy\n"
        "**Correct answer:** (A) Sunny\n"
        "#### 5.\n"
        "**Where is the car parked?**\n"
        "- A) Street\n"
        "- B) Garage\n"
        "\n"
        "**Answer**: A) Street.\r"
        "#### 6. **Is the text legible?**\n"
        "   (A) Yes\n"
        "   (B) No\n"
        "Answer\xEF\xBC\x9A B";
    caprl_qa_parse_result r = parse(text);
    CHECK_MSG(r.n_items == 5 && r.n_drops == 0, "%d items, %d drops", r.n_items, r.n_drops);
    CHECK(r.gaps); /* 1, 2, 4, 5, 6 */
    if (r.n_items == 5) {
        CHECK_STR_EQ(r.items[0].question, "What color is the car?\n   - A) Red\n   - B) Blue\n   - C) Green\n"
                                          "   - D) Black");
        CHECK(r.items[0].gold == 'B');
        CHECK_STR_EQ(r.items[1].question, "How many wheels are visible?\n   - A) Two\n   - B) Three\n   - C) Four\n"
                                          "   - D) Five");
        CHECK(r.items[1].gold == 'C');
        CHECK_STR_EQ(r.items[2].question, "What is the weather like?\n   - A) Sunny\n   - B) Rainy\n   - C) Snowy\n"
                                          "   - D) Foggy");
        CHECK(r.items[2].gold == 'A');
        CHECK_STR_EQ(r.items[3].question, "Where is the car parked?\n   - A) Street\n   - B) Garage");
        CHECK(r.items[3].gold == 'A');
        CHECK_STR_EQ(r.items[4].question, "Is the text legible?\n   - A) Yes\n   - B) No");
        CHECK(r.items[4].gold == 'B');
    }
    caprl_qa_parse_result_free(&r);

    /* A question without a header: its text is the line before the options. */
    r = parse("Some intro.\n**What animal is shown?**\n- A) Cat\n- B) Dog\n**Answer:** B) Dog\n"
              "Which side is the dog on?\n- A) Left\n- B) Right\nAnswer: A\n");
    CHECK(r.n_items == 2 && r.n_drops == 0);
    if (r.n_items == 2) {
        CHECK_STR_EQ(r.items[0].question, "What animal is shown?\n   - A) Cat\n   - B) Dog");
        CHECK_STR_EQ(r.items[1].question, "Which side is the dog on?\n   - A) Left\n   - B) Right");
        CHECK(r.items[1].gold == 'A');
    }
    caprl_qa_parse_result_free(&r);

    /* A question split over two lines before its options is joined with a space. */
    r = parse("#### 1. **Which of these\nis largest?**\n- A) x\n- B) y\n**Answer:** A) x\n");
    CHECK(r.n_items == 1);
    if (r.n_items == 1) {
        CHECK_STR_EQ(r.items[0].question, "Which of these is largest?\n   - A) x\n   - B) y");
    }
    caprl_qa_parse_result_free(&r);
}

typedef struct hostile_case {
    const char *text;
    int32_t     reason; /* the single expected drop */
    int32_t     kept;
} hostile_case;

static void test_hostile(void) {
    const hostile_case cases[] = {
        {"#### 1. **Q?**\n- A) a\n- B) b\n- C) c", CAPRL_QA_DROP_TRUNCATED, 0},
        {"#### 1. **Q?**", CAPRL_QA_DROP_TRUNCATED, 0},
        {"#### 1. **Q?**\n- A) a\n- B) b\n------\n#### 2. **R?**\n- A) a\n- B) b\n**Answer:** A",
         CAPRL_QA_DROP_NO_ANSWER, 1},
        {"#### 1. **Q?**\n**Answer:** A\n", CAPRL_QA_DROP_NO_OPTIONS, 0},
        {"- A) a\n- B) b\n**Answer:** A\n", CAPRL_QA_DROP_NO_QUESTION, 0},
        {"#### 1. **Q?**\n- A) a\n**Answer:** A\n", CAPRL_QA_DROP_TOO_FEW_OPTIONS, 0},
        {"#### 1. **Q?**\n- A) a\n- B) b\n- C) c\n- D) d\n- E) e\n**Answer:** A\n", CAPRL_QA_DROP_TOO_MANY_OPTIONS, 0},
        {"#### 1. **Q?**\n- A) a\n- B) b\n- D) d\n**Answer:** A\n", CAPRL_QA_DROP_BAD_LABELS, 0},
        {"#### 1. **Q?**\n- A) a\n- A) b\n**Answer:** A\n", CAPRL_QA_DROP_BAD_LABELS, 0},
        {"#### 1. **Q?**\n- A) a\n- B)\n**Answer:** A\n", CAPRL_QA_DROP_EMPTY_OPTION, 0},
        {"#### 1. **Q?**\n- A) Red\n- B) red.\n**Answer:** A\n", CAPRL_QA_DROP_DUPLICATE_OPTIONS, 0},
        {"#### 1. **Q?**\n- A) a\n- B) b\n**Answer:** C) c\n", CAPRL_QA_DROP_ANSWER_NOT_IN_OPTIONS, 0},
        {"#### 1. **Q?**\n- A) a\n- B) b\n**Answer:** the second one\n", CAPRL_QA_DROP_BAD_ANSWER, 0},
        {"#### 1. **Q?**\n- A) Red\n- B) Blue\n**Answer:** A) Blue\n", CAPRL_QA_DROP_ANSWER_MISMATCH, 0},
        {"#### 1. **Q?**\n- A) a\n- B) b\n**Answer:** A\n**Answer:** B\n", CAPRL_QA_DROP_CONFLICTING_ANSWERS, 0},
        {"#### 1. **Q?**\n- A) a\n- B) b\n**Answer:** A\n#### 2. **q?**\n- A) c\n- B) d\n**Answer:** B\n",
         CAPRL_QA_DROP_DUPLICATE_QUESTION, 1},
        {"#### 1. **Q\x01?**\n- A) a\n- B) b\n**Answer:** A\n", CAPRL_QA_DROP_BAD_TEXT, 0},
        {"#### 1. **Q?**\n- A) \xFF\xFE\n- B) b\n**Answer:** A\n", CAPRL_QA_DROP_BAD_TEXT, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        caprl_qa_parse_result r = parse(cases[i].text);
        CHECK_MSG(r.n_drops == 1 && r.drops[0].reason == cases[i].reason && r.n_items == cases[i].kept,
                  "case %zu: %d drops (first %s), %d kept", i, r.n_drops,
                  r.n_drops ? caprl_qa_drop_reason_name(r.drops[0].reason) : "-", r.n_items);
        caprl_qa_parse_result_free(&r);
    }
    /* The answer is an answer whose letter is real even when its text repeats the option (case, punctuation). */
    caprl_qa_parse_result r = parse("#### 1. **Q?**\n- A) Red\n- B) Blue\n**Answer:** B) blue.\n");
    CHECK(r.n_items == 1 && r.n_drops == 0 && r.items[0].gold == 'B');
    caprl_qa_parse_result_free(&r);
    /* Drop records carry the item number and its first line. */
    r = parse("intro\n#### 7. **Q?**\n- A) a\n**Answer:** A\n");
    CHECK(r.n_drops == 1 && r.drops[0].number == 7 && r.drops[0].line == 2);
    caprl_qa_parse_result_free(&r);
    /* max_options 5 keeps a five-option question; too long is measured on the whole question string. */
    caprl_qa_parse_params p = caprl_qa_parse_default_params();
    p.max_options = 5;
    caprl_error err = {0};
    const char *five = "#### 1. **Q?**\n- A) a\n- B) b\n- C) c\n- D) d\n- E) e\n**Answer:** E\n";
    CHECK_OK(caprl_qa_parse_response(five, strlen(five), &p, &r, &err), &err);
    CHECK(r.n_items == 1 && r.items[0].gold == 'E');
    caprl_qa_parse_result_free(&r);
    p = caprl_qa_parse_default_params();
    p.max_question_bytes = 20;
    const char *two = "#### 1. **Q?**\n- A) a\n- B) b\n**Answer:** A\n";
    CHECK_OK(caprl_qa_parse_response(two, strlen(two), &p, &r, &err), &err);
    CHECK(r.n_items == 0 && r.n_drops == 1 && r.drops[0].reason == CAPRL_QA_DROP_TOO_LONG);
    caprl_qa_parse_result_free(&r);
    /* bad params */
    p = caprl_qa_parse_default_params();
    p.max_options = 7;
    CHECK(caprl_qa_parse_response(two, strlen(two), &p, &r, &err) == CAPRL_ERR_INVALID_ARG);
    CHECK(r.items == NULL && r.drops == NULL);
    CHECK(caprl_qa_parse_response(NULL, 5, NULL, &r, &err) == CAPRL_ERR_INVALID_ARG);
    /* empty and whitespace-only responses hold nothing */
    CHECK_OK(caprl_qa_parse_response(NULL, 0, NULL, &r, &err), &err);
    CHECK(r.n_items == 0 && r.n_drops == 0);
    r = parse(" \n\r\n\t\n");
    CHECK(r.n_items == 0 && r.n_drops == 0);
    caprl_qa_parse_result_free(&r);
    CHECK_STR_EQ(caprl_qa_drop_reason_name(CAPRL_QA_DROP_NO_ANSWER), "no_answer");
    CHECK_STR_EQ(caprl_qa_drop_reason_name(CAPRL_QA_DROP_COUNT), "unknown");
    CHECK_STR_EQ(caprl_qa_drop_reason_name(-1), "unknown");
    for (int32_t i = 0; i < CAPRL_QA_DROP_COUNT; i++) {
        CHECK(strcmp(caprl_qa_drop_reason_name(i), "unknown") != 0);
    }
}

/* Binary noise, NUL bytes, a megabyte of repeated items and runaway output: bounded, no crash. */
static void test_noise(void) {
    size_t n = 1 << 20;
    char  *buf = malloc(n);
    for (size_t i = 0; i < n; i++) {
        buf[i] = (char)((i * 2654435761u) >> 13);
    }
    caprl_qa_parse_result r;
    caprl_error           err = {0};
    CHECK_OK(caprl_qa_parse_response(buf, n, NULL, &r, &err), &err);
    for (int32_t i = 0; i < r.n_items; i++) {
        CHECK(caprl_qa_check_question(r.items[i].question, r.items[i].gold, NULL, &err) == CAPRL_OK);
    }
    caprl_qa_parse_result_free(&r);
    /* A NUL inside an item drops it, never truncates it silently. */
    const char nul[] = "#### 1. **Q?**\n- A) a\0b\n- B) b\n**Answer:** A\n";
    CHECK_OK(caprl_qa_parse_response(nul, sizeof nul - 1, NULL, &r, &err), &err);
    CHECK(r.n_items == 0 && r.n_drops == 1 && r.drops[0].reason == CAPRL_QA_DROP_BAD_TEXT);
    caprl_qa_parse_result_free(&r);
    /* runaway: thousands of distinct valid items; at most CAPRL_QA_PARSE_MAX_ITEMS are kept */
    size_t pos = 0;
    for (int i = 0; pos + 200 < n; i++) {
        pos += (size_t)snprintf(buf + pos, n - pos, "#### %d. **Question %d?**\n- A) x%d\n- B) y%d\n**Answer:** A\n", i + 1,
                                i, i, i);
    }
    CHECK_OK(caprl_qa_parse_response(buf, pos, NULL, &r, &err), &err);
    CHECK(r.n_items == CAPRL_QA_PARSE_MAX_ITEMS);
    CHECK(r.n_drops > 1000 && count_reason(&r, CAPRL_QA_DROP_TOO_MANY_ITEMS) == r.n_drops);
    caprl_qa_parse_result_free(&r);
    /* one enormous line */
    memset(buf, 'x', n);
    memcpy(buf, "#### 1. **", 10);
    CHECK_OK(caprl_qa_parse_response(buf, n, NULL, &r, &err), &err);
    CHECK(r.n_items == 0 && r.n_drops == 1);
    caprl_qa_parse_result_free(&r);
    free(buf);
}

int main(void) {
    test_well_formed();
    test_messy();
    test_hostile();
    test_noise();
    return test_finish("test_qa_parse");
}
