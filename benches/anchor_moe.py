"""Mixture-of-experts LoRA step on CPU: transformers + PEFT on a Qwen3-MoE (8 experts, top 2) and on the
dense Qwen3 of the same active parameters (its MLP as wide as two experts), and the data for tunekit.

  python benches/anchor_moe.py OUT_DIR STEPS    # writes OUT_DIR/{moe,dense}, OUT_DIR/shards, times PEFT

Shapes: hidden 256, 4 layers, 4 heads of 64, vocab 32,000, seq 512; experts of width 344 (dense MLP 688).
LoRA r=8 on q/k/v/o and, for the MoE, on the experts through PEFT's target_parameters
(mlp.experts.gate_up_proj, mlp.experts.down_proj); for the dense model on gate/up/down. AdamW, batch 1.
The MoE is timed with each of transformers' experts implementations (eager, batched_mm, grouped_mm);
the fastest is the anchor.
"""
import json, os, sys, time
import torch
import pyarrow as pa, pyarrow.parquet as pq
from transformers import AutoConfig, AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

out, steps = sys.argv[1], int(sys.argv[2])
hidden, layers, heads, vocab, seq, expert = 256, 4, 4, 32000, 512, 344
torch.set_num_threads(int(os.environ.get("THREADS", 2)))
common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
              head_dim=64, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False)
configs = {
    "moe": AutoConfig.for_model("qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=expert,
                                intermediate_size=2 * expert, norm_topk_prob=True, **common),
    "dense": AutoConfig.for_model("qwen3", intermediate_size=2 * expert, **common),
}
for name, cfg in configs.items():
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(os.path.join(out, name), safe_serialization=True)

g = torch.Generator().manual_seed(1)
rows = []
for _ in range(steps + 2):
    ids = torch.randint(0, vocab, (seq,), generator=g)
    labels = ids.clone(); labels[: seq // 2] = -100
    rows.append((ids, labels))
sh = os.path.join(out, "shards"); os.makedirs(sh, exist_ok=True)
table = pa.table({
    "input_ids": [r[0].tolist() for r in rows], "labels": [r[1].tolist() for r in rows],
    "position_ids": [list(range(seq)) for _ in rows], "seq_lengths": [[seq] for _ in rows]},
    schema=pa.schema([(c, pa.list_(pa.int32())) for c in ["input_ids", "labels", "position_ids", "seq_lengths"]]))
pq.write_table(table, os.path.join(sh, "train-00000-of-00001.parquet"))
json.dump({"tokenizer": {"vocab_size": vocab, "path": "random"}, "seq_len": seq}, open(os.path.join(sh, "manifest.json"), "w"))

def time_peft(name, impl=None):
    kw = {"experts_implementation": impl} if impl else {}
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, name), dtype=torch.float32, **kw)
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if name == "moe":
        lc = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=attn,
                        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    else:
        lc = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=attn + ["gate_proj", "up_proj", "down_proj"])
    m = get_peft_model(model, lc)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    times = []
    for ids, labels in rows[: steps + 2]:
        t = time.time()
        loss = m(input_ids=ids[None], labels=labels[None]).loss
        loss.backward(); opt.step(); opt.zero_grad()
        loss = loss.item()
        times.append(time.time() - t)
    times = sorted(times[2:])
    step = times[len(times) // 2]
    label = f"{name}/{impl}" if impl else name
    print(f"peft {label} steps={len(times)} median_step_s={step:.4f} tokens_per_s={seq / step:.0f} loss={loss:.4f}", flush=True)

for impl in os.environ.get("IMPLS", "eager,batched_mm,grouped_mm").split(","):
    try:
        time_peft("moe", impl)
    except Exception as e:  # an implementation this torch/CPU lacks
        print(f"peft moe/{impl} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
time_peft("dense")
