//! ORPO (odds-ratio preference optimisation, TRL's `ORPOTrainer`): no reference model; the NLL of the
//! chosen answer plus `beta` times the odds-ratio term, `-log sigmoid(log odds(c) - log odds(r))` with
//! `log odds(y) = log p - log(1 - p)` of the per-token averaged completion log-probability `log p`.
//! As TRL computes it, the NLL covers every token of the chosen sequence, its prompt's too; both come
//! from one forward of the chosen side.

use super::{averaged_log_prob, log_sigmoid, PairObjective, PairOutcome};
use crate::pack::preference::PreferenceRow;
use crate::train::model::Model;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// ORPO with weight `beta` on the odds-ratio term (TRL's default 0.1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Orpo {
    pub beta: f64,
}

/// `log(1 - exp(x))` for `x < 0`, in f64 (the averaged log-probabilities near 0 lose digits in f32).
fn log1mexp(x: &Tensor) -> candle_core::Result<Tensor> {
    x.exp()?.affine(-1.0, 1.0)?.log()
}

impl PairObjective for Orpo {
    fn extra_metrics(&self) -> &'static [&'static str] {
        &["nll_loss", "log_odds_ratio", "log_odds_chosen", "logps/chosen", "logps/rejected"]
    }

    fn pair(&self, model: &Model, p: &PreferenceRow) -> candle_core::Result<PairOutcome> {
        // The chosen side once: every token's log-probability (for the NLL), the completion's averaged.
        let everything: Vec<i32> = p.chosen_input_ids.clone();
        let all = model.sequence_token_log_probs(&p.chosen_input_ids, &everything)?;
        let nll = all.mean(0)?.neg()?;
        let answer: Vec<u32> =
            (1..p.chosen_labels.len()).filter(|&j| p.chosen_labels[j] != -100).map(|j| j as u32 - 1).collect();
        let n = answer.len().max(1);
        let pc = all.index_select(&Tensor::from_vec(answer, n, all.device())?, 0)?.mean(0)?;
        let pr = averaged_log_prob(model, &p.rejected_input_ids, &p.rejected_labels)?;
        let (pc64, pr64) = (pc.to_dtype(DType::F64)?, pr.to_dtype(DType::F64)?);
        let log_odds = ((&pc64 - &pr64)? - (log1mexp(&pc64)? - log1mexp(&pr64)?)?)?;
        let ratio = log_sigmoid(&log_odds)?.to_dtype(DType::F32)?;
        let (pc_v, pr_v) = (pc.to_scalar::<f32>()? as f64, pr.to_scalar::<f32>()? as f64);
        let extra = vec![
            ("nll_loss", nll.to_scalar::<f32>()? as f64),
            ("log_odds_ratio", ratio.to_scalar::<f32>()? as f64),
            ("log_odds_chosen", log_odds.to_scalar::<f64>()?),
            ("logps/chosen", pc_v),
            ("logps/rejected", pr_v),
        ];
        let loss = (nll - (ratio * self.beta)?)?;
        Ok(PairOutcome { loss, reward_chosen: self.beta * pc_v, reward_rejected: self.beta * pr_v, extra })
    }
}
