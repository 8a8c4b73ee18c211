/* caprl: one program, git-style subcommands. The dispatch table lists each subcommand with its one-line help. */
#include <stdio.h>
#include <string.h>

#include "caprl/caprl.h"
#include "commands.h"
#include "opts.h"

typedef struct command {
    const char *name;
    const char *help;
    int (*run)(int argc, char **argv);
} command;

static const command k_commands[] = {
#define CAPRL_COMMAND(name, fn, help) {name, help, fn},
#include "commands.def"
#undef CAPRL_COMMAND
};

static void print_usage(FILE *out) {
    fprintf(out, "caprl %s: CapRL in C - caption models, reader rewards and GRPO training\n\n", CAPRL_VERSION_STRING);
    fprintf(out, "usage: caprl <command> [options]   (caprl <command> --help for its options)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof k_commands / sizeof k_commands[0]; i++) {
        fprintf(out, "  %-12s %s\n", k_commands[i].name, k_commands[i].help);
    }
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        print_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? EXIT_USAGE : EXIT_OK;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("caprl %s\n", CAPRL_VERSION_STRING);
        return EXIT_OK;
    }
    const char *name = argv[1];
    char       *help_argv[3];
    if (strcmp(name, "help") == 0) {
        if (argc < 3) {
            print_usage(stdout);
            return EXIT_OK;
        }
        name = argv[2];
        help_argv[0] = argv[2];
        help_argv[1] = "--help";
        help_argv[2] = NULL;
        argv = help_argv;
        argc = 2;
    } else {
        argv++;
        argc--;
    }
    for (size_t i = 0; i < sizeof k_commands / sizeof k_commands[0]; i++) {
        if (strcmp(k_commands[i].name, name) == 0) {
            return k_commands[i].run(argc, argv);
        }
    }
    fprintf(stderr, "caprl: unknown command '%s' (see 'caprl --help')\n", name);
    return EXIT_USAGE;
}
