//! Rewards of completions for online RL, `--reward SPEC` (repeatable, weighted with a trailing `*W`;
//! parsed once by [`spec`]):
//! rule rewards ([`rules`]: `match:COLUMN`, `regex:PATTERN`, `json`, `length:N`), a reward model
//! trained with `train --method reward` ([`model`]: `model:DIR`), and an external program
//! ([`command`]: `command:CMD`, one JSON object per completion on its stdin, one number per line on
//! its stdout). Each function scores a whole batch; the total is the weighted sum, and each
//! function's values are kept for its metrics.

pub mod command;
pub mod model;
pub mod rules;
pub mod spec;

use crate::train::io::Placement;
use anyhow::{bail, Context, Result};
pub use spec::{RewardKind, RewardSpec};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One completion to score, with its prompt and the prompt row's columns.
pub struct Sample<'a> {
    /// `<prompt id>#<generation>`, for error messages.
    pub label: String,
    pub prompt: &'a str,
    pub completion: &'a str,
    pub prompt_ids: &'a [i32],
    /// The completion's tokens, its stop token included when it has one.
    pub completion_ids: &'a [u32],
    pub columns: &'a BTreeMap<String, String>,
}

/// A reward function over a batch of completions.
pub trait RewardFn {
    fn score(&mut self, samples: &[Sample]) -> Result<Vec<f64>>;
}

/// What the reward functions may need from the run.
pub struct RewardContext {
    /// The policy's base and vocabulary (a reward model must fit them).
    pub policy_model: PathBuf,
    pub policy_vocab: usize,
    pub placement: Placement,
    /// Seconds an external reward command may take for one batch.
    pub command_timeout: f64,
}

/// The run's reward functions with their weights.
pub struct Rewards {
    fns: Vec<(String, f64, Box<dyn RewardFn>)>,
}

/// Every function's rewards of a batch, and their weighted sum.
pub struct Scores {
    /// (name, values) per function, in the order given.
    pub per_fn: Vec<(String, Vec<f64>)>,
    pub total: Vec<f64>,
}

impl Rewards {
    /// The functions of `specs`; none is an error (RL needs a reward).
    pub fn build(specs: &[RewardSpec], ctx: &RewardContext) -> Result<Rewards> {
        if specs.is_empty() {
            bail!(
                "online RL needs at least one --reward: match:COLUMN, regex:PATTERN, json, length:N, model:DIR or command:CMD"
            );
        }
        let mut fns = Vec::with_capacity(specs.len());
        for spec in specs {
            let f: Box<dyn RewardFn> = match &spec.kind {
                RewardKind::Match(col) => Box::new(rules::Match::new(col)),
                RewardKind::Regex(pat) => Box::new(rules::Regex::new(pat)?),
                RewardKind::Json => Box::new(rules::Json),
                RewardKind::Length(n) => Box::new(rules::Length(*n)),
                RewardKind::Model(dir) => Box::new(model::RewardModelFn::load(dir, ctx)?),
                RewardKind::Command(cmd) => Box::new(command::Command::new(cmd, ctx.command_timeout)),
            };
            fns.push((spec.name.clone(), spec.weight, f));
        }
        Ok(Rewards { fns })
    }

    pub fn names(&self) -> Vec<String> {
        self.fns.iter().map(|(n, ..)| n.clone()).collect()
    }

    /// Scores a batch with every function.
    pub fn score(&mut self, samples: &[Sample]) -> Result<Scores> {
        let mut total = vec![0.0; samples.len()];
        let mut per_fn = Vec::with_capacity(self.fns.len());
        for (name, w, f) in &mut self.fns {
            let v = f.score(samples).with_context(|| format!("reward {name}"))?;
            if v.len() != samples.len() {
                bail!("reward {name} gave {} values for {} completions", v.len(), samples.len());
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                bail!("reward {name} of completion {} is {}, not a finite number", samples[i].label, v[i]);
            }
            for (t, x) in total.iter_mut().zip(&v) {
                *t += *w * x;
            }
            per_fn.push((name.clone(), v));
        }
        Ok(Scores { per_fn, total })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_sum_and_per_function_values() {
        let ctx = RewardContext {
            policy_model: PathBuf::new(),
            policy_vocab: 0,
            placement: Placement::default(),
            command_timeout: 5.0,
        };
        let specs = ["match:answer*2", "json"].map(|s| s.parse::<RewardSpec>().unwrap());
        let mut r = Rewards::build(&specs, &ctx).unwrap();
        let cols: BTreeMap<String, String> = [("answer".to_string(), "42".to_string())].into();
        let s = |c: &'static str| Sample {
            label: "p#0".into(),
            prompt: "q",
            completion: c,
            prompt_ids: &[],
            completion_ids: &[],
            columns: &cols,
        };
        let out = r.score(&[s("The answer is 42."), s("{\"a\": 1}")]).unwrap();
        assert_eq!(out.total, vec![2.0, 1.0]);
        assert_eq!(out.per_fn[0], ("match:answer".to_string(), vec![1.0, 0.0]));
        assert!(Rewards::build(&[], &ctx).is_err());
    }
}
