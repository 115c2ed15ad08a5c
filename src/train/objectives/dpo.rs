//! Direct preference optimisation: the policy is the base model with a LoRA adapter, the reference
//! is the same model with the adapter switched off (no second copy in memory); in full fine-tuning
//! the reference's log-probabilities are computed once before training ([`PrecomputedReference`]). Losses as TRL's
//! DPOTrainer computes them (trl/trainer/dpo_trainer.py): with
//! `delta = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))`, sigmoid `-log sigmoid(beta delta)`,
//! hinge `relu(1 - beta delta)`, ipo `(delta_avg - 1 / (2 beta))^2` with per-token averaged log-ratios.

use super::{softplus, PairObjective, PairOutcome};
use crate::pack::preference::PreferenceRow;
use crate::train::model::Model;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

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
        model.set_lora_enabled(false);
        let rc = model.sequence_logp(&p.chosen_input_ids, &p.chosen_labels, None)?.detach();
        let rr = model.sequence_logp(&p.rejected_input_ids, &p.rejected_labels, None)?.detach();
        model.set_lora_enabled(true);
        self.against(model, p, &rc, &rr)
    }
}

impl Dpo {
    /// The pair's loss and rewards against the reference's log-probabilities `rc`, `rr` of the
    /// chosen and rejected answers.
    fn against(&self, model: &Model, p: &PreferenceRow, rc: &Tensor, rr: &Tensor) -> candle_core::Result<PairOutcome> {
        let beta = self.beta;
        let pc = model.sequence_logp(&p.chosen_input_ids, &p.chosen_labels, None)?;
        let pr = model.sequence_logp(&p.rejected_input_ids, &p.rejected_labels, None)?;
        let chosen = (&pc - rc)?;
        let rejected = (&pr - rr)?;
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
            extra: vec![],
        })
    }
}

/// DPO against reference log-probabilities computed once before training (TRL's
/// `precompute_ref_log_probs`): full fine-tuning's reference is the base as it was, which no
/// adapter switch gives back, and this way no second copy of the model stays in memory.
pub struct PrecomputedReference {
    pub dpo: Dpo,
    /// The reference's (chosen, rejected) log-probabilities by [`pair_key`].
    pub refs: HashMap<u64, (f32, f32)>,
}

/// A pair's identity for the reference table: a hash of both sides' ids and labels.
pub fn pair_key(p: &PreferenceRow) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&p.chosen_input_ids, &p.chosen_labels, &p.rejected_input_ids, &p.rejected_labels).hash(&mut h);
    h.finish()
}

/// The reference's log-probabilities of every pair of `pairs` under `model` (no graph recorded).
pub fn reference_log_probs(model: &Model, pairs: &[PreferenceRow]) -> candle_core::Result<HashMap<u64, (f32, f32)>> {
    let pb = crate::progress::bar("reference log-probabilities", pairs.len() as u64);
    let mut refs = HashMap::with_capacity(pairs.len());
    for p in pairs {
        let (c, r) = crate::train::graph::no_grad(|| -> candle_core::Result<(f32, f32)> {
            let c = model.sequence_logp(&p.chosen_input_ids, &p.chosen_labels, None)?.to_scalar::<f32>()?;
            let r = model.sequence_logp(&p.rejected_input_ids, &p.rejected_labels, None)?.to_scalar::<f32>()?;
            Ok((c, r))
        })?;
        refs.insert(pair_key(p), (c, r));
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(refs)
}

impl PairObjective for PrecomputedReference {
    fn pair(&self, model: &Model, p: &PreferenceRow) -> candle_core::Result<PairOutcome> {
        let Some(&(c, r)) = self.refs.get(&pair_key(p)) else {
            candle_core::bail!("dpo: a pair without a precomputed reference log-probability")
        };
        let dev = &model.device;
        self.dpo.against(model, p, &Tensor::new(c, dev)?, &Tensor::new(r, dev)?)
    }
}
