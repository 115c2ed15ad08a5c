"""The trainer issues' tiny random Llama and its word-level tokenizer, shared by the TRL anchors
(anchor_dpo.py, anchor_grpo.py): hidden 256, 4 layers, 4 heads, inter 688, vocabulary 32,000, saved by
transformers; tokens "t3".."t31999" map to their ids (0-2 are <pad>, <unk>, </s>), so TRL's text
pipeline yields exactly the ids tunekit is given.
"""
import os
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 32000


def save_model(out):
    """The random model (seed 0, f32), saved to OUT/model; returned."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=2048, eos_token_id=2)
    model = LlamaForCausalLM(cfg).float()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    return model


def word_tokenizer():
    """(the tokenizers object, its transformers wrapper). Special tokens get names that cannot occur
    inside a word: special tokens are split out of the text first."""
    words = {f"t{i}": i for i in range(VOCAB)}
    words.update({"<pad>": 0, "<unk>": 1, "</s>": 2})
    for i in range(3):
        del words[f"t{i}"]
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok, PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
