//! SimPO (TRL's `CPOTrainer` with `loss_type="simpo"`): no reference model; the margin of the
//! per-token averaged completion log-probabilities, `-log sigmoid(beta (log p(c) - log p(r)) - gamma)`,
//! plus `cpo_alpha` times CPO's behaviour-cloning NLL of the chosen completion (0: SimPO as its paper
//! has it; TRL's CPO default is 1).

use super::{averaged_log_prob, log_sigmoid, PairObjective, PairOutcome};
use crate::pack::preference::PreferenceRow;
use crate::train::model::Model;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Simpo {
    /// The reward scale (the SimPO paper uses 2 to 2.5; TRL's CPOConfig defaults to 0.1).
    pub beta: f64,
    /// The target reward margin (TRL's simpo_gamma, 0.5).
    pub gamma: f64,
    /// The weight of the chosen completion's NLL (CPO's behaviour cloning).
    pub cpo_alpha: f64,
}

impl PairObjective for Simpo {
    fn extra_metrics(&self) -> &'static [&'static str] {
        &["logps/chosen", "logps/rejected"]
    }

    fn pair(&self, model: &Model, p: &PreferenceRow) -> candle_core::Result<PairOutcome> {
        let pc = averaged_log_prob(model, &p.chosen_input_ids, &p.chosen_labels)?;
        let pr = averaged_log_prob(model, &p.rejected_input_ids, &p.rejected_labels)?;
        // TRL: logits = pc - pr - gamma / beta; loss = -log sigmoid(beta logits).
        let logits = ((&pc - &pr)? - self.gamma / self.beta)?;
        let mut loss = log_sigmoid(&(logits * self.beta)?)?.neg()?;
        if self.cpo_alpha != 0.0 {
            // The chosen completion's mean token NLL is minus its averaged log-probability.
            loss = (loss - (&pc * self.cpo_alpha)?)?;
        }
        let (pc, pr) = (pc.to_scalar::<f32>()? as f64, pr.to_scalar::<f32>()? as f64);
        Ok(PairOutcome {
            loss,
            reward_chosen: self.beta * pc,
            reward_rejected: self.beta * pr,
            extra: vec![("logps/chosen", pc), ("logps/rejected", pr)],
        })
    }
}
