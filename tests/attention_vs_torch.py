"""Reference attention for tests/attention.rs: PyTorch in f32 with autograd. Reads q [T, hq, d], k and v
[T, hkv, d], dy [T, hq, d] (raw little-endian f32) and a JSON case (segment lengths, scale, window,
softcap, sinks); writes y, dq, dk, dv (raw f32, same layouts). Plain causal attention (and windows) go
through torch's scaled_dot_product_attention (its CPU flash kernel, grouped-query heads as enable_gqa);
soft-capped scores and sinks through transformers' eager formula (Gemma 2's tanh cap, gpt-oss's sink
column dropped after the softmax)."""
import json, sys
import torch
import torch.nn.functional as F

d_in, d_out = sys.argv[1], sys.argv[2]
case = json.load(open(f"{d_in}/case.json"))
hq, hkv, d, T = case["hq"], case["hkv"], case["d"], sum(case["lengths"])
def load(name, h):
    return torch.frombuffer(bytearray(open(f"{d_in}/{name}", "rb").read()), dtype=torch.float32).reshape(T, h, d)
q, k, v = (load("q", hq).requires_grad_(), load("k", hkv).requires_grad_(), load("v", hkv).requires_grad_())
dy = load("dy", hq)
outs, start = [], 0
for L in case["lengths"]:
    qs, ks, vs = (x[start:start + L].transpose(0, 1) for x in (q, k, v))  # [h, L, d]
    i = torch.arange(L)
    allowed = i[None, :] <= i[:, None]
    if case["window"]:
        allowed &= (i[:, None] - i[None, :]) < case["window"]
    if case["softcap"] is None and case["sinks"] is None:
        o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=allowed if case["window"] else None,
                                           is_causal=not case["window"], scale=case["scale"], enable_gqa=True)[0]
    else:
        g = hq // hkv
        kr, vr = ks.repeat_interleave(g, 0), vs.repeat_interleave(g, 0)
        s = qs @ kr.transpose(1, 2) * case["scale"]
        if case["softcap"] is not None:
            s = torch.tanh(s / case["softcap"]) * case["softcap"]
        s = s.masked_fill(~allowed, float("-inf"))
        if case["sinks"] is not None:
            sink = torch.tensor(case["sinks"]).reshape(hq, 1, 1).expand(hq, L, 1)
            p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :L]
        else:
            p = torch.softmax(s, -1)
        o = p @ vr
    outs.append(o.transpose(0, 1))
    start += L
y = torch.cat(outs, 0)
y.backward(dy)
for name, t in [("y", y), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)]:
    open(f"{d_out}/{name}", "wb").write(t.detach().contiguous().numpy().tobytes())
