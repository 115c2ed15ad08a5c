"""datasketch MinHash + MinHashLSH (128 permutations, threshold 0.8, 5-word shingles), keep first."""
import json, re, sys, time
from datasketch import MinHash, MinHashLSH

path, truth_path = sys.argv[1], sys.argv[2]
truth = json.load(open(truth_path))
rows = [json.loads(l) for l in open(path)]
t = time.time()
lsh = MinHashLSH(threshold=0.8, num_perm=128)
removed = {}
for r in rows:
    words = re.sub(r"[^\w\s]", " ", r["text"].lower()).split()
    m = MinHash(num_perm=128)
    for i in range(max(1, len(words) - 4)):
        m.update(" ".join(words[i:i + 5]).encode())
    hits = lsh.query(m)
    if hits:
        removed[r["id"]] = hits[0]
    else:
        lsh.insert(r["id"], m)
dt = time.time() - t
def planted(a, b):
    # the pair is planted if one is a copy of the other, or both are copies of the same original
    return truth.get(a) == b or truth.get(b) == a or (a in truth and truth.get(a) == truth.get(b))
correct = sum(1 for k, v in removed.items() if planted(k, v))
planted = len(truth)
print(f"rows={len(rows)} seconds={dt:.2f} rows_per_s={len(rows) / dt:.0f} removed={len(removed)} "
      f"recall={correct / planted:.4f} precision={correct / max(1, len(removed)):.4f}")
