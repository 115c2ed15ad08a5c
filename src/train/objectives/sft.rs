//! Supervised fine-tuning: the summed token cross-entropy at the trained positions of packed rows
//! (`Model::loss_sum`), normalised by the trained tokens of the whole accumulated batch.

use crate::train::data::Shards;
use crate::train::graph::no_grad;
use crate::train::model::batch::Batch;
use crate::train::model::Model;
use anyhow::Result;

/// Mean token loss over a split and the number of trained tokens (no gradients).
pub fn evaluate(model: &Model, shards: &Shards, budget: usize, chunk: usize) -> Result<(f64, u64)> {
    let order: Vec<usize> = (0..shards.rows.len()).collect();
    let (mut sum, mut n) = (0.0f64, 0u64);
    for mb in shards.micro_batches(&order, budget) {
        let rows: Vec<_> = mb.iter().map(|&i| &shards.rows[i]).collect();
        let b = Batch::from_rows(&rows, &model.device)?;
        if b.trained == 0 {
            continue;
        }
        sum += no_grad(|| model.loss_sum(&b, None, chunk))?.to_scalar::<f32>()? as f64;
        n += b.trained as u64;
    }
    Ok((if n == 0 { f64::NAN } else { sum / n as f64 }, n))
}
