#!/usr/bin/env bash
# Full fine-tuning step on CPU, tunekit vs PyTorch + transformers (torch's fused AdamW), same model
# (SmolLM2-135M shapes: 30 layers, hidden 576, 9/3 heads, vocab 49,152, tied) and data, in one run;
# then each with 8-bit AdamW states (tunekit --optim adamw_8bit, bitsandbytes' AdamW8bit).
#   bash benches/full_bench.sh                  # plain backward
#   CHECKPOINTING=1 bash benches/full_bench.sh  # gradient checkpointing on both sides
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}"
PY="${PY:-$HOME/.cache/tunekit-tools/venv/bin/python}"  # with pyarrow (pip install pyarrow)
export HIDDEN=576 LAYERS=30 HEADS=9 KV_HEADS=3 INTER=1536 VOCAB=49152 TIE=1 SEQ=512 FULL=1
STEPS="${STEPS:-6}"
FLAGS=""
[ "${CHECKPOINTING:-0}" = 1 ] && FLAGS="--gradient-checkpointing"
cargo build --release -q
B="$CARGO_TARGET_DIR/release/tunekit"
T=$(mktemp -d)
median() {
  python3 -c "
import json
m=[json.loads(l) for l in open('$1/metrics.jsonl')]
ts=sorted(x['tokens_per_s'] for x in m[2:]); print('  tunekit steps=%d median tokens_per_s=%.0f' % (len(ts), ts[len(ts)//2]))"
}
for optim in adamw adamw_8bit; do
  echo "optimizer: $optim"
  OPTIM=$optim /usr/bin/time -f "  torch peak_rss_kb=%M" "$PY" benches/anchor_train.py "$T" "$STEPS" 2>&1 | grep -E "torch|peak" | sed 's/^/  /'
  rm -rf "$T/out"
  /usr/bin/time -f "  tunekit peak_rss_kb=%M" "$B" -q train --full --optim $optim --model "$T/model" --data "$T/shards" \
      --out "$T/out" --max-steps "$STEPS" --batch-tokens "$SEQ" --lr 2e-5 --eval-every 0 $FLAGS 2>&1 | grep peak_rss
  median "$T/out"
done
rm -rf "$T"
