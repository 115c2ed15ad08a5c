#!/usr/bin/env bash
# Mixture-of-experts LoRA step on CPU (issue 34): tunekit on a Qwen3-MoE of 8 experts, top 2, and on the dense
# Qwen3 of the same active parameters; transformers + PEFT on both (the MoE with each experts implementation),
# same models and data, in one run. Shapes in benches/anchor_moe.py.
#   bash benches/moe_bench.sh        # STEPS=20 by default; PY=python with torch, transformers, peft, pyarrow
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}"
PY="${PY:-$HOME/.cache/tunekit-tools/venv/bin/python}"
STEPS="${STEPS:-20}"
cargo build --release -q
B="$CARGO_TARGET_DIR/release/tunekit"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
for round in 1 2; do
  echo "round $round"
  IMPLS="${IMPLS:-eager,grouped_mm}" /usr/bin/time -f "  peft peak_rss_kb=%M (both models, one process)" \
      "$PY" benches/anchor_moe.py "$T" "$STEPS" 2>&1 | grep -E "^peft|peak_rss" | sed 's/^peft/  peft/'
  for m in moe dense; do
    rm -rf "$T/out-$m"
    /usr/bin/time -f "  tunekit $m peak_rss_kb=%M" "$B" -q train --model "$T/$m" --data "$T/shards" --out "$T/out-$m" \
        --max-steps "$STEPS" --batch-tokens 512 --lora-r 8 --lora-alpha 16 --eval-every 0 --target all-linear 2>&1 | grep peak_rss
    python3 -c "
import json
m=[json.loads(l) for l in open('$T/out-$m/metrics.jsonl')]
ts=sorted(x['tokens_per_s'] for x in m[4:] if 'tokens_per_s' in x)
print('  tunekit $m steps=%d median tokens_per_s=%.0f' % (len(ts), ts[len(ts)//2]))"
  done
done
