"""LoRA training step on CPU: PyTorch + transformers + PEFT, and the same data for tunekit.

Config (issue 6): Llama, hidden 256, 4 layers, 4 heads, intermediate 688, vocab 32,000, seq 512,
LoRA r=8 on all seven projections, AdamW, batch 1. Rows are 512 tokens whose first half is a
prompt (labels -100) and second half trained, like SFT data.

  python benches/anchor_train.py OUT_DIR STEPS   # writes OUT_DIR/model, OUT_DIR/shards, times PEFT

On a GPU (benches/gpu_bench.sh): DEVICE=cuda DTYPE=bf16 trains the bf16 model with PEFT's f32
adapters; QLORA=nf4 loads the base through bitsandbytes (NF4, double quantisation, bf16 compute).
FULL=1: full fine-tuning instead (every weight, torch's fused AdamW: its fastest CPU AdamW;
OPTIM=adamw_8bit: bitsandbytes' AdamW8bit; CHECKPOINTING=1: transformers' gradient checkpointing);
benches/full_bench.sh.
"""
import json, os, sys, time
import torch
import pyarrow as pa, pyarrow.parquet as pq
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

out, steps = sys.argv[1], int(sys.argv[2])
hidden = int(os.environ.get("HIDDEN", 256)); layers = int(os.environ.get("LAYERS", 4))
heads = int(os.environ.get("HEADS", 4)); kv = int(os.environ.get("KV_HEADS", heads))
inter = int(os.environ.get("INTER", 688)); vocab = int(os.environ.get("VOCAB", 32000))
seq = int(os.environ.get("SEQ", 512)); tie = os.environ.get("TIE", "0") == "1"
torch.manual_seed(0)
torch.set_num_threads(int(os.environ.get("THREADS", 2)))
cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=max(2048, seq), tie_word_embeddings=tie)
model = LlamaForCausalLM(cfg).float()
os.makedirs(out, exist_ok=True)
model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
device = os.environ.get("DEVICE", "cpu")
dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[os.environ.get("DTYPE", "f32")]
qlora = os.environ.get("QLORA", "none")
if qlora == "nf4":
    from transformers import BitsAndBytesConfig
    del model
    model = LlamaForCausalLM.from_pretrained(os.path.join(out, "model"), device_map={"": 0}, dtype=dtype,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
else:
    model = model.to(device=device, dtype=dtype)

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

full = os.environ.get("FULL", "0") == "1"
if full:
    peft_model = model
    if os.environ.get("CHECKPOINTING", "0") == "1":
        model.gradient_checkpointing_enable()
    if os.environ.get("OPTIM", "adamw") == "adamw_8bit":
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(model.parameters(), lr=2e-5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
else:
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-4)
peft_model.train()
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
times = []
for i, (ids, labels) in enumerate(rows[:steps + 2]):
    sync(); t = time.time()
    loss = peft_model(input_ids=ids[None].to(device), labels=labels[None].to(device)).loss
    loss.backward(); opt.step(); opt.zero_grad()
    loss = loss.item()  # waits for the step, as tunekit's per-step loss does
    times.append(time.time() - t)
times = times[2:]  # warm-up
step = sorted(times)[len(times) // 2]
mem = f" max_allocated_mb={torch.cuda.max_memory_allocated() / 2**20:.0f}" if device == "cuda" else ""
print(f"{'torch-full' if full else 'peft'} steps={len(times)} median_step_s={step:.4f} tokens_per_s={seq / step:.0f} loss={loss:.4f}{mem}")
