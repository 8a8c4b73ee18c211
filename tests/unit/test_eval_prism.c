/* Prism benchmarks and results: the released lmm_eval JSON and caprl's simple JSONL load into the same items; the
 * stage-2 prompt replaces the image placeholder as Python's str.replace does; BoN / Mean on hand-computed
 * examples; the two result files byte for byte as Python's json.dump writes them (expected texts produced with
 * Python 3's json module). */
#include "caprl/eval.h"
#include "caprl_test.h"
#include "eval/eval_impl.h"

static char g_tmp[4096];

static const char *tmp_path(const char *name) {
    static char path[4300];
    snprintf(path, sizeof path, "%s/%s", g_tmp, name);
    return path;
}

static void write_file(const char *name, const char *text) {
    FILE *f = fopen(tmp_path(name), "wb");
    CHECK(f != NULL);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    char  *buf = malloc(1 << 20);
    size_t n = fread(buf, 1, (1 << 20) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static const char *k_released =
    "[\n"
    " {\"image\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": \"imgs/a.png\", \"max_pixels\": "
    "1003520}]}], \"prompt\": \"<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>What is x?<|im_end|>\", "
    "\"answer\": \"12\", \"meta\": {\"k\": [1, 2.5, null, true]}},\n"
    " {\"image\": \"file:///abs/b.png\", \"prompt\": \"no placeholder\", \"answer\": [\"red\", \"it's\"]},\n"
    " {\"image\": {\"image\": \"c.png\", \"min_pixels\": 3136}, \"prompt\": \"p\", \"answer\": 3, \"id\": \"c-1\"}\n"
    "]\n";

static const char *k_simple =
    "{\"image\": \"b.png\", \"question\": \"Q\xC3\xA9?\", \"answer\": 3.5, \"type\": \"chart\", \"id\": 7}\n"
    "\n"
    "{\"image\": \"d.png\", \"question\": \"Which?\\n(A) x\\n(B) y\", \"answer\": \"B\"}\n";

static void test_load(void) {
    write_file("lmm_eval_chartqa.json", k_released);
    caprl_eval_bench b;
    caprl_error      err = {0};
    CHECK_OK(caprl_eval_bench_load(&b, tmp_path("lmm_eval_chartqa.json"), NULL, &err), &err);
    CHECK(b.n_items == 3 && b.n_bad == 0);
    if (b.n_items == 3) {
        caprl_eval_item *a = &b.items[0];
        char             want[4400];
        snprintf(want, sizeof want, "%s/imgs/a.png", g_tmp);
        CHECK_STR_EQ(a->image, want);
        CHECK_STR_EQ(a->image_raw, "imgs/a.png");
        CHECK(a->max_pixels == 1003520 && a->min_pixels == 0);
        CHECK(a->format == CAPRL_EVAL_FORMAT_RELEASED && a->question == NULL);
        CHECK(a->rule == CAPRL_EVAL_RULE_CHART); /* from the file name, as the release's path test */
        CHECK_STR_EQ(a->id, "0");
        CHECK_STR_EQ(a->answer, "12");
        CHECK_STR_EQ(a->prompt, "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is x?<|im_end|>");
        CHECK_STR_EQ(a->record_json,
                     "{\"image\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": \"imgs/a.png\", "
                     "\"max_pixels\": 1003520}]}], \"prompt\": \"<|im_start|>user\\n<|vision_start|><|image_pad|>"
                     "<|vision_end|>What is x?<|im_end|>\", \"answer\": \"12\", \"meta\": {\"k\": [1, 2.5, null, true]}}");
        CHECK_STR_EQ(b.items[1].image, "/abs/b.png");
        CHECK_STR_EQ(b.items[1].answer, "['red', \"it's\"]"); /* Python str() of a list */
        CHECK_STR_EQ(b.items[2].answer, "3");
        CHECK_STR_EQ(b.items[2].id, "c-1");
        CHECK(b.items[2].min_pixels == 3136);
    }
    caprl_eval_bench_free(&b);
    CHECK(b.items == NULL && b.n_items == 0);
    caprl_eval_bench_free(NULL);

    write_file("simple.jsonl", k_simple);
    CHECK_OK(caprl_eval_bench_load(&b, tmp_path("simple.jsonl"), NULL, &err), &err);
    CHECK(b.n_items == 2);
    if (b.n_items == 2) {
        CHECK(b.items[0].format == CAPRL_EVAL_FORMAT_SIMPLE);
        CHECK(b.items[0].rule == CAPRL_EVAL_RULE_CHART && b.items[1].rule == CAPRL_EVAL_RULE_MATH);
        CHECK_STR_EQ(b.items[0].id, "7");
        CHECK_STR_EQ(b.items[1].id, "1");
        CHECK_STR_EQ(b.items[0].answer, "3.5");
        CHECK_STR_EQ(b.items[0].question, "Q\xC3\xA9?");
        CHECK_STR_EQ(b.items[0].prompt, CAPRL_PRISM_SIMPLE_PROMPT_HEAD "Q\xC3\xA9?" CAPRL_PRISM_SIMPLE_PROMPT_TAIL);
        CHECK_STR_EQ(b.items[0].record_json,
                     "{\"image\": \"b.png\", \"question\": \"Q\\u00e9?\", \"answer\": 3.5, \"type\": \"chart\", \"id\": 7}");
    }
    caprl_eval_bench_free(&b);

    /* A forced rule overrides both "type" and the file name. */
    caprl_eval_bench_params p = caprl_eval_bench_default_params();
    CHECK(p.rule == -1 && !p.skip_bad);
    p.rule = CAPRL_EVAL_RULE_INFO;
    CHECK_OK(caprl_eval_bench_load(&b, tmp_path("simple.jsonl"), &p, &err), &err);
    CHECK(b.n_items == 2 && b.items[0].rule == CAPRL_EVAL_RULE_INFO && b.items[1].rule == CAPRL_EVAL_RULE_INFO);
    caprl_eval_bench_free(&b);

    /* the release lowercases its whole --data-path: a folder named Charts/ makes a chart set; a released record's
     * other keys, "type" among them, are ignored */
    char dir[4400];
    snprintf(dir, sizeof dir, "mkdir -p '%s/Charts'", g_tmp);
    CHECK(system(dir) == 0);
    write_file("Charts/lmm_eval_x.json",
               "[{\"image\": \"/abs/a.png\", \"prompt\": \"P\", \"answer\": \"1\", \"type\": \"open\"}]");
    CHECK_OK(caprl_eval_bench_load(&b, tmp_path("Charts/lmm_eval_x.json"), NULL, &err), &err);
    CHECK(b.n_items == 1 && b.items[0].rule == CAPRL_EVAL_RULE_CHART);
    caprl_eval_bench_free(&b);
    /* image_root (the release's --image-root) takes the relative paths */
    p = caprl_eval_bench_default_params();
    p.image_root = "/data/root";
    CHECK_OK(caprl_eval_bench_load(&b, tmp_path("lmm_eval_chartqa.json"), &p, &err), &err);
    CHECK(b.n_items == 3);
    if (b.n_items == 3) {
        CHECK_STR_EQ(b.items[0].image, "/data/root/imgs/a.png");
        CHECK_STR_EQ(b.items[1].image, "/abs/b.png");
    }
    caprl_eval_bench_free(&b);
}

static void test_bad(void) {
    const char *bad_lines[] = {
        "{\"image\": \"a.png\", \"answer\": \"1\"}",                              /* neither prompt nor question */
        "{\"image\": \"a.png\", \"question\": \"q\"}",                            /* no answer */
        "{\"question\": \"q\", \"answer\": \"1\"}",                               /* no image */
        "{\"image\": \"a.png\", \"question\": \"q\", \"answer\": 1, \"type\": \"x\"}", /* unknown type */
        "{\"image\": 5, \"prompt\": \"p\", \"answer\": 1}",                       /* image not found */
        "{\"image\": \"a.png\", \"question\": \"q\", \"answer\": 1",               /* invalid JSON */
        "[1]",                                                                     /* not an object */
    };
    for (size_t i = 0; i < sizeof bad_lines / sizeof bad_lines[0]; i++) {
        char text[1024];
        snprintf(text, sizeof text, "{\"image\": \"ok.png\", \"question\": \"q\", \"answer\": \"A\"}\n%s\n",
                 bad_lines[i]);
        write_file("bad.jsonl", text);
        caprl_eval_bench b;
        caprl_error      err = {0};
        CHECK_MSG(caprl_eval_bench_load(&b, tmp_path("bad.jsonl"), NULL, &err) == CAPRL_ERR_FORMAT, "case %zu", i);
        CHECK_MSG(strstr(err.msg, "bad.jsonl: line 2") != NULL, "case %zu: %s", i, err.msg);
        caprl_eval_bench_params p = caprl_eval_bench_default_params();
        p.skip_bad = true;
        CHECK_OK(caprl_eval_bench_load(&b, tmp_path("bad.jsonl"), &p, &err), &err);
        CHECK(b.n_items == 1 && b.n_bad == 1);
        caprl_eval_bench_free(&b);
    }
    write_file("bad.json", "[{\"image\": \"a.png\", \"question\": \"q\", \"answer\": 1}, 5]");
    caprl_eval_bench b;
    caprl_error      err = {0};
    CHECK(caprl_eval_bench_load(&b, tmp_path("bad.json"), NULL, &err) == CAPRL_ERR_FORMAT);
    CHECK(strstr(err.msg, "bad.json: record 1") != NULL);
    write_file("empty.json", "[]");
    CHECK(caprl_eval_bench_load(&b, tmp_path("empty.json"), NULL, &err) == CAPRL_ERR_FORMAT);
    write_file("obj.json", "[{\"a\": 1}");
    CHECK(caprl_eval_bench_load(&b, tmp_path("obj.json"), NULL, &err) == CAPRL_ERR_FORMAT);
    CHECK(caprl_eval_bench_load(&b, tmp_path("missing.json"), NULL, &err) == CAPRL_ERR_IO);
}

static void test_reader_prompt(void) {
    int32_t n = -1;
    char   *p = caprl_prism_reader_prompt(CAPRL_PRISM_IMAGE_PLACEHOLDER "What is x?<|im_end|>", "A red car", &n);
    CHECK(n == 1);
    CHECK_STR_EQ(p, "<|im_start|>user\nHere is a detailed caption of an image: A red car. Please answer the question "
                    "based on the caption.What is x?<|im_end|>");
    caprl_free(p);
    /* every occurrence, like str.replace */
    p = caprl_prism_reader_prompt("a" CAPRL_PRISM_IMAGE_PLACEHOLDER CAPRL_PRISM_IMAGE_PLACEHOLDER "b", "c", &n);
    CHECK(n == 2);
    CHECK_STR_EQ(p, "a" CAPRL_PRISM_CAPTION_PREFIX "c" CAPRL_PRISM_CAPTION_SUFFIX CAPRL_PRISM_CAPTION_PREFIX
                    "c" CAPRL_PRISM_CAPTION_SUFFIX "b");
    caprl_free(p);
    p = caprl_prism_reader_prompt("no placeholder", "c", &n);
    CHECK(n == 0);
    CHECK_STR_EQ(p, "no placeholder");
    caprl_free(p);
    /* the caption is inserted as is, even when it contains the placeholder itself */
    p = caprl_prism_reader_prompt(CAPRL_PRISM_IMAGE_PLACEHOLDER, CAPRL_PRISM_IMAGE_PLACEHOLDER, NULL);
    CHECK_STR_EQ(p, CAPRL_PRISM_CAPTION_PREFIX CAPRL_PRISM_IMAGE_PLACEHOLDER CAPRL_PRISM_CAPTION_SUFFIX);
    caprl_free(p);
    CHECK_STR_EQ(CAPRL_PRISM_CAPTION_PROMPT, "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Please "
                                             "describe this image in detail<|im_end|>\n<|im_start|>assistant\n");
}

static void test_aggregate(void) {
    /* By hand: maxima 1, 0, 1 -> BoN 2/3; means 0.5, 0, (0.5333333333333333 + 1) / 4 = 0.3833333333333333 ->
     * Mean (0.5 + 0 + 0.3833333333333333) / 3 = 0.29444444444444445 (values from Python float arithmetic). */
    const double s1[4] = {1, 0, 0, 1}, s2[4] = {0, 0, 0, 0}, s3[4] = {0.5333333333333333, 1, 0, 0};
    caprl_prism_record r[4];
    memset(r, 0, sizeof r);
    r[0].n = r[1].n = r[2].n = 4;
    r[0].scores = s1;
    r[1].scores = s2;
    r[2].scores = s3;
    r[3].n = 0; /* skipped */
    caprl_prism_metrics m;
    caprl_prism_aggregate(r, 4, &m);
    CHECK(m.n_items == 3 && m.n_answers == 12);
    CHECK(m.bon == 2.0 / 3.0);
    CHECK(m.mean == 0.29444444444444445);
    CHECK(m.bon == 0.6666666666666666);
    char *line = caprl_prism_summary_line(&m);
    CHECK_STR_EQ(line, "BoN: 0.6666666666666666 Mean: 0.29444444444444445");
    caprl_free(line);
    /* BoN >= Mean always; a single caption makes them equal */
    const double one[1] = {0.5};
    caprl_prism_record single = {0};
    single.n = 1;
    single.scores = one;
    caprl_prism_aggregate(&single, 1, &m);
    CHECK(m.bon == 0.5 && m.mean == 0.5);
    caprl_prism_aggregate(NULL, 0, &m);
    CHECK(m.bon == 0 && m.mean == 0 && m.n_items == 0);
    line = caprl_prism_summary_line(&m);
    CHECK_STR_EQ(line, "BoN: 0 Mean: 0");
    caprl_free(line);
    /* 20 items of 4 captions: the means go through numpy's pairwise sum (8 partial sums beyond 8 items) */
    double             sc[20][4];
    caprl_prism_record rr[20];
    double             bons[20], means[20];
    memset(rr, 0, sizeof rr);
    for (int i = 0; i < 20; i++) {
        for (int j = 0; j < 4; j++) {
            sc[i][j] = ((i * 7 + j * 3) % 10) / 10.0;
        }
        rr[i].n = 4;
        rr[i].scores = sc[i];
        bons[i] = sc[i][0];
        for (int j = 1; j < 4; j++) {
            bons[i] = sc[i][j] > bons[i] ? sc[i][j] : bons[i];
        }
        means[i] = ((((0.0 + sc[i][0]) + sc[i][1]) + sc[i][2]) + sc[i][3]) / 4.0;
    }
    caprl_prism_aggregate(rr, 20, &m);
    double p8[8];
    for (int k = 0; k < 8; k++) {
        p8[k] = means[k] + means[8 + k];
    }
    double want = ((((p8[0] + p8[1]) + (p8[2] + p8[3])) + ((p8[4] + p8[5]) + (p8[6] + p8[7]))) + means[16] + means[17] +
                   means[18] + means[19]) / 20.0;
    CHECK(m.mean == want);
    CHECK(m.bon == caprl_np_sum(bons, 20) / 20.0);
}

/* json.dumps(details, indent=4) from Python 3 for the records below. */
static const char *k_details_want =
    "[\n"
    "    [\n"
    "        {\n"
    "            \"image\": [\n"
    "                {\n"
    "                    \"role\": \"user\",\n"
    "                    \"content\": [\n"
    "                        {\n"
    "                            \"type\": \"image\",\n"
    "                            \"image\": \"imgs/a.png\",\n"
    "                            \"max_pixels\": 1003520\n"
    "                        }\n"
    "                    ]\n"
    "                }\n"
    "            ],\n"
    "            \"prompt\": \"<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>What is x?<|im_end|>\",\n"
    "            \"answer\": \"12\",\n"
    "            \"meta\": {\n"
    "                \"k\": [\n"
    "                    1,\n"
    "                    2.5,\n"
    "                    null,\n"
    "                    true\n"
    "                ]\n"
    "            }\n"
    "        },\n"
    "        [\n"
    "            1.0,\n"
    "            0.0,\n"
    "            0.5333333333333333\n"
    "        ],\n"
    "        [\n"
    "            \"12\",\n"
    "            \"\",\n"
    "            \"\\\\text{a}\"\n"
    "        ],\n"
    "        [\n"
    "            10,\n"
    "            0,\n"
    "            3\n"
    "        ],\n"
    "        [\n"
    "            \"cap one\",\n"
    "            \"cap \\\"two\\\"\",\n"
    "            \"c3\",\n"
    "            \"<think>x</think>\",\n"
    "            \"out2\",\n"
    "            \"\\u00e9\\ud83d\\ude00\\u007f\"\n"
    "        ]\n"
    "    ],\n"
    "    [\n"
    "        {\n"
    "            \"image\": \"b.png\",\n"
    "            \"question\": \"Q\\u00e9?\",\n"
    "            \"answer\": 3.5,\n"
    "            \"type\": \"chart\",\n"
    "            \"id\": 7\n"
    "        },\n"
    "        [\n"
    "            0.0\n"
    "        ],\n"
    "        [\n"
    "            \"\"\n"
    "        ],\n"
    "        [\n"
    "            0\n"
    "        ],\n"
    "        [\n"
    "            \"c\",\n"
    "            \"o\"\n"
    "        ]\n"
    "    ]\n"
    "]";

static void test_write(void) {
    caprl_eval_bench a, s;
    caprl_error      err = {0};
    CHECK_OK(caprl_eval_bench_load(&a, tmp_path("lmm_eval_chartqa.json"), NULL, &err), &err);
    CHECK_OK(caprl_eval_bench_load(&s, tmp_path("simple.jsonl"), NULL, &err), &err);
    if (a.n_items < 1 || s.n_items < 1) {
        return;
    }
    const double       sc1[3] = {1.0, 0.0, 0.5333333333333333}, sc2[1] = {0.0};
    const char        *pa1[3] = {"12", "", "\\text{a}"};
    const int64_t      tk1[3] = {10, 0, 3};
    const char        *cap1[3] = {"cap one", "cap \"two\"", "c3"};
    const char        *out1[3] = {"<think>x</think>", "out2", "\xC3\xA9\xF0\x9F\x98\x80\x7F"};
    const char        *cap2[1] = {"c"}, *out2[1] = {"o"};
    caprl_prism_record r[2];
    memset(r, 0, sizeof r);
    r[0] = (caprl_prism_record){a.items[0].record_json, 3, sc1, pa1, tk1, cap1, out1};
    r[1] = (caprl_prism_record){s.items[0].record_json, 1, sc2, NULL, NULL, cap2, out2};
    char *details = caprl_prism_details_path(g_tmp, "chartqa", 1800);
    char *eval = caprl_prism_eval_path(g_tmp, "chartqa", 1800);
    char  want[4400];
    snprintf(want, sizeof want, "%s/Prism_chartqa_step_details_1800_final.json", g_tmp);
    CHECK_STR_EQ(details, want);
    snprintf(want, sizeof want, "%s/Prism_chartqa_step_eval_1800_final.json", g_tmp);
    CHECK_STR_EQ(eval, want);
    CHECK_OK(caprl_prism_write_details(details, r, 2, &err), &err);
    char *got = read_text(details);
    CHECK(got && strcmp(got, k_details_want) == 0);
    if (got && strcmp(got, k_details_want) != 0) {
        fprintf(stderr, "got:\n%s\n", got);
    }
    free(got);
    caprl_prism_metrics m;
    caprl_prism_aggregate(r, 2, &m);
    /* (1 + 0) / 2 and ((1 + 0 + 0.5333333333333333) / 3 + 0) / 2 in Python float arithmetic */
    CHECK(m.bon == 0.5 && m.mean == 0.25555555555555554);
    CHECK_OK(caprl_prism_write_eval(eval, &m, &err), &err);
    got = read_text(eval);
    CHECK_STR_EQ(got, "[\"BoN: 0.5 Mean: 0.25555555555555554\"]");
    free(got);
    /* no records: "[]"; a bad record is refused and leaves the old file */
    CHECK_OK(caprl_prism_write_details(details, NULL, 0, &err), &err);
    got = read_text(details);
    CHECK_STR_EQ(got, "[]");
    free(got);
    r[1].n = 0;
    CHECK(caprl_prism_write_details(details, r, 2, &err) == CAPRL_ERR_INVALID_ARG);
    r[1].n = 1;
    r[1].record_json = "{not json";
    CHECK(caprl_prism_write_details(details, r, 2, &err) == CAPRL_ERR_FORMAT);
    got = read_text(details);
    CHECK_STR_EQ(got, "[]");
    free(got);
    char bad[4400];
    snprintf(bad, sizeof bad, "%s/no/such/dir/x.json", g_tmp);
    CHECK(caprl_prism_write_eval(bad, &m, &err) == CAPRL_ERR_IO);
    caprl_free(details);
    caprl_free(eval);
    caprl_eval_bench_free(&a);
    caprl_eval_bench_free(&s);
}

int main(void) {
    char *dir = test_tmpdir("test_eval_prism");
    snprintf(g_tmp, sizeof g_tmp, "%s", dir);
    free(dir);
    caprl_log_set_level(CAPRL_LOG_ERROR); /* skip_bad warnings are expected */
    test_load();
    test_bad();
    test_reader_prompt();
    test_aggregate();
    test_write();
    return test_finish("test_eval_prism");
}
