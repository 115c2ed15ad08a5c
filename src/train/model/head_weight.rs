//! The loss head's weight [vocab, hidden] as the scores read it: dense and whole, or a block of
//! rows at a time, dequantised from NF4 or widened from the dtype it is held in (QLoRA's bf16
//! embedding), so no f32 copy of a quantised or narrow head is ever whole.

use super::linear::{Linear, Weight};
use candle_core::{DType, Tensor};
use std::sync::Arc;

/// Logits `x W^T` of a head [rows, vocab]: its own product, or, where the weight is held in
/// another dtype than `x`'s on the CPU (QLoRA's bf16 embedding), a block of rows widened at a time.
pub fn logits(x: &Tensor, head: &Linear) -> candle_core::Result<Tensor> {
    match &head.weight {
        Weight::Dense(w) if w.dtype() != x.dtype() && x.device().is_cpu() => HeadWeight::new(head, x)?.logits(x),
        _ => head.forward(x, None),
    }
}

/// The head's weight [vocab, hidden] for the scores: dense (whole), or `HEAD_ROWS` rows at a time
/// dequantised from NF4 or widened from another dtype.
pub(super) enum HeadWeight {
    Dense(Tensor),
    Nf4 { w: Arc<super::quant::Nf4Weight>, dtype: DType, device: candle_core::Device },
    Widened { w: Tensor, dtype: DType },
}

pub(super) const HEAD_ROWS: usize = 4096;

/// `rows` in blocks of [`HEAD_ROWS`]: (first row, rows) each.
fn row_blocks(rows: usize) -> Vec<(usize, usize)> {
    (0..rows).step_by(HEAD_ROWS).map(|r| (r, HEAD_ROWS.min(rows - r))).collect()
}

impl HeadWeight {
    pub(super) fn new(head: &Linear, x: &Tensor) -> candle_core::Result<Self> {
        Ok(match (&head.weight, x.device().is_cpu()) {
            (Weight::Nf4 { cpu, .. }, true) => {
                HeadWeight::Nf4 { w: cpu.clone(), dtype: x.dtype(), device: x.device().clone() }
            }
            (Weight::Dense(w), true) if w.dtype() != x.dtype() => {
                HeadWeight::Widened { w: w.clone(), dtype: x.dtype() }
            }
            // Detached: a trained weight's products here are not recorded (its gradient is ours).
            _ => HeadWeight::Dense(head.frozen_dense(x)?.detach()),
        })
    }

    /// Zeros of the weight's shape (its gradient when no row trains).
    pub(super) fn zeros(&self) -> candle_core::Result<Tensor> {
        match self {
            HeadWeight::Dense(w) => w.zeros_like(),
            HeadWeight::Nf4 { w, dtype, device } => Tensor::zeros((w.rows, w.cols), *dtype, device),
            HeadWeight::Widened { w, dtype } => Tensor::zeros(w.dims2()?, *dtype, w.device()),
        }
    }

    /// Rows `r0..r0+len` of the weight.
    pub(super) fn block(&self, r0: usize, len: usize) -> candle_core::Result<Tensor> {
        match self {
            HeadWeight::Dense(w) => w.narrow(0, r0, len),
            HeadWeight::Nf4 { w, dtype, device } => {
                let ids: Vec<u32> = (r0 as u32..(r0 + len) as u32).collect();
                Tensor::from_vec(w.dequantize_rows(&ids), (len, w.cols), device)?.to_dtype(*dtype)
            }
            HeadWeight::Widened { w, dtype } => w.narrow(0, r0, len)?.to_dtype(*dtype),
        }
    }

    pub(super) fn blocks(&self) -> Vec<(usize, usize)> {
        match self {
            HeadWeight::Dense(w) => vec![(0, w.dim(0).unwrap_or(0))],
            HeadWeight::Nf4 { w, .. } => row_blocks(w.rows),
            HeadWeight::Widened { w, .. } => row_blocks(w.dim(0).unwrap_or(0)),
        }
    }

    /// x W^T [rows, vocab].
    pub(super) fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let blocks = self.blocks();
        if let [(r0, len)] = blocks[..] {
            return x.matmul(&self.block(r0, len)?.t()?);
        }
        // Each block's columns written into the whole (no second copy of the logits, as a
        // concatenation of the parts would hold).
        let vocab = blocks.last().map_or(0, |(r0, len)| r0 + len);
        let out = Tensor::zeros((x.dim(0)?, vocab), x.dtype(), x.device())?;
        for (r0, len) in blocks {
            out.slice_set(&x.matmul(&self.block(r0, len)?.t()?)?, 1, r0)?;
        }
        Ok(out)
    }

    /// d W [rows, hidden] for d [rows, vocab].
    pub(super) fn input_grad(&self, d: &Tensor) -> candle_core::Result<Tensor> {
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
