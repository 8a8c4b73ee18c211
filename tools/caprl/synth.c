/* caprl synth: write the synthetic world of the demo (images, QA, captions, SFT data, benchmark, corpus). */
#include <stdio.h>
#include <string.h>

#include "caprl/synth.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

int cmd_synth(int argc, char **argv) {
    static const cmd_info info = {
        "synth",
        "caprl synth --out DIR [--train N] [--test M] [--seed S] [--size PX] [--min-objects A] [--max-objects B]\n"
        "            [--leaky-per-image K] [--qa-per-image Q] [--reader-template FILE] [--threads T]",
        "Write a synthetic world of coloured shapes for the demo: PNG scenes, multiple-choice questions from their\n"
        "ground truth (with planted leaky ones), dense and short captions, SFT data for a captioner, a reader and a\n"
        "curation model, a held-out Prism benchmark and a text corpus for a tokenizer.",
        "Files in DIR (docs/formats.md, \"Synthetic world\"): images/{train,test}/NNNNN.png, scenes.jsonl,\n"
        "train.jsonl (valid + leaky questions), train_valid.jsonl, leaky_ids.json, test_qa.jsonl,\n"
        "captions_dense.jsonl, captions_short.jsonl, sft_captioner.jsonl, sft_describe.jsonl, sft_reader.jsonl,\n"
        "sft_reader_bind.jsonl, sft_filter.jsonl, sft_filter_bind.jsonl, sft_filter_keyed.jsonl, bench.jsonl,\n"
        "corpus.txt and, last, synth.json (the manifest: a directory with it is complete).\n"
        "Each image is a 3x3 grid of PX / 3 pixel cells (84: one cell = one merged vision token) holding 2-6 objects\n"
        "(4 shapes, 6 colours, 2 sizes). The output is the same bytes for the same options at any --threads.\n"
        "Exit codes: 0 ok, 1 usage (including values out of range), 2 the directory cannot be written."};
    caprl_synth_params p = caprl_synth_default_params();
    const char        *out = NULL, *tmpl_path = NULL, *style = "lookup";
    int64_t            seed = 0;
    opt_spec           specs[] = {
        {"out", OPT_STRING, &out, "output directory (created)", 0, 0, "DIR", 0},
        {"train", OPT_INT, &p.n_train, "training images", 0, 1000000, "N", 0},
        {"test", OPT_INT, &p.n_test, "held-out images (test QA and benchmark)", 0, 1000000, "M", 0},
        {"seed", OPT_I64, &seed, "random seed", 0, 9.2e18, "S", 0},
        {"size", OPT_INT, &p.size, "image side in pixels, a multiple of 28", 56, 1120, "PX", 0},
        {"min-objects", OPT_INT, &p.min_objects, "fewest objects per image", 1, 9, "A", 0},
        {"max-objects", OPT_INT, &p.max_objects, "most objects per image", 1, 9, "B", 0},
        {"leaky-per-image", OPT_INT, &p.leaky_per_image, "leaky questions planted per training image", 0, 4, "K", 0},
        {"qa-per-image", OPT_INT, &p.qa_per_image, "valid questions per image", 1, 16, "Q", 0},
        {"threads", OPT_INT, &p.n_threads, THREADS_HELP, 0, 4096, "T", 0},
        {"question-style", OPT_STRING, &style, "how questions ask: lookup (\"Where is the red circle?\"), "
                                               "statement (full descriptions, one true) or absent (lookup with "
                                               "distractors the image lacks)", 0, 0, "S", 0},
        {"reader-template", OPT_STRING, &tmpl_path, "reader prompt template file (two {}) for sft_reader.jsonl; "
                                                  "default: the CapRL prompt", 0, 0, "FILE", 0},
        {0},
    };
    int rc = opts_parse(&info, specs, argc, argv, NULL, 0, NULL);
    if (rc) {
        return rc < 0 ? EXIT_OK : rc;
    }
    if (!out) {
        return tool_usage_error(info.name, "--out is required");
    }
    p.seed = (uint64_t)seed;
    p.question_style = caprl_synth_style_parse(style);
    if (p.question_style < 0) {
        return tool_usage_error(info.name, "--question-style: '%s' is none of lookup, statement, absent", style);
    }
    char *tmpl = NULL;
    if (tmpl_path) {
        size_t len = 0;
        rc = tool_read_file(info.name, tmpl_path, 1 << 20, &tmpl, &len);
        if (rc) {
            return rc;
        }
        p.reader_template = tmpl;
    }
    caprl_error         err = {0};
    caprl_synth_summary sum = {0};
    double              t0 = tool_now();
    caprl_status        st = caprl_synth_write(out, &p, &sum, &err);
    free(tmpl);
    if (st != CAPRL_OK) {
        return tool_fail(info.name, st, err.msg);
    }
    fprintf(stderr,
            "caprl synth: wrote %s: %lld images, %lld training questions (%lld leaky), %lld test questions, "
            "%lld reader records (%lld answer F; %lld more in words, %lld letter-binding), "
            "%lld curation letter-binding, %lld keyed lookups, %.1f MB in %.2f s\n",
            out, (long long)sum.n_images, (long long)sum.n_train_questions, (long long)sum.n_leaky,
            (long long)sum.n_test_questions, (long long)sum.n_reader_records, (long long)sum.n_reader_cannot,
            (long long)sum.n_reader_free, (long long)sum.n_reader_bind, (long long)sum.n_filter_bind,
            (long long)sum.n_filter_keyed, (double)sum.bytes_written / 1e6, tool_now() - t0);
    return EXIT_OK;
}
