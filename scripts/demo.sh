#!/usr/bin/env bash
# make demo (for now): build a small random-weight Qwen2 checkpoint with the real Qwen tokenizer, then generate
# from it with the chat template. The output is gibberish by construction (random weights); what it shows is the
# whole path working: HF checkpoint written and loaded, ChatML rendered, tokenized, prefilled, sampled, streamed.
set -euo pipefail
BUILD=${1:-build}
SHARED=${CAPRL_SHARED_DIR:-"$(cd "$(dirname "$0")/../.." && pwd)/shared"}
TOKENIZER="$SHARED/data/qwen-tokenizer/tokenizer.json"
OUT="$BUILD/demo"
if [ ! -f "$TOKENIZER" ]; then
  echo "demo: $TOKENIZER not found (set CAPRL_SHARED_DIR to the shared/ folder)" >&2
  exit 2
fi
mkdir -p "$OUT"
"$BUILD/caprl" init-model --out "$OUT/tiny-qwen2" --preset tiny --dtype bf16 --tokenizer "$TOKENIZER" --seed 7
echo "== caprl generate --chat (random weights: expect noise, streamed token by token) =="
"$BUILD/caprl" generate --model "$OUT/tiny-qwen2" --chat --prompt "Please describe this image in detail." \
  --max-new-tokens 40 --temperature 0.8 --top-p 0.95 --seed 1
echo "== the same prompt, 3 samples =="
"$BUILD/caprl" generate --model "$OUT/tiny-qwen2" --chat --prompt "Please describe this image in detail." \
  -n 3 --max-new-tokens 16 --temperature 1.0 --seed 2
