#!/usr/bin/env bash
# DPO step, tunekit vs TRL DPOTrainer + PEFT on CPU, same model and pairs, side by side in one run
# (config in benches/anchor_dpo.py): pairs/s of the median step after warm-up, two rounds.
#   bash benches/dpo_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}"
PY="${PY:-$HOME/.cache/tk-venv/bin/python}"
STEPS="${STEPS:-8}"
cargo build --release -q
B="$CARGO_TARGET_DIR/release/tunekit"
T=$(mktemp -d)
for round in 1 2; do
  /usr/bin/time -f "  trl peak_rss_kb=%M" "$PY" benches/anchor_dpo.py "$T" "$STEPS" 2>&1 | grep -E "^trl|peak" | sed 's/^/  /'
  /usr/bin/time -f "  tunekit peak_rss_kb=%M" "$B" -q train --method dpo --model "$T/model" --data "$T/pairs" \
      --out "$T/out" --max-steps $((STEPS + 2)) --grad-accum 4 --lora-r 8 --lora-alpha 16 --beta 0.1 \
      --eval-every 0 --device cpu 2>&1 | grep peak
  python3 -c "
import json
m=[json.loads(l) for l in open('$T/out/metrics.jsonl')]
p=sorted(x['pairs_per_s'] for x in m[2:]); print('  tunekit steps=%d median pairs_per_s=%.2f' % (len(p), p[len(p)//2]))"
done
rm -rf "$T"
