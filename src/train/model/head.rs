//! The loss head: the cross-entropy of `h W^T` against the next tokens at the trained positions,
//! `chunk` rows of logits at a time. Each chunk's input gradient is computed with its logits, so no
//! logits outlive their chunk and none are kept for the backward; an NF4 head on the CPU is
//! dequantised a block of vocabulary rows at a time, never whole.

use super::linear::{Linear, Weight};
use crate::train::graph::attached_forward;
use candle_core::{CustomOp1, DType, Tensor, D};
use std::sync::Arc;

/// The loss head: `sum_i CE(h_i W^T, t_i)` over the trained positions' hidden states h [N, hidden],
/// `chunk` rows at a time. When training, each chunk's gradient with respect to its rows,
/// `(softmax - onehot) W`, is computed right after its logits, so no logits outlive their chunk
/// (the logits of 2,048 positions over a 49k vocabulary are 400 MB in f32); the backward is then
/// `g * dh`. The head is frozen (no LoRA on lm_head), so only the input gradient is needed. An NF4
/// head on the CPU is dequantised a block of vocabulary rows at a time, never whole.
pub fn linear_cross_entropy(h: &Tensor, head: &Linear, targets: &Tensor, chunk: usize) -> candle_core::Result<Tensor> {
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
    fn new(head: &Linear, x: &Tensor) -> candle_core::Result<Self> {
        Ok(match (&head.weight, x.device().is_cpu()) {
            (Weight::Nf4 { cpu, .. }, true) => {
                HeadWeight::Nf4 { w: cpu.clone(), dtype: x.dtype(), device: x.device().clone() }
            }
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
    use super::*;
    use crate::train::graph::testing::{max_diff, rand, same_as_graph};
    use candle_core::Device;

    #[test]
    fn linear_cross_entropy_matches_logits_then_log_softmax() {
        let w = rand(&[10, 6], 18);
        let head = Linear::new("lm_head".into(), w.clone(), None);
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
        let nf4_head = Linear::quantised("lm_head".into(), Weight::Nf4 { cpu: wq.clone(), gpu: None }, &Device::Cpu);
        let dense_head = Linear::new("lm_head".into(), wq.dequantize_tensor(&Device::Cpu).unwrap(), None);
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
