"""tests/fixtures/bench/lm_eval_quartz50.json from an lm-eval run of quartz.yaml (eval_bench.sh's
OUT/lm-eval): per document of the first 50, lm-eval's log-likelihoods of the choices and its picks
(acc: argmax; acc_norm: argmax per character of the choice), and acc, acc_norm over the 50.
    python3 quartz50_fixture.py /tmp/eval-bench/lm-eval > ../../tests/fixtures/bench/lm_eval_quartz50.json
"""
import glob
import json
import sys


def argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def main():
    path = glob.glob(f"{sys.argv[1]}/**/samples_quartz_local_*.jsonl", recursive=True)[0]
    rows = sorted((json.loads(l) for l in open(path)), key=lambda r: r["doc_id"])[:50]
    docs = []
    for r in rows:
        lls = [float(x[0]) for x in r["filtered_resps"]]
        choices = r["doc"]["choices"]
        pred, pred_norm = argmax(lls), argmax([l / len(c) for l, c in zip(lls, choices)])
        target = int(r["target"])
        assert (pred == target) == bool(r["acc"]) and (pred_norm == target) == bool(r["acc_norm"])
        docs.append({"doc_id": r["doc_id"], "pred": pred, "pred_norm": pred_norm, "loglikelihoods": lls})
    acc = sum(float(r["acc"]) for r in rows) / len(rows)
    acc_norm = sum(float(r["acc_norm"]) for r in rows) / len(rows)
    json.dump({"docs": docs, "acc": acc, "acc_norm": acc_norm}, sys.stdout, indent=1)
    print()


main()
