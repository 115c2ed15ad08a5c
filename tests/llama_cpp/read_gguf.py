"""A GGUF file as the `gguf` package (llama.cpp's own Python reader, PyPI) reads it, as JSON on stdout:
every metadata key with its GGUF type and value (arrays: element type and length), and every tensor's
name, shape (ggml order: innermost first) and type. Used by tests/gguf_export.rs.

  python tests/llama_cpp/read_gguf.py FILE.gguf
"""
import json
import sys

from gguf import GGUFReader, GGUFValueType

r = GGUFReader(sys.argv[1])
metadata = {}
for name, field in r.fields.items():
    if name.startswith("GGUF."):
        continue
    t = GGUFValueType(field.types[0])
    if t == GGUFValueType.ARRAY:
        metadata[name] = {"type": "ARRAY", "element": GGUFValueType(field.types[1]).name, "len": len(field.data)}
    else:
        metadata[name] = {"type": t.name, "value": field.contents()}
tensors = [{"name": t.name, "shape": [int(d) for d in t.shape], "type": t.tensor_type.name} for t in r.tensors]
print(json.dumps({"metadata": metadata, "tensors": tensors}))
