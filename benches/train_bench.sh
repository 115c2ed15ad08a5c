#!/usr/bin/env bash
# LoRA training step, tunekit vs PyTorch + transformers + PEFT on CPU, same model and data, in one run.
#   bash benches/train_bench.sh            # the issue's config: hidden 256, 4 layers, vocab 32k, seq 512, r=8 all 7
#   SMOLLM=1 bash benches/train_bench.sh   # SmolLM2-135M shapes (30 layers, hidden 576, 9/3 heads, vocab 49152, tied)
#   TUNEKIT_FLAGS=--gradient-checkpointing ... adds flags to the tunekit side
#   ROUNDS=5 ...                            # rounds of PEFT then tunekit (2); the last line gives each
#                                           # round's ratio and their median (a loaded host moves both)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}"
PY="${PY:-$HOME/.cache/tk-venv/bin/python}"
STEPS="${STEPS:-20}"
if [ "${SMOLLM:-0}" = 1 ]; then
  export HIDDEN=576 LAYERS=30 HEADS=9 KV_HEADS=3 INTER=1536 VOCAB=49152 TIE=1 SEQ=512; STEPS="${STEPS_SMOLLM:-6}"
fi
cargo build --release -q
B="$CARGO_TARGET_DIR/release/tunekit"
T=$(mktemp -d)
LOG="$T/rounds.log"
for round in $(seq "${ROUNDS:-2}"); do
  /usr/bin/time -f "  peft peak_rss_kb=%M" "$PY" benches/anchor_train.py "$T" "$STEPS" 2>&1 | grep -E "peft|peak" | sed 's/^/  /' | tee -a "$LOG"
  /usr/bin/time -f "  tunekit peak_rss_kb=%M" "$B" -q train --model "$T/model" --data "$T/shards" --out "$T/out" \
      --max-steps "$STEPS" --batch-tokens "${SEQ:-512}" --lora-r 8 --lora-alpha 16 --eval-every 0 ${TUNEKIT_FLAGS:-} 2>&1 | grep peak_rss
  python3 -c "
import json
m=[json.loads(l) for l in open('$T/out/metrics.jsonl')]
ts=sorted(x['tokens_per_s'] for x in m[2:]); print('  tunekit steps=%d median tokens_per_s=%.0f' % (len(ts), ts[len(ts)//2]))" | tee -a "$LOG"
done
python3 - "$LOG" <<'PYEOF'
import re, statistics, sys
text = open(sys.argv[1]).read()
peft = [float(x) for x in re.findall(r"peft steps=\d+ median_step_s=\S+ tokens_per_s=(\d+)", text)]
ours = [float(x) for x in re.findall(r"tunekit steps=\d+ median tokens_per_s=(\d+)", text)]
ratios = [a / b for a, b in zip(ours, peft)]
print("  ratio per round " + " ".join(f"{r:.2f}x" for r in ratios) + f"; median {statistics.median(ratios):.2f}x")
PYEOF
rm -rf "$T"
