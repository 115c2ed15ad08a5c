//! What a training method gives the loop: a [`Recipe`] owns its data and its place in it, and each
//! optimizer step hands back a [`Step`] (its loss, the accumulated adapter gradients, its metrics);
//! [`GradSum`] accumulates gradients over micro-batches.

use super::trainable::Trainable;
use crate::train::model::config::ModelConfig;
use crate::train::model::memory::MemoryEstimate;
use crate::train::model::moe::is_expert_adapter;
use crate::train::model::Model;
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Held-out metrics by name; `loss` is always one of them.
pub type Metrics = BTreeMap<String, f64>;

/// The gradient of every variable in `vars` order from a backward pass (zeros for the adapters of
/// an expert the batch routed no token to).
pub fn grads_of(vars: &[(String, Var)], store: &GradStore) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|(n, v)| match store.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None if is_expert_adapter(n) => Ok(v.zeros_like()?),
            None => bail!("no gradient reached {n}; the graph is cut somewhere"),
        })
        .collect()
}

/// Gradients summed over the micro-batches (or pairs) of one step, in the variables' order.
#[derive(Default)]
pub struct GradSum(Option<Vec<Tensor>>);

impl GradSum {
    pub fn add(&mut self, g: Vec<Tensor>) -> Result<()> {
        self.0 = Some(match self.0.take() {
            None => g,
            Some(a) => a.iter().zip(g).map(|(x, y)| x + y).collect::<candle_core::Result<_>>()?,
        });
        Ok(())
    }

    pub fn take(self) -> Option<Vec<Tensor>> {
        self.0
    }

    /// The step's gradients. A rank of a data-parallel run whose share of the step was empty adds
    /// zeros (the other ranks' sum is the step); in one process an empty step is the error `empty`.
    pub fn finish(self, t: &Trainable, empty: &str) -> Result<Vec<Tensor>> {
        match self.0 {
            Some(g) => Ok(g),
            None if crate::cluster::world().size > 1 => {
                Ok(t.vars.iter().map(|v| v.zeros_like()).collect::<candle_core::Result<_>>()?)
            }
            None => bail!("{empty}"),
        }
    }
}

/// One optimizer step's work, as a recipe hands it to the loop.
pub struct Step {
    /// The step's loss (what the gradients are of).
    pub loss: f64,
    /// The accumulated gradients, in the variables' order.
    pub grads: Vec<Tensor>,
    pub tokens: usize,
    /// Rows or pairs seen.
    pub examples: usize,
    /// The method's own metrics for metrics.jsonl.
    pub metrics: Map<String, Value>,
}

/// A training method's part of the loop.
pub trait Recipe {
    /// What one example is ("rows", "pairs"): names the rate in metrics.jsonl and the summary.
    const EXAMPLES: &'static str;
    /// What the data holds ("rows", "pairs", "prompts"), counted by `examples`.
    const DATA: &'static str = Self::EXAMPLES;
    /// The method's name (progress bar, summary).
    fn name(&self) -> &'static str;
    /// Training and held-out examples.
    fn examples(&self) -> (usize, usize);
    fn steps_per_epoch(&self) -> u64;
    /// `--probe-memory`: runs the step's most memory-hungry work once before training, leaving the
    /// run unchanged; says what it ran, or None when the method has no probe.
    fn probe(&mut self, _t: &Trainable) -> Result<Option<String>> {
        Ok(None)
    }
    /// The accumulated gradients of optimizer step `step` (0-based).
    fn step(&mut self, t: &Trainable, step: u64) -> Result<Step>;
    /// Held-out metrics, or None without held-out data.
    fn evaluate(&mut self, model: &Model) -> Result<Option<Metrics>>;
    /// The held-out metric that tracks progress (the eval curve, the summary's first and final).
    fn eval_key(&self) -> &'static str {
        "loss"
    }
    /// What a checkpoint must keep to continue bit for bit, beyond the step and the optimizer.
    fn state(&self) -> Map<String, Value> {
        Map::new()
    }
    fn restore(&mut self, _state: &Value) -> Result<()> {
        Ok(())
    }
    /// The estimated memory of the largest micro-batch's step (activations, loss head), where the
    /// method has one.
    fn memory_estimate(&self, _config: &ModelConfig) -> Option<MemoryEstimate> {
        None
    }
    /// The most tokens a micro-batch of the run holds, where the method knows its micro-batches
    /// before the steps (the allocator's pace: `allocator::hold_between_steps`).
    fn largest_micro_batch_tokens(&self) -> Option<usize> {
        None
    }
    /// Adds to an adapter directory what the method trains beside the adapters (a reward head).
    fn save_extra(&self, _model: &Model, _dir: &Path) -> Result<()> {
        Ok(())
    }
}
