"""Issue 15: tunekit's quantised GGUF tensors (candle's ggml quantisers) against llama.cpp's own
reference quantisers as its `gguf` Python package implements them. For each tensor of QUANT.gguf
in Q8_0 or Q5_0, gguf-py quantises the same tensor of F32.gguf (the f32 export of the same merge)
and the bytes are compared; for the K-quants (Q4_K, Q6_K), which gguf-py only dequantises, the
relative RMS error of the dequantised tensor against f32 is reported.

  python benches/gguf_quant_check.py merged-f32.gguf merged-q4_k_m.gguf
"""
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

f32 = {t.name: t for t in GGUFReader(sys.argv[1]).tensors}
same, differ, kq = 0, 0, []
for t in GGUFReader(sys.argv[2]).tensors:
    src = np.asarray(f32[t.name].data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
    if t.tensor_type in (T.Q8_0, T.Q5_0):
        ref = quantize(src, t.tensor_type)
        if np.array_equal(np.asarray(t.data).reshape(-1).view(np.uint8), ref.reshape(-1).view(np.uint8)):
            same += 1
        else:
            differ += 1
            print(f"{t.name} {t.tensor_type.name}: bytes differ from gguf-py's quantiser")
    elif t.tensor_type in (T.Q4_K, T.Q6_K):
        deq = dequantize(np.asarray(t.data), t.tensor_type).reshape(src.shape)
        kq.append((t.tensor_type.name, float(np.sqrt(np.mean((deq - src) ** 2)) / np.sqrt(np.mean(src**2)))))
print(f"Q8_0/Q5_0 tensors byte-identical to llama.cpp's reference quantiser: {same}, differing: {differ}")
for name in sorted({k for k, _ in kq}):
    errs = [e for k, e in kq if k == name]
    print(f"{name}: {len(errs)} tensors, relative RMS error mean {np.mean(errs):.4f}, max {np.max(errs):.4f}")
