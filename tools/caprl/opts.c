/* Option parsing for all subcommands (see opts.h). */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "caprl/caprl.h"
#include "opts.h"

int tool_usage_error(const char *cmd, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "caprl %s: error: ", cmd);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (see 'caprl %s --help')\n", cmd);
    va_end(ap);
    return EXIT_USAGE;
}

int tool_fail(const char *cmd, int32_t status, const char *msg) {
    fprintf(stderr, "caprl %s: error: %s\n", cmd, msg && msg[0] ? msg : caprl_status_str(status));
    switch (status) {
        case CAPRL_OK: return EXIT_OK;
        case CAPRL_ERR_INVALID_ARG: return EXIT_USAGE;
        case CAPRL_ERR_NUMERIC: return EXIT_NUMERIC;
        case CAPRL_ERR_BACKEND:
        case CAPRL_ERR_OOM: return EXIT_BACKEND;
        default: return EXIT_DATA;
    }
}

static const char *type_metavar(const opt_spec *s) {
    if (s->metavar) {
        return s->metavar;
    }
    switch (s->type) {
        case OPT_INT:
        case OPT_I64: return "N";
        case OPT_FLOAT: return "X";
        case OPT_STRING: return "S";
        default: return "";
    }
}

static void print_default(const opt_spec *s, FILE *out) {
    switch (s->type) {
        case OPT_INT: fprintf(out, " (default %d)", *(int32_t *)s->ptr); break;
        case OPT_I64: fprintf(out, " (default %lld)", (long long)*(int64_t *)s->ptr); break;
        case OPT_FLOAT: fprintf(out, " (default %g)", (double)*(float *)s->ptr); break;
        case OPT_STRING:
            if (*(const char **)s->ptr) {
                fprintf(out, " (default \"%s\")", *(const char **)s->ptr);
            }
            break;
        case OPT_FLAG:
            if (*(bool *)s->ptr) {
                fprintf(out, " (default on; --no-%s turns it off)", s->name);
            }
            break;
        default: break;
    }
}

void opts_print_help(const cmd_info *info, const opt_spec *specs, FILE *out) {
    fprintf(out, "usage: %s\n\n%s\n\noptions:\n", info->usage, info->summary);
    for (const opt_spec *s = specs; s->type != OPT_END; s++) {
        char left[64], alias[8] = "";
        if (s->short_name) {
            snprintf(alias, sizeof alias, "-%c, ", s->short_name);
        }
        snprintf(left, sizeof left, "%s--%s%s%s", alias, s->name, s->type == OPT_FLAG ? "" : " ", type_metavar(s));
        fprintf(out, "  %-28s %s", left, s->help);
        print_default(s, out);
        fputc('\n', out);
    }
    fprintf(out, "  %-28s %s\n", "--help", "show this help");
    if (info->details) {
        fprintf(out, "\n%s\n", info->details);
    }
}

static const opt_spec *find_spec(const opt_spec *specs, const char *name, size_t len, bool *negated) {
    *negated = false;
    for (const opt_spec *s = specs; s->type != OPT_END; s++) {
        if (strlen(s->name) == len && strncmp(s->name, name, len) == 0) {
            return s;
        }
    }
    if (len > 3 && strncmp(name, "no-", 3) == 0) {
        for (const opt_spec *s = specs; s->type != OPT_END; s++) {
            if (s->type == OPT_FLAG && strlen(s->name) == len - 3 && strncmp(s->name, name + 3, len - 3) == 0) {
                *negated = true;
                return s;
            }
        }
    }
    return NULL;
}

static bool in_range(const opt_spec *s, double v) {
    if (s->min == 0 && s->max == 0) {
        return true;
    }
    return v >= s->min && v <= s->max;
}

static int set_value(const cmd_info *info, const opt_spec *s, const char *val) {
    char *end = NULL;
    errno = 0;
    switch (s->type) {
        case OPT_INT:
        case OPT_I64: {
            long long v = strtoll(val, &end, 10);
            if (errno || end == val || *end || !in_range(s, (double)v) ||
                (s->type == OPT_INT && (v < INT32_MIN || v > INT32_MAX))) {
                if (s->min != 0 || s->max != 0) {
                    return tool_usage_error(info->name, "--%s expects an integer in [%g, %g], got '%s'", s->name,
                                            s->min, s->max, val);
                }
                return tool_usage_error(info->name, "--%s expects an integer, got '%s'", s->name, val);
            }
            if (s->type == OPT_INT) {
                *(int32_t *)s->ptr = (int32_t)v;
            } else {
                *(int64_t *)s->ptr = (int64_t)v;
            }
            return 0;
        }
        case OPT_FLOAT: {
            double v = strtod(val, &end);
            if (errno || end == val || *end || !isfinite(v) || !in_range(s, v)) {
                if (s->min != 0 || s->max != 0) {
                    return tool_usage_error(info->name, "--%s expects a number in [%g, %g], got '%s'", s->name,
                                            s->min, s->max, val);
                }
                return tool_usage_error(info->name, "--%s expects a number, got '%s'", s->name, val);
            }
            *(float *)s->ptr = (float)v;
            return 0;
        }
        case OPT_STRING: *(const char **)s->ptr = val; return 0;
        default: return EXIT_USAGE;
    }
}

int opts_parse(const cmd_info *info, const opt_spec *specs, int argc, char **argv, const char **positional,
               int max_positional, int *n_positional) {
    int npos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            opts_print_help(info, specs, stdout);
            return -1;
        }
        const opt_spec *short_spec = NULL;
        if (a[0] == '-' && a[1] != '-' && a[1] != '\0' && a[2] == '\0') {
            for (const opt_spec *s = specs; s->type != OPT_END; s++) {
                if (s->short_name == a[1]) {
                    short_spec = s;
                }
            }
            if (!short_spec) {
                return tool_usage_error(info->name, "unknown option '%s'", a);
            }
        }
        if (short_spec) {
            if (short_spec->type == OPT_FLAG) {
                *(bool *)short_spec->ptr = true;
                continue;
            }
            if (i + 1 >= argc) {
                return tool_usage_error(info->name, "-%c needs a value", short_spec->short_name);
            }
            int rc = set_value(info, short_spec, argv[++i]);
            if (rc) {
                return rc;
            }
            continue;
        }
        if (strncmp(a, "--", 2) != 0 || a[2] == '\0') {
            if (npos >= max_positional) {
                return tool_usage_error(info->name, "unexpected argument '%s'", a);
            }
            positional[npos++] = a;
            continue;
        }
        const char   *name = a + 2;
        const char   *eq = strchr(name, '=');
        size_t        len = eq ? (size_t)(eq - name) : strlen(name);
        bool          negated;
        const opt_spec *s = find_spec(specs, name, len, &negated);
        if (!s) {
            return tool_usage_error(info->name, "unknown option '--%.*s'", (int)len, name);
        }
        if (s->type == OPT_FLAG) {
            if (eq) {
                return tool_usage_error(info->name, "--%s takes no value", s->name);
            }
            *(bool *)s->ptr = !negated;
            continue;
        }
        const char *val = eq ? eq + 1 : NULL;
        if (!val) {
            if (i + 1 >= argc) {
                return tool_usage_error(info->name, "--%s needs a value", s->name);
            }
            val = argv[++i];
        }
        int rc = set_value(info, s, val);
        if (rc) {
            return rc;
        }
    }
    if (n_positional) {
        *n_positional = npos;
    }
    return 0;
}
