#!/usr/bin/env bash
# Two tunekit builds, same outputs: runs the quickstart, prepares alpaca_en_demo (sft), dpo_en_demo
# (preference) and prompts, trains DPO, a reward model, SFT with dropout + gradient checkpointing, a
# resume, QLoRA and GRPO, merges, evaluates, generates and scores, deduplicates (first and longest),
# exports OpenAI JSONL and GGUF (adapter and merged) with each build in the same directory, and compares
# every output byte for byte (metrics.jsonl, state.json and loss.png hold timings, report.html its own
# path: they are left out).
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
  "$B" -q dedup "$D/alpaca_en_demo.json" --out "$O/dedup-first/o.jsonl" > /dev/null
  "$B" -q dedup datasets/alpaca_sample.json datasets/support_chats.jsonl --out "$O/dedup-longest/o.jsonl" --keep longest > /dev/null
  "$B" -q convert datasets/countries.csv --prompt-template datasets/countries.jinja --out "$O/convert/c.parquet" > /dev/null
  "$B" -q export openai "$D/glaive_toolcall_en_demo.json" --out "$O/openai/tools.jsonl" > /dev/null
  "$B" -q export gguf --adapter "$O/qs/lora" --model "$M" --out "$O/gguf/lora.gguf" > /dev/null
  "$B" -q export gguf --adapter "$O/qs/lora" --model "$M" --merge --data "$O/qs/shards" --type q8_0 --out "$O/gguf/merged.gguf" > /dev/null
  "$B" -q prepare "$D/alpaca_en_demo.json" --method prompts --tokenizer datasets/tokenizers/qwen3 --out "$O/prompts" --seq-len 512 > /dev/null
  "$B" -q train --method grpo --model "$M" --data "$O/prompts" --out "$O/grpo" --max-steps 2 --reward length:20 \
    --reward 'regex:a*0.5' --num-generations 2 --prompts-per-step 2 --max-completion-tokens 8 --eval-every 0 > /dev/null
  (cd "$O" && find . -type f | grep -v "metrics.jsonl\|loss.png\|state.json\|report.html" | sort | xargs sha256sum)
}
outputs "$1" > "$O.old.sha"
outputs "$2" > "$O.new.sha"
if diff "$O.old.sha" "$O.new.sha"; then echo "same outputs: $(wc -l < "$O.new.sha") files"; else echo "outputs differ (above)"; exit 1; fi
