/* Entry points of subcommands reached through a group's dispatcher (`caprl qa <sub>`, `caprl eval <sub>`) rather
 * than through commands.def. argv[0] is the subcommand's own name. */
#ifndef CAPRL_TOOL_SUBCOMMANDS_H
#define CAPRL_TOOL_SUBCOMMANDS_H

int cmd_qa_generate(int argc, char **argv); /* tools/caprl/qa_generate.c */
int cmd_qa_filter(int argc, char **argv);   /* tools/caprl/qa_filter.c */
int cmd_eval_prism(int argc, char **argv);  /* tools/caprl/eval_prism.c */
int cmd_bench_gemm(int argc, char **argv);  /* tools/caprl/bench_gemm.c */
int cmd_bench_attn(int argc, char **argv);  /* tools/caprl/bench_attn.c */

#endif
