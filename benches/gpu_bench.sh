#!/usr/bin/env bash
# GPU checks for the trainer (issue 6) and QLoRA (issue 7), as one prepared script for a machine
# with an NVIDIA GPU, PyTorch + transformers + PEFT, and no Rust or network:
#   1. correctness: the same 6 LoRA steps on a tiny model on the CPU (f32), the GPU in f32 and the
#      GPU in bf16 (and NF4 QLoRA on CPU vs GPU): per-step losses side by side;
#   2. LoRA on the SmolLM2-135M shapes, bf16, seq 2048, r=8 on all seven projections, AdamW,
#      batch 1: tokens/s and GPU memory, tunekit vs PyTorch + transformers + PEFT;
#   3. the same with a 4-bit base: tunekit --qlora nf4 vs PEFT + bitsandbytes NF4 (double quant).
#   (2 and 3 also run tunekit with --gradient-checkpointing.)
#
# Build the binary on a machine with Rust (see README "GPU"), then here:
#   TUNEKIT=path/to/tunekit [BNB=dir-with-bitsandbytes] bash benches/gpu_bench.sh
# Results go to stdout and $OUT (default /tmp/tunekit-gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/tunekit-gpu}"; mkdir -p "$OUT"
W=/tmp/tunekit-gpu-work; rm -rf "$W"; mkdir -p "$W"
source benches/gpu_env.sh
[ -n "${BNB:-}" ] && export PYTHONPATH="$BNB:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
STEPS="${STEPS:-20}"
exec 3>&1  # peak() reports here even when the measured command's stdout goes to a file

# Peak GPU memory of one command: nvidia-smi sampled every 50 ms, minus what was in use before.
peak() {
  local name=$1; shift
  local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$W/$name.mem" &
  local smi=$!
  "$@"; local rc=$?
  kill $smi 2>/dev/null; wait $smi 2>/dev/null
  echo >&3 "  $name: peak GPU memory $(sort -n "$W/$name.mem" | tail -1 | awk -v b="$base" '{print $1-b}') MB over idle (rc=$rc)"
}
median_tps() {  # median tokens/s of tunekit's steps after 2 warm-up steps
  python3 -c "
import json,sys
m=[json.loads(l) for l in open(sys.argv[1]) if '\"loss\"' in l]
t=sorted(x['tokens_per_s'] for x in m[2:]); print('  tunekit steps=%d median tokens_per_s=%.0f final_loss=%.4f' % (len(t), t[len(t)//2], m[-1]['loss']))" "$1"
}
losses() { python3 -c "
import json,sys
print('  %-12s' % sys.argv[2], ' '.join('%.5f' % json.loads(l)['loss'] for l in open(sys.argv[1]) if '\"loss\"' in l))" "$1" "$2"; }

echo "== 1. correctness: tiny Llama (hidden 64, 2 layers, GQA 4/2, vocab 1000, seq 128), 6 steps"
T="$W/tiny"
HIDDEN=64 LAYERS=2 HEADS=4 KV_HEADS=2 INTER=128 VOCAB=1000 SEQ=128 python3 benches/anchor_train.py "$T" 6 | sed 's/^/  cpu /'
for v in "cpu f32" "cuda f32" "cuda bf16"; do
  set -- $v
  "$TK" -q train --model "$T/model" --data "$T/shards" --out "$T/$1-$2" --max-steps 6 --batch-tokens 128 \
    --eval-every 0 --device "$1" --dtype "$2" > "$T/$1-$2.log" 2>&1 || { echo "  FAILED $v"; tail -5 "$T/$1-$2.log"; }
  [ -f "$T/$1-$2/metrics.jsonl" ] && losses "$T/$1-$2/metrics.jsonl" "$1-$2"
done
for d in cpu cuda; do
  "$TK" -q train --model "$T/model" --data "$T/shards" --out "$T/nf4-$d" --max-steps 6 --batch-tokens 128 \
    --eval-every 0 --device "$d" --dtype f32 --qlora nf4 > "$T/nf4-$d.log" 2>&1 || { echo "  FAILED nf4 $d"; tail -5 "$T/nf4-$d.log"; }
  [ -f "$T/nf4-$d/metrics.jsonl" ] && losses "$T/nf4-$d/metrics.jsonl" "nf4-$d-f32"
done

echo "== 2. LoRA, SmolLM2-135M shapes, bf16, seq 2048, r=8 all linear, AdamW, batch 1, $STEPS steps"
S="$W/smol"
export HIDDEN=576 LAYERS=30 HEADS=9 KV_HEADS=3 INTER=1536 VOCAB=49152 TIE=1 SEQ=2048
peak peft env DEVICE=cuda DTYPE=bf16 python3 benches/anchor_train.py "$S" "$STEPS"
peak tunekit "$TK" -q --json train --model "$S/model" --data "$S/shards" --out "$S/lora" --max-steps "$STEPS" \
  --batch-tokens 2048 --lora-r 8 --lora-alpha 16 --eval-every 0 --device cuda > "$OUT/lora.json" 2> "$OUT/lora.err"
median_tps "$S/lora/metrics.jsonl"; tail -3 "$OUT/lora.err"
peak tunekit-checkpointed "$TK" -q train --model "$S/model" --data "$S/shards" --out "$S/lora-ckpt" --max-steps "$STEPS" \
  --batch-tokens 2048 --lora-r 8 --lora-alpha 16 --eval-every 0 --device cuda --gradient-checkpointing > /dev/null 2>&1
median_tps "$S/lora-ckpt/metrics.jsonl"
# Where the time goes (adds a sync per phase).
TUNEKIT_PROFILE=1 "$TK" -q train --model "$S/model" --data "$S/shards" --out "$S/lora-prof" --max-steps 8 \
  --batch-tokens 2048 --eval-every 0 --device cuda > /dev/null 2>&1
python3 -c "
import json,sys
m=[json.loads(l) for l in open(sys.argv[1])][2:]
f=lambda k: sorted(x[k] for x in m)[len(m)//2]
print('  profile (median s/step): forward %.4f backward %.4f optimizer %.4f' % (f('seconds_forward'), f('seconds_backward'), f('seconds_optimizer')))" "$S/lora-prof/metrics.jsonl"

echo "== 3. QLoRA NF4 (same shapes and data)"
peak peft-bnb-nf4 env DEVICE=cuda DTYPE=bf16 QLORA=nf4 python3 benches/anchor_train.py "$S" "$STEPS"
peak tunekit-nf4 "$TK" -q --json train --model "$S/model" --data "$S/shards" --out "$S/qlora" --max-steps "$STEPS" \
  --batch-tokens 2048 --lora-r 8 --lora-alpha 16 --eval-every 0 --device cuda --qlora nf4 > "$OUT/qlora.json" 2> "$OUT/qlora.err"
median_tps "$S/qlora/metrics.jsonl"; tail -3 "$OUT/qlora.err"
peak tunekit-nf4-checkpointed "$TK" -q train --model "$S/model" --data "$S/shards" --out "$S/qlora-ckpt" --max-steps "$STEPS" \
  --batch-tokens 2048 --lora-r 8 --lora-alpha 16 --eval-every 0 --device cuda --qlora nf4 --gradient-checkpointing > /dev/null 2>&1
median_tps "$S/qlora-ckpt/metrics.jsonl"
python3 -c "
import json
for f in ['lora', 'qlora']:
    try: s = json.load(open('$OUT/%s.json' % f))
    except Exception as e: print('  ', f, 'no summary', e); continue
    print('  %s: device %s, base %.3f bytes/param, tunekit peak GPU in use %s MB' % (f, s['device'], s['base_bytes_per_param'], s['peak_gpu_memory_mb']))"
cp "$S"/lora/metrics.jsonl "$OUT/lora_metrics.jsonl" 2>/dev/null; cp "$S"/qlora/metrics.jsonl "$OUT/qlora_metrics.jsonl" 2>/dev/null
