//! `train --method dpo`: direct preference optimisation of the LoRA policy on preference shards,
//! against the base with the adapter off as the reference; with `--full`, of every weight against
//! the base's log-probabilities computed before training.

use super::pairs::Pairs;
use crate::train::data::load_pairs;
use crate::train::io::load_model;
use crate::train::objectives::dpo::{reference_log_probs, Dpo, PrecomputedReference};
use crate::train::options::TrainOptions;
use crate::train::trainer::{load_trainable, placement, train, TrainSummary};
use anyhow::Result;
use std::path::Path;

pub fn run(opts: &TrainOptions, dpo: Dpo, resume: Option<&Path>) -> Result<TrainSummary> {
    if opts.full {
        // The base's log-probabilities first, from the base itself (a resumed run's weights have
        // moved), then the policy loads in its place.
        let refs = {
            let base = load_model(&opts.model, None, &placement(opts))?;
            let mut pairs = load_pairs(&opts.data, "train")?;
            pairs.extend(load_pairs(&opts.data, "eval")?);
            reference_log_probs(&base, &pairs)?
        };
        let t = load_trainable(opts, resume)?;
        let objective = PrecomputedReference { dpo, refs };
        let recipe = Pairs::new(opts, "dpo", Box::new(objective), Some(dpo.beta))?;
        return train(opts, t, recipe, resume);
    }
    let t = load_trainable(opts, resume)?;
    let recipe = Pairs::new(opts, "dpo", Box::new(dpo), Some(dpo.beta))?;
    train(opts, t, recipe, resume)
}
