/* The long variant of tests/tools/test_sft.c (label slow): everything it checks, plus soaks of many kill -9s at
 * uniformly random moments (bf16 mixed precision with recompute and an eval set; a Qwen2.5-VL model with images),
 * each ending bit-identical to its uninterrupted run. */
#define SFT_LONG 1
#include "tools/test_sft.c"
