//! Scoring given continuations for evaluation (`tunekit bench`): each continuation token's
//! log-probability under the model and whether it is the model's most likely next token, the two
//! numbers lm-evaluation-harness's log-likelihood requests return. Inference only; logits a chunk
//! of positions at a time.

use super::batch::Batch;
use super::Model;
use crate::train::graph::no_grad;

/// Positions whose logits are materialised at once.
const SCORE_CHUNK: usize = 256;

impl Model {
    /// For each trained position of `batch` in order: the log-probability of its target token
    /// (log-softmax in f64 over the f32 logits) and whether the target is the argmax.
    pub fn target_scores(&self, batch: &Batch) -> candle_core::Result<Vec<(f64, bool)>> {
        if batch.trained == 0 {
            return Ok(vec![]);
        }
        no_grad(|| {
            let h = self.hidden(&batch.input_ids, &batch.position_ids, &batch.seq_lengths, None)?;
            let sel = h.index_select(&batch.loss_positions, 0)?;
            let targets = batch.loss_targets.to_vec1::<u32>()?;
            let mut out = Vec::with_capacity(targets.len());
            for start in (0..targets.len()).step_by(SCORE_CHUNK) {
                let len = SCORE_CHUNK.min(targets.len() - start);
                let logits = self.logits_of(&sel.narrow(0, start, len)?)?;
                out.extend(target_scores_of(&logits, &targets[start..start + len])?);
            }
            Ok(out)
        })
    }
}

/// Each row's log-probability of its target (log-softmax in f64 over the f32 logits [N, vocab]) and
/// whether the target is the row's first maximum (torch's argmax).
pub fn target_scores_of(logits: &candle_core::Tensor, targets: &[u32]) -> candle_core::Result<Vec<(f64, bool)>> {
    use rayon::prelude::*;
    let logits = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    Ok(logits
        .par_iter()
        .zip(targets)
        .map(|(row, &t)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&z| ((z - max) as f64).exp()).sum();
            let logp = (row[t as usize] - max) as f64 - sum.ln();
            let argmax = row.iter().position(|&z| z == max).unwrap_or(0);
            (logp, argmax == t as usize)
        })
        .collect())
}
