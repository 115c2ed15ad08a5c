"""Python word n-gram decontamination (issue 19's anchor), the rule of GPT-3's and lighteval's: the
evaluation texts' 13-grams in a set; a training row whose instruction+input or output shares one is
contaminated. Words are lower-cased runs of letters and digits, as tunekit's. Reports rows/s of the check
(indexing included) and recall/precision against truth.json; with --tunekit REJECTS it scores tunekit's
rejects.jsonl instead.

  python benches/anchor_decontaminate.py DIR              # DIR from make_contaminated.py
  python benches/anchor_decontaminate.py DIR --tunekit DIR/out/contaminated.jsonl
"""
import json, re, sys, time

d = sys.argv[1]
truth = set(json.load(open(f"{d}/truth.json")))


def score(found, label, seconds=None, rows=None):
    tp = len(found & truth)
    rate = f" seconds={seconds:.2f} rows_per_s={rows / seconds:.0f}" if seconds else ""
    print(f"{label} found={len(found)} recall={tp / len(truth):.4f} precision={tp / max(1, len(found)):.4f}{rate}")


if "--tunekit" in sys.argv:
    rej = [json.loads(l) for l in open(sys.argv[sys.argv.index("--tunekit") + 1])]
    score({r["row"] for r in rej}, "tunekit")
    sys.exit()

N = 13
word = re.compile(r"[^\W_]+")


def grams(text):
    w = [x.lower() for x in word.findall(text)]
    return {tuple(w[i:i + N]) for i in range(len(w) - N + 1)}


t = time.perf_counter()
index = set()
for line in open(f"{d}/eval.jsonl"):
    index |= grams(json.loads(line)["question"])
found, n = set(), 0
for i, line in enumerate(open(f"{d}/train.jsonl"), 1):
    r = json.loads(line)
    n += 1
    if grams(r["instruction"] + "\n" + r["input"]) & index or grams(r["output"]) & index:
        found.add(i)
score(found, "python", time.perf_counter() - t, n)
