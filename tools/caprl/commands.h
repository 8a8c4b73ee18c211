/* Entry points of the subcommands listed in commands.def. */
#ifndef CAPRL_TOOL_COMMANDS_H
#define CAPRL_TOOL_COMMANDS_H

#define CAPRL_COMMAND(name, fn, help) int fn(int argc, char **argv);
#include "commands.def"
#undef CAPRL_COMMAND

#endif
