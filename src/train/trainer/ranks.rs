//! The gradient sum of a data-parallel run, and the check that every rank runs the same job.

use super::recipe::Step;
use crate::train::options::TrainOptions;
use anyhow::Result;
use candle_core::{Tensor, Var};

/// Sums a step over the ranks of a data-parallel run: the gradients (each rank's already scaled by
/// the whole step's normaliser, so the sum is the step's gradient), the loss, tokens and examples.
/// Every rank then holds the same step and runs clipping and AdamW identically. Returns the seconds
/// of the gradient sum alone (the counts' sum before it waits for the slowest rank).
pub fn sum_over_ranks(world: &crate::cluster::World, s: &mut Step, vars: &[Var]) -> Result<f64> {
    let mut counts = [s.loss, s.tokens as f64, s.examples as f64];
    world.sum_f64(&mut counts)?;
    (s.loss, s.tokens, s.examples) = (counts[0], counts[1] as usize, counts[2] as usize);
    if !s.loss.is_finite() {
        return Ok(0.0); // every rank stops on the same sum
    }
    let flat: Vec<Tensor> = s
        .grads
        .iter()
        .map(|g| g.flatten_all()?.to_dtype(candle_core::DType::F32))
        .collect::<candle_core::Result<_>>()?;
    let (sum, seconds) = world.sum_tensor(&Tensor::cat(&flat, 0)?)?;
    let mut at = 0;
    for (g, v) in s.grads.iter_mut().zip(vars) {
        let n = v.elem_count();
        *g = sum.narrow(0, at, n)?.reshape(v.dims())?.to_dtype(v.dtype())?;
        at += n;
    }
    Ok(seconds)
}

/// A digest of what every rank of a data-parallel run must share: the options and the data's manifest.
pub fn run_digest(opts: &TrainOptions) -> Result<u64> {
    let mut bytes = serde_json::to_vec(opts)?;
    bytes.extend(std::fs::read(opts.data.join(crate::pack::manifest::FILE)).unwrap_or_default());
    Ok(xxhash_rust::xxh3::xxh3_64(&bytes))
}
