/* caprl tokenizer <subcommand>: tokenizer tools. A table of subcommands, each with its own option table, so more can
 * join "train" (e.g. inspecting or converting a tokenizer.json) without touching the dispatcher. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/tokenizer.h"
#include "commands.h"
#include "common.h"
#include "opts.h"

#define MAX_CORPUS_BYTES ((size_t)1 << 31)

/* Copies argv into kept[] (same order), except each "--NAME VALUE" or "--NAME=VALUE" of a repeatable option, whose
 * VALUEs go to values[]. Values of the other options are skipped over by their spec, so an option value that
 * happens to read "--NAME" is not taken for the option. Returns 0 or a usage exit code. */
static int take_repeated(const cmd_info *info, const opt_spec *specs, const char *name, int argc, char **argv,
                         char **kept, int *n_kept, const char **values, int *n_values) {
    size_t nlen = strlen(name);
    *n_kept     = 0;
    *n_values   = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (i > 0 && strncmp(a, "--", 2) == 0 && strncmp(a + 2, name, nlen) == 0 &&
            (a[2 + nlen] == '\0' || a[2 + nlen] == '=')) {
            if (a[2 + nlen] == '=') {
                values[(*n_values)++] = a + 3 + nlen;
            } else if (i + 1 < argc) {
                values[(*n_values)++] = argv[++i];
            } else {
                return tool_usage_error(info->name, "--%s needs a value", name);
            }
            continue;
        }
        kept[(*n_kept)++] = argv[i];
        if (i > 0 && strncmp(a, "--", 2) == 0 && strchr(a, '=') == NULL) {
            for (const opt_spec *s = specs; s->type != OPT_END; s++) {
                if (s->type != OPT_FLAG && strcmp(a + 2, s->name) == 0 && i + 1 < argc) {
                    kept[(*n_kept)++] = argv[++i];
                    break;
                }
            }
        }
    }
    kept[*n_kept] = NULL;
    return 0;
}

/* ---- caprl tokenizer train ---------------------------------------------------------------------------------- */

static int cmd_tokenizer_train(int argc, char **argv) {
    static const cmd_info info = {
        "tokenizer train",
        "caprl tokenizer train --corpus FILE --vocab-size N --out tokenizer.json [--special TOKEN]... [options]",
        "Train a byte-level BPE tokenizer on a UTF-8 text file and write it as a Hugging Face tokenizer.json shaped\n"
        "like Qwen2's (NFC, the Qwen2 pre-split regex + ByteLevel, BPE), loadable by caprl and by `tokenizers`.",
        "The vocab holds the 256 byte tokens (ids 0..255), then the merged tokens, then the added tokens: Qwen2's 22\n"
        "(<|endoftext|>, <|im_start|>, <|im_end|>, <|vision_start|>, <|image_pad|>, ... with Qwen2's special\n"
        "flags) unless --no-qwen-specials, then each --special TOKEN (repeatable, special). Added tokens in the\n"
        "corpus are cut out of it before counting, as encoding does. Each step merges the most frequent pair of\n"
        "adjacent tokens; ties go to the pair whose left, then right, token comes first in byte order. The output\n"
        "is the same for the same inputs, byte for byte, and is written atomically (a temporary file, then a\n"
        "rename)."};
    caprl_bpe_train_params p = caprl_bpe_train_default_params();
    const char *corpus = NULL, *out = NULL, *special_help = NULL;
    bool        quiet = false;
    opt_spec    specs[] = {
        {"corpus", OPT_STRING, &corpus, "training text (UTF-8)", 0, 0, "FILE", 0},
        {"vocab-size", OPT_INT, &p.vocab_size, "total ids: 256 bytes + merges + added tokens", 1, 1 << 24, "N", 0},
        {"out", OPT_STRING, &out, "tokenizer.json to write", 0, 0, "FILE", 0},
        {"special", OPT_STRING, &special_help, "add a special token (repeatable)", 0, 0, "TOKEN", 0},
        {"qwen-specials", OPT_FLAG, &p.qwen_added, "add Qwen2's 22 added tokens first", 0, 0, NULL, 0},
        {"min-frequency", OPT_INT, &p.min_frequency, "merge only pairs seen at least this often", 1, 1e9, "N", 0},
        {"quiet", OPT_FLAG, &quiet, "no summary on stderr", 0, 0, NULL, 0},
        {0},
    };
    char       **kept     = tool_xmalloc(((size_t)argc + 1) * sizeof *kept);
    const char **specials = tool_xmalloc(((size_t)argc + 1) * sizeof *specials);
    int          n_kept = 0, n_specials = 0;
    int          rc = take_repeated(&info, specs, "special", argc, argv, kept, &n_kept, specials, &n_specials);
    if (rc == 0) {
        rc = opts_parse(&info, specs, n_kept, kept, NULL, 0, NULL);
    }
    if (rc == 0 && (corpus == NULL || out == NULL)) {
        rc = tool_usage_error(info.name, "--corpus FILE and --out FILE are required");
    }
    char  *text = NULL;
    size_t len  = 0;
    if (rc == 0) {
        rc = tool_read_file(info.name, corpus, MAX_CORPUS_BYTES, &text, &len);
    }
    char *json = NULL;
    if (rc == 0) {
        p.specials   = specials;
        p.n_specials = n_specials;
        caprl_bpe_train_stats stats;
        caprl_error           err = {0};
        size_t                json_len = 0;
        double                t0 = tool_now();
        caprl_status          st = caprl_bpe_train(text, len, corpus, &p, &json, &json_len, &stats, &err);
        if (st != CAPRL_OK) {
            rc = tool_fail(info.name, st, err.msg);
        } else {
            rc = tool_write_file_atomic(info.name, out, json, json_len);
        }
        if (rc == 0 && !quiet) {
            fprintf(stderr, "caprl %s: %s: %zu bytes, %lld pre-tokens (%lld distinct) -> %d merges, %d vocab + %d "
                    "added tokens in %.2f s; the corpus encodes to %lld tokens (%.2f bytes/token)\n", info.name, out,
                    len, (long long)stats.n_pieces, (long long)stats.n_words, stats.n_merges, stats.n_vocab,
                    stats.n_added, tool_now() - t0, (long long)stats.corpus_tokens,
                    stats.corpus_tokens > 0 ? (double)len / (double)stats.corpus_tokens : 0.0);
            if (stats.exhausted) {
                fprintf(stderr, "caprl %s: note: stopped at %d of %d ids: no pair occurs %d times or more\n",
                        info.name, stats.n_vocab + stats.n_added, p.vocab_size, p.min_frequency);
            }
        }
    }
    caprl_free(json);
    free(text);
    free(kept);
    free(specials);
    return rc < 0 ? EXIT_OK : rc;
}

/* ---- dispatcher --------------------------------------------------------------------------------------------- */

typedef struct subcommand {
    const char *name;
    const char *help;
    int (*run)(int argc, char **argv);
} subcommand;

static const subcommand k_subcommands[] = {
    {"train", "train a byte-level BPE tokenizer.json (Qwen2 layout) on a text file", cmd_tokenizer_train},
};

static void print_subcommands(FILE *f) {
    fprintf(f, "usage: caprl tokenizer <subcommand> [options]   (caprl tokenizer <subcommand> --help)\n\n"
               "Tokenizer tools.\n\nsubcommands:\n");
    for (size_t i = 0; i < sizeof k_subcommands / sizeof k_subcommands[0]; i++) {
        fprintf(f, "  %-10s %s\n", k_subcommands[i].name, k_subcommands[i].help);
    }
}

int cmd_tokenizer(int argc, char **argv) {
    if (argc < 2) {
        print_subcommands(stderr);
        return EXIT_USAGE;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        print_subcommands(stdout);
        return EXIT_OK;
    }
    for (size_t i = 0; i < sizeof k_subcommands / sizeof k_subcommands[0]; i++) {
        if (strcmp(argv[1], k_subcommands[i].name) == 0) {
            return k_subcommands[i].run(argc - 1, argv + 1);
        }
    }
    fprintf(stderr, "caprl tokenizer: error: unknown subcommand '%s' (see 'caprl tokenizer --help')\n", argv[1]);
    return EXIT_USAGE;
}
