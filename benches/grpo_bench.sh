#!/usr/bin/env bash
# GRPO step, tunekit vs TRL GRPOTrainer + PEFT on CPU, same model, prompts and reward, side by side in
# one run (config in benches/anchor_grpo.py): median seconds per optimizer step after two warm-up
# steps, and the generation's tokens/s, two rounds.
#   bash benches/grpo_bench.sh            # TRL in f32 (its fastest here); BF16=1 for TRL's default autocast
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}"
PY="${PY:-$HOME/.cache/tk-venv/bin/python}"
STEPS="${STEPS:-10}"
cargo build --release -q
B="$CARGO_TARGET_DIR/release/tunekit"
T=$(mktemp -d)
grep -m1 "model name" /proc/cpuinfo
for round in 1 2; do
  /usr/bin/time -f "  trl peak_rss_kb=%M" "$PY" benches/anchor_grpo.py "$T" "$STEPS" 2>&1 | grep -E "^trl|peak" | sed 's/^/  /'
  "$B" -q prepare "$T/prompts.jsonl" --method prompts --tokenizer "$T/tokenizer" --template "$T/prompt.jinja" \
      --out "$T/prompts" --eval-fraction 0 --dedup none --seq-len 64 > /dev/null
  /usr/bin/time -f "  tunekit peak_rss_kb=%M" "$B" -q train --method grpo --model "$T/model" --data "$T/prompts" \
      --out "$T/out" --max-steps "$STEPS" --prompts-per-step 2 --num-generations 4 --max-completion-tokens 64 \
      --temperature 1.0 --beta 0.04 --loss-type dapo --reward length:64 --lora-r 8 --lora-alpha 16 --lr 1e-4 \
      --eval-every 0 --device cpu 2>&1 | grep peak
  python3 -c "
import json
m=[json.loads(l) for l in open('$T/out/metrics.jsonl')][2:]
s=sorted(x['step_time'] for x in m)[len(m)//2]; g=sorted(x['gen_tokens_per_s'] for x in m)[len(m)//2]
print('  tunekit steps=%d median_step_s=%.3f steps_per_s=%.3f gen_tokens_per_s=%.0f' % (len(m)+2, s, 1/s, g))"
done
rm -rf "$T"
