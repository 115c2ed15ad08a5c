//! `train --method dpo`: direct preference optimisation of the LoRA policy on preference shards,
//! against the base with the adapter off as the reference.

use super::pairs::Pairs;
use crate::train::objectives::dpo::Dpo;
use crate::train::options::TrainOptions;
use crate::train::trainer::{load_trainable, train, TrainSummary};
use anyhow::Result;
use std::path::Path;

pub fn run(opts: &TrainOptions, dpo: Dpo, resume: Option<&Path>) -> Result<TrainSummary> {
    let t = load_trainable(opts, resume)?;
    let recipe = Pairs::new(opts, "dpo", Box::new(dpo), Some(dpo.beta))?;
    train(opts, t, recipe, resume)
}
