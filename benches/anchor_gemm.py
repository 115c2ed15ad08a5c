"""PyTorch's f32 GEMM (MKL / oneDNN on x86) at SmolLM2's training shapes, 2 threads: the anchor's side of
`cargo bench --bench kernels` ("GEMM (candle) at training shapes", "Frozen forward"), for telling whether a
speed ratio moved because of the products or of what lies between them. Run: `python benches/anchor_gemm.py`
with the PyTorch the train bench uses (its THREADS as there, 2 by default).
"""
import os
import time

import torch

torch.set_num_threads(int(os.environ.get("THREADS", 2)))


def gflops(m, k, n, reps=20):
    """Median GFLOP/s of x W^T for x [m, k] and W [n, k] (W stored as the weight is)."""
    a, b = torch.randn(m, k), torch.randn(n, k)
    for _ in range(3):
        a @ b.t()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b.t()
        times.append(time.perf_counter() - t)
    times.sort()
    return 2 * m * k * n / times[len(times) // 2] / 1e9


for m, k, n, what in [(512, 576, 49152, "SmolLM2 head"), (512, 576, 1536, "gate, up"), (512, 576, 576, "q, o"),
                      (512, 576, 192, "k, v"), (512, 1536, 576, "down")]:
    print(f"  torch {what:14} {m}x{k} . {k}x{n}: {gflops(m, k, n):.0f} GFLOP/s")
