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

# Gradients (torch autograd vs `caprl forward --dump-grads`) and checkpoints written by `caprl sft` (transformers
# must load them and give caprl's logits): one f32 text model, one f32 tiny-vl model with an image.
"$B/caprl" init-model --out "$O/work/gt" --preset tiny --dtype f32 --seed 7 \
  --tokenizer "$SHARED/data/qwen-tokenizer/tokenizer.json" >/dev/null
"$B/caprl" init-model --out "$O/work/gv" --preset tiny-vl --dtype f32 --seed 8 \
  --tokenizer "$SHARED/data/qwen-tokenizer/tokenizer.json" >/dev/null
"$B/caprl" forward --model "$O/work/gt" --ids 9707,11,1879,0,374,264,1273,315,279,2038,13,151645,198,42 \
  --dump-grads "$O/work/gt_grads.safetensors" --loss-from 5 --print-ids >"$O/work/gt_summary.json"
"$B/caprl" forward --model "$O/work/gv" --image "$IMG" --prompt "Describe it." \
  --dump-grads "$O/work/gv_grads.safetensors" --loss-from 3 --print-ids >"$O/work/gv_summary.json"
# sft checkpoints: a bf16 text model and an f32 VL model, two steps each
printf '%s\n' '{"messages":[{"role":"user","content":"Name a colour."},{"role":"assistant","content":"Blue."}]}' \
  '{"messages":[{"role":"user","content":"Count to three."},{"role":"assistant","content":"One, two, three."}]}' \
  >"$O/work/sft_text.jsonl"
printf '{"image":"%s","messages":[{"role":"user","content":"Describe it."},{"role":"assistant","content":"A photo."}]}\n' \
  "$(pwd)/$IMG" >"$O/work/sft_vl.jsonl"
"$B/caprl" init-model --out "$O/work/st0" --preset tiny --dtype bf16 --seed 9 \
  --tokenizer "$SHARED/data/qwen-tokenizer/tokenizer.json" >/dev/null
"$B/caprl" sft --model "$O/work/st0" --data "$O/work/sft_text.jsonl" --out "$O/work/st_run" --lr 1e-3 --batch 2 \
  --max-steps 2 >/dev/null 2>&1
"$B/caprl" sft --model "$O/work/gv" --data "$O/work/sft_vl.jsonl" --out "$O/work/sv_run" --lr 1e-3 --batch 1 \
  --max-steps 2 >/dev/null 2>&1
for m in st sv; do
  rm -rf "$O/work/${m}_ckpt" && cp -r "$O/work/${m}_run/step-2" "$O/work/${m}_ckpt"
  rm -f "$O/work/${m}_ckpt"/training_state.*
done
rm -rf "$O/work/st_run" "$O/work/sv_run" "$O/work/st0"
"$B/caprl" forward --model "$O/work/st_ckpt" --ids 151644,872,198,675,264,12463,13,151645 --dump-logits "$O/work/st_logits.f32" \
  --print-ids >"$O/work/st_summary.json"
"$B/caprl" forward --model "$O/work/sv_ckpt" --image "$IMG" --prompt "Describe it." \
  --dump-logits "$O/work/sv_logits.f32" --print-ids >"$O/work/sv_summary.json"
du -sh "$O"
