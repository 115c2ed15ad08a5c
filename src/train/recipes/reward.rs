//! `train --method reward`: a reward model, a scalar head on the last token's hidden state trained
//! with LoRA on the body (Bradley-Terry loss), saved as PEFT saves `modules_to_save = ["score"]`;
//! with `--full`, the whole body trained and the run directory a Hugging Face
//! `...ForSequenceClassification` model (no LM head, `score.weight`), as TRL's RewardTrainer saves one.

use super::pairs::Pairs;
use crate::train::adapters::score::SCORE_WEIGHT;
use crate::train::objectives::reward::BradleyTerry;
use crate::train::options::TrainOptions;
use crate::train::trainer::{load_trainable, train, TrainSummary};
use anyhow::{Context, Result};
use std::path::Path;

pub fn run(opts: &TrainOptions, resume: Option<&Path>) -> Result<TrainSummary> {
    let mut t = load_trainable(opts, resume)?;
    // A full fine-tune resumed (or started from a reward model's directory) has its head already.
    if !(t.model.is_full() && t.model.score.is_some()) {
        t.model.add_score_head(opts.seed)?;
    }
    if t.model.is_full() {
        // A sequence classifier has no LM head: an untied one is neither trained nor saved.
        t.drop_var("lm_head.weight");
    }
    let head = t.model.score.clone().context("the score head was just added")?;
    t.add_var(SCORE_WEIGHT, head);
    let recipe = Pairs::new(opts, "reward", Box::new(BradleyTerry), None)?;
    train(opts, t, recipe, resume)
}
