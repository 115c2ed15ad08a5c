"""Long conversations, one per step: the Llama-shaped model of benches/long_bench.sh, and the PyTorch +
transformers + PEFT side of its comparison on the same token ids.

  python benches/anchor_long.py conversations OUT.jsonl TOKENS   # two conversations of about TOKENS tokens
                                                                # each, from real Wikipedia text (wiki_demo.txt)
  python benches/anchor_long.py model OUT_DIR                    # the random model (seed 0, f32)
  python benches/anchor_long.py peft MODEL_DIR SHARDS_DIR        # LoRA r=8 on all seven projections, AdamW,
                                                                # gradient checkpointing, sdpa attention, one
                                                                # row per step; prints each step's seconds

Model: hidden 512, 4 layers, 8 heads (head width 64, no grouping), intermediate 1,376, the SmolLM2
vocabulary (49,152; its tokenizer prepares the data), positions up to 40,960.
"""
import glob, os, sys, time

CHARS_PER_TOKEN = 5.0  # wiki_demo.txt under SmolLM2's tokenizer, measured


def conversations(out, tokens):
    import json
    src = os.path.join(os.environ["TUNEKIT_ASSETS"], "llamafactory-0.9.5", "data", "wiki_demo.txt")
    text = " ".join(l.strip() for l in open(src, encoding="utf-8") if l.strip())
    n = int(tokens * CHARS_PER_TOKEN)
    with open(out, "w") as f:
        for i in range(2):
            body = text[i * n:(i + 1) * n]
            cut = int(len(body) * 0.75)
            msgs = [{"role": "user", "content": "Continue this article.\n\n" + body[:cut]},
                    {"role": "assistant", "content": body[cut:]}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def model(out):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=49152, max_position_embeddings=40960, eos_token_id=2,
                      bos_token_id=1)
    LlamaForCausalLM(cfg).float().save_pretrained(out, safe_serialization=True)


def peft(model_dir, shards):
    import torch
    import pyarrow.parquet as pq
    from transformers import LlamaForCausalLM
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(int(os.environ.get("THREADS", 2)))
    rows = []
    for path in sorted(glob.glob(os.path.join(shards, "train-*.parquet"))):
        t = pq.read_table(path, columns=["input_ids", "labels"]).to_pylist()
        rows += [(torch.tensor(r["input_ids"]), torch.tensor(r["labels"])) for r in t]
    m = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    m.gradient_checkpointing_enable()
    m.enable_input_require_grads()
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-4)
    pm.train()
    for i, (ids, labels) in enumerate(rows):
        t = time.time()
        loss = pm(input_ids=ids[None], labels=labels[None]).loss
        loss.backward(); opt.step(); opt.zero_grad()
        loss = loss.item()
        s = time.time() - t
        print(f"peft step={i + 1} tokens={len(ids)} seconds={s:.2f} tokens_per_s={len(ids) / s:.0f} loss={loss:.4f}",
              flush=True)


if __name__ == "__main__":
    {"conversations": lambda a: conversations(a[0], int(a[1])), "model": lambda a: model(a[0]),
     "peft": lambda a: peft(a[0], a[1])}[sys.argv[1]](sys.argv[2:])
