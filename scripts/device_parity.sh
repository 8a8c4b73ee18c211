#!/usr/bin/env bash
# Dev-only: prepare the inputs of scripts/hf_parity.py (run on a machine with transformers, e.g. the device
# machine) from this build. Usage: scripts/device_parity.sh BUILD_DIR OUT_DIR
# Fills OUT_DIR/shared (the Qwen tokenizer) and OUT_DIR/work (a tiny-vl checkpoint written by caprl, one image,
# caprl's pixel_values and logits for it, and vl_meta.json with the ids and grid).
set -euo pipefail
B=${1:-build}
O=${2:-.devcarry}
SHARED=${CAPRL_SHARED_DIR:-"$(cd "$(dirname "$0")/../.." && pwd)/shared"}
IMG=tests/fixtures/img/baseline.jpg
rm -rf "$O" && mkdir -p "$O/shared/data/qwen-tokenizer" "$O/work"
cp "$SHARED/data/qwen-tokenizer/tokenizer.json" "$O/shared/data/qwen-tokenizer/"
"$B/caprl" init-model --out "$O/work/vl" --preset tiny-vl --dtype bf16 --seed 5 \
  --tokenizer "$SHARED/data/qwen-tokenizer/tokenizer.json"
grid=$("$B/caprl" preprocess --model "$O/work/vl" --image "$IMG" --dump-pixels "$O/work/vl_pixels.f32")
summary=$("$B/caprl" forward --model "$O/work/vl" --image "$IMG" --prompt "Please describe this image in detail." \
  --dump-logits "$O/work/vl_logits.f32" --print-ids)
python3 - "$O/work/vl_meta.json" "$IMG" "$grid" "$summary" <<'PY'
import json, sys
out, img, grid, summary = sys.argv[1:]
s = json.loads(summary)
json.dump({"image": img, "grid_thw": json.loads(grid)["grid_thw"], "ids": s["ids"]}, open(out, "w"))
PY
du -sh "$O"
