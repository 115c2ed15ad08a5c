"""GRPO step on CPU: TRL GRPOTrainer + PEFT, and the same model and prompts for tunekit (issue 14).

Config: hidden 256, 4 layers, 4 heads, intermediate 688, vocabulary 32,000 (random Llama), LoRA r=8
alpha 16 on all linear layers, 2 prompts x 4 generations of up to 64 tokens per step (temperature 1,
a random model never stops early, so every completion is 64 tokens), beta 0.04 (a reference pass with
the adapter disabled), loss dapo, one iteration per rollout; a rule reward (words / 64), computed the
same way on both sides. Prompts are 32 random words of a word-level tokenizer ("t3".."t31999" -> ids),
plain text, so TRL's tokenisation and tunekit's give the same ids.

  python benches/anchor_grpo.py OUT_DIR STEPS   # writes OUT_DIR/{model,tokenizer,prompts.jsonl,prompt.jinja}, times TRL

Prints the median seconds of an optimizer step after two warm-up steps, and the generation's tokens/s
(TRL's `_generate` timed). Gradient checkpointing off (TRL's GRPO default is on; tunekit's GRPO does
not checkpoint). BF16=1 runs TRL with its default bf16 autocast (slower on this CPU).
"""
import json, os, sys, time
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from tiny_llama import save_model, word_tokenizer
from trl import GRPOConfig, GRPOTrainer

out, steps = sys.argv[1], int(sys.argv[2])
vocab, prompts_per_step, gens, plen, max_new = 32000, 2, 4, 32, 64
torch.set_num_threads(int(os.environ.get("THREADS", 2)))
model = save_model(out)

tok, tokenizer = word_tokenizer()
os.makedirs(os.path.join(out, "tokenizer"), exist_ok=True)
tok.save(os.path.join(out, "tokenizer", "tokenizer.json"))
json.dump({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
          open(os.path.join(out, "tokenizer", "tokenizer_config.json"), "w"))
# tunekit renders the prompt as the plain text TRL tokenises.
open(os.path.join(out, "prompt.jinja"), "w").write("{{ messages[-1]['content'] }}")
g = torch.Generator().manual_seed(1)
n_prompts = prompts_per_step * (steps + 2)
prompts = [" ".join(f"t{int(i)}" for i in torch.randint(3, vocab, (plen,), generator=g)) for _ in range(n_prompts)]
with open(os.path.join(out, "prompts.jsonl"), "w") as f:
    for p in prompts:
        f.write(json.dumps({"prompt": p}) + "\n")


def words_reward(completions, **kw):
    return [len(c.split()) / 64 for c in completions]


times, gen = [], [0.0, 0]


class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.t)


args = GRPOConfig(output_dir=os.path.join(out, "trl"), report_to=[], use_cpu=True, bf16=os.environ.get("BF16") == "1",
                  per_device_train_batch_size=prompts_per_step * gens, num_generations=gens,
                  max_completion_length=max_new, temperature=1.0, beta=0.04, loss_type="dapo", learning_rate=1e-4,
                  max_steps=steps, logging_steps=1000, save_strategy="no", seed=0, shuffle_dataset=False,
                  # TRL's GRPO default is True; recomputing the activations only costs time at this size.
                  gradient_checkpointing=False)
trainer = GRPOTrainer(model=model, reward_funcs=words_reward, args=args,
                      train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer,
                      peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"),
                      callbacks=[Clock()])
inner = trainer._generate


def timed_generate(*a, **kw):
    t = time.perf_counter()
    res = inner(*a, **kw)
    gen[0] += time.perf_counter() - t
    gen[1] += sum(len(c) for c in res[1])  # completion_ids
    return res


trainer._generate = timed_generate
trainer.train()
step = sorted(times[2:])[len(times[2:]) // 2]
print(f"trl steps={len(times)} median_step_s={step:.3f} steps_per_s={1 / step:.3f} "
      f"gen_tokens_per_s={gen[1] / gen[0]:.0f}")
