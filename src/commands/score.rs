//! `tunekit score`: the rewards of conversations under a reward model (`train --method reward`),
//! one JSON line per conversation on stdout as it is scored (`{"id", "reward"}`; preference records
//! get `chosen`, `rejected` and `prefers_chosen`), and a closing count on stderr.

use super::Summary;
use crate::ingest::{stream_conversations, Item, MapOptions};
use crate::record::Message;
use crate::template::chat::ChatTemplate;
use crate::tokenize::TokenizerInfo;
use crate::train::io::{load_model, Placement};
use crate::train::model::Model;
use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

pub struct ScoreOptions {
    pub inputs: Vec<PathBuf>,
    pub model: PathBuf,
    /// The reward model's adapter directory (with the score head); none for a full reward model.
    pub adapter: Option<PathBuf>,
    /// tokenizer.json / directory / GGUF; default: the model.
    pub tokenizer: Option<PathBuf>,
    pub template: Option<String>,
    pub map: MapOptions,
    pub placement: Placement,
}

#[derive(Debug, Serialize)]
pub struct ScoreSummary {
    pub command: &'static str,
    pub scored: u64,
    pub mean_reward: f64,
}

/// A reward model with the tokenizer and chat template its inputs are rendered with.
pub struct RewardModel {
    model: Model,
    tok: TokenizerInfo,
    template: ChatTemplate,
}

impl RewardModel {
    pub fn load(
        model: &std::path::Path,
        adapter: Option<&std::path::Path>,
        tokenizer: Option<&std::path::Path>,
        template: Option<&str>,
        placement: &Placement,
    ) -> Result<Self> {
        let m = load_model(model, adapter, placement)?;
        if m.score.is_none() {
            bail!(
                "{}: not a reward model (no score head); train one with --method reward (an adapter: pass it as \
                 --adapter; with --full: pass the run as --model)",
                adapter.unwrap_or(model).display()
            );
        }
        let tok = TokenizerInfo::load(tokenizer.unwrap_or(model))?;
        let template = crate::tokenize::chat_template(&tok, template)?;
        Ok(RewardModel { model: m, tok, template })
    }

    /// The reward of a conversation, rendered with the chat template.
    pub fn reward(&self, msgs: &[Message]) -> Result<f64> {
        let text = self.template.render(msgs, None, false).map_err(|e| anyhow::anyhow!("chat template: {e:#}"))?;
        let enc = self.tok.tokenizer.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("{e}"))?;
        let ids: Vec<i32> = enc.get_ids().iter().map(|&t| t as i32).collect();
        Ok(self.model.reward(&ids)?.to_scalar::<f32>()? as f64)
    }
}

/// Scores every conversation of the inputs, writing its line to `out`.
pub fn run(o: &ScoreOptions, out: &mut dyn Write) -> Result<ScoreSummary> {
    let rm =
        RewardModel::load(&o.model, o.adapter.as_deref(), o.tokenizer.as_deref(), o.template.as_deref(), &o.placement)?;
    let (mut n, mut sum) = (0u64, 0.0);
    stream_conversations(&o.inputs, &o.map, |batch| {
        for item in batch.items {
            let Item::Ok(c) = item else { continue };
            let line = match (&c.chosen, &c.rejected) {
                (Some(ch), Some(rj)) => {
                    let with = |a: &Message| -> Vec<Message> { [c.messages.clone(), vec![a.clone()]].concat() };
                    let (rc, rr) = (rm.reward(&with(ch))?, rm.reward(&with(rj))?);
                    sum += rc;
                    json!({"id": c.id, "chosen": rc, "rejected": rr, "prefers_chosen": rc > rr})
                }
                _ => {
                    let r = rm.reward(&c.messages)?;
                    sum += r;
                    json!({"id": c.id, "reward": r})
                }
            };
            n += 1;
            writeln!(out, "{line}")?;
        }
        Ok(())
    })?;
    Ok(ScoreSummary { command: "score", scored: n, mean_reward: sum / n.max(1) as f64 })
}

impl Summary for ScoreSummary {
    /// On stderr: stdout carries the scores.
    fn print_human(&self) {
        eprintln!("scored {} conversation(s), mean reward {:.4}", self.scored, self.mean_reward);
    }
}
