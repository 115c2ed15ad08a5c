"""DPO step on CPU: TRL DPOTrainer + PEFT, and the same pairs for tunekit (issue 8).

Config: the trainer issue's tiny Llama (hidden 256, 4 layers, 4 heads, intermediate 688, vocab 32,000),
LoRA r=8 alpha 16 on all seven projections, AdamW, beta 0.1, sigmoid loss, 4 pairs per step; each pair
a 128-token prompt and two 128-token answers (+ EOS, which TRL appends), the reference being the base
with the adapter disabled on both sides.

  python benches/anchor_dpo.py OUT_DIR STEPS   # writes OUT_DIR/model, OUT_DIR/pairs, times TRL
"""
import json, os, sys, time
import torch
import pyarrow as pa, pyarrow.parquet as pq
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from tiny_llama import save_model, word_tokenizer
from trl import DPOConfig, DPOTrainer

out, steps = sys.argv[1], int(sys.argv[2])
vocab, per_step, plen, alen = 32000, 4, 128, 128
torch.set_num_threads(int(os.environ.get("THREADS", 2)))
model = save_model(out)

tok, tokenizer = word_tokenizer()
g = torch.Generator().manual_seed(1)
n_pairs = per_step * (steps + 2)
rows, text = [], []
for _ in range(n_pairs):
    p, c, r = (torch.randint(3, vocab, (n,), generator=g).tolist() for n in (plen, alen, alen))
    rows.append((p, c + [2], r + [2]))
    w = lambda ids: " ".join(f"t{i}" for i in ids)
    text.append({"prompt": w(p), "chosen": " " + w(c), "rejected": " " + w(r)})
d = os.path.join(out, "pairs"); os.makedirs(d, exist_ok=True)
lab = lambda p, a: [-100] * len(p) + a
table = pa.table({
    "chosen_input_ids": [p + c for p, c, _ in rows], "chosen_labels": [lab(p, c) for p, c, _ in rows],
    "rejected_input_ids": [p + r for p, _, r in rows], "rejected_labels": [lab(p, r) for p, _, r in rows]},
    schema=pa.schema([(k, pa.list_(pa.int32())) for k in
                      ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]]))
pq.write_table(table, os.path.join(d, "train-00000-of-00001.parquet"))
json.dump({"tokenizer": {"vocab_size": vocab, "path": "random"}}, open(os.path.join(d, "manifest.json"), "w"))


class Clock(TrainerCallback):
    def __init__(self):
        self.t, self.times = None, []
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.time()
    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.time() - self.t)


clock = Clock()
args = DPOConfig(output_dir=os.path.join(out, "trl"), report_to=[], use_cpu=True, beta=0.1, loss_type=["sigmoid"],
                 per_device_train_batch_size=per_step, max_steps=steps + 2, learning_rate=2e-4, logging_steps=10**9,
                 save_strategy="no", max_length=None, dataloader_drop_last=True, disable_tqdm=True)
trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(text), processing_class=tokenizer,
                     peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]),
                     callbacks=[clock])
batch = next(iter(trainer.get_train_dataloader()))
assert batch["input_ids"].shape == (2 * per_step, plen + alen + 1), batch["input_ids"].shape
trainer.train()
t = sorted(clock.times[2:])  # warm-up
step = t[len(t) // 2]
print(f"trl steps={len(t)} median_step_s={step:.4f} pairs_per_s={per_step / step:.2f}")
