"""A planted decontamination benchmark (issue 19), seeded: evaluation questions copied and lightly edited
into a training set of 100,000 rows.

- eval.jsonl: the real instructions of 13-120 words of llamafactory's alpaca_en_demo, dpo_en_demo and
  kto_en_demo (up to 500), as {"question": ...}.
- train.jsonl: 99,000 alpaca rows whose instruction and output are sentences drawn word by word from the
  same demo data's vocabulary (so they share words but, by chance, no 13-word run with the questions),
  plus 1,000 planted rows: an evaluation question as the instruction, copied (1/4), re-cased with the
  punctuation stripped (1/4), wrapped in other words (1/4), or with one word replaced near the end (1/4);
  shuffled.
- truth.json: the 1-based line numbers of the planted rows.

  python benches/make_contaminated.py LLAMAFACTORY_DATA_DIR OUT_DIR
"""
import json, os, random, re, sys

data, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
rng = random.Random(19)
alpaca = json.load(open(os.path.join(data, "alpaca_en_demo.json")))
dpo = json.load(open(os.path.join(data, "dpo_en_demo.json")))
kto = json.load(open(os.path.join(data, "kto_en_demo.json")))
questions = [r["instruction"] for r in alpaca] + [r["conversations"][-1]["value"] for r in dpo if r.get("conversations")]
questions += [m["content"] for r in kto for m in r.get("messages", []) if m.get("role") == "user"]
questions = sorted({q.strip() for q in questions if 13 <= len(q.split()) <= 120})
rng.shuffle(questions)
evals = questions[:500]
vocab = sorted({w for r in alpaca for w in re.findall(r"[A-Za-z']+", r["instruction"] + " " + r["output"])})


def sentence(n):
    return " ".join(rng.choice(vocab) for _ in range(n)).capitalize() + "."


def edit(q, kind):
    if kind == 0:
        return q
    if kind == 1:
        return re.sub(r"[^\w\s]", "", q).upper()
    if kind == 2:
        return f"{sentence(6)} {q} {sentence(8)}"
    w = q.split()
    w[-2 if len(w) > 2 else -1] = rng.choice(vocab)
    return " ".join(w)


rows = [{"instruction": sentence(rng.randint(8, 40)), "input": "", "output": sentence(rng.randint(10, 80))}
        for _ in range(99_000)]
planted = [{"instruction": edit(evals[i % len(evals)], i % 4), "input": "", "output": sentence(30), "_p": 1} for i in range(1000)]
rows += planted
rng.shuffle(rows)
truth = [i + 1 for i, r in enumerate(rows) if r.pop("_p", None)]
with open(os.path.join(out, "train.jsonl"), "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
with open(os.path.join(out, "eval.jsonl"), "w") as f:
    for q in evals:
        f.write(json.dumps({"question": q}) + "\n")
json.dump(truth, open(os.path.join(out, "truth.json"), "w"))
print(f"train={len(rows)} planted={len(truth)} eval={len(evals)} vocab={len(vocab)}")
