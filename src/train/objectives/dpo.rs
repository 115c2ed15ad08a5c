//! Direct preference optimisation: the policy is the base model with a LoRA adapter, the reference
//! is the same model with the adapter switched off (no second copy in memory). Losses as TRL's
//! DPOTrainer computes them (trl/trainer/dpo_trainer.py): with
//! `delta = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))`, sigmoid `-log sigmoid(beta delta)`,
//! hinge `relu(1 - beta delta)`, ipo `(delta_avg - 1 / (2 beta))^2` with per-token averaged log-ratios.

use super::{softplus, PairObjective, PairOutcome};
use crate::pack::preference::PreferenceRow;
use crate::train::model::Model;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    Sigmoid,
    Hinge,
    Ipo,
}

/// DPO with strength `beta` of the constraint to the reference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Dpo {
    pub beta: f64,
    pub loss: DpoLoss,
}

fn trained(labels: &[i32]) -> f64 {
    labels.iter().skip(1).filter(|&&l| l != -100).count().max(1) as f64
}

impl PairObjective for Dpo {
    fn pair(&self, model: &Model, p: &PreferenceRow) -> candle_core::Result<PairOutcome> {
        let beta = self.beta;
        model.set_lora_enabled(false);
        let rc = model.sequence_logp(&p.chosen_input_ids, &p.chosen_labels, None)?.detach();
        let rr = model.sequence_logp(&p.rejected_input_ids, &p.rejected_labels, None)?.detach();
        model.set_lora_enabled(true);
        let pc = model.sequence_logp(&p.chosen_input_ids, &p.chosen_labels, None)?;
        let pr = model.sequence_logp(&p.rejected_input_ids, &p.rejected_labels, None)?;
        let chosen = (&pc - &rc)?;
        let rejected = (&pr - &rr)?;
        let loss = match self.loss {
            DpoLoss::Sigmoid => softplus(&((&chosen - &rejected)? * -beta)?)?,
            DpoLoss::Hinge => ((&chosen - &rejected)? * -beta)?.affine(1.0, 1.0)?.relu()?,
            DpoLoss::Ipo => {
                let avg = ((&chosen / trained(&p.chosen_labels))? - (&rejected / trained(&p.rejected_labels))?)?;
                (avg - 1.0 / (2.0 * beta))?.sqr()?
            }
        };
        Ok(PairOutcome {
            loss,
            reward_chosen: beta * chosen.to_scalar::<f32>()? as f64,
            reward_rejected: beta * rejected.to_scalar::<f32>()? as f64,
        })
    }
}
