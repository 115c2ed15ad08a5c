//! The scalar head of a reward model: [1, hidden] on the last token's final hidden state, trained
//! with the LoRA body, saved as PEFT saves `modules_to_save = ["score"]` for a sequence classifier.

use crate::split::SplitMix64;
use anyhow::Result;
use candle_core::{Device, Tensor, Var};

/// PEFT's name of the head's weight in the adapter file.
pub const SCORE_WEIGHT: &str = "base_model.model.score.weight";

/// A fresh head initialised as transformers does (normal, std 0.02).
pub fn new_score_head(hidden: usize, seed: u64, device: &Device) -> Result<Var> {
    let mut rng = SplitMix64::new(seed ^ 0x5C0);
    let w: Vec<f32> = (0..hidden).map(|_| (rng.normal() * 0.02) as f32).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(w, (1, hidden), device)?)?)
}
