/* The table-driven option parser shared by every subcommand: one table {name, type, pointer, help} generates
 * --help, parses and range-checks values. Long options ("--name value", "--name=value") and, where a spec gives
 * one, a short alias ("-n value"). */
#ifndef CAPRL_TOOL_OPTS_H
#define CAPRL_TOOL_OPTS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

typedef enum opt_type {
    OPT_END = 0,
    OPT_FLAG,   /* bool, no value; "--no-NAME" clears it */
    OPT_INT,    /* int32_t, within [min, max] */
    OPT_I64,    /* int64_t, within [min, max] */
    OPT_FLOAT,  /* float, within [min, max] */
    OPT_STRING, /* const char * (points into argv) */
} opt_type;

typedef struct opt_spec {
    const char *name; /* without "--" */
    opt_type    type;
    void       *ptr;
    const char *help;
    double      min, max; /* for numbers; min == max == 0 means unbounded */
    const char *metavar;  /* e.g. "DIR"; NULL for defaults */
    char        short_name; /* e.g. 'n' for "-n"; 0 for none */
} opt_spec;

typedef struct cmd_info {
    const char *name;
    const char *usage;   /* "caprl generate --model DIR (--prompt TEXT | --prompt-file F) [options]" */
    const char *summary; /* one line */
    const char *details; /* paragraphs after the options, may be NULL */
} cmd_info;

enum { EXIT_OK = 0, EXIT_USAGE = 1, EXIT_DATA = 2, EXIT_NUMERIC = 3, EXIT_BACKEND = 4 };

/* Parses argv[1..argc) (argv[0] is the subcommand name). Positional arguments are collected into
 * positional[] (up to max_positional). Returns -1 after printing help (caller exits 0), 0 on success, or
 * EXIT_USAGE after printing one clear line to stderr. */
int opts_parse(const cmd_info *info, const opt_spec *specs, int argc, char **argv, const char **positional,
               int max_positional, int *n_positional);
void opts_print_help(const cmd_info *info, const opt_spec *specs, FILE *out);

/* Maps a caprl_status to the program's exit code and prints "caprl <cmd>: error: <msg>" to stderr. */
int tool_fail(const char *cmd, int32_t status, const char *msg);
/* Prints "caprl <cmd>: error: <formatted>" and returns EXIT_USAGE. */
int tool_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif /* CAPRL_TOOL_OPTS_H */
