//! `--reward model:DIR`: a reward model trained with `train --method reward` (a LoRA adapter with a
//! score head, or with `--full` a sequence classifier directory with its own base). It scores the prompt's ids followed by the completion's, as its training pairs were
//! rendered, so it must share the policy's tokenizer: a reward model whose vocabulary differs from
//! the policy's, or whose adapter does not fit its base, is refused before training starts. Its
//! base is the one its adapter_config.json names when that exists, else the policy's base.

use super::{RewardContext, RewardFn, Sample};
use crate::train::io::{load_model, peft};
use crate::train::model::Model;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub struct RewardModelFn {
    model: Model,
}

/// The base a reward adapter was trained on, if its adapter_config.json names one that exists.
pub fn adapter_base(dir: &Path) -> Option<PathBuf> {
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).ok()?).ok()?;
    Some(PathBuf::from(cfg["base_model_name_or_path"].as_str()?)).filter(|p| p.exists())
}

impl RewardModelFn {
    pub fn load(dir: &Path, ctx: &RewardContext) -> Result<Self> {
        if dir.join("config.json").exists() && !dir.join("adapter_config.json").exists() {
            // A full fine-tune's reward model: a sequence classifier directory.
            let model =
                load_model(dir, None, &ctx.placement).with_context(|| format!("--reward model:{}", dir.display()))?;
            if model.score.is_none() {
                bail!("--reward model:{}: a model directory without a score head is not a reward model", dir.display());
            }
            return Self::checked(model, dir, dir, ctx);
        }
        let (_, tensors) = peft::read(dir).with_context(|| format!("--reward model:{}", dir.display()))?;
        if !tensors.contains_key(crate::train::adapters::score::SCORE_WEIGHT) {
            bail!(
                "--reward model:{}: not a reward model (its adapter has no score head); train one with \
                 `tunekit train --method reward`",
                dir.display()
            );
        }
        let base = adapter_base(dir).unwrap_or_else(|| ctx.policy_model.clone());
        let model = load_model(&base, Some(dir), &ctx.placement).with_context(|| {
            format!("--reward model:{}: the adapter does not fit the base {}", dir.display(), base.display())
        })?;
        Self::checked(model, dir, &base, ctx)
    }

    /// The reward model, once its vocabulary is the policy's.
    fn checked(model: Model, dir: &Path, base: &Path, ctx: &RewardContext) -> Result<Self> {
        if model.config.vocab_size != ctx.policy_vocab {
            bail!(
                "--reward model:{}: its base {} has a vocabulary of {} tokens, the policy's {}; a reward model scores \
                 the policy's token ids, so it must share the policy's tokenizer",
                dir.display(),
                base.display(),
                model.config.vocab_size,
                ctx.policy_vocab
            );
        }
        Ok(RewardModelFn { model })
    }
}

impl RewardFn for RewardModelFn {
    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>> {
        let seqs: Vec<Vec<u32>> = samples
            .iter()
            .map(|s| s.prompt_ids.iter().map(|&t| t as u32).chain(s.completion_ids.iter().copied()).collect())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
        Ok(self.model.rewards(&refs)?.into_iter().map(|r| r as f64).collect())
    }
}
