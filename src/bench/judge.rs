//! Judges of generated answers, for the `judge` and `pass_at_k` metrics: an external command with
//! the rewards' `command:` contract (one JSON object per answer on its stdin — `prompt` the context,
//! `completion` the filtered answer, `id`, the document's fields and `target` — and one number per
//! line on its stdout), or a reward model trained with `train --method reward` (`model: DIR`), which
//! scores the context's tokens followed by the answer's. Each judge is started or loaded once per
//! run and scores every model's answers.

use super::task::JudgeSpec;
use crate::train::io::Placement;
use crate::train::rewards::{command, model::RewardModelFn, RewardContext, RewardFn, Sample};
use anyhow::{Context, Result};
use std::path::Path;

/// Answers sent to a command at once (each call gets [`COMMAND_TIMEOUT_S`]).
const CHUNK: usize = 64;
const COMMAND_TIMEOUT_S: f64 = 300.0;

pub struct Judges {
    ctx: RewardContext,
    loaded: Vec<(JudgeSpec, Box<dyn RewardFn>)>,
}

impl Judges {
    /// Judges of answers of `model` (a reward model must share its vocabulary of `vocab` tokens).
    pub fn new(model: &Path, vocab: usize, placement: &Placement) -> Self {
        let ctx = RewardContext {
            policy_model: model.to_path_buf(),
            policy_vocab: vocab,
            placement: placement.clone(),
            command_timeout: COMMAND_TIMEOUT_S,
        };
        Judges { ctx, loaded: vec![] }
    }

    /// One score per sample from the judge `spec`.
    pub fn score(&mut self, spec: &JudgeSpec, samples: &[Sample]) -> Result<Vec<f64>> {
        let i = match self.loaded.iter().position(|(s, _)| s == spec) {
            Some(i) => i,
            None => {
                let f: Box<dyn RewardFn> = match spec {
                    JudgeSpec::Command(cmd) => Box::new(command::Command::new(cmd, self.ctx.command_timeout)),
                    JudgeSpec::Model(dir) => Box::new(
                        RewardModelFn::load(dir, &self.ctx)
                            .with_context(|| format!("judge model {}", dir.display()))?,
                    ),
                };
                self.loaded.push((spec.clone(), f));
                self.loaded.len() - 1
            }
        };
        let judge = &mut self.loaded[i].1;
        let mut out = Vec::with_capacity(samples.len());
        for chunk in samples.chunks(CHUNK) {
            let v = judge.score(chunk)?;
            if let Some(j) = v.iter().position(|x| !x.is_finite()) {
                anyhow::bail!("the judge gave {} for answer {}, not a finite number", v[j], chunk[j].label);
            }
            out.extend(v);
        }
        Ok(out)
    }
}
