#!/usr/bin/env bash
# Data-parallel training over NCCL (issue 16), as one prepared script for a machine with an NVIDIA
# GPU, PyTorch (for torchrun, NCCL's library and the model builder) and no Rust or network:
#   1. a tiny Llama: 6 steps in one process (--grad-accum 2), then the same under torchrun as
#      a world of 1 over NCCL (TUNEKIT_BACKEND=nccl): the losses must be equal;
#   2. two ranks on the one GPU (--grad-accum 1 each): NCCL may refuse two ranks on one device;
#      what happens is recorded, and if it runs, its losses are compared with 1.;
#   3. a rank that dies mid-run: what the other rank says, and how long it takes;
#   4. SmolLM2-135M shapes, bf16, seq 2048, r 8 and r 16: seconds of the gradient all-reduce per step
#      (world of 1: NCCL's own cost on the device, no wire) and the bytes summed.
# Build the binary with `--features nccl` (README "GPU"), then here:
#   TUNEKIT=path/to/tunekit bash benches/nccl_check.sh
# Results go to stdout and $OUT (default /tmp/tunekit-nccl).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/tunekit-nccl}"; mkdir -p "$OUT"
W=/tmp/tunekit-nccl-work; rm -rf "$W"; mkdir -p "$W"
source benches/gpu_env.sh
TORCHRUN="python3 -m torch.distributed.run"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"
ldd "$TK" | grep -E "nccl|not found" | sed 's/^/  /'

losses() { python3 -c "
import json,sys
m=[json.loads(l) for l in open(sys.argv[1]) if '\"loss\"' in l]
print('  %-22s' % sys.argv[2], ' '.join('%.6f' % x['loss'] for x in m))" "$1" "$2"; }
allreduce() { python3 -c "
import json,sys
m=[json.loads(l) for l in open(sys.argv[1]) if '\"loss\"' in l][2:]
t=sorted(x['seconds_all_reduce'] for x in m); s=sorted(x['step_time'] for x in m)
print('  %-22s all-reduce median %.6f s (min %.6f, max %.6f) of a %.4f s step; %d bytes summed per step' % (
  sys.argv[2], t[len(t)//2], t[0], t[-1], s[len(s)//2], m[-1]['bytes_all_reduced']))" "$1" "$2"; }

echo "== 1. tiny Llama, 6 steps: one process vs a world of 1 over NCCL"
T="$W/tiny"
HIDDEN=64 LAYERS=2 HEADS=4 KV_HEADS=2 INTER=128 VOCAB=1000 SEQ=128 python3 benches/anchor_train.py "$T" 1 > /dev/null
TRAIN=(train --model "$T/model" --data "$T/shards" --max-steps 6 --batch-tokens 128 --eval-every 0 --device cuda --dtype f32)
"$TK" -q "${TRAIN[@]}" --out "$T/single" --grad-accum 2 > "$OUT/single.log" 2>&1 || { echo "  FAILED single"; tail -5 "$OUT/single.log"; }
losses "$T/single/metrics.jsonl" "one process"
TUNEKIT_BACKEND=nccl timeout 300 $TORCHRUN --standalone --nproc-per-node 1 --no-python "$TK" -q "${TRAIN[@]}" \
  --out "$T/nccl1" --grad-accum 2 > "$OUT/nccl1.log" 2>&1; echo "  world of 1 over NCCL: exit $?"
tail -4 "$OUT/nccl1.log" | sed 's/^/    /'
[ -f "$T/nccl1/metrics.jsonl" ] && { losses "$T/nccl1/metrics.jsonl" "NCCL world of 1"; allreduce "$T/nccl1/metrics.jsonl" "NCCL world of 1"; }

echo "== 2. two ranks on the one GPU (--grad-accum 1 each = the 2 micro-batches of 1.)"
NCCL_DEBUG=WARN timeout 300 $TORCHRUN --standalone --nproc-per-node 2 --no-python "$TK" -q "${TRAIN[@]}" \
  --out "$T/nccl2" --grad-accum 1 > "$OUT/nccl2.log" 2>&1; echo "  2 ranks, one GPU: exit $?"
grep -iE "error|refus|duplicate|warn" "$OUT/nccl2.log" | head -8 | sed 's/^/    /'
[ -f "$T/nccl2/metrics.jsonl" ] && { losses "$T/nccl2/metrics.jsonl" "2 ranks over NCCL"; allreduce "$T/nccl2/metrics.jsonl" "2 ranks over NCCL"; }

echo "== 3. a rank that dies mid-run (a rank is killed after 6 s; TUNEKIT_COLLECTIVE_TIMEOUT=30)"
if [ -f "$T/nccl2/metrics.jsonl" ]; then
  start=$(date +%s)
  TUNEKIT_COLLECTIVE_TIMEOUT=30 timeout 300 $TORCHRUN --standalone --nproc-per-node 2 --no-python "$TK" "${TRAIN[@]}" \
    --max-steps 100000 --out "$T/dies" > "$OUT/dies.log" 2>&1 &
  job=$!
  sleep 6; pkill -9 -n -f -- "--out $T/dies"  # the newest such process: a rank, not torchrun
  wait $job; echo "  exit $? after $(( $(date +%s) - start )) s"
  grep -iE "error|fail|timeout" "$OUT/dies.log" | head -6 | sed 's/^/    /'
  ls "$T/dies" 2>/dev/null | sed 's/^/    left: /'
else
  echo "  skipped: two ranks did not run on one GPU"
fi

echo "== 4. SmolLM2-135M shapes, bf16, seq 2048: the gradient all-reduce per step (world of 1 over NCCL)"
S="$W/smol"
HIDDEN=576 LAYERS=30 HEADS=9 KV_HEADS=3 INTER=1536 VOCAB=49152 TIE=1 SEQ=2048 python3 benches/anchor_train.py "$S" 1 > /dev/null
for r in 8 16; do
  TUNEKIT_BACKEND=nccl timeout 300 $TORCHRUN --standalone --nproc-per-node 1 --no-python "$TK" -q train --model "$S/model" \
    --data "$S/shards" --out "$S/r$r" --max-steps 12 --batch-tokens 2048 --lora-r $r --lora-alpha $((2 * r)) --eval-every 0 \
    --device cuda > "$OUT/smol-r$r.log" 2>&1 || { echo "  FAILED r $r"; tail -5 "$OUT/smol-r$r.log"; }
  [ -f "$S/r$r/metrics.jsonl" ] && allreduce "$S/r$r/metrics.jsonl" "r $r"
done
for d in single nccl1 nccl2; do cp "$T/$d/metrics.jsonl" "$OUT/tiny-$d.jsonl" 2>/dev/null; done
