"""The Python way to convert alpaca rows to chat messages: datasets.load_dataset + .map."""
import sys, time
from datasets import load_dataset, disable_caching

disable_caching()
path, kind = sys.argv[1], sys.argv[2]
t = time.time()
ds = load_dataset(kind, data_files=path, split="train")

def to_messages(r):
    user = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]}

ds = ds.map(to_messages, remove_columns=ds.column_names)
if "--write" in sys.argv:
    ds.to_json("/tmp/anchor_convert_out.jsonl")
dt = time.time() - t
print(f"rows={len(ds)} seconds={dt:.2f} rows_per_s={len(ds) / dt:.0f}")
