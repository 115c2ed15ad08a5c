"""Per-document comparison of `tunekit bench --out T` with `lm_eval ... --log_samples --output_path L`.

For each task in both: multiple choice — the choice each picks for acc and acc_norm, the largest
log-likelihood difference, the aggregates; generation — the filtered answers and exact match.
Exits 1 if any document's pick or answer differs.

usage: python3 compare_lm_eval.py LM_EVAL_OUTPUT_DIR TUNEKIT_OUT_DIR [SUBJECT]
"""
import glob, json, os, sys


def argmax(xs):
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def main():
    lm_dir, tk_dir = sys.argv[1], sys.argv[2]
    subject = sys.argv[3] if len(sys.argv) > 3 else "base"
    bad = 0
    for path in sorted(glob.glob(os.path.join(lm_dir, "**", "samples_*.jsonl"), recursive=True)):
        task = os.path.basename(path)[len("samples_"):].rsplit("_", 1)[0]
        mine_path = os.path.join(tk_dir, "samples", task, f"{subject}.jsonl")
        if not os.path.exists(mine_path):
            continue
        lm = {json.loads(l)["doc_id"]: json.loads(l) for l in open(path)}
        tk = {json.loads(l)["doc_id"]: json.loads(l) for l in open(mine_path)}
        docs = sorted(set(lm) & set(tk))
        ctx_same = sum(lm[i]["arguments"]["gen_args_0"]["arg_0"] == tk[i]["context"] for i in docs)
        print(f"{task}: the same context (few-shot examples and all) for {ctx_same}/{len(docs)} documents")
        bad += ctx_same != len(docs)
        if "loglikelihoods" in tk[docs[0]]:
            diff, same, same_norm, agg = 0.0, 0, 0, {"acc": [0, 0], "acc_norm": [0, 0]}
            for i in docs:
                a, b = lm[i], tk[i]
                ll = [float(r[0]) for r in a["filtered_resps"]]
                diff = max(diff, max(abs(x - y) for x, y in zip(ll, b["loglikelihoods"])))
                lens = [len(c) for c in a["doc"]["choices"]] if "choices" in a["doc"] else None
                same += argmax(ll) == b["pred"]
                if lens:
                    same_norm += argmax([x / n for x, n in zip(ll, lens)]) == b["pred_norm"]
                agg["acc"][0] += a["acc"]
                agg["acc"][1] += b["pred"] == b["target"]
                if "acc_norm" in a:
                    agg["acc_norm"][0] += a["acc_norm"]
                    agg["acc_norm"][1] += b["pred_norm"] == b["target"]
            n = len(docs)
            print(f"{task}: {n} documents; same acc pick {same}/{n}, same acc_norm pick {same_norm}/{n}; "
                  f"largest |log-likelihood difference| {diff:.2e}; acc lm-eval {agg['acc'][0] / n:.4f} tunekit "
                  f"{agg['acc'][1] / n:.4f}; acc_norm lm-eval {agg['acc_norm'][0] / n:.4f} tunekit {agg['acc_norm'][1] / n:.4f}")
            bad += (same != n) + (bool(lens) and same_norm != n)
        else:
            same, em = 0, [0, 0]
            for i in docs:
                a, b = lm[i], tk[i]
                got = a["filtered_resps"][0] if isinstance(a["filtered_resps"], list) else a["filtered_resps"]
                mine = b["filtered"].get(a["filter"], None)
                same += got == mine
                key = [k for k in a if k.startswith("exact_match")]
                em[0] += a[key[0]] if key else 0
            n = len(docs)
            print(f"{task}: {n} documents; same filtered answer {same}/{n}; exact_match lm-eval {em[0] / n:.4f}")
            for i in docs[:3]:
                print("   ", repr(lm[i]["resps"][0][0]), "|", repr(tk[i]["response"]))
            bad += same != n
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
