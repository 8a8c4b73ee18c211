/* Prism answer scoring against a table of cases derived by hand from the released rules (Eval_CapRL.py's
 * verify_math / verify_chart, math_verify's normalisation (the rows on case, powers, roots, ratios, products, sums,
 * lists and equations checked against math-verify 0.8.0 with latex2sympy2_extended 1.10.2), VLMEvalKit's relaxed_correctness and anls_compute;
 * spec/caprl.md §9.2). Each row says why it scores what it scores. Then the pieces one by one: the boxed-answer
 * pattern, Python's float() and float repr, relaxed correctness with its swapped arguments, ANLS distances, the
 * LaTeX normalisation, list golds, and numpy's pairwise sum. Last, 604 answer/gold pairs scored by the release's
 * own code (scripts/prism_reference.py over math-verify 0.8.0, tests/fixtures/prism_ref/cases.jsonl): caprl gives
 * the same score on each, except the rows marked as known differences. */
#include <jansson.h>

#include "caprl/eval.h"
#include "caprl_test.h"
#include "eval/eval_impl.h"
#include "fmt/pyjson_impl.h"

#define M CAPRL_EVAL_RULE_MATH
#define C CAPRL_EVAL_RULE_CHART
#define I CAPRL_EVAL_RULE_INFO

/* A reader output in the evaluation format with X inside \boxed{}. */
#define W(x) "<think>Reading the caption.</think>\n<answer>The answer is \\boxed{" x "}.</answer>"

typedef struct score_case {
    const char *prediction;
    const char *gold;
    int32_t     rule;
    double      want;
    const char *why;
} score_case;

static const score_case k_cases[] = {
    /* multiple choice: boxed letters through verify_math */
    {W("A"), "A", M, 1, "raw boxed string equals the gold's string form"},
    {W("B"), "A", M, 0, "wrong letter"},
    {W("a"), "A", M, 1, "symbols are lowercased (math_verify's lowercase_symbols)"},
    {W("x"), " \t", M, 1, "a blank gold does not parse: 1 whatever the answer"},
    {W("b"), "A", M, 0, "another letter"},
    {W("(b)"), "B", M, 1, "parentheses unwrapped, then lowercased"},
    {W("\\textbf{(B)}"), "b", M, 1, "\\textbf is \\text, then (B), then b"},
    {W("(A)"), "A", M, 1, "(A) parses to the symbol A"},
    {W("\\text{A}"), "A", M, 1, "\\text{A} is the symbol A"},
    {W(" A "), "A", M, 1, "verify strips both strings"},
    {W("A. Cat"), "A", M, 0, "'A. Cat' does not parse and is not the string 'A'"},
    {"The answer is A", "A", M, 0, "no </think><answer>...\\boxed{} -> answer '' -> 0"},
    {"<answer>\\boxed{A}</answer>", "A", M, 0, "the pattern needs </think> first"},
    {"</think>\\boxed{A}", "A", M, 0, "and an <answer>...</answer> around the box"},
    {"</think>\n\n  <answer>\\boxed{A}</answer>", "A", M, 1, "whitespace between </think> and <answer> is \\s*"},
    {"</think>\xC2\xA0<answer>\\boxed{A}</answer>", "A", M, 1, "\\s* is Unicode whitespace (NBSP)"},
    {"</think> so <answer>\\boxed{A}</answer>", "A", M, 0, "other text between </think> and <answer>"},
    {"</think><answer>\\boxed{A} or \\boxed{B}</answer>", "B", M, 0,
     "greedy capture 'A} or \\boxed{B' normalises to '{B', not B"},
    {"</think><answer>\\boxed{}</answer>", "A", M, 0, "empty box"},
    {"</think><answer>\\boxed{7}</answer> extra } </answer>", "7", M, 0,
     "the capture runs to the last '}' before the last </answer>"},
    {"<think>a</think><answer>x</answer></think><answer>\\boxed{9}</answer>", "9", M, 1,
     "the first </think> is followed by <answer> but the match may start at a later </think>"},
    {"", "A", M, 0, "empty prediction"},
    /* numbers through verify_math */
    {W("42"), "42", M, 1, "same integer"},
    {W("42"), "43", M, 0, "different integer"},
    {W("-5"), "-5", M, 1, "negative"},
    {W("-5"), "5", M, 0, "sign matters"},
    {W("17.0"), "17", M, 1, "a Float against an Integer compares rounded to 6 decimals"},
    {W("17.0000001"), "17", M, 1, "equal after rounding to 6 decimals"},
    {W("17.001"), "17", M, 0, "not equal after rounding"},
    {W("1,000"), "1000", M, 1, "thousands separators (latex2sympy's comma_number_regex)"},
    {W("1,000,000.5"), "1000000.5", M, 1, "separators with a fraction"},
    {W("1,00"), "100", M, 0, "'1,00' is a set, not a number"},
    {W("\\frac{1}{2}"), "0.5", M, 1, "nits turns the gold 0.5 into \\frac{1}{2}: the strings are equal"},
    {W("\\dfrac{3}{4}"), "0.75", M, 1, "\\dfrac -> \\frac; 3/4 against the Float 0.75"},
    {W("3/4"), "0.75", M, 1, "a/b -> \\frac{a}{b}"},
    {W("\\frac{1}{3}"), "0.333333", M, 1, "1/3 rounds to 0.333333"},
    {W("\\frac{1}{3}"), "0.33", M, 0, "0.33 is not 1/3 to 6 decimals"},
    {W("\\frac12"), "0.5", M, 1, "malformed \\frac12 is fixed to \\frac{1}{2}"},
    {W("-\\frac{1}{2}"), "-0.5", M, 1, "negative fraction against a negative Float"},
    {W("1E3"), "1000", M, 1, "E notation is a Float"},
    {W("1e3"), "1000", M, 0, "a lowercase e is Euler's number, not E notation"},
    {W("10^3"), "1000", M, 1, "an integer power is evaluated"},
    {W("2^{-1}"), "0.5", M, 1, "a negative exponent gives a rational"},
    {W("1\\times10^{3}"), "1000", M, 1, "a product of numbers"},
    {W("\\sqrt{16}"), "4", M, 1, "a perfect square root is exact"},
    {W("\\sqrt{12}"), "2\\sqrt{3}", M, 1, "roots compare by value"},
    {W("\\sqrt{2}"), "1.41", M, 0, "sqrt(2) is not 1.41 to 6 decimals"},
    {W("60^\\circ"), "60", M, 1, "a degree sign after a number is dropped"},
    {W("1:3"), "\\frac{1}{3}", M, 1, "a ratio is a quotient"},
    {W("\xe2\x88\x92" "3"), "-3", M, 1, "the Unicode minus sign"},
    {W("y=2"), "x=2", M, 0, "two equations: the left sides differ"},
    {W("X=2"), "x=2", M, 1, "two equations, the same symbol lowercased"},
    {W("x=2"), "2", M, 1, "an equation against a value: its right side"},
    {W("ba"), "AB", M, 1, "a product of letters in any order, lowercased"},
    {W("a2"), "2a", M, 1, "a coefficient on either side"},
    {W("12a"), "a21", M, 0, "but not another coefficient"},
    {W("a-b"), "-b+a", M, 1, "the terms of a sum in any order"},
    {W("C, A"), "A,C", M, 1, "an unbracketed list is a set"},
    {W("(2,1)"), "(1,2)", M, 0, "a bracketed one is ordered"},
    {W("\\text{ab}"), "BA", M, 0, "a \\text{} name against letters: in order only"},
    {W("50\\%"), "50%", M, 1, "percentages on both sides: 50 * 1/100"},
    {W("50 percent"), "50%", M, 1, "'percent' is rewritten to \\%"},
    {W("50"), "50%", M, 0, "50 is not 50%"},
    {W("0.5"), "50%", M, 1, "0.5 -> \\frac{1}{2} equals 50%"},
    {W("12 cm"), "12", M, 1, "trailing unit words are removed"},
    {W("12\\text{ cm}"), "12", M, 1, "a trailing \\text{...} is removed"},
    {W("125 miles"), "125", M, 1, "'mile' + s"},
    {W("5 dollars"), "5", M, 0, "'dollars' is not in the unit list"},
    {W("\\$5"), "5", M, 1, "\\$ is removed"},
    {W("$5$"), "5", M, 1, "$ signs are removed"},
    {W("x = 5"), "5", M, 1, "an equation compares by its right-hand side"},
    {W("\\left( 5 \\right)"), "5", M, 1, "\\left( and \\right) become ( and )"},
    {W("2\\sqrt{3}"), "2 \\sqrt{3}", M, 1, "spacing does not matter in LaTeX"},
    {W("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt{3}}{2}", M, 1, "nested braces are captured whole"},
    {W("3 and 4"), "3, 4", M, 1, "'and' between items becomes ','"},
    /* text answers through verify_math */
    {W("Paris"), "Paris", M, 1, "equal strings"},
    {W("paris"), "Paris", M, 1, "products of letters lowercased"},
    {W("\\text{Paris}"), "\\text{paris}", M, 1, "two \\text{} names compare case-insensitively"},
    {W("\\text{Paris}"), "Paris", M, 1, "a \\text{} name against the same letters, case-insensitively"},
    {W("info"), "info", M, 1, "both sides get the 'inf' -> '\\infty' rewrite, so they still match"},
    /* gold answers that do not parse: verify_math returns 1.0 */
    {W("anything"), "", M, 1, "empty gold: math_parse('$$') is [] -> 1.0"},
    {"no answer at all", "", M, 1, "... even with no boxed answer"},
    {W("x"), "line1\nline2", M, 1, "a newline stops the $...$ pattern -> no parse -> 1.0"},
    {W(" "), " ", M, 1, "a blank gold does not parse either (math-verify 0.8.0: math_parse('$ $') is [])"},
    /* chart sets: relaxed accuracy (relative to the prediction) with x1, x0.01, x100, max with verify_math */
    {W("105"), "100", C, 1, "|100 - 105| / 105 = 0.048 <= 0.05"},
    {W("95"), "100", C, 0, "|100 - 95| / 95 = 0.053 > 0.05 (relative to the gold it would pass)"},
    {W("17.001"), "17", C, 1, "within 5%"},
    {W("0.23"), "23", C, 1, "x100"},
    {W("23"), "0.23", C, 1, "x0.01"},
    {W("50"), "50%", C, 1, "the gold 50% is 0.5, the prediction x0.01 is 0.5"},
    {W("45.5"), "45.5%", C, 1, "x0.01 against a percentage gold"},
    {W("1e3"), "1000", C, 1, "float('1e3')"},
    {W("1,234"), "1234", C, 1, "float() fails on '1,234' but verify_math matches"},
    {W("yes"), "Yes", C, 1, "non-numeric: lowercase comparison"},
    {W("0"), "0", C, 1, "prediction 0: relaxed falls back to '0.0' == '0' (no), verify_math matches"},
    {W("0"), "0.0", C, 1, "str(0.0) == '0.0'"},
    {W("blue"), "['red', 'blue']", C, 1, "a list gold: any element"},
    {W("green"), "['red', 'blue']", C, 0, "no element matches"},
    {W("12"), "[10, 12]", C, 1, "numeric list elements"},
    {W("Mars"), "Venus", C, 0, "different words"},
    {"no box", "12", C, 0, "no boxed answer: '' against '12'"},
    /* InfoVQA-style sets: ANLS similarity counted when >= 0.5 */
    {W("hello world"), "hello wrld", I, 1.0 - 1.0 / 11.0, "distance 1 over length 11"},
    {W("abxy"), "abcd", I, 0.5, "distance 2 over 4: exactly 0.5 counts"},
    {W("axyz"), "abcd", I, 0, "distance 3 over 4: 0.25 < 0.5"},
    {W("abcxyz"), "abcdef", I, 0.5, "3 over 6"},
    {W("abxyz"), "abcde", I, 0, "3 over 5: 0.4"},
    {W("new york"), "New  York", I, 1, "lowercased and whitespace-collapsed: distance 0"},
    {W("abd"), "ab c", I, 0.5, "distance 2 over max(4, 3)"},
    {W("\\text{New York}"), "New York", I, 1,
     "the math rule matches (the name against the same letters); ANLS alone would give 1 - 7 / 15"},
    {W("Paris"), "['paris', 'Lyon']", I, 1, "relaxed matches the first element case-insensitively"},
    {W("\xce\x9f\xce\x94\xce\x9f\xce\xa3"), "\xce\xbf\xce\xb4\xce\xbf\xcf\x82", C, 1,
     "Python's lower() ends a word with the final sigma: ODOS -> odos with U+03C2"},
    {W("\xce\xa3\xce\x91"), "\xcf\x83\xce\xb1", C, 1, "a sigma that starts a word stays U+03C3"},
    {W("\xce\x9f\xce\x94\xce\x9f\xce\xa3"), "\xce\xbf\xce\xb4\xce\xbf\xcf\x83", C, 0,
     "so the non-final form does not match"},
    {W("Pariss"), "['Lyon', 'paris']", I, 1.0 - 1.0 / 6.0, "ANLS takes the closest element"},
    {W("Yes"), "Yes", I, 1, "exact"},
};

static void test_table(void) {
    size_t n = sizeof k_cases / sizeof k_cases[0];
    CHECK(n >= 60);
    for (size_t i = 0; i < n; i++) {
        const score_case *c = &k_cases[i];
        caprl_eval_trace  tr;
        double            got = caprl_eval_score(c->prediction, c->gold, c->rule, &tr);
        CHECK_MSG(fabs(got - c->want) <= 1e-12, "case %zu (%s): got %.17g, want %.17g (%s) [answer '%s', math %g, "
                  "chart %g]", i, caprl_eval_rule_name(c->rule), got, c->want, c->why, tr.answer, tr.math, tr.chart);
        CHECK(caprl_eval_score(c->prediction, c->gold, c->rule, NULL) == got);
    }
}

static void test_trace(void) {
    caprl_eval_trace tr;
    CHECK(caprl_eval_score(W("\\frac{1}{2}"), "0.5", M, &tr) == 1.0);
    CHECK(tr.boxed_found && !tr.gold_unparsed && tr.chart == -1.0);
    CHECK_STR_EQ(tr.answer, "\\frac{1}{2}");
    CHECK(caprl_eval_score("nothing", "", M, &tr) == 1.0);
    CHECK(tr.gold_unparsed && !tr.boxed_found);
    CHECK(caprl_eval_score(W("0.23"), "23", C, &tr) == 1.0);
    CHECK(tr.chart == 1.0 && tr.math == 0.0);
    /* NULL inputs are empty strings; an unknown rule scores as math */
    CHECK(caprl_eval_score(NULL, "A", M, NULL) == 0.0);
    CHECK(caprl_eval_score(W("A"), "A", 99, NULL) == 1.0);
}

static void test_rules(void) {
    CHECK(caprl_eval_rule_for_bench("PATH/lmm_eval_chartqa.json") == C);
    CHECK(caprl_eval_rule_for_bench("lmm_eval_CharXiv.json") == C);
    CHECK(caprl_eval_rule_for_bench("lmm_eval_ChartQA_Pro.json") == C);
    CHECK(caprl_eval_rule_for_bench("lmm_eval_infovqa.json") == I);
    CHECK(caprl_eval_rule_for_bench("lmm_eval_MMStar.json") == M);
    CHECK(caprl_eval_rule_for_bench("lmm_eval_mmmu.json") == M);
    CHECK(caprl_eval_rule_for_bench("lmm_eval_seed2k.json") == M);
    CHECK(caprl_eval_rule_for_bench("lmm_eval_MathVerse_MINIVInt.json") == M);
    CHECK(caprl_eval_rule_for_bench("charts_info.json") == I); /* 'info' wins, as use_anls does */
    CHECK(caprl_eval_rule_for_bench(NULL) == M);
    CHECK(caprl_eval_rule_parse("MCQ") == M && caprl_eval_rule_parse("anls") == I);
    CHECK(caprl_eval_rule_parse("relaxed") == C && caprl_eval_rule_parse("chart") == C);
    CHECK(caprl_eval_rule_parse("bogus") == -1 && caprl_eval_rule_parse(NULL) == -1);
    CHECK_STR_EQ(caprl_eval_rule_name(I), "info");
    CHECK_STR_EQ(caprl_eval_rule_name(7), "unknown");
}

static void check_boxed(const char *text, const char *want) {
    size_t s = 0, n = 0;
    bool   found = caprl_eval_boxed_answer(text, strlen(text), &s, &n);
    if (!want) {
        CHECK_MSG(!found, "%s: matched '%.*s'", text, (int)n, text + s);
    } else {
        CHECK_MSG(found && n == strlen(want) && memcmp(text + s, want, n) == 0, "%s: got '%.*s', want '%s'", text,
                  found ? (int)n : 0, text + s, want);
    }
}

static void test_boxed(void) {
    check_boxed("</think><answer>\\boxed{12}</answer>", "12");
    check_boxed("<think>x</think>  \n<answer>so \\boxed{\\frac{1}{2}} done</answer>", "\\frac{1}{2}");
    check_boxed("</think><answer>\\boxed{a}}}</answer>", "a}}");
    check_boxed("</think><answer>\\boxed{a}</answer> } </answer>", "a}</answer> ");
    check_boxed("</think><answer>\\boxed{a</answer>}", NULL);
    check_boxed("</think><answer>\\boxed{}</answer>", "");
    check_boxed("</think><answer>\\boxed{a}", NULL);
    check_boxed("</think>x<answer>\\boxed{a}</answer>", NULL);
    check_boxed("</think></think><answer>\\boxed{b}</answer>", "b");
    check_boxed("", NULL);
    check_boxed("</answer>", NULL);
}

static void test_py_float(void) {
    struct {
        const char *s;
        bool        ok;
        double      v;
    } cases[] = {
        {"5", true, 5},          {" 5 ", true, 5},       {"-2.5", true, -2.5},   {"+.5", true, 0.5},
        {"5.", true, 5},         {"1e3", true, 1000},    {"1E-2", true, 0.01},   {"1_000", true, 1000},
        {"1__000", false, 0},    {"_1", false, 0},       {"1_", false, 0},       {"", false, 0},
        {"e5", false, 0},        {"1e", false, 0},       {"1,000", false, 0},    {"12%", false, 0},
        {"\\frac{1}{2}", false, 0}, {"0x10", false, 0},  {"1.2.3", false, 0},    {"\xC2\xA0" "7\n", true, 7},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        double v = -1;
        bool   ok = caprl_py_float(cases[i].s, strlen(cases[i].s), &v);
        CHECK_MSG(ok == cases[i].ok && (!ok || v == cases[i].v), "float('%s')", cases[i].s);
    }
    double v;
    CHECK(caprl_py_float("inf", 3, &v) && isinf(v) && v > 0);
    CHECK(caprl_py_float("-Infinity", 9, &v) && isinf(v) && v < 0);
    CHECK(caprl_py_float("NaN", 3, &v) && isnan(v));
    CHECK(!caprl_py_float("infinit", 7, &v));
}

static void test_float_repr(void) {
    struct {
        double      x;
        const char *want;
    } cases[] = {
        {0.1, "0.1"}, {1.0, "1.0"}, {100.0, "100.0"}, {0.5333333333333333, "0.5333333333333333"},
        {1.0 / 3.0, "0.3333333333333333"}, {2.0 / 3.0, "0.6666666666666666"}, {1e16, "1e+16"},
        {1e15, "1000000000000000.0"}, {123456789012345678.0, "1.2345678901234568e+17"}, {0.0001, "0.0001"},
        {0.00001, "1e-05"}, {1.5e-7, "1.5e-07"}, {-0.0, "-0.0"}, {0.0, "0.0"}, {-2.5, "-2.5"},
        {5e-324, "5e-324"}, {1.7976931348623157e308, "1.7976931348623157e+308"}, {0.01 * 17.0, "0.17"},
        {100 * 0.23, "23.0"}, {0.01 * 33.0, "0.33"}, {1e22, "1e+22"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char buf[40];
        caprl_py_float_repr(cases[i].x, buf, sizeof buf);
        CHECK_MSG(strcmp(buf, cases[i].want) == 0, "repr(%.17g) = %s, want %s", cases[i].x, buf, cases[i].want);
    }
    char buf[40];
    caprl_py_float_repr(INFINITY, buf, sizeof buf);
    CHECK_STR_EQ(buf, "inf");
    caprl_py_float_repr(NAN, buf, sizeof buf);
    CHECK_STR_EQ(buf, "nan");
    char small[4];
    CHECK(caprl_py_float_repr(0.5333333333333333, small, sizeof small) == 18);
    CHECK_STR_EQ(small, "0.5");
}

static void test_relaxed(void) {
    /* relaxed_correctness(target, prediction): the relative error is taken against `target`. */
    CHECK(caprl_relaxed_correctness("105", "100"));
    CHECK(!caprl_relaxed_correctness("95", "100"));
    CHECK(caprl_relaxed_correctness("100", "95"));
    CHECK(caprl_relaxed_correctness("50%", "0.5"));
    CHECK(caprl_relaxed_correctness("0.5", "50%"));
    CHECK(!caprl_relaxed_correctness("0.0", "0"));    /* target 0.0 is falsy: string comparison */
    CHECK(caprl_relaxed_correctness("0", "0"));       /* ... which can still match */
    CHECK(caprl_relaxed_correctness("YES", "yes"));
    CHECK(!caprl_relaxed_correctness("yes ", "yes")); /* no strip inside */
    CHECK(caprl_relaxed_correctness("\xC3\x89t\xC3\xA9", "\xC3\xA9T\xC3\x89")); /* Unicode lower() */
    CHECK(!caprl_relaxed_correctness("17% ", "0.17"));  /* '17% ' does not end with '%' and is not a float */
    CHECK(!caprl_relaxed_correctness("nan", "nan"));    /* NaN is truthy but never within 5% */
    CHECK(!caprl_relaxed_correctness("%", "%%") && caprl_relaxed_correctness("%", "%"));
}

static void test_anls(void) {
    CHECK_NEAR(caprl_anls_distance("abcd", "abxy"), 0.5, 0, 1e-15);
    CHECK_NEAR(caprl_anls_distance("hello wrld", "hello world"), 1.0 / 11.0, 0, 1e-15);
    CHECK(caprl_anls_distance("", "") == 0.0);
    CHECK(caprl_anls_distance("abc", "") == 1.0);
    CHECK(caprl_anls_distance("  A  b ", "a b") == 0.0);
    /* lengths are of the originals' upper(): 'ß'.upper() is 'SS', so 1 edit over 3 */
    CHECK_NEAR(caprl_anls_distance("\xC3\x9F" "a", "sa"), 1.0 / 3.0, 0, 1e-15);
    /* code points, not bytes: one substitution over 3 */
    CHECK_NEAR(caprl_anls_distance("caf\xC3\xA9", "cafe"), 1.0 / 4.0, 0, 1e-15);
    CHECK_NEAR(caprl_anls_distance("kitten", "sitting"), 3.0 / 7.0, 0, 1e-15);
}

static void check_norm(const char *in, const char *want) {
    char *got = caprl_math_normalize(in, strlen(in));
    CHECK_MSG(strcmp(got, want) == 0, "normalize('%s') = '%s', want '%s'", in, got, want);
    free(got);
}

static void test_normalize(void) {
    check_norm("\\boxed{5}", "5");
    check_norm("\\boxed{1} and \\boxed{2}", "1,2");
    check_norm("\\boxed{3", "{3");
    check_norm("\\dfrac{1}{2}", "\\frac{1}{2}");
    check_norm("\\mathrm{cm}", "\\text{cm}");
    check_norm("\\left(x\\right)", "(x)");
    check_norm("\\leftarrow", "\\leftarrow");
    check_norm("don't", "dont");
    check_norm("a \\! b", "a b");
    check_norm("28 percent", "28\\%");
    check_norm("Black and white", "Black , white");
    check_norm("color", "color");
    check_norm("infinity", "\\infty");
    check_norm("information", "\\inftyormation");
    check_norm("12 km", "12");
    check_norm("5 m east", "5");
    check_norm("Vitamin d", "Vitamin "); /* the regex keeps its group, the space */
    check_norm("7\\text{ m}^2", "7");
    check_norm("\\text{Evelyn}", "\\text{Evelyn}");
    check_norm(".5", "\\frac{1}{2}"); /* "0" + ".5", then 0.5 -> \frac{1}{2} */
    check_norm("0.5", "\\frac{1}{2}");
    check_norm("\\frac12", "\\frac{1}{2}");
    check_norm("\\frac1{2}", "\\frac{1}{2}");
    check_norm("\\sqrt3", "\\sqrt{3}");
    check_norm("10/9", "\\frac{10}{9}");
    check_norm("010/9", "010/9");
    check_norm("a\\\\frac", "a\\frac");
}

static void test_golds(void) {
    int32_t n;
    char  **g = caprl_eval_golds("['a', \"b\"]", &n);
    CHECK(n == 2 && strcmp(g[0], "a") == 0 && strcmp(g[1], "b") == 0);
    caprl_eval_golds_free(g, n);
    g = caprl_eval_golds("[1, 2.50, 1_0]", &n);
    CHECK(n == 3 && strcmp(g[0], "1") == 0 && strcmp(g[1], "2.5") == 0 && strcmp(g[2], "10") == 0);
    caprl_eval_golds_free(g, n);
    const char *single[] = {"('a', 'b')", "[]", "[['a']]", "abc", "[a]", "['a'"};
    for (size_t i = 0; i < sizeof single / sizeof single[0]; i++) {
        g = caprl_eval_golds(single[i], &n);
        CHECK_MSG(n == 1 && strcmp(g[0], single[i]) == 0, "%s", single[i]);
        caprl_eval_golds_free(g, n);
    }
}

static void test_np_sum(void) {
    /* n < 8: left to right from 0.0 */
    double a[3] = {1e16, 1.0, -1e16};
    CHECK(caprl_np_sum(a, 3) == ((0.0 + 1e16) + 1.0) + -1e16);
    /* 8 <= n <= 128: eight partial sums, combined pairwise, then the remainder */
    double x[17];
    for (int i = 0; i < 17; i++) {
        x[i] = (i % 3 == 0 ? 1e16 : 1.0) * (i % 2 ? -1 : 1) + 0.1 * i;
    }
    double r[8];
    for (int k = 0; k < 8; k++) {
        r[k] = x[k] + x[8 + k];
    }
    double want17 = (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))) + x[16];
    CHECK(caprl_np_sum(x, 17) == want17);
    double want9 = (((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]))) + x[8];
    CHECK(caprl_np_sum(x, 9) == want9);
    /* n > 128 splits at n/2 rounded down to a multiple of 8 */
    double big[300];
    for (int i = 0; i < 300; i++) {
        big[i] = (i % 7) * 0.1 + (i % 11 == 0 ? 1e15 : 0);
    }
    CHECK(caprl_np_sum(big, 300) == caprl_np_sum(big, 144) + caprl_np_sum(big + 144, 156));
    CHECK(caprl_np_sum(big, 156) == caprl_np_sum(big, 72) + caprl_np_sum(big + 72, 84));
    CHECK(caprl_np_sum(NULL, 0) == 0.0);
}

static void test_parsed_answer(void) {
    char *p = caprl_eval_parsed_answer("</think><answer>\\boxed{1} then \\boxed{12 cm}</answer>");
    CHECK_STR_EQ(p, "12");
    caprl_free(p);
    p = caprl_eval_parsed_answer("no box");
    CHECK_STR_EQ(p, "");
    caprl_free(p);
    p = caprl_eval_parsed_answer(NULL);
    CHECK_STR_EQ(p, "");
    caprl_free(p);
}

/* Hostile inputs: huge, binary, deeply nested; nothing may crash or take long. */
static void test_hostile(void) {
    size_t n = 1 << 20;
    char  *big = malloc(n + 64);
    strcpy(big, "</think><answer>\\boxed{");
    size_t k = strlen(big);
    for (size_t i = k; i < n; i++) {
        big[i] = "{}a1 \\%$\n"[i % 9];
    }
    strcpy(big + n, "}</answer>");
    for (int32_t rule = 0; rule < CAPRL_EVAL_RULE_COUNT; rule++) {
        double s = caprl_eval_score(big, "12", rule, NULL);
        CHECK(s >= 0.0 && s <= 1.0);
    }
    for (size_t i = 0; i < n; i++) {
        big[i] = (char)(1 + (i * 131) % 255);
    }
    big[n] = '\0';
    for (int32_t rule = 0; rule < CAPRL_EVAL_RULE_COUNT; rule++) {
        double s = caprl_eval_score(big, big + n - 100, rule, NULL);
        CHECK(s >= 0.0 && s <= 1.0);
    }
    /* Patterns that make naive matchers quadratic, without newlines: 16 KiB (a quadratic pass would take seconds)
     * and just over the parse limit (nothing is parsed). */
    static const char *const units[] = {" ", "^(", "sqrt(", "\\frac{", "(", "{", "\\boxed{", "</think><answer>",
                                        "\\text{", "}", " and", "1,", "\\left", "\\!"};
    for (size_t u = 0; u < sizeof units / sizeof units[0]; u++) {
        const size_t sizes[2] = {16384, (size_t)CAPRL_MATH_MAX_BYTES + 64};
        for (int si = 0; si < 2; si++) {
            size_t total = sizes[si];
            size_t ku = strlen(units[u]), len = 0;
            strcpy(big, "</think><answer>\\boxed{");
            len = strlen(big);
            while (len + ku + 16 < total) {
                memcpy(big + len, units[u], ku);
                len += ku;
            }
            strcpy(big + len, "5}</answer>");
            for (int32_t rule = 0; rule < CAPRL_EVAL_RULE_COUNT; rule++) {
                double sc = caprl_eval_score(big, "5", rule, NULL);
                CHECK(sc >= 0.0 && sc <= 1.0);
            }
            char *pa = caprl_eval_parsed_answer(big);
            caprl_free(pa);
        }
    }
    free(big);
    CHECK(caprl_eval_score(W("\xFF\xFE"), "\xFF\xFE", I, NULL) == 1.0);
}

static void test_release_scores(void) {
    FILE *f = fopen(CAPRL_SOURCE_DIR "/tests/fixtures/prism_ref/cases.jsonl", "r");
    CHECK(f != NULL);
    if (!f) {
        return;
    }
    char   line[8192];
    size_t n = 0, same = 0, known = 0;
    while (fgets(line, sizeof line, f)) {
        json_error_t jerr;
        json_t      *r = json_loads(line, 0, &jerr);
        CHECK_MSG(r != NULL, "prism_ref line %zu: %s", n + 1, jerr.text);
        if (!r) {
            continue;
        }
        const char *type = json_string_value(json_object_get(r, "type"));
        int32_t     rule = strcmp(type, "chart") == 0 ? C : strcmp(type, "info") == 0 ? I : M;
        double      want = json_number_value(json_object_get(r, "release_score"));
        double      got = caprl_eval_score(json_string_value(json_object_get(r, "prediction")),
                                           json_string_value(json_object_get(r, "answer")), rule, NULL);
        bool        differs = fabs(got - want) > 1e-9, expected = json_object_get(r, "known_difference") != NULL;
        CHECK_MSG(differs == expected, "prism_ref line %zu (%s): caprl %.17g, release %.17g%s", n + 1, line, got, want,
                  expected ? " (listed as a known difference, but they agree)" : "");
        same += !differs;
        known += expected;
        n++;
        json_decref(r);
    }
    fclose(f);
    CHECK(n >= 600 && known <= 4);
    CHECK_EQ_I64((int64_t)(same + known), (int64_t)n);
}

int main(void) {
    test_table();
    test_trace();
    test_rules();
    test_boxed();
    test_py_float();
    test_float_repr();
    test_relaxed();
    test_anls();
    test_normalize();
    test_golds();
    test_np_sum();
    test_parsed_answer();
    test_hostile();
    test_release_scores();
    return test_finish("test_eval_score");
}
