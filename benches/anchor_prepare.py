"""The anchor for `tunekit prepare`: transformers apply_chat_template + datasets.map(num_proc=2)
+ TRL pack_dataset(strategy="bfd") + to_parquet, with assistant-only labels."""
import gzip, os, shutil, sys, tempfile, time
from datasets import load_dataset, disable_caching
from transformers import AutoTokenizer
from trl.data_utils import pack_dataset

disable_caching()
path, tok_dir, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = tempfile.mkdtemp()
with gzip.open(os.path.join(tok_dir, "tokenizer.json.gz")) as f:
    open(os.path.join(d, "tokenizer.json"), "wb").write(f.read())
shutil.copy(os.path.join(tok_dir, "tokenizer_config.json"), d)
tok = AutoTokenizer.from_pretrained(d)

t = time.time()
ds = load_dataset("json", data_files=path, split="train")

def tokenize(r):
    user = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
    prompt = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True)
    ids = tok.apply_chat_template(msgs, tokenize=True)
    if not isinstance(ids, list):
        ids, prompt = ids["input_ids"], prompt["input_ids"]
    labels = [-100] * len(prompt) + ids[len(prompt):]
    return {"input_ids": ids, "labels": labels}

ds = ds.map(tokenize, num_proc=2, remove_columns=ds.column_names)
ds = ds.filter(lambda r: len(r["input_ids"]) <= seq_len)
packed = pack_dataset(ds, seq_length=seq_len, strategy="bfd")
packed.to_parquet("/tmp/anchor_prepare.parquet")
dt = time.time() - t
tokens = sum(len(x) for x in packed["input_ids"])
print(f"rows={len(ds)} packed_rows={len(packed)} seconds={dt:.2f} rows_per_s={len(ds) / dt:.0f} fill={tokens / (len(packed) * seq_len):.4f}")
