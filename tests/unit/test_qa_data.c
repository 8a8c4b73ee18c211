/* QA sets: caprl QA JSONL and released training records (spec/caprl.md §7.6) load into the same list; the
 * restricted Python-literal reader decodes what Python's str(list) writes and refuses anything else; malformed
 * records fail with file and line, or are skipped and counted with skip_bad. */
#include <sys/stat.h>

#include "caprl/qa.h"
#include "caprl_test.h"
#include "data/data_impl.h"

static char g_tmp[4096];

static void write_file(const char *name, const char *text) {
    char path[4300];
    snprintf(path, sizeof path, "%s/%s", g_tmp, name);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static const char *tmp_path(const char *name) {
    static char path[4300];
    snprintf(path, sizeof path, "%s/%s", g_tmp, name);
    return path;
}

/* ---- Python literals ---------------------------------------------------------------------------------------- */

static void check_pylit_str(const char *lit, const char *want, size_t want_len) {
    caprl_pylit v;
    caprl_error err = {0};
    caprl_status st = caprl_pylit_parse(lit, strlen(lit), &v, &err);
    CHECK_MSG(st == CAPRL_OK, "%s: %s", lit, err.msg);
    if (st == CAPRL_OK) {
        CHECK_MSG(v.kind == CAPRL_PYLIT_STR && v.len == want_len && memcmp(v.str, want, want_len) == 0, "%s -> %s", lit,
                  v.str ? v.str : "(null)");
    }
    caprl_pylit_free(&v);
}

static void check_pylit_bad(const char *lit) {
    caprl_pylit v;
    caprl_error err = {0};
    CHECK_MSG(caprl_pylit_parse(lit, strlen(lit), &v, &err) == CAPRL_ERR_FORMAT, "accepted: %s", lit);
    CHECK(v.kind == 0 && v.str == NULL && v.items == NULL);
    CHECK(strncmp(err.msg, "offset ", 7) == 0);
}

static void test_pylit(void) {
    check_pylit_str("'abc'", "abc", 3);
    check_pylit_str("\"it's\"", "it's", 4);
    check_pylit_str("'a\\nb\\tc\\\\d\\'e'", "a\nb\tc\\d'e", 9);
    check_pylit_str("'\\x41\\101\\u00e9\\U0001F600'", "AA\xC3\xA9\xF0\x9F\x98\x80", 8);
    check_pylit_str("'\\0'", "\0", 1);
    check_pylit_str("'\\d\\frac'", "\\d\f" "rac", 6);      /* unknown escapes stay as written; \f is form feed */
    check_pylit_str("r'\\n\\frac'", "\\n\\frac", 7);       /* raw */
    check_pylit_str("R'a\\'b'", "a\\'b", 4);               /* a raw backslash still protects the quote */
    check_pylit_str("u'x'", "x", 1);
    check_pylit_str("'''a\nb'''", "a\nb", 3);
    check_pylit_str("\"\"\"q\"x\"\"\"", "q\"x", 3);
    check_pylit_str("'a' \"b\"  'c'", "abc", 3);          /* implicit concatenation */
    check_pylit_str("'a\\\nb'", "ab", 2);                  /* escaped newline */
    check_pylit_str("  ('x')  ", "x", 1);                  /* parentheses alone make no tuple */
    check_pylit_str("'\xC3\xA9'", "\xC3\xA9", 2);

    caprl_pylit v;
    caprl_error err = {0};
    const char *lit = "[('Q1\\n   - A) a\\n   - B) b', 'B'), ['Q2', \"A\"],]";
    CHECK_OK(caprl_pylit_parse(lit, strlen(lit), &v, &err), &err);
    CHECK(v.kind == CAPRL_PYLIT_LIST && v.n_items == 2);
    if (v.n_items == 2) {
        CHECK(v.items[0].kind == CAPRL_PYLIT_TUPLE && v.items[0].n_items == 2);
        CHECK(v.items[1].kind == CAPRL_PYLIT_LIST && v.items[1].n_items == 2);
        CHECK_STR_EQ(v.items[0].items[0].str, "Q1\n   - A) a\n   - B) b");
        CHECK_STR_EQ(v.items[1].items[1].str, "A");
    }
    caprl_pylit_free(&v);
    CHECK_OK(caprl_pylit_parse("('x',)", 6, &v, &err), &err);
    CHECK(v.kind == CAPRL_PYLIT_TUPLE && v.n_items == 1);
    caprl_pylit_free(&v);
    CHECK_OK(caprl_pylit_parse("[1, -2.5e3, ()]", 15, &v, &err), &err);
    CHECK(v.n_items == 3 && v.items[1].kind == CAPRL_PYLIT_NUM && strcmp(v.items[1].str, "-2.5e3") == 0);
    CHECK(v.items[2].kind == CAPRL_PYLIT_TUPLE && v.items[2].n_items == 0);
    caprl_pylit_free(&v);

    check_pylit_bad("__import__('os').system('true')");
    check_pylit_bad("[('a', 'B')] + [('c', 'D')]");
    check_pylit_bad("['a' 'b' 'c'");
    check_pylit_bad("'abc");
    check_pylit_bad("'a\nb'");
    check_pylit_bad("b'bytes'");
    check_pylit_bad("f'{x}'");
    check_pylit_bad("['a', None]");
    check_pylit_bad("['a' # comment\n]");
    check_pylit_bad("'\\ud800'");
    check_pylit_bad("'\\U00110000'");
    check_pylit_bad("'\\x4'");
    check_pylit_bad("'\\N{BULLET}'");
    check_pylit_bad("'\xFF'");
    check_pylit_bad("['a'] ['b']");
    check_pylit_bad("");
    check_pylit_bad("['a', 'b' 'c' 'd', 'e' ,, ]");
    /* Depth is bounded: a hostile run of brackets is an error, not a stack overflow. */
    char deep[4096];
    memset(deep, '[', 4000);
    deep[4000] = '\0';
    check_pylit_bad(deep);
}

/* ---- question strings ------------------------------------------------------------------------------------- */

static void test_check_question(void) {
    int32_t     n = 0;
    caprl_error err = {0};
    CHECK_OK(caprl_qa_check_question("Q?\n   - A) a\n   - B) b", 'B', &n, &err), &err);
    CHECK(n == 2);
    CHECK_OK(caprl_qa_check_question("Q?\n   - A) a\n   - B) b\n   - C) c\n   - D) d\n   - E) Can not answer based on "
                                     "the caption", 'D', &n, &err), &err);
    CHECK(n == 5);
    CHECK_OK(caprl_qa_check_question("Q?\n- A)a\n\n  -B) b  \n", 'A', &n, &err), &err); /* released regex: \s* */
    CHECK(n == 2);
    const char *bad[] = {
        "",                                  /* no question */
        "   \n   - A) a\n   - B) b",         /* empty question line */
        "Q?",                                /* no options */
        "Q?\n   - A) a\n   B) b",            /* no dash */
        "Q?\n   - A) a\n   - B) ",           /* empty option */
        "Q?\n   - A) a\n   \n   - B) b",    /* a blank, non-empty line (the release's regex raises on it) */
        "Q?\n   - A) a\n   - G) g",          /* beyond F */
        "Q?\n   - A) a\n   - b) b",          /* lowercase label */
        "Q\xFF?\n   - A) a\n   - B) b",      /* invalid UTF-8 */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_MSG(caprl_qa_check_question(bad[i], 'A', NULL, &err) == CAPRL_ERR_FORMAT, "accepted bad[%zu]", i);
    }
    /* What the released shuffle_options takes, caprl takes: labels with gaps or repeated (a repeat keeps its
     * first place), the regex searched in the stripped line (text before the dash, Unicode indentation), a gold
     * outside the labels (presented unshuffled with F appended: the release's fallback), the "cannot answer" line
     * anywhere, its letter as the gold. */
    const char *accepted[] = {
        "Q?\n   - A) a\n   - C) c",
        "Q?\n   - A) a\n   - A) b\n   - B) c",
        "Q?\n   foo - A) a\n\xe3\x80\x80- B) b",
        "Q?\n   - A) a\n   - E) Can not answer based on the caption\n   - B) b",
    };
    const int32_t accepted_n[] = {2, 2, 2, 3};
    for (size_t i = 0; i < sizeof accepted / sizeof accepted[0]; i++) {
        n = 0;
        CHECK_MSG(caprl_qa_check_question(accepted[i], 'A', &n, &err) == CAPRL_OK, "refused accepted[%zu]: %s", i,
                  err.msg);
        CHECK_MSG(n == accepted_n[i], "accepted[%zu]: %d options", i, n);
    }
    CHECK_OK(caprl_qa_check_question("Q?\n   - A) a\n   - B) b", 'C', NULL, &err), &err);
    CHECK_OK(caprl_qa_check_question("Q?\n   - A) a\n   - B) b\n   - E) Can not answer based on the caption", 'E', &n,
                                     &err), &err);
    CHECK(n == 3);
}

/* ---- loading ---------------------------------------------------------------------------------------------- */

static void test_load_caprl(void) {
    write_file("a.jsonl",
               "{\"id\": \"img1\", \"image\": \"imgs/1.png\", \"qa\": [{\"question\": \"What color?\\n   - A) Red\\n   - "
               "B) Blue\", \"answer\": \"B\"}, {\"question\": \"How many?\\n   - A) 1\\n   - B) 2\\n   - C) 3\", "
               "\"answer\": \" C \"}]}\r\n"
               "\n"
               "   \n"
               "{\"image\": \"/abs/2.jpg\", \"qa\": [{\"question\": \"Q\\n   - A) x\\n   - B) y\", \"answer\": \"A\"}],"
               " \"extra\": 1}\n");
    caprl_qa_set s;
    caprl_error  err = {0};
    CHECK_OK(caprl_qa_set_load(&s, tmp_path("a.jsonl"), false, &err), &err);
    CHECK(s.n_images == 2 && s.n_bad == 0);
    CHECK(caprl_qa_set_n_questions(&s) == 3);
    if (s.n_images == 2) {
        char want[4300];
        snprintf(want, sizeof want, "%s/imgs/1.png", g_tmp);
        CHECK_STR_EQ(s.images[0].image, want);
        CHECK_STR_EQ(s.images[0].image_raw, "imgs/1.png");
        CHECK_STR_EQ(s.images[0].id, "img1");
        CHECK(s.images[0].n_qa == 2 && s.images[0].line == 1);
        CHECK_STR_EQ(s.images[0].qa[0].question, "What color?\n   - A) Red\n   - B) Blue");
        CHECK(s.images[0].qa[0].gold == 'B' && s.images[0].qa[1].gold == 'C');
        CHECK_STR_EQ(s.images[1].image, "/abs/2.jpg");
        CHECK_STR_EQ(s.images[1].id, "/abs/2.jpg"); /* no id: the image path */
        CHECK(s.images[1].line == 4);
    }
    caprl_qa_set_free(&s);
    CHECK(s.images == NULL && s.n_images == 0);
    caprl_qa_set_free(&s);
    caprl_qa_set_free(NULL);
}

/* A released record as OpenRLHF reads it: "message" is a JSON string of the three messages, and the answer
 * message holds str(list of tuples). */
static void test_load_released(void) {
    write_file("r.jsonl",
               "{\"message\": \"[{\\\"role\\\": \\\"system\\\", \\\"content\\\": \\\"You are...\\\"}, {\\\"role\\\": "
               "\\\"user\\\", \\\"content\\\": [{\\\"type\\\": \\\"image\\\", \\\"image\\\": \\\"pics/cat.png\\\"}, "
               "{\\\"type\\\": \\\"text\\\", \\\"text\\\": \\\"x\\\"}]}, {\\\"role\\\": \\\"answer\\\", \\\"content\\\": "
               "\\\"[('What is it?\\\\\\\\n   - A) A dog\\\\\\\\n   - B) A cat\\\\\\\\n   - E) Can not answer based on "
               "the caption', 'B'), (\\\\\\\"It's a \\\\\\\\\\\\\\\\frac?\\\\\\\\n   - A) yes\\\\\\\\n   - B) no\\\\\\\", "
               "'A')]\\\"}]\"}\n"
               /* the same record with "message" already a list, mixed into the same file */
               "{\"message\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": \"file:///data/x.png\"}]},"
               " {\"role\": \"answer\", \"content\": \"[('Q?\\\\n   - A) 1\\\\n   - B) 2', 'A')]\"}]}\n");
    caprl_qa_set s;
    caprl_error  err = {0};
    CHECK_OK(caprl_qa_set_load(&s, tmp_path("r.jsonl"), false, &err), &err);
    CHECK(s.n_images == 2);
    if (s.n_images == 2) {
        CHECK_STR_EQ(s.images[0].image_raw, "pics/cat.png");
        CHECK_STR_EQ(s.images[0].id, "pics/cat.png");
        CHECK(s.images[0].n_qa == 2);
        if (s.images[0].n_qa == 2) {
            CHECK_STR_EQ(s.images[0].qa[0].question,
                         "What is it?\n   - A) A dog\n   - B) A cat\n   - E) Can not answer based on the caption");
            CHECK(s.images[0].qa[0].gold == 'B');
            CHECK_STR_EQ(s.images[0].qa[1].question, "It's a \\frac?\n   - A) yes\n   - B) no");
            CHECK(s.images[0].qa[1].gold == 'A');
        }
        CHECK_STR_EQ(s.images[1].image, "/data/x.png");
        CHECK(s.images[1].n_qa == 1 && s.images[1].qa[0].gold == 'A');
    }
    caprl_qa_set_free(&s);
}

/* A JSON array of records (a dataset saved with json.dump) loads like JSON Lines; a bad element is named by its
 * position and skipped under skip_bad. */
static void test_load_array(void) {
    write_file("arr.json",
               "[{\"image\": \"a.png\", \"qa\": [{\"question\": \"Q?\\n   - A) x\\n   - B) y\", \"answer\": \"B\"}]},\n"
               " {\"message\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": \"b.png\"}]},"
               " {\"role\": \"answer\", \"content\": \"[('Q?\\\\n   - A) 1\\\\n   - B) 2', 'A')]\"}]},\n"
               " {\"image\": \"c.png\", \"qa\": []}]\n");
    caprl_qa_set s;
    caprl_error  err = {0};
    CHECK(caprl_qa_set_load(&s, tmp_path("arr.json"), false, &err) == CAPRL_ERR_FORMAT);
    char where[4400];
    snprintf(where, sizeof where, "%s:3: ", tmp_path("arr.json"));
    CHECK_MSG(strncmp(err.msg, where, strlen(where)) == 0, "%s", err.msg);
    CHECK_OK(caprl_qa_set_load(&s, tmp_path("arr.json"), true, &err), &err);
    CHECK(s.n_images == 2 && s.n_bad == 1);
    if (s.n_images == 2) {
        CHECK_STR_EQ(s.images[0].image_raw, "a.png");
        CHECK(s.images[0].qa[0].gold == 'B');
        CHECK_STR_EQ(s.images[1].image_raw, "b.png");
        CHECK(s.images[1].qa[0].gold == 'A');
    }
    caprl_qa_set_free(&s);
    write_file("arr_bad.json", "[{\"image\": \"a.png\",");
    CHECK(caprl_qa_set_load(&s, tmp_path("arr_bad.json"), true, &err) == CAPRL_ERR_FORMAT);
}

typedef struct bad_case {
    const char *line;
    const char *needle; /* expected in the message */
} bad_case;

static void test_bad_records(void) {
    const bad_case cases[] = {
        {"{\"image\": \"a.png\", \"qa\": [", "invalid JSON"},
        {"[1, 2]", "object"},
        {"{\"qa\": []}", "image"},
        {"{\"image\": \"a.png\", \"qa\": []}", "no question"},
        {"{\"image\": \"a.png\", \"qa\": {}}", "qa"},
        {"{\"image\": \"a.png\", \"qa\": [{\"question\": \"Q\\n   - A) a\\n   - B) b\", \"answer\": \"c\"}]}", "single letter"},
        {"{\"image\": \"a.png\", \"qa\": [{\"question\": \"Q\\n   - A) a\\n   - B) b\", \"answer\": \"B) b\"}]}",
         "single letter"},
        {"{\"image\": \"a.png\", \"qa\": [{\"question\": \"Q\\n   - A) a\\n   b\", \"answer\": \"A\"}]}", "option line"},
        {"{\"image\": \"a.png\", \"qa\": [{\"question\": 5, \"answer\": \"A\"}]}", "question"},
        {"{\"something\": 1}", "neither"},
        {"{\"message\": \"[{\\\"role\\\": \\\"answer\\\", \\\"content\\\": \\\"[]\\\"}]\"}", "image"},
        {"{\"message\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": \"a.png\"}]}, {\"role\": "
         "\"answer\", \"content\": \"__import__('os').system('echo hi')\"}]}", "Python list literal"},
        {"{\"message\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\", \"image\": \"a.png\"}]}, {\"role\": "
         "\"answer\", \"content\": \"[('Q\\\\n   - A) a\\\\n   - B) b', 'B', 'x')]\"}]}", "pair"},
        {"{\"message\": \"not json\"}", "message"},
    };
    const char *good = "{\"image\": \"ok.png\", \"qa\": [{\"question\": \"Q\\n   - A) a\\n   - B) b\", \"answer\": \"A\"}]}";
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char text[4096];
        snprintf(text, sizeof text, "%s\n%s\n%s\n", good, cases[i].line, good);
        write_file("bad.jsonl", text);
        caprl_qa_set s;
        caprl_error  err = {0};
        caprl_status st = caprl_qa_set_load(&s, tmp_path("bad.jsonl"), false, &err);
        CHECK_MSG(st == CAPRL_ERR_FORMAT, "case %zu accepted", i);
        char where[4400];
        snprintf(where, sizeof where, "%s:2: ", tmp_path("bad.jsonl"));
        CHECK_MSG(strncmp(err.msg, where, strlen(where)) == 0, "case %zu: message \"%s\" does not start with %s", i,
                  err.msg, where);
        CHECK_MSG(strstr(err.msg, cases[i].needle) != NULL, "case %zu: \"%s\" lacks \"%s\"", i, err.msg,
                  cases[i].needle);
        CHECK(s.images == NULL && s.n_images == 0);
        /* skip_bad: the record is dropped and counted; the good ones stay. */
        CHECK_OK(caprl_qa_set_load(&s, tmp_path("bad.jsonl"), true, &err), &err);
        CHECK(s.n_images == 2 && s.n_bad == 1);
        if (s.n_images == 2) {
            CHECK(s.images[0].line == 1 && s.images[1].line == 3);
        }
        caprl_qa_set_free(&s);
    }
    /* Nothing valid at all is an error even with skip_bad; so are a missing file and an empty one. */
    write_file("allbad.jsonl", "{\"x\": 1}\n{\"y\": 2}\n");
    caprl_qa_set s;
    caprl_error  err = {0};
    CHECK(caprl_qa_set_load(&s, tmp_path("allbad.jsonl"), true, &err) == CAPRL_ERR_FORMAT);
    CHECK(strstr(err.msg, "no valid QA record (2 malformed)") != NULL);
    write_file("empty.jsonl", "");
    CHECK(caprl_qa_set_load(&s, tmp_path("empty.jsonl"), true, &err) == CAPRL_ERR_FORMAT);
    CHECK(caprl_qa_set_load(&s, tmp_path("missing.jsonl"), true, &err) == CAPRL_ERR_IO);
    CHECK(caprl_qa_set_load(&s, NULL, true, &err) == CAPRL_ERR_INVALID_ARG);
    /* Binary garbage is malformed records, never a crash. */
    char bin[600];
    for (size_t i = 0; i < sizeof bin - 1; i++) {
        bin[i] = (char)(1 + (i * 37) % 255);
    }
    bin[sizeof bin - 1] = '\0';
    write_file("bin.jsonl", bin);
    CHECK(caprl_qa_set_load(&s, tmp_path("bin.jsonl"), false, &err) == CAPRL_ERR_FORMAT);
    CHECK(caprl_qa_set_load(&s, tmp_path("bin.jsonl"), true, &err) == CAPRL_ERR_FORMAT);
}

int main(void) {
    char *dir = test_tmpdir("test_qa_data");
    snprintf(g_tmp, sizeof g_tmp, "%s", dir);
    free(dir);
    caprl_log_set_level(CAPRL_LOG_ERROR); /* skip_bad warnings are expected here */
    test_pylit();
    test_check_question();
    test_load_caprl();
    test_load_released();
    test_load_array();
    test_bad_records();
    return test_finish("test_qa_data");
}
