//! `tunekit eval`: the mean token loss and perplexity of a model (optionally with an adapter) on a
//! split of prepared shards.

use super::Summary;
use crate::train::data::{check_manifest, Shards};
use crate::train::io::{load_model, Placement};
use crate::train::model::LOGITS_CHUNK;
use crate::train::objectives::sft::evaluate;
use anyhow::Result;
use serde::Serialize;
use std::path::PathBuf;

pub struct EvalOptions {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub data: PathBuf,
    /// eval or train.
    pub split: String,
    pub batch_tokens: usize,
    pub placement: Placement,
}

#[derive(Debug, Serialize)]
pub struct EvalSummary {
    pub command: &'static str,
    pub split: String,
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: u64,
}

pub fn run(o: &EvalOptions) -> Result<EvalSummary> {
    let m = load_model(&o.model, o.adapter.as_deref(), &o.placement)?;
    check_manifest(&o.data, m.config.vocab_size)?;
    let shards = Shards::load(&o.data, &o.split)?;
    let (loss, tokens) = evaluate(&m, &shards, o.batch_tokens, LOGITS_CHUNK)?;
    Ok(EvalSummary { command: "eval", split: o.split.clone(), loss, perplexity: loss.exp(), tokens })
}

impl Summary for EvalSummary {
    fn print_human(&self) {
        println!(
            "{}: loss {:.4}, perplexity {:.3} over {} trained tokens",
            self.split, self.loss, self.perplexity, self.tokens
        );
    }
}
