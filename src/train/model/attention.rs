//! Causal self-attention over packed rows: each segment attends only to itself (block-diagonal),
//! causally, with grouped-query heads. [`attention`] is one graph node over q, k and v. On the CPU
//! in f32 the tiled kernels of `cpu::attention` compute it in memory linear in the segment's length
//! (each query's log-sum-exp kept, the probabilities recomputed in the backward), with every
//! variant of a family's [`Shape`]: the scores' scale, a sliding window, soft-capped scores and
//! attention sinks. On a GPU the probabilities are recomputed in the backward (`recomputed`): per segment by the
//! fused ops, or a block of query rows at a time where a segment's [heads, L, L] would pass 256 MB
//! and for windows and soft-caps (each block over the keys its window reaches); sinks take the
//! plain graph with an explicit mask.

use super::recomputed::{self, segment_heads, Blocked, PROBS_BUDGET_BYTES};
use super::softmax::{causal_softmax, CausalAttentionProbs, MaskCache};
use crate::train::cpu::attention::{self as tiled, Heads, Logits, Segment};
use crate::train::graph::{attached_forward, with_cpu_f32};
use candle_core::{CustomOp3, DType, Tensor, D};
use std::sync::Mutex;

/// How a layer attends, beyond causally within each segment.
#[derive(Debug, Clone, Copy)]
pub struct Shape<'a> {
    /// Scores are `q.k * scale`.
    pub scale: f32,
    /// Each query sees only the last `window` keys up to itself.
    pub window: Option<usize>,
    /// Scores soft-capped: `c * tanh(s / c)`.
    pub softcap: Option<f32>,
    /// Attention sinks [Hq] (f32): each head's extra logit in the softmax's denominator.
    pub sinks: Option<&'a Tensor>,
}

impl Shape<'_> {
    /// Plain causal attention scaled by 1/sqrt(head_dim).
    pub fn causal(head_dim: usize) -> Shape<'static> {
        Shape { scale: 1.0 / (head_dim as f32).sqrt(), window: None, softcap: None, sinks: None }
    }
}

/// Whether attention on `device` in `dtype` runs the tiled kernels (memory linear in the segment's
/// length): the CPU in f32. Elsewhere each segment's [heads, L, L] scores are formed.
pub fn tiled_on(device: &candle_core::Device, dtype: DType) -> bool {
    device.is_cpu() && dtype == DType::F32
}

/// Causal attention inside each packed segment, q [T, Hq, hd], k/v [T, Hkv, hd] -> [T, Hq*hd].
/// Where the fused probabilities op does not run (the CPU in bf16), the plain graph.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seq_lengths: &[usize],
    masks: &mut MaskCache,
    shape: Shape,
) -> candle_core::Result<Tensor> {
    let window_bites = shape.window.is_some_and(|w| seq_lengths.iter().any(|&l| l > w));
    if !tiled_on(q.device(), q.dtype()) && shape.sinks.is_some() {
        return masked_attention(q, k, v, seq_lengths, shape);
    }
    if !tiled_on(q.device(), q.dtype()) && (shape.softcap.is_some() || window_bites) {
        let blocks = Blocked { scale: shape.scale, window: shape.window, softcap: shape.softcap };
        return recomputing_attention_within(q, k, v, seq_lengths, blocks, PROBS_BUDGET_BYTES);
    }
    if q.device().is_cpu() {
        return match q.dtype() {
            DType::F32 => cpu_attention(q, k, v, seq_lengths, shape),
            _ => segment_attention(q, k, v, seq_lengths, masks, shape.scale),
        };
    }
    recomputing_attention(q, k, v, seq_lengths, shape.scale)
}

/// Attention as plain graph ops with an explicit mask (causal, and the window), scores soft-capped
/// where the shape says: the families' variants the fused kernels do not take.
fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seq_lengths: &[usize],
    shape: Shape,
) -> candle_core::Result<Tensor> {
    let (_, hq, hd) = q.dims3()?;
    let n = hq / k.dim(1)?;
    let mut outs = Vec::with_capacity(seq_lengths.len());
    let mut start = 0;
    for &len in seq_lengths {
        let qs = segment_heads(q, start, len, 1)?.to_dtype(DType::F32)?;
        let ks = segment_heads(k, start, len, n)?.to_dtype(DType::F32)?;
        let mut s = (qs.matmul(&ks.t()?)? * shape.scale as f64)?;
        if let Some(c) = shape.softcap {
            s = ((s / c as f64)?.tanh()? * c as f64)?;
        }
        let w = shape.window.unwrap_or(usize::MAX);
        let mask: Vec<f32> = (0..len * len)
            .map(|x| (x / len, x % len))
            .map(|(i, j)| if j <= i && i - j < w { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let mask = Tensor::from_vec(mask, (1, len, len), q.device())?;
        let s = s.broadcast_add(&mask)?;
        let p = match shape.sinks {
            // The sink as one more column of every row, dropped after the softmax.
            Some(sinks) => {
                let col = sinks.reshape((hq, 1, 1))?.broadcast_as((hq, len, 1))?;
                candle_nn::ops::softmax(&Tensor::cat(&[&s, &col.contiguous()?], 2)?, D::Minus1)?.narrow(2, 0, len)?
            }
            None => candle_nn::ops::softmax(&s, D::Minus1)?,
        }
        .to_dtype(q.dtype())?;
        let o = p.matmul(&segment_heads(v, start, len, n)?)?;
        outs.push(o.transpose(0, 1)?.reshape((len, hq * hd))?);
        start += len;
    }
    Tensor::cat(&outs, 0)
}

/// The segments of packed rows with these lengths.
fn segments(seq_lengths: &[usize]) -> Vec<Segment> {
    let mut start = 0;
    seq_lengths
        .iter()
        .map(|&len| {
            start += len;
            Segment { start: start - len, len }
        })
        .collect()
}

/// `attention` on the CPU in f32: the tiled kernels, each query's log-sum-exp kept for the backward.
fn cpu_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seq_lengths: &[usize],
    shape: Shape,
) -> candle_core::Result<Tensor> {
    let (t, hq, d) = q.dims3()?;
    let dims = Heads { hq, hkv: k.dim(1)?, d };
    let sinks = shape.sinks.map(|s| s.to_dtype(DType::F32)?.to_vec1::<f32>()).transpose()?;
    let kept = Kept { dims, window: shape.window, softcap: shape.softcap, sinks, lse: Mutex::new(vec![]) };
    let mut y = vec![0f32; t * hq * d];
    let lse = with_cpu_f32(&[q, k, v], |x| {
        let forward = |s| tiled::forward(x[0], x[1], x[2], dims, s, kept.logits(shape.scale), &mut y);
        segments(seq_lengths).into_iter().map(forward).collect()
    })?;
    *kept.lse.lock().expect("not poisoned") = lse;
    let y = Tensor::from_vec(y, (t, hq * d), q.device())?;
    let scale = shape.scale;
    Ok(y.with_backward3(
        q,
        k,
        v,
        AttentionFn { seq_lengths: seq_lengths.to_vec(), backward: Backward::Kept { scale, kept } },
    ))
}

/// What the tiled CPU forward keeps for its backward: the shape's variants and each segment's
/// log-sum-exp [Hq, L] (taken: the backward runs once).
struct Kept {
    dims: Heads,
    window: Option<usize>,
    softcap: Option<f32>,
    sinks: Option<Vec<f32>>,
    lse: Mutex<Vec<Vec<f32>>>,
}

impl Kept {
    /// How the kernels turn products into logits.
    fn logits(&self, scale: f32) -> Logits<'_> {
        Logits { scale, softcap: self.softcap, window: self.window, sinks: self.sinks.as_deref() }
    }

    /// The tiled backward from the outputs and the kept log-sum-exps.
    fn backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (y, dy): (&Tensor, &Tensor),
        seq_lengths: &[usize],
        scale: f32,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = std::mem::take(&mut *self.lse.lock().expect("not poisoned"));
        if lse.len() != seq_lengths.len() {
            candle_core::bail!("attention: the backward ran twice over the same forward");
        }
        let (t, Heads { hq, hkv, d }) = (q.dim(0)?, self.dims);
        let (mut dq, mut dk, mut dv) = (vec![0f32; t * hq * d], vec![0f32; t * hkv * d], vec![0f32; t * hkv * d]);
        with_cpu_f32(&[q, k, v, y, dy], |x| {
            for (s, lse) in segments(seq_lengths).into_iter().zip(lse) {
                let grads = (&mut dq[..], &mut dk[..], &mut dv[..]);
                tiled::backward((x[0], x[1], x[2]), (x[3], x[4]), &lse, self.dims, s, self.logits(scale), grads);
            }
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (t, hq, d), dev)?),
            Some(Tensor::from_vec(dk, (t, hkv, d), dev)?),
            Some(Tensor::from_vec(dv, (t, hkv, d), dev)?),
        ))
    }
}

/// `attention` whose backward recomputes the probabilities (the GPU path, `recomputed`).
fn recomputing_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seq_lengths: &[usize],
    scale: f32,
) -> candle_core::Result<Tensor> {
    let plain = Blocked { scale, window: None, softcap: None };
    recomputing_attention_within(q, k, v, seq_lengths, plain, PROBS_BUDGET_BYTES)
}

fn recomputing_attention_within(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seq_lengths: &[usize],
    shape: Blocked,
    budget: usize,
) -> candle_core::Result<Tensor> {
    let y = recomputed::forward((&q.detach(), &k.detach(), &v.detach()), seq_lengths, shape, budget)?;
    let f = AttentionFn { seq_lengths: seq_lengths.to_vec(), backward: Backward::Recomputed { shape, budget } };
    Ok(y.with_backward3(q, k, v, f))
}

/// The backward of [`attention`]: the tiled CPU one from the log-sum-exps its forward kept, or the
/// probabilities recomputed.
struct AttentionFn {
    seq_lengths: Vec<usize>,
    backward: Backward,
}

enum Backward {
    Kept { scale: f32, kept: Kept },
    Recomputed { shape: Blocked, budget: usize },
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
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        match &self.backward {
            Backward::Kept { scale, kept } => kept.backward((&q, &k, &v), (&y.detach(), dy), &self.seq_lengths, *scale),
            Backward::Recomputed { shape, budget } => {
                let (dq, dk, dv) = recomputed::backward((&q, &k, &v), dy, &self.seq_lengths, *shape, *budget)?;
                Ok((Some(dq), Some(dk), Some(dv)))
            }
        }
    }
}

/// The same attention as plain graph ops (the CPU in bf16; the reference of the tests).
fn segment_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seq_lengths: &[usize],
    masks: &mut MaskCache,
    scale: f32,
) -> candle_core::Result<Tensor> {
    let (_, hq, hd) = q.dims3()?;
    let hkv = k.dim(1)?;
    let scale = scale as f64;
    let mut outs = Vec::with_capacity(seq_lengths.len());
    let mut start = 0;
    for &len in seq_lengths {
        let qs = segment_heads(q, start, len, 1)?;
        let ks = segment_heads(k, start, len, hq / hkv)?;
        let vs = segment_heads(v, start, len, hq / hkv)?;
        let probs = if qs.device().is_cuda() || qs.dtype() == DType::F32 {
            qs.apply_op2(&ks, CausalAttentionProbs { scale: scale as f32 })?
        } else {
            causal_softmax(&qs.matmul(&ks.t()?)?, scale, masks)?
        };
        let o = probs.matmul(&vs)?; // [Hq, L, hd]
        outs.push(o.transpose(0, 1)?.reshape((len, hq * hd))?);
        start += len;
    }
    Tensor::cat(&outs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::graph::testing::{max_diff, rand, same_as_graph};
    use candle_core::{Device, Var, D};

    #[test]
    fn segments_do_not_attend_to_each_other() {
        // Changing the second segment's values must not change the first segment's output.
        let half = |s: &[usize], seed| (rand(s, seed) * 0.5).unwrap();
        let q = half(&[6, 8], 8).reshape((6, 2, 4)).unwrap();
        let k = half(&[6, 4], 9).reshape((6, 1, 4)).unwrap();
        let v1 = half(&[6, 4], 10).reshape((6, 1, 4)).unwrap();
        let v2 = Tensor::cat(&[v1.narrow(0, 0, 2).unwrap(), (v1.narrow(0, 2, 4).unwrap() * 5.0).unwrap()], 0).unwrap();
        let mut m = MaskCache::default();
        let a = segment_attention(&q, &k, &v1, &[2, 4], &mut m, 0.5).unwrap();
        let b = segment_attention(&q, &k, &v2, &[2, 4], &mut m, 0.5).unwrap();
        let d = (a.narrow(0, 0, 2).unwrap() - b.narrow(0, 0, 2).unwrap()).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        // And causality inside a segment: the first token sees only itself.
        let first = a.narrow(0, 0, 1).unwrap().reshape((2, 4)).unwrap();
        let v0 = v1.narrow(0, 0, 1).unwrap().reshape((1, 4)).unwrap();
        let want = Tensor::cat(&[&v0, &v0], 0).unwrap();
        let d = (first - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6);
    }

    #[test]
    fn fused_attention_probabilities_match_matmul_then_masked_softmax() {
        let (q0, k0) = (rand(&[2, 6, 4], 11), rand(&[2, 6, 4], 12));
        let probe = rand(&[2, 6, 6], 13);
        let run = |fused: bool| {
            let (q, k) = (Var::from_tensor(&q0).unwrap(), Var::from_tensor(&k0).unwrap());
            let p = if fused {
                q.as_tensor().apply_op2(k.as_tensor(), CausalAttentionProbs { scale: 0.5 }).unwrap()
            } else {
                let s = q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap();
                let mut m = MaskCache::default();
                let masked = (s * 0.5).unwrap().broadcast_add(&m.get(6, &Device::Cpu).unwrap()).unwrap();
                candle_nn::ops::softmax(&masked, D::Minus1).unwrap()
            };
            let g = (&p * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (gq, gk) = (g.get(q.as_tensor()).unwrap().clone(), g.get(k.as_tensor()).unwrap().clone());
            (p, gq, gk)
        };
        let (a, b) = (run(true), run(false));
        for (x, y, what) in [(&a.0, &b.0, "probabilities"), (&a.1, &b.1, "dq"), (&a.2, &b.2, "dk")] {
            let d = max_diff(x, y);
            assert!(d < 1e-5, "{what} differ by {d}");
        }
    }

    #[test]
    fn causal_softmax_matches_masked_softmax() {
        same_as_graph(
            |t| t[0].apply_op1(super::super::softmax::CausalSoftmax { scale: 0.5 }).unwrap(),
            |t| {
                let mut m = MaskCache::default();
                candle_nn::ops::softmax(
                    &(&t[0] * 0.5).unwrap().broadcast_add(&m.get(5, &Device::Cpu).unwrap()).unwrap(),
                    D::Minus1,
                )
                .unwrap()
            },
            &[rand(&[3, 5, 5], 1)],
        );
    }

    #[test]
    fn tiled_recomputing_and_blocked_attention_match_the_graph_across_segments_and_gqa() {
        // Short segments (inside one block) and long ones (across block edges, a partial last block).
        for lens in [vec![2, 4, 1], vec![70, 1, 150]] {
            let t: usize = lens.iter().sum();
            let inputs = [rand(&[t, 4, 8], 12), rand(&[t, 2, 8], 13), rand(&[t, 2, 8], 14)];
            let m = std::cell::RefCell::new(MaskCache::default());
            let plain = Blocked { scale: Shape::causal(8).scale, window: None, softcap: None };
            // The CPU's tiled kernels; the recomputing path whole; and in blocks of 16-35 query rows
            // (a 40 kB budget: the long segments split, the short ones whole).
            for path in 0..3 {
                same_as_graph(
                    |x| match path {
                        0 => cpu_attention(&x[0], &x[1], &x[2], &lens, Shape::causal(8)).unwrap(),
                        1 => recomputing_attention(&x[0], &x[1], &x[2], &lens, Shape::causal(8).scale).unwrap(),
                        _ => recomputing_attention_within(&x[0], &x[1], &x[2], &lens, plain, 40_000).unwrap(),
                    },
                    |x| {
                        segment_attention(&x[0], &x[1], &x[2], &lens, &mut m.borrow_mut(), Shape::causal(8).scale)
                            .unwrap()
                    },
                    &inputs,
                );
            }
        }
    }

    #[test]
    fn windowed_capped_and_sinking_tiled_attention_matches_the_masked_graph() {
        let lens = vec![3, 90];
        let t: usize = lens.iter().sum();
        let inputs = [rand(&[t, 4, 8], 21), rand(&[t, 2, 8], 22), rand(&[t, 2, 8], 23)];
        let shape = Shape { scale: 0.3, window: Some(7), softcap: None, sinks: None };
        same_as_graph(
            |x| cpu_attention(&x[0], &x[1], &x[2], &lens, shape).unwrap(),
            |x| masked_attention(&x[0], &x[1], &x[2], &lens, shape).unwrap(),
            &inputs,
        );
        // Attention sinks (with and without the window): the blocked kernel's denominators have them.
        let sinks = (rand(&[4], 24) * 2.0).unwrap();
        for window in [Some(7), None] {
            let shape = Shape { scale: 0.3, window, softcap: None, sinks: Some(&sinks) };
            same_as_graph(
                |x| cpu_attention(&x[0], &x[1], &x[2], &lens, shape).unwrap(),
                |x| masked_attention(&x[0], &x[1], &x[2], &lens, shape).unwrap(),
                &inputs,
            );
        }
        // Soft-capped scores (Gemma 2), with a window and without; the GPU's blocked path for
        // windows and soft-caps too, whole (a large budget) and in blocks of 16 query rows.
        for (window, softcap) in [(Some(7), Some(0.9)), (None, Some(0.9)), (Some(7), None)] {
            let shape = Shape { scale: 0.3, window, softcap, sinks: None };
            let blocked = Blocked { scale: 0.3, window, softcap };
            for budget in [usize::MAX / 8, 1] {
                same_as_graph(
                    |x| recomputing_attention_within(&x[0], &x[1], &x[2], &lens, blocked, budget).unwrap(),
                    |x| masked_attention(&x[0], &x[1], &x[2], &lens, shape).unwrap(),
                    &inputs,
                );
            }
            same_as_graph(
                |x| cpu_attention(&x[0], &x[1], &x[2], &lens, shape).unwrap(),
                |x| masked_attention(&x[0], &x[1], &x[2], &lens, shape).unwrap(),
                &inputs,
            );
        }
        // Without a window the masked graph is the causal attention of the fused path.
        let causal = Shape::causal(8);
        same_as_graph(
            |x| cpu_attention(&x[0], &x[1], &x[2], &lens, causal).unwrap(),
            |x| masked_attention(&x[0], &x[1], &x[2], &lens, causal).unwrap(),
            &inputs,
        );
    }
}
