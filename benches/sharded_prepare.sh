#!/usr/bin/env bash
# Sharded prepare against one process on the same rows, for one or more builds in one run (ROUNDS
# rounds, two by default, builds alternating): one process, each of W ranks one after another (on a cluster the wall
# time is one rank + the merge), then the merge; wall and CPU seconds of each, what the ranks set
# aside, and the merged shards, manifest and side files compared with the one process's.
#   [ROUNDS=2] [CORPUS=file.jsonl] bash benches/sharded_prepare.sh ROWS W BINARY [BINARY ...]
# Rows: the first ROWS of $CORPUS, by default benches/make_corpora.py's alpaca_1m.jsonl (999 real
# rows replicated, so mostly near duplicates); Qwen3 tokenizer, prepare's defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
C="${TUNEKIT_BENCH:-$HOME/.cache/tunekit-bench}"
ROWS=$1 W=$2
shift 2
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
head -n "$ROWS" "${CORPUS:-$C/alpaca_1m.jsonl}" > "$T/rows.jsonl"
TOK=$PWD/datasets/tokenizers/qwen3
timed() { # label, command...: one line of wall/CPU seconds and peak RSS; the command's --json on $T/last.json
  local label=$1
  shift
  /usr/bin/time -o "$T/time" -f "%e %U %S %M" "$@" > "$T/last.json"
  read -r wall user sys rss < "$T/time"
  printf '  %-14s wall %6.2f s  cpu %6.2f s  peak %5.0f MB  %s\n' "$label" "$wall" "$(echo "$user + $sys" | bc)" \
    "$(echo "$rss / 1024" | bc)" "$(python3 -c "
import json,sys
s=json.load(open('$T/last.json'))
print(' '.join(f'{k}={s[k]}' for k in ('rows_kept','duplicates_near','set_aside','tokenized_at_merge') if k in s))")"
}
for ((round = 1; round <= ${ROUNDS:-2}; round++)); do
  for B in "$@"; do
    echo "== round $round: $B"
    rm -rf "$T/one" "$T/parts"
    timed "one process" "$B" -q --json prepare "$T/rows.jsonl" --tokenizer "$TOK" --out "$T/one"
    for ((r = 0; r < W; r++)); do
      timed "rank $r of $W" "$B" -q --json prepare "$T/rows.jsonl" --tokenizer "$TOK" --out "$T/parts" \
        --rank $r --world-size "$W"
    done
    timed "merge" "$B" -q --json merge-parts "$T/parts"
    for f in "$T"/one/*.parquet "$T"/one/{manifest,duplicates,rejects}.json*; do
      [ -e "$f" ] && ! cmp -s "$f" "$T/parts/${f##*/}" && echo "  DIFFERS: ${f##*/}"
    done
    echo "  outputs compared with the one process's (only differences are printed)"
  done
done
