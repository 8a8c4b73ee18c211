/* docs/cli.md stays true to the program: every command that `caprl --help` lists (and every subcommand or stage of
 * the grouping commands) has its section, and every option its --help lists is named in that section (a flag that
 * is on by default may be documented by its --no- form, an option with a short form by that). `caprl train` takes
 * its settings as --name VALUE or config keys: every key its --help prints is in docs/train.md. A new option
 * without documentation fails here. */
#include <ctype.h>

#include "caprl_test.h"
#include "cli_util.h"
#include "proc_util.h"

static char *g_doc;

/* The text of the section "## NAME" (a heading may list several commands: "## tokenize / detokenize"), up to the
 * next heading; NULL when there is none. malloc'd. */
static char *doc_section(const char *name) {
    for (const char *h = strstr(g_doc, "\n## "); h; h = strstr(h + 1, "\n## ")) {
        const char *title = h + 4, *eol = strchr(title, '\n');
        size_t      title_len = eol ? (size_t)(eol - title) : strlen(title);
        bool        match = false;
        for (const char *t = title; t < title + title_len && !match;) {
            size_t n = strlen(name);
            const char *end = t + n;
            match = strncmp(t, name, n) == 0 && (end == title + title_len || strncmp(end, " /", 2) == 0);
            const char *slash = memchr(t, '/', (size_t)(title + title_len - t));
            t = slash ? slash + 2 : title + title_len;
        }
        if (match) {
            const char *next = strstr(title, "\n## ");
            size_t      len = next ? (size_t)(next - h) : strlen(h);
            char       *s = malloc(len + 1);
            memcpy(s, h, len);
            s[len] = '\0';
            return s;
        }
    }
    return NULL;
}

/* The names listed under `header` ("commands:", "subcommands:", "stages:") of a help text, one per line, each the
 * first word of an indented line, until a blank line. Returns how many (at most cap). */
static int listed_names(const char *help, const char *header, char names[][32], int cap) {
    const char *p = strstr(help, header);
    int         n = 0;
    if (!p) {
        return 0;
    }
    p = strchr(p, '\n');
    while (p && p[1] == ' ' && n < cap) {
        const char *w = p + 1;
        while (*w == ' ') {
            w++;
        }
        size_t len = strcspn(w, " \n");
        snprintf(names[n++], sizeof names[0], "%.*s", (int)(len < 31 ? len : 31), w);
        p = strchr(p + 1, '\n');
    }
    return n;
}

static bool named(const char *section, const char *opt) {
    for (const char *p = strstr(section, opt); p; p = strstr(p + 1, opt)) {
        char after = p[strlen(opt)];
        if (!(isalnum((unsigned char)after) || after == '-')) {
            return true;
        }
    }
    return false;
}

/* Every option line of `caprl CMD --help` ("  --name ...", "  -n, --name ...") is named in CMD's section. */
static void check_command(const char *cmd) {
    char line[512], help[1 << 16];
    snprintf(line, sizeof line, "%s --help", cmd);
    CHECK_MSG(run_cli(line, help, sizeof help) == 0, "caprl %s --help failed", cmd);
    char *section = doc_section(cmd);
    CHECK_MSG(section != NULL, "docs/cli.md has no section \"## %s\"", cmd);
    int n_opts = 0;
    for (const char *p = help; section && p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        const char *o = p;
        while (*o == ' ') {
            o++;
        }
        if (o == p || *o != '-') {
            continue;
        }
        const char *dd = strstr(o, "--");
        if (!dd || dd > o + 4) {
            continue;
        }
        char   opt[64], no_opt[80], short_opt[3] = {0};
        size_t len = strcspn(dd, " ,\n");
        snprintf(opt, sizeof opt, "%.*s", (int)(len < 63 ? len : 63), dd);
        if (o[1] != '-' && o[2] == ',') { /* "-n, --samples" */
            memcpy(short_opt, o, 2);
        }
        if (strcmp(opt, "--help") == 0) {
            continue;
        }
        n_opts++;
        snprintf(no_opt, sizeof no_opt, "--no-%s", opt + 2);
        const char *eol = strchr(o, '\n');
        bool        negatable = strstr(o, no_opt) && (!eol || strstr(o, no_opt) < eol);
        bool documented = named(section, opt) || (negatable && named(section, no_opt)) ||
                          (short_opt[0] && named(section, short_opt));
        CHECK_MSG(documented, "caprl %s: %s is not in docs/cli.md's section", cmd, opt);
    }
    CHECK_MSG(!section || n_opts > 0, "caprl %s --help lists no options", cmd);
    free(section);
}

/* caprl train: the settings object its --help prints ("key": default, one per line) against docs/train.md. */
static void check_train_settings(void) {
    char help[1 << 16], path[4096];
    CHECK(run_cli("train --help", help, sizeof help) == 0);
    snprintf(path, sizeof path, "%s/docs/train.md", CAPRL_SOURCE_DIR);
    char *doc = read_all(path, NULL);
    CHECK_MSG(doc != NULL, "cannot read %s", path);
    int n_keys = 0;
    for (const char *p = strstr(help, "\n  \""); doc && p; p = strstr(p + 1, "\n  \"")) {
        char key[80];
        size_t len = strcspn(p + 4, "\"");
        snprintf(key, sizeof key, "`%.*s`", (int)(len < 60 ? len : 60), p + 4);
        CHECK_MSG(strstr(doc, key) != NULL, "caprl train: setting %s is not in docs/train.md", key);
        n_keys++;
    }
    CHECK_MSG(n_keys >= 40, "caprl train --help prints %d settings", n_keys);
    free(doc);
}

int main(void) {
    char *tmp = test_tmpdir("test_cli_docs");
    snprintf(g_dir, sizeof g_dir, "%s", tmp);
    free(tmp);
    char path[4096];
    snprintf(path, sizeof path, "%s/docs/cli.md", CAPRL_SOURCE_DIR);
    g_doc = read_all(path, NULL);
    CHECK_MSG(g_doc != NULL, "cannot read %s", path);

    char top[1 << 16], names[64][32], subs[16][32], help[1 << 16], cmd[128];
    CHECK(run_cli("--help", top, sizeof top) == 0);
    int n = listed_names(top, "commands:", names, 64);
    CHECK_MSG(n >= 15, "caprl --help lists %d commands", n);
    int checked = 0;
    for (int i = 0; g_doc && i < n; i++) {
        if (strcmp(names[i], "version") == 0) {
            continue; /* no options, and the README shows it */
        }
        if (strcmp(names[i], "train") == 0) { /* settings, not option lines */
            char *section = doc_section("train");
            CHECK_MSG(section != NULL, "docs/cli.md has no section \"## train\"");
            free(section);
            check_train_settings();
            checked++;
            continue;
        }
        snprintf(cmd, sizeof cmd, "%s --help", names[i]);
        CHECK(run_cli(cmd, help, sizeof help) == 0);
        int n_subs = listed_names(help, "subcommands:", subs, 16);
        n_subs += listed_names(help, "stages:", subs + n_subs, 16 - n_subs);
        for (int k = 0; k < n_subs; k++) {
            snprintf(cmd, sizeof cmd, "%s %s", names[i], subs[k]);
            check_command(cmd);
            checked++;
        }
        if (n_subs == 0) {
            check_command(names[i]);
            checked++;
        }
    }
    fprintf(stderr, "test_cli_docs: %d commands checked against docs/cli.md\n", checked);
    free(g_doc);
    return test_finish("test_cli_docs");
}
