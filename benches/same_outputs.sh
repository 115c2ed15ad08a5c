#!/usr/bin/env bash
# Two tunekit builds, same outputs: runs the quickstart, prepares alpaca_en_demo (sft) and dpo_en_demo
# (preference), trains DPO, a reward model, SFT with dropout + gradient checkpointing, a resume and
# QLoRA, merges, evaluates, generates and scores with each build in the same directory, and compares
# every output byte for byte (metrics.jsonl, state.json and loss.png hold timings and are left out).
#   bash benches/same_outputs.sh OLD_BINARY NEW_BINARY      (needs .ci/fetch-assets)
set -euo pipefail
cd "$(dirname "$0")/.."
D="${TUNEKIT_ASSETS:-$HOME/.cache/tunekit-assets}/llamafactory-0.9.5/data"
O=$(mktemp -d)/out
outputs() {
  local B=$1
  rm -rf "$O"; mkdir -p "$O"
  "$B" -q quickstart --out "$O/qs" > /dev/null
  "$B" -q prepare "$D/alpaca_en_demo.json" --tokenizer datasets/tokenizers/qwen3 --out "$O/alpaca" --seq-len 1024 > /dev/null
  "$B" -q prepare "$D/dpo_en_demo.json" --method preference --tokenizer datasets/tokenizers/qwen3 --out "$O/pairs" --seq-len 1024 > /dev/null
  local M="$O/qs/tiny-qwen3-random"
  "$B" -q train --method dpo --model "$M" --data "$O/pairs" --out "$O/dpo" --max-steps 3 --grad-accum 2 --eval-every 2 --save-every 2 > /dev/null
  "$B" -q train --method reward --model "$M" --data "$O/pairs" --out "$O/rm" --max-steps 3 --grad-accum 2 --eval-every 2 > /dev/null
  "$B" -q train --model "$M" --data "$O/qs/shards" --out "$O/sft-gc" --max-steps 3 --lora-dropout 0.1 --gradient-checkpointing \
    --batch-tokens 1024 --grad-accum 2 --save-every 2 > /dev/null
  "$B" -q train --model "$M" --data "$O/qs/shards" --out "$O/sft-resume" --max-steps 3 --lora-dropout 0.1 --batch-tokens 1024 \
    --grad-accum 2 --resume "$O/sft-gc/checkpoint-2" > /dev/null
  "$B" -q train --model "$M" --data "$O/qs/shards" --out "$O/sft-nf4" --max-steps 2 --qlora nf4 --batch-tokens 1024 > /dev/null
  "$B" -q merge --model "$M" --adapter "$O/qs/lora" --out "$O/merged" > /dev/null
  "$B" --json eval --model "$M" --adapter "$O/qs/lora" --data "$O/qs/shards" > "$O/eval.json"
  "$B" -q generate --model "$M" --tokenizer datasets/tokenizers/qwen3 --adapter "$O/qs/lora" --prompt Hello --max-tokens 8 > "$O/gen.txt"
  "$B" -q score "$D/dpo_en_demo.json" --model "$M" --adapter "$O/rm" --tokenizer datasets/tokenizers/qwen3 > "$O/score.jsonl" 2>/dev/null
  (cd "$O" && find . -type f | grep -v "metrics.jsonl\|loss.png\|state.json" | sort | xargs sha256sum)
}
outputs "$1" > "$O.old.sha"
outputs "$2" > "$O.new.sha"
if diff "$O.old.sha" "$O.new.sha"; then echo "same outputs: $(wc -l < "$O.new.sha") files"; else echo "outputs differ (above)"; exit 1; fi
