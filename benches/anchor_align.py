"""KTO, ORPO and RLOO steps on CPU: TRL's KTOTrainer, ORPOTrainer and RLOOTrainer + PEFT, and the same
model and data for tunekit (issue 36).

Config (the trainer issues' tiny random Llama of tiny_llama.py: hidden 256, 4 layers, vocabulary 32,000),
LoRA r=8 alpha 16 on all seven projections, AdamW, f32 (TRL's fastest here; its bf16 autocast is slower on
this CPU), gradient checkpointing off on both sides (TRL's KTO default is on; it only costs time here):
- kto: 4 rows per step (TRL's per_device_train_batch_size 4: the KL reference point from the same 4), each
  a 128-token prompt and a 128-token answer (+ EOS, which TRL appends), labels alternating; beta 0.1; the
  reference the base with the adapter off.
- orpo: 4 pairs per step, 128-token prompt, two 128-token answers (+ EOS); beta 0.1; no reference.
- rloo: 2 prompts x 4 generations of up to 64 tokens (a random model never stops early), beta 0.05 (TRL's
  default, a reference pass), one iteration per rollout; the rule reward words / 64 on both sides.

  python benches/anchor_align.py kto|orpo|rloo OUT_DIR STEPS   # writes OUT_DIR/{model,data...}, times TRL

Prints the median seconds of an optimizer step after two warm-up steps.
"""
import json, os, sys, time
import torch
import pyarrow as pa, pyarrow.parquet as pq
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from tiny_llama import save_model, word_tokenizer

method, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
vocab, per_step, plen, alen = 32000, 4, 128, 128
torch.set_num_threads(int(os.environ.get("THREADS", 2)))
model = save_model(out)
tok, tokenizer = word_tokenizer()
g = torch.Generator().manual_seed(1)
w = lambda ids: " ".join(f"t{i}" for i in ids)
rand = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
common = dict(output_dir=os.path.join(out, "trl"), report_to=[], use_cpu=True, bf16=False, learning_rate=2e-4,
              logging_steps=10**9, save_strategy="no", disable_tqdm=True, gradient_checkpointing=False)
data = os.path.join(out, "data")
os.makedirs(data, exist_ok=True)
json.dump({"tokenizer": {"vocab_size": vocab, "path": "random"}}, open(os.path.join(data, "manifest.json"), "w"))
ints = lambda: pa.list_(pa.int32())
times = []


class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.t)


if method == "kto":
    from trl import KTOConfig, KTOTrainer
    rows = [(rand(plen), rand(alen) + [2], k % 2 == 0) for k in range(per_step * (steps + 2))]
    pq.write_table(pa.table({"input_ids": [p + a for p, a, _ in rows],
                             "labels": [[-100] * len(p) + a for p, a, _ in rows],
                             "label": [l for _, _, l in rows]},
                            schema=pa.schema([("input_ids", ints()), ("labels", ints()), ("label", pa.bool_())])),
                   os.path.join(data, "train-00000-of-00001.parquet"))
    text = [{"prompt": w(p), "completion": " " + w(a[:-1]), "label": l} for p, a, l in rows]
    args = KTOConfig(per_device_train_batch_size=per_step, max_steps=steps + 2, beta=0.1, max_length=None, **common)
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(text), processing_class=tokenizer,
                         peft_config=lora, callbacks=[Clock()])
    assert next(iter(trainer.get_train_dataloader()))["input_ids"].shape == (per_step, plen + alen + 1)
elif method == "orpo":
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    rows = [(rand(plen), rand(alen) + [2], rand(alen) + [2]) for _ in range(per_step * (steps + 2))]
    lab = lambda p, a: [-100] * len(p) + a
    cols = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
    pq.write_table(pa.table({"chosen_input_ids": [p + c for p, c, _ in rows], "chosen_labels": [lab(p, c) for p, c, _ in rows],
                             "rejected_input_ids": [p + r for p, _, r in rows], "rejected_labels": [lab(p, r) for p, _, r in rows]},
                            schema=pa.schema([(k, ints()) for k in cols])),
                   os.path.join(data, "train-00000-of-00001.parquet"))
    text = [{"prompt": w(p), "chosen": " " + w(c[:-1]), "rejected": " " + w(r[:-1])} for p, c, r in rows]
    args = ORPOConfig(per_device_train_batch_size=per_step, max_steps=steps + 2, beta=0.1, max_length=1024,
                      **common)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(text), processing_class=tokenizer,
                          peft_config=lora, callbacks=[Clock()])
elif method == "rloo":
    from trl import RLOOConfig, RLOOTrainer
    prompts_per_step, gens, max_new = 2, 4, 64
    os.makedirs(os.path.join(out, "tokenizer"), exist_ok=True)
    tok.save(os.path.join(out, "tokenizer", "tokenizer.json"))
    json.dump({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
              open(os.path.join(out, "tokenizer", "tokenizer_config.json"), "w"))
    open(os.path.join(out, "prompt.jinja"), "w").write("{{ messages[-1]['content'] }}")
    prompts = [w(rand(32)) for _ in range(prompts_per_step * (steps + 2))]
    with open(os.path.join(out, "prompts.jsonl"), "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    words_reward = lambda completions, **kw: [len(c.split()) / 64 for c in completions]
    args = RLOOConfig(per_device_train_batch_size=prompts_per_step * gens, num_generations=gens,
                      max_completion_length=max_new, temperature=1.0, beta=0.05, max_steps=steps + 2, seed=0,
                      shuffle_dataset=False, **common)
    trainer = RLOOTrainer(model=model, reward_funcs=words_reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer,
                          peft_config=lora, callbacks=[Clock()])
else:
    sys.exit(f"unknown method {method}")
trainer.train()
t = sorted(times[2:])
step = t[len(t) // 2]
print(f"trl {method} steps={len(times)} median_step_s={step:.4f}")
