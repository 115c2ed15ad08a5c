//! Rewards of completions for online RL, `--reward SPEC` (repeatable, weighted with a trailing `*W`):
//! rule rewards ([`rules`]: `match:COLUMN`, `regex:PATTERN`, `json`, `length:N`), a reward model
//! trained with `train --method reward` ([`model`]: `model:DIR`), and an external program
//! ([`command`]: `command:CMD`, one JSON object per completion on its stdin, one number per line on
//! its stdout). Each function scores a whole batch; the total is the weighted sum, and each
//! function's values are kept for its metrics.

pub mod command;
pub mod model;
pub mod rules;

use crate::train::io::Placement;
use anyhow::{bail, Context, Result};
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
    /// Parses `SPEC[*W]` specs; none is an error (RL needs a reward).
    pub fn parse(specs: &[String], ctx: &RewardContext) -> Result<Rewards> {
        if specs.is_empty() {
            bail!(
                "online RL needs at least one --reward: match:COLUMN, regex:PATTERN, json, length:N, model:DIR or command:CMD"
            );
        }
        let mut fns = Vec::with_capacity(specs.len());
        for spec in specs {
            let (body, weight) = split_weight(spec);
            let f: Box<dyn RewardFn> = match body.split_once(':').map_or((body, ""), |(k, v)| (k, v)) {
                ("match", col) if !col.is_empty() => Box::new(rules::Match::new(col)),
                ("regex", pat) if !pat.is_empty() => Box::new(rules::Regex::new(pat)?),
                ("json", "") => Box::new(rules::Json),
                ("length", n) => {
                    let n: f64 = n.parse().ok().filter(|n: &f64| *n > 0.0).with_context(|| {
                        format!("--reward {spec}: length:N needs a positive number of words, e.g. length:50")
                    })?;
                    Box::new(rules::Length(n))
                }
                ("model", dir) if !dir.is_empty() => Box::new(model::RewardModelFn::load(dir.as_ref(), ctx)?),
                ("command", cmd) if !cmd.trim().is_empty() => Box::new(command::Command::new(cmd, ctx.command_timeout)),
                _ => bail!(
                    "--reward {spec}: use match:COLUMN, regex:PATTERN, json, length:N, model:DIR or command:CMD, \
                     optionally weighted as SPEC*W"
                ),
            };
            fns.push((body.to_string(), weight, f));
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

/// `SPEC*W` -> (SPEC, W); a spec without a trailing number keeps weight 1.
fn split_weight(spec: &str) -> (&str, f64) {
    match spec.rsplit_once('*') {
        Some((body, w)) if !body.is_empty() => match w.trim().parse::<f64>() {
            Ok(w) => (body, w),
            Err(_) => (spec, 1.0),
        },
        _ => (spec, 1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_a_trailing_number_only() {
        assert_eq!(split_weight("match:answer*0.5"), ("match:answer", 0.5));
        assert_eq!(split_weight("regex:a*b"), ("regex:a*b", 1.0));
        assert_eq!(split_weight("json"), ("json", 1.0));
        assert_eq!(split_weight("length:20*2"), ("length:20", 2.0));
    }

    #[test]
    fn weighted_sum_and_per_function_values() {
        let ctx = RewardContext {
            policy_model: PathBuf::new(),
            policy_vocab: 0,
            placement: Placement::default(),
            command_timeout: 5.0,
        };
        let mut r = Rewards::parse(&["match:answer*2".into(), "json".into()], &ctx).unwrap();
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
        assert!(Rewards::parse(&[], &ctx).is_err());
        assert!(Rewards::parse(&["nope".into()], &ctx).is_err());
    }
}
