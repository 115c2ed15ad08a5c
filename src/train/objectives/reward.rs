//! A reward model's loss, as TRL's RewardTrainer: Bradley-Terry, `-log sigmoid(r(chosen) - r(rejected))`
//! with `r` the scalar head on the last token.

use super::{softplus, PairObjective, PairOutcome};
use crate::pack::preference::PreferenceRow;
use crate::train::model::Model;

/// The Bradley-Terry pair loss.
#[derive(Debug, Clone, Copy)]
pub struct BradleyTerry;

impl PairObjective for BradleyTerry {
    fn pair(&self, model: &Model, p: &PreferenceRow) -> candle_core::Result<PairOutcome> {
        let rc = model.reward(&p.chosen_input_ids)?;
        let rr = model.reward(&p.rejected_input_ids)?;
        let loss = softplus(&(&rr - &rc)?)?;
        Ok(PairOutcome {
            loss,
            reward_chosen: rc.to_scalar::<f32>()? as f64,
            reward_rejected: rr.to_scalar::<f32>()? as f64,
            extra: vec![],
        })
    }
}
