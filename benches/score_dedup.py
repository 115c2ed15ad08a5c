"""Recall and precision of tunekit's duplicates.jsonl against the planted truth.
tunekit ids are "<file>:<row>"; row k is line k of the corpus, whose own id the truth uses."""
import json, sys
corpus, dups, truth_path = sys.argv[1], sys.argv[2], sys.argv[3]
ids = [json.loads(l)["id"] for l in open(corpus)]
truth = json.load(open(truth_path))
def cid(x):
    return ids[int(x.rsplit(":", 1)[1]) - 1]
removed = {cid(r["id"]): cid(r["duplicate_of"]) for r in map(json.loads, open(dups))}
def planted(a, b):
    # the pair is planted if one is a copy of the other, or both are copies of the same original
    return truth.get(a) == b or truth.get(b) == a or (a in truth and truth.get(a) == truth.get(b))
correct = sum(1 for k, v in removed.items() if planted(k, v))
print(f"removed={len(removed)} recall={correct / len(truth):.4f} precision={correct / max(1, len(removed)):.4f}")
