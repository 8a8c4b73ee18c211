#!/usr/bin/env bash
# make demo (for now): build small random-weight Qwen2 and Qwen2.5-VL checkpoints with the real Qwen tokenizer,
# generate from the first and caption the test images with the second
# The output is gibberish by construction (random weights); what it shows is the
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
echo "== a Qwen2.5-VL checkpoint (random weights) captions a folder of images, resumably =="
"$BUILD/caprl" init-model --out "$OUT/tiny-qwen2-vl" --preset tiny-vl --dtype bf16 --tokenizer "$TOKENIZER" --seed 7
rm -f "$OUT/captions.jsonl"
"$BUILD/caprl" caption --model "$OUT/tiny-qwen2-vl" --images tests/fixtures/img --out "$OUT/captions.jsonl" \
  -n 2 --max-new-tokens 12 --seed 3
head -n 3 "$OUT/captions.jsonl"
echo "== rerunning the same command resumes (nothing left to do) =="
"$BUILD/caprl" caption --model "$OUT/tiny-qwen2-vl" --images tests/fixtures/img --out "$OUT/captions.jsonl" \
  -n 2 --max-new-tokens 12 --seed 3
