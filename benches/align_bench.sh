#!/usr/bin/env bash
# KTO, ORPO and RLOO steps, tunekit vs TRL's KTOTrainer / ORPOTrainer / RLOOTrainer + PEFT on CPU, same
# model and data, side by side in one run (config in benches/anchor_align.py): the median seconds of an
# optimizer step after two warm-up steps, and TRL's over tunekit's.
#   bash benches/align_bench.sh                # PY: a python with TRL 1.16 (+ torch, transformers, peft)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}"
PY="${PY:-/tmp/trlenv/bin/python}"
STEPS="${STEPS:-6}"
METHODS="${METHODS:-kto orpo rloo}"
cargo build --release -q
B="$CARGO_TARGET_DIR/release/tunekit"
T=$(mktemp -d)
grep -m1 "model name" /proc/cpuinfo
lora=(--lora-r 8 --lora-alpha 16 --lr 2e-4 --eval-every 0 --device cpu --max-steps $((STEPS + 2)))
for m in $METHODS; do
  trl=$(cd "$T" && PYTHONPATH="$OLDPWD/benches" "$PY" "$OLDPWD/benches/anchor_align.py" "$m" "$T/$m" "$STEPS" 2>&1 \
        | grep "^trl" | sed 's/.*median_step_s=//')
  case $m in
    kto|orpo) "$B" -q train --method "$m" --model "$T/$m/model" --data "$T/$m/data" --out "$T/$m/out" \
                --grad-accum 4 --beta 0.1 "${lora[@]}" > /dev/null ;;
    rloo) "$B" -q prepare "$T/$m/prompts.jsonl" --method prompts --tokenizer "$T/$m/tokenizer" \
              --template "$T/$m/prompt.jinja" --out "$T/$m/prompts" --eval-fraction 0 --dedup none --seq-len 64 > /dev/null
          "$B" -q train --method rloo --model "$T/$m/model" --data "$T/$m/prompts" --out "$T/$m/out" \
              --prompts-per-step 2 --num-generations 4 --max-completion-tokens 64 --temperature 1.0 --beta 0.05 \
              --reward length:64 "${lora[@]}" > /dev/null ;;
  esac
  python3 -c "
import json
m=[json.loads(l) for l in open('$T/$m/out/metrics.jsonl') if '\"step_time\"' in l][2:]
s=sorted(x['step_time'] for x in m)[len(m)//2]; t=float('$trl')
print('%-5s trl median_step_s=%.3f  tunekit median_step_s=%.3f  (%d steps)  trl/tunekit=%.2fx' % ('$m', t, s, len(m), t/s))"
done
rm -rf "$T"
