//! What each training method optimises, as values: token cross-entropy on packed rows ([`sft`]),
//! over preference pairs the DPO family ([`dpo`]), the reference-free ORPO ([`orpo`]) and SimPO
//! ([`simpo`]) and the Bradley-Terry loss of a reward model ([`reward`]), over labelled unpaired
//! answers KTO ([`kto`]), and over sampled completions GRPO ([`grpo`]), RLOO ([`rloo`]) and PPO ([`ppo`]). An objective computes a loss (differentiable in the adapter) and its metrics; the
//! recipes in `train::recipes` decide what data it sees and when.

pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod orpo;
pub mod ppo;
pub mod reward;
pub mod rloo;
pub mod sft;
pub mod simpo;

use crate::pack::preference::PreferenceRow;
use crate::train::graph::no_grad;
use crate::train::model::Model;
use candle_core::Tensor;
use std::collections::BTreeMap;

/// One pair's loss (differentiable in the adapter) and the implicit or explicit rewards of its sides.
pub struct PairOutcome {
    pub loss: Tensor,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    /// What else the method logs per pair (averaged over the step), by TRL's names.
    pub extra: Vec<(&'static str, f64)>,
}

/// A loss over one preference pair.
pub trait PairObjective {
    fn pair(&self, model: &Model, p: &PreferenceRow) -> candle_core::Result<PairOutcome>;
    /// The names of what [`PairOutcome::extra`] holds (the same every pair, so that the ranks of a
    /// data-parallel run sum the same list even when one has no pair in a step).
    fn extra_metrics(&self) -> &'static [&'static str] {
        &[]
    }
}

/// `log(1 + exp(z))`, stable and differentiable.
pub(crate) fn softplus(z: &Tensor) -> candle_core::Result<Tensor> {
    z.relu()? + ((z.abs()?.neg()?.exp()? + 1.0)?.log()?)
}

/// `log sigmoid(z) = -softplus(-z)`, stable and differentiable.
pub(crate) fn log_sigmoid(z: &Tensor) -> candle_core::Result<Tensor> {
    softplus(&z.neg()?)?.neg()
}

/// The log-probability of a sequence's trained tokens averaged over them (TRL's
/// `average_log_prob=True`), differentiable.
pub(crate) fn averaged_log_prob(model: &Model, ids: &[i32], labels: &[i32]) -> candle_core::Result<Tensor> {
    let n = labels.iter().skip(1).filter(|&&l| l != -100).count().max(1);
    model.sequence_logp(ids, labels, None)? / n as f64
}

/// Held-out preference metrics: mean loss, reward accuracy (chosen above rejected) and margin.
pub fn evaluate_pairs(
    model: &Model,
    pairs: &[PreferenceRow],
    objective: &dyn PairObjective,
) -> candle_core::Result<BTreeMap<String, f64>> {
    let (mut loss, mut acc, mut margin) = (0.0, 0.0, 0.0);
    for p in pairs {
        let o = no_grad(|| objective.pair(model, p))?;
        loss += o.loss.to_scalar::<f32>()? as f64;
        acc += (o.reward_chosen > o.reward_rejected) as u8 as f64;
        margin += o.reward_chosen - o.reward_rejected;
    }
    let n = pairs.len().max(1) as f64;
    Ok(BTreeMap::from([
        ("loss".to_string(), loss / n),
        ("reward_accuracy".to_string(), acc / n),
        ("reward_margin".to_string(), margin / n),
    ]))
}
