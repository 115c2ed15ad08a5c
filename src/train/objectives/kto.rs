//! KTO (Kahneman-Tversky optimisation, TRL's `KTOTrainer` with loss_type "kto"): unpaired answers,
//! each desirable or not. With the implied reward `r = log pi(y|x) - log ref(y|x)` (summed over the
//! completion) and a reference point `z` — the batch's mean of the same log-ratio on mismatched
//! pairs (each prompt with another row's completion), detached and clamped at zero — a desirable
//! answer's loss is `w_d (1 - sigmoid(beta (r - z)))` and an undesirable one's
//! `w_u (1 - sigmoid(beta (z - r)))`, averaged over the batch. The reference is the base with the
//! adapter switched off.

use super::log_sigmoid;
use crate::pack::unpaired::UnpairedRow;
use crate::train::graph::no_grad;
use crate::train::model::Model;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// KTO with strength `beta` and the weights of desirable and undesirable answers' losses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Kto {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

/// One row's loss (weighted, differentiable in the adapter), its implied reward and the policy's
/// log-probability of its completion.
pub struct KtoOutcome {
    pub loss: Tensor,
    pub reward: f64,
    pub logp: f64,
}

/// `row`'s prompt followed by `partner`'s completion (only the completion trained): the mismatched
/// sequence of the KL estimate, as TRL's `KL_completion_ids`.
pub fn mismatched(row: &UnpairedRow, partner: &UnpairedRow) -> (Vec<i32>, Vec<i32>) {
    let (p, q) = (row.prompt_len(), partner.prompt_len());
    let ids = [&row.input_ids[..p], &partner.input_ids[q..]].concat();
    let labels = [&vec![-100; p][..], &partner.labels[q..]].concat();
    (ids, labels)
}

/// The partner of position `k` in a batch of `n`: the previous row, the first taking the last's
/// (TRL rotates the completions by one within each batch).
pub fn partner(k: usize, n: usize) -> usize {
    (k + n - 1) % n
}

impl Kto {
    /// The policy's minus the reference's log-probability of `row`'s prompt with `partner`'s
    /// completion, without a graph: one term of the reference point's mean.
    pub fn kl_term(&self, model: &Model, row: &UnpairedRow, partner: &UnpairedRow) -> candle_core::Result<f64> {
        let (ids, labels) = mismatched(row, partner);
        no_grad(|| {
            let policy = model.sequence_logp(&ids, &labels, None)?.to_scalar::<f32>()? as f64;
            model.set_lora_enabled(false);
            let reference = model.sequence_logp(&ids, &labels, None);
            model.set_lora_enabled(true);
            Ok(policy - reference?.to_scalar::<f32>()? as f64)
        })
    }

    /// The reference point from the batch's summed KL terms: their mean, at least zero.
    pub fn reference_point(sum: f64, n: usize) -> f64 {
        (sum / n.max(1) as f64).max(0.0)
    }

    /// `row`'s weighted loss against the reference point `z`.
    pub fn row(&self, model: &Model, row: &UnpairedRow, z: f64) -> candle_core::Result<KtoOutcome> {
        model.set_lora_enabled(false);
        let reference = no_grad(|| model.sequence_logp(&row.input_ids, &row.labels, None));
        model.set_lora_enabled(true);
        let reference = reference?.to_scalar::<f32>()? as f64;
        let logp = model.sequence_logp(&row.input_ids, &row.labels, None)?;
        let ratio = (&logp - reference)?;
        // 1 - sigmoid(x) = sigmoid(-x) = exp(log sigmoid(-x)).
        let z_beta = ((ratio.clone() - z)? * self.beta)?;
        let (x, w) = match row.desirable {
            true => (z_beta.neg()?, self.desirable_weight),
            false => (z_beta, self.undesirable_weight),
        };
        let loss = (log_sigmoid(&x)?.exp()? * w)?;
        let logp_value = logp.to_scalar::<f32>()? as f64;
        Ok(KtoOutcome { loss, reward: self.beta * (logp_value - reference), logp: logp_value })
    }
}

/// TRL's advice when the classes are unequal (eq. 8 of the KTO paper): the desirable weight times
/// the desirable count should be 1 to 4/3 times the undesirable weight times the undesirable count.
/// None when the weights are in range (or the classes equal); otherwise the ranges to pick from.
pub fn imbalance_advice(desirable: usize, undesirable: usize, k: &Kto) -> Option<String> {
    let (d, u) = (desirable.max(1) as f64, undesirable.max(1) as f64);
    if d == u {
        return None;
    }
    let round = |x: f64| (x * 100.0).round() / 100.0;
    let (d_lo, d_hi) = (round(u * k.undesirable_weight / d), round(u * k.undesirable_weight / d * 1.33));
    let (u_lo, u_hi) = (round(d * k.desirable_weight / u / 1.33), round(d * k.desirable_weight / u));
    let in_range = (d_lo..=d_hi).contains(&k.desirable_weight) || (u_lo..=u_hi).contains(&k.undesirable_weight);
    (!in_range).then(|| {
        format!(
            "{desirable} desirable and {undesirable} undesirable training rows with --desirable-weight {} and \
             --undesirable-weight {}: the KTO paper's range asks EITHER --desirable-weight in [{d_lo}, {d_hi}] OR \
             --undesirable-weight in [{u_lo}, {u_hi}] (not both)",
            k.desirable_weight, k.undesirable_weight
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mismatched_sequence_is_one_prompt_and_the_others_completion() {
        let a = UnpairedRow { input_ids: vec![1, 2, 3, 4], labels: vec![-100, -100, 3, 4], desirable: true };
        let b = UnpairedRow { input_ids: vec![5, 6, 7], labels: vec![-100, 6, 7], desirable: false };
        assert_eq!(mismatched(&a, &b), (vec![1, 2, 6, 7], vec![-100, -100, 6, 7]));
        assert_eq!((0..4).map(|k| partner(k, 4)).collect::<Vec<_>>(), [3, 0, 1, 2]);
    }

    #[test]
    fn advice_follows_trls_ranges() {
        let k = Kto { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 };
        // TRL's message for 3 desirable, 1 undesirable: desirable in [0.33, 0.44] or undesirable in [2.26, 3.0].
        let a = imbalance_advice(3, 1, &k).unwrap();
        assert!(a.contains("[0.33, 0.44]") && a.contains("[2.26, 3]"), "{a}");
        assert!(imbalance_advice(3, 1, &Kto { undesirable_weight: 2.5, ..k }).is_none());
        assert!(imbalance_advice(5, 5, &k).is_none());
    }
}
