//! Layer pieces with a hand-written backward, PyTorch's `autograd.Function` in candle: each forward
//! runs on detached inputs (no graph), then the value is attached to the graph as the output of an
//! op over the piece's inputs only (`Tensor::with_backward*`, a patch of the vendored candle-core).
//! The graph then keeps a piece's inputs and output, never its temporaries: no attention
//! probabilities (recomputed in the backward, as flash attention does), no LoRA products, no f32
//! copies, no rope or norm intermediates. Candle otherwise keeps every op's inputs alive until the
//! backward ends, which is most of a training step's memory.

use super::ops::{repeat_kv, segment_attention, CausalAttentionProbs, CausalSoftmaxGrad, MaskCache};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use std::sync::Arc;

/// The frozen base of a linear layer: its op (forward `x W^T`, backward the input gradient only).
pub type BaseOp = Arc<Box<dyn CustomOp1 + Send + Sync>>;

fn attached_only<T>(name: &str) -> candle_core::Result<T> {
    candle_core::bail!("{name}: computed outside the graph and attached; its forward is not run as an op")
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
    Ok(y.with_backward3(x, a, b, LoraLinearFn { base, scale, mask, u }))
}

/// `silu(g) * u` over (g, u).
struct SwiGluFn;

impl CustomOp2 for SwiGluFn {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        attached_only(self.name())
    }

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

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        attached_only(self.name())
    }

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
            let heads = |t: &Tensor| t.narrow(0, start, len)?.transpose(0, 1); // [H, L, hd]
            let qs = heads(&q)?.contiguous()?;
            let ks = repeat_kv(&heads(&k)?, n)?;
            let vs = repeat_kv(&heads(&v)?, n)?;
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
        let heads = |t: &Tensor| t.narrow(0, start, len)?.transpose(0, 1); // [H, L, hd]
        let qs = heads(&qd)?.contiguous()?;
        let p = qs.apply_op2_no_bwd(&repeat_kv(&heads(&kd)?, n)?, &CausalAttentionProbs { scale })?;
        let o = p.matmul(&repeat_kv(&heads(&vd)?, n)?)?; // [Hq, L, hd]
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

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        attached_only(self.name())
    }

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
        return super::ops::rms_norm_frozen(x, w, eps);
    }
    let y = super::ops::rms_norm(&x.detach(), w, eps)?;
    Ok(y.with_backward1(x, RmsNormFn { w: w.clone(), eps }))
}

/// Summed cross-entropy of logits [N, vocab] against targets [N]; the backward recomputes
/// `softmax - onehot` from the logits, so only the logits are kept.
struct CrossEntropyFn {
    targets: Tensor,
}

impl CustomOp1 for CrossEntropyFn {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        attached_only(self.name())
    }

    fn bwd(&self, logits: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let p = candle_nn::ops::softmax_last_dim(&logits.detach().to_dtype(DType::F32)?)?;
        let n = self.targets.dim(0)?;
        let minus_one = Tensor::full(-1f32, (n, 1), logits.device())?;
        let d = p.scatter_add(&self.targets.unsqueeze(1)?, &minus_one, 1)?;
        Ok(Some(d.broadcast_mul(&g.to_dtype(DType::F32)?)?.to_dtype(logits.dtype())?))
    }
}

/// Sum of the cross-entropies of the rows of `logits` [N, vocab] against `targets` [N] (u32).
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 {
        return super::ops::cross_entropy_sum(logits, targets);
    }
    let y = super::ops::cross_entropy_sum(&logits.detach(), targets)?;
    Ok(y.with_backward1(logits, CrossEntropyFn { targets: targets.clone() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut r = crate::split::SplitMix64::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| ((r.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

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
    fn norm_and_cross_entropy_backwards_match_the_graph() {
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
        let targets = Tensor::new(&[3u32, 0, 9, 4], &Device::Cpu).unwrap();
        let plain = |l: &Tensor| {
            let logp = candle_nn::ops::log_softmax(l, D::Minus1).unwrap();
            logp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap().sum_all().unwrap().neg().unwrap()
        };
        same_as_graph(
            |t| plain(&t[0].detach()).with_backward1(&t[0], CrossEntropyFn { targets: targets.clone() }),
            |t| plain(&t[0]),
            &[rand(&[4, 10], 17)],
        );
    }
}
