#!/usr/bin/env bash
# make demo-assets: builds the demo's three tiny models from nothing, with caprl alone, deterministically, into
# demo/assets/ (shipped in the repository so that `make demo` does not retrain them). About two hours on 2 cores.
#   tokenizer.json  byte-level BPE fitted to the synthetic world's text (caprl tokenizer train)
#   reader/         Qwen2 text model (4 layers, hidden 128), SFT in three stages:
#                     1. letter binding (sft_reader_bind.jsonl): the caption is one option's text, the target its
#                        letter. Trained from scratch on the full task a model this small stays at chance on the
#                        letter; this stage forms the "find the matching option, answer its letter" circuit first.
#                     2. the reader records (sft_reader.jsonl): the reader prompt filled with a dense, short or
#                        partial caption and a shuffled question -> " X." or " F." when the caption does not say;
#                        the same in the Prism stage-2 form -> <answer>\boxed{X}</answer>; and the answer in words
#                        for questions without options (finding the fact apart from choosing its letter)
#                     3. the same records of the demo's world, whose questions have distractors the image lacks
#                        (synth --question-style absent): the caption's mention of a value answers
#   base            Qwen2.5-VL: the stage-1 reader's decoder (init-model --language-model) under a new 2-block
#                   vision tower, SFT on dense object lists under its own instruction (sft_describe.jsonl): the
#                   stand-in for the vision-language pretraining a real base model has
#   captioner/      base, SFT on the SHORT captions (one or two objects): the SFT baseline that GRPO starts from
#   filter/         the curation model: the stage-3 reader's decoder under a new vision tower, SFT (1) on the dense
#                   object lists mixed with letter-binding records in its own question form (sft_filter_bind.jsonl:
#                   the decoder would lose the binding while it learns to see), then (2) on the queries `caprl qa
#                   filter` makes (with the image: the letter; without: "None" unless the wording gives the answer
#                   away) of the images past the demo's, still mixed with those binding records, lr annealed; (3) at
#                   2e-3 on the object lists again, where the tower learns shape; (4) on the queries again, then with
#                   the lookup-style world's and then with keyed lookups (sft_filter_keyed.jsonl), lr annealed last
# Every step is a pure function of its inputs and seeds, and caprl's results do not depend on the thread count.
# Usage: scripts/demo_assets.sh [BUILD]. For a quick check that the recipe runs end to end (tests/demo/
# test_demo_assets.c), DEMO_ASSETS_OUT and DEMO_ASSETS_WORK move the models and the work directory, DEMO_ASSETS_TRAIN
# shrinks the 8,192-image worlds and DEMO_ASSETS_MAX_STEPS caps every SFT run.
set -euo pipefail
BUILD=${1:-build}
C="$BUILD/caprl"
WORK=${DEMO_ASSETS_WORK:-$BUILD/demo-assets}
OUT=${DEMO_ASSETS_OUT:-demo/assets}
N_TRAIN=${DEMO_ASSETS_TRAIN:-8192}
MAX_STEPS=${DEMO_ASSETS_MAX_STEPS:-0}
T=demo/reader_template.txt
rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"

steps() { if [ "$MAX_STEPS" -gt 0 ] && [ "$1" -gt "$MAX_STEPS" ]; then echo "$MAX_STEPS"; else echo "$1"; fi; }
last() { echo "$1/step-$(ls -d "$1"/step-* | sed 's/.*step-//' | sort -n | tail -1)"; }

# The tokenizer is fitted on a 512-image world's text; everything is trained on the 8,192-image world (whose first
# 512 scenes are the same).
"$C" synth --out "$WORK/world512" --train 512 --test 64 --seed 0 --reader-template "$T"
"$C" synth --out "$WORK/world" --train "$N_TRAIN" --test 64 --seed 0 --reader-template "$T"
"$C" synth --out "$WORK/world-absent" --train "$N_TRAIN" --test 64 --seed 0 --reader-template "$T" \
  --question-style absent
"$C" tokenizer train --corpus "$WORK/world512/corpus.txt" --vocab-size 1024 --out "$WORK/tokenizer.json"

"$C" init-model --out "$WORK/reader0" --preset tiny --tokenizer "$WORK/tokenizer.json" --vocab-size -1 \
  --hidden 128 --intermediate 384 --layers 4 --heads 4 --kv-heads 2 --dtype f32 --std 0.05
# constant 5e-4: at 2e-3 the binding never leaves chance
"$C" sft --model "$WORK/reader0" --data "$WORK/world/sft_reader_bind.jsonl" --out "$WORK/reader-bind" \
  --lr 5e-4 --batch 128 --micro-batch-tokens 8192 --max-steps "$(steps 700)" --warmup 50 --schedule constant --seed 0 \
  --save-every 700
"$C" sft --model "$(last "$WORK/reader-bind")" --data "$WORK/world/sft_reader.jsonl" --out "$WORK/reader-lookup" \
  --lr 5e-4 --batch 64 --micro-batch-tokens 4096 --max-steps "$(steps 3000)" --warmup 20 --schedule constant --seed 4 \
  --save-every 500
"$C" sft --model "$(last "$WORK/reader-lookup")" --data "$WORK/world-absent/sft_reader.jsonl" \
  --out "$WORK/reader-run" --lr 5e-4 --batch 64 --micro-batch-tokens 4096 --max-steps "$(steps 1000)" --warmup 20 \
  --schedule constant --seed 5 --save-every 250

VISION=(--vision-depth 2 --vision-hidden 64 --vision-heads 4 --vision-intermediate 128 --window-size 84)
"$C" init-model --out "$WORK/vl0" --preset tiny-vl --language-model "$(last "$WORK/reader-bind")" "${VISION[@]}" \
  --dtype f32 --std 0.05
"$C" sft --model "$WORK/vl0" --data "$WORK/world/sft_describe.jsonl" --out "$WORK/base" \
  --lr 1e-3 --batch 32 --micro-batch-tokens 4096 --max-steps "$(steps 768)" --warmup 20 --schedule constant --seed 0 \
  --save-every 256
"$C" sft --model "$(last "$WORK/base")" --data "$WORK/world/sft_captioner.jsonl" --out "$WORK/captioner-run" \
  --lr 5e-4 --batch 32 --micro-batch-tokens 4096 --max-steps "$(steps 192)" --warmup 10 --schedule constant --seed 1 \
  --save-every 64

"$C" init-model --out "$WORK/vlf0" --preset tiny-vl --language-model "$(last "$WORK/reader-run")" "${VISION[@]}" \
  --dtype f32 --std 0.05
W="$WORK/world-absent"
# One binding record per image beside each object list; then every binding record beside the curation queries of
# the images past the demo's 512 (make demo filters questions of its first 24: the model must not have seen them).
cat "$W/sft_describe.jsonl" <(awk 'NR % 9 == 1' "$W/sft_filter_bind.jsonl") > "$W/filter_see.jsonl"
cat <(awk -F'"' '$4 >= "train-00512"' "$W/sft_filter.jsonl") "$W/sft_filter_bind.jsonl" > "$W/filter_mix.jsonl"
"$C" sft --model "$WORK/vlf0" --data "$W/filter_see.jsonl" --out "$WORK/filter-see" \
  --lr 1e-3 --batch 32 --micro-batch-tokens 4096 --max-steps "$(steps 1536)" --warmup 20 --schedule constant --seed 0 \
  --save-every 1536
"$C" sft --model "$(last "$WORK/filter-see")" --data "$W/filter_mix.jsonl" --out "$WORK/filter-const" \
  --lr 5e-4 --batch 64 --micro-batch-tokens 4096 --max-steps "$(steps 4000)" --warmup 10 --schedule constant --seed 3 \
  --save-every 400
# and the learning rate annealed to 0 over 800 more steps
"$C" sft --model "$(last "$WORK/filter-const")" --data "$W/filter_mix.jsonl" --out "$WORK/filter-anneal" \
  --lr 5e-4 --batch 64 --micro-batch-tokens 4096 --max-steps "$(steps 800)" --warmup 0 --schedule cosine \
  --min-lr-ratio 0 --seed 23 --save-every 400
# Shape: it sees where objects are, their colour and size, but not their shape, which the tower learns only at a
# higher rate and after a longer plateau: 2e-3 on the object lists, the binding records and a sixth of the queries
# with the image.
cat "$W/filter_see.jsonl" <(grep '"image"' "$W/filter_mix.jsonl" | awk 'NR % 6 == 1') > "$W/filter_shape.jsonl"
"$C" sft --model "$(last "$WORK/filter-anneal")" --data "$W/filter_shape.jsonl" --out "$WORK/filter-shape" \
  --lr 2e-3 --batch 32 --micro-batch-tokens 4096 --max-steps "$(steps 3072)" --warmup 20 --schedule constant \
  --seed 0 --save-every 768
# The queries again (object lists mixed in, so that it keeps the shapes), then with those of the lookup-style world
# too, then with the keyed lookups ("What shape is the red object?", in words and with the letter): answering by
# spotting which option's value the image has at all, which the absent style allows, never needs shape
cat "$W/filter_mix.jsonl" "$W/sft_describe.jsonl" > "$W/filter_mixd.jsonl"
"$C" sft --model "$(last "$WORK/filter-shape")" --data "$W/filter_mixd.jsonl" --out "$WORK/filter-requery" \
  --lr 5e-4 --batch 64 --micro-batch-tokens 4096 --max-steps "$(steps 2000)" --warmup 10 --schedule constant \
  --seed 3 --save-every 400
cat <(awk -F'"' '$4 >= "train-00512"' "$WORK/world/sft_filter.jsonl") "$W/filter_mixd.jsonl" > "$W/filter_mixl.jsonl"
"$C" sft --model "$(last "$WORK/filter-requery")" --data "$W/filter_mixl.jsonl" --out "$WORK/filter-lookup" \
  --lr 5e-4 --batch 64 --micro-batch-tokens 4096 --max-steps "$(steps 2400)" --warmup 10 --schedule constant \
  --seed 3 --save-every 400
cat <(awk -F'"' '$4 >= "train-00512"' "$W/sft_filter_keyed.jsonl") "$W/filter_mixl.jsonl" > "$W/filter_mixk.jsonl"
"$C" sft --model "$(last "$WORK/filter-lookup")" --data "$W/filter_mixk.jsonl" --out "$WORK/filter-keyed" \
  --lr 5e-4 --batch 64 --micro-batch-tokens 4096 --max-steps "$(steps 2000)" --warmup 10 --schedule constant \
  --seed 3 --save-every 400
"$C" sft --model "$(last "$WORK/filter-keyed")" --data "$W/filter_mixk.jsonl" --out "$WORK/filter-run" \
  --lr 5e-4 --batch 64 --micro-batch-tokens 4096 --max-steps "$(steps 800)" --warmup 0 --schedule cosine \
  --min-lr-ratio 0 --seed 23 --save-every 400

# The final checkpoint of each run, without its training state.
for m in reader captioner filter; do
  final=$(last "$WORK/$m-run")
  rm -rf "${OUT:?}/$m"
  mkdir -p "$OUT/$m"
  for f in config.json generation_config.json model.safetensors tokenizer.json preprocessor_config.json; do
    if [ -f "$final/$f" ]; then cp "$final/$f" "$OUT/$m/"; fi
  done
done
cp "$WORK/tokenizer.json" "$OUT/tokenizer.json"
echo "demo assets written to $OUT"
