"""Benchmark corpora built from real text (llamafactory's alpaca_en_demo.json, fetched by
.ci/fetch-assets), written to $TUNEKIT_BENCH (default ~/.cache/tunekit-bench).

  alpaca_1m.jsonl / alpaca_1m.csv   1,000,000 alpaca rows (the 999 real rows replicated, each instruction made unique)
  alpaca_20k.json                   20,000 alpaca rows, same construction (prepare benchmark)
  dedup_31k.jsonl + dedup_truth.json 20,000 distinct documents from alpaca sentences, a quarter copied exactly,
                                     a third copied with ~1.5% of words changed; truth maps copy id -> original id
  dedup_1m.jsonl                    1,000,000 distinct-ish documents for the memory check
  messages_1m.jsonl                 1,000,000 canonical conversations (export + validate benchmark)
"""
import csv, json, os, random, re, sys

assets = os.environ.get("TUNEKIT_ASSETS", os.path.expanduser("~/.cache/tunekit-assets"))
out = os.environ.get("TUNEKIT_BENCH", os.path.expanduser("~/.cache/tunekit-bench"))
os.makedirs(out, exist_ok=True)
rows = json.load(open(os.path.join(assets, "llamafactory-0.9.5/data/alpaca_en_demo.json")))

def alpaca(n):
    for i in range(n):
        r = rows[i % len(rows)]
        yield {"instruction": f"{r['instruction']} (#{i})", "input": r["input"], "output": r["output"]}

def write_if_missing(name, fn):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        tmp = path + ".tmp"
        fn(tmp)
        os.rename(tmp, path)
    print(path)

def jsonl(n):
    def w(p):
        with open(p, "w") as f:
            for r in alpaca(n):
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return w

def csv_file(n):
    def w(p):
        with open(p, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["instruction", "input", "output"])
            for r in alpaca(n):
                wr.writerow([r["instruction"], r["input"], r["output"]])
    return w

write_if_missing("alpaca_1m.jsonl", jsonl(1_000_000))
write_if_missing("alpaca_1m.csv", csv_file(1_000_000))
write_if_missing("alpaca_20k.json", lambda p: json.dump(list(alpaca(20_000)), open(p, "w"), ensure_ascii=False))

# Dedup corpus: documents assembled from real sentences.
sentences = []
for r in rows:
    for s in re.split(r"(?<=[.!?])\s+", (r["instruction"] + " " + r["input"] + " " + r["output"]).replace("\n", " ")):
        if len(s.split()) >= 4:
            sentences.append(s.strip())
sentences = sorted(set(sentences))

def documents(n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        k = rng.randint(6, 12)
        yield " ".join(rng.choice(sentences) for _ in range(k))

def perturb(text, rng, frac=0.015):
    w = text.split()
    for _ in range(max(1, round(len(w) * frac))):
        w[rng.randrange(len(w))] = rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"]) + str(rng.randrange(1000))
    return " ".join(w)

def dedup_corpus(p):
    rng = random.Random(1)
    docs = list(documents(20_000, 0))
    recs = [{"id": f"d{i}", "text": t} for i, t in enumerate(docs)]
    truth = {}
    for i in rng.sample(range(20_000), 5_000):
        recs.append({"id": f"x{i}", "text": docs[i]}); truth[f"x{i}"] = f"d{i}"
    for i in rng.sample(range(20_000), 6_667):
        recs.append({"id": f"n{i}", "text": perturb(docs[i], rng)}); truth[f"n{i}"] = f"d{i}"
    rng.shuffle(recs)
    with open(p, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    json.dump(truth, open(os.path.join(out, "dedup_truth.json"), "w"))

write_if_missing("dedup_31k.jsonl", dedup_corpus)

def dedup_1m(p):
    with open(p, "w") as f:
        for i, t in enumerate(documents(1_000_000, 5)):
            f.write(json.dumps({"id": f"m{i}", "text": t}) + "\n")

write_if_missing("dedup_1m.jsonl", dedup_1m)

def messages_1m(p):
    with open(p, "w") as f:
        for i, r in enumerate(alpaca(1_000_000)):
            u = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
            f.write(json.dumps({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                             {"role": "user", "content": u}, {"role": "assistant", "content": r["output"]}],
                                "id": f"alpaca:{i + 1}"}, ensure_ascii=False) + "\n")

write_if_missing("messages_1m.jsonl", messages_1m)
