//! Layer pieces with a hand-written backward, PyTorch's `autograd.Function` in candle: each forward
//! runs on detached inputs (no graph), then the value is attached to the graph as the output of an
//! op over the piece's inputs only (`Tensor::with_backward*`, a patch of the vendored candle-core).
//! The graph then keeps a piece's inputs and output, never its temporaries: no attention
//! probabilities (recomputed in the backward, as flash attention does), no LoRA products, no f32
//! copies, no rope or norm intermediates. Candle otherwise keeps every op's inputs alive until the
//! backward ends, which is most of a training step's memory.

use super::ops::{segment_attention, segment_heads, CausalAttentionProbs, CausalSoftmaxGrad, MaskCache};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use std::sync::Arc;

thread_local! {
    static NO_GRAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` without recording a graph (evaluation, generation): the adapters are the only variables
/// and enter detached, so nothing downstream is recorded either. Without it an eval pass would keep
/// every activation as training does, and generation would keep the graph of every past token through
/// its KV cache.
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    let before = NO_GRAD.with(|g| g.replace(true));
    let out = f();
    NO_GRAD.with(|g| g.set(before));
    out
}

/// The frozen base of a linear layer: its op (forward `x W^T`, backward the input gradient only).
pub type BaseOp = Arc<Box<dyn CustomOp1 + Send + Sync>>;

fn attached_only<T>(name: &str) -> candle_core::Result<T> {
    candle_core::bail!("{name}: computed outside the graph and attached; its forward is not run as an op")
}

/// The `cpu_fwd` a CustomOp of `n` inputs must have; never called for an attached op.
macro_rules! attached_forward {
    (1) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            attached_only(self.name())
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            attached_only(self.name())
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            attached_only(self.name())
        }
    };
}

/// `y = base(x) + s * (mask ⊙ x) A^T B^T` over (x, A, B); `u = (mask ⊙ x) A^T` [T, r] is kept.
struct LoraLinearFn {
    base: BaseOp,
    scale: f64,
    mask: Option<Tensor>,
    u: Tensor,
}

impl CustomOp3 for LoraLinearFn {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    attached_forward!(3);

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Inputs are graph nodes: detached, so that no gradient carries the forward graph along.
        let (x, a, b) = (&x.detach(), a.detach(), b.detach());
        let dx_base = self.base.bwd(x, y, dy)?.expect("a base op gives the input gradient");
        let dy32 = dy.to_dtype(DType::F32)?;
        let du = dy32.matmul(&(b * self.scale)?)?; // [T, r]
        let db = (dy32.t()?.matmul(&self.u)? * self.scale)?; // [out, r]
        let mut xin = x.to_dtype(DType::F32)?;
        if let Some(m) = &self.mask {
            xin = (xin * m)?;
        }
        let da = du.t()?.matmul(&xin)?; // [r, in]
        let mut dx = du.matmul(&a)?; // [T, in]
        if let Some(m) = &self.mask {
            dx = (dx * m)?;
        }
        Ok((Some((dx_base + dx.to_dtype(x.dtype())?)?), Some(da), Some(db)))
    }
}

/// A LoRA linear layer as one graph node over (x, A, B). `x32` is x in f32 (shared by the
/// projections that read the same input), `mask` the inverted-dropout mask of the adapter's input.
pub fn lora_linear(
    x: &Tensor,
    x32: &Tensor,
    base: BaseOp,
    bias: Option<&Tensor>,
    (a, b, scale): (&Tensor, &Tensor, f64),
    mask: Option<Tensor>,
) -> candle_core::Result<Tensor> {
    let xd = x.detach().contiguous()?;
    let mut y = xd.apply_op1_arc(base.clone())?;
    if let Some(bias) = bias {
        y = y.broadcast_add(bias)?;
    }
    let xin = match &mask {
        Some(m) => (x32.detach() * m)?,
        None => x32.detach(),
    };
    let u = xin.matmul(&a.detach().t()?)?;
    // The scale goes on B^T [r, out], not on the [tokens, out] product.
    let delta = u.matmul(&(b.detach().t()? * scale)?)?;
    let y = (y + delta.to_dtype(x.dtype())?)?;
    if NO_GRAD.with(|g| g.get()) {
        return Ok(y);
    }
    Ok(y.with_backward3(x, a, b, LoraLinearFn { base, scale, mask, u }))
}

/// `silu(g) * u` over (g, u).
struct SwiGluFn;

impl CustomOp2 for SwiGluFn {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    attached_forward!(2);

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dt = g.dtype();
        let (g, u) = (g.detach(), u.detach());
        let (g, u, dy) = (g.to_dtype(DType::F32)?, u.to_dtype(DType::F32)?, dy.to_dtype(DType::F32)?);
        let s = (g.neg()?.exp()? + 1.0)?.recip()?; // sigmoid
        let du = (&dy * (&g * &s)?)?;
        // d silu / dg = s * (1 + g * (1 - s))
        let dsilu = (&s * ((&g * (1.0 - &s)?)? + 1.0)?)?;
        let dg = ((dy * u)? * dsilu)?;
        Ok((Some(dg.to_dtype(dt)?), Some(du.to_dtype(dt)?)))
    }
}

/// The gated MLP's activation, `silu(g) * u`, keeping only g and u.
pub fn swiglu(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    let y = (g.detach().silu()? * u.detach())?;
    Ok(y.with_backward2(g, u, SwiGluFn))
}

/// Rotary embedding over x [T, heads, hd] with cos/sin [T, hd] gathered by position.
struct RopeFn {
    cos: Tensor,
    sin: Tensor,
}

impl CustomOp1 for RopeFn {
    fn name(&self) -> &'static str {
        "rope"
    }

    attached_forward!(1);

    /// y = x cos + rot(x) sin with rot([x1, x2]) = [-x2, x1], so dx = dy cos + [z2, -z1], z = dy sin.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let hd = dy.dim(D::Minus1)?;
        let (cos, sin) = (self.cos.unsqueeze(1)?, self.sin.unsqueeze(1)?);
        let z = dy.broadcast_mul(&sin)?;
        let back =
            Tensor::cat(&[&z.narrow(D::Minus1, hd / 2, hd / 2)?, &z.narrow(D::Minus1, 0, hd / 2)?.neg()?], D::Minus1)?;
        Ok(Some((dy.broadcast_mul(&cos)? + back)?))
    }
}

pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let y = super::ops::rope(&x.detach(), cos, sin)?;
    Ok(y.with_backward1(x, RopeFn { cos: cos.clone(), sin: sin.clone() }))
}

/// Causal attention per packed segment over (q, k, v). The probabilities of each segment are
/// either kept (`probs`) or recomputed in the backward, as flash attention does: one more q·kᵀ per
/// layer for [heads, L, L] less memory per layer.
struct AttentionFn {
    seq_lengths: Vec<usize>,
    scale: f32,
    probs: Vec<Tensor>,
}

impl CustomOp3 for AttentionFn {
    fn name(&self) -> &'static str {
        "attention"
    }

    attached_forward!(3);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (_, hq, hd) = q.dims3()?;
        let hkv = k.dim(1)?;
        let n = hq / hkv;
        let (mut dqs, mut dks, mut dvs) = (vec![], vec![], vec![]);
        let mut start = 0;
        for (i, &len) in self.seq_lengths.iter().enumerate() {
            let qs = segment_heads(&q, start, len, 1)?;
            let ks = segment_heads(&k, start, len, n)?;
            let vs = segment_heads(&v, start, len, n)?;
            let p = match self.probs.get(i) {
                Some(p) => p.clone(),
                None => qs.apply_op2_no_bwd(&ks, &CausalAttentionProbs { scale: self.scale })?,
            };
            let dos = dy.narrow(0, start, len)?.reshape((len, hq, hd))?.transpose(0, 1)?.contiguous()?;
            let dv = p.t()?.matmul(&dos)?;
            let dp = dos.matmul(&vs.t()?)?;
            let ds = p.apply_op2_no_bwd(&dp, &CausalSoftmaxGrad { scale: self.scale })?;
            let dq = ds.matmul(&ks)?;
            let dk = ds.t()?.matmul(&qs)?;
            // Heads that share a key/value head add up their gradients: [Hq] -> [Hkv].
            let fold =
                |t: Tensor| -> candle_core::Result<Tensor> { t.reshape((hkv, n, len, hd))?.sum(1)?.transpose(0, 1) };
            dqs.push(dq.transpose(0, 1)?);
            dks.push(fold(dk)?);
            dvs.push(fold(dv)?);
            start += len;
        }
        Ok((Some(Tensor::cat(&dqs, 0)?), Some(Tensor::cat(&dks, 0)?), Some(Tensor::cat(&dvs, 0)?)))
    }
}

/// Causal attention inside each packed segment, q [T, Hq, hd], k/v [T, Hkv, hd] -> [T, Hq*hd],
/// one graph node over q, k and v. On a GPU the probabilities are recomputed in the backward (memory
/// is what limits there); on the CPU, where compute does, they are kept. Where the fused
/// probabilities op does not run (the CPU in bf16), the plain graph.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seq_lengths: &[usize],
    masks: &mut MaskCache,
) -> candle_core::Result<Tensor> {
    let keep = q.device().is_cpu();
    if keep && q.dtype() != DType::F32 {
        return segment_attention(q, k, v, seq_lengths, masks);
    }
    attention_keeping(q, k, v, seq_lengths, keep)
}

/// `attention`, keeping the probabilities for the backward or not.
fn attention_keeping(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seq_lengths: &[usize],
    keep: bool,
) -> candle_core::Result<Tensor> {
    let (_, hq, hd) = q.dims3()?;
    let n = hq / k.dim(1)?;
    let scale = 1.0 / (hd as f32).sqrt();
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (mut outs, mut probs) = (Vec::with_capacity(seq_lengths.len()), vec![]);
    let mut start = 0;
    for &len in seq_lengths {
        let qs = segment_heads(&qd, start, len, 1)?;
        let p = qs.apply_op2_no_bwd(&segment_heads(&kd, start, len, n)?, &CausalAttentionProbs { scale })?;
        let o = p.matmul(&segment_heads(&vd, start, len, n)?)?; // [Hq, L, hd]
        outs.push(o.transpose(0, 1)?.reshape((len, hq * hd))?);
        if keep {
            probs.push(p);
        }
        start += len;
    }
    let y = Tensor::cat(&outs, 0)?;
    Ok(y.with_backward3(q, k, v, AttentionFn { seq_lengths: seq_lengths.to_vec(), scale, probs }))
}

/// RMSNorm with a frozen weight over x, as transformers computes it (normalise in f32, cast to the
/// compute dtype, scale); the backward in f32:
/// `dx = r * (w*dy) - x * r^3 / H * sum(w*dy*x)` with `r = 1/sqrt(mean(x^2) + eps)`.
struct RmsNormFn {
    w: Tensor,
    eps: f64,
}

impl CustomOp1 for RmsNormFn {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    attached_forward!(1);

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let h = x.dim(D::Minus1)? as f64;
        let x32 = x.detach().to_dtype(DType::F32)?;
        let r = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        let gw = dy.to_dtype(DType::F32)?.broadcast_mul(&self.w.to_dtype(DType::F32)?)?;
        let k = ((r.powf(3.0)? * (&gw * &x32)?.sum_keepdim(D::Minus1)?)? / h)?;
        let dx = (gw.broadcast_mul(&r)? - x32.broadcast_mul(&k)?)?;
        Ok(Some(dx.to_dtype(x.dtype())?))
    }
}

/// RMSNorm with a frozen weight keeping only its input: the fused CPU op in f32, else basic ops
/// outside the graph and the backward above.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return super::ops::rms_norm_frozen_cpu(x, w, eps);
    }
    let y = super::ops::rms_norm(&x.detach(), w, eps)?;
    Ok(y.with_backward1(x, RmsNormFn { w: w.clone(), eps }))
}

/// The loss head: `sum_i CE(h_i W^T, t_i)` over the trained positions' hidden states h [N, hidden],
/// `chunk` rows at a time. When training, each chunk's gradient with respect to its rows,
/// `(softmax - onehot) W`, is computed right after its logits, so no logits outlive their chunk
/// (the logits of 2,048 positions over a 49k vocabulary are 400 MB in f32); the backward is then
/// `g * dh`. The head is frozen (no LoRA on lm_head), so only the input gradient is needed. An NF4
/// head on the CPU is dequantised a block of vocabulary rows at a time, never whole.
pub fn linear_cross_entropy(
    h: &Tensor,
    head: &super::lora::Linear,
    targets: &Tensor,
    chunk: usize,
) -> candle_core::Result<Tensor> {
    let n = h.dim(0)?;
    let want_grad = h.track_op();
    let hd = h.detach();
    let weight = HeadWeight::new(head, &hd)?;
    let (mut total, mut dh) = (Tensor::zeros((), DType::F32, h.device())?, vec![]);
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let rows = hd.narrow(0, start, len)?;
        let logits = weight.logits(&rows)?;
        let (nll, dlogits) = cross_entropy_and_grad(&logits, &targets.narrow(0, start, len)?, want_grad)?;
        drop(logits);
        if let Some(d) = dlogits {
            dh.push(weight.input_grad(&d)?);
        }
        total = (total + nll)?;
        start += len;
    }
    if !want_grad {
        return Ok(total);
    }
    let dh = Tensor::cat(&dh, 0)?;
    Ok(total.with_backward1(h, LinearCrossEntropyFn { dh }))
}

/// The head's weight [vocab, hidden] for `linear_cross_entropy`: dense (whole), or NF4 rows
/// dequantised `NF4_ROWS` at a time.
enum HeadWeight {
    Dense(Tensor),
    Nf4 { w: Arc<super::quant::Nf4Weight>, dtype: DType, device: candle_core::Device },
}

const NF4_ROWS: usize = 4096;

impl HeadWeight {
    fn new(head: &super::lora::Linear, x: &Tensor) -> candle_core::Result<Self> {
        Ok(match (&head.q, head.gq.is_none() && x.device().is_cpu()) {
            (Some(w), true) => HeadWeight::Nf4 { w: w.clone(), dtype: x.dtype(), device: x.device().clone() },
            _ => HeadWeight::Dense(head.frozen_dense(x)?),
        })
    }

    /// Rows `r0..r0+len` of the weight.
    fn block(&self, r0: usize, len: usize) -> candle_core::Result<Tensor> {
        match self {
            HeadWeight::Dense(w) => w.narrow(0, r0, len),
            HeadWeight::Nf4 { w, dtype, device } => {
                let ids: Vec<u32> = (r0 as u32..(r0 + len) as u32).collect();
                Tensor::from_vec(w.dequantize_rows(&ids), (len, w.cols), device)?.to_dtype(*dtype)
            }
        }
    }

    fn blocks(&self) -> Vec<(usize, usize)> {
        match self {
            HeadWeight::Dense(w) => vec![(0, w.dim(0).unwrap_or(0))],
            HeadWeight::Nf4 { w, .. } => (0..w.rows).step_by(NF4_ROWS).map(|r| (r, NF4_ROWS.min(w.rows - r))).collect(),
        }
    }

    /// x W^T [rows, vocab].
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let parts = self
            .blocks()
            .into_iter()
            .map(|(r0, len)| x.matmul(&self.block(r0, len)?.t()?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one block"));
        }
        Tensor::cat(&parts, 1)
    }

    /// d W [rows, hidden] for d [rows, vocab].
    fn input_grad(&self, d: &Tensor) -> candle_core::Result<Tensor> {
        let mut acc: Option<Tensor> = None;
        for (r0, len) in self.blocks() {
            let part = d.narrow(1, r0, len)?.contiguous()?.matmul(&self.block(r0, len)?)?;
            acc = Some(match acc {
                Some(a) => (a + part)?,
                None => part,
            });
        }
        acc.ok_or_else(|| candle_core::Error::Msg("lm_head has no rows".into()))
    }
}

/// The backward of [`linear_cross_entropy`]: its input gradient, computed in the forward.
struct LinearCrossEntropyFn {
    dh: Tensor,
}

impl CustomOp1 for LinearCrossEntropyFn {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    attached_forward!(1);

    fn bwd(&self, _h: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.dh.broadcast_mul(&g.to_dtype(self.dh.dtype())?)?))
    }
}

/// Summed cross-entropy of logits [N, vocab] against targets [N] (f32 scalar) and, if asked, its
/// gradient `softmax - onehot` in the logits' dtype. Rows in parallel in one pass on the CPU in f32.
fn cross_entropy_and_grad(
    logits: &Tensor,
    targets: &Tensor,
    want_grad: bool,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    if !(logits.device().is_cpu() && logits.dtype() == DType::F32) {
        return cross_entropy_and_grad_tensors(logits, targets, want_grad);
    }
    use rayon::prelude::*;
    let (n, v) = logits.dims2()?;
    let logits = logits.contiguous()?;
    let (storage, layout) = logits.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((o1, o2))) = (&*storage, layout.contiguous_offsets()) else {
        candle_core::bail!("cross-entropy: contiguous CPU logits expected")
    };
    let l = &cpu.as_slice::<f32>()?[o1..o2];
    let t = targets.to_vec1::<u32>()?;
    let mut d = if want_grad { vec![0f32; n * v] } else { vec![] };
    let row_loss = |(row, &ti): (&[f32], &u32), drow: Option<&mut [f32]>| {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let lse = m + row.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
        if let Some(drow) = drow {
            for (dj, &x) in drow.iter_mut().zip(row) {
                *dj = (x - lse).exp();
            }
            drow[ti as usize] -= 1.0;
        }
        (lse - row[ti as usize]) as f64
    };
    let sum: f64 = if want_grad {
        l.par_chunks(v).zip(t.par_iter()).zip(d.par_chunks_mut(v)).map(|(r, dr)| row_loss(r, Some(dr))).sum()
    } else {
        l.par_chunks(v).zip(t.par_iter()).map(|r| row_loss(r, None)).sum()
    };
    let grad = if want_grad { Some(Tensor::from_vec(d, (n, v), logits.device())?) } else { None };
    Ok((Tensor::new(sum as f32, logits.device())?, grad))
}

/// `cross_entropy_and_grad` from tensor ops (the GPU, bf16), in f32.
fn cross_entropy_and_grad_tensors(
    logits: &Tensor,
    targets: &Tensor,
    want_grad: bool,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let idx = targets.unsqueeze(1)?;
    let nll = logp.gather(&idx, 1)?.sum_all()?.neg()?;
    if !want_grad {
        return Ok((nll, None));
    }
    let minus_one = Tensor::full(-1f32, (targets.dim(0)?, 1), logits.device())?;
    let d = logp.exp()?.scatter_add(&idx, &minus_one, 1)?;
    Ok((nll, Some(d.to_dtype(logits.dtype())?)))
}

#[cfg(test)]
mod tests {
    use super::super::ops::fused_tests::rand;
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The fused form and the plain graph give the same value and the same gradient for every input.
    fn same_as_graph(fused: impl Fn(&[Tensor]) -> Tensor, plain: impl Fn(&[Tensor]) -> Tensor, inputs: &[Tensor]) {
        let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
            let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts);
            let probe = rand(y.dims(), 99);
            let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Tensor> =
                ts.iter().map(|t| g.get(t).expect("every input gets a gradient").clone()).collect();
            (y, grads)
        };
        let (ya, ga) = run(&fused);
        let (yb, gb) = run(&plain);
        // A gradient that carries the forward graph along would keep it alive (in the optimiser's
        // state: a leak across steps).
        assert!(ga.iter().all(|g| !g.track_op()), "a gradient is still attached to the graph");
        assert!(max_diff(&ya, &yb) < 1e-5, "values differ by {}", max_diff(&ya, &yb));
        for (i, (a, b)) in ga.iter().zip(&gb).enumerate() {
            assert!(max_diff(a, b) < 1e-5, "gradient of input {i} differs by {}", max_diff(a, b));
        }
    }

    #[test]
    fn lora_linear_with_dropout_and_bias_matches_the_graph() {
        let (w, bias) = (rand(&[3, 6], 1), rand(&[3], 2));
        let mask = (rand(&[5, 6], 3).ge(0.0).unwrap().to_dtype(DType::F32).unwrap() * 2.0).unwrap();
        let base: BaseOp = Arc::new(Box::new(super::super::ops::FrozenMatmul { w: w.clone() }));
        same_as_graph(
            |t| lora_linear(&t[0], &t[0], base.clone(), Some(&bias), (&t[1], &t[2], 0.7), Some(mask.clone())).unwrap(),
            |t| {
                let y = t[0].matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
                let d =
                    (&t[0] * &mask).unwrap().matmul(&t[1].t().unwrap()).unwrap().matmul(&t[2].t().unwrap()).unwrap();
                (y + (d * 0.7).unwrap()).unwrap()
            },
            &[rand(&[5, 6], 4), rand(&[2, 6], 5), rand(&[3, 2], 6)],
        );
    }

    #[test]
    fn no_grad_records_no_graph() {
        let (x, a, b) = (rand(&[5, 6], 30), Var::from_tensor(&rand(&[2, 6], 31)).unwrap(), rand(&[3, 2], 32));
        let base: BaseOp = Arc::new(Box::new(super::super::ops::FrozenMatmul { w: rand(&[3, 6], 33) }));
        let run = || lora_linear(&x, &x, base.clone(), None, (a.as_tensor(), &b, 2.0), None).unwrap();
        let (recorded, plain) = (run(), no_grad(run));
        assert!(recorded.track_op() && !plain.track_op());
        assert_eq!(max_diff(&recorded, &plain), 0.0);
    }

    #[test]
    fn swiglu_and_rope_match_the_graph() {
        same_as_graph(
            |t| swiglu(&t[0], &t[1]).unwrap(),
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
            &[rand(&[4, 7], 7), rand(&[4, 7], 8)],
        );
        let (cos, sin) = (rand(&[5, 8], 9), rand(&[5, 8], 10));
        same_as_graph(
            |t| rope(&t[0], &cos, &sin).unwrap(),
            |t| super::super::ops::rope(&t[0], &cos, &sin).unwrap(),
            &[rand(&[5, 3, 8], 11)],
        );
    }

    #[test]
    fn attention_recomputing_probabilities_matches_the_graph_across_segments_and_gqa() {
        for keep in [true, false] {
            let m = std::cell::RefCell::new(MaskCache::default());
            same_as_graph(
                |t| attention_keeping(&t[0], &t[1], &t[2], &[2, 4, 1], keep).unwrap(),
                |t| segment_attention(&t[0], &t[1], &t[2], &[2, 4, 1], &mut m.borrow_mut()).unwrap(),
                &[rand(&[7, 4, 4], 12), rand(&[7, 2, 4], 13), rand(&[7, 2, 4], 14)],
            );
        }
    }

    #[test]
    fn rms_norm_backward_matches_the_graph() {
        let w = rand(&[8], 15);
        same_as_graph(
            |t| {
                super::super::ops::rms_norm(&t[0].detach(), &w, 1e-5)
                    .unwrap()
                    .with_backward1(&t[0], RmsNormFn { w: w.clone(), eps: 1e-5 })
            },
            |t| super::super::ops::rms_norm(&t[0], &w, 1e-5).unwrap(),
            &[rand(&[6, 8], 16)],
        );
    }

    #[test]
    fn linear_cross_entropy_matches_logits_then_log_softmax() {
        let w = rand(&[10, 6], 18);
        let head = super::super::lora::Linear::new("lm_head".into(), w.clone(), None);
        let targets = Tensor::new(&[3u32, 0, 9, 4, 9], &Device::Cpu).unwrap();
        let plain = |h: &Tensor| {
            let logp = candle_nn::ops::log_softmax(&h.matmul(&w.t().unwrap()).unwrap(), D::Minus1).unwrap();
            logp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap().sum_all().unwrap().neg().unwrap()
        };
        // Chunks of 2 rows over 5, the CPU's one-pass rows and the tensor-op form (the GPU's).
        same_as_graph(
            |t| linear_cross_entropy(&t[0], &head, &targets, 2).unwrap(),
            |t| plain(&t[0]),
            &[rand(&[5, 6], 19)],
        );
        // An NF4 head, dequantised in blocks of rows (2 blocks here), equals its dense dequantisation.
        let (vocab, cols) = (NF4_ROWS + 4, 64);
        let wq = Arc::new(super::super::quant::Nf4Weight::quantize(
            &rand(&[vocab, cols], 21).flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vocab,
            cols,
        ));
        let mut nf4_head = super::super::lora::Linear::new(
            "lm_head".into(),
            Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap(),
            None,
        );
        nf4_head.q = Some(wq.clone());
        let dense_head =
            super::super::lora::Linear::new("lm_head".into(), wq.dequantize_tensor(&Device::Cpu).unwrap(), None);
        let t2 = Tensor::new(&[4097u32, 3, 4099], &Device::Cpu).unwrap();
        same_as_graph(
            |t| linear_cross_entropy(&t[0], &nf4_head, &t2, 2).unwrap(),
            |t| linear_cross_entropy(&t[0], &dense_head, &t2, 2).unwrap(),
            &[rand(&[3, cols], 22)],
        );
        let logits = (rand(&[5, 10], 20) * 4.0).unwrap();
        let (a, da) = cross_entropy_and_grad(&logits, &targets, true).unwrap();
        let (b, db) = cross_entropy_and_grad_tensors(&logits, &targets, true).unwrap();
        assert!(max_diff(&a, &b) < 1e-4 && max_diff(&da.unwrap(), &db.unwrap()) < 1e-6);
    }
}
