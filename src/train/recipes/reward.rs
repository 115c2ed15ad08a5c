//! `train --method reward`: a reward model, a scalar head on the last token's hidden state trained
//! with LoRA on the body (Bradley-Terry loss), saved as PEFT saves `modules_to_save = ["score"]`.

use super::pairs::Pairs;
use crate::train::adapters::score::SCORE_WEIGHT;
use crate::train::objectives::reward::BradleyTerry;
use crate::train::options::TrainOptions;
use crate::train::trainer::{load_trainable, train, TrainSummary};
use anyhow::{Context, Result};
use std::path::Path;

pub fn run(opts: &TrainOptions, resume: Option<&Path>) -> Result<TrainSummary> {
    let mut t = load_trainable(opts, resume)?;
    t.model.add_score_head(opts.seed)?;
    let head = t.model.score.clone().context("the score head was just added")?;
    t.add_var(SCORE_WEIGHT, head);
    let recipe = Pairs::new(opts, "reward", Box::new(BradleyTerry), None)?;
    train(opts, t, recipe, resume)
}
