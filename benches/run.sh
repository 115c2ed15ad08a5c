#!/usr/bin/env bash
# Side-by-side benchmarks of tunekit against the Python anchors named in the issues, on this
# machine, in one run. Figures go to benches/RESULTS.md by hand, with this command:
#   bash benches/run.sh 2>&1 | tee /tmp/bench.log
# Needs: .ci/fetch-assets (real data), a venv with the anchors:
#   python3 -m venv ~/.cache/tk-venv && ~/.cache/tk-venv/bin/pip install transformers tokenizers jinja2 datasets datasketch polars
#   ~/.cache/tk-venv/bin/pip install --no-deps trl
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tunekit-target}"
PY="${PY:-$HOME/.cache/tk-venv/bin/python}"
C="${TUNEKIT_BENCH:-$HOME/.cache/tunekit-bench}"
cargo build --release -q
B="$CARGO_TARGET_DIR/release/tunekit"
T=$(mktemp -d)
"$PY" benches/make_corpora.py > /dev/null
TIME() { /usr/bin/time -f "  peak_rss_mb=%M wall_s=%e" "$@" 2>&1 | awk '/peak_rss_mb/ {split($1,a,"="); printf "  peak_rss_mb=%.0f %s\n", a[2]/1024, $2; next} {print}'; }
best() { # best of 3 runs of a tunekit --json command writing under $T/o: prints rows_per_s and seconds
  # (the previous run's output is deleted first, outside the timing: replacing a 1 GB file frees its page cache)
  for i in 1 2 3; do rm -rf "$T/o"; sync; "$@"; done | python3 -c "
import json,sys
runs=[json.loads(l) for l in sys.stdin if l.startswith('{')]
b=max(runs,key=lambda r:r['rows_per_s'])
print('  tunekit best of 3: rows_per_s=%.0f seconds=%.2f' % (b['rows_per_s'], b['seconds']))"
}

echo "== convert: 1M alpaca rows"
for f in alpaca_1m.jsonl alpaca_1m.csv; do
  echo "-- $f"
  best "$B" -q --json convert "$C/$f" --out "$T/o/c.jsonl"
  rm -rf "$T/o"; TIME "$B" -q --json convert "$C/$f" --out "$T/o/c.jsonl" | grep peak
  kind=${f##*.}; [ "$kind" = jsonl ] && kind=json
  echo "  anchor datasets load_dataset + map:"; TIME "$PY" benches/anchor_convert.py "$C/$f" "$kind" | grep -E "rows=|peak"
  echo "  anchor + to_json:"; TIME "$PY" benches/anchor_convert.py "$C/$f" "$kind" --write | grep -E "rows=|peak"
  if [ "$kind" = csv ]; then
    echo "  anchor polars read_csv + expressions + write_ndjson:"
    TIME "$PY" benches/anchor_polars_convert.py "$C/$f" "$T/polars.jsonl" | grep -E "rows=|peak"; rm -f "$T/polars.jsonl"
    Q="SELECT * FROM data WHERE length(output) > 500"
    echo "-- $f --sql \"$Q\""
    best "$B" -q --json convert "$C/$f" --out "$T/o/c.jsonl" --sql "$Q"
    echo "  anchor polars SQLContext, same query:"
    TIME "$PY" benches/anchor_polars_convert.py "$C/$f" "$T/polars.jsonl" "$Q" | grep -E "rows=|peak"; rm -f "$T/polars.jsonl"
  fi
done

echo "== dedup: 31,667 rows with planted duplicates"
best "$B" -q --json dedup "$C/dedup_31k.jsonl" --out "$T/o/d.jsonl"
"$PY" benches/score_dedup.py "$C/dedup_31k.jsonl" "$T/o/duplicates.jsonl" "$C/dedup_truth.json"
echo "  anchor datasketch:"; TIME "$PY" benches/anchor_dedup.py "$C/dedup_31k.jsonl" "$C/dedup_truth.json"
echo "-- dedup 1M rows (memory)"
TIME "$B" -q --json dedup "$C/dedup_1m.jsonl" --out "$T/d1m/d.jsonl" | python3 -c "
import sys
for l in sys.stdin:
    if l.startswith('{'):
        import json; d=json.loads(l); print('  rows_per_s=%.0f seconds=%.1f' % (d['rows_per_s'], d['seconds']))
    else: print(l.rstrip())"

echo "== prepare: 20,000 alpaca rows, Qwen3 template, seq 2048, BFD, Parquet"
best "$B" -q --json prepare "$C/alpaca_20k.json" --tokenizer datasets/tokenizers/qwen3 --out "$T/o" --dedup none --eval-fraction 0
python3 -c "import json; m=json.load(open('$T/o/manifest.json')); print('  tunekit fill_ratio=%.4f packed_rows=%d' % (m['accounting']['fill_ratio'], m['accounting']['packed_rows']))"
TIME "$B" -q --json prepare "$C/alpaca_20k.json" --tokenizer datasets/tokenizers/qwen3 --out "$T/p" --dedup none --eval-fraction 0 | grep peak
cargo bench -q --bench prepare_vs_encode -- "$C/alpaca_20k.json" datasets/tokenizers/qwen3 2>/dev/null | grep -E "rows=|tokenizer_load"
echo "  anchor transformers + datasets.map(num_proc=2) + TRL pack_dataset(bfd) + to_parquet:"
TIME "$PY" benches/anchor_prepare.py "$C/alpaca_20k.json" datasets/tokenizers/qwen3 2048 | grep -E "rows=|peak"

echo "== export openai + validate: 1M conversations"
best "$B" -q --json export openai "$C/messages_1m.jsonl" --out "$T/o/train.jsonl" --dedup none
rm -rf "$T/e"; TIME "$B" -q --json export openai "$C/messages_1m.jsonl" --out "$T/e/train.jsonl" --dedup none | grep peak
for i in 1 2 3; do "$B" -q --json validate openai "$T"/e/train*.jsonl; done | python3 -c "
import json,sys
runs=[json.loads(l) for l in sys.stdin if l.startswith('{')]
b=max(runs,key=lambda r:r['examples_per_s'])
print('  validate best of 3: examples_per_s=%.0f seconds=%.2f valid=%s' % (b['examples_per_s'], b['seconds'], b['valid']))"
TIME "$B" -q --json validate openai "$T"/e/train*.jsonl | grep peak
echo "-- export 100k conversations (memory flat in the input size?)"
head -100000 "$C/messages_1m.jsonl" > "$T/m100k.jsonl"
TIME "$B" -q --json export openai "$T/m100k.jsonl" --out "$T/e2/train.jsonl" --dedup none | grep peak
rm -rf "$T"
